"""MLflow tracking of a run directory: one run per method and the base, each step once, re-runs
update the same MLflow runs."""

import json

from kore_ray.config import load_config
from kore_ray.evaluate.report import write_report
from kore_ray.run_dir import METRICS, RunDir
from kore_ray.tracking import log_run


def _figures(cem):
    return {"adaptation_cem": cem, "adaptation_f1": cem / 2, "retention": 0.9,
            "adaptation_cem_by_kind": {"news": cem},
            "counts": {"questions_correct": 1, "questions": 2, "retention_kept": 9,
                       "retention_known": 10, "failed_requests": 0}}


def test_each_method_is_one_mlflow_run_with_its_steps_figures_and_report(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", "init.rank=8"])
    run = RunDir(cfg.run_dir)
    for method, losses in {"kore": [2.0, 1.5, 1.0], "lora": [2.1, 1.2]}.items():
        run.train(method).mkdir(parents=True)
        (run.train(method) / METRICS).write_text("".join(
            json.dumps({"step": i + 1, "loss": v, "lr": 1e-3, "grad_norm": 1.0}) + "\n"
            for i, v in enumerate(losses)))
    results = {"base": _figures(0.1), "methods": {"kore": _figures(0.6), "lora": _figures(0.5)},
               "retention_probes": 10, "settings": {"training": {"kore": {
                   "rank": 8, "learning_rate": 1e-3, "max_steps": 3, "batch_size": 4,
                   "exported_rank": {"min": 8, "max": 8}}}}}
    paths = write_report(results, cfg.run_dir)
    assert paths["loss_plot"].is_file() and "training_loss.png" in paths["report"].read_text()
    artifacts = [p for k, p in paths.items() if k != "predictions"]
    for _ in range(2):  # a second call (a re-run's evaluation) adds nothing twice
        uri = log_run(cfg, results, artifacts)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("kore-ray")
    runs = {r.data.tags["kore.method"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["base", "kore", "lora"]
    kore = runs["kore"]
    assert kore.data.metrics["adaptation_cem"] == 0.6 and kore.data.params["init.rank"] == "8"
    assert kore.data.params["exported_rank.max"] == "8"
    assert kore.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    history = client.get_metric_history(kore.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert len(client.get_metric_history(runs["lora"].info.run_id, "train/loss")) == 2
    listed = {a.path for a in client.list_artifacts(kore.info.run_id)}
    assert {"report.md", "adaptation_retention.png", "training_loss.png"} <= listed
    assert uri.startswith("file://") and (tmp_path / "run" / "mlruns").is_dir()
