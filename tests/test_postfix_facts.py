"""What a real Postfix 3.7 does, found by experiment, that the relay and the README build on.

No relay here: raw SMTP (helpers.SMTPClient) to a private Postfix (postfix_fixture.py).

A. Local delivery and message_size_limit: local(8) and virtual(8) refuse to
   start when mailbox_size_limit / virtual_mailbox_limit is below
   message_size_limit; smtpd has said 250 by then, so the mail waits in the
   queue. Which main.cf lines deliver.
B. XCLIENT LOGIN counts for permit_sasl_authenticated only where SASL is
   enabled on that smtpd (and smtpd_tls_auth_only does not hide it on a
   plaintext link); SASL needs a server that lists a mechanism (Debian's
   Cyrus with libsasl2-modules, unconfigured, does), or smtpd dies at every
   connection before its greeting.
C. The PROXY protocol (smtpd_upstream_proxy_protocol = haproxy): v1 and v2
   headers, what PROXY UNKNOWN and v2 LOCAL do, whose address XCLIENT is
   offered by; what a Postfix without the setting answers to the headers, and
   what one with it does to a client that sends none.
D. XCLIENT and the EHLO after it in one write (pipelined): taken, and logged
   as improper pipelining (the relay waits for XCLIENT's reply instead; 3.9's
   smtpd_forbid_unauth_pipelining would drop such a client).
"""
import re
import socket
import struct
import time

import pytest

from helpers import SMTPClient
from postfix_fixture import HOSTNAME, needs_cyrus_mechanisms, postfix  # noqa: F401

OUTSIDE = "rcpt@outside.example"
CLIENT = "192.0.2.9"            # an XCLIENT ADDR outside mynetworks (127.0.0.0/8)
PROXIED = "192.0.2.7"           # the client a PROXY header names
README_SIZE_LIMIT = "message_size_limit = 53500000"     # the README's main.cf line
RELAY_MAX_MESSAGE_SIZE = 52428800                       # the README's max-message-size
# The lines recommended beside it: five times message_size_limit, Postfix's own default ratio
# (51200000 = 5 x 10240000).
RECOMMENDED = [README_SIZE_LIMIT, "mailbox_size_limit = 267500000", "virtual_mailbox_limit = 267500000"]
SASL_RELAY_RESTRICTIONS = "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
LISTENER = "127.0.0.1:10025 inet  n       -       n       -       -       smtpd\n"


OPENED = []     # every client socket of the running test, closed after it


@pytest.fixture(autouse=True)
def close_clients():
    yield
    while OPENED:
        OPENED.pop().close()


def connect(pf, proxy_header=None):
    """An SMTPClient on the instance's smtpd; with `proxy_header`, those bytes sent first."""
    client = SMTPClient(socket.create_connection((pf.host, pf.port), timeout=10))
    OPENED.append(client.sock)
    if proxy_header is not None:
        client.send(proxy_header)
    return client


def greeted(pf, proxy_header=None, ehlo="client.example"):
    """connect(), its 220 greeting read and EHLO answered 250 -> (client, the EHLO Reply)."""
    client = connect(pf, proxy_header)
    greeting = client.reply()
    assert greeting.code == 220, greeting
    reply = client.say(f"EHLO {ehlo}")
    assert reply.code == 250, reply
    return client, reply


def keywords(ehlo_reply):
    """The EHLO keywords (upper case) -> {keyword: its parameters}."""
    return {line.split(" ", 1)[0].upper(): line.partition(" ")[2] for line in ehlo_reply.lines[1:]}


def transaction(client, recipients, body=b"Subject: facts\r\n\r\nhello\r\n", sender="a@example.org"):
    """MAIL, RCPT each (all 250), DATA -> the queue id of the 250 to the end of data."""
    assert client.say(f"MAIL FROM:<{sender}>").code == 250
    for recipient in recipients:
        reply = client.say(f"RCPT TO:<{recipient}>")
        assert reply.code == 250, reply
    assert client.say("DATA").code == 354
    client.send(body + b".\r\n")
    reply = client.reply()
    assert reply.code == 250 and "queued as " in reply.text, reply
    return reply.text.rsplit("queued as ", 1)[1].split()[0]


def quit_and_wait(pf, client, since):
    """QUIT (221), then smtpd's `disconnect from` line for it."""
    assert client.say("QUIT").code == 221
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: disconnect from ", since=since)


# --- A. message_size_limit and local / virtual delivery ------------------------------

AGENTS = {"local": "mailbox_size_limit", "virtual": "virtual_mailbox_limit"}


@pytest.mark.parametrize("agent", AGENTS)
def test_the_readmes_size_limit_alone_is_accepted_with_250_but_the_delivery_agent_stops_fatally(postfix, agent):
    pf = postfix(local_delivery=True, virtual_delivery=True, main_cf=README_SIZE_LIMIT)
    recipient = pf.local_recipient if agent == "local" else pf.virtual_recipient
    client, ehlo = greeted(pf)
    assert keywords(ehlo)["SIZE"] == "53500000"
    queue_id = transaction(client, [recipient])
    client.say("QUIT")
    pf.wait_for_log(rf"postfix/{agent}\[\d+\]: fatal: configuration error: "
                    rf"{AGENTS[agent]} is smaller than message_size_limit$")
    pf.wait_for_log(rf"postfix/master\[\d+\]: warning: /usr/lib/postfix/sbin/{agent}: bad command startup -- throttling")
    # master keeps the agent throttled (service_throttle_time, 60 s): the message stays queued.
    assert [m["queue_id"] for m in pf.queue()] == [queue_id]
    assert not pf.log_matches(r"status=sent")
    assert not pf.mailboxes[recipient].exists()


@pytest.mark.parametrize("limits", [
    ["mailbox_size_limit = 267500000", "virtual_mailbox_limit = 267500000"],
    ["mailbox_size_limit = 53500000", "virtual_mailbox_limit = 53500000"],
    ["mailbox_size_limit = 0", "virtual_mailbox_limit = 0"],
], ids=["five-times", "equal", "zero-no-limit"])
def test_mailbox_limits_not_below_message_size_limit_or_zero_let_local_and_virtual_deliver(postfix, limits):
    pf = postfix(local_delivery=True, virtual_delivery=True, main_cf=[README_SIZE_LIMIT, *limits])
    client, _ = greeted(pf)
    queue_id = transaction(client, [pf.local_recipient, pf.virtual_recipient])
    client.say("QUIT")
    for recipient in (pf.local_recipient, pf.virtual_recipient):
        mailbox = pf.wait_for_delivery(recipient)
        assert f"id {queue_id}" in mailbox and "hello" in mailbox, mailbox
    pf.wait_for_log(rf"postfix/qmgr\[\d+\]: {queue_id}: removed")
    assert not pf.log_matches(r"fatal|status=(deferred|bounced)")


def test_with_mailbox_limits_equal_to_message_size_limit_an_mbox_holds_one_largest_message(postfix):
    # In small: 100000 each; two messages of 60000 bytes, each below message_size_limit.
    pf = postfix(local_delivery=True, virtual_delivery=True,
                 main_cf=["message_size_limit = 100000", "mailbox_size_limit = 100000",
                          "virtual_mailbox_limit = 100000"])
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 60
    recipients = [pf.local_recipient, pf.virtual_recipient]
    first = transaction(greeted(pf)[0], recipients, body)
    for recipient in recipients:
        assert f"id {first}" in pf.wait_for_delivery(recipient)
    second = transaction(greeted(pf)[0], recipients, body)
    for recipient in recipients:
        pf.wait_for_log(rf": {second}: to=<{re.escape(recipient)}>, relay=\w+, .* dsn=5\.2\.2, status=bounced "
                        rf"\((cannot update|delivery failed to) mailbox {pf.mailboxes[recipient]}\b.*: File too large\)$")
        assert f"id {second}" not in pf.mailboxes[recipient].read_text()


def test_the_recommended_lines_deliver_the_largest_message_the_relay_takes(postfix):
    pf = postfix(local_delivery=True, virtual_delivery=True, main_cf=RECOMMENDED)
    header = b"Subject: as large as the relay allows\r\n\r\n"
    line = b"x" * 998 + b"\r\n"
    body = line * ((RELAY_MAX_MESSAGE_SIZE - len(header)) // len(line))
    message = header + body + b"y" * (RELAY_MAX_MESSAGE_SIZE - len(header) - len(body) - 2) + b"\r\n"
    assert len(message) == RELAY_MAX_MESSAGE_SIZE
    client, _ = greeted(pf)
    queue_id = transaction(client, [pf.local_recipient, pf.virtual_recipient], message)
    client.say("QUIT")
    for recipient in (pf.local_recipient, pf.virtual_recipient):
        pf.wait_for_delivery(recipient, timeout=30)
        # the mbox holds it with LF line ends, a From_ line and the headers added on delivery
        size = pf.mailboxes[recipient].stat().st_size
        assert RELAY_MAX_MESSAGE_SIZE - RELAY_MAX_MESSAGE_SIZE // 1000 < size < 53500000, size
    pf.wait_for_log(rf"postfix/qmgr\[\d+\]: {queue_id}: removed")


# --- B. XCLIENT LOGIN and permit_sasl_authenticated ----------------------------------

def xclient_login(pf, login="bob"):
    """Greeted and EHLO'd as the relay, then XCLIENT ADDR=CLIENT ... LOGIN=login (220) and the
    client's EHLO -> (client, the relay's EHLO Reply, the client's EHLO Reply)."""
    client, relay_ehlo = greeted(pf, ehlo="relay.test")
    assert "LOGIN" in keywords(relay_ehlo)["XCLIENT"].split()
    reply = client.say(f"XCLIENT ADDR={CLIENT} NAME=[UNAVAILABLE] LOGIN={login}")
    assert reply.code == 220, reply
    client_ehlo = client.say("EHLO client.example")
    assert client_ehlo.code == 250
    return client, relay_ehlo, client_ehlo


@pytest.mark.parametrize("soft_bounce, expected", [
    (False, "554 5.7.1 <rcpt@outside.example>: Relay access denied"),
    (True, "454 4.7.1 <rcpt@outside.example>: Relay access denied"),
], ids=["plain", "soft_bounce"])
def test_without_sasl_enabled_xclient_login_is_taken_silently_and_counts_for_nothing(postfix, soft_bounce, expected):
    pf = postfix(main_cf=[SASL_RELAY_RESTRICTIONS] + (["soft_bounce = yes"] if soft_bounce else []))
    since = pf.mark()
    client, relay_ehlo, _ = xclient_login(pf)
    assert "AUTH" not in keywords(relay_ehlo)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say(f"RCPT TO:<{OUTSIDE}>").text == expected
    quit_and_wait(pf, client, since)
    assert pf.log_matches(rf"NOQUEUE: reject: RCPT from unknown\[{re.escape(CLIENT)}\]: {expected[:9]}", since)
    assert not pf.log_matches(r"sasl_|warning|fatal", since)


@needs_cyrus_mechanisms
def test_sasl_auth_enable_on_the_listener_makes_xclient_login_count_with_debians_cyrus_unconfigured(postfix):
    pf = postfix(main_cf=SASL_RELAY_RESTRICTIONS, listener=LISTENER + "  -o smtpd_sasl_auth_enable=yes\n")
    since = pf.mark()
    client, relay_ehlo, client_ehlo = xclient_login(pf)
    # Cyrus without any smtpd.conf lists the mechanisms of libsasl2-modules (no password
    # database needed); AUTH is offered to the relay and again after XCLIENT.
    for ehlo in (relay_ehlo, client_ehlo):
        assert {"PLAIN", "LOGIN"} <= set(keywords(ehlo)["AUTH"].split()), ehlo
    queue_id = transaction(client, [OUTSIDE])
    quit_and_wait(pf, client, since)
    pf.wait_for_log(rf"postfix/smtpd\[\d+\]: {queue_id}: client=unknown\[{re.escape(CLIENT)}\], "
                    r"sasl_method=XCLIENT, sasl_username=bob$", since=since)
    assert not pf.log_matches(r"warning|fatal", since)
    # That AUTH is no open door: there is no password database behind it.
    client, _ = greeted(pf, ehlo="relay.test")
    assert client.say("AUTH PLAIN AGJvYgBzZWNyZXQ=").text == "535 5.7.8 Error: authentication failed: authentication failure"
    client.say("QUIT")


@needs_cyrus_mechanisms
@pytest.mark.parametrize("override", [False, True], ids=["sasl_auth_enable-only", "and-tls_auth_only=no"])
def test_smtpd_tls_auth_only_in_main_cf_makes_xclient_login_count_for_nothing_on_the_plaintext_listener(
        postfix, override):
    options = ["smtpd_sasl_auth_enable=yes"] + (["smtpd_tls_auth_only=no"] if override else [])
    pf = postfix(main_cf=[SASL_RELAY_RESTRICTIONS, "smtpd_tls_auth_only = yes"],
                 listener=LISTENER + "".join(f"  -o {o}\n" for o in options))
    since = pf.mark()
    client, relay_ehlo, _ = xclient_login(pf)
    assert ("AUTH" in keywords(relay_ehlo)) == override
    if override:
        queue_id = transaction(client, [OUTSIDE])
        pf.wait_for_log(rf"{queue_id}: client=unknown\[{re.escape(CLIENT)}\], sasl_method=XCLIENT, sasl_username=bob$",
                        since=since)
    else:
        assert client.say("MAIL FROM:<a@example.org>").code == 250
        assert client.say(f"RCPT TO:<{OUTSIDE}>").text == "554 5.7.1 <rcpt@outside.example>: Relay access denied"
    quit_and_wait(pf, client, since)
    assert not pf.log_matches(r"warning|fatal", since)


@pytest.mark.parametrize("setup, warning", [
    # mech_list naming none there is, as libsasl2-modules missing (then "no applicable SASL mechanisms")
    ({"config_files": {"sasl/smtpd.conf": "mech_list: nosuchmech\n"}},
     r"warning: xsasl_cyrus_server_get_mechanism_list: (no mechanism available|no applicable SASL mechanisms)$"),
    ({"listener_options": ["smtpd_sasl_type=dovecot", "smtpd_sasl_path=private/auth"]},
     r"warning: SASL: Connect to Dovecot auth socket 'private/auth' failed: No such file or directory"),
], ids=["cyrus-without-mechanisms", "dovecot-without-socket"])
def test_sasl_enabled_without_a_mechanism_makes_smtpd_die_at_every_connection_before_the_greeting(
        postfix, setup, warning):
    options = ["smtpd_sasl_auth_enable=yes", *setup.get("listener_options", [])]
    pf = postfix(main_cf=SASL_RELAY_RESTRICTIONS, config_files=setup.get("config_files"), wait_greeting=False,
                 listener=LISTENER + "".join(f"  -o {o}\n" for o in options))
    client = connect(pf)
    assert client.rest() == b""                 # closed without a byte: no greeting
    pf.wait_for_log(rf"postfix/smtpd\[\d+\]: {warning}")
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: fatal: no SASL authentication mechanisms$")
    pf.wait_for_log(r"postfix/master\[\d+\]: warning: /usr/lib/postfix/sbin/smtpd: bad command startup -- throttling")


# --- C. The PROXY protocol -----------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src=PROXIED):
    return f"PROXY TCP4 {src} 127.0.0.1 40001 25\r\n".encode()


def v2(src=PROXIED):
    """A v2 PROXY command over TCP4: signature, 0x21, 0x11, length 12, addresses, ports."""
    return (V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 12) + socket.inet_aton(src)
            + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 40001, 25))


V2_LOCAL = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
PROXY_UNKNOWN = b"PROXY UNKNOWN\r\n"
LOCAL_ERROR = f"421 4.3.0 {HOSTNAME} Server local error"


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_proxy_protocol_v1_and_v2_name_the_client_for_smtpd_and_the_queue(postfix, header):
    pf = postfix(proxy_protocol=True, main_cf="relay_domains = outside.example")
    since = pf.mark()
    client, ehlo = greeted(pf, header)
    assert "XCLIENT" not in keywords(ehlo)      # 192.0.2.7 is not in smtpd_authorized_xclient_hosts
    queue_id = transaction(client, [OUTSIDE])
    quit_and_wait(pf, client, since)
    assert pf.client_of(queue_id) == f"unknown[{PROXIED}]"
    assert pf.log_matches(rf"postfix/smtpd\[\d+\]: connect from unknown\[{re.escape(PROXIED)}\]$", since)
    assert queue_id in pf.queue_ids()


def test_proxy_unknown_is_refused_with_421_and_the_connection_closed(postfix):
    pf = postfix(proxy_protocol=True)
    since = pf.mark()
    client = connect(pf, PROXY_UNKNOWN)
    assert [r.text for r in client.replies_until_closed()] == [LOCAL_ERROR]
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: warning: haproxy read: bad or missing protocol type: "
                    r"PROXY UNKNOWN\\r\\n$", since=since)


def test_a_v2_local_command_makes_the_session_the_tcp_peers(postfix):
    pf = postfix(proxy_protocol=True)
    since = pf.mark()
    client, ehlo = greeted(pf, V2_LOCAL)
    assert "XCLIENT" in keywords(ehlo)          # the peer, 127.0.0.1, is authorised
    queue_id = transaction(client, [OUTSIDE])   # relayed: 127.0.0.1 is in mynetworks
    quit_and_wait(pf, client, since)
    assert pf.client_of(queue_id) == "localhost[127.0.0.1]"


@pytest.mark.parametrize("header, offered", [
    (v1(PROXIED), True), (v2(PROXIED), True), (v1("192.0.2.8"), False), (V2_LOCAL, False),
], ids=["v1-listed", "v2-listed", "v1-not-listed", "v2-local-tcp-peer"])
def test_xclient_is_offered_by_the_address_in_the_header_not_by_the_tcp_peer(postfix, header, offered):
    pf = postfix(proxy_protocol=True, xclient_hosts=PROXIED)     # the TCP peer, 127.0.0.1, is not listed
    client, ehlo = greeted(pf, header)
    assert ("XCLIENT" in keywords(ehlo)) == offered, ehlo
    client.say("QUIT")


@pytest.mark.parametrize("header", [v1(), PROXY_UNKNOWN], ids=["v1", "unknown"])
def test_a_v1_header_to_a_postfix_without_proxy_protocol_gets_500_after_the_greeting_then_ehlo_250(postfix, header):
    pf = postfix()
    since = pf.mark()
    client = connect(pf, header + b"EHLO relay.test\r\n")
    greeting, first, ehlo = client.reply(), client.reply(), client.reply()
    assert greeting.text == f"220 {HOSTNAME} ESMTP Postfix"
    assert first.text == "500 5.5.2 Error: command not recognized"
    assert ehlo.code == 250 and ehlo.lines[0] == HOSTNAME
    quit_and_wait(pf, client, since)
    assert pf.log_matches(r"disconnect from localhost\[127\.0\.0\.1\] ehlo=1 quit=1 unknown=0/1 commands=2/3$", since)
    assert pf.queue() == []


@pytest.mark.parametrize("header", [v2(), V2_LOCAL], ids=["v2-proxy", "v2-local"])
def test_a_v2_header_to_a_postfix_without_proxy_protocol_gets_500_three_times_then_221_from_its_quit(postfix, header):
    pf = postfix()
    since = pf.mark()
    client = connect(pf, header + b"EHLO relay.test\r\n")
    # "\r\n", "\r\n", "\x00\r\n": bad syntax each; "QUIT\n" (smtpd takes a bare LF): 221, closed.
    assert [r.text for r in client.replies_until_closed()] == [
        f"220 {HOSTNAME} ESMTP Postfix", *["500 5.5.2 Error: bad syntax"] * 3, "221 2.0.0 Bye"]
    pf.wait_for_log(r"disconnect from localhost\[127\.0\.0\.1\] quit=1 commands=1$", since=since)
    assert pf.queue() == []


def test_with_proxy_protocol_a_client_that_sends_no_header_gets_421_at_the_proxy_timeout(postfix):
    pf = postfix(proxy_protocol=True, main_cf="smtpd_upstream_proxy_timeout = 1s")     # default 5s
    since = pf.mark()
    began = time.monotonic()
    client = connect(pf)
    replies = client.replies_until_closed()
    waited = time.monotonic() - began
    assert [r.text for r in replies] == [LOCAL_ERROR]
    assert 0.9 < waited < 4, waited
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: warning: haproxy read: timeout error$", since=since)
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: disconnect from localhost\[127\.0\.0\.1\] commands=0/0$", since=since)


@pytest.mark.parametrize("sent, warning", [
    (b"EHLO relay.test\r\n", r"unrecognized protocol header: EHLO relay\.test\\r\\n"),
    (v1()[:-2], r"missing protocol header terminator: PROXY TCP4 192\.0\.2\.7 127\.0\.0\.1 40001 25"),
], ids=["smtp-first", "v1-without-crlf"])
def test_with_proxy_protocol_what_is_no_whole_header_in_the_first_read_gets_421_at_once(postfix, sent, warning):
    # Postfix reads the header once (no waiting for the rest of it): a header
    # must arrive whole, in one write.
    pf = postfix(proxy_protocol=True)           # smtpd_upstream_proxy_timeout 5s
    since = pf.mark()
    began = time.monotonic()
    client = connect(pf, sent)
    assert [r.text for r in client.replies_until_closed()] == [LOCAL_ERROR]
    assert time.monotonic() - began < 4
    pf.wait_for_log(rf"postfix/smtpd\[\d+\]: warning: haproxy read: {warning}$", since=since)


# --- D. XCLIENT, then EHLO without waiting ----------------------------------------------

def test_xclient_and_ehlo_in_one_write_are_answered_but_logged_as_improper_pipelining(postfix):
    pf = postfix()
    since = pf.mark()
    client, relay_ehlo = greeted(pf, ehlo="relay.test")
    assert "ADDR" in keywords(relay_ehlo)["XCLIENT"].split()
    client.send(f"XCLIENT ADDR={CLIENT} NAME=[UNAVAILABLE]\r\nEHLO client.example\r\n".encode())
    assert client.reply().code == 220
    assert client.reply().code == 250
    quit_and_wait(pf, client, since)
    assert pf.log_matches(r"improper command pipelining after XCLIENT from ", since)
