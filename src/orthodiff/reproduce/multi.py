"""table=multi: two conditions at once. For each pair (multi.pairs, e.g. canny + seg) and each
method (multi.methods), on the first multi.scenes validation scenes and every seed:

    alone a / alone b   each single-condition cell (shared with table=controllable) on its own condition
    composed            the two cells loaded together (OrthodiffPipeline.load_adapters): OFT rotations
                        multiplied (a's folded first), LoRA updates added, ControlNet residuals and
                        T2I-Adapter features added, hint features added; `composed (mean)` for the
                        methods in multi.mean_methods: the geodesic mean of the rotations instead
    joint               one adapter trained on both (experiment=<a>_<b>, per-condition dropout),
                        with both conditions and with each alone
    base model          no adapter, no condition

Every arm samples the same scenes with the same sampler (DDIM, multi.steps, multi.guidance; the
noise of scene k under seed s is seeded s * 100003 + k) and is scored with both conditions'
metrics. Retention = the metric with both conditions given / the metric alone (alone / both for a
lower-is-better metric), so 1 keeps the control fully. Comparisons are decided over seeds
(reproduce.stats), one Holm family per question: composed vs alone, composed vs joint, each
method's composition vs Multi-ControlNet (composed ControlNets), composed vs the base model.

Conflicting conditions: condition a of scene k with condition b of scene k + 1, empty prompt,
composed at each of multi.conflict_scales (and the joint adapter), first seed: each condition's
metric against its own scene, as the share of its gain over the base model that survives (the
same adapter alone = 1, no condition = 0), and which keeps more: the one that wins.
Figures per pair: <out>/multi_samples_<a>_<b>.png (condition a | condition b | composed | joint |
a alone | b alone) and <out>/multi_conflicts_<a>_<b>.png.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from hydra.utils import instantiate
from omegaconf import DictConfig

from orthodiff.data.datasets import collate
from orthodiff.eval.control_metrics import control_scorer, headline_metric, to_uint8
from orthodiff.models.base import resolve_pretrained
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.reproduce import stats
from orthodiff.reproduce.cells import ROOT, cell_config, run_all
from orthodiff.reproduce.report import (
    control_settings,
    finite_mean,
    fmt,
    higher_is_better,
    labelled_grid,
    markdown_table,
    mean_std,
    out_dir,
    write_report,
)
from orthodiff.reproduce.subject import vae_round_trip

BASE = "base model"
TRUTH = {"canny": (), "seg": ("seg",), "depth": ("depth",), "landmarks": ("landmarks", "landmark_mask")}  # batch["target"] keys


def joint_experiment(pair) -> str:
    name = f"{pair[0]}_{pair[1]}"
    if not (ROOT / "conf" / "experiment" / f"{name}.yaml").is_file():
        raise ValueError(f"multi.pairs {list(pair)}: no conf/experiment/{name}.yaml trains the joint adapter")
    return name


def cells(cfg: DictConfig) -> list[tuple]:
    """run_cell's arguments: the single-condition cells (table=controllable's) and the joint ones."""
    controls = list(dict.fromkeys(c for pair in cfg.multi.pairs for c in pair))
    singles = [(m, c, s) for c in controls for m in cfg.multi.methods for s in cfg.seeds]
    joints = [(m, joint_experiment(pair), s) for pair in cfg.multi.pairs for m in cfg.multi.methods for s in cfg.seeds]
    return singles + joints


def condition_array(encoded: torch.Tensor) -> np.ndarray:
    """An encoded condition (C, H, W) in [0, 1] back to the uint8 map the pipeline reads (exact:
    every encoding is a uint8 map / 255)."""
    array = (encoded * 255).round().byte()
    return (array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)).numpy()


class Scenes:
    """The first `count` validation scenes of a cell's dataset under both conditions of a pair:
    prompts, each condition's maps, the batch the scorer reads, and the scorer."""

    def __init__(self, run_dir: str, pair: list[str], count: int):
        config = cell_config(run_dir)
        dataset = instantiate(config.data.val, control="+".join(pair), max_items=count)
        self.pair, self.keys = pair, [headline_metric(c) for c in pair]
        self.higher = [higher_is_better(c) for c in pair]
        self.maps = [[condition_array(dataset.view(c)[k]["conditioning"]) for k in range(len(dataset))] for c in pair]
        self.batch = collate([dataset[k] for k in range(len(dataset))])
        self.prompts = list(self.batch["text"])
        self.scorer = control_scorer("+".join(pair), config.module.evaluator, getattr(dataset, "num_classes", None),
                                     getattr(dataset, "ignore_index", None))

    def score(self, images: torch.Tensor, batch: dict | None = None) -> dict[str, float]:
        self.scorer.reset()
        self.scorer.update(images, batch or self.batch)
        found = self.scorer.compute()
        return {key: found.get(key, math.nan) for key in self.keys}

    def shifted(self) -> dict:
        """The batch with the second condition's ground truth taken from the next scene (the
        conflicting pairs give each scene the second condition of the next): each metric is
        then scored against the scene its own condition came from."""
        order = [(k + 1) % len(self.prompts) for k in range(len(self.prompts))]
        second = self.pair[1]
        target = {key: value[order] if key in TRUTH[second] else value for key, value in self.batch["target"].items()}
        pixels = self.batch["pixel_values"]  # canny's truth: the source image's edges
        return {"pixel_values": pixels[order] if second == "canny" else pixels, "target": target}


def load(base: str, adapters: list[Path], scales=None, mode: str = "product"):
    """A pipeline with the adapters (none: the base model), DDIM, no progress bars."""
    kind = OrthodiffPipeline if adapters else StableDiffusionPipeline
    pipe = kind.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if adapters:
        pipe.load_adapters(adapters, scales, mode)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(cfg: DictConfig, pipe, prompts: list[str], conditions: list[list | None] | None, seed: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]; conditions: per condition of the pipeline, one map per prompt (None: left out).
    Scene k's noise is seeded seed * 100003 + k in every arm."""
    images, size = [], cfg.multi.batch_size
    for start in range(0, len(prompts), size):
        chunk = slice(start, start + size)
        kwargs = dict(num_inference_steps=cfg.multi.steps, guidance_scale=cfg.multi.guidance, output_type="pt",
                      generator=[torch.Generator().manual_seed(seed * 100003 + k)
                                 for k in range(start, min(start + size, len(prompts)))])
        if conditions is not None:
            given = [None if c is None else c[chunk] for c in conditions]
            kwargs["control_image"] = given if len(given) > 1 else given[0]
        images.append(pipe(prompts[chunk], **kwargs).images.float().cpu())
    return torch.cat(images)


def retention(both: float, alone: float, higher: bool) -> float:
    """How much of a control survives the second condition: 1 keeps it fully."""
    if not (math.isfinite(both) and math.isfinite(alone)) or (alone if higher else both) == 0:
        return math.nan
    return both / alone if higher else alone / both


def gain_kept(found: float, alone: float, base: float) -> float:
    """The share of a condition's gain over the base model (alone - base) that a sample keeps:
    1 as good as that condition alone, 0 no better than no condition; either metric direction."""
    if not all(map(math.isfinite, (found, alone, base))) or alone == base:
        return math.nan
    return (found - base) / (alone - base)


def arms(method: str, cfg: DictConfig) -> list[str]:
    modes = ["composed", *(["composed (mean)"] if method in cfg.multi.mean_methods else [])]
    return modes + ["joint"]


def measure_pair(cfg: DictConfig, runs: dict, pair: list[str]):
    """Every arm's figures ({arm: {metric: [one per seed]}}), the scenes, the first seed's first
    images ({arm: tile}) and the equivalence margins (5 % of base model -> real images through the VAE)."""
    settings, first_seed = cfg.multi, cfg.seeds[0]
    first_run = runs[(settings.methods[0], pair[0], first_seed)]["run_dir"]
    base = resolve_pretrained(cell_config(first_run).module.pretrained)
    scenes = Scenes(first_run, pair, settings.scenes)
    figures, tiles = {}, {}

    def measure(arm: str, pipe, conditions, seed: int):
        images = sample(cfg, pipe, scenes.prompts, conditions, seed)
        for key, value in scenes.score(images).items():
            figures.setdefault(arm, {}).setdefault(key, []).append(value)
        if seed == first_seed:
            tiles[arm] = to_uint8(images[:1])[0]

    plain = load(base, [])
    for seed in cfg.seeds:
        measure(BASE, plain, None, seed)
    with torch.no_grad():
        ceiling = scenes.score(vae_round_trip(plain.vae, ((scenes.batch["pixel_values"] + 1) / 2).clamp(0, 1)))
    margins = {key: stats.equivalence_margin(finite_mean(figures[BASE][key]), ceiling[key]) for key in scenes.keys}
    for method in settings.methods:
        for seed in cfg.seeds:
            single = [Path(runs[(method, c, seed)]["run_dir"]) / "adapter.safetensors" for c in pair]
            for k, part in enumerate(pair):
                measure(f"{method} {part} alone", load(base, [single[k]]), [scenes.maps[k]], seed)
            measure(f"{method} composed", load(base, single), scenes.maps, seed)
            if method in settings.mean_methods:
                measure(f"{method} composed (mean)", load(base, single, mode="mean"), scenes.maps, seed)
            joint = load(base, [Path(runs[(method, joint_experiment(pair), seed)]["run_dir"]) / "adapter.safetensors"])
            measure(f"{method} joint", joint, scenes.maps, seed)
            for k, part in enumerate(pair):
                measure(f"{method} joint {part} alone", joint, [m if j == k else None for j, m in enumerate(scenes.maps)],
                        seed)
    return figures, scenes, tiles, margins, base


def arm_rows(pair: list[str], scenes: Scenes, figures: dict) -> list[dict]:
    """One row per arm: both metrics (mean ± std over seeds) and, for the arms given both
    conditions, each condition's retention against the same adapter(s) alone."""
    rows = []
    for arm, found in figures.items():
        row = {"pair": " + ".join(pair), "arm": arm, **{key: mean_std(found[key]) for key in scenes.keys}}
        method = arm.split(" ")[0]
        if arm != BASE and " alone" not in arm:
            joint = arm.endswith("joint")
            for part, key, higher in zip(pair, scenes.keys, scenes.higher):
                alone = figures[f"{method} joint {part} alone" if joint else f"{method} {part} alone"][key]
                row[f"{part} retention"] = mean_std([retention(b, a, higher) for b, a in zip(found[key], alone)], 3)
        rows.append(row)
    return rows


def questions(cfg: DictConfig, pair: list[str], scenes: Scenes) -> list[tuple]:
    """(family, ours, theirs, metric key, higher is better): what the table decides."""
    methods, compared = cfg.multi.methods, []
    for method in methods:
        for arm in arms(method, cfg)[:-1]:  # the compositions
            for part, key, higher in zip(pair, scenes.keys, scenes.higher):
                compared.append(("composed vs alone", f"{method} {arm}", f"{method} {part} alone", key, higher))
                compared.append(("composed vs joint", f"{method} {arm}", f"{method} joint", key, higher))
                compared.append(("composed vs base model", f"{method} {arm}", BASE, key, higher))
                if method != "controlnet" and "controlnet" in methods:
                    compared.append(("vs Multi-ControlNet", f"{method} {arm}", "controlnet composed", key, higher))
    return compared


def decided(compared: list[tuple], figures: dict, margins: dict) -> list[dict]:
    """The comparisons decided over seeds, one Holm family per question (reproduce.stats)."""
    rows = []
    for family in dict.fromkeys(q[0] for q in compared):
        asked = [q for q in compared if q[0] == family]
        comparisons = [stats.compare(figures[ours][key], figures[theirs][key], higher, margins[key])
                       for _, ours, theirs, key, higher in asked]
        p_holm = stats.holm([c.p for c in comparisons])
        for (_, ours, theirs, key, _), c, p, (verdict, _) in zip(asked, comparisons, p_holm, stats.decide(comparisons)):
            rows.append({"question": family, "ours": ours, "against": theirs, "metric": key,
                         "difference [95 % CI]": stats.format_difference(c), "n": f"{c.n_ours}/{c.n_theirs}",
                         "holm p": p, "verdict": verdict})
    return rows


def conflicts(cfg: DictConfig, runs: dict, pair: list[str], scenes: Scenes, base: str) -> tuple[list[dict], list, list]:
    """Condition a of scene k with condition b of scene k + 1 under an empty prompt, first seed:
    each method composed at every multi.conflict_scales, and its joint adapter; rows, tiles, labels."""
    seed, prompts = cfg.seeds[0], [""] * len(scenes.prompts)
    order = [(k + 1) % len(prompts) for k in range(len(prompts))]
    maps = [scenes.maps[0], [scenes.maps[1][j] for j in order]]
    truth = scenes.shifted()
    rows, tiles, labels = [], [], []

    def run(pipe, conditions) -> tuple[dict, torch.Tensor]:
        images = sample(cfg, pipe, prompts, conditions, seed)
        return scenes.score(images, truth), images

    plain = run(load(base, []), None)[0]
    for method in cfg.multi.methods:
        single = [Path(runs[(method, c, seed)]["run_dir"]) / "adapter.safetensors" for c in pair]
        joint = load(base, [Path(runs[(method, joint_experiment(pair), seed)]["run_dir"]) / "adapter.safetensors"])
        alone = {"composed": [run(load(base, [single[k]]), [maps[k]])[0] for k in range(2)],
                 "joint": [run(joint, [maps[0], None])[0], run(joint, [None, maps[1]])[0]]}
        settings = [("composed", list(scales), load(base, single, scales=list(scales))) for scales in cfg.multi.conflict_scales]
        settings.append(("joint", [1.0, 1.0], joint))
        for arm, scales, pipe in settings:
            found, images = run(pipe, maps)
            kept = [gain_kept(found[key], alone[arm][k][key], plain[key]) for k, key in enumerate(scenes.keys)]
            wins = "n/a" if any(math.isnan(v) for v in kept) else pair[int(kept[1] > kept[0])]
            rows.append({"pair": " + ".join(pair), "method": method, "arm": arm, "scales": fmt(scales),
                         **{key: found[key] for key in scenes.keys},
                         **{f"{part} gain kept": kept[k] for k, part in enumerate(pair)}, "wins": wins})
            tiles.append(to_uint8(images[:1])[0])
            labels.append(f"{method} {arm} {scales[0]:g}/{scales[1]:g}")
    return rows, tiles, labels


def condition_tile(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def table(cfg: DictConfig) -> Path:
    settings = cfg.multi
    runs = dict(zip(cells(cfg), run_all(cfg, cells(cfg), "multi", archived=False)))
    rows, decisions, conflict_rows, plots = [], [], [], []
    for pair in map(list, settings.pairs):
        figures, scenes, tiles, margins, base = measure_pair(cfg, runs, pair)
        rows += arm_rows(pair, scenes, figures)
        decisions += decided(questions(cfg, pair, scenes), figures, margins)
        found, conflict_tiles, labels = conflicts(cfg, runs, pair, scenes, base)
        conflict_rows += found
        name = f"{pair[0]}_{pair[1]}"
        given = [condition_tile(scenes.maps[0][0]), condition_tile(scenes.maps[1][0])]
        blank = np.full_like(tiles[BASE], 255)
        labelled_grid([[*given, tiles[BASE], blank, blank, blank]] +
                      [[*given, tiles[f"{m} composed"], tiles[f"{m} joint"],
                        *(tiles[f"{m} {c} alone"] for c in pair)] for m in settings.methods],
                      [BASE, *settings.methods],
                      [f"{pair[0]} (a)", f"{pair[1]} (b)", "composed", "joint", f"{pair[0]} alone", f"{pair[1]} alone"],
                      out_dir(cfg) / f"multi_samples_{name}.png", f"{' + '.join(pair)}: scene 0, seed {cfg.seeds[0]}")
        conflicting = [condition_tile(scenes.maps[0][0]), condition_tile(scenes.maps[1][1 % len(scenes.maps[1])])]
        labelled_grid([[*conflicting, tile] for tile in conflict_tiles], labels,
                      [f"{pair[0]}, scene 0", f"{pair[1]}, scene 1", "sample (empty prompt)"],
                      out_dir(cfg) / f"multi_conflicts_{name}.png", f"{' + '.join(pair)}: conflicting conditions")
        plots += [f"multi_samples_{name}.png", f"multi_conflicts_{name}.png"]
    notes = [f"{settings.scenes} validation scenes, DDIM {settings.steps} steps, guidance {settings.guidance}, the same "
             f"noise per scene in every arm; mean ± std over seeds {list(cfg.seeds)}. Retention = with both / alone "
             "(alone / both for a lower-is-better metric), per seed against the same adapter(s) alone: 1 keeps the "
             "control fully. Composed: the two single-condition cells (table=controllable's) loaded together at scale "
             "1, OFT/COFT rotations multiplied in the pair's order (the first folded first) or, '(mean)', their "
             "geodesic mean; LoRA updates added; ControlNet residuals and T2I-Adapter features added, as diffusers' "
             "Multi-ControlNet / MultiAdapter do. Joint: experiment=<a>_<b>, one adapter trained on both with "
             "per-condition dropout, given both or one.",
             "", "## Decisions", "",
             "Decided over seeds (reproduce.stats): Welch's 95 % CI of the difference, Holm within each question; "
             "equivalent when a TOST shows |difference| < 5 % of the range from the base model to the real scenes "
             "through the VAE (per metric).", "", *markdown_table(decisions), "",
             "## Conflicting conditions", "",
             f"Condition a of scene k with condition b of scene k + 1, empty prompt, seed {cfg.seeds[0]} (one seed: "
             "descriptive); each metric against its own condition's scene. 'gain kept': (metric - base model) / "
             "(the same adapter alone on that condition - base model), all under the same prompt and noise: 1 as "
             "good as that condition alone, 0 as if it were not given. 'wins': the condition that keeps more of its "
             "gain. Scales are (a, b).", "",
             *markdown_table(conflict_rows), ""]
    return write_report(cfg, "multi", "Two conditions at once: composed, joint, alone", rows, notes, plots,
                        settings=control_settings(cfg))
