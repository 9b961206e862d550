"""Is the tiny model really a text-to-image model? Measured with the shapes-world classifier.

    python scripts/evaluate_tiny_sd.py [--pipeline assets/tiny-sd] [--n 200] [--out reports/tiny_sd_quality.json]

Generates one sample per held-out test caption (fixed seeds), asks the classifier
oracle what it sees, and reports how often the prompted shape kinds, colours and
background are recognized, beside the chance level: the same rates for real test
images paired with another scene's caption (what matching the data's prior alone
achieves). Also the shapes-FID of samples against real test images (classifier
features) and a caption/sample grid.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from orthodiff.data.shapes import BACKGROUNDS, COLORS, SHAPES, make_scene, split_seeds
from orthodiff.eval.image_metrics import prompt_recognition
from orthodiff.eval.metrics import frechet_distance
from orthodiff.eval.oracles import images_to_tensor, load_oracle, scene_labels
from orthodiff.models.tiny_sd import TINY_SD_PATH, load_tiny_sd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("reports/tiny_sd_quality.json"))
    parser.add_argument("--grid", type=Path, default=Path("reports/tiny_sd_samples.png"))
    args = parser.parse_args()

    pipe = load_tiny_sd(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_oracle("classifier")
    scenes = [make_scene(seed) for seed in split_seeds("test", max(args.n, args.n_real))]
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

    report = {
        "pipeline": str(args.pipeline), "n": args.n, "steps": args.steps, "guidance": args.guidance,
        "samples": sample_scores, "chance (real images, shuffled captions)": chance,
        "real images, own captions": real_upper,
        "shapes_fid_samples_vs_real": fid, f"shapes_fid_real_vs_real ({half} vs {half})": fid_real,
        "seconds_per_image": seconds_per_image,
        "vocabulary": {"shapes": len(SHAPES), "colors": len(COLORS), "backgrounds": len(BACKGROUNDS)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
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
