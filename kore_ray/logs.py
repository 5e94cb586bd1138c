"""What a user sees: kore's own lines, progress, warnings and errors. Ray's and vLLM's INFO
chatter (Ray Data's execution plans, Serve's access log line per request, vLLM's engine
start-up) stays in Ray's log files (/tmp/ray/session_latest/logs) unless KORE_VERBOSE=1."""

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
    import ray.data  # noqa: F401 - configures the "ray.data" logger

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def replica_env() -> dict[str, str]:
    """Environment of a Serve replica: vLLM logs at WARNING."""
    return {} if verbose() else {"VLLM_LOGGING_LEVEL": "WARNING"}


def serve_logging() -> dict | None:
    """Serve's logging_config (its controller and proxies, and each deployment): warnings
    only, no access-log line per request on the console."""
    return None if verbose() else {"log_level": "WARNING", "enable_access_log": False}
