"""Any rollout length: BPTT windows cut short by the rollout's end are padded and left out of
every loss term and statistic, a window longer than the rollout is clamped to it, and
minibatches of any size are whole sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from rollouts import synthetic_rollout

from memrl.cli import main
from memrl.cores import select_state
from memrl.rl import RolloutBuffer, SequenceBatch, ppo_loss
from memrl.rl.buffer import _Plan
from memrl.runs import read_metrics

CPU = torch.device("cpu")
SEQUENCE_FIELDS = ("obs", "is_first", "actions", "log_probs", "values", "advantages", "returns")


def _filled_buffer(T: int, N: int, bptt_len: int, seed: int = 0):
    """A rollout of a Discrete(3) GRU agent (see ``synthetic_rollout``), starts 15% of steps."""
    return synthetic_rollout(
        spaces.Discrete(3), T=T, N=N, bptt_len=bptt_len, start_probability=0.15, seed=seed
    )


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


META = torch.device("meta")  # tensors without data: where a buffer puts them, at no cost


def _numbered_buffer(T: int, N: int, bptt_len: int, **options) -> RolloutBuffer:
    """A buffer whose observation at (t, env) is (t, env, 0) and whose stored state before that
    step is ((t, env),): every minibatch row says which step of which env it holds. Masks of two
    actions are on, every action allowed."""
    buffer = RolloutBuffer(T, N, 3, (1,), torch.long, 2, bptt_len, CPU, **options)
    steps, envs = torch.arange(T)[:, None].expand(T, N), torch.arange(N).expand(T, N)
    buffer.obs[..., 0], buffer.obs[..., 1] = steps, envs
    for t in range(T):
        buffer.store_state(t, (torch.stack([steps[t], envs[t]], -1).float(),))
    return buffer


@pytest.mark.parametrize(
    ("action_shape", "action_dtype"), [((2,), torch.long), ((3,), torch.float32)]
)
def test_buffer_tensors_have_their_shapes_and_dtypes_and_live_on_its_device(
    action_shape, action_dtype
):
    T, N = 5, 3
    buffer = RolloutBuffer(T, N, 4, action_shape, action_dtype, 6, 4, META)
    f32, flag = torch.float32, torch.bool
    expected = {
        "obs": ((T, N, 4), f32),
        "is_first": ((T, N), flag),
        "actions": ((T, N, *action_shape), action_dtype),
        "masks": ((T, N, 6), flag),
        "log_probs": ((T, N), f32),
        "values": ((T, N), f32),
        "rewards": ((T, N), f32),
        "dones": ((T, N), flag),
        "advantages": ((T, N), f32),
        "returns": ((T, N), f32),
    }
    for name, (shape, dtype) in expected.items():
        x = getattr(buffer, name)
        assert (tuple(x.shape), x.dtype, x.device) == (shape, dtype, META), name
    assert buffer.states == ()  # nothing stored yet
    buffer.store_state(0, (torch.zeros(N, 7, device=META), torch.zeros(N, 2, 7, device=META)))
    assert [(tuple(s.shape), s.device) for s in buffer.states] == [
        ((T, N, 7), META),
        ((T, N, 2, 7), META),
    ]


def test_action_masks_allow_every_action_until_the_rollout_stores_them():
    buffer = RolloutBuffer(4, 2, 3, (1,), torch.long, 5, 4, CPU)
    assert buffer.masks.shape == (4, 2, 5) and buffer.masks.dtype == torch.bool
    assert buffer.masks.all()
    assert RolloutBuffer(4, 2, 3, (1,), torch.long, None, 4, CPU).masks is None


def test_burn_in_windows_are_built_on_the_buffers_device():
    buffer = RolloutBuffer(8, 3, 4, (1,), torch.long, None, 4, META, burn_in=2)
    buffer.store_state(0, (torch.zeros(3, 5, device=META),))
    plan = _Plan(*(torch.tensor(x, device=META) for x in ([0, 4], [1, 2], [4, 4])))
    burn = buffer._burn_in_windows(plan)
    for x, shape in [(burn.obs, (2, 2, 4)), (burn.is_first, (2, 2)), (burn.state[0], (2, 5)),
                     (burn.valid, (2,))]:  # fmt: skip
        assert (tuple(x.shape), x.device) == (shape, META)


def test_a_buffer_without_burn_in_or_stored_state_gives_minibatches_without_either():
    """Built with the defaults (no burn-in) and filled by a memoryless policy (no state ever
    stored), a buffer yields minibatches with no burn-in window and an empty state."""
    buffer = RolloutBuffer(8, 2, 3, (1,), torch.long, None, 4, CPU)
    batches = list(buffer.minibatches(8, torch.Generator().manual_seed(0)))
    assert [mb.obs.shape[:2] for mb in batches] == [(4, 2), (4, 2)]
    for mb in batches:
        assert mb.burn_in is None and mb.state == () and mb.masks is None and mb.valid is None


def test_split_episode_sequences_restart_at_every_episode_start_even_mid_rollout():
    """A rollout that begins mid-episode (every rollout but the first) starts each env's first
    sequence at t=0 all the same. Two envs, windows of 3 steps, worked by hand:
    env 0, episode start at 2: steps since a start 0 1 | 0 1 2 | 3 -> sequences at 0, 2, 5;
    env 1, starts at 1 and 5:  0 | 0 1 2 | 3 | 0 -> sequences at 0, 1, 4, 5."""
    buffer = RolloutBuffer(6, 2, 3, (1,), torch.long, None, 3, CPU, split_episodes=True)
    buffer.is_first[2, 0] = buffer.is_first[1, 1] = buffer.is_first[5, 1] = True
    plan = buffer.plan()
    assert plan.t.tolist() == [0, 2, 5, 0, 1, 4, 5]
    assert plan.env.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert plan.length.tolist() == [2, 3, 1, 1, 3, 1, 1]


def test_burn_in_windows_are_the_b_steps_before_each_sequence_from_the_state_stored_there():
    buffer = _numbered_buffer(T=8, N=2, bptt_len=4, burn_in=4)
    buffer.is_first[1, 0] = True
    (mb,) = buffer.minibatches(10_000, torch.Generator().manual_seed(0))
    starts, envs = mb.obs[0, :, 0].long(), mb.obs[0, :, 1].long()
    assert sorted(starts.tolist()) == [0, 0, 4, 4]
    burn = mb.burn_in
    # the sequences at t=4 have their 4 steps (window from t=0); those at t=0 have none
    assert burn.valid.tolist() == (starts == 4).tolist()
    at4 = burn.valid
    window = torch.arange(4)[:, None].expand(4, 2)  # steps 0..3 of both envs
    assert torch.equal(burn.obs[:, at4, 0], window.float())
    assert torch.equal(burn.obs[:, at4, 1], envs[at4].float().expand(4, -1))
    assert torch.equal(burn.is_first[:, at4], (window == 1) & (envs[at4] == 0))
    assert torch.equal(burn.state[0][at4], torch.stack([starts[at4] - 4, envs[at4]], -1).float())
    assert torch.equal(mb.state[0], torch.stack([starts, envs], -1).float())


def test_a_one_step_rollout_with_burn_in_keeps_every_stored_start_state():
    buffer = _numbered_buffer(T=1, N=3, bptt_len=16, burn_in=1)
    (mb,) = buffer.minibatches(10_000, torch.Generator().manual_seed(0))
    assert mb.obs.shape[:2] == (1, 3) and mb.valid is None
    assert not mb.burn_in.valid.any()  # no step before the rollout to burn in from
    envs = mb.obs[0, :, 1]
    assert torch.equal(mb.state[0], torch.stack([torch.zeros(3), envs], -1))


def test_every_sequence_carries_the_action_masks_of_its_steps():
    buffer = _numbered_buffer(T=8, N=2, bptt_len=3)  # windows at 0, 3, 6 (the last 2 steps)
    buffer.masks[..., 0] = torch.rand(8, 2, generator=torch.Generator().manual_seed(1)) < 0.5
    seen = 0
    for mb in buffer.minibatches(4, torch.Generator().manual_seed(0)):
        assert mb.masks.shape == (*mb.obs.shape[:2], 2) and mb.masks.dtype == torch.bool
        t, env = mb.real(mb.obs[..., 0]).long(), mb.real(mb.obs[..., 1]).long()
        assert torch.equal(mb.real(mb.masks), buffer.masks[t, env])
        seen += len(t)
    assert seen == 16


def test_sequences_are_shuffled_by_the_given_generator_alone():
    buffer = _numbered_buffer(T=16, N=2, bptt_len=4)  # 8 sequences of 4 steps
    plan = buffer.plan()
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    expected = [(int(plan.t[i]), int(plan.env[i])) for i in order]
    for global_seed in (0, 1):  # torch's global generator plays no part
        torch.manual_seed(global_seed)
        batches = list(buffer.minibatches(4, torch.Generator().manual_seed(3)))  # one sequence each
        assert [(int(mb.obs[0, 0, 0]), int(mb.obs[0, 0, 1])) for mb in batches] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minibatches_built_on_cuda_equal_those_built_on_the_cpu():
    """Plan, burn-in windows and minibatches live on the buffer's device and hold exactly what
    the same buffer on the CPU gives (split episodes, burn-in, masks and padding all on)."""

    def filled(device: torch.device) -> RolloutBuffer:
        gen = torch.Generator().manual_seed(0)
        buffer = RolloutBuffer(10, 3, 2, (1,), torch.long, 3, 4, device, burn_in=2,
                               split_episodes=True)  # fmt: skip
        buffer.is_first.copy_(torch.rand(10, 3, generator=gen) < 0.3)
        buffer.masks.copy_(torch.rand(10, 3, 3, generator=gen) < 0.5)
        buffer.actions.copy_(torch.randint(0, 3, (10, 3, 1), generator=gen))
        for name in ("obs", "log_probs", "values", "advantages", "returns"):
            x = getattr(buffer, name)
            x.copy_(torch.randn(x.shape, generator=gen))
        for t in range(10):
            buffer.store_state(t, (torch.randn(3, 5, generator=gen).to(device),))
        return buffer

    cuda = torch.device("cuda")
    on_cpu, on_cuda = (list(filled(d).minibatches(8, torch.Generator().manual_seed(0)))
                       for d in (CPU, cuda))  # fmt: skip
    assert len(on_cpu) == len(on_cuda) > 1
    for a, b in zip(on_cpu, on_cuda, strict=True):
        pairs = [(getattr(a, k), getattr(b, k)) for k in (*SEQUENCE_FIELDS, "masks", "valid")]
        pairs += [(getattr(a.burn_in, k), getattr(b.burn_in, k)) for k in ("obs", "is_first")]
        pairs += [(a.burn_in.valid, b.burn_in.valid), (a.state[0], b.state[0])]
        pairs += [(a.burn_in.state[0], b.burn_in.state[0])]
        for x, y in pairs:
            assert y.device.type == "cuda" and torch.equal(x, y.cpu())
