"""MASM's regularisers as pure functions of one layer's factors (method.md, section 2).

Every term is scale-free: it is measured in units of the layer's *reference scale*
``rho = ||W||_F / sqrt(d)`` (the root-mean-square singular value of the frozen weight, which cannot
vanish for a non-zero layer) or of the number of trained columns, never of the smallest singular
value (which sits at the noise floor of a quantised or nearly rank-deficient weight). Each term is 0
at initialisation (the adapter starts at the regularisers' minimum) and of order one when the
subspaces have moved by the layer's own scale, whatever the backbone, width or precision.

Everything is computed from ``K*k``-column factors and small ``K*k x K*k`` Gram matrices; the only
products with the base weight are ``W^T U`` and ``W V``, once each per layer (no dense m x n matrix is
formed).
"""

from __future__ import annotations

import torch


def _block_diagonal(total: int, rank: int, device: torch.device) -> torch.Tensor:
    groups = torch.arange(total, device=device) // rank
    return (groups[:, None] == groups[None, :]).to(torch.float32)


def subspace_spectral_norms(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, subspace_rank: int
) -> torch.Tensor:
    """``||U_j diag(s_j) V_j^T||_2`` for each subspace j, via thin QR of the (m, k) and (n, k) blocks."""
    m, total = U.shape
    num = total // subspace_rank
    U_blocks = U.reshape(m, num, subspace_rank).permute(1, 0, 2)
    V_blocks = V.reshape(V.shape[0], num, subspace_rank).permute(1, 0, 2)
    if subspace_rank == 1:
        return s.abs() * U_blocks.norm(dim=(1, 2)) * V_blocks.norm(dim=(1, 2))
    R_u = torch.linalg.qr(U_blocks).R
    R_v = torch.linalg.qr(V_blocks).R
    core = R_u * s.reshape(num, 1, subspace_rank) @ R_v.transpose(1, 2)
    return torch.linalg.matrix_norm(core, ord=2)


def layer_terms(
    weight: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    U0: torch.Tensor,
    s0: torch.Tensor,
    V0: torch.Tensor,
    subspace_rank: int,
    fit_bound: float | None,
    energy: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """One layer's ``orthogonality`` and ``spectral`` values (unweighted), each O(1).

    - orthogonality = (cross-subspace overlap + within-subspace departure from orthonormality) per
      trained column, plus semantic leakage: the energy ``||W_P^T u||^2 + ||W_P v||^2`` that the columns
      pick up from the frozen principal part ``W_P``, per column and in units of ``rho^2`` (a random unit
      direction reads about 1, a minor singular direction 0);
    - spectral = energy drift ``((||W'||^2 - ||W||^2) / ||W||^2)^2`` plus, when ``fit_bound`` is given,
      the fit penalty ``sum_j relu(||U_j diag(s_j) V_j^T||_2 / rho - fit_bound)^2``.

    ``energy`` (``||W||_F^2`` of the frozen base weight) may be passed when known, to skip a pass over
    the weight. Every product below is computed once and shared by both terms.
    """
    total = U.shape[1]
    same = _block_diagonal(total, subspace_rank, U.device)
    eye = torch.eye(total, device=U.device)
    if energy is None:
        energy = weight.square().sum()
    energy = torch.as_tensor(energy, dtype=U.dtype, device=U.device).clamp_min(1e-24)
    rho2 = energy / min(weight.shape)
    w_t_u, w_v = weight.T @ U, weight @ V
    gram_u, gram_v = U.T @ U, V.T @ V
    u0_t_u, v0_t_v = U0.T @ U, V0.T @ V

    # Orthogonality, per trained column. sum_{i<j} ||U_i^T U_j||^2 is half the off-block-diagonal Gram mass.
    cross = 0.5 * ((gram_u.square() + gram_v.square()) * (1 - same)).sum() / total
    within = (((gram_u - eye).square() + (gram_v - eye).square()) * same).sum() / total
    # Leakage into W_P = W - U0 diag(s0) V0^T, applied without forming it.
    principal_t_u = w_t_u - V0 @ (s0[:, None] * u0_t_u)
    principal_v = w_v - U0 @ (s0[:, None] * v0_t_v)
    leakage = (principal_t_u.square().sum() + principal_v.square().sum()) / (2 * total * rho2)

    # Spectral consistency. ||W'||^2 - ||W||^2 = 2 <W_P, M> + ||M||^2 - ||M0||^2, M = U diag(s) V^T.
    inner = (s * torch.diagonal(w_t_u.T @ V - u0_t_u.T @ (s0[:, None] * v0_t_v))).sum()
    norm_m = (s[:, None] * s[None, :] * gram_u * gram_v).sum()
    spectral = ((2 * inner + norm_m - s0.square().sum()) / energy).square()
    if fit_bound is not None:
        norms = subspace_spectral_norms(U, s, V, subspace_rank) / rho2.sqrt()
        spectral = spectral + torch.relu(norms - fit_bound).square().sum()
    return {"orthogonality": cross + within + leakage, "spectral": spectral}


def fit_bound_scales(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, subspace_rank: int, limit: float | torch.Tensor
) -> torch.Tensor:
    """Per-subspace factor ``<= 1`` that brings each ``||U_j diag(s_j) V_j^T||_2`` down to ``limit``."""
    norms = subspace_spectral_norms(U, s, V, subspace_rank)
    return (limit / norms.clamp_min(1e-30)).clamp(max=1.0)


__all__ = ["fit_bound_scales", "layer_terms", "subspace_spectral_norms"]
