"""Fixtures for test_auth_http.py (and test_tls.py): the auth services the relay asks.

- auth_service: contrib/auth_http_example.py's make_server(), serving in a
  thread on 127.0.0.1:<port 0> with a policy the test writes.
- raw_listener: a TCP listener that reads an HTTP request head and then
  answers with fixed bytes (nonsense), or never answers at all (a hung service).
- nginx: a real nginx started with its own config under tmp_path, for the
  check that the relay speaks to nginx's auth_http answers as to ours.

ok() and always() make the answers and policies of the auth service that
test_auth_http.py and test_tls.py give it. Everything started here is
stopped at teardown.
"""
import grp
import itertools
import os
import pwd
import re
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import free_port, stop_process, stopped_on_exit, wait_accepting, wait_until
from scripted_backend import ThreadingServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "contrib"))
import auth_http_example  # noqa: E402  (contrib/ is no package)

NGINX = "/usr/sbin/nginx"

# What requests adds to every request on its own; the tests look at the rest.


# --- Policies: what the auth service answers ----------------------------------------

def ok(backend, *extra):
    """The answer naming `backend` (anything with host and port), plus `extra` (name, value) headers."""
    return [("Auth-Status", "OK"), ("Auth-Server", backend.host), ("Auth-Port", str(backend.port)), *extra]


def always(*headers):
    """A policy giving the same answer (these headers) to every lookup."""
    return lambda request: list(headers)


# --- The example auth service, in a thread ---------------------------------------

class RunningAuthService:
    """auth_http_example's server answering with `policy`, serving until stop()."""

    def __init__(self, policy):
        self.server = self.make_server(policy)
        self.host, self.port = self.server.server_address[:2]
        self.url = f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}/auth"
        # A short poll interval only makes shutdown() quick; nothing waits on it.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def make_server(policy):
        """The server, not yet serving: on 127.0.0.1, a port of its own."""
        return auth_http_example.make_server(("127.0.0.1", 0), policy)

    @property
    def requests(self):
        """The headers of each request so far, every one as it came (nothing of urllib3's own)."""
        with self.server.lock:
            return [list(headers) for headers in self.server.requests]

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
    with stopped_on_exit(RunningAuthService) as start:
        yield start


# --- A listener that is no proper HTTP server ------------------------------------

def read_request_head(request, owner):
    """Read an HTTP request's head from the socket `request` into owner.heads -> False where
    the client closed before its blank line."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = request.recv(4096)
        if not chunk:
            return False
        head += chunk
    owner.heads.append(head)
    return True


class _RawHandler(socketserver.BaseRequestHandler):
    def handle(self):
        owner = self.server.owner
        self.request.settimeout(30)
        try:
            if not read_request_head(self.request, owner):
                return
            if owner.reply is None:
                owner.stopping.wait(30)     # never answer; stop() ends the wait
            elif owner.trickle:
                step, interval = owner.trickle
                for at in range(0, len(owner.reply), step):
                    if at and owner.stopping.wait(interval):
                        return
                    self.request.sendall(owner.reply[at:at + step])
            else:
                self.request.sendall(owner.reply)
        except OSError:
            pass


class RawServer:
    """An auth service on 127.0.0.1:<port 0> that speaks raw bytes: its `handler` (a
    BaseRequestHandler) finds this object as self.server.owner, appends each request head
    to `heads`, and sees `stopping` set once stop() is called. Subclasses set `handler`
    and call start() when their own attributes are in place."""

    handler = None

    def start(self):
        self.heads, self.stopping = [], threading.Event()
        self.server = ThreadingServer(("127.0.0.1", 0), self.handler)
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


class RawListener(RawServer):
    """Reads a request head, then sends `reply` and closes, or hangs if None.

    trickle=(step, interval): `reply` goes out `step` bytes at a time, `interval` seconds apart.
    """

    handler = _RawHandler

    def __init__(self, reply, trickle=None):
        self.reply, self.trickle = reply, trickle
        self.start()


@pytest.fixture
def raw_listener():
    """Factory start(reply: bytes | None, trickle=None) -> RawListener with url and heads; stopped at teardown."""
    with stopped_on_exit(RawListener) as start:
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
            try:
                if wait_accepting(self.proc, "127.0.0.1", self.port, timeout=10):
                    return
            except AssertionError as timeout:
                self.stop()
                raise AssertionError(f"nginx: {timeout}:\n{self.error_log()}") from None
        raise AssertionError(f"nginx did not start:\n{self.error_log()}")

    def error_log(self):
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_access_log(self, n, timeout=5):
        """The access log's lines once there are at least n (nginx writes each after answering)."""
        lines = []

        def enough():
            lines[:] = self.access_log_path.read_text().splitlines() if self.access_log_path.exists() else []
            return len(lines) >= n

        # nginx signals nothing: poll the file
        wait_until(enough, timeout, lambda: f"nginx logged {len(lines)} request(s), wanted {n}:\n{self.error_log()}")
        return lines

    def stop(self):
        stop_process(self.proc, timeout=10)


@pytest.fixture
def nginx(tmp_path):
    """Factory start(location) -> Nginx serving that location block; skips if nginx is not installed."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"{NGINX} is not installed (Debian package nginx-light)")
    numbers = itertools.count()

    def make_nginx(location):
        return Nginx(tmp_path / f"nginx-{next(numbers)}", location)

    with stopped_on_exit(make_nginx) as start:
        yield start
