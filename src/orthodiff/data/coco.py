"""COCO 2017 with captions, for the canny and depth tasks.

Reads the layout the COCO site's zips unpack to:
    root/annotations/captions_{split}.json   "images" [{id, file_name}], "annotations" [{image_id, caption}]
    root/{split}/*.jpg
Each image gets the first caption listed for it; images are ordered by id, so max_items
and the validation subset are the same on every machine.

Conditions are annotated here and cached as PNGs under cache_dir (each image is
annotated once, not once per epoch):
    canny  cv2.Canny 100/200 at the training resolution  (default root/cache/canny_{resolution})
    depth  DepthAnnotator, near = bright, at the image's size  (default root/cache/depth_{model name})
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from orthodiff.data.annotators import DepthAnnotator, cached_png
from orthodiff.data.control import canny_edges
from orthodiff.data.datasets import ControlDataset, resize_crop
from orthodiff.data.folder import dataset_root
from orthodiff.data.readers import read_image

COCO_HOW = "download {split}.zip and annotations_trainval2017.zip from cocodataset.org and unzip both into it"


class CocoDataset(ControlDataset):
    def __init__(self, root: str | Path, split: str = "val2017", control: str = "canny", resolution: int = 512,
                 depth_model: str | Path | DepthAnnotator | None = None, cache_dir: str | Path | None = None,
                 max_items: int | None = None, on_error: str = "skip"):
        if control not in ("canny", "depth"):
            raise ValueError(f"CocoDataset has no {control!r} annotations: choose 'canny' or 'depth'")
        super().__init__(control, resolution, on_error)
        how = COCO_HOW.format(split=split)
        self.root = dataset_root(root, "COCO 2017", how)
        captions_path = self.root / "annotations" / f"captions_{split}.json"
        self.images = self.root / split
        for path in (captions_path, self.images):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: {how} (see data/README.md)")
        with open(captions_path) as file:
            index = json.load(file)
        try:
            images = sorted(index["images"], key=lambda image: image["id"])
            first_caption = {}
            for annotation in index["annotations"]:
                first_caption.setdefault(annotation["image_id"], annotation["caption"].strip())
            self.records = [(image["file_name"], first_caption.get(image["id"], "")) for image in images[:max_items]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{captions_path} is not a COCO captions file (missing {error})") from None
        missing = sum(not text for _, text in self.records)
        if missing:
            warnings.warn(f"{missing} of {len(self.records)} images have no caption in {captions_path}; "
                          "they get an empty caption", stacklevel=2)

        self.annotator = None
        if control == "depth":
            if depth_model is None and cache_dir is None:
                raise ValueError("control='depth' needs depth_model (a depth-estimation model folder or hub "
                                 "id, e.g. Intel/dpt-hybrid-midas) or a cache_dir already holding its maps")
            if depth_model is not None:
                self.annotator = depth_model if isinstance(depth_model, DepthAnnotator) else DepthAnnotator(depth_model)
        # One folder per annotator setting, so changing the resolution or the depth model
        # never reads maps made for another.
        default = (f"canny_{self.resolution}" if control == "canny"
                   else f"depth_{Path(self.annotator.model if self.annotator else '').name}")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else self.root / "cache" / default

    def load(self, record: tuple[str, str]) -> dict:
        file_name, text = record
        image = read_image(self.images / file_name)
        cache = self.cache_dir / f"{Path(file_name).stem}.png"
        if self.control == "canny":
            # Edges are made at the training resolution, as the base class would make them;
            # the image goes out already resized, so prepare() leaves both as they are.
            image = resize_crop(image, self.resolution)
            return {"image": image, "condition": cached_png(cache, lambda: canny_edges(image)),
                    "text": text, "target": {}}
        if self.annotator is None and not cache.is_file():
            raise FileNotFoundError(f"no cached depth map {cache} and no depth_model to compute it")
        depth = cached_png(cache, lambda: self.annotator(image))
        # The annotator's map is the only depth there is: it is also the metric's target.
        return {"image": image, "condition": depth, "text": text,
                "target": {"depth": depth.astype(np.float32) / 255}}
