"""Spatial memory (the spatial-memory spec): shapes through the stack, FiLM conditioning on the
gate pre-activations, reset tags, the stop-gradient, trust weighting, boundary labels and F1,
and phases A -> B -> C via the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memrl.cli import main
from memrl.data import EpisodeStore
from memrl.nn.fpn import make_spatial_encoder
from memrl.nn.losses import weighted_huber
from memrl.runs import load_checkpoint
from memrl.spatial.data import SpatialDemos, boundary_labels
from memrl.spatial.memory import SpatialMemory
from memrl.spatial.model import (
    SpatialModel,
    boundary_f1,
    dynamics_loss,
)

TINY = ["--channels", "8", "--hidden-channels", "8"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: threads only add synchronisation (measured 5x slower with 2 threads
    on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(core: str = "conv_gru", **kwargs) -> SpatialModel:
    torch.manual_seed(0)
    return SpatialModel(
        channels=8, core=core, hidden_channels=8, **({"s4d_grid": 2} | kwargs)
    ).eval()


def randomize_film(memory: SpatialMemory) -> None:
    with torch.no_grad():
        memory.film.weight.normal_(0, 0.5)
        memory.film.bias.normal_(0, 0.1)


@pytest.mark.parametrize(("core", "layers"), [("conv_gru", 1), ("conv_lstm", 2), ("s4d", 1)])
def test_shapes_through_the_whole_stack_and_step_agrees_with_unroll(core, layers):
    model = tiny_model(core, num_layers=layers)
    randomize_film(model.memory)
    T, B = 4, 2
    images = torch.randint(0, 256, (T * B, 3, 84, 84), dtype=torch.uint8)
    z = model.encode(images).view(T, B, 8, 14, 14)
    condition = model.condition(torch.randn(T, B, 3))
    is_first = torch.zeros(T, B, dtype=torch.bool)
    is_first[0] = True
    h, state = model.remember(z, condition, model.initial_state(B), is_first)
    K = model.memory.out_channels
    assert h.shape == (T, B, K, 14, 14) and state[0].shape[0] == B
    actions = torch.rand(T, B, 3) * 2 - 1
    assert model.predict_next(h, actions, z).shape == (T, B, 8, 14, 14)
    raw = model.act(h, z)
    assert raw.shape == (T, B, 3) and raw.abs().max() <= 1
    assert model.to_action(raw).shape == (T, B, 3)
    assert model.boundary_logits(h).shape == (T, B) == model.boundary_logits_z(z).shape
    assert model.ood_logits(h).shape == (T, B)
    # one step at a time, the state carried (evaluation), gives the unrolled maps
    state, stepped = model.initial_state(B), []
    with torch.no_grad():
        for t in range(T):
            h_t, state = model.memory.step(z[t], condition[t], state, is_first[t])
            stepped.append(h_t)
    assert torch.allclose(torch.stack(stepped), h, atol=1e-5)


def test_resnet18_encoder_gives_the_same_map_size():
    encoder = make_spatial_encoder("resnet18", channels=16, pretrained=False).eval()
    image = torch.randint(0, 256, (1, 3, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert encoder(image).shape == (1, 16, 14, 14)
    with pytest.raises(ValueError, match="unknown spatial backbone 'vit_b_16'"):
        make_spatial_encoder("vit_b_16")


def film_reference(memory, x, condition, state, is_first):
    """The spec's equations step by step, each gate one convolution of [h, x] whose output is
    FiLM-modulated, a <- (1 + gamma(c)) a + beta(c), before its nonlinearity."""
    core, K = memory.core, memory.core.hidden_channels
    G = 3 if memory.kind == "conv_gru" else 4
    gamma, beta = memory.film(condition).unflatten(-1, (2, -1)).unbind(2)  # (T, B, L*G*K)
    layers = [[s[:, k] for s in state] for k in range(core.num_layers)]
    ys = []
    for t in range(x.shape[0]):
        inp, keep = x[t], (~is_first[t]).float().view(-1, 1, 1, 1)
        for k in range(core.num_layers):
            h, *c = (s * keep for s in layers[k])

            def film(a, lo, hi, k=k, t=t):
                lo, hi = k * G * K + lo * K, k * G * K + hi * K
                return (1 + gamma[t, :, lo:hi, None, None]) * a + beta[t, :, lo:hi, None, None]

            x_conv = core.x_convs[k]
            if memory.kind == "conv_gru":
                w_zr = torch.cat([core.h_convs_zr[k].weight, x_conv.weight[: 2 * K]], 1)
                zr = F.conv2d(torch.cat([h, inp], 1), w_zr, x_conv.bias[: 2 * K], padding="same")
                z, r = torch.sigmoid(film(zr, 0, 2)).chunk(2, 1)
                w_n = torch.cat([core.h_convs_n[k].weight, x_conv.weight[2 * K :]], 1)
                n = F.conv2d(torch.cat([r * h, inp], 1), w_n, x_conv.bias[2 * K :], padding="same")
                layers[k] = [(1 - z) * h + z * torch.tanh(film(n, 2, 3))]
            else:
                w = torch.cat([core.h_convs[k].weight, x_conv.weight], 1)
                pre = F.conv2d(torch.cat([h, inp], 1), w, x_conv.bias, padding="same")
                i, f, g, o = film(pre, 0, 4).chunk(4, 1)
                c = torch.sigmoid(f) * c[0] + torch.sigmoid(i) * torch.tanh(g)
                layers[k] = [torch.sigmoid(o) * torch.tanh(c), c]
            inp = layers[k][0]
        ys.append(inp)
    finals = tuple(torch.stack([lay[i] for lay in layers], 1) for i in range(len(state)))
    return torch.stack(ys), finals


@pytest.mark.parametrize("core", ["conv_gru", "conv_lstm"])
def test_conditioning_gates_the_memory(core):
    torch.manual_seed(0)
    memory = SpatialMemory(core, 4, 5, hidden_channels=3, num_layers=2, condition_dim=3)
    x = torch.randn(5, 2, 4, 5, 5)
    is_first = torch.zeros(5, 2, dtype=torch.bool)
    is_first[0] = is_first[3, 1] = True
    cond_a, cond_b = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    state = tuple(torch.randn(s.shape) for s in memory.initial_state(2))
    # FiLM starts at zero -- the identity, scale 1 and shift 0: exactly the core's own unroll
    reference, _ = memory.core(x, state, is_first)
    h_a, _ = memory(x, cond_a, state, is_first)
    assert torch.equal(h_a, reference)
    randomize_film(memory)
    h_a, final = memory(x, cond_a, state, is_first)
    h_b, _ = memory(x, cond_b, state, is_first)
    assert (h_a - h_b).abs().max() > 1e-3 and (h_a - reference).abs().max() > 1e-3
    # and it is the spec's FiLM on every gate's pre-activation, layer by layer, resets included
    want_h, want_final = film_reference(memory, x, cond_a, state, is_first)
    torch.testing.assert_close(h_a, want_h, rtol=1e-5, atol=1e-6)
    for got, want in zip(final, want_final, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize("core", ["conv_gru", "conv_lstm"])
def test_film_on_a_one_channel_one_pixel_map_by_hand(core):
    """Two steps of a 1-channel memory on a 1x1 map (a 3x3 kernel sees only its centre), the
    gates' FiLM scales and shifts set by hand: every pre-activation a -> (1 + gamma) a + beta."""
    torch.manual_seed(0)
    memory = SpatialMemory(core, 1, 1, hidden_channels=1, condition_dim=1)
    G = 3 if core == "conv_gru" else 4
    gamma, beta = [0.5, -0.3, 0.8, 0.2][:G], [0.1, 0.4, -0.2, 0.3][:G]
    with torch.no_grad():
        memory.film.weight.copy_(torch.tensor(gamma + beta)[:, None])  # condition c = 1
        memory.film.bias.zero_()
    xs = [0.7, -1.2]
    h, state = memory(
        torch.tensor(xs).view(2, 1, 1, 1, 1),
        torch.ones(2, 1, 1),
        memory.initial_state(1),
        torch.tensor([[True], [False]]),
    )
    wx = memory.core.x_convs[0].weight[:, 0, 1, 1].tolist()  # kernel centres
    bx = memory.core.x_convs[0].bias.tolist()
    film = [lambda a, g=g: (1 + gamma[g]) * a + beta[g] for g in range(G)]
    h_ref, c_ref, hs = 0.0, 0.0, []
    for x in xs:
        if core == "conv_gru":
            wh = memory.core.h_convs_zr[0].weight[:, 0, 1, 1].tolist()
            wn = memory.core.h_convs_n[0].weight[0, 0, 1, 1].item()
            z = sigmoid(film[0](wx[0] * x + bx[0] + wh[0] * h_ref))
            r = sigmoid(film[1](wx[1] * x + bx[1] + wh[1] * h_ref))
            n = math.tanh(film[2](wx[2] * x + bx[2] + wn * r * h_ref))
            h_ref = (1 - z) * h_ref + z * n
        else:
            wh = memory.core.h_convs[0].weight[:, 0, 1, 1].tolist()
            i, f, g, o = (film[j](wx[j] * x + bx[j] + wh[j] * h_ref) for j in range(4))
            c_ref = sigmoid(f) * c_ref + sigmoid(i) * math.tanh(g)
            h_ref = sigmoid(o) * math.tanh(c_ref)
        hs.append(h_ref)
    assert h.flatten().tolist() == pytest.approx(hs, abs=1e-6)
    if core == "conv_lstm":
        assert state[1].item() == pytest.approx(c_ref, abs=1e-6)


def test_reset_tag_resets_memory_and_comes_from_the_dataset():
    torch.manual_seed(0)
    memory = SpatialMemory("conv_gru", 4, 5, hidden_channels=3, condition_dim=3)
    randomize_film(memory)
    x, cond = torch.randn(6, 1, 4, 5, 5), torch.randn(6, 1, 3)
    is_first = torch.zeros(6, 1, dtype=torch.bool)
    is_first[0] = is_first[3] = True  # episode start, then a RecoveryTag at t = 3
    tagged, _ = memory(x, cond, memory.initial_state(1), is_first)
    fresh, _ = memory(x[3:], cond[3:], memory.initial_state(1), is_first[:3])
    untagged, _ = memory(
        x, cond, memory.initial_state(1), is_first & (torch.arange(6) == 0)[:, None]
    )
    assert torch.allclose(tagged[3:], fresh, atol=1e-6)
    assert not torch.allclose(untagged[3:], fresh, atol=1e-3)
    # the dataset's recovery key becomes is_first; trust defaults to 1 and pads with 0
    episode = {
        "obs": {"image": np.zeros((4, 8, 8, 3), np.uint8), "state": np.zeros((4, 3), np.float32)},
        "actions": np.zeros((4, 3), np.float32),
        "phase": np.array([0, 1, 1, 2], np.int8),
    }
    tagged_episode = episode | {"recovery": np.array([False, False, True, False])}
    short = {k: v[:3] for k, v in tagged_episode.items() if k != "obs"}
    short["obs"] = {k: v[:3] for k, v in episode["obs"].items()}
    demos = encoded([tagged_episode, short])
    batch = demos.episodes(torch.tensor([0, 1]))
    assert batch.is_first.T.tolist() == [[True, False, True, False], [True, False, True, False]]
    assert batch.valid[:, 1].tolist() == [True, True, True, False]
    assert batch.has_next[:, 1].tolist() == [True, True, False, False]
    assert batch.features.shape == (4, 2, 3, 8, 8) and batch.images is None
    plain = encoded([episode, episode])
    assert plain.episodes(torch.tensor([0])).is_first[:, 0].tolist() == [True, False, False, False]
    assert plain.trust.tolist() == [1.0] * 8 and plain.ood is None
    # observation t was taken in the phase after action t - 1 (0, 0, 1, 1): a boundary at 2
    assert plain.boundary.tolist() == [False, False, True, False] * 2
    frames = plain.frames(torch.tensor([2, 5]))
    assert frames.is_first.tolist() == [[True, True]] and frames.boundary.tolist() == [
        [True, False]
    ]
    # trust is 0 on padding
    weighted = encoded([episode | {"trust": np.full(4, 0.5)}, short | {"trust": np.full(3, 2.0)}])
    assert weighted.episodes(torch.tensor([1])).trust[:, 0].tolist() == [2.0, 2.0, 2.0]
    assert weighted.episodes(torch.tensor([0, 1])).trust[:, 1].tolist() == [2.0, 2.0, 2.0, 0.0]


def encoded(episodes: list[dict]) -> SpatialDemos:
    """Spatial demonstrations whose 'encoder' passes the images through (as float16 maps)."""
    return SpatialDemos.encode(EpisodeStore.from_episodes(episodes), torch.nn.Identity(), "cpu")


def test_stop_gradient_keeps_the_target_and_the_encoder_out_of_the_graph():
    prediction = torch.randn(3, 2, 4, 5, 5, requires_grad=True)
    z_next = torch.randn(3, 2, 4, 5, 5, requires_grad=True)
    for kind in ("mse", "cosine"):
        dynamics_loss(prediction, z_next, torch.ones(3, 2), kind).backward()
        assert z_next.grad is None and prediction.grad.abs().sum() > 0
    # the whole stack from images: gradients reach memory and predictor, never the encoder
    model = tiny_model()
    model.train()
    images = torch.randint(0, 256, (6, 3, 84, 84), dtype=torch.uint8)
    z = model.encode(images).view(3, 2, 8, 14, 14)
    is_first = torch.tensor([[True, True], [False, False], [False, False]])
    h, _ = model.remember(
        z, model.condition(torch.randn(3, 2, 3)), model.initial_state(2), is_first
    )
    prediction = model.predict_next(h[:-1], torch.randn(2, 2, 3), z[:-1])
    dynamics_loss(prediction, z[1:], torch.ones(2, 2)).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.memory.core.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_trust_weights_change_the_loss_as_defined():
    prediction = torch.zeros(3, 1, 1, 2)
    target = torch.tensor([1.0, 3.0, 2.0]).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    per_step = torch.tensor([1.0, 9.0, 4.0])  # mean squared error of each step
    weights = torch.tensor([1.0, 0.0, 3.0])
    assert dynamics_loss(prediction, target, torch.ones(3)).item() == pytest.approx(14 / 3)
    assert dynamics_loss(prediction, target, weights).item() == pytest.approx((1 + 12) / 4)
    assert (per_step * weights).sum() / weights.sum() == pytest.approx(13 / 4)
    # cosine: 1 - cos; orthogonal maps give 1, equal maps give 0
    a, b = (
        torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]]),
        torch.tensor([[[[0.0, 1.0]]], [[[2.0, 2.0]]]]),
    )
    assert dynamics_loss(a, b, torch.tensor([1.0, 3.0]), "cosine").item() == pytest.approx(0.25)
    # the BC loss: Huber per component times 1 + 2 ||expert||, trust-weighted
    pred, tgt = torch.tensor([[0.5, 0.0, -2.0], [0.1, 0.1, 0.1]]), torch.zeros(2, 3)
    expert = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    step0 = (0.125 + 1.5) / 3 * 11
    step1 = 0.5 * 0.01 * 3 / 3
    assert weighted_huber(pred, tgt, expert, torch.tensor([2.0, 1.0])).item() == pytest.approx(
        (2 * step0 + step1) / 3
    )


def test_boundary_labels_and_f1_within_one_step():
    # phase after each action -> boundaries where the observed phase changes
    assert boundary_labels(np.array([0, 0, 1, 1, 2, 3])).tolist() == [0, 0, 0, 1, 0, 1]
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    lengths = torch.tensor([6, 4])
    # episode 1: a peak at 4 (one off the boundary at 3 -> a hit, and 5 is then unmatched),
    # episode 2: a peak at 1 (two off the boundary at 3 -> a miss)
    prob = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.9, 0.2, 0.1, 0.8, 0.1, 0.4])
    figures = boundary_f1(prob, labels, lengths)
    assert figures["precision"] == pytest.approx(1 / 2) and figures["recall"] == pytest.approx(
        1 / 3
    )
    assert figures["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert boundary_f1(labels.float(), labels, lengths)["f1"] == 1.0


# -- phases via the CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demos(push_demos):
    return push_demos(5)


def spatial(demos, run, phase, *extra):
    args = ["spatial", "--phase", phase, "--dataset", str(demos), "--output-dir", str(run)]
    args += ["--device", "cpu", "--val-fraction", "0.2", "--batch-size", "1", *extra]
    return main([str(a) for a in args])


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def part(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_phases_a_b_c_run_in_sequence(demos, tmp_path):
    args = ["--epochs", "4", "--lr", "3e-3", "--random-encoder", *TINY]
    assert spatial(demos, tmp_path / "A", "A", *args) == 0
    last = metrics(tmp_path / "A")[-1]
    assert last["train_dyn"] < last["train_copy"]  # the dynamics model beats copying
    # B inherits the architecture (no --channels here) and leaves memory and predictor alone
    assert spatial(demos, tmp_path / "B", "B", "--epochs", "2", "--init-from", tmp_path / "A") == 0
    a = load_checkpoint(tmp_path / "A" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "B" / "model.pt")["model"]
    for prefix in ("memory.", "predictor.", "encoder.", "feature_"):
        assert all(torch.equal(v, b[k]) for k, v in part(a, prefix).items()), prefix
    assert not all(torch.equal(v, b[k]) for k, v in part(a, "policy.").items())
    records = metrics(tmp_path / "B")
    assert records[-1]["train_policy"] < records[0]["train_policy"]
    # C fine-tunes the memory too
    assert spatial(demos, tmp_path / "C", "C", "--epochs", "1", "--init-from", tmp_path / "B") == 0
    c = load_checkpoint(tmp_path / "C" / "model.pt")["model"]
    assert not all(torch.equal(v, c[k]) for k, v in part(b, "memory.").items())
    assert all(torch.equal(v, c[k]) for k, v in part(b, "encoder.").items())
    assert main(["spatial-eval", str(tmp_path / "C"), "--episodes", "1", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "C" / "eval.json").read_text())
    assert result["dynamics"]["copy_baseline"] > 0 and result["held_out_demos"] == 1
    assert 0 <= result["segmenter"]["f1_memory"] <= 1 and 0 <= result["segmenter"]["f1_z_only"] <= 1
    assert result["push"]["episodes"] == 1 and result["push"]["results"][0]["seed"] == 1000
    assert main(["spatial-eval", str(tmp_path / "A"), "--episodes", "1"]) == 0
    assert "push" not in json.loads((tmp_path / "A" / "eval.json").read_text())


def test_s4d_variant_trains_phase_a(demos, tmp_path):
    args = ["--core", "s4d", "--s4d-grid", "2", "--channels", "8", "--epochs", "1"]
    args += ["--random-encoder"]
    assert spatial(demos, tmp_path / "S", "A", *args) == 0
    assert metrics(tmp_path / "S")[-1]["val_copy_loss"] > 0


def test_phase_order_and_missing_runs_are_clear_errors(demos, tmp_path, capsys):
    assert spatial(demos, tmp_path / "B", "B") == 2
    assert "phase B starts from a finished phase A run: pass --init-from" in capsys.readouterr().err
    assert spatial(demos, tmp_path / "B", "B", "--init-from", tmp_path / "nowhere") == 2
    assert "--init-from" in (err := capsys.readouterr().err) and "no model.pt" in err
    assert spatial(demos, tmp_path / "A", "A", "--epochs", "1", "--random-encoder", *TINY) == 0
    assert spatial(demos, tmp_path / "C", "C", "--init-from", tmp_path / "A") == 2
    assert "is a phase A run; phase C starts from phase B or C" in capsys.readouterr().err
    assert spatial(demos, tmp_path / "B", "B", "--init-from", tmp_path / "A", "--core", "s4d") == 2
    assert "--core s4d differs from conv_gru" in capsys.readouterr().err
    assert main(["spatial-eval", str(tmp_path / "nowhere")]) == 2
    assert "holds no model.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["spatial-eval", str(tmp_path / "A"), "--device", "banana"])
    assert exit_.value.code == 2
    assert "invalid choice 'banana' for argument '--device'" in capsys.readouterr().err


def test_encoder_from_a_bc_run_loads_its_backbone_and_keeps_it_frozen(demos, tmp_path, capsys):
    """The spec's Stage 1: phase A's encoder backbone is exactly the bc run's (every tensor the
    feature extractor keeps), bit-identical after phases A and B; bad runs are clear errors."""
    bc = tmp_path / "bc"
    args = ["bc", "--dataset", str(demos), "--epochs", "1", "--output-dir", str(bc)]
    assert main([*args, "--device", "cpu", "--val-fraction", "0.2", "--batch-size", "16"]) == 0
    policy = load_checkpoint(bc / "policy.pt")["policy"]
    trained = {
        k.removeprefix("backbone."): v for k, v in policy.items() if k.startswith("backbone.")
    }
    args = ["--epochs", "1", "--encoder-from", bc, *TINY]
    assert spatial(demos, tmp_path / "A", "A", *args) == 0
    assert spatial(demos, tmp_path / "B", "B", "--epochs", "1", "--init-from", tmp_path / "A") == 0
    for run in ("A", "B"):
        encoder = part(load_checkpoint(tmp_path / run / "model.pt")["model"], "encoder.backbone.")
        assert len(encoder) >= 6  # the conv layers up to the deepest level, weights and biases
        for key, value in encoder.items():
            assert torch.equal(value, trained[key.removeprefix("encoder.backbone.")]), (run, key)
    capsys.readouterr()
    assert spatial(demos, tmp_path / "X", "A", "--encoder-from", tmp_path / "nowhere") == 2
    assert "--encoder-from" in (err := capsys.readouterr().err) and "no policy.pt" in err
    assert spatial(demos, tmp_path / "X", "A", "--encoder-from", bc, "--backbone", "resnet18") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds a bc policy with backbone 'cnn'; expected a bc, act or pretrain run" in err
    args = ["--encoder-from", bc, "--init-from", tmp_path / "A"]
    assert spatial(demos, tmp_path / "X", "B", *args) == 2
    assert "pass --encoder-from to phase A only" in capsys.readouterr().err


def test_pretrain_phase_lowers_its_loss_and_phase_a_takes_its_encoder(demos, tmp_path, capsys):
    """The self-supervised Stage 1: the autoencoder's held-out error falls below the mean
    frame's; phase A's whole encoder (backbone and FPN neck) is then exactly the pretrained one.
    An untrained encoder is an error unless asked for, and then a warning."""
    enc = tmp_path / "enc"
    args = ["--epochs", "3", "--lr", "3e-3", "--frame-batch-size", "8", *TINY]
    assert spatial(demos, enc, "pretrain", *args) == 0
    records = metrics(enc)
    assert records[-1]["val_recon"] < records[0]["val_recon"]
    assert records[-1]["val_recon_vs_mean_frame"] < 1
    saved = load_checkpoint(enc / "policy.pt")["policy"]
    assert spatial(demos, tmp_path / "A", "A", "--epochs", "1", "--encoder-from", enc, *TINY) == 0
    encoder = part(load_checkpoint(tmp_path / "A" / "model.pt")["model"], "encoder.")
    assert set(encoder) == {f"encoder.{k}" for k in saved}
    for key, value in encoder.items():
        assert torch.equal(value, saved[key.removeprefix("encoder.")]), key
    capsys.readouterr()
    assert spatial(demos, tmp_path / "X", "A", *TINY) == 2
    assert "phase A needs a trained frozen encoder" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="--random-encoder: the frozen encoder is untrained"):
        assert spatial(demos, tmp_path / "R", "A", "--epochs", "1", "--random-encoder", *TINY) == 0
    assert spatial(demos, tmp_path / "X", "pretrain", "--encoder-from", enc) == 2
    assert "--phase pretrain trains the encoder from scratch" in capsys.readouterr().err
