"""S4DCore forward+backward: FFT convolution vs the resettable chunked scan (vs one step at a time).

    python benchmarks/s4d.py [--repeats 5] [--threads 2] [--length 1024] [--chunk-size 32]

Same core, same input, same nonzero incoming state; the reset-free rows unroll the same sequence,
the "with resets" rows put resets inside it (an episode start with probability 1/100 per step
per env; "short episodes": 1/10, where the scan's cost grows with the most resets in one chunk).
Medians of interleaved repeats, after one warm-up run of each case.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from memrl.cores import make_core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--state-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--skip-recurrent", action="store_true", help="leave out the slow row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    length, batch, hidden = args.length, args.batch, args.hidden
    core = make_core(
        "s4d",
        input_size=hidden,
        hidden_size=hidden,
        state_size=args.state_size,
        chunk_size=args.chunk_size,
    )
    x = torch.randn(length, batch, hidden)
    state = tuple(0.1 * torch.randn_like(s) for s in core.initial_state(batch))
    no_resets = torch.zeros(length, batch, dtype=torch.bool)
    resets = torch.rand(length, batch) < 0.01
    resets[length // 2, 0] = True  # at least one reset inside the sequence
    short_episodes = torch.rand(length, batch) < 0.1

    def case(mode: str, is_first: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            core.mode = mode
            core.zero_grad(set_to_none=True)
            y, (final,) = core(x, state, is_first)
            (y.square().mean() + final.square().mean()).backward()

        return run

    cases = {
        "fft, no resets": case("fft", no_resets),
        "scan, no resets": case("scan", no_resets),
        "scan, with resets": case("scan", resets),
        "auto, with resets (= scan)": case("auto", resets),
        "scan, short episodes": case("scan", short_episodes),
    }
    if not args.skip_recurrent:
        cases["recurrent, with resets"] = case("recurrent", resets)

    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))

    print(
        f"S4DCore forward+backward, T={length}, B={batch}, F=H={hidden}, N={args.state_size} "
        f"({args.state_size // 2} complex modes), 1 layer, chunk_size={args.chunk_size}, "
        f"float32, {args.threads} threads, median of {args.repeats} interleaved repeats\n"
    )
    fft_ms = statistics.median(times["fft, no resets"])
    print("| mode | ms | ratio to fft |")
    print("|---|---:|---:|")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.1f} | {ms / fft_ms:.2f} |")


if __name__ == "__main__":
    main()
