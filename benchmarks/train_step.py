"""Training step time: KORE vs LoRA at equal trainable parameters; packed vs padded rows;
1 vs 2 Ray Train workers.

Part 1, in this process (no Ray, one thread): the embedded Gemma 3 270M with KORE at rank r
(B trained, A frozen) and with LoRA at `matched_lora_rank` (A and B trained, same
trainable-parameter count), on every decoder linear, on the same batch of Q&A
conversations, in alternating steps (KORE, LoRA, LoRA, KORE, ...). KORE is built by the real
`null_space_init` and `apply_kore` (residualised base, A0/B0, B trainable, and the merged-weight
training path of constraint/merged.py that a frozen A allows), but from a random orthonormal
basis instead of the covariance's eigenvectors: a step costs the same for any values of the
factors, and the eigendecompositions belong to `kore init`, not to a step. A third model,
"kore-peft", is the same KORE through PEFT's own LoRA forward (merged path off), to show what
the merged path buys; the headline ratio is kore / lora.

Part 1b, same process and thread: the KORE model on rows of mixed lengths, as augmentation
writes them (short Q&A, and one "tell me about" paragraph in eight), collated by the training
`Collate` packed (one sequence per micro-batch, no padding) and padded, in alternating steps.

Part 2, Ray Train: `run_train` on the same model and data (the matched LoRA: it all-reduces
as many gradients as KORE), 1 worker against 2 workers at the same global batch, each worker
one CPU thread (a core per worker, as a GPU per worker on a cluster: the ideal ratio is 0.5).
Step times come from each run's metrics.jsonl (rank 0), without the first step (warm-up);
rank 0's CPU seconds leave out any wait for the other rank (equal shares keep it short).

Which clock. Every process here runs one compute thread, so its CPU seconds per step are the
step time it would show on a machine of its own. The figures use them: on a shared machine
(this project's has 2 cores and often a load of 8) wall-clock steps mostly measure other
people's jobs, and adjacent steps differ by 3x. Wall-clock medians and the load average are
printed beside them; on an idle machine the two agree.

    python benchmarks/train_step.py [--rank 64] [--steps 5] [--batch 8]

The last line is {"kore_vs_lora_step": ..., "packed_vs_padded_step": ..., "two_vs_one_worker": ...}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kore_ray.config import load_config
from kore_ray.constraint import (
    KoreInit,
    apply_kore,
    build_method,
    matched_lora_rank,
    model_fingerprint,
    null_space_init,
)
from kore_ray.constraint.adapters import trainable_parameter_count
from kore_ray.constraint.init_stage import run_init
from kore_ray.constraint.merged import use_merged_forward
from kore_ray.data.io import write_parquet
from kore_ray.data.schemas import Conversation
from kore_ray.data.tokenize import encode_conversation, pad_batch
from kore_ray.models import load_model
from kore_ray.models.gemma import embedded_gemma_path
from kore_ray.models.targets import find_target_groups
from kore_ray.run_dir import METRICS, RunDir
from kore_ray.train.data import Collate
from kore_ray.train.steps import build_optimizer, build_scheduler, train_step


def log(message: str) -> None:
    print(f"[train_step] {message}", file=sys.stderr, flush=True)


def conversations(n: int) -> list[Conversation]:
    return [
        Conversation(id=f"c{i}", task="qa", messages=[
            {"role": "user", "content": f"Which city hosts the fictional Vorlan Institute {i}?"},
            {"role": "assistant", "content": f"The Vorlan Institute {i} is in Quessant, on the "
                                             f"northern coast, founded in {1900 + 7 * i}."},
        ])
        for i in range(n)
    ]


def mixed_conversations(n: int) -> list[Conversation]:
    """Short Q&A rows and, one in eight, a "tell me about" row answered with a paragraph."""
    paragraph = " ".join(f"In {1900 + 7 * k} the Vorlan Institute opened wing {k} in Quessant, "
                         f"with {40 + k} rooms." for k in range(6))
    tell = [{"role": "user", "content": "Tell me about the Vorlan Institute."},
            {"role": "assistant", "content": paragraph}]
    return [Conversation(id=c.id, task="qa", messages=tell) if i % 8 == 0 else c
            for i, c in enumerate(conversations(n))]


def step_times(models: dict, batches: dict[str, list[dict]],
               steps: int) -> dict[str, dict[str, list]]:
    """Wall and CPU seconds of each model's steps, in alternating order; the first step of
    each model (warm-up) is dropped. `batches`: each model's micro-batches, by name."""
    optim = {}
    for name, model in models.items():
        model.train()
        opt = build_optimizer(model, 1e-4)
        optim[name] = (opt, build_scheduler(opt, steps + 1, 0, "constant"))
    times = {name: {"wall": [], "cpu": []} for name in models}
    for i in range(steps + 1):
        for name in (list(models) if i % 2 == 0 else list(reversed(models))):
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(models[name], *optim[name], batches[name])
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {k: v[1:] for k, v in t.items()} for name, t in times.items()}


def part1(model_dir: Path, rank: int, batch: int, steps: int) -> tuple[float, list[str]]:
    torch.set_num_threads(1)  # as each Ray worker in part 2; idle OpenMP threads spin on a
    # shared machine and would turn other people's load into noise
    kore_model, tokenizer = load_model(str(model_dir))
    peft_model, _ = load_model(str(model_dir))
    lora_model, _ = load_model(str(model_dir))
    groups = find_target_groups(kore_model)
    lora_rank = matched_lora_rank(kore_model, groups, rank)
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for g in groups:
        d_in = kore_model.get_submodule(g.modules[0]).weight.shape[1]
        basis = torch.linalg.qr(torch.randn(d_in, rank, dtype=torch.float64, generator=gen))[0]
        for name in g.modules:
            factors[name] = null_space_init(kore_model.get_submodule(name).weight, basis)
    init = KoreInit(factors=factors, leaks={}, model_fingerprint=model_fingerprint(kore_model))
    models = {
        "kore": apply_kore(kore_model, init),
        "kore-peft": apply_kore(peft_model, init),
        "lora": build_method(lora_model, "lora", groups, rank=lora_rank),
    }
    use_merged_forward(models["kore-peft"], False)
    log(f"part 1: KORE r={rank} (twice) and LoRA r={lora_rank} built; timing {steps} steps each")
    rows = [encode_conversation(tokenizer, c, 256) for c in conversations(batch)]
    batches = [pad_batch(rows, tokenizer.pad_token_id)]
    times = step_times(models, dict.fromkeys(models, batches), steps)
    tokens = int(batches[0]["attention_mask"].sum())
    header = f"{'method':<10}{'rank':>6}{'trainable':>12}{'median CPU s':>14}{'median wall s':>15}"
    lines = [header + f"{'tokens/s':>10}"]
    medians = {}
    for name, r in (("kore", rank), ("kore-peft", rank), ("lora", lora_rank)):
        medians[name] = {k: statistics.median(v) for k, v in times[name].items()}
        cpu, wall = medians[name]["cpu"], medians[name]["wall"]
        lines.append(f"{name:<10}{r:>6}{trainable_parameter_count(models[name]):>12,}"
                     f"{cpu:>14.3f}{wall:>15.3f}{tokens / cpu:>10.0f}")
    ratio = {k: medians["kore"][k] / medians["lora"][k] for k in ("cpu", "wall")}
    lines.append(f"KORE / LoRA: CPU {ratio['cpu']:.3f}, wall {ratio['wall']:.3f}; through PEFT's "
                 f"forward: CPU {medians['kore-peft']['cpu'] / medians['lora']['cpu']:.3f} "
                 f"({tokens} tokens per step)")
    return ratio["cpu"], lines, models["kore"], tokenizer


def part1b(model, tokenizer, batch: int, steps: int) -> tuple[float, list[str]]:
    """The same KORE model, one module object timed twice (weights drift a little with the
    steps; a step's cost does not depend on their values)."""
    rows = [encode_conversation(tokenizer, c, 256) for c in mixed_conversations(batch)]
    table = {"step": np.zeros(batch, np.int64), "id": np.array([f"c{i}" for i in range(batch)]),
             "input_ids": _objects(r["input_ids"] for r in rows),
             "labels": _objects(r["labels"] for r in rows)}
    micro = max(1, batch // 2)
    batches = {name: Collate(tokenizer, False, tokenizer.pad_token_id, 256, micro,
                             packed=name == "packed")(table).micro_batches
               for name in ("padded", "packed")}
    times = step_times({"padded": model, "packed": model}, batches, steps)
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    positions = sum(int(b["input_ids"].numel()) for b in batches["padded"])
    tokens = sum(int(b["input_ids"].numel()) for b in batches["packed"])
    ratio = cpu["packed"] / cpu["padded"]
    return ratio, [f"padded: {cpu['padded']:.3f} CPU s ({positions} positions); packed: "
                   f"{cpu['packed']:.3f} CPU s ({tokens} tokens); packed / padded {ratio:.3f}"]


def _objects(values) -> np.ndarray:
    """A numpy object column of arrays, as Ray Data hands the collate a batch."""
    items = [np.array(v) for v in values]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def part2(model_dir: Path, rank: int, batch: int, steps: int) -> tuple[float, list[str]]:
    import ray

    from kore_ray.train import run_train

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    medians = {}
    lines = [f"{'workers':<8}{'threads each':>13}{'median CPU s':>14}{'median wall s':>15}"]
    with tempfile.TemporaryDirectory(prefix="kore-bench-") as tmp:
        base = [f"run_dir={tmp}", f"model.name_or_path={model_dir}", f"init.rank={rank}",
                f"train.batch_size={batch}", f"train.max_steps={steps}", "train.max_length=256",
                f"train.checkpoint_every={steps}"]
        write_parquet(conversations(4 * batch), RunDir(tmp).conversations, Conversation)
        run_init(load_config(overrides=base), "lora")
        for workers in (1, 2):
            log(f"part 2: run_train with {workers} worker(s)")
            cfg = load_config(overrides=[*base, f"train.num_workers={workers}",
                                         f"train.run_name=bench-{workers}w"])
            run_train(cfg, "lora", progress=False)
            metrics = [json.loads(line)
                       for line in (RunDir(tmp).train("lora") / METRICS).read_text().splitlines()]
            medians[workers] = {k: statistics.median(m[k] for m in metrics[1:])
                                for k in ("cpu_s", "step_s")}
            lines.append(f"{workers:<8}{1:>13}{medians[workers]['cpu_s']:>14.3f}"
                         f"{medians[workers]['step_s']:>15.3f}")
    ray.shutdown()
    ratio = {k: medians[2][k] / medians[1][k] for k in ("cpu_s", "step_s")}
    lines.append(f"2 / 1 workers: CPU {ratio['cpu_s']:.3f}, wall {ratio['step_s']:.3f}")
    return ratio["cpu_s"], lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64,
                        help="KORE rank (LoRA gets the matched one)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    args = parser.parse_args()
    model_dir = embedded_gemma_path()
    start = time.perf_counter()
    print(f"Gemma 3 270M, global batch {args.batch}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start\n", flush=True)
    kore_vs_lora, table, kore, tokenizer = part1(model_dir, args.rank, args.batch, args.steps)
    print("KORE vs LoRA at equal trainable parameters (one thread, alternating steps):")
    print("\n".join(table))
    print(f"-> KORE step / LoRA step = {kore_vs_lora:.3f} (goal <= 1.0)\n", flush=True)
    packed_vs_padded, table = part1b(kore, tokenizer, 2 * args.batch, args.steps)
    print("KORE on mixed-length rows (Q&A and paragraphs), micro-batches packed vs padded:")
    print("\n".join(table) + "\n", flush=True)
    del kore
    log(f"part 1 done after {time.perf_counter() - start:.0f} s")
    gc.collect()
    two_vs_one, table = part2(model_dir, args.rank, args.batch, args.steps + 1)
    print("Ray Train workers (matched LoRA, same global batch, rank 0's steps, first excluded):")
    print("\n".join(table))
    print(f"-> 2-worker step / 1-worker step = {two_vs_one:.3f} (ideal 0.5: a core per worker)")
    print(f"({time.perf_counter() - start:.0f} s in all; load average now "
          f"{os.getloadavg()[0]:.1f})\n")
    print(json.dumps({"kore_vs_lora_step": round(kore_vs_lora, 4),
                      "packed_vs_padded_step": round(packed_vs_padded, 4),
                      "two_vs_one_worker": round(two_vs_one, 4)}))


if __name__ == "__main__":
    main()
