"""Merge and export: `python -m orthodiff.app.export adapter=<path> out=<dir> [base=...]
[single_file=true] [dtype=float16] [overwrite=true]`.

Writes a plain diffusers Stable Diffusion folder whose UNet has the adapter folded into
its weights (OFT rotations / LoRA products merged; nothing orthodiff-specific left in it),
the control network beside it in `control_network/` (its own diffusers config and
weights, plus orthodiff.json saying how it meets the UNet), and with single_file=true
`<out>/<name>.safetensors` in the original Stable Diffusion key layout for tools that
read single-file checkpoints. The folder is written under a temporary name and renamed
when complete, so an interrupted export never leaves a half-written model.

Several OFT or LoRA adapters (`adapter=[A,B] [scales=[1.0,1.0] compose=product|mean]`) are
composed as generate.py composes them (orthodiff.adapter.attach_adapters) and folded into one
UNet; their control networks go to `control_network_1/`, `control_network_2/`, ..., each
orthodiff.json naming its control and scale (add their outputs, ControlInjector does).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from orthodiff.adapter import AdapterFile
from orthodiff.app.generate import DTYPES, adapter_file, as_list, build_pipeline
from orthodiff.models.adapters import fold_adapter

HOW_TO_USE = {
    "hint": "orthodiff.models.ControlEncoder.from_pretrained(<this folder>); its output is added to the UNet's "
            "conv_in output (orthodiff.models.methods.ControlInjector does this)",
    "controlnet": "diffusers.ControlNetModel.from_pretrained(<this folder>)",
    "t2i_adapter": "diffusers.T2IAdapter.from_pretrained(<this folder>)",
    "t2i_adapter_light": "diffusers.T2IAdapter.from_pretrained(<this folder>)",
}


@dataclass
class ExportConfig:
    adapter: str | list[str]     # adapter.safetensors or a train.py run directory; [A,B]: composed
    out: str                     # the folder to write
    base: str | None = None      # None: the base model named in the adapter
    single_file: bool = False    # also <out>/<name>.safetensors in the original SD key layout
    dtype: str = "float32"       # float32 | float16 | bfloat16 (merging always runs in float32)
    overwrite: bool = False
    scales: list[float] | None = None  # several adapters: one each (generate.py's)
    compose: str = "product"          # several OFT adapters: product | mean (generate.py's)


def export(cfg: ExportConfig) -> Path:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"out={out} already holds files: pass overwrite=true or another folder")
    adapters = [AdapterFile.read(adapter_file(a)) for a in as_list(cfg.adapter)]  # once each
    for adapter in adapters:
        check_exportable(adapter)
    pipe, meta = build_pipeline(adapters if len(adapters) > 1 else adapters[0], cfg.base, "cpu", torch.float32,
                                scales=cfg.scales, compose=cfg.compose)
    pipe.injector.remove()
    fold_adapter(pipe.unet)
    # model_index.json then names diffusers' own class: plain diffusers loads the folder.
    plain = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    if cfg.dtype != "float32":  # diffusers warns on every dtype cast, needed or not
        plain.to(dtype=DTYPES[cfg.dtype])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial, safe_serialization=True)
    scales = cfg.scales or [1.0] * len(adapters)
    for k, (network, own, scale) in enumerate(zip(pipe.control_networks, pipe.adapters_metadata, scales)):
        folder = partial / ("control_network" if len(adapters) == 1 else f"control_network_{k + 1}")
        if cfg.dtype != "float32":
            network.to(dtype=DTYPES[cfg.dtype])
        network.save_pretrained(folder, safe_serialization=True)
        info = {"control": own["control"], "control_network": own["control_network"], "method": own["method"],
                "base_model": own["base_model"], "load_with": HOW_TO_USE[own["control_network"]],
                "sampling": own["sampling"], **({"scale": scale} if len(adapters) > 1 else {})}
        (folder / "orthodiff.json").write_text(json.dumps(info, indent=2) + "\n")
    if cfg.single_file:
        from orthodiff.pipelines.single_file import save_single_file

        save_single_file(plain, partial / f"{out.name}.safetensors")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    methods = " + ".join(m["method"] or "no UNet adapter" for m in pipe.adapters_metadata)
    print(f"merged model ({methods}, {' + '.join(m['control'] for m in pipe.adapters_metadata)} control) in {out}")
    return out


def check_exportable(adapter: AdapterFile) -> None:
    """Export folds a controllable-generation adapter into fixed weights; say why a subject
    adapter is refused."""
    path, meta = adapter.path, adapter.meta
    if adapter.embedding is not None and adapter.embedding.unfoldable:
        raise ValueError(f"{path} is {adapter.embedding.unfoldable}; sample it with generate.py or "
                         "OrthodiffPipeline.load_adapter")
    if meta["task"] != "control":
        raise ValueError(f"{path} is a {meta['task']}-driven adapter (token {meta.get('token')!r}): export writes "
                         "controllable-generation adapters; sample it with generate.py or OrthodiffPipeline")


def main(argv: list[str]):
    from orthodiff.app.cli import parse_args

    cfg = parse_args(ExportConfig, argv, "python -m orthodiff.app.export")
    try:
        return export(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"orthodiff.app.export: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
