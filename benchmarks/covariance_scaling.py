"""Covariance stage scaling and overhead on the embedded Gemma 3 270M (CPU), in one run.

On a fixed set of generated English-like retention sentences:
- the distributed stage (`collect_distributed`: actors, partials, reducers) with 1 and then
  2 model actors on the same micro-batches: tokens/s once every actor has loaded its model
  (what a long job sees; scaling_2_vs_1 is their ratio), and end to end (actor start-up,
  model loading and the reducers included, which a short job pays);
- exactness: both against the core's `collect_covariance` run in this process on the same
  micro-batches with one thread like an actor's (max relative error of the float64 sums;
  token counts must be equal). More threads change the float32 forward's rounding (~1e-7
  relative here), which is a kernel effect, not a distribution one;
- actor-side overhead: inside one actor like the stage's (1 CPU), the time of adding every
  sequence as one task and saving the sums (hooks, x x^T per group, one partial written)
  against a plain forward pass of the decoder body (no lm_head) over the same micro-batches,
  the least of two alternating rounds each.

    python benchmarks/covariance_scaling.py [--sequences 96 --batch-size 8 --per-task 16]

Last line: {"scaling_2_vs_1": ..., "overhead_vs_forward": ..., "exact_rel_err": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray
import torch

from kore_ray.config import CovarianceConfig
from kore_ray.constraint.covariance import collect_covariance
from kore_ray.constraint.covariance_stage import collect_distributed, remote_model_spec
from kore_ray.constraint.partials import CovarianceActor, task_table
from kore_ray.constraint.retention import plan_batches, read_retention, text_inputs, tokenize_texts
from kore_ray.constraint.store import load_store
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
    """A covariance actor as the stage builds it, timing a task against a plain forward."""

    def __init__(self, spec, max_length: int, partials_dir: str):
        keys = [g.key for g in spec.groups]
        self.actor = CovarianceActor(spec, keys, "none", max_length, "cpu", partials_dir)

    def forward(self, table) -> float:
        body = self.actor.model.base_model  # the decoder without lm_head, as the core runs it
        start = time.perf_counter()
        with torch.inference_mode():
            for inputs in self.actor._batches(table):
                body(**inputs, use_cache=False)
        return time.perf_counter() - start

    def covariance(self, table) -> float:
        start = time.perf_counter()
        self.actor.add(0, table)
        self.actor.flush()
        return time.perf_counter() - start


@dataclass
class Run:
    sums: dict
    tokens: dict
    samples: int
    tasks: int
    ready_s: float  # actors up and models loaded
    done_s: float  # every task saved
    total_s: float  # the store written

    def end_to_end(self) -> float:
        """Tokens/s from the start: actor start-up, model loading and the reducers included."""
        return self.tokens_total / self.total_s

    def steady(self) -> float:
        """Tokens/s once every actor is up: start-up and the reducers excluded."""
        return self.tokens_total / (self.done_s - self.ready_s)

    @property
    def tokens_total(self) -> int:
        return next(iter(self.tokens.values()))


def distributed_run(batches, spec, cov, root: Path) -> Run:
    """One actor count on the batches, into a store under `root`."""
    start = time.perf_counter()
    stats = collect_distributed(batches, spec, cov, root / "covariance", root / "partials",
                                progress=False)
    total = time.perf_counter() - start
    store = load_store(root / "covariance")
    p = stats["partials"][0]
    return Run({k: store.sums[k] for k in store.sums}, store.tokens, store.samples,
               stats["tasks"], p["ready_s"], p["done_s"], total)


def rel_err(sums, reference) -> float:
    return max(float((sums[k] - reference[k]).abs().max() / reference[k].abs().max())
               for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=16, help="sequences per Ray task")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    model_dir = str(embedded_gemma_path())
    spec = remote_model_spec(model_dir)
    model, tokenizer = load_model(model_dir)
    work = Path(tempfile.mkdtemp(prefix="covariance-scaling-"))
    text = work / "retention.txt"
    text.write_text("\n".join(sentences(args.sequences)) + "\n")
    items = read_retention(text, tokenizer)
    batches = plan_batches(items, args.batch_size)

    # Single-process reference on the same micro-batches, one thread like each actor.
    torch.set_num_threads(1)
    start = time.perf_counter()
    reference = collect_covariance(
        model,
        (text_inputs(tokenize_texts(tokenizer, [i.text for i in b], args.max_length),
                     tokenizer.pad_token_id) for b in batches),
        list(spec.groups),
    )
    reference_s = time.perf_counter() - start
    del model
    n_tokens = reference.tokens[spec.groups[0].key]

    runs = {}
    for actors in (1, 2):
        cov = CovarianceConfig(batch_size=args.batch_size, sequences_per_task=args.per_task,
                               max_length=args.max_length, num_actors=actors, use_gpu=False)
        run = distributed_run(batches, spec, cov, work / f"actors{actors}")
        if run.tokens != reference.tokens or run.samples != reference.samples:
            raise SystemExit(f"{actors} actor(s): counts differ from the single process: "
                             f"{run.samples} vs {reference.samples} sequences")
        runs[actors] = run

    timer = OverheadTimer.remote(spec, args.max_length, str(work / "timer"))
    table = ray.put(task_table(batches))  # one task over every sequence: fixed costs amortised
    rounds = [ray.get([timer.forward.remote(table), timer.covariance.remote(table)])
              for _ in range(2)]
    forward_s = min(r[0] for r in rounds)
    covariance_s = min(r[1] for r in rounds)

    scaling = runs[2].steady() / runs[1].steady()
    overhead = covariance_s / forward_s
    errors = {actors: rel_err(run.sums, reference.sums) for actors, run in runs.items()}
    rows = [
        ("data", f"{len(items)} seqs", (f"{n_tokens} tokens, micro-batch {args.batch_size}, "
                                        f"{args.per_task} seqs/task, Gemma 3 270M fp32 on CPU")),
        ("single process (no Ray)", f"{n_tokens / reference_s:.0f} tok/s", "1 thread, the reference sums"),
    ]
    for actors, run in runs.items():
        rows += [
            (f"{actors} actor(s), after start-up", f"{run.steady():.0f} tok/s",
             f"{run.tasks} tasks; rel err vs single process {errors[actors]:.1e}"),
            (f"{actors} actor(s), end to end", f"{run.end_to_end():.0f} tok/s",
             (f"{run.total_s:.1f} s: actors up after {run.ready_s:.1f} s, "
              f"reduced in {run.total_s - run.done_s:.1f} s")),
        ]
    rows += [
        ("2 vs 1 actor sums", f"{rel_err(runs[2].sums, runs[1].sums):.1e}",
         "relative error between the two pool sizes"),
        ("scaling 2 vs 1 actor", f"{scaling:.2f}x",
         (f"after start-up; this machine has {os.cpu_count()} cores, shared with other work: "
         "2 actors cannot scale much here")),
        ("plain forward in actor", f"{forward_s:.2f} s",
         f"all {len(items)} seqs, decoder body, no lm_head, 1 CPU"),
        ("covariance task in actor", f"{covariance_s:.2f} s",
         (f"same batches, sums saved: overhead {100 * (overhead - 1):.0f}% (x x^T per group "
          "costs d^2 per token)")),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>13}  {note}")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"scaling_2_vs_1": round(scaling, 3), "overhead_vs_forward": round(overhead, 3),
                      "exact_rel_err": max(errors.values())}))


if __name__ == "__main__":
    main()
