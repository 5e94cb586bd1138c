"""`kore evaluate`: serve the base model and every method's adapter, ask, score, report.

Everything goes through the served OpenAI endpoint (vLLM multi-LoRA on Ray Serve), as a
user of the updated model would reach it: new-knowledge questions as chat, completion probes
as completions, all greedy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kore_ray.config import PipelineConfig
from kore_ray.data.io import read_records
from kore_ray.data.schemas import EvalQuestion, KnowledgeItem, RetentionProbe
from kore_ray.errors import InputError
from kore_ray.evaluate.ask import ask
from kore_ray.evaluate.report import write_report
from kore_ray.evaluate.score import prediction_rows, score_all
from kore_ray.methods import METHODS
from kore_ray.run_dir import MANIFEST, RunDir, file_digest, is_current, read_record
from kore_ray.tracking import log_run


def _chat(question: str) -> str:
    return json.dumps([{"role": "user", "content": question}])


def build_requests(models: list[str], questions: list[EvalQuestion],
                   probes: list[RetentionProbe]) -> list[dict]:
    rows = []
    for model in models:
        rows += [{"id": q.id, "model": model, "kind": "chat", "prompt": _chat(q.question)} for q in questions]
        rows += [{"id": p.id, "model": model, "kind": "completion", "prompt": p.prompt} if p.prompt
                 else {"id": p.id, "model": model, "kind": "chat", "prompt": _chat(p.question)}
                 for p in probes]
    return rows


def evaluation_inputs(cfg: PipelineConfig, methods: list[str]) -> dict:
    """What the results depend on: a re-run with the same inputs reuses eval/results.json."""
    return {
        "model": cfg.model.name_or_path,
        "max_new_tokens": cfg.evaluate.max_new_tokens,
        "adapters": {m: file_digest(RunDir(cfg.run_dir).adapter(m) / "adapter_model.safetensors")
                     for m in methods},
        "data": {k: file_digest(getattr(cfg.data, k)) for k in ("knowledge", "eval_questions", "retention_eval")},
    }


def run_evaluate(cfg: PipelineConfig, methods: list[str] | None = None, base_url: str | None = None,
                 progress: bool = True) -> dict:
    """Score the base and each method; write <run_dir>/eval/. Starts the Serve app unless
    `base_url` names one already serving this run's adapters."""
    from kore_ray.serve.serve_stage import serving

    run_dir = RunDir(cfg.run_dir)
    methods = list(methods or cfg.evaluate.methods)
    for m in [m for m in methods if not METHODS[m].adapter]:  # a whole model, not an adapter
        print(f"kore evaluate: {m!r} is not served as an adapter; evaluate its model directory "
              "separately")
        methods.remove(m)
    missing = [m for m in methods if not (run_dir.adapter(m) / "adapter_config.json").is_file()]
    if missing:
        raise InputError(f"no trained adapter for {missing} in {run_dir.adapters} (run `kore train`)")
    if not (cfg.data.eval_questions and cfg.data.retention_eval and cfg.data.knowledge):
        raise InputError("evaluation needs data.knowledge, data.eval_questions and data.retention_eval")
    inputs = evaluation_inputs(cfg, methods)
    if is_current(run_dir.results, {"inputs": inputs}):
        print(f"kore evaluate: {run_dir.results} is up to date; skipping")
        return _summarise(read_record(run_dir.results), run_dir.report)
    items = read_records(cfg.data.knowledge, KnowledgeItem)
    questions = read_records(cfg.data.eval_questions, EvalQuestion)
    probes = read_records(cfg.data.retention_eval, RetentionProbe)
    base = cfg.serve.served_model_name or cfg.model.name_or_path
    requests = build_requests([base, *methods], questions, probes)
    key = os.environ.get(cfg.serve.auth_token_env, "EMPTY") if cfg.serve.auth_token_env else "EMPTY"

    def run(url: str) -> dict:
        return ask(requests, url, api_key=key, max_tokens=cfg.evaluate.max_new_tokens, progress=progress)

    if base_url:
        predictions = run(base_url)
    else:
        with serving(cfg) as url:
            predictions = run(url)
    results = score_all(predictions, base, {m: m for m in methods}, questions, probes, items)
    rows = prediction_rows(predictions, base, {m: m for m in methods}, questions, probes)
    results["settings"] = {
        "model": cfg.model.name_or_path, "methods": methods, "max_new_tokens": cfg.evaluate.max_new_tokens,
        "training": {m: {"rank": (c := cfg.for_method(m)).init.rank, "learning_rate": c.train.learning_rate,
                         "max_steps": c.train.max_steps, "batch_size": c.train.batch_size,
                         "exported_rank": (read_record(run_dir.adapter(m) / MANIFEST) or {}).get(
                             "exported_rank")} for m in methods},
    }
    results["inputs"] = inputs
    paths = write_report(results, cfg.run_dir, rows)
    uri = log_run(cfg, results, [p for k, p in paths.items() if k != "predictions"])
    if uri:
        print(f"kore evaluate: logged to MLflow at {uri} (experiment {cfg.tracking.experiment!r})")
    return _summarise(results, paths["report"])


def _summarise(results: dict, report: Path) -> dict:
    for name, r in {"base": results["base"], **results["methods"]}.items():
        groups = "".join(f"  [{g}: CEM {v['cem']:.3f} F1 {v['f1']:.3f}]"
                         for g, v in r.get("adaptation_by_group", {}).items() if len(r["adaptation_by_group"]) > 1)
        print(f"  {name:8s} adaptation CEM {r['adaptation_cem']:.3f}  F1 {r['adaptation_f1']:.3f}  "
              f"retention {r['retention']:.3f}{groups}")
    print(f"kore evaluate: report at {report}")
    return results
