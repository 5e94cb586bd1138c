"""`kore demo`: the whole pipeline on the embedded default.

The stages land one issue at a time; until the pipeline is complete the demo runs the
end-to-end path that exists: convert the embedded Gemma 3 270M once and show that the
converted model knows the facts that retention will later be measured on.
"""

from __future__ import annotations

from kore_ray.config import load_config

# (prompt, expected substring): facts the base model knows (STACK.md).
KNOWN_FACTS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The chemical symbol for gold is", "Au"),
    ("Albert Einstein was born in the year", "1879"),
]


def run_demo(config_path=None, overrides=()) -> int:
    from kore_ray.models import load_model
    from kore_ray.models.generate import greedy_continuations

    cfg = load_config(config_path, list(overrides))
    print(f"kore demo: loading {cfg.model.name_or_path} ...")
    model, tok = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype)
    outs = greedy_continuations(model, tok, [p for p, _ in KNOWN_FACTS], max_new_tokens=8)
    ok = 0
    for (prompt, want), got in zip(KNOWN_FACTS, outs):
        hit = want in got
        ok += hit
        print(f"  [{'ok' if hit else 'MISS'}] {prompt!r} -> {got!r}")
    print(f"kore demo: the base model knows {ok}/{len(KNOWN_FACTS)} probe facts.")
    print("kore demo: augmentation, covariance, training and serving stages are not implemented yet.")
    return 0 if ok == len(KNOWN_FACTS) else 1
