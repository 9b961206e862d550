"""Train an adapter: `python train.py experiment=canny` (see README for status)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from orthodiff.app.train import train

    return train(cfg)


if __name__ == "__main__":
    main()
