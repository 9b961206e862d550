"""Evaluation entry (called by eval.py). Not implemented yet: lands with issue 5."""

from omegaconf import DictConfig


def evaluate(cfg: DictConfig) -> dict:
    raise SystemExit("eval.py: evaluation is not implemented yet (see README, 'Status').")
