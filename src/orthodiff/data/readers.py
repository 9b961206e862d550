"""Reading dataset files: images (`read_image`, for datasets, caches and the condition
images given to the pipeline alike) and JSON lines (`read_jsonl`, metadata.jsonl and caption
files). Errors name the file and say what is wrong with it.

Images are decoded by OpenCV whatever the caller, so a condition image at inference is read
exactly as training read the dataset's, and come back in RGB order; PIL images and arrays
given in memory go through the same checks and conversions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# What each mode returns (all but "unchanged" are uint8; alpha is dropped):
#   RGB        (H, W, 3)
#   L          (H, W) grey
#   any        (H, W) for a grey image, (H, W, 3) RGB for a colour one
#   unchanged  as stored: (H, W) or (H, W, 3|4) RGB(A), 8 or 16 bits, EXIF orientation ignored
#              (single-channel class-id maps keep their ids)
READ_FLAGS = {"RGB": cv2.IMREAD_COLOR, "L": cv2.IMREAD_GRAYSCALE, "any": cv2.IMREAD_ANYCOLOR,
              "unchanged": cv2.IMREAD_UNCHANGED}
GREY_PIL_MODES = ("1", "L", "I", "I;16", "F")


class UnreadableImageError(OSError, ValueError):
    """A file that is not a decodable image: an OSError to the datasets, which skip such
    items, and a ValueError (bad input) to those who hand the pipeline a condition image."""


def read_image(source, mode: str = "RGB", what: str = "image") -> np.ndarray:
    """A path, PIL image or array -> numpy image in `mode` (see READ_FLAGS).

    Raises FileNotFoundError when a path names no file, UnreadableImageError when the file
    is not a readable image and ValueError when an array is not a uint8 (H, W) / (H, W, 1|3|4)
    image; the message starts with `what` ("condition image", say) and names the file."""
    if mode not in READ_FLAGS:
        raise ValueError(f"mode={mode!r}: choose one of {list(READ_FLAGS)}")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
        image = cv2.imread(str(path), READ_FLAGS[mode])
        if image is None:
            raise UnreadableImageError(f"{what} {path} is not a readable image (not an image file, or damaged)")
        if image.ndim == 3:  # OpenCV decodes to BGR(A)
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        return image
    if isinstance(source, Image.Image):
        grey = mode == "L" or (mode in ("any", "unchanged") and source.mode in GREY_PIL_MODES)
        source = np.asarray(source.convert("L" if grey else "RGB"))
    image = np.asarray(source)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{what} arrays must be uint8 (H, W) or (H, W, 3); got {image.dtype} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if mode == "unchanged":
        return image
    if image.ndim == 3:
        image = image[..., :3]
    if mode == "RGB" and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if mode == "L" and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image


@dataclass
class BadLine:
    """A line of a JSON-lines file that is not a JSON object, kept in its place by
    read_jsonl(on_error="keep"): a dataset skips it as it skips an unreadable image."""

    error: str


def read_jsonl(path: Path, on_error: str = "raise") -> list:
    """One JSON object per non-empty line; errors name the file and the line. A bad line
    raises ValueError (on_error="raise") or is returned as a BadLine (on_error="keep")."""
    records = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                error = None if isinstance(record, dict) else f"{path} line {number} is not a JSON object"
            except json.JSONDecodeError as decode_error:
                error = f"{path} line {number} is not valid JSON: {decode_error}"
            if error is not None and on_error == "raise":
                raise ValueError(error)
            records.append(record if error is None else BadLine(error))
    return records
