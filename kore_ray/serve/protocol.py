"""The OpenAI API subset served here: request models, their sampling settings, response bodies.

Requests are parsed by hand (`parse_request`) rather than by FastAPI so that authentication is
checked before the body is read and every malformed body gets a 400 in OpenAI's error format,
naming the field, instead of FastAPI's 422. Unknown fields are refused, not ignored: a client that
asks for `logprobs` or `stream` must not believe it got them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def token_digest(token: str) -> str:
    """What replicas hold instead of the token: the secret itself never leaves the driver."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_auth(authorization: str | None, digest: str | None) -> None:
    """401 unless `Authorization: Bearer <token>` matches; no digest means no auth."""
    if digest is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), digest):
        raise APIError(401, "missing or invalid bearer token (Authorization: Bearer <token>)",
                       code="invalid_api_key")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: Literal[False] = False  # streaming is not implemented: refused rather than ignored
    user: str | None = None  # accepted for compatibility; unused
    return_token_ids: bool = False  # vLLM's extension: each choice's generated token ids


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @model_validator(mode="after")
    def _not_empty(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[dict]:
        """One engine prompt per prompt in the request (text, or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": list(p)}]
        return [{"prompt_token_ids": list(x)} if isinstance(x, list) else {"prompt": x} for x in p]


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs `image_url`")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema(self):
        schema = (self.json_schema or {}).get("schema")
        if self.type == "json_schema" and not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs json_schema.schema (an object)")
        return self


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    response_format: ResponseFormat | None = None


def parse_request(model: type[_Request], raw: bytes) -> _Request:
    """Validate a JSON body; any problem is a 400 that says which field and why."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) or None
        text = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                         for err in errors)
        raise APIError(400, f"invalid request: {text}", param=where) from None


def sampling_kwargs(req: _Request) -> dict:
    """Keyword arguments for vLLM's SamplingParams (temperature 0 is greedy decoding)."""
    kwargs = {
        "n": req.n, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
        "stop": req.stop, "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "max_tokens": getattr(req, "max_completion_tokens", None) or req.max_tokens,
    }
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        kwargs["structured_outputs"] = ({"json_object": True} if fmt.type == "json_object"
                                        else {"json": fmt.json_schema["schema"]})
    return kwargs


def _usage(outputs) -> dict:
    prompt = sum(len(o.prompt_token_ids or []) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _token_ids(choice: dict, completion, wanted: bool) -> dict:
    if wanted:
        choice["token_ids"] = list(completion.token_ids)
    return choice


def completion_response(model: str, outputs, token_ids: bool = False) -> dict:
    """OpenAI's text_completion body from vLLM RequestOutputs, one per prompt, in prompt order;
    choice index = prompt index * n + sample index, as OpenAI numbers them."""
    choices = [
        _token_ids({"index": i * len(o.outputs) + j, "text": c.text, "logprobs": None,
                    "finish_reason": c.finish_reason}, c, token_ids)
        for i, o in enumerate(outputs) for j, c in enumerate(o.outputs)
    ]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(outputs)}


def chat_response(model: str, output, token_ids: bool = False) -> dict:
    choices = [
        _token_ids({"index": j, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason}, c, token_ids)
        for j, c in enumerate(output.outputs)
    ]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage([output])}


def models_response(base: str, adapters: list[str], created: int) -> dict:
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "kore-ray",
              "root": base, "parent": None}]
    cards += [{"id": name, "object": "model", "created": created, "owned_by": "kore-ray",
               "root": name, "parent": base} for name in adapters]
    return {"object": "list", "data": cards}
