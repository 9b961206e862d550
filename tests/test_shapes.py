import json
import logging
import re

import cv2
import numpy as np
import pytest

from orthodiff.data import shapes as sw
from orthodiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    MAX_SHAPES,
    NUM_LANDMARKS,
    SEG_CLASSES,
    SHAPES,
    make_scene,
    read_metadata,
    render_landmarks,
    write_dataset,
)

SCENES = [make_scene(seed) for seed in range(300)]


def _read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _read_gray(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_same_seed_gives_identical_scene_and_different_seeds_differ():
    a, b = make_scene(1234), make_scene(1234)
    for field in ("image", "seg", "depth", "landmarks", "landmark_mask", "canny"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.caption == b.caption and a.shapes == b.shapes and a.background == b.background
    images = {s.image.tobytes() for s in SCENES[:100]}
    assert len(images) == 100
    assert len({s.caption for s in SCENES}) > 150


def test_scene_arrays_have_the_documented_shapes_and_types():
    s = SCENES[0]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.seg.shape == (64, 64) and s.seg.dtype == np.uint8
    assert s.depth.shape == (64, 64) and s.depth.dtype == np.float32
    assert s.landmarks.shape == (MAX_SHAPES, NUM_LANDMARKS, 2) and s.landmarks.dtype == np.float32
    assert s.landmark_mask.shape == (MAX_SHAPES, NUM_LANDMARKS) and s.landmark_mask.dtype == bool
    assert s.canny.shape == (64, 64) and set(np.unique(s.canny)) <= {0, 255}


def _distance_inside(shape, point):
    """Signed distance of `point` to the shape's outline polygon, positive inside."""
    outline = sw.shape_outline(shape["kind"], shape["center"], shape["size"], shape["rotation"])
    return cv2.pointPolygonTest(outline.astype(np.float32), tuple(map(float, point)), True)


def test_ground_truth_agrees_with_z_order_and_image():
    checked = 0
    for s in SCENES:
        assert s.depth.max() == 1.0 and (s.depth[s.seg == 0] == 1.0).all()
        # Every pixel is the background or the colour of the shape that owns it.
        assert (s.image[s.seg == 0] == BACKGROUNDS[s.background]).all()
        for shape in s.shapes:
            z = shape["z"]
            centre = s.landmarks[z, 0]
            np.testing.assert_allclose(centre, shape["center"], atol=1e-4)
            assert shape["depth"] == pytest.approx(1.0 - 0.2 * (z + 1))
            # The generator keeps centres visible; check it with the geometry alone:
            # no later (nearer) shape's outline contains this centre.
            assert all(_distance_inside(t, centre) < 0 for t in s.shapes[z + 1:])
            x, y = np.round(centre).astype(int)
            assert SEG_CLASSES[s.seg[y, x]] == shape["kind"]
            assert s.depth[y, x] == pytest.approx(shape["depth"], abs=1e-6)
            assert tuple(s.image[y, x]) == COLORS[shape["color"]]
            checked += 1
        gray = cv2.cvtColor(s.image, cv2.COLOR_RGB2GRAY)
        np.testing.assert_array_equal(s.canny, cv2.Canny(gray, 100, 200))
        for shape in s.shapes:
            assert f"{shape['color']} {shape['kind']}" in s.caption
        assert s.caption.endswith(f"{s.background} background")
        assert s.landmark_mask.sum() == NUM_LANDMARKS * len(s.shapes)
        assert not s.landmark_mask[len(s.shapes):].any()
    assert checked > 500


def test_depth_levels_by_z_order_and_exact_in_8_bit():
    levels = set()
    for s in SCENES:
        png = sw.depth_to_png(s.depth)
        np.testing.assert_array_equal((png / 255).astype(np.float32), s.depth)
        levels |= set(np.unique(png).tolist())
    assert levels == {255, 204, 153, 102}


def test_captions_read_like_the_issue_examples():
    one = [s for s in SCENES if len(s.shapes) == 1][0]
    three = [s for s in SCENES if len(s.shapes) == 3][0]
    assert re.fullmatch(r"an? \w+ \w+ on an? [\w ]+ background", one.caption)
    assert re.fullmatch(r"an? \w+ \w+, an? \w+ \w+ and an? \w+ \w+ on an? [\w ]+ background",
                        three.caption)
    shapes = [{"kind": "triangle", "color": "red"}, {"kind": "circle", "color": "blue"}]
    assert sw.caption_for(shapes, "dark gray") == \
        "a red triangle and a blue circle on a dark gray background"
    assert sw.caption_for([{"kind": "cross", "color": "orange"}], "white") == \
        "an orange cross on a white background"


def test_vocabulary_coverage_and_scene_rules_over_500_scenes():
    scenes = SCENES + [make_scene(seed) for seed in range(300, 500)]
    kinds = {sh["kind"] for s in scenes for sh in s.shapes}
    colors = {sh["color"] for s in scenes for sh in s.shapes}
    assert kinds == set(SHAPES) and colors == set(COLORS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    counts = [len(s.shapes) for s in scenes]
    assert {1, 2, 3} == set(counts) and min(counts.count(k) for k in (1, 2, 3)) > 100
    overlapping = sum(min(sh["visible_fraction"] for sh in s.shapes) < 1 for s in scenes)
    assert overlapping > 100
    # Any two colours differ by more than 100 / 4 grey levels: a weak Canny edge at least.
    levels = sorted(sw.gray_level(c) for c in COLORS.values())
    assert min(np.diff(levels)) > 25
    for s in scenes:
        level = sw.gray_level(BACKGROUNDS[s.background])
        used = [sh["color"] for sh in s.shapes]
        assert len(set(used)) == len(used)
        assert all(abs(sw.gray_level(COLORS[c]) - level) >= sw.MIN_CONTRAST for c in used)
        assert all(sh["visible_fraction"] >= sw.MIN_VISIBLE for sh in s.shapes)


def test_canny_finds_the_outline_of_every_unoccluded_shape():
    # The contrast rule exists so the Canny control shows each shape's outline.
    recalls = []
    for s in SCENES:
        if len(s.shapes) != 1:
            continue
        mask = (s.seg > 0).astype(np.uint8)
        boundary = mask - cv2.erode(mask, np.ones((3, 3), np.uint8))
        near_edge = cv2.dilate(s.canny, np.ones((3, 3), np.uint8)) > 0
        recalls.append(near_edge[boundary > 0].mean())
    assert len(recalls) > 50 and min(recalls) > 0.95


def test_landmark_rules_per_kind():
    square = sw.shape_landmarks("square", (30, 30), 10, 0)
    np.testing.assert_allclose(square[1:], 30 + 10 * np.sqrt(0.5) * np.array(
        [(-1, -1), (1, -1), (1, 1), (-1, 1)]), atol=1e-9)  # clockwise from top-left
    triangle = sw.shape_landmarks("triangle", (30, 30), 10, 0)
    np.testing.assert_allclose(triangle[1], (30, 20), atol=1e-9)  # apex on top
    assert triangle[2, 0] > 30 > triangle[3, 0]  # bottom-right, then bottom-left
    np.testing.assert_allclose(triangle[4], (triangle[2] + triangle[3]) / 2, atol=1e-9)
    np.testing.assert_allclose(triangle[0], triangle[1:4].mean(0), atol=1e-9)
    for kind in ("circle", "cross"):
        np.testing.assert_allclose(sw.shape_landmarks(kind, (30, 30), 10, 0)[1:],
                                   [(30, 20), (40, 30), (30, 40), (20, 30)], atol=1e-9)
    # Rotation is clockwise on screen (y down): the top corner moves right.
    turned = sw.shape_landmarks("cross", (30, 30), 10, 30)
    np.testing.assert_allclose(turned[1], (35, 30 - 10 * np.sqrt(3) / 2), atol=1e-9)
    # Points 1-4 lie at `size` from the centre, on or inside the drawn shape.
    for s in SCENES[:100]:
        for sh in s.shapes:
            points = s.landmarks[sh["z"]]
            dist = np.linalg.norm(points[1:] - points[0], axis=1)
            expected = [1, 1, 1, 0.5] if sh["kind"] == "triangle" else [1, 1, 1, 1]
            np.testing.assert_allclose(dist, sh["size"] * np.array(expected), atol=1e-3)
            assert all(_distance_inside(sh, p) > -1e-3 for p in points)
            assert sh["kind"] != "circle" or sh["rotation"] == 0
            assert abs(sh["rotation"]) <= sw.MAX_ROTATION


def test_render_landmarks_draws_a_disc_per_present_point():
    s = [s for s in SCENES if len(s.shapes) == 2][0]
    image = render_landmarks(s.landmarks, s.landmark_mask, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for z in range(2):
        for x, y in np.round(s.landmarks[z]).astype(int):
            assert tuple(image[y, x]) in sw.LANDMARK_COLORS
    lit = (image.max(axis=2) > 0).sum()
    assert 10 * 5 <= lit <= 10 * 13  # 10 discs of radius 1.5 px (5-13 px each, some overlap)
    nothing = render_landmarks(s.landmarks, np.zeros_like(s.landmark_mask), 64)
    assert nothing.max() == 0


def test_same_seed_renders_the_same_scene_at_other_sizes():
    small, large = make_scene(77), make_scene(77, size=128)
    assert small.caption == large.caption
    for a, b in zip(small.shapes, large.shapes):
        np.testing.assert_allclose((np.array(a["center"]) + 0.5) * 2 - 0.5, b["center"], atol=1e-3)
        assert b["size"] == pytest.approx(2 * a["size"])
    np.testing.assert_allclose((small.landmarks + 0.5) * 2 - 0.5,
                               np.where(large.landmark_mask[..., None], large.landmarks, -0.5),
                               atol=1e-3)
    shrunk = cv2.resize(large.seg, (64, 64), interpolation=cv2.INTER_NEAREST)
    assert (shrunk == small.seg).mean() > 0.97


def test_write_read_back_and_rerun(tmp_path, caplog):
    out = tmp_path / "shapes"
    assert write_dataset(out, 20, n_val=5, n_test=5, progress=False)
    info = json.loads((out / "info.json").read_text())
    assert info["complete"] and info["splits"]["train"]["n"] == 20
    seeds = {}
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        records = read_metadata(out / split)
        assert len(records) == n
        seeds[split] = {r["seed"] for r in records}
        for r in records[:8]:
            scene = make_scene(r["seed"])
            assert r["text"] == scene.caption and r["shapes"] == scene.shapes
            np.testing.assert_array_equal(_read_rgb(out / split / r["file_name"]), scene.image)
            np.testing.assert_array_equal(_read_gray(out / split / r["seg"]), scene.seg)
            depth = _read_gray(out / split / r["depth"])
            np.testing.assert_array_equal((depth / 255).astype(np.float32), scene.depth)
            np.testing.assert_array_equal(_read_gray(out / split / r["canny"]), scene.canny)
            np.testing.assert_array_equal(
                _read_rgb(out / split / r["landmarks_image"]),
                render_landmarks(scene.landmarks, scene.landmark_mask, 64))
            np.testing.assert_allclose(r["landmarks"], scene.landmarks, atol=1e-3)
            np.testing.assert_array_equal(r["landmark_mask"], scene.landmark_mask)
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"]
                or seeds["val"] & seeds["test"])
    first = (out / "train" / "images" / "00000.png").stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="orthodiff.data.shapes"):
        assert not write_dataset(out, 20, n_val=5, n_test=5, progress=False)  # no-op
    assert "already holds" in caplog.text
    assert (out / "train" / "images" / "00000.png").stat().st_mtime_ns == first
    with pytest.raises(ValueError, match=r"different shapes dataset.*\['splits'\].*--overwrite"):
        write_dataset(out, 21, n_val=5, n_test=5, progress=False)
    with pytest.raises(ValueError, match="size"):
        write_dataset(out, 20, n_val=5, n_test=5, size=32, progress=False)

    assert write_dataset(out, 10, n_val=5, n_test=5, overwrite=True, progress=False)
    assert len(read_metadata(out / "train")) == 10
    assert len(list((out / "train" / "images").iterdir())) == 10  # no stale files left


def test_split_seeds_are_disjoint_and_stable():
    train, val, test = (sw.split_seeds(s, 10**6) for s in ("train", "val", "test"))
    assert train[-1] < val[0] and val[-1] < test[0]
    assert sw.split_seeds("val", 5)[0] == sw.split_seeds("val", 500)[0]


def test_incomplete_write_is_redone_without_overwrite(tmp_path):
    out = tmp_path / "shapes"
    write_dataset(out, 3, n_val=1, n_test=1, progress=False)
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps({**info, "complete": False}))
    assert write_dataset(out, 3, n_val=1, n_test=1, progress=False)


def test_read_metadata_names_line_and_missing_file(tmp_path):
    out = tmp_path / "shapes"
    write_dataset(out, 3, n_val=1, n_test=1, progress=False)
    (out / "train" / "seg" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 2: seg file .*seg/00001\.png"):
        read_metadata(out / "train")
    with pytest.raises(FileNotFoundError, match="orthodiff.data.shapes"):
        read_metadata(tmp_path / "nowhere")
    (out / "val" / "metadata.jsonl").write_text('{"file_name": "images/00000.png"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metadata(out / "val")


@pytest.mark.parametrize("kwargs, message", [
    ({"shapes": ("circle", "hexagon")}, "hexagon"),
    ({"colors": ("red", "magenta")}, "magenta"),
    ({"backgrounds": ("plaid",)}, "plaid"),
    ({"colors": ("yellow", "orange"), "backgrounds": ("light gray",)}, "contrasts"),
    ({"size": 8}, "8"),
    ({"shapes": ()}, "no shape names given"),
])
def test_bad_scene_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scene(0, **kwargs)
    with pytest.raises(ValueError, match="-1"):
        make_scene(-1)


def test_bad_dataset_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="train size must be a positive.*got 0"):
        write_dataset(tmp_path / "a", 0, progress=False)
    with pytest.raises(ValueError, match="val size must be a positive.*got -3"):
        write_dataset(tmp_path / "a", 5, n_val=-3, progress=False)
    with pytest.raises(ValueError, match="triangel"):
        write_dataset(tmp_path / "a", 5, shapes=("triangel",), progress=False)
    assert not (tmp_path / "a").exists()  # nothing written before validation
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty and holds no shapes dataset"):
        write_dataset(other, 5, n_val=1, n_test=1, overwrite=True, progress=False)
    assert [p.name for p in other.iterdir()] == ["cat.jpg"]
    # An info.json written by something else does not make a folder ours to replace.
    (other / "info.json").write_text('{"name": "my photos"}')
    (other / "train").mkdir()
    with pytest.raises(ValueError, match="not empty and holds no shapes dataset"):
        write_dataset(other, 5, n_val=1, n_test=1, overwrite=True, progress=False)
    assert (other / "train").is_dir() and (other / "cat.jpg").is_file()


def test_cli_writes_a_small_dataset_and_rejects_bad_names(tmp_path, capsys):
    out = tmp_path / "cli"
    assert sw.main(["--out", str(out), "--n", "4", "--n-val", "2", "--n-test", "2",
                    "--colors", "red,blue", "--no-progress"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert list(info["colors"]) == ["red", "blue"]
    used = {sh["color"] for r in read_metadata(out / "train") for sh in r["shapes"]}
    assert used <= {"red", "blue"}
    with pytest.raises(SystemExit):
        sw.main(["--out", str(tmp_path / "x"), "--n", "4", "--shapes", "circle,blob"])
    assert "blob" in capsys.readouterr().err
