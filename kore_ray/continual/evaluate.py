"""Continual evaluation: the matrix (version x batch), the promotion gate, the report.

Round k serves the base and every stacked version (continual/adapters/) with Serve + vLLM and
asks each new version, <track>-v<k>, every batch's questions so far (1..k) and the retention
probes; retention counts the probes the base answers right (as `kore evaluate` does). The
gate then compares with the thresholds in continual.gate:

  retention                 >= min_retention
  adaptation on batch k     >= min_adaptation   (CEM)
  drop on each batch j < k  <= max_drop         (CEM of <track>-v<j> on batch j, minus now)

A version that passes is copied to continual/published/ (serve that directory); one that
fails stays in continual/adapters/ and the report names the thresholds it missed. The scores
are kept (results.json) and the verdicts recomputed on every run, so new thresholds re-gate
the versions without serving them again (and withdraw a published one that now fails).
"""

from __future__ import annotations

import json
import shutil

from kore_ray.config import PipelineConfig
from kore_ray.data.io import read_records
from kore_ray.data.schemas import EvalQuestion, KnowledgeItem, RetentionProbe
from kore_ray.run_dir import ContinualDir, atomic_directory, atomic_write, file_digest, read_record


def _questions(cfg: PipelineConfig, k: int) -> dict[int, list[EvalQuestion]]:
    """Batch j's questions for j <= k, ids made unique across batches ("b<j>/<id>")."""
    return {j: [q.model_copy(update={"id": f"b{j}/{q.id}"})
                for q in read_records(b.eval_questions, EvalQuestion)]
            for j, b in enumerate(cfg.continual.batches[:k], start=1)}


def _gate(cfg: PipelineConfig, matrix: dict, track: str, k: int, scores: dict) -> dict:
    g, missed = cfg.continual.gate, []
    if g.min_retention is not None and scores["retention"] < g.min_retention:
        missed.append(f"retention {scores['retention']:.3f} < min_retention {g.min_retention}")
    new = scores["batches"][str(k)]["cem"]
    if g.min_adaptation is not None and new < g.min_adaptation:
        missed.append(f"adaptation on batch {k} {new:.3f} < min_adaptation {g.min_adaptation}")
    drops = {}
    for j in range(1, k):
        then = matrix["rounds"][str(j)]["scores"][f"{track}-v{j}"]["batches"][str(j)]["cem"]
        drops[str(j)] = then - scores["batches"][str(j)]["cem"]
        if g.max_drop is not None and drops[str(j)] > g.max_drop:
            missed.append(f"drop on batch {j} {drops[str(j)]:.3f} > max_drop {g.max_drop}")
    return {"passed": not missed, "missed": missed, "drops": drops}


def _publish(cdir: ContinualDir, track: str, k: int, passed: bool) -> None:
    """Copy a passing version into published/; withdraw one that no longer passes."""
    source, dest = cdir.adapter(track, k), cdir.published / f"{track}-v{k}"
    if not passed:
        shutil.rmtree(dest, ignore_errors=True)
        return
    if dest.is_dir() and file_digest(dest / "adapter_model.safetensors") == file_digest(
            source / "adapter_model.safetensors"):
        return
    with atomic_directory(dest) as tmp:
        for f in source.iterdir():
            shutil.copy2(f, tmp / f.name)


def evaluate_round(cfg: PipelineConfig, cdir: ContinualDir, k: int) -> dict:
    """Score the versions of round k (skipped when done for the same adapters and data)."""
    from kore_ray.evaluate.ask import ask
    from kore_ray.evaluate.evaluate_stage import build_requests
    from kore_ray.evaluate.score import known_probes, score_model
    from kore_ray.serve.serve_stage import serving

    c = cfg.continual
    names = [f"{t}-v{k}" for t in c.tracks]
    inputs = {"adapters": {n: file_digest(cdir.adapter(t, k) / "adapter_model.safetensors")
                           for n, t in zip(names, c.tracks)},
              "questions": [file_digest(b.eval_questions) for b in c.batches[:k]],
              "retention_eval": file_digest(cfg.data.retention_eval)}
    matrix = read_record(cdir.matrix) or {"rounds": {}}
    done = matrix["rounds"].get(str(k))
    if done is not None and done["inputs"] == inputs:
        print(f"kore continual: round {k} is evaluated; skipping")
    else:
        questions = _questions(cfg, k)
        probes = read_records(cfg.data.retention_eval, RetentionProbe)
        base = cfg.serve.served_model_name or cfg.model.name_or_path
        everything = [q for qs in questions.values() for q in qs]
        requests = build_requests([base, *names], everything, probes)
        serve_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
            "adapters": str(cdir.adapters.resolve()),
            "max_loras": max(cfg.serve.max_loras, len(names))})})
        with serving(serve_cfg) as url:
            predictions = ask(requests, url, max_tokens=cfg.evaluate.max_new_tokens,
                              progress=False, desc=f"round {k}")
        known = known_probes(predictions, base, probes)
        kinds = {i.id: i.kind for b in c.batches[:k] for i in read_records(b.knowledge, KnowledgeItem)}
        scores = {}
        for name in [base, *names]:
            per_batch = {str(j): score_model(predictions, name, qs, [], kinds)
                         for j, qs in questions.items()}
            scores[name] = {
                "retention": score_model(predictions, name, [], known, kinds)["retention"],
                "batches": {j: {"cem": s["adaptation_cem"], "f1": s["adaptation_f1"]}
                            for j, s in per_batch.items()},
                "failed_requests": sum(s["counts"]["failed_requests"] for s in per_batch.values()),
            }
        done = {"inputs": inputs, "known_probes": len(known), "probes": len(probes),
                "scores": scores}
        matrix["rounds"][str(k)] = done
    # The verdicts follow the thresholds of this run: changing them re-gates, without serving.
    done["gate"] = {name: _gate(cfg, matrix, track, k, done["scores"][name])
                    for track, name in zip(c.tracks, names)}
    atomic_write(cdir.matrix, json.dumps(matrix, indent=2).encode())
    for track, name in zip(c.tracks, names):
        verdict = done["gate"][name]
        _publish(cdir, track, k, verdict["passed"])
        s = done["scores"][name]
        print(f"kore continual: {name}: retention {s['retention']:.3f}, adaptation "
              + ", ".join(f"b{j} {v['cem']:.3f}" for j, v in s["batches"].items())
              + (" -> published" if verdict["passed"] else
                 f" -> NOT published ({'; '.join(verdict['missed'])})"))
    return matrix


def write_report(cfg: PipelineConfig, cdir: ContinualDir) -> dict:
    """report.md (a matrix per track) and the plot of each batch's CEM across versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cfg.continual
    matrix = read_record(cdir.matrix) or {"rounds": {}}
    rounds = sorted(matrix["rounds"], key=int)
    batches = [str(j) for j in range(1, len(c.batches) + 1)]
    lines = ["# Continual injection", "",
             f"Batches: {', '.join(f'{j}. {b.name}' for j, b in enumerate(c.batches, 1))}. "
             "Adaptation is CEM on each batch's questions; retention is the share of the probes "
             "the base answers right that the version still answers right.", ""]
    fig, axes = plt.subplots(1, len(c.tracks), figsize=(4 * len(c.tracks), 3.2), squeeze=False)
    for ax, track in zip(axes[0], c.tracks):
        lines += [f"## {track}", "", "| version | " + " | ".join(f"batch {j}" for j in batches)
                  + " | retention | gate |", "|---" * (len(batches) + 3) + "|"]
        for k in rounds:
            name = f"{track}-v{k}"
            s, gate = matrix["rounds"][k]["scores"][name], matrix["rounds"][k]["gate"][name]
            cells = [f"{s['batches'][j]['cem']:.3f}" if j in s["batches"] else "" for j in batches]
            verdict = "published" if gate["passed"] else "held: " + "; ".join(gate["missed"])
            lines.append(f"| v{k} | " + " | ".join(cells) + f" | {s['retention']:.3f} | {verdict} |")
        lines.append("")
        for j in batches:
            xs = [int(k) for k in rounds if j in matrix["rounds"][k]["scores"][f"{track}-v{k}"]["batches"]]
            ys = [matrix["rounds"][str(x)]["scores"][f"{track}-v{x}"]["batches"][j]["cem"] for x in xs]
            ax.plot(xs, ys, marker="o", label=f"batch {j}")
        ax.set_title(track)
        ax.set_xlabel("version")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks([int(k) for k in rounds])
    axes[0][0].set_ylabel("adaptation CEM")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    cdir.eval.mkdir(parents=True, exist_ok=True)
    fig.savefig(cdir.plot, dpi=120)
    plt.close(fig)
    lines += [f"![adaptation by version]({cdir.plot.name})", ""]
    atomic_write(cdir.report, "\n".join(lines).encode())
    print(f"kore continual: report at {cdir.report}")
    return matrix
