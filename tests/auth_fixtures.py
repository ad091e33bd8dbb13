"""Fixtures for test_auth_http.py: the auth services the relay asks, and a raw SMTP client.

- auth_service: contrib/auth_http_example.py's make_server(), serving in a
  thread on 127.0.0.1:<port 0> with a policy the test writes.
- raw_listener: a TCP listener that reads an HTTP request head and then
  answers with fixed bytes (nonsense), or never answers at all (a hung service).
- nginx: a real nginx started with its own config under tmp_path, for the
  check that the relay speaks to nginx's auth_http answers as to ours.

SMTPClient talks to the relay over a raw socket: exact bytes out, whole
replies in. Everything started here is stopped at teardown.
"""
import contextlib
import grp
import itertools
import os
import pwd
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "contrib"))
import auth_http_example  # noqa: E402  (contrib/ is no package)

NGINX = "/usr/sbin/nginx"

# What requests adds to every request on its own; the tests look at the rest.
REQUESTS_OWN_HEADERS = {"user-agent", "accept-encoding", "accept", "connection"}


# --- The example auth service, in a thread ---------------------------------------

class RunningAuthService:
    """auth_http_example's server answering with `policy`, serving until stop()."""

    def __init__(self, policy):
        self.server = auth_http_example.make_server(("127.0.0.1", 0), policy)
        self.host, self.port = self.server.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/auth"
        # A short poll interval only makes shutdown() quick; nothing waits on it.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def requests(self):
        """The headers of each request so far, as the relay chose them: requests' own left out."""
        with self.server.lock:
            recorded = list(self.server.requests)
        return [[(k, v) for k, v in headers if k.lower() not in REQUESTS_OWN_HEADERS] for headers in recorded]

    @property
    def connections(self):
        """TCP connections the service accepted so far."""
        with self.server.lock:
            return self.server.connections

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def auth_service():
    """Factory start(policy) -> RunningAuthService with url, requests, connections; stopped at teardown.

    A policy is any callable(headers) -> [(name, value), ...] response headers.
    """
    with contextlib.ExitStack() as teardown:
        def start(policy):
            service = RunningAuthService(policy)
            teardown.callback(service.stop)
            return service

        yield start


# --- A listener that is no proper HTTP server ------------------------------------

class _RawHandler(socketserver.BaseRequestHandler):
    def handle(self):
        owner = self.server.owner
        head = b""
        self.request.settimeout(30)
        try:
            while b"\r\n\r\n" not in head:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                head += chunk
            owner.heads.append(head)
            if owner.reply is None:
                owner.stopping.wait(30)     # never answer; stop() ends the wait
            else:
                self.request.sendall(owner.reply)
        except OSError:
            pass


class _RawServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class RawListener:
    """127.0.0.1:<port 0>: reads a request head, then sends `reply` and closes, or hangs if None."""

    def __init__(self, reply):
        self.reply, self.heads, self.stopping = reply, [], threading.Event()
        self.server = _RawServer(("127.0.0.1", 0), _RawHandler)
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/auth"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def raw_listener():
    """Factory start(reply: bytes | None) -> RawListener with url and heads; stopped at teardown."""
    with contextlib.ExitStack() as teardown:
        def start(reply):
            listener = RawListener(reply)
            teardown.callback(listener.stop)
            return listener

        yield start


# --- nginx ------------------------------------------------------------------------

# nginx -V names the temp directories compiled in; each must be writable, so
# they are moved under the prefix. A module left out (nginx-light) has none.
TEMP_PATH_DIRECTIVES = {"client-body": "client_body_temp_path", "proxy": "proxy_temp_path",
                        "fastcgi": "fastcgi_temp_path", "uwsgi": "uwsgi_temp_path", "scgi": "scgi_temp_path"}


def nginx_temp_paths(prefix):
    built = subprocess.run([NGINX, "-V"], capture_output=True, text=True, timeout=10).stderr
    lines = []
    for name in re.findall(r"--http-([a-z-]+)-temp-path=", built):
        module = name.replace("-", "_")
        if name in TEMP_PATH_DIRECTIVES and f"--without-http_{module}_module" not in built:
            lines.append(f"{TEMP_PATH_DIRECTIVES[name]} {prefix}/{module}_temp;")
    return "\n    ".join(lines)


class Nginx:
    """nginx with one server on 127.0.0.1:<free port> holding `location`; url is .../auth.

    Its access log has one line per request: method|from|to|client-ip of the
    auth_http headers received.
    """

    def __init__(self, prefix, location):
        self.prefix = prefix
        prefix.mkdir()
        self.access_log_path = prefix / "access.log"
        user = ""
        if os.geteuid() == 0:       # workers drop to nobody; the default group "nobody" is Debian's "nogroup"
            nobody = pwd.getpwnam("nobody")
            user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
        for _ in range(5):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}/auth"
            conf = prefix / "nginx.conf"
            conf.write_text(f"""
{user}
worker_processes 1;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format auth '$http_auth_method|$http_auth_smtp_from|$http_auth_smtp_to|$http_client_ip';
    access_log {self.access_log_path} auth;
    {nginx_temp_paths(prefix)}
    server {{
        listen 127.0.0.1:{self.port};
        {location}
    }}
}}
""")
            self.proc = subprocess.Popen(
                [NGINX, "-p", f"{prefix}/", "-e", f"{prefix}/error.log", "-c", str(conf),
                 "-g", f"daemon off; pid {prefix}/nginx.pid;"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_accepting():
                return
        raise AssertionError(f"nginx did not start:\n{self.error_log()}")

    def _wait_accepting(self, timeout=10):
        """True once the port accepts; False if nginx exited (e.g. the port was taken meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self.proc.poll() is None
            except ConnectionRefusedError:
                pass
            try:
                self.proc.wait(timeout=0.01)    # doubles as the poll interval
                return False
            except subprocess.TimeoutExpired:
                pass
        self.stop()
        raise AssertionError(f"nginx did not accept connections within {timeout}s:\n{self.error_log()}")

    def error_log(self):
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_access_log(self, n, timeout=5):
        """The access log's lines once there are at least n (nginx writes each after answering)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.access_log_path.read_text() if self.access_log_path.exists() else ""
            lines = text.splitlines()
            if len(lines) >= n:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx logged {len(lines)} request(s), wanted {n}:\n{self.error_log()}")
            time.sleep(0.01)    # nginx signals nothing: poll the file

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def nginx(tmp_path):
    """Factory start(location) -> Nginx serving that location block; skips if nginx is not installed."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"{NGINX} is not installed (Debian package nginx-light)")
    numbers = itertools.count()
    with contextlib.ExitStack() as teardown:
        def start(location):
            server = Nginx(tmp_path / f"nginx-{next(numbers)}", location)
            teardown.callback(server.stop)
            return server

        yield start


# --- A raw SMTP client --------------------------------------------------------------

@dataclass
class Reply:
    code: int
    lines: list     # the text of each line, after "250-" or "250 "

    @property
    def text(self):
        """The first line as sent: "535 5.7.0 Bad recipient"."""
        return f"{self.code} {self.lines[0]}"

    def __str__(self):
        return "\n".join(f"{self.code} {line}" for line in self.lines)


class SMTPClient:
    """One socket to the relay; replies are read whole, each line must end in CRLF."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed in the middle of a reply; unread {self.buf!r}"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8")

    def reply(self):
        lines = []
        while True:
            line = self.line()
            assert re.match(r"\d{3}[ -]", line), f"not an SMTP reply line: {line!r}"
            code = int(line[:3])
            lines.append(line[4:])
            if line[3] == " ":
                return Reply(code, lines)

    def say(self, command):
        """Send one command line (str or bytes, CRLF added) -> its reply."""
        self.send((command.encode("utf-8") if isinstance(command, str) else command) + b"\r\n")
        return self.reply()

    def rest(self):
        """Everything the relay still sends until it closes the connection."""
        data = self.buf
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
