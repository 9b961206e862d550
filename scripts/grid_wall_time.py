"""What `reproduce.py table=all` costs in wall time, from the cells a grid trained.

    python scripts/grid_wall_time.py ~/.cache/orthodiff/grid-v3/runs [--jobs 2]

A grid that runs over several sessions has no single clock: each session's end kills it and
the next resumes it. So this sums the cells' own `wall_seconds` (metrics.json) per table
and divides by `--jobs`, the cells trained at once. A resumed cell's `wall_seconds` counts
from its resume only; it is scaled up by the steps it did not time (steps / timed steps)
and marked. Not counted: what a table does besides training cells (the controllable
table's reference rows and FID evaluations, the energy computation), which its log gives.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ABLATION_ROW = re.compile(r"-(attention|conv|r\d+|control_lr_x[\d.]+)-s\d+$")


def table_of(name: str) -> str:
    """Which table trained a cell, from the name reproduce.cells gives its run folder."""
    if re.search(r"-lr[\d.e-]+-s\d+$", name):
        return "lr_search"
    if ABLATION_ROW.search(name) or name.startswith("canny-hint-"):
        return "ablation"
    return "convergence (canny)" if name.startswith("canny-") else "controllable (other controls)"


def cell_seconds(metrics: dict, steps: int) -> tuple[float, bool]:
    """The cell's training wall time, as if it had not been interrupted; and whether it was resumed."""
    seconds = float(metrics["wall_seconds"])
    if not metrics.get("resumed"):
        return seconds, False
    timed = int(metrics["cost"]["timed_steps"]) + 1  # the first step is not timed
    return seconds * steps / max(timed, 1), True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (reproduce.py jobs=)")
    args = parser.parse_args()
    totals, counts, resumed, unfinished = defaultdict(float), defaultdict(int), defaultdict(int), []
    for run in sorted(p for p in args.runs_dir.iterdir() if p.is_dir()):
        metrics_file = run / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        if "wall_seconds" not in metrics:
            unfinished.append(run.name)
            continue
        steps = int(re.search(r"trainer\.max_steps=(\d+)", (run / "overrides.json").read_text()).group(1))
        seconds, was_resumed = cell_seconds(metrics, steps)
        table = table_of(run.name)
        totals[table] += seconds
        counts[table] += 1
        resumed[table] += was_resumed
    print(f"| table | cells | cell-hours | wall at jobs={args.jobs} (h) | resumed cells (scaled) |")
    print("|---|---|---|---|---|")
    for table in sorted(totals):
        print(f"| {table} | {counts[table]} | {totals[table] / 3600:.2f} | {totals[table] / 3600 / args.jobs:.2f} "
              f"| {resumed[table]} |")
    total = sum(totals.values())
    print(f"| all | {sum(counts.values())} | {total / 3600:.2f} | {total / 3600 / args.jobs:.2f} "
          f"| {sum(resumed.values())} |")
    if unfinished:
        print(f"not finished (not counted): {len(unfinished)}: {', '.join(unfinished)}")


if __name__ == "__main__":
    main()
