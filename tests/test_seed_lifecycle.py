"""The Tamiyo recurrence spec's seed-lifecycle environment: stages, masks, grafting, reward
terms and what they rank, observation modes, the batched vector env (each env exactly the single
env), PPO on it."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from memrl.cli import main
from memrl.envs import make_env, make_vector_env, vector_env_seeds
from memrl.envs.lifecycle_host import _adam
from memrl.envs.lifecycle_layers import LiveSeed, SlotSeeds, module_tensors, run_slot
from memrl.envs.seed_lifecycle import (
    BLUEPRINTS,
    HISTORY_FEATURES,
    Op,
    SeedLifecycleEnv,
    SeedLifecycleVectorEnv,
    Stage,
    feature_names,
    observation_features,
)
from memrl.rl.distributions import action_head, make_distribution
from memrl.rl.evaluate import evaluate, evaluate_episodes
from memrl.rl.ppo import PPOAgent, PPOConfig
from memrl.runs import load_config

CPU = torch.device("cpu")
SMALL = {"max_train": 256}  # one batch an epoch: the lifecycle logic, fast
WAIT, HEAVY = [Op.WAIT, 0], list(BLUEPRINTS).index("conv_heavy")


# Scripted controllers, functions of (observation, info, rng) -> (operation, blueprint).
def cycle(obs, info, rng):
    """GERMINATE blueprint 0 whenever allowed, never decide: trials time out and restart."""
    return [Op.GERMINATE if info["action_mask"][Op.GERMINATE] else Op.WAIT, 0]


def commit(obs, info, rng):
    """GERMINATE blueprint 0, FOSSILIZE as soon as allowed."""
    mask = info["action_mask"]
    return [Op.GERMINATE if mask[Op.GERMINATE] else Op.FOSSILIZE if mask[Op.FOSSILIZE] else 0, 0]


def wait(obs, info, rng):
    """The host trains alone."""
    return WAIT


def random_masked(obs, info, rng):
    """A uniformly random allowed operation and a random blueprint."""
    operations = np.flatnonzero(info["action_mask"][: len(Op)])
    return [int(rng.choice(operations)), int(rng.integers(len(info["action_mask"]) - len(Op)))]


def cull_everything(obs, info, rng):
    """GERMINATE blueprint 0, CULL as soon as allowed: a germinate-then-cull loop."""
    mask = info["action_mask"]
    return [Op.GERMINATE if mask[Op.GERMINATE] else Op.CULL if mask[Op.CULL] else 0, 0]


SCRIPTED = {f.__name__: f for f in (cycle, commit, wait, random_masked, cull_everything)}


def play_scripted(policy, seeds, **env_options) -> np.ndarray:
    """(episode reward, final validation accuracy) of one episode from each reset seed, (len(
    seeds), 2): the episodes played side by side in the batched vector env (each exactly as a
    single env would play it), the policy given each env's observation, info and generator."""
    envs = SeedLifecycleVectorEnv(len(seeds), autoreset_mode=AutoresetMode.DISABLED, **env_options)
    obs, infos = envs.reset(seed=list(seeds))
    rngs = [np.random.default_rng(seed) for seed in seeds]
    totals, terminated = np.zeros(len(seeds)), np.zeros(len(seeds), dtype=bool)
    while not terminated.all():
        actions = [policy(obs[i], _env_info(infos, i), rng) for i, rng in enumerate(rngs)]
        obs, rewards, terminated, _, infos = envs.step(np.array(actions))
        totals += rewards
    return np.stack([totals, infos["episode"]["final_val_acc"]], 1)


def _ops_allowed(info) -> set[Op]:
    return {op for op in Op if info["action_mask"][op]}


def _alpha(env: SeedLifecycleEnv) -> float:
    return env.active.alpha if env.active is not None else 0.0


def test_lifecycle_stages_alpha_and_masks():
    env = SeedLifecycleEnv(**SMALL)
    _, info = env.reset(seed=0)
    assert info["action_mask"].dtype == bool and info["action_mask"].shape == (4 + 5,)
    assert _ops_allowed(info) == {Op.WAIT, Op.GERMINATE}
    seen = []
    _, _, _, _, info = env.step([Op.GERMINATE, HEAVY])
    seen.append((info["seed_stage"], _alpha(env), _ops_allowed(info)))
    for _ in range(7):
        _, _, _, _, info = env.step(WAIT)
        seen.append((info["seed_stage"], _alpha(env), _ops_allowed(info)))
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
    assert [s.slot for s in env.fossils] == [0] and env.fossils[0].alpha == 1.0


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
    seed = with_seed.hosts.seed_tensors(0, 0, "conv_heavy")
    start = [t.clone() for t in seed]
    for _ in range(3):  # TRAINING epochs: the seed learns, the host must not notice
        with_seed.step(WAIT)
        alone.step(WAIT)
    assert with_seed.active.stage == Stage.TRAINING
    assert any(not torch.equal(a, p) for a, p in zip(start, seed, strict=True))
    # the same weights bit for bit after every minibatch's gradient step, so the same outputs
    # and gradients throughout: nothing of the seed's local target reached the host
    for a, b in zip(with_seed.hosts.host_tensors(0), alone.hosts.host_tensors(0), strict=True):
        assert torch.equal(a, b)
    assert with_seed.lifecycle.metrics == alone.lifecycle.metrics
    # ...while the same seed at alpha = 1 changes the output (it is not a no-op)
    hosts, heavy = with_seed.hosts, LiveSeed(0, "conv_heavy", 1.0)
    assert hosts.evaluate([0], [[heavy]])[0] != hosts.evaluate([0], [[]])[0]


@pytest.mark.parametrize("blueprint", list(BLUEPRINTS))
@pytest.mark.parametrize(("channels", "size"), [(8, 8), (16, 4)])
def test_batched_seeds_compute_what_their_modules_do(blueprint, channels, size):
    """A slot of 3 hosts, two of them with a seed at their own alpha: each host's output is the
    single-seed reference ``lerp(h, module(h), alpha)`` (BatchNorm in training mode)."""
    torch.manual_seed(0)
    modules = [BLUEPRINTS[blueprint](channels) for _ in range(2)]
    for module in modules:  # seed(h) clearly apart from h: no zero-initialised last layer
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
    params, buffers = zip(*(module_tensors([m]) for m in modules), strict=True)
    stack = [torch.stack(ts).detach() for ts in zip(*params, strict=True)]
    stats = [torch.stack(ts).clone() for ts in zip(*buffers, strict=True)]
    alphas = [2 / 3, 1.0]
    h = torch.randn(5, size, size, 3, channels)  # (B, H, W, G, C); host 1 has no seed
    seeds = SlotSeeds(blueprint, torch.tensor([0, 2]), stack, stats, torch.tensor([alphas]).T)
    with torch.no_grad():
        out = run_slot(h, [seeds], training=True)
        torch.testing.assert_close(out[:, :, :, 1], h[:, :, :, 1], rtol=0, atol=0)
        for module, column, alpha in zip(modules, (0, 2), alphas, strict=True):
            x = h[:, :, :, column].permute(0, 3, 1, 2)  # (B, C, H, W)
            expected = torch.lerp(x, module.train()(x), alpha).permute(0, 2, 3, 1)
            torch.testing.assert_close(out[:, :, :, column], expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out[:, :, :, column], h[:, :, :, column])
    for k, module in enumerate(modules):  # BatchNorm's running statistics moved alike
        for mine, theirs in zip([t[k] for t in stats], module_tensors([module])[1], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_fossilised_seeds_persist_and_culled_seeds_disappear():
    env = SeedLifecycleEnv(**SMALL)
    env.reset(seed=0)
    host = sum(t.numel() for t in env.hosts.host_tensors(0))
    assert host == env.host_params
    sizes = {b: sum(p.numel() for p in BLUEPRINTS[b](c).parameters()) for b, c in (
        ("conv_heavy", 8), ("attention", 16))}  # fmt: skip
    env.step([Op.GERMINATE, HEAVY])
    heavy = env.active.num_params
    assert heavy == sizes["conv_heavy"] == env.params_added()
    assert heavy == sum(t.numel() for t in env.hosts.seed_tensors(0, 0, "conv_heavy"))
    for _ in range(7):
        env.step(WAIT)
    env.step([Op.FOSSILIZE, 0])
    fossil = [t.clone() for t in env.hosts.seed_tensors(0, 0, "conv_heavy")]
    env.step([Op.GERMINATE, list(BLUEPRINTS).index("attention")])
    attention = env.active.num_params
    assert attention == sizes["attention"] and env.params_added() == heavy + attention
    env.step(WAIT)
    env.step([Op.CULL, 0])
    assert env.active is None and env.lifecycle.free_slot() == 1  # culled: slot 1 free again
    assert env.params_added() == heavy
    for _ in range(env.max_epochs - env.epoch - 1):
        env.step(WAIT)
    _, _, terminated, _, info = env.step(WAIT)
    assert terminated and [(s.slot, s.stage) for s in env.fossils] == [(0, Stage.FOSSILIZED)]
    assert info["episode"]["params_added"] == heavy
    # the fossil kept training with its host (alpha 1): its weights moved
    now = env.hosts.seed_tensors(0, 0, "conv_heavy")
    assert any(not torch.equal(a, b) for a, b in zip(fossil, now, strict=True))
    assert info["episode"]["fossilized"] == 1 and info["episode"]["culls"] == 1


def test_reward_terms_add_up_as_documented():
    env = SeedLifecycleEnv(**SMALL)
    _, info = env.reset(seed=5)
    w, initial_acc = env.weights, info["val_acc"]
    script = {0: [Op.GERMINATE, HEAVY], 3: [Op.FOSSILIZE, 0], 8: [Op.FOSSILIZE, 0]}
    script |= {9: [Op.GERMINATE, 1], 12: [Op.CULL, 0]}  # step 3: FOSSILIZE while TRAINING
    episode_return, progress, previous_acc, steps, terminated = 0.0, 0.0, initial_acc, 0, False
    while not terminated:
        _, reward, terminated, _, info = env.step(script.get(steps, WAIT))
        terms = info["reward_terms"]
        assert set(terms) == {"progress", "rent", "trial", "invalid"}
        assert reward == pytest.approx(sum(terms.values()), abs=1e-12)
        assert terms["progress"] == pytest.approx(w.progress * (info["val_acc"] - previous_acc))
        rent = -w.rent * env.params_added() / env.host_params / env.max_epochs
        assert terms["rent"] == pytest.approx(rent) and rent < 0  # conv_heavy lives all along
        assert terms["trial"] == (-w.trial if steps in (0, 9) else 0.0)
        assert info["invalid_action"] == (steps == 3)
        assert terms["invalid"] == (-w.invalid if steps == 3 else 0.0)
        previous_acc, progress = info["val_acc"], progress + terms["progress"]
        episode_return, steps = episode_return + reward, steps + 1
    assert steps == env.max_epochs == 25
    assert progress == pytest.approx(info["episode"]["final_val_acc"] - initial_acc)
    episode = info["episode"]
    assert episode["culls"] == 1 and episode["culls_harmful"] in (0, 1)
    assert episode["germinated"] == 2 and episode["fossilized"] == 1
    assert math.isfinite(episode_return)


ORDER_SEEDS = tuple(range(6))


def test_the_reward_ranks_scripted_controllers_as_their_final_accuracy_does():
    """Each controller plays the default task from reset seeds 0-5: the same host
    initialisation and batches for all, so accuracy gaps are paired. Measured (reward; final
    accuracy; mean +- sd over the 6): commit 0.799 +- 0.021, 0.935 +- 0.017; cycle
    0.775 +- 0.032, 0.900 +- 0.028; random 0.663 +- 0.072, 0.834 +- 0.063; wait
    0.720 +- 0.078, 0.824 +- 0.073; cull_everything 0.629 +- 0.078, wait's accuracy. The
    clear pairs are 3.5-4.5 standard errors apart, random vs wait 0.9 (not asserted).
    The earlier reward paid cycle 2.93 and commit 1.16."""
    played = {name: play_scripted(policy, ORDER_SEEDS) for name, policy in SCRIPTED.items()}
    reward = {name: results[:, 0] for name, results in played.items()}
    accuracy = {name: results[:, 1] for name, results in played.items()}
    clear = set()
    for better, worse in itertools.permutations(SCRIPTED, 2):
        gap = accuracy[better] - accuracy[worse]
        if gap.mean() > 2 * gap.std(ddof=1) / math.sqrt(len(gap)):  # > 2 standard errors
            clear.add((better, worse))
            assert reward[better].mean() > reward[worse].mean(), (better, worse, reward)
    # the orderings that must be real for the test to mean anything: a seed kept beats trials
    # cycled to timeout (the old reward paid cycling twice as much), which beat no lasting seed
    assert {("commit", "cycle"), ("cycle", "wait"), ("cycle", "random_masked")} <= clear
    # seeds culled while TRAINING never touch the host: waiting's accuracy, and trials cost
    np.testing.assert_array_equal(accuracy["cull_everything"], accuracy["wait"])
    assert reward["cull_everything"].mean() < reward["wait"].mean()


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
    assert first.shape == (26, len(SPEC_FEATURES))  # 25 steps; obs_mode="spec" by default
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert stats["germinated"] >= 1 and 0 < stats["final_val_acc"] <= 1


@pytest.mark.parametrize("obs_mode", ["spec", "rich"])
def test_gymnasium_env_checker_passes(obs_mode):
    check_env(SeedLifecycleEnv(**SMALL, obs_mode=obs_mode), skip_render_check=True)


SPEC_FEATURES = (
    "epoch_fraction",
    "train_loss", "train_acc", "val_loss", "val_acc",
    "train_loss_delta", "train_acc_delta_x10", "val_loss_delta", "val_acc_delta_x10",
    "seed_stage_none", "seed_stage_germinated", "seed_stage_training", "seed_stage_blending",
    "seed_stage_probationary",
    "seed_age_fraction", "seed_alpha", "seed_contribution_x10", "seed_params_ratio",
    *(f"seed_blueprint_{b}" for b in BLUEPRINTS),
    "free_slots_fraction", "fossilized_fraction", "params_added_ratio",
)  # fmt: skip
RICH_FEATURES = (  # the 36 features of earlier versions, in their order
    "epoch_fraction",
    "train_loss", "train_acc", "val_loss", "val_acc",
    "train_loss_delta", "train_acc_delta_x10", "val_loss_delta", "val_acc_delta_x10",
    "val_acc_prev1", "val_acc_prev2", "val_acc_prev3",
    "val_loss_prev1", "val_loss_prev2", "val_loss_prev3",
    "best_val_acc", "plateau_fraction",
    "seed_stage_none", "seed_stage_germinated", "seed_stage_training", "seed_stage_blending",
    "seed_stage_probationary",
    "seed_age_fraction", "seed_alpha", "seed_contribution_x10",
    "seed_contribution_delta_x10", "seed_params_ratio",
    *(f"seed_blueprint_{b}" for b in BLUEPRINTS),
    "free_slots_fraction", "fossilized_fraction", "params_added_ratio",
    "culls_fraction",
)  # fmt: skip


def test_obs_modes_spec_has_one_epoch_of_view_and_rich_keeps_the_history():
    blueprints = tuple(BLUEPRINTS)
    assert feature_names("spec", blueprints) == SPEC_FEATURES and len(SPEC_FEATURES) == 26
    assert feature_names("rich", blueprints) == RICH_FEATURES and len(RICH_FEATURES) == 36
    assert set(RICH_FEATURES) - set(SPEC_FEATURES) == set(HISTORY_FEATURES)
    spec, rich = SeedLifecycleEnv(**SMALL), SeedLifecycleEnv(**SMALL, obs_mode="rich")
    assert spec.observation_space.shape == (26,) and rich.observation_space.shape == (36,)
    assert SeedLifecycleEnv(**SMALL).feature_names == SPEC_FEATURES  # spec is the default
    with pytest.raises(ValueError, match="obs_mode='fancy'; expected 'spec' or 'rich'"):
        SeedLifecycleEnv(**SMALL, obs_mode="fancy")
    slots = [RICH_FEATURES.index(name) for name in SPEC_FEATURES]
    at = {name: i for i, name in enumerate(RICH_FEATURES)}
    observations = [(spec.reset(seed=4)[0], rich.reset(seed=4)[0])]
    for step in range(14):  # a seed through its lifecycle, then culled
        action = [Op.GERMINATE, HEAVY] if step == 0 else [Op.CULL, 0] if step == 9 else WAIT
        observations.append((spec.step(action)[0], rich.step(action)[0]))
    for (_, before), (now_spec, now) in itertools.pairwise(observations):
        np.testing.assert_array_equal(now_spec, now[slots])  # same play, same features
        assert now[at["val_acc_prev1"]] == before[at["val_acc"]]  # rich: the windows slide
        assert now[at["val_acc_prev2"]] == before[at["val_acc_prev1"]]
        assert now[at["val_loss_prev3"]] == before[at["val_loss_prev2"]]
        assert now[at["best_val_acc"]] == max(before[at["best_val_acc"]], now[at["val_acc"]])
    assert observations[-1][1][at["culls_fraction"]] == 1 / 25
    # spec is a function of the current and the previous epoch: another history, same view
    report = rich.lifecycle.report()
    other = dataclasses.replace(
        report,
        val_acc_history=(0.1, 0.2, 0.3),
        val_loss_history=(3.0, 2.0, 1.0),
        best_val_acc=0.99,
        plateau_fraction=0.5,
        seed_contribution_delta=-0.3,
        culls_fraction=0.4,
    )
    features, changed = (observation_features(r, blueprints) for r in (report, other))
    assert tuple(features) == RICH_FEATURES
    assert [n for n in RICH_FEATURES if features[n] != changed[n]] == list(HISTORY_FEATURES)


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


@pytest.mark.parametrize("obs_mode", ["spec", "rich"])
def test_env_kwargs_reach_the_env_from_the_cli_the_saved_config_and_ppo_eval(
    obs_mode, tmp_path, monkeypatch
):
    built = []  # (module, keyword arguments) of every vector env the trainer and ppo-eval build

    def recording(module_name: str):
        real = importlib.import_module(module_name).make_vector_env

        def make_vector_env(*args, **kwargs):
            built.append((module_name, kwargs))
            return real(*args, **kwargs)

        return make_vector_env

    for name in ("memrl.rl.ppo", "memrl.rl.evaluate"):
        monkeypatch.setattr(importlib.import_module(name), "make_vector_env", recording(name))
    out, kwargs = tmp_path / "run", (f"obs_mode={obs_mode}", "max_epochs=5")
    args = ["ppo", "--env", "memrl/SeedLifecycle", "--env-kwargs", *kwargs, "--num-envs", "2"]
    args += ["--rollout-steps", "5", "--total-steps", "10", "--eval-episodes", "1"]
    assert main([*args, "--hidden-size", "8", "--device", "cpu", "--output-dir", str(out)]) == 0
    saved = load_config(PPOConfig, out / "config.yaml")
    assert saved.env_kwargs == kwargs
    assert saved.env_options == {"obs_mode": obs_mode, "max_epochs": 5}
    assert main(["ppo-eval", str(out), "--episodes", "1", "--device", "cpu"]) == 0
    assert json.loads((out / "eval.json").read_text())["env_kwargs"] == list(kwargs)
    # training, its final evaluation, and ppo-eval's probe and evaluation
    assert [name for name, _ in built] == ["memrl.rl.ppo"] + ["memrl.rl.evaluate"] * 3
    assert all(kw["obs_mode"] == obs_mode and kw["max_epochs"] == 5 for _, kw in built)


def test_a_bad_env_kwarg_exits_2_naming_it(tmp_path, capsys):
    args = ["ppo", "--env", "memrl/SeedLifecycle", "--num-envs", "1", "--device", "cpu"]
    for bad, named in (("obs_mod=rich", "obs_mod"), ("obs_mode=fancy", "'fancy'")):
        assert main([*args, "--env-kwargs", bad, "--output-dir", str(tmp_path / bad)]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / bad).exists()  # refused before the run directory is made
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--env-kwargs", "obs_mode", "--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the vector env
def _env_info(infos: dict, i: int) -> dict:
    """Env i's info out of a vector env's batched ``info``."""
    return {
        key: _env_info(value, i) if isinstance(value, dict) else value[i]
        for key, value in infos.items()
        if not key.startswith("_") and infos[f"_{key}"][i]
    }


def _assert_same_info(mine: dict, single: dict) -> None:
    assert set(mine) == set(single)
    for key, value in single.items():
        if isinstance(value, dict):
            _assert_same_info(mine[key], value)
        else:
            np.testing.assert_array_equal(mine[key], value, err_msg=key)


def _coverage_policy(i: int):
    """Env i's controller: 0 never decides (probation times out), 1 fossilises as soon as it
    can, 2 culls as soon as it can, the others play at random, sometimes a masked action."""

    def act(info, rng):
        mask, blueprint = info["action_mask"], int(rng.integers(len(info["action_mask"]) - 4))
        wanted = {1: Op.FOSSILIZE, 2: Op.CULL}.get(i)
        if wanted is not None and mask[wanted]:
            return [wanted, blueprint]
        if i < 3:
            return [Op.GERMINATE if mask[Op.GERMINATE] else Op.WAIT, blueprint]
        if rng.random() < 0.1:
            return [int(rng.integers(4)), blueprint]
        return [int(rng.choice(np.flatnonzero(mask[:4]))), blueprint]

    return act


@pytest.mark.parametrize("hosts_per_pass", [None, 2])
def test_each_env_of_the_batched_vector_env_plays_exactly_as_the_single_env(hosts_per_pass):
    """Five envs, one episode and the first steps of the next (same-step autoreset), against
    five single envs reset with the same seeds and given the same actions: observations,
    rewards and their terms, masks, stages, contributions and episode statistics equal bit for
    bit. Batching changes no number: a host computes the same kernels in the same order alone
    or beside others (see ``lifecycle_host._with_twin``). With hosts_per_pass=2 the hosts run
    in passes of 2, 1 and 2: a lone host too."""
    options = {"max_train": 300, "obs_mode": "rich"}  # two minibatches (256, 44) an epoch
    n, seeds = 5, [11, 12, 13, 14, 15]
    envs = SeedLifecycleVectorEnv(n, autoreset_mode=AutoresetMode.SAME_STEP, **options)
    if hosts_per_pass is not None:
        envs.batch.hosts.hosts_per_pass = hosts_per_pass
    singles = [SeedLifecycleEnv(**options) for _ in range(n)]
    obs, infos = envs.reset(seed=seeds)
    results = [env.reset(seed=s) for env, s in zip(singles, seeds, strict=True)]
    for i, (single_obs, single_info) in enumerate(results):
        np.testing.assert_array_equal(obs[i], single_obs)
        _assert_same_info(_env_info(infos, i), single_info)
    policies, rng = [_coverage_policy(i) for i in range(n)], np.random.default_rng(0)
    germinated, episodes = set(), []
    for _ in range(singles[0].max_epochs + 3):
        actions = [policy(info, rng) for policy, (_, info) in zip(policies, results, strict=True)]
        obs, rewards, terminated, truncated, infos = envs.step(np.array(actions))
        assert not truncated.any()
        for i, (env, action) in enumerate(zip(singles, actions, strict=True)):
            single_obs, reward, done, _, single_info = env.step(action)
            assert rewards[i] == reward and terminated[i] == done
            if done:  # the vector env went on to the next episode: compare the final step
                np.testing.assert_array_equal(infos["final_obs"][i], single_obs)
                _assert_same_info(_env_info(infos["final_info"], i), single_info)
                episodes.append(single_info["episode"])
                single_obs, single_info = env.reset()
            np.testing.assert_array_equal(obs[i], single_obs)
            mine = _env_info(infos, i)
            for key in ("final_obs", "final_info"):  # compared above
                mine.pop(key, None)
            _assert_same_info(mine, single_info)
            results[i] = (single_obs, single_info)
            if action[0] == Op.GERMINATE and not single_info.get("invalid_action", True):
                germinated.add(env.blueprints[action[1]])
    assert len(episodes) == n
    stats = {k: sum(e[k] for e in episodes) for k in ("fossilized", "culls", "timeouts")}
    assert min(stats.values()) > 0 and len(germinated) >= 3, (stats, germinated)


def test_a_subset_reset_restarts_those_envs_alone():
    """Autoreset disabled: envs 1 and 3 are reset mid-episode (``reset_mask``) with new seeds
    and play as fresh single envs; envs 0 and 2 go on as if nothing happened."""
    envs = SeedLifecycleVectorEnv(4, autoreset_mode=AutoresetMode.DISABLED, **SMALL)
    singles = [SeedLifecycleEnv(**SMALL) for _ in range(4)]
    envs.reset(seed=[0, 1, 2, 3])
    for i, env in enumerate(singles):
        env.reset(seed=i)
    script = [[Op.GERMINATE, HEAVY], WAIT, WAIT, [Op.GERMINATE, 4], WAIT, WAIT]
    for t, action in enumerate(script):
        if t == 3:
            mask = np.array([False, True, False, True])
            obs, infos = envs.reset(seed=[None, 21, None, 23], options={"reset_mask": mask})
            for i in (1, 3):
                single_obs, _ = singles[i].reset(seed=20 + i)
                np.testing.assert_array_equal(obs[i], single_obs)
            assert infos["_action_mask"].tolist() == mask.tolist()
        obs, rewards, _, _, infos = envs.step(np.array([action] * 4))
        for i, env in enumerate(singles):
            single_obs, reward, _, _, single_info = env.step(action)
            np.testing.assert_array_equal(obs[i], single_obs)
            assert rewards[i] == reward and infos["seed_stage"][i] == single_info["seed_stage"]
    assert [int(s) for s in infos["seed_stage"]] == [Stage.BLENDING, 2, 3, 2]  # 2: TRAINING
    assert [s.epoch for s in singles] == [6, 3, 6, 3]


def test_next_step_autoreset_and_make_vector_env_routing():
    envs = make_vector_env("memrl/SeedLifecycle", 2, seed=5, max_epochs=2, **SMALL)
    assert isinstance(envs, SeedLifecycleVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    first, _ = envs.reset()
    again, _ = make_vector_env("memrl/SeedLifecycle", 2, max_epochs=2, **SMALL).reset(
        seed=vector_env_seeds(5, 2)
    )
    np.testing.assert_array_equal(first, again)  # seed=5 is vector_env_seeds(5, 2) at reset
    actions = np.zeros((2, 2), dtype=np.int64)
    envs.step(actions)
    _, _, terminated, _, infos = envs.step(actions)
    assert terminated.all() and infos["episode"]["germinated"].tolist() == [0, 0]
    obs, rewards, terminated, _, infos = envs.step(actions)  # NEXT_STEP: this call only resets
    assert rewards.tolist() == [0.0, 0.0] and not terminated.any()
    assert infos["epoch"].tolist() == [0, 0] and obs[:, 0].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="actions="):
        envs.step(np.array([[7, 0], [0, 0]]))
    per_env = make_vector_env(
        "memrl/SeedLifecycle", 2, seed=5, batched=False, max_epochs=2, **SMALL
    )
    assert isinstance(per_env, SyncVectorEnv)
    np.testing.assert_array_equal(per_env.reset()[0], first)
    with pytest.raises(ValueError, match="batched=False"):
        make_vector_env("memrl/SeedLifecycle", 2, previous_action_reward=True, **SMALL)


def test_adam_with_a_step_count_per_row_is_torch_adam_per_row():
    torch.manual_seed(0)
    rows = [torch.randn(6, 5) for _ in range(3)]
    steps = np.array([0, 3, 7])  # rows germinated at different times
    stacked = torch.stack(rows)
    moments = [torch.zeros_like(stacked), torch.zeros_like(stacked)]
    singles = [row.clone().requires_grad_() for row in rows]
    optimizers = [torch.optim.Adam([p], lr=1e-2) for p in singles]
    for i, (p, opt) in enumerate(zip(singles, optimizers, strict=True)):  # catch up to steps
        for _ in range(steps[i]):
            p.grad = torch.randn(6, 5)
            opt.step()
        stacked[i] = p.detach()
        state = opt.state[p] if steps[i] else {}
        moments[0][i] = state.get("exp_avg", torch.zeros(6, 5))
        moments[1][i] = state.get("exp_avg_sq", torch.zeros(6, 5))
    for uniform in (False, True):
        grads = torch.randn(3, 6, 5)
        _adam([stacked], [grads], [moments[0]], [moments[1]], steps, 1e-2)
        for i, (p, opt) in enumerate(zip(singles, optimizers, strict=True)):
            p.grad = grads[i].clone()
            opt.step()
            assert torch.equal(stacked[i], p.detach()), (uniform, i)
        if not uniform:  # next round: all rows at one step count (Adam's scalar path)
            steps[:] = steps.max()
            for i, (p, opt) in enumerate(zip(singles, optimizers, strict=True)):
                opt.state[p]["step"].fill_(float(steps[i]))


def test_memrl_ppo_trains_on_the_batched_vector_env(tmp_path, monkeypatch):
    built = []
    real = SeedLifecycleVectorEnv.__init__

    def recording(self, *args, **kwargs):
        built.append(args[0])
        real(self, *args, **kwargs)

    monkeypatch.setattr(SeedLifecycleVectorEnv, "__init__", recording)
    out = tmp_path / "run"
    args = ["ppo", "--env", "memrl/SeedLifecycle", "--num-envs", "4", "--rollout-steps", "5"]
    args += ["--env-kwargs", "max_train=256", "max_epochs=5", "--total-steps", "40"]
    args += ["--eval-episodes", "2", "--hidden-size", "8", "--device", "cpu"]
    assert main([*args, "--output-dir", str(out)]) == 0
    assert built[0] == 4  # training: 4 envs as one batched computation
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_steps"] == 40 and math.isfinite(summary["final_eval_return"])


def test_cifar10_from_disk_works_single_and_batched(tmp_path, monkeypatch):
    """A stand-in for CIFAR-10's python version on disk (torchvision's checksums patched out):
    the single env and the batched vector env load it and play it alike."""
    import pickle

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 20).tolist()}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    options = {"dataset": "cifar10", "data_dir": str(tmp_path), "max_train": 40, "max_epochs": 4}
    envs = SeedLifecycleVectorEnv(2, **options)
    singles = [SeedLifecycleEnv(**options) for _ in range(2)]
    obs, _ = envs.reset(seed=[0, 1])
    assert singles[0].data[0].shape == (40, 3, 32, 32) and singles[0].data[2].shape[0] == 8
    for i, env in enumerate(singles):
        np.testing.assert_array_equal(obs[i], env.reset(seed=i)[0])
    for action in ([Op.GERMINATE, 4], WAIT, WAIT, WAIT):  # attention on 16x16 maps, TRAINING
        obs, rewards, *_ = envs.step(np.array([action, action]))
        for i, env in enumerate(singles):
            single_obs, reward, *_ = env.step(action)
            np.testing.assert_array_equal(obs[i], single_obs)
            assert rewards[i] == reward


def test_evaluate_episodes_reports_each_episode_as_the_env_plays_it():
    """``evaluate_episodes``: per episode its return and the env's ``info["episode"]``, equal to
    the greedy policy played by hand on single envs reset with the episodes' seeds; ``evaluate``
    is the mean of those returns."""
    kwargs, n = {"max_epochs": 3}, 3  # the whole training set: the hosts learn apart
    cfg = PPOConfig(env="memrl/SeedLifecycle", core="none", hidden_size=8)
    envs = make_vector_env("memrl/SeedLifecycle", 1, 0, batched=False, **kwargs)
    torch.manual_seed(0)
    agent = PPOAgent(cfg, envs.single_observation_space, envs.single_action_space, CPU)
    found = evaluate_episodes(agent, "memrl/SeedLifecycle", n, 7, env_kwargs=kwargs)
    assert len(found) == n
    for episode_seed, mine in zip(vector_env_seeds(7, n), found, strict=True):
        obs, info = envs.reset(seed=[episode_seed])
        total, done = 0.0, False
        with torch.inference_mode():
            while not done:
                params, _, _ = agent.policy.step(
                    agent.obs_tensor(obs, False),
                    agent.policy.initial_state(1),
                    torch.ones(1, dtype=torch.bool),
                )
                action = agent.distribution(params, agent.mask_tensor(info)).mode()
                obs, reward, term, _, info = envs.step(agent.env_actions(action))
                total, done = total + float(reward[0]), bool(term[0])
        expected = {k: float(v[0]) for k, v in info["episode"].items() if k[0] != "_"}
        assert mine == {"return": pytest.approx(total, abs=1e-12), **expected}
    assert evaluate(agent, "memrl/SeedLifecycle", n, 7, env_kwargs=kwargs) == pytest.approx(
        np.mean([e["return"] for e in found])
    )
