"""How well the grounding check separates good pairs from bad ones, on pairs labelled by hand.

`data/grounding/labelled_pairs.jsonl`: 232 question/answer pairs over 40 paragraphs, labelled
good or bad by meaning (invented, false relation, swapped roles, non-answer, wrong value, ...),
written apart from the check. Two checks side by side:

- lexical: `grounding.check_pair` alone (what every generator's pairs pass);
- with round trip: what the self generator applies, check_pair and then the embedded base
  model, served by our Serve + vLLM app and asked the question with the paragraph as context,
  must give the pair's key span back.

Precision: of the pairs kept, the fraction labelled good. Recall: of the good pairs, the
fraction kept. Rejections by labelled reason show what each layer catches.

    python benchmarks/grounding.py            # about 3 minutes on 2 CPU cores (serving start-up)
    python benchmarks/grounding.py --no-model # the lexical check only, in a second

Last line: {"lexical_precision", "lexical_recall", "round_trip_precision", "round_trip_recall"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT

LABELLED = ROOT / "data" / "grounding" / "labelled_pairs.jsonl"


def scores(rows: list[dict], kept: list[bool]) -> tuple[float, float]:
    good = [r["label"] == "good" for r in rows]
    kept_good = sum(k and g for k, g in zip(kept, good))
    return kept_good / max(1, sum(kept)), kept_good / max(1, sum(good))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--no-model", action="store_true", help="the lexical check only")
    args = ap.parse_args()

    from kore_ray.augment.grounding import check_pair

    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    verdicts = [check_pair(r["question"], r["answer"], r["knowledge"]) for r in rows]
    lexical = [bool(v) for v in verdicts]
    round_trip = lexical
    if not args.no_model:
        import ray

        from kore_ray.augment.self_qa import answer_prompt, round_trip_agrees
        from kore_ray.config import load_config
        from kore_ray.evaluate.ask import ask
        from kore_ray.serve.serve_stage import serving

        cfg = load_config(args.config, ["run_dir=/tmp/kore-grounding-bench",
                                        "serve.adapters=/tmp/kore-grounding-bench/none"])
        ray.init(ignore_reinit_error=True, log_to_driver=False)
        model = cfg.serve.served_model_name or cfg.model.name_or_path
        greedy = json.dumps({"max_tokens": 16, "temperature": 0.0, "stop": ["\n"]})
        with serving(cfg) as url:
            replies = ask([{"id": r["id"], "model": model, "kind": "completion", "params": greedy,
                            "prompt": answer_prompt(r["knowledge"], r["question"])}
                           for r, ok in zip(rows, lexical) if ok], url, desc="round trip")
        round_trip = [ok and round_trip_agrees(replies[(model, r["id"])]["prediction"], v.key_span)
                      for r, v, ok in zip(rows, verdicts, lexical)]
    lp, lr = scores(rows, lexical)
    rp, rr = scores(rows, round_trip)
    print(f"{len(rows)} pairs ({sum(r['label'] == 'good' for r in rows)} good)")
    print("| check | precision | recall | kept |")
    print("| --- | --- | --- | --- |")
    print(f"| lexical | {lp:.3f} | {lr:.3f} | {sum(lexical)} |")
    if not args.no_model:
        print(f"| lexical + round trip | {rp:.3f} | {rr:.3f} | {sum(round_trip)} |")
    caught = Counter((r["reason"], "lexical" if not lex else "round trip")
                     for r, lex, rt in zip(rows, lexical, round_trip) if r["label"] == "bad" and not rt)
    let = Counter(r["reason"] for r, rt in zip(rows, round_trip) if r["label"] == "bad" and rt)
    print("bad pairs rejected, by labelled reason and layer:", dict(sorted(caught.items())))
    print("bad pairs let through, by labelled reason:", dict(sorted(let.items())))
    print(json.dumps({"lexical_precision": round(lp, 4), "lexical_recall": round(lr, 4),
                      "round_trip_precision": None if args.no_model else round(rp, 4),
                      "round_trip_recall": None if args.no_model else round(rr, 4)}))


if __name__ == "__main__":
    main()
