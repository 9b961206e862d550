"""The paper's tables, rebuilt from runs: `python reproduce.py table=<name>`.

Each table writes reports/<name>.md and .csv (and its plot), stamped with the command,
seeds, git revision and machine. Training runs are train.py subprocesses (one per
method x control x seed cell, all with the same short, fixed-length schedule) whose
run directories are kept in `runs_dir` and reused by later tables with the same
settings, so `table=all` trains each cell once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from orthodiff.models.tiny_sd import TINY_SD_PATH

ROOT = Path(__file__).resolve().parents[3]
# What each control's figure is called in metrics.json, and which way is better.
CONTROL_METRICS = {"canny": ("canny_iou", "max"), "seg": ("seg_miou", "max"), "depth": ("depth_rmse", "min"),
                   "landmarks": ("landmark_error", "min")}


# --- runs ---------------------------------------------------------------------------

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
            return {**metrics, "run_dir": str(run_dir)}
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


# --- reports ------------------------------------------------------------------------

def _settings(schedule: str, overrides) -> str:
    return f"- {schedule}; train overrides: {list(overrides) or 'none (the embedded default)'}"


def control_settings(cfg: DictConfig) -> str:
    return _settings(f"seeds: {list(cfg.seeds)}; schedule: {OmegaConf.to_container(cfg.schedule)}",
                     cfg.train_overrides)


def subject_settings(cfg: DictConfig) -> str:
    return _settings(f"seed: {cfg.subject.seed}; each method's own settings (conf/task_method/subject_<method>.yaml)",
                     cfg.subject.train_overrides)


def stamp(cfg: DictConfig, settings: str | None) -> list[str]:
    """Where a report came from; `settings` is the line saying how its cells were trained (None: no cells)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    # The reports this run rewrites do not count as changes to the code that made them.
    reports = (Path(cfg.out_dir).resolve()).as_posix()
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if not (ROOT / line[3:]).resolve().as_posix().startswith(reports)]
    dirty = " (uncommitted changes)" if changed else ""
    return [f"- command: `python reproduce.py {' '.join(sys.argv[1:])}`",
            f"- git revision: {git('rev-parse', '--short', 'HEAD').strip() or 'unknown'}{dirty}",
            f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()}, "
            f"torch {torch.__version__}; cells trained {cfg.jobs} at a time, "
            f"{cell_env(cfg)['OMP_NUM_THREADS']} torch thread(s) each"] + ([settings] if settings else [])


def fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(cfg: DictConfig, name: str, title: str, rows: list[dict], notes: list[str],
                 plots: list[str] = (), settings: str | None = None) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", *stamp(cfg, settings), "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    lines += ["", *notes, *(f"![{p}]({p})" for p in plots)]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"{name}: {path}")
    return path


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


# --- tables -----------------------------------------------------------------------

def params_table(cfg: DictConfig) -> Path:
    from orthodiff.eval.param_counts import PAPER_TOTALS_M, parameter_table

    rows = [{"name": row.name, "parameters": row.count, "millions": round(row.millions, 3), "note": row.note}
            for row in parameter_table()]
    notes = [f"Computed from diffusers' real architectures on the meta device (SD 1.5 UNet config "
             f"conf/model/sd15_unet.json). Published totals (OFT paper, incl. encoder, labelled paper_*): "
             f"{PAPER_TOTALS_M} M. See orthodiff/eval/param_counts.py for the ~2.07 M gap."]
    return write_report(cfg, "params", "Trainable parameters at SD 1.5 scale", rows, notes)


def controllable_table(cfg: DictConfig) -> Path:
    cells = [(m, c, s) for c in cfg.controls for m in cfg.methods for s in (cfg.seeds if c == "canny" else cfg.seeds[:1])]
    runs = dict(zip(cells, run_all(cfg, cells, "controllable")))
    rows = []
    for method in cfg.methods:
        row = {"method": method}
        for control in cfg.controls:
            key, _ = CONTROL_METRICS[control]
            finals = [run["final"].get(key, math.nan) for (m, c, _), run in runs.items() if (m, c) == (method, control)]
            row[f"{control} {key}"] = mean_std(finals)
        first = runs[(method, cfg.controls[0], cfg.seeds[0])]
        quality = run_eval(cfg, first)["image_quality"]
        row[f"FID ({cfg.controls[0]}, {quality['fid_extractor']} features)"] = round(quality["fid"], 2)
        row["trainable params"] = first["cost"]["trainable_parameters"]
        row["s/step"] = round(first["cost"]["seconds_per_step"], 3)
        row["peak memory MB"] = first["cost"]["peak_memory_mb"]
        rows.append(row)
    notes = [f"Final validation on the first {cfg.schedule.val_items} validation scenes after "
             f"{cfg.schedule.steps} steps (batch {cfg.schedule.batch_size}); mean ± std over seeds "
             f"{list(cfg.seeds)} for canny, seed {cfg.seeds[0]} for the others. FID/KID from eval.py on "
             f"{cfg.eval_samples} test scenes of the first control. Peak memory is the process's peak "
             "resident memory on CPU (base model included) or CUDA's allocator peak on GPU.",
             "Published (SD 1.5, full-size; BRIEF): OFT/COFT Canny IoU 19.5; ControlNet++ table: ControlNet "
             "F1 34.65, mIoU 27.46, RMSE 35.90; T2I-Adapter F1 23.65, mIoU 12.61, RMSE 48.40."]
    return write_report(cfg, "controllable", "Controllable generation (miniature of the paper's table)", rows, notes,
                        settings=control_settings(cfg))


def convergence_table(cfg: DictConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control = cfg.controls[0]
    key, _ = CONTROL_METRICS[control]
    runs = run_all(cfg, [(m, control, cfg.seeds[0]) for m in cfg.methods], "convergence")
    rows, (fig, ax) = [], plt.subplots(figsize=(6, 4))
    for method, run in zip(cfg.methods, runs):
        steps = [h["step"] for h in run["history"]]
        values = [h[key] for h in run["history"]]
        ax.plot(steps, values, marker="o", label=method)
        rows += [{"method": method, "step": s, key: v} for s, v in zip(steps, values)]
    ax.set_xlabel("training step")
    ax.set_ylabel(key)
    ax.set_title(f"{control}: control metric vs step")
    ax.legend(fontsize=8)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=100)
    plt.close(fig)
    notes = [f"Validation on {cfg.schedule.val_items} fixed scenes every {cfg.schedule.val_every} steps, seed {cfg.seeds[0]}."]
    return write_report(cfg, "convergence", f"Convergence ({control})", rows, notes, ["convergence.png"],
                        settings=control_settings(cfg))


@torch.no_grad()
def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (out, in) matrix a Linear-like layer applies, whatever wraps it (OFT, LoRA):
    read off by feeding it the identity."""
    base = getattr(layer, "base_layer", layer)
    probe = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
    return (layer(probe) - layer(torch.zeros_like(probe[:1]))).T


def energy_rows(module, base_unet) -> list[dict]:
    """Hyperspherical energy (s=1) of each finetuned Linear layer before and after.
    UNet adapters: the adapted target layers. ControlNet: its copy's layers against the
    UNet layers they were copied from. T2I-Adapter has no pretrained counterpart."""
    from diffusers import ControlNetModel

    from orthodiff.oft import hyperspherical_energy

    if module.adapted_layers:
        pairs = [(module.unet.get_submodule(n), base_unet.get_submodule(n)) for n in module.adapted_layers]
    elif isinstance(module.control_network, ControlNetModel):
        net = module.control_network
        pairs = [(m, base_unet.get_submodule(n)) for n, m in net.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith(("down_blocks", "mid_block"))]
    else:
        return []
    changes = []
    for layer, base in pairs:
        before = hyperspherical_energy(base.weight.float()).item()
        after = hyperspherical_energy(effective_weight(layer.eval()).float()).item()
        changes.append((after - before) / before)
    return [{"layers": len(changes), "mean |ΔHE|/HE": float(np.mean(np.abs(changes))),
             "max |ΔHE|/HE": float(np.max(np.abs(changes))), "mean ΔHE/HE": float(np.mean(changes))}]


def energy_table(cfg: DictConfig) -> Path:
    from orthodiff.adapter import load_adapter
    from orthodiff.models.base import load_base_model

    control = cfg.controls[0]
    runs = run_all(cfg, [(m, control, cfg.seeds[0]) for m in cfg.methods], "energy")
    rows, base_unet = [], None
    for method, run in zip(cfg.methods, runs):
        module = load_adapter(Path(run["run_dir"]) / "adapter.safetensors")
        base_unet = base_unet or load_base_model(module.hparams.pretrained).unet
        found = energy_rows(module, base_unet)
        rows.append({"method": method, **(found[0] if found else {"layers": 0, "mean |ΔHE|/HE": "n/a (no pretrained layers)"})})
    notes = ["HE(W) = Σ_{i≠j} ‖ŵ_i − ŵ_j‖⁻¹ over unit-normalized neurons (rows), float64; effective weights "
             "read off the trained layers. OFT/COFT rotate every neuron by the same R, so their change "
             "is float error; LoRA and full finetuning change angles between neurons."]
    return write_report(cfg, "energy", f"Hyperspherical energy change ({control})", rows, notes,
                        settings=control_settings(cfg))


def ablation_r_table(cfg: DictConfig) -> Path:
    from orthodiff.eval.param_counts import PAPER_TOTALS_M, oft_count

    ablation = cfg.ablation
    key, _ = CONTROL_METRICS[ablation.control]
    cells = [(ablation.method, ablation.control, cfg.seeds[0], [f"adapter.num_blocks={r}"], f"-r{r}")
             for r in ablation.num_blocks]
    rows = []
    for r, run in zip(ablation.num_blocks, run_all(cfg, cells, "ablation_r")):
        rows.append({"r": r, key: run["final"].get(key), "trainable params (this model)": run["cost"]["trainable_parameters"],
                     "OFT params at SD 1.5": oft_count(r)[0],
                     "paper total incl. encoder (M)": PAPER_TOTALS_M.get(r, "n/a")})
    notes = ["Published (OFT paper, ADE20K mIoU): r=2 27.18, r=4 27.06, r=8 24.09, r=16 21.0."]
    return write_report(cfg, "ablation_r", f"OFT block count r vs {key}", rows, notes,
                        settings=control_settings(cfg))


# --- subject-driven generation ------------------------------------------------------

SUBJECT_SCORES = ("subject_fidelity", "prompt_fidelity", "background_accuracy", "diversity", "no_token_kind",
                  "no_token_color")


def subject_cell(cfg: DictConfig, method: str, subject: str) -> dict:
    """One subject-driven cell: experiment=dreambooth with the method's own settings
    (conf/task_method/subject_<method>.yaml). The first method also validates at step 0:
    with its adapter still the identity, that is the base model."""
    overrides = ["experiment=dreambooth", f"method={method}", f"data.subject={subject}", f"seed={cfg.subject.seed}",
                 f"validate_at_start={method == cfg.subject.methods[0]}", "logger=csv",
                 "callbacks.progress_bar.refresh_rate=0", *cfg.subject.train_overrides]
    return train_cell(cfg, f"subject-{subject}-{method}", overrides)


@torch.no_grad()
def subject_ceiling(subject: str, vae=None) -> dict:
    """The scores of ideal answers (subjects.reference_images for every evaluation prompt),
    as rendered and after the tiny VAE's round trip (what any model decoding through that
    VAE can reach at best)."""
    from orthodiff.data.subjects import EVAL_PROMPTS, expected_labels, reference_images, subject_images
    from orthodiff.eval.oracles import images_to_tensor
    from orthodiff.eval.subject_metrics import SubjectScorer

    scorer = SubjectScorer(subject_images(subject))
    images, specs = [], []
    for k, entry in enumerate(EVAL_PROMPTS):
        images += reference_images(subject, entry, n=4, seed=k)
        specs += [expected_labels(subject, entry)] * 4
    images = images_to_tensor(np.stack(images))
    prompts = [str(spec) for spec in specs]  # diversity groups samples by prompt
    scores = {}
    for name, batch in (("ideal images", images), ("ideal images through the VAE", _vae_round_trip(vae, images))):
        if batch is None:
            continue
        scorer.reset()
        scorer.update(batch, prompts, specs)
        scores[name] = scorer.compute()
    return scores


def _vae_round_trip(vae, images: torch.Tensor):
    if vae is None:
        return None
    latents = vae.encode(images * 2 - 1).latent_dist.mean
    return ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def sample_tiles(run_dir: Path, first: bool, size: int, rows: int) -> list[np.ndarray]:
    """The first sample of each of the first `rows` prompts from a run's first or last
    validation grid (samples/step_*.png: one prompt's samples per row)."""
    from PIL import Image

    grids = sorted((Path(run_dir) / "samples").glob("step_*.png"))
    grid = np.asarray(Image.open(grids[0 if first else -1]).convert("RGB"))
    return [grid[k * size:(k + 1) * size, :size] for k in range(rows)]


def subject_table(cfg: DictConfig) -> Path:
    from PIL import Image

    from orthodiff.data.subjects import EVAL_PROMPTS, subject_images
    from orthodiff.models.base import load_base_model

    settings = cfg.subject
    cells = [(m, s) for s in settings.subjects for m in settings.methods]
    runs = dict(zip(cells, run_all(cfg, cells, "subject", cell=subject_cell)))
    # The shapes world on the tiny SD (the overrides may shorten runs, not change model or data).
    embedded = not any(o.split("=")[0].lstrip("+~") in ("model", "data") for o in settings.train_overrides)
    vae = load_base_model(str(TINY_SD_PATH)).vae.eval() if embedded else None
    ceilings = {s: subject_ceiling(s, vae) for s in settings.subjects} if embedded else {}
    first = settings.methods[0]
    detail = []
    for subject in settings.subjects:
        base = runs[(first, subject)]["step0"]
        detail.append({"method": f"base model (step 0 of {first})", "subject": subject, **base})
        for method in settings.methods:
            run = runs[(method, subject)]
            detail.append({"method": method, "subject": subject, **run["final"],
                           "no_token_kind change": run["final"].get("no_token_kind", math.nan) - base.get("no_token_kind", math.nan),
                           "trainable params": run["cost"]["trainable_parameters"],
                           "adapter KB": round((Path(run["run_dir"]) / "adapter.safetensors").stat().st_size / 1024, 1),
                           "minutes": round(run["wall_seconds"] / 60, 2), "s/step": round(run["cost"]["seconds_per_step"], 3),
                           "peak memory MB": run["cost"]["peak_memory_mb"]})
        for name, scores in ceilings.get(subject, {}).items():
            detail.append({"method": name, "subject": subject, **scores})
    rows = []
    for method in dict.fromkeys(row["method"] for row in detail):
        mine = [row for row in detail if row["method"] == method]
        row = {"method": method}
        for key in [*SUBJECT_SCORES, "no_token_kind change", "trainable params", "adapter KB", "minutes",
                    "peak memory MB"]:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = mean_std(values) if key in SUBJECT_SCORES or key.endswith("change") else fmt(float(np.mean(values)))
        rows.append(row)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    size = 64
    for subject in settings.subjects:
        if not embedded:
            break
        prompts = len(EVAL_PROMPTS)
        training = [np.asarray(Image.fromarray(im).resize((size, size))) for im in subject_images(subject, 4)]
        lines = [training + [np.full((size, size, 3), 255, np.uint8)] * (prompts - len(training)),
                 sample_tiles(runs[(first, subject)]["run_dir"], True, size, prompts)]
        lines += [sample_tiles(runs[(m, subject)]["run_dir"], False, size, prompts) for m in settings.methods]
        grid = np.concatenate([np.concatenate(line, axis=1) for line in lines], axis=0)
        Image.fromarray(grid).save(out / f"subject_samples_{subject}.png")
        plots.append(f"subject_samples_{subject}.png")
    notes = [f"Mean ± std over subjects {list(settings.subjects)} (seed {settings.seed}); per-subject rows in "
             "subject_detail.csv. Each method trains with its own settings (conf/task_method/subject_<method>.yaml); "
             "minutes = the whole train.py run (validation included; the first method's run also validates "
             f"the base model at step 0) with {cfg.jobs} cell(s) at a time. subject_fidelity: mean centred "
             "cosine of the classifier's features between token-prompt samples and the subject's training images; prompt_fidelity: share of what "
             "each prompt asks (background, recolouring, extra shape) that the classifier finds; no_token_*: "
             "prompted kind/colour recognition on 32 ordinary captions (forgetting: compare with the base row). "
             "The 'ideal images' rows score perfect answers, as rendered and after the tiny VAE's round trip: "
             "the ceiling for any model decoding through that VAE.",
             "Sample grids: row 1 the training images, row 2 the base model, then one row per method in the "
             f"order {list(settings.methods)}; columns are the evaluation prompts (subjects.EVAL_PROMPTS, "
             "first sample each, same seeds for every method)."]
    how = subject_settings(cfg)
    write_report(cfg, "subject_detail", "Subject-driven generation, per subject", detail, [], settings=how)
    return write_report(cfg, "subject", "Subject-driven generation (DreamBooth protocol, miniature)", rows, notes, plots,
                        settings=how)


TABLES = {"params": params_table, "controllable": controllable_table, "convergence": convergence_table,
          "energy": energy_table, "ablation_r": ablation_r_table,
          "subject": subject_table}


def reproduce(cfg: DictConfig) -> list[Path]:
    if cfg.table != "all" and cfg.table not in TABLES:
        raise ValueError(f"unknown table {cfg.table!r}; valid tables: {', '.join([*TABLES, 'all'])}")
    if cfg.jobs < 1:
        raise ValueError(f"jobs={cfg.jobs}: the number of cells trained at once must be >= 1")
    names = list(TABLES) if cfg.table == "all" else [cfg.table]
    started = time.time()
    paths = [TABLES[name](cfg) for name in names]
    print(f"reproduce {cfg.table}: {time.time() - started:.0f} s")
    return paths
