"""orthodiff: orthogonal finetuning for controllable and personalized diffusion."""

__version__ = "0.1.0"
