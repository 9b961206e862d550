"""v3's floors (orthodiff.eval.base_quality) read from scripts/evaluate_tiny_sd.py's committed
reports: the shipped v3 meets every one (docs/miniature.md), v2 meets none of them."""

import json

from orthodiff.eval.base_quality import V3_FLOORS, floors
from orthodiff.warm import ROOT


def report(name: str) -> dict:
    return json.loads((ROOT / "reports" / name).read_text())


def test_v3_meets_every_floor_and_v2_none():
    v3, v2 = floors(report("tiny_sd_quality.json")), floors(report("tiny_sd_v2_quality.json"))
    assert [row["met"] for row in v3] == [True] * len(V3_FLOORS)
    assert [row["met"] for row in v2] == [False] * len(V3_FLOORS)  # e.g. short prompts' kind 0.845 < 0.85
    assert v3[0]["floor"] == "Canny IoU, real scene vs its VAE reconstruction >= 0.7" and v3[0]["value"] > 0.73


def test_a_report_without_sample_rows_is_not_measured_rather_than_missed():
    vae_only = floors({"vae (val)": {"canny_iou_real_vs_reconstruction": 0.69, "off_edge_pixels_off_by_more_than_48": 0.0}})
    assert [row["met"] for row in vae_only] == [False, True, None, None, None, None, None]
