"""Training entry (called by train.py).

Controllable-generation training (Lightning module, control encoder, datamodules)
is not implemented yet: it needs the embedded tiny Stable Diffusion (issue 3) and
lands with issue 4. Until then this exits with a clear message instead of
pretending to train.
"""

from hydra.utils import instantiate
from omegaconf import DictConfig


def train(cfg: DictConfig) -> float:
    adapter = instantiate(cfg.adapter)  # validates the adapter config now
    raise SystemExit(
        f"train.py: the training pipeline is not implemented yet (adapter config OK: {adapter}).\n"
        "Today's runnable demonstration is the OFT benchmark: python benchmarks/bench_oft.py --quick"
    )
