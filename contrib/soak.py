#!/usr/bin/env python3
"""Soak test: hours of mixed mail through the real relay, with faults, counted exactly.

Not run in CI. Everything runs on 127.0.0.1, on free ports, and stops by
itself after --minutes (default 30); Ctrl-C stops it early, and every
process it started is stopped on the way out.

    .venv/bin/python contrib/soak.py --minutes 30 [--clients 8] [--seed N] [--json]

(or `python3 contrib/soak.py` with the venv active; the relay runs as
`sys.executable smtprelay.py`, falling back to .venv/bin/python when the
interpreter lacks the relay's packages). Postfix's smtp-sink must be
installed (`apt-get install postfix`); as root it runs with -u nobody.

What runs:

  relay "failover"   smtprelay --backend A --backend B     (A first, B when A is down)
  relay "auth-http"  smtprelay --auth-http http://127.0.0.1:P/auth, the auth
                     service (this script, re-run as a subprocess) answering
                     Auth-Status: OK with back-end C or D, round-robin
  back-ends A-D      smtp-sink -d DUMPDIR/ each, offering XCLIENT; every
                     completed transaction is one dump file, which a collector
                     thread reads, checks and deletes as the run goes

--clients threads send for the whole run, alternating relays: messages of
1 KB to 5 MB (most small, some large, log-uniform in each band), with lines
that need dot-stuffing; MAIL+RCPT+DATA pipelined in one write or one command
at a time; one message per session or several. Each message carries
"X-Soak-Id: <uuid>" in its header and "X-Soak-End: <uuid>" as its last line,
and its sender is soak-<uuid>@example.org (so the relay's log names it).

Faults, on a schedule drawn from --seed (about every --fault-interval
seconds, by default run length / 24, between 3 and 20 s):
back-end restarts (SIGKILL, down for a moment, restarted on the same port;
sometimes A and B together, so the failover relay has nothing), auth
service restarts, clients vanishing mid-DATA (the socket closed, or reset,
half-way through the data; also 2% of messages at random), SIGHUP to a relay;
with --relay-restarts also a relay stopped with SIGTERM (it must drain its
sessions and exit 0) and started again on its port. Each round of faults
has every kind once, in a random order.

Counts, per message id, against the dump files:

  accepted      the client heard 250 to its end of data
  delivered     a complete dump holds the id (ends with its X-Soak-End line
                and smtp-sink's final empty line; body checked by SHA-256)
  lost          accepted but never delivered                         -> FAIL
  duplicates    delivered more than once (any message)                -> FAIL
  wrongly delivered  refused (4xx/5xx) but delivered                 -> FAIL
  unacknowledged but delivered  the client vanished mid-DATA, or sent its
                end of data and never saw a reply: allowed, counted apart
  reply lost at back-end kill  refused with 451 4.4.2 at end of data within
                2 s after a back-end was killed, yet delivered: smtp-sink
                wrote the message and was killed before its 250 left it; the
                relay cannot know (RFC 5321 §6.1's duplicate window): allowed
  corrupt / unknown  a complete dump whose body differs from what was sent,
                or whose id was never sent                            -> FAIL
  partial dumps  what a killed smtp-sink left half-written: not delivered

The relay's RSS (VmRSS), thread count and open descriptors are sampled
every few seconds: start (before traffic), end (after the clients stopped,
sessions closed) and max. ERROR and Traceback lines in its log are counted.
At the end each relay gets SIGTERM and must drain and exit 0.

Exit status 0 only if lost == duplicates == wrongly delivered == corrupt ==
unknown == 0, no relay died (or failed to stop cleanly) and some mail was
accepted; 1 otherwise; 130 on Ctrl-C. --json prints the whole report as JSON.
--keep keeps the work directory (relay logs, any unprocessed dumps).
"""

import argparse
import collections
import hashlib
import http.server
import itertools
import json
import math
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RELAY = REPO / "smtprelay.py"
SMTP_SINK = "/usr/sbin/smtp-sink"
HOST = "127.0.0.1"

CLIENT_TIMEOUT = 120        # seconds for any one reply; bounds every client wait
KILL_RACE_WINDOW = 2.0      # seconds after a back-end kill in which a lost 250 is explained
BACKEND_LOST = "451 4.4.2"  # the relay's reply when the back-end went away


# --- small helpers -------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_accepting(port, proc, timeout=10):
    """True once HOST:port accepts, False if proc exited first or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def stop_process(proc, sig=signal.SIGKILL, timeout=10):
    """Signal proc and reap it -> its exit status (None if it would not die)."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                return None
    return proc.returncode


def proc_stats(pid):
    """(VmRSS kB, threads, open fds) of pid, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:       # exiting (a zombie has no memory left)
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"]), fds


def relay_python():
    """sys.executable if it can run the relay, else the repository's .venv python."""
    probe = [sys.executable, "-c", "import configargparse, requests"]
    if subprocess.run(probe, stderr=subprocess.DEVNULL).returncode == 0:
        return sys.executable
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise SystemExit(f"{sys.executable} lacks configargparse/requests and there is no {venv}")


# --- the auth service (this script re-run with --serve-auth) --------------------

def serve_auth(port, backend_ports):
    """nginx auth_http: OK, with the back-ends named round-robin. Runs until killed."""
    ports = itertools.cycle(backend_ports)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            with lock:
                backend_port = next(ports)
            self.send_response(200)
            self.send_header("Auth-Status", "OK")
            self.send_header("Auth-Server", HOST)
            self.send_header("Auth-Port", str(backend_port))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    server = http.server.ThreadingHTTPServer((HOST, port), Handler)
    server.daemon_threads = True
    server.serve_forever()


# --- processes under test -------------------------------------------------------

class Child:
    """A restartable subprocess on a fixed port; its kill times are kept."""

    def __init__(self, name, workdir, port=None):
        self.name, self.workdir = name, workdir
        self.port = port or free_port()
        self.proc = None
        self.kills = []         # monotonic times of SIGKILLs
        self.starts = 0
        self.log_path = workdir / f"{name}.log"
        self.lock = threading.Lock()

    def command(self):
        raise NotImplementedError

    def start(self):
        for attempt in range(50):        # the old socket may linger a moment
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
            if wait_accepting(self.port, self.proc):
                self.starts += 1
                return
            stop_process(self.proc)
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start on port {self.port}; see {self.log_path}")

    def kill(self):
        """SIGKILL; the caller holds self.lock."""
        self.kills.append(time.monotonic())
        stop_process(self.proc, signal.SIGKILL)

    def restart(self, down):
        with self.lock:
            self.kill()
            time.sleep(down)
            self.start()

    def stop(self):
        with self.lock:
            return stop_process(self.proc, signal.SIGKILL)


class Sink(Child):
    """Postfix's smtp-sink dumping each transaction into its own directory."""

    def __init__(self, name, workdir):
        super().__init__(f"sink-{name}", workdir)
        self.letter = name
        self.dumpdir = workdir / f"dump-{name}"
        self.dumpdir.mkdir()
        self.user = []
        if os.geteuid() == 0:   # smtp-sink refuses to run as root without -u
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dumpdir, nobody.pw_uid, nobody.pw_gid)
            self.user = ["-u", "nobody"]

    def command(self):
        return [SMTP_SINK, *self.user, "-d", f"{self.dumpdir}/", f"{HOST}:{self.port}", "256"]

    def files_in_progress(self):
        """Dump files the running smtp-sink holds open (transactions under way)."""
        proc = self.proc
        paths = set()
        if proc is None or proc.poll() is not None:
            return paths
        fd_dir = f"/proc/{proc.pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    paths.add(os.readlink(f"{fd_dir}/{fd}"))
                except OSError:
                    pass
        except OSError:
            pass
        return paths


class AuthService(Child):
    def __init__(self, workdir, backend_ports):
        super().__init__("auth", workdir)
        self.backend_ports = backend_ports

    def command(self):
        return [sys.executable, str(Path(__file__).resolve()), "--serve-auth",
                f"{self.port}:{','.join(map(str, self.backend_ports))}"]


class RelayProcess(Child):
    def __init__(self, name, workdir, python, options):
        super().__init__(f"relay-{name}", workdir)
        self.short, self.python, self.options = name, python, options
        self.samples = []       # (time, rss kB, threads, fds)
        self.died = None        # exit status if it died during the run

    def command(self):
        return [self.python, str(RELAY), "-c", os.devnull, "--listen", f"{HOST}:{self.port}",
                "--resolve", "off", "--timeout", "30", "--log-level", "info", *self.options]

    def sample(self):
        stats = proc_stats(self.proc.pid)
        if stats:
            self.samples.append((time.monotonic(), *stats))
        return stats


# --- message bodies ---------------------------------------------------------------

class Bodies:
    """A pool of lines to cut messages from; some start with a dot."""

    def __init__(self, rng, total=6 * 1024 * 1024):
        alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +/-"
        lines = []
        size = 0
        while size < total:
            n = rng.choice((0, 1, 20, 60, 76, 76, 76, 200, 998))
            line = bytes(rng.choice(alphabet) for _ in range(min(n, 40))) * (n // 40 + 1)
            line = line[:n]
            r = rng.random()
            if r < 0.05:
                line = b"." + line[1:]
            elif r < 0.06:
                line = b"."
            elif r < 0.07:
                line = b".."
            lines.append(line)
            size += len(line) + 2
        self.lines = lines

    def make(self, rng, msg_id, size):
        """-> (wire bytes, dot-stuffed, CRLF, ending CRLF; the body as smtp-sink stores it)."""
        head = [f"From: <soak-{msg_id}@example.org>".encode(), b"To: <sink@example.net>",
                f"Subject: soak {size}".encode(), f"Message-ID: <{msg_id}@soak.example.org>".encode(),
                f"X-Soak-Id: {msg_id}".encode(), b""]
        body, total = [], 0
        start = rng.randrange(len(self.lines))
        for line in itertools.islice(itertools.cycle(self.lines), start, None):
            if total >= size:
                break
            body.append(line)
            total += len(line) + 2
        lines = head + body + [f"X-Soak-End: {msg_id}".encode()]
        stored = b"\n".join(lines) + b"\n"
        wire = b"\r\n".join(b"." + l if l.startswith(b".") else l for l in lines) + b"\r\n"
        return wire, stored


def pick_size(rng):
    r = rng.random()
    low, high = (1024, 16384) if r < 0.6 else (16384, 524288) if r < 0.9 else (524288, 5 * 1024 * 1024)
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


# --- the bookkeeping ----------------------------------------------------------------

class Ledger:
    """What every client sent and heard, and what the back-ends stored."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {}              # id -> record dict
        self.expected = {}          # id -> sha256 of the stored body
        self.delivered = collections.Counter()
        self.delivered_where = collections.defaultdict(list)
        self.corrupt = []
        self.unknown = []
        self.partial = 0
        self.dumps = 0
        self.seen = set()           # dump files read (with --keep they stay)
        self.sessions = 0
        self.session_errors = collections.Counter()

    def expect(self, msg_id, stored):
        with self.lock:
            self.expected[msg_id] = hashlib.sha256(stored).hexdigest()

    def record(self, msg_id, **fields):
        with self.lock:
            self.sent.setdefault(msg_id, {}).update(fields)


ID_RE = re.compile(rb"^X-Soak-Id: ([0-9a-f-]{36})$", re.M)


def collect(sinks, ledger, keep=False):
    """Read, check and delete every finished dump file once."""
    for sink in sinks:
        try:
            names = os.listdir(sink.dumpdir)
        except OSError:
            continue
        busy = sink.files_in_progress()
        for name in names:
            path = sink.dumpdir / name
            # smtp-sink names dumps with 8 random hex digits, so a name comes back
            # after some 10^5 files: only a kept file (--keep) is skipped as seen.
            if str(path) in busy or keep and path in ledger.seen:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue        # aborted transaction, deleted meanwhile
            if str(path) in sink.files_in_progress():
                continue        # a new transaction of a restarted sink: next round
            ledger.seen.add(path)
            if not keep:
                try:
                    path.unlink()
                except OSError:
                    pass
            ledger.dumps += 1
            classify_dump(sink, data, ledger)


def classify_dump(sink, data, ledger):
    pos = data.find(b"\nReceived: ")
    found = ID_RE.search(data, 0, 8192)
    if pos < 0 or not found:
        ledger.partial += 1
        return
    msg_id = found.group(1).decode()
    if not data.endswith(b"X-Soak-End: " + found.group(1) + b"\n\n"):
        ledger.partial += 1     # a killed smtp-sink's half-written file
        return
    start = pos + 1
    for _ in range(3):          # Received: and its two continuation lines
        start = data.index(b"\n", start) + 1
    body = data[start:-1]
    with ledger.lock:
        want = ledger.expected.get(msg_id)
        if want is None:
            ledger.unknown.append(msg_id)
            return
        if hashlib.sha256(body).hexdigest() != want:
            ledger.corrupt.append(msg_id)
            return
        ledger.delivered[msg_id] += 1
        ledger.delivered_where[msg_id].append(sink.letter)


# --- the clients ------------------------------------------------------------------------

class Vanish(Exception):
    pass


class Client:
    """A raw SMTP client: exact writes, whole replies."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
        self.buf = b""

    def read_reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed by the relay")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            raise ConnectionError(f"bad reply {lines!r}") from None
        return code, lines[-1][4:]

    def send(self, data):
        self.sock.sendall(data)

    def close(self, reset=False):
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.sock.close()
        except OSError:
            pass


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.stop = threading.Event()
        self.deadline = time.monotonic() + args.minutes * 60
        self.workdir = Path(tempfile.mkdtemp(prefix="smtprelay-soak-"))
        self.workdir.chmod(0o755)      # smtp-sink runs as nobody
        self.ledger = Ledger()
        self.vanish_tokens = 0
        self.vanish_lock = threading.Lock()
        self.faults = collections.Counter()
        self.children = []
        self.sinks = {}
        self.relays = []
        self.auth = None
        self.failures = []
        self.interrupted = False

    # -- set-up and tear-down --

    def start(self):
        if not os.access(SMTP_SINK, os.X_OK):
            raise SystemExit(f"{SMTP_SINK} is missing: apt-get install postfix")
        python = relay_python()
        for letter in "ABCD":
            sink = Sink(letter, self.workdir)
            self.children.append(sink)
            sink.start()
            self.sinks[letter] = sink
        self.auth = AuthService(self.workdir, [self.sinks["C"].port, self.sinks["D"].port])
        self.children.append(self.auth)
        self.auth.start()
        failover = RelayProcess("failover", self.workdir, python,
                                ["--backend", f"{HOST}:{self.sinks['A'].port}",
                                 "--backend", f"{HOST}:{self.sinks['B'].port}"])
        auth = RelayProcess("auth-http", self.workdir, python,
                            ["--auth-http", f"http://{HOST}:{self.auth.port}/auth", "--auth-http-timeout", "10"])
        for relay in (failover, auth):
            self.children.append(relay)
            relay.start()
            self.relays.append(relay)
            relay.sample()

    def cleanup(self):
        for child in reversed(self.children):
            child.stop()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the client threads --

    def take_vanish(self, rng):
        with self.vanish_lock:
            if self.vanish_tokens:
                self.vanish_tokens -= 1
                return True
        return rng.random() < 0.02

    def client_loop(self, number):
        rng = random.Random(f"{self.args.seed}-client-{number}")
        bodies = self.bodies
        for session_number in itertools.count():
            if self.stop.is_set() or time.monotonic() >= self.deadline:
                return
            relay = self.relays[(number + session_number) % len(self.relays)]
            count = 1 if rng.random() < 0.5 else rng.randint(2, 6)
            pipelined = rng.random() < 0.5
            try:
                self.session(rng, bodies, relay, count, pipelined)
            except Exception as e:      # bookkeeping for the report; the session is over
                with self.ledger.lock:
                    self.ledger.session_errors[f"{type(e).__name__}: {e}"[:80]] += 1
            with self.ledger.lock:
                self.ledger.sessions += 1

    def session(self, rng, bodies, relay, count, pipelined):
        client = Client(relay.port)
        try:
            code, text = client.read_reply()
            if code != 220:
                return
            client.send(b"EHLO soak.example.org\r\n")
            code, text = client.read_reply()
            if code != 250:
                return
            for n in range(count):
                if self.stop.is_set() or time.monotonic() >= self.deadline:
                    break
                if not self.message(rng, bodies, client, relay, pipelined):
                    return      # the connection is gone
                if rng.random() < 0.1:
                    client.send(b"RSET\r\n")
                    client.read_reply()
            client.send(b"QUIT\r\n")
            client.read_reply()
        finally:
            client.close()

    def message(self, rng, bodies, client, relay, pipelined):
        """One transaction -> True if the session may go on."""
        msg_id = str(uuid.uuid4())
        size = pick_size(rng)
        wire, stored = bodies.make(rng, msg_id, size)
        self.ledger.expect(msg_id, stored)
        rcpts = [f"<rcpt{i}@example.net>" for i in range(rng.choice((1, 1, 1, 2, 3)))]
        self.ledger.record(msg_id, relay=relay.short, size=len(wire), pipelined=pipelined, outcome="not sent")
        commands = [f"MAIL FROM:<soak-{msg_id}@example.org> SIZE={len(wire)}".encode()]
        commands += [f"RCPT TO:{r}".encode() for r in rcpts]
        commands.append(b"DATA")
        try:
            if pipelined:
                client.send(b"".join(c + b"\r\n" for c in commands))
                replies = [client.read_reply() for _ in commands]
            else:
                replies = []
                for c in commands:
                    client.send(c + b"\r\n")
                    replies.append(client.read_reply())
                    if c.startswith(b"MAIL") and replies[-1][0] != 250:
                        break
                    if c.startswith(b"RCPT") and c == commands[-2] and not any(
                            code == 250 for code, _ in replies[1:]):
                        break       # no recipient: no DATA
            last = replies[-1]
            if last[0] != 354:
                first = next((r for r in replies if r[0] >= 400), last)     # the refusal that mattered
                self.ledger.record(msg_id, outcome="refused", reply=f"{first[0]} {first[1]}", stage="envelope")
                client.send(b"RSET\r\n")
                return client.read_reply()[0] == 250
        except (OSError, ConnectionError) as e:
            self.ledger.record(msg_id, outcome="refused", reply=f"connection: {e}", stage="envelope")
            return False
        vanish = self.take_vanish(rng)
        try:
            if vanish:
                cut = rng.randrange(1, len(wire))
                client.send(wire[:cut])
                self.ledger.record(msg_id, outcome="vanished")
                client.close(reset=rng.random() < 0.5)
                self.faults["client vanished mid-DATA"] += 1
                return False
            client.send(wire)
            client.send(b".\r\n")
        except OSError as e:
            # The relay may have answered and closed before our end of data.
            self.ledger.record(msg_id, outcome="no reply", reply=f"send: {e}")
            return False
        self.ledger.record(msg_id, outcome="no reply")
        try:
            code, text = client.read_reply()
        except (OSError, ConnectionError) as e:
            self.ledger.record(msg_id, reply=f"connection: {e}")
            return False
        self.ledger.record(msg_id, outcome="accepted" if code == 250 else "refused",
                           reply=f"{code} {text}", stage="data", replied_at=time.monotonic())
        return True

    # -- faults and samples --

    def fault_loop(self):
        rng = random.Random(f"{self.args.seed}-faults")
        interval = self.args.fault_interval
        kinds = ["backend", "backend", "backend-pair", "auth", "vanish", "sighup"]
        if self.args.relay_restarts:
            kinds.append("relay-restart")
        schedule = []
        while not self.stop.wait(interval * rng.uniform(0.5, 1.5)):
            if time.monotonic() >= self.deadline - interval / 2:
                return
            if not schedule:        # every kind once per round, in a random order
                schedule = rng.sample(kinds, len(kinds))
            kind = schedule.pop()
            down = rng.uniform(0.1, 2.0)
            if kind == "backend":
                sink = self.sinks[rng.choice("ABCD")]
                sink.restart(down)
                self.faults[f"back-end restart ({sink.letter})"] += 1
            elif kind == "backend-pair":
                a, b = self.sinks["A"], self.sinks["B"]
                with a.lock, b.lock:
                    a.kill()
                    b.kill()
                    time.sleep(down)
                    a.start()
                    b.start()
                self.faults["back-end restart (A and B)"] += 1
            elif kind == "auth":
                self.auth.restart(down)
                self.faults["auth service restart"] += 1
            elif kind == "vanish":
                with self.vanish_lock:
                    self.vanish_tokens += 3
            elif kind == "relay-restart":
                relay = rng.choice(self.relays)
                with relay.lock:
                    status = stop_process(relay.proc, signal.SIGTERM, timeout=90)
                    if status != 0:
                        self.failures.append(f"{relay.name} exited with {status} on SIGTERM (restart)")
                    relay.start()
                    relay.samples = []      # figures are for the newest process only
                    relay.sample()
                self.faults[f"relay restart, SIGTERM ({relay.short})"] += 1
            elif kind == "sighup":
                relay = rng.choice(self.relays)
                relay.proc.send_signal(signal.SIGHUP)
                self.faults[f"SIGHUP ({relay.short})"] += 1

    def watch_loop(self):
        """watch(); if it fails, the run fails (nothing would be collected or noticed any more)."""
        try:
            self.watch()
        except Exception as e:
            self.failures.append(f"the watcher failed: {type(e).__name__}: {e}")
            self.stop.set()
            raise

    def watch(self):
        """Sample the relays, collect dumps, notice a relay that died."""
        interval = self.args.sample_interval
        next_sample = 0
        while not self.stop.wait(0.5):
            collect(self.sinks.values(), self.ledger, self.args.keep)
            for relay in self.relays:
                if relay.lock.acquire(blocking=False):      # not being restarted
                    try:
                        if relay.proc.poll() is not None and relay.died is None:
                            relay.died = relay.proc.returncode
                            self.failures.append(f"{relay.name} died with status {relay.died}")
                            self.stop.set()
                    finally:
                        relay.lock.release()
            for child in [*self.sinks.values(), self.auth]:
                if child.lock.acquire(blocking=False):      # not being restarted
                    try:
                        if child.proc.poll() is not None:
                            self.failures.append(f"{child.name} exited by itself ({child.proc.returncode});"
                                                 f" see {child.log_path}")
                            child.start()
                    finally:
                        child.lock.release()
            if time.monotonic() >= next_sample:
                for relay in self.relays:
                    if relay.lock.acquire(blocking=False):  # not being restarted
                        try:
                            relay.sample()
                        finally:
                            relay.lock.release()
                next_sample = time.monotonic() + interval

    # -- the run --

    def run(self):
        self.bodies = Bodies(random.Random(f"{self.args.seed}-bodies"))
        self.start()
        self.started = time.monotonic()
        self.deadline = self.started + self.args.minutes * 60
        watcher = threading.Thread(target=self.watch_loop, name="watch", daemon=True)
        faulter = threading.Thread(target=self.fault_loop, name="faults", daemon=True)
        clients = [threading.Thread(target=self.client_loop, args=(n,), name=f"client {n}", daemon=True)
                   for n in range(self.args.clients)]
        watcher.start()
        faulter.start()
        for t in clients:
            t.start()
        try:
            while time.monotonic() < self.deadline and not self.stop.is_set():
                self.stop.wait(1)
                if self.args.progress:
                    self.progress()
            # Let the clients finish their session; every wait is bounded.
            for t in clients:
                t.join(CLIENT_TIMEOUT * 2)
        except KeyboardInterrupt:
            self.interrupted = True
        self.stop.set()
        faulter.join(30)
        watcher.join(30)
        for t in clients:
            t.join(0 if self.interrupted else CLIENT_TIMEOUT)
        if any(t.is_alive() for t in clients) and not self.interrupted:
            self.failures.append("a client thread did not finish")
        self.finish()

    def progress(self):
        elapsed = time.monotonic() - self.started
        if int(elapsed) % 30 == 0:
            with self.ledger.lock:
                accepted = sum(1 for r in self.ledger.sent.values() if r.get("outcome") == "accepted")
            print(f"[{elapsed:5.0f}s] sent {len(self.ledger.sent)} accepted {accepted} "
                  f"delivered {sum(self.ledger.delivered.values())}", file=sys.stderr, flush=True)

    def finish(self):
        # Idle figures: every client has gone; give the relays a moment to close up.
        time.sleep(2)
        for relay in self.relays:
            if relay.proc.poll() is None:
                relay.sample()
        self.stopped_status = {}
        for relay in self.relays:
            if relay.died is not None:
                continue
            status = stop_process(relay.proc, signal.SIGTERM, timeout=90)
            self.stopped_status[relay.short] = status
            if status != 0:
                self.failures.append(f"{relay.name} exited with {status} on SIGTERM")
        time.sleep(0.5)         # smtp-sink closes its last files
        collect(self.sinks.values(), self.ledger, self.args.keep)
        for sink in self.sinks.values():
            sink.stop()
        collect(self.sinks.values(), self.ledger, self.args.keep)   # what the kill left: partial

    # -- the report --

    def report(self):
        ledger = self.ledger
        outcomes = collections.Counter(r.get("outcome") for r in ledger.sent.values())
        lost, wrongly, unacked_delivered, kill_race = [], [], [], []
        kills = [t for sink in self.sinks.values() for t in sink.kills]
        for msg_id, rec in ledger.sent.items():
            n = ledger.delivered.get(msg_id, 0)
            outcome = rec.get("outcome")
            if outcome == "accepted" and n == 0:
                lost.append(msg_id)
            elif outcome == "refused" and n:
                reply, at = rec.get("reply", ""), rec.get("replied_at")
                if (reply.startswith(BACKEND_LOST) and rec.get("stage") == "data" and at
                        and any(0 <= at - k <= KILL_RACE_WINDOW for k in kills)):
                    kill_race.append(msg_id)
                else:
                    wrongly.append(msg_id)
            elif outcome in ("vanished", "no reply", "not sent") and n:
                unacked_delivered.append(msg_id)
        duplicates = [i for i, n in ledger.delivered.items() if n > 1]
        refusals = collections.Counter(
            f"{r.get('reply', '')[:9]} at {r.get('stage')}" if r.get("reply", "")[:1].isdigit()
            else f"connection lost at {r.get('stage')}"
            for r in ledger.sent.values() if r.get("outcome") == "refused")
        logs = {}
        for relay in self.relays:
            text = relay.log_path.read_text(errors="replace") if relay.log_path.exists() else ""
            logs[relay.short] = {"errors": sum(" ERROR " in l for l in text.splitlines()),
                                 "tracebacks": text.count("Traceback"),
                                 "first_error": next((l for l in text.splitlines() if " ERROR " in l), None)}
        resources = {}
        for relay in self.relays:
            s = relay.samples
            if s:
                resources[relay.short] = {
                    "rss_kb": {"start": s[0][1], "end": s[-1][1], "max": max(x[1] for x in s)},
                    "threads": {"start": s[0][2], "end": s[-1][2], "max": max(x[2] for x in s)},
                    "fds": {"start": s[0][3], "end": s[-1][3], "max": max(x[3] for x in s)},
                    "samples": len(s)}
        ok = (not lost and not duplicates and not wrongly and not ledger.corrupt and not ledger.unknown
              and not self.failures and outcomes["accepted"] > 0 and not self.interrupted)
        return {
            "ok": ok,
            "seed": self.args.seed,
            "minutes": round((time.monotonic() - self.started) / 60, 2),
            "clients": self.args.clients,
            "sessions": ledger.sessions,
            "messages_sent": len(ledger.sent),
            "accepted": outcomes["accepted"],
            "accepted_mb": round(sum(r["size"] for r in ledger.sent.values()
                                     if r.get("outcome") == "accepted") / 1e6, 1),
            "refused": outcomes["refused"],
            "refusals": dict(refusals.most_common()),
            "vanished_mid_data": outcomes["vanished"],
            "no_reply": outcomes["no reply"],
            "delivered": sum(1 for i in ledger.delivered if i in ledger.sent),
            "dump_files": ledger.dumps,
            "partial_dumps": ledger.partial,
            "lost": len(lost),
            "duplicates": len(duplicates),
            "wrongly_delivered": len(wrongly),
            "unacknowledged_but_delivered": len(unacked_delivered),
            "reply_lost_at_backend_kill": len(kill_race),
            "corrupt": len(ledger.corrupt),
            "unknown": len(ledger.unknown),
            "lost_detail": [lost_detail(i, ledger.sent[i], kills, self.relays) for i in lost[:5]],
            "examples": {"lost": lost[:5], "duplicates": duplicates[:5], "wrongly_delivered":
                         [(i, ledger.sent[i].get("reply")) for i in wrongly[:5]],
                         "corrupt": ledger.corrupt[:5], "unknown": ledger.unknown[:5]},
            "faults": dict(sorted(self.faults.items())),
            "session_errors": dict(ledger.session_errors.most_common(8)),
            "relays": resources,
            "relay_logs": logs,
            "relay_exit_on_sigterm": getattr(self, "stopped_status", {}),
            "failures": self.failures,
            "interrupted": self.interrupted,
            "workdir": str(self.workdir) if self.args.keep else None,
        }


def lost_detail(msg_id, rec, kills, relays):
    """What can be told of a lost message: its relay, its relay's log lines naming it,
    and the nearest back-end kill after its 250 (smtp-sink killed before its dump
    was whole would explain it)."""
    at = rec.get("replied_at")
    after = [k - at for k in kills if at is not None and k >= at]
    relay = next((r for r in relays if r.short == rec.get("relay")), None)
    text = relay.log_path.read_text(errors="replace") if relay and relay.log_path.exists() else ""
    return {"id": msg_id, "relay": rec.get("relay"), "size": rec.get("size"), "pipelined": rec.get("pipelined"),
            "reply": rec.get("reply"), "kill_after_s": round(min(after), 3) if after else None,
            "log": [line for line in text.splitlines() if msg_id in line][:5]}


def print_table(r):
    rows = [
        ("seed / minutes / clients", f"{r['seed']} / {r['minutes']} / {r['clients']}"),
        ("sessions", r["sessions"]),
        ("messages sent", r["messages_sent"]),
        ("accepted (250)", f"{r['accepted']}  ({r['accepted_mb']} MB)"),
        ("refused (4xx/5xx)", r["refused"]),
        ("vanished mid-DATA", r["vanished_mid_data"]),
        ("no reply seen", r["no_reply"]),
        ("delivered (distinct ids)", r["delivered"]),
        ("partial dumps (killed sink)", r["partial_dumps"]),
        ("unacknowledged but delivered", r["unacknowledged_but_delivered"]),
        ("reply lost at back-end kill", r["reply_lost_at_backend_kill"]),
        ("LOST", r["lost"]),
        ("DUPLICATES", r["duplicates"]),
        ("WRONGLY DELIVERED", r["wrongly_delivered"]),
        ("CORRUPT / UNKNOWN", f"{r['corrupt']} / {r['unknown']}"),
    ]
    for name, n in r["refusals"].items():
        rows.append((f"  refused: {name}", n))
    for name, n in r["faults"].items():
        rows.append((f"fault: {name}", n))
    for name, res in r["relays"].items():
        for what in ("rss_kb", "threads", "fds"):
            v = res[what]
            rows.append((f"{name} {what} start/end/max", f"{v['start']} / {v['end']} / {v['max']}"))
        log = r["relay_logs"][name]
        rows.append((f"{name} log ERROR / Traceback", f"{log['errors']} / {log['tracebacks']}"))
        rows.append((f"{name} exit on SIGTERM", r["relay_exit_on_sigterm"].get(name, "died")))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for name, n in r["session_errors"].items():
        print(f"  session ended by: {name}  x{n}")
    for d in r["lost_detail"]:
        print(f"  lost: {d['id']} via {d['relay']}, {d['size']} bytes, pipelined {d['pipelined']}, "
              f"reply {d['reply']!r}, next back-end kill {d['kill_after_s']} s after the 250")
        for line in d["log"]:
            print(f"    {line}")
    for f in r["failures"]:
        print(f"  FAILURE: {f}")
    print("PASS" if r["ok"] else "FAIL")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30, help="length of the run (default 30)")
    p.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: drawn, and printed)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--fault-interval", type=float, default=None,
                   help="mean seconds between faults (default: run length / 24, within 3..20)")
    p.add_argument("--sample-interval", type=float, default=None,
                   help="seconds between resource samples (default 2 for short runs, 5 from 10 minutes)")
    p.add_argument("--relay-restarts", action="store_true",
                   help="also restart a relay now and then (SIGTERM: it must drain and exit 0)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, dumps)")
    p.add_argument("--progress", action="store_true", help="a progress line on stderr every 30 s")
    p.add_argument("--serve-auth", metavar="PORT:BACKEND_PORTS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_auth:
        port, ports = args.serve_auth.split(":")
        serve_auth(int(port), [int(x) for x in ports.split(",")])
        return 0
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    if args.fault_interval is None:
        args.fault_interval = min(20.0, max(3.0, args.minutes * 60 / 24))
    if args.sample_interval is None:
        args.sample_interval = 2.0 if args.minutes < 10 else 5.0
    if args.clients < 1 or args.minutes <= 0:
        p.error("--clients and --minutes must be positive")

    soak = Soak(args)
    # SIGTERM to the script: as Ctrl-C. Children run in their own sessions,
    # so a terminal's Ctrl-C reaches only this script, which stops them in order.
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        try:
            soak.run()
        except KeyboardInterrupt:
            soak.interrupted = True
            soak.stop.set()
        report = soak.report() if hasattr(soak, "started") else None
    finally:
        soak.cleanup()
    if report is None:
        return 130 if soak.interrupted else 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    if soak.interrupted:
        return 130
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
