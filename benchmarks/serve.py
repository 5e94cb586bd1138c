"""Multi-adapter serving cost: generated tokens/s with requests spread over 4 adapters against
base-model-only requests, on the same app (Ray Serve + vLLM multi-LoRA), the embedded Gemma 3 270M.

The adapters are exported with `export_lora` from LoRAs on every KORE target layer (q/k/v/o,
gate/up/down) at rank 64 (KORE's default), each with its own random B. Serving cost depends on
the rank and the adapted layers only, not on how A was found, so the null-space maths is skipped.

Each round sends the same prompts concurrently (greedy, max_tokens fixed) either all to the base
model or round-robin over the 4 adapters; rounds alternate so background load hits both alike,
after one warm-up round each (it loads the adapters). The ratio is the median over rounds of
adapter tokens/s / base tokens/s in the neighbouring round. Time to first token: streamed
requests sent one at a time (no queueing), the median over the prompts, base and adapters.

    python benchmarks/serve.py [--prompts 16 --tokens 32 --repeats 3 --rank 64]

Last line: {"multi_adapter_vs_base": ..., "ttft_base_s": ..., "ttft_adapter_s": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path

from _common import median, sentences, table

ADAPTERS = ["kore-a", "kore-b", "kore-c", "kore-d"]
BASE = "gemma-3-270m"


def export_adapters(root: Path, rank: int) -> None:
    """Four rank-`rank` LoRAs on every target layer, differing in their random B."""
    import torch

    from kore_ray.constraint import build_method, export_lora
    from kore_ray.models import load_model
    from kore_ray.models.targets import find_target_groups

    model, _ = load_model(BASE)
    lora = build_method(model, "lora", find_target_groups(model), rank=rank)
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, p in lora.named_parameters():
                if "lora_B" in pname:
                    p.normal_(std=1e-3)
        export_lora(lora, root / name, BASE)


async def _round(url: str, prompts: list[str], models: list[str], tokens: int) -> tuple[int, float]:
    """(generated tokens, seconds) for all prompts at once, prompt i to models[i % len]."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int, prompt: str) -> int:
            r = await client.post("/completions", json={
                "model": models[i % len(models)], "prompt": prompt, "max_tokens": tokens,
                "temperature": 0})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return sum(counts), time.perf_counter() - start


def _first_token_s(url: str, prompts: list[str], models: list[str], tokens: int) -> list[float]:
    """Seconds to the first streamed token of each prompt, one request at a time."""
    import httpx

    waits = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            with client.stream("POST", "/completions", json={
                    "model": models[i % len(models)], "prompt": prompt, "max_tokens": tokens,
                    "temperature": 0, "stream": True}) as r:
                r.raise_for_status()
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        waits.append(time.perf_counter() - start)
                        break
                for _ in lines:  # the rest of the stream
                    pass
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per case")
    parser.add_argument("--rank", type=int, default=64, choices=[8, 16, 32, 64, 128])
    args = parser.parse_args()

    import ray

    from kore_ray.config import load_config
    from kore_ray.serve import serving

    prompts = [" ".join(s.split()[:6]) for s in sentences(args.prompts, seed=1)]
    cases = {"base only": [BASE], "4 adapters": ADAPTERS}
    with tempfile.TemporaryDirectory(prefix="kore-bench-serve-") as tmp:
        t0 = time.perf_counter()
        export_adapters(Path(tmp), args.rank)
        print(f"exported {len(ADAPTERS)} rank-{args.rank} adapters in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = load_config(overrides=[
            f"model.name_or_path={BASE}", f"serve.adapters={tmp}", f"serve.port={port}",
            f"serve.max_lora_rank={args.rank}", f"serve.max_loras={len(ADAPTERS)}",
            "serve.max_model_len=512", "serve.kv_cache_gib=1",
        ])
        # More logical CPUs than cores: the replica, the proxy and the controller all fit.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        with serving(cfg) as url:
            print(f"app up in {time.perf_counter() - t0:.0f} s at {url}", flush=True)
            runs = {name: [] for name in cases}
            for r in range(args.repeats + 1):  # round 0 warms up (adapter loads), not counted
                for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                    result = asyncio.run(_round(url, prompts, cases[name], args.tokens))
                    if r:
                        runs[name].append(result)
            ttft = {name: median(_first_token_s(url, prompts[:8], models, args.tokens))
                    for name, models in cases.items()}
        ray.shutdown()

    rates = {name: [n / s for n, s in results] for name, results in runs.items()}
    rows = [[name, len(prompts), median([n for n, _ in results]),
             f"{median([s for _, s in results]):.2f}", f"{median(rates[name]):.1f}"]
            for name, results in runs.items()]
    print(table(rows, ["requests to", "concurrent", "tokens/round", "median s", "tokens/s"]))
    ratio = median([a / b for a, b in zip(rates["4 adapters"], rates["base only"])])
    print(f"multi-adapter / base throughput: {ratio:.2f} (median of {args.repeats} paired rounds)")
    print("time to first token (streamed, one request at a time): " + ", ".join(
        f"{name} {t * 1000:.0f} ms" for name, t in ttft.items()))
    print(json.dumps({"multi_adapter_vs_base": round(ratio, 3),
                      "ttft_base_s": round(ttft["base only"], 4),
                      "ttft_adapter_s": round(ttft["4 adapters"], 4)}))


if __name__ == "__main__":
    main()
