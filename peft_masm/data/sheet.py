"""``python -m peft_masm.data.sheet``: draw real faces beside each forgery family's fake, mask and difference."""

from __future__ import annotations

import argparse

import numpy as np

from .corpus import SOURCES, build_real_face_corpus
from .forgeries import FAMILIES, FAMILY_GROUPS, draw_sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peft_masm.data.sheet", description=__doc__)
    parser.add_argument("--out", default="forgery_sheet.png", help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the face and forgery draws")
    parser.add_argument("--faces", type=int, default=3, help="number of real faces (from the corpus)")
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        choices=list(FAMILIES),
        metavar="FAMILY",
        help="forgery families to draw (default: all): "
        + ", ".join(f"{f} ({g})" for f, g in FAMILY_GROUPS.items()),
    )
    parser.add_argument(
        "--sources",
        nargs="+",
        default=None,
        choices=list(SOURCES),
        metavar="SOURCE",
        help=f"corpus sources to draw faces from (default: the recipe's); any of {', '.join(SOURCES)}",
    )
    args = parser.parse_args(argv)
    corpus = build_real_face_corpus(sources=args.sources)
    picks = np.random.default_rng(args.seed).choice(
        len(corpus), size=min(args.faces, len(corpus)), replace=False
    )
    faces = [np.asarray(corpus[int(i)]["image"].convert("RGB")) for i in picks]
    print(draw_sheet(faces, args.out, seed=args.seed, families=args.families))


if __name__ == "__main__":
    main()
