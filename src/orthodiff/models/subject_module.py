"""The Lightning module of subject-driven generation (DreamBooth's objective): teach a
frozen Stable Diffusion model a rare token for one subject from 3-5 images.

Methods share this one loop and differ in what trains (models/methods.py, embeddings.py):
- OFT / COFT / LoRA on the UNet's attention layers, or full finetuning (DreamBooth),
  optionally with the prior-preservation loss on class images the base model generated;
- Textual Inversion (embedding="textual_inversion"): one input embedding for the token;
- P+ (embedding="pplus"): one embedding per UNet cross-attention layer.

Validation generates every token prompt several times and the no-token prompts, and
scores them with eval/subject_metrics.py (subject and prompt fidelity, diversity,
no-token accuracy).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orthodiff.data.prior import base_model_digest, class_images
from orthodiff.data.subjects import check_token
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models.diffusion_module import DiffusionModule, log_image
from orthodiff.models.embeddings import PerLayerEmbedding, TokenEmbedding
from orthodiff.pipelines.sampling import sample

EMBEDDINGS = ("none", "textual_inversion", "pplus")


class SubjectModule(DiffusionModule):
    def __init__(self, pretrained: str = "assets/tiny-sd", adapter=None, embedding: str = "none",
                 token: str = "sks", class_word: str = "square", method: str | None = None, optimizer=None,
                 prior_loss_weight: float = 0.0, num_class_images: int = 64, class_prompt: str | None = None,
                 prior_cache_dir: str = "~/.cache/orthodiff/class_images", resolution: int = 64,
                 cache_latents: bool = True, cache_text: bool = True, val_steps: int = 25,
                 val_guidance: float = 4.0, val_seed: int = 0, evaluator: str = "shapes",
                 dino_model: str | None = None, clip_model: str | None = None, original_config: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding={embedding!r}: choose from {EMBEDDINGS}")
        if embedding != "none" and adapter is not None:
            raise ValueError(f"embedding={embedding!r} trains token embeddings only; use adapter=none with it")
        if embedding != "none" and prior_loss_weight > 0:
            raise ValueError("prior preservation keeps a finetuned UNet's class prior; with embedding="
                             f"{embedding!r} nothing but the token changes: set prior_loss_weight=0")
        self.load_base(pretrained, original_config)
        self.token_id = self._check_token(token, strict=embedding != "none")
        # The prior's class images come from the base model: its digest names their cache.
        self.base_digest = base_model_digest(self) if prior_loss_weight > 0 else None
        self.adapt(adapter, optimizer)
        init_id = self.tokenizer(class_word, add_special_tokens=False).input_ids[-1]
        self.embedding = None
        if embedding == "textual_inversion":
            self.embedding = TokenEmbedding(self.text_encoder, self.token_id, init_id)
        elif embedding == "pplus":
            self.embedding = PerLayerEmbedding(self.text_encoder, self.unet, self.token_id, init_id)
        self.class_moments, self.prior_prompt = None, None  # the prior's class images and prompt (setup)
        self.scorer = None
        self.validation_images: list = []

    def _check_token(self, token: str, strict: bool) -> int | None:
        """The token's id. Embedding methods need it to be one piece; finetuning works
        with any string, so there a bad token only warns."""
        try:
            return check_token(self.tokenizer, token)
        except ValueError as error:
            if strict:
                raise
            warnings.warn(str(error), stacklevel=3)
            return None

    # --- text ------------------------------------------------------------------------------

    def prompt_states(self, captions: list[str]):
        """Text encodings, through the learned embeddings when there are some (a list of
        one encoding per cross-attention layer for P+)."""
        if self.embedding is None:
            return self.encode_text(captions)
        ids = self.token_ids(captions)
        if isinstance(self.embedding, PerLayerEmbedding):
            return self.embedding.encode(ids)
        return self.text_encoder(ids)[0]

    def predict(self, noisy_latents, timesteps, text):
        if isinstance(text, list):  # P+: each cross-attention layer reads its own encoding
            with self.embedding.route(text):
                return self.unet(noisy_latents, timesteps, encoder_hidden_states=text[0]).sample
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text).sample

    # --- prior preservation --------------------------------------------------------------

    def setup(self, stage: str):
        if stage != "fit" or self.hparams.prior_loss_weight <= 0 or self.class_moments is not None:
            return
        # Before any step (and before a resumed checkpoint is loaded), so the adapter is
        # still the identity and the pipeline below generates as the base model does.
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.prior_prompt = self.hparams.class_prompt or self._class_prompt()
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images = class_images(pipe, self.prior_prompt, self.hparams.num_class_images, self.hparams.prior_cache_dir,
                              steps=self.hparams.val_steps, guidance=self.hparams.val_guidance, digest=self.base_digest)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        self.class_moments = torch.cat([dist.mean, dist.std], 1).float().cpu()

    def _class_prompt(self) -> str:
        """The instance prompt without the token ('a sks square on a white background' ->
        'a square on a white background')."""
        datamodule = getattr(self.trainer, "datamodule", None)
        instance = getattr(getattr(datamodule, "train_set", None), "prompt", None)
        if instance is None:
            return f"a {self.hparams.class_word}"
        return " ".join(word for word in instance.split() if word != self.hparams.token)

    def prior_loss(self, batch_size: int) -> torch.Tensor:
        picks = torch.randint(len(self.class_moments), (batch_size,))
        mean, std = self.class_moments[picks].to(self.device).chunk(2, dim=1)
        latents = (mean + std * torch.randn_like(std)) * self.vae.config.scaling_factor
        text = self.encode_text([self.prior_prompt] * batch_size)
        return self.diffusion_loss(latents, lambda noisy, t: self.predict(noisy, t, text))

    # --- training ------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        if not batch:
            return None
        latents = self.encode_images(batch["pixel_values"], batch["index"])
        text = self.prompt_states(batch["text"])
        loss = self.diffusion_loss(latents, lambda noisy, t: self.predict(noisy, t, text))
        self.log("train/instance_loss", loss, batch_size=len(latents))
        if self.class_moments is not None:
            prior = self.prior_loss(len(latents))
            self.log("train/prior_loss", prior, batch_size=len(latents))
            loss = loss + self.hparams.prior_loss_weight * prior
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    # --- sampling and validation -----------------------------------------------------

    @torch.no_grad()
    def generate(self, captions: list[str], seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, progress: bool = True, size: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] for `captions` (the token included where asked)."""
        latent_size = (size or self.hparams.resolution) // self.vae_scale_factor
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(captions), self.unet.config.in_channels, latent_size, latent_size),
                            generator=generator).to(self.device, self.unet.dtype)
        steps = steps or self.hparams.val_steps
        guidance = self.hparams.val_guidance if guidance is None else guidance
        text, uncond = self.prompt_states(list(captions)), self.prompt_states([""] * len(captions))
        if isinstance(text, list):  # P+: route [uncond; text] per layer, as sample() stacks them
            with self.embedding.route([torch.cat([u, t]) for u, t in zip(uncond, text)]):
                latents = sample(self.unet, self.noise_scheduler.config, noise, text[0], uncond[0], steps, guidance,
                                 progress)
        else:
            latents = sample(self.unet, self.noise_scheduler.config, noise, text, uncond, steps, guidance, progress)
        return self.decode_latents(latents)

    def on_validation_epoch_start(self):
        datamodule = self.trainer.datamodule
        if self.scorer is None:
            self.scorer = SubjectScorer(datamodule.train_set.images, self.hparams.evaluator,
                                        self.hparams.dino_model, self.hparams.clip_model)
        self.scorer.reset()
        self.validation_images = []

    def validation_step(self, batch, batch_idx):
        generated = self.generate(batch["text"], seed=self.hparams.val_seed + batch_idx, progress=False)
        specs = [self.trainer.datamodule.val_set.specs[int(i)] for i in batch["index"]]
        self.scorer.update(generated, batch["text"], specs)
        self.validation_images.append(generated.cpu())

    def on_validation_epoch_end(self):
        metrics = self.scorer.compute()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})
        self.validated_at = self.global_step
        if not self.trainer.sanity_checking:
            self.validation_history.append({"step": self.global_step, **metrics})
            if self.trainer.is_global_zero:
                grid = sample_grid(torch.cat(self.validation_images), self.trainer.datamodule.val_set.samples)
                out = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:06d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(out)
                log_image(self.logger, "val/samples", grid, self.global_step)


def sample_grid(images: torch.Tensor, per_row: int) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] as rows of `per_row` (one prompt's samples per row)."""
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    rows[-1] = torch.cat([rows[-1], torch.ones(per_row - len(rows[-1]), *images.shape[1:])])
    return to_uint8(torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)[None])[0]
