"""Resettable LSTM and GRU layers with a hand-written backward, for fast CPU unrolls.

Why: with one reset per 32 steps per env and a batch of 64, nearly every time step holds a reset,
so running ``nn.LSTM`` over reset-free stretches degenerates to one call per step, and plain
autograd over per-step gate ops is slow on CPU (many tiny ops, each recorded and replayed). These
``autograd.Function``s do the least per step:

- forward: the input projection of all ``T`` steps is one matmul; per step one matmul with the
  recurrent weight (its add fused in) and a handful of elementwise ops into preallocated buffers;
- backward: whatever does not depend on the recurrence (gate derivatives, the masked previous
  states) is computed for all steps at once; per step there is one matmul and a few elementwise
  ops; the weight, bias and input gradients are ONE large matmul each after the sequential pass.

Matmuls are ``torch.mm`` / ``torch.addmm`` (MKL on CPU, cuBLAS on CUDA), with the recurrent weight
transposed into a contiguous copy once per call: measured on this project's 2-core CPU, that is
1.0-1.5x faster for these small per-step products than oneDNN's packed linear op (which an earlier
version used) at 1 and 2 threads, for LSTM and GRU, T x B from 16 x 32 to 128 x 64.

Resets: ``keep`` is ``(T, B, 1)``, 0 where ``is_first``; the carried state is multiplied by
``keep[t]`` only at the steps listed in ``reset_steps`` (those with any reset), in the forward and
the backward pass. Not twice differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


def _linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w.t() (+ bias)``."""
    return torch.mm(a, w.t()) if bias is None else torch.addmm(bias, a, w.t())


def _step_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in) as the right operand of the per-step products ``a @ w.t()``: a contiguous
    copy of ``w.t()`` (a transposed view costs MKL up to 2x for the backward's shapes)."""
    return w.t().contiguous()


def _prev_states(first: torch.Tensor, seq: torch.Tensor, keep: torch.Tensor, any_reset: bool):
    """States consumed at each step: ``cat(first, seq[:-1])``, zeroed where reset. (T, B, H)."""
    prev = torch.cat([first.unsqueeze(0), seq[:-1]])
    return prev.mul_(keep) if any_reset else prev


def _weight_grads(
    dgates: torch.Tensor, x: torch.Tensor | None, h_prev: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dgates.t() @ x`` and ``dgates.t() @ h_prev`` over all steps (rows T*B), as one matmul
    when both are wanted: (G, T*B) @ (T*B, F + H) -> (G, F), (G, H)."""
    parts = [p for p in (x, h_prev) if p is not None]
    if not parts:
        return None, None
    grads = _linear(torch.cat([p.t() for p in parts]), dgates.t()).t()  # (G, F + H)
    dw = list(grads.split([p.shape[1] for p in parts], 1))
    return (dw.pop(0) if x is not None else None), (dw.pop(0) if h_prev is not None else None)


class ResettableLSTM(torch.autograd.Function):
    """One LSTM layer (``nn.LSTM`` equations and parameter layout) with resets.

    Internally the gates are reordered from PyTorch's (i, f, g, o) to (o, i, f, g): the three
    sigmoids are one contiguous op, and in the backward the three gates driven by ``dc`` are
    contiguous too. At a reset step the forget gate is multiplied by ``keep`` (``f' = f * keep``):
    then ``c = f' * c_prev + i * g`` needs no masked copy of ``c_prev``, and the backward through
    ``c`` is masked by ``f'`` for free.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (T, B, F)
        h0: torch.Tensor,  # (B, H)
        c0: torch.Tensor,  # (B, H)
        keep: torch.Tensor,  # (T, B, 1)
        reset_steps: tuple[bool, ...],
        w_ih: torch.Tensor,  # (4H, F)
        w_hh: torch.Tensor,  # (4H, H)
        b_ih: torch.Tensor,  # (4H,)
        b_hh: torch.Tensor,  # (4H,)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, B, F = x.shape
        H = h0.shape[1]
        w_ih_r, w_hh_r = torch.roll(w_ih, H, 0), torch.roll(w_hh, H, 0)  # (o, i, f, g) order
        bias = torch.roll(b_ih + b_hh, H, 0)
        # tanh(a) = 2 sigmoid(2a) - 1: with the g rows doubled one sigmoid serves all four gates
        # (PyTorch's CPU tanh is ~3x slower than its sigmoid)
        scale = torch.ones(4 * H, 1, dtype=x.dtype, device=x.device)
        scale[3 * H :] = 2.0
        # act[t] holds x-part pre-activations until step t turns it into the activated gates
        act = _linear(x.reshape(T * B, F), w_ih_r * scale, bias * scale[:, 0]).view(T, B, 4 * H)
        c, tanh_c, y = (x.new_empty(T, B, H) for _ in range(3))
        w_step = _step_weight(w_hh_r * scale)
        acts, g_gate = act.unbind(0), act[..., 3 * H :].unbind(0)
        o_gate, i_gate, f_gate = (act[..., k * H : (k + 1) * H].unbind(0) for k in range(3))
        cs, tcs, ys = c.unbind(0), tanh_c.unbind(0), y.unbind(0)
        h, c_prev = h0.contiguous(), c0
        for t in range(T):
            if reset_steps[t]:
                h = h * keep[t]
            pre = torch.addmm(acts[t], h, w_step)  # (B, 4H)
            torch.sigmoid(pre, out=acts[t])
            g_gate[t].mul_(2.0).sub_(1.0)
            if reset_steps[t]:
                f_gate[t].mul_(keep[t])
            torch.mul(f_gate[t], c_prev, out=cs[t])
            cs[t].addcmul_(i_gate[t], g_gate[t])
            torch.tanh(cs[t], out=tcs[t])
            torch.mul(o_gate[t], tcs[t], out=ys[t])
            h, c_prev = ys[t], cs[t]
        ctx.reset_steps = reset_steps
        ctx.save_for_backward(x, h0, c0, keep, w_ih_r, w_hh_r, act, c, tanh_c, y)
        return y, y[-1].clone(), c[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor, dc_last: torch.Tensor):
        x, h0, c0, keep, w_ih_r, w_hh_r, act, c, tanh_c, y = ctx.saved_tensors
        reset_steps = ctx.reset_steps
        T, B, F = x.shape
        H = h0.shape[1]
        sigmoid_backward, tanh_backward = (
            torch.ops.aten.sigmoid_backward,
            torch.ops.aten.tanh_backward,
        )
        o, i, f, g = (act[..., k * H : (k + 1) * H] for k in range(4))
        # d(gate pre-activations)[t] = [dh_t * m_o, dc_t * m_i, dc_t * m_f, dc_t * m_g], with the
        # local derivatives m of all steps computed at once; it becomes the gradient in place.
        dgates = torch.empty_like(act)  # (T, B, 4H)
        sigmoid_backward(tanh_c, o, grad_input=dgates[..., :H])
        sigmoid_backward(g, i, grad_input=dgates[..., H : 2 * H])
        sigmoid_backward(c[:-1], f[1:], grad_input=dgates[1:, :, 2 * H : 3 * H])
        sigmoid_backward(c0, f[0], grad_input=dgates[0, :, 2 * H : 3 * H])
        tanh_backward(i, g, grad_input=dgates[..., 3 * H :])
        dc_from_h = tanh_backward(o, tanh_c)  # (T, B, H): dc_t += dh_t * dc_from_h[t]
        w_step = _step_weight(w_hh_r.t())
        dy = dy.contiguous()
        dg_o, dg_ifg = dgates[..., :H].unbind(0), dgates[..., H:].unbind(0)
        dys, fs, dcs, dgs = dy.unbind(0), f.unbind(0), dc_from_h.unbind(0), dgates.unbind(0)
        dh = dh_last + dys[T - 1]
        dc = torch.addcmul(dc_last, dh, dcs[T - 1])
        for t in range(T - 1, -1, -1):
            dg_o[t].mul_(dh)
            dg_ifg[t].view(B, 3, H).mul_(dc.unsqueeze(1))
            dc.mul_(fs[t])
            if reset_steps[t] or t == 0:
                dh = torch.mm(dgs[t], w_step)
                if reset_steps[t]:
                    dh.mul_(keep[t])
                if t > 0:
                    dh.add_(dys[t - 1])
            else:
                dh = torch.addmm(dys[t - 1], dgs[t], w_step)
            if t > 0:
                dc.addcmul_(dh, dcs[t - 1])
        flat = dgates.view(T * B, 4 * H)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _linear(flat, w_ih_r.t()).view(T, B, F)
        h_prev = None
        if ctx.needs_input_grad[6]:
            h_prev = _prev_states(h0, y, keep, any(reset_steps)).view(T * B, H)
        x_flat = x.reshape(T * B, F) if ctx.needs_input_grad[5] else None
        dw_ih, dw_hh = (
            None if dw is None else torch.roll(dw, -H, 0)
            for dw in _weight_grads(flat, x_flat, h_prev)
        )
        if ctx.needs_input_grad[7] or ctx.needs_input_grad[8]:
            dbias = torch.roll(flat.sum(0), -H, 0)
        return dx, dh, dc, None, None, dw_ih, dw_hh, dbias, dbias


class ResettableGRU(torch.autograd.Function):
    """One GRU layer (``nn.GRU`` equations and parameter layout, gates r, z, n) with resets.

    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (1 - z) ⊙ n + z ⊙ h``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (T, B, F)
        h0: torch.Tensor,  # (B, H)
        keep: torch.Tensor,  # (T, B, 1)
        reset_steps: tuple[bool, ...],
        w_ih: torch.Tensor,  # (3H, F)
        w_hh: torch.Tensor,  # (3H, H)
        b_ih: torch.Tensor,  # (3H,)
        b_hh: torch.Tensor,  # (3H,)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, B, F = x.shape
        H = h0.shape[1]
        x_proj = _linear(x.reshape(T * B, F), w_ih, b_ih).view(T, B, 3 * H)
        # base[t] = [x_r + b_r, x_z + b_z, b_hn]: adding W_hh h gives [r, z] pre-activations and hn
        base = torch.empty_like(x_proj)  # (T, B, 3H)
        torch.add(x_proj[..., : 2 * H], b_hh[: 2 * H], out=base[..., : 2 * H])
        base[..., 2 * H :] = b_hh[2 * H :]
        rz = x.new_empty(T, B, 2 * H)
        n, y = x.new_empty(T, B, H), x.new_empty(T, B, H)
        w_step = _step_weight(w_hh)
        bases, rzs = base.unbind(0), rz.unbind(0)
        r, z = rz[..., :H].unbind(0), rz[..., H:].unbind(0)
        xn, ns, ys = x_proj[..., 2 * H :].unbind(0), n.unbind(0), y.unbind(0)
        hns = []
        h = h0.contiguous()
        for t in range(T):
            if reset_steps[t]:
                h = h * keep[t]
            pre = torch.addmm(bases[t], h, w_step)  # (B, 3H): [r, z] pre-activations, W_hn h + b_hn
            torch.sigmoid(pre[:, : 2 * H], out=rzs[t])
            hns.append(pre[:, 2 * H :])
            torch.addcmul(xn[t], r[t], hns[t], out=ns[t])
            ns[t].tanh_()
            torch.lerp(ns[t], h, z[t], out=ys[t])
            h = ys[t]
        hn = torch.stack(hns)  # (T, B, H)
        ctx.reset_steps = reset_steps
        ctx.save_for_backward(x, h0, keep, w_ih, w_hh, rz, hn, n, y)
        return y, y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor, dh_last: torch.Tensor):
        x, h0, keep, w_ih, w_hh, rz, hn, n, y = ctx.saved_tensors
        reset_steps = ctx.reset_steps
        T, B, F = x.shape
        H = h0.shape[1]
        h_prev = _prev_states(h0, y, keep, any(reset_steps))
        r, z = rz[..., :H], rz[..., H:]
        # d(n pre-activation) = dh * a_n; the gradient of W_hh h + b_hh is [r, z, hn] = dh * m
        a_n = torch.ops.aten.tanh_backward(1 - z, n)  # (T, B, H)
        dg_h = torch.empty(
            T, B, 3 * H, dtype=x.dtype, device=x.device
        )  # m, made the gradient in place
        torch.ops.aten.sigmoid_backward(a_n * hn, r, grad_input=dg_h[..., :H])
        torch.ops.aten.sigmoid_backward(h_prev - n, z, grad_input=dg_h[..., H : 2 * H])
        torch.mul(a_n, r, out=dg_h[..., 2 * H :])
        w_step = _step_weight(w_hh.t())
        dy = dy.contiguous()
        dys, zs, dgs = dy.unbind(0), z.unbind(0), dg_h.unbind(0)
        dh = dh_last + dys[T - 1]
        dhs = [dh]  # gradient of each step's output h, last step first
        for t in range(T - 1, -1, -1):
            dgs[t].view(B, 3, H).mul_(dh.unsqueeze(1))
            if reset_steps[t] or t == 0:
                dh = torch.addmm(dh * zs[t], dgs[t], w_step)
                if reset_steps[t]:
                    dh.mul_(keep[t])
                if t > 0:
                    dh.add_(dys[t - 1])
            else:
                dh = torch.addmm(torch.addcmul(dys[t - 1], dh, zs[t]), dgs[t], w_step)
            dhs.append(dh)
        dh0 = dhs.pop()
        dg_x = dg_h.clone()  # (T, B, 3H) gradient of W_ih x + b_ih: the n part differs
        torch.mul(torch.stack(dhs[::-1]), a_n, out=dg_x[..., 2 * H :])
        flat_h, flat_x = dg_h.view(T * B, 3 * H), dg_x.view(T * B, 3 * H)
        dx = db_ih = db_hh = None
        if ctx.needs_input_grad[0]:
            dx = _linear(flat_x, w_ih.t()).view(T, B, F)
        dw_ih, _ = _weight_grads(
            flat_x, x.reshape(T * B, F) if ctx.needs_input_grad[4] else None, None
        )
        _, dw_hh = _weight_grads(
            flat_h, None, h_prev.view(T * B, H) if ctx.needs_input_grad[5] else None
        )
        if ctx.needs_input_grad[6]:
            db_ih = flat_x.sum(0)
        if ctx.needs_input_grad[7]:
            db_hh = flat_h.sum(0)
        return dx, dh0, None, None, dw_ih, dw_hh, db_ih, db_hh
