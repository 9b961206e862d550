"""Training entry (called by train.py): check what the run needs, build everything from the
config, validate at step 0, fit, validate again, export the adapter, write metrics.json,
return the swept metric. What stops a run early (a missing model, a bad setting, a
systematic data fault, a non-finite loss) does so in one line (see the README's
"Reliability" section)."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins import TorchCheckpointIO

from orthodiff.adapter import save_adapter
from orthodiff.app.preflight import MissingResourceError, check_train
from orthodiff.data.datasets import TooManySkippedError
from orthodiff.data.subjects import subject_class_word
from orthodiff.files import atomic_path
from orthodiff.tasks import NonFiniteLossError

# data.class_word of the subject configs: `${subject_class:${data.root},${data.subject}}`.
OmegaConf.register_new_resolver("subject_class", subject_class_word, replace=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints through `atomic_path`. Lightning's own writer stages the file in TMPDIR
    and moves it into place; when TMPDIR is on another filesystem (node-local scratch on
    clusters) the move copies into the old file, and a kill mid-copy destroys the last
    good checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)


class TrainingCost(pl.Callback):
    """Seconds per training step (validation excluded; the first step, which warms up
    caches, left out) and peak memory: CUDA's allocator peak on GPU, the process's peak
    resident memory on CPU (base model included)."""

    def __init__(self):
        self.durations: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.durations.append(time.perf_counter() - self.started)

    def summary(self, module) -> dict:
        steps = self.durations[1:] or self.durations
        if torch.cuda.is_available() and module.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(module.device) / 2**20, "cuda_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_rss"
        return {"seconds_per_step": sum(steps) / max(len(steps), 1), "timed_steps": len(steps),
                "peak_memory_mb": round(peak, 1), "peak_memory_kind": kind,
                "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
                # the control network's share (the hint encoder, a ControlNet, a T2I-Adapter): the rest is the UNet adapter
                "control_network_parameters": sum(p.numel() for p in getattr(module, "control_network", torch.nn.Module()).parameters()
                                                  if p.requires_grad),
                # on record because CPU kernels' summation order follows it: the same run at another
                # thread count differs in its last bits after one step, then drifts apart (docs/reliability.md)
                "torch_threads": torch.get_num_threads(),
                **getattr(module, "extra_cost", {})}  # e.g. method=encoder's encode_seconds


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def plain_metrics(results: list[dict]) -> dict[str, float]:
    """trainer.validate's output -> {"canny_iou": ...} without the "val/" prefix."""
    merged = {k: float(v) for result in results for k, v in result.items()}
    return {k.split("/", 1)[-1]: v for k, v in merged.items() if k.startswith("val/")}


def write_json(path: Path, data: dict):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def check_method_fits(cfg: DictConfig) -> None:
    """A method trains for the tasks its config lists (method.tasks); refuse any other pair
    before any data is read, naming both."""
    if cfg.task_name not in cfg.method.tasks:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        experiment = choices.get("experiment") or "none"
        raise SystemExit(f"train.py: method={cfg.method.name} does not fit experiment={experiment} (a {cfg.task_name} "
                         f"task): {cfg.method.name} trains for {', '.join(cfg.method.tasks)} "
                         f"({'experiment=dreambooth' if 'subject' in cfg.method.tasks else 'a control experiment'})")


def build(key: str, node: DictConfig, **kwargs):
    """instantiate(node); a bad setting or a missing file (the ValueError or FileNotFoundError
    it raises) ends the run in one line naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if not isinstance(cause, (ValueError, FileNotFoundError)):
            raise
        raise SystemExit(f"train.py: {key}: {' '.join(str(cause).split())}") from None


def train(cfg: DictConfig) -> float:
    check_method_fits(cfg)
    try:
        check_train(cfg)  # models, tokenizer, oracles, caches, the resume checkpoint: before any data is read
    except MissingResourceError as error:
        raise SystemExit(f"train.py: {error}") from None
    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir()
    # The test split is eval.py's, not built here.
    datamodule = build("data", cfg.data, **({"test": None} if "test" in cfg.data else {}))
    module = build("module", cfg.module)
    cost = TrainingCost()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [cost]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False  # logger=none: no logger
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(out),
                                      plugins=[AtomicCheckpointIO()])
    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))

    metrics = {}
    if cfg.resume:  # step 0 was measured by the run that wrote the checkpoint
        earlier = Path(cfg.resume).expanduser().parent.parent / "metrics.json"
        if earlier.is_file():
            metrics["step0"] = json.loads(earlier.read_text()).get("step0", {})
    elif cfg.validate_at_start:
        metrics["step0"] = plain_metrics(trainer.validate(module, datamodule=datamodule))
        if trainer.is_global_zero and not fast_dev_run:
            write_json(out / "metrics.json", metrics)  # kept even if the run dies later
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
    except NonFiniteLossError as error:
        raise SystemExit(f"train.py: {error}\nlast checkpoint: {out / 'checkpoints' / 'last.ckpt'}") from None
    except TooManySkippedError as error:
        raise SystemExit(f"train.py: {error}") from None
    if fast_dev_run:
        return float("nan")
    checkpoint = next((c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)), None)
    if checkpoint is not None and checkpoint.dirpath:  # last.ckpt = the final step, not the last multiple of N
        trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")
    # Reuse the validation fit ran at its last step; otherwise validate once more.
    final = plain_metrics([trainer.callback_metrics]) if module.validated_at == trainer.global_step else {}
    metrics["final"] = final or plain_metrics(trainer.validate(module, datamodule=datamodule))
    metrics["history"] = module.validation_history  # every validation since step 0, resumes included (convergence plots)
    metrics["cost"] = cost.summary(module)
    metrics["skipped"] = datamodule.skip_report() if hasattr(datamodule, "skip_report") else {}
    if trainer.is_global_zero:
        save_adapter(out / "adapter.safetensors", module)
        write_json(out / "metrics.json", metrics)
        print(f"adapter: {out / 'adapter.safetensors'}\nmetrics: {json.dumps(metrics)}")
    return float(metrics["final"].get(cfg.optimized_metric.split("/", 1)[-1], math.nan))
