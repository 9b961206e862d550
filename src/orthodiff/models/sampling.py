"""DDIM sampling with classifier-free guidance, as a plain function."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


def guided_output(unet, scheduler: DDIMScheduler, latents: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                  t, guidance: float) -> torch.Tensor:
    """The model output at step t with classifier-free guidance: one UNet call on the batch
    stacked as [uncond; text], then uncond + guidance * (text - uncond)."""
    model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
    pred_uncond, pred_text = unet(model_input, t, encoder_hidden_states=torch.cat([uncond, text])).sample.chunk(2)
    return pred_uncond + guidance * (pred_text - pred_uncond)


def guided_step(unet, scheduler: DDIMScheduler, latents: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                t, guidance: float) -> torch.Tensor:
    """One DDIM step from t with classifier-free guidance: `sample`'s step, and the editing
    sampler's (which changes `text` from step to step and recomputes the step in backward)."""
    output = guided_output(unet, scheduler, latents, text, uncond, t, guidance)
    return scheduler.step(output, t, latents).prev_sample


@torch.no_grad()
def sample(unet, scheduler_config, latents: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
           steps: int = 25, guidance: float = 4.0, progress: bool = True) -> torch.Tensor:
    """Denoise `latents` (N, C, h, w) from pure noise with DDIM; returns clean latents.

    `text` / `uncond` are (N, L, D) prompt and empty-prompt embeddings. Any control is
    applied by the caller (ControlInjector) around this call; the UNet sees the batch
    stacked as [uncond; text], and the injector repeats the control to match."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
        latents = guided_step(unet, scheduler, latents, text, uncond, t, guidance)
    return latents


@torch.no_grad()
def generate(unet, vae, scheduler_config, vae_scale_factor: int, encode, context, captions: list[str], seed: int,
             size: tuple[int, int], steps: int, guidance: float, progress: bool = True) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] for `captions`: `sample` from noise seeded with `seed`,
    decoded by `vae`. The training tasks' sampler (validation) and the pipeline's
    `generate`, so that both give the same images.

    `encode(captions)` is what the UNet reads: an encoding (N, L, D), or a list whose first
    entry is the UNet's own argument (P+'s per-layer encodings, Perfusion's [encoding,
    mask]); `context(stacked)` the context its calls run in, given such a list stacked as
    the UNet's batch [uncond; text] (None for an encoding)."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(captions), unet.config.in_channels, height // vae_scale_factor,
                         width // vae_scale_factor), generator=generator).to(unet.device, unet.dtype)
    text, uncond = encode(list(captions)), encode([""] * len(captions))
    stacked = [torch.cat([u, t]) for u, t in zip(uncond, text)] if isinstance(text, list) else None
    with context(stacked):
        first = (lambda states: states[0]) if isinstance(text, list) else (lambda states: states)
        latents = sample(unet, scheduler_config, noise, first(text), first(uncond), steps, guidance, progress)
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1)
