"""An experiment on KORE's init, kept to reproduce the README's "Aligned null space" rows.

KORE takes the adapter's r input directions as the r lowest-energy eigenvectors of the
retention covariance C. This writes a run directory's init/kore with the r directions chosen
inside the k = POOL * r lowest-energy ones instead, by the energy of the training
conversations' inputs (a second store, NEW_STORE, collected from augmented/conversations.parquet
with `kore covariance`):
  energy: the top r eigenvectors of P^T C_new P (P: the pool's basis);
  ratio:  the top r generalised eigenvectors of (P^T C_new P, diag(pool eigenvalues) + eps),
          most new-data energy per unit of retention energy, orthonormalised.
Everything else (the thin SVD, W_res, training, export) is KORE's. `kore inject` on the same
run directory then finds the init up to date and trains from it.

usage: python scripts/aligned_init.py CONFIG RUN_DIR NEW_STORE POOL {energy,ratio} [--set ...]
"""

import sys

import numpy as np
import scipy.linalg
import torch

import kore_ray.constraint.inits.kore as kore_module
from kore_ray.config import load_config
from kore_ray.constraint import adapters
from kore_ray.constraint.init_stage import run_init
from kore_ray.constraint.nullspace import null_space, null_space_init
from kore_ray.constraint.store import load_store


def energy(basis, cov) -> float:
    """The part of cov's (unit) trace that falls in the span of basis' orthonormal columns."""
    return (basis.T @ cov @ basis).trace().item()


def aligned_init(new_dir: str, pool: int, mode: str):
    def init(model, store, groups, rank):
        fingerprint = adapters._check_store(model, store, groups, "kore")
        new = load_store(new_dir, expected_fingerprint=fingerprint)
        ranks = adapters._group_ranks(groups, rank)
        factors, leaks = {}, {}
        for g in groups:
            c, cn = (s.sums[g.key].double() for s in (store, new))
            c, cn = (c + c.T) / 2 / c.trace(), (cn + cn.T) / 2 / cn.trace()
            r = ranks[g.key]
            ns = null_space(c, min(pool * r, c.shape[0]))
            p, m = ns.basis, ns.basis.T @ cn @ ns.basis
            if mode == "ratio":  # eps keeps directions the retention sample never saw finite
                lam = ns.eigenvalues.clamp(min=0)
                d = np.diag(lam.numpy() + 0.1 * lam.mean().item() + 1e-3 / c.shape[0])
                _, w = scipy.linalg.eigh(m.numpy(), d)
                u, _ = torch.linalg.qr(p @ torch.from_numpy(w[:, -r:]))
            else:
                u = p @ torch.linalg.eigh(m)[1][:, -r:]
            kore = p[:, :r]  # the pool's basis is ascending: KORE's r directions come first
            print(f"{g.key}: retention energy {energy(kore, c):.2e} -> {energy(u, c):.2e}, "
                  f"new-data energy {energy(kore, cn):.2e} -> {energy(u, cn):.2e}")
            leaks[g.key] = energy(u, c)
            for name in g.modules:
                factors[name] = null_space_init(model.get_submodule(name).weight.detach(), u)
        return adapters.KoreInit(factors=factors, leaks=leaks, model_fingerprint=fingerprint)

    return init


if __name__ == "__main__":
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    config, run_dir, new_dir, pool, mode, *rest = sys.argv[1:]
    if mode not in ("energy", "ratio") or len(rest) % 2 or any(a != "--set" for a in rest[::2]):
        sys.exit(__doc__)
    kore_module.kore_init = aligned_init(new_dir, int(pool), mode)
    run_init(load_config(config, [f"run_dir={run_dir}", *rest[1::2]]), "kore", force=True)
