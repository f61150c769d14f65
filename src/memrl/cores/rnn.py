"""Vector memory cores: ``NoMemoryCore`` (the memoryless baseline), ``GRUCore`` and ``LSTMCore``.

GRU and LSTM keep their weights in an ``nn.GRU`` / ``nn.LSTM`` (PyTorch's equations and parameter
names, so weights load both ways) and unroll with exact per-env resets three ways, picked by
``x.device.type`` and ``layer_norm``:

- CPU (and any device but CUDA): ``memrl.cores._fused_rnn``, a hand-written forward and backward
  per layer (one matmul per step, weight and input gradients as one large matmul each).
  ``unroll_together`` runs several such cores (an actor's and a critic's memory) as one group:
  one op per step for all of them.
- CUDA: cuDNN. Without a reset inside the sequence, one plain ``nn.LSTM``/``nn.GRU`` call;
  otherwise every episode segment becomes its own sequence of one ``PackedSequence`` (exact:
  each segment after a reset starts from zeros) and cuDNN runs all of them in one call.
- ``layer_norm=True``: a per-step loop in plain autograd (slower), on every device.

A single step (``T == 1``, rollouts) uses ``torch.lstm_cell`` / ``torch.gru_cell``: least overhead.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from memrl.cores._fused_rnn import ResettableGRU, ResettableLSTM
from memrl.cores.base import Core, State, VectorCore

INITS = ("orthogonal", "pytorch")  # recurrent-core initialisations (``reset_parameters``)


class NoMemoryCore(VectorCore):
    """Memoryless baseline with the core interface: ``num_layers`` of Linear + tanh per step.

    ``y[t]`` depends on ``x[t]`` only; the state is the empty tuple and ``is_first`` is ignored.
    Same output size and range as the recurrent cores, so heads and pipelines are unchanged.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__(input_size, hidden_size, num_layers)
        self.state_shapes = ()
        layers: list[nn.Module] = []
        for k in range(num_layers):
            layers += [nn.Linear(input_size if k == 0 else hidden_size, hidden_size), nn.Tanh()]
        self.mlp = nn.Sequential(*layers)

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        return self.mlp(x), ()


class _RecurrentCore(VectorCore):
    """What ``GRUCore`` and ``LSTMCore`` share: sizes, init, device dispatch, the cuDNN path."""

    _rnn_class: type[nn.RNNBase]
    _gates: int  # gate blocks in weight_ih / weight_hh
    _n_state: int  # tensors in the state: 1 for (h,), 2 for (h, c)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        layer_norm: bool = False,
        init: str = "orthogonal",
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers)
        if init not in INITS:
            raise ValueError(
                f"{type(self).__name__}: unknown init {init!r}; expected one of {', '.join(INITS)}"
            )
        self.layer_norm, self.init = bool(layer_norm), init
        self.state_shapes = ((num_layers, hidden_size),) * self._n_state
        self.rnn = self._rnn_class(input_size, hidden_size, num_layers)
        self.norms = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ih": nn.LayerNorm(self._gates * hidden_size, bias=False),
                    "hh": nn.LayerNorm(self._gates * hidden_size, bias=False),
                }
                | ({"c": nn.LayerNorm(hidden_size)} if self._n_state == 2 else {})
            )
            for _ in range(num_layers if layer_norm else 0)
        )
        # nn.LSTM / nn.GRU drew every weight already: the orthogonal init only overwrites
        # (so a seed gives the same weights as before reset_parameters re-drew them all)
        self._init_weights(redraw=init == "pytorch")

    def reset_parameters(self) -> None:
        """Re-draw every parameter. ``init="orthogonal"``: orthogonal recurrent weights (per gate
        block), PyTorch's default input weights, zero biases (the LSTM's forget-gate bias is 1).
        ``init="pytorch"``: ``nn.LSTM``/``nn.GRU``'s own, every weight and bias uniform in
        +-1/sqrt(hidden_size). Layer norms back to scale 1, shift 0."""
        self._init_weights(redraw=True)

    def _init_weights(self, redraw: bool) -> None:
        if redraw:
            self.rnn.reset_parameters()
            for norm in self.norms.modules():
                if isinstance(norm, nn.LayerNorm):
                    norm.reset_parameters()
        if self.init == "pytorch":
            return
        H = self.hidden_size
        for k in range(self.num_layers):
            w_hh = getattr(self.rnn, f"weight_hh_l{k}")
            with torch.no_grad():
                for block in w_hh.split(H):
                    nn.init.orthogonal_(block)
                getattr(self.rnn, f"bias_ih_l{k}").zero_()
                getattr(self.rnn, f"bias_hh_l{k}").zero_()
                if self._n_state == 2:  # gate order (i, f, g, o)
                    getattr(self.rnn, f"bias_ih_l{k}")[H : 2 * H] = 1.0

    def _layer_params(self, k: int) -> tuple[torch.Tensor, ...]:
        return tuple(
            getattr(self.rnn, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def _takes_fused_path(self, x: torch.Tensor) -> bool:
        """Whether unrolling ``x`` (T, B, F) runs ``memrl.cores._fused_rnn``: a sequence of
        more than one step, off CUDA, without layer norm."""
        return not self.layer_norm and x.shape[0] > 1 and x.device.type != "cuda"

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        if self._takes_fused_path(x):
            return _unroll_fused([self], [x], [state], is_first)[0]
        if x.shape[0] == 0:
            return x.new_zeros(0, x.shape[1], self.hidden_size), state
        if self.layer_norm:
            return self._unroll_layer_norm(x, state, is_first)
        if x.shape[0] == 1:  # a rollout step: PyTorch's cell, least overhead (fused on CUDA)
            return self._step_cells(x, state, is_first)
        return self._unroll_cudnn(x, state, is_first)  # CUDA

    def _step_cells(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """One step, layer by layer, with ``torch.lstm_cell`` / ``torch.gru_cell``."""
        keep = (~is_first[0]).to(x.dtype).unsqueeze(-1)  # (B, 1)
        inp, finals = x[0], []
        for k in range(self.num_layers):
            layer_state = tuple(s[:, k] * keep for s in state)
            if self._n_state == 2:
                layer_state = torch.lstm_cell(inp, layer_state, *self._layer_params(k))
            else:
                layer_state = (torch.gru_cell(inp, layer_state[0], *self._layer_params(k)),)
            inp = layer_state[0]
            finals.append(layer_state)
        return inp.unsqueeze(0), tuple(_stack(s, 1) for s in zip(*finals, strict=True))

    @abc.abstractmethod
    def _unroll_layer_norm(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """``layer_norm=True``: per-step loop in plain autograd."""

    def _unroll_cudnn(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """One ``nn.LSTM``/``nn.GRU`` call: plain if no reset falls after step 0, else packed."""
        keep0 = (~is_first[0]).to(x.dtype).view(-1, 1, 1)
        hx = tuple((s * keep0).transpose(0, 1).contiguous() for s in state)  # (L, B, H) each
        if x.shape[0] == 1 or not bool(is_first[1:].any()):
            y, out = self.rnn(x, hx if self._n_state == 2 else hx[0])
            out = out if self._n_state == 2 else (out,)
            return y, tuple(s.transpose(0, 1) for s in out)
        return self._unroll_packed(x, hx, is_first)

    def _unroll_packed(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, ...], is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """Every episode segment as its own sequence of one ``PackedSequence``.

        ``hx``: the incoming state, already zeroed where ``is_first[0]``, (L, B, H) each.
        Exact on any device; fast where the packed kernel is (cuDNN).
        """
        T, B = is_first.shape
        starts = is_first.t().reshape(-1).clone()  # (B*T,) env-major
        starts[::T] = True  # every env starts a segment at t = 0
        seg = starts.long().cumsum(0) - 1  # (B*T,) segment of each element, env-major
        n_seg = int(seg[-1]) + 1
        lengths = torch.bincount(seg, minlength=n_seg)  # (S,)
        order = torch.argsort(lengths, descending=True, stable=True)  # packed slot -> segment
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n_seg, device=order.device)  # segment -> packed slot
        seg_start = lengths.cumsum(0) - lengths
        pos = torch.arange(B * T, device=seg.device) - seg_start[seg]  # step within its segment
        batch_sizes = torch.bincount(pos)  # (max length,): segments alive at each step
        offsets = batch_sizes.cumsum(0) - batch_sizes
        packed_index = offsets[pos] + rank[seg]  # (B*T,) where each element sits in the packed data
        data = x.transpose(0, 1).reshape(B * T, -1)
        packed = data.new_empty(data.shape).index_copy(0, packed_index, data)  # (B*T, F)
        first_slot = rank[seg[::T]]  # (B,) slot of each env's first segment
        last_slot = rank[seg[T - 1 :: T]]  # (B,) slot of each env's last segment
        L, H = self.num_layers, self.hidden_size
        init = tuple(s.new_zeros(L, n_seg, H).index_copy(1, first_slot, s) for s in hx)
        out, final = self.rnn(
            PackedSequence(packed, batch_sizes.cpu()), init if self._n_state == 2 else init[0]
        )
        final = final if self._n_state == 2 else (final,)
        y = out.data.index_select(0, packed_index).view(B, T, H).transpose(0, 1)
        return y, tuple(s.index_select(1, last_slot).transpose(0, 1) for s in final)


class LSTMCore(_RecurrentCore):
    """Multi-layer LSTM; state ``(h, c)``, each (B, num_layers, H); ``y`` is the last layer's h.

    ``layer_norm=True`` normalises the input and recurrent pre-activations and the cell before
    its tanh (Ba et al. 2016, sec. 6.1); that variant unrolls in plain autograd, slower.
    """

    _rnn_class, _gates, _n_state = nn.LSTM, 4, 2

    def _unroll_layer_norm(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        keep = (~is_first).to(x.dtype).unsqueeze(-1)  # (T, B, 1)
        hs, cs = [], []
        for k, norm in enumerate(self.norms):
            w_ih, w_hh, b_ih, b_hh = self._layer_params(k)
            x_proj = (norm["ih"](x @ w_ih.t()) + (b_ih + b_hh)).unbind(0)  # T x (B, 4H)
            h, c = state[0].unbind(1)[k], state[1].unbind(1)[k]
            ys = []
            for t in range(x.shape[0]):
                h, c = h * keep[t], c * keep[t]
                i, f, g, o = (x_proj[t] + norm["hh"](h @ w_hh.t())).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(norm["c"](c))
                ys.append(h)
            x = torch.stack(ys)
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs, 1), torch.stack(cs, 1))


class GRUCore(_RecurrentCore):
    """Multi-layer GRU (``nn.GRU`` equations); state ``(h,)`` with h (B, num_layers, H).

    ``layer_norm=True`` normalises the input and recurrent pre-activations; that variant unrolls
    in plain autograd, slower.
    """

    _rnn_class, _gates, _n_state = nn.GRU, 3, 1

    def _unroll_layer_norm(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        keep = (~is_first).to(x.dtype).unsqueeze(-1)  # (T, B, 1)
        H = self.hidden_size
        hs = []
        for k, norm in enumerate(self.norms):
            w_ih, w_hh, b_ih, b_hh = self._layer_params(k)
            x_proj = (norm["ih"](x @ w_ih.t()) + b_ih).unbind(0)  # T x (B, 3H)
            h = state[0].unbind(1)[k]
            ys = []
            for t in range(x.shape[0]):
                h = h * keep[t]
                h_rz, h_n = (norm["hh"](h @ w_hh.t()) + b_hh).split([2 * H, H], -1)
                x_rz, x_n = x_proj[t].split([2 * H, H], -1)
                r, z = torch.sigmoid(x_rz + h_rz).chunk(2, -1)
                n = torch.tanh(x_n + r * h_n)
                h = torch.lerp(n, h, z)
                ys.append(h)
            x = torch.stack(ys)
            hs.append(h)
        return x, (torch.stack(hs, 1),)


def _stack(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.stack(tensors, dim)``; a view for one tensor."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim)


def _unroll_fused(
    cores: Sequence[_RecurrentCore],
    xs: Sequence[torch.Tensor],
    states: Sequence[State],
    is_first: torch.Tensor,
) -> list[tuple[torch.Tensor, State]]:
    """The CPU path of same-shaped GRU or LSTM cores over the same steps and resets: per layer,
    one ``ResettableGRU``/``ResettableLSTM`` call for all of them (a group of one for a lone
    core). ``xs[g]`` (T, B, F); returns ``(y, state)`` per core."""
    first = cores[0]
    fused = ResettableLSTM if first._n_state == 2 else ResettableGRU
    keep = (~is_first).to(xs[0].dtype).unsqueeze(-1)  # (T, B, 1)
    reset_steps = tuple(is_first.any(1).tolist())
    x, finals = _stack(xs), []  # (G, T, B, F)
    for k in range(first.num_layers):
        params = [_stack(p) for p in zip(*(core._layer_params(k) for core in cores), strict=True)]
        initial = [_stack([s[i][:, k] for s in states]) for i in range(first._n_state)]
        x, *final = fused.apply(x, *initial, keep, reset_steps, *params)  # final: (G, B, H) each
        finals.append(final)
    return [
        (x[g], tuple(torch.stack([f[i][g] for f in finals], 1) for i in range(first._n_state)))
        for g in range(len(cores))
    ]


def unroll_together(
    cores: Sequence[Core],
    xs: Sequence[torch.Tensor],
    states: Sequence[State],
    is_first: torch.Tensor,
) -> list[tuple[torch.Tensor, State]]:
    """``[core(x, state, is_first) for core, x, state in zip(cores, xs, states)]``: several cores
    over the same steps and resets (e.g. an actor's and a critic's memory). GRU or LSTM cores of
    one kind and shape unrolling a sequence on the CPU run as one fused group, one op per step
    for all of them; any other cores run one after another."""
    if not len(cores) == len(xs) == len(states):
        raise ValueError(
            f"unroll_together: {len(cores)} cores, {len(xs)} inputs and {len(states)} states; "
            "expected one input and one state per core"
        )
    for core, x, state in zip(cores, xs, states, strict=True):
        core._check(x, state, is_first, sequence=True)
    first = cores[0]
    if isinstance(first, _RecurrentCore) and all(
        type(core) is type(first)
        and core._takes_fused_path(x)
        and (core.input_size, core.hidden_size, core.num_layers)
        == (first.input_size, first.hidden_size, first.num_layers)
        for core, x in zip(cores, xs, strict=True)
    ):
        return _unroll_fused(cores, xs, [tuple(s) for s in states], is_first)
    return [
        core._unroll(x, tuple(state), is_first)
        for core, x, state in zip(cores, xs, states, strict=True)
    ]
