import pytest
import torch

from peft_masm.tuner.decomposition import (
    fingerprint_deviation,
    minor_triplets,
    minor_triplets_many,
    weight_fingerprint,
)


def _reference_minor(weight: torch.Tensor, num: int):
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, -num:] * s[-num:]) @ vh[-num:], s


def _with_spectrum(m: int, n: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = min(m, n)
    return ((u[:, :d] * spectrum) @ v[:, :d].T).float()


CASES = {
    "tall": lambda: _with_spectrum(96, 64, torch.logspace(0, -3, 64, dtype=torch.float64)),
    "wide": lambda: _with_spectrum(64, 96, torch.logspace(0, -3, 64, dtype=torch.float64)),
    # CLIP ViT-L/14 attention projection with its random initialisation (std 0.02): near-zero tail
    "clip-l-init": lambda: torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02,
    "rank-deficient": lambda: _with_spectrum(64, 64, torch.cat([torch.ones(40), torch.zeros(24)]).double()),
    # a zero-initialised projection: every singular value 0, and so is ||W||_F (the Gram route divided by 0)
    "all-zero": lambda: torch.zeros(48, 32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_minor_triplets_are_exact_to_float32_precision(case):
    weight = CASES[case]()
    num = 8
    t = minor_triplets(weight, num)
    reference, s = _reference_minor(weight, num)
    estimate = (t.U.double() * t.S.double()) @ t.V.double().T
    # the minor part, and hence W_principal = W - minor, is reconstructed at float32 precision
    assert (estimate - reference).norm() <= 1e-6 * weight.double().norm()
    torch.testing.assert_close(t.S.double(), s[-num:], atol=1e-6 * float(s[0]), rtol=0)
    assert float(t.sigma_r) == pytest.approx(float(s[-num - 1]), abs=1e-6 * float(s[0]))
    assert torch.all(t.S[:-1] >= t.S[1:])  # descending
    eye = torch.eye(num)
    if case != "rank-deficient":  # a zero singular value has no unique left vector; only U S matters there
        torch.testing.assert_close(t.U.T @ t.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.V.T @ t.V, eye, atol=1e-5, rtol=0)


def test_many_matches_one_by_one():
    weights = [CASES["tall"](), CASES["wide"](), CASES["tall"]() * 2]
    for a, b in zip(
        minor_triplets_many(weights, [4, 5, 6]), [minor_triplets(w, k) for w, k in zip(weights, [4, 5, 6])]
    ):
        torch.testing.assert_close(a.S, b.S)
        torch.testing.assert_close(a.U * a.S, b.U * b.S)


def test_asking_for_too_many_triplets():
    with pytest.raises(ValueError, match="rank <= 16"):
        minor_triplets(torch.randn(16, 32), 16)


def test_fingerprint_tells_weights_apart():
    weight = torch.randn(128, 64)
    fp = weight_fingerprint(weight)
    assert fingerprint_deviation(weight, fp) == 0.0
    assert fingerprint_deviation(weight.to(torch.bfloat16), fp) <= 1.0
    assert fingerprint_deviation(weight.to(torch.float16), fp) <= 1.0
    assert fingerprint_deviation(torch.randn(128, 64), fp) > 10.0
    assert fingerprint_deviation(weight * 1.05, fp) > 1.0
