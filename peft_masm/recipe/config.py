"""Typed recipe configuration: :class:`TrainConfig`, read from a YAML file and the command line by transformers'
``HfArgumentParser``.

    cfg = parse_args(["--config", "recipes/configs/demo.yaml", "--learning_rate", "1e-4", "--masm.num_subspaces", "2"])

The YAML file's values become the parser's defaults and the command line overrides them. Every value, from
either, is checked against its field's type when the dataclass is built (``TrainConfig.__post_init__``), and the
``masm:`` / ``lora:`` section becomes its adapter config there, once (``TrainConfig.adapter``).

What :class:`RecipeArgumentParser` adds to ``HfArgumentParser``, and why it cannot do without:

- nested adapter fields, ``--masm.num_subspaces 2``: argparse has no nested options;
- every error is one :class:`ConfigError` line naming the key and, for an unknown key, the nearest valid one
  (``recipes/train.py`` exits with code 2): argparse prints its usage and exits by itself, and HfArgumentParser's
  ``parse_dict`` / ``parse_yaml_file`` neither check a value's type nor name the nearest key;
- values typed by their field, the same from YAML and the command line (argparse converts strings only):
  ``null`` for an optional field, lists as ``a,b`` or ``[a, b]``;
- ``--help`` names each field's type (a choice field's allowed values), default and help on its own lines.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

__all__ = [
    "ConfigError",
    "DetectorSettingError",
    "RecipeArgumentParser",
    "TestSetConfig",
    "TrainConfig",
    "adapter_config",
    "format_help",
    "from_dict",
    "load_config",
    "parse_args",
]


class ConfigError(ValueError):
    """A bad recipe configuration; the message names the key and the fix."""


class DetectorSettingError(ConfigError):
    """The backbone and adapter settings do not make a detector (e.g. ``K*k`` at or above a layer's rank, or a
    backbone without an image-classification architecture): found when the detector is built."""


@dataclass
class TestSetConfig:
    """One test set for evaluation (DeepfakeBench JSON, ``real/``+``fake/`` folder, or CSV/JSONL manifest)."""

    name: str
    kind: Literal["deepfakebench", "folder", "manifest"]
    path: str
    split: str | None = "test"
    label_dict: str | None = None
    compression: str | None = "c23"
    dataset_name: str | None = None
    data_root: str | None = None
    frames_per_video: int = 8


def _f(default: Any, help: str) -> Any:
    """A dataclass field with help text (``--help`` prints it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Fields that say where and how a run is written, not what it trains: they may change on resume.
BOOKKEEPING_FIELDS = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "stop_after_step", "checkpointing_steps",
        "checkpoints_total_limit", "logging_steps", "report_to", "plot_mask", "push_to_hub", "hub_model_id",
        "hub_private", "num_workers", "eval_batch_size", "n_bootstrap", "test_sets",
    }
)  # fmt: skip
# Fields whose change on resume is allowed with a warning (the run goes on, but not as it was planned).
RESUME_WARN_FIELDS = frozenset({"batch_size", "learning_rate", "head_learning_rate", "epochs"})
ADAPTER_SECTIONS = ("masm", "lora")


@dataclass
class TrainConfig:
    """Everything ``recipes/train.py`` needs; ``python recipes/train.py --help`` lists each field.

    Every value is checked against its field's type when the object is built, and the ``masm:`` (or ``lora:``)
    section becomes its adapter config object then, once: :attr:`adapter`.
    """

    _argument_group_name = "fields (set in the YAML file, or overridden as --key value)"  # HfArgumentParser

    # model
    backbone: str = _f("clip-vit-b16", "Hub id, local folder, or offline alias (clip-vit-b16, dinov2-s14).")
    method: Literal["masm", "lora"] = _f("masm", "The adapter: MASM, or a PEFT LoRA baseline.")
    masm: dict[str, Any] = _f(
        {}, "MASMConfig fields, used when method is masm; `preset: effort|paper` starts from a preset."
    )
    lora: dict[str, Any] = _f({}, "peft.LoraConfig fields, used when method is lora.")
    pooling: Literal["model", "pooler_output"] = _f(
        "model",
        "Head input: the transformers classifier's own ('model'; CLIP averages patch tokens) or the backbone's "
        "pooler_output (CLIP's layer-normed CLS token, as Effort's detector reads).",
    )
    image_size: int | None = _f(None, "Input size in pixels; null: the backbone processor's size.")
    # data
    data: Literal["synthetic", "deepfakebench", "folder", "manifest"] = _f(
        "synthetic",
        "Training data: the offline synthetic benchmark, a DeepfakeBench JSON, a folder or a manifest.",
    )
    train_path: str | None = _f(None, "DeepfakeBench JSON, real/+fake/ folder, or CSV/JSONL manifest.")
    label_dict: str | None = _f(None, "Label name -> 0/1 file for DeepfakeBench JSONs.")
    compression: str | None = _f("c23", "FaceForensics++ compression level (c23, c40, raw).")
    dataset_name: str | None = _f(None, "Dataset key inside a DeepfakeBench JSON (default: its only key).")
    data_root: str | None = _f(None, "Folder the frame paths are relative to (default: found from the JSON).")
    train_split: str | None = _f("train", "Split used for training.")
    val_split: str | None = _f("val", "Validation split; null: hold out val_fraction of the training videos.")
    val_fraction: float = _f(0.1, "Fraction of training videos (or faces) held out for validation.")
    frames_per_video: int = _f(8, "Evenly spaced frames taken from each video.")
    face_detector: Literal["none", "auto", "mtcnn", "lbp"] = _f("none", "Crop faces of loaded data first.")
    on_error: Literal["raise", "skip"] = _f(
        "raise", "Unreadable files: stop with an error, or skip and count."
    )
    max_train_samples: int | None = _f(None, "Use at most this many training samples.")
    # synthetic cross-forgery benchmark (data: synthetic)
    train_families: list[str] = _f(["sbi", "colour_swap", "gan_upsample"], "Forgery families trained on.")
    test_families: list[str] = _f(
        ["double_jpeg", "denoise_renoise", "spectral_peaks"], "Held-out forgery families (tested only)."
    )
    test_identities: list[str] = _f(
        ["carphone", "faceapi-s5", "astronaut"], "Held-out identities (tested only)."
    )
    face_size: int = _f(224, "Face crop size in pixels of the synthetic benchmark.")
    fakes_per_face: int = _f(1, "Fakes synthesised per real face and family.")
    include_lfw: bool = _f(True, "Include scikit-image's LFW subset in the real-face corpus.")
    face_sources: list[str] | None = _f(
        None,
        "Real-face sources of the synthetic benchmark (of carphone, faceapi, astronaut, lfw_subset, nba, solvay); "
        "null: the first four (include_lfw decides lfw_subset).",
    )
    test_fraction: float | None = _f(
        None,
        "Synthetic data: hold out this share of the faces' people as the test split, and val_fraction of them for "
        "validation (no person in two splits); null: test on test_identities, validate on held-out faces.",
    )
    carphone_frames: int = _f(24, "Frames taken from the carphone clip.")
    # test sets (evaluated with the best-on-validation adapter after training)
    test_sets: list[dict[str, Any]] = _f([], "Test sets: {name, kind, path, split, label_dict, ...} each.")
    n_bootstrap: int = _f(1000, "Bootstrap resamples for the 95% intervals of the test metrics.")
    # optimisation
    epochs: int = _f(10, "Training epochs.")
    batch_size: int = _f(32, "Per-process training batch size.")
    eval_batch_size: int = _f(64, "Batch size for validation and test scoring.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    optimizer: Literal["adam", "adamw"] = _f("adam", "Optimizer (Effort uses Adam).")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    head_learning_rate: float | None = _f(
        None,
        "Peak learning rate of the classification head while the backbone trains too; null: learning_rate. "
        "A run that trains only the head trains it at learning_rate.",
    )
    weight_decay: float = _f(5e-4, "Weight decay.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = _f(
        "cosine", "Learning-rate schedule after warm-up."
    )
    warmup_steps: int = _f(0, "Linear warm-up optimizer steps.")
    max_grad_norm: float | None = _f(None, "Clip the gradient norm to this value; null: no clipping.")
    on_non_finite: Literal["raise", "skip"] | None = _f(
        None,
        "NaN/inf gradients: stop with an error naming the step, or skip the step with a warning; null: the "
        "adapter's own setting (masm.on_non_finite, 'raise' by default; 'raise' for LoRA).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "accelerate mixed precision.")
    cpu: bool = _f(False, "Force the CPU (e.g. several CPU processes under `accelerate launch --multi_gpu`).")
    sampling: Literal["shuffle", "balanced"] = _f(
        "shuffle",
        "Training batches: the training set shuffled each epoch, or balanced (real and fake in turn, each class "
        "drawn with replacement).",
    )
    samples_per_epoch: int | None = _f(
        None,
        "sampling: balanced only: items drawn per epoch, all processes together; null: the training set's size.",
    )
    balance_classes: bool = _f(
        True,
        "Weight the loss by inverse class frequency (shuffled batches; balanced batches need no weights).",
    )
    seed: int = _f(42, "Seed of everything (data order, synthesis, initialisation).")
    num_workers: int = _f(0, "DataLoader worker processes.")
    mask_calibration_batches: int = _f(8, "Batches of the static layer mask's calibration pass.")
    # bookkeeping
    output_dir: str = _f("outputs/run", "Where the adapter, checkpoints and results go.")
    overwrite_output_dir: bool = _f(
        False,
        "Replace the earlier run in output_dir: only its files are removed; any other file stops the run.",
    )
    checkpointing_steps: int | None = _f(None, "Checkpoint every N optimizer steps (and at every epoch end).")
    checkpoints_total_limit: int | None = _f(2, "Keep at most this many of this run's checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint folder of this run, or 'latest'.")
    stop_after_step: int | None = _f(None, "Stop (as if interrupted) after this step's checkpoint.")
    metric_for_best: Literal["auc", "loss"] = _f("auc", "Validation metric that chooses the best adapter.")
    logging_steps: int = _f(10, "Log the training loss every N optimizer steps.")
    report_to: list[str] = _f(
        ["json"],
        "Trackers: json (metrics.jsonl), none, or any of accelerate's (tensorboard, wandb, ...) installed.",
    )
    plot_mask: bool = _f(True, "Draw the layer-mask heatmap at the end (MASM with a mask).")
    # Hub
    push_to_hub: bool = _f(False, "Upload the adapter, model card and config at the end.")
    hub_model_id: str | None = _f(None, "Hub repository, org/name.")
    hub_private: bool = _f(False, "Create the Hub repository as private.")
    # The masm: / lora: section as its config object, built once in __post_init__ (not a command-line field).
    adapter: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.test_sets, list):  # TestSetConfig objects (from Python) kept as plain mappings
            self.test_sets = [
                dataclasses.asdict(t) if isinstance(t, TestSetConfig) else t for t in self.test_sets
            ]
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            if f.init:
                setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self._check_values()
        from .tracking import tracker_problem

        problem = tracker_problem(self.report_to)
        if problem:
            raise ConfigError(problem)
        self.test_set_configs()  # each test set checked now
        self.adapter = adapter_config(self.method, self.masm, self.lora)  # before anything heavy loads

    def _check_values(self) -> None:
        positive = (
            "epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "face_size", "fakes_per_face",
            "frames_per_video", "logging_steps", "mask_calibration_batches",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("warmup_steps", "n_bootstrap", "num_workers", "carphone_frames"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}.")
        if self.samples_per_epoch is not None and (
            self.sampling != "balanced" or self.samples_per_epoch <= 0
        ):
            raise ConfigError(
                f"samples_per_epoch must be a positive integer with sampling: balanced, got {self.samples_per_epoch} "
                f"with sampling: {self.sampling} (a shuffled epoch is the training set; use max_train_samples)."
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.test_fraction is not None and not (
            0.0 < self.test_fraction and self.val_fraction + self.test_fraction < 1.0
        ):
            raise ConfigError(
                f"test_fraction must be > 0 with val_fraction + test_fraction < 1, got {self.test_fraction}."
            )
        self._check_face_sources()
        if self.data != "synthetic" and not self.train_path:
            raise ConfigError(
                f"data: {self.data} needs train_path (the DeepfakeBench JSON, folder or manifest)."
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError(
                "push_to_hub: true needs hub_model_id (e.g. --hub_model_id my-org/clip-masm-ffpp)."
            )
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {self.image_size}.")

    def _check_face_sources(self) -> None:
        from ..data.corpus import SOURCES

        unknown = sorted(set(self.face_sources or []) - set(SOURCES))
        if unknown or self.face_sources == []:
            raise ConfigError(f"face_sources: unknown or none {unknown}; choose from {list(SOURCES)}.")

    def test_set_configs(self) -> list[TestSetConfig]:
        return [from_dict(TestSetConfig, t, where=f"test_sets[{i}]") for i, t in enumerate(self.test_sets)]

    def to_dict(self) -> dict[str, Any]:
        """The fields as given (the adapter sections as written): ``training_config.yaml``, the run's identity."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    def run_identity(self) -> dict[str, Any]:
        """The fields that define what this run trains (everything but bookkeeping), for resume checks."""
        return {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_FIELDS}


def adapter_config(method: str, masm: dict[str, Any], lora: dict[str, Any]) -> Any:
    """A ``MASMConfig`` (method: masm) or ``peft.LoraConfig`` (method: lora) from a copy of its section.

    Raises :class:`ConfigError` (one line, naming the field) for an unknown key or a bad value.
    """
    if method == "masm":
        from ..presets import PRESETS, preset_fields
        from ..tuner import MASMConfig

        fields = copy.deepcopy(masm)
        preset = fields.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"masm.preset: unknown preset {preset!r}; known presets: {sorted(PRESETS)}.")
        _check_keys(fields, MASMConfig, "masm")
        return _build(MASMConfig, {**(preset_fields(preset) if preset else {}), **fields}, "masm")
    from peft import LoraConfig

    _check_keys(lora, LoraConfig, "lora")
    return _build(LoraConfig, copy.deepcopy(lora), "lora")


def _build(cls: Any, fields: dict[str, Any], where: str) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where}: {message}") from None


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown(str(key), names, where))


def _unknown(key: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(names))}."


# ----------------------------------------------------------------------------------------- parsing
USAGE = "accelerate launch recipes/train.py --config CONFIG.yaml [--key value ...]"
DESCRIPTION = """\
Train a deepfake detector (MASM or a PEFT LoRA baseline). Every field below can be set in the YAML file or
overridden as --key value (adapter fields as --masm.num_subspaces 2 or --lora.r 8)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--name TYPE`` (a choice field: its allowed values), then its help and default on the next line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=6, width=110)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.dest == "help":
            return ", ".join(action.option_strings)
        head = action.option_strings[0]  # not HfArgumentParser's --hyphen-alias (accepted all the same)
        return head if action.nargs == 0 else f"{head} {action.metavar}"


class RecipeArgumentParser(HfArgumentParser):
    """``HfArgumentParser(TrainConfig)`` whose values are typed by :class:`TrainConfig` itself and whose errors
    are :class:`ConfigError` (see the module docstring for why)."""

    def __init__(self) -> None:
        super().__init__(
            TrainConfig, prog="recipes/train.py", usage=USAGE, description=DESCRIPTION,
            formatter_class=_HelpFormatter, allow_abbrev=False,
        )  # fmt: skip
        self.add_argument(
            "--config", metavar="PATH", help="the YAML recipe (required; examples in recipes/configs/)"
        )
        hints = typing.get_type_hints(TrainConfig)
        for action in self._actions:
            if action.dest not in hints or action.dest == "adapter":
                continue
            if action.nargs == 0:  # HfArgumentParser's --no_<flag> for a flag that defaults to true
                action.help = f"set {action.dest} to false"
                continue
            # Strings are kept as given: TrainConfig types them (the same for YAML values) with one-line errors.
            action.type, action.choices, action.metavar = None, None, _type_name(hints[action.dest])
            action.nargs = (
                "?" if action.nargs == "?" else None
            )  # a bare flag is true; a list is one value: a,b
            action.help = f"{action.help} (default: {action.default!r})".replace("%", "%%")

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def parse_args(argv: list[str]) -> TrainConfig:
    """``[--config FILE] [--key value ...]`` -> :class:`TrainConfig`: the file's values, overridden by the others."""
    sections, rest = _split_adapter_args(argv)
    parser = RecipeArgumentParser()
    path = parser.parse_known_args(rest)[0].config
    yaml_values = _read_yaml(Path(path)) if path is not None else {}
    _check_keys(yaml_values, TrainConfig, "config")
    parser.set_defaults(**yaml_values)
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        raise ConfigError(_unknown_argument(unknown[0]))
    values = {k: v for k, v in vars(namespace).items() if k != "config"}
    for section, overrides in sections.items():
        if section != values["method"]:
            first = next(iter(overrides))
            raise ConfigError(
                f"--{section}.{first}: method is {values['method']}, so the {section}: section is not used; "
                f"drop the option or set --method {section}."
            )
        values[section] = {**_coerce(values[section], dict[str, Any], section), **overrides}
    return TrainConfig(**values)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML ``path`` (optional), apply ``--key value`` overrides: :func:`parse_args` as a function call."""
    return parse_args([*(["--config", str(path)] if path is not None else []), *(overrides or [])])


def format_help() -> str:
    """Usage and every field of :class:`TrainConfig` with its type, default and help text."""
    return RecipeArgumentParser().format_help()


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; configs live in recipes/configs/.")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from err
    if loaded is None:
        raise ConfigError(
            f"{path} is empty (or only comments): nothing says what to train. Start from a config in "
            "recipes/configs/ (demo.yaml runs offline in minutes)."
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    return loaded


def _split_adapter_args(argv: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``--masm.num_subspaces 2`` (or ``=2``; a bare ``--lora.use_dora`` means true) taken out of ``argv``:
    ``({"masm": {"num_subspaces": 2}}, the other arguments)``."""
    sections: dict[str, dict[str, Any]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        section, dot, key = token[2:].partition("=")[0].partition(".")
        if not (token.startswith("--") and dot and section in ADAPTER_SECTIONS):
            rest.append(token)
            i += 1
            continue
        text = token.partition("=")[2] if "=" in token else None
        if text is None:
            given = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            text = argv[i + 1] if given else "true"
            i += given
        sections.setdefault(section, {})[key] = _parse_value(text)
        i += 1
    return sections, rest


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown_argument(token: str) -> str:
    if not token.startswith("--"):
        return f"unexpected argument {token!r}; overrides look like --key value or --key=value."
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.init]
    return _unknown(token[2:].partition("=")[0].replace("-", "_"), names, "config")


def _type_name(tp: Any) -> str:
    """``{masm,lora}`` for a Literal (its allowed values), ``int | None``, ``list[str]``, ``float``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is list and args:
        return f"list[{_type_name(args[0])}]"
    return getattr(origin or tp, "__name__", None) or str(tp).replace("typing.", "")


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_NULL = ("null", "none", "~")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` as type ``tp``, strings (the command line's) converted; :class:`ConfigError` names the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NULL)):
            return None
        for arg in args:
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}.{hint}")
        return value
    if origin in (list, dict) and isinstance(value, str):  # a,b or YAML: [a, b], {key: value}
        value = _parse_value(value) if value.strip()[:1] in ("[", "{") else [v for v in value.split(",") if v]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r} ({type(value).__name__}).")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r} ({type(value).__name__}).")
        return dict(value)
    if tp not in _SCALARS or type(value) is tp:
        return value
    if tp is float and type(value) is int:
        return float(value)
    if isinstance(value, str) and tp is bool and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    if isinstance(value, str) and tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            pass
    raise ConfigError(f"{name}: expected {_SCALARS[tp]}, got {value!r} ({type(value).__name__}).")


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown(str(key), names, where))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != "config" else key)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}.")
    return cls(**kwargs)
