"""The null-space maths of KORE-CONSTRAINT, in plain float64 torch.

Notation (LoRA): W is d_out x d_in, A is r x d_in, B is d_out x r, y = W x + B A x.
C = sum x x^T over the retention tokens that reach W (d_in x d_in).

U0 holds the eigenvectors of C with the r smallest eigenvalues: the directions the
retention inputs (almost) never use. The adapter is initialised inside them, so
for a retention input x, A0 x ~ 0 and whatever B learns barely reaches it. The
"leak" (sum of those r eigenvalues / trace C) is the fraction of the retention
inputs' energy that still falls in the adapter's input space.

Only the r smallest eigenpairs are computed (on CPU: LAPACK's MRRR driver through
scipy, which reduces C to tridiagonal form once and then solves for those r alone, where a
full eigendecomposition also builds and back-transforms the other d_in - r vectors), and
rather than a full SVD of W U0 U0^T (d_out x d_in; the KORE/LoRA-Null reference code), a
thin SVD of W U0 (d_out x r) gives the same factors at O(d_out d_in r).
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch

from kore_ray.errors import InputError


@dataclass(frozen=True)
class NullSpace:
    """The r lowest-energy directions of one covariance.

    basis: U0, d_in x r, orthonormal columns (float64).
    eigenvalues: the r smallest eigenvalues of C, ascending (float64).
    leak: their sum / trace(C), in [0, 1]; 0 for a perfect null space.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    leak: float

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def null_space(cov: torch.Tensor, rank: int, *, name: str = "covariance") -> NullSpace:
    """U0 = the eigenvectors of `cov` for its `rank` smallest eigenvalues.

    `cov` is symmetric positive semi-definite (a sum of x x^T); its scale does not
    matter. The eigendecomposition runs in float64 whatever the input dtype: the
    small end of the spectrum is exactly what float32 resolves worst. `name`
    (the layer or group) is used in error messages.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise InputError(f"{name}: covariance must be square, got shape {tuple(cov.shape)}")
    d_in = cov.shape[0]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"{name}: rank must be a positive integer, got {rank!r}")
    if rank > d_in:
        raise InputError(f"{name}: rank {rank} exceeds the layer's input width d_in={d_in}")
    c = cov.to(torch.float64)
    if not torch.isfinite(c).all():
        raise InputError(f"{name}: covariance holds NaN or Inf")
    # eigh reads one triangle only; symmetrise so both triangles count equally.
    low, basis = _smallest_eigenpairs((c + c.T) / 2, rank)
    trace = c.diagonal().sum().item()
    # Rounding can make the smallest eigenvalues slightly negative; energy is >= 0.
    leak = low.clamp(min=0).sum().item() / trace if trace > 0 else 0.0
    return NullSpace(basis=basis, eigenvalues=low, leak=leak)


def _smallest_eigenpairs(c: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` smallest eigenvalues of symmetric `c` (ascending) and their eigenvectors."""
    if c.device.type != "cpu" or 2 * rank > c.shape[0]:
        # On a GPU (cuSOLVER) or for half the spectrum or more: the full decomposition.
        values, vectors = torch.linalg.eigh(c)
        return values[:rank], vectors[:, :rank].contiguous()
    values, vectors = scipy.linalg.eigh(
        c.numpy(), subset_by_index=[0, rank - 1], driver="evr", check_finite=False
    )
    return torch.from_numpy(values), torch.from_numpy(vectors).contiguous()


def null_space_init(weight: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with B0 A0 = W U0 U0^T, from a thin SVD of W U0.

    W U0 = U' S' V'^T (d_out x r); A0 = diag(sqrt S') V'^T U0^T (r x d_in) and
    B0 = U' diag(sqrt S') (d_out x r). Splitting sqrt(S') evenly between the two
    factors keeps them on the same scale, as PiSSA/CorDA do. Returns float64.
    """
    w = weight.to(torch.float64)
    u0 = basis.to(torch.float64)
    if w.ndim != 2 or w.shape[1] != u0.shape[0]:
        raise InputError(
            f"weight of shape {tuple(w.shape)} does not take inputs of width {u0.shape[0]}"
        )
    u, s, vh = torch.linalg.svd(w @ u0, full_matrices=False)
    root = s.sqrt()
    a0 = (root[:, None] * vh) @ u0.T
    b0 = u * root[None, :]
    return a0, b0


def residual(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """W_res = W - B0 A0, computed in float64 and returned in W's dtype.

    The one place W_res is computed: building an adapter and re-loading a saved one
    both call it, so a reloaded base is bit-identical to the one trained on.
    """
    delta = b0.to(torch.float64) @ a0.to(torch.float64)
    return (weight.to(torch.float64) - delta).to(weight.dtype)
