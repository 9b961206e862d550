"""DDIM sampling with classifier-free guidance, as a plain function."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


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
    context = torch.cat([uncond, text])
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        pred_uncond, pred_text = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(pred_uncond + guidance * (pred_text - pred_uncond), t, latents).prev_sample
    return latents
