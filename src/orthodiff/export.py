"""Merge and export: `python -m orthodiff.export adapter=<path> out=<dir> [base=...]
[single_file=true] [dtype=float16] [overwrite=true]`.

Writes a plain diffusers Stable Diffusion folder whose UNet has the adapter folded into
its weights (OFT rotations / LoRA products merged; nothing orthodiff-specific left in it),
the control network beside it in `control_network/` (its own diffusers config and
weights, plus orthodiff.json saying how it meets the UNet), and with single_file=true
`<out>/<name>.safetensors` in the original Stable Diffusion key layout for tools that
read single-file checkpoints. The folder is written under a temporary name and renamed
when complete, so an interrupted export never leaves a half-written model.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from orthodiff.adapter import read_adapter
from orthodiff.generate import DTYPES, adapter_file, build_pipeline
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
    adapter: str                 # adapter.safetensors or a train.py run directory
    out: str                     # the folder to write
    base: str | None = None      # None: the base model named in the adapter
    single_file: bool = False    # also <out>/<name>.safetensors in the original SD key layout
    dtype: str = "float32"       # float32 | float16 | bfloat16 (merging always runs in float32)
    overwrite: bool = False


def export(cfg: ExportConfig) -> Path:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"out={out} already holds files: pass overwrite=true or another folder")
    check_exportable(adapter_file(cfg.adapter))
    pipe, meta = build_pipeline(adapter_file(cfg.adapter), cfg.base, "cpu", torch.float32)
    pipe.injector.remove()
    fold_adapter(pipe.unet)
    # model_index.json then names diffusers' own class: plain diffusers loads the folder.
    plain = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    network = pipe.control_network
    if cfg.dtype != "float32":  # diffusers warns on every dtype cast, needed or not
        plain.to(dtype=DTYPES[cfg.dtype])
        network.to(dtype=DTYPES[cfg.dtype])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial, safe_serialization=True)
    network.save_pretrained(partial / "control_network", safe_serialization=True)
    info = {"control": meta["control"], "control_network": meta["control_network"], "method": meta["method"],
            "base_model": meta["base_model"], "load_with": HOW_TO_USE[meta["control_network"]],
            "sampling": meta["sampling"]}
    (partial / "control_network" / "orthodiff.json").write_text(json.dumps(info, indent=2) + "\n")
    if cfg.single_file:
        from orthodiff.pipelines.single_file import save_single_file

        save_single_file(plain, partial / f"{out.name}.safetensors")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"merged model ({meta['method'] or 'no UNet adapter'}, {meta['control']} control) in {out}")
    return out


def check_exportable(path: Path) -> None:
    """Export folds a controllable-generation adapter into fixed weights; say why a subject
    adapter is refused."""
    _, meta = read_adapter(path)
    if meta.get("embedding") == "perfusion":
        raise ValueError(f"{path} is a Perfusion adapter: its gated rank-one edit depends on the prompt (the gate "
                         "reads each text token's similarity to the concept), so it cannot be folded into fixed "
                         "weights; sample it with generate.py or OrthodiffPipeline.load_adapter")
    if meta["task"] != "control":
        raise ValueError(f"{path} is a {meta['task']}-driven adapter (token {meta.get('token')!r}): export writes "
                         "controllable-generation adapters; sample it with generate.py or OrthodiffPipeline")


def main(argv: list[str]):
    from orthodiff.cli import parse_args

    cfg = parse_args(ExportConfig, argv, "python -m orthodiff.export")
    try:
        return export(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"orthodiff.export: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
