"""The injection methods: one table, read by config validation, init, train, export, evaluate.

A method is a small record of what the stages need to know about it; how its trainable model
is built lives in one module per initialisation, `kore_ray/constraint/inits/<init>.py` (as
PEFT keeps `tuners/lora/corda.py`, `eva.py` behind its one `init_lora_weights` dispatch).
Adding a method is a row here and, if its initialisation is new, one module there.

This module imports no torch, so the config can validate method names cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from kore_ray.errors import InputError


@dataclass(frozen=True)
class Method:
    name: str
    init: str  # the module in kore_ray/constraint/inits/ that builds it
    summary: str
    needs_store: bool = False  # reads the retention covariance store
    trains_a: bool = True  # lora_A trains (KORE keeps it at its null-space init A0)
    # The init rewrites base weights (W_res = W - B0 A0): saved as its factors A0, B0 and
    # re-residualised on load, exported as W + B A - B0 A0 for the unmodified base.
    rewrites_base: bool = False
    adapter: bool = True  # trains a LoRA (exported and served as one); False: a whole model
    matched_rank: bool = False  # its rank is LoRA's matched to KORE's trainable count at init.rank

    def export_rank(self, rank: int) -> int | None:
        """The rank of the exported LoRA for init rank `rank` (an upper bound for a matched
        rank), or None for a whole model. A trained A beside the subtracted A0: [A; A0]."""
        if not self.adapter:
            return None
        return 2 * rank if self.rewrites_base and self.trains_a else rank


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kore", "kore", "null-space init from the retention covariance, B trained, A frozen",
           needs_store=True, trains_a=False, rewrites_base=True),
    Method("kore-v1", "kore", "KORE's null-space init with A trained as well",
           needs_store=True, rewrites_base=True),
    Method("lora", "lora", "PEFT's default LoRA at KORE's trainable-parameter count",
           matched_rank=True),
    Method("corda", "corda", "PEFT's CorDA, knowledge-preserved mode, on the same covariance",
           needs_store=True, rewrites_base=True),
    Method("pissa", "pissa", "PEFT's PiSSA: the adapter starts at the weights' principal "
           "singular directions (no retention data)", rewrites_base=True),
    Method("full", "full", "every parameter trained; a whole model, not an adapter",
           adapter=False),
)}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None
