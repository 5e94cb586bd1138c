"""Greedy generation with transformers: the reference the served model is checked against."""

from __future__ import annotations


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Continue each prompt greedily; returns only the new text. One prompt at a time, so
    padding cannot change a result."""
    import torch

    outs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        outs.append(tokenizer.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return outs
