"""
Bounded under abuse (issue 13): the daemon's memory and reactor stalls under
the issue's attacks, each in a fresh daemon.

``python -m bench.memory_bounds [--scenario NAME]... [--quick] [--pythonpath DIR] [--json PATH]``

The daemon runs in its own process (C{python -c "...cli.main()"}, so that
C{--pythonpath} can run another source tree, say C{git archive HEAD} of an
older commit, for before/after figures); this process is the client, with
blocking sockets and threads (standard library only).  Options the daemon
does not know (an older tree) are left out, and said so in the results.

Scenarios (C{--quick} shrinks every count by 10 or so: it checks the
harness, its figures mean little):

 - C{republish}: one module with a 0.93 MB body published again 1 000 times
   (a new content each time): RSS.  Once with the default limits (the
   registration is refused when the daemon has a per-registration limit),
   once with the limits raised to 2 MB, which measures the change log's byte
   budget.
 - C{watchers}: 1 000 SSE watchers that never read (4 KiB receive buffers),
   then one 0.93 MB event: RSS before and after, the longest health answer
   meanwhile; then every watcher closes: RSS after (memory must come back),
   descriptors.
 - C{replay}: 300 modules of 0.93 MB published (a replay buffer large
   enough to hold them), then 5 cycles of 5 watchers each replayed from
   C{Last-Event-ID: 1} that never read, then closed: RSS after each replay
   and each cycle, the longest health answer, descriptors.
 - C{fanout}: publish latency (p50, p99, max of 30 publishes, one at a time,
   each left to reach every watcher) with 1 000 and then 10 000 idle
   watchers.
 - C{services}: 100 000 modules serving one service: C{GET
   /api/v1/services/shared} and C{GET /api/v1/modules} times, discover p99
   and the longest health answer while 4 clients loop on the services
   answer, and the longest health answer when 20 held C{?index=} queries on
   it are woken by one publish.

"The longest health answer" is the worst latency of C{GET /api/v1/health}
sent every 5 ms on its own connection: how long the reactor was busy in one
go, give or take this process's own scheduling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

from bench.daemon import Workspace, log_tail, read_status_kib, stop_process
from bench.section import progress, write_json

__all__ = ["main", "run"]

HOST = "127.0.0.1"
BIG = 930_000
LISTENING = re.compile(rb"listening on tcp:127\.0\.0\.1:(\d+)")
SCENARIOS = ("republish", "watchers", "replay", "fanout", "services")


# -- the daemon ---------------------------------------------------------------


class Daemon:
    """One daemon process on an ephemeral loopback port."""

    def __init__(self, workspace: Workspace, args: Sequence[str], pythonpath: str | None) -> None:
        self.log_path = workspace.new_path("daemon-log")
        env = workspace.env()
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        argv = [
            sys.executable,
            "-c",
            "from hsu_registry.cli import main; main()",
            "--endpoint=tcp:0:interface=127.0.0.1",
            *args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workspace.root, env=env
            )
        workspace._children.append(self.process)
        deadline = time.monotonic() + 30
        while True:
            with open(self.log_path, "rb") as f:
                found = LISTENING.search(f.read())
            if found:
                self.port = int(found.group(1))
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {log_tail(self.log_path)}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        return read_status_kib(self.pid) / 1024

    def peak_mb(self) -> float:
        """The peak RSS since the last L{reset_peak} (C{VmHWM})."""
        return read_status_kib(self.pid, "VmHWM") / 1024

    def reset_peak(self) -> None:
        """Start measuring the peak RSS anew (C{/proc/PID/clear_refs}, Linux 4.0 and later)."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            pass

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def settle(self, quiet: float = 0.3, timeout: float = 60.0) -> None:
        """Wait until the daemon used no CPU for C{quiet} seconds."""
        deadline = time.monotonic() + timeout
        before = self.cpu_s()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.cpu_s()
            if now - before < 0.02:
                return
            before = now

    def log_lines(self, needle: str) -> list[str]:
        """The daemon's log lines holding C{needle}."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip() for line in f if needle in line]

    def stop(self) -> None:
        stop_process(self.process)


def supported_options(pythonpath: str | None) -> set[str]:
    """The long options the daemon (of C{pythonpath}, or the installed one) knows."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, "-c", "from hsu_registry.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",  # not a source tree's directory: the path decides which daemon
        timeout=60,
    )
    return set(re.findall(r"--([a-z][a-z-]+)", done.stdout + done.stderr))


# -- HTTP ---------------------------------------------------------------------


def request_bytes(method: str, path: str, body: bytes | None = None, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: r\r\n{extra}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("ascii") + (body or b"")


class Client:
    """HTTP/1.1 on one persistent TCP connection, one request at a time."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        self.buffer += data

    def read_answer(self) -> tuple[int, dict[str, str], bytes]:
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[: end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(buffer) < length:
                self._fill()
            body = bytes(buffer[:length])
            del buffer[:length]
        else:  # chunked
            body = b""
            while True:
                while (end := buffer.find(b"\r\n")) < 0:
                    self._fill()
                size = int(bytes(buffer[:end]), 16)
                while len(buffer) < end + 2 + size + 2:
                    self._fill()
                body += bytes(buffer[end + 2 : end + 2 + size])
                del buffer[: end + 2 + size + 2]
                if size == 0:
                    break
        return int(lines[0].split(" ", 2)[1]), headers, body

    def call(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request_bytes(method, path, body))
        return self.read_answer()

    def pipeline(self, payloads: Sequence[bytes]) -> list[int]:
        """Send every request at once, then read every answer; their statuses."""
        self.sock.sendall(b"".join(payloads))
        return [self.read_answer()[0] for _ in payloads]


def _probe(port: int, commands: Connection) -> None:
    """
    In a child process (so that this one's work does not delay it): C{GET
    /api/v1/health} every 5 ms on its own connection; on each command, the
    longest latency since the previous one (ms) is sent back.
    """
    client = Client(port)
    payload = request_bytes("GET", "/api/v1/health")
    longest = 0.0
    while True:
        if commands.poll():
            if commands.recv() == "stop":
                return
            commands.send(round(longest, 1))
            longest = 0.0
        start = time.perf_counter()
        client.sock.sendall(payload)
        client.read_answer()
        longest = max(longest, (time.perf_counter() - start) * 1000)
        time.sleep(0.005)


class Prober:
    """The health prober (L{_probe}) in its own process."""

    def __init__(self, port: int) -> None:
        context = multiprocessing.get_context("fork")
        self.commands, theirs = context.Pipe()
        self.process = context.Process(target=_probe, args=(port, theirs), daemon=True)
        self.process.start()

    def take_max(self) -> float:
        """The longest health latency since the last call, in ms."""
        self.commands.send("take")
        value: float = self.commands.recv()
        return value

    def stop(self) -> None:
        self.commands.send("stop")
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


@contextmanager
def probing(port: int) -> Iterator[Prober]:
    prober = Prober(port)
    try:
        yield prober
    finally:
        prober.stop()


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 1)


# -- bodies and watchers -------------------------------------------------------------


def big_body(module_id: str, size: int, salt: int, service: str = "big") -> bytes:
    """A publish body of about C{size} bytes: APIs with 64 metadata values of 1000 characters."""
    per_api = 64 * 1012
    apis = []
    for a in range(max(1, size // per_api)):
        metadata = {f"k{i:03d}": f"{salt % 10}" * 1000 for i in range(64)}
        apis.append(
            {
                "serviceIDs": [service],
                "serverPort": 1000 + (salt + a) % 60000,
                "protocol": "grpc",
                "metadata": metadata,
            }
        )
    return json.dumps({"moduleID": module_id, "processID": 1, "apis": apis}).encode()


def small_body(module_id: str, service: str = "shared") -> bytes:
    return json.dumps(
        {
            "moduleID": module_id,
            "processID": 1,
            "apis": [{"serviceIDs": [service], "serverPort": 50051, "protocol": "grpc"}],
        },
        separators=(",", ":"),
    ).encode()


def open_watchers(
    port: int, count: int, rcvbuf: int | None, headers: str = ""
) -> list[socket.socket]:
    """C{count} SSE watchers that will never read, each with C{rcvbuf} bytes of buffer."""
    socks = []
    payload = request_bytes("GET", "/api/v1/watch", extra="Accept: text/event-stream\r\n" + headers)
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((HOST, port))
        sock.sendall(payload)
        socks.append(sock)
    return socks


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def raise_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


# -- scenarios ----------------------------------------------------------------------


class Run:
    """One run of the scenarios: settings, and the daemon's options."""

    def __init__(self, quick: bool, pythonpath: str | None) -> None:
        self.quick = quick
        self.pythonpath = pythonpath
        self.known = supported_options(pythonpath)
        self.skipped: set[str] = set()

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def options(self, **values: Any) -> list[str]:
        """C{--name=value} for each option the daemon knows (others noted as skipped)."""
        out = []
        for key, value in values.items():
            name = key.replace("_", "-")
            if name in self.known:
                out.append(f"--{name}={value}")
            else:
                self.skipped.add(name)
        return out

    @contextmanager
    def daemon(self, *args: str) -> Iterator[Daemon]:
        with Workspace() as workspace:
            daemon = Daemon(workspace, ["--policy=open", *args], self.pythonpath)
            try:
                yield daemon
            finally:
                daemon.stop()

    def republish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        times = self.n(1000, 100)
        for label, raise_limits in (("default limits", False), ("limits raised to 2 MB", True)):
            extra = ["--max-body-size=2000000"]
            if raise_limits:
                extra += self.options(max_registration_size=2_000_000)
            with self.daemon(*extra) as daemon:
                client = Client(daemon.port)
                before = daemon.rss_mb()
                statuses: dict[int, int] = {}
                for i in range(times):
                    status, _, _ = client.call("POST", "/api/v1/publish", big_body("big", BIG, i))
                    statuses[status] = statuses.get(status, 0) + 1
                daemon.settle()
                out[label] = {
                    "publishes": times,
                    "statuses": statuses,
                    "rss_before_mb": round(before),
                    "rss_after_mb": round(daemon.rss_mb()),
                }
                client.close()
            progress(f"republish, {label}: {out[label]}")
        return out

    def watchers(self) -> dict[str, Any]:
        count = self.n(1000, 100)
        extra = ["--max-body-size=2000000"]
        extra += self.options(max_registration_size=2_000_000)
        with self.daemon(*extra) as daemon, probing(daemon.port) as prober:
            client = Client(daemon.port)
            client.call("POST", "/api/v1/publish", small_body("warm"))
            daemon.settle()
            idle = daemon.rss_mb()
            socks = open_watchers(daemon.port, count, 4096)
            daemon.settle()
            with_watchers = daemon.rss_mb()
            prober.take_max()
            daemon.reset_peak()
            start = time.perf_counter()
            status, _, _ = client.call("POST", "/api/v1/publish", big_body("big", BIG, 1))
            publish_ms = (time.perf_counter() - start) * 1000
            daemon.settle()
            after_event = daemon.rss_mb()
            peak = daemon.peak_mb()
            stall = prober.take_max()
            close_all(socks)
            daemon.settle()
            time.sleep(1.0)
            after_close = daemon.rss_mb()
            fds = daemon.fds()
            client.close()
            result = {
                "watchers": count,
                "publish_status": status,
                "publish_ms": round(publish_ms, 1),
                "rss_idle_mb": round(idle),
                "rss_with_watchers_mb": round(with_watchers),
                "rss_peak_during_event_mb": round(peak),
                "rss_after_event_mb": round(after_event),
                "rss_after_close_mb": round(after_close),
                "max_health_ms_during_event": stall,
                "daemon_fds_after_close": fds,
                "reclaimed": daemon.log_lines("Reclaimed"),
            }
        progress(f"watchers: {result}")
        return result

    def replay(self) -> dict[str, Any]:
        events = self.n(300, 30)
        cycles, per_cycle = 5, self.n(5, 2)
        extra = ["--max-body-size=2000000"]
        extra += self.options(
            max_registration_size=2_000_000, replay_buffer_bytes=events * 2_000_000
        )
        with self.daemon(*extra) as daemon, probing(daemon.port) as prober:
            client = Client(daemon.port)
            for i in range(events):
                client.call("POST", "/api/v1/publish", big_body(f"m{i}", BIG, i))
            _, headers, _ = client.call("GET", "/api/v1/discover/m0")
            epoch = headers.get("x-hsu-epoch", "")
            daemon.settle()
            before = daemon.rss_mb()
            fds_before = daemon.fds()
            prober.take_max()
            rounds = []
            for cycle in range(cycles):
                replay_rss = []
                socks: list[socket.socket] = []
                for _ in range(per_cycle):
                    socks += open_watchers(
                        daemon.port,
                        1,
                        4096,
                        f"Last-Event-ID: 1\r\nX-HSU-Epoch: {epoch}\r\n",
                    )
                    daemon.settle(quiet=0.2)
                    replay_rss.append(round(daemon.rss_mb()))
                stall = prober.take_max()
                close_all(socks)
                daemon.settle()
                time.sleep(0.5)
                rounds.append(
                    {
                        "rss_after_each_replay_mb": replay_rss,
                        "rss_after_close_mb": round(daemon.rss_mb()),
                        "daemon_fds_after_close": daemon.fds(),
                        "max_health_ms": stall,
                    }
                )
                progress(f"replay cycle {cycle + 1}: {rounds[-1]}")
            client.close()
            return {
                "events": events,
                "replays_per_cycle": per_cycle,
                "rss_before_mb": round(before),
                "daemon_fds_before": fds_before,
                "cycles": rounds,
            }

    def fanout(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        publishes = self.n(30, 10)
        for count in (self.n(1000, 100), self.n(10_000, 1000)):
            raise_files(count + 1000)
            extra = self.options(
                max_watchers=count + 100,
                max_watchers_per_peer=count + 100,
                max_connections=count + 200,
                max_connections_per_peer=count + 200,
            )
            with self.daemon(*extra) as daemon:
                client = Client(daemon.port)
                client.call("POST", "/api/v1/publish", small_body("warm"))
                socks = open_watchers(daemon.port, count, None)
                daemon.settle()
                latencies = []
                for i in range(publishes):
                    start = time.perf_counter()
                    client.call("POST", "/api/v1/publish", small_body(f"f{i}"))
                    latencies.append((time.perf_counter() - start) * 1000)
                    daemon.settle(quiet=0.1)
                # A tenth of them close: the reclaiming pass, the others open.
                with probing(daemon.port) as prober:
                    close_all(socks[: count // 10])
                    daemon.settle()
                    time.sleep(1.5)
                    closing_max = prober.take_max()
                close_all(socks)
                client.close()
                out[str(count)] = {
                    "publish_p50_ms": percentile(latencies, 0.5),
                    "publish_p99_ms": percentile(latencies, 0.99),
                    "publish_max_ms": round(max(latencies), 1),
                    "publish_ms": sorted(round(x, 1) for x in latencies),
                    "tenth_closed_max_health_ms": closing_max,
                    "reclaimed": daemon.log_lines("Reclaimed"),
                }
            progress(f"fanout, {count} watchers: {out[str(count)]}")
        return out

    def services(self) -> dict[str, Any]:
        modules = self.n(100_000, 10_000)
        extra = [f"--max-modules={modules + 100}"]
        extra += self.options(max_held_queries_per_peer=1000)
        with self.daemon(*extra) as daemon, probing(daemon.port) as prober:
            client = Client(daemon.port)
            batch = 500
            for first in range(0, modules, batch):
                payloads = [
                    request_bytes("POST", "/api/v1/publish", small_body(f"mod{i}"))
                    for i in range(first, min(modules, first + batch))
                ]
                client.pipeline(payloads)
            daemon.settle()
            out: dict[str, Any] = {"modules": modules, "rss_mb": round(daemon.rss_mb())}

            def timed(path: str, times: int = 3) -> list[float]:
                spent = []
                for _ in range(times):
                    start = time.perf_counter()
                    status, _, body = client.call("GET", path)
                    spent.append(round((time.perf_counter() - start) * 1000, 1))
                    if status != 200:
                        raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
                return spent

            prober.take_max()
            out["services_ms"] = timed("/api/v1/services/shared")
            out["services_max_health_ms"] = prober.take_max()
            out["modules_ms"] = timed("/api/v1/modules")
            out["modules_max_health_ms"] = prober.take_max()

            # 4 clients looping on the services answer, and discovers beside.
            stop = threading.Event()

            def loop(work: Callable[[Client], None]) -> None:
                own = Client(daemon.port)
                while not stop.is_set():
                    work(own)
                own.close()

            discover_ms: list[float] = []

            def discover(own: Client) -> None:
                start = time.perf_counter()
                own.call("GET", "/api/v1/discover/mod7")
                discover_ms.append((time.perf_counter() - start) * 1000)
                time.sleep(0.005)

            threads = [
                threading.Thread(
                    target=loop, args=(lambda c: c.call("GET", "/api/v1/services/shared"),)
                )
                for _ in range(4)
            ]
            threads.append(threading.Thread(target=loop, args=(discover,)))
            for thread in threads:
                thread.start()
            time.sleep(self.n(10, 3))
            stop.set()
            for thread in threads:
                thread.join(60)
            out["looping_discover_p99_ms"] = percentile(discover_ms, 0.99)
            out["looping_max_health_ms"] = prober.take_max()

            # 20 held queries woken by one publish.
            daemon.settle()
            _, headers, _ = client.call("GET", "/api/v1/discover/mod1")
            index = headers["x-hsu-index"]
            held = [Client(daemon.port) for _ in range(20)]
            for query in held:
                query.sock.sendall(
                    request_bytes("GET", f"/api/v1/services/shared?index={index}&wait=60s")
                )
            daemon.settle()
            prober.take_max()
            start = time.perf_counter()
            client.call("POST", "/api/v1/publish", small_body("waker"))
            statuses = [query.read_answer()[0] for query in held]
            out["held_20_all_answered_ms"] = round((time.perf_counter() - start) * 1000, 1)
            out["held_20_statuses"] = sorted(set(statuses))
            daemon.settle()
            out["held_20_max_health_ms"] = prober.take_max()
            close_all([q.sock for q in held])

            # Then 1 000 watchers that do not read, a 100 kB event, and they
            # close: the reclaiming pass with 100 000 modules registered.
            socks = open_watchers(daemon.port, self.n(1000, 100), 4096)
            daemon.settle()
            prober.take_max()
            client.call("POST", "/api/v1/publish", big_body("big", 100_000, 1))
            daemon.settle()
            close_all(socks)
            daemon.settle()
            time.sleep(1.5)
            out["watchers_closed_max_health_ms"] = prober.take_max()
            out["reclaimed"] = daemon.log_lines("Reclaimed")
            client.close()
        progress(f"services: {out}")
        return out


def run(scenarios: Sequence[str], quick: bool, pythonpath: str | None) -> dict[str, Any]:
    """Run C{scenarios}; their figures, with what was skipped."""
    this = Run(quick, pythonpath)
    results: dict[str, Any] = {"quick": quick, "pythonpath": pythonpath}
    for name in scenarios:
        progress(f"scenario {name}")
        results[name] = getattr(this, name)()
    results["options_not_known_to_the_daemon"] = sorted(this.skipped)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_bounds", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pythonpath", help="run the daemon from this source tree")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.scenario or SCENARIOS, args.quick, args.pythonpath)
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
