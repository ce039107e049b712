"""trainer.scheduler: kasa's own schedules give transformers' factors for linear and cosine (the paper's recipes use
them; kasa stops importing transformers' Trainer utilities for them), and every schedule keeps the warmup."""

import pytest
import torch

from kasa.training.schedule import DECAYS, build_scheduler


def _factors(scheduler, steps: int) -> list[float]:
    base = scheduler.base_lrs[0]
    factors = []
    for _ in range(steps):
        factors.append(scheduler.get_last_lr()[0] / base)
        scheduler.optimizer.step()
        scheduler.step()
    return factors


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (6, 97), (10, 10), (1, 1)])
def test_linear_and_cosine_equal_transformers_schedules(decay, warmup, total):
    from transformers import get_scheduler

    theirs = get_scheduler(decay, _optimizer(), num_warmup_steps=warmup, num_training_steps=total)
    ours = build_scheduler(_optimizer(), decay, warmup, total)
    assert _factors(ours, total + 2) == _factors(theirs, total + 2)  # the same floats, past the end too


def test_every_schedule_warms_up_from_zero_and_constant_stays():
    for decay in DECAYS:
        factors = _factors(build_scheduler(_optimizer(), decay, 4, 20), 20)
        assert factors[:5] == [0.0, 0.25, 0.5, 0.75, 1.0], decay
        assert all(a >= b for a, b in zip(factors[4:], factors[5:])), decay  # then never up
    assert _factors(build_scheduler(_optimizer(), "constant", 4, 20), 20)[4:] == [1.0] * 16
    assert _factors(build_scheduler(_optimizer(), "constant", 0, 5), 5) == [1.0] * 5


def test_a_saved_schedule_resumes_where_it_stopped():
    first = build_scheduler(_optimizer(), "cosine", 2, 12)
    _factors(first, 5)
    resumed = build_scheduler(_optimizer(), "cosine", 2, 12)
    resumed.load_state_dict(first.state_dict())
    assert _factors(resumed, 7) == _factors(first, 7)
