"""Subject-driven generation (DreamBooth's objective): teach a frozen Stable Diffusion model
a rare token for one subject from 3-5 images.

Methods share this one loop and differ in what trains (models/adapters.py, embeddings.py):
- OFT / COFT / LoRA on the UNet's attention layers, or full finetuning (DreamBooth),
  optionally with the prior-preservation loss on class images the base model generated;
- Textual Inversion (embedding="textual_inversion"): one input embedding for the token;
- P+ (embedding="pplus"): one embedding per UNet cross-attention layer.

Validation generates every token prompt several times and the no-token prompts, and
scores them with eval/subject_metrics.py (subject and prompt fidelity, diversity,
no-token accuracy).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from orthodiff.data.prior import base_model_digest, class_images
from orthodiff.data.subjects import check_token
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models.embeddings import PerLayerEmbedding, TokenEmbedding
from orthodiff.tasks.base import DiffusionTask

EMBEDDINGS = ("none", "textual_inversion", "pplus")


class SubjectTask(DiffusionTask):
    task_name = "subject"

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
        return self.diffusion_loss(latents, lambda noisy, t: self(noisy, t, text))

    # --- hooks ------------------------------------------------------------------------------

    def prompt_states(self, captions):
        """Text encodings, through the learned embeddings when there are some (a list of
        one encoding per cross-attention layer for P+)."""
        if self.embedding is None:
            return self.encode_text(captions)
        ids = self.token_ids(captions)
        if isinstance(self.embedding, PerLayerEmbedding):
            return self.embedding.encode(ids)
        return self.text_encoder(ids)[0]

    def unet_context(self, text, condition):
        # P+: each cross-attention layer reads its own encoding.
        return self.embedding.route(text) if isinstance(text, list) else contextlib.nullcontext()

    def add_losses(self, loss, batch_size):
        self.log("train/instance_loss", loss, batch_size=batch_size)
        if self.class_moments is None:
            return loss
        prior = self.prior_loss(batch_size)
        self.log("train/prior_loss", prior, batch_size=batch_size)
        return loss + self.hparams.prior_loss_weight * prior

    def sample_size(self, condition, size):
        side = size or self.hparams.resolution
        return side, side

    def build_scorer(self):
        return SubjectScorer(self._trainer.datamodule.train_set.images, self.hparams.evaluator,
                             self.hparams.dino_model, self.hparams.clip_model)

    def score(self, generated, batch):
        specs = [self._trainer.datamodule.val_set.specs[int(i)] for i in batch["index"]]
        self.scorer.update(generated, batch["text"], specs)

    def grid(self, entries):
        return sample_grid(torch.cat(entries), self._trainer.datamodule.val_set.samples)

    def task_metadata(self):
        return {"token": self.hparams.token, "class_word": self.hparams.class_word, "embedding": self.hparams.embedding}

    @classmethod
    def arguments_from_metadata(cls, meta):
        return {"token": meta["token"], "class_word": meta["class_word"], "embedding": meta["embedding"]}


def sample_grid(images: torch.Tensor, per_row: int) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] as rows of `per_row` (one prompt's samples per row)."""
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    rows[-1] = torch.cat([rows[-1], torch.ones(per_row - len(rows[-1]), *images.shape[1:])])
    return to_uint8(torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)[None])[0]
