"""Covariance collection against the plain forward pass it rides on (embedded Gemma 3 270M).

Both sides run the same right-padded batches of generated English-like text:

- forward: the decoder body only, `model.model(..., use_cache=False)` under inference_mode:
  the cheapest pass that computes every target layer's input (no LM head, no logits);
- covariance: `collect_covariance` over all 72 target groups (q/k/v, o, gate/up, down of the
  18 layers), i.e. the same pass plus the hooks' X^T X sums and the final store.

Cases run interleaved (order flipped each round) after a warm-up. The figure is the median
of the per-round ratios of this process's CPU time: with one torch thread that is the time
spent on a core, without the waits for one on a busy shared machine (with --threads 0 it is
wall-clock instead, since CPU time would count OpenMP spinning). The table also shows the
wall-clock ratios, a full forward WITH logits for context (--with-logits: what hooking the
whole model would pay), and the analytic multiply-adds: X^T X costs d_in^2 / 2 per token and
group even with a perfect symmetric kernel, about half the decoder's own multiply-adds on
this model (0.43 counting only the real tokens here), so the ratio cannot go much below
~1.35 however the accumulation is written.

By default the benchmark runs torch single-threaded (--threads 1): on a shared 2-core machine,
multi-threaded BLAS/OpenMP under oversubscription slows down by several times at random,
swamping the ratio; one thread measures the work. --threads 0 keeps torch's default.

    python benchmarks/covariance.py [--batches 4 --batch-size 8 --min-len 64 --max-len 128]

The peer ratio: the same tokens collected as KORE's reference code does (`kore_reference`:
a hook on every linear module, one sequence per full forward pass, float32 sums) against
`collect_covariance` with the same sample_max normalisation, with the relative difference
of the two covariances (float32 against float64 accumulation).

Last line: {"overhead_vs_forward": <median per-round covariance time / forward time>,
            "speedup_vs_kore_reference": <median per-round reference time / ours>,
            "kore_reference_rel_diff": <max over groups of max |ours - theirs| / max |ours|>}
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import interleaved, median, table, token_batches

from kore_ray.constraint.covariance import collect_covariance
from kore_ray.models import load_model
from kore_ray.models.gemma import embedded_gemma_path
from kore_ray.models.targets import find_target_groups


def reference_check(model, batch, groups, store) -> float:
    """Max relative difference of the store against a plain full X^T X of one batch.

    Recomputes the first batch's sums with a straightforward hook (gather the real tokens,
    full float32 product, float64 sum) and compares with a store made from that batch alone.
    """
    mask = batch["attention_mask"].bool()
    ref = {}
    handles = []
    for g in groups:
        def hook(module, args, key=g.key):
            tokens = args[0][mask].float()
            ref[key] = (tokens.T @ tokens).double()
        handles.append(model.get_submodule(g.modules[0]).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model.model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return max(((store.sums[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)


def kore_reference(model, sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Covariances collected the way KORE's and LoRA-Null's `calib_cov_distribution` does
    (from CorDA): a forward hook on EVERY nn.Linear (lm_head included, and q/k/v or gate/up
    each summing the same input again), one sequence per forward pass of the whole model
    (logits included), each sample divided by its max, x^T x in float32 and added to a float32
    running matrix (they divide by the calibration size; a constant, left out here).
    Returns module name -> matrix. A transcription of that loop, not an import: the
    reference is research code, not a library.
    """
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.covariance_matrix = 0

            def hook(module, input, output):
                x = input[0].detach().squeeze(0).data.float()
                x = x / torch.max(x).abs()
                if torch.isnan(x).any():
                    raise ValueError("nan in the activations")
                module.covariance_matrix += x.t().matmul(x)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = module.covariance_matrix
            del module.covariance_matrix
    return out


def multiply_adds(model, groups) -> tuple[int, int, int]:
    """Per token: decoder linear layers, X^T X in full, X^T X upper triangle only."""
    body = sum(m.in_features * m.out_features for n, m in model.model.named_modules()
               if isinstance(m, torch.nn.Linear))
    full = sum(g.in_features**2 for g in groups)
    half = sum(g.in_features * (g.in_features + 1) // 2 for g in groups)
    return body, full, half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds after warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = default")
    parser.add_argument("--with-logits", action="store_true",
                        help="also time a full forward with logits (context row)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = embedded_gemma_path()
    model, tokenizer = load_model(str(path))
    groups = find_target_groups(model)
    batches = token_batches(tokenizer, args.batches, args.batch_size, args.min_len, args.max_len)
    positions = sum(b["input_ids"].numel() for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def forward():
        with torch.inference_mode():
            for b in batches:
                model.model(**b, use_cache=False)

    def forward_logits():
        with torch.inference_mode():
            for b in batches:
                model(**b, use_cache=False)

    def covariance():
        collect_covariance(model, batches, groups)

    # The same real tokens, one unpadded sequence per forward pass, for the KORE reference.
    sequences = [b["input_ids"][i][b["attention_mask"][i].bool()]
                 for b in batches for i in range(len(b["input_ids"]))]

    def covariance_sample_max():
        collect_covariance(model, batches, groups, normalize="sample_max")

    def reference():
        kore_reference(model, sequences)

    cases = {"forward (decoder, no logits)": forward, "covariance (collect_covariance)": covariance,
             "covariance, sample_max (as KORE)": covariance_sample_max,
             "KORE reference (hook every linear, batch 1)": reference}
    if args.with_logits:
        cases["forward with logits (context)"] = forward_logits
    start = time.perf_counter()
    cpu: dict[str, list[float]] = {}
    times = interleaved(cases, args.repeats, cpu=cpu)
    elapsed = time.perf_counter() - start
    fwd = times["forward (decoder, no logits)"]
    cpu_fwd = cpu["forward (decoder, no logits)"]
    wall_ratio = {name: median([t / f for t, f in zip(ts, fwd)]) for name, ts in times.items()}
    cpu_ratio = {name: median([t / f for t, f in zip(cpu[name], cpu_fwd)]) for name in times}
    # One thread: CPU time is the time on a core, without the waits for one on a busy machine.
    # Several threads: CPU time would count OpenMP spinning, so the figure is wall-clock.
    single = torch.get_num_threads() == 1
    ratio = (cpu_ratio if single else wall_ratio)["covariance (collect_covariance)"]

    ours = collect_covariance(model, batches, groups, normalize="sample_max")
    theirs = kore_reference(model, sequences)
    vs_reference = max(((ours.sums[g.key] - theirs[g.modules[0]].double()).abs().max()
                        / ours.sums[g.key].abs().max()).item() for g in groups)
    speedup = median([r / o for r, o in zip(cpu["KORE reference (hook every linear, batch 1)"],
                                            cpu["covariance, sample_max (as KORE)"])]) if single \
        else wall_ratio["KORE reference (hook every linear, batch 1)"] \
        / wall_ratio["covariance, sample_max (as KORE)"]
    check = reference_check(model, batches[0], groups, collect_covariance(model, batches[:1], groups))
    body, full, half = multiply_adds(model, groups)

    print(f"Gemma 3 270M ({path.name}), {len(groups)} target groups, torch threads "
          f"{torch.get_num_threads()}; {len(batches)} batches x {args.batch_size} sequences of "
          f"{args.min_len}-{args.max_len} tokens: {tokens} real tokens, {positions} positions "
          f"(right padding); warm-up 1, {args.repeats} interleaved rounds, {elapsed:.0f} s")
    rows = []
    for name, ts in times.items():
        rows.append([name, f"{median(ts):.2f}", f"{min(ts):.2f}", f"{median(cpu[name]):.2f}",
                     f"{tokens / median(cpu[name]):.0f}", f"{wall_ratio[name]:.3f}",
                     f"{min(ts) / min(fwd):.3f}", f"{cpu_ratio[name]:.3f}"])
    print(table(rows, ["case", "wall median s", "wall min s", "CPU median s", "tokens/CPU-s",
                       "x fwd: wall, median", "wall, mins", "CPU, median"]))
    print(f"figure: median of per-round {'CPU-time' if single else 'wall-clock'} ratios "
          f"covariance / forward = {ratio:.3f}")
    print(f"store vs a plain full X^T X of batch 1 (float32 per batch, float64 sum): max relative "
          f"difference {check:.1e}")
    print(f"multiply-adds per token: decoder linears {body / 1e6:.1f}M; X^T X of all groups "
          f"{full / 1e6:.1f}M full, {half / 1e6:.1f}M upper triangle "
          f"(= {half / body:.2f} of the decoder's)")
    print(f"KORE's reference collection (every linear hooked, batch 1, float32 sums) on the same "
          f"tokens: {speedup:.2f}x the time of ours with the same sample_max normalisation; "
          f"max relative difference of the two covariances {vs_reference:.1e}")
    print(json.dumps({"overhead_vs_forward": round(ratio, 3),
                      "speedup_vs_kore_reference": round(speedup, 2),
                      "kore_reference_rel_diff": float(f"{vs_reference:.2e}")}))


if __name__ == "__main__":
    main()
