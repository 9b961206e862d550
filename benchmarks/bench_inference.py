"""Inference speed with an adapter, as ratios to the base model measured in one process.

    python benchmarks/bench_inference.py            # 15 rounds
    python benchmarks/bench_inference.py --quick    # 3 rounds (a demonstration)
    python benchmarks/bench_inference.py --base ~/.cache/orthodiff/models/sd15-random \
        --device cuda --dtype bfloat16 --latent 64    # SD 1.5's architecture on a GPU (benchmarks/gpu.sh)

Times one classifier-free-guided UNet call (batch 2 x 2, the shipped tiny SD unless --base
names another pipeline folder, hint control encoder features precomputed as in sampling) for: the base UNet, OFT unmerged
(the rotation applied on the fly), OFT merged (folded into the weights), LoRA unmerged
and merged, and a merged UNet exported and reloaded with plain diffusers. The variants
run interleaved round by round so machine noise hits all alike; each ratio is the
median over rounds of (variant time / base time). Merged variants should be 1.00:
the merged UNet is the base architecture with other numbers in its weights.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from orthodiff.adapter import save_adapter
from orthodiff.app.export import ExportConfig, export
from orthodiff.models import ControlInjector, LoRAConfig
from orthodiff.models.base import resolve_pretrained
from orthodiff.oft import OFTConfig
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.tasks import ControlTask

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-sd")


def adapter_file(base: str, folder: Path, method: str, adapter) -> Path:
    """An adapter whose tensors moved away from the identity (speed does not depend on values)."""
    module = ControlTask(pretrained=base, control="canny", adapter=adapter, control_network="hint", method=method)
    with torch.no_grad():
        for parameter in (p for p in module.parameters() if p.requires_grad):
            parameter.add_(0.01 * torch.randn_like(parameter))
    return save_adapter(folder / f"{method}.safetensors", module)


def load(base: str, path: Path, merged: bool, device: str, dtype: torch.dtype) -> tuple:
    pipe = OrthodiffPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.load_adapter(path)
    if merged:
        pipe.merge()
    pipe.to(device, dtype)
    return pipe.unet, pipe.injector


def variants(base: str, folder: Path, device: str, dtype: torch.dtype) -> dict:
    from diffusers import UNet2DConditionModel

    from orthodiff.models import ControlEncoder

    oft = adapter_file(base, folder, "oft", OFTConfig(num_blocks=4))
    lora = adapter_file(base, folder, "lora", LoRAConfig(rank=4))
    exported = export(ExportConfig(adapter=str(oft), base=base, out=str(folder / "exported")))
    plain = UNet2DConditionModel.from_pretrained(exported / "unet").to(device, dtype)
    frozen = OrthodiffPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False).unet.to(device, dtype)
    hint = ControlEncoder.from_pretrained(exported / "control_network").to(device, dtype)
    loaded = {name: load(base, path, merged, device, dtype)
              for name, path, merged in (("oft", oft, False), ("oft_merged", oft, True),
                                         ("lora", lora, False), ("lora_merged", lora, True))}
    return {"base": (frozen, ControlInjector(frozen, hint)), **loaded, "exported": (plain, ControlInjector(plain, hint))}


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def call_time(unet, injector, inputs, repeats: int) -> float:
    latents, t, text, condition = inputs
    with injector.control(condition):
        synchronize(latents.device)
        start = time.perf_counter()
        for _ in range(repeats):
            unet(latents, t, encoder_hidden_states=text)
        synchronize(latents.device)
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base", default=TINY, help="a diffusers pipeline folder (default: the shipped tiny SD)")
    parser.add_argument("--latent", type=int, default=16, help="the latents' side (the tiny SD's native 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", default="reports/bench_inference.json")
    args = parser.parse_args()
    rounds, repeats = (3, 5) if args.quick else (15, 20)
    base, dtype = resolve_pretrained(args.base), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        models = variants(base, Path(folder), args.device, dtype)
        config = models["base"][0].config
        like = dict(device=args.device, dtype=dtype)
        vae = json.loads((Path(base) / "vae" / "config.json").read_text())
        side, image = args.latent, args.latent * 2 ** (len(vae["block_out_channels"]) - 1)  # the condition's pixels
        inputs = (torch.randn(4, config.in_channels, side, side, **like), torch.tensor([500] * 4, device=args.device),
                  torch.randn(4, 77, config.cross_attention_dim, **like), torch.rand(2, 1, image, image, **like))
        for unet, injector in models.values():  # warm-up
            call_time(unet, injector, inputs, 2)
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, (unet, injector) in models.items():
                times[name].append(call_time(unet, injector, inputs, repeats))
    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times["base"])) for name in models}
    report = {"command": " ".join(["python benchmarks/bench_inference.py", *sys.argv[1:]]), "base": args.base,
              "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "rounds": rounds, "repeats": repeats,
              "base_ms_per_call": round(1000 * statistics.median(times["base"]), 3),
              "ratio_to_base": {name: round(r, 3) for name, r in ratios.items()}}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
