"""Score a trained adapter: `python eval.py ckpt=...` (see README for status)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig):
    from orthodiff.evaluate import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main()
