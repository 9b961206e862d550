"""Mixing schedules: lambda_t per sampling step (1 = neutral prompt, 0 = attribute prompt),
the untrained ones the paper and its baselines use, and the schedule file.

The file is safetensors with one tensor, "lambda" (steps,), and metadata strings naming
what the schedule is only valid for: the model (name, adapter, and a digest of the
weights), the sampler, its steps and guidance, and the two prompts it was learned on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orthodiff.files import atomic_path

FORMAT = "orthodiff-edit-schedule"
FORMAT_VERSION = 1
PAPER_SHARE = 0.4  # the paper's initialisation: lambda = 1 for the first 20 of 50 steps, 0 after


def switch_schedule(steps: int, k: int) -> torch.Tensor:
    """A hard switch: the neutral prompt for the first k steps, the attribute prompt after
    (k = 0: the attribute prompt alone; k = steps: the neutral prompt alone)."""
    if not 0 <= k <= steps:
        raise ValueError(f"switch step {k} is outside 0..{steps}")
    return torch.cat([torch.ones(k), torch.zeros(steps - k)])


def paper_schedule(steps: int, share: float = PAPER_SHARE) -> torch.Tensor:
    """The paper's initial schedule at any step count: a switch after round(share * steps) steps."""
    return switch_schedule(steps, round(share * steps))


def default_switches(steps: int) -> list[int]:
    """The hard-switch steps a run compares: after the first step, then every tenth of the
    chain, 1/10 to 9/10 (on tiny SD v3 at 20 steps a colour is decided in the first step:
    on seed 2, k=1 made the red -> green edit at content IoU 0.82, k=2 did not)."""
    return sorted({1, *(max(1, min(steps - 1, round(steps * tenth / 10))) for tenth in range(1, 10))} - {steps})


def save_schedule(path: str | Path, lambdas: torch.Tensor, metadata: dict) -> Path:
    """Write the schedule atomically; metadata values are written as strings (JSON for
    anything that is not one)."""
    strings = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "steps": str(len(lambdas))}
    strings.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        save_file({"lambda": lambdas.detach().float().cpu().contiguous()}, tmp, metadata=strings)
    return Path(path)


def load_schedule(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(lambdas (steps,), metadata); errors name the file and what is wrong with it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"schedule={path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
            lambdas = f.get_tensor("lambda") if "lambda" in keys else None
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"schedule={path} is not a safetensors file ({error})") from None
    if metadata.get("format") != FORMAT or lambdas is None:
        raise ValueError(f"schedule={path} is not an edit schedule (metadata format={metadata.get('format')!r}, "
                         f"tensors {keys})")
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"schedule={path} is format version {metadata['format_version']}; this orthodiff reads "
                         f"up to {FORMAT_VERSION}: upgrade orthodiff")
    if lambdas.ndim != 1 or len(lambdas) != int(metadata["steps"]):
        raise ValueError(f"schedule={path}: tensor 'lambda' has shape {tuple(lambdas.shape)}, expected "
                         f"({metadata['steps']},)")
    return lambdas.float(), metadata


def check_schedule(path, metadata: dict, digest: str, model_name: str, steps: int) -> None:
    """Refuse a schedule learned on other weights or for another number of steps: its
    lambdas index the steps of one sampler on one model."""
    if metadata.get("model_digest") != digest:
        adapter = f" with adapter {metadata['adapter']!r}" if metadata.get("adapter") else ""
        raise ValueError(f"schedule={path} was learned on base model {metadata.get('base_model')!r}{adapter} "
                         f"(weights digest {metadata.get('model_digest')}); this model, {model_name}, has digest "
                         f"{digest}: learn a schedule for this model (edit.py without schedule=)")
    if int(metadata["steps"]) != steps:
        raise ValueError(f"schedule={path} has {metadata['steps']} steps (one lambda per sampling step); "
                         f"steps={steps} was asked: leave steps= unset to use the schedule's")
