"""KaSA's init=principal takes rank + truncation_rank singular components out of each weight (the r largest into the
adapter, the k smallest removed): a sum above min(n, m) is a clear error before any decomposition runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kasa
from kasa.adapters import model as adapter_model


def _config(truncation_rank: int, **extra) -> kasa.AdapterConfig:
    return kasa.AdapterConfig(method="kasa", rank=4, truncation_rank=truncation_rank, init="principal",
                              target_modules=["proj"], svd_method="svd", svd_cache_dir=None, **extra)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 8)  # W is 8 x 12: min(n, m) = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_too_many_components_fail_before_the_decomposition(monkeypatch):
    def no_decomposition(*args, **kwargs):
        raise AssertionError("the decomposition ran before the check")

    monkeypatch.setattr(adapter_model, "singular_components", no_decomposition)
    # rank 4 and truncation_rank 5 are each < 8, but 4 + 5 = 9 components would overlap
    with pytest.raises(ValueError, match=r"init=principal takes rank \+ truncation_rank = 4 \+ 5 singular components "
                                         r"out of 'proj' \(8 x 12\), more than its min\(n, m\) = 8") as err:
        kasa.apply_adapters(Tiny(), _config(5))
    assert "\n" not in str(err.value) and "lower method.rank or method.truncation_rank" in str(err.value)


def test_principal_init_that_fits_starts_at_w0_minus_the_minor_part():
    # 4 + 4 = 8 = min(n, m): the 4 largest components go into the adapter, the 4 smallest are removed, none twice
    torch.manual_seed(0)
    model = Tiny()
    weight, bias = model.proj.weight.detach().double().clone(), model.proj.bias.detach().double().clone()
    kasa.apply_adapters(model, _config(4))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    block = dict(kasa.adapted_layers(model))["proj"].adapters["weight"]
    torch.testing.assert_close(torch.sort(block.removed_s.double()).values, torch.sort(s).values, atol=1e-5, rtol=0)
    # at step 0 the model is W0 without its 4 minor components (the adapter holds the principal part)
    minor = (u[:, 4:] * s[4:]) @ vh[4:]
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        got = model(x.float()).double()
    torch.testing.assert_close(got, x @ (weight - minor).T + bias, atol=1e-5, rtol=0)
