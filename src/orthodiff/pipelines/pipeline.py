"""Inference in diffusers: `OrthodiffPipeline`, a StableDiffusionPipeline that carries an
orthodiff adapter (OFT/COFT, LoRA or full finetuning) and its control network.

    pipe = OrthodiffPipeline.from_pretrained("assets/tiny-sd")   # any SD 1.x base
    pipe.load_adapter("outputs/.../adapter.safetensors")
    pipe.merge()                                                 # optional: zero overhead
    image = pipe("a red circle on a gray background", control_image="edges.png").images[0]

A subject adapter (experiment=dreambooth: OFT/LoRA/full, Textual Inversion, method=encoder,
Perfusion; not P+) takes no control image; Perfusion's gate is set per call, and a second
Perfusion concept trained apart joins with a second load_adapter:

    pipe.load_adapter("runs/square/adapter.safetensors")
    pipe.load_adapter("runs/circle/adapter.safetensors", token="ohwx")   # Perfusion only
    pipe("a sks square and a ohwx circle on a white background", perfusion_beta=0.7, perfusion_tau=0.15)

The control enters through ControlInjector's hooks, so diffusers' own denoising loop,
schedulers, callbacks and dtype handling run unchanged. The control image is a ready
condition map or, with `annotate`, a raw image turned into one (Canny on the fly).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from orthodiff.adapter import add_perfusion_concept, attach_adapter, attach_subject_adapter, read_adapter
from orthodiff.data.control import canny_edges, check_control, encode_condition
from orthodiff.data.readers import read_image
from orthodiff.models.adapters import merge_adapter, unmerge_adapter
from orthodiff.models.control_networks import ControlInjector
from orthodiff.models.perfusion import Perfusion

ANNOTATE = ("auto", "always", "never")


def is_edge_map(image: np.ndarray) -> bool:
    """Already a Canny map: grey (or equal channels) with only the values 0 and 255."""
    grey = image if image.ndim == 2 else image[..., 0]
    if image.ndim == 3 and not (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])):
        return False
    return set(np.unique(grey).tolist()) <= {0, 255}


def load_condition(source, control: str, size: tuple[int, int], annotate: str = "auto") -> torch.Tensor:
    """The control network's input (1, C, H, W) in [0, 1] at `size` (height, width).

    annotate: "always" turns a raw image into the condition (Canny with the protocol's
    100/200 thresholds; other controls need their annotator: give a ready map), "never"
    takes the image as a ready map, "auto" annotates for Canny unless the image is
    already an edge map."""
    check_control(control)
    if annotate not in ANNOTATE:
        raise ValueError(f"annotate={annotate!r}: choose one of {ANNOTATE}")
    image = read_image(source, "any", what="condition image")
    height, width = size
    if control == "canny" and (annotate == "always" or (annotate == "auto" and not is_edge_map(image))):
        # Annotate at the output size: edges of a downscaled image, not downscaled edges.
        return encode_condition(control, canny_edges(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)))[None]
    if annotate == "always":
        raise ValueError(f"annotating a {control} condition on the fly is not built in (only canny): "
                         f"give a ready {control} map and annotate=never (data/annotators.py makes depth maps)")
    # Nearest keeps a seg map's class colours and landmark colours exact.
    interpolation = cv2.INTER_AREA if control == "depth" else cv2.INTER_NEAREST
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    return encode_condition(control, image)[None]


class OrthodiffPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline + an orthodiff adapter: `load_adapter`, `merge`/`unmerge`,
    and `__call__(prompt, control_image, ...)` with every StableDiffusionPipeline argument."""

    adapter_metadata: dict | None = None
    control_network: torch.nn.Module | None = None
    last_condition: torch.Tensor | None = None
    embedding: torch.nn.Module | None = None   # a subject adapter's token embedding or Perfusion

    def load_adapter(self, path: str | Path, token: str | None = None,
                     allow_other_base: bool = False) -> "OrthodiffPipeline":
        """Adapt this pipeline's UNet with an adapter file (once per pipeline; a second
        Perfusion concept may join a first). `token` replaces a subject adapter's token;
        `allow_other_base` applies an adapter to a base with its layer shapes but other
        weights (orthodiff.adapter.check_base)."""
        base_name = self.name_or_path or "this pipeline's base"
        if isinstance(self.embedding, Perfusion):
            add_perfusion_concept(self.embedding, self.tokenizer, path, token)
            return self
        if self.adapter_metadata is not None:
            raise RuntimeError("this pipeline already carries an adapter: load a fresh pipeline for another one")
        if read_adapter(path)[1]["task"] == "subject":
            self.embedding, self.adapter_metadata = attach_subject_adapter(self.unet, self.text_encoder, self.tokenizer,
                                                                           path, base_name, token, allow_other_base)
            if self.embedding is not None:
                self.embedding.to(self.unet.device)
            return self
        network, metadata = attach_adapter(self.unet, path, base_name=base_name, allow_other_base=allow_other_base)
        network.to(self.unet.device)
        if self.unet.dtype != network.dtype:  # diffusers warns on every dtype cast, needed or not
            network.to(dtype=self.unet.dtype)
        self.control_network = network
        self.injector = ControlInjector(self.unet, self.control_network)
        self.adapter_metadata = metadata
        return self

    @property
    def control(self) -> str | None:
        return self.adapter_metadata.get("control") if self.adapter_metadata else None

    @property
    def task(self) -> str | None:
        return self.adapter_metadata["task"] if self.adapter_metadata else None

    def merge(self) -> int:
        """Fold the adapter into the UNet's weights: the same speed as the base model."""
        return merge_adapter(self.unet)

    def unmerge(self) -> int:
        return unmerge_adapter(self.unet)

    def to(self, *args, **kwargs):
        pipe = super().to(*args, **kwargs)
        if self.embedding is not None:
            self.embedding.to(self.unet.device)
        if self.control_network is not None:  # not a registered component: move it too
            self.control_network.to(self.unet.device)
            if self.control_network.dtype != self.unet.dtype:
                self.control_network.to(dtype=self.unet.dtype)
        return pipe

    def __call__(self, prompt=None, control_image=None, annotate: str = "auto", height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, **kwargs):
        if self.adapter_metadata is None:
            raise RuntimeError("no adapter loaded: call pipe.load_adapter(path) first "
                               "(or use StableDiffusionPipeline for the base model)")
        if self.task == "subject":
            if control_image is not None:
                raise ValueError(f"this is a subject adapter (token {self.adapter_metadata['token']!r}): it takes no "
                                 "control image")
            return self._subject_call(prompt, height=height, width=width,
                                      num_images_per_prompt=num_images_per_prompt, **kwargs)
        if "perfusion_beta" in kwargs or "perfusion_tau" in kwargs:
            raise ValueError("perfusion_beta/perfusion_tau are Perfusion's gate: this is a control adapter")
        if control_image is None:
            raise ValueError(f"this adapter is controlled by {self.control} maps: pass control_image=")
        native = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or native, width or native
        images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        condition = torch.cat([load_condition(image, self.control, (height, width), annotate) for image in images])
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if len(condition) not in (1, len(prompts)):
            raise ValueError(f"{len(condition)} control images for {len(prompts)} prompts: give one, or one per prompt")
        # diffusers repeats each prompt num_images_per_prompt times in a row; match that order.
        condition = condition.repeat_interleave(num_images_per_prompt, 0)
        self.last_condition = condition  # what the network saw (generate.py shows it)
        with self.injector.control(condition.to(self.unet.device, self.unet.dtype)):
            return super().__call__(prompt=prompt, height=height, width=width,
                                    num_images_per_prompt=num_images_per_prompt, **kwargs)


    def _subject_call(self, prompt, perfusion_beta: float | None = None, perfusion_tau: float | None = None,
                      num_images_per_prompt: int = 1, **kwargs):
        """A subject adapter's samples: a token embedding acts through the text encoder's hook,
        Perfusion's edit through its K/V hooks with the mask of the prompts that name a
        concept, stacked as diffusers stacks the UNet's batch ([negative; prompt] with
        guidance)."""
        if not isinstance(self.embedding, Perfusion):
            if perfusion_beta is not None or perfusion_tau is not None:
                raise ValueError(f"perfusion_beta/perfusion_tau are Perfusion's gate; this adapter is "
                                 f"method={self.adapter_metadata['method'] or 'none'}")
            return super().__call__(prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)
        if prompt is None:
            raise ValueError("a Perfusion adapter needs prompt= (which prompts name the concept is read from "
                             "their tokens), not prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = kwargs.get("negative_prompt") or ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        mask = self.embedding.concept_mask(self._token_ids(prompts)).repeat_interleave(num_images_per_prompt, 0)
        guided = kwargs.get("guidance_scale", 7.5) > 1 and self.unet.config.time_cond_proj_dim is None
        if guided:
            negative_mask = self.embedding.concept_mask(self._token_ids(negative))
            mask = torch.cat([negative_mask.repeat_interleave(num_images_per_prompt, 0), mask])
        gate = self.embedding.gate(perfusion_beta, perfusion_tau)
        with self.embedding.route([None, mask.to(self.unet.device)]), gate:
            return super().__call__(prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)

    def _token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
