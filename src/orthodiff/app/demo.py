"""The Gradio demo (`python demo.py`): upload or draw a condition, type a prompt, pick an
adapter, generate. A subject adapter (experiment=dreambooth: "a sks square ...") needs no
condition; for a Perfusion one the beta/tau sliders set its gate. A second condition composes a
second adapter with the first (its path, condition and scale; OFT rotations by product or
geodesic mean, as generate.py adapter=[A,B] does) or feeds a jointly trained adapter's second one.

    python demo.py [--host 127.0.0.1] [--port 7860] [--adapters DIR ...] [--base MODEL] [--share false]

The adapter list holds every `adapter.safetensors` under the --adapters folders (default:
outputs/ and assets/adapters/); a path typed in the box (an adapter file or a train.py run
directory) takes precedence. Loading a pipeline is the slow part: the loaded ones are kept
(the last MAX_CACHED) per adapter file.

The Generate button is also an HTTP API endpoint, "/generate":

    from gradio_client import Client, handle_file
    condition, samples, info = Client("http://127.0.0.1:7860/").predict(
        condition=handle_file("edges.png"), prompt="a red circle on a white background",
        adapter_path="outputs/.../adapter.safetensors", steps=25, api_name="/generate")

Bad input (no adapter, an unreadable image, a condition the adapter cannot take) comes
back as an error message, not a traceback. The app reads any path typed into it on the
machine it runs on: serve it on localhost (the default), not to the world.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home, before gradio is imported

import cv2  # noqa: E402
import diffusers  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from orthodiff.app.generate import SCHEDULERS, adapter_file, build_pipeline, conditions_preview  # noqa: E402
from orthodiff.app.preflight import MissingResourceError, check_base_model  # noqa: E402
from orthodiff.pipelines.pipeline import ANNOTATE  # noqa: E402

DEFAULT_ADAPTER_DIRS = ("outputs", "assets/adapters")
ADAPTER_NAME = "adapter.safetensors"
MAX_CACHED = 2  # pipelines kept loaded (an SD 1.5 one is ~4 GB)
MAX_QUEUE = 8  # /generate requests waiting at most; more are refused with "queue is full", not held in memory
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5  # generate.py's, for adapters that record none
DEFAULT_BETA, DEFAULT_TAU = 0.7, 0.15  # Perfusion's inference gate (PerfusionConfig)
BAD_INPUT = (FileNotFoundError, ValueError, RuntimeError, OSError)


def friendly_preprocess(component: gr.components.Component, what: str) -> gr.components.Component:
    """Make `component`'s preprocessing failures (an unreadable upload) an error message for
    the user; gradio shows its own as a bare "Error". Patched on the instance: a subclass
    would make gradio write a .pyi stub beside this file."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as error:
            raise gr.Error(f"the {what} is not a readable image ({type(error).__name__}: {error})",
                           print_exception=False) from None

    component.preprocess = checked
    return component


def find_adapters(folders) -> list[Path]:
    """Every adapter.safetensors under `folders` (recursively), newest first."""
    found = set()
    for folder in folders:
        folder = Path(folder).expanduser()
        if folder.is_file() and folder.name.endswith(".safetensors"):
            found.add(folder.resolve())
        elif folder.is_dir():
            found.update(path.resolve() for path in folder.rglob(ADAPTER_NAME) if path.is_file())
    return sorted(found, key=lambda p: (-p.stat().st_mtime, str(p)))


def adapter_choices(folders) -> list[tuple[str, str]]:
    """(label, path) pairs for the dropdown: labels relative to the working directory."""
    cwd = Path.cwd()
    return [(str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path), str(path))
            for path in find_adapters(folders)]


def adapter_metadata(path: Path) -> dict:
    """The metadata strings of an adapter file, without reading its tensors."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def condition_from_sketch(sketch, size: tuple[int, int], control: str) -> np.ndarray | None:
    """A drawing -> a condition image. For Canny, the strokes (whatever their colour, on
    whatever background) become a 0/255 edge map at the network's `size`, which
    annotate="auto" then takes as it is; other controls get the drawing as an image."""
    image = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if image is None:
        return None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:  # flatten RGBA on white
        alpha = image[..., 3:4].astype(np.float32) / 255
        image = np.uint8(image[..., :3] * alpha + 255 * (1 - alpha))
    grey = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    background = np.median(grey)
    strokes = np.abs(grey.astype(np.float32) - background) > 64
    if not strokes.any():
        return None  # an empty canvas
    if control != "canny":
        return np.ascontiguousarray(image)
    height, width = size
    coverage = cv2.resize(strokes.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return np.uint8(coverage > 0.2) * 255


class Demo:
    """The app's state: where adapters are looked for, the base model, and the loaded
    pipelines (least recently used dropped first)."""

    def __init__(self, adapter_dirs=DEFAULT_ADAPTER_DIRS, base: str | None = None, device: str = "auto"):
        self.adapter_dirs = list(adapter_dirs)
        self.base = base
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.pipelines: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def resolve_adapter(self, choice: str | None, path: str | None) -> Path:
        text = (path or "").strip() or (choice or "").strip()
        if not text:
            folders = ", ".join(self.adapter_dirs) or "(none)"
            raise FileNotFoundError(f"no adapter chosen: pick one from the list (adapters found under {folders}) "
                                    "or type the path of an adapter.safetensors or a train.py run directory")
        return adapter_file(text).resolve()

    def pipeline(self, adapter: Path | list[Path], scales=None, mode: str = "product"):
        """The pipeline of an adapter, or of several composed (generate.py's adapter=[A,B]), cached."""
        adapters = adapter if isinstance(adapter, list) else [adapter]
        key = (tuple((str(a), a.stat().st_mtime_ns) for a in adapters), self.base,
               None if scales is None else tuple(scales), mode)
        with self.lock:
            if key in self.pipelines:
                self.pipelines.move_to_end(key)
                return self.pipelines[key]
            pipe, meta = build_pipeline(adapters if len(adapters) > 1 else adapters[0], self.base, self.device,
                                        self.dtype, scales=scales, compose=mode)
            pipe.scheduler = getattr(diffusers, SCHEDULERS["ddim"]).from_config(pipe.scheduler.config)
            pipe.merge()  # base-model speed
            pipe.set_progress_bar_config(disable=True)
            self.pipelines[key] = (pipe, meta)
            while len(self.pipelines) > MAX_CACHED:
                self.pipelines.popitem(last=False)
            return pipe, meta

    def sampling(self, choice: str | None, path: str | None) -> tuple[int, float] | None:
        """The steps and guidance an adapter was validated with (None: unreadable)."""
        try:
            sampling = adapter_metadata(self.resolve_adapter(choice, path)).get("sampling")
            sampling = json.loads(sampling) if sampling else {}
        except Exception:  # an unreadable choice: the error comes on Generate
            return None
        return int(sampling.get("steps") or DEFAULT_STEPS), float(sampling.get("guidance", DEFAULT_GUIDANCE))

    def sampling_defaults(self, choice: str | None, path: str | None):
        """The sliders follow the adapter picked."""
        found = self.sampling(choice, path)
        return (gr.update(), gr.update()) if found is None else (gr.update(value=found[0]), gr.update(value=found[1]))

    def refresh(self, choice: str | None):
        choices = adapter_choices(self.adapter_dirs)
        values = [value for _, value in choices]
        return gr.update(choices=choices, value=choice if choice in values else (values[0] if values else None))

    def generate(self, condition, sketch, source: str, prompt: str, adapter_choice: str | None,
                 adapter_path: str | None, steps: float, guidance: float, seed: float, num_images: float,
                 annotate: str, beta: float = DEFAULT_BETA, tau: float = DEFAULT_TAU, second_path: str | None = "",
                 second_condition=None, second_scale: float = 1.0, compose: str = "product",
                 progress=gr.Progress()):  # noqa: B008 (gradio injects the tracker through this default)
        """Generate from a condition (an uploaded image, or a drawing) and a prompt with an
        adapter, or from a prompt alone with a subject adapter (beta/tau: a Perfusion
        adapter's gate). A second adapter (second_path, with second_condition, at
        second_scale) is composed with the first (compose: product | mean, as generate.py
        does); a jointly trained adapter takes its second condition there too. Returns the
        conditions as the networks saw them (None for a subject adapter), the samples and a summary."""
        try:
            return self._generate(condition, sketch, source, prompt, adapter_choice, adapter_path, steps,
                                  guidance, seed, num_images, annotate, progress, beta, tau,
                                  second_path, second_condition, second_scale, compose)
        except gr.Error:
            raise
        except BAD_INPUT as error:
            raise gr.Error(str(error), print_exception=False) from None

    def _generate(self, condition, sketch, source, prompt, adapter_choice, adapter_path, steps, guidance, seed,
                  num_images, annotate, progress, beta=DEFAULT_BETA, tau=DEFAULT_TAU, second_path="",
                  second_condition=None, second_scale=1.0, compose="product"):
        if annotate not in ANNOTATE:
            raise ValueError(f"annotate={annotate!r}: choose one of {', '.join(ANNOTATE)}")
        steps, num_images, seed = int(steps), int(num_images), int(seed)
        if steps < 1 or num_images < 1 or seed < 0:
            raise ValueError(f"steps={steps}, num images={num_images}, seed={seed}: steps and images must be at "
                             "least 1, the seed at least 0")
        adapter = self.resolve_adapter(adapter_choice, adapter_path)
        adapters = [adapter] + ([adapter_file(second_path.strip()).resolve()] if (second_path or "").strip() else [])
        start = time.perf_counter()
        progress(0, desc="loading the adapter")
        composed = len(adapters) > 1
        pipe, meta = self.pipeline(adapters, [1.0, float(second_scale)] if composed else None, compose)
        loaded = time.perf_counter() - start
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor

        def step_end(pipeline, step, timestep, kwargs):
            progress((step + 1) / steps, desc="denoising")
            return kwargs

        if pipe.task == "subject":
            return self._generate_subject(pipe, meta, adapter, prompt, steps, guidance, seed, num_images, beta, tau,
                                          step_end, start, loaded, native)
        drawn = condition_from_sketch(sketch, (native, native), pipe.control) if sketch is not None else None
        image = drawn if source == "draw" and drawn is not None else condition if condition is not None else drawn
        if image is None:
            raise ValueError("no condition: upload an image (a photo to annotate, or a ready "
                             f"{pipe.control} map) or draw one")
        if len(pipe.conditions) > 2:
            raise ValueError(f"these adapters take {len(pipe.conditions)} conditions ({', '.join(pipe.conditions)}); "
                             "the demo gives two: use generate.py condition=[...]")
        with self.lock:  # one generation at a time per pipeline: the control hooks are per call
            result = pipe(prompt or "", control_image=[image, second_condition] if len(pipe.conditions) > 1 else image,
                          annotate=annotate, num_images_per_prompt=num_images,
                          num_inference_steps=steps, guidance_scale=float(guidance),
                          generator=torch.Generator().manual_seed(seed), callback_on_step_end=step_end)
            seen = conditions_preview(pipe.last_conditions, (native, native))
        took = time.perf_counter() - start
        second = f" + {adapters[1].parent.name}/ at scale {float(second_scale):g} ({compose})" if composed else ""
        info = (f"{' + '.join(m['method'] or 'no' for m in pipe.adapters_metadata)} adapter, "
                f"{' + '.join(pipe.conditions)} control, {Path(adapter).name} in "
                f"{Path(adapter).parent.name}/{second}: {num_images} image(s) of {native}x{native}, {steps} steps, "
                f"guidance {float(guidance):g}, seed {seed}, {took:.1f} s"
                + (f" (loading {loaded:.1f} s)" if loaded > 0.5 else ""))
        return seen, [(sample, f"seed {seed}, #{k}") for k, sample in enumerate(result.images)], info

    def _generate_subject(self, pipe, meta, adapter, prompt, steps, guidance, seed, num_images, beta, tau, step_end,
                          start, loaded, native):
        gated = bool(pipe.embedding.gate_settings())  # the sliders set a gate where the adapter has one (Perfusion)
        gate = {"perfusion_beta": float(beta), "perfusion_tau": float(tau)} if gated else {}
        with self.lock:
            result = pipe(prompt or "", num_images_per_prompt=num_images, num_inference_steps=steps,
                          guidance_scale=float(guidance), generator=torch.Generator().manual_seed(seed),
                          callback_on_step_end=step_end, **gate)
        took = time.perf_counter() - start
        gate_info = f", gate beta {float(beta):g} tau {float(tau):g}" if gated else ""
        info = (f"{meta['method'] or 'no'} subject adapter (token {meta['token']!r}{gate_info}), {Path(adapter).name} "
                f"in {Path(adapter).parent.name}/: {num_images} image(s) of {native}x{native}, {steps} steps, guidance "
                f"{float(guidance):g}, seed {seed}, {took:.1f} s"
                + (f" (loading {loaded:.1f} s)" if loaded > 0.5 else ""))
        return None, [(sample, f"seed {seed}, #{k}") for k, sample in enumerate(result.images)], info


def build_app(adapter_dirs=DEFAULT_ADAPTER_DIRS, base: str | None = None, device: str = "auto") -> gr.Blocks:
    demo = Demo(adapter_dirs, base, device)
    choices = adapter_choices(demo.adapter_dirs)
    initial_steps, initial_guidance = (demo.sampling(choices[0][1], None) if choices else None) or (
        DEFAULT_STEPS, DEFAULT_GUIDANCE)
    with gr.Blocks(title="orthodiff demo") as app:
        gr.Markdown("# orthodiff\nControllable generation with an orthogonally finetuned (OFT/COFT) adapter: "
                    "give a condition (an image to annotate, a ready condition map, or a drawing), "
                    "a prompt and an adapter, then **Generate**. A subject adapter (\"a sks square ...\") "
                    "needs no condition.")
        source = gr.State("upload")
        with gr.Row():
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Upload") as upload_tab:
                        condition = friendly_preprocess(gr.Image(
                            label="condition image", type="numpy", image_mode="RGB", sources=["upload", "clipboard"],
                            height=320), "condition image")
                    with gr.Tab("Draw") as draw_tab:
                        sketch = friendly_preprocess(gr.Sketchpad(
                            label="draw the edges (Canny adapters)", type="numpy", image_mode="RGB",
                            canvas_size=(256, 256), height=320, layers=False,
                            brush=gr.Brush(default_size=4, colors=["#000000"], color_mode="fixed")), "drawing")
                prompt = gr.Textbox(label="prompt", value="a red circle on a white background", lines=2)
                with gr.Row():
                    adapter_choice = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None,
                                                 label="adapter", info=f"adapter.safetensors under "
                                                 f"{', '.join(demo.adapter_dirs) or '(none)'}", scale=4)
                    refresh = gr.Button("↻ rescan", scale=1, min_width=80)
                adapter_path = gr.Textbox(value="", label="or an adapter path",
                                          placeholder="outputs/<run>/adapter.safetensors or a run directory "
                                          "(takes precedence over the list)")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=initial_steps, step=1, label="steps")
                    guidance = gr.Slider(0, 15, value=initial_guidance, step=0.5, label="guidance")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                    num_images = gr.Slider(1, 8, value=2, step=1, label="images")
                annotate = gr.Radio(list(ANNOTATE), value="auto", label="annotate",
                                    info="auto: Canny edges of an image unless it is already an edge map")
                with gr.Row():
                    beta = gr.Slider(0, 1.5, value=DEFAULT_BETA, step=0.05, label="Perfusion gate beta",
                                     info="Perfusion adapters: higher keeps more of the prompt")
                    tau = gr.Slider(0.01, 0.5, value=DEFAULT_TAU, step=0.01, label="Perfusion gate tau")
                with gr.Accordion("a second condition (composed adapters, or a jointly trained one)", open=False):
                    second_path = gr.Textbox(value="", label="second adapter path",
                                             placeholder="composed with the first; empty for a jointly trained "
                                             "adapter, whose second condition goes below")
                    second_condition = friendly_preprocess(gr.Image(
                        label="second condition image", type="numpy", image_mode="RGB",
                        sources=["upload", "clipboard"], height=200), "second condition image")
                    with gr.Row():
                        second_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="second adapter's scale")
                        compose = gr.Radio(["product", "mean"], value="product", label="compose OFT rotations",
                                           info="product: the first's rotation folded first; mean: geodesic mean")
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                seen = gr.Image(label="condition(s) as the network(s) saw them", type="numpy", format="png",
                                interactive=False, height=256)
                samples = gr.Gallery(label="samples", format="png", columns=4, height="auto", interactive=False)
                info = gr.Textbox(label="info", interactive=False)

        upload_tab.select(lambda: "upload", None, source, api_visibility="private")
        draw_tab.select(lambda: "draw", None, source, api_visibility="private")
        refresh.click(demo.refresh, adapter_choice, adapter_choice, api_visibility="private")
        for event in (adapter_choice.change, adapter_path.submit, adapter_path.blur):
            event(demo.sampling_defaults, [adapter_choice, adapter_path], [steps, guidance],
                  api_visibility="private")
        run.click(demo.generate, [condition, sketch, source, prompt, adapter_choice, adapter_path, steps, guidance,
                                  seed, num_images, annotate, beta, tau, second_path, second_condition,
                                  second_scale, compose], [seen, samples, info],
                  api_name="generate", concurrency_limit=1)
        app.orthodiff = demo  # for tests and scripts: the cache, the folders
    app.queue(max_size=MAX_QUEUE)  # one generation at a time (concurrency_limit=1), a bounded line behind it
    return app


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="demo.py", description="The orthodiff Gradio demo.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--adapters", nargs="+", metavar="DIR", default=list(DEFAULT_ADAPTER_DIRS),
                        help="folders searched for adapter.safetensors (default: outputs assets/adapters)")
    parser.add_argument("--base", default=None, help="base model (default: the one named in the adapter)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    parser.add_argument("--share", type=_bool, nargs="?", const=True, default=False,
                        help="a public gradio.live link (default: false)")
    args = parser.parse_args(argv)
    if args.base:  # adapters name their own base model: those are checked when one is picked
        try:
            check_base_model("--base", args.base)
        except MissingResourceError as error:
            raise SystemExit(f"demo.py: {error}") from None
    app = build_app(args.adapters, args.base, args.device)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
               footer_links=["api"])
