"""kasa-inspect (in process): the report's losses against a direct computation on a tiny model, its files, the
flagged modules' override, and each bad input as one line with exit status 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import write_tsv
from kasa.cli import inspect
from kasa.cli.common import compose_run
from kasa.run_dir import check_can_make
from kasa.tasks import build_task


def inspect_args(model, data, out, *extra: str) -> list[str]:
    return [f"model.path={model}", f"task.data_dir={data}", f"output_dir={out}", "trainer.batch_size=8",
            "trainer.max_length=16", "method.svd_cache_dir=null", "method.rank=6", "held_out=8", *extra]


def direct_losses(cfg, names: list[str], kept: list[str] = ()) -> tuple[float, float, float, float]:
    """Held-out loss of the untouched model, with every target's 6 smallest singular triplets removed (float64 SVD),
    with only names[0]'s removed, and with those of every target but `kept` removed: written out with torch
    alone."""
    task = build_task(cfg)
    tokenizer, model = task.load_model()
    dataset = task.train_dataset(tokenizer)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batch = task.collator(tokenizer)([dataset[i] for i in order[:8]])

    def loss() -> float:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return float(F.cross_entropy(logits.float(), batch["labels"]))

    def truncate(name: str) -> None:
        weight = model.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        with torch.no_grad():
            weight.copy_(weight.double() - (u[:, -6:] * s[-6:]) @ vh[-6:])

    model.eval()
    base = loss()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    truncate(names[0])
    alone = loss()
    for name in names[1:]:
        truncate(name)
    everything = loss()
    for name in kept:
        model.get_submodule(name).weight.data.copy_(originals[name])
    all_but_kept = loss()
    for name, weight in originals.items():
        model.get_submodule(name).weight.data.copy_(weight)
    return base, everything, alone, all_but_kept


def test_the_leave_out_override_keeps_whole_targets_short() -> None:
    adapted = {f"model.layers.{i}.self_attn.{p}": (p == "v_proj" and i == 1) for i in range(3)
               for p in ("q_proj", "v_proj")}
    assert inspect.leave_out(["q_proj", "v_proj"], adapted) == [
        "q_proj", "model.layers.0.self_attn.v_proj", "model.layers.2.self_attn.v_proj"]
    fused = {"h.0.attn.c_attn.q": False, "h.0.attn.c_attn.v": True, "h.1.attn.c_attn.q": False,
             "h.1.attn.c_attn.v": False}
    assert inspect.leave_out(["c_attn.q", "c_attn.v"], fused) == ["c_attn.q", "h.1.attn.c_attn.v"]
    assert inspect.leave_out(["q_proj"], {"a.q_proj": False}) == ["q_proj"]


def test_report_losses_equal_a_direct_computation(tiny_model, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "report"
    inspect.main(inspect_args(tiny_model, sentiment_dir, out, "threshold=0"))
    report = json.loads((out / "truncation_report.json").read_text())
    names = [row["name"] for row in report["modules"]]
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
    cfg = compose_run(inspect_args(tiny_model, sentiment_dir, out)[:-1], str(out))
    base, everything, alone, override = direct_losses(cfg, names, report["flagged"])
    assert report["base_loss"] == pytest.approx(base, abs=1e-5)
    assert report["truncated_loss"] == pytest.approx(everything, abs=1e-5)
    assert report["modules"][0]["loss"] == pytest.approx(alone, abs=1e-5)
    # what the override leaves, measured (walk AE: the modules kept raised the loss by 17% together, unsaid)
    assert report["override_loss"] == (pytest.approx(override, abs=1e-5) if report["flagged"] else None)
    for row in report["modules"]:
        assert 0 <= row["energy_share"] <= 1 and row["uniform_share"] == pytest.approx(6 / 32)
        assert row["output_change"] > 0
    # threshold 0 flags every module whose truncation raises the loss; the override keeps the others
    flagged = [r["name"] for r in report["modules"] if r["relative_increase"] > 0]
    assert report["flagged"] == flagged
    kept = [n for n in names if n not in flagged]
    if flagged:  # the override's targets adapt exactly the modules that are kept
        targets = report["override"].removeprefix("'model.target_modules=[").removesuffix("]'").split(",")
        assert [n for n in names if any(n == t or n.endswith("." + t) for t in targets)] == kept
    else:
        assert report["override"] is None
    assert (out / "truncation_report.md").read_text().count("| bert.encoder") == 4
    assert (out / "truncation_report.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "held-out training examples" in printed and str(out / "truncation_report.json") in printed


@pytest.mark.parametrize("basis, override_loss, advice", [
    ("weight", 5.48, "the modules kept still raise the loss by +16.6% together: method.truncation_basis=activation"),
    ("activation", 5.48, "the modules kept still raise the loss by +16.6% together: lower method.truncation_rank"),
    ("weight", 4.72, None),
])
def test_the_summary_says_what_the_override_leaves(tmp_path, basis, override_loss, advice):
    """SmolLM2's v_proj r 4: leaving out the one module flagged alone still left the loss 17% up, and kasa-inspect
    said nothing of it, nor of the activation basis (walk AE)."""
    report = {"method": "kasa", "truncation_rank": 4, "target_modules": ["q_proj", "v_proj"], "truncation_basis": basis,
              "held_out_examples": 16, "base_loss": 4.7, "truncated_loss": 8.2, "relative_increase": 8.2 / 4.7 - 1,
              "threshold": 0.05, "flagged": ["model.layers.1.self_attn.v_proj"], "override_loss": override_loss,
              "override": "'model.target_modules=[q_proj,v_proj]'"}
    lines = inspect._summary_lines(report, tmp_path)
    assert f"(loss then {override_loss:.4f}, {override_loss / 4.7 - 1:+.1%})" in lines[2]
    assert (advice is None and len(lines) == 4) or lines[3].startswith(advice)


def test_activation_basis_report(tiny_model, sentiment_dir, tmp_path):
    out = tmp_path / "act"
    report = inspect.run(inspect_args(tiny_model, sentiment_dir, out, "method.truncation_basis=activation",
                                      "method.calibration_samples=16"))
    assert report["truncation_basis"] == "activation" and report["calibration_examples"] == 16
    assert report["held_out_examples"] == 8
    weight = inspect.run(inspect_args(tiny_model, sentiment_dir, tmp_path / "weight"))
    # the activation basis changes the outputs less (on held-out examples, not only on its calibration inputs)
    assert sum(r["output_change"] for r in report["modules"]) < sum(r["output_change"] for r in weight["modules"])


@pytest.mark.parametrize("extra, message", [
    (["method=lora"], "nothing to inspect"),
    (["held_out=1000"], "the training split has 32 examples, fewer than held_out=1000: pass held_out=32 or fewer"),
    (["held_out=1000", "method.truncation_basis=activation", "method.calibration_samples=16"],
     "fewer than method.calibration_samples=16 plus held_out=1000: pass held_out=16 or fewer, or lower "
     "method.calibration_samples"),
    (["method.truncation_basis=activation", "method.calibration_samples=1000"], "calibration_samples"),
    (["held_out=1000", "task.max_train_samples=20"], "the training split has 20 examples after "
     "task.max_train_samples=20, fewer than held_out=1000: pass held_out=20 or fewer, or raise task.max_train_samples"),
    (["threshold=abc"], "not a number"),
    (["held_out=1.5"], "held_out='1.5' is not a whole number of examples: e.g. held_out="),
    (["threshold=-1"], "threshold=-1.0 is not allowed: pass a relative loss increase >= 0"),
    (["held_out=0"], "held_out=0 is not allowed: pass a number of examples >= 1"),
    (["method.svd_device=gpu0"], "method.svd_device=gpu0 is not a device"),
    (["recipe=glue/nonexistent"], "nonexistent"),
    (["~task"], "task.name has no value: choose a task with task=<option> (one of: "),  # walk AZ
    (["threshhold=0.1"], "unknown key threshhold (did you mean threshold?); valid keys: threshold, held_out, output_dir, "
                         "model, task"),
    (["output_dir=INPUT/train.tsv/report"], "cannot be made: INPUT/train.tsv is a file, not a folder; choose another"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model, sentiment_dir, tmp_path, capsys, monkeypatch, extra, message):
    """Each refused before the model loads (the data's checks came after the load: minutes for an LLM)."""
    from kasa.tasks.glue import GlueTask

    def load_model(self):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(GlueTask, "load_model", load_model)
    out = tmp_path / "bad"
    extra = [arg.replace("INPUT", str(sentiment_dir)) for arg in extra]
    message = message.replace("INPUT", str(sentiment_dir))
    with pytest.raises(SystemExit) as exit_info:
        inspect.main(inspect_args(tiny_model, sentiment_dir, out, *extra))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()


def test_empty_split_is_one_line(tiny_model, tmp_path, capsys):
    write_tsv(tmp_path / "data" / "train.tsv", ["sentence", "label"], [])
    write_tsv(tmp_path / "data" / "dev.tsv", ["sentence", "label"], [["the movie was good", 1]])
    with pytest.raises(SystemExit) as exit_info:
        inspect.main(inspect_args(tiny_model, tmp_path / "data", tmp_path / "out"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error:")


def test_an_unwritable_output_folder_is_refused_before_anything(tmp_path):
    """Tried, not read from the permission bits: root passed os.access for /proc and a read-only mount, and the
    command failed at its end, after all the work (walk AM)."""
    with pytest.raises(ValueError, match=r"^output_dir=/proc/kasa/report cannot be made: /proc is not writable \(.+\); "
                                         "choose another$"):
        check_can_make("/proc/kasa/report", "output_dir=/proc/kasa/report")
    check_can_make(tmp_path / "a" / "b", f"output_dir={tmp_path}/a/b")
    assert list(tmp_path.iterdir()) == []  # the test folder went again


def test_the_report_of_a_new_task_head_follows_the_seed(tiny_model, sentiment_dir, tmp_path):
    """A base model without the task's head gets one drawn at random at load, as in kasa-train: seeded by `seed`,
    so the same command writes the same report."""
    import shutil

    from transformers import AutoModel

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(tiny_model).save_pretrained(bare)  # the encoder alone: no classifier in the folder
    for name in os.listdir(tiny_model):
        if not (bare / name).exists():
            shutil.copy(os.path.join(tiny_model, name), bare / name)  # its tokenizer
    losses = [inspect.run(inspect_args(bare, sentiment_dir, tmp_path / f"r{i}", f"seed={seed}"))["base_loss"]
              for i, seed in enumerate((3, 3, 4))]
    assert losses[0] == losses[1] != losses[2]


def test_off_a_terminal_the_modules_are_counted_a_line_each(tiny_model, sentiment_dir, tmp_path, capsys):
    inspect.run(inspect_args(tiny_model, sentiment_dir, tmp_path / "lines"))
    counted = [line for line in capsys.readouterr().err.splitlines() if line.startswith("each module truncated alone")]
    assert len(counted) == 4 and counted[-1].startswith("each module truncated alone: 4/4 ")
    inspect.run(inspect_args(tiny_model, sentiment_dir, tmp_path / "quiet", "logging.progress=false"))
    assert "each module truncated alone" not in capsys.readouterr().err


@pytest.mark.parametrize("method, init, lacking_rank", [
    ("kasa", "normal", 3), ("kasa", "principal", 3), ("kasa", "minor", 0), ("pissa", "normal", 0),
    ("svd_lora", "normal", 3)])
def test_the_damage_columns_describe_what_the_module_lacks_as_training_starts(method, init, lacking_rank) -> None:
    """An adapter that starts with removed triplets (KaSA's init=principal, the principal part; init=minor with
    k = r, the minor part; PiSSA, its principal part) holds them, as the loss columns see: the output change and the
    removed directions counted all of them (walk AV: a 65% output change beside an unchanged loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kasa.adapters import AdapterConfig, adapted_layers, apply_adapters
    from kasa.training.damage import _input_statistics, untruncated

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    originals = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    apply_adapters(model, AdapterConfig(method=method, init=init, rank=3, alpha=6.0, target_modules=["q_proj"],
                                        svd_cache_dir=None))
    layers = dict(adapted_layers(model))
    (name, layer), = layers.items()
    inputs = []
    layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, 32).double()))
    batch = {"input_ids": torch.randint(0, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    with torch.no_grad():
        start = model.model.layers[0].self_attn.q_proj(torch.eye(32)).T.double()  # W_start, as training starts
        with untruncated(list(layers.values())):
            energy, uniform, change = _input_statistics(model, layers, [batch], lambda b: b)[name]
    x, w0 = inputs[-1], originals[name]
    assert uniform == pytest.approx(lacking_rank / 32)
    assert change == pytest.approx(float((x @ (start - w0).T).norm() / (x @ w0.T).norm()), rel=1e-4, abs=1e-6)
    if lacking_rank == 0:
        assert energy == 0 and change < 1e-6
    else:  # the r smallest right singular directions of W0
        minor = torch.linalg.svd(w0).Vh[-lacking_rank:].T
        assert energy == pytest.approx(float((x @ minor).square().sum() / x.square().sum()), rel=1e-6)
