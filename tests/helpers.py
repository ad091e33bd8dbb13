"""Real processes for the tests (the relay under test, Postfix's smtp-sink) and what talks to them.

The fixtures in conftest.py wrap the processes; `run_relay` (a run to
completion) is used directly by tests. `wait_until` is the one way a
test polls for a condition. SMTPClient is the raw-socket SMTP client of
every test file; the small functions after it are what several test files
share.
"""
import base64
import contextlib
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
README = RELAY.with_name("README.md")
SMTP_SINK = "/usr/sbin/smtp-sink"
# A host name of exactly 255 octets (RFC 5321 §4.5.3.1.2's limit), in labels of 63.
HOST_255 = ".".join(["a" * 63] * 3 + ["b" * 63])
LISTENING = re.compile(r"listening on (?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^\s:\[\]]+)):(?P<port>\d+)")


def wait_for_count(read, n, timeout=5, what=lambda found: f"{len(found)} item(s)"):
    """read() -> a list, polled until it holds at least `n` items -> that list; AssertionError
    after `timeout` s, with what(the last list read) and the wanted count."""
    found = []

    def enough():
        found[:] = read()
        return len(found) >= n

    wait_until(enough, timeout, lambda: f"{what(found)}, wanted {n}")
    return found


def wait_until(condition, timeout=5, what="the condition"):
    """Poll condition() until it is truthy -> its value; fail the test naming `what` after `timeout` s.

    `what` says what was waited for (a callable giving that text is called at
    the timeout, e.g. to show a log as it is then). For what signals nothing
    (a file, /proc, a gauge, a port); an event that can be awaited (a log
    line, a reply, a back-end's message) is awaited instead.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {timeout}s")
        time.sleep(0.01)        # the poll interval
    return value


class PolledLog:
    """A server's log file, which signals nothing and so is polled (every 10 ms, wait_until).
    A subclass sets log_file (a Path) and log_name (for failures, e.g. "maillog")."""

    def log_text(self):
        """The log so far ("" if none yet)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self):
        return self.log_text().splitlines()

    def mark(self):
        """The number of log lines so far: pass it as `since` to wait_for_log and log_matches."""
        return len(self.log_lines())

    def wait_for_log(self, pattern, timeout=5, since=0):
        """The first re.search match of `pattern` in the log's lines from line `since` on;
        AssertionError with the log's last 30 lines if none within `timeout` s."""
        rx = re.compile(pattern)
        lines = []

        def found():
            lines[:] = self.log_lines()
            return next((m for m in map(rx.search, lines[since:]) if m), None)

        return wait_until(found, timeout, lambda: f"a {self.log_name} line matching {rx.pattern!r}; last lines:\n"
                                                   + "\n".join(lines[-30:]))

    def log_matches(self, pattern, since=0):
        """Every re.search match of `pattern` in the log's lines from `since` on, now."""
        rx = re.compile(pattern)
        return [m for m in map(rx.search, self.log_lines()[since:]) if m]


def listeners_in(lines):
    """(host, port) of every `listening on HOST:PORT` log line, in order."""
    matches = [m for m in map(LISTENING.search, lines) if m]
    return [(m["v6"] or m["v4"], int(m["port"])) for m in matches]


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Send `sig` to the Popen `proc` if it still runs, wait up to `timeout` s (then SIGKILL) -> its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def relay_env(extra=None):
    """os.environ without SMTPRELAY_* variables, updated with `extra` (a value None removes the variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPRELAY_")}
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}


def relay_command(constants=None):
    """The command that runs the relay: python smtprelay.py, as its __main__ does.

    With `constants` ({name: value}) it is python -c, which imports the module,
    sets each module attribute (e.g. BACKEND_HOLD_OFF) and runs main(argv):
    a module constant made short for a test, the module itself unchanged.
    """
    if not constants:
        return [sys.executable, str(RELAY)]
    settings = "".join(f"smtprelay.{name} = {value!r}; " for name, value in constants.items())
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(RELAY.parent)!r}); import smtprelay; "
                                  f"{settings}sys.exit(smtprelay.main(sys.argv[1:]))"]


def relay_argv(config_path, listen, args, constants=None):
    """The relay's command line: relay_command(constants) -c CONFIG [--listen LISTEN] *args."""
    argv = [*relay_command(constants), "-c", str(config_path)]
    if listen is not None:
        argv += ["--listen", listen]
    return argv + [str(a) for a in args]


def run_relay(*args, env=None, config=None, listen=None, timeout=20, text=True, wrapper=()):
    """Run the relay to completion (--check-config, --probe, bad configurations, --inetd on /dev/null).

    `config` is the config file's text (default: an empty file); `listen` adds
    `--listen LISTEN` before `args` (default: not added); `env` is added to the
    cleaned environment; `wrapper` goes before the relay's command line.
    Returns the CompletedProcess with stdout/stderr (text unless text=False).
    """
    with tempfile.TemporaryDirectory(prefix="smtprelay-") as tmp:
        config_path = Path(tmp, "smtprelay.conf")
        config_path.write_text(config or "")
        return subprocess.run([*map(str, wrapper), *relay_argv(config_path, listen, args)], env=relay_env(env),
                              stdin=subprocess.DEVNULL, capture_output=True, text=text, timeout=timeout)


class LoggedProcess:
    """A running subprocess; a thread drains its stderr (and stdout) into `.lines`."""

    name = "the process"

    def __init__(self, argv, env, stdout=None):
        """stdout: a file for the process's standard output; then only stderr is in `.lines`."""
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=stdout or subprocess.PIPE,
                                     stderr=subprocess.PIPE if stdout else subprocess.STDOUT)
        self.output = self.proc.stderr if stdout else self.proc.stdout     # what `.lines` come from
        self.lines = []
        self._cond = threading.Condition()
        self._eof = False
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self):
        for raw in self.output:
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
            raise AssertionError(f"{self.name}: no log line matching {rx.pattern!r} within {timeout}s "
                                 f"(exit code: {self.proc.poll()}); last lines:\n{tail}")
        return match

    def wait_for_count(self, pattern, n, timeout=10):
        """Wait until `n` log lines (past and future) match `pattern`; AssertionError with the log tail if not."""
        rx = re.compile(pattern)
        if not self._wait_lines(lambda lines: sum(1 for line in lines if rx.search(line)) >= n, timeout):
            tail = "\n".join(self.lines[-30:])
            raise AssertionError(f"{self.name}: fewer than {n} log lines matching {pattern!r} within {timeout}s "
                                 f"(exit code: {self.proc.poll()}); last lines:\n{tail}")

    def log_text(self):
        """All log lines so far, newline-joined."""
        with self._cond:
            return "\n".join(self.lines)


class RelayProcess(LoggedProcess):
    """A running relay subprocess, its log in `.lines`."""

    name = "the relay"

    def __init__(self, argv, env, stdout=None):
        super().__init__(argv, env, stdout)
        self.host = self.port = self.address = None
        self._clients = []

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
        stop_process(self.proc, sig, timeout)
        self._drainer.join(timeout)
        if not self._drainer.is_alive():
            self.output.close()
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

    def connect(self, timeout=10, source=None):
        """A raw socket connected to the first listener, from address `source` (127.0.0.x) if
        given; closed at teardown."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
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


def on_a_free_port(server, configure, start, failure, in_use):
    """Start a server of a test's on a free port, trying again (5 times in all) where
    start() raises `failure` with `in_use` in its text: the port was taken meanwhile.
    Sets server.port and server.address, calls configure() then start(); on another
    failure, or the fifth, calls server.stop() and raises the error."""
    for attempt in range(5):
        server.port = free_port()
        server.address = f"{server.host}:{server.port}"
        configure()
        try:
            return start()
        except failure as error:
            if in_use not in str(error) or attempt == 4:
                server.stop()
                raise


def greets(host, port, seconds, header=None):
    """One connection to a server of a test's: True where it greets with 220 within
    seconds (QUIT is sent then), else what it did instead, its first line or the error.
    header(sock) -> bytes to send first (a PROXY header)."""
    try:
        with socket.create_connection((host, port), timeout=seconds) as sock:
            if header:
                sock.sendall(header(sock))
            greeting = sock.makefile("rb").readline()
            if greeting.startswith(b"220 "):
                sock.sendall(b"QUIT\r\n")
                return True
            return greeting
    except (ConnectionRefusedError, ConnectionResetError, socket.timeout) as e:
        return e


def can_bind(host):
    """True if this host can listen on `host` (an IPv4 or IPv6 address), port 0."""
    try:
        with socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            return True
    except OSError:
        return False


def connection_refused(address):
    """True if a connection to `address` is refused: no listener has it open any more."""
    try:
        socket.create_connection(address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        pass        # queued on the listener as it closed: not yet
    return False


def wait_accepting(proc, host, port, timeout):
    """Wait until host:port accepts a TCP connection or the process `proc` exits.

    Returns True once a connection was accepted while `proc` still runs, False
    once `proc` has exited (e.g. the port was taken). Raises AssertionError
    ("... accepting connections: not within ...") after `timeout` seconds of neither.
    """
    def accepting_or_exited():
        try:
            socket.create_connection((host, port), timeout=1).close()
            return "running" if proc.poll() is None else "exited"
        except ConnectionRefusedError:
            return "exited" if proc.poll() is not None else None

    return wait_until(accepting_or_exited, timeout, f"{host}:{port} accepting connections") == "running"


@contextlib.contextmanager
def stopped_on_exit(make):
    """A fixture's factory: yields start(*args, **kwargs) -> make(*args, **kwargs).

    Everything start() made is stopped (its .stop() called, the last made
    first) when the with block ends.
    """
    with contextlib.ExitStack() as teardown:
        def start(*args, **kwargs):
            made = make(*args, **kwargs)
            teardown.callback(made.stop)
            return made

        yield start


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
            try:
                if wait_accepting(self.proc, self.host, self.port, timeout=5):
                    return
            except AssertionError as timeout:
                self.stop()
                raise AssertionError(f"smtp-sink: {timeout}:\n{self.log()}") from None
        self.stop()
        raise AssertionError(f"smtp-sink did not start:\n{self.log()}")

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
        found = []

        def enough():
            found[:] = self.messages()
            return len(found) >= n

        # smtp-sink signals nothing: poll the dump directory
        wait_until(enough, timeout, lambda: f"{len(found)} message(s) at smtp-sink, wanted {n}; log:\n{self.log()}")
        return found

    def stop(self):
        stop_process(self.proc, timeout=5)
        shutil.rmtree(self.dumpdir, ignore_errors=True)


# --- A raw SMTP client: exact bytes out, whole replies in ---------------------------

@dataclass
class Reply:
    """One whole SMTP reply: its code and the text of each line (after "250-" or "250 ")."""
    code: int
    lines: list[str]

    @property
    def text(self):
        """The code and the first line's text: "535 5.7.0 Bad recipient"."""
        return f"{self.code} {self.lines[0]}"

    def tuple(self):
        """(code, text) as smtplib gives them: the lines' text joined by LF, as bytes (byte for byte as sent)."""
        return self.code, "\n".join(self.lines).encode("utf-8", "surrogateescape")

    def __str__(self):
        return "\n".join(f"{self.code} {line}" for line in self.lines)


class ConnectionClosed(AssertionError):
    """The server closed the connection (EOF or reset) before a whole line came; args[0]: the bytes left unread."""

    def __str__(self):
        return f"connection closed; unread {self.args[0]!r}"


def codes(replies):
    """The code of each Reply, in order."""
    return [reply.code for reply in replies]


class SMTPClient:
    """An SMTP client on a plain (or TLS-wrapped) socket: sends exactly the bytes given, reads whole replies.

    Every line the server sends must end in CRLF and hold no other CR or LF;
    a reply's lines must all start with the same code, 200 to 599. Text is
    decoded as UTF-8, a byte that is none kept as a surrogate (see
    Reply.tuple). `nodelay` sets TCP_NODELAY: each write leaves at once.
    """

    def __init__(self, sock, nodelay=False):
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""

    def send(self, *writes):
        """Each argument (bytes) in its own sendall; the server may still read them as one."""
        for data in writes:
            self.sock.sendall(data)

    def _recv(self):
        """The next bytes from the server; b"" once it closed (or reset) the connection."""
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:    # closed with our unread bytes in its buffer
            return b""

    def line(self):
        """The next line the server sends, without its CRLF (ConnectionClosed if none comes)."""
        while (end := self.buf.find(b"\n")) < 0:
            chunk = self._recv()
            if not chunk:
                raise ConnectionClosed(self.buf)
            self.buf += chunk
        line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
        assert re.fullmatch(rb"[^\r\n]*\r\n", line), f"line not ended by CRLF alone: {line!r}"
        return line[:-2].decode("utf-8", "surrogateescape")

    def reply(self):
        """The next whole reply, multi-line ones included (RFC 5321 §4.2.1) -> Reply."""
        raw = []
        while not raw or raw[-1][3:4] == "-":
            try:
                line = self.line()
            except ConnectionClosed:
                assert not raw, f"connection closed in the middle of a reply: {raw}"
                raise
            assert re.fullmatch(r"[2-5]\d\d(?:[ -].*)?", line), f"not an SMTP reply line: {line!r}"
            assert not raw or line[:3] == raw[0][:3], f"code changed within a reply: {raw + [line]}"
            raw.append(line)
        return Reply(int(raw[0][:3]), [line[4:] for line in raw])   # "250" alone: text ""

    def say(self, command):
        """Send one command line (str or bytes; CRLF added) -> its Reply."""
        self.send(_command_line(command))
        return self.reply()

    def talk(self, *commands):
        """Send the command lines in one write (pipelined) -> their Replies, one each, in order."""
        self.send(b"".join(map(_command_line, commands)))
        return [self.reply() for _ in commands]

    def replies_until_closed(self):
        """Every Reply up to the server's closing the connection, which must not cut a line short."""
        replies = []
        while True:
            try:
                replies.append(self.reply())
            except ConnectionClosed as closed:
                assert not closed.args[0], f"closed after a partial line {closed.args[0]!r}"
                return replies

    def rest(self):
        """Everything the server still sends (bytes, unparsed) until it closes the connection."""
        data, self.buf = self.buf, b""
        while chunk := self._recv():
            data += chunk
        return data


def _command_line(command):
    """A command (str, encoded as UTF-8, or bytes) as sent: with CRLF."""
    return (command.encode("utf-8") if isinstance(command, str) else command) + b"\r\n"


def greeted(relay, timeout=10, ehlo=None, nodelay=False):
    """An SMTPClient connected to the relay's first listener, its 220 greeting read.

    With `ehlo` it has also said "EHLO <ehlo>" and got 250. `nodelay` as for SMTPClient.
    """
    client = SMTPClient(relay.connect(timeout=timeout), nodelay=nodelay)
    assert client.reply().code == 220
    if ehlo is not None:
        assert client.say(f"EHLO {ehlo}").code == 250
    return client


def begin_data(client, sender="a@example.org", recipient="b@example.net", mail_params=""):
    """MAIL FROM:<sender>mail_params, RCPT TO:<recipient> and DATA, answered 250, 250 and 354.

    What the client sends next is message data.
    """
    assert client.say(f"MAIL FROM:<{sender}>{mail_params}").code == 250
    assert client.say(f"RCPT TO:<{recipient}>").code == 250
    assert client.say("DATA").code == 354


def send_message(client, body, sender="a@example.org", recipient="b@example.net", mail_params=""):
    """begin_data, then `body` (already dot-stuffed) and ".\r\n" -> the Reply to the end of data."""
    begin_data(client, sender, recipient, mail_params)
    client.send(body + b".\r\n")
    return client.reply()


def send_data(client, body):
    """DATA answered 354, then `body` (already dot-stuffed) and ".\r\n" -> the Reply to the end of data."""
    assert client.say("DATA").code == 354
    client.send(body + b".\r\n")
    return client.reply()


def assert_closed(client):
    """The relay sends no more replies and closes the connection."""
    assert client.replies_until_closed() == []


# --- What several test files ask of a back-end session, the log, the auth service ------

def backend_args(*backends):
    """--backend ADDRESS for each back-end (with an .address, or a "HOST:PORT" string), in order."""
    return [a for b in backends for a in ("--backend", getattr(b, "address", b))]


def matching_lines(relay, pattern):
    """The relay's log lines so far in which `pattern` (a regex) is found."""
    rx = re.compile(pattern)
    return [line for line in relay.log_text().splitlines() if rx.search(line)]


def blocked_signals(pid, tid):
    """The signals thread `tid` of process `pid` blocks (SigBlk in its status)."""
    with open(f"/proc/{pid}/task/{tid}/status") as status:
        mask = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
    return {sig for sig in signal.Signals if mask >> (sig - 1) & 1}


def verbs(session):
    """The verbs a back-end session received, upper-cased, in order."""
    return [command.split(b" ", 1)[0].upper() for command in session.commands]


def xclient_attributes(session):
    """The relay's (last) XCLIENT line in a back-end session -> {NAME: value}, both str."""
    assert session.xclient is not None, f"no XCLIENT in {session.commands}"
    return dict(item.decode().split("=", 1) for item in session.xclient.split()[1:])


def session_id(relay, sock):
    """The relay's id for the session of a client socket (found by its source port in the log)."""
    port = sock.getsockname()[1]
    return relay.wait_for_log(rf"(\w+) connect from 127\.0\.0\.1:{port}$")[1]


def session_lines(relay, sid):
    """The log lines of session `sid`, once it has ended (its `disconnect from` line logged)."""
    relay.wait_for_log(rf"{sid} disconnect from")
    return [line for line in relay.log_text().splitlines() if f" {sid} " in line]


def b64(data):
    """Base64 of `data` (str, encoded as UTF-8, or bytes), as str."""
    return base64.b64encode(data.encode("utf-8") if isinstance(data, str) else data).decode()


def readme_block(first_line_pattern, containing=""):
    """The first indented block of README.md whose first line matches `first_line_pattern`
    and which holds `containing`, unindented."""
    lines = README.read_text().splitlines()
    for start, line in enumerate(lines):
        if re.match(first_line_pattern, line) and (start == 0 or not lines[start - 1].startswith("    ")):
            block = []
            for line in lines[start:]:
                if not line.startswith("    "):
                    break
                block.append(line[4:])
            text = "\n".join(block) + "\n"
            if containing in text:
                return text
    raise AssertionError(f"no README block starting {first_line_pattern!r} holds {containing!r}")
