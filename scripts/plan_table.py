"""The planner's table for the paper's control setting: every control method, with and without
gradient checkpointing (`python scripts/plan_table.py` -> reports/plan.{md,json}).

    python scripts/plan_table.py [--experiment canny_sd15] [--out reports/plan]

Each row is `python plan.py experiment=<experiment> method=<method> [model.gradient_checkpointing=true]`
(orthodiff.app.plan): shapes only, no download, seconds per row.
"""

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from orthodiff.app.plan import CARDS_GB, plan

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("coft", "oft", "lora", "full", "hint", "controlnet", "t2i_adapter", "t2i_adapter_light")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="canny_sd15")
    parser.add_argument("--out", default="reports/plan")
    args = parser.parse_args()
    rows = []
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        for method in METHODS:
            for checkpointing in (False, True):
                cfg = compose("train", overrides=[f"experiment={args.experiment}", f"method={method}",
                                                  f"model.gradient_checkpointing={checkpointing}"])
                found = plan(cfg)
                rows.append({"method": method, "checkpointing": checkpointing,
                             "trainable (M)": round((found.parameters["UNet adapter parameters"]
                                                     + found.parameters["control network parameters"]) / 1e6, 2),
                             **{f"{name} (GB)": round(gb, 2) for name, gb in found.rows.items()},
                             "peak (GB)": round(found.peak_gb, 2),
                             **{f"{card} GB": "fits" if found.fits(card) else "no" for card in CARDS_GB}})
                print(rows[-1], flush=True)
    setting = (f"experiment={args.experiment}: {cfg.model.resolution} px, batch {cfg.data.batch_size}, "
               f"trainer.precision={cfg.trainer.precision}")
    out = ROOT / args.out
    out.with_suffix(".json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2) + "\n")
    columns = ["method", "checkpointing", "trainable (M)", "activations (GB)", "peak (GB)", *(f"{c} GB" for c in CARDS_GB)]
    lines = [f"# Memory plan: {setting}", "", f"- command: `python scripts/plan_table.py --experiment {args.experiment}`",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
             *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows), "",
             "Shapes only (orthodiff.app.plan: the meta device, fused attention); a card fits when 1.1 x peak + 1 GB "
             "is at most its memory. Full rows in plan.json."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
