"""reproduce.py: the table list, the params table, the cell cache (diverged runs included, killed runs resumed),
the cells' schedules, the controllable table's cells and reference rows, the convergence
levels, the lr search's choice, the ablation rows, the claims' verdict rule, the control
network's lr scale, every control's headline metric; every run-based table on a 2-step
schedule over the fixture dataset (slow: about two dozen train.py runs)."""

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orthodiff.data.control import CONTROL_CHANNELS
from orthodiff.eval.control_metrics import CONTROL_CONFIGS, headline_metric
from orthodiff.models.tiny_sd import TINY_SD_PATH
from orthodiff.reproduce.stats import VERDICTS
from orthodiff.warm import run_script

ROOT = Path(__file__).resolve().parents[1]


def reproduce(*overrides: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return run_script("reproduce.py", overrides, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


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


@pytest.mark.slow
def test_unknown_table_lists_the_valid_ones(tmp_path):
    # A copy of the tree whose `import orthodiff` finds this checkout (a frozen worktree beside an
    # editable install): refused, since its cells would train this checkout's code.
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "conf", clone / "conf")
    shutil.copy(ROOT / "reproduce.py", clone)
    with ThreadPoolExecutor(3) as pool:  # the start-ups at once
        bogus, no_jobs, other_tree = pool.map(
            lambda args: run_script(args[0], [*args[1:], f"out_dir={tmp_path}"], env={**os.environ, "OMP_NUM_THREADS": "1"}),
            [["reproduce.py", "table=bogus"], ["reproduce.py", "table=params", "jobs=0"],
             [clone / "reproduce.py", "table=params"]])
    assert bogus.returncode != 0
    assert ("params, lr_search, controllable, convergence, energy, ablation, radius, frontier, length, width, "
            "subject_lr_search, subject, encoder_search, edit, multi, claims, all") in bogus.stderr
    assert no_jobs.returncode != 0 and "jobs=0" in no_jobs.stderr
    assert other_tree.returncode != 0 and f"PYTHONPATH={clone.resolve() / 'src'}" in other_tree.stderr
    assert not (tmp_path / "params.md").exists()


@pytest.mark.slow
def test_params_table_is_stamped_and_matches_the_references(tmp_path):
    result = reproduce("table=params", f"out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["name"]: int(row["parameters"]) for row in read_csv(tmp_path / "params.csv")}
    assert round(rows["controlnet"] / 1e6, 2) == 361.28 and rows["oft_r4"] == 13_144_928
    report = (tmp_path / "params.md").read_text()
    assert "python reproduce.py table=params" in report and "git revision" in report


def assert_multi_table(reports):
    """table=multi on the two-step cells: coft and controlnet, canny + seg, two seeds, 2 scenes."""
    rows = {row["arm"]: row for row in read_csv(reports / "multi.csv")}
    assert {"base model", "coft canny alone", "coft seg alone", "coft composed", "coft composed (mean)", "coft joint",
            "coft joint canny alone", "controlnet composed", "controlnet joint"} <= set(rows)
    assert "±" in rows["coft composed"]["canny_iou"] and "±" in rows["coft composed"]["seg retention"]
    assert rows["coft canny alone"]["canny retention"] == ""  # only the arms given both conditions
    report = (reports / "multi.md").read_text()
    verdicts = [line.split(" | ")[-1].rstrip(" |") for line in report.splitlines() if line.startswith("| composed vs")
                or line.startswith("| vs Multi-ControlNet")]
    # composed vs alone, vs joint, vs base: coft's two compositions and controlnet's one, on two metrics (18);
    # vs Multi-ControlNet: coft's two (4)
    assert len(verdicts) == 3 * 3 * 2 + 2 * 2 and set(verdicts) <= set(VERDICTS)
    conflicts = [line for line in report.splitlines()
                 if line.startswith("| canny + seg | ") and line.split(" | ")[2] in ("composed", "joint")]
    assert len(conflicts) == 2 * (2 + 1) and all(line.split(" | ")[-1].rstrip(" |") in ("canny", "seg", "n/a")
                                                 for line in conflicts)
    assert (reports / "multi_samples_canny_seg.png").is_file() and (reports / "multi_conflicts_canny_seg.png").is_file()


@pytest.mark.slow
def test_all_tables_on_a_two_step_schedule(shapes_root, tmp_path):
    fixture = [f"data.train.root={shapes_root}", "model.val_steps=2", "data.val_batch_size=4"]
    methods = ("coft", "lora", "controlnet")
    encoder_fixture = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.num_val=4", "model.val_steps=2"]
    schedule = ["methods=[coft,lora,controlnet]", "controls=[canny,seg]", "seeds=[0,1]", "schedule.steps=2",
                "schedule.val_every=1", "schedule.other_steps=2", "schedule.val_items=4", "schedule.batch_size=4",
                f"train_overrides=[{quoted(fixture)}]"]
    result = reproduce(
        "table=all", f"out_dir={tmp_path / 'reports'}", f"runs_dir={tmp_path / 'runs'}", *schedule,
        "eval_samples=4", f"eval_overrides=[{quoted([f'data.train.root={shapes_root}', 'steps=2', 'batch_size=4'])}]",
        "lr_search.methods=[coft]", "lr_search.lrs=[1e-4,1e-3,1e-2]", "lr_search.steps=2",
        "ablation.method=coft", "ablation.num_blocks=[2]", "ablation.hint_lrs=[0.03]", "ablation.three_seeds=[r2]",
        # the new tables on as few new cells as they can: the rest are the cells above
        "radius.eps=[1e-3]", "radius.references=[hint]", "frontier.oft_blocks=[4]", "frontier.lora_ranks=[4]",
        "frontier.others=[coft_matched,hint]", "frontier.against=[lora_r4,hint]", "length.methods=[coft,lora]",
        "length.steps=3", "length.val_every=1", "length.at=[1,3]", "length.pairs=[[coft,lora]]",
        # the width ladder's rungs as the tiny model under another name (the real ones take hours to pretrain)
        "width.models=[[1,tiny],[2,tiny]]", "width.methods=[coft,lora_matched]", "width.pairs=[[coft,lora_matched]]",
        "subject.methods=[coft,textual_inversion,perfusion]", "subject.subjects=[badge_circle]", "subject.seeds=[0,1]",
        f"subject.train_overrides=[{quoted(subject_fixture(tmp_path))}]", "subject.lr_search_methods=[textual_inversion]",
        "subject.lrs=[1e-3,1e-2]", "claims.subject_baselines=[textual_inversion]",
        "~encoder_search.variants", "+encoder_search.variants={shipped: [], lr: ['module.optimizer.lr=0.003']}",
        f"encoder_search.pretrain_overrides=[{quoted(encoder_fixture)}]",
        "encoder_search.tune_steps=[0,1]",
        "edit.steps=3", "edit.seeds=2", "edit.learn_seeds=1", "edit.real_images=1", "edit.iterations=1",
        "edit.null_iterations=1", "edit.cap=1", "edit.pair_seeds=1", "edit.pairs=[]",
        "multi.methods=[coft,controlnet]", "multi.pairs=[[canny,seg]]", "multi.mean_methods=[coft]", "multi.scenes=2",
        "multi.steps=2", "multi.batch_size=2", "multi.conflict_scales=[[1.0,0.0],[1.0,1.0]]")
    assert result.returncode == 0, result.stderr[-3000:]
    reports, runs = tmp_path / "reports", tmp_path / "runs"
    assert (reports / "edit.md").is_file() and (reports / "edit.csv").is_file()
    assert_multi_table(reports)
    width = {(row["method"], row["width"]): row for row in read_csv(reports / "width.csv")}
    assert set(width) == {(m, w) for m in ("coft", "lora_matched") for w in ("1.0", "2.0")}
    assert "±" not in width["coft", "2.0"]["canny_iou [95 % CI]"] and "[" in width["coft", "2.0"]["canny_iou [95 % CI]"]
    # the lr grid's neighbours of COFT's tiny_control_lr (1e-3)
    assert width["coft", "2.0"]["lr check (seed 0)"].startswith("0.0001: ") and "; 0.01: " in width["coft", "2.0"]["lr check (seed 0)"]
    assert (runs / "canny-lora-rank3-w2-s1").is_dir() and (reports / "width.png").is_file()
    assert len(read_csv(reports / "width_comparisons.csv")) == 2 and "extrapolat" in (reports / "width.md").read_text()
    assert (runs / "canny_seg-coft-s1").is_dir()  # the joint cells, named as table=controllable's
    assert "reproduce all: " in result.stdout + result.stderr  # table=all's wall time is logged

    controllable = {row["method"]: row for row in read_csv(reports / "controllable.csv")}
    base, real, vae = "base model (step 0 of coft)", "real images", "real images through the VAE"
    assert set(controllable) == {*methods, base, real, vae}
    for row in controllable.values():  # two seeds on every control; every column holds its metric
        for column in ("canny canny_iou", "seg seg_miou"):
            assert "n/a" not in row[column], row
            assert ("±" in row[column]) == (row["method"] not in (real, vae)), row
    trainable = {m: int(controllable[m]["trainable params"]) for m in methods}
    assert trainable["lora"] < trainable["controlnet"]
    # The references, scored like the cells: real edges are the source's own (IoU 1); the VAE's
    # round trip loses some, and keeps more than the base model draws without control.
    assert float(controllable[real]["canny canny_iou"]) == 1.0
    base_iou = float(controllable[base]["canny canny_iou"].split(" ± ")[0])
    assert base_iou < float(controllable[vae]["canny canny_iou"]) < 1.0
    assert float(controllable[real]["seg seg_miou"]) >= float(controllable[vae]["seg seg_miou"])
    # Step 0 is exactly the base model for every method with an identity adapter and a zero-initialised
    # control network: the same figure from coft, lora and controlnet at the same seed.
    step0 = {m: json.loads((runs / f"canny-{m}-s0" / "metrics.json").read_text())["step0"] for m in methods}
    assert step0["coft"] == step0["lora"] == step0["controlnet"]
    assert "coft: eps 0.001 in the paper convention" in (reports / "controllable.md").read_text()  # from the cell's config
    assert "step0" in json.loads((runs / "seg-coft-s1" / "metrics.json").read_text())  # the base row on seg

    convergence = {row["method"]: row for row in read_csv(reports / "convergence.csv")}
    assert set(convergence) == set(methods)
    for row in convergence.values():
        for level in ("50%", "80%"):
            steps, images = row[f"steps to {level}"], row[f"images to {level}"]
            assert steps.startswith(("n/a", "not within")) or steps.split()[0].isdigit(), row
            if steps.split()[0].isdigit():  # images seen = steps x batch (both means rounded to integers)
                assert abs(float(images.split()[0]) - 4 * float(steps.split()[0])) <= 2.5, row
    steps = [int(row["step"]) for row in read_csv(reports / "convergence_curves.csv") if row["method"] == "coft"]
    assert steps == [0, 1, 2] and (reports / "convergence.png").is_file()

    radius = {row["row"]: row for row in read_csv(reports / "radius.csv")}
    assert list(radius) == ["coft eps 0.001", "coft_matched", "hint"]
    # The median per-plane budget over tiny SD v3's layers: its 16-wide blocks' at eps 1e-3, SD 1.5's at the matched eps.
    assert float(radius["coft eps 0.001"]["budget per plane (deg)"]) == pytest.approx(3.67, abs=0.01)
    assert float(radius["coft_matched"]["budget per plane (deg)"]) == pytest.approx(106.1, abs=1.0)  # eps to 2 figures
    assert 0 <= float(radius["coft eps 0.001"]["share on radius"]) <= 1 and math.isnan(float(radius["hint"]["share on radius"]))
    assert not list(runs.glob("canny-coft-eps*"))  # the eps 1e-3 row is coft's own cell
    assert "(module.optimizer.lr): coft eps 0.001: 0.001; coft_matched: 0.006." in (reports / "radius.md").read_text()
    # Where the blocks sit is kept as each cell finishes (the archive keeps no adapters); none for LoRA.
    kept = json.loads((reports / "cells" / "canny-coft-s0" / "blocks.json").read_text())
    assert kept == json.loads((runs / "canny-coft-s0" / "blocks.json").read_text()) and 0 <= kept["share on radius"] <= 1
    assert json.loads((reports / "cells" / "canny-lora-s0" / "blocks.json").read_text()) == {}
    compared = read_csv(reports / "radius_comparisons.csv")
    assert [(r["ours"], r["against"], r["n"]) for r in compared] == [("coft eps 0.001", "hint", "2/2"),
                                                                     ("coft_matched", "hint", "2/2")]
    assert all(r["verdict"] in VERDICTS for r in compared)

    frontier = {row["row"]: row for row in read_csv(reports / "frontier.csv")}
    assert list(frontier) == ["oft_r4", "lora_r4", "coft_matched", "hint"]
    adapter = {name: int(row["adapter params"]) for name, row in frontier.items()}
    assert adapter["hint"] == 0 and adapter["oft_r4"] == adapter["coft_matched"] < adapter["lora_r4"]  # the inverted ratio
    assert len({row["control network params"] for row in frontier.values()}) == 1  # one hint encoder for all
    assert (reports / "frontier.png").is_file()
    assert [(r["ours"], r["against"]) for r in read_csv(reports / "frontier_comparisons.csv")] == [
        ("oft_r4", "lora_r4"), ("oft_r4", "hint")]

    length = {row["method"]: row for row in read_csv(reports / "length.csv")}
    assert set(length) == {"coft", "lora"} and length["coft"]["seeds"] == "2"
    assert all(str(row["flattens at step"]).isdigit() or row["flattens at step"] == "no gain" for row in length.values())
    assert [r["at step"] for r in read_csv(reports / "length_comparisons.csv")] == ["1", "3"]
    # one step past the schedule's two: the plain cell continued, its curve first
    plain, longer = (json.loads((runs / name / "metrics.json").read_text()) for name in ("canny-lora-s1", "canny-lora-len3-s1"))
    assert [v["step"] for v in longer["history"]] == [0, 1, 2, 3] and longer["history"][:3] == plain["history"]

    [search] = read_csv(reports / "lr_search.csv")
    assert search["method"] == "coft" and search["best lr"] in ("0.0001", "0.001", "0.01")
    assert float(search[f"lr {search['best lr']}"]) == max(float(search[f"lr {lr:g}"]) for lr in (1e-4, 1e-3, 1e-2))
    assert "conf/method/<method>.yaml" in (reports / "lr_search.md").read_text()
    assert "- seed: 0; 2 steps of batch" in (reports / "lr_search.md").read_text()  # its own schedule, not the grid's

    energy = {row["method"]: row for row in read_csv(reports / "energy.csv")}
    assert float(energy["coft"]["max |ΔHE|/HE"]) < 1e-6  # rotations keep every angle (float error)
    for method in ("lora", "controlnet"):
        assert float(energy[method]["mean |ΔHE|/HE"]) > 1e-6, energy[method]

    ablation = {row["row"]: row for row in read_csv(reports / "ablation.csv")}
    assert list(ablation) == ["hint", "attention", "default", "conv", "r2", "hint_lr0.03"]
    assert {name: int(row["seeds"]) for name, row in ablation.items() if int(row["seeds"]) > 1} == {"default": 2, "r2": 2}
    assert ablation["attention"]["targets"] == "to_q, to_k, to_v, to_out.0"
    assert ablation["conv"]["targets"].endswith("conv1, conv2") and ablation["hint"]["targets"].startswith("none")
    assert (ablation["default"]["r"], ablation["r2"]["r"]) == ("4", "2")
    assert float(ablation["hint_lr0.03"]["hint lr"]) == 0.03
    params = {name: int(row["trainable params (this model)"]) for name, row in ablation.items()}
    assert params["hint"] < params["attention"] < params["default"] < params["conv"] and params["r2"] > params["default"]
    assert params["hint_lr0.03"] == params["default"]
    assert "Moves coft most: '" in (reports / "ablation.md").read_text()
    assert (runs / "canny-coft-s0" / "metrics.json").is_file()  # the default row is the controllable cell
    assert not list(runs.glob("canny-coft-default-*"))

    claims = read_csv(reports / "claims.csv")
    assert {row["verdict"] for row in claims} <= {"holds", "does not hold", "equivalent", "cannot tell"}
    by_claim = {row["claim"]: row for row in claims}
    lora = by_claim["coft beats lora on canny control (canny_iou)"]
    assert lora["ours"].count("±") == 2 and lora["n"] == "2/2" and lora["difference"].count("[") == 1
    # The second edition: each factor's verdict from the radius, frontier and length cells, and what moves it.
    assert lora["radius"].split(": ")[1].startswith("coft_matched vs lora, ")
    assert lora["parameters"].split(": ")[1].startswith("coft vs lora_r4, ")  # the only (r, rank) pair here
    assert lora["length"].split(": ")[1].startswith("coft vs lora, ")
    assert lora["scale-matched"].split(": ")[1].startswith("coft_matched vs lora_r4, ")
    factors = [f for f in ("radius", "parameters", "length") if lora[f].split(":")[0] != lora["verdict"]]
    assert lora["what moves it"] == (", ".join(factors) or "none of these")
    assert by_claim["coft beats controlnet on canny control (canny_iou)"]["parameters"] == ""  # LoRA's factor only
    missing = by_claim["coft beats t2i_adapter on seg control (seg_miou)"]
    assert missing["verdict"] == "cannot tell" and missing["reason"].startswith("not run: add t2i_adapter")
    assert by_claim["coft keeps the hyperspherical energy of the layers it adapts"]["verdict"] == "holds"
    assert by_claim["lora changes the hyperspherical energy of the layers it adapts"]["verdict"] == "holds"
    assert any(row["from"] == "table=ablation" and row["ours"].startswith("r=2 ") for row in claims)
    assert all(row["verdict"] == "holds" for row in claims if row["from"] == "table=params")

    subject = {row["method"]: row for row in read_csv(reports / "subject.csv")}
    assert subject["coft"]["runs"] == "2" and "[" in subject["coft"]["subject_fidelity"]  # mean [95 % CI] over seeds
    assert len(read_csv(reports / "subject_runs.csv")) == 2 * 4 + 2  # 2 seeds x (base + 3 methods) + 2 ideal rows
    searched = read_csv(reports / "subject_lr_search.csv")
    assert [row["method"] for row in searched] == ["textual_inversion"] and searched[0]["best lr"] in ("0.001", "0.01")
    assert (runs / "subject-badge_circle-textual_inversion-lr0.01-s0").is_dir()
    subject_claims = [row for row in read_csv(reports / "claims.csv") if row["from"] == "table=subject"]
    encoder = read_csv(reports / "encoder_search.csv")  # two pretrainings, each with two tune-step counts
    assert [(r["variant"], r["tune steps"]) for r in encoder] == [("shipped", "0"), ("shipped", "1"), ("lr", "0"), ("lr", "1")]
    assert (runs / "subject-encoder-pretrain-lr" / "subject_encoder").is_dir()
    assert all(float(r["share of textual_inversion's"]) > 0 for r in encoder)
    assert len(subject_claims) == 2 * 3  # coft and oft against textual_inversion, three claims each
    decided_rows = [row for row in subject_claims if row["claim"].startswith("coft ")]
    assert all(row["n"] == "2/2" and row["verdict"] in VERDICTS for row in decided_rows), decided_rows
    assert all("not run" in row["reason"] for row in subject_claims if row["claim"].startswith("oft "))
    assert set(subject) == {"base model (step 0 of coft)", "coft", "textual_inversion", "perfusion", "ideal images",
                            "ideal images through the VAE"}
    assert subject["perfusion"]["no_token_kind change, every prompt edited"] not in ("", "n/a")
    assert float(subject["textual_inversion"]["seconds per subject"]) > 0
    # The rendered ideal answers are the subject: far above the base model's samples.
    ideal = float(subject["ideal images"]["subject_fidelity"])
    assert ideal > float(subject["base model (step 0 of coft)"]["subject_fidelity"].split()[0]) + 0.2
    assert int(float(subject["textual_inversion"]["trainable params"])) == 64  # the tiny text width
    assert (reports / "subject_samples_badge_circle.png").is_file()
    assert "coft: eps 0.0025 in the paper convention" in (reports / "subject.md").read_text()  # task_method/subject_coft

    # A later table with the same settings reuses the finished cells: no train.py launch rewrites them.
    cells = [runs / f"canny-{method}-s0" / "metrics.json" for method in methods]
    trained = {cell: cell.stat().st_mtime_ns for cell in cells}
    again = reproduce("table=energy", f"out_dir={tmp_path / 'reports'}", f"runs_dir={runs}", *schedule, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {cell: cell.stat().st_mtime_ns for cell in cells} == trained
    assert again.stdout.count(": reused ") == len(cells) and ": training in " not in again.stdout, again.stdout


def fake_train(launches: list):
    """Stands in for run_script of train.py: records the launch and writes the metrics.json
    a finished run leaves in its hydra.run.dir (the last argument)."""
    def run(script, args, **kwargs):
        launches.append([script, *args])
        run_dir = Path(args[-1].split("=", 1)[1])
        (run_dir / "metrics.json").write_text(json.dumps({"final": {"canny_iou": 0.5}, "run": len(launches)}))
        return subprocess.CompletedProcess([script, *args], 0, stdout="", stderr="")
    return run


def test_plan_lists_done_part_trained_and_untrained_cells_and_trains_nothing(tmp_path, monkeypatch):
    from orthodiff.reproduce import cells, plan

    launches = []
    monkeypatch.setattr(cells, "run_script", fake_train(launches))
    cfg = OmegaConf.create({"runs_dir": str(tmp_path / "runs"), "cells_archive": str(tmp_path / "archive"), "jobs": 1})
    cells.train_cell(cfg, "done", ["method=coft"])
    part = tmp_path / "runs" / "part"  # a cell killed after its step-400 checkpoint
    (part / "checkpoints").mkdir(parents=True)
    (part / "overrides.json").write_text(json.dumps(cells.cell_identity(["method=lora"])))
    for name in ("epoch=0-step=200.ckpt", "epoch=0-step=400.ckpt", "last.ckpt"):
        (part / "checkpoints" / name).write_bytes(b"")
    specs = [("done", ["method=coft"]), ("part", ["method=lora"]), ("new", ["method=oft"])]
    archived = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "archive").rglob("*"))
    with pytest.raises(cells.Planned) as planned:
        cells.run_all(OmegaConf.merge(cfg, {"plan": True}), specs, "stage",
                      cell=lambda cfg, name, overrides, archived: cells.train_cell(cfg, name, overrides, archived=archived))
    assert len(launches) == 1  # the first cell's own run, before the plan
    assert planned.value.lines()[:3] == ["  done: done (runs_dir)", "  part: resumes at step 400", "  new: to train"]
    assert planned.value.lines()[3].startswith("  stage: 3 cells; 1 done (runs_dir), 1 resumes, 1 to train, ~0.0 h")
    shutil.rmtree(tmp_path / "runs")
    with pytest.raises(cells.Planned) as planned:
        cells.run_all(OmegaConf.merge(cfg, {"plan": True}), specs[:1], "stage",
                      cell=lambda cfg, name, overrides, archived: cells.train_cell(cfg, name, overrides, archived=archived))
    assert planned.value.lines()[0] == "  done: done (cells_archive)"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "archive").rglob("*")) == archived  # nothing written
    assert plan(OmegaConf.merge(cfg, {"plan": True}), "edit")[0][0].startswith("table=edit: trains no cell")


def test_the_frontier_runs_seed_major_and_reads_each_row_back():
    # A grid stopped part way has every row's first seeds; the table still reads each row's own.
    from orthodiff.reproduce import frontier
    cfg = OmegaConf.create({"seeds": [0, 1, 2], "controls": ["canny"], "frontier": {
        "oft_blocks": [1, 4], "lora_ranks": [4], "others": ["hint"], "two_seeds": ["oft_r1"]}})
    assert frontier.order(cfg) == [("oft_r1", 0), ("oft_r4", 0), ("lora_r4", 0), ("hint", 0),
                                   ("oft_r1", 1), ("oft_r4", 1), ("lora_r4", 1), ("hint", 1),
                                   ("oft_r4", 2), ("lora_r4", 2), ("hint", 2)]
    assert frontier.cells(cfg)[0] == ("oft", "canny", 0, ["adapter.num_blocks=1"], "-num_blocks1")
    assert frontier.cells(cfg)[1] == ("oft", "canny", 0, [], "")


def test_a_finished_cell_is_reused_until_its_overrides_or_base_weights_change(tmp_path, monkeypatch, caplog):
    from orthodiff.reproduce import cells

    launches = []
    monkeypatch.setattr(cells, "run_script", fake_train(launches))
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
    assert cells.train_cell(cfg, "cell", ["method=lora"])["run"] == 4 and "resume=" not in " ".join(launches[-1])
    # Where a run checkpoints is not part of its identity.
    assert cells.train_cell(cfg, "cell", ["method=lora", "callbacks.checkpoint.every_n_train_steps=7"])["run"] == 4
    # A cell recorded under a key's old name is the same cell under its new one.
    record = tmp_path / "cell" / "overrides.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "overrides": ["method=lora", "method.control_lr=0.01"]}))
    assert cells.train_cell(cfg, "cell", ["method=lora", "method.tiny_control_lr=0.01"])["run"] == 4
    assert cells.train_cell(cfg, "cell", ["method=lora", "method.tiny_control_lr=0.03"])["run"] == 5
    # ... and under the record's old key for the base model's digest (every cell then trained the embedded model).
    record.write_text(json.dumps({"overrides": ["method=lora", "method.tiny_control_lr=0.03"], "embedded_model": "re-pretrained"}))
    assert cells.train_cell(cfg, "cell", ["method=lora", "method.tiny_control_lr=0.03"])["run"] == 5


def test_a_finished_cell_is_read_from_the_archive_once_runs_dir_is_gone(tmp_path, monkeypatch):
    """cells_archive keeps a finished cell's record, metrics, config and checkpoint names: a new
    machine (no runs_dir) reuses it; a table that reads adapters (archived=False) trains it again."""
    from orthodiff.reproduce import cells

    launches = []
    train = fake_train(launches)

    def train_and_checkpoint(script, args, **kwargs):
        if script == "eval.py":
            Path(args[-1].split("=", 1)[1]).mkdir()
            Path(args[-1].split("=", 1)[1], "eval.json").write_text(json.dumps({"fid": 12.5}))
            return subprocess.CompletedProcess(args, 0, "", "")
        done = train(script, args, **kwargs)
        run_dir = Path(args[-1].split("=", 1)[1])
        (run_dir / "adapter.safetensors").write_bytes(b"adapter")
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "config.yaml").write_text("adapter: null\n")
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        for name in ("epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"):
            (run_dir / "checkpoints" / name).write_bytes(b"weights")
        return done

    monkeypatch.setattr(cells, "run_script", train_and_checkpoint)
    archive = tmp_path / "reports" / "cells"
    cfg = OmegaConf.create({"runs_dir": str(tmp_path / "runs"), "jobs": 1, "cells_archive": str(archive),
                            "eval_samples": 8, "eval_overrides": []})
    trained = cells.train_cell(cfg, "cell", ["method=oft"])
    assert cells.run_eval(cfg, trained) == {"fid": 12.5}
    assert sorted(p.relative_to(archive / "cell").as_posix() for p in (archive / "cell").rglob("*") if p.is_file()) == [
        ".hydra/config.yaml", "blocks.json", "checkpoints.json", "eval/eval.json", "eval/overrides.json", "metrics.json",
        "overrides.json"]
    assert json.loads((archive / "cell" / "blocks.json").read_text()) == {}  # written as it finished: no OFT layers
    shutil.rmtree(tmp_path / "runs")  # a new machine
    again = cells.train_cell(cfg, "cell", ["method=oft"])
    assert len(launches) == 1 and again["run"] == trained["run"] and again["run_dir"] == str(archive / "cell")
    assert cells.cell_config(again["run_dir"]).adapter is None
    assert cells.run_eval(cfg, again) == {"fid": 12.5} and len(launches) == 1  # its FID too
    with pytest.raises(FileNotFoundError, match="cells_archive"):  # evaluated with other settings: no adapter here
        cells.run_eval(OmegaConf.merge(cfg, {"eval_samples": 16}), again)
    # Its checkpoints' names (a continuing cell's record holds one) without the files.
    checkpoint = cells.step_checkpoint(again["run_dir"], 2)
    assert checkpoint.name == "epoch=0-step=2.ckpt" and not checkpoint.exists()
    with pytest.raises(FileNotFoundError, match="cells_archive"):
        cells.run_file(again, "adapter.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        cells.step_checkpoint(again["run_dir"], 3)
    # Other overrides are another cell; a table that reads the adapter trains the cell again in runs_dir.
    assert cells.train_cell(cfg, "cell", ["method=lora"], cached_only=True) is None
    assert cells.train_cell(cfg, "cell", ["method=oft"], archived=False)["run"] == 2
    assert cells.train_cell(OmegaConf.merge(cfg, {"cells_archive": None}), "cell", ["method=oft"])["run"] == 2
    # A run replaced by another cell of the same name leaves no file of the old one, here or archived.
    for folder in (tmp_path / "runs" / "cell", archive / "cell"):
        (folder / "blocks.json").write_text('{"share on radius": 1.0}')
        (folder / "eval").mkdir(exist_ok=True)
        (folder / "eval" / "eval.json").write_text("{}")
    assert cells.train_cell(cfg, "cell", ["method=lora"])["run"] == 3
    for folder in (tmp_path / "runs" / "cell", archive / "cell"):
        assert json.loads((folder / "blocks.json").read_text()) == {} and not (folder / "eval" / "eval.json").exists()


def test_blocks_of_cells_finishing_together_is_each_cells_own(tmp_path):
    """run_all's threads finish cells together and each writes where its blocks sit: the adapters
    load one at a time (diffusers' loading patches torch for the whole process; two at once failed
    with "Unsupported device type 'meta'"), and each run keeps its own figures in blocks.json."""
    import torch

    from orthodiff.adapter import save_adapter
    from orthodiff.oft import OFTConfig
    from orthodiff.reproduce import cells
    from orthodiff.tasks import ControlTask

    runs = [tmp_path / f"run{k}" for k in range(2)]
    for k, run in enumerate(runs):
        module = ControlTask(control="canny", adapter=OFTConfig(num_blocks=4, coft=True, coft_norm="paper"),
                             method="coft", val_steps=3)
        with torch.no_grad():
            for parameter in (p for p in module.parameters() if p.requires_grad):
                parameter.add_((k + 1) * 0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(k)))
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(
            "adapter: {_target_: orthodiff.oft.OFTConfig, coft: true, coft_norm: paper, eps: 0.001}\n")
        save_adapter(run / "adapter.safetensors", module.eval())
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(cells.blocks_of, runs))
    assert found[0]["median angle per plane (deg)"] < found[1]["median angle per plane (deg)"]  # twice the rotation
    assert all(0 <= f["share on radius"] <= 1 and f["budget per plane (deg)"] == pytest.approx(3.67, abs=0.01) for f in found)
    assert [json.loads((run / "blocks.json").read_text()) for run in runs] == found
    (runs[0] / "adapter.safetensors").unlink()
    assert cells.blocks_of(runs[0]) == found[0] and cells.blocks_of(tmp_path / "archived") is None
    lora = tmp_path / "lora"  # no OFT layers: {} without loading its adapter (this one is no safetensors file)
    (lora / ".hydra").mkdir(parents=True)
    (lora / ".hydra" / "config.yaml").write_text("adapter: {_target_: orthodiff.models.LoRAConfig, rank: 4}\n")
    (lora / "adapter.safetensors").write_text("not read")
    assert cells.blocks_of(lora) == {}


def test_a_length_run_continues_an_archived_cell_after_training_it_again_for_its_checkpoint(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from orthodiff.reproduce import cells, length

    launches = []
    train = fake_train(launches)

    def train_and_checkpoint(script, args, **kwargs):
        done = train(script, args, **kwargs)
        (Path(args[-1].split("=", 1)[1]) / "checkpoints").mkdir(exist_ok=True)
        (Path(args[-1].split("=", 1)[1]) / "checkpoints" / "epoch=0-step=4.ckpt").write_bytes(b"weights")
        return done

    monkeypatch.setattr(cells, "run_script", train_and_checkpoint)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("reproduce", overrides=["table=length", f"runs_dir={tmp_path / 'runs'}", f"out_dir={tmp_path}",
                                              "schedule.steps=4", "length.steps=8"])
    first = length.continued_cell(cfg, "oft", 0)
    assert len(launches) == 2 and f"resume='{tmp_path / 'runs'}" in " ".join(launches[-1])
    shutil.rmtree(tmp_path / "runs")  # a new machine: both cells are in the archive
    assert length.continued_cell(cfg, "oft", 0)["run"] == first["run"] and len(launches) == 2
    shutil.rmtree(tmp_path / "cells" / first["run_dir"].split("/")[-1])  # only the plain cell is
    assert length.continued_cell(cfg, "oft", 0, cached_only=True) is None and len(launches) == 2
    assert length.continued_cell(cfg, "oft", 0)["run"] == 4  # the plain cell trained again for its checkpoint
    assert "resume=" not in " ".join(launches[2]) and "resume='" in " ".join(launches[3])


def test_a_cell_on_another_base_model_is_keyed_on_that_models_weights(tmp_path, monkeypatch):
    """A width-ladder rung (model=tiny_w2) or any model.pretrained folder: pretraining it again
    retrains its cells; the embedded model's digest does not move them."""
    from orthodiff.reproduce import cells

    rung = tmp_path / "tiny-sd-w2"
    shutil.copytree(TINY_SD_PATH / "unet", rung / "unet")
    launches = []
    monkeypatch.setattr(cells, "run_script", fake_train(launches))
    cfg = OmegaConf.create({"runs_dir": str(tmp_path / "runs"), "jobs": 1})
    cell = ["method=oft", f"model.pretrained={rung}"]
    cells.train_cell(cfg, "cell", cell)
    monkeypatch.setattr(cells, "embedded_model_digest", lambda: "re-pretrained")
    assert cells.train_cell(cfg, "cell", cell)["run"] == 1  # reused
    (rung / "unet" / "config.json").write_text("{}")  # the rung pretrained again
    assert cells.train_cell(cfg, "cell", cell)["run"] == 2
    monkeypatch.setenv("HOME", str(tmp_path))  # conf/model/tiny_w2.yaml: ~/.cache/orthodiff/models/tiny-sd-w2
    assert cells.base_model_digest(["model=tiny_w2"]) == "~/.cache/orthodiff/models/tiny-sd-w2"  # not built yet
    shutil.copytree(rung, tmp_path / ".cache/orthodiff/models/tiny-sd-w2")
    assert cells.base_model_digest(["model=tiny_w2"]) == cells.folder_digest(rung)
    assert cells.base_model_digest(["model=tiny"]) == cells.base_model_digest([]) == "re-pretrained"


def test_a_cell_that_died_part_way_resumes_from_its_last_validations_checkpoint(tmp_path, monkeypatch):
    from orthodiff.reproduce import cells

    launches = []
    monkeypatch.setattr(cells, "run_script", fake_train(launches))
    monkeypatch.setattr(cells, "embedded_model_digest", lambda: "v3")
    cfg = OmegaConf.create({"runs_dir": str(tmp_path), "jobs": 1})
    checkpoints = tmp_path / "cell" / "checkpoints"

    def die_after_a_validation(overrides):
        cells.train_cell(cfg, "cell", overrides)
        (tmp_path / "cell" / "metrics.json").write_text(json.dumps({"step0": {"canny_iou": 0.1}}))
        checkpoints.mkdir(exist_ok=True)
        (checkpoints / "last.ckpt").write_bytes(b"step 200")

    die_after_a_validation(["method=oft"])
    run = cells.train_cell(cfg, "cell", ["method=oft"])
    assert f"resume={checkpoints.resolve() / 'last.ckpt'}" in launches[-1] and run["resumed"]
    assert all(o in launches[0] for o in cells.CHECKPOINT_AT_VALIDATION)
    die_after_a_validation(["method=oft"])  # a checkpoint of other overrides or base weights is not resumed...
    monkeypatch.setattr(cells, "embedded_model_digest", lambda: "v4")
    run = cells.train_cell(cfg, "cell", ["method=oft"])
    assert "resume=" not in " ".join(launches[-1]) and "resumed" not in run
    assert not checkpoints.exists()  # ...but deleted with the run it belonged to


def test_a_diverged_cell_is_kept_as_a_result_and_other_failures_raise(tmp_path, monkeypatch):
    from orthodiff.reproduce import cells

    def diverging(script, args, **kwargs):
        (Path(args[-1].split("=", 1)[1]) / "metrics.json").write_text(json.dumps({"step0": {"canny_iou": 0.1}}))
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="train.py: loss is nan at step 7: training "
                                           "stopped; the last checkpoint holds the last good weights (try a lower lr)")

    monkeypatch.setattr(cells, "run_script", diverging)
    cfg = OmegaConf.create({"runs_dir": str(tmp_path), "jobs": 1})
    run = cells.train_cell(cfg, "cell", ["method=oft"])
    assert run["final"] == {} and run["diverged"] == "loss is nan at step 7" and run["step0"] == {"canny_iou": 0.1}
    launches = []
    monkeypatch.setattr(cells, "run_script", fake_train(launches))
    assert cells.train_cell(cfg, "cell", ["method=oft"])["diverged"] and not launches  # reused, not retrained
    assert cells.train_cell(cfg, "other", ["method=oft"], cached_only=True) is None and not launches
    monkeypatch.setattr(cells, "run_script", lambda script, args, **kw: subprocess.CompletedProcess(args, 1, "", "boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cells.train_cell(cfg, "broken", ["method=oft"])


@pytest.mark.slow
def test_a_cell_killed_after_a_validation_resumes_to_the_uninterrupted_curve(shapes_root, tmp_path, monkeypatch):
    """Real train.py runs: 4 steps validated every 2; one killed (SIGKILL) at step 3, then
    run again. The resumed cell's curve holds every validation and its end is the
    uninterrupted cell's."""
    from orthodiff.reproduce import cells

    overrides = ["experiment=canny", f"data.train.root={shapes_root}", "+data.train.max_items=8", "data.batch_size=2",
                 "data.val.max_items=2", "data.val_batch_size=2", "model.val_steps=2", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "validate_at_start=true", "trainer.deterministic=true",
                 "callbacks.progress_bar.refresh_rate=0", "logger=none"]
    cfg = OmegaConf.create({"runs_dir": str(tmp_path), "jobs": 1, "threads": 1})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    uninterrupted = cells.train_cell(cfg, "uninterrupted", overrides)
    real_run = cells.run_script

    def killed_at_step_3(script, args, **kwargs):
        kill = ["+callbacks.kill._target_=faults.KillAt", "+callbacks.kill.step=3"]
        return real_run(script, [*args[:-1], *kill, args[-1]], **kwargs)

    monkeypatch.setattr(cells, "run_script", killed_at_step_3)
    with pytest.raises(RuntimeError, match="exit -9"):
        cells.train_cell(cfg, "killed", overrides)
    monkeypatch.setattr(cells, "run_script", real_run)
    resumed = cells.train_cell(cfg, "killed", overrides)
    assert resumed["resumed"] and "resumed" not in uninterrupted
    assert [v["step"] for v in resumed["history"]] == [v["step"] for v in uninterrupted["history"]] == [0, 2, 4]
    assert resumed["history"] == uninterrupted["history"] and resumed["final"] == uninterrupted["final"]



@pytest.mark.slow
def test_a_cell_continued_from_another_cells_validation_is_the_longer_run(shapes_root, tmp_path, monkeypatch):
    """Real train.py runs: a 4-step cell validated every 2, continued to 8 steps validated every 4,
    against one uninterrupted 8-step run validated every 2 (table=length on table=frontier's cells)."""
    from orthodiff.reproduce import cells

    def overrides(steps, every):
        return ["experiment=canny", f"data.train.root={shapes_root}", "+data.train.max_items=16", "data.batch_size=2",
                "data.val.max_items=2", "data.val_batch_size=2", "model.val_steps=2", f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={every}", "validate_at_start=true", "trainer.deterministic=true",
                "callbacks.progress_bar.refresh_rate=0", "logger=none"]

    cfg = OmegaConf.create({"runs_dir": str(tmp_path), "jobs": 1, "threads": 1})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    long = cells.train_cell(cfg, "long", overrides(8, 2))
    short = cells.train_cell(cfg, "short", overrides(4, 2))
    start = cells.step_checkpoint(short["run_dir"], 4)
    continued = cells.train_cell(cfg, "continued", overrides(8, 4), start_from=start)
    assert [v["step"] for v in continued["history"]] == [0, 2, 4, 8]
    assert continued["history"] == [v for v in long["history"] if v["step"] != 6]
    assert continued["final"] == long["final"] and continued["step0"] == long["step0"]
    assert start.is_file() and json.loads((tmp_path / "continued" / "overrides.json").read_text())["continues"] == {
        "cell": json.loads((tmp_path / "short" / "overrides.json").read_text()), "checkpoint": start.name}
    assert cells.train_cell(cfg, "continued", overrides(8, 4), cached_only=True, start_from=start)["final"]
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        cells.step_checkpoint(short["run_dir"], 3)

def schedule_cfg(tmp_path, **extra):
    shipped = OmegaConf.load(ROOT / "conf" / "reproduce.yaml")  # the tables' own sections, as shipped
    return OmegaConf.create({"out_dir": str(tmp_path), "runs_dir": str(tmp_path / "runs"), "jobs": 1,
                             "methods": ["coft", "lora"], "controls": ["canny", "seg"], "seeds": [0, 1],
                             "eval_samples": 4, "train_overrides": [],
                             "schedule": {"steps": 2000, "val_every": 200, "other_steps": 1000, "val_items": 32,
                                          "batch_size": 8},
                             **{k: shipped[k] for k in ("radius", "frontier", "length")}, **extra})


def test_cell_schedules_curves_on_the_first_control_and_the_base_row_on_every_control(tmp_path):
    from orthodiff.reproduce.cells import run_overrides

    def settings(*args, **kwargs):
        return {o.split("=")[0]: o.split("=", 1)[1] for o in run_overrides(schedule_cfg(tmp_path), *args, **kwargs)}

    canny, seg, base_seg = settings("lora", "canny", 1), settings("lora", "seg", 1), settings("coft", "seg", 1)
    assert (canny["trainer.max_steps"], canny["trainer.val_check_interval"], canny["validate_at_start"]) == ("2000", "200", "True")
    assert (seg["trainer.max_steps"], seg["trainer.val_check_interval"], seg["validate_at_start"]) == ("1000", "1000", "False")
    assert base_seg["validate_at_start"] == "True"  # methods[0]'s step 0 is the base model's row
    search = settings("coft", "canny", 0, ["method.tiny_control_lr=0.003"], 500, False, False)
    assert (search["trainer.max_steps"], search["trainer.val_check_interval"], search["validate_at_start"],
            search["method.tiny_control_lr"]) == ("500", "500", "False", "0.003")


def cell_dir(root: Path, name: str, method: str) -> str:
    """A fake cell's folder with the part of its config the reports read: coft = the paper's COFT, eps 1e-3 in the paper convention."""
    config = root / name / ".hydra" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    adapter = {"coft": True, "eps": 1e-3, "coft_norm": "paper"} if method == "coft" else {"coft": False}
    OmegaConf.save({"method": {"name": method}, "adapter": adapter}, config)
    return str(config.parents[1])


def test_controllable_runs_every_seed_on_every_control_with_reference_rows(tmp_path, monkeypatch):
    from orthodiff.reproduce import controllable

    def run_all(cfg, cells, desc):
        return [{"final": {"seg_miou": 0.1 * seed, "canny_iou": 0.3}, "step0": {"seg_miou": 0.01, "canny_iou": 0.02 + seed},
                 "run_dir": cell_dir(tmp_path, f"{c}-{m}-s{seed}", m),
                 "cost": {"trainable_parameters": 10, "seconds_per_step": (9.0, 1.0, 1.2)[seed], "peak_memory_mb": 5}}
                for m, c, seed in cells]

    monkeypatch.setattr(controllable, "run_all", run_all)
    quality = {"image_quality": {"fid": 1.0, "fid_extractor": "x"}}
    monkeypatch.setattr(controllable, "run_eval", lambda cfg, run: quality)
    scored = []
    monkeypatch.setattr(controllable, "reference_scores", lambda run_dir: scored.append(run_dir) or {
        "real images": {"seg_miou": 0.9, "canny_iou": 1.0}, "real images through the VAE": {"seg_miou": 0.8, "canny_iou": 0.6}})
    cfg = schedule_cfg(tmp_path, methods=["coft"], controls=["seg", "canny"])
    controllable.table(cfg)
    rows = {row["method"]: row for row in read_csv(tmp_path / "controllable.csv")}
    assert rows["coft"]["seg seg_miou"] == "0.0500 ± 0.0707" and rows["coft"]["canny canny_iou"] == "0.3000 ± 0.0000"
    assert rows["coft"]["FID (seg, x features)"] == "1.0"
    base = rows["base model (step 0 of coft)"]
    assert base["seg seg_miou"] == "0.0100 ± 0.0000" and base["canny canny_iou"] == "0.5200 ± 0.7071"
    assert rows["real images"]["canny canny_iou"] == "1.0000" and rows["real images through the VAE"]["seg seg_miou"] == "0.8000"
    assert [Path(d).name for d in scored] == ["seg-coft-s0", "canny-coft-s0"]  # each control's own validation scenes
    report = (tmp_path / "controllable.md").read_text()
    assert "mean ± std over seeds [0, 1]" in report
    assert "coft: eps 0.001 in the paper convention" in report  # COFT's eps always says its convention
    controllable.table(schedule_cfg(tmp_path, methods=["coft"], controls=["seg", "canny"], seeds=[0, 1, 2]))
    assert read_csv(tmp_path / "controllable.csv")[0]["s/step"] == "1.2"  # the median: seed 0's 9 s (a paused cell) drops out


def history(*values, every=200):
    return [{"step": k * every, "canny_iou": v} for k, v in enumerate(values)]


def test_steps_to_reach_a_level_measured_from_the_base_model():
    from orthodiff.reproduce.convergence import steps_to_reach, thresholds

    levels = thresholds(0.1, 0.3, higher=True)
    assert levels == pytest.approx({0.5: 0.2, 0.8: 0.26})
    curve = history(0.1, 0.2, 0.35, 0.25)
    assert [steps_to_reach(curve, "canny_iou", levels[f], True) for f in (0.5, 0.8)] == [200, 400]
    assert steps_to_reach(curve, "canny_iou", 0.4, True) is None
    assert steps_to_reach(history(0.1, 0.25)[::-1], "canny_iou", 0.2, True) == 200  # in step order, whatever the list's
    rmse = [{"step": 0, "rmse": 0.2}, {"step": 100, "rmse": 0.16}, {"step": 200, "rmse": 0.11}]
    levels = thresholds(0.2, 0.1, higher=False)  # lower is better: down from the base
    assert levels == pytest.approx({0.5: 0.15, 0.8: 0.12})
    assert [steps_to_reach(rmse, "rmse", levels[f], False) for f in (0.5, 0.8)] == [200, 200]
    assert thresholds(0.1, 0.09, higher=True) is None  # nothing gained over the base model


def test_convergence_reports_steps_and_images_to_each_level(tmp_path, monkeypatch):
    from orthodiff.reproduce import convergence

    # Seed 1's validation noise puts the base model at 0.12, seed 0's at 0.1.
    curves = {("coft", 0): history(0.1, 0.2, 0.3), ("coft", 1): history(0.12, 0.3, 0.3),
              ("lora", 0): history(0.1, 0.1, 0.15), ("lora", 1): history(0.12, 0.12, 0.22)}

    def run_all(cfg, cells, desc):
        return [{"final": {"canny_iou": curves[(m, s)][-1]["canny_iou"]}, "step0": {"canny_iou": curves[(m, s)][0]["canny_iou"]},
                 "history": curves[(m, s)], "run_dir": cell_dir(tmp_path, f"{m}-s{s}", m)} for m, _, s in cells]

    monkeypatch.setattr(convergence, "run_all", run_all)
    convergence.table(schedule_cfg(tmp_path, schedule={"steps": 400, "val_every": 200, "other_steps": 400,
                                                       "val_items": 4, "batch_size": 8}))
    rows = {row["method"]: row for row in read_csv(tmp_path / "convergence.csv")}
    # base 0.11, best final 0.3 (coft): 50 % at 0.195 (seed 0) / 0.215 (seed 1), 80 % at 0.252 / 0.272
    assert rows["coft"]["steps to 50%"] == "200 ± 0" and rows["coft"]["images to 50%"] == "1600 ± 0"
    assert rows["coft"]["steps to 80%"] == "300 ± 141"
    assert rows["lora"]["steps to 50%"] == "400 (1/2 seeds; the others not within)"
    assert rows["lora"]["steps to 80%"] == "not within 400" and rows["lora"]["images to 80%"] == "not within 3200"
    report = (tmp_path / "convergence.md").read_text()
    assert "best final score 0.3000 (coft's" in report and "50% = 0.2050, 80% = 0.2620" in report
    assert (tmp_path / "convergence.png").is_file() and (tmp_path / "convergence_curves.csv").is_file()


def test_claims_decide_every_compared_row_as_one_holm_family(tmp_path, monkeypatch):
    from orthodiff.reproduce import claims, controllable

    # Final canny IoU per seed; t2i_adapter diverged on two of its three seeds.
    finals = {"coft": [0.408, 0.412, 0.41], "lora": [0.20, 0.22, 0.21], "controlnet": [0.409, 0.411, 0.41],
              "t2i_adapter": [0.1, math.nan, math.nan]}

    class FakeCells(claims.Cells):
        def get(self, args):
            method, control, seed = args[:3]
            return {"final": {"canny_iou": finals[method][seed]}, "step0": {"canny_iou": 0.03 + 0.001 * seed},
                    "run_dir": "unused"}

    # The ceiling: the real validation images through the VAE, scored like a sample (no VAE here).
    monkeypatch.setattr(controllable, "reference_scores", lambda run_dir: {controllable.THROUGH_VAE: {"canny_iou": 0.72}})

    cfg = schedule_cfg(tmp_path, methods=list(finals), controls=["canny"], seeds=[0, 1, 2],
                       claims={"ours": ["coft"], "baselines": ["lora", "controlnet", "t2i_adapter"], "stability": []})
    cells = FakeCells(cfg)
    # 5 % of the way from the base model (mean step 0 of coft, 0.031) to the ceiling through the VAE (0.72).
    assert claims.metric_margin(cfg, cells, "canny") == pytest.approx(0.05 * (0.72 - 0.031))
    rows = {r["claim"].split(" (")[0]: r for r in claims.decided(claims.consistency_rows(cfg, cells))}
    assert {claim: r["verdict"] for claim, r in rows.items()} == {
        "coft controls canny better than the base model without control": "holds",
        "coft beats lora on canny control": "holds",
        "coft beats controlnet on canny control": "equivalent",  # 0.000 apart, well within ±0.034
        "coft beats t2i_adapter on canny control": "cannot tell"}  # one finite seed, far below: never decided
    lora = rows["coft beats lora on canny control"]
    assert lora["difference"] == "+0.200 [+0.176, +0.224]" and lora["n"] == "3/3"
    assert lora["p"] < lora["holm p"] <= 3 * lora["p"] and "over 3 comparisons" in lora["reason"]  # t2i's row not counted
    one_seed = rows["coft beats t2i_adapter on canny control"]
    assert one_seed["reason"] == "fewer than 2 seeds in an arm (n=3/1)" and one_seed["n"] == "3/1"


def test_spread_of_the_finite_values():
    from orthodiff.reproduce.report import spread

    assert spread([0.1, 0.3, math.nan]) == pytest.approx((0.2, 0.1414), abs=1e-4)
    assert spread([0.1])[0] == 0.1 and math.isnan(spread([0.1])[1])


def test_stability_counts_a_dip_mid_run_not_only_a_fall_at_the_end():
    from orthodiff.reproduce.claims import largest_fall

    def run(curve):  # validations, the last one also the final figure
        return {"history": [{"step": 200 * i, "iou": v} for i, v in enumerate(curve)], "final": {"iou": curve[-1]}}

    assert largest_fall(run([0.03, 0.25, 0.16, 0.27]), "iou", higher=True) == pytest.approx(0.09)  # dipped, recovered
    assert largest_fall(run([0.03, 0.20, 0.30]), "iou", higher=True) == 0
    assert largest_fall(run([0.03, 0.30, 0.25]), "iou", higher=True) == pytest.approx(0.05)
    assert largest_fall(run([9.0, 6.0, 8.5, 7.0]), "iou", higher=False) == pytest.approx(2.5)  # an error: up is worse
    assert math.isnan(largest_fall({"history": [{"iou": 0.2}], "final": {}}, "iou", higher=True))  # diverged


def test_the_lr_search_picks_the_best_finite_score():
    from orthodiff.reproduce.lr_search import best_lr

    assert best_lr({3e-4: 0.1, 1e-3: 0.2, 3e-3: math.nan}, higher=True) == 1e-3  # 3e-3 diverged
    assert best_lr({3e-4: 0.1, 1e-3: 0.2}, higher=False) == 3e-4
    assert best_lr({1e-3: math.nan}, higher=True) is None


def test_the_lr_search_carries_the_rows_of_an_earlier_report_it_does_not_search_again(tmp_path):
    from orthodiff.reproduce.lr_search import carried_rows

    earlier = tmp_path / "lr_search.csv"
    earlier.write_text("method,searches,lr 0.001,best lr\nhint,module.hint_lr,0.17,0.001\n"
                       "controlnet,method.tiny_control_lr,0.3,0.001\n")
    cfg = OmegaConf.create({"methods": ["oft"], "lr_search": {"methods": ["controlnet"], "carry_from": str(earlier)}})
    assert carried_rows(cfg) == [{"method": "hint", "searches": "module.hint_lr", "lr 0.001": 0.17, "best lr": 0.001}]
    assert carried_rows(OmegaConf.merge(cfg, {"lr_search": {"carry_from": None}})) == []


def test_ablation_rows_and_the_largest_move(tmp_path):
    from orthodiff.reproduce import ablation

    cfg = schedule_cfg(tmp_path, ablation={"method": "oft", "attention_targets": ["to_q", "to_out.0"],
                                           "conv_targets": ["conv1"], "num_blocks": [2], "hint_lrs": [1e-4],
                                           "three_seeds": ["conv"]})
    rows = {v["name"]: v for v in ablation.variants(cfg)}
    assert list(rows) == ["hint", "attention", "default", "conv", "r2", "hint_lr0.0001"]
    assert rows["hint"]["method"] == "hint" and rows["hint"]["extra"] == []
    assert rows["attention"]["extra"] == ["adapter.targets=[to_q,to_out.0]"]
    assert rows["conv"]["extra"] == ["adapter.targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,conv1]"]
    assert rows["hint_lr0.0001"]["extra"] == ["module.hint_lr=0.0001"]
    assert {n: v["seeds"] for n, v in rows.items() if len(v["seeds"]) > 1} == {"default": [0, 1], "conv": [0, 1]}
    assert ablation.cells(cfg, rows["default"]) == [("oft", "canny", 0, [], ""), ("oft", "canny", 1, [], "")]  # reused
    assert ablation.cells(cfg, rows["r2"]) == [("oft", "canny", 0, ["adapter.num_blocks=2"], "-r2")]
    assert ablation.largest_moves({"hint": -0.1, "r2": 0.02, "conv": 0.15, "x": math.nan}) == [
        ("conv", 0.15), ("hint", -0.1), ("r2", 0.02)]
    what = {"x10": "lr x10", "conv": "+ conv", "r2": "r = 2"}
    verdict = ablation.what_moves_most("oft", "iou", True, {"x10": -0.3, "conv": 0.1, "r2": 0.03},
                                       {"x10": 0.05, "conv": 0.45, "r2": 0.38}, what)
    assert verdict.startswith("Moves oft most: 'x10' (lr x10), iou 0.3500 (default, same seeds) -> 0.0500 (-0.3000, worse)")
    assert verdict.endswith("Largest gain: 'conv' (+ conv), +0.1000.")
    assert "Largest gain" not in ablation.what_moves_most("oft", "iou", True, {"conv": 0.1}, {"conv": 0.45}, what)
    cfg.ablation.three_seeds = ["r3"]
    with pytest.raises(ValueError, match="r3"):
        ablation.variants(cfg)


def test_claims_train_nothing_and_say_which_table_runs_the_missing_cells(tmp_path, monkeypatch):
    from orthodiff.reproduce import cells, claims

    def no_training(script, args, **kwargs):
        raise AssertionError(f"table=claims launched {script}")

    monkeypatch.setattr(cells, "run_script", no_training)
    cfg = schedule_cfg(tmp_path, methods=["coft", "oft", "lora", "controlnet"],
                       claims={"ours": ["coft"], "baselines": ["controlnet", "t2i_adapter"], "stability": ["coft"],
                               "subject_baselines": ["full"]},
                       ablation={"method": "oft", "attention_targets": ["to_q"], "conv_targets": ["conv1"],
                                 "num_blocks": [2], "hint_lrs": [], "three_seeds": []},
                       subject={"methods": ["coft", "full"], "subjects": ["badge_circle"], "seeds": [0, 1],
                                "train_overrides": []})
    claims.table(cfg)
    rows = read_csv(tmp_path / "claims.csv")
    for row in rows:
        assert row["verdict"] in claims.VERDICTS
        if row["from"] != "table=params":  # every trained claim: not run, and which table runs it
            assert row["verdict"] == "cannot tell" and row["reason"].startswith("not run"), row
            assert row["difference"] == row["n"] == row["holm p"] == "", row
            assert f"python reproduce.py {row['from']}" in row["reason"], row
    assert {r["from"] for r in rows} == {"table=controllable", "table=convergence", "table=params", "table=energy",
                                         "table=ablation", "table=subject"}
    t2i = [r for r in rows if "t2i_adapter" in r["claim"]]
    assert t2i and all("add t2i_adapter to methods" in r["reason"] for r in t2i)
    assert [r["verdict"] for r in rows if r["from"] == "table=params"] == ["holds", "holds"]
    speed = [r["claim"] for r in rows if r["from"] == "table=convergence" and "fewer steps" in r["claim"]]
    assert speed == [f"coft reaches {level} of the best final score in fewer steps than {baseline}"
                     for level in ("50%", "80%") for baseline in ("controlnet", "t2i_adapter")]
    assert "Verdicts: 2 hold, 0 do not hold" in (tmp_path / "claims.md").read_text()


@pytest.mark.parametrize("method", ["oft", "hint", "controlnet"])
def test_the_hint_encoder_trains_at_its_own_lr(method):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["experiment=canny", f"method={method}", "method.tiny_control_lr=2e-4",
                                          "module.hint_lr=7e-3"])
    module = instantiate(cfg.module)
    control = {id(p) for p in module.control_network.parameters()}
    adapter = {id(p) for p in module.parameters() if p.requires_grad} - control
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in module.configure_optimizers().param_groups]
    if method == "controlnet":  # its control network is what the method trains: the method's lr
        assert groups == [(pytest.approx(2e-4), control)]
    elif method == "hint":  # nothing but the encoder
        assert groups == [(pytest.approx(7e-3), control)]
    else:
        assert groups == [(pytest.approx(2e-4), adapter), (pytest.approx(7e-3), control)] and adapter
    module.hparams.hint_lr = None  # null: one group at the optimizer's lr, as before
    [group] = module.configure_optimizers().param_groups
    assert group["lr"] == pytest.approx(2e-4) and {id(p) for p in group["params"]} == adapter | control


def test_a_joint_controls_metric_is_its_first_conditions_headline():
    for path in CONTROL_CONFIGS.glob("*.yaml"):
        parts = OmegaConf.load(path).name.split("+")
        if len(parts) > 1:  # scored per condition; the sweeper optimizes the first's figure
            assert OmegaConf.load(path).metric == f"val/{headline_metric(parts[0])}", path


@pytest.mark.parametrize("control", sorted(CONTROL_CHANNELS))
def test_each_controls_headline_metric_is_a_figure_its_scorer_computes(shapes_root, control):
    from orthodiff.data.datasets import ShapesDataset, collate
    from orthodiff.eval.control_metrics import ControlScorer

    data = ShapesDataset(shapes_root, "val", control, max_items=4)
    batch = collate([data[i] for i in range(len(data))])
    scorer = ControlScorer(control, num_classes=getattr(data, "num_classes", None))
    scorer.update((batch["pixel_values"] + 1) / 2, batch)
    assert headline_metric(control) in scorer.compute()


def test_grid_wall_time_sums_each_tables_cells_and_scales_a_resumed_one(tmp_path):
    def cell(name, steps, wall, timed=None, resumed=False):
        run = tmp_path / name
        run.mkdir()
        (run / "overrides.json").write_text(json.dumps({"overrides": [f"trainer.max_steps={steps}"]}))
        if wall is not None:  # None: killed before it finished
            (run / "metrics.json").write_text(json.dumps(
                {"wall_seconds": wall, "resumed": resumed, "cost": {"timed_steps": (timed or steps) - 1}}))

    cell("canny-oft-lr0.003-s0", 1000, 3600)
    cell("canny-oft-conv-s0", 2000, 1800, timed=1000, resumed=True)  # timed half its steps: counts 3600 s
    cell("canny-hint-s1", 2000, 3600)
    cell("canny-oft-s2", 2000, 7200)
    cell("seg-lora-s0", 1000, 1800)
    cell("depth-oft-s0", 1000, None)
    out = subprocess.run([sys.executable, str(ROOT / "scripts/grid_wall_time.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| ablation | 2 | 2.00 | 1.00 | 1 |" in out
    assert "| lr_search | 1 | 1.00 | 0.50 | 0 |" in out
    assert "| convergence (canny) | 1 | 2.00 | 1.00 | 0 |" in out
    assert "| controllable (other controls) | 1 | 0.50 | 0.25 | 0 |" in out
    assert "| all | 5 | 5.50 | 2.75 | 1 |" in out and "not finished (not counted): 1: depth-oft-s0" in out


def test_cells_import_the_code_of_the_tree_that_runs_them(tmp_path):
    from orthodiff.reproduce.cells import ROOT, cell_env

    env = cell_env(schedule_cfg(tmp_path))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "src")  # first, whatever the install points at
    probe = subprocess.run([sys.executable, "-c", "import orthodiff; print(orthodiff.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True)
    assert Path(probe.stdout.strip()).is_relative_to(ROOT / "src"), probe.stdout  # not an editable install's checkout
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 1))  # jobs=1: every core
