"""Every formula against a hand computation on a tiny fixed input: GAE, the truncation
bootstrap, the PPO loss, the RSSM's balanced KL with free bits, the S4D discretisation and
recurrence, and the checkpoint checksum. The hand side uses plain Python numbers (``math``,
``cmath``), never the code under test."""

from __future__ import annotations

import cmath
import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from memrl.cores import S4DCore
from memrl.envs import make_vector_env
from memrl.rl import PPOAgent, PPOConfig, action_head, make_distribution, ppo_loss
from memrl.rl.buffer import RolloutBuffer, SequenceBatch
from memrl.rl.normalize import RewardScaler
from memrl.rl.rollout import Carry, EpisodeTracker, collect_rollout
from memrl.runs import CheckpointError, load_checkpoint, save_checkpoint
from memrl.world_model import RSSM, RSSMConfig, rssm_loss


# -- GAE ---------------------------------------------------------------------------------------
def test_gae_by_hand_with_an_episode_end_and_lambda_below_one():
    """Two envs, four steps; env 0's episode ends at step 1 (nothing flows back across it), env
    1's runs on and is bootstrapped from ``last_value``."""
    gamma, lam = 0.9, 0.8
    rewards = [[1.0, 0.5], [2.0, -1.0], [0.0, 0.25], [-0.5, 1.0]]
    values = [[0.3, -0.2], [0.1, 0.4], [0.6, 0.0], [-0.3, 0.7]]
    dones = [[False, False], [True, False], [False, False], [False, False]]
    last = [0.2, -0.4]
    buffer = RolloutBuffer(4, 2, 1, (1,), torch.long, None, 4, torch.device("cpu"))
    buffer.rewards = torch.tensor(rewards)
    buffer.values = torch.tensor(values)
    buffer.dones = torch.tensor(dones)
    buffer.compute_gae(torch.tensor(last), gamma, lam)

    for env in range(2):
        adv, next_value, next_adv = [0.0] * 4, last[env], 0.0
        for t in reversed(range(4)):
            live = 0.0 if dones[t][env] else 1.0
            delta = rewards[t][env] + gamma * live * next_value - values[t][env]
            next_adv = delta + gamma * lam * live * next_adv
            adv[t], next_value = next_adv, values[t][env]
        assert buffer.advantages[:, env].tolist() == pytest.approx(adv, abs=1e-6)
        returns = [a + v[env] for a, v in zip(adv, values, strict=True)]
        assert buffer.returns[:, env].tolist() == pytest.approx(returns, abs=1e-6)
    # spelled out once: env 0 at step 1 ends its episode, so its advantage is r - V alone
    assert float(buffer.advantages[1, 0]) == pytest.approx(2.0 - 0.1)
    # and at step 0 one step of lambda-discounting reaches it
    delta0 = 1.0 + gamma * 0.1 - 0.3
    assert float(buffer.advantages[0, 0]) == pytest.approx(delta0 + gamma * lam * (2.0 - 0.1))


class Truncating(gym.Env):
    """Reward 1 every step; truncated (never terminated) after 3 steps; obs = one-hot step."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0.0, 1.0, (4,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.eye(4, dtype=np.float32)[0], {}

    def step(self, action):
        self.t += 1
        return np.eye(4, dtype=np.float32)[self.t], 1.0, False, self.t == 3, {}


def test_a_truncated_step_folds_gamma_times_the_final_value_into_its_reward():
    """At a truncation the stored reward is r + gamma V(final obs), V computed from the state
    that has seen the episode (not the reset one); the step is marked done."""
    gamma = 0.9
    env_id = f"{__name__}:Truncating"
    cfg = PPOConfig(env=env_id, core="gru", num_envs=2, rollout_steps=5, bptt_len=5, gamma=gamma)
    envs = make_vector_env(env_id, 2, 0, autoreset_mode="same_step")
    torch.manual_seed(0)
    agent = PPOAgent(cfg, envs.single_observation_space, envs.single_action_space, cfg_device())
    obs, info = envs.reset(seed=[0, 1])
    carry = Carry(obs, info, agent.policy.initial_state(2), torch.ones(2, dtype=torch.bool),
                  EpisodeTracker(2), RewardScaler(2, gamma, False))  # fmt: skip
    buffer = RolloutBuffer(5, 2, 4, (1,), torch.long, None, 5, cfg_device())
    collect_rollout(agent, envs, buffer, carry)
    assert buffer.dones[:, 0].tolist() == [False, False, True, False, False]
    with torch.no_grad():
        for t in range(5):
            state = buffer.state_at(torch.tensor([t, t]), torch.arange(2))
            _, _, after = agent.policy.step(buffer.obs[t], state, buffer.is_first[t])
            final = torch.eye(4)[3].expand(2, 4)
            _, value, _ = agent.policy.step(final, after, torch.zeros(2, dtype=torch.bool))
            expected = [1.0 + gamma * float(v) if t == 2 else 1.0 for v in value]
            assert buffer.rewards[t].tolist() == pytest.approx(expected, abs=1e-6)
    assert buffer.is_first[3].all()  # the next episode starts from the reset state


def cfg_device() -> torch.device:
    return torch.device("cpu")


# -- PPO loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("clip_value", "norm_adv"), [(True, False), (True, True), (False, False)])
def test_ppo_loss_by_hand_with_value_clipping_and_raw_advantages(clip_value, norm_adv):
    """Three steps of one sequence: the clipped surrogate (on raw or normalised advantages),
    the value loss max((V - R)^2, (V_old + clip(V - V_old) - R)^2) / 2, the entropy bonus."""
    logits = torch.tensor([[[0.2, -0.4]], [[1.0, 0.0]], [[-0.3, 0.6]]])  # (3, 1, 2)
    actions = torch.tensor([[[0]], [[1]], [[1]]])
    log_p = logits.log_softmax(-1).gather(-1, actions)[..., 0]
    old_log_p = log_p + torch.tensor([[0.4], [-0.3], [0.05]])  # ratios 0.67, 1.35, 0.95
    advantages = torch.tensor([[1.5], [-0.5], [0.8]])
    old_values = torch.tensor([[0.0], [1.0], [0.5]])
    returns = torch.tensor([[1.0], [0.0], [0.4]])
    values = torch.tensor([[0.5], [0.4], [0.45]])  # moves by 0.5, -0.6 (clipped to 0.2), -0.05
    mb = SequenceBatch(
        obs=torch.zeros(3, 1, 1), is_first=torch.zeros(3, 1, dtype=torch.bool), actions=actions,
        masks=None, log_probs=old_log_p, values=old_values, advantages=advantages,
        returns=returns, state=(),
    )  # fmt: skip
    cfg = PPOConfig(clip_coef=0.2, ent_coef=0.05, vf_coef=0.7, clip_value=clip_value,
                    norm_adv=norm_adv)  # fmt: skip
    dist = make_distribution(action_head(spaces.Discrete(2)), logits, None)
    loss, stats = ppo_loss(dist, values, mb, cfg)

    ratio = [math.exp(-0.4), math.exp(0.3), math.exp(-0.05)]
    adv = [1.5, -0.5, 0.8]
    if norm_adv:
        mean = sum(adv) / 3
        std = math.sqrt(sum((a - mean) ** 2 for a in adv) / 2)
        adv = [(a - mean) / (std + 1e-8) for a in adv]
    surrogate = (
        sum(max(-a * q, -a * min(max(q, 0.8), 1.2)) for a, q in zip(adv, ratio, strict=True)) / 3
    )
    v, v_old, r = [0.5, 0.4, 0.45], [0.0, 1.0, 0.5], [1.0, 0.0, 0.4]
    errors = []
    for vi, oi, ri in zip(v, v_old, r, strict=True):
        error = (vi - ri) ** 2
        if clip_value:
            error = max(error, (oi + min(max(vi - oi, -0.2), 0.2) - ri) ** 2)
        errors.append(error)
    value_loss = 0.5 * sum(errors) / 3
    entropy = 0.0
    for row in logits[:, 0].tolist():
        z = sum(math.exp(x) for x in row)
        entropy -= sum(math.exp(x) / z * (x - math.log(z)) for x in row) / 3
    assert float(stats["loss/value"]) == pytest.approx(value_loss, rel=1e-6)
    assert float(stats["loss/policy"]) == pytest.approx(surrogate, rel=1e-6)
    assert float(loss) == pytest.approx(surrogate + 0.7 * value_loss - 0.05 * entropy, rel=1e-6)


# -- RSSM: KL balancing and free bits ----------------------------------------------------------
def gaussian_kl(q: list[tuple[float, float]], p: list[tuple[float, float]]) -> float:
    """KL(q || p) of two diagonal Gaussians given as (mean, std) per dimension, summed."""
    return sum(
        math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5
        for (mq, sq), (mp, sp) in zip(q, p, strict=True)
    )


def test_balanced_kl_with_free_bits_by_hand():
    """``beta * mean_t(balance * max(KL_t, free) + (1 - balance) * max(KL_t, free))`` with the
    KL of the spec's Gaussians (std = softplus + min_std) by hand, and the balance splitting the
    gradient: the prior gets ``balance`` of it, the posterior ``1 - balance``."""
    config = RSSMConfig(grid_size=8, channels=(4,), deter_size=4, hidden_size=4, stoch_size=2)
    model = RSSM(config)
    # (B=1, T=2, stats = [mean (2), raw std (2)]): step 0 far apart, step 1 nearly equal
    post = torch.tensor([[[0.5, -1.0, 0.3, -0.2], [0.1, 0.0, 0.2, 0.2]]], requires_grad=True)
    prior = torch.tensor([[[-0.5, 0.5, 1.0, 0.4], [0.12, 0.0, 0.2, 0.21]]], requires_grad=True)
    obs = torch.zeros(1, 2, 1, 8, 8)
    out = {"recon": obs.clone(), "post": post, "prior": prior}
    beta, balance, free = 2.0, 0.8, 0.5
    losses = rssm_loss(model, obs, out, beta=beta, balance=balance, free_bits=free)

    def std(raw: float) -> float:
        return math.log1p(math.exp(raw)) + config.min_std

    def gaussians(stats: torch.Tensor, t: int) -> list[tuple[float, float]]:
        row = stats[0, t].tolist()
        return [(row[0], std(row[2])), (row[1], std(row[3]))]

    kls = [gaussian_kl(gaussians(post, t), gaussians(prior, t)) for t in range(2)]
    assert kls[0] > free > kls[1]  # one step above the floor, one below
    assert float(losses["kl"]) == pytest.approx(sum(kls) / 2, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(beta * (kls[0] + free) / 2, rel=1e-5)

    grad_post, grad_prior = torch.autograd.grad(losses["loss"], [post, prior])
    full_post, full_prior = torch.autograd.grad(
        torch.distributions.kl_divergence(model.distribution(post), model.distribution(prior))[
            0, 0
        ],
        [post, prior],
    )  # d KL_0: the only step above the floor
    scale = beta / 2  # beta times the mean over two steps
    torch.testing.assert_close(grad_prior[0, 0], scale * balance * full_prior[0, 0])
    torch.testing.assert_close(grad_post[0, 0], scale * (1 - balance) * full_post[0, 0])
    assert grad_prior[0, 1].abs().max() == 0 and grad_post[0, 1].abs().max() == 0  # free bits


# -- S4D ---------------------------------------------------------------------------------------
def one_mode_core(mode: str) -> tuple[S4DCore, dict[str, complex | float]]:
    """An S4D core with one channel and one complex mode, every parameter set by hand; the
    input and mixing layers are identities."""
    core = S4DCore(1, 1, state_size=2, layer_norm=False, mode=mode).double()
    p = {"dt": 0.1, "A": complex(-0.5, 2.0), "B": complex(1.0, 0.5), "C": complex(0.3, -0.2),
         "D": 0.7}  # fmt: skip
    block = core.blocks[0]
    with torch.no_grad():
        core.encoder.weight.fill_(1.0), core.encoder.bias.zero_()
        block.mix.weight.fill_(1.0), block.mix.bias.zero_()
        block.log_dt.fill_(math.log(p["dt"]))
        block.log_neg_a_real.fill_(math.log(-p["A"].real))
        block.a_imag.fill_(p["A"].imag)
        block.b.copy_(torch.tensor([[[p["B"].real, p["B"].imag]]], dtype=torch.float64))
        block.c.copy_(torch.tensor([[[p["C"].real, p["C"].imag]]], dtype=torch.float64))
        block.d.fill_(p["D"])
    return core, p


def test_s4d_discretisation_is_zoh():
    """dt A, Bbar = (exp(dt A) - 1) / A * B (zero-order hold), C unchanged."""
    core, p = one_mode_core("recurrent")
    dt_a, b_bar, c = core.blocks[0].discretize()
    assert complex(dt_a.item()) == pytest.approx(p["dt"] * p["A"], abs=1e-15)
    assert complex(b_bar.item()) == pytest.approx(
        (cmath.exp(p["dt"] * p["A"]) - 1) / p["A"] * p["B"]
    )
    assert complex(c.item()) == pytest.approx(p["C"], abs=1e-15)


@pytest.mark.parametrize(("mode", "resets"), [("recurrent", True), ("scan", True), ("fft", False)])
def test_s4d_recurrence_by_hand(mode, resets):
    """x_t = Abar x_{t-1} (0 after a reset) + Bbar u_t; y_t = 2 Re(C x_t) + D u_t; the block's
    output is u + GELU(y) with identity mixing. Every unroll mode equals the hand recurrence."""
    core, p = one_mode_core(mode)
    u = [1.0, -0.5, 2.0, 0.3]
    is_first = [False, False, resets, False]
    x = complex(0.2, 0.1)  # the incoming state
    a_bar = cmath.exp(p["dt"] * p["A"])
    b_bar = (a_bar - 1) / p["A"] * p["B"]
    expected = []
    for u_t, first in zip(u, is_first, strict=True):
        x = a_bar * x * (0.0 if first else 1.0) + b_bar * u_t
        y = 2 * (p["C"] * x).real + p["D"] * u_t
        expected.append(u_t + y * 0.5 * (1 + math.erf(y / math.sqrt(2))))
    state = (torch.tensor([[[[[0.2, 0.1]]]]], dtype=torch.float64),)  # (B, L, H, N/2, 2)
    out, (final,) = core(torch.tensor(u, dtype=torch.float64).view(4, 1, 1), state,
                         torch.tensor(is_first).view(4, 1))  # fmt: skip
    assert out.view(-1).tolist() == pytest.approx(expected, abs=1e-12)
    assert complex(*final.view(-1).tolist()) == pytest.approx(x, abs=1e-12)


# -- checkpoints -------------------------------------------------------------------------------
def test_a_flipped_byte_inside_tensor_data_is_caught_by_the_checksum(tmp_path):
    """The flipped file still unpickles (the damage is inside a tensor's bytes, not the pickle),
    so only the checksum can tell: load_checkpoint must refuse it as corrupt."""
    path = tmp_path / "last.pt"
    weights = torch.arange(4096, dtype=torch.float32)
    save_checkpoint(path, {"w": weights})
    raw = bytearray(path.read_bytes())
    at = raw.find(weights.numpy().tobytes()[4000:4064])  # somewhere inside the tensor's data
    assert at > 0
    raw[at + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    payload = bytes(raw).partition(b"\n")[2]
    damaged = torch.load(io.BytesIO(payload), weights_only=False)["w"]  # unpickles fine
    assert not torch.equal(damaged, weights)
    with pytest.raises(CheckpointError, match="corrupt or truncated.*checksum mismatch"):
        load_checkpoint(path)
