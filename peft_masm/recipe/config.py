"""Typed recipe configuration: a YAML file validated into :class:`TrainConfig`, every field overridable
with ``--key value`` (nested adapter fields as ``--masm.num_subspaces 2``).

Unknown keys are rejected with the nearest valid name; values of the wrong type get an error that
names the field, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "TestSetConfig",
    "TrainConfig",
    "format_help",
    "from_dict",
    "load_config",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A bad recipe configuration; the message names the key and the fix."""


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
RESUME_WARN_FIELDS = frozenset({"batch_size", "learning_rate", "epochs"})


@dataclass
class TrainConfig:
    """Everything ``recipes/train.py`` needs; ``python recipes/train.py --help`` lists each field."""

    # model
    backbone: str = _f("clip-vit-b16", "Hub id, local folder, or offline alias (clip-vit-b16, dinov2-s14).")
    method: Literal["masm", "lora"] = _f("masm", "The adapter: MASM, or a PEFT LoRA baseline.")
    masm: dict[str, Any] = _f(
        {}, "MASMConfig fields (method: masm); `preset: effort|paper` starts from a preset."
    )
    lora: dict[str, Any] = _f({}, "peft.LoraConfig fields (method: lora).")
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
    weight_decay: float = _f(5e-4, "Weight decay.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = _f(
        "cosine", "Learning-rate schedule after warm-up."
    )
    warmup_steps: int = _f(0, "Linear warm-up optimizer steps.")
    max_grad_norm: float | None = _f(None, "Clip the gradient norm to this value; null: no clipping.")
    on_non_finite: Literal["raise", "skip"] = _f(
        "raise", "NaN/inf gradients: stop with an error naming the step, or skip the step with a warning."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "accelerate mixed precision.")
    cpu: bool = _f(False, "Force the CPU (e.g. several CPU processes under `accelerate launch --multi_gpu`).")
    balance_classes: bool = _f(True, "Weight the loss by inverse class frequency.")
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

    def __post_init__(self) -> None:
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
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
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
        check_trackers(self.report_to)
        self.test_sets = [
            dataclasses.asdict(t) if isinstance(t, TestSetConfig) else t for t in self.test_sets
        ]
        for i, t in enumerate(self.test_sets):
            from_dict(TestSetConfig, t, where=f"test_sets[{i}]")
        self.adapter_config()  # validates the masm: / lora: section now, before anything heavy loads

    def adapter_config(self) -> Any:
        """A new ``MASMConfig`` (method: masm) or ``peft.LoraConfig`` (method: lora) from its section.

        Raises :class:`ConfigError` (one line, naming the field) for an unknown key or a bad value.
        """
        if self.method == "masm":
            from ..presets import PRESETS, preset_fields
            from ..tuner import MASMConfig

            fields = dict(self.masm)
            preset = fields.pop("preset", None)
            if preset is not None and preset not in PRESETS:
                raise ConfigError(
                    f"masm.preset: unknown preset {preset!r}; known presets: {sorted(PRESETS)}."
                )
            _check_keys(fields, MASMConfig, "masm")
            fields = {**(preset_fields(preset) if preset else {}), **fields}
            return _build(MASMConfig, fields, "masm")
        from peft import LoraConfig

        _check_keys(self.lora, LoraConfig, "lora")
        return _build(LoraConfig, dict(self.lora), "lora")

    def test_set_configs(self) -> list[TestSetConfig]:
        return [from_dict(TestSetConfig, t, where=f"test_sets[{i}]") for i, t in enumerate(self.test_sets)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_identity(self) -> dict[str, Any]:
        """The fields that define what this run trains (everything but bookkeeping), for resume checks."""
        return {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_FIELDS}


OWN_TRACKERS = ("json", "jsonl", "none")  # written by recipes/train.py itself, no package needed


def check_trackers(names: list[str]) -> None:
    """Raise :class:`ConfigError` for a ``report_to`` name accelerate does not know or whose package is missing.

    accelerate itself only warns and drops a missing tracker, so a run would end without its logs.
    """
    unknown = [n for n in names if n not in OWN_TRACKERS]
    if not unknown:
        return
    import accelerate.utils
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    for name in unknown:
        if name not in known:
            valid = [*OWN_TRACKERS, *known]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"report_to: unknown tracker {name!r}.{hint} Known: {', '.join(valid)}.")
        available = getattr(accelerate.utils, f"is_{name}_available", lambda: True)
        if not available():
            raise ConfigError(
                f"report_to: {name} is not installed; `pip install {name}`, or log without it "
                "(--report_to json)."
            )


def _build(cls: Any, fields: dict[str, Any], where: str) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where}: {message}") from None


def format_help(cls: type = TrainConfig, prog: str = "recipes/train.py") -> str:
    """Usage and every field of ``cls`` with its type, default and help text."""
    hints = typing.get_type_hints(cls)
    lines = [
        f"usage: accelerate launch {prog} --config CONFIG.yaml [--key value ...]",
        "",
        (cls.__doc__ or "").strip().splitlines()[0],
        "Every field below can be set in the YAML file or overridden as --key value (adapter fields as",
        "--masm.num_subspaces 2 or --lora.r 8).",
        "",
        "options:",
        "  --config PATH                 the YAML recipe (required; examples in recipes/configs/)",
        "  -h, --help                    show this help and exit",
    ]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        head = f"  --{f.name} {_type_name(hints[f.name])}"
        lines.append(f"{head}\n      {f.metadata.get('help', '')} (default: {default!r})")
    return "\n".join(lines)


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown(key, names, where))


def _unknown(key: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(names))}."


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


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against type ``tp`` (converting strings from the command line); raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}.{hint}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            parsed = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r} ({type(value).__name__}).")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r} ({type(value).__name__}).")
        return dict(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r} ({type(value).__name__}).")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r} ({type(value).__name__}).")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r} ({type(value).__name__}).")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r} ({type(value).__name__}).")
        return value
    return value


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


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-4", "--masm.num_subspaces=2", "--push_to_hub"]`` -> nested dict of raw values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}; overrides look like --key value or --key=value."
            )
        key = token[2:].replace("-", "_") if "." not in token else token[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            value: Any = text
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag
            i += 1
        if "." in key:
            group, sub = key.split(".", 1)
            out.setdefault(group, {})
            if not isinstance(out[group], dict):
                raise ConfigError(f"--{key}: {group!r} was already given a plain value.")
            out[group][sub] = _parse_value(value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML ``path`` (optional), apply ``--key value`` overrides, validate into :class:`TrainConfig`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; configs live in recipes/configs/.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err}).") from err
        if loaded is None:
            raise ConfigError(
                f"{p} is empty (or only comments): nothing says what to train. Start from a config in "
                "recipes/configs/ (demo.yaml runs offline in minutes)."
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values.")
        data = dict(loaded)
    for key, value in parse_overrides(list(overrides or [])).items():
        if isinstance(value, dict) and isinstance(data.get(key, {}), dict):
            merged = dict(data.get(key) or {})
            merged.update(value)
            data[key] = merged
        else:
            data[key] = value
    return from_dict(TrainConfig, data)
