"""kasa-estimate: exact parameter counts and weight bytes from the meta device, activations traced like a real
forward, the shipped architectures, the command line and its bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import kasa
from kasa import estimate
from kasa.cli import estimate as estimate_cli
from kasa.config import ModelConfig, RunConfig, TaskConfig, TrainerConfig
from kasa.data.prompts import IGNORE_INDEX
from kasa.tasks.lm_loss import labelled_token_loss, loss_positions

# Published totals of the recipes' models (with their LM heads; Gemma and GPT-2 tie it to the embedding).
KNOWN_TOTALS = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "google/gemma-7b": 8_537_680_896,
}


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_shipped_architectures_have_the_published_sizes(name: str) -> None:
    architecture = estimate.load_architecture(ModelConfig(name=name))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(architecture)
    assert sum(p.numel() for p in model.parameters()) == KNOWN_TOTALS[name]


def test_a_hub_gguf_repo_is_read_from_its_gguf_header(monkeypatch) -> None:
    """A Hub GGUF repo has no config.json: the architecture comes from the file model.gguf_file names, as kasa-train
    loads it (it was asked for the repo's config.json, and kasa-estimate failed where kasa-train would run)."""
    asked = {}

    def from_pretrained(name, **kwargs):
        asked.update(kwargs, name=name)
        return transformers.LlamaConfig()

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    estimate.load_architecture(ModelConfig(name="some-org/Some-Model-GGUF", gguf_file="model-f16.gguf"))
    assert asked["name"] == "some-org/Some-Model-GGUF" and asked["gguf_file"] == "model-f16.gguf"


def tiny_run(tmp_path, **model) -> RunConfig:
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.save_pretrained(tmp_path)
    return RunConfig(model=ModelConfig(name="tiny", path=str(tmp_path), **model), task=TaskConfig(name="t", kind="e2e"),
                     method=kasa.AdapterConfig(method="kasa", rank=4, target_modules=["q_proj", "v_proj"]),
                     trainer=TrainerConfig(batch_size=4, max_length=32), output_dir=str(tmp_path))


def test_counts_and_weight_bytes_equal_the_real_model(tmp_path) -> None:
    cfg = tiny_run(tmp_path)
    result = estimate.estimate_memory(cfg)
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    kasa.apply_adapters(real, cfg.method)
    counts = kasa.count_parameters(real)
    assert (result["parameters"], result["trainable_parameters"]) == (counts.total, counts.trainable)
    removed = sum(b.numel() * 4 for n, b in real.named_buffers() if ".removed_" in n)
    frozen = sum(p.numel() * 4 for p in real.parameters() if not p.requires_grad)
    others = sum(b.numel() * b.element_size() for n, b in real.named_buffers() if ".removed_" not in n)
    assert result["bytes"]["removed_components"] == removed
    assert result["bytes"]["weights"] == frozen + others
    assert result["bytes"]["optimizer"] == 2 * result["bytes"]["adapters"] == 8 * counts.trainable


def saved_by_a_real_forward(real: torch.nn.Module, cfg: RunConfig, forward) -> int:
    """Bytes of the distinct tensors that `forward()` of `real`, adapted by cfg.method and in training mode, saves for
    backward, its weights left out (they are weights, not activations)."""
    kasa.apply_adapters(real, cfg.method)
    real.train()
    weights = {t.untyped_storage().data_ptr() for t in [*real.parameters(), *real.buffers()]}
    sizes = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(sizes.values())


@pytest.mark.parametrize("loss_share", [1.0, 0.5])
def test_activations_match_what_a_real_forward_saves(tmp_path, loss_share: float) -> None:
    """Against a real training forward with kasa's causal-LM loss (the chunked head at the kept columns only);
    the weights a layer saves for backward are weights, not activations."""
    cfg = tiny_run(tmp_path)
    traced = estimate.activation_bytes(cfg, estimate.load_architecture(cfg.model), 4, 32, loss_share)
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path),
                                                         attn_implementation="sdpa")
    ids = torch.randint(0, 512, (4, 32))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1:int(32 * loss_share) + 1] = ids[:, 1:int(32 * loss_share) + 1]
    measured = saved_by_a_real_forward(real, cfg, lambda: labelled_token_loss(real, {"input_ids": ids},
                                                                              loss_positions(labels)))
    assert abs(traced.saved - measured) / measured < 0.1
    assert traced.saved_checkpointed < traced.saved


def test_autocast_copies_of_the_frozen_weights_are_counted(tmp_path) -> None:
    """trainer.precision=bf16 over float32 weights: autocast casts each frozen linear weight at every call and the
    matmul's backward keeps the copy; the estimate counts them (it had not: 32% low for SmolLM2 on the CPU)."""
    cfg = tiny_run(tmp_path)
    architecture = estimate.load_architecture(cfg.model)
    cfg.trainer.precision = "bf16"
    traced = estimate.activation_bytes(cfg, architecture, 4, 32)
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path),
                                                         attn_implementation="sdpa")
    ids = torch.randint(0, 512, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_by_a_real_forward(real, cfg, lambda: labelled_token_loss(real, {"input_ids": ids},
                                                                                  loss_positions(ids)))
    frozen = sum(m.weight.numel() * 2 for m in real.modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
    assert abs(traced.saved - measured) / measured < 0.1
    assert frozen < measured and traced.saved_checkpointed < traced.saved


def test_a_classification_task_on_a_causal_lm(tmp_path) -> None:
    """A GLUE task on a decoder without a padding token (Llama's config has none): the classifier finds each row's
    last token by it, so the trace had failed ("Cannot handle batch sizes > 1 if no padding token is defined"); and
    a new head left frozen is refused, as kasa-train refuses it."""
    cfg = tiny_run(tmp_path)
    cfg.task = TaskConfig(name="cola", kind="glue", num_labels=2)
    with pytest.raises(ValueError, match=r"train it with model.head_modules=\[score\]"):
        estimate.estimate_memory(cfg)
    cfg.method.trainable_modules = ["score"]
    result = estimate.estimate_memory(cfg)
    architecture = transformers.AutoConfig.from_pretrained(tmp_path, num_labels=2, pad_token_id=0)
    real = transformers.AutoModelForSequenceClassification.from_config(architecture, attn_implementation="sdpa")
    ids = torch.randint(1, 512, (4, 32))
    measured = saved_by_a_real_forward(real, cfg, lambda: real(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)))
    assert result["trainable_parameters"] == kasa.count_parameters(real).trainable
    assert abs(result["bytes"]["activations"] - measured) / measured < 0.1


def test_the_loss_share_shrinks_only_the_causal_lm_head(tmp_path) -> None:
    cfg = tiny_run(tmp_path)
    full, half = (estimate.estimate_memory(cfg, loss_share=share) for share in (1.0, 0.5))
    assert full["bytes"]["weights"] == half["bytes"]["weights"]
    # the 16 columns left out: the chunked loss kept their hidden states' gradient, the plain one their logits
    grad_hidden, logits = 4 * 16 * 64 * 4, 4 * 16 * 512 * 4  # batch x columns x hidden size or vocabulary x float32
    assert grad_hidden <= full["bytes"]["activations"] - half["bytes"]["activations"] < logits
    assert full["loss"] == "chunked"
    cfg.trainer.compile = True  # the plain loss
    full, half = (estimate.estimate_memory(cfg, loss_share=share) for share in (1.0, 0.5))
    assert full["loss"] == "plain"
    assert logits <= full["bytes"]["activations"] - half["bytes"]["activations"] <= 3 * logits
    with pytest.raises(ValueError, match="loss_share must be in"):
        estimate.estimate_memory(cfg, loss_share=0.0)


def test_nf4_and_sharding_shrink_what_they_should(tmp_path) -> None:
    plain = estimate.estimate_memory(tiny_run(tmp_path))
    nf4 = estimate.estimate_memory(tiny_run(tmp_path, quantization="nf4"))
    assert nf4["bytes"]["weights"] < 0.5 * plain["bytes"]["weights"]
    assert nf4["bytes"]["adapters"] == plain["bytes"]["adapters"]
    zero3 = estimate.estimate_memory(tiny_run(tmp_path), num_processes=4, sharding="zero3")
    assert zero3["bytes"]["weights"] == plain["bytes"]["weights"] // 4
    assert zero3["bytes"]["optimizer"] == plain["bytes"]["optimizer"] // 4
    # beside its shard a process holds whole the embeddings and head (untied: 2 x 512 x 64 float32) and two decoder
    # layers, all but its own quarter of them
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    kasa.apply_adapters(real, tiny_run(tmp_path).method)
    layer = sum(p.numel() * 4 for p in real.model.layers[0].parameters())
    assert plain["bytes"]["gathered_weights"] == 0
    assert zero3["bytes"]["gathered_weights"] == int((2 * 512 * 64 * 4 + 2 * layer) * 3 / 4)


def test_a_suggested_override_gives_the_peak_it_was_quoted_with(tmp_path) -> None:
    """Passed back, every suggestion fits with the peak it was given with: the activations of a smaller micro-batch are
    traced again (the chunked loss's chunk and backward's temporaries do not shrink with the rows; a per-row
    extrapolation suggested micro-batches that did not fit)."""
    cfg = tiny_run(tmp_path)
    cfg.trainer.batch_size, cfg.trainer.max_length, cfg.trainer.grad_accum = 16, 64, 1
    full = estimate.estimate_memory(cfg)
    cfg_two = estimate._with(cfg, trainer={"batch_size": 2})
    budget = estimate.estimate_memory(cfg_two)["peak_bytes"] - 1  # batch 2 misses by a byte
    found = estimate.suggestions(cfg, full, budget + estimate.RESERVE_BYTES)
    assert found[0][0] == "trainer.batch_size=1 trainer.grad_accum=16"  # batch 2 alone does not fit
    for overrides, peak in found:
        changes: dict = {}
        for override in overrides.split():
            key, value = override.split("=")
            section, name = key.split(".")
            changes.setdefault(section, {})[name] = {"true": True}.get(value, int(value) if value.isdigit() else value)
        again = estimate.estimate_memory(estimate._with(cfg, **changes))["peak_bytes"]
        assert again == peak <= budget, overrides


def test_no_nf4_suggestion_under_sharding(capsys) -> None:
    """nf4 does not run sharded, so a sharded run that does not fit is not told to use it."""
    estimate_cli.main(["recipe=commonsense/llama3_8b", "gpu_memory=12GiB", "num_processes=2", "sharding=fsdp"])
    out = capsys.readouterr().out.split("does NOT fit")[1]
    assert "fits with trainer.batch_size=8 trainer.grad_accum=2" in out and "nf4" not in out
    estimate_cli.main(["recipe=commonsense/llama3_8b", "gpu_memory=8GiB", "num_processes=2", "sharding=fsdp"])
    assert "fits: use more processes (num_processes) or a larger GPU" in capsys.readouterr().out


def test_the_command_answers_offline_for_a_recipe(capsys) -> None:
    estimate_cli.main(["recipe=commonsense/llama3_8b", "gpu_memory=16GiB"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["parameters"] > 8e9 and not result["fits"]
    assert "does NOT fit" in out and "model.quantization=nf4" in out and "causal-LM loss: chunked" in out
    estimate_cli.main(["recipe=commonsense/llama3_8b_24gb", "gpu_memory=24GiB"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"]


@pytest.mark.parametrize("argv, message", [
    (["gpu_memory=lots"], "gpu_memory='lots' is not a memory size"),
    (["gpu_memory=-3GiB"], "gpu_memory='-3GiB' is not allowed: the size must be a number > 0"),  # was judged
    (["gpu_memory=0GB"], "gpu_memory='0GB' is not allowed: the size must be a number > 0"),
    (["gpu_memory=0.5GiB"], "gpu_memory='0.5GiB' is not allowed: the size must exceed the 1 GiB that the verdict "
                            "keeps for the CUDA context"),  # judged "does NOT fit", exit 0, on a negative budget
    # as kasa-train refuses them (were a traceback, a failed trace, or "fits")
    (["trainer.batch_size=-1"], "trainer.batch_size=-1 is not allowed: it must be an integer >= 1"),
    (["trainer.max_length=0"], "trainer.max_length=0 is not allowed: it must be an integer >= 1"),
    (["trainer.grad_accum=0"], "trainer.grad_accum=0 is not allowed: it must be an integer >= 1"),
    (["sharding=zero9"], "unknown sharding='zero9'"),
    (["num_processes=two"], "num_processes='two' is not a whole number"),
    (["loss_share=most"], "loss_share='most' is not a number"),
    (["loss_share=2"], "loss_share must be in (0, 1]"),
    (["recipe"], "arguments must be key=value"),
    # a removed config group, as kasa-train takes and says it (it was refused as not key=value; walk AZ)
    (["~model"], "model.name has no value: choose a model with model=<option> (one of: "),
    (["gpu_memroy=24GiB"], "unknown key gpu_memroy (did you mean gpu_memory?); valid keys: gpu_memory, num_processes, "
                           "sharding, loss_share, model, task"),
    # kasa-train refuses a quantized base under FSDP or DeepSpeed: the estimate said it fits
    (["model.quantization=nf4", "num_processes=4", "sharding=zero3"],
     "model.quantization=nf4 runs on one GPU or under DDP (multi_gpu.json), not under FSDP or DeepSpeed"),
    # was transformers' "Repo id must use alphanumeric chars ...", about a Hub id
    (["model.path=/nonexistent/kasa-model"], "model.path='/nonexistent/kasa-model' is not a folder: pass the folder "
                                             "holding config.json"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        estimate_cli.main(["model=llama3_8b", *argv])  # an architecture kasa ships: no model package needed
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_model_folder_without_config_json_is_named_with_its_subfolder(tmp_path, capsys) -> None:
    """A pip model package's own folder (the model is in its model/ subfolder): as kasa-train says it."""
    transformers.BertConfig().save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        estimate_cli.main(["model=minilm_l6", f"model.path={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: model.path='{tmp_path}' holds no config.json: pass the folder holding config.json and the "
                   f"weights, e.g. model.path={tmp_path / 'model'}")


def test_cpu_attention_with_dropout_is_counted_as_the_cpu_runs_it(tmp_path) -> None:
    """A BERT classifier in training, attention dropout 0.1: on the CPU, SDPA's math path keeps the probabilities and
    the dropout mask (device="cpu" counts them, as a real CPU forward saves them); the GPU's fused kernels do not."""
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    config.save_pretrained(tmp_path)
    cfg = RunConfig(model=ModelConfig(name="tiny-bert", path=str(tmp_path)), task=TaskConfig(name="t", kind="glue"),
                    method=kasa.AdapterConfig(method="kasa", rank=4, target_modules=["query", "value"]),
                    trainer=TrainerConfig(batch_size=4, max_length=64), output_dir=str(tmp_path))
    architecture = estimate.load_architecture(cfg.model)
    on_cpu = estimate.activation_bytes(cfg, architecture, 4, 64, device="cpu")
    on_gpu = estimate.activation_bytes(cfg, architecture, 4, 64, device="cuda")
    real = transformers.AutoModelForSequenceClassification.from_config(architecture, attn_implementation="sdpa")
    measured = saved_by_a_real_forward(real, cfg, lambda: real(input_ids=torch.randint(0, 128, (4, 64)),
                                                               labels=torch.zeros(4, dtype=torch.long)))
    assert abs(on_cpu.saved - measured) / measured < 0.1 and on_cpu.loss is None
    probabilities = 2 * 4 * 4 * 64 * 64 * 4  # layers x batch x heads x length^2 x float32, for each kept copy
    assert on_cpu.saved - on_gpu.saved >= 2 * probabilities
    with pytest.raises(ValueError, match="device must be cuda or cpu"):
        estimate.estimate_memory(cfg, device="tpu")
