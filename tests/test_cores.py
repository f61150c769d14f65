"""Cores gru, lstm, none, conv_gru, conv_lstm: the unroll, the step loop and an independent
step-by-step reference (PyTorch's own cells, or the spatial-memory spec's concatenated-[h, x]
convolutions) agree on outputs, final states and gradients for random reset patterns; resets are
exact; the state helpers work on every core (s4d included); bad inputs fail with messages that
name them."""

from __future__ import annotations

import copy
import functools
import re
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memrl.cores import CORES, VectorCoreName, make_core, unroll_together
from memrl.cores.state import cat_states, detach_state, select_state, state_to, zero_state_where

TOL = {"rtol": 1e-8, "atol": 1e-8}
SETTINGS = settings(max_examples=100, deadline=None)
VECTOR = tuple(n for n in get_args(VectorCoreName) if n != "s4d")  # s4d: tests/test_s4d.py
CONV = ("conv_gru", "conv_lstm")


def build(name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    if name in CONV:
        kwargs = {"input_channels": 2, "hidden_channels": 3, "spatial_size": (4, 3)} | kwargs
    else:
        kwargs = {"input_size": 3, "hidden_size": 4} | kwargs
        if name == "s4d":
            kwargs.setdefault("state_size", 4)
    return make_core(name, **kwargs).double()


def inputs(core, length: int, batch: int, seed: int, p_reset: float):
    """x (T, B, *features), a random incoming state, is_first with P(reset) = p_reset."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, batch, *core.feature_shape, generator=gen, dtype=torch.float64)
    state = tuple(
        torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in core.initial_state(batch)
    )
    is_first = torch.rand(length, batch, generator=gen) < p_reset
    return x, state, is_first


def step_loop(core, x, state, is_first):
    ys = []
    for t in range(x.shape[0]):
        y, state = core.step(x[t], state, is_first[t])
        ys.append(y)
    return torch.stack(ys), state


def core_name(core) -> str:
    return next(n for n, cls in CORES.items() if type(core) is cls)


def reference(core, x, state, is_first):
    """Step-major loop over PyTorch's cells / the spec's equations, masking the state explicitly."""
    if core_name(core) == "none":
        for k in range(core.num_layers):
            lin = core.mlp[2 * k]
            x = torch.tanh(x @ lin.weight.t() + lin.bias)
        return x, ()
    keep = (~is_first).to(x.dtype)
    layers = [[s[:, k] for s in state] for k in range(core.num_layers)]
    ys = []
    for t in range(x.shape[0]):
        inp = x[t]
        for k in range(core.num_layers):
            mask = keep[t].view(-1, *[1] * (inp.dim() - 1))
            layers[k] = reference_cell(core, k, inp, [s * mask for s in layers[k]])
            inp = layers[k][0]
        ys.append(inp)
    n_state = len(core.state_shapes)
    return torch.stack(ys), tuple(
        torch.stack([lay[i] for lay in layers], 1) for i in range(n_state)
    )


def reference_cell(core, k, x, state):
    name = core_name(core)
    if name in ("gru", "lstm"):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        w_ih, w_hh, b_ih, b_hh = (getattr(core.rnn, f"{n}_l{k}") for n in names)
        if core.layer_norm:
            return layer_norm_cell(name, core.norms[k], x, state, w_ih, w_hh, b_ih, b_hh)
        if name == "gru":
            return [torch.gru_cell(x, state[0], w_ih, w_hh, b_ih, b_hh)]
        return list(torch.lstm_cell(x, tuple(state), w_ih, w_hh, b_ih, b_hh))
    K, x_conv = core.hidden_channels, core.x_convs[k]
    if name == "conv_gru":  # the spatial-memory spec: every gate is one convolution of [h, x]
        (h,) = state
        w_zr = torch.cat([core.h_convs_zr[k].weight, x_conv.weight[: 2 * K]], 1)
        zr = torch.sigmoid(
            F.conv2d(torch.cat([h, x], 1), w_zr, x_conv.bias[: 2 * K], padding="same")
        )
        z, r = zr[:, :K], zr[:, K:]
        w_n = torch.cat([core.h_convs_n[k].weight, x_conv.weight[2 * K :]], 1)
        hx = torch.cat([r * h, x], 1)
        h_tilde = torch.tanh(F.conv2d(hx, w_n, x_conv.bias[2 * K :], padding="same"))
        return [(1 - z) * h + z * h_tilde]
    h, c = state
    w = torch.cat([core.h_convs[k].weight, x_conv.weight], 1)
    i, f, g, o = F.conv2d(torch.cat([h, x], 1), w, x_conv.bias, padding="same").chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return [torch.sigmoid(o) * torch.tanh(c), c]


def layer_norm_cell(name, norm, x, state, w_ih, w_hh, b_ih, b_hh):
    def ln(v, mod):
        return F.layer_norm(v, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    H = w_hh.shape[1]
    xp, hp = ln(x @ w_ih.t(), norm["ih"]), ln(state[0] @ w_hh.t(), norm["hh"])
    if name == "lstm":
        i, f, g, o = (xp + hp + b_ih + b_hh).chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return [torch.sigmoid(o) * torch.tanh(ln(c, norm["c"])), c]
    xp, hp = xp + b_ih, hp + b_hh
    r = torch.sigmoid(xp[:, :H] + hp[:, :H])
    z = torch.sigmoid(xp[:, H : 2 * H] + hp[:, H : 2 * H])
    n = torch.tanh(xp[:, 2 * H :] + r * hp[:, 2 * H :])
    return [(1 - z) * n + z * state[0]]


def outputs_and_grads(core, x, state, is_first, unroll, seed: int = 0):
    """y, final state and the gradients of a random linear loss of both w.r.t. x, the incoming
    state and every parameter."""
    x = x.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state)
    y, final = unroll(core, x, state, is_first)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (y, *final)]
    loss = sum((t * w.to(t.dtype)).sum() for t, w in zip((y, *final), weights, strict=True))
    wrt = [x, *state, *core.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return [y, *final, *grads]


def assert_all_close(got, want, what: str):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"{what}, tensor {i}: {m}")


def unroll_forward(core, x, state, is_first):
    return core(x, state, is_first)


def unroll_cudnn_logic(core, x, state, is_first):
    """The CUDA path (plain call, or every segment as one packed sequence), run on CPU."""
    return core._unroll_cudnn(x, state, is_first)


@st.composite
def cases(draw: st.DrawFn, names: tuple[str, ...]):
    name = draw(st.sampled_from(names))
    kwargs = {"num_layers": draw(st.integers(1, 2))}
    if name in CONV:
        kwargs |= {
            "input_channels": draw(st.integers(1, 2)),
            "hidden_channels": draw(st.integers(1, 3)),
            "spatial_size": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
            "kernel_size": draw(st.sampled_from([1, 3])),
        }
    else:
        kwargs |= {"input_size": draw(st.integers(1, 4)), "hidden_size": draw(st.integers(1, 5))}
        if name in ("gru", "lstm"):
            kwargs["layer_norm"] = draw(st.booleans())
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 4)))  # (T, B)
    return name, kwargs, shape, draw(st.sampled_from([0.0, 0.3, 0.7])), draw(st.integers(0, 2**16))


@SETTINGS
@given(cases(("gru", "lstm", "none")))
def test_vector_unroll_matches_step_loop_and_reference(case):
    check_unroll(*case)


@settings(max_examples=40, deadline=None)
@given(cases(CONV))
def test_conv_unroll_matches_step_loop_and_reference(case):
    check_unroll(*case)


def check_unroll(name, kwargs, shape, p_reset, seed):
    core = build(name, seed, **kwargs)
    x, state, is_first = inputs(core, *shape, seed, p_reset)
    want = outputs_and_grads(core, x, state, is_first, reference)
    got = outputs_and_grads(core, x, state, is_first, unroll_forward)
    assert_all_close(got, want, f"{name} unroll vs reference")
    got = outputs_and_grads(core, x, state, is_first, step_loop)
    assert_all_close(got, want, f"{name} step loop vs reference")


@SETTINGS
@given(cases(("gru", "lstm")))
def test_cuda_path_logic_matches_reference_on_cpu(case):
    name, kwargs, shape, p_reset, seed = case
    core = build(name, seed, **(kwargs | {"layer_norm": False}))
    x, state, is_first = inputs(core, *shape, seed, p_reset)
    want = outputs_and_grads(core, x, state, is_first, reference)
    got = outputs_and_grads(core, x, state, is_first, unroll_cudnn_logic)
    assert_all_close(got, want, f"{name} packed/cuDNN path vs reference")


@SETTINGS
@given(cases(("gru", "lstm", "none")), st.sampled_from(["same kind", "s4d"]))
def test_unroll_together_equals_each_core_alone(case, partner):
    """Two cores over the same resets (an actor's and a critic's memory): the fused group (two
    GRUs or LSTMs of one shape on the CPU) or the one-after-another fallback (any other pair)
    gives each core's own outputs, final state and gradients."""
    name, kwargs, shape, p_reset, seed = case
    second = (
        build(name, seed + 1, **kwargs)
        if partner == "same kind"
        else build("s4d", seed + 1, input_size=kwargs["input_size"], hidden_size=3)
    )
    cores = [build(name, seed, **kwargs), second]
    runs = [inputs(core, *shape, seed + i, p_reset) for i, core in enumerate(cores)]
    is_first = runs[0][2]
    leaves = [
        (x.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in state))
        for x, state, _ in runs
    ]

    def loss_and_grads(outputs):
        gen = torch.Generator().manual_seed(seed)
        flat = [t for y, final in outputs for t in (y, *final)]
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in flat)
        wrt = [t for x, state in leaves for t in (x, *state)]
        wrt += [p for core in cores for p in core.parameters()]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        return [*flat, *grads]

    alone = [core(x, state, is_first) for core, (x, state) in zip(cores, leaves, strict=True)]
    together = unroll_together(cores, [x for x, _ in leaves], [s for _, s in leaves], is_first)
    assert_all_close(loss_and_grads(together), loss_and_grads(alone), f"{name} + {partner}")


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("together", [False, True])
def test_accumulated_grads_are_separate_tensors(name, together):
    """Every parameter's ``.grad`` after ``backward`` is its own tensor: an in-place
    gradient-norm clip scales each exactly once (LSTM: b_ih and b_hh have equal gradients)."""
    cores = [build(name, seed, num_layers=2) for seed in (0, 1)]
    x, state, is_first = inputs(cores[0], 5, 3, 0, 0.3)
    params = [p for core in cores for p in core.parameters()]

    def loss():
        outputs = (
            unroll_together(cores, [x, x], [state, state], is_first)
            if together
            else [core(x, state, is_first) for core in cores]
        )
        return sum((y * torch.arange(y.shape[-1])).sum() for y, _ in outputs)

    want = torch.autograd.grad(loss(), params)
    loss().backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    scale = 1e-3 / (torch.linalg.vector_norm(torch.stack([g.norm() for g in want])) + 1e-6)
    for p, g in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, g * scale, **TOL)


def test_unroll_together_checks_its_inputs():
    cores = [build("lstm", 0), build("lstm", 1)]
    x, state, is_first = inputs(cores[0], 4, 2, 0, 0.3)
    with pytest.raises(ValueError, match="2 cores, 1 inputs and 2 states"):
        unroll_together(cores, [x], [state, state], is_first)
    with pytest.raises(ValueError, match=re.escape("x must have shape (T, B, 3), got (4, 2, 5)")):
        unroll_together(cores, [x, x.new_zeros(4, 2, 5)], [state, state], is_first)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_fused_unroll_matches_torch_kernel_without_resets(name):
    core = build(name, 0, input_size=5, hidden_size=6, num_layers=2).float()
    x, _, _ = inputs(core, 9, 3, 0, 0.0)
    x = x.float()
    y, final = core(x, core.initial_state(3), torch.zeros(9, 3, dtype=torch.bool))
    y_torch, final_torch = core.rnn(x)
    final_torch = final_torch if name == "lstm" else (final_torch,)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-6)
    for s, s_torch in zip(final, final_torch, strict=True):
        torch.testing.assert_close(s, s_torch.transpose(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_float32_fast_path_matches_float64_reference(name):
    """The float32 CPU path against the float64 reference: outputs, final state and all
    gradients."""
    core = build(name, 6, input_size=5, hidden_size=16, num_layers=2)
    x, state, is_first = inputs(core, 20, 8, 6, 0.2)
    want = outputs_and_grads(core, x, state, is_first, reference)
    core32 = copy.deepcopy(core).float()
    got = outputs_and_grads(
        core32, x.float(), tuple(s.float() for s in state), is_first, unroll_forward
    )
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(
            a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"{i}: {m}"
        )


ALL = (*VECTOR, *CONV)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ALL), st.integers(1, 5), st.integers(0, 2**16), st.booleans())
def test_reset_step_starts_fresh(name, t0, seed, layer_norm):
    kwargs = {"num_layers": 2} | ({"layer_norm": layer_norm} if name in ("gru", "lstm") else {})
    core = build(name, seed, **kwargs)
    x, state, is_first = inputs(core, 6, 3, seed, 0.3)
    is_first[t0] = True
    y, final = core(x, state, is_first)
    y_fresh, final_fresh = core(x[t0:], core.initial_state(3), is_first[t0:])
    torch.testing.assert_close(y[t0:], y_fresh, **TOL)
    assert_all_close(final, final_fresh, f"{name} final state")


@pytest.mark.parametrize("name", ALL)
def test_reset_at_step_zero_discards_incoming_state(name):
    core = build(name, 1, num_layers=2)
    x, state, is_first = inputs(core, 5, 3, 1, 0.3)
    is_first[0] = True
    state = tuple(s.requires_grad_() for s in state)
    y, final = core(x, state, is_first)
    y_zero, final_zero = core(x, core.initial_state(3), is_first)
    torch.testing.assert_close(y, y_zero, **TOL)
    assert_all_close(final, final_zero, f"{name} final state")
    if state:
        grads = torch.autograd.grad(y.sum(), state, allow_unused=True, materialize_grads=True)
        assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("name", ["lstm", "conv_lstm"])
def test_lstm_output_is_last_layer_h(name):
    core = build(name, 2, num_layers=3)
    x, state, is_first = inputs(core, 4, 2, 2, 0.3)
    y, (h, c) = core(x, state, is_first)
    torch.testing.assert_close(y[-1], h[:, -1], rtol=0, atol=0)
    assert not torch.allclose(h, c)


def test_recurrent_init_orthogonal_and_forget_bias_one():
    for name, gates in (("lstm", 4), ("gru", 3)):
        core = build(name, 3, input_size=3, hidden_size=6, num_layers=2)
        for k in range(2):
            for block in core.rnn.get_parameter(f"weight_hh_l{k}").split(6):
                torch.testing.assert_close(
                    block @ block.t(), torch.eye(6, dtype=block.dtype), atol=1e-6, rtol=0
                )
            bias = core.rnn.get_parameter(f"bias_ih_l{k}") + core.rnn.get_parameter(f"bias_hh_l{k}")
            want = torch.zeros(gates * 6, dtype=bias.dtype)
            if name == "lstm":
                want[6:12] = 1.0
            torch.testing.assert_close(bias, want)


def test_recurrent_init_pytorch_is_torchs_own():
    """``init="pytorch"``: every weight and bias as ``nn.LSTM``/``nn.GRU`` draws them (the draw
    that ``reset_parameters`` repeats after the constructor's)."""
    for name, cls in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)):
        torch.manual_seed(5)
        core = make_core(name, input_size=3, hidden_size=6, num_layers=2, init="pytorch")
        torch.manual_seed(5)
        ref = cls(3, 6, 2)
        ref.reset_parameters()
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(core.rnn.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LSTMCore: unknown init 'xavier'.*orthogonal, pytorch"):
        make_core("lstm", input_size=3, hidden_size=6, init="xavier")


@pytest.mark.parametrize("init", ["orthogonal", "pytorch"])
def test_recurrent_reset_parameters_redraws_every_parameter(init):
    """``reset_parameters`` re-draws input weights and layer norms too, not only the recurrent
    weights and biases; the constructor's orthogonal init keeps ``nn.LSTM``'s input weights
    (one draw, so a seed's weights stay what they were)."""
    torch.manual_seed(3)
    core = make_core("lstm", input_size=3, hidden_size=6, num_layers=2, layer_norm=True, init=init)
    torch.manual_seed(3)
    ref = torch.nn.LSTM(3, 6, 2)
    if init == "pytorch":
        ref.reset_parameters()
    torch.testing.assert_close(core.rnn.weight_ih_l0, ref.weight_ih_l0, rtol=0, atol=0)
    with torch.no_grad():
        for p in core.parameters():
            p.fill_(7.0)
    core.reset_parameters()
    for name, p in core.named_parameters():
        assert (p != 7.0).all(), name
    for k in range(2):
        assert core.rnn.get_parameter(f"weight_ih_l{k}").abs().max() <= 6**-0.5
        block = core.rnn.get_parameter(f"weight_hh_l{k}")[:6]
        orthogonal = torch.allclose(block @ block.t(), torch.eye(6), atol=1e-6)
        assert orthogonal == (init == "orthogonal")
    for norm in core.norms[0].values():
        torch.testing.assert_close(norm.weight, torch.ones_like(norm.weight))


@pytest.mark.parametrize("name", [*ALL, "s4d"])
def test_state_helpers_work_on_every_core(name):
    core = build(name, 4)
    x, state, is_first = inputs(core, 4, 5, 4, 0.3)
    y, final = core(x, state, is_first)
    idx = torch.tensor([3, 0])
    y_sel, final_sel = core(x[:, idx], select_state(state, idx), is_first[:, idx])
    torch.testing.assert_close(y_sel, y[:, idx], **TOL)
    assert_all_close(final_sel, select_state(final, idx), f"{name} select_state")
    assert_all_close(select_state(state, 2), select_state(state, slice(2, 3)), "int index")
    assert_all_close(
        cat_states([select_state(state, slice(0, 2)), select_state(state, slice(2, 5))]),
        state,
        "cat",
    )
    moved = state_to(detach_state(tuple(s.requires_grad_() for s in state)), "cpu")
    assert all(not s.requires_grad for s in moved)
    assert_all_close(moved, state, f"{name} detach_state/state_to")
    mask = torch.tensor([True, False, True, False, False])
    no_reset = torch.zeros(5, dtype=torch.bool)
    y_masked, after_masked = core.step(x[0], zero_state_where(state, mask), no_reset)
    y_reset, after_reset = core.step(x[0], state, mask)
    torch.testing.assert_close(y_masked, y_reset, **TOL)
    assert_all_close(after_masked, after_reset, f"{name} zero_state_where")
    if not core.state_shapes:
        assert core.initial_state(5) == ()


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_fail_with_clear_messages(name):
    core = build(name, 5)
    x, state, is_first = inputs(core, 3, 2, 5, 0.3)
    bad_x = x[..., :-1] if name in VECTOR else x[:, :, :1, :2]
    with pytest.raises(
        ValueError, match=r"x must have shape .*got " + re.escape(str(tuple(bad_x.shape)))
    ):
        core(bad_x, state, is_first)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        core(x.tolist(), state, is_first)
    with pytest.raises(TypeError, match="is_first must be a bool tensor.*float"):
        core(x, state, is_first.double())
    with pytest.raises(ValueError, match=r"is_first must have shape \(3, 2\).*\(2, 3\)"):
        core(x, state, is_first.t())
    with pytest.raises(TypeError, match="float32"):
        core(x.float(), tuple(s.float() for s in state), is_first)
    if state:
        bad = state[0][:1]
        with pytest.raises(
            ValueError,
            match=r"state\[0\] must have shape .*got " + re.escape(str(tuple(bad.shape))),
        ):
            core(x, (bad, *state[1:]), is_first)
        with pytest.raises(ValueError, match=r"state\[0\] is torch.float32"):
            core(x, (state[0].float(), *state[1:]), is_first)
    with pytest.raises(ValueError, match="state must be a tuple of"):
        core(x, (*state, state[0] if state else x), is_first)


def test_make_core_errors_name_the_bad_value():
    with pytest.raises(
        ValueError,
        match="'transformer'.*linear_attention, lru, ffm, mamba, gtrxl, conv_gru",
    ):
        make_core("transformer", input_size=2, hidden_size=3)
    with pytest.raises(TypeError, match="make_core\\('gru'.*hidden_size"):
        make_core("gru", input_size=2)
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        make_core("lstm", input_size=2, hidden_size=0)
    with pytest.raises(ValueError, match="spatial_size.*got \\(4, 0\\)"):
        make_core("conv_gru", input_channels=2, hidden_channels=3, spatial_size=(4, 0))


# -- the conv cores' gate hook ---------------------------------------------------------------------
def scale_shift_hook(core, T: int, B: int, seed: int):
    """A GateHook scaling and shifting every gate pre-activation by its own random (t, b,
    channel) factors, the layers' gates side by side as in FiLM."""
    gen = torch.Generator().manual_seed(seed)
    width = core.gate_channels
    shape = (T, B, core.num_layers * width, 1, 1)
    scale = 1 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    shift = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)

    def hook(pre, layer, t, gates):
        lo, hi = layer * width + gates.start, layer * width + gates.stop
        return scale[t, :, lo:hi] * pre + shift[t, :, lo:hi]

    return hook


def hooked_reference(core, x, state, is_first, hook):
    """The spec's concatenated-[h, x] equations, step-major, the hook between each gate's
    convolution and its nonlinearity."""
    K = core.hidden_channels
    keep = (~is_first).to(x.dtype)
    layers = [[s[:, k] for s in state] for k in range(core.num_layers)]
    ys = []
    for t in range(x.shape[0]):
        inp = x[t]
        for k in range(core.num_layers):
            h, *c = (s * keep[t].view(-1, 1, 1, 1) for s in layers[k])
            x_conv, hx = core.x_convs[k], torch.cat([h, inp], 1)
            if core_name(core) == "conv_gru":
                w_zr = torch.cat([core.h_convs_zr[k].weight, x_conv.weight[: 2 * K]], 1)
                zr = F.conv2d(hx, w_zr, x_conv.bias[: 2 * K], padding="same")
                z, r = torch.sigmoid(hook(zr, k, t, slice(0, 2 * K))).chunk(2, 1)
                w_n = torch.cat([core.h_convs_n[k].weight, x_conv.weight[2 * K :]], 1)
                n = F.conv2d(torch.cat([r * h, inp], 1), w_n, x_conv.bias[2 * K :], padding="same")
                layers[k] = [(1 - z) * h + z * torch.tanh(hook(n, k, t, slice(2 * K, 3 * K)))]
            else:
                w = torch.cat([core.h_convs[k].weight, x_conv.weight], 1)
                pre = hook(F.conv2d(hx, w, x_conv.bias, padding="same"), k, t, slice(0, 4 * K))
                i, f, g, o = pre.chunk(4, 1)
                c = torch.sigmoid(f) * c[0] + torch.sigmoid(i) * torch.tanh(g)
                layers[k] = [torch.sigmoid(o) * torch.tanh(c), c]
            inp = layers[k][0]
        ys.append(inp)
    return torch.stack(ys), tuple(
        torch.stack([lay[i] for lay in layers], 1) for i in range(len(core.state_shapes))
    )


@settings(max_examples=25, deadline=None)
@given(cases(CONV))
def test_conv_gate_hook_unroll_matches_step_loop_and_reference(case):
    """The hook acts on the gate pre-activations; the fast unroll (x half of every convolution
    over all steps at once), the step loop and the reference agree with it, resets included."""
    name, kwargs, (T, B), p_reset, seed = case
    core = build(name, seed, **kwargs)
    x, state, is_first = inputs(core, T, B, seed, p_reset)
    hook = scale_shift_hook(core, T, B, seed)

    def stepped(core, x, state, is_first):
        ys = []
        for t in range(x.shape[0]):  # core.step calls its hook with t = 0: pass step t's
            y, state = core.step(x[t], state, is_first[t], gate_hook=functools.partial(at, t))
            ys.append(y)
        return torch.stack(ys), state

    def at(t, pre, layer, _, gates):
        return hook(pre, layer, t, gates)

    want = outputs_and_grads(core, x, state, is_first, lambda *a: hooked_reference(*a, hook=hook))
    got = outputs_and_grads(core, x, state, is_first, lambda c, *a: c(*a, gate_hook=hook))
    assert_all_close(got, want, f"{name} hooked unroll vs reference")
    assert_all_close(outputs_and_grads(core, x, state, is_first, stepped), want, "step loop")


@pytest.mark.parametrize("name", CONV)
def test_conv_identity_gate_hook_is_the_plain_core_and_calls_are_as_documented(name):
    core = build(name, 0, num_layers=2)
    x, state, is_first = inputs(core, 3, 2, 0, 0.3)
    calls = []

    def identity(pre, layer, t, gates):
        calls.append((layer, t, gates.start, gates.stop, pre.shape[1]))
        return pre

    y, final = core(x, state, is_first, gate_hook=identity)
    plain_y, plain_final = core(x, state, is_first)
    assert torch.equal(y, plain_y) and all(map(torch.equal, final, plain_final))
    K = core.hidden_channels
    per_step = [(0, 2 * K), (2 * K, 3 * K)] if name == "conv_gru" else [(0, 4 * K)]
    assert core.gate_channels == per_step[-1][1]
    # layer by layer, each over the whole sequence (the x half of a layer runs once)
    assert calls == [
        (k, t, lo, hi, hi - lo) for k in range(2) for t in range(3) for lo, hi in per_step
    ]
    calls.clear()
    core.step(x[0], state, is_first[0], gate_hook=identity)
    assert {t for _, t, *_ in calls} == {0}


# -- state helpers on states of several tensors of several ranks -----------------------------------
def ragged_state(batch: int, seed: int = 0):
    """A state of three tensors of ranks 1, 3 and 5, batch first: on these, dimension arguments
    that coincide for 2-D tensors (0 and -2, 1 and -1) pick different dimensions."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch,), (batch, 2, 3), (batch, 2, 1, 3, 2)]
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes)


@pytest.mark.parametrize(
    ("index", "rows"),
    [
        (2, [2]),
        ([3, 0], [3, 0]),
        (torch.tensor([1, 1, 4]), [1, 1, 4]),
        (slice(1, 4), [1, 2, 3]),
        (torch.tensor([True, False, False, True, True]), [0, 3, 4]),
    ],
)
def test_select_state_takes_the_same_rows_of_every_tensor(index, rows):
    state = ragged_state(5)
    selected = select_state(state, index)
    assert len(selected) == len(state)
    for s, sel in zip(state, selected, strict=True):
        torch.testing.assert_close(sel, torch.stack([s[r] for r in rows]), rtol=0, atol=0)


def test_cat_states_joins_batches_in_order_and_checks_its_input():
    state = ragged_state(6)
    parts = [tuple(s[lo:hi] for s in state) for lo, hi in ((0, 1), (1, 4), (4, 6))]
    joined = cat_states(parts)
    assert len(joined) == len(state)
    for s, j in zip(state, joined, strict=True):
        assert j.shape == s.shape
        torch.testing.assert_close(j, s, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^cat_states needs at least one state$"):
        cat_states([])
    with pytest.raises(
        ValueError, match=re.escape("cat_states: states have different lengths [3, 2]")
    ):
        cat_states([state, state[:2]])


def test_detach_state_cuts_the_graph_and_keeps_the_values():
    leaves = tuple(s.requires_grad_() for s in ragged_state(3))
    state = tuple(2 * s for s in leaves)
    detached = detach_state(state)
    assert len(detached) == len(state)
    for leaf, d in zip(leaves, detached, strict=True):
        assert d.grad_fn is None and not d.requires_grad
        torch.testing.assert_close(d, 2 * leaf.detach(), rtol=0, atol=0)


def test_state_to_moves_every_tensor():
    state = ragged_state(3)
    moved = state_to(state, torch.device("meta"))
    assert [s.device.type for s in moved] == ["meta"] * len(state)
    assert [(s.shape, s.dtype) for s in moved] == [(s.shape, s.dtype) for s in state]
    back = state_to(state, "cpu")
    assert [s.device.type for s in back] == ["cpu"] * len(state)
    assert_all_close(back, state, "state_to cpu")


def test_zero_state_where_zeroes_the_masked_rows_of_every_tensor():
    state = ragged_state(4)
    before = tuple(s.clone() for s in state)
    mask = torch.tensor([False, True, False, True])
    zeroed = zero_state_where(state, mask)
    assert len(zeroed) == len(state)
    for s, z in zip(state, zeroed, strict=True):
        assert z.shape == s.shape
        for b in range(4):
            want = torch.zeros_like(s[b]) if mask[b] else s[b]
            torch.testing.assert_close(z[b], want, rtol=0, atol=0)
    assert_all_close(state, before, "the input state is left as it was")
    assert zero_state_where((), torch.tensor([True, False])) == ()


def test_zero_state_where_rejects_a_mask_of_the_wrong_shape():
    state = (torch.ones(4, 2),)
    for mask in (torch.ones(4, 1), torch.ones(3), torch.ones(()), torch.ones(1, 4)):
        want = f"zero_state_where: mask must have shape (B,) = (4,), got {tuple(mask.shape)}"
        with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
            zero_state_where(state, mask.bool())
    with pytest.raises(ValueError, match=re.escape("(B,) = (?,), got (2, 1)")):
        zero_state_where((), torch.ones(2, 1, dtype=torch.bool))


# -- sizes, defaults and initialisation ------------------------------------------------------------
SIZE_OPTIONS = [
    *((name, option) for name in VECTOR for option in ("input_size", "hidden_size", "num_layers")),
    *(
        (name, option)
        for name in CONV
        for option in ("input_channels", "hidden_channels", "kernel_size", "num_layers")
    ),
]


@pytest.mark.parametrize(("name", "option"), SIZE_OPTIONS)
@pytest.mark.parametrize("value", [0, True, 2.5])
def test_every_size_must_be_a_positive_int(name, option, value):
    """Zero, a bool and a float are each refused with the option's name (``True`` is an int to
    Python but not a size)."""
    if name in CONV:
        kwargs = {"input_channels": 2, "hidden_channels": 3, "spatial_size": 4}
    else:
        kwargs = {"input_size": 3, "hidden_size": 4}
    with pytest.raises(
        ValueError, match=f"^{re.escape(f'{option} must be a positive int, got {value!r}')}$"
    ):
        make_core(name, **(kwargs | {option: value}))


def test_documented_defaults():
    """One layer everywhere; GRU/LSTM without layer norm and with the orthogonal init; conv cores
    with 3x3 kernels; an int spatial size means a square map."""
    none = make_core("none", input_size=3, hidden_size=4)
    assert none.num_layers == 1 and len(none.mlp) == 2
    for name, n_state in (("gru", 1), ("lstm", 2)):
        core = make_core(name, input_size=3, hidden_size=4)
        assert (core.num_layers, core.rnn.num_layers, core.layer_norm, core.init) == (
            1,
            1,
            False,
            "orthogonal",
        )
        assert core.state_shapes == ((1, 4),) * n_state and len(core.norms) == 0
    for name, n_state in (("conv_gru", 1), ("conv_lstm", 2)):
        core = make_core(name, input_channels=2, hidden_channels=3, spatial_size=5)
        assert core.kernel_size == 3 and core.num_layers == 1 and len(core.x_convs) == 1
        assert core.x_convs[0].kernel_size == (3, 3)
        assert core.feature_shape == (2, 5, 5) and core.output_shape == (3, 5, 5)
        assert core.state_shapes == ((1, 3, 5, 5),) * n_state
        y, _ = core(torch.zeros(2, 1, 2, 5, 5), core.initial_state(1), torch.ones(2, 1).bool())
        assert y.shape == (2, 1, 3, 5, 5)
    rect = make_core("conv_gru", input_channels=2, hidden_channels=3, spatial_size=(4, 6))
    assert rect.output_shape == (3, 4, 6) and rect.state_shapes == ((1, 3, 4, 6),)


def test_orthogonal_init_zero_biases_but_the_lstm_forget_gate_input_bias_is_one():
    """Per layer: every (H, H) block of the recurrent weight orthogonal, bias_hh zero, bias_ih
    zero except the LSTM's forget gate (gate order i, f, g, o) at 1."""
    H = 5
    for name, gates in (("lstm", 4), ("gru", 3)):
        core = build(name, 7, input_size=3, hidden_size=H, num_layers=2)
        for k in range(2):
            w_hh = core.rnn.get_parameter(f"weight_hh_l{k}")
            assert w_hh.shape == (gates * H, H)
            for g in range(gates):
                block = w_hh[g * H : (g + 1) * H]
                eye = torch.eye(H, dtype=block.dtype)
                torch.testing.assert_close(block @ block.t(), eye, atol=1e-6, rtol=0)
            want_ih = torch.zeros(gates * H, dtype=torch.float64)
            if name == "lstm":
                want_ih[H : 2 * H] = 1.0
            torch.testing.assert_close(core.rnn.get_parameter(f"bias_ih_l{k}"), want_ih)
            torch.testing.assert_close(
                core.rnn.get_parameter(f"bias_hh_l{k}"), torch.zeros_like(want_ih)
            )


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_pytorch_init_is_uniform_within_one_over_sqrt_hidden(name):
    """``init="pytorch"``: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)); with this many
    draws each tensor reaches near both ends and none is orthogonal."""
    torch.manual_seed(11)
    H = 16
    core = make_core(name, input_size=3, hidden_size=H, num_layers=2, init="pytorch")
    bound = H**-0.5
    for pname, p in core.rnn.named_parameters():
        assert p.abs().max() <= bound, pname
        assert p.max() > 0.8 * bound and p.min() < -0.8 * bound, pname
    block = core.rnn.weight_hh_l0[:H]
    assert not torch.allclose(block @ block.t(), torch.eye(H), atol=1e-2)


def test_conv_lstm_forget_gate_bias_is_one_and_the_others_keep_conv2ds_default():
    """Gate order (i, f, g, o): the f block of every layer's x-convolution bias is 1; i, g and o
    keep ``nn.Conv2d``'s U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the h convolutions have no bias."""
    torch.manual_seed(2)
    K = 4
    core = make_core("conv_lstm", input_channels=2, hidden_channels=K, spatial_size=3, num_layers=2)
    for k, conv in enumerate(core.x_convs):
        bound = ((2 if k == 0 else K) * 9) ** -0.5
        bias = conv.bias.detach()
        assert bias.shape == (4 * K,)
        assert torch.equal(bias[K : 2 * K], torch.ones(K))
        others = torch.cat([bias[:K], bias[2 * K :]])
        assert (others.abs() <= bound).all()
        assert core.h_convs[k].bias is None
    gru = make_core("conv_gru", input_channels=2, hidden_channels=K, spatial_size=3)
    assert (gru.x_convs[0].bias.abs() <= (2 * 9) ** -0.5).all()


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_layer_norm_option_normalises_the_pre_activations(name):
    """``layer_norm=True``: the unroll follows the layer-norm equations (the input and recurrent
    pre-activations normalised without a shift of their own, the biases added after; the LSTM's
    cell normalised with scale and shift), not the plain cell's."""
    core = build(name, 4, hidden_size=6, num_layers=2, layer_norm=True)
    assert core.layer_norm is True
    norm_params = sorted(n for n, _ in core.named_parameters() if n.startswith("norms."))
    per_layer = ["hh.weight", "ih.weight"] + (["c.bias", "c.weight"] if name == "lstm" else [])
    assert norm_params == sorted(f"norms.{k}.{p}" for k in range(2) for p in per_layer)
    with torch.no_grad():  # scales and shifts away from 1 and 0, so each one counts
        for p in core.norms.parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, dtype=p.dtype))
    x, state, is_first = inputs(core, 5, 3, 4, 0.3)
    is_first[2, 1] = True
    keep = (~is_first).to(x.dtype)
    layers = [[s[:, k] for s in state] for k in range(2)]
    ys = []
    for t in range(5):
        inp = x[t]
        for k in range(2):
            names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            params = [core.rnn.get_parameter(f"{n}_l{k}") for n in names]
            masked = [s * keep[t, :, None] for s in layers[k]]
            layers[k] = layer_norm_cell(name, core.norms[k], inp, masked, *params)
            inp = layers[k][0]
        ys.append(inp)
    y, final = core(x, state, is_first)
    torch.testing.assert_close(y, torch.stack(ys), **TOL)
    for i, s in enumerate(final):
        torch.testing.assert_close(s, torch.stack([lay[i] for lay in layers], 1), **TOL)


# -- empty sequences, wide conv gates, groups, other dtypes, the device of created tensors --------
@pytest.mark.parametrize("name", ALL)
def test_an_empty_sequence_has_no_outputs_and_keeps_the_state(name):
    core = build(name, 0, num_layers=2)
    _, state, _ = inputs(core, 1, 2, 0, 0.0)
    x = torch.zeros(0, 2, *core.feature_shape, dtype=torch.float64)
    y, final = core(x, state, torch.zeros(0, 2, dtype=torch.bool))
    assert y.shape == (0, 2, *core.output_shape) and y.dtype == torch.float64
    assert_all_close(final, state, f"{name} state after no step")


def test_conv_lstm_with_many_channels_matches_the_reference():
    """Five or more hidden channels (the gate split must be by blocks of K, not by size)."""
    for K in (5, 6):
        check_unroll("conv_lstm", {"hidden_channels": K, "spatial_size": (2, 3)}, (3, 2), 0.3, K)


def group_outputs_and_grads(cores, runs, is_first, unroll, seed=0):
    """Outputs, final states and the gradients (inputs, states, parameters) of a random linear
    loss over every core's outputs; ``unroll(cores, xs, states, is_first)`` -> [(y, final)]."""
    leaves = [
        (x.clone().requires_grad_(), [s.clone().requires_grad_() for s in st]) for x, st in runs
    ]
    outputs = unroll(cores, [x for x, _ in leaves], [tuple(s) for _, s in leaves], is_first)
    gen = torch.Generator().manual_seed(seed)
    flat = [t for y, final in outputs for t in (y, *final)]
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in flat)
    wrt = [t for x, state in leaves for t in (x, *state)]
    wrt += [p for core in cores for p in core.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return [*flat, *grads]


def reference_each(cores, xs, states, is_first):
    return [reference(c, x, s, is_first) for c, x, s in zip(cores, xs, states, strict=True)]


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("group", [1, 3])
def test_fused_group_of_cores_with_their_own_biases_matches_the_reference(name, group):
    """``init="pytorch"`` draws every bias (b_hh too) at random, so each core of a fused group
    has its own biases in every gate: each core's outputs, final state and gradients are those of
    PyTorch's cells with that core's parameters (a group of one too)."""
    cores = [build(name, 20 + g, num_layers=2, init="pytorch") for g in range(group)]
    runs = [inputs(core, 6, 3, 30 + g, 0.3)[:2] for g, core in enumerate(cores)]
    is_first = inputs(cores[0], 6, 3, 40, 0.3)[2]
    is_first[2, 1] = True
    want = group_outputs_and_grads(cores, runs, is_first, reference_each)
    got = group_outputs_and_grads(cores, runs, is_first, unroll_together)
    assert_all_close(got, want, f"{name} group of {group}")


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_bfloat16_unroll_matches_the_float64_reference(name):
    core = build(name, 8, num_layers=2, init="pytorch")
    x, state, is_first = inputs(core, 6, 3, 8, 0.3)
    want_y, want_final = reference(core, x, state, is_first)
    core16 = copy.deepcopy(core).to(torch.bfloat16)
    y, final = core16(x.bfloat16(), tuple(s.bfloat16() for s in state), is_first)
    assert y.dtype == torch.bfloat16
    for got, want in zip((y, *final), (want_y, *want_final), strict=True):
        torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("name", ALL)
def test_unrolls_create_their_tensors_on_the_input_device(name):
    """Every tensor an unroll makes goes on its input's device, not on the default device: with
    'meta' as the default device, CPU unrolls (the fused group, the packed-sequence logic of the
    CUDA path, one step) give the same numbers (a tensor made on 'meta' would meet CPU tensors
    and fail)."""
    core = build(name, 9, num_layers=2)
    x, state, is_first = inputs(core, 6, 3, 9, 0.0)
    is_first[[1, 4], [0, 2]] = True
    runs = {
        "forward": lambda: core(x, state, is_first),
        "step": lambda: core.step(x[0], state, is_first[1]),
    }
    if name in ("gru", "lstm"):
        second = build(name, 10, num_layers=2)
        runs["packed"] = lambda: core._unroll_cudnn(x, state, is_first)
        runs["group"] = lambda: unroll_together([core, second], [x, x], [state, state], is_first)[1]
    for what, run in runs.items():
        want_y, want_final = run()
        with torch.device("meta"):
            y, final = run()
        assert y.device.type == "cpu", what
        assert_all_close([y, *final], [want_y, *want_final], f"{name} {what}")


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_cuda_dispatch_matches_the_reference_on_cpu(name, monkeypatch):
    """Without the fused path (as on CUDA) ``_unroll`` sends one step to PyTorch's cells and a
    longer sequence to the cuDNN logic (plain or packed): outputs, final states and gradients
    match the reference for any T and B, a batch of one included."""
    core = build(name, 12, num_layers=2)
    monkeypatch.setattr(core, "_takes_fused_path", lambda x: False)
    for T, B in ((1, 3), (2, 3), (5, 1), (5, 3)):
        x, state, is_first = inputs(core, T, B, 12 + T + B, 0.3)
        if T > 2:
            is_first[2, 0] = True
        want = outputs_and_grads(core, x, state, is_first, reference)
        got = outputs_and_grads(core, x, state, is_first, unroll_forward)
        assert_all_close(got, want, f"{name} T={T} B={B}")


def test_unroll_together_of_one_core_is_its_unroll_and_mismatched_lists_fail():
    core = build("lstm", 13, num_layers=2)
    x, state, is_first = inputs(core, 5, 2, 13, 0.3)
    ((y, final),) = unroll_together([core], [x], [state], is_first)
    want_y, want_final = reference(core, x, state, is_first)
    assert_all_close([y, *final], [want_y, *want_final], "group of one")
    want = (
        "unroll_together: 1 cores, 2 inputs and 1 states; expected one input and one state per core"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        unroll_together([core], [x, x], [state], is_first)
