"""eval.py on the command line: the report it writes, and the errors for an adapter used
with the wrong control type or base model."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from orthodiff.adapter import save_adapter
from orthodiff.oft import OFTConfig
from orthodiff.tasks import ControlTask
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]


def run_eval(*overrides: str) -> subprocess.CompletedProcess:
    return run_script("eval.py", overrides, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A canny COFT adapter whose encoder is no longer zero (as after training)."""
    module = ControlTask(control="canny", adapter=OFTConfig(num_blocks=4, coft=True), method="coft")
    torch.manual_seed(0)
    torch.nn.init.normal_(module.control_network.zero_conv.weight, std=0.02)
    out = tmp_path_factory.mktemp("run")
    save_adapter(out / "adapter.safetensors", module)
    return out


def test_eval_writes_control_fid_and_alignment_figures(adapter_dir, shapes_root, tmp_path):
    result = run_eval(f"ckpt={adapter_dir}", f"data.train.root={shapes_root}", "num_samples=8", "batch_size=4",
                      "steps=2", "grid_rows=4", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["method"] == "coft" and report["control"] == "canny" and report["data"]["n"] == 8
    assert report["data"]["split"] == "test"
    control = report["control_metrics"]
    assert 0 < control["canny_iou"] < control["canny_f1"] < 1  # a figure measured, neither end of the scale
    quality = report["image_quality"]
    assert quality["fid_extractor"] == "shapes" and quality["fid"] > 0 and quality["n_generated"] == 8
    assert "kid_note" in quality  # 8 images < the KID subset size: clamped, and said
    recognition = report["prompt_alignment"]["shapes_classifier"]
    assert (recognition["prompted_colors_recognized"] * 8).is_integer()  # a share of the 8 images
    assert (tmp_path / "grid.png").is_file()


def evaluate_in_process(*overrides: str) -> str:
    """The message eval.py would print for a refused run (eval.py turns these errors into one
    line; test_eval_names_a_missing_checkpoint checks that on the command line)."""
    from hydra import compose, initialize_config_dir

    from orthodiff.app.evaluate import evaluate

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("eval", overrides=list(overrides))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        evaluate(cfg)
    return str(error.value)


def test_eval_rejects_another_control_type_naming_both(adapter_dir, shapes_root):
    message = evaluate_in_process(f"ckpt={adapter_dir}", "control=seg", f"data.train.root={shapes_root}", "num_samples=4")
    assert "'canny' adapter" in message and "control=seg" in message


def test_eval_rejects_another_base_model_naming_both(adapter_dir, shapes_root, tmp_path):
    from diffusers import StableDiffusionPipeline

    from orthodiff.models.tiny_sd import build_unet

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets/tiny-sd")
    pipe.unet = build_unet(channels=(32, 64, 64))  # other target-layer shapes
    pipe.save_pretrained(tmp_path / "other-sd")
    message = evaluate_in_process(f"ckpt={adapter_dir}", f"model.pretrained={tmp_path / 'other-sd'}",
                                  f"data.train.root={shapes_root}", "num_samples=4")
    assert "assets/tiny-sd" in message and str(tmp_path / "other-sd") in message


def test_eval_names_a_missing_checkpoint(tmp_path):
    """On the command line: one line, no traceback."""
    result = run_eval(f"ckpt={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "no such adapter file or run directory" in result.stderr
    assert "Traceback" not in result.stderr
