"""`kore train`: the driver. Plans the data, starts Ray Train V2, exports the result.

Run directory:
  reads   init/<method>/                       `kore init`
          augmented/conversations.parquet      `kore augment`
  writes  checkpoints/<run name>/              Ray Train storage: step_NNNNNN/ checkpoints
          train/<method>/run.json              the settings the checkpoints belong to
          train/<method>/metrics.jsonl         per step: loss, lr, tokens/s, ... (rank 0)
          adapter/<method>/                    plain LoRA for the unmodified base (`full`: the
                                               whole model), via export_stage.export_trained

Resume. The run name is stable (`train.run_name`, default "<run_dir name>-<method>"), so Ray
Train finds its earlier checkpoints in the same storage: a restarted worker group
(`train.max_failures`) and a second `run_train` on the same run directory (the driver died)
both continue from the latest checkpoint. A checkpoint counts once Ray Train's controller has
recorded it (it polls the workers every 2 s): a worker that dies within that window after
reporting resumes from the checkpoint before, and retrains the steps since (metrics.jsonl
keeps each step once). run.json refuses a resume with settings that would change the
trajectory (data, init, batch, schedule, ...); the worker count is not one of them.

Scale. Workers are DDP replicas (gloo on CPU, nccl on GPU) unless `train.strategy: fsdp`
(GPU only). Memory per GPU for a 7B decoder in bfloat16 (weights 13.5 GB), before activations:
  KORE/LoRA, DDP:   13.5 GB weights + adapter (fp32 weights, grads, 2 Adam moments: 16 bytes
                    per trainable parameter; KORE r=235 on all linears of a 7B is ~0.3 B
                    parameters, 5 GB), so ~19 GB: fits one 40 GB GPU per worker.
  full, DDP:        weights + grads + 2 Adam moments, all bf16: 4 x 13.5 = 54 GB: does not fit
                    40 GB, and barely 80 GB.
  full, FSDP on N:  54 / N GB (8 GPUs: ~7 GB) plus one decoder layer's all-gathered weights.
  KORE/LoRA, FSDP:  (13.5 + 5) / N GB; worth it from ~13B, or to free memory for longer
                    sequences.
Each worker loads the whole bfloat16 base onto its GPU before FSDP shards it (KORE's
re-residualisation needs the full weights), so one GPU must hold the base once: up to ~30B
on 80 GB. Activations grow with micro-batch x sequence length; `train.activation_checkpointing`
trades ~30% step time for most of them, `train.micro_batch_size` splits a worker's share.
bfloat16 base weights are used on GPU only. On CPU the weights stay float32 and `train.autocast`
(auto) computes in bfloat16 where the CPU has AMX or AVX512-BF16 kernels (1.8x faster steps
on paragraphs, none on short Q&A rows); elsewhere CPU bf16 is emulated and slower, so auto
keeps float32 there.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from kore_ray.config import PipelineConfig
from kore_ray.data.schemas import Conversation
from kore_ray.errors import InputError
from kore_ray.logs import train_logging
from kore_ray.run_dir import (
    DONE_RECORD,
    METRICS,
    RUN_RECORD,
    STAGE_RECORD,
    RunDir,
    is_current,
    read_record,
    run_name,
    write_record,
)
from kore_ray.train.checkpoint import checkpoint_step
from kore_ray.train.data import (
    is_vision_model,
    per_worker_batch,
    plan_schedule,
    rank_tables,
    read_conversations,
    shard_name,
    tokenize_block,
)
from kore_ray.train.export_stage import export_checkpoint
from kore_ray.train.loop import WorkerSpec, train_loop_per_worker


def _data_fingerprint(conversations: Sequence[Conversation]) -> str:
    h = hashlib.sha256()
    for conv in conversations:
        h.update(conv.model_dump_json(exclude_none=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


_RESUMABLE = {"num_workers", "cpus_per_worker", "micro_batch_size", "strategy",
              "activation_checkpointing", "checkpoint_every", "keep_checkpoints", "max_failures",
              "run_name"}


def _run_record(cfg: PipelineConfig, method: str, init: Path, conversations, steps: int) -> dict:
    return {
        "method": method,
        "model": cfg.model.name_or_path,
        "init": read_record(init / STAGE_RECORD),
        "data": _data_fingerprint(conversations),
        "steps": steps,
        # Every setting that changes the trained weights; the rest (workers, checkpointing,
        # run name) may change between a run and its resume.
        **cfg.train.model_dump(exclude=_RESUMABLE),
    }


def _claim(record_path: Path, storage: Path, record: dict) -> None:
    """Write run.json, or refuse to resume checkpoints that were made with other settings."""
    if storage.exists() and record_path.is_file():
        old = read_record(record_path) or {}
        changed = sorted(k for k in record.keys() | old.keys() if record.get(k) != old.get(k))
        if changed:
            raise InputError(
                f"{storage} holds checkpoints of this run made with other settings "
                f"({', '.join(changed)}); train in another run directory, set train.run_name, "
                f"or delete {storage} and {record_path.parent} to start over"
            )
    write_record(record_path, record)


@contextmanager
def _data_context(progress: bool):
    """Ordered execution (each shard's rows stay in step order), progress bars as asked."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, progress
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _shards(cfg: PipelineConfig, conversations, schedule, progress: bool) -> dict:
    """One materialised, tokenised dataset per rank.

    Tokenised in one Ray Data pass before training starts, so the tokenising tasks never
    compete with the training workers for CPUs; then cut at the ranks' boundaries (metadata
    only). Each worker streams its own shard.
    """
    import ray

    tables = rank_tables(conversations, schedule, cfg.train.num_workers)
    with _data_context(progress):
        ds = ray.data.from_arrow([block for rank in tables for block in rank])
        # Tasks, not an actor pool: a worker process keeps its tokeniser between blocks, and
        # Ray warns about every restartable pool actor on the console (ray#57733).
        ds = ds.map_batches(
            tokenize_block,
            fn_kwargs={"name_or_path": cfg.model.name_or_path, "max_length": cfg.train.max_length},
            batch_size=None,
            batch_format="pyarrow",
        )
        rows = schedule.size // cfg.train.num_workers
        bounds = [rows * k for k in range(1, cfg.train.num_workers)]
        parts = ds.split_at_indices(bounds) if bounds else [ds.materialize()]
    for part in parts:  # a worker's shard bar would redraw over its step lines, the real progress
        part.context.enable_progress_bars = False
    return {shard_name(k): part for k, part in enumerate(parts)}


def run_train(
    cfg: PipelineConfig,
    method: str | None = None,
    progress: bool = True,
    *,
    after_step: Callable[[int, int], None] | None = None,
) -> Path:
    """Train `method` from its init on the augmented conversations; return the adapter dir.

    Uses the Ray cluster that ray.train finds (RAY_ADDRESS / `ray job submit`, a running
    ray.init(), or a new local one). `after_step(step, rank)` runs on every worker after
    each step (and its checkpoint): instrumentation and fault injection.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not TorchTrainer.__module__.startswith("ray.train.v2"):
        raise InputError("kore train needs Ray Train V2: ray.train was imported with "
                         "RAY_TRAIN_V2_ENABLED=0; unset it")
    method = method or cfg.init.method
    cfg.check_servable([method])
    t = cfg.train
    if t.strategy == "fsdp" and not t.use_gpu:
        raise InputError("train.strategy=fsdp needs train.use_gpu=true (FSDP runs on GPUs only)")
    per_worker = per_worker_batch(t.batch_size, t.num_workers)
    run = RunDir(cfg.run_dir)
    init = run.init(method)
    if not (init / STAGE_RECORD).is_file():
        raise InputError(f"{init}: no initialisation for {method!r} (run `kore init` first)")
    vision = is_vision_model(cfg.model.name_or_path)
    conversations = read_conversations(run.conversations, vision)
    schedule = plan_schedule(len(conversations), t.batch_size, t.epochs, t.max_steps, t.seed)
    steps = schedule.shape[0]
    name = run_name(cfg.run_dir, method, t.run_name)
    storage = run.checkpoints.resolve()
    out = run.train(method)
    record = _run_record(cfg, method, init, conversations, steps)
    adapter = run.adapter(method)
    done_record = {**record, "run": name}  # another train.run_name is another run: train it
    if is_current(out / DONE_RECORD, done_record) and adapter.is_dir():
        print(f"kore train: {adapter} is up to date ({method}); skipping")
        return adapter
    _claim(out / RUN_RECORD, storage / name, record)
    dtype = "bfloat16" if t.use_gpu else "float32"
    if progress:
        print(f"kore train: {method}, {steps} steps of {t.batch_size} sequences "
              f"({len(conversations)} conversations) on {t.num_workers} worker(s), run {name!r}")

    spec = WorkerSpec(
        train=t,
        model=cfg.model.name_or_path,
        init_dir=str(init.resolve()),
        dtype=dtype,
        total_steps=steps,
        per_worker_batch=per_worker,
        micro_batch_size=min(t.micro_batch_size or per_worker, per_worker),
        metrics_path=str((out / METRICS).resolve()),
        rows_per_epoch=len(conversations),
        progress=progress,
        after_step=after_step,
    )
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            **({"logging_config": train_logging()} if train_logging() else {}),
        ),
        datasets=_shards(cfg, conversations, schedule, progress),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ordered),
    )
    start = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        if (done := checkpoint_step(directory)) != steps:
            raise RuntimeError(f"run {name!r} ended at step {done} of {steps}")
        adapter = export_checkpoint(cfg, method, directory, dtype=dtype)
    write_record(out / DONE_RECORD, done_record)  # after the export: the mark
    if progress:
        losses = [m["loss"] for m in run.train_metrics(method) if "loss" in m]
        trend = f" (loss {losses[0]:.3f} -> {losses[-1]:.3f})" if losses else ""
        print(f"kore train: {method} done: {steps} steps in {time.perf_counter() - start:.0f} s"
              f"{trend}; wrote {adapter}")
    return adapter
