"""Cells: one train.py run per table cell, kept in `runs_dir` and reused.

A cell's run directory records the overrides it was trained with and a content hash of
the embedded tiny SD (overrides.json); a later table asking for the same cell gets the
finished run's metrics.json back without training it again, so `table=all` trains each
cell once. Config-file edits are not part of the record: delete a run directory to
retrain it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from orthodiff.models.tiny_sd import TINY_SD_PATH

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[3]  # where train.py and eval.py are


def run_overrides(cfg: DictConfig, method: str, control: str, seed: int, extra=()) -> list[str]:
    schedule = cfg.schedule
    # Only the first control's runs feed the convergence curves; the others are read at
    # their final step alone, so they skip the step-0 and intermediate validations.
    curve = control == cfg.controls[0]
    return [f"experiment={control}", f"method={method}", f"seed={seed}", f"trainer.max_steps={schedule.steps}",
            f"trainer.val_check_interval={schedule.val_every if curve else schedule.steps}",
            f"validate_at_start={curve}", f"data.val.max_items={schedule.val_items}",
            f"data.batch_size={schedule.batch_size}", f"callbacks.checkpoint.every_n_train_steps={schedule.steps}",
            "logger=csv", "callbacks.progress_bar.refresh_rate=0", *cfg.train_overrides, *extra]


def embedded_model_digest() -> str:
    """A content hash of the shipped tiny SD: part of every cell's record, so runs made
    with older weights are retrained rather than reused after a re-pretraining."""
    digest = hashlib.sha256()
    for path in sorted(TINY_SD_PATH.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(TINY_SD_PATH).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_cell(cfg: DictConfig, method: str, control: str, seed: int, extra=(), tag: str = "") -> dict:
    """One controllable-generation cell (see train_cell)."""
    return train_cell(cfg, f"{control}-{method}{tag}-s{seed}", run_overrides(cfg, method, control, seed, extra))


def train_cell(cfg: DictConfig, name: str, overrides: list[str]) -> dict:
    """Train one cell in runs_dir/name (or reuse its finished run with identical
    overrides and base weights) and return its metrics.json plus "run_dir"."""
    run_dir = Path(cfg.runs_dir).expanduser() / name
    record = run_dir / "overrides.json"
    metrics_path = run_dir / "metrics.json"
    identity = {"overrides": overrides, "embedded_model": embedded_model_digest()}
    if metrics_path.is_file() and record.is_file() and json.loads(record.read_text()) == identity:
        metrics = json.loads(metrics_path.read_text())
        if "final" in metrics:
            log.info("cell %s: reused %s", name, run_dir)
            return {**metrics, "run_dir": str(run_dir)}
    log.info("cell %s: training in %s", name, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "eval", ignore_errors=True)  # scored a run this one replaces
    started = time.time()
    result = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir.resolve()}"],
                            cwd=ROOT, capture_output=True, text=True, env=cell_env(cfg))
    (run_dir / "stdout.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"run {run_dir} failed (exit {result.returncode}); its log: {run_dir / 'stdout.log'}\n"
                           f"{result.stderr[-2000:]}")
    record.write_text(json.dumps(identity))
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = round(time.time() - started, 1)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return {**metrics, "run_dir": str(run_dir)}


def run_eval(cfg: DictConfig, run: dict) -> dict:
    """eval.py on a finished run (FID/KID and prompt alignment on the test split); reused
    when done before with the same settings."""
    out = Path(run["run_dir"]) / "eval"
    overrides = [f"ckpt={run['run_dir']}", f"num_samples={cfg.eval_samples}", *cfg.eval_overrides]
    record = out / "overrides.json"
    if (out / "eval.json").is_file() and record.is_file() and json.loads(record.read_text()) == overrides:
        return json.loads((out / "eval.json").read_text())
    result = subprocess.run([sys.executable, "eval.py", *overrides, f"hydra.run.dir={out.resolve()}"],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"eval of {run['run_dir']} failed:\n{result.stderr[-2000:]}")
    record.write_text(json.dumps(overrides))
    return json.loads((out / "eval.json").read_text())


def cell_env(cfg: DictConfig) -> dict:
    """The environment of a cell's subprocess: with `jobs` cells at once, each gets an
    equal share of the cores."""
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_all(cfg: DictConfig, cells: list[tuple], desc: str, cell=run_cell) -> list[dict]:
    """cells: the arguments of `cell` after cfg (run_cell: method, control, seed[, extra
    overrides, tag]), trained `cfg.jobs` at a time; results in the cells' order, a
    progress bar over finished cells."""
    with ThreadPoolExecutor(cfg.jobs) as pool, tqdm(total=len(cells), desc=desc) as bar:
        futures = {pool.submit(cell, cfg, *args): i for i, args in enumerate(cells)}
        results = [None] * len(cells)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.set_postfix_str("done: " + " ".join(map(str, cells[futures[future]][:3])))
            bar.update()
    return results
