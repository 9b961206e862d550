"""ADE20K scene parsing (ADEChallengeData2016), for the segmentation task.

Reads the layout ADEChallengeData2016.zip unpacks to:
    root/images/{split}/*.jpg          split = "training" | "validation"
    root/annotations/{split}/<stem>.png  single-channel uint8 class ids 0..150, 0 = "other"
plus captions (ADE20K ships none), a jsonl of {"file_name": "ADE_val_00000001.jpg",
"text": "..."} lines, by default root/captions_{split}.jsonl.
The annotation is both the condition (colour-coded with 151 palette colours) and the seg
target, with its exact ids: the metrics ignore class 0, as the benchmark does.
"""

from __future__ import annotations

from pathlib import Path

from orthodiff.data.datasets import ControlDataset
from orthodiff.data.folder import dataset_root, read_captions
from orthodiff.data.readers import read_image

ADE_HOW = ("download ADEChallengeData2016.zip from the MIT scene parsing benchmark "
           "(sceneparsing.csail.mit.edu) and point root at the unzipped ADEChallengeData2016 folder")


class ADE20KDataset(ControlDataset):
    num_classes = 151  # 150 classes + 0 "other"
    ignore_index = 0  # "other" is not a class: left out of mIoU, as in mmsegmentation

    def __init__(self, root: str | Path, split: str = "validation", resolution: int = 512,
                 captions: str | Path | None = None, max_items: int | None = None, on_error: str = "skip"):
        if split not in ("training", "validation"):
            raise ValueError(f"ADE20K split {split!r}: choose 'training' or 'validation'")
        super().__init__("seg", resolution, on_error)
        self.root = dataset_root(root, "ADE20K", ADE_HOW)
        images, annotations = self.root / "images" / split, self.root / "annotations" / split
        for folder in (images, annotations):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} not found: {ADE_HOW} (see data/README.md)")
        paths = sorted(images.glob("*.jpg"))[:max_items]
        if not paths:
            raise FileNotFoundError(f"no .jpg images in {images}: {ADE_HOW}")
        captions = Path(captions).expanduser() if captions is not None else None
        texts = read_captions([path.name for path in paths], captions or self.root / f"captions_{split}.jsonl",
                              required=captions is not None)
        self.records = [(path, annotations / f"{path.stem}.png", text) for path, text in zip(paths, texts)]

    def load(self, record: tuple[Path, Path, str]) -> dict:
        image_path, annotation_path, text = record
        annotation = read_image(annotation_path, "unchanged")
        if annotation.ndim != 2:  # a colour PNG would be taken for colour-coded and lose its ids
            raise ValueError(f"{annotation_path} has {annotation.shape[2]} channels; ADE20K annotations are "
                             "single-channel class ids")
        if annotation.max() >= self.num_classes:  # checked here, where the error can name the file
            raise ValueError(f"{annotation_path} holds class id {annotation.max()}; ADE20K ids are 0..150")
        return {"image": read_image(image_path), "condition": annotation, "text": text, "target": {}}
