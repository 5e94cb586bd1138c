"""Accumulate C = sum x x^T of each target layer's input over the retention data's tokens.

One forward pre-hook per TargetGroup, on the group's first module: the modules of a
group (q/k/v, gate/up) read the same tensor, so one C serves them all. Each batch
contributes X^T X over its non-padding tokens, computed in (at least) float32 and
added to a float64 sum: batching and padding change only the last bits, and partial
sums from many workers add up to the sum over all their data.

Cost: X^T X is symmetric, so only its blocks on and above the diagonal are computed
(about 0.6 of the flops of the full product at Gemma/Llama widths) and the rest is
mirrored when the sums are read; a batch without padding is used without a gather
copy; the NaN/Inf check reads the product's diagonal (d values), not the activations.

For a vision-language model the hooks sit on the language model's layers, and image
tokens count like any other position: only padding is masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from kore_ray.constraint.store import NORMALIZATIONS, CovarianceStore
from kore_ray.errors import InputError, ModelError
from kore_ray.run_dir import model_fingerprint


class CovarianceAccumulator:
    """Context manager that sums x x^T per target group while the model runs.

    normalize="none" (the default) sums the raw activations: C is then the plain
    second moment of what each layer sees, and trace(U0^T C U0) (what the null space
    minimises) is exactly the retention energy that reaches the adapter. Every token
    weighs the same, and the sums of two stores add up to the store of the union.
    normalize="sample_max" divides each sample by the |max element| of its
    non-padding activations first, as the KORE/CorDA reference code does (there,
    one sample per forward pass): offered for fidelity to that code. It down-weights
    samples with outlier activations, so the null space it finds is not the one that
    minimises the leak on the retention tokens as they are.

    Use `with acc.batch(attention_mask): model(...)` for each forward pass; the mask
    must match the hooked activations' leading shape (batch x seq).
    """

    def __init__(self, model: nn.Module, groups: Sequence, normalize: str = "none"):
        if normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not groups:
            raise InputError("no target groups to collect a covariance for")
        self.model = model
        self.groups = list(groups)
        self.normalize = normalize
        self._sums: dict[str, torch.Tensor] = {}
        self._unmirrored: set[str] = set()
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._rows: dict | None = None
        self.tokens: dict[str, int] = {g.key: 0 for g in self.groups}
        self.samples = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        self.hooked = {}
        for g in self.groups:
            name = g.modules[0]
            try:
                self.hooked[g.key] = model.get_submodule(name)
            except AttributeError as e:
                raise ModelError(f"target group {g.key}: model has no module {name!r}") from e

    def __enter__(self):
        for g in self.groups:
            hook = self._hook(g.key, g.modules[0])
            self._handles.append(self.hooked[g.key].register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None
        self._buffers.clear()

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """Group key -> float64 sum of x x^T so far (symmetric; the accumulator's own tensors)."""
        for key in self._unmirrored:
            _mirror_upper(self._sums[key])
        self._unmirrored.clear()
        return self._sums

    def check_every_group(self) -> None:
        """Refuse sums that some target group never received."""
        missing = [g.key for g in self.groups if g.key not in self._sums]
        if missing:
            raise InputError(f"no tokens reached target groups {missing}: empty or fully padded data?")

    def store(self, data_fingerprint: str | None = None) -> CovarianceStore:
        """The sums so far as a store (on CPU; shares the accumulator's tensors there)."""
        self.check_every_group()
        return CovarianceStore(
            sums={k: v.cpu() for k, v in self.sums.items()},
            tokens=dict(self.tokens),
            samples=self.samples,
            model_fingerprint=model_fingerprint(self.model),
            normalize=self.normalize,
            modules={
                g.key: {m: list(self.model.get_submodule(m).weight.shape) for m in g.modules}
                for g in self.groups
            },
            data_fingerprints=(data_fingerprint,) if data_fingerprint else (),
        )

    def reset(self) -> None:
        """Start again from zero (the sums' memory is freed)."""
        self._sums.clear()
        self._unmirrored.clear()
        self.tokens = {g.key: 0 for g in self.groups}
        self.samples = 0

    @contextmanager
    def batch(self, attention_mask: torch.Tensor):
        """Set the mask (batch x seq, nonzero = real token) for the forward pass run inside."""
        mask = attention_mask.bool()
        self.samples += int(mask.any(dim=-1).sum())
        self._mask = mask
        # Which flattened rows are real tokens, found once per batch (not once per layer);
        # None when every position is real: the activations are then used without a copy.
        self._rows = {} if not bool(mask.all()) else None
        try:
            yield
        finally:
            self._mask = None
            self._rows = None

    def _real_rows(self, device: torch.device) -> torch.Tensor | None:
        if self._rows is None:
            return None
        if device not in self._rows:  # a model split across devices sees one copy per device
            self._rows[device] = self._mask.reshape(-1).nonzero().squeeze(1).to(device)
        return self._rows[device]

    def _hook(self, key: str, name: str):
        def hook(module, args):
            if self._mask is None:
                raise InputError(f"layer {name} ran outside CovarianceAccumulator.batch(mask)")
            x = args[0].detach()
            if tuple(x.shape[:-1]) != tuple(self._mask.shape):
                raise InputError(
                    f"layer {name}: activations of shape {tuple(x.shape)} do not match the "
                    f"attention mask of shape {tuple(self._mask.shape)}"
                )
            self._accumulate(key, name, x)

        return hook

    def _accumulate(self, key: str, name: str, x: torch.Tensor) -> None:
        # float32 at least (bf16/fp16 sums of squares overflow and round badly), float64 kept.
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        d = x.shape[-1]
        rows = self._real_rows(x.device)
        flat = x.reshape(-1, d)
        tokens = flat if rows is None else flat.index_select(0, rows)  # (n, d_in), real only
        if self.normalize == "sample_max":
            # |max element| of each sample over its real tokens, as in the reference code.
            mask = self._mask.to(x.device)
            masked = x.masked_fill(~mask[..., None], float("-inf"))
            scale = masked.flatten(1).amax(dim=1).abs()
            if (scale == 0).any():
                raise InputError(f"layer {name}: a sample's max activation is 0, cannot normalise")
            per_token = scale.repeat_interleave(x.shape[1])
            tokens = tokens / (per_token if rows is None else per_token[rows])[:, None]
        part = self._scratch(d, tokens.dtype, tokens.device)
        _upper_gram(tokens, part)
        # A NaN or Inf anywhere in the tokens (or a square beyond float32) reaches the diagonal.
        if not torch.isfinite(part.diagonal()).all():
            raise InputError(f"layer {name}: NaN or Inf in its input activations")
        if key in self._sums:
            _add_upper(self._sums[key], part)
        else:  # no zero fill: the first batch is copied in, the lower blocks are mirrored
            self._sums[key] = torch.empty(d, d, dtype=torch.float64, device=tokens.device)
            _add_upper(self._sums[key], part, first=True)
        self._unmirrored.add(key)
        self.tokens[key] += tokens.shape[0]

    def _scratch(self, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """One reusable d x d buffer per width, dtype and device: no allocation per layer."""
        key = (d, dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(d, d, dtype=dtype, device=device)
        return self._buffers[key]


# X^T X is symmetric: only the blocks on and above the diagonal are computed, in column
# blocks of this width (0.56-0.7 of the full product's flops at widths 640-2048), and the
# lower blocks are mirrored when the sums are read.
_BLOCK = 256


def _blocks(d: int):
    for start in range(0, d, _BLOCK):
        yield start, min(start + _BLOCK, d)


def _upper_gram(tokens: torch.Tensor, out: torch.Tensor) -> None:
    """out[blocks on and above the diagonal] = the same blocks of tokens^T tokens (tokens' dtype)."""
    for start, stop in _blocks(tokens.shape[1]):
        out[start:stop, start:].addmm_(tokens[:, start:stop].T, tokens[:, start:], beta=0)


def _add_upper(total: torch.Tensor, part: torch.Tensor, first: bool = False) -> None:
    """total += part (float64 += float32 or float64) on the blocks `_upper_gram` writes."""
    for start, stop in _blocks(part.shape[1]):
        if first:
            total[start:stop, start:].copy_(part[start:stop, start:])
        else:
            total[start:stop, start:].add_(part[start:stop, start:])


def _mirror_upper(total: torch.Tensor) -> None:
    """Make `total` symmetric in place from its upper triangle (what was accumulated)."""
    with torch.inference_mode():  # sums made inside inference mode are inference tensors
        for start, stop in _blocks(total.shape[1]):
            total[stop:, start:stop] = total[start:stop, stop:].T
            block = total[start:stop, start:stop]
            block.copy_(block.triu() + block.triu(1).T)


def _forward_body(model: nn.Module, hooked: Iterable[nn.Module]):
    """The model's decoder body when it holds every hooked layer, else the model itself.

    For Hugging Face models `base_model` is the backbone without the LM head (for a
    VLM it still embeds the images): covariance needs the layers' inputs, not logits,
    and the head is most of the cost on a large vocabulary.
    """
    body = getattr(model, "base_model", model)
    if body is not model and isinstance(body, nn.Module):
        inside = {id(m) for m in body.modules()}
        if all(id(m) in inside for m in hooked):
            return body
    return model


def accumulate(acc: CovarianceAccumulator, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
    """Run `batches` through the accumulator's model, adding to its sums (eval mode, no grad).

    Each batch is a dict of model inputs (input_ids, attention_mask, pixel_values, ...);
    `labels` is ignored. Without an attention_mask every position counts. Position ids
    are whatever the model derives (left padding is fine for rotary models, whose
    attention depends on relative positions only).
    """
    model = acc.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    body = _forward_body(model, acc.hooked.values())
    try:
        with acc, torch.inference_mode():
            for batch in batches:
                inputs = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                    if k != "labels"
                }
                mask = inputs.get("attention_mask")
                if mask is None:
                    if "input_ids" not in inputs:
                        raise InputError("a covariance batch needs input_ids or an attention_mask")
                    mask = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
                with acc.batch(mask):
                    body(**inputs, use_cache=False)
    finally:
        model.train(was_training)


def collect_covariance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    groups: Sequence,
    normalize: str = "none",
    data_fingerprint: str | None = None,
) -> CovarianceStore:
    """Run `batches` (see `accumulate`) through the model and return its covariance store."""
    acc = CovarianceAccumulator(model, groups, normalize)
    accumulate(acc, batches)
    return acc.store(data_fingerprint)
