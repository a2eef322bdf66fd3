"""Run every scenario against every contender, side by side, and report medians.

One command (from the repository root)::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e . -r benchmarks/requirements.txt \
        && .venv-bench/bin/python benchmarks/run.py

Each (scenario, repetition) runs every contender in turn, rotating the order per repetition so no
contender always goes first. Every run gets a fresh server process (started here, ephemeral
loopback port) and a fresh load-generator process. Results: a table of medians (min-max, ratio
to ``websockets.broadcast``) on stdout, JSON and a PNG plot in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``python benchmarks/run.py`` puts only benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

from benchmarks._proc import raise_fd_limit  # noqa: E402
from benchmarks.contenders import CONTENDERS, REFERENCE, Contender  # noqa: E402

SCENARIOS = ("fanout", "latency", "idle", "ingest", "slow", "redis")

# (result key, label, unit, higher is better) shown in the table per scenario.
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "fanout": [
        ("deliveries_per_s", "deliveries/s", True),
        ("server_cpu_us_per_delivery", "server CPU us/delivery", False),
        ("latency_ms.p99", "p99 ms", False),
    ],
    "latency": [
        ("deliveries_per_s", "achieved deliveries/s", True),
        ("latency_ms.p50", "p50 ms", False),
        ("latency_ms.p90", "p90 ms", False),
        ("latency_ms.p99", "p99 ms", False),
        ("latency_ms.max", "max ms", False),
    ],
    "idle": [("rss_kb_per_connection", "RSS KiB/conn", False), ("connected", "connected", True)],
    "ingest": [
        ("requests_per_s", "POST req/s", True),
        ("p99_ms", "POST p99 ms", False),
        ("bare_requests_per_s", "bare route req/s", True),
        ("bare_p99_ms", "bare route p99 ms", False),
    ],
    "redis": [
        ("deliveries_per_s", "deliveries/s (2 nodes)", True),
        ("server_cpu_us_per_delivery", "CPU us/delivery (both nodes)", False),
        ("latency_ms.p50", "p50 ms", False),
        ("latency_ms.p99", "p99 ms", False),
    ],
    "slow": [
        ("deliveries_per_s", "healthy deliveries/s", True),
        ("latency_ms.p99", "healthy p99 ms", False),
        ("rss_growth_mb", "server RSS growth MiB", False),
        ("slow_disconnected", "slow clients cut", True),
        ("slow_deliveries", "deliveries to slow clients", True),
    ],
}
# Correctness counters: any non-zero value flags the run in the table.
PROBLEMS = ("loss", "duplicates", "order_diverged", "unexpected", "post_errors", "connect_failures")

REDIS_URL = "redis://127.0.0.1:6379/0"
"""The two-node scenario's bus (the Redis every engineer's machine and CI run on loopback)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), help="names (default: all)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per scenario and contender")
    parser.add_argument("--clients", type=int, default=1000, help="subscribers (fanout, latency, slow)")
    parser.add_argument("--posts", type=int, default=200, help="POSTs per run (fanout, slow)")
    parser.add_argument("--inflight", type=int, default=10, help="concurrent POSTs (fanout, slow)")
    parser.add_argument("--rate", type=float, default=50, help="POSTs/s, open loop (latency)")
    parser.add_argument("--duration", type=float, default=10, help="seconds (latency)")
    parser.add_argument("--idle-clients", type=int, default=5000, help="connections (idle)")
    parser.add_argument("--ingest-requests", type=int, default=5000, help="POSTs (ingest)")
    parser.add_argument("--ingest-concurrency", type=int, default=10, help="concurrent POSTs (ingest)")
    parser.add_argument("--slow-fraction", type=float, default=0.05, help="clients that stop reading (slow)")
    parser.add_argument("--slow-posts", type=int, default=400, help="POSTs per run (slow)")
    parser.add_argument("--slow-padding", type=int, default=4096, help="payload padding bytes (slow)")
    parser.add_argument("--padding", type=int, default=64, help="payload padding bytes (other scenarios)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds; bound of one load-generator run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition (CI smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeat, args.clients, args.posts, args.slow_posts, args.inflight = 1, 5, 5, 5, 2
        args.rate, args.duration, args.idle_clients = 20, 0.5, 10
        args.ingest_requests, args.ingest_concurrency, args.slow_fraction = 20, 2, 0.2
        args.timeout = 20
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {sorted(CONTENDERS)}")
    return args


def spec_for(scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the load generator needs besides the server's addresses."""
    return {
        "scenario": scenario,
        "clients": args.clients,
        "posts": args.slow_posts if scenario == "slow" else args.posts,
        "inflight": args.inflight,
        "rate": args.rate,
        "duration": args.duration,
        "idle_clients": args.idle_clients,
        "ingest_requests": args.ingest_requests,
        "ingest_concurrency": args.ingest_concurrency,
        "slow_fraction": args.slow_fraction,
        "padding": args.slow_padding if scenario == "slow" else args.padding,
        "timeout": args.timeout,
        "drain_timeout": 3 if args.smoke else 10,
        "settle": 0.2 if args.smoke else 1.0,
        "slow_grace": 0.5 if args.smoke else 2.0,
    }


def child_env() -> dict[str, str]:
    """The children import ``benchmarks`` from the repository root; an existing PYTHONPATH stays first
    (so a scratch splitchat tree can be benchmarked without installing it)."""
    paths = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class Server:
    """A contender's server process; ``info`` is what it announced on its READY line."""

    def __init__(self, contender: Contender, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log = open(log_dir / f"{contender.module.rsplit('.', 1)[-1].replace('/', '_')}.stderr.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            contender.command(sys.executable),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**child_env(), **(env or {})},
        )
        self.info = self._await_ready(timeout=20)

    def _await_ready(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"server did not start (exit code {self.process.returncode}); see {self.log.name}"
                )
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        text = line.decode().strip()
        if not text.startswith("READY "):
            self.stop()
            raise RuntimeError(f"unexpected server output {text[:200]!r}")
        return {**json.loads(text[len("READY ") :]), "pid": self.process.pid}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def run_once(contender: Contender, scenario: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Fresh server(s) + one load-generator run; returns the generator's result or an error.

    The ``redis`` scenario starts two nodes of the contender sharing the Redis bus, on a channel
    name unique to the run (nothing left from an earlier run can be delivered), and deletes that
    channel's keys afterwards.
    """
    spec = spec_for(scenario, args)
    env: dict[str, str] = {}
    nodes = 1
    if scenario == "redis":
        spec["channel"] = f"bench-{secrets.token_hex(6)}"
        env["SPLITCHAT_BENCH_BUS"] = REDIS_URL
        nodes = 2
    servers: list[Server] = []
    try:
        while len(servers) < nodes:  # keep the ones started so far, to stop them on failure
            servers.append(Server(contender, log_dir, env))
    except RuntimeError as exc:
        for server in servers:
            server.stop()
        return {"error": str(exc)}
    spec["server"] = servers[0].info
    spec["extra_servers"] = [server.info for server in servers[1:]]
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            timeout=args.timeout + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"load generator exceeded {args.timeout + 30:.0f} s"}
    finally:
        for server in servers:
            server.stop()
        if scenario == "redis":
            forget_redis_channel(spec["channel"])
    for line in reversed(completed.stdout.decode().splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    return {
        "error": f"load generator failed (exit {completed.returncode}): {completed.stderr.decode()[-600:]}"
    }


def redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def forget_redis_channel(channel: str) -> None:
    """Delete the keys the contenders created for this run's unique channel (best effort)."""
    try:
        import redis
    except ImportError:
        return
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"*{channel}*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


def metric(result: dict[str, Any], key: str) -> float | None:
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> contender -> metric -> {median, min, max, n}, plus problem flags."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run.get("skipped"):
            continue
        scenario, contender, result = run["scenario"], run["contender"], run["result"]
        entry = summary.setdefault(scenario, {}).setdefault(contender, {"values": {}, "flags": set()})
        if "error" in result:
            entry["flags"].add("error")
            continue
        for key, _, _ in METRICS.get(scenario, []):
            value = metric(result, key)
            if value is not None:
                entry["values"].setdefault(key, []).append(value)
        for problem in PROBLEMS:
            if result.get(problem):
                entry["flags"].add(problem)
        if result.get("loadgen_saturated"):
            entry["flags"].add("GENERATOR SATURATED")
    for contenders in summary.values():
        for entry in contenders.values():
            entry["stats"] = {
                key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                for key, v in entry.pop("values").items()
            }
            entry["flags"] = sorted(entry["flags"])
    return summary


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(
    summary: dict[str, dict[str, dict[str, Any]]], skipped: dict[str, str], runs: list[dict[str, Any]]
) -> str:
    lines: list[str] = []
    for scenario in SCENARIOS:
        if scenario in skipped:
            lines += [f"\n## {scenario}: {skipped[scenario]}"]
            continue
        if scenario not in summary and not any(r["scenario"] == scenario for r in runs):
            continue
        lines += [f"\n## {scenario}  (median, min-max over repetitions; xN = ratio to {REFERENCE})"]
        reference = summary.get(scenario, {}).get(REFERENCE, {}).get("stats", {})
        for contender, entry in summary.get(scenario, {}).items():
            cells = []
            for key, label, _ in METRICS[scenario]:
                stat = entry["stats"].get(key)
                if stat is None:
                    continue
                cell = f"{label}: {fmt(stat['median'])} ({fmt(stat['min'])}-{fmt(stat['max'])})"
                ref = reference.get(key, {}).get("median")
                if ref and contender != REFERENCE:
                    cell += f" x{stat['median'] / ref:.2f}"
                cells.append(cell)
            flags = f"  [!] {', '.join(entry['flags'])}" if entry["flags"] else ""
            lines.append(f"  {contender:<22} " + " | ".join(cells) + flags)
        for run in runs:
            if run["scenario"] == scenario and run.get("skipped") and run.get("contender"):
                lines.append(f"  {run['contender']:<22} skipped: {run['skipped']}")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> bool:
    """Latency percentiles (latency scenario) and deliveries/s (fan-out) per contender."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    percentiles = ["latency_ms.p50", "latency_ms.p90", "latency_ms.p99", "latency_ms.max"]
    latency = summary.get("latency", {})
    width = 0.8 / max(len(latency), 1)
    for i, (contender, entry) in enumerate(latency.items()):
        stats = [entry["stats"].get(p) for p in percentiles]
        xs = [j + i * width for j, s in enumerate(stats) if s]
        medians = [s["median"] for s in stats if s]
        errors = [[s["median"] - s["min"] for s in stats if s], [s["max"] - s["median"] for s in stats if s]]
        left.bar(xs, medians, width, yerr=errors, label=contender, capsize=3)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(percentiles))], ["p50", "p90", "p99", "max"])
    left.set_yscale("log")
    left.set_ylabel("delivery latency, ms (log)")
    left.set_title("latency scenario: POST -> WebSocket receipt")
    if latency:
        left.legend(fontsize=8)
    fanout = summary.get("fanout", {})
    names = [c for c, e in fanout.items() if "deliveries_per_s" in e["stats"]]
    stats = [fanout[c]["stats"]["deliveries_per_s"] for c in names]
    right.bar(
        range(len(names)),
        [s["median"] for s in stats],
        yerr=[[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]],
        capsize=4,
        color=[f"C{i}" for i in range(len(names))],
    )
    right.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    right.set_ylabel("deliveries / s")
    right.set_title("fan-out scenario throughput")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def versions() -> dict[str, str]:
    found = {}
    for package in (
        "splitchat",
        "websockets",
        "uvicorn",
        "starlette",
        "broadcaster",
        "python-socketio",
        "uvloop",
    ):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document it also writes to ``--out``."""
    args = parse_args(argv)
    raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="splitchat-bench-logs-"))
    contenders: list[Contender] = []
    skipped_contenders: dict[str, str] = {}
    for name in args.contenders:
        reason = CONTENDERS[name].unavailable()
        if reason:
            skipped_contenders[name] = reason
            print(f"skip contender {name}: {reason}")
        else:
            contenders.append(CONTENDERS[name])
    skipped_scenarios: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    for scenario in args.scenarios:
        eligible = contenders
        if scenario == "redis":
            if not redis_reachable():
                reason = "SKIPPED: no Redis on 127.0.0.1:6379"
                skipped_scenarios[scenario] = reason
                runs.append({"scenario": scenario, "skipped": reason})
                print(f"scenario redis: {reason}")
                continue
            eligible = []
            for contender in contenders:
                reason = contender.cross_node_unavailable()
                if reason:
                    print(f"scenario redis: skip {contender.name}: {reason}")
                    runs.append({"scenario": scenario, "contender": contender.name, "skipped": reason})
                else:
                    eligible.append(contender)
        for repetition in range(args.repeat):
            shift = repetition % max(len(eligible), 1)
            for contender in eligible[shift:] + eligible[:shift]:
                started = time.monotonic()
                result = run_once(contender, scenario, args, log_dir)
                runs.append(
                    {
                        "scenario": scenario,
                        "contender": contender.name,
                        "repetition": repetition,
                        "result": result,
                    }
                )
                status = result.get("error") or "ok"
                print(
                    f"{scenario:<8} rep {repetition + 1}/{args.repeat} {contender.name:<22} "
                    f"{time.monotonic() - started:5.1f}s {status}",
                    flush=True,
                )
    summary = summarize(runs)
    table = render_table(summary, skipped_scenarios, runs)
    print(table)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {
        "meta": {
            "date": stamp,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": versions(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "skipped_contenders": skipped_contenders,
            "skipped_scenarios": skipped_scenarios,
            "server_logs": str(log_dir),
        },
        "summary": summary,
        "runs": runs,
        "table": table,
    }
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(document, indent=1))
    print(f"\nresults: {json_path}")
    if not args.no_plot:
        png = args.out / f"bench-{stamp}.png"
        print(f"plot: {png}" if plot(summary, png) else "plot: skipped (matplotlib not installed)")
    return document


if __name__ == "__main__":
    main()
