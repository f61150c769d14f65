"""Deploy a trained memory policy: ``memrl export`` writes one policy step, with its memory as
explicit tensors, to a TorchScript or ONNX file; ``memrl.deploy.load`` runs it and keeps the
memory.

The exported graph is **one step**, batch size free:

- a ``memrl ppo`` policy: ``forward(obs (B, D) float32, is_first (B,) bool, state_0, ...,
  state_k)`` -> ``(action, value, next_state_0, ..., next_state_k)``. The observation
  normalisation of the run (if it trained with ``--norm-obs``) is inside, so a robot feeds raw
  observations; ``action`` is the greedy action (per head the most probable index, (B, heads)
  int64; or the Gaussian's mean, (B, D)).
- a ``memrl bc`` policy: ``forward(image (B, H, W, 3) uint8 as the push env renders it, state
  (B, 3) float32, is_first, state_0, ...)`` -> ``(action (B, 3), next_state_0, ...)``, the action
  decoded (spherical -> Cartesian, unscaled, clipped) inside; the memory is the frame stack's
  window and the GRU's state, whichever the policy has.
- a ``memrl spatial`` phase B or C run: the same inputs and outputs, the whole stack inside
  (frozen encoder, feature standardisation, FiLM-conditioned memory step, policy head, action
  scaling); the memory is the spatial core's state.

The state tensors are batch first, in the order of ``policy.initial_state``; the file records
their shapes and the graph's input and output names.

>>> memrl export runs/ppo --output policy.ts
>>> runner = memrl.deploy.load("policy.ts")
>>> runner.reset(batch_size=1)
>>> action = runner.act(obs, is_first)  # carries the memory to the next call

Formats: ``torchscript`` (every core) and ``onnx`` (inputs ``obs``, ``is_first``,
``state_0..k``, outputs ``action``, ``value``, ``next_state_0..k``, a dynamic batch axis; run by
onnxruntime, ``pip install memrl[deploy]``). ONNX has no complex numbers, so the cores whose
state is complex (s4d, lru, ffm) export to TorchScript only, and asking for ONNX names them.
act runs (action chunks, executed by the controller) are refused. A ppo policy whose env
reports action masks (``info["action_mask"]``, e.g. memrl/SeedLifecycle) takes the mask as its
second input, ``action_mask`` (B, num_params) bool, applied before the greedy choice.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from torch import nn

from memrl.envs import make_vector_env
from memrl.envs.push import PushConfig
from memrl.imitation.bc import VisuomotorBCPolicy
from memrl.rl.agent import PPOAgent
from memrl.rl.config import PPOConfig
from memrl.rl.distributions import make_distribution
from memrl.runs import ConfigError, check_writable_file, load_checkpoint, load_config
from memrl.spatial.model import SpatialStep


class PolicyStep(nn.Module):
    """One greedy step of a PPO agent, obs normalisation included (see the module docstring);
    with ``masked`` the second input is the action mask (B, num_params) bool of the env's
    ``info["action_mask"]``, applied before the greedy choice."""

    def __init__(self, agent: PPOAgent, masked: bool = False) -> None:
        super().__init__()
        self.masked = masked
        self.policy, self.head = agent.policy.cpu().eval(), agent.head
        stats, norm = agent.obs_norm.stats, agent.obs_norm
        self.normalise, self.clip = norm.enabled, norm.clip
        self.register_buffer("obs_mean", stats.mean.detach().float().clone())
        self.register_buffer("obs_std", stats.var.detach().float().sqrt().clone())

    def forward(self, obs: torch.Tensor, *inputs: torch.Tensor):
        mask, (is_first, *state) = (inputs[0], inputs[1:]) if self.masked else (None, inputs)
        if self.normalise:
            obs = ((obs - self.obs_mean) / (self.obs_std + 1e-8)).clamp(-self.clip, self.clip)
        params, value, next_state = self.policy.step(obs, tuple(state), is_first)
        if mask is not None:  # what MaskedCategorical's mode does, without its data checks
            params = params.masked_fill(~mask, -math.inf)
        dist = make_distribution(self.head, params, None, log_std=self.policy.log_std)
        return (dist.mode(), value, *next_state)


class VisuomotorStep(nn.Module):
    """One step of a BC policy, images as the env renders them and the action decoded (see the
    module docstring)."""

    def __init__(self, policy: VisuomotorBCPolicy) -> None:
        super().__init__()
        self.policy = policy.cpu().eval()

    def forward(self, image: torch.Tensor, state: torch.Tensor, is_first: torch.Tensor, *memory):
        images = image.permute(0, 3, 1, 2)[None]  # (1, B, 3, H, W): one step of a sequence
        raw, next_memory = self.policy(images, state[None], tuple(memory), is_first[None])
        return (self.policy.to_action(raw)[0], *next_memory)


@dataclasses.dataclass
class StepSpec:
    """What a one-step module takes and gives: its inputs before ``is_first`` (names and example
    tensors at batch 2), its outputs before the next state, its initial state at batch 2."""

    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    state: tuple[torch.Tensor, ...]
    meta: dict

    @property
    def state_shapes(self) -> list[list[int]]:
        return [list(s.shape[1:]) for s in self.state]


class Runner:
    """Acts with an exported (or in-memory) one-step policy and keeps its memory between calls:
    ``reset(batch_size)``, then ``act(obs, is_first)`` per step; ``obs`` is a tensor, or for a
    visuomotor policy a mapping with its ``image`` and ``state``."""

    def __init__(
        self,
        step: nn.Module,
        state_shapes: list[list[int]],
        inputs: list[str] = ("obs",),
        outputs: list[str] = ("action", "value"),
    ) -> None:
        self.step, self.state_shapes = step, [tuple(s) for s in state_shapes]
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.state: tuple[torch.Tensor, ...] = ()

    def reset(self, batch_size: int) -> None:
        """Empty memory for ``batch_size`` streams (every stream's next step starts anew)."""
        self.state = tuple(torch.zeros(batch_size, *s) for s in self.state_shapes)

    @torch.no_grad()
    def act(self, obs, is_first: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy action for ``obs`` (B, D) (or ``{"image": (B, H, W, 3) uint8, "state":
        (B, 3)}``); ``is_first`` (B,) bool marks streams whose episode starts here (default:
        none)."""
        named = obs if isinstance(obs, Mapping) else {self.inputs[0]: obs}
        missing = [name for name in self.inputs if name not in named]
        if missing:
            raise ValueError(f"obs lacks {missing}; this policy takes {self.inputs}")
        dtypes = {"image": None, "action_mask": torch.bool}
        values = [
            torch.as_tensor(named[name], dtype=dtypes.get(name, torch.float32))
            for name in self.inputs
        ]
        batch = len(values[0])
        if not self.state:
            self.reset(batch)
        if is_first is None:
            is_first = torch.zeros(batch, dtype=torch.bool)
        is_first = torch.as_tensor(is_first, dtype=torch.bool)
        action, *rest = self.step(*values, is_first, *self.state)
        self.state = tuple(rest[len(self.outputs) - 1 :])
        return action


def load_agent(run_dir: Path) -> tuple[PPOAgent, bool]:
    """The PPO agent of a run directory, from its config.yaml and last checkpoint, and whether
    its env reports action masks (``info["action_mask"]`` at reset)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a memrl ppo run directory (no config.yaml)")
    cfg = load_config(PPOConfig, run_dir / "config.yaml")
    probe = make_vector_env(cfg.env, 1, 0, "sync", **cfg.env_options)
    agent = PPOAgent(
        cfg, probe.single_observation_space, probe.single_action_space, torch.device("cpu")
    )
    masked = "action_mask" in probe.reset(seed=0)[1]
    probe.close()
    agent.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt", "cpu")["agent"])
    return agent, masked


def _visuomotor_inputs(image_size: int) -> dict[str, torch.Tensor]:
    return {"image": torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8),
            "state": torch.zeros(2, 3)}  # fmt: skip


def load_step(run_dir: Path) -> tuple[nn.Module, StepSpec]:
    """The one-step module of a ``memrl ppo``, ``bc`` or ``spatial`` run directory and its
    spec."""
    if (run_dir / "model.pt").is_file() and (run_dir / "config.yaml").is_file():
        from memrl.spatial.evaluate import load_spatial_model

        if load_checkpoint(run_dir / "model.pt").get("kind") != "spatial":
            raise ConfigError(
                f"{run_dir / 'model.pt'} is not a spatial-memory model (an rssm world model?); "
                "export takes ppo, bc and spatial runs"
            )

        model, cfg, payload = load_spatial_model(run_dir, torch.device("cpu"))
        if cfg.phase not in ("B", "C"):
            raise ConfigError(
                f"{run_dir} is a spatial phase {cfg.phase} run, whose policy head is untrained; "
                "export a phase B or C run"
            )
        size = PushConfig.from_saved(payload.get("env_kwargs", {})).image_size
        meta = {"kind": "spatial", "core": cfg.core, "phase": cfg.phase}
        spec = StepSpec(_visuomotor_inputs(size), ["action"], model.initial_state(2), meta)
        return SpatialStep(model), spec
    if (run_dir / "policy.pt").is_file():  # an imitation run
        from memrl.imitation.evaluate import load_policy as load_imitation

        policy, env_config = load_imitation(run_dir, torch.device("cpu"))
        if not isinstance(policy, VisuomotorBCPolicy):
            raise ConfigError(
                f"{run_dir} holds an act policy; export takes ppo and bc runs (an action chunk "
                "is executed by a controller, outside a one-step graph)"
            )
        meta = {"kind": "bc", "use_gru": policy.core is not None}
        inputs = _visuomotor_inputs(env_config.image_size)
        spec = StepSpec(inputs, ["action"], policy.initial_state(2), meta)
        return VisuomotorStep(policy), spec
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} is not a memrl ppo or bc run directory (no config.yaml or policy.pt)"
        )
    agent, masked = load_agent(run_dir)
    inputs = {"obs": torch.zeros(2, agent.obs_norm.stats.mean.numel())}
    if masked:
        inputs["action_mask"] = torch.ones(2, agent.head.num_params, dtype=torch.bool)
    meta = {"kind": "ppo", "core": agent.cfg.core, "env": agent.cfg.env}
    spec = StepSpec(inputs, ["action", "value"], agent.policy.initial_state(2), meta)
    return PolicyStep(agent, masked), spec


def load_policy(run_dir: str | Path) -> Runner:
    """A :class:`Runner` on the run's PyTorch policy (what an exported file must equal)."""
    step, spec = load_step(Path(run_dir))
    return Runner(step, spec.state_shapes, list(spec.inputs), spec.outputs)


COMPLEX_STATE = ("s4d", "lru", "ffm")  # their state is complex modes: not ONNX


class _OnnxStep:
    """An onnxruntime session called like the PyTorch step: tensors in, tensors out."""

    def __init__(self, path: Path, names: list[str]) -> None:
        import onnxruntime

        self.names = names  # the inputs before is_first
        self.session = onnxruntime.InferenceSession(str(path))
        self.inputs = [i.name for i in self.session.get_inputs()]  # an unused one is dropped

    def __call__(self, *tensors):
        names = [*self.names, "is_first"] + [f"state_{i}" for i in range(len(tensors))]
        named = dict(zip(names, tensors, strict=False))
        feed = {name: named[name].numpy() for name in self.inputs}
        return tuple(torch.from_numpy(out) for out in self.session.run(None, feed))


def load(path: str | Path) -> Runner:
    """A :class:`Runner` on a file written by ``memrl export`` (TorchScript or ONNX)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        meta = json.loads(props["memrl"])
        inputs = meta.get("inputs", ["obs"])
        step = _OnnxStep(path, inputs)
    else:
        files = {"memrl.json": ""}
        step = torch.jit.load(str(path), _extra_files=files)
        meta = json.loads(files["memrl.json"])
        inputs = meta.get("inputs", ["obs"])
    outputs = meta.get("outputs", ["action", "value"])
    return Runner(step, meta["state_shapes"], inputs, outputs)


@dataclasses.dataclass
class ExportConfig:
    """Export one step of a trained `memrl ppo`, `bc` or `spatial` policy, its memory as explicit
    tensors."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `memrl ppo`, `memrl bc` or `memrl spatial` (phase B or C)."""
    output: Path = Path("policy.ts")
    """File to write (an onnx file is named *.onnx)."""
    format: Literal["torchscript", "onnx"] = "torchscript"
    """torchscript (every core) or onnx (not the complex-state cores s4d, lru, ffm)."""

    def __post_init__(self) -> None:
        if self.format == "onnx" and self.output.suffix != ".onnx":
            raise ValueError(f"--output {self.output}; an onnx file is named *.onnx")


def export(cfg: ExportConfig) -> Path:
    """Trace the run's policy step at batch 2 (batch size stays free) and save it with the
    state shapes; returns the file."""
    check_writable_file(cfg.output, "--output")
    step, spec = load_step(cfg.run_dir)
    if cfg.format == "onnx" and spec.meta.get("core") in COMPLEX_STATE:
        raise ConfigError(
            f"--format onnx: {cfg.run_dir} has core {spec.meta['core']}, whose state is complex "
            "numbers, which ONNX cannot hold; use --format torchscript"
        )
    example = (*spec.inputs.values(), torch.tensor([True, False]), *spec.state)
    meta = spec.meta | {"state_shapes": spec.state_shapes, "inputs": list(spec.inputs),
                        "outputs": spec.outputs}  # fmt: skip
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes, and TorchScript's deprecation notice
        if cfg.format == "onnx":
            _export_onnx(step, example, cfg.output, meta)
        else:
            traced = torch.jit.trace(step, example, check_trace=False)
            torch.jit.save(traced, str(cfg.output), _extra_files={"memrl.json": json.dumps(meta)})
    print(f"export: {cfg.run_dir} ({meta['kind']}) -> {cfg.output}")
    return cfg.output


def _batch_axes(step: nn.Module, count: int, batch) -> list:
    """torch.export's dynamic shapes for ``count`` positional inputs of ``step.forward``, each
    with a free batch axis: one entry per named parameter, then a tuple for the ``*args``."""
    named = [
        p for p in inspect.signature(step.forward).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]  # fmt: skip
    return [*[{0: batch}] * len(named), ({0: batch},) * (count - len(named))]


def _export_onnx(step: nn.Module, example: tuple, path: Path, meta: dict) -> None:
    import onnx

    names = [f"state_{i}" for i in range(len(meta["state_shapes"]))]
    inputs = [*meta["inputs"], "is_first", *names]
    outputs = [*meta["outputs"], *(f"next_{n}" for n in names)]
    # the TorchScript exporter has no antialiased resize (the spatial encoder's) and writes an
    # invalid graph for a multi-head masked policy (memrl/SeedLifecycle's): the dynamo exporter
    if meta["kind"] == "spatial" or "action_mask" in meta["inputs"]:
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            step, example, str(path), input_names=inputs, output_names=outputs,
            dynamic_shapes=_batch_axes(step, len(example), batch),
            dynamo=True, verbose=False,
        )  # fmt: skip
    else:
        torch.onnx.export(
            step, example, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in inputs}, dynamo=False,
        )  # fmt: skip
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "memrl", json.dumps(meta)
    onnx.save(model, str(path))
