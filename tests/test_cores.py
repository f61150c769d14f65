"""Cores gru, lstm, none, conv_gru, conv_lstm: the unroll, the step loop and an independent
step-by-step reference (PyTorch's own cells, or the spatial-memory spec's concatenated-[h, x]
convolutions) agree on outputs, final states and gradients for random reset patterns; resets are
exact; the state helpers work on every core (s4d included); bad inputs fail with messages that
name them."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memrl.cores import CORES, make_core, unroll_together
from memrl.cores.state import cat_states, detach_state, select_state, state_to, zero_state_where

TOL = {"rtol": 1e-8, "atol": 1e-8}
SETTINGS = settings(max_examples=100, deadline=None)
VECTOR = ("gru", "lstm", "none")
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


ALL = ("gru", "lstm", "none", "conv_gru", "conv_lstm")


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
        ValueError, match="'transformer'.*none, gru, lstm, s4d, conv_gru, conv_lstm"
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
