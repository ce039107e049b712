"""Activation-aware truncation: the calibration statistics (C = E[x x^T] per adapted input, padding excluded,
shared by modules reading one tensor, bounded groups) and the activation basis of `singular_components` and
`apply_adapters` (output damage = the removed squared values, never more than the weight basis's, C = I gives
the weight basis, exact reload without calibration, cache keys), checked against direct float64 computations."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

import kasa
from kasa.adapters import truncation
from kasa.adapters.calibration import InputMoments, collect_input_moments, moment_groups
from kasa.adapters.truncation import singular_components


def anisotropic_inputs(m: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(tokens, m) float64 inputs whose energy is spread very unevenly over directions (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    scales = torch.logspace(1, -2, m, dtype=torch.float64)
    return (torch.randn(tokens, m, generator=g, dtype=torch.float64) * scales) @ basis.T


def moments_of(x: torch.Tensor) -> InputMoments:
    return InputMoments(x.T @ x / x.shape[0], x.shape[0])


def damage(removed: torch.Tensor, x: torch.Tensor) -> float:
    """E ||W_noise x||^2 over the rows of x."""
    return float((x @ removed.double().T).square().sum() / x.shape[0])


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (270, 300)], ids=["wide", "tall", "lanczos"])
@pytest.mark.parametrize("svd_method", ["gram", "svd"])
def test_activation_damage_is_removed_energy_and_at_most_weight_basis(shape, svd_method):
    n, m = shape
    rank = 5
    w = torch.randn(n, m, generator=torch.Generator().manual_seed(1)) * 0.1
    x = anisotropic_inputs(m, 4 * m)
    act = singular_components(w, rank, moments=moments_of(x), damping=0.0, method=svd_method, device="cpu")
    weight = singular_components(w, rank, method=svd_method, device="cpu")
    act_damage = damage(act.matrix(), x)
    assert act_damage == pytest.approx(float(act.s.double().square().sum()), rel=1e-4)
    assert act_damage <= damage(weight.matrix(), x) * (1 + 1e-6)
    assert act_damage < 0.5 * damage(weight.matrix(), x)  # these inputs make the difference large
    # What remains, W - W_noise, has rank k - r: the removed part is a true rank-r truncation in the C-norm.
    remaining = torch.linalg.svdvals((w.double() - act.matrix().double()) @ torch.linalg.cholesky(moments_of(x).second_moment))
    assert remaining[min(n, m) - rank:].max() < 1e-4 * remaining[0]


def test_identity_moments_give_the_weight_basis():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    identity = InputMoments(torch.eye(40, dtype=torch.float64), 1000)
    act = singular_components(w, 6, moments=identity, device="cpu")
    weight = singular_components(w, 6, device="cpu")
    torch.testing.assert_close(act.matrix(), weight.matrix(), atol=1e-5, rtol=0)
    torch.testing.assert_close(act.s, weight.s, atol=1e-5, rtol=1e-5)


def test_singular_moments_are_damped():
    """Fewer tokens than features and a dead channel: C is singular, the factor still exists and is finite."""
    x = anisotropic_inputs(30, 10)
    x[:, 3] = 0.0
    moments = moments_of(x)
    for damping in (0.0, 1e-6):
        factor = moments.factor(damping)
        assert torch.isfinite(factor).all()
        comps = singular_components(torch.randn(16, 30), 4, moments=moments, damping=damping, device="cpu")
        assert torch.isfinite(comps.matrix()).all()
    with pytest.raises(ValueError, match="all zero"):
        InputMoments(torch.zeros(5, 5, dtype=torch.float64), 3).factor(1e-6)


def test_cache_key_includes_the_moments(tmp_path, monkeypatch):
    calls = []
    original = truncation._gram_components
    monkeypatch.setattr(truncation, "_gram_components", lambda *a: calls.append(1) or original(*a))
    w = torch.randn(16, 24)
    first, second = moments_of(anisotropic_inputs(24, 100, seed=0)), moments_of(anisotropic_inputs(24, 100, seed=1))
    a = singular_components(w, 3, moments=first, cache_dir=tmp_path, device="cpu")
    assert len(calls) == 1
    again = singular_components(w, 3, moments=moments_of(anisotropic_inputs(24, 100, seed=0)), cache_dir=tmp_path,
                                device="cpu")
    assert len(calls) == 1  # hit: the same statistics
    assert torch.equal(a.v, again.v)
    singular_components(w, 3, moments=second, cache_dir=tmp_path, device="cpu")
    singular_components(w, 3, moments=first, damping=1e-3, cache_dir=tmp_path, device="cpu")
    singular_components(w, 3, cache_dir=tmp_path, device="cpu")
    assert len(calls) == 4  # misses: other statistics, other damping, the weight basis
    assert len(list(tmp_path.iterdir())) == 4


# ---------------------------------------------------------------------------------------------------------- models


def build_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def calibration_batches(seed: int = 0, count: int = 3) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of random token ids (pad id 0, some rows shorter)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 64, (4, 12), generator=g)
        lengths = torch.tensor([12, 9, 5, 12])
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids})
    return batches


def test_moments_equal_direct_computation_and_are_shared():
    model = build_llama()
    layer = model.model.layers[0]
    modules = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
               "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
    batches = calibration_batches()
    moments = collect_input_moments(model, modules, batches)
    assert moments["q"] is moments["k"] is moments["v"]  # one matrix for the inputs they share
    assert moments["up"] is not moments["q"] and moments["down"].dim == 48

    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0]))
             for n, m in (("q", modules["q"]), ("down", modules["down"]))]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    for name in ("q", "down"):
        rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen[name], batches)]).double()
        assert moments[name].tokens == rows.shape[0] == 3 * (12 + 9 + 5 + 12)
        torch.testing.assert_close(moments[name].second_moment, rows.T @ rows / rows.shape[0])


def test_padding_is_excluded():
    """The same examples, batched alone (no padding) or together (padded): the same statistics."""
    model = build_llama()
    module = {"v": model.model.layers[1].self_attn.v_proj}
    padded = calibration_batches(count=1)
    single = [{"input_ids": padded[0]["input_ids"][i:i + 1, :length], "attention_mask": torch.ones(1, length).long()}
              for i, length in enumerate((12, 9, 5, 12))]
    a = collect_input_moments(model, module, padded)["v"]
    b = collect_input_moments(model, module, single)["v"]
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.second_moment, b.second_moment, atol=1e-6, rtol=1e-4)  # float32 model: batching noise


def test_the_model_gets_only_its_inputs_from_a_training_batch():
    """A causal-LM training batch (kasa's collator) also holds the labels and where the loss lies: the calibration
    pass hands the model only its inputs (a model whose forward takes no **kwargs would fail on the others, and
    transformers' would pass them on to its attention)."""
    from kasa.tasks.causal_lm import PadCollator

    model = build_llama()
    given: list[set[str]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: given.append(set(kwargs)), with_kwargs=True)
    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, -100, 7, 8]},
            {"input_ids": [9, 10], "attention_mask": [1] * 2, "labels": [-100, 10]}]
    batch = PadCollator(pad_token_id=0)(rows)
    assert {"labels", "loss_columns"} <= set(batch)
    collect_input_moments(model, {"v": model.model.layers[0].self_attn.v_proj}, [batch])
    assert given == [{"input_ids", "attention_mask"}]


def test_memory_bound_splits_into_groups_with_the_same_result():
    model = build_llama()
    modules = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))}
    whole = list(moment_groups(model, modules, calibration_batches(), memory_gib=1.0))
    tiny = list(moment_groups(model, modules, calibration_batches(), memory_gib=1e-6))
    assert len(whole) == 1 and len(tiny) == 4  # per layer: one (q, v) input and one down_proj input
    merged = {k: v for group in tiny for k, v in group.items()}
    for name in modules:  # exactly: a resume may lower the bound (a bookkeeping setting) and continue bit for bit
        assert torch.equal(merged[name].second_moment, whole[0][name].second_moment)
    from kasa.config import is_bookkeeping

    assert is_bookkeeping("method.calibration_memory_gib")


def activation_config(**overrides) -> kasa.AdapterConfig:
    settings = dict(method="kasa", rank=4, target_modules=["q_proj", "v_proj", "down_proj"],
                    truncation_basis="activation", calibration_damping=1e-6)
    return kasa.AdapterConfig(**(settings | overrides))


def mean_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


@pytest.mark.parametrize("method", ["kasa", "svd_lora"])
def test_apply_adapters_activation_basis(method):
    batches = calibration_batches()
    model = kasa.apply_adapters(build_llama(), activation_config(method=method), calibration=batches)
    reference = build_llama()
    modules = {n: m for n, m in reference.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))}
    moments = collect_input_moments(reference, modules, batches)
    for name, layer in kasa.adapted_layers(model):
        block = layer.adapters["weight"]
        w0 = modules[name].weight.detach()
        expected = singular_components(w0, 4, moments=moments[name], device="cpu")
        torch.testing.assert_close(block.removed_matrix(), expected.matrix())
        torch.testing.assert_close(layer.base_layer.weight + block.removed_matrix(), w0, atol=1e-6, rtol=0)
    # dW = 0 at step 0: the model is exactly the truncated base
    assert all(float(b.delta_weight().detach().abs().max()) == 0 for _, l in kasa.adapted_layers(model)
               for b in l.adapters.values())


def test_activation_basis_damages_the_loss_less_than_the_weight_basis():
    batches, held_out = calibration_batches(seed=0, count=4), calibration_batches(seed=1, count=2)
    base = mean_loss(build_llama(), held_out)
    config = dict(rank=12, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    weight = mean_loss(kasa.apply_adapters(build_llama(), kasa.AdapterConfig(method="kasa", **config)), held_out)
    act = mean_loss(kasa.apply_adapters(build_llama(), activation_config(**config), calibration=batches), held_out)
    assert abs(act - base) < abs(weight - base)


def test_gpt2_conv1d_and_fused_slices():
    from conftest import build_gpt2

    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 100, (3, 10), generator=g), "attention_mask": torch.ones(3, 10).long()}]
    config = kasa.AdapterConfig(method="kasa", rank=3, target_modules=["c_attn.q", "c_attn.v", "c_fc"],
                                fused_modules={"c_attn": ["q", "k", "v"]}, truncation_basis="activation")
    reference = build_gpt2()
    modules = {n: m for n, m in reference.named_modules() if n.endswith(("c_attn", "c_fc"))}
    moments = collect_input_moments(reference, modules, batches)
    model = kasa.apply_adapters(build_gpt2(), config, calibration=batches)
    for name, layer in kasa.adapted_layers(model):
        w0 = modules[name].weight.detach().T
        for part, block in layer.adapters.items():
            start, stop = layer.slices[part]
            expected = singular_components(w0[start:stop], 3, moments=moments[name], device="cpu")
            torch.testing.assert_close(block.removed_matrix(), expected.matrix())


def test_an_activation_basis_adapter_does_not_load_onto_another_model(tmp_path):
    """The removed components of the activation basis hold W^T u = v diag(s) as the weight basis's do; only the weight
    basis was checked, and another model of the same shapes took the adapter (walk AT)."""
    model = kasa.apply_adapters(build_llama(), activation_config(), calibration=calibration_batches())
    kasa.save_adapter(model, tmp_path)
    kasa.load_adapter(build_llama(), tmp_path)
    with pytest.raises(ValueError, match="the singular components it removed from model.layers.0.self_attn.q_proj are "
                                         "not those of this model's weight"):
        kasa.load_adapter(build_llama(seed=1), tmp_path)


def test_exact_reload_without_calibration(tmp_path, monkeypatch):
    from conftest import randomize_adapters

    batches = calibration_batches()
    model = kasa.apply_adapters(build_llama(), activation_config(), calibration=batches)
    randomize_adapters(model)
    kasa.save_adapter(model, tmp_path / "adapter")
    monkeypatch.setattr(truncation, "_decompose", lambda *a: pytest.fail("reload must not decompose"))
    reloaded = kasa.load_adapter(build_llama(), tmp_path / "adapter")
    assert kasa.adapter_config(reloaded).truncation_basis == "activation"
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_bad_configurations():
    with pytest.raises(ValueError, match="needs calibration batches"):
        kasa.apply_adapters(build_llama(), activation_config())
    with pytest.raises(ValueError, match="applies to the methods that truncate"):
        kasa.AdapterConfig(method="lora", truncation_basis="activation")
    with pytest.raises(ValueError, match="unknown truncation_basis"):
        kasa.AdapterConfig(truncation_basis="activations")
    with pytest.raises(ValueError, match="calibration_samples must be >= 1, got 0"):
        kasa.AdapterConfig(calibration_samples=0)
    for damping in (-1.0, float("inf")):  # named, not a list of three
        with pytest.raises(ValueError, match=f"calibration_damping must be >= 0 and finite, got {damping}"):
            kasa.AdapterConfig(calibration_damping=damping)
    with pytest.raises(ValueError, match="calibration_memory_gib must be > 0, got 0"):
        kasa.AdapterConfig(calibration_memory_gib=0)
    padding_only = [{"input_ids": torch.zeros(2, 5).long(), "attention_mask": torch.zeros(2, 5).long()}]
    with pytest.raises(ValueError, match="no token outside padding"):
        kasa.apply_adapters(build_llama(), activation_config(), calibration=padding_only)


def test_a_data_loader_calibrates_and_a_failed_start_leaves_the_model_as_it_was():
    """A DataLoader as `calibration` failed with "'DataLoader' object is not subscriptable", left the calibration hooks
    on the model and the whole model frozen, and a retry then failed ("received no input"); a rank too large for a
    layer left a truncating method's model frozen too (walk AS)."""
    from torch.utils.data import DataLoader

    rows = [{k: v[i] for k, v in batch.items()} for batch in calibration_batches() for i in range(4)]
    from_list = kasa.apply_adapters(build_llama(), activation_config(), calibration=calibration_batches())
    from_loader = kasa.apply_adapters(build_llama(), activation_config(), calibration=DataLoader(rows, batch_size=4))
    truncation = [name for name in from_list.state_dict() if "removed_" in name or name.endswith("base_layer.weight")]
    assert truncation and all(torch.equal(from_list.state_dict()[n], from_loader.state_dict()[n]) for n in truncation)
    for config, batches in ((activation_config(), [{"input_ids": torch.ones(2, 5).long()}]),  # no attention_mask
                            (activation_config(rank=40), calibration_batches())):
        model = build_llama()
        weights = {name: param.detach().clone() for name, param in model.named_parameters()}
        with pytest.raises(ValueError):
            kasa.apply_adapters(model, config, calibration=batches)
        assert all(param.requires_grad and torch.equal(param, weights[name]) for name, param in model.named_parameters())
        assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
        kasa.apply_adapters(model, activation_config(), calibration=calibration_batches())  # as on a fresh model


def test_peft_export_refuses_the_activation_basis():
    from kasa.adapters.peft_format import check_peft_exportable

    model = kasa.apply_adapters(build_llama(), activation_config(), calibration=calibration_batches(count=1))
    with pytest.raises(ValueError, match="truncation_basis=activation"):
        check_peft_exportable(model)


@pytest.mark.parametrize("packing, cut, size, fix", [
    (False, None, "6 examples", "lower method.calibration_samples$"),
    (True, None, "6 packed rows (trainer.packing)", "lower method.calibration_samples$"),
    (False, 6, "6 examples after task.max_train_samples=6", "lower method.calibration_samples, or raise "
                                                             "task.max_train_samples$")])
def test_a_split_too_small_to_calibrate_is_counted_as_its_rows(packing, cut, size, fix):
    """Under packing the rows are packed rows: the message said 6 examples of a split of 12 packed into 6. A split
    cut by the run's own task.max_train_samples was blamed on the data (SST-2's 60,614 rows "have 16", walk AM)."""
    from kasa.config import RunConfig
    from kasa.training.calibration import calibration_rows

    cfg = RunConfig()
    cfg.method.truncation_basis, cfg.trainer.packing, cfg.task.max_train_samples = "activation", packing, cut
    rows = [{"input_ids": [1, 2, 3]}] * 6
    with pytest.raises(ValueError, match=rf"the training split has {re.escape(size)}, fewer than "
                                         rf"method.calibration_samples=128: {fix}"):
        calibration_rows(rows, cfg, held_out=4)
