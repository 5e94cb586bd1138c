"""One rendering of conversations and retention records for every stage."""

import copy

import pytest
import torch

from kore_ray.data.schemas import Conversation, RetentionProbe
from kore_ray.data.tokenize import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    encode_conversation,
    encode_retention,
    pad_batch,
    render,
)
from kore_ray.models.tiny import tiny_text_model

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "who founded zorblat"},
    {"role": "assistant", "content": "mira quell"},
    {"role": "user", "content": "when"},
    {"role": "assistant", "content": "in 2031"},
]


@pytest.fixture(scope="module", params=["own", "plain"])
def tok(request):
    _, tok = tiny_text_model("llama")
    tok = copy.deepcopy(tok)
    if request.param == "plain":
        tok.chat_template = None  # a base model: the plain Question/Answer template applies
    return tok


def _labelled_text(tok, enc):
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX],
                      skip_special_tokens=True)


def test_loss_only_on_assistant_turns(tok):
    enc = encode_conversation(tok, MESSAGES, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"])
    learned = _labelled_text(tok, enc)
    assert "mira quell" in learned and "in 2031" in learned
    for prompt_text in ("who founded", "be brief", "when"):
        assert prompt_text not in learned.replace("in 2031", "")
    assert enc["input_ids"][0] == tok.bos_token_id  # BOS once, from the template


def test_plain_template_is_used_without_a_chat_template():
    _, tok = tiny_text_model("llama")
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    text = render(tok, MESSAGES[1:3])
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE  # set on the tokenizer, so vLLM renders the same
    assert text == f"{tok.bos_token}Question: who founded zorblat\nAnswer: mira quell{tok.eos_token}\n"
    assert render(tok, MESSAGES[1:2], add_generation_prompt=True) == f"{tok.bos_token}Question: who founded zorblat\nAnswer:"


def test_conversation_record_and_truncation(tok):
    conv = Conversation(id="c1", task="qa", messages=MESSAGES[1:3])
    full = encode_conversation(tok, conv, max_length=512)
    short = encode_conversation(tok, conv, max_length=10)
    assert len(short["input_ids"]) == 10 and short["input_ids"] == full["input_ids"][:10]


def test_retention_probes(tok):
    completion = encode_retention(tok, RetentionProbe(id="p", prompt="the capital of france is", answer="paris"), 512)
    assert completion[0] == tok.bos_token_id and completion.count(tok.bos_token_id) == 1
    assert tok.decode(completion, skip_special_tokens=True) == "the capital of france is paris"
    chat = encode_retention(tok, RetentionProbe(id="q", question="capital of france", answer="paris"), 512)
    assert chat.count(tok.bos_token_id) == 1
    assert "paris" in tok.decode(chat, skip_special_tokens=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch(side):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = pad_batch(rows, pad_id=0, side=side)
    assert b["input_ids"].shape == (2, 3)
    assert b["attention_mask"].sum().item() == 4
    kept = b["input_ids"][b["attention_mask"].bool()].tolist()
    assert kept == [5, 6, 7, 8]
    assert (b["labels"][~b["attention_mask"].bool()] == IGNORE_INDEX).all()
    assert b["input_ids"].dtype == torch.long
