"""The LightningDataModules' shared part (`DataModule`: a resumable training order, the skip
budget, and their state in checkpoints) and the one for controllable generation: train,
validation and (optional) test datasets come in ready (Hydra instantiates them from
conf/data/*.yaml), it only batches them. eval.py scores on the test dataset."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from orthodiff.data.datasets import SkipBudget, collate

# The dataset each Lightning stage draws from (trainer.state.stage -> attribute).
STAGE_SETS = {"train": "train_set", "validate": "val_set", "sanity_check": "val_set", "test": "test_set"}


class ResumableSampler(RandomSampler):
    """A shuffled order that is a function of (seed, epoch) only, and that can start an
    epoch part-way: a run resumed mid-epoch draws exactly the batches the interrupted run
    would have drawn next. The datamodule counts epochs (`epoch`), not Lightning: a
    checkpoint written when fit stops at max_steps marks Lightning's epoch as finished
    even when its data was not. A RandomSampler, so under DDP Lightning swaps in its
    DistributedSampler as before."""

    def __init__(self, data_source, seed: int = 0, epoch: int = 0, start: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch, self.start = int(seed), int(epoch), int(start)

    def order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data_source)).tolist()

    def __iter__(self):
        start, self.start = self.start, 0  # only the first pass after a resume starts part-way
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:  # a whole epoch, resumed or not: Lightning counts on from the batches done
        return len(self.data_source)


class DataModule(pl.LightningDataModule):
    """What the datamodules share. Subclasses set `train_set` and `val_set` (and
    `test_set`) and build their training loader with `train_loader`.

    - The training order is a ResumableSampler seeded with `seed`; `position` (the epoch
      and the batches handed to training in it) is in the checkpoint, and a resumed run's
      sampler starts there.
    - Every batch passes a SkipBudget of its stage (`max_skip_fraction`, see
      orthodiff.data.datasets); `skip_report()` is what metrics.json records."""

    def __init__(self, seed: int = 0, max_skip_fraction: float = 0.01):
        super().__init__()
        self.seed, self.max_skip_fraction = seed, max_skip_fraction
        self.position = {"epoch": 0, "batches": 0}
        self.sampler: ResumableSampler | None = None
        self.batches_per_epoch = 0
        self.skips: dict[str, SkipBudget] = {}
        self.test_set = None

    def train_loader(self, dataset: Dataset, batch_size: int, num_workers: int = 0,
                     drop_last: bool = False) -> DataLoader:
        self.sampler = ResumableSampler(dataset, self.seed)
        # The loader's own generator, not torch's global one, seeds the workers: creating an
        # iterator draws from it, and training's random stream must not depend on when that happens.
        loader = DataLoader(dataset, batch_size, sampler=self.sampler, drop_last=drop_last, num_workers=num_workers,
                            collate_fn=collate, persistent_workers=num_workers > 0,
                            generator=torch.Generator().manual_seed(self.seed))
        self.batches_per_epoch = len(loader)
        if self.position["batches"] >= self.batches_per_epoch:  # saved after an epoch's last batch
            self.position = {"epoch": self.position["epoch"] + 1, "batches": 0}
        self.sampler.epoch, self.sampler.start = self.position["epoch"], self.position["batches"] * batch_size
        return loader

    def skip_budget(self, stage: str) -> SkipBudget:
        if stage not in self.skips:
            dataset = getattr(self, STAGE_SETS.get(stage, "val_set"), None)
            self.skips[stage] = SkipBudget(stage, len(dataset) if dataset is not None else 1, self.max_skip_fraction)
        return self.skips[stage]

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        stage = str(trainer.state.stage.value) if trainer is not None and trainer.state.stage else "validate"
        if stage == "train":  # one more training batch drawn; the epoch ends with the sampler's pass
            per_epoch = min(self.batches_per_epoch, trainer.num_training_batches)  # limit_train_batches
            self.position["batches"] += 1
            if self.position["batches"] >= per_epoch and self.sampler is not None:
                self.position = {"epoch": self.position["epoch"] + 1, "batches": 0}
                self.sampler.epoch = self.position["epoch"]
        return self.skip_budget(stage).take(batch)

    def skip_report(self) -> dict:
        return {stage: budget.report() for stage, budget in self.skips.items()}

    def state_dict(self) -> dict:
        return {"position": dict(self.position), "skips": {k: v.state_dict() for k, v in self.skips.items()}}

    def load_state_dict(self, state: dict) -> None:
        # Before Lightning asks for the training loader, which then starts at this position.
        self.position = dict(state["position"])
        for stage, skips in state.get("skips", {}).items():
            self.skip_budget(stage).load_state_dict(skips)


class ControlDataModule(DataModule):
    def __init__(self, train: Dataset, val: Dataset, test: Dataset | None = None, batch_size: int = 16,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 max_skip_fraction: float = 0.01):
        super().__init__(seed, max_skip_fraction)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"empty dataset: {len(train)} training and {len(val)} validation items")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, self.batch_size, self.num_workers,
                                 drop_last=len(self.train_set) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        # Fixed order, so the validation subset and its seeds are the same at every check.
        return DataLoader(self.val_set, self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("this data config has no `test` dataset")
        return DataLoader(self.test_set, self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate)
