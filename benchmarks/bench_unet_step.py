"""A UNet training step with each adapter, as ratios to the frozen UNet's, in one process.

    python benchmarks/bench_unet_step.py            # SD 1.5's UNet architecture, random init
    python benchmarks/bench_unet_step.py --quick    # the shipped tiny SD's UNet, 3 rounds
    python benchmarks/bench_unet_step.py --device cuda --dtype bfloat16 --size 64 4   # a GPU (benchmarks/gpu.sh)

Times forward + backward of one UNet call (noisy latents that require grad, as inside a
model whose earlier layers are adapted, so the frozen UNet's backward computes the input
gradient) for: the frozen UNet; orthodiff OFT r = 4 with the exact Cayley transform (the
default) and with Cayley-Neumann (5 terms; its orthogonality error printed); PEFT's OFT
r = 4 (exact Cayley); PEFT's LoRA r = 4. All adapt the same layers (to_q, to_k, to_v,
to_out.0, ff.net.0.proj) of one shared set of frozen weights. Variants run interleaved
round by round so machine noise hits all alike; a ratio is the median over rounds of
(variant time / frozen time).

The arithmetic limit of a variant is its step's FLOPs over the frozen step's: matrix
products and convolutions counted by torch's FlopCounterMode, plus OFT's Cayley solves,
which it does not count (per b x b block: LU 2/3 b^3 and the solve 2 b^3 forward, the
solve's backward 2 b^3 + 2 b^3). Where OFT's limit exceeds LoRA's measured ratio, no
implementation of exact OFT r = 4 reaches LoRA's step at that size.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from orthodiff.oft import OFTConfig, inject_oft, oft_layers
from orthodiff.oft.layer import DEFAULT_TARGETS

ROOT = Path(__file__).resolve().parents[1]
RANK = 4
# (label, latent side, batch): the two sizes, and the shipped tiny UNet's training batch.
SD15_SIZES = (("32x32 latents, batch 2", 32, 2), ("16x16 latents, batch 1", 16, 1))
TINY_SIZES = (("16x16 latents, batch 8", 16, 8),)


def frozen_unet(quick: bool, device: str, dtype: torch.dtype) -> UNet2DConditionModel:
    if quick:
        unet = UNet2DConditionModel.from_pretrained(ROOT / "assets" / "tiny-sd" / "unet")
        return unet.to(device, dtype).requires_grad_(False)
    config = json.loads((ROOT / "conf" / "model" / "sd15_unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device=device)  # random values: only the shapes matter for time
    with torch.no_grad():
        for tensor in unet.state_dict().values():
            tensor.normal_(0, 0.02)
    return unet.to(dtype).requires_grad_(False)


def sharing_copy(unet):
    """A new module tree over the same frozen tensors: one set of weights for every variant."""
    return copy.deepcopy(unet, memo={id(t): t for t in [*unet.parameters(), *unet.buffers()]})


def variants(unet) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft import OFTConfig as PeftOFTConfig

    targets = list(DEFAULT_TARGETS)
    built = {"frozen": unet}
    for name, config in (("orthodiff OFT", OFTConfig(num_blocks=RANK, targets=targets)),
                         ("orthodiff OFT neumann", OFTConfig(num_blocks=RANK, cayley="neumann", targets=targets))):
        model = sharing_copy(unet)
        inject_oft(model, config)
        model.to(unet.device)  # the generators (float32, made on the CPU) beside the weights
        with torch.no_grad():  # away from the identity, as after training (speed does not depend on it)
            for layer in oft_layers(model):
                layer.oft_generator.normal_(0, 1e-3)
        built[name] = model
    # PEFT's default is Cayley-Neumann; the exact transform is the like-for-like comparison.
    built["PEFT OFT"] = get_peft_model(sharing_copy(unet), PeftOFTConfig(r=RANK, oft_block_size=0, use_cayley_neumann=False,
                                                                         target_modules=targets))
    built["PEFT LoRA"] = get_peft_model(sharing_copy(unet), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets))
    return built


def inputs(unet, side: int, batch: int) -> tuple:
    torch.manual_seed(0)
    like = dict(device=unet.device, dtype=unet.dtype)
    latents = torch.randn(batch, unet.config.in_channels, side, side, **like).requires_grad_()
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, **like)
    return latents, torch.full((batch,), 500, device=unet.device), context


def step(model, latents, timesteps, context) -> None:
    out = model(latents, timesteps, encoder_hidden_states=context).sample
    out.backward(torch.ones_like(out))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(model, *args) -> float:
    synchronize(args[0].device)
    start = time.perf_counter()
    step(model, *args)
    synchronize(args[0].device)
    return time.perf_counter() - start


def solve_flops(model) -> int:
    """The exact Cayley solves' FLOPs in one step (FlopCounterMode does not count linalg.solve)."""
    return sum(layer.num_blocks * (2 / 3 + 2 + 4) * layer.block_size**3 for layer in oft_layers(model)
               if layer.neumann_terms is None)


def step_flops(model, args) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(model, *args)
    return counter.get_total_flops() + solve_flops(model)


def orthogonality_error(model) -> float:
    worst = 0.0
    for layer in oft_layers(model):
        with torch.no_grad():
            rotation = layer.rotation()
        eye = torch.eye(rotation.shape[-1], device=rotation.device)
        worst = max(worst, (rotation.mT @ rotation - eye).abs().max().item())
    return worst


def bench_size(built: dict, label: str, side: int, batch: int, rounds: int) -> dict:
    args = inputs(built["frozen"], side, batch)
    for model in built.values():  # warm-up
        step(model, *args)
    flops = {name: step_flops(model, args) for name, model in built.items()}
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, model in built.items():
            times[name].append(timed_step(model, *args))
    frozen = times["frozen"]
    ratios = {name: statistics.median(t / f for t, f in zip(times[name], frozen)) for name in built if name != "frozen"}
    limits = {name: flops[name] / flops["frozen"] for name in ratios}
    return {"size": label, "latent": side, "batch": batch, "rounds": rounds,
            "frozen_seconds": statistics.median(frozen), "vs_frozen": ratios, "arithmetic_limit": limits,
            "oft_vs_lora": ratios["orthodiff OFT"] / ratios["PEFT LoRA"],
            "oft_vs_its_limit": ratios["orthodiff OFT"] / limits["orthodiff OFT"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny SD UNet, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--size", type=int, nargs=2, metavar=("LATENT_SIDE", "BATCH"), default=None,
                        help="one size instead of the default ones")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_unet_step.json")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    unet = frozen_unet(args.quick, args.device, getattr(torch, args.dtype))
    sizes = TINY_SIZES if args.quick else SD15_SIZES
    if args.size:
        side, batch = args.size
        sizes = ((f"{side}x{side} latents, batch {batch}", side, batch),)
    built = variants(unet)
    neumann_error = orthogonality_error(built["orthodiff OFT neumann"])
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, {rounds} rounds, "
          f"{'tiny SD' if args.quick else 'SD 1.5 architecture'} UNet, r = {RANK}; "
          f"Cayley-Neumann's largest |R^T R - I| entry: {neumann_error:.1e}")
    results = []
    for label, side, batch in sizes:
        result = bench_size(built, label, side, batch, rounds)
        results.append(result)
        print(f"\n{label}: frozen step {result['frozen_seconds']:.3f} s")
        print(f"  {'variant':<22} {'x frozen':>8} {'limit':>6}")
        for name, ratio in result["vs_frozen"].items():
            print(f"  {name:<22} {ratio:>8.3f} {result['arithmetic_limit'][name]:>6.3f}")
        print(f"  orthodiff OFT / PEFT LoRA {result['oft_vs_lora']:.3f}; / its own limit {result['oft_vs_its_limit']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python benchmarks/bench_unet_step.py", *sys.argv[1:]]),
                                    "unet": "tiny SD" if args.quick else "SD 1.5 architecture (random init)",
                                    "device": str(unet.device), "dtype": args.dtype,
                                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "neumann_orthogonality_error": neumann_error, "sizes": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
