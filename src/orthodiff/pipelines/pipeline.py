"""Inference in diffusers: `OrthodiffPipeline`, a StableDiffusionPipeline that carries an
orthodiff adapter (OFT/COFT, LoRA or full finetuning) and its control network.

    pipe = OrthodiffPipeline.from_pretrained("assets/tiny-sd")   # any SD 1.x base
    pipe.load_adapter("outputs/.../adapter.safetensors")
    pipe.merge()                                                 # optional: zero overhead
    image = pipe("a red circle on a gray background", control_image="edges.png").images[0]

A subject adapter (experiment=dreambooth: OFT/LoRA/full, Textual Inversion, method=encoder,
Perfusion; P+ through `generate` only) takes no control image; its embedding's hooks
(models/embeddings.py) act in the calls: Perfusion's gate is set per call, and a second
Perfusion concept trained apart joins with a second load_adapter:

    pipe.load_adapter("runs/square/adapter.safetensors")
    pipe.load_adapter("runs/circle/adapter.safetensors", token="ohwx")   # Perfusion only
    pipe("a sks square and a ohwx circle on a white background", perfusion_beta=0.7, perfusion_tau=0.15)
    images = pipe.generate(["a sks square"], seed=0)   # the training module's sampler, as generate.py samples

An adapter is read once (orthodiff.adapter.AdapterFile); load_adapter takes a path or one already read.

Control adapters trained apart compose (orthodiff.adapter.attach_adapters): their UNet
adapters become one (OFT rotations multiplied in the order given, or their geodesic mean;
LoRA updates added), their control networks add their outputs, each at its scale, and
control_image takes one image per condition, in the adapters' order:

    pipe.load_adapters(["runs/canny/adapter.safetensors", "runs/seg/adapter.safetensors"], scales=[1.0, 0.8])
    pipe("a red circle", control_image=["edges.png", "seg.png"])      # None leaves one out

A jointly trained adapter (experiment=canny_seg) takes its conditions the same way.

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

from orthodiff.adapter import AdapterFile, add_concept, attach_adapters, attach_subject_adapter
from orthodiff.data.control import canny_edges, check_control, control_parts, encode_condition, joint_condition
from orthodiff.data.readers import read_image
from orthodiff.models.adapters import merge_adapter, unmerge_adapter
from orthodiff.models.control_networks import ControlInjector
from orthodiff.models.embeddings import Embedding
from orthodiff.models.sampling import generate

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
    """StableDiffusionPipeline + orthodiff adapters: `load_adapter` / `load_adapters`,
    `merge`/`unmerge`, and `__call__(prompt, control_image, ...)` with every
    StableDiffusionPipeline argument."""

    adapter_metadata: dict | None = None       # the (first) adapter's
    adapters_metadata: tuple = ()              # every control adapter's, in the order loaded
    control_networks: tuple = ()
    last_condition: torch.Tensor | None = None
    last_conditions: tuple = ()                # each condition as its network saw it (None: left out)
    embedding: Embedding | None = None         # a subject adapter's (models/embeddings.py); None: a control adapter

    def load_adapter(self, path: str | Path | AdapterFile, token: str | None = None,
                     allow_other_base: bool = False) -> "OrthodiffPipeline":
        """Adapt this pipeline's UNet with an adapter file, or one already read (once per
        pipeline; a second Perfusion concept may join a first). `token` replaces a subject
        adapter's token; `allow_other_base` applies an adapter to a base with its layer
        shapes but other weights (orthodiff.adapter.check_base)."""
        file = AdapterFile.of(path)
        if self.embedding is not None:  # a second concept: the first's embedding takes it or refuses
            add_concept(self.embedding, self.unet, self.tokenizer, file, token)
            return self
        if self.adapter_metadata is not None:
            raise RuntimeError("this pipeline already carries an adapter: load a fresh pipeline for another one")
        if file.meta["task"] == "subject":
            self.embedding, self.adapter_metadata = attach_subject_adapter(
                self.unet, self.text_encoder, self.tokenizer, file, self.name_or_path or "this pipeline's base", token,
                allow_other_base)
            self.embedding.to(self.unet.device)
            return self
        return self.load_adapters([file], allow_other_base=allow_other_base)

    def load_adapters(self, paths: list[str | Path | AdapterFile], scales=None, mode: str = "product",
                      allow_other_base: bool = False) -> "OrthodiffPipeline":
        """Adapt this pipeline's UNet with several controllable-generation adapters at once,
        each at its scale (default 1): see orthodiff.adapter.attach_adapters for how they
        compose (`mode`: "product" or "mean") and what is refused."""
        if self.adapter_metadata is not None:
            raise RuntimeError("this pipeline already carries an adapter: load a fresh pipeline for another one")
        networks, metas = attach_adapters(self.unet, paths, scales, mode, self.name_or_path or "this pipeline's base",
                                          allow_other_base)
        for network in networks:
            network.to(self.unet.device)
            if self.unet.dtype != network.dtype:  # diffusers warns on every dtype cast, needed or not
                network.to(dtype=self.unet.dtype)
        self.control_networks = tuple(networks)
        self.injector = ControlInjector(self.unet, networks, scales)
        self.adapters_metadata, self.adapter_metadata = tuple(metas), metas[0]
        return self

    @property
    def control_network(self) -> torch.nn.Module | None:
        """The control network of a single adapter (None before one is loaded)."""
        if len(self.control_networks) > 1:
            raise RuntimeError(f"{len(self.control_networks)} adapters are loaded: use control_networks")
        return self.control_networks[0] if self.control_networks else None

    @property
    def control(self) -> str | None:
        """The (first) adapter's control ("canny", or a joint "canny+seg")."""
        return self.adapter_metadata.get("control") if self.adapter_metadata else None

    @property
    def conditions(self) -> list[str]:
        """The conditions control_image takes, in order: every control adapter's, as loaded."""
        return [part for meta in self.adapters_metadata for part in control_parts(meta["control"])]

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
        for network in self.control_networks:  # not registered components: move them too
            network.to(self.unet.device)
            if network.dtype != self.unet.dtype:
                network.to(dtype=self.unet.dtype)
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
        conditions = self.conditions
        given = [control_image] if len(conditions) == 1 else control_image
        if len(conditions) > 1 and (not isinstance(given, (list, tuple)) or len(given) != len(conditions)):
            raise ValueError(f"the adapters take {len(conditions)} conditions ({', '.join(conditions)}): pass "
                             "control_image=[...] with one image each, in that order (None leaves one out)")
        if all(image is None for image in given):
            raise ValueError(f"this adapter is controlled by {' and '.join(conditions)} maps: pass control_image=")
        native = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or native, width or native
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        encoded = [None if image is None else self._condition(image, control, (height, width), annotate, len(prompts))
                   for image, control in zip(given, conditions)]
        batch = max(len(c) for c in encoded if c is not None)  # one image for every prompt is repeated to match
        # diffusers repeats each prompt num_images_per_prompt times in a row; match that order.
        encoded = [None if c is None else c.expand(batch, -1, -1, -1).repeat_interleave(num_images_per_prompt, 0)
                   for c in encoded]
        self.last_conditions = tuple(encoded)  # what the networks saw (generate.py shows them)
        self.last_condition = next(c for c in encoded if c is not None)
        inputs, start = [], 0
        for meta in self.adapters_metadata:  # each network its conditions, a joint one stacked
            count = len(control_parts(meta["control"]))
            inputs.append(joint_condition(meta["control"], encoded[start:start + count]))
            start += count
        inputs = [None if c is None else c.to(self.unet.device, self.unet.dtype) for c in inputs]
        with self.injector.control(inputs if len(inputs) > 1 else inputs[0]):
            return super().__call__(prompt=prompt, height=height, width=width,
                                    num_images_per_prompt=num_images_per_prompt, **kwargs)

    @staticmethod
    def _condition(image, control: str, size: tuple[int, int], annotate: str, prompts: int) -> torch.Tensor:
        """One condition's images (one, or one per prompt) encoded as a batch."""
        images = image if isinstance(image, (list, tuple)) else [image]
        condition = torch.cat([load_condition(item, control, size, annotate) for item in images])
        if len(condition) not in (1, prompts):
            raise ValueError(f"{len(condition)} control images for {prompts} prompts: give one, or one per prompt")
        return condition

    def _subject_call(self, prompt, perfusion_beta: float | None = None, perfusion_tau: float | None = None,
                      num_images_per_prompt: int = 1, **kwargs):
        """A subject adapter's samples: its embedding's hooks see the prompts of the UNet's
        batch, stacked as diffusers stacks it ([negative; prompt] with guidance), and its
        gate (Perfusion's) is set for the call."""
        gate = self.embedding.gate(perfusion_beta, perfusion_tau)  # refused first where there is none
        ids = None
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = self._token_ids(prompts).repeat_interleave(num_images_per_prompt, 0)
            if kwargs.get("guidance_scale", 7.5) > 1 and self.unet.config.time_cond_proj_dim is None:
                negative = kwargs.get("negative_prompt") or ""
                negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
                ids = torch.cat([self._token_ids(negative).repeat_interleave(num_images_per_prompt, 0), ids])
        with self.embedding.prompt_context(ids), gate:
            return super().__call__(prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, steps: int = 25, guidance: float = 4.0,
                 size: int | None = None, progress: bool = True) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] of a subject adapter from the training module's own
        sampler (models.sampling.generate: DDIM from the scheduler's config, seeded noise):
        the samples its validation drew, P+ included; generate.py's subject path."""
        if self.embedding is None:
            raise RuntimeError("generate samples a subject adapter: load one with pipe.load_adapter(path) first")
        side = size or self.unet.config.sample_size * self.vae_scale_factor
        device = self.unet.device
        return generate(self.unet, self.vae, self.scheduler.config, self.vae_scale_factor,
                        lambda captions: self.embedding.encode(self._token_ids(captions).to(device)),
                        self.embedding.route, prompts, seed, (side, side), steps, guidance, progress)

    def _token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
