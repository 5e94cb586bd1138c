"""What a user sees: kore's own lines, progress, warnings and errors. Ray's and vLLM's INFO
chatter (Ray's start-up lines, Ray Data's execution plans, Ray Train's controller, Serve's
start-up lines and access log, vLLM's environment warnings, per-process weight-loading bars)
stays in Ray's log files (/tmp/ray/session_latest/logs) unless `kore --verbose` (KORE_VERBOSE=1).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Lines that Ray's processes print (forwarded to the driver) or Ray logs in the driver, none of
# which a user can act on. Each stays in Ray's log files; --verbose shows them.
NOISE = re.compile("|".join([
    r"has constructor arguments in the object store and max_restarts > 0",  # ray#57733
    r"Task ServeController\.graceful_shutdown failed",  # the controller exits on serve.shutdown
    r"Triton is installed, but doesn't include CPU backend",  # vLLM on a CPU machine
    r"NUMA binding: Using MEMBIND policy",  # torch inside vLLM's CPU worker
    r"Loading safetensors checkpoint shards",  # vLLM's weight-loading bar, every replica
    r"Loading weights:",  # transformers' weight-loading bar, every process
    r"Progress bars disabled\. To enable",  # Ray Data: we draw our own bars
    r"Token authentication is enabled for this Ray cluster",
    r"does not have any available CPUs\. The Dataset job will hang",  # training holds them
    r"Connecting to existing Serve app in namespace",
    r"Reporting training result \d+: TrainingReport",  # Ray Train's worker, at INFO
    r"Dataset \S+ execution finished in",  # Ray Data, in each training worker
    r"^\s*$",  # the blank lines left behind by vLLM's bars
]))


def verbose() -> bool:
    return os.environ.get("KORE_VERBOSE", "").strip() not in ("", "0")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE.search(record.getMessage())


def forwarded_lines(lines: list[str]) -> list[str]:
    """The lines of a Ray process's output worth showing on the driver's console."""
    return [line for line in lines if not NOISE.search(line)]


def _filter_forwarded_output() -> None:
    """Ray prints every worker's stdout/stderr on the driver through one function, bound when
    ray.init connects; wrap it (before then) to drop NOISE. Private to Ray (pinned 2.60): where
    it is missing, the output is left as it is."""
    try:
        from ray._private import worker
    except ImportError:
        return
    show = getattr(worker, "print_to_stdstream", None)
    if show is None or getattr(show, "_kore", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        lines = forwarded_lines(data.get("lines", []))
        if lines:
            show({**data, "lines": lines}, ignore_prefix)

    print_to_stdstream._kore = True
    worker.print_to_stdstream = print_to_stdstream


def quiet_driver() -> None:
    """Set up the driver's console before Ray starts (see the module doc)."""
    if verbose():
        return
    # ray.init sets the "ray" logger to this level (its start-up INFO lines).
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    # Inherited by the processes of a local Ray: no weight-loading bars, no torch C++ warnings.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import ray.data  # noqa: F401 - configures the "ray.data" logger
    import ray.serve  # noqa: F401 - configures the "ray.serve" logger

    # Ray Data logs INFO to the console and DEBUG to ray-data.log: keep the file.
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "... is ready"
    for name in ("ray", "ray.data", "ray.serve"):
        logger = logging.getLogger(name)
        logger.addFilter(_DropNoise())
        for handler in logger.handlers:
            handler.addFilter(_DropNoise())  # records of child loggers skip logger filters
    # Ray Train calls its own deprecated ExecutionOptions.exclude_resources.
    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")
    _filter_forwarded_output()


def replica_env() -> dict[str, str]:
    """Environment of a Serve replica: vLLM's errors only (its warnings on a CPU machine are
    about its environment: no Triton, no tcmalloc), no Python deprecation warnings, no torch
    C++ warnings, no weight-loading bars."""
    if verbose():
        return {}
    return {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore",
            "TORCH_CPP_LOG_LEVEL": "ERROR", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


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
