"""Datasets for controllable generation: the shapes world (`orthodiff.data.shapes`) and
real-dataset loaders, all yielding the item contract of `orthodiff.data.datasets`, with
condition encodings in `control` and file reading (`read_image`, `read_jsonl`) in
`readers`; and subject-driven generation's subjects and DreamBooth-layout loader
(`orthodiff.data.subjects`)."""

from orthodiff.data.ade20k import ADE20KDataset
from orthodiff.data.annotators import DepthAnnotator
from orthodiff.data.celebahq import CelebAHQDataset
from orthodiff.data.coco import CocoDataset
from orthodiff.data.datamodule import ControlDataModule
from orthodiff.data.datasets import ControlDataset, ShapesDataset, collate
from orthodiff.data.folder import FolderDataset
from orthodiff.data.readers import read_image, read_jsonl
from orthodiff.data.subject_datamodule import SubjectDataModule, SubjectPrompts, SubjectWorldDataModule
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

__all__ = ["ADE20KDataset", "CelebAHQDataset", "CocoDataset", "ControlDataModule", "ControlDataset", "DepthAnnotator",
           "EVAL_PROMPTS", "FolderDataset", "SUBJECTS", "ShapesDataset", "SubjectDataModule", "SubjectDataset",
           "SubjectPrompts", "SubjectWorldDataModule", "check_token", "collate", "read_image", "read_jsonl",
           "reference_images", "render_subject",
           "subject_images", "write_subject"]
