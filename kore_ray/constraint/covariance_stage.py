"""The covariance stage on Ray Data: retention batches stream to model actors; sums reduce exactly.

Shape of the job (a thin shell around the core's `collect_covariance`):

  driver: read + validate the retention file, render texts, plan micro-batches
     -> Ray Data rows, one micro-batch each
     -> CPU actors tokenise (text models; a VLM's processor runs in the model actors,
        where the images are opened)
     -> model actors (ActorPoolStrategy, a GPU each where present): a task's rows run through
        `collect_covariance` and the task returns its partial sums ONCE, one row per target
        group (float64, upper triangle), plus token and sequence counts
     -> driver: adds the partial sums into float64 running sums as they stream in, writes
        the store atomically.

Exactness: the micro-batches are fixed by the driver, so every actor count runs the same
float32 forward passes and only the float64 reduction order changes (relative error ~1e-16),
given the same kernels: same device type and thread count (a 1-CPU actor runs one thread;
more threads round float32 matmuls differently, ~1e-7 on Gemma 3 270M).
Fault tolerance: an actor's call returns its partial sums only when it has finished, and Ray
Data's actor pool restarts dead actors and re-runs their unfinished tasks (max_restarts=-1,
max_task_retries=-1 by default), so a killed actor neither loses nor double-counts data. Each
input block is one task's micro-batches, so a task is normally one call; where Ray splits a
task into several calls, a retry replays them in the same order and Ray keeps the outputs
it already had (streaming-generator replay), which is exact because each call's output
depends only on its input.

Object-store traffic is one d x d triangle per group per task: size `sequences_per_task` so a
task runs for minutes at scale (a 7B Llama's packed partial sums are ~22 GB per task).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kore_ray.config import CovarianceConfig, PipelineConfig
from kore_ray.constraint.covariance import collect_covariance
from kore_ray.constraint.retention import (
    RetentionItem,
    data_fingerprint,
    pack_upper,
    plan_batches,
    read_retention,
    text_inputs,
    tokenize_texts,
    unpack_upper,
    vlm_inputs,
)
from kore_ray.constraint.store import CovarianceStore, load_store, save_store
from kore_ray.data.tokenize import pad_token_id
from kore_ray.errors import InputError, ModelError
from kore_ray.models.loading import is_vision_language, load_model
from kore_ray.models.targets import TargetGroup, find_target_groups
from kore_ray.run_dir import MANIFEST, RunDir, is_current, model_fingerprint


@dataclass(frozen=True)
class ModelSpec:
    """What the driver learns from one CPU load of the model: the actors only compute sums.

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


def model_spec(name_or_path: str, dtype: str = "float32"):
    """(ModelSpec, tokenizer or processor) of a model; its weights are dropped again."""
    model, tokenizer = load_model(name_or_path, dtype)
    groups = tuple(find_target_groups(model))
    config = model.config
    spec = ModelSpec(
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
    return spec, tokenizer


class Tokenize:
    """CPU stage: the texts of each micro-batch -> token ids (padding is left to the model actor)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, table: pa.Table) -> pa.Table:
        ids = [
            tokenize_texts(self.tokenizer, texts, self.max_length)
            for texts in table.column("texts").to_pylist()
        ]
        return pa.table({
            "ids": table.column("ids"),
            "input_ids": pa.array(ids, type=pa.list_(pa.list_(pa.int32()))),
        })


class CovarianceWorker:
    """A model replica: each call sums one task's micro-batches and returns them as one table.

    The sums live only for the call, so a call that dies takes nothing with it but its own
    work, which Ray Data re-runs on a restarted actor.
    """

    def __init__(self, spec: ModelSpec, normalize: str, max_length: int, device: str):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one weight-loading bar per actor restart is noise
        self.spec, self.normalize, self.max_length = spec, normalize, max_length
        self.model, self.processor = load_model(spec.name_or_path, spec.dtype, device)
        self.pad_id = pad_token_id(self.processor)

    def _batches(self, table: pa.Table):
        if "input_ids" in table.column_names:
            for ids in table.column("input_ids").to_pylist():
                yield text_inputs(ids, self.pad_id)
        else:
            for row in table.to_pylist():
                yield vlm_inputs(
                    self.processor, row["texts"], row["images"], row["ids"], self.max_length,
                    self.spec.image_token_id,
                )

    def __call__(self, table: pa.Table) -> pa.Table:
        store = collect_covariance(
            self.model, self._batches(table), list(self.spec.groups), self.normalize
        )
        if store.model_fingerprint != self.spec.fingerprint:
            raise ModelError(
                f"an actor loaded {self.spec.name_or_path} as model {store.model_fingerprint}, "
                f"not the driver's {self.spec.fingerprint}: the checkpoint differs between nodes"
            )
        return partials_table(store, [g.key for g in self.spec.groups])


def partials_table(store: CovarianceStore, keys: Sequence[str]) -> pa.Table:
    """One row per group: its packed float64 sum, token count and the call's sequence count."""
    sizes = [store.sums[k].shape[0] * (store.sums[k].shape[0] + 1) // 2 for k in keys]
    offsets = np.cumsum([0, *sizes], dtype=np.int64)
    values = np.empty(offsets[-1], dtype=np.float64)
    for k, start, stop in zip(keys, offsets[:-1], offsets[1:]):
        pack_upper(store.sums[k], out=values[start:stop])
    return pa.table({
        "group": pa.array(list(keys), pa.string()),
        "sum": pa.LargeListArray.from_arrays(offsets, values),
        "tokens": pa.array([store.tokens[k] for k in keys], pa.int64()),
        "samples": pa.array([store.samples] * len(keys), pa.int64()),
    })


def batch_table(batches: Sequence[Sequence[RetentionItem]]) -> pa.Table:
    """One row per micro-batch, so Ray Data can never split a micro-batch between tasks."""
    return pa.table({
        "ids": pa.array([[i.id for i in b] for b in batches], pa.list_(pa.string())),
        "texts": pa.array([[i.text for i in b] for b in batches], pa.list_(pa.string())),
        "images": pa.array([[i.image for i in b] for b in batches], pa.list_(pa.string())),
    })


def _use_gpu(cov: CovarianceConfig) -> bool:
    import ray

    if cov.use_gpu is not None:
        return cov.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


class _Progress:
    """Sequences done, tokens and tokens/s on stderr as partial sums arrive."""

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


def reduce_partials(
    tables: Iterable[pa.Table], spec: ModelSpec, progress: _Progress | None = None
) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Add streamed partial-sum tables into float64 running sums per group.

    Returns (packed sums, tokens per group, sequences). Every group must have seen the same
    sequences: a mismatch means lost or duplicated rows, and is an error, not a warning.
    """
    sums: dict[str, np.ndarray] = {}
    tokens = {g.key: 0 for g in spec.groups}
    samples = dict.fromkeys(tokens, 0)
    first = spec.groups[0].key
    for table in tables:
        rows = zip(
            table.column("group").to_pylist(),
            (row for chunk in table.column("sum").chunks for row in chunk),
            table.column("tokens").to_pylist(),
            table.column("samples").to_pylist(),
        )
        for key, packed, n_tokens, n_samples in rows:
            values = packed.values.to_numpy()
            if key in sums:
                sums[key] += values
            else:
                sums[key] = values.astype(np.float64, copy=True)
            tokens[key] += n_tokens
            samples[key] += n_samples
            if progress is not None and key == first:
                progress.update(n_samples, n_tokens)
    missing = sorted(set(tokens) - set(sums))
    if missing:
        raise InputError(f"no partial sums arrived for target groups {missing}")
    if len(set(samples.values())) != 1:
        raise RuntimeError(f"target groups saw different numbers of sequences: {samples}")
    return sums, tokens, samples[first]


def collect_distributed(
    batches: Sequence[Sequence[RetentionItem]],
    spec: ModelSpec,
    tokenizer,
    cov: CovarianceConfig,
    data_fingerprint: str | None = None,
    progress: bool = True,
) -> CovarianceStore:
    """The covariance store of `batches` (micro-batches) computed by `cov.num_actors` actors.

    Needs a running Ray (ray.init).
    """
    from ray.data import DataContext

    if not batches:
        raise InputError("no retention data to collect a covariance from")
    use_gpu = _use_gpu(cov)
    context = DataContext.get_current()  # datasets copy it when created: set it first
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # ours reports tokens/s; Ray's would interleave
    bar = _Progress(sum(len(b) for b in batches), progress)
    try:
        ds = covariance_dataset(batches, spec, tokenizer, cov, use_gpu)
        outputs = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        sums, tokens, samples = reduce_partials(outputs, spec, bar)
    finally:
        bar.close()
        context.enable_progress_bars = bars
    return CovarianceStore(
        # pop: each packed sum is freed as its full matrix is made (peak 1.5x the store, not 2x)
        sums={g.key: unpack_upper(sums.pop(g.key), g.in_features) for g in spec.groups},
        tokens=tokens,
        samples=samples,
        model_fingerprint=spec.fingerprint,
        normalize=cov.normalize,
        modules=spec.modules,
        data_fingerprints=(data_fingerprint,) if data_fingerprint else (),
    )


def covariance_dataset(
    batches: Sequence[Sequence[RetentionItem]],
    spec: ModelSpec,
    tokenizer,
    cov: CovarianceConfig,
    use_gpu: bool = False,
):
    """The Ray Dataset of partial sums: rows in are micro-batches, blocks in are tasks.

    Each output row is one target group's packed partial sum from one actor call
    (see partials_table); `reduce_partials` adds them up.
    """
    import ray
    from ray.data import ActorPoolStrategy

    per_task = max(1, cov.sequences_per_task // cov.batch_size)  # micro-batches per task
    ds = ray.data.from_arrow(
        [batch_table(batches[i : i + per_task]) for i in range(0, len(batches), per_task)]
    )
    if not spec.vision:
        ds = ds.map_batches(
            Tokenize,
            fn_constructor_kwargs={"tokenizer": tokenizer, "max_length": cov.max_length},
            batch_size=None,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=cov.num_actors),
        )
    return ds.map_batches(
        CovarianceWorker,
        fn_constructor_kwargs={
            "spec": spec,
            "normalize": cov.normalize,
            "max_length": cov.max_length,
            "device": "cuda" if use_gpu else "cpu",
        },
        batch_size=per_task,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cov.num_actors),
        num_gpus=1 if use_gpu else 0,
    )


def _log(message: str) -> None:
    print(f"kore covariance: {message}", file=sys.stderr, flush=True)


def run_covariance(
    cfg: PipelineConfig, add_to: str | None = None, force: bool = False, progress: bool = True
) -> CovarianceStore:
    """Collect the covariance of `cfg.data.retention` on Ray into `<run_dir>/covariance/`.

    `add_to` (default `cfg.covariance.add_to`) names an existing store of the same model:
    the result is that store plus this data (how a second injection keeps protecting the
    first); the old store is read, never modified. A store already in the run directory made
    from the same model, data and settings is returned without recomputing unless `force`.
    Uses the running Ray, else the cluster at RAY_ADDRESS, else starts a local one.
    """
    import ray

    cov = cfg.covariance
    add_to = add_to or cov.add_to
    if cfg.data.retention is None:
        raise InputError("no retention data: set data.retention (probes, conversations, .txt)")
    out_dir = RunDir(cfg.run_dir).covariance
    spec, tokenizer = model_spec(cfg.model.name_or_path, cfg.model.dtype)
    items = read_retention(cfg.data.retention, tokenizer, spec.vision)
    fingerprint = data_fingerprint(items, cov.max_length)
    base = load_store(add_to, expected_fingerprint=spec.fingerprint) if add_to else None
    if base is not None and fingerprint in base.data_fingerprints:
        raise InputError(
            f"covariance store {add_to} already holds this retention data ({fingerprint}); "
            "adding it again would count it twice"
        )
    wanted = (base.data_fingerprints if base is not None else ()) + (fingerprint,)
    made_from = {"model_fingerprint": spec.fingerprint, "normalize": cov.normalize,
                 "data_fingerprints": list(wanted)}
    if not force and is_current(out_dir / MANIFEST, made_from):
        _log(f"{out_dir} already holds this data for this model; skipping (--force recomputes)")
        return load_store(out_dir, expected_fingerprint=spec.fingerprint)

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # set for `ray job submit` drivers
            ray.init()
        else:  # a local Ray: room for the tokeniser actor beside every model actor
            ray.init(num_cpus=max(os.cpu_count() or 1, cov.num_actors + 1))
    start = time.perf_counter()
    batches = plan_batches(items, cov.batch_size)
    store = collect_distributed(batches, spec, tokenizer, cov, fingerprint, progress)
    elapsed = time.perf_counter() - start
    n_tokens = store.tokens[spec.groups[0].key]
    if base is not None:
        store = base + store
    save_store(out_dir, store)
    _log(
        f"{n_tokens:,} tokens from {len(items):,} sequences in {elapsed:.1f} s "
        f"({n_tokens / elapsed:,.0f} tokens/s) on {cov.num_actors} actor(s) -> {out_dir}"
    )
    return store
