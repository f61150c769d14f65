"""Behaviour cloning and ACT (the visuomotor imitation spec): action codings, the weighted loss,
backbones, the GRU policy's state, ACT's chunks, short training runs and evaluation on the push
task."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memrl.cli import main
from memrl.data import Batch
from memrl.imitation.act import ACTConfig, ACTPolicy, sinusoidal_positions
from memrl.imitation.bc import BCConfig, FrameStack, VisuomotorBCPolicy
from memrl.imitation.codings import (
    cartesian_to_spherical,
    decode_spherical,
    spherical_to_cartesian,
)
from memrl.imitation.evaluate import ChunkController, wilson_interval
from memrl.imitation.trainer import cosine_factor, make_optimizer
from memrl.nn.augment import random_shift
from memrl.nn.backbones import make_backbone
from memrl.nn.losses import weighted_huber
from memrl.runs import load_config


def test_spherical_round_trip_including_near_zero_magnitude():
    g = torch.Generator().manual_seed(0)
    actions = torch.rand(500, 3, generator=g) * 2 - 1
    assert torch.allclose(
        spherical_to_cartesian(cartesian_to_spherical(actions)), actions, atol=1e-5
    )
    tiny = torch.tensor([[0.0, 0.0, 0.0], [1e-6, -1e-6, 0.0], [0.0, 0.0, -1e-5]])
    spherical = cartesian_to_spherical(tiny)
    assert torch.isfinite(spherical).all() and (spherical[:, 0] == 1e-4).all()
    assert spherical_to_cartesian(spherical).norm(dim=-1).max() <= 1e-4 + 1e-9
    assert torch.allclose(
        cartesian_to_spherical(torch.tensor([[0.0, 0.0, 2.0]]))[0, :2], torch.tensor([2.0, 0.0])
    )
    # the head's decoding covers every magnitude an action in [-1, 1]^3 can have
    decoded = decode_spherical(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(decoded[0], torch.tensor([0.0, 0.0, -math.pi]))
    assert torch.allclose(decoded[1], torch.tensor([math.sqrt(3), math.pi, math.pi]))


def test_weighted_huber_equals_a_hand_computation():
    prediction = torch.tensor([[0.5, 0.0, -2.0], [0.1, 0.1, 0.1]])
    target = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.3, 0.1]])
    expert = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])  # norms 5 and 0
    # Huber(delta 1): 0.5 d^2 if |d| <= 1 else |d| - 0.5
    sample0 = (0.5 * 0.25 + 0.0 + (2.0 - 0.5)) / 3 * (1 + 2 * 5)
    sample1 = (0.5 * 0.04) / 3 * 1
    expected = (sample0 + sample1) / 2
    assert weighted_huber(prediction, target, expert).item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([True, False])
    assert weighted_huber(prediction, target, expert, mask).item() == pytest.approx(sample0)
    # spherical: an azimuth of pi and one of -pi are the same direction
    wrap = weighted_huber(
        torch.tensor([[1.0, 1.0, math.pi - 0.01]]),
        torch.tensor([[1.0, 1.0, -math.pi + 0.01]]),
        torch.zeros(1, 3),
        spherical=True,
    )
    assert wrap.item() == pytest.approx(0.5 * 0.02**2 / 3, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "pool", "dim"),
    [("cnn", "keypoints", 128), ("cnn", "avg", 64), ("resnet18", "-", 512), ("vit_b_16", "-", 768)],
)
def test_backbones_give_their_documented_feature_size(name, pool, dim):
    backbone = make_backbone(name, pretrained=False, cnn_pool=pool if name == "cnn" else "avg")
    images = torch.randint(0, 256, (2, 3, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        features = backbone(images)
    assert backbone.feature_dim == dim and features.shape == (2, dim)
    if name == "cnn":  # the spec's listed shapes
        x = torch.zeros(1, 3, 84, 84)
        shapes = []
        for layer in backbone.net:
            x = layer(x)
            if isinstance(layer, torch.nn.Conv2d):
                shapes.append(tuple(x.shape[1:]))
        assert shapes == [(32, 21, 21), (64, 11, 11), (64, 11, 11), (64, 11, 11)]


def test_pretrained_weights_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local torch cache"):
        make_backbone("resnet18", pretrained=True)
    assert make_backbone("resnet18", pretrained=None).feature_dim == 512  # absent: random init


@pytest.mark.parametrize(
    "memory", [{"use_gru": True}, {"frame_stack": 3}, {"use_gru": True, "frame_stack": 2}]
)
def test_gru_policy_state_carries_across_steps_and_resets_between_episodes(memory):
    torch.manual_seed(0)
    policy = VisuomotorBCPolicy(BCConfig(use_state=True, **memory)).eval()
    images = torch.randint(0, 256, (6, 1, 3, 84, 84), dtype=torch.uint8)
    states = torch.randn(6, 1, 3)
    is_first = torch.zeros(6, 1, dtype=torch.bool)
    is_first[0] = True
    with torch.no_grad():
        whole, _ = policy(images, states, policy.initial_state(1), is_first)
        state, stepped = policy.initial_state(1), []
        for t in range(6):  # evaluation: one step at a time, the state carried
            out, state = policy(images[t : t + 1], states[t : t + 1], state, is_first[t : t + 1])
            stepped.append(out)
        assert torch.allclose(torch.cat(stepped), whole, atol=1e-5)
        # the memory matters: the same frame after a different history acts differently
        other, _ = policy(images.flip(0), states.flip(0), policy.initial_state(1), is_first)
        assert not torch.allclose(other[-1], whole[0])
        # and a new episode starts from scratch whatever state is passed in
        fresh, _ = policy(images[:1], states[:1], state, torch.ones(1, 1, dtype=torch.bool))
        assert torch.allclose(fresh, whole[:1], atol=1e-6)


def test_frame_stack_is_the_last_k_features_of_the_episode_oldest_first():
    """Steps 0..4 of one env, a new episode at step 3: step t sees features (f[t-2], f[t-1],
    f[t]), the episode's first step standing in for those before it."""
    f = torch.arange(1.0, 6.0)[:, None, None].expand(5, 1, 2)  # f[t] = (t + 1, t + 1)
    is_first = torch.tensor([[True], [False], [False], [True], [False]])
    stack = FrameStack(3)
    out, (window,) = stack(f, stack.initial_state(1, 2), is_first)
    rows = [[1, 1, 1], [1, 1, 2], [1, 2, 3], [4, 4, 4], [4, 4, 5]]
    expected = torch.tensor(rows, dtype=torch.float32).repeat_interleave(2, 1)[:, None]
    assert torch.equal(out, expected)
    assert torch.equal(window, torch.tensor([[[4.0, 4.0], [5.0, 5.0]]]))


def test_random_shift_moves_images_by_at_most_the_pad():
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[:, :, 8, 8] = 255
    shifted = random_shift(images, pad=2)
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    ys, xs = (shifted[:, 0] == 255).nonzero()[:, 1:].T
    assert (ys - 8).abs().max() <= 2 and (xs - 8).abs().max() <= 2


@pytest.fixture(scope="module")
def demos(push_demos):
    return push_demos(12)


@pytest.mark.parametrize(
    "extra", [[], ["--use-gru", "--use-state", "--use-spherical"], ["--frame-stack", "2"]]
)
def test_short_bc_run_lowers_validation_loss_and_evaluates(demos, tmp_path, extra):
    run = tmp_path / "bc"
    args = ["bc", "--dataset", str(demos), "--epochs", "6", "--output-dir", str(run)]
    assert (
        main([*args, "--device", "cpu", "--batch-size", "32", "--val-fraction", "0.2", *extra]) == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert min(r["val_loss"] for r in records[1:]) < records[0]["val_loss"]
    assert (
        main(["imitation-eval", str(run), "--episodes", "2", "--videos", "1", "--device", "cpu"])
        == 0
    )
    result = json.loads((run / "eval.json").read_text())
    assert 0.0 <= result["success_rate"] <= 1.0 and result["episodes"] == 2
    successes = round(2 * result["success_rate"])
    assert result["success_ci95"] == pytest.approx(list(wilson_interval(successes, 2)))
    lrs = [r["lr"] for r in records]  # the default schedule: cosine from --lr over 6 epochs
    assert lrs == pytest.approx([1e-3 * cosine_factor(e, 6, 0) for e in range(6)])
    assert result["task"] == "push" == json.loads((run / "summary.json").read_text())["task"]
    assert len(result["results"]) == 2 and result["results"][0]["seed"] == 1000
    assert list((run / "videos").glob("episode_1000.gif"))


def test_a_policy_is_evaluated_on_its_own_task_only(demos, tmp_path, capsys):
    run = tmp_path / "bc"
    args = ["bc", "--dataset", str(demos), "--epochs", "1", "--output-dir", str(run)]
    assert main([*args, "--device", "cpu", "--batch-size", "32", "--val-fraction", "0.2"]) == 0
    capsys.readouterr()
    status = main(["imitation-eval", str(run), "--task", "push-hidden-goal", "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 2
    assert f"--task push-hidden-goal: {run} was trained on push demonstrations" in err


def test_missing_dataset_and_run_are_clear_errors(tmp_path, capsys):
    assert (
        main(["bc", "--dataset", str(tmp_path / "none.hdf5"), "--output-dir", str(tmp_path / "r")])
        == 2
    )
    assert "none.hdf5 does not exist" in capsys.readouterr().err
    assert main(["imitation-eval", str(tmp_path)]) == 2
    assert "holds no policy.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["imitation-eval", str(tmp_path), "--device", "banana"])
    assert exit_.value.code == 2
    assert "invalid choice 'banana' for argument '--device'" in capsys.readouterr().err


def test_huber_matches_torch_for_small_differences():
    a, b = torch.randn(10, 3) * 0.3, torch.randn(10, 3) * 0.3
    assert torch.allclose(weighted_huber(a, b, torch.zeros(10, 3)), F.huber_loss(a, b), atol=1e-6)


def tiny_act(**overrides) -> ACTPolicy:
    options = dict(d_model=32, heads=2, encoder_layers=1, decoder_layers=1, feedforward=64)
    return ACTPolicy(ACTConfig(**(options | overrides))).eval()


def test_act_has_the_seeds_sizes_and_predicts_a_chunk():
    policy = ACTPolicy(ACTConfig(chunk_size=7, obs_horizon=2, use_state=True))
    assert len(policy.encoder.layers) == 4 and len(policy.decoder.layers) == 4
    assert policy.encoder.layers[0].self_attn.num_heads == 8 and policy.queries.shape == (7, 512)
    widths = [m.out_features for m in policy.head if isinstance(m, torch.nn.Linear)]
    assert widths == [2048, 1024, 3]
    images = torch.randint(0, 256, (2, 5, 3, 84, 84), dtype=torch.uint8)
    raw = policy.eval()(images, torch.randn(2, 5, 3))
    assert raw.shape == (7, 5, 3) and raw.abs().max() <= 1
    with pytest.raises(ValueError, match="got 1 observations; this policy takes 2"):
        policy(images[:1], torch.randn(1, 5, 3))
    light = ACTPolicy(ACTConfig(head_widths=(), d_model=64, heads=4, feedforward=128))
    assert [type(m) for m in light.head] == [torch.nn.Linear, torch.nn.Tanh]  # the paper's head
    assert light.head[0].in_features == 64 and light.eval()(images[:1], None).shape == (10, 5, 3)


def test_sinusoidal_positions_match_the_formula():
    table = sinusoidal_positions(5, 8)
    pos, i = 3, 2  # dimensions 2i and 2i + 1
    angle = pos / 10000 ** (2 * i / 8)
    assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


class CountingACT(torch.nn.Module):
    """Wraps an ACTPolicy and records every chunk it returns."""

    def __init__(self, policy: ACTPolicy) -> None:
        super().__init__()
        self.policy, self.chunks = policy, []
        self.chunk_size, self.obs_horizon = policy.chunk_size, policy.obs_horizon

    def forward(self, images, states):
        raw = self.policy(images, states) + 0.01 * len(self.chunks)  # each query differs
        self.chunks.append(self.policy.to_action(raw)[:, 0])
        return raw

    def to_action(self, raw):
        return self.policy.to_action(raw)


def test_act_executes_whole_chunks_and_ensembles_with_exponential_weights():
    policy = CountingACT(tiny_act(chunk_size=4, obs_horizon=2))
    image, proprio = torch.zeros(3, 84, 84, dtype=torch.uint8), torch.zeros(3)
    with torch.no_grad():
        chunked = ChunkController(policy, ensemble_m=None)
        chunked.reset()
        actions = [chunked(image, proprio) for _ in range(10)]
        assert len(policy.chunks) == 3  # queries at steps 0, 4, 8
        for t, action in enumerate(actions):
            assert torch.equal(action, policy.chunks[t // 4][t % 4])
        policy.chunks.clear()
        m = 0.5
        ensembled = ChunkController(policy, ensemble_m=m)
        ensembled.reset()
        actions = [ensembled(image, proprio) for _ in range(6)]
    assert len(policy.chunks) == 6  # a query every step
    t = 5  # predictions for step 5 come from the queries at steps 2, 3, 4, 5, oldest first
    predictions = [policy.chunks[s][t - s] for s in (2, 3, 4, 5)]
    weights = [math.exp(-m * i) for i in range(4)]
    expected = sum(w * p for w, p in zip(weights, predictions, strict=True)) / sum(weights)
    assert torch.allclose(actions[t], expected, atol=1e-6)
    assert not torch.allclose(actions[t], predictions[-1])


def test_act_config_errors_name_the_value():
    with pytest.raises(ValueError, match="d_model=100; expected a multiple of 2 \\* heads = 16"):
        ACTConfig(d_model=100)
    with pytest.raises(ValueError, match="chunk_size=0"):
        ACTConfig(chunk_size=0)


def test_short_act_run_lowers_validation_loss_and_evaluates(demos, tmp_path):
    run = tmp_path / "act"
    size = ["--d-model", "32", "--heads", "2", "--feedforward", "64", "--chunk-size", "5"]
    args = ["act", "--dataset", str(demos), "--epochs", "5", "--output-dir", str(run), *size]
    assert main([*args, "--batch-size", "32", "--val-fraction", "0.2", "--lr", "3e-4"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert min(r["val_loss"] for r in records[1:]) < records[0]["val_loss"]
    for extra in ([], ["--temporal-ensemble"]):
        assert main(["imitation-eval", str(run), "--episodes", "1", "--videos", "0", *extra]) == 0
        result = json.loads((run / "eval.json").read_text())
        assert result["episodes"] == 1 and result["temporal_ensemble"] == bool(extra)
        assert result["results"][0]["steps"] >= 1


def test_wilson_interval_equals_a_hand_computation():
    """36/50: p = 0.72, z² = 3.8416, 1 + z²/n = 1.076832, centre 0.758416 / 1.076832, half
    1.96 sqrt(0.004032 + 0.00038416) / 1.076832; the ends of 0 and n stay in [0, 1]."""
    lo, hi = wilson_interval(36, 50)
    centre, half = 0.758416 / 1.076832, 1.96 * math.sqrt(0.00441616) / 1.076832
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.5833, 0.8253)
    assert wilson_interval(0, 50)[0] == 0.0 and 0.07 < wilson_interval(0, 50)[1] < 0.08
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="successes=51, n=50"):
        wilson_interval(51, 50)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    """Warm-up 2 of 10 epochs: 1/3, 2/3, then 0.5 (1 + cos(pi k / 8)) for k = 0..7."""
    factors = [cosine_factor(e, 10, 2) for e in range(10)]
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert [cosine_factor(e, 4, 0) for e in range(4)] == pytest.approx(
        [1, 0.853553, 0.5, 0.146447], abs=1e-6
    )


def test_optimizer_flags_pick_decoupled_or_l2_weight_decay_and_the_schedule():
    """adamw shrinks a weight with zero gradient by lr * wd; adam (the spec's L2) leaves it; the
    plateau schedule halves the lr after --lr-patience bad epochs."""
    results = {}
    for optimizer in ("adamw", "adam"):
        cfg = BCConfig(optimizer=optimizer, weight_decay=0.1, lr=0.01, schedule="plateau",
                       lr_patience=1)  # fmt: skip
        w = torch.nn.Parameter(torch.ones(1))
        opt, scheduler = make_optimizer(cfg, [{"params": [w], "lr": cfg.lr}])
        w.grad = torch.zeros(1)
        opt.step()
        results[optimizer] = float(w)
        for loss in (1.0, 1.0, 1.0):
            scheduler.step(loss)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    # adam's L2 gradient is wd * w = 0.1, so its normalised step is the full lr
    assert results == pytest.approx({"adamw": 1 - 0.01 * 0.1, "adam": 1 - 0.01})
    with pytest.raises(ValueError, match="warmup_epochs=5"):
        BCConfig(epochs=5, warmup_epochs=5)
    # a flag of the other schedule is an error, not silently ignored
    with pytest.raises(ValueError, match="--lr-patience 10 with --schedule cosine"):
        BCConfig(lr_patience=10)
    with pytest.raises(ValueError, match="--warmup-epochs 2 with --schedule plateau"):
        BCConfig(schedule="plateau", warmup_epochs=2)


def test_l1_loss_is_the_mean_absolute_error_over_valid_steps():
    """ACT's loss: |raw - action / scale| averaged over components, then over valid steps;
    padding (valid False) counts for nothing."""
    policy = VisuomotorBCPolicy(BCConfig(loss="l1"))
    policy.action_scale.copy_(torch.tensor([2.0, 1.0, 0.5]))
    actions = torch.tensor([[[1.0, 0.5, 0.25]], [[-2.0, 0.0, 0.5]], [[9.0, 9.0, 9.0]]])  # (3, 1, 3)
    raw = torch.tensor([[[0.5, 0.5, 0.5]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True], [True], [False]])
    batch = Batch(None, torch.zeros(3, 1, 3), actions, torch.zeros(3, 1, dtype=torch.bool), valid)
    # targets (0.5, 0.5, 0.5) and (-1, 0, 1): errors 0 and (1 + 0 + 1) / 3
    assert policy.loss(raw, batch).item() == pytest.approx((0.0 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="--loss l1 with --use-spherical"):
        BCConfig(loss="l1", use_spherical=True)


def test_a_config_saved_before_the_cosine_default_loads_with_the_plateau_schedule(tmp_path):
    """Run directories of earlier versions name lr_patience but no schedule: they trained with
    Adam and the plateau schedule, and still evaluate and resume as such."""
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 20\nlr_patience: 2\nweight_decay: 0.0001\n")
    cfg = load_config(BCConfig, path)
    assert (cfg.optimizer, cfg.schedule, cfg.lr_patience) == ("adam", "plateau", 2)
    path.write_text("epochs: 20\n")
    assert load_config(BCConfig, path).schedule == "cosine"


def test_bc_defaults_in_help_are_the_ones_the_results_table_measured(capsys):
    """docs/results.md names the defaults its BC rows were measured with; `memrl bc --help`
    must show the same, so a changed default cannot leave the table behind."""
    results = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    measured = re.search(r"measured with the defaults `memrl bc ([^`]+)`", results)
    assert measured, "docs/results.md: the line naming the measured BC defaults is missing"
    with pytest.raises(SystemExit):
        main(["bc", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    flags = re.findall(r"(--[\w-]+) (\S+)", measured.group(1))
    assert len(flags) >= 6
    for flag, value in flags:
        metavar = r" (?:[A-Z]+|\{[^}]*\}) .*?\(default: ([^)]+)\)"  # --lr FLOAT ... (default:
        shown = re.search(re.escape(flag) + metavar, help_text)
        assert shown and shown.group(1) == value, (flag, value, shown and shown.group(1))
