"""Latency of spatial memory at inference on the CPU, batch 1 (the spatial-memory spec's
real-time concern).

Rows: one step of memrl's ConvGRU core on a 128 x 14 x 14 map; the same step with FiLM
conditioning (``SpatialMemory``); ConvLSTM and S4D steps for comparison; the frozen encoders
(backbone + FPN) on one 84 x 84 frame; and the whole stack at inference (encoder -> memory step
-> policy head), as milliseconds per frame and frames per second. Median of ``--repeats`` timed
calls after warm-up.

    python benchmarks/spatial_latency.py [--threads 1] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from memrl.cores import make_core
from memrl.nn.fpn import make_spatial_encoder
from memrl.spatial.memory import SpatialMemory
from memrl.spatial.model import SpatialModel

C, S = 128, 14


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def memory_step(memory, conditioned: bool) -> Callable[[], object]:
    z = torch.randn(1, C, S, S)
    condition = torch.randn(1, 3) if conditioned else None
    state = memory.initial_state(1)
    is_first = torch.zeros(1, dtype=torch.bool)
    return lambda: memory.step(z, condition, state, is_first)


def stack_step(model: SpatialModel) -> Callable[[], object]:
    image = torch.randint(0, 256, (1, 3, 84, 84), dtype=torch.uint8)
    gripper = torch.randn(1, 3)
    state = [model.initial_state(1)]
    is_first = torch.zeros(1, dtype=torch.bool)

    def step() -> torch.Tensor:
        z = model.encode(image)
        h, state[0] = model.memory.step(z, model.condition(gripper), state[0], is_first)
        return model.to_action(model.act(h, z))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows: list[tuple[str, float]] = []
    core = make_core("conv_gru", input_channels=C, hidden_channels=C, spatial_size=S).eval()
    z, state, first = torch.randn(1, C, S, S), core.initial_state(1), torch.zeros(1, dtype=bool)
    rows.append(
        (
            "conv_gru core step, 128x14x14",
            median_ms(lambda: core.step(z, state, first), args.repeats),
        )
    )
    for name, kwargs in (
        ("conv_gru + FiLM (SpatialMemory), K=128", {"core": "conv_gru"}),
        ("conv_gru + FiLM, K=64", {"core": "conv_gru", "hidden_channels": 64}),
        ("conv_lstm + FiLM, K=128", {"core": "conv_lstm"}),
        ("s4d on a 4x4 pooled grid + FiLM", {"core": "s4d"}),
    ):
        memory = SpatialMemory(channels=C, size=S, condition_dim=3, **kwargs).eval()
        rows.append((name, median_ms(memory_step(memory, True), args.repeats)))
    image = torch.randint(0, 256, (1, 3, 84, 84), dtype=torch.uint8)
    for backbone in ("cnn", "resnet18"):
        encoder = make_spatial_encoder(backbone, C, S, pretrained=False).eval()
        rows.append(
            (
                f"encoder {backbone} + FPN, one frame",
                median_ms(lambda e=encoder: e(image), args.repeats),
            )
        )
    for hidden in (128, 64):
        model = SpatialModel(hidden_channels=hidden).eval()
        rows.append(
            (
                f"whole stack (cnn, conv_gru K={hidden}, policy)",
                median_ms(stack_step(model), args.repeats),
            )
        )

    print(
        f"spatial memory latency, CPU, batch 1, {args.threads} thread(s), median of {args.repeats}"
    )
    print()
    print(f"| {'what':<46} | {'ms':>8} | {'per s':>8} |")
    print(f"|{'-' * 48}|{'-' * 9}:|{'-' * 9}:|")
    for name, ms in rows:
        print(f"| {name:<46} | {ms:8.2f} | {1000 / ms:8.1f} |")


if __name__ == "__main__":
    main()
