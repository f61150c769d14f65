"""The Tamiyo recurrence spec's seed-lifecycle environment: stages, masks, grafting, reward
terms, PPO on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch.nn import functional as F

from memrl.cli import main
from memrl.envs import make_env, make_vector_env
from memrl.envs.seed_lifecycle import BLUEPRINTS, Op, SeedLifecycleEnv, Stage
from memrl.rl.distributions import action_head, make_distribution
from memrl.rl.ppo import PPOAgent, PPOConfig

SMALL = {"max_train": 256}  # one batch an epoch: the lifecycle logic, fast
WAIT, HEAVY = [Op.WAIT, 0], list(BLUEPRINTS).index("conv_heavy")


def _ops_allowed(info) -> set[Op]:
    return {op for op in Op if info["action_mask"][op]}


def _total_params(env: SeedLifecycleEnv) -> int:
    return sum(p.numel() for p in env.host.parameters())


def test_lifecycle_stages_alpha_and_masks():
    env = SeedLifecycleEnv(**SMALL)
    _, info = env.reset(seed=0)
    assert info["action_mask"].dtype == bool and info["action_mask"].shape == (4 + 5,)
    assert _ops_allowed(info) == {Op.WAIT, Op.GERMINATE}
    seen = []
    _, _, _, _, info = env.step([Op.GERMINATE, HEAVY])
    seen.append((info["seed_stage"], env.host.slots[0].alpha, _ops_allowed(info)))
    for _ in range(7):
        _, _, _, _, info = env.step(WAIT)
        seen.append((info["seed_stage"], env.host.slots[0].alpha, _ops_allowed(info)))
    w, c, f = Op.WAIT, Op.CULL, Op.FOSSILIZE
    assert seen == [
        (Stage.GERMINATED, 0.0, {w}),  # built, not yet cullable, nothing else to start
        (Stage.TRAINING, 0.0, {w, c}),  # age 2 = min_cull_age
        (Stage.TRAINING, 0.0, {w, c}),
        (Stage.TRAINING, 0.0, {w, c}),
        (Stage.BLENDING, pytest.approx(1 / 3), {w, c}),
        (Stage.BLENDING, pytest.approx(2 / 3), {w, c}),
        (Stage.BLENDING, 1.0, {w, c}),
        (Stage.PROBATIONARY, 1.0, {w, c, f}),
    ]
    _, _, _, _, info = env.step([Op.FOSSILIZE, 0])
    assert env.active is None and env.fossils[0].stage == Stage.FOSSILIZED
    assert _ops_allowed(info) == {Op.WAIT, Op.GERMINATE}  # slots 1 and 2 are still free
    _, _, _, _, info = env.step([Op.GERMINATE, 0])
    assert env.active.slot == 1  # the first free slot; slot 0 keeps its fossil


def test_probation_times_out_into_a_cull_and_masked_actions_act_as_wait():
    env = SeedLifecycleEnv(**SMALL)
    env.reset(seed=1)
    _, reward, _, _, info = env.step([Op.CULL, 0])  # nothing to cull
    assert info["invalid_action"] and info["reward_terms"]["invalid"] == -0.1
    assert env.active is None and env.stats["culls"] == 0
    env.step([Op.GERMINATE, 0])
    stages = [env.step(WAIT)[-1]["seed_stage"] for _ in range(12)]
    assert stages == [Stage.TRAINING] * 3 + [Stage.BLENDING] * 3 + [Stage.PROBATIONARY] * 5 + [0]
    assert env.stats["timeouts"] == 1 and env.stats["culls"] == 0 and env.active is None
    with pytest.raises(ValueError, match="action=\\[7, 0\\]"):
        env.step([7, 0])


def test_a_training_seed_leaves_the_host_outputs_and_gradients_unchanged():
    with_seed, alone = SeedLifecycleEnv(**SMALL), SeedLifecycleEnv(**SMALL)
    with_seed.reset(seed=3)
    alone.reset(seed=3)
    with_seed.step([Op.GERMINATE, HEAVY])
    alone.step(WAIT)
    seed = with_seed.active.module
    start = [p.detach().clone() for p in seed.parameters()]
    for _ in range(3):  # TRAINING epochs: the seed learns, the host must not notice
        with_seed.step(WAIT)
        alone.step(WAIT)
    assert with_seed.active.stage == Stage.TRAINING
    assert any(not torch.equal(a, p) for a, p in zip(start, seed.parameters(), strict=True))
    for a, b in zip(with_seed.host.host_parameters(), alone.host.host_parameters(), strict=True):
        assert torch.equal(a, b)
    x, y = with_seed.data[0][:64], with_seed.data[1][:64]
    grads = []
    for env in (with_seed, alone):
        env.host.zero_grad()
        logits = env.host(x)
        F.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), [p.grad.clone() for p in env.host.host_parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in seed.parameters())  # the host loss never reached it
    # ...while the same seed at alpha = 1 changes the output (it is not a no-op)
    with_seed.host.slots[0].alpha = 1.0
    assert not torch.allclose(with_seed.host(x), grads[0][0])


def test_blending_output_is_the_lerp_of_host_and_seed():
    env = SeedLifecycleEnv(**SMALL)
    env.reset(seed=0)
    env.step([Op.GERMINATE, HEAVY])
    for _ in range(5):
        env.step(WAIT)
    slot = env.host.slots[0]
    assert env.active.stage == Stage.BLENDING and slot.alpha == pytest.approx(2 / 3)
    torch.nn.init.normal_(slot.seed.branch[-1].weight)  # make seed(h) clearly differ from h
    h = torch.randn(4, slot.channels, 8, 8)
    with torch.no_grad():
        expected = (1 - slot.alpha) * h + slot.alpha * slot.seed(h)
        torch.testing.assert_close(slot(h), expected)
        assert not torch.allclose(slot(h), h) and not torch.allclose(slot(h), slot.seed(h))


def test_fossilised_seeds_persist_and_culled_seeds_disappear():
    env = SeedLifecycleEnv(**SMALL)
    env.reset(seed=0)
    host = _total_params(env)
    assert host == env.host_params
    env.step([Op.GERMINATE, HEAVY])
    heavy = env.active.num_params
    assert heavy > 0 and _total_params(env) == host + heavy
    for _ in range(7):
        env.step(WAIT)
    env.step([Op.FOSSILIZE, 0])
    env.step([Op.GERMINATE, list(BLUEPRINTS).index("attention")])
    attention = env.active.num_params
    assert _total_params(env) == host + heavy + attention
    env.step(WAIT)
    env.step([Op.CULL, 0])
    assert env.host.slots[1].seed is None and env.active is None
    assert _total_params(env) == host + heavy == host + env.params_added()
    for _ in range(env.max_epochs - env.epoch - 1):
        env.step(WAIT)
    _, _, terminated, _, info = env.step(WAIT)
    assert terminated and env.host.slots[0].seed is env.fossils[0].module
    assert info["episode"]["params_added"] == heavy and _total_params(env) == host + heavy
    assert info["episode"]["fossilized"] == 1 and info["episode"]["culls"] == 1


def test_reward_terms_add_up_as_documented():
    env = SeedLifecycleEnv(**SMALL)
    _, info = env.reset(seed=5)
    w = env.weights
    episode_return, steps = 0.0, 0
    script = {0: [Op.GERMINATE, HEAVY], 8: [Op.FOSSILIZE, 0], 9: [Op.GERMINATE, 1], 12: [3, 0]}
    terminated = False
    while not terminated:
        phi = env._potential()
        _, reward, terminated, _, info = env.step(script.get(steps, WAIT))
        terms, steps = info["reward_terms"], steps + 1
        assert set(terms) == {"counterfactual", "stage", "rent", "terminal", "invalid"}
        assert reward == pytest.approx(sum(terms.values()), abs=1e-12)
        phi_next = 0.0 if terminated else env._potential()
        assert terms["stage"] == pytest.approx(w.stage * (env.gamma * phi_next - phi))
        assert terms["rent"] == pytest.approx(-w.rent * env.params_added() / env.host_params)
        in_forward = info["seed_stage"] in (Stage.BLENDING, Stage.PROBATIONARY)
        expected_cf = w.counterfactual * info["seed_contribution"] if in_forward else 0.0
        assert terms["counterfactual"] == pytest.approx(expected_cf)
        assert terms["terminal"] == (w.terminal * info["val_acc"] if terminated else 0.0)
        assert terms["invalid"] == 0.0
        episode_return += reward
    assert steps == env.max_epochs == 25
    episode = info["episode"]
    assert episode["culls"] == 1 and episode["culls_harmful"] in (0, 1)
    assert episode["germinated"] == 2 and episode["fossilized"] == 1
    assert math.isfinite(episode_return)


def test_episode_end_to_end_is_deterministic_and_masked_random_play_stays_valid():
    def play(seed: int):
        env = make_env("memrl/SeedLifecycle", seed=seed, **SMALL)
        obs, info = env.reset()
        rng = np.random.default_rng(seed)
        trace, terminated, steps = [obs], False, 0
        while not terminated:
            assert env.observation_space.contains(obs)
            ops = np.flatnonzero(info["action_mask"][:4])
            obs, reward, terminated, truncated, info = env.step([rng.choice(ops), rng.integers(5)])
            assert not info["invalid_action"] and not truncated
            trace.append(obs)
            steps += 1
        assert steps == 25 and "episode" in info
        return np.stack(trace), info["episode"]

    first, stats = play(7)
    again, _ = play(7)
    other, _ = play(8)
    assert first.shape == (26, len(SeedLifecycleEnv(**SMALL).feature_names))
    assert 30 <= first.shape[1] <= 45
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert stats["germinated"] >= 1 and 0 < stats["final_val_acc"] <= 1


def test_gymnasium_env_checker_passes():
    check_env(SeedLifecycleEnv(**SMALL), skip_render_check=True)


def test_missing_cifar_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        SeedLifecycleEnv(dataset="cifar10", data_dir=str(tmp_path))
    assert str(tmp_path) in str(err.value) and "never downloads" in str(err.value)
    with pytest.raises(ValueError, match="needs data_dir"):
        SeedLifecycleEnv(dataset="cifar10")
    with pytest.raises(ValueError, match="dataset='mnist'"):
        SeedLifecycleEnv(dataset="mnist")
    with pytest.raises(ValueError, match="blueprints=\\('nope',\\)"):
        SeedLifecycleEnv(blueprints=("nope",))


def test_vector_env_masks_reach_ppo_as_one_mask_per_head():
    envs = make_vector_env("memrl/SeedLifecycle", 2, seed=0, **SMALL)
    _, info = envs.reset()
    cfg = PPOConfig(env="memrl/SeedLifecycle", core="lstm", hidden_size=8, device="cpu")
    agent = PPOAgent(
        cfg, envs.single_observation_space, envs.single_action_space, torch.device("cpu")
    )
    mask = agent.mask_tensor(info)
    assert mask.shape == (2, 9)
    assert mask[:, :4].tolist() == [[True, True, False, False]] * 2
    dist = make_distribution(action_head(envs.single_action_space), torch.zeros(2, 9), mask)
    actions = torch.stack([dist.sample() for _ in range(200)])  # (200, 2, 2)
    assert set(actions[..., 0].unique().tolist()) == {0, 1}  # never FOSSILIZE or CULL
    assert set(actions[..., 1].unique().tolist()) == set(range(5))
    envs.close()


def test_memrl_ppo_trains_on_the_seed_lifecycle_env(tmp_path):
    out = tmp_path / "run"
    args = ["ppo", "--env", "memrl/SeedLifecycle", "--core", "lstm", "--num-envs", "2"]
    args += ["--rollout-steps", "25", "--bptt-len", "5", "--minibatch-steps", "25"]
    args += ["--total-steps", "100", "--hidden-size", "16", "--eval-episodes", "1"]
    assert main([*args, "--device", "cpu", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"] == "memrl/SeedLifecycle" and summary["core"] == "lstm"
    assert summary["total_steps"] == 100 and math.isfinite(summary["final_eval_return"])
    assert (out / "checkpoints" / "last.pt").is_file()
