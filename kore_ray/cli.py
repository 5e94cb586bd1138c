"""`kore`: one subcommand per pipeline stage (DESIGN.md, "Interfaces people and scripts rely on")."""

from __future__ import annotations

import argparse
import sys

from kore_ray.errors import KoreError
from kore_ray.methods import METHODS

STAGES = {
    "augment": "Turn knowledge items into training conversations (KORE-AUGMENTATION).",
    "covariance": "Collect per-layer input covariance on retention data.",
    "init": "Null-space adapter initialisation from a covariance store (KORE-CONSTRAINT).",
    "train": "Fine-tune from the initialisation on Ray Train.",
    "export": "Export a trained checkpoint as a plain LoRA for the unmodified base (train does it at its end).",
    "serve": "Serve the base model and its adapters (Ray Serve + vLLM, OpenAI API).",
    "evaluate": "Measure adaptation (CEM, F1) and retention through the served endpoint.",
    "inject": "Run the whole pipeline from a config.",
    "continual": "Inject knowledge batch after batch: versions that protect the earlier ones, gated.",
}


def _config(args):
    from kore_ray.config import load_config

    return load_config(args.config, args.set)


def _augment(args) -> int:
    from kore_ray.augment import run_augment

    summary = run_augment(_config(args))
    print(f"kore augment: outputs in {summary['outputs']['conversations']}")
    return 0


def _covariance(args) -> int:
    from kore_ray.constraint.covariance_stage import run_covariance

    run_covariance(_config(args), add_to=args.add_to, force=args.force)
    return 0


def _init(args) -> int:
    from kore_ray.constraint.init_stage import run_init

    cfg = _config(args)
    for method in args.method or [cfg.init.method]:
        run_init(cfg.for_method(method), method, force=args.force)
    return 0


def _train(args) -> int:
    from kore_ray.train.train_stage import run_train

    cfg = _config(args)
    for method in args.method or [cfg.init.method]:
        run_train(cfg.for_method(method), method)
    return 0


def _export(args) -> int:
    from kore_ray.train.export_stage import run_export

    cfg = _config(args)
    methods = args.method or [cfg.init.method]
    if args.checkpoint and len(methods) > 1:
        raise KoreError("--checkpoint belongs to one method; give one --method")
    for method in methods:
        run_export(cfg.for_method(method), method, args.checkpoint)
    return 0


def _serve(args) -> int:
    from kore_ray.serve.serve_stage import run_serve

    run_serve(_config(args), blocking=True)
    return 0


def _evaluate(args) -> int:
    from kore_ray.evaluate.evaluate_stage import run_evaluate

    run_evaluate(_config(args), args.method, base_url=args.base_url)
    return 0


def _inject(args) -> int:
    from kore_ray.config import load_config
    from kore_ray.pipeline import run_inject

    if args.config_file and args.config:
        raise KoreError("give the config once: `kore inject CONFIG` or `--config CONFIG`")
    cfg = load_config(args.config_file or args.config, args.set)
    if args.dry_run:
        from kore_ray.dry_run import dry_run

        return dry_run(cfg, args.method)
    run_inject(cfg, args.method)
    return 0


def _continual(args) -> int:
    from kore_ray.config import load_config
    from kore_ray.continual.continual_stage import run_continual

    if args.config_file and args.config:
        raise KoreError("give the config once: `kore continual CONFIG` or `--config CONFIG`")
    run_continual(load_config(args.config_file or args.config, args.set))
    return 0


def _demo(args) -> int:
    from kore_ray.demo import run_demo

    return run_demo(args.config, args.set)


def _validate(args) -> int:
    from kore_ray.data.validate import validate_file

    return validate_file(args.file, kind=args.kind)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kore",
        description="kore-ray: inject new knowledge into LLMs without forgetting (KORE), on Ray.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, Serve's and vLLM's own INFO lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, help_, func):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", metavar="FILE.yaml", help="pipeline config (YAML)")
        p.add_argument(
            "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override a config value, e.g. --set train.learning_rate=1e-3 (repeatable)",
        )
        p.set_defaults(func=func)
        return p

    handlers = {"augment": _augment, "covariance": _covariance, "init": _init, "train": _train,
                "export": _export, "serve": _serve, "evaluate": _evaluate, "inject": _inject,
                "continual": _continual}
    parsers = {
        name: add(name, help_, handlers[name])
        for name, help_ in STAGES.items()
    }
    for name, what in [("init", "initialise"), ("train", "train"), ("export", "export"), ("evaluate", "evaluate"),
                       ("inject", "run")]:
        parsers[name].add_argument(
            "--method", action="append", choices=list(METHODS),
            help=f"{what} this method (repeatable; default from the config)",
        )
    for name in ("covariance", "init"):
        parsers[name].add_argument("--force", action="store_true", help="redo up-to-date work")
    parsers["covariance"].add_argument(
        "--add-to", metavar="STORE", help="add this data to an existing store of the same model")
    parsers["export"].add_argument(
        "--checkpoint", metavar="DIR", help="export this checkpoint (default: the run's latest)")
    parsers["evaluate"].add_argument(
        "--base-url", help="an endpoint already serving this run's adapters (default: start one)")
    for name in ("inject", "continual"):
        parsers[name].add_argument("config_file", nargs="?", metavar="CONFIG", help="pipeline config")
    parsers["inject"].add_argument(
        "--dry-run", action="store_true",
        help="check the config, every input file and the model; print each stage's plan and "
             "cost; train nothing")
    add("demo", "The whole pipeline on the embedded default (Gemma 3 270M, local Ray).", _demo)
    v = sub.add_parser(
        "validate", help="Check an input file against its schema; lists every bad row.",
        description="Check a knowledge, question, retention or conversation file (JSONL/Parquet).",
    )
    v.add_argument("file")
    v.add_argument(
        "--kind", choices=["knowledge", "question", "retention", "conversation", "llava"],
        help="the file's schema (default: recognised from its fields)",
    )
    v.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        import os

        os.environ["KORE_VERBOSE"] = "1"  # Ray's, Ray Data's, Serve's and vLLM's INFO lines too
    if args.command != "validate" and not getattr(args, "dry_run", False):  # these run on Ray
        from kore_ray.logs import quiet_driver

        quiet_driver()
    try:
        return args.func(args)
    except KoreError as e:
        print(f"kore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
