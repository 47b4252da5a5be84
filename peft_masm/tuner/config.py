"""MASMConfig, the configuration of a MASM adapter (each field's help text and validation), and the default
target modules per ``model_type``.

The field table of docs/configuration.md is generated from the fields and their help here
(``tests/unit/test_config_reference.py``); the reasons for the defaults are in docs/method.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal, cast

from packaging.version import InvalidVersion, Version
from peft.config import PeftConfig

from .files import AdapterWeightsNotFoundError, check_adapter_weights_complete, missing_weights_message
from .registration import masm_peft_type
from .version import __version__

PARTITIONS = ("contiguous", "interleaved")
TRAIN_FACTORS = ("all", "singular_values", "vectors")
LAYER_MASK_MODES = ("dynamic", "static", "none")
MASK_GRANULARITIES = ("layer", "subspace")
FIT_CONSTRAINTS = ("projection", "penalty", "none")
NON_FINITE_ACTIONS = ("raise", "skip")

# Attention projections per `model.config.model_type` (checked against transformers 5.23 on tiny
# configs, tests/tuner/test_default_targets.py). Plain names match a module name's last component(s);
# a string is a regex over the whole module name. The patterns only match inside the vision encoder:
# a full CLIP/SigLIP model keeps its text tower frozen, and SigLIP's pooling head (an
# nn.MultiheadAttention, which reads its `out_proj.weight` without calling the module) is never a target.
_SELF_ATTN = r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_ATTENTION_TARGETS: dict[str, list[str] | str] = {
    "clip_vision_model": _SELF_ATTN,
    "clip": r".*vision_model.*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "siglip_vision_model": _SELF_ATTN,
    "siglip": r".*vision_model.*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "siglip2_vision_model": _SELF_ATTN,
    "siglip2": r".*vision_model.*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "vit": list(_QKVO),
    "deit": list(_QKVO),
    "beit": list(_QKVO),
    "vit_mae": list(_QKVO),
    "vit_msn": list(_QKVO),
    "ijepa": list(_QKVO),
    "dinov2": list(_QKVO),
    "dinov2_with_registers": list(_QKVO),
    "dinov3_vit": list(_QKVO),
    "swin": list(_QKVO),
    "data2vec-vision": r".*\.attention\.(attention\.(query|key|value)|output\.dense)",
    "hiera": r".*\.attn\.(qkv|proj)",
}
_FC = ["fc1", "fc2"]
DEFAULT_MLP_TARGETS: dict[str, list[str] | str] = {
    "clip_vision_model": r".*\.mlp\.(fc1|fc2)",
    "clip": r".*vision_model.*\.mlp\.(fc1|fc2)",
    "siglip_vision_model": r".*encoder\.layers\.\d+\.mlp\.(fc1|fc2)",
    "siglip": r".*vision_model\.encoder.*\.mlp\.(fc1|fc2)",
    "siglip2_vision_model": r".*encoder\.layers\.\d+\.mlp\.(fc1|fc2)",
    "siglip2": r".*vision_model\.encoder.*\.mlp\.(fc1|fc2)",
    "vit": list(_FC),
    "deit": list(_FC),
    "beit": list(_FC),
    "vit_mae": list(_FC),
    "vit_msn": list(_FC),
    "ijepa": list(_FC),
    "dinov2": list(_FC),
    "dinov2_with_registers": list(_FC),
    "dinov3_vit": ["up_proj", "down_proj"],
    "swin": list(_FC),
    "data2vec-vision": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    "hiera": r".*\.mlp\.(fc1|fc2)",
}


SaveHook = Callable[["MASMConfig", str], object]
_save_hooks: list[SaveHook] = []


def register_save_hook(hook: SaveHook) -> None:
    """Deprecated: run ``hook(config, save_directory)`` after every ``MASMConfig.save_pretrained`` (once per hook).

    The tuner writes its own model card (``peft_masm.tuner.card``) and ``peft_masm`` registers no hook any more;
    a hook registered here still runs, with a FutureWarning at registration.
    """
    import warnings

    warnings.warn(
        "register_save_hook is deprecated and will be removed: MASMConfig.save_pretrained writes the MASM model "
        "card itself; save extra files after model.save_pretrained(...) instead.",
        FutureWarning,
        stacklevel=2,
    )
    if hook not in _save_hooks:
        _save_hooks.append(hook)


def no_default_targets_message(model_type: str | None) -> str:
    """The one-line error for a model type MASM has no default targets for."""
    return (
        f"MASM has no default target modules for model_type={model_type!r} (known: "
        f"{', '.join(sorted(DEFAULT_ATTENTION_TARGETS))}); pass `target_modules` explicitly, e.g. the names "
        "of the attention projections."
    )


def default_target_modules(model_type: str, include_mlp: bool = False) -> list[str] | str:
    """The default MASM targets for a transformers ``model_type``: the attention projections.

    ``include_mlp=True`` adds the MLP's two linear layers, e.g.
    ``MASMConfig(target_modules=default_target_modules("clip_vision_model", include_mlp=True))``.
    """
    if model_type not in DEFAULT_ATTENTION_TARGETS:
        raise ValueError(no_default_targets_message(model_type))
    attention, mlp = DEFAULT_ATTENTION_TARGETS[model_type], DEFAULT_MLP_TARGETS[model_type]
    if not include_mlp:
        return list(attention) if isinstance(attention, list) else attention
    if isinstance(attention, list) and isinstance(mlp, list):
        return list(attention) + list(mlp)
    return f"(?:{_as_regex(attention)})|(?:{_as_regex(mlp)})"


def _as_regex(targets: list[str] | str) -> str:
    """A target list as the equivalent full-name regex (PEFT matches list entries as name suffixes)."""
    if isinstance(targets, str):
        return targets
    return rf"(?:.*\.)?({'|'.join(targets)})"


@dataclass
class MASMConfig(PeftConfig):
    """Configuration of a MASM adapter (Multi-Artifact Subspaces and selective layer Masks).

    Each targeted ``nn.Linear`` weight ``W`` is split by SVD into a frozen principal subspace (the
    top ``d - K*k`` singular triplets) and ``K`` trainable artifact subspaces of rank ``k`` taken
    from the minor spectrum. ``num_subspaces=1, subspace_rank=1, layer_mask="none"``, zero regulariser
    weights, ``fit_constraint="none"`` and ``subspace_alpha=None`` is Effort (Yan et al., ICML 2025): the
    ``effort`` preset of ``peft_masm.presets``.
    """

    target_modules: list[str] | set[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (or a regex) of the nn.Linear modules to adapt. None picks the attention projections "
            "for the model's `model_type` (see `default_target_modules`, whose `include_mlp=True` adds the MLP)."
        },
    )
    exclude_modules: list[str] | set[str] | str | None = field(
        default=None, metadata={"help": "Names (or a regex) of modules never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Adapt only the layers with these indices: the number after `layers_pattern` in the module's "
            "name (None: its first numbered part). Applies to a list of `target_modules`, not to a regex."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the ModuleList holding the layers, e.g. 'layers' or 'layer'; only with "
            "`layers_to_transform`."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter, e.g. ['classifier'] for a detector head."
        },
    )
    num_subspaces: int = field(default=4, metadata={"help": "K: the number of artifact subspaces per layer."})
    subspace_rank: int = field(default=2, metadata={"help": "k: the rank of each artifact subspace."})
    partition: Literal["contiguous", "interleaved"] = field(
        default="interleaved",
        metadata={
            "help": "How the K*k minor singular triplets are split into subspaces: 'contiguous' bands of the tail "
            "spectrum, or 'interleaved' round-robin so each subspace sees a similar spectrum."
        },
    )
    train_factors: Literal["all", "singular_values", "vectors"] = field(
        default="all",
        metadata={"help": "Which factors train: U, s and V ('all'), only s, or only U and V ('vectors')."},
    )
    subspace_alpha: float | None = field(
        default=100.0,
        metadata={
            "help": "Scale of the trainable singular values: s_j = s_j0 + subspace_alpha * rho * masm_s_j, rho the "
            "layer's RMS singular value, so a subspace's effective learning rate does not depend on how small its "
            "starting singular values are (like lora_alpha, it multiplies the adapter's step). Tuned for Adam, which "
            "moves s by about subspace_alpha * rho * lr per step; plain SGD moves it by lr * (subspace_alpha * rho)**2 "
            "* dL/ds, so with SGD lower the learning rate by that square. None: the raw parametrisation, masm_s is s "
            "itself (Effort's; adapters saved before peft_masm 0.3 load as None)."
        },
    )
    orthogonality_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the orthogonality regulariser (cross-subspace overlap, departure from orthonormality "
            "and leakage into the frozen semantic subspace) in the regularisers' total: its gradient is added "
            "inside optimizer.step() (step_hooks) or the loop adds `regularization_loss()['total']` to its loss. "
            "With both weights 0 nothing is computed."
        },
    )
    spectral_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the spectral-consistency regulariser: the drift of the layer's energy ||W'||_F^2, "
            "plus the fit-bound hinge when fit_constraint='penalty'."
        },
    )
    regularization_interval: int = field(
        default=1,
        metadata={
            "help": "Lazy regularisation: add the regularisers (weighted `regularization_interval` times) at every "
            "N-th optimizer step only, so each costs 1/N of its exact every-step price (the trick StyleGAN2 uses "
            "for its R1 penalty). 1: every step. The terms themselves are unchanged when computed."
        },
    )
    fit_bound: float = field(
        default=1.0,
        metadata={
            "help": "gamma: no artifact subspace's spectral norm may exceed gamma * rho, rho = ||W||_F / sqrt(d) "
            "being the layer's RMS singular value (a scale that is meaningful on any backbone and precision). "
            "Enforced as `fit_constraint` says."
        },
    )
    fit_constraint: Literal["projection", "penalty", "none"] = field(
        default="projection",
        metadata={
            "help": "How the fit bound acts: 'projection' scales a subspace that outgrew it back onto it after "
            "each optimizer step (the subspace keeps training), 'penalty' adds "
            "relu(||U_j s_j V_j^T|| / rho - gamma)^2 to the spectral regulariser, 'none' leaves it off."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the trainable factors start at their SVD values, so the adapter is an exact identity. "
            "False: a small random perturbation (a non-identity start, for tests)."
        },
    )
    check_base_model: bool = field(
        default=True,
        metadata={
            "help": "On load, compare each target weight with the fingerprint saved with the adapter and raise if "
            "the adapter was trained on another base model."
        },
    )
    layer_mask: Literal["dynamic", "static", "none"] = field(
        default="none",
        metadata={
            "help": "Selective layer mask: 'dynamic' (periodic GSNR decisions during training: our reading of the "
            "paper's mask), 'static' (one decision from a calibration pass before training), or 'none' (every layer "
            "trains). The default is 'none': on the cross-forgery benchmark the mask had no measurable effect and "
            "validation preferred training every layer (docs/method.md, 'Why the defaults')."
        },
    )
    mask_granularity: Literal["layer", "subspace"] = field(
        default="layer", metadata={"help": "Mask whole layers or single (layer, subspace) pairs."}
    )
    mask_keep_ratio: float = field(
        default=0.75,
        metadata={"help": "Fraction of layers (or subspaces) kept trainable at each decision, in (0, 1]."},
    )
    mask_interval: int = field(
        default=20, metadata={"help": "Optimizer steps between two mask decisions (dynamic mode)."}
    )
    mask_warmup: int = field(
        default=20,
        metadata={
            "help": "The optimizer step of the first mask decision (dynamic mode); 0: the first decision comes at "
            "step `mask_interval`."
        },
    )
    mask_ema_decay: float = field(
        default=0.9,
        metadata={"help": "Decay of the exponential moving averages of the gradients, in [0, 1)."},
    )
    step_hooks: bool = field(
        default=True,
        metadata={
            "help": "True: the non-finite guard, the regularisers' gradient, the layer mask, the fit bound and the "
            "step count act inside every optimizer.step() of an optimizer holding the adapter (torch optimizer "
            "hooks), so a plain PyTorch loop or the stock transformers.Trainer trains MASM with no MASM call. "
            "False: the loop calls them itself (peft_masm.TrainingStep does)."
        },
    )
    on_non_finite: Literal["raise", "skip"] = field(
        default="raise",
        metadata={
            "help": "A NaN/inf gradient at an optimizer step: 'raise' NonFiniteLossError naming the step, or "
            "'skip' the step with a warning (nothing is written to the adapter)."
        },
    )
    base_model_type: str | None = field(
        default=None,
        metadata={
            "help": "The `model_type` of the model the adapter was created on; filled in by get_peft_model. "
            "Loading the adapter onto a model of another type raises BaseModelMismatchError."
        },
    )
    peft_masm_version: str = field(
        default=__version__,
        metadata={
            "help": "The peft_masm version that wrote this config; an adapter saved by a newer version than the "
            "one installed is refused with the version to install."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = masm_peft_type()
        check_saved_version(self.peft_masm_version)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        _check_integer(self, "num_subspaces", minimum=1)
        _check_integer(self, "subspace_rank", minimum=1)
        _check_integer(self, "mask_interval", minimum=1)
        _check_integer(self, "mask_warmup", minimum=0)
        _check_integer(self, "regularization_interval", minimum=1)
        for name in ("orthogonality_weight", "spectral_weight"):
            _check_real(self, name, "a finite number >= 0", lambda v: v >= 0)
        _check_real(self, "fit_bound", "a finite number > 0", lambda v: v > 0)
        if self.subspace_alpha is not None:
            _check_real(self, "subspace_alpha", "None or a finite number > 0", lambda v: v > 0)
        _check_real(self, "mask_keep_ratio", "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_real(self, "mask_ema_decay", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
        for name in ("init_weights", "check_base_model", "step_hooks"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"MASMConfig.{name} must be True or False, got {value!r} ({type(value).__name__})."
                )
        choices = {
            "partition": PARTITIONS,
            "train_factors": TRAIN_FACTORS,
            "layer_mask": LAYER_MASK_MODES,
            "mask_granularity": MASK_GRANULARITIES,
            "fit_constraint": FIT_CONSTRAINTS,
            "on_non_finite": NON_FINITE_ACTIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MASMConfig.{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("MASMConfig.layers_pattern only makes sense together with layers_to_transform.")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save ``adapter_config.json`` (recording this peft_masm version); then, beside the adapter's weights,
        replace PEFT's blank README.md with the MASM card (``card.write_adapter_card``; another card is kept)."""
        from .card import write_adapter_card

        self.peft_masm_version = __version__
        super().save_pretrained(save_directory, **kwargs)
        write_adapter_card(self, save_directory)
        for hook in _save_hooks:  # deprecated (register_save_hook)
            hook(self, save_directory)

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Refuse an adapter_config.json written by a newer peft_masm (PEFT calls this before building the config)."""
        check_saved_version(kwargs.get("peft_masm_version"))
        # Adapters saved before the scaled parametrisation existed store s itself in masm_s.
        kwargs.setdefault("subspace_alpha", None)
        return super().check_kwargs(**kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> MASMConfig:
        """Load the config, and check that the adapter's weight file beside it is complete."""
        config = cast(
            MASMConfig, super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        )
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        check_adapter_weights_complete(
            folder, repo_id=pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        # Not a dataclass field, so never saved: tells the tuner this config describes a saved adapter, whose
        # base_model_type is a fact to check rather than a value to fill in.
        setattr(config, "loaded_from", str(pretrained_model_name_or_path))  # noqa: B010
        # A config may be read alone, so a folder without weights is refused only when an adapter is loaded from it
        # (check_weights_to_load), before PEFT takes the folder for a Hub id.
        setattr(config, "missing_weights", missing_weights_message(folder))  # noqa: B010
        return config

    def check_weights_to_load(self) -> None:
        """Raise :class:`AdapterWeightsNotFoundError`, naming the missing file, when this config was read from a local
        adapter folder without its weight file and an adapter is injected from it to load its weights (inference
        mode: ``PeftModel.from_pretrained``, ``load_adapter``). Called by ``MASMModel.inject_adapter``."""
        missing = getattr(self, "missing_weights", None)
        if missing and self.inference_mode:
            raise AdapterWeightsNotFoundError(missing)

    @property
    def total_rank(self) -> int:
        """K * k: the number of minor singular triplets each target layer trains."""
        return self.num_subspaces * self.subspace_rank

    @property
    def per_subspace_parameters(self) -> bool:
        """Whether each layer holds one ``U``, ``s`` and ``V`` tensor per subspace (K of each) instead of one of each
        for all K subspaces together: only a mask over single subspaces needs them (it drops a masked subspace's
        gradient, so that the optimizer leaves it untouched). Saved adapters have per-subspace keys either way."""
        return self.layer_mask != "none" and self.mask_granularity == "subspace"


def _check_integer(config: MASMConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"MASMConfig.{name} must be {kind}, got {value!r} ({type(value).__name__}).")


def _check_real(config: MASMConfig, name: str, expected: str, accept: Any) -> None:
    value = getattr(config, name)
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and accept(value)
    if not ok:
        hint = " (a string: write the number without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"MASMConfig.{name} must be {expected}, got {value!r}{hint}.")


def check_saved_version(saved: str | None) -> None:
    """Raise when an adapter was written by a newer peft_masm than the installed one."""
    if not saved:
        return
    try:
        newer = Version(saved) > Version(__version__)
    except InvalidVersion:
        raise ValueError(
            f"adapter_config.json has peft_masm_version={saved!r}, which is not a version number; fix or remove it."
        ) from None
    if newer:
        raise ValueError(
            f"This adapter was saved by peft_masm {saved}, newer than the installed {__version__}: "
            f"run `pip install -U 'peft_masm>={saved}'` to load it."
        )
