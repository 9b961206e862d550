"""An encoder that maps subject images to a word embedding (ELITE's global mapping; E4T and
InstantBooth are the same family): a new subject costs one forward pass, no optimisation.

    features = ImageFeatures(vae=base.vae)               # or image_encoder="openai/clip-vit-large-patch14"
    encoder = SubjectEncoder.from_pretrained("assets/subject-encoder")
    encoder.check_base(base_digest, "assets/tiny-sd")     # trained for this base model, or an error
    vector = encoder(features(images), class_embedding).mean(0)   # the token's input embedding

Image features come from several layers of a frozen backbone: on the tiny SD the base
model's own VAE encoder (its three down blocks and its mid block), for real photographs a
CLIP vision model (`image_encoder=`, four of its hidden layers, as ELITE reads CLIP's). Each
layer goes through its own 1x1 projection and GELU, is mean- and max-pooled over positions,
and one MLP maps them all to an offset from the class word's embedding (zero-initialised:
an untrained encoder gives the class word). The encoder is trained once, on many subjects
(tasks/subject_encoder.py), for one base model: its word lives in that model's embedding
space, so it records the base model's digest and refuses any other.

method=encoder's embedding (SubjectEncoderConfig, models/embeddings.py) is a Textual
Inversion embedding whose word the encoder writes from the subject's images when fitting
starts (`from_images`); its adapter file records it as Textual Inversion, plus the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from orthodiff.models.base import resolve_pretrained
from orthodiff.models.embeddings import EmbeddingConfig, TokenEmbedding

CLIP_LAYERS = 4  # hidden layers of a CLIP vision model read, evenly spaced, the last included


class ImageFeatures(nn.Module):
    """Multi-layer features (a list of (N, C, positions)) of images (N, 3, H, W) in [0, 1],
    from a frozen backbone: the base model's VAE encoder, or a CLIP vision model."""

    def __init__(self, vae: nn.Module | None = None, image_encoder: str | None = None):
        super().__init__()
        self.image_encoder = image_encoder
        if image_encoder is None:
            if vae is None:
                raise ValueError("ImageFeatures needs the base model's vae or an image_encoder")
            self.backbone = [vae.encoder]  # a list: the base model's, not this module's
            self.channels = [block.resnets[-1].out_channels for block in vae.encoder.down_blocks]
            self.channels.append(vae.encoder.mid_block.resnets[-1].out_channels)
        else:
            self.vision, self.processor = load_image_encoder(image_encoder)  # owned: moves with this module
            self.backbone = [self.vision]
            hidden, depth = self.vision.config.hidden_size, self.vision.config.num_hidden_layers
            self.layers = sorted({round(depth * (k + 1) / CLIP_LAYERS) for k in range(CLIP_LAYERS)})
            self.channels = [hidden] * len(self.layers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        backbone = self.backbone[0]
        if self.image_encoder is None:
            dtype = next(backbone.parameters()).dtype
            hidden = backbone.conv_in(images.to(dtype) * 2 - 1)
            features = []
            for block in backbone.down_blocks:
                hidden = block(hidden)
                features.append(hidden)
            features.append(backbone.mid_block(hidden))
            return [f.float().flatten(2) for f in features]
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        inputs = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"]
        inputs = inputs.to(images.device, backbone.dtype)
        states = backbone(pixel_values=inputs, output_hidden_states=True).hidden_states
        return [states[k].float().transpose(1, 2) for k in self.layers]


def load_image_encoder(name_or_path: str):
    """A CLIP vision model and its image processor (a local folder or a cached hub id); a
    one-line FileNotFoundError otherwise."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    try:
        processor = CLIPImageProcessor.from_pretrained(name_or_path)
        model = CLIPVisionModel.from_pretrained(name_or_path).eval().requires_grad_(False)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"image_encoder={name_or_path!r} could not be loaded ({first}); pass a CLIP vision "
                                "model folder (save_pretrained) or a hub id cached by a run with network "
                                "access") from None
    return model, processor


class SubjectEncoder(ModelMixin, ConfigMixin):
    """Image features of several layers -> an offset of the class word's input embedding."""

    @register_to_config
    def __init__(self, feature_channels: tuple = (16, 32, 64, 64), embedding_dim: int = 64, width: int = 64,
                 hidden: int = 256, image_encoder: str | None = None, base_model: str = "", base_digest: str = ""):
        super().__init__()
        self.projections = nn.ModuleList([nn.Conv1d(channels, width, 1) for channels in feature_channels])
        self.mlp = nn.Sequential(nn.LayerNorm(2 * width * len(feature_channels)),
                                 nn.Linear(2 * width * len(feature_channels), hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embedding_dim))
        nn.init.zeros_(self.mlp[-1].weight)  # zero-initialised: starts at the class word
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: list[torch.Tensor], class_embedding: torch.Tensor) -> torch.Tensor:
        """features: ImageFeatures' list of (N, C_l, positions); class_embedding (N, D) or
        (D,). Returns (N, D) word embeddings, one per image."""
        if len(features) != len(self.projections):
            raise ValueError(f"the encoder reads {len(self.projections)} feature layers, got {len(features)}")
        pooled = []
        for projection, feature in zip(self.projections, features):
            mapped = F.gelu(projection(feature))
            pooled += [mapped.mean(2), mapped.amax(2)]
        return class_embedding + self.mlp(torch.cat(pooled, 1))

    def check_base(self, digest: str, base_name: str) -> None:
        """An error naming both base models unless `digest` is the one this encoder was trained for."""
        if digest != self.config.base_digest:
            raise ValueError(f"this subject encoder was trained for base model {self.config.base_model!r} (digest "
                             f"{self.config.base_digest}); {base_name!r} has digest {digest}: its words would mean "
                             "nothing there. Train one for it: python train.py experiment=subject_encoder "
                             f"model.pretrained={base_name}")


@dataclass
class SubjectEncoderConfig(EmbeddingConfig):
    """The encoder method: a trained subject encoder (a save_pretrained folder,
    experiment=subject_encoder writes <run>/subject_encoder) and the image features it reads
    (None: the ones it was trained on; a CLIP vision model for real photographs)."""

    encoder: str | None = "assets/subject-encoder"
    image_encoder: str | None = None

    kind = "encoder"

    def build(self, text_encoder, unet, token_id, init_id, task=None) -> "EncodedTokenEmbedding":
        if task is None:
            raise ValueError("the encoder method writes its word when training starts; its adapter file is read "
                             "as a Textual Inversion one")
        encoder = load_subject_encoder(self.encoder, task.model_digest(), task.hparams.pretrained)
        trained_on = encoder.config.image_encoder
        features = ImageFeatures(task.vae, self.image_encoder or trained_on)  # first: a missing one is its own error
        if (self.image_encoder or trained_on) != trained_on:
            raise ValueError(f"the subject encoder {self.encoder} reads {trained_on or 'the base VAE'}'s features, not "
                             f"image_encoder={self.image_encoder}'s: train one on them (python train.py "
                             f"experiment=subject_encoder image_encoder={self.image_encoder})")
        return EncodedTokenEmbedding(text_encoder, token_id, init_id, encoder, features)

    def metadata(self, embedding) -> dict[str, str]:
        # Its output is a Textual Inversion embedding: its adapter is read as one.
        return {"embedding": "textual_inversion", "encoder": str(self.encoder)}


class EncodedTokenEmbedding(TokenEmbedding):
    """Textual Inversion's embedding, its word written by a subject encoder from images."""

    def __init__(self, text_encoder: nn.Module, token_id: int, class_id: int, encoder: SubjectEncoder,
                 features: ImageFeatures):
        super().__init__(text_encoder, token_id, class_id)
        self.class_id = class_id
        self.parts = [encoder, features]  # a list: not submodules (stay out of state_dict and the adapter)

    @property
    def subject_encoder(self) -> SubjectEncoder:
        return self.parts[0]

    @property
    def image_features(self) -> ImageFeatures:
        return self.parts[1]

    @torch.no_grad()
    def from_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """The token's word: the mean of the encoder's words for uint8 `images` (H, W, 3)."""
        device = self.vectors.device
        encoder, features = (part.to(device) for part in self.parts)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(device)
        class_embedding = self.text_encoder[0].get_input_embeddings().weight[self.class_id].float()
        words = encoder(features(pixels), class_embedding)
        self.vectors.copy_(words.mean(0, keepdim=True))
        return self.vectors[0].detach().clone()


def load_subject_encoder(path: str | None, digest: str, base_name: str) -> SubjectEncoder:
    """A trained subject encoder (a save_pretrained folder), checked against the base model."""
    if not path:
        raise ValueError("the encoder method needs embedding.encoder=<a trained subject encoder folder>: train one "
                         "with python train.py experiment=subject_encoder (it writes <run>/subject_encoder)")
    folder = resolve_pretrained(str(path))
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"encoder={path}: no trained subject encoder there (config.json); train one with "
                                "python train.py experiment=subject_encoder and pass "
                                "embedding.encoder=<run>/subject_encoder")
    encoder = SubjectEncoder.from_pretrained(folder).eval().requires_grad_(False)
    encoder.check_base(digest, base_name)
    return encoder
