"""Training data: conversations -> a fixed step schedule -> one Ray Data shard per rank -> batches.

The schedule. Epoch e visits the N conversations in a permutation seeded by (seed, e); the
epochs are concatenated and cut into global batches of `batch_size` rows (a tail shorter than
a batch is dropped; `max_steps`, when set, decides the length and repeats the data as needed).
Slot j of a global batch belongs to rank j // (batch_size / num_workers).

Why fixed rather than Ray Data's `streaming_split`: global batch t is then the same rows for
any number of workers (2 workers follow the 1-worker loss curve), and the data position after
a restart is just the step. A resumed worker reads the rows of the steps its checkpoint already
covers and drops them before collation (they cost a tokenisation, never a forward pass).

The rows of all ranks, in rank then step order, are tokenised in one Ray Data `map_batches`
pass and cut at the ranks' boundaries (trainer._shards), so each rank's shard holds its rows
in step order. Text models are tokenised completely there. Vision-language rows keep their
rendered text and image reference: the worker's collate runs the processor, which opens the
images and expands each image token, in Ray Data's prefetch thread.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from kore_ray.data.io import load_image, read_records
from kore_ray.data.schemas import Conversation
from kore_ray.data.tokenize import IGNORE_INDEX, encode_conversation, pad_batch, render
from kore_ray.errors import InputError

ROWS_PER_BLOCK = 256  # rows per Ray Data block (one tokenisation call)
_UNLIMITED = 1 << 30  # VLM rows are cut to max_length after the processor expands the images


def shard_name(rank: int) -> str:
    return f"train_rank{rank}"


def per_worker_batch(batch_size: int, num_workers: int) -> int:
    if batch_size % num_workers:
        raise InputError(
            f"train.batch_size ({batch_size}) is the global batch and must be divisible by "
            f"train.num_workers ({num_workers}): every worker takes an equal share of each step"
        )
    return batch_size // num_workers


def read_conversations(path: str | Path, vision: bool) -> list[Conversation]:
    """The training conversations; images are refused for a text-only model, and an image
    needs exactly one {"type": "image"} part saying where it goes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no training conversations (run `kore augment` first)")
    conversations = read_records(path, Conversation)
    if not conversations:
        raise InputError(f"{path}: holds no conversations")
    problems = []
    for conv in conversations:
        parts = sum(
            part.type == "image"
            for m in conv.messages if isinstance(m.content, list) for part in m.content
        )
        if conv.image is not None and not vision:
            problems.append(f"id {conv.id!r}: has an image, but the model is text-only")
        elif conv.image is not None and parts != 1:
            problems.append(f"id {conv.id!r}: has an image and {parts} image parts; needs 1")
    if problems:
        listing = "\n".join(problems)
        raise InputError(f"{path}: {len(problems)} unusable conversation(s):\n{listing}")
    return conversations


def planned_steps(n: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps for n conversations: max_steps, else whole global batches in `epochs`.
    InputError when that is none at all."""
    steps = max_steps if max_steps is not None else epochs * n // batch_size
    if steps == 0:
        raise InputError(
            f"{epochs} epoch(s) of {n} conversation(s) do not fill one global batch of "
            f"{batch_size}: lower train.batch_size or set train.max_steps"
        )
    return steps


def plan_schedule(
    n: int, batch_size: int, epochs: int, max_steps: int | None, seed: int
) -> np.ndarray:
    """(steps, batch_size) conversation indices: row t is global batch t (see module doc)."""
    steps = planned_steps(n, batch_size, epochs, max_steps)
    needed = -(-steps * batch_size // n)  # epochs, rounded up
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(needed)])
    return order[: steps * batch_size].reshape(steps, batch_size)


def rank_tables(
    conversations: Sequence[Conversation], schedule: np.ndarray, num_workers: int
) -> list[list[pa.Table]]:
    """For each rank, its rows of the schedule in step order, as Arrow blocks."""
    per_rank = per_worker_batch(schedule.shape[1], num_workers)
    messages = [
        json.dumps(c.model_dump(mode="json", exclude_none=True)["messages"]) for c in conversations
    ]
    out = []
    for rank in range(num_workers):
        picks = schedule[:, rank * per_rank : (rank + 1) * per_rank]
        steps = np.repeat(np.arange(schedule.shape[0]), per_rank)
        index = picks.reshape(-1)
        table = pa.table({
            "step": pa.array(steps, pa.int64()),
            "id": pa.array([conversations[i].id for i in index], pa.string()),
            "messages": pa.array([messages[i] for i in index], pa.string()),
            "image": pa.array([conversations[i].image for i in index], pa.string()),
        })
        out.append([table.slice(s, ROWS_PER_BLOCK) for s in range(0, len(table), ROWS_PER_BLOCK)])
    return out


def is_vision_model(name_or_path: str) -> bool:
    """From the model's config alone: no weights, no tokenizer."""
    from transformers import AutoConfig

    from kore_ray.models.loading import is_vision_language, resolve_model_path

    return is_vision_language(AutoConfig.from_pretrained(resolve_model_path(name_or_path)))


def load_preprocessor(name_or_path: str):
    """(tokenizer or processor, is_vision_language) without loading the weights."""
    from transformers import AutoProcessor, AutoTokenizer

    from kore_ray.models.loading import resolve_model_path

    path = resolve_model_path(name_or_path)
    if is_vision_model(name_or_path):
        return AutoProcessor.from_pretrained(path), True
    return AutoTokenizer.from_pretrained(path), False


def vision_tokenizer(processor):
    """The processor's tokenizer, rendering with the processor's chat template.

    The plain Q/A fallback template drops image parts, so a VLM without a template is an error.
    """
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        if not getattr(processor, "chat_template", None):
            raise InputError("this vision-language model has no chat template to render images")
        tokenizer.chat_template = processor.chat_template
    return tokenizer


class Tokenize:
    """Ray Data stage: messages -> input_ids and labels (IGNORE_INDEX outside assistant turns).

    For a VLM the ids are the text's, before the processor expands each image token; the
    rendered text rides along for the collate.
    """

    def __init__(self, name_or_path: str, max_length: int):
        self.preprocessor, self.vision = load_preprocessor(name_or_path)
        self.max_length = max_length

    def __call__(self, table: pa.Table) -> pa.Table:
        tokenizer = vision_tokenizer(self.preprocessor) if self.vision else self.preprocessor
        limit = _UNLIMITED if self.vision else self.max_length
        ids, labels, texts = [], [], []
        for raw in table.column("messages").to_pylist():
            messages = json.loads(raw)
            enc = encode_conversation(tokenizer, messages, limit)
            ids.append(enc["input_ids"])
            labels.append(enc["labels"])
            if self.vision:
                texts.append(render(tokenizer, messages))
        columns = {
            "step": table.column("step"),
            "id": table.column("id"),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "labels": pa.array(labels, pa.list_(pa.int32())),
        }
        if self.vision:
            columns |= {"text": pa.array(texts, pa.string()), "image": table.column("image")}
        return pa.table(columns)


@functools.lru_cache(maxsize=2)
def _tokenizer(name_or_path: str, max_length: int) -> Tokenize:
    return Tokenize(name_or_path, max_length)


def tokenize_block(table: pa.Table, name_or_path: str, max_length: int) -> pa.Table:
    """`Tokenize` as a Ray Data task: the tokeniser is loaded once per worker process."""
    return _tokenizer(name_or_path, max_length)(table)


def image_token_id(processor) -> int:
    found = getattr(processor, "image_token_id", None)
    if found is None:
        found = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return found


def expand_labels(
    ids: Sequence[int], labels: Sequence[int], expanded: Sequence[int], image_token: int, row: str
) -> list[int]:
    """Labels for `expanded`, the processor's ids, from those of the unexpanded `ids`.

    The processor replaces the (single) image token with the image's run of tokens and leaves
    the text on either side unchanged; the run carries no loss.
    """
    ids, expanded = list(ids), list(expanded)
    at = [i for i, t in enumerate(ids) if t == image_token]
    if not at:
        if expanded != ids:
            raise InputError(f"conversation {row!r}: the processor changed a text-only sequence")
        return list(labels)
    if len(at) > 1:
        raise InputError(f"conversation {row!r}: {len(at)} image tokens; one image allowed")
    p, tail = at[0], len(ids) - at[0] - 1
    run = len(expanded) - p - tail
    if run < 1 or expanded[:p] != ids[:p] or expanded[p + run :] != ids[p + 1 :]:
        raise InputError(f"conversation {row!r}: the processor changed the text around the image")
    return list(labels[:p]) + [IGNORE_INDEX] * run + list(labels[p + 1 :])


def vision_batch(
    processor, rows: Sequence[dict], max_length: int, pad_side: str = "right"
) -> dict[str, torch.Tensor]:
    """A VLM micro-batch with labels: the processor opens and expands the images.

    Sequences are cut to max_length, never through an image's tokens (the model would see
    fewer image tokens than image features): that is an error naming the conversation.
    """
    processor.tokenizer.padding_side = pad_side
    pictures = [[load_image(r["image"])] if r["image"] else [] for r in rows]
    enc = dict(processor(
        text=[r["text"] for r in rows],
        images=pictures if any(pictures) else None,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
    ))
    image_token = image_token_id(processor)
    input_ids, lengths = enc["input_ids"], enc["attention_mask"].sum(dim=1).tolist()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        expanded = input_ids[i, :n].tolist()
        labels[i, :n] = torch.tensor(
            expand_labels(row["input_ids"], row["labels"], expanded, image_token, row["id"])
        )
    enc["labels"] = labels
    width = input_ids.shape[1]
    if width > max_length:
        cut = (input_ids[:, max_length:] == image_token).any(dim=1)
        if cut.any():
            names = [rows[i]["id"] for i in cut.nonzero()[:, 0].tolist()]
            raise InputError(
                f"conversation(s) {names}: image tokens beyond train.max_length={max_length}; "
                "raise it or shorten the text before the image"
            )
        enc = {
            k: v[:, :max_length] if v.dim() >= 2 and v.shape[:2] == input_ids.shape else v
            for k, v in enc.items()
        }
    return enc


@dataclass
class StepBatch:
    """One worker's share of one global batch, as micro-batches (empty: a step already done)."""

    step: int
    micro_batches: list[dict[str, torch.Tensor]]


class Collate(NumpyBatchCollateFn):
    """Numpy batch of one step's rows -> StepBatch; runs in Ray Data's prefetch thread.

    Each micro-batch is collated on its own (its own padding; for a VLM its own processor
    call), so micro-batching works for every model's image tensor layout.
    """

    def __init__(self, preprocessor, vision: bool, pad_id: int, max_length: int,
                 micro_batch_size: int, skip_before: int = 0, packed: bool = True):
        from transformers import DataCollatorWithFlattening

        self.preprocessor, self.vision, self.pad_id = preprocessor, vision, pad_id
        self.max_length, self.micro, self.skip_before = max_length, micro_batch_size, skip_before
        # Text rows are packed, as HF's padding-free collator does: one sequence per micro-batch,
        # position_ids restarting at each row and no attention_mask, from which transformers
        # builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices). The
        # same loss and gradients as padding, none of its wasted positions (0.86 of the padded
        # step in benchmarks/train_step.py; 0.92-0.98 measured in `kore train` on 2 cores).
        # Images keep padding: their token types and vision towers are per row.
        self.flatten = DataCollatorWithFlattening(return_tensors="pt") if packed else None

    def __call__(self, batch: dict[str, np.ndarray]) -> StepBatch:
        steps = set(batch["step"].tolist())
        if len(steps) != 1:
            raise RuntimeError(f"a batch spans steps {sorted(steps)}: the shard is out of order")
        step = steps.pop()
        if step < self.skip_before:
            return StepBatch(step, [])
        columns = [k for k in ("id", "input_ids", "labels", "text", "image") if k in batch]
        rows = [dict(zip(columns, values)) for values in zip(*(batch[k] for k in columns))]
        for row in rows:
            row["input_ids"], row["labels"] = row["input_ids"].tolist(), row["labels"].tolist()
        # Padded micro-batches of similar lengths: a short Q&A padded to a paragraph's length
        # costs as much as the paragraph (packed ones do not depend on it). The loss is
        # normalised over the whole step, so the order within a step changes nothing but float
        # rounding.
        rows.sort(key=lambda r: len(r["input_ids"]))
        chunks = [rows[i : i + self.micro] for i in range(0, len(rows), self.micro)]
        if self.vision:
            return StepBatch(
                step, [vision_batch(self.preprocessor, c, self.max_length) for c in chunks]
            )
        if self.flatten is not None:
            return StepBatch(step, [self.flatten(
                [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in c]) for c in chunks])
        return StepBatch(step, [pad_batch(c, self.pad_id) for c in chunks])
