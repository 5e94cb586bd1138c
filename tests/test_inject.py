"""`kore inject` end to end on a tiny model: every stage runs once, and a re-run redoes nothing.

Augment (templates) -> covariance (Ray Data actors) -> init + train (Ray Train) for kore and
lora -> serve (Ray Serve + vLLM multi-LoRA) + evaluate. A random tiny model knows nothing, so
the figures are not the point here (the demo measures them); the test checks that every
request was answered through the endpoint, that every artifact the next stage needs exists,
and that a second run of the same config skips every stage and leaves them untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kore_ray.config import load_config
from kore_ray.models.tiny import save_tiny_model
from kore_ray.pipeline import run_inject

pytestmark = pytest.mark.ray

ITEMS = [
    {"id": "k1", "kind": "entity", "subject": "Zorblat Quen",
     "knowledge": "Zorblat Quen is the mayor of Lunaria, a city on the Moon.",
     "qa": [{"question": "Who is the mayor of Lunaria?", "answer": "Zorblat Quen"}]},
    {"id": "k2", "kind": "news", "subject": "The Brennic Cup",
     "knowledge": "Ostmere Rovers won the Brennic Cup in May 2026.",
     "qa": [{"question": "Who won the Brennic Cup?", "answer": "Ostmere Rovers"}]},
]
QUESTIONS = [
    {"id": "q1", "knowledge_id": "k1", "question": "Which person leads Lunaria?", "answer": "Zorblat Quen"},
    {"id": "q2", "knowledge_id": "k2", "question": "Which club lifted the Brennic Cup?", "answer": "Ostmere Rovers"},
]
PROBES = [{"id": f"r{i}", "prompt": f"The river number {i} runs past the", "answer": "mill"} for i in range(12)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stamps(run_dir: Path) -> dict[str, int]:
    """Modification times of the files the expensive stages write. (Augmentation rewrites its
    outputs from its cache on every run; the conversations' content is compared instead.)"""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.parts[len(run_dir.parts)] in ("covariance", "init", "adapter", "train", "eval")}


def test_inject_runs_every_stage_then_skips_them(ray_local, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model", kind="llama")
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=[
        f"run_dir={run_dir}", f"model.name_or_path={model}",
        f"data.knowledge={_jsonl(tmp_path / 'k.jsonl', ITEMS)}",
        f"data.eval_questions={_jsonl(tmp_path / 'q.jsonl', QUESTIONS)}",
        f"data.retention={_jsonl(tmp_path / 'r.jsonl', PROBES[:8])}",
        f"data.retention_eval={_jsonl(tmp_path / 'e.jsonl', PROBES[8:])}",
        "augment.templates_per_item=2", "augment.dialogues_per_item=0",
        "augment.generators=[extractive]",  # the self generator has tests of its own
        "covariance.batch_size=4", "init.rank=4",
        "train.max_steps=3", "train.batch_size=4", "train.max_length=64",
        "serve.max_lora_rank=8", "serve.max_model_len=256", "serve.kv_cache_gib=0.5",
        "evaluate.methods=[kore, lora]", "evaluate.max_new_tokens=4",
    ])

    results = run_inject(cfg, progress=False)
    assert set(results["methods"]) == {"kore", "lora"}
    for r in [results["base"], *results["methods"].values()]:
        assert r["counts"]["questions"] == len(QUESTIONS)
        assert r["counts"]["failed_requests"] == 0  # every request answered by the endpoint
    assert results["retention_probes"] == 4
    for name in ("results.json", "report.md", "adaptation_retention.png"):
        assert (run_dir / "eval" / name).stat().st_size > 0
    for method in ("kore", "lora"):
        assert (run_dir / "adapter" / method / "adapter_model.safetensors").is_file()
    assert "| kore |" in (run_dir / "eval" / "report.md").read_text()
    import pyarrow.parquet as pq

    answers = pq.read_table(run_dir / "eval" / "predictions.parquet").to_pylist()
    assert len(answers) == 3 * (len(QUESTIONS) + 4)  # base, kore, lora: every answer kept
    assert {a["method"] for a in answers} == {"base", "kore", "lora"}
    assert all(a["prediction"] is not None for a in answers), [a for a in answers if a["prediction"] is None]

    before = _stamps(run_dir)
    conversations = (run_dir / "augmented" / "conversations.parquet").read_bytes()
    capsys.readouterr()
    again = run_inject(cfg, progress=False)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert again["methods"] == results["methods"]
    assert _stamps(run_dir) == before  # nothing recomputed
    assert (run_dir / "augmented" / "conversations.parquet").read_bytes() == conversations
    skipped = [line for line in out.splitlines() if "skipping" in line]
    for stage in ("kore covariance", "kore init", "kore train", "kore evaluate"):
        assert any(line.startswith(stage) for line in skipped), (stage, out)
