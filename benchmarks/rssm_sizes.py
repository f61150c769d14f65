"""The RSSM at every grid size: time-to-dot and open-loop errors of the world model and its
deterministic baseline, several training seeds per grid.

Each cell (grid, seed) is a ``memrl rssm --grid_size G --epochs E --seed S`` run directory under
--out-dir (every other flag the default: occlusion on, batch 32 x 64 frames, dot sigma 2)
followed by ``memrl rssm-eval``; finished cells are skipped and a killed run resumes from its last
checkpoint, so the table can be built across sittings (run the same command again).

Columns: time-to-dot (the first logged step at which a model's reconstruction error falls below
half the empty frame's), seconds per step (RSSM and baseline together), open-loop dot-position
error at horizons 5 and 10 for the RSSM, copy-last, the blank frame and the deterministic
baseline, the RSSM's image error against the blank frame's, and the probe R^2 on occluded steps.

python benchmarks/rssm_sizes.py                          # grids 32 48 64 96, seeds 0 1 2
python benchmarks/rssm_sizes.py --grids 64 --seeds 0     # one cell
python benchmarks/rssm_sizes.py --report                 # the finished cells only
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cells import memrl, train_or_resume

from memrl.runs import read_metrics

MODELS = ("rssm", "copy_last", "blank", "deterministic")


def run_cell(args: argparse.Namespace, grid: int, seed: int) -> dict | None:
    """Train (or resume) and evaluate one cell; None when --report and it is not finished."""
    run_dir = args.out_dir / f"g{grid}-s{seed}"
    if not (run_dir / "eval.json").exists():
        if args.report:
            return None
        command = ["rssm", "--grid_size", str(grid), "--epochs", str(args.epochs)]
        train_or_resume(run_dir, [*command, "--seed", str(seed)], "--output_dir", args.device)
        memrl("rssm-eval", str(run_dir), "--device", args.device)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["step_seconds"] = seconds_per_step(read_metrics(run_dir / "metrics.jsonl"))
    return {"summary": summary, "eval": json.loads((run_dir / "eval.json").read_text())}


def seconds_per_step(records: list[dict]) -> float:
    """Training seconds per step from the metrics' clock, which restarts at every resume: only
    the intervals between consecutive records of one sitting count."""
    seconds = steps = 0.0
    for a, b in zip(records, records[1:], strict=False):
        if b["time"] > a["time"]:
            seconds, steps = seconds + b["time"] - a["time"], steps + b["step"] - a["step"]
    return seconds / max(steps, 1)


def mean_std(values: list[float | None], fmt: str = "{:.2f}") -> str:
    """``mean ± std`` of the values; a None (never reached) is reported as a count."""
    known = [v for v in values if v is not None]
    never = len(values) - len(known)
    if not known:
        return "never"
    text = fmt.format(statistics.mean(known))
    if len(known) > 1:
        text += " ± " + fmt.format(statistics.stdev(known))
    return text + (f" ({never} never)" if never else "")


def report(cells: dict[int, list[dict]]) -> str:
    lines = [
        "| grid | seeds | time-to-dot, rssm | time-to-dot, deterministic | s / step | "
        + " | ".join(f"pos. error h{h}: {' / '.join(MODELS)}" for h in (5, 10))
        + " | image error h10: rssm / blank | probe R² occluded |",
        "|---" * 10 + "|",
    ]
    for grid, runs in cells.items():
        summaries, evals = [c["summary"] for c in runs], [c["eval"] for c in runs]
        step_time = [s["step_seconds"] for s in summaries]
        errors = []
        for h in (5, 10):
            cols = [
                mean_std([e["position_error"][m][h - 1] for e in evals if m in e["mse"]], "{:.1f}")
                for m in MODELS
            ]
            errors.append(" / ".join(cols))
        image = " / ".join(mean_std([e["mse"][m][9] for e in evals]) for m in ("rssm", "blank"))
        lines.append(
            f"| {grid} | {len(runs)} | {mean_std([s['time_to_dot'] for s in summaries], '{:.0f}')}"
            f" | {mean_std([s['deterministic_time_to_dot'] for s in summaries], '{:.0f}')}"
            f" | {mean_std(step_time)} | {errors[0]} | {errors[1]} | {image}"
            f" | {mean_std([e['probe_r2_occluded'] for e in evals], '{:.3f}')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 48, 64, 96])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of 16 steps per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/rssm_sizes"))
    parser.add_argument("--report", action="store_true", help="only report the finished cells")
    args = parser.parse_args()
    cells: dict[int, list[dict]] = {}
    for seed in args.seeds:  # seed by seed: a sitting finishes every grid of a seed first
        for grid in args.grids:
            if (cell := run_cell(args, grid, seed)) is not None:
                cells.setdefault(grid, []).append(cell)
    table = report(dict(sorted(cells.items())))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
