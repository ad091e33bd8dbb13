#!/usr/bin/env python3
"""Soak test: hours of mixed mail through the real relay, with faults, counted exactly.

Not run in CI. Everything runs on 127.0.0.1, on free ports, and stops by
itself after --minutes (default 30) and the Postfix queues' drain (at most
--drain-timeout seconds); Ctrl-C stops it early, and every process it
started is stopped on the way out.

    .venv/bin/python contrib/soak.py --minutes 30 [--clients 8] [--seed N] [--json]
        [--kinds smtp-sink,postfix] [--relay PATH/smtprelay.py] [--progress] [--keep]

(or `python3 contrib/soak.py` with the venv active; the relay runs as
`sys.executable RELAY`, falling back to .venv/bin/python when the
interpreter lacks the relay's packages). --relay names the smtprelay.py to
test (default: the one beside contrib/), e.g. a stable checkout's while this
one is being edited. Postfix (3.7 here) and its smtp-sink must be installed
(`apt-get install postfix`); the Postfix back-ends need root (`postfix
start`), smtp-sink then runs with -u nobody. A 3-minute run is a fair smoke
test: --minutes 3 --progress.

What runs (--kinds chooses the back-end kinds; both by default):

  relay "failover"   smtprelay --no-xclient --backend A --backend B   (A first, B when A is down)
  relay "auth-http"  smtprelay --no-xclient --auth-http http://127.0.0.1:P/auth, the auth
                     service (this script, re-run as a subprocess) answering
                     Auth-Status: OK with back-end C or D, round-robin
  back-ends A-D      smtp-sink -d DIR/ each: every completed transaction is one
                     dump file, which a collector thread reads, checks and
                     deletes as the run goes (only once smtp-sink has finished
                     with it: see collect_dumps)
  relay "postfix"    smtprelay --backend P --backend Q --balance roundrobin, with
                     XCLIENT (the relay's default)
  back-ends P, Q     a real Postfix each (master, smtpd, cleanup, qmgr, virtual) with
                     a private config_directory and queue, trusting the relay
                     with XCLIENT (smtpd_authorized_xclient_hosts), delivering
                     every recipient into one Maildir by virtual(8); files are
                     read from Maildir/new (where they arrive whole) and deleted

smtp-sink offers XCLIENT without ADDR, which the relay is to refuse, so its
relays run with --no-xclient (they then keep idle back-end connections).

--clients threads send for the whole run, taking the relays in turn:
messages of 1 KB to 5 MB (most small, some large, log-uniform in each band),
with lines that need dot-stuffing, to 1-3 recipients; MAIL+RCPT+DATA
pipelined in one write or one command at a time; one message per session or
several. Each message carries "X-Soak-Id: <uuid>" in its header and
"X-Soak-End: <uuid>" as its last line, and its sender is
soak-<uuid>@example.org (so the relay's log and Postfix's name it).

Faults, on a schedule drawn from --seed (about every --fault-interval
seconds, by default run length / 24, between 3 and 20 s); each round of
faults has every kind once, in a random order:
  smtp-sink   back-end restarts (SIGKILL, down for a moment, restarted on the
              same port; sometimes A and B together, so the failover relay has
              nothing), auth service restarts
  postfix     `postfix -c DIR stop`, down for a moment, `postfix -c DIR start`
              (sometimes P and Q together); SIGKILL of an smtpd process that is
              serving the relay (one with an established connection)
  any         clients vanishing mid-DATA (the socket closed, or reset, half-way
              through the data; also 2% of messages at random), SIGHUP to a
              relay; with --relay-restarts also a relay stopped with SIGTERM (it
              must drain its sessions and exit 0) and started again on its port.

Counts, per message id, against the dump files and the Maildirs, per back-end
kind. After the clients stop, both Postfixes are started if down and their
queues must drain (postqueue -j empty) before the Maildirs are counted.

  accepted      the client heard 250 to its end of data
  delivered     distinct messages found delivered: a complete dump holding the
                id (ends with its X-Soak-End line and smtp-sink's final empty
                line), or a Maildir file; body checked by SHA-256
  lost          accepted but not delivered (postfix: to some recipient that
                got 250 at RCPT)                                      -> FAIL
  duplicates    delivered more than once (smtp-sink: two dumps; postfix: two
                files for one recipient from two Postfix queue files, i.e. the
                relay handed the message over twice)                  -> FAIL
  redelivered by Postfix  two files for one recipient from the same Postfix
                queue file: Postfix stopped between its Maildir delivery and
                marking it done, and delivered again: not the relay's; allowed
  wrongly delivered  refused (4xx/5xx) but delivered                 -> FAIL
  unacknowledged but delivered  the client vanished mid-DATA, or sent its
                end of data and never saw a reply: allowed, counted apart
  reply lost at back-end kill  refused with 451 4.4.2 at end of data within
                2 s after a back-end of its kind was killed or stopped, yet
                delivered: the back-end took the message and died before its
                250 left it; the relay cannot know (RFC 5321 §6.1's duplicate
                window): allowed
  corrupt / unknown  a delivered body differing from what was sent, or an id
                never sent                                            -> FAIL
  partial dumps  what a killed smtp-sink left half-written: not delivered

The relay's RSS (VmRSS), thread count and open descriptors are sampled
every few seconds: start (before traffic), end (after the clients stopped,
sessions closed) and max. ERROR and Traceback lines in its log are counted.
At the end each relay gets SIGTERM and must drain and exit 0.

Exit status 0 only if lost == duplicates == wrongly delivered == corrupt ==
unknown == 0, no relay died (or failed to stop cleanly), the Postfix queues
drained and some mail was accepted; 1 otherwise; 130 on Ctrl-C. --json
prints the whole report as JSON. --keep keeps the work directory (relay
logs, Postfix maillogs, any unprocessed dumps, Maildir files).
"""

import argparse
import collections
import contextlib
import grp
import hashlib
import http.server
import itertools
import json
import math
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RELAY = REPO / "smtprelay.py"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
HOST = "127.0.0.1"
KINDS = ("smtp-sink", "postfix")

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


def open_files(pid):
    """The paths pid holds open (readlink of /proc/PID/fd/*); empty once it is gone."""
    fd_dir = f"/proc/{pid}/fd"
    paths = set()
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return paths
    for fd in fds:
        try:
            paths.add(os.readlink(f"{fd_dir}/{fd}"))
        except OSError:
            pass            # closed meanwhile
    return paths


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
            self.spawned(self.proc)
            if wait_accepting(self.port, self.proc):
                self.starts += 1
                return
            stop_process(self.proc)
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start on port {self.port}; see {self.log_path}")

    def spawned(self, proc):
        """Called with each process started, before it is known to accept."""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

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
    """Postfix's smtp-sink dumping each transaction into a file; see collect_dumps."""

    kind = "smtp-sink"

    def __init__(self, name, workdir):
        super().__init__(f"sink-{name}", workdir)
        self.letter = name
        self.dumproot = workdir / f"dump-{name}"
        self.generation = 0
        self.dumpdir = None
        self.writers = {}       # dump directory -> the smtp-sink processes started on it
        self.user = []
        if os.geteuid() == 0:   # smtp-sink refuses to run as root without -u
            self.user = ["-u", "nobody"]
        self.make_dir(self.dumproot)

    def make_dir(self, path):
        path.mkdir()
        if self.user:
            nobody = pwd.getpwnam("nobody")
            os.chown(path, nobody.pw_uid, nobody.pw_gid)

    def start(self):
        # Every start dumps into a directory of its own (dump-A/1, dump-A/2, ...):
        # whether a dump is finished is then asked of the process that wrote it.
        self.generation += 1
        self.dumpdir = self.dumproot / str(self.generation)
        self.make_dir(self.dumpdir)
        super().start()

    def spawned(self, proc):
        self.writers.setdefault(self.dumpdir, []).append(proc)

    def command(self):
        return [SMTP_SINK, *self.user, "-d", f"{self.dumpdir}/", f"{HOST}:{self.port}", "256"]


# The Postfix back-end: what tests/postfix_fixture.py found by experiment
# (Postfix 3.7.11, Debian, as root), redone here so that the soak needs
# neither pytest nor tests/. In short: everything (config_directory,
# queue_directory, data_directory, maillog_file through postlogd) lives under
# one directory; the queue's subdirectories are made beforehand (`postfix
# start` then takes 0.3 s, not 2 s); main.cf and master.cf are dated a minute
# back (Postfix programs wait while main.cf is less than a second old); no
# chroot; and `postfix start` runs inside a subreaper (PR_SET_CHILD_SUBREAPER),
# since PID 1 here may not reap orphans and master daemonizes: the reaper
# exits once master and all its children have, which is how the soak knows
# a Postfix has stopped. Its start is run on a pty: the postfix command
# reports errors only to syslog unless its stderr is a terminal.
REAPER = textwrap.dedent(r"""
    import ctypes, json, os, subprocess, sys
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(json.dumps({"rc": -1, "output": "prctl(PR_SET_CHILD_SUBREAPER) failed"}), flush=True)
        sys.exit(1)
    master_fd, slave_fd = os.openpty()
    rc = subprocess.call(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd)
    os.close(slave_fd)
    os.set_blocking(master_fd, False)
    output = b""
    while True:
        try:
            chunk = os.read(master_fd, 65536)
        except OSError:          # EAGAIN: nothing more; EIO: no writer left
            break
        if not chunk:
            break
        output += chunk
    os.close(master_fd)
    print(json.dumps({"rc": rc, "output": output.decode("utf-8", "replace")}), flush=True)
    sys.stdout.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            pass
""")

POSTFIX_QUEUE_DIRS = [(name, "root", 0o700) for name in
                      ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
                       "private", "saved", "trace")] + [("maildrop", "postdrop", 0o730),
                                                        ("public", "postdrop", 0o710), ("pid", "root", 0o755)]

POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
virtual   unix  -       n       n       -       -       virtual
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixBackend:
    """A private Postfix on HOST:port delivering all mail into one Maildir.

    Same interface as Child where the soak needs it (name, port, lock, kills,
    log_path, alive, start, stop) plus the faults of its own.
    """

    kind = "postfix"

    def __init__(self, name, workdir):
        self.letter, self.name = name, f"postfix-{name}"
        self.root = workdir / self.name
        self.config_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_base = self.root / "mail"
        self.maildir_new = self.mail_base / "Maildir" / "new"
        self.log_path = self.root / "maillog"
        self.port = free_port()
        self.reaper = None      # the subreaper around master; it exits when all of Postfix has
        self.kills = []         # monotonic times of postfix stops and smtpd SIGKILLs
        self.starts = 0
        self.seen = set()       # Maildir files read (with --keep they stay)
        self.lock = threading.Lock()
        self.root.mkdir(mode=0o755)             # the postfix user must get through to data/
        for path in (self.config_dir, self.queue_dir, self.data_dir, self.mail_base):
            path.mkdir(mode=0o755)
        postfix_user, nobody = pwd.getpwnam("postfix"), pwd.getpwnam("nobody")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        # postsuper, run by `postfix start` as the mail owner, writes the maillog itself (postlogd
        # is not up yet) when it has something to say, such as a queue file a stop cut short:
        # a maillog only root may write would make that start fail.
        self.log_path.touch(mode=0o644)
        os.chown(self.log_path, postfix_user.pw_uid, postfix_user.pw_gid)
        os.chown(self.mail_base, nobody.pw_uid, nobody.pw_gid)      # virtual(8) delivers as nobody
        postdrop = grp.getgrnam("postdrop").gr_gid
        for sub, group, mode in POSTFIX_QUEUE_DIRS:
            path = self.queue_dir / sub
            path.mkdir()
            if sub != "pid":
                os.chown(path, postfix_user.pw_uid, postdrop if group == "postdrop" else 0)
            os.chmod(path, mode)
        main_cf = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {self.log_path}",
            f"maillog_file_prefixes = {self.root}",
            f"myhostname = {self.name.lower()}.soak.test",
            "mydomain = soak.test",
            "myorigin = soak.test",
            "mydestination =",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            # The relay passes its clients on with XCLIENT; they are on 127.0.0.1 too.
            f"smtpd_authorized_xclient_hosts = {HOST}",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup = no",
            # example.net (every soak recipient) goes to one Maildir, written as nobody;
            # virtual(8) adds Delivered-To: <recipient> to each copy it delivers.
            "virtual_mailbox_domains = example.net",
            f"virtual_mailbox_base = {self.mail_base}",
            "virtual_mailbox_maps = static:Maildir/",
            f"virtual_uid_maps = static:{nobody.pw_uid}",
            f"virtual_gid_maps = static:{nobody.pw_gid}",
            # Nothing else leaves (bounces to example.org included).
            "default_transport = error:5.7.1 the soak delivers nothing else",
            "relay_transport = error:5.7.1 the soak delivers nothing else",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            # Messages reach 5 MB and more with headers: room above that. Postfix
            # refuses to start when a mailbox limit is below message_size_limit;
            # 0 is no limit, for mbox and Maildir files alike.
            "message_size_limit = 20000000",
            "mailbox_size_limit = 0",
            "virtual_mailbox_limit = 0",
            # No header added for "local" clients (all are, on 127.0.0.1): the body
            # must arrive as sent (only Return-Path, X-Original-To, Delivered-To and
            # Received go in front of it).
            "local_header_rewrite_clients =",
            # A message deferred by a stop is retried within seconds, so the queue
            # drains at the end; a killed smtpd never throttles the service for long.
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 5s",
            "service_throttle_time = 5s",
        ]
        (self.config_dir / "main.cf").write_text("\n".join(main_cf) + "\n")
        (self.config_dir / "master.cf").write_text(POSTFIX_MASTER_CF.format(listen=f"{HOST}:{self.port}"))
        # Postfix re-reads a table file modified within the last second until it is
        # older than that (dict_load_file): every Postfix program would wait so.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    # -- life cycle --

    def alive(self):
        return self.reaper is not None and self.reaper.poll() is None

    def start(self, timeout=30):
        """postfix start, then wait for smtpd's 220 on the port."""
        last = ""
        for attempt in range(5):                # the port may linger a moment
            began = time.monotonic()
            self.reaper = subprocess.Popen([sys.executable, "-c", REAPER, POSTFIX, "-c", str(self.config_dir),
                                            "start"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           start_new_session=True)
            ready, _, _ = select.select([self.reaper.stdout], [], [], timeout)
            line = self.reaper.stdout.readline() if ready else b""
            self.reaper.stdout.close()
            report = json.loads(line or b'{"rc": -1, "output": "no word from postfix start"}')
            if report["rc"] == 0 and self.wait_greeting(began + timeout):
                self.starts += 1
                return
            last = report["output"].strip() or f"postfix start exited {report['rc']}"
            self.stop_postfix(fault=False)
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start on port {self.port}: {last}; see {self.log_path}")

    def wait_greeting(self, deadline):
        while time.monotonic() < deadline and self.alive():
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    s.settimeout(2)
                    if s.makefile("rb").readline().startswith(b"220 "):
                        s.sendall(b"QUIT\r\n")
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def master_pid(self):
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop_postfix(self, fault=True):
        """`postfix stop` (master SIGTERMs all of Postfix at once: sessions end
        mid-way) and wait until every Postfix process is gone; SIGKILL to master's
        process group if that takes over 30 s. The caller holds self.lock."""
        if self.reaper is None or self.reaper.poll() is not None:
            return
        if fault:
            self.kills.append(time.monotonic())
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        try:
            self.reaper.wait(30)
        except subprocess.TimeoutExpired:
            master = self.master_pid()
            if master:
                with contextlib.suppress(OSError):
                    os.killpg(master, signal.SIGKILL)
            stop_process(self.reaper, signal.SIGKILL, timeout=5)

    def restart(self, down):
        with self.lock:
            self.stop_postfix()
            time.sleep(down)
            self.start()

    def stop(self):
        with self.lock:
            self.stop_postfix(fault=False)

    # -- faults of its own --

    def busy_smtpds(self):
        """PIDs of this Postfix's smtpd processes that hold an established connection
        on its port (idle ones hold only the listening socket)."""
        master = self.master_pid()
        inodes = set()
        try:
            with open("/proc/net/tcp") as table:
                next(table)
                for row in table:
                    fields = row.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if local_port == self.port and fields[3] == "01":      # TCP_ESTABLISHED
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if comm == "smtpd" and ppid == master and open_files(entry) & inodes:
                pids.append(int(entry))
        return pids

    def kill_smtpd(self, rng, within=3.0):
        """SIGKILL one smtpd in a session with the relay (waiting up to `within` s for
        one) -> its pid, or None. master sees it die mid-session (no throttling: it had
        taken a connection) and spawns others as needed."""
        deadline = time.monotonic() + within
        with self.lock:
            while True:
                pids = self.busy_smtpds() if self.alive() else []
                if pids:
                    pid = rng.choice(sorted(pids))
                    self.kills.append(time.monotonic())
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                    return pid
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)

    # -- the queue --

    def queue(self):
        """The messages in its queue (postqueue -j: dicts with queue_name, queue_id, sender, ...)."""
        done = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"postqueue -j for {self.name} exited {done.returncode}: {done.stderr.strip()}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def flush(self):
        """postqueue -f: deferred mail is tried again now."""
        subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-f"], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)


class AuthService(Child):
    def __init__(self, workdir, backend_ports):
        super().__init__("auth", workdir)
        self.backend_ports = backend_ports

    def command(self):
        return [sys.executable, str(Path(__file__).resolve()), "--serve-auth",
                f"{self.port}:{','.join(map(str, self.backend_ports))}"]


class RelayProcess(Child):
    def __init__(self, name, kind, workdir, python, relay, options):
        super().__init__(f"relay-{name}", workdir)
        self.short, self.kind, self.python, self.relay, self.options = name, kind, python, relay, options
        self.samples = []       # (time, rss kB, threads, fds)
        self.died = None        # exit status if it died during the run

    def command(self):
        return [self.python, str(self.relay), "-c", os.devnull, "--listen", f"{HOST}:{self.port}",
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
        # id -> Counter of copies per recipient ("" for a smtp-sink dump, which
        # holds the whole transaction; the recipient's address for a Maildir file)
        self.copies = {}
        self.where = collections.defaultdict(list)     # id -> [(back-end, recipient, Postfix queue id)]
        self.corrupt = []
        self.unknown = []
        self.partial = 0
        self.dumps = 0
        self.maildir_files = 0
        self.seen = set()           # dump files read (with --keep they stay)
        self.sessions = 0
        self.session_errors = collections.Counter()

    def expect(self, msg_id, stored):
        with self.lock:
            self.expected[msg_id] = hashlib.sha256(stored).hexdigest()

    def record(self, msg_id, **fields):
        with self.lock:
            self.sent.setdefault(msg_id, {}).update(fields)

    def deliver(self, msg_id, body, backend, recipient="", queue_id=None):
        """One stored copy of msg_id whose message (from its first header line on) is body."""
        with self.lock:
            want = self.expected.get(msg_id)
            if want is None:
                self.unknown.append(msg_id)
            elif hashlib.sha256(body).hexdigest() != want:
                self.corrupt.append(msg_id)
            else:
                self.copies.setdefault(msg_id, collections.Counter())[recipient] += 1
                self.where[msg_id].append((backend, recipient, queue_id))


ID_RE = re.compile(rb"^X-Soak-Id: ([0-9a-f-]{36})$", re.M)
DELIVERED_TO_RE = re.compile(rb"^Delivered-To: (\S+)$", re.M)
POSTFIX_QUEUE_ID_RE = re.compile(rb"^\tby \S+ \(Postfix\) with \S+ id (\w+)", re.M)


# Why a dump is read only once smtp-sink has finished with it. smtp-sink
# (postfix smtpstone/smtp-sink.c) creates a dump with open(O_CREAT|O_EXCL)
# right after its 250 to MAIL, appends the message as it arrives, and closes
# it before it sends 250 to the end of data; an aborted transaction's file is
# unlinked before it is closed. A file read while smtp-sink still writes it
# looks cut short: counted as a partial dump and deleted, it would make an
# accepted message "lost" (and smtp-sink would finish it unseen). So:
#   - a dump is read only when no live smtp-sink process that may have written
#     it holds it open (/proc/PID/fd): then it is finished, whole or cut short
#     by a SIGKILL, and nothing writes it again (O_EXCL: no process reopens an
#     existing name);
#   - the directory is listed before the open files are looked at: a file
#     created in between is then not listed yet, rather than listed and not
#     seen open;
#   - every smtp-sink process dumps into a directory of its own, so its files
#     are judged against that process alone (not whichever process now serves
#     the port), and once it has been reaped everything in its directory is
#     final and is read to the end.
def collect_dumps(sink, ledger, keep=False):
    """Read, check and delete every finished dump of one sink."""
    for dumpdir, procs in list(sink.writers.items()):
        try:
            names = os.listdir(dumpdir)
        except OSError:
            continue
        live = [proc for proc in procs if proc.poll() is None]
        busy = set().union(*(open_files(proc.pid) for proc in live))
        for name in names:
            path = dumpdir / name
            # smtp-sink names dumps with 8 random hex digits, so a deleted file's name
            # comes back after some 10^5 files: only a kept file (--keep) is skipped as seen.
            if str(path) in busy or keep and path in ledger.seen:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue        # an aborted transaction, unlinked meanwhile
            if keep:
                ledger.seen.add(path)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            ledger.dumps += 1
            classify_dump(sink, data, ledger)
        if not live and dumpdir != sink.dumpdir and not keep:
            # Its processes are gone and it has been read to the end.
            with contextlib.suppress(OSError):
                dumpdir.rmdir()
                del sink.writers[dumpdir]


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
    ledger.deliver(msg_id, data[start:-1], sink.letter)


def collect_maildir(postfix, ledger, keep=False):
    """Read, check and delete every file in a Postfix's Maildir/new. virtual(8)
    writes a message into tmp/ and links it into new/ once whole, so whatever is
    in new/ is finished."""
    try:
        names = os.listdir(postfix.maildir_new)
    except OSError:
        return                  # no delivery yet
    for name in names:
        if keep and name in postfix.seen:
            continue
        path = postfix.maildir_new / name
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if keep:
            postfix.seen.add(name)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        ledger.maildir_files += 1
        classify_maildir(postfix, data, ledger)


def classify_maildir(postfix, data, ledger):
    """Return-Path, X-Original-To, Delivered-To and Postfix's Received come first,
    then the message as sent."""
    header = data[:data.find(b"\n\n") + 1]
    found, rcpt, queue_id = ID_RE.search(header), DELIVERED_TO_RE.search(header), POSTFIX_QUEUE_ID_RE.search(header)
    if not found or not rcpt:
        with ledger.lock:
            ledger.unknown.append(f"{postfix.name}: a Maildir file without X-Soak-Id or Delivered-To")
        return
    msg_id = found.group(1).decode()
    start = data.find(b"\nFrom: <soak-" + found.group(1)) + 1
    if start == 0 or not data.endswith(b"\nX-Soak-End: " + found.group(1) + b"\n"):
        with ledger.lock:
            ledger.corrupt.append(msg_id)
        return
    ledger.deliver(msg_id, data[start:], postfix.letter, rcpt.group(1).decode(),
                   queue_id.group(1).decode() if queue_id else None)


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
        # Resolved: /proc/PID/fd links name files by their real path, and collect_dumps
        # compares the two (a TMPDIR through a symlink would hide every open dump).
        self.workdir = Path(tempfile.mkdtemp(prefix="smtprelay-soak-")).resolve()
        self.workdir.chmod(0o755)      # smtp-sink runs as nobody
        self.ledger = Ledger()
        self.vanish_tokens = 0
        self.vanish_lock = threading.Lock()
        self.faults = collections.Counter()
        self.children = []          # everything started, stopped in reverse order at the end
        self.sinks = {}
        self.postfixes = {}
        self.relays = []
        self.auth = None
        self.collect_lock = threading.Lock()
        self.queue_left = {}        # Postfix -> messages still queued when the drain gave up
        self.drain_seconds = None
        self.failures = []
        self.interrupted = False

    # -- set-up and tear-down --

    def start(self):
        kinds = self.args.kinds
        python = relay_python()
        relay = self.args.relay
        if "smtp-sink" in kinds:
            if not os.access(SMTP_SINK, os.X_OK):
                raise SystemExit(f"{SMTP_SINK} is missing: apt-get install postfix")
            for letter in "ABCD":
                sink = Sink(letter, self.workdir)
                self.children.append(sink)
                sink.start()
                self.sinks[letter] = sink
            self.auth = AuthService(self.workdir, [self.sinks["C"].port, self.sinks["D"].port])
            self.children.append(self.auth)
            self.auth.start()
            # --no-xclient: smtp-sink offers XCLIENT without ADDR (see the docstring).
            self.relays.append(RelayProcess("failover", "smtp-sink", self.workdir, python, relay, [
                "--no-xclient", "--backend", f"{HOST}:{self.sinks['A'].port}",
                "--backend", f"{HOST}:{self.sinks['B'].port}"]))
            self.relays.append(RelayProcess("auth-http", "smtp-sink", self.workdir, python, relay, [
                "--no-xclient", "--auth-http", f"http://{HOST}:{self.auth.port}/auth",
                "--auth-http-timeout", "10"]))
        if "postfix" in kinds:
            if not os.access(POSTFIX, os.X_OK):
                raise SystemExit(f"{POSTFIX} is missing: apt-get install postfix")
            if os.geteuid() != 0:
                raise SystemExit("a private Postfix needs root (postfix start); or --kinds smtp-sink")
            for letter in "PQ":
                postfix = PostfixBackend(letter, self.workdir)
                self.children.append(postfix)
                postfix.start()
                self.postfixes[letter] = postfix
            self.relays.append(RelayProcess("postfix", "postfix", self.workdir, python, relay, [
                "--balance", "roundrobin", "--backend", f"{HOST}:{self.postfixes['P'].port}",
                "--backend", f"{HOST}:{self.postfixes['Q'].port}"]))
        for relay in self.relays:
            self.children.append(relay)
            relay.start()
            relay.sample()

    def backends(self):
        return [*self.sinks.values(), *self.postfixes.values()]

    def cleanup(self):
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as e:      # stop the others all the same
                print(f"stopping {child.name}: {type(e).__name__}: {e}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def collect(self):
        """Every finished dump and Maildir file, once (one collector at a time: the
        watcher's and the end's must not read the same file twice)."""
        with self.collect_lock:
            for sink in self.sinks.values():
                collect_dumps(sink, self.ledger, self.args.keep)
            for postfix in self.postfixes.values():
                collect_maildir(postfix, self.ledger, self.args.keep)

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
        self.ledger.record(msg_id, relay=relay.short, kind=relay.kind, size=len(wire), pipelined=pipelined,
                           outcome="not sent")
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
            # The recipients that got 250 (replies[0] is MAIL's): each must get a copy at Postfix.
            self.ledger.record(msg_id, rcpts=[r.strip("<>") for r, (code, _) in zip(rcpts, replies[1:])
                                              if code == 250])
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
        """faults(); if it fails (a back-end that will not start again), the run fails."""
        try:
            self.faults_run()
        except Exception as e:
            self.failures.append(f"the fault thread failed: {type(e).__name__}: {e}")
            self.stop.set()
            raise

    def faults_run(self):
        rng = random.Random(f"{self.args.seed}-faults")
        interval = self.args.fault_interval
        kinds = ["vanish", "sighup"]
        if self.sinks:
            kinds += ["backend", "backend", "backend-pair", "auth"]
        if self.postfixes:
            kinds += ["postfix", "postfix-pair", "smtpd-kill", "smtpd-kill"]
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
                self.faults[f"smtp-sink restart ({sink.letter})"] += 1
            elif kind == "backend-pair":
                a, b = self.sinks["A"], self.sinks["B"]
                with a.lock, b.lock:
                    a.kill()
                    b.kill()
                    time.sleep(down)
                    a.start()
                    b.start()
                self.faults["smtp-sink restart (A and B)"] += 1
            elif kind == "auth":
                self.auth.restart(down)
                self.faults["auth service restart"] += 1
            elif kind == "postfix":
                postfix = self.postfixes[rng.choice("PQ")]
                postfix.restart(down)
                self.faults[f"postfix stop/start ({postfix.letter})"] += 1
            elif kind == "postfix-pair":
                p, q = self.postfixes["P"], self.postfixes["Q"]
                with p.lock, q.lock:
                    p.stop_postfix()
                    q.stop_postfix()
                    time.sleep(down)
                    p.start()
                    q.start()
                self.faults["postfix stop/start (P and Q)"] += 1
            elif kind == "smtpd-kill":
                postfix = self.postfixes[rng.choice("PQ")]
                if postfix.kill_smtpd(rng):
                    self.faults[f"smtpd SIGKILL mid-session ({postfix.letter})"] += 1
                else:
                    self.faults[f"smtpd SIGKILL: no session at the time ({postfix.letter})"] += 1
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
            self.collect()
            for relay in self.relays:
                if relay.lock.acquire(blocking=False):      # not being restarted
                    try:
                        if relay.proc.poll() is not None and relay.died is None:
                            relay.died = relay.proc.returncode
                            self.failures.append(f"{relay.name} died with status {relay.died}")
                            self.stop.set()
                    finally:
                        relay.lock.release()
            for child in [*self.backends(), *([self.auth] if self.auth else [])]:
                if child.lock.acquire(blocking=False):      # not being restarted
                    try:
                        if not child.alive():
                            self.failures.append(f"{child.name} exited by itself; see {child.log_path}")
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
                delivered = len(self.ledger.copies)
            print(f"[{elapsed:5.0f}s] sent {len(self.ledger.sent)} accepted {accepted} "
                  f"delivered {delivered}", file=sys.stderr, flush=True)

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
        if self.postfixes:
            self.drain()
        time.sleep(0.5)         # smtp-sink closes its last files
        self.collect()
        for sink in self.sinks.values():
            sink.stop()
        self.collect()          # what the kill left: partial

    def drain(self):
        """Every Postfix up, and its queue empty (postqueue -j), before its Maildir is
        counted: a message still queued is neither delivered nor lost yet."""
        began = time.monotonic()
        deadline = began + self.args.drain_timeout
        for postfix in self.postfixes.values():
            try:
                with postfix.lock:
                    if not postfix.alive():
                        postfix.start()
                postfix.flush()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                self.failures.append(f"{postfix.name} for the drain: {e}")
        while True:
            self.collect()
            try:
                left = {p.name: p.queue() for p in self.postfixes.values()}
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                left = {"?": [{"queue_id": None, "error": str(e)}]}
            if not any(left.values()):
                break
            if time.monotonic() >= deadline:
                for name, messages in left.items():
                    if messages:
                        self.queue_left[name] = [
                            {"queue_id": m.get("queue_id"), "queue": m.get("queue_name"), "sender": m.get("sender"),
                             "reasons": sorted({r.get("delay_reason", "") for r in m.get("recipients", [])})}
                            for m in messages]
                        self.failures.append(f"{name}: {len(messages)} message(s) still queued "
                                             f"{self.args.drain_timeout:g} s after the run")
                break
            time.sleep(0.5)
        self.collect()          # what the last deliveries wrote
        self.drain_seconds = round(time.monotonic() - began, 1)

    # -- the report --

    def tally(self):
        """Per back-end kind: the counts of the docstring, and up to 5 ids of each kind of failure."""
        ledger = self.ledger
        kills = {kind: [t for b in self.backends() if b.kind == kind for t in b.kills] for kind in KINDS}
        kinds = {}
        for kind in [kind for kind in KINDS if any(r.kind == kind for r in self.relays)]:
            kinds[kind] = {"accepted": 0, "delivered": 0, "duplicates": 0, "lost": 0, "refused": 0,
                           "wrongly_delivered": 0, "unacknowledged_but_delivered": 0,
                           "reply_lost_at_backend_kill": 0,
                           **({"redelivered_by_postfix": 0} if kind == "postfix" else {}),
                           "examples": collections.defaultdict(list)}
        for msg_id, rec in ledger.sent.items():
            kind = rec.get("kind")
            k = kinds[kind]
            copies = ledger.copies.get(msg_id, collections.Counter())
            wanted = rec.get("rcpts", []) if kind == "postfix" else [""]
            outcome = rec.get("outcome")
            if copies:
                k["delivered"] += 1
            if outcome == "accepted":
                k["accepted"] += 1
                if not wanted or any(copies[r] == 0 for r in wanted):
                    k["lost"] += 1
                    k["examples"]["lost"].append(msg_id)
            elif outcome == "refused":
                k["refused"] += 1
                if copies:
                    reply, at = rec.get("reply", ""), rec.get("replied_at")
                    if (reply.startswith(BACKEND_LOST) and rec.get("stage") == "data" and at
                            and any(0 <= at - t <= KILL_RACE_WINDOW for t in kills[kind])):
                        k["reply_lost_at_backend_kill"] += 1
                    else:
                        k["wrongly_delivered"] += 1
                        k["examples"]["wrongly_delivered"].append((msg_id, reply))
            elif outcome in ("vanished", "no reply", "not sent") and copies:
                k["unacknowledged_but_delivered"] += 1
            twice = [r for r, n in copies.items() if n > 1]
            if twice:
                # Postfix: copies of one recipient from one queue file are Postfix's own
                # redelivery; from two queue files, the relay handed the message over twice.
                queue_ids = [q for _, r, q in ledger.where[msg_id] if r in twice]
                if kind == "postfix" and None not in queue_ids and len(set(queue_ids)) == 1:
                    k["redelivered_by_postfix"] += 1
                    k["examples"]["redelivered_by_postfix"].append((msg_id, queue_ids[0]))
                else:
                    k["duplicates"] += 1
                    k["examples"]["duplicates"].append((msg_id, ledger.where[msg_id]))
        for k in kinds.values():
            k["examples"] = {name: ids[:5] for name, ids in k["examples"].items()}
        return kinds, kills

    def report(self):
        ledger = self.ledger
        kinds, kills = self.tally()
        outcomes = collections.Counter(r.get("outcome") for r in ledger.sent.values())
        refusals = collections.Counter(
            f"{r.get('kind')}: " + (f"{r.get('reply', '')[:9]} at {r.get('stage')}"
                                    if r.get("reply", "")[:1].isdigit() else f"connection lost at {r.get('stage')}")
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
                    "kind": relay.kind,
                    "rss_kb": {"start": s[0][1], "end": s[-1][1], "max": max(x[1] for x in s)},
                    "threads": {"start": s[0][2], "end": s[-1][2], "max": max(x[2] for x in s)},
                    "fds": {"start": s[0][3], "end": s[-1][3], "max": max(x[3] for x in s)},
                    "samples": len(s)}
        total = {name: sum(k[name] for k in kinds.values())
                 for name in ("accepted", "delivered", "lost", "duplicates", "wrongly_delivered",
                              "unacknowledged_but_delivered", "reply_lost_at_backend_kill")}
        lost = [i for k in kinds.values() for i in k["examples"].get("lost", [])]
        ok = (not total["lost"] and not total["duplicates"] and not total["wrongly_delivered"]
              and not ledger.corrupt and not ledger.unknown and not self.failures and total["accepted"] > 0
              and all(k["accepted"] > 0 for k in kinds.values()) and not self.interrupted)
        return {
            "ok": ok,
            "seed": self.args.seed,
            "minutes": round((time.monotonic() - self.started) / 60, 2),
            "clients": self.args.clients,
            "relay": str(self.args.relay),
            "sessions": ledger.sessions,
            "messages_sent": len(ledger.sent),
            **total,
            "accepted_mb": round(sum(r["size"] for r in ledger.sent.values()
                                     if r.get("outcome") == "accepted") / 1e6, 1),
            "refused": outcomes["refused"],
            "refusals": dict(refusals.most_common()),
            "vanished_mid_data": outcomes["vanished"],
            "no_reply": outcomes["no reply"],
            "kinds": kinds,
            "dump_files": ledger.dumps,
            "partial_dumps": ledger.partial,
            "maildir_files": ledger.maildir_files,
            "postfix_drain_seconds": self.drain_seconds,
            "postfix_queue_left": self.queue_left,
            "corrupt": len(ledger.corrupt),
            "unknown": len(ledger.unknown),
            "lost_detail": [lost_detail(i, ledger.sent[i], kills[ledger.sent[i]["kind"]], self.relays,
                                        [b for b in self.backends() if b.kind == ledger.sent[i]["kind"]],
                                        ledger.where.get(i, []))
                            for i in lost[:5]],
            "examples": {"corrupt": ledger.corrupt[:5], "unknown": ledger.unknown[:5]},
            "faults": dict(sorted(self.faults.items())),
            "session_errors": dict(ledger.session_errors.most_common(8)),
            "relays": resources,
            "relay_logs": logs,
            "relay_exit_on_sigterm": getattr(self, "stopped_status", {}),
            "failures": self.failures,
            "interrupted": self.interrupted,
            "workdir": str(self.workdir) if self.args.keep else None,
        }


def lost_detail(msg_id, rec, kills, relays, backends, where):
    """What can be told of a lost message: its relay, its relay's log lines naming it,
    the nearest back-end kill or stop after its 250 (smtp-sink killed before its dump
    was whole would explain it), the copies that did arrive (Postfix: some recipients
    only?) and the Postfix maillog lines naming it."""
    at = rec.get("replied_at")
    after = [k - at for k in kills if at is not None and k >= at]
    relay = next((r for r in relays if r.short == rec.get("relay")), None)
    text = relay.log_path.read_text(errors="replace") if relay and relay.log_path.exists() else ""
    backend_log = []
    for backend in backends:
        if backend.kind == "postfix" and backend.log_path.exists():
            # The lines naming the id give its queue ids (cleanup's "QID: message-id=<id@...>");
            # those of the queue ids tell what became of each recipient (virtual's status=).
            lines = backend.log_path.read_text(errors="replace").splitlines()
            queue_ids = {m[1] for line in lines if msg_id in line
                         for m in [re.search(r": (\w+): (?:message-id|from)=", line)] if m}
            backend_log += [f"{backend.name}: {line}" for line in lines
                            if msg_id in line or any(f" {q}: " in line for q in queue_ids)][:12]
    return {"id": msg_id, "relay": rec.get("relay"), "size": rec.get("size"), "pipelined": rec.get("pipelined"),
            "reply": rec.get("reply"), "recipients": rec.get("rcpts"), "copies": where,
            "kill_after_s": round(min(after), 3) if after else None,
            "log": [line for line in text.splitlines() if msg_id in line][:5], "backend_log": backend_log}


def print_table(r):
    rows = [
        ("seed / minutes / clients", f"{r['seed']} / {r['minutes']} / {r['clients']}"),
        ("relay", r["relay"]),
        ("sessions", r["sessions"]),
        ("messages sent", r["messages_sent"]),
        ("accepted (250)", f"{r['accepted']}  ({r['accepted_mb']} MB)"),
        ("refused (4xx/5xx)", r["refused"]),
        ("vanished mid-DATA", r["vanished_mid_data"]),
        ("no reply seen", r["no_reply"]),
        ("CORRUPT / UNKNOWN", f"{r['corrupt']} / {r['unknown']}"),
    ]
    for kind, k in r["kinds"].items():
        rows.append((f"[{kind}] accepted / delivered", f"{k['accepted']} / {k['delivered']}"))
        rows.append((f"[{kind}] LOST / DUPLICATES", f"{k['lost']} / {k['duplicates']}"))
        rows.append((f"[{kind}] WRONGLY DELIVERED", k["wrongly_delivered"]))
        rows.append((f"[{kind}] unacknowledged but delivered", k["unacknowledged_but_delivered"]))
        rows.append((f"[{kind}] reply lost at back-end kill", k["reply_lost_at_backend_kill"]))
        if kind == "smtp-sink":
            rows.append((f"[{kind}] dump files / partial (killed sink)", f"{r['dump_files']} / {r['partial_dumps']}"))
        if kind == "postfix":
            rows.append((f"[{kind}] redelivered by Postfix", k["redelivered_by_postfix"]))
            rows.append((f"[{kind}] Maildir files", r["maildir_files"]))
            rows.append((f"[{kind}] queue drained in (s)", r["postfix_drain_seconds"]))
    for name, n in r["refusals"].items():
        rows.append((f"  refused: {name}", n))
    for name, n in r["faults"].items():
        rows.append((f"fault: {name}", n))
    for name, res in r["relays"].items():
        for what in ("rss_kb", "threads", "fds"):
            v = res[what]
            rows.append((f"relay {name} ({res['kind']}) {what} start/end/max",
                         f"{v['start']} / {v['end']} / {v['max']}"))
        log = r["relay_logs"][name]
        rows.append((f"relay {name} log ERROR / Traceback", f"{log['errors']} / {log['tracebacks']}"))
        rows.append((f"relay {name} exit on SIGTERM", r["relay_exit_on_sigterm"].get(name, "died")))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for name, n in r["session_errors"].items():
        print(f"  session ended by: {name}  x{n}")
    for kind, k in r["kinds"].items():
        for what, examples in k["examples"].items():
            if what != "lost":
                for example in examples:
                    print(f"  [{kind}] {what}: {example}")
    for d in r["lost_detail"]:
        print(f"  lost: {d['id']} via {d['relay']}, {d['size']} bytes, pipelined {d['pipelined']}, "
              f"reply {d['reply']!r}, recipients {d['recipients']}, copies {d['copies']}, "
              f"next back-end kill {d['kill_after_s']} s after the 250")
        for line in d["log"] + d["backend_log"]:
            print(f"    {line}")
    for name, messages in r["postfix_queue_left"].items():
        for m in messages[:5]:
            print(f"  still queued at {name}: {m}")
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
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="back-end kinds, comma-separated: smtp-sink, postfix (default both)")
    p.add_argument("--relay", type=Path, default=RELAY,
                   help="the smtprelay.py to run (default: the one beside contrib/)")
    p.add_argument("--drain-timeout", type=float, default=120,
                   help="seconds the Postfix queues get to empty after the run (default 120)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, dumps, Maildirs): every message stays on disk, "
                        "some GB a minute, so short runs only")
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
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.kinds or set(args.kinds) - set(KINDS):
        p.error(f"--kinds: a comma-separated choice of {', '.join(KINDS)}")
    args.relay = args.relay.resolve()
    if not args.relay.is_file():
        p.error(f"--relay {args.relay}: no such file")

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
