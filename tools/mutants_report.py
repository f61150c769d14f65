"""The result of `make mutants`, per module: mutants, killed, survived, and each survivor.

Reads what `mutmut run` left in mutants/ (run from the repository root, after it). Prints a table
per module and each surviving mutant as ``name  path:line  mutated line``; writes every survivor's
diff to mutants/survivors.txt. ``--equivalent FILE`` (lines ``mutant_name: reason``, ``#``
comments) names mutants judged equivalent by hand: they leave the survival rate.

``--names`` prints the names of the mutants not killed instead (``--only-in FILE``: only those
also named in FILE): `make mutants` re-tests them, since mutmut keeps a cached verdict until the
mutated function itself changes, and a new test can kill an old survivor.

"Not killed" counts the survivors and the mutants no selected test reaches ("no tests"): both
are changes the tests would not notice. Timeouts count as killed (the mutant changed behaviour).
The rate leaves out the mutants not checked yet (a run stopped early) and the equivalent ones.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.format_utils import orig_function_and_class_names_from_key

NOT_KILLED = ("survived", "no tests")
COLUMNS = ("killed", "timeout", "survived", "no tests", "other", "not checked")


def read_equivalent(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    equivalent = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(":")
            equivalent[name.strip()] = reason.strip()
    return equivalent


def function_span(tree: ast.Module, name: str, class_name: str | None) -> tuple[int, int] | None:
    """The first and last line of function ``name`` (a method of ``class_name``)."""
    body = tree.body
    if class_name is not None:
        classes = [n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name]
        if not classes:
            return None
        body = classes[0].body
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node.lineno, node.end_lineno or node.lineno
    return None


def mutated_line(source_lines: list[str], tree: ast.Module, mutant: str, diff: str) -> str:
    """``line: text`` of the first line the mutant changes, found in the original file."""
    name, class_name = orig_function_and_class_names_from_key(mutant)
    span = function_span(tree, name, class_name)
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and line[1:2] != "-"]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and line[1:2] != "+"]
    lineno = span[0] if span else 0
    if span and removed:
        for i in range(span[0], span[1] + 1):
            if source_lines[i - 1].strip() == removed[0].strip():
                lineno = i
                break
    new = added[0].strip() if added else "(line removed)"
    return f"{lineno}: {new}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivalent", type=Path, help="mutants judged equivalent, with reasons")
    parser.add_argument("--output", type=Path, default=Path("mutants/survivors.txt"))
    parser.add_argument("--names", action="store_true", help="print the names not killed, only")
    parser.add_argument("--only-in", type=Path, help="with --names: only names also in this file")
    args = parser.parse_args()

    if args.names:
        wanted = set(args.only_in.read_text().split()) if args.only_in else None
        for module in config().only_mutate:
            data = SourceFileMutationData(path=module)
            data.load()
            for mutant, exit_code in data.exit_code_by_key.items():
                if status_by_exit_code[exit_code] not in NOT_KILLED:
                    continue
                if wanted is None or mutant in wanted:
                    print(mutant)
        return 0

    equivalent = read_equivalent(args.equivalent)
    rows, survivors, seen = [], [], set()
    for module in config().only_mutate:
        data = SourceFileMutationData(path=module)
        data.load()
        counts: Counter[str] = Counter()
        for mutant, exit_code in data.exit_code_by_key.items():
            status = status_by_exit_code[exit_code]
            if mutant in equivalent:
                seen.add(mutant)
                if status in NOT_KILLED:
                    counts["equivalent"] += 1
                    continue
                print(f"warning: {mutant} is listed as equivalent but {status}", file=sys.stderr)
            counts[status if status in COLUMNS else "other"] += 1
            if status in NOT_KILLED:
                survivors.append((module, mutant, status))
        rows.append((module, len(data.exit_code_by_key), counts))

    for mutant in sorted(set(equivalent) - seen):
        print(f"warning: {mutant} is listed as equivalent but no longer exists", file=sys.stderr)

    header = f"{'module':36} {'mutants':>7} " + " ".join(f"{c:>8}" for c in COLUMNS[:-1])
    header += f" {'unchecked':>9}"
    header += f" {'equiv.':>6} {'not killed':>10}"
    print(header)
    total, total_counts = 0, Counter()
    for module, n, counts in [*rows, ("total", None, None)]:
        if n is None:
            n, counts = total, total_counts
        else:
            total += n
            total_counts.update(counts)
        judged = n - counts["equivalent"] - counts["not checked"]
        not_killed = sum(counts[s] for s in NOT_KILLED)
        rate = f"{100 * not_killed / judged:.1f}%" if judged else "-"
        name = module.removeprefix("src/memrl/")
        print(
            f"{name:36} {n:>7} "
            + " ".join(f"{counts[c]:>8}" for c in COLUMNS[:-1])
            + f" {counts['not checked']:>9}"
            + f" {counts['equivalent']:>6} {rate:>10}"
        )
    if total == 0:
        print("no results in mutants/: run `mutmut run` first", file=sys.stderr)
        return 1

    args.output.parent.mkdir(parents=True, exist_ok=True)
    trees: dict[str, tuple[list[str], ast.Module]] = {}
    with args.output.open("w") as out:
        print(f"\nNot killed ({len(survivors)}; diffs in {args.output}):")
        current = None
        for module, mutant, status in survivors:
            if module not in trees:
                source = Path(module).read_text()
                trees[module] = source.splitlines(), ast.parse(source)
            diff = get_diff_for_mutant(mutant, path=module)
            where = mutated_line(*trees[module], mutant, diff)
            if module != current:
                print(f"== {module}")
                out.write(f"== {module}\n")
                current = module
            tag = "" if status == "survived" else f" [{status}]"
            print(f"  {mutant.rpartition('.')[2]}{tag}  {module}:{where}")
            out.write(f"# {mutant}: {status} ({module}:{where.partition(':')[0]})\n{diff}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
