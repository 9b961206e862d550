"""Controllable generation: a frozen Stable Diffusion model whose UNet is adapted by the
method (OFT/COFT by default; LoRA, full finetuning or nothing for the baselines) and fed
by a control network (the hint encoder by default; ControlNet or T2I-Adapter for the
baselines); see models/adapters.py and models/control_networks.py.

Trainable = the adapter's tensors + the control network; everything else is frozen.
Checkpoints hold only the trainable tensors (an SD 1.5 OFT checkpoint is ~60 MB, not 4 GB),
and resuming restores them, the optimizer and the step.

A joint control ("canny+seg", experiment=canny_seg) trains one network on both conditions at
once (data/control.py's joint_condition), each dropped with probability condition_dropout in
training, and validates both conditions' metrics.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from orthodiff.data.control import condition_channels, control_parts, drop_conditions, preview_condition
from orthodiff.eval.control_metrics import control_scorer, to_uint8
from orthodiff.models.control_networks import ControlInjector, build_control_network
from orthodiff.tasks.base import DiffusionTask


class ControlTask(DiffusionTask):
    task_name = "control"

    def __init__(self, pretrained: str = "assets/tiny-sd", control: str = "canny",
                 adapter=None, control_network: str = "hint", method: str | None = None, optimizer=None,
                 empty_prompt_prob: float = 0.1, cache_latents: bool = False, cache_text: bool = True,
                 val_steps: int = 25, val_guidance: float = 4.0, val_seed: int = 0, evaluator: str = "shapes",
                 original_config: str | None = None, hint_lr: float | None = None,
                 gradient_checkpointing: bool = False, condition_dropout: float = 0.0):
        super().__init__()
        # The frozen networks are loaded here, not passed in, so hparams stay small.
        self.save_hyperparameters(ignore=["optimizer"])
        control_parts(control)  # a known control, or a joint one ("canny+seg") of known parts
        self.control = control
        if not 0 <= condition_dropout < 1:
            raise ValueError(f"condition_dropout={condition_dropout}: must be in [0, 1)")
        if control_network is None:
            raise ValueError(f"method {method!r} has no control network: it is a subject-driven method; "
                             "train it with experiment=dreambooth")
        self.load_base(pretrained, original_config)
        # Before the UNet is adapted: ControlNet copies the base UNet's weights.
        self.control_network = build_control_network(control_network, self.unet, condition_channels(control),
                                                     self.vae_scale_factor)
        self.adapt(adapter, optimizer)
        self.injector = ControlInjector(self.unet, self.control_network)

    # --- hooks ------------------------------------------------------------------------------

    def param_groups(self, trainable):
        # The hint encoder at its own lr (hint_lr), the same for every method that trains it, so
        # that a method's lr search moves its adapter alone; ControlNet and the T2I-Adapters
        # train their control network at the optimizer's lr (the method's own).
        if self.hparams.get("hint_lr") is None or self.hparams.control_network != "hint":
            return trainable  # one group, as before: earlier checkpoints' optimizer states still load
        hint = {id(p) for p in self.control_network.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in hint]},
                  {"params": [p for p in trainable if id(p) in hint], "lr": self.hparams.hint_lr}]
        return [group for group in groups if group["params"]]

    def condition(self, batch):
        # A joint control learns every condition alone and every pair: each dropped in training
        # with probability condition_dropout (a single control is left as it is).
        dropout = self.hparams.get("condition_dropout", 0.0) if self.training else 0.0
        return drop_conditions(self.control, batch["conditioning"], dropout)

    def unet_context(self, text, condition):
        return self.injector.control(None if condition is None else condition.to(self.unet.dtype))

    def training_text(self, captions):
        # Classifier-free guidance needs the unconditional branch trained too.
        captions = [c if torch.rand(()) >= self.hparams.empty_prompt_prob else "" for c in captions]
        return self.encode_text(captions)

    def sample_size(self, condition, size):
        return tuple(condition.shape[-2:])

    def build_scorer(self):
        # The label space of segmentation comes from the dataset.
        dataset = getattr(self._trainer.datamodule, "val_set", None) if self._trainer else None
        return control_scorer(self.control, self.hparams.evaluator, getattr(dataset, "num_classes", None),
                              getattr(dataset, "ignore_index", None), device=self.device)

    def score(self, generated, batch):
        self.scorer.update(generated, batch)

    def grid_entry(self, generated, batch):
        return (preview_condition(self.control, batch["conditioning"].cpu()), generated.cpu(),
                ((batch["pixel_values"].cpu() + 1) / 2).clamp(0, 1))

    def grid(self, entries):
        return image_grid(entries)

    def task_metadata(self):
        return {"control": self.control, "control_network": self.hparams.control_network,
                "control_network_config": json.dumps(dict(self.control_network.config))}

    @classmethod
    def arguments_from_metadata(cls, meta):
        return {"control": meta["control"], "control_network": meta["control_network"]}


def image_grid(rows: list, max_rows: int = 8) -> np.ndarray:
    """The first `max_rows` (condition | sample | ground truth) triples as one uint8 image."""
    conditioning, generated, truth = (torch.cat(parts)[:max_rows] for parts in zip(*rows))
    conditioning = conditioning.expand(-1, 3, -1, -1)  # 1-channel conditions as grey; a joint one's side by side
    gap = torch.ones(len(generated), 3, generated.shape[2], 2)
    tiles = torch.cat([conditioning, gap, generated, gap, truth], dim=3)  # (n, 3, h, 3w + 4)
    tiles = torch.cat([tiles, torch.ones(len(tiles), 3, 2, tiles.shape[3])], dim=2)
    return to_uint8(torch.cat(list(tiles), dim=1)[None, :, :-2])[0]
