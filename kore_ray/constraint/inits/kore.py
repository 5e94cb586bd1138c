"""KORE and kore-v1: the null-space init from the retention covariance (adapters.kore_init)."""

from kore_ray.constraint.adapters import apply_kore, kore_init


def build(model, method, groups, store, rank, match_kore=False):
    return apply_kore(model, kore_init(model, store, groups, rank), train_a=method.trains_a)
