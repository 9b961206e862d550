"""An entry script's start, from a fresh interpreter and from orthodiff.warm's, in one process.

    python benchmarks/bench_warm.py [--rounds 5]

Each round runs `python eval.py ckpt=<a path that does not exist>` both ways: eval.py
imports everything a run needs (torch, Lightning, diffusers, torchmetrics), composes its
config and refuses in one line, so the time is the start-up a short run pays. The two ways
alternate round by round so machine noise hits both; the figure is the median over rounds
of warm / fresh. The warm interpreter's own start (its imports, once) is timed apart.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orthodiff.warm import ROOT, run_script


def timed(run) -> float:
    start = time.perf_counter()
    result = run()
    assert result.returncode != 0 and "no such adapter file or run directory" in result.stderr, result.stderr[-2000:]
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"ckpt={Path(tmp, 'nothing')}", f"hydra.run.dir={tmp}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        first = timed(lambda: run_script("eval.py", args, env=env))  # starts the warm interpreter
        fresh, warm = [], []
        for _ in range(rounds):
            fresh.append(timed(lambda: subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env,
                                                      capture_output=True, text=True)))
            warm.append(timed(lambda: run_script("eval.py", args, env=env)))
    print(f"first warm run (the warm interpreter's imports included): {first:.1f} s")
    print(f"fresh interpreter: median {statistics.median(fresh):.1f} s over {rounds} rounds")
    print(f"warm interpreter:  median {statistics.median(warm):.1f} s")
    print(f"warm / fresh: {statistics.median(w / f for w, f in zip(warm, fresh)):.3f}")
