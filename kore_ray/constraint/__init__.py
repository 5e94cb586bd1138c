"""KORE-CONSTRAINT, the functional core: covariance, null-space init, PEFT adapters, export.

Plain torch + PEFT, no Ray: the Ray shell streams batches and reduces stores built here.
(The stages, which read and write the run directory, are `covariance_stage` and
`init_stage`; the covariance stage is the one that uses Ray.)
"""

from kore_ray.constraint.adapters import (
    KoreInit,
    apply_kore,
    build_method,
    export_lora,
    kore_init,
    load_kore_model,
    matched_lora_rank,
    save_kore_model,
    trainable_parameter_count,
)
from kore_ray.constraint.covariance import CovarianceAccumulator, collect_covariance
from kore_ray.constraint.nullspace import NullSpace, null_space, null_space_init, residual
from kore_ray.constraint.store import (
    NORMALIZATIONS,
    CovarianceStore,
    load_store,
    merge_stores,
    save_store,
)
from kore_ray.run_dir import model_fingerprint

__all__ = [
    "NORMALIZATIONS",
    "CovarianceAccumulator",
    "CovarianceStore",
    "KoreInit",
    "NullSpace",
    "apply_kore",
    "build_method",
    "collect_covariance",
    "export_lora",
    "kore_init",
    "load_kore_model",
    "load_store",
    "matched_lora_rank",
    "merge_stores",
    "model_fingerprint",
    "null_space",
    "null_space_init",
    "residual",
    "save_kore_model",
    "save_store",
    "trainable_parameter_count",
]
