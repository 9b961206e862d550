"""Score a trained adapter: `python eval.py ckpt=<adapter.safetensors | run dir | .ckpt> [model=...] [data=...]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig):
    from orthodiff.data.datasets import TooManySkippedError
    from orthodiff.app.evaluate import evaluate

    try:
        return evaluate(cfg)
    except (FileNotFoundError, ValueError, TooManySkippedError) as error:  # bad input: the message, not a traceback
        raise SystemExit(f"eval.py: {error}") from None


if __name__ == "__main__":
    main()
