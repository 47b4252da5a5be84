"""MASM's regularisers (docs/method.md) as pure functions of stacked factors.

Every term is scale-free: it is measured in units of the layer's *reference scale*
``rho = ||W||_F / sqrt(d)`` (the root-mean-square singular value of the frozen weight, which cannot
vanish for a non-zero layer) or of the number of trained columns, never of the smallest singular
value (which sits at the noise floor of a quantised or nearly rank-deficient weight). Each term is 0
at initialisation (the adapter starts at the regularisers' minimum) and of order one when the
subspaces have moved by the layer's own scale, whatever the backbone, width or precision.

Everything is computed from ``K*k``-column factors and small ``K*k x K*k`` Gram matrices; the only
products with the base weight are ``W^T U`` and ``W V``, once each per layer (no dense m x n matrix is
formed). Inputs are stacked over L layers of one shape (one layer is a stack of one); ``stacked.py`` gathers
them from the layers. Every function here runs in float32 even inside ``torch.autocast`` (see ``full_precision``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_R = TypeVar("_R")


def full_precision(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with autocast switched off, so that its products stay in the factors' float32.

    PyTorch's AMP recipe computes the loss inside ``torch.autocast``, so a loop that adds
    ``regularization_loss()`` there would run every matmul here in bfloat16: the QR and spectral norms refuse
    that dtype, and the terms, differences of nearly equal energies, would lose their digits. Outside autocast
    this is a plain call.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn(*args, **kwargs)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _block_diagonal(total: int, rank: int, device: torch.device) -> torch.Tensor:
    groups = torch.arange(total, device=device) // rank
    return (groups[:, None] == groups[None, :]).to(torch.float32)


@full_precision
def subspace_spectral_norms(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, subspace_rank: int
) -> torch.Tensor:
    """``||U_j diag(s_j) V_j^T||_2`` for each subspace j, via thin QR of the (m, k) and (n, k) blocks.

    Factors of one layer (``U`` (m, K*k)) give (K,); a stack of layers (``U`` (L, m, K*k)) gives (L, K)."""
    batch = U.shape[:-2]
    m, total = U.shape[-2:]
    num = total // subspace_rank
    U_blocks = U.reshape(*batch, m, num, subspace_rank).movedim(-2, -3)
    V_blocks = V.reshape(*batch, V.shape[-2], num, subspace_rank).movedim(-2, -3)
    if subspace_rank == 1:
        return s.abs() * U_blocks.norm(dim=(-2, -1)) * V_blocks.norm(dim=(-2, -1))
    if subspace_rank == 2:
        return _rank_two_spectral_norms(_block_grams(U, num), s.reshape(*batch, num, 2), _block_grams(V, num))
    R_u = torch.linalg.qr(U_blocks).R
    R_v = torch.linalg.qr(V_blocks).R
    core = R_u * s.reshape(*batch, num, 1, subspace_rank) @ R_v.transpose(-1, -2)
    return torch.linalg.matrix_norm(core, ord=2)


def _block_grams(factor: torch.Tensor, num: int) -> torch.Tensor:
    """The Gram matrices ``B_j^T B_j`` (..., K, k, k) of the K column blocks of ``factor`` (..., m, K*k): the
    diagonal blocks of one ``factor^T factor`` product (one wide product is faster than K narrow ones)."""
    gram = factor.transpose(-1, -2) @ factor
    total = gram.shape[-1]
    rank = total // num
    blocks = gram.reshape(*gram.shape[:-2], num, rank, num, rank).diagonal(dim1=-4, dim2=-2)
    return blocks.movedim(-1, -3)


def _rank_two_spectral_norms(gram_u: torch.Tensor, s: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """``||U_j diag(s_j) V_j^T||_2`` of rank-2 blocks from their 2 x 2 Gram matrices, with no QR or SVD.

    Its square is the largest eigenvalue of ``M = diag(s) G_v diag(s) G_u``, a product of two PSD matrices
    whose eigenvalues are real and non-negative: ``tr/2 + sqrt(((a - d)/2)^2 + b c)``. The batched QR it
    replaces took 18 ms of kernel time per fit-bound step on an H200 (ViT-L/14); this is a handful of batched
    ops. A degenerate block (two equal singular values, or a zero one) keeps a finite gradient.
    """
    m = (s.unsqueeze(-1) * gram_v * s.unsqueeze(-2)) @ gram_u
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    discriminant = (0.5 * (a - d)).square() + b * c
    return _sqrt_with_finite_gradient(0.5 * (a + d) + _sqrt_with_finite_gradient(discriminant))


def _sqrt_with_finite_gradient(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))``, whose gradient is 0 rather than inf (or NaN) where ``x`` is at or below the smallest
    normal float."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x > tiny, x.clamp_min(tiny).sqrt(), torch.zeros_like(x))


@full_precision
def stacked_terms(
    w_t_u: torch.Tensor,
    w_v: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    U0: torch.Tensor,
    s0: torch.Tensor,
    V0: torch.Tensor,
    energy: torch.Tensor,
    rank: int,
    subspace_rank: int,
    fit_bound: float | None,
) -> dict[str, torch.Tensor]:
    """``orthogonality`` and ``spectral`` (each (L,), unweighted, each O(1)) of L layers of one shape at once.

    - orthogonality = (cross-subspace overlap + within-subspace departure from orthonormality) per
      trained column, plus semantic leakage: the energy ``||W_P^T u||^2 + ||W_P v||^2`` that the columns
      pick up from the frozen principal part ``W_P``, per column and in units of ``rho^2`` (a random unit
      direction reads about 1, a minor singular direction 0);
    - spectral = energy drift ``((||W'||^2 - ||W||^2) / ||W||^2)^2`` plus, when ``fit_bound`` is given,
      the fit penalty ``sum_j relu(||U_j diag(s_j) V_j^T||_2 / rho - fit_bound)^2``.

    Inputs are stacked over layers: ``U``, ``U0`` (L, m, T); ``V``, ``V0`` (L, n, T); ``s``, ``s0`` (L, T);
    the two products with each frozen weight ``w_t_u = W^T U`` (L, n, T) and ``w_v = W V`` (L, m, T);
    ``energy = ||W||_F^2`` (L,); ``rank = min(m, n)``. Every op below runs once for the whole stack, so the
    cost of many small layers is a few batched products rather than a few dozen ops per layer.
    """
    total = U.shape[-1]
    same = _block_diagonal(total, subspace_rank, U.device)
    eye = torch.eye(total, device=U.device)
    energy = energy.to(U.dtype).clamp_min(1e-24)
    rho2 = energy / rank
    U_t, V_t = U.transpose(-1, -2), V.transpose(-1, -2)
    gram_u, gram_v = U_t @ U, V_t @ V
    u0_t_u, v0_t_v = U0.transpose(-1, -2) @ U, V0.transpose(-1, -2) @ V

    # Orthogonality, per trained column. sum_{i<j} ||U_i^T U_j||^2 is half the off-block-diagonal Gram mass.
    squares = gram_u.square() + gram_v.square()
    cross = 0.5 * (squares * (1 - same)).sum(dim=(-2, -1)) / total
    within = (((gram_u - eye).square() + (gram_v - eye).square()) * same).sum(dim=(-2, -1)) / total
    # Leakage into W_P = W - U0 diag(s0) V0^T, applied without forming it.
    s0_col = s0.unsqueeze(-1)
    principal_t_u = w_t_u - V0 @ (s0_col * u0_t_u)
    principal_v = w_v - U0 @ (s0_col * v0_t_v)
    leakage = (principal_t_u.square().sum(dim=(-2, -1)) + principal_v.square().sum(dim=(-2, -1))) / (
        2 * total * rho2
    )

    # Spectral consistency. ||W'||^2 - ||W||^2 = 2 <W_P, M> + ||M||^2 - ||M0||^2, M = U diag(s) V^T.
    # diag(w_t_u^T V) and diag(u0_t_u^T (s0 * v0_t_v)) without forming the T x T products.
    inner_w = (w_t_u * V).sum(dim=-2)
    inner_0 = (u0_t_u * (s0_col * v0_t_v)).sum(dim=-2)
    inner = (s * (inner_w - inner_0)).sum(dim=-1)
    norm_m = (s.unsqueeze(-1) * s.unsqueeze(-2) * gram_u * gram_v).sum(dim=(-2, -1))
    spectral = ((2 * inner + norm_m - s0.square().sum(dim=-1)) / energy).square()
    if fit_bound is not None:
        norms = subspace_spectral_norms(U, s, V, subspace_rank) / rho2.sqrt().unsqueeze(-1)
        spectral = spectral + torch.relu(norms - fit_bound).square().sum(dim=-1)
    return {"orthogonality": cross + within + leakage, "spectral": spectral}


@full_precision
def fit_bound_scales(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, subspace_rank: int, limit: torch.Tensor
) -> torch.Tensor:
    """Per-subspace factor ``<= 1`` that brings each ``||U_j diag(s_j) V_j^T||_2`` down to ``limit``. Both sides
    are held above 1e-30, so that a subspace of norm 0 against a limit of 0 (a layer whose weight is all zero has
    rho = 0) keeps a factor of 1 rather than 0 / 0."""
    norms = subspace_spectral_norms(U, s, V, subspace_rank)
    return (limit.clamp_min(1e-30) / norms.clamp_min(1e-30)).clamp(max=1.0)


__all__ = ["fit_bound_scales", "full_precision", "stacked_terms", "subspace_spectral_norms"]
