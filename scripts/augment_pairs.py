"""Every pair the generators keep or reject on knowledge files, to compare generator changes pair
by pair without training anything.

Replays the augment stage's `fact_tree` (extractive pairs, and the self generator's candidates
from a run's cache where one is given, checked again by today's code) on every item and writes
one JSON object per item: its kept conversations and its rejections. With --against, prints
what changed against an earlier dump.

    python scripts/augment_pairs.py out.json \
        [--set data/heldout/knowledge.jsonl=runs/X/augmented/cache ...]
    python scripts/augment_pairs.py new.json --against old.json

Without --set: every knowledge file under data/, extractive pairs only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kore_ray.augment import self_qa
from kore_ray.augment.augment_stage import fact_tree
from kore_ray.data.io import read_records
from kore_ray.data.schemas import KnowledgeItem

ROOT = Path(__file__).resolve().parent.parent


def self_outcomes(cache: Path | None) -> dict[str, self_qa.SelfOutcome]:
    if cache is None:
        return {}
    entries = (json.loads(f.read_text()) for f in cache.rglob("*.json"))
    return {e["knowledge_id"]: self_qa.SelfOutcome.from_json(e["self"])
            for e in entries if "self" in e}


def dump(files: dict[Path, Path | None]) -> dict[str, dict]:
    out = {}
    for path, cache in files.items():
        outcomes = self_outcomes(cache)
        for item in read_records(path, KnowledgeItem):
            convs, failures, _ = fact_tree(item, ["self", "extractive"], outcomes.get(item.id), [])
            out[f"{path}:{item.id}"] = {
                "kept": [[m.content for m in c.messages] for c in convs],
                "rejected": sorted(f.error for f in failures)}
    return out


def _rows(dump: dict, key: str) -> set[tuple[str, str]]:
    return {(item, json.dumps(x)) for item, v in dump.items() for x in v[key]}


def changes(old: dict, new: dict) -> None:
    for key in ("kept", "rejected"):
        gone, added = _rows(old, key) - _rows(new, key), _rows(new, key) - _rows(old, key)
        print(f"{key}: {sum(len(v[key]) for v in old.values())} -> "
              f"{sum(len(v[key]) for v in new.values())} ({len(gone)} removed, {len(added)} added)")
        for sign, rows in (("-", gone), ("+", added)):
            for item, text in sorted(rows):
                print(f"  {sign} {item}: {text}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON file to write (or, with --against, to read)")
    ap.add_argument("--set", action="append", default=[], metavar="KNOWLEDGE[=CACHE]",
                    help="a knowledge file, and the augment cache holding its self candidates")
    ap.add_argument("--against", help="an earlier dump: print what changed")
    args = ap.parse_args()
    if args.against:
        changes(json.loads(Path(args.against).read_text()), json.loads(Path(args.out).read_text()))
        return
    pairs = [s.partition("=") for s in args.set]
    files = {Path(k): Path(c) if c else None for k, _, c in pairs} or \
        dict.fromkeys(sorted((ROOT / "data").rglob("*knowledge.jsonl")))
    result = dump(files)
    Path(args.out).write_text(json.dumps(result, indent=0))
    print(f"{len(result)} items, {sum(len(v['kept']) for v in result.values())} kept, "
          f"{sum(len(v['rejected']) for v in result.values())} rejected -> {args.out}")


if __name__ == "__main__":
    main()
