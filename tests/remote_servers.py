# Loopback shard servers for the remote-data tests: HTTP with fault injection, and moto's S3.
from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the tests read server.requests instead
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add
        # ~40 ms to every small reply (a real object store answers a range in a few ms)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv: ShardHTTPServer = self.server  # type: ignore[assignment]
        name = unquote(urlparse(self.path).path).lstrip("/")
        fault = None if head else srv.take_fault(name)
        srv.requests.append((self.command, name, self.headers.get("Range")))
        if fault and "status" in fault:
            self.send_error(fault["status"])
            return
        full = os.path.join(srv.root, name)
        if os.path.isdir(full):     # an HTML index, as many static servers list folders
            links = "".join(f'<a href="{f}">{f}</a>\n' for f in sorted(os.listdir(full)))
            body = f"<html><body>{links}</body></html>".encode()
            self._send(200, body, head, {"Content-Type": "text/html"})
            return
        if not os.path.isfile(full):
            self.send_error(404)
            return
        with open(full, "rb") as f:
            data = f.read()
        extra = {"Accept-Ranges": "bytes", "Content-Type": "application/x-tar"}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) + 1 if b else len(data), len(data))
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            self._send(206, data[start:end], head, extra, fault)
        else:
            self._send(200, data, head, extra, fault)

    def _send(self, status: int, body: bytes, head: bool, headers: dict, fault: dict | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if fault and "stall" in fault:       # headers sent, then silence past the read timeout
            time.sleep(fault["stall"])
        if fault and "drop_after" in fault:  # the connection dies mid-body
            self.wfile.write(body[:min(fault["drop_after"], max(len(body) - 1, 0))])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class ShardHTTPServer(ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1 (Range requests, HEAD, HTML folder listings). ``faults`` maps
    a served path to ``{"status": 500 | "stall": s | "drop_after": n, "times": k}`` (k GET
    requests affected, -1 = all)."""

    daemon_threads = True

    def __init__(self, root: str, faults: dict | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.faults = {k: dict(v) for k, v in (faults or {}).items()}
        self.requests: list[tuple] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_fault(self, name: str) -> dict | None:
        with self._lock:
            f = self.faults.get(name)
            if not f or f.get("times", -1) == 0:
                return None
            if f.get("times", -1) > 0:
                f["times"] -= 1
            return f

    def __enter__(self) -> "ShardHTTPServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(root_dirs: dict[str, str], bucket: str = "shards"):
    """moto's S3 server on loopback with ``root_dirs`` (prefix -> local folder) uploaded;
    returns (server, endpoint_url, env) where env holds the test's credentials and endpoint (the
    way a user's environment would: nothing goes into a config)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for prefix, folder in root_dirs.items():
        for f in sorted(os.listdir(folder)):
            client.upload_file(os.path.join(folder, f), bucket, f"{prefix}/{f}")
    return server, endpoint, env
