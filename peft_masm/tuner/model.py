"""MASMModel: the PEFT tuner that injects MASM layers and exposes the regularisers and layer mask."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import DEFAULT_ATTENTION_TARGETS, MASMConfig
from .decomposition import minor_triplets_many
from .layer import Linear, MASMLayer
from .mask import LayerMaskController


class MASMModel(BaseTuner):
    """Creates a MASM model from a pretrained transformers vision model.

    Use it through PEFT: ``get_peft_model(model, MASMConfig(...))`` after ``import peft_masm``.

    Besides PEFT's tuner API it offers:
      - ``decompose()``: run the SVD of every layer still waiting for it, in one batch (the only
        place an SVD runs: never in ``forward()`` nor in the loss);
      - ``regularization_loss()``: MASM's orthogonality and spectral terms, to add to the task loss;
      - ``update_layer_mask()``: the selective layer mask, once per optimizer step, after gradient
        clipping and before ``optimizer.step()``.
    """

    prefix: str = "masm_"
    tuner_layer_cls = MASMLayer
    target_module_mapping = DEFAULT_ATTENTION_TARGETS  # type: ignore[assignment]  # values may be regexes

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        self._layer_masks: dict[str, LayerMaskController] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Inject MASM layers; a trainable adapter is decomposed at once, a loaded one never is."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # Adapters created for training (get_peft_model, add_adapter) get their SVD now, so that edits,
        # optimizers and wrappers see the real factors. Adapters injected in inference mode, which is
        # how PeftModel.from_pretrained builds them before loading their weights, stay lazy: loading
        # fills them without any SVD.
        if not self.peft_config[adapter_name].inference_mode:
            self.decompose(adapter_name)

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

    def _all_masm_layers(self) -> Iterator[tuple[str, MASMLayer]]:
        return ((name, m) for name, m in self.model.named_modules() if isinstance(m, MASMLayer))

    # ------------------------------------------------------------------------------------ helpers
    def masm_layers(self, adapter_name: str | None = None) -> Iterator[tuple[str, MASMLayer]]:
        """``(name, layer)`` for each MASM layer holding ``adapter_name`` (default: the active adapter)."""
        adapter_name = adapter_name or self.active_adapters[0]
        for name, module in self.model.named_modules():
            if isinstance(module, MASMLayer) and adapter_name in module.masm_U:
                yield name, module

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
        totals = [layer.masm_num_subspaces[name] * layer.masm_subspace_rank[name] for layer, name in todo]
        for (layer, name), triplets in zip(todo, minor_triplets_many(weights, totals)):
            layer.set_decomposition(name, triplets)
        return len(todo)

    def regularization_loss(
        self, adapter_name: str | None = None, compute_all: bool = False
    ) -> dict[str, torch.Tensor]:
        """MASM's regularisers, averaged over layers: ``orthogonality``, ``spectral`` and their weighted ``total``.

        PEFT's ``PeftModel.forward`` bypasses the tuner for vision models, so the training loop adds
        ``regularization_loss()["total"]`` to its task loss (``MASMTrainer`` and the recipes do). When both
        weights are 0 nothing is computed (``total`` is 0 and the two terms are NaN, "not computed") unless
        ``compute_all=True``, e.g. to log the terms of an unregularised run.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        layers = [layer for _, layer in self.masm_layers(adapter_name)]
        if not layers:
            raise ValueError(f"No MASM layer holds adapter '{adapter_name}'.")
        device = layers[0].masm_U0[adapter_name].device
        zero = torch.zeros((), device=device)
        if not compute_all and config.orthogonality_weight == 0 and config.spectral_weight == 0:
            not_computed = torch.full((), float("nan"), device=device)
            return {"orthogonality": not_computed, "spectral": not_computed, "total": zero}
        orthogonality, spectral = zero, zero
        for layer in layers:
            terms = layer.regularization_terms(adapter_name)
            orthogonality = orthogonality + terms["orthogonality"]
            spectral = spectral + terms["spectral"]
        orthogonality, spectral = orthogonality / len(layers), spectral / len(layers)
        total = config.orthogonality_weight * orthogonality + config.spectral_weight * spectral
        return {"orthogonality": orthogonality, "spectral": spectral, "total": total}

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
        """The layer mask's one entry point: update gradient statistics, decide when due, drop masked gradients.

        Call it once per optimizer step, after ``backward()`` and gradient clipping and before
        ``optimizer.step()`` (with gradient accumulation: only when ``accelerator.sync_gradients``, so
        every rank sees the same synchronised gradients). The mask counts the steps itself (the first
        call is step 1); ``peft_masm.training.TrainingStep`` and ``peft_masm.MASMTrainer`` call it for you.
        """
        if global_step is not None:
            warnings.warn(
                "update_layer_mask(global_step) is deprecated: the layer mask counts optimizer steps itself "
                "(saved with its state); call update_layer_mask() with no argument.",
                FutureWarning,
                stacklevel=2,
            )
        self.layer_mask.step()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter and its layer-mask statistics."""
        super().delete_adapter(adapter_name)
        self._layer_masks.pop(adapter_name, None)


def _pass_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
