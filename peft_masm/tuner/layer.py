"""The MASM tuner layer: K trainable artifact subspaces from the minor spectrum of a frozen Linear.

For a weight ``W`` (m x n) the layer keeps, per adapter, trainable ``U_j (m x k)``, ``s_j (k)`` and
``V_j (n x k)`` for ``j < K`` and their frozen starting values (persistent buffers ``masm_U0``,
``masm_s0``, ``masm_V0``). The base weight is never modified; the forward adds
``x @ Delta^T`` with ``Delta = U diag(s) V^T - U0 diag(s0) V0^T`` computed as one factored
product of rank ``2*K*k``: ``(x @ [V, V0]) @ [U*s, -U0*s0]^T``.

Layout: each factor is one tensor for all K subspaces together (``masm_U[adapter]`` is a ``FactorBlocks`` list of one
``(m, K*k)`` tensor), so a layer has three trainable tensors, as few as the optimizer, the gradient checks and
the backward can get; only a mask over single subspaces (``mask_granularity="subspace"``) keeps K tensors per
factor, one per subspace, so that a masked subspace's gradient can be dropped. Saved adapters hold one key per
subspace and factor (``masm_U.<adapter>.<j>``, ``(m, k)``) in either layout, so files do not depend on it.

A layer created for training is decomposed by ``MASMModel.decompose()`` (``get_peft_model`` calls it);
a layer whose weights come from a saved adapter never is. ``forward()`` and the regularisers never run
an SVD: they refuse an adapter whose factors were neither computed nor loaded.

What the layer derives from an adapter's frozen tensors is made in one place, ``_set_state``, whenever they are set
(decomposition, loading: from the values being loaded) or move to another device: the non-persistent buffers
``masm_B0 = -U0 diag(s0)`` (the frozen half of the forward's ``B``) and ``masm_rho`` (the reference scale, for the
stacked maths of ``stacked.py``), and the adapter's ``_AdapterState`` (rho as a float, read once: a device sync;
the inference factors). An adapter without a state awaits its factors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import MASMConfig
from .decomposition import MinorTriplets, fingerprint_deviation, weight_fingerprint

# The trainable factors and the axis along which their subspaces sit side by side.
_FACTOR_AXES = (("masm_U", 1), ("masm_s", 0), ("masm_V", 1))
_FACTORS = tuple(factor for factor, _ in _FACTOR_AXES)
# Persistent buffers (saved with the adapter) and the non-persistent ones made from them by ``_set_state``.
_SAVED_BUFFERS = ("masm_U0", "masm_s0", "masm_V0", "masm_sigma_r", "masm_fingerprint", "masm_mask")
_DERIVED_BUFFERS = ("masm_B0", "masm_rho")


class BaseModelMismatchError(ValueError):
    """Raised when an adapter is loaded onto a base model other than the one it was trained on."""


class FactorBlocks(nn.ParameterList):
    """The tensors of one trainable factor of one adapter (``masm_U[adapter]``, ...): one for all K subspaces, or one
    per subspace.

    Iterating it gives the registered tensors in order, read from this list's own parameters: ``nn.ParameterList``'s
    iteration looks each one up by its string index through ``nn.Module.__getattr__`` (~2 us a list), and the
    forward reads three lists per layer and step, the stacked regularisers and fit bound three more."""

    def __iter__(self) -> Iterator[Any]:
        return iter(self._parameters.values())


class _Inference(NamedTuple):
    """``(A, B)`` of one adapter for forwards without autograd, and the key of the tensors they were built from."""

    key: list
    A: torch.Tensor
    B: torch.Tensor


@dataclass
class _AdapterState:
    """What a layer keeps of one adapter besides its tensors, from the moment its factors are set (see
    ``MASMLayer._set_state``, the one place that makes it): ``rho`` as a float, and the inference factors."""

    rho: float
    inference: _Inference | None = None


class MASMLayer(BaseTunerLayer):
    """Mixin holding the per-adapter MASM state of one adapted linear layer."""

    adapter_layer_names = _FACTORS
    other_param_names = (
        *_SAVED_BUFFERS,
        *_DERIVED_BUFFERS,
        "masm_num_subspaces",
        "masm_subspace_rank",
        "masm_partition",
        "masm_init_weights",
        "masm_check_base",
        "masm_fit_bound",
        "masm_fit_constraint",
        "masm_subspace_alpha",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.masm_U = nn.ModuleDict({})
        self.masm_s = nn.ModuleDict({})
        self.masm_V = nn.ModuleDict({})
        self.masm_U0 = BufferDict({}, persistent=True)
        self.masm_s0 = BufferDict({}, persistent=True)
        self.masm_V0 = BufferDict({}, persistent=True)
        self.masm_sigma_r = BufferDict({}, persistent=True)
        self.masm_fingerprint = BufferDict({}, persistent=True)
        self.masm_mask = BufferDict({}, persistent=True)
        self.masm_B0 = BufferDict({}, persistent=False)
        self.masm_rho = BufferDict({}, persistent=False)
        # The same containers, by name, in plain dicts: the forward reads six of them per layer and step, and an
        # attribute read of a submodule goes through nn.Module.__getattr__. They are made here and never replaced.
        self._factor_dicts: dict[str, Any] = {
            name: getattr(self, name) for name in _FACTORS
        }  # of FactorBlocks
        self._buffer_dicts: dict[str, BufferDict] = {
            name: getattr(self, name) for name in _SAVED_BUFFERS + _DERIVED_BUFFERS
        }
        self.masm_num_subspaces: dict[str, int] = {}
        self.masm_subspace_rank: dict[str, int] = {}
        self.masm_partition: dict[str, str] = {}
        self.masm_init_weights: dict[str, bool] = {}
        self.masm_check_base: dict[str, bool] = {}
        self.masm_fit_bound: dict[str, float] = {}
        self.masm_fit_constraint: dict[str, str] = {}
        self.masm_subspace_alpha: dict[str, float | None] = {}
        self._masm_state: dict[str, _AdapterState] = {}  # per adapter whose factors are set (see _set_state)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MASM adapts nn.Linear layers only, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features

    # ----------------------------------------------------------------------------------------- set-up
    def update_layer(
        self, adapter_name: str, config: MASMConfig, inference_mode: bool = False, **kwargs
    ) -> None:
        """Add an adapter: allocate its factors (filled by ``set_decomposition`` or by loading)."""
        num, rank = config.num_subspaces, config.subspace_rank
        total = num * rank
        d = min(self.in_features, self.out_features)
        if num <= 0 or rank <= 0:
            raise ValueError(f"num_subspaces and subspace_rank must be positive, got K={num}, k={rank}.")
        if total >= d:
            raise ValueError(
                f"{kwargs.get('current_key', 'this layer')}: K*k = {num}*{rank} = {total} must be smaller than the "
                f"layer's rank {d} (weight {self.out_features} x {self.in_features}); lower num_subspaces or "
                "subspace_rank, or exclude this module."
            )
        m, n = self.out_features, self.in_features
        device = self.get_base_layer().weight.device
        factory = {"device": device, "dtype": torch.float32}
        blocks = num if config.per_subspace_parameters else 1
        width = total // blocks
        for factor, shape in (("masm_U", (m, width)), ("masm_s", (width,)), ("masm_V", (n, width))):
            self._factor_dicts[factor][adapter_name] = FactorBlocks(
                [nn.Parameter(torch.zeros(shape, **factory)) for _ in range(blocks)]
            )
        shapes: dict[str, tuple[int, ...]] = {
            "masm_U0": (m, total),
            "masm_s0": (total,),
            "masm_V0": (n, total),
            "masm_sigma_r": (1,),
            "masm_fingerprint": (257,),
            "masm_B0": (m, total),
            "masm_rho": (1,),
        }
        for buffer, size in shapes.items():
            self._buffer_dicts[buffer][adapter_name] = torch.zeros(size, **factory)
        self.masm_mask[adapter_name] = torch.ones(num, **factory)
        self.masm_num_subspaces[adapter_name] = num
        self.masm_subspace_rank[adapter_name] = rank
        self.masm_partition[adapter_name] = config.partition
        self.masm_init_weights[adapter_name] = config.init_weights
        self.masm_check_base[adapter_name] = config.check_base_model
        self.masm_fit_bound[adapter_name] = config.fit_bound
        self.masm_fit_constraint[adapter_name] = config.fit_constraint
        self.masm_subspace_alpha[adapter_name] = config.subspace_alpha
        self._masm_state.pop(adapter_name, None)  # its factors await a decomposition or a load
        frozen = {"all": (), "singular_values": ("masm_U", "masm_V"), "vectors": ("masm_s",)}[
            config.train_factors
        ]
        if frozen:
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: frozen}
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        # MASM's factors stay float32 whatever the base dtype: minor singular directions do not survive a
        # bfloat16 round-off. Only the device follows the base layer.
        target = device if device is not None else self.get_base_layer().weight.device
        if target == torch.device("meta"):
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ModuleDict, BufferDict)) and adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)
        if adapter_name in self._masm_state:
            self._set_state(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter from this layer, with its state (PEFT's ``delete_adapter`` drops its tensors)."""
        super().delete_adapter(adapter_name)
        self._masm_state.pop(adapter_name, None)

    # ---------------------------------------------------------------------------- the adapter's state
    @torch.no_grad()
    def _set_state(
        self,
        adapter_name: str,
        U0: torch.Tensor | None = None,
        s0: torch.Tensor | None = None,
        fingerprint: torch.Tensor | None = None,
    ) -> None:
        """(Re)make what the layer derives from ``adapter_name``'s frozen tensors (the adapter's buffers, or the
        values a load is about to put there): ``masm_B0``, ``masm_rho`` and a new ``_AdapterState``. The only place
        they change: when the factors are set (decomposition, load) and when the adapter moves to another device."""
        U0 = self.frozen_tensor("masm_U0", adapter_name) if U0 is None else U0
        s0 = self.frozen_tensor("masm_s0", adapter_name) if s0 is None else s0
        if fingerprint is None:
            fingerprint = self.frozen_tensor("masm_fingerprint", adapter_name)
        rho = self._reference_scale(fingerprint)  # one device sync, here rather than in any forward
        with torch.inference_mode(False):  # plain tensors, also when set inside inference mode
            self.masm_B0[adapter_name] = -U0 * s0
            self.masm_rho[adapter_name] = torch.full((1,), rho, dtype=U0.dtype, device=U0.device)
        self._masm_state[adapter_name] = _AdapterState(rho)

    def _reference_scale(self, fingerprint: torch.Tensor) -> float:
        """``rho = ||W||_F / sqrt(d)`` from a fingerprint (its first value is ``||W||_F``), or from the base weight
        for a fingerprint-less adapter (saved by an old version)."""
        energy = float(fingerprint[0].square())
        if energy <= 0:
            energy = float(self.get_base_layer().weight.detach().float().square().sum())
        return math.sqrt(energy / min(self.in_features, self.out_features))

    def _state(self, adapter_name: str) -> _AdapterState:
        state = self._masm_state.get(adapter_name)
        if state is None:
            raise RuntimeError(
                f"MASM adapter '{adapter_name}' has no factors yet (created in inference mode and never loaded): "
                "call `peft_model.base_model.decompose()` once, or load trained weights with PeftModel.from_pretrained."
            )
        return state

    def require_factors(self, adapter_name: str) -> None:
        """Raise unless ``adapter_name``'s factors were computed or loaded."""
        self._state(adapter_name)

    def pending_decomposition(self, adapter_name: str) -> bool:
        """True while ``adapter_name``'s factors still await their SVD (no weights loaded or computed)."""
        return adapter_name in self.masm_num_subspaces and adapter_name not in self._masm_state

    # The forward reads these for every layer and step.
    def trainable_tensors(self, factor: str, adapter_name: str) -> list[torch.Tensor]:
        """The tensors of trainable factor ``factor`` (``"masm_U"``, ``"masm_s"``, ``"masm_V"``) of an adapter."""
        return list(self._factor_dicts[factor][adapter_name])

    def frozen_tensor(self, buffer: str, adapter_name: str) -> torch.Tensor:
        """The buffer ``buffer`` (``"masm_U0"``, ``"masm_s0"``, ..., ``"masm_B0"``, ``"masm_rho"``) of an adapter."""
        return self._buffer_dicts[buffer][adapter_name]

    # --------------------------------------------------------------------------------- decomposition
    def _subspace_order(self, adapter_name: str) -> torch.Tensor:
        """Permutation of the K*k minor triplets (descending sigma) into subspace-major order."""
        num, rank = self.masm_num_subspaces[adapter_name], self.masm_subspace_rank[adapter_name]
        index = torch.arange(num * rank)
        if self.masm_partition[adapter_name] == "interleaved":
            index = index.reshape(rank, num).T.reshape(-1)  # subspace j takes triplets j, j+K, j+2K, ...
        return index

    @torch.no_grad()
    def set_decomposition(self, adapter_name: str, triplets: MinorTriplets) -> None:
        """Fill ``adapter_name``'s factors and buffers from the minor triplets of the base weight."""
        order = self._subspace_order(adapter_name).to(triplets.U.device)
        device = self.masm_U0[adapter_name].device
        U0, S0, V0 = (t.to(device)[..., order] for t in (triplets.U, triplets.S, triplets.V))
        self.masm_U0[adapter_name].copy_(U0)
        self.masm_s0[adapter_name].copy_(S0)
        self.masm_V0[adapter_name].copy_(V0)
        self.masm_sigma_r[adapter_name].fill_(float(triplets.sigma_r))
        self.masm_fingerprint[adapter_name].copy_(weight_fingerprint(self.get_base_layer().weight))
        self._set_state(adapter_name)
        scaled = self.masm_subspace_alpha[adapter_name] is not None
        width = self.block_width(adapter_name)
        for j, (U, s, V) in enumerate(zip(*(self.trainable_tensors(f, adapter_name) for f in _FACTORS))):
            cols = slice(j * width, (j + 1) * width)
            U.copy_(U0[:, cols])
            # Scaled parametrisation: the trainable offset starts at 0 (s = s0). Raw: s itself starts at s0.
            s.copy_(torch.zeros_like(S0[cols]) if scaled else S0[cols])
            V.copy_(V0[:, cols])
        if not self.masm_init_weights[adapter_name]:
            self._perturb(adapter_name)

    @torch.no_grad()
    def _perturb(self, adapter_name: str) -> None:
        """A non-identity start (``init_weights=False``), used by tests."""
        sigma_r = float(self.masm_sigma_r[adapter_name])
        unit = self.singular_value_unit(adapter_name) or 1.0
        for U, s, V in zip(*(self.trainable_tensors(f, adapter_name) for f in _FACTORS)):
            s.add_(torch.randn_like(s) * 0.5 * max(sigma_r, 1e-3) / unit)
            U.add_(torch.randn_like(U) * 0.3 / math.sqrt(U.shape[0]))
            V.add_(torch.randn_like(V) * 0.3 / math.sqrt(V.shape[0]))

    def block_width(self, adapter_name: str) -> int:
        """Columns of one trainable factor tensor: ``K*k`` (one tensor for all subspaces) or ``k`` (one per
        subspace, ``MASMConfig.per_subspace_parameters``)."""
        total = self.masm_num_subspaces[adapter_name] * self.masm_subspace_rank[adapter_name]
        return total // len(self.masm_s[adapter_name])

    # ------------------------------------------------------------------------------------ the delta
    def reference_scale_value(self, adapter_name: str) -> float:
        """``rho = ||W||_F / sqrt(d)``, the frozen weight's RMS singular value: the unit of the fit bound, of the
        regularisers and of the scaled singular values (it cannot vanish, unlike ``sigma_r``), from the fingerprint
        saved with the adapter (read when its factors were set)."""
        return self._state(adapter_name).rho

    def singular_value_unit(self, adapter_name: str) -> float | None:
        """``subspace_alpha * rho``: what one unit of the trainable ``masm_s`` is worth in singular value
        (``None``: the raw parametrisation, ``masm_s`` is ``s`` itself)."""
        alpha = self.masm_subspace_alpha[adapter_name]
        return None if alpha is None else alpha * self.reference_scale_value(adapter_name)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors concatenated over subspaces: U (m, K*k), s (K*k,), V (n, K*k).

        With ``subspace_alpha`` set, ``s = s0 + subspace_alpha * rho * masm_s``: the trainable offset is
        measured in the layer's own scale, so Adam moves a subspace by about ``subspace_alpha * rho * lr`` per
        step however small its starting singular values are (they sit at 1e-4..1e-2 rho on real backbones).
        """
        unit = self.singular_value_unit(adapter_name)  # refuses an adapter without factors
        U = _joined(self.trainable_tensors("masm_U", adapter_name), dim=1)
        s = _joined(self.trainable_tensors("masm_s", adapter_name), dim=0)
        V = _joined(self.trainable_tensors("masm_V", adapter_name), dim=1)
        if unit is not None:
            s = torch.add(self.frozen_tensor("masm_s0", adapter_name), s, alpha=unit)
        return U, s, V

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``Delta = B @ A.T``: A = [V, V0] (n, 2Kk), B = [U*s, -U0*s0] (m, 2Kk).

        Without autograd (inference, ``torch.no_grad``) they are built once and kept in the adapter's state until a
        trainable tensor changes (an optimizer step, a load, a move to another device or dtype: each changes a
        tensor's version or storage, the key they are kept under) or the state is made anew (``_set_state``). Inside
        ``torch.autocast`` they are kept in its dtype, cast once rather than by the autocast of each forward's two
        products (the same rounding). The check is a few microseconds of Python per layer and forward, which a
        host-bound forward (a GPU's at small batch) pays in full."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._build_delta_factors(adapter_name)
        state = self._masm_state.get(adapter_name) or self._state(adapter_name)  # the latter raises
        tensors = [t for factor in _FACTORS for t in self._factor_dicts[factor][adapter_name]]
        device = tensors[0].device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key: list = [autocast]
        for tensor in tensors:
            key += (tensor.data_ptr(), tensor._version)
        if state.inference is not None and state.inference.key == key:
            return state.inference.A, state.inference.B
        A, B = self._build_delta_factors(adapter_name)
        if autocast is not None and A.dtype == torch.float32:
            A, B = A.to(autocast), B.to(autocast)
        state.inference = _Inference(key, A, B)
        return A, B

    def _build_delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        U, s, V = self.factors(adapter_name)
        A = torch.cat([V, self.frozen_tensor("masm_V0", adapter_name)], dim=1)
        B = torch.cat([U * s, self.frozen_tensor("masm_B0", adapter_name)], dim=1)
        return A, B

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense weight change of ``adapter_name`` (for merging and LoRA export only), in float32 arithmetic
        also inside ``torch.autocast``."""
        with torch.autocast(self.frozen_tensor("masm_V0", adapter_name).device.type, enabled=False):
            A, B = self.delta_factors(adapter_name)
            return (B @ A.T).to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # Delta has rank <= 2*K*k, so PEFT's `save_as_lora(..., rank=2*K*k)` is exact.
        return True

    # ------------------------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' deltas to the base weight (``safe_merge`` checks for NaNs first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.masm_U:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights; the adapter {name} seems to be broken."
                    )
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight."""
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.masm_U:
                base.weight.data -= self.get_delta_weight(name)


def _joined(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """A factor's tensors side by side (the tensor itself when there is one: no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


class Linear(nn.Module, MASMLayer):
    """An ``nn.Linear`` with MASM adapters."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MASMConfig, **kwargs: Any) -> None:
        super().__init__()
        MASMLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)
        self.register_state_dict_post_hook(_save_per_subspace)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        # An adapter whose frozen tensors this load brings gets its saved layout checked and joined, its base
        # weight checked, and its state made, all from the values being loaded: the buffer dicts, children of
        # this module, load after this call.
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        for name in [name for name in self.masm_num_subspaces if f"{prefix}masm_U0.{name}" in state_dict]:
            self._check_saved_shape(state_dict, prefix, name)
            self._join_saved_subspaces(state_dict, prefix, name)
            U0, s0, fingerprint = (
                self._incoming(state_dict, prefix, buffer, name, assign)
                for buffer in ("masm_U0", "masm_s0", "masm_fingerprint")
            )
            if any(t.device.type == "meta" for t in (U0, s0, fingerprint)):
                continue
            if self.masm_check_base[name]:
                self._check_base_weight(name, fingerprint, prefix)
            self._set_state(name, U0, s0, fingerprint)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _incoming(
        self, state_dict, prefix: str, buffer: str, adapter_name: str, assign: bool
    ) -> torch.Tensor:
        """What buffer ``buffer`` of ``adapter_name`` holds once this load is done: the saved tensor (cast to the
        buffer's device and dtype, as ``load_state_dict`` copies it; as it is for ``assign=True``), or the buffer as
        it is when the load does not bring it."""
        current = self.frozen_tensor(buffer, adapter_name)
        saved = state_dict.get(f"{prefix}{buffer}.{adapter_name}")
        if saved is None:
            return current
        return saved if assign else saved.to(current.device, current.dtype)

    def _check_saved_shape(self, state_dict, prefix: str, adapter_name: str) -> None:
        """Name the config field when the saved factors have another K or k than the adapter's config."""
        num, rank = self.masm_num_subspaces[adapter_name], self.masm_subspace_rank[adapter_name]
        first = state_dict.get(f"{prefix}masm_s.{adapter_name}.0")
        saved_rank = int(first.shape[0]) if first is not None else rank
        # K from the saved s0 (K*k values), not from counting masm_s keys: PEFT puts the adapter name only into
        # the keys this model has, so with fewer subspaces than saved the extra keys keep their saved form.
        s0 = state_dict.get(f"{prefix}masm_s0.{adapter_name}")
        if s0 is not None and s0.ndim == 1 and saved_rank > 0:
            saved_num = int(s0.shape[0]) // saved_rank
        else:
            saved_num = sum(1 for key in state_dict if key.startswith(f"{prefix}masm_s.{adapter_name}."))
        if (saved_num, saved_rank) == (num, rank):
            return
        fields = [
            f"{field}={value} (the saved weights have {saved})"
            for field, value, saved in (
                ("num_subspaces", num, saved_num),
                ("subspace_rank", rank, saved_rank),
            )
            if value != saved
        ]
        layer = prefix.rstrip(".").removeprefix("base_model.model.")
        raise ValueError(
            f"MASM adapter '{adapter_name}' does not match its saved weights at layer '{layer}': adapter_config.json "
            f"has {' and '.join(fields)}; set those fields back to the saved values (or save the adapter again)."
        )

    def _join_saved_subspaces(self, state_dict, prefix: str, adapter_name: str) -> None:
        """Rewrite the saved per-subspace keys into this layer's factor tensors (one per factor, or one per
        subspace: then nothing changes)."""
        num, blocks = self.masm_num_subspaces[adapter_name], len(self.masm_s[adapter_name])
        if blocks == num:
            return
        per_block = num // blocks
        for factor, dim in _FACTOR_AXES:
            keys = [f"{prefix}{factor}.{adapter_name}.{j}" for j in range(num)]
            if not all(key in state_dict for key in keys):
                continue  # not per-subspace: the load reports what is missing
            saved = [state_dict.pop(key) for key in keys]
            for b in range(blocks):
                state_dict[f"{prefix}{factor}.{adapter_name}.{b}"] = torch.cat(
                    saved[b * per_block : (b + 1) * per_block], dim=dim
                )

    def _check_base_weight(self, adapter_name: str, fingerprint: torch.Tensor, prefix: str) -> None:
        """Refuse a saved ``fingerprint`` taken of another weight than this layer's base weight."""
        if not torch.any(fingerprint != 0):
            return
        deviation = fingerprint_deviation(self.get_base_layer().weight, fingerprint)
        if deviation > 1.0:
            layer = prefix.rstrip(".").removeprefix("base_model.model.")
            raise BaseModelMismatchError(
                f"MASM adapter '{adapter_name}' was trained on a different base model: the weight of layer "
                f"'{layer}' differs from the fingerprint saved with the adapter ({deviation:.3g}x the tolerance). "
                "Load the adapter onto the base model named by `base_model_name_or_path` in its adapter_config.json "
                "(or set `check_base_model=False` in that config if this is intended)."
            )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.masm_num_subspaces:  # a plain dict: an adapter this layer does not hold
                continue
            A, B = self.delta_factors(name)
            delta = ((x if x.dtype == A.dtype else x.to(A.dtype)) @ A) @ B.T
            result = result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample ``i`` gets adapter ``adapter_names[i]`` (``"__base__"``: none), as PEFT's LoRA does."""
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in sorted(set(adapter_names)):
            if name not in self.masm_U:
                continue
            rows = [i for i, a in enumerate(adapter_names) if a == name]
            A, B = self.delta_factors(name)
            sub = x[rows]
            result[rows] = result[rows] + ((sub.to(A.dtype) @ A) @ B.T).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "masm." + super().__repr__()


def _save_per_subspace(module: Linear, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict()`` holds one key per subspace and factor, ``masm_U.<adapter>.<j>`` of shape ``(m, k)``,
    whatever the layer's layout (what ``_join_saved_subspaces`` reads back)."""
    for adapter_name, s_blocks in module.masm_s.items():
        num, blocks = module.masm_num_subspaces[adapter_name], len(s_blocks)
        if blocks == num:
            continue
        rank = module.masm_subspace_rank[adapter_name]
        for factor, dim in _FACTOR_AXES:
            stem = f"{prefix}{factor}.{adapter_name}."
            if f"{stem}0" not in state_dict:
                continue
            tensors = [state_dict.pop(f"{stem}{b}") for b in range(blocks)]
            joined = tensors[0] if blocks == 1 else torch.cat(tensors, dim=dim)
            # Copies, not views: safetensors refuses tensors that share a storage.
            for j, piece in enumerate(joined.detach().split(rank, dim=dim)):
                state_dict[f"{stem}{j}"] = piece.clone(memory_format=torch.contiguous_format)
