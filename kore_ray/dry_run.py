"""`kore inject --dry-run CONFIG`: check everything a run needs and say what each stage would do,
without starting Ray, serving or training.

Checks: the config (already validated when it loaded), every input file row by row (as
`kore validate`), and that the model's config loads. Estimates per stage: requests,
conversations (the deterministic part exactly: templates, given Q&A, extractive pairs), tokens,
training steps and sequences, evaluation requests.
"""

from __future__ import annotations

from kore_ray.config import PipelineConfig
from kore_ray.data.validate import KINDS, detect_kind
from kore_ray.errors import InputError
from kore_ray.methods import METHODS

_FILES = [("knowledge", "knowledge"), ("eval_questions", "question"), ("retention", None),
          ("retention_eval", "retention")]
SHOWN_ERRORS = 10


def _check_file(path: str, kind: str | None, say) -> tuple[list, int]:
    """(good records, number of bad rows); every bad row is printed (the first few)."""
    from kore_ray.data.io import iter_rows

    kind = kind or detect_kind(path)
    records, bad, shown = [], 0, 0
    for row in iter_rows(path, KINDS[kind]):
        if row.errors:
            bad += 1
            for error in row.errors:
                if shown < SHOWN_ERRORS:
                    say(f"    {error}")
                shown += 1
        else:
            records.append(row.record)
    if shown > SHOWN_ERRORS:
        say(f"    ... and {shown - SHOWN_ERRORS} more problems (kore validate {path} lists all)")
    return records, bad


def _model(cfg: PipelineConfig, say):
    """The model's tokenizer when it loads without converting anything, else None."""
    from transformers import AutoConfig, AutoTokenizer

    from kore_ray.models import gemma
    from kore_ray.models.loading import EMBEDDED, resolve_model_path

    name = cfg.model.name_or_path
    if name in EMBEDDED and not (gemma.cache_root() / "models" / name / "config.json").is_file():
        say(f"model: {name} (embedded), converted from the package's GGUF on first use "
            "(about 1-2 minutes); token counts below are estimates (4 characters a token)")
        return None
    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", config)
    say(f"model: {name}: {config.model_type}, {text.num_hidden_layers} layers, hidden "
        f"{text.hidden_size}, vocabulary {text.vocab_size:,}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return getattr(tokenizer, "tokenizer", tokenizer)


def _tokens(tokenizer, records: list, limit: int) -> int:
    """Tokens the covariance would see (each sequence cut at `limit`)."""
    from kore_ray.data.tokenize import encode_retention

    if tokenizer is None:
        return sum(min(limit, len(r.model_dump_json()) // 4) for r in records)
    return sum(len(encode_retention(tokenizer, r, limit)) for r in records)


def dry_run(cfg: PipelineConfig, methods: list[str] | None = None, say=print) -> int:
    """Print the checks and the plan; 0 when the run can start, 1 when an input is bad."""
    from kore_ray.augment.augment_stage import fact_tree
    from kore_ray.augment.dedup import drop_near_duplicates
    from kore_ray.augment.templates import template_tree
    from kore_ray.train.data import planned_steps

    methods = list(methods or cfg.evaluate.methods)
    cfg.check_servable(methods)
    say(f"config: valid; run directory {cfg.run_dir}; methods {', '.join(methods)}")
    records, bad_files = {}, 0
    for field, kind in _FILES:
        path = getattr(cfg.data, field)
        if path is None:
            say(f"data.{field}: not set")
            continue
        try:
            records[field], bad = _check_file(path, kind, say)
        except InputError as e:
            say(f"data.{field}: {e}")
            bad_files += 1
            continue
        bad_files += bool(bad)
        say(f"data.{field}: {path}: {len(records[field])} good rows"
            + (f", {bad} bad" if bad else ""))
    if cfg.data.knowledge is None:
        raise InputError("data.knowledge is not set: nothing to inject")
    tokenizer = _model(cfg, say)

    a = cfg.augment
    items = records.get("knowledge", [])
    generators = a.active_generators()
    fixed = [g for g in generators if g == "extractive"]
    conversations = 0
    for item in items:
        tree, _ = template_tree(item, a.templates_per_item, a.seed)
        facts, _, _ = fact_tree(item, fixed, None, [], [])
        conversations += len(drop_near_duplicates(tree + facts, a.dedup_threshold)[0])
    asked = [i for i in items if a.self_items == "all" or not i.qa] if "self" in generators else []
    say(f"augment: {len(items)} items ({sum(bool(i.qa) for i in items)} with qa), generators "
        f"{', '.join(generators)}: {conversations} conversations from templates, qa and the "
        f"extractive generator"
        + (f"; the self generator asks the served base model about {len(asked)} items "
           f"({len(asked) * a.self_candidates} sampled candidates, then one check per pair)"
           if asked else "")
        + (f"; the endpoint {a.base_url} gets {len(items)} dialogue requests"
           if "endpoint" in generators and a.base_url else ""))
    if any(METHODS[m].needs_store for m in methods):
        retention = records.get("retention", [])
        tokens = _tokens(tokenizer, retention, cfg.covariance.max_length)
        say(f"covariance: {len(retention)} retention sequences, about {tokens:,} tokens, on "
            f"{cfg.covariance.num_actors} actor(s)")
    empty = []  # methods whose plan has no step: training would refuse to start
    more = bool(asked) or ("endpoint" in generators and a.base_url)  # counted above: a floor
    for method in methods:
        mt = cfg.for_method(method).train
        try:
            steps, problem = planned_steps(conversations, mt.batch_size, mt.epochs,
                                           mt.max_steps), None
        except InputError as e:  # with `more`, the count is a floor: training may have steps
            steps, problem = 0, e
        at_least = "at least " if more and mt.max_steps is None else ""
        say(f"train {method}: {at_least}{steps} steps of {mt.batch_size} sequences "
            f"({steps * mt.batch_size / max(conversations, 1):.1f} epochs of the "
            f"{conversations}{'+' if more else ''} conversations), lr {mt.learning_rate:g}, "
            f"{mt.num_workers} worker(s)")
        if problem and not more:
            say(f"    {problem}")
            empty.append(method)
    questions = len(records.get("eval_questions", []))
    probes = len(records.get("retention_eval", []))
    say(f"evaluate: {questions} questions and {probes} retention probes to the base and "
        f"{len(methods)} adapter(s): {(questions + probes) * (len(methods) + 1)} requests")
    if bad_files:
        say(f"dry run: {bad_files} input file(s) have problems; fix them before the run")
    if empty:
        say(f"dry run: training {', '.join(empty)} would have no step; fix train.* first")
    if bad_files or empty:
        return 1
    say("dry run: everything checks; nothing was trained")
    return 0
