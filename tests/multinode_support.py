"""Real node processes (uvicorn + tests.multinode_app) for the multi-node tests and benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from ._servers import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"tok-sender": "sender", "tok-u1": "u1", "tok-u2": "u2", "tok-u3": "u3", "tok-u4": "u4"}


class Node:
    """One gateway + endpoint process on an ephemeral loopback port."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
            "SPLITCHAT_NODE": "1",
            "SPLITCHAT_NODE_ID": name,
            "SPLITCHAT_TOKENS": ",".join(f"{t}={u}" for t, u in TOKENS.items()),
            **env,
        }
        self.log = log_dir / f"node-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", "uvicorn", "tests.multinode_app:app", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--ws", "websockets-sansio", "--ws-per-message-deflate", "false"]
        argv += ["--log-level", "warning", "--timeout-graceful-shutdown", "5"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"node {self.name} did not start: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def drain(self) -> None:
        """Gateway drain (RECONNECT to every client), then SIGTERM and wait."""
        httpx.post(f"{self.url}/admin/drain", timeout=20.0).raise_for_status()
        self.terminate()

    def terminate(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved on the way out."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
