"""KORE's training fast path: with lora_A frozen, one merged weight does the base's work and most
of the adapter's.

A KORE layer computes y = W_res x + s B (A0 x) with A0 frozen. Since A0 never changes,
W_eff = W_res + s B A0 is fixed between optimizer steps: it is formed once per step (d_out r d_in
multiply-adds, the cost of r tokens through the layer) and then, per token,

    forward   y = W_eff x            and u = A0 x (kept for B's gradient),
    backward  dx = W_eff^T dy        and dB = s dy u^T (summed over tokens),

where PEFT's layer runs W_res x, A0 x, B u forward and W_res^T dy, B^T dy, A0^T (B^T dy), dy u^T
backward: 2 adapter matmuls per token instead of 5 (LoRA at the same trainable size runs 6).
That saves r (d_in + 2 d_out) multiply-adds per token against r d_in d_out per merge, so a
layer merges only for a batch of at least d_in d_out / (d_in + 2 d_out) tokens (250-400 at
Gemma 3 270M's widths); a smaller one takes PEFT's path, unless B's merge is already made.
Same maths, other rounding, so only where that rounding is as good: float32 weights and
activations (in bf16, W_res + s B A0 would round most of the adapter away). Costs one
d_out x d_in buffer per layer. Anything else (eval, no grad, bf16, dropout, several adapters,
a non-Linear base) takes PEFT's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class _MergedLinear(torch.autograd.Function):
    """y = x W_eff^T + bias, with dx = dy W_eff and dB = scaling dy^T (x A^T); A, W_eff frozen."""

    @staticmethod
    def forward(ctx, x, lora_b, merged, lora_a, bias, scaling):
        u = F.linear(x, lora_a)
        ctx.save_for_backward(u, merged)
        ctx.scaling = scaling
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        u, merged = ctx.saved_tensors
        grad_x = grad @ merged if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            flat = grad.reshape(-1, grad.shape[-1])
            grad_b = (flat.T @ u.reshape(-1, u.shape[-1])).mul_(ctx.scaling)
        return grad_x, grad_b, None, None, None, None


class FrozenALinear(LoraLinear):
    """PEFT's LoRA Linear, with the merged-weight path while training B against a frozen A."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._merged_path_applies(x, args, kwargs):
            return super().forward(x, *args, **kwargs)
        (adapter,) = self.active_adapters
        base = self.get_base_layer()
        return _MergedLinear.apply(
            x, self.lora_B[adapter].weight, self._merged_weight(adapter),
            self.lora_A[adapter].weight, base.bias, self.scaling[adapter],
        )

    def _merged_path_applies(self, x: torch.Tensor, args, kwargs) -> bool:
        if args or any(v is not None for v in kwargs.values()) or not torch.is_grad_enabled():
            return False
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return False
        (adapter,) = self.active_adapters
        base = self.get_base_layer()
        if adapter not in self.lora_A or adapter in self.lora_variant or type(base) is not nn.Linear:
            return False
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        float32 = all(t.dtype == torch.float32 for t in (x, a, b, base.weight))
        if not (float32 and b.requires_grad and not a.requires_grad and not base.weight.requires_grad
                and isinstance(self.lora_dropout[adapter], nn.Identity)
                and not torch.is_autocast_enabled(x.device.type)):
            return False
        d_out, d_in = base.weight.shape
        tokens = x.numel() // d_in
        return self._merge_is_current(adapter) or tokens * (d_in + 2 * d_out) >= d_in * d_out

    def _merge_key(self, adapter: str) -> tuple:
        tensors = (self.get_base_layer().weight, self.lora_A[adapter].weight,
                   self.lora_B[adapter].weight)
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def _merge_is_current(self, adapter: str) -> bool:
        cached = self.__dict__.get("_kore_merged")
        return cached is not None and cached[0] == self._merge_key(adapter)

    @torch.no_grad()
    def _merged_weight(self, adapter: str) -> torch.Tensor:
        """W_res + s B A, re-formed only when B, A or W_res changed (in place or moved)."""
        cached = self.__dict__.get("_kore_merged")
        if self._merge_is_current(adapter):
            return cached[1]
        w = self.get_base_layer().weight
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        buffer = cached[1] if cached is not None else None
        if buffer is None or buffer.shape != w.shape or buffer.device != w.device:
            buffer = torch.empty_like(w)
        torch.addmm(w, b, a, alpha=self.scaling[adapter], out=buffer)
        self.__dict__["_kore_merged"] = (self._merge_key(adapter), buffer)
        return buffer


def use_merged_forward(model: nn.Module, enabled: bool = True) -> int:
    """Switch every plain LoRA Linear whose lora_A is frozen to (or back from) FrozenALinear.

    Returns how many layers were switched. The state dict, saving and export are unchanged:
    only the forward differs, and it falls back to PEFT's wherever the maths would not be
    identical (see the module docstring).
    """
    switched = 0
    for module in model.modules():
        if enabled and type(module) is LoraLinear:
            if all(not lin.weight.requires_grad for lin in module.lora_A.values()):
                module.__class__ = FrozenALinear
                switched += 1
        elif not enabled and type(module) is FrozenALinear:
            module.__class__ = LoraLinear
            module.__dict__.pop("_kore_merged", None)
            switched += 1
    return switched
