"""One optimisation step in plain torch: loss, optimizer, schedule, step. No Ray, no process group.

The loss is the mean next-token cross-entropy over the assistant tokens of the GLOBAL batch.
Each worker sums the losses of its own tokens and divides by the global count of assistant
tokens (summed across workers before the forward pass). DDP then AVERAGES gradients over the
W workers, so each worker scales its loss by W: the averaged gradient is exactly the gradient
of the global mean, however the global batch is split into workers and micro-batches. That is
what makes 2 workers follow the 1-worker loss curve; a per-worker mean would weight tokens
differently whenever workers hold different numbers of assistant tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kore_ray.data.tokenize import IGNORE_INDEX
from kore_ray.errors import InputError

Batch = Mapping[str, torch.Tensor]


def loss_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labelled positions after the shift (position 0 predicts nothing)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: Batch) -> int:
    """Tokens the model reads: the unpadded ones; a packed batch (no attention_mask) has no pads."""
    mask = batch.get("attention_mask")
    return batch["input_ids"].numel() if mask is None else int(mask.sum())


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose NEXT token is labelled in any row: the only logits the loss needs.

    On a large vocabulary the lm_head is most of a small model's step (Gemma 3 270M: 168M of
    its 268M parameters), so computing logits for prompt and padding positions is waste.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def labelled_loss_sum(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """`assistant_loss_sum` with logits for the labelled (row, position) pairs alone.

    `loss_positions` keeps a position labelled in ANY row, so a micro-batch of short answers
    at different offsets still pays the 262k-wide lm_head for rows x the union of their
    positions (8x the labelled tokens, measured on short Q&A). Here a pre-hook on the output
    embeddings hands it only the labelled hidden states, as one row: the same loss and
    gradients, for every model that applies its lm_head to (batch, seq, hidden) states.
    """
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    head = getattr(model, "module", model).get_output_embeddings()
    handle = head.register_forward_pre_hook(
        lambda _, args: (args[0][rows, cols].unsqueeze(0), *args[1:]))
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=0).logits
    finally:
        handle.remove()
    # flatten, not logits[0]: a view, where select's backward fills a zero (1, n, vocab) first
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:][rows, cols], reduction="sum")


def assistant_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled (assistant) tokens.

    `logits` cover every position, or only `positions` (see `loss_positions`). Only the
    labelled entries are upcast to float32: float32 logits everywhere would be most of the
    step's activation memory on a 262k vocabulary.
    """
    targets = labels[:, 1:] if positions is None else labels[:, 1:][:, positions]
    logits = logits[:, :-1] if positions is None else logits
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier for 0-based `step`: linear warmup, then the schedule.

    "linear" and "cosine" decay towards 0 at `total_steps` (the last step keeps a little).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise InputError(f"unknown lr_schedule {schedule!r}; valid: constant, linear, cosine")


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: frozen base weights get no optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, warmup_steps, schedule)  # an unknown schedule fails here, not later
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule),
    )


@dataclass(frozen=True)
class StepStats:
    """One step, global figures (summed over workers)."""

    loss: float  # mean cross-entropy per assistant token of the global batch
    loss_tokens: int  # assistant tokens in the global batch
    tokens: int  # non-padding input tokens in the global batch
    lr: float  # the learning rate this step used
    grad_norm: float  # before clipping


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _clip(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    limit = math.inf if max_norm is None else max_norm  # inf: measure, do not clip
    if hasattr(model, "clip_grad_norm_"):  # FSDP: gradients are sharded, it reduces the norm
        return model.clip_grad_norm_(limit)
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, limit)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 on `device`: any recent GPU; a CPU only with AMX
    or AVX512-BF16 (oneDNN's bf16 kernels; without them torch emulates bf16, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay on float32
        return False
    return bool(re.search(r"\b(?:amx_bf16|avx512_bf16)\b", flags))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.autocast on this worker's device (None: full precision)."""
    if setting == "bfloat16" or setting == "auto" and fast_bfloat16(device):
        return torch.bfloat16
    return None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Batch],
    *,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduce,
    max_grad_norm: float | None = None,
    autocast: torch.dtype | None = None,
) -> StepStats:
    """Forward/backward over this worker's micro-batches, then one optimizer step.

    `micro_batches` are model inputs (already on the model's device) with `labels`.
    `all_reduce` sums a tensor over the workers in place and returns it (identity for one
    worker); gradients are averaged by the DDP/FSDP wrapper, synchronised once per step
    (`no_sync` on every micro-batch but the last). `autocast`: run forward and backward in
    that dtype (float32 master weights, gradients and optimizer state).
    """
    device = micro_batches[0]["labels"].device
    counts = torch.tensor(
        [
            sum(loss_token_count(mb["labels"]) for mb in micro_batches),
            sum(input_tokens(mb) for mb in micro_batches),
        ],
        dtype=torch.float64,
        device=device,
    )
    loss_tokens, tokens = (int(v) for v in all_reduce(counts).tolist())
    scale = world_size / max(loss_tokens, 1)
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = labelled_loss_sum(model, inputs, batch["labels"]).float()
            (loss * scale).backward()
        loss_sum += loss.detach()
    grad_norm = _clip(model, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = all_reduce(loss_sum.reshape(1))
    return StepStats(
        loss=float(total) / max(loss_tokens, 1),
        loss_tokens=loss_tokens,
        tokens=tokens,
        lr=lr,
        grad_norm=float(grad_norm),
    )
