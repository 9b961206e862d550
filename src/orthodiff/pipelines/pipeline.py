"""Inference in diffusers: `OrthodiffPipeline`, a StableDiffusionPipeline that carries an
orthodiff adapter (OFT/COFT, LoRA or full finetuning) and its control network.

    pipe = OrthodiffPipeline.from_pretrained("assets/tiny-sd")   # any SD 1.x base
    pipe.load_adapter("outputs/.../adapter.safetensors")
    pipe.merge()                                                 # optional: zero overhead
    image = pipe("a red circle on a gray background", control_image="edges.png").images[0]

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

from orthodiff.adapter import attach_adapter
from orthodiff.data.control import canny_edges, check_control, encode_condition
from orthodiff.data.readers import read_image
from orthodiff.models.adapters import merge_adapter, unmerge_adapter
from orthodiff.models.control_networks import ControlInjector

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

    def load_adapter(self, path: str | Path) -> "OrthodiffPipeline":
        """Adapt this pipeline's UNet with an adapter file (once per pipeline)."""
        if self.adapter_metadata is not None:
            raise RuntimeError("this pipeline already carries an adapter: load a fresh pipeline for another one")
        network, metadata = attach_adapter(self.unet, path, base_name=self.name_or_path or "this pipeline's base")
        network.to(self.unet.device)
        if self.unet.dtype != network.dtype:  # diffusers warns on every dtype cast, needed or not
            network.to(dtype=self.unet.dtype)
        self.control_network = network
        self.injector = ControlInjector(self.unet, self.control_network)
        self.adapter_metadata = metadata
        return self

    @property
    def control(self) -> str | None:
        return self.adapter_metadata["control"] if self.adapter_metadata else None

    def merge(self) -> int:
        """Fold the adapter into the UNet's weights: the same speed as the base model."""
        return merge_adapter(self.unet)

    def unmerge(self) -> int:
        return unmerge_adapter(self.unet)

    def to(self, *args, **kwargs):
        pipe = super().to(*args, **kwargs)
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

