"""Exact, fast decomposition of the minor singular spectrum, and base-weight fingerprints.

MASM needs only the ``K*k`` smallest singular triplets of each target weight (and the next singular value,
``sigma_r``, stored with the adapter; only the random start of ``init_weights=False`` reads it). A full
``torch.linalg.svd`` computes all ``d`` of them; instead we form the Gram matrix of the smaller side in float64 and
ask LAPACK's MRRR solver (``dsyevr``) for the few smallest eigenpairs only. Forming ``W^T W`` squares the condition number, which float64 absorbs for any
float32/bf16/fp16 weight whose smallest singular value needed is above 1e-7 of its Frobenius norm (the reconstruction
U S = W V stays exact to float32 precision far beyond that; tests/tuner/test_decomposition.py); layers worse than
that (or rank-deficient ones) fall back to a full float64 SVD, so the result is always exact to float32
precision. Several layers are decomposed concurrently: LAPACK releases the GIL.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import threadpoolctl
import torch

# Below this ratio sigma_min / sigma_max, the Gram route loses float32 accuracy: use a full SVD.
_GRAM_MIN_RELATIVE_SIGMA = 1e-7
_FINGERPRINT_SAMPLES = 256


@dataclass
class MinorTriplets:
    """The ``num`` smallest singular triplets of a matrix, in descending singular-value order.

    ``sigma_r`` is the smallest singular value that is *not* part of the triplets (the tail of the
    frozen principal subspace).
    """

    U: torch.Tensor  # (m, num), orthonormal columns
    S: torch.Tensor  # (num,)
    V: torch.Tensor  # (n, num), orthonormal columns
    sigma_r: torch.Tensor  # scalar


def _full_svd_minor(w: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    d = s.shape[0]
    return u[:, d - num :], s[d - num :], vt[d - num :].T, float(s[d - num - 1])


def _gram_minor(w: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    m, n = w.shape
    transpose = m < n  # work on the smaller side
    a = w.T if transpose else w  # (big, small)
    gram = a.T @ a
    frobenius = np.sqrt(np.trace(gram))  # ||W||_F >= sigma_max
    evals, evecs = scipy.linalg.eigh(
        gram, subset_by_index=[0, num], driver="evr", overwrite_a=True, check_finite=False
    )
    sigma_all = np.sqrt(np.clip(evals, 0.0, None))  # ascending
    # <=, not <: an all-zero weight (sigma = ||W||_F = 0) has no Gram route either (A V / S would be 0 / 0)
    if sigma_all[0] <= _GRAM_MIN_RELATIVE_SIGMA * frobenius:
        return None
    # ascending -> descending, and split off sigma_r (the largest of the num+1 returned values)
    small_v = evecs[:, :num][:, ::-1]
    small_s = sigma_all[:num][::-1]
    sigma_r = float(sigma_all[num])
    big = a @ small_v / small_s
    # One Gram-Schmidt pass removes the O(eps * cond) loss of orthogonality of A V / S.
    big, r = np.linalg.qr(big)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    big = big * signs
    if transpose:
        return small_v.copy(), small_s.copy(), big, sigma_r
    return big, small_s.copy(), small_v.copy(), sigma_r


def minor_triplets(weight: torch.Tensor, num: int) -> MinorTriplets:
    """The ``num`` smallest singular triplets of ``weight`` (float32 results, float64 arithmetic)."""
    w = weight.detach().to("cpu", torch.float64).numpy()
    d = min(w.shape)
    if num >= d:
        raise ValueError(
            f"asked for {num} minor singular triplets of a {tuple(w.shape)} matrix (rank <= {d})"
        )
    result = _gram_minor(w, num)
    if result is None:
        result = _full_svd_minor(w, num)
    u, s, v, sigma_r = result
    device = weight.device
    return MinorTriplets(
        U=torch.from_numpy(np.ascontiguousarray(u)).to(device, torch.float32),
        S=torch.from_numpy(np.ascontiguousarray(s)).to(device, torch.float32),
        V=torch.from_numpy(np.ascontiguousarray(v)).to(device, torch.float32),
        sigma_r=torch.tensor(sigma_r, dtype=torch.float32, device=device),
    )


def minor_triplets_many(weights: Sequence[torch.Tensor], nums: Sequence[int]) -> list[MinorTriplets]:
    """Decompose several weights concurrently (one LAPACK call per worker thread)."""
    workers = max(1, min(len(weights), os.cpu_count() or 1))
    # One single-threaded BLAS/LAPACK call per worker: multi-threaded dsytrd is *slower* than one
    # thread at these sizes (measured: 0.14 s vs 0.056 s for 1024 x 1024 on 2 cores).
    with threadpoolctl.threadpool_limits(1):
        if workers == 1:
            results = [minor_triplets(w, k) for w, k in zip(weights, nums)]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(minor_triplets, weights, nums))
    _release_freed_memory()
    return results


def _release_freed_memory() -> None:
    """Hand the float64 work arrays back to the OS (glibc keeps freed blocks; ~700 MiB on ViT-L/14)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _fingerprint_index(numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(numel)
    return torch.randint(0, numel, (_FINGERPRINT_SAMPLES,), generator=generator)


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A small float32 summary of a weight: its Frobenius norm and values at fixed positions."""
    flat = weight.detach().reshape(-1)
    index = _fingerprint_index(flat.numel()).to(flat.device)
    norm = flat.to(torch.float64).norm().to(torch.float32).reshape(1)
    return torch.cat([norm, flat[index].to(torch.float32)])


def fingerprint_deviation(weight: torch.Tensor, fingerprint: torch.Tensor) -> float:
    """How far ``weight`` is from the weight ``fingerprint`` was taken of, in units of the tolerance.

    Values <= 1 mean "the same weight, up to a float16/bfloat16 cast"; larger values mean another
    weight. The tolerance on each sampled value is 2% of the weight's RMS plus 1% of the value.
    """
    current = weight_fingerprint(weight).to(fingerprint.device)
    numel = weight.numel()
    ref_norm = fingerprint[0].clamp_min(1e-30)
    rms = ref_norm / numel**0.5
    norm_dev = (current[0] - fingerprint[0]).abs() / (1e-3 * ref_norm)
    value_tol = 2e-2 * rms + 1e-2 * fingerprint[1:].abs()
    value_dev = ((current[1:] - fingerprint[1:]).abs() / value_tol).max()
    return float(torch.maximum(norm_dev, value_dev))
