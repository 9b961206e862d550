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
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from orthodiff.data.shapes import read_metadata, write_dataset
from orthodiff.models.tiny_sd import (
    build_clip_tokenizer, build_text_encoder, build_unet, build_vae, sampling_scheduler, training_scheduler,
)

ROOT = Path(__file__).resolve().parents[1]


def atomic_save(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_images(split_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """All images of a split as uint8 (N, 3, 64, 64) and their captions."""
    records = read_metadata(split_dir)
    images = np.stack([cv2.imread(str(split_dir / r["file_name"]))[:, :, ::-1] for r in tqdm(records, desc="read images")])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [r["text"] for r in records]


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


def train_vae(cfg, images: torch.Tensor, cache: Path):
    final = cache / "vae_final.pt"
    if cfg.init_from:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae", torch_dtype=torch.float32)
    vae = build_vae(cfg.vae.channels, cfg.vae.latent_channels)
    if final.exists():
        vae.load_state_dict(torch.load(final))
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae.steps)
    ckpt = Checkpointer(cache / "vae.pt", cfg.checkpoint_every_s, model=vae, opt=opt, sched=sched)
    step = ckpt.resume()
    gen = torch.Generator().manual_seed(cfg.seed + step)
    bar = tqdm(range(step, cfg.vae.steps), initial=step, total=cfg.vae.steps, desc="vae")
    for step in bar:
        x = to_unit(images[torch.randint(len(images), (cfg.vae.batch_size,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # L1 keeps flat colours exact; MSE adds a push on large colour errors.
        rec_loss = (recon - x).abs().mean() + F.mse_loss(recon, x)
        loss = rec_loss + cfg.vae.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec_loss.item():.4f}")
        ckpt.maybe_save(step + 1)
    vae.eval()
    with torch.no_grad():
        x = to_unit(images[:16])
        save_grid(torch.cat([x, vae.decode(vae.encode(x).latent_dist.mode()).sample]), cache / "vae_recon.png")
    atomic_save(vae.state_dict(), final)
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


def train_unet(cfg, tokenizer, moments, scaling_factor, captions, cache: Path):
    text_encoder = build_text_encoder(cfg.text_encoder.hidden, cfg.text_encoder.layers, cfg.text_encoder.heads)
    unet = build_unet(cfg.unet.channels, cfg.text_encoder.hidden, cfg.unet.attention_heads)
    if cfg.init_from:  # a checkpoint in cache_dir, if any, overrides this below
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        init = Path(cfg.init_from)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(init / "text_encoder").state_dict())
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = AveragedModel(models, multi_avg_fn=get_ema_multi_avg_fn(cfg.unet.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(models.parameters(), lr=cfg.unet.lr, weight_decay=0.01)
    warmup = lambda s: min(1.0, (s + 1) / cfg.unet.warmup_steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    ckpt = Checkpointer(cache / "unet.pt", cfg.checkpoint_every_s, model=models, ema=ema, opt=opt, sched=sched)
    start = ckpt.resume()
    noise_scheduler = training_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    token_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(cfg.seed + 1 + start)
    latent_channels = moments.shape[1] // 2
    bar = tqdm(range(start, cfg.unet.steps), initial=start, total=cfg.unet.steps, desc="unet")
    for step in bar:
        idx = torch.randint(len(moments), (cfg.unet.batch_size,), generator=gen)
        m = moments[idx].float()
        latents = (m[:, :latent_channels] + m[:, latent_channels:] * torch.randn(m[:, :latent_channels].shape, generator=gen)) * scaling_factor
        ids = token_ids[idx].clone()
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
        bar.set_postfix(loss=f"{loss.item():.4f}")
        ckpt.maybe_save(step + 1)
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
]


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain_tiny_sd")
def main(cfg: DictConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cache = Path(os.path.expanduser(cfg.cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    data_dir, out_dir = ROOT / cfg.data_dir, ROOT / cfg.out_dir
    write_dataset(data_dir, cfg.train_size)  # no-op when the same dataset is already there
    tokenizer_dir = Path(cfg.init_from) / "tokenizer" if cfg.init_from else cache / "tokenizer"
    if not (tokenizer_dir / "vocab.json").exists():
        if cfg.bpe_vocab is None:
            raise SystemExit("pretrain_tiny_sd: pass bpe_vocab=<path to bpe_simple_vocab_16e6.txt.gz> (see README)")
        build_clip_tokenizer(Path(cfg.bpe_vocab), tokenizer_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    images, captions = load_images(data_dir / "train")
    start = time.time()
    vae = train_vae(cfg, images, cache)
    moments, scaling_factor = encode_latents(vae, images, cache)
    print(f"vae ready ({time.time() - start:.0f}s this run), latent scaling factor {scaling_factor:.4f}")
    for step, ema_models in train_unet(cfg, tokenizer, moments, scaling_factor, captions, cache):
        pipe = make_pipeline(vae, ema_models, tokenizer, scaling_factor)
        pipe.set_progress_bar_config(disable=True)
        samples = pipe(SAMPLE_PROMPTS, num_inference_steps=25, guidance_scale=cfg.unet.guidance_scale, output_type="pt",
                       height=64, width=64, generator=torch.Generator().manual_seed(0)).images
        save_grid(samples * 2 - 1, cache / f"samples_{step:06d}.png")
        print(f"step {step}: samples in {cache}/samples_{step:06d}.png", flush=True)
    export_pipeline(pipe, tokenizer_dir, out_dir)
    print(f"done in {time.time() - start:.0f}s this run; pipeline in {out_dir}; config:\n{OmegaConf.to_yaml(cfg)}")


if __name__ == "__main__":
    main()
