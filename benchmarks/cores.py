"""Speed of memrl's recurrent cores against their peers, forward + backward, on CPU.

    python benchmarks/cores.py [--repeats 15] [--threads 2] [--alternatives]

LSTM and GRU, T=128, B=64, input 64, hidden 128, resets Bernoulli(1/32) per step and env:

- memrl ``lstm`` / ``gru`` with the resets (exact);
- CleanRL's pattern: ``nn.LSTM``/``nn.GRU`` called once per step on ``state * (1 - done)``;
- torchrl ``LSTMModule``/``GRUModule`` in recurrent mode with the same resets, backends ``pad``
  (its default) and ``scan``;
- ``nn.LSTM``/``nn.GRU`` over the whole sequence WITHOUT resets (a wrong answer when resets
  exist; PyTorch's fused kernel, the speed to match).

All methods run in one process, interleaved, so load on a shared machine hits them alike; the
table gives medians and the ratio peer / memrl. ``--alternatives`` adds the other exact ways
memrl could unroll on CPU (its packed-sequence path, used on CUDA, and a plain-autograd cell
loop). Then the memory zoo: every vector core of memrl through its protocol, a training
unroll (forward + backward, ratio to memrl's GRU) and a batch-1 inference step. Then ConvGRU:
step latency on a 128x14x14 map at batch 1 (K=128, kernel 3) and a training unroll.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from typing import get_args

import torch
from torch import nn

from memrl.cores import VectorCoreName, make_core


def time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median ms per case; each repeat runs every case once, in turn."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(time_ms(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def rnn_cases(
    kind: str, T: int, B: int, F: int, H: int, alternatives: bool
) -> dict[str, Callable[[], object]]:
    """Forward + backward closures for one kind ('lstm' or 'gru'); the first is memrl's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, F, generator=gen, requires_grad=True)
    is_first = torch.rand(T, B, generator=gen) < 1 / 32
    done = is_first.float()  # CleanRL: done[t] = episode ended before step t
    core = make_core(kind, input_size=F, hidden_size=H)
    state = core.initial_state(B)
    cases: dict[str, Callable[[], object]] = {}

    def memrl() -> None:
        y, _ = core(x, state, is_first)
        y.sum().backward()

    cases[f"memrl {kind} (resets)"] = memrl
    if alternatives:
        cases[f"memrl {kind} packed segments (CUDA path, on CPU)"] = lambda: (
            core._unroll_cudnn(x, state, is_first)[0].sum().backward()
        )
        cases[f"{kind} cell loop in plain autograd, state * (1 - done)"] = cell_loop(
            kind, x, done, H
        )

    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(F, H)

    def cleanrl() -> None:
        h = torch.zeros(1, B, H)
        c = torch.zeros(1, B, H)
        ys = []
        for t in range(T):
            keep = (1.0 - done[t]).view(1, -1, 1)
            if kind == "lstm":
                y, (h, c) = rnn(x[t : t + 1], (h * keep, c * keep))
            else:
                y, h = rnn(x[t : t + 1], h * keep)
            ys.append(y)
        torch.cat(ys).sum().backward()

    cases[f"CleanRL pattern (nn.{kind.upper()} per step)"] = cleanrl
    for backend in ("pad", "scan"):
        fn = torchrl_case(kind, backend, x, is_first, H)
        if fn is not None:
            cases[f"torchrl {kind.upper()}Module recurrent, backend={backend}"] = fn

    def whole() -> None:
        y, _ = rnn(x)
        y.sum().backward()

    cases[f"nn.{kind.upper()} whole sequence, NO resets (wrong answer)"] = whole
    return cases


def cell_loop(kind: str, x: torch.Tensor, done: torch.Tensor, H: int) -> Callable[[], None]:
    cell = (nn.LSTMCell if kind == "lstm" else nn.GRUCell)(x.shape[-1], H)

    def run() -> None:
        h = x.new_zeros(x.shape[1], H)
        c = x.new_zeros(x.shape[1], H)
        ys = []
        for t in range(x.shape[0]):
            keep = (1.0 - done[t]).unsqueeze(-1)
            if kind == "lstm":
                h, c = cell(x[t], (h * keep, c * keep))
            else:
                h = cell(x[t], h * keep)
            ys.append(h)
        torch.stack(ys).sum().backward()

    return run


def torchrl_case(kind: str, backend: str, x: torch.Tensor, is_first: torch.Tensor, H: int):
    """torchrl's module in recurrent mode on a (B, T) tensordict; None if unavailable."""
    try:
        from tensordict import TensorDict
        from torchrl.modules import GRUModule, LSTMModule
    except ImportError:
        return None
    T, B, F = x.shape
    cls = LSTMModule if kind == "lstm" else GRUModule
    try:
        module = cls(
            input_size=F,
            hidden_size=H,
            in_key="x",
            out_key="y",
            recurrent_backend=backend,
            default_recurrent_mode=True,
        )
    except (TypeError, ValueError, RuntimeError):
        return None
    x_bt = x.detach().transpose(0, 1).contiguous().requires_grad_()
    is_init = is_first.t().unsqueeze(-1).contiguous()  # (B, T, 1)

    def run() -> None:
        td = TensorDict({"x": x_bt, "is_init": is_init}, batch_size=[B, T])
        module(td)["y"].sum().backward()

    try:
        run()
    except Exception as err:  # a backend this torchrl build lacks: leave it out of the table
        print(f"(torchrl {kind} backend={backend} skipped: {type(err).__name__}: {err})")
        return None
    return run


def conv_gru_timings(repeats: int, T: int, B: int) -> tuple[float, float, float]:
    """Step latency (inference, batch 1, 128x14x14, K=128, kernel 3) and a training unroll."""
    core = make_core("conv_gru", input_channels=128, hidden_channels=128, spatial_size=14)
    x1 = torch.randn(1, 128, 14, 14)
    state1 = core.initial_state(1)
    first1 = torch.zeros(1, dtype=torch.bool)

    def step() -> None:
        with torch.inference_mode():
            core.step(x1, state1, first1)

    x = torch.randn(T, B, 128, 14, 14, requires_grad=True)
    is_first = torch.rand(T, B) < 1 / 32
    state = core.initial_state(B)

    def train() -> None:
        y, _ = core(x, state, is_first)
        y.sum().backward()

    def forward_only() -> None:
        with torch.inference_mode():
            core(x.detach(), state, is_first)

    step_ms = interleaved({"step": step}, repeats * 10)["step"]
    t = interleaved({"train": train, "fwd": forward_only}, max(3, repeats // 3), warmup=1)
    return step_ms, t["train"], t["fwd"]


ZOO = tuple(n for n in get_args(VectorCoreName) if n != "none")


def zoo_cases(T: int, B: int, F: int, H: int) -> dict[str, Callable[[], object]]:
    """memrl's vector cores through the protocol: forward + backward of a training unroll, and
    (``<name> step``) one inference step at batch 1."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, F, generator=gen)
    is_first = torch.rand(T, B, generator=gen) < 1 / 32
    x1, first1 = torch.randn(1, F, generator=gen), torch.zeros(1, dtype=torch.bool)
    cases = {}
    for name in ZOO:
        core = make_core(name, input_size=F, hidden_size=H)
        state1 = core.initial_state(1)

        def train(core=core) -> None:
            y, _ = core(x, core.initial_state(B), is_first)
            y.sum().backward()

        def step(core=core, state1=state1) -> None:
            with torch.inference_mode():
                core.step(x1, state1, first1)

        cases[name], cases[f"{name} step"] = train, step
    return cases


def keep_freed_memory() -> None:
    """glibc: serve blocks up to 1 GiB from the heap and never trim it, so freed buffers are
    reused instead of coming back as fresh pages (a page fault per 4 KiB on first touch)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
    print(f"mallopt: {'applied' if ok else 'FAILED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats per method")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--T", type=int, default=128)
    parser.add_argument("--B", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument(
        "--alternatives", action="store_true", help="also time memrl's other exact unrolls"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc mallopt so that big freed buffers are reused without page faults",
    )
    parser.add_argument("--skip-conv", action="store_true", help="leave out the ConvGRU timings")
    parser.add_argument("--skip-zoo", action="store_true", help="leave out the memory zoo rows")
    parser.add_argument(
        "--skip-peers", action="store_true", help="leave out the LSTM/GRU peer table"
    )
    parser.add_argument("--conv-T", type=int, default=16, help="ConvGRU training unroll length")
    parser.add_argument("--conv-B", type=int, default=4, help="ConvGRU training batch")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; T={args.T}, B={args.B}, "
        f"input {args.input_size}, hidden {args.hidden_size}, resets Bernoulli(1/32); "
        f"forward + backward, median of {args.repeats} interleaved repeats\n"
    )
    kinds = () if args.skip_peers else ("lstm", "gru")
    cases = {
        k: rnn_cases(k, args.T, args.B, args.input_size, args.hidden_size, args.alternatives)
        for k in kinds
    }
    merged = {f"{k}|{name}": fn for k in kinds for name, fn in cases[k].items()}
    medians = interleaved(merged, args.repeats)
    if kinds:
        print("| method | ms | peer / memrl |")
        print("|---|---:|---:|")
    for k in kinds:
        names = list(cases[k])
        ours = medians[f"{k}|{names[0]}"]
        for name in names:
            ms = medians[f"{k}|{name}"]
            print(f"| {name} | {ms:.1f} | {ms / ours:.2f} |")
    if not args.skip_zoo:
        zoo = interleaved(
            zoo_cases(args.T, args.B, args.input_size, args.hidden_size), args.repeats
        )
        print("\n| memrl core | train unroll ms | gru / core | step ms (batch 1) |")
        print("|---|---:|---:|---:|")
        for name in ZOO:
            print(
                f"| {name} | {zoo[name]:.1f} | {zoo['gru'] / zoo[name]:.2f} | "
                f"{zoo[f'{name} step']:.3f} |"
            )
    if not args.skip_conv:
        step_ms, train_ms, fwd_ms = conv_gru_timings(args.repeats, args.conv_T, args.conv_B)
        print(
            f"\nConvGRU 128x14x14, K=128, kernel 3: step latency (batch 1, inference) "
            f"{step_ms:.2f} ms; unroll T={args.conv_T}, B={args.conv_B}: forward + backward "
            f"{train_ms:.0f} ms, forward only (inference) {fwd_ms:.0f} ms"
        )


if __name__ == "__main__":
    main()
