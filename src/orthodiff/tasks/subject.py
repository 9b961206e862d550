"""Subject-driven generation (DreamBooth's objective): teach a frozen Stable Diffusion model
a rare token for one subject from 3-5 images.

Methods share this one loop and differ in what trains (models/adapters.py, embeddings.py):
- OFT / COFT / LoRA on the UNet's attention layers, or full finetuning (DreamBooth),
  optionally with the prior-preservation loss on class images the base model generated;
- Textual Inversion (embedding="textual_inversion"): one input embedding for the token;
- P+ (embedding="pplus"): one embedding per UNet cross-attention layer;
- Perfusion (embedding="perfusion", models/perfusion.py): gated rank-one edits of the
  cross-attention K/V projections, keys locked to the class word's, plus the token's
  embedding;
- the encoder method (embedding="encoder", models/subject_encoder.py): a subject encoder,
  trained once on many subjects (tasks/subject_encoder.py), writes the token's embedding
  from the subject's images when fitting starts (one forward pass); the training steps
  that follow, if any (E4T's few tuning steps), are Textual Inversion's.

Validation generates every token prompt several times and the no-token prompts, and
scores them with eval/subject_metrics.py (subject and prompt fidelity, diversity,
no-token accuracy).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from orthodiff.data.prior import base_model_digest, class_images
from orthodiff.data.shapes import SPLIT_SEEDS, scene_caption
from orthodiff.data.subjects import check_token
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.eval.subject_metrics import SubjectScorer
from orthodiff.models.base import resolve_pretrained
from orthodiff.models.embeddings import PerLayerEmbedding, TokenEmbedding
from orthodiff.models.perfusion import Perfusion, PerfusionConfig, text_covariance
from orthodiff.models.subject_encoder import ImageFeatures, SubjectEncoder
from orthodiff.tasks.base import DiffusionTask

EMBEDDINGS = ("none", "textual_inversion", "pplus", "perfusion", "encoder")


class SubjectTask(DiffusionTask):
    task_name = "subject"

    def __init__(self, pretrained: str = "assets/tiny-sd", adapter=None, embedding: str = "none",
                 token: str = "sks", class_word: str = "square", method: str | None = None, optimizer=None,
                 prior_loss_weight: float = 0.0, num_class_images: int = 64, class_prompt: str | None = None,
                 prior_cache_dir: str = "~/.cache/orthodiff/class_images", resolution: int = 64,
                 cache_latents: bool = True, cache_text: bool = True, val_steps: int = 25,
                 val_guidance: float = 4.0, val_seed: int = 0, evaluator: str = "shapes",
                 dino_model: str | None = None, clip_model: str | None = None, original_config: str | None = None,
                 perfusion: PerfusionConfig | None = None, encoder: str | None = None,
                 image_encoder: str | None = None, gradient_checkpointing: bool = False):
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
        elif embedding == "perfusion":
            self.embedding = Perfusion(self.text_encoder, self.unet, self.token_id, init_id,
                                       perfusion or PerfusionConfig(), covariance=self.text_covariance)
        elif embedding == "encoder":
            self.embedding = TokenEmbedding(self.text_encoder, self.token_id, init_id)
            self.subject_encoder = load_subject_encoder(encoder, base_model_digest(self), pretrained)
            trained_on = self.subject_encoder.config.image_encoder
            self.image_features = ImageFeatures(self.vae, image_encoder or trained_on)
            if (image_encoder or trained_on) != trained_on:
                raise ValueError(f"the subject encoder {encoder} reads {trained_on or 'the base VAE'}'s features, not "
                                 f"image_encoder={image_encoder}'s: train one on them (python train.py "
                                 f"experiment=subject_encoder image_encoder={image_encoder})")
            self.class_id, self.encoded, self.extra_cost = init_id, False, {}
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
        """Text encodings, through the learned embeddings when there are some: for P+ a list
        of one encoding per cross-attention layer, for Perfusion [encoding, concept mask]."""
        if self.embedding is None:
            return self.encode_text(captions)
        return self.embedding.encode(self.token_ids(captions))

    def unet_context(self, text, condition):
        # P+: each cross-attention layer reads its own encoding; Perfusion: which prompts name the concept.
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
        # The encoder's output is a Textual Inversion embedding: its adapter is read as one.
        embedding = "textual_inversion" if self.hparams.embedding == "encoder" else self.hparams.embedding
        meta = {"token": self.hparams.token, "class_word": self.hparams.class_word, "embedding": embedding}
        if self.hparams.embedding == "encoder":
            meta["encoder"] = str(self.hparams.encoder)
        if isinstance(self.embedding, Perfusion):
            meta["perfusion"] = json.dumps(asdict(self.embedding.config))
            meta["covariance_digest"] = self.embedding.covariance_digest
        return meta

    @classmethod
    def arguments_from_metadata(cls, meta):
        arguments = {"token": meta["token"], "class_word": meta["class_word"], "embedding": meta["embedding"]}
        if "perfusion" in meta:
            arguments["perfusion"] = PerfusionConfig(**json.loads(meta["perfusion"]))
        return arguments

    @classmethod
    def from_metadata(cls, meta, **kwargs):
        module = super().from_metadata(meta, **kwargs)
        if isinstance(module.embedding, Perfusion):  # which C the concept was trained with
            module.embedding.covariance_digest = meta.get("covariance_digest", "")
        return module

    # --- the encoder method ---------------------------------------------------------------

    def on_fit_start(self):
        """embedding="encoder": the token's word from the subject's images, before any step
        (not on a resume: the checkpoint holds the word)."""
        if self.hparams.embedding != "encoder" or self.encoded or self.trainer.ckpt_path:
            return
        self.encode_subject(self.trainer.datamodule.train_set.images)

    @torch.no_grad()
    def encode_subject(self, images: list[np.ndarray]) -> torch.Tensor:
        """The token's word: the mean of the encoder's words for uint8 `images` (H, W, 3)."""
        started = time.perf_counter()
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        class_embedding = self.text_encoder.get_input_embeddings().weight[self.class_id].float()
        words = self.subject_encoder.to(self.device)(self.image_features(pixels), class_embedding)
        self.embedding.vectors.copy_(words.mean(0, keepdim=True))
        self.extra_cost = {"encode_seconds": round(time.perf_counter() - started, 4), "encoded_images": len(images)}
        self.encoded = True
        self.validated_at = -1  # the word changed since any validation
        return self.embedding.vectors[0].detach().clone()

    # --- Perfusion ----------------------------------------------------------------------

    def trainable_state_dict(self):
        """The trainable tensors and the learned embeddings' buffers (Perfusion's i*, C^-1 i*,
        i*_super: learned, though not by the optimizer)."""
        state = super().trainable_state_dict()
        if self.embedding is not None:
            parameters = {name for name, _ in self.embedding.named_parameters()}
            state.update({f"embedding.{k}": v for k, v in self.embedding.state_dict().items() if k not in parameters})
        return state

    def text_covariance(self) -> torch.Tensor:
        """Perfusion's C: from the config's file (C itself, .pt/.safetensors) or caption list
        (.txt, one a line), else from the shapes world's training captions."""
        config = self.embedding.config
        source = config.covariance
        if source is None:
            captions = [scene_caption(SPLIT_SEEDS["train"] + k) for k in range(config.covariance_captions)]
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"covariance={source}: no such file (a .txt of captions, or C in "
                                        ".pt/.safetensors)")
            if path.suffix == ".txt":
                captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            elif path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))["covariance"]
            else:
                return torch.load(path, map_location="cpu", weights_only=True)
        return text_covariance(self.text_encoder, self.tokenizer, captions)

    def perfusion_gate(self, beta: float | None = None, tau: float | None = None):
        """Perfusion's inference gate (beta, tau) for the calls inside; setting it on
        another method's adapter is an error."""
        if beta is None and tau is None:
            return contextlib.nullcontext()
        if not isinstance(self.embedding, Perfusion):
            raise ValueError(f"beta/tau set Perfusion's gate; this adapter is method={self.hparams.method}")
        return self.embedding.gate(beta, tau)


def load_subject_encoder(path: str | None, digest: str, base_name: str) -> SubjectEncoder:
    """A trained subject encoder (a save_pretrained folder), checked against the base model."""
    if not path:
        raise ValueError("embedding='encoder' needs encoder=<a trained subject encoder folder>: train one with "
                         "python train.py experiment=subject_encoder (it writes <run>/subject_encoder)")
    folder = resolve_pretrained(str(path))
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"encoder={path}: no trained subject encoder there (config.json); train one with "
                                "python train.py experiment=subject_encoder and pass "
                                "method.encoder=<run>/subject_encoder")
    encoder = SubjectEncoder.from_pretrained(folder).eval().requires_grad_(False)
    encoder.check_base(digest, base_name)
    return encoder


def sample_grid(images: torch.Tensor, per_row: int) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] as rows of `per_row` (one prompt's samples per row)."""
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    rows[-1] = torch.cat([rows[-1], torch.ones(per_row - len(rows[-1]), *images.shape[1:])])
    return to_uint8(torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)[None])[0]
