"""Pretrain the embedded tiny Stable Diffusion on the shapes world, resumably.

    python scripts/pretrain_tiny_sd.py bpe_vocab=/path/to/bpe_simple_vocab_16e6.txt.gz

Stages, each skipped when its output exists, each resumable from checkpoints in
cache_dir (atomic writes): dataset on disk -> tokenizer -> VAE -> latents cache ->
text encoder + UNet (v-prediction, optional min-SNR weighting, EMA, sample grids) ->
export of the EMA weights as a diffusers StableDiffusionPipeline folder in fp16.

`init_from=<pipeline folder>` (e.g. assets/tiny-sd) warm-starts from exported weights: its
tokenizer and VAE are used as they are and the UNet stage starts from its UNet and text
encoder. The machines this runs on do not keep ~/.cache between sessions, so the shipped
pipeline is the checkpoint that survives.

`unet_width=0.5|2` trains a rung of the width ladder: only a UNet, from scratch, at that
multiple of v3's channels, on the frozen VAE, tokenizer and text encoder of `ladder.base`
(the shipped v3), so that width is the only difference (conf/pretrain_tiny_sd.yaml).
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import cv2
import hydra
import numpy as np
import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from orthodiff.data.shapes import read_metadata, write_dataset
from orthodiff.files import atomic_path
from orthodiff.models.tiny_sd import (
    build_clip_tokenizer,
    build_text_encoder,
    build_unet,
    build_vae,
    sampling_scheduler,
    training_scheduler,
    width_tag,
)

ROOT = Path(__file__).resolve().parents[1]
LADDER_WIDTHS = (0.5, 2)  # unet_width's rungs besides the shipped 1


def atomic_save(obj, path: Path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_images(split_dir: Path) -> tuple[torch.Tensor, list[dict]]:
    """All images of a split as uint8 (N, 3, 64, 64) and their metadata records
    (caption in "text", the scene's "shapes" and "background")."""
    records = read_metadata(split_dir)
    images = np.stack([cv2.imread(str(split_dir / r["file_name"]))[:, :, ::-1] for r in tqdm(records, desc="read images")])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), records


# ---- caption augmentation (recipe v3): the parts of a description, not only the template
NUMBERS = {2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "shape": "shapes"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def augment_caption(shapes: list[dict], background: str, rng: np.random.Generator, p) -> str:
    """A caption of the scene that a person might type: the full template with probability
    p.full_prob, otherwise a shorter or reordered description of the same scene built from
    its metadata. Everything said stays true; things may be left out:
    some shapes (often all but one: "a red circle" of three), the colours ("a circle and a
    square"), the kinds ("red and blue shapes"), both ("three shapes"), the background clause
    (or its short form "on black"); shapes may be listed out of z-order; repeated kinds
    become plurals ("two circles on white")."""
    if rng.random() < p.full_prob:
        return None  # the dataset's own caption
    named = list(shapes)
    if len(named) > 1 and rng.random() < p.subset_prob:
        k = 1 if rng.random() < p.one_of_several_prob else int(rng.integers(1, len(named)))
        named = [named[i] for i in sorted(rng.choice(len(named), k, replace=False))]
    if len(named) > 1 and rng.random() < p.shuffle_prob:
        named = [named[i] for i in rng.permutation(len(named))]
    r = rng.random()
    if r < p.get("count_only_prob", 0.0):  # "three shapes", "a shape"
        text = f"{NUMBERS[len(named)]} shapes" if len(named) > 1 else "a shape"
    elif r < p.get("count_only_prob", 0.0) + p.drop_kind_prob:  # "a red shape", "red and blue shapes"
        colors = [s["color"] for s in named]
        text = f"{_article(colors[0])} {colors[0]} shape" if len(colors) == 1 else _listing(colors) + " shapes"
    else:
        keep_color = rng.random() >= p.drop_color_prob
        words = [f"{s['color']} {s['kind']}" if keep_color else s["kind"] for s in named]
        counts: dict[str, int] = {}
        for w in words:  # group repeats ("two circles"), keeping first-mention order
            counts[w] = counts.get(w, 0) + 1
        phrases = [f"{_article(w)} {w}" if n == 1 else f"{NUMBERS[n]} {PLURALS[w]}" for w, n in counts.items()]
        text = _listing(phrases)
    r = rng.random()
    if r < p.background_full_prob:
        text += f" on {_article(background)} {background} background"
    elif r < p.background_full_prob + p.background_short_prob:
        text += f" on {background}"
    return text


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8):
    """images in [-1, 1], (N, 3, H, W) -> one PNG."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 2), nrow * (w + 2), 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    cv2.imwrite(str(path), grid[:, :, ::-1])


class Checkpointer:
    """Saves named state-dict holders (model, optimizer, ...) every `every_s` seconds
    and on request; `resume` restores them and returns the step to continue from."""

    def __init__(self, path: Path, every_s: float, **stateful):
        self.path, self.every_s, self.stateful, self.last = path, every_s, stateful, time.time()

    def resume(self) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=False)
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        return state["step"]

    def maybe_save(self, step: int, force=False):
        if force or time.time() - self.last > self.every_s:
            atomic_save({"step": step, **{name: obj.state_dict() for name, obj in self.stateful.items()}}, self.path)
            self.last = time.time()


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(recon: torch.Tensor, x: torch.Tensor, v) -> tuple[torch.Tensor, dict]:
    """Reconstruction loss of recipe v2 (L1 + MSE) plus the v3 terms, each off at weight 0:
    grad_weight: L1 between the horizontal and vertical pixel differences of the
      reconstruction and of the image (edges: a blurred edge loses most of its gradient);
    peak_weight: mean of the worst `peak_fraction` of each image's pixel errors (largest
      channel error): a few wrong pixels (spots) cost little in a mean, everything here."""
    err = (recon - x).abs()
    terms = {"l1": err.mean(), "mse": (recon - x).pow(2).mean()}
    loss = v.get("l1_weight", 1.0) * terms["l1"] + v.get("mse_weight", 1.0) * terms["mse"]
    if v.get("grad_weight", 0):
        (rx, ry), (xx, xy) = image_gradients(recon), image_gradients(x)
        terms["grad"] = (rx - xx).abs().mean() + (ry - xy).abs().mean()
        loss = loss + v.grad_weight * terms["grad"]
    if v.get("peak_weight", 0):
        per_pixel = err.amax(1).flatten(1)
        k = max(1, int(per_pixel.shape[1] * v.peak_fraction))
        terms["peak"] = per_pixel.topk(k, dim=1).values.mean()
        loss = loss + v.peak_weight * terms["peak"]
    return loss, terms


def augment_images(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree turns (the autoencoder should not care about orientation)."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    return x.rot90(int(torch.randint(4, (), generator=gen)), dims=(-2, -1))


def train_vae(cfg, images: torch.Tensor, cache: Path):
    final = cache / "vae_final.pt"
    if cfg.init_from:
        return AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae", torch_dtype=torch.float32)
    v = cfg.vae
    vae = build_vae(v.channels, v.latent_channels, v.get("norm_num_groups", 16), v.get("layers_per_block", 1))
    if final.exists():
        vae.load_state_dict(torch.load(final))
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=v.lr, weight_decay=0.0)
    warmup = v.get("warmup_steps", 0)
    # linear warmup, then cosine to zero (v2: no warmup, plain cosine)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, v.steps - warmup)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ckpt = Checkpointer(cache / "vae.pt", cfg.checkpoint_every_s, model=vae, opt=opt, sched=sched)
    step = ckpt.resume()
    gen = torch.Generator().manual_seed(cfg.seed + step)
    bar = tqdm(range(step, v.steps), initial=step, total=v.steps, desc="vae", mininterval=30)
    start, first = time.time(), step
    for step in bar:
        x = to_unit(images[torch.randint(len(images), (v.batch_size,), generator=gen)])
        if v.get("augment", False):
            x = augment_images(x, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec_loss, terms = vae_loss(recon, x, v)
        loss = rec_loss + v.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if v.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(vae.parameters(), v.grad_clip)
        opt.step()
        sched.step()
        bar.set_postfix({k: f"{t.item():.4f}" for k, t in terms.items()}, refresh=False)
        if (step + 1) % 250 == 0:
            print(f"vae step {step + 1}/{v.steps}: " + " ".join(f"{k} {t.item():.4f}" for k, t in terms.items())
                  + f", {(time.time() - start) / (step + 1 - first):.3f} s/step this run", flush=True)
        ckpt.maybe_save(step + 1)
    vae.eval()
    with torch.no_grad():
        x = to_unit(images[:16])
        save_grid(torch.cat([x, vae.decode(vae.encode(x).latent_dist.mode()).sample]), cache / "vae_recon.png")
    atomic_save(vae.state_dict(), final)
    vae.save_pretrained(cache / "vae")  # for `evaluate_tiny_sd.py --vae-only --vae <cache>/vae`
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, cache: Path) -> tuple[torch.Tensor, float]:
    """Posterior mean and std of every training image (fp16), and SD's latent scaling factor."""
    path = cache / "latents.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["moments"], saved["scaling_factor"]
    vae.eval()
    moments = []
    for start in tqdm(range(0, len(images), 256), desc="encode latents"):
        dist = vae.encode(to_unit(images[start : start + 256])).latent_dist
        moments.append(torch.cat([dist.mean, dist.std], 1).half())
    moments = torch.cat(moments)
    scaling_factor = 1.0 / moments[:, : vae.config.latent_channels].float().std().item()
    atomic_save({"moments": moments, "scaling_factor": scaling_factor}, path)
    return moments, scaling_factor


def train_unet(cfg, tokenizer, moments, scaling_factor, records, cache: Path):
    latent_channels = moments.shape[1] // 2
    width = cfg.get("unet_width", 1)
    text_encoder = build_text_encoder(cfg.text_encoder.hidden, cfg.text_encoder.layers, cfg.text_encoder.heads)
    unet = build_unet([round(c * width) for c in cfg.unet.channels], cfg.text_encoder.hidden, cfg.unet.attention_heads,
                      latent_channels=latent_channels, norm_num_groups=round(32 * width))
    init = Path(cfg.init_from) if cfg.init_from else None
    warm_te = warm_unet = init is not None
    if width != 1:  # a ladder rung: the base's text encoder, frozen; the UNet from scratch
        init, warm_te, warm_unet = ROOT / cfg.ladder.base, True, False
        text_encoder.requires_grad_(False)
    elif init is None and cfg.get("warm_start_from"):
        init = Path(os.path.expanduser(cfg.warm_start_from))
        warm_te, warm_unet = cfg.unet.get("warm_start_text_encoder", True), cfg.unet.get("warm_start_unet", True)
    if init is not None:  # a checkpoint in cache_dir, if any, overrides this below
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        if warm_unet:
            source = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32).state_dict()
            own = unet.state_dict()
            same = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
            unet.load_state_dict(same, strict=False)
            print(f"unet warm-started from {init}: {len(same)}/{len(own)} tensors", flush=True)
        if warm_te:
            text_encoder.load_state_dict(CLIPTextModel.from_pretrained(init / "text_encoder", torch_dtype=torch.float32).state_dict())
            print(f"text encoder warm-started from {init}", flush=True)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = AveragedModel(models, multi_avg_fn=get_ema_multi_avg_fn(cfg.unet.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW([p for p in models.parameters() if p.requires_grad], lr=cfg.unet.lr, weight_decay=0.01)
    warmup = lambda s: min(1.0, (s + 1) / cfg.unet.warmup_steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    ckpt = Checkpointer(cache / "unet.pt", cfg.checkpoint_every_s, model=models, ema=ema, opt=opt, sched=sched)
    start = ckpt.resume()
    noise_scheduler = training_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    captions = [r["text"] for r in records]
    caption_cfg = cfg.unet.get("captions")
    augment = caption_cfg is not None and caption_cfg.full_prob < 1
    token_ids = tokenize(captions)
    empty_ids = tokenize([""])
    gen = torch.Generator().manual_seed(cfg.seed + 1 + start)
    rng = np.random.default_rng(cfg.seed + 1 + start)  # caption augmentation
    bar = tqdm(range(start, cfg.unet.steps), initial=start, total=cfg.unet.steps, desc="unet", mininterval=30)
    timer, first = time.time(), start
    for step in bar:
        idx = torch.randint(len(moments), (cfg.unet.batch_size,), generator=gen)
        m = moments[idx].float()
        mean, std = m[:, :latent_channels], m[:, latent_channels:]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling_factor
        ids = token_ids[idx].clone()
        if augment:
            texts = [augment_caption(records[i]["shapes"], records[i]["background"], rng, caption_cfg) for i in idx.tolist()]
            changed = [j for j, t in enumerate(texts) if t is not None]
            if changed:
                ids[changed] = tokenize([texts[j] for j in changed])
        drop = torch.rand(len(ids), generator=gen) < cfg.unet.empty_prompt_prob
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        loss = (pred - target).pow(2).mean(dim=(1, 2, 3))
        if cfg.unet.min_snr_gamma:
            # min-SNR-gamma weighting for v-prediction: min(snr, gamma) / (snr + 1). It also
            # scales the high-noise steps, where the shape kind is decided, by about snr.
            loss = loss * snr[t].clamp(max=cfg.unet.min_snr_gamma) / (snr[t] + 1)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(models)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ckpt.maybe_save(step + 1)
        if (step + 1) % 100 == 0:
            print(f"unet step {step + 1}/{cfg.unet.steps}: loss {loss.item():.4f}, "
                  f"{(time.time() - timer) / (step + 1 - first):.3f} s/step this run", flush=True)
        if (step + 1) % cfg.unet.sample_every == 0:
            yield step + 1, ema.module
    finished = max(start, cfg.unet.steps)  # a run asked for fewer steps than done only exports
    ckpt.maybe_save(finished, force=True)
    yield finished, ema.module


def make_pipeline(vae, ema_models, tokenizer, scaling_factor):
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=ema_models["text_encoder"], tokenizer=tokenizer, unet=ema_models["unet"],
        scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def export_pipeline(pipe, tokenizer_dir: Path, out_dir: Path):
    """fp16 safetensors (the size budget), loadable by plain `from_pretrained(out_dir)`."""
    pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    pipe.to(torch.float32)
    # transformers loads a checkpoint in its saved dtype unless the config names one, while
    # diffusers casts to float32: without this the text encoder (fp16) and UNet (fp32) clash.
    config_path = out_dir / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2))
    # The slow CLIPTokenizer of transformers 4.x reads vocab.json + merges.txt, not tokenizer.json.
    for name in ("vocab.json", "merges.txt"):
        if (tokenizer_dir / name).resolve() != (out_dir / "tokenizer" / name).resolve():
            shutil.copy(tokenizer_dir / name, out_dir / "tokenizer" / name)


SAMPLE_PROMPTS = [
    "a red circle on a white background", "a blue square on a black background",
    "a green triangle on a light gray background", "a yellow cross on a dark gray background",
    "a purple circle and an orange square on a white background", "a red triangle and a blue cross on a black background",
    "an orange circle on a black background", "a green square, a red circle and a blue triangle on a white background",
    # short prompts (recipe v3's caption augmentation)
    "a red circle", "a red triangle", "a blue square", "a green cross",
    "a square", "two circles on black", "red and blue shapes", "three shapes",
]


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain_tiny_sd")
def main(cfg: DictConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ladder = cfg.unet_width != 1
    if ladder and cfg.unet_width not in LADDER_WIDTHS:
        raise SystemExit(f"pretrain_tiny_sd: unet_width={cfg.unet_width}; the ladder's widths are "
                         f"{', '.join(map(str, LADDER_WIDTHS))} (1 is the shipped v3 recipe)")
    tag = width_tag(cfg.unet_width)
    cache = Path(os.path.expanduser(cfg.ladder.cache_dir.format(width=tag) if ladder else cfg.cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = ROOT / os.path.expanduser(cfg.ladder.out_dir.format(width=tag) if ladder else cfg.out_dir)
    data_dir = ROOT / cfg.data_dir  # an absolute out_dir stays as it is
    write_dataset(data_dir, cfg.train_size)  # no-op when the same dataset is already there
    base = ROOT / cfg.ladder.base if ladder else (Path(cfg.init_from) if cfg.init_from else None)
    tokenizer_dir = base / "tokenizer" if base else cache / "tokenizer"
    warm = Path(os.path.expanduser(cfg.warm_start_from)) if cfg.get("warm_start_from") else None
    if not cfg.init_from and warm is not None and not (tokenizer_dir / "vocab.json").exists():
        # the warm start's tokenizer, copied so that the run no longer needs that folder
        tmp = tokenizer_dir.with_name(".tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tokenizer_dir, ignore_errors=True)  # a partial one (no vocab.json)
        shutil.copytree(warm / "tokenizer", tmp)
        os.replace(tmp, tokenizer_dir)
    if not (tokenizer_dir / "vocab.json").exists():
        if cfg.bpe_vocab is None:
            raise SystemExit("pretrain_tiny_sd: pass bpe_vocab=<path to bpe_simple_vocab_16e6.txt.gz> (see README)")
        build_clip_tokenizer(Path(cfg.bpe_vocab), tokenizer_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    images, records = load_images(data_dir / "train")
    start = time.time()
    vae = train_vae(cfg, images, cache) if not ladder else AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32)
    moments, scaling_factor = encode_latents(vae, images, cache)
    if ladder:  # the base's latent scale, so every rung's UNet sees the same latents
        scaling_factor = vae.config.scaling_factor
    print(f"vae ready ({time.time() - start:.0f}s this run), latent scaling factor {scaling_factor:.4f}")
    for step, ema_models in train_unet(cfg, tokenizer, moments, scaling_factor, records, cache):
        pipe = make_pipeline(vae, ema_models, tokenizer, scaling_factor)
        pipe.set_progress_bar_config(disable=True)
        samples = pipe(SAMPLE_PROMPTS, num_inference_steps=25, guidance_scale=cfg.unet.guidance_scale, output_type="pt",
                       height=64, width=64, generator=torch.Generator().manual_seed(0)).images
        save_grid(samples * 2 - 1, cache / f"samples_{step:06d}.png")
        # the EMA weights so far, a whole pipeline folder (swapped in whole) for evaluate_tiny_sd.py
        latest, tmp = cache / "latest", cache / ".latest.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_pipeline(pipe, tokenizer_dir, tmp)
        shutil.rmtree(latest, ignore_errors=True)
        os.replace(tmp, latest)
        print(f"step {step}: samples in {cache}/samples_{step:06d}.png, pipeline in {latest}", flush=True)
    export_pipeline(pipe, tokenizer_dir, out_dir)
    print(f"done in {time.time() - start:.0f}s this run; pipeline in {out_dir}; config:\n{OmegaConf.to_yaml(cfg)}")


if __name__ == "__main__":
    main()
