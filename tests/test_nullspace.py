"""Null-space maths: the fast init equals the reference construction, exactly."""

import pytest
import torch

from kore_ray.constraint.nullspace import null_space, null_space_init, residual
from kore_ray.errors import InputError


def _covariance(d_in: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """X^T X of correlated activations, so the spectrum spans several decades."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    mix = mix * torch.logspace(0, -3, d_in, dtype=torch.float64)[None, :]
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ mix.T
    return x.T @ x


def _max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spans of a and b."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.arccos(cosines.min()).item()


def test_null_space_is_the_low_end_of_the_spectrum():
    cov = _covariance(24, 200)
    ns = null_space(cov, 5)
    evals = torch.linalg.eigvalsh(cov)
    assert ns.basis.shape == (24, 5) and ns.basis.dtype == torch.float64
    torch.testing.assert_close(ns.basis.T @ ns.basis, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(ns.eigenvalues, evals[:5])
    # The basis carries exactly that energy: trace(U0^T C U0) = sum of the r smallest.
    torch.testing.assert_close(torch.trace(ns.basis.T @ cov @ ns.basis), evals[:5].sum())
    assert ns.leak == pytest.approx((evals[:5].sum() / evals.sum()).item())
    assert 0 < ns.leak < 1e-3


@pytest.mark.parametrize("d_out", [7, 24, 40])
def test_init_product_is_w_projected_on_the_null_space(d_out):
    d_in, r = 24, 6
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    u0 = null_space(_covariance(d_in, 300), r).basis
    a0, b0 = null_space_init(w, u0)
    assert a0.shape == (r, d_in) and b0.shape == (d_out, r)
    torch.testing.assert_close(b0 @ a0, w @ u0 @ u0.T, rtol=0, atol=1e-12)
    # W_res + B0 A0 == W: the model's function is unchanged at initialisation.
    torch.testing.assert_close(residual(w, a0, b0) + b0 @ a0, w, rtol=0, atol=1e-12)
    # Both factors carry sqrt(S'): equal Frobenius norms.
    torch.testing.assert_close(a0.norm(), b0.norm())


def test_init_row_space_matches_the_full_svd_reference():
    """KORE/LoRA-Null reference: P = U0 U0^T, full SVD of W P, top-r right singular vectors."""
    d_out, d_in, r = 32, 24, 6
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u0 = null_space(_covariance(d_in, 300, seed=3), r).basis
    a0, b0 = null_space_init(w, u0)

    _, s_ref, vh_ref = torch.linalg.svd(w @ (u0 @ u0.T), full_matrices=True)
    v_ref = vh_ref[:r].T
    assert _max_principal_angle(a0.T, v_ref) < 1e-6
    # Same singular values too: ||A0 row i|| * ||B0 col i|| = S'_i.
    torch.testing.assert_close(a0.norm(dim=1) * b0.norm(dim=0), s_ref[:r])
    # Retention energy reaching A0 is bounded by max(S') times the r smallest eigenvalues.
    ns = null_space(_covariance(d_in, 300, seed=3), r)
    reached = torch.trace(a0 @ _covariance(d_in, 300, seed=3) @ a0.T)
    assert reached <= s_ref[0] * ns.eigenvalues.sum() * (1 + 1e-9)


def test_float32_covariance_is_decomposed_in_float64():
    cov = _covariance(16, 100).float()
    ns = null_space(cov, 3)
    assert ns.basis.dtype == torch.float64


def test_bad_ranks_are_refused_with_the_layer_named():
    cov = _covariance(8, 50)
    with pytest.raises(InputError, match=r"layers\.3\.mlp: rank 9 exceeds .* d_in=8"):
        null_space(cov, 9, name="layers.3.mlp")
    with pytest.raises(InputError, match="positive integer"):
        null_space(cov, 0)
    bad = cov.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        null_space(bad, 2, name="layers.0.attn")


def test_residual_keeps_the_weight_dtype():
    w = torch.randn(6, 8)
    u0 = null_space(_covariance(8, 50), 2).basis
    a0, b0 = null_space_init(w, u0)
    w_res = residual(w, a0, b0)
    assert w_res.dtype == torch.float32
    torch.testing.assert_close(w_res.double() + b0 @ a0, w.double(), atol=1e-6, rtol=0)
