"""The per-worker training recipe (Ray Train V2), top to bottom:

1. load the base model onto the worker's device (bfloat16 on GPU, float32 on CPU) and the
   method's trainable model from its init directory (`load_trainable`: KORE re-residualised
   on the unmodified base);
2. restore the trainable weights from the latest checkpoint, if any (before wrapping, so DDP's
   broadcast and FSDP's sharding start from them);
3. wrap for DDP or FSDP (`prepare_model`), build AdamW over the trainable parameters and the
   LR schedule, restore their state;
4. for each step of this rank's shard: `train_step` (global-batch loss normalisation),
   one metrics line from rank 0, a checkpoint through `ray.train.report` every N steps and at
   the last step.

A restarted worker group (a worker died; FailureConfig) and a restarted driver (same run name)
both land here with `ray.train.get_checkpoint()` set and continue from its step.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from kore_ray.config import TrainConfig
from kore_ray.constraint.init_stage import load_trainable
from kore_ray.data.tokenize import pad_token_id
from kore_ray.errors import ModelError
from kore_ray.models.loading import is_vision_language, load_model
from kore_ray.train.checkpoint import (
    gather_state,
    load_optimizer_state,
    load_weights,
    read_train_state,
    read_weights,
    trainable_names,
    write_checkpoint,
)
from kore_ray.train.data import Collate, shard_name
from kore_ray.train.steps import autocast_dtype, build_optimizer, build_scheduler, train_step


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs: the validated train config itself, and what the driver derived."""

    train: TrainConfig
    model: str
    init_dir: str
    dtype: str  # of the base weights
    total_steps: int
    per_worker_batch: int
    micro_batch_size: int
    metrics_path: str
    rows_per_epoch: int  # conversations: the metrics' epoch = step * batch / this
    progress: bool
    # Called on every rank as after_step(step, rank) once a step (and its checkpoint) is done;
    # for instrumentation and fault-injection tests.
    after_step: Callable[[int, int], None] | None = None


class MetricsLog:
    """Rank 0's metrics.jsonl, one JSON line per step.

    A (re)start first drops the lines of steps after its checkpoint (they are about to be
    trained again), so after any number of restarts the file holds each step once, as trained.
    """

    def __init__(self, path: str | Path, keep_through: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def fsdp_kwargs(model: torch.nn.Module) -> dict:
    """FSDP (v1, as ray.train.torch.prepare_model builds it): one unit per decoder layer.

    use_orig_params lets frozen base weights and trainable adapters share a flat parameter;
    the decoder layer classes come from the model's own `_no_split_modules`.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not layers:
        raise ModelError("FSDP needs the model's decoder layer classes (_no_split_modules)")
    return {
        "auto_wrap_policy": partial(transformer_auto_wrap_policy, transformer_layer_cls=layers),
        "use_orig_params": True,
        "limit_all_gathers": True,
    }


def _say(line: str) -> None:
    """One progress line to the worker's real stdout (Ray forwards it to the driver). A plain
    print is patched by Ray Train to go to its logger and, because Ray wraps sys.stdout, to
    stdout as well: every line reached the terminal twice."""
    print(line, file=sys.__stdout__, flush=True)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Floating inputs (pixel values) take the model's dtype; ids and masks keep theirs."""
    return {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()}


def _report(model, optimizer, scheduler, names, step: int, record: dict, rank: int) -> None:
    weights, optimizer_state = gather_state(model, optimizer, names)
    with tempfile.TemporaryDirectory(prefix="kore-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            write_checkpoint(tmp, weights, optimizer_state, scheduler, step, record)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(record, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:06d}")


def train_loop_per_worker(config: dict) -> None:
    spec: WorkerSpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(spec.train.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(spec.train.cpus_per_worker)

    # Straight onto the device: KORE's re-residualisation (W - B0 A0) then runs on the GPU.
    model, preprocessor = load_model(spec.model, spec.dtype, device=str(device))
    vision = is_vision_language(model.config)
    # FSDP shards W_res and B: no whole merged weight to form, so PEFT's own forward.
    model = load_trainable(model, spec.init_dir, merged_forward=spec.train.strategy != "fsdp")
    if spec.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    checkpoint, state, start = ray.train.get_checkpoint(), None, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_weights(model, read_weights(directory))
            state = read_train_state(directory)
        start = state["step"]
    names = trainable_names(model)
    model.train()
    model = ray.train.torch.prepare_model(
        model,
        parallel_strategy=spec.train.strategy,
        parallel_strategy_kwargs=fsdp_kwargs(model) if spec.train.strategy == "fsdp" else None,
    )
    optimizer = build_optimizer(model, spec.train.learning_rate, spec.train.weight_decay)
    scheduler = build_scheduler(optimizer, spec.total_steps, spec.train.warmup_steps, spec.train.lr_schedule)
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if start >= spec.total_steps:
        return

    log = MetricsLog(spec.metrics_path, keep_through=start) if rank == 0 else None
    collate = Collate(preprocessor, vision, pad_token_id(preprocessor), spec.train.max_length,
                      spec.micro_batch_size, skip_before=start, packed=spec.train.packing)
    batches = ray.train.get_dataset_shard(shard_name(rank)).iter_torch_batches(
        batch_size=spec.per_worker_batch, collate_fn=collate, prefetch_batches=2
    )
    reduce = _all_reduce if world > 1 else (lambda t: t)
    dtype = getattr(torch, spec.dtype)
    amp = autocast_dtype(spec.train.autocast, device)
    if rank == 0 and spec.progress and amp is not None:
        _say(f"kore train: {str(amp).removeprefix('torch.')} autocast on {device.type}")
    every_print = max(1, spec.total_steps // 20)
    step, clock, cpu_clock = start, time.perf_counter(), time.process_time()
    for batch in batches:
        if batch.step < start:
            continue
        if batch.step != step:
            raise RuntimeError(f"rank {rank}: expected step {step}, the shard gave {batch.step}")
        stats = train_step(
            model, optimizer, scheduler,
            [_to_device(mb, device, dtype) for mb in batch.micro_batches],
            world_size=world, all_reduce=reduce, max_grad_norm=spec.train.max_grad_norm, autocast=amp,
        )
        step += 1
        now, cpu_now = time.perf_counter(), time.process_time()
        seconds, cpu_seconds, clock, cpu_clock = now - clock, cpu_now - cpu_clock, now, cpu_now
        record = {
            "step": step,
            "epoch": round(step * spec.train.batch_size / spec.rows_per_epoch, 4),
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens": stats.tokens,
            "loss_tokens": stats.loss_tokens,
            "step_s": round(seconds, 4),
            "cpu_s": round(cpu_seconds, 4),  # this process (all threads): compute, not waiting
            "tokens_per_s": round(stats.tokens / seconds, 1),
            "time": time.time(),
        }
        if log is not None:
            log.write(record)
            if spec.progress and (step % every_print == 0 or step == spec.total_steps):
                _say(f"kore train: step {step}/{spec.total_steps} loss {stats.loss:.4f} "
                     f"lr {stats.lr:.2e} {record['tokens_per_s']:,.0f} tokens/s")
        if step % spec.train.checkpoint_every == 0 or step == spec.total_steps:
            _report(model, optimizer, scheduler, names, step, record, rank)
        if spec.after_step is not None:
            spec.after_step(step, rank)
    if step != spec.total_steps:
        raise RuntimeError(f"rank {rank}: its shard ended at step {step} of {spec.total_steps}")
