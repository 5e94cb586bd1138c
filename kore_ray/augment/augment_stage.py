"""KORE-AUGMENTATION as a pipeline: the Ray Data shell around the templates and the LLM client.

The driver reads the items, looks their LLM part up in the cache, and sends only the items
not cached through a Ray Data `map_batches` over an autoscaling pool of async actors (a
`DialogueClient` in each). Results stream back to the driver, which caches each finished
item's dialogues as it arrives (so an interrupted run loses only the items in flight, and the
actors need no shared filesystem) and builds the item's tree with its template conversations
while the other requests are in flight. Outputs, in `<run_dir>/augmented/` (a local path):

- `conversations.parquet`: `Conversation` rows, every item's knowledge tree;
- `failures.parquet`: one row per failed item and stage (knowledge_id, stage, error, attempts);
- `summary.json`: counts of items, conversations, requests, tokens, failures, and wall time;
- `cache/`: one JSON file per finished item, keyed by its request (see `cache_key`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import SecretStr, ValidationError

from kore_ray.augment import self_qa
from kore_ray.augment.dedup import drop_near_duplicates
from kore_ray.augment.extractive import (
    extractive_pairs,
    full_names,
    people,
    resolved_sentences,
    topic_of,
)
from kore_ray.augment.grounding import Verdict, check_pair, has_cue, invents
from kore_ray.augment.llm import (
    PROMPT_VERSION,
    QA,
    Dialogue,
    DialogueClient,
    build_messages,
    dialogue_conversations,
)
from kore_ray.augment.templates import template_tree
from kore_ray.config import AugmentConfig, PipelineConfig
from kore_ray.data.io import read_records, write_parquet
from kore_ray.data.schemas import Conversation, KnowledgeItem
from kore_ray.errors import InputError
from kore_ray.run_dir import RunDir, atomic_write

ASYNC_BATCHES_PER_TASK = 4  # Ray Data runs this many batches of an async UDF at once


@dataclass(frozen=True)
class Failure:
    knowledge_id: str
    stage: str  # "dialogue" (the LLM), "vqa" (an unusable quadruplet), "self", "grounding"
    error: str
    attempts: int


FAILURE_SCHEMA = pa.schema([
    pa.field("knowledge_id", pa.string(), False),
    pa.field("stage", pa.string(), False),
    pa.field("error", pa.string(), False),
    pa.field("attempts", pa.int32(), False),
])

RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("dialogues", pa.string()), ("qa", pa.string()), ("error", pa.string()), ("requests", pa.int32()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
])


def cache_key(item: KnowledgeItem, cfg: AugmentConfig) -> str:
    """Content address of an item's LLM request: its id, the exact messages sent (so any
    change to the item's subject, kind, date or knowledge is redone), the prompt version,
    the model and the number of dialogues."""
    payload = {"id": item.id, "prompt_version": PROMPT_VERSION, "model": cfg.model,
               "n": cfg.dialogues_per_item,
               "messages": build_messages(item, cfg.dialogues_per_item)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Cache:
    """Finished items' dialogues on disk, one JSON file per cache key. Failures are not
    cached, so a re-run retries them."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[Dialogue] | None:
        """The cached dialogues, or None (also for an unreadable entry: it is redone)."""
        try:
            return [Dialogue.model_validate(d) for d in self.get_json(key)["dialogues"]]
        except (ValueError, KeyError, TypeError, ValidationError):
            return None

    def get_json(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put_json(self, key: str, entry: dict) -> None:
        atomic_write(self._path(key), json.dumps(entry, ensure_ascii=False).encode())

    def qa(self, key: str) -> list[QA]:
        """The cached targeted Q&A of an entry ([] for none or an unreadable entry)."""
        try:
            return [QA.model_validate(p) for p in (self.get_json(key) or {}).get("qa", [])]
        except (ValueError, TypeError, ValidationError):
            return []

    def put(self, key: str, knowledge_id: str, model: str, dialogues: list[dict],
            qa: list[dict] = ()) -> None:
        self.put_json(key, {"knowledge_id": knowledge_id, "model": model,
                            "prompt_version": PROMPT_VERSION, "dialogues": dialogues,
                            "qa": list(qa)})


class DialogueWorker:
    """A Ray Data actor: one async client, up to `concurrency_per_actor` requests in flight
    across all the batches Ray Data runs on it at once (they share the actor's event loop)."""

    def __init__(self, cfg: AugmentConfig, api_key: SecretStr, rate_per_s: float | None):
        self._cfg, self._api_key, self._rate = cfg, api_key, rate_per_s
        self._client: DialogueClient | None = None

    async def _one(self, row: dict) -> dict:
        outcome = await self._client.generate(KnowledgeItem.model_validate_json(row["item"]))
        return {
            "id": row["id"], "key": row["key"], "status": "failed" if outcome.error else "ok",
            "dialogues": None if outcome.error else json.dumps(
                [d.model_dump() for d in outcome.dialogues], ensure_ascii=False),
            "qa": None if outcome.error else json.dumps(
                [p.model_dump() for p in outcome.qa], ensure_ascii=False),
            "error": outcome.error, "requests": outcome.requests,
            "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
        }

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # here, so that it belongs to the actor's event loop
            self._client = DialogueClient(self._cfg, self._api_key.get_secret_value(), self._rate)
        rows = await asyncio.gather(*(self._one(row) for row in batch.to_pylist()))
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _llm_results(todo: list[KnowledgeItem], keys: dict[str, str], cfg: AugmentConfig,
                 progress: bool) -> Iterator[dict]:
    """Run the items through the actor pool; yield one result row per item as they finish."""
    import ray
    from tqdm import tqdm

    api_key = SecretStr(os.environ.get(cfg.api_key_env) or "EMPTY")  # local servers need none
    # Each actor paces itself to its share, so all of them together stay under the limit
    # whatever size the pool autoscales to.
    rate = cfg.requests_per_second / cfg.max_actors if cfg.requests_per_second else None
    batch_size = cfg.concurrency_per_actor
    rows_per_block = batch_size * ASYNC_BATCHES_PER_TASK
    blocks = max(1, -(-len(todo) // rows_per_block))
    # The work is known up front: start as many actors as there are blocks to keep busy
    # (within min/max) rather than let the autoscaler discover it one actor at a time.
    initial = min(cfg.max_actors, max(cfg.min_actors, blocks))
    ds = ray.data.from_items(
        [{"id": i.id, "key": keys[i.id], "item": i.model_dump_json()} for i in todo],
        override_num_blocks=blocks,
    ).map_batches(
        DialogueWorker,
        batch_size=batch_size,
        batch_format="pyarrow",
        # Two tasks per actor at once, so one task's slowest item does not idle the actor.
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors,
                                           initial_size=initial,
                                           max_concurrent_calls_per_actor=2),
        fn_constructor_kwargs={"cfg": cfg, "api_key": api_key, "rate_per_s": rate},
        num_cpus=cfg.num_cpus_per_actor,
    )
    ds.context.enable_progress_bars = False  # this dataset's own copy: ours instead
    with tqdm(total=len(todo), desc="augment", unit="item", disable=not progress) as bar:
        failed = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                failed += row["status"] == "failed"
                bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)
                yield row


def _write_failures(failures: list[Failure], path: Path) -> None:
    table = pa.Table.from_pylist([asdict(f) for f in failures], schema=FAILURE_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(path, buffer.getvalue())


def _self_pairs(items: list[KnowledgeItem], cfg: PipelineConfig, cache: Cache,
                stats: Counter, progress: bool) -> dict[str, self_qa.SelfOutcome]:
    """The self generator's outcome per item: cached ones read back, the rest generated by the
    base model, served here for as long as it takes (and cached as soon as they arrive)."""
    acfg = cfg.augment
    wanted = [i for i in items if acfg.self_items == "all" or not i.qa]
    keys = {i.id: _self_key(i, cfg) for i in wanted}
    out, todo = {}, []
    for item in wanted:
        entry = cache.get_json(keys[item.id])
        if entry and "self" in entry:
            out[item.id] = self_qa.SelfOutcome.from_json(entry["self"])
            stats["self_items_cached"] += 1
        else:
            todo.append(item)
    if todo:
        from kore_ray.serve.serve_stage import serving

        # The base model alone: no adapters, so nothing a previous run trained is asked.
        base_only = cfg.model_copy(update={"serve": cfg.serve.model_copy(
            update={"adapters": str(RunDir(cfg.run_dir).no_adapters)})})
        model = cfg.serve.served_model_name or cfg.model.name_or_path
        start = time.perf_counter()
        with serving(base_only) as url:
            generated = self_qa.generate_self_pairs(
                todo, url, model, candidates=acfg.self_candidates, max_tokens=acfg.self_max_tokens,
                temperature=acfg.self_temperature, verify=acfg.verify, progress=progress)
        stats["self_wall_s"] += time.perf_counter() - start
        for item in todo:
            outcome = generated[item.id]
            stats["requests"] += outcome.requests
            if outcome.error is None:  # an item whose request failed is asked again next run
                cache.put_json(keys[item.id], {"knowledge_id": item.id, "self": outcome.to_json()})
            out[item.id] = outcome
    return out


def _self_key(item: KnowledgeItem, cfg: PipelineConfig) -> str:
    a = cfg.augment
    payload = {"id": item.id, "prompt": self_qa.generation_prompt(item),
               "version": self_qa.PROMPT_VERSION, "model": cfg.model.name_or_path,
               "n": a.self_candidates, "max_tokens": a.self_max_tokens,
               "temperature": a.self_temperature, "verify": a.verify}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _pair(item: KnowledgeItem, generator: str, i: int, question: str, answer: str) -> Conversation:
    return Conversation(id=f"{item.id}/{generator}/{i}", knowledge_id=item.id, task="qa",
                        messages=[{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}])


def _cued(question: str, verdict: Verdict, topic: str) -> Verdict:
    """A model's pair whose answer IS the item needs a cue in the question, a name or number of
    the text ("Which firm did the Vaskelund brothers found?"): without one ("What is the
    company's main product?" -> the company) it binds the item's name to a question about
    nothing. Its other questions are left as written: prefixing the item ("About X: who wrote
    this novel?" -> the novel's title) bound the model's false relations to the item, and the
    runs with it were lower (README, "The list changes")."""
    if verdict.key_span.lower() in topic.lower() and not has_cue(question):
        return Verdict(False, "no_cue")
    return verdict


def fact_tree(item: KnowledgeItem, generators: list[str], self_outcome, dialogues: list[Dialogue],
              endpoint_qa: list[QA] = ()) -> tuple[list[Conversation], list[Failure], Counter]:
    """An item's generated conversations, each pair grounded in its text, and the rejects
    (as failure rows with the rejected text) counted by "generator:reason"."""
    convs, failures, rejected = [], [], Counter()

    def reject(generator: str, reason: str, question: str, answer: str) -> None:
        rejected[f"{generator}:{reason}"] += 1
        failures.append(Failure(item.id, "grounding", f"{generator}: {reason}: "
                                f"Q: {question!r} A: {answer!r}", 0))

    topic = topic_of(item)
    # What "She started from ninth place" says of Noor Eskeland: a pair about it stands in a
    # sentence that names her only once the pronoun is resolved.
    resolved = "\n\n".join(resolved_sentences(item, topic, people(
        item.knowledge, full_names(item.knowledge))))

    def checked(generator: str, pairs) -> None:
        n = 0
        for question, answer in pairs:
            verdict = check_pair(question, answer, item.knowledge)
            if not verdict and verdict.reason == "wrong_sentence":
                verdict = check_pair(question, answer, resolved)
            if verdict and generator != "extractive":  # extractive questions are built so
                verdict = _cued(question, verdict, topic)
            if verdict:
                convs.append(_pair(item, generator, n, question, verdict.target))
                n += 1
            else:
                reject(generator, verdict.reason, question, answer)

    if "extractive" in generators:
        checked("extractive", [(p.question, p.answer) for p in extractive_pairs(item)])
    checked("endpoint-qa", [(p.question, p.answer) for p in endpoint_qa])
    if self_outcome is not None:
        if self_outcome.error:
            failures.append(Failure(item.id, "self", self_outcome.error, 1))
        checked("self", self_outcome.kept)  # again: a cached pair meets today's check too
        for reason, question, answer in self_outcome.rejected:
            reject("self", reason, question, answer)
    grounded = []
    for d in dialogues:
        bad = next((t.assistant for t in d.turns
                    if invents(t.assistant, item.knowledge, skip_first=True)), None)
        if bad is None:
            grounded.append(d)
        else:
            reject("endpoint", "invented", d.turns[0].user, bad)
    return convs + dialogue_conversations(item, grounded), failures, rejected


def long_items(cfg: PipelineConfig, items: list[KnowledgeItem]) -> list[str]:
    """A warning, naming file and line, for each knowledge text longer than train.max_length
    tokens: its paragraph conversation would be cut there in training, silently."""
    limit = cfg.train.max_length
    # A token is at least one character: only longer texts need the tokenizer.
    candidates = [item for item in items if len(item.knowledge) > limit]
    if not candidates:
        return []
    from transformers import AutoTokenizer

    from kore_ray.data.io import iter_rows
    from kore_ray.models.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    counts = {item.id: len(tokenizer(item.knowledge, add_special_tokens=False).input_ids)
              for item in candidates}
    long = {i: n for i, n in counts.items() if n > limit}
    if not long:
        return []
    lines = {row.record.id: row.line for row in iter_rows(cfg.data.knowledge, KnowledgeItem)
             if row.record is not None and row.record.id in long}  # only to name the lines
    return [f"{cfg.data.knowledge}:{lines[i]}: knowledge: {n} tokens (item {i!r}), longer than "
            f"train.max_length {limit}: its paragraph conversation is cut there; raise "
            "train.max_length or split the item" for i, n in long.items()]


def run_augment(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Turn `cfg.data.knowledge` into conversations in `<run_dir>/augmented/`; return the
    summary (also written as summary.json).

    The generators (`augment.generators`) add fact-level Q&A to every item's templates; every
    generated pair is grounding-checked against the item's text. Ray is used as `ray.data`
    finds it: the cluster of `RAY_ADDRESS` or `ray job submit`, a running `ray.init()`, or a
    new local one; with the extractive generator alone it is not started.
    """
    start = time.perf_counter()
    acfg = cfg.augment
    if cfg.data.knowledge is None:
        raise InputError("data.knowledge is not set: give a knowledge file "
                         "(--set data.knowledge=FILE.jsonl)")
    generators = acfg.active_generators()
    use_llm = "endpoint" in generators and acfg.dialogues_per_item > 0
    if use_llm and not acfg.model:
        raise InputError("augment.model must be set when augment.base_url is")
    items = read_records(cfg.data.knowledge, KnowledgeItem)
    too_long = long_items(cfg, items)
    for warning in too_long:
        print(f"kore augment: warning: {warning}", flush=True)
    run_dir = RunDir(cfg.run_dir)
    cache = Cache(run_dir.augment_cache)

    trees: dict[str, list[Conversation]] = {}
    failures: list[Failure] = []
    stats = Counter()
    rejected = Counter()
    self_outcomes = _self_pairs(items, cfg, cache, stats, progress) if "self" in generators else {}

    def finish(item: KnowledgeItem, found: list[Dialogue], qa: list[QA] = ()) -> None:
        """Build an item's tree; called as each item's dialogues arrive, so this CPU work
        overlaps the requests still in flight."""
        tree, problems = template_tree(item, acfg.templates_per_item, acfg.seed)
        failures.extend(Failure(p.knowledge_id, p.stage, p.error, 0) for p in problems)
        facts, rejects, counts = fact_tree(item, generators, self_outcomes.get(item.id), found, qa)
        failures.extend(rejects)
        rejected.update(counts)
        trees[item.id], dropped = drop_near_duplicates(tree + facts, acfg.dedup_threshold)
        stats["near_duplicates_removed"] += dropped

    todo, keys = [], {}
    for item in items:
        cached = None
        if use_llm:
            keys[item.id] = cache_key(item, acfg)
            cached = cache.get(keys[item.id])
            if cached is None:
                todo.append(item)
                continue
            stats["items_cached"] += 1
        finish(item, cached or [], cache.qa(keys[item.id]) if use_llm else [])

    llm_start = time.perf_counter()
    by_id = {item.id: item for item in todo}
    for row in _llm_results(todo, keys, acfg, progress) if todo else ():
        stats.update(requests=row["requests"], retries=row["requests"] - 1,
                     prompt_tokens=row["prompt_tokens"],
                     completion_tokens=row["completion_tokens"])
        found, qa = [], []
        if row["status"] == "ok":
            raw, raw_qa = json.loads(row["dialogues"]), json.loads(row["qa"] or "[]")
            cache.put(row["key"], row["id"], acfg.model, raw, raw_qa)
            found = [Dialogue.model_validate(d) for d in raw]
            qa = [QA.model_validate(p) for p in raw_qa]
            stats["items_ok"] += 1
        else:
            failures.append(Failure(row["id"], "dialogue", row["error"], row["requests"]))
            stats["items_failed"] += 1
        finish(by_id[row["id"]], found, qa)
    llm_wall = time.perf_counter() - llm_start if todo else 0.0

    order = {item.id: i for i, item in enumerate(items)}  # output in input order, not arrival
    conversations = [c for item in items for c in trees[item.id]]
    failures.sort(key=lambda f: (order[f.knowledge_id], f.stage))
    paths = {"conversations": run_dir.conversations, "failures": run_dir.failures,
             "cache": cache.root, "summary": run_dir.augment_summary}
    write_parquet(conversations, paths["conversations"], Conversation)
    _write_failures(failures, paths["failures"])
    summary = {
        "items": len(items),
        "conversations": len(conversations),
        "conversations_by_task": dict(Counter(c.task for c in conversations)),
        "near_duplicates_removed": stats["near_duplicates_removed"],
        "generators": generators,
        "conversations_by_generator": dict(Counter(c.id.rsplit("/", 2)[-2] for c in conversations)),
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "self": {"items": len(self_outcomes), "items_cached": stats["self_items_cached"],
                 "candidates_parsed": sum(len(o.kept) + len(o.rejected)
                                          for o in self_outcomes.values()),
                 "kept": sum(len(o.kept) for o in self_outcomes.values()),
                 "wall_s": round(stats["self_wall_s"], 3)},
        "llm": {"enabled": use_llm, "model": acfg.model if use_llm else None,
                "prompt_version": PROMPT_VERSION, "wall_s": round(llm_wall, 3),
                "items_requested": len(todo),
                **{k: stats[k] for k in ("items_cached", "items_ok", "items_failed", "retries")}},
        "requests": stats["requests"],
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "failures": len(failures),
        "failures_by_stage": dict(Counter(f.stage for f in failures)),
        "longer_than_max_length": too_long,
        "wall_s": round(time.perf_counter() - start, 3),
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    atomic_write(paths["summary"], json.dumps(summary, indent=2).encode())
    if progress:
        tasks = ", ".join(f"{k} {v}" for k, v in sorted(summary["conversations_by_task"].items()))
        print(f"kore augment: {len(items)} items -> {len(conversations)} conversations ({tasks}); "
              f"{summary['rejected']} generated pairs rejected, {len(failures)} failures recorded, "
              f"{summary['wall_s']:.0f} s", flush=True)
    return summary
