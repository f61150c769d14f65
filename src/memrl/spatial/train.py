"""``memrl spatial``: train spatial memory in the three phases of the spatial-memory spec.

>>> memrl spatial --phase pretrain --dataset data/push.hdf5 --output-dir runs/spatial-enc
>>> memrl spatial --phase A --encoder-from runs/spatial-enc --epochs 5 --output-dir runs/spatial-A
>>> memrl spatial --phase B --init-from runs/spatial-A --epochs 5 --output-dir runs/spatial-B
>>> memrl spatial --phase C --init-from runs/spatial-B --epochs 2 --output-dir runs/spatial-C

- **pretrain** (optional) learns the frozen encoder without labels: the encoder (backbone and
  FPN neck) and a small decoder reconstruct the demonstrations' frames (at a third of their
  size) from the feature map P_t, an autoencoder; ``--encoder-from`` then takes it for phase A
  as it takes a ``memrl bc`` or ``act`` run's backbone. Phase A needs a trained encoder (one of
  those, or ImageNet weights for resnet18); ``--random-encoder`` runs on an untrained one, with
  a warning.
- **A** trains the memory (and its FiLM conditioning) as a dynamics model: L_dyn of the
  predictor on whole demonstrations, the memory reset at every episode start and RecoveryTag.
- **B** freezes memory and predictor; the memory maps of every step are computed once and the
  policy, the segmenter, its memoryless twin (on z_t alone) and the OOD head train on them.
- **C** fine-tunes everything but the frozen encoder end to end, at ``--finetune-lr``, on the sum
  of the dynamics, policy and segmentation losses.

Each phase starts from the previous phase's ``model.pt`` (``--init-from``), whose architecture
and data statistics it inherits. The frozen encoder runs once per run over every image (see
``memrl.spatial.data``). The last ``val_fraction`` of the demonstrations are held out; each
epoch logs their dynamics loss beside the copy baseline (predict z_{t+1} = z_t), the policy
loss and the boundary F1 with and without memory. Writes ``model.pt`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import nn

from memrl.data import load_episodes
from memrl.envs.push import saved_task
from memrl.nn.augment import random_shift
from memrl.nn.backbones import cached_weights
from memrl.nn.losses import huber_per_step, weighted_huber, weighted_mean
from memrl.runs import (
    ConfigError,
    Run,
    RunOptions,
    distributed,
    load_checkpoint,
    load_config,
    save_checkpoint,
)
from memrl.spatial.data import REQUIRED, SpatialBatch, SpatialDemos
from memrl.spatial.model import (
    FrameDecoder,
    SpatialModel,
    boundary_f1,
    boundary_loss,
    dynamics_loss,
    dynamics_per_step,
    frame_target,
)

PHASE_ORDER = {"pretrain": (), "A": ("A",), "B": ("A",), "C": ("B", "C")}  # may start from
ARCHITECTURE = (
    "backbone",
    "pretrained",
    "channels",
    "feature_size",
    "core",
    "hidden_channels",
    "num_layers",
    "s4d_grid",
    "condition",
    "residual",
)


@dataclasses.dataclass
class SpatialConfig(RunOptions):
    """Spatial memory (the spatial-memory spec): a ConvGRU/ConvLSTM/S4D memory over frozen
    feature maps, a forward-dynamics loss, policy and segmenter heads; phases A, B, C."""

    RESUME_FLAGS = (*RunOptions.RESUME_FLAGS, "epochs")

    phase: Literal["pretrain", "A", "B", "C"] = "A"
    """pretrain: the encoder as an autoencoder; A: memory as a dynamics model; B: memory frozen,
    heads trained; C: end to end."""
    dataset: Path = Path("data/push.hdf5")
    """HDF5 demonstrations written by `memrl push-collect`."""
    init_from: Path | None = None
    """Run directory of the previous phase (A for B; B or C for C); required for B and C."""
    backbone: Literal["cnn", "resnet18"] = "cnn"
    """Frozen vision backbone under the feature-pyramid neck."""
    encoder_from: Path | None = None
    """Phase A: take the frozen backbone's weights from this `memrl bc` or `memrl act` run (the
    spec's Stage 1: a backbone trained on the task); later phases inherit them."""
    pretrained: bool | None = None
    """ImageNet weights for resnet18 from the local torch cache: None uses them when present."""
    random_encoder: bool = False
    """Phase A without --encoder-from or ImageNet weights: run on an untrained (random) frozen
    encoder anyway (with a warning); without this flag that is an error."""
    channels: int = 128
    """Channels C of the feature map P_t."""
    feature_size: int = 14
    """Height and width S of the feature map P_t."""
    core: Literal["conv_gru", "conv_lstm", "s4d"] = "conv_gru"
    """Memory core (memrl.cores); s4d runs over a pooled grid of the map."""
    hidden_channels: int = 128
    """Channels K of the conv memory's state h_t (s4d: the state is C x grid x grid)."""
    num_layers: int = 1
    """Memory layers (1 or 2)."""
    s4d_grid: int = 4
    """s4d: the map is average-pooled to grid x grid before flattening."""
    condition: bool = True
    """Gate the memory with a ConditionVector (the standardised gripper position) by FiLM."""
    residual: bool = True
    """Predict z_{t+1} as z_t + Predictor(h_t, a_t) (starts at the copy baseline); off: the
    spec's Predictor(h_t, a_t) alone."""
    dyn_loss: Literal["mse", "cosine"] = "mse"
    """Forward-dynamics loss against StopGrad(z_{t+1})."""
    epochs: int = 10
    """Passes over the training demonstrations."""
    batch_size: int = 8
    """Whole episodes per minibatch (phases A and C)."""
    frame_batch_size: int = 64
    """Steps per minibatch in phase B (memory maps are precomputed, steps are independent)."""
    lr: float = 1e-3
    """Adam learning rate in phases A and B."""
    finetune_lr: float = 1e-4
    """Adam learning rate in phase C."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    val_fraction: float = 0.1
    """Share of demonstrations held out (the last ones; at least one)."""

    def __post_init__(self) -> None:
        for name in ("channels", "feature_size", "hidden_channels", "s4d_grid", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        for name in ("batch_size", "frame_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.num_layers not in (1, 2):
            raise ValueError(f"num_layers={self.num_layers}; expected 1 or 2")
        if not self.lr > 0 or not self.finetune_lr > 0 or self.grad_clip < 0:
            raise ValueError(
                f"lr={self.lr}, finetune_lr={self.finetune_lr}, grad_clip={self.grad_clip}; "
                "expected > 0, > 0, >= 0"
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; expected a value in (0, 1)")


def build_model(cfg: SpatialConfig, from_checkpoint: bool = False) -> SpatialModel:
    """The model of ``cfg`` (ImageNet weights are not looked up when a checkpoint follows)."""
    return SpatialModel(
        backbone=cfg.backbone,
        pretrained=False if from_checkpoint else cfg.pretrained,
        channels=cfg.channels,
        size=cfg.feature_size,
        core=cfg.core,
        hidden_channels=cfg.hidden_channels,
        num_layers=cfg.num_layers,
        condition_dim=3 if cfg.condition else 0,
        s4d_grid=cfg.s4d_grid,
        residual=cfg.residual,
    )


ENCODER_KINDS = ("bc", "act", "pretrain")  # runs whose backbone --encoder-from takes


def trained_backbone(cfg: SpatialConfig) -> dict[str, torch.Tensor]:
    """The backbone weights of the ``--encoder-from`` run (its ``policy.pt``), keyed as the
    backbone's own state dict; checks that the run is a bc / act / spatial pretrain run with
    ``cfg.backbone``. A pretrain run's FPN neck comes along, keyed ``neck.*``."""
    run_dir = Path(cfg.encoder_from)
    if not (run_dir / "policy.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"--encoder-from {run_dir}: no policy.pt and config.yaml there; expected the run "
            "directory of a finished `memrl bc`, `memrl act` or `memrl spatial --phase "
            "pretrain` run"
        )
    payload = load_checkpoint(run_dir / "policy.pt")
    backbone = yaml.safe_load((run_dir / "config.yaml").read_text()).get("backbone")
    if payload.get("kind") not in ENCODER_KINDS or backbone != cfg.backbone:
        raise ConfigError(
            f"--encoder-from {run_dir} holds a {payload.get('kind')} policy with backbone "
            f"{backbone!r}; expected a bc, act or pretrain run with backbone {cfg.backbone!r} "
            f"(--backbone {cfg.backbone})"
        )
    weights = payload["policy"]
    neck = {k: v for k, v in weights.items() if k.startswith("neck.")}
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)} | neck


def load_backbone(model: SpatialModel, weights: dict[str, torch.Tensor]) -> int:
    """Copy a policy backbone's ``weights`` into the encoder's backbone: every tensor the
    feature extractor kept (the layers up to its deepest level) must be there, with its shape;
    the policy's pooling is not used. Returns the tensors copied."""
    own = model.encoder.backbone.state_dict()
    missing = [k for k in own if k not in weights or weights[k].shape != own[k].shape]
    if missing:
        raise ConfigError(
            f"--encoder-from: the run's backbone lacks {missing[:3]} (or their shapes differ); "
            "expected the same architecture as the spatial encoder's backbone"
        )
    model.encoder.backbone.load_state_dict({k: weights[k] for k in own})
    neck = {k[len("neck.") :]: v for k, v in weights.items() if k.startswith("neck.")}
    if neck:  # a pretrain run trained the neck with the backbone
        try:
            model.encoder.neck.load_state_dict(neck)
        except RuntimeError:
            raise ConfigError(
                "--encoder-from: the run's FPN neck does not fit this encoder; pass the "
                "--channels of the pretrain run"
            ) from None
    return len(own) + len(neck)


def resolve_init(cfg: SpatialConfig) -> tuple[SpatialConfig, dict | None]:
    """Check the phase order and the ``--init-from`` run; returns the config with the previous
    run's architecture and that run's ``model.pt`` payload (None for a fresh phase A)."""
    if cfg.phase == "pretrain" and (cfg.init_from or cfg.encoder_from):
        raise ConfigError(
            "--phase pretrain trains the encoder from scratch; drop --init-from and "
            "--encoder-from (phase A takes the pretrained encoder with --encoder-from RUN_DIR)"
        )
    allowed = " or ".join(PHASE_ORDER[cfg.phase])
    if cfg.encoder_from is not None and cfg.init_from is not None:
        raise ConfigError(
            f"--encoder-from with --init-from {cfg.init_from}: a later phase inherits its "
            "encoder from the run it starts from; pass --encoder-from to phase A only"
        )
    if cfg.init_from is None:
        if cfg.phase == "A" and cfg.encoder_from is None:
            _check_untrained_encoder(cfg)
        if cfg.phase not in ("A", "pretrain"):
            raise ConfigError(
                f"phase {cfg.phase} starts from a finished phase {allowed} run: pass "
                "--init-from RUN_DIR (the order is A -> B -> C)"
            )
        return cfg, None
    run_dir = Path(cfg.init_from)
    if not (run_dir / "model.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"--init-from {run_dir}: no model.pt and config.yaml there; expected the run "
            "directory of a finished `memrl spatial` phase"
        )
    previous = load_config(SpatialConfig, run_dir / "config.yaml")
    if previous.phase not in PHASE_ORDER[cfg.phase]:
        raise ConfigError(
            f"--init-from {run_dir} is a phase {previous.phase} run; phase {cfg.phase} starts "
            f"from phase {allowed} (the order is A -> B -> C)"
        )
    default, inherited = SpatialConfig(), {}
    for name in ARCHITECTURE:
        mine, theirs = getattr(cfg, name), getattr(previous, name)
        if mine != theirs:
            if mine != getattr(default, name):
                raise ConfigError(
                    f"--{name.replace('_', '-')} {mine} differs from {theirs} of --init-from "
                    f"{run_dir}; the architecture is inherited from it, drop the flag"
                )
            inherited[name] = theirs
    return dataclasses.replace(cfg, **inherited), load_checkpoint(run_dir / "model.pt")


def _check_untrained_encoder(cfg: SpatialConfig) -> None:
    """Phase A with neither --encoder-from nor ImageNet weights would feed the memory features
    nobody trained: an error, unless --random-encoder asks for it (then a warning)."""
    imagenet = cfg.backbone == "resnet18" and cached_weights("resnet18").is_file()
    if imagenet and cfg.pretrained is not False:
        return
    if not cfg.random_encoder:
        raise ConfigError(
            "phase A needs a trained frozen encoder: --encoder-from RUN_DIR (a `memrl spatial "
            "--phase pretrain`, `memrl bc` or `memrl act` run), or ImageNet weights in the "
            "local torch cache with --backbone resnet18; --random-encoder runs on an untrained "
            "one (measured: the policy pushed in 25% against BC-CNN's 72%)"
        )
    warnings.warn(
        "--random-encoder: the frozen encoder is untrained, so the memory gets features nobody "
        "trained; pass --encoder-from RUN_DIR for a result worth having",
        stacklevel=2,
    )


def trainable_parts(model: SpatialModel, phase: str) -> list[nn.Module]:
    """The modules a phase trains (the encoder is never trained)."""
    heads = [model.policy, model.segmenter, model.segmenter_z, model.ood]
    return {"A": [model.memory, model.predictor, model.ood], "B": heads}.get(
        phase, [model.memory, model.predictor, *heads]
    )


def set_statistics(model: SpatialModel, train: SpatialDemos) -> None:
    """Feature, condition and action statistics of the training data (phase A)."""
    mean, std = train.feature_stats()
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    statistics = train.store.statistics()
    if model.condition_dim:
        model.condition_mean.copy_(statistics.state_mean)
        model.condition_std.copy_(statistics.state_std)
    model.action_scale.copy_(statistics.action_scale)


def memory_pass(model: SpatialModel, batch: SpatialBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised features z and memory maps h of a time-major episode batch (on the
    model's device)."""
    z = model.standardize(batch.features)  # (T, B, C, S, S)
    state = model.initial_state(z.shape[1], z.device)
    h, _ = model.remember(z, model.condition(batch.states), state, batch.is_first)
    return z, h


def step_losses(
    model: SpatialModel, phase: str, batch: SpatialBatch, z, h, pos_weight: float, kind: str
) -> dict[str, torch.Tensor]:
    """The losses of a phase for one batch (on the model's device); ``z``, ``h`` (T, B, ...)."""
    trust, actions = batch.trust, batch.actions
    scaled = actions / model.action_scale
    losses = {}
    if phase != "B":  # dynamics: steps whose next observation exists
        weights = trust[:-1] * batch.has_next[:-1]
        prediction = model.predict_next(h[:-1], scaled[:-1], z[:-1])
        losses["dyn"] = dynamics_loss(prediction, z[1:], weights, kind)
    if phase != "A":
        boundary = batch.boundary
        losses["policy"] = weighted_huber(model.act(h, z), scaled, actions, trust)
        losses["segment"] = boundary_loss(model.boundary_logits(h), boundary, trust, pos_weight)
        losses["segment_z"] = boundary_loss(model.boundary_logits_z(z), boundary, trust, pos_weight)
    if batch.ood is not None:
        losses["ood"] = boundary_loss(model.ood_logits(h), batch.ood, trust, 1.0)
    return losses


@torch.no_grad()
def cache_memory(model: SpatialModel, demos: SpatialDemos, batch_size: int, device) -> torch.Tensor:
    """Memory maps h of every step (N, K, S, S) float16 (phase B: the memory is frozen)."""
    cache = torch.empty(demos.store.num_steps, model.memory.out_channels, model.size, model.size)
    cache = cache.to(torch.float16)
    for which in demos.episode_batches(batch_size):
        batch = demos.episodes(which)
        _, h = memory_pass(model, batch.to(device))
        valid = batch.valid
        cache[batch.index[valid]] = h[valid.to(device)].to("cpu", torch.float16)
    return cache


@torch.no_grad()
def held_out(model: SpatialModel, demos: SpatialDemos, cfg: SpatialConfig, device) -> dict:
    """Figures over whole held-out episodes: dynamics loss and copy baseline (trust-weighted
    over steps with a next observation), policy loss, boundary F1 with and without memory."""
    keys = ("dyn", "copy", "w_dyn", "policy", "p_h", "p_z")
    flat = {k: torch.zeros(demos.store.num_steps) for k in keys}
    for which in demos.episode_batches(cfg.batch_size):
        batch = demos.episodes(which)
        on_device = batch.to(device)
        z, h = memory_pass(model, on_device)
        actions = on_device.actions
        index, valid = batch.index, batch.valid
        out = {
            "dyn": torch.zeros(valid.shape, device=device),
            "copy": torch.zeros(valid.shape, device=device),
            "w_dyn": on_device.trust * on_device.has_next,
            "policy": huber_per_step(model.act(h, z), actions / model.action_scale, actions),
            "p_h": model.boundary_logits(h).sigmoid(),
            "p_z": model.boundary_logits_z(z).sigmoid(),
        }
        scaled = actions[:-1] / model.action_scale
        prediction = model.predict_next(h[:-1], scaled, z[:-1])
        out["dyn"][:-1] = dynamics_per_step(prediction, z[1:], cfg.dyn_loss)
        out["copy"][:-1] = dynamics_per_step(z[:-1], z[1:], cfg.dyn_loss)
        for key, value in out.items():
            flat[key][index[valid]] = value[valid.to(device)].float().cpu()
    dyn = weighted_mean(flat["dyn"], flat["w_dyn"]).item()
    copy = weighted_mean(flat["copy"], flat["w_dyn"]).item()
    with_memory = boundary_f1(flat["p_h"], demos.boundary, demos.store.lengths)
    without = boundary_f1(flat["p_z"], demos.boundary, demos.store.lengths)
    return {
        "dyn_loss": dyn,
        "copy_loss": copy,
        "dyn_vs_copy": dyn / max(copy, 1e-12),
        "policy_loss": weighted_mean(flat["policy"], demos.trust).item(),
        "f1_memory": with_memory["f1"],
        "f1_z_only": without["f1"],
        "precision_memory": with_memory["precision"],
        "recall_memory": with_memory["recall"],
        "precision_z_only": without["precision"],
        "recall_z_only": without["recall"],
    }


def _minibatches(
    cfg: SpatialConfig, train: SpatialDemos, memory_cache: torch.Tensor | None, epoch: int
) -> list[SpatialBatch]:
    """This process's minibatches for ``epoch`` (its share under torchrun): whole episodes
    (phases A and C), or steps with their cached memory maps (B)."""
    if memory_cache is None:
        order = distributed.shard_indices(len(train), epoch, cfg.seed)
        return [train.episodes(w) for w in train.episode_batches(cfg.batch_size, order)]
    order = distributed.shard_indices(len(memory_cache), epoch, cfg.seed)
    return [
        dataclasses.replace(train.frames(index), memory=memory_cache[index][None])
        for index in order.split(cfg.frame_batch_size)
    ]


def pretrain_encoder(cfg: SpatialConfig) -> dict[str, float]:
    """Phase pretrain (module docstring): the encoder and a decoder as an autoencoder on the
    demonstrations' frames, random-shift augmented; logs the held-out reconstruction error
    beside the mean frame's; writes ``policy.pt`` (the encoder, for ``--encoder-from``)."""
    split = load_episodes(cfg.dataset, cfg.val_fraction, REQUIRED)
    run = Run("spatial", cfg)
    run.check_budget(cfg.epochs, "--epochs")
    device = run.device
    encoder = build_model(cfg).encoder.requires_grad_(True).to(device)
    decoder = FrameDecoder(cfg.channels, cfg.feature_size).to(device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    if (ckpt := run.restore()) is not None:
        encoder.load_state_dict(ckpt["encoder"])
        decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
    distributed.broadcast_parameters(encoder, decoder)
    train, val = split.train.images, split.val.images
    val_target = frame_target(val, cfg.feature_size)
    mean_frame_error = float(
        (val_target - frame_target(train, cfg.feature_size).mean(0)).square().mean()
    )
    bar = run.progress(cfg.epochs, desc="spatial pretrain epochs")
    figures: dict[str, float] = {}
    for epoch in range(run.start_step + 1, cfg.epochs + 1):
        encoder.train(), decoder.train()
        total, order = 0.0, distributed.shard_indices(len(train), epoch, cfg.seed)
        batches = order.split(cfg.frame_batch_size)
        for index in batches:
            images = random_shift(train[index]).to(device)
            loss = (
                (decoder(encoder(images)) - frame_target(images, cfg.feature_size)).square().mean()
            )
            run.check_finite(epoch, loss=loss)
            distributed.optimizer_step(optimizer, loss, params, cfg.grad_clip or None)
            total += loss.item()
        encoder.eval(), decoder.eval()
        with torch.no_grad():
            val_error = (
                sum(
                    float((decoder(encoder(v.to(device))).cpu() - t).square().sum())
                    for v, t in zip(val.split(256), val_target.split(256), strict=True)
                )
                / val_target.numel()
            )
        figures = {"train_recon": total / len(batches), "val_recon": val_error,
                   "val_recon_vs_mean_frame": val_error / mean_frame_error}  # fmt: skip
        figures = run.log(epoch, figures)
        bar.set_postfix(val=f"{figures['val_recon_vs_mean_frame']:.3f}xmean")
        bar.update(1)
        run.save(epoch, {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                         "optimizer": optimizer.state_dict()})  # fmt: skip
    bar.close()
    summary = figures | {"phase": cfg.phase, "epochs": cfg.epochs, "train_frames": len(train)}
    if not run.finish(summary):
        return summary
    save_checkpoint(run.dir / "policy.pt", {"kind": "pretrain", "policy": encoder.state_dict()})
    print(
        f"spatial[pretrain]: held-out reconstruction {figures['val_recon']:.4f} "
        f"({figures['val_recon_vs_mean_frame']:.3f} of the mean frame's); use it with "
        f"`memrl spatial --phase A --encoder-from {run.dir}`"
    )
    return summary


def train_spatial(cfg: SpatialConfig) -> dict[str, float]:
    """Train one phase (module docstring); writes ``model.pt`` and ``summary.json``."""
    cfg, init = resolve_init(cfg)
    if cfg.phase == "pretrain":
        return pretrain_encoder(cfg)
    encoder_weights = trained_backbone(cfg) if cfg.encoder_from is not None else None
    split = load_episodes(cfg.dataset, cfg.val_fraction, REQUIRED)
    try:
        task, _ = saved_task(
            split.attrs.get("task"), split.attrs.get("env_args", {}).get("env_kwargs", {})
        )
    except ValueError as err:
        raise ConfigError(f"--dataset {cfg.dataset}: {err}") from None
    run = Run("spatial", cfg)
    run.check_budget(cfg.epochs, "--epochs")
    device = run.device
    model = build_model(cfg, from_checkpoint=init is not None or cfg.resume is not None)
    if encoder_weights is not None:
        load_backbone(model, encoder_weights)
    model.to(device)
    if init is not None:
        model.load_state_dict(init["model"])
    parts = trainable_parts(model, cfg.phase)
    model.requires_grad_(False)
    for part in parts:
        part.requires_grad_(True)
    params = [p for part in parts for p in part.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.finetune_lr if cfg.phase == "C" else cfg.lr)
    if (ckpt := run.restore()) is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    distributed.broadcast_parameters(model)
    start = time.perf_counter()
    model.eval()
    train = SpatialDemos.encode(split.train, model.encoder, device)
    val = SpatialDemos.encode(split.val, model.encoder, device)
    if init is None and ckpt is None:
        set_statistics(model, train)
    positives = float(train.boundary.sum())
    pos_weight = min(20.0, (len(train.boundary) - positives) / max(positives, 1.0))
    memory_cache = cache_memory(model, train, cfg.batch_size, device) if cfg.phase == "B" else None
    if run.is_main:
        print(f"spatial[{cfg.phase}]: features cached in {time.perf_counter() - start:.1f} s")

    bar = run.progress(cfg.epochs, desc=f"spatial {cfg.phase} epochs")
    figures: dict[str, float] = {}
    for epoch in range(run.start_step + 1, cfg.epochs + 1):
        model.train()
        sums: dict[str, float] = {}
        start = time.perf_counter()
        batches = _minibatches(cfg, train, memory_cache, epoch)
        for batch in batches:
            batch = batch.to(device)
            if memory_cache is None:
                z, h = memory_pass(model, batch)
            else:
                z, h = model.standardize(batch.features), batch.memory.float()
            losses = step_losses(model, cfg.phase, batch, z, h, pos_weight, cfg.dyn_loss)
            loss = sum(losses.values())
            if "dyn" in losses:  # the copy baseline on the same steps, for the log
                weights = batch.trust[:-1] * batch.has_next[:-1]
                losses["copy"] = dynamics_loss(z[:-1], z[1:], weights, cfg.dyn_loss)
            run.check_finite(epoch, loss=loss)
            distributed.optimizer_step(optimizer, loss, params, cfg.grad_clip or None)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        seconds = time.perf_counter() - start
        model.eval()
        figures = {f"train_{k}": v / len(batches) for k, v in sums.items()}
        figures |= {f"val_{k}": v for k, v in held_out(model, val, cfg, device).items()}
        figures["steps_per_s"] = train.store.num_steps / seconds
        figures = run.log(epoch, figures)
        bar.set_postfix(
            dyn=f"{figures['val_dyn_vs_copy']:.3f}xcopy", f1=f"{figures['val_f1_memory']:.2f}"
        )
        bar.update(1)
        run.save(epoch, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    bar.close()
    summary = figures | {
        "phase": cfg.phase, "epochs": cfg.epochs, "train_demos": len(train), "task": task
    }  # fmt: skip
    if not run.finish(summary):
        return summary
    save_checkpoint(
        run.dir / "model.pt",
        {
            "kind": "spatial",
            "phase": cfg.phase,
            "model": model.state_dict(),
            "env_kwargs": split.attrs.get("env_args", {}).get("env_kwargs", {}),
            "task": task,
        },
    )
    print(
        f"spatial[{cfg.phase}, {cfg.core}]: held-out dynamics loss "
        f"{figures.get('val_dyn_loss', float('nan')):.4f} vs copy "
        f"{figures.get('val_copy_loss', float('nan')):.4f}, boundary F1 "
        f"{figures.get('val_f1_memory', float('nan')):.3f} (z only "
        f"{figures.get('val_f1_z_only', float('nan')):.3f}); run directory {run.dir}"
    )
    return summary
