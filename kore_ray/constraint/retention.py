"""Retention data for the covariance: a file -> texts -> micro-batches -> model inputs.

Pure functions, no Ray. The covariance stage (covariance_stage.py) and any single-process
reference use the same ones, so both run exactly the same micro-batches: the core sums each
micro-batch's x x^T in float32 before adding it in float64, so how tokens are batched decides
the last bits of the result, and only identical batches give identical sums.

Accepted files (data.retention):
- retention probes, conversations (JSONL, JSON list, Parquet) or a LLaVA-style JSON,
  recognised from their fields as `kore validate` does;
- plain text: a `.txt` file, one document per line (blank lines are skipped). Documents
  that span lines go in a JSONL file of conversations or probes instead.
A probe with a prompt becomes prompt + answer as the model would continue it; a question
probe or a conversation goes through the model's chat template (or the plain Q/A fallback).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from kore_ray.data.io import import_llava, load_image, read_records
from kore_ray.data.schemas import Conversation, RetentionProbe
from kore_ray.data.tokenize import pad_batch, retention_text
from kore_ray.data.validate import detect_kind
from kore_ray.errors import InputError

_SORT_WINDOW = 64  # micro-batches whose sequences are sorted by length together


class RetentionItem(NamedTuple):
    """One retention sequence, rendered with all its special tokens (tokenise it without)."""

    id: str
    text: str
    image: str | None = None  # local path or URI; only vision-language models take images


def _tokenizer_of(tokenizer_or_processor):
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def _special_affixes(tokenizer) -> tuple[str, str]:
    """The special-token text the tokenizer adds around plain text (e.g. "<bos>", "").

    Every item then carries its special tokens in its text, so one tokenisation rule
    (add_special_tokens=False) serves rendered conversations and plain text alike, and
    a VLM processor, which takes one such flag per batch, can mix them in a batch.
    """
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix, suffix = with_special[:start], with_special[start + len(plain) :]
            return tokenizer.decode(prefix), tokenizer.decode(suffix)
    raise InputError("the tokenizer changes plain text when it adds special tokens")


def _image_placeholders(conv: Conversation) -> int:
    return sum(
        part.type == "image"
        for m in conv.messages
        if isinstance(m.content, list)
        for part in m.content
    )


def _image_problem(record, vision: bool) -> str | None:
    image = getattr(record, "image", None)
    if image is None:
        return None
    if not vision:
        return "has an image, but the model is text-only (use a vision-language model)"
    if _image_placeholders(record) != 1:
        return (
            f"has an image and {_image_placeholders(record)} image parts "
            '({"type": "image"}); it needs exactly one, where the image goes'
        )
    return None


def _read_text(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    return [(f"line {n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]


def read_retention(path: str | Path, tokenizer, vision: bool = False) -> list[RetentionItem]:
    """Validate a retention file and return its items in file order.

    `tokenizer` is the model's tokenizer or processor (its chat template renders
    conversations). Bad rows are reported together as `file:line: field: message`
    (by read_records); records the model cannot take are reported together by id.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such retention file")
    prefix, suffix = _special_affixes(_tokenizer_of(tokenizer))
    if path.suffix == ".txt":
        rows = _read_text(path)
        if not rows:
            raise InputError(f"{path}: no text (a .txt retention file holds one document per line)")
        return [RetentionItem(rid, prefix + text + suffix) for rid, text in rows]
    kind = detect_kind(path)
    if kind == "retention":
        records = read_records(path, RetentionProbe)
    elif kind == "conversation":
        records = read_records(path, Conversation)
    elif kind == "llava":
        records = import_llava(path)
    else:
        raise InputError(
            f"{path}: holds {kind} rows; retention data is retention probes, conversations, "
            "a LLaVA-style JSON, or plain text (.txt, one document per line)"
        )
    items, problems = [], []
    for record in records:
        problem = _image_problem(record, vision)
        if problem:
            problems.append(f"{path}: id {record.id!r}: {problem}")
            continue
        text, rendered = retention_text(tokenizer, record)
        text = text if rendered else prefix + text + suffix
        items.append(RetentionItem(record.id, text, getattr(record, "image", None)))
    if problems:
        raise InputError(f"{path}: {len(problems)} record(s) unusable:\n" + "\n".join(problems))
    return items


def plan_batches(items: Sequence[RetentionItem], batch_size: int) -> list[list[RetentionItem]]:
    """Micro-batches of `batch_size` items, deterministic for given items and batch size.

    Within each window of 64 micro-batches the items are sorted by text length, which cuts
    padding (wasted forward compute) without reading the whole file out of order.
    """
    span = batch_size * _SORT_WINDOW
    batches = []
    for start in range(0, len(items), span):
        window = sorted(items[start : start + span], key=lambda item: len(item.text))
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    return batches


def data_fingerprint(items: Sequence[RetentionItem], max_length: int) -> str:
    """Hash of the rendered texts, image references and truncation length, in file order.

    Images count by reference (path or URI), not by content.
    """
    h = hashlib.sha256(f"max_length={max_length}\n".encode())
    for item in items:
        h.update(json.dumps([item.text, item.image]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of rendered texts (their special tokens are in the text), truncated."""
    return tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=max_length
    )["input_ids"]


def text_inputs(token_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded micro-batch for a text model."""
    return pad_batch([{"input_ids": list(ids)} for ids in token_ids], pad_id)


def vlm_inputs(
    processor,
    texts: Sequence[str],
    images: Sequence[str | None],
    ids: Sequence[str],
    max_length: int,
    image_token_id: int | None,
) -> dict[str, torch.Tensor]:
    """A micro-batch for a vision-language model: the processor expands each image.

    Sequences are cut to max_length like text ones, but never through an image's tokens
    (the model would then see fewer image tokens than image features): such a sequence is
    an error naming its record.
    """
    tokenizer = _tokenizer_of(processor)
    tokenizer.padding_side = "right"  # cutting at max_length keeps each sequence's start
    pictures = [[load_image(ref)] if ref else [] for ref in images]
    enc = processor(
        text=list(texts),
        images=pictures if any(pictures) else None,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"]
    if input_ids.shape[1] > max_length:
        if image_token_id is not None:
            cut = (input_ids[:, max_length:] == image_token_id).any(dim=1)
            if cut.any():
                names = [ids[i] for i in cut.nonzero()[:, 0].tolist()]
                raise InputError(
                    f"retention record(s) {names}: image tokens beyond max_length={max_length}; "
                    "raise covariance.max_length or shorten the text before the image"
                )
        shape = tuple(input_ids.shape)
        enc = {
            k: v[:, :max_length] if v.dim() >= 2 and tuple(v.shape[:2]) == shape else v
            for k, v in enc.items()
        }
    return dict(enc)
