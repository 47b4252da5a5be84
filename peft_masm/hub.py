"""Model cards for MASM adapters, pushing adapter-only files to the Hub, and resolving an adapter to a folder.

The token used for pushing is never printed, logged or put into an exception message.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:
    from .backbones import Backbone

logger = logging.getLogger(__name__)

# The model-card template is package data (peft_masm/templates/model_card.md).
DEFAULT_TEMPLATE_PATH: Path = Path(
    str(importlib.resources.files("peft_masm") / "templates" / "model_card.md")
)
TRAINING_CONFIG_NAME = "training_config.yaml"
DETECTOR_CONFIG_NAME = "detector_config.json"
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
REQUIRED_ADAPTER_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors", "README.md")
BASE_TAGS: tuple[str, ...] = (
    "peft",
    "masm",
    "deepfake-detection",
    "image-classification",
    "face-forgery-detection",
)
METRIC_TYPES: dict[str, tuple[str, str]] = {
    "auc": ("roc_auc", "AUC"),
    "eer": ("eer", "EER"),
    "ap": ("average_precision", "AP"),
    "acc": ("accuracy", "Accuracy"),
}
SYNTHETIC_LIMITS = (
    "These numbers come from the project's **smoke-scale synthetic cross-forgery benchmark**: real faces "
    "from packaged sources and synthesised artifact families, trained on some families and tested on held-out "
    "families and identities. It is a stand-in that checks the method's claim (generalising to unseen "
    "forgeries) at small scale. It is **not** FaceForensics++ / Celeb-DF / DFDC, and these numbers must not be "
    "compared with published cross-dataset AUCs."
)
REAL_DATA_LIMITS = (
    "The checkpoint was chosen on a held-out split of the training domain, never on the test sets. Results on "
    "other datasets, compressions and generators may differ; papers in this field often do not say whether they "
    "report frame- or video-level AUC, so compare like with like."
)


class AdapterPushError(RuntimeError):
    """Pushing an adapter failed (the message never contains the token)."""


class AdapterNotAvailableError(FileNotFoundError):
    """An adapter could not be found locally, in the cache, or on the Hub."""


# ---------------------------------------------------------------------------------------------- model card


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "test-set"


def adapter_summary(adapter_config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The adapter config's set, short, scalar or list fields as ``(key, value)`` rows for the card."""
    rows = []
    for key in sorted(adapter_config):
        value = adapter_config[key]
        if value is None or value == {} or value == [] or isinstance(value, dict):
            continue
        text = json.dumps(sorted(value) if isinstance(value, (list, set)) else value)
        if len(text) <= 120:
            rows.append((key, text.strip('"')))
    return rows


def eval_results_to_card(
    eval_results: Mapping[str, Mapping[str, Any]], task_name: str = "Deepfake detection"
) -> list[EvalResult]:
    """One ``EvalResult`` per test set and metric present (``frame_auc`` ... ``video_acc``), NaNs left out."""
    out = []
    for set_name, metrics in eval_results.items():
        for level in ("frame", "video"):
            for key, (metric_type, label) in METRIC_TYPES.items():
                value = metrics.get(f"{level}_{key}")
                if value is None or not math.isfinite(float(value)):
                    continue
                out.append(
                    EvalResult(
                        task_type="image-classification",
                        task_name=task_name,
                        dataset_type=_slug(set_name),
                        dataset_name=set_name,
                        dataset_split="test",
                        metric_type=metric_type,
                        metric_name=f"{level.capitalize()} {label}",
                        metric_config=level,
                        metric_value=round(float(value), 6),
                    )
                )
    return out


def _results_table(eval_results: Mapping[str, Mapping[str, Any]] | None) -> str:
    if not eval_results:
        return ""
    from .metrics.report import results_markdown

    return results_markdown(eval_results)


def _packaged_backbone(base_model: str | None) -> Backbone | None:
    """The ``peft_masm.backbones`` entry for an offline alias (``clip-vit-b16``), else None."""
    from .backbones import BACKBONES

    if not base_model or base_model not in BACKBONES or Path(base_model).exists():
        return None
    return BACKBONES[base_model]


def _is_local_folder(base_model: str) -> bool:
    return Path(base_model).expanduser().is_dir()


def describe_base_model(base_model: str | None) -> str:
    """The card's words for the base model: a Hub link, a backbone packaged with peft_masm, or a local folder."""
    if not base_model:
        return (
            "a base model whose name was not recorded "
            "(`base_model_name_or_path` is empty in `adapter_config.json`)"
        )
    packaged = _packaged_backbone(base_model)
    if packaged is not None:
        from .assets import ASSETS

        asset = ASSETS[packaged.asset]
        registry = {"pypi": "PyPI", "npm": "npm", "debian": "Debian"}.get(asset.registry, asset.registry)
        return (
            f"`{base_model}`, a backbone packaged with `peft_masm`: {packaged.description}, from the {registry} "
            f"package `{asset.name}=={asset.version}`"
        )
    if _is_local_folder(base_model):
        return f"the local model folder `{base_model}`"
    return f"[`{base_model}`](https://huggingface.co/{base_model})"


def base_model_notes(base_model: str | None) -> str:
    """How to get a packaged backbone (empty for a Hub id or a folder)."""
    if _packaged_backbone(base_model) is None:
        return ""
    return (
        f"`peft_masm.backbones.prepare({json.dumps(base_model)})` builds the base model: it downloads the "
        "package once, checks its sha256, converts it into a transformers model folder in the cache "
        "(`$PEFT_MASM_CACHE`, default `~/.cache/peft_masm`) and returns that folder; later calls need no network. "
        "Other copies of this architecture, the Hub's included, hold other weights: the adapter refuses them "
        "(`peft_masm.BaseModelMismatchError`)."
    )


def loading_code(
    base_model: str | None,
    repo_id: str,
    *,
    base_model_class: str = "AutoModel",
    pooling: str | None = None,
    image_size: int | None = None,
    interpolate_pos_encoding: bool = False,
) -> str:
    """The card's Python code that loads the adapter onto its base model, runnable as written.

    With ``pooling`` set (a detector saved by ``MASMDetector.save_pretrained``) it also scores ``face.jpg`` with the
    image processor saved beside the adapter (``image_size`` px; the base's own processor when None).
    """
    packaged = _packaged_backbone(base_model) is not None
    base_arg = (
        f"prepare({json.dumps(base_model)})"
        if packaged
        else json.dumps(base_model or "path/to/the/base/model")
    )
    adapter = json.dumps(repo_id)
    lines = ["import peft_masm  # noqa: F401  registers the MASM tuner type with PEFT"]
    if pooling is None:
        lines += ["from peft import PeftModel", f"from transformers import {base_model_class}"]
        if packaged:
            lines.append("from peft_masm.backbones import prepare")
        lines += [
            "",
            f"base = {base_model_class}.from_pretrained({base_arg})",
            f"model = PeftModel.from_pretrained(base, {adapter})",
            "model.eval()",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        "import torch",
        "from peft import PeftModel",
        "from PIL import Image",
        f"from transformers import AutoImageProcessor, {base_model_class}",
    ]
    if packaged:
        lines.append("from peft_masm.backbones import prepare")
    if pooling == "pooler_output":
        lines.append("from peft_masm.detector import CLIPPoolerClassifier")
    lines += [
        "",
        "# transformers reports the new 2-class head as MISSING: the adapter brings the trained one",
        f"base = {base_model_class}.from_pretrained({base_arg}, num_labels=2)",
    ]
    if pooling == "pooler_output":
        lines.append(
            "base = CLIPPoolerClassifier(base)  # the head reads CLIP's pooler_output, as in training"
        )
    lines += [f"model = PeftModel.from_pretrained(base, {adapter})", "model.eval()"]
    if image_size is not None:
        lines.append(
            f"processor = AutoImageProcessor.from_pretrained({adapter})  # {image_size} px, as in training"
        )
    else:
        lines.append(f"processor = AutoImageProcessor.from_pretrained({base_arg})")
    call = "model(**inputs, interpolate_pos_encoding=True)" if interpolate_pos_encoding else "model(**inputs)"
    lines += [
        "",
        'image = Image.open("face.jpg").convert("RGB")  # a face crop, as in training (see below)',
        'inputs = processor(images=image, return_tensors="pt")',
        "with torch.no_grad():",
        f"    logits = {call}.logits",
        'print(f"p(fake) = {logits.softmax(-1)[0, 1].item():.3f}")  # label 1 is fake',
    ]
    return "\n".join(lines) + "\n"


def input_notes(
    training_config: Mapping[str, Any] | None,
    repo_id: str,
    *,
    image_size: int | None = None,
    interpolate_pos_encoding: bool = False,
    face_crop_size: int | None = None,
    face_crop_margin: float | None = None,
) -> str:
    """What a detector's inputs must look like (face crop, resolution), and the tools that prepare them.

    ``face_crop_size`` and ``face_crop_margin`` come from the detector's saved config (``detector_config.json``);
    the sentence leaves out what is not given.
    """
    enlarged = f"enlarged {face_crop_margin:g} times" if face_crop_margin is not None else "enlarged"
    size = f", {face_crop_size} px" if face_crop_size is not None else ""
    config = training_config or {}
    crop = f"the largest face, its box {enlarged}, 5-point aligned where landmarks are found{size}"
    notes = []
    if config.get("data") == "synthetic":
        notes.append(
            f"The detector was trained on face crops ({crop}, then resized to {config.get('face_size', 224)} px). "
            "Score such crops, not whole photos or frames."
        )
    elif config.get("face_detector", "none") != "none":
        notes.append(
            f"The detector was trained on face crops ({crop}). Score such crops, not whole photos or frames."
        )
    elif training_config:
        notes.append(
            "The detector was trained on its training images as they were, without a face detector "
            "(DeepfakeBench frames are already face crops); score images prepared the same way."
        )
    if image_size is not None and interpolate_pos_encoding:
        notes.append(
            f"Its images are {image_size} px, not the base model's own size, so the model is told "
            "`interpolate_pos_encoding=True`."
        )
    notes.append(
        "`peft_masm` does the face crop, the resolution and the head for you: "
        f"`masm-detect --adapter {repo_id} photo.jpg` from the shell, or "
        f"`detector = peft_masm.MASMDetector.from_pretrained({json.dumps(repo_id)})` in Python."
    )
    return " ".join(notes)


def render_model_card(
    base_model: str | None,
    adapter_config: Mapping[str, Any],
    training_config: Mapping[str, Any] | None,
    eval_results: Mapping[str, Mapping[str, Any]] | None,
    datasets: Sequence[str] | None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    synthetic_benchmark: bool = True,
    extra_tags: Sequence[str] = (),
    license: str = "apache-2.0",
    base_model_class: str = "AutoModel",
    adapter_parameters: int | None = None,
    template_path: str | Path | None = None,
    pooling: str | None = None,
    image_size: int | None = None,
    interpolate_pos_encoding: bool = False,
    face_crop_size: int | None = None,
    face_crop_margin: float | None = None,
) -> ModelCard:
    """A model card (``library_name: peft``, base model, tags, datasets, model-index results) for a MASM adapter.

    ``eval_results`` maps test-set names to ``compute_detection_metrics`` outputs. ``synthetic_benchmark`` says
    the results come from the smoke-scale synthetic benchmark, and the card says so. ``base_model=None`` says
    the base model was not recorded (a model built from a config); an empty string is refused. An offline
    alias of ``peft_masm.backbones`` is named as such (with how to get it), not as a Hub id. ``pooling`` (set for
    a detector saved by ``MASMDetector.save_pretrained``), ``image_size`` (of the saved image processor) and
    ``interpolate_pos_encoding`` make the card's code score an image as the detector was trained;
    ``face_crop_size`` and ``face_crop_margin`` (its saved config) describe the face crop it expects.
    """
    if base_model is not None and not base_model:
        raise ValueError(
            "base_model is empty; pass the Hub id or path of the backbone the adapter was trained on."
        )
    name = model_name or (f"{base_model.rstrip('/').split('/')[-1]}-masm" if base_model else "masm-adapter")
    results = eval_results_to_card(eval_results) if eval_results else None
    # An offline alias is no Hub id: the Hub's copy of the architecture holds other weights (see the card's text).
    hub_base = None if _packaged_backbone(base_model) is not None else base_model
    base_tag = [f"base_model:adapter:{hub_base}"] if hub_base else []
    tags = list(dict.fromkeys([*BASE_TAGS, *base_tag, *extra_tags]))
    repo = repo_id or "path/to/this/adapter"
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag="image-classification",
        license=license,
        tags=tags,
        datasets=list(datasets) if datasets else None,
        model_name=name,
        eval_results=results or None,
    )
    thresholds = {m.get("threshold") for m in (eval_results or {}).values()} - {None}
    return ModelCard.from_template(
        card_data,
        template_path=str(_template(template_path)),
        model_name=name,
        base_model_text=describe_base_model(base_model),
        base_model_notes=base_model_notes(base_model),
        repo_id=repo,
        load_code=loading_code(
            base_model,
            repo,
            base_model_class=base_model_class,
            pooling=pooling,
            image_size=image_size,
            interpolate_pos_encoding=interpolate_pos_encoding,
        ),
        input_notes=input_notes(
            training_config,
            repo,
            image_size=image_size,
            interpolate_pos_encoding=interpolate_pos_encoding,
            face_crop_size=face_crop_size,
            face_crop_margin=face_crop_margin,
        )
        if pooling is not None
        else "",
        adapter_summary=adapter_summary(adapter_config),
        adapter_parameters=f"{adapter_parameters:,}" if adapter_parameters is not None else "",
        training_config_yaml=yaml.safe_dump(dict(training_config), sort_keys=False)
        if training_config
        else "",
        training_config_file=TRAINING_CONFIG_NAME if training_config else "",
        results_table=_results_table(eval_results),
        threshold=", ".join(str(t) for t in sorted(t for t in thresholds if t is not None)) or "0.5",
        evaluation_limits=SYNTHETIC_LIMITS if synthetic_benchmark else REAL_DATA_LIMITS,
        license=license,
    )


def _template(template_path: str | Path | None) -> Path:
    path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {path} not found; pass template_path= (the default template is package "
            "data: peft_masm/templates/model_card.md; reinstall peft_masm if it is missing)."
        )
    return path


def count_adapter_parameters(adapter_dir: str | Path) -> int:
    """Number of values stored in ``adapter_model.safetensors`` (read from the header, no tensors loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


def save_training_config(out_dir: str | Path, training_config: Mapping[str, Any]) -> Path:
    """Write the training configuration as ``training_config.yaml`` beside the adapter."""
    path = Path(out_dir) / TRAINING_CONFIG_NAME
    path.write_text(yaml.safe_dump(dict(training_config), sort_keys=False))
    return path


def save_adapter_card(
    out_dir: str | Path,
    base_model: str | None,
    adapter_config: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Mapping[str, Any]] | None = None,
    datasets: Sequence[str] | None = None,
    **card_kwargs: Any,
) -> Path:
    """Render the card into ``out_dir/README.md`` (call after ``save_pretrained``, which writes its own card).

    ``adapter_config`` defaults to ``out_dir/adapter_config.json``; the parameter count is read from the weights.
    A given ``training_config`` is also written to ``out_dir/training_config.yaml`` so that it is pushed with the card.
    """
    out = Path(out_dir)
    if adapter_config is None:
        config_path = out / "adapter_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found; call model.save_pretrained({str(out)!r}) first."
            )
        adapter_config = json.loads(config_path.read_text())
    if "adapter_parameters" not in card_kwargs and (out / "adapter_model.safetensors").is_file():
        card_kwargs["adapter_parameters"] = count_adapter_parameters(out)
    card = render_model_card(
        base_model, adapter_config, training_config, eval_results, datasets, **card_kwargs
    )
    if training_config:
        save_training_config(out, training_config)
    path = out / "README.md"
    card.save(path)
    return path


# ---------------------------------------------------------------------------------------------- push


def resolve_token(token: str | None = None) -> str:
    """The token from the argument, else ``HF_TOKEN``, else the login cache; raise if there is none."""
    resolved = token or get_token()
    if not resolved:
        raise AdapterPushError(
            "no Hugging Face token found: pass token=..., set the HF_TOKEN environment variable, or run `hf auth login`."
        )
    return resolved


def adapter_upload_patterns(local_dir: str | Path) -> list[str]:
    """The files of ``local_dir`` to upload: the adapter, its card and (if present) its training, detector and
    image-processor configs."""
    folder = Path(local_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; pass the folder given to save_pretrained.")
    missing = [name for name in REQUIRED_ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        hint = (
            "call save_adapter_card() to write README.md"
            if missing == ["README.md"]
            else "call save_pretrained()"
        )
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; {hint} first.")
    optional = (TRAINING_CONFIG_NAME, DETECTOR_CONFIG_NAME, PROCESSOR_CONFIG_NAME)
    extra = [name for name in optional if (folder / name).is_file()]
    return [*REQUIRED_ADAPTER_FILES, *extra]


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "<redacted>") if secret else text


def push_adapter_to_hub(
    local_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload MASM adapter",
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload only the adapter files of ``local_dir``; return the commit URL."""
    patterns = adapter_upload_patterns(local_dir)
    secret = resolve_token(token)
    api = HfApi(endpoint=endpoint)
    logger.info("Pushing %s to %s (private=%s): %s", local_dir, repo_id, private, ", ".join(patterns))
    try:
        api.create_repo(repo_id, token=secret, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(local_dir),
            allow_patterns=patterns,
            commit_message=commit_message,
            token=secret,
            repo_type="model",
        )
    except Exception as err:  # re-raised without the original, whose text or context could hold the token
        message = _redact(f"{type(err).__name__}: {err}", secret)
        raise AdapterPushError(f"pushing {local_dir} to {repo_id} failed: {message}") from None
    return str(info.commit_url)


# ---------------------------------------------------------------------------------------------- pull


def _not_available_message(repo_id: str, revision: str | None, err: Exception) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"adapter {repo_id!r}{rev} is neither a local directory nor in the Hugging Face cache, and the Hub could "
        f"not be reached ({type(err).__name__}). Fix: download it once while online "
        f"(`hf download {repo_id}` or huggingface_hub.snapshot_download) and then set HF_HUB_OFFLINE=1, point "
        "HF_ENDPOINT at a reachable mirror, or pass a local path to the adapter folder instead."
    )


def resolve_adapter(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
) -> Path:
    """A local folder holding ``adapter_config.json``: the path itself, or the Hub snapshot (cached or downloaded)."""
    local = Path(path_or_repo_id).expanduser()
    if local.exists():
        if not (local / "adapter_config.json").is_file():
            raise AdapterNotAvailableError(
                f"{local} has no adapter_config.json; pass a folder written by save_pretrained."
            )
        return local
    repo_id = str(path_or_repo_id)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token))
    except HFValidationError as err:
        raise AdapterNotAvailableError(
            f"{repo_id!r} is not an existing local directory and not a valid Hub repo id ('org/name'): {err}"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise AdapterNotAvailableError(
            f"the Hub has no accessible adapter {repo_id!r} at revision {revision or 'main'} ({type(err).__name__}); "
            "check the repo id and revision, or pass a token for a private repo."
        ) from err
    except LocalEntryNotFoundError as err:
        raise AdapterNotAvailableError(_not_available_message(repo_id, revision, err)) from err
    if not (folder / "adapter_config.json").is_file():
        raise AdapterNotAvailableError(
            f"Hub repo {repo_id!r} has no adapter_config.json; is it a PEFT adapter?"
        )
    return folder
