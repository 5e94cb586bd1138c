"""Continual injection on the embedded Gemma 3 270M: 3 batches, KORE vs its ablation vs
sequential LoRA, side by side in one run (`kore continual configs/continual.yaml`).

The demo's 30 items that bring their own Q&A arrive in 3 batches of 10 (data/continual/);
each track trains v1, v2, v3, each version on the model the one before produced (40 steps
of 16 conversations each). Evaluation after every version: CEM on every batch so far, and
retention of the base's known facts (data/demo/retention_eval.jsonl).

    python benchmarks/continual.py [--set continual.tracks=[kore,lora] ...]

Takes about 45 minutes on a 2-core CPU (9 trainings, 6 covariance collections, 3 rounds of
serving). Last line: {"kore_batch1_drop", "kore_ablation_batch1_drop", "lora_batch1_drop",
"kore_retention_final", "lora_retention_final", "kore_adaptation_final_mean", ...}, where
batch1_drop is batch 1's CEM right after v1 minus after the last version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kore_ray.config import load_config  # noqa: E402
from kore_ray.continual.continual_stage import run_continual  # noqa: E402


def summary(matrix: dict, tracks: list[str]) -> dict:
    rounds = sorted(matrix["rounds"], key=int)
    last = rounds[-1]
    out = {}
    for track, key in (("kore", "kore"), ("kore_no_history", "kore_ablation"), ("lora", "lora")):
        if track not in tracks:
            continue
        first = matrix["rounds"]["1"]["scores"][f"{track}-v1"]["batches"]["1"]["cem"]
        final = matrix["rounds"][last]["scores"][f"{track}-v{last}"]
        out[f"{key}_batch1_drop"] = round(first - final["batches"]["1"]["cem"], 4)
        out[f"{key}_retention_final"] = round(final["retention"], 4)
        cems = [v["cem"] for v in final["batches"].values()]
        out[f"{key}_adaptation_final_mean"] = round(sum(cems) / len(cems), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "continual.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    start = time.perf_counter()
    matrix = run_continual(cfg)
    result = summary(matrix, cfg.continual.tracks)
    result["minutes"] = round((time.perf_counter() - start) / 60, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
