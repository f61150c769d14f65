"""Running statistics for observation and reward normalisation (PPO's usual wrappers, as
tensors so they are checkpointed with the model)."""

from __future__ import annotations

import torch

from memrl.runs import distributed


class RunningMeanStd:
    """Mean and variance of a stream of batches (Chan et al. parallel update), float64."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.var = torch.ones(shape, dtype=torch.float64)
        self.count = epsilon

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.detach().to("cpu", torch.float64).reshape(-1, *self.mean.shape)
        n = batch.shape[0]
        if n == 0:
            return
        mean, var = batch.mean(0), batch.var(0, unbiased=False)
        delta, total = mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + var * n + delta.square() * self.count * n / total
        self.var, self.count = m2 / total, total

    def merge_ranks(self, before: dict) -> None:
        """Under torchrun: every rank started from the same statistics ``before`` (a
        :meth:`state_dict`) and added its own batches; combine all ranks' batches exactly
        (sums of x and x² over ranks, the shared start counted once)."""
        if distributed.world_size() == 1:
            return
        extra = distributed.world_size() - 1
        mine = _sums(self.count, self.mean, self.var)
        start = _sums(before["count"], before["mean"], before["var"])
        total = distributed.all_sum(mine) - extra * start
        count, (sums, squares) = float(total[0]), total[1:].view(2, *self.mean.shape).unbind()
        self.mean = sums / count
        self.var = (squares / count - self.mean.square()).clamp(min=0.0)
        self.count = count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def _sums(count: float, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(count, sum of x, sum of x²) of statistics, flat."""
    second = (var + mean.square()) * count
    return torch.cat(
        [torch.tensor([count], dtype=torch.float64), mean.flatten() * count, second.flatten()]
    )


class ObsNormalizer:
    """``clip((obs - mean) / std, -clip, clip)`` with running statistics; identity if off."""

    def __init__(self, shape: tuple[int, ...], enabled: bool, clip: float = 10.0) -> None:
        self.enabled, self.clip = enabled, clip
        self.stats = RunningMeanStd(shape)

    def __call__(self, obs: torch.Tensor, update: bool = True) -> torch.Tensor:
        if not self.enabled:
            return obs
        if update:
            self.stats.update(obs)
        mean = self.stats.mean.to(obs.device, obs.dtype)
        std = self.stats.var.sqrt().to(obs.device, obs.dtype)
        return ((obs - mean) / (std + 1e-8)).clamp(-self.clip, self.clip)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (the reward normalisation of
    PPO implementations); identity if off."""

    def __init__(self, num_envs: int, gamma: float, enabled: bool, clip: float = 10.0) -> None:
        self.enabled, self.gamma, self.clip = enabled, gamma, clip
        self.stats = RunningMeanStd(())
        self.returns = torch.zeros(num_envs, dtype=torch.float64)

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return reward
        self.returns = self.returns * self.gamma + reward.to(torch.float64).cpu()
        self.stats.update(self.returns)
        self.returns[done.cpu()] = 0.0
        std = float(self.stats.var.sqrt()) + 1e-8
        return (reward / std).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "returns": self.returns}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["stats"])
        self.returns = state["returns"]
