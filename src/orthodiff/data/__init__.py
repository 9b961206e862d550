"""Datasets for controllable generation: the shapes world and real-dataset loaders, all
yielding the item contract of `orthodiff.data.datasets`."""

from orthodiff.data.ade20k import ADE20KDataset
from orthodiff.data.annotators import DepthAnnotator
from orthodiff.data.celebahq import CelebAHQDataset
from orthodiff.data.coco import CocoDataset
from orthodiff.data.datamodule import ControlDataModule
from orthodiff.data.datasets import ControlDataset, ShapesDataset, collate
from orthodiff.data.folder import FolderDataset

__all__ = ["ADE20KDataset", "CelebAHQDataset", "CocoDataset", "ControlDataModule", "ControlDataset", "DepthAnnotator",
           "FolderDataset", "ShapesDataset", "collate"]
