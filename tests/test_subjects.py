import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from orthodiff.data.shapes import BACKGROUNDS, COLORS, SHAPES, caption_for, make_scene, shape_masks
from orthodiff.data.subjects import (
    EVAL_PROMPTS,
    SUBJECTS,
    WORLD_WORDS,
    SubjectDataset,
    check_token,
    class_prompt,
    expected_labels,
    instance_prompt,
    reference_images,
    render_subject,
    single_piece_tokens,
    subject_images,
    subject_mask,
    write_subject,
)

ROOT = Path(__file__).resolve().parents[1]
PLACE = {"center": [31.0, 33.0], "size": 18.0, "rotation": 12.0}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ROOT / "assets" / "tiny-sd" / "tokenizer")


def _write(path: Path, image: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


# --- shapes-world subjects ---------------------------------------------------------------

def test_subject_images_are_deterministic_by_seed_and_varied():
    for name in SUBJECTS:
        images = subject_images(name, 4, seed=0)
        assert len(images) == 4
        assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in images)
        again = subject_images(name, 4, seed=0)
        assert all(np.array_equal(a, b) for a, b in zip(images, again))
        assert len({im.tobytes() for im in images}) == 4  # varied placement
        other = subject_images(name, 4, seed=1)
        assert not any(np.array_equal(a, b) for a, b in zip(images, other))
        big = subject_images(name, 1, seed=0, size=128)[0]
        assert big.shape == (128, 128, 3)
        assert {tuple(c) for c in big.reshape(-1, 3)} == {tuple(c) for c in images[0].reshape(-1, 3)}


def test_each_subject_shows_two_colours_inside_one_shape_unlike_every_ordinary_scene():
    for name, subject in SUBJECTS.items():
        assert subject.class_word in SHAPES and set(subject.colors) <= set(COLORS)
        image = render_subject(name, background=subject.background, **PLACE)
        mask = subject_mask(name, **PLACE)
        colours, counts = np.unique(image[mask], axis=0, return_counts=True)
        assert {tuple(c) for c in colours} == {COLORS[c] for c in subject.colors}, name
        assert counts.min() >= 0.1 * mask.sum(), name  # the pattern is no speck
        assert not mask[0].any() and (image[~mask] == BACKGROUNDS[subject.background]).all()
    # In the ordinary world each shape's visible part is one flat colour.
    for seed in range(200):
        scene = make_scene(seed)
        masks = shape_masks(scene.shapes, 64)
        for z, mask in enumerate(masks):
            visible = mask & ~np.logical_or.reduce(masks[z + 1:], axis=0) if z + 1 < len(masks) else mask
            assert len(np.unique(scene.image[visible], axis=0)) == 1


def test_every_subject_renders_on_every_background_and_every_eval_prompt_is_drawable():
    for name in SUBJECTS:
        for background in BACKGROUNDS:
            image = render_subject(name, background=background, **PLACE)
            assert (image[0, 0] == BACKGROUNDS[background]).all()
        for spec in EVAL_PROMPTS:
            (image,) = reference_images(name, spec, n=1, seed=3)
            assert (image[0, 0] == BACKGROUNDS[spec["background"]]).all()
            assert np.array_equal(image, reference_images(name, spec, n=1, seed=3)[0])


def test_eval_prompts_use_only_the_words_the_tiny_model_was_trained_on():
    caption_words = {w for seed in range(300) for w in re.findall(r"[a-z]+", make_scene(seed).caption)}
    assert caption_words <= WORLD_WORDS and WORLD_WORDS <= caption_words | {"an"}
    keys = {"prompt", "background", "extra", "color", "count"}
    for spec in EVAL_PROMPTS:
        assert set(spec) <= keys and spec["background"] in BACKGROUNDS
        assert "{token}" in spec["prompt"] and "{cls}" in spec["prompt"]
        for subject in SUBJECTS.values():
            prompt = spec["prompt"].format(token="sks", cls=subject.class_word)
            assert set(re.findall(r"[a-z]+", prompt)) <= WORLD_WORDS | {"sks"}, prompt
    assert {spec.get("background") for spec in EVAL_PROMPTS} == set(BACKGROUNDS)
    assert instance_prompt("sks", "square", "light gray") == "a sks square on a light gray background"
    assert class_prompt("square", "white") == "a square on a white background"
    assert class_prompt("circle") == "a circle" and instance_prompt("sks", "circle") == "a sks circle"
    assert caption_for([{"color": "red", "kind": "square"}], "white") == class_prompt("red square", "white")


def test_the_classifier_oracle_reads_what_each_eval_prompt_asks_on_ideal_images():
    from orthodiff.eval.oracles import PAIRS, images_to_tensor, load_oracle

    torch.set_num_threads(1)
    classifier = load_oracle("classifier", ROOT / "assets" / "oracles")
    cases = [(name, spec) for name in SUBJECTS for spec in EVAL_PROMPTS]
    images = [reference_images(name, spec, n=1, seed=0)[0] for name, spec in cases]
    # A recolouring prompt must fail on the unchanged subject.
    plain = [(name, spec) for name, spec in cases if "color" in spec]
    images += [subject_images(name, 1, seed=0, background=spec["background"])[0] for name, spec in plain]
    pred = classifier.predict(images_to_tensor(np.stack(images)))
    colours = list(COLORS)

    def faithful(i, name, spec):
        want = expected_labels(name, spec)
        return (pred["background"][i] == list(BACKGROUNDS).index(want["background"])
                and all(pred["colors"][i, colours.index(c)] for c in want["colors_present"])
                and not any(pred["colors"][i, colours.index(c)] for c in want["colors_absent"])
                and all(pred["pairs"][i, PAIRS.index(p)] for p in want["pairs_present"]))

    assert all(faithful(i, *case) for i, case in enumerate(cases))
    assert not any(faithful(len(cases) + i, *case) for i, case in enumerate(plain))


def test_render_subject_refuses_scenes_the_world_forbids():
    with pytest.raises(ValueError, match="unknown subject 'nope'.*striped_square"):
        render_subject("nope", background="white", **PLACE)
    with pytest.raises(ValueError, match="own colour"):  # green is the striped square's body
        render_subject("striped_square", background="white", **PLACE,
                       extra_shapes=[{"kind": "circle", "color": "green", "center": [10, 10], "size": 8}])
    with pytest.raises(ValueError, match="dark gray"):  # blue has no contrast there
        render_subject("badge_circle", background="dark gray", **PLACE,
                       extra_shapes=[{"kind": "cross", "color": "blue", "center": [10, 10], "size": 8}])
    with pytest.raises(ValueError, match="unknown background"):
        render_subject("badge_circle", background="gray", **PLACE)


# --- the DreamBooth layout -----------------------------------------------------------------

def test_write_subject_and_subject_dataset_round_trip(tmp_path):
    folder = write_subject(tmp_path, "striped_square", n=4, seed=0)
    assert folder == tmp_path / "striped_square"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00.png", "01.png", "02.png", "03.png", "class.txt", "prompt.txt", "subject.json"]
    data = SubjectDataset(tmp_path, "striped_square", token="sks", repeats=3)
    assert len(data) == 12 and data.class_word == "square"
    item = data[5]
    assert item["text"] == "a sks square on a white background" and item["index"] == 1
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    original = subject_images("striped_square", 4, seed=0)[1]
    back = ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(back, original)  # PNG is lossless
    small = SubjectDataset(tmp_path, "striped_square", size=32, prompt_template="a photo of {token} {cls}")
    assert small[0]["pixel_values"].shape == (3, 32, 32) and small[0]["text"] == "a photo of sks square"

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    write_subject(tmp_path, "striped_square", n=4, seed=0)  # the same content: nothing written
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="different version.*overwrite=True"):
        write_subject(tmp_path, "striped_square", n=3, seed=1)
    write_subject(tmp_path, "striped_square", n=3, seed=1, overwrite=True)
    assert len(SubjectDataset(tmp_path, "striped_square")) == 3
    # An interrupted write (still marked incomplete) is redone without overwrite.
    marker = folder / "subject.json"
    marker.write_text(marker.read_text().replace('"complete": true', '"complete": false'))
    (folder / "02.png").unlink()
    write_subject(tmp_path, "striped_square", n=3, seed=1)
    assert len(SubjectDataset(tmp_path, "striped_square")) == 3 and '"complete": true' in marker.read_text()
    foreign = tmp_path / "badge_circle"
    foreign.mkdir()
    (foreign / "mine.png").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not written by write_subject"):
        write_subject(tmp_path, "badge_circle", overwrite=True)
    assert (foreign / "mine.png").read_bytes() == b"not ours"


def test_a_real_dreambooth_folder_with_jpg_and_png_loads(tmp_path):
    dog = tmp_path / "dog"
    dog.mkdir()
    wide = np.zeros((60, 100, 3), np.uint8)
    wide[:] = (0, 0, 255)  # blue margins, cropped away
    wide[:, 10:90] = (255, 0, 0)  # edges away from the crop, so JPEG ringing stays outside
    _write(dog / "00.jpg", wide)
    tall = np.full((90, 50, 3), (0, 255, 0), np.uint8)
    _write(dog / "01.PNG", tall)
    (dog / "notes.txt").write_text("not an image")
    # google/dreambooth's class list, instead of class.txt
    (tmp_path / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbackpack,backpack\ndog,dog\n\nPrompts\n\nObject Prompts\n")
    data = SubjectDataset(tmp_path, "dog", token="ohwx", size=32)
    assert len(data) == 2 and [p.name for p in data.files] == ["00.jpg", "01.PNG"]
    first, second = data[0], data[1]
    assert first["text"] == "a ohwx dog"
    assert first["pixel_values"].shape == second["pixel_values"].shape == (3, 32, 32)
    red = first["pixel_values"]
    assert red[0].min() > 0.9 and red[2].max() < -0.9  # only the red centre is left
    assert torch.equal(second["pixel_values"][1], torch.ones(32, 32))
    (dog / "class.txt").write_text("puppy\n")  # class.txt wins over the list
    assert SubjectDataset(tmp_path, "dog")[0]["text"] == "a sks puppy"
    assert SubjectDataset(tmp_path, "dog", class_word="corgi")[0]["text"] == "a sks corgi"


def test_bad_subject_folders_fail_with_messages_that_say_what_to_do(tmp_path):
    write_subject(tmp_path, "badge_circle", n=2)
    with pytest.raises(FileNotFoundError, match=r"cat not found.*\['badge_circle'\].*write_subject"):
        SubjectDataset(tmp_path, "cat")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "class.txt").write_text("dog")
    (broken / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    (broken / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 2 images .*a\.jpg.*b\.png"):
        SubjectDataset(tmp_path, "broken")
    _write(broken / "c.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable.*a\.jpg.*b\.png"):
        assert len(SubjectDataset(tmp_path, "broken")) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "class.txt").write_text("dog")
    with pytest.raises(ValueError, match=r"empty holds no images \(\*\.jpg"):
        SubjectDataset(tmp_path, "empty")

    (tmp_path / "badge_circle" / "class.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"no class word for subject 'badge_circle'.*class\.txt.*class_word="):
        SubjectDataset(tmp_path, "badge_circle")
    with pytest.raises(ValueError, match="no {token} placeholder"):
        SubjectDataset(tmp_path, "badge_circle", class_word="circle", prompt_template="a {cls}")


def test_check_token_keeps_one_piece_tokens_and_suggests_them_otherwise(tokenizer):
    assert check_token(tokenizer, "sks") == tokenizer.convert_tokens_to_ids("sks</w>")
    suggestions = single_piece_tokens(tokenizer)
    assert suggestions[:2] == ["sks", "ohwx"]
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in suggestions)
    with pytest.raises(ValueError, match=r"'zwx' is not one piece.*\['z', 'wx</w>'\].*'sks'"):
        check_token(tokenizer, "zwx")
    with pytest.raises(ValueError, match=r"'red' is a word of the shapes captions.*'sks'"):
        check_token(tokenizer, "red")
    with pytest.raises(ValueError, match="non-empty"):
        check_token(tokenizer, " ")
