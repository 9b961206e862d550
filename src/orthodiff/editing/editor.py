"""An edit: a frozen model, a neutral and an attribute prompt, and a DDIM sampler whose
text encoding moves from one prompt to the other by a per-step schedule lambda_t.

    model = load_edit_model(base, adapter)               # any base the project loads, +- an adapter
    edit = Edit(model, "a red square on a black background", "a red square on a white background")
    noise = model.noise(seed=0)
    learned = edit.learn(noise, objective, 40, adaptive=True)   # Adam on the steps' lambdas
    images = edit.render(noise, learned.lambdas)         # (N, 3, H, W), decoded, unclamped
    noise, uncond = edit.invert(image)                   # a real image: edit it from this noise ...
    images = edit.render(noise, learned.lambdas, uncond) # ... guided from its null-text encodings
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
from orthodiff.editing.schedule import default_switches, paper_schedule, switch_schedule
from orthodiff.models.base import load_base_model, resolve_pretrained
from orthodiff.models.tiny_sd import TINY_SD_PATH

log = logging.getLogger(__name__)
# Adam steps without a 0.1 % better schedule before the adaptive learner gives up on one: on
# tiny SD v3 the blue -> yellow triangle edit on white sat at loss 0.955 for all 40 steps of its cap.
PATIENCE = 5


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
class Learned:
    """What Edit.learn returns, per schedule (one column per sample, or one for the batch)."""

    lambdas: torch.Tensor  # (steps,) one for the batch, or (steps, N) one per sample
    start: list[str]       # what each began from: "init" or "switch k=..." (adaptive)
    loss: list[float]      # the objective of the schedule returned ...
    passed: list[bool]     # ... and whether its edit passes (objective.passed)
    iterations: list[int]  # the Adam steps each took
    history: list[dict]    # per Adam step: mean loss parts of the schedules it updated, how many, seconds
    seconds: float         # all of it: the neutral render, the switch sweep (adaptive), the steps


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
              reference: torch.Tensor | None = None, adaptive: bool = False,
              switches: list[int] | None = None) -> Learned:
        """The schedule minimizing objective.loss(edited) against the neutral image (the
        lambda = 1 sample from `noise`, or `reference`, a real image), by Adam over the
        unconstrained lambdas. An `init` (steps,) learns one schedule for the batch (mean
        loss); (steps, N) one per sample at once: the losses are summed, so each column gets
        the gradient of its own loss and Adam (elementwise) runs as it would for that sample
        alone. Two budgets:

        - the paper's (adaptive=False): `iterations` Adam steps from `init` (default the
          paper's, lambda = 1 for the first 40 % of steps); the last schedule is returned.
        - adaptive: each schedule starts from the best of `init` and the hard switches at
          `switches` (default_switches) and keeps the best schedule it has evaluated; it
          stops once the direction score passes (an evaluated schedule's edit passes and its
          direction term is at most objective.direction_mark), after `iterations` Adam steps,
          or after PATIENCE steps that did not better its best. "Best" ranks a schedule whose
          edit passes (objective.passed) above one whose edit does not, then the lower loss:
          the loss weighs a missed attribute against lost content on one scale, the pass
          mark says whether the edit is made at all. Every start is evaluated, so what it
          returns ranks at least as high as the best switch and the paper's init.
        """
        if iterations < 0:
            raise ValueError(f"iterations={iterations}: must be >= 0")
        started = time.perf_counter()
        if reference is None:
            with torch.no_grad():
                reference = self.render(noise, torch.ones(self.steps), uncond)
        init = (paper_schedule(self.steps) if init is None else init).float().to(self.model.device)
        shared = init.ndim == 1
        lambdas = init[:, None].clone() if shared else init.clone()
        columns = lambdas.shape[1]
        prepared = None

        def evaluate(schedules: torch.Tensor, active: list[int], grad: bool):
            """Loss parts and passes of the schedules (steps, len(active)) of columns `active`."""
            nonlocal prepared
            pick = slice(None) if shared else active
            if prepared != active:  # the objective compares each image with its own neutral
                objective.prepare(reference[pick])
                prepared = active
            extra = None if uncond is None else [u[pick] if len(u) == len(noise) else u for u in uncond]
            with torch.set_grad_enabled(grad):
                images = self.render(noise[pick], schedules[:, 0] if shared else schedules, extra)
                parts = objective.loss(images)
            passed = torch.as_tensor(objective.passed(images.detach()), device=images.device)
            if shared:
                return {k: v.mean()[None] for k, v in parts.items()}, passed.all()[None]
            return parts, passed

        everyone = list(range(columns))
        best, start = lambdas.clone(), ["init"] * columns
        best_loss, best_passed = torch.full((columns,), float("inf")), torch.zeros(columns, dtype=torch.bool)
        settled = torch.zeros(columns, dtype=torch.bool)

        def keep(schedules, active, parts, passed, name=None) -> torch.Tensor:
            """Keep the better schedules; returns where they bettered the best by more than noise."""
            loss, passed = parts["loss"].detach().cpu(), passed.cpu()
            settled[active] |= passed & (parts["direction"].detach().cpu() <= objective.direction_mark)
            mine, mine_passed = best_loss[active], best_passed[active]
            better = (passed & ~mine_passed) | ((passed == mine_passed) & (loss < mine))
            for j in better.nonzero().flatten().tolist():
                column = active[j]
                best[:, column], best_loss[column], best_passed[column] = schedules[:, j].detach(), loss[j], passed[j]
                if name:
                    start[column] = name
            return (passed & ~mine_passed) | ((passed == mine_passed) & (loss < mine - 1e-3 * mine.abs()))

        if adaptive:
            candidates = {"init": lambdas}
            for k in default_switches(self.steps) if switches is None else switches:
                switch = switch_schedule(self.steps, k).to(lambdas)[:, None].expand(-1, columns)
                if not torch.equal(switch, lambdas):  # the paper's init is a switch itself
                    candidates[f"switch k={k}"] = switch
            for name, schedules in candidates.items():
                parts, passed = evaluate(schedules, everyone, False)
                keep(schedules, everyone, parts, passed, name)
            lambdas = best.clone()
        lambdas.requires_grad_(True)
        optimizer = torch.optim.Adam([lambdas], lr=lr)
        active = [c for c in everyone if not settled[c]]
        taken, stale, history = [0] * columns, torch.zeros(columns, dtype=torch.long), []
        for iteration in range(iterations + 1):
            if not active:
                break
            tick = time.perf_counter()
            last = iteration == iterations  # evaluated, not updated
            parts, passed = evaluate(lambdas[:, active], active, not last)
            if adaptive:
                progress = keep(lambdas[:, active], active, parts, passed)
                stale[active] = torch.where(progress, 0, stale[active] + 1)
            else:
                best_loss[active], best_passed[active] = parts["loss"].detach().cpu(), passed.cpu()
            learning = (~settled[active] & (stale[active] <= PATIENCE) if adaptive
                        else torch.ones(len(active), dtype=torch.bool)).to(passed.device)
            if last or not learning.any():
                break
            optimizer.zero_grad()
            parts["loss"][learning].sum().backward()
            optimizer.step()
            history.append({"iteration": iteration, **{k: float(v.detach().mean()) for k, v in parts.items()},
                            "learning": int(learning.sum()), "seconds": round(time.perf_counter() - tick, 3)})
            log.info("iteration %d: loss %.4f (content %.4f, direction %.4f), %d learning, %.1f s", iteration,
                     history[-1]["loss"], history[-1]["content"], history[-1]["direction"], history[-1]["learning"],
                     history[-1]["seconds"])
            active = [c for c, go in zip(active, learning.tolist()) if go]
            for column in active:
                taken[column] += 1
        result = (best if adaptive else lambdas.detach()).clone()
        return Learned(result[:, 0] if shared else result, start, best_loss.tolist(), best_passed.tolist(), taken,
                       history, time.perf_counter() - started)

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
