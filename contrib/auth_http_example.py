#!/usr/bin/env python3
"""An auth service for smtprelay's --auth-http (and nginx's auth_http), stdlib only.

It answers each lookup with the headers nginx's protocol defines:
Auth-Status, and on success Auth-Server and Auth-Port naming the back-end.

    # every client may send; mail goes round-robin to two back-ends
    python3 auth_http_example.py --listen 127.0.0.1:8008 --backend 127.0.0.1:10025 --backend 127.0.0.1:10026

    # SMTP AUTH checked against a file of "user:password" lines
    python3 auth_http_example.py --backend 127.0.0.1:10025 --passwords /etc/smtprelay.passwd

then: smtprelay --auth-http http://127.0.0.1:8008/auth [--auth plain,login,cram-md5]

Auth-Method none (no SMTP AUTH) is always accepted; plain and cram-md5 are
checked against the password file when one is given; external accepts any
user listed in it. Refusals carry Auth-Wait (--wait) to slow guessing down.
It speaks HTTP/1.1 with keep-alive, so a relay can reuse its connection.
Importable: make_server() gives a server whose `requests` list records the
headers of every request and `connections` counts the TCP connections.
"""

import argparse
import hmac
import http.server
import itertools
import threading


class AuthHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive: one connection serves many lookups

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self):
        headers = list(self.headers.items())
        with self.server.lock:
            self.server.requests.append(headers)
        answer = self.server.policy(self.headers)
        self.send_response(200)
        for name, value in answer:
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


class Policy:
    """Who may send, and where to: round-robin over back-ends, optional password file."""

    def __init__(self, backends, passwords=None, wait=0):
        self.backends = itertools.cycle(backends)
        self.passwords = passwords          # {user: password} or None: everybody is accepted
        self.wait = wait
        self.lock = threading.Lock()

    def __call__(self, headers):
        if not self.accepts(headers):
            answer = [("Auth-Status", "Invalid login or password")]
            return answer + ([("Auth-Wait", str(self.wait))] if self.wait else [])
        with self.lock:
            host, _, port = next(self.backends).rpartition(":")
        return [("Auth-Status", "OK"), ("Auth-Server", host.strip("[]")), ("Auth-Port", port)]

    def accepts(self, headers):
        method = headers.get("Auth-Method", "")
        if method == "none" or self.passwords is None:
            return True
        user = unescape(headers.get("Auth-User", ""))
        known = self.passwords.get(user)
        if known is None:
            return False
        if method == "plain":
            return hmac.compare_digest(unescape(headers.get("Auth-Pass", "")), known)
        if method == "cram-md5":
            digest = hmac.new(known.encode(), headers.get("Auth-Salt", "").encode(), "md5").hexdigest()
            return hmac.compare_digest(headers.get("Auth-Pass", ""), digest)
        return method == "external"


def unescape(value):
    """Undo the %XX escaping of Auth-User and Auth-Pass (control bytes, space, %)."""
    raw = value.encode("latin-1")
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i:i + 1] == b"%" and len(raw) >= i + 3:
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def read_passwords(path):
    with open(path, encoding="utf-8") as f:
        pairs = (line.rstrip("\n").split(":", 1) for line in f if ":" in line and not line.startswith("#"))
        return dict(pairs)


def make_server(address, policy, verbose=False):
    """A ThreadingHTTPServer answering with policy(headers) -> [(name, value)]; not yet serving."""
    server = http.server.ThreadingHTTPServer(address, AuthHandler)
    server.daemon_threads = True
    server.policy, server.verbose = policy, verbose
    server.requests, server.connections, server.lock = [], 0, threading.Lock()
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:8008", help="HOST:PORT (default 127.0.0.1:8008)")
    p.add_argument("--backend", action="append", required=True, help="HOST:PORT; repeat for round-robin")
    p.add_argument("--passwords", help="file of user:password lines; without it everybody is accepted")
    p.add_argument("--wait", type=int, default=3, help="Auth-Wait seconds on a refusal (default 3)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    policy = Policy(args.backend, read_passwords(args.passwords) if args.passwords else None, args.wait)
    server = make_server((host.strip("[]"), int(port)), policy, verbose=True)
    print(f"auth service listening on {args.listen}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
