"""Augmentation throughput against an OpenAI-compatible endpoint of known capacity.

The endpoint (tests/openai_stub.py on 127.0.0.1) answers every request after a fixed latency
L and serves at most K requests at once (more queue), so no client can exceed K/L requests
per second. Measured in one run:

- the augment stage (`run_augment`: Ray Data, autoscaling async actor pool) end to end, pool
  start-up, cache writes and Parquet output included: its throughput over K/L;
- a plain sequential loop of the synchronous `openai` client over the same requests:
  the pipeline's speedup over it.

    python benchmarks/augment.py [--items 3000 --latency 1.0 --slots 32]

Last line: {"throughput_vs_capacity": ..., "speedup_vs_sequential": ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import openai
import ray
from openai_stub import OpenAIStub

from kore_ray.augment import run_augment
from kore_ray.augment.llm import build_messages, parse_dialogues, response_format
from kore_ray.config import PipelineConfig
from kore_ray.data.schemas import KnowledgeItem

ANSWER = json.dumps({"dialogues": [{"turns": [
    {"user": "What happened?", "assistant": "It won the cup."},
    {"user": "When?", "assistant": "In March 2025."}]}]})


def make_items(n: int) -> list[KnowledgeItem]:
    return [KnowledgeItem(id=f"b{i}", kind="news", subject=f"Team {i}",
                          knowledge=f"Team {i} won the Lunar Cup in March 2025.")
            for i in range(n)]


def sequential_rate(url: str, items: list[KnowledgeItem]) -> float:
    """Requests per second of the obvious loop: one request at a time, same request body."""
    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=60)
    start = time.perf_counter()
    for item in items:
        response = client.chat.completions.create(
            model="stub", messages=build_messages(item, 1), max_tokens=1024,
            response_format=response_format("json_schema", 1))
        parse_dialogues(response.choices[0].message.content, 1)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--latency", type=float, default=1.0, help="L, seconds per request")
    p.add_argument("--slots", type=int, default=32, help="K, requests the endpoint serves at once")
    p.add_argument("--sequential", type=int, default=10, help="requests for the sequential loop")
    p.add_argument("--actors", type=int, default=4, help="max actors (min is 1)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per actor")
    args = p.parse_args()
    capacity = args.slots / args.latency

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp, OpenAIStub(
            lambda body: ANSWER, latency_s=args.latency, max_in_flight=args.slots) as stub:
        seq = sequential_rate(stub.url, make_items(args.sequential))
        knowledge = Path(tmp, "knowledge.jsonl")
        knowledge.write_text("".join(i.model_dump_json() + "\n" for i in make_items(args.items)))
        cfg = PipelineConfig.model_validate({
            "run_dir": tmp, "data": {"knowledge": str(knowledge)},
            "augment": {"base_url": stub.url, "model": "stub", "dialogues_per_item": 1,
                        "min_actors": 1, "max_actors": args.actors,
                        "concurrency_per_actor": args.concurrency}})
        before = stub.count()
        t0 = time.monotonic()
        summary = run_augment(cfg, progress=False)
        t1 = time.monotonic()
        arrivals = [r.at for r in stub.requests[before:]]
        peak = stub.max_seen_in_flight
    ray.shutdown()

    requests = summary["requests"]
    assert requests == args.items and summary["failures"] == 0, summary
    rate = requests / summary["wall_s"]
    steady = (len(arrivals) - 1) / (max(arrivals) - min(arrivals))
    rows = [
        ("endpoint capacity K/L", f"{capacity:.1f} req/s", f"K={args.slots}, L={args.latency} s"),
        ("sequential openai loop", f"{seq:.1f} req/s", f"{args.sequential} requests"),
        ("augment stage, end to end", f"{rate:.1f} req/s",
         f"{requests} requests in {summary['wall_s']:.1f} s (pool start-up included)"),
        ("  while requests flowed", f"{steady:.1f} req/s", "first to last request arrival"),
        ("  before the first request", f"{min(arrivals) - t0:.1f} s",
         "reading, Ray Data planning, actor start-up"),
        ("  after the last request", f"{t1 - max(arrivals):.1f} s",
         "last answers, Parquet and summary"),
        ("  peak in flight at endpoint", f"{peak}",
         f"pool: up to {args.actors} actors x {args.concurrency} requests"),
        ("throughput / capacity", f"{rate / capacity:.3f}", "goal >= 0.8"),
        ("speedup vs sequential", f"{rate / seq:.1f}x", "at most about K"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    print(json.dumps({"throughput_vs_capacity": round(rate / capacity, 3),
                      "speedup_vs_sequential": round(rate / seq, 2)}))


if __name__ == "__main__":
    main()
