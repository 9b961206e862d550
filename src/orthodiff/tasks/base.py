"""What every finetuning of a frozen Stable Diffusion model shares: loading and freezing
the base model, adapting its UNet with the method's adapter (models/adapters.py),
cached text and latent encodings, the diffusion loss and the training step, DDIM
sampling, validation with a scorer and a sample grid, the adapter's metadata, and
checkpoints holding the trainable tensors only.

A task (ControlTask, SubjectTask) calls, in its __init__:

    super().__init__()
    self.save_hyperparameters(ignore=["optimizer"])
    self.load_base(pretrained, original_config)
    ...                                   # anything that must see the unadapted UNet
    self.adapt(adapter, optimizer)

and supplies the hooks below the "hooks" line: what conditions the UNet, the text it
reads, extra losses, the latent size of a sample, the scorer, the grid and the adapter
metadata it adds.

Resuming reproduces the uninterrupted run: the training step's random draws (noise,
timesteps, caption dropout, latent sampling, adapter dropout) continue from where the
previous step's ended, whatever ran in between (validation, data loading, a restart):
`random_stream` restores torch's, numpy's and Python's generator states at the start of
each step, and the checkpoint holds them. The data order is the datamodule's
(orthodiff.data.datamodule).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from orthodiff.models.adapters import adapt_unet, target_fingerprint, target_signature
from orthodiff.models.base import load_base_model
from orthodiff.models.sampling import generate
from orthodiff.oft import DEFAULT_TARGETS, target_modules


class NonFiniteLossError(RuntimeError):
    pass


def random_states() -> dict:
    """torch's (CPU and every initialized CUDA device), numpy's and Python's global generator
    states, in types a weights-only checkpoint load accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class DiffusionTask(pl.LightningModule):
    task_name: str  # "control" / "subject": the adapter file's "task"

    def __init__(self):
        super().__init__()
        self.validated_at = -1  # global step of the last validation
        self.validation_history: list[dict] = []  # {"step", metric: value} per validation: convergence
        self.scorer = None
        self.validation_images: list = []
        self.step_random_states: dict | None = None  # where the last training step's random draws ended

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
        """Adapt the UNet with `adapter` (a method's adapter config, models/adapters.py, or
        None) and remember how to build the optimizer over what is trainable."""
        targets = getattr(adapter, "targets", DEFAULT_TARGETS)
        self.target_fingerprint = target_fingerprint(self.unet, targets)
        self.target_signature = target_signature(self.unet, targets)
        self.adapted_layers = target_modules(self.unet, targets) if adapter is not None else []
        adapt_unet(self.unet, adapter)
        self.adapter_config = adapter
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        if self.hparams.get("gradient_checkpointing"):
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> None:
        """Keep fewer activations for backward and recompute the rest there (diffusers' checkpoints,
        use_reentrant=False, so a frozen block's OFT generators still get their gradients): the
        UNet's blocks and those of any trainable diffusers network beside it (a ControlNet)."""
        for net in self.children():
            if getattr(net, "_supports_gradient_checkpointing", False) and (
                    net is self.unet or any(p.requires_grad for p in net.parameters())):
                net.enable_gradient_checkpointing()

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

    # --- the UNet under the task's conditioning ----------------------------------------

    def forward(self, noisy_latents, timesteps, text, condition=None):
        """The UNet's prediction; `text` is an encoding (N, L, D) or, for P+, one per
        cross-attention layer (the first is what the UNet's own argument receives)."""
        with self.unet_context(text, condition):
            first = text[0] if isinstance(text, list) else text
            return self.unet(noisy_latents, timesteps, encoder_hidden_states=first).sample

    def diffusion_loss(self, latents: torch.Tensor, predict, reduction: str = "mean") -> torch.Tensor:
        """The denoising loss of `predict(noisy_latents, timesteps)` at random timesteps,
        against the scheduler's target (noise or velocity); reduction "none" gives one
        loss per sample."""
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  device=self.device)
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

    # --- training ------------------------------------------------------------------------

    @contextlib.contextmanager
    def random_stream(self):
        """Training's own random stream under a Trainer: draws continue from where the
        previous step's ended (or the checkpoint's, after a resume), not from whatever
        validation or data loading drew in between. Outside a Trainer (a hand-written
        loop) the global generators are left as the caller seeds them."""
        if self._trainer is None:
            yield
            return
        if self.step_random_states is not None:
            set_random_states(self.step_random_states)
        try:
            yield
        finally:
            self.step_random_states = random_states()

    def training_step(self, batch, batch_idx):
        if not batch:  # every item of the batch was unreadable and skipped
            return None
        with self.random_stream():
            latents = self.encode_images(batch["pixel_values"], batch.get("index"))
            text = self.training_text(batch["text"])
            condition = self.condition(batch)
            loss = self.diffusion_loss(latents, lambda noisy, t: self(noisy, t, text, condition))
            loss = self.add_losses(loss, len(latents))
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

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Part of the step: checkpoints are written in callbacks' on_train_batch_end, before
        # the module's own, and must hold projected weights.
        self.after_step()

    def after_step(self) -> None:
        """What the method does after every optimizer step (COFT's projection); a
        hand-written loop calls it after optimizer.step()."""
        if self.adapter_config is not None:
            self.adapter_config.after_step(self.unet)

    def configure_optimizers(self):
        return self.optimizer_factory(self.param_groups([p for p in self.parameters() if p.requires_grad]))

    def param_groups(self, trainable: list) -> list:
        """The optimizer's parameters: a list of tensors (one group at the optimizer's lr), or
        of param-group dicts where a task trains a part at a learning rate of its own."""
        return trainable

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = self.trainable_state_dict()
        if self.step_random_states is not None:
            checkpoint["random_states"] = self.step_random_states
        checkpoint["validation_history"] = self.validation_history  # a resumed run's curve starts at step 0

    def on_load_checkpoint(self, checkpoint):
        self.step_random_states = checkpoint.get("random_states")  # absent in checkpoints before issue 19
        self.validation_history = list(checkpoint.get("validation_history", []))  # absent before issue 16

    # --- sampling and validation -----------------------------------------------------

    @torch.no_grad()
    def generate(self, captions: list[str], condition: torch.Tensor | None = None, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None, progress: bool = True,
                 size: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] for `captions`, under `condition` (the encoded
        condition images (N, C, H, W) of a control task; None for a subject task), DDIM
        from seeded noise with classifier-free guidance."""
        if condition is not None:
            condition = condition.to(self.device, self.unet.dtype)
        return generate(self.unet, self.vae, self.noise_scheduler.config, self.vae_scale_factor, self.prompt_states,
                        lambda stacked: self.unet_context(stacked, condition), captions, seed,
                        self.sample_size(condition, size), steps or self.hparams.val_steps,
                        self.hparams.val_guidance if guidance is None else guidance, progress)

    def on_validation_epoch_start(self):
        if self.scorer is None:
            self.scorer = self.build_scorer()
        self.scorer.reset()
        self.validation_images = []

    def validation_step(self, batch, batch_idx):
        if not batch:
            return
        generated = self.generate(batch["text"], self.condition(batch), seed=self.hparams.val_seed + batch_idx,
                                  progress=False)
        self.score(generated, batch)
        self.validation_images.append(self.grid_entry(generated, batch))

    def on_validation_epoch_end(self):
        metrics = self.scorer.compute()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self.validated_at = self.global_step
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking:
            return
        self.validation_history.append({"step": self.global_step, **metrics})
        if trainer.is_global_zero:
            grid = self.grid(self.validation_images)
            out = Path(trainer.default_root_dir) / "samples" / f"step_{self.global_step:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(out)
            log_image(self.logger, "val/samples", grid, self.global_step)

    # --- the adapter file ----------------------------------------------------------------

    def adapter_metadata(self) -> dict[str, str]:
        """What an adapter file records besides the tensors (orthodiff.adapter)."""
        return {"task": self.task_name, **self.task_metadata()}

    @classmethod
    def from_metadata(cls, meta: dict, **kwargs) -> "DiffusionTask":
        """The task an adapter file's metadata describes (weights not loaded)."""
        return cls(**cls.arguments_from_metadata(meta), **kwargs)

    # --- hooks ------------------------------------------------------------------------------

    def condition(self, batch: dict) -> torch.Tensor | None:
        """What conditions the UNet besides the text (a control task's encoded condition)."""
        return None

    def unet_context(self, text, condition):
        """A context in which the UNet sees `condition` (and, for P+, the per-layer text)."""
        return contextlib.nullcontext()

    def prompt_states(self, captions: list[str]):
        """The text encodings the UNet reads for `captions`."""
        return self.encode_text(captions)

    def training_text(self, captions: list[str]):
        return self.prompt_states(captions)

    def add_losses(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The training loss with the task's extra terms (the subject prior)."""
        return loss

    def sample_size(self, condition, size: int | None) -> tuple[int, int]:
        raise NotImplementedError

    def build_scorer(self):
        raise NotImplementedError

    def score(self, generated: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def grid_entry(self, generated: torch.Tensor, batch: dict):
        """What one validation batch adds to the sample grid."""
        return generated.cpu()

    def grid(self, entries: list) -> np.ndarray:
        raise NotImplementedError

    def task_metadata(self) -> dict[str, str]:
        raise NotImplementedError

    @classmethod
    def arguments_from_metadata(cls, meta: dict) -> dict:
        raise NotImplementedError


def log_image(logger, key: str, image: np.ndarray, step: int):
    """Send an image to wandb or TensorBoard; other loggers (CSV) keep the PNG on disk only."""
    experiment = getattr(logger, "experiment", None)
    kind = type(logger).__name__
    if kind == "WandbLogger":
        logger.log_image(key=key, images=[image], step=step)
    elif kind == "TensorBoardLogger" and experiment is not None:
        experiment.add_image(key, image, step, dataformats="HWC")
