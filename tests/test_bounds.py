"""Bounds: every wait has a deadline, every buffer a size and every pool of threads a cap, whoever is at
the other end: a resolver that never answers, an auth service with an endless body, a metrics client
that never finishes its request, a standard output nobody reads, the relay's own descriptor limit,
a Python the --user account cannot read; deadlines for whole replies (a back-end or an auth service
trickling, flooding or silent) and whole command lines (a client trickling or silent, in or out of a
transaction), and a flood of 1500 connections at once.

Real processes and real sockets throughout; relays are SIGKILLed at teardown, as the tests leave them
with sessions and lookups that a graceful stop would wait for. The one thing simulated is the slow
resolver, and only inside the relay's process: a sitecustomize.py on its PYTHONPATH makes the socket
module's lookups of client addresses take 20 s. Thread and descriptor counts are read from /proc/PID.
Nothing sleeps to wait for an event; the few sleeps pace a client or a peer on purpose.
"""
import errno
import fcntl
import importlib.util
import itertools
import os
import pwd
import queue
import resource
import select
import selectors
import socket
import socketserver
import subprocess
import sys
import sysconfig
import threading
import time

import pytest
import requests

import smtprelay
from auth_fixtures import RawServer, always, auth_service, ok, raw_listener, read_request_head  # noqa: F401
from helpers import (SMTPClient, assert_closed, backend_args, begin_data, free_port, greeted, send_data,
                     send_message, wait_until, xclient_attributes)

BODY = b"Subject: bounds\r\n\r\nHello.\r\n"
SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
TIMED_OUT = f"421 4.4.2 {SERVER_NAME} Error: timeout exceeded"
NO_SERVER = "451 4.4.1"
LOST = "451 4.4.2 Error: mail server connection lost; try again later"
XCLIENT_EXTENSIONS = ["PIPELINING", "8BITMIME", "XCLIENT ADDR NAME REVERSE_NAME HELO"]


# --- Looking at the relay from outside: /proc ----------------------------------------------

def thread_count(pid):
    """The Threads: line of /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads: line in /proc/{pid}/status")


def open_descriptors(pid):
    """How many file descriptors the process has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class ThreadWatch:
    """Samples a process's thread count in a thread of its own until stop(); `peak` is the most seen."""

    def __init__(self, pid):
        self.pid, self.peak, self.stopping = pid, thread_count(pid), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.wait(0.002):        # the sampling interval: /proc tells no one of a change
            try:
                self.peak = max(self.peak, thread_count(self.pid))
            except (OSError, AssertionError):       # the process has gone
                return

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        return self.peak


# --- Name lookups: a small fixed pool ---------------------------------------------------

# The system resolver as a broken DNS server makes it: every lookup of a client's address (by
# getnameinfo, or gethostbyaddr) and of a name (getaddrinfo) fails after 20 s. getaddrinfo of an
# address literal (connecting to the back-end's 127.0.0.1) and of the machine's own names is untouched.
SLOW_RESOLVER = '''\
import ipaddress
import socket
import time

DELAY = 20
_gethostbyaddr, _getnameinfo, _getaddrinfo = socket.gethostbyaddr, socket.getnameinfo, socket.getaddrinfo


def _is_address(host):
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        ipaddress.ip_address(str(host).split("%")[0])
        return True
    except ValueError:
        return False


def gethostbyaddr(host):
    if _is_address(host):
        time.sleep(DELAY)
        raise socket.herror(1, "Unknown host")
    return _gethostbyaddr(host)


def getnameinfo(sockaddr, flags):
    if flags & socket.NI_NUMERICHOST:
        return _getnameinfo(sockaddr, flags)
    time.sleep(DELAY)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_address(host) and host not in ("localhost", socket.gethostname()):
        time.sleep(DELAY)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _getaddrinfo(host, *args, **kwargs)


socket.gethostbyaddr, socket.getnameinfo, socket.getaddrinfo = gethostbyaddr, getnameinfo, getaddrinfo
'''


def resolver_site(tmp_path, code):
    """A directory holding sitecustomize.py = code, for the relay's PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    return site


FLOOD_SESSIONS = 1500
FLOOD_CLIENTS = 4           # client threads, each opening its share of the sessions one after another
THREAD_BOUND = 40           # a few sessions at a time, the resolver pool, the listener and main threads


def test_sessions_whose_names_never_resolve_keep_the_threads_few_and_mail_flowing(
        relay, scripted_backend, tmp_path):
    """Name lookups run in a small fixed pool (README: client names, --resolve-timeout; nginx's
    resolver and Postfix's smtpd have no thread per lookup either): with the resolver answering in
    20 s, 1500 sessions that connect and QUIT at once leave lookups behind them, which must not
    grow the relay's thread count; and a client after them still gets its greeting and its mail
    delivered, its names [TEMPUNAVAIL], as the pool being full or the lookup's deadline both give."""
    site = resolver_site(tmp_path, SLOW_RESOLVER)
    backend = scripted_backend(extensions=XCLIENT_EXTENSIONS)
    r = relay("--backend", backend.address, "--resolve", "on", "--resolve-timeout", "2",
              "--server-name", "relay.test", env={"PYTHONPATH": str(site)}, kill=True)
    watch = ThreadWatch(r.proc.pid)
    failures, done = [], []

    def client(count):
        try:
            for _ in range(count):
                if watch.peak >= THREAD_BOUND:
                    return      # already failed: a relay without the bound would spawn a thread per session
                with socket.create_connection((r.host, r.port), timeout=30) as sock:
                    c = SMTPClient(sock)
                    assert c.reply().code == 220
                    assert c.say("QUIT").code == 221
                done.append(1)
        except (AssertionError, OSError) as e:
            failures.append(repr(e))

    clients = [threading.Thread(target=client, args=(FLOOD_SESSIONS // FLOOD_CLIENTS,))
               for _ in range(FLOOD_CLIENTS)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    peak = watch.stop()
    assert peak < THREAD_BOUND, f"the relay ran {peak} threads after {len(done)} sessions that connected and quit"
    assert not failures, failures[:5]
    assert len(done) == FLOOD_SESSIONS

    began = time.monotonic()
    client_after = greeted(r, timeout=30, ehlo="client.example")
    assert send_message(client_after, BODY).code == 250
    assert time.monotonic() - began < 20        # the names' 2 s deadline at most, never the resolver's 20 s
    assert client_after.say("QUIT").code == 221
    [message] = backend.delivered
    attributes = xclient_attributes(backend.sessions[-1])
    assert (attributes["NAME"], attributes["REVERSE_NAME"]) == ("[TEMPUNAVAIL]", "[TEMPUNAVAIL]")
    assert message.content == BODY
    assert thread_count(r.proc.pid) < THREAD_BOUND


# --- The auth service's answer: headers only --------------------------------------------

AUTH_BODY_SIZE = 1536 * 2 ** 20         # 1.5 GiB


class _StreamingHandler(socketserver.BaseRequestHandler):
    def handle(self):
        owner = self.server.owner
        self.request.settimeout(0.5)    # each send in turn, so stop() is seen
        try:
            if not read_request_head(self.request, owner):
                return
            self.request.sendall(owner.answer_head)
        except OSError:
            return
        chunk, left = memoryview(b"x" * 2 ** 20), owner.body_size
        while left and not owner.stopping.is_set():
            try:
                left -= self.request.send(chunk[:min(len(chunk), left)])
            except TimeoutError:
                continue        # the relay reads nothing right now
            except OSError:
                break           # the relay closed the connection: the rest of the body is not wanted
        owner.body_sent.append(owner.body_size - left)


class BodyStreamingAuthService(RawServer):
    """An auth service on 127.0.0.1:<port 0> answering every request Auth-Status: OK, naming `backend`,
    with a body of `body_size` bytes streamed for as long as the reader takes them (never held whole)."""

    handler = _StreamingHandler

    def __init__(self, backend, body_size):
        self.answer_head = (b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: %s\r\nAuth-Port: %d\r\n"
                            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                            % (backend.host.encode(), backend.port, body_size))
        self.body_size, self.body_sent = body_size, []
        self.start()


def test_an_auth_answer_with_a_huge_body_is_taken_by_its_headers_in_little_memory(relay, scripted_backend):
    """nginx's auth_http protocol carries the answer in its headers (README: auth_http), and nginx
    reads no body: an auth service answering OK with a 1.5 GB body behind the headers gets the RCPT
    its 250 promptly, well within --auth-http-timeout, and the relay never holds the body (its peak
    resident memory stays far below the body's size)."""
    backend = scripted_backend()
    service = BodyStreamingAuthService(backend, AUTH_BODY_SIZE)
    try:
        r = relay("--auth-http", service.url, "--auth-http-timeout", "60", "--resolve", "off", kill=True)
        client = greeted(r, timeout=90, ehlo="client.example")
        assert client.say("MAIL FROM:<a@example.org>").code == 250
        began = time.monotonic()
        assert client.say("RCPT TO:<b@example.net>").code == 250
        seconds = time.monotonic() - began
        peak_kb = r.peak_rss_kb()
        assert peak_kb < 150 * 1024, f"relay peak RSS {peak_kb} kB after an auth answer with a 1.5 GB body"
        assert seconds < 20, f"RCPT answered after {seconds:.1f}s"
        assert client.say("DATA").code == 354
        client.send(BODY + b".\r\n")
        assert client.reply().code == 250
        assert client.say("QUIT").code == 221
        [message] = backend.delivered
        assert message.content == BODY
        assert len(service.heads) == 1
    finally:
        service.stop()


# --- Out of descriptors: the relay's failure, not the back-end's --------------------------

NOFILE_LIMIT = 40
# Runs the rest of its command line (the relay) with RLIMIT_NOFILE's soft and hard limits at argv[1].
WITH_NOFILE_LIMIT = [sys.executable, "-c",
                     "import os, resource, sys; n = int(sys.argv[1]); "
                     "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])",
                     str(NOFILE_LIMIT)]


def test_running_out_of_descriptors_gives_451_and_holds_no_backend_off(relay, scripted_backend):
    """Out of file descriptors is the relay's own failure (README: --balance, back-ends found down):
    the client gets a 4xx to retry (RFC 5321 §4.2.5: 451, local error in processing) and the log an
    ERROR line, but no back-end is found down by it: once descriptors are free again, the next
    session's MAIL gets 250 at once from the first back-end listed, not 451 for the hold-off."""
    first, second = scripted_backend(), scripted_backend()
    r = relay("--backend", first.address, "--backend", second.address, "--resolve", "off",
              "--server-name", "relay.test", wrapper=WITH_NOFILE_LIMIT, kill=True)
    pid = r.proc.pid
    fillers, cost = [], 1
    # Idle sessions take the relay's descriptors until one session more leaves it none at all.
    while NOFILE_LIMIT - (before := open_descriptors(pid)) > cost:
        fillers.append(greeted(r, timeout=30))
        cost = max(1, open_descriptors(pid) - before)
        assert len(fillers) < NOFILE_LIMIT, "the sessions take no descriptors?"
    client = greeted(r, timeout=30, ehlo="client.example")
    assert open_descriptors(pid) == NOFILE_LIMIT, (
        f"setup: the relay should have all {NOFILE_LIMIT} descriptors in use, has {open_descriptors(pid)}")
    errors_before = [line for line in r.lines if " ERROR " in line]
    assert errors_before == []
    assert client.say("MAIL FROM:<a@example.org>").code == 451
    r.wait_for_log(r"smtprelay ERROR ", timeout=10)
    assert client.say("QUIT").code == 221
    client.sock.close()
    for filler in fillers[:3]:
        filler.sock.close()
    wait_until(lambda: open_descriptors(pid) <= NOFILE_LIMIT - 4, 10, "descriptors freed after 4 sessions ended")

    after = greeted(r, timeout=30, ehlo="client.example")
    began = time.monotonic()
    reply = after.say("MAIL FROM:<a@example.org>")
    assert reply.code == 250, f"MAIL after the descriptors came back: {reply}"
    assert time.monotonic() - began < 5
    assert after.say("RCPT TO:<b@example.net>").code == 250
    assert send_data(after, BODY).code == 250
    assert after.say("QUIT").code == 221
    [message] = first.delivered
    assert message.content == BODY
    assert second.connections == 0


# --- --metrics: GET /metrics, a few at a time, each with a deadline ----------------------------

HAVE_PROMETHEUS = importlib.util.find_spec("prometheus_client") is not None
needs_prometheus = pytest.mark.skipif(not HAVE_PROMETHEUS,
                                      reason="prometheus_client is not installed: pip install 'smtprelay[metrics]'")
HALF_SENT = 600
METRICS_ANSWER_SECONDS = 5


@pytest.fixture
def metrics_relay(relay):
    """start(*options) -> (relay, metrics port): the relay with --metrics on 127.0.0.1, its line logged."""
    def start(*options):
        port = free_port()
        r = relay("--metrics", f"127.0.0.1:{port}", *options, kill=True)
        r.wait_for_log(rf"smtprelay INFO metrics on http://127\.0\.0\.1:{port}/metrics$")
        return r, port

    return start


def closed_by_peer(sock):
    """Read until the peer closes (EOF or reset) -> True; False if it only times out."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@needs_prometheus
def test_half_sent_metrics_requests_hold_no_thread_each_and_are_closed_within_their_deadline(
        metrics_relay, tmp_path):
    """The metrics endpoint serves a few requests at a time, each answered or closed within 5 s
    (README: --metrics; nginx's client_header_timeout): 600 requests left half-sent do not get a
    thread each, every one is closed within the deadline (plus a margin for a loaded machine), and a
    whole GET /metrics after them still gets 200."""
    relay, port = metrics_relay("--backend", f"maildir:{tmp_path / 'mail'}")
    watch = ThreadWatch(relay.proc.pid)
    half_sent = []
    try:
        for _ in range(HALF_SENT):
            if watch.peak >= THREAD_BOUND:
                break       # already failed: no need to open the rest
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            half_sent.append(sock)
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")      # no empty line: never ends
            except OSError:
                pass        # closed already: one over the limit
            # One over the limit is closed at once: a moment's wait for that keeps the connections from
            # coming faster than the relay takes them, so none waits out a SYN dropped by a full backlog.
            select.select([sock], [], [], 0.1)
        all_sent = time.monotonic()
        peak = watch.peak
        assert peak < THREAD_BOUND, f"the relay ran {peak} threads for {len(half_sent)} half-sent metrics requests"
        margin = 10
        not_closed = []
        for sock in half_sent:
            sock.settimeout(max(all_sent + METRICS_ANSWER_SECONDS + margin - time.monotonic(), 0.01))
            if not closed_by_peer(sock):
                not_closed.append(sock)
        assert not not_closed, (f"{len(not_closed)} of {len(half_sent)} half-sent requests still open "
                                f"{METRICS_ANSWER_SECONDS + margin}s after the last was sent")
        peak = watch.stop()
        assert peak < THREAD_BOUND, f"the relay ran {peak} threads for {len(half_sent)} half-sent metrics requests"
    finally:
        watch.stop()
        for sock in half_sent:
            sock.close()
    with requests.Session() as http:
        http.trust_env = False
        response = http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert "smtprelay_sessions_total" in response.text


@needs_prometheus
def test_metrics_answers_get_metrics_only(metrics_relay, tmp_path):
    """`GET /metrics` is the one request served (README: --metrics): another path is 404 Not Found
    and another method 405 Method Not Allowed (RFC 9110 §15.5.5, §15.5.6)."""
    relay, port = metrics_relay("--backend", f"maildir:{tmp_path / 'mail'}")
    base = f"http://127.0.0.1:{port}"
    with requests.Session() as http:
        http.trust_env = False
        assert http.get(f"{base}/metrics", timeout=10).status_code == 200
        assert http.get(f"{base}/", timeout=10).status_code == 404
        assert http.get(f"{base}/other", timeout=10).status_code == 404
        assert http.post(f"{base}/metrics", timeout=10).status_code == 405
        assert http.delete(f"{base}/metrics", timeout=10).status_code == 405


# --- stdout: a deadline on standard output too -----------------------------------------------

PIPE_SIZE = 4096


@pytest.fixture
def full_pipe():
    """A pipe whose buffer is full, for the relay's standard output -> its write end; nobody reads it.
    The read end stays open (so a write blocks rather than fails) until teardown."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass        # the default size: more to fill
    os.set_blocking(write_end, False)       # only to fill it: the relay gets it blocking, as a shell's pipe
    try:
        while True:
            os.write(write_end, b"x" * PIPE_SIZE)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    yield write_end
    os.close(read_end)      # any write still blocked now fails: the relay can stop
    os.close(write_end)


def test_stdout_nobody_reads_gives_451_within_data_timeout_to_the_printer_and_to_the_one_waiting(
        relay, full_pipe):
    """Printing a message has the end-of-data deadline (README: stdout:, --data-timeout): with standard
    output a full pipe nobody reads, a session's end of data gets 451 within about --data-timeout,
    and a second session waiting for the print lock meanwhile gets 451 within its own, never
    blocking for ever (RFC 5321 §4.2.5: 451, local error in processing)."""
    r = relay("--backend", "stdout:", "--data-timeout", "3", stdout=full_pipe, kill=True)
    first = greeted(r, timeout=12, ehlo="first.example")
    second = greeted(r, timeout=12, ehlo="second.example")
    for client in (first, second):
        begin_data(client)
        client.send(b"Subject: never printed\r\n\r\n" + b"line of a message nobody reads\r\n" * 400)
    first.send(b".\r\n")
    first_sent = time.monotonic()
    second.send(b".\r\n")
    second_sent = time.monotonic()
    try:
        first_reply = first.reply()
    except TimeoutError:
        pytest.fail("the first end of data got no reply within 12 s (--data-timeout 3)")
    first_seconds = time.monotonic() - first_sent
    try:
        second_reply = second.reply()
    except TimeoutError:
        pytest.fail("the second end of data got no reply within 12 s of the first's (--data-timeout 3)")
    second_seconds = time.monotonic() - second_sent
    assert (first_reply.code, second_reply.code) == (451, 451)
    assert first_seconds < 10 and second_seconds < 10, (first_seconds, second_seconds)


# --- --user with a Python the user cannot read -------------------------------------------------

def readable_by_nobody(path):
    """True if user nobody can list the directory `path` (checked by running ls as nobody)."""
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run(["/bin/ls", path], user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return result.returncode == 0


def test_user_nobody_with_a_python_it_cannot_read_delivers_mail(relay, scripted_backend):
    """--user drops root once the listeners are bound (README: --user); everything the relay needs
    later is loaded before, so it delivers mail as nobody with --resolve on even where nobody cannot
    enter the directory the Python interpreter (its standard library or venv) lives in."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the relay drops from root to nobody")
    stdlib = sysconfig.get_paths()["stdlib"]
    if readable_by_nobody(stdlib):
        pytest.skip(f"user nobody can read this Python's standard library ({stdlib}): "
                    "nothing left to import after the drop would fail")
    backend = scripted_backend(extensions=XCLIENT_EXTENSIONS)
    # --server-name as a real set-up has it: the default (the host's FQDN) is looked up at start,
    # which would load, while root, what the lookups of clients need (the IDNA codec) by chance.
    r = relay("--backend", backend.address, "--user", "nobody", "--resolve", "on", "--server-name", "relay.test")
    client = greeted(r, timeout=30, ehlo="client.example")
    reply = client.say("MAIL FROM:<a@example.org>")
    assert reply.code == 250, f"MAIL to a relay running as nobody: {reply}"
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert send_data(client, BODY).code == 250
    assert client.say("QUIT").code == 221
    [message] = backend.delivered
    assert message.content == BODY


# --- Connections: no thread beyond --max-clients and a few being refused --------------------

def test_connections_that_never_send_their_proxy_header_cost_a_bounded_number_of_threads(relay, tmp_path):
    """README, Bounds: a session has a thread, and so has a connection being refused, but no
    more of them than --max-clients plus 64 at once: past that the listener says 421 itself.
    Here 200 connections from a trusted PROXY peer never send their header (each would hold
    its thread for --timeout)."""
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", "--max-clients", "2", "--proxy-protocol",
              "--real-ip-from", "127.0.0.1/32", "--timeout", "60", kill=True)
    watch = ThreadWatch(r.proc.pid)
    silent = []
    try:
        for _ in range(200):
            silent.append(socket.create_connection((r.host, r.port), timeout=10))
        # The last ones are past the budget: each hears 421 from the listener at once.
        extra = socket.create_connection((r.host, r.port), timeout=10)
        with extra:
            assert extra.recv(100).startswith(b"421 ")
        peak = watch.stop()
        assert peak <= 2 + 64 + 8, peak         # sessions, those being refused, the relay's own few
    finally:
        watch.stop()
        for sock in silent:
            sock.close()


# The system resolver as a DNS server that never answers for one network's PTR zone:
# lookups of 127.0.0.2 take 30 s, every other address is looked up as usual.
ONE_SLOW_ZONE = '''\
import socket
import time

_getnameinfo = socket.getnameinfo


def getnameinfo(sockaddr, flags):
    if sockaddr[0] == "127.0.0.2" and not flags & socket.NI_NUMERICHOST:
        time.sleep(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _getnameinfo(sockaddr, flags)


socket.getnameinfo = getnameinfo
'''


def test_a_client_whose_ptr_zone_never_answers_cannot_take_the_names_of_the_others(
        relay, scripted_backend, tmp_path):
    """README, client names: the sessions of one client share its lookup, so a client whose
    reverse zone never answers holds one resolver thread, not all of them: a client from
    elsewhere still gets its confirmed name (localhost) in XCLIENT, without waiting."""
    site = resolver_site(tmp_path, ONE_SLOW_ZONE)
    backend = scripted_backend(extensions=XCLIENT_EXTENSIONS)
    r = relay("--backend", backend.address, "--resolve", "on", "--resolve-timeout", "3",
              "--listen", "127.0.0.2:0", env={"PYTHONPATH": str(site)}, kill=True)
    r.wait_listening(2)
    slow_port = next(port for host, port in r.listeners if host == "127.0.0.2")
    for _ in range(2 * 8):      # more than the resolver's threads, each session gone at once
        with socket.create_connection(("127.0.0.2", slow_port), source_address=("127.0.0.2", 0),
                                      timeout=10) as sock:
            c = SMTPClient(sock)
            assert c.reply().code == 220
            assert c.say("QUIT").code == 221
    began = time.monotonic()
    client = greeted(r, timeout=30, ehlo="client.example")
    assert send_message(client, BODY).code == 250
    assert time.monotonic() - began < 2.5       # its own lookup at once, not --resolve-timeout's 3 s
    [session] = backend.sessions
    assert xclient_attributes(session)["NAME"] == "localhost"


# --- Kept threads: a connection's thread serves a later one, and few are kept -------------------

def test_a_thread_whose_connection_ended_serves_the_next_one():
    threads = smtprelay.SpareThreads(most=4, seconds=30)
    served = queue.SimpleQueue()
    threads.start(lambda: served.put(threading.get_ident()))
    first = served.get(timeout=5)
    wait_until(lambda: len(threads.waiting) == 1, what="the thread waiting for the next connection")
    threads.start(lambda: served.put(threading.get_ident()))
    assert served.get(timeout=5) == first
    wait_until(lambda: len(threads.waiting) == 1, what="the thread waiting again")


def test_no_more_threads_are_kept_than_the_bound_and_the_rest_end():
    threads = smtprelay.SpareThreads(most=2, seconds=30)
    release, started = threading.Event(), queue.SimpleQueue()

    def connection():
        started.put(threading.current_thread())
        release.wait(10)

    for _ in range(5):
        threads.start(connection)
    running = [started.get(timeout=5) for _ in range(5)]
    assert len(set(running)) == 5           # one thread per connection at a time
    release.set()
    wait_until(lambda: sum(t.is_alive() for t in running) == 2, what="3 of 5 threads ended")
    assert len(threads.waiting) == 2


def test_a_kept_thread_ends_after_its_wait_and_is_not_handed_work_after_that():
    threads = smtprelay.SpareThreads(most=4, seconds=0.05)
    served = queue.SimpleQueue()
    threads.start(lambda: served.put(threading.current_thread()))
    first = served.get(timeout=5)
    first.join(5)
    assert not first.is_alive() and threads.waiting == []
    threads.start(lambda: served.put(threading.current_thread()))
    assert served.get(timeout=5) is not first


# --- Deadlines: whole replies, whole command lines, and the data's pace ----------------------

LONG_MAIL_REPLY = "\r\n".join([f"250-2.1.0 line {n}" for n in range(50)] + ["250 2.1.0 Ok"])


@pytest.mark.parametrize("reply, trickle", [(LONG_MAIL_REPLY, ("line", 0.5)),
                                            ("250 2.1.0 Ok " + "x" * 80, (4, 0.5))], ids=["lines", "bytes"])
def test_backend_trickling_its_mail_reply_past_the_proxy_timeout_gives_451_4_4_2(
        relay, scripted_backend, reply, trickle):
    # Each piece comes well within 2 s; the whole reply would take over 10 s.
    backend = scripted_backend(replies={"MAIL": reply}, trickle={"MAIL": trickle})
    r = relay(*backend_args(backend), "--proxy-timeout", "2", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    began = time.monotonic()
    text = client.say("MAIL FROM:<a@example.org>").text
    elapsed = time.monotonic() - began
    assert text == LOST
    assert 1.5 <= elapsed < 8, elapsed
    backend.wait_for_sessions_closed(1)         # the broken connection is dropped
    assert client.say("NOOP").code == 250


@pytest.mark.parametrize("verb, expected", [("MAIL", LOST), ("EHLO", NO_SERVER), ("XCLIENT", NO_SERVER)])
def test_backend_flooding_a_reply_with_endless_lines_is_cut_off_in_bounded_memory(
        relay, scripted_backend, verb, expected):
    backend = scripted_backend(flood={verb})
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    text = client.say("MAIL FROM:<a@example.org>").text
    assert text.startswith(expected), text
    backend.wait_for_sessions_closed(1)
    assert backend.sessions[0].flooded > 0
    assert r.peak_rss_kb() < 200_000
    assert client.say("NOOP").code == 250


@pytest.mark.parametrize("lines, size, fits", [(100, 20, True), (101, 20, False), (10, 4000, True),
                                               (20, 4000, False)],
                         ids=["100-lines", "101-lines", "40-kB", "80-kB"])
def test_backend_reply_over_100_lines_or_64_kib_is_a_broken_backend(relay, scripted_backend, lines, size, fits):
    reply = "\r\n".join([f"250-{'y' * size}"] * (lines - 1) + ["250 2.1.0 Ok"])
    backend = scripted_backend(replies={"MAIL": reply})
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    got = client.say("MAIL FROM:<a@example.org>")
    if fits:
        assert got.code == 250 and len(got.lines) == lines
    else:
        assert got.text == LOST
        backend.wait_for_sessions_closed(1)


def test_auth_service_trickling_its_answer_past_auth_http_timeout_gives_451_4_3_2(
        relay, scripted_backend, raw_listener):
    backend = scripted_backend()
    answer = (b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
              b"Auth-Port: %d\r\nX-Padding: %s\r\nContent-Length: 0\r\n\r\n" % (backend.port, b"p" * 100))
    slow = raw_listener(answer, trickle=(8, 0.5))       # 8 bytes every 0.5 s: over 10 s for the whole answer
    r = relay("--auth-http", slow.url, "--auth-http-timeout", "1", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    began = time.monotonic()
    text = client.say("RCPT TO:<b@example.net>").text
    elapsed = time.monotonic() - began
    assert text.startswith("451 4.3.2 "), text
    assert 0.9 <= elapsed < 6, elapsed
    assert backend.connections == 0
    assert client.say("NOOP").code == 250


def test_client_sending_a_byte_every_1_5_s_is_cut_by_timeout_while_another_client_is_served(
        relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--server-name", SERVER_NAME, *backend_args(backend), "--timeout", "2", kill=True)
    slow = greeted(r, timeout=15)
    stop = threading.Event()

    def dribble():          # a command line that never ends, one byte at a time
        for byte in itertools.cycle(b"NOOP and on and on "):
            try:
                slow.sock.send(bytes([byte]))
            except OSError:
                return
            if stop.wait(1.5):
                return

    dribbler = threading.Thread(target=dribble, daemon=True)
    began = time.monotonic()
    dribbler.start()
    try:
        fast = greeted(r, ehlo=CLIENT_HELO)
        assert send_message(fast, BODY).code == 250          # served meanwhile
        try:
            reply = slow.reply()
        except TimeoutError:
            pytest.fail("no reply within 15 s: the relay did not cut the trickling client", pytrace=False)
        elapsed = time.monotonic() - began
        assert reply.text == TIMED_OUT
        assert 1.5 <= elapsed < 8, elapsed
        assert_closed(slow)
    finally:
        stop.set()
        dribbler.join(5)
    assert len(backend.delivered) == 1


def test_idle_client_gets_421_4_4_2_after_timeout(relay, tmp_path):
    r = relay("--server-name", SERVER_NAME, "--backend", f"maildir:{tmp_path / 'md'}", "--timeout", "2", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=15)
    began = time.monotonic()
    assert client.reply().text == TIMED_OUT
    assert 1.5 <= time.monotonic() - began < 8
    assert_closed(client)


# Inside a transaction the relay's first read of a command line or of data
# is a blocking recv() bounded by the socket's SO_RCVTIMEO, no poll(): the
# deadlines must hold there too.

@pytest.mark.parametrize("silent_after", ["MAIL", "RCPT", "DATA", "a line of data"])
def test_client_silent_inside_a_transaction_gets_421_4_4_2_after_timeout_and_nothing_is_delivered(
        relay, scripted_backend, silent_after):
    backend = scripted_backend()
    r = relay("--server-name", SERVER_NAME, *backend_args(backend), "--timeout", "2", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=15)
    for command, code in [("MAIL FROM:<a@example.org>", 250), ("RCPT TO:<b@example.net>", 250),
                          ("DATA", 354)]:
        assert client.say(command).code == code
        if command.startswith(silent_after):
            break
    else:
        client.send(b"Subject: half\r\n")
    began = time.monotonic()
    assert client.reply().text == TIMED_OUT
    assert 1.5 <= time.monotonic() - began < 8
    assert_closed(client)
    backend.wait_for_sessions_closed(1)
    assert backend.delivered == []


def test_a_rcpt_line_trickled_past_timeout_is_cut_the_deadline_is_for_the_whole_line(
        relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--server-name", SERVER_NAME, *backend_args(backend), "--timeout", "2", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=15)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    began = time.monotonic()
    for byte in b"RCPT TO:<b@example.net>":     # a byte every 0.5 s: each read well within 2 s
        try:
            client.sock.send(bytes([byte]))
        except OSError:
            break
        if time.monotonic() - began > 6:
            break
        time.sleep(0.5)         # pacing the client, on purpose
    assert client.reply().text == TIMED_OUT
    assert 1.5 <= time.monotonic() - began < 8
    assert backend.delivered == []


def test_a_line_s_deadline_counts_the_time_spent_writing_the_replies_before_it():
    # Replies queued for a client that reads them late: one --timeout covers
    # writing them and the next command line, as when every wait was a poll().
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    channel = smtprelay.Channel(smtprelay.Wire(accepted, first_read=2.0), timeout=2.0)
    replies = b"250 queued\r\n" * 2_000_000     # 24 MB: more than both socket buffers hold
    channel.outbuf.append(replies)
    drained = threading.Event()

    def late_reader():      # reads it all after 1.2 s, then says nothing
        time.sleep(1.2)     # pacing the peer, on purpose
        got = 0
        while got < len(replies):
            data = peer.recv(1 << 22)
            if not data:
                return
            got += len(data)
        drained.set()

    reader = threading.Thread(target=late_reader, daemon=True)
    began = time.monotonic()
    reader.start()
    try:
        with pytest.raises(TimeoutError):
            channel.read_line()
        elapsed = time.monotonic() - began
        assert drained.is_set()             # the replies were written, then the line timed out
        assert elapsed < 2.8, elapsed       # one --timeout (2 s) for both; two would be 3.2 or more
    finally:
        channel.wire.sock.close()
        peer.close()
        reader.join(10)


@pytest.mark.parametrize("verb", ["EHLO", "MAIL", "RCPT", "DATA"])
def test_backend_silent_at_a_command_gives_451_after_the_proxy_timeout_and_the_session_goes_on(
        relay, scripted_backend, verb):
    backend = scripted_backend(actions={verb: "hang"})
    r = relay(*backend_args(backend), "--proxy-timeout", "2", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    began = time.monotonic()
    replies = [client.say(command) for command in ["MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>",
                                                   "DATA"][:["EHLO", "MAIL", "RCPT", "DATA"].index(verb) or 1]]
    elapsed = time.monotonic() - began
    assert replies[-1].code == 451, replies[-1]
    assert 1.5 <= elapsed < 8, elapsed
    assert all(reply.code == 250 for reply in replies[:-1])
    assert client.say("NOOP").code == 250


def test_message_data_trickled_a_line_every_1_5_s_is_not_cut_by_timeout(relay, scripted_backend):
    # DATA keeps a per-read timeout: the whole message may take longer than --timeout.
    backend = scripted_backend()
    r = relay(*backend_args(backend), "--timeout", "2", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO, nodelay=True)
    begin_data(client)
    lines = [b"Subject: slow\r\n", b"\r\n", b"line one\r\n", b"line two\r\n"]
    for line in lines:
        client.send(line)
        time.sleep(1.5)         # pacing the client, on purpose
    client.send(b".\r\n")
    assert client.reply().code == 250
    assert backend.delivered[0].raw == b"".join(lines)


# --- A flood of connections ---------------------------------------------------------------

FLOOD = 1500


def first_lines(socks, deadline):
    """{sock: first line (bytes) or b"" if closed/reset without one}; socks missing ones are silent."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    got = {}
    while len(got) < len(socks) and (remaining := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(remaining):
            sock = key.fileobj
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            buffers[sock] += chunk
            if not chunk or b"\r\n" in buffers[sock]:
                got[sock] = buffers[sock].split(b"\r\n")[0] if chunk else b""
                selector.unregister(sock)
    selector.close()
    return got


def read_to_eof(socks, deadline):
    """Read each socket until the peer closes it -> the sockets still open at the deadline."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    left = set(socks)
    while left and (remaining := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(remaining):
            try:
                chunk = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                selector.unregister(key.fileobj)
                left.discard(key.fileobj)
    selector.close()
    return left


def open_files_limits(pid):
    """(soft, hard) "Max open files" of process `pid`, from /proc/PID/limits (unlimited as RLIM_INFINITY)."""
    with open(f"/proc/{pid}/limits") as limits:
        words = next(line for line in limits if line.startswith("Max open files")).split()[3:5]
    return tuple(resource.RLIM_INFINITY if w == "unlimited" else int(w) for w in words)


def test_1500_simultaneous_connections_each_get_220_or_421_and_then_a_client_is_served(relay, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FLOOD + 500
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the open-files hard limit is {hard}; this test needs {wanted}")
    socks = []
    try:
        # The relay starts with the usual soft limit of 1024 and must raise it itself.
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
        try:
            r = relay("--backend", f"maildir:{tmp_path / 'md'}", kill=True)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
        assert open_files_limits(r.proc.pid) == (hard, hard)
        began = time.monotonic()
        for _ in range(FLOOD):
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            code = sock.connect_ex((r.host, r.port))
            assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
        got = first_lines(socks, began + 30)
        seconds = time.monotonic() - began
        greeted_ = [s for s, line in got.items() if line.startswith(b"220 ")]
        refused = [s for s, line in got.items() if line.startswith(b"421 ")]
        closed = [s for s, line in got.items() if not line.startswith((b"220 ", b"421 "))]
        silent = FLOOD - len(got)
        print(f"\n{FLOOD} connections: {len(greeted_)} greeted, {len(refused)} refused with 421, "
              f"{len(closed)} closed or reset without either, {silent} silent after {seconds:.1f} s")
        assert silent == 0 and not closed, (len(greeted_), len(refused), len(closed), silent)
        assert len(greeted_) >= 1000 - 5      # --max-clients 1000 (a few slots may still be freeing)
        for sock in greeted_:
            sock.send(b"QUIT\r\n")
        # A session's slot is free before its client sees the close.
        assert not read_to_eof(socks, time.monotonic() + 30), "sessions still open 30 s after QUIT"
        client = greeted(r, ehlo=CLIENT_HELO)
        assert send_message(client, BODY).code == 250
        assert "Traceback" not in r.log_text()
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
