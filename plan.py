"""Will a training run fit? `python plan.py experiment=<name> [method=...] [data.batch_size=...]
[model.resolution=...] [model.gradient_checkpointing=true] [trainer.precision=...]` (src/orthodiff/app/plan.py)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from orthodiff.app.plan import plan

    try:
        print(plan(cfg).text())
    except ValueError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
