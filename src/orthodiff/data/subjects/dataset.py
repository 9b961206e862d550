"""Reading the DreamBooth layout (see the package docstring): a subject's class word and
its images (``SubjectDataset``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from orthodiff.data.datasets import resize_crop
from orthodiff.data.readers import read_image
from orthodiff.data.shapes import REFERENCE_SIZE
from orthodiff.data.subjects.catalogue import SUBJECTS
from orthodiff.data.subjects.render import check_image_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_TEMPLATE = "a {token} {cls}"
DREAMBOOTH_CLASSES = "prompts_and_classes.txt"


def read_dreambooth_classes(path: Path) -> dict[str, str]:
    """{subject: class} from google/dreambooth's prompts_and_classes.txt (its 'Classes'
    section: a 'subject_name,class' header, then one 'subject,class' line each)."""
    classes, started = {}, False
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.replace(" ", "") == "subject_name,class":
            started = True
        elif started and line == "Prompts":
            break
        elif started and "," in line:
            subject, cls = line.split(",", 1)
            classes[subject.strip()] = cls.strip()
    return classes


def _read_text(path: Path) -> str | None:
    """The first non-empty line of a small text file, or None if it has none."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[0] if lines else None


def find_class_word(root: Path, subject: str) -> str:
    """root/<subject>/class.txt, else root/prompts_and_classes.txt; ValueError naming both."""
    folder = Path(root) / subject
    word = _read_text(folder / "class.txt")
    if word:
        return word
    listing = Path(root) / DREAMBOOTH_CLASSES
    if listing.is_file() and read_dreambooth_classes(listing).get(subject):
        return read_dreambooth_classes(listing)[subject]
    raise ValueError(f"no class word for subject {subject!r}: write it in {folder / 'class.txt'} "
                     f"(one line, e.g. 'dog'), pass class_word=..., or list '{subject},<class>' "
                     f"in {listing} (google/dreambooth's format)")


def subject_class_word(root: str | Path, subject: str) -> str:
    """The class word of a shapes-world subject, else of root/<subject> (find_class_word)."""
    if subject in SUBJECTS:
        return SUBJECTS[subject].class_word
    return find_class_word(Path(root).expanduser(), subject)


class SubjectDataset(Dataset):
    """The images of one subject in the DreamBooth layout (see the package docstring).

    Items: {"pixel_values": (3, size, size) float in [-1, 1], "text": the instance
    prompt, "index": the image's index}. Images are read once, centre-cropped and
    resized to `size`; `repeats` lists each of them that many times per epoch (repeats
    share "index", so a latent cache encodes each image once). The prompt is
    `prompt_template` (default: the folder's prompt.txt, else "a {token} {cls}")
    formatted with `token` and the class word (`class_word`, else the folder's class.txt,
    else root/prompts_and_classes.txt). Unreadable images are skipped with a warning as
    long as one image remains. Check the token against the model's tokenizer with
    `check_token`."""

    def __init__(self, root: str | Path, subject: str, token: str = "sks", class_word: str | None = None,
                 size: int = REFERENCE_SIZE, repeats: int = 1, prompt_template: str | None = None):
        self.root = Path(root).expanduser()
        self.folder = self.root / subject
        if not self.folder.is_dir():
            held = (f"{self.root} holds subjects {sorted(p.name for p in self.root.iterdir() if p.is_dir())}"
                    if self.root.is_dir() else f"{self.root} does not exist")
            raise FileNotFoundError(
                f"subject folder {self.folder} not found ({held}): put the "
                "subject's images in root/<subject>/ as google/dreambooth's dataset does, or write a "
                "shapes-world subject with orthodiff.data.subjects.write_subject(root, name)")
        self.size = check_image_size(size)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        self.repeats = repeats
        self.class_word = class_word or find_class_word(self.root, subject)
        template = prompt_template or _read_text(self.folder / "prompt.txt") or DEFAULT_TEMPLATE
        if "{token}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{token}} placeholder")
        self.prompt = template.format(token=token, cls=self.class_word)
        self.files, self.images = self._read_images()

    def _read_images(self):
        files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{self.folder} holds no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}); "
                             "put the subject's 3-5 photos there")
        kept, images, bad = [], [], []
        for path in files:
            try:
                images.append(resize_crop(read_image(path), self.size))
                kept.append(path)
            except (OSError, cv2.error) as error:
                bad.append(f"{path.name} ({error})")
        if not images:
            raise ValueError(f"none of the {len(files)} images in {self.folder} could be read: "
                             f"{'; '.join(bad)}; replace them with readable JPEG/PNG/WebP files")
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image(s) in {self.folder}: {'; '.join(bad)}; "
                          f"training on the other {len(images)}", stacklevel=3)
        return kept, images

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image_index = index % len(self.images)
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[image_index])).permute(2, 0, 1)
        return {"pixel_values": pixels.float() / 127.5 - 1, "text": self.prompt, "index": image_index}
