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

__all__ = ["ConfigError", "TestSetConfig", "TrainConfig", "load_config", "parse_overrides", "from_dict"]


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


@dataclass
class TrainConfig:
    """Everything ``recipes/train.py`` needs. See recipes/README.md for each group of fields."""

    # model
    backbone: str = "clip-vit-b16"  # Hub id, local folder, or offline alias (peft_masm.backbones)
    method: Literal["masm", "lora"] = "masm"
    masm: dict[str, Any] = field(default_factory=dict)  # MASMConfig fields
    lora: dict[str, Any] = field(default_factory=dict)  # peft.LoraConfig fields (method: lora)
    image_size: int | None = None  # None: the backbone processor's size
    # data
    data: Literal["synthetic", "deepfakebench", "folder", "manifest"] = "synthetic"
    train_path: str | None = None  # DeepfakeBench JSON, folder or manifest
    label_dict: str | None = None
    compression: str | None = "c23"
    dataset_name: str | None = None
    data_root: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"  # None: hold out val_fraction of the training videos
    val_fraction: float = 0.1
    frames_per_video: int = 8
    face_detector: Literal["none", "auto", "mtcnn", "lbp"] = "none"  # crop faces of loaded data
    on_error: Literal["raise", "skip"] = "raise"
    max_train_samples: int | None = None
    # synthetic cross-forgery benchmark (data: synthetic)
    train_families: list[str] = field(default_factory=lambda: ["sbi", "colour_swap", "gan_upsample"])
    test_families: list[str] = field(
        default_factory=lambda: ["double_jpeg", "denoise_renoise", "spectral_peaks"]
    )
    test_identities: list[str] = field(default_factory=lambda: ["carphone", "faceapi-s5", "astronaut"])
    face_size: int = 224
    fakes_per_face: int = 1
    include_lfw: bool = True
    carphone_frames: int = 24
    # test sets (evaluated with the best-on-validation adapter after training)
    test_sets: list[dict[str, Any]] = field(default_factory=list)
    n_bootstrap: int = 1000
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    optimizer: Literal["adam", "adamw"] = "adam"
    learning_rate: float = 2e-4
    weight_decay: float = 5e-4
    lr_scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False  # force CPU (e.g. several CPU processes under `accelerate launch --multi_gpu`)
    balance_classes: bool = True
    seed: int = 42
    num_workers: int = 0
    mask_calibration_batches: int = 8  # layer_mask: static
    # bookkeeping
    output_dir: str = "outputs/run"
    checkpointing_steps: int | None = None  # also at the end of every epoch
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    stop_after_step: int | None = None  # stop (as if interrupted) after this step's checkpoint
    metric_for_best: Literal["auc", "loss"] = "auc"
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["json"])
    plot_mask: bool = True
    # Hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def __post_init__(self) -> None:
        positive = (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "face_size",
            "fakes_per_face",
            "frames_per_video",
            "logging_steps",
            "mask_calibration_batches",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("warmup_steps", "n_bootstrap", "num_workers", "carphone_frames"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
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
        self.test_sets = [
            dataclasses.asdict(t) if isinstance(t, TestSetConfig) else t for t in self.test_sets
        ]
        for i, t in enumerate(self.test_sets):
            from_dict(TestSetConfig, t, where=f"test_sets[{i}]")
        self._check_adapter_fields()

    def _check_adapter_fields(self) -> None:
        if self.method == "masm":
            from ..tuner import MASMConfig

            _check_keys(self.masm, MASMConfig, "masm")
        else:
            from peft import LoraConfig

            _check_keys(self.lora, LoraConfig, "lora")

    def test_set_configs(self) -> list[TestSetConfig]:
        return [from_dict(TestSetConfig, t, where=f"test_sets[{i}]") for i, t in enumerate(self.test_sets)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values.")
        data = dict(loaded or {})
    for key, value in parse_overrides(list(overrides or [])).items():
        if isinstance(value, dict) and isinstance(data.get(key, {}), dict):
            merged = dict(data.get(key) or {})
            merged.update(value)
            data[key] = merged
        else:
            data[key] = value
    return from_dict(TrainConfig, data)
