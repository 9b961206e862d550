"""The fault table (README, "Reliability: faults and what happens"): each test injects one
fault and asserts the outcome: a clear one-line error naming the culprit, or recovery; in
every case no trained tensor is lost and no checkpoint is left unreadable. Rows that other
files already test are listed in the README with their test names.

Runs are tiny (batch 2 at 64 px on the fixture world); subprocesses get OMP_NUM_THREADS=1."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from orthodiff import adapter as adapter_module
from orthodiff.adapter import load_adapter, read_adapter, save_adapter
from orthodiff.app.preflight import MissingResourceError, check_base_model
from orthodiff.app.train import AtomicCheckpointIO
from orthodiff.data import FolderDataset
from orthodiff.data.datamodule import ResumableSampler
from orthodiff.data.datasets import SkipBudget, SkippedItem, TooManySkippedError, collate
from orthodiff.oft import OFTConfig
from orthodiff.tasks import ControlTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-sd"


def train(*overrides: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return run_script("train.py", overrides, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})},
                      timeout=timeout)


def tiny(shapes_root, steps: int = 4) -> list[str]:
    """8 training scenes, batch 2 (4 batches an epoch), no validation until the end."""
    return ["experiment=canny", f"data.train.root={shapes_root}", "+data.train.max_items=8", "data.batch_size=2",
            "data.val.max_items=2", "data.val_batch_size=2", "model.val_steps=2", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=100", "validate_at_start=false", "callbacks.progress_bar.refresh_rate=0",
            "callbacks.checkpoint.every_n_train_steps=2", "trainer.deterministic=true", "logger=none"]


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with a message holding every fragment, on one line, without a traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = next((line for line in result.stderr.splitlines() if all(f in line for f in fragments)), None)
    assert line is not None, (fragments, result.stderr[-3000:])
    return line


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_difference(a: Path, b: Path) -> float:
    first, second = read_adapter(a)[0], read_adapter(b)[0]
    assert set(first) == set(second)
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    task = ControlTask(control="canny", adapter=OFTConfig(num_blocks=4, coft=True, eps=1.0), control_network="hint",
                       method="coft", val_steps=2)
    with torch.no_grad():  # trained-like: away from the identity
        for p in task.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return task


# --- SIGKILL at seeded moments, then resume -----------------------------------------------

@pytest.mark.slow
def test_sigkill_at_seeded_moments_then_resume_matches_the_uninterrupted_run(shapes_root, tmp_path):
    """8 steps over 2 epochs, checkpoints every 2 steps; five kills (between steps, between a
    step's backward and its optimizer step, halfway through a checkpoint write) at moments
    a seeded generator picks, each run resuming from the last checkpoint. The final adapter
    is the uninterrupted run's to 1e-6 (2e-8 measured: the latent and text caches fill in
    other batch compositions after a restart), and every checkpoint stays readable."""
    steps = 8
    log = open(tmp_path / "uninterrupted.log", "w")
    uninterrupted = subprocess.Popen([sys.executable, "train.py", *tiny(shapes_root, steps),
                                      f"hydra.run.dir={tmp_path / 'uninterrupted'}"], cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    saves = [(s, "mid_save") for s in (2, 4, 6)]  # the checkpoint steps
    others = [(s, kind) for s in range(1, steps) for kind in ("between_steps", "mid_step")] + saves
    rng = random.Random(19)
    save = rng.choice(saves)
    chosen = [save] + rng.sample([m for m in others if m != save], 4)
    # In the order they happen in a run: a step's checkpoint, then the next step's start, then its backward.
    moments = sorted(chosen, key=lambda m: (m[0], ("mid_save", "between_steps", "mid_step").index(m[1])))
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    for step, kind in moments:
        resume = [f"resume={last}"] if last.is_file() else []
        result = train(*tiny(shapes_root, steps), *resume, f"hydra.run.dir={run}",
                       "+callbacks.kill._target_=faults.KillAt", f"+callbacks.kill.step={step}",
                       f"+callbacks.kill.moment={kind}")
        assert result.returncode == -9, (step, kind, result.returncode, result.stderr[-3000:])
        if last.is_file():  # readable, and no further than the kill
            assert load_checkpoint(last)["global_step"] <= step
    result = train(*tiny(shapes_root, steps), f"resume={last}", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    log.close()
    assert load_checkpoint(last)["global_step"] == steps
    difference = max_difference(run / "adapter.safetensors", tmp_path / "uninterrupted" / "adapter.safetensors")
    assert difference <= 1e-6, (moments, difference)


def test_resumable_sampler_order_depends_on_seed_and_epoch_only_and_resumes_part_way(shapes_root):
    data = list(range(10))
    first, again = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    assert list(first) == list(again) and sorted(first) == data
    again.epoch = 1
    assert list(again) != list(first)  # a new order each epoch
    resumed = ResumableSampler(data, seed=3, epoch=1, start=4)
    assert list(resumed) == list(again)[4:]  # the interrupted epoch's remaining items
    assert list(resumed) == list(again) and len(resumed) == 10  # later passes are whole


# --- writes that fail part-way (disk full) ------------------------------------------------

def disk_full_after(limit: int):
    """A torch.save that writes `limit` bytes and then fails as a full disk does."""
    def save(obj, file):
        buffer = io.BytesIO()
        torch.serialization.save(obj, buffer)
        file.write(buffer.getvalue()[:limit])
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_checkpoint_write_that_fails_part_way_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    monkeypatch.setattr(torch, "save", disk_full_after(700))
    with pytest.raises(OSError, match=f"writing {path} failed .No space left on device.; the previous last.ckpt"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["global_step"] == 1 and torch.equal(load_checkpoint(path)["state_dict"]["w"],
                                                                      torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_adapter_write_that_fails_part_way_keeps_the_previous_one(module, tmp_path, monkeypatch):
    path = save_adapter(tmp_path / "adapter.safetensors", module)
    good = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(good[:4096])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_module, "save_file", full_disk)
    with pytest.raises(OSError, match=f"writing {path} failed"):
        save_adapter(path, module)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    load_adapter(path)  # still readable


# --- dataset faults -----------------------------------------------------------------------

def picture(height=48, width=64) -> np.ndarray:
    image = np.full((height, width, 3), 180, np.uint8)
    image[height // 4: height // 2, width // 4: width // 2] = (200, 40, 30)
    return image


def write_png(path: Path, array: np.ndarray) -> None:
    array = array[..., ::-1] if array.ndim == 3 and array.shape[2] == 3 else array
    array = array[..., [2, 1, 0, 3]] if array.ndim == 3 and array.shape[2] == 4 else array
    assert cv2.imwrite(str(path), np.ascontiguousarray(array))


def truncated_png(root):
    write_png(root / "a.png", picture())
    data = (root / "a.png").read_bytes()
    (root / "a.png").write_bytes(data[: len(data) // 2])


def zero_bytes(root):
    (root / "a.png").write_bytes(b"")


def cmyk_jpeg(root):
    Image.fromarray(picture()).convert("CMYK").save(root / "a.png", format="JPEG", quality=95)


# name: (writes root/a.png (+ cond.png), the record's changes, the control, what happens)
DATASET_FAULTS = {
    "truncated_png": (truncated_png, {}, "canny", "skipped"),
    "zero_byte_file": (zero_bytes, {}, "canny", "skipped"),
    "grayscale": (lambda root: write_png(root / "a.png", picture()[..., 0]), {}, "canny", "converted"),
    "rgba": (lambda root: write_png(root / "a.png", np.dstack([picture(), np.full((48, 64), 128, np.uint8)])), {},
             "canny", "converted"),
    "png_16_bit": (lambda root: write_png(root / "a.png", picture().astype(np.uint16) * 257), {}, "canny", "converted"),
    "cmyk_jpeg": (cmyk_jpeg, {}, "canny", "converted"),
    "10000_x_10": (lambda root: write_png(root / "a.png", np.full((10, 10_000, 3), 90, np.uint8)), {}, "canny",
                   "skipped"),
    "missing_caption": (lambda root: write_png(root / "a.png", picture()), {"text": None}, "canny", "converted"),
    "caption_2000_chars": (lambda root: write_png(root / "a.png", picture()), {"text": "a red square " * 154}, "canny",
                           "converted"),
    "metadata_line_not_json": (lambda root: write_png(root / "a.png", picture()), "not json", "canny", "skipped"),
    "seg_unknown_class_id": (lambda root: (write_png(root / "a.png", picture()),
                                           write_png(root / "cond.png", np.full((48, 64), 9, np.uint8))),
                             {"conditioning_image": "cond.png"}, "seg", "skipped"),
    "condition_size_mismatch": (lambda root: (write_png(root / "a.png", picture()),
                                              write_png(root / "cond.png", np.full((30, 30), 200, np.uint8))),
                                {"conditioning_image": "cond.png"}, "depth", "converted"),
}


@pytest.mark.parametrize("fault", list(DATASET_FAULTS))
def test_dataset_fault_is_skipped_and_named_or_converted(fault, tmp_path, caplog):
    write, change, control, outcome = DATASET_FAULTS[fault]
    write(tmp_path)
    write_png(tmp_path / "good.png", picture())
    record = {"image": "a.png", "text": "a red square"}
    good = {"image": "good.png", "text": "a red square", "conditioning_image": "good.png"}
    if control != "canny":
        write_png(tmp_path / "good.png", np.full((48, 64), 1, np.uint8))  # a valid id map / depth map
        good = {"image": "good.png", "conditioning_image": "good.png", "text": "x"}
    line = change if isinstance(change, str) else json.dumps({k: v for k, v in {**record, **change}.items()
                                                              if v is not None})
    (tmp_path / "metadata.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = FolderDataset(tmp_path, control, resolution=64, num_classes=3 if control == "seg" else None)
        item = dataset[1]
    assert isinstance(dataset[0], dict)  # the good record loads whatever its neighbour holds
    if outcome == "skipped":
        assert isinstance(item, SkippedItem), item
        assert ("line 2" if fault == "metadata_line_not_json" else "png") in item.error, item.error
        assert "\n" not in item.error
        batch = collate([dataset[0], item])
        assert len(batch["text"]) == 1 and batch["skipped"] == [item]
        return
    assert isinstance(item, dict), item
    pixels = (item["pixel_values"] + 1) * 127.5
    assert pixels.shape == (3, 64, 64) and item["conditioning"].shape[-2:] == (64, 64)
    if fault == "grayscale":
        assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    if fault in ("rgba", "png_16_bit", "cmyk_jpeg"):  # the colours of the picture, alpha dropped, 8 bits
        red = pixels[:, 20, 25]  # inside the red rectangle after resize + crop
        assert (red - torch.tensor([200.0, 40, 30])).abs().max() <= 12, red  # JPEG's error at most
    if fault == "missing_caption":
        assert item["text"] == "" and "have no caption" in caplog.text
    if fault == "caption_2000_chars":
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
        ids = tokenizer([item["text"]], padding="max_length", max_length=77, truncation=True).input_ids
        assert len(item["text"]) > 1900 and len(ids[0]) == 77  # the text encoder reads the first 77 tokens


def test_skip_budget_tolerates_the_odd_bad_file_counts_it_once_and_stops_a_systematic_fault():
    budget = SkipBudget("train", dataset_size=48, max_fraction=0.01)
    for _ in range(20):  # one corrupt image in 48, every epoch: tolerated, counted once
        batch = budget.take({"text": ["x"] * 3, "skipped": [SkippedItem(7, "a.png is not a readable image")]})
        assert batch == {"text": ["x"] * 3}
    assert budget.report() == {"skipped": 1, "drawn": 80, "first": ["a.png is not a readable image"]}
    broken = SkipBudget("train", dataset_size=20_000, max_fraction=0.01)  # every item fails: stop at once
    with pytest.raises(TooManySkippedError, match=r"16 of the last 16 train items .* the first error: file 0"):
        broken.take({"skipped": [SkippedItem(i, f"file {i}") for i in range(16)]})


def test_one_corrupt_image_is_skipped_and_counted_in_metrics_json_without_a_logger(shapes_root, tmp_path):
    """Also the documented `logger=none`: no logger directory, metrics.json still written."""
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    first = json.loads((root / "train" / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    (root / "train" / first).write_bytes(b"\x89PNG not really")
    result = train(*tiny(root, steps=4), f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    skipped = metrics["skipped"]["train"]
    assert skipped["skipped"] == 1 and first in skipped["first"][0] and skipped["drawn"] == 8
    assert not any((tmp_path / "run" / name).exists() for name in ("csv", "wandb", "tensorboard", "lightning_logs"))
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_a_systematic_data_fault_stops_the_run_in_one_line_naming_the_first_file(shapes_root, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(b"")
    result = train(*tiny(root), f"hydra.run.dir={tmp_path / 'run'}")
    one_line_error(result, "items could not be read", "data.max_skip_fraction=0.01", "the first error:", ".png")
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


# --- missing models: preflight ----------------------------------------------------------

def write_coco(root: Path) -> Path:
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        write_png(root / split / "000000000001.jpg", picture())
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "000000000001.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    return root


def incomplete_base_model(tmp_path: Path, missing: str) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns(missing))
    return folder


def truncated_checkpoint(tmp: Path) -> Path:
    path = tmp / "last.ckpt"
    path.write_bytes(b"PK\x03\x04" + bytes(100))  # a zip's first bytes, then nothing
    return path


def compose(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config, overrides=overrides)


@pytest.mark.slow
def test_missing_depth_model_stops_train_py_in_one_line_naming_the_key(tmp_path):
    """The issue's case: with no depth model reachable, every item used to fail and be
    skipped one by one until validation died. An empty Hugging Face cache, offline: the hub
    id cannot be found whatever this machine has cached."""
    result = train("experiment=depth", "data=coco", f"data.train.root={write_coco(tmp_path / 'coco')}",
                   "data.num_workers=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    one_line_error(result, "train.py: data.train.depth_model=Intel/dpt-hybrid-midas: ", "not in the Hugging Face cache",
                   "give a local path to a depth-estimation model folder")
    assert not (tmp_path / "run" / "checkpoints").exists()


# name: (overrides, given a scratch folder; what the one line says)
CONFIG_FAULTS = {
    "base_model_without_its_tokenizer": (
        lambda tmp: [f"model.pretrained={incomplete_base_model(tmp, 'tokenizer')}"],
        ["model.pretrained=", "the base model folder has no tokenizer", "give a complete diffusers folder"]),
    "resume_path_that_does_not_exist": (
        lambda tmp: [f"resume={tmp / 'nowhere' / 'last.ckpt'}"],
        ["resume=", "nowhere/last.ckpt: no such checkpoint", "give a .ckpt a run wrote"]),
    "resume_checkpoint_truncated": (
        lambda tmp: [f"resume={truncated_checkpoint(tmp)}"], ["resume=", "not a readable checkpoint (truncated"]),
    "block_size_that_does_not_divide_a_layer": (
        lambda tmp: ["method=oft", "adapter.num_blocks=null", "adapter.block_size=7"],
        ["module:", "OFT block_size=7 does not divide the input size", "valid block sizes"]),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_missing_model_or_bad_setting_stops_before_the_first_step_in_one_line(fault, shapes_root, tmp_path):
    """train.py's own function on the composed config (train.py turns the SystemExit into its
    exit status and message): it stops before any data is read or model trained."""
    from orthodiff.app.train import train as train_entry

    make_overrides, fragments = CONFIG_FAULTS[fault]
    cfg = compose("train", ["experiment=canny", f"data.train.root={shapes_root}", "logger=none",
                            *make_overrides(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        train_entry(cfg)
    message = str(stop.value)
    assert message.startswith("train.py: ") and "\n" not in message and all(f in message for f in fragments), message


def test_a_depth_model_that_fails_inside_a_worker_is_not_skipped_item_by_item(tmp_path):
    from orthodiff.data import CocoDataset

    dataset = CocoDataset(write_coco(tmp_path / "coco"), split="val2017", control="depth", resolution=64,
                          depth_model=tmp_path / "no-such-model")
    with pytest.raises(RuntimeError, match="the depth model .*no-such-model.* could not be loaded"):
        dataset[0]


def test_base_model_preflight_names_the_missing_part(tmp_path):
    for k, (missing, named) in enumerate((("unet", "has no unet"), ("model_index.json", "no model_index.json"),
                                          ("diffusion_pytorch_model.safetensors", "has no unet weights"))):
        folder = tmp_path / f"base{k}"
        shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns(missing))
        with pytest.raises(MissingResourceError, match=f"base={folder}: .*{named}"):
            check_base_model("base", folder)
    check_base_model("base", TINY)
    with pytest.raises(MissingResourceError, match="no such single-file checkpoint"):
        check_base_model("model.pretrained", tmp_path / "sd.safetensors")


# --- model faults: adapter files ----------------------------------------------------------

def rewrite(path: Path, out: Path, tensors=None, metadata=None) -> Path:
    with safe_open(str(path), "pt") as f:
        original, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file({**original, **(tensors or {})}, out, metadata={**meta, **(metadata or {})})
    return out


@pytest.fixture(scope="module")
def adapter_file(module, tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapter") / "adapter.safetensors", module)


def test_truncated_adapter_or_a_pickle_renamed_safetensors_is_named(adapter_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter_file.read_bytes()[:5000])
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.zeros(3)}, pickled)
    for path in (truncated, pickled):
        with pytest.raises(ValueError, match=f"{path} is not a safetensors file") as error:
            read_adapter(path)
        assert "\n" not in str(error.value)


def test_adapter_tensor_of_the_wrong_shape_or_dtype_is_named_and_half_precision_is_cast(adapter_file, tmp_path):
    tensors, _ = read_adapter(adapter_file)
    key = next(k for k in tensors if k.endswith("oft_generator"))
    wrong_shape = rewrite(adapter_file, tmp_path / "shape.safetensors", {key: torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=f"{key} has shape \\(3, 5\\), the model expects"):
        load_adapter(wrong_shape)
    integers = rewrite(adapter_file, tmp_path / "int.safetensors", {key: tensors[key].to(torch.int64)})
    with pytest.raises(ValueError, match=f"{key} is torch.int64, the model expects floating point"):
        load_adapter(integers)
    half = rewrite(adapter_file, tmp_path / "half.safetensors", {k: v.half() for k, v in tensors.items()})
    loaded = load_adapter(half).trainable_state_dict()
    assert all(loaded[k].dtype == torch.float32 for k in loaded)
    assert max((loaded[k] - tensors[k]).abs().max().item() for k in loaded) < 1e-3  # fp16 rounding only


def test_eval_and_generate_refuse_a_missing_base_model_in_one_line(adapter_file, tmp_path):
    """Before any model loads; eval.py and generate.py print the FileNotFoundError as their one line."""
    from orthodiff.app.evaluate import evaluate
    from orthodiff.app.generate import GenerateConfig, generate

    folder = incomplete_base_model(tmp_path, "text_encoder")
    with pytest.raises(MissingResourceError, match=f"^base={folder}: the base model folder has no text_encoder;"):
        generate(GenerateConfig(adapter=str(adapter_file), prompt="x", condition="x.png", base=str(folder)))
    cfg = compose("eval", [f"ckpt={adapter_file}", f"model.pretrained={folder}"])
    with pytest.raises(MissingResourceError, match=f"^model.pretrained={folder}: the base model folder has no "):
        evaluate(cfg)


def test_edit_preflight_names_the_missing_base_model_or_clip_model(adapter_file, tmp_path):
    from orthodiff.app.preflight import check_edit
    from orthodiff.editing.run import EditConfig

    folder = incomplete_base_model(tmp_path, "vae")
    with pytest.raises(MissingResourceError, match=f"^base={folder}: the base model folder has no vae;"):
        check_edit(EditConfig(prompt="a", attribute="b", base=str(folder)))
    with pytest.raises(MissingResourceError, match=f"^clip_model={tmp_path / 'clip'}: no such folder;"):
        check_edit(EditConfig(prompt="a", attribute="b", adapter=str(adapter_file), clip_model=str(tmp_path / "clip")))
    check_edit(EditConfig(prompt="a", attribute="b"))  # the tiny SD and the shapes oracles are shipped
