"""Real-dataset loaders on tiny fixtures written here in each dataset's real on-disk format.

Images are 40 x 56 (non-square), so every item goes through resize + centre crop."""

import json
import re
import warnings

import cv2
import numpy as np
import pytest
import torch

from orthodiff.data import ADE20KDataset, CelebAHQDataset, CocoDataset, DepthAnnotator, FolderDataset, collate
from orthodiff.data import coco as coco_module
from orthodiff.data.control import canny_edges, landmark_colors, segmentation_palette
from orthodiff.data.datasets import SkippedItem, resize_crop
from orthodiff.data.readers import read_image

H, W, R = 40, 56, 32  # fixture image size, training resolution


def picture(seed, height=H, width=W):
    """An RGB image of a few flat rectangles: strong edges for Canny, survives JPEG."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width - 8), rng.integers(0, height - 8)
        image[y:y + rng.integers(6, 20), x:x + rng.integers(6, 20)] = rng.integers(0, 256, 3)
    image[height // 4:height // 2, width // 4:width // 2] = 0 if image[0, 0].mean() > 127 else 255  # sure edges
    return image


def write_rgb(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))


def write_gray(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def check_item(item, channels, text):
    assert item["pixel_values"].shape == (3, R, R) and item["pixel_values"].dtype == torch.float32
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["conditioning"].shape == (channels, R, R) and item["conditioning"].dtype == torch.float32
    assert 0 <= item["conditioning"].min() and item["conditioning"].max() <= 1
    assert item["text"] == text


# ---- folder format -------------------------------------------------------------------------

def test_folder_metadata_jsonl_seg_class_ids_resized_together_with_the_image(tmp_path):
    # A square 40 x 40 class map for a 40 x 56 image: class 1 left of x = 10, class 2 right.
    # Stretched to the image first, the boundary sits at x = 14 of the image, x = 5.2 after
    # resizing to 32 (scale 0.8) and cropping 6 columns; cropped alone it would sit at 8.
    seg = np.full((40, 40), 2, np.uint8)
    seg[:, :10] = 1
    write_rgb(tmp_path / "images/a.png", picture(0))
    write_gray(tmp_path / "seg/a.png", seg)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "images/a.png", "conditioning_image": "seg/a.png",
                                               "text": "a red square"}])
    item = FolderDataset(tmp_path, "seg", resolution=R, num_classes=3)[0]
    check_item(item, 3, "a red square")
    target = item["target"]["seg"]
    assert target.dtype == torch.int64 and target.shape == (R, R)
    assert (target[:, :5] == 1).all() and (target[:, 6:] == 2).all()
    colours = torch.from_numpy(segmentation_palette(3)).float() / 255
    torch.testing.assert_close(item["conditioning"], colours[target].permute(2, 0, 1))


def test_folder_seg_rgb_condition_is_taken_as_colour_coded_and_class_ids_need_num_classes(tmp_path):
    colour = np.zeros((H, W, 3), np.uint8)
    colour[:, W // 2:] = (200, 10, 90)
    write_rgb(tmp_path / "a.png", picture(0))
    write_rgb(tmp_path / "seg_rgb.png", colour)
    write_gray(tmp_path / "seg_ids.png", np.ones((H, W), np.uint8))
    write_jsonl(tmp_path / "metadata.jsonl", [{"image": "a.png", "conditioning_image": "seg_rgb.png", "text": "x"},
                                              {"image": "a.png", "conditioning_image": "seg_ids.png", "text": "y"}])
    dataset = FolderDataset(tmp_path, "seg", resolution=R)
    expected = torch.from_numpy(resize_crop(colour, R, nearest=True)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(dataset[0]["conditioning"], expected)
    with pytest.raises(TypeError, match="num_classes"):  # a configuration error is never skipped
        dataset[1]


def test_folder_depth_condition_is_the_depth_target(tmp_path):
    depth = np.tile(np.linspace(0, 255, 28).astype(np.uint8), (20, 1))  # half the image's size
    write_rgb(tmp_path / "a.png", picture(0))
    write_gray(tmp_path / "d.png", depth)
    write_jsonl(tmp_path / "metadata.jsonl", [{"image": "a.png", "conditioning_image": "d.png", "text": "t"}])
    item = FolderDataset(tmp_path, "depth", resolution=R)[0]
    check_item(item, 1, "t")
    assert item["target"]["depth"].dtype == torch.float32
    # The target is resized as float, the condition as 8-bit: they agree to one grey level.
    torch.testing.assert_close(item["target"]["depth"], item["conditioning"][0], atol=1 / 255, rtol=0)
    assert item["conditioning"][0, :, -1].mean() > 0.8 > 0.2 > item["conditioning"][0, :, 0].mean()


def test_folder_prompt_json_canny_with_and_without_condition_files(tmp_path):
    image = picture(1)
    write_rgb(tmp_path / "target/0.png", image)
    edges = np.zeros((H, W), np.uint8)
    edges[10, :] = 255
    write_gray(tmp_path / "source/0.png", edges)
    write_jsonl(tmp_path / "prompt.json", [{"source": "source/0.png", "target": "target/0.png", "prompt": "one"},
                                           {"target": "target/0.png", "prompt": "two"}])
    dataset = FolderDataset(tmp_path, "canny", resolution=R)
    given, computed = dataset[0], dataset[1]
    check_item(given, 1, "one")
    check_item(computed, 1, "two")
    assert given["conditioning"].sum() > 0 and set(given["conditioning"].unique().tolist()) == {0.0, 1.0}
    expected = canny_edges(resize_crop(image, R)) / 255  # computed at the training resolution
    assert expected.sum() > 0
    np.testing.assert_array_equal(computed["conditioning"][0].numpy(), expected.astype(np.float32))


def test_folder_needs_an_index_file_and_the_condition_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl nor prompt.json"):
        FolderDataset(tmp_path, "canny")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "t"}])
    with pytest.raises(ValueError, match=r"metadata.jsonl record 1 has no 'conditioning_image'"):
        FolderDataset(tmp_path, "depth")
    assert len(FolderDataset(tmp_path, "canny")) == 1  # canny computes its own condition


# ---- COCO ----------------------------------------------------------------------------------

def write_coco(root, split="val2017", n=3):
    images = [{"id": 30 - 10 * i, "file_name": f"{30 - 10 * i:012d}.jpg", "height": H, "width": W}
              for i in range(n)]  # listed in decreasing id order: the loader sorts
    annotations = [{"id": 100 + i, "image_id": image["id"], "caption": f" caption {image['id']} "}
                   for i, image in enumerate(images)]
    annotations.append({"id": 99, "image_id": 10, "caption": "a second caption"})
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    for index, image in enumerate(images):
        write_rgb(root / split / image["file_name"], picture(index))
    return root


def test_coco_canny_items_captions_and_cache_reused(tmp_path, monkeypatch):
    root = write_coco(tmp_path / "coco")
    calls = []
    monkeypatch.setattr(coco_module, "canny_edges", lambda image: calls.append(1) or canny_edges(image))
    dataset = CocoDataset(root, control="canny", resolution=R)
    assert [record[1] for record in dataset.records] == ["caption 10", "caption 20", "caption 30"]
    first = [dataset[i] for i in range(3)]
    for item, text in zip(first, ["caption 10", "caption 20", "caption 30"]):
        check_item(item, 1, text)
    cache = root / "cache" / f"canny_{R}"
    assert sorted(path.name for path in cache.iterdir()) == [f"{i:012d}.png" for i in (10, 20, 30)]
    assert len(calls) == 3
    image = read_image(root / "val2017" / "000000000010.jpg")
    np.testing.assert_array_equal(first[0]["conditioning"][0].numpy() * 255, canny_edges(resize_crop(image, R)))
    second = [CocoDataset(root, control="canny", resolution=R)[i] for i in range(3)]
    assert len(calls) == 3  # the second epoch reads the cache
    for a, b in zip(first, second):
        torch.testing.assert_close(a["conditioning"], b["conditioning"])
    batch = collate(second)
    assert batch["conditioning"].shape == (3, 1, R, R) and len(batch["text"]) == 3


def test_coco_corrupt_image_is_skipped_or_raised(tmp_path):
    root = write_coco(tmp_path / "coco")
    (root / "val2017" / "000000000020.jpg").write_bytes(b"not a jpeg")
    dataset = CocoDataset(root, control="canny", resolution=R)
    items = [dataset[i] for i in range(3)]
    assert isinstance(items[1], SkippedItem) and items[1].index == 1 and "000000000020.jpg" in items[1].error
    assert len(dataset.skipped) == 1
    batch = collate(items)
    assert len(batch["text"]) == 2 and batch["skipped"] == [items[1]]  # counted where batches arrive
    with pytest.raises(OSError, match="000000000020.jpg"):
        CocoDataset(root, control="canny", resolution=R, on_error="raise")[1]


def test_read_image_modes_agree_for_files_pil_images_and_arrays(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(np.dstack([rgb, rgb[..., :1]]), cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "grey.png"), rgb[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, RGB order
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png", "unchanged")[..., :3], rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png", "any"), rgb[..., 0])  # grey stays grey
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, 2))
    for source in (Image.fromarray(rgb), rgb, np.dstack([rgb, rgb[..., :1]])):
        np.testing.assert_array_equal(read_image(source, "any"), rgb)
        np.testing.assert_array_equal(read_image(source, "L"), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    with pytest.raises(FileNotFoundError, match="condition image .*nowhere.png does not exist"):
        read_image(tmp_path / "nowhere.png", what="condition image")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(OSError, match="notes.txt is not a readable image"):  # a ValueError too
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="uint8"):
        read_image(rgb.astype(np.float32))


def test_missing_roots_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    for make in (lambda: CocoDataset(missing), lambda: ADE20KDataset(missing),
                 lambda: CelebAHQDataset(missing), lambda: FolderDataset(missing, "canny")):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            make()
    root = write_coco(tmp_path / "coco")  # a present root with a missing split names the split
    with pytest.raises(FileNotFoundError, match="captions_train2017.json.*cocodataset.org"):
        CocoDataset(root, split="train2017")
    with pytest.raises(ValueError, match="depth_model"):
        CocoDataset(root, control="depth")


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    """A random-weight DPT depth estimator saved like a hub checkpoint (config, weights,
    image processor), so the real `pipeline("depth-estimation")` loading runs offline."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 8, 8, 8], reassemble_factors=[4, 2, 1, 0.5],
                       fusion_hidden_size=8, head_hidden_size=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-dpt")
    DPTForDepthEstimation(config).save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return path


def test_coco_depth_from_a_depth_estimation_pipeline_cached_per_image(tmp_path, tiny_dpt):
    root = write_coco(tmp_path / "coco", n=2)
    dataset = CocoDataset(root, control="depth", resolution=R, depth_model=tiny_dpt)
    items = [dataset[i] for i in range(2)]
    for item, text in zip(items, ["caption 20", "caption 30"]):
        check_item(item, 1, text)
        torch.testing.assert_close(item["target"]["depth"], item["conditioning"][0], atol=1 / 255, rtol=0)
    cache = root / "cache" / f"depth_{tiny_dpt.name}"
    maps = [read_image(cache / f"{i:012d}.png", "L") for i in (20, 30)]
    for depth in maps:  # at the image's size, normalized to the full 8-bit range
        assert depth.shape == (H, W) and depth.min() == 0 and depth.max() == 255
    # A dataset without a model reads the cache, and gives the same items.
    cached = CocoDataset(root, control="depth", resolution=R, cache_dir=cache)
    assert cached.annotator is None
    torch.testing.assert_close(cached[0]["conditioning"], items[0]["conditioning"])
    # invert=True flips the polarity (for metric-depth models).
    image = read_image(root / "val2017" / "000000000020.jpg")
    flipped = DepthAnnotator(tiny_dpt, invert=True)(image).astype(int)
    assert np.abs(flipped + maps[0] - 255).max() <= 1


# ---- ADE20K --------------------------------------------------------------------------------

def write_ade20k(root, split="validation", n=3):
    prefix = "ADE_val" if split == "validation" else "ADE_train"
    for i in range(n):
        name = f"{prefix}_{i + 1:08d}"
        annotation = np.zeros((H, W), np.uint8)  # class 0 ("other") on the left
        annotation[:, 20:40] = 7
        annotation[:, 40:] = 150
        write_rgb(root / "images" / split / f"{name}.jpg", picture(i))
        write_gray(root / "annotations" / split / f"{name}.png", annotation)
    write_jsonl(root / f"captions_{split}.jsonl", [{"file_name": f"{prefix}_{i + 1:08d}.jpg", "text": f"room {i}"}
                                                  for i in range(n - 1)])  # the last one has none
    return root


def test_ade20k_items_keep_exact_class_ids_and_captions(tmp_path):
    root = write_ade20k(tmp_path / "ADEChallengeData2016")
    with pytest.warns(UserWarning, match="1 of 3 images have no caption"):
        dataset = ADE20KDataset(root, resolution=R)
    assert len(dataset) == 3 and dataset.num_classes == 151
    items = [dataset[i] for i in range(3)]
    for item, text in zip(items, ["room 0", "room 1", ""]):
        check_item(item, 3, text)
        seg = item["target"]["seg"]
        assert seg.dtype == torch.int64 and set(seg.unique().tolist()) == {0, 7, 150}
        # Image columns 20 and 40 land at 20 * 0.8 - 6 = 10 and 26 after resize + crop.
        assert (seg[:, :10] == 0).all() and (seg[:, 11:26] == 7).all() and (seg[:, 27:] == 150).all()
        colours = torch.from_numpy(segmentation_palette(151)).float() / 255
        torch.testing.assert_close(item["conditioning"], colours[seg].permute(2, 0, 1))


def test_ade20k_bad_annotations_are_skipped_and_captions_file_when_named_must_exist(tmp_path):
    root = write_ade20k(tmp_path / "ade", n=2)
    write_gray(root / "annotations/validation/ADE_val_00000002.png", np.full((H, W), 151, np.uint8))
    with pytest.warns(UserWarning):
        dataset = ADE20KDataset(root, resolution=R)
    skipped = dataset[1]
    assert isinstance(skipped, SkippedItem) and "ADE_val_00000002.png holds class id 151" in skipped.error
    with pytest.raises(FileNotFoundError, match="mine.jsonl"):
        ADE20KDataset(root, captions=root / "mine.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "images" / "training"))):
        ADE20KDataset(root, split="training")


# ---- CelebA-HQ -----------------------------------------------------------------------------

def face_landmarks():
    """68 points on a grid inside the part of a 120 x 168 image that survives the centre
    crop (x in [24, 144]), 12-14 px apart: 6-7 px at 64, so discs of radius 2 stay apart."""
    xs, ys = np.meshgrid(30 + 12 * np.arange(9), 8 + 14 * np.arange(8))
    return np.stack([xs.ravel(), ys.ravel()], 1)[:68].astype(np.float32) + 0.25


def test_celebahq_landmarks_land_on_their_rendered_discs(tmp_path):
    root = tmp_path / "celebahq"
    points = face_landmarks()
    for i in range(2):
        write_rgb(root / "CelebA-HQ-img" / f"{i}.jpg", picture(i, 120, 168))
        (root / "landmarks").mkdir(parents=True, exist_ok=True)
        np.savetxt(root / "landmarks" / f"{i}.txt", points, fmt="%.2f")
    write_jsonl(root / "captions.jsonl", [{"file_name": "0.jpg", "text": "a smiling woman"},
                                          {"file_name": "1.jpg", "text": "a man"}])
    write_rgb(root / "CelebA-HQ-img" / "2.jpg", picture(2, 120, 168))  # no landmark file: left out
    with pytest.warns(UserWarning, match="1 of 3 images .* have no landmark file"):
        dataset = CelebAHQDataset(root, resolution=64)
    item = dataset[0]
    assert len(dataset) == 2 and item["text"] == "a smiling woman" and dataset[1]["text"] == "a man"
    assert item["conditioning"].shape == (3, 64, 64) and item["pixel_values"].shape == (3, 64, 64)
    landmarks, mask = item["target"]["landmarks"], item["target"]["landmark_mask"]
    assert landmarks.shape == (1, 68, 2) and landmarks.dtype == torch.float32
    assert mask.shape == (1, 68) and mask.dtype == torch.bool and mask.all()
    pixels = np.round(landmarks[0].numpy()).astype(int)
    assert ((pixels >= 0) & (pixels < 64)).all()
    drawn = (item["conditioning"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(drawn[pixels[:, 1], pixels[:, 0]], landmark_colors(68))
    # Each disc is centred on its target, up to the nearest-neighbour resize of the drawing
    # and the base class's pixel convention (0.55 px measured); a 1 px shift fails.
    for point, colour in zip(landmarks[0].numpy(), landmark_colors(68)):
        ys, xs = np.nonzero((drawn == colour).all(-1))
        assert abs(xs.mean() - point[0]) < 0.75 and abs(ys.mean() - point[1]) < 0.75


def test_celebahq_landmark_file_with_wrong_point_count_is_named(tmp_path):
    root = tmp_path / "celebahq"
    write_rgb(root / "CelebA-HQ-img" / "0.jpg", picture(0))
    (root / "landmarks").mkdir()
    np.savetxt(root / "landmarks" / "0.txt", face_landmarks()[:67])
    with pytest.warns(UserWarning, match="no caption"):
        dataset = CelebAHQDataset(root, resolution=R, on_error="raise")
    with pytest.raises(ValueError, match=r"0\.txt holds 67 points"):
        dataset[0]
