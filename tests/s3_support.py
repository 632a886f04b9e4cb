"""A real S3-compatible server for tests: moto's standalone server, and a fault proxy.

- ``MotoServer``: ``moto_server`` as a separate process on a free 127.0.0.1 port.
- ``FaultProxy``: a small HTTP reverse proxy, run as a separate process (this file run as
  a script), in front of the server. For a fraction of requests it answers 500/503,
  drops the connection before or after forwarding, or cuts a response body short; it
  can also add latency to every request, or to some methods only (benchmarks: a network
  round trip; tests: an upload slow enough to be interrupted), or act as a store with a
  quota (``quota_bytes``: once the bodies it let through reach that many bytes, every
  write with a body is answered 507 XMinioStorageFull, as MinIO answers on a full drive).
  Its counts are served at ``/__proxy_stats__``.

Test modules build their fixtures from ``MotoServer``, ``use_test_credentials`` and
``create_bucket`` (tests/conftest.py is not the place: it belongs to the workflow tests).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
STATS_PATH = "/__proxy_stats__"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
HISTORY_LIMIT = 50_000
FAULT_MODES = ("status500", "status503", "drop_before", "drop_after", "truncate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with {process.returncode} before serving {url}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing answered at {url} within {timeout} s")


class _Process:
    """A child process serving HTTP on ``port``; stopped on ``stop()`` or exit of a ``with``."""

    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MotoServer(_Process):
    def __init__(self, log_path: str | os.PathLike | None = None):
        self.port = free_port()
        executable = Path(sys.executable).parent / "moto_server"
        log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [str(executable), "-H", HOST, "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until_up(f"{self.url}/moto-api/", self.process)


class FaultProxy(_Process):
    """The proxy below as a child process in front of ``upstream``."""

    def __init__(
        self,
        upstream: str,
        fault_rate: float = 0.0,
        latency_ms: float = 0.0,
        seed: int = 1,
        latency_methods: str = "",
        port: int | None = None,
        quota_bytes: int | None = None,
    ):
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--port",
                str(self.port),
                "--upstream",
                upstream,
                "--fault-rate",
                str(fault_rate),
                "--latency-ms",
                str(latency_ms),
                "--seed",
                str(seed),
                "--latency-methods",
                latency_methods,
                *(["--quota-bytes", str(quota_bytes)] if quota_bytes is not None else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_up(self.url + STATS_PATH, self.process)

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + STATS_PATH, timeout=5) as response:
            return json.loads(response.read())


# ---------------------------------------------------------------- the proxy process


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        port: int,
        upstream: str,
        fault_rate: float,
        latency_s: float,
        seed: int,
        latency_methods: str,
        quota_bytes: int | None = None,
    ):
        super().__init__((HOST, port), _ProxyHandler)
        self.quota_bytes = quota_bytes
        self.stored_bytes = 0
        self.latency_methods = {m.strip().upper() for m in latency_methods.split(",") if m.strip()}
        host, _, upstream_port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(upstream_port or 80))
        self.fault_rate = fault_rate
        self.latency_s = latency_s
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "over_quota": 0, **{mode: 0 for mode in FAULT_MODES}}
        self.history: list[tuple[str, str, str | None]] = []  # method, path, fault
        self.local = threading.local()

    def pick_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            mode = None
            if self.random.random() < self.fault_rate:
                mode = self.random.choice(FAULT_MODES)
                if mode == "truncate" and method != "GET":
                    mode = "drop_after"
                self.counts[mode] += 1
            if len(self.history) < HISTORY_LIMIT:
                self.history.append((method, path, mode))
            return mode

    def over_quota(self, method: str, body: bytes) -> bool:
        """A write with a body that the quota has no room for (counted once let through)."""
        if self.quota_bytes is None or method not in ("PUT", "POST") or not body:
            return False
        with self.lock:
            if self.stored_bytes + len(body) > self.quota_bytes:
                self.counts["over_quota"] += 1
                return True
            self.stored_bytes += len(body)
            return False

    def upstream_connection(self) -> http.client.HTTPConnection:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(*self.upstream, timeout=120)
            self.local.connection = connection
        return connection

    def forget_connection(self) -> None:
        connection = getattr(self.local, "connection", None)
        if connection is not None:
            connection.close()
        self.local.connection = None


_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the test proxy</Message></Error>"
)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self):
        if self.path == STATS_PATH:
            with self.server.lock:
                stats = {**self.server.counts, "history": self.server.history}
                self._send(200, json.dumps(stats).encode(), "application/json")
            return
        self._forward()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._read_body()
        if self.server.latency_s and (
            not self.server.latency_methods or self.command in self.server.latency_methods
        ):
            time.sleep(self.server.latency_s)
        fault = self.server.pick_fault(self.command, self.path)
        if self.server.over_quota(self.command, body):
            self._send(
                507, _ERROR_BODY.format(code="XMinioStorageFull").encode(), "application/xml"
            )
            return
        if fault in ("status500", "status503"):
            status, code = (500, "InternalError") if fault == "status500" else (503, "SlowDown")
            self._send(status, _ERROR_BODY.format(code=code).encode(), "application/xml")
            return
        if fault == "drop_before":
            self._drop()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = self.server.upstream_connection()
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException):
            self.server.forget_connection()
            self._drop()
            return
        if fault == "drop_after":
            response.read()
            self._drop()
            return
        length = response.getheader("Content-Length")
        body_out = None if length is not None else response.read()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body_out) if body_out is not None else length))
        self.end_headers()
        if body_out is not None:
            self.wfile.write(body_out)
        else:
            self._relay(response, int(length), truncate=fault == "truncate")
        if response.will_close:
            self.server.forget_connection()

    def _relay(self, response: http.client.HTTPResponse, length: int, truncate: bool) -> None:
        """Copy the body; with ``truncate``, stop half-way and drop the connection."""
        limit = length // 2 if truncate else length
        sent = 0
        while chunk := response.read(1 << 16):
            if sent + len(chunk) > limit:
                self.wfile.write(chunk[: limit - sent])
                response.read()
                self._drop()
                return
            self.wfile.write(chunk)
            sent += len(chunk)

    do_PUT = do_POST = do_DELETE = do_HEAD = _forward


def serve_proxy(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fault-injecting HTTP proxy for S3 tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency-methods", default="", help="comma-separated; empty = all")
    parser.add_argument("--quota-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    server = _ProxyServer(
        args.port,
        args.upstream,
        args.fault_rate,
        args.latency_ms / 1000,
        args.seed,
        args.latency_methods,
        args.quota_bytes,
    )
    server.serve_forever()


# ---------------------------------------------------------------- helpers for tests


def fake_credentials() -> dict[str, str]:
    """Distinctive throw-away credentials, easy to search for in every output."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": "s3cr3t" + secrets.token_urlsafe(24),
    }


def isolated_aws_environment(tmp_path: Path, credentials: dict[str, str]) -> dict[str, str]:
    """Variables that make boto3 use only ``credentials`` (no host config or profile)."""
    empty = tmp_path / "aws-empty-config"
    empty.write_text("")
    return {
        **credentials,
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def raw_client(endpoint: str, credentials: dict[str, str] | None = None):
    """A plain boto3 client for arranging and inspecting test data (not medprep's code)."""
    import boto3
    from botocore.config import Config

    credentials = credentials or {}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=credentials.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=credentials.get("AWS_SECRET_ACCESS_KEY", "testing"),
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def new_bucket_name() -> str:
    return f"medprep-{uuid.uuid4().hex[:12]}"


def use_test_credentials(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """Put fresh fake credentials (and nothing else of AWS) in the environment.

    For a pytest fixture: ``monkeypatch`` undoes it. medprep's client and listing caches
    are emptied so the new credentials are used.
    """
    from medprep import storage

    credentials = fake_credentials()
    for name, value in isolated_aws_environment(tmp_path, credentials).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    storage.clear_caches()
    return credentials


def create_bucket(server: MotoServer, credentials: dict[str, str]) -> str:
    name = new_bucket_name()
    raw_client(server.url, credentials).create_bucket(Bucket=name)
    return name


if __name__ == "__main__":
    serve_proxy()
