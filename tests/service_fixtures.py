"""What the service tests share: a whole session on a socket, the Maildir it leaves, and `inetd`.

`inetd` starts a relay as inetd does, a connection as its fds 0, 1 and 2
(the relay's command line is the test's: the shipped units' and inetd
lines' own, or helpers.relay_command()'s). Import the fixture into a test
file with `from service_fixtures import inetd  # noqa: F401`.
"""
import secrets
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import SMTPClient, relay_env, send_message, stop_process

BODY = b"Subject: service test\r\n\r\nHello from the service tests.\r\n"
STORED_BODY = b"Subject: service test\n\nHello from the service tests.\n"   # the maildir keeps LF line ends


def deliver(sock, ehlo="client.example"):
    """A whole session on `sock`: greeting, EHLO, one message, QUIT; asserts that only SMTP replies came."""
    client = SMTPClient(sock)
    assert client.reply().code == 220
    assert client.say(f"EHLO {ehlo}").code == 250
    assert send_message(client, BODY).code == 250
    assert client.say("QUIT").code == 221
    assert client.rest() == b"", "bytes after the 221 reply"


def maildir_messages(maildir):
    """The messages in MAILDIR/new, as bytes."""
    new = Path(maildir, "new")
    return [path.read_bytes() for path in sorted(new.iterdir())] if new.exists() else []


def assert_delivered(maildir, count):
    messages = maildir_messages(maildir)
    assert len(messages) == count, f"{len(messages)} messages in {maildir}, wanted {count}"
    assert all(STORED_BODY in message for message in messages), messages


def tcp_connection():
    """(client, server) ends of one TCP connection on 127.0.0.1: the server end is what inetd hands over."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    return client, server


def write_config(directory, text):
    config = Path(directory, f"smtprelay-{secrets.token_hex(4)}.conf")
    config.write_text(text)
    return config


@pytest.fixture
def inetd():
    """start(argv, conn, stderr=None, env=None) -> Popen with `conn` as fds 0, 1 and 2 (stderr: fd 2 instead).

    The parent's copy of `conn` is closed, so the relay's end is the only
    one. Every process is stopped at teardown.
    """
    processes = []

    def start(argv, conn, stderr=None, env=None):
        proc = subprocess.Popen([str(a) for a in argv], stdin=conn, stdout=conn,
                                stderr=conn if stderr is None else stderr, env=relay_env(env))
        conn.close()
        processes.append(proc)
        return proc

    yield start
    for proc in processes:
        stop_process(proc, signal.SIGKILL)
