"""The command line of the shapes world:

    python -m orthodiff.data.shapes --out data/shapes --n 20000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orthodiff.data.shapes.catalogue import BACKGROUNDS, COLORS, REFERENCE_SIZE, SHAPES
from orthodiff.data.shapes.writer import write_dataset


def _names(text: str) -> tuple:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orthodiff.data.shapes",
                                     description="Write the procedural shapes world to disk.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder")
    parser.add_argument("--n", type=int, required=True, help="number of train scenes")
    parser.add_argument("--n-val", type=int, help="default: n // 20, at least 200")
    parser.add_argument("--n-test", type=int, help="default: n // 20, at least 200")
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help="image side in pixels")
    parser.add_argument("--shapes", type=_names, default=SHAPES, help="comma-separated kinds")
    parser.add_argument("--colors", type=_names, default=tuple(COLORS), help="comma-separated")
    parser.add_argument("--backgrounds", type=_names, default=tuple(BACKGROUNDS),
                        help="comma-separated")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different shapes dataset in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        written = write_dataset(args.out, args.n, n_val=args.n_val, n_test=args.n_test,
                                size=args.size, shapes=args.shapes, colors=args.colors,
                                backgrounds=args.backgrounds, overwrite=args.overwrite,
                                progress=not args.no_progress)
    except ValueError as error:
        parser.error(str(error))
    if written:
        print(f"wrote the shapes world to {args.out}")
    else:
        print(f"{args.out} already holds this shapes dataset; nothing to do")
    return 0
