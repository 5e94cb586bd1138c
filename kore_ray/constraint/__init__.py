"""KORE-CONSTRAINT, the functional core: covariance, null-space init, PEFT adapters, export.

Plain torch + PEFT, no Ray: the Ray shell streams batches and reduces stores built here.
"""

from kore_ray.constraint.adapters import (
    METHODS,
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
    model_fingerprint,
    save_store,
)

__all__ = [
    "METHODS",
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
