"""Inference: DDIM sampling for training/validation (sampling.py) and the diffusers
pipeline that carries an orthodiff adapter (pipeline.py)."""

__all__ = ["OrthodiffPipeline", "load_condition"]


def __getattr__(name):
    # Lazy: models/ imports sampling.py from here, and pipeline.py imports models/.
    if name in __all__:
        from orthodiff.pipelines import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'orthodiff.pipelines' has no attribute {name!r}")
