"""Rebuild a paper table from runs: `python reproduce.py table=<name>` (conf/reproduce.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="reproduce")
def main(cfg: DictConfig):
    from orthodiff.reproduce import reproduce

    try:
        paths = reproduce(cfg)
    except ValueError as error:  # an unknown table: the list of valid ones
        raise SystemExit(f"reproduce.py: {error}") from None
    print("reports: " + " ".join(map(str, paths)))


if __name__ == "__main__":
    main()
