"""--workers N|auto: one main process binds the listeners, forks N workers that serve them, and supervises.

- Sessions: the workers take clients from the same sockets, and clients
  that come together are spread over them (each waits with EPOLLEXCLUSIVE:
  the kernel wakes one waiting worker per client, so clients that come one
  at a time may all go to the same one); every message reaches the back-end
  once. --max-clients and --max-clients-per-ip count the sessions of all
  the workers together, whichever worker accepts the newcomer.
- Signals: SIGHUP is checked once by the main process (a file that does not
  parse changes nothing anywhere, one "keeping the old configuration" line)
  and then reloads every worker; SIGTERM is passed to every worker, each
  finishes its message in flight, new clients are refused at once, and the
  main process exits 0.
- A worker killed (SIGKILL) is logged and replaced after a pause that
  doubles while it keeps dying young; the other serves on; the dead one's
  sessions stop counting toward --max-clients; one that dies while a reload
  is awaited is replaced then, not after the reload's deadline.
- Systemd: socket activation with 2 workers; sd_notify from the main
  process alone (the sender's pid read with SO_PASSCRED): READY=1 once,
  RELOADING=1/READY=1 around SIGHUP (READY=1 once every worker has
  reloaded), STOPPING=1.
- --metrics, served by the main process, adds up every worker's counters
  (a dead worker's stay); its sessions gauge counts the sessions of both.
- SharedCounts itself, in this process (and a forked child for a second
  slot): totals, per-address counts in every form of an address, refusals,
  release, clear, the fcntl lock across processes, no count from free
  records or from bytes that straddle two records.
- --workers auto, bad values, --inetd with --workers.

Which worker takes a client is the kernel's choice. Where a test needs a
given worker to take it, the others are stopped (SIGSTOP, seen as state T
in /proc) until the client has its first reply, then continued: only that
worker can accept. Which worker served a session is read from its log line
("smtprelay worker N INFO <id> connect from <ip>:<port>").

Nothing here sleeps to wait for an event: the tests await log lines,
replies, the back-end's messages, exits; /proc (a stopped worker) and the
maildir are polled. The one sleep lets a worker grow old on purpose.
"""
import collections
import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import pwd
import re
import signal
import socket
import struct
import threading
import time
import types
import warnings
from pathlib import Path

import pytest

import smtprelay
from helpers import (SMTPClient, assert_closed, backend_args, begin_data, connection_refused, free_port, greeted,
                     matching_lines, relay_command, run_relay, send_message, wait_until)
import service_fixtures
import test_service
from service_fixtures import tcp_connection, write_config
from test_metrics import Metrics, needs_prometheus
from test_service import NotifySocket, children, needs_socket_activate

WAIT = 20               # seconds: the longest a reply, a log line or an exit is waited for (a loaded machine is slow)
SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
STARTED = re.compile(r"smtprelay INFO worker (\d+) started \(pid (\d+)\)$")
RELOADED = "INFO SIGHUP: configuration reloaded for new sessions$"
KEPT_OLD = "SIGHUP: keeping the old configuration: "
TOO_MANY = "421 4.3.2 Too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
SHUTTING_DOWN = f"421 4.3.2 {SERVER_NAME} Service shutting down, closing connection"
SESSIONS = 30           # clients at once in the spread test

inetd = service_fixtures.inetd                      # fixtures of other files, taken by name here
socket_activate = test_service.socket_activate


def body(tag):
    return f"Subject: {tag}\r\n\r\nmessage {tag}\r\n".encode()


# --- The workers: their pids, which one served a client, one alone taking clients ------------

def started_workers(relay):
    """(worker number, pid) of each "worker N started (pid P)" line of the main process (text or JSON), in order."""
    for line in relay.log_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "worker_started":
                yield entry["worker"], entry["pid"]
        elif match := STARTED.search(line):
            yield int(match[1]), int(match[2])


def worker_pids(relay):
    """{worker number: pid} of the workers now (a replaced one's successor)."""
    return dict(started_workers(relay))


def every_worker_pid(relay):
    """The pids of every worker the main process has started, replaced ones too."""
    return {pid for _, pid in started_workers(relay)}


def stopped(pid):
    """True once every thread of process `pid` is stopped (state T in /proc/PID/task/*/stat)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):    # the thread ended meanwhile
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            return False
    return True


@contextlib.contextmanager
def alone(relay, number):
    """Inside the block worker `number` alone takes clients: the others are stopped (SIGSTOP;
    one that has died and is not yet replaced takes none either)."""
    others = []
    for n, pid in worker_pids(relay).items():
        if n != number:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                others.append(pid)
    try:
        for pid in others:
            wait_until(lambda: stopped(pid), WAIT, f"worker pid {pid} stopped")
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def accepted_by(relay, number, source=None):
    """A client that worker `number` accepted (from address `source` if given) -> (SMTPClient, first Reply)."""
    with alone(relay, number):
        client = SMTPClient(relay.connect(timeout=WAIT, source=source))
        first = client.reply()          # the worker has the connection: the others may run again
    return client, first


def session_of(relay, client):
    """(worker number, session id) of the session of `client`, from its connect line."""
    ip, port = client.sock.getsockname()[:2]
    match = relay.wait_for_log(rf"smtprelay worker (\d+) INFO (\w+) connect from {re.escape(ip)}:{port}$", WAIT)
    return int(match[1]), match[2]


def greeted_by(relay, number, ehlo=CLIENT_HELO, source=None):
    """A client greeted (220) by worker `number`, as its log says; EHLO said if `ehlo`."""
    client, first = accepted_by(relay, number, source)
    assert first.code == 220, first
    assert session_of(relay, client)[0] == number
    if ehlo:
        assert client.say(f"EHLO {ehlo}").code == 250
    return client


def quit_session(relay, client):
    """QUIT, close, and wait for the session's disconnect line (its slot is free before that line)."""
    _, sid = session_of(relay, client)
    assert client.say("QUIT").code == 221
    client.sock.close()
    relay.wait_for_log(rf" {sid} disconnect from ", WAIT)


def rewrite(relay, text):
    """Replace the relay's config file in one rename: no reader sees half a file."""
    new = relay.config_path.with_name(relay.config_path.name + ".new")
    new.write_text(text)
    os.replace(new, relay.config_path)


def ours(pid, relay):
    """True if process `pid` runs the relay's command line (its config file's path): a worker of it."""
    try:
        return str(relay.config_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def workers_relay(relay):
    """start(*args, workers=2, **kwargs) -> the relay fixture's RelayProcess run with --workers `workers`
    (None: no option, e.g. when the config file sets it); returns once the main process listens, after
    forking every worker.

    At teardown every worker is continued (a test that failed inside alone()),
    the relay is stopped (SIGTERM, SIGKILL after 10 s) and any worker that
    outlived its main process is killed: SIGKILL of the main process alone
    would leave its workers serving.
    """
    started = []

    def start(*args, workers=2, **kwargs):
        r = relay(*args, *(["--workers", workers] if workers is not None else []), **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        pids = every_worker_pid(r)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        r.close_clients()
        r.stop()
        for pid in pids:
            if ours(pid, r):
                os.kill(pid, signal.SIGKILL)


class HeldReplies(dict):
    """A ScriptedBackend's delays ({VERB: seconds}, read with .get(VERB) before each reply) whose
    reply to the end of data waits until release(): a message in flight for as long as a test wants."""

    def __init__(self, delays):
        super().__init__(delays)
        self.released = threading.Event()

    def get(self, verb, default=None):
        if verb == ".":
            self.released.wait(WAIT)
        return super().get(verb, default)

    def release(self):
        self.released.set()


@pytest.fixture
def held_backend(scripted_backend):
    """start(**kwargs) -> (ScriptedBackend, HeldReplies): the back-end holds each reply to the end of
    data until HeldReplies.release(); released at teardown."""
    made = []

    def start(**kwargs):
        backend = scripted_backend(**kwargs)
        backend.delays = held = HeldReplies(backend.delays)
        made.append(held)
        return backend, held

    yield start
    for held in made:
        held.release()


class NotifySenders(NotifySocket):
    """A NotifySocket that also keeps the pid of each datagram's sender (SO_PASSCRED) in .senders."""

    def __init__(self):
        super().__init__()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.senders = []

    def _receive(self):
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        self.senders.append(next(struct.unpack("3i", cmsg[:12])[0] for level, kind, cmsg in ancillary
                                 if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)))
        return self._keep(data)

    def next(self, timeout=10):
        self.sock.settimeout(timeout)
        try:
            return self._receive()
        except TimeoutError:
            raise AssertionError(f"no sd_notify datagram within {timeout}s; got {self.keys()}") from None

    def drain(self):
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._receive()


# --- Sessions spread over the workers ---------------------------------------------------

def test_clients_that_come_together_are_spread_over_both_workers_and_each_message_is_stored_once(workers_relay,
                                                                                                 tmp_path):
    maildir = tmp_path / "Maildir"
    r = workers_relay("--backend", f"maildir:{maildir}")
    pids = worker_pids(r)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2, r.log_text()
    assert sorted(children(r.proc.pid)) == sorted(pids.values())
    # All connected before any greeting is read: a worker busy taking one client is not waiting
    # for the next, which the kernel hands to the other (EPOLLEXCLUSIVE wakes one waiting worker).
    clients = [SMTPClient(r.connect(timeout=WAIT)) for _ in range(SESSIONS)]
    served = collections.Counter()
    for client in clients:
        assert client.reply().code == 220
        served[session_of(r, client)[0]] += 1
    assert set(served) == {1, 2}, served
    for n, client in enumerate(clients):
        assert client.say(f"EHLO {CLIENT_HELO}").code == 250
        assert send_message(client, body(f"spread {n}")).code == 250
        assert client.say("QUIT").code == 221
    # The maildir names each file after the process that wrote it (TIME.MusecPpidQn): both workers did.
    files = list((maildir / "new").iterdir())
    writers = collections.Counter(int(re.search(r"P(\d+)Q", path.name)[1]) for path in files)
    assert writers == {pids[number]: count for number, count in served.items()}, (writers, pids, served)
    stored = sorted(re.search(rb"message (spread \d+)", path.read_bytes())[1] for path in files)
    assert stored == sorted(f"spread {n}".encode() for n in range(SESSIONS))     # each once
    assert r.stop() == 0, r.log_text()


def test_json_lines_of_a_worker_carry_its_number_and_the_main_process_s_none(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--log-format", "json")
    ports = {}
    for number in (1, 2):
        client, first = accepted_by(r, number)
        assert first.code == 220
        ports[number] = client.sock.getsockname()[1]
        assert client.say("QUIT").code == 221
    for port in ports.values():
        r.wait_for_log(rf'^\{{.*"event": "connect".*"port": {port}\b')
    entries = [json.loads(line) for line in r.log_text().splitlines()]
    connects = {e["port"]: e for e in entries if e.get("event") == "connect"}
    assert {number: connects[port]["worker"] for number, port in ports.items()} == {1: 1, 2: 2}
    listening = [e for e in entries if e.get("event") == "listening"]
    assert len(listening) == 1 and "worker" not in listening[0], listening    # the main process's line
    assert r.stop() == 0


# --- --max-clients and --max-clients-per-ip across the workers ---------------------------------

def test_max_clients_counts_the_sessions_of_both_workers_together(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--max-clients", "10")
    held = {1: [], 2: []}
    for n in range(10):                 # 5 idle sessions in each worker
        held[1 + n % 2].append(greeted_by(r, 1 + n % 2, ehlo=None))
    for number in (1, 2):               # the 11th, whichever worker accepts it: neither holds 10 itself
        refused, first = accepted_by(r, number)
        assert first.text == TOO_MANY, first
        assert_closed(refused)
        r.wait_for_log(rf"smtprelay worker {number} WARNING refused 127\.0\.0\.1: {TOO_MANY}$")
    # A session ending in one worker frees a place for a client of the other.
    quit_session(r, held[1].pop())
    newcomer = greeted_by(r, 2, ehlo=CLIENT_HELO)
    quit_session(r, held[2].pop())
    greeted_by(r, 1, ehlo=None)
    for number in (2, 1):               # 10 again
        refused, first = accepted_by(r, number)
        assert first.text == TOO_MANY, first
    assert send_message(newcomer, body("within the limit")).code == 250
    assert len(matching_lines(r, rf"WARNING refused 127\.0\.0\.1: {TOO_MANY}$")) == 4


def test_max_clients_per_ip_counts_an_address_across_both_workers(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--max-clients-per-ip", "3")
    held = [greeted_by(r, 1, ehlo=None), greeted_by(r, 1, ehlo=None), greeted_by(r, 2, ehlo=None)]
    for number in (1, 2):
        refused, first = accepted_by(r, number)             # a 4th from 127.0.0.1
        assert first.text == TOO_MANY_FROM_ADDRESS, first
        assert_closed(refused)
        r.wait_for_log(rf"smtprelay worker {number} WARNING refused 127\.0\.0\.1: {TOO_MANY_FROM_ADDRESS}$")
        greeted_by(r, number, source="127.0.0.2")           # another address is served by either
    quit_session(r, held.pop())         # worker 2's: worker 1 may take one more from 127.0.0.1
    greeted_by(r, 1, ehlo=None)
    refused, first = accepted_by(r, 2)
    assert first.text == TOO_MANY_FROM_ADDRESS, first


# --- SIGHUP ------------------------------------------------------------------------------------

def test_sighup_reloads_every_worker_for_new_sessions_and_keeps_the_worker_count(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", workers=None,
                      config="workers = 2\nserver-name = before.test\n")
    assert sorted(worker_pids(r)) == [1, 2]
    before = {}
    for number in (1, 2):
        client, first = accepted_by(r, number)
        assert first.text == "220 before.test ESMTP"
        before[number] = client
    rewrite(r, "workers = 3\nserver-name = after.test\n")
    r.proc.send_signal(signal.SIGHUP)
    for tag in ("", " worker 1", " worker 2"):
        r.wait_for_log(rf"smtprelay{tag} {RELOADED}", WAIT)
    r.wait_for_log(r"smtprelay WARNING SIGHUP: these settings need a restart and stay as they were: workers$")
    for number in (1, 2):
        client, first = accepted_by(r, number)
        assert first.text == "220 after.test ESMTP", (number, first)
        assert session_of(r, client)[0] == number
        # A session that began before the SIGHUP keeps its settings.
        assert before[number].say(f"EHLO {CLIENT_HELO}").lines[0] == "before.test"
    assert len(worker_pids(r)) == 2 and len(children(r.proc.pid)) == 2


def test_sighup_with_a_file_that_does_not_parse_changes_nothing_in_any_worker(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", config="server-name = before.test\n")
    rewrite(r, "server-name = after.test\nmax-clients = many\n")
    r.proc.send_signal(signal.SIGHUP)
    r.wait_for_log(rf"smtprelay ERROR {KEPT_OLD}--max-clients: 'many': not a number$", WAIT)
    for number in (1, 2):               # both still serve, as before
        client, first = accepted_by(r, number)
        assert first.text == "220 before.test ESMTP", (number, first)
        assert client.say("QUIT").code == 221
    # A good file then reaches both: the workers had not been asked to read the bad one.
    rewrite(r, "server-name = after.test\n")
    r.proc.send_signal(signal.SIGHUP)
    for number in (1, 2):
        r.wait_for_log(rf"smtprelay worker {number} {RELOADED}", WAIT)
        client, first = accepted_by(r, number)
        assert first.text == "220 after.test ESMTP", (number, first)
    refusals = matching_lines(r, KEPT_OLD)
    assert len(refusals) == 1 and " worker " not in refusals[0], refusals
    assert len(matching_lines(r, RELOADED)) == 3      # the good file only: main, worker 1, worker 2


def test_sighup_with_a_file_that_is_not_text_is_refused_and_the_main_process_serves_on(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", config="server-name = before.test\n")
    new = r.config_path.with_name("new.conf")
    new.write_bytes(b"max-clients = \xff\xfe50\n")
    os.replace(new, r.config_path)
    r.proc.send_signal(signal.SIGHUP)
    r.wait_for_log(rf"smtprelay ERROR {KEPT_OLD}internal error: \w+$", WAIT)
    for number in (1, 2):
        client, first = accepted_by(r, number)
        assert first.text == "220 before.test ESMTP", (number, first)
        assert client.say("QUIT").code == 221
    assert r.proc.poll() is None
    assert r.stop() == 0, r.log_text()


def test_max_clients_raised_by_sighup_above_its_start_value_is_named_as_needing_a_restart(workers_relay,
                                                                                              tmp_path):
    # README, Several processes: "A --max-clients raised by SIGHUP above its value at start needs a restart
    # with more than one worker."
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", config="max-clients = 2\n")
    rewrite(r, "max-clients = 4\n")
    r.proc.send_signal(signal.SIGHUP)
    for number in (1, 2):
        r.wait_for_log(rf"smtprelay worker {number} {RELOADED}", WAIT)
    r.wait_for_log(r"smtprelay WARNING SIGHUP: these settings need a restart and stay as they were: "
                   r"max-clients above 2 \(its value at start, with --workers\)$")
    held = [greeted_by(r, number, ehlo=None) for number in (1, 2)]
    for number in (1, 2):               # 2 in all, as at start
        refused_client, first = accepted_by(r, number)
        assert first.text == TOO_MANY, (number, first)
    assert len(held) == 2


# --- SIGTERM -------------------------------------------------------------------------------------

def test_sigterm_lets_each_worker_finish_its_message_in_flight_then_exits_0(workers_relay, held_backend):
    backend, held = held_backend()
    r = workers_relay(*backend_args(backend), "--server-name", SERVER_NAME)
    clients = {}
    for number in (1, 2):       # a message in each worker, the back-end holding its reply
        clients[number] = greeted_by(r, number)
        begin_data(clients[number])
        clients[number].send(body(f"in flight {number}") + b".\r\n")
        backend.wait_for_received(number, timeout=WAIT)
    r.proc.send_signal(signal.SIGTERM)
    for tag in ("", " worker 1", " worker 2"):
        r.wait_for_log(rf"smtprelay{tag} INFO SIGTERM: stopping; messages in flight are finished first$", WAIT)
    assert r.proc.poll() is None, "the relay exited with messages in flight"
    held.release()
    for number, client in clients.items():
        reply = client.reply()
        assert reply.code == 250 and reply.lines[0].startswith("2.0.0 Ok: queued as SCRIPTED"), (number, reply)
        assert [x.text for x in client.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=WAIT) == 0, r.log_text()
    pids = worker_pids(r)
    for number in (1, 2):
        r.wait_for_log(rf"smtprelay INFO worker {number} \(pid {pids[number]}\) exited with status 0$")
    r.wait_for_log(r"smtprelay INFO stopped$")
    assert r.lines[-1].endswith("smtprelay INFO stopped"), r.lines[-3:]
    assert sorted(m.content for m in backend.delivered) == [body("in flight 1"), body("in flight 2")]
    assert sum(len(s.messages) for s in backend.sessions) == 2


def test_workers_whose_main_process_is_killed_finish_their_message_in_flight_and_exit(workers_relay,
                                                                                      held_backend):
    backend, held = held_backend()
    r = workers_relay(*backend_args(backend), "--server-name", SERVER_NAME)
    pids = worker_pids(r)
    client = greeted_by(r, 1)
    begin_data(client)
    client.send(body("in flight") + b".\r\n")
    backend.wait_for_received(1, timeout=WAIT)
    r.proc.kill()
    r.proc.wait(WAIT)
    for number in (1, 2):
        r.wait_for_log(rf"smtprelay worker {number} ERROR the main process \(pid {r.proc.pid}\) is gone: stopping$",
                       WAIT)
    assert ours(pids[1], r), "worker 1 exited with its message in flight"
    held.release()
    reply = client.reply()
    assert reply.code == 250, reply
    assert [x.text for x in client.replies_until_closed()] == [SHUTTING_DOWN]
    for number in (1, 2):
        r.wait_for_log(rf"smtprelay worker {number} INFO stopped$", WAIT)
        wait_until(lambda: not ours(pids[number], r), WAIT, f"worker {number} gone")
    assert [m.content for m in backend.delivered] == [body("in flight")]


def test_during_the_drain_new_connections_are_refused_as_by_a_single_relay(workers_relay, held_backend):
    backend, held = held_backend()
    r = workers_relay(*backend_args(backend), "--server-name", SERVER_NAME)
    client = greeted(r, timeout=WAIT, ehlo=CLIENT_HELO)
    begin_data(client)
    client.send(body("in flight") + b".\r\n")
    backend.wait_for_received(1, timeout=WAIT)
    r.proc.send_signal(signal.SIGTERM)
    for tag in ("", " worker 1", " worker 2"):
        r.wait_for_log(rf"smtprelay{tag} INFO SIGTERM: stopping", WAIT)
    try:
        wait_until(lambda: connection_refused((r.host, r.port)), WAIT, f"{r.address} refusing connections during the drain")
        assert r.proc.poll() is None, "the relay exited with a message in flight"
    finally:
        held.release()
    assert client.reply().code == 250
    assert [x.text for x in client.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=WAIT) == 0, r.log_text()


# --- A worker that dies -----------------------------------------------------------------------------

def test_a_killed_worker_is_logged_and_replaced_while_the_other_serves_on(workers_relay, scripted_backend):
    backend = scripted_backend()
    r = workers_relay(*backend_args(backend))
    pids = worker_pids(r)
    acknowledged = greeted_by(r, 1)
    assert send_message(acknowledged, body("acknowledged")).code == 250
    other = greeted_by(r, 2)            # inside a transaction when worker 1 dies
    assert other.say("MAIL FROM:<a@example.org>").code == 250
    assert other.say("RCPT TO:<b@example.net>").code == 250

    os.kill(pids[1], signal.SIGKILL)
    r.wait_for_log(rf"smtprelay ERROR worker 1 \(pid {pids[1]}\) was killed by SIGKILL; a new one starts in 1s$",
                   WAIT)
    assert_closed(acknowledged)         # its connection went with its process
    assert other.say("DATA").code == 354
    other.send(body("survivor") + b".\r\n")
    assert other.reply().code == 250
    assert other.say("QUIT").code == 221
    newcomer = greeted(r, timeout=WAIT, ehlo=CLIENT_HELO)     # served meanwhile, by whichever worker is there
    assert send_message(newcomer, body("newcomer")).code == 250

    r.wait_for_count(r"smtprelay INFO worker 1 started \(pid \d+\)$", 2, WAIT)
    replacement = worker_pids(r)
    assert replacement[2] == pids[2] and replacement[1] not in pids.values(), (pids, replacement)
    assert sorted(children(r.proc.pid)) == sorted(replacement.values())
    for number in (1, 2):               # both slots serve again
        client = greeted_by(r, number)
        assert send_message(client, body(f"after, worker {number}")).code == 250
    contents = [m.content for m in backend.delivered]
    assert sorted(contents) == sorted(body(tag) for tag in ("acknowledged", "survivor", "newcomer",
                                                            "after, worker 1", "after, worker 2"))
    assert r.stop() == 0, r.log_text()


def test_the_sessions_of_a_killed_worker_stop_counting_toward_max_clients(workers_relay, tmp_path):
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--max-clients", "2")
    pids = worker_pids(r)
    doomed = [greeted_by(r, 1, ehlo=None) for _ in range(2)]
    refused_client, first = accepted_by(r, 2)
    assert first.text == TOO_MANY, first           # worker 2 counts worker 1's two
    os.kill(pids[1], signal.SIGKILL)
    r.wait_for_log(rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL; a new one starts in 1s$", WAIT)
    for client in doomed:
        assert_closed(client)
    # Two places again, whichever worker (the survivor, or the replacement once it runs) takes the clients.
    served = [greeted(r, timeout=WAIT) for _ in range(2)]
    third = SMTPClient(r.connect(timeout=WAIT))
    assert third.reply().text == TOO_MANY
    assert all(client.say("NOOP").code == 250 for client in served)


def test_a_worker_dying_young_is_replaced_after_a_pause_doubling_to_a_cap_an_old_one_at_once(workers_relay,
                                                                                             tmp_path):
    # WORKER_PAUSES and WORKER_YOUNG shortened (1 s to 30 s, and 10 s, as shipped) so that the whole
    # schedule runs in seconds.
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}",
                      constants={"WORKER_PAUSES": (0.25, 1), "WORKER_YOUNG": 2})
    pauses = []
    for deaths in range(1, 6):
        if deaths == 5:
            time.sleep(2.5)     # on purpose: the worker lives past WORKER_YOUNG
        pid = worker_pids(r)[1]
        os.kill(pid, signal.SIGKILL)
        died = r.wait_for_log(rf"smtprelay ERROR worker 1 \(pid {pid}\) was killed by SIGKILL; "
                              r"a new one starts in (\S+)s$", WAIT)
        pauses.append(died[1])
        r.wait_for_count(r"smtprelay INFO worker 1 started", deaths + 1, WAIT)
    pid = worker_pids(r)[1]
    os.kill(pid, signal.SIGKILL)        # young again, after an old one: the pause starts over
    pauses.append(r.wait_for_log(rf"worker 1 \(pid {pid}\) was killed by SIGKILL; a new one starts in (\S+)s$",
                                 WAIT)[1])
    assert pauses == ["0.25", "0.5", "1", "1", "0", "0.25"], pauses
    r.wait_for_count(r"smtprelay INFO worker 1 started", 7, WAIT)
    greeted_by(r, 1, ehlo=None)
    assert r.stop() == 0, r.log_text()


def test_a_worker_that_dies_while_a_reload_is_awaited_is_replaced_and_ready_follows_its_successor(workers_relay,
                                                                                                     tmp_path):
    notify = NotifySenders()
    try:
        r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", env={"NOTIFY_SOCKET": notify.address})
        assert notify.wait_for("READY", WAIT)["READY"] == "1"
        pids = worker_pids(r)
        os.kill(pids[1], signal.SIGSTOP)    # it will not answer the SIGHUP before it dies
        try:
            wait_until(lambda: stopped(pids[1]), WAIT, "worker 1 stopped")
            r.proc.send_signal(signal.SIGHUP)
            assert notify.wait_for("RELOADING", WAIT)["RELOADING"] == "1"
            r.wait_for_log(rf"smtprelay worker 2 {RELOADED}", WAIT)
        finally:
            os.kill(pids[1], signal.SIGKILL)
        # Reaped and replaced while the reload is still awaited (RELOAD_SECONDS: 30 s, more than WAIT).
        r.wait_for_log(rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL; a new one starts in 1s$", WAIT)
        r.wait_for_count(r"smtprelay INFO worker 1 started", 2, WAIT)
        assert notify.wait_for("READY", WAIT)["READY"] == "1"     # once the successor has said it
        assert not matching_lines(r, r"did not say within"), r.log_text()
        assert accepted_by(r, 1)[1].code == 220
        r.proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", WAIT)["STOPPING"] == "1"
        assert r.proc.wait(timeout=WAIT) == 0, r.log_text()
        notify.drain()
        assert notify.keys() == ["READY", "RELOADING", "READY", "STOPPING"], notify.received
        assert set(notify.senders) == {r.proc.pid}
    finally:
        notify.close()


# --- systemd: socket activation, sd_notify --------------------------------------------------------

@needs_socket_activate
def test_socket_activated_relay_with_two_workers_serves_on_the_inherited_socket_from_both(socket_activate,
                                                                                          tmp_path):
    maildir = tmp_path / "Maildir"
    process, (port,) = socket_activate([*relay_command(), "-c", write_config(tmp_path, ""),
                                        "--backend", f"maildir:{maildir}", "--workers", "2"])
    process.host, process.port = "127.0.0.1", port
    first = SMTPClient(process.connect(timeout=WAIT))          # starts the relay
    assert first.reply().code == 220
    process.wait_for_log(rf"smtprelay INFO listening on 127\.0\.0\.1:{port} \(inherited\)$", WAIT)
    pids = worker_pids(process)
    assert sorted(pids) == [1, 2] and sorted(children(process.proc.pid)) == sorted(pids.values())
    assert first.say(f"EHLO {CLIENT_HELO}").code == 250
    assert send_message(first, body("first")).code == 250
    for number in (1, 2):
        client = greeted_by(process, number)
        assert send_message(client, body(f"worker {number}")).code == 250
        assert client.say("QUIT").code == 221
    process.close_clients()
    assert process.stop() == 0, process.log_text()
    assert len(list((maildir / "new").iterdir())) == 3


def test_sd_notify_comes_from_the_main_process_alone_ready_once_reloading_ready_stopping(workers_relay, tmp_path):
    # systemd takes notifications from the main pid alone (NotifyAccess=main, Type=notify's default).
    notify = NotifySenders()
    try:
        r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", config="server-name = before.test\n",
                          env={"NOTIFY_SOCKET": notify.address})
        assert notify.wait_for("READY", WAIT)["READY"] == "1"
        for pid in worker_pids(r).values():     # each had started its signals and listener threads
            assert len(os.listdir(f"/proc/{pid}/task")) >= 3, pid
        for number in (1, 2):
            assert accepted_by(r, number)[1].code == 220
        # A refused reload: RELOADING=1 and READY=1 around it, as with one process.
        rewrite(r, "server-name = before.test\nmax-clients = many\n")
        r.proc.send_signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", WAIT)["RELOADING"] == "1"
        assert notify.wait_for("READY", WAIT)["READY"] == "1"
        r.wait_for_log(KEPT_OLD, WAIT)
        # A good one: READY=1 once every worker has taken it.
        rewrite(r, "server-name = after.test\n")
        with alone(r, 2):       # worker 1 stopped: it cannot reload yet
            r.proc.send_signal(signal.SIGHUP)
            assert notify.wait_for("RELOADING", WAIT)["RELOADING"] == "1"
            r.wait_for_log(rf"smtprelay worker 2 {RELOADED}", WAIT)
            notify.drain()
            assert notify.keys()[-1] == "RELOADING", notify.received       # no READY=1 before worker 1's
        assert notify.wait_for("READY", WAIT)["READY"] == "1"
        r.wait_for_log(rf"smtprelay worker 1 {RELOADED}", WAIT)
        for number in (1, 2):
            assert accepted_by(r, number)[1].text == "220 after.test ESMTP"
        r.proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", WAIT)["STOPPING"] == "1"
        assert r.proc.wait(timeout=WAIT) == 0, r.log_text()
        notify.drain()
        assert notify.keys() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], notify.received
        assert set(notify.senders) == {r.proc.pid}, (notify.senders, worker_pids(r))
    finally:
        notify.close()


# --- --metrics --------------------------------------------------------------------------------------

@needs_prometheus
def test_metrics_add_up_the_counters_of_every_worker_and_the_gauge_counts_both_workers_sessions(workers_relay,
                                                                                                tmp_path):
    port = free_port()
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--metrics", f"127.0.0.1:{port}")
    r.wait_for_log(rf"smtprelay INFO metrics on http://127\.0\.0\.1:{port}/metrics$")
    metrics = Metrics(r, port)
    try:
        for n, number in enumerate((1, 1, 1, 2, 2)):        # 3 whole sessions in worker 1, 2 in worker 2
            client = greeted_by(r, number)
            assert send_message(client, body(f"counted {n}")).code == 250
            quit_session(r, client)
        held = {number: greeted_by(r, number, ehlo=None) for number in (1, 2)}
        samples = metrics.scrape()
        assert samples[("smtprelay_sessions_total", frozenset())] == 7
        assert samples[("smtprelay_messages_total", frozenset({("outcome", "delivered")}))] == 5
        assert samples[("smtprelay_sessions_active", frozenset())] == 2
        # A worker killed: its counts stay in the totals, its session leaves the gauge.
        pid = worker_pids(r)[1]
        os.kill(pid, signal.SIGKILL)
        r.wait_for_log(rf"worker 1 \(pid {pid}\) was killed by SIGKILL", WAIT)
        assert_closed(held[1])
        samples = metrics.scrape()
        assert samples[("smtprelay_sessions_active", frozenset())] == 1
        assert samples[("smtprelay_sessions_total", frozenset())] == 7
        assert samples[("smtprelay_messages_total", frozenset({("outcome", "delivered")}))] == 5
        r.wait_for_count(r"smtprelay INFO worker 1 started", 2, WAIT)
        client = greeted_by(r, 2)       # not the replacement's: see the next test
        assert send_message(client, body("after")).code == 250
        samples = metrics.scrape()
        assert samples[("smtprelay_sessions_total", frozenset())] == 8
        assert samples[("smtprelay_messages_total", frozenset({("outcome", "delivered")}))] == 6
        assert samples[("smtprelay_sessions_active", frozenset())] == 2
    finally:
        metrics.close()
    assert r.stop() == 0, r.log_text()


@needs_prometheus
def test_a_worker_started_after_the_main_process_served_metrics_serves_its_first_client(workers_relay,
                                                                                        tmp_path):
    port = free_port()
    # --timeout and --data-timeout short: the drain of a worker holding a lost client is cut soon.
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--metrics", f"127.0.0.1:{port}",
                      "--timeout", "1", "--data-timeout", "1")
    r.wait_for_log(rf"smtprelay INFO metrics on http://127\.0\.0\.1:{port}/metrics$")
    metrics = Metrics(r, port)
    try:
        assert metrics.value("smtprelay_sessions_active") == 0
    finally:
        metrics.close()
    pid = worker_pids(r)[1]
    os.kill(pid, signal.SIGKILL)
    r.wait_for_count(r"smtprelay INFO worker 1 started", 2, WAIT)
    with alone(r, 1):
        client = SMTPClient(r.connect(timeout=3))      # a greeting comes in milliseconds
        first = client.reply()
    assert first.code == 220, first


def test_ready_after_a_reload_waits_for_each_worker_s_answer_to_it_not_its_start_up_ready(monkeypatch):
    # A worker forked just before a SIGHUP says READY=1 once at its start, with the old
    # settings, and again once it has taken the SIGHUP passed on to it: only that counts.
    notify = NotifySocket()
    reader, writer = os.pipe()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
        reports = smtprelay.WorkerReports(reader, 2, types.SimpleNamespace(sessions=0))
        os.write(writer, "0 0 READY=1\x1fSTATUS=0 sessions\n1 0 READY=1\n".encode())
        assert notify.wait_for("READY", WAIT)["READY"] == "1"
        monkeypatch.setattr(smtprelay.WORKER, "reloads", 1)     # the main process took a SIGHUP
        reports.await_reload(WAIT)
        os.write(writer, b"0 0 READY=1\n1 1 READY=1\n")        # worker 1's start-up, worker 2's answer
        wait_until(lambda: reports.awaited == {0}, WAIT, "worker 2's answer taken, worker 1's start-up not")
        os.write(writer, b"0 1 READY=1\n")
        assert notify.wait_for("READY", WAIT)["READY"] == "1"
        assert [fields["READY"] for _, fields in notify.received] == ["1", "1"], notify.received
        assert reports.deadline is None
    finally:
        os.close(writer)
        notify.close()


def tasks_of(uid):
    """The processes and threads on this machine whose real user is uid (what RLIMIT_NPROC counts)."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/task/[0-9]*/status"):
        with contextlib.suppress(OSError):
            real = next(line for line in status.read_text().splitlines() if line.startswith("Uid:")).split()[1]
            count += real == str(uid)
    return count


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC binds a user other than root; --user needs root")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_relay_the_system_gives_no_thread_exits_1_naming_the_limit_without_a_traceback(workers, tmp_path):
    # --user nobody: the limit on processes counts nobody's, and leaves room for the relay's
    # main process alone, or for it and worker 1: worker 2's fork fails, then the first thread.
    nobody = pwd.getpwnam("nobody").pw_uid
    limit = tasks_of(nobody) + workers
    result = run_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--user", "nobody", "--workers", str(workers),
                       listen="127.0.0.1:0", wrapper=("prlimit", f"--nproc={limit}", "--"))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    shortage = "the limit on processes (ulimit -u, systemd's TasksMax=) is reached"
    if workers == 1:
        assert re.search(rf"ERROR cannot start: the system gives no thread for signals: {re.escape(shortage)}$",
                         result.stderr, re.M), result.stderr
    else:
        assert re.search(r"smtprelay ERROR worker 2: cannot start it: Resource temporarily unavailable; "
                         r"trying again in 1s$", result.stderr, re.M), result.stderr
        assert re.search(rf"smtprelay ERROR cannot start: the system gives no thread for workers' reports: "
                         rf"{re.escape(shortage)}$", result.stderr, re.M), result.stderr


# --- SharedCounts, in this process -----------------------------------------------------------------

@contextlib.contextmanager
def shared_counts(workers, capacity):
    """A SharedCounts(workers, capacity), its lock file closed at the end."""
    counts = smtprelay.SharedCounts(workers, capacity)
    try:
        yield counts
    finally:
        counts.lockfile.close()


def test_shared_counts_add_up_every_slot_and_count_an_address_in_each_of_its_forms():
    with shared_counts(2, 8) as counts:
        counts.enter(0)
        assert counts.sessions == 0
        for ip in ("192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", None, None):
            assert counts.admit(ip, 10, 2) is None, ip
        assert counts.sessions == 5
        assert counts.sessions_from("192.0.2.1") == counts.sessions_from("::ffff:192.0.2.1") == 2
        assert counts.sessions_from("2001:db8::1") == 1 and counts.sessions_from(None) == 2
        assert counts.sessions_from("::") == counts.sessions_from("0.0.0.0") == 0    # free records are no one's
        for ip in ("192.0.2.1", "::ffff:192.0.2.1", None):      # 2 from each already
            assert counts.admit(ip, 10, 2) is smtprelay.TOO_MANY_FROM_ADDRESS, ip
        assert counts.admit("192.0.2.1", 10, 0) is None         # 0: no limit per address
        assert counts.sessions_from("192.0.2.1") == 3
        counts.release("192.0.2.1")
        # The second slot (another worker's) sees the first's sessions, and adds its own.
        counts.enter(1)
        assert counts.admit("::ffff:192.0.2.1", 10, 2) is smtprelay.TOO_MANY_FROM_ADDRESS
        assert counts.admit("192.0.2.2", 10, 2) is None
        assert counts.admit("2001:db8::2", 10, 2) is None
        assert counts.sessions == 7 and list(counts.counts) == [5, 2]
        assert counts.admit("2001:db8::3", 7, 0) is smtprelay.TOO_MANY_CONNECTIONS    # 7 of 7
        counts.release("192.0.2.2")
        assert counts.sessions == 6 and counts.sessions_from("192.0.2.2") == 0
        # Slot 0's worker died: nothing of it counts any more.
        counts.clear(0)
        assert counts.sessions == 1 and list(counts.counts) == [0, 1]
        left = [counts.sessions_from(ip) for ip in ("192.0.2.1", "2001:db8::1", None, "2001:db8::2")]
        assert left == [0, 0, 0, 1]
        assert counts.admit("192.0.2.1", 10, 1) is None


def test_shared_counts_hold_a_slot_s_capacity_and_reuse_a_released_record():
    with shared_counts(2, 2) as counts:
        counts.enter(1)
        assert counts.admit("192.0.2.1", 100, 0) is None
        assert counts.admit("192.0.2.2", 100, 0) is None
        assert counts.admit("192.0.2.3", 100, 0) is smtprelay.TOO_MANY_CONNECTIONS    # the slot is full
        counts.release("192.0.2.1")
        assert counts.admit("192.0.2.3", 100, 0) is None
        assert [counts.sessions_from(ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")] == [0, 1, 1]
        # Slot 1's records are its own: slot 0's part of the memory is untouched.
        size = counts.capacity * counts.RECORD
        assert counts.memory[counts.base:counts.base + size] == bytes(size)


def test_shared_counts_take_the_lowest_free_record_and_read_only_those_a_worker_used():
    with shared_counts(2, 1000) as counts:
        counts.enter(1)
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            assert counts.admit(ip, 100, 0) is None
        assert list(counts.used) == [0, 3]
        counts.release("192.0.2.2")
        assert counts.admit("192.0.2.4", 100, 0) is None                      # record 1 again
        start = counts.base + counts.capacity * counts.RECORD
        assert counts.memory[start + counts.RECORD:start + 2 * counts.RECORD] == \
            b"\1" + smtprelay.address_key("192.0.2.4")
        assert list(counts.used) == [0, 3]
        # A record past those used is never read, whatever it holds.
        stray = start + 500 * counts.RECORD
        counts.memory[stray:stray + counts.RECORD] = b"\1" + smtprelay.address_key("192.0.2.1")
        assert counts.sessions_from("192.0.2.1") == 1
        counts.clear(1)
        assert list(counts.used) == [0, 0] and counts.sessions == 0


def test_shared_counts_count_no_session_from_the_unspecified_address_in_free_records():
    # A free record is all zeros, as the 16 bytes of "::" are: it is no session from "::" (a PROXY header
    # may name that address).
    with shared_counts(1, 4) as counts:
        counts.enter(0)
        assert counts.sessions_from("::") == 0
        for _ in range(2):
            assert counts.admit("::", 10, 2) is None
        assert counts.sessions_from("::") == 2
        assert counts.admit("::", 10, 2) is smtprelay.TOO_MANY_FROM_ADDRESS


def test_shared_counts_count_an_address_only_where_a_record_starts():
    # A record is a used flag (1) and the address's 16 bytes (address_key). The record of
    # 2001:db8::1 ends in 1, as a record starts: a record holding 1 and the first 16 bytes of
    # it, followed by any record, holds it one byte past a record's start.
    wanted = b"\1" + smtprelay.address_key("2001:db8::1")
    assert smtprelay.SharedCounts.RECORD == len(wanted) and wanted[-1:] == b"\1"
    with shared_counts(1, 4) as counts:
        counts.enter(0)
        for ip in (str(ipaddress.IPv6Address(wanted[:16])), "192.0.2.9"):
            assert counts.admit(ip, 10, 1) is None
        assert counts.memory.find(wanted, counts.base) == counts.base + 1      # there, but not at a record
        assert counts.sessions_from("2001:db8::1") == 0
        assert counts.admit("2001:db8::1", 10, 1) is None                      # not refused for a phantom
        assert counts.sessions_from("2001:db8::1") == 1                        # the real one, after it
        assert counts.admit("2001:db8::1", 10, 1) is smtprelay.TOO_MANY_FROM_ADDRESS


def test_shared_counts_are_shared_with_a_forked_process_and_its_lock_goes_when_it_dies():
    with shared_counts(2, 4) as counts:
        ready_r, ready_w = os.pipe()
        hold_r, hold_w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)    # fork() with threads about (Python 3.12)
            pid = os.fork()
        if pid == 0:                        # the worker of slot 1: counts a session, then holds the lock
            status = 1
            try:
                counts.enter(1)
                if counts.admit("192.0.2.7", 10, 0) is None:
                    with counts.locked():
                        os.write(ready_w, b"x")
                        os.read(hold_r, 1)      # until killed
                    status = 0
            finally:
                os._exit(status)
        try:
            counts.enter(0)
            assert os.read(ready_r, 1) == b"x"
            assert counts.sessions == 1 and counts.sessions_from("192.0.2.7") == 1
            with pytest.raises(OSError) as busy:
                fcntl.lockf(counts.lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert busy.value.errno in (errno.EACCES, errno.EAGAIN)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            for fd in (ready_r, ready_w, hold_r, hold_w):
                os.close(fd)
        # Its holder gone, the lock is free; its session still counts until the slot is cleared.
        assert counts.admit("192.0.2.8", 10, 0) is None
        assert counts.sessions == 2
        counts.clear(1)
        assert counts.sessions == 1 and counts.sessions_from("192.0.2.7") == 0


# --- --workers auto, wrong values, --inetd ---------------------------------------------------------

def test_workers_auto_starts_one_worker_per_cpu_this_process_may_run_on(workers_relay, tmp_path):
    cpus = min(len(os.sched_getaffinity(0)), smtprelay.MAX_WORKERS)
    r = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", workers="auto")
    expected = list(range(1, cpus + 1)) if cpus > 1 else []
    assert sorted(worker_pids(r)) == expected, r.log_text()
    assert len(children(r.proc.pid)) == len(expected)
    # One CPU: one process, as --workers 1 (no worker is forked; its lines name none).
    one = workers_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", workers="auto",
                        wrapper=("taskset", "-c", str(min(os.sched_getaffinity(0)))))
    client = greeted(one, timeout=WAIT)
    assert client.say("QUIT").code == 221
    one.wait_for_log(r"smtprelay INFO \w+ disconnect from 127\.0\.0\.1$")
    assert worker_pids(one) == {} and children(one.proc.pid) == []
    assert not matching_lines(one, r"smtprelay worker "), one.log_text()


@pytest.mark.parametrize("value, error", [("0", "'0': must be at least 1"), ("x", "'x': not a number"),
                                          ("65", "'65': must be at most 64"), ("1.5", "'1.5': not a number")])
def test_workers_must_be_a_whole_number_from_1_to_64_or_auto(value, error, tmp_path):
    result = run_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--workers", value, "--check-config")
    assert result.returncode == 1, result
    assert result.stderr == f"smtprelay: --workers: {error}\n"


def test_stdout_backend_and_memory_beyond_the_machine_are_refused_with_workers(tmp_path):
    result = run_relay("--backend", "stdout:", "--workers", "2", "--check-config")
    assert result.returncode == 1, result
    assert result.stderr.startswith("smtprelay: --backend: stdout: prints from one process: not with --workers above 1")
    result = run_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--workers", "64",
                       "--max-clients", str(10 ** 12), listen="127.0.0.1:0")
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"smtprelay: --max-clients: {10 ** 12} for each of 64 workers: "), result.stderr


def test_the_metrics_directory_is_removed_when_the_relay_cannot_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--workers", "2",
                           "--metrics", f"127.0.0.1:{port}", listen="127.0.0.1:0", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 1, result
    assert result.stderr.startswith("smtprelay: --metrics: 127.0.0.1:"), result.stderr
    assert not list(tmp_path.glob("smtprelay-metrics-*"))


def test_inetd_with_workers_serves_its_one_session_in_its_one_process(inetd, tmp_path):
    maildir = tmp_path / "Maildir"
    stderr_path = tmp_path / "relay.stderr"
    sock, conn = tcp_connection()
    with sock, open(stderr_path, "wb") as stderr:
        proc = inetd([*relay_command(), "-c", write_config(tmp_path, ""), "--inetd", "--workers", "2",
                      "--backend", f"maildir:{maildir}"], conn, stderr=stderr)
        sock.settimeout(WAIT)
        client = SMTPClient(sock)
        assert client.reply().code == 220
        assert children(proc.pid) == []         # no worker forked
        assert client.say(f"EHLO {CLIENT_HELO}").code == 250
        assert send_message(client, body("inetd")).code == 250
        assert client.say("QUIT").code == 221
        assert proc.wait(timeout=WAIT) == 0
    log = stderr_path.read_text()
    assert " worker " not in log and "listening on" not in log, log
    assert len(list((maildir / "new").iterdir())) == 1
