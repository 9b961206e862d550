"""Fault injection for tests/test_faults.py: a Lightning callback that SIGKILLs the training
process at one moment of a train.py run, added with

    +callbacks.kill._target_=faults.KillAt +callbacks.kill.step=3 +callbacks.kill.moment=mid_save

(the test puts tests/ on PYTHONPATH). Nothing in src/ knows about it."""

from __future__ import annotations

import io
import os
import signal

import pytorch_lightning as pl
import torch

# between_steps: `step` steps done (and their checkpoint, if any, written);
# mid_step:      step `step` + 1's gradients computed, the optimizer not yet stepped;
# mid_save:      halfway through writing the checkpoint of step `step`.
MOMENTS = ("between_steps", "mid_step", "mid_save")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(pl.Callback):
    def __init__(self, step: int, moment: str = "between_steps", fraction: float = 0.5):
        if moment not in MOMENTS:
            raise ValueError(f"moment={moment!r}: choose one of {MOMENTS}")
        self.step, self.moment, self.fraction = int(step), moment, fraction

    def setup(self, trainer, pl_module, stage):
        if self.moment != "mid_save":
            return
        checkpoint_io = trainer.strategy.checkpoint_io
        save = checkpoint_io.save_checkpoint

        def save_and_die(checkpoint, path, storage_options=None):
            if checkpoint["global_step"] == self.step:
                torch.save = self.partial_save  # for this write only: the process dies in it
            return save(checkpoint, path, storage_options)

        checkpoint_io.save_checkpoint = save_and_die

    def partial_save(self, obj, file):
        buffer = io.BytesIO()
        torch.serialization.save(obj, buffer)
        data = buffer.getvalue()
        file.write(data[: int(len(data) * self.fraction)])
        file.flush()
        os.fsync(file.fileno())
        die()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.moment == "between_steps" and trainer.global_step == self.step:
            die()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.moment == "mid_step" and trainer.global_step == self.step:
            die()
