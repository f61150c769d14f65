"""S4DCore: FFT, chunked scan and step agree (outputs, states, gradients), resets are exact, and
an independent complex recurrence written from the parameters gives the same numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memrl.cores import make_core
from memrl.cores.s4d import S4DCore
from memrl.cores.state import (
    cat_states,
    detach_state,
    select_state,
    state_to,
    zero_state_where,
)

TOL = {"rtol": 1e-8, "atol": 1e-8}
SETTINGS = settings(max_examples=40, deadline=None)
MODES_ALL = ("fft", "scan", "recurrent", "auto")


@st.composite
def configs(draw: st.DrawFn) -> dict:
    return {
        "input_size": draw(st.integers(1, 3)),
        "hidden_size": draw(st.integers(1, 4)),
        "num_layers": draw(st.integers(1, 2)),
        "state_size": 2 * draw(st.integers(1, 3)),
        "init": draw(st.sampled_from(["lin", "inv"])),
        "layer_norm": draw(st.booleans()),
        "chunk_size": draw(st.integers(1, 5)),
        "dt_max": draw(st.sampled_from([1e-1, 1.0])),
    }


def build(seed: int, **kwargs) -> S4DCore:
    torch.manual_seed(seed)
    return make_core("s4d", **kwargs).double()


def inputs(core: S4DCore, length: int, batch: int, seed: int, resets: float):
    """x (T, B, F), a random nonzero incoming state, is_first with P(reset) = resets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, batch, *core.feature_shape, generator=gen, dtype=torch.float64)
    state = tuple(
        torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in core.initial_state(batch)
    )
    is_first = torch.rand(length, batch, generator=gen) < resets
    return x, state, is_first


def run(core: S4DCore, x, state, is_first, mode: str):
    """Outputs, final state and gradients (inputs, incoming state, parameters) of one unroll."""
    x = x.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state)
    if mode == "naive":
        y, final = naive_reference(core, x, state, is_first)
        final = (final,)
    elif mode == "step":
        ys, carried = [], state
        for t in range(x.shape[0]):
            y_t, carried = core.step(x[t], carried, is_first[t])
            ys.append(y_t)
        y, final = torch.stack(ys), carried
    else:
        core.mode = mode
        y, final = core(x, state, is_first)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum() for s in final)
    grads = torch.autograd.grad(loss, [x, *state, *core.parameters()])
    return [y.detach(), *(s.detach() for s in final), *grads]


def assert_all_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"tensor {i}: {m}")


@SETTINGS
@given(
    config=configs(), length=st.integers(1, 12), batch=st.integers(1, 3), seed=st.integers(0, 999)
)
def test_fft_scan_step_agree_without_inner_resets(config, length, batch, seed) -> None:
    core = build(seed, **config)
    x, state, is_first = inputs(core, length, batch, seed, resets=0.0)
    is_first[0] = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) < 0.5
    want = run(core, x, state, is_first, "step")
    for mode in MODES_ALL:
        assert_all_close(run(core, x, state, is_first, mode), want)


@SETTINGS
@given(
    config=configs(),
    length=st.integers(1, 14),
    batch=st.integers(1, 3),
    seed=st.integers(0, 999),
    resets=st.sampled_from([0.1, 0.3, 0.7]),
)
def test_scan_matches_step_with_resets(config, length, batch, seed, resets) -> None:
    core = build(seed, **config)
    x, state, is_first = inputs(core, length, batch, seed, resets)
    want = run(core, x, state, is_first, "step")
    for mode in ("scan", "recurrent", "auto"):
        assert_all_close(run(core, x, state, is_first, mode), want)


def naive_reference(core: S4DCore, x, state, is_first):
    """x_t = Abar x_{t-1} + Bbar u_t per env, per feature, per mode, written from the parameters."""
    length, batch = is_first.shape
    h = core.encoder(x)
    finals = []
    for i, block in enumerate(core.blocks):
        dt = torch.exp(block.log_dt)
        a = -torch.exp(block.log_neg_a_real) + 1j * block.a_imag
        a_bar = torch.exp(dt[:, None] * a)
        b_bar = (a_bar - 1) / a * (block.b[..., 0] + 1j * block.b[..., 1])
        c = block.c[..., 0] + 1j * block.c[..., 1]
        out = torch.zeros_like(h)
        final = torch.zeros(state[0][:, i].shape, dtype=h.dtype)
        for b in range(batch):
            s = state[0][b, i, ..., 0] + 1j * state[0][b, i, ..., 1]
            for t in range(length):
                if is_first[t, b]:
                    s = 0 * s  # zero, kept in the graph (its gradient is then zero)
                s = a_bar * s + b_bar * h[t, b, :, None]
                ssm = 2 * (c * s).sum(-1).real + block.d * h[t, b]
                out[t, b] = h[t, b] + block.mix(F.gelu(ssm))
            final[b] = torch.stack([s.real, s.imag], -1)
        h = block.norm(out)
        finals.append(final)
    return h, torch.stack(finals, 1)


@settings(max_examples=25, deadline=None)
@given(
    config=configs(), length=st.integers(1, 10), batch=st.integers(1, 3), seed=st.integers(0, 999)
)
def test_matches_naive_reference(config, length, batch, seed) -> None:
    core = build(seed, **config)
    x, state, is_first = inputs(core, length, batch, seed, resets=0.25)
    want = run(core, x, state, is_first, "naive")
    for mode in ("scan", "recurrent", "auto") if is_first[1:].any() else MODES_ALL:
        assert_all_close(run(core, x, state, is_first, mode), want)


@SETTINGS
@given(config=configs(), length=st.integers(2, 12), seed=st.integers(0, 999))
def test_outputs_from_a_reset_equal_a_fresh_run(config, length, seed) -> None:
    core = build(seed, **config)
    x, state, _ = inputs(core, length, 2, seed, resets=0.0)
    start = seed % (length - 1) + 1
    is_first = torch.zeros(length, 2, dtype=torch.bool)
    is_first[start] = True
    fresh_first = torch.zeros(length - start, 2, dtype=torch.bool)
    with torch.no_grad():
        for mode in ("scan", "recurrent"):
            core.mode = mode
            y, (final,) = core(x, state, is_first)
            core.mode = "fft"
            y_fresh, (final_fresh,) = core(x[start:], core.initial_state(2), fresh_first)
            torch.testing.assert_close(y[start:], y_fresh, **TOL)
            torch.testing.assert_close(final, final_fresh, **TOL)


@pytest.mark.parametrize("mode", ["fft", "scan", "recurrent", "auto"])
def test_reset_at_step_zero_discards_incoming_state(mode: str) -> None:
    core = build(0, input_size=3, hidden_size=5, num_layers=2, state_size=8, chunk_size=4)
    x, state, _ = inputs(core, 9, 3, 0, resets=0.0)
    is_first = torch.zeros(9, 3, dtype=torch.bool)
    is_first[0] = True
    core.mode = mode
    with torch.no_grad():
        y, (final,) = core(x, state, is_first)
        y_zero, (final_zero,) = core(x, core.initial_state(3), is_first)
        y_kept, _ = core(x, state, torch.zeros_like(is_first))
    torch.testing.assert_close(y, y_zero, **TOL)
    torch.testing.assert_close(final, final_zero, **TOL)
    assert not torch.allclose(y, y_kept), "the incoming state should matter without a reset"


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_init_is_stable_and_follows_the_paper(init: str) -> None:
    n = 16
    core = build(0, input_size=2, hidden_size=6, num_layers=2, state_size=n, init=init)
    modes = torch.arange(n // 2, dtype=torch.float64)
    want_imag = math.pi * modes if init == "lin" else n / math.pi * (n / (2 * modes + 1) - 1)
    for block in core.blocks:
        a = block.a()
        dt_a, _, _ = block.discretize()
        assert (a.real < 0).all()
        assert (torch.exp(dt_a).abs() < 1).all()
        torch.testing.assert_close(a.real, torch.full_like(a.real, -0.5))
        torch.testing.assert_close(a.imag, want_imag.expand_as(a.imag))
        dt = torch.exp(block.log_dt)
        assert ((dt >= 1e-3 - 1e-12) & (dt <= 1e-1 + 1e-12)).all()


def test_auto_picks_fft_without_inner_resets_and_scan_with_them() -> None:
    core = build(1, input_size=2, hidden_size=3, state_size=4, chunk_size=3)
    x, state, is_first = inputs(core, 8, 2, 1, resets=0.0)
    with torch.no_grad():
        outs = {}
        for mode in ("auto", "fft", "scan"):
            core.mode = mode
            outs[mode] = core(x, state, is_first)[0]
        assert torch.equal(outs["auto"], outs["fft"])
        is_first[5, 1] = True
        for mode in ("auto", "scan"):
            core.mode = mode
            outs[mode] = core(x, state, is_first)[0]
        assert torch.equal(outs["auto"], outs["scan"])
        core.mode = "fft"
        with pytest.raises(ValueError, match="inside the sequence"):
            core(x, state, is_first)


def test_float32_long_sequence_fft_matches_scan() -> None:
    torch.manual_seed(0)
    core = make_core("s4d", input_size=4, hidden_size=8, state_size=16, chunk_size=16)
    x = torch.randn(300, 2, 4)
    state = tuple(torch.randn_like(s) for s in core.initial_state(2))
    is_first = torch.zeros(300, 2, dtype=torch.bool)
    with torch.no_grad():
        outs = []
        for mode in ("fft", "scan"):
            core.mode = mode
            outs.append(core(x, state, is_first))
    assert core.output_size == 8 and outs[0][0].shape == (300, 2, 8)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1][0], outs[1][1][0], rtol=1e-4, atol=1e-4)


def test_state_helpers_work_on_its_state() -> None:
    core = build(2, input_size=3, hidden_size=4, num_layers=2, state_size=6)
    x, state, is_first = inputs(core, 6, 4, 2, resets=0.2)
    assert state[0].shape == (4, 2, 4, 3, 2)
    with torch.no_grad():
        y, _ = core(x, state, is_first)
        rows = [1, 3]
        y_sub, (final_sub,) = core(x[:, rows], select_state(state, rows), is_first[:, rows])
        torch.testing.assert_close(y_sub, y[:, rows], **TOL)
        joined = cat_states([select_state(state, 0), select_state(state, slice(1, 4))])
        torch.testing.assert_close(joined[0], state[0])
    zeroed = zero_state_where(state, torch.tensor([True, False, True, False]))
    assert (zeroed[0][[0, 2]] == 0).all() and torch.equal(zeroed[0][1], state[0][1])
    moved = detach_state(state_to(state, "cpu"))
    assert torch.equal(moved[0], state[0]) and not moved[0].requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init": "legs"}, "unknown init 'legs'"),
        ({"state_size": 7}, "state_size must be a positive even int"),
        ({"state_size": 0}, "state_size must be a positive even int"),
        ({"mode": "conv"}, "unknown mode 'conv'"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min <= dt_max"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive int"),
    ],
)
def test_bad_options_fail_clearly(kwargs: dict, match: str) -> None:
    options = {"input_size": 2, "hidden_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_core("s4d", **options)


def test_bad_mode_assignment_fails_clearly() -> None:
    core = build(0, input_size=2, hidden_size=3, state_size=4)
    with pytest.raises(ValueError, match="unknown mode 'bogus'"):
        core.mode = "bogus"
