"""The seed-lifecycle task's hosts: N small CNN classifiers and their seeds, held as stacked
tensors and trained as one computation (``memrl.envs.seed_lifecycle`` describes the task).

Host i's parameters are row i of tensors ``(N, *shape)``, with Adam's moments beside them and a
step count per row; a seed is a row of a *bank*, one bank per (slot, blueprint). The hosts
train in passes of ``hosts_per_pass`` (the hosts are independent; a pass small enough to stay
in cache runs faster per host): in a pass, each layer of its G hosts is one grouped convolution
(``memrl.envs.lifecycle_layers``), the hosts with a seed of one blueprint in one slot run it as
one grouped computation, and one Adam update per tensor trains them all. What host i computes
depends on its own weights, data order and seeds alone, bit for bit.

Initial weights are drawn exactly as one host would draw them (``nn.Conv2d`` / ``nn.Linear``
and the blueprint's modules, built under the caller's torch seed), then copied into the rows.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memrl.envs.lifecycle_layers import (
    BLUEPRINTS,
    LiveSeed,
    SlotSeeds,
    grouped_conv,
    head,
    image_losses,
    module_tensors,
    positions_in,
    run_slot,
    task_losses,
)

# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def load_dataset(
    dataset: str = "digits", data_dir: str | None = None, max_train: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): images (N, C, H, W) float32, labels (N,) long.

    digits: scikit-learn's bundled 1,797 8x8 digits, pixels / 16, a fixed split of 500 for
    validation. cifar10: torchvision's CIFAR10 from ``data_dir`` (``cifar-10-batches-py``
    inside it; never downloaded), its test set for validation, standardised per channel;
    ``max_train`` keeps the first images of each set (default 5,000 train, 1,000 validation).
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.as_tensor(np.random.RandomState(0).permutation(len(y)))
        val, train = order[:500], order[500:]
        if max_train is not None:
            train = train[:max_train]
        return x[train], y[train], x[val], y[val]
    if dataset == "cifar10":
        if data_dir is None:
            raise ValueError(
                "dataset='cifar10' needs data_dir=<folder holding cifar-10-batches-py>"
            )
        folder = Path(data_dir).expanduser() / "cifar-10-batches-py"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found: {folder} does not exist; expected the python version of "
                "CIFAR-10 there (data_batch_1..5, test_batch), as torchvision.datasets.CIFAR10("
                "root, download=True) lays it out. This environment never downloads it."
            )
        from torchvision.datasets import CIFAR10

        n_train = 5000 if max_train is None else max_train
        parts = []
        for train, n in ((True, n_train), (False, max(n_train // 5, 1))):
            data = CIFAR10(str(Path(data_dir).expanduser()), train=train, download=False)
            x = torch.as_tensor(data.data[:n], dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
            parts.append((x, torch.as_tensor(data.targets[:n], dtype=torch.long)))
        mean = parts[0][0].mean((0, 2, 3), keepdim=True)
        std = parts[0][0].std((0, 2, 3), keepdim=True)
        (x_train, y_train), (x_val, y_val) = parts
        return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val
    raise ValueError(f"dataset={dataset!r}; expected 'digits' or 'cifar10'")


# ----------------------------------------------------------------------------- stacks


class _Stack:
    """One module's tensors for N hosts: parameters and buffers as rows of (N, *shape) tensors,
    with Adam's moments and a step count per row."""

    def __init__(self, modules: Sequence[nn.Module], num_hosts: int) -> None:
        params, buffers = module_tensors(modules)
        self.params = [torch.zeros(num_hosts, *p.shape) for p in params]
        self.buffers = [torch.zeros(num_hosts, *b.shape) for b in buffers]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = np.zeros(num_hosts, dtype=np.int64)

    def load(self, row: int, modules: Sequence[nn.Module]) -> None:
        """Row ``row`` becomes the modules' tensors, with a fresh optimiser state."""
        params, buffers = module_tensors(modules)
        with torch.no_grad():
            for mine, theirs in zip(self.params + self.buffers, params + buffers, strict=True):
                mine[row] = theirs
            for moment in self.exp_avgs + self.exp_avg_sqs:
                moment[row] = 0.0
        self.steps[row] = 0

    def rows(self, rows: Sequence[int]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(index, parameters and buffers) of ``rows``: views when the rows are consecutive
        (index None: changes land in the stack), else gathered copies."""
        return _take(self.params + self.buffers, rows)


def _take(tensors: Sequence[torch.Tensor], rows: Sequence[int]):
    """Rows of (N, ...) tensors: (None, views) for consecutive rows, else (index, copies)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and np.all(np.diff(rows) == 1):
        return None, [t[int(rows[0]) : int(rows[-1]) + 1] for t in tensors]
    index = torch.as_tensor(rows)
    return index, _gather(tensors, index)


def _gather(tensors: Sequence[torch.Tensor], index: torch.Tensor | None) -> list[torch.Tensor]:
    return list(tensors) if index is None else [t.index_select(0, index) for t in tensors]


class _Group:
    """Some rows of a stack, trained for one epoch: their parameters as leaves that take
    gradients, their buffers and optimiser state; ``members`` are their positions among the
    pass's hosts. ``write_back`` returns what was gathered. With ``views``, consecutive rows
    are trained in place instead; not for seeds: groups of one bank would share its version
    counter, and one group's update would void the other's autograd graph."""

    def __init__(
        self, stack: _Stack, rows: np.ndarray, members: list[int], views: bool = False
    ) -> None:
        self.stack, self.rows, self.members = stack, rows, members
        tensors = stack.params + stack.buffers + stack.exp_avgs + stack.exp_avg_sqs
        if views:
            self.index, tensors = _take(tensors, rows)
        else:
            self.index = torch.as_tensor(rows)
            tensors = _gather(tensors, self.index)
        n, b = len(stack.params), len(stack.buffers)
        self.params = [p.detach().requires_grad_() for p in tensors[:n]]
        self.buffers = tensors[n : n + b]
        moments = tensors[n + b :]
        self.exp_avgs, self.exp_avg_sqs = moments[:n], moments[n:]
        self.steps = stack.steps[rows].copy()

    def adam_step(self, grads: Sequence[torch.Tensor], lr: float) -> None:
        _adam(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps, lr)

    def write_back(self) -> None:
        self.stack.steps[self.rows] = self.steps
        if self.index is None:  # views: updated in place
            return
        with torch.no_grad():
            stack, mine = self.stack, self.params + self.buffers + self.exp_avgs + self.exp_avg_sqs
            homes = stack.params + stack.buffers + stack.exp_avgs + stack.exp_avg_sqs
            for home, tensor in zip(homes, mine, strict=True):
                home.index_copy_(0, self.index, tensor.detach())


def _adam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """torch.optim.Adam's update (its single-tensor path, default options), with a step count
    per row: the same float operations, so equal bit for bit to one Adam per row."""
    steps += 1
    step_size = [lr / (1 - beta1 ** float(s)) for s in steps]
    bias_correction2_sqrt = [(1 - beta2 ** float(s)) ** 0.5 for s in steps]
    uniform = bool(np.all(steps == steps[0]))
    with torch.no_grad():
        for param, grad, exp_avg, exp_avg_sq in zip(
            params, grads, exp_avgs, exp_avg_sqs, strict=True
        ):
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            if uniform:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt[0]).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size[0])
                continue
            shape = (len(steps),) + (1,) * (param.dim() - 1)
            bc2 = torch.tensor(bias_correction2_sqrt, dtype=param.dtype).view(shape)
            neg_step = torch.tensor([-s for s in step_size], dtype=param.dtype).view(shape)
            denom = (exp_avg_sq.sqrt() / bc2).add_(eps)
            param.add_(exp_avg.mul(neg_step).div_(denom))  # addcdiv_: self + value * t1 / t2


@dataclass
class _LearnerPass:
    """The local target of the learning seeds in one slot, for the hosts that have one there:
    ``rest_of_host(seed(h.detach()))``, the rest of each host (its later blocks, the seeds in
    their slots, its head) held constant. BatchNorm's running statistics in it still update, as
    they do in the single host's train-mode forward pass."""

    slot: int
    among: list[int]  # the learners' hosts, as positions among the epoch's hosts
    groups: dict[tuple[int, str], _Group]  # the learning seeds in this slot
    joint: dict[tuple[int, str], _Group]  # the seeds that train with their hosts, later slots
    alpha: dict[tuple[int, int], float]  # {(position, slot): alpha}

    def step(self, hosts: HostBatch, host: _Group, h: torch.Tensor, y: torch.Tensor) -> None:
        """One minibatch: h (B, H, W, G, C) the input of the slot, y (G, B) the labels."""
        positions = positions_in(self.among, range(h.shape[3]))
        if positions is not None:
            h, y = h.index_select(3, positions), y.index_select(0, positions)
        learners, _ = hosts._slot_seeds(self.among, self.groups, None)
        h = run_slot(h.detach(), learners[self.slot], True)
        later, copies = hosts._slot_seeds(self.among, self.joint, self.alpha, detach=True)
        weights = _gather([p.detach() for p in host.params], positions)
        logits, _ = hosts._forward(h, weights, later, True, first_block=self.slot + 1)
        params = [p for group in self.groups.values() for p in group.params]
        grads = torch.autograd.grad(task_losses(logits, y).sum(), params)
        start = 0
        for group in self.groups.values():
            group.adam_step(grads[start : start + len(group.params)], hosts.lr)
            start += len(group.params)
        with torch.no_grad():  # BatchNorm updated gathered copies: back to their groups
            for homes, index, updated in copies:
                for home, copy in zip(homes, updated, strict=True):
                    home.index_copy_(0, index, copy)


# ----------------------------------------------------------------------------- hosts


class HostBatch:
    """N hosts of the seed-lifecycle task and their seeds (see the module docstring)."""

    def __init__(
        self,
        num_hosts: int,
        data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        widths: tuple[int, ...],
        lr: float,
        batch_size: int,
        hosts_per_pass: int | None = None,
    ) -> None:
        x_train, self.y_train, x_val, self.y_val = data
        self.x_train = x_train.permute(0, 2, 3, 1).contiguous()  # (n, H, W, C)
        self.x_val = x_val.permute(0, 2, 3, 1).contiguous()
        self.in_channels, self.num_classes = x_train.shape[1], int(self.y_train.max()) + 1
        self.widths, self.lr, self.batch_size = tuple(widths), lr, batch_size
        self.strides = (1, 2, 1) if x_train.shape[-1] <= 8 else (2, 2, 2)
        self.num_hosts = num_hosts
        if hosts_per_pass is None:  # the first block's output of a pass within ~4 MB
            first = self.widths[0] * (x_train.shape[-2] // self.strides[0]) ** 2
            hosts_per_pass = max(2, 2**20 // (batch_size * first))
        self.hosts_per_pass = hosts_per_pass
        self.host = _Stack(self._host_layers(), num_hosts)
        self.host_params = sum(p[0].numel() for p in self.host.params)
        self.banks: dict[tuple[int, str], _Stack] = {}

    def _host_layers(self) -> list[nn.Module]:
        """A host's layers, drawn in the single-host network's order: three 3x3 conv blocks (a
        slot after each), then a linear head over the globally average-pooled map."""
        layers, previous = [], self.in_channels
        for width, stride in zip(self.widths, self.strides, strict=True):
            layers.append(nn.Conv2d(previous, width, 3, stride, 1))
            previous = width
        return [*layers, nn.Linear(previous, self.num_classes)]

    def reset(self, row: int, torch_seed: int) -> None:
        """Host ``row`` starts again: weights drawn under ``torch_seed``, fresh Adam, no seeds."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            self.host.load(row, self._host_layers())

    def germinate(self, row: int, slot: int, blueprint: str, torch_seed: int) -> int:
        """A new seed of ``blueprint`` in host ``row``'s ``slot``, its weights drawn under
        ``torch_seed`` with a fresh Adam; returns its number of parameters."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            module = BLUEPRINTS[blueprint](self.widths[slot])
        if (slot, blueprint) not in self.banks:
            self.banks[slot, blueprint] = _Stack([module], self.num_hosts)
        self.banks[slot, blueprint].load(row, [module])
        return sum(p.numel() for p in module.parameters())

    def host_tensors(self, row: int) -> list[torch.Tensor]:
        """Host ``row``'s parameters (blocks, then head), as views."""
        return [p[row] for p in self.host.params]

    def seed_tensors(self, row: int, slot: int, blueprint: str) -> list[torch.Tensor]:
        """Host ``row``'s seed in ``slot`` (parameters, then buffers), as views."""
        bank = self.banks[slot, blueprint]
        return [t[row] for t in bank.params + bank.buffers]

    def _forward(self, h, host, slots, training, first_block=0, capture=()):
        """Logits (G, B, classes) of G hosts from ``h`` (B, H, W, G, C), the input of block
        ``first_block``; ``host`` their 8 parameter tensors (G, ...); ``slots[k]`` the seeds run
        in slot k. With ``capture``, also {k: the input of slot k}."""
        captured = {}
        for k in range(first_block, len(self.widths)):
            h = grouped_conv(h, host[2 * k], host[2 * k + 1], self.strides[k], 1).relu()
            if k in capture:
                captured[k] = h
            h = run_slot(h, slots[k], training)
        logits = head(h, *host[-2:])
        return (logits, captured) if capture else (logits, None)

    @staticmethod
    def _inputs(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x[index] for index (B, G) as (B, H, W, G, C): host g's images in column g."""
        return x[index].permute(0, 2, 3, 1, 4).contiguous()

    # ------------------------------------------------------------------------- training
    def _passes(self, n: int) -> list[slice]:
        """n hosts in passes of at most ``hosts_per_pass``, as even as can be: hosts are
        independent, and a pass small enough to stay in cache runs faster per host."""
        count = -(-n // self.hosts_per_pass)
        bounds = [round(i * n / count) for i in range(count + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    def train_epoch(
        self,
        rows: Sequence[int],
        seeds: Sequence[Sequence[LiveSeed]],
        shuffles: Sequence[torch.Generator],
    ) -> tuple[np.ndarray, np.ndarray]:
        """One pass over the training set for hosts ``rows`` (``seeds`` and ``shuffles`` one per
        row), each in the order of its own generator. A host and the seeds in its forward pass
        (alpha > 0) train on the task loss; a learning seed on the task loss of
        ``rest_of_host(seed(h.detach()))``, with gradients for itself only. Returns the training
        loss and accuracy per host."""
        rows = np.asarray(rows, dtype=np.int64)
        out = [self._train(rows[p], seeds[p], shuffles[p]) for p in self._passes(len(rows))]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _train(self, rows, seeds, shuffles):
        host = _Group(self.host, rows, list(range(len(rows))), views=True)
        joint = self._groups(rows, seeds, learning=False)
        learning = self._groups(rows, seeds, learning=True)
        alpha = {(i, s.slot): s.alpha for i, ss in enumerate(seeds) for s in ss}
        host_slots, _ = self._slot_seeds(range(len(rows)), joint, alpha)
        passes = []
        for slot in sorted({slot for slot, _ in learning}):
            groups = {key: g for key, g in learning.items() if key[0] == slot}
            among = sorted(i for g in groups.values() for i in g.members)
            later = {key: g for key, g in joint.items() if key[0] > slot}
            passes.append(_LearnerPass(slot, among, groups, later, alpha))
        capture = {p.slot for p in passes}
        n = len(self.y_train)
        order = torch.stack([torch.randperm(n, generator=g) for g in shuffles], 1)  # (n, G)
        total_loss = torch.zeros(len(rows), dtype=torch.float64)
        correct = torch.zeros(len(rows), dtype=torch.long)
        for index in order.split(self.batch_size):
            x, y = self._inputs(self.x_train, index), self.y_train[index.T]  # y (G, B)
            logits, captured = self._forward(x, host.params, host_slots, True, capture=capture)
            for learner in passes:
                learner.step(self, host, captured[learner.slot], y)
            loss = task_losses(logits, y)  # (G,)
            loss.sum().backward()
            for group in [host, *joint.values()]:
                group.adam_step([p.grad for p in group.params], self.lr)
                for p in group.params:
                    p.grad = None
            total_loss += loss.detach().double() * len(index)
            correct += (logits.detach().argmax(-1) == y).sum(1)
        for group in [host, *joint.values(), *learning.values()]:
            group.write_back()
        return (total_loss / n).numpy(), (correct.double() / n).numpy()

    def _groups(self, rows, seeds, learning: bool) -> dict[tuple[int, str], _Group]:
        """Per (slot, blueprint), the learning seeds or those that train with their hosts (alpha
        > 0), as groups."""
        members: dict[tuple[int, str], list[int]] = {}
        for i, host_seeds in enumerate(seeds):
            for s in host_seeds:
                if s.learning == learning and (learning or s.alpha > 0):
                    members.setdefault((s.slot, s.blueprint), []).append(i)
        return {key: _Group(self.banks[key], rows[m], m) for key, m in members.items()}

    def _slot_seeds(self, among, groups, alpha, detach=False):
        """Per slot, the ``SlotSeeds`` of ``groups`` for a pass over the hosts at positions
        ``among`` (alpha: {(position, slot): alpha}, None for learners), and the buffers that
        were copied, to be returned after the pass."""
        among = list(among)
        present = set(among)
        slots: list[list[SlotSeeds]] = [[] for _ in self.widths]
        copies = []
        for (slot, blueprint), group in groups.items():
            inside = [j for j, i in enumerate(group.members) if i in present]
            if not inside:
                continue
            members = [group.members[j] for j in inside]
            index = positions_in(inside, range(len(group.members)))
            params = _gather([p.detach() if detach else p for p in group.params], index)
            buffers = _gather(group.buffers, index)
            if index is not None and buffers:
                copies.append((group.buffers, index, buffers))
            weights = None
            if alpha is not None:
                weights = torch.tensor([alpha[i, slot] for i in members]).view(-1, 1)
            positions = positions_in(members, among)
            slots[slot].append(SlotSeeds(blueprint, positions, params, buffers, weights))
        return slots, copies

    # ------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self, rows: Sequence[int], seeds: Sequence[Sequence[LiveSeed]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validation loss and accuracy of hosts ``rows``, each with the seeds it is given at
        their alphas (BatchNorm on its running statistics)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = [self._evaluate(rows[p], seeds[p]) for p in self._passes(len(rows))]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _evaluate(self, rows, seeds):
        _, host = self.host.rows(rows)
        slots: list[list[SlotSeeds]] = [[] for _ in self.widths]
        members: dict[tuple[int, str], list[int]] = {}
        for i, host_seeds in enumerate(seeds):
            for s in host_seeds:
                if s.alpha > 0:
                    members.setdefault((s.slot, s.blueprint), []).append(i)
        for (slot, blueprint), positions in members.items():
            bank = self.banks[slot, blueprint]
            _, tensors = bank.rows(rows[positions])
            n = len(bank.params)
            alphas = [next(s.alpha for s in seeds[i] if s.slot == slot) for i in positions]
            slots[slot].append(
                SlotSeeds(
                    blueprint,
                    positions_in(positions, range(len(rows))),
                    tensors[:n],
                    tensors[n:],
                    torch.tensor(alphas).view(-1, 1),
                )
            )
        n, g = len(self.y_val), len(rows)
        loss = torch.zeros(g, dtype=torch.float64)
        correct = torch.zeros(g, dtype=torch.long)
        for start in range(0, n, self.batch_size):  # a fixed split: the sums' order
            x = self.x_val[start : start + self.batch_size]
            y = self.y_val[start : start + self.batch_size].expand(g, -1)  # (G, B)
            x = x.unsqueeze(3).expand(-1, -1, -1, g, -1).contiguous()  # (B, H, W, G, C)
            logits, _ = self._forward(x, host, slots, False)
            loss += image_losses(logits, y).sum(1).double()
            correct += (logits.argmax(-1) == y).sum(1)
        return (loss / n).numpy(), (correct.double() / n).numpy()
