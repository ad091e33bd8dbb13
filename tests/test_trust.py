"""Trust and bounds: XCLIENT fails closed, HELO names that fit XCLIENT, a
graceful stop, deadlines for whole replies and command lines, connection floods,
and the small points besides (README, "What it does"). Client names are in test_resolve.py.

The relay runs as a real subprocess between raw-socket clients and
ScriptedBackends, whose faults (a reply delayed, trickled or flooded) are
scripted; the auth service is contrib/auth_http_example.py in a thread, or a
raw listener trickling its answer. Nothing here sleeps to wait for an event:
tests wait for replies, log lines, back-end events and process exit; the few
sleeps pace a client on purpose.
"""
import errno
import itertools
import os
import re
import resource
import selectors
import signal
import socket
import threading
import time

import pytest

import smtprelay as relay_module  # the module; `smtprelay` here is the fixture

from auth_fixtures import always, auth_service, ok, raw_listener  # noqa: F401  (fixtures)
from auth_http_example import AuthHandler   # contrib/, put on sys.path by auth_fixtures
from helpers import (b64, begin_data, can_bind, greeted, killed_on_exit, send_message,
                     session_id, session_lines, verbs, xclient_attributes)
from tls_fixtures import tls  # noqa: F401  (fixture)

SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
BODY = b"Subject: trust\r\n\r\nhello\r\n"
SHUTTING_DOWN = f"421 4.3.2 {SERVER_NAME} Service shutting down, closing connection"
TIMED_OUT = f"421 4.4.2 {SERVER_NAME} Error: timeout exceeded"
NO_SERVER = "451 4.4.1"
LOST = "451 4.4.2 Error: mail server connection lost; try again later"
TOO_LONG = "501 5.5.2 Bad host name: too long"
XCLIENT_ORDER = ["ADDR", "PORT", "NAME", "REVERSE_NAME", "HELO", "PROTO", "LOGIN"]
NO_XCLIENT = ["PIPELINING", "SIZE 100000000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
ALL_XCLIENT = NO_XCLIENT + ["XCLIENT ADDR PORT NAME REVERSE_NAME HELO PROTO LOGIN"]
# A host name of exactly 255 octets (RFC 5321 §4.5.3.1.2's limit), in labels of 63.
HOST_255 = ".".join(["a" * 63] * 3 + ["b" * 63])


# --- Starting things -----------------------------------------------------------------

@pytest.fixture
def smtprelay(relay):
    """relay's factory with --server-name mx.test; SIGKILLed at teardown (stopping is tested with `relay`)."""
    with killed_on_exit(relay, "--server-name", SERVER_NAME) as start:
        yield start


def backend_args(*backends):
    return [a for b in backends for a in ("--backend", getattr(b, "address", b))]


def matching_lines(relay, pattern):
    rx = re.compile(pattern)
    return [line for line in relay.log_text().splitlines() if rx.search(line)]


def assert_closed(client):
    """The relay sends nothing more and closes the connection."""
    assert client.replies_until_closed() == []


def reply_text(client, command):
    return client.say(command).text


# --- 1. XCLIENT fails closed ------------------------------------------------------------

def test_backend_without_xclient_is_down_mail_gets_451_4_4_1_and_never_reaches_it(smtprelay, scripted_backend):
    backend = scripted_backend(extensions=NO_XCLIENT)
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    text = reply_text(client, "MAIL FROM:<a@example.org>")
    assert text.startswith(NO_SERVER + " "), text
    assert client.say("NOOP").code == 250          # the session goes on
    line = r.wait_for_log(r" ERROR .*does not offer XCLIENT").string
    assert "smtpd_authorized_xclient_hosts" in line
    assert backend.connections == 1
    assert not {b"MAIL", b"RCPT", b"DATA"} & set(verbs(backend.sessions[0]))
    assert backend.delivered == []


def test_backend_without_xclient_is_skipped_and_the_next_one_gets_the_mail(smtprelay, scripted_backend):
    first, second = scripted_backend(extensions=NO_XCLIENT), scripted_backend()
    r = smtprelay(*backend_args(first, second))
    client = greeted(r, ehlo=CLIENT_HELO)
    assert send_message(client, BODY).code == 250
    assert len(second.delivered) == 1 and first.delivered == []
    assert b"MAIL" not in verbs(first.sessions[0])
    assert xclient_attributes(second.sessions[0])["ADDR"] == "127.0.0.1"
    r.wait_for_log(r" ERROR .*does not offer XCLIENT.*smtpd_authorized_xclient_hosts")


def test_backend_without_xclient_named_by_the_auth_service_gives_451_4_4_1_at_the_first_rcpt(
        smtprelay, scripted_backend, auth_service):
    backend = scripted_backend(extensions=NO_XCLIENT)
    service = auth_service(always(*ok(backend)))
    r = smtprelay("--auth-http", service.url)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250     # ours until the first RCPT (nginx)
    text = reply_text(client, "RCPT TO:<b@example.net>")
    assert text.startswith(NO_SERVER + " "), text
    assert len(service.requests) == 1
    assert b"MAIL" not in verbs(backend.sessions[0])
    r.wait_for_log(r" ERROR .*does not offer XCLIENT.*smtpd_authorized_xclient_hosts")


@pytest.mark.parametrize("refusal", ["550 5.7.0 Error: insufficient authorization", "451 4.3.0 Try again",
                                     "501 5.5.4 Bad XCLIENT syntax", "251 2.0.0 Whatever"])
def test_backend_refusing_xclient_is_down_and_mail_gets_451_4_4_1(smtprelay, scripted_backend, refusal):
    backend = scripted_backend(replies={"XCLIENT": refusal})
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    text = reply_text(client, "MAIL FROM:<a@example.org>")
    assert text.startswith(NO_SERVER + " "), text
    line = r.wait_for_log(r" ERROR .*refused XCLIENT").string
    assert "smtpd_authorized_xclient_hosts" in line
    assert verbs(backend.sessions[0])[:2] == [b"EHLO", b"XCLIENT"]
    assert b"MAIL" not in verbs(backend.sessions[0])


def test_backend_refusing_the_ehlo_and_helo_after_xclient_is_down(smtprelay, scripted_backend):
    ehlo = "\r\n".join(f"250{'-' if last else ' '}{x}" for x, last in
                       zip(["scripted", *ALL_XCLIENT], [True] * len(ALL_XCLIENT) + [False]))
    backend = scripted_backend(replies={"EHLO": [ehlo, "554 5.7.1 Go away"], "HELO": "554 5.7.1 Go away"})
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    text = reply_text(client, "MAIL FROM:<a@example.org>")
    assert text.startswith(NO_SERVER + " "), text
    session = backend.sessions[0]
    assert verbs(session)[:3] == [b"EHLO", b"XCLIENT", b"EHLO"]
    assert b"MAIL" not in verbs(session)


def test_no_xclient_logs_one_warning_at_start_and_mail_flows_to_a_backend_without_xclient(
        smtprelay, scripted_backend):
    backend = scripted_backend(extensions=NO_XCLIENT)
    r = smtprelay(*backend_args(backend), "--no-xclient")
    lines = r.log_text().splitlines()        # as they stood when the relay was listening
    warnings = [i for i, line in enumerate(lines) if " WARNING " in line and "--no-xclient" in line]
    assert len(warnings) == 1, lines
    assert "mynetworks" in lines[warnings[0]]
    assert warnings[0] < next(i for i, line in enumerate(lines) if "listening on" in line)
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    assert len(backend.delivered) == 1 and backend.sessions[0].xclient is None


def test_default_xclient_logs_no_no_xclient_warning(smtprelay, scripted_backend):
    r = smtprelay(*backend_args(scripted_backend()))
    assert not matching_lines(r, r"WARNING .*--no-xclient"), r.log_text()


def test_maildir_backend_needs_no_xclient_and_takes_the_mail_with_xclient_on(smtprelay, tmp_path):
    r = smtprelay("--backend", f"maildir:{tmp_path / 'md'}", "--xclient")
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    assert len(list((tmp_path / "md" / "new").iterdir())) == 1
    assert not matching_lines(r, r" ERROR ")


def test_reverse_name_is_sent_when_offered_and_attributes_go_in_the_spec_order(smtprelay, scripted_backend):
    backend = scripted_backend(extensions=["PIPELINING", "XCLIENT LOGIN PROTO HELO REVERSE_NAME NAME PORT ADDR"])
    r = smtprelay(*backend_args(backend))
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    attributes = xclient_attributes(backend.sessions[0])
    assert list(attributes) == ["ADDR", "PORT", "NAME", "REVERSE_NAME", "HELO", "PROTO"]    # no login: no LOGIN
    assert attributes["REVERSE_NAME"] and attributes["HELO"] == CLIENT_HELO


def test_reverse_name_is_not_sent_when_not_offered(smtprelay, scripted_backend):
    backend = scripted_backend()        # XCLIENT NAME ADDR PORT PROTO HELO LOGIN
    r = smtprelay(*backend_args(backend))
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    assert list(xclient_attributes(backend.sessions[0])) == ["ADDR", "PORT", "NAME", "HELO", "PROTO"]


def xclient_after_login(smtprelay, scripted_backend, auth_service, user):
    """A 255-octet EHLO, AUTH PLAIN as `user` (the service says OK), MAIL -> the back-end's XCLIENT line (str)."""
    backend = scripted_backend(extensions=ALL_XCLIENT)
    service = auth_service(always(*ok(backend)))
    r = smtprelay("--auth-http", service.url, "--auth", "plain")
    client = greeted(r, ehlo=HOST_255)
    assert client.say("AUTH PLAIN " + b64(f"\0{user}\0password")).code == 235
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    line = backend.sessions[0].xclient.decode()
    return line, xclient_attributes(backend.sessions[0])


def assert_within_postfix_limits(line, attributes):
    assert len(line) + 2 <= 512, (len(line), line)
    assert all(len(v) <= 255 for v in attributes.values()), {k: len(v) for k, v in attributes.items()}
    assert list(attributes) == [k for k in XCLIENT_ORDER if k in attributes]
    assert attributes["HELO"] == HOST_255          # 255 octets, no xtext needed: kept whole
    assert attributes["ADDR"] == "127.0.0.1" and attributes["PROTO"] == "ESMTP"


def test_xclient_with_a_255_octet_helo_and_a_short_login_keeps_every_attribute(
        smtprelay, scripted_backend, auth_service):
    line, attributes = xclient_after_login(smtprelay, scripted_backend, auth_service, "alice")
    assert_within_postfix_limits(line, attributes)
    assert list(attributes) == XCLIENT_ORDER
    assert attributes["LOGIN"] == "alice"


def test_xclient_line_that_would_pass_512_octets_gives_up_the_names_then_the_login(
        smtprelay, scripted_backend, auth_service):
    # HELO 255 + LOGIN 250 cannot fit in 512 octets whatever the names are.
    line, attributes = xclient_after_login(smtprelay, scripted_backend, auth_service, "u" * 250)
    assert_within_postfix_limits(line, attributes)
    assert "LOGIN" not in attributes
    assert attributes["NAME"] == attributes["REVERSE_NAME"] == "[UNAVAILABLE]"


def test_xclient_login_whose_xtext_passes_255_octets_is_never_sent_that_long(
        smtprelay, scripted_backend, auth_service):
    line, attributes = xclient_after_login(smtprelay, scripted_backend, auth_service, "=" * 100)  # 300 in xtext
    assert_within_postfix_limits(line, attributes)


# --- 2. HELO/EHLO names that XCLIENT can carry ---------------------------------------

@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize("name", [HOST_255 + "c", "=" * 90, "=" * 86], ids=["256-octets", "90-equals", "86-equals"])
def test_helo_name_too_long_itself_or_in_xtext_gets_501_and_the_session_goes_on(smtprelay, tmp_path, verb, name):
    r = smtprelay("--backend", f"maildir:{tmp_path / 'md'}")
    client = greeted(r)
    assert client.say(f"{verb} {name}").text == TOO_LONG
    assert client.say(f"{verb} {CLIENT_HELO}").code == 250
    assert send_message(client, BODY).code == 250


@pytest.mark.parametrize("name, sent", [(HOST_255, HOST_255), ("=" * 85, "+3D" * 85)], ids=["255-plain", "85-equals"])
def test_helo_name_of_255_octets_after_xtext_is_taken_and_reaches_xclient_whole(
        smtprelay, scripted_backend, name, sent):
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend))
    client = greeted(r)
    assert client.say(f"EHLO {name}").code == 250
    assert send_message(client, BODY).code == 250
    assert xclient_attributes(backend.sessions[0])["HELO"] == sent
    assert len(sent) == 255


# --- 4. Stopping ------------------------------------------------------------------------

def test_sigterm_while_the_backend_is_slow_to_answer_the_end_of_data_passes_its_250_then_421_and_exits_0(
        relay, scripted_backend):
    # The case: the back-end answers the end of data after 4 s, past --timeout 2.
    backend = scripted_backend(delays={".": 4})
    r = relay(*backend_args(backend), "--timeout", "2", "--server-name", SERVER_NAME)
    client = greeted(r, ehlo=CLIENT_HELO)
    begin_data(client)
    client.send(BODY + b".\r\n")
    sent = time.monotonic()
    backend.wait_for_received(1)        # the whole message, terminator too, is at the back-end
    time.sleep(max(0.0, sent + 0.5 - time.monotonic()))    # the timing: SIGTERM 0.5 s after the "."
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
    assert send_message_data(busy).code == 250
    assert [x.text for x in busy.replies_until_closed()] == [SHUTTING_DOWN]
    assert r.proc.wait(timeout=20) == 0, r.log_text()
    assert not any(b"drain@example.org" in c for s in backend.sessions for c in s.commands)
    assert len(backend.delivered) == 1


def send_message_data(client):
    assert client.say("DATA").code == 354
    client.send(BODY + b".\r\n")
    return client.reply()


# --- 5. Deadlines and bounds -------------------------------------------------------------

LONG_MAIL_REPLY = "\r\n".join([f"250-2.1.0 line {n}" for n in range(50)] + ["250 2.1.0 Ok"])


@pytest.mark.parametrize("reply, trickle", [(LONG_MAIL_REPLY, ("line", 0.5)),
                                            ("250 2.1.0 Ok " + "x" * 80, (4, 0.5))], ids=["lines", "bytes"])
def test_backend_trickling_its_mail_reply_past_the_proxy_timeout_gives_451_4_4_2(
        smtprelay, scripted_backend, reply, trickle):
    # Each piece comes well within 2 s; the whole reply would take over 10 s.
    backend = scripted_backend(replies={"MAIL": reply}, trickle={"MAIL": trickle})
    r = smtprelay(*backend_args(backend), "--proxy-timeout", "2")
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    began = time.monotonic()
    text = reply_text(client, "MAIL FROM:<a@example.org>")
    elapsed = time.monotonic() - began
    assert text == LOST
    assert 1.5 <= elapsed < 8, elapsed
    backend.wait_for_sessions_closed(1)         # the broken connection is dropped
    assert client.say("NOOP").code == 250


@pytest.mark.parametrize("verb, expected", [("MAIL", LOST), ("EHLO", NO_SERVER), ("XCLIENT", NO_SERVER)])
def test_backend_flooding_a_reply_with_endless_lines_is_cut_off_in_bounded_memory(
        smtprelay, scripted_backend, verb, expected):
    backend = scripted_backend(flood={verb})
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    text = reply_text(client, "MAIL FROM:<a@example.org>")
    assert text.startswith(expected), text
    backend.wait_for_sessions_closed(1)
    assert backend.sessions[0].flooded > 0
    assert r.peak_rss_kb() < 200_000
    assert client.say("NOOP").code == 250


@pytest.mark.parametrize("lines, size, fits", [(100, 20, True), (101, 20, False), (10, 4000, True),
                                               (20, 4000, False)],
                         ids=["100-lines", "101-lines", "40-kB", "80-kB"])
def test_backend_reply_over_100_lines_or_64_kib_is_a_broken_backend(smtprelay, scripted_backend, lines, size, fits):
    reply = "\r\n".join([f"250-{'y' * size}"] * (lines - 1) + ["250 2.1.0 Ok"])
    backend = scripted_backend(replies={"MAIL": reply})
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    got = client.say("MAIL FROM:<a@example.org>")
    if fits:
        assert got.code == 250 and len(got.lines) == lines
    else:
        assert got.text == LOST
        backend.wait_for_sessions_closed(1)


def test_auth_service_trickling_its_answer_past_auth_http_timeout_gives_451_4_3_2(
        smtprelay, scripted_backend, raw_listener):
    backend = scripted_backend()
    answer = (b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
              b"Auth-Port: %d\r\nX-Padding: %s\r\nContent-Length: 0\r\n\r\n" % (backend.port, b"p" * 100))
    slow = raw_listener(answer, trickle=(8, 0.5))       # 8 bytes every 0.5 s: over 10 s for the whole answer
    r = smtprelay("--auth-http", slow.url, "--auth-http-timeout", "1")
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    began = time.monotonic()
    text = reply_text(client, "RCPT TO:<b@example.net>")
    elapsed = time.monotonic() - began
    assert text.startswith("451 4.3.2 "), text
    assert 0.9 <= elapsed < 6, elapsed
    assert backend.connections == 0
    assert client.say("NOOP").code == 250


def test_client_sending_a_byte_every_1_5_s_is_cut_by_timeout_while_another_client_is_served(
        smtprelay, scripted_backend):
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend), "--timeout", "2")
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


def test_idle_client_gets_421_4_4_2_after_timeout(smtprelay, tmp_path):
    r = smtprelay("--backend", f"maildir:{tmp_path / 'md'}", "--timeout", "2")
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
        smtprelay, scripted_backend, silent_after):
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend), "--timeout", "2")
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
        smtprelay, scripted_backend):
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend), "--timeout", "2")
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
    channel = relay_module.Channel(relay_module.Wire(accepted, first_read=2.0), timeout=2.0)
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


def test_session_threads_keep_the_handled_signals_out_so_they_all_reach_the_signals_thread(smtprelay, tmp_path):
    # A signal landing in a session's blocking recv() would restart its SO_RCVTIMEO.
    # Every thread blocks them; the kernel lifts them from the mask of the one
    # thread waiting for them in sigwaitinfo().
    r = smtprelay("--backend", f"maildir:{tmp_path / 'md'}")
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


@pytest.mark.parametrize("verb", ["EHLO", "MAIL", "RCPT", "DATA"])
def test_backend_silent_at_a_command_gives_451_after_the_proxy_timeout_and_the_session_goes_on(
        smtprelay, scripted_backend, verb):
    backend = scripted_backend(actions={verb: "hang"})
    r = smtprelay(*backend_args(backend), "--proxy-timeout", "2")
    client = greeted(r, ehlo=CLIENT_HELO, timeout=30)
    began = time.monotonic()
    replies = [client.say(command) for command in ["MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>",
                                                   "DATA"][:["EHLO", "MAIL", "RCPT", "DATA"].index(verb) or 1]]
    elapsed = time.monotonic() - began
    assert replies[-1].code == 451, replies[-1]
    assert 1.5 <= elapsed < 8, elapsed
    assert all(reply.code == 250 for reply in replies[:-1])
    assert client.say("NOOP").code == 250


def test_message_data_trickled_a_line_every_1_5_s_is_not_cut_by_timeout(smtprelay, scripted_backend):
    # DATA keeps a per-read timeout: the whole message may take longer than --timeout.
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend), "--timeout", "2")
    client = greeted(r, ehlo=CLIENT_HELO, nodelay=True)
    begin_data(client)
    lines = [b"Subject: slow\r\n", b"\r\n", b"line one\r\n", b"line two\r\n"]
    for line in lines:
        client.send(line)
        time.sleep(1.5)         # pacing the client, on purpose
    client.send(b".\r\n")
    assert client.reply().code == 250
    assert backend.delivered[0].raw == b"".join(lines)


# --- 6. Floods ------------------------------------------------------------------------

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
        with killed_on_exit(relay, "--backend", f"maildir:{tmp_path / 'md'}") as start:
            # The relay starts with the usual soft limit of 1024 and must raise it itself.
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
            try:
                r = start()
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


# --- 7. Small points -------------------------------------------------------------------

class V6AuthServer:
    """auth_http_example's handler on [::1]:<port 0>, answering with `policy`."""

    def __init__(self, policy):
        import http.server

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6

        self.server = Server(("::1", 0), AuthHandler)
        self.server.daemon_threads = True
        self.server.policy, self.server.verbose = policy, False
        self.server.requests, self.server.connections, self.server.lock = [], 0, threading.Lock()
        self.port = self.server.server_address[1]
        self.url = f"http://[::1]:{self.port}/auth"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_7a_auth_http_on_ipv6_loopback_sends_host_in_brackets(smtprelay, scripted_backend):
    if not can_bind("::1"):
        pytest.skip("this host has no IPv6 loopback (::1)")
    backend = scripted_backend()
    service = V6AuthServer(always(*ok(backend)))
    try:
        r = smtprelay("--auth-http", service.url)
        client = greeted(r, ehlo=CLIENT_HELO)
        assert send_message(client, BODY).code == 250
        with service.server.lock:
            [request] = service.server.requests
        assert dict(request)["Host"] == "[::1]"
    finally:
        service.stop()


@pytest.mark.parametrize("where", ["RCPT", "AUTH"])
def test_7b_auth_error_code_421_gives_that_reply_and_closes_the_session(smtprelay, auth_service, where):
    service = auth_service(always(("Auth-Status", "Try later"), ("Auth-Error-Code", "421 4.7.0")))
    r = smtprelay("--auth-http", service.url, *(["--auth", "none,plain"] if where == "AUTH" else []))
    client = greeted(r, ehlo=CLIENT_HELO)
    if where == "AUTH":
        reply = client.say("AUTH PLAIN " + b64("\0alice\0secret"))
    else:
        assert client.say("MAIL FROM:<a@example.org>").code == 250
        reply = client.say("RCPT TO:<b@example.net>")
    assert reply.text == "421 4.7.0 Try later"
    assert_closed(client)


def test_7c_del_in_the_auth_user_and_password_is_sent_as_percent_7f(smtprelay, scripted_backend, auth_service):
    backend = scripted_backend()
    service = auth_service(always(*ok(backend)))
    r = smtprelay("--auth-http", service.url, "--auth", "plain")
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("AUTH PLAIN " + b64("\0al\x7fice\0se\x7fcret")).code == 235
    [request] = service.requests
    assert (dict(request)["Auth-User"], dict(request)["Auth-Pass"]) == ("al%7Fice", "se%7Fcret")


def test_7d_debug_s_to_b_lines_escape_c1_control_characters(smtprelay, scripted_backend):
    # C0 and DEL never reach a back-end command (the relay refuses them in any
    # command); C1 may, in a quoted local part with SMTPUTF8.
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend), "--log-level", "debug")
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say('MAIL FROM:<"a\u0085b\u009bc"@example.org> SMTPUTF8').code == 250
    assert backend.sessions[0].commands[-1] == 'MAIL FROM:<"a\u0085b\u009bc"@example.org> SMTPUTF8'.encode()
    r.wait_for_log(r' S>B: MAIL FROM:<"a\\x85b\\x9bc"@example\.org> SMTPUTF8$')
    s_to_b = matching_lines(r, " S>B: ")
    assert s_to_b and not any(re.search("[\x00-\x1f\x7f-\x9f]", line) for line in s_to_b), s_to_b


def test_7e_quoted_local_part_holding_a_closing_bracket_is_accepted_and_passed_on(smtprelay, scripted_backend):
    backend = scripted_backend()
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say('RCPT TO:<"a>b"@d.example>').code == 250
    assert send_message_data(client).code == 250
    assert backend.delivered[0].rcpt_to == [b'RCPT TO:<"a>b"@d.example>']


@pytest.mark.parametrize("verb", ["RCPT", "."])
def test_7f_backend_reply_line_without_text_reaches_the_client_without_a_trailing_space(
        smtprelay, scripted_backend, verb):
    backend = scripted_backend(replies={verb: "250"})
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    client.send(b"RCPT TO:<b@example.net>\r\n")
    if verb == ".":
        assert client.reply().code == 250
        assert client.say("DATA").code == 354
        client.send(BODY + b".\r\n")
    assert client.line() == "250"


REFUSALS = {"MAIL": "550 5.7.1 Sender rejected", "RCPT": "550 5.1.1 No such user",
            "DATA": "554 5.5.1 No valid recipients"}


@pytest.mark.parametrize("verb", list(REFUSALS))
def test_7g_each_backend_refusal_gives_one_info_line(smtprelay, scripted_backend, verb):
    backend = scripted_backend(replies={verb: REFUSALS[verb]})
    r = smtprelay(*backend_args(backend))
    client = greeted(r, ehlo=CLIENT_HELO)
    sid = session_id(r, client.sock)
    for command in ["MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA"]:
        reply = client.say(command)
        if command.startswith(verb):
            assert reply.text == REFUSALS[verb]
            break
        assert reply.code == 250
    assert client.say("QUIT").code == 221
    lines = [line for line in session_lines(r, sid) if "refused" in line]
    assert len(lines) == 1, lines
    assert re.search(rf" INFO {sid} backend {re.escape(backend.address)} refused {verb}: "
                     rf"{re.escape(REFUSALS[verb])}$", lines[0]), lines[0]


@pytest.mark.parametrize("tls_mode, xclient", [("off", True), ("off", False), ("starttls", True), ("on", False)])
def test_7h_backend_connected_line_says_tls_and_xclient(smtprelay, scripted_backend, tls, tls_mode, xclient):
    context = tls.server_context(tls.backend)
    backend = scripted_backend(tls_context=context if tls_mode == "on" else None,
                               starttls_context=context if tls_mode == "starttls" else None)
    args = ["--backend-tls", tls_mode, "--backend-tls-ca", tls.ca_path] if tls_mode != "off" else []
    r = smtprelay(*backend_args(backend), *args, *([] if xclient else ["--no-xclient"]))
    client = greeted(r, ehlo=CLIENT_HELO)
    sid = session_id(r, client.sock)
    assert send_message(client, BODY).code == 250
    version = backend.sessions[0].tls_version
    assert (version is not None) == (tls_mode != "off")
    described = f"{f'TLS {version}' if version else 'no TLS'}, {'XCLIENT' if xclient else 'no XCLIENT'}"
    r.wait_for_log(rf" INFO {sid} backend {re.escape(backend.address)} connected \({described}\)$")
