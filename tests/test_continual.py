"""`kore continual` end to end on a tiny Llama: 2 batches, KORE and sequential LoRA.

One run directory through three runs: the first crashes while training batch 2 (after batch
1 was trained, stacked, evaluated and gated); the second resumes there without redoing batch
1; the third changes only the gate's thresholds and re-gates without training or serving.
A random tiny model learns nothing in 3 steps, so the gate (min_retention 0.5: the tiny
model knows no probe, its retention is 0) holds every version back at first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kore_ray.config import load_config
from kore_ray.continual import continual_stage
from kore_ray.continual.continual_stage import run_continual
from kore_ray.models.tiny import save_tiny_model
from kore_ray.run_dir import ContinualDir

pytestmark = pytest.mark.ray


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _batch(tmp_path: Path, k: int) -> dict:
    items = [{"id": f"k{k}{i}", "kind": "entity", "subject": f"Zorblat {k}{i}",
              "knowledge": f"Zorblat {k}{i} is the mayor of Lunaria {k}{i}."} for i in range(2)]
    questions = [{"id": f"q{i}", "knowledge_id": f"k{k}{i}",  # same ids in every batch
                  "question": f"Who is the mayor of Lunaria {k}{i}?", "answer": f"Zorblat {k}{i}"}
                 for i in range(2)]
    return {"name": f"day {k}", "knowledge": _jsonl(tmp_path / f"k{k}.jsonl", items),
            "eval_questions": _jsonl(tmp_path / f"q{k}.jsonl", questions)}


def _stamps(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and ("/adapter/" in str(p) or p.name == "model.safetensors")}


def test_versions_crash_resume_skip_and_regate(ray_local, tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "model", kind="llama")
    probes = [{"id": f"r{i}", "prompt": f"The river number {i} runs past the", "answer": "mill"}
              for i in range(8)]
    batches = [_batch(tmp_path, 1), _batch(tmp_path, 2)]
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"model.name_or_path={model}",
        f"data.retention={_jsonl(tmp_path / 'r.jsonl', probes[:6])}",
        f"data.retention_eval={_jsonl(tmp_path / 'e.jsonl', probes[6:])}",
        "augment.generators=[extractive]", "augment.dialogues_per_item=0",
        "covariance.batch_size=4", "init.rank=4",
        "train.max_steps=3", "train.batch_size=4", "train.max_length=64",
        "serve.max_lora_rank=8", "serve.max_model_len=256", "serve.kv_cache_gib=0.5",
        "evaluate.max_new_tokens=4", "continual.tracks=[kore]",  # one track: the mechanics are shared
        f"continual.batches={json.dumps(batches)}",
        "continual.gate.min_retention=0.5", "continual.gate.max_drop=null",
    ]
    cfg = load_config(overrides=overrides)
    cdir = ContinualDir(cfg.run_dir)

    real = continual_stage.train_version
    def crash_on_batch_2(cfg, cdir, track, k, batch, progress=False):
        if k == 2:
            raise RuntimeError("the machine went away")
        return real(cfg, cdir, track, k, batch, progress)

    monkeypatch.setattr(continual_stage, "train_version", crash_on_batch_2)
    with pytest.raises(RuntimeError, match="went away"):
        run_continual(cfg, progress=False)
    first = _stamps(cdir.root)
    assert cdir.adapter("kore", 1).is_dir() and not cdir.adapter("kore", 2).exists()
    monkeypatch.setattr(continual_stage, "train_version", real)

    capsys.readouterr()
    matrix = run_continual(cfg, progress=False)
    out = capsys.readouterr().out
    assert "round 1 is evaluated; skipping" in out
    assert all(_stamps(cdir.root)[f] == t for f, t in first.items())  # batch 1 not redone
    for track in ("kore",):
        assert cdir.model(track, 2).is_dir()
        stack = json.loads((cdir.adapter(track, 2) / "manifest.json").read_text())
        assert stack["exported_rank"]["max"] == 2 * json.loads(
            (cdir.adapter(track, 1) / "manifest.json").read_text())["exported_rank"]["max"]
    scores = matrix["rounds"]["2"]["scores"]
    assert set(scores["kore-v2"]["batches"]) == {"1", "2"}  # every batch so far
    assert all(s["failed_requests"] == 0 for s in scores.values())
    # The failing gate published nothing, and says why.
    assert not cdir.published.exists() or not any(cdir.published.iterdir())
    gate = matrix["rounds"]["2"]["gate"]["kore-v2"]
    assert not gate["passed"] and any("min_retention" in m for m in gate["missed"])
    assert "min_retention" in cdir.report.read_text() and cdir.plot.stat().st_size > 0

    # New thresholds: re-gated from the stored scores, nothing trained or served again.
    loose = load_config(overrides=[*overrides, "continual.gate.min_retention=null"])
    before = _stamps(cdir.root)
    capsys.readouterr()
    run_continual(loose, progress=False)
    out = capsys.readouterr().out
    assert "round 2 is evaluated; skipping" in out and _stamps(cdir.root) == before
    assert sorted(p.name for p in cdir.published.iterdir()) == ["kore-v1", "kore-v2"]
