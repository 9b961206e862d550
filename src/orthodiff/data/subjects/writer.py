"""Writing a shapes-world subject in the DreamBooth layout (``write_subject``), so the
default data goes through the same loader as real photographs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from orthodiff.data.shapes import REFERENCE_SIZE
from orthodiff.data.subjects.catalogue import get_subject, instance_prompt
from orthodiff.data.subjects.render import check_image_count, check_image_size, subject_images

GENERATOR_VERSION = 1  # bump when a seed would render a different subject image
MARKER = "subject.json"  # written by write_subject: says the folder is ours to replace


def _subject_files(name: str, n: int, seed: int, size: int) -> tuple[dict[str, bytes], dict]:
    """The files of root/<name>/ by file name, and the marker's record."""
    subject = get_subject(name)
    files = {}
    for i, image in enumerate(subject_images(name, n, seed, size)):
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode image {i} of {name} as PNG")
        files[f"{i:02d}.png"] = png.tobytes()
    files["class.txt"] = (subject.class_word + "\n").encode()
    files["prompt.txt"] = (instance_prompt("{token}", "{cls}", subject.background) + "\n").encode()
    marker = {"generator": "orthodiff.data.subjects", "version": GENERATOR_VERSION,
              "subject": name, "n": n, "seed": seed, "size": size,
              "description": subject.description, "colors": list(subject.colors),
              "background": subject.background}
    files[MARKER] = _marker_bytes(marker, complete=True)
    return files, marker


def _marker_bytes(marker: dict, complete: bool) -> bytes:
    return (json.dumps({**marker, "complete": complete}, indent=2) + "\n").encode()


def write_subject(root: str | Path, name: str, n: int = 4, seed: int = 0,
                  overwrite: bool = False, size: int = REFERENCE_SIZE) -> Path:
    """Write subject `name` as root/<name>/ in the DreamBooth layout (00.png ...,
    class.txt, prompt.txt and subject.json, the record of what was written) and return
    that folder. A folder already holding exactly these files is left as it is, and an
    interrupted write of them is redone. A folder holding other content is replaced
    only with `overwrite`, and only if write_subject wrote it (it has subject.json);
    anything else is never touched."""
    files, marker = _subject_files(name, check_image_count(n), seed, check_image_size(size))
    folder = Path(root).expanduser() / name
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present:
        if set(present) == set(files) and all((folder / f).read_bytes() == data for f, data in files.items()):
            return folder
        if not (folder / MARKER).is_file():
            raise ValueError(f"{folder} is not empty and was not written by write_subject (no "
                             f"{MARKER}); choose another root or empty the folder")
        interrupted = (folder / MARKER).read_bytes() == _marker_bytes(marker, complete=False)
        if not (interrupted or overwrite):
            changed = sorted(set(present) ^ set(files) | {
                f for f in set(present) & set(files) if (folder / f).read_bytes() != files[f]})
            raise ValueError(f"{folder} holds a different version of subject {name} (differs "
                             f"in {changed}); pass overwrite=True to replace it, or choose "
                             "another root")
        for f in present:  # ours: images, class.txt, prompt.txt, the marker
            if (folder / f).is_file():
                (folder / f).unlink()
    folder.mkdir(parents=True, exist_ok=True)
    # Marked incomplete until the last file is written, so an interrupted run is redone.
    (folder / MARKER).write_bytes(_marker_bytes(marker, complete=False))
    for f, data in files.items():
        if f != MARKER:
            (folder / f).write_bytes(data)
    (folder / MARKER).write_bytes(files[MARKER])
    return folder
