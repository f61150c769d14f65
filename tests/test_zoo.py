"""The memory zoo's cores against plain step-by-step references of their papers' equations
(values and gradients, with episode resets): the resettable linear scan, minGRU, minLSTM and
causal linear attention."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memrl.cores import linear_scan, make_core


def scan_reference(a, b, h0, is_first):
    """h_t = a_t h_{t-1} + b_t with plain autograd ops; the carry is cut at episode starts."""
    h, out = h0, []
    for t in range(a.shape[0]):
        h = torch.where(is_first[t][:, None], torch.zeros_like(h), h)
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out)


def leaves(T=7, B=3, H=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(T, B, H, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    b = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=gen, dtype=torch.float64)
    is_first = torch.rand(T, B, generator=gen) < 0.25
    return [x.requires_grad_() for x in (a, b, h0)], is_first


@pytest.mark.parametrize("first_is_reset", [False, True])
def test_linear_scan_values_and_gradients_equal_the_step_by_step_reference(first_is_reset):
    (a, b, h0), is_first = leaves()
    is_first[0] = first_is_reset
    got = linear_scan(a, b, h0, is_first)
    want = scan_reference(a, b, h0, is_first)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (a, b, h0))
    expected = torch.autograd.grad((want * weights).sum(), (a, b, h0))
    for g, e, name in zip(grads, expected, ["a", "b", "h0"], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)
    if first_is_reset:  # the incoming state cannot matter
        assert torch.equal(grads[2], torch.zeros_like(h0))


def test_linear_scan_passes_gradcheck():
    (a, b, h0), is_first = leaves(T=4, B=2, H=3, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, is_first), (a, b, h0))


def test_linear_scan_by_hand():
    """a = 0.5, b = 1, h0 = 2: h = 2, 2, 2; with a reset at t = 1: 2, 1, 1.5."""
    a, b, h0 = torch.full((3, 1, 1), 0.5), torch.ones(3, 1, 1), torch.full((1, 1), 2.0)
    assert linear_scan(a, b, h0).flatten().tolist() == [2.0, 2.0, 2.0]
    reset = torch.tensor([[False], [True], [False]])
    assert linear_scan(a, b, h0, reset).flatten().tolist() == [2.0, 1.0, 1.5]


def assert_equals_reference(name, core, x, state, is_first):
    """The core's outputs, final state and every gradient (of a loss on the outputs, through
    the input and the parameters) equal its step-by-step reference's, in float64."""
    y, final = core(x, state, is_first)
    want_y, want_final = zoo_reference(name, core, x, state, is_first)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(final, want_final, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = [x, *core.parameters()]
    grads = torch.autograd.grad(y.square().sum(), params)
    expected = torch.autograd.grad(want_y.square().sum(), params)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def min_rnn_reference(core, x, state, is_first, kind):
    """The paper's equations, one step at a time, from the core's own weights."""
    finals = []
    for k, layer in enumerate(core.layers):
        h, out = state[0][:, k], []
        for t in range(x.shape[0]):
            h = torch.where(is_first[t][:, None], torch.zeros_like(h), h)
            projected = layer(x[t])
            if kind == "mingru":
                gate, candidate = projected.chunk(2, -1)
                z = torch.sigmoid(gate)
                h = (1 - z) * h + z * candidate
            else:
                f, i, candidate = projected.chunk(3, -1)
                f, i = torch.sigmoid(f), torch.sigmoid(i)
                h = f / (f + i) * h + i / (f + i) * candidate
            out.append(h)
        x = torch.stack(out)
        finals.append(h)
    return x, torch.stack(finals, 1)


@pytest.mark.parametrize("kind", ["mingru", "minlstm"])
def test_min_rnn_cores_compute_the_papers_equations(kind):
    torch.manual_seed(0)
    core = make_core(kind, input_size=3, hidden_size=5, num_layers=2).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(4, 2, 5, generator=gen, dtype=torch.float64),)
    is_first = torch.rand(9, 4, generator=gen) < 0.2
    assert_equals_reference(kind, core, x, state, is_first)


def linear_attention_reference(core, x, state, is_first):
    """S_t = S_{t-1} + phi(k) v^T, z_t = z_{t-1} + phi(k), y = W_o(S^T phi(q) / (z.phi(q))),
    restarted from zero at episode starts, one step at a time."""
    phi = lambda u: torch.nn.functional.elu(u) + 1  # noqa: E731
    finals_s, finals_z = [], []
    for k, (qkv, out) in enumerate(zip(core.qkv, core.out, strict=True)):
        s, z, ys = state[0][:, k], state[1][:, k], []
        for t in range(x.shape[0]):
            fresh = is_first[t]
            s = torch.where(fresh[:, None, None], torch.zeros_like(s), s)
            z = torch.where(fresh[:, None], torch.zeros_like(z), z)
            q, key, v = qkv(x[t]).chunk(3, -1)
            q, key = phi(q), phi(key)
            s = s + key[:, :, None] * v[:, None, :]
            z = z + key
            numerator = torch.einsum("bh,bhg->bg", q, s)
            ys.append(out(numerator / ((q * z).sum(-1, keepdim=True) + 1e-6)))
        x = torch.stack(ys)
        finals_s.append(s)
        finals_z.append(z)
    return x, torch.stack(finals_s, 1), torch.stack(finals_z, 1)


@pytest.mark.parametrize("reset_at_zero", [False, True])
def test_linear_attention_parallel_form_equals_the_recurrence(reset_at_zero):
    torch.manual_seed(0)
    core = make_core("linear_attention", input_size=3, hidden_size=4, num_layers=2).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = (
        torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64),  # a plausible state:
        torch.rand(3, 2, 4, generator=gen, dtype=torch.float64) + 1,  # positive sums
    )
    is_first = torch.rand(8, 3, generator=gen) < 0.25
    is_first[0] = reset_at_zero
    is_first[:, 2] = False  # one env never resets: its incoming state runs through the window
    assert_equals_reference("linear_attention", core, x, state, is_first)


def test_complex_linear_scan_passes_gradcheck():
    """The LRU's scan: complex a, b and h0, autograd's conjugate convention in the backward."""
    gen = torch.Generator().manual_seed(3)

    def complex_leaf(*shape):
        parts = torch.randn(*shape, 2, generator=gen, dtype=torch.float64) * 0.6
        return torch.view_as_complex(parts).requires_grad_()

    a, b, h0 = complex_leaf(4, 2, 3), complex_leaf(4, 2, 3), complex_leaf(2, 3)
    is_first = torch.tensor([[False, False], [True, False], [False, False], [False, True]])
    got = linear_scan(a, b, h0, is_first)
    torch.testing.assert_close(got, scan_reference(a, b, h0, is_first), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, is_first), (a, b, h0))


def lru_reference(core, x, state, is_first):
    """The LRU paper's recurrence one step at a time, in complex arithmetic."""
    u, lam, finals = core.encoder(x), core.lambdas(), []
    for k in range(core.num_layers):
        b = torch.view_as_complex(core.b[k].contiguous())
        c = torch.view_as_complex(core.c[k].contiguous())
        gamma = torch.exp(core.gamma_log[k])
        modes, ys = torch.view_as_complex(state[0][:, k].contiguous()), []
        for t in range(x.shape[0]):
            modes = torch.where(is_first[t][:, None], torch.zeros_like(modes), modes)
            modes = lam[k] * modes + gamma * (u[t].to(b.dtype) @ b.t())
            ys.append((modes @ c.t()).real + core.d[k] * u[t])
        y = torch.stack(ys)
        u = core.norms[k](u + core.mix[k](torch.nn.functional.gelu(y)))
        finals.append(torch.view_as_real(modes))
    return u, torch.stack(finals, 1)


def test_lru_equals_its_recurrence_and_starts_stable_on_the_ring():
    torch.manual_seed(0)
    core = make_core("lru", input_size=3, hidden_size=4, num_layers=2, state_size=6).double()
    radius = core.lambdas().abs()
    assert bool((radius <= 0.99 + 1e-9).all()) and bool((radius >= 0).all())
    # gamma normalises each mode's input: gamma^2 = 1 - |lambda|^2 at initialisation
    torch.testing.assert_close(torch.exp(2 * core.gamma_log), 1 - radius**2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(3, 2, 6, 2, generator=gen, dtype=torch.float64),)
    is_first = torch.rand(7, 3, generator=gen) < 0.25
    assert_equals_reference("lru", core, x, state, is_first)
    with pytest.raises(ValueError, match="r_max=1.0"):
        make_core("lru", input_size=3, hidden_size=4, r_max=1.0)


def ffm_reference(core, x, state, is_first):
    """FFM's equations one step at a time: gated input traces, S = gamma S + x^ 1^T, gated
    LayerNorm output with a skip."""
    gammas, finals = core.gammas(), []
    for k in range(core.num_layers):
        traces, ys = torch.view_as_complex(state[0][:, k].contiguous()), []
        for t in range(x.shape[0]):
            traces = torch.where(is_first[t][:, None, None], torch.zeros_like(traces), traces)
            value, gate = core.pre[k](x[t]).chunk(2, -1)
            drive = (value * torch.sigmoid(gate)).to(traces.dtype)[:, :, None]
            traces = gammas[k] * traces + drive
            z = core.post[k](torch.cat([traces.real, traces.imag], -1).flatten(-2))
            out_gate, skip = core.gate[k](x[t]).chunk(2, -1)
            o = torch.sigmoid(out_gate)
            ys.append(core.norms[k](z) * o + skip * (1 - o))
        x = torch.stack(ys)
        finals.append(torch.view_as_real(traces))
    return x, torch.stack(finals, 1)


def mamba_reference(core, x, state, is_first):
    """The selective SSM one step at a time: a conv window of the last K inputs (cleared at an
    episode start), dt, B, C from the input, h = exp(dt A) h + dt u B^T, y = h C + D u."""
    silu, softplus = torch.nn.functional.silu, torch.nn.functional.softplus
    h, hs, windows = core.encoder(x), [], []
    for k in range(core.num_layers):
        modes, window, ys = state[0][:, k], state[1][:, k], []
        for t in range(x.shape[0]):
            fresh = is_first[t]
            modes = torch.where(fresh[:, None, None], torch.zeros_like(modes), modes)
            window = torch.where(fresh[:, None, None], torch.zeros_like(window), window)
            u, g = core.w_in[k](h[t]).chunk(2, -1)
            full = torch.cat([window, u[:, None]], 1)  # (B, K, E), oldest first
            u = silu(core.conv_bias[k] + (core.conv[k] * full).sum(1))
            window = full[:, 1:]
            dt = softplus(core.w_dt[k](u))
            b, c = core.w_bc[k](u).chunk(2, -1)
            a = -torch.exp(core.a_log[k])
            modes = torch.exp(dt[..., None] * a) * modes + (dt * u)[..., None] * b[:, None, :]
            y = (modes * c[:, None, :]).sum(-1) + core.d[k] * u
            ys.append(h[t] + core.w_out[k](y * silu(g)))
        h = torch.stack(ys)
        hs.append(modes)
        windows.append(window)
    return h, (torch.stack(hs, 1), torch.stack(windows, 1))


def gtrxl_reference(core, x, state, is_first):
    """GTrXL one step and one env at a time: attend over the valid remembered inputs and the
    current one (ALiBi bias by distance), gate, MLP, gate; the memory is a queue of the last
    ``memory`` inputs of each layer, emptied at an episode start."""
    relu, M, heads = torch.nn.functional.relu, core.memory, core.heads
    H, d = core.hidden_size, core.hidden_size // core.heads
    T, B = x.shape[:2]
    out = torch.zeros(T, B, H, dtype=x.dtype)
    finals = [[None] * core.num_layers for _ in range(B)]
    for b in range(B):
        queues = [
            [(state[0][b, k, i], float(state[1][b, k, i] > 0.5)) for i in range(M)]
            for k in range(core.num_layers)
        ]
        for t in range(T):
            h = core.encoder(x[t, b])
            if is_first[t, b]:
                queues = [[(torch.zeros(H, dtype=x.dtype), 0.0)] * M for _ in queues]
            for k in range(core.num_layers):
                entries = [*queues[k], (h, 1.0)]  # oldest first; the current one last
                keep = [i for i, (_, ok) in enumerate(entries) if ok > 0.5]
                normed = core.norm1[k](torch.stack([entries[i][0] for i in keep]))
                q = core.qkv[k](core.norm1[k](h)).chunk(3, -1)[0].view(heads, d)
                _, key, v = core.qkv[k](normed).chunk(3, -1)
                key, v = key.view(-1, heads, d), v.view(-1, heads, d)
                distance = torch.tensor([M - i for i in keep], dtype=x.dtype)
                scores = torch.einsum("nd,snd->ns", q, key) / d**0.5
                scores = scores - core.slopes[:, None] * distance
                attended = torch.einsum("ns,snd->nd", torch.softmax(scores, -1), v).reshape(H)
                y = core.gate1[k](h, relu(core.proj[k](attended)))
                queues[k] = entries[1:]
                h = core.gate2[k](y, relu(core.mlp[k](core.norm2[k](y))))
            out[t, b] = h
        for k in range(core.num_layers):
            finals[b][k] = queues[k]
    layers = range(core.num_layers)
    memory = torch.stack([
        torch.stack([torch.stack([e * ok for e, ok in finals[b][k]]) for k in layers])
        for b in range(B)
    ])  # fmt: skip
    valid = torch.tensor(
        [[[ok for _, ok in finals[b][k]] for k in range(core.num_layers)] for b in range(B)],
        dtype=x.dtype,
    )
    return out, (memory, valid)


def zoo_reference(name, core, x, state, is_first):
    """(y, state) of the step-by-step reference of each zoo core."""
    if name in ("mingru", "minlstm"):
        y, final = min_rnn_reference(core, x, state, is_first, name)
        return y, (final,)
    if name == "mamba":
        return mamba_reference(core, x, state, is_first)
    if name == "gtrxl":
        return gtrxl_reference(core, x, state, is_first)
    if name == "linear_attention":
        y, s, z = linear_attention_reference(core, x, state, is_first)
        return y, (s, z)
    reference = lru_reference if name == "lru" else ffm_reference
    y, final = reference(core, x, state, is_first)
    return y, (final,)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["mingru", "minlstm", "linear_attention", "lru", "ffm", "mamba", "gtrxl"]),
    st.integers(1, 2),  # layers
    st.integers(1, 6),  # T
    st.integers(1, 4),  # B
    st.sampled_from([0.0, 0.3, 0.7]),  # P(reset)
    st.integers(0, 2**16),
)
def test_unroll_equals_step_loop_equals_reference(name, layers, T, B, p_reset, seed):
    """Random sizes and reset patterns, float64: the sequence unroll, a loop of ``step`` and the
    plain reference agree on outputs, final states and every gradient."""
    torch.manual_seed(seed)
    core = make_core(name, input_size=3, hidden_size=4, num_layers=layers).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = tuple(
        torch.rand(s.shape, generator=gen, dtype=torch.float64) for s in core.initial_state(B)
    )
    is_first = torch.rand(T, B, generator=gen) < p_reset

    def step_loop():
        s, ys = state, []
        for t in range(T):
            y_t, s = core.step(x[t], s, is_first[t])
            ys.append(y_t)
        return torch.stack(ys), s

    runs = [core(x, state, is_first), step_loop(), zoo_reference(name, core, x, state, is_first)]
    params = [x, *core.parameters()]
    grads = [torch.autograd.grad(y.square().sum(), params) for y, _ in runs]
    for (y, final), g in zip(runs[:2], grads[:2], strict=True):
        torch.testing.assert_close(y, runs[2][0], rtol=1e-9, atol=1e-10)
        for got, want in zip(final, runs[2][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        for got, want in zip(g, grads[2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_ffm_decays_are_stable_and_span_its_horizons():
    """|gamma| = exp(-alpha) < 1; at initialisation the traces halve after 1 to 1000 steps."""
    core = make_core("ffm", input_size=3, hidden_size=4, memory_size=5, context_size=3)
    gamma = core.gammas()
    assert gamma.shape == (1, 5, 3) and bool((gamma.abs() < 1).all())
    half_lives = torch.log(torch.tensor(0.5)) / torch.log(gamma.abs()[0, :, 0])
    torch.testing.assert_close(half_lives, torch.logspace(0, 3, 5), rtol=1e-4, atol=1e-4)
    assert core.omega[0].tolist() == pytest.approx([0, torch.pi / 2, torch.pi])


@pytest.mark.parametrize("conv_size", [1, 2, 4])
def test_mamba_equals_its_recurrence_whatever_the_conv_window(conv_size):
    """Resets inside the sequence clear the conv window: a step never sees an earlier episode."""
    torch.manual_seed(0)
    core = make_core("mamba", input_size=3, hidden_size=4, num_layers=2, state_size=3,
                     conv_size=conv_size).double()  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = tuple(
        torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in core.initial_state(3)
    )
    is_first = torch.rand(9, 3, generator=gen) < 0.3
    assert_equals_reference("mamba", core, x, state, is_first)


@pytest.mark.parametrize("memory", [1, 3])
def test_gtrxl_equals_a_step_by_step_queue_of_remembered_inputs(memory):
    """A window shorter and longer than the gaps between resets; the incoming memory is part
    valid (a 0/1 flag per slot), as the state after a reset inside the previous window."""
    torch.manual_seed(0)
    core = make_core("gtrxl", input_size=3, hidden_size=4, num_layers=2, memory=memory,
                     heads=2).double()  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = (
        torch.randn(3, 2, memory, 4, generator=gen, dtype=torch.float64),
        (torch.rand(3, 2, memory, generator=gen) < 0.6).double(),
    )
    is_first = torch.rand(7, 3, generator=gen) < 0.25
    assert_equals_reference("gtrxl", core, x, state, is_first)
