"""The procedural "shapes world": tiny scenes with exact ground truth for every control.

A scene is a plain background with 1-3 coloured shapes drawn in z-order (later shapes
occlude earlier ones) and a caption naming them:

    "a red triangle, a blue circle and an orange cross on a white background"

Ground truth, all exact because the scene is rendered from its own description:

- seg: uint8 class map, 0 = background, 1..K = shape kind (``SEG_CLASSES``).
- depth: float32 in [0, 1], distance-like: background 1.0, the shape drawn at z-order z
  at ``1 - DEPTH_STEP * (z + 1)`` (0.8, 0.6, 0.4). The step 0.2 makes every level a
  whole number on the 8-bit scale (255, 204, 153, 102), so depth PNGs are lossless.
- landmarks: float32 (MAX_SHAPES, NUM_LANDMARKS, 2) pixel (x, y), one row per shape in
  z-order, plus a bool mask (MAX_SHAPES, NUM_LANDMARKS) that is False for absent slots.
  Point 0 is the centre, points 1-4 follow one rule per kind:
    circle    top, right, bottom, left points of the circle (circles have rotation 0);
    square    corners, clockwise from the top-left one;
    triangle  apex, bottom-right, bottom-left vertices, then the base midpoint;
    cross     tips of the arms (midpoint of each end edge): top, right, bottom, left.
  "Top-left", "apex", ... name the point of the unrotated shape. Rotations stay within
  +-MAX_ROTATION degrees (clockwise on screen), well inside each kind's symmetry, so the
  order can be read off the image without ambiguity.
- canny: ``cv2.Canny(gray, 100, 200)`` of the image, the evaluation protocol's call.

Pixel coordinates put pixel centres at integers. A shape's ``size`` is the distance from
its centre to its landmarks 1-4 (circumradius; the base midpoint of a triangle is at
size / 2). Geometry is sampled in a 64-pixel reference frame and scaled, so a seed gives
the same scene at every resolution.

Colours are far apart in RGB and at least 28 grey levels apart (so Canny finds weak
edges between any two shapes), and a colour is only drawn on a background at least
``MIN_CONTRAST`` grey levels away from it (so a shape's outline is a strong Canny edge).
Shapes in one scene have distinct colours; each shows its centre and at least
``MIN_VISIBLE`` of its area.

Each scene comes from one integer seed. Split ``s`` uses seeds ``SPLIT_SEEDS[s] + i``
for i in range(n), so splits are disjoint and val/test do not change when --n grows.

    python -m orthodiff.data.shapes --out data/shapes --n 20000

writes, for each split, ``images/ seg/ depth/ canny/ landmarks/`` PNGs and a
``metadata.jsonl`` (Hugging Face imagefolder convention: ``file_name`` + ``text``), and
``info.json`` at the root, which a re-run compares to decide whether the folder already
holds this dataset.

The parts: ``catalogue`` (kinds, colours, backgrounds, contrast rules, depth levels,
captions, split seeds), ``render`` (placing shapes, ``make_scene``), ``keypoints``
(landmarks as the keypoint detector's dense maps, and back), ``writer`` (the folder
format) and ``cli``. Everything public is importable from here.
"""

from orthodiff.data.shapes.catalogue import (
                                             BACKGROUNDS,
                                             COLORS,
                                             DEPTH_STEP,
                                             GENERATOR_VERSION,
                                             LANDMARK_COLORS,
                                             MAX_ROTATION,
                                             MAX_SHAPES,
                                             MIN_CONTRAST,
                                             MIN_VISIBLE,
                                             NUM_LANDMARKS,
                                             REFERENCE_SIZE,
                                             SEG_CLASSES,
                                             SHAPES,
                                             SIZE_RANGE,
                                             SPLIT_SEEDS,
                                             SPLIT_STRIDE,
                                             UNIT_LANDMARKS,
                                             UNIT_OUTLINES,
                                             allowed_colors,
                                             article,
                                             caption_for,
                                             check_names,
                                             default_eval_size,
                                             gray_level,
                                             shape_depth,
                                             split_seeds,
)
from orthodiff.data.shapes.cli import main
from orthodiff.data.shapes.keypoints import OFFSET_SCALE, decode_keypoints, keypoint_targets
from orthodiff.data.shapes.render import (
                                             Scene,
                                             depth_to_png,
                                             make_scene,
                                             place_polygon,
                                             polygon_mask,
                                             render_landmarks,
                                             sample_placement,
                                             scene_caption,
                                             shape_landmarks,
                                             shape_masks,
                                             shape_outline,
)
from orthodiff.data.shapes.writer import (
                                             FILE_KEYS,
                                             FOLDERS,
                                             dataset_info,
                                             read_metadata,
                                             scene_record,
                                             write_dataset,
                                             write_split,
)

__all__ = ["BACKGROUNDS", "COLORS", "DEPTH_STEP", "FILE_KEYS", "FOLDERS", "GENERATOR_VERSION", "LANDMARK_COLORS",
           "MAX_ROTATION", "MAX_SHAPES", "MIN_CONTRAST", "MIN_VISIBLE", "NUM_LANDMARKS", "OFFSET_SCALE",
           "REFERENCE_SIZE", "SEG_CLASSES", "SHAPES", "SIZE_RANGE", "SPLIT_SEEDS", "SPLIT_STRIDE", "Scene",
           "UNIT_LANDMARKS", "UNIT_OUTLINES", "allowed_colors", "article", "caption_for", "check_names",
           "dataset_info", "decode_keypoints", "default_eval_size", "depth_to_png", "gray_level", "keypoint_targets",
           "main", "make_scene", "place_polygon", "polygon_mask", "read_metadata", "render_landmarks",
           "sample_placement", "scene_caption", "scene_record", "shape_depth", "shape_landmarks", "shape_masks",
           "shape_outline",
           "split_seeds", "write_dataset", "write_split"]
