"""Back-ends behind the relay: byte-exact delivery, Postfix's smtp-sink, XCLIENT,
failover, back-end failures, what the log says of a back-end, and the built-in
maildir back-end.

Every test runs the relay as a subprocess between a real client (smtplib,
swaks or a raw socket) and a real back-end (smtp-sink or a ScriptedBackend,
which records each back-end session byte for byte). A client hears 250 for a
message only after the back-end said 250, so once a client holds that reply
the back-end's record of the message is complete: no waiting is needed.
"""
import mailbox
import os
import re
import subprocess
import time

import pytest

from helpers import (backend_args, begin_data, can_bind, free_port, greeted, send_message, session_id, session_lines,
                     verbs, xclient_attributes)
from tls_fixtures import tls  # noqa: F401  (fixture)

SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.net"
CLIENT_HELO = "client.example"
BODY = b"Subject: test\r\n\r\nhello\r\n"
# Every verb the relay speaks to a back-end (without --backend-auth or
# --backend-tls, which add AUTH and STARTTLS); nothing else may reach one.
RELAY_VERBS = {b"EHLO", b"HELO", b"XCLIENT", b"MAIL", b"RCPT", b"DATA", b"RSET", b"QUIT"}
# smtp-sink's (Postfix 3.7) replies to a command named in -f / -r.
SINK_HARD_FAILURE = (500, b"5.3.0 Error: command failed")
SINK_SOFT_FAILURE = (450, b"4.3.0 Error: command failed")


# --- Helpers -----------------------------------------------------------------

def start_relay(relay, *backends, args=()):
    """The relay with each back-end (ScriptedBackend, SmtpSink or "HOST:PORT") as a --backend, in order.
    smtp-sink offers XCLIENT without ADDR, which --xclient refuses: behind it the relay runs --no-xclient."""
    argv = backend_args(*backends)
    if any(type(backend).__name__ == "SmtpSink" for backend in backends):
        argv.append("--no-xclient")
    return relay(*argv, *args)


def smtp_client(relay, helo=CLIENT_HELO):
    """A smtplib client of the relay that has said EHLO."""
    client = relay.smtp()
    assert client.ehlo(helo)[0] == 250
    return client


def transaction(client, body=BODY, sender=SENDER, rcpts=(RECIPIENT,)):
    """MAIL, RCPT and DATA with smtplib (which dot-stuffs) -> the reply to the end of data."""
    assert client.mail(sender)[0] == 250
    for rcpt in rcpts:
        assert client.rcpt(rcpt)[0] == 250
    return client.data(body)


def deliver_raw(relay, backend, data, mail_params=""):
    """Send `data` byte for byte through a fresh relay -> the one Message the back-end got."""
    client = greeted(start_relay(relay, backend), ehlo=CLIENT_HELO)
    code, text = send_message(client, data, SENDER, RECIPIENT, mail_params).tuple()
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as SCRIPTED"), (code, text)
    [message] = backend.delivered
    return message


def assert_same_bytes(got, wanted):
    """got == wanted, failing with the first difference instead of two huge reprs."""
    if got != wanted:
        at = next((i for i, (a, b) in enumerate(zip(got, wanted)) if a != b), min(len(got), len(wanted)))
        near = slice(max(0, at - 20), at + 20)
        pytest.fail(f"{len(got)} bytes, wanted {len(wanted)}; first difference at byte {at}: "
                    f"got {got[near]!r}, wanted {wanted[near]!r}")


def maildir_relay(relay, tmp_path, *args):
    """A relay whose only back-end is maildir:<tmp_path>/md -> (relay, Maildir path)."""
    path = tmp_path / "md"
    return relay("--backend", f"maildir:{path}", *args), path


def queued_file_name(reply):
    code, text = reply
    assert code == 250, reply
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", text)
    assert match, reply
    return match[1].decode()


# --- Byte-exact delivery to a scripted back-end -------------------------------

def test_eight_bit_bytes_and_utf8_text_reach_the_backend_exactly(relay, scripted_backend):
    backend = scripted_backend()
    every_byte_but_cr_lf = bytes(b for b in range(256) if b not in b"\r\n")
    data = (b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n"
            + every_byte_but_cr_lf + b"\r\n"
            + "Grüße aus Köln — 日本語 🙂\tnach dem Tab\r\n".encode()
            + b"\xc3\x28 not UTF-8, \x00 NUL, \x1b[0m escape\r\n\r\n\r\n")
    message = deliver_raw(relay, backend, data, " BODY=8BITMIME")
    assert_same_bytes(message.raw, data)
    assert b"BODY=8BITMIME" in message.mail_from.split()


def test_long_lines_and_large_messages_reach_the_backend_exactly(relay, scripted_backend):
    backend = scripted_backend()
    # 65536 bytes is the relay's part size for a line without an end: go around it.
    lines = [b"x" * n for n in (998, 999, 5000, 65535, 65536, 65537, 200_000)]
    lines.append(b".." + b"y" * 100_000)        # a long line starting with a (stuffed) dot
    lines += [b"..%06d dot line" % n for n in range(30_000)]     # many reads' worth
    data = b"Subject: long lines\r\n\r\n" + b"".join(line + b"\r\n" for line in lines)
    assert_same_bytes(deliver_raw(relay, backend, data).raw, data)


def test_dot_stuffed_lines_reach_the_backend_still_stuffed(relay, scripted_backend):
    backend = scripted_backend()
    data = (b"..leading dot\r\n"            # the first line of the message
            b"..\r\n"                       # a line holding one dot
            b"...two leading dots\r\n"
            b"..\r\n"
            b"a dot . in the middle and at the end.\r\n"
            b"..\r\n")                      # the last line before the terminator
    message = deliver_raw(relay, backend, data)
    assert_same_bytes(message.raw, data)
    assert message.content.startswith(b".leading dot\r\n.\r\n..two leading dots\r\n")


def test_empty_message_reaches_the_backend_empty(relay, scripted_backend):
    backend = scripted_backend()
    assert deliver_raw(relay, backend, b"").raw == b""


def test_body_without_final_crlf_arrives_with_the_crlf_smtplib_adds(relay, scripted_backend):
    backend = scripted_backend()
    client = smtp_client(start_relay(relay, backend))
    assert transaction(client, b"Subject: t\r\n\r\nno line end here")[0] == 250
    assert [m.raw for m in backend.delivered] == [b"Subject: t\r\n\r\nno line end here\r\n"]


def test_smtputf8_envelope_reaches_the_backend_in_utf8(relay, scripted_backend):
    backend = scripted_backend()
    client = greeted(start_relay(relay, backend), ehlo=CLIENT_HELO)
    begin_data(client, "jörg@example.org", "zoë@example.net", " SMTPUTF8")
    client.send(b"hi\r\n.\r\n")
    assert client.reply().code == 250
    [message] = backend.delivered
    assert message.mail_from == "MAIL FROM:<jörg@example.org> SMTPUTF8".encode()
    assert message.rcpt_to == ["RCPT TO:<zoë@example.net>".encode()]


# --- Back-end replies pass through --------------------------------------------

def test_multi_line_recipient_refusal_from_the_backend_reaches_the_client_verbatim(relay, scripted_backend):
    refusal = "550-5.1.1 <nobody@example.net>: User unknown\r\n550 5.1.1 see https://example.net/why"
    backend = scripted_backend(replies={"RCPT": ["250 2.1.5 Ok", refusal]})
    client = smtp_client(start_relay(relay, backend))
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt(RECIPIENT) == (250, b"2.1.5 Ok")
    assert client.rcpt("nobody@example.net") == (
        550, b"5.1.1 <nobody@example.net>: User unknown\n5.1.1 see https://example.net/why")
    assert client.data(BODY) == (250, backend.delivered[0].reply[4:].encode())
    assert backend.delivered[0].rcpt_to == [f"RCPT TO:<{RECIPIENT}>".encode()]


# --- Postfix smtp-sink behind the relay ----------------------------------------

def test_smtplib_delivers_through_the_relay_to_smtp_sink(relay, smtp_sink):
    sink = smtp_sink()
    client = smtp_client(start_relay(relay, sink))
    body = b"Subject: to the sink\r\n\r\n.a dot line\r\n\xe9t\xe9 8bit\r\n"
    assert client.mail(SENDER, ["BODY=8BITMIME"])[0] == 250
    assert client.rcpt(RECIPIENT)[0] == 250
    assert client.rcpt("second@example.net")[0] == 250
    assert client.data(body) == (250, b"2.0.0 Ok")      # smtp-sink's own reply to "."
    [message] = sink.wait_for_messages(1)
    assert message.mail_args == f"<{SENDER}> BODY=8BITMIME"
    assert message.rcpt_args == [f"<{RECIPIENT}>", "<second@example.net>"]
    assert message.body_crlf == body        # the sink's dump is unstuffed


def test_swaks_delivers_through_the_relay_to_smtp_sink(relay, smtp_sink):
    sink = smtp_sink()
    r = start_relay(relay, sink)
    swaks = subprocess.run(
        ["swaks", "--server", r.address, "--helo", "swaks.example", "--from", SENDER,
         "--to", RECIPIENT, "--body", "hello from swaks", "--timeout", "10"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert re.search(r"^ -> \.\n<-  250 2\.0\.0 Ok$", swaks.stdout, re.M), swaks.stdout
    [message] = sink.wait_for_messages(1)
    assert (message.mail_args, message.rcpt_args) == (f"<{SENDER}>", [f"<{RECIPIENT}>"])
    assert b"\n\nhello from swaks\n" in message.body


def test_the_backend_sees_the_clients_helo_through_xclient(relay, scripted_backend):
    backend = scripted_backend(extensions=["PIPELINING", "8BITMIME", "XCLIENT ADDR NAME HELO"])
    r = start_relay(relay, backend, args=["--log-level", "debug"])
    assert transaction(smtp_client(r, helo="client-helo.example"))[0] == 250
    assert xclient_attributes(backend.sessions[0])["HELO"] == "client-helo.example"
    r.wait_for_log(r"XCLIENT .*HELO=client-helo\.example")     # the debug log of the dialogue


def test_smtp_sink_hard_refusal_of_rcpt_reaches_the_client_verbatim(relay, smtp_sink):
    client = smtp_client(start_relay(relay, smtp_sink("-f", "RCPT")))
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt(RECIPIENT) == SINK_HARD_FAILURE
    assert client.docmd("DATA")[0] == 554       # the relay's own: no recipient was accepted


def test_smtp_sink_soft_refusal_of_mail_reaches_the_client_verbatim(relay, smtp_sink):
    client = smtp_client(start_relay(relay, smtp_sink("-r", "MAIL")))
    assert client.mail(SENDER) == SINK_SOFT_FAILURE


@pytest.mark.parametrize("flag, reply", [("-f", SINK_HARD_FAILURE), ("-r", SINK_SOFT_FAILURE)])
def test_smtp_sink_refusal_after_the_data_reaches_the_client_verbatim(relay, smtp_sink, flag, reply):
    client = smtp_client(start_relay(relay, smtp_sink(flag, ".")))
    assert transaction(client) == reply


@pytest.mark.parametrize("command", ["MAIL", "."])
def test_smtp_sink_closing_with_421_gives_the_client_a_4xx(relay, smtp_sink, command):
    client = smtp_client(start_relay(relay, smtp_sink("-Q", command)))
    code, text = client.mail(SENDER) if command == "MAIL" else transaction(client)
    assert code in (421, 451) and text.startswith(b"4."), (code, text)


@pytest.mark.parametrize("command", ["DATA", "."])
def test_smtp_sink_hanging_up_gives_the_client_451(relay, smtp_sink, command):
    client = smtp_client(start_relay(relay, smtp_sink("-q", command)))
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt(RECIPIENT)[0] == 250
    code, text = client.docmd("DATA") if command == "DATA" else client.data(BODY)
    assert code == 451 and text.startswith(b"4.4.2"), (code, text)


# --- XCLIENT -------------------------------------------------------------------

def test_backend_gets_xclient_with_the_clients_address_port_and_helo_then_ehlo_again(relay, scripted_backend):
    backend = scripted_backend()
    client = smtp_client(start_relay(relay, backend))
    client_port = client.sock.getsockname()[1]
    assert transaction(client)[0] == 250
    [session] = backend.sessions
    assert xclient_attributes(session) == {"ADDR": "127.0.0.1", "PORT": str(client_port),
                                           "NAME": "localhost", "HELO": CLIENT_HELO, "PROTO": "ESMTP"}
    assert verbs(session)[:4] == [b"EHLO", b"XCLIENT", b"EHLO", b"MAIL"]
    # Postfix takes the HELO name from the EHLO after XCLIENT, so it must be the client's.
    assert session.commands[2].split(b" ")[1:] == [CLIENT_HELO.encode()]


def test_xclient_helo_is_xtext_encoded_and_proto_is_smtp_after_helo(relay, scripted_backend):
    backend = scripted_backend()
    client = start_relay(relay, backend).smtp()
    assert client.helo("mx+1=a.example")[0] == 250
    assert transaction(client)[0] == 250
    attributes = xclient_attributes(backend.sessions[0])
    assert (attributes["HELO"], attributes["PROTO"]) == ("mx+2B1+3Da.example", "SMTP")


@pytest.mark.skipif(not can_bind("::1"), reason="this host has no IPv6 loopback address")
def test_xclient_address_of_an_ipv6_client_is_prefixed_ipv6(relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, listen="[::1]:0")
    assert transaction(smtp_client(r))[0] == 250
    assert xclient_attributes(backend.sessions[0])["ADDR"] == "IPV6:::1"


def test_no_xclient_option_sends_no_xclient(relay, scripted_backend):
    backend = scripted_backend()
    assert transaction(smtp_client(start_relay(relay, backend, args=["--no-xclient"])))[0] == 250
    [session] = backend.sessions
    assert session.xclient is None and b"XCLIENT" not in verbs(session)


def test_only_the_xclient_attributes_the_backend_offers_are_sent(relay, scripted_backend):
    backend = scripted_backend(extensions=["PIPELINING", "8BITMIME", "XCLIENT ADDR NAME HELO"])
    assert transaction(smtp_client(start_relay(relay, backend)))[0] == 250
    # 127.0.0.1 is localhost in /etc/hosts, both ways: a confirmed name.
    assert xclient_attributes(backend.sessions[0]) == {"ADDR": "127.0.0.1", "NAME": "localhost", "HELO": CLIENT_HELO}


def test_xclient_names_are_unavailable_with_resolve_off(relay, scripted_backend):
    backend = scripted_backend(extensions=["XCLIENT ADDR NAME REVERSE_NAME HELO"])
    assert transaction(smtp_client(start_relay(relay, backend, args=["--resolve", "off"])))[0] == 250
    assert xclient_attributes(backend.sessions[0]) == {"ADDR": "127.0.0.1", "NAME": "[UNAVAILABLE]",
                                                       "REVERSE_NAME": "[UNAVAILABLE]", "HELO": CLIENT_HELO}


def test_backend_without_xclient_counts_as_down_and_never_sees_a_mail(relay, scripted_backend):
    # It would judge the relay's own address: fail closed (README, "XCLIENT fails closed").
    backend = scripted_backend(extensions=["PIPELINING", "8BITMIME"])
    r = start_relay(relay, backend)
    client = smtp_client(r)
    assert client.ehlo()[0] == 250
    code, text = client.mail(SENDER)
    assert (code, text[:5]) == (451, b"4.4.1")
    [session] = backend.sessions
    assert b"MAIL" not in verbs(session)
    assert backend.delivered == []
    r.wait_for_log(r"ERROR .*does not offer XCLIENT.*smtpd_authorized_xclient_hosts")


def test_backend_refusing_xclient_counts_as_down_and_the_next_one_gets_the_mail(relay, scripted_backend):
    refusing = scripted_backend(replies={"XCLIENT": "550 5.7.0 Error: insufficient authorization"})
    second = scripted_backend()
    r = start_relay(relay, refusing, second)
    assert transaction(smtp_client(r))[0] == 250
    assert refusing.delivered == [] and len(second.delivered) == 1
    assert b"MAIL" not in verbs(refusing.sessions[0])
    r.wait_for_log(r"ERROR .*refused XCLIENT with 550.*smtpd_authorized_xclient_hosts")


# --- What reaches the back-end ----------------------------------------------------

def test_backend_receives_only_the_relays_own_commands_on_one_connection(relay, scripted_backend):
    backend = scripted_backend()
    client = smtp_client(start_relay(relay, backend))
    assert client.mail(SENDER)[0] == 250
    assert client.rset()[0] == 250
    assert client.noop()[0] == 250
    assert client.verify(RECIPIENT)[0] == 252
    assert client.docmd("HELP")[0] == 214
    assert transaction(client, b"first\r\n")[0] == 250
    assert transaction(client, b"second\r\n")[0] == 250
    assert client.quit()[0] == 221
    [session] = backend.wait_for_sessions_closed(1)
    assert set(verbs(session)) <= RELAY_VERBS, session.commands
    assert verbs(session) == [b"EHLO", b"XCLIENT", b"EHLO", b"MAIL", b"RSET",
                              b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert [m.raw for m in backend.delivered] == [b"first\r\n", b"second\r\n"]


def test_clients_xclient_auth_and_junk_never_reach_the_backend(relay, scripted_backend):
    backend = scripted_backend()
    client = greeted(start_relay(relay, backend, args=["--max-errors", "20"]), ehlo=CLIENT_HELO)
    assert client.say(f"MAIL FROM:<{SENDER}>").code == 250       # the back-end is open now
    hostile = [b"XCLIENT ADDR=192.0.2.66 NAME=spoofed.example",
               b"AUTH PLAIN AHNwb29mZWQAc2VjcmV0",
               b"xyzzy 192.0.2.66",
               b"\x00\xff\xfe junk",
               b"RCPT TO:<" + RECIPIENT.encode() + b">\rXCLIENT ADDR=192.0.2.66"]
    for line in hostile:
        assert 500 <= client.say(line).code < 600, line
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250
    assert client.say("DATA").code == 354
    client.send(b"hi\r\n.\r\n")
    assert client.reply().code == 250
    assert client.say("QUIT").code == 221
    [session] = backend.wait_for_sessions_closed(1)
    assert set(verbs(session)) <= RELAY_VERBS, session.commands
    assert not [c for c in session.commands if b"192.0.2.66" in c or b"AUTH" in c.upper() or b"junk" in c]
    assert xclient_attributes(session)["ADDR"] == "127.0.0.1"


# --- Failover ---------------------------------------------------------------------

def test_second_backend_takes_over_when_first_refuses_connections(relay, scripted_backend):
    closed = f"127.0.0.1:{free_port()}"
    second = scripted_backend()
    r = start_relay(relay, closed, second)
    assert transaction(smtp_client(r))[0] == 250
    assert len(second.delivered) == 1
    r.wait_for_log(rf"WARNING .*{re.escape(closed)}")


@pytest.mark.parametrize("greeting", ["421 4.3.2 Service not available", "554 5.3.2 No SMTP service here"])
def test_second_backend_takes_over_when_first_greets_with_an_error(relay, scripted_backend, greeting):
    first, second = scripted_backend(greeting=greeting), scripted_backend()
    r = start_relay(relay, first, second)
    assert transaction(smtp_client(r))[0] == 250
    assert first.connections == 1 and first.delivered == []
    assert len(second.delivered) == 1
    r.wait_for_log(rf"WARNING .*{re.escape(first.address)}")


def test_second_backend_takes_over_when_first_never_greets(relay, scripted_backend):
    first, second = scripted_backend(actions={"CONNECT": "hang"}), scripted_backend()
    r = start_relay(relay, first, second, args=["--proxy-timeout", "1"])
    assert transaction(smtp_client(r))[0] == 250
    assert first.connections == 1 and len(second.delivered) == 1


def test_second_backend_takes_over_when_first_refuses_ehlo_and_helo(relay, scripted_backend):
    refusal = "554 5.7.1 Not for you"
    first = scripted_backend(replies={"EHLO": refusal, "HELO": refusal})
    second = scripted_backend()
    assert transaction(smtp_client(start_relay(relay, first, second)))[0] == 250
    assert b"MAIL" not in verbs(first.sessions[0])
    assert len(second.delivered) == 1


def test_second_backend_takes_over_when_first_hangs_up_at_xclient(relay, scripted_backend):
    first, second = scripted_backend(actions={"XCLIENT": "drop"}), scripted_backend()
    assert transaction(smtp_client(start_relay(relay, first, second)))[0] == 250
    assert first.delivered == [] and len(second.delivered) == 1


def test_all_backends_down_gives_451_at_mail_and_the_session_carries_on(relay, scripted_backend):
    down = scripted_backend(greeting="421 4.3.2 Service not available")
    client = smtp_client(start_relay(relay, f"127.0.0.1:{free_port()}", down))
    code, text = client.mail(SENDER)
    assert code == 451 and text.startswith(b"4.4.1"), (code, text)
    assert client.rcpt(RECIPIENT)[0] == 503        # no transaction was started
    assert client.noop()[0] == 250
    down.greeting = "220 scripted ESMTP"           # the back-end comes back
    assert transaction(client)[0] == 250
    assert down.connections == 2 and len(down.delivered) == 1
    assert client.quit()[0] == 221


# --- Back-end failures: a non-2xx reply, and nothing delivered --------------------

@pytest.mark.parametrize("reply", ["451 4.3.0 Error: queue file write error",
                                   "554 5.7.1 Message rejected: spam"])
def test_backend_refusal_after_data_reaches_the_client_verbatim(relay, scripted_backend, reply):
    backend = scripted_backend(replies={".": reply})
    client = smtp_client(start_relay(relay, backend))
    code, text = reply.split(" ", 1)
    assert transaction(client) == (int(code), text.encode())
    assert backend.delivered == []


def test_backend_dropping_mid_data_gives_451_and_the_next_mail_uses_a_new_connection(relay, scripted_backend):
    backend = scripted_backend(drop_after_data_bytes=10_000)
    client = smtp_client(start_relay(relay, backend))
    # Bigger than the socket buffers, so the relay sees the loss while it writes.
    code, text = transaction(client, b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 5000)
    assert code == 451 and text.startswith(b"4.4.2"), (code, text)
    assert backend.delivered == []
    assert transaction(client, b"small\r\n")[0] == 250
    assert backend.connections == 2
    assert [m.raw for m in backend.delivered] == [b"small\r\n"]


def test_backend_hanging_up_after_the_data_gives_451_and_the_session_carries_on(relay, scripted_backend):
    backend = scripted_backend(actions={".": "drop"})
    client = smtp_client(start_relay(relay, backend))
    code, text = transaction(client)
    assert code == 451 and text.startswith(b"4.4.2"), (code, text)
    assert backend.delivered == []
    assert client.mail(SENDER)[0] == 250           # on a new back-end connection
    assert backend.connections == 2


def test_backend_slow_to_answer_the_end_of_data_is_waited_for_past_the_proxy_timeout(relay, smtp_sink):
    # RFC 5321 §4.5.3.2.6 gives the reply to the end of data 10 minutes: a
    # slow content filter must not turn an accepted message into a 4xx,
    # which the client would retry into a duplicate.
    sink = smtp_sink("-W", ".:2")
    client = smtp_client(start_relay(relay, sink, args=["--proxy-timeout", "1"]))
    started = time.monotonic()
    code, text = transaction(client)
    assert code == 250 and time.monotonic() - started >= 1.9, (code, text)
    assert len(sink.wait_for_messages(1)) == 1


def test_backend_dropping_at_rcpt_gives_451(relay, scripted_backend):
    backend = scripted_backend(actions={"RCPT": "drop"})
    client = smtp_client(start_relay(relay, backend))
    assert client.mail(SENDER)[0] == 250
    code, text = client.rcpt(RECIPIENT)
    assert code == 451 and text.startswith(b"4.4.2"), (code, text)
    assert client.mail(SENDER)[0] == 250           # the session carries on, on a new connection
    assert backend.connections == 2
    assert backend.delivered == []


def test_message_over_the_size_limit_never_completes_at_the_backend(relay, scripted_backend):
    backend = scripted_backend()
    client = smtp_client(start_relay(relay, backend, args=["--max-message-size", "1000"]))
    assert client.mail(SENDER)[0] == 250            # no SIZE= declared: refused mid-way
    assert client.rcpt(RECIPIENT)[0] == 250
    assert client.data((b"x" * 78 + b"\r\n") * 100)[0] == 552
    [session] = backend.wait_for_sessions_closed(1)
    assert [m.completed for m in session.messages] == [False]
    assert backend.delivered == []


def test_client_vanishing_mid_data_leaves_no_message_at_the_backend(relay, scripted_backend):
    backend = scripted_backend()
    r = start_relay(relay, backend)
    client = greeted(r, ehlo=CLIENT_HELO)
    begin_data(client, SENDER, RECIPIENT)
    sent = b"Subject: cut short\r\n\r\nfirst line\r\nsecond li"
    client.send(sent)
    client.sock.close()
    [session] = backend.wait_for_sessions_closed(1)
    [message] = session.messages
    assert not message.completed and backend.delivered == []
    assert sent.startswith(message.raw)
    r.wait_for_log(r"WARNING .*DATA")


# --- A back-end that went away between transactions ----------------------------

def test_backend_closing_an_idle_connection_is_invisible_to_the_client(relay, scripted_backend):
    # The back-end's idle timeout is what is tested, so it is short here.
    backend = scripted_backend(read_timeout=1)
    client = smtp_client(start_relay(relay, backend))
    assert transaction(client, b"first\r\n")[0] == 250
    backend.wait_for_sessions_closed(1)
    assert transaction(client, b"second\r\n")[0] == 250
    assert backend.connections == 2
    assert [m.raw for m in backend.delivered] == [b"first\r\n", b"second\r\n"]


def test_backend_saying_421_on_an_idle_connection_is_passed_on_and_ends_the_session(relay, scripted_backend):
    # Postfix's smtpd ends an idle session with "421 4.4.2 <host> Error: timeout
    # exceeded" and closes, as it ends one past smtpd_hard_error_limit. Here
    # that 421 travels right behind the 250 for the first message. A 421 is
    # the back-end ending the session on purpose: the client hears it at its
    # next command and its session ends too, so no fresh back-end session
    # goes on where that one stopped (README, "Replies in step").
    backend = scripted_backend(read_timeout=1, replies={
        ".": "250 2.0.0 Ok: queued as IDLE1\r\n421 4.4.2 scripted Error: timeout exceeded"})
    client = smtp_client(start_relay(relay, backend))
    assert transaction(client, b"first\r\n") == (250, b"2.0.0 Ok: queued as IDLE1")
    backend.wait_for_sessions_closed(1)
    assert client.mail(SENDER) == (421, b"4.4.2 scripted Error: timeout exceeded")
    assert backend.connections == 1


def test_backend_dropping_at_rset_gives_250_and_the_next_mail_reconnects(relay, scripted_backend):
    backend = scripted_backend(actions={"RSET": "drop"})
    client = smtp_client(start_relay(relay, backend))
    assert transaction(client, b"first\r\n")[0] == 250
    assert client.mail(SENDER)[0] == 250
    assert client.rset()[0] == 250
    assert transaction(client, b"second\r\n")[0] == 250
    assert backend.connections == 2
    assert [m.raw for m in backend.delivered] == [b"first\r\n", b"second\r\n"]


# --- What the log says of a back-end --------------------------------------------------

REFUSALS = {"MAIL": "550 5.7.1 Sender rejected", "RCPT": "550 5.1.1 No such user",
            "DATA": "554 5.5.1 No valid recipients"}


@pytest.mark.parametrize("verb", list(REFUSALS))
def test_each_backend_refusal_gives_one_info_line(relay, scripted_backend, verb):
    backend = scripted_backend(replies={verb: REFUSALS[verb]})
    r = relay(*backend_args(backend), kill=True)
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
def test_backend_connected_line_says_tls_and_xclient(relay, scripted_backend, tls, tls_mode, xclient):
    context = tls.server_context(tls.backend)
    backend = scripted_backend(tls_context=context if tls_mode == "on" else None,
                               starttls_context=context if tls_mode == "starttls" else None)
    args = ["--backend-tls", tls_mode, "--backend-tls-ca", tls.ca_path] if tls_mode != "off" else []
    r = relay(*backend_args(backend), *args, *([] if xclient else ["--no-xclient"]), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    sid = session_id(r, client.sock)
    assert send_message(client, BODY).code == 250
    version = backend.sessions[0].tls_version
    assert (version is not None) == (tls_mode != "off")
    described = f"{f'TLS {version}' if version else 'no TLS'}, {'XCLIENT' if xclient else 'no XCLIENT'}"
    r.wait_for_log(rf" INFO {sid} backend {re.escape(backend.address)} connected \({described}\)$")


# --- The maildir back-end -------------------------------------------------------

def test_maildir_file_is_in_new_when_the_250_names_it_with_envelope_and_unstuffed_lf_text(relay, tmp_path):
    r, path = maildir_relay(relay, tmp_path)
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
    name = queued_file_name(transaction(smtp_client(r), body))
    # The file was renamed into new/ before the 250 was sent: no waiting here.
    assert os.listdir(path / "new") == [name]
    assert os.listdir(path / "tmp") == []
    content = (path / "new" / name).read_bytes()
    assert content.startswith(f"Return-Path: <{SENDER}>\n".encode())
    assert content.endswith(b"\nSubject: dots\n\n.leading dot\n..two dots\n.\nlast line\n")
    assert b"\r" not in content
    message = mailbox.Maildir(path, factory=None, create=False)[name]
    assert message["Return-Path"] == f"<{SENDER}>"
    assert re.findall(r"<([^>]*)>", message["X-Envelope-To"]) == [RECIPIENT]
    assert message["Subject"] == "dots"
    assert message.get_payload() == ".leading dot\n..two dots\n.\nlast line\n"


def test_maildir_records_the_null_sender_and_every_recipient(relay, tmp_path):
    r, path = maildir_relay(relay, tmp_path)
    rcpts = ["a@example.net", "b@example.net", "c@example.com"]
    name = queued_file_name(transaction(smtp_client(r), sender="<>", rcpts=rcpts))
    message = mailbox.Maildir(path, factory=None, create=False)[name]
    assert message["Return-Path"] == "<>"
    assert re.findall(r"<([^>]*)>", message["X-Envelope-To"]) == rcpts


def test_maildir_unstuffs_dots_across_a_large_message_and_long_lines(relay, tmp_path):
    r, path = maildir_relay(relay, tmp_path)
    lines = b"".join(b".%06d\r\nplain %06d\r\n" % (n, n) for n in range(40_000))
    body = b"Subject: big\r\n\r\n" + lines + b"." * 200_000 + b"\r\n"
    name = queued_file_name(transaction(smtp_client(r), body))
    content = (path / "new" / name).read_bytes()
    stored = content[content.index(b"\nSubject: big\n") + 1:]
    assert_same_bytes(stored, body.replace(b"\r\n", b"\n"))


def test_maildir_message_refused_mid_way_leaves_no_file(relay, tmp_path):
    r, path = maildir_relay(relay, tmp_path, "--max-message-size", "1000")
    client = smtp_client(r)
    assert client.mail(SENDER)[0] == 250            # no SIZE= declared: refused mid-way
    assert client.rcpt(RECIPIENT)[0] == 250
    assert client.data((b"x" * 78 + b"\r\n") * 100)[0] == 552
    assert os.listdir(path / "new") == [] and os.listdir(path / "tmp") == []
    assert queued_file_name(transaction(client, b"small\r\n"))     # the session carries on
    assert len(os.listdir(path / "new")) == 1 and os.listdir(path / "tmp") == []


def test_maildir_client_vanishing_mid_data_leaves_no_file(relay, tmp_path):
    r, path = maildir_relay(relay, tmp_path)
    client = greeted(r, ehlo=CLIENT_HELO)
    begin_data(client, SENDER, RECIPIENT)
    client.send(b"Subject: cut short\r\n\r\nfirst line\r\nsecond li")
    client.sock.close()
    r.wait_for_log(r"disconnect from 127\.0\.0\.1")     # logged after the back-end is closed
    assert os.listdir(path / "new") == [] and os.listdir(path / "tmp") == []
