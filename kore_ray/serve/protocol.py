"""What the API adds in front of vLLM's OpenAI layer: error bodies, bearer auth, the body's JSON.

Authentication is checked before the body is read; a body that is not a JSON object is a 400 in
OpenAI's error format. The request schemas themselves are vLLM's (serve/openai_api.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json


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


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def models_response(base: str, adapters: list[str], created: int) -> dict:
    """GET /v1/models: the base and its adapters (by name only: no server paths)."""
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "kore-ray",
              "root": base, "parent": None}]
    cards += [{"id": name, "object": "model", "created": created, "owned_by": "kore-ray",
               "root": name, "parent": base} for name in adapters]
    return {"object": "list", "data": cards}
