"""reproduce.py: the table list, the params table, the cell cache, the controllable table's
cells and every control's headline metric; every run-based table on a 2-step schedule
over the fixture dataset (slow: about a dozen train.py runs)."""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orthodiff.eval.control_metrics import CONTROL_CONFIGS, headline_metric

ROOT = Path(__file__).resolve().parents[1]


def reproduce(*overrides: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "reproduce.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def quoted(overrides: list[str]) -> str:
    """A list of overrides as one Hydra list value (elements quoted: they contain '=')."""
    return ",".join(f"'{o}'" for o in overrides)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def subject_fixture(tmp_path) -> list[str]:
    """Subject cells on a two-step schedule with few evaluation samples."""
    return ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.samples_per_prompt=2",
            "data.no_token_prompts=4", "model.val_steps=2", "module.num_class_images=2",
            f"module.prior_cache_dir={tmp_path / 'class'}", f"data.root={tmp_path / 'subjects'}"]


def test_unknown_table_lists_the_valid_ones(tmp_path):
    result = reproduce("table=bogus", f"out_dir={tmp_path}")
    assert result.returncode != 0
    assert "params, controllable, convergence, energy, ablation_r, subject, edit, all" in result.stderr
    result = reproduce("table=params", "jobs=0", f"out_dir={tmp_path}")
    assert result.returncode != 0 and "jobs=0" in result.stderr


def test_params_table_is_stamped_and_matches_the_references(tmp_path):
    result = reproduce("table=params", f"out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["name"]: int(row["parameters"]) for row in read_csv(tmp_path / "params.csv")}
    assert round(rows["controlnet"] / 1e6, 2) == 361.28 and rows["oft_r4"] == 13_144_928
    report = (tmp_path / "params.md").read_text()
    assert "python reproduce.py table=params" in report and "git revision" in report


@pytest.mark.slow
def test_all_tables_on_a_two_step_schedule(shapes_root, tmp_path):
    fixture = [f"data.train.root={shapes_root}", "model.val_steps=2", "data.val_batch_size=4"]
    result = reproduce(
        "table=all", f"out_dir={tmp_path / 'reports'}", f"runs_dir={tmp_path / 'runs'}",
        "methods=[coft,lora,full,controlnet]", "controls=[canny,seg]", "seeds=[0,1]",
        "schedule.steps=2", "schedule.val_every=1", "schedule.val_items=4", "schedule.batch_size=4",
        "eval_samples=4", f"train_overrides=[{quoted(fixture)}]",
        f"eval_overrides=[{quoted([f'data.train.root={shapes_root}', 'steps=2', 'batch_size=4'])}]",
        "ablation.num_blocks=[2,4]",
        "ablation.control=canny", "subject.methods=[coft,textual_inversion,perfusion]", "subject.subjects=[badge_circle]",
        f"subject.train_overrides=[{quoted(subject_fixture(tmp_path))}]",
        "edit.steps=3", "edit.seeds=2", "edit.learn_seeds=1", "edit.real_images=1", "edit.iterations=1",
        "edit.null_iterations=1")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = tmp_path / "reports"
    assert (reports / "edit.md").is_file() and (reports / "edit.csv").is_file()
    controllable = {row["method"]: row for row in read_csv(reports / "controllable.csv")}
    assert set(controllable) == {"coft", "lora", "full", "controlnet"}
    assert "±" in controllable["coft"]["canny canny_iou"]  # two seeds on canny
    for row in controllable.values():  # every control's column holds its metric (a wrong key gives n/a)
        assert "n/a" not in (row["canny canny_iou"], row["seg seg_miou"]), row
    trainable = {m: int(row["trainable params"]) for m, row in controllable.items()}
    # At the tiny model's widths (64, 96) LoRA rank 4 is slightly larger than OFT r=4.
    assert max(trainable["lora"], trainable["coft"]) < trainable["full"] < trainable["controlnet"]

    steps = [int(row["step"]) for row in read_csv(reports / "convergence.csv") if row["method"] == "coft"]
    assert steps == [0, 1, 2] and (reports / "convergence.png").is_file()

    energy = {row["method"]: row for row in read_csv(reports / "energy.csv")}
    assert float(energy["coft"]["max |ΔHE|/HE"]) < 1e-6  # rotations keep every angle (float error)
    for method in ("lora", "full", "controlnet"):
        assert float(energy[method]["mean |ΔHE|/HE"]) > 1e-6, energy[method]

    ablation = read_csv(reports / "ablation_r.csv")
    assert [int(row["r"]) for row in ablation] == [2, 4]
    assert all(0 <= float(row["canny_iou"]) <= 1 for row in ablation)
    assert int(ablation[0]["trainable params (this model)"]) > int(ablation[1]["trainable params (this model)"])
    assert "python reproduce.py table=all" in (reports / "controllable.md").read_text()

    subject = {row["method"]: row for row in read_csv(reports / "subject.csv")}
    assert set(subject) == {"base model (step 0 of coft)", "coft", "textual_inversion", "perfusion", "ideal images",
                            "ideal images through the VAE"}
    assert subject["perfusion"]["no_token_kind change, every prompt edited"] not in ("", "n/a")
    assert float(subject["textual_inversion"]["seconds per subject"]) > 0
    # The rendered ideal answers are the subject: far above the base model's samples.
    ideal = float(subject["ideal images"]["subject_fidelity"])
    assert ideal > float(subject["base model (step 0 of coft)"]["subject_fidelity"]) + 0.2
    assert int(float(subject["textual_inversion"]["trainable params"])) == 64  # the tiny text width
    assert (reports / "subject_samples_badge_circle.png").is_file()

    # A later table with the same settings reuses the finished cells: no train.py launch rewrites them.
    cells = [tmp_path / "runs" / f"canny-{method}-s0" / "metrics.json"
             for method in ("coft", "lora", "full", "controlnet")]
    trained = {cell: cell.stat().st_mtime_ns for cell in cells}
    again = reproduce("table=energy", f"out_dir={tmp_path / 'reports'}", f"runs_dir={tmp_path / 'runs'}",
                      "methods=[coft,lora,full,controlnet]", "controls=[canny,seg]", "seeds=[0,1]",
                      "schedule.steps=2", "schedule.val_every=1", "schedule.val_items=4", "schedule.batch_size=4",
                      f"train_overrides=[{quoted(fixture)}]", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {cell: cell.stat().st_mtime_ns for cell in cells} == trained
    assert again.stdout.count(": reused ") == len(cells) and ": training in " not in again.stdout, again.stdout



def fake_train(launches: list):
    """Stands in for subprocess.run of train.py: records the launch and writes the
    metrics.json a finished run leaves in its hydra.run.dir."""
    def run(command, **kwargs):
        launches.append(command)
        run_dir = Path(command[-1].split("=", 1)[1])
        (run_dir / "metrics.json").write_text(json.dumps({"final": {"canny_iou": 0.5}, "run": len(launches)}))
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")
    return run


def test_a_finished_cell_is_reused_until_its_overrides_or_base_weights_change(tmp_path, monkeypatch, caplog):
    from orthodiff.reproduce import cells

    launches = []
    monkeypatch.setattr(cells.subprocess, "run", fake_train(launches))
    cfg = OmegaConf.create({"runs_dir": str(tmp_path), "jobs": 1})
    with caplog.at_level(logging.INFO, logger=cells.__name__):
        first = cells.train_cell(cfg, "cell", ["method=coft"])
        again = cells.train_cell(cfg, "cell", ["method=coft"])
    assert len(launches) == 1 and again == first and first["final"] == {"canny_iou": 0.5}
    assert [r.getMessage().split(":")[1].split()[0] for r in caplog.records] == ["training", "reused"]
    cells.train_cell(cfg, "cell", ["method=lora"])  # other overrides: retrained
    assert len(launches) == 2
    monkeypatch.setattr(cells, "embedded_model_digest", lambda: "re-pretrained")
    cells.train_cell(cfg, "cell", ["method=lora"])  # other base weights: retrained
    assert len(launches) == 3
    (tmp_path / "cell" / "metrics.json").write_text(json.dumps({"step0": {}}))  # a run that died before "final"
    assert cells.train_cell(cfg, "cell", ["method=lora"])["run"] == 4


def test_controllable_runs_every_seed_on_the_first_control(tmp_path, monkeypatch):
    from orthodiff.reproduce import controllable

    def run_all(cfg, cells, desc):
        return [{"final": {"seg_miou": 0.1 * seed, "canny_iou": 0.3}, "run_dir": f"{c}-{m}-s{seed}",
                 "cost": {"trainable_parameters": 10, "seconds_per_step": 1.0, "peak_memory_mb": 5}}
                for m, c, seed in cells]

    monkeypatch.setattr(controllable, "run_all", run_all)
    quality = {"image_quality": {"fid": 1.0, "fid_extractor": "x"}}
    monkeypatch.setattr(controllable, "run_eval", lambda cfg, run: quality)
    cfg = OmegaConf.create({"out_dir": str(tmp_path), "jobs": 1, "methods": ["coft"], "controls": ["seg", "canny"],
                            "seeds": [0, 1], "eval_samples": 4, "train_overrides": [],
                            "schedule": {"steps": 2, "val_every": 1, "val_items": 4, "batch_size": 4}})
    controllable.table(cfg)
    [row] = read_csv(tmp_path / "controllable.csv")
    assert row["seg seg_miou"] == "0.0500 ± 0.0707" and row["canny canny_iou"] == "0.3000"
    assert row["FID (seg, x features)"] == "1.0"
    assert "seeds [0, 1] for seg, seed 0 for the others" in (tmp_path / "controllable.md").read_text()


@pytest.mark.parametrize("control", sorted(p.stem for p in CONTROL_CONFIGS.glob("*.yaml")))
def test_each_controls_headline_metric_is_a_figure_its_scorer_computes(shapes_root, control):
    from orthodiff.data.datasets import ShapesDataset, collate
    from orthodiff.eval.control_metrics import ControlScorer

    data = ShapesDataset(shapes_root, "val", control, max_items=4)
    batch = collate([data[i] for i in range(len(data))])
    scorer = ControlScorer(control, num_classes=getattr(data, "num_classes", None))
    scorer.update((batch["pixel_values"] + 1) / 2, batch)
    assert headline_metric(control) in scorer.compute()
