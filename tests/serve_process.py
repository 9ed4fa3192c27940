"""A `loramux serve` process for tests: started on 127.0.0.1 at a free port, ready once /health
answers, stopped (and its log shown on failure) at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import List

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: List[str], api_key: str = None, startup_s: float = 180.0):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="loramux-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "loramux.cli", "serve", *args, "--port", str(self.port)]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loramux serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"loramux serve did not answer /health in {startup_s} s:\n{self.output()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-6000:]

    def metrics(self) -> dict:
        """Unlabelled samples of /metrics as name -> value (labelled ones under name{labels})."""
        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


def streaming_executor_missing() -> bool:
    """True in a tree whose Executor has no streaming handles yet (the server is built on them)."""
    import loramux.serving

    return not hasattr(loramux.serving, "RequestHandle")


def cache_remove_missing() -> bool:
    """True in a tree whose LoraCache cannot drop an adapter yet (unloading needs it)."""
    from loramux.cache import LoraCache

    return not hasattr(LoraCache, "remove")
