"""--inetd on what is not a TCP connection: a UNIX stream socket and a pipe pair.

The README's `--inetd` serves one session on standard input and output. A
systemd socket unit with `ListenStream=/run/...` and `Accept=yes` hands the
relay a connected UNIX stream socket; SMTP typed by hand, as to
`sendmail -bs`, comes on a pipe (standard input) and goes out on another
(standard output). Here the relay runs with one end of a socket.socketpair()
as fds 0 and 1, or with subprocess pipes as fds 0 and 1; its stderr is a file.

Such a client has no IP address, and the relay must not make one up (its
own, or 127.0.0.1): it is passed on as Postfix's XCLIENT_README writes "no
value", `[UNAVAILABLE]`, in XCLIENT ADDR, PORT and NAME, and in the auth
service's Client-IP and Client-Host (nginx's auth_http headers). So it is
trusted no more than any remote client: a relay whose --allow-from lists
networks refuses it with 554.
"""
import os
import select
import signal
import socket
import subprocess

import pytest

from auth_fixtures import always, auth_service, ok  # noqa: F401  (fixture)
from tls_fixtures import tls  # noqa: F401  (fixture)
from helpers import SMTPClient, codes, relay_argv, relay_env, stop_process, xclient_attributes
from service_fixtures import assert_delivered, deliver, maildir_messages, write_config

UNAVAILABLE = "[UNAVAILABLE]"
WAIT = 20               # seconds: the longest any read or exit is waited for (a loaded machine is slow)
TRANSPORTS = ["unix-socket", "pipes"]


class PipeEnds:
    """The client's side of the relay's stdin and stdout pipes, as SMTPClient uses a socket."""

    def __init__(self, proc, timeout=WAIT):
        self.proc, self.timeout = proc, timeout

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.proc.stdin.fileno(), view):]

    def recv(self, size):
        """The next bytes the relay writes to its stdout; b"" once it closed it."""
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"nothing from the relay's stdout within {self.timeout}s")
        return os.read(self.proc.stdout.fileno(), size)

    def close(self):
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:     # BrokenPipeError: the relay is gone
                pass


class InetdRelay:
    """One `--inetd` relay: proc (Popen), client (the other end: a socket or PipeEnds), log()."""

    def __init__(self, argv, transport, stderr_path):
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            if transport.startswith("unix-socket"):
                self.client, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.client.settimeout(WAIT)
                with conn:
                    self.proc = subprocess.Popen(argv, stdin=conn, stdout=conn,
                                                 stderr=conn if transport == "unix-socket-as-stderr" else stderr,
                                                 env=relay_env())
            else:
                self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                             env=relay_env())
                self.client = PipeEnds(self.proc)

    def log(self):
        return self.stderr_path.read_text(errors="replace")

    def exit_code(self):
        """The relay's exit status, once it has exited (AssertionError if not within WAIT s)."""
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the --inetd relay still runs {WAIT}s after its session; log:\n{self.log()}")

    def deliver(self):
        """service_fixtures.deliver() on this relay: a whole session, one message; its stderr shown if it fails."""
        try:
            deliver(self.client)
        except (AssertionError, OSError) as e:
            try:
                status = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                status = "none yet"
            raise AssertionError(f"{e!r}; exit status {status}; the relay's stderr:\n{self.log()}") from e

    def stop(self):
        self.client.close()
        stop_process(self.proc, signal.SIGKILL)


@pytest.fixture
def inetd_relay(tmp_path):
    """start(transport, *args) -> InetdRelay running `smtprelay -c EMPTY --inetd *args` on that transport.

    transport: "unix-socket" (a socketpair end as fds 0 and 1), "unix-socket-as-stderr"
    (fd 2 too, as systemd's default StandardError=inherit gives it) or "pipes".
    Every relay is SIGKILLed (if still running) at teardown.
    """
    started = []

    def start(transport, *args):
        argv = relay_argv(write_config(tmp_path, ""), None, ["--inetd", *args])
        started.append(InetdRelay(argv, transport, tmp_path / f"relay-{len(started)}.stderr"))
        return started[-1]

    yield start
    for relay in started:
        relay.stop()


@pytest.mark.parametrize("transport", [*TRANSPORTS, "unix-socket-as-stderr"])
def test_inetd_on_a_unix_socket_or_a_pipe_pair_serves_a_whole_session_and_delivers(inetd_relay, tmp_path, transport):
    """README, --inetd: one session on stdin/stdout, then exit 0: whatever kind of stream they are.

    deliver() takes nothing but well-formed SMTP replies, and the client's
    no IP address is no reason to refuse it (the default --allow-from
    admits any client). With the socket as stderr too, no log line reaches
    the client.
    """
    maildir = tmp_path / "Maildir"
    relay = inetd_relay(transport, "--backend", f"maildir:{maildir}")
    relay.deliver()
    assert relay.exit_code() == 0, relay.log()
    assert_delivered(maildir, 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_without_an_address_is_passed_on_in_xclient_as_unavailable(inetd_relay, scripted_backend, transport):
    """Postfix XCLIENT_README: [UNAVAILABLE] is the value of an attribute that is not available.

    The client of a UNIX socket or a pipe has no address, port or name; the
    back-end must hear exactly that, never the relay's own address (which
    Postfix would trust as its own mynetworks). The message is delivered.
    """
    backend = scripted_backend()        # offers XCLIENT NAME ADDR PORT PROTO HELO LOGIN; --xclient is the default
    relay = inetd_relay(transport, "--backend", backend.address)
    relay.deliver()
    assert relay.exit_code() == 0, relay.log()
    assert len(backend.delivered) == 1, relay.log()
    session = next(s for s in backend.sessions if s.messages)
    attributes = xclient_attributes(session)
    assert {name: attributes.get(name) for name in ("ADDR", "PORT", "NAME")} == \
        {"ADDR": UNAVAILABLE, "PORT": UNAVAILABLE, "NAME": UNAVAILABLE}, session.xclient


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_without_an_address_is_asked_about_as_unavailable_client_ip_and_host(
        inetd_relay, scripted_backend, auth_service, transport):
    """nginx's auth_http headers Client-IP and Client-Host (README, the auth request): with no
    address to give, both are [UNAVAILABLE]; the service's OK then routes the message."""
    backend = scripted_backend()
    auth = auth_service(always(*ok(backend)))
    relay = inetd_relay(transport, "--auth-http", auth.url)
    relay.deliver()
    assert relay.exit_code() == 0, relay.log()
    assert auth.requests, relay.log()
    for request in auth.requests:
        headers = {name.lower(): value for name, value in request}
        assert (headers.get("client-ip"), headers.get("client-host")) == (UNAVAILABLE, UNAVAILABLE), request
    assert len(backend.delivered) == 1, relay.log()


@pytest.mark.parametrize("network", ["10.0.0.0/8", "127.0.0.0/8"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_allow_from_refuses_a_client_without_an_address_with_554(inetd_relay, tmp_path, transport, network):
    """README, --allow-from: clients outside the networks listed get 554 and are closed.

    A client with no address is in no network, a loopback one included:
    it is trusted no more than a remote client, so it gets 554 instead of
    the greeting, and nothing is delivered.
    """
    maildir = tmp_path / "Maildir"
    relay = inetd_relay(transport, "--allow-from", network, "--backend", f"maildir:{maildir}")
    replies = SMTPClient(relay.client).replies_until_closed()
    assert codes(replies) == [554], relay.log()
    relay.exit_code()
    assert maildir_messages(maildir) == []


def test_starttls_is_neither_offered_nor_taken_on_pipes(inetd_relay, tmp_path, tls):
    """RFC 3207 §4: STARTTLS is offered only where it can be done; TLS needs a socket, so a
    client on pipes sees no STARTTLS in EHLO and hears 502 for it, and its session goes on."""
    relay = inetd_relay("pipes", "--backend", f"maildir:{tmp_path / 'Maildir'}", "--starttls", "on",
                        "--tls-cert", tls.server.cert_path, "--tls-key", tls.server.key_path)
    client = SMTPClient(relay.client)
    assert client.reply().code == 220
    ehlo = client.say("EHLO client.example")
    assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines
    assert client.say("STARTTLS").code == 502
    assert client.say("NOOP").code == 250
    assert client.say("QUIT").code == 221
    assert relay.exit_code() == 0, relay.log()
