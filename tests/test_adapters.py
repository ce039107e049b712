"""Adapter layers and what acts on a whole adapted model: dW = 0 at initialisation, the forward pass against the
dense formula, merge / unmerge / unload, the auxiliary loss and its gradients, parameter counts, the baselines'
initialisations, agreement with PEFT's KaSA variant, and the errors bad input raises."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import kasa
from kasa.adapters.kasa import KasaBlock
from kasa.adapters.layer import AdaptedLayer, weight_matrix
from kasa.adapters.lora import LoraBlock

from conftest import build_gpt2, build_roberta, first_adapted, outputs, randomize_adapters

GPT2_FUSED = dict(target_modules=["c_attn.q", "c_attn.v"], fused_modules={"c_attn": ["q", "k", "v"]})


def svd_part(w: torch.Tensor, rank: int, which: str) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    k = s.shape[0]
    sl = slice(k - rank, k) if which == "smallest" else slice(0, rank)
    return (u[:, sl] * s[sl]) @ vh[sl]


def world_model(build, rank: int, names, fused: dict | None = None, **build_kwargs) -> nn.Module:
    """A plain model whose weights `names` are W_world = W0 minus its r smallest singular triplets (each fused slice
    on its own), computed here with a float64 torch.linalg.svd: what KaSA must compute at step 0."""
    plain = build(**build_kwargs)
    with torch.no_grad():
        for name in names:
            module = plain.get_submodule(name)
            w = weight_matrix(module)
            parts = 1 if not fused else fused["parts"]
            size = w.shape[0] // parts
            for i in range(parts):
                if fused and i not in fused["adapted"]:
                    continue
                rows = w[i * size:(i + 1) * size]
                rows.copy_(rows.double() - svd_part(rows, rank, "smallest"))
    return plain


# --------------------------------------------------------------------------------------------------------------
# dW = 0 at initialisation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["normal", "principal", "u_normal"])
@pytest.mark.parametrize("method", ["kasa", "kasa_l2", "kasa_sv"])
def test_kasa_starts_at_w_world(method, init, roberta_inputs):
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=4, init=init))
    for _, block in kasa.kasa_blocks(model):
        if init == "normal":  # dU = 0; dV, dSigma random
            assert torch.count_nonzero(block.delta_u) == 0
            assert torch.count_nonzero(block.delta_v) == block.delta_v.numel()
            assert torch.count_nonzero(block.delta_sigma) == block.delta_sigma.numel()
        elif init == "u_normal":  # dV = 0; dU, dSigma random
            assert torch.count_nonzero(block.delta_v) == 0
            assert torch.count_nonzero(block.delta_u) == block.delta_u.numel()
            assert torch.count_nonzero(block.delta_sigma) == block.delta_sigma.numel()
    names = [name for name, _ in kasa.adapted_layers(model)]
    if init != "principal":  # the adapter branch outputs exact zeros
        for _, block in kasa.kasa_blocks(model):
            assert torch.count_nonzero(block(torch.randn(2, 5, block.m))) == 0
    expected = outputs(world_model(build_roberta, 4, names), roberta_inputs)
    out = outputs(model, roberta_inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the truncation is visible: W_world is not W0
    assert (out - outputs(original, roberta_inputs)).abs().max() > 1e-4


def test_kasa_principal_init_moves_the_principal_part_into_the_adapter():
    rank = 4
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=rank, alpha=12.0, init="principal"))
    for name, layer in kasa.adapted_layers(model):
        w0 = original.get_submodule(name).weight
        block = layer.adapters["weight"]
        top, bottom = svd_part(w0, rank, "largest"), svd_part(w0, rank, "smallest")
        torch.testing.assert_close(block.delta_weight().double(), top, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight.double(), w0.double() - top - bottom, atol=1e-5, rtol=0)
        # base + adapter = W_world = W0 - minor part
        torch.testing.assert_close((layer.base_layer.weight + block.delta_weight()).double(), w0.double() - bottom,
                                   atol=1e-5, rtol=0)


def test_kasa_minor_init_starts_at_w0(roberta_inputs):
    rank = 4
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=rank, alpha=8.0, init="minor"))
    for name, layer in kasa.adapted_layers(model):
        w0 = original.get_submodule(name).weight
        block = layer.adapters["weight"]
        torch.testing.assert_close(block.delta_weight().double(), svd_part(w0, rank, "smallest"), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight.double(), w0.double() - svd_part(w0, rank, "smallest"),
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs(model, roberta_inputs), outputs(original, roberta_inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "pissa", "milora"])
def test_lora_pissa_milora_start_at_the_original_model(method, roberta_inputs):
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=4, alpha=16.0))
    torch.testing.assert_close(outputs(model, roberta_inputs), outputs(original, roberta_inputs), atol=1e-5, rtol=0)
    if method == "lora":  # exactly: B = 0 and the base weight untouched
        assert torch.equal(outputs(model, roberta_inputs), outputs(original, roberta_inputs))


def test_svd_lora_starts_at_w_world(roberta_inputs):
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="svd_lora", rank=4))
    names = [name for name, _ in kasa.adapted_layers(model)]
    torch.testing.assert_close(outputs(model, roberta_inputs), outputs(world_model(build_roberta, 4, names), roberta_inputs),
                               atol=1e-5, rtol=0)


def test_fused_kasa_starts_at_w_world(gpt2_inputs):
    model = kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(rank=3, **GPT2_FUSED))
    names = [name for name, _ in kasa.adapted_layers(model)]
    expected = world_model(build_gpt2, 3, names, fused={"parts": 3, "adapted": (0, 2)})
    torch.testing.assert_close(outputs(model, gpt2_inputs), outputs(expected, gpt2_inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_fused_pissa_milora_start_at_the_original_model(method, gpt2_inputs):
    model = kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(method=method, rank=3, **GPT2_FUSED))
    torch.testing.assert_close(outputs(model, gpt2_inputs), outputs(build_gpt2(), gpt2_inputs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# forward == dense formula
# --------------------------------------------------------------------------------------------------------------


def dense_delta(block: nn.Module) -> torch.Tensor:
    """The update as an explicit n x m matrix, from the definitions (not from the block's own code)."""
    if isinstance(block, KasaBlock):
        du, ds, dvt = block.delta_u.double(), block.delta_sigma.double(), block.delta_v.double()
        return block.scaling * du @ torch.diag(ds) @ dvt  # (alpha / r) dU diag(dSigma) dV^T
    return block.scaling * block.lora_b.double() @ block.lora_a.double()


def dense_forward(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    w = weight_matrix(layer.base_layer).double().clone()
    for name, block in layer.adapters.items():
        start, stop = layer.slices[name]
        w[start:stop] += dense_delta(block)
    return x.double() @ w.T + layer.base_layer.bias.double()


INPUT_SHAPES = [(5,), (2, 5), (2, 3, 5), (2, 3, 4, 5)]


@pytest.mark.parametrize("method", ["kasa", "lora", "pissa", "milora", "svd_lora", "kasa_sv"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_equals_dense_formula_linear(method, dropout):
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=4, alpha=7.0, dropout=dropout))
    randomize_adapters(model)
    model.eval()
    for _, layer in kasa.adapted_layers(model):
        for shape in INPUT_SHAPES:
            x = torch.randn(*shape[:-1], 32)
            with torch.no_grad():
                out = layer(x)
            assert out.shape == (*shape[:-1], 32)
            torch.testing.assert_close(out.double(), dense_forward(layer, x), atol=1e-5, rtol=1e-5)
    if dropout:  # dropout acts on the adapter input in training mode only
        layer = first_adapted(model)
        layer.train()
        x = torch.randn(2, 3, 32)
        with torch.no_grad():
            assert not torch.allclose(layer(x).double(), dense_forward(layer, x), atol=1e-4)


@pytest.mark.parametrize("method", ["kasa", "lora", "pissa", "milora"])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_equals_dense_formula_conv1d(method, fused):
    targets = GPT2_FUSED if fused else dict(target_modules=["c_attn", "mlp.c_proj"])
    model = kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(method=method, rank=3, dropout=0.1, **targets))
    randomize_adapters(model)
    model.eval()
    layers = dict(kasa.adapted_layers(model))
    assert len(layers) == (2 if fused else 4)
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, Conv1D)
        n_in = layer.base_layer.weight.shape[0]
        for shape in INPUT_SHAPES[1:]:
            x = torch.randn(*shape[:-1], n_in)
            with torch.no_grad():
                out = layer(x)
            torch.testing.assert_close(out.double(), dense_forward(layer, x), atol=1e-5, rtol=1e-5)
        if fused:  # the k slice gets no update
            x = torch.randn(4, n_in)
            with torch.no_grad():
                plain = layer.base_layer(x)
                torch.testing.assert_close(layer(x)[:, 24:48], plain[:, 24:48], atol=0, rtol=0)
                assert not torch.allclose(layer(x)[:, :24], plain[:, :24], atol=1e-4)


def test_forward_backward_reaches_only_adapter_parameters(roberta_inputs):
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=4, trainable_modules=["classifier"]))
    randomize_adapters(model)
    model.train()
    model(**roberta_inputs).logits.sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert ".adapters." in name or name.startswith("classifier."), name
        else:
            assert param.grad is None, name


def test_backward_through_fused_conv1d_layers(gpt2_inputs):
    """Both layers adapted: the second layer's input requires grad, and the in-place slice update must not break
    autograd; the k slice and the frozen weights get no gradient."""
    model = kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(rank=3, **GPT2_FUSED))
    randomize_adapters(model)
    model.train()
    out = model(**gpt2_inputs, labels=gpt2_inputs["input_ids"])
    (out.loss + kasa.aux_loss(model).total).backward()
    for name, block in kasa.kasa_blocks(model):
        for param in (block.delta_u, block.delta_sigma, block.delta_v):
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


# --------------------------------------------------------------------------------------------------------------
# merge / unmerge / unload
# --------------------------------------------------------------------------------------------------------------


def test_a_float64_model_merges_and_unmerges_in_float64():
    """Merging went through float32 whatever the model's dtype: a float64 model's round trip was off by 3e-8."""
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="kasa", rank=3, alpha=5.0)).double()
    randomize_adapters(model)
    weights = {name: layer.base_layer.weight.detach().clone() for name, layer in kasa.adapted_layers(model)}
    kasa.merge_adapters(model)
    kasa.unmerge_adapters(model)
    for name, layer in kasa.adapted_layers(model):
        assert layer.base_layer.weight.dtype == torch.float64
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-14, rtol=0)


@pytest.mark.parametrize("method", ["kasa", "lora", "pissa", "milora", "svd_lora"])
@pytest.mark.parametrize("arch", ["roberta", "gpt2_fused"])
def test_merge_unmerge_and_unload(method, arch, roberta_inputs, gpt2_inputs):
    if arch == "roberta":
        build, inputs, targets = build_roberta, roberta_inputs, {}
    else:
        build, inputs, targets = build_gpt2, gpt2_inputs, GPT2_FUSED
    model = kasa.apply_adapters(build(), kasa.AdapterConfig(method=method, rank=3, alpha=5.0, **targets))
    randomize_adapters(model)
    before = outputs(model, inputs)
    weights = {name: layer.base_layer.weight.detach().clone() for name, layer in kasa.adapted_layers(model)}

    kasa.merge_adapters(model)
    for name, layer in kasa.adapted_layers(model):
        assert layer.merged
        w_before = weights[name].T if isinstance(layer.base_layer, Conv1D) else weights[name]
        expected = w_before.double().clone()
        for part, block in layer.adapters.items():
            start, stop = layer.slices[part]
            expected[start:stop] += dense_delta(block)
        torch.testing.assert_close(weight_matrix(layer.base_layer).double(), expected, atol=1e-6, rtol=0)
    merged = outputs(model, inputs)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    kasa.merge_adapters(model)  # idempotent
    torch.testing.assert_close(outputs(model, inputs), merged, atol=0, rtol=0)

    kasa.unmerge_adapters(model)
    for name, layer in kasa.adapted_layers(model):
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs(model, inputs), before, atol=1e-5, rtol=0)
    kasa.unmerge_adapters(model)  # idempotent
    torch.testing.assert_close(outputs(model, inputs), before, atol=1e-5, rtol=0)

    plain = kasa.merge_and_unload(model)
    assert plain is model
    assert not list(kasa.adapted_layers(plain))
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    kinds = {type(m) for m in plain.modules()}
    assert (Conv1D if arch == "gpt2_fused" else nn.Linear) in kinds
    assert not any(".adapters." in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert set(plain.state_dict()) == set(build().state_dict())
    torch.testing.assert_close(outputs(plain, inputs), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no adapters"):
        kasa.adapter_config(plain)


# --------------------------------------------------------------------------------------------------------------
# auxiliary loss
# --------------------------------------------------------------------------------------------------------------


# square (value 32 x 32), tall (intermediate.dense 48 x 32) and wide (layer output.dense 32 x 48) blocks, so that
# n and m differ in the orthogonality terms
AUX_TARGETS = ["value", "intermediate.dense", "output.dense"]


def kasa_model(rank=4, **config):
    config.setdefault("target_modules", AUX_TARGETS)
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=rank, **config))
    randomize_adapters(model, scale=0.3)
    return model


def expected_terms(block: KasaBlock, orth_form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 and L3 of one block, literally from the definitions, in float64."""
    du, ds, dvt = block.delta_u.detach().double(), block.delta_sigma.detach().double(), block.delta_v.detach().double()
    r = ds.shape[0]
    l2 = (ds ** 2).sum()
    if orth_form == "paper":  # ||dU^T dU - I_r||_F + ||dV^T dV - I_r||_F, dV = delta_v^T
        dv = dvt.T
        l3 = torch.linalg.norm(du.T @ du - torch.eye(r, dtype=du.dtype)) + torch.linalg.norm(
            dv.T @ dv - torch.eye(r, dtype=du.dtype))
    else:  # the released code: A = delta_v (r x m), ||A^T A - I_m||_F; B = delta_u (n x r), ||B B^T - I_n||_F
        a, b = dvt, du
        l3 = torch.linalg.norm(a.T @ a - torch.eye(a.shape[1], dtype=a.dtype)) + torch.linalg.norm(
            b @ b.T - torch.eye(b.shape[0], dtype=b.dtype))
    return l2, l3


@pytest.mark.parametrize("orth_form", ["paper", "authors"])
def test_aux_loss_equals_formula(orth_form):
    beta, gamma = 0.3, 0.7
    model = kasa_model(beta=beta, gamma=gamma, orth_form=orth_form)
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    assert len(blocks) == 8  # 2 layers x (value, intermediate.dense, attention.output.dense, output.dense)
    assert {(b.n, b.m) for b in blocks} == {(32, 32), (48, 32), (32, 48)}
    l2s, l3s = zip(*(expected_terms(b, orth_form) for b in blocks))
    count = len(blocks)
    expected_total = sum(beta * l2 + gamma * l3 for l2, l3 in zip(l2s, l3s)) / count
    aux = kasa.aux_loss(model)
    torch.testing.assert_close(aux.total.double(), expected_total, atol=0, rtol=1e-5)
    torch.testing.assert_close(aux.l2.double(), sum(l2s) / count, atol=0, rtol=1e-5)
    torch.testing.assert_close(aux.l3.double(), sum(l3s) / count, atol=0, rtol=1e-5)
    if orth_form == "authors":  # each term has a floor of sqrt(dim - r)
        assert aux.l3 > math.sqrt(32 - 4)


def test_aux_loss_counts_fused_blocks():
    beta, gamma = 0.2, 0.5
    model = kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(rank=3, beta=beta, gamma=gamma, **GPT2_FUSED))
    randomize_adapters(model, scale=0.3)
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    assert len(blocks) == 4  # 2 layers x (q, v)
    expected = sum(beta * l2 + gamma * l3 for l2, l3 in (expected_terms(b, "paper") for b in blocks)) / 4
    torch.testing.assert_close(kasa.aux_loss(model).total.double(), expected, atol=0, rtol=1e-5)


@pytest.mark.parametrize("orth_form", ["paper", "authors"])
def test_aux_loss_gradients_match_analytic(orth_form):
    beta, gamma = 0.3, 0.7
    model = kasa_model(beta=beta, gamma=gamma, orth_form=orth_form)
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    count = len(blocks)
    kasa.aux_loss(model).total.backward()
    for block in blocks:
        u, s, vt = block.delta_u.detach(), block.delta_sigma.detach(), block.delta_v.detach()
        r, n, m = s.shape[0], u.shape[0], vt.shape[1]
        eye = torch.eye(r)
        g_u, g_v = u.T @ u - eye, vt @ vt.T - eye
        if orth_form == "paper":
            f_u, f_v = torch.linalg.norm(g_u), torch.linalg.norm(g_v)
        else:  # the large-Gram norms: ||B B^T - I_n||^2 = ||B^T B - I_r||^2 + (n - r); same gradient numerator
            f_u = (g_u.square().sum() + (n - r)).sqrt()
            f_v = (g_v.square().sum() + (m - r)).sqrt()
        torch.testing.assert_close(block.delta_u.grad, gamma * 2 * u @ g_u / f_u / count, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(block.delta_v.grad, gamma * 2 * g_v @ vt / f_v / count, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(block.delta_sigma.grad, beta * 2 * s / count, atol=1e-7, rtol=1e-4)


def test_authors_form_gradient_against_literal_large_gram():
    """Autograd through the large n x n / m x m Grams gives the gradients of the r x r implementation."""
    model = kasa_model(beta=0.1, gamma=0.9, orth_form="authors")
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    kasa.aux_loss(model).total.backward()
    for block in blocks:
        a = block.delta_v.detach().double().requires_grad_()
        b = block.delta_u.detach().double().requires_grad_()
        loss = 0.9 * (torch.linalg.norm(a.T @ a - torch.eye(a.shape[1], dtype=a.dtype))
                      + torch.linalg.norm(b @ b.T - torch.eye(b.shape[0], dtype=b.dtype))) / len(blocks)
        loss.backward()
        torch.testing.assert_close(block.delta_v.grad.double(), a.grad, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(block.delta_u.grad.double(), b.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("authors", [False, True])
def test_the_written_out_regularization_gradient_passes_gradcheck(authors):
    """The batched terms' hand-written backward against finite differences (float64), for blocks of one shape."""
    from kasa.adapters.kasa import _GroupRegularization

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
              for _ in range(3) for shape in ((7, 3), (3,), (3, 5))]
    assert torch.autograd.gradcheck(lambda *p: _GroupRegularization.apply(7, 5, authors, *p), params)


def test_the_auxiliary_loss_graph_holds_no_copy_of_the_adapters():
    """The loop computes the loss before the model's forward pass, so that its backward runs last: its graph must then
    keep the parameters themselves, not stacked copies of every dU and dV, or the whole step would hold them."""
    model = kasa_model()
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}
    nodes, held = [kasa.aux_loss(model).total.grad_fn], []
    while nodes:
        node = nodes.pop()
        if type(node).__name__ == "_GroupRegularizationBackward":
            held += [t for t in node.saved_tensors if t.untyped_storage().data_ptr() not in params]
        nodes += [next_node for next_node, _ in node.next_functions if next_node is not None]
    assert held and all(t.dim() < 3 or t.shape[1] == t.shape[2] == 4 for t in held)  # r x r Grams, dSigma, norms


def group_views(model) -> list:
    """For each group of blocks of one shape: the stacked view of their dU, dSigma and dV^T parameters (None where
    they do not lie one after another in one storage)."""
    from kasa.adapters.kasa import stacked_view

    groups: dict = {}
    for _, block in kasa.kasa_blocks(model):
        groups.setdefault((block.n, block.m), []).append(block)
    return [stacked_view([getattr(b, kind) for b in blocks])
            for blocks in groups.values() for kind in ("delta_u", "delta_sigma", "delta_v")]


def test_the_batched_terms_read_the_parameters_in_place_and_the_optimizer_moves_them():
    """In one process the first auxiliary loss makes each group's parameters views of one tensor, so later steps
    stack no copies of them; AdamW, built before that, still updates the very parameters the model computes with."""
    beta, gamma = 0.3, 0.7
    model = kasa_model(beta=beta, gamma=gamma)
    assert not any(view is not None for view in group_views(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        kasa.aux_loss(model).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    views = group_views(model)
    assert all(view is not None for view in views)
    before = [view.clone() for view in views]
    kasa.aux_loss(model).total.backward()
    optimizer.step()
    assert all(not torch.equal(view, old) for view, old in zip(group_views(model), before))
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    expected = sum(beta * l2 + gamma * l3 for l2, l3 in (expected_terms(b, "paper") for b in blocks)) / len(blocks)
    torch.testing.assert_close(kasa.aux_loss(model).total.double(), expected, atol=0, rtol=1e-5)


def test_parameters_moved_after_packing_are_packed_again():
    """`.to()` gives every parameter memory of its own: the terms stay right, and the next loss packs them again."""
    model = kasa_model(beta=0.3, gamma=0.7)
    kasa.aux_loss(model)
    model.double()
    assert all(view is None for view in group_views(model))
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    expected = sum(0.3 * l2 + 0.7 * l3 for l2, l3 in (expected_terms(b, "paper") for b in blocks)) / len(blocks)
    total = kasa.aux_loss(model).total
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, expected, atol=0, rtol=1e-10)
    assert all(view is not None and view.dtype == torch.float64 for view in group_views(model))


def test_adapters_applied_again_get_the_auxiliary_loss_of_their_own_blocks():
    """The loss's block list is kept with the model's adapters: one unloaded and applied again (the same config
    object) regularises the new blocks, not the old ones."""
    config = kasa.AdapterConfig(rank=4, beta=0.3, gamma=0.7, target_modules=AUX_TARGETS)
    model = kasa.apply_adapters(build_roberta(), config)
    old = [b for _, b in kasa.kasa_blocks(model)]
    kasa.aux_loss(model)
    kasa.merge_and_unload(model, merge=False)
    kasa.apply_adapters(model, config)
    randomize_adapters(model, scale=0.3)
    kasa.aux_loss(model).total.backward()
    new = [b for _, b in kasa.kasa_blocks(model)]
    assert not {id(b) for b in new} & {id(b) for b in old}
    assert all(b.delta_u.grad is not None and b.delta_u.grad.abs().sum() > 0 for b in new)
    assert all(b.delta_u.grad is None for b in old)


def test_a_first_auxiliary_loss_under_inference_mode_leaves_the_model_trainable():
    """Reading the regulariser's value under torch.inference_mode (an evaluation before training) packs nothing:
    packed there, the parameters would become inference tensors, which no backward can use."""
    model = kasa_model(beta=0.3, gamma=0.7)
    with torch.inference_mode():
        kasa.aux_loss(model)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    (model(torch.randint(0, 100, (2, 8))).logits.sum() + kasa.aux_loss(model).total).backward()
    assert all(view is not None for view in group_views(model))


def test_the_auxiliary_loss_follows_a_block_whose_beta_and_gamma_change():
    """The kept list holds every KaSA block; which of them are regularised is read at each call."""
    model = kasa_model(beta=0.3, gamma=0.7)
    kasa.aux_loss(model)
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    blocks[0].beta = blocks[0].gamma = 0.0
    expected = sum(0.3 * l2 + 0.7 * l3 for l2, l3 in (expected_terms(b, "paper") for b in blocks[1:]))
    aux = kasa.aux_loss(model)
    assert len(aux.names) == len(blocks) - 1
    torch.testing.assert_close(aux.total.double(), expected / (len(blocks) - 1), atol=0, rtol=1e-5)


def test_a_parameter_changed_between_the_terms_and_their_backward_is_caught():
    """The terms' backward reads the parameters saved for it, so autograd refuses one changed in place since."""
    model = kasa_model(beta=0.3, gamma=0.7)
    kasa.aux_loss(model)
    aux = kasa.aux_loss(model)
    with torch.no_grad():
        next(kasa.kasa_blocks(model))[1].delta_sigma.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        aux.total.backward()


def test_the_terms_are_computed_in_the_parameters_dtype_under_autocast_and_on_the_meta_device():
    """Under torch.distributed a block computes its terms inside forward, where autocast may be on: they stay float32
    and their backward runs; kasa-estimate traces models on the meta device."""
    model = kasa_model(beta=0.3, gamma=0.7)
    block = next(b for _, b in kasa.kasa_blocks(model))
    torch.nn.init.normal_(block.delta_u)
    expected = block.regularization()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = block.regularization()
    assert all(t.dtype == torch.float32 for t in terms)
    for a, b in zip(terms, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    sum(terms).backward()
    assert block.delta_u.grad is not None and block.delta_u.grad.dtype == torch.float32
    assert all(t.device.type == "meta" for t in block.to("meta").regularization())


def test_exactly_orthonormal_factors_have_a_zero_orthogonality_gradient():
    """||dU^T dU - I|| is exactly 0 at columns of the identity (paper form): the gradient there is 0, not 0 / 0."""
    model = kasa_model(beta=0.0, gamma=1.0)
    for _, block in kasa.kasa_blocks(model):
        with torch.no_grad():
            block.delta_u.copy_(torch.eye(block.n)[:, :block.r])
            block.delta_v.copy_(torch.eye(block.m)[:block.r])
    aux = kasa.aux_loss(model)
    assert aux.l3.item() == 0.0
    aux.total.backward()
    for _, block in kasa.kasa_blocks(model):
        assert (block.delta_u.grad == 0).all() and (block.delta_v.grad == 0).all()


def test_kasa_l2_has_no_orthogonality_term():
    beta = 0.3
    model = kasa_model(method="kasa_l2", beta=beta, gamma=0.7)
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    aux = kasa.aux_loss(model)
    expected = sum(beta * expected_terms(b, "paper")[0] for b in blocks) / len(blocks)
    torch.testing.assert_close(aux.total.double(), expected, atol=0, rtol=1e-5)
    aux.total.backward()
    for block in blocks:
        assert block.delta_u.grad is None or torch.count_nonzero(block.delta_u.grad) == 0
        assert block.delta_v.grad is None or torch.count_nonzero(block.delta_v.grad) == 0
        assert torch.count_nonzero(block.delta_sigma.grad) > 0


@pytest.mark.parametrize("method", ["kasa_sv", "lora", "pissa", "milora", "svd_lora", "full", "bitfit"])
def test_methods_without_aux_loss(method):
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=4, beta=0.5, gamma=0.5))
    assert kasa.aux_loss(model) is None


def test_a_record_from_an_earlier_step_is_not_read_under_torch_distributed(roberta_inputs, monkeypatch):
    """Under torch.distributed the blocks record their terms in forward. Called before the forward pass (against
    aux_loss_needs_forward), aux_loss read the previous step's records, whose graph the optimizer step had changed
    under them: backward failed with autograd's in-place error (walk AS). A record older than the parameters' last
    change is now dropped and the terms computed from the parameters, so both orders train alike."""
    from kasa.adapters import kasa as kasa_block

    monkeypatch.setattr(kasa_block, "aux_loss_needs_forward", lambda: True)
    trained = {}
    for order in ("after", "before"):
        model = kasa_model(beta=0.3, gamma=0.7).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            aux = kasa.aux_loss(model) if order == "before" else None
            logits = model(**roberta_inputs).logits
            aux = aux or kasa.aux_loss(model)
            (logits.square().mean() + aux.total).backward()
            optimizer.step()
            optimizer.zero_grad()
        trained[order] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for after, before in zip(*trained.values()):
        torch.testing.assert_close(before, after, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("distributed", [False, True])
def test_aux_loss_from_forward_records_or_batched_equals_each_blocks_terms(roberta_inputs, monkeypatch, distributed):
    """Under torch.distributed a training forward records each block's terms (FSDP / ZeRO-3 hold the full parameters
    only then); a single process records nothing and computes all blocks at once. Either way the
    terms equal KasaBlock.regularization's and reading them clears the records."""
    from kasa.adapters import kasa as kasa_block

    monkeypatch.setattr(kasa_block, "aux_loss_needs_forward", lambda: distributed)
    model = kasa_model(beta=0.3, gamma=0.7)
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    for i, b in enumerate(blocks):  # away from the initial dU = 0, so that every term is exercised
        torch.nn.init.normal_(b.delta_u)
        b.beta, b.gamma = (0.3, 0.7) if i < 3 else (0.3 * (1 + i % 2), 0.7 / (1 + i % 3))  # runs of equal weights
    model.eval()
    with torch.no_grad():
        model(**roberta_inputs)
    assert all(b.last_regularization is None for b in blocks)  # nothing recorded outside training
    expected = [b.regularization() for b in blocks]
    total = sum(b.beta * t.l2 + b.gamma * (t.l3_u + t.l3_v) for b, t in zip(blocks, expected)) / len(blocks)

    model.train()
    out = model(**roberta_inputs)
    assert all((b.last_regularization is not None) is distributed for b in blocks)
    aux = kasa.aux_loss(model)
    assert all(b.last_regularization is None for b in blocks)
    assert list(aux.modules) == [name for name, _ in kasa.kasa_blocks(model)]  # the model's order
    for terms, fresh in zip(aux.modules.values(), expected):
        for a, b in zip(terms, fresh):
            torch.testing.assert_close(a, b, atol=0, rtol=1e-6)
    assert list(aux.module_values().values()) == [[t.item() for t in terms] for terms in aux.modules.values()]
    torch.testing.assert_close(aux.total, total, atol=0, rtol=1e-6)
    torch.testing.assert_close(aux.l2, sum(t.l2 for t in expected) / len(blocks), atol=0, rtol=1e-6)
    torch.testing.assert_close(aux.l3, sum(t.l3_u + t.l3_v for t in expected) / len(blocks), atol=0, rtol=1e-6)
    (out.logits.sum() + aux.total).backward()
    assert all(b.delta_sigma.grad is not None and b.delta_u.grad is not None for b in blocks)


@pytest.mark.parametrize("orth_form", ["paper", "authors"])
def test_batched_terms_and_gradients_equal_each_blocks(orth_form):
    from kasa.adapters.kasa import batched_regularization

    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(
        rank=4, target_modules=["query", "value", "intermediate.dense"], orth_form=orth_form))
    blocks = [b for _, b in kasa.kasa_blocks(model)]
    for b in blocks:
        torch.nn.init.normal_(b.delta_u)
    def grads(terms: list):
        for b in blocks:
            b.zero_grad(set_to_none=True)
        sum((t.l2 + 2 * t.l3_u + 3 * t.l3_v).sum() for t in terms).backward()
        return [p.grad.clone() for b in blocks for p in (b.delta_u, b.delta_sigma, b.delta_v)]
    single = [b.regularization() for b in blocks]
    order, batched = batched_regularization(blocks)
    assert sorted(order) == list(range(len(blocks))) and len(set(order)) == len(blocks)
    for row, i in enumerate(order):
        for x, y in zip(single[i], batched):
            torch.testing.assert_close(x, y[row], atol=0, rtol=1e-6)
    for x, y in zip(grads(single), grads([batched_regularization(blocks)[1]])):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------------------


def test_roberta_base_parameter_counts():
    """The paper's RoBERTa-base setting (r = 8 on query and value); a small vocabulary keeps it cheap, and the meta
    device without initialisation (counts need shapes, not the SVD: 30 s of the suite when it ran)."""
    config = transformers.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, vocab_size=1000, max_position_embeddings=130)
    with torch.device("meta"):
        base = transformers.RobertaForSequenceClassification(config).eval()
    total = sum(p.numel() for p in base.parameters())
    kasa_m = kasa.apply_adapters(copy.deepcopy(base), kasa.AdapterConfig(
        method="kasa", rank=8, target_modules=["query", "value"]), initialise=False)
    lora_m = kasa.apply_adapters(base, kasa.AdapterConfig(method="lora", rank=8, target_modules=["query", "value"]),
                                 initialise=False)
    kasa_count, lora_count = kasa.count_parameters(kasa_m), kasa.count_parameters(lora_m)
    assert len(list(kasa.adapted_layers(kasa_m))) == 24
    assert kasa_count.adapter == 295104  # 24 x (768 x 8 + 8 + 8 x 768)
    assert lora_count.adapter == 294912  # 24 x (768 x 8 + 8 x 768)
    assert kasa_count.adapter - lora_count.adapter == 8 * 24  # r per module
    assert kasa_count.trainable == kasa_count.adapter and lora_count.trainable == lora_count.adapter
    # the removed triplets are buffers: the parameter total is the base model's plus the adapters
    assert kasa_count.total == total + kasa_count.adapter
    assert lora_count.total == total + lora_count.adapter


def test_small_model_parameter_counts():
    total = sum(p.numel() for p in build_roberta().parameters())
    head = sum(p.numel() for p in build_roberta().classifier.parameters())
    biases = sum(p.numel() for n, p in build_roberta().named_parameters() if n.endswith("bias"))
    per_module = 32 * 4 + 4 * 32
    count = kasa.count_parameters(kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(
        rank=4, trainable_modules=["classifier"])))
    assert count.adapter == 4 * (per_module + 4) and count.trainable == count.adapter + head
    for method in ("pissa", "milora", "svd_lora", "lora"):
        count = kasa.count_parameters(kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=4)))
        assert count.adapter == 4 * per_module and count.trainable == count.adapter, method
    count = kasa.count_parameters(kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="full")))
    assert count.trainable == count.total == total
    count = kasa.count_parameters(kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(
        method="bitfit", trainable_modules=["classifier"])))
    head_weights = head - sum(p.numel() for n, p in build_roberta().classifier.named_parameters() if n.endswith("bias"))
    assert count.trainable == biases + head_weights
    assert count.adapter == biases - (head - head_weights)  # biases outside the head


# --------------------------------------------------------------------------------------------------------------
# baselines: initialisation and what trains
# --------------------------------------------------------------------------------------------------------------


def test_lora_init():
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="lora", rank=4))
    for name, layer in kasa.adapted_layers(model):
        block = layer.adapters["weight"]
        assert isinstance(block, LoraBlock)
        m = block.lora_a.shape[1]
        assert block.lora_a.shape == (4, 32) and block.lora_b.shape == (32, 4)
        assert block.lora_a.abs().max() <= 1 / math.sqrt(m)
        assert block.lora_a.abs().max() > 0.5 / math.sqrt(m)  # uniform over the whole range, not tiny
        assert block.lora_a.std() > 0.4 / math.sqrt(m)
        assert torch.count_nonzero(block.lora_b) == 0
        assert torch.equal(layer.base_layer.weight, original.get_submodule(name).weight)
        assert block.removed_s.numel() == 0


@pytest.mark.parametrize("method,which", [("pissa", "largest"), ("milora", "smallest")])
@pytest.mark.parametrize("alpha", [4.0, 16.0])
def test_pissa_milora_init(method, which, alpha):
    rank = 4
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=rank, alpha=alpha))
    for name, layer in kasa.adapted_layers(model):
        w0 = original.get_submodule(name).weight
        block = layer.adapters["weight"]
        part = svd_part(w0, rank, which)
        scaling = alpha / rank
        torch.testing.assert_close((scaling * block.lora_b @ block.lora_a).double(), part, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight.double(), w0.double() - part, atol=1e-6, rtol=0)
        # A = sqrt(S / eta) V^T and B = U sqrt(S / eta): the factors are balanced
        torch.testing.assert_close(block.lora_a.norm(dim=1), block.lora_b.norm(dim=0), atol=1e-5, rtol=1e-4)
        assert block.lora_a.requires_grad and block.lora_b.requires_grad
        assert not layer.base_layer.weight.requires_grad


def test_svd_lora_init():
    rank = 4
    original = build_roberta()
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="svd_lora", rank=rank))
    for name, layer in kasa.adapted_layers(model):
        w0 = original.get_submodule(name).weight
        block = layer.adapters["weight"]
        torch.testing.assert_close(layer.base_layer.weight.double(), w0.double() - svd_part(w0, rank, "smallest"),
                                   atol=1e-6, rtol=0)
        assert torch.count_nonzero(block.lora_b) == 0
        assert 0 < block.lora_a.abs().max() <= 1 / math.sqrt(32)


def test_kasa_default_init_distribution():
    model = kasa.apply_adapters(build_roberta(hidden_size=64, intermediate_size=64),
                                kasa.AdapterConfig(rank=16, target_modules=["query", "value", "key"]))
    dv = torch.cat([b.delta_v.detach().flatten() for _, b in kasa.kasa_blocks(model)])
    ds = torch.cat([b.delta_sigma.detach() for _, b in kasa.kasa_blocks(model)])
    assert abs(dv.mean()) < 0.02 and 0.8 / 8 < dv.std() < 1.2 / 8  # N(0, 1/m), m = 64
    assert abs(ds.mean()) < 0.3 and 0.75 < ds.std() < 1.25  # N(0, 1)


@pytest.mark.parametrize("method", ["kasa", "kasa_l2", "kasa_sv", "lora", "pissa", "milora", "svd_lora"])
def test_only_adapters_and_named_modules_train(method):
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=4,
                                                                    trainable_modules=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {"delta_u", "delta_sigma", "delta_v"} if method.startswith("kasa") else {"lora_a", "lora_b"}
    expected = {f"{name}.adapters.weight.{p}" for name, _ in kasa.adapted_layers(model) for p in adapter_names}
    expected |= {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}
    assert trainable == expected
    for name, buf in model.named_buffers():
        if "removed_" in name:
            assert not buf.requires_grad


def test_full_and_bitfit_trainable_sets():
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert not list(kasa.adapted_layers(model))
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method="bitfit", trainable_modules=["classifier"]))
    for name, param in model.named_parameters():
        assert param.requires_grad == (name.endswith("bias") or name.startswith("classifier.")), name
    assert not list(kasa.adapted_layers(model))
    # a model without bias terms (LLaMA's) and no trained head: BitFit would train nothing, and fail at backward
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"^method=bitfit trains the model's bias terms, and this model has none"):
        kasa.apply_adapters(llama, kasa.AdapterConfig(method="bitfit"))


# --------------------------------------------------------------------------------------------------------------
# PEFT's KaSA variant
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT calls a deprecated transformers helper
def test_matches_peft_kasa(roberta_inputs):
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    if Version(peft.__version__) < Version("0.21") or not hasattr(peft, "KasaConfig"):
        pytest.skip("PEFT without the KaSA variant")
    rank, alpha, beta, gamma = 4, 8.0, 0.01, 0.02
    ours = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=rank, alpha=alpha, beta=beta, gamma=gamma))
    randomize_adapters(ours, scale=0.2)
    theirs = peft.get_peft_model(build_roberta(), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["query", "value"],
        kasa_config=peft.KasaConfig(beta=beta, gamma=gamma)))
    layers = dict(kasa.adapted_layers(ours))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if n.endswith(("query", "value")) and hasattr(m, "lora_diag")}
    assert sorted(peft_layers) == sorted(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_layers[name]
            block = layer.adapters["weight"]
            # the same truncation (PEFT: float32 torch.linalg.svd)
            torch.testing.assert_close(target.base_layer.weight, layer.base_layer.weight, atol=2e-6, rtol=0)
            target.base_layer.weight.copy_(layer.base_layer.weight)
            target.lora_A["default"].weight.copy_(block.delta_v)
            target.lora_B["default"].weight.copy_(block.delta_u)
            target.lora_diag["default"].copy_(block.delta_sigma)
    theirs.eval()
    torch.testing.assert_close(outputs(theirs, roberta_inputs), outputs(ours, roberta_inputs), atol=1e-5, rtol=0)
    # PEFT sums beta * L2 + gamma * L3 over the layers; kasa averages over them
    peft_loss = theirs.base_model._get_kasa_loss()
    torch.testing.assert_close(kasa.aux_loss(ours).total * len(layers), peft_loss, atol=0, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------


def test_rank_too_large():
    with pytest.raises(ValueError, match=r"rank\b.*\b32\b.*must be < min\(n, m\) = 32.*query"):
        kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=32))
    with pytest.raises(ValueError, match=r"rank\b.*\b24\b.*must be < min\(n, m\) = 24"):  # a fused slice: 24 x 24
        kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(rank=24, **GPT2_FUSED))
    for method in ("lora", "pissa", "milora", "svd_lora"):
        with pytest.raises(ValueError, match="rank"):
            kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(method=method, rank=40))


def test_no_matching_module_lists_linear_layers():
    with pytest.raises(ValueError, match="no module matches") as err:
        kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(target_modules=["q_proj", "v_proj"]))
    message = str(err.value)
    for name in ("query", "key", "value", "dense", "out_proj"):
        assert f"'{name}'" in message
    with pytest.raises(ValueError, match="no module matches") as err:  # GPT-2: Conv1D layers are listed too
        kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(target_modules=["query"]))
    for name in ("c_attn", "c_fc", "c_proj", "lm_head"):
        assert f"'{name}'" in str(err.value)


def test_bad_config_values():
    with pytest.raises(ValueError, match="unknown method 'loar'"):
        kasa.AdapterConfig(method="loar")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        kasa.AdapterConfig(beta=-1e-4)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        kasa.AdapterConfig(gamma=-1.0)
    for value in (float("nan"), float("inf")):  # the loss would be nan from the first step
        for name in ("beta", "gamma"):
            with pytest.raises(ValueError, match=f"{name} must be >= 0 and finite, got {value}"):
                kasa.AdapterConfig(**{name: value})
    with pytest.raises(ValueError, match="rank"):
        kasa.AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="rank"):
        kasa.AdapterConfig(rank=2.5)
    with pytest.raises(ValueError, match="dropout"):
        kasa.AdapterConfig(dropout=1.0)
    with pytest.raises(ValueError, match="orth_form"):
        kasa.AdapterConfig(orth_form="large")
    with pytest.raises(ValueError, match="init"):
        kasa.AdapterConfig(init="zeros")
    with pytest.raises(ValueError, match="unknown svd_method 'eig'; choose one of: gram, svd"):
        kasa.AdapterConfig(svd_method="eig")  # at once, not when the adapters are applied to a loaded model


def test_from_dict_rejects_unknown_keys():
    config = kasa.AdapterConfig(method="pissa", rank=3, target_modules=["query"], fused_modules={"qkv": ["q", "k"]})
    assert kasa.AdapterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown adapter option\(s\) \['lora_rank'\]"):
        kasa.AdapterConfig.from_dict({**config.to_dict(), "lora_rank": 8})


def test_other_structural_errors():
    with pytest.raises(ValueError, match="'x' is not a part of 'c_attn'"):
        kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(target_modules=["c_attn.x"],
                                                             fused_modules={"c_attn": ["q", "k", "v"]}))
    with pytest.raises(ValueError, match="LayerNorm.*nn.Linear and Conv1D"):
        kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(target_modules=["attention.output.LayerNorm"]))
    with pytest.raises(ValueError, match="do not split into 5 equal parts"):
        kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(rank=2, target_modules=["c_attn.a"],
                                                             fused_modules={"c_attn": list("abcde")}))
    with pytest.raises(ValueError, match="no module matches 'head' of trainable_modules"):
        kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(trainable_modules=["head"]))
    model = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=2))
    with pytest.raises(ValueError, match="already has adapters"):
        kasa.apply_adapters(model, kasa.AdapterConfig(rank=2))
    with pytest.raises(ValueError, match="no adapters"):
        kasa.adapter_config(build_roberta())


def test_module_matched_by_two_targets_is_adapted_once(roberta_inputs):
    """`query` and `self.query` name the same layers: each is truncated and wrapped once."""
    once = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=4, target_modules=["query"]))
    twice = kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(rank=4, target_modules=["query", "self.query"]))
    assert [n for n, _ in kasa.adapted_layers(twice)] == [n for n, _ in kasa.adapted_layers(once)]
    for (_, a), (_, b) in zip(kasa.adapted_layers(once), kasa.adapted_layers(twice)):
        assert isinstance(b.base_layer, nn.Linear)
        torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight, atol=1e-6, rtol=0)
        # the block holds the triplets removed from W0 (not the ~0 ones of an already truncated weight), so that a
        # saved adapter rebuilds W_world on the original base
        torch.testing.assert_close(a.adapters["weight"].removed_s, b.adapters["weight"].removed_s, atol=1e-6, rtol=0)
        assert b.adapters["weight"].removed_s.min() > 1e-3
    assert kasa.count_parameters(twice).adapter == kasa.count_parameters(once).adapter
    # fused parts named through two targets are merged into one layer with both blocks
    model = kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(
        rank=2, target_modules=["c_attn.q", "attn.c_attn.v"], fused_modules={"c_attn": ["q", "k", "v"]}))
    for _, layer in kasa.adapted_layers(model):
        assert sorted(layer.adapters) == ["q", "v"] and isinstance(layer.base_layer, Conv1D)
    with pytest.raises(ValueError, match="both as a whole and by its fused parts"):
        kasa.apply_adapters(build_gpt2(), kasa.AdapterConfig(
            rank=2, target_modules=["c_attn.q", "attn.c_attn"], fused_modules={"c_attn": ["q", "k", "v"]}))


def test_a_misspelled_name_beside_others_is_refused_and_leaves_the_model_as_it_was():
    """[query, vaule] adapted the query layers alone, without a word, in apply_adapters and kasa-train; KaSA with a
    misspelled trainable module had truncated the base before it was refused (walk AC)."""
    with pytest.raises(ValueError, match=r"no module matches 'vaule' of target_modules \['query', 'vaule'\]"):
        kasa.apply_adapters(build_roberta(), kasa.AdapterConfig(target_modules=["query", "vaule"]))
    model = build_roberta()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with pytest.raises(ValueError, match="no module matches 'clasifier' of trainable_modules"):
        kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, trainable_modules=["clasifier"]))
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    # no target at all froze the whole model and trained nothing, without a word (walk AS)
    with pytest.raises(ValueError, match=r"method=kasa adapts the modules of target_modules, which is empty: name "
                                         r"the layers to adapt; linear layers in this model: \['dense'"):
        kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=[]))
    assert all(param.requires_grad for param in model.parameters())
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules="query"))  # one name
    assert [name.rsplit(".", 1)[-1] for name, _ in kasa.adapted_layers(model)] == ["query", "query"]


@pytest.mark.parametrize("settings, message", [
    (dict(alpha="16"), "alpha must be a number, got '16'"),  # TypeError: '<' not supported (walk AS)
    (dict(truncation_rank=2.5), "truncation_rank must be a whole number, got 2.5"),  # crashed in torch.zeros
    (dict(rank=True), "rank must be a whole number, got True"),
    (dict(beta=None), "beta must be a number, got None"),
    (dict(method="lora", rank=4.0), "rank must be a whole number, got 4.0"),
])
def test_a_setting_of_the_wrong_type_is_one_clear_error(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kasa.AdapterConfig(**settings)


def test_a_method_without_a_rank_takes_none_and_a_numpy_count_is_a_whole_number():
    import numpy as np

    assert kasa.AdapterConfig(method="full", rank=None).method == "full"  # refused as "not a whole number" (walk AT)
    assert kasa.AdapterConfig(rank=np.int64(4), truncation_rank=np.int64(2)).removed_rank == 2


def test_a_config_that_is_not_an_adapter_config_is_named():
    with pytest.raises(ValueError, match=r"config must be a kasa.AdapterConfig, got dict: build it with "
                                         r"kasa.AdapterConfig\(method=..., ...\) or AdapterConfig.from_dict"):
        kasa.apply_adapters(build_roberta(), {"method": "kasa"})


def test_a_tied_output_embedding_is_not_a_target():
    """lm_head tied to the input embeddings: KaSA's truncation changed the embeddings too, and a merge changed the
    logits by 3x their size (walk AC)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    embeddings = model.model.embed_tokens.weight.detach().clone()
    for method in ("kasa", "lora"):
        with pytest.raises(ValueError, match=r"'lm_head' shares its weight with 'model.embed_tokens.weight'"):
            kasa.apply_adapters(model, kasa.AdapterConfig(method=method, rank=4, target_modules=["lm_head"]))
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


@pytest.mark.parametrize("method", ["kasa", "dora"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_trains_its_head_and_adapters_in_float32(method, dtype, roberta_inputs, tmp_path):
    """AdamW keeps its moments in the weights' dtype: a float16 head's second moments underflowed to 0, and its steps
    grew past lr (bfloat16 drops small updates instead). Heads and adapters train in float32 (PEFT's too) while the
    model's outputs keep its dtype; merging gives the original architecture back, in the model's dtype."""
    if method == "dora":
        pytest.importorskip("peft")
    from kasa.cli.common import compose_run
    from kasa.training.loop import build_optimizer

    model = build_roberta().to(dtype)
    config = kasa.AdapterConfig(method=method, rank=4, target_modules=["query", "value"],
                                trainable_modules=["classifier"])
    kasa.apply_adapters(model, config)
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert {param.dtype for param in trainable.values()} == {torch.float32}
    assert any(name.startswith("classifier.") for name in trainable)
    assert model(**roberta_inputs).logits.dtype == dtype  # what the layers around the head see is unchanged

    cfg = compose_run(["trainer.lr=1e-3", "trainer.head_lr=1e-3", "trainer.weight_decay=0"])
    cfg.method.trainable_modules = ["classifier"]
    optimizer = build_optimizer(model, cfg)
    weight = model.classifier.out_proj.weight
    before = weight.detach().clone()
    for _ in range(3):
        for param in trainable.values():
            param.grad = torch.full_like(param, 1e-5)
        optimizer.step()
    assert torch.allclose(before - weight.detach(), torch.full_like(before, 3e-3), rtol=1e-2)  # Adam's steps: lr

    kasa.merge_and_unload(model)
    assert {param.dtype for param in model.parameters()} == {dtype}
    assert not model.classifier._forward_pre_hooks and not model.classifier._forward_hooks


def test_adalora_trains_the_same_parameters_in_every_dtype():
    """PEFT makes AdaLoRA's ranknum (a constant it divides by) a trainable Parameter when it moves or casts a
    half-precision model's adapters: AdamW drifted it, and bf16 checkpoints did not load in float32 (walk AJ)."""
    pytest.importorskip("peft")
    config = kasa.AdapterConfig(method="adalora", rank=4, target_modules=["query", "value"],
                                peft_options={"total_step": 10})
    trained = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = kasa.apply_adapters(build_roberta().to(dtype), config)
        trained[dtype] = sorted(name for name, param in model.named_parameters() if param.requires_grad)
    assert trained[torch.float32] == trained[torch.bfloat16] == trained[torch.float16]
    assert not any("ranknum" in name for name in trained[torch.float32])


def test_a_bf16_adalora_checkpoint_saved_with_its_ranknum_still_loads(tmp_path):
    """bf16 AdaLoRA runs saved ranknum (a constant, trainable by mistake) before it was frozen: still loadable."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    config = kasa.AdapterConfig(method="adalora", rank=4, target_modules=["query", "value"],
                                peft_options={"total_step": 10})
    model = kasa.apply_adapters(build_roberta().to(torch.bfloat16), config)
    kasa.save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    ranknum = {name: param.detach().clone() for name, param in model.named_parameters() if ".ranknum." in name}
    assert ranknum and not set(ranknum) & set(tensors)
    save_file({**tensors, **ranknum}, weights)
    loaded = kasa.load_adapter(build_roberta().to(torch.bfloat16), tmp_path / "adapter")
    assert all(torch.equal(loaded.get_parameter(name), value) for name, value in ranknum.items())
