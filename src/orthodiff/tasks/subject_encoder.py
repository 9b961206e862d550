"""Training a subject encoder once, on many subjects (experiment=subject_encoder; ELITE's
global mapping, models/subject_encoder.py), so that a new subject later costs one forward
pass (method=encoder in experiment=dreambooth).

Each training item is a composite subject seen twice (data/subjects/composites.py): the
encoder reads one view and its word, put in the token's place ("a sks triangle on a black
background"), must let the frozen model denoise the other view. Loss: the denoising loss
plus norm_weight x ||word||^2 (a small penalty that keeps the word near ordinary ones).
Validation: the same loss on held-out subjects at fixed noise, with the encoder's word and
with the class word in its place (what the encoder adds), and a grid of references and
samples. At the end of training the encoder is written to <run>/subject_encoder/
(diffusers' save_pretrained; assets/subject-encoder is one).
"""

from __future__ import annotations

from pathlib import Path

import torch

from orthodiff.data.prior import base_model_digest
from orthodiff.data.subjects import check_token
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.models.embeddings import TokenEmbedding
from orthodiff.models.subject_encoder import ImageFeatures, SubjectEncoder
from orthodiff.tasks.base import DiffusionTask

GRID_SUBJECTS = 8  # held-out subjects shown in the validation grid


class MeanScores:
    """The scorer of encoder validation: means of per-batch figures."""

    def reset(self):
        self.sums, self.counts = {}, {}

    def update(self, scores: dict[str, float], count: int):
        for key, value in scores.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * count
            self.counts[key] = self.counts.get(key, 0) + count

    def compute(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}


class SubjectEncoderTask(DiffusionTask):
    task_name = "subject_encoder"

    def __init__(self, pretrained: str = "assets/tiny-sd", image_encoder: str | None = None, token: str = "sks",
                 method: str | None = "encoder", optimizer=None, norm_weight: float = 0.01, width: int = 64,
                 hidden: int = 256, resolution: int = 64, cache_text: bool = False, cache_latents: bool = False,
                 val_steps: int = 25, val_guidance: float = 4.0, val_seed: int = 0, original_config: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.load_base(pretrained, original_config)
        self.base_digest = base_model_digest(self)
        self.adapt(None, optimizer)
        self.token = TokenEmbedding(self.text_encoder, check_token(self.tokenizer, token), 0)
        self.token.vectors.requires_grad_(False)  # the encoder's words replace it, row by row
        self.features = ImageFeatures(vae=self.vae, image_encoder=image_encoder)
        self.encoder = SubjectEncoder(feature_channels=tuple(self.features.channels),
                                      embedding_dim=self.text_encoder.config.hidden_size, width=width, hidden=hidden,
                                      image_encoder=image_encoder, base_model=str(pretrained),
                                      base_digest=self.base_digest)

    def class_embeddings(self, class_words: list[str]) -> torch.Tensor:
        ids = [self.tokenizer(word, add_special_tokens=False).input_ids[-1] for word in class_words]
        return self.text_encoder.get_input_embeddings().weight[ids].float()

    def words(self, references: torch.Tensor, class_words: list[str]) -> torch.Tensor:
        """(N, D): the encoder's word for each reference image (N, 3, H, W) in [0, 1]."""
        return self.encoder(self.features(references), self.class_embeddings(class_words))

    def denoising_loss(self, batch: dict, words: torch.Tensor) -> torch.Tensor:
        latents = self.encode_images(batch["pixel_values"])
        with self.token.per_row(words):
            text = self.text_encoder(self.token_ids(batch["text"]))[0]
        return self.diffusion_loss(latents, lambda noisy, t: self(noisy, t, text))

    def training_step(self, batch, batch_idx):
        if not batch:
            return None
        words = self.words(batch["reference"], batch["class_word"])
        denoising = self.denoising_loss(batch, words)
        penalty = words.pow(2).sum(1).mean()
        loss = denoising + self.hparams.norm_weight * penalty
        size = len(words)
        self.log_dict({"train/loss": loss, "train/denoising_loss": denoising, "train/word_norm": penalty.sqrt()},
                      prog_bar=True, batch_size=size)
        return loss

    # --- validation: held-out subjects at fixed noise --------------------------------------

    def build_scorer(self):
        return MeanScores()

    def validation_step(self, batch, batch_idx):
        if not batch:
            return
        words = self.words(batch["reference"], batch["class_word"])
        losses = {}
        for name, vectors in (("loss", words), ("loss_class_word", self.class_embeddings(batch["class_word"]))):
            with torch.random.fork_rng():  # the same noise and timesteps for both
                torch.manual_seed(self.hparams.val_seed + batch_idx)
                losses[name] = float(self.denoising_loss(batch, vectors))
        self.scorer.update({**losses, "word_norm": float(words.norm(dim=1).mean())}, len(words))
        if batch_idx == 0:
            shown = slice(0, GRID_SUBJECTS)
            with self.token.per_row(words[shown]):
                samples = self.generate(batch["text"][shown], seed=self.hparams.val_seed, progress=False)
            targets = (batch["pixel_values"][shown] + 1) / 2
            self.validation_images.append(torch.stack([batch["reference"][shown].cpu(), samples.cpu(), targets.cpu()]))

    def prompt_states(self, captions):
        return self.text_encoder(self.token_ids(captions))[0]  # never cached: the token's word changes per row

    def grid(self, entries):
        """Rows: the reference view the encoder read, a sample of its word's prompt, the view asked for."""
        rows = entries[0]
        return to_uint8(torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)[None])[0]

    def sample_size(self, condition, size):
        side = size or self.hparams.resolution
        return side, side

    def on_train_end(self):
        if self.trainer is not None and self.trainer.is_global_zero:
            self.encoder.save_pretrained(Path(self.trainer.default_root_dir) / "subject_encoder")

    # --- the adapter file: the encoder's weights ---------------------------------------------

    def task_metadata(self):
        return {"token": self.hparams.token, "image_encoder": self.hparams.image_encoder or "",
                "base_digest": self.base_digest}

    @classmethod
    def arguments_from_metadata(cls, meta):
        return {"token": meta["token"], "image_encoder": meta.get("image_encoder") or None}
