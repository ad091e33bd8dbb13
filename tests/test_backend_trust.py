"""What the relay takes from a back-end and passes on: replies only in step, XCLIENT fails closed (only
with ADDR, a back-end without it or refusing it is down, never sent mail) and carries what fits
Postfix's limits, no control characters toward the auth service, and a lone back-end taken back as
soon as it answers.

Real processes and sockets throughout: the relay as a subprocess, ScriptedBackend
(which can send a reply nobody asked for in the same write as an honest one),
Postfix's smtp-sink, a raw listener standing in for the auth service (it keeps
the request head byte for byte), and LateBackend below: an SMTP server whose
port refuses connections until the test brings it up, with no other process
able to take the port meanwhile.
"""
import re
import socketserver
import threading
import time

import pytest

from auth_fixtures import always, auth_service, ok, raw_listener  # noqa: F401  (fixtures)
from helpers import (HOST_255, b64, backend_args, greeted, matching_lines, run_relay, send_message, session_id, verbs,
                     xclient_attributes)
from scripted_backend import ThreadingServer

SENDER, RECIPIENT = "a@example.org", "b@example.net"
FIRST_BODY = b"Subject: first\r\n\r\nThe back-end says 554 to this one.\r\n"
SECOND_BODY = b"Subject: second\r\n\r\nThis one goes through.\r\n"
MAIL_REPLY = "250 2.1.0 Sender ok"          # what the scripted back-end answers MAIL, and only MAIL
CLIENT_HELO = "client.example"
BODY = b"Subject: trust\r\n\r\nhello\r\n"
NO_SERVER = "451 4.4.1"
XCLIENT_ORDER = ["ADDR", "PORT", "NAME", "REVERSE_NAME", "HELO", "PROTO", "LOGIN"]
NO_XCLIENT = ["PIPELINING", "SIZE 100000000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
ALL_XCLIENT = NO_XCLIENT + ["XCLIENT ADDR PORT NAME REVERSE_NAME HELO PROTO LOGIN"]


# --- A back-end that comes up late -------------------------------------------------

class _LateSMTPHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for the relay's default --xclient: EHLO offers XCLIENT with ADDR."""

    timeout = 30        # no session lives forever

    def handle(self):
        write = self.wfile.write        # unbuffered: each reply leaves at once
        try:
            write(b"220 late ESMTP\r\n")
            while line := self.rfile.readline(4096):
                verb = line.split(None, 1)[0].upper() if line.strip() else b""
                if verb == b"EHLO":
                    write(b"250-late\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                          b"250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n")
                elif verb == b"XCLIENT":
                    write(b"220 late ESMTP\r\n")        # Postfix greets anew after XCLIENT
                elif verb == b"DATA":
                    write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = []
                    while (line := self.rfile.readline(100000)) != b".\r\n":
                        if not line:
                            return
                        data.append(line)
                    self.server.messages.append(b"".join(data))
                    write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    write(b"221 2.0.0 Bye\r\n")
                    return
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    write(b"250 2.0.0 Ok\r\n")
                else:
                    write(b"502 5.5.2 Error: command not recognized\r\n")
        except OSError:
            pass


class _ReservingServer(ThreadingServer):
    # No SO_REUSEADDR: while nothing listens, no other socket may bind the port either.
    allow_reuse_address = False


class LateBackend:
    """An SMTP server on 127.0.0.1 whose port is bound from the start but refuses
    connections (nothing listens) until come_up(); then it serves, and keeps each
    message it accepted in `messages` (bytes up to the terminator, dot-stuffing intact)."""

    def __init__(self):
        self.server = _ReservingServer(("127.0.0.1", 0), _LateSMTPHandler, bind_and_activate=False)
        self.server.server_bind()       # the port is ours; without listen() a connection is refused
        self.server.messages = self.messages = []
        self.host, self.port = self.server.server_address
        self.address = f"{self.host}:{self.port}"
        self.thread = None

    def come_up(self):
        self.server.server_activate()   # listen(): connections are accepted from now on
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread:
            self.server.shutdown()
            self.thread.join(5)
        self.server.server_close()


@pytest.fixture
def late_backend():
    """Factory start() -> a LateBackend, still refusing connections; all stopped at teardown."""
    made = []

    def start():
        made.append(LateBackend())
        return made[-1]

    yield start
    for backend in made:
        backend.stop()


# --- Replies in step ------------------------------------------------------------------

def test_a_reply_sent_unasked_behind_the_354_never_answers_the_end_of_data(relay, scripted_backend):
    """RFC 5321 §4.2: every command generates exactly one reply, so a reply that
    arrives with the 354, before the end of data was sent, answers nothing. The
    README's "Replies in step": bytes a back-end sends before a command went out
    (an unasked 250 behind its 354) make it broken, the client hears 451, the
    connection is dropped without the end of data. Here the back-end's real answer
    to the end of data would be 554, so the client must get 451 for the message,
    never the stray 250 (the README: 250 only after the back-end said it); the
    back-end never sees the terminator; and the next transaction, on a fresh
    back-end connection, is in step again (its MAIL gets the back-end's reply to
    MAIL, passed on verbatim as the README says)."""
    backend = scripted_backend(replies={"MAIL": MAIL_REPLY,
                                        "DATA": "354 go ahead\r\n250 2.0.0 unsolicited",     # one write
                                        ".": "554 5.7.1 Rejected for policy reasons"})
    r = relay("--backend", backend.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    assert client.say(f"MAIL FROM:<{SENDER}>").text == MAIL_REPLY
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250
    reply = client.say("DATA")
    # Whether the relay finds the stray reply behind the 354 at once or only
    # before it would send the terminator, the message gets a 451.
    assert reply.code in (354, 451), f"DATA got {reply}"
    if reply.code == 354:
        client.send(FIRST_BODY + b".\r\n")
        reply = client.reply()
    assert reply.code == 451, f"the message got {reply}; the back-end's answer to its end would have been 554"

    [first] = backend.wait_for_sessions_closed(1, timeout=10)      # the connection was dropped
    [message] = first.messages
    assert not message.received, "the back-end got the terminator of a message the relay gave up on"
    assert backend.delivered == []

    # A fresh connection finds the back-end mended: one reply to each command.
    backend.replies.update({"DATA": "354 go ahead", ".": "250 2.0.0 Ok: queued"})
    reply = client.say(f"MAIL FROM:<{SENDER}>")
    assert reply.text == MAIL_REPLY, f"the next MAIL got {reply}, not the back-end's reply to MAIL"
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250
    assert client.say("DATA").code == 354
    client.send(SECOND_BODY + b".\r\n")
    assert client.reply().code == 250
    assert backend.connections == 2
    second = backend.sessions[1]
    assert b"MAIL" in verbs(second) and [m.content for m in second.messages] == [SECOND_BODY]
    assert [m.content for m in backend.delivered] == [SECOND_BODY]
    assert client.say("QUIT").code == 221


def test_one_reply_too_many_after_mail_is_never_the_answer_to_rcpt(relay, scripted_backend):
    """RFC 5321 §4.2: every command generates exactly one reply. The README's
    "Replies in step": a back-end that sends one reply too many is broken, the
    client hears 451, the connection is dropped, and nothing it said is passed
    on as the answer to a later command. Here the back-end answers MAIL with two
    replies in one write, its real answer to RCPT being 550 and the extra reply a
    250: the RCPT must not get that 250; the client gets 451 (at MAIL, or at
    RCPT)."""
    backend = scripted_backend(replies={"MAIL": f"{MAIL_REPLY}\r\n250 2.1.5 extra reply nobody asked for",
                                        "RCPT": "550 5.1.1 No such user"})
    r = relay("--backend", backend.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    mail = client.say(f"MAIL FROM:<{SENDER}>")
    rcpt = client.say(f"RCPT TO:<{RECIPIENT}>")
    for reply in (mail, rcpt):
        assert "extra reply" not in reply.text, f"the client got the reply one too many: {reply}"
    assert rcpt.code != 250, f"RCPT got {rcpt}"
    assert 451 in (mail.code, rcpt.code), f"MAIL got {mail}, RCPT got {rcpt}"
    backend.wait_for_sessions_closed(1, timeout=10)
    assert client.say("QUIT").code == 221


def test_a_pipelined_group_answered_with_one_reply_too_many_passes_none_of_its_replies_on(relay, scripted_backend):
    """The same through a pipelined group (RFC 2920): the relay sends MAIL, RCPT and DATA ahead in
    one write and reads their replies together, before it passes any on. One too many shifts every
    later one (the extra 250 would answer RCPT, RCPT's 250 DATA): the whole group gets 451, the
    back-end is dropped, and no message goes."""
    backend = scripted_backend(replies={"MAIL": f"{MAIL_REPLY}\r\n250 2.1.5 extra reply nobody asked for"})
    r = relay("--backend", backend.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
    replies = [client.reply() for _ in range(3)]
    assert [reply.code for reply in replies] == [451, 503, 503], replies
    assert not any("extra reply" in reply.text for reply in replies), replies
    backend.wait_for_sessions_closed(1, timeout=10)
    assert [verbs(session)[-3:] for session in backend.sessions] == [[b"MAIL", b"RCPT", b"DATA"]]
    assert backend.delivered == []
    assert client.say("QUIT").code == 221


def test_a_354_to_a_data_sent_ahead_and_not_made_closes_the_back_end_with_no_quit_into_its_message(
        relay, scripted_backend):
    """The client pipelines MAIL, RCPT and DATA; the back-end refuses the RCPT yet says 354 to the
    DATA sent ahead, and now reads a message. The session answers DATA itself (554: no recipients),
    and at its end the connection is closed: a QUIT would be message data there, and its reply
    would never come (the session's thread and slot held for --proxy-timeout)."""
    backend = scripted_backend(replies={"RCPT": "550 5.1.1 No such user"})
    r = relay("--backend", backend.address, "--resolve", "off", "--proxy-timeout", "30")
    client = greeted(r, ehlo="client.example")
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
    assert [client.reply().code for _ in range(3)] == [250, 550, 554]
    assert client.say("QUIT").code == 221
    [session] = backend.wait_for_sessions_closed(1, timeout=10)     # at once, not after 30 s
    assert [message.raw for message in session.messages] == [b""]
    assert backend.delivered == []


@pytest.mark.parametrize("command, reply", [("RCPT", "354 Go ahead"), ("MAIL", "334 VXNlcm5hbWU6"),
                                            ("DATA", "250 2.0.0 Ok")], ids=["354-to-rcpt", "334-to-mail", "250-to-data"])
def test_a_reply_no_command_of_its_kind_can_have_is_a_broken_back_end(command, reply, relay, scripted_backend):
    """RFC 5321 §4.3.2: DATA alone is answered 354 (or refused); no other command has a 3xx.
    A reply outside that answers some other command: 451, never passed on, one command at a time too."""
    backend = scripted_backend(replies={command: reply})
    r = relay("--backend", backend.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    said = [client.say(f"MAIL FROM:<{SENDER}>")]
    if said[-1].code == 250:
        said.append(client.say(f"RCPT TO:<{RECIPIENT}>"))
    if said[-1].code == 250:
        said.append(client.say("DATA"))
    assert said[-1].code == 451 and said[-1].text.startswith("451 4.4.2"), said
    backend.wait_for_sessions_closed(1, timeout=10)
    assert backend.delivered == []


# --- XCLIENT fails closed ----------------------------------------------------------------

def test_backend_without_xclient_is_down_mail_gets_451_4_4_1_and_never_reaches_it(relay, scripted_backend):
    backend = scripted_backend(extensions=NO_XCLIENT)
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    text = client.say("MAIL FROM:<a@example.org>").text
    assert text.startswith(NO_SERVER + " "), text
    assert client.say("NOOP").code == 250          # the session goes on
    line = r.wait_for_log(r" ERROR .*does not offer XCLIENT").string
    assert "smtpd_authorized_xclient_hosts" in line
    assert backend.connections == 1
    assert not {b"MAIL", b"RCPT", b"DATA"} & set(verbs(backend.sessions[0]))
    assert backend.delivered == []


def test_backend_without_xclient_is_skipped_and_the_next_one_gets_the_mail(relay, scripted_backend):
    first, second = scripted_backend(extensions=NO_XCLIENT), scripted_backend()
    r = relay(*backend_args(first, second), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert send_message(client, BODY).code == 250
    assert len(second.delivered) == 1 and first.delivered == []
    assert b"MAIL" not in verbs(first.sessions[0])
    assert xclient_attributes(second.sessions[0])["ADDR"] == "127.0.0.1"
    r.wait_for_log(r" ERROR .*does not offer XCLIENT.*smtpd_authorized_xclient_hosts")


def test_backend_without_xclient_named_by_the_auth_service_gives_451_4_4_1_at_the_first_rcpt(
        relay, scripted_backend, auth_service):
    backend = scripted_backend(extensions=NO_XCLIENT)
    service = auth_service(always(*ok(backend)))
    r = relay("--auth-http", service.url, kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250     # ours until the first RCPT (nginx)
    text = client.say("RCPT TO:<b@example.net>").text
    assert text.startswith(NO_SERVER + " "), text
    assert len(service.requests) == 1
    assert b"MAIL" not in verbs(backend.sessions[0])
    r.wait_for_log(r" ERROR .*does not offer XCLIENT.*smtpd_authorized_xclient_hosts")


@pytest.mark.parametrize("refusal", ["550 5.7.0 Error: insufficient authorization", "451 4.3.0 Try again",
                                     "501 5.5.4 Bad XCLIENT syntax", "251 2.0.0 Whatever"])
def test_backend_refusing_xclient_is_down_and_mail_gets_451_4_4_1(relay, scripted_backend, refusal):
    backend = scripted_backend(replies={"XCLIENT": refusal})
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    text = client.say("MAIL FROM:<a@example.org>").text
    assert text.startswith(NO_SERVER + " "), text
    line = r.wait_for_log(r" ERROR .*refused XCLIENT").string
    assert "smtpd_authorized_xclient_hosts" in line
    assert verbs(backend.sessions[0])[:2] == [b"EHLO", b"XCLIENT"]
    assert b"MAIL" not in verbs(backend.sessions[0])


def test_backend_refusing_the_ehlo_and_helo_after_xclient_is_down(relay, scripted_backend):
    ehlo = "\r\n".join(f"250{'-' if last else ' '}{x}" for x, last in
                       zip(["scripted", *ALL_XCLIENT], [True] * len(ALL_XCLIENT) + [False]))
    backend = scripted_backend(replies={"EHLO": [ehlo, "554 5.7.1 Go away"], "HELO": "554 5.7.1 Go away"})
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    text = client.say("MAIL FROM:<a@example.org>").text
    assert text.startswith(NO_SERVER + " "), text
    session = backend.sessions[0]
    assert verbs(session)[:3] == [b"EHLO", b"XCLIENT", b"EHLO"]
    assert b"MAIL" not in verbs(session)


def test_no_xclient_logs_one_warning_at_start_and_mail_flows_to_a_backend_without_xclient(
        relay, scripted_backend):
    backend = scripted_backend(extensions=NO_XCLIENT)
    r = relay(*backend_args(backend), "--no-xclient", kill=True)
    lines = r.log_text().splitlines()        # as they stood when the relay was listening
    warnings = [i for i, line in enumerate(lines) if " WARNING " in line and "--no-xclient" in line]
    assert len(warnings) == 1, lines
    assert "mynetworks" in lines[warnings[0]]
    assert warnings[0] < next(i for i, line in enumerate(lines) if "listening on" in line)
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    assert len(backend.delivered) == 1 and backend.sessions[0].xclient is None


def test_default_xclient_logs_no_no_xclient_warning(relay, scripted_backend):
    r = relay(*backend_args(scripted_backend()), kill=True)
    assert not matching_lines(r, r"WARNING .*--no-xclient"), r.log_text()


def test_maildir_backend_needs_no_xclient_and_takes_the_mail_with_xclient_on(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'md'}", "--xclient", kill=True)
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    assert len(list((tmp_path / "md" / "new").iterdir())) == 1
    assert not matching_lines(r, r" ERROR ")


def test_reverse_name_is_sent_when_offered_and_attributes_go_in_the_spec_order(relay, scripted_backend):
    backend = scripted_backend(extensions=["PIPELINING", "XCLIENT LOGIN PROTO HELO REVERSE_NAME NAME PORT ADDR"])
    r = relay(*backend_args(backend), kill=True)
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    attributes = xclient_attributes(backend.sessions[0])
    assert list(attributes) == ["ADDR", "PORT", "NAME", "REVERSE_NAME", "HELO", "PROTO"]    # no login: no LOGIN
    assert attributes["REVERSE_NAME"] and attributes["HELO"] == CLIENT_HELO


def test_reverse_name_is_not_sent_when_not_offered(relay, scripted_backend):
    backend = scripted_backend()        # XCLIENT NAME ADDR PORT PROTO HELO LOGIN
    r = relay(*backend_args(backend), kill=True)
    assert send_message(greeted(r, ehlo=CLIENT_HELO), BODY).code == 250
    assert list(xclient_attributes(backend.sessions[0])) == ["ADDR", "PORT", "NAME", "HELO", "PROTO"]


def xclient_after_login(relay, scripted_backend, auth_service, user):
    """A 255-octet EHLO, AUTH PLAIN as `user` (the service says OK), MAIL -> the back-end's XCLIENT line (str)."""
    backend = scripted_backend(extensions=ALL_XCLIENT)
    service = auth_service(always(*ok(backend)))
    r = relay("--auth-http", service.url, "--auth", "plain", kill=True)
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
        relay, scripted_backend, auth_service):
    line, attributes = xclient_after_login(relay, scripted_backend, auth_service, "alice")
    assert_within_postfix_limits(line, attributes)
    assert list(attributes) == XCLIENT_ORDER
    assert attributes["LOGIN"] == "alice"


def test_xclient_line_that_would_pass_512_octets_gives_up_the_names_then_the_login(
        relay, scripted_backend, auth_service):
    # HELO 255 + LOGIN 250 cannot fit in 512 octets whatever the names are.
    line, attributes = xclient_after_login(relay, scripted_backend, auth_service, "u" * 250)
    assert_within_postfix_limits(line, attributes)
    assert "LOGIN" not in attributes
    assert attributes["NAME"] == attributes["REVERSE_NAME"] == "[UNAVAILABLE]"


def test_xclient_login_whose_xtext_passes_255_octets_is_never_sent_that_long(
        relay, scripted_backend, auth_service):
    line, attributes = xclient_after_login(relay, scripted_backend, auth_service, "=" * 100)  # 300 in xtext
    assert_within_postfix_limits(line, attributes)


# --- XCLIENT only with ADDR -----------------------------------------------------------

def test_smtp_sink_offering_xclient_without_addr_counts_as_down_and_gets_no_mail(relay, smtp_sink):
    """Postfix's XCLIENT_README: ADDR is the attribute that tells the back-end the
    client's address; smtp-sink offers only "XCLIENT NAME HELO". Without ADDR the
    back-end still judges the relay's own address. The README's "XCLIENT fails
    closed": with the default --xclient a back-end that does not offer XCLIENT
    with at least ADDR counts as down, the client gets 451, an ERROR line names
    the back-end, and mail never goes in under the relay's own address."""
    sink = smtp_sink()
    r = relay("--backend", sink.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    reply = client.say(f"MAIL FROM:<{SENDER}>")
    assert reply.code == 451, f"MAIL got {reply} from a relay whose only back-end takes XCLIENT without ADDR"
    r.wait_for_log(rf" ERROR .*{re.escape(sink.address)}(?!\d)", timeout=10)
    # Whatever the client tries next, nothing reaches smtp-sink.
    for command in (f"RCPT TO:<{RECIPIENT}>", "DATA"):
        assert client.say(command).code != 250
    sid = session_id(r, client.sock)
    assert client.say("QUIT").code == 221
    r.wait_for_log(rf"{sid} disconnect from", timeout=10)
    assert sink.messages() == []


def test_probe_says_a_back_end_offering_xclient_without_addr_would_not_be_used(smtp_sink):
    """The README's --probe: exit 0 only if every back-end would be used. smtp-sink
    offers XCLIENT without ADDR (Postfix's XCLIENT_README: ADDR carries the client's
    address), which the default --xclient does not use: the report says
    "would NOT be used" and the exit status is 1."""
    sink = smtp_sink()
    result = run_relay("--probe", "--backend", sink.address)
    assert f"backend {sink.address}: would NOT be used" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1


# --- No control characters toward the auth service ------------------------------------------

def test_c1_control_characters_in_mail_from_never_reach_auth_smtp_from(relay, raw_listener, scripted_backend):
    """The README: control characters from clients never reach a header of the
    auth request; nginx's Auth-SMTP-From carries the MAIL command as the client
    typed it. RFC 6531 lets a SMTPUTF8 quoted local part hold any UTF-8, so
    U+0085 (NEL) and U+009B (CSI, here starting a terminal escape) arrive in a
    valid MAIL; in the request the relay sends, Auth-SMTP-From holds neither
    (no \\xc2\\x85, no \\xc2\\x9b) nor any C0 control byte or DEL."""
    backend = scripted_backend()
    answer = (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
              b"Auth-Port: %d\r\nContent-Length: 0\r\n\r\n" % backend.port)
    service = raw_listener(answer)
    r = relay("--auth-http", service.url, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    assert client.say('MAIL FROM:<"x\u0085\u009b[2J"@b.example> SMTPUTF8').code == 250
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250      # asked the service, which said OK
    [head] = service.heads
    values = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"auth-smtp-from:")]
    assert len(values) == 1, f"not one Auth-SMTP-From header in {head!r}"
    [value] = values
    assert b"@b.example>" in value, f"Auth-SMTP-From {value!r} is not this MAIL command"
    assert b"\xc2\x85" not in value and b"\xc2\x9b" not in value, f"C1 control in Auth-SMTP-From: {value!r}"
    assert not re.search(rb"[\x00-\x1f\x7f]", value), f"control byte in Auth-SMTP-From: {value!r}"
    assert client.say("QUIT").code == 221


# --- A lone back-end's restart ----------------------------------------------------------------

def test_a_lone_back_end_found_down_takes_the_very_next_session_once_it_is_back(relay, late_backend):
    """nginx's ngx_http_upstream_module (the server directive): with a single
    server in a group, max_fails and fail_timeout are ignored and the server is
    never considered unavailable. The README (--balance): where every back-end
    is held off, as a lone one is once found down, a session tries them anyway,
    so a restart of the only mail server refuses mail only while it is down. While it is down a session gets 451; once it listens again, the
    very next session's MAIL gets 250, well within the old 10 s hold-off, and
    its message is delivered."""
    backend = late_backend()
    r = relay("--backend", backend.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    reply = client.say(f"MAIL FROM:<{SENDER}>")
    found_down = time.monotonic()
    assert reply.code == 451, f"MAIL got {reply} while the only back-end refused connections"
    assert client.say("QUIT").code == 221

    backend.come_up()
    client = greeted(r, ehlo="client.example")
    reply = client.say(f"MAIL FROM:<{SENDER}>")
    took = time.monotonic() - found_down
    assert reply.code == 250, f"MAIL got {reply} {took:.1f}s after the back-end was found down; it is back"
    assert took < 5, f"the back-end was used again only {took:.1f}s after it was found down"
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250
    assert client.say("DATA").code == 354
    client.send(SECOND_BODY + b".\r\n")
    assert client.reply().code == 250
    assert backend.messages == [SECOND_BODY]
    assert client.say("QUIT").code == 221


@pytest.mark.parametrize("reply, logged", [
    ("554-5.7.1 Rejected\r\n250 2.0.0 Ok: queued as MIXED", "a reply of 554 went on with 250"),
    ("2500 2.0.0 Ok: queued", "malformed reply line"),
    ("250x Ok: queued", "malformed reply line"),
    ("250\t2.0.0 Ok: queued", "malformed reply line"),
], ids=["lines-change-code", "code-runs-on", "code-then-letter", "code-then-tab"])
def test_a_reply_that_is_not_one_well_formed_reply_is_a_broken_back_end_never_a_250(
        reply, logged, relay, scripted_backend):
    """RFC 5321 §4.2: a reply line is three digits, then SP, "-" or its end ("2500" is no 250);
    §4.2.1: every line of a multiline reply carries the same code (one that starts 554 and ends
    250 is no answer). The client hears 451 (the README's "Replies in step"), never the 250."""
    backend = scripted_backend(replies={".": reply})
    r = relay("--backend", backend.address, "--resolve", "off")
    client = greeted(r, ehlo="client.example")
    assert client.say(f"MAIL FROM:<{SENDER}>").code == 250
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250
    assert client.say("DATA").code == 354
    client.send(FIRST_BODY + b".\r\n")
    reply = client.reply()
    assert reply.code == 451, f"the message got {reply}"
    r.wait_for_log(re.escape(logged))
    assert client.say("QUIT").code == 221
