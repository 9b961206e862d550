"""plan.py's figures against a measured training step, for each control method.

    python benchmarks/bench_plan.py                        # CPU: SD 1.5's architecture at 128 px, batch 1
    python benchmarks/bench_plan.py --device cuda --resolution 512 --batch 4 --precision bf16-mixed  # gpu.sh

For each method: the planned peak (orthodiff.app.plan.plan, shapes only) and the measured peak
of one steady-state training step of the real task (orthodiff.app.plan.measured_peak: on CUDA
torch.cuda.max_memory_allocated; on CPU the profiler's allocation records), on model=sd15_random
(SD 1.5's UNet and VAE at random init, built once under ~/.cache/orthodiff), and their ratio.
"""

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from orthodiff.app.plan import measured_peak, plan

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--methods", nargs="+", default=["oft", "coft", "lora", "controlnet", "t2i_adapter"])
    parser.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_plan.json")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        overrides = ["experiment=canny_sd15", "model=sd15_random", f"method={method}", f"model.resolution={args.resolution}",
                     f"data.batch_size={args.batch}", f"trainer.precision={args.precision}",
                     f"model.gradient_checkpointing={args.checkpointing}"]
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("train", overrides=overrides)
        planned, measured = plan(cfg).peak_gb, measured_peak(cfg, args.device) / GB
        rows.append({"method": method, "planned_gb": round(planned, 3), "measured_gb": round(measured, 3),
                     "planned_over_measured": round(planned / measured, 3)})
        print(f"{method:<20} planned {planned:7.2f} GB  measured {measured:7.2f} GB  ratio {planned / measured:.3f}")
    report = {"command": " ".join(["python benchmarks/bench_plan.py", *sys.argv[1:]]), "device": args.device,
              "resolution": args.resolution, "batch": args.batch, "precision": args.precision,
              "gradient_checkpointing": args.checkpointing, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
