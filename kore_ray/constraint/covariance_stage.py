"""The covariance stage on Ray: retention tasks stream to model actors; sums reduce exactly.

Shape of the job (a thin shell around the core's accumulator):

  driver: reads and validates the retention file with the tokenizer only, plans the
     micro-batches and groups them into tasks (`sequences_per_task`). One Ray task loads the
     model to learn its spec (fingerprint, target groups): the driver never holds weights
     or sums, only task tables, counts and manifests.
  actors (`num_actors`, a GPU each where present; partials.CovarianceActor): each keeps one
     float64 sum per target group across all the tasks it is given, and a task returns
     counts only. Every `flush_interval_s`, and when the work runs out, an actor writes its
     sums so far to `<run_dir>/covariance.partials/` (a "partial", cumulative: the driver
     deletes the one it supersedes).
  reducers (`num_reducers` Ray tasks, spread over nodes): each owns a shard of the target
     groups, balanced by d^2, adds each of its groups over every partial (and the `add_to`
     store) in float64 and writes the group's file straight into the new store. The driver
     writes the manifest last and renames the store into place.

So no process holds more than it must: an actor its model and its own sums, a reducer two
matrices of one group, the driver nothing the size of a matrix; the object store carries
task tables and counts, the sums go through the run directory (a shared filesystem on a
cluster). `passes` > 1 splits the groups over several passes of the data, for when one
actor cannot hold every group's sums (70B widths). docs/DESIGN.md has the memory model.

Why Ray core and not a Ray Data actor pool (as before): an actor that keeps sums across
tasks needs to be told to save them at intervals and at the end, and the driver must know
which tasks each saved partial holds to redo exactly the lost ones. Ray Data's map has no
end-of-stream call on an actor and no such record, so its actors had to return each task's
whole sums through the object store (22 GB per task at 7B widths).

Exactness: the micro-batches are fixed by the driver, so every actor count runs the same
float32 forward passes and only the float64 reduction order changes (relative error ~1e-16),
given the same kernels: same device type and thread count (a 1-CPU actor runs one thread;
more threads round float32 matmuls differently, ~1e-7 on Gemma 3 270M).
Fault tolerance: actors restart (max_restarts=-1) but their calls are not retried; each call
names the incarnation that ran it. A task counts once a partial that lists it is on disk;
when an incarnation dies, the tasks it summed but had not saved are queued again, and a
task lost three times is an error. The driver checks that the saved partials hold every
task exactly once before reducing.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kore_ray.config import CovarianceConfig, PipelineConfig
from kore_ray.constraint.partials import CovarianceActor, peak_rss_bytes, task_table
from kore_ray.constraint.retention import (
    RetentionItem,
    data_fingerprint,
    plan_batches,
    read_retention,
)
from kore_ray.constraint.store import (
    CovarianceStore,
    load_store,
    read_group,
    read_manifest,
    store_manifest,
    write_group,
    write_manifest,
)
from kore_ray.errors import InputError, ModelError
from kore_ray.models.loading import is_vision_language, load_model
from kore_ray.models.targets import TargetGroup, find_target_groups
from kore_ray.run_dir import MANIFEST, RunDir, atomic_directory, is_current, model_fingerprint

MAX_LOSSES = 3  # a task whose actor dies this often is an error (it may be what kills it)
ADDS_IN_FLIGHT = 2  # per actor: the next task is queued while one runs
RESTART_WAIT_S = 600  # a failed actor must be back within this (it may need a new node)


@dataclass(frozen=True)
class ModelSpec:
    """What one load of the model tells: the actors compute sums, the driver plans.

    Knowing the fingerprint before any actor starts lets a store for another model be
    refused at once, and lets each actor prove it loaded the same checkpoint.
    """

    name_or_path: str
    dtype: str
    fingerprint: str
    groups: tuple[TargetGroup, ...]
    modules: dict[str, dict[str, list[int]]]
    vision: bool
    image_token_id: int | None


def model_spec(name_or_path: str, dtype: str = "float32") -> ModelSpec:
    """The ModelSpec of a model (loads its weights; the stage runs this in a Ray task)."""
    model, _ = load_model(name_or_path, dtype)
    groups = tuple(find_target_groups(model))
    config = model.config
    return ModelSpec(
        name_or_path=str(name_or_path),
        dtype=dtype,
        fingerprint=model_fingerprint(model),
        groups=groups,
        modules={
            g.key: {m: list(model.get_submodule(m).weight.shape) for m in g.modules}
            for g in groups
        },
        vision=is_vision_language(config),
        image_token_id=getattr(config, "image_token_id", getattr(config, "image_token_index", None)),
    )


def remote_model_spec(name_or_path: str, dtype: str = "float32") -> ModelSpec:
    """model_spec in a one-CPU Ray task, so the driver's memory never holds the weights."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=1, max_calls=1)(model_spec)  # exits: memory freed
    return ray.get(task.remote(name_or_path, dtype))


def shard_groups(groups: Sequence[TargetGroup], n: int) -> list[list[TargetGroup]]:
    """`groups` in at most n shards of near-equal d^2 (bytes of sums), largest first."""
    shards: list[list[TargetGroup]] = [[] for _ in range(min(n, len(groups)))]
    loads = [0] * len(shards)
    for g in sorted(groups, key=lambda g: -g.in_features**2):
        i = loads.index(min(loads))
        shards[i].append(g)
        loads[i] += g.in_features**2
    return [s for s in shards if s]


def _use_gpu(cov: CovarianceConfig) -> bool:
    import ray

    if cov.use_gpu is not None:
        return cov.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def _log(message: str) -> None:
    print(f"kore covariance: {message}", file=sys.stderr, flush=True)


class _Progress:
    """Sequences done, tokens and tokens/s on stderr as tasks finish."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.start, self.tokens = time.perf_counter(), 0
        self.bar = tqdm(total=total, unit="seq", desc="covariance", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True)

    def update(self, sequences: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(sequences)

    def close(self) -> None:
        self.bar.close()


def _ready(actors: list, spec: ModelSpec) -> list[str]:
    """Wait for every actor to load its model; returns their incarnation ids."""
    import ray

    refs = [a.incarnation.remote() for a in actors]
    start = time.monotonic()
    while True:
        done, waiting = ray.wait(refs, num_returns=len(refs), timeout=60)
        if not waiting:
            break
        _log(f"{len(done)} of {len(refs)} actors ready after {time.monotonic() - start:.0f} s; "
             "waiting for the cluster to place the others")
    ids = []
    for inc, fingerprint in ray.get(refs):
        _check_model(fingerprint, spec)
        ids.append(inc)
    return ids


def _check_model(fingerprint: str, spec: ModelSpec) -> None:
    if fingerprint != spec.fingerprint:
        raise ModelError(
            f"an actor loaded {spec.name_or_path} as model {fingerprint}, not "
            f"{spec.fingerprint}: the checkpoint differs between nodes"
        )


class _Schedule:
    """Hands tasks to actors and keeps the books: which incarnation summed which task, and
    which tasks are saved in a partial on disk (`done`)."""

    def __init__(self, actors: list, ids: list[str], tables: list, sizes: list[int],
                 spec: ModelSpec, interval: float, bar: _Progress):
        self.actors, self.tables, self.sizes, self.spec = actors, tables, sizes, spec
        self.interval, self.bar = interval, bar
        self.queue = deque(range(len(tables)))
        self.done: set[int] = set()  # tasks in a saved partial
        self.latest: dict[str, dict] = {}  # incarnation -> its newest partial (cumulative)
        self.unsaved: dict[str, set[int]] = {}  # incarnation -> tasks summed, not yet saved
        self.seen = [{i} for i in ids]  # incarnations of each actor
        self.losses = [0] * len(tables)
        self.calls: dict = {}  # ref -> (actor, "add" | "flush", task)
        n = len(actors)
        self.adds, self.flushing, self.suspect = [0] * n, [False] * n, [False] * n
        self.since_flush, self.last_flush = [0] * n, [time.monotonic()] * n
        # Bytes through the object store: each add fetches its task's table (`sizes`), each
        # call's result comes back (the sums themselves go through the run directory).
        self.moved = 0

    def run(self) -> list[dict]:
        import ray

        while len(self.done) < len(self.tables):
            for depth in range(1, ADDS_IN_FLIGHT + 1):  # one task each first, then the next
                for a in range(len(self.actors)):
                    self._submit(a, depth)
            if not self.calls:
                raise RuntimeError("covariance: no work in flight but tasks are unsaved (a bug)")
            ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=5)
            for ref in ready:
                self._finish(ref)
        return list(self.latest.values())

    def _submit(self, a: int, depth: int) -> None:
        """Give actor `a` tasks until it has `depth` in flight, and a flush when one is due."""
        if self.suspect[a]:
            return
        actor = self.actors[a]
        while True:
            due = time.monotonic() - self.last_flush[a] >= self.interval or not self.queue
            if self.since_flush[a] and due and not self.flushing[a]:
                self.calls[actor.flush.remote()] = (a, "flush", None)
                self.flushing[a], self.since_flush[a] = True, 0
            if self.adds[a] >= depth or not self.queue:
                return
            task = self.queue.popleft()
            if task in self.done:  # saved by an actor whose call to add it had failed
                continue
            self.calls[actor.add.remote(task, self.tables[task])] = (a, "add", task)
            self.adds[a] += 1
            self.since_flush[a] += 1
            self.moved += self.sizes[task]

    def _finish(self, ref) -> None:
        import ray

        a, kind, task = self.calls.pop(ref)
        if kind == "add":
            self.adds[a] -= 1
        else:
            self.flushing[a] = False
            self.last_flush[a] = time.monotonic()
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if kind == "add":
                self._lost(task, e)
            self.suspect[a] = True
        else:
            self.moved += len(pickle.dumps(result))
            inc = result["incarnation"] if result else None
            if inc is not None:
                self.seen[a].add(inc)
            if kind == "add":
                self.unsaved.setdefault(inc, set()).add(task)
                self.bar.update(result["sequences"], result["tokens"])
            elif result is not None:  # a partial is on disk: its tasks count, whoever died since
                self.unsaved.get(inc, set()).difference_update(result["tasks"])
                self.done.update(result["tasks"])
                older = self.latest.get(inc)
                self.latest[inc] = result
                if older is not None:  # superseded: the new one holds all its tasks
                    shutil.rmtree(older["path"], ignore_errors=True)
        if self.suspect[a] and not any(c[0] == a for c in self.calls.values()):
            self._replace(a)

    def _lost(self, task: int, error: Exception) -> None:
        import ray

        self.losses[task] += 1
        if self.losses[task] >= MAX_LOSSES:
            ids = ray.get(self.tables[task]).column("ids").to_pylist()
            raise RuntimeError(
                f"covariance task {task} (first sequence {ids[0][0]!r}) lost its actor "
                f"{MAX_LOSSES} times; the last error: {error}"
            ) from error
        self.queue.appendleft(task)

    def _replace(self, a: int) -> None:
        """Actor `a` failed: wait for its restart, clear it, and redo what it had not saved."""
        import ray

        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                state = ray.get(self.actors[a].reset.remote())
                break
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        _check_model(state["fingerprint"], self.spec)
        # The unsaved tasks of every incarnation before the reset (their partials count).
        dead = self.seen[a] | {state["previous"]}
        lost = set().union(*(self.unsaved.pop(i, set()) for i in dead))
        lost = sorted(lost - self.done - set(self.queue))  # a failed call's task is queued already
        _log(f"actor {a} failed and was restarted; redoing {len(lost)} unsaved task(s)")
        for task in lost:
            self._lost(task, RuntimeError("its actor died before saving it"))
        inc = state["incarnation"]
        self.seen[a], self.suspect[a] = {inc}, False
        self.last_flush[a], self.since_flush[a] = time.monotonic(), 0


def _check_partials(partials: list[dict], n_tasks: int) -> None:
    """Every task in exactly one saved partial: the exactness guarantee, checked."""
    tasks = sorted(t for p in partials for t in p["tasks"])
    if tasks != list(range(n_tasks)):
        raise RuntimeError(f"covariance partials hold tasks {tasks}, not each of {n_tasks} once")


def run_pass(
    tables: list, sizes: list[int], spec: ModelSpec, keys: Sequence[str], cov: CovarianceConfig,
    partials_dir: str, bar: _Progress,
) -> list[dict]:
    """Sum target groups `keys` over every task (`tables`: object refs, `sizes`: their
    pickled bytes) on `cov.num_actors` actors; returns the
    flush results (path, tasks, incarnation, peak_rss; the pass's ready_s and done_s) of the
    partials written."""
    import ray

    use_gpu = _use_gpu(cov)
    Actor = ray.remote(CovarianceActor).options(
        num_cpus=1, num_gpus=cov.gpus_per_actor if use_gpu else 0, max_restarts=-1,
        max_task_retries=0,
    )
    device = ("auto" if cov.gpus_per_actor > 1 else "cuda") if use_gpu else "cpu"
    actors = [
        Actor.remote(spec, list(keys), cov.normalize, cov.max_length,
                     device, partials_dir)
        for _ in range(cov.num_actors)
    ]
    try:
        start = time.perf_counter()
        schedule = _Schedule(actors, _ready(actors, spec), tables, sizes, spec,
                             cov.flush_interval_s, bar)
        ready = time.perf_counter()
        partials = schedule.run()
        for p in partials:  # when the actors were up, when the work was done, bytes moved
            p.update(ready_s=ready - start, done_s=time.perf_counter() - start,
                     pass_moved_bytes=schedule.moved)
    finally:
        for actor in actors:  # free their memory before the reducers run
            ray.kill(actor)
    _check_partials(partials, len(tables))
    return partials


def reduce_groups(groups: dict[str, tuple[int, list[str]]], base_dir: str | None, out_dir: str) -> dict:
    """Write each group's sum over its partials (plus `base_dir`'s) into `out_dir`.

    groups: key -> (width, the partial directories holding it). One group at a time in
    float64: the running sum and one partial in memory.
    """
    for key, (d, partial_dirs) in groups.items():
        total = read_group(base_dir, key, d) if base_dir else None
        for path in partial_dirs:
            part = read_group(path, key, d)
            total = part if total is None else total.add_(part)
            del part
        write_group(out_dir, key, total)
        del total
    return {"peak_rss": peak_rss_bytes(), "pid": os.getpid(), "groups": list(groups)}


def reduce_store(
    partials: list[dict], spec: ModelSpec, cov: CovarianceConfig, base_dir: str | None,
    data_fingerprints: Sequence[str], out_dir,
) -> list[dict]:
    """Reduce the partials into the store at `out_dir` (atomically); returns reducer stats."""
    import ray

    manifests = [read_manifest(p["path"], spec.fingerprint) for p in partials]
    holders = {g.key: [p["path"] for p, m in zip(partials, manifests) if g.key in m["groups"]]
               for g in spec.groups}
    base = read_manifest(base_dir, spec.fingerprint) if base_dir else None
    if base is not None and base["groups"].keys() != holders.keys():
        raise InputError(f"covariance store {base_dir} covers other target groups than this model's")
    tokens = {k: sum(m["groups"][k]["tokens"] for m in manifests if k in m["groups"])
              for k in holders}
    # Each pass sums every sequence once: its partials' sample counts add up to the total.
    by_pass: dict[tuple, int] = {}
    for m in manifests:
        groups = tuple(sorted(m["groups"]))
        by_pass[groups] = by_pass.get(groups, 0) + m["samples"]
    if len(set(by_pass.values())) != 1:
        raise RuntimeError(f"covariance passes saw different numbers of sequences: {by_pass}")
    samples = next(iter(by_pass.values()))
    if base is not None:
        samples += base["samples"]
        tokens = {k: t + base["groups"][k]["tokens"] for k, t in tokens.items()}
    # max_calls=1: each reducer's process exits when done, returning its memory at once.
    reduce = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=2,
                        max_calls=1)(reduce_groups)
    shards = shard_groups(spec.groups, cov.num_reducers)
    with atomic_directory(out_dir) as tmp:
        stats = ray.get([
            reduce.remote({g.key: (g.in_features, holders[g.key]) for g in shard}, base_dir, str(tmp))
            for shard in shards
        ])
        write_manifest(tmp, store_manifest(spec.fingerprint, cov.normalize, samples, tokens,
                                           spec.modules, data_fingerprints))
    return stats


def collect_distributed(
    batches: Sequence[Sequence[RetentionItem]],
    spec: ModelSpec,
    cov: CovarianceConfig,
    out_dir,
    partials_dir,
    data_fingerprints: Sequence[str] = (),
    base_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Collect the store of `batches` (micro-batches) into `out_dir`; returns run statistics.

    Needs a running Ray (ray.init). `base_dir` is a store to add to (read, never changed).
    """
    import ray

    if not batches:
        raise InputError("no retention data to collect a covariance from")
    per_task = max(1, cov.sequences_per_task // cov.batch_size)  # micro-batches per task
    local = [task_table(batches[i : i + per_task]) for i in range(0, len(batches), per_task)]
    sizes = [len(pickle.dumps(t)) for t in local]
    tables = [ray.put(t) for t in local]
    del local
    shutil.rmtree(partials_dir, ignore_errors=True)  # a crashed run's partials are not ours
    passes = shard_groups(spec.groups, cov.passes)
    bar = _Progress(sum(len(b) for b in batches) * len(passes), progress)
    partials = []
    try:
        for groups in passes:
            partials += run_pass(tables, sizes, spec, [g.key for g in groups], cov,
                                 str(partials_dir), bar)
    finally:
        bar.close()
    reducers = reduce_store(partials, spec, cov, base_dir, data_fingerprints, out_dir)
    shutil.rmtree(partials_dir, ignore_errors=True)
    return {"tasks": len(tables), "partials": partials, "reducers": reducers}


def _layers(groups: Sequence[TargetGroup]) -> int:
    """How many decoder layers the groups sit in (the first number in each key)."""
    return len({m.group(0) for g in groups if (m := re.search(r"\.\d+\.", g.key))}) or 1


def run_covariance(
    cfg: PipelineConfig, add_to: str | None = None, force: bool = False, progress: bool = True
) -> CovarianceStore:
    """Collect the covariance of `cfg.data.retention` on Ray into `<run_dir>/covariance/`.

    `add_to` (default `cfg.covariance.add_to`) names an existing store of the same model:
    the result is that store plus this data (how a second injection keeps protecting the
    first); the old store is read, never modified. A store already in the run directory made
    from the same model, data and settings is returned without recomputing unless `force`.
    Uses the running Ray, else the cluster at RAY_ADDRESS, else starts a local one.
    Returns the store as on disk (its sums are read group by group when used).
    """
    import ray

    from kore_ray.train.data import load_preprocessor

    cov = cfg.covariance
    add_to = add_to or cov.add_to
    if cfg.data.retention is None:
        raise InputError("no retention data: set data.retention (probes, conversations, .txt)")
    run = RunDir(cfg.run_dir)
    out_dir = run.covariance
    tokenizer, vision = load_preprocessor(cfg.model.name_or_path)
    items = read_retention(cfg.data.retention, tokenizer, vision)
    fingerprint = data_fingerprint(items, cov.max_length)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # set for `ray job submit` drivers
            ray.init()
        else:  # a local Ray: room for the spec task and every model actor
            ray.init(num_cpus=max(os.cpu_count() or 1, cov.num_actors, cov.num_reducers))
    spec = remote_model_spec(cfg.model.name_or_path, cfg.model.dtype)
    base = read_manifest(add_to, expected_fingerprint=spec.fingerprint) if add_to else None
    old = tuple(base["data_fingerprints"]) if base is not None else ()
    if fingerprint in old:
        raise InputError(
            f"covariance store {add_to} already holds this retention data ({fingerprint}); "
            "adding it again would count it twice"
        )
    wanted = old + (fingerprint,)
    made_from = {"model_fingerprint": spec.fingerprint, "normalize": cov.normalize,
                 "data_fingerprints": list(wanted)}
    if not force and is_current(out_dir / MANIFEST, made_from):
        _log(f"{out_dir} already holds this data for this model; skipping (--force recomputes)")
        return load_store(out_dir, expected_fingerprint=spec.fingerprint)

    start = time.perf_counter()
    batches = plan_batches(items, cov.batch_size)
    stats = collect_distributed(batches, spec, cov, out_dir, run.covariance_partials, wanted,
                                add_to, progress)
    elapsed = time.perf_counter() - start
    store = load_store(out_dir, expected_fingerprint=spec.fingerprint)
    n_tokens = store.tokens[spec.groups[0].key] - (base["groups"][spec.groups[0].key]["tokens"]
                                                   if base is not None else 0)
    _log(
        f"{n_tokens:,} tokens from {len(items):,} sequences in {elapsed:.1f} s "
        f"({n_tokens / elapsed:,.0f} tokens/s) on {cov.num_actors} actor(s), "
        f"{len(stats['partials'])} partial(s), {len(spec.groups)} target groups in "
        f"{_layers(spec.groups)} layers -> {out_dir}"
    )
    return store
