"""What each augmentation generator buys: the same text-only items injected with KORE after each
generator setting, side by side in one run.

Settings: templates only ("tell me about X" -> the paragraph), extractive, self, extractive +
self ("extractive-self"). Each gets its own augment + init + train (the demo's KORE settings) on one shared
covariance store; the self generator runs once (the settings share its cache); then the base
and the four adapters are served together and asked the same held-out questions and retention
probes. Data: `data/heldout/` (30 paragraph-only items, 60 questions, written apart from the
demo), retention from the demo's probes.

    python benchmarks/augment_quality.py [--config configs/demo.yaml] [--run-dir runs/augment_quality]
        [--settings templates,extractive,self,extractive-self]

About 35 minutes on 2 CPU cores (the templates setting's 60 steps of paragraphs are 9 of them;
27 on the slower AVX2 machine, where two settings take about 30); resumable (finished stages
are skipped). Last line:
{"f1_by_generator": {...}, "cem_by_generator": {...}, "retention_by_generator": {...},
 "self_kept_fraction": ...}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT
from frontier import _cfg, _link, ask_all

from kore_ray.run_dir import RunDir

# Setting names are served adapter names: letters, digits, "-" only.
SETTINGS = {"templates": [], "extractive": ["extractive"], "self": ["self"],
            "extractive-self": ["self", "extractive"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "augment_quality"))
    ap.add_argument("--data", default=str(ROOT / "data" / "heldout"))
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma-separated subset of: " + ", ".join(SETTINGS))
    args = ap.parse_args()
    settings = {n: SETTINGS[n] for n in args.settings.split(",")}  # a KeyError names a typo

    import ray

    from kore_ray.augment import run_augment
    from kore_ray.config import load_config
    from kore_ray.constraint.covariance_stage import run_covariance
    from kore_ray.constraint.init_stage import run_init
    from kore_ray.data.io import read_records
    from kore_ray.data.schemas import EvalQuestion, KnowledgeItem, RetentionProbe
    from kore_ray.evaluate.score import score_all
    from kore_ray.train.train_stage import run_train

    root = Path(args.run_dir)
    data = Path(args.data)
    cfg = load_config(args.config, [f"run_dir={root}", f"data.knowledge={data / 'knowledge.jsonl'}",
                                    f"data.eval_questions={data / 'eval_questions.jsonl'}",
                                    "augment.self_items=all"])
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    run_covariance(cfg)
    summaries = {}
    for name, generators in settings.items():
        print(f"\naugment_quality: {name}", flush=True)
        sub = root / "settings" / name
        _link(RunDir(root).covariance, RunDir(sub).covariance)
        (root / "self-cache").mkdir(parents=True, exist_ok=True)
        _link(root / "self-cache", RunDir(sub).augment_cache)  # one self generation for all
        scfg = _cfg(cfg.for_method("kore"), run_dir=str(sub), **{"augment.generators": generators})
        summaries[name] = run_augment(scfg)
        run_init(scfg, "kore")
        run_train(scfg, "kore")
        served = root / "adapters" / name  # a copy: the server refuses links out of its folder
        if not (served / "adapter_config.json").is_file():
            shutil.copytree(RunDir(sub).adapter("kore"), served, dirs_exist_ok=True)
    base = cfg.serve.served_model_name or cfg.model.name_or_path
    predictions = ask_all(cfg, root, [base, *settings])
    scores = score_all(predictions, base, {n: n for n in settings},
                       read_records(cfg.data.eval_questions, EvalQuestion),
                       read_records(cfg.data.retention_eval, RetentionProbe),
                       read_records(cfg.data.knowledge, KnowledgeItem))
    print("\n| generators | conversations | adaptation CEM | adaptation F1 | retention |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("base", *settings):
        s = scores["base"] if name == "base" else scores["methods"][name]
        convs = summaries[name]["conversations"] if name in summaries else "-"
        print(f"| {name} | {convs} | {s['adaptation_cem']:.3f} | {s['adaptation_f1']:.3f} "
              f"| {s['retention']:.3f} |")
    own = next((summaries[n]["self"] for n in ("self", "extractive-self") if n in summaries),
               {"kept": 0, "candidates_parsed": 0})
    print(f"self: {own['kept']} of {own['candidates_parsed']} parsed candidates kept; "
          f"rejected by reason: {[summaries[n]['rejected_by_reason'] for n in summaries]}")
    print(json.dumps({
        "f1_by_generator": {n: round(scores["methods"][n]["adaptation_f1"], 4) for n in settings},
        "cem_by_generator": {n: round(scores["methods"][n]["adaptation_cem"], 4) for n in settings},
        "retention_by_generator": {n: round(scores["methods"][n]["retention"], 4) for n in settings},
        "self_kept_fraction": round(own["kept"] / max(1, own["candidates_parsed"]), 4),
    }))


if __name__ == "__main__":
    main()
