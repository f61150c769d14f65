"""Where the time of ``memrl ppo`` goes, and the machine's ceilings for this setting.

    python benchmarks/ppo_profile.py [--env popgym/RepeatPreviousEasy] [--total-steps 65536]
        [--core lstm] [--separate-critic] [--threads 2]

Runs ``train_ppo`` with the issue's benchmark settings (16 envs x 128 steps, hidden 128, 4
epochs, minibatches of 512 steps) with wall-clock timers around its parts (no profiler: cProfile
inflated the Python-heavy env step 2x here): stepping the vector env (gymnasium + the env), the
policy's forward passes in the rollout, the rest of the rollout (sampling, buffer writes, tensor
conversion), the PPO update, its refresh of the stored states and the rest (GAE, logging,
checkpoints). The update is split further into its forward passes, backward passes, gradient
clip, Adam step and the rest (loss, minibatch slicing, logging); for the forward and backward
passes, the share of the memory unroll itself (the fused CPU LSTM/GRU of ``memrl.cores``; 0 for
other cores).
One more update runs under ``torch.profiler`` to split the update into matrix products
(``aten::mm``/``addmm``/``bmm``, with their achieved GFLOP/s) and everything else, next to this
machine's matmul peak (one 2048 x 2048 product) at the same thread count. Last, the same vector
env stepped with random actions alone: steps/s of an infinitely fast learner.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from gymnasium.vector import SyncVectorEnv  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import memrl.cores.rnn  # noqa: E402
import memrl.rl.ppo as ppo  # noqa: E402
from memrl.cores._fused_rnn import ResettableGRU, ResettableLSTM  # noqa: E402
from memrl.envs import make_vector_env, vector_env_seeds  # noqa: E402
from memrl.rl.buffer import RolloutBuffer  # noqa: E402
from memrl.rl.policy import RecurrentActorCritic  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@contextlib.contextmanager
def timers(seconds: dict[str, float]):
    """Add the wall time of each patched call to ``seconds[label]``. A patch with ``within``
    counts only while that label's call runs and none of ``outside`` does: the env step and the
    policy's rollout step only inside ``collect_rollout`` (not in the final evaluation), the
    update's phases only inside ``update`` and outside its refresh of the stored states."""
    active: set[str] = set()
    in_update = ("PPO update", ("state refresh",))
    patches = (
        ("vector env step", SyncVectorEnv, "step", ("rollout", ())),
        ("policy in the rollout", RecurrentActorCritic, "step", ("rollout", ())),
        ("rollout", ppo, "collect_rollout", None),
        ("PPO update", ppo.PPOAgent, "update", None),
        ("state refresh", RolloutBuffer, "refresh_states", None),
        ("update: forward", RecurrentActorCritic, "forward", in_update),
        ("update: backward", torch.Tensor, "backward", in_update),
        ("update: gradient clip", torch.nn.utils, "clip_grad_norm_", in_update),
        ("update: Adam", torch.optim.Adam, "step", in_update),
        ("update: memory unroll forward", memrl.cores.rnn, "_unroll_fused", in_update),
        ("update: memory unroll backward", ResettableLSTM, "backward", in_update),
        ("update: memory unroll backward", ResettableGRU, "backward", in_update),
    )
    originals = [(owner, name, getattr(owner, name)) for _, owner, name, _ in patches]

    def timed(label, fn, context):
        def wrapper(*args, **kwargs):
            if context is not None:
                within, outside = context
                if within not in active or active.intersection(outside):
                    return fn(*args, **kwargs)
            active.add(label)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                active.discard(label)

        return wrapper

    for label, owner, name, context in patches:
        setattr(owner, name, timed(label, getattr(owner, name), context))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def update_matmuls(agent: ppo.PPOAgent, buffer, generator) -> tuple[float, float, float]:
    """One more PPO update under torch.profiler: (update seconds, seconds in matrix products,
    their GFLOP)."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        agent.update(buffer, generator)
        total = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.key in MATMULS]
    seconds = sum(e.self_cpu_time_total for e in events) / 1e6
    return total, seconds, sum(e.flops for e in events) / 1e9


def matmul_peak() -> float:
    """GFLOP/s of one 2048 x 2048 float32 product (median of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / sorted(times)[2] / 1e9


def profile_training(args, out: Path) -> tuple[dict, dict[str, float], tuple[float, float, float]]:
    cfg = ppo.PPOConfig(
        env=args.env,
        core=args.core,
        num_envs=16,
        rollout_steps=128,
        total_steps=args.total_steps,
        hidden_size=128,
        separate_critic=args.separate_critic,
        epochs=4,
        minibatch_steps=512,
        eval_episodes=32,
        device="cpu",
        output_dir=out,
    )
    seconds: dict[str, float] = defaultdict(float)
    last: dict = {}
    update = ppo.PPOAgent.update

    def keep_last(agent, buffer, generator):  # what the profiled extra update needs
        last.update(agent=agent, buffer=buffer, state=generator.get_state())
        return update(agent, buffer, generator)

    ppo.PPOAgent.update = keep_last
    try:
        with timers(seconds):
            summary = ppo.train_ppo(cfg)
    finally:
        ppo.PPOAgent.update = update
    generator = torch.Generator()
    generator.set_state(last["state"])
    matmuls = update_matmuls(last["agent"], last["buffer"], generator)
    return summary, seconds, matmuls


def env_ceiling(env_id: str, steps: int) -> float:
    envs = make_vector_env(env_id, 16, 0, autoreset_mode="same_step")
    envs.reset(seed=vector_env_seeds(0, 16))
    envs.action_space.seed(0)
    actions = [envs.action_space.sample() for _ in range(256)]
    start = time.perf_counter()
    for i in range(steps // 16):
        envs.step(actions[i % len(actions)])
    seconds = time.perf_counter() - start
    envs.close()
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="popgym/RepeatPreviousEasy")
    parser.add_argument("--core", default="lstm")
    parser.add_argument("--total-steps", type=int, default=65536)
    parser.add_argument("--separate-critic", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        summary, seconds, (update_s, matmul_s, gflop) = profile_training(args, Path(tmp) / "run")
    wall = summary["wall_seconds"]
    ceiling = env_ceiling(args.env, args.total_steps)
    peak = matmul_peak()
    layout = "separate actor and critic" if args.separate_critic else "shared memory"
    rollout_rest = (
        seconds["rollout"] - seconds["vector env step"] - seconds["policy in the rollout"]
    )
    update = seconds["PPO update"] - seconds["state refresh"]
    phases = ("forward", "backward", "gradient clip", "Adam")
    rows = [
        ("PPO update (forward, backward, Adam)", update),
        ("- forward passes (encoders, memory, heads)", seconds["update: forward"]),
        ("-- of which the memory unroll", seconds["update: memory unroll forward"]),
        ("- backward passes", seconds["update: backward"]),
        ("-- of which the memory unroll", seconds["update: memory unroll backward"]),
        ("- gradient-norm clip", seconds["update: gradient clip"]),
        ("- Adam", seconds["update: Adam"]),
        (
            "- the rest: loss, minibatch slicing, logging",
            update - sum(seconds[f"update: {phase}"] for phase in phases),
        ),
        ("stored-state refresh before epochs 2-4 (no gradient)", seconds["state refresh"]),
        ("vector env step (gymnasium + the env)", seconds["vector env step"]),
        ("policy forward passes in the rollout", seconds["policy in the rollout"]),
        ("rest of the rollout (sampling, buffer writes, conversions)", rollout_rest),
        ("rest (GAE, logging, checkpoints)", wall - seconds["rollout"] - seconds["PPO update"]),
    ]
    per_update = summary["total_steps"] / (16 * 128)
    print(
        f"\nmemrl ppo --core {args.core} ({layout}), {args.env}, {summary['total_steps']:,} steps,"
    )
    print(f"{summary['sps']:,.0f} steps/s\n")
    print("| part of the training loop | share | ms per 2,048 steps |")
    print("|---|---:|---:|")
    for label, part in rows:
        print(f"| {label} | {part / wall:.0%} | {part / per_update * 1e3:.0f} |")
    print(
        f"\nOne PPO update under torch.profiler: {update_s * 1e3:.0f} ms, of which matrix products "
        f"{matmul_s * 1e3:.0f} ms ({matmul_s / update_s:.0%}) doing {gflop:.1f} GFLOP at "
        f"{gflop / matmul_s:.0f} GFLOP/s; this machine's matmul peak (2048 x 2048): {peak:.0f} "
        f"GFLOP/s. All of the update's matrix products at peak would take {gflop / peak * 1e3:.0f} "
        f"ms."
    )
    print(f"the vector env alone, random actions: {ceiling:,.0f} steps/s (the ceiling)")
    print(f"memrl reaches {summary['sps'] / ceiling:.0%} of the ceiling")


if __name__ == "__main__":
    main()
