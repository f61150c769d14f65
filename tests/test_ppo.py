"""Recurrent PPO: stored state, resets inside sequences, the loss, learning a memory task, resume,
evaluation."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from memrl.cli import main
from memrl.cores import select_state
from memrl.envs import make_vector_env
from memrl.rl import PPOAgent, PPOConfig, action_head, make_distribution, ppo_loss, train_ppo
from memrl.rl.buffer import RolloutBuffer, SequenceBatch
from memrl.rl.evaluate import PPOEvalConfig, run_ppo_eval
from memrl.rl.normalize import RewardScaler
from memrl.rl.rollout import Carry, EpisodeTracker, collect_rollout
from memrl.runs import load_checkpoint, read_metrics


class RepeatTwoBack(gym.Env):
    """Answer the bit shown two steps ago; on an episode's first two steps the answer is 0.

    Reward 1/8 per right answer, 8 steps an episode, so the best return is 1 and a memoryless
    policy gets about 0.5. The right action depends on where the episode started: a memory that
    leaked state across an episode start would answer the previous episode's bits.
    """

    length = 8

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(2)

    def _obs(self) -> np.ndarray:
        return np.eye(2, dtype=np.float32)[self.bits[self.t]]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.bits, self.t = self.np_random.integers(0, 2, self.length), 0
        return self._obs(), {}

    def step(self, action):
        target = self.bits[self.t - 2] if self.t >= 2 else 0
        reward = float(int(action) == target) / self.length
        self.t += 1
        done = self.t == self.length
        return (np.zeros(2, np.float32) if done else self._obs()), reward, done, False, {}


ENV = f"{__name__}:RepeatTwoBack"


def _rollout(core: str, steps: int = 32, burn_in: int = 0, split_episodes: bool = False):
    cfg = PPOConfig(
        env=ENV,
        core=core,
        num_envs=4,
        rollout_steps=steps,
        bptt_len=8,
        hidden_size=16,
        device="cpu",
    )
    envs = make_vector_env(ENV, cfg.num_envs, 0, autoreset_mode="same_step")
    torch.manual_seed(0)
    agent = PPOAgent(
        cfg, envs.single_observation_space, envs.single_action_space, torch.device("cpu")
    )
    envs.reset(seed=[1, 2, 3, 4])
    # one step first: episodes (8 steps) then cross the 8-step windows instead of matching them
    obs, _, _, _, info = envs.step(np.array([0, 0, 1, 1]))
    initial = agent.policy.initial_state(cfg.num_envs)
    carry = Carry(
        obs,
        info,
        initial,
        torch.ones(cfg.num_envs, dtype=torch.bool),
        EpisodeTracker(cfg.num_envs),
        RewardScaler(cfg.num_envs, 0.99, False),
    )
    buffer = RolloutBuffer(
        steps,
        cfg.num_envs,
        2,
        (1,),
        torch.long,
        None,
        8,
        torch.device("cpu"),
        burn_in=burn_in,
        split_episodes=split_episodes,
    )
    collect_rollout(agent, envs, buffer, carry)
    return agent, buffer, initial


@pytest.mark.parametrize("core", ["gru", "lstm", "s4d"])
def test_stored_state_is_the_state_the_policy_had(core):
    agent, buffer, initial = _rollout(core)
    assert buffer.is_first[1:].any(), "the rollout should cross episode starts"
    state = initial
    with torch.no_grad():
        for t in range(buffer.T):
            for stored, replayed in zip(
                buffer.state_at(torch.tensor([t] * 4), torch.arange(4)), state, strict=True
            ):
                torch.testing.assert_close(stored, replayed, rtol=0, atol=1e-6)
            _, _, state = agent.policy(buffer.obs[t : t + 1], state, buffer.is_first[t : t + 1])
    assert len(buffer.states) == (2 if core == "lstm" else 1)  # (h, c) for the LSTM


@pytest.mark.parametrize(
    ("core", "burn_in", "split"),
    [("gru", 0, False), ("lstm", 0, False), ("lstm", 3, False), ("gru", 8, False),
     ("lstm", 0, True), ("gru", 3, True)],
)  # fmt: skip
def test_training_sees_what_acting_saw(core, burn_in, split):
    """Minibatches of sequences started from stored states (or burned in from the states B
    steps earlier, R2D2) reproduce the rollout's log-probs and values exactly at every real
    step: no state leaks across an episode start inside a sequence; every step is trained once."""
    agent, buffer, _ = _rollout(core, burn_in=burn_in, split_episodes=split)
    buffer.compute_gae(torch.zeros(buffer.N), 0.99, 0.95)
    seen, sequences = 0, 0
    with torch.no_grad():
        for mb in buffer.minibatches(24, torch.Generator().manual_seed(0)):
            assert (mb.burn_in is None) == (burn_in == 0)
            if not split:
                assert mb.valid is None
            start = agent.sequence_start_state(mb)
            params, values, _ = agent.policy(mb.obs, start, mb.is_first)
            log_probs = agent.distribution(params, mb.masks).log_prob(mb.actions)
            torch.testing.assert_close(mb.real(log_probs), mb.real(mb.log_probs), rtol=0, atol=1e-5)
            torch.testing.assert_close(mb.real(values), mb.real(mb.values), rtol=0, atol=1e-5)
            seen += mb.real(mb.values).numel()
            sequences += mb.obs.shape[1]
    assert seen == buffer.N * buffer.T
    windows = buffer.N * buffer.T // buffer.L
    assert sequences == len(buffer.plan().t) and (sequences > windows if split else windows)


def test_split_episode_sequences_start_at_episode_starts_and_never_hold_two_episodes():
    _, buffer, _ = _rollout("gru", split_episodes=True)
    plan = buffer.plan()
    assert (plan.length >= 1).all() and (plan.length <= buffer.L).all()
    assert int(plan.length.sum()) == buffer.N * buffer.T  # every step in exactly one sequence
    for t, env, length in zip(
        plan.t.tolist(), plan.env.tolist(), plan.length.tolist(), strict=True
    ):
        inside = buffer.is_first[t + 1 : t + length, env]
        assert not inside.any(), f"sequence at t={t}, env {env} holds an episode start"
    starts = {(t, env) for t, env in zip(plan.t.tolist(), plan.env.tolist(), strict=True)}
    for t, env in buffer.is_first.nonzero().tolist():
        assert (t, env) in starts, f"episode start at t={t}, env {env} does not start a sequence"


def test_padded_steps_change_nothing_in_the_update():
    """With split episodes the loss and its gradient are those of the real steps alone: the
    same minibatch with other values in its padding gives the same gradient."""
    agent, buffer, _ = _rollout("lstm", split_episodes=True)
    buffer.compute_gae(torch.zeros(buffer.N), 0.99, 0.95)
    agent.cfg.epochs = 1
    weights = copy.deepcopy(agent.policy.state_dict())
    grads = []
    for garbage in (0.0, 1e3):
        mb = next(buffer.minibatches(10_000, torch.Generator().manual_seed(0)))  # all sequences
        assert mb.valid is not None and not mb.valid.all()
        pad = ~mb.valid
        for name in ("obs", "log_probs", "values", "advantages", "returns"):
            getattr(mb, name)[pad] = garbage
        one_batch = copy.copy(buffer)
        one_batch.minibatches = lambda *_, mb=mb: iter([mb])
        agent.policy.load_state_dict(weights)
        agent.update(one_batch, torch.Generator())
        grads.append([p.grad.clone() for p in agent.policy.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_select_state_rows_of_a_stored_state():
    _, buffer, _ = _rollout("lstm")
    stored = tuple(s[8] for s in buffer.states)
    rows = torch.tensor([2, 0])
    picked = select_state(stored, rows)
    assert torch.equal(picked[1][0], stored[1][2])


def _train(core: str, tmp_path, steps: int) -> dict:
    cfg = PPOConfig(
        env=ENV,
        core=core,
        num_envs=8,
        rollout_steps=64,
        bptt_len=16,
        minibatch_steps=128,
        total_steps=steps,
        hidden_size=32,
        lr=3e-3,
        device="cpu",
        seed=1,
        eval_episodes=32,
        output_dir=tmp_path / core,
    )
    return train_ppo(cfg)


def test_memory_solves_repeat_two_back_and_feed_forward_does_not(tmp_path):
    results = {
        core: _train(core, tmp_path, 40_960)["final_eval_return"]
        for core in ("gru", "lstm", "none")
    }
    assert results["gru"] > 0.9, results
    assert results["lstm"] > 0.9, results
    assert results["none"] < 0.7, results
    # the Tamiyo recurrence spec's ablation: wiping the memory every step, the GRU forgets the bits
    ablation = run_ppo_eval(PPOEvalConfig(tmp_path / "gru", episodes=32, reset_every=(1, 64)))
    assert ablation["return_vs_reset_every"]["1"] < ablation["return"] - 0.2, ablation
    assert (tmp_path / "gru" / "eval.json").is_file()
    assert (tmp_path / "gru" / "plots" / "return_vs_reset_every.png").is_file()


def test_resume_continues_with_saved_model_optimiser_and_counters(tmp_path):
    out = tmp_path / "run"
    base = [
        "ppo",
        "--env",
        ENV,
        "--num-envs",
        "4",
        "--rollout-steps",
        "32",
        "--bptt-len",
        "8",
        "--minibatch-steps",
        "64",
        "--hidden-size",
        "8",
        "--device",
        "cpu",
        "--eval-episodes",
        "4",
        "--checkpoint-interval",
        "1",
    ]
    assert main([*base, "--total-steps", "256", "--output-dir", str(out)]) == 0
    first = load_checkpoint(out / "checkpoints" / "last.pt")
    assert first["update"] == 2
    assert main(["ppo", "--resume", str(out), "--total-steps", "512"]) == 0
    second = load_checkpoint(out / "checkpoints" / "last.pt")
    assert second["update"] == 4 and second["step"] == 512
    adam_steps = [s["step"] for s in second["agent"]["optimizer"]["state"].values()]
    per_update = first["agent"]["optimizer"]["state"][0]["step"] / 2
    assert all(float(s) == 4 * per_update for s in adam_steps)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [128, 256, 384, 512]


@pytest.mark.parametrize(
    ("env", "message"),
    [("popgym/RepeatPreviousEsy", "RepeatPreviousEasy"), ("NoSuchEnv-v9", "NoSuchEnv-v9")],
)
def test_unknown_env_is_a_clear_cli_error(env, message, capsys):
    assert main(["ppo", "--env", env, "--device", "cpu", "--total-steps", "64"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("split", [False, True])
def test_refresh_states_recomputes_stored_states_with_current_weights(split):
    agent, buffer, _ = _rollout("lstm", split_episodes=split)
    plan = buffer.plan()
    before = buffer.state_at(plan.t, plan.env)
    buffer.refresh_states(agent.policy)  # same weights: the same states
    for a, b in zip(before, buffer.state_at(plan.t, plan.env), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.no_grad():
        for p in agent.policy.actor_memory.parameters():
            p.mul_(1.5)
    buffer.refresh_states(agent.policy)
    after = buffer.state_at(plan.t, plan.env)[0]
    at_start = plan.t == 0
    assert torch.equal(after[at_start], before[0][at_start])  # the rollout's first state stays
    assert not torch.allclose(after[~at_start], before[0][~at_start])


@pytest.mark.parametrize(("refresh", "expected"), [(True, 3), (False, 0)])
def test_update_refreshes_stored_states_before_every_epoch_but_the_first(
    refresh, expected, monkeypatch
):
    agent, buffer, _ = _rollout("gru")
    buffer.compute_gae(torch.zeros(4), 0.99, 0.95)
    agent.cfg = dataclasses.replace(agent.cfg, refresh_states=refresh)  # 4 epochs
    calls = []
    monkeypatch.setattr(buffer, "refresh_states", lambda policy: calls.append(policy))
    agent.update(buffer, torch.Generator().manual_seed(0))
    assert calls == [agent.policy] * expected


def test_refresh_states_skips_a_memoryless_policy():
    _, buffer, _ = _rollout("none")

    def policy(*args):
        raise AssertionError("a memoryless policy has no stored state to refresh")

    buffer.refresh_states(policy)
    assert buffer.states == ()


def test_burn_in_rederives_start_states_with_current_weights():
    agent, buffer, _ = _rollout("gru", burn_in=4)
    with torch.no_grad():
        for p in agent.policy.actor_memory.core.parameters():
            p.mul_(1.3)
        for mb in buffer.minibatches(512, torch.Generator().manual_seed(0)):
            start = agent.sequence_start_state(mb)[0]
            valid = mb.burn_in.valid
            assert valid.any() and not valid.all()
            assert torch.equal(start[~valid], mb.state[0][~valid])  # rollout start: stored
            assert not torch.allclose(start[valid], mb.state[0][valid])  # the rest: re-derived


def test_async_vector_env_trains_exactly_like_sync(tmp_path):
    params = {}
    for vector in ("sync", "async"):
        cfg = PPOConfig(
            env=ENV,
            vector=vector,
            num_envs=2,
            rollout_steps=16,
            bptt_len=8,
            minibatch_steps=16,
            total_steps=64,
            hidden_size=8,
            device="cpu",
            eval_episodes=2,
            deterministic=True,
            output_dir=tmp_path / vector,
        )
        train_ppo(cfg)
        params[vector] = load_checkpoint(tmp_path / vector / "checkpoints" / "last.pt")
    sync, parallel = (params[v]["agent"]["policy"] for v in ("sync", "async"))
    assert sync.keys() == parallel.keys()
    for key in sync:
        assert torch.equal(sync[key], parallel[key]), key


@pytest.mark.parametrize("separate_critic", [False, True])
def test_rnn_init_reaches_every_core_of_the_policy(separate_critic):
    """``--rnn-init pytorch`` builds every memory (actor's and critic's) with PyTorch's init;
    the default keeps memrl's orthogonal recurrent blocks and zero biases."""
    space = spaces.Box(0.0, 1.0, (3,), np.float32)
    for init in ("orthogonal", "pytorch"):
        cfg = PPOConfig(core="lstm", hidden_size=8, separate_critic=separate_critic, rnn_init=init)
        agent = PPOAgent(cfg, space, spaces.Discrete(2), torch.device("cpu"))
        cores = [m.core for m in (agent.policy.actor_memory, agent.policy.critic_memory) if m]
        assert len(cores) == 1 + separate_critic
        for core in cores:
            block = core.rnn.weight_hh_l0[:8]
            orthogonal = torch.allclose(block @ block.t(), torch.eye(8), atol=1e-5)
            assert orthogonal == (init == "orthogonal")
            assert bool(core.rnn.bias_hh_l0.eq(0).all()) == (init == "orthogonal")


def test_ppo_loss_is_the_clipped_surrogate_the_half_value_error_and_the_entropy_bonus():
    """On a tiny batch (3 steps x 2 sequences, the last step of one padding) ``ppo_loss`` is
    PPO's loss computed by hand from the five real steps: the clipped surrogate on normalised
    advantages, plus 0.5 * vf_coef * the squared value error, minus ent_coef * the entropy."""
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 3)
    actions = torch.randint(0, 3, (3, 2, 1))
    new_log_probs = logits.log_softmax(-1).gather(-1, actions)[..., 0]
    # ratios exp(-offset): 0.61, 1.65, 0.95, 0.74, 1.11; the clip (0.8, 1.2) bites on three
    offsets = torch.tensor([[0.5, -0.5], [0.05, 0.3], [-0.1, 9.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    mb = SequenceBatch(
        obs=torch.zeros(3, 2, 1),
        is_first=torch.zeros(3, 2, dtype=torch.bool),
        actions=actions,
        masks=None,
        log_probs=new_log_probs + offsets,
        values=torch.randn(3, 2),
        advantages=torch.randn(3, 2),
        returns=torch.randn(3, 2),
        state=(),
        valid=valid,
    )
    mb.advantages[2, 1] = mb.returns[2, 1] = 1e3  # padding: must count nowhere
    values = torch.randn(3, 2)
    cfg = PPOConfig(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    dist = make_distribution(action_head(spaces.Discrete(3)), logits, None)
    loss, stats = ppo_loss(dist, values, mb, cfg)

    rows = [(t, s) for t in range(3) for s in range(2) if valid[t, s]]
    n = len(rows)
    adv = [float(mb.advantages[r]) for r in rows]
    mean = sum(adv) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in adv) / (n - 1))
    adv = [(a - mean) / (std + 1e-8) for a in adv]
    ratio = [math.exp(-float(offsets[r])) for r in rows]
    clipped = [min(max(q, 0.8), 1.2) for q in ratio]
    surrogate = sum(max(-a * q, -a * c) for a, q, c in zip(adv, ratio, clipped, strict=True)) / n
    value = 0.5 * sum((float(values[r]) - float(mb.returns[r])) ** 2 for r in rows) / n
    probs = [logits[r].softmax(-1).tolist() for r in rows]
    entropy = sum(-sum(p * math.log(p) for p in dist_r) for dist_r in probs) / n
    assert float(loss) == pytest.approx(surrogate + 0.5 * value - 0.01 * entropy, rel=1e-5)
    assert float(stats["loss/policy"]) == pytest.approx(surrogate, rel=1e-5)
    assert float(stats["loss/value"]) == pytest.approx(value, rel=1e-5)
    assert float(stats["loss/entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert float(stats["clipfrac"]) == pytest.approx(3 / 5)
    kl = sum((q - 1) - math.log(q) for q in ratio) / n
    assert float(stats["approx_kl"]) == pytest.approx(kl, rel=1e-5)


def test_ppo_eval_takes_the_device_flag_every_trainer_takes(tmp_path, capsys):
    out = tmp_path / "run"
    train = ["--env", ENV, "--num-envs", "2", "--rollout-steps", "16", "--bptt-len", "8"]
    train += ["--hidden-size", "8", "--total-steps", "32", "--eval-episodes", "2"]
    assert main(["ppo", *train, "--device", "cpu", "--output-dir", str(out)]) == 0
    assert main(["ppo-eval", str(out), "--device", "cpu", "--episodes", "2"]) == 0
    assert json.loads((out / "eval.json").read_text())["episodes"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["ppo-eval", str(out), "--device", "banana"])
    assert exit_.value.code == 2
    assert "banana" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ppo-eval", "--help"])
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--device {auto,cpu,cuda,mps}" in text and "(default: auto)" in text
    assert "(default: no forced reset)" in text and "(default: )" not in text


def test_a_resume_counts_environment_steps_or_refuses(tmp_path, capsys):
    """Resuming with another --num-envs would count updates, not steps: it is refused, as is a
    --total-steps the run has already reached, before anything is touched."""
    run = tmp_path / "r"
    args = ["--device", "cpu", "--num-envs", "4", "--rollout-steps", "32", "--hidden-size", "16"]
    assert main(["ppo", *args, "--total-steps", "256", "--eval-episodes", "1",
                 "--output-dir", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["ppo", "--resume", str(run), "--num-envs", "8", "--total-steps", "1024"]) == 2
    assert "--num-envs would change the run's model or data" in capsys.readouterr().err
    assert main(["ppo", "--resume", str(run), "--total-steps", "200"]) == 2
    assert "already at step 256" in capsys.readouterr().err
    assert main(["ppo", "--resume", str(run), "--total-steps", "512"]) == 0
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == [128, 256, 384, 512]
    assert json.loads((run / "summary.json").read_text())["total_steps"] == 512
