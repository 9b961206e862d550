"""Is the tiny model really a text-to-image model? Measured with the shapes-world classifier.

    python scripts/evaluate_tiny_sd.py [--pipeline assets/tiny-sd] [--n 200] [--out reports/tiny_sd_quality.json]
    python scripts/evaluate_tiny_sd.py --vae-only [--pipeline DIR]     # the autoencoder rows alone (~10 s)

Generates one sample per held-out test caption (fixed seeds), asks the classifier
oracle what it sees, and reports how often the prompted shape kinds, colours and
background are recognized, beside the chance level: the same rates for real test
images paired with another scene's caption (what matching the data's prior alone
achieves). Also the shapes-FID of samples against real test images (classifier
features), which of v3's floors the model meets (orthodiff.eval.base_quality; a width-ladder
rung: --pipeline ~/.cache/orthodiff/models/tiny-sd-w2 --out reports/tiny_sd_w2_quality.json)
and a caption/sample grid.

Short prompts: one sample per test scene for the short caption a person would type,
"a red circle" (the scene's first shape, no background clause), and how often the
classifier finds the prompted kind / colour / (colour, kind) in it.

Autoencoder rows (validation scenes, --vae-n of them, posterior mean decoded): Canny IoU
(cv2 100/200, the control metric) between each real scene and its own reconstruction,
and the share of pixels at least --edge-margin pixels from every Canny edge of the real
scene whose largest channel error exceeds 48 levels (spots inside flat regions).
"""

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from orthodiff.data.control import canny_edges
from orthodiff.data.shapes import BACKGROUNDS, COLORS, SHAPES, make_scene, split_seeds
from orthodiff.eval.base_quality import SHORT_PROMPTS, floors
from orthodiff.eval.control_metrics import edge_scores
from orthodiff.eval.image_metrics import prompt_recognition
from orthodiff.eval.metrics import frechet_distance
from orthodiff.eval.oracles import images_to_tensor, load_oracle, scene_labels
from orthodiff.models.tiny_sd import TINY_SD_PATH, load_tiny_sd

SPOT_LEVELS = 48  # a pixel off by more than this (max over channels, 0-255) counts as a spot


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def short_prompt(scene) -> str:
    """'a red circle': the scene's first shape, no background clause."""
    shape = scene.shapes[0]
    return f"{article(shape['color'])} {shape['color']} {shape['kind']}"


@torch.no_grad()
def reconstruct(vae, images_uint8: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the VAE's reconstruction (posterior mean decoded), uint8."""
    out = []
    for i in range(0, len(images_uint8), batch):
        x = images_to_tensor(images_uint8[i : i + batch]).to(vae.dtype) * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        out.append(((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def vae_rows(vae, images: np.ndarray, edge_margin: int = 2) -> dict:
    """Canny IoU real vs reconstruction, and the share of off-edge pixels off by > SPOT_LEVELS."""
    import cv2

    recon = reconstruct(vae, images)
    ious, far, spots, spot_images = [], 0, 0, 0
    for real, rec in zip(images, recon):
        ious.append(edge_scores(rec, real)[0])
        edges = canny_edges(real) > 0
        # distance of every pixel to the nearest edge pixel of the real image
        dist = cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 3) if edges.any() \
            else np.full(edges.shape, np.inf, np.float32)
        away = dist >= edge_margin
        bad = (np.abs(rec.astype(np.int16) - real.astype(np.int16)).max(-1) > SPOT_LEVELS) & away
        far, spots, spot_images = far + int(away.sum()), spots + int(bad.sum()), spot_images + int(bad.any())
    err = np.abs(recon.astype(np.float32) - images.astype(np.float32))
    return {"canny_iou_real_vs_reconstruction": float(np.mean(ious)),
            f"off_edge_pixels_off_by_more_than_{SPOT_LEVELS}": spots / max(far, 1),
            "images_with_an_off_edge_spot": spot_images / len(images),
            "mean_abs_error_levels": float(err.mean()), "n": len(images), "edge_margin_px": edge_margin}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report (default reports/tiny_sd_quality.json; with --vae-only, none)")
    parser.add_argument("--grid", type=Path, default=Path("reports/tiny_sd_samples.png"))
    parser.add_argument("--vae-n", type=int, default=256, help="validation scenes for the autoencoder rows")
    parser.add_argument("--edge-margin", type=int, default=2, help="pixels from a Canny edge that count as off-edge")
    parser.add_argument("--vae-only", action="store_true", help="only the autoencoder rows (fast); prints, writes --out only if given")
    parser.add_argument("--vae", type=Path, default=None, help="with --vae-only: an AutoencoderKL folder instead of the pipeline's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-short", action="store_true", help="skip the short-prompt row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.vae_only and args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval()
        val_images = np.stack([make_scene(seed).image for seed in split_seeds("val", args.vae_n)])
        print(json.dumps({"vae": str(args.vae), "vae (val)": vae_rows(vae, val_images, args.edge_margin)}, indent=2))
        return
    pipe = load_tiny_sd(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    val_images = np.stack([make_scene(seed).image for seed in split_seeds("val", args.vae_n)])
    vae_report = vae_rows(pipe.vae, val_images, args.edge_margin)
    if args.vae_only:
        report = {"pipeline": str(args.pipeline), "vae (val)": vae_report}
        print(json.dumps(report, indent=2))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
        return
    classifier = load_oracle("classifier")
    pool = max(args.n, args.n_real)
    # + n held-out scenes: the FID a perfect sampler would get with this many samples (the floor).
    scenes = [make_scene(seed) for seed in split_seeds("test", pool + args.n)]
    prompted = scenes[: args.n]
    captions = [s.caption for s in prompted]

    start, samples = time.time(), []
    for i in tqdm(range(0, args.n, args.batch), desc="sampling"):
        out = pipe(captions[i : i + args.batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(i))
        samples.append((out.images * 255).round().astype(np.uint8))
    samples = np.concatenate(samples)
    seconds_per_image = (time.time() - start) / args.n

    labels = scene_labels(prompted)
    sample_scores = prompt_recognition(classifier.predict(images_to_tensor(samples)), labels)
    real_images = images_to_tensor(np.stack([s.image for s in prompted]))
    real_pred = classifier.predict(real_images)
    shuffled = {k: np.roll(v, 1, axis=0) for k, v in labels.items()}  # each image gets its neighbour's caption
    chance = prompt_recognition(real_pred, shuffled)
    real_upper = prompt_recognition(real_pred, labels)

    real_all = images_to_tensor(np.stack([s.image for s in scenes[: args.n_real]]))
    half = len(real_all) // 2
    fid = frechet_distance(classifier.features(images_to_tensor(samples)), classifier.features(real_all))
    fid_real = frechet_distance(classifier.features(real_all[:half]), classifier.features(real_all[half:]))
    held_out = images_to_tensor(np.stack([s.image for s in scenes[pool:]]))
    fid_floor = frechet_distance(classifier.features(held_out), classifier.features(real_all))

    short_scores = None
    if not args.no_short:
        shorts = [short_prompt(s) for s in prompted]
        short_samples = []
        for i in tqdm(range(0, args.n, args.batch), desc="short prompts"):
            out = pipe(shorts[i : i + args.batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                       height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(i))
            short_samples.append((out.images * 255).round().astype(np.uint8))
        short_labels = scene_labels([SimpleNamespace(shapes=s.shapes[:1], background=s.background) for s in prompted])
        pred = classifier.predict(images_to_tensor(np.concatenate(short_samples)))
        scores = prompt_recognition(pred, short_labels)
        short_scores = {"example": shorts[0], **{k: scores[k] for k in
                        ("prompted_kinds_recognized", "prompted_colors_recognized", "prompted_pairs_recognized")}}

    report = {
        "pipeline": str(args.pipeline), "n": args.n, "steps": args.steps, "guidance": args.guidance,
        "samples": sample_scores, SHORT_PROMPTS: short_scores, "vae (val)": vae_report,
        "chance (real images, shuffled captions)": chance,
        "real images, own captions": real_upper,
        "shapes_fid_samples_vs_real": fid, f"shapes_fid_real_vs_real ({half} vs {half})": fid_real,
        f"shapes_fid_real_vs_real ({args.n} held-out vs {len(real_all)}, the floor at this n)": fid_floor,
        "seconds_per_image": seconds_per_image,
        "vocabulary": {"shapes": len(SHAPES), "colors": len(COLORS), "backgrounds": len(BACKGROUNDS)},
    }
    report["v3 floors"] = floors(report)
    args.out = args.out or Path("reports/tiny_sd_quality.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    missed = [row["floor"] for row in report["v3 floors"] if row["met"] is False]
    print("v3's floors: " + (f"{len(missed)} missed: {'; '.join(missed)}" if missed else "every one met"))
    save_caption_grid(samples[:16], captions[:16], args.grid)


def save_caption_grid(images: np.ndarray, captions: list[str], path: Path, scale: int = 3):
    """Samples upscaled with their captions underneath, 4 per row."""
    import cv2

    tiles = []
    for image, caption in zip(images, captions):
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        text = np.full((44, big.shape[1], 3), 255, np.uint8)
        words, lines = caption.split(), [""]
        for word in words:  # wrap at ~30 characters
            lines[-1:] = [lines[-1] + " " + word] if len(lines[-1]) + len(word) < 30 else [lines[-1], word]
        for j, line in enumerate(lines[:4]):
            cv2.putText(text, line.strip(), (2, 10 + 11 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([big, text]))
    rows = [np.concatenate(tiles[i : i + 4], 1) for i in range(0, len(tiles), 4)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate(rows)[:, :, ::-1])


if __name__ == "__main__":
    main()
