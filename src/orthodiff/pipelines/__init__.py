"""Inference in diffusers: the pipeline that carries an orthodiff adapter (pipeline.py) and
the diffusers -> original SD single-file layout (single_file.py)."""

from orthodiff.pipelines.pipeline import OrthodiffPipeline, load_condition

__all__ = ["OrthodiffPipeline", "load_condition"]
