#!/usr/bin/env bash
# The speed and memory benchmarks on one CUDA GPU, SD 1.5's architecture (random init, no download),
# 64x64 latents (512 px), batch 4, bf16; about ten minutes on an H100. Writes reports/gpu.json.
#   bash benchmarks/gpu.sh
#   DEVICE=cpu SIZE="8 1" RES=64 BASE=assets/tiny-sd bash benchmarks/gpu.sh   # a smoke run of the same code on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-"64 4"}       # latent side, batch
RES=${RES:-512}            # the planner's resolution (pixels) and batch: the same run
BASE=${BASE:-~/.cache/orthodiff/models/sd15-random}  # the inference benchmark's pipeline (built on first use)
OUT=${OUT:-reports}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
read -r LATENT BATCH <<< "$SIZE"

# 1. a training step, x the frozen UNet: orthodiff OFT, its Neumann variant, PEFT OFT, PEFT LoRA
python benchmarks/bench_unet_step.py --device "$DEVICE" --dtype bfloat16 --size $SIZE --rounds 5 --out "$TMP/step.json"
# 2. inference with an adapter, x the base UNet (unmerged, merged, exported)
python benchmarks/bench_inference.py --base "$BASE" --device "$DEVICE" \
    --dtype bfloat16 --latent "$LATENT" --quick --out "$TMP/inference.json"
# 4. the planner against a measured training step, with and without gradient checkpointing
python benchmarks/bench_plan.py --device "$DEVICE" --resolution "$RES" --batch "$BATCH" \
    --precision bf16-mixed --methods oft lora controlnet --out "$TMP/plan.json"
python benchmarks/bench_plan.py --device "$DEVICE" --resolution "$RES" --batch "$BATCH" \
    --precision bf16-mixed --methods oft lora controlnet --checkpointing --out "$TMP/plan_checkpointing.json"

python - "$TMP" "$OUT/gpu.json" <<'PY'
import json, sys
from pathlib import Path
import torch
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
          **{name: json.loads((tmp / f"{name}.json").read_text())
             for name in ("step", "inference", "plan", "plan_checkpointing")}}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out}")
PY
