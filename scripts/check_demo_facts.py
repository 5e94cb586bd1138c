#!/usr/bin/env python
"""Check which retention probes the embedded base model (Gemma 3 270M) really knows.

Each probe's `prompt` is continued greedily for a few tokens; a probe is a hit when the
continuation covers its `answer` by the evaluation's own rule (`cover_exact_match`: the
normalised answer occurs as whole words, so "Au" does not match "Australia").

    python scripts/check_demo_facts.py                     # data/demo/retention_eval.jsonl
    python scripts/check_demo_facts.py FILE [FILE ...]     # any RetentionProbe files
    python scripts/check_demo_facts.py CANDIDATES --write-hits KNOWN.jsonl --write-misses MISSES.jsonl

Prints every miss (and with --show-hits every hit, to audit them), then the hit rate. Exits 1 when any probe misses and --allow-misses is not
given, so it doubles as a check that a curated eval set is still fully known.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "data" / "demo" / "retention_eval.jsonl"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, default=[DEFAULT_FILE])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=25, help="prompts per progress line")
    parser.add_argument("--write-hits", type=Path, help="write the probes answered correctly here")
    parser.add_argument("--write-misses", type=Path, help="write the probes missed here")
    parser.add_argument("--allow-misses", action="store_true", help="exit 0 even if some miss")
    parser.add_argument("--show-hits", action="store_true", help="print the hits' continuations too")
    args = parser.parse_args(argv)

    from kore_ray.data.io import read_records
    from kore_ray.data.schemas import RetentionProbe
    from kore_ray.evaluate.metrics import cover_exact_match
    from kore_ray.models import load_model
    from kore_ray.models.generate import greedy_continuations

    probes = [p for f in args.files for p in read_records(f, RetentionProbe)]
    if any(p.prompt is None for p in probes):
        print("only completion-style probes (with a prompt) can be checked", file=sys.stderr)
        return 2
    model, tok = load_model(args.model)

    outs: list[str] = []
    start = time.time()
    for i in range(0, len(probes), args.chunk):
        chunk = probes[i : i + args.chunk]
        outs += greedy_continuations(model, tok, [p.prompt for p in chunk], args.max_new_tokens)
        print(f"  {len(outs)}/{len(probes)} prompts, {time.time() - start:.0f}s", file=sys.stderr)

    hits, misses = [], []
    for probe, out in zip(probes, outs):
        (hits if cover_exact_match(out, probe.answer) else misses).append((probe, out))
    if args.show_hits:
        for probe, out in hits:
            print(f"HIT  {probe.id}: {probe.prompt!r} -> {out!r} (want {probe.answer!r})")
    for probe, out in misses:
        print(f"MISS {probe.id}: {probe.prompt!r} -> {out!r} (want {probe.answer!r})")
    for path, rows in ((args.write_hits, hits), (args.write_misses, misses)):
        if path is not None:
            with path.open("w", encoding="utf-8") as f:
                for probe, out in rows:
                    f.write(json.dumps(probe.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
    rate = len(hits) / len(probes) if probes else 0.0
    print(f"hit rate: {len(hits)}/{len(probes)} = {rate:.1%} "
          f"({args.model}, greedy, {args.max_new_tokens} new tokens)")
    return 0 if (not misses or args.allow_misses) else 1


if __name__ == "__main__":
    sys.exit(main())
