"""Rebuild a paper table from runs: `python reproduce.py table=<name>` (conf/reproduce.yaml)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

HERE = Path(__file__).resolve().parent


@hydra.main(version_base="1.3", config_path="conf", config_name="reproduce")
def main(cfg: DictConfig):
    from orthodiff.reproduce import reproduce
    from orthodiff.warm import ROOT

    if ROOT != HERE:  # a grid run from a frozen worktree would train another checkout's code
        raise SystemExit(f"reproduce.py: this is {HERE}, but `import orthodiff` finds {ROOT / 'src'} (an editable "
                         f"install of another checkout), whose code its cells would train; run it as "
                         f"PYTHONPATH={HERE / 'src'} python reproduce.py ...")
    try:
        paths = reproduce(cfg)
    except ValueError as error:  # an unknown table: the list of valid ones
        raise SystemExit(f"reproduce.py: {error}") from None
    if paths:  # none under plan=true, which prints its plan instead
        print("reports: " + " ".join(map(str, paths)))


if __name__ == "__main__":
    main()
