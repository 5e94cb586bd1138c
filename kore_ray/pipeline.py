"""`kore inject`: the whole injection, stage after stage, on one run directory.

augment -> covariance -> init -> train (+ export) per method -> serve + evaluate. Each stage
skips work its run directory already holds for the same inputs, so a re-run after a failure
continues where it stopped and a finished run costs little.
"""

from __future__ import annotations

import time

from kore_ray.config import PipelineConfig
from kore_ray.constraint.init_stage import run_init
from kore_ray.methods import METHODS


def _stage(name: str):
    print(f"\n=== kore inject: {name} ===", flush=True)
    return time.perf_counter()


def run_inject(cfg: PipelineConfig, methods: list[str] | None = None, progress: bool = True) -> dict:
    """Run every stage for `methods` (default cfg.evaluate.methods); return the evaluation results."""
    from kore_ray.augment import run_augment
    from kore_ray.constraint.covariance_stage import run_covariance
    from kore_ray.evaluate.evaluate_stage import run_evaluate
    from kore_ray.train.train_stage import run_train

    methods = list(methods or cfg.evaluate.methods)
    cfg.check_servable(methods)  # before hours of training, not at serve time
    timings = {}
    start = _stage("augment")
    run_augment(cfg, progress=progress)
    timings["augment"] = time.perf_counter() - start
    if any(METHODS[m].needs_store for m in methods):
        start = _stage("covariance")
        run_covariance(cfg, progress=progress)
        timings["covariance"] = time.perf_counter() - start
    for method in methods:
        mcfg = cfg.for_method(method)
        start = _stage(f"init + train: {method}")
        run_init(mcfg, method)
        run_train(mcfg, method, progress=progress)
        timings[f"train:{method}"] = time.perf_counter() - start
    start = _stage("serve + evaluate")
    results = run_evaluate(cfg, methods, progress=progress)
    timings["evaluate"] = time.perf_counter() - start
    print("\nkore inject: stage times " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results
