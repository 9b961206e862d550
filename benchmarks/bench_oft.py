"""OFT speed at Stable Diffusion 1.5 attention shapes, as ratios measured in one process.

    python benchmarks/bench_oft.py            # all shapes + SD 1.5-sized merge
    python benchmarks/bench_oft.py --quick    # fewer repeats, smaller merge

For each shape (d x d linear layer, 2 x tokens rows, block size 32) it times
forward + backward of (a) the frozen layer alone, (b) orthodiff's OFTLinear (exact
Cayley and Neumann) and (c) PEFT's OFT with the same block size (exact Cayley, and its
default Cayley-Neumann; ours are compared like for like), interleaved round by round so
machine noise hits all alike; the reported ratio is the median over rounds. The input
requires grad, as it does inside a UNet whose earlier layers are adapted, so the frozen
layer's backward computes the input gradient.
"""

import argparse
import json
import math
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from orthodiff.models.adapters import merge_adapter
from orthodiff.oft import OFTConfig, count_parameters, inject_oft, oft_layers

DIMS = (320, 640, 1280)
TOKENS = (4096, 1024, 256)  # SD 1.5 latent 64x64, 32x32, 16x16; batch 2
BLOCK_SIZE = 32


class Holder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def make_models(d):
    from peft import OFTConfig as PeftOFTConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    frozen = Holder(d).requires_grad_(False)
    ours = Holder(d)
    ours.load_state_dict(frozen.state_dict())
    inject_oft(ours, OFTConfig(block_size=BLOCK_SIZE, targets=["proj"]))
    ours_neumann = Holder(d)
    ours_neumann.load_state_dict(frozen.state_dict())
    inject_oft(ours_neumann, OFTConfig(block_size=BLOCK_SIZE, cayley="neumann", targets=["proj"]))
    peft_base = Holder(d)
    peft_base.load_state_dict(frozen.state_dict())
    # PEFT's default is Cayley-Neumann (5 terms): "peft" is its exact transform, like ours by default.
    peft = get_peft_model(peft_base, PeftOFTConfig(oft_block_size=BLOCK_SIZE, r=0, use_cayley_neumann=False,
                                                   target_modules=["proj"]))
    peft_neumann_base = Holder(d)
    peft_neumann_base.load_state_dict(frozen.state_dict())
    peft_neumann = get_peft_model(peft_neumann_base, PeftOFTConfig(oft_block_size=BLOCK_SIZE, r=0, target_modules=["proj"]))
    return {"frozen": frozen, "orthodiff": ours, "orthodiff_neumann": ours_neumann, "peft": peft,
            "peft_neumann": peft_neumann}


def step_time(model, x, grad):
    start = time.perf_counter()
    model(x).backward(grad)
    return time.perf_counter() - start


def bench_shape(d, tokens, rounds):
    models = make_models(d)
    x = torch.randn(2 * tokens, d, requires_grad=True)
    grad = torch.randn(2 * tokens, d)
    for model in models.values():  # warm-up
        step_time(model, x, grad)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(step_time(model, x, grad))
    frozen = times["frozen"]
    ratio = lambda name, ref: statistics.median(a / b for a, b in zip(times[name], times[ref]))  # noqa: E731
    return {
        "d": d,
        "rows": 2 * tokens,
        "frozen_ms": 1000 * statistics.median(frozen),
        "orthodiff_vs_frozen": ratio("orthodiff", "frozen"),
        "orthodiff_neumann_vs_frozen": ratio("orthodiff_neumann", "frozen"),
        "peft_vs_frozen": ratio("peft", "frozen"),
        "orthodiff_vs_peft": ratio("orthodiff", "peft"),
        "orthodiff_neumann_vs_peft": ratio("orthodiff_neumann", "peft_neumann"),
        "peft_neumann_vs_frozen": ratio("peft_neumann", "frozen"),
        "arithmetic_limit": 1 + 3 * BLOCK_SIZE / (2 * d),
    }


def bench_merge(quick):
    """Merge OFT (r=4) into all 144 targets of an SD 1.5-sized UNet with random weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, block_out_channels=(160, 320, 640, 640) if quick else (320, 640, 1280, 1280))
    unet = unet.to_empty(device="cpu")  # uninitialised memory: only shapes matter for timing
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    layers = inject_oft(unet, OFTConfig(num_blocks=4))
    with torch.no_grad():
        for layer in oft_layers(unet):
            layer.oft_generator.normal_(0, 1e-3)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    merged = merge_adapter(unet)
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "unet": "SD 1.5 (half width)" if quick else "SD 1.5",
        "unet_parameters_M": sum(p.numel() for p in unet.parameters()) / 1e6,
        "oft_layers": len(layers),
        "merged": merged,
        "oft_free_parameters_M": count_parameters(unet) / 1e6,
        "merge_seconds": seconds,
        "peak_rss_increase_MB": (rss_after - rss_before) / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds and a half-width UNet merge")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/bench_oft.json"))
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, block size {BLOCK_SIZE}, {rounds} rounds")
    print(f"{'d':>5} {'rows':>5} {'frozen ms':>9} | {'ours/frozen':>11} {'neumann/frozen':>14} {'peft/frozen':>11} "
          f"| {'ours/peft':>9} {'neumann/peft':>12} | limit")
    for d in DIMS:
        for tokens in TOKENS:
            r = bench_shape(d, tokens, rounds)
            results.append(r)
            print(f"{d:>5} {r['rows']:>5} {r['frozen_ms']:>9.2f} | {r['orthodiff_vs_frozen']:>11.3f} "
                  f"{r['orthodiff_neumann_vs_frozen']:>14.3f} {r['peft_vs_frozen']:>11.3f} | "
                  f"{r['orthodiff_vs_peft']:>9.3f} {r['orthodiff_neumann_vs_peft']:>12.3f} | {r['arithmetic_limit']:.3f}", flush=True)
    geo = lambda key: math.exp(statistics.mean(math.log(r[key]) for r in results))  # noqa: E731
    summary = {k: geo(k) for k in ("orthodiff_vs_frozen", "orthodiff_neumann_vs_frozen", "peft_vs_frozen",
                                   "peft_neumann_vs_frozen", "orthodiff_vs_peft", "orthodiff_neumann_vs_peft")}
    print("geometric means, all shapes:", json.dumps({k: round(v, 3) for k, v in summary.items()}))
    # The shapes a real SD 1.5 UNet sees: 320 channels at 64x64 latents, 640 at 32x32, 1280 at 16x16.
    diagonal = [r for r in results if (r["d"], r["rows"]) in {(320, 8192), (640, 2048), (1280, 512)}]
    sd_summary = {k: math.exp(statistics.mean(math.log(r[k]) for r in diagonal)) for k in summary}
    print("geometric means, SD 1.5 shapes:", json.dumps({k: round(v, 3) for k, v in sd_summary.items()}))
    merge = bench_merge(args.quick)
    print("merge:", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in merge.items()}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shapes": results, "geometric_mean": summary, "geometric_mean_sd15_shapes": sd_summary, "merge": merge,
                                    "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
