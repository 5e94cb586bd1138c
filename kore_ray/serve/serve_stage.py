"""The Ray Serve shell: one deployment whose replicas each hold a FastAPI ingress, a vLLM engine
(AsyncLLM, multi-LoRA) and an adapter registry.

Why not ray.serve.llm: its LLMConfig loads adapters only from cloud URIs
(`dynamic_lora_loading_path` refuses local directories, which `kore export` writes), and it
would hand adapters to vLLM unchecked; a bad adapter must be refused, not take a replica down.
The engine lives in the ingress replica, so autoscaling the deployment scales engines. The API
itself is vLLM's own OpenAI serving layer, as in ray.serve.llm (serve/openai_api.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from kore_ray.config import PipelineConfig, ServeConfig
from kore_ray.errors import InputError
from kore_ray.logs import replica_env, serve_logging
from kore_ray.run_dir import RunDir
from kore_ray.serve import openai_api
from kore_ray.serve.adapters import AdapterError, AdapterRegistry, check_name, is_uri
from kore_ray.serve.metrics import adapter_metrics
from kore_ray.serve.protocol import APIError, check_auth, models_response, parse_json, token_digest

log = logging.getLogger(__name__)

APP = "kore"
api = FastAPI(title="kore-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@dataclass(frozen=True)
class ReplicaArgs:
    """What a replica needs, resolved in the driver (a replica's working directory is not ours)."""

    model: str  # embedded name, object-store URI or absolute path
    name: str  # the base model's name in requests
    adapters: str  # object-store prefix or absolute path
    dtype: str
    serve: ServeConfig
    token_sha256: str | None


def replica_args(cfg: PipelineConfig) -> ReplicaArgs:
    from kore_ray.models.loading import EMBEDDED

    def absolute(spec: str) -> str:
        return spec if spec in EMBEDDED or is_uri(spec) else str(
            Path(spec.removeprefix("file://")).expanduser().resolve())

    s = cfg.serve
    digest = None
    if s.auth_token_env:
        token = os.environ.get(s.auth_token_env, "").strip()
        if not token:
            raise InputError(f"serve.auth_token_env names ${s.auth_token_env}, which is not set: "
                             "refusing to serve without the configured authentication")
        digest = token_digest(token)
    return ReplicaArgs(
        model=absolute(cfg.model.name_or_path),
        name=s.served_model_name or cfg.model.name_or_path,
        adapters=absolute(s.adapters or str(RunDir(cfg.run_dir).adapters)),
        dtype=cfg.model.dtype, serve=s, token_sha256=digest,
    )


@serve.deployment(name="KoreLLM", health_check_period_s=30, health_check_timeout_s=60)
@serve.ingress(api)
class KoreLLM:
    async def __init__(self, args: ReplicaArgs):
        from transformers import AutoTokenizer

        from kore_ray.data.tokenize import PLAIN_CHAT_TEMPLATE
        from kore_ray.models.loading import resolve_model_path
        from kore_ray.serve.adapters import base_linear_shapes

        s = self.settings = args.serve
        self.name, self.token_sha256 = args.name, args.token_sha256
        model_dir = resolve_model_path(args.model)
        # A template-less base model is served in the Question/Answer format it was trained in.
        own_template = getattr(AutoTokenizer.from_pretrained(model_dir), "chat_template", None)
        self.registry = AdapterRegistry(args.adapters, base_linear_shapes(model_dir),
                                        s.max_lora_rank, reserved=(self.name,))
        self.engine, state = await openai_api.start(openai_api.frontend_args(
            str(model_dir), self.name, s, args.dtype, None if own_template else PLAIN_CHAT_TEMPLATE))
        self.models, self.chat = state.openai_serving_models, state.openai_serving_chat
        self.completion = state.openai_serving_completion
        self.started = int(time.time())
        self._lock = asyncio.Lock()
        self._scanned = float("-inf")

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    async def check_health(self):
        await self.engine.check_health()  # raises once the engine is dead: Serve replaces us

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        check_auth(request.headers.get("authorization"), self.token_sha256)
        await self._refresh()
        return models_response(self.name, [a.name for a in self.registry.served()], self.started)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """vLLM's Prometheus metrics and the adapter metrics of this replica."""
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        check_auth(request.headers.get("authorization"), self.token_sha256)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, "chat")

    async def _answer(self, request: Request, kind: str) -> Response:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        check_auth(request.headers.get("authorization"), self.token_sha256)
        body = parse_json(await request.body())
        openai_api.refuse_remote_images(body)
        await self._lora(body.get("model"))  # 4xx for a bad or unknown adapter, before vLLM
        req = openai_api.request(kind, body)
        serving = self.chat if kind == "chat" else self.completion
        started, model = time.perf_counter(), req.model
        try:
            result = await (serving.create_chat_completion(req, request) if kind == "chat"
                            else serving.create_completion(req, request))
        except EngineDeadError:
            raise APIError(503, "this replica's engine died; retry (Serve replaces it)") from None
        except (ValueError, VLLMClientError) as e:  # what vLLM's server maps to 4xx itself
            result = serving.create_error_response(e)
        return openai_api.to_response(
            result, lambda usage: adapter_metrics().answered(model, usage, started))

    async def _refresh(self, max_age: float = 0.0) -> None:
        """Rescan unless a scan began at most `max_age` seconds before this call: concurrent
        callers share one scan, and a scan that began after the call surely saw what it asks."""
        asked = time.monotonic()
        async with self._lock:
            if self._scanned >= asked - max_age:
                return
            self._scanned = time.monotonic()
            found = await asyncio.to_thread(self.registry.scan)  # an object store is slow
            await self.registry.refresh(self._load, found)
            # vLLM's layer serves exactly the adapters the registry accepted.
            self.models.lora_requests = {a.name: self._lora_request(a)
                                         for a in self.registry.served()}

    async def _load(self, adapter) -> None:
        try:
            if not await self.engine.add_lora(self._lora_request(adapter)):
                raise AdapterError("the engine did not load it")
        except Exception:
            adapter_metrics().loads.labels(outcome="refused").inc()
            raise
        # Published to vLLM's layer before the registry lists it: a request that finds it in
        # the registry while the scan is still loading other adapters must not get vLLM's 404.
        self.models.lora_requests[adapter.name] = self._lora_request(adapter)
        adapter_metrics().loads.labels(outcome="loaded").inc()

    @staticmethod
    def _lora_request(adapter):
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, adapter.lora_id, str(adapter.path))

    async def _lora(self, model) -> None:
        """Refuse a request's model unless it is the base or a served adapter (rescans for
        unknown names and, at most every adapter_rescan_s, for rewritten ones)."""
        if not isinstance(model, str) or not model:
            raise APIError(400, "invalid request: model: a non-empty string is required",
                           param="model")
        if model == self.name:
            return
        try:
            check_name(model)
        except AdapterError as e:
            raise APIError(400, str(e), param="model", code="invalid_model") from None
        if self.registry.get(model) is None:
            await self._refresh()
        elif time.monotonic() - self._scanned > self.settings.adapter_rescan_s:  # rewritten?
            await self._refresh(max_age=self.settings.adapter_rescan_s)
        adapter = self.registry.get(model)
        if adapter is None:
            raise APIError(404, f"model {model!r} not found: it is neither the base model "
                                f"({self.name!r}) nor an adapter", param="model",
                           code="model_not_found")
        if adapter.error is not None:
            raise APIError(400, f"adapter {model!r} cannot be served: {adapter.error}",
                           param="model", code="invalid_adapter")


def build_app(cfg: PipelineConfig):
    """The Serve application for `cfg` (autoscaling and replica resources from cfg.serve)."""
    s = cfg.serve
    env = replica_env()
    if s.cpu_reserved_cores is not None and not s.use_gpu:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(s.cpu_reserved_cores)
    return KoreLLM.options(
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": 1 if s.use_gpu else 0,
                           **({"runtime_env": {"env_vars": env}} if env else {})},
        **({"logging_config": serve_logging()} if serve_logging() else {}),
    ).bind(replica_args(cfg))


def base_url(cfg: PipelineConfig) -> str:
    """The OpenAI client's base_url for the app (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}/v1"


def run_serve(cfg: PipelineConfig, blocking: bool = True) -> str:
    """Start the app on Ray (a local Ray unless one is running) and return its base URL.

    Returns once every replica's engine is up. blocking=True then serves until Ctrl-C and shuts
    Serve down. A Serve instance that is already running keeps its own host and port.
    """
    app = build_app(cfg)  # refuses a missing auth token before anything starts
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port},
                **({"logging_config": serve_logging()} if serve_logging() else {}))
    serve.run(app, name=APP, route_prefix="/")
    url = base_url(cfg)
    if blocking:
        print(f"kore serve: OpenAI API at {url} (models: GET {url}/models); Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


@contextmanager
def serving(cfg: PipelineConfig) -> Iterator[str]:
    """`with serving(cfg) as base_url:` the app runs inside the block, on the local Ray.

    Shuts Serve down afterwards if it started it here, else removes only this app.
    """
    was_running = ray.is_initialized() and bool(serve.status().proxies)
    start = time.perf_counter()
    print(f"kore serve: starting vLLM with {cfg.model.name_or_path} for this stage...", flush=True)
    url = run_serve(cfg, blocking=False)
    print(f"kore serve: ready in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        yield url
    finally:
        if was_running:
            serve.delete(APP)
        else:
            serve.shutdown()
