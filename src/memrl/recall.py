"""``memrl recall``: the smallest real memory job — recall the first symbol of the episode.

A stream of random symbols is cut into episodes of random length; at every step the model must
output the symbol that opened the current episode (POPGym's RepeatFirst, as supervised
learning). A memoryless core can only be right on the first step of each episode (accuracy
about ``1/K + (1 - 1/K)/L``); a memory core reaches ~100%. Episodes span training windows, so
the core's state is carried across batches and detached (truncated BPTT), and resets happen
inside windows through ``is_first`` — the whole core protocol in one small loop.
"""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import save_file
from torch import nn

from memrl.cores import VectorCoreName, detach_state, make_core
from memrl.runs import Run, RunOptions, distributed


@dataclasses.dataclass
class RecallConfig(RunOptions):
    """Train a memory core to recall the first symbol of the current episode."""

    RESUME_FLAGS = (*RunOptions.RESUME_FLAGS, "steps", "log_interval", "checkpoint_interval")

    core: VectorCoreName = "gru"
    """Memory core (none = the memoryless baseline)."""
    num_symbols: int = 4
    """Alphabet size K."""
    mean_episode_length: float = 12.0
    """Episodes end with probability 1/L per step (geometric lengths)."""
    seq_len: int = 32
    """Truncated-BPTT window length T."""
    batch_size: int = 32
    """Parallel streams B."""
    hidden_size: int = 64
    """Core width."""
    steps: int = 300
    """Gradient steps in total."""
    lr: float = 3e-3
    """Adam learning rate."""
    log_interval: int = 20
    """Log metrics every this many steps."""
    checkpoint_interval: int = 100
    """Write checkpoints/last.pt every this many steps (and at the end)."""

    def __post_init__(self) -> None:
        for name in ("num_symbols", "seq_len", "batch_size", "hidden_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.num_symbols < 2:
            raise ValueError(f"num_symbols={self.num_symbols}; expected at least 2")
        if self.mean_episode_length < 1:
            raise ValueError(f"mean_episode_length={self.mean_episode_length}; expected >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; expected a positive number")
        if self.log_interval < 1 or self.checkpoint_interval < 1:
            raise ValueError("log_interval and checkpoint_interval must be positive")


class RecallStream:
    """B endless symbol streams cut into episodes; yields (symbols, is_first, target) windows.
    Seeded by its own generator, whose state goes into checkpoints."""

    def __init__(self, cfg: RecallConfig, generator: torch.Generator, device: torch.device) -> None:
        self.cfg, self.generator, self.device = cfg, generator, device
        self.first_symbol = torch.zeros(cfg.batch_size, dtype=torch.long)
        self.started = False

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, g = self.cfg, self.generator
        shape = (cfg.seq_len, cfg.batch_size)
        symbols = torch.randint(cfg.num_symbols, shape, generator=g)  # (T, B)
        is_first = torch.rand(shape, generator=g) < 1.0 / cfg.mean_episode_length  # (T, B)
        if not self.started:
            is_first[0] = True
            self.started = True
        target = torch.empty_like(symbols)
        current = self.first_symbol
        for t in range(cfg.seq_len):
            current = torch.where(is_first[t], symbols[t], current)
            target[t] = current
        self.first_symbol = current
        to = self.device
        return symbols.to(to), is_first.to(to), target.to(to)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "first": self.first_symbol,
            "started": self.started,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.first_symbol = state["first"]
        self.started = state["started"]


class RecallModel(nn.Module):
    """one-hot symbol -> memory core -> logits over symbols."""

    def __init__(self, cfg: RecallConfig) -> None:
        super().__init__()
        self.num_symbols = cfg.num_symbols
        self.core = make_core(cfg.core, input_size=cfg.num_symbols, hidden_size=cfg.hidden_size)
        self.head = nn.Linear(self.core.output_size, cfg.num_symbols)

    def forward(self, symbols, state, is_first):
        x = nn.functional.one_hot(symbols, self.num_symbols).float()  # (T, B, K)
        y, state = self.core(x, state, is_first)
        return self.head(y), state


def train_recall(cfg: RecallConfig) -> dict[str, float]:
    """Train, log, checkpoint; returns the final figures (also written to summary.json)."""
    run = Run("recall", cfg)
    run.check_budget(cfg.steps, "--steps")
    device = run.device
    model = RecallModel(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    stream = RecallStream(cfg, run.generator(), device)
    state = model.core.initial_state(cfg.batch_size, device=device)
    if (ckpt := run.restore()) is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        stream.load_state_dict(ckpt["stream"])
        if run.rank:  # rank 0's stream was saved; the others draw fresh data
            stream.generator = run.generator(run.start_step)
        state = tuple(s.to(device) for s in ckpt["core_state"])
    distributed.broadcast_parameters(model)

    def checkpoint(step: int) -> None:
        run.save(
            step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "stream": stream.state_dict(),
                "core_state": state,
            },
        )

    bar = run.progress(cfg.steps)
    figures: dict[str, float] = {}
    for step in range(run.start_step + 1, cfg.steps + 1):
        symbols, is_first, target = stream.next()
        logits, state = model(symbols, state, is_first)
        state = detach_state(state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        run.check_finite(step, loss=loss)
        distributed.optimizer_step(optimizer, loss, list(model.parameters()))
        if step % cfg.log_interval == 0 or step == cfg.steps:
            with torch.no_grad():
                correct = logits.argmax(-1) == target
                figures = {
                    "loss": loss.item(),
                    "accuracy": correct.float().mean().item(),
                    "accuracy_after_first": correct[~is_first].float().mean().item(),
                }
            figures = run.log(step, figures)
            bar.set_postfix(loss=f"{figures['loss']:.3f}", acc=f"{figures['accuracy']:.3f}")
        if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
            checkpoint(step)
        bar.update(1)
    bar.close()
    summary = {**figures, "chance_accuracy": 1.0 / cfg.num_symbols, "steps": cfg.steps}
    if not run.finish(summary):
        return summary
    save_file(model.state_dict(), run.dir / "model.safetensors")
    print(
        f"recall[{cfg.core}]: accuracy {summary.get('accuracy', float('nan')):.3f} "
        f"(chance {summary['chance_accuracy']:.3f}); run directory {run.dir}"
    )
    return summary
