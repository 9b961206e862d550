"""Edit one attribute with a frozen model by a learned per-step mix of two prompts
(Wu et al., CVPR 2023):
`python edit.py prompt="a red circle on a black background" attribute="a red circle on a white background"
[seed=0 out= budget=adaptive iterations= lr=0.05 steps=50 guidance=7.5 base= adapter= clip_model= perceptual=]`
learns the schedule (budget=adaptive: from the best of the paper's init and the hard switches,
until the edit passes or `iterations` Adam steps, 40 unless given; budget=paper: the paper's
10 steps from its init); `schedule=<schedule.safetensors>` applies a learned one to another
seed; `image=<png>` edits a real image through inversion."""

import logging
import sys


def main(argv: list[str]):
    from orthodiff.app.cli import parse_args

    logging.basicConfig(level=logging.INFO, format="edit.py: %(levelname)s: %(message)s")
    from orthodiff.editing.run import EditConfig, edit
    from orthodiff.app.preflight import check_edit

    cfg = parse_args(EditConfig, argv, "edit.py")
    try:
        check_edit(cfg)  # the models and weights it names, before any of them loads
        return edit(cfg)
    except (FileNotFoundError, ValueError) as error:  # bad input: the message, not a traceback
        raise SystemExit(f"edit.py: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
