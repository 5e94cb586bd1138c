"""A scripted OpenAI chat-completions server on 127.0.0.1, for tests and benchmarks.

A real HTTP server (aiohttp, in a background thread), so clients are exercised over the
network exactly as against a hosted API: status codes, headers, time-outs and all.

    with OpenAIStub(responder=lambda body: '{"ok": true}') as stub:
        stub.script("item-7", Status(429, retry_after=0.1), Answer())  # 429 first, then answer
        stub.script("item-9", Malformed(), repeat_last=True)          # always malformed JSON
        client = openai.OpenAI(base_url=stub.url, api_key="k")
        ...
        stub.requests  # everything received, in order of arrival

A request takes the next behaviour of the first script whose match string occurs in its
messages and has behaviours left; any other request is answered by `responder(body)`.
`latency_s` delays every request and `max_in_flight` makes requests beyond it queue, as an
inference server with a fixed number of slots does; `max_seen_in_flight` records the peak.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from aiohttp import web
from typing_extensions import Self


@dataclass(frozen=True)
class Answer:
    """A normal completion; `content` None means "what the responder says"."""

    content: str | None = None


@dataclass(frozen=True)
class Malformed:
    """A completion whose content is not the JSON asked for (cut off mid-object)."""

    content: str = '{"dialogues": [{"turns": [{"user": "What'


@dataclass(frozen=True)
class BrokenBody:
    """A 200 whose body is not JSON (a truncated response, a proxy's error page)."""

    body: str = '{"id": "chatcmpl-x", "choices": ['


@dataclass(frozen=True)
class Status:
    """An error status with an OpenAI-style error body, and optionally Retry-After."""

    code: int
    retry_after: float | None = None
    message: str = "scripted error"


@dataclass(frozen=True)
class Stall:
    """Answer only after `seconds` (or when the server closes): for client time-outs."""

    seconds: float = 3600.0


Behaviour = Answer | Malformed | BrokenBody | Status | Stall


@dataclass
class Received:
    body: dict
    headers: dict[str, str]
    behaviour: str
    at: float = field(default_factory=time.monotonic)

    @property
    def text(self) -> str:
        """All message (or completion prompt) text of the request, for matching."""
        return json.dumps(self.body.get("messages", self.body.get("prompt", [])), ensure_ascii=False)


def words(text: str) -> int:
    return len(text.split())


class OpenAIStub:
    def __init__(
        self,
        responder: Callable[[dict], str] = lambda body: "OK",
        *,
        latency_s: float = 0.0,
        max_in_flight: int | None = None,
    ):
        self.responder = responder
        self.latency_s = latency_s
        self.max_in_flight = max_in_flight
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_seen_in_flight = 0
        self._scripts: list[tuple[str, deque, bool]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- scripting -------------------------------------------------------------------------
    def script(self, match: str, *behaviours: Behaviour, repeat_last: bool = False) -> None:
        """Requests whose messages contain `match` get `behaviours` in turn; with
        `repeat_last`, the last one for every later matching request too."""
        with self._lock:
            self._scripts.append((match, deque(behaviours), repeat_last))

    def _next_behaviour(self, text: str) -> Behaviour:
        with self._lock:
            for match, queue, repeat_last in self._scripts:
                if match in text and queue:
                    return queue[0] if repeat_last and len(queue) == 1 else queue.popleft()
        return Answer()

    def count(self, match: str = "") -> int:
        """How many requests mentioned `match` (all requests for "")."""
        return sum(match in r.text for r in self.requests)

    @property
    def url(self) -> str:
        """The base_url for an OpenAI client."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- HTTP ------------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        received = Received(body, dict(request.headers), "")
        behaviour = self._next_behaviour(received.text)
        received.behaviour = type(behaviour).__name__
        self.requests.append(received)
        async with self._gate:
            self.in_flight += 1
            self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
            try:
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                return await self._respond(body, behaviour)
            finally:
                self.in_flight -= 1

    async def _respond(self, body: dict, behaviour: Behaviour) -> web.Response:
        if isinstance(behaviour, Status):
            headers = {} if behaviour.retry_after is None else {
                "Retry-After": f"{behaviour.retry_after:g}"}
            error = {"message": behaviour.message, "type": "scripted", "code": behaviour.code}
            return web.json_response({"error": error}, status=behaviour.code, headers=headers)
        if isinstance(behaviour, BrokenBody):
            return web.Response(text=behaviour.body, content_type="application/json")
        if isinstance(behaviour, Stall):
            try:
                await asyncio.wait_for(self._closing.wait(), behaviour.seconds)
            except asyncio.TimeoutError:
                pass
        content = behaviour.content if isinstance(behaviour, (Answer, Malformed)) else None
        if content is None:
            content = self.responder(body)
        prompt = sum(words(str(m.get("content", ""))) for m in body.get("messages", []))
        if "prompt" in body:  # /v1/completions
            return web.json_response({
                "id": f"cmpl-{len(self.requests)}", "object": "text_completion",
                "created": int(time.time()), "model": body.get("model", "stub"),
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "text": content}],
                "usage": {"prompt_tokens": words(str(body["prompt"])), "completion_tokens": words(content),
                          "total_tokens": words(str(body["prompt"])) + words(content)},
            })
        return web.json_response({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": words(content),
                      "total_tokens": prompt + words(content)},
        })

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "stub", "object": "model", "created": 0, "owned_by": "stub"}]})

    # -- lifecycle -------------------------------------------------------------------------
    async def _startup(self) -> None:
        self._closing = asyncio.Event()
        self._gate = asyncio.Semaphore(self.max_in_flight) if self.max_in_flight else nullcontext()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> OpenAIStub:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._startup())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="openai-stub")
        self._thread.start()
        return self

    def close(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._closing.set()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
