#!/usr/bin/env python3
"""Benchmark: smtprelay beside nginx's mail proxy, aiosmtpd's Proxy and a direct connection.

Everything runs on 127.0.0.1, on free ports, and stops by itself. Postfix's
smtp-sink is the back-end (it counts and discards mail; G's XCLIENT rows: a
sink of this script's), Postfix's smtp-source is the client (workloads F
and G: Python clients), and each workload goes through every target:

  direct                 smtp-source -> smtp-sink
  smtprelay              smtp-source -> smtprelay --backend SINK --no-xclient -> smtp-sink
  smtprelay --workers 2  the same with --workers 2: a main process that binds the listener and
                         forks 2 worker processes that serve it (left out, with a note, where
                         smtprelay --help names no --workers)
  smtprelay --auth-http  smtp-source -> smtprelay --auth-http (nginx http block) --no-xclient -> smtp-sink
  aiosmtpd Proxy         smtp-source -> python -m aiosmtpd -c aiosmtpd.handlers.Proxy -> smtp-sink
  nginx (2 workers)      the same as nginx with worker_processes 2 (its own instance)
  nginx                  smtp-source -> nginx mail proxy (auth_http to the same block, xclient off) -> smtp-sink
  line relay             with --reference: smtp-source -> a thread per client passing each line on
                         unchecked (LINE_RELAY_SCRIPT) -> smtp-sink: the least a thread per client
                         costs in Python, for comparison; and E of a bare thread
                         (GREETER_SCRIPT: a ThreadingTCPServer thread that greets and blocks in
                         recv), the least an idle session can take in that shape

The nginx that runs the mail proxy also serves the auth_http block, which
answers every request statically: Auth-Status OK, Auth-Server 127.0.0.1,
Auth-Port the sink's port. nginx runs worker_processes 1 (nginx (2 workers):
2); smtprelay is one process (a thread per session; --workers 2: a main
process and 2 workers, each a thread per session, the limits shared) logging
at warning, with --resolve off (nginx has no resolver set) and --max-clients
2000 (for E; the script raises RLIMIT_NOFILE, which the proxies inherit);
aiosmtpd is one asyncio process.
The machine this was written for has 2 cores, shared by the client, the
proxy and the sink.

Workloads (1 KB messages unless said otherwise):

  A  1 message per session, 1 client                      msg/s
  B  1 message per session, 20 clients                    msg/s
  C  100 messages per session, 5 clients                  msg/s
  D  10 MiB messages, 4 clients                           MiB/s
  E  memory per idle session: added RSS (VmRSS) of the proxy (all its
     processes: nginx's master and workers, smtprelay --workers' main process
     and workers) per connection, over 1000 connections held open after the
     greeting; on a fresh instance of the target after 5 transactions, as a
     process that ran the other workloads reuses memory it freed   KB
     Beside it, the fixed cost of a worker: on that fresh instance after the
     5 transactions, before the connections, the VmRSS of one worker process
     (nginx and smtprelay --workers: the mean over their workers; a target of
     one process: that process), and of it the private part, USS
     (Private_Clean + Private_Dirty in /proc/PID/smaps_rollup): VmRSS counts
     the pages a forked worker still shares with its parent   KB
  F  one whole transaction (connect, greeting, EHLO, MAIL, RCPT, DATA, QUIT),
     one at a time, timed by a Python client: p50 and p99, and what the
     proxy adds to them (target minus direct, same repetition)    ms
  G  the back-end far away: FAR_DELAY (10 ms) each way, 20 ms a round trip.
     A client as Postfix's smtp client (g_session): after EHLO, where
     PIPELINING is offered, MAIL, RCPT and DATA in one write, the three
     replies read, then the message and its end, its reply read; QUIT at
     the end. One session at a time: G1 one message per session (40
     sessions; --quick 10), G10 ten per session (8 sessions; --quick 2).
     p50 and p99 of a transaction (MAIL sent to the end-of-data reply read)
     and, for G1, of the whole session (connect() to that reply)   ms
     Gx: G1 and G10 again with XCLIENT: nginx xclient on beside smtprelay's
     default --xclient, in front of a back-end that offers XCLIENT ADDR
     (smtp-sink offers only NAME HELO, and smtprelay will not pass a client
     to a back-end that would still judge the relay's address): XclientSink,
     a small threaded SMTP sink in this process (PIPELINING, XCLIENT ADDR
     NAME HELO PROTO PORT LOGIN, 220 to XCLIENT, counts every message)
  CPU  the proxy's CPU time (utime+stime from /proc/PID/stat; all its
     processes, as E) per 1000 sessions, measured during A      s

The machine has no netem, so G's distance is a delaying TCP forwarder in
this process (DelayLine), between the proxy and the sink: it holds each
chunk for 10 ms before writing it on, either way, in order, with bounded
buffers, passes each side's end on in order, and delays the TCP handshake
as a link would (a greeting comes 40 ms after connect()); a reader and a
writer thread per direction, whose CPU time the report gives. Its
calibration, sessions direct through it, is printed below the table: a
pipelined transaction should take 2 round trips, 40 ms; on the machine this
was written for it takes 41-42, as a timed wait there wakes 0.2-0.3 ms late
and each leg wakes two threads (every target's G figures carry this per leg). G cannot use the
A-F instances (smtprelay's --backend and nginx's Auth-Port name the sink),
so direct, smtprelay (--no-xclient; --xclient for Gx) and nginx (xclient
off; on for Gx) each have twins whose back-end is the forwarder (nginx's
two mail servers in one process; auth_http answers name the forwarder's
port, so nginx's back-end connection goes through it). G runs as one more
workload of every repetition, in the rotation, against those twins; the
other targets have none (their G rows say -). nginx offers no SMTP
extension unless told, so its twins have smtp_capabilities PIPELINING (a
client as Postfix's would not pipeline otherwise). smtprelay keeps idle
back-end connections (--no-xclient) for the next session, nginx does not:
G1 shows what that is worth at a distance; with XCLIENT neither keeps any.

All targets run side by side for the whole run; each repetition (default 3)
runs every workload once against every target, in an order that rotates
from workload to workload and repetition to repetition. The table shows the
median over repetitions and, in brackets, the median of the per-repetition
ratios target / nginx, the nginx of one worker process, nginx (2 workers)
included (so above 1 is better for msg/s and MiB/s, worse for KB, ms and
CPU).

Every message smtp-source (or the F or G client) sends must be counted by
smtp-sink (its -c counters; Gx: by XclientSink): if the sink got fewer, the
run stops with exit status 1 and a line naming the target and workload. A
fast wrong relay is not fast. smtp-source failing (an SMTP error, a dropped connection) also
stops the run.

    apt-get install postfix nginx-light libnginx-mod-mail python3-venv
    python3 contrib/benchmark.py                 # about 7 minutes on 2 cores, half of it G (--reference: 2 more)
    python3 contrib/benchmark.py --quick         # under a minute (G: 20 s): smoke test
    python3 contrib/benchmark.py --json          # the results as JSON on stdout

Progress goes to stderr, the table (or the JSON) to stdout. Without nginx's
mail module the nginx column is left out with a note and the ratios say
n/a; without nginx at all the --auth-http column goes too. aiosmtpd comes
from its own venv, made on first use under
${XDG_CACHE_HOME:-~/.cache}/smtprelay-bench/aiosmtpd-venv (python3 -m venv,
pip install aiosmtpd==1.4.6: about 10 s); if that cannot be made, its
column is left out the same way. Its command line cannot hand Proxy its
back-end, so a three-line subclass with from_cli does (AIOSMTPD_SHIM). The
relay runs as `sys.executable smtprelay.py`, or with the repository's .venv
python when sys.executable lacks its packages; the environment variable
SMTPRELAY_BENCH_RELAY names another smtprelay.py to measure (default: the
repository's).

Figures vary from run to run by some percent; compare columns of one run.
"""

import argparse
import collections
import json
import os
import re
import resource
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RELAY = Path(os.environ.get("SMTPRELAY_BENCH_RELAY") or REPO / "smtprelay.py")   # the relay to measure
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
AIOSMTPD_REQUIREMENT = "aiosmtpd==1.4.6"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smtprelay-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20

# Target names, in table order; ratios are to the last one (nginx, one worker process).
DIRECT, RELAY_STATIC, RELAY_WORKERS, RELAY_AUTH, AIOSMTPD, LINE_RELAY, NGINX_WORKERS, NGINX = (
    "direct", "smtprelay", "smtprelay --workers 2", "smtprelay --auth-http", "aiosmtpd Proxy", "line relay",
    "nginx (2 workers)", "nginx")
TARGET_ORDER = [DIRECT, RELAY_STATIC, RELAY_WORKERS, RELAY_AUTH, AIOSMTPD, LINE_RELAY, NGINX_WORKERS, NGINX]
WORKERS = 2                 # the worker processes of smtprelay --workers and nginx (2 workers)

# How much of each workload: the full run, and --quick (a smoke test, under a minute).
FULL = dict(repetitions=3, a_messages=2000, b_messages=4000, c_rounds=4, d_size=10 * MiB,
            d_messages=24, e_connections=1000, f_transactions=1000, g1_sessions=40, g10_sessions=8,
            warmup=40)
QUICK = dict(repetitions=1, a_messages=300, b_messages=600, c_rounds=1, d_size=1 * MiB,
             d_messages=16, e_connections=200, f_transactions=300, g1_sessions=10, g10_sessions=2,
             warmup=10)
MESSAGE_SIZE = 1000         # bytes of payload, A, B, C, F and G
C_CLIENTS, C_PER_SESSION = 5, 100
B_CLIENTS, D_CLIENTS = 20, 4
FAR_DELAY = 0.010           # G: seconds each way between the proxy and its back-end
G_PER_SESSION = 10          # G10's messages per session

# (key, label in the table, unit, digits after the point)
METRICS = [
    ("A", "A: 1 msg/session, 1 client", "msg/s", 0),
    ("B", "B: 1 msg/session, 20 clients", "msg/s", 0),
    ("C", "C: 100 msg/session, 5 clients", "msg/s", 0),
    ("D", "D: 10 MiB messages, 4 clients", "MiB/s", 1),
    ("E", "E: RSS per idle session", "KB", 1),
    ("Wrss", "RSS of an idle worker process (one-process targets: the process)", "KB", 0),
    ("Wuss", "USS of that idle worker (its private memory, shared with no other process)", "KB", 0),
    ("F50", "F: transaction p50", "ms", 3),
    ("F99", "F: transaction p99", "ms", 3),
    ("F50+", "F: p50 added by the proxy", "ms", 3),
    ("F99+", "F: p99 added by the proxy", "ms", 3),
    ("G1_50", "G1: far back-end, 1 msg/session, transaction p50", "ms", 1),
    ("G1_99", "G1: transaction p99", "ms", 1),
    ("G1s50", "G1: whole session p50", "ms", 1),
    ("G1s99", "G1: whole session p99", "ms", 1),
    ("G10_50", "G10: far back-end, 10 msg/session, transaction p50", "ms", 1),
    ("G10_99", "G10: transaction p99", "ms", 1),
    ("G1x_50", "G1x: G1 with XCLIENT, transaction p50", "ms", 1),
    ("G1x_99", "G1x: transaction p99", "ms", 1),
    ("G1xs50", "G1x: whole session p50", "ms", 1),
    ("G1xs99", "G1x: whole session p99", "ms", 1),
    ("G10x_50", "G10x: G10 with XCLIENT, transaction p50", "ms", 1),
    ("G10x_99", "G10x: transaction p99", "ms", 1),
    ("CPU", "CPU per 1000 sessions (during A)", "s", 2),
]


class BenchmarkError(Exception):
    """The run cannot go on; str() is the one line for stderr."""


def note(text):
    print(text, file=sys.stderr, flush=True)


# --- processes, ports, /proc ----------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_accepting(port, proc, name, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"{name} exited with status {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise BenchmarkError(f"{name} did not listen on {port} within {timeout}s")


def children(pid):
    """The processes pid forked, from any of its threads."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(found))


def descendants(pid):
    """Children, their children, and so on (nginx: master -> workers; smtprelay --workers:
    main -> workers)."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def start_time(pid):
    """Field 22 of /proc/PID/stat (when the process started), or None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def reap_strays(stamps, name):
    """After a process's end: wait (5 s at most) for the descendants it had (stamps: {pid:
    start_time}) to go, kill those that stay, with a note -> how many were killed."""
    deadline = time.monotonic() + 5
    while True:
        left = [pid for pid, stamp in stamps.items() if stamp is not None and start_time(pid) == stamp]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    if left:
        note(f"note: {name}: {len(left)} child process(es) still there 5 s after it exited; killed")
    return len(left)


def rss_kb(pids):
    """VmRSS of the processes, added up, in KB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def uss_kb(pids):
    """Private_Clean + Private_Dirty (smaps_rollup) of the processes, added up, in KB: their
    memory that no other process shares (a forked worker shares the rest with its parent);
    None where the kernel has no smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
        except FileNotFoundError:
            return None
        except OSError:
            pass
    return total


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads), added up."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])     # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def raise_fd_limit():
    """E holds 1000 connections; the proxies (children) inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Processes:
    """Started processes, all stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log=None, **kwargs):
        out = open(log, "wb") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=kwargs.pop("stdout", out),
                                    stderr=out, **kwargs)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def stop(self):
        stamps = {}             # their children (workers), which should end with them
        for proc in reversed(self.procs):
            if proc.poll() is None:
                stamps[proc] = {pid: start_time(pid) for pid in descendants(proc.pid)}
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc, theirs in stamps.items():
            if theirs:
                reap_strays(theirs, " ".join(Path(str(arg)).name for arg in proc.args[:2]))


# --- the sinks -------------------------------------------------------------------

class Counting:
    """A back-end that counts the messages it got: messages(), and expect() to check them."""

    name = "the sink"

    def messages(self):
        raise NotImplementedError

    def gone(self):
        """Why the back-end is no longer there (a line), or None while it is."""
        return None

    def expect(self, before, sent, target, workload):
        """Wait (briefly) until the sink has counted all `sent` since `before`; fail if not."""
        deadline = time.monotonic() + 5
        while True:
            got = self.messages() - before
            if got >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        gone = self.gone()
        if gone:
            raise BenchmarkError(f"FAIL: {gone} during {target}, workload {workload}")
        if got < sent:
            raise BenchmarkError(f"FAIL: {target}, workload {workload}: {self.name} counted {got} of the {sent} "
                                 f"messages the client sent and saw accepted ({sent - got} lost)")
        return got


class Sink(Counting):
    """smtp-sink with -c: its running counters ("sess=N quit=N mesg=N\\r") go to a file."""

    COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")

    def __init__(self, processes, tmp):
        self.port = free_port()
        self.counters = tmp / "sink.counters"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(self.counters, "wb") as out:
            self.proc = processes.start(["smtp-sink", *user, "-c", "-m", "4096", f"127.0.0.1:{self.port}", "1024"],
                                        stdout=out, log=f"{self.counters}.err")
        wait_accepting(self.port, self.proc, "smtp-sink")

    def messages(self):
        """Messages the sink has received so far (its last complete counter line)."""
        with open(self.counters, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 512))
            data = f.read()
        for record in reversed(data.split(b"\r")[:-1]):     # the last piece may be half-written
            m = self.COUNTERS.search(record)
            if m:
                return int(m.group(3))
        return 0

    def gone(self):
        if self.proc.poll() is None:
            return None
        err = Path(f"{self.counters}.err").read_text(errors="replace").strip().splitlines()
        return f"smtp-sink exited with status {self.proc.returncode}{' (' + err[-1] + ')' if err else ''}"


class XclientSink(Counting):
    """G's back-end for the XCLIENT rows, in this process: smtp-sink offers only XCLIENT NAME
    HELO, and smtprelay rightly takes a back-end without XCLIENT ADDR for one that would judge
    the relay's own address. A thread per connection; it offers PIPELINING and XCLIENT ADDR
    NAME HELO PROTO PORT LOGIN, answers XCLIENT with a new greeting (220) as Postfix does, and
    answers what one read brought (a pipelined burst) in one write, as Postfix does. Nothing is
    checked or kept: each message is counted at its end of data, as smtp-sink counts."""

    name = "the XCLIENT sink"
    REPLIES = {
        b"EHLO": b"250-xsink.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                 b"250 XCLIENT ADDR NAME HELO PROTO PORT LOGIN\r\n",
        b"HELO": b"250 xsink.example\r\n",
        b"XCLIENT": b"220 xsink.example ESMTP\r\n",
        b"MAIL": b"250 2.1.0 Ok\r\n",
        b"RCPT": b"250 2.1.5 Ok\r\n",
        b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
        b"RSET": b"250 2.0.0 Ok\r\n",
        b"NOOP": b"250 2.0.0 Ok\r\n",
        b"QUIT": b"221 2.0.0 Bye\r\n",
    }

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads, block_on_close, request_queue_size = True, False, 128

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()
        sink = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    sink.serve(self.request)
                except OSError:
                    pass            # a connection gone is no news here
        self.server = self.Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="xclient-sink", daemon=True).start()

    def messages(self):
        return self.count

    def serve(self, sock):
        """One connection: the greeting, then replies to whole lines as they come."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"220 xsink.example ESMTP\r\n")
        buf, in_data = bytearray(), False
        while data := sock.recv(65536):
            buf += data
            out = []
            while True:
                if in_data:
                    # The CRLF that ended DATA was left at the front, so an empty message ends here too.
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        del buf[:-4]        # all but what may be the start of the end
                        break
                    del buf[:end + 5]
                    with self.lock:
                        self.count += 1
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                    in_data = False
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        return
                    break
                verb = bytes(buf[:end]).split(b" ", 1)[0].upper()
                del buf[:end if verb == b"DATA" else end + 2]
                out.append(self.REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n"))
                if verb == b"QUIT":
                    sock.sendall(b"".join(out))
                    return
                in_data = verb == b"DATA"
            if out:
                sock.sendall(b"".join(out))

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --- workload G's distance: a delaying TCP forwarder --------------------------------

class DelayLine:
    """A TCP forwarder on loopback that holds every chunk it reads for `delay` seconds before
    writing it on, each way: G's back-end `delay` away (the machine has no netem). Clients
    connect to its port; it connects to target_port for each.

    Per connection, a reader and a writer thread per direction (Flow): the reader stamps each
    chunk with the time it may leave and queues it, the writer waits until then (a condition's
    timed wait, well under a millisecond late, where an epoll timeout is rounded up to the next
    millisecond) and writes it. So chunks keep their order, and one that is held does not hold
    up the reading of the next. A direction that holds LIMIT bytes stops reading its side, whose
    sender then meets TCP's own backpressure. A side's end (FIN) follows its data in order, as
    a shutdown of the other side's writing; a failed write shuts both sockets down. The TCP
    handshake takes its time as well: nothing reaches the far side before three legs (SYN,
    SYN-ACK, ACK) and nothing comes back before four, so a greeting arrives two round trips
    after connect(), as over a real link. The threads' CPU time is added up (cpu), to show
    that the forwarder's own cost is noise beside the delay.
    """

    LIMIT = 256 * 1024

    def __init__(self, target_port, delay=FAR_DELAY):
        self.target_port, self.delay = target_port, delay
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.links = set()
        self.connections = self.chunks = 0
        self.cpu = 0.0
        threading.Thread(target=self.accept, name="delay-line", daemon=True).start()

    def accept(self):
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return          # stop() shut the listener down
            try:
                far = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                far.settimeout(None)
            except OSError:
                near.close()
                continue
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            DelayLink(self, near, far)

    def stop(self):
        """Shut every connection down and wait for the threads (their CPU time is added up then)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            links = list(self.links)
        for link in links:
            link.cut()
        deadline = time.monotonic() + 5
        while self.links and time.monotonic() < deadline:
            time.sleep(0.01)


class DelayLink:
    """One connection through a DelayLine: two Flows, four threads; the last to end closes both sockets."""

    def __init__(self, line, near, far):
        self.line, self.socks = line, (near, far)
        self.cut_off = False
        now = time.monotonic()
        self.flows = (Flow(self, near, far, now + 3 * line.delay), Flow(self, far, near, now + 4 * line.delay))
        self.running = 4
        with line.lock:
            line.links.add(self)
            line.connections += 1
        for flow in self.flows:
            for work in (flow.read, flow.write):
                threading.Thread(target=self.run, args=(work,), daemon=True).start()

    def run(self, work):
        try:
            work()
        finally:
            cpu = time.thread_time()
            with self.line.lock:
                self.line.cpu += cpu
                self.running -= 1
                last = self.running == 0
                if last:
                    self.line.chunks += sum(flow.chunks for flow in self.flows)
                    self.line.links.discard(self)
            if last:
                for sock in self.socks:
                    sock.close()

    def cut(self):
        """Both ways at once, whatever is held: a write failed, or the line stops."""
        self.cut_off = True
        for flow in self.flows:
            with flow.ready:
                flow.ready.notify_all()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Flow:
    """One direction of a DelayLink: chunks read from src, held, written to dst when due.
    Nothing is written before `opens` (the handshake's legs)."""

    def __init__(self, link, src, dst, opens):
        self.link, self.src, self.dst, self.opens = link, src, dst, opens
        self.held = collections.deque()     # (due, chunk), oldest first; b"": src's end
        self.size = 0                       # bytes held
        self.chunks = 0
        self.ready = threading.Condition()

    def read(self):
        delay, limit = self.link.line.delay, self.link.line.LIMIT
        while True:
            with self.ready:
                while self.size >= limit and not self.link.cut_off:
                    self.ready.wait()
            try:
                chunk = self.src.recv(65536)
            except OSError:
                chunk = b""             # a reset ends this side as a FIN would
            due = max(time.monotonic() + delay, self.opens)
            with self.ready:
                self.held.append((due, chunk))
                self.size += len(chunk)
                self.chunks += 1
                self.ready.notify_all()
            if not chunk:
                return

    def write(self):
        while True:
            with self.ready:
                while True:
                    if self.link.cut_off:
                        return
                    if not self.held:
                        self.ready.wait()
                        continue
                    wait = self.held[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self.ready.wait(wait)
                _, chunk = self.held.popleft()
                self.size -= len(chunk)
                self.ready.notify_all()
            try:
                if not chunk:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(chunk)
            except OSError:
                self.link.cut()
                return


# --- targets ---------------------------------------------------------------------

class Lab:
    """What the targets share: the started processes, the run's directory, the sink;
    each started instance gets a directory of its own there."""

    def __init__(self, processes, tmp, sink):
        self.processes, self.tmp, self.sink = processes, tmp, sink
        self.instances = 0
        self.started = []           # every target instance, for their logs at the end

    def directory(self, slug):
        self.instances += 1
        path = self.tmp / f"{slug}-{self.instances}"
        path.mkdir()
        return path


class Target:
    """One thing to send mail to: a port, and the processes whose memory and CPU count.
    fresh() starts another instance of the same (for E), or is None (direct). far: for
    workload G, {"": (Target, sink), "x": (Target, sink)}: the same kind of target in front
    of the far back-end, without and with XCLIENT (start_far), where there is one."""

    far = None

    def __init__(self, name, port, proc=None, log=None, fresh=None, lab=None):
        self.name, self.port, self.proc, self.log, self.fresh = name, port, proc, log, fresh
        self.log_start = len(self.log_lines())      # what it logged while starting up is not news
        if lab:
            lab.started.append(self)

    def pids(self):
        """The processes whose memory and CPU count: the target's and its descendants
        (nginx: master and workers; smtprelay --workers: main and workers)."""
        if self.proc is None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def worker_pids(self):
        """The processes that serve the sessions: the children where there are any (nginx's
        and smtprelay --workers' workers), else the process itself."""
        if self.proc is None:
            return []
        return children(self.proc.pid) or [self.proc.pid]

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchmarkError(f"FAIL: {self.name} exited with status {self.proc.returncode}"
                                 + (f" (log: {self.log})" if self.log else ""))

    def stop(self):
        stamps = {pid: start_time(pid) for pid in descendants(self.proc.pid)}
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        reap_strays(stamps, self.name)

    def log_lines(self):
        if not self.log or not Path(self.log).exists():
            return []
        return Path(self.log).read_text(errors="replace").splitlines()

    def new_log_lines(self):
        return self.log_lines()[self.log_start:]


def relay_python():
    """sys.executable if it can run the relay, else the repository's .venv python."""
    probe = [sys.executable, "-c", "import configargparse, requests"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return sys.executable
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise BenchmarkError(f"{sys.executable} lacks configargparse/requests and there is no {venv}")


def relay_has_workers():
    """Whether RELAY takes --workers (its --help names it)."""
    out = subprocess.run([relay_python(), str(RELAY), "--help"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:]
        raise BenchmarkError(f"exit status {out.returncode}{': ' + last[0] if last else ''}")
    return "--workers" in out.stdout


def start_smtprelay(lab, name, route_args, xclient=False):
    """smtprelay as a fair match for nginx here: no XCLIENT (nginx: xclient off; G's XCLIENT
    rows: its default --xclient, as nginx's xclient on), no name lookups (nginx has no resolver
    set), logging only warnings; --max-clients above E's 1000. route_args: --backend or
    --auth-http, and anything else the target adds (--workers); fresh() gets them too."""
    port = free_port()
    log = lab.directory("smtprelay") / "stderr.log"
    proc = lab.processes.start([relay_python(), str(RELAY), "-c", "/dev/null", "--listen", f"127.0.0.1:{port}",
                                *route_args, *([] if xclient else ["--no-xclient"]), "--resolve", "off",
                                "--server-name", "bench.example", "--max-clients", "2000",
                                "--log-level", "warning"], log=log)
    wait_accepting(port, proc, name)
    return Target(name, port, proc, log, fresh=lambda: start_smtprelay(lab, name, route_args), lab=lab)


def start_relay_static(lab):
    return start_smtprelay(lab, RELAY_STATIC, ["--backend", f"127.0.0.1:{lab.sink.port}"])


def start_relay_workers(lab):
    """As start_relay_static, with --workers: a main process that binds the listener and
    forks WORKERS processes that serve it."""
    return start_smtprelay(lab, RELAY_WORKERS, ["--backend", f"127.0.0.1:{lab.sink.port}",
                                                "--workers", str(WORKERS)])


def start_relay_auth_http(lab, auth_url):
    return start_smtprelay(lab, RELAY_AUTH, ["--auth-http", auth_url])


def nginx_config(prefix, http_port, answers, servers=(), workers=1):
    """One nginx of `workers` worker processes: static auth_http answers in http {} (answers:
    location -> the back-end port it names), and a mail proxy server for each of servers:
    (port, location, xclient, extra)."""
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    load = f"load_module {MAIL_MODULE};" if servers else ""
    mail = "".join(f"""
    server {{
        listen 127.0.0.1:{port};
        protocol smtp;
        smtp_auth none;
        auth_http 127.0.0.1:{http_port}{location};
        xclient {xclient};{extra}
    }}""" for port, location, xclient, extra in servers)
    mail = f"""
mail {{
    server_name bench.example;{mail}
}}""" if servers else ""
    locations = "".join(f"""
        location = {location} {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {port};
            return 204;
        }}""" for location, port in answers.items())
    return f"""{load}
{user}
worker_processes {workers};
worker_rlimit_nofile 16384;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{http_port};{locations}
    }}
}}{mail}
"""


def launch_nginx(lab, answers, servers, workers=1):
    """nginx with nginx_config(answers, servers, workers), listening -> (process, its directory,
    the http port)."""
    prefix = lab.directory("nginx")
    http_port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, http_port, answers, servers, workers))
    proc = lab.processes.start(["nginx", "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)],
                               log=prefix / "stderr.log")
    for port in [http_port, *(server[0] for server in servers)]:
        wait_accepting(port, proc, "nginx")
    return proc, prefix, http_port


def start_nginx(lab, with_mail, workers=1, name=NGINX):
    """nginx (worker_processes `workers`) with the auth_http block, and the mail proxy when
    the module is there. -> (mail Target or None, the auth URL)"""
    mail_port = free_port() if with_mail else None
    servers = [(mail_port, "/auth", "off", "")] if with_mail else []
    proc, prefix, http_port = launch_nginx(lab, {"/auth": lab.sink.port}, servers, workers)
    target = None
    if mail_port:
        target = Target(name, mail_port, proc, prefix / "error.log",
                        fresh=lambda: start_nginx(lab, True, workers, name)[0], lab=lab)
    return target, f"http://127.0.0.1:{http_port}/auth"


def aiosmtpd_python():
    """The python of a venv that has aiosmtpd, made on first use -> path, or None with a note."""
    venv = CACHE / "aiosmtpd-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import aiosmtpd.handlers"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    note(f"making {venv} for aiosmtpd (once) ...")
    try:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--timeout", "20", "--retries", "1", AIOSMTPD_REQUIREMENT],
                       check=True, capture_output=True, timeout=300)
        subprocess.run(probe, check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None)
        detail = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(e)]
        note(f"note: could not make the aiosmtpd venv ({' '.join(detail)})")
        return None
    return str(python)


# aiosmtpd's command line passes no arguments to Proxy (it has no from_cli); this adds one.
AIOSMTPD_SHIM = """
from aiosmtpd.handlers import Proxy

class CLIProxy(Proxy):
    @classmethod
    def from_cli(cls, parser, host, port):
        return cls(host, int(port))
"""


# --reference: what a thread per client costs in Python at the least. Each
# client line goes to the back-end as it came and each reply back, with no
# parsing, no checks, no deadlines and no logging; not a relay to use.
LINE_RELAY_SCRIPT = """
import socket, socketserver, sys

BACKEND = ("127.0.0.1", int(sys.argv[2]))


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        client = self.request
        backend = socket.create_connection(BACKEND)
        for sock in (client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_in, backend_in = client.makefile("rb"), backend.makefile("rb")

        def reply():
            lines = b""
            while True:
                line = backend_in.readline()
                lines += line
                if line[3:4] != b"-":
                    return lines
        client.sendall(reply())
        while line := client_in.readline():
            backend.sendall(line)
            answer = reply()
            client.sendall(answer)
            if line[:4].upper() == b"DATA" and answer[:3] == b"354":
                while True:
                    data = client_in.readline()
                    backend.sendall(data)
                    if data == b".\\r\\n":
                        break
                client.sendall(reply())
            elif line[:4].upper() == b"QUIT":
                break
        backend.close()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads, allow_reuse_address, request_queue_size = True, True, 2048


Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def start_line_relay(lab):
    """--reference: LINE_RELAY_SCRIPT, a thread per client that only passes lines on."""
    port = free_port()
    home = lab.directory("line-relay")
    (home / "line_relay.py").write_text(LINE_RELAY_SCRIPT)
    proc = lab.processes.start([sys.executable, str(home / "line_relay.py"), str(port), str(lab.sink.port)],
                               log=home / "stderr.log")
    wait_accepting(port, proc, LINE_RELAY)
    return Target(LINE_RELAY, port, proc, home / "stderr.log", fresh=lambda: start_line_relay(lab), lab=lab)


# --reference: the least memory an idle session can take in a ThreadingTCPServer:
# a thread blocked in recv() after sending the greeting, holding nothing else.
GREETER_SCRIPT = """
import socketserver, sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"220 floor.example ESMTP\\r\\n")
        self.request.recv(1)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads, allow_reuse_address, request_queue_size = True, True, 2048


Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def thread_floor(lab, connections):
    """E of GREETER_SCRIPT: added RSS per idle connection (KB), measured as E is."""
    port = free_port()
    home = lab.directory("thread-floor")
    (home / "greeter.py").write_text(GREETER_SCRIPT)
    proc = lab.processes.start([sys.executable, str(home / "greeter.py"), str(port)], log=home / "stderr.log")
    wait_accepting(port, proc, "thread floor")
    clients = []
    try:
        for _ in range(5):      # warmed up as E's targets are, by five sessions
            c = SMTPClient(port)
            c.reply("220")
            c.close()
        time.sleep(0.2)
        before = rss_kb([proc.pid])
        for _ in range(connections):
            c = SMTPClient(port)
            clients.append(c)
            c.reply("220")
        time.sleep(0.5)
        return (rss_kb([proc.pid]) - before) / connections
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait()


def start_aiosmtpd(lab, python):
    """aiosmtpd's Proxy handler under aiosmtpd's own main (python -m aiosmtpd, logging at
    error): it relays each message at DATA with smtplib, a new back-end connection per
    message, blocking its event loop meanwhile, and answers 250 whatever the back-end said."""
    port = free_port()
    home = lab.directory("aiosmtpd")
    (home / "bench_aiosmtpd_proxy.py").write_text(AIOSMTPD_SHIM)
    proc = lab.processes.start([python, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                                "-c", "bench_aiosmtpd_proxy.CLIProxy", "127.0.0.1", str(lab.sink.port)],
                               log=home / "stderr.log", env=dict(os.environ, PYTHONPATH=str(home)))
    wait_accepting(port, proc, AIOSMTPD)
    return Target(AIOSMTPD, port, proc, home / "stderr.log", fresh=lambda: start_aiosmtpd(lab, python), lab=lab)


def start_far(lab, targets):
    """Workload G's targets: direct, smtprelay and nginx once more, in front of a DelayLine to
    the sink, and once more with XCLIENT, in front of a DelayLine to an XclientSink. The A-F
    instances cannot be pointed elsewhere (smtprelay's --backend, nginx's static Auth-Port
    are fixed at start), so these are instances of their own; nginx's two mail servers share
    one process, which offers PIPELINING (nginx offers no extension unless told, and a client
    as Postfix's pipelines only where it is offered). -> (the two DelayLines, the XclientSink)"""
    line = DelayLine(lab.sink.port)
    xsink = XclientSink()
    xline = DelayLine(xsink.port)
    targets[DIRECT].far = {"": (Target(f"{DIRECT} (G)", line.port), lab.sink),
                           "x": (Target(f"{DIRECT} (Gx)", xline.port), xsink)}
    targets[RELAY_STATIC].far = {
        "": (start_smtprelay(lab, f"{RELAY_STATIC} (G)", ["--backend", f"127.0.0.1:{line.port}"]), lab.sink),
        "x": (start_smtprelay(lab, f"{RELAY_STATIC} (Gx)", ["--backend", f"127.0.0.1:{xline.port}"], xclient=True),
              xsink)}
    if NGINX in targets:
        ports = free_port(), free_port()
        offer = "\n        smtp_capabilities PIPELINING;"
        proc, prefix, _ = launch_nginx(lab, {"/far": line.port, "/far-xclient": xline.port},
                                       [(ports[0], "/far", "off", offer), (ports[1], "/far-xclient", "on", offer)])
        log = prefix / "error.log"
        targets[NGINX].far = {"": (Target(f"{NGINX} (G)", ports[0], proc, log, lab=lab), lab.sink),
                              "x": (Target(f"{NGINX} (Gx)", ports[1], proc, log), xsink)}
    return line, xline, xsink


# --- clients ---------------------------------------------------------------------

def smtp_source(port, messages, sessions=1, size=MESSAGE_SIZE, same_connection=False):
    """Start smtp-source: `messages` messages of `size` bytes over `sessions` parallel sessions."""
    argv = ["smtp-source", "-m", str(messages), "-s", str(sessions), "-l", str(size),
            "-f", "bench@example.org", "-t", "sink@example.net", "-M", "client.example",
            *(["-d"] if same_connection else []), f"127.0.0.1:{port}"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(procs, target, workload, timeout=900):
    """Wait for smtp-source processes; any error stops the run."""
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise BenchmarkError(f"FAIL: {target.name}, workload {workload}: "
                                 f"smtp-source still running after {timeout}s")
        err = err.decode(errors="replace").strip()
        if proc.returncode != 0 or err:
            raise BenchmarkError(f"FAIL: {target.name}, workload {workload}: smtp-source: "
                                 f"{err.splitlines()[0] if err else f'exit status {proc.returncode}'}")


def run_sources(target, sink, workload, batches):
    """Run smtp-source batches (lists of (messages, sessions, size, same_connection)) one after
    the other, each batch's processes in parallel -> (seconds, messages), counted at the sink."""
    before = sink.messages()
    sent = 0
    start = time.perf_counter()
    for batch in batches:
        procs = [smtp_source(target.port, *job) for job in batch]
        finish(procs, target, workload)
        sent += sum(job[0] for job in batch)
    seconds = time.perf_counter() - start
    sink.expect(before, sent, target.name, workload)
    target.check_alive()
    return seconds, sent


class SMTPClient:
    """Just enough SMTP for workloads E and F, on a plain socket."""

    def __init__(self, port, timeout=30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def reply(self, expected):
        """Read one whole reply -> its lines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line.endswith(b"\n"):
                raise BenchmarkError(f"connection closed waiting for {expected}")
            lines.append(line)
            if line[3:4] != b"-":
                break
        if not line.startswith(expected.encode()):
            raise BenchmarkError(f"expected {expected}, got {line.decode(errors='replace').strip()}")
        return lines

    def command(self, line, expected):
        self.sock.sendall(line)
        self.reply(expected)

    def close(self):
        self.file.close()
        self.sock.close()


F_MESSAGE = (b"From: <bench@example.org>\r\nTo: <sink@example.net>\r\nSubject: bench\r\n\r\n"
             + b"".join(b"%-76d\r\n" % i for i in range(MESSAGE_SIZE // 78)) + b".\r\n")


def one_transaction(port):
    """Connect, greeting, EHLO, MAIL, RCPT, DATA, QUIT -> seconds."""
    start = time.perf_counter()
    c = SMTPClient(port)
    try:
        c.reply("220")
        c.command(b"EHLO client.example\r\n", "250")
        c.command(b"MAIL FROM:<bench@example.org>\r\n", "250")
        c.command(b"RCPT TO:<sink@example.net>\r\n", "250")
        c.command(b"DATA\r\n", "354")
        c.command(F_MESSAGE, "250")
        c.command(b"QUIT\r\n", "221")
    finally:
        c.close()
    return time.perf_counter() - start


G_ENVELOPE = b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n"


def g_session(port, messages):
    """One session as Postfix's smtp client runs it where PIPELINING is offered: after EHLO,
    MAIL, RCPT and DATA in one write, their three replies read, then the message and its end
    in one write, its reply read; QUIT at the end (its reply is read, outside the figures).
    -> {"greeting": s (connect() to the greeting read), "ehlo": s, "transactions": [s, ...]
    (each from MAIL sent to the end-of-data reply read), "session": s (connect() to the last
    end-of-data reply read)}"""
    start = time.perf_counter()
    c = SMTPClient(port)
    try:
        c.reply("220")
        greeted = time.perf_counter()
        c.sock.sendall(b"EHLO client.example\r\n")
        offered = c.reply("250")
        ehlo = time.perf_counter()
        if not any(line[4:].split()[:1] == [b"PIPELINING"] for line in offered):
            raise BenchmarkError("PIPELINING not offered")
        transactions = []
        for _ in range(messages):
            began = time.perf_counter()
            c.sock.sendall(G_ENVELOPE)
            c.reply("250")
            c.reply("250")
            c.reply("354")
            c.command(F_MESSAGE, "250")
            transactions.append(time.perf_counter() - began)
        end = time.perf_counter()
        c.command(b"QUIT\r\n", "221")
    finally:
        c.close()
    return {"greeting": greeted - start, "ehlo": ehlo - greeted, "transactions": transactions,
            "session": end - start}


def calibrate(line, sink, sessions=5):
    """The DelayLine on its own: G1 sessions direct through it to the sink -> medians in ms of
    the greeting (after connect(); 4 legs expected), EHLO (2 legs) and a transaction (4 legs:
    the pipelined MAIL, RCPT, DATA, then the message)."""
    before = sink.messages()
    runs = [g_session(line.port, 1) for _ in range(sessions)]
    sink.expect(before, sessions, f"{DIRECT} (G)", "G calibration")
    return {key: 1000 * statistics.median(r[key][0] if key == "transactions" else r[key] for r in runs)
            for key in ("greeting", "ehlo", "transactions")}


def percentile(seconds, q):
    """The q quantile of seconds (as F takes it), in ms."""
    ordered = sorted(seconds)
    return 1000 * ordered[int(q * (len(ordered) - 1))]


# --- workloads: each (target, sink, scale) -> {metric: value} ----------------------

def workload_a(target, sink, scale):
    """1 message per session, 1 client; the proxy's CPU time per 1000 sessions beside it."""
    pids = target.pids()
    cpu = cpu_seconds(pids) if pids else None
    seconds, sent = run_sources(target, sink, "A", [[(scale["a_messages"], 1, MESSAGE_SIZE, False)]])
    result = {"A": sent / seconds}
    if pids:
        result["CPU"] = (cpu_seconds(pids) - cpu) / sent * 1000
    return result


def workload_b(target, sink, scale):
    """1 message per session, 20 clients."""
    seconds, sent = run_sources(target, sink, "B", [[(scale["b_messages"], B_CLIENTS, MESSAGE_SIZE, False)]])
    return {"B": sent / seconds}


def workload_c(target, sink, scale):
    """100 messages per session, 5 clients: 5 smtp-source -s 1 -d at once, c_rounds times."""
    batch = [(C_PER_SESSION, 1, MESSAGE_SIZE, True)] * C_CLIENTS
    seconds, sent = run_sources(target, sink, "C", [batch] * scale["c_rounds"])
    return {"C": sent / seconds}


def workload_d(target, sink, scale):
    """Large messages (10 MiB; --quick 1 MiB), 4 clients."""
    size = scale["d_size"]
    seconds, sent = run_sources(target, sink, "D", [[(scale["d_messages"], D_CLIENTS, size, False)]])
    return {"D": sent * size / MiB / seconds}


def workload_e(target, sink, scale):
    """Added RSS per idle session, on a fresh instance of the target (a process that has
    run the other workloads has freed memory to reuse, which would hide the cost): a few
    transactions first, then N connections opened, each greeting read, all held open; the
    RSS of all the target's processes (main and workers) added up. Before the connections,
    an idle worker's memory: the mean VmRSS (Wrss) and USS (Wuss) of the target's worker
    processes (worker_pids: its children, or where it has none the process itself)."""
    if target.fresh is None:
        return {}
    target = target.fresh()
    clients = []
    try:
        before_mail = sink.messages()
        for _ in range(5):
            one_transaction(target.port)
        sink.expect(before_mail, 5, target.name, "E")
        time.sleep(0.2)
        workers = target.worker_pids()
        idle = {"Wrss": rss_kb(workers) / len(workers)}
        uss = uss_kb(workers)
        if uss is not None:
            idle["Wuss"] = uss / len(workers)
        before = rss_kb(target.pids())
        for _ in range(scale["e_connections"]):
            c = SMTPClient(target.port)
            clients.append(c)
            c.reply("220")
        time.sleep(0.5)
        after = rss_kb(target.pids())
        target.check_alive()
    except (OSError, BenchmarkError) as e:
        raise BenchmarkError(f"FAIL: {target.name}, workload E: connection {len(clients)}: {e}") from None
    finally:
        for c in clients:
            c.close()
        target.stop()
    return {"E": (after - before) / scale["e_connections"], **idle}


def workload_f(target, sink, scale):
    """Whole transactions one at a time -> p50 and p99 in ms."""
    n = scale["f_transactions"]
    before = sink.messages()
    times = []
    try:
        for _ in range(n):
            times.append(one_transaction(target.port))
    except (OSError, BenchmarkError) as e:
        raise BenchmarkError(f"FAIL: {target.name}, workload F: transaction {len(times) + 1}: {e}") from None
    sink.expect(before, n, target.name, "F")
    target.check_alive()
    times.sort()
    return {"F50": 1000 * times[int(0.50 * (n - 1))], "F99": 1000 * times[int(0.99 * (n - 1))]}


def workload_g(target, sink, scale):
    """The back-end far away (FAR_DELAY each way, through a DelayLine): g_session one after
    another to the target's far twins (start_far), without XCLIENT (G) and with it (Gx):
    G1, one message per session, and G10, G_PER_SESSION per session -> p50 and p99 in ms of
    the transactions, and for G1 of the whole sessions. Every message is counted at the far
    side's sink."""
    result = {}
    for x, (far, far_sink) in (target.far or {}).items():
        before = far_sink.messages()
        g1, sessions, g10 = [], [], []
        try:
            for _ in range(scale["g1_sessions"]):
                run = g_session(far.port, 1)
                g1 += run["transactions"]
                sessions.append(run["session"])
            for _ in range(scale["g10_sessions"]):
                g10 += g_session(far.port, G_PER_SESSION)["transactions"]
        except (OSError, BenchmarkError) as e:
            raise BenchmarkError(f"FAIL: {far.name}, workload G{x}: session {len(sessions) + 1}: {e}") from None
        far_sink.expect(before, len(g1) + len(g10), far.name, f"G{x}")
        far.check_alive()
        result.update({f"G1{x}_50": percentile(g1, 0.50), f"G1{x}_99": percentile(g1, 0.99),
                       f"G1{x}s50": percentile(sessions, 0.50), f"G1{x}s99": percentile(sessions, 0.99),
                       f"G10{x}_50": percentile(g10, 0.50), f"G10{x}_99": percentile(g10, 0.99)})
    return result


WORKLOADS = [("A", workload_a), ("B", workload_b), ("C", workload_c), ("D", workload_d),
             ("E", workload_e), ("F", workload_f), ("G", workload_g)]


def warm_up(target, sink, scale):
    """A few messages first, so that no target pays for its first session in the figures
    (G's twins: one session each)."""
    run_sources(target, sink, "warm-up", [[(scale["warmup"], 2, MESSAGE_SIZE, False)]])
    before = sink.messages()
    for _ in range(5):
        one_transaction(target.port)
    sink.expect(before, 5, target.name, "warm-up")
    for far, far_sink in (target.far or {}).values():
        before = far_sink.messages()
        g_session(far.port, 1)
        far_sink.expect(before, 1, far.name, "warm-up")


# --- the run and its report --------------------------------------------------------

def run(targets, sink, scale):
    """Every workload against every target, scale["repetitions"] times, in rotating order.
    -> runs[metric][target] = [value per repetition]"""
    runs = {key: {t.name: [] for t in targets} for key, *_ in METRICS}
    for target in targets:
        warm_up(target, sink, scale)
    step = 0
    for rep in range(scale["repetitions"]):
        for name, workload in WORKLOADS:
            k = step % len(targets)
            step += 1
            for target in targets[k:] + targets[:k]:
                result = workload(target, sink, scale)
                for key, value in result.items():
                    runs[key][target.name].append(value)
                shown = ", ".join(f"{key} {value:.4g}" for key, value in result.items())
                note(f"repetition {rep + 1}/{scale['repetitions']}  {name}  {target.name:22} {shown or '-'}")
        # What the proxy adds to a transaction: this repetition's figure minus direct's.
        for key in ("F50", "F99"):
            direct = runs[key].get(DIRECT)
            for target in targets:
                if direct and target.name != DIRECT:
                    runs[key + "+"][target.name].append(runs[key][target.name][-1] - direct[-1])
    return runs


def summarize(runs, names):
    """-> {metric: {"median": {target: v}, "ratio_to_nginx": {target: r}}}"""
    summary = {}
    for key, *_ in METRICS:
        medians, ratios = {}, {}
        nginx = runs[key].get(NGINX)
        for name in names:
            values = runs[key].get(name)
            if not values:
                continue
            medians[name] = statistics.median(values)
            if nginx and len(nginx) == len(values):
                per_rep = [v / n for v, n in zip(values, nginx) if n > 0]
                ratios[name] = statistics.median(per_rep) if per_rep else None
            else:
                ratios[name] = None
        summary[key] = {"median": medians, "ratio_to_nginx": ratios}
    return summary


def table(summary, names, scale):
    header = ["workload", *names]
    rows = [header, ["---"] + ["---:"] * len(names)]
    for key, label, unit, digits in METRICS:
        if key == "D":
            label = label.replace("10 MiB", f"{scale['d_size'] / MiB:g} MiB")
        if key == "E":
            label += f" of {scale['e_connections']}"
        row = [f"{label} ({unit})"]
        for name in names:
            if name not in summary[key]["median"]:
                row.append("-" if name != NGINX else "n/a")
                continue
            value = f"{summary[key]['median'][name]:.{digits}f}"
            ratio = summary[key]["ratio_to_nginx"].get(name)
            if name != NGINX:
                value += f" ({ratio:.2f}×)" if ratio is not None else " (n/a)"
            row.append(value)
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the docstring at the top of contrib/benchmark.py for what is measured.")
    p.add_argument("--quick", action="store_true",
                   help="few messages, 1 repetition, E with 200 connections, D with 1 MiB messages: under a minute")
    p.add_argument("--repetitions", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--reference", action="store_true",
                   help="add a line relay (a thread per client passing lines on unchecked) and a bare "
                        "thread's E: Python's floors")
    args = p.parse_args(argv)
    scale = dict(QUICK if args.quick else FULL)
    if args.repetitions:
        scale["repetitions"] = max(1, args.repetitions)
    started = time.monotonic()

    for tool in ("smtp-sink", "smtp-source"):
        if not shutil.which(tool):
            note(f"{tool} not found: apt-get install postfix")
            return 1
    raise_fd_limit()
    skipped = {}
    have_nginx = bool(shutil.which("nginx"))
    with_mail = have_nginx and os.path.exists(MAIL_MODULE)
    if not have_nginx:
        skipped[NGINX] = skipped[RELAY_AUTH] = "nginx not installed (apt-get install nginx-light libnginx-mod-mail)"
    elif not with_mail:
        skipped[NGINX] = f"no {MAIL_MODULE} (apt-get install libnginx-mod-mail)"
    if not with_mail:
        skipped[NGINX_WORKERS] = skipped[NGINX]
    try:
        if not relay_has_workers():
            skipped[RELAY_WORKERS] = f"{RELAY} has no --workers"
    except (BenchmarkError, OSError, subprocess.SubprocessError) as e:
        note(f"{RELAY} --help: {e}")
        return 1
    aiosmtpd = aiosmtpd_python()
    if not aiosmtpd:
        skipped[AIOSMTPD] = f"no venv with {AIOSMTPD_REQUIREMENT} under {CACHE}"
    for name, why in skipped.items():
        note(f"note: {name} left out: {why}")

    processes = Processes()
    try:
        return measure(args, scale, skipped, have_nginx, with_mail, aiosmtpd, processes, started)
    except BenchmarkError as e:
        note(str(e))
        return 1
    finally:
        processes.stop()


def measure(args, scale, skipped, have_nginx, with_mail, aiosmtpd, processes, started):
    """Start the sink and the targets, run, print the table or JSON -> exit status."""
    with tempfile.TemporaryDirectory(prefix="smtprelay-bench-") as tmp:
        tmp = Path(tmp)
        targets, lab, far = {}, None, ()
        try:
            sink = Sink(processes, tmp)
            lab = Lab(processes, tmp, sink)
            targets[DIRECT] = Target(DIRECT, sink.port)
            targets[RELAY_STATIC] = start_relay_static(lab)
            if RELAY_WORKERS not in skipped:
                targets[RELAY_WORKERS] = start_relay_workers(lab)
            if have_nginx:
                nginx, auth_url = start_nginx(lab, with_mail)
                targets[RELAY_AUTH] = start_relay_auth_http(lab, auth_url)
                if nginx:
                    targets[NGINX] = nginx
                    targets[NGINX_WORKERS] = start_nginx(lab, True, WORKERS, NGINX_WORKERS)[0]
            if aiosmtpd:
                targets[AIOSMTPD] = start_aiosmtpd(lab, aiosmtpd)
            if args.reference:
                targets[LINE_RELAY] = start_line_relay(lab)
            far = line, xline, xsink = start_far(lab, targets)
            calibration = calibrate(line, sink)
            note("G's forwarder, direct through it: greeting {greeting:.1f} ms after connect(), "
                 "EHLO {ehlo:.1f} ms, a transaction {transactions:.1f} ms".format(**calibration))
            order = [targets[name] for name in TARGET_ORDER if name in targets]
            note(f"targets: {', '.join(t.name for t in order)}; {scale['repetitions']} repetition(s)"
                 f"{' (--quick)' if args.quick else ''}")
            runs = run(order, sink, scale)
            sent, xsent = sink.messages(), xsink.messages()
            floor = thread_floor(lab, scale["e_connections"]) if args.reference else None
        except BenchmarkError:
            for t in lab.started if lab else []:
                lines = t.new_log_lines()
                if lines:
                    note(f"{t.name} ({t.log}) logged {len(lines)} lines, the last: {lines[-1]}")
            raise
        finally:
            processes.stop()
            for part in far:
                part.stop()
        logs = {}               # what each target logged after starting up, all its instances
        for t in lab.started:
            logs.setdefault(t.name, []).extend(t.new_log_lines())

    runtime = time.monotonic() - started
    names = [name for name in TARGET_ORDER if name in targets or name == NGINX]
    summary = summarize(runs, names)
    forwarder = {"delay_ms": 1000 * line.delay, "direct_ms": calibration,
                 "cpu_s": line.cpu + xline.cpu, "chunks": line.chunks + xline.chunks,
                 "connections": line.connections + xline.connections}
    if args.json:
        print(json.dumps({
            "quick": args.quick, "scale": scale, "targets": [n for n in names if n in targets],
            "skipped": skipped, "units": {key: unit for key, _, unit, _ in METRICS},
            "results": summary, "runs": runs, "messages_at_sink": sent, "messages_at_xclient_sink": xsent,
            "g_forwarder": forwarder, "proxy_logs": logs, "thread_floor_e_kb": floor,
            "runtime_seconds": round(runtime, 1)}, indent=2))
        return 0
    print(table(summary, names, scale))
    print()
    print(f"Medians of {scale['repetitions']} repetition(s); (×) the median of the per-repetition ratios "
          f"target / nginx (worker_processes 1). {sent} messages counted at the sink and {xsent} at G's "
          f"XCLIENT sink, as many as were sent. {runtime:.0f} s.")
    print(f"G: the back-end {forwarder['delay_ms']:g} ms away each way through a delaying forwarder; direct "
          f"through it (median of 5 sessions): greeting {calibration['greeting']:.1f} ms after connect() "
          f"(expected {4 * forwarder['delay_ms']:g}: the handshake, then the greeting), EHLO "
          f"{calibration['ehlo']:.1f} ms ({2 * forwarder['delay_ms']:g}), a pipelined transaction "
          f"{calibration['transactions']:.1f} ms ({4 * forwarder['delay_ms']:g}). The forwarder's threads took "
          f"{1000 * forwarder['cpu_s']:.0f} ms of CPU in all, for {forwarder['chunks']} chunks on "
          f"{forwarder['connections']} connections. G1, G10: transaction = MAIL sent to the end-of-data "
          f"reply read; session = connect() to that reply (G1 only).")
    if floor is not None:
        print(f"Thread floor (E of a ThreadingTCPServer thread that greets and blocks in recv, "
              f"nothing else): {floor:.1f} KB per idle session.")
    for name, why in skipped.items():
        print(f"{name}: left out, {why}")
    for name, lines in logs.items():
        if lines:
            print(f"{name} logged {len(lines)} lines during the run, the first: {lines[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
