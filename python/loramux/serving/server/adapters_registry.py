"""The adapters a server serves by name: each name's task id and (weights, config), read once from a
PEFT folder or a TensorRT-LLM numpy pair; loading puts the adapter into the cache (validated against
the model there), unloading waits for the adapter's requests and then removes it from the cache."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from loramux import format as lm_format
from loramux.convert.peft_files import ADAPTER_CONFIG
from loramux.errors import LoraCacheError, LoraFormatError, LoraNotCachedError
from loramux.serving.server.adapter_paths import resolve_inside_root
from loramux.serving.server.errors import (AdapterBusyError, AdapterConflictError, AdapterNotFoundError, RequestError,
                                           UnknownModelError)

#: adapter names: what fits in a URL path segment and a Prometheus label without escaping surprises
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


@dataclass
class Adapter:
    name: str
    task_id: int
    path: str
    weights: np.ndarray = field(repr=False)
    config: np.ndarray = field(repr=False)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # requests admitted and not finished
    unloading: bool = False


def read_adapter(path: str, base_model_dir: Optional[str] = None):
    """(weights, config) from a PEFT adapter folder (converted to float32: the cache packs it into
    the model's dtype) or a folder with TensorRT-LLM's model.lora_weights.npy + model.lora_config.npy.
    Both readers refuse pickled data."""
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        from loramux.convert import from_peft

        return from_peft(path, storage_type="float32", base_model=base_model_dir, progress=False)
    if os.path.isfile(os.path.join(path, lm_format.WEIGHTS_FILE)):
        return lm_format.load(path)
    raise LoraFormatError(f"{path}: not an adapter folder (neither {ADAPTER_CONFIG} of PEFT nor "
                          f"{lm_format.WEIGHTS_FILE} + {lm_format.CONFIG_FILE} of TensorRT-LLM)")


class AdapterRegistry:
    """Name -> Adapter. Thread-safe: loads run in worker threads while requests hold adapters."""

    def __init__(self, cache: Any, base_name: str, adapter_root: Optional[str] = None,
                 base_model_dir: Optional[str] = None):
        self.cache = cache
        self.base_name = base_name
        self.adapter_root = adapter_root
        self.base_model_dir = base_model_dir
        self._adapters: Dict[str, Adapter] = {}
        self._reserved: Dict[str, Optional[int]] = {}  # names (and their task ids) being loaded
        self._lock = threading.Lock()
        self._next_task_id = 1

    # --- lookup --------------------------------------------------------------------------------
    def names(self) -> List[Adapter]:
        with self._lock:
            return [a for a in self._adapters.values() if not a.unloading]

    def get(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None or adapter.unloading:
            why = "is being unloaded" if adapter is not None else "does not exist"
            raise UnknownModelError(f"The model `{name}` {why}: serve the base model `{self.base_name}` or one of the "
                                    f"loaded adapters ({', '.join(sorted(a.name for a in self.names())) or 'none'})")
        return adapter

    # --- requests hold their adapter while they run ----------------------------------------------
    def hold(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is not None and not adapter.unloading:
                adapter.in_flight += 1
                return adapter
        return self.get(name)  # raises the error that names the loaded adapters

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.in_flight -= 1

    # --- load ----------------------------------------------------------------------------------
    def load(self, name: str, path: str, task_id: Optional[int] = None, trusted: bool = False) -> Adapter:
        """Reads the adapter at `path` and puts it into the cache under a fresh (or the given) task id.
        An untrusted path (one sent over HTTP) must lie inside the adapter root. Blocking: call it
        from a worker thread."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise RequestError(f"lora_name must be 1-128 letters, digits or ._:/@+- starting with a letter or "
                                  f"digit, got {name!r}")
        if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < 1 << 64):
            raise RequestError(f"task_id must be an integer in [0, 2**64), got {task_id!r}")
        if trusted:
            real = os.path.realpath(path)
            if not os.path.isdir(real):
                raise AdapterNotFoundError(f"adapter path {path!r}: no such folder")
        else:
            real = resolve_inside_root(self.adapter_root, path)
        task_id = self._reserve(name, task_id)
        try:
            weights, config = read_adapter(real, self.base_model_dir)
            self.cache.put(task_id, weights, config)  # validates against the model; a bad adapter changes nothing
            adapter = Adapter(name, task_id, real, weights, config)
            with self._lock:
                self._adapters[name] = adapter
            return adapter
        finally:
            with self._lock:
                self._reserved.pop(name, None)

    def _reserve(self, name: str, task_id: Optional[int]) -> int:
        with self._lock:
            if name == self.base_name:
                raise AdapterConflictError(f"lora_name {name!r} is the base model's name")
            if name in self._adapters or name in self._reserved:
                raise AdapterConflictError(f"an adapter named {name!r} is already loaded; unload it first")
            used = {a.task_id for a in self._adapters.values()} | {t for t in self._reserved.values() if t is not None}
            if task_id is None:
                while self._next_task_id in used or self._next_task_id in self.cache:
                    self._next_task_id += 1
                task_id = self._next_task_id
                self._next_task_id += 1
            elif task_id in used:
                raise AdapterConflictError(f"task_id {task_id} is used by another loaded adapter")
            self._reserved[name] = task_id
            return task_id

    # --- unload --------------------------------------------------------------------------------
    async def unload(self, name: str, timeout_s: float = 30.0) -> Adapter:
        """Stops admitting requests for `name`, waits (up to timeout_s) for those in flight, then
        removes the adapter from the cache. Refused with AdapterBusyError when the wait runs out: the
        adapter stays loaded and its requests are untouched."""
        adapter = self.get(name)
        with self._lock:
            if adapter.unloading:
                raise UnknownModelError(f"The model `{name}` is being unloaded")
            adapter.unloading = True
        deadline = time.monotonic() + timeout_s
        try:
            while adapter.in_flight > 0:
                if time.monotonic() > deadline:
                    raise AdapterBusyError(f"adapter {name!r} still has {adapter.in_flight} request(s) in flight after "
                                           f"{timeout_s:g} s; it stays loaded")
                await asyncio.sleep(0.01)
            while True:  # the executor lets go of a finished request's adapter at its next step
                try:
                    self.cache.remove(adapter.task_id)
                    break
                except LoraNotCachedError:
                    break  # already evicted from the host tier
                except LoraCacheError as err:
                    if time.monotonic() > deadline:
                        raise AdapterBusyError(f"adapter {name!r} is still held by the executor after {timeout_s:g} s "
                                               f"({err}); it stays loaded") from None
                    await asyncio.sleep(0.01)
        except BaseException:
            adapter.unloading = False
            raise
        with self._lock:
            self._adapters.pop(name, None)
        return adapter


__all__ = ["Adapter", "AdapterRegistry", "NAME_PATTERN", "read_adapter"]
