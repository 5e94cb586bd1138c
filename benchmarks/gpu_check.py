"""The GPU paths that have never run, as one prepared check (`scripts/gpu_check.sh`).

On a machine with CUDA GPUs, on the embedded Gemma 3 270M and the demo data, each step in
order (a failing step is recorded with its error and the next one still runs):

  env          torch, CUDA, GPUs, vLLM
  covariance   the covariance stage with one actor per GPU (up to 2), and on the CPU: time
               of each, relative difference of the GPU store from the CPU one; and KORE's
               reference collection against ours on one GPU (speedup_vs_kore_reference)
  init         KORE's null-space init with the covariances on the GPU (cuSOLVER eigh) and on
               the CPU: time of each, the largest principal angle between their A0 row spaces
  train_ddp    KORE, bfloat16 base weights, nccl, one worker per GPU: step time, tokens/s,
               loss at the first and last step
  train_fsdp   LoRA with train.strategy=fsdp on the same workers
  serve        vLLM on CUDA serving 4 adapters on one base (the two trained ones and two
               copies): every adapter answers, requests/s over all of them

    bash scripts/gpu_check.sh [--out runs/gpu_check.json] [--only train_ddp,serve] [--dry-run]

Each step prepares what it needs from the earlier ones (augmentation, covariance, inits), so
`--only` runs a step alone; `serve` needs the adapters of both training steps. The machine
needs the project installed with its GPU dependencies (Ray, a CUDA build of vLLM). --dry-run
needs no GPU: it builds and validates every step's config and writes the plan.
Writes one JSON: {"steps": {name: {"ok", "seconds", ...results or "error"}}, "env": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STEPS = ("env", "covariance", "init", "train_ddp", "train_fsdp", "serve")
DEMO = ROOT / "data" / "demo"


def configs(run_dir: Path, gpus: int) -> dict:
    """Each step's pipeline config: the demo's, on GPUs."""
    from kore_ray.config import load_config

    workers = max(1, min(gpus, 2))
    common = [f"run_dir={run_dir}", "augment.generators=[extractive]", "augment.self_items=all",
              f"covariance.num_actors={workers}", "covariance.use_gpu=true",
              "train.use_gpu=true", f"train.num_workers={workers}", "train.cpus_per_worker=2",
              "train.max_steps=30", "train.checkpoint_every=10", "serve.use_gpu=true",
              "serve.cpu_reserved_cores=null", "serve.kv_cache_gib=null"]
    demo = ROOT / "configs" / "demo.yaml"
    return {
        "covariance": load_config(demo, common),
        "covariance_cpu": load_config(demo, [*common, "covariance.use_gpu=false",
                                             f"run_dir={run_dir / 'cpu'}"]),
        "train_ddp": load_config(demo, common).for_method("kore"),
        "train_fsdp": load_config(demo, [*common, "train.strategy=fsdp",
                                         "train.run_name=gpu-check-fsdp"]).for_method("lora"),
        "serve": load_config(demo, common),
    }


def _median_step(cfg, method: str) -> dict:
    from kore_ray.run_dir import METRICS, RunDir

    rows = [json.loads(line) for line in
            (RunDir(cfg.run_dir).train(method) / METRICS).read_text().splitlines()]
    later = rows[1:] or rows  # the first step includes compilation and warm-up
    return {"steps": len(rows), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "step_s_median": statistics.median(r["step_s"] for r in later),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in later)}


def step_env(cfgs) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["vllm"] = f"import failed: {e}"
    return out


def _prepared(cfgs, methods=()) -> None:
    """What a step needs from the earlier ones (each is skipped when already there), so a
    step also runs alone (--only)."""
    from kore_ray.augment import run_augment
    from kore_ray.constraint.covariance_stage import run_covariance
    from kore_ray.constraint.init_stage import run_init

    cfg = cfgs["covariance"]
    run_augment(cfg, progress=False)  # extractive only: no model, no Ray
    run_covariance(cfg, progress=False)
    for method in methods:
        run_init(cfg.for_method(method), method)


def step_covariance(cfgs) -> dict:
    from kore_ray.constraint.covariance_stage import run_covariance

    _prepared(cfgs)
    t0 = time.perf_counter()
    gpu = run_covariance(cfgs["covariance"], force=True, progress=False)
    t1 = time.perf_counter()
    cpu = run_covariance(cfgs["covariance_cpu"], force=True, progress=False)
    t2 = time.perf_counter()
    rel = max(((gpu.sums[k] - cpu.sums[k]).abs().max() / cpu.sums[k].abs().max()).item()
              for k in cpu.sums)
    return {"gpu_s": round(t1 - t0, 2), "cpu_s": round(t2 - t1, 2), "rel_diff_vs_cpu": rel,
            "tokens": gpu.tokens[next(iter(gpu.tokens))], **_versus_kore_reference()}


def _versus_kore_reference() -> dict:
    """benchmarks/covariance.py's peer ratio on one GPU: KORE's reference collection (a hook
    on every linear, batch 1) over ours on the same tokens, best of 3 each."""
    import torch
    from _common import token_batches
    from covariance import kore_reference  # benchmarks/covariance.py

    from kore_ray.constraint.covariance import collect_covariance
    from kore_ray.models import load_model
    from kore_ray.models.gemma import embedded_gemma_path
    from kore_ray.models.targets import find_target_groups

    model, tokenizer = load_model(str(embedded_gemma_path()), "bfloat16", "cuda")
    groups = find_target_groups(model)
    batches = [{k: v.cuda() for k, v in b.items()}
               for b in token_batches(tokenizer, 8, 16, 64, 128)]
    sequences = [b["input_ids"][i][b["attention_mask"][i].bool()]
                 for b in batches for i in range(len(b["input_ids"]))]

    def best(fn) -> float:
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    ours = best(lambda: collect_covariance(model, batches, groups, normalize="sample_max"))
    theirs = best(lambda: kore_reference(model, sequences))
    return {"speedup_vs_kore_reference": round(theirs / ours, 2), "ours_s": round(ours, 3),
            "kore_reference_s": round(theirs, 3)}


def step_init(cfgs) -> dict:
    import torch
    from init import row_space_angle  # benchmarks/init.py

    from kore_ray.constraint.adapters import kore_init
    from kore_ray.constraint.store import load_store
    from kore_ray.models import load_model
    from kore_ray.models.targets import find_target_groups
    from kore_ray.run_dir import RunDir

    _prepared(cfgs)
    cfg = cfgs["train_ddp"]
    store = load_store(RunDir(cfg.run_dir).covariance)
    model, _ = load_model(cfg.model.name_or_path)
    groups = find_target_groups(model)
    t0 = time.perf_counter()
    cpu = kore_init(model, store, groups, cfg.init.rank).factors
    t1 = time.perf_counter()
    model.cuda()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    gpu = kore_init(model, store, groups, cfg.init.rank).factors
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    angle = max(row_space_angle(cpu[n][0], gpu[n][0].cpu()) for n in cpu)
    return {"cpu_s": round(t1 - t0, 2), "gpu_s": round(t3 - t2, 2),
            "max_principal_angle": angle, "modules": len(cpu)}


def step_train_ddp(cfgs) -> dict:
    from kore_ray.train import run_train

    _prepared(cfgs, ["kore"])
    cfg = cfgs["train_ddp"]
    run_train(cfg, "kore", progress=False)
    return {"workers": cfg.train.num_workers, **_median_step(cfg, "kore")}


def step_train_fsdp(cfgs) -> dict:
    from kore_ray.train import run_train

    _prepared(cfgs, ["lora"])
    cfg = cfgs["train_fsdp"]
    run_train(cfg, "lora", progress=False)
    return {"workers": cfg.train.num_workers, **_median_step(cfg, "lora")}


def step_serve(cfgs) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from kore_ray.run_dir import RunDir
    from kore_ray.serve.serve_stage import serving

    cfg = cfgs["serve"]
    adapters = RunDir(cfg.run_dir).adapters
    missing = [m for m in ("kore", "lora") if not (adapters / m / "adapter_config.json").is_file()]
    if missing:
        raise RuntimeError(f"no trained adapter for {missing}: run train_ddp and train_fsdp first")
    names = ["kore", "lora", "kore-copy", "lora-copy"]
    for name in names[2:]:
        if not (adapters / name).is_dir():
            shutil.copytree(adapters / name.removesuffix("-copy"), adapters / name)
    with serving(cfg) as url:
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)
        served = {m.id for m in client.models.list().data}

        def ask(i: int) -> str:
            return client.completions.create(model=names[i % 4], prompt="Question: Who "
                                             f"founded item {i}?\nAnswer:", max_tokens=16,
                                             temperature=0).choices[0].text

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(64)))
        seconds = time.perf_counter() - t0
    return {"served": sorted(served), "all_adapters_served": set(names) <= served,
            "answered": sum(bool(a.strip()) for a in answers), "requests": len(answers),
            "requests_per_s": round(len(answers) / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"))
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "gpu_check"))
    parser.add_argument("--only", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)}, run in that order")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: validate every step's config and write the plan")
    args = parser.parse_args(argv)
    steps = [s for s in args.only.split(",") if s]
    if unknown := [s for s in steps if s not in STEPS]:
        parser.error(f"unknown steps {unknown}; valid: {','.join(STEPS)}")
    import torch

    gpus = torch.cuda.device_count()
    if not gpus and not args.dry_run:
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.device_count() == 0); "
              "--dry-run checks the plan without one", file=sys.stderr)
        return 3
    cfgs = configs(Path(args.run_dir), gpus)
    report = {"dry_run": args.dry_run, "gpus": gpus, "steps": {}}
    for name in steps:
        if args.dry_run:
            report["steps"][name] = {"planned": True, "config": {
                k: v.model_dump(mode="json", include={"train", "covariance", "serve"})
                for k, v in cfgs.items() if k.startswith(name)}}
            continue
        print(f"gpu_check: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **globals()[f"step_{name}"](cfgs)}
        except Exception as e:  # noqa: BLE001 - one failed path must not hide the others
            result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["steps"][name] = result
        print(f"gpu_check: {name}: {json.dumps({k: v for k, v in result.items() if k != 'traceback'})}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v.get("ok", v.get("planned")) for k, v in report["steps"].items()}))
    return 0 if all(v.get("ok", True) for v in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
