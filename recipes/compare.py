"""Which PEFT method generalises best on *your* data: train each on a recipe config and compare them, paired.

    python recipes/compare.py --config CONFIG.yaml --methods masm,lora,effort --seeds 3 --output_dir OUT
    accelerate launch recipes/compare.py --config CONFIG.yaml ...      # several GPUs: the same runs, sharded

A method is an experiment file, ``recipes/methods/<name>.yaml`` (or a path to one): adding a method is adding a
file. Each method's learning rate is chosen from its file's grid (or ``--learning_rates``) on the config's
validation split only; then each trains once per seed at that rate and the best-on-validation epoch scores every
test set of the config, once; the reference (``--reference``, default masm) trains again with other seeds (the
noise floor). Every other ``--key value`` overrides a field of the recipe config (``python recipes/train.py
--help`` lists them). Writes ``OUT/summary.json``, ``OUT/table.md`` and ``OUT/forest.png``; every finished run is
kept under ``OUT/runs/``, so running the same command again resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from peft_masm.recipe import methods
from peft_masm.recipe.compare import ComparePlan, run_comparison
from peft_masm.recipe.config import ConfigError, parse_args
from peft_masm.recipe.run import EXIT_INTERRUPTED, EXIT_USAGE, is_main_process, user_errors


def build_parser() -> argparse.ArgumentParser:
    """The comparison's own options; the rest of the command line is the recipe config's."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("--methods", default="masm,lora,effort",
                        help=f"comma-separated methods (files of recipes/methods/ or paths): {', '.join(methods.names())}")  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per method (the config's seed, seed + 1, ...)"
    )
    parser.add_argument("--reference", default="masm", help="the method the others are paired against")
    parser.add_argument("--learning_rates", default=None,
                        help="comma-separated learning rates for every method, or method=rate pairs for some "
                             "(masm=1e-3,lora_r8=3e-4); default: each method file's grid")  # fmt: skip
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def learning_rates(text: str) -> list[float] | dict[str, list[float]]:
    """``--learning_rates``: one grid (``1e-3,3e-3``) or rates per method (``masm=1e-3,lora_r8=3e-4``; a method
    named twice gets both rates as its grid)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        if not any("=" in x for x in items):
            return [float(x) for x in items]
        grids: dict[str, list[float]] = {}
        for name, rate in (x.split("=") for x in items):  # a name given twice: a grid of its rates
            grids.setdefault(name.strip(), []).append(float(rate))
        return grids
    except ValueError as err:
        raise ConfigError(
            f"--learning_rates takes comma-separated numbers or method=rate pairs, got {text!r}"
        ) from err


def plan_from(options: argparse.Namespace, default_learning_rate: float) -> ComparePlan:
    """The runs the options ask for; a bad option is a ``ConfigError`` naming it."""
    if options.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {options.seeds}")
    rates = learning_rates(options.learning_rates) if options.learning_rates else None
    names = [m.strip() for m in options.methods.split(",") if m.strip()]
    seed = options.seed
    return ComparePlan(
        names, options.reference, list(range(seed, seed + options.seeds)), rates, default_learning_rate
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, rest = build_parser().parse_known_args(argv)
    if options.help:
        build_parser().print_help()
        return 0
    if not any(arg == "--config" or arg.startswith("--config=") for arg in rest):
        print("error: --config is required (a recipe config: examples in recipes/configs/)", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = parse_args(rest)
        options.seed = cfg.seed
        plan = plan_from(options, cfg.learning_rate)
        summary = run_comparison(
            cfg, plan, cfg.output_dir, overwrite=cfg.overwrite_output_dir, n_bootstrap=cfg.n_bootstrap
        )
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if is_main_process():
            print(
                "interrupted; every finished run is kept: run the same command again to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if summary is not None:
        print(
            f"\n{open(cfg.output_dir + '/table.md').read()}\nwritten: {cfg.output_dir}/summary.json, table.md, forest.png"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
