"""Memory of the covariance stage at Llama-2-7B widths, measured against the memory model.

A random Llama built from a config (hidden 4096, MLP 11008, 32 heads, a 2048-token vocabulary,
`--layers` decoder layers, bfloat16 weights: the widths that set the sums' size, with as few
layers as fit this 23 GB machine) is collected by the real stage (`collect_distributed`:
actors, partials on disk, reducers) with 1 and then 2 actors, and once in a single process
(the core's `collect_covariance`, float64) for exactness. Measured, per run:

- driver: its RSS sampled every 10 ms during the collection, the peak minus the RSS just
  before, over the store's size (the store is never in the driver);
- actors: each one's peak RSS (getrusage, reported with its partial) against the memory
  model of docs/DESIGN.md: runtime + weights + sums (8 d^2 per group) + float32 scratch (4 d^2
  per distinct width) + activations, where "runtime" (Python, torch, transformers, Ray
  worker) is measured by an actor that imports the same code and loads no model;
- reducers: peak RSS against runtime + 2 x 8 d_max^2 (the running sum and one partial);
- object store: bytes of the task tables each call fetched plus every call's result (the
  sums go through the run directory), over the store's size; disk: bytes the partials wrote;
- exactness: max over groups of max |distributed - single process| / max |single process|.

    python benchmarks/covariance_memory.py [--layers 4 --sequences 16 --length 48]

Takes about 10 minutes here at 4 layers. Last line: {"driver_peak_over_store",
"actor_peak_over_predicted", "object_store_bytes_over_store", "rel_err"} (the worst of the
1- and 2-actor runs for each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import ray

from kore_ray.config import CovarianceConfig
from kore_ray.constraint.covariance_stage import collect_distributed, remote_model_spec
from kore_ray.constraint.partials import peak_rss_bytes
from kore_ray.constraint.retention import RetentionItem, plan_batches
from kore_ray.constraint.store import read_manifest

GB = 1e9


def build_model(directory: Path, layers: int) -> Path:
    """A random Llama with Llama-2-7B widths, saved in bfloat16 with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(2000)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=len(vocab),
                         max_position_embeddings=512, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    del model
    return directory


def retention(n: int, length: int) -> list[RetentionItem]:
    import random

    rng = random.Random(0)
    return [RetentionItem(id=f"r{i}", text=" ".join(f"w{rng.randrange(2000)}" for _ in range(length)),
                          image=None) for i in range(n)]


class Sampler:
    """The driver's peak RSS above its level at the start, sampled in a thread."""

    def __init__(self, every: float = 0.01):
        self.process, self.every = psutil.Process(), every
        self.start = self.process.memory_info().rss
        self.peak, self._stop = self.start, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak - self.start


@ray.remote(num_cpus=1, max_calls=1)  # a fresh process: its peak RSS is its own
def runtime_rss() -> int:
    """An actor process's footprint before any model: the imports every actor makes."""
    import kore_ray.constraint.partials  # noqa: F401  (torch, transformers, the stage's code)
    import kore_ray.models.loading  # noqa: F401

    return peak_rss_bytes()


@ray.remote(num_cpus=1, max_calls=1)  # a fresh process: its peak RSS is its own
def single_process(model_dir: str, items, batch_size: int, max_length: int, out: str) -> int:
    """The core's float64 store of the same micro-batches in one process, one thread."""
    import torch

    from kore_ray.constraint.covariance import collect_covariance
    from kore_ray.constraint.retention import text_inputs, tokenize_texts
    from kore_ray.constraint.store import save_store
    from kore_ray.models.loading import load_model
    from kore_ray.models.targets import find_target_groups

    torch.set_num_threads(1)
    model, tok = load_model(model_dir, "bfloat16")
    batches = (text_inputs(tokenize_texts(tok, [i.text for i in b], max_length), tok.pad_token_id)
               for b in plan_batches(items, batch_size))
    save_store(out, collect_covariance(model, batches, find_target_groups(model)))
    return peak_rss_bytes()


@ray.remote(num_cpus=1, max_calls=1)  # a fresh process: its peak RSS is its own
def compare(a: str, b: str) -> float:
    """max over groups of max |a - b| / max |b|, one group in memory at a time."""
    from kore_ray.constraint.store import load_store

    sa, sb = load_store(a), load_store(b)
    assert sa.tokens == sb.tokens and sa.samples == sb.samples, (sa.tokens, sb.tokens)
    worst = 0.0
    for key in sb.sums:
        x, y = sa.sums[key], sb.sums[key]
        worst = max(worst, ((x - y).abs().max() / y.abs().max()).item())
        del x, y
    return worst


def memory_model(spec, weight_bytes: int, runtime: int, activations: int) -> dict:
    """Predicted peaks (bytes) from docs/DESIGN.md's model, for one pass over every group."""
    widths = [g.in_features for g in spec.groups]
    sums = sum(8 * d * d for d in widths)
    scratch = sum(4 * d * d for d in set(widths))
    return {"store": sums, "actor": runtime + weight_bytes + sums + scratch + activations,
            "reducer": runtime + 2 * 8 * max(widths) ** 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=48, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="covariance-memory-"))
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        model_dir = build_model(work / "model", args.layers)
        weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        spec = remote_model_spec(str(model_dir), "bfloat16")
        items = retention(args.sequences, args.length)
        batches = plan_batches(items, args.batch_size)
        runtime = ray.get(runtime_rss.remote())
        # The largest float32 activation a forward keeps: batch x tokens x MLP width, a few alive.
        activations = 4 * 4 * args.batch_size * (args.length + 1) * 11008
        predicted = memory_model(spec, weight_bytes, runtime, activations)
        store_bytes = predicted["store"]
        print(f"model: {args.layers} layers at 7B widths, {len(spec.groups)} target groups, "
              f"weights {weight_bytes / GB:.2f} GB (bfloat16); store {store_bytes / GB:.2f} GB; "
              f"actor runtime {runtime / GB:.2f} GB", flush=True)

        reference = work / "single"
        t0 = time.perf_counter()
        single_rss = ray.get(single_process.remote(str(model_dir), items, args.batch_size,
                                                   args.length + 1, str(reference)))
        print(f"single process: {time.perf_counter() - t0:.0f} s, peak RSS {single_rss / GB:.2f} GB",
              flush=True)

        results = {}
        for actors in (1, 2):
            cov = CovarianceConfig(batch_size=args.batch_size, max_length=args.length + 1,
                                   sequences_per_task=args.batch_size, num_actors=actors,
                                   num_reducers=2, use_gpu=False)
            out = work / f"actors{actors}"
            sampler = Sampler()
            t0 = time.perf_counter()
            stats = collect_distributed(batches, spec, cov, out / "covariance", out / "partials",
                                        progress=False)
            elapsed = time.perf_counter() - t0
            driver = sampler.stop()
            manifest = read_manifest(out / "covariance")
            assert manifest["samples"] == len(items)
            actor_peak = max(p["peak_rss"] for p in stats["partials"])
            reducer_peak = max(r["peak_rss"] for r in stats["reducers"])
            moved = stats["partials"][0]["pass_moved_bytes"]
            disk = sum(p["bytes"] for p in stats["partials"])  # the newest partial of each actor
            err = ray.get(compare.remote(str(out / "covariance"), str(reference)))
            results[actors] = {
                "driver_peak_over_store": driver / store_bytes,
                "actor_peak_over_predicted": actor_peak / predicted["actor"],
                "reducer_peak_over_predicted": reducer_peak / predicted["reducer"],
                "object_store_bytes_over_store": moved / store_bytes,
                "rel_err": err,
            }
            print(f"{actors} actor(s): {elapsed:.0f} s, {stats['tasks']} tasks, "
                  f"{len(stats['partials'])} partials ({disk / GB:.2f} GB on disk)\n"
                  f"  driver peak +{driver / 1e6:.0f} MB ({driver / store_bytes:.4f} of the store)\n"
                  f"  actor peak {actor_peak / GB:.2f} GB vs predicted {predicted['actor'] / GB:.2f} GB"
                  f" ({actor_peak / predicted['actor']:.3f}x)\n"
                  f"  reducer peak {reducer_peak / GB:.2f} GB vs predicted "
                  f"{predicted['reducer'] / GB:.2f} GB ({reducer_peak / predicted['reducer']:.3f}x)\n"
                  f"  object store {moved / 1e3:.1f} kB ({moved / store_bytes:.2e} of the store); "
                  f"rel err vs single process {err:.1e}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    worst = {k: max(r[k] for r in results.values()) for k in results[1]}
    print(json.dumps({k: float(f"{v:.4g}") for k, v in worst.items()}))


if __name__ == "__main__":
    main()
