"""Run by tests/test_distributed.py under torchrun (not collected by pytest).

``python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_worker.py
MODE OUT [BATCH]``:
- ``train``: trains a small regression model with memrl.runs.distributed (broadcast of rank 0's
  init, shard_indices, average_gradients), merges running statistics across ranks and averages
  metrics; each rank writes what it ended with to ``OUT/rank<r>.pt``.
- ``fail``: rank 1 raises while rank 0 waits in a collective.
"""

import sys
from pathlib import Path

import torch
from torch import nn

from memrl.rl.normalize import RunningMeanStd
from memrl.runs import distributed


def train(out: Path, batch: int) -> None:
    rank = distributed.rank()
    torch.manual_seed(100 + rank)  # different inits: the broadcast must make them equal
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    distributed.broadcast_parameters(model)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=data, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)).sin()[:, None]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(3):
        order = distributed.shard_indices(len(x), epoch, seed=7)
        for index in order.split(batch):
            loss = (model(x[index]) - y[index]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            distributed.average_gradients(model.parameters())
            optimizer.step()
    # running statistics: a shared start, then each rank's own batches, then merged
    stats = RunningMeanStd((3,))
    stats.update(torch.arange(12.0).view(4, 3))
    before = stats.state_dict()
    for i in range(3):
        stats.update(
            torch.randn(5 + rank, 3, generator=torch.Generator().manual_seed(rank * 10 + i))
            * (rank + 1)
            + rank
        )
    stats.merge_ranks(before)
    figures = distributed.mean_over_ranks(
        {"a": float(rank), **({"only_rank0": 5.0} if rank == 0 else {})}
    )
    torch.save(
        {
            "params": [p.detach() for p in model.parameters()],
            "stats": stats.state_dict(),
            "figures": figures,
        },
        out / f"rank{rank}.pt",
    )


def fail() -> None:
    if distributed.rank() == 1:
        raise RuntimeError("rank 1 failed on purpose")
    torch.distributed.barrier()  # would wait forever without torchrun's failure handling


if __name__ == "__main__":
    distributed.init(torch.device("cpu"))
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "train":
        train(out, int(sys.argv[3]))
    else:
        fail()
    distributed.shutdown()
