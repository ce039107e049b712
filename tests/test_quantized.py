"""Quantized bases (bitsandbytes nf4 / int8 on the CPU): the residual of the float truncation is what gets
quantized, save/load is exact and SVD-free, merging is explicit, unsupported combinations fail at start."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

import kasa
from kasa.adapters import quantized, truncation
from kasa.adapters.layer import AdaptedLayer
from kasa.adapters.model import adapted_layers
from kasa.config import ModelConfig, RunConfig
from kasa.tasks.models import load_causal_lm

# find_spec, not importorskip: importing bitsandbytes at collection cost every test worker a second or more
pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed (kasa[quant])")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def build_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny LLaMA (hidden 64, 2 layers): bitsandbytes' 4-bit blocks hold 64 weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def marked(model: torch.nn.Module, quantization: str = "nf4") -> torch.nn.Module:
    return quantized.mark_for_quantization(model, quantization)


def randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for param in layer.adapters.parameters():
                param.normal_(0.0, 0.05)


INPUTS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


@pytest.mark.parametrize("method", ["kasa", "pissa"])
def test_the_quantized_base_is_the_float_truncation(method: str) -> None:
    config = kasa.AdapterConfig(method=method, rank=4, target_modules=TARGETS)
    reference = kasa.apply_adapters(build_llama(), config)
    model = kasa.apply_adapters(marked(build_llama()), config)
    ref_layers, layers = dict(adapted_layers(reference)), dict(adapted_layers(model))
    for name, layer in layers.items():
        assert quantized.is_quantized_layer(layer.base_layer)
        # the removed components are the float weight's, decomposed before quantizing
        torch.testing.assert_close(layer.adapters["weight"].removed_u, ref_layers[name].adapters["weight"].removed_u)
        # the frozen base is the quantized image of W0 - removed: its error is NF4's, a few percent of the weight
        float_base = ref_layers[name].base_layer.weight
        error = quantized.dequantized_weight(layer.base_layer) - float_base
        assert error.norm() / float_base.norm() < 0.15
    # every other linear layer of the blocks is quantized too; the output embedding stays float
    assert quantized.is_quantized_layer(model.model.layers[0].self_attn.o_proj)
    assert torch.is_floating_point(model.lm_head.weight)
    assert model.kasa_quantization == "nf4"
    # dW = 0 at step 0 (pissa: the adapter holds the removed part), so the model is the quantized truncated one
    ref, out = logits(reference), logits(model)
    assert (out - ref).norm() / ref.norm() < 0.25  # NF4 on every linear layer of a random model: ~0.13


def test_adapters_train_in_float_over_the_quantized_base() -> None:
    model = kasa.apply_adapters(marked(build_llama()), kasa.AdapterConfig(method="kasa", rank=4, target_modules=TARGETS))
    model.train()
    out = model(input_ids=INPUTS, labels=INPUTS)
    (out.loss + kasa.aux_loss(model).total).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    count = kasa.count_parameters(model)
    assert count.total == kasa.count_parameters(kasa.apply_adapters(
        build_llama(), kasa.AdapterConfig(method="kasa", rank=4, target_modules=TARGETS))).total


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_gradients_survive_an_evaluation_forward(mode: str) -> None:
    """bitsandbytes' CPU inference repacking must not cut the backward of a later training step."""
    model = kasa.apply_adapters(marked(build_llama(), mode),
                                kasa.AdapterConfig(method="lora", rank=4, target_modules=TARGETS))
    randomise_adapters(model)

    def gradients() -> torch.Tensor:
        model.train()
        model.zero_grad()
        model(input_ids=INPUTS, labels=INPUTS).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    before = gradients()
    model.eval()
    logits(model)
    torch.testing.assert_close(gradients(), before)


def test_save_and_load_are_exact_and_svd_free(tmp_path, monkeypatch) -> None:
    config = kasa.AdapterConfig(method="kasa", rank=4, target_modules=TARGETS)
    model = kasa.apply_adapters(marked(build_llama()), config)
    randomise_adapters(model)
    expected = logits(model)
    kasa.save_adapter(model, tmp_path / "adapter")

    def no_svd(*args, **kwargs):
        raise AssertionError("load_adapter must not decompose")

    monkeypatch.setattr(truncation, "singular_components", no_svd)
    monkeypatch.setattr("kasa.adapters.model.singular_components", no_svd)
    loaded = kasa.load_adapter(marked(build_llama()), tmp_path / "adapter")
    assert all(quantized.is_quantized_layer(layer.base_layer) for _, layer in adapted_layers(loaded))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


def test_merging_is_explicit_and_dequantized() -> None:
    model = kasa.apply_adapters(marked(build_llama()), kasa.AdapterConfig(method="lora", rank=4, target_modules=TARGETS))
    randomise_adapters(model)
    expected = logits(model)
    with pytest.raises(ValueError, match="quantized base weight"):
        kasa.merge_adapters(model)
    kasa.dequantize_base(model)
    plain = kasa.merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer) or quantized.is_quantized_layer(m) for m in plain.modules())
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the compute dtype
    torch.testing.assert_close(logits(plain), expected, rtol=1e-4, atol=1e-4)


def test_quantize_base_in_the_wrong_order_says_what_to_do() -> None:
    """A fresh (trainable) model said only "no frozen linear layer"; a second quantize_base raised bitsandbytes' own
    uint8 error; merge_and_unload refused a quantized base only after turning float32 heads back (walk AS)."""
    with pytest.raises(ValueError, match="no frozen linear layer to quantize .*call it after kasa.apply_adapters"):
        kasa.quantize_base(build_llama(), "nf4")
    # a half-precision model: its trained head is kept in float32 (with casting hooks) while it trains
    model = kasa.apply_adapters(build_llama().half(), kasa.AdapterConfig(method="lora", rank=4, target_modules=TARGETS,
                                                                         trainable_modules=["lm_head"]))
    kasa.quantize_base(model, "nf4")
    with pytest.raises(ValueError, match=r"quantized already \(nf4\): quantize a float model, once"):
        kasa.quantize_base(model, "nf4")
    with pytest.raises(ValueError, match="quantized base weight"):
        kasa.merge_and_unload(model)
    assert model.lm_head.weight.dtype == torch.float32 and isinstance(model.model.layers[0].self_attn.q_proj,
                                                                       AdaptedLayer)


def test_an_int8_merge_differs_from_the_quantized_model_and_says_so() -> None:
    """nf4 layers multiply by the dequantized weight, so the merge above is exact; LLM.int8 in evaluation also
    rounds each layer's input to 8 bits, which the merged float model cannot repeat: kasa-eval merge=true and
    kasa-export format=merged warn (merge_note) rather than claim the quantized model's outputs."""
    model = kasa.apply_adapters(marked(build_llama(), "int8"), kasa.AdapterConfig(method="lora", rank=4,
                                                                                  target_modules=TARGETS))
    randomise_adapters(model)
    expected = logits(model)
    kasa.dequantize_base(model)
    merged = logits(kasa.merge_and_unload(model))
    assert (merged - expected).norm() / expected.norm() > 1e-3  # not a rounding of the float sums: a real gap
    assert "LLM.int8 also rounds each layer's input" in quantized.merge_note("int8")
    assert quantized.merge_note("nf4") is None and quantized.merge_note(None) is None


def test_dequantize_growth_is_what_dequantizing_adds() -> None:
    model = kasa.apply_adapters(marked(build_llama()), kasa.AdapterConfig(method="kasa", rank=4, target_modules=TARGETS))
    layers = {name: m for name, m in model.named_modules() if quantized.is_quantized_layer(m)}
    states = [layer.weight.quant_state for layer in layers.values()]
    stored = sum(layer.weight.data.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes
                 for layer, state in zip(layers.values(), states))
    floats = sum(layer.in_features * layer.out_features * 4 for layer in layers.values())  # float32 compute
    # elsewhere (kasa-export: into CPU memory), the float weights go there and the packed ones leave
    assert quantized.dequantize_growth(model, "meta") == {torch.device("meta"): floats, torch.device("cpu"): -stored}
    growth = quantized.dequantize_growth(model)
    kasa.dequantize_base(model)
    assert sum(model.get_submodule(name).weight.nbytes for name in layers) == floats
    assert growth == {torch.device("cpu"): floats - stored}


def test_a_merge_that_would_not_fit_is_refused(monkeypatch) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * gib, 24 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * gib)
    assert quantized.free_memory(torch.device("cuda:0")) == 21 * gib  # 20 from the driver, 1 cached and unused
    assert quantized.free_memory(torch.device("cpu")) > 0  # MemAvailable
    model = torch.nn.Linear(2, 2)
    growth = {torch.device("cuda:0"): 21 * gib, torch.device("cpu"): -gib}  # packed weights leave the CPU
    monkeypatch.setattr(quantized, "dequantize_growth", lambda model, device=None: growth)
    quantized.check_room_to_dequantize(model, "merge=true", "do otherwise")
    growth[torch.device("cuda:0")] += gib // 2
    with pytest.raises(ValueError, match=r"^merge=true turns the quantized base back into float weights in cuda:0, "
                                         r"which needs 21.5 GiB more than the 21.0 GiB free there: do otherwise$"):
        quantized.check_room_to_dequantize(model, "merge=true", "do otherwise")
    monkeypatch.setattr(quantized, "free_memory", lambda where: 10 * gib)
    growth.clear()
    growth[torch.device("cpu")] = 11 * gib
    with pytest.raises(ValueError, match=r"^format=merged turns the quantized base back into float weights in CPU "
                                         r"memory, which needs 11.0 GiB more than the 10.0 GiB free there"):
        quantized.check_room_to_dequantize(model, "format=merged", "do otherwise", device="cpu")


def test_dequantizing_places_the_float_layers_where_asked() -> None:
    """kasa-export dequantizes into CPU memory, whatever device the quantized layers are on (here: the meta device
    stands for another device than the quantized layers')."""
    model = kasa.apply_adapters(marked(build_llama()), kasa.AdapterConfig(method="lora", rank=4, target_modules=TARGETS))
    kasa.dequantize_base(model, device="meta")
    bases = [layer.base_layer for _, layer in kasa.adapted_layers(model)]
    assert bases and all(type(b) is torch.nn.Linear and b.weight.device.type == "meta" for b in bases)


def test_int8_base(caplog) -> None:
    config = kasa.AdapterConfig(method="kasa", rank=4, target_modules=TARGETS)
    reference = logits(kasa.apply_adapters(build_llama(), config))
    model = kasa.apply_adapters(marked(build_llama(), "int8"), config)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.int8
    assert not model.model.layers[0].self_attn.q_proj.base_layer.training  # in the mode of the model it joined
    assert (logits(model) - reference).norm() / reference.norm() < 0.05
    logits(model)
    # bitsandbytes warns at every int8 matmul that it casts float32 inputs to float16: said once, not per call
    assert sum("MatMul8bitLt" in record.getMessage() for record in caplog.records) <= 1


def test_the_loader_marks_and_adapters_quantize(tmp_path) -> None:
    build_llama().save_pretrained(tmp_path / "tiny")
    model = load_causal_lm(ModelConfig(name="tiny", path=str(tmp_path / "tiny"), quantization="nf4"))
    assert not quantized.is_quantized_layer(model.model.layers[0].self_attn.q_proj)  # float until truncated
    kasa.apply_adapters(model, kasa.AdapterConfig(method="svd_lora", rank=4, target_modules=TARGETS))
    assert quantized.is_quantized_layer(model.model.layers[0].self_attn.q_proj.base_layer)
    assert quantized.is_quantized_layer(model.model.layers[1].mlp.down_proj)


@pytest.mark.parametrize("method", ["full", "dora", "vera", "adalora"])
def test_unsupported_methods_fail_at_start(method: str) -> None:
    with pytest.raises(ValueError, match=f"method={method} cannot run on a quantized base"):
        RunConfig(model=ModelConfig(quantization="nf4"), method=kasa.AdapterConfig(method=method))
    with pytest.raises(ValueError, match="cannot run on a quantized base"):
        kasa.apply_adapters(marked(build_llama()), kasa.AdapterConfig(method=method, target_modules=TARGETS))


def test_unknown_quantization_and_sharding_engines_fail(monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown model.quantization 'fp4'"):
        RunConfig(model=ModelConfig(quantization="fp4"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="not under FSDP or DeepSpeed"):
        RunConfig(model=ModelConfig(quantization="nf4"))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_bytes_match_what_bitsandbytes_stores(mode: str) -> None:
    layer = torch.nn.Linear(192, 128, bias=False)
    q = quantized._quantized_layer(layer, mode, torch.device("cpu"))
    weight = q.weight
    if mode == "nf4":
        state = weight.quant_state
        stored = weight.numel() + state.absmax.numel() * state.absmax.element_size()
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    else:
        stored = weight.numel() + weight.SCB.numel() * weight.SCB.element_size()
    assert quantized.quantized_bytes(128, 192, mode) == stored


def test_quantize_base_checks_the_method_of_the_adapters_on_the_model():
    """quantize_base checked 'lora' whatever the model carried: a DoRA model was quantized, and its merge then failed
    on a shape mismatch (walk AC); a base quantized before apply_adapters was read as a (512 x 1) weight."""
    model = build_llama()
    kasa.apply_adapters(model, kasa.AdapterConfig(method="dora", rank=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="method=dora cannot run on a quantized base"):
        kasa.quantize_base(model, "nf4")
    base = build_llama()
    for param in base.parameters():
        param.requires_grad_(False)
    kasa.quantize_base(base, "nf4")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is already quantized: call quantize_base "
                                         "after apply_adapters"):
        kasa.apply_adapters(base, kasa.AdapterConfig(method="lora", rank=4, target_modules=["q_proj"]))
