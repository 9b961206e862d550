"""Datasets for controllable generation: the shapes world (`orthodiff.data.shapes`) and
real-dataset loaders, all yielding the item contract of `orthodiff.data.datasets`, with
condition encodings in `control` and file reading (`read_image`, `read_jsonl`) in
`readers`; and subject-driven generation's subjects and DreamBooth-layout loader
(`orthodiff.data.subjects`)."""

from orthodiff.data.ade20k import ADE20KDataset
from orthodiff.data.annotators import DepthAnnotator
from orthodiff.data.celebahq import CelebAHQDataset
from orthodiff.data.coco import CocoDataset
from orthodiff.data.datasets import ControlDataset, ShapesDataset, collate
from orthodiff.data.folder import FolderDataset
from orthodiff.data.readers import read_image, read_jsonl
from orthodiff.data.subjects import (
                                     EVAL_PROMPTS,
                                     SUBJECTS,
                                     SubjectDataset,
                                     check_token,
                                     reference_images,
                                     render_subject,
                                     subject_images,
                                     write_subject,
)

# The Lightning data modules load on first use (PEP 562): inference (pipelines, generate.py,
# export) reads conditions and images from this package without importing Lightning.
_DATA_MODULES = {"ControlDataModule": "datamodule", "SubjectDataModule": "subject_datamodule",
                 "SubjectPrompts": "subject_datamodule", "SubjectWorldDataModule": "subject_datamodule"}


def __getattr__(name: str):
    if name in _DATA_MODULES:
        import importlib

        return getattr(importlib.import_module(f"orthodiff.data.{_DATA_MODULES[name]}"), name)
    raise AttributeError(f"module 'orthodiff.data' has no attribute {name!r}")


__all__ = ["ADE20KDataset", "CelebAHQDataset", "CocoDataset", "ControlDataModule", "ControlDataset", "DepthAnnotator",
           "EVAL_PROMPTS", "FolderDataset", "SUBJECTS", "ShapesDataset", "SubjectDataModule", "SubjectDataset",
           "SubjectPrompts", "SubjectWorldDataModule", "check_token", "collate", "read_image", "read_jsonl",
           "reference_images", "render_subject",
           "subject_images", "write_subject"]
