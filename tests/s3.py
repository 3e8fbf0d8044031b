"""A real S3 endpoint for tests: moto's server on loopback, plus a proxy in front of it that injects faults.

The proxy forwards every HTTP request to moto unchanged, except that the test can make the next requests
fail: ``fail(n, "500")`` answers n requests with HTTP 500, ``fail(n, "drop")`` closes n connections without
answering, and ``fail(-1, ...)`` keeps failing until ``fail(0)``; ``after=k`` lets k requests through first.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.spawn import free_port


class FaultyProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.failures, self.mode, self.requests, self.after = 0, "500", 0, 0

    def fail(self, count: int, mode: str = "500", after: int = 0) -> None:
        with self.lock:
            self.failures, self.mode, self.after = count, mode, after

    def take_failure(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.failures == 0:
                return None
            if self.after > 0:
                self.after -= 1
                return None
            if self.failures > 0:
                self.failures -= 1
            return self.mode


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        failure = self.server.take_failure()
        if failure == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if failure == "500":
            payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        headers = dict(self.headers.items())  # the Host too: it is part of what the client signed
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class S3Server:
    """moto's S3 server in a subprocess, reached through a ``FaultyProxy``."""

    def __init__(self, auth_after: int | None = None):
        """``auth_after``: moto checks credentials (IAM users' access keys and policies) from that many requests
        on (``INITIAL_NO_AUTH_ACTION_COUNT``); by default it takes any."""
        self.port = free_port()
        moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
        env = dict(os.environ)
        if auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
        self.process = subprocess.Popen([moto, "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("moto_server did not start")
        self.proxy = FaultyProxy(self.port)
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=f"http://127.0.0.1:{self.port}", aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def stop_backend(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.proxy.shutdown()
        if self.process.poll() is None:
            self.stop_backend()
