"""Deploy a trained memory policy: ``memrl export`` writes one policy step, with its memory as
explicit tensors, to a TorchScript file; ``memrl.deploy.load`` runs it and keeps the memory.

The exported graph is **one step**: ``forward(obs (B, D) float32, is_first (B,) bool,
state_0, ..., state_k)`` -> ``(action, value, next_state_0, ..., next_state_k)``, batch size
free. The observation normalisation of the run (if it trained with ``--norm-obs``) is inside,
so a robot feeds raw observations; ``action`` is the greedy action (per head the most probable
index, (B, heads) int64; or the Gaussian's mean, (B, D)). The state tensors are the core's,
batch first, in the order of ``policy.initial_state``; the file records their shapes.

>>> memrl export runs/ppo --output policy.ts
>>> runner = memrl.deploy.load("policy.ts")
>>> runner.reset(batch_size=1)
>>> action = runner.act(obs, is_first)  # carries the memory to the next call

Formats: ``torchscript`` (every core) and ``onnx`` (inputs ``obs``, ``is_first``,
``state_0..k``, outputs ``action``, ``value``, ``next_state_0..k``, a dynamic batch axis; run by
onnxruntime, ``pip install memrl[deploy]``). ONNX has no complex numbers, so the cores whose
state is complex (s4d, lru, ffm) export to TorchScript only, and asking for ONNX names them.
bc and spatial runs and action masks inside the graph are still to come.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from torch import nn

from memrl.envs import make_vector_env
from memrl.rl.agent import PPOAgent
from memrl.rl.config import PPOConfig
from memrl.rl.distributions import make_distribution
from memrl.runs import ConfigError, check_writable_file, load_checkpoint, load_config


class PolicyStep(nn.Module):
    """One greedy step of a PPO agent, obs normalisation included (see the module docstring)."""

    def __init__(self, agent: PPOAgent) -> None:
        super().__init__()
        self.policy, self.head = agent.policy.cpu().eval(), agent.head
        stats, norm = agent.obs_norm.stats, agent.obs_norm
        self.normalise, self.clip = norm.enabled, norm.clip
        self.register_buffer("obs_mean", stats.mean.detach().float().clone())
        self.register_buffer("obs_std", stats.var.detach().float().sqrt().clone())

    def forward(self, obs: torch.Tensor, is_first: torch.Tensor, *state: torch.Tensor):
        if self.normalise:
            obs = ((obs - self.obs_mean) / (self.obs_std + 1e-8)).clamp(-self.clip, self.clip)
        params, value, next_state = self.policy.step(obs, tuple(state), is_first)
        dist = make_distribution(self.head, params, None, log_std=self.policy.log_std)
        return (dist.mode(), value, *next_state)


class Runner:
    """Acts with an exported (or in-memory) one-step policy and keeps its memory between calls:
    ``reset(batch_size)``, then ``act(obs, is_first)`` per step."""

    def __init__(self, step: nn.Module, state_shapes: list[list[int]]) -> None:
        self.step, self.state_shapes = step, [tuple(s) for s in state_shapes]
        self.state: tuple[torch.Tensor, ...] = ()

    def reset(self, batch_size: int) -> None:
        """Empty memory for ``batch_size`` streams (every stream's next step starts anew)."""
        self.state = tuple(torch.zeros(batch_size, *s) for s in self.state_shapes)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, is_first: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy action for ``obs`` (B, D); ``is_first`` (B,) bool marks streams whose
        episode starts here (default: none)."""
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if not self.state:
            self.reset(len(obs))
        if is_first is None:
            is_first = torch.zeros(len(obs), dtype=torch.bool)
        action, _, *state = self.step(obs, torch.as_tensor(is_first, dtype=torch.bool), *self.state)
        self.state = tuple(state)
        return action


def load_agent(run_dir: Path) -> PPOAgent:
    """The PPO agent of a run directory, from its config.yaml and last checkpoint."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a memrl ppo run directory (no config.yaml)")
    cfg = load_config(PPOConfig, run_dir / "config.yaml")
    probe = make_vector_env(cfg.env, 1, 0, "sync", **cfg.env_options)
    agent = PPOAgent(
        cfg, probe.single_observation_space, probe.single_action_space, torch.device("cpu")
    )
    probe.close()
    agent.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt", "cpu")["agent"])
    return agent


def load_policy(run_dir: str | Path) -> Runner:
    """A :class:`Runner` on the run's PyTorch policy (what an exported file must equal)."""
    agent = load_agent(Path(run_dir))
    shapes = [list(s.shape[1:]) for s in agent.policy.initial_state(1)]
    return Runner(PolicyStep(agent), shapes)


COMPLEX_STATE = ("s4d", "lru", "ffm")  # their state is complex modes: not ONNX


class _OnnxStep:
    """An onnxruntime session called like the PyTorch step: tensors in, tensors out."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path))
        self.inputs = [i.name for i in self.session.get_inputs()]  # an unused one is dropped

    def __call__(self, obs, is_first, *state):
        named = {"obs": obs, "is_first": is_first} | {f"state_{i}": s for i, s in enumerate(state)}
        feed = {name: named[name].numpy() for name in self.inputs}
        return tuple(torch.from_numpy(out) for out in self.session.run(None, feed))


def load(path: str | Path) -> Runner:
    """A :class:`Runner` on a file written by ``memrl export`` (TorchScript or ONNX)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return Runner(_OnnxStep(path), json.loads(meta["memrl"])["state_shapes"])
    files = {"memrl.json": ""}
    step = torch.jit.load(str(path), _extra_files=files)
    return Runner(step, json.loads(files["memrl.json"])["state_shapes"])


@dataclasses.dataclass
class ExportConfig:
    """Export one step of a trained `memrl ppo` policy, its memory as explicit tensors."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `memrl ppo`."""
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
    agent = load_agent(cfg.run_dir)
    if cfg.format == "onnx" and agent.cfg.core in COMPLEX_STATE:
        raise ConfigError(
            f"--format onnx: {cfg.run_dir} has core {agent.cfg.core}, whose state is complex "
            "numbers, which ONNX cannot hold; use --format torchscript"
        )
    step = PolicyStep(agent)
    state = agent.policy.initial_state(2)
    obs = torch.zeros(2, agent.obs_norm.stats.mean.numel())
    example = (obs, torch.tensor([True, False]), *state)
    meta = {"state_shapes": [list(s.shape[1:]) for s in state], "core": agent.cfg.core,
            "env": agent.cfg.env}  # fmt: skip
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes, and TorchScript's deprecation notice
        if cfg.format == "onnx":
            _export_onnx(step, example, cfg.output, meta)
        else:
            traced = torch.jit.trace(step, example, check_trace=False)
            torch.jit.save(traced, str(cfg.output), _extra_files={"memrl.json": json.dumps(meta)})
    print(f"export: {cfg.run_dir} ({agent.cfg.core}) -> {cfg.output}")
    return cfg.output


def _export_onnx(step: PolicyStep, example: tuple, path: Path, meta: dict) -> None:
    import onnx

    names = [f"state_{i}" for i in range(len(example) - 2)]
    inputs = ["obs", "is_first", *names]
    torch.onnx.export(
        step, example, str(path), input_names=inputs,
        output_names=["action", "value", *(f"next_{n}" for n in names)],
        dynamic_axes={n: {0: "batch"} for n in inputs}, dynamo=False,
    )  # fmt: skip
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "memrl", json.dumps(meta)
    onnx.save(model, str(path))
