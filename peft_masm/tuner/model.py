"""MASMModel: the PEFT tuner that injects MASM layers and exposes the regularisers and layer mask."""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import stacked
from .config import DEFAULT_ATTENTION_TARGETS, MASMConfig, no_default_targets_message
from .decomposition import minor_triplets_many
from .layer import BaseModelMismatchError, Linear, MASMLayer
from .mask import LayerMaskController
from .step_hooks import StepState, watch


class MASMModel(BaseTuner):
    """Creates a MASM model from a pretrained transformers vision model.

    Use it through PEFT: ``get_peft_model(model, MASMConfig(...))`` after ``import peft_masm``.

    Besides PEFT's tuner API it offers:
      - ``decompose()``: run the SVD of every layer still waiting for it, in one batch (the only
        place an SVD runs: never in ``forward()`` nor in the loss);
      - ``step_state``: the count of taken optimizer steps and what the last one did. With ``step_hooks`` on
        (the default) the non-finite guard, the regularisers' gradient, the layer mask and the fit bound act
        inside every ``optimizer.step()`` of an optimizer holding the adapter (``step_hooks.py``);
      - ``regularization_loss()``, ``layer_mask``, ``project_fit_bound()``: the mechanisms themselves, to
        inspect them or (``step_hooks=False``) to call them from one's own loop.
    """

    prefix: str = "masm_"
    tuner_layer_cls = MASMLayer
    target_module_mapping = DEFAULT_ATTENTION_TARGETS  # type: ignore[assignment]  # values may be regexes

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        self._layer_masks: dict[str, LayerMaskController] = {}
        self._loading_keys: set[str] = set()
        self._loading_prefix = ""
        self.register_load_state_dict_post_hook(_check_loaded_adapter_complete)
        self.step_state = StepState()
        self._optimizers: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = (
            weakref.WeakKeyDictionary()
        )
        self._warned: set[str] = set()
        watch(self)

    def _prepare_adapter_config(self, peft_config: MASMConfig, model_config: dict) -> MASMConfig:  # type: ignore[override]
        """Default targets from MASM's own table; MASM's error (naming the known types) for any other model."""
        if (
            peft_config.target_modules is None
            and model_config.get("model_type") not in self.target_module_mapping
        ):
            raise ValueError(no_default_targets_message(model_config.get("model_type")))
        return super()._prepare_adapter_config(peft_config, model_config)  # type: ignore[return-value]

    @staticmethod
    def _check_target_module_exists(peft_config: MASMConfig, key: str) -> bool | re.Match[str] | None:  # type: ignore[override]
        """PEFT's match, with ``layers_to_transform`` applied to a regex ``target_modules`` too: PEFT applies the
        layer indices to a list of names only, and MASM's default targets for CLIP, SigLIP, ... are regexes."""
        found = BaseTuner._check_target_module_exists(peft_config, key)
        layers = peft_config.layers_to_transform
        if not found or not isinstance(peft_config.target_modules, str) or layers is None:
            return found
        index = _layer_index(key, peft_config.layers_pattern)
        return index is not None and index in ([layers] if isinstance(layers, int) else layers)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Inject MASM layers; a trainable adapter is decomposed at once, a loaded one never is."""
        self.peft_config[adapter_name].check_weights_to_load()
        self._check_model_type(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._forget_layers()  # an existing MASM layer may have gained this adapter without being replaced
        # Adapters created for training (get_peft_model, add_adapter) get their SVD now, so that edits,
        # optimizers and wrappers see the real factors. Adapters injected in inference mode, which is
        # how PeftModel.from_pretrained builds them before loading their weights, stay lazy: loading
        # fills them without any SVD.
        if not self.peft_config[adapter_name].inference_mode:
            self.decompose(adapter_name)

    @staticmethod
    def _check_model_type(model: nn.Module, config: MASMConfig) -> None:
        """A saved adapter must go onto a model of the type it was created on; a new one records the type."""
        model_type = BaseTuner.get_model_config(model).get("model_type")
        saved = config.base_model_type
        # A config read from disk (MASMConfig.from_pretrained marks it), or injected for inference, describes a
        # saved adapter; any other config is a new adapter, which records the type (even if reused from another).
        from_disk = getattr(config, "loaded_from", None) is not None or config.inference_mode
        if not from_disk or saved is None:
            config.base_model_type = model_type
            return
        if model_type != saved:
            where = getattr(config, "loaded_from", None)
            raise BaseModelMismatchError(
                f"This MASM adapter{f' ({where})' if where else ''} was trained on a model of type {saved!r}, but it "
                f"is being loaded onto a {type(model).__name__} of type {model_type!r}: load it onto the base model "
                f"named by `base_model_name_or_path` ({config.base_model_name_or_path!r})."
            )

    def _create_and_replace(  # type: ignore[override]  # narrower config type
        self,
        masm_config: MASMConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, MASMLayer):
            target.update_layer(adapter_name, masm_config, current_key=current_key)
            return
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"Target module '{current_key}' is the output projection of an nn.MultiheadAttention, which reads its "
                "weight directly and never calls it, so a MASM adapter there would not train but would still be "
                "merged: add it to `exclude_modules` (or narrow `target_modules`)."
            )
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"Target module '{current_key}' is a {type(target).__name__}; MASM adapts torch.nn.Linear layers only. "
                "Change `target_modules` (or add it to `exclude_modules`)."
            )
        new_module = Linear(target, adapter_name, masm_config, current_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed adapter batches: ``model(x, adapter_names=[...])`` routes each sample to its adapter."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set().union(*(layer.masm_U.keys() for _, layer in self._all_masm_layers()))
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        handles = [
            layer.register_forward_pre_hook(
                partial(_pass_adapter_names, adapter_names=adapter_names), with_kwargs=True
            )
            for _, layer in self._all_masm_layers()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        super()._replace_module(parent, child_name, new_module, child)
        self._forget_layers()  # injection and unloading both replace modules

    def _forget_layers(self) -> None:
        """Drop the lists ``masm_layers`` keeps (whenever modules or adapters are added, replaced or deleted)."""
        self.__dict__["_masm_layer_lists"] = {}
        self.__dict__["_optimizers"] = weakref.WeakKeyDictionary()

    def _all_masm_layers(self) -> Iterator[tuple[str, MASMLayer]]:
        return ((name, m) for name, m in self.model.named_modules() if isinstance(m, MASMLayer))

    # ------------------------------------------------------------------------------------ helpers
    def masm_layers(self, adapter_name: str | None = None) -> Iterator[tuple[str, MASMLayer]]:
        """``(name, layer)`` for each MASM layer holding ``adapter_name`` (default: the active adapter).

        The list is found once and kept until modules or adapters change (injection, unloading, deletion): walking
        the module tree costs ~2 ms of Python on a ViT-L/14, and the fit bound and the regularisers ask at every
        step."""
        adapter_name = adapter_name or self.active_adapters[0]
        lists = self.__dict__.setdefault("_masm_layer_lists", {})
        if adapter_name not in lists:
            lists[adapter_name] = [
                (name, module)
                for name, module in self.model.named_modules()
                if isinstance(module, MASMLayer) and adapter_name in module.masm_U
            ]
        return iter(lists[adapter_name])

    @torch.no_grad()
    def decompose(self, adapter_name: str | None = None) -> int:
        """Run the SVD of every layer whose factors were neither computed nor loaded; returns how many."""
        names = [adapter_name] if adapter_name else sorted(self.peft_config)
        todo = [
            (layer, name)
            for name in names
            for _, layer in self.masm_layers(name)
            if layer.pending_decomposition(name) and layer.get_base_layer().weight.device.type != "meta"
        ]
        if not todo:
            return 0
        weights = [layer.get_base_layer().weight for layer, _ in todo]
        module_names = {id(layer): name for name, layer in self.model.named_modules()}
        for (layer, _), weight in zip(todo, weights):
            if not torch.isfinite(weight).all():
                bad = int((~torch.isfinite(weight)).sum())
                raise ValueError(
                    f"The base weight of '{module_names.get(id(layer), '?')}' holds {bad} NaN/inf values, so it has no SVD: "
                    "load a healthy checkpoint of the base model (or add this module to `exclude_modules`)."
                )
        totals = [layer.masm_num_subspaces[name] * layer.masm_subspace_rank[name] for layer, name in todo]
        for (layer, name), triplets in zip(todo, minor_triplets_many(weights, totals)):
            layer.set_decomposition(name, triplets)
        return len(todo)

    # ------------------------------------------------------------------------- optimizer steps
    def acts_on(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether MASM's step hooks act at ``optimizer.step()``: ``step_hooks`` is on for the active adapter and the
        optimizer holds a MASM factor of this model (checked once per optimizer and parameter count)."""
        if not self.active_adapters or not self.peft_config[self.active_adapters[0]].step_hooks:
            return False
        size = sum(len(group["params"]) for group in optimizer.param_groups)
        known = self._optimizers.get(optimizer)
        if known is None or known[0] != size:
            ours = {id(p) for name in self.peft_config for p in self.trainable_factors(name)}
            holds = any(id(p) in ours for group in optimizer.param_groups for p in group["params"])
            known = self._optimizers[optimizer] = (size, holds)
        return known[1]

    def trainable_factors(self, adapter_name: str | None = None) -> list[torch.Tensor]:
        """The factor tensors (``U``, ``s``, ``V``) of every layer holding ``adapter_name`` (default: active)."""
        adapter_name = adapter_name or self.active_adapters[0]
        return [
            p
            for _, layer in self.masm_layers(adapter_name)
            for factor in ("masm_U", "masm_s", "masm_V")
            for p in layer.trainable_tensors(factor, adapter_name)
        ]

    def _deprecated_call(self, name: str, replacement: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"{name} is deprecated: {replacement}", FutureWarning, stacklevel=3)

    def regularization_loss(
        self, adapter_name: str | None = None, compute_all: bool = False
    ) -> dict[str, torch.Tensor]:
        """MASM's regularisers, averaged over layers: ``orthogonality``, ``spectral`` and their weighted ``total``.

        With ``step_hooks`` on (the default) their gradient reaches the factors at ``optimizer.step()`` without a
        loss term, and this call is for inspection. A loop that still adds ``total`` to its loss (called with
        gradients enabled, in training mode) is honoured: the step hook then adds nothing for that step. When both
        weights are 0 nothing is computed (``total`` is 0, the terms NaN) unless ``compute_all=True``.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        if self.peft_config[adapter_name].step_hooks and torch.is_grad_enabled() and self.training:
            self._deprecated_call(
                "Adding regularization_loss()['total'] to the loss",
                "with step_hooks=True the regularisers reach the gradient at optimizer.step() by themselves; "
                "drop the term from the loss (read the last values from model.base_model.step_state.regularization).",
            )
            self.step_state.explicit_regularization_step = self.step_state.num_steps
        return self.regularization_terms(adapter_name, compute_all)

    def regularization_terms(
        self, adapter_name: str | None = None, compute_all: bool = False
    ) -> dict[str, torch.Tensor]:
        """The regularisers as :meth:`regularization_loss` returns them, with no bookkeeping (the step hook's call)."""
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        layers = [layer for _, layer in self.masm_layers(adapter_name)]
        if not layers:
            raise ValueError(f"No MASM layer holds adapter '{adapter_name}'.")
        if not compute_all and config.orthogonality_weight == 0 and config.spectral_weight == 0:
            device = layers[0].masm_U0[adapter_name].device
            not_computed = torch.full((), float("nan"), device=device)
            return {
                "orthogonality": not_computed,
                "spectral": not_computed,
                "total": torch.zeros((), device=device),
            }
        terms = stacked.mean_regularization_terms(layers, adapter_name)
        orthogonality, spectral = terms["orthogonality"], terms["spectral"]
        total = config.orthogonality_weight * orthogonality + config.spectral_weight * spectral
        return {"orthogonality": orthogonality, "spectral": spectral, "total": total}

    @torch.no_grad()
    def apply_fit_bound(self, adapter_name: str | None = None) -> torch.Tensor:
        """Project every subspace that outgrew ``fit_bound * rho`` back onto the bound (see
        :meth:`project_fit_bound`). With ``step_hooks`` on this runs after every ``optimizer.step()`` by itself:
        the first call after a step returns that step's count and projects nothing again (deprecated)."""
        state = self.step_state
        adapter = adapter_name or self.active_adapters[0]
        if self.peft_config[adapter].step_hooks:
            self._deprecated_call(
                "apply_fit_bound()", "with step_hooks=True the fit bound acts after every optimizer.step()."
            )
            if state.hook_projected is not None:
                limited, state.hook_projected = state.hook_projected, None
                return limited
        return self.project_fit_bound(adapter_name)

    @torch.no_grad()
    def project_fit_bound(self, adapter_name: str | None = None) -> torch.Tensor:
        """Project every subspace that outgrew ``fit_bound * rho`` back onto the bound
        (``fit_constraint="projection"``; a no-op otherwise). Returns how many subspaces were limited (0-d
        tensor, left on the layers' device: no host sync per optimizer step)."""
        adapter_name = adapter_name or self.active_adapters[0]
        if self.peft_config[adapter_name].fit_constraint != "projection":
            return torch.zeros((), dtype=torch.long)
        return stacked.project_fit_bound([layer for _, layer in self.masm_layers(adapter_name)], adapter_name)

    @torch.no_grad()
    def subspace_movement(self, adapter_name: str | None = None) -> dict[str, list[float]]:
        """Per layer, how far each artifact subspace moved from its start, in units of the layer's scale rho
        (``||U_j s_j V_j^T - U_j0 s_j0 V_j0^T||_F / rho``), and its spectral norm in the same unit."""
        adapter_name = adapter_name or self.active_adapters[0]
        named = list(self.masm_layers(adapter_name))
        moved = stacked.subspace_movement([layer for _, layer in named], adapter_name)
        return {name: values.tolist() for (name, _), values in zip(named, moved)}

    # ---------------------------------------------------------------------------------- layer mask
    @property
    def layer_mask(self) -> LayerMaskController:
        """The layer-mask controller of the active adapter (statistics, decisions, history).

        Register it for checkpointing: ``accelerator.register_for_checkpointing(model.base_model.layer_mask)``.
        """
        adapter_name = self.active_adapters[0]
        if adapter_name not in self._layer_masks:
            layers = list(self.masm_layers(adapter_name))
            self._layer_masks[adapter_name] = LayerMaskController(
                layers, self.peft_config[adapter_name], adapter_name
            )
        return self._layer_masks[adapter_name]

    def update_layer_mask(self, global_step: int | None = None) -> None:
        """The layer mask for the coming optimizer step: statistics, a decision when due, masked gradients dropped.

        With ``step_hooks`` on (the default) ``optimizer.step()`` runs this by itself (deprecated here: an explicit
        call acts once and the step hook then skips the mask for that step). With ``step_hooks=False`` call it once
        per optimizer step, after ``backward()`` and gradient clipping and before ``optimizer.step()`` (with
        gradient accumulation: only when ``accelerator.sync_gradients``); it then advances the step count.
        """
        if global_step is not None:
            warnings.warn(
                "update_layer_mask(global_step) is deprecated: the step count is kept by the model "
                "(model.base_model.step_state); call update_layer_mask() with no argument.",
                FutureWarning,
                stacklevel=2,
            )
        state = self.step_state
        step = state.num_steps + 1
        if self.peft_config[self.active_adapters[0]].step_hooks:
            self._deprecated_call(
                "update_layer_mask()",
                "with step_hooks=True the layer mask acts inside every optimizer.step().",
            )
            state.explicit_mask_step = step
        else:
            state.num_steps = step
        self.layer_mask.step(step)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter and its layer-mask statistics."""
        super().delete_adapter(adapter_name)
        self._forget_layers()
        self._layer_masks.pop(adapter_name, None)

    # ------------------------------------------------------------------- PEFT helpers MASM cannot honour
    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """Not supported: a weighted sum of MASM adapters is not a MASM adapter (their SVD bases differ)."""
        raise NotImplementedError(
            "MASM does not support add_weighted_adapter (each adapter lives in its own SVD basis): route samples to "
            "adapters with model(x, adapter_names=[...]), or export each adapter to LoRA with "
            "peft.save_as_lora and combine the LoRA adapters."
        )

    def subtract_mutated_init(self, *args, **kwargs) -> None:
        """Not supported: this is LoRA's PiSSA/OLoRA conversion; MASM adapters export with peft.save_as_lora."""
        raise NotImplementedError(
            "MASM does not support subtract_mutated_init (a LoRA PiSSA/OLoRA helper); to get a plain LoRA adapter "
            "from a MASM one, use peft.save_as_lora."
        )

    # --------------------------------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Remember which MASM keys this load brings, to check them against the model once it is done.
        self._loading_keys = {key for key in state_dict if key.startswith(prefix) and ".masm_" in key}
        self._loading_prefix = prefix
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_keys(self) -> None:
        """After a load that brought MASM weights: each loaded adapter's targets all got theirs, and all were used."""
        keys, self._loading_keys = self._loading_keys, set()
        if not keys:
            return
        root = f"{self._loading_prefix}model."
        loaded = {_split_masm_key(key.removeprefix(root)) for key in keys if key.startswith(root)}
        layers = dict(self._all_masm_layers())
        # PEFT puts the adapter name into the keys of layers the model has; other keys keep their saved form.
        adapters = {adapter for name, adapter in loaded if name in layers and adapter in layers[name].masm_U}
        expected = {
            (name, adapter) for name, layer in layers.items() for adapter in adapters & set(layer.masm_U)
        }
        missing = sorted(name for name, _ in expected - loaded)
        unused = sorted({name for name, _ in loaded if name not in layers})
        if not missing and not unused:
            return
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} target layer(s) of this model have no saved weights (e.g. '{missing[0]}')"
            )
        if unused:
            parts.append(
                f"{len(unused)} saved layer(s) are not MASM targets of this model (e.g. '{unused[0]}')"
            )
        model_type = BaseTuner.get_model_config(self.model).get("model_type")
        raise BaseModelMismatchError(
            f"The MASM adapter does not fit this {type(self.model).__name__} (model_type={model_type!r}): "
            + "; ".join(parts)
            + ". Load it onto the base model it was trained on (`base_model_name_or_path` in adapter_config.json)."
        )


def _split_masm_key(key: str) -> tuple[str, str]:
    """``'vit.layers.0.q_proj.masm_U.default.0'`` -> ``('vit.layers.0.q_proj', 'default')``."""
    layer, rest = key.split(".masm_", 1)
    parts = rest.split(".")
    return layer, parts[1] if len(parts) > 1 else ""


def _check_loaded_adapter_complete(module: MASMModel, incompatible_keys) -> None:
    module._check_loaded_keys()


def _pass_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index in module name ``key`` as PEFT reads it: the first numbered component, or the number after
    one of ``layers_pattern``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        match = re.match(regex, key)
        if match is not None:
            return int(match.group("idx"))
    return None
