"""Conversations and retention records -> token ids, one format shared by every stage.

Models with a chat template use it. Base models without one (the embedded Gemma 3 270M) get
PLAIN_CHAT_TEMPLATE, a Question/Answer format a base model continues naturally; it is set on
the tokenizer itself so training, covariance, evaluation and vLLM all render the same text.
"""

from __future__ import annotations

from kore_ray.data.schemas import Conversation, RetentionProbe
from kore_ray.errors import InputError

IGNORE_INDEX = -100  # label for tokens that carry no loss

PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ text }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ text }}\nAnswer:"
    "{% else %} {{ text }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
)


def ensure_chat_template(tokenizer):
    """Give a template-less tokenizer the plain Question/Answer template (in place)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _messages(conv: Conversation | list[dict]) -> list[dict]:
    if isinstance(conv, Conversation):
        return conv.model_dump(exclude_none=True)["messages"]
    return conv


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from the end of the prompt before a turn (generation prompt included) to the
    end of the turn, so the template's end-of-turn tokens are learned too.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1]))
        if not full.startswith(render(tokenizer, messages[: i + 1])):
            raise InputError("the chat template does not render conversations prefix-stably")
        spans.append((start, end))
    return full, spans


def encode_conversation(tokenizer, conv: Conversation | list[dict], max_length: int) -> dict:
    """input_ids and labels (IGNORE_INDEX outside assistant turns), truncated to max_length."""
    text, spans = assistant_spans(tokenizer, _messages(conv))
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True,
        truncation=True, max_length=max_length,
    )
    labels = [
        tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX
        for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return {"input_ids": enc["input_ids"], "labels": labels}


def retention_text(tokenizer, record: RetentionProbe | Conversation | str) -> tuple[str, bool]:
    """The text a retention record stands for, and whether it is already rendered (holds BOS).

    A completion probe is its prompt followed by its answer, as the model would continue it;
    a question probe or a conversation goes through the chat template.
    """
    if isinstance(record, str):
        return record, False
    if isinstance(record, RetentionProbe):
        if record.prompt is not None:
            return f"{record.prompt} {record.answer}", False
        messages = [{"role": "user", "content": record.question},
                    {"role": "assistant", "content": record.answer}]
        return render(tokenizer, messages), True
    return render(tokenizer, _messages(record)), True


def encode_retention(tokenizer, record, max_length: int) -> list[int]:
    text, rendered = retention_text(tokenizer, record)
    return tokenizer(
        text, add_special_tokens=not rendered, truncation=True, max_length=max_length
    )["input_ids"]


def pad_token_id(preprocessor) -> int:
    """The id to pad with (a processor's tokenizer's): pad, else eos. Padded positions are
    masked out of losses and covariance sums, so any id would do when neither exists."""
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad_batch(rows: list[dict], pad_id: int, side: str = "right") -> dict:
    """Stack encoded rows into input_ids / attention_mask (/ labels) tensors."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": []}
    if "labels" in rows[0]:
        out["labels"] = []

    def fill(seq: list, value: int) -> list:
        pad = [value] * (width - len(seq))
        return seq + pad if side == "right" else pad + seq

    for r in rows:
        n = len(r["input_ids"])
        out["input_ids"].append(fill(list(r["input_ids"]), pad_id))
        out["attention_mask"].append(fill([1] * n, 0))
        if "labels" in out:
            out["labels"].append(fill(list(r["labels"]), IGNORE_INDEX))
    return {k: torch.tensor(v) for k, v in out.items()}
