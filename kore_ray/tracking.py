"""MLflow tracking of a run directory: one MLflow run per method (and one for the base model).

Logged when the evaluation finishes, from what the run directory holds: the method's settings,
train/<method>/metrics.jsonl step by step, the evaluation figures, and eval/'s report and plots
as artifacts. Why not Ray Train's MLflow callback, live from the worker: a resumed worker
retrains the steps after its last checkpoint, and metrics.jsonl (rewritten on resume) is the
one record that holds each step once; logging it afterwards keeps MLflow equal to it, and a
re-run updates the same MLflow runs (found by their tags) instead of adding copies.

The default store is <run_dir>/mlruns (MLflow's file store, kept in maintenance mode by
MLflow 3: we opt in with MLFLOW_ALLOW_FILE_STORE); view it with
`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run_dir>/mlruns` (the `mlflow`
package; kore-ray itself needs only mlflow-skinny). `tracking.uri` names a shared server.
"""

from __future__ import annotations

import os
from pathlib import Path

from kore_ray.config import PipelineConfig
from kore_ray.run_dir import RunDir

STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_s")
EVAL_METRICS = ("adaptation_cem", "adaptation_f1", "retention")


def tracking_uri(cfg: PipelineConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(cfg.run_dir) / "mlruns").resolve().as_uri()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _run_id(client, experiment_id: str, run_dir: str, name: str) -> str:
    """The MLflow run of this run directory's `name`, made on first use."""
    query = f"tags.`kore.run_dir` = '{run_dir}' and tags.`kore.method` = '{name}'"
    found = client.search_runs([experiment_id], query, max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=name,
                             tags={"kore.run_dir": run_dir, "kore.method": name}).info.run_id


def log_run(cfg: PipelineConfig, results: dict, artifacts: list[Path]) -> str | None:
    """Log every method of `results` (and the base) to MLflow; returns the tracking URI."""
    if not cfg.tracking.mlflow:
        return None
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(cfg.tracking.experiment))
    run_dir = str(Path(cfg.run_dir).resolve())
    now = int(time.time() * 1000)
    for name, figures in {"base": results["base"], **results["methods"]}.items():
        run_id = _run_id(client, experiment_id, run_dir, name)
        metrics = [Metric(k, float(figures[k]), now, 0) for k in EVAL_METRICS if k in figures]
        params = []
        if name != "base":
            mcfg = cfg.for_method(name)
            settings = {"method": name, "model": cfg.model.name_or_path,
                        "init": mcfg.init.model_dump(), "train": mcfg.train.model_dump(),
                        "exported_rank": results.get("settings", {}).get("training", {}).get(
                            name, {}).get("exported_rank")}
            existing = client.get_run(run_id).data.params
            params = [Param(k, str(v)[:6000]) for k, v in _flat(settings).items()
                      if k not in existing]  # MLflow params are write-once
            steps = RunDir(cfg.run_dir).train_metrics(name)
            if len(client.get_metric_history(run_id, "train/loss")) == len(steps):
                steps = []  # logged by an earlier call: history is append-only
            for step in steps:
                metrics += [Metric(f"train/{k}", float(step[k]), now, int(step["step"]))
                            for k in STEP_METRICS if step.get(k) is not None]
        for i in range(0, len(params), 100):  # MLflow's limits per batch
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for path in artifacts:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
    return uri
