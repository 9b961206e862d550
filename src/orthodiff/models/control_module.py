"""The Lightning module of controllable generation: a frozen Stable Diffusion model whose
UNet is adapted (OFT/COFT by default; LoRA, full finetuning or nothing for the baselines)
and fed by a control network (the hint encoder by default; ControlNet or T2I-Adapter for
the baselines); see models/methods.py.

Trainable = the adapter's tensors + the control network; everything else is frozen.
Checkpoints hold only the trainable tensors (an SD 1.5 OFT checkpoint is ~60 MB, not 4 GB),
and resuming restores them, the optimizer and the step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orthodiff.data.control import CONTROL_CHANNELS, check_control
from orthodiff.eval.control_metrics import ControlScorer, to_uint8
from orthodiff.models.diffusion_module import DiffusionModule, NonFiniteLossError, log_image
from orthodiff.models.methods import ControlInjector, build_control_network
from orthodiff.pipelines.sampling import sample

__all__ = ["ControlModule", "NonFiniteLossError", "image_grid", "log_image"]


class ControlModule(DiffusionModule):
    def __init__(self, pretrained: str = "assets/tiny-sd", control: str = "canny",
                 adapter=None, control_network: str = "hint", method: str | None = None, optimizer=None, empty_prompt_prob: float = 0.1,
                 cache_latents: bool = False, cache_text: bool = True, val_steps: int = 25,
                 val_guidance: float = 4.0, val_seed: int = 0, evaluator: str = "shapes",
                 original_config: str | None = None):
        super().__init__()
        # The frozen networks are loaded here, not passed in, so hparams stay small.
        self.save_hyperparameters(ignore=["optimizer"])
        self.control = check_control(control)
        if control_network is None:
            raise ValueError(f"method {method!r} has no control network: it is a subject-driven method; "
                             "train it with experiment=dreambooth")
        self.load_base(pretrained, original_config)
        # Before the UNet is adapted: ControlNet copies the base UNet's weights.
        self.control_network = build_control_network(control_network, self.unet, CONTROL_CHANNELS[control],
                                                     self.vae_scale_factor)
        self.adapt(adapter, optimizer)
        self.injector = ControlInjector(self.unet, self.control_network)
        self.scorer = None
        self.validation_images: list = []

    def forward(self, noisy_latents, timesteps, text, conditioning):
        with self.injector.control(conditioning.to(noisy_latents.dtype)):
            return self.unet(noisy_latents, timesteps, encoder_hidden_states=text).sample

    def training_step(self, batch, batch_idx):
        if not batch:  # every item of the batch was unreadable and skipped
            return None
        latents = self.encode_images(batch["pixel_values"], batch.get("index"))
        captions = [c if torch.rand(()) >= self.hparams.empty_prompt_prob else "" for c in batch["text"]]
        text = self.encode_text(captions)
        loss = self.diffusion_loss(latents, lambda noisy, t: self(noisy, t, text, batch["conditioning"]))
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    # --- sampling and validation -----------------------------------------------------

    @torch.no_grad()
    def generate(self, captions: list[str], conditioning: torch.Tensor, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None, progress: bool = True) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] from captions and encoded conditions (N, C, H, W)."""
        height, width = conditioning.shape[-2:]
        shape = (len(captions), self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=generator).to(self.device, self.unet.dtype)
        with self.injector.control(conditioning.to(self.device, self.unet.dtype)):
            latents = sample(self.unet, self.noise_scheduler.config, noise, self.encode_text(list(captions)),
                             self.encode_text([""] * len(captions)), steps or self.hparams.val_steps,
                             self.hparams.val_guidance if guidance is None else guidance, progress)
        return self.decode_latents(latents)

    def on_validation_epoch_start(self):
        if self.scorer is None:  # the label space of segmentation comes from the dataset
            dataset = getattr(self.trainer.datamodule, "val_set", None) if self.trainer else None
            self.scorer = ControlScorer(self.control, self.hparams.evaluator, getattr(dataset, "num_classes", None),
                                        getattr(dataset, "ignore_index", None), device=self.device)
        self.scorer.reset()
        self.validation_images = []

    def validation_step(self, batch, batch_idx):
        if not batch:
            return
        generated = self.generate(batch["text"], batch["conditioning"], seed=self.hparams.val_seed + batch_idx)
        self.scorer.update(generated, batch)
        self.validation_images.append((batch["conditioning"].cpu(), generated.cpu(),
                                       ((batch["pixel_values"].cpu() + 1) / 2).clamp(0, 1)))

    def on_validation_epoch_end(self):
        metrics = self.scorer.compute()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self.validated_at = self.global_step
        if self.trainer is None or not self.trainer.sanity_checking:
            self.validation_history.append({"step": self.global_step, **metrics})
        grid = image_grid(self.validation_images)
        if self.trainer is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            out = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(out)
            log_image(self.logger, "val/samples", grid, self.global_step)


def image_grid(rows: list, max_rows: int = 8) -> np.ndarray:
    """The first `max_rows` (condition | sample | ground truth) triples as one uint8 image."""
    conditioning, generated, truth = (torch.cat(parts)[:max_rows] for parts in zip(*rows))
    conditioning = conditioning.expand(-1, 3, -1, -1)  # 1-channel conditions as grey
    gap = torch.ones(len(generated), 3, generated.shape[2], 2)
    tiles = torch.cat([conditioning, gap, generated, gap, truth], dim=3)  # (n, 3, h, 3w + 4)
    tiles = torch.cat([tiles, torch.ones(len(tiles), 3, 2, tiles.shape[3])], dim=2)
    return to_uint8(torch.cat(list(tiles), dim=1)[None, :, :-2])[0]
