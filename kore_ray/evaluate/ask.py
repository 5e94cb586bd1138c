"""Ask a served model many questions: Ray Data fans requests out to an OpenAI-compatible endpoint.

Each row is one request (a chat question or a completion prompt) for one served model (the
base or an adapter). Greedy decoding by default, so an answer is a property of the model, not
of luck; a row's optional `params` (JSON: n, temperature, stop, seed, ...) override it, and
`choices` holds every choice's text (the self-augmentation samples several per request).
Requests that fail after the client's retries are kept as rows with their error: a missing
answer is scored as wrong and reported, never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import warnings

import pyarrow as pa

RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("model", pa.string()), ("prediction", pa.string()), ("error", pa.string()),
    ("choices", pa.string()),
])


class AskWorker:
    """A Ray Data actor with one async client; all its in-flight rows share one event loop."""

    def __init__(self, base_url: str, api_key: str, max_tokens: int, timeout_s: float):
        self._args = (base_url, api_key, max_tokens, timeout_s)
        self._client = None

    async def _one(self, row: dict) -> dict:
        _, _, max_tokens, _ = self._args
        params = {"max_tokens": max_tokens, "temperature": 0.0,
                  **json.loads(row.get("params") or "{}")}
        try:
            if row["kind"] == "chat":
                resp = await self._client.chat.completions.create(
                    model=row["model"], messages=json.loads(row["prompt"]), **params)
                texts = [c.message.content or "" for c in resp.choices]
            else:
                resp = await self._client.completions.create(
                    model=row["model"], prompt=row["prompt"], **params)
                texts = [c.text for c in resp.choices]
            return {"id": row["id"], "model": row["model"], "prediction": texts[0], "error": None,
                    "choices": json.dumps(texts, ensure_ascii=False)}
        except Exception as e:  # recorded per row; the run goes on
            return {"id": row["id"], "model": row["model"], "prediction": None,
                    "error": f"{type(e).__name__}: {e}", "choices": None}

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # created here so it belongs to the actor's event loop
            import openai

            base_url, api_key, _, timeout_s = self._args
            self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key,
                                              timeout=timeout_s, max_retries=3)
        rows = await asyncio.gather(*(self._one(r) for r in batch.to_pylist()))
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def ask(requests: list[dict], base_url: str, *, api_key: str = "EMPTY", max_tokens: int = 16,
        concurrency: int = 16, actors: int = 1, timeout_s: float = 300.0,
        progress: bool = True, desc: str = "evaluate") -> dict[tuple[str, str], dict]:
    """Answer every request ({id, model, kind: chat|completion, prompt[, params]}); keyed by
    (model, id)."""
    import ray
    from tqdm import tqdm

    if not requests:
        return {}
    requests = [{**r, "params": r.get("params")} for r in requests]  # one schema for every row
    ds = ray.data.from_items(requests, override_num_blocks=max(1, len(requests) // concurrency))
    with warnings.catch_warnings():
        # Ray Data passes an actor its constructor arguments by reference, and Ray then warns
        # on the console about every actor that may restart (ray#57733). These actors hold
        # an HTTP client and nothing else: no restarts (a lost one fails the call, and the
        # callers cache what came back). max_restarts has no named parameter yet in 2.60.
        warnings.filterwarnings("ignore", message=".*`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            AskWorker, batch_size=concurrency, batch_format="pyarrow", num_cpus=0.25,
            compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2),
            fn_constructor_kwargs={"base_url": base_url, "api_key": api_key,
                                   "max_tokens": max_tokens, "timeout_s": timeout_s},
            max_restarts=0,
        )
    ds.context.enable_progress_bars = False
    out = {}
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                out[(row["model"], row["id"])] = row
                bar.update(1)
    failed = [r for r in out.values() if r["error"] is not None]
    if failed:  # scored as wrong answers; said here so that a broken endpoint is not mistaken for a bad model
        first = failed[0]
        print(f"kore {desc}: {len(failed)} of {len(out)} requests failed after retries "
              f"(first: {first['model']} {first['id']}: {first['error'][:300]})")
    return out
