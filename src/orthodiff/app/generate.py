"""Generation entry (called by generate.py): an adapter + a condition + a prompt -> PNGs
and a side-by-side grid with the condition. A subject adapter (experiment=dreambooth)
needs no condition: its prompt names the token ("a sks square on a black background").

Control adapters trained apart compose (OrthodiffPipeline.load_adapters), one condition each:

    python generate.py adapter=[runs/canny,runs/seg] condition=[edges.png,seg.png] scales=[1.0,0.8] \
        [compose=product|mean] prompt="a red circle"

and a jointly trained adapter (experiment=canny_seg) takes condition=[edges.png,seg.png]
(null leaves a condition out).

Each adapter file is read once (orthodiff.adapter.AdapterFile) and sampled through
OrthodiffPipeline; nothing here builds a training task or loads Lightning."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from orthodiff.adapter import AdapterFile
from orthodiff.app.preflight import check_base_model
from orthodiff.eval.control_metrics import to_uint8
from orthodiff.models.base import load_pipeline
from orthodiff.pipelines import OrthodiffPipeline

SCHEDULERS = {  # name -> diffusers class, built from the base model's scheduler config
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
}
log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerateConfig:
    adapter: str | list[str]          # adapter.safetensors or a train.py run directory; [A,B]: composed
    prompt: str
    condition: str | list[str | None] | None = None  # a raw image (annotated on the fly) or a ready condition map,
    # one per condition of the adapters, in their order ([a.png,b.png]); not for subject adapters
    scales: list[float] | None = None  # one per adapter (None: 1 each): its rotation's power / update's and features' weight
    compose: str = "product"          # how OFT adapters compose: product (first adapter's rotation folded first) | mean
    negative_prompt: str = ""
    num_images: int = 4
    steps: int | None = None          # None: what the adapter was validated with (else 25)
    guidance: float | None = None     # None: what the adapter was validated with (else 7.5)
    seed: int = 0
    scheduler: str = "ddim"
    annotate: str = "auto"            # auto | always | never (see orthodiff.pipelines.load_condition)
    height: int | None = None         # None: the base model's native size
    width: int | None = None
    base: str | None = None           # None: the base model named in the adapter; or a single-file .safetensors/.ckpt
    original_config: str | None = None  # a single-file base's config folder or YAML (when diffusers cannot infer it offline)
    device: str = "auto"              # auto: cuda when available, else cpu
    dtype: str = "auto"               # auto: float16 on cuda, float32 on cpu; or float32/float16/bfloat16
    merge: bool = True                # fold the adapter into the weights: base-model speed
    out: str | None = None            # None: outputs/generate/<time>
    beta: float | None = None         # Perfusion adapters: the gate's threshold (None: the adapter's, 0.7)
    tau: float | None = None          # Perfusion adapters: the gate's temperature (None: the adapter's, 0.15)
    second_concept: str | None = None  # Perfusion: a second concept's adapter, trained apart (multi-concept)
    second_token: str | None = None   # its token, when both concepts were trained with the same one
    allow_other_base: bool = False    # apply the adapter to a base with its layer shapes but other weights


def adapter_file(path: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "adapter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"adapter={path}: no such adapter file or run directory")
    return path


def base_key(base: str | None) -> str:
    """How a base-model error names where the value came from."""
    return "base" if base else "base (none given: the adapter's base_model)"


def as_list(value) -> list:
    """A config value that is one item or a list ([A,B] on the command line), as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_pipeline(adapter: Path | AdapterFile | list, base: str | None, device: str, dtype: torch.dtype,
                   allow_other_base: bool = False, scales=None, compose: str = "product",
                   original_config: str | None = None):
    """The pipeline with the adapter (or the adapters, composed) loaded; the first adapter's metadata.
    Paths are read here, once (a foreign file fails before a base model loads)."""
    adapters = [AdapterFile.of(a) for a in as_list(adapter)]
    meta = adapters[0].meta
    check_base_model(base_key(base), base or meta["base_model"])
    pipe = load_pipeline(base or meta["base_model"], OrthodiffPipeline, dtype, original_config)
    if len(adapters) == 1 and scales is None:
        pipe.load_adapter(adapters[0], allow_other_base=allow_other_base)
    else:
        pipe.load_adapters(adapters, scales, compose, allow_other_base)
    return pipe.to(device), meta


def generate(cfg: GenerateConfig) -> Path:
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={cfg.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if cfg.num_images < 1:
        raise ValueError(f"num_images={cfg.num_images}: must be at least 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype_name = ("float16" if device.startswith("cuda") else "float32") if cfg.dtype == "auto" else cfg.dtype
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    adapters = [AdapterFile.read(adapter_file(a)) for a in as_list(cfg.adapter)]
    meta = adapters[0].meta
    # The base model (with its tokenizer) is checked before any model loads.
    check_base_model(base_key(cfg.base), cfg.base or meta["base_model"], "original_config", cfg.original_config)
    if meta["task"] == "subject":
        if len(adapters) > 1 or cfg.scales is not None:
            raise ValueError("adapter=[...] and scales= compose controllable-generation adapters; for a second "
                             "Perfusion concept use second_concept=")
        return generate_subject(cfg, adapters[0], device)
    if cfg.beta is not None or cfg.tau is not None or cfg.second_concept:
        raise ValueError("beta=, tau= and second_concept= are for Perfusion adapters; this one is for controllable "
                         "generation")
    if cfg.condition is None:
        raise ValueError("condition= is required: this adapter is for controllable generation (give an image)")
    pipe, meta = build_pipeline(adapters if len(adapters) > 1 else adapters[0], cfg.base, device, DTYPES[dtype_name],
                                cfg.allow_other_base, cfg.scales, cfg.compose, cfg.original_config)
    conditions = as_list(cfg.condition)
    if len(conditions) != len(pipe.conditions):
        raise ValueError(f"{len(conditions)} condition(s) for {len(pipe.conditions)} ({', '.join(pipe.conditions)}): "
                         "give condition=[...] with one image each, in the adapters' order (null leaves one out)")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(pipe.scheduler.config)
    if cfg.merge:
        pipe.merge()
    ids = pipe.tokenizer(cfg.prompt).input_ids
    if len(ids) > pipe.tokenizer.model_max_length:
        log.warning("the prompt is %d tokens; the text encoder reads the first %d, the rest is ignored",
                    len(ids), pipe.tokenizer.model_max_length)
    sampling = meta["sampling"]
    steps = cfg.steps or sampling.get("steps", 25)
    guidance = cfg.guidance if cfg.guidance is not None else sampling.get("guidance", 7.5)
    result = pipe(cfg.prompt, control_image=conditions if len(conditions) > 1 else conditions[0],
                  annotate=cfg.annotate, height=cfg.height,
                  width=cfg.width, num_images_per_prompt=cfg.num_images, num_inference_steps=steps,
                  guidance_scale=guidance, negative_prompt=cfg.negative_prompt or None,
                  generator=torch.Generator().manual_seed(cfg.seed))
    # The conditions as the networks saw them (annotated, resized; black: left out), beside the samples.
    methods = [m["method"] for m in pipe.adapters_metadata]
    record = {**asdict(cfg), "steps": steps, "guidance": guidance, "device": device, "dtype": dtype_name,
              "base_model": pipe.name_or_path, "method": methods[0] if len(methods) == 1 else methods,
              "control": "+".join(pipe.conditions)}
    return write_outputs(cfg.out, [np.asarray(image) for image in result.images], record,
                         first=conditions_preview(pipe.last_conditions, result.images[0].size[::-1]))


def conditions_preview(conditions: list, size: tuple[int, int]) -> np.ndarray:
    """The first of each batch of encoded conditions, as the networks saw them, side by side as
    uint8 (H, W * n, 3); black (H, W) = `size` for one left out (None)."""
    shown = [np.zeros((*size, 3), np.uint8) if c is None else
             to_uint8(c[:1, :3].float().expand(-1, 3, -1, -1) if c.shape[1] == 1 else c[:1, :3].float())[0]
             for c in conditions]
    return np.concatenate(shown, axis=1)


def generate_subject(cfg: GenerateConfig, adapter: AdapterFile, device: str) -> Path:
    """A subject adapter's samples, from the training module's own DDIM sampler
    (OrthodiffPipeline.generate, float32: the images its validation drew; scheduler=, dtype=
    and merge= apply to controllable-generation adapters only)."""
    pipe, meta = build_pipeline(adapter, cfg.base, device, torch.float32, cfg.allow_other_base,
                                original_config=cfg.original_config)
    tokens = [meta["token"]]
    if cfg.second_concept:
        second = AdapterFile.read(adapter_file(cfg.second_concept))
        pipe.load_adapter(second, token=cfg.second_token)
        tokens.append(cfg.second_token or second.meta["token"])
    sampling = meta["sampling"]  # what the adapter was validated with (files before "size": native size)
    steps = cfg.steps or sampling.get("steps", 25)
    guidance = sampling.get("guidance", 4.0) if cfg.guidance is None else cfg.guidance
    with pipe.embedding.gate(cfg.beta, cfg.tau):
        images = pipe.generate([cfg.prompt] * cfg.num_images, seed=cfg.seed, steps=steps, guidance=guidance,
                               size=cfg.height or cfg.width or sampling.get("size"))
        gate = pipe.embedding.gate_settings()
    record = {**asdict(cfg), "steps": steps, "guidance": guidance, "device": device,
              "base_model": cfg.base or meta["base_model"], "method": meta["method"] or None, "token": meta["token"],
              "tokens": tokens, **gate}
    return write_outputs(cfg.out, list(to_uint8(images)), record)


def write_outputs(out: str | None, images: list[np.ndarray], record: dict, first: np.ndarray | None = None) -> Path:
    """sample_*.png, grid.png (`first`, e.g. the condition, then the samples) and generate.json."""
    out = Path(out or f"outputs/generate/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    out.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(out / f"sample_{k:02d}.png")
    Image.fromarray(np.concatenate(([first] if first is not None else []) + images, axis=1)).save(out / "grid.png")
    (out / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(images)} images and grid.png in {out}")
    return out
