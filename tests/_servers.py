"""Private, throw-away Redis / NATS servers for restart tests (never touch the shared ones)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PrivateServer:
    """A server subprocess on a fixed loopback port that can be killed and restarted."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv = argv
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.argv[0]} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, like a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def redis_server(tmp: Path, *, persistent: bool) -> PrivateServer:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)]
    argv += ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    return PrivateServer(argv, port, tmp / "redis.log")


def nats_binary() -> str:
    return shutil.which("nats-server") or "/usr/sbin/nats-server"


def nats_server(tmp: Path) -> PrivateServer:
    port = free_port()
    argv = [nats_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp / "js")]
    return PrivateServer(argv, port, tmp / "nats.log")
