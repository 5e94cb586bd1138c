"""A KORE adapter exported with `export_lora` serves in vLLM exactly as PEFT runs it.

Tiny Qwen2 (CPU, float32): covariance in-process, KORE init, a few Adam steps on B, export
as a plain rank-r LoRA on the unmodified base. vLLM (enable_lora, LoRARequest; run in a
subprocess, tests/vllm_export_worker.py, because vLLM sets process-wide state: threads, spawn,
environment) must give the same prompt log-probabilities as transformers + PEFT with the
exported adapter, and the adapter must move them by far more than that tolerance, so the
comparison cannot pass with an adapter that vLLM ignored. vLLM loads the adapter_config.json
that export_lora writes as it is (its PEFTHelper checks pass).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RANK = 16
TOP = 5  # vLLM reports the prompt token's logprob plus the top-5 at every position
# float32 CPU kernels (vLLM's attention and LoRA kernels vs. eager transformers) round
# differently: observed max |diff| of log-probabilities 5.6e-7 without the adapter and 1.8e-6
# with it (float32 eps is 1.2e-7; the LoRA path adds two rank-16 products per layer). 1e-4
# leaves room for other CPUs/BLAS and is still far below any real change: the trained
# adapter moves the prompt tokens' log-probabilities by ~2.4 nats (asserted > 1000x TOLERANCE).
TOLERANCE = 1e-4
WORKER = Path(__file__).with_name("vllm_export_worker.py")

RETENTION = [
    "The river runs past the old mill and under the stone bridge.",
    "Our teacher explained the history of the valley with great care.",
    "A travelling merchant sold seven silver coins near the market.",
    "The museum opened a new hall for paintings of the northern coast.",
    "Children walked to school while the snow fell on the village.",
    "The orchestra played an old song for the people of the town.",
    "She measured the length of the garden before planting roses.",
    "The research team described a new kind of glass in a letter.",
] * 2
KNOWLEDGE = "Zorblat Quen is the mayor of Lunaria, a city built on the Moon in 2091."
PROMPTS = [
    KNOWLEDGE,  # what B was trained on: the adapter changes these log-probs a lot
    "Zorblat Quen is the mayor of",
    "The river runs past the old mill.",  # retention-like
]


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def _max_diff(vllm_positions: list[dict], reference: torch.Tensor) -> float:
    """Largest |vLLM - reference| over every (position, token) vLLM reported."""
    worst = 0.0
    for j, entries in enumerate(vllm_positions):  # entry j predicts prompt token j + 1
        for token, logprob in entries.items():
            worst = max(worst, abs(logprob - reference[j, int(token)].item()))
    return worst


def _prompt_token_logprobs(positions: list[dict], ids: list[int]) -> torch.Tensor:
    return torch.tensor([positions[j][str(ids[j + 1])] for j in range(len(ids) - 1)])


@pytest.mark.slow
def test_exported_kore_adapter_serves_in_vllm_like_peft(tmp_path):
    pytest.importorskip("vllm")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kore_ray.constraint.adapters import apply_kore, export_lora, kore_init
    from kore_ray.constraint.covariance import collect_covariance
    from kore_ray.models.targets import find_target_groups
    from kore_ray.models.tiny import save_tiny_model

    base_dir = save_tiny_model(tmp_path / "base", kind="qwen2", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def base_model():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    model = base_model()
    groups = find_target_groups(model)
    batches = [dict(tokenizer(RETENTION[i : i + 4], return_tensors="pt", padding=True))
               for i in range(0, len(RETENTION), 4)]
    store = collect_covariance(model, batches, groups)
    kore = apply_kore(model, kore_init(model, store, groups, RANK))

    # "Train" B: a few Adam steps on the knowledge sentence (A stays at A0).
    ids = tokenizer(KNOWLEDGE, return_tensors="pt").input_ids
    trainable = [p for p in kore.parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n, p in kore.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    torch.manual_seed(0)
    kore.train()
    for _ in range(30):
        optimizer.zero_grad()
        kore(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    kore.eval()

    adapter_dir = export_lora(kore, tmp_path / "adapter", str(base_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == RANK

    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    peft = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    with_lora = [_logprobs(peft, p) for p in prompts]
    with peft.disable_adapter():
        without = [_logprobs(peft, p) for p in prompts]
    # The export is the trained model itself: W + (B - B0) A0 == W_res + B A0.
    trained = [_logprobs(kore, p) for p in prompts]
    assert max((a - b).abs().max().item() for a, b in zip(with_lora, trained)) < TOLERANCE

    spec, out = tmp_path / "spec.json", tmp_path / "vllm.json"
    spec.write_text(json.dumps({"model": str(base_dir), "adapter": str(adapter_dir),
                                "max_lora_rank": RANK, "prompts": prompts, "top": TOP}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(WORKER), str(spec), str(out)], env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, f"vLLM worker failed:\n{run.stderr[-4000:]}"
    result = json.loads(out.read_text())

    base_diff = max(_max_diff(v, r) for v, r in zip(result["base"], without))
    lora_diff = max(_max_diff(v, r) for v, r in zip(result["lora"], with_lora))
    effect = max(
        (_prompt_token_logprobs(lo, p) - _prompt_token_logprobs(ba, p)).abs().max().item()
        for lo, ba, p in zip(result["lora"], result["base"], prompts)
    )
    print(f"max |logprob diff| vLLM vs transformers: base {base_diff:.2e}, "
          f"LoRA vs PEFT {lora_diff:.2e}; adapter effect in vLLM {effect:.3f} nats")
    assert base_diff < TOLERANCE
    assert lora_diff < TOLERANCE
    assert effect > 1000 * TOLERANCE
