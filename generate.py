"""Generate with a trained adapter:
`python generate.py adapter=<adapter.safetensors | run dir> condition=<image> prompt="..."
[num_images=4 steps= guidance= seed=0 scheduler=ddim annotate=auto base= out=]`; a subject
adapter (experiment=dreambooth) takes no condition: `prompt="a sks square on a black background"`.
Several control adapters compose: `adapter=[A,B] condition=[a.png,b.png] [scales=[1.0,1.0] compose=product|mean]`."""

import logging
import sys


def main(argv: list[str]):
    from orthodiff.app.cli import parse_args

    logging.basicConfig(level=logging.INFO, format="generate.py: %(levelname)s: %(message)s")
    from orthodiff.app.generate import GenerateConfig, generate

    cfg = parse_args(GenerateConfig, argv, "generate.py")
    try:
        return generate(cfg)
    except (FileNotFoundError, ValueError) as error:  # bad input: the message, not a traceback
        raise SystemExit(f"generate.py: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
