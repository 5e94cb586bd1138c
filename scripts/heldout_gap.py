"""Memorised or not retrieved? For each held-out question a run missed or answered, ask the
trained adapter the training questions whose target holds the same gold answer.

If the adapter answers those training questions but not the held-out one, the fact is stored
and the held-out phrasing does not reach it; if it misses them too, the fact is not stored.
Greedy decoding with transformers (the served path's reference), up to 4 training questions
per held-out question, on CPU: a few minutes for 60 questions.

    python scripts/heldout_gap.py runs/X [--method kore]

The last line is JSON: held-out CEM, how many held-out questions have a training pair, the
share of those training questions answered, and held-out CEM where they are answered.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel

from kore_ray.data.tokenize import render
from kore_ray.evaluate.metrics import cover_exact_match
from kore_ray.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--method", default="kore")
    ap.add_argument("--model", default="gemma-3-270m")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model, "float32", device="cpu")
    model = PeftModel.from_pretrained(model, str(args.run / "adapter" / args.method)).eval()
    conv = pd.read_parquet(args.run / "augmented" / "conversations.parquet")
    pred = pd.read_parquet(args.run / "eval" / "predictions.parquet")
    pred = pred[(pred.method == args.method) & (pred.set == "adaptation")]
    pairs = [(kid, [m["content"] for m in json.loads(msgs)])
             for kid, msgs in zip(conv.knowledge_id, conv.messages)]

    def ask(question: str) -> str:
        prompt = render(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=16, do_sample=False)
        return tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True)

    rows = []
    for _, r in pred.iterrows():
        item = r.id[:-1]  # question ids are <item id><letter>
        train = [q for kid, (q, *rest) in pairs if kid == item and len(rest) == 1 and
                 len(rest[0]) < 80 and cover_exact_match(rest[0], r.gold)][:4]
        answered = sum(cover_exact_match(ask(q), r.gold) for q in train)
        rows.append({"id": r.id, "heldout": bool(r.cem), "asked": len(train), "answered": answered})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    has = df[df.asked > 0]
    known = has[has.answered > 0]
    print(json.dumps({
        "heldout_cem": round(df.heldout.mean(), 3),
        "questions_with_training_pair": len(has),
        "training_questions_answered": round(has.answered.sum() / max(1, has.asked.sum()), 3),
        "heldout_cem_where_training_answered": round(known.heldout.mean(), 3) if len(known) else None,
    }))


if __name__ == "__main__":
    main()
