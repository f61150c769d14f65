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
from rollouts import synthetic_rollout

from memrl.cli import main
from memrl.cores import select_state
from memrl.envs import make_vector_env
from memrl.rl import PPOAgent, PPOConfig, action_head, make_distribution, ppo_loss, train_ppo
from memrl.rl import agent as agent_module
from memrl.rl.buffer import RolloutBuffer, SequenceBatch
from memrl.rl.evaluate import PPOEvalConfig, run_ppo_eval
from memrl.rl.normalize import RewardScaler
from memrl.rl.rollout import Carry, EpisodeTracker, collect_rollout
from memrl.runs import distributed, load_checkpoint, read_metrics


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


@pytest.mark.parametrize(
    "core",
    ["gru", "lstm", "s4d", "mingru", "minlstm", "linear_attention", "lru", "ffm", "mamba", "gtrxl"],
)
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
    assert len(buffer.states) == len(agent.policy.initial_state(1))  # (h, c) for the LSTM, ...
    two = ("lstm", "linear_attention", "mamba", "gtrxl")  # (h, c), (S, z), (h, window), ...
    assert len(buffer.states) == (2 if core in two else 1)


@pytest.mark.parametrize(
    ("core", "burn_in", "split"),
    [("gru", 0, False), ("lstm", 0, False), ("lstm", 3, False), ("gru", 8, False),
     ("lstm", 0, True), ("gru", 3, True), ("mingru", 3, False), ("minlstm", 0, True)],
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


CPU, META = torch.device("cpu"), torch.device("meta")
OBS_SPACE = spaces.Box(-1.0, 1.0, (3,), np.float32)


def _ppo_loss_by_hand(log_ratios, advantages, values, returns, cfg) -> dict[str, float]:
    """PPO's loss and statistics from the formulas (Schulman et al. 2017) in Python floats, for
    steps whose policy is uniform over two actions (entropy log 2)."""
    n = len(advantages)
    adv = list(advantages)
    if cfg.norm_adv and n > 1:  # one step has no spread to normalise by
        mean = sum(adv) / n
        std = math.sqrt(sum((a - mean) ** 2 for a in adv) / (n - 1))
        adv = [(a - mean) / (std + 1e-8) for a in adv]
    ratios = [math.exp(x) for x in log_ratios]
    low, high = 1 - cfg.clip_coef, 1 + cfg.clip_coef
    clipped = [min(max(r, low), high) for r in ratios]
    policy = sum(max(-a * r, -a * c) for a, r, c in zip(adv, ratios, clipped, strict=True)) / n
    value = 0.5 * sum((v - g) ** 2 for v, g in zip(values, returns, strict=True)) / n
    entropy = math.log(2)
    return {
        "loss": policy - cfg.ent_coef * entropy + cfg.vf_coef * value,
        "loss/policy": policy,
        "loss/value": value,
        "loss/entropy": entropy,
        "approx_kl": sum((r - 1) - math.log(r) for r in ratios) / n,
        "clipfrac": sum(abs(r - 1) > cfg.clip_coef for r in ratios) / n,
    }


@pytest.mark.parametrize(
    ("log_ratios", "advantages", "options"),
    [
        pytest.param([0.5], [2.0], {}, id="one step: advantage left as it is"),
        pytest.param([0.1, -0.3], [1.0, 3.0], {}, id="two steps: normalised to -+1/sqrt2"),
        pytest.param([0.4, -0.4, 0.05, 0.3], [1.0, -1.0, 0.5, 2.0], {},
                     id="ratio above 1 + clip with positive advantage: clipped"),
        pytest.param([0.1, -0.1], [0.0, 1.4142135e-8], {},
                     id="spread near zero: std + 1e-8 keeps it finite"),
        pytest.param([0.0, 0.0, 0.1], [1.0, -2.0, 0.5], {"clip_coef": 0.0},
                     id="clip 0: only moved steps count as clipped"),
        pytest.param([0.4, -0.3], [1.0, -0.5], {"norm_adv": False}, id="no normalisation"),
    ],
)  # fmt: skip
def test_ppo_loss_of_a_single_sequence_matches_the_formulas(log_ratios, advantages, options):
    n = len(log_ratios)
    cfg = PPOConfig(ent_coef=0.01, vf_coef=0.5, **options)
    dist = make_distribution(action_head(spaces.Discrete(2)), torch.zeros(n, 1, 2), None)
    actions = torch.zeros(n, 1, 1, dtype=torch.long)
    new_values = torch.linspace(-0.5, 0.7, n)[:, None]
    mb = SequenceBatch(
        obs=torch.zeros(n, 1, 1),
        is_first=torch.zeros(n, 1, dtype=torch.bool),
        actions=actions,
        masks=None,
        log_probs=dist.log_prob(actions) - torch.tensor(log_ratios)[:, None],
        values=torch.zeros(n, 1),
        advantages=torch.tensor(advantages)[:, None],
        returns=torch.linspace(1.0, -1.0, n)[:, None],
        state=(),
    )
    loss, stats = ppo_loss(dist, new_values, mb, cfg)
    as_floats = [x[:, 0].tolist() for x in (mb.advantages, new_values, mb.returns)]
    hand = _ppo_loss_by_hand(log_ratios, *as_floats, cfg)
    assert float(loss) == pytest.approx(hand.pop("loss"), rel=1e-5, abs=1e-7)
    for key, value in hand.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_action_masks_come_from_the_vector_envs_info_as_bool_rows():
    agent = PPOAgent(PPOConfig(core="gru", hidden_size=4), OBS_SPACE, spaces.Discrete(3), CPU)
    info = {"action_mask": np.array([[1, 0, 1], [0, 1, 0]], dtype=np.int8)}
    expected = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(agent.mask_tensor(info), expected)
    assert agent.mask_tensor({"final_obs": None}) is None  # an env without masks


def test_the_agents_categorical_renormalises_over_the_allowed_actions():
    agent = PPOAgent(PPOConfig(core="gru", hidden_size=4), OBS_SPACE, spaces.Discrete(3), CPU)
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    dist = agent.distribution(logits, mask)
    log_probs = dist.log_prob(torch.tensor([[0], [1]]))
    by_hand = [0.5 - math.log(math.exp(0.5) + math.exp(2.0)), 0.0 - math.log(math.e + 1.0)]
    assert log_probs.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert dist.log_prob(torch.tensor([[1], [2]])).tolist() == [-math.inf, -math.inf]


def test_a_box_action_space_gets_a_diagonal_gaussian_with_a_trained_log_std():
    agent = PPOAgent(PPOConfig(core="gru", hidden_size=4), OBS_SPACE, spaces.Box(-1, 1, (2,)), CPU)
    log_std = agent.policy.log_std
    assert torch.equal(log_std, torch.zeros(2))  # std 1 to start with
    assert any(p is log_std for p in agent.optimizer.param_groups[0]["params"])
    with torch.no_grad():
        log_std.copy_(torch.tensor([0.5, -1.0]))
    mean, action = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.4, 0.3]])
    log_prob = float(agent.distribution(mean, None).log_prob(action).detach()[0])
    by_hand = sum(
        -0.5 * ((a - m) / math.exp(s)) ** 2 - s - 0.5 * math.log(2 * math.pi)
        for a, m, s in [(0.4, 0.1, 0.5), (0.3, -0.2, -1.0)]
    )
    assert log_prob == pytest.approx(by_hand, rel=1e-6)


def test_the_optimiser_is_adam_with_the_configured_lr_and_eps_1e_5():
    """Adam's first step moves each weight by lr * g / (|g| + eps) (bias-corrected moments g
    and g^2): with g near eps the step shows both lr and eps."""
    cfg = PPOConfig(core="gru", hidden_size=4, lr=0.0123)
    agent = PPOAgent(cfg, OBS_SPACE, spaces.Discrete(2), CPU)
    params = list(agent.policy.parameters())
    before = [p.detach().clone() for p in params]
    pattern = torch.tensor([1e-5, -3e-5, 2.0, -1e-6])
    for p in params:
        p.grad = pattern.repeat(p.numel() // 4 + 1)[: p.numel()].view_as(p)
    agent.optimizer.step()
    for p, old in zip(params, before, strict=True):
        expected = old - 0.0123 * p.grad / (p.grad.abs() + 1e-5)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_observations_are_flattened_to_float32_rows():
    agent = PPOAgent(PPOConfig(core="none", hidden_size=4), spaces.Box(-9, 9, (2, 3)),
                     spaces.Discrete(2), CPU)  # fmt: skip
    obs = np.arange(12, dtype=np.float64).reshape(2, 2, 3) / 7
    out = agent.obs_tensor(obs, update=True)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor(obs.reshape(2, 6), dtype=torch.float32))


def test_observation_normalisation_uses_running_statistics_updated_only_when_asked():
    cfg = PPOConfig(core="none", hidden_size=4, norm_obs=True)
    agent = PPOAgent(cfg, spaces.Box(-20, 20, (3,)), spaces.Discrete(2), CPU)
    rng = np.random.default_rng(0)
    batch = rng.normal(2.0, 3.0, (5, 3))
    out = agent.obs_tensor(batch, update=True)
    # Chan et al.'s parallel update of the prior (mean 0, var 1, count 1e-4) by the batch
    n, prior = 5, 1e-4
    total = n + prior
    mean = batch.mean(0) * n / total
    var = (prior + batch.var(0) * n + batch.mean(0) ** 2 * prior * n / total) / total
    np.testing.assert_allclose(out.numpy(), (batch - mean) / (np.sqrt(var) + 1e-8), rtol=1e-5)
    later = rng.normal(0.0, 50.0, (4, 3))  # large: some clipped to +-10
    out = agent.obs_tensor(later, update=False)  # normalised by the same statistics
    expected = np.clip((later - mean) / (np.sqrt(var) + 1e-8), -10, 10)
    assert (np.abs(expected) == 10).any()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    assert agent.obs_norm.stats.count == pytest.approx(total)


def test_agent_state_round_trips_policy_optimiser_and_observation_statistics():
    cfg = PPOConfig(core="lstm", hidden_size=4, norm_obs=True)
    torch.manual_seed(0)
    trained = PPOAgent(cfg, OBS_SPACE, spaces.Discrete(2), CPU)
    trained.obs_tensor(np.random.default_rng(0).normal(3.0, 2.0, (6, 3)), update=True)
    for p in trained.policy.parameters():  # one Adam step: moments to save
        p.grad = torch.randn_like(p)
    trained.optimizer.step()
    torch.manual_seed(1)
    fresh = PPOAgent(cfg, OBS_SPACE, spaces.Discrete(2), CPU)
    saved = trained.state_dict()
    assert set(saved) == {"policy", "optimizer", "obs_norm"}  # the checkpoint's layout
    fresh.load_state_dict(copy.deepcopy(saved))

    a, b = trained.policy.state_dict(), fresh.policy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = trained.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, moments in a["state"].items():
        assert all(torch.equal(moments[k], b["state"][i][k]) for k in moments)
    a, b = trained.obs_norm.stats, fresh.obs_norm.stats
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var) and a.count == b.count
    obs = np.random.default_rng(1).normal(size=(2, 3))
    assert torch.equal(trained.obs_tensor(obs, update=False), fresh.obs_tensor(obs, update=False))


def test_an_agent_keeps_its_policy_observations_and_masks_on_its_device():
    agent = PPOAgent(PPOConfig(core="gru", hidden_size=4), OBS_SPACE, spaces.Discrete(3), META)
    assert {p.device for p in agent.policy.parameters()} == {META}
    assert agent.obs_tensor(np.zeros((2, 3), np.float32), update=False).device == META
    assert agent.mask_tensor({"action_mask": np.ones((2, 3), bool)}).device == META


def _record_update(monkeypatch) -> tuple[list[dict[str, float]], list[float]]:
    """Record the statistics ``ppo_loss`` gives for every minibatch of the updates that follow,
    and the gradient norm of every optimiser step."""
    stats, norms = [], []
    real_loss, real_step = agent_module.ppo_loss, distributed.optimizer_step

    def loss(*args):
        out = real_loss(*args)
        stats.append({k: float(v) for k, v in out[1].items()})
        return out

    def step(*args):
        norms.append(real_step(*args))
        return norms[-1]

    monkeypatch.setattr(agent_module, "ppo_loss", loss)
    monkeypatch.setattr(distributed, "optimizer_step", step)
    return stats, norms


@pytest.mark.parametrize(
    ("action_space", "masked"),
    [(spaces.Discrete(4), True), (spaces.MultiDiscrete([3, 2]), True),
     (spaces.Box(-1.0, 1.0, (2,)), False)],
)  # fmt: skip
def test_an_updates_first_minibatch_sees_the_distribution_the_rollout_acted_with(
    action_space, masked, monkeypatch
):
    """Masks and Gaussian log-stds reach the update: before any step, every ratio is 1. (One
    epoch of one minibatch: the update reports that minibatch's statistics.)"""
    agent, buffer = synthetic_rollout(action_space, masked, epochs=1, minibatch_steps=10_000)
    stats, norms = _record_update(monkeypatch)
    result = agent.update(buffer, torch.Generator().manual_seed(0))
    (first,) = stats
    assert result == pytest.approx({**first, "grad_norm": norms[0]}, rel=1e-6)
    assert first["approx_kl"] < 1e-5 and first["clipfrac"] == 0
    if agent.head.kind == "gaussian":  # log-std 0: the entropy of two standard normals
        assert first["loss/entropy"] == pytest.approx(1 + math.log(2 * math.pi), rel=1e-6)


def test_update_reports_each_statistic_averaged_over_all_its_minibatches(monkeypatch):
    agent, buffer = synthetic_rollout(spaces.Discrete(3), epochs=2, minibatch_steps=12)
    stats, norms = _record_update(monkeypatch)
    result = agent.update(buffer, torch.Generator().manual_seed(0))
    assert len(stats) == len(norms) == 6  # 9 sequences of 4 steps, 3 a minibatch, 2 epochs
    expected = {k: sum(s[k] for s in stats) / 6 for k in stats[0]}
    expected["grad_norm"] = sum(norms) / 6
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def _epochs_run(kls: list[float], target: float, other_rank: float = 0.0, ranks: int = 1) -> int:
    """Epochs until the first whose last minibatch's KL, averaged over ranks, exceeds target."""
    for epoch, kl in enumerate(kls):
        if (kl + other_rank) / ranks > target:
            return epoch + 1
    return len(kls)


def _last_kl_of_each_epoch(monkeypatch, epochs: int = 3) -> list[float]:
    agent, buffer = synthetic_rollout(spaces.Discrete(3), epochs=epochs, minibatch_steps=12)
    stats, _ = _record_update(monkeypatch)
    agent.update(buffer, torch.Generator().manual_seed(0))
    assert len(stats) == 3 * epochs
    return [stats[3 * e + 2]["approx_kl"] for e in range(epochs)]


def test_target_kl_stops_after_the_first_epoch_whose_last_minibatch_exceeds_it(monkeypatch):
    kls = _last_kl_of_each_epoch(monkeypatch)
    assert kls[0] > 0
    for target in (kls[0] / 2, kls[0], 2 * max(kls)):  # at kls[0] exactly: not exceeded
        agent, buffer = synthetic_rollout(
            spaces.Discrete(3), epochs=3, minibatch_steps=12, target_kl=target
        )
        stats, _ = _record_update(monkeypatch)
        result = agent.update(buffer, torch.Generator().manual_seed(0))
        epochs = _epochs_run(kls, target)
        assert len(stats) == 3 * epochs, target
        assert [s["approx_kl"] for s in stats[2::3]] == kls[:epochs]
        assert result["approx_kl"] == pytest.approx(sum(s["approx_kl"] for s in stats) / len(stats))
    assert _epochs_run(kls, kls[0] / 2) == 1 and _epochs_run(kls, kls[0]) > 1


@pytest.mark.parametrize(("target", "other_rank"), [(1.0, 3.0), (0.75, 0.0)])
def test_every_rank_stops_on_the_kl_averaged_over_ranks(target, other_rank, monkeypatch):
    """Under torchrun each rank's KL is averaged over ranks before the comparison: a rank below
    target_kl stops when the mean exceeds it; one above it goes on when the mean does not.
    (Two ranks, the other's KL a multiple of this rank's first-epoch KL.)"""
    kls = _last_kl_of_each_epoch(monkeypatch)
    target, other_rank = target * kls[0], other_rank * kls[0]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_sum", lambda x: x + other_rank)
    agent, buffer = synthetic_rollout(
        spaces.Discrete(3), epochs=3, minibatch_steps=12, target_kl=target
    )
    stats, _ = _record_update(monkeypatch)
    agent.update(buffer, torch.Generator().manual_seed(0))
    epochs = _epochs_run(kls, target, other_rank, ranks=2)
    assert len(stats) == 3 * epochs
    assert epochs == 1 if other_rank else epochs > 1


def test_an_update_is_reproduced_by_its_generator_whatever_the_global_seed():
    weights = []
    for global_seed, seed in [(1, 0), (2, 0), (1, 1)]:
        agent, buffer = synthetic_rollout(spaces.Discrete(3), epochs=2, minibatch_steps=12)
        torch.manual_seed(global_seed)
        agent.update(buffer, torch.Generator().manual_seed(seed))
        weights.append(agent.policy.state_dict())
    same = [all(torch.equal(w[k], weights[0][k]) for k in w) for w in weights[1:]]
    assert same == [True, False]  # another generator seed: another minibatch order
