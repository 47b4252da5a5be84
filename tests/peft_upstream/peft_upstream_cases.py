"""MASM cases for PEFT's generic tuner tests: the models and the configs they run over.

Upstream's case lists are tuples ``(test_name, model_id, config_cls, config_kwargs)`` and
``(test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2)``; ours have the same shape.
MASM needs ``num_subspaces * subspace_rank < min(in_features, out_features)`` for every target, so
upstream's ``MLP.lin1`` (20 -> 2) takes at most ``K = k = 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ViTConfig, ViTModel, ViTPreTrainedModel

from peft_masm import MASMConfig

# The options every case sets explicitly, so a change of MASMConfig's defaults does not change the cases. The
# cases train at MASM's default subspace_alpha; the upstream tests whose plain-SGD learning rate that default
# cannot take run at a lower one (UPSTREAM_SGD_LR in test_upstream_custom_models.py says why).
K2 = {"num_subspaces": 2, "subspace_rank": 2}
K1 = {"num_subspaces": 1, "subspace_rank": 1}


def tiny_vit_config() -> ViTConfig:
    """A 2-layer ViT (hidden 16, MLP 32) reading a 1 x 4 x 4 image, without dropout."""
    return ViTConfig(
        image_size=4,
        patch_size=2,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # 0.02 (the default) leaves attention nearly uniform, so the minor directions of q/k get gradients
        # too small for upstream's "every adapter parameter moves in 3 SGD steps" check
        initializer_range=0.2,
    )


class TinyViT(ViTPreTrainedModel):
    """A tiny transformers ViT classifier that takes the tests' ``X`` (N x 10 integers).

    ``X`` is padded to 16 values and read as a 1 x 4 x 4 image; the output is the log-probabilities
    of a two-class head on the CLS token, a tensor like upstream's MLP returns. It is a real
    ``PreTrainedModel`` (PEFT inspects those differently from plain modules) with
    ``model_type="vit"``, so MASM's default targets for ViT apply. Like upstream's test models,
    ``dtype`` is assignable: the tests set it to the dtype the inputs must be cast to.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.input_dtype = torch.float32
        self.post_init()

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.input_dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        self.input_dtype = value

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype) / 90.0
        pixels = torch.cat([X, X[:, :6]], dim=1).view(-1, 1, 4, 4)
        hidden = self.vit(pixel_values=pixels).last_hidden_state
        return self.sm(self.head(hidden[:, 0]))


class MASMModels:
    """Stands in for upstream's ``MockTransformerWrapper``: ``from_pretrained(model_id, dtype)``.

    Knows ``"TinyViT"`` and otherwise defers to upstream's models (``"MLP"``, ``"MLP_LayerNorm"``, ...).
    """

    upstream: Any = None  # set to upstream's MockTransformerWrapper by the test module

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None) -> nn.Module:
        torch.manual_seed(0)
        dtype = dtype or torch.float32
        if model_id == "TinyViT" or (Path(model_id) / "config.json").is_file():
            if model_id != "TinyViT":  # a merged model saved by a test: reload it like transformers would
                return TinyViT.from_pretrained(model_id, dtype=dtype)
            model = TinyViT(tiny_vit_config()).to(dtype)
            model.dtype = dtype
            # as transformers' from_pretrained would: PEFT records it as base_model_name_or_path
            model.config._name_or_path = model.name_or_path = model_id
            return model
        return cls.upstream.from_pretrained(model_id, dtype=dtype)


# Identity at initialisation, as upstream's cases are: the tests that need a non-identity adapter apply
# upstream's `set_init_weights_false`, which sets MASM's `init_weights=False`.
TEST_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    ("Vanilla MLP 1 MASM", "MLP", MASMConfig, {"target_modules": "lin0", **K2}),
    ("Vanilla MLP 2 MASM", "MLP", MASMConfig, {"target_modules": ["lin0"], **K2}),
    ("Vanilla MLP 3 MASM", "MLP", MASMConfig, {"target_modules": ["lin1"], **K1}),
    ("Vanilla MLP 4 MASM", "MLP", MASMConfig, {"target_modules": ["lin0", "lin1"], **K1}),
    (
        "Vanilla MLP 5 MASM",
        "MLP",
        MASMConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **K2},
    ),
    (
        "Vanilla MLP 6 MASM",
        "MLP",
        MASMConfig,
        {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"], **K2},
    ),
    (
        "Vanilla MLP 7 MASM",
        "MLP",
        MASMConfig,
        {
            "target_modules": ["lin0"],
            "partition": "contiguous",
            "train_factors": "singular_values",
            "num_subspaces": 3,
            "subspace_rank": 3,
        },
    ),  # fmt: skip
    (
        "Vanilla MLP 8 MASM",
        "MLP",
        MASMConfig,
        {
            "target_modules": ["lin0"],
            "partition": "interleaved",
            "train_factors": "vectors",
            "layer_mask": "none",
            "orthogonality_weight": 0.1,
            "spectral_weight": 0.1,
            **K2,
        },
    ),  # fmt: skip
    ("MLP LayerNorm MASM", "MLP_LayerNorm", MASMConfig, {"target_modules": ["lin0", "lin1"], **K1}),
    ("MLP2 MASM", "MLP2", MASMConfig, {"target_modules": ["lin0"], "num_subspaces": 4, "subspace_rank": 2}),
    ("TinyViT 1 MASM", "TinyViT", MASMConfig, {**K2}),  # target_modules=None: MASM's defaults for "vit"
    (
        "TinyViT 2 MASM",
        "TinyViT",
        MASMConfig,
        {"target_modules": ["q_proj", "v_proj", "fc1", "fc2"], "modules_to_save": ["head"], **K2},
    ),
    (
        "TinyViT 3 MASM",
        "TinyViT",
        MASMConfig,
        {
            "target_modules": ["q_proj", "o_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
            "num_subspaces": 3,
            "subspace_rank": 1,
        },
    ),  # fmt: skip
]

ALL_PEFT_CONFIG_CLASSES = [MASMConfig]

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: list[tuple[str, str, type, dict[str, Any], dict[str, Any]]] = [
    (
        "MASM Same",
        "masm",
        MASMConfig,
        {"target_modules": ["lin0"], "init_weights": False, **K2},
        {"target_modules": ["lin0"], "init_weights": False, **K2},
    ),
    (
        "MASM Different",
        "masm",
        MASMConfig,
        {"target_modules": ["lin0"], "init_weights": False, **K2},
        {"target_modules": ["lin1"], "init_weights": False, **K1},
    ),
    (
        "MASM Same, different shapes",
        "masm",
        MASMConfig,
        {"target_modules": ["lin0"], "init_weights": False, "partition": "contiguous", **K2},
        {"target_modules": ["lin0", "lin1"], "init_weights": False, "partition": "interleaved", **K1},
    ),
]

MIXED_ADAPTER_TEST_CASES: list[tuple[str, MASMConfig, MASMConfig]] = [
    (
        "MASM mixed adapter",
        MASMConfig(target_modules=["lin0"], init_weights=False, **K2),
        MASMConfig(target_modules=["lin0"], init_weights=False, num_subspaces=1, subspace_rank=3),
    ),
]

# test_config.py: (config class, mandatory kwargs)
ALL_CONFIG_CLASSES: tuple[tuple[type, dict[str, Any]], ...] = ((MASMConfig, {}),)
