"""Evaluate a trained detector on one or several test sets: frame/video AUC, EER, AP, ACC with bootstrap
95% intervals, a ROC plot, ``results.json`` and ``results.md``.

    python recipes/evaluate_detector.py --adapter outputs/demo/adapter --config recipes/configs/demo.yaml
    python recipes/evaluate_detector.py --adapter my-org/clip-masm \\
        --test celebdf-v2=deepfakebench:/data/Celeb-DF-v2.json --label_dict /data/label_dict.json \\
        --test mine=folder:/data/my_faces --output_dir outputs/eval

A test is ``[NAME=]KIND:PATH`` with KIND ``deepfakebench`` (JSON), ``folder`` (``real/`` + ``fake/``)
or ``manifest`` (CSV/JSONL), or just a PATH (kind guessed from it). ``--config`` adds the config's
``test_sets`` (and, for ``data: synthetic``, the benchmark's held-out identity/family sets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_masm.recipe.config import ConfigError, TestSetConfig, load_config

KINDS = ("deepfakebench", "folder", "manifest")


def parse_test(spec: str, args: argparse.Namespace) -> TestSetConfig:
    """``[NAME=]KIND:PATH`` or ``PATH`` -> :class:`TestSetConfig`."""
    name = None
    if "=" in spec.split(":", 1)[0]:
        name, spec = spec.split("=", 1)
    kind, path = spec.split(":", 1) if spec.split(":", 1)[0] in KINDS else (None, spec)
    p = Path(path)
    if kind is None:
        kind = (
            "folder"
            if p.is_dir()
            else "deepfakebench"
            if p.suffix == ".json"
            else "manifest"
            if p.suffix in (".csv", ".jsonl", ".ndjson")
            else None
        )
        if kind is None:
            raise ConfigError(
                f"--test {spec}: cannot tell the kind; write KIND:PATH with KIND one of {list(KINDS)}."
            )
    if not p.exists():
        raise ConfigError(f"--test {spec}: {p} does not exist.")
    return TestSetConfig(
        name=name or p.stem or p.name,
        kind=kind,
        path=str(p),
        split=args.split,
        label_dict=args.label_dict,
        compression=args.compression,
        dataset_name=args.dataset_name,
        frames_per_video=args.frames_per_video,
    )


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpWithDefaults)
    parser.add_argument("--adapter", required=True, help="adapter folder or Hub id")
    parser.add_argument(
        "--base_model",
        default=None,
        help="the backbone the adapter was trained on (Hub id, folder or offline alias); default: the one its "
        "adapter_config.json names",
    )
    parser.add_argument(
        "--config", help="a training config: its test_sets (and synthetic benchmark) are used"
    )
    parser.add_argument("--test", action="append", default=[], help="[NAME=]KIND:PATH (repeatable)")
    parser.add_argument("--output_dir", default=None, help="default: <adapter>/../eval or outputs/eval")
    parser.add_argument(
        "--split", default="test", help="split inside DeepfakeBench JSONs / manifests / folders"
    )
    parser.add_argument("--label_dict", default=None, help="label name -> 0/1 file for DeepfakeBench JSONs")
    parser.add_argument(
        "--compression", default="c23", help="FaceForensics++ compression level (c23, c40, raw)"
    )
    parser.add_argument("--dataset_name", default=None, help="dataset key inside a DeepfakeBench JSON")
    parser.add_argument("--frames_per_video", type=int, default=8, help="evenly spaced frames per video")
    parser.add_argument(
        "--face_detector",
        choices=["none", "auto", "mtcnn", "lbp"],
        default="none",
        help="crop faces of the test images first (DeepfakeBench frames are already cropped)",
    )
    parser.add_argument(
        "--n_bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    parser.add_argument("--batch_size", type=int, default=32, help="scoring batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args = parser.parse_args(argv)

    from peft_masm import BaseModelMismatchError
    from peft_masm.data import DataError
    from peft_masm.detector import BackboneNotAvailableError, BaseModelNotRecordedError
    from peft_masm.hub import AdapterNotAvailableError

    try:
        tests = [parse_test(s, args) for s in args.test]
        cfg = load_config(args.config, []) if args.config else None
        if not tests and cfg is None:
            raise ConfigError(
                "nothing to evaluate: pass --test [NAME=]KIND:PATH (repeatable) and/or --config."
            )
        from peft_masm.detector import MASMDetector

        detector = MASMDetector.from_pretrained(args.adapter, base_model=args.base_model)
        model, processor = detector.model, detector.image_processor
        from peft_masm.recipe.data import build_data, load_test_set

        sets, subsets = {}, {}
        if cfg is not None:
            built = build_data(cfg, processor)
            sets.update(built.tests)
            subsets.update(built.test_subsets)
        # The face crop the detector was trained on, from its saved detector_config.json.
        cropper = None if args.face_detector == "none" else detector.face_cropper(args.face_detector)
        for t in tests:
            sets[t.name] = load_test_set(t, processor, cropper)
        if not sets:
            raise ConfigError("the config defines no test sets; pass --test.")
        out = (
            Path(args.output_dir)
            if args.output_dir
            else (Path(args.adapter).parent / "eval" if Path(args.adapter).is_dir() else Path("outputs/eval"))
        )
        from peft_masm.evaluation import score_sets

        score_sets(model, sets, out, args.batch_size, args.n_bootstrap, args.seed, subsets=subsets)
    except (
        ConfigError,
        DataError,
        AdapterNotAvailableError,
        BackboneNotAvailableError,
        BaseModelNotRecordedError,
        BaseModelMismatchError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {out / 'results.json'}, {out / 'results.md'}; ROC plot: {out / 'roc.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
