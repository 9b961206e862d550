"""Inference speed with an adapter, as ratios to the base model measured in one process.

    python benchmarks/bench_inference.py            # 15 rounds
    python benchmarks/bench_inference.py --quick    # 3 rounds (a demonstration)

Times one classifier-free-guided UNet call (batch 2 x 2, the shipped tiny SD, hint
control encoder features precomputed as in sampling) for: the base UNet, OFT unmerged
(the rotation applied on the fly), OFT merged (folded into the weights), LoRA unmerged
and merged, and a merged UNet exported and reloaded with plain diffusers. The variants
run interleaved round by round so machine noise hits all alike; each ratio is the
median over rounds of (variant time / base time). Merged variants should be 1.00:
the merged UNet is the base architecture with other numbers in its weights.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from orthodiff.adapter import save_adapter
from orthodiff.export import ExportConfig, export
from orthodiff.models import ControlInjector, LoRAConfig
from orthodiff.oft import OFTConfig
from orthodiff.pipelines import OrthodiffPipeline
from orthodiff.tasks import ControlTask

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-sd")


def adapter_file(folder: Path, method: str, adapter) -> Path:
    """An adapter whose tensors moved away from the identity (speed does not depend on values)."""
    module = ControlTask(control="canny", adapter=adapter, control_network="hint", method=method)
    with torch.no_grad():
        for parameter in (p for p in module.parameters() if p.requires_grad):
            parameter.add_(0.01 * torch.randn_like(parameter))
    return save_adapter(folder / f"{method}.safetensors", module)


def load(path: Path, merged: bool) -> tuple:
    pipe = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.load_adapter(path)
    if merged:
        pipe.merge()
    return pipe.unet, pipe.injector


def variants(folder: Path) -> dict:
    from diffusers import UNet2DConditionModel

    from orthodiff.models import ControlEncoder

    oft = adapter_file(folder, "oft", OFTConfig(num_blocks=4))
    lora = adapter_file(folder, "lora", LoRAConfig(rank=4))
    exported = export(ExportConfig(adapter=str(oft), out=str(folder / "exported")))
    plain = UNet2DConditionModel.from_pretrained(exported / "unet")
    base = OrthodiffPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False).unet
    hint = ControlEncoder.from_pretrained(exported / "control_network")
    return {"base": (base, ControlInjector(base, hint)), "oft": load(oft, False), "oft_merged": load(oft, True),
            "lora": load(lora, False), "lora_merged": load(lora, True),
            "exported": (plain, ControlInjector(plain, hint))}


@torch.no_grad()
def call_time(unet, injector, inputs, repeats: int) -> float:
    latents, t, text, condition = inputs
    with injector.control(condition):
        start = time.perf_counter()
        for _ in range(repeats):
            unet(latents, t, encoder_hidden_states=text)
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="reports/bench_inference.json")
    args = parser.parse_args()
    rounds, repeats = (3, 5) if args.quick else (15, 20)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        models = variants(Path(folder))
        channels = models["base"][0].config.in_channels  # the tiny SD's latent channels
        inputs = (torch.randn(4, channels, 16, 16), torch.tensor([500] * 4), torch.randn(4, 77, 64), torch.rand(2, 1, 64, 64))
        for unet, injector in models.values():  # warm-up
            call_time(unet, injector, inputs, 2)
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, (unet, injector) in models.items():
                times[name].append(call_time(unet, injector, inputs, repeats))
    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times["base"])) for name in models}
    report = {"threads": torch.get_num_threads(), "rounds": rounds, "repeats": repeats,
              "base_ms_per_call": round(1000 * statistics.median(times["base"]), 3),
              "ratio_to_base": {name: round(r, 3) for name, r in ratios.items()}}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
