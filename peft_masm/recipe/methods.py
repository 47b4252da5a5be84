"""The experiment files: every method is one YAML file, ``recipes/methods/<name>.yaml`` (or any path to one).

``recipes/compare.py`` trains them on a recipe config and the benchmarks time them; adding a method is adding a
file. A file holds (PEFT's ``method_comparison`` keeps one adapter config per experiment the same way)::

    description: one line
    peft_type: MASM            # a PEFT type (LORA, OSF, ADAMSS, LN_TUNING, MASM, ...); null: no adapter
    trains: head               # peft_type null only: "head" (the linear probe) or "all" (full fine-tuning)
    preset: effort             # optional, MASM only: the fields of peft_masm.presets' preset, under `config`
    extends: masm_reg          # optional: another method file, whose fields this one overrides
    learning_rates: [3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]   # the grid compare.py chooses from on validation
    asa_keep_ratio: 0.75       # optional, AdaMSS: the allocator's target as a share of all subspaces
    layer_selection:           # optional: adapt only the layers whose gradients are most consistent (FMSD)
      keep: 0.25               #   the share of layers kept
      batches: 8               #   training batches the gradients are taken on
    config:                    # the config's keyword arguments
      orthogonality_weight: 0.1
      target_modules: ${targets}

A value written ``${...}`` is computed from what the caller knows (``method_config``'s arguments): ``hidden``
(the model width), ``targets`` and ``head`` (target modules and ``modules_to_save``; when the caller gives none
the key is left out and the config's default applies), ``steps`` (the run length), ``reg_weight`` (a swept
regulariser weight) and ``layer_norms``; ``+ - * //``, ``max`` and ``min`` combine them.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

# The experiment files live beside the recipes, in the source checkout (recipes/ is not part of the wheel).
METHODS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "methods"
_EXPRESSION = re.compile(r"^\$\{(.+)\}$", re.DOTALL)
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}
_FUNCTIONS = {"max": max, "min": min}
_SPEC_KEYS = {
    "description", "peft_type", "trains", "preset", "extends", "learning_rates", "asa_keep_ratio", "layer_selection",
    "config",
}  # fmt: skip


def names() -> list[str]:
    """Every method of the registry, sorted."""
    return sorted(path.stem for path in METHODS_DIR.glob("*.yaml"))


def method_path(name: str) -> Path:
    """The file of method ``name``: ``METHODS_DIR/<name>.yaml``, or ``name`` itself when it is a ``.yaml`` path."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    return METHODS_DIR / f"{name}.yaml"


def method_name(name: str) -> str:
    """The display name of method ``name`` (a path's file stem)."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


@functools.cache
def _read(name: str) -> dict[str, Any]:
    path = method_path(name)
    if not path.is_file():
        known = ", ".join(names())
        raise ValueError(f"unknown method {name!r}: no file {path} (add one, or pick one of: {known})")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"method {name!r}: unknown keys {sorted(unknown)} in {path} (known: {sorted(_SPEC_KEYS)})"
        )
    if spec.get("trains", "head") not in ("head", "all"):
        raise ValueError(f"method {name!r}: trains must be 'head' or 'all', got {spec['trains']!r}")
    return spec


def spec(name: str) -> dict[str, Any]:
    """Method ``name``'s fields with its ``extends`` chain resolved (``config`` merged, the file's own winning)."""
    own = _read(name)
    if "extends" not in own:
        return {**own, "config": dict(own.get("config") or {})}
    parent = spec(own["extends"])
    merged = {**parent, **{k: v for k, v in own.items() if k not in ("config", "extends")}}
    merged["config"] = {**parent["config"], **(own.get("config") or {})}
    return merged


def _evaluate(text: str, context: dict[str, Any], method: str) -> Any:
    """The value of one ``${...}`` expression over ``context`` (names, numbers, + - * //, max, min)."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in context:
                raise ValueError(f"method {method!r} needs {node.id!r} from the benchmark (in {text!r})")
            return context[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _FUNCTIONS and not node.keywords:
            return _FUNCTIONS[node.func.id](*(value(arg) for arg in node.args))
        raise ValueError(f"method {method!r}: unsupported expression {text!r}")

    return value(ast.parse(text.strip(), mode="eval").body)


def config_kwargs(name: str, context: dict[str, Any]) -> dict[str, Any]:
    """The config keyword arguments of ``name`` (preset fields, then the file's), expressions computed; an
    expression that comes out None (e.g. ``${targets}`` when the benchmark gives no targets) is left out."""
    fields = spec(name)
    kwargs: dict[str, Any] = {}
    if fields.get("preset"):
        from peft_masm.presets import preset_fields

        kwargs.update(preset_fields(fields["preset"]))
    for key, raw in fields["config"].items():
        match = _EXPRESSION.match(raw) if isinstance(raw, str) else None
        value = _evaluate(match.group(1), context, name) if match else raw
        if match and value is None:
            kwargs.pop(key, None)
        else:
            kwargs[key] = value
    return kwargs


def method_config(
    name: str,
    hidden: int | None = None,
    targets: Any = None,
    *,
    head: list[str] | None = None,
    **context: Any,
) -> Any:
    """The PEFT config of method ``name`` (None for the frozen base, ``peft_type: null``).

    ``hidden``: the model width; ``targets`` / ``head``: ``target_modules`` / ``modules_to_save`` (None: the
    config's default); ``context``: the other names the method's expressions may use (``steps``, ``reg_weight``,
    ``layer_norms``).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import peft_masm  # noqa: F401  (registers MASM with PEFT)

    peft_type = spec(name).get("peft_type")
    if peft_type is None:
        return None
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"method {name!r}: unknown peft_type {peft_type!r}")
    kwargs = config_kwargs(name, {"hidden": hidden, "targets": targets, "head": head, **context})
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**kwargs)


def is_masm(name: str) -> bool:
    """Whether method ``name`` is a MASM adapter."""
    return spec(name).get("peft_type") == "MASM"


def finish_injection(name: str, model: Any) -> None:
    """What method ``name`` sets once its adapter is injected: AdaMSS's allocator target (``asa_keep_ratio``)."""
    ratio = spec(name).get("asa_keep_ratio")
    if ratio is not None:
        config = model.peft_config["default"]
        config.asa_target_subspaces = max(1, round(ratio * model.base_model._get_asa_total_subspaces()))


def after_optimizer_step(model: Any) -> Any:
    """The per-step callback a method needs after each optimizer step (AdaMSS's allocator), or None."""
    config = getattr(model, "peft_config", {}).get("default")
    if getattr(config, "peft_type", None) == "ADAMSS" and getattr(config, "use_asa", False):

        def allocate(step: int) -> None:
            model.base_model.update_and_allocate(step)

        return allocate
    return None


def backbone_context(backbone: str) -> dict[str, Any]:
    """What a method file's expressions may need from the backbone: ``hidden`` (its width) and ``layer_norms``
    (the name endings of its LayerNorms, LN tuning's targets)."""
    from torch import nn

    from ..detector import load_base_classifier

    model = load_base_classifier(backbone, quiet_new_head=True)
    vision = getattr(
        model.config, "vision_config", model.config
    )  # CLIP's classifier nests its tower's config
    norms = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    return {"hidden": vision.hidden_size, "layer_norms": sorted(norms)}


def build_method_model(
    name: str,
    backbone: str,
    context: dict[str, Any],
    *,
    pooling: str = "model",
    batches: Callable[[int], Iterable[dict[str, Any]]] | None = None,
) -> tuple[Any, Callable[[int], Any] | None]:
    """The detector of method ``name`` on ``backbone`` (the recipe's ``build_detector``: 2-way head, the method's
    adapter) and the callback its optimizer steps need (AdaMSS's allocator), or None.

    ``peft_type: null`` builds the plain classifier: only the head trains (``trains: head``, the linear probe), or
    every weight (``trains: all``, full fine-tuning). ``context``: ``backbone_context`` plus ``steps``.
    ``batches(n)``: ``n`` training batches, for a method that chooses its layers from them (``layer_selection``).
    """
    from ..detector import build_detector, head_module_names, load_base_classifier, with_pooling

    config = method_config(name, **context)
    if config is None:
        model = with_pooling(load_base_classifier(backbone, quiet_new_head=True), pooling)
        model.requires_grad_(spec(name).get("trains", "head") == "all")
    else:
        if spec(name).get("layer_selection"):
            config.layers_to_transform = _selected_layers(name, backbone, config, pooling, batches)
        model = build_detector(backbone, config, pooling=pooling)
        finish_injection(name, model)  # AdaMSS: its allocator's target, once the total is known
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for head in head_module_names(base):  # every method trains the same head (OSF ignores modules_to_save)
        getattr(base, head).requires_grad_(True)
    return model, after_optimizer_step(model)


def _selected_layers(name: str, backbone: str, config: Any, pooling: str,
                     batches: Callable[[int], Iterable[dict[str, Any]]] | None) -> list[int]:  # fmt: skip
    """The layers method ``name``'s ``layer_selection`` keeps: the best ``keep`` share by the gradient
    bias-variance score over ``batches`` training batches (:mod:`peft_masm.layer_selection`)."""
    from ..detector import load_base_classifier, with_pooling
    from ..layer_selection import layer_gradient_scores, select_layers
    from ..tuner.config import default_target_modules
    from .step import classification_loss

    selection = spec(name)["layer_selection"]
    if batches is None:
        raise ValueError(f"method {name!r} chooses its layers from training batches; none were given")
    model = with_pooling(load_base_classifier(backbone, quiet_new_head=True), pooling)
    targets = config.target_modules or default_target_modules(str(model.config.model_type))
    scores = layer_gradient_scores(model, batches(int(selection.get("batches", 8))),
                                   lambda m, b: classification_loss(m, b, None), targets)  # fmt: skip
    return select_layers(scores, float(selection["keep"]))


def trainable_parameters(model: Any) -> dict[str, int]:
    """Trainable parameters of ``model``: ``backbone`` (all but the head) and ``head``."""
    from ..detector import head_parameter_ids

    head_ids = head_parameter_ids(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for p in trained if id(p) in head_ids)
    return {"backbone": sum(p.numel() for p in trained) - head, "head": head}
