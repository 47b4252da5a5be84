"""The MASM tuner layer: K trainable artifact subspaces from the minor spectrum of a frozen Linear.

For a weight ``W`` (m x n) the layer keeps, per adapter, trainable ``U_j (m x k)``, ``s_j (k)`` and
``V_j (n x k)`` for ``j < K`` and their frozen starting values (persistent buffers ``masm_U0``,
``masm_s0``, ``masm_V0``). The base weight is never modified; the forward adds
``x @ Delta^T`` with ``Delta = U diag(s) V^T - U0 diag(s0) V0^T`` computed as one factored
product of rank ``2*K*k``: ``(x @ [V, V0]) @ [U*s, -U0*s0]^T``.

Layout: each factor is one tensor for all K subspaces together (``masm_U[adapter]`` is a ParameterList of one
``(m, K*k)`` tensor), so a layer has three trainable tensors, as few as the optimizer, the gradient checks and
the backward can get; only a mask over single subspaces (``mask_granularity="subspace"``) keeps K tensors per
factor, one per subspace, so that a masked subspace's gradient can be dropped. Saved adapters hold one key per
subspace and factor (``masm_U.<adapter>.<j>``, ``(m, k)``) in either layout, so files do not depend on it.

A layer created for training is decomposed by ``MASMModel.decompose()`` (``get_peft_model`` calls it);
a layer whose weights come from a saved adapter never is. ``forward()`` and the regularisers never run
an SVD: they refuse an adapter whose factors were neither computed nor loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import regularizers
from .config import MASMConfig
from .decomposition import MinorTriplets, fingerprint_deviation, weight_fingerprint

# The trainable factors and the axis along which their subspaces sit side by side.
_FACTOR_AXES = (("masm_U", 1), ("masm_s", 0), ("masm_V", 1))


class _FrozenHalf(NamedTuple):
    """``-U0 diag(s0)`` of one adapter (``value``) and the buffers, and their versions, it was made from."""

    U0: torch.Tensor
    U0_version: int
    s0: torch.Tensor
    s0_version: int
    value: torch.Tensor


class BaseModelMismatchError(ValueError):
    """Raised when an adapter is loaded onto a base model other than the one it was trained on."""


class MASMLayer(BaseTunerLayer):
    """Mixin holding the per-adapter MASM state of one adapted linear layer."""

    adapter_layer_names = ("masm_U", "masm_s", "masm_V")
    other_param_names = (
        "masm_U0",
        "masm_s0",
        "masm_V0",
        "masm_sigma_r",
        "masm_fingerprint",
        "masm_mask",
        "masm_num_subspaces",
        "masm_subspace_rank",
        "masm_partition",
        "masm_init_weights",
        "masm_check_base",
        "masm_fit_bound",
        "masm_fit_constraint",
        "masm_subspace_alpha",
        "masm_pending",
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
        self.masm_num_subspaces: dict[str, int] = {}
        self.masm_subspace_rank: dict[str, int] = {}
        self.masm_partition: dict[str, str] = {}
        self.masm_init_weights: dict[str, bool] = {}
        self.masm_check_base: dict[str, bool] = {}
        self.masm_fit_bound: dict[str, float] = {}
        self.masm_fit_constraint: dict[str, str] = {}
        self.masm_subspace_alpha: dict[str, float | None] = {}
        self._masm_rho: dict[str, float] = {}  # reference scale per adapter, read once from the fingerprint
        # (A, B) of the delta per adapter for forwards without autograd, with the storage/version key it was built at
        self._masm_delta_cache: dict[str, tuple[list, torch.Tensor, torch.Tensor]] = {}
        # -U0 diag(s0), the frozen half of B, per adapter, with the (U0, s0) tensors and versions it was made from
        self._masm_frozen_half: dict[str, _FrozenHalf] = {}
        # per-layer scales of a stack led by this layer, as device tensors, by their values (see _layer_values)
        self._masm_stack_values: dict[tuple, torch.Tensor] = {}
        self.masm_pending: dict[str, bool] = {}
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
        self.masm_U[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.zeros(m, width, **factory)) for _ in range(blocks)]
        )
        self.masm_s[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.zeros(width, **factory)) for _ in range(blocks)]
        )
        self.masm_V[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, width, **factory)) for _ in range(blocks)]
        )
        self.masm_U0[adapter_name] = torch.zeros(m, total, **factory)
        self.masm_s0[adapter_name] = torch.zeros(total, **factory)
        self.masm_V0[adapter_name] = torch.zeros(n, total, **factory)
        self.masm_sigma_r[adapter_name] = torch.zeros(1, **factory)
        self.masm_fingerprint[adapter_name] = torch.zeros(257, **factory)
        self.masm_mask[adapter_name] = torch.ones(num, **factory)
        self.masm_num_subspaces[adapter_name] = num
        self.masm_subspace_rank[adapter_name] = rank
        self.masm_partition[adapter_name] = config.partition
        self.masm_init_weights[adapter_name] = config.init_weights
        self.masm_check_base[adapter_name] = config.check_base_model
        self.masm_fit_bound[adapter_name] = config.fit_bound
        self.masm_fit_constraint[adapter_name] = config.fit_constraint
        self.masm_subspace_alpha[adapter_name] = config.subspace_alpha
        self.masm_pending[adapter_name] = True
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
        self._masm_delta_cache.pop(adapter_name, None)
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ModuleDict, BufferDict)) and adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter from this layer, with what the layer keeps of it besides PEFT's containers."""
        super().delete_adapter(adapter_name)
        for cache in (self._masm_rho, self._masm_delta_cache, self._masm_frozen_half):
            cache.pop(adapter_name, None)

    # --------------------------------------------------------------------------------- decomposition
    def pending_decomposition(self, adapter_name: str) -> bool:
        """True while ``adapter_name``'s factors still await their SVD (no weights loaded or computed)."""
        return self.masm_pending.get(adapter_name, False)

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
        self._masm_rho.pop(adapter_name, None)
        self._masm_delta_cache.pop(adapter_name, None)
        self.reference_scale_value(adapter_name)  # read now (one sync), so that no forward ever has to
        scaled = self.masm_subspace_alpha[adapter_name] is not None
        width = self.block_width(adapter_name)
        for j in range(len(self.masm_s[adapter_name])):
            cols = slice(j * width, (j + 1) * width)
            self.masm_U[adapter_name][j].copy_(U0[:, cols])
            # Scaled parametrisation: the trainable offset starts at 0 (s = s0). Raw: s itself starts at s0.
            self.masm_s[adapter_name][j].copy_(torch.zeros_like(S0[cols]) if scaled else S0[cols])
            self.masm_V[adapter_name][j].copy_(V0[:, cols])
        if not self.masm_init_weights[adapter_name]:
            self._perturb(adapter_name)
        self.masm_pending[adapter_name] = False

    @torch.no_grad()
    def _perturb(self, adapter_name: str) -> None:
        """A non-identity start (``init_weights=False``), used by tests."""
        sigma_r = float(self.masm_sigma_r[adapter_name])
        unit = self.singular_value_unit(adapter_name) or 1.0
        for U, s, V in zip(self.masm_U[adapter_name], self.masm_s[adapter_name], self.masm_V[adapter_name]):
            s.add_(torch.randn_like(s) * 0.5 * max(sigma_r, 1e-3) / unit)
            U.add_(torch.randn_like(U) * 0.3 / math.sqrt(U.shape[0]))
            V.add_(torch.randn_like(V) * 0.3 / math.sqrt(V.shape[0]))

    def _require_factors(self, adapter_name: str) -> None:
        if self.masm_pending.get(adapter_name, False):
            raise RuntimeError(
                f"MASM adapter '{adapter_name}' has no factors yet (created in inference mode and never loaded): "
                "call `peft_model.base_model.decompose()` once, or load trained weights with PeftModel.from_pretrained."
            )

    def _after_load(self, adapter_names: list[str], prefix: str) -> None:
        """Mark adapters whose factors were just loaded as decomposed, and check their base weight."""
        for adapter_name in adapter_names:
            self.masm_pending[adapter_name] = False
            self._masm_rho.pop(adapter_name, None)
            self._masm_delta_cache.pop(adapter_name, None)
            # rho from the loaded fingerprint, read once here so that no forward has to (a sync, a graph break)
            if self.masm_fingerprint[adapter_name].device.type != "meta":
                self.reference_scale_value(adapter_name)
            if self.masm_check_base[adapter_name]:
                self._check_base_weight(adapter_name, prefix)

    def _check_base_weight(self, adapter_name: str, prefix: str) -> None:
        fingerprint = self.masm_fingerprint[adapter_name]
        if fingerprint.device.type == "meta" or not torch.any(fingerprint != 0):
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

    def block_width(self, adapter_name: str) -> int:
        """Columns of one trainable factor tensor: ``K*k`` (one tensor for all subspaces) or ``k`` (one per
        subspace, ``MASMConfig.per_subspace_parameters``)."""
        total = self.masm_num_subspaces[adapter_name] * self.masm_subspace_rank[adapter_name]
        return total // len(self.masm_s[adapter_name])

    # ------------------------------------------------------------------------------------ the delta
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
        self._require_factors(adapter_name)
        U = _joined(self._trainable("masm_U", adapter_name), dim=1)
        s = _joined(self._trainable("masm_s", adapter_name), dim=0)
        V = _joined(self._trainable("masm_V", adapter_name), dim=1)
        unit = self.singular_value_unit(adapter_name)
        if unit is not None:
            s = torch.add(self._frozen("masm_s0", adapter_name), s, alpha=unit)
        return U, s, V

    # The forward reads these for every layer and step: straight from the module dicts, not through
    # nn.Module.__getattr__ (a Python fallback after a failed attribute look-up, a few dozen per layer and step).
    def _trainable(self, factor: str, adapter_name: str) -> list[torch.Tensor]:
        """The tensors of trainable factor ``factor`` (``"masm_U"``, ``"masm_s"``, ``"masm_V"``) of an adapter."""
        return list(self._modules[factor]._modules[adapter_name]._parameters.values())

    def _frozen(self, buffer: str, adapter_name: str) -> torch.Tensor:
        """The frozen buffer ``buffer`` (``"masm_U0"``, ``"masm_s0"``, ...) of an adapter."""
        return self._modules[buffer]._buffers[adapter_name]

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``Delta = B @ A.T``: A = [V, V0] (n, 2Kk), B = [U*s, -U0*s0] (m, 2Kk).

        Without autograd (inference, ``torch.no_grad``) they are built once and reused until a trainable factor
        changes (an optimizer step, a load, a move to another device or dtype: each changes a tensor's version or
        storage); the frozen buffers change only where the factors are set (decomposition, loading, a device move
        of the adapter), which drop the cache. Inside ``torch.autocast`` they are kept in its dtype, cast once rather
        than by the autocast of each forward's two products (the same rounding). The check is a few microseconds of
        Python per layer and forward, which a host-bound forward (a GPU's at small batch) pays in full."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._build_delta_factors(adapter_name)
        V0 = self._frozen("masm_V0", adapter_name)
        autocast = (
            torch.get_autocast_dtype(V0.device.type) if torch.is_autocast_enabled(V0.device.type) else None
        )
        key = [self.singular_value_unit(adapter_name), autocast]
        for factor in ("masm_U", "masm_s", "masm_V"):
            for tensor in self._trainable(factor, adapter_name):
                key += (tensor.data_ptr(), tensor._version)
        cached = self._masm_delta_cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        A, B = self._build_delta_factors(adapter_name)
        if autocast is not None and A.dtype == torch.float32:
            A, B = A.to(autocast), B.to(autocast)
        self._masm_delta_cache[adapter_name] = (key, A, B)
        return A, B

    def _build_delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        U, s, V = self.factors(adapter_name)
        A = torch.cat([V, self._frozen("masm_V0", adapter_name)], dim=1)
        B = torch.cat([U * s, self._frozen_half(adapter_name)], dim=1)
        return A, B

    def _frozen_half(self, adapter_name: str) -> torch.Tensor:
        """``-U0 diag(s0)``, the frozen half of B: a constant, made once and kept until ``U0`` or ``s0`` is replaced
        or written to (a load, a decomposition, a move to another device or dtype), instead of two kernels per layer
        and forward. The kept pair holds the tensors themselves, so that a replaced buffer is never taken for its
        successor."""
        U0, s0 = self._frozen("masm_U0", adapter_name), self._frozen("masm_s0", adapter_name)
        if torch.compiler.is_compiling():
            return -U0 * s0
        kept = self._masm_frozen_half.get(adapter_name)
        stale = kept is None or kept.U0 is not U0 or kept.s0 is not s0  # identity: never a tensor comparison
        if stale or kept.U0_version != U0._version or kept.s0_version != s0._version:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, also when made in inference
                half = -U0 * s0
            kept = self._masm_frozen_half[adapter_name] = _FrozenHalf(U0, U0._version, s0, s0._version, half)
        return kept.value

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense weight change of ``adapter_name`` (for merging and LoRA export only), in float32 arithmetic
        also inside ``torch.autocast``."""
        with torch.autocast(self._frozen("masm_V0", adapter_name).device.type, enabled=False):
            A, B = self.delta_factors(adapter_name)
            return (B @ A.T).to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # Delta has rank <= 2*K*k, so PEFT's `save_as_lora(..., rank=2*K*k)` is exact.
        return True

    def reference_scale_value(self, adapter_name: str) -> float:
        """``rho = ||W||_F / sqrt(d)``, the frozen weight's RMS singular value: the unit of the fit bound, of the
        regularisers and of the scaled singular values (it cannot vanish, unlike ``sigma_r``). Read once from
        the fingerprint saved with the adapter (one device sync), then cached."""
        if adapter_name not in self._masm_rho:
            energy = float(self.masm_fingerprint[adapter_name][0].square())
            if energy <= 0:  # a fingerprint-less adapter (saved by an old version): the base weight itself
                energy = float(self.get_base_layer().weight.detach().float().square().sum())
            self._masm_rho[adapter_name] = math.sqrt(energy / min(self.in_features, self.out_features))
        return self._masm_rho[adapter_name]

    def regularization_terms(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This layer's orthogonality and spectral terms (see ``peft_masm.tuner.regularizers``)."""
        U, s, V = self.factors(adapter_name)
        rank = self.masm_subspace_rank[adapter_name]
        weight = self.get_base_layer().weight
        rho = self.reference_scale_value(adapter_name)
        penalty = self.masm_fit_constraint[adapter_name] == "penalty"
        return regularizers.layer_terms(
            weight=weight.to(torch.float32),
            energy=rho**2 * min(self.in_features, self.out_features),
            U=U,
            s=s,
            V=V,
            U0=self.masm_U0[adapter_name],
            s0=self.masm_s0[adapter_name],
            V0=self.masm_V0[adapter_name],
            subspace_rank=rank,
            fit_bound=self.masm_fit_bound[adapter_name] if penalty else None,
        )

    def subspace_norms(self, adapter_name: str) -> torch.Tensor:
        """Spectral norm of each artifact subspace ``U_j diag(s_j) V_j^T`` in units of ``rho`` (K,)."""
        with torch.no_grad():
            U, s, V = self.factors(adapter_name)
            norms = regularizers.subspace_spectral_norms(U, s, V, self.masm_subspace_rank[adapter_name])
            return norms / max(self.reference_scale_value(adapter_name), 1e-12)

    @regularizers.full_precision
    def subspace_movement(self, adapter_name: str) -> torch.Tensor:
        """How far each subspace moved: ``||U_j diag(s_j) V_j^T - U_j0 diag(s_j0) V_j0^T||_F / rho`` (K,)."""
        with torch.no_grad():
            U, s, V = self.factors(adapter_name)
            U0, s0, V0 = (
                self.masm_U0[adapter_name],
                self.masm_s0[adapter_name],
                self.masm_V0[adapter_name],
            )
            rank = self.masm_subspace_rank[adapter_name]
            out = []
            for j in range(self.masm_num_subspaces[adapter_name]):
                cols = slice(j * rank, (j + 1) * rank)
                A = torch.cat([V[:, cols], V0[:, cols]], dim=1)
                B = torch.cat([U[:, cols] * s[cols], -U0[:, cols] * s0[cols]], dim=1)
                # ||B A^T||_F^2 = trace((B^T B)(A^T A)): no dense m x n product.
                out.append(((B.T @ B) * (A.T @ A)).sum().clamp_min(0).sqrt())
            return torch.stack(out) / max(self.reference_scale_value(adapter_name), 1e-12)

    @torch.no_grad()
    def apply_fit_bound(self, adapter_name: str) -> torch.Tensor:
        """Project this layer's subspaces that outgrew ``fit_bound * rho`` back onto it (see
        ``stacked_fit_bound``); returns how many were limited (a 0-d tensor: no device sync)."""
        if self.masm_fit_constraint[adapter_name] != "projection" or self.pending_decomposition(adapter_name):
            return torch.zeros((), dtype=torch.long)
        return stacked_fit_bound([self], adapter_name)

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


class _Stack(NamedTuple):
    """The factors of L same-shape layers, stacked: U (L, m, T), s (L, T) in singular-value units, V (L, n, T),
    the raw trainable ``masm_s`` (L, T), s0 (L, T) and the per-layer singular-value unit (L, 1) or ``None``."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor
    raw_s: torch.Tensor
    s0: torch.Tensor
    units: torch.Tensor | None


def _stack_factors(layers: Sequence[MASMLayer], adapter_name: str) -> _Stack:
    first = layers[0]
    for layer in layers:
        layer._require_factors(adapter_name)
    m, n = first.out_features, first.in_features
    total = first.masm_num_subspaces[adapter_name] * first.masm_subspace_rank[adapter_name]
    count = len(layers)
    U = torch.cat([p for layer in layers for p in layer._trainable("masm_U", adapter_name)], dim=1)
    V = torch.cat([p for layer in layers for p in layer._trainable("masm_V", adapter_name)], dim=1)
    U, V = U.reshape(m, count, total).transpose(0, 1), V.reshape(n, count, total).transpose(0, 1)
    raw_s = torch.cat([p for layer in layers for p in layer._trainable("masm_s", adapter_name)]).reshape(
        count, total
    )
    s0 = torch.stack([layer._frozen("masm_s0", adapter_name) for layer in layers])
    units = None
    s = raw_s
    if first.masm_subspace_alpha[adapter_name] is not None:
        values = [layer.singular_value_unit(adapter_name) for layer in layers]
        units = _layer_values(first, values, raw_s)[:, None]
        s = s0 + units * raw_s
    return _Stack(U, s, V, raw_s, s0, units)


def _layer_values(first: MASMLayer, values: list[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` (one float per layer of a stack) as a tensor on ``like``'s device, made once per values and device:
    a tensor made from Python floats is a blocking host-to-device copy, which on a GPU waits for every queued kernel
    (twice per training step in the fit bound, twice more with the regularisers)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    key = (like.device, like.dtype, *values)
    cached = first._masm_stack_values.get(key)
    if cached is None:
        if len(first._masm_stack_values) >= 8:  # old values (a reload, a move to another device)
            first._masm_stack_values.clear()
        cached = first._masm_stack_values[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return cached


def _reference_scales(layers: Sequence[MASMLayer], adapter_name: str, like: torch.Tensor) -> torch.Tensor:
    return _layer_values(layers[0], [layer.reference_scale_value(adapter_name) for layer in layers], like)


@regularizers.full_precision
def stacked_regularization_terms(layers: Sequence[MASMLayer], adapter_name: str) -> dict[str, torch.Tensor]:
    """The orthogonality and spectral terms ((L,) each) of layers that share a weight shape and device, computed
    as one stack: the same values as each layer's ``regularization_terms``, at a fraction of the op count."""
    first = layers[0]
    stack = _stack_factors(layers, adapter_name)
    weights = [layer.get_base_layer().weight.to(torch.float32) for layer in layers]
    # W^T U and W V as (U^T W)^T and (V^T W^T)^T: with the K*k columns as rows, each product streams the
    # row-major weight in its fast order (about 2x faster on CPU than W^T @ U, forward and backward).
    # (unbind, not indexing: its backward is one stack, not a zero-filled copy of the whole stack per layer)
    w_t_u = torch.stack([u.T @ weight for u, weight in zip(stack.U.unbind(0), weights)]).transpose(-1, -2)
    w_v = torch.stack([v.T @ weight.T for v, weight in zip(stack.V.unbind(0), weights)]).transpose(-1, -2)
    rank = min(first.out_features, first.in_features)
    energy = _reference_scales(layers, adapter_name, stack.s).square() * rank
    penalty = first.masm_fit_constraint[adapter_name] == "penalty"
    return regularizers.stacked_terms(
        w_t_u,
        w_v,
        stack.U,
        stack.s,
        stack.V,
        torch.stack([layer._frozen("masm_U0", adapter_name) for layer in layers]),
        stack.s0,
        torch.stack([layer._frozen("masm_V0", adapter_name) for layer in layers]),
        energy,
        rank,
        first.masm_subspace_rank[adapter_name],
        first.masm_fit_bound[adapter_name] if penalty else None,
    )


@regularizers.full_precision
@torch.no_grad()
def stacked_fit_bound(layers: Sequence[MASMLayer], adapter_name: str) -> torch.Tensor:
    """Project every subspace of these same-shape layers that outgrew ``fit_bound * rho`` back onto the bound
    (its ``s_j`` scaled down, directions kept) in a handful of batched ops; returns how many were limited
    (a 0-d tensor on the layers' device: no sync). A limited subspace trains on as before; nothing is frozen.
    With ``train_factors="vectors"`` (``masm_s`` frozen) ``U_j`` and ``V_j`` are scaled instead, by the square
    root each: a frozen factor is never written."""
    first = layers[0]
    rank = first.masm_subspace_rank[adapter_name]
    stack = _stack_factors(layers, adapter_name)
    limits = first.masm_fit_bound[adapter_name] * _reference_scales(layers, adapter_name, stack.s)[:, None]
    scales = regularizers.fit_bound_scales(stack.U, stack.s, stack.V, rank, limits)  # (L, K)
    per_column = scales.repeat_interleave(rank, dim=-1)
    width = first.block_width(adapter_name)
    if "masm_s" in first.frozen_peft_weight_names.get(adapter_name, ()):
        root, limited = per_column.sqrt().unsqueeze(-2), (per_column < 1).unsqueeze(-2)  # (L, 1, T)
        for factor, values in (("masm_U", stack.U), ("masm_V", stack.V)):
            # untouched subspaces keep their exact values
            kept = torch.where(limited, values * root, values)
            params = [p for layer in layers for p in layer._trainable(factor, adapter_name)]
            torch._foreach_copy_(params, [block for f in kept.unbind(0) for block in f.split(width, -1)])
        return (scales < 1).sum()
    if stack.units is None:
        scaled = stack.raw_s * per_column
    else:  # scale s_j = s0_j + unit * t_j, and write the offset t_j back
        scaled = (stack.s * per_column - stack.s0) / stack.units
    new = torch.where(per_column < 1, scaled, stack.raw_s)  # untouched subspaces keep their exact values
    params = [p for layer in layers for p in layer._trainable("masm_s", adapter_name)]
    pieces = new.unbind(0) if width == new.shape[-1] else new.reshape(-1).split(width)
    torch._foreach_copy_(params, list(pieces))
    return (scales < 1).sum()


class Linear(nn.Module, MASMLayer):
    """An ``nn.Linear`` with MASM adapters."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MASMConfig, **kwargs: Any) -> None:
        super().__init__()
        MASMLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

        self._loading: tuple[str, list[str]] | None = None
        self.register_load_state_dict_post_hook(_finish_loading)
        self.register_state_dict_post_hook(_save_per_subspace)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Children (the buffer dicts) load after this call; the post-hook finishes the job.
        loaded = [name for name in self.masm_pending if f"{prefix}masm_U0.{name}" in state_dict]
        for name in loaded:
            self._check_saved_shape(state_dict, prefix, name)
            self._join_saved_subspaces(state_dict, prefix, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._loading = (prefix, loaded)

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
        adapters = self._modules["masm_U"]._modules
        for name in self.active_adapters:
            if name not in adapters:
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


def _finish_loading(module: Linear, incompatible_keys) -> None:
    if module._loading is not None:
        prefix, loaded = module._loading
        module._loading = None
        module._after_load(loaded, prefix)
