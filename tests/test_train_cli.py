"""train.py on the command line: what a run writes, resume, config and data errors,
crash-safe checkpoints, and scale-out (DDP on CPU, submitit, Optuna, an SD 1.5-sized step).

Every run is tiny: 3 steps of batch 4 on the fixture shapes dataset, validation on 4 images
with 2 sampling steps. Subprocesses get OMP_NUM_THREADS=1 (CI has two cores)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orthodiff.adapter import read_adapter
from orthodiff.oft import OFTConfig
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]
CANNY_KEYS = {"canny_iou", "canny_f1"}


def tiny(shapes_root) -> list[str]:
    return ["experiment=canny", f"data.train.root={shapes_root}", "data.val.max_items=4", "data.batch_size=4",
            "data.val_batch_size=4", "model.val_steps=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "logger=csv", "callbacks.progress_bar.refresh_rate=0"]


def train(*overrides: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_script("train.py", overrides, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def load_checkpoint(path: Path) -> dict:
    # Lightning loads with weights_only=True; the hparams hold the adapter's OFTConfig.
    with torch.serialization.safe_globals([OFTConfig]):
        return torch.load(path, map_location="cpu", weights_only=True)


def check_metrics(metrics: dict, keys=("step0", "final"), final_step: int = 3):
    assert set(keys) <= set(metrics) <= set(keys) | {"history", "cost", "skipped"}, metrics
    if "final" in keys:  # the run's validations in step order, and what it cost
        steps = [entry["step"] for entry in metrics["history"]]
        assert steps == sorted(steps) and steps[-1] == final_step and CANNY_KEYS <= set(metrics["history"][-1])
        cost = metrics["cost"]
        assert cost["seconds_per_step"] > 0 and cost["peak_memory_mb"] > 100 and cost["trainable_parameters"] > 0
        assert cost["torch_threads"] >= 1  # on record: CPU runs are bit-identical only at the same count
        assert metrics["skipped"]["train"] == {"skipped": 0, "drawn": 4 * final_step, "first": []}
    for values in (metrics[key] for key in keys):
        assert set(values) == CANNY_KEYS, values
        # F1 = 2b/(p+t) >= IoU = b/(p+t-b) image by image; both in [0, 1]. The tiny model
        # draws some matching edges from step 0 (IoU ~0.03 measured).
        assert 0 < values["canny_iou"] <= values["canny_f1"] <= 1, values


@pytest.fixture(scope="module")
def trained_run(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    succeeded(train(*tiny(shapes_root), f"hydra.run.dir={out}"))
    return out


# --- what a run writes --------------------------------------------------------------------

def test_run_writes_metrics_adapter_samples_and_a_trainable_only_checkpoint(trained_run):
    check_metrics(json.loads((trained_run / "metrics.json").read_text()))

    tensors, meta = read_adapter(trained_run / "adapter.safetensors")
    assert meta["base_model"] == "assets/tiny-sd" and meta["control"] == "canny"
    assert meta["method"] == "coft" and meta["control_network"] == "hint"
    oft = meta["adapter_config"]
    # conf/method/coft.yaml: r=4, eps=1e-3 in the paper convention; the adapter records which
    assert isinstance(oft, OFTConfig) and (oft.num_blocks, oft.coft, oft.eps, oft.coft_norm) == (4, True, 1e-3, "paper")

    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    state = checkpoint["state_dict"]
    assert all(k.startswith("control_network.") or k.endswith("oft_generator") for k in state)
    assert any(k.startswith("control_network.") for k in state) and any(k.endswith("oft_generator") for k in state)
    # The adapter is the trained state at the end: same keys, same numbers.
    assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state)
    # Weights + AdamW's two moments ~ 3x the trainable tensors; the 7.7 M frozen parameters
    # (31 MB) would break this bound.
    trainable_bytes = sum(t.numel() * t.element_size() for t in state.values())
    size = (trained_run / "checkpoints" / "last.ckpt").stat().st_size
    assert size < 4 * trainable_bytes, (size, trainable_bytes)

    grids = sorted((trained_run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000000.png", "step_000003.png"]
    for grid in grids:  # 4 rows of condition | sample | truth, 64 px tiles, 2 px gaps
        assert Image.open(grid).size == (3 * 64 + 2 * 2, 4 * 64 + 3 * 2)


def test_resume_restores_step_and_optimizer(trained_run, shapes_root, tmp_path):
    previous = trained_run / "checkpoints" / "last.ckpt"
    succeeded(train(*tiny(shapes_root), "trainer.max_steps=5", f"resume={previous}", f"hydra.run.dir={tmp_path}"))
    assert f"Restored all states from the checkpoint at {previous}" in (tmp_path / "train.log").read_text()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    check_metrics(metrics, final_step=5)  # step 0 is carried over from the run that wrote the checkpoint
    assert metrics["step0"] == json.loads((trained_run / "metrics.json").read_text())["step0"]
    assert [v["step"] for v in metrics["history"]] == [0, 3, 5]  # the earlier run's validations come with it

    before, after = load_checkpoint(previous), load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (before["global_step"], after["global_step"]) == (3, 5)
    for checkpoint, steps in ((before, 3), (after, 5)):
        (optimizer,) = checkpoint["optimizer_states"]
        # One AdamW state per trainable tensor; a fresh optimizer would have counted 2 steps.
        assert len(optimizer["state"]) == len(checkpoint["state_dict"])
        assert {float(s["step"]) for s in optimizer["state"].values()} == {steps}
        assert all(s["exp_avg_sq"].abs().sum() > 0 for s in optimizer["state"].values()
                   if s["exp_avg_sq"].numel() > 0)
    assert set(before["state_dict"]) == set(after["state_dict"])
    assert max((after["state_dict"][k] - v).abs().max() for k, v in before["state_dict"].items()) > 0


def test_checkpoint_reloads_into_a_fresh_module_exactly(trained_run, monkeypatch):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.chdir(ROOT)  # the config names assets/tiny-sd relative to the repository
    module = instantiate(OmegaConf.load(trained_run / ".hydra" / "config.yaml").module)
    saved = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")["state_dict"]
    fresh = module.trainable_state_dict()
    assert set(fresh) == set(saved)
    assert not all(torch.equal(fresh[k], saved[k]) for k in saved)  # zero-initialized vs trained
    # What Lightning's restore does with strict_loading=False: frozen keys missing, nothing extra.
    missing, unexpected = module.load_state_dict(saved, strict=False)
    assert unexpected == [] and set(missing) == set(module.state_dict()) - set(saved)
    restored = module.trainable_state_dict()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)


def test_adapter_metadata_rebuilds_the_trained_encoder(trained_run):
    from orthodiff.models import ControlEncoder

    tensors, meta = read_adapter(trained_run / "adapter.safetensors")
    encoder = ControlEncoder.from_config(meta["control_network_config"])
    assert (encoder.config.in_channels, encoder.config.out_channels, encoder.config.downscale_factor) == (1, 64, 4)
    encoder.load_state_dict({k.removeprefix("control_network."): v for k, v in tensors.items()
                             if k.startswith("control_network.")})


def test_fast_dev_run_trains_one_batch_and_keeps_nothing(shapes_root, tmp_path):
    result = succeeded(train("debug=fast_dev_run", "experiment=canny", f"data.train.root={shapes_root}",
                             f"hydra.run.dir={tmp_path}"))
    log = result.stdout + result.stderr
    assert "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)" in log
    assert not any((tmp_path / name).exists() for name in ("checkpoints", "metrics.json", "adapter.safetensors",
                                                           "csv", "wandb"))


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, full_key", [("trainer.max_stepz=3", "trainer.max_stepz"),
                                                ("module.optimzer.lr=1", "module.optimzer")])
def test_misspelt_key_fails_with_hydras_error(override, full_key):
    """The configs are in struct mode: a misspelt key fails composition (what train.py prints)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        with pytest.raises(ConfigCompositionException) as error:
            compose("train", overrides=["experiment=canny", override])
    message = f"{error.value} {error.value.__cause__}"
    assert "is not in struct" in message and f"full_key: {full_key}" in message, message


@pytest.mark.slow
def test_missing_dataset_names_the_path_and_the_command_that_writes_it(tmp_path):
    missing = tmp_path / "no_shapes_here"
    result = train("experiment=canny", f"data.train.root={missing}", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert str(missing) in result.stderr and "python -m orthodiff.data.shapes" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- crash-safe checkpoints ---------------------------------------------------------------

# Saves a second checkpoint with train.py's AtomicCheckpointIO (what ModelCheckpoint and
# Trainer.save_checkpoint go through, on one device and under DDP) and SIGKILLs itself
# halfway through writing the bytes.
KILL_MID_SAVE = """
import io, os, signal, sys
import torch
from orthodiff.app.train import AtomicCheckpointIO

save = torch.save
def half_save(obj, file):
    buffer = io.BytesIO(); save(obj, buffer); data = buffer.getvalue()
    file.write(data[: len(data) // 2]); file.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_save
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((100_000,), 2.0)}, "global_step": 2}, sys.argv[1])
print("save finished")
"""


@pytest.mark.parametrize("tmpdir_elsewhere", [False, True])
def test_checkpoint_killed_mid_save_keeps_the_previous_one(tmp_path, tmpdir_elsewhere):
    """Also with TMPDIR on another filesystem (node-local scratch on clusters), where
    Lightning's own writer would copy over the old file in place."""
    from orthodiff.app.train import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100_000)}, "global_step": 1}, path)
    good = path.read_bytes()
    script = tmp_path / "kill_mid_save.py"
    script.write_text(KILL_MID_SAVE)
    tmpdir = "/dev/shm" if tmpdir_elsewhere and Path("/dev/shm").is_dir() else str(tmp_path)
    result = run_script(script, [str(path)], env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmpdir}, timeout=120)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])  # killed mid-save
    assert path.read_bytes() == good
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(100_000))
    assert {p.name for p in path.parent.iterdir()} <= {"last.ckpt", ".last.ckpt.tmp"}  # the next save replaces it


# --- scale-out ----------------------------------------------------------------------------

def test_cluster_launcher_submits_one_slurm_array_with_a_task_per_gpu(tmp_path):
    """hydra/launcher=cluster goes through submitit's SLURM executor up to sbatch (faked here)."""
    bin_dir, script = tmp_path / "bin", tmp_path / "sbatch_script.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor last; do :; done\ncp "$last" {script}\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, "train.py", "-m", "hydra/launcher=cluster", "hydra.launcher.partition=gpu", "trainer=ddp",
         "trainer.devices=4", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not script.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:  # after submitting, submitit polls sacct for the (fake) job forever
        process.kill()
        _, stderr = process.communicate()
    assert script.exists(), stderr[-3000:]
    lines = set(script.read_text().splitlines())
    assert {"#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4",
            "#SBATCH --ntasks-per-node=4", "#SBATCH --nodes=1", "#SBATCH --time=1440"} <= lines, lines


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(shapes_root, tmp_path):
    result = succeeded(train(*tiny(shapes_root), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             f"hydra.run.dir={tmp_path}"))
    log = result.stdout + result.stderr
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    check_metrics(json.loads((tmp_path / "metrics.json").read_text()))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3
    read_adapter(tmp_path / "adapter.safetensors")


@pytest.mark.slow
def test_multirun_through_submitit_local(shapes_root, tmp_path):
    succeeded(train("-m", "hydra/launcher=submitit_local", *tiny(shapes_root), "module.optimizer.lr=1e-4,2e-4",
                    f"hydra.sweep.dir={tmp_path}"))
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2  # both went through submitit
    for job, lr in (("0", 1e-4), ("1", 2e-4)):
        check_metrics(json.loads((tmp_path / job / "metrics.json").read_text()))
        (optimizer,) = load_checkpoint(tmp_path / job / "checkpoints" / "last.ckpt")["optimizer_states"]
        assert optimizer["param_groups"][0]["lr"] == lr


@pytest.mark.slow
def test_optuna_sweep_maximizes_the_returned_metric(shapes_root, tmp_path):
    from omegaconf import OmegaConf

    succeeded(train("-m", "hparams_search=oft_optuna", *tiny(shapes_root), "hydra.sweeper.n_trials=2",
                    f"hydra.sweep.dir={tmp_path}"))
    finals = [json.loads((tmp_path / t / "metrics.json").read_text())["final"]["canny_iou"] for t in ("0", "1")]
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert finals[0] != finals[1]  # else the direction is not tested
    assert results["best_value"] == max(finals)  # canny_iou: metric_mode max -> direction maximize
    assert set(results["best_params"]) == {"module.optimizer.lr", "adapter.num_blocks", "adapter.eps"}


# --- Stable Diffusion 1.5's architecture -------------------------------------------------

SD15_UNET = ROOT / "conf" / "model" / "sd15_unet.json"


def test_shipped_sd15_unet_config_is_sd15():
    from diffusers import UNet2DConditionModel

    from orthodiff.oft import inject_oft

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(SD15_UNET.read_text()))
        reference = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD 1.5's
    assert {k: v.shape for k, v in unet.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet
    assert len(inject_oft(unet, OFTConfig(num_blocks=4, coft=True))) == 144


@pytest.mark.slow
def test_sd15_unet_oft_and_encoder_training_step_at_256px():
    """One COFT + control-encoder step on SD 1.5's real UNet (random weights) at 256x256."""
    from diffusers import UNet2DConditionModel

    from orthodiff.models import ControlEncoder, ControlInjector
    from orthodiff.oft import inject_oft, oft_layers, project_coft
    from orthodiff.oft.cayley import cayley, skew_from_triangle

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_config(json.loads(SD15_UNET.read_text()))
    assert len(inject_oft(unet, OFTConfig(num_blocks=4, coft=True, eps=1e-3))) == 144
    encoder = ControlEncoder(in_channels=3, out_channels=320, downscale_factor=8)
    injector = ControlInjector(unet, encoder)
    generators = [layer.oft_generator for layer in oft_layers(unet)]
    trainable = [p for p in unet.parameters() if p.requires_grad] + list(encoder.parameters())
    assert sum(p.numel() for p in trainable) == 13_144_928 + 1_086_480  # OFT r=4 + the encoder
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    built = time.perf_counter()

    latents, text, condition = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768), torch.rand(1, 3, 256, 256)
    noise, timestep = torch.randn_like(latents), torch.tensor([500])
    with injector.control(condition):
        prediction = unet(latents + noise, timestep, encoder_hidden_states=text).sample
    loss = torch.nn.functional.mse_loss(prediction, noise)
    loss.backward()
    optimizer.step()
    project_coft(unet)
    stepped = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"SD 1.5 UNet: build + inject {built - start:.1f} s, one step {stepped - built:.1f} s, "
          f"peak RSS {peak_gb:.1f} GB")

    assert torch.isfinite(loss) and prediction.shape == (1, 4, 32, 32)
    assert all(p.grad is None for n, p in unet.named_parameters() if not n.endswith("oft_generator"))
    assert all(g.grad is not None and g.grad.abs().max() > 0 for g in generators)  # all 144 layers learn
    # Zero-initialized last conv: only it gets a gradient on the first step.
    assert encoder.zero_conv.weight.grad.abs().max() > 0
    assert all(p.grad.abs().max() == 0 for p in encoder.blocks.parameters())
    assert encoder.zero_conv.weight.abs().max() > 0 and all(g.abs().max() > 0 for g in generators)
    worst = max((cayley(skew_from_triangle(layer.oft_generator.detach().double(), layer.block_size))
                 - torch.eye(layer.block_size, dtype=torch.float64)).flatten(1).norm(dim=1).max().item()
                for layer in oft_layers(unet))
    assert worst <= 1e-3 * (1 + 1e-6)  # COFT's eps-ball after the projection
    # fp32 weights are 3.4 GB; one 256 px step measured ~5 GB peak and ~13 s on one core.
    assert peak_gb < 10 and stepped - built < 180


def write_coco_fixture(root: Path, splits=(("train2017", 4), ("val2017", 2))) -> Path:
    """COCO 2017's layout (annotations/captions_<split>.json + <split>/<id>.jpg), flat shapes with edges."""
    for split, n in splits:
        images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 80, "width": 96} for i in range(n)]
        captions = [{"id": 100 + i, "image_id": image["id"], "caption": f"a grey square, picture {i}"}
                    for i, image in enumerate(images)]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": captions}))
        (root / split).mkdir(exist_ok=True)
        for i, image in enumerate(images):
            pixels = np.full((80, 96, 3), 40 * i, np.uint8)
            pixels[20:60, 24 + 4 * i:72] = 255
            Image.fromarray(pixels).save(root / split / image["file_name"])
    return root


@pytest.mark.slow
def test_sd15s_architecture_runs_train_and_generate_end_to_end_at_random_init(tmp_path):
    """model=sd15_random: SD 1.5's UNet and VAE (random init, built once under ~/.cache) through
    train.py's whole path on a COCO fixture, COFT in the paper convention on SD 1.5's 80-320-wide
    blocks, then generate.py with the adapter it saved."""
    coco, run = write_coco_fixture(tmp_path / "coco"), tmp_path / "run"
    eps = 1e-8  # paper convention; small enough that two steps at lr 1e-5 reach every block's radius
    # 128 px: SD 1.5's mid block sees 2x2 latents (at 64 px, 1x1: one token, whose self-attention
    # gives q and k no gradient at all)
    succeeded(train("experiment=canny_sd15", "model=sd15_random", "trainer=cpu", "model.resolution=128",
                    f"data.train.root={coco}", "data.batch_size=1", "data.val_batch_size=1", "data.num_workers=0",
                    "data.val.max_items=1", "model.val_steps=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                    "validate_at_start=false", f"adapter.eps={eps}", "logger=csv", f"hydra.run.dir={run}", timeout=900))

    metrics = json.loads((run / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["history"]] == [2] and CANNY_KEYS <= set(metrics["final"])
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    tensors, meta = read_adapter(run / "adapter.safetensors")
    assert meta["base_model"].endswith("sd15-random") and meta["adapter_config"].coft_norm == "paper"
    generators = {k: v for k, v in tensors.items() if k.endswith("oft_generator")}
    assert len(generators) == 144
    widths = set()
    for triangle in generators.values():  # (r, b(b-1)/2): every block on its radius eps * b^2 / sqrt(r)
        r, pairs = triangle.shape
        b = round((1 + (1 + 8 * pairs) ** 0.5) / 2)
        widths.add(b)
        norms = triangle.double().norm(dim=1) * 2**0.5  # ||Q_i||_F of the full skew matrix
        torch.testing.assert_close(norms, torch.full_like(norms, eps * b**2 / r**0.5), rtol=1e-4, atol=0)
    assert widths == {80, 160, 192, 320}  # 320/640/1280-wide layers and the 768-wide text projections, r=4

    condition = tmp_path / "edges.png"
    Image.fromarray(np.uint8(np.pad(np.ones((24, 24)), 20) * 255)).save(condition)
    result = run_script("generate.py", [f"adapter={run / 'adapter.safetensors'}", f"condition={condition}",
                                        "prompt=a grey square", "num_images=1", "steps=2", "height=128", "width=128",
                                        f"out={tmp_path / 'out'}"], timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 * 128, 128)  # condition | sample
