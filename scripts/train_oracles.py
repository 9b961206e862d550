"""Train the shapes-world evaluators ("oracles") and ship them under assets/oracles.

    python scripts/train_oracles.py                  # all four, on one CPU thread
    python scripts/train_oracles.py --only segmenter --out /tmp/oracles

The segmenter trains from scratch, the other three start from its U-Net (see RECIPES),
all on fresh scenes rendered in memory by make_scene (train split seeds; step s uses the
scenes s * batch ... (s + 1) * batch - 1, so no scene is seen twice within an oracle, and
nothing is written to disk), with a fixed seed for initialisation and augmentation. The
augmentation blurs, adds noise and jitters colours on about half the images (see
`degrade`), because generated images from a tiny diffusion model are a bit soft; targets
stay the exact ground truth.

Checkpoints go to ~/.cache/orthodiff/oracles/<name>.pt (atomic: orthodiff.files.atomic_path)
every --save-every steps; a rerun resumes from them, and one whose recipe differs starts
over (a finished checkpoint is only re-saved and re-measured). Then each oracle is written
in float16 to <out>/<name>/ (save_pretrained), loaded back, and measured on --n-test
held-out test-split scenes, clean and degraded; the figures, the command, seed, steps and
training times go to <out>/metrics.json. The depth figures come with the ambiguity floor
(see depth_ambiguity), the classifier's with the FID between test and val scenes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from orthodiff.data import shapes as sw
from orthodiff.data.shapes import NUM_LANDMARKS, keypoint_targets, make_scene, shape_masks, split_seeds
from orthodiff.eval.metrics import depth_rmse, frechet_distance
from orthodiff.eval.oracles import ORACLE_CLASSES, ORACLES, images_to_tensor, load_oracle, measure
from orthodiff.files import atomic_path

# The segmenter trains first; the other three start from its U-Net (the classifier's
# kind map even from its output layer), as real evaluators start from a pretrained
# backbone: telling the four kinds apart is the slow part to learn, and this way it is
# learned once. Steps are sized so all four train in about 20 minutes on one CPU thread.
UNET = {"widths": [16, 32, 64, 96, 128]}
RECIPES = {
    "segmenter": {"config": UNET, "init": None, "steps": 550, "batch": 32, "lr": 3e-3,
                  "head_lr": 1.0},
    "depth": {"config": UNET, "init": "segmenter", "steps": 300, "batch": 32, "lr": 1e-3,
              "head_lr": 10.0},
    "keypoints": {"config": UNET, "init": "segmenter", "steps": 600, "batch": 32, "lr": 1e-3,
                  "head_lr": 10.0},
    "classifier": {"config": UNET, "init": "segmenter", "steps": 300, "batch": 32, "lr": 1e-3,
                   "head_lr": 10.0},
}
WARMUP = 0.05  # fraction of steps with a linear warm-up, then cosine decay to zero
DEGRADE = {"p": 0.5, "blur_sigma": (0.3, 1.2), "noise": (0.0, 0.05), "gain": 0.07, "shift": 0.04}
TEST_DEGRADE = {"blur_sigma": 0.8, "noise": 0.02}  # the fixed degradation of the 2nd test
CHECKED_SCENES = 200  # tests/test_oracles.py re-scores the first 200 test scenes


def degrade(images: torch.Tensor, generator: torch.Generator,
            p: float = DEGRADE["p"]) -> torch.Tensor:
    """Blur (Gaussian, sigma in DEGRADE["blur_sigma"] pixels), add Gaussian noise and jitter
    each channel's gain and offset, each independently on a fraction p of the images."""
    n = len(images)

    def pick():
        return torch.rand(n, generator=generator) < p

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    sigma = torch.where(pick(), uniform(*DEGRADE["blur_sigma"]), torch.zeros(n))
    images = blur(images, sigma)
    noise = torch.where(pick(), uniform(*DEGRADE["noise"]), torch.zeros(n))
    images = images + noise[:, None, None, None] * torch.randn(images.shape, generator=generator)
    jitter = pick()[:, None, None, None]
    gain = 1 + DEGRADE["gain"] * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    shift = DEGRADE["shift"] * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    images = torch.where(jitter, images * gain + shift, images)
    return images.clamp(0, 1)


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma (N,) in pixels, 0 = unchanged)."""
    x = torch.arange(-3, 4, dtype=images.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # sigma 0 -> a delta
    n, c, h, w = images.shape
    weight = kernel.repeat_interleave(c, 0)[:, None]  # (N * C, 1, 7)
    x = F.pad(images.reshape(1, n * c, h, w), (3, 3, 3, 3), mode="replicate")
    x = F.conv2d(x, weight[:, :, None, :], groups=n * c)
    x = F.conv2d(x, weight[:, :, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def color_map(scene) -> np.ndarray:
    """(H, W) int64 over BACKGROUNDS then COLORS: the background's index on background
    pixels, 4 + the shape colour's index where a shape is seen (shapes are drawn without
    anti-aliasing, so a pixel shows its shape's exact colour)."""
    ids = np.full(scene.seg.shape, list(sw.BACKGROUNDS).index(scene.background), np.int64)
    for shape in scene.shapes:
        seen = (scene.image == sw.COLORS[shape["color"]]).all(-1)
        ids[seen] = len(sw.BACKGROUNDS) + list(sw.COLORS).index(shape["color"])
    return ids


def batch_targets(name: str, scenes) -> dict:
    if name == "segmenter":
        return {"seg": torch.from_numpy(np.stack([s.seg for s in scenes])).long()}
    if name == "depth":  # the index in DEPTH_LEVELS: 0 background, 1 + z for shapes
        levels = np.rint((1 - np.stack([s.depth for s in scenes])) / sw.DEPTH_STEP)
        return {"depth": torch.from_numpy(levels).long()}
    if name == "keypoints":
        return keypoint_targets(scenes)
    return {"kind_map": torch.from_numpy(np.stack([s.seg for s in scenes])).long(),
            "color_map": torch.from_numpy(np.stack([color_map(s) for s in scenes]))}


def loss_of(name: str, model, images: torch.Tensor, targets: dict) -> torch.Tensor:
    if name == "segmenter":
        return F.cross_entropy(model(images), targets["seg"])
    if name == "depth":
        return F.cross_entropy(model(images), targets["depth"])
    if name == "keypoints":  # landmark offsets and depth are learned on shape pixels only
        maps = model(images)
        shape = targets["shape"][:, None].float()
        count = shape.sum().clamp_min(1)
        offsets = ((maps[:, 2:] - targets["offsets"]).abs() * shape).sum() / count
        depth = ((maps[:, 1:2] - targets["depth"][:, None]).abs() * shape).sum() / count
        return (F.binary_cross_entropy_with_logits(maps[:, :1], shape)
                + 20 * offsets / (2 * NUM_LANDMARKS) + depth)
    maps = model(images)
    return (F.cross_entropy(maps["kind_map"], targets["kind_map"])
            + F.cross_entropy(maps["color_map"], targets["color_map"]))


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, int(WARMUP * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@functools.lru_cache(maxsize=None)
def train_scene(seed: int):
    """Scenes are rendered once per run and shared by the oracles that train on them."""
    return make_scene(seed)


def checkpoint_path(cache: Path, name: str) -> Path:
    return cache / f"{name}.pt"


def train_oracle(name: str, recipe: dict, seed: int, cache: Path, save_every: int,
                 parent: dict | None = None, progress: bool = True):
    """Train (or resume) one oracle. `parent`, the final checkpoint of the oracle named by
    recipe["init"], gives the starting U-Net. Returns (model, checkpoint dict)."""
    torch.manual_seed(seed)
    model = ORACLE_CLASSES[name](**recipe["config"])
    identity = {"recipe": recipe, "seed": seed, "parent": parent and parent["identity"]}
    if parent is not None:  # every parent tensor whose name and shape match
        own = model.state_dict()
        start_from = {k: v for k, v in parent["model"].items()
                      if k in own and own[k].shape == v.shape}
        model.load_state_dict(start_from, strict=False)
    model = model.to(memory_format=torch.channels_last)
    # Output layers (and the classifier's colour network) learn head_lr times
    # faster: with Adam a weight moves about lr per step, and a fresh output layer on top
    # of normalized features needs weights of order one, hundreds of steps at lr alone.
    head = [n.startswith("unet.head.") or not n.startswith("unet.")
            for n, _ in model.named_parameters()]
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p, h in zip(parameters, head) if not h], "scale": 1.0},
         {"params": [p for p, h in zip(parameters, head) if h], "scale": recipe["head_lr"]}],
        lr=recipe["lr"], weight_decay=1e-4)
    path = checkpoint_path(cache, name)
    start, elapsed = 0, 0.0
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if checkpoint["identity"] == identity:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            start, elapsed = checkpoint["step"], checkpoint["elapsed"]
            print(f"{name}: resuming from {path} at step {start}")
        else:
            print(f"{name}: {path} holds another recipe; starting over")
    steps, batch = recipe["steps"], recipe["batch"]
    train_seeds = split_seeds("train", steps * batch)
    model.train()
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=not progress)
    began = time.perf_counter()
    checkpoint = None
    for step in bar:
        scenes = [train_scene(s) for s in train_seeds[step * batch:(step + 1) * batch]]
        # One generator per step, so a resumed run draws the same augmentation.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        images = degrade(images_to_tensor(np.stack([s.image for s in scenes])), generator)
        loss = loss_of(name, model, images.contiguous(memory_format=torch.channels_last),
                       batch_targets(name, scenes))
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * learning_rate(step, steps, recipe["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            checkpoint = {"identity": identity, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "step": step + 1,
                          "elapsed": elapsed + time.perf_counter() - began}
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
    bar.close()
    if checkpoint is None:  # nothing left to train: the loaded checkpoint is final
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, checkpoint


def final_checkpoint(cache: Path, name: str, recipe: dict, seed: int) -> dict:
    """The finished checkpoint of `name` (the parent of a warm-started oracle)."""
    path = checkpoint_path(cache, name)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if (checkpoint["identity"]["recipe"] == recipe and checkpoint["identity"]["seed"] == seed
                and checkpoint["step"] == recipe["steps"]):
            return checkpoint
    raise FileNotFoundError(f"no finished {name} checkpoint for this recipe in {path}; "
                            f"train it first (--only {name})")


def depth_ambiguity(scenes) -> dict:
    """What no depth estimator can beat: shapes that do not overlap can be stacked in any
    order without changing a pixel, so the best guess of their depth is the mean over
    the z-orders that render the same image (all equally likely under the generator).
    Returns that predictor's RMSE and the fraction of scenes whose z-order is unique."""
    best, unique = [], 0
    for scene in scenes:
        size = scene.image.shape[0]
        masks = shape_masks(scene.shapes, size)
        candidates = []
        for order in itertools.permutations(range(len(masks))):
            painted = np.full((size, size), -1)
            depth = np.ones((size, size))
            for z, shape in enumerate(order):  # order[z] is the shape drawn z-th
                painted[masks[shape]] = shape
                depth[masks[shape]] = sw.shape_depth(z)
            candidates.append((painted, depth))
        truth = candidates[0][0]  # the identity permutation is the real scene
        same = [depth for painted, depth in candidates if np.array_equal(painted, truth)]
        unique += len(same) == 1
        best.append(np.mean(same, 0))
    truth = np.stack([s.depth for s in scenes])
    return {**depth_rmse(np.stack(best), truth), "unique_z_order": unique / len(scenes)}


def measure_all(name: str, model, scenes) -> dict:
    """Scores on the test scenes, clean and degraded (TEST_DEGRADE), and on the first
    CHECKED_SCENES of them alone: the figure tests/test_oracles.py reproduces."""
    generator = torch.Generator().manual_seed(0)
    clean = images_to_tensor(np.stack([s.image for s in scenes]))
    noisy = blur(clean, torch.full((len(clean),), TEST_DEGRADE["blur_sigma"]))
    noise = TEST_DEGRADE["noise"] * torch.randn(noisy.shape, generator=generator)
    noisy = (noisy + noise).clamp(0, 1)
    return {"clean": measure(name, model, scenes, clean),
            "degraded": measure(name, model, scenes, noisy),
            f"clean_first_{CHECKED_SCENES}": measure(name, model, scenes[:CHECKED_SCENES],
                                                     clean[:CHECKED_SCENES])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/oracles"))
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/orthodiff/oracles"))
    parser.add_argument("--only", default=",".join(ORACLES), help="comma-separated names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-test", type=int, default=1000, help="held-out test scenes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, help="override every recipe's steps (smoke runs)")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint period (steps)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ORACLES))
    if unknown or not names:
        parser.error(f"--only: unknown oracles {unknown}; choose from {list(ORACLES)}")
    torch.set_num_threads(args.threads)
    cache = args.cache.expanduser()

    test_seeds = split_seeds("test", args.n_test)
    test_scenes = [make_scene(s) for s in test_seeds]
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update({
        "command": shlex.join(["python", "scripts/train_oracles.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "input": "float RGB (N, 3, 64, 64) in [0, 1]",
        "augmentation": DEGRADE, "test_degradation": TEST_DEGRADE,
        "test": {"split": "test", "n": args.n_test, "seeds": [test_seeds[0], test_seeds[-1]]},
    })
    metrics.setdefault("oracles", {})
    finished = {}
    for name in [n for n in ORACLES if n in names]:  # parents before children
        recipe = dict(RECIPES[name], steps=args.steps or RECIPES[name]["steps"])
        parent_name = recipe["init"]
        parent = None
        if parent_name is not None:
            parent = finished.get(parent_name) or final_checkpoint(
                cache, parent_name, dict(RECIPES[parent_name], steps=args.steps or
                                         RECIPES[parent_name]["steps"]), args.seed)
        model, checkpoint = train_oracle(name, recipe, args.seed, cache, args.save_every,
                                         parent, not args.no_progress)
        finished[name] = checkpoint
        seconds = checkpoint["elapsed"]
        model.half().save_pretrained(args.out / name)  # float16 keeps assets small
        shipped = load_oracle(name, args.out)  # measure exactly what ships
        metrics["oracles"][name] = {**recipe, "train_seconds": round(seconds, 1),
                                    "scenes_seen": recipe["steps"] * recipe["batch"],
                                    "parameters": sum(p.numel() for p in shipped.parameters()),
                                    **measure_all(name, shipped, test_scenes)}
        if name == "depth":
            metrics["oracles"][name]["ambiguity_floor"] = depth_ambiguity(test_scenes)
        if name == "classifier":
            val_scenes = [make_scene(s) for s in split_seeds("val", args.n_test)]
            features = [shipped.features(images_to_tensor(np.stack([s.image for s in scenes])))
                        for scenes in (test_scenes, val_scenes)]
            metrics["oracles"][name]["fid_test_vs_val"] = frechet_distance(*features)
        print(f"{name}: {json.dumps(metrics['oracles'][name]['clean'])}")
        args.out.mkdir(parents=True, exist_ok=True)
        metrics["total_train_seconds"] = round(sum(
            m["train_seconds"] for m in metrics["oracles"].values()), 1)
        with atomic_path(metrics_path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {', '.join(names)} and metrics.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
