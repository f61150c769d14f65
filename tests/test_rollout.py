"""Any rollout length: BPTT windows cut short by the rollout's end are padded and left out of
every loss term and statistic, a window longer than the rollout is clamped to it, and
minibatches of any size are whole sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from memrl.cli import main
from memrl.cores import select_state
from memrl.rl import PPOAgent, PPOConfig, RolloutBuffer, SequenceBatch, ppo_loss
from memrl.runs import read_metrics

CPU = torch.device("cpu")
SEQUENCE_FIELDS = ("obs", "is_first", "actions", "log_probs", "values", "advantages", "returns")


def _filled_buffer(T: int, N: int, bptt_len: int, seed: int = 0):
    """An agent and a buffer of T steps of N envs with random observations, rewards and episode
    starts, filled as ``collect_rollout`` fills it (the policy's actions, log-probs, values and
    the state before every step), GAE computed."""
    torch.manual_seed(seed)
    cfg = PPOConfig(core="gru", hidden_size=8, num_envs=N, rollout_steps=T, bptt_len=bptt_len)
    agent = PPOAgent(cfg, spaces.Box(-1.0, 1.0, (3,), np.float32), spaces.Discrete(3), CPU)
    buffer = RolloutBuffer(T, N, 3, (1,), torch.long, None, bptt_len, CPU)
    starts = torch.rand(T + 1, N) < 0.15  # (T+1, N): is_first, and dones one step earlier
    starts[0] = True
    state = agent.policy.initial_state(N)
    with torch.no_grad():
        for t in range(T):
            buffer.store_state(t, state)
            obs = torch.randn(N, 3)
            params, value, state = agent.policy.step(obs, state, starts[t])
            dist = agent.distribution(params, None)
            action = dist.sample()
            buffer.obs[t], buffer.is_first[t], buffer.actions[t] = obs, starts[t], action
            buffer.log_probs[t], buffer.values[t] = dist.log_prob(action), value
            buffer.rewards[t], buffer.dones[t] = torch.randn(N), starts[t + 1]
    buffer.compute_gae(torch.zeros(N), 0.99, 0.95)
    return agent, buffer


def test_windows_that_do_not_divide_the_rollout_end_shorter_and_their_padding_is_marked():
    _, buffer = _filled_buffer(T=25, N=3, bptt_len=16)
    plan = buffer.plan()
    assert plan.t.tolist() == [0, 16] * 3 and plan.env.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.length.tolist() == [16, 9] * 3
    (mb,) = buffer.minibatches(10_000, torch.Generator().manual_seed(0))  # every sequence
    assert mb.obs.shape[:2] == (16, 6) and mb.valid is not None
    lengths = mb.valid.sum(0)
    assert sorted(lengths.tolist()) == [9, 9, 9, 16, 16, 16]
    short = lengths == 9
    assert mb.valid[:9].all() and not mb.valid[9:, short].any() and mb.valid[9:, ~short].all()
    assert mb.real(mb.values).numel() == 25 * 3  # every real step once, no padding


def test_the_loss_of_a_padded_minibatch_is_the_loss_of_its_real_steps_alone():
    """ppo_loss over the padded (16, 6) minibatch, with garbage in the padding, equals ppo_loss
    over the 75 real steps laid end to end, each sequence unrolled on its real steps only:
    padding counts in no term (advantage normalisation included) and in no statistic."""
    agent, buffer = _filled_buffer(T=25, N=3, bptt_len=16)
    with torch.no_grad():  # other weights than the rollout's: ratios away from 1
        for p in agent.policy.parameters():
            p.mul_(1.2)
    (mb,) = buffer.minibatches(10_000, torch.Generator().manual_seed(0))
    pad = ~mb.valid
    for name in ("obs", "log_probs", "values", "advantages", "returns"):
        getattr(mb, name)[pad] = 1e3
    params, values, _ = agent.policy(mb.obs, mb.state, mb.is_first)
    loss, stats = ppo_loss(agent.distribution(params, None), values, mb, agent.cfg)

    pieces = []
    for s in range(mb.obs.shape[1]):
        n = int(mb.valid[:, s].sum())
        steps = slice(0, n), slice(s, s + 1)
        state = select_state(mb.state, torch.tensor([s]))
        p, v, _ = agent.policy(mb.obs[steps], state, mb.is_first[steps])
        pieces.append((p, v, *(getattr(mb, k)[steps] for k in SEQUENCE_FIELDS)))
    joined = [torch.cat(parts) for parts in zip(*pieces, strict=True)]  # (75, 1, ...)
    real_params, real_values, *rest = joined
    unpadded = SequenceBatch(**dict(zip(SEQUENCE_FIELDS, rest, strict=True)), masks=None, state=())
    assert unpadded.values.shape == (75, 1)
    hand_loss, hand_stats = ppo_loss(
        agent.distribution(real_params, None), real_values, unpadded, agent.cfg
    )
    torch.testing.assert_close(loss, hand_loss)
    for key, value in stats.items():
        torch.testing.assert_close(value, hand_stats[key], msg=key)


def test_a_bptt_len_longer_than_the_rollout_is_clamped_to_it():
    _, buffer = _filled_buffer(T=25, N=2, bptt_len=64)
    assert buffer.L == 25
    assert buffer.plan().length.tolist() == [25, 25]
    (mb,) = buffer.minibatches(10_000, torch.Generator().manual_seed(0))
    assert mb.obs.shape[:2] == (25, 2) and mb.valid is None


def test_minibatches_of_any_size_are_whole_sequences_batched_by_their_first_step():
    _, buffer = _filled_buffer(T=64, N=4, bptt_len=16)
    batches = list(buffer.minibatches(100, torch.Generator().manual_seed(0)))
    # 16 sequences of 16 steps; starts at 0, 16, ..., 240 fall in [0,100), [100,200), [200,300)
    assert [mb.obs.shape[1] for mb in batches] == [7, 6, 3]
    assert all(mb.valid is None and mb.obs.shape[0] == 16 for mb in batches)
    first_obs = torch.cat([mb.obs[0] for mb in batches])  # random: one row per sequence
    assert len({tuple(row.tolist()) for row in first_obs}) == 16


@pytest.mark.parametrize(
    ("flags", "steps"),
    [
        (["--num-envs", "3", "--rollout-steps", "25", "--total-steps", "150"], [75, 150]),
        (["--num-envs", "2", "--rollout-steps", "25", "--bptt-len", "64", "--total-steps", "100"],
         [50, 100]),
        (["--num-envs", "4", "--rollout-steps", "32", "--minibatch-steps", "100", "--bptt-len",
          "16", "--total-steps", "256"], [128, 256]),
        (["--num-envs", "3", "--rollout-steps", "25", "--split-episodes", "--burn-in", "4",
          "--total-steps", "150"], [75, 150]),
    ],
)  # fmt: skip
def test_ppo_trains_with_any_rollout_length_and_minibatch_size(flags, steps, tmp_path):
    out = tmp_path / "run"
    base = ["ppo", "--device", "cpu", "--hidden-size", "8", "--eval-episodes", "2"]
    assert main([*base, *flags, "--output-dir", str(out)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == steps
    assert all(np.isfinite(r["loss/policy"]) and np.isfinite(r["loss/value"]) for r in rows)
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bptt-len", "0"], "--bptt-len 0; expected a positive integer"),
        (["--burn-in", "20"], "--burn-in 20; expected 0 <= --burn-in <= 16 (--bptt-len"),
        (["--rollout-steps", "8", "--burn-in", "9"], "--burn-in 9; expected 0 <= --burn-in <= 8"),
    ],
)
def test_rollout_shape_errors_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:  # tyro reports the config's ValueError
        main(["ppo", "--device", "cpu", *flags])
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.replace("│", " ").split())
