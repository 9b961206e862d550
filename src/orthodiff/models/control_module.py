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
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from orthodiff.data.control import CONTROL_CHANNELS, check_control
from orthodiff.eval.control_metrics import ControlScorer, to_uint8
from orthodiff.models.base import load_base_model
from orthodiff.models.methods import (ControlInjector, adapt_unet, build_control_network, target_fingerprint,
                                      target_layers)
from orthodiff.oft import DEFAULT_TARGETS, OFTConfig, oft_layers, project_coft
from orthodiff.pipelines.sampling import sample


class NonFiniteLossError(RuntimeError):
    pass


class ControlModule(pl.LightningModule):
    def __init__(self, pretrained: str = "assets/tiny-sd", control: str = "canny",
                 adapter=None, control_network: str = "hint", method: str | None = None, optimizer=None, empty_prompt_prob: float = 0.1,
                 cache_latents: bool = False, cache_text: bool = True, val_steps: int = 25,
                 val_guidance: float = 4.0, val_seed: int = 0, evaluator: str = "shapes",
                 original_config: str | None = None):
        super().__init__()
        # The frozen networks are loaded here, not passed in, so hparams stay small.
        self.save_hyperparameters(ignore=["optimizer"])
        self.control = check_control(control)
        base = load_base_model(pretrained, original_config=original_config)
        self.vae, self.text_encoder, self.unet = base.vae, base.text_encoder, base.unet
        self.tokenizer, self.noise_scheduler = base.tokenizer, base.noise_scheduler
        for frozen in (self.vae, self.text_encoder, self.unet):
            frozen.requires_grad_(False)
        self.vae_scale_factor = base.vae_scale_factor
        # Before the UNet is adapted: ControlNet copies the base UNet's weights.
        self.control_network = build_control_network(control_network, self.unet, CONTROL_CHANNELS[control],
                                                     self.vae_scale_factor)
        targets = getattr(adapter, "targets", DEFAULT_TARGETS)
        self.target_fingerprint = target_fingerprint(self.unet, targets)
        self.adapted_layers = target_layers(self.unet, targets) if adapter is not None else []
        adapt_unet(self.unet, adapter)
        self.adapter_config = adapter
        self.injector = ControlInjector(self.unet, self.control_network)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.strict_loading = False  # checkpoints hold the trainable tensors only
        self._text_cache: dict[str, torch.Tensor] = {}
        self._latent_cache: dict[int, torch.Tensor] = {}
        self.scorer = None
        self.validation_images: list = []
        self.validated_at = -1  # global step of the last validation
        self.validation_history: list[dict] = []  # {"step", metric: value} per validation: convergence

    # --- frozen parts, with optional caches --------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {name: tensor for name, tensor in self.state_dict().items() if name in names}

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            embeddings = self.text_encoder(ids)[0]
            if not self.hparams.cache_text:
                lookup = dict(zip(missing, embeddings))
                return torch.stack([lookup[c] for c in captions])
            self._text_cache.update(zip(missing, embeddings.cpu()))
        return torch.stack([self._text_cache[c] for c in captions]).to(self.device)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, indices=None) -> torch.Tensor:
        """Latents sampled from the VAE posterior; with cache_latents the posterior's
        mean and std are kept per dataset index (the frozen VAE runs once per image)."""
        if self.hparams.cache_latents and indices is not None:
            indices = [int(i) for i in indices]
            todo = [k for k, i in enumerate(indices) if i not in self._latent_cache]
            if todo:
                dist = self.vae.encode(pixel_values[todo].to(self.vae.dtype)).latent_dist
                for k, moments in zip(todo, torch.cat([dist.mean, dist.std], 1).half().cpu()):
                    self._latent_cache[indices[k]] = moments
            moments = torch.stack([self._latent_cache[i] for i in indices]).to(self.device).float()
            mean, std = moments.chunk(2, dim=1)
            latents = mean + std * torch.randn_like(std)
        else:
            latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    # --- training ------------------------------------------------------------------------

    def forward(self, noisy_latents, timesteps, text, conditioning):
        with self.injector.control(conditioning.to(noisy_latents.dtype)):
            return self.unet(noisy_latents, timesteps, encoder_hidden_states=text).sample

    def training_step(self, batch, batch_idx):
        if not batch:  # every item of the batch was unreadable and skipped
            return None
        latents = self.encode_images(batch["pixel_values"], batch.get("index"))
        captions = [c if torch.rand(()) >= self.hparams.empty_prompt_prob else "" for c in batch["text"]]
        text = self.encode_text(captions)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
        loss = F.mse_loss(self(noisy, timesteps, text, batch["conditioning"]).float(), target.float())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {self.global_step}: training stopped; "
                                     "the last checkpoint holds the last good weights (try a lower lr)")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def on_train_epoch_start(self):
        # The frozen networks stay in eval mode (no dropout in them); the adapted layers
        # train, so OFT's block dropout and LoRA's dropout apply.
        for name in self.adapted_layers:
            self.unet.get_submodule(name).train()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if isinstance(self.adapter_config, OFTConfig) and self.adapter_config.coft:
            project_coft(self.unet)  # COFT: back inside the eps-ball after every step

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = self.trainable_state_dict()

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
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

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


def log_image(logger, key: str, image: np.ndarray, step: int):
    """Send an image to wandb or TensorBoard; other loggers (CSV) keep the PNG on disk only."""
    experiment = getattr(logger, "experiment", None)
    kind = type(logger).__name__
    if kind == "WandbLogger":
        logger.log_image(key=key, images=[image], step=step)
    elif kind == "TensorBoardLogger" and experiment is not None:
        experiment.add_image(key, image, step, dataformats="HWC")

