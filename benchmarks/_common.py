"""Shared helpers for the KORE-CONSTRAINT benchmarks: deterministic text, batches, timing.

The text is generated in code (a small seeded grammar of English-like sentences), so every run
and every machine sees the same tokens without downloading anything.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_SUBJECTS = ["the old lighthouse keeper", "a young engineer", "the city council", "my neighbour",
             "the river", "an ancient library", "the orchestra", "a small fishing village",
             "the research team", "the mountain railway", "her grandmother", "the museum",
             "a travelling merchant", "the northern forest", "the school choir", "our teacher"]
_VERBS = ["built", "described", "visited", "painted", "repaired", "remembered", "studied",
          "crossed", "discovered", "celebrated", "measured", "explained", "protected", "sold"]
_OBJECTS = ["a wooden bridge", "the harbour walls", "a long letter", "the winter festival",
            "seven silver coins", "the history of the valley", "a map of the coast",
            "the first steam engine", "a garden of roses", "the broken clock", "an old song",
            "the price of bread", "a new kind of glass", "the stars above the hills"]
_TAILS = ["in the spring of {y}", "after a long and difficult winter", "with great care",
          "before the storm arrived", "for the people of {p}", "near the market in {p}",
          "during the war of {y}", "because nobody else would", "in less than {n} days",
          "while the children were asleep", "and wrote about it in a diary"]
_PLACES = ["Lisbon", "Kyoto", "Oslo", "Nairobi", "Lima", "Krakow", "Dublin", "Hanoi", "Quebec"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` deterministic English-like sentences."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tail = rng.choice(_TAILS).format(
            y=rng.randint(1700, 2020), p=rng.choice(_PLACES), n=rng.randint(2, 90)
        )
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {tail}."
        out.append(s[0].upper() + s[1:])
    return out


def token_batches(tokenizer, n_batches: int, batch_size: int, min_len: int, max_len: int,
                  seed: int = 0) -> list[dict]:
    """Right-padded batches of sequences of min_len..max_len tokens (BOS included).

    Each sequence is consecutive generated sentences, cut at its drawn length; lengths vary
    within a batch, so batches carry padding as real retention data does.
    """
    import torch

    rng = random.Random(seed)
    stream = iter(sentences(100_000, seed))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for _ in range(n_batches):
        rows = []
        for _ in range(batch_size):
            target = rng.randint(min_len, max_len)
            ids = tokenizer("")["input_ids"]  # BOS (if the tokenizer adds one)
            while len(ids) < target:
                ids += tokenizer(" " + next(stream), add_special_tokens=False)["input_ids"]
            rows.append(ids[:target])
        width = max(len(r) for r in rows)
        batches.append({
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        })
    return batches


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(cases: dict, repeats: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run every case `warmup` times, then `repeats` rounds, alternating the order each round.

    Returns case -> list of wall times. Rounds interleave the cases so that background load on
    a shared machine hits them alike; compare medians (or per-round ratios). If `cpu` is given
    it receives case -> this process's CPU times (time.process_time) for the same runs: with
    one torch thread that is the work done, without the time spent waiting for a core.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0 = time.process_time()
            times[name].append(timed(cases[name]))
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def median(values) -> float:
    return statistics.median(values)


def table(rows: list[list], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
