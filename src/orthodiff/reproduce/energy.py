"""table=energy: how much each method changes the hyperspherical energy of the layers it
finetunes (the first control's first-seed runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from orthodiff.adapter import load_adapter
from orthodiff.models.base import load_base_model
from orthodiff.oft import hyperspherical_energy
from orthodiff.reproduce import paper
from orthodiff.reproduce.cells import run_all
from orthodiff.reproduce.report import coft_note, control_settings, write_report


@torch.no_grad()
def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (out, in) matrix a Linear-like layer applies, whatever wraps it (OFT, LoRA):
    read off by feeding it the identity."""
    base = getattr(layer, "base_layer", layer)
    probe = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
    return (layer(probe) - layer(torch.zeros_like(probe[:1]))).T


def energy_rows(module, base_unet) -> list[dict]:
    """Hyperspherical energy (s=1) of each finetuned Linear layer before and after.
    UNet adapters: the adapted target layers. ControlNet: its copy's layers against the
    UNet layers they were copied from. T2I-Adapter has no pretrained counterpart."""
    from diffusers import ControlNetModel

    if module.adapted_layers:
        pairs = [(module.unet.get_submodule(n), base_unet.get_submodule(n)) for n in module.adapted_layers]
    elif isinstance(module.control_network, ControlNetModel):
        net = module.control_network
        pairs = [(m, base_unet.get_submodule(n)) for n, m in net.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith(("down_blocks", "mid_block"))]
    else:
        return []
    changes = []
    for layer, base in pairs:
        before = hyperspherical_energy(base.weight.float()).item()
        after = hyperspherical_energy(effective_weight(layer.eval()).float()).item()
        changes.append((after - before) / before)
    return [{"layers": len(changes), "mean |ΔHE|/HE": float(np.mean(np.abs(changes))),
             "max |ΔHE|/HE": float(np.max(np.abs(changes))), "mean ΔHE/HE": float(np.mean(changes))}]


def energy_by_method(runs: dict[str, dict]) -> dict[str, dict]:
    """{method: its row} for finished runs {method: run} (table=claims reads it too)."""
    rows, base_unet = {}, None
    for method, run in runs.items():
        if "diverged" in run:
            rows[method] = {"layers": 0, "mean |ΔHE|/HE": f"n/a ({run['diverged']})"}
            continue
        module = load_adapter(Path(run["run_dir"]) / "adapter.safetensors")
        base_unet = base_unet or load_base_model(module.hparams.pretrained).unet
        found = energy_rows(module, base_unet)
        rows[method] = found[0] if found else {"layers": 0, "mean |ΔHE|/HE": "n/a (no pretrained layers)"}
    return rows


def cells(cfg: DictConfig) -> list[tuple]:
    return [(m, cfg.controls[0], cfg.seeds[0]) for m in cfg.methods]


def table(cfg: DictConfig) -> Path:
    runs = run_all(cfg, cells(cfg), "energy", archived=False)
    rows = [{"method": method, **row} for method, row in energy_by_method(dict(zip(cfg.methods, runs))).items()]
    notes = ["HE(W) = Σ_{i≠j} ‖ŵ_i − ŵ_j‖⁻¹ over unit-normalized neurons (rows), float64; effective weights "
             "read off the trained layers. OFT/COFT rotate every neuron by the same R, so their change "
             "is float error; LoRA and full finetuning change angles between neurons.",
             f"Published (OFT paper): {paper.ENERGY}.", *coft_note(runs)]
    return write_report(cfg, "energy", f"Hyperspherical energy change ({cfg.controls[0]}, seed {cfg.seeds[0]})", rows,
                        notes, settings=control_settings(cfg))
