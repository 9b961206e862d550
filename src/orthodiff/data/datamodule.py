"""One LightningDataModule for every dataset: train and validation datasets come in ready
(Hydra instantiates them from conf/data/*.yaml), this only batches them."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from orthodiff.data.datasets import collate


class ControlDataModule(pl.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset, batch_size: int = 16, val_batch_size: int | None = None,
                 num_workers: int = 0):
        super().__init__()
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"empty dataset: {len(train)} training and {len(val)} validation items")
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=len(self.train_set) >= self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        # Fixed order, so the validation subset and its seeds are the same at every check.
        return DataLoader(self.val_set, self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate)
