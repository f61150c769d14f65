"""The moving-dot world, the RSSM spec's model, its loss, trainer CLI and open-loop evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from memrl.cli import main
from memrl.envs.moving_dot import (
    MovingDotConfig,
    MovingDotDataset,
    collate_moving_dot,
    generate_moving_dot_sequences,
    render_dots,
)
from memrl.runs import load_checkpoint
from memrl.world_model import RSSM, DeterministicModel, RSSMConfig, kl_terms, rssm_loss
from memrl.world_model.evaluate import dot_positions, last_seen_positions, probe_scores

SMALL = RSSMConfig(grid_size=16, channels=(8, 16), deter_size=24, hidden_size=24, stoch_size=6)


def batch(config: MovingDotConfig | None = None, size: int = 8, seed: int = 0):
    config = config or MovingDotConfig(grid_size=16, seq_len=12)
    return generate_moving_dot_sequences(config, size, torch.Generator().manual_seed(seed))


# -- the world -----------------------------------------------------------------------------------
def test_dataset_shapes_ranges_and_seeding():
    data = batch(MovingDotConfig(grid_size=32, seq_len=20), size=5)
    assert data["obs"].shape == (5, 20, 1, 32, 32)
    assert data["actions"].shape == (5, 20, 2) and data["states"].shape == (5, 20, 4)
    assert data["obs"].min() >= 0 and data["obs"].max() <= 1
    assert data["actions"].abs().max() <= 1
    assert torch.equal(data["obs"], batch(MovingDotConfig(grid_size=32, seq_len=20), 5)["obs"])
    dataset = MovingDotDataset(MovingDotConfig(grid_size=16, seq_len=6), 10, seed=3)
    collated = collate_moving_dot([dataset[i] for i in range(4)])
    assert len(dataset) == 10 and collated["obs"].shape == (4, 6, 1, 16, 16)
    assert torch.equal(collated["states"], dataset.data["states"][:4])


def test_dynamics_follow_the_actions_and_reflect_at_the_borders():
    config = MovingDotConfig(grid_size=16, seq_len=200, use_occlusion=False, max_speed=3.0)
    data = batch(config, size=16)
    xy, v, a = data["states"][..., :2], data["states"][..., 2:], data["actions"]
    assert xy.min() >= 0 and xy.max() <= 15 and v.abs().max() <= 3.0
    # away from the borders: v_t = clip(v_{t-1} + 0.5 a_t), x_t = x_{t-1} + v_t
    expected_v = (v[:, :-1] + 0.5 * a[:, 1:]).clamp(-3, 3)
    moved = xy[:, :-1] + expected_v
    inside = ((moved > 0) & (moved < 15)).all(-1)
    assert torch.allclose(v[:, 1:][inside], expected_v[inside], atol=1e-5)
    assert torch.allclose(xy[:, 1:][inside], moved[inside], atol=1e-4)
    bounced = ~inside
    assert bounced.sum() > 20  # the dots did hit the borders, and came back inside
    flipped = torch.sign(v[:, 1:][bounced]) != torch.sign(expected_v[bounced])
    assert flipped.any(-1).all()


def test_the_dot_is_drawn_where_its_state_says_and_hidden_under_occluders():
    data = batch(MovingDotConfig(grid_size=32, seq_len=64), size=32)
    visible = data["visible"]
    assert 0.03 < (~visible).float().mean() < 0.4
    centre = data["states"][..., :2].round().long()
    b, t = torch.meshgrid(torch.arange(32), torch.arange(64), indexing="ij")
    at_centre = data["obs"][b, t, 0, centre[..., 1], centre[..., 0]]
    assert (at_centre[visible] > 0.75).all()  # peak 1 within half a pixel
    assert (at_centre[~visible] == 0).all()  # hidden: the pixel is background
    # while hidden, the state goes on moving
    hidden_moves = (data["states"][:, 1:, :2] - data["states"][:, :-1, :2]).norm(dim=-1)
    assert hidden_moves[~visible[:, 1:]].mean() > 0.1
    clear = batch(MovingDotConfig(grid_size=32, seq_len=64, use_occlusion=False), size=8)
    assert clear["visible"].all()


def test_dot_positions_reads_the_centroid_and_an_empty_frame_as_the_centre():
    xy = torch.tensor([[3.3, 7.6], [12.0, 2.5]])
    frames = render_dots(xy, 16, 1.5).unsqueeze(1)
    assert torch.allclose(dot_positions(frames), xy, atol=0.05)
    assert torch.allclose(dot_positions(torch.zeros(2, 1, 16, 16)), torch.full((2, 2), 7.5))


def test_last_seen_positions_and_the_probe():
    states = torch.arange(10.0).view(1, 5, 2).expand(1, 5, 2)
    states = torch.cat([states, torch.zeros(1, 5, 2)], -1)
    visible = torch.tensor([[False, True, False, False, True]])
    last, seen = last_seen_positions(states, visible)
    assert seen.tolist() == [[False, True, True, True, True]]
    assert last[0, 2:4].tolist() == [[2.0, 3.0], [2.0, 3.0]]
    # a probe on features that hold the position scores ~1
    g = torch.Generator().manual_seed(0)
    states = torch.rand(40, 10, 4, generator=g) * 30
    visible = torch.rand(40, 10, generator=g) > 0.5
    features = torch.cat([states[..., :2] * 2 + 1, torch.randn(40, 10, 3, generator=g)], -1)
    probe, last_seen = probe_scores(features, states, visible)
    assert probe > 0.99 and last_seen < 0.5


# -- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
@pytest.mark.parametrize("core", ["gru", "lstm"])
def test_prior_posterior_and_reconstruction_shapes(core, latent):
    config = RSSMConfig(
        **{**SMALL.__dict__, "core": core, "latent": latent, "groups": 4, "classes": 5}
    )
    model = RSSM(config)
    data = batch()
    out = model(data["obs"], data["actions"])
    stats = 12 if latent == "gaussian" else 20
    z_size = 6 if latent == "gaussian" else 20
    assert out["recon"].shape == data["obs"].shape
    assert out["prior"].shape == out["post"].shape == (8, 12, stats)
    assert out["h"].shape == (8, 12, 24) and out["z"].shape == (8, 12, z_size)
    if latent == "categorical":
        z = out["z"].view(8, 12, 4, 5)
        assert torch.allclose(z.sum(-1), torch.ones(8, 12, 4))  # one-hot per group
        assert torch.allclose(z, z.round(), atol=1e-6)
        probs = model.distribution(out["prior"]).base_dist.probs
        assert probs.min() >= 0.01 / 5 - 1e-7  # 1% unimix
        loss = rssm_loss(model, data["obs"], out, 1.0, 0.8, 1.0)["loss"]
        loss.backward()
        assert model.post_out.weight.grad.abs().sum() > 0  # straight-through reaches q
    prior_only = model(data["obs"], data["actions"], use_posterior=False)
    assert "post" not in prior_only and prior_only["recon"].shape == data["obs"].shape


def test_kl_balancing_sends_each_term_to_its_own_side():
    model = RSSM(SMALL)
    post = torch.randn(5, 12, requires_grad=True)
    prior = torch.randn(5, 12, requires_grad=True)
    dynamics, representation = kl_terms(model, post, prior)
    assert torch.allclose(dynamics, representation)
    dyn_post, dyn_prior = torch.autograd.grad(dynamics.sum(), [post, prior], allow_unused=True)
    rep_post, rep_prior = torch.autograd.grad(
        kl_terms(model, post, prior)[1].sum(), [post, prior], allow_unused=True
    )
    assert dyn_post is None and dyn_prior.abs().sum() > 0
    assert rep_prior is None and rep_post.abs().sum() > 0
    expected = torch.distributions.kl_divergence(
        model.distribution(post), model.distribution(prior)
    )
    assert torch.allclose(dynamics, expected)


def test_free_bits_clamp_the_summed_kl_from_below():
    model = RSSM(SMALL)
    data = batch(size=2)
    out = model(data["obs"], data["actions"])
    out["prior"] = out["post"].detach().clone().requires_grad_()  # KL = 0 everywhere
    losses = rssm_loss(model, data["obs"], out, beta=2.0, balance=0.8, free_bits=1.5)
    assert losses["kl"] == pytest.approx(0.0, abs=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["recon"].item() + 2.0 * 1.5, rel=1e-5)
    (grad,) = torch.autograd.grad(losses["loss"], [out["prior"]])
    assert grad.abs().max() == 0  # below the floor the KL sends no gradient
    huge = rssm_loss(model, data["obs"], out, beta=1.0, balance=0.8, free_bits=0.0)
    assert huge["loss"].item() == pytest.approx(huge["recon"].item(), rel=1e-5)


@pytest.mark.parametrize("model_class", [RSSM, DeterministicModel])
def test_open_loop_rollout_reads_no_observation_after_k(model_class):
    torch.manual_seed(0)
    model = model_class(SMALL).eval()
    data = batch()
    K, horizon = 5, 6
    future = data["actions"][:, K : K + horizon]
    pred = model.open_loop_rollout(data["obs"], data["actions"], future, K)
    assert pred.shape == (8, horizon, 1, 16, 16)
    changed = data["obs"].clone()
    changed[:, K:] = torch.rand_like(changed[:, K:])
    assert torch.equal(pred, model.open_loop_rollout(changed, data["actions"], future, K))
    changed[:, K - 1] = 0  # the last context frame does matter
    assert not torch.equal(pred, model.open_loop_rollout(changed, data["actions"], future, K))
    other = future.flip(0)  # and so do the future actions
    assert not torch.equal(pred, model.open_loop_rollout(data["obs"], data["actions"], other, K))


def test_is_first_resets_the_memory_inside_a_sequence():
    torch.manual_seed(0)
    model = RSSM(SMALL)
    model.sample = model.mode  # no sampling noise: both passes must agree exactly
    data = batch(size=2)
    is_first = torch.zeros(2, 12, dtype=torch.bool)
    is_first[:, 0] = is_first[:, 6] = True
    state, z = model.initial(2)
    embed, actions = model.encode(data["obs"].transpose(0, 1)), data["actions"].transpose(0, 1)
    out = model.observe(embed, actions, is_first.T, state, z)
    alone = model.observe(embed[6:], actions[6:], is_first[:, 6:].T, state, z)
    assert torch.allclose(out["h"][6:], alone["h"], atol=1e-6)
    assert torch.allclose(out["z"][6:], alone["z"], atol=1e-6)
    assert not torch.allclose(
        out["h"][7], model.observe(embed, actions, torch.zeros_like(is_first.T), state, z)["h"][7]
    )


def test_bad_shapes_and_sizes_are_clear_errors():
    model = RSSM(SMALL)
    with pytest.raises(ValueError, match=r"obs has shape \(2, 3, 1, 8, 8\); expected"):
        model(torch.zeros(2, 3, 1, 8, 8), torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="actions have shape"):
        model(torch.zeros(2, 3, 1, 16, 16), torch.zeros(2, 4, 2))
    obs, actions = torch.zeros(2, 8, 1, 16, 16), torch.zeros(2, 8, 2)
    for model_class in (RSSM, DeterministicModel):
        with pytest.raises(ValueError, match="K=9; expected 1 <= K <= 8 context frames"):
            model_class(SMALL).open_loop_rollout(obs, actions, actions[:, :3], K=9)
    with pytest.raises(ValueError, match="grid_size=12 takes 1 to 1 positive entries"):
        RSSMConfig(grid_size=12, channels=(8, 8))
    with pytest.raises(ValueError, match="grid_size=16 takes 1 to 2 positive entries"):
        RSSMConfig(grid_size=16, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="grid_size=31; expected an even size of at least 8"):
        RSSMConfig(grid_size=31)


@pytest.mark.parametrize(
    ("grid", "channels", "final"),
    [(8, (16,), 4), (16, (16, 32), 4), (24, (16, 32), 6), (32, (16, 32, 64), 4),
     (48, (16, 32, 64), 6), (64, (16, 32, 64, 128), 4), (72, (16, 32, 64), 9)],
)  # fmt: skip
def test_encoder_depth_follows_the_grid_size(grid, channels, final):
    """Without --channels the encoder halves the image while it stays a whole number >= 4, and
    the decoder gives back a frame of the input's size."""
    config = RSSMConfig(grid_size=grid, deter_size=8, hidden_size=8, stoch_size=4)
    assert (config.conv_channels, config.final_size) == (channels, final)
    model = RSSM(config)
    out = model(torch.rand(2, 3, 1, grid, grid), torch.zeros(2, 3, 2))
    assert out["recon"].shape == (2, 3, 1, grid, grid)
    assert model.encoder.embed_size == channels[-1] * final**2


# -- training, the CLI and evaluation ------------------------------------------------------------
TINY = ["--device", "cpu", "--deterministic", "--grid_size", "16", "--channels", "8", "16"]
TINY += ["--deter_size", "32", "--hidden_size", "32", "--stoch_size", "8"]


def test_short_training_learns_to_draw_the_dot(tmp_path):
    """A minute of training: the loss falls and the open-loop frames hold the dot where it is
    (position error at horizon 1 below the empty frame's)."""
    args = [*TINY, "--output_dir", str(tmp_path), "--epochs", "25", "--steps_per_epoch", "10"]
    args += ["--batch_size", "16", "--seq_len", "16", "--K", "6", "--no_occlusion", "--lr", "3e-3"]
    assert main(["rssm", *args, "--no-baseline", "--viz_interval", "25"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["recon"] < 0.5 * records[0]["recon"]
    assert main(["rssm-eval", str(tmp_path), "--sequences", "64", "--horizons", "3"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["position_error"]["rssm"][0] < 0.5 * results["position_error"]["blank"][0]
    assert results["position_error"]["rssm"][2] < results["position_error"]["copy_last"][2]
    assert results["mse"]["rssm"][0] < results["mse"]["blank"][0]
    assert results["probe_r2_occluded"] is None and "deterministic" not in results["mse"]


def test_cli_writes_every_seed_output_and_resumes_bit_identically(tmp_path):
    common = [*TINY, "--batch_size", "4", "--seq_len", "10", "--steps_per_epoch", "2"]
    common += ["--viz_interval", "1", "--K", "4", "--log_interval", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["rssm", *common, "--epochs", "2", "--output_dir", str(full)]) == 0
    for name in ["model.pt", "loss_curves.png", "eval_rollout.png", "config.yaml", "metrics.jsonl"]:
        assert (full / name).is_file(), name
    for epoch in (1, 2):
        assert (full / f"recon_epoch{epoch}.png").is_file()
        assert (full / f"rollout_epoch{epoch}.png").is_file()
    assert list(full.glob("events.out.tfevents.*")) and (full / "checkpoints/last.pt").is_file()

    assert main(["rssm", *common, "--epochs", "1", "--output-dir", str(part)]) == 0
    assert main(["rssm", "--resume", str(part), "--epochs", "2"]) == 0
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(part / "model.pt")
    for key in ("rssm", "deterministic"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    assert main(["rssm-eval", str(full), "--sequences", "48", "--horizons", "3"]) == 0
    results = json.loads((full / "eval.json").read_text())
    assert results["horizons"] == [1, 2, 3]
    for key in ("mse", "position_error"):
        assert set(results[key]) == {"rssm", "copy_last", "blank", "deterministic"}
        assert all(len(v) == 3 for v in results[key].values())
    assert isinstance(results["probe_r2_occluded"], float)
    assert (full / "eval_curves.png").is_file()


def test_seed_flag_spellings(tmp_path):
    import tyro

    from memrl.cli import _spell_flags
    from memrl.world_model.train import RSSMTrainConfig

    spelled = _spell_flags(
        ["--batch_size", "8", "--no_occlusion", "--K", "4", "--output_dir=x"],
        RSSMTrainConfig.FLAG_ALIASES,
    )
    cfg = tyro.cli(RSSMTrainConfig, args=spelled)
    assert (cfg.batch_size, cfg.use_occlusion, cfg.K, str(cfg.output_dir)) == (8, False, 4, "x")
    defaults = tyro.cli(RSSMTrainConfig, args=[])
    assert (defaults.seed, defaults.seq_len, defaults.model.grid_size, defaults.epochs) == (
        42,
        64,
        32,
        100,
    )
    assert (defaults.lr, defaults.use_occlusion, str(defaults.output_dir)) == (
        1e-3,
        True,
        "outputs",
    )
    assert (defaults.viz_interval, defaults.K) == (10, 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rssm", "--grid_size", "31"], "grid_size=31; expected an even size of at least 8"),
        (["rssm", "--K", "64"], "K=64; expected fewer context frames than seq_len=64"),
        (["rssm-eval", "no/such/dir"], "no/such/dir holds no model.pt"),
    ],
)
def test_bad_world_model_input_is_a_clear_error(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit:  # tyro reports a config's own checks and exits itself
        code = exit.code
    assert code == 2
    assert message in " ".join(capsys.readouterr().err.split())  # tyro wraps long lines


@pytest.mark.parametrize(
    "extra",
    [["--grid_size", "48"], ["--grid_size", "64", "--latent", "categorical", "--groups", "4",
                             "--classes", "3", "--unimix", "0.05"]],
)  # fmt: skip
def test_any_grid_size_trains_without_channels_and_model_flags_reach_the_model(tmp_path, extra):
    """`memrl rssm --grid_size 48` / `64` derive the encoder depth themselves; every RSSMConfig
    field (groups, classes, unimix, ...) is a flag that reaches the saved model."""
    args = ["rssm", "--device", "cpu", "--output-dir", str(tmp_path), "--epochs", "1"]
    args += ["--steps_per_epoch", "8", "--batch_size", "4", "--seq_len", "6", "--K", "2"]
    args += ["--deter_size", "16", "--hidden_size", "16", "--stoch_size", "4", "--lr", "3e-3"]
    assert main([*args, "--no-baseline", "--log_interval", "1", *extra]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["recon"] < records[0]["recon"]
    saved = load_checkpoint(tmp_path / "model.pt")["model_config"]
    assert saved["grid_size"] == int(extra[1]) and saved["channels"] is None
    if "--groups" in extra:
        assert (saved["groups"], saved["classes"], saved["unimix"]) == (4, 3, 0.05)
