"""Subject-driven generation (DreamBooth's objective): teach a frozen Stable Diffusion model
a rare token for one subject from 3-5 images.

Methods share this one loop and differ in what trains: a UNet adapter (models/adapters.py)
or an embedding (models/embeddings.py, one interface; the task never asks which kind):
- OFT / COFT / LoRA on the UNet's attention layers, or full finetuning (DreamBooth),
  optionally with the prior-preservation loss on class images the base model generated;
- Textual Inversion (TextualInversionConfig): one input embedding for the token;
- P+ (PPlusConfig): one embedding per UNet cross-attention layer;
- Perfusion (PerfusionConfig, models/perfusion.py): gated rank-one edits of the
  cross-attention K/V projections, keys locked to the class word's, plus the token's
  embedding;
- the encoder method (SubjectEncoderConfig, models/subject_encoder.py): a subject encoder,
  trained once on many subjects (tasks/subject_encoder.py), writes the token's embedding
  from the subject's images when fitting starts (one forward pass); the training steps
  that follow, if any (E4T's few tuning steps), are Textual Inversion's.

Validation generates every token prompt several times and the no-token prompts, and
scores them with eval/subject_metrics.py (subject and prompt fidelity, diversity,
no-token accuracy).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from orthodiff.data.prior import base_model_digest, class_images
from orthodiff.data.shapes import SPLIT_SEEDS, scene_caption
from orthodiff.data.subjects import check_token
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models.embeddings import (
    EmbeddingConfig,
    build_embedding,
    embedding_config,
    embedding_from_metadata,
    embedding_metadata,
)
from orthodiff.tasks.base import DiffusionTask


class SubjectTask(DiffusionTask):
    task_name = "subject"

    def __init__(self, pretrained: str = "assets/tiny-sd", adapter=None, embedding: EmbeddingConfig | str | None = None,
                 token: str = "sks", class_word: str = "square", method: str | None = None, optimizer=None,
                 prior_loss_weight: float = 0.0, num_class_images: int = 64, class_prompt: str | None = None,
                 prior_cache_dir: str = "~/.cache/orthodiff/class_images", resolution: int = 64,
                 cache_latents: bool = True, cache_text: bool = True, val_steps: int = 25,
                 val_guidance: float = 4.0, val_seed: int = 0, evaluator: str = "shapes",
                 dino_model: str | None = None, clip_model: str | None = None, original_config: str | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        # None: the method trains a UNet adapter and the text encoder reads as it is.
        self.embedding_config = config = embedding_config(embedding)
        if config is not None and adapter is not None:
            raise ValueError(f"embedding={config.kind!r} trains token embeddings only; use adapter=none with it")
        if config is not None and prior_loss_weight > 0:
            raise ValueError("prior preservation keeps a finetuned UNet's class prior; with embedding="
                             f"{config.kind!r} nothing but the token changes: set prior_loss_weight=0")
        self.load_base(pretrained, original_config)
        self.token_id = self._check_token(token, strict=config is not None)
        # The prior's class images come from the base model: its digest names their cache.
        self.base_digest = base_model_digest(self) if prior_loss_weight > 0 else None
        self.adapt(adapter, optimizer)
        init_id = self.tokenizer(class_word, add_special_tokens=False).input_ids[-1]
        self.embedding = build_embedding(config, self.text_encoder, self.unet, self.token_id, init_id, task=self)
        self.encoded, self.extra_cost = False, {}  # embeddings written from images (the encoder method)
        self.class_moments, self.prior_prompt = None, None  # the prior's class images and prompt (setup)

    # What an embedding's build may ask of the task that trains it (models/embeddings.py).

    def typical_captions(self, n: int) -> list[str]:
        """Captions like the prompts this task sees: the shapes world's training captions
        (Perfusion's covariance C, when its config names no file)."""
        return [scene_caption(SPLIT_SEEDS["train"] + k) for k in range(n)]

    def model_digest(self) -> str:
        """The base model's content digest (a subject encoder's check that it was trained for it)."""
        return base_model_digest(self)

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
        """Text encodings, through the learned embedding when there is one: for P+ a list
        of one encoding per cross-attention layer, for Perfusion [encoding, concept mask]."""
        if self.embedding_config is None:  # the frozen text encoder's: cached
            return self.encode_text(captions)
        return self.embedding.encode(self.token_ids(captions))

    def unet_context(self, text, condition):
        # P+: each cross-attention layer reads its own encoding; Perfusion: which prompts name the concept.
        return self.embedding.route(text)

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
        return {"token": self.hparams.token, "class_word": self.hparams.class_word,
                **embedding_metadata(self.embedding_config, self.embedding)}

    @classmethod
    def arguments_from_metadata(cls, meta):
        return {"token": meta["token"], "class_word": meta["class_word"], "embedding": embedding_from_metadata(meta)}

    @classmethod
    def from_metadata(cls, meta, **kwargs):
        module = super().from_metadata(meta, **kwargs)
        if module.embedding_config is not None:
            module.embedding_config.restore(module.embedding, meta)
        return module

    # --- embeddings written from images (the encoder method) ------------------------------

    def on_fit_start(self):
        """The token's word from the subject's images, before any step, for an embedding that
        starts from images (not on a resume: the checkpoint holds the word)."""
        if self.encoded or self.trainer.ckpt_path:
            return
        self.encode_subject(self.trainer.datamodule.train_set.images)

    def encode_subject(self, images: list[np.ndarray]) -> torch.Tensor | None:
        """The embedding's word from uint8 `images` (H, W, 3); None: it does not start from images."""
        started = time.perf_counter()
        word = self.embedding.from_images(images)
        if word is None:
            return None
        self.extra_cost = {"encode_seconds": round(time.perf_counter() - started, 4), "encoded_images": len(images)}
        self.encoded = True
        self.validated_at = -1  # the word changed since any validation
        return word

    # --- the adapter's tensors -------------------------------------------------------------

    def trainable_state_dict(self):
        """The trainable tensors and the learned embedding's buffers (Perfusion's i*, C^-1 i*,
        i*_super: learned, though not by the optimizer)."""
        state = super().trainable_state_dict()
        parameters = {name for name, _ in self.embedding.named_parameters()}
        state.update({f"embedding.{k}": v for k, v in self.embedding.state_dict().items() if k not in parameters})
        return state


def sample_grid(images: torch.Tensor, per_row: int) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] as rows of `per_row` (one prompt's samples per row)."""
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    rows[-1] = torch.cat([rows[-1], torch.ones(per_row - len(rows[-1]), *images.shape[1:])])
    return to_uint8(torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)[None])[0]
