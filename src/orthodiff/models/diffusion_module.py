"""What every finetuning of a frozen Stable Diffusion model shares: loading and freezing
the base model, adapting its UNet (OFT/COFT, LoRA, full finetuning or nothing), cached
text and latent encodings, the diffusion loss, COFT's projection after each step and
checkpoints holding the trainable tensors only.

ControlModule (controllable generation) and SubjectModule (subject-driven generation)
build on it. A subclass calls, in its __init__:

    super().__init__()
    self.save_hyperparameters(ignore=["optimizer"])
    self.load_base(pretrained, original_config)
    ...                                   # anything that must see the unadapted UNet
    self.adapt(adapter, optimizer)
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from orthodiff.models.base import load_base_model
from orthodiff.models.methods import adapt_unet, target_fingerprint, target_layers
from orthodiff.oft import DEFAULT_TARGETS, OFTConfig, project_coft


class NonFiniteLossError(RuntimeError):
    pass


class DiffusionModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.validated_at = -1  # global step of the last validation
        self.validation_history: list[dict] = []  # {"step", metric: value} per validation: convergence

    def load_base(self, pretrained: str, original_config: str | None = None) -> None:
        base = load_base_model(pretrained, original_config=original_config)
        self.vae, self.text_encoder, self.unet = base.vae, base.text_encoder, base.unet
        self.tokenizer, self.noise_scheduler = base.tokenizer, base.noise_scheduler
        for frozen in (self.vae, self.text_encoder, self.unet):
            frozen.requires_grad_(False)
        self.vae_scale_factor = base.vae_scale_factor
        self.strict_loading = False  # checkpoints hold the trainable tensors only
        self._text_cache: dict[str, torch.Tensor] = {}
        self._latent_cache: dict[int, torch.Tensor] = {}

    def adapt(self, adapter, optimizer=None) -> None:
        """Adapt the UNet with `adapter` (an OFTConfig, LoRAConfig, FullFinetuneConfig or
        None) and remember how to build the optimizer over what is trainable."""
        targets = getattr(adapter, "targets", DEFAULT_TARGETS)
        self.target_fingerprint = target_fingerprint(self.unet, targets)
        self.adapted_layers = target_layers(self.unet, targets) if adapter is not None else []
        adapt_unet(self.unet, adapter)
        self.adapter_config = adapter
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {name: tensor for name, tensor in self.state_dict().items() if name in names}

    # --- frozen parts, with optional caches --------------------------------------------

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            embeddings = self.text_encoder(self.token_ids(missing))[0]
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

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1]."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    # --- training ------------------------------------------------------------------------

    def diffusion_loss(self, latents: torch.Tensor, predict, reduction: str = "mean") -> torch.Tensor:
        """The denoising loss of `predict(noisy_latents, timesteps)` at random timesteps,
        against the scheduler's target (noise or velocity); reduction "none" gives one
        loss per sample."""
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
        loss = F.mse_loss(predict(noisy, timesteps).float(), target.float(), reduction="none")
        return loss.mean() if reduction == "mean" else loss.flatten(1).mean(1)

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {self.global_step}: training stopped; "
                                     "the last checkpoint holds the last good weights (try a lower lr)")

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


def log_image(logger, key: str, image: np.ndarray, step: int):
    """Send an image to wandb or TensorBoard; other loggers (CSV) keep the PNG on disk only."""
    experiment = getattr(logger, "experiment", None)
    kind = type(logger).__name__
    if kind == "WandbLogger":
        logger.log_image(key=key, images=[image], step=step)
    elif kind == "TensorBoardLogger" and experiment is not None:
        experiment.add_image(key, image, step, dataformats="HWC")
