"""Training entry (called by train.py): build everything from the config, validate at step 0,
fit, validate again, export the adapter, write metrics.json, return the swept metric."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from orthodiff.adapter import save_adapter
from orthodiff.models.control_module import NonFiniteLossError
from orthodiff.oft import OFTConfig


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def plain_metrics(results: list[dict]) -> dict[str, float]:
    """trainer.validate's output -> {"canny_iou": ...} without the "val/" prefix."""
    merged = {k: float(v) for result in results for k, v in result.items()}
    return {k.split("/", 1)[-1]: v for k, v in merged.items() if k.startswith("val/")}


def train(cfg: DictConfig) -> float:
    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir()
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(out))

    # Checkpoint hparams hold the adapter's OFTConfig; allow it so `resume=` loads under
    # torch.load(weights_only=True) instead of failing on an unknown global.
    torch.serialization.add_safe_globals([OFTConfig])
    metrics = {}
    if cfg.validate_at_start and not cfg.resume:
        metrics["step0"] = plain_metrics(trainer.validate(module, datamodule=datamodule))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
    except NonFiniteLossError as error:
        raise SystemExit(f"train.py: {error}\nlast checkpoint: {out / 'checkpoints' / 'last.ckpt'}") from None
    if cfg.trainer.get("fast_dev_run"):
        return float("nan")
    # Reuse the validation fit ran at its last step; otherwise validate once more.
    final = plain_metrics([trainer.callback_metrics]) if module.validated_at == trainer.global_step else {}
    metrics["final"] = final or plain_metrics(trainer.validate(module, datamodule=datamodule))
    if trainer.is_global_zero:
        save_adapter(out / "adapter.safetensors", module)
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, out / "metrics.json")
        print(f"adapter: {out / 'adapter.safetensors'}\nmetrics: {json.dumps(metrics)}")
    value = metrics["final"].get(cfg.optimized_metric.split("/", 1)[-1], math.nan)
    return float(value)
