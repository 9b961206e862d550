"""Subject-driven generation data: shapes-world subjects and the DreamBooth folder layout.

Shapes-world subjects. The embedded tiny Stable Diffusion knows every word of the shapes
world's captions, but each shape it has seen is one flat colour. A *subject* is a shape
no caption can describe: its own class word (``square``, ``circle``, ``triangle``), two
fixed colours and an inner pattern, drawn with the shapes world's renderer (same
sub-pixel polygons, same 64-pixel reference frame, same colour-contrast rules):

    striped_square   a green square with a red stripe down its middle
    badge_circle     a red circle with a yellow cross inside it
    inlaid_triangle  a green triangle with an upside-down blue triangle inlaid in it

The colours and the pattern are the subject's identity; position, size and rotation
vary from image to image. A fine-tuning method has to bind the pattern to a new token
("a sks square") and still follow the rest of the prompt, which ``EVAL_PROMPTS`` vary
in the shapes vocabulary only (background, an extra ordinary shape, the subject's
colour, two copies); each records what it asks for, so the shapes classifier oracle
(``orthodiff.eval.oracles``) can check it. ``reference_images`` renders what an ideal
answer to such a prompt looks like.

The patterns are as coarse as the tiny model's f=4 VAE allows (a pattern band is 1-2
latent pixels wide), and even so its round trip softens them (the badge's cross comes
back as a yellow blob with stubby arms): the VAE reconstruction of the training images
is the ceiling of any method's subject fidelity, and worth reporting next to it.

Every subject is legal on every background: the colours that touch the background
contrast with all four (``MIN_CONTRAST``), and a pattern differs from the body by at
least ``MIN_DETAIL_CONTRAST`` grey levels, so Canny sees it. The extra shapes and
recolourings in ``EVAL_PROMPTS`` use only orange and purple, which no subject uses, so
the world's rule that the shapes of a scene have distinct colours holds.

The DreamBooth layout (google/dreambooth's ``dataset/``): one folder per subject,

    root/<subject>/00.jpg 01.png ...   3-6 images (*.jpg, *.jpeg, *.png, *.webp)
    root/<subject>/class.txt           the class word, e.g. "dog"            (optional)
    root/<subject>/prompt.txt          the instance prompt template          (optional)
    root/prompts_and_classes.txt       google/dreambooth's subject,class list (optional)

``SubjectDataset`` reads it; ``write_subject`` writes a shapes-world subject in it (its
prompt.txt names the training background, "a {token} {cls} on a white background", the
way every shapes caption names one), so the default data goes through the same loader
as real photographs.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from orthodiff.data.datasets import read_image, resize_crop
from orthodiff.data.shapes import (_OUTLINES, BACKGROUNDS, COLORS, MAX_ROTATION, REFERENCE_SIZE,
                                   SHAPES, SIZE_RANGE, _fill, _place, allowed_colors, gray_level)

GENERATOR_VERSION = 1  # bump when a seed would render a different subject image
# Grey levels between a pattern and its body; the world's colours are >= 28 apart, the
# least a weak Canny edge needs.
MIN_DETAIL_CONTRAST = 28
# Subjects are drawn larger than ordinary shapes (11-18) so their pattern survives the VAE.
SUBJECT_SIZE_RANGE = (15.0, 20.0)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_TEMPLATE = "a {token} {cls}"
MARKER = "subject.json"  # written by write_subject: says the folder is ours to replace
DREAMBOOTH_CLASSES = "prompts_and_classes.txt"
# Rare strings that some tokenizers keep as one piece (CLIP's BPE keeps sks, ohwx, bnp, phol).
CANDIDATE_TOKENS = ("sks", "ohwx", "bnp", "phol", "zwx", "qzv", "vkz", "xjy")
# Every word of a shapes-world caption: a subject token must not be one of them.
WORLD_WORDS = frozenset({"a", "an", "and", "on", "background", *SHAPES, *COLORS,
                         *(word for name in BACKGROUNDS for word in name.split())})

_S = math.sqrt(0.5)  # half the side of the unit square (circumradius 1)


def _stripes(count: int = 1) -> tuple:
    """`count` stripes across the unit square, as wide as the bands between them."""
    band = 2 * _S / (2 * count + 1)
    return tuple(np.array([(x, -_S), (x + band, -_S), (x + band, _S), (x, _S)])
                 for x in (-_S + (2 * k + 1) * band for k in range(count)))


@dataclass(frozen=True, eq=False)
class Subject:
    """A shapes-world subject: a `class_word` silhouette in colors[0] with `details`
    (unit polygons in the shape's own frame, clipped to the silhouette) in colors[1]."""

    name: str
    class_word: str
    colors: tuple  # (body, pattern), both part of the identity
    background: str  # the background of its training images
    details: tuple
    details_touch_edge: bool  # then the pattern colour also borders the background
    description: str

    def outline(self) -> np.ndarray:
        return _OUTLINES[self.class_word]


SUBJECTS = {s.name: s for s in (
    # One stripe a third of the side wide: thinner stripes (two, 4-5 px each) come back
    # from the tiny VAE (f=4) as a muddy blend, so no model could reproduce them.
    Subject("striped_square", "square", ("green", "red"), "white", _stripes(1), True,
            "a green square with a red stripe down its middle, parallel to two sides"),
    Subject("badge_circle", "circle", ("red", "yellow"), "dark gray",
            (0.65 * _OUTLINES["cross"],), False,
            "a red circle with a yellow cross inside it (the cross turns with the subject)"),
    # Point-down, with its tips 0.1 * size short of the edges (the inradius is 0.5).
    Subject("inlaid_triangle", "triangle", ("green", "blue"), "light gray",
            (-0.4 * _OUTLINES["triangle"],), False,
            "a green triangle with an upside-down blue triangle inlaid in its middle"),
)}

# Evaluation prompts: what each asks beyond the subject is recorded, for the oracle.
#   background  the scene's background
#   extra       (colour, kind) of one ordinary shape next to the subject
#   color       the subject's body recoloured (its pattern keeps its colour)
#   count       copies of the subject
# Words are the shapes captions' own (no "two", no plurals, no positions: the tiny
# model's text encoder never saw them). Extras and recolourings use orange and purple,
# which no subject uses, each on a background it contrasts with.
EVAL_PROMPTS = [
    {"prompt": "a {token} {cls} on a white background", "background": "white"},
    {"prompt": "a {token} {cls} on a light gray background", "background": "light gray"},
    {"prompt": "a {token} {cls} on a dark gray background", "background": "dark gray"},
    {"prompt": "a {token} {cls} on a black background", "background": "black"},
    {"prompt": "a {token} {cls} and a purple circle on a white background",
     "background": "white", "extra": ("purple", "circle")},
    {"prompt": "a {token} {cls} and an orange cross on a dark gray background",
     "background": "dark gray", "extra": ("orange", "cross")},
    {"prompt": "a purple triangle and a {token} {cls} on a light gray background",
     "background": "light gray", "extra": ("purple", "triangle")},
    {"prompt": "an orange square and a {token} {cls} on a black background",
     "background": "black", "extra": ("orange", "square")},
    {"prompt": "a purple {token} {cls} on a white background", "background": "white",
     "color": "purple"},
    {"prompt": "an orange {token} {cls} on a black background", "background": "black",
     "color": "orange"},
    {"prompt": "a {token} {cls} and a {token} {cls} on a white background",
     "background": "white", "count": 2},
    {"prompt": "a {token} {cls} and a {token} {cls} on a dark gray background",
     "background": "dark gray", "count": 2},
]


def expected_labels(name: str, spec: dict) -> dict:
    """What a faithful image for EVAL_PROMPTS entry `spec` shows, in the classifier
    oracle's terms: background, colours that must be present / absent, (colour, kind)
    pairs that must be present, and the number of subject copies. A recolouring asks
    for the new colour *and* the old body colour gone: a red/yellow badge alone already
    reads as containing orange where its two colours meet."""
    subject = get_subject(name)
    subject_colors(name, spec.get("color"))  # validates the recolouring
    return {"background": spec.get("background", subject.background),
            "colors_present": [spec["color"]] if "color" in spec else [],
            "colors_absent": [subject.colors[0]] if "color" in spec else [],
            "pairs_present": [tuple(spec["extra"])] if "extra" in spec else [],
            "copies": int(spec.get("count", 1))}


def instance_prompt(token: str, cls: str, background: str | None = None) -> str:
    """'a sks square on a white background' ('a sks square' without a background)."""
    prompt = f"a {token} {cls}"
    return prompt if background is None else f"{prompt} on {_article(background)} {background} background"


def class_prompt(cls: str, background: str | None = None) -> str:
    """The instance prompt without the token, for prior preservation: 'a square on a
    white background' ('a square' without a background)."""
    prompt = f"a {cls}"
    return prompt if background is None else f"{prompt} on {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- rendering ---------------------------------------------------------------------------

def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(f"unknown subject {name!r}: choose from {list(SUBJECTS)}")
    return SUBJECTS[name]


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size must be an integer of at least 16 pixels, got {image_size!r}")
    return int(image_size)


def _pixels(unit, center, size, rotation, scale) -> np.ndarray:
    """Unit polygon -> pixels of an image `scale` times the reference frame (the scaling
    of make_scene: pixel centres stay aligned)."""
    center = (np.asarray(center, np.float64) + 0.5) * scale - 0.5
    return _place(unit, center, size * scale, rotation)


def _mask(polygon: np.ndarray, image_size: int) -> np.ndarray:
    return _fill(np.zeros((image_size, image_size), np.uint8), polygon).astype(bool)


def subject_mask(name: str, *, center, size: float, rotation: float,
                 image_size: int = REFERENCE_SIZE) -> np.ndarray:
    """(image_size, image_size) bool silhouette of a subject placed as in render_subject."""
    subject = get_subject(name)
    scale = _check_image_size(image_size) / REFERENCE_SIZE
    return _mask(_pixels(subject.outline(), center, size, rotation, scale), image_size)


def subject_colors(name: str, color: str | None = None) -> tuple[str, str]:
    """(body, pattern) colours of a subject, the body recoloured to `color` if given."""
    subject = get_subject(name)
    body, pattern = subject.colors
    if color is None:
        return body, pattern
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}: choose from {list(COLORS)}")
    if color == pattern:
        raise ValueError(f"cannot recolour {name} {color}: its pattern is {pattern}")
    return color, pattern


def _check_legal(name: str, background: str, colors: tuple, extras) -> None:
    """The shapes world's colour rules for a subject scene (see the module docstring)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}: choose from {list(BACKGROUNDS)}")
    subject = get_subject(name)
    body, pattern = colors
    edge = (body, pattern) if subject.details_touch_edge else (body,)
    allowed = allowed_colors(background)
    for color in edge:
        if color not in allowed:
            raise ValueError(f"{name} in {body}/{pattern} cannot be drawn on a {background} "
                             f"background: {color} is too close to it in grey level (allowed "
                             f"there: {list(allowed)})")
    if abs(gray_level(COLORS[body]) - gray_level(COLORS[pattern])) < MIN_DETAIL_CONTRAST:
        raise ValueError(f"{name}'s body {body} and pattern {pattern} are less than "
                         f"{MIN_DETAIL_CONTRAST} grey levels apart")
    used = set(colors)
    for shape in extras:
        kind, color = shape.get("kind"), shape.get("color")
        if kind not in SHAPES or color not in COLORS or not {"center", "size"} <= set(shape):
            raise ValueError(f"extra shape {shape} needs a kind in {list(SHAPES)}, a color in "
                             f"{list(COLORS)}, a center and a size")
        if color not in allowed:
            raise ValueError(f"extra {color} {kind} cannot be drawn on a {background} "
                             f"background (allowed colours there: {list(allowed)})")
        if color in used:  # the world's rule, which the classifier oracle relies on
            raise ValueError(f"extra {color} {kind}: every shape of a scene needs its own "
                             f"colour, and {sorted(used)} are taken")
        used.add(color)


def _draw_subject(image, subject: Subject, colors, center, size, rotation, scale) -> None:
    body = _mask(_pixels(subject.outline(), center, size, rotation, scale), len(image))
    image[body] = COLORS[colors[0]]
    for detail in subject.details:
        # Clipped to the body, so a pattern never leaks a pixel past the silhouette.
        image[_mask(_pixels(detail, center, size, rotation, scale), len(image)) & body] = COLORS[colors[1]]


def _draw_shape(image, shape: dict, scale) -> None:
    polygon = _pixels(_OUTLINES[shape["kind"]], shape["center"], shape["size"],
                      shape.get("rotation", 0.0), scale)
    image[_mask(polygon, len(image))] = COLORS[shape["color"]]


def render_subject(name: str, *, background: str, center, size: float, rotation: float,
                   extra_shapes=(), image_size: int = REFERENCE_SIZE,
                   color: str | None = None) -> np.ndarray:
    """(image_size, image_size, 3) uint8 RGB: subject `name` on `background`.

    Geometry is in the 64-pixel reference frame (scaled to image_size as make_scene
    does): `center` [x, y], `size` the circumradius, `rotation` degrees clockwise.
    `extra_shapes` are ordinary shapes, dicts with kind, color, center, size and
    rotation, drawn in order beneath the subject. `color` recolours the subject's body.
    Raises ValueError for a scene the shapes world's colour rules forbid."""
    subject = get_subject(name)
    image_size = _check_image_size(image_size)
    colors = subject_colors(name, color)
    extra_shapes = list(extra_shapes)
    _check_legal(name, background, colors, extra_shapes)
    scale = image_size / REFERENCE_SIZE
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    for shape in extra_shapes:
        _draw_shape(image, shape, scale)
    _draw_subject(image, subject, colors, center, size, rotation, scale)
    return image


def _rng(name: str, seed: int, purpose: str) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # crc32, not hash(): the same on every run, and different per subject and purpose.
    return np.random.default_rng([int(seed), zlib.crc32(f"{name}/{purpose}".encode())])


def _placement(rng, size_range) -> dict:
    size = round(float(rng.uniform(*size_range)), 2)
    lo, hi = size + 1.0, REFERENCE_SIZE - 2.0 - size  # the whole shape inside, as make_scene
    return {"center": [round(float(rng.uniform(lo, hi)), 2), round(float(rng.uniform(lo, hi)), 2)],
            "size": size, "rotation": round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 2)}


def _layout(rng, size_range, count: int) -> list[dict]:
    """`count` placements whose circumcircles stay a pixel apart, so nothing occludes
    anything (two or three ordinary-sized shapes fit within a few tries)."""
    for _ in range(1000):
        placements = [_placement(rng, size_range) for _ in range(count)]
        if all(math.dist(a["center"], b["center"]) >= a["size"] + b["size"] + 1
               for i, a in enumerate(placements) for b in placements[i + 1:]):
            return placements
    raise ValueError(f"could not place {count} shapes of sizes {size_range} apart in one image")


def subject_placements(name: str, n: int = 4, seed: int = 0) -> list[dict]:
    """The center/size/rotation of subject_images(name, n, seed), reference frame."""
    get_subject(name)
    rng = _rng(name, seed, "train")
    return [_placement(rng, SUBJECT_SIZE_RANGE) for _ in range(_count(n))]


def _count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of images, got {n!r}")
    return int(n)


def subject_images(name: str, n: int = 4, seed: int = 0, size: int = REFERENCE_SIZE,
                   background: str | None = None) -> list[np.ndarray]:
    """`n` training images of a subject (uint8 RGB, size x size), alone on its training
    background (or `background`), at varied position, size and rotation; the same
    images for the same seed. DreamBooth trains on 3-5 of these."""
    background = get_subject(name).background if background is None else background
    return [render_subject(name, background=background, image_size=size, **placement)
            for placement in subject_placements(name, n, seed)]


def reference_images(name: str, spec: dict, n: int = 4, seed: int = 0,
                     size: int = REFERENCE_SIZE) -> list[np.ndarray]:
    """`n` images of what an ideal answer to an EVAL_PROMPTS entry looks like: the
    subject (recoloured, twice, next to the extra shape, as `spec` asks) on the asked
    background, nothing overlapping. For scoring references and for checking that the
    oracle reads each attribute off a perfect image."""
    subject = get_subject(name)
    background = spec.get("background", subject.background)
    copies = int(spec.get("count", 1))
    extra = spec.get("extra")
    rng = _rng(name, seed, "reference:" + json.dumps(spec, sort_keys=True))
    # Several objects get ordinary shapes' sizes, so that they fit side by side.
    size_range = SUBJECT_SIZE_RANGE if copies == 1 and extra is None else SIZE_RANGE
    images = []
    for _ in range(_count(n)):
        placements = _layout(rng, size_range, copies + (extra is not None))
        extras = []
        if extra is not None:
            color, kind = extra
            extras = [{"kind": kind, "color": color, **placements.pop(),
                       **({"rotation": 0.0} if kind == "circle" else {})}]
        image = render_subject(name, background=background, extra_shapes=extras, image_size=size,
                               color=spec.get("color"), **placements[0])
        for placement in placements[1:]:
            _draw_subject(image, subject, subject_colors(name, spec.get("color")),
                          scale=size / REFERENCE_SIZE, **placement)
        images.append(image)
    return images


# --- the DreamBooth layout ---------------------------------------------------------------

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
    files, marker = _subject_files(name, _count(n), seed, _check_image_size(size))
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
    """The images of one subject in the DreamBooth layout (see the module docstring).

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
        self.size = _check_image_size(size)
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


# --- the token -----------------------------------------------------------------------------

def _pieces(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_piece_tokens(tokenizer, candidates=CANDIDATE_TOKENS) -> list[str]:
    """The candidates `tokenizer` keeps as one piece and that are no shapes-world word."""
    return [c for c in candidates if c not in WORLD_WORDS and len(_pieces(tokenizer, c)) == 1]


def check_token(tokenizer, token: str) -> int:
    """The id of `token` if `tokenizer` keeps it as one piece (CLIP: 'sks' -> 'sks</w>'),
    else ValueError suggesting rare strings that are one piece in this tokenizer. A word
    of the shapes captions is refused too: the model already means something by it."""
    suggestion = (", ".join(repr(t) for t in single_piece_tokens(tokenizer)[:3])
                  or "a rare short string that this tokenizer keeps whole")
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"the subject token must be a non-empty string, got {token!r}; try {suggestion}")
    if token.strip().lower() in WORLD_WORDS:
        raise ValueError(f"token {token!r} is a word of the shapes captions, which the model already "
                         f"knows; use a rare one-piece token instead, e.g. {suggestion}")
    ids = _pieces(tokenizer, token)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"token {token!r} is not one piece for this tokenizer (it becomes {pieces}), so "
                         f"one embedding cannot hold the subject; use a one-piece token such as {suggestion}")
    return int(ids[0])
