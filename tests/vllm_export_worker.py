"""vLLM side of tests/test_vllm_export.py, run as its own process (vLLM sets process-wide
state; with multiprocessing on it spawns workers, hence the __main__ guard).

    python tests/vllm_export_worker.py SPEC.json OUT.json

SPEC: {"model": dir, "adapter": dir, "max_lora_rank": int, "prompts": [[token ids], ...],
       "top": int}. Loads the model once with LoRA enabled and scores every prompt twice,
without and with the adapter. OUT: {"base": [...], "lora": [...]}, one entry per prompt:
a list over positions 1.. of {token id: logprob} (the prompt's own token plus the top
`top`), as vLLM's prompt_logprobs reports them.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Engine core and worker in this process: each spawned process would re-import torch and
    # vLLM (tens of seconds on a busy 2-core machine) and cost seconds more at shutdown.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(spec_path) as fh:
        spec = json.load(fh)
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=spec["max_lora_rank"],
        max_loras=1,
        max_model_len=128,
        enforce_eager=True,
        distributed_executor_backend="uni",
        seed=0,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=spec["top"],
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    lora = LoRARequest("kore", 1, spec["adapter"])
    out = {}
    for name, request in (("base", None), ("lora", lora)):
        results = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        out[name] = [
            [{int(t): lp.logprob for t, lp in pos.items()} for pos in r.prompt_logprobs[1:]]
            for r in results
        ]
    with open(out_path, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(*sys.argv[1:3])
