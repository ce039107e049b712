"""Knowledge-based SVD truncation: `singular_components` (gram vs svd, dense and Lanczos paths, rank-deficient
weights, disk cache) and the truncation `apply_adapters` performs on nn.Linear, GPT-2 Conv1D and fused slices,
all checked against a float64 torch.linalg.svd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kasa
from kasa.adapters import truncation
from kasa.adapters.truncation import singular_components


class Ref:
    """A float64 torch.linalg.svd of w (computed once) and the exact parts the tests compare against."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w.detach().double()
        self.u, self.s, self.vh = torch.linalg.svd(self.w, full_matrices=False)
        self.k = self.s.shape[0]

    def part(self, rank: int, which: str) -> torch.Tensor:
        """The rank-r matrix of the r smallest / largest singular triplets."""
        sl = slice(self.k - rank, self.k) if which == "smallest" else slice(0, rank)
        return (self.u[:, sl] * self.s[sl]) @ self.vh[sl]

    def values(self, rank: int, which: str) -> torch.Tensor:
        return self.s[self.k - rank:] if which == "smallest" else self.s[:rank]  # descending, as torch.linalg.svd


def with_spectrum(n: int, m: int, s: torch.Tensor, seed: int = 0):
    """An n x m float64 matrix with exactly the singular values s (length min(n, m)), and its factors."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return (u * s) @ v.T, u, v


class _Net(nn.Module):
    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)
        self.other = nn.Linear(n_in, 3)

    def forward(self, x):
        return self.proj(x), self.other(x)


@pytest.fixture
def count_lanczos(monkeypatch):
    calls = []
    original = truncation._lanczos_eigenpairs

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(truncation, "_lanczos_eigenpairs", counting)
    return calls


# --------------------------------------------------------------------------------------------------------------
# singular_components: gram == svd == float64 reference
# --------------------------------------------------------------------------------------------------------------

SMALL_SHAPES = [(20, 30), (30, 20), (25, 25)]
LARGE_SHAPES = [(270, 300), (300, 270)]  # k > 256: the Lanczos path


@pytest.mark.parametrize("which", ["smallest", "largest"])
@pytest.mark.parametrize("shape", SMALL_SHAPES + LARGE_SHAPES)
def test_gram_equals_svd(shape, which, count_lanczos):
    n, m = shape
    rank = 6
    w = torch.randn(n, m) * 0.05
    gram = singular_components(w, rank, which, method="gram", device="cpu")
    svd = singular_components(w, rank, which, method="svd", device="cpu")
    # the Lanczos (scipy) path runs exactly for the larger matrices, the dense eigh path for the small ones
    assert len(count_lanczos) == (1 if min(n, m) > truncation._DENSE_EIGH_MAX_K else 0)

    assert gram.u.shape == (n, rank) and gram.s.shape == (rank,) and gram.v.shape == (m, rank)
    assert gram.u.dtype == gram.s.dtype == gram.v.dtype == torch.float32
    ref = Ref(w)
    scale = ref.s[0].item()
    torch.testing.assert_close(gram.s, svd.s, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(gram.matrix(), svd.matrix(), atol=1e-5 * scale, rtol=0)
    # and both against the float64 reference
    torch.testing.assert_close(gram.s.double(), ref.values(rank, which), atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(gram.matrix().double(), ref.part(rank, which), atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(svd.matrix().double(), ref.part(rank, which), atol=1e-5 * scale, rtol=0)
    # singular vectors orthonormal
    eye = torch.eye(rank)
    torch.testing.assert_close(gram.u.T @ gram.u, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(gram.v.T @ gram.v, eye, atol=1e-4, rtol=0)


def _spectra(k: int) -> dict[str, torch.Tensor]:
    base = torch.linspace(3.0, 1.0, k, dtype=torch.float64)
    zeros = base.clone()
    zeros[-12:] = 0.0  # 12 exact zeros, more than the rank: the r smallest are all zero
    mixed = base.clone()
    mixed[-3:] = 0.0  # r = 6 smallest: three zeros and three equal values
    mixed[-6:-3] = 0.5
    top = base.clone()
    top[:3] = 5.0  # the three largest repeated, inside the selection
    return {"zeros": zeros, "mixed": mixed, "top_repeated": top}


@pytest.mark.parametrize("which", ["smallest", "largest"])
@pytest.mark.parametrize("shape", [(30, 40), (40, 30), (270, 300), (300, 270)])
def test_rank_deficient_and_repeated_singular_values(shape, which):
    n, m = shape
    rank, k = 6, min(shape)
    for name, spectrum in _spectra(k).items():
        w64, u, v = with_spectrum(n, m, spectrum)
        w = w64.float()
        comps = singular_components(w, rank, which, method="gram", device="cpu")
        for t in (comps.u, comps.s, comps.v):
            assert torch.isfinite(t).all(), name
        sl = slice(k - rank, k) if which == "smallest" else slice(0, rank)
        torch.testing.assert_close(comps.s.double(), spectrum[sl], atol=2e-5, rtol=0, msg=name)
        # No tie across the selection boundary, so the removed part is unique and W_world must be exact.
        exact = (u[:, sl] * spectrum[sl]) @ v[:, sl].T
        torch.testing.assert_close(comps.matrix().double(), exact, atol=2e-5, rtol=0, msg=name)
        torch.testing.assert_close(w64 - comps.matrix().double(), w64 - exact, atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (270, 300), (300, 270)])
def test_exactly_low_rank_float32_weight(shape):
    """Duplicated rows / columns: exact zero singular values in a float32 weight."""
    n, m = shape
    w = torch.randn(n, m)
    if n <= m:
        w[n // 2:] = w[: n - n // 2]
    else:
        w[:, m // 2:] = w[:, : m - m // 2]
    ref = Ref(w)
    for which in ("smallest", "largest"):
        comps = singular_components(w, 8, which, method="gram", device="cpu")
        assert all(torch.isfinite(t).all() for t in (comps.u, comps.s, comps.v))
        assert (comps.matrix().double() - ref.part(8, which)).abs().max() < 1e-5 * ref.s[0]
        if which == "smallest":
            assert comps.s.max() < 1e-5 * ref.s[0]  # all numerically zero


def test_float64_and_bfloat16_weights():
    w = torch.randn(24, 40, dtype=torch.float64)
    comps = singular_components(w, 4, "smallest", method="gram", device="cpu")
    assert comps.s.dtype == torch.float32
    torch.testing.assert_close(comps.matrix().double(), Ref(w).part(4, "smallest"), atol=1e-6, rtol=0)
    wb = w.to(torch.bfloat16)
    comps_b = singular_components(wb, 4, "smallest", method="gram", device="cpu")
    torch.testing.assert_close(comps_b.matrix().double(), Ref(wb).part(4, "smallest"), atol=1e-5, rtol=0)


def test_deterministic():
    w = torch.randn(270, 280)
    a = singular_components(w, 5, "smallest", method="gram", device="cpu")
    b = singular_components(w.clone(), 5, "smallest", method="gram", device="cpu")
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.v, b.v)


@pytest.mark.parametrize("rank", [0, 20, 25, -1])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=r"rank r=.*min\(n, m\) = 20"):
        singular_components(torch.randn(20, 30), rank)


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        singular_components(torch.randn(4, 5, 6), 2)
    with pytest.raises(ValueError, match="unknown truncation method 'qr'"):
        singular_components(torch.randn(10, 12), 2, method="qr")
    with pytest.raises(ValueError, match="which"):
        singular_components(torch.randn(10, 12), 2, which="middle")


# --------------------------------------------------------------------------------------------------------------
# disk cache
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def count_gram(monkeypatch):
    calls = []
    original = truncation._gram_components

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(truncation, "_gram_components", counting)
    return calls


def test_cache_hit_skips_decomposition(tmp_path, monkeypatch):
    w = torch.randn(30, 45)
    first = singular_components(w, 4, "smallest", cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, no leftovers

    def boom(*args, **kwargs):
        raise AssertionError("decomposed although the result is cached")

    monkeypatch.setattr(truncation, "_gram_components", boom)
    monkeypatch.setattr(torch.linalg, "svd", boom)
    second = singular_components(w.clone(), 4, "smallest", cache_dir=tmp_path)  # same values, other tensor
    for a, b in ((first.u, second.u), (first.s, second.s), (first.v, second.v)):
        assert torch.equal(a, b)
    assert second.u.dtype == torch.float32 and second.u.device == w.device
    # without cache_dir the patched decomposition runs (and fails): the cache is not consulted
    with pytest.raises(AssertionError, match="decomposed"):
        singular_components(w, 4, "smallest")


def test_a_damaged_or_unwritable_cache_never_stops_a_run(tmp_path, caplog, monkeypatch):
    w = torch.randn(30, 45)
    expected = singular_components(w, 4, "smallest")
    singular_components(w, 4, "smallest", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:40])  # truncated, as by a copy cut short
    again = singular_components(w, 4, "smallest", cache_dir=tmp_path)
    assert torch.equal(again.s, expected.s) and "ignoring the unreadable cached decomposition" in caplog.text
    assert torch.equal(singular_components(w, 4, "smallest", cache_dir=tmp_path).u, expected.u)  # written again

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setattr(truncation, "_cache_write_failed", False)
    for rank in (3, 5):
        singular_components(w, rank, "smallest", cache_dir=not_a_folder / "svd")
    assert caplog.text.count("cannot write the decomposition cache") == 1  # said once, and the run goes on


def test_cache_keys_distinguish_rank_which_method_weight(tmp_path, count_gram):
    w = torch.randn(30, 45)
    singular_components(w, 4, "smallest", cache_dir=tmp_path)
    assert len(count_gram) == 1
    singular_components(w, 4, "smallest", cache_dir=tmp_path)
    assert len(count_gram) == 1  # hit

    singular_components(w, 5, "smallest", cache_dir=tmp_path)  # other rank
    singular_components(w, 4, "largest", cache_dir=tmp_path)  # other side
    assert len(count_gram) == 3
    singular_components(w, 4, "smallest", method="svd", cache_dir=tmp_path)  # other method (no gram call)
    assert len(count_gram) == 3
    w2 = w.clone()
    w2[3, 7] += 1e-3  # one element differs
    different = singular_components(w2, 4, "smallest", cache_dir=tmp_path)
    assert len(count_gram) == 4
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    torch.testing.assert_close(different.matrix().double(), Ref(w2).part(4, "smallest"), atol=1e-6, rtol=0)
    # the same values in another dtype are another weight
    singular_components(w.double(), 4, "smallest", cache_dir=tmp_path)
    assert len(count_gram) == 5

    keys = {
        truncation._cache_key(w, 4, "smallest", "gram"),
        truncation._cache_key(w, 5, "smallest", "gram"),
        truncation._cache_key(w, 4, "largest", "gram"),
        truncation._cache_key(w, 4, "smallest", "svd"),
        truncation._cache_key(w2, 4, "smallest", "gram"),
        truncation._cache_key(w.T.contiguous(), 4, "smallest", "gram"),
    }
    assert len(keys) == 6
    assert truncation._cache_key(w, 4, "smallest", "gram") == truncation._cache_key(w.clone(), 4, "smallest", "gram")


def test_apply_adapters_uses_cache(tmp_path, make_roberta, roberta_inputs, count_gram):
    config = kasa.AdapterConfig(method="kasa", rank=4, svd_cache_dir=str(tmp_path))
    first = kasa.apply_adapters(make_roberta(), config)
    assert len(count_gram) == 4  # 2 layers x (query, value)
    second = kasa.apply_adapters(make_roberta(), kasa.AdapterConfig(method="kasa", rank=4, svd_cache_dir=str(tmp_path)))
    assert len(count_gram) == 4  # all served from the cache
    for (_, a), (_, b) in zip(kasa.adapted_layers(first), kasa.adapted_layers(second)):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)
        assert torch.equal(a.adapters["weight"].removed_u, b.adapters["weight"].removed_u)


# --------------------------------------------------------------------------------------------------------------
# truncation applied to model layers
# --------------------------------------------------------------------------------------------------------------


def check_truncated(w0: torch.Tensor, w_base: torch.Tensor, block, rank: int) -> None:
    """w_base's singular values are the top k - r of w0 (the rest ~0) and the block removed the bottom r."""
    ref = Ref(w0)
    w_base = w_base.detach().double()
    k = ref.k
    s_base = torch.linalg.svdvals(w_base)
    tol = 1e-5 * ref.s[0].item()
    torch.testing.assert_close(s_base[: k - rank], ref.s[: k - rank], atol=tol, rtol=0)
    assert s_base[k - rank:].max() < tol
    torch.testing.assert_close(block.removed_s.double(), ref.values(rank, "smallest"), atol=tol, rtol=0)
    removed = block.removed_matrix().double()
    torch.testing.assert_close(removed, ref.part(rank, "smallest"), atol=tol, rtol=0)
    torch.testing.assert_close(w_base + removed, ref.w, atol=tol, rtol=0)
    torch.testing.assert_close(w_base, ref.w - ref.part(rank, "smallest"), atol=tol, rtol=0)


@pytest.mark.parametrize("svd_method", ["gram", "svd"])
@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("method", ["kasa", "svd_lora"])
def test_linear_truncation(shape, svd_method, method):
    _check_linear_truncation(shape, svd_method, method)


@pytest.mark.parametrize("shape", [(280, 260), (260, 280)], ids=["tall", "wide"])
def test_linear_truncation_lanczos_path(shape, count_lanczos):
    _check_linear_truncation(shape, "gram", "kasa")
    assert len(count_lanczos) == 1


def _check_linear_truncation(shape, svd_method, method):
    n, m = shape
    rank = 4
    net = _Net(n, m)
    w0 = net.proj.weight.detach().clone()
    other0 = net.other.weight.detach().clone()
    kasa.apply_adapters(net, kasa.AdapterConfig(method=method, rank=rank, target_modules=["proj"],
                                                svd_method=svd_method, svd_device="cpu"))
    layer = net.proj
    assert isinstance(layer, kasa.adapters.layer.AdaptedLayer)
    assert isinstance(layer.base_layer, nn.Linear) and layer.base_layer.weight.shape == (n, m)
    check_truncated(w0, layer.base_layer.weight, layer.adapters["weight"], rank)
    assert torch.equal(net.other.weight, other0)  # untargeted layers untouched


def test_gpt2_conv1d_truncation(make_gpt2):
    model = make_gpt2()
    rank = 3
    originals = {name: mod.weight.detach().clone() for name, mod in model.named_modules()
                 if name.endswith(("mlp.c_fc", "mlp.c_proj", "attn.c_proj"))}
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=rank, target_modules=["c_fc", "mlp.c_proj"]))
    layers = dict(kasa.adapted_layers(model))
    assert sorted(layers) == sorted(n for n in originals if "mlp" in n)
    for name, layer in layers.items():
        stored = layer.base_layer.weight  # Conv1D keeps W^T (in x out)
        w0 = originals[name].T  # W (out x in): c_fc is tall (96 x 24), c_proj wide (24 x 96)
        assert stored.shape == originals[name].shape
        check_truncated(w0, stored.T, layer.adapters["weight"], rank)
        assert layer.adapters["weight"].delta_u.shape == (w0.shape[0], rank)
        assert layer.adapters["weight"].delta_v.shape == (rank, w0.shape[1])
    for name, w in originals.items():  # attn.c_proj is not a target ("mlp.c_proj" is a dotted suffix)
        if "attn" in name:
            assert torch.equal(model.get_submodule(name).weight, w)


@pytest.mark.parametrize("svd_method", ["gram", "svd"])
def test_fused_slices_truncated_separately(make_gpt2, svd_method):
    model = make_gpt2()
    rank = 4
    originals = {name: mod.weight.detach().clone() for name, mod in model.named_modules() if name.endswith("c_attn")}
    config = kasa.AdapterConfig(method="kasa", rank=rank, target_modules=["c_attn.q", "c_attn.v"],
                                fused_modules={"c_attn": ["q", "k", "v"]}, svd_method=svd_method)
    kasa.apply_adapters(model, config)
    layers = dict(kasa.adapted_layers(model))
    assert sorted(layers) == sorted(originals)
    d = 24
    for name, layer in layers.items():
        w0 = originals[name].T  # (3d x d)
        w = layer.base_layer.weight.T
        assert sorted(layer.adapters) == ["q", "v"]
        assert layer.slices == {"q": (0, d), "v": (2 * d, 3 * d)}
        check_truncated(w0[:d], w[:d], layer.adapters["q"], rank)
        check_truncated(w0[2 * d:], w[2 * d:], layer.adapters["v"], rank)
        assert torch.equal(w[d: 2 * d], w0[d: 2 * d])  # k untouched, bit for bit
        # truncating the whole fused matrix would be different: the slices are not the whole
        whole = w0.double() - Ref(w0).part(rank, "smallest")
        assert not torch.allclose(w.double(), whole, atol=1e-4)
    assert len(list(kasa.kasa_blocks(model))) == 4


@pytest.mark.parametrize("method", ["kasa", "svd_lora"])
def test_truncation_rank_decoupled_from_adapter_rank(method):
    """truncation_rank (paper F.4) sets how many minor components are removed; rank stays the adapter's rank."""
    net = _Net(40, 16)
    w0 = net.proj.weight.detach().clone()
    kasa.apply_adapters(net, kasa.AdapterConfig(method=method, rank=3, truncation_rank=6, target_modules=["proj"]))
    block = net.proj.adapters["weight"]
    check_truncated(w0, net.proj.base_layer.weight, block, 6)
    assert block.removed_s.shape == (6,)
    params = {name: tuple(p.shape) for name, p in block.named_parameters()}
    assert sorted(params.values()) == sorted([(40, 3), (3,), (3, 16)] if method == "kasa" else [(40, 3), (3, 16)])
    with pytest.raises(ValueError, match=r"must be < min\(n, m\) = 16"):
        kasa.apply_adapters(_Net(40, 16), kasa.AdapterConfig(method=method, rank=3, truncation_rank=16,
                                                             target_modules=["proj"]))
