"""table=claims: the verdict. One row per claim of the OFT paper that the miniature can test,
with the paper's figure, ours with its spread, the difference with its 95 % CI, n, p, and a
verdict (holds / does not hold / equivalent / cannot tell) with its reason. Built only from the
cells the other tables trained: a claim whose cells are missing says "not run" and names the
table that trains them; nothing trains here.

A claim that one method's figure beats another's over seeds is decided by stats.py's rule:
Welch's comparison of the two arms of seeds, every such row of this table one Holm family, and
equivalence within ±5 % of the metric's range from the base model to its ceiling, the real images
through the VAE (±5 % of the schedule for step counts); an arm with fewer than 2 seeds is never decided. Exact
quantities (parameter counts) and properties with a float-error bound (hyperspherical energy)
are decided by the comparison or the bound itself.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from omegaconf import DictConfig

from orthodiff.eval.control_metrics import headline_metric
from orthodiff.models.base import load_base_model
from orthodiff.models.tiny_sd import TINY_SD_PATH
from orthodiff.reproduce import ablation, controllable, convergence, energy, frontier, length, paper, subject
from orthodiff.reproduce.cells import method_setting, run_cell
from orthodiff.reproduce.params import PAPER_TOTALS_M, parameter_table
from orthodiff.reproduce.report import (
    coft_note,
    control_settings,
    final_figure,
    finite_mean,
    higher_is_better,
    mean_std,
    write_report,
)
from orthodiff.reproduce.stats import (
    CANNOT,
    EQUIVALENT,
    FAILS,
    HOLDS,
    VERDICTS,
    Comparison,
    compare,
    decide,
    equivalence_margin,
    format_difference,
    holm,
)

ENERGY_KEPT = 1e-6  # |ΔHE|/HE below this is float error (float32 weights; rotations keep every angle)
ENERGY_CHANGERS = ("lora", "full")  # the methods the paper says change the energy


def not_run(table: str, missing: list[str] = ()) -> tuple[str, str]:
    if missing:
        return CANNOT, f"not run: add {', '.join(missing)} to methods (python reproduce.py table={table})"
    return CANNOT, f"not run (python reproduce.py table={table})"


def row(claim: str, paper_figure: str, ours: str, verdict: tuple[str, str] | Comparison, table: str,
        digits: int = 3) -> dict:
    """A claim's row. verdict: (label, reason), or a Comparison, which stays in the verdict column
    until decided() decides it with the table's other comparisons (one Holm family)."""
    columns = {"claim": claim, "paper": paper_figure, "ours": ours, "difference": "", "n": "", "p": "", "holm p": ""}
    if isinstance(verdict, Comparison):
        columns.update({"difference": format_difference(verdict, digits), "n": f"{verdict.n_ours}/{verdict.n_theirs}",
                        "p": verdict.p})
        verdict = (verdict, "")
    return {**columns, "verdict": verdict[0], "reason": verdict[1], "from": f"table={table}"}


def decided(rows: list[dict]) -> list[dict]:
    """The rows with every Comparison decided, the whole table one family for Holm."""
    compared = [r for r in rows if isinstance(r["verdict"], Comparison)]
    comparisons = [r["verdict"] for r in compared]
    for r, (label, reason), p in zip(compared, decide(comparisons), holm([c.p for c in comparisons])):
        r.update({"holm p": p, "verdict": label, "reason": reason})
    return rows


class Cells:
    """The finished cells of the other tables (never trains): lookups by run_cell's arguments."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def get(self, args: tuple) -> dict | None:
        return run_cell(self.cfg, *args, cached_only=True)

    def seeds(self, method: str, control: str) -> list[dict] | None:
        """A method's controllable cells over every seed; None if any is missing."""
        runs = [self.get((method, control, s)) for s in self.cfg.seeds]
        return None if any(r is None for r in runs) else runs


def metric_margin(cfg: DictConfig, cells: Cells, control: str) -> float | None:
    """The equivalence margin of a control's headline figure (controllable.equivalence_margin_of,
    on cfg.methods[0]'s cells: their step 0 is the base model); None while they are missing."""
    runs = [r for s in cfg.seeds if (r := cells.get((cfg.methods[0], control, s)))]
    return controllable.equivalence_margin_of(cfg, runs, headline_metric(control)) if runs else None


def consistency_rows(cfg: DictConfig, cells: Cells) -> list[dict]:
    rows = []
    for control in cfg.controls:
        key, higher = headline_metric(control), higher_is_better(control)
        published = paper.TABLE2.get(control, {})
        margin = metric_margin(cfg, cells, control)
        base = [cells.get((cfg.methods[0], control, s)) for s in cfg.seeds]
        for ours in cfg.claims.ours:
            claim = f"{ours} controls {control} better than the base model without control ({key})"
            figure = (f"{paper.TABLE2_METRIC[control]}: {ours} {published[ours]} vs SD {published['sd']}"
                      if ours in published else f"no figure for {control}")
            a = cells.seeds(ours, control)
            if ours not in cfg.methods or a is None or None in base:
                rows.append(row(claim, figure, "", not_run("controllable", [ours] if ours not in cfg.methods else []),
                                "controllable"))
            else:
                a, b = [final_figure(r, key) for r in a], [r.get("step0", {}).get(key, math.nan) for r in base]
                rows.append(row(claim, figure, f"{ours} {mean_std(a)} vs {controllable.base_label(cfg)} {mean_std(b)}",
                                compare(a, b, higher, margin), "controllable"))
            for baseline in cfg.claims.baselines:
                claim = f"{ours} beats {baseline} on {control} control ({key})"
                figure = (f"{paper.TABLE2_METRIC[control]}: {ours} {published[ours]} vs {baseline} {published[baseline]}"
                          if ours in published and baseline in published else f"no figure for {control}")
                missing = [m for m in (ours, baseline) if m not in cfg.methods]
                a, b = cells.seeds(ours, control), cells.seeds(baseline, control)
                if missing or a is None or b is None:
                    rows.append(row(claim, figure, "", not_run("controllable", missing), "controllable"))
                    continue
                a, b = [final_figure(r, key) for r in a], [final_figure(r, key) for r in b]
                rows.append(row(claim, figure, f"{ours} {mean_std(a)} vs {baseline} {mean_std(b)}",
                                compare(a, b, higher, margin), "controllable"))
    return rows


def factor_arms(cfg: DictConfig, cells: Cells, ours: str, baseline: str) -> dict[str, tuple[str, list, str, list]]:
    """Where the miniature differs from SD 1.5, set as the paper's: the two arms of "ours beats
    baseline" on the first control under each factor that applies to the pair, as
    (ours' row, its runs, baseline's row, its runs) from the cells of table=radius, frontier and
    length (a factor whose cells are missing is left out):
        radius          COFT at the scale-matched eps (radius.matched) instead of the paper's
        parameters      OFT and LoRA at the frontier's (r, rank) nearest the paper's parameter ratio
        length          both run to length.steps (table=length)
        scale-matched   radius and parameters together (each where it applies)"""
    control = cfg.controls[0]

    def seeds_of(method: str, extra=(), tag: str = "") -> list[dict] | None:
        found = [cells.get((method, control, s, list(extra), tag)) for s in cfg.seeds]
        return None if None in found else found

    def frontier_row(row: str) -> list[dict] | None:
        return seeds_of(*frontier.arms(cfg)[row])

    ours_runs, base_runs = seeds_of(ours), seeds_of(baseline)
    arms = {}
    if ours == cfg.radius.method and base_runs and (matched := seeds_of(cfg.radius.matched)):
        arms["radius"] = (cfg.radius.matched, matched, baseline, base_runs)
    if baseline == "lora" and ours in ("oft", cfg.radius.method):
        # COFT has OFT's parameters at the same r: its pair is OFT-as-configured's, with COFT's own runs.
        own = f"oft_r{method_setting('oft', 'num_blocks')}"
        wanted = [row for row in frontier.arms(cfg)
                  if row.startswith("lora_r") or row == own or (ours == "oft" and row.startswith("oft_r"))]
        counts = {row: frontier.parameters(runs[0])[0] for row in wanted if (runs := frontier_row(row))}
        if any(r.startswith("oft_r") for r in counts) and any(r.startswith("lora_r") for r in counts):
            oft_row, lora_row = frontier.nearest_pair(counts, cfg.frontier.paper_ratio)
            a_row, a = (oft_row, frontier_row(oft_row)) if ours == "oft" else (ours, ours_runs)
            if a:
                arms["parameters"] = (a_row, a, lora_row, frontier_row(lora_row))
    if ours in cfg.length.methods and baseline in cfg.length.methods:
        a, b = ([length.length_cell(cfg, *c, cached_only=True) for c in length.cells(cfg) if c[0] == m]
                for m in (ours, baseline))
        if None not in a + b:
            arms["length"] = (ours, a, baseline, b)
    if "radius" in arms or "parameters" in arms:
        a_row, a = arms["radius"][:2] if "radius" in arms else (ours, ours_runs)
        if "parameters" in arms and ours == "oft":
            a_row, a = arms["parameters"][:2]
        b_row, b = arms["parameters"][2:] if "parameters" in arms else (baseline, base_runs)
        if a and b:
            arms["scale-matched"] = (a_row, a, b_row, b)
    return arms


FACTORS = ("radius", "parameters", "length", "scale-matched")


def second_edition(cfg: DictConfig, cells: Cells, rows: list[dict]) -> list[dict]:
    """The first control's "ours beats baseline" rows with a verdict under each factor
    (factor_arms; each factor's comparisons one Holm family) and 'what moves it': the factors
    whose verdict differs from the default miniature's."""
    control = cfg.controls[0]
    key, higher = headline_metric(control), higher_is_better(control)
    margin = metric_margin(cfg, cells, control)
    pairs = [(r, o, b) for r in rows for o in cfg.claims.ours for b in cfg.claims.baselines
             if r["claim"] == f"{o} beats {b} on {control} control ({key})"]
    found = {id(r): factor_arms(cfg, cells, o, b) for r, o, b in pairs}
    for factor in FACTORS:
        decided_here = [(r, found[id(r)][factor]) for r, _, _ in pairs if factor in found[id(r)]]
        comparisons = [compare([final_figure(x, key) for x in a], [final_figure(x, key) for x in b], higher, margin)
                       for _, (_, a, _, b) in decided_here]
        for (r, (a_row, _, b_row, _)), c, (label, _) in zip(decided_here, comparisons, decide(comparisons)):
            r[factor] = f"{label}: {a_row} vs {b_row}, {format_difference(c)}"
    for r, _, _ in pairs:
        moved = [f for f in FACTORS[:3] if f in r and r[f].split(":")[0] != r["verdict"]]
        r["what moves it"] = ", ".join(moved) if moved else ("none of these" if any(f in r for f in FACTORS) else
                                                            "not run (table=radius, frontier, length)")
    return rows


def convergence_rows(cfg: DictConfig, cells: Cells) -> list[dict]:
    """Steps to reach each of convergence.FRACTIONS of the best final score (50 % shows who
    starts faster, 80 % who gets there); a seed that never reaches a level counts as one
    validation past its last step (a lower bound). Equivalent: within 5 % of the schedule's steps."""
    found = {(m, s): cells.get((m, c, s)) for m, c, s in convergence.cells(cfg)}
    claims = [(fraction, ours, baseline) for fraction in convergence.FRACTIONS for ours in cfg.claims.ours
              for baseline in cfg.claims.baselines]
    text = [f"{ours} reaches {fraction:.0%} of the best final score in fewer steps than {baseline}"
            for fraction, ours, baseline in claims]
    if any(run is None for run in found.values()) or any(m not in cfg.methods for c in claims for m in c[1:]):
        return [row(t, paper.CONVERGENCE, "", not_run("convergence", [m for m in c[1:] if m not in cfg.methods]),
                    "convergence") for t, c in zip(text, claims)]
    reached = convergence.reach(cfg, found)
    limit = cfg.schedule.steps + cfg.schedule.val_every
    margin = equivalence_margin(0, cfg.schedule.steps)
    rows = []
    for claim, (fraction, ours, baseline) in zip(text, claims):
        if reached is None:
            rows.append(row(claim, paper.CONVERGENCE, "", (CANNOT, "no method beat the base model"), "convergence"))
            continue
        a, b = ([limit if v is None else v for v in reached[m][fraction]] for m in (ours, baseline))
        never = {m: reached[m][fraction].count(None) for m in (ours, baseline)}
        ours_text = (f"steps: {ours} {mean_std(a, digits=0)} vs {baseline} {mean_std(b, digits=0)}"
                     + "".join(f"; {m}: {n} seed(s) never reached it (counted as {limit})" for m, n in never.items() if n))
        if all(never.values()) and set(a) == set(b) == {limit}:  # censored alike: the runs end before either gets there
            rows.append(row(claim, paper.CONVERGENCE, ours_text, (CANNOT, "no seed of either reached it within the run"),
                            "convergence"))
            continue
        rows.append(row(claim, paper.CONVERGENCE, ours_text, compare(a, b, False, margin), "convergence", digits=0))
    return rows


def parameter_rows(cfg: DictConfig) -> list[dict]:
    """Counts at SD 1.5 scale (computed on the meta device, not trained): OFT r=4 + encoder."""
    counts = {r.name: r.count for r in parameter_table()}
    ours = counts["oft_r4+encoder"]
    rows = []
    for name, label in (("controlnet", "ControlNet"), ("t2i_adapter_full", "T2I-Adapter")):
        verdict = (HOLDS if ours < counts[name] else FAILS, f"exact counts, no spread: {ours / counts[name]:.1%} of it")
        rows.append(row(f"OFT (r=4) + encoder trains a fraction of {label}'s parameters",
                        f"OFT r=4 {PAPER_TOTALS_M[4]} M incl. encoder", f"{ours / 1e6:.2f} M vs {counts[name] / 1e6:.2f} M "
                        "(SD 1.5)", verdict, "params"))
    return rows


def energy_rows(cfg: DictConfig, cells: Cells) -> list[dict]:
    keepers, changers = list(cfg.claims.ours), list(ENERGY_CHANGERS)
    runs = {m: cells.get(c) for m, c in zip(cfg.methods, energy.cells(cfg)) if m in keepers + changers}
    found = energy.energy_by_method({m: r for m, r in runs.items() if r is not None})
    rows = []
    for method in keepers + changers:
        keeps = method in keepers
        claim = f"{method} {'keeps' if keeps else 'changes'} the hyperspherical energy of the layers it adapts"
        result = found.get(method, {})
        figure = result.get("max |ΔHE|/HE" if keeps else "mean |ΔHE|/HE")
        if method not in cfg.methods or runs.get(method) is None:
            verdict = not_run("energy", [method] if method not in cfg.methods else [])
        elif not isinstance(figure, float):
            verdict = (CANNOT, f"no figure ({result.get('mean |ΔHE|/HE', 'n/a')})")
        else:
            held = figure < ENERGY_KEPT if keeps else figure > ENERGY_KEPT
            verdict = (HOLDS if held else FAILS, f"{'max' if keeps else 'mean'} |ΔHE|/HE {figure:.2g} "
                       f"{'<' if figure < ENERGY_KEPT else '>='} {ENERGY_KEPT:g} (float error), seed {cfg.seeds[0]}")
        ours = "" if not isinstance(figure, float) else f"{'max' if keeps else 'mean'} |ΔHE|/HE = {figure:.2g}"
        rows.append(row(claim, paper.ENERGY, ours, verdict, "energy"))
    return rows


def largest_fall(run: dict, key: str, higher: bool) -> float:
    """The largest fall from the run's best validation so far to a later one, the final
    figure included (0: it never fell back). A dip mid-run counts, not only a fall at the end."""
    values = [h[key] for h in run.get("history", []) if key in h] + [final_figure(run, key)]
    if any(math.isnan(v) for v in values):
        return math.nan
    signed = values if higher else [-v for v in values]
    return max(best - v for best, v in zip(itertools.accumulate(signed, max), signed))


def stability_rows(cfg: DictConfig, cells: Cells) -> list[dict]:
    control = cfg.controls[0]
    key, higher = headline_metric(control), higher_is_better(control)
    margin = metric_margin(cfg, cells, control)  # a fall is in the figure's own units
    rows = []
    for constrained in cfg.claims.stability:
        claim = (f"{constrained} is more stable than oft on {control}: a smaller largest fall from its best "
                 "validation so far to a later one")
        missing = [m for m in (constrained, "oft") if m not in cfg.methods]
        a, b = cells.seeds(constrained, control), cells.seeds("oft", control)
        if missing or a is None or b is None:
            rows.append(row(claim, paper.STABILITY, "", not_run("convergence", missing), "convergence"))
            continue
        a, b = [largest_fall(r, key, higher) for r in a], [largest_fall(r, key, higher) for r in b]
        rows.append(row(claim, paper.STABILITY, f"fall: {constrained} {mean_std(a)} vs oft {mean_std(b)}",
                        compare(a, b, False, margin), "convergence"))
    return rows


def r_rows(cfg: DictConfig, cells: Cells) -> list[dict]:
    """The smallest against the largest r of the ablation (a one-seed row: cannot tell)."""
    control, method = cfg.controls[0], cfg.ablation.method
    key, higher = headline_metric(control), higher_is_better(control)
    figure = "seg mIoU falls as r grows: " + ", ".join(f"r={r} {v}" for r, v in paper.R_ABLATION_MIOU.items())
    wanted = [v for v in ablation.variants(cfg) if v["name"] == "default" or v["name"] in {f"r{r}" for r in
                                                                                        cfg.ablation.num_blocks}]
    found = {v["name"]: [cells.get(c) for c in ablation.cells(cfg, v)] for v in wanted}
    if any(r is None for runs in found.values() for r in runs):
        return [row(f"{method}: smaller r (fewer, larger blocks) controls better on {control}", figure, "",
                    not_run("ablation"), "ablation")]
    by_r = {int(ablation.run_config(runs[0])["r"]): [final_figure(r, key) for r in runs] for runs in found.values()}
    low, high = min(by_r), max(by_r)
    claim = f"{method}: r={low} controls better than r={high} on {control} ({key})"
    ours = ", ".join(f"r={r} {mean_std(by_r[r])}" for r in sorted(by_r))
    return [row(claim, figure, ours, compare(by_r[low], by_r[high], higher, metric_margin(cfg, cells, control)),
                "ablation")]


# The paper's DreamBooth claims (its subject-driven table: DINO / CLIP-I, CLIP-T), in our scorer's terms.
SUBJECT_CLAIMS = (("subject_fidelity", "keeps the subject better than", "higher subject fidelity (DINO, CLIP-I)"),
                  ("prompt_fidelity", "follows the prompt at least as well as", "comparable prompt fidelity (CLIP-T)"),
                  ("no_token_kind", "forgets less than", "less forgetting of the class (qualitative)"))


def subject_rows(cfg: DictConfig) -> list[dict]:
    """OFT and COFT against DreamBooth-style full finetuning and LoRA on table=subject's cells: every
    (subject, seed) run is one sample of its arm. Forgetting compares the no-token kind recognition
    each run keeps (the base model's is the same for both arms). Equivalence margins: 5 % of the
    range from the base model to the ideal images through the VAE (subject fidelity; none off the
    embedded default) or to 1."""
    methods = cfg.subject.methods
    base_runs = subject.seed_runs(cfg, methods[0])
    base = {key: finite_mean([r["step0"].get(key, math.nan) for r in base_runs]) for key, *_ in SUBJECT_CLAIMS} \
        if base_runs else {}
    embedded = subject.on_embedded_default(cfg)
    ceilings = {}  # computed once, when a row needs it

    def margin(key: str) -> float | None:
        if key != "subject_fidelity":
            return equivalence_margin(base[key], 1.0)
        if not embedded:
            return None  # another model or data: the tiny VAE's ceiling is not theirs
        if key not in ceilings:
            ceilings[key] = subject_ceiling_of(cfg)
        return equivalence_margin(base[key], ceilings[key])

    rows = []
    for ours in cfg.claims.ours:
        for baseline in cfg.claims.subject_baselines:
            missing = [m for m in (ours, baseline) if m not in methods]
            arms = None if missing else (subject.seed_runs(cfg, ours), subject.seed_runs(cfg, baseline))
            for key, verb, figure in SUBJECT_CLAIMS:
                claim = f"{ours} {verb} {baseline} in subject-driven generation ({key})"
                if arms is None or None in arms or not base:
                    rows.append(row(claim, f"the paper: {figure}", "", not_run("subject", missing), "subject"))
                    continue
                a, b = ([r["final"].get(key, math.nan) for r in runs] for runs in arms)
                rows.append(row(claim, f"the paper: {figure}", f"{ours} {mean_std(a)} vs {baseline} {mean_std(b)}",
                                compare(a, b, True, margin(key)), "subject"))
    return rows


def subject_ceiling_of(cfg: DictConfig) -> float:
    """The mean subject fidelity of ideal answers through the tiny VAE over table=subject's subjects."""
    vae = load_base_model(str(TINY_SD_PATH)).vae.eval()
    return finite_mean([subject.subject_ceiling(s, vae)["ideal images through the VAE"]["subject_fidelity"]
                        for s in cfg.subject.subjects])


def table(cfg: DictConfig) -> Path:
    cells = Cells(cfg)
    rows = second_edition(cfg, cells, decided([*consistency_rows(cfg, cells), *convergence_rows(cfg, cells),
                                                *parameter_rows(cfg), *energy_rows(cfg, cells),
                                                *stability_rows(cfg, cells), *r_rows(cfg, cells),
                                                *subject_rows(cfg)]))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    notes = [f"Verdicts: {counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[EQUIVALENT]} equivalent, "
             f"{counts[CANNOT]} cannot tell.",
             "Rule (a claim that one method's figure beats another's over seeds): Welch's two-sample comparison, "
             "'difference' = mean ours - mean theirs with its 95 % CI; the p-values of every such row of this table "
             "are one family, Holm-adjusted ('holm p'). Adjusted p < 0.05: holds if ours is the better one, does "
             "not hold if worse. Otherwise equivalent when a TOST (Holm-adjusted likewise) puts |difference| within "
             "±5 % of the metric's range from the base model (step 0 of "
             f"{cfg.methods[0]}) to the real validation images through the VAE (a fall in stability rows too), or within "
             f"±5 % of the schedule ({cfg.schedule.steps} steps) for step counts; else cannot tell. Diverged seeds "
             "are dropped; an arm with fewer than 2 seeds is never decided. Two arms with every seed equal (steps "
             "on the validation grid) are decided by their means: p = 0 if they differ; both never reaching a "
             "level within the run: cannot tell. Parameter counts are exact "
             f"(no spread); hyperspherical energy is kept when |ΔHE|/HE < {ENERGY_KEPT:g} (float error).",
             "Built from the cells of table=controllable, convergence, energy, ablation and subject (and the params "
             "computation); nothing is trained here. 'not run' names the table that trains the missing cells.",
             f"Second edition ({cfg.controls[0]}'s 'ours beats baseline' rows): the verdict again where the miniature "
             "is set as SD 1.5 is, one factor at a time: radius (COFT at the scale-matched eps, "
             f"{cfg.radius.matched}, paper convention; table=radius), parameters (OFT and LoRA at the (r, rank) of "
             f"table=frontier nearest the paper's {cfg.frontier.paper_ratio:g}x parameter ratio), length (both run "
             f"to {cfg.length.steps} steps; table=length), and scale-matched (radius and parameters together). Each "
             "factor's comparisons are one Holm family. 'what moves it' names the factors whose verdict differs "
             "from the default's. The encoder's lr is no factor here: every row, default included, trains the hint "
             "encoder at its own module.hint_lr (table=lr_search).",
             "Subject rows (table=subject's cells): each (subject, seed) run is one sample of its arm; margins are 5 % "
             "of the range from the base model to the ideal images through the VAE (subject fidelity) or to 1 "
             "(prompt fidelity, no-token kind recognition, whose fall is forgetting).",
             "The paper's figures are SD 1.5 at full size; ours are the miniature's (tiny SD, shapes world), so the "
             "claims are compared in direction, not value.",
             *coft_note([run for m in cfg.methods if (run := cells.get((m, cfg.controls[0], cfg.seeds[0])))])]
    return write_report(cfg, "claims", "The OFT paper's claims, tested on the miniature", rows, notes,
                        settings=control_settings(cfg))
