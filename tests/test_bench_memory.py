"""scripts/tensor_peak.py's count (scripts/bench_llm.py's and scripts/estimate_check.py's) of the bytes that a step's tensors hold at their peak (its CPU counterpart of
torch.cuda.max_memory_allocated): exact on ops whose allocations are known, views and existing storages not counted."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_llm():
    return script("bench_llm")


def test_live_tensor_bytes_follows_allocations_and_frees() -> None:
    bench = script("tensor_peak")
    weight = torch.ones(256, 256)  # 256 KiB that exists before: never counted
    with bench.LiveTensorBytes(set(bench.storage_bytes([weight]))) as tensors:
        a = weight * 2  # 256 KiB
        view = a[:128].t()  # a view: no new memory
        b = a @ weight  # 256 KiB more: 512 KiB live
        del a, view  # a's memory is freed with its last reference
        c = b.sum(dim=0)  # 1 KiB
        b.mul_(2)  # in place: nothing new
        del b
        d = torch.empty(64, 1024)  # 256 KiB, now with only c live
    assert tensors.peak == 2 * 256 * 256 * 4
    assert tensors.bytes == c.numel() * 4 + d.numel() * 4
    del c, d
    assert tensors.bytes == 0


def test_model_storages_count_the_quantization_state_bitsandbytes_hangs_on_a_weight() -> None:
    pytest.importorskip("bitsandbytes")
    from kasa.adapters.quantized import quantize_base, quantized_bytes

    tensors = script("tensor_peak")
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 64)).requires_grad_(False)
    quantize_base(model, "nf4")
    counted = sum(tensors.model_storages(model).values())
    biases = (128 + 64) * 4
    registered = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    # the 4-bit values are a parameter; their absmax, the nested absmax and scale and the 4-bit code table are not
    assert counted - registered >= 128 * 256 // 64 + 64 * 128 // 64
    assert counted >= quantized_bytes(128, 256, "nf4") + quantized_bytes(64, 128, "nf4") + biases


def test_paired_ratio_cancels_the_machine_drift_that_a_ratio_of_medians_keeps() -> None:
    bench = bench_llm()
    # the machine slows by 40% in the middle of round 2, between the two methods' steps, and stays slow
    reference_speed = [1.0, 1.0, 1.0, 1.4, 1.4]
    timed_speed = [1.0, 1.0, 1.4, 1.4, 1.4]
    reference = [1.0 * s for s in reference_speed]
    times = [1.02 * s for s in timed_speed]
    assert bench.paired_ratio(times, reference) == pytest.approx(1.02)
    assert statistics.median(times) / statistics.median(reference) == pytest.approx(1.428)
    with pytest.raises(ValueError):
        bench.paired_ratio(times, reference[:-1])



def test_the_paired_ratio_interval_holds_the_median_and_narrows_with_steadier_rounds() -> None:
    bench = bench_llm()
    reference = [1.0] * 20
    noisy = [1.04 + 0.1 * (-1) ** i * (i % 5) / 5 for i in range(20)]  # ratios 0.96-1.12 around 1.04
    steady = [1.04 + 0.01 * (-1) ** i * (i % 5) / 5 for i in range(20)]  # the same pattern, a tenth as wide
    low, high = bench.paired_ratio_interval(noisy, reference)
    assert low <= bench.paired_ratio(noisy, reference) <= high and high - low > 0.02
    steady_low, steady_high = bench.paired_ratio_interval(steady, reference)
    assert steady_high - steady_low == pytest.approx((high - low) / 10, rel=0.3)
    assert bench.paired_ratio_interval(noisy, reference) == (low, high)  # seeded: the same rounds, the same interval
    assert bench.paired_ratio_interval([1.03] * 5, [1.0] * 5) == pytest.approx((1.03, 1.03))

def test_larger_shape_worker_counts_both_bases_and_estimates_them(monkeypatch, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    bench = bench_llm()
    monkeypatch.setattr(bench, "LARGER_SHAPE", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                    tie_word_embeddings=False))
    monkeypatch.setattr(bench, "MAX_LENGTH", 32)
    monkeypatch.setattr(bench, "SVD_CACHE", tmp_path)
    runs = {q: bench.worker_larger_memory(q) for q in (None, "nf4")}
    for run in runs.values():
        assert run["tensor_peak_mib"] > 0 and run["estimate_mib"] > 0 and run["loss_share"] == pytest.approx(0.75, abs=0.05)
    assert runs["nf4"]["tensor_peak_mib"] < runs[None]["tensor_peak_mib"]
    assert runs["nf4"]["estimate_mib"] < runs[None]["estimate_mib"]
