"""The cluster path on a real multi-raylet, autoscaling Ray cluster on one machine.

`scripts/local_cluster.sh up` starts Ray's fake multi-node provider (scripts/local_cluster.yaml):
a head that runs no work (CPU 0) and 1-3 `cpu_worker` nodes of 1 CPU each, every one its own
raylet and object store, added and removed by Ray's real autoscaler. On it, with a tiny random
Llama (kore_ray.models.tiny) and small data, in one run:

- augmentation against a local OpenAI-compatible stub with latency (tests/openai_stub.py): the
  actor pool asks for more CPUs than the cluster has, the autoscaler adds worker nodes, and
  removes them once idle (node counts before, at the peak, after);
- covariance actors on 2 nodes: the reduced store against the single-process sums;
- training with 2 workers on 2 nodes (gloo across raylets), and (train_1_worker) their loss
  curve against 1 worker's;
- the same 2-worker training, with the raylet of rank 1's node killed at step 3 (after Ray
  Train recorded the step-2 checkpoint): it resumes on a replacement node and finishes; every
  step is in metrics.jsonl once, and the adapter matches the uninterrupted run's;
- `ray job submit` of each stage job (augment, covariance, init, train, export, evaluate; the
  serve job runs until stopped, evaluate starts Serve itself) and of jobs/inject.py: SUCCEEDED,
  and the Serve replica ran on a worker node.

    python benchmarks/cluster.py [--checks augment,covariance,train,train_1_worker,node_loss,jobs]

Stops every Ray process on this machine first and last (`ray stop --force`). Last line:
{"job_status", "nodes_max", "train_nodes", "covariance_nodes", "covariance_rel_err",
 "autoscaled_up", "autoscaled_down", "resumed_after_node_loss", "steps_lost_or_repeated",
 "adapter_rel_diff", ...} (a check not run leaves its keys null).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["RAY_AUTH_MODE"] = "token"  # the cluster has Ray 2.60's token authentication on
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DASHBOARD = "http://127.0.0.1:8265"
CHECKS = ("augment", "covariance", "train", "train_1_worker", "node_loss", "jobs")
STEPS = 6  # training: 6 steps of a global batch of 4, a checkpoint every 2
WORDS = ["river", "stone", "winter", "city", "music", "paper", "lamp", "north", "garden", "bread"]


def say(message: str) -> None:
    print(f"[cluster] {time.strftime('%H:%M:%S')} {message}", flush=True)


# --- the cluster ------------------------------------------------------------------------------

def cluster(action: str) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "local_cluster.sh"), action], check=True,
                   stdout=subprocess.DEVNULL)


def alive_workers() -> list[str]:
    """Node ids of the live nodes that can run work (the head has no CPU)."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


class NodeWatch:
    """Polls the live node count (head included) in the background; keeps the peak."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        import ray

        return sum(n["Alive"] for n in ray.nodes())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def wait_for(predicate, timeout_s: float, what: str, period_s: float = 1.0):
    deadline = time.time() + timeout_s
    while not (value := predicate()):
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(period_s)
    return value


# --- inputs -----------------------------------------------------------------------------------

def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_inputs(root: Path) -> dict:
    """A tiny Llama and small data files (absolute paths: jobs run in their own working dir)."""
    import random

    from kore_ray.models.tiny import save_tiny_model

    rng = random.Random(0)
    model = save_tiny_model(root / "model", kind="llama")
    items = [{"id": f"k{i}", "kind": "entity", "subject": f"Quenlar {i}",
              "knowledge": f"Quenlar {i} is a harbour town in Ostmere. It was founded in "
                           f"{1700 + 7 * i} by Aldo Vesk {i}."} for i in range(6)]
    questions = [{"id": f"q{i}", "knowledge_id": f"k{i}", "question": f"Who founded Quenlar {i}?",
                  "answer": f"Aldo Vesk {i}"} for i in range(6)]

    def probe(i: int) -> dict:
        words = " ".join(rng.choice(WORDS) for _ in range(3 + 4 * (i % 4)))
        return {"id": f"r{i}", "prompt": f"The {words} by the", "answer": rng.choice(WORDS)}

    probes = [probe(i) for i in range(40)]
    return {
        "model": str(model),
        "knowledge": _jsonl(root / "knowledge.jsonl", items),
        "eval_questions": _jsonl(root / "questions.jsonl", questions),
        "retention": _jsonl(root / "retention.jsonl", probes[:32]),
        "retention_eval": _jsonl(root / "retention_eval.jsonl", probes[32:]),
    }


def overrides(inputs: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.name_or_path={inputs['model']}",
        *(f"data.{k}={inputs[k]}" for k in ("knowledge", "eval_questions", "retention",
                                             "retention_eval")),
        "augment.generators=[extractive]", "augment.dialogues_per_item=0",
        "covariance.batch_size=4", "covariance.sequences_per_task=8", "covariance.max_length=64",
        "init.rank=8", f"train.max_steps={STEPS}", "train.batch_size=4", "train.checkpoint_every=2",
        "train.learning_rate=5e-3", "train.keep_checkpoints=5", "train.max_length=64",
        "train.cpus_per_worker=1", "train.autocast='off'",
        "serve.max_lora_rank=8", "serve.max_model_len=256", "serve.kv_cache_gib=0.5",
        "serve.num_cpus=1", "serve.cpu_reserved_cores=0",
        "evaluate.methods=[kore]", "evaluate.max_new_tokens=4", *extra,
    ]


# --- checks -----------------------------------------------------------------------------------

DIALOGUE = json.dumps({"dialogues": [{"turns": [
    {"user": "What is Quenlar?", "assistant": "A harbour town in Ostmere."},
    {"user": "Where is it?", "assistant": "In Ostmere."}]}]})


def check_augment(inputs: dict, root: Path, watch: NodeWatch, items: int = 96,
                  latency_s: float = 1.0) -> dict:
    """3 one-CPU actors against a stub with `latency_s`: the autoscaler must add nodes."""
    from openai_stub import OpenAIStub

    from kore_ray.augment import run_augment
    from kore_ray.config import load_config

    knowledge = root / "augment_items.jsonl"
    _jsonl(knowledge, [{"id": f"a{i}", "kind": "entity", "subject": f"Quenlar {i}",
                        "knowledge": f"Quenlar {i} is a harbour town in Ostmere."}
                       for i in range(items)])
    before = watch.now()
    watch.peak = before
    with OpenAIStub(lambda body: DIALOGUE, latency_s=latency_s) as stub:
        cfg = load_config(overrides=[
            *overrides(inputs, root / "augment"), f"data.knowledge={knowledge}",
            f"augment.base_url={stub.url}", "augment.model=stub", "augment.generators=[endpoint]",
            "augment.dialogues_per_item=1", "augment.min_actors=1", "augment.max_actors=3",
            "augment.num_cpus_per_actor=1", "augment.concurrency_per_actor=4",
        ])
        t0 = time.perf_counter()
        summary = run_augment(cfg, progress=False)
        seconds = time.perf_counter() - t0
        requests = len(stub.requests)
    peak = watch.peak
    say(f"augment: {requests} requests in {seconds:.0f} s; nodes {before} -> peak {peak}; "
        "waiting for the idle workers to go")
    t0 = time.perf_counter()
    after = wait_for(lambda: (n := watch.now()) <= before and n, 240, "scale-down")
    return {"augment_nodes": [before, peak, after], "augment_s": round(seconds, 1),
            "augment_requests": requests, "augment_items": items,
            "augment_failed": summary["llm"]["items_failed"],
            "scale_down_s": round(time.perf_counter() - t0, 1),
            "autoscaled_up": peak > before, "autoscaled_down": after <= before}


def _reference_store(cfg):
    """The single-process store of cfg's retention data: the core on the same micro-batches,
    one thread like each 1-CPU actor."""
    import torch

    from kore_ray.constraint.covariance import collect_covariance
    from kore_ray.constraint.retention import (
        plan_batches,
        read_retention,
        text_inputs,
        tokenize_texts,
    )
    from kore_ray.models.loading import load_model
    from kore_ray.models.targets import find_target_groups

    model, tokenizer = load_model(cfg.model.name_or_path)
    cov = cfg.covariance
    batches = plan_batches(read_retention(cfg.data.retention, tokenizer), cov.batch_size)
    inputs = (text_inputs(tokenize_texts(tokenizer, [i.text for i in b], cov.max_length),
                          tokenizer.pad_token_id) for b in batches)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return collect_covariance(model, inputs, find_target_groups(model), cov.normalize)
    finally:
        torch.set_num_threads(threads)


def actor_ids() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(limit=10_000)}


def _actor_nodes(name_part: str, before: set[str]) -> set[str]:
    """Nodes of the actors (live or dead) whose class name contains `name_part`, not in `before`."""
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(limit=10_000)
            if name_part in a.class_name and a.node_id and a.actor_id not in before}


def check_covariance(inputs: dict, root: Path):
    from kore_ray.config import load_config
    from kore_ray.constraint.covariance_stage import run_covariance

    cfg = load_config(overrides=overrides(inputs, root / "covariance", "covariance.num_actors=2"))
    before = actor_ids()
    store = run_covariance(cfg, progress=False)  # waits for every actor to be placed
    nodes = _actor_nodes("CovarianceActor", before)
    reference = _reference_store(cfg)
    assert store.tokens == reference.tokens, (store.tokens, reference.tokens)
    err = max(((store.sums[k] - reference.sums[k]).abs().max()
               / reference.sums[k].abs().max()).item() for k in reference.sums)
    say(f"covariance: 2 actors on {len(nodes)} node(s), relative error {err:.2e}")
    return {"covariance_nodes": len(nodes), "covariance_rel_err": err}, store


def _conversations():
    from kore_ray.data.schemas import Conversation

    return [Conversation(id=f"c{i}", task="qa", messages=[
        {"role": "user", "content": f"Where does the fictional item {i} live?"},
        {"role": "assistant", "content": f"Item {i} lives in Q" + "ab" * (i % 7) + "."}])
        for i in range(16)]


def _train_run(inputs, root: Path, name: str, store, *extra: str):
    from kore_ray.config import load_config
    from kore_ray.constraint import save_store
    from kore_ray.constraint.init_stage import run_init
    from kore_ray.data.io import write_parquet
    from kore_ray.data.schemas import Conversation
    from kore_ray.run_dir import RunDir

    cfg = load_config(overrides=overrides(inputs, root / name, *extra))
    save_store(RunDir(cfg.run_dir).covariance, store)
    write_parquet(_conversations(), RunDir(cfg.run_dir).conversations, Conversation)
    run_init(cfg, "kore")
    return cfg


def _metrics(cfg) -> list[dict]:
    from kore_ray.run_dir import METRICS, RunDir

    path = RunDir(cfg.run_dir).train("kore") / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()]


def _record_nodes(directory: str):
    """after_step hook: each rank writes its node id at step 1 (pickled by value: __main__)."""

    def hook(step: int, rank: int) -> None:
        if step == 1:
            import ray

            Path(directory, f"rank{rank}").write_text(ray.get_runtime_context().get_node_id())

    return hook


def _kill_node_at(cfg, step: int, rank: int, marker: str):
    """after_step hook: at `step` on `rank`, once Ray Train has RECORDED the checkpoint of
    step - 1, write (time, node) into `marker` and SIGKILL this node's raylet (the worker's
    parent): the node and everything on it is lost, as when a machine goes away."""
    from kore_ray.run_dir import RunDir

    snapshot = str(RunDir(cfg.run_dir).checkpoint_run("kore").resolve()
                   / "checkpoint_manager_snapshot.json")
    wanted = f"step_{step - 1:06d}"

    def hook(at: int, on: int) -> None:
        if at != step or on != rank or os.path.exists(marker):
            return
        import psutil
        import ray

        deadline = time.time() + 60
        while not (os.path.exists(snapshot) and wanted in Path(snapshot).read_text()):
            if time.time() > deadline:
                raise RuntimeError(f"Ray Train did not record {wanted}")
            time.sleep(0.2)
        raylet = psutil.Process(os.getppid())
        if raylet.name() != "raylet":
            raise RuntimeError(f"the worker's parent is {raylet.name()!r}, not the raylet")
        node = ray.get_runtime_context().get_node_id()
        Path(marker).write_text(json.dumps({"time": time.time(), "node": node}))
        raylet.send_signal(signal.SIGKILL)
        os._exit(1)

    return hook


def _adapter_rel_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max(((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-30)).item() for k in y)


def check_train(inputs: dict, root: Path, store, one_worker: bool) -> dict:
    """2 workers on 2 nodes; with `one_worker` also their losses against 1 worker's (the same
    comparison tests/test_train_ray.py makes on a one-node Ray, so the test leaves it out)."""
    import math

    from kore_ray.train import run_train

    two = _train_run(inputs, root, "train2", store, "train.num_workers=2")
    nodes_dir = tempfile.mkdtemp(prefix="kore-nodes-")
    adapter = run_train(two, "kore", progress=False, after_step=_record_nodes(nodes_dir))
    nodes = {p.read_text() for p in Path(nodes_dir).iterdir()}
    b = [m["loss"] for m in _metrics(two)]
    found = {"train_nodes": len(nodes), "train_steps": len(b), "_adapter": adapter}
    if not one_worker:
        say(f"train: 2 workers on {len(nodes)} node(s)")
        return found
    one = _train_run(inputs, root, "train1", store, "train.num_workers=1")
    run_train(one, "kore", progress=False)
    a = [m["loss"] for m in _metrics(one)]
    rel = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    ok = len(a) == len(b) == STEPS and all(map(math.isfinite, a)) and rel < 1e-6
    say(f"train: 2 workers on {len(nodes)} node(s); losses vs 1 worker: max rel diff {rel:.1e}")
    return {**found, "train_loss_rel_diff": rel, "train_matches_1_worker": ok}


def check_node_loss(inputs: dict, root: Path, store, reference_adapter: Path | None) -> dict:
    from kore_ray.train import run_train

    cfg = _train_run(inputs, root, "node_loss", store, "train.num_workers=2", "train.max_failures=2")
    marker = str(root / "node_lost.json")
    before = set(alive_workers())
    adapter = run_train(cfg, "kore", progress=False,
                        after_step=_kill_node_at(cfg, step=3, rank=1, marker=marker))
    lost = json.loads(Path(marker).read_text())
    steps = [m["step"] for m in _metrics(cfg)]
    wrong = sum(abs(steps.count(s) - 1) for s in range(1, STEPS + 1)) + sum(
        s not in range(1, STEPS + 1) for s in steps)
    after = [m for m in _metrics(cfg) if m["step"] > 2]
    resumed = bool(after) and all(m["time"] > lost["time"] for m in after) and steps[-1] == STEPS
    replaced = lost["node"] not in alive_workers() and set(alive_workers()) != before - {lost["node"]}
    diff = _adapter_rel_diff(adapter, reference_adapter) if reference_adapter else None
    say(f"node loss: node {lost['node'][-6:]} killed at step 3; resumed {resumed}, "
        f"steps lost or repeated {wrong}, adapter rel diff {diff}")
    return {"resumed_after_node_loss": resumed, "steps_lost_or_repeated": wrong,
            "adapter_rel_diff": diff, "node_replaced": replaced}


def submit(entrypoint: str, log: Path) -> str:
    """`ray job submit` as a user runs it; returns the job's final status from the job server."""
    from ray.job_submission import JobSubmissionClient

    with log.open("w") as out:
        done = subprocess.run(["ray", "job", "submit", "--address", DASHBOARD, "--working-dir",
                               str(ROOT), "--", *entrypoint.split()],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    text = log.read_text()
    ids = [w.strip("'") for w in text.split() if w.strip("'").startswith("raysubmit_")]
    status = str(JobSubmissionClient(DASHBOARD).get_job_status(ids[0])) if ids else "NOT_SUBMITTED"
    say(f"job {entrypoint}: {status} (exit {done.returncode}, log {log})")
    return status.rsplit(".", 1)[-1]


def check_jobs(inputs: dict, root: Path) -> dict:
    """Each stage job on one run directory, then jobs/inject.py on a fresh one."""
    import yaml

    from kore_ray.config import load_config

    logs = root / "job_logs"
    logs.mkdir(exist_ok=True)
    configs = {}
    for name in ("stages", "inject"):
        cfg = load_config(overrides=overrides(inputs, root / f"job_{name}"))
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    statuses = {}
    before = actor_ids()
    for stage in ("augment", "covariance", "init", "train", "export", "evaluate"):
        statuses[stage] = submit(f"python jobs/{stage}.py --config {configs['stages']}",
                                 logs / f"{stage}.log")
    statuses["inject"] = submit(f"python jobs/inject.py --config {configs['inject']}",
                                logs / "inject.log")
    head = {n["NodeID"] for n in __import__("ray").nodes()
            if "node:__internal_head__" in n["Resources"]}
    serve_nodes = _actor_nodes("KoreLLM", before)
    answered = []
    for name in ("stages", "inject"):
        results = json.loads((root / f"job_{name}" / "eval" / "results.json").read_text())
        answered.append(all(r["counts"]["failed_requests"] == 0 and r["counts"]["questions"] > 0
                            for r in [results["base"], *results["methods"].values()]))
    lines = (logs / "inject.log").read_text().splitlines()
    return {"job_status": statuses["inject"], "stage_job_status": statuses,
            "inject_log_lines": len(lines),
            "inject_log_info_lines": sum(" INFO " in line or "INFO " in line for line in lines),
            "serve_nodes": len(serve_nodes), "serve_on_worker_node": bool(serve_nodes) and not
            serve_nodes & head, "evaluation_answered": all(answered)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up at the end")
    args = parser.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    if unknown := set(checks) - set(CHECKS):
        parser.error(f"unknown checks {sorted(unknown)}; valid: {','.join(CHECKS)}")

    import ray

    result = dict.fromkeys(["job_status", "nodes_max", "train_nodes", "covariance_nodes",
                            "covariance_rel_err", "autoscaled_up", "autoscaled_down",
                            "resumed_after_node_loss", "steps_lost_or_repeated",
                            "adapter_rel_diff"])
    root = Path(tempfile.mkdtemp(prefix="kore-cluster-"))
    start = time.perf_counter()
    say(f"inputs and outputs in {root}; starting the local cluster")
    cluster("up")
    try:
        ray.init(address="auto", log_to_driver=False, configure_logging=False)
        wait_for(alive_workers, 120, "the first worker node")
        inputs = make_inputs(root)
        with NodeWatch() as watch:
            if "augment" in checks:
                result.update(check_augment(inputs, root, watch))
            store = None
            if {"covariance", "train", "train_1_worker", "node_loss"} & set(checks):
                found, store = check_covariance(inputs, root)
                if "covariance" in checks:
                    result.update(found)
            reference = None
            if "train" in checks or "train_1_worker" in checks:
                found = check_train(inputs, root, store, "train_1_worker" in checks)
                reference = found.pop("_adapter")
                result.update(found)
            if "node_loss" in checks:
                result.update(check_node_loss(inputs, root, store, reference))
            if "jobs" in checks:  # drivers of their own, beside this one
                result.update(check_jobs(inputs, root))
            result["nodes_max"] = max(watch.peak, watch.now())
    finally:
        ray.shutdown()
        if not args.keep:
            cluster("down")
    result["seconds"] = round(time.perf_counter() - start)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
