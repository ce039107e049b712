"""The PEFT-backed baselines (DoRA, AdaLoRA, VeRA): selected like the native methods, trained a few steps on a tiny
BERT built from a config, parameter counts from their PEFT configs, save/load round trips, AdaLoRA's budget schedule,
and one run each through kasa-train. Skipped when peft is not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import kasa
from cli_helpers import run_cli, train_args
from kasa.adapters import peft_baselines

# find_spec, not importorskip: importing peft at collection cost every test worker seconds
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (kasa[peft])")

HIDDEN, LAYERS, VOCAB = 32, 2, 30
MODULES = 2 * LAYERS  # query and value of every layer, each HIDDEN x HIDDEN


def build_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertForSequenceClassification(config)


def adapter_config(method: str, rank: int = 4, **options) -> kasa.AdapterConfig:
    return kasa.AdapterConfig(method=method, rank=rank, alpha=8, target_modules=["query", "value"],
                              trainable_modules=["classifier"], peft_options=options)


# (method, rank, peft_options, adapter parameters per 32 x 32 module as the PEFT config defines them)
CASES = [
    ("dora", 4, {}, 4 * HIDDEN + HIDDEN * 4 + HIDDEN),  # A (r x in), B (out x r), magnitude (out)
    ("adalora", 4, {"init_r": 6}, 6 * HIDDEN + HIDDEN * 6 + 6),  # Q (init_r x in), P (out x init_r), E (init_r)
    ("vera", 4, {}, HIDDEN + 4),  # lambda_b (out), lambda_d (r); the projections are frozen, shared buffers
]


def batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (8, 10), generator=generator),
            torch.randint(0, 2, (8,), generator=generator))


def train(model, steps: int = 12, lr: float = 1e-2) -> list[float]:
    x, y = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(input_ids=x, labels=y).loss
        aux = kasa.aux_loss(model)
        total = loss + aux.total if aux is not None else loss
        total.backward()
        optimizer.step()
        kasa.after_optimizer_step(model, step, steps)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method, rank, options, per_module", CASES)
def test_trains_counts_and_round_trips(method, rank, options, per_module, tmp_path):
    model = kasa.apply_adapters(build_bert(), adapter_config(method, rank, **options))
    count = kasa.count_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert count.adapter == MODULES * per_module
    assert count.trainable == count.adapter + head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable  # the head trains in place, under its own name
    assert all(n.startswith("classifier.") or "query" in n or "value" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train(model)
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("classifier" not in n for n in changed)  # the adapter itself moved, not only the head

    model.eval()
    x, _ = batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    kasa.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["method"] == method and saved["config"]["peft_options"] == options
    fresh = kasa.load_adapter(build_bert(), tmp_path / "adapter")  # same base weights (seed 0), new adapter init
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=x).logits, expected, atol=1e-6)
        kasa.merge_adapters(fresh)
        assert torch.allclose(fresh(input_ids=x).logits, expected, atol=1e-5)
        kasa.unmerge_adapters(fresh)
        plain = kasa.merge_and_unload(fresh)
        assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
        assert torch.allclose(plain(input_ids=x).logits, expected, atol=1e-5)


def test_adalora_budget_prunes_to_the_target_rank():
    model = kasa.apply_adapters(build_bert(), adapter_config("adalora", 4, init_r=6, tinit=0.2, tfinal=0.3))
    train(model, steps=10)
    tuner = peft_baselines.tuner_of(model)
    settings = tuner.peft_config[peft_baselines.ADAPTER_NAME]
    assert (settings.total_step, settings.tinit, settings.tfinal) == (10, 2, 3)  # fractions of the steps
    kept = sum(int((layer_e != 0).sum()) for name, layer_e in model.named_parameters() if ".lora_E." in name)
    assert kept == 4 * MODULES  # target_r per matrix on average: 16 of the 24 initial triplets
    assert settings.rank_pattern and len(settings.rank_pattern) == MODULES


def test_adalora_orthogonal_regularisation_matches_peft():
    model = kasa.apply_adapters(build_bert(), adapter_config("adalora", 4, orth_reg_weight=0.3))
    aux = kasa.aux_loss(model)
    expected, count = 0.0, 0
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            expected += torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])).item()
            count += 1
    assert aux.total.item() == pytest.approx(0.3 * expected / count, rel=1e-5)
    assert set(aux.module_values()) == {n for n, m in model.named_modules() if n.endswith(("query", "value"))}
    assert kasa.aux_loss(kasa.apply_adapters(build_bert(), adapter_config("dora"))) is None


def test_adalora_schedule_errors():
    model = kasa.apply_adapters(build_bert(), adapter_config("adalora", 4, tinit=5, tfinal=5))
    with pytest.raises(ValueError, match="no budgeting phase"):
        kasa.configure_schedule(model, 8)
    model = kasa.apply_adapters(build_bert(), adapter_config("adalora", 4))
    with pytest.raises(ValueError, match="total_steps"):
        kasa.after_optimizer_step(model, 0)
    with pytest.raises(ValueError, match="before optimizer.zero_grad"):  # a TypeError inside PEFT
        kasa.after_optimizer_step(model, 0, 8)  # no gradients: a loop that zeroed them first
    with pytest.raises(ValueError, match="init_r"):
        kasa.apply_adapters(build_bert(), adapter_config("adalora", 4, init_r=4))
    with pytest.raises(ValueError, match="peft_options"):
        kasa.apply_adapters(build_bert(), adapter_config("dora", 4, no_such_option=1))


def test_after_optimizer_step_is_a_no_op_for_other_methods():
    model = kasa.apply_adapters(build_bert(), kasa.AdapterConfig(method="lora", rank=2, target_modules=["query"]))
    kasa.after_optimizer_step(model, 0, 10)
    kasa.configure_schedule(model, 10)
    assert peft_baselines.tuner_of(model) is None


def test_kasa_train_and_eval_with_dora(tiny_model, sentiment_dir, tmp_path):
    run_dir = tmp_path / "dora"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "method=dora", "method.rank=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "dora"
    assert summary["trainable_params_without_head"] == MODULES * (4 * HIDDEN + HIDDEN * 4 + HIDDEN)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1]
    evaluation = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["score"] == pytest.approx(summary["best"], abs=1e-6)


def test_kasa_train_steps_adalora_budget(tiny_model, sentiment_dir, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "adalora"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "method=adalora",
                                                   "method.rank=2", "+method.peft_options.init_r=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "adalora"
    assert summary["trainable_params_without_head"] == MODULES * (4 * HIDDEN * 2 + 4)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("l3" in r and "aux_loss" in r for r in records if r["type"] == "train")  # orthogonal regularisation
    tensors = load_file(str(run_dir / "checkpoints" / "last" / "adapter_model.safetensors"))
    kept = sum(int((t != 0).sum()) for k, t in tensors.items() if ".lora_E." in k)
    assert kept == 2 * MODULES  # the budget schedule ran in the loop: pruned to target_r = 2 on average
