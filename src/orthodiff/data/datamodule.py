"""One LightningDataModule for every dataset: train, validation and (optional) test
datasets come in ready (Hydra instantiates them from conf/data/*.yaml), this only batches
them. eval.py scores on the test dataset."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from orthodiff.data.datasets import collate


class ControlDataModule(pl.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset, test: Dataset | None = None, batch_size: int = 16,
                 val_batch_size: int | None = None, num_workers: int = 0):
        super().__init__()
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"empty dataset: {len(train)} training and {len(val)} validation items")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True,
                          drop_last=len(self.train_set) >= self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        # Fixed order, so the validation subset and its seeds are the same at every check.
        return DataLoader(self.val_set, self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("this data config has no `test` dataset")
        return DataLoader(self.test_set, self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate)
