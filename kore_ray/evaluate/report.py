"""eval/: results.json (the numbers), report.md (a table a person reads), adaptation_retention.png."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kore_ray.run_dir import RunDir, atomic_write


def _save(fig, path: Path) -> Path:
    """Write a figure whole or not at all (a temporary file renamed into place)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot(results: dict, path: Path) -> Path:
    """Adaptation (x) against retention (y), one point per method: up and right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    points = {"base": results["base"], **results["methods"]}
    for name, r in points.items():
        ax.scatter(r["adaptation_cem"], r["retention"], s=60, marker="s" if name == "base" else "o")
        ax.annotate(name, (r["adaptation_cem"], r["retention"]), textcoords="offset points", xytext=(6, 4))
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="adaptation (CEM on new knowledge)",
           ylabel="retention (old facts kept)", title="Knowledge injection: adaptation vs retention")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_plot(run_dir: str | Path, methods: list[str], path: Path) -> Path | None:
    """Training loss by step, one line per method (train/<method>/metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for m in methods:
        steps = RunDir(run_dir).train_metrics(m)
        if steps:
            curves[m] = ([s["step"] for s in steps], [s["loss"] for s in steps])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for m, (x, y) in curves.items():
        ax.plot(x, y, label=m)
    ax.set(xlabel="step", ylabel="training loss (assistant tokens)", title="How each method trained")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _cell(text) -> str:
    return str(text if text is not None else "(no answer)").replace("|", "\\|").replace("\n", " ")[:120]


def samples(rows: list[dict], per_method: int = 4) -> list[str]:
    """A few adaptation answers per method beside the gold answer (the same questions for all)."""
    adaptation = [r for r in rows if r["set"] == "adaptation"]
    ids = sorted({r["id"] for r in adaptation})
    step = max(1, len(ids) // per_method)
    chosen = set(ids[::step][:per_method])
    out = ["| method | question | gold | answer | CEM | F1 |", "| --- | --- | --- | --- | --- | --- |"]
    for r in adaptation:
        if r["id"] in chosen:
            out.append(f"| {r['method']} | {_cell(r['question'])} | {_cell(r['gold'])} | "
                       f"{_cell(r['prediction'])} | {int(r['cem'])} | {r['f1']:.2f} |")
    return out


def markdown(results: dict, answers: list[dict] | None = None, loss: bool = False) -> str:
    rows = ["| method | adaptation CEM | adaptation F1 | retention | correct / questions | kept / known | failed requests |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in {"base": results["base"], **results["methods"]}.items():
        c = r["counts"]
        rows.append(f"| {name} | {r['adaptation_cem']:.3f} | {r['adaptation_f1']:.3f} | {r['retention']:.3f} "
                    f"| {c['questions_correct']} / {c['questions']} | {c['retention_kept']} / {c['retention_known']} "
                    f"| {c['failed_requests']} |")
    kinds = sorted({k for r in results["methods"].values() for k in r["adaptation_cem_by_kind"]})
    by_kind = ["| method | " + " | ".join(kinds) + " |", "|" + " --- |" * (len(kinds) + 1)]
    for name, r in results["methods"].items():
        by_kind.append(f"| {name} | " + " | ".join(f"{r['adaptation_cem_by_kind'].get(k, 0):.3f}" for k in kinds) + " |")
    groups = sorted({g for r in results["methods"].values() for g in r.get("adaptation_by_group", {})})
    by_group = ["| method | " + " | ".join(f"{g} CEM | {g} F1" for g in groups) + " |",
                "|" + " --- |" * (2 * len(groups) + 1)]
    for name, r in {"base": results["base"], **results["methods"]}.items():
        g = r.get("adaptation_by_group", {})
        by_group.append(f"| {name} | " + " | ".join(
            f"{g.get(k, {}).get('cem', 0):.3f} | {g.get(k, {}).get('f1', 0):.3f}" for k in groups) + " |")
    settings = results.get("settings", {})
    training = ["| method | init rank | exported rank | learning rate | steps | batch |",
                "| --- | --- | --- | --- | --- | --- |"]
    for name, t in settings.get("training", {}).items():
        exported = t.get("exported_rank") or {}
        span = "?" if not exported else str(exported["max"]) if exported["min"] == exported["max"] \
            else f"{exported['min']}-{exported['max']}"
        training.append(f"| {name} | {t['rank']} | {span} | {t['learning_rate']:g} | {t['max_steps']} "
                        f"| {t['batch_size']} |")
    intro = (f"Base model: `{settings.get('model', '?')}`. Retention is measured on the "
             f"{results['base']['counts']['retention_known']} of {results['retention_probes']} probes the base "
             "model answered correctly before injection. Adaptation: EVOKE's CEM (the gold answer is contained "
             "in the answer) and token F1 on held-out paraphrased questions.")
    training_note = ("Training settings (LoRA's rank is matched to KORE's trainable-parameter count at the "
                     "init rank; methods that train A beside a subtracted init export rank 2r):")
    return "\n".join([
        "# kore-ray evaluation", "", intro, "",
        *rows, "",
        *(["Adaptation on items that brought their own Q&A (with_qa) and on items that are only a "
           "paragraph (without_qa):", "", *by_group, ""] if len(groups) > 1 else []),
        "Adaptation CEM by knowledge kind:", "", *by_kind, "",
        *(["Some answers (all in eval/predictions.parquet):", "", *samples(answers), ""] if answers else []),
        "![adaptation vs retention](adaptation_retention.png)", "",
        *(["![training loss per method](training_loss.png)", ""] if loss else []),
        *([training_note, "", *training, ""] if len(training) > 2 else []),
        "Settings: `" + json.dumps({k: v for k, v in settings.items() if k != "training"}, sort_keys=True) + "`", "",
    ])


def write_report(results: dict, run_dir: str | Path, rows: list[dict] | None = None) -> dict[str, Path]:
    """The run directory's eval/: results.json, report.md, the plot and (given the answers)
    predictions.parquet; results.json last, since a re-run trusts it as the sign that the
    evaluation finished."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = RunDir(run_dir)
    paths = {"results": out.results, "report": out.report, "plot": out.plot}
    plot(results, paths["plot"])
    if loss_plot(run_dir, list(results["methods"]), out.loss_plot):
        paths["loss_plot"] = out.loss_plot
    if rows is not None:
        paths["predictions"] = out.predictions
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        atomic_write(paths["predictions"], buffer.getvalue())
    atomic_write(paths["report"], markdown(results, rows, "loss_plot" in paths).encode())
    atomic_write(paths["results"], json.dumps(results, indent=2, sort_keys=True).encode())
    return paths
