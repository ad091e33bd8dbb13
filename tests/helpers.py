"""Real processes for the tests: the relay under test and Postfix's smtp-sink.

The fixtures in conftest.py wrap these; `run_relay` is used directly by tests.
"""
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "smtprelay.py"
SMTP_SINK = "/usr/sbin/smtp-sink"
LISTENING = re.compile(r"listening on (?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^\s:\[\]]+)):(?P<port>\d+)")


def listeners_in(lines):
    """(host, port) of every `listening on HOST:PORT` log line, in order."""
    matches = [m for m in map(LISTENING.search, lines) if m]
    return [(m["v6"] or m["v4"], int(m["port"])) for m in matches]


def relay_env(extra=None):
    """os.environ without SMTPRELAY_* variables, updated with `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPRELAY_")}
    env.update(extra or {})
    return env


def relay_argv(config_path, listen, args):
    """The relay's command line: python smtprelay.py -c CONFIG [--listen LISTEN] *args."""
    argv = [sys.executable, str(RELAY), "-c", str(config_path)]
    if listen is not None:
        argv += ["--listen", listen]
    return argv + [str(a) for a in args]


def run_relay(*args, env=None, config=None, listen=None, timeout=20):
    """Run the relay to completion (for --check-config and bad-config tests).

    `config` is the config file's text (default: an empty file); `listen` adds
    `--listen LISTEN` before `args` (default: not added); `env` is added to the
    cleaned environment. Returns the CompletedProcess with text stdout/stderr.
    """
    with tempfile.TemporaryDirectory(prefix="smtprelay-") as tmp:
        config_path = Path(tmp, "smtprelay.conf")
        config_path.write_text(config or "")
        return subprocess.run(relay_argv(config_path, listen, args), env=relay_env(env),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)


class RelayProcess:
    """A running relay subprocess; a thread drains its stderr (and stdout) into `.lines`."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self.host = self.port = self.address = None
        self._cond = threading.Condition()
        self._eof = False
        self._clients = []
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _wait_lines(self, done, timeout):
        """Wait until done(lines) is truthy, stderr closes or timeout passes; return done's value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (result := done(self.lines)):
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return result

    def wait_for_log(self, pattern, timeout=5):
        """The first re.search match of `pattern` over past and future log lines.

        Raises AssertionError with the last 30 lines if none appears within
        `timeout` seconds (or the relay closes its stderr first).
        """
        rx = re.compile(pattern)
        match = self._wait_lines(lambda lines: next((m for m in map(rx.search, lines) if m), None), timeout)
        if match is None:
            tail = "\n".join(self.lines[-30:])
            raise AssertionError(f"no log line matching {rx.pattern!r} within {timeout}s "
                                 f"(relay exit code: {self.proc.poll()}); last lines:\n{tail}")
        return match

    def log_text(self):
        """All log lines so far, newline-joined."""
        with self._cond:
            return "\n".join(self.lines)

    @property
    def listeners(self):
        """(host, port) of every `listening on` line so far, in log order."""
        with self._cond:
            return listeners_in(self.lines)

    @property
    def ports(self):
        """Ports of all listeners logged so far."""
        return [port for _, port in self.listeners]

    def wait_listening(self, count, timeout=10):
        """Wait for `count` listening lines; fail the test with the log if the relay exits first."""
        if self._wait_lines(lambda lines: len(listeners_in(lines)) >= count, timeout):
            self.host, self.port = self.listeners[0]
            self.address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            return
        state = f"did not log {count} 'listening on' line(s) within {timeout}s"
        if self._eof:  # stderr closed: it is exiting
            try:
                state = f"exited with code {self.proc.wait(timeout=5)}"
            except subprocess.TimeoutExpired:
                state = "closed its stderr"
        pytest.fail(f"relay {state}; {self.proc.args}\nlog:\n{self.log_text()}", pytrace=False)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send `sig`, wait up to `timeout` s (then SIGKILL); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drainer.join(timeout)
        if not self._drainer.is_alive():
            self.proc.stdout.close()
        return self.proc.returncode

    def peak_rss_kb(self):
        """The relay's peak resident set size (VmHWM) in kB."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/PID/status")

    def smtp(self, timeout=10, **kwargs):
        """A smtplib.SMTP connected to the first listener (greeting read); closed at teardown."""
        client = smtplib.SMTP(self.host, self.port, timeout=timeout, **kwargs)
        self._clients.append(client)
        return client

    def connect(self, timeout=10):
        """A raw socket connected to the first listener; closed at teardown."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self._clients.append(sock)
        return sock

    def close_clients(self):
        for client in self._clients:
            client.close()


@dataclass
class SinkMessage:
    """One transaction captured by smtp-sink (see SmtpSink for the body format)."""
    client_addr: str
    client_proto: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str] = field(default_factory=list)
    body: bytes = b""
    path: Path | None = None

    @property
    def body_crlf(self):
        """The body with CRLF line ends: what was sent, unstuffed, if it had only CRLF line ends."""
        return self.body.replace(b"\n", b"\r\n")


def parse_sink_dump(data, path=None):
    """Parse one smtp-sink -d dump file into a SinkMessage."""
    headers = {"X-Rcpt-Args": []}
    pos = 0
    while True:
        end = data.index(b"\n", pos)
        line = data[pos:end].decode("utf-8", "surrogateescape")
        pos = end + 1
        if line.startswith("Received:"):
            break
        name, _, value = line.partition(": ")
        if name == "X-Rcpt-Args":
            headers[name].append(value)
        else:
            headers[name] = value
    for _ in range(2):  # smtp-sink's Received: header always has two continuation lines
        pos = data.index(b"\n", pos) + 1
    assert data.endswith(b"\n"), f"dump {path} lacks smtp-sink's final empty line"
    return SinkMessage(client_addr=headers["X-Client-Addr"], client_proto=headers["X-Client-Proto"],
                       helo=headers.get("X-Helo-Args"), mail_args=headers["X-Mail-Args"],
                       rcpt_args=headers["X-Rcpt-Args"], body=data[pos:-1], path=path)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:<free port>, dumping each transaction to its own file.

    Extra `flags` are passed through (e.g. "-f", "RCPT"). Note the start-up probe
    connection counts as one session (matters for -n / -q CONNECT and the like).

    Dump format, found by experiment (Postfix 3.7): the file appears at MAIL, is
    deleted if the transaction is aborted (RSET, disconnect), is
    flushed and closed before the 250 reply to "." and then kept. It holds
    X-Client-Addr, X-Client-Proto, X-Helo-Args (only after HELO/EHLO; XCLIENT
    attributes are ignored), X-Mail-Args, one X-Rcpt-Args per RCPT, a 3-line
    Received: header, the message, and one extra empty line.
    The message is NOT byte-exact: every line ends in LF (CRLF and bare LF both
    become LF), bare CRs are deleted ("a\\rb" -> "ab"), the leading dot of
    each line is removed (dot-unstuffed); NUL, 8-bit bytes and long lines
    (5000+ chars) are kept. SinkMessage.body is that message without the extra
    empty line; .body_crlf turns its LFs back into CRLFs.
    """

    def __init__(self, *flags, log_path):
        self.dumpdir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        user = []
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dumpdir, nobody.pw_uid, nobody.pw_gid)
            user = ["-u", "nobody"]
        self.log_path = log_path
        for _ in range(5):
            self.host, self.port = "127.0.0.1", free_port()
            self.address = f"{self.host}:{self.port}"
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [SMTP_SINK, *user, "-d", f"{self.dumpdir}/msg.", *flags, f"{self.address}", "64"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_accepting():
                return
        self.stop()
        raise AssertionError(f"smtp-sink did not start:\n{self.log()}")

    def _wait_accepting(self, timeout=5):
        """True once the port accepts a connection; False if smtp-sink exited (e.g. port taken)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self.proc.poll() is None
            except ConnectionRefusedError:
                pass
            try:
                self.proc.wait(timeout=0.01)  # doubles as the poll interval
                return False
            except subprocess.TimeoutExpired:
                pass
        self.stop()
        raise AssertionError(f"smtp-sink did not accept connections within {timeout}s:\n{self.log()}")

    def log(self):
        """smtp-sink's stdout+stderr so far."""
        return Path(self.log_path).read_text(errors="replace")

    def _open_files(self):
        """Paths smtp-sink has open right now (transactions in progress)."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        paths = set()
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:  # smtp-sink has exited
            return paths
        for fd in fds:
            try:
                paths.add(os.readlink(f"{fd_dir}/{fd}"))
            except FileNotFoundError:  # closed meanwhile
                pass
        return paths

    def messages(self):
        """Completed transactions as SinkMessages, oldest first (by dump file mtime)."""
        candidates = list(self.dumpdir.glob("msg.*"))
        in_progress = self._open_files()
        found = []
        for path in candidates:
            if str(path) in in_progress:
                continue
            try:
                found.append((path.stat().st_mtime_ns, path.name, path.read_bytes()))
            except FileNotFoundError:  # aborted transaction
                pass
        return [parse_sink_dump(data, self.dumpdir / name) for _, name, data in sorted(found)]

    def wait_for_messages(self, n, timeout=5):
        """All completed messages once there are at least `n`; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while len(found := self.messages()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"smtp-sink has {len(found)} message(s), wanted {n}; log:\n{self.log()}")
            time.sleep(0.01)  # smtp-sink signals nothing: poll the dump directory
        return found

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dumpdir, ignore_errors=True)
