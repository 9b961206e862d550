"""Disentangled attribute editing without finetuning (Wu et al., CVPR 2023): a frozen
text-to-image model samples from fixed noise while the text encoding of each step moves
from a neutral prompt to an attribute prompt, c_t = lambda_t c_neutral + (1 - lambda_t)
c_attribute; only the per-step lambdas are learned, through the whole sampling chain.

    sampler.py     DDIM + CFG with one text encoding per step, differentiable, checkpointed; inversion
    schedule.py    untrained schedules (hard switches, the paper's init) and the schedule file
    objectives.py  the losses and scores: shapes-world oracles, or CLIP directional + perceptual
    perceptual.py  VGG-16 / LPIPS distances from local weights
    editor.py      EditModel (base +- adapter) and Edit: render, learn (the paper's or the adaptive budget), invert
    run.py         edit.py's work: one edit, its baselines, the files
"""

from orthodiff.editing.editor import Edit, EditModel, Learned, load_edit_model
from orthodiff.editing.objectives import ClipObjective, ShapesObjective, build_objective, caption_changes
from orthodiff.editing.sampler import denoise, invert, mix
from orthodiff.editing.schedule import (
                                        check_schedule,
                                        default_switches,
                                        load_schedule,
                                        paper_schedule,
                                        save_schedule,
                                        switch_schedule,
)

__all__ = ["ClipObjective", "Edit", "EditModel", "Learned", "ShapesObjective", "build_objective", "caption_changes",
           "check_schedule", "default_switches", "denoise", "invert", "load_edit_model", "load_schedule", "mix",
           "paper_schedule", "save_schedule", "switch_schedule"]
