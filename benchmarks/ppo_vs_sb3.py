"""memrl ``ppo`` against sb3-contrib ``RecurrentPPO``: speed and final return, same settings.

    python benchmarks/ppo_vs_sb3.py [--envs popgym/RepeatPreviousEasy ...] [--total-steps 200000]
        [--memrl-total-steps N] [--seeds 1] [--first-seed 0] [--sb3-layouts default fast]
        [--threads 2] [--out benchmarks_ppo_vs_sb3.json]

Both run in this one process, one after the other (per seed the framework that goes first
alternates), on CPU with the same torch thread count, with the settings of issue 4: 16 envs x
128 rollout steps, LSTM 128, 4 epochs, minibatches of 512 steps, gamma 0.99, GAE lambda 0.95,
clip 0.2, entropy 0.01, value 0.5, max grad norm 0.5, Adam lr 1e-3 (eps 1e-5, both) annealed
linearly to zero on the same per-update schedule (``--no-anneal-lr``: constant for both), no
observation / reward normalisation, no value clipping. sb3 steps the very same environments:
memrl's ``make_env`` (POPGym observation one-hot + previous action + previous reward), 16
copies in a DummyVecEnv seeded as memrl seeds its vector env, each in sb3's Monitor.

Architecture: memrl is encoder Linear(obs, 128) + tanh -> LSTM(128) -> linear actor and critic
heads. sb3 gets the same: a features extractor Linear(obs, 128) + tanh (``Encoder`` below),
``lstm_hidden_size=128``, ``net_arch=[]`` (heads read the LSTM output directly), orthogonal init
with sb3's gains (sqrt 2 encoder, 0.01 actor, 1 critic: memrl's too). Two layouts, since a fair
speed comparison reports two ratios (each framework's default, and each one's fastest):

  default  sb3's default: separate actor and critic LSTMs (here also separate encoders)
           vs memrl ``--separate-critic``
  fast     sb3's fastest: ``shared_lstm=True, enable_critic_lstm=False``
           vs memrl's default shared memory

Reported per (env, framework/layout, seed): environment steps per second of the whole training
loop (sb3: wall clock of ``.learn()``; memrl: ``train_ppo``'s loop, ``summary["sps"]``; both
exclude model construction and the final evaluation), and the final return: the mean over 32
evaluation episodes with greedy actions (memrl: ``summary["final_eval_return"]``; sb3: the same
procedure as memrl's ``evaluate``, 16 envs seeded ``seed + 10000``, ``model.predict`` with the
LSTM state and episode starts carried, the first 32 episodes to finish). A markdown table goes
to stdout, one JSON row per run to ``--out``. ``--memrl-total-steps`` gives memrl another budget
than sb3's ``--total-steps`` (e.g. about the steps it makes in sb3's wall time: what each learns
in the same time). Each run's training curve (mean return of the episodes that ended in each
rollout, against the loop's wall seconds) goes into its JSON row and into a plot next to
``--out`` (``.png``): return against wall time, one line per run. memrl logs a rollout's returns
after the update that follows it, sb3's point is placed when the rollout's last episode ended:
sb3's curve sits up to one update to the left, to its advantage.

``--sb3-policy stock`` instead runs sb3's MlpLstmPolicy as shipped (LSTM on the raw observation,
net_arch pi=[64, 64], vf=[64, 64]) with only the LSTM size and layout set.

Differences that remain: sb3 trains on whole-rollout sequences split at episode starts (its BPTT
runs up to 128 steps, zero-padded; the LSTM falls back to a per-step loop whenever a sequence in the
minibatch starts an episode), memrl by default on fixed 16-step sequences from stored states
(``--memrl-bptt-len``; ``--memrl-split-episodes`` restarts them at episode starts too, as sb3 does,
and with ``--memrl-bptt-len 128`` gives sb3's sequences exactly); in sb3's shared layout the value
loss does not reach the LSTM or the encoder (``latent_pi.detach()``), in memrl's it does; PyTorch's
default LSTM init in sb3, memrl's own in memrl (``--memrl-rnn-init pytorch``: sb3's).
``ppo_vs_sb3_check.py`` checks that, so configured, memrl collects sb3's rollouts and computes sb3's
gradients. Run it on a quiet machine: on 2 cores, another busy job slowed both frameworks by 50-150x
in one trial; each row records the load average before it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # memrl's progress bar; one line per run instead

import gymnasium as gym  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sb3_contrib import RecurrentPPO  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor  # noqa: E402
from stable_baselines3.common.utils import set_random_seed  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402
from torch import nn  # noqa: E402

from memrl.envs import make_env, vector_env_seeds  # noqa: E402
from memrl.rl.ppo import PPOAgent, PPOConfig, train_ppo  # noqa: E402
from memrl.runs import read_metrics  # noqa: E402

NUM_ENVS = 16
ROLLOUT_STEPS = 128
HIDDEN = 128
EPOCHS = 4
MINIBATCH = 512
GAMMA, GAE_LAMBDA, CLIP, ENT, VF, MAX_GRAD_NORM = 0.99, 0.95, 0.2, 0.01, 0.5, 0.5
EVAL_EPISODES = 32
EVAL_SEED_OFFSET = 10_000  # memrl's train_ppo evaluates on seed + 10_000
LAYOUTS = ("default", "fast")


class Encoder(BaseFeaturesExtractor):
    """memrl's encoder: Linear(obs_dim, features_dim) + tanh, in front of the LSTM."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = HIDDEN) -> None:
        super().__init__(observation_space, features_dim)
        obs_dim = int(np.prod(observation_space.shape))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(obs_dim, features_dim), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def _monitored_env(env_id: str, seed: int) -> gym.Env:
    return Monitor(make_env(env_id, seed))


def sb3_vec_env(env_id: str, seed: int) -> DummyVecEnv:
    """16 copies of memrl's ``make_env``, seeded as memrl's ``make_vector_env(env_id, 16,
    seed)`` seeds its sub-envs (first reset; autoresets draw from the env's own RNG)."""
    return DummyVecEnv(
        [functools.partial(_monitored_env, env_id, s) for s in vector_env_seeds(seed, NUM_ENVS)]
    )


def sb3_evaluate(model: RecurrentPPO, env_id: str, seed: int) -> float:
    """memrl's ``evaluate`` for an sb3 model: greedy actions on 16 envs, LSTM state and
    episode starts carried, mean return of the first 32 episodes to end."""
    venv = sb3_vec_env(env_id, seed)
    obs = venv.reset()
    state = None
    starts = np.ones(NUM_ENVS, dtype=bool)
    returns = np.zeros(NUM_ENVS)
    finished: list[float] = []
    while len(finished) < EVAL_EPISODES:
        actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        obs, rewards, dones, _ = venv.step(actions)
        returns += rewards
        finished.extend(returns[dones].tolist())
        returns[dones] = 0.0
        starts = dones
    venv.close()
    return float(np.mean(finished[:EVAL_EPISODES]))


def sb3_model(
    env_id: str,
    layout: str,
    seed: int,
    lr,
    policy: str = "matched",
    batch_size: int = MINIBATCH,
    n_epochs: int = EPOCHS,
    vf_coef: float = VF,
    max_grad_norm: float = MAX_GRAD_NORM,
) -> RecurrentPPO:
    """sb3-contrib's RecurrentPPO with this benchmark's settings on memrl's envs; ``lr`` a float
    or an sb3 schedule."""
    policy_kwargs: dict = dict(lstm_hidden_size=HIDDEN, n_lstm_layers=1, ortho_init=True)
    if policy == "matched":  # memrl's architecture
        policy_kwargs.update(
            net_arch=[], features_extractor_class=Encoder, features_extractor_kwargs={}
        )
    if layout == "default":  # separate actor and critic LSTMs
        policy_kwargs.update(shared_lstm=False, enable_critic_lstm=True)
        if policy == "matched":  # and separate encoders, as memrl's
            policy_kwargs.update(share_features_extractor=False)
    else:  # critic reads the actor's LSTM output (detached)
        policy_kwargs.update(shared_lstm=True, enable_critic_lstm=False)
    set_random_seed(seed)  # not RecurrentPPO(seed=...): that would reseed the envs seed + i
    return RecurrentPPO(
        "MlpLstmPolicy",
        sb3_vec_env(env_id, seed),
        learning_rate=lr,
        n_steps=ROLLOUT_STEPS,
        batch_size=batch_size,
        n_epochs=n_epochs,
        gamma=GAMMA,
        gae_lambda=GAE_LAMBDA,
        clip_range=CLIP,
        clip_range_vf=None,
        normalize_advantage=True,
        ent_coef=ENT,
        vf_coef=vf_coef,
        max_grad_norm=max_grad_norm,
        target_kl=None,
        policy_kwargs=policy_kwargs,
        verbose=0,
        device="cpu",
    )


def run_sb3(env_id: str, layout: str, seed: int, steps: int, args) -> dict:
    num_updates = steps // (NUM_ENVS * ROLLOUT_STEPS)
    if args.anneal_lr:
        # memrl's schedule: update u (1-based) uses lr * (1 - (u - 1) / num_updates). sb3 calls
        # the schedule after the rollout of update u with progress = 1 - u / num_updates.
        def lr(progress: float) -> float:
            return args.lr * min(1.0, progress + 1.0 / num_updates)
    else:
        lr = args.lr
    model = sb3_model(env_id, layout, seed, lr, args.sb3_policy)
    venv = model.get_env()
    start, start_epoch = time.perf_counter(), time.time()
    model.learn(total_timesteps=steps, progress_bar=False)
    wall = time.perf_counter() - start
    venv.close()
    # the curve memrl logs: per rollout (128 steps of every env), the mean return of the
    # episodes that ended in it, at the wall second the last of them ended
    by_rollout: dict[int, list[tuple[float, float]]] = {}
    for monitor in venv.envs:
        ends = np.cumsum(monitor.get_episode_lengths())
        times = monitor.t_start + np.asarray(monitor.get_episode_times()) - start_epoch
        for end, ret, t in zip(ends, monitor.get_episode_rewards(), times, strict=True):
            by_rollout.setdefault(int(end - 1) // ROLLOUT_STEPS, []).append((t, ret))
    curve = [
        [
            max(t for t, _ in eps),
            (k + 1) * NUM_ENVS * ROLLOUT_STEPS,
            float(np.mean([r for _, r in eps])),
        ]
        for k, eps in sorted(by_rollout.items())
    ]
    final = sb3_evaluate(model, env_id, seed + EVAL_SEED_OFFSET)
    return {
        "total_steps": int(model.num_timesteps),
        "wall_seconds": wall,
        "sps": model.num_timesteps / wall,
        "final_eval_return": final,
        "params": sum(p.numel() for p in model.policy.parameters()),
        "curve": curve,
    }


def run_memrl(env_id: str, layout: str, seed: int, steps: int, args, tmp: Path) -> dict:
    cfg = PPOConfig(
        env=env_id,
        core="lstm",
        num_envs=NUM_ENVS,
        rollout_steps=ROLLOUT_STEPS,
        total_steps=steps,
        hidden_size=HIDDEN,
        separate_critic=layout == "default",
        bptt_len=args.memrl_bptt_len,
        split_episodes=args.memrl_split_episodes,
        rnn_init=args.memrl_rnn_init,
        refresh_states=args.memrl_refresh_states,
        epochs=EPOCHS,
        minibatch_steps=MINIBATCH,
        lr=args.lr,
        anneal_lr=args.anneal_lr,
        gamma=GAMMA,
        gae_lambda=GAE_LAMBDA,
        clip_coef=CLIP,
        ent_coef=ENT,
        vf_coef=VF,
        max_grad_norm=MAX_GRAD_NORM,
        eval_episodes=EVAL_EPISODES,
        seed=seed,
        device="cpu",
        output_dir=tmp / f"{env_id.replace('/', '_')}-{layout}-s{seed}",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_ppo(cfg)
    curve = [  # wall seconds of the loop as train_ppo counts them: step / sps
        [r["step"] / r["sps"], r["step"], r["episode_return"]]
        for r in read_metrics(cfg.output_dir / "metrics.jsonl")
        if "episode_return" in r
    ]
    probe = make_env(env_id)  # the same network again, to count its parameters
    agent = PPOAgent(cfg, probe.observation_space, probe.action_space, torch.device("cpu"))
    probe.close()
    return {
        "total_steps": int(summary["total_steps"]),
        "wall_seconds": summary["wall_seconds"],
        "sps": summary["sps"],
        "final_eval_return": summary["final_eval_return"],
        "mmer": summary["mmer"],
        "params": sum(p.numel() for p in agent.policy.parameters()),
        "curve": curve,
    }


KEYS = ("sps", "final_eval_return", "wall_seconds")  # the table's memrl / sb3 column pairs


def table(rows: list[dict], layouts: list[str]) -> str:
    """One line per (env, layout, seed), plus a median line per (env, layout) over seeds."""
    out = [
        "| env | layout | seed | memrl steps/s | sb3 steps/s | speed memrl/sb3 "
        "| memrl return | sb3 return | memrl s | sb3 s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    envs = list(dict.fromkeys(r["env"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    for env_id in envs:
        for layout in layouts:
            pairs = []
            for seed in seeds:
                pick = {
                    r["framework"]: r
                    for r in rows
                    if (r["env"], r["layout"], r["seed"]) == (env_id, layout, seed)
                }
                if len(pick) == 2:
                    pairs.append((seed, pick["memrl"], pick["sb3"]))
            lines = [(str(s), *(r[k] for k in KEYS for r in (m, b))) for s, m, b in pairs]
            if len(pairs) > 1:
                lines.append(
                    ("median",)
                    + tuple(
                        statistics.median(line[i] for line in lines)
                        for i in range(1, 2 * len(KEYS) + 1)
                    )
                )
            for seed, m_sps, b_sps, m_ret, b_ret, m_wall, b_wall in lines:
                out.append(
                    f"| {env_id} | {layout} | {seed} | {m_sps:,.0f} | {b_sps:,.0f} | "
                    f"{m_sps / b_sps:.1f}x | {m_ret:.3f} | {b_ret:.3f} | {m_wall:.0f} | "
                    f"{b_wall:.0f} |"
                )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Training return against wall seconds, one panel per (env, layout), one line per run."""
    panels = list(dict.fromkeys((r["env"], r["layout"]) for r in rows))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, constrained_layout=True
    )
    for ax, (env_id, layout) in zip(axes[0], panels, strict=True):
        for framework, color in (("memrl", "C0"), ("sb3", "C1")):
            runs = [
                r
                for r in rows
                if (r["env"], r["layout"], r["framework"]) == (env_id, layout, framework)
            ]
            for i, r in enumerate(runs):
                label = f"{framework} ({r['total_steps']:,} steps)" if i == 0 else None
                seconds, returns = [c[0] for c in r["curve"]], [c[2] for c in r["curve"]]
                ax.plot(seconds, returns, color=color, alpha=0.7, lw=1, label=label)
        ax.set(title=f"{env_id}, {layout} layout", xlabel="wall seconds of the training loop")
        ax.set_ylabel("mean training episode return per rollout")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--envs",
        nargs="+",
        default=["popgym/RepeatPreviousEasy"],
        help="environment ids (memrl's make_env forms)",
    )
    parser.add_argument(
        "--total-steps",
        type=int,
        default=200_000,
        help="env steps per run, rounded down to a multiple of 16 x 128",
    )
    parser.add_argument(
        "--memrl-total-steps",
        type=int,
        default=None,
        help="memrl's env steps per run, if not --total-steps (same rounding)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="N seeds per env and layout")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first .. first+N-1 (split a long comparison over processes)",
    )
    parser.add_argument(
        "--sb3-layouts",
        nargs="+",
        choices=LAYOUTS,
        default=list(LAYOUTS),
        help="default: separate actor/critic LSTMs vs memrl --separate-critic; "
        "fast: shared_lstm=True, enable_critic_lstm=False vs memrl's shared core",
    )
    parser.add_argument(
        "--sb3-policy",
        choices=("matched", "stock"),
        default="matched",
        help="matched: memrl's network (encoder Linear+tanh -> LSTM -> linear "
        "heads); stock: MlpLstmPolicy's own (LSTM on the raw observation, "
        "net_arch pi=[64, 64], vf=[64, 64]), only lstm_hidden_size=128 set",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both)")
    parser.add_argument(
        "--anneal-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="anneal the lr linearly to zero, same schedule in both",
    )
    parser.add_argument(
        "--memrl-bptt-len",
        type=int,
        default=16,
        help="memrl's truncated-BPTT length (sb3 has no such setting)",
    )
    parser.add_argument(
        "--memrl-split-episodes",
        action="store_true",
        help="memrl's --split-episodes: sequences also restart at episode starts (sb3's "
        "sequences); with --memrl-bptt-len >= the episode length, one sequence per episode",
    )
    parser.add_argument(
        "--memrl-rnn-init",
        choices=("orthogonal", "pytorch"),
        default="orthogonal",
        help="memrl's --rnn-init (pytorch: nn.LSTM's own, as sb3's LSTM)",
    )
    parser.add_argument(
        "--memrl-refresh-states",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="memrl's --refresh-states (its default; sb3 has no such setting)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks_ppo_vs_sb3.json"),
        help="JSON file for the rows",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # memrl's Run sets it too; set it up front for both
    load = os.getloadavg()
    unit = NUM_ENVS * ROLLOUT_STEPS
    steps, memrl_steps = (
        max(1, n // unit) * unit
        for n in (args.total_steps, args.memrl_total_steps or args.total_steps)
    )
    layouts = [layout for layout in LAYOUTS if layout in args.sb3_layouts]
    plan = [
        (env_id, seed, layout, framework)
        for env_id in args.envs
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for layout in layouts
        # alternate which framework goes first, so warm-up and drift hit both alike
        for framework in (("memrl", "sb3") if seed % 2 == 0 else ("sb3", "memrl"))
    ]
    print(
        f"memrl ppo vs sb3-contrib RecurrentPPO: {steps:,} steps per run"
        f"{f' (memrl {memrl_steps:,})' if memrl_steps != steps else ''}, {NUM_ENVS} envs x "
        f"{ROLLOUT_STEPS} steps, LSTM {HIDDEN}, {EPOCHS} epochs, minibatch {MINIBATCH}, "
        f"lr {args.lr:g}{' annealed' if args.anneal_lr else ''}, CPU, "
        f"{torch.get_num_threads()} torch threads, sb3 policy {args.sb3_policy}, memrl "
        f"bptt {args.memrl_bptt_len}{' split at episodes' if args.memrl_split_episodes else ''} "
        f"{args.memrl_rnn_init} init{'' if args.memrl_refresh_states else ', no state refresh'}, "
        f"{len(plan)} runs; load average {load[0]:.2f} (the machine should be quiet)",
        flush=True,
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="memrl-ppo-vs-sb3-") as tmp:
        for i, (env_id, seed, layout, framework) in enumerate(plan, 1):
            name = f"{framework}/{layout}"
            print(f"[{i}/{len(plan)}] {env_id} {name:13s} seed {seed}: ", end="", flush=True)
            loadavg_before = os.getloadavg()[0]
            if framework == "memrl":
                result = run_memrl(env_id, layout, seed, memrl_steps, args, Path(tmp))
            else:
                result = run_sb3(env_id, layout, seed, steps, args)
            torch.set_num_threads(args.threads)  # in case a framework changed it
            row = {
                "env": env_id,
                "framework": framework,
                "layout": layout,
                "seed": seed,
                "sb3_policy": args.sb3_policy if framework == "sb3" else None,
                "threads": args.threads,
                "loadavg_before": loadavg_before,
            }
            row.update(result)
            rows.append(row)
            print(
                f"{result['sps']:,.0f} steps/s ({result['wall_seconds']:.1f} s), "
                f"final return {result['final_eval_return']:.3f}",
                flush=True,
            )
            args.out.write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive
    print()
    print(table(rows, layouts))
    plot(rows, args.out.with_suffix(".png"))
    print(
        f"\nrows written to {args.out}, curves plotted in {args.out.with_suffix('.png')}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
