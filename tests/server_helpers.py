"""Start ``nexusrt serve`` in a subprocess on 127.0.0.1 and an ephemeral port, and read /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "nexusrt:stdlib-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server; :meth:`stop` (SIGTERM, then SIGKILL after ``timeout``) returns its exit status."""

    def __init__(self, *args: str, startup_s: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), NEXUSRT_BACKEND="cpu")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexusrt.cli.main", "serve", "--model", MODEL, "--port", str(self.port), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.http = httpx.Client(base_url=self.url, timeout=30, trust_env=False)  # no proxy for 127.0.0.1
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not answer /health within {startup_s} s")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``{"name{labels}": value}``."""
        text = self.http.get("/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)
                if not m.group(1).startswith("#")}

    def wait_metric(self, name: str, ok, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get(name, 0.0)
            if ok(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> tuple[int, str]:
        """SIGTERM; the exit status (SIGKILL's if it overran ``timeout``) and everything it printed."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        return self.proc.returncode, out
