"""MASMConfig: the configuration of a MASM adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .registration import masm_peft_type

PARTITIONS = ("contiguous", "interleaved")
TRAIN_FACTORS = ("all", "singular_values", "vectors")
LAYER_MASK_MODES = ("dynamic", "static", "none")
MASK_GRANULARITIES = ("layer", "subspace")

# Attention projections per `model.config.model_type` (checked against transformers 5.23). The
# patterns only match inside the vision tower, so a full CLIP/SigLIP model keeps its text tower frozen.
DEFAULT_ATTENTION_TARGETS: dict[str, list[str] | str] = {
    "clip_vision_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip": r".*vision_model.*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "siglip_vision_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "siglip": r".*vision_model.*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "dinov2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
DEFAULT_MLP_TARGETS: dict[str, list[str] | str] = {
    "clip_vision_model": ["fc1", "fc2"],
    "clip": r".*vision_model.*\.mlp\.(fc1|fc2)",
    "siglip_vision_model": [r"encoder\.layers\.\d+\.mlp\.fc1", r"encoder\.layers\.\d+\.mlp\.fc2"],
    "siglip": r".*vision_model\.encoder.*\.mlp\.(fc1|fc2)",
    "vit": ["fc1", "fc2"],
    "dinov2": ["fc1", "fc2"],
}


def default_target_modules(model_type: str, include_mlp: bool = False) -> list[str] | str:
    """The default MASM targets for a transformers ``model_type``: the attention projections.

    ``include_mlp=True`` adds the MLP's two linear layers, e.g.
    ``MASMConfig(target_modules=default_target_modules("clip_vision_model", include_mlp=True))``.
    """
    if model_type not in DEFAULT_ATTENTION_TARGETS:
        raise ValueError(
            f"MASM has no default target modules for model_type={model_type!r} (known: {sorted(DEFAULT_ATTENTION_TARGETS)}); "
            "pass `target_modules` explicitly, e.g. the names of the attention projections."
        )
    attention, mlp = DEFAULT_ATTENTION_TARGETS[model_type], DEFAULT_MLP_TARGETS[model_type]
    if not include_mlp:
        return list(attention) if isinstance(attention, list) else attention
    if isinstance(attention, str):
        return f"(?:{attention})|(?:{mlp})"
    if all("\\" not in name for name in mlp):
        return list(attention) + list(mlp)
    names = "|".join(attention)
    return rf"(?:.*\.({names}))|(?:{'|'.join(mlp)})"


@dataclass
class MASMConfig(PeftConfig):
    """Configuration of a MASM adapter (Multi-Artifact Subspaces and selective layer Masks).

    Each targeted ``nn.Linear`` weight ``W`` is split by SVD into a frozen principal subspace (the
    top ``d - K*k`` singular triplets) and ``K`` trainable artifact subspaces of rank ``k`` taken
    from the minor spectrum. ``num_subspaces=1, subspace_rank=1, layer_mask="none"`` and zero
    regulariser weights is Effort (Yan et al., ICML 2025).
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
        default=None, metadata={"help": "Adapt only these layer indices (needs a `layers_pattern` match)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the ModuleList holding the layers, e.g. 'layers' or 'layer'."},
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
    orthogonality_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the orthogonality regulariser (cross-subspace, within-subspace and semantic leakage) "
            "in `regularization_loss()['total']`."
        },
    )
    spectral_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the spectral-consistency regulariser (energy drift and fit bound)."},
    )
    fit_bound: float = field(
        default=1.0,
        metadata={
            "help": "gamma: no artifact subspace's spectral norm should exceed gamma * sigma_r (the smallest frozen "
            "singular value). Used by the spectral regulariser and by the dynamic layer mask."
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
            "help": "Selective layer mask: 'dynamic' (periodic GSNR decisions during training, the paper's "
            "mask), 'static' (a calibration pass before training), or 'none' (every adapter trains). The "
            "default is 'none' because our benchmark found the dynamic mask's fit-bound rule freezing every "
            "layer early when sigma_r is tiny (BENCHMARKS.md)."
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
        default=20, metadata={"help": "Optimizer steps before the first mask decision (dynamic mode)."}
    )
    mask_ema_decay: float = field(
        default=0.9,
        metadata={"help": "Decay of the exponential moving averages of the gradients, in [0, 1)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = masm_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        for name in ("num_subspaces", "subspace_rank", "mask_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MASMConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.mask_warmup, int) or self.mask_warmup < 0:
            raise ValueError(
                f"MASMConfig.mask_warmup must be a non-negative integer, got {self.mask_warmup!r}."
            )
        choices = {
            "partition": PARTITIONS,
            "train_factors": TRAIN_FACTORS,
            "layer_mask": LAYER_MASK_MODES,
            "mask_granularity": MASK_GRANULARITIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MASMConfig.{name}={getattr(self, name)!r} is not one of {list(allowed)}.")
        if not 0.0 < self.mask_keep_ratio <= 1.0:
            raise ValueError(f"MASMConfig.mask_keep_ratio must be in (0, 1], got {self.mask_keep_ratio}.")
        if not 0.0 <= self.mask_ema_decay < 1.0:
            raise ValueError(f"MASMConfig.mask_ema_decay must be in [0, 1), got {self.mask_ema_decay}.")
        for name in ("orthogonality_weight", "spectral_weight", "fit_bound"):
            if getattr(self, name) < 0:
                raise ValueError(f"MASMConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("MASMConfig.layers_pattern only makes sense together with layers_to_transform.")

    @property
    def total_rank(self) -> int:
        """K * k: the number of minor singular triplets each target layer trains."""
        return self.num_subspaces * self.subspace_rank
