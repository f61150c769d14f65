"""The shared imitation losses: weighted mean and the expert-scaled Huber, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from memrl.nn.losses import huber_per_step, weighted_huber, weighted_mean


def _huber(d: float) -> float:
    """Huber with delta 1: 0.5 d^2 inside [-1, 1], |d| - 1/2 outside."""
    return 0.5 * d * d if abs(d) <= 1 else abs(d) - 0.5


def test_weighted_mean_divides_by_the_sum_of_the_weights():
    per_step = torch.tensor([1.0, 2.0, 4.0])
    assert weighted_mean(per_step).item() == pytest.approx(7 / 3)
    weights = torch.tensor([3.0, 1.0, 0.0])
    assert weighted_mean(per_step, weights).item() == pytest.approx((3 + 2) / 4)
    # weights summing to less than one are still a weighted average, not scaled down
    small = torch.tensor([0.25, 0.25, 0.0])
    assert weighted_mean(per_step, small).item() == pytest.approx(1.5)
    assert weighted_mean(per_step, torch.tensor([0.0, 0.0, 0.1])).item() == pytest.approx(4.0)


def test_a_bool_mask_is_the_mean_over_the_valid_steps_and_an_empty_mask_is_zero():
    per_step = torch.tensor([[1.0, 5.0], [3.0, 100.0]])  # (T, B), 100 is padding
    mask = torch.tensor([[True, True], [True, False]])
    assert weighted_mean(per_step, mask).item() == pytest.approx(3.0)
    empty = weighted_mean(per_step, torch.zeros(2, 2, dtype=torch.bool))
    assert empty.item() == 0.0  # no valid step: zero, not NaN


def test_weighted_mean_keeps_the_losses_dtype_whatever_the_weights_dtype():
    per_step = torch.tensor([1.0, 2.0], requires_grad=True)
    for weights in (torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([1, 3])):
        out = weighted_mean(per_step, weights)
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(7 / 4)
    half = weighted_mean(per_step.detach().half(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert half.dtype == torch.float16


def test_huber_per_step_over_time_and_batch_axes_is_the_hand_computation():
    # (T=2, B=4, 3) with B != 3 and T != B, so no axis can stand in for another
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 3, generator=generator) * 2
    target = torch.randn(2, 4, 3, generator=generator)
    expert = torch.randn(2, 4, 3, generator=generator)
    out = huber_per_step(prediction, target, expert)
    assert out.shape == (2, 4)
    for t in range(2):
        for b in range(4):
            diff = (prediction[t, b] - target[t, b]).tolist()
            norm = math.sqrt(sum(x * x for x in expert[t, b].tolist()))
            expected = sum(_huber(d) for d in diff) / 3 * (1 + 2 * norm)
            assert out[t, b].item() == pytest.approx(expected, rel=1e-5)


def test_huber_per_step_of_one_sample():
    out = huber_per_step(
        torch.tensor([0.5, -3.0, 0.0]), torch.zeros(3), torch.tensor([0.0, 0.6, 0.8])
    )
    assert out.shape == ()
    assert out.item() == pytest.approx((0.125 + 2.5) / 3 * 3)


def test_the_azimuth_wraps_only_when_asked_for_spherical_actions():
    # the last component differs by 2 pi - 0.2: the same direction up to 0.2
    prediction = torch.tensor([[0.0, 0.0, math.pi - 0.1]])
    target = torch.tensor([[0.0, 0.0, -math.pi + 0.1]])
    expert = torch.zeros(1, 3)
    cartesian = (2 * math.pi - 0.2 - 0.5) / 3
    spherical = 0.5 * 0.2**2 / 3
    assert huber_per_step(prediction, target, expert).item() == pytest.approx(cartesian)
    assert weighted_huber(prediction, target, expert).item() == pytest.approx(cartesian)
    wrapped = huber_per_step(prediction, target, expert, spherical=True)
    assert wrapped.item() == pytest.approx(spherical, rel=1e-4)
    assert weighted_huber(prediction, target, expert, spherical=True).item() == pytest.approx(
        spherical, rel=1e-4
    )


def test_spherical_wrapping_over_time_and_batch_axes_touches_only_the_azimuth():
    # (T=2, B=4, 3): radius and elevation differences are never wrapped, the azimuth always is
    prediction = torch.zeros(2, 4, 3)
    prediction[..., 0] = 4.0  # radius off by 4: not wrapped (4 - 2 pi would be smaller)
    prediction[..., 1] = torch.arange(8.0).view(2, 4) * 0.1
    prediction[..., 2] = 2 * math.pi + torch.arange(8.0).view(2, 4) * 0.1
    target = torch.zeros(2, 4, 3)
    expert = torch.zeros(2, 4, 3)
    expert[1, 2] = torch.tensor([0.0, 3.0, 4.0])
    out = huber_per_step(prediction, target, expert, spherical=True)
    assert out.shape == (2, 4)
    for t in range(2):
        for b in range(4):
            d = (4 * t + b) * 0.1
            scale = 11.0 if (t, b) == (1, 2) else 1.0
            expected = (3.5 + 2 * _huber(d)) / 3 * scale
            assert out[t, b].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    total = weighted_huber(prediction, target, expert, weights, spherical=True)
    assert total.item() == pytest.approx((out[0, 0] + out[1, 2]).item() / 2, rel=1e-5)
