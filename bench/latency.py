"""
Simple loops measuring discover round trips against a real daemon, over TCP
and over the unix socket, one request at a time on a persistent connection:
raw HTTP (http.client), the blocking client's find_module_apis, and the
Twisted client's find_module_apis.

    python -m bench.latency [--requests 5000]

It starts ``hsu-registry`` as a subprocess, publishes one module, measures,
and stops the daemon.  These are first figures, not the full benchmark.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def start_daemon(socket_path: str) -> tuple[subprocess.Popen[str], int]:
    command = os.path.join(os.path.dirname(sys.executable), "hsu-registry")
    process = subprocess.Popen(
        [command, "--endpoint=tcp:0:interface=127.0.0.1", f"--endpoint=unix:{socket_path}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 15
    port = None
    listening = 0
    while time.monotonic() < deadline and listening < 2:
        line = process.stderr.readline()
        if not line:
            break
        if "listening on" in line:
            listening += 1
            match = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
    if port is None or listening < 2:
        process.kill()
        raise SystemExit("the daemon did not start")
    return process, port


def measure(connection: http.client.HTTPConnection, path: str, count: int) -> list[float]:
    for _ in range(200):  # warm-up
        connection.request("GET", path)
        connection.getresponse().read()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        samples.append(time.perf_counter() - start)
        assert response.status == 200
    return samples


def measure_blocking_client(url: str, count: int) -> list[float]:
    from hsu_registry.client import BlockingRegistryClient

    client = BlockingRegistryClient(url)
    for _ in range(200):
        client.find_module_apis("echo")
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.find_module_apis("echo")
        samples.append(time.perf_counter() - start)
    client.close()
    return samples


def measure_async_client(url: str, count: int) -> list[float]:
    """Runs a reactor in a child process (a reactor cannot be restarted)."""
    code = (
        "import sys, time, json\n"
        "from twisted.internet import task\n"
        "from hsu_registry.client import RegistryClient\n"
        "async def main(reactor):\n"
        "    client = RegistryClient(sys.argv[1], reactor)\n"
        "    for _ in range(200):\n"
        "        await client.find_module_apis('echo')\n"
        "    samples = []\n"
        "    for _ in range(int(sys.argv[2])):\n"
        "        start = time.perf_counter()\n"
        "        await client.find_module_apis('echo')\n"
        "        samples.append(time.perf_counter() - start)\n"
        "    await client.close()\n"
        "    print(json.dumps(samples))\n"
        "task.react(lambda r: __import__('twisted.internet.defer').internet.defer"
        ".Deferred.fromCoroutine(main(r)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, url, str(count)], capture_output=True, text=True, check=True
    )
    samples: list[float] = json.loads(out.stdout)
    return samples


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return (
        f"median {statistics.median(samples) * 1000:.3f} ms  p90 {pct(0.90):.3f} ms  "
        f"p99 {pct(0.99):.3f} ms  ({len(samples)} requests)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="hsu-bench")
    socket_path = os.path.join(directory, "registry.sock")
    process, port = start_daemon(socket_path)
    try:
        tcp = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps(
            {
                "moduleID": "echo",
                "processID": 1,
                "apis": [{"serviceIDs": ["service1"], "serverPort": 50051, "protocol": "grpc"}],
            }
        )
        tcp.request("POST", "/api/v1/publish", body, {"Content-Type": "application/json"})
        assert tcp.getresponse().read() == b'{"success":true}'
        print("discover over TCP:  ", summary(measure(tcp, "/api/v1/discover/echo", args.requests)))
        unix = UnixHTTPConnection(socket_path)
        print(
            "discover over unix: ", summary(measure(unix, "/api/v1/discover/echo", args.requests))
        )
        tcp_url, unix_url = f"tcp://127.0.0.1:{port}", f"unix://{socket_path}"
        for name, url in (("TCP", tcp_url), ("unix", unix_url)):
            samples = measure_blocking_client(url, args.requests)
            print(f"BlockingRegistryClient.find_module_apis over {name}: ", summary(samples))
        for name, url in (("TCP", tcp_url), ("unix", unix_url)):
            samples = measure_async_client(url, args.requests)
            print(f"RegistryClient.find_module_apis over {name}: ", summary(samples))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
