"""Cells: one train.py run per table cell, kept in `runs_dir` and reused.

A cell's run directory records the overrides it was trained with and a content hash of
its base model's weights (overrides.json: the embedded tiny SD's, or a width-ladder rung's);
a later table asking for the same cell gets the finished run's metrics.json back without
training it again, so `table=all` trains each cell once. A cell that died part-way (a killed job, a session's end) resumes from the
checkpoint its last validation wrote. Config-file edits are not part of the record: delete
a run directory to retrain it.

runs_dir lives on one machine; `cells_archive` (default: out_dir/cells, committed with the
reports) keeps a few KB of every finished cell (archive_cell), so a table is written again on a
machine whose runs_dir is gone without training the cells it already has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from orthodiff.adapter import load_adapter
from orthodiff.models.tiny_sd import TINY_SD_PATH
from orthodiff.oft import oft_layers
from orthodiff.oft.scale import plane_angle_budget, rotation_stats
from orthodiff.warm import ROOT, run_script

log = logging.getLogger(__name__)


def cell_config(run_dir: str | Path) -> DictConfig:
    """The composed config a cell's train.py run saved (Hydra's .hydra/config.yaml)."""
    return OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml")


def method_setting(method: str, key: str):
    """A value conf/method/<method>.yaml sets itself under adapter (None: it inherits it): a row of
    a table at that value is the method's plain cell."""
    return OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml").get("adapter", {}).get(key)


def run_overrides(cfg: DictConfig, method: str, control: str, seed: int, extra=(), steps: int | None = None,
                  curve: bool | None = None, step0: bool | None = None, val_every: int | None = None) -> list[str]:
    """train.py's overrides for one cell. Defaults: the first control runs schedule.steps,
    validated every schedule.val_every (or val_every) steps from step 0 (the convergence curves); the others
    run schedule.other_steps and are validated at their last step only, except that
    cfg.methods[0] also validates at step 0 on every control: it starts at the base model,
    so its step 0 is the base model's reference row."""
    schedule = cfg.schedule
    first = control == cfg.controls[0]
    steps = steps or (schedule.steps if first else schedule.other_steps)
    curve = first if curve is None else curve
    step0 = (curve or method == cfg.methods[0]) if step0 is None else step0
    return [f"experiment={control}", f"method={method}", f"seed={seed}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={(val_every or schedule.val_every) if curve else steps}",
            f"validate_at_start={step0}", f"data.val.max_items={schedule.val_items}",
            f"data.batch_size={schedule.batch_size}", "logger=csv", "callbacks.progress_bar.refresh_rate=0",
            *cfg.train_overrides, *extra]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def embedded_model_digest() -> str:
    return folder_digest(TINY_SD_PATH)


def base_model_digest(overrides: list[str]) -> str:
    """A content hash of the base model a cell trains: the shipped tiny SD unless its overrides
    choose another (model=tiny_w2, a width-ladder rung; model.pretrained=<folder>). Part of the
    cell's record, so its runs are retrained rather than reused once that model is pretrained
    again. A base that is no local folder (a hub id, a rung not built yet) is recorded by name."""
    pretrained = str(TINY_SD_PATH)
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "model":
            pretrained = OmegaConf.load(ROOT / "conf" / "model" / f"{value}.yaml").get("pretrained")
        elif key == "model.pretrained":
            pretrained = value
    path = Path(pretrained).expanduser()
    path = path if path.is_absolute() else ROOT / path
    if path.resolve() == TINY_SD_PATH.resolve():
        return embedded_model_digest()
    return folder_digest(path) if path.is_dir() else str(pretrained)


def run_cell(cfg: DictConfig, method: str, control: str, seed: int, extra=(), tag: str = "", steps: int | None = None,
             curve: bool | None = None, step0: bool | None = None, val_every: int | None = None,
             cached_only: bool = False, start_from: Path | None = None, archived: bool = True) -> dict | None:
    """One controllable-generation cell (see run_overrides and train_cell)."""
    return train_cell(cfg, f"{control}-{method}{tag}-s{seed}",
                      run_overrides(cfg, method, control, seed, extra, steps, curve, step0, val_every), cached_only,
                      start_from, archived)


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The checkpoint a finished cell wrote at its validation of `step`: a mid-run checkpoint, so a run
    continued from it takes the path a longer run of the same cell would have taken. For an archived
    cell, the path it had (its name is part of the continuing cell's record; the file is absent)."""
    checkpoints = Path(run_dir) / "checkpoints"
    names = [p.name for p in checkpoints.glob("*.ckpt")]
    if not names and (Path(run_dir) / CHECKPOINT_NAMES).is_file():
        names = json.loads((Path(run_dir) / CHECKPOINT_NAMES).read_text())
    found = sorted(checkpoints / n for n in names if checkpoint_step(n) == step)
    if not found:
        raise FileNotFoundError(f"{Path(run_dir) / 'checkpoints'} holds no checkpoint of step {step} to continue "
                                f"from; delete {run_dir} to train that cell again")
    return found[-1]


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint named as Lightning names them, "epoch=E-step=S.ckpt" (None: another name)."""
    match = re.fullmatch(r"epoch=\d+-step=(\d+)\.ckpt", name)
    return int(match.group(1)) if match else None


def last_step(run_dir: Path) -> int:
    """The step of a part-trained cell's newest checkpoint (its resume point)."""
    steps = [checkpoint_step(p.name) for p in (run_dir / "checkpoints").glob("epoch=*.ckpt")]
    return max((s for s in steps if s is not None), default=0)


# How train.py ends a run whose loss stopped being finite (tasks.base.NonFiniteLossError).
NON_FINITE_LOSS = re.compile(r"loss is (nan|-?inf) at step \d+")


def train_cell(cfg: DictConfig, name: str, overrides: list[str], cached_only: bool = False,
               start_from: Path | None = None, archived: bool = True) -> dict | None:
    """Train one cell in runs_dir/name (or reuse its finished run with identical
    overrides and base weights) and return its metrics.json plus "run_dir".
    cached_only: return the finished run or None, never train (table=claims).
    start_from: another cell's checkpoint (step_checkpoint) that this one continues rather
    than training from step 0 (table=length); its curve starts with that cell's validations.
    A run whose loss became non-finite is a result, not an error (too high an lr in
    table=lr_search): it is kept with empty "final" metrics and "diverged" saying where.
    archived: also reuse the cell from cells_archive (False: only a run in runs_dir, whose
    adapter and checkpoints are there)."""
    run_dir = Path(cfg.runs_dir).expanduser() / name
    record = run_dir / "overrides.json"
    metrics_path = run_dir / "metrics.json"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    identity = cell_identity(overrides, continues=continued_record(start_from))
    same_cell = record.is_file() and cell_identity(**json.loads(record.read_text())) == identity
    archive = archive_folder(cfg) if archived else None
    for folder in (run_dir, *([archive / name] if archive else [])):
        done = finished(folder, identity)
        if done:
            log.info("cell %s: reused %s", name, folder)
            if not cfg.get("plan"):  # a plan looks and writes nothing
                keep_cell(cfg, folder, done)  # a cell finished before blocks.json or the archive existed
            return done
    if cached_only:
        return None
    resume = same_cell and checkpoint.is_file()
    if cfg.get("plan"):
        return {"planned": name, "resumes_at": last_step(run_dir) if resume else None}
    if resume:
        log.info("cell %s: resuming %s", name, checkpoint)
    else:
        log.info("cell %s: training in %s", name, run_dir)
        for stale in ("eval", "checkpoints"):  # a replaced run's score and checkpoints
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        (run_dir / "blocks.json").unlink(missing_ok=True)  # ... and where its blocks sat
        metrics_path.unlink(missing_ok=True)  # a replaced run's, or a dead run's step 0
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(identity))  # now: a run that dies part-way is resumed as this cell
        if start_from:  # its step 0 is the continued cell's (train.py reads it here when this run resumes)
            step0 = json.loads((start_from.parents[1] / "metrics.json").read_text()).get("step0", {})
            metrics_path.write_text(json.dumps({"step0": step0}))
    # Not resolve()d: last.ckpt links to "epoch=E-step=S.ckpt", whose "=" Hydra's override grammar
    # refuses unquoted.
    resume_from = ([f"resume={checkpoint.absolute()}"] if resume else
                   [f"resume='{start_from.absolute()}'"] if start_from else [])
    started = time.time()
    result = run_script("train.py", [*overrides, *CHECKPOINT_AT_VALIDATION, *resume_from,
                                     f"hydra.run.dir={run_dir.resolve()}"], env=cell_env(cfg))
    (run_dir / "stdout.log").write_text(result.stdout + result.stderr)
    diverged = NON_FINITE_LOSS.search(result.stderr)
    if result.returncode != 0 and not diverged:
        raise RuntimeError(f"run {run_dir} failed (exit {result.returncode}); its log: {run_dir / 'stdout.log'}\n"
                           f"{result.stderr[-2000:]}")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if result.returncode != 0:
        log.warning("cell %s: %s", name, diverged.group(0))
        metrics.update(final={}, diverged=diverged.group(0))
    metrics["wall_seconds"] = round(time.time() - started, 1)  # a resumed run's: since the resume
    if resume:
        metrics["resumed"] = True
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    keep_cell(cfg, run_dir, metrics)
    return {**metrics, "run_dir": str(run_dir)}


def keep_cell(cfg: DictConfig, run_dir: Path, metrics: dict) -> None:
    """What a finished cell leaves behind: blocks.json while its adapter is at hand (the archive
    keeps no adapter), then its copy in cells_archive."""
    if "diverged" not in metrics:
        blocks_of(run_dir)
    archive_cell(cfg, run_dir)


# One model load at a time: run_all's threads finish cells together, and diffusers' loading
# (accelerate's init_empty_weights) patches torch for the whole process while it runs.
LOADING = threading.Lock()


def blocks_of(run_dir: Path) -> dict | None:
    """Where a finished cell's OFT blocks sit: orthodiff.oft.scale.rotation_stats of its adapter, and
    for COFT in the paper convention the median per-plane budget of its eps ({} without OFT layers:
    LoRA, the control networks, the hint encoder alone). Kept in run_dir/blocks.json, which
    cells_archive keeps; None when neither that file nor the adapter is there."""
    saved, adapter_file = run_dir / "blocks.json", run_dir / "adapter.safetensors"
    if saved.is_file():
        return json.loads(saved.read_text())
    if not adapter_file.is_file():
        return None
    adapter = cell_config(run_dir).get("adapter")
    layers = []
    if adapter is not None and adapter.get("_target_") == "orthodiff.oft.OFTConfig":  # not LoRA's: no load
        with LOADING:
            layers = oft_layers(load_adapter(adapter_file).unet)
    # Without a figure (OFT has no radius) a key is left out: strict JSON has no NaN.
    found = {k: v for k, v in rotation_stats(layers).items() if not math.isnan(v)} if layers else {}
    if layers and adapter.get("coft") and adapter.get("coft_norm") == "paper":
        found["budget per plane (deg)"] = statistics.median(
            plane_angle_budget(adapter.eps, layer.block_size, layer.num_blocks, layer.block_share) for layer in layers)
    saved.write_text(json.dumps(found) + "\n")
    return found


def finished(run_dir: Path, identity: dict) -> dict | None:
    """The metrics of a finished run of this cell in run_dir, plus "run_dir" (None: none there)."""
    record, metrics_path = run_dir / "overrides.json", run_dir / "metrics.json"
    if not (record.is_file() and metrics_path.is_file()) or cell_identity(**json.loads(record.read_text())) != identity:
        return None
    metrics = json.loads(metrics_path.read_text())
    return {**metrics, "run_dir": str(run_dir)} if "final" in metrics else None


# What the tables read of a finished cell, besides its adapter, samples and checkpoints
# (keep_cell writes blocks.json, run_eval eval/); the checkpoints' names, which a cell
# continuing one records (table=length).
ARCHIVED = ("overrides.json", "metrics.json", "blocks.json", ".hydra/config.yaml", "eval/eval.json",
            "eval/overrides.json")
CHECKPOINT_NAMES = "checkpoints.json"


def archive_folder(cfg: DictConfig) -> Path | None:
    return Path(cfg.cells_archive).expanduser() if cfg.get("cells_archive") else None


def archive_cell(cfg: DictConfig, run_dir: Path) -> None:
    """Copy a finished cell's ARCHIVED files and its checkpoints' names to cells_archive/<name>
    (a no-op without an archive, or for a cell read from it)."""
    archive = archive_folder(cfg)
    if archive is None or run_dir.parent.resolve() == archive.resolve():
        return
    target = archive / run_dir.name
    for name in ARCHIVED:
        if (run_dir / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            partial = target / f"{name}.partial"
            shutil.copyfile(run_dir / name, partial)
            os.replace(partial, target / name)  # a reader never sees half a file
        else:  # a file of a replaced run of this name
            (target / name).unlink(missing_ok=True)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch=*.ckpt"))
    (target / CHECKPOINT_NAMES).write_text(json.dumps(names) + "\n")


def run_file(run: dict, name: str) -> Path:
    """A file of a finished cell's run (its adapter, samples), with an error that says what to do
    when the cell was read from cells_archive, which keeps no such files."""
    path = Path(run["run_dir"]) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is absent: cell {Path(run['run_dir']).name} was read from cells_archive, "
                                "which keeps its metrics but not its files; delete that folder (or pass "
                                "cells_archive=null) to train the cell again")
    return path


# A checkpoint at the end of every validation (save_last=link: last.ckpt points at it), so a
# resumed cell's curve misses no validation; ModelCheckpoint's every_n_train_steps saves
# before the validation of the same step.
CHECKPOINT_AT_VALIDATION = ("callbacks.checkpoint.every_n_train_steps=null", "callbacks.checkpoint.save_top_k=1",
                            "callbacks.checkpoint.save_last=link")


# Config keys renamed since cells were first recorded: old name -> new (the same setting).
RENAMED_KEYS = {"method.control_lr=": "method.tiny_control_lr="}


def current_name(override: str) -> str:
    for old, new in RENAMED_KEYS.items():
        if override.startswith(old):
            return new + override[len(old):]
    return override


def cell_identity(overrides: list[str], base_model: str | None = None, embedded_model: str | None = None,
                  continues: dict | None = None) -> dict:
    """What makes two runs the same cell (a run's overrides.json): its overrides under today's
    key names, less where it checkpoints (that does not change what a run learns), the base
    model's weights (default: today's; `embedded_model` is the key records written before the
    width ladder used, when every cell trained the embedded tiny SD), and the cell and step it
    continues, if any (continued_record)."""
    identity = {"overrides": [current_name(o) for o in overrides if not o.startswith("callbacks.checkpoint.")],
                "base_model": base_model or embedded_model or base_model_digest(overrides)}
    return {**identity, "continues": continues} if continues else identity


def continued_record(checkpoint: Path | None) -> dict | None:
    """The record of the cell a checkpoint belongs to, and the checkpoint's name (its step)."""
    if checkpoint is None:
        return None
    return {"cell": json.loads((checkpoint.parents[1] / "overrides.json").read_text()), "checkpoint": checkpoint.name}


def run_eval(cfg: DictConfig, run: dict) -> dict:
    """eval.py on a finished run (FID/KID and prompt alignment on the test split); reused
    when done before with the same settings."""
    out = Path(run["run_dir"]) / "eval"
    overrides = [f"ckpt={run['run_dir']}", f"num_samples={cfg.eval_samples}", *cfg.eval_overrides]
    record = out / "overrides.json"

    def settings(recorded: list[str]) -> list[str]:  # less the run's path: an archived copy's eval is the same
        return [o for o in recorded if not o.startswith("ckpt=")]

    if (out / "eval.json").is_file() and record.is_file() and settings(json.loads(record.read_text())) == settings(overrides):
        return json.loads((out / "eval.json").read_text())
    run_file(run, "adapter.safetensors")  # an archived cell: say so rather than let eval.py fail
    result = run_script("eval.py", [*overrides, f"hydra.run.dir={out.resolve()}"])
    if result.returncode != 0:
        raise RuntimeError(f"eval of {run['run_dir']} failed:\n{result.stderr[-2000:]}")
    record.write_text(json.dumps(overrides))
    archive_cell(cfg, Path(run["run_dir"]))
    return json.loads((out / "eval.json").read_text())


def cell_env(cfg: DictConfig) -> dict:
    """The environment of a cell's subprocess: `threads` torch threads, or (null) an equal
    share of the cores among the `jobs` cells run at once."""
    threads = cfg.get("threads") or max(1, (os.cpu_count() or 1) // cfg.jobs)
    # The cells import this tree's own code: with an editable install pointing at another checkout,
    # a grid run from a frozen worktree would otherwise train with whatever that checkout holds now.
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": path}


def run_all(cfg: DictConfig, cells: list[tuple], desc: str, cell=run_cell, archived: bool = True) -> list[dict]:
    """cells: the arguments of `cell` after cfg (run_cell: method, control, seed[, extra
    overrides, tag]), trained `cfg.jobs` at a time; results in the cells' order, a
    progress bar over finished cells. archived=False: a table that reads the runs' files
    (adapters, samples), which cells_archive does not keep."""
    if cfg.get("plan"):
        raise Planned(desc, [cell(cfg, *args, archived=archived) for args in cells], archive_folder(cfg))
    with ThreadPoolExecutor(cfg.jobs) as pool, tqdm(total=len(cells), desc=desc) as bar:
        futures = {pool.submit(cell, cfg, *args, archived=archived): i for i, args in enumerate(cells)}
        results = [None] * len(cells)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.set_postfix_str("done: " + " ".join(map(str, cells[futures[future]][:3])))
            bar.update()
    return results


class Planned(Exception):
    """plan=true: the state of each cell of a table's first run_all, raised in place of training
    them (a later run_all's cells may depend on these, so the table stops here)."""

    def __init__(self, stage: str, states: list[dict], archive: Path | None):
        self.stage, self.states, self.archive = stage, states, archive
        super().__init__(stage)

    def state(self, run: dict) -> str:
        if "planned" in run:
            return "to train" if run["resumes_at"] is None else f"resumes at step {run['resumes_at']}"
        where = Path(run["run_dir"]).parent
        return "done (cells_archive)" if self.archive and where.resolve() == self.archive.resolve() else "done (runs_dir)"

    def names(self) -> list[str]:
        return [run.get("planned") or Path(run["run_dir"]).name for run in self.states]

    def left(self) -> list[str]:
        """The cells still to train, part-trained ones included."""
        return [name for name, run in zip(self.names(), self.states) if "planned" in run]

    def median_wall(self) -> float | None:
        """Seconds of one lane a cell of this table takes: its finished cells' median (None: none yet)."""
        walls = [run["wall_seconds"] for run in self.states if "wall_seconds" in run and not run.get("resumed")]
        return statistics.median(walls) if walls else None

    def lines(self) -> list[str]:
        """One line per cell, then the counts and the hours left on one lane at the median wall
        time of the finished cells (a part-trained cell counted whole: an upper bound)."""
        states = [self.state(run) for run in self.states]
        kinds = [state.split(" at step")[0] for state in states]  # "resumes at step 400": "resumes"
        counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
        wall, left = self.median_wall(), len(self.left())
        hours = (f", ~{left * wall / 3600:.1f} h of one lane at its finished cells' median {wall / 60:.0f} min"
                 if wall is not None and left else "")
        return [f"  {name}: {state}" for name, state in zip(self.names(), states)] + [
            f"  {self.stage}: {len(states)} cells; " + ", ".join(f"{n} {k}" for k, n in counts.items()) + hours]
