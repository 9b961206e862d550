"""An edit: a frozen model, a neutral and an attribute prompt, and a DDIM sampler whose
text encoding moves from one prompt to the other by a per-step schedule lambda_t.

    model = load_edit_model(base, adapter)               # any base the project loads, +- an adapter
    edit = Edit(model, "a red square on a black background", "a red square on a white background")
    noise = model.noise(seed=0)
    lambdas, history = edit.learn(noise, objective)      # Adam on the steps' lambdas
    images = edit.render(noise, lambdas)                 # (N, 3, H, W), decoded, unclamped
    noise, uncond = edit.invert(image)                   # a real image: edit it from this noise ...
    images = edit.render(noise, lambdas, uncond)         # ... guided from its null-text encodings
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from orthodiff.adapter import load_adapter
from orthodiff.data.prior import base_model_digest
from orthodiff.editing.sampler import denoise, invert, mix, null_text
from orthodiff.editing.schedule import paper_schedule
from orthodiff.models.base import load_base_model, resolve_pretrained
from orthodiff.models.tiny_sd import TINY_SD_PATH

log = logging.getLogger(__name__)


@dataclass
class EditModel:
    """The frozen networks an edit runs through (an adapter, if any, already in the UNet)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    encode_text: Callable[[list[str]], torch.Tensor]  # prompts -> (N, L, D), as the UNet reads them
    scheduler_config: dict
    base_model: str
    adapter: str | None
    digest: str  # of the weights that shape an image: a schedule is valid for these only
    device: torch.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def noise(self, seed: int, n: int = 1) -> torch.Tensor:
        """x_T for `seed`, drawn as DiffusionTask.generate draws it (CPU generator)."""
        side = self.unet.config.sample_size
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((n, self.unet.config.in_channels, side, side), generator=generator).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in about [0, 1], not clamped (the losses clamp with a straight-through gradient)."""
        return (self.vae.decode(latents / self.vae.config.scaling_factor).sample + 1) / 2

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (the posterior mean) of images (N, 3, H, W) in [0, 1]."""
        return self.vae.encode(images.to(self.device) * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor

    @property
    def name(self) -> str:
        return self.base_model + (f" + adapter {self.adapter}" if self.adapter else "")


def load_edit_model(base: str | None = None, adapter: str | None = None, device: str = "cpu") -> EditModel:
    """The tiny SD by default; `base` any model load_base_model reads (diffusers folder,
    single file, hub id); `adapter` an orthodiff adapter file (OFT/COFT/LoRA/... of a
    control or subject task: its UNet, and a subject's learned token, edit the same way;
    a control network stays off, as without a condition)."""
    if adapter:
        path = Path(adapter).expanduser()
        path = path / "adapter.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"adapter={adapter}: no such adapter file or run directory")
        try:
            module = load_adapter(path, pretrained=base)
        except RuntimeError as error:  # load_base_model's message spans lines
            raise FileNotFoundError(" ".join(str(error).split())) from None
        module.requires_grad_(False).to(device)
        base_model = module.hparams.pretrained

        def encode_text(prompts):
            with torch.no_grad():
                states = module.prompt_states(list(prompts))
            if isinstance(states, list):
                raise ValueError(f"adapter {path} learns one text encoding per cross-attention layer (P+); an "
                                 "edit mixes one encoding per step: use a Textual Inversion or UNet adapter")
            return states

        unet, vae, text_encoder = module.unet, module.vae, module.text_encoder
        scheduler_config = module.noise_scheduler.config
        extra = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        base_model = base or str(TINY_SD_PATH.relative_to(TINY_SD_PATH.parents[1]))
        try:
            parts = load_base_model(resolve_pretrained(base_model))
        except RuntimeError as error:
            raise FileNotFoundError(" ".join(str(error).split())) from None
        unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
        for network in (unet, vae, text_encoder):
            network.requires_grad_(False).to(device).eval()
        scheduler_config = parts.noise_scheduler.config

        @torch.no_grad()
        def encode_text(prompts):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids.to(device))[0]

        extra = ""
    digest = hashlib.sha256((base_model_digest(_Parts(unet, text_encoder, vae)) + extra).encode()).hexdigest()[:16]
    return EditModel(unet=unet, vae=vae, encode_text=encode_text, scheduler_config=scheduler_config,
                     base_model=base_model, adapter=str(adapter) if adapter else None, digest=digest,
                     device=torch.device(device))


@dataclass
class _Parts:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module


class Edit:
    """A neutral -> attribute edit on `model` with DDIM (eta 0), `steps` steps and
    classifier-free guidance `guidance`; `checkpoint` recomputes each sampling step (and
    the VAE decoder's blocks) in the backward pass, so memory does not grow with steps."""

    def __init__(self, model: EditModel, neutral: str, attribute: str, steps: int = 50, guidance: float = 7.5,
                 checkpoint: bool = True):
        for name, prompt in (("prompt", neutral), ("attribute", attribute)):
            if not prompt or not prompt.strip():
                raise ValueError(f"{name}= is empty: give the {'neutral' if name == 'prompt' else 'attribute'} prompt")
        if steps < 1:
            raise ValueError(f"steps={steps}: must be at least 1")
        self.model, self.prompts, self.steps, self.guidance = model, (neutral, attribute), steps, guidance
        self.checkpoint = checkpoint
        self.neutral, self.attribute, self.empty = (model.encode_text([p]) for p in (neutral, attribute, ""))
        if checkpoint and hasattr(model.vae, "enable_gradient_checkpointing"):
            model.vae.enable_gradient_checkpointing()

    def render(self, noise: torch.Tensor, lambdas: torch.Tensor, uncond: list[torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Images (N, 3, H, W) from `noise` (N, C, h, w) under schedule `lambdas` ((steps,) or
        (steps, N)); differentiable in the lambdas when gradients are on. `uncond`: the
        per-step unconditional encodings of an inverted image (see invert), else the empty
        prompt's."""
        if lambdas.shape[0] != self.steps:
            raise ValueError(f"the schedule has {lambdas.shape[0]} lambdas; this edit samples {self.steps} steps")
        n = len(noise)
        neutral, attribute = self.neutral.expand(n, -1, -1), self.attribute.expand(n, -1, -1)
        if uncond is None:
            uncond = self.empty.expand(n, -1, -1)
        elif len(uncond[0]) != n:  # one inverted image, several schedules
            uncond = [u.expand(n, -1, -1) for u in uncond]
        states = mix(lambdas.to(self.model.device), neutral, attribute)
        latents = denoise(self.model.unet, self.model.scheduler_config, noise, states, uncond, self.guidance,
                          checkpoint=self.checkpoint)
        return self.model.decode(latents)

    def learn(self, noise: torch.Tensor, objective, iterations: int = 10, lr: float = 0.05,
              init: torch.Tensor | None = None, uncond: list[torch.Tensor] | None = None,
              reference: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
        """The schedule minimizing objective.loss(edited) against the neutral image (the
        lambda = 1 sample from `noise`, or `reference`, a real image): Adam over the
        unconstrained lambdas, from `init` (the paper's: 1 for the first 40 % of steps).
        An `init` of shape (steps, N) learns one schedule per sample of the batch at once;
        the batch's losses are summed, so each column gets the gradient of its own loss and
        Adam (elementwise) runs as it would for that sample alone. Returns the schedule
        after the last step and the mean losses of every iteration (iteration k's are
        those of the schedule before its update)."""
        if iterations < 0:
            raise ValueError(f"iterations={iterations}: must be >= 0")
        if reference is None:
            with torch.no_grad():
                reference = self.render(noise, torch.ones(self.steps), uncond)
        objective.prepare(reference)
        lambdas = (paper_schedule(self.steps) if init is None else init).clone().float().to(self.model.device)
        lambdas.requires_grad_(True)
        optimizer = torch.optim.Adam([lambdas], lr=lr)
        history = []
        for iteration in range(iterations):
            started = time.perf_counter()
            optimizer.zero_grad()
            parts = objective.loss(self.render(noise, lambdas, uncond))
            (parts["loss"] * (len(noise) if lambdas.ndim == 2 else 1)).backward()
            optimizer.step()
            history.append({"iteration": iteration, **{k: float(v.detach()) for k, v in parts.items()},
                            "seconds": round(time.perf_counter() - started, 3)})
            log.info("iteration %d: loss %.4f (content %.4f, direction %.4f), %.1f s", iteration, history[-1]["loss"],
                     history[-1]["content"], history[-1]["direction"], history[-1]["seconds"])
        return lambdas.detach(), history

    def invert(self, images: torch.Tensor, refine: int = 5, null_iterations: int = 10
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(noise, per-step unconditional encodings) from which the neutral prompt's guided
        chain redraws `images` (N, 3, H, W) in [0, 1]: DDIM inversion without guidance (the
        only setting in which it is exact; `refine` fixed-point rounds per step), then
        null-text inversion so that the chain at this edit's guidance retraces it."""
        latents = self.model.encode_image(images)
        n = len(latents)
        neutral, empty = self.neutral.expand(n, -1, -1), self.empty.expand(n, -1, -1)
        with torch.no_grad():
            trajectory = invert(self.model.unet, self.model.scheduler_config, latents, neutral, empty, self.steps,
                                guidance=1.0, refine=refine)
        uncond = null_text(self.model.unet, self.model.scheduler_config, trajectory, neutral, empty, self.guidance,
                           null_iterations)
        return trajectory[-1], uncond
