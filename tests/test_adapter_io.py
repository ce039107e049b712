"""Adapter checkpoints: exact save / load round trips without any decomposition at load time, what a checkpoint
holds, and clear errors for corrupt files and mismatched models."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kasa
from kasa.adapters import io as adapter_io
from kasa.adapters import model as adapter_model
from kasa.adapters import truncation

from conftest import build_gpt2, build_roberta, outputs, randomize_trainable

GPT2_FUSED = dict(target_modules=["c_attn.q", "c_attn.v"], fused_modules={"c_attn": ["q", "k", "v"]})

ROUND_TRIPS = {
    "kasa": dict(method="kasa", rank=4),
    "kasa_head": dict(method="kasa", rank=4, trainable_modules=["classifier"]),
    "kasa_principal": dict(method="kasa", rank=4, init="principal"),
    "pissa": dict(method="pissa", rank=4, trainable_modules=["classifier"]),
    "milora": dict(method="milora", rank=4, trainable_modules=["classifier"]),
    "svd_lora": dict(method="svd_lora", rank=4),
    "lora": dict(method="lora", rank=4, trainable_modules=["classifier"]),
    "bitfit": dict(method="bitfit", trainable_modules=["classifier"]),
    "full": dict(method="full"),
    # classifier.dense is both adapted (target `dense`) and inside a fully trained module
    "kasa_adapted_head": dict(method="kasa", rank=4, target_modules=["query", "value", "dense"],
                              trainable_modules=["classifier"]),
}


@pytest.fixture
def no_decomposition(monkeypatch):
    """Make every decomposition fail: loading must rebuild the model from the checkpoint alone."""

    def boom(*args, **kwargs):
        raise AssertionError("a decomposition ran while loading an adapter")

    monkeypatch.setattr(truncation, "singular_components", boom)
    monkeypatch.setattr(truncation, "_gram_components", boom)
    monkeypatch.setattr(truncation, "_lanczos_eigenpairs", boom)
    monkeypatch.setattr(adapter_model, "singular_components", boom)
    monkeypatch.setattr(kasa, "singular_components", boom)
    monkeypatch.setattr(torch.linalg, "svd", boom)
    monkeypatch.setattr(torch.linalg, "eigh", boom)


def trained(build, config: dict, seed: int = 0):
    model = kasa.apply_adapters(build(seed=seed), kasa.AdapterConfig(**config))
    randomize_trainable(model)
    return model


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip_is_exact(name, tmp_path, roberta_inputs, request):
    config = ROUND_TRIPS[name]
    model = trained(build_roberta, config)
    expected = outputs(model, roberta_inputs)
    # the perturbation changed the model (so the comparison below can fail)
    assert (expected - outputs(build_roberta(), roberta_inputs)).abs().max() > 1e-3
    kasa.save_adapter(model, tmp_path)

    request.getfixturevalue("no_decomposition")
    fresh = build_roberta(seed=0)
    loaded = kasa.load_adapter(fresh, tmp_path)
    assert loaded is fresh
    got = outputs(loaded, roberta_inputs)
    assert (got - expected).abs().max() <= 1e-6
    # every tensor identical, bit for bit: the same truncated weights, adapters, heads
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(state) == set(loaded_state)
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    assert kasa.adapter_config(loaded) == kasa.AdapterConfig(**config)
    for (_, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert p.requires_grad == q.requires_grad
    assert kasa.count_parameters(loaded) == kasa.count_parameters(model)


@pytest.mark.parametrize("method", ["kasa", "pissa", "milora"])
def test_round_trip_gpt2_fused_conv1d(method, tmp_path, gpt2_inputs, request):
    model = trained(build_gpt2, dict(method=method, rank=3, **GPT2_FUSED))
    expected = outputs(model, gpt2_inputs)
    kasa.save_adapter(model, tmp_path)
    request.getfixturevalue("no_decomposition")
    loaded = kasa.load_adapter(build_gpt2(), tmp_path)
    assert (outputs(loaded, gpt2_inputs) - expected).abs().max() <= 1e-6
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_round_trip_gpt2_tied_embeddings(method, tmp_path, gpt2_inputs):
    """GPT-2 ties lm_head to the token embedding: saved once, restored into both."""
    model = trained(build_gpt2, dict(method=method))
    expected = outputs(model, gpt2_inputs)
    kasa.save_adapter(model, tmp_path)
    loaded = kasa.load_adapter(build_gpt2(), tmp_path)
    assert (outputs(loaded, gpt2_inputs) - expected).abs().max() <= 1e-6
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_loaded_adapter_merges_and_trains_like_the_original(tmp_path, roberta_inputs):
    model = trained(build_roberta, dict(method="kasa", rank=4, beta=0.1, gamma=0.2))
    kasa.save_adapter(model, tmp_path)
    loaded = kasa.load_adapter(build_roberta(), tmp_path)
    torch.testing.assert_close(kasa.aux_loss(loaded).total, kasa.aux_loss(model).total, atol=0, rtol=0)
    expected = outputs(model, roberta_inputs)
    plain = kasa.merge_and_unload(loaded)
    torch.testing.assert_close(outputs(plain, roberta_inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["kasa", "lora", "dora"])
def test_adapters_take_the_mode_of_the_model_they_join(method, tmp_path, roberta_inputs):
    """A model in eval mode (as from_pretrained returns it) kept its new adapter layers in training mode: their
    dropout made two calls of the loaded model differ (walk AS). Training mode is kept as well."""
    if method == "dora":
        pytest.importorskip("peft")
    model = trained(build_roberta, dict(method=method, rank=4, dropout=0.5))
    kasa.save_adapter(model, tmp_path)
    for adapted in (model, kasa.load_adapter(build_roberta(), tmp_path)):
        assert not any(module.training for module in adapted.modules())
        torch.testing.assert_close(outputs(adapted, roberta_inputs), outputs(adapted, roberta_inputs), atol=0, rtol=0)
    training = kasa.apply_adapters(build_roberta().train(), kasa.AdapterConfig(method=method, rank=4, dropout=0.5))
    assert all(module.training for module in training.modules())


def test_unmerge_undoes_the_merge_even_after_the_adapters_moved(roberta_inputs):
    """A KaSA model trained while merged (the auxiliary loss still moves the adapters) and then unmerged had its base
    weight off by the adapters' change: unmerge subtracted the update as it was then, not as merged (walk AS)."""
    model = trained(build_roberta, dict(method="kasa", rank=4))
    bases = {name: layer.base_layer.weight.clone() for name, layer in kasa.adapted_layers(model)}
    kasa.merge_adapters(model)
    randomize_trainable(model, seed=7)  # as an optimiser step on the auxiliary loss would
    kasa.unmerge_adapters(model)
    for name, layer in kasa.adapted_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, bases[name], atol=1e-7, rtol=0)


def test_a_compiled_model_saves_as_the_plain_one_and_a_merged_one_not_at_all(tmp_path, roberta_inputs):
    """save_adapter(torch.compile(model)) wrote every name with the wrapper's `_orig_mod.` prefix, which load_adapter
    then refused as a checkpoint of another base model; a merged model's save would count its update twice."""
    model = trained(build_roberta, dict(method="kasa", rank=4))
    kasa.save_adapter(torch.compile(model), tmp_path / "compiled")
    loaded = kasa.load_adapter(build_roberta(), tmp_path / "compiled")
    torch.testing.assert_close(outputs(loaded, roberta_inputs), outputs(model, roberta_inputs), atol=0, rtol=0)
    merged = [model]
    if importlib.util.find_spec("peft") is not None:  # PEFT's layers too (walk AT)
        merged.append(kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="dora", rank=4)))
    for adapted in merged:
        kasa.merge_adapters(adapted)
        with pytest.raises(ValueError, match=r"merged into their base weights: unmerge_adapters\(model\) before "):
            kasa.save_adapter(adapted, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()


def test_a_layer_inside_a_trained_new_head_loads_whatever_the_head_s_random_start(tmp_path, roberta_inputs):
    """target_modules [query, dense] adapts classifier.dense too, inside the trained head, whose truncated and trained
    weight the checkpoint holds: the check of the removed components had compared them with the loading model's new
    random head and refused a legitimate adapter (walk AT)."""
    model = trained(build_roberta, dict(method="kasa", rank=4, target_modules=["query", "dense"],
                                        trainable_modules=["classifier"]))
    kasa.save_adapter(model, tmp_path)
    fresh = build_roberta()
    torch.manual_seed(99)
    fresh.classifier.dense.reset_parameters()  # as from_pretrained makes a head the checkpoint lacks
    loaded = kasa.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(loaded, roberta_inputs), outputs(model, roberta_inputs), atol=0, rtol=0)


def test_checkpoint_contents(tmp_path):
    model = trained(build_roberta, dict(method="kasa", rank=4, trainable_modules=["classifier"]))
    out = kasa.save_adapter(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no pickles, no temporary files
    meta = kasa.read_adapter_config(out)
    assert meta["format"] == "kasa-adapter/1"
    assert kasa.AdapterConfig.from_dict(meta["config"]) == kasa.adapter_config(model)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert meta["shapes"] == {k: list(v.shape) for k, v in tensors.items()}
    # adapters (trainable and removed triplets) and the head; never a frozen base weight
    for key in tensors:
        assert ".adapters.weight." in key or key.startswith("classifier."), key
    suffixes = {key.rsplit(".", 1)[1] for key in tensors if ".adapters." in key}
    assert suffixes == {"delta_u", "delta_sigma", "delta_v", "removed_u", "removed_s", "removed_v"}
    assert len([k for k in tensors if k.endswith("delta_sigma")]) == 4
    for name, layer in kasa.adapted_layers(model):
        assert torch.equal(tensors[f"{name}.adapters.weight.delta_u"], layer.adapters["weight"].delta_u.detach())


def test_lora_checkpoint_has_no_removed_triplets(tmp_path):
    model = trained(build_roberta, dict(method="lora", rank=4))
    kasa.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(v.numel() == 0 for k, v in tensors.items() if "removed_" in k)
    assert sum(v.numel() for v in tensors.values()) == kasa.count_parameters(model).adapter


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = trained(build_roberta, dict(method="kasa", rank=4, trainable_modules=["classifier"]))
    kasa.save_adapter(model, tmp_path)
    return tmp_path


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_weights_file(saved, keep):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) - 16])
    with pytest.raises(ValueError, match="missing or truncated"):
        kasa.load_adapter(build_roberta(), saved)


def test_corrupt_weights_file(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        kasa.load_adapter(build_roberta(), saved)


def test_missing_weights_file(saved):
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing or truncated"):
        kasa.load_adapter(build_roberta(), saved)


def test_corrupt_config_file(saved):
    path = saved / "adapter_config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match="corrupt"):
        kasa.load_adapter(build_roberta(), saved)


def test_not_a_kasa_checkpoint(saved, tmp_path_factory):
    path = saved / "adapter_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format": "peft"}))
    with pytest.raises(ValueError, match="not a kasa adapter"):
        kasa.load_adapter(build_roberta(), saved)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        kasa.load_adapter(build_roberta(), tmp_path_factory.mktemp("empty"))


def test_unknown_config_key_in_checkpoint(saved):
    path = saved / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["config"]["sparsity"] = 0.5
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown adapter option\(s\) \['sparsity'\]"):
        kasa.load_adapter(build_roberta(), saved)


def test_tensor_with_wrong_shape(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("delta_v"))
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, str(path), metadata={"format": adapter_io.FORMAT})
    with pytest.raises(ValueError, match=rf"{key} has shape \(4, 31\) but the model expects \(4, 32\)"):
        kasa.load_adapter(build_roberta(), saved)


def test_missing_tensor(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("removed_s"))
    del tensors[key]
    save_file(tensors, str(path), metadata={"format": adapter_io.FORMAT})
    with pytest.raises(ValueError, match="does not fit this model.*missing"):
        kasa.load_adapter(build_roberta(), saved)


def test_model_of_a_different_size(saved):
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        kasa.load_adapter(build_roberta(hidden_size=48, intermediate_size=48), saved)
    with pytest.raises(ValueError, match="does not fit this model.*unexpected"):
        kasa.load_adapter(build_roberta(num_hidden_layers=1), saved)
    with pytest.raises(ValueError, match="does not fit this model.*missing"):
        kasa.load_adapter(build_roberta(num_hidden_layers=3), saved)
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        kasa.load_adapter(build_roberta(num_labels=5), saved)  # the head differs
    with pytest.raises(ValueError, match="no module matches"):
        kasa.load_adapter(build_gpt2(), saved)  # another architecture


@pytest.mark.parametrize("wrong", [dict(hidden_size=48, intermediate_size=48), dict(num_hidden_layers=1), "gpt2",
                                   "another seed"])
def test_a_load_that_does_not_fit_leaves_the_model_as_it_was(saved, wrong):
    """The adapters were injected and the model frozen before the checks: a retry on the same model said 'already
    has adapters applied', and a GPT-2 was left with no trainable parameter. Another model of the same shapes (another
    seed) took the adapter without a word, its own weights minus the first model's singular components (walk AS)."""
    if wrong == "another seed":
        with pytest.raises(ValueError, match="the singular components it removed from roberta.encoder.layer.0."
                                             "attention.self.query are not those of this model's weight"):
            kasa.load_adapter(build_roberta(seed=1), saved)
    model = build_gpt2() if wrong == "gpt2" else build_roberta(seed=1) if wrong == "another seed" else \
        build_roberta(**wrong)
    before = {name: (param.requires_grad, param.detach().clone()) for name, param in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError):
        kasa.load_adapter(model, saved)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and [type(m) for m in model.modules()] == modules
    assert all(after[n].requires_grad == grad and torch.equal(after[n], value) for n, (grad, value) in before.items())
    assert getattr(model, "kasa_adapter_config", None) is None
    kasa.apply_adapters(model, kasa.AdapterConfig(method="lora", rank=2, target_modules=["c_attn"] if wrong == "gpt2"
                                                  else ["query", "value"]))  # it can be adapted again


def test_load_onto_adapted_model_and_save_plain_model(saved, tmp_path_factory):
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=4))
    with pytest.raises(ValueError, match="already has adapters"):
        kasa.load_adapter(model, saved)
    with pytest.raises(ValueError, match="no adapters"):
        kasa.save_adapter(build_roberta(), tmp_path_factory.mktemp("out"))
