"""Stopping: SIGTERM and SIGINT (README, Signals), wherever a session is when they come.

- The listeners close at once; a session between transactions gets 421
  4.3.2 and is closed; a session inside a transaction finishes its message
  (the back-end's reply to the end of data is waited for and passed on),
  then gets 421; a new MAIL in the drain gets 421. The relay exits 0, its
  last line "stopped".
- The signals reach the relay however busy it is: every thread keeps them
  blocked but the one waiting for them (sigwaitinfo), so a session's
  blocking recv() or a listener accepting never takes them.
- --inetd: the one session on stdin/stdout is drained as the daemon drains
  its sessions.
- A flood of signals: SIGHUP sent every ~20 us for 3 s from a tight loop in
  another process, then SIGTERM. The stop is not lost: the relay exits 0
  within a few seconds, writes no "Exception ignored ... wakeup fd" lines to
  stderr, and the sessions in flight meanwhile are served. SIGHUP alone
  never stops it (reloading is test_reload.py's subject).

Nothing here sleeps to wait for an event: the tests wait for the back-end's
having the whole message, for replies, for log lines, for exit; the one
sleep paces a signal on purpose.
"""
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import (SMTPClient, backend_args, begin_data, blocked_signals, codes, connection_refused, greeted,
                     relay_command, send_data, send_message, wait_until)
from service_fixtures import inetd, maildir_messages, tcp_connection, write_config  # noqa: F401

BODY = b"Subject: stop test\r\n\r\nHello from the stop tests.\r\n"
WAIT = 20       # seconds: the longest a reply or an exit is waited for (a loaded machine is slow)
SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
SHUTTING_DOWN = f"421 4.3.2 {SERVER_NAME} Service shutting down, closing connection"


# --- A relay with no session, an idle one, one inside a transaction -------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_with_no_clients_exits_0_promptly(relay, tmp_path, sig):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}")
    assert r.stop(sig, timeout=10) == 0, r.log_text()
    assert r.lines[-1].endswith("INFO stopped")
    assert "Traceback" not in r.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_mid_session_refuses_new_connections_but_lets_the_session_finish_its_message(
        relay, tmp_path, sig):
    mail = tmp_path / "mail"
    r = relay("--backend", f"maildir:{mail}")
    client = r.smtp()
    assert client.ehlo()[0] == 250
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt("b@example.org")[0] == 250

    r.proc.send_signal(sig)
    wait_until(lambda: connection_refused((r.host, r.port)), 5, f"{r.address} refusing connections after the signal")
    assert r.proc.poll() is None, "the relay exited with a session in flight"

    code, text = client.data(b"Subject: in flight\r\n\r\nsent after the signal\r\n")
    assert code == 250, text
    assert client.quit()[0] == 421          # the message done, the stop closes the session
    assert r.proc.wait(timeout=5) == 0, r.log_text()
    [message] = maildir_messages(mail)
    assert b"sent after the signal" in message


def keep_connecting(address, stop, connected):
    """Connect and close in a loop until `stop` is set or the listener refuses; counts in `connected`."""
    while not stop.is_set():
        try:
            socket.create_connection(address, timeout=2).close()
        except ConnectionResetError:
            continue
        except OSError:         # refused: the listener is closed
            return
        connected.release()


def test_a_stop_signal_is_acted_on_while_clients_keep_connecting(relay, tmp_path):
    # The failure this guards against showed when the kernel handed SIGTERM to the
    # thread busy accepting (in about half the runs under load). Every thread
    # blocks the handled signals but the one that waits for them (sigwaitinfo,
    # during which the kernel lifts them from its mask): that one takes them all.
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}")
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    threads = [int(tid) for tid in os.listdir(f"/proc/{r.proc.pid}/task")]
    taking = [tid for tid in threads if not handled <= blocked_signals(r.proc.pid, tid)]
    assert len(taking) == 1 and taking[0] != r.proc.pid, threads
    stop, connected = threading.Event(), threading.Semaphore(0)
    clients = [threading.Thread(target=keep_connecting, args=((r.host, r.port), stop, connected))
               for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for _ in range(20):
            assert connected.acquire(timeout=10), "the relay stopped taking connections"
        r.proc.send_signal(signal.SIGTERM)
        try:
            code = r.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            pytest.fail("SIGTERM not acted on within 5 s while clients kept connecting; last log lines:\n"
                        + "\n".join(r.lines[-3:]), pytrace=False)
        assert code == 0, r.log_text()
    finally:
        stop.set()
        for client in clients:
            client.join()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_a_session_thread_waits_in_a_transaction_stops_the_relay(relay, tmp_path, sig):
    # Every thread blocks the stop signals (a session's blocking recv() must not
    # take them), the main one too; the signal, sent to the process, stays
    # pending until the signals thread takes it, while a session thread waits
    # inside a transaction.
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}")
    client = r.smtp()
    assert client.ehlo("client.example")[0] == 250
    assert client.mail("a@example.org")[0] == 250
    threads = [int(tid) for tid in os.listdir(f"/proc/{r.proc.pid}/task")]
    assert len(threads) >= 4, "the relay runs no session thread"
    assert sum(sig not in blocked_signals(r.proc.pid, tid) for tid in threads) == 1     # the signals thread
    assert sig in blocked_signals(r.proc.pid, r.proc.pid)
    r.proc.send_signal(sig)
    assert client.rcpt("b@example.net")[0] == 250       # the transaction is finished first
    assert client.data(b"Subject: drained\r\n\r\nhello\r\n")[0] == 250
    try:
        code = r.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        r.proc.kill()
        pytest.fail(f"{sig.name} was not acted on within 5 s", pytrace=False)
    assert code == 0, r.log_text()
    assert len(maildir_messages(tmp_path / "mail")) == 1


def test_a_stop_signal_with_an_idle_client_closes_it_with_421_and_exits_0(relay, tmp_path):
    # --timeout 600: the client is let go by the stop, not by its idle timeout.
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", "--timeout", "600")
    client = r.smtp()
    assert client.noop()[0] == 250
    r.proc.send_signal(signal.SIGTERM)
    assert client.getreply()[0] == 421
    assert r.stop(signal.SIGTERM, timeout=10) == 0, r.log_text()


def test_sighup_does_not_stop_the_relay_which_keeps_serving(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}")
    assert signal.SIGHUP in blocked_signals(r.proc.pid, r.proc.pid)    # kept pending for the signals thread
    r.proc.send_signal(signal.SIGHUP)
    with smtplib.SMTP(r.host, r.port, timeout=10) as client:
        assert client.sendmail("a@example.org", ["b@example.org"], "Subject: test\r\n\r\nbody\r\n") == {}
    assert len(maildir_messages(tmp_path / "mail")) == 1
    assert r.proc.poll() is None
    # SIGHUP's default action would have ended it with -SIGHUP; SIGTERM after it gives 0
    assert r.stop() == 0, r.log_text()
    assert "Traceback" not in r.log_text()


def test_sigterm_while_the_backend_is_slow_to_answer_the_end_of_data_passes_its_250_then_421_and_exits_0(
        relay, scripted_backend):
    # The back-end answers the end of data after 4 s, past --timeout 2.
    backend = scripted_backend(delays={".": 4})
    r = relay(*backend_args(backend), "--timeout", "2", "--server-name", SERVER_NAME)
    client = greeted(r, ehlo=CLIENT_HELO)
    begin_data(client)
    client.send(BODY + b".\r\n")
    sent = time.monotonic()
    backend.wait_for_received(1)        # the whole message, terminator too, is at the back-end
    time.sleep(max(0.0, sent + 0.5 - time.monotonic()))    # pacing on purpose: SIGTERM 0.5 s after the "."
    r.proc.send_signal(signal.SIGTERM)
    reply = client.reply()
    assert reply.code == 250 and reply.lines[0].startswith("2.0.0 Ok: queued as SCRIPTED"), reply
    assert [x.text for x in client.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=20) == 0, r.log_text()
    assert len(backend.delivered) == 1
    assert sum(len(s.messages) for s in backend.sessions) == 1
    r.wait_for_log(r"stopped$")
    assert r.lines[-1].endswith("stopped"), r.lines[-3:]


def test_sigterm_gives_an_idle_session_421_at_once_and_the_relay_exits_0(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'md'}", "--server-name", SERVER_NAME)    # --timeout 60
    client = greeted(r, ehlo=CLIENT_HELO)
    began = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert [x.text for x in client.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=20) == 0, r.log_text()
    assert time.monotonic() - began < 10        # not the idle --timeout of 60 s
    assert r.lines[-1].endswith("stopped"), r.lines[-3:]


def test_sigterm_refuses_new_connections_while_a_transaction_finishes_then_421(relay, scripted_backend):
    backend = scripted_backend()
    r = relay(*backend_args(backend), "--server-name", SERVER_NAME)
    busy, idle = greeted(r, ehlo=CLIENT_HELO), greeted(r, ehlo=CLIENT_HELO)
    assert busy.say("MAIL FROM:<a@example.org>").code == 250
    assert busy.say("RCPT TO:<b@example.net>").code == 250
    r.proc.send_signal(signal.SIGTERM)
    assert [x.text for x in idle.replies_until_closed()] == [SHUTTING_DOWN]
    # The listeners closed at once: before any session heard of the stop.
    assert_not_served(r)
    assert r.proc.poll() is None, "exited with a transaction in flight"
    assert busy.say("DATA").code == 354
    busy.send(BODY + b".\r\n")
    assert busy.reply().code == 250
    assert [x.text for x in busy.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=20) == 0, r.log_text()
    assert len(backend.delivered) == 1


def assert_not_served(relay):
    """A new connection is refused, or reset before any greeting: no listener takes it any more."""
    try:
        sock = socket.create_connection((relay.host, relay.port), timeout=5)
    except (ConnectionRefusedError, ConnectionResetError):
        return
    with sock:
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            return
        assert data == b"", f"a new connection after SIGTERM got {data!r}"


def test_mail_during_the_drain_gets_421_and_the_close(relay, scripted_backend):
    backend = scripted_backend()
    r = relay(*backend_args(backend), "--server-name", SERVER_NAME)
    busy, other = greeted(r, ehlo=CLIENT_HELO), greeted(r, ehlo=CLIENT_HELO)
    for client in (busy, other):
        assert client.say("MAIL FROM:<a@example.org>").code == 250
        assert client.say("RCPT TO:<b@example.net>").code == 250
    r.proc.send_signal(signal.SIGTERM)
    r.wait_for_log(r"SIGTERM")
    # `other` leaves its transaction and starts a new one, in the drain.
    other.send(b"RSET\r\nMAIL FROM:<drain@example.org>\r\n")
    assert [x.text for x in other.replies_until_closed()] == ["250 2.0.0 Ok", SHUTTING_DOWN]
    assert send_data(busy, BODY).code == 250
    assert [x.text for x in busy.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=20) == 0, r.log_text()
    assert not any(b"drain@example.org" in c for s in backend.sessions for c in s.commands)
    assert len(backend.delivered) == 1


# --- Which thread takes the signals ---------------------------------------------------

def test_session_threads_keep_the_handled_signals_out_so_they_all_reach_the_signals_thread(relay, tmp_path):
    # A signal landing in a session's blocking recv() would restart its SO_RCVTIMEO.
    # Every thread blocks them; the kernel lifts them from the mask of the one
    # thread waiting for them in sigwaitinfo().
    r = relay("--backend", f"maildir:{tmp_path / 'md'}", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250     # a session thread waits in a transaction
    pid = r.proc.pid
    handled = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    masks = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            status = f.read()
        masks[int(task)] = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M)[1], 16)
    assert len(masks) >= 4          # main, signals, a listener, the session
    assert masks.pop(pid) & handled == handled          # the main thread keeps them out too
    assert sum(mask & handled == 0 for mask in masks.values()) == 1, masks     # the signals thread takes them
    assert sum(mask & handled == handled for mask in masks.values()) == len(masks) - 1, masks
    r.proc.send_signal(signal.SIGHUP)                   # and still does: the reload happens
    r.wait_for_log("configuration reloaded")
    assert client.say("RCPT TO:<b@example.net>").code == 250


# --- --inetd, and a flood of signals ---------------------------------------------------

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
            proc = inetd([*relay_command(), "-c", write_config(tmp_path, ""), "--inetd",
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
