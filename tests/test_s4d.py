"""S4DCore: FFT, chunked scan and step agree (outputs, states, gradients), resets are exact, and
an independent complex recurrence written from the parameters gives the same numbers."""

from __future__ import annotations

import math
import re

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
        ({"init": "zoh"}, "^S4DCore: unknown init 'zoh'; expected one of lin, inv$"),
        ({"input_size": 0}, "^S4DCore: input_size must be a positive int, got 0$"),
        ({"dt_min": 0.0}, re.escape("need 0 < dt_min <= dt_max, got dt_min=0.0, dt_max=0.1")),
        ({"state_size": 7}, "state_size must be a positive even int"),
        ({"state_size": 0}, "state_size must be a positive even int"),
        ({"mode": "conv"}, "unknown mode 'conv'"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min <= dt_max"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive int"),
        ({"hidden_size": True}, "^S4DCore: hidden_size must be a positive int, got True$"),
        ({"state_size": True}, "state_size must be a positive even int"),
        ({"chunk_size": True}, "chunk_size must be a positive int, got True"),
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


def test_documented_defaults() -> None:
    """N = 64 (32 complex modes), S4D-Lin, dt in [1e-3, 1e-1], post-LayerNorm, mode auto, chunks
    of 32 steps, one block."""
    torch.manual_seed(0)
    core = make_core("s4d", input_size=2, hidden_size=3)
    assert core.state_shapes == ((1, 3, 32, 2),)
    assert (core.mode, core.chunk_size, len(core.blocks)) == ("auto", 32, 1)
    block = core.blocks[0]
    assert isinstance(block.norm, torch.nn.LayerNorm)
    torch.testing.assert_close(
        block.a_imag, (math.pi * torch.arange(32.0)).expand(3, 32), rtol=1e-6, atol=0
    )
    dt = torch.exp(block.log_dt)
    assert ((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6))).all()


@pytest.mark.parametrize(("dt_min", "dt_max"), [(1e-3, 1e-1), (0.02, 0.5)])
def test_init_log_dt_is_uniform_over_its_range(dt_min: float, dt_max: float) -> None:
    """log dt ~ U[log dt_min, log dt_max], one per feature: 400 draws stay inside the range and
    spread over it (nearly to both ends, mean near the middle)."""
    torch.manual_seed(1)
    core = make_core(
        "s4d", input_size=1, hidden_size=400, state_size=2, dt_min=dt_min, dt_max=dt_max
    )
    log_dt = core.blocks[0].log_dt.detach().double()
    assert log_dt.shape == (400,)
    frac = (log_dt - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))
    assert frac.min() >= -1e-6 and frac.max() <= 1 + 1e-6
    assert frac.min() < 0.02 and frac.max() > 0.98
    assert abs(frac.mean().item() - 0.5) < 0.05


def test_equal_dt_min_and_dt_max_fix_dt() -> None:
    core = make_core("s4d", input_size=1, hidden_size=5, state_size=2, dt_min=0.05, dt_max=0.05)
    torch.testing.assert_close(
        core.blocks[0].log_dt, torch.full((5,), math.log(0.05)), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    ("init", "want"),
    [
        ("lin", [0.0, math.pi, 2 * math.pi]),  # pi n
        ("inv", [30 / math.pi, 6 / math.pi, 6 / (5 * math.pi)]),  # N/pi (N/(2n+1) - 1), N = 6
    ],
)
def test_init_parameters_per_feature_and_mode(init: str, want: list) -> None:
    """N = 6, H = 4, by hand: A_n = -1/2 + i a_n for every feature, B = 1, each parameter one
    value per (feature, mode) or per feature."""
    core = build(0, input_size=2, hidden_size=4, state_size=6, init=init)
    block = core.blocks[0]
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    assert {k: v for k, v in shapes.items() if not k.startswith(("mix.", "norm."))} == {
        "log_dt": (4,),
        "log_neg_a_real": (4, 3),
        "a_imag": (4, 3),
        "b": (4, 3, 2),
        "c": (4, 3, 2),
        "d": (4,),
    }
    want_imag = torch.tensor(want, dtype=torch.float64).expand(4, 3)
    torch.testing.assert_close(block.a_imag.detach(), want_imag, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.a().real.detach(), torch.full((4, 3), -0.5).double())
    assert torch.equal(block.b[..., 0].detach(), torch.ones(4, 3, dtype=torch.float64))
    assert torch.equal(block.b[..., 1].detach(), torch.zeros(4, 3, dtype=torch.float64))


def test_init_c_is_standard_complex_normal_and_d_standard_normal() -> None:
    """C ~ CN(0, 1): real and imaginary parts each of variance 1/2, E|C|^2 = 1 (2048 draws);
    D ~ N(0, 1) (512 draws)."""
    torch.manual_seed(3)
    block = make_core("s4d", input_size=1, hidden_size=512, state_size=8).blocks[0]
    c = block.c.detach().double()
    assert c.shape == (512, 4, 2)
    power = (c**2).sum(-1)
    assert abs(power.mean().item() - 1) < 0.1
    for part in (c[..., 0], c[..., 1]):
        assert abs((part**2).mean().item() - 0.5) < 0.06
        assert abs(part.mean().item()) < 0.05
    d = block.d.detach().double()
    assert abs((d**2).mean().item() - 1) < 0.15


@pytest.mark.parametrize("layer_norm", [True, False])
def test_layer_norm_option_normalises_each_blocks_output(layer_norm: bool) -> None:
    """With the post-LayerNorm (fresh: scale 1, shift 0) every output step has mean 0 and
    variance 1 over the features; without it the output is u + Linear(GELU(y)), not normalised."""
    core = build(4, input_size=3, hidden_size=6, num_layers=2, layer_norm=layer_norm)
    assert all(isinstance(b.norm, torch.nn.LayerNorm) == layer_norm for b in core.blocks)
    x, state, is_first = inputs(core, 5, 2, 4, resets=0.3)
    with torch.no_grad():
        y, _ = core(x, state, is_first)
    mean, var = y.mean(-1), y.var(-1, unbiased=False)
    normalised = torch.allclose(mean, torch.zeros_like(mean), atol=1e-6) and torch.allclose(
        var, torch.ones_like(var), atol=1e-3
    )
    assert normalised == layer_norm


@pytest.mark.parametrize("mode", ["fft", "scan", "recurrent", "auto"])
@pytest.mark.parametrize(("steps", "batch"), [(0, 2), (3, 0), (1, 0)])
def test_an_empty_sequence_or_batch_has_empty_outputs_and_keeps_the_state(mode, steps, batch):
    """As the RNN cores: no time steps or no sequences is nothing to run, not an error (the FFT
    of an empty batch used to fail inside MKL)."""
    core = build(0, input_size=2, hidden_size=3, state_size=4, mode=mode)
    state = core.initial_state(batch, dtype=torch.float64)
    state = (torch.randn_like(state[0]),)
    x = torch.zeros(steps, batch, 2, dtype=torch.float64)
    y, final = core(x, state, torch.zeros(steps, batch, dtype=torch.bool))
    assert y.shape == (steps, batch, 3) and y.dtype == torch.float64
    assert torch.equal(final[0], state[0])


@pytest.mark.parametrize("mode", ["fft", "scan", "recurrent"])
def test_unroll_creates_its_tensors_on_the_input_device(mode: str) -> None:
    """Every tensor the three unrolls make goes on the input's device, not on the default device:
    with 'meta' as the default device a CPU unroll gives the same numbers (a tensor made on
    'meta' would meet CPU tensors and fail)."""
    core = build(5, input_size=2, hidden_size=3, num_layers=2, state_size=6, chunk_size=3)
    core.mode = mode
    x, state, is_first = inputs(core, 8, 3, 5, resets=0.0 if mode == "fft" else 0.3)
    want_y, (want_final,) = core(x, state, is_first)
    with torch.device("meta"):
        y, (final,) = core(x, state, is_first)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(final, want_final, rtol=0, atol=0)


def test_forced_fft_with_an_inner_reset_names_the_modes_that_can() -> None:
    core = build(1, input_size=2, hidden_size=3, state_size=4, mode="fft")
    x, state, is_first = inputs(core, 4, 2, 1, resets=0.0)
    is_first[2, 0] = True
    want = (
        "S4DCore: mode 'fft' cannot unroll a reset inside the sequence (is_first[1:] has True); "
        "use mode 'scan', 'recurrent' or 'auto'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        core(x, state, is_first)
