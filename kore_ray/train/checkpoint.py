"""Training checkpoints: the trainable weights, the optimizer and schedule state, the step.

  model.pt        {name: tensor} of the TRAINABLE parameters, under the unwrapped model's names
                  (adapter methods: the adapter only; KORE: lora_B only, A stays A0 from init)
  train_state.pt  {"optimizer", "scheduler", "step"}
  checkpoint.json the step and its metrics, for people

torch.distributed.checkpoint's full-state-dict functions strip DDP's wrapper and gather FSDP's
shards to rank 0, so one format serves every strategy, and a checkpoint resumes on any number
of workers. Optimizer state is keyed by parameter name, not position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from kore_ray.errors import InputError

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
INFO_FILE = "checkpoint.json"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_names(model: nn.Module) -> frozenset[str]:
    """Names of the trainable parameters of an UNWRAPPED model: what a checkpoint holds."""
    return frozenset(n for n, p in model.named_parameters() if p.requires_grad)


def gather_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: frozenset[str]
) -> tuple[dict, dict]:
    """(trainable weights, optimizer state), complete on rank 0. A collective under FSDP:
    every rank must call it.

    The weights are cut down to `names` (trainable_names before wrapping): torch's
    ignore_frozen_params misses a frozen weight's tied alias (Gemma's lm_head is its
    embedding, 670 MB), which named_parameters lists only once.
    """
    weights = get_model_state_dict(model, options=FULL)
    return {k: v for k, v in weights.items() if k in names}, get_optimizer_state_dict(
        model, optimizer, options=FULL
    )


def write_checkpoint(
    directory: str | Path, weights: dict, optimizer_state: dict, scheduler, step: int, info: dict
) -> Path:
    directory = Path(directory)
    torch.save(weights, directory / MODEL_FILE)
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": step},
        directory / STATE_FILE,
    )
    (directory / INFO_FILE).write_text(json.dumps({"step": step, **info}, indent=2))
    return directory


def checkpoint_step(directory: str | Path) -> int | None:
    """The step a kore checkpoint holds; None for a directory that is not one."""
    info = Path(directory) / INFO_FILE
    return json.loads(info.read_text())["step"] if info.is_file() else None


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)


def read_train_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put checkpointed trainable weights into an UNWRAPPED model built from the same init.

    The names must be exactly the model's trainable parameters: anything else means the
    checkpoint belongs to another method, init or model.
    """
    trainable = trainable_names(model)
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise InputError(
            "checkpoint does not match the model's trainable parameters "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    model.load_state_dict(weights, strict=False)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore optimizer state into the (possibly wrapped) model's optimizer, on every rank."""
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
