"""The relay's SMTP server side on the wire: greeting, verbs, replies, limits, pipelining.

Every test runs the relay as a real subprocess in front of a ScriptedBackend
and talks to it over a real socket: raw bytes where the exact exchange
matters, smtplib or swaks where a real client is the point.
"""
import re
import socket
import subprocess
import time

import pytest

from helpers import HOST_255, SMTPClient, backend_args, codes, greeted, send_data, send_message, xclient_attributes

SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
BODY = b"Subject: wire test\r\n\r\nHello.\r\n"
TOO_LONG = "501 5.5.2 Bad host name: too long"


# --- Checking replies, starting the relay ----------------------------------------

def assert_enhanced(reply):
    """RFC 2034 §3: every line starts with a status code whose class is the reply's."""
    for line in reply.lines:
        assert re.match(rf"{str(reply.code)[0]}\.\d{{1,3}}\.\d{{1,3}}(?: |$)", line), \
            f"no enhanced status code in {reply}"


@pytest.fixture
def backend(scripted_backend):
    return scripted_backend()


@pytest.fixture
def start_relay(relay, backend):
    """start_relay(*options) -> the relay, named mx.test, in front of `backend`."""
    def start(*options):
        return relay("--server-name", SERVER_NAME, "--backend", backend.address, *options)
    return start


# --- Greeting, HELO and EHLO ---------------------------------------------------

def test_greeting_is_220_server_name_esmtp(start_relay):
    client = SMTPClient(start_relay().connect())
    assert client.line() == "220 mx.test ESMTP"


def test_helo_is_answered_with_250_and_the_server_name(start_relay):
    client = greeted(start_relay())
    [reply] = client.talk("HELO client.example")
    assert (reply.code, reply.lines) == (250, ["mx.test"])


def test_ehlo_lists_exactly_the_supported_extensions(start_relay):
    client = greeted(start_relay())
    [reply] = client.talk("EHLO client.example")
    assert reply.code == 250
    assert reply.lines[0] == "mx.test"
    assert sorted(reply.lines[1:]) == sorted(["PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"])
    keywords = {line.split()[0] for line in reply.lines[1:]}
    assert not keywords & {"CHUNKING", "BDAT", "STARTTLS", "AUTH"}


def test_ehlo_advertises_the_size_limit_when_one_is_set(start_relay):
    client = greeted(start_relay("--max-message-size", "1000"))
    [reply] = client.talk("EHLO client.example")
    assert reply.code == 250
    assert "SIZE 1000" in reply.lines
    assert "SIZE" not in reply.lines


def test_helo_and_ehlo_without_argument_are_refused_with_501(start_relay):
    client = greeted(start_relay("--max-errors", "0"))
    for command in ["HELO", "EHLO", "HELO ", "EHLO  "]:
        [reply] = client.talk(command)
        assert reply.code == 501, f"{command!r} got {reply}"
        assert_enhanced(reply)


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize("name", [HOST_255 + "c", "=" * 90, "=" * 86], ids=["256-octets", "90-equals", "86-equals"])
def test_helo_name_too_long_itself_or_in_xtext_gets_501_and_the_session_goes_on(relay, tmp_path, verb, name):
    r = relay("--backend", f"maildir:{tmp_path / 'md'}", kill=True)
    client = greeted(r)
    assert client.say(f"{verb} {name}").text == TOO_LONG
    assert client.say(f"{verb} {CLIENT_HELO}").code == 250
    assert send_message(client, BODY).code == 250


@pytest.mark.parametrize("name, sent", [(HOST_255, HOST_255), ("=" * 85, "+3D" * 85)], ids=["255-plain", "85-equals"])
def test_helo_name_of_255_octets_after_xtext_is_taken_and_reaches_xclient_whole(
        relay, scripted_backend, name, sent):
    backend = scripted_backend()
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r)
    assert client.say(f"EHLO {name}").code == 250
    assert send_message(client, BODY).code == 250
    assert xclient_attributes(backend.sessions[0])["HELO"] == sent
    assert len(sent) == 255


# --- The verbs -------------------------------------------------------------------

def test_mail_rcpt_data_deliver_the_message_to_the_backend(start_relay, backend):
    client = greeted(start_relay())
    assert codes(client.talk("EHLO client.example")) == [250]
    assert send_message(client, BODY, recipient="b@example.org").code == 250
    [message] = backend.delivered
    assert message.mail_from == b"MAIL FROM:<a@example.org>"
    assert message.rcpt_to == [b"RCPT TO:<b@example.org>"]
    assert message.content == BODY


def test_rset_noop_vrfy_and_help_get_250_250_252_and_214(start_relay):
    client = greeted(start_relay())
    replies = client.talk("RSET", "NOOP", "VRFY someone", "HELP")
    assert codes(replies) == [250, 250, 252, 214]


def test_help_lists_every_verb_and_help_verb_and_a_misspelt_command_give_its_declared_syntax(start_relay):
    client = greeted(start_relay("--max-errors", "0"))
    [listing, mail, help_rcpt, rcpt] = client.talk("HELP", "MAIL TO:<b@example.org>", "HELP rcpt", "RCPT FROM:<a@b>")
    assert listing.code == 214 and listing.lines[0].split(": ")[1].split() == [
        "AUTH", "DATA", "EHLO", "EXPN", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT", "RSET", "STARTTLS", "VRFY"]
    assert mail.text == "501 5.5.4 Syntax: MAIL FROM:<address>"
    assert help_rcpt.text == "214 2.0.0 RCPT TO:<address>"
    assert rcpt.code == 503         # no MAIL yet: the sequence is checked first
    assert codes(client.talk("MAIL FROM:<a@example.org>")) == [250]
    [rcpt] = client.talk("RCPT FROM:<b@example.org>")
    assert rcpt.text == "501 5.5.4 Syntax: RCPT TO:<address>"


def test_quit_gets_221_and_the_connection_is_closed(start_relay):
    client = greeted(start_relay())
    assert codes(client.talk("QUIT")) == [221]
    assert client.rest() == b""


def test_unknown_command_is_refused_with_500_and_session_continues(start_relay):
    client = greeted(start_relay("--max-errors", "0"))
    for command in ["FOO", "XCLIENT ADDR=192.0.2.1", "BDAT 10 LAST", "ETRN example.org", "MAIL2 FROM:<a@example.org>"]:
        assert codes(client.talk(command, "NOOP")) == [500, 250], command


def test_mail_without_from_and_address_is_refused_with_501(start_relay):
    client = greeted(start_relay("--max-errors", "0"))
    for command in ["MAIL", "MAIL <a@example.org>", "MAIL TO:<a@example.org>", "MAIL FROM:"]:
        assert codes(client.talk(command)) == [501], command
    assert codes(client.talk("MAIL FROM:<a@example.org>")) == [250]


def test_rcpt_without_to_and_address_is_refused_with_501(start_relay):
    client = greeted(start_relay("--max-errors", "0"))
    assert codes(client.talk("MAIL FROM:<a@example.org>")) == [250]
    for command in ["RCPT", "RCPT <b@example.org>", "RCPT TO:", "RCPT TO:<>"]:
        assert codes(client.talk(command)) == [501], command
    assert codes(client.talk("RCPT TO:<b@example.org>")) == [250]


def test_unknown_mail_parameter_is_refused_with_555(start_relay):
    client = greeted(start_relay())
    assert codes(client.talk("EHLO client.example", "MAIL FROM:<a@example.org> FOO=bar")) == [250, 555]


def test_bad_size_parameter_is_refused_with_501(start_relay):
    client = greeted(start_relay("--max-errors", "0"))
    assert codes(client.talk("EHLO client.example")) == [250]
    for param in ["SIZE", "SIZE=", "SIZE=abc", "SIZE=-1", "SIZE=1e3"]:
        assert codes(client.talk(f"MAIL FROM:<a@example.org> {param}")) == [501], param
    assert codes(client.talk("MAIL FROM:<a@example.org> SIZE=100")) == [250]


def test_body_8bitmime_is_accepted(start_relay, backend):
    client = greeted(start_relay())
    assert codes(client.talk("EHLO client.example", "MAIL FROM:<a@example.org> BODY=8BITMIME")) == [250, 250]
    assert codes(client.talk("RCPT TO:<b@example.org>", "DATA")) == [250, 354]
    client.send("Subject: 8bit\r\n\r\nGrüße\r\n.\r\n".encode("utf-8"))
    assert client.reply().code == 250
    assert [m.content for m in backend.delivered] == ["Subject: 8bit\r\n\r\nGrüße\r\n".encode("utf-8")]


def test_rcpt_before_mail_is_refused_with_503(start_relay):
    client = greeted(start_relay())
    assert codes(client.talk("RCPT TO:<b@example.org>")) == [503]


def test_data_before_mail_is_refused_with_503(start_relay):
    client = greeted(start_relay())
    assert codes(client.talk("DATA")) == [503]


def test_data_without_an_accepted_recipient_is_refused_with_554(start_relay, backend):
    client = greeted(start_relay())
    assert codes(client.talk("MAIL FROM:<a@example.org>", "DATA")) == [250, 554]
    assert codes(client.talk("NOOP")) == [250]      # the 554 did not leave us in DATA mode
    assert backend.sessions[0].messages == []


def test_nested_mail_is_refused_with_503(start_relay):
    client = greeted(start_relay())
    assert codes(client.talk("MAIL FROM:<a@example.org>", "MAIL FROM:<c@example.org>")) == [250, 503]


def test_rset_mid_transaction_lets_a_new_mail_start(start_relay, backend):
    client = greeted(start_relay())
    assert codes(client.talk("MAIL FROM:<old@example.org>", "RCPT TO:<b@example.org>", "RSET")) == [250, 250, 250]
    assert send_message(client, BODY, "new@example.org", "c@example.org").code == 250
    [message] = backend.delivered
    assert (message.mail_from, message.rcpt_to) == (b"MAIL FROM:<new@example.org>", [b"RCPT TO:<c@example.org>"])


def test_several_messages_in_one_session_go_through_one_backend_session(start_relay, backend):
    relay = start_relay()
    client = relay.smtp(timeout=10)
    client.ehlo("client.example")
    for n in range(3):
        assert client.sendmail("a@example.org", [f"r{n}@example.org"], b"Subject: %d\r\n\r\nbody\r\n" % n) == {}
    assert client.quit()[0] == 221
    [session] = backend.wait_for_sessions_closed(1)
    assert all(m.completed for m in session.messages)
    assert [m.content for m in session.messages] == [b"Subject: %d\r\n\r\nbody\r\n" % n for n in range(3)]


# Every reply smtprelay makes up itself (not the back-end's, passed through)
# carries an RFC 3463 code; RFC 2034 §3 exempts only the greeting and the
# replies to HELO and EHLO. (command, expected code, made by the relay itself)
SESSION_OF_OWN_REPLIES = [
    ("EHLO client.example", 250, False),
    ("NOOP", 250, True),
    ("RSET", 250, True),
    ("VRFY someone", 252, True),
    ("HELP", 214, True),
    ("EXPN list", 502, True),
    ("FOO", 500, True),
    ("X" * 3000, 500, True),
    ("MAIL", 501, True),
    ("RCPT TO:<b@example.org>", 503, True),
    ("DATA", 503, True),
    ("MAIL FROM:<a@example.org> FOO=1", 555, True),
    ("MAIL FROM:<a@example.org> SIZE=x", 501, True),
    ("MAIL FROM:<a@example.org> SIZE=5000", 552, True),
    ("MAIL FROM:<a@example.org>", 250, False),
    ("DATA", 554, True),
    ("MAIL FROM:<a@example.org>", 503, True),
    ("RCPT TO:<>", 501, True),
    ("RCPT TO:<b@example.org>", 250, False),
    ("RCPT TO:<c@example.org>", 452, True),
    ("QUIT", 221, True),
]


def test_every_reply_the_relay_makes_itself_carries_an_enhanced_status_code(start_relay):
    client = greeted(start_relay("--max-recipients", "1", "--max-message-size", "1000", "--max-errors", "0"))
    for command, code, own in SESSION_OF_OWN_REPLIES:
        [reply] = client.talk(command)
        assert reply.code == code, f"{command[:40]!r} got {reply}"
        if own:
            assert_enhanced(reply)


def test_quoted_local_part_holding_a_closing_bracket_is_accepted_and_passed_on(relay, scripted_backend):
    backend = scripted_backend()
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say('RCPT TO:<"a>b"@d.example>').code == 250
    assert send_data(client, BODY).code == 250
    assert backend.delivered[0].rcpt_to == [b'RCPT TO:<"a>b"@d.example>']


@pytest.mark.parametrize("verb", ["RCPT", "."])
def test_backend_reply_line_without_text_reaches_the_client_with_a_status_code_and_no_trailing_space(
        relay, scripted_backend, verb):
    backend = scripted_backend(replies={verb: "250"})
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    client.send(b"RCPT TO:<b@example.net>\r\n")
    if verb == ".":
        assert client.reply().code == 250
        assert client.say("DATA").code == 354
        client.send(BODY + b".\r\n")
    assert client.line() == "250 2.0.0"


def test_backend_replies_without_enhanced_status_codes_get_their_class_s_on_every_line(relay, scripted_backend):
    # EHLO offers ENHANCEDSTATUSCODES: RFC 2034 §3 wants a code on every reply line but 354's.
    backend = scripted_backend(replies={"MAIL": "250 Sender ok", "RCPT": "250-Recipient ok\r\n250 2.1.5 Ok",
                                        "DATA": "354 Go ahead"})
    r = relay(*backend_args(backend), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("MAIL FROM:<a@example.org>").text == "250 2.0.0 Sender ok"
    assert client.say("RCPT TO:<b@example.net>").lines == ["2.0.0 Recipient ok", "2.1.5 Ok"]
    assert client.say("DATA").text == "354 Go ahead"


# --- Errors ------------------------------------------------------------------------

def test_third_error_under_max_errors_3_gets_its_reply_then_421_and_the_connection_closes(start_relay):
    client = greeted(start_relay("--max-errors", "3"))
    assert codes(client.talk("FOO", "RCPT TO:<b@example.org>")) == [500, 503]
    assert codes(client.talk("NOOP")) == [250]      # two errors: still served
    [third] = client.talk("MAIL")
    assert third.code == 501
    closing = client.reply()
    assert closing.code == 421
    assert_enhanced(closing)
    assert client.rest() == b""


# --- Pipelining (RFC 2920) -----------------------------------------------------

def test_pipelined_transaction_gets_its_replies_in_order_and_is_delivered(start_relay, backend):
    client = greeted(start_relay())
    assert codes(client.talk("EHLO client.example")) == [250]
    replies = client.talk("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>", "DATA")
    assert codes(replies) == [250, 250, 250, 354]
    client.send(BODY + b".\r\nQUIT\r\n")
    assert [client.reply().code, client.reply().code] == [250, 221]
    assert client.rest() == b""
    [message] = backend.delivered
    assert message.rcpt_to == [b"RCPT TO:<b@example.org>", b"RCPT TO:<c@example.org>"]
    assert message.content == BODY


def test_pipelined_burst_of_noops_gets_every_reply_in_order(start_relay):
    client = greeted(start_relay())
    replies = client.talk(*[f"NOOP {n}" for n in range(100)], "HELP")     # within the junk limit, 100
    assert codes(replies) == [250] * 100 + [214]


# --- Long lines ---------------------------------------------------------------------

def test_overlong_command_line_gets_500_and_session_continues(start_relay):
    client = greeted(start_relay())
    [reply] = client.talk("NOOP " + "x" * 3000)
    assert reply.code == 500
    assert reply.lines[0].startswith("5.5.6")
    assert codes(client.talk("NOOP")) == [250]


def test_command_line_of_2048_bytes_with_its_crlf_is_accepted_and_one_more_is_not(start_relay):
    client = greeted(start_relay())
    longest = "NOOP " + "x" * (2048 - len("NOOP \r\n"))
    assert codes(client.talk(longest, longest + "x", "NOOP")) == [250, 500, 250]


def test_megabyte_line_gets_500_when_it_ends_with_memory_bounded_and_session_continues(start_relay):
    relay = start_relay()
    client = greeted(relay)
    client.send(b"NOOP " + b"x" * 2**20)
    client.send(b"\r\nNOOP\r\n")
    [too_long, noop] = client.reply(), client.reply()
    assert (too_long.code, noop.code) == (500, 250)
    assert too_long.lines[0].startswith("5.5.6")
    assert relay.peak_rss_kb() < 64 * 1024


def test_megabyte_without_any_line_end_gets_500_without_waiting_for_one(start_relay):
    # The client never sends LF: the relay must answer once the limit is
    # passed, not only when (if ever) the line ends.
    relay = start_relay("--timeout", "30")
    client = greeted(relay, timeout=5)
    client.send(b"NOOP " + b"x" * 2**20)
    reply = client.reply()
    assert reply.code == 500
    assert relay.peak_rss_kb() < 64 * 1024


# --- Limits ----------------------------------------------------------------------------

def test_idle_client_gets_421_and_is_disconnected_after_the_timeout(start_relay):
    client = greeted(start_relay("--timeout", "1"))
    assert codes(client.talk("EHLO client.example")) == [250]
    reply = client.reply()      # nothing sent: the relay's timeout speaks first
    assert reply.code == 421
    assert reply.lines[0].startswith("4.4.2")
    assert client.rest() == b""


def test_client_beyond_max_clients_gets_421_and_is_closed_until_a_slot_frees(start_relay):
    relay = start_relay("--max-clients", "2")
    first, second = greeted(relay), greeted(relay)
    third = SMTPClient(relay.connect(timeout=5))
    refusal = third.reply()
    assert refusal.code == 421
    assert refusal.lines[0].startswith("4.3.2")
    assert third.rest() == b""
    assert codes(second.talk("NOOP")) == [250]
    assert codes(first.talk("QUIT")) == [221]
    assert first.rest() == b""      # the client saw its session end: the slot must be free now
    fourth = greeted(relay)
    assert codes(fourth.talk("NOOP")) == [250]


def test_client_beyond_max_clients_per_ip_gets_421_while_other_addresses_are_served(start_relay):
    relay = start_relay("--max-clients-per-ip", "1")
    first = greeted(relay)
    second = SMTPClient(relay.connect(timeout=5))
    refusal = second.reply()
    assert refusal.code == 421
    assert_enhanced(refusal)
    assert second.rest() == b""
    with socket.create_connection((relay.host, relay.port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
        other = SMTPClient(sock)
        assert other.reply().code == 220
        assert codes(other.talk("QUIT")) == [221]
    assert codes(first.talk("QUIT")) == [221]
    assert first.rest() == b""
    assert codes(greeted(relay).talk("NOOP")) == [250]


def test_recipient_beyond_max_recipients_gets_452(start_relay, backend):
    client = greeted(start_relay("--max-recipients", "2"))
    replies = client.talk("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>",
                          "RCPT TO:<d@example.org>")
    assert codes(replies) == [250, 250, 250, 452]
    assert replies[3].lines[0].startswith("4.5.3")
    assert codes(client.talk("DATA")) == [354]
    client.send(BODY + b".\r\n")
    assert client.reply().code == 250
    assert [len(m.rcpt_to) for m in backend.delivered] == [2]


def test_mail_declaring_a_size_over_the_limit_gets_552(start_relay):
    client = greeted(start_relay("--max-message-size", "1000"))
    replies = client.talk("EHLO client.example", "MAIL FROM:<a@example.org> SIZE=1001")
    assert codes(replies) == [250, 552]
    assert replies[1].lines[0].startswith("5.3.4")
    assert codes(client.talk("MAIL FROM:<a@example.org> SIZE=1000")) == [250]


def test_message_growing_over_the_limit_gets_552_is_not_delivered_and_session_continues(start_relay, backend):
    client = greeted(start_relay("--max-message-size", "1000"))
    assert codes(client.talk("EHLO client.example")) == [250]
    reply = send_message(client, b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 20,
                         recipient="b@example.org")
    assert reply.code == 552
    assert reply.lines[0].startswith("5.3.4")
    backend.wait_for_sessions_closed(1)     # the back-end connection was dropped, no terminator sent
    assert backend.delivered == []
    assert send_message(client, b"Subject: small\r\n\r\nfits\r\n", recipient="b@example.org").code == 250
    assert [m.content for m in backend.delivered] == [b"Subject: small\r\n\r\nfits\r\n"]


def test_size_limit_counts_the_message_not_the_dots_that_quote_its_lines(start_relay, backend):
    # RFC 1870 §3: the dots added by dot-stuffing are no part of the size.
    client = greeted(start_relay("--max-message-size", "100"))
    assert codes(client.talk("EHLO client.example")) == [250]
    message = b"Subject: dots\r\n\r\n" + b".line\r\n" * 11 + b"x" * 4 + b"\r\n"     # exactly 100 octets
    assert len(message) == 100
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    assert send_message(client, stuffed, recipient="b@example.org").code == 250
    assert send_message(client, stuffed[:-2] + b"x\r\n", recipient="b@example.org").code == 552
    assert [m.content for m in backend.delivered] == [message]


def test_client_talking_before_the_greeting_is_refused_without_220(start_relay):
    relay = start_relay("--greeting-delay", "30")      # the client speaks at once; 30 s only bounds a failure
    client = SMTPClient(relay.connect(timeout=10))
    client.send(b"EHLO client.example\r\n")
    everything = client.rest()
    assert re.fullmatch(rb"5\d\d 5\.\d+\.\d+ [^\r\n]*\r\n", everything), everything


def test_patient_client_gets_220_after_the_greeting_delay(start_relay):
    relay = start_relay("--greeting-delay", "0.5")
    started = time.monotonic()
    client = SMTPClient(relay.connect(timeout=10))
    assert client.line() == "220 mx.test ESMTP"
    assert time.monotonic() - started >= 0.5
    assert codes(client.talk("EHLO client.example")) == [250]


# --- A real client -------------------------------------------------------------------------

def test_swaks_delivers_a_message_with_pipelining(start_relay, backend):
    relay = start_relay()
    result = subprocess.run(["swaks", "--server", f"{relay.host}:{relay.port}", "--to", "a@example.org",
                             "--from", "b@example.org", "--pipeline", "--timeout", "10"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # swaks' transcript shows what it did: MAIL, RCPT and DATA written before
    # any of their replies was read (it pipelines only when the EHLO offered it).
    transcript = [line.strip() for line in result.stdout.splitlines()]
    mail = transcript.index("-> MAIL FROM:<b@example.org>")
    assert transcript[mail:mail + 6] == ["-> MAIL FROM:<b@example.org>", "-> RCPT TO:<a@example.org>", "-> DATA",
                                         "<-  250 2.1.0 Ok", "<-  250 2.1.5 Ok",
                                         "<-  354 End data with <CR><LF>.<CR><LF>"], result.stdout
    [message] = backend.delivered
    assert (message.mail_from, message.rcpt_to) == (b"MAIL FROM:<b@example.org>", [b"RCPT TO:<a@example.org>"])
