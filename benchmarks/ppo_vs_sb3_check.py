"""Is memrl's recurrent PPO sb3-contrib's? Same weights, same rollouts, same gradients.

    python benchmarks/ppo_vs_sb3_check.py [--env popgym/RepeatPreviousEasy] [--warmup-updates 3]

memrl with ``--core lstm --separate-critic --rnn-init pytorch`` against sb3-contrib's
``RecurrentPPO`` with the same network (``ppo_vs_sb3.py``'s matched policy, default layout),
memrl's weights copied into it. Two checks, each printing its largest difference; the script
exits 1 if any exceeds ``--tolerance``:

1. **Rollouts in lockstep.** From the same weights and env seeds, each framework collects two
   rollouts of 16 envs x 128 steps with its own code, actions (one discrete head) drawn by inverse
   CDF from one shared stream of uniforms (both samplers patched for this; otherwise each draws its
   own noise). Observations, actions, rewards and episode starts must be equal, values, log-probs,
   GAE advantages, returns and the stored LSTM states equal to rounding.
2. **One PPO minibatch.** memrl trains ``--warmup-updates`` updates, collects a rollout, and
   writes it into sb3's ``RecurrentRolloutBuffer`` (observations, actions, rewards, episode
   starts, values, log-probs, both LSTM states before every step). sb3's GAE is compared with
   memrl's; then one minibatch of all 2,048 steps runs through each framework's own update
   (``PPOAgent.update``, ``RecurrentPPO.train``; the optimiser step replaced by a probe that keeps
   the gradients after clipping). memrl with ``--split-episodes --bptt-len 128`` cuts the rollout
   into sb3's sequences (split at episode starts and the rollout's edges); sb3's random roll of
   the sample order is fixed at 0. sb3 minimises ``vf_coef * MSE``, memrl (CleanRL's convention)
   ``vf_coef * 0.5 * MSE``, so sb3 gets half of memrl's ``vf_coef``. So that the clipped branch
   of the objective and the gradient-norm clip take part, the stored log-probs are jittered
   (``--jitter``, the same numbers in both) and both clip the gradient norm at
   ``--max-grad-norm`` (0.01 by default, below this minibatch's norm).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from ppo_vs_sb3 import CLIP, ENT, GAE_LAMBDA, GAMMA, HIDDEN, NUM_ENVS, ROLLOUT_STEPS, sb3_model
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.logger import configure

from memrl.envs import make_vector_env, vector_env_seeds
from memrl.rl import PPOAgent, PPOConfig
from memrl.rl.buffer import RolloutBuffer
from memrl.rl.distributions import MaskedCategorical
from memrl.rl.normalize import RewardScaler
from memrl.rl.rollout import Carry, EpisodeTracker, collect_rollout

CPU = torch.device("cpu")
# sb3 parameter name prefix -> memrl's (with share_features_extractor=False, sb3 registers the
# actor's encoder as ``features_extractor``)
NAMES = {
    "features_extractor.net.1": "actor_memory.encoder.0",
    "pi_features_extractor.net.1": "actor_memory.encoder.0",
    "vf_features_extractor.net.1": "critic_memory.encoder.0",
    "lstm_actor": "actor_memory.core.rnn",
    "lstm_critic": "critic_memory.core.rnn",
    "action_net": "actor",
    "value_net": "critic",
}


def memrl_name(sb3_name: str) -> str:
    prefix, _, leaf = sb3_name.rpartition(".")
    return f"{NAMES[prefix]}.{leaf}"


def keep_gradients(params: dict[str, torch.nn.Parameter], out: dict[str, torch.Tensor]):
    """An ``optimizer.step`` that records the (clipped) gradients and changes nothing."""

    def step(*args, **kwargs) -> None:
        out.update({name: p.grad.detach().clone() for name, p in params.items()})

    return step


def memrl_setup(args, **overrides):
    """memrl's agent (LSTM, separate critic, PyTorch init), vector env, carry and buffer."""
    N, T = NUM_ENVS, ROLLOUT_STEPS
    cfg = PPOConfig(
        env=args.env,
        core="lstm",
        hidden_size=HIDDEN,
        separate_critic=True,
        rnn_init="pytorch",
        split_episodes=True,
        bptt_len=T,
        minibatch_steps=N * T,
        anneal_lr=False,
        gamma=GAMMA,
        gae_lambda=GAE_LAMBDA,
        clip_coef=CLIP,
        ent_coef=ENT,
        seed=args.seed,
        device="cpu",
        output_dir=Path(tempfile.mkdtemp()) / "unused",
        **overrides,
    )
    torch.manual_seed(args.seed)
    envs = make_vector_env(cfg.env, N, cfg.seed, autoreset_mode="same_step")
    agent = PPOAgent(cfg, envs.single_observation_space, envs.single_action_space, CPU)
    obs, info = envs.reset(seed=vector_env_seeds(cfg.seed, N))
    carry = Carry(
        obs,
        info,
        agent.policy.initial_state(N),
        torch.ones(N, dtype=torch.bool),
        EpisodeTracker(N),
        RewardScaler(N, cfg.gamma, False),
    )
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    buf = RolloutBuffer(
        T, N, obs_dim, (1,), agent.head.action_dtype, None, T, CPU, split_episodes=True
    )
    return cfg, agent, envs, carry, buf


def sb3_copy(agent: PPOAgent, cfg: PPOConfig, **kwargs):
    """sb3's matched model on the same env seeds, holding a copy of memrl's weights."""
    model = sb3_model(cfg.env, "default", cfg.seed, lr=cfg.lr, **kwargs)
    sb3_params = dict(model.policy.named_parameters())
    memrl_params = dict(agent.policy.named_parameters())
    with torch.no_grad():
        for name, p in sb3_params.items():
            p.copy_(memrl_params[memrl_name(name)])
    assert sum(p.numel() for p in sb3_params.values()) == sum(
        p.numel() for p in memrl_params.values()
    ), "the two networks differ in size"
    return model, sb3_params, memrl_params


def shared_sampler(uniforms: torch.Tensor):
    """Inverse-CDF sampling from ``uniforms`` (one row per step): probs (N, K) -> (N,)."""
    rows = iter(uniforms)

    def sample(probs: torch.Tensor) -> torch.Tensor:
        u = next(rows)[: probs.shape[0], None]
        return (probs.cumsum(-1) < u).sum(-1).clamp(max=probs.shape[-1] - 1)

    return sample


def check_rollouts(args, rollouts: int = 2) -> float:
    N, T = NUM_ENVS, ROLLOUT_STEPS
    cfg, agent, envs, carry, template = memrl_setup(args)
    obs_dim = template.obs.shape[-1]
    model, _, _ = sb3_copy(agent, cfg)
    uniforms = torch.rand(rollouts * T, N, generator=torch.Generator().manual_seed(args.seed))
    memrl_sample, sb3_sample = shared_sampler(uniforms), shared_sampler(uniforms)
    memrl_buffers = []
    with patch.object(
        MaskedCategorical,
        "sample",
        lambda self: memrl_sample(self.log_probs.exp()[..., 0, :]).unsqueeze(-1),
    ):
        for _ in range(rollouts):
            buf = RolloutBuffer(T, N, obs_dim, (1,), agent.head.action_dtype, None, T, CPU)
            last_value = collect_rollout(agent, envs, buf, carry)
            buf.compute_gae(last_value, cfg.gamma, cfg.gae_lambda)
            memrl_buffers.append(buf)
    envs.close()
    _, callback = model._setup_learn(rollouts * N * T, None)
    callback.on_training_start(locals(), globals())
    worst = 0.0
    print("| rollout | field | max abs diff |\n|---|---|---:|")
    with patch.object(
        torch.distributions.Categorical, "sample", lambda self, *a: sb3_sample(self.probs)
    ):
        for r, buf in enumerate(memrl_buffers):
            model.collect_rollouts(model.env, callback, model.rollout_buffer, T)
            rb = model.rollout_buffer
            fields = {
                "observations": buf.obs,
                "actions": buf.actions[..., 0],
                "rewards": buf.rewards,
                "episode_starts": buf.is_first,
                "values": buf.values,
                "log_probs": buf.log_probs,
                "advantages": buf.advantages,
                "returns": buf.returns,
                "hidden_states_pi": buf.states[0][:, :, 0],
                "cell_states_vf": buf.states[3][:, :, 0],
            }
            for name, mine in fields.items():
                theirs = torch.as_tensor(getattr(rb, name)).reshape(mine.shape)
                diff = float((theirs.double() - mine.double()).abs().max())
                worst = max(worst, diff)
                print(f"| {r + 1} | {name} | {diff:.1e} |")
    model.env.close()
    return worst


def check_gradient(args) -> float:
    N, T = NUM_ENVS, ROLLOUT_STEPS
    cfg, agent, envs, carry, buf = memrl_setup(args, max_grad_norm=args.max_grad_norm)
    generator = torch.Generator().manual_seed(cfg.seed)
    for update in range(args.warmup_updates + 1):  # the last rollout is the one compared
        last_value = collect_rollout(agent, envs, buf, carry)
        buf.compute_gae(last_value, cfg.gamma, cfg.gae_lambda)
        if update < args.warmup_updates:
            agent.policy.train()
            agent.update(buf, generator)
    envs.close()
    buf.log_probs += args.jitter * torch.randn(buf.log_probs.shape, generator=generator)
    model, sb3_params, memrl_params = sb3_copy(
        agent,
        cfg,
        batch_size=N * T,
        n_epochs=1,
        vf_coef=cfg.vf_coef / 2,
        max_grad_norm=cfg.max_grad_norm,
    )
    rb = model.rollout_buffer
    rb.reset()
    for t in range(T):
        h_pi, c_pi, h_vf, c_vf = (s[t].transpose(0, 1).contiguous() for s in buf.states)
        rb.add(
            buf.obs[t].numpy(),
            buf.actions[t].numpy(),
            buf.rewards[t].numpy(),
            buf.is_first[t].float().numpy(),
            buf.values[t].reshape(-1, 1),
            buf.log_probs[t],
            lstm_states=RNNStates((h_pi, c_pi), (h_vf, c_vf)),
        )
    rb.compute_returns_and_advantage(
        last_values=last_value.reshape(-1, 1), dones=carry.is_first.float().numpy()
    )
    gae = {
        "advantages": np.abs(rb.advantages - buf.advantages.numpy()).max(),
        "returns": np.abs(rb.returns - buf.returns.numpy()).max(),
    }
    sb3_grads: dict[str, torch.Tensor] = {}
    memrl_grads: dict[str, torch.Tensor] = {}
    model.policy.optimizer.step = keep_gradients(sb3_params, sb3_grads)
    agent.optimizer.step = keep_gradients(memrl_params, memrl_grads)
    model.set_logger(configure(None, []))
    model._current_progress_remaining = 1.0
    with patch.object(np.random, "randint", lambda *a, **k: 0):  # sb3's roll of the order
        model.train()
    agent.policy.train()
    memrl_figures = agent.update(buf, torch.Generator().manual_seed(cfg.seed))
    sb3_figures = model.logger.name_to_value
    model.env.close()
    print(
        f"\nOne minibatch of {N * T} steps after {args.warmup_updates} memrl updates: policy loss "
        f"memrl {memrl_figures['loss/policy']:.6g} sb3 "
        f"{sb3_figures['train/policy_gradient_loss']:.6g}, clip fraction memrl "
        f"{memrl_figures['clipfrac']:.3f} sb3 {sb3_figures['train/clip_fraction']:.3f}, "
        f"gradient norm before clipping (memrl) {memrl_figures['grad_norm']:.3g}"
    )
    print(f"GAE: max |advantage diff| {gae['advantages']:.1e}, |return diff| {gae['returns']:.1e}")
    print("\n| parameter (sb3 name) | memrl grad norm | sb3 grad norm | max rel diff |")
    print("|---|---:|---:|---:|")
    worst = float(max(gae.values()))
    for name in sb3_params:
        a, b = sb3_grads[name], memrl_grads[memrl_name(name)]
        rel = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
        worst = max(worst, rel)
        print(f"| {name} | {b.norm():.4e} | {a.norm():.4e} | {rel:.1e} |")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", default="popgym/RepeatPreviousEasy")
    parser.add_argument("--warmup-updates", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--jitter", type=float, default=0.3, help="std of the noise added to stored log-probs"
    )
    parser.add_argument("--max-grad-norm", type=float, default=0.01)
    args = parser.parse_args()
    print(f"{args.env}, LSTM {HIDDEN}, separate critic, PyTorch's LSTM init, seed {args.seed}\n")
    rollouts = check_rollouts(args)
    gradient = check_gradient(args)
    print(
        f"\nlargest difference: rollouts {rollouts:.1e}, gradient {gradient:.1e} "
        f"(tolerance {args.tolerance:g})"
    )
    sys.exit(0 if max(rollouts, gradient) <= args.tolerance else 1)


if __name__ == "__main__":
    main()
