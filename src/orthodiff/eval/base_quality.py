"""The floors tiny SD v3 was held to (docs/miniature.md, "Quality"), checked on a report of
scripts/evaluate_tiny_sd.py: which of them another base model meets (the width ladder's rungs).
The shapes-FID floor holds at the script's default n = 200 samples only (FID falls with n)."""

from __future__ import annotations

SHORT_PROMPTS = "short prompts ('a red circle')"

# (what, the keys leading to it in the report, ">=" or "<=", the floor)
V3_FLOORS = (
    ("Canny IoU, real scene vs its VAE reconstruction", ("vae (val)", "canny_iou_real_vs_reconstruction"), ">=", 0.70),
    ("pixels >= 2 px from any edge off by > 48 levels", ("vae (val)", "off_edge_pixels_off_by_more_than_48"), "<=",
     5e-4),
    ("prompted shape kind recognized", ("samples", "prompted_kinds_recognized"), ">=", 0.93),
    ("prompted (colour, kind) recognized", ("samples", "prompted_pairs_recognized"), ">=", 0.90),
    ("shape count recognized", ("samples", "count_recognized"), ">=", 0.85),
    ("shapes-FID at n = 200", ("shapes_fid_samples_vs_real",), "<=", 7.0),
    ("short prompts: kind recognized", (SHORT_PROMPTS, "prompted_kinds_recognized"), ">=", 0.85),
)


def floors(report: dict) -> list[dict]:
    """Each of V3_FLOORS: {"floor", "value", "met"} (value and met None where the report lacks it,
    e.g. the sample rows of a --vae-only report)."""
    rows = []
    for what, keys, op, floor in V3_FLOORS:
        value = report
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        met = None if value is None else bool(value >= floor if op == ">=" else value <= floor)
        rows.append({"floor": f"{what} {op} {floor:g}", "value": value, "met": met})
    return rows
