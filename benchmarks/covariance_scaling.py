"""Covariance stage scaling and overhead on the embedded Gemma 3 270M (CPU), in one run.

On a fixed set of generated English-like retention sentences:
- the distributed stage (Ray Data, `covariance_dataset` + `reduce_partials`) with 1 and then
  2 model actors on the same micro-batches: tokens/s once every actor has returned its first
  task (what a long job sees; scaling_2_vs_1 is their ratio), and end to end from the start
  of execution (actor start-up and model loading included, which a short job pays);
- exactness: both against the core's `collect_covariance` run in this process on the same
  micro-batches with one thread like an actor's (max relative error of the float64 sums;
  token counts must be equal). More threads change the float32 forward's rounding (~1e-7
  relative here), which is a kernel effect, not a distribution one;
- actor-side overhead: inside one actor like the pool's (1 CPU), the time of one covariance
  call over all the sequences (hooks, x x^T per group, packing the partial sums: a task of
  that size) against a plain forward pass of the decoder body (no lm_head) over the same
  micro-batches, the least of two alternating rounds each.

    python benchmarks/covariance_scaling.py [--sequences 96 --batch-size 8 --per-task 16]

Last line: {"scaling_2_vs_1": ..., "overhead_vs_forward": ..., "exact_rel_err": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import ray
import torch

from kore_ray.config import CovarianceConfig
from kore_ray.constraint.covariance import collect_covariance
from kore_ray.constraint.covariance_stage import (
    CovarianceWorker,
    Tokenize,
    batch_table,
    covariance_dataset,
    model_spec,
    reduce_partials,
)
from kore_ray.constraint.retention import (
    pack_upper,
    plan_batches,
    read_retention,
    text_inputs,
)
from kore_ray.models.gemma import embedded_gemma_path
from kore_ray.models.loading import load_model

SUBJECTS = ["The old miller", "A young doctor", "The river", "Our neighbour", "The committee",
            "A tired student", "The city council", "My grandmother", "The small library"]
VERBS = ["remembered", "described", "painted", "carried", "questioned", "repaired", "praised"]
OBJECTS = ["the wooden bridge", "a letter from Paris", "the winter harvest", "an ancient map",
           "the broken clock", "a song about the sea", "the results of the vote"]
TAILS = ["before the storm arrived", "with great care", "during the long summer",
         "although nobody asked", "in the early morning", "for the third time this year"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """n deterministic lines of two or three English-like sentences each."""
    rng = random.Random(seed)

    def one() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."

    return [" ".join(one() for _ in range(rng.choice((2, 3)))) for _ in range(n)]


@ray.remote(num_cpus=1)
class OverheadTimer:
    """A covariance actor as the pool builds it, timing its call against a plain forward."""

    def __init__(self, spec, max_length: int):
        self.worker = CovarianceWorker(spec, "none", max_length, "cpu")

    def forward(self, tables) -> float:
        body = self.worker.model.base_model  # the decoder without lm_head, as the core runs it
        start = time.perf_counter()
        with torch.inference_mode():
            for table in tables:
                for ids in table.column("input_ids").to_pylist():
                    body(**text_inputs(ids, self.worker.pad_id), use_cache=False)
        return time.perf_counter() - start

    def covariance(self, tables) -> float:
        start = time.perf_counter()
        for table in tables:
            self.worker(table)
        return time.perf_counter() - start


@dataclass
class Run:
    sums: dict
    tokens: dict
    samples: int
    calls: list  # (seconds since start, tokens) per actor call, in arrival order
    total_s: float

    def end_to_end(self) -> float:
        """Tokens/s from the start of execution: actor start-up and model loading included."""
        return sum(n for _, n in self.calls) / self.total_s

    def steady(self, actors: int) -> float:
        """Tokens/s once every actor has finished one call: start-up excluded."""
        (t0, _), rest = self.calls[actors - 1], self.calls[actors:]
        return sum(n for _, n in rest) / (self.calls[-1][0] - t0)


def distributed_run(batches, spec, tokenizer, cov) -> Run:
    """One pool size on the batches, timing each call's partial sums as they arrive."""
    first, calls = spec.groups[0].key, []
    start = time.perf_counter()

    def timed(outputs):
        for table in outputs:
            now = time.perf_counter() - start
            for key, n in zip(table.column("group").to_pylist(), table.column("tokens").to_pylist()):
                if key == first:  # every call returns exactly one row per group
                    calls.append((now, n))
            yield table

    ds = covariance_dataset(batches, spec, tokenizer, cov)
    sums, tokens, samples = reduce_partials(
        timed(ds.iter_batches(batch_size=None, batch_format="pyarrow")), spec
    )
    return Run(sums, tokens, samples, calls, time.perf_counter() - start)


def rel_err(sums, reference) -> float:
    return max(float(np.abs(sums[k] - reference[k]).max() / np.abs(reference[k]).max())
               for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=16, help="sequences per Ray task")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    model_dir = str(embedded_gemma_path())
    spec, tokenizer = model_spec(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp, "retention.txt")
        text.write_text("\n".join(sentences(args.sequences)) + "\n")
        items = read_retention(text, tokenizer)
    batches = plan_batches(items, args.batch_size)

    # Single-process reference on the same micro-batches, one thread like each actor.
    model, _ = load_model(model_dir)
    tokenized = Tokenize(tokenizer, args.max_length)(batch_table(batches))
    torch.set_num_threads(1)
    start = time.perf_counter()
    reference = collect_covariance(
        model,
        (text_inputs(ids, tokenizer.pad_token_id) for ids in tokenized.column("input_ids").to_pylist()),
        list(spec.groups),
    )
    reference_s = time.perf_counter() - start
    ref_packed = {k: pack_upper(v) for k, v in reference.sums.items()}
    del model
    n_tokens = reference.tokens[spec.groups[0].key]

    runs = {}
    for actors in (1, 2):
        cov = CovarianceConfig(batch_size=args.batch_size, sequences_per_task=args.per_task,
                               max_length=args.max_length, num_actors=actors, use_gpu=False)
        run = distributed_run(batches, spec, tokenizer, cov)
        if run.tokens != reference.tokens or run.samples != reference.samples:
            raise SystemExit(f"{actors} actor(s): counts differ from the single process: "
                             f"{run.samples} vs {reference.samples} sequences")
        if len(run.calls) <= actors:
            raise SystemExit("too few tasks to time past start-up: lower --per-task")
        runs[actors] = run

    timer = OverheadTimer.remote(spec, args.max_length)
    tables = [tokenized]  # one call over every sequence: a task's fixed costs amortised
    rounds = [ray.get([timer.forward.remote(tables), timer.covariance.remote(tables)])
              for _ in range(2)]
    forward_s = min(r[0] for r in rounds)
    covariance_s = min(r[1] for r in rounds)

    scaling = runs[2].steady(2) / runs[1].steady(1)
    overhead = covariance_s / forward_s
    errors = {actors: rel_err(run.sums, ref_packed) for actors, run in runs.items()}
    rows = [
        ("data", f"{len(items)} seqs", (f"{n_tokens} tokens, micro-batch {args.batch_size}, "
                                        f"{args.per_task} seqs/task, Gemma 3 270M fp32 on CPU")),
        ("single process (no Ray)", f"{n_tokens / reference_s:.0f} tok/s", "1 thread, the reference sums"),
    ]
    for actors, run in runs.items():
        rows += [
            (f"{actors} actor(s), after start-up", f"{run.steady(actors):.0f} tok/s",
             f"{len(run.calls)} tasks; rel err vs single process {errors[actors]:.1e}"),
            (f"{actors} actor(s), end to end", f"{run.end_to_end():.0f} tok/s",
             (f"{run.total_s:.1f} s, first partial sums after {run.calls[0][0]:.1f} s "
             "(actor start-up + 1 task)")),
        ]
    rows += [
        ("2 vs 1 actor sums", f"{rel_err(runs[2].sums, runs[1].sums):.1e}",
         "relative error between the two pool sizes"),
        ("scaling 2 vs 1 actor", f"{scaling:.2f}x",
         (f"after start-up; this machine has {os.cpu_count()} cores, shared with other work: "
         "2 actors cannot scale much here")),
        ("plain forward in actor", f"{forward_s:.2f} s",
         f"all {len(items)} seqs, decoder body, no lm_head, 1 CPU"),
        ("covariance call in actor", f"{covariance_s:.2f} s",
         (f"same batches: overhead {100 * (overhead - 1):.0f}% (x x^T per group costs "
         "d^2 per token)")),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>13}  {note}")
    print(json.dumps({"scaling_2_vs_1": round(scaling, 3), "overhead_vs_forward": round(overhead, 3),
                      "exact_rel_err": max(errors.values())}))


if __name__ == "__main__":
    main()
