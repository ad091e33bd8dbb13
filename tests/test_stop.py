"""Stopping, as the README's "Signals" section promises it, where it is hardest to keep.

- --inetd: the one session on stdin/stdout is drained as the daemon drains
  its sessions. SIGTERM or SIGINT while the back-end is still answering the
  end of data: the client hears the back-end's 250 for its message, then
  421, and the relay exits 0 (a message neither lost nor sent twice).
- A flood of signals: SIGHUP sent every ~20 us for 3 s from a tight loop in
  another process, then SIGTERM. The stop is not lost: the relay exits 0
  within a few seconds, writes no "Exception ignored ... wakeup fd" lines to
  stderr, and the sessions in flight meanwhile are served.

Nothing here sleeps to wait for an event: the tests wait for the back-end's
having the whole message, for replies, for the flooder's word, for exit.
"""
import signal
import subprocess
import sys
import time

import pytest

from helpers import SMTPClient, begin_data, codes, greeted, send_message
from test_service import RELAY_COMMAND, inetd, maildir_messages, tcp_connection, write_config  # noqa: F401

BODY = b"Subject: stop test\r\n\r\nHello from the stop tests.\r\n"
WAIT = 20       # seconds: the longest a reply or an exit is waited for (a loaded machine is slow)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_inetd_stopped_while_the_backend_answers_the_end_of_data_passes_on_its_250_then_421_and_exits_0(
        inetd, scripted_backend, tmp_path, sig):
    """README, Signals: a session inside a transaction finishes its message (the back-end's reply
    to the end of data is waited for and passed on), then gets 421; exit 0 once it has ended.

    With --inetd (README: one session on stdin/stdout) the one session is
    that session: the signal comes once the back-end has the whole message,
    terminator included, and takes 3 s to answer it.
    """
    backend = scripted_backend(delays={".": 3})
    stderr_path = tmp_path / "relay.stderr"
    sock, conn = tcp_connection()
    with sock:
        with open(stderr_path, "wb") as stderr:     # fds 0 and 1 the client's socket, fd 2 a file
            proc = inetd([*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--inetd",
                          "--backend", backend.address], conn, stderr=stderr)
        sock.settimeout(WAIT)
        client = SMTPClient(sock)
        assert client.reply().code == 220
        assert client.say("EHLO client.example").code == 250
        begin_data(client)
        client.send(BODY + b".\r\n")
        backend.wait_for_received(1, timeout=WAIT)     # the terminator is at the back-end
        proc.send_signal(sig)
        try:
            reply = client.reply()
        except AssertionError as e:     # ConnectionClosed: the relay is gone without an answer
            raise AssertionError(f"{e}; exit status {proc.wait(timeout=WAIT)}; stderr:\n{stderr_path.read_text()}")
        assert reply.code == 250 and reply.lines[0].startswith("2.0.0 Ok: queued as SCRIPTED"), reply
        assert codes(client.replies_until_closed()) == [421], stderr_path.read_text()
        assert proc.wait(timeout=WAIT) == 0, stderr_path.read_text()
    assert len(backend.delivered) == 1
    assert sum(len(session.messages) for session in backend.sessions) == 1


# SIGHUP to the pid argv[1] every ~20 us, as fast as a loop can, until at
# least argv[2] seconds have passed and a line came on stdin; then SIGTERM.
# It says "flooding" once the first SIGHUP is sent, and at the end how many.
FLOODER = r"""
import os, select, signal, sys, time
pid, minimum = int(sys.argv[1]), float(sys.argv[2])
began, sent = time.monotonic(), 0
try:
    os.kill(pid, signal.SIGHUP)
    sent = 1
    print("flooding", flush=True)
    last = time.perf_counter()
    while True:
        while time.perf_counter() - last < 20e-6:
            pass
        last = time.perf_counter()
        os.kill(pid, signal.SIGHUP)
        sent += 1
        if sent % 256 == 0:
            elapsed = time.monotonic() - began
            if elapsed > 60 or (elapsed >= minimum and select.select([0], [], [], 0)[0]):
                break
    os.kill(pid, signal.SIGTERM)
    print(f"sent {sent} SIGHUP in {time.monotonic() - began:.1f}s, then SIGTERM", flush=True)
except ProcessLookupError:
    print(f"the relay was gone after {sent} SIGHUP", flush=True)
"""


def test_sigterm_after_a_flood_of_sighup_stops_the_relay_and_sessions_in_flight_are_served(relay, tmp_path):
    """README, Signals: SIGTERM stops the relay (sessions between transactions get 421, exit 0);
    SIGHUP only reads the configuration again. However many SIGHUPs came first, the SIGTERM
    right behind them is a stop, and no signal's bookkeeping spills onto stderr."""
    maildir = tmp_path / "Maildir"
    r = relay("--backend", f"maildir:{maildir}")
    before = greeted(r, timeout=WAIT, ehlo="client.example")       # in a transaction when the flood begins
    assert before.say("MAIL FROM:<a@example.org>").code == 250
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(r.proc.pid), "3"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert flooder.stdout.readline() == b"flooding\n"
        # During the flood: the transaction goes on, a new session comes and goes through.
        assert before.say("RCPT TO:<b@example.net>").code == 250
        assert before.say("DATA").code == 354
        before.send(BODY + b".\r\n")
        assert before.reply().code == 250
        during = greeted(r, timeout=WAIT, ehlo="client.example")
        assert send_message(during, BODY).code == 250
        flooder.stdin.write(b"stop\n")      # the flood ends once it has lasted 3 s, with SIGTERM
        flooder.stdin.close()
        report = flooder.stdout.read().decode()
        flooder.wait(timeout=WAIT)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
        flooder.stdout.close()
        if not flooder.stdin.closed:
            flooder.stdin.close()
    assert report.startswith("sent "), report
    assert int(report.split()[1]) >= 1000, report      # it was a flood: 3 s of it
    stopped = time.monotonic()
    try:
        code = r.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the relay still runs 15 s after SIGTERM ({report.strip()}); last lines:\n"
                    + "\n".join(r.lines[-10:]))
    assert code == 0, f"exit status {code} after {time.monotonic() - stopped:.1f}s"
    for client in (before, during):     # both between transactions: 421 each
        assert codes(client.replies_until_closed()) == [421]
    r.stop()        # (it has exited) every line of its stderr read
    log = r.log_text()
    assert "Exception ignored" not in log and "wakeup fd" not in log, \
        [line for line in log.splitlines() if "Exception ignored" in line or "wakeup fd" in line][:5]
    assert len(maildir_messages(maildir)) == 2
