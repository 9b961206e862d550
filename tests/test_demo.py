"""The Gradio demo (`python demo.py`), started on a free localhost port in a subprocess and
driven through its HTTP API with gradio_client, as a script would: samples of the base
model's size come back, and bad input comes back as a message."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,  # ~30-40 s on 2 cores: the server's start (imports) dominates
              # not importorskip("gradio"): its 7-8 s import would be paid at every worker's collection
              pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python demo.py` starting on a free port (the client fixture waits for it); its
    adapter folder is empty: the tests give adapters as paths."""
    tmp = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(tmp / "demo.log", "w")
    process = subprocess.Popen([sys.executable, "demo.py", "--host", "127.0.0.1", "--port", str(port),
                                "--adapters", str(tmp / "adapters"), "--share", "false"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}/", process, tmp / "demo.log"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A COFT canny adapter: the module's trainable tensors nudged away from zero (so the
    control network is not the identity) and saved."""
    from orthodiff.adapter import save_adapter
    from orthodiff.oft import OFTConfig
    from orthodiff.tasks import ControlTask

    torch.manual_seed(0)
    module = ControlTask(control="canny", adapter=OFTConfig(num_blocks=4, coft=True), control_network="hint",
                           method="coft", val_steps=2)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.05 if "control_network" in name else 1e-3))
    return save_adapter(tmp_path_factory.mktemp("run") / "adapter.safetensors", module)


@pytest.fixture(scope="module")
def client(server, adapter, tmp_path_factory):
    """A client of the server, once it answers (the adapter is built while it starts)."""
    url, process, log = server
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"demo.py exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"demo.py did not answer in 120 s: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A raw 96x80 image (not an edge map): the demo annotates it and resizes to 64x64."""
    image = np.full((80, 96, 3), 200, np.uint8)
    cv2.circle(image, (40, 40), 22, (255, 55, 45), -1)
    cv2.rectangle(image, (60, 20), (88, 60), (0, 45, 240), -1)
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(image).save(path)
    return path


def generate(client, **kwargs):
    args = dict(condition=None, sketch=None, prompt="a red circle and a blue square on a light gray background",
                adapter_choice=None, adapter_path="", steps=2, guidance=4.0, seed=0, num_images=2, annotate="auto")
    return client.predict(**{**args, **kwargs}, api_name="/generate")


def test_generate_returns_the_condition_and_samples(client, adapter, photo):
    condition, gallery, info = generate(client, condition=handle_file(str(photo)), adapter_path=str(adapter))
    seen = np.asarray(Image.open(condition))
    assert seen.shape[:2] == (64, 64)
    assert set(np.unique(seen).tolist()) <= {0, 255} and seen.max() == 255  # Canny edges of the photo
    assert len(gallery) == 2
    for item in gallery:
        sample = Image.open(item["image"])
        assert sample.size == (64, 64) and sample.mode == "RGB"
    assert "coft" in info and "canny" in info and "2 image(s)" in info

    # The same seed and inputs again: the cached pipeline, the same images.
    _, again, _ = generate(client, condition=handle_file(str(photo)), adapter_path=str(adapter))
    assert [np.asarray(Image.open(a["image"])).tolist() for a in again] == \
        [np.asarray(Image.open(g["image"])).tolist() for g in gallery]


def test_a_drawing_becomes_an_edge_map(client, adapter, tmp_path):
    drawing = np.full((256, 256, 3), 255, np.uint8)  # black strokes on white, as the sketchpad makes them
    cv2.rectangle(drawing, (60, 60), (190, 190), (0, 0, 0), 4)
    Image.fromarray(drawing).save(tmp_path / "drawing.png")
    sketch = {"background": None, "layers": [], "composite": handle_file(str(tmp_path / "drawing.png"))}
    condition, gallery, _ = generate(client, sketch=sketch, adapter_path=str(adapter), num_images=1)
    seen = np.asarray(Image.open(condition))[..., 0]
    assert seen.shape == (64, 64) and len(gallery) == 1
    assert seen[12:19, 20:44].max(axis=0).min() == 255  # the top side: white in every column
    assert seen[32, 32] == 0 and seen[2, 2] == 0  # black inside and outside


@pytest.mark.parametrize("case, match", [
    ("missing adapter", "no such adapter"),
    ("not an adapter", "not a safetensors file"),
    ("no adapter", "no adapter chosen"),
    ("unreadable image", "not a readable image"),
    ("no condition", "no condition"),
])
def test_bad_input_comes_back_as_a_message(client, adapter, photo, tmp_path, case, match):
    kwargs = dict(condition=handle_file(str(photo)), adapter_path=str(adapter))
    if case == "missing adapter":
        kwargs["adapter_path"] = str(tmp_path / "nowhere" / "adapter.safetensors")
    elif case == "not an adapter":
        (tmp_path / "adapter.safetensors").write_text("not safetensors")
        kwargs["adapter_path"] = str(tmp_path)  # a run directory
    elif case == "no adapter":
        kwargs["adapter_path"] = ""
    elif case == "unreadable image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        kwargs["condition"] = handle_file(str(tmp_path / "broken.png"))
    elif case == "no condition":
        kwargs["condition"] = None
    with pytest.raises(AppError, match=match) as error:
        generate(client, **kwargs)
    assert "Traceback" not in str(error.value)


def test_adapters_are_found_under_the_folders(tmp_path, adapter):
    from orthodiff.app.demo import adapter_choices, condition_from_sketch

    nested = tmp_path / "runs" / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "adapter.safetensors").write_bytes(Path(adapter).read_bytes())
    (tmp_path / "runs" / "other.safetensors").write_bytes(b"")  # not named adapter.safetensors
    choices = adapter_choices([tmp_path / "runs", tmp_path / "absent"])
    assert [value for _, value in choices] == [str((nested / "adapter.safetensors").resolve())]
    assert condition_from_sketch({"composite": np.full((32, 32, 3), 255, np.uint8)}, (64, 64), "canny") is None
    # gradio writes a .pyi stub beside any module that subclasses a component: none here.
    assert not (ROOT / "src" / "orthodiff" / "demo.pyi").exists()


def test_twenty_concurrent_requests_are_answered_or_refused_and_memory_settles(server, client, adapter, photo):
    """20 /generate requests at once against one server (one generation at a time, a queue of
    orthodiff.app.demo.MAX_QUEUE behind it), three rounds in a row: each request is answered or
    refused with gradio's queue message, none dropped, the server keeps serving, and its
    resident memory ends within 10 % of where it started (after a first request loaded the
    pipeline)."""
    psutil = pytest.importorskip("psutil")
    from orthodiff.app.demo import MAX_QUEUE

    _, process, log = server
    kwargs = dict(condition=None, sketch=None, prompt="a red circle", adapter_choice=None, adapter_path=str(adapter),
                  steps=2, guidance=4.0, seed=0, num_images=1, annotate="auto")
    generate(client, **{**kwargs, "condition": handle_file(str(photo))})  # loads the pipeline
    server_process = psutil.Process(process.pid)
    before = server_process.memory_info().rss
    for round in range(3):
        jobs = [client.submit(**{**kwargs, "condition": handle_file(str(photo)), "seed": k}, api_name="/generate")
                for k in range(20)]
        answered, refused = 0, []
        for job in jobs:
            try:
                _, gallery, _ = job.result(timeout=240)
                assert len(gallery) == 1
                answered += 1
            except Exception as error:  # refused: the queue was full
                refused.append(f"{type(error).__name__}: {error}")
        assert answered >= MAX_QUEUE // 2 and answered + len(refused) == 20, (round, refused)
        assert all("queue" in message.lower() for message in refused), (round, refused)  # none dropped
        assert process.poll() is None, log.read_text()[-3000:]
    condition, _, _ = generate(client, **{**kwargs, "condition": handle_file(str(photo))})  # still serving
    assert np.asarray(Image.open(condition)).shape[:2] == (64, 64)
    after = server_process.memory_info().rss
    assert after <= 1.10 * before, (before / 2**20, after / 2**20, answered, len(refused))
