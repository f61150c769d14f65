"""The visuomotor imitation table: push success of every policy row, several training seeds, on
the same demonstrations and held-out seeds.

Each cell (row, training seed) is a ``memrl bc`` / ``memrl act`` run directory under --out-dir
followed by ``memrl imitation-eval``; finished cells are skipped and a killed run resumes from its
last checkpoint, so the table can be built across several sittings (run the same command again).
The demonstrations of --task are made first when --dataset does not exist (``memrl
push-collect --episodes 200 --seed 0 --task TASK``); the cells of a task go to --out-dir/TASK.

Columns: success over the held-out seeds (mean ± std over training seeds), the pooled success
with its 95% Wilson interval, and the training wall time per run (mean).

python benchmarks/imitation_table.py                         # push: every row, 3 seeds
python benchmarks/imitation_table.py --task push-hidden-goal # the task that needs memory
python benchmarks/imitation_table.py --rows bc bc-state --seeds 0
python benchmarks/imitation_table.py --report                # the finished cells only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cells import memrl, train_or_resume, train_wall

from memrl.imitation.evaluate import wilson_interval
from memrl.runs import write_json

ROWS: dict[str, tuple[str, list[str]]] = {
    "bc": ("BC-CNN, defaults", ["bc"]),
    "bc-state": ("BC-CNN + gripper state", ["bc", "--use-state"]),
    "bc-gru": ("BC-CNN + GRU (memory through the episode)", ["bc", "--use-gru"]),
    "bc-stack4": ("BC-CNN, 4-frame stack", ["bc", "--frame-stack", "4"]),
    "act": ("ACT, defaults", ["act"]),
    "act-h4": ("ACT, 4 observations", ["act", "--obs-horizon", "4"]),
    "bc-spec": (
        "BC-CNN, the spec's settings",
        [
            "bc",
            "--optimizer",
            "adam",
            "--schedule",
            "plateau",
            "--lr-patience",
            "2",
            "--epochs",
            "20",
        ],
    ),  # fmt: skip
}
"""Row key -> (label, the training command's arguments after ``memrl``)."""


def run_cell(args: argparse.Namespace, row: str, seed: int) -> dict | None:
    """Train (or resume) and evaluate one cell; None when --report and it is not finished."""
    run_dir = args.out_dir / f"{row}-seed{seed}"
    result = run_dir / "table.json"
    if result.exists():
        return json.loads(result.read_text())
    if args.report:
        return None
    command = [*ROWS[row][1], "--dataset", str(args.dataset), "--seed", str(seed)]
    start = time.perf_counter()
    train_or_resume(run_dir, command, "--output-dir", args.device)
    wall = time.perf_counter() - start
    memrl("imitation-eval", str(run_dir), "--episodes", str(args.episodes), "--seed",
          str(args.eval_seed), "--videos", "0", "--device", args.device)  # fmt: skip
    evaluation = json.loads((run_dir / "eval.json").read_text())
    cell = {
        "successes": sum(bool(r["success"]) for r in evaluation["results"]),
        "episodes": evaluation["episodes"],
        "train_wall_s": train_wall(run_dir, wall),
        "command": "memrl " + " ".join(command),
    }
    write_json(result, cell)
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", choices=["push", "push-hidden-goal"], default="push")
    parser.add_argument("--dataset", type=Path, help="default: data/<task>.hdf5")
    parser.add_argument("--episodes", type=int, default=50, help="held-out evaluation episodes")
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/imitation_table"))
    parser.add_argument("--report", action="store_true", help="only report the finished cells")
    args = parser.parse_args()
    args.dataset = args.dataset or Path(f"data/{args.task}.hdf5")
    args.out_dir = args.out_dir / args.task
    if not args.dataset.exists() and not args.report:
        memrl("push-collect", "--episodes", "200", "--seed", "0", "--task", args.task,
              "--output", str(args.dataset))  # fmt: skip
    lines = [
        "| policy | command | seeds | success (mean ± std) | pooled, 95% Wilson | train wall |",
        "|---|---|---|---|---|---|",
    ]
    for row in args.rows:  # row by row: each row's seeds finish together
        cells = [c for seed in args.seeds if (c := run_cell(args, row, seed)) is not None]
        if not cells:
            continue
        rates = [c["successes"] / c["episodes"] for c in cells]
        wins, total = sum(c["successes"] for c in cells), sum(c["episodes"] for c in cells)
        lo, hi = wilson_interval(wins, total)
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        lines.append(
            f"| {ROWS[row][0]} | `{cells[0]['command'].split(' --dataset')[0]}` | {len(cells)} | "
            f"{statistics.mean(rates):.0%} ± {sd:.0%} | {wins}/{total} ({lo:.0%}–{hi:.0%}) | "
            f"{statistics.mean(c['train_wall_s'] for c in cells):.0f} s |"
        )
    table = "\n".join(lines)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
