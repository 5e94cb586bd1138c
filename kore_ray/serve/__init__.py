"""Serving: the base model and every exported adapter behind an OpenAI-compatible API
(Ray Serve + vLLM multi-LoRA). `run_serve(cfg, blocking=True) -> base_url` is `kore serve`;
`with serving(cfg) as base_url:` is for evaluation code; `build_app(cfg)` is the Serve app.

The functional core (protocol, adapters, prompts) imports without Ray or vLLM; the Serve shell
(`serve_stage`) is imported on first use of the names below.
"""

__all__ = ["build_app", "run_serve", "serving"]


def __getattr__(name: str):
    if name in __all__:
        from kore_ray.serve import serve_stage

        return getattr(serve_stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
