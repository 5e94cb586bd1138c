"""What a user sees: kore's own lines, progress, warnings and errors. Ray's and vLLM's INFO
chatter (Ray's start-up lines, Ray Data's execution plans, Ray Train's controller, Serve's
access log line per request and its slow-start notices, vLLM's environment warnings) stays in
Ray's log files (/tmp/ray/session_latest/logs) unless `kore --verbose` (KORE_VERBOSE=1)."""

from __future__ import annotations

import logging
import os


def verbose() -> bool:
    return os.environ.get("KORE_VERBOSE", "").strip() not in ("", "0")


def quiet_driver() -> None:
    """Ray Data logs INFO to the console and DEBUG to ray-data.log: keep the file, raise the
    console to WARNING (Ray Data configures its logger when imported, so import it first)."""
    if verbose():
        return
    # ray.init sets the "ray" logger to this level (its start-up INFO lines).
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    import ray.data  # noqa: F401 - configures the "ray.data" logger

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def replica_env() -> dict[str, str]:
    """Environment of a Serve replica: vLLM's errors only (its warnings on a CPU machine are
    about its environment: no Triton, no tcmalloc), no Python deprecation warnings."""
    return {} if verbose() else {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore"}


def serve_logging() -> dict | None:
    """Serve's logging_config (its controller and proxies, and each deployment): errors only
    (a vLLM replica takes a minute to start: Serve's 'slow __init__' warnings every 30 s are
    expected), no access-log line per request on the console."""
    return None if verbose() else {"log_level": "ERROR", "enable_access_log": False}


def train_logging():
    """Ray Train's LoggingConfig: its controller's console lines at WARNING (kore's own step
    lines go to stdout, not through its logger)."""
    if verbose():
        return None
    import ray

    return ray.LoggingConfig(log_level="WARNING")
