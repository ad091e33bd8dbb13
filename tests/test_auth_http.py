"""The auth_http lookup (nginx's ngx_mail_auth_http_module), SMTP AUTH, and the checks made before any lookup.

The relay runs as a real subprocess; the auth service is
contrib/auth_http_example.py serving in a thread (and once a real nginx);
back-ends are ScriptedBackends, which record what the relay sent them, or
smtp-sink. Raw sockets are used where the exact exchange matters, smtplib
and swaks where a real client is the point.
"""
import base64
import concurrent.futures
import hashlib
import hmac
import http.server
import re
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from auth_fixtures import RunningAuthService, always, auth_service, nginx, ok, raw_listener  # noqa: F401  (fixtures)
from auth_http_example import AuthHandler, Policy      # contrib/, put on sys.path by auth_fixtures
from helpers import (SMTPClient, assert_closed, b64, can_bind, free_port, greeted, run_relay, send_data,
                     send_message, session_id, session_lines, verbs, xclient_attributes)
from scripted_backend import DEFAULT_EXTENSIONS

SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
BODY = b"Subject: auth_http test\r\n\r\nHello.\r\n"
USERS = {"alice": "Alice-Secret-7"}


# --- Policies: what the auth service answers -----------------------------------------

class InTurn:
    """A policy giving its answers in turn, the last one repeating."""

    def __init__(self, *answers):
        self.answers, self.calls, self.lock = answers, 0, threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.calls += 1
            return list(self.answers[min(self.calls, len(self.answers)) - 1])


def none_headers(helo, mail, rcpt, attempt=1, client_ip="127.0.0.1", client_host="localhost"):
    """The headers nginx sends for Auth-Method none, in its order (nginx's ngx_mail_auth_http_module).

    Client-Host is the client's confirmed name: /etc/hosts gives 127.0.0.1
    as localhost, and no name for ::1 here."""
    return [("Host", "127.0.0.1"), ("Auth-Method", "none"), ("Auth-User", ""), ("Auth-Pass", ""),
            ("Auth-Protocol", "smtp"), ("Auth-Login-Attempt", str(attempt)), ("Client-IP", client_ip),
            ("Client-Host", client_host), ("Auth-SMTP-Helo", helo), ("Auth-SMTP-From", mail),
            ("Auth-SMTP-To", rcpt)]


def auth_headers(method, user, password, salt=None):
    """The headers nginx sends for SMTP AUTH, in its order (nginx's ngx_mail_auth_http_module)."""
    return [("Host", "127.0.0.1"), ("Auth-Method", method), ("Auth-User", user), ("Auth-Pass", password),
            *([("Auth-Salt", salt)] if salt else []), ("Auth-Protocol", "smtp"), ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"), ("Client-Host", "localhost")]


# --- Starting things -----------------------------------------------------------------------

@pytest.fixture
def start(relay, auth_service):
    """start(policy, *options, listen=...) -> (relay, service): the relay, named mx.test, asking `service`.

    Its relays are killed at teardown: stopping is test_stop.py's subject, and
    SIGKILL keeps this file fast."""
    def start(policy, *options, listen="127.0.0.1:0"):
        service = auth_service(policy)
        return relay("--server-name", SERVER_NAME, "--auth-http", service.url, *options, listen=listen,
                     kill=True), service
    return start


@pytest.fixture
def backend(scripted_backend):
    return scripted_backend()


@pytest.fixture
def start_auth(start, backend):
    """start_auth(*options) -> (relay, service): SMTP AUTH required, USERS checked, mail to `backend`."""
    def start_auth(*options, auth="plain,login,cram-md5,external"):
        return start(Policy([backend.address], USERS), "--auth", auth, *options)
    return start_auth


def wait_for_session_end(relay, client):
    """Wait until the relay logged the end of `client`'s session."""
    session_lines(relay, session_id(relay, client.sock))


# --- The lookup at the first RCPT (--auth none) -----------------------------------------

def test_first_rcpt_sends_one_get_with_exactly_the_headers_nginx_sends(start, scripted_backend):
    unused, named = scripted_backend(), scripted_backend()
    relay, service = start(always(*ok(named)), "--auth-http-header", "X-Relay: mx1",
                           "--auth-http-header", "X-Tenant: blue green")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    reply = client.say("MAIL FROM:<a@example.org> SIZE=100")
    assert reply.code == 250
    assert service.requests == [] and named.connections == 0        # MAIL is answered by the relay itself
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert service.requests == [none_headers("client.example", "MAIL FROM:<a@example.org> SIZE=100",
                                             "RCPT TO:<b@example.net>")
                                + [("X-Relay", "mx1"), ("X-Tenant", "blue green")]]
    assert client.say("DATA").code == 354
    client.send(BODY + b".\r\n")
    assert client.reply().code == 250
    [message] = named.delivered
    assert message.mail_from == b"MAIL FROM:<a@example.org> SIZE=100"
    assert message.rcpt_to == [b"RCPT TO:<b@example.net>"]
    assert message.content == BODY
    assert unused.connections == 0
    assert len(service.requests) == 1


def test_auth_smtp_from_and_to_carry_the_command_lines_as_the_client_typed_them(start, backend):
    # nginx's mail proxy passes "the whole command line from the verb to the end of the
    # last argument", copied from the client's buffer: the verb's case too.
    relay, service = start(always(*ok(backend)))
    client = greeted(relay)
    assert client.say("HELO client.example").code == 250
    assert client.say("mail From:<a@example.org>").code == 250
    assert client.say("rcpt to:<b@example.net>").code == 250
    [request] = service.requests
    assert request == none_headers("client.example", "mail From:<a@example.org>", "rcpt to:<b@example.net>")


def test_helo_is_empty_when_the_client_sent_none(start, backend):
    relay, service = start(always(*ok(backend)))
    client = greeted(relay)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert service.requests == [none_headers("", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>")]


def test_backend_may_be_named_by_the_host_name_localhost(start, backend):
    relay, service = start(always(("Auth-Status", "OK"), ("Auth-Server", "localhost"),
                                  ("Auth-Port", str(backend.port))))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [message] = backend.delivered
    assert message.rcpt_to == [b"RCPT TO:<b@example.net>"]


def test_refusal_answers_rcpt_with_535_and_the_session_goes_on(start, backend):
    def policy(request):
        if "bad" in request["Auth-SMTP-To"]:
            return [("Auth-Status", "Bad recipient")]
        return ok(backend)

    relay, service = start(policy)
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<bad@example.net>").text == "535 5.7.0 Bad recipient"
    assert backend.connections == 0
    assert client.say("RCPT TO:<good@example.net>").code == 250
    assert send_data(client, BODY).code == 250
    assert client.say("QUIT").code == 221
    [message] = backend.delivered
    assert message.rcpt_to == [b"RCPT TO:<good@example.net>"]
    assert [(dict(r)["Auth-SMTP-To"], dict(r)["Auth-Login-Attempt"]) for r in service.requests] == \
        [("RCPT TO:<bad@example.net>", "1"), ("RCPT TO:<good@example.net>", "2")]


def test_auth_error_code_replaces_535_5_7_0(start):
    relay, service = start(always(("Auth-Status", "Bad recipient"), ("Auth-Error-Code", "550 5.1.1")))
    client = greeted(relay)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").text == "550 5.1.1 Bad recipient"
    assert client.say("QUIT").code == 221


def test_auth_wait_holds_the_refusal_back_that_many_seconds(start):
    relay, service = start(always(("Auth-Status", "Bad recipient"), ("Auth-Wait", "1")))
    client = greeted(relay)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    began = time.monotonic()
    reply = client.say("RCPT TO:<b@example.net>")
    elapsed = time.monotonic() - began
    assert reply.text == "535 5.7.0 Bad recipient"
    assert 0.95 <= elapsed < 30
    assert client.say("NOOP").code == 250


def test_wait_status_asks_again_after_auth_wait_and_the_ok_delivers(start, backend):
    policy = InTurn([("Auth-Status", "WAIT"), ("Auth-Wait", "1")], ok(backend))
    relay, service = start(policy)
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    began = time.monotonic()
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert time.monotonic() - began >= 0.95
    assert client.say("DATA").code == 354
    client.send(BODY + b".\r\n")
    assert client.reply().code == 250
    expected = none_headers("client.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>")
    assert service.requests == [expected, expected]     # the same request: the same attempt number (nginx)
    assert len(backend.delivered) == 1


def test_ok_without_auth_server_gets_451_and_the_session_goes_on(start, backend):
    relay, service = start(always(("Auth-Status", "OK"), ("Auth-Port", str(backend.port))))
    client = greeted(relay)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").text.startswith("451 4.3.2")
    assert client.say("NOOP").code == 250
    assert client.say("QUIT").code == 221
    assert backend.connections == 0


def test_bad_auth_port_gets_451_and_the_session_goes_on(start):
    ports = ["x", "0", "70000", "", "-25"]

    def policy(request):       # RCPT TO:<N@example.net> asks for the Nth bad port
        n = int(re.fullmatch(r"RCPT TO:<(\d+)@example\.net>", request["Auth-SMTP-To"])[1])
        return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", ports[n])]

    relay, service = start(policy)
    client = greeted(relay)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    for n, port in enumerate(ports):
        assert client.say(f"RCPT TO:<{n}@example.net>").text.startswith("451 4.3.2"), f"Auth-Port {port!r}"
    assert client.say("NOOP").code == 250
    assert len(service.requests) == len(ports)


def test_service_that_is_down_gets_451_and_one_log_line_saying_why(relay):
    url = f"http://127.0.0.1:{free_port()}/auth"
    r = relay("--server-name", SERVER_NAME, "--auth-http", url, kill=True)
    client = greeted(r)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").text.startswith("451 4.3.2")
    assert client.say("QUIT").code == 221
    wait_for_session_end(r, client)
    [line] = [line for line in r.log_text().splitlines() if "auth service" in line]
    assert url in line and "refused" in line.lower()


def test_service_that_never_answers_gets_451_after_auth_http_timeout(relay, raw_listener):
    hung = raw_listener(None)
    r = relay("--server-name", SERVER_NAME, "--auth-http", hung.url, "--auth-http-timeout", "1", kill=True)
    client = greeted(r)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    began = time.monotonic()
    assert client.say("RCPT TO:<b@example.net>").text.startswith("451 4.3.2")
    assert 0.95 <= time.monotonic() - began < 30
    assert len(hung.heads) == 1
    assert "timed out" in r.wait_for_log("auth service .*").group()
    assert client.say("QUIT").code == 221


def test_service_answering_nonsense_gets_451(relay, raw_listener):
    garbage = raw_listener(b"SSH-2.0-OpenSSH_9.2\r\nthis is no HTTP\r\n\r\n")
    r = relay("--server-name", SERVER_NAME, "--auth-http", garbage.url, kill=True)
    client = greeted(r)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").text.startswith("451 4.3.2")
    assert len(garbage.heads) == 1
    assert client.say("QUIT").code == 221


# --- What a client can put into the request ------------------------------------------------

def test_client_cannot_add_headers_through_helo_or_mail(start, backend):
    relay, service = start(always(*ok(backend)))
    client = greeted(relay)
    assert client.say(b"EHLO client.example\rX-Injected: helo").code == 500
    assert client.say(b"MAIL FROM:<a@example.org>\rX-Injected: mail").code == 500
    assert client.say(b"MAIL FROM:<a@example.org>\x00X-Injected: nul").code == 500
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert service.requests == [none_headers("client.example", "MAIL FROM:<a@example.org>",
                                             "RCPT TO:<b@example.net>")]


def test_quoted_local_part_reaches_the_service_and_control_characters_never_do(start, backend):
    relay, service = start(always(*ok(backend)))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    # RFC 5321 §4.1.2: no TAB inside a quoted string, only printable ASCII and quoted pairs.
    assert client.say('MAIL FROM:<"a\tb"@example.org>').code == 501
    assert client.say('MAIL FROM:<"a b c%d+e:\\"q\\""@example.org>').code == 250
    assert client.say("RCPT TO:<b@example.net>").code == 250
    [request] = service.requests
    assert request == none_headers("client.example", 'MAIL FROM:<"a b c%d+e:\\"q\\""@example.org>',
                                   "RCPT TO:<b@example.net>")
    assert not any(re.search(r"[\x00-\x1f\x7f]", value) for _, value in request)


def test_utf8_addresses_reach_the_service_as_utf8(start, backend):
    relay, service = start(always(*ok(backend)))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<δοκιμή@παράδειγμα.example> SMTPUTF8").code == 250
    assert client.say("RCPT TO:<用户@例子.example>").code == 250
    [request] = service.requests
    # http.server decodes header bytes as Latin-1; undo that to see the bytes sent.
    sent = [(name, value.encode("latin-1").decode("utf-8")) for name, value in request]
    assert sent == none_headers("client.example", "MAIL FROM:<δοκιμή@παράδειγμα.example> SMTPUTF8",
                                "RCPT TO:<用户@例子.example>")


def test_auth_user_and_pass_are_escaped_as_nginx_does(start, backend):
    # nginx's escaping of Auth-User and Auth-Pass: control bytes, space and % as %XX (upper-case hex); + and 8-bit bytes raw.
    # DEL is a control byte too: it never reaches a header raw.
    cases = [("a b%c", "p+w d", b"a%20b%25c", b"p+w%20d"),
             ("\u00fc\x01x", "tab\there\x7f\x1f", b"\xc3\xbc%01x", b"tab%09here%7F%1F")]
    relay, service = start(Policy([backend.address], {user: password for user, password, _, _ in cases}),
                           "--auth", "plain")
    for user, password, escaped_user, escaped_password in cases:
        client = greeted(relay)
        credentials = b64("\0" + user + "\0" + password)
        assert client.say(f"AUTH PLAIN {credentials}").code == 235
        sent = dict(service.requests[-1])
        # http.server decodes header bytes as Latin-1; undo that to see the bytes sent.
        assert (sent["Auth-User"].encode("latin-1"), sent["Auth-Pass"].encode("latin-1")) == \
            (escaped_user, escaped_password)


# --- Keep-alive and concurrency -------------------------------------------------------------

def test_sequential_sessions_reuse_one_connection_to_the_service(start, backend):
    relay, service = start(always(*ok(backend)))
    for i in range(5):
        client = greeted(relay)
        assert client.say("EHLO client.example").code == 250
        assert send_message(client, BODY, recipient=f"r{i}@example.net").code == 250
        assert client.say("QUIT").code == 221
    assert [dict(r)["Auth-SMTP-To"] for r in service.requests] == [f"RCPT TO:<r{i}@example.net>" for i in range(5)]
    assert service.connections == 1
    assert len(backend.delivered) == 5


def test_concurrent_sessions_each_get_their_own_answer(start, scripted_backend):
    backends = [scripted_backend(), scripted_backend()]
    sessions = 8
    all_asking = threading.Barrier(sessions, timeout=20)

    def policy(request):
        all_asking.wait()       # every lookup is in flight at once before any is answered
        i = int(re.fullmatch(r"(?i)RCPT TO:<r(\d+)@example\.net>", request["Auth-SMTP-To"])[1])
        return ok(backends[i % 2], ("Auth-User", f"user{i}"))

    relay, service = start(policy)

    def send(i):
        client = relay.smtp()
        client.ehlo(f"client{i}.example")
        client.sendmail(f"s{i}@example.org", [f"r{i}@example.net"], b"Subject: %d\r\n\r\nmessage %d\r\n" % (i, i))
        client.quit()

    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        for future in [pool.submit(send, i) for i in range(sessions)]:
            future.result(timeout=30)
    for k, backend in enumerate(backends):
        seen = []
        for session in backend.sessions:
            [message] = session.messages
            i = int(re.fullmatch(rb"RCPT TO:<r(\d+)@example\.net>", message.rcpt_to[0])[1])
            xclient = xclient_attributes(session)
            assert (i % 2, message.rcpt_to, xclient["LOGIN"], xclient["HELO"]) == \
                (k, [b"RCPT TO:<r%d@example.net>" % i], f"user{i}", f"client{i}.example")
            assert message.mail_from.startswith(b"MAIL FROM:<s%d@example.org>" % i)
            assert message.content == b"Subject: %d\r\n\r\nmessage %d\r\n" % (i, i)
            seen.append(i)
        assert sorted(seen) == list(range(k, sessions, 2))


def test_with_scope_transaction_a_second_transaction_is_looked_up_again_with_the_next_attempt_number(
        start, backend):
    relay, service = start(always(*ok(backend)), "--auth-http-scope", "transaction")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY, "a1@example.org", "b1@example.net").code == 250
    assert send_message(client, BODY, "a2@example.org", "b2@example.net").code == 250
    assert service.requests == [
        none_headers("client.example", "MAIL FROM:<a1@example.org>", "RCPT TO:<b1@example.net>", attempt=1),
        none_headers("client.example", "MAIL FROM:<a2@example.org>", "RCPT TO:<b2@example.net>", attempt=2),
    ]
    assert [m.rcpt_to for m in backend.delivered] == [[b"RCPT TO:<b1@example.net>"], [b"RCPT TO:<b2@example.net>"]]


def test_by_default_one_ok_answer_holds_for_the_session_as_nginx(start, backend):
    relay, service = start(always(*ok(backend)))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    for n in (1, 2, 3):
        assert send_message(client, BODY, f"a{n}@example.org", f"b{n}@example.net").code == 250
    assert service.requests == [
        none_headers("client.example", "MAIL FROM:<a1@example.org>", "RCPT TO:<b1@example.net>", attempt=1)]
    assert [m.mail_from for m in backend.delivered] == [f"MAIL FROM:<a{n}@example.org>".encode() for n in (1, 2, 3)]
    assert backend.connections == 1


def test_by_default_a_refused_transaction_is_asked_about_again_in_the_next_one(start, backend):
    def policy(request):
        if "bad" in request["Auth-SMTP-From"]:
            return [("Auth-Status", "Bad sender")]
        return ok(backend)

    relay, service = start(policy)
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<bad@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").text == "535 5.7.0 Bad sender"
    assert client.say("RSET").code == 250
    assert send_message(client, BODY, "good@example.org", "b@example.net").code == 250
    assert [dict(r)["Auth-SMTP-From"] for r in service.requests] == \
        ["MAIL FROM:<bad@example.org>", "MAIL FROM:<good@example.org>"]
    [message] = backend.delivered
    assert message.mail_from == b"MAIL FROM:<good@example.org>"


# --- Configuration ------------------------------------------------------------------------------

def test_backend_together_with_auth_http_stops_the_relay_with_status_1():
    result = run_relay("--backend", "127.0.0.1:25", "--auth-http", "http://127.0.0.1:9/auth",
                       listen="127.0.0.1:0")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "--backend" in line and "--auth-http" in line


def test_auth_methods_without_auth_http_stop_the_relay_with_a_line_naming_auth():
    result = run_relay("--backend", "127.0.0.1:25", "--auth", "plain", listen="127.0.0.1:0")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("smtprelay: --auth:") and "--auth-http" in line


# --- SMTP AUTH (RFC 4954) ------------------------------------------------------------------------

def test_ehlo_advertises_the_configured_mechanisms(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    reply = client.say("EHLO client.example")
    assert reply.code == 250
    assert "AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL" in reply.lines


def test_mail_before_auth_is_refused_with_530_when_auth_is_required(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text.startswith("530 5.7.0")
    assert service.requests == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_smtplib_login_gets_535_for_a_bad_password_and_235_for_the_good_one_which_delivers(start_auth, backend,
                                                                                           mechanism):
    relay, service = start_auth()
    client = relay.smtp()
    client.ehlo("client.example")
    client.esmtp_features["auth"] = mechanism      # make smtplib use this one
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.login("alice", "wrong")
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error.startswith(b"5.7.0")
    with pytest.raises(smtplib.SMTPSenderRefused) as mail:
        client.sendmail("a@example.org", ["b@example.net"], BODY)
    assert mail.value.smtp_code == 530
    assert backend.connections == 0
    assert client.login("alice", USERS["alice"])[0] == 235
    client.sendmail("a@example.org", ["b@example.net"], BODY)
    [message] = backend.delivered
    assert message.content == BODY
    assert [dict(r)["Auth-Method"] for r in service.requests] == \
        ["cram-md5" if mechanism == "CRAM-MD5" else "plain"] * 2


def swaks(relay, mechanism, password):
    return subprocess.run(
        ["swaks", "--server", relay.host, "--port", str(relay.port), "--ehlo", "client.example",
         "--from", "a@example.org", "--to", "b@example.net", "--timeout", "20",
         "-a", mechanism, "-au", "alice", "-ap", password],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_swaks_authenticates_with_plain_login_and_cram_md5_and_delivers(start_auth, backend):
    relay, service = start_auth()
    for n, mechanism in enumerate(["PLAIN", "LOGIN", "CRAM-MD5"], 1):
        result = swaks(relay, mechanism, USERS["alice"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "<-  235 2.7.0 " in result.stdout, result.stdout
        assert len(backend.delivered) == n


def test_swaks_with_a_bad_password_gets_535_with_each_mechanism(start_auth, backend):
    relay, service = start_auth()
    for mechanism in ["PLAIN", "LOGIN", "CRAM-MD5"]:
        result = swaks(relay, mechanism, "wrong")
        assert result.returncode == 28, result.stdout + result.stderr     # swaks: authentication failed
        assert "<** 535 5.7.0 " in result.stdout, result.stdout
    assert backend.connections == 0


def test_plain_works_with_and_without_an_initial_response(start_auth, backend):
    relay, service = start_auth()
    credentials = b64("\0alice\0" + USERS["alice"])
    client = greeted(relay)
    assert client.say(f"AUTH PLAIN {credentials}").code == 235
    assert send_message(client, BODY).code == 250
    client = greeted(relay)
    challenge = client.say("AUTH PLAIN")
    assert (challenge.code, challenge.lines) == (334, [""])       # "334 ", nothing after the space
    assert client.say(credentials).code == 235
    assert send_message(client, BODY).code == 250
    assert service.requests == [auth_headers("plain", "alice", USERS["alice"])] * 2
    assert len(backend.delivered) == 2


def test_star_cancels_the_exchange_with_501_and_the_session_goes_on(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    for mechanism in ["PLAIN", "CRAM-MD5", "EXTERNAL"]:      # four 501s: below --max-errors 5
        assert client.say(f"AUTH {mechanism}").code == 334
        assert client.say("*").code == 501, mechanism
    assert client.say("AUTH LOGIN").code == 334
    assert client.say(b64("alice")).code == 334
    assert client.say("*").code == 501
    assert client.say("NOOP").code == 250
    assert service.requests == []


def test_bad_base64_is_refused_with_501_5_5_2(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    assert client.say("AUTH PLAIN !!notbase64!!").text.startswith("501 5.5.2")
    assert client.say("AUTH LOGIN YWxp=ZQ").text.startswith("501 5.5.2")
    assert client.say("AUTH PLAIN").code == 334
    assert client.say("not base64").text.startswith("501 5.5.2")
    assert client.say("NOOP").code == 250
    assert service.requests == []


def test_unknown_mechanism_is_refused_with_504_5_5_4(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    for command in ["AUTH NTLM", "AUTH DIGEST-MD5", "AUTH XOAUTH2 dG9rZW4="]:
        assert client.say(command).text.startswith("504 5.5.4"), command
    assert service.requests == []


def test_second_auth_after_success_is_refused_with_503(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    credentials = b64("\0alice\0" + USERS["alice"])
    assert client.say(f"AUTH PLAIN {credentials}").code == 235
    assert client.say(f"AUTH PLAIN {credentials}").code == 503
    assert len(service.requests) == 1


def test_login_is_asked_about_as_auth_method_plain(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    assert client.say("AUTH LOGIN").text == "334 VXNlcm5hbWU6"
    assert client.say(b64("alice")).text == "334 UGFzc3dvcmQ6"
    assert client.say(b64(USERS["alice"])).code == 235
    assert service.requests == [auth_headers("plain", "alice", USERS["alice"])]


def test_cram_md5_sends_the_salt_and_the_hex_digest(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    challenge = client.say("AUTH CRAM-MD5")
    assert challenge.code == 334
    salt = base64.b64decode(challenge.lines[0]).decode()
    assert re.fullmatch(r"<\d+\.\d+@mx\.test>", salt)
    digest = hmac.new(USERS["alice"].encode(), salt.encode(), hashlib.md5).hexdigest()
    assert client.say(b64(f"alice {digest}")).code == 235
    assert service.requests == [auth_headers("cram-md5", "alice", digest, salt=salt)]
    assert re.fullmatch(r"[0-9a-f]{32}", dict(service.requests[0])["Auth-Pass"])


def test_external_sends_the_identity_as_user_and_an_empty_password(start_auth):
    relay, service = start_auth()
    client = greeted(relay)
    assert client.say(f"AUTH EXTERNAL {b64('alice')}").code == 235
    client = greeted(relay)
    assert client.say("AUTH EXTERNAL").code == 334
    assert client.say(b64("alice")).code == 235
    assert service.requests == [auth_headers("external", "alice", "")] * 2


def test_with_none_and_plain_unauthenticated_mail_flows_and_auth_works_too(start_auth, backend):
    relay, service = start_auth(auth="none,plain")
    client = greeted(relay)
    ehlo = client.say("EHLO client.example")
    assert ehlo.code == 250 and "AUTH PLAIN" in ehlo.lines
    assert send_message(client, BODY).code == 250
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + USERS['alice'])}").code == 235
    assert send_message(client, BODY).code == 250
    assert service.requests == [
        none_headers("client.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"),
        auth_headers("plain", "alice", USERS["alice"]),
    ]
    assert len(backend.delivered) == 2


def test_failed_auth_leaves_no_credentials_in_the_later_lookup_without_auth(start_auth):
    # nginx 1.29.1 fixed stale login and password riding along with Auth-Method none.
    relay, service = start_auth(auth="none,plain")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'wrong')}").code == 535
    assert send_message(client, BODY).code == 250
    assert service.requests == [
        auth_headers("plain", "alice", "wrong"),
        none_headers("client.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", attempt=2),
    ]


# --- Towards the back-end after a lookup ----------------------------------------------------

def test_xclient_carries_the_authenticated_login_xtext_encoded(start, backend):
    relay, service = start(Policy([backend.address], {"a b+c=d": "pw"}), "--auth", "plain")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'a b+c=d' + chr(0) + 'pw')}").code == 235
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    attributes = xclient_attributes(session)
    assert (attributes["ADDR"], attributes["LOGIN"]) == ("127.0.0.1", "a+20b+2Bc+3Dd")


AUTH_BACKEND = dict(extensions=[*DEFAULT_EXTENSIONS, "AUTH PLAIN LOGIN"],
                    replies={"AUTH": "235 2.7.0 Authentication successful"})


def test_backend_auth_authenticates_to_the_backend_and_leaves_login_out_of_xclient(start, scripted_backend):
    backend = scripted_backend(**AUTH_BACKEND)
    relay, service = start(Policy([backend.address], USERS), "--auth", "plain", "--backend-auth", "relay:pw")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + USERS['alice'])}").code == 235
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    said = verbs(session)
    assert said.index(b"XCLIENT") < said.index(b"AUTH") < said.index(b"MAIL")
    assert "LOGIN" not in xclient_attributes(session)
    assert session.commands[said.index(b"AUTH")] == b"AUTH PLAIN " + b64("\0relay\0pw").encode()
    assert len(backend.delivered) == 1


def test_credentials_from_the_service_replace_backend_auth(start, scripted_backend):
    backend = scripted_backend(**AUTH_BACKEND)
    relay, service = start(always(*ok(backend, ("Auth-User", "svc"), ("Auth-Pass", "svc-pw"))),
                           "--backend-auth", "relay:pw")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert [c for c in session.commands if c.upper().startswith(b"AUTH")] == \
        [b"AUTH PLAIN " + b64("\0svc\0svc-pw").encode()]
    assert "LOGIN" not in xclient_attributes(session)
    assert len(backend.delivered) == 1


# --- Local checks, made before any lookup -----------------------------------------------------

def test_client_outside_allow_from_gets_554_and_is_closed_without_greeting(start):
    relay, service = start(always(("Auth-Status", "OK")), "--allow-from", "10.0.0.0/8")
    client = SMTPClient(relay.connect())
    assert client.line() == "554 5.7.1 Access denied"
    assert client.rest() == b""
    assert service.requests == []


def test_client_inside_allow_from_is_served(start, backend):
    relay, service = start(always(*ok(backend)), "--allow-from", "10.0.0.0/8", "--allow-from", "127.0.0.0/8")
    client = greeted(relay)
    assert send_message(client, BODY).code == 250
    assert len(service.requests) == 1


@pytest.mark.skipif(not can_bind("::1"), reason="no IPv6 loopback here: cannot bind [::1]")
@pytest.mark.parametrize("allow_from, served", [("::1/128", True), ("127.0.0.0/8", False)])
def test_ipv6_client_is_checked_against_allow_from(start, backend, allow_from, served):
    relay, service = start(always(*ok(backend)), "--allow-from", allow_from, listen="[::1]:0")
    client = SMTPClient(relay.connect())
    if not served:
        assert client.line() == "554 5.7.1 Access denied"
        assert client.rest() == b""
        assert service.requests == []
        return
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    assert service.requests == [none_headers("client.example", "MAIL FROM:<a@example.org>",
                                             "RCPT TO:<b@example.net>", client_ip="::1",
                                             client_host="[UNAVAILABLE]")]


def test_allow_sender_is_a_full_case_insensitive_match_checked_before_any_lookup(start, backend):
    relay, service = start(always(*ok(backend)), "--allow-sender", r".*@good\.example",
                           "--auth-http-scope", "transaction")
    client = greeted(relay)
    for sender in ["x@good.example.evil", "x@bad.example", "good.example@evil.example",
                   "x@good.examplex"]:
        assert client.say(f"MAIL FROM:<{sender}>").text == "550 5.7.1 Sender address rejected: not allowed"
        assert client.say("RCPT TO:<b@example.net>").code == 503
    assert service.requests == []
    for sender in ["x@good.example", "X@GOOD.EXAMPLE"]:
        assert client.say(f"MAIL FROM:<{sender}>").code == 250
        assert client.say("RCPT TO:<b@example.net>").code == 250
        assert client.say("RSET").code == 250
    assert [dict(r)["Auth-SMTP-From"] for r in service.requests] == \
        ["MAIL FROM:<x@good.example>", "MAIL FROM:<X@GOOD.EXAMPLE>"]


def test_allow_recipient_is_a_full_case_insensitive_match_checked_before_any_lookup(start, backend):
    relay, service = start(always(*ok(backend)), "--allow-recipient", r".*@good\.example")
    client = greeted(relay)
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    for recipient in ["x@good.example.evil", "x@bad.example", "good.example@evil.example"]:
        assert client.say(f"RCPT TO:<{recipient}>").text == "550 5.7.1 Recipient address rejected: not allowed"
    assert service.requests == []
    assert backend.connections == 0
    for recipient in ["x@good.example", "X@GOOD.EXAMPLE"]:
        assert client.say(f"RCPT TO:<{recipient}>").code == 250
    asked = [dict(r)["Auth-SMTP-To"] for r in service.requests]
    assert asked[0] == "RCPT TO:<x@good.example>"
    assert set(asked) <= {"RCPT TO:<x@good.example>", "RCPT TO:<X@GOOD.EXAMPLE>"}
    assert [c for c in backend.sessions[0].commands if c.startswith(b"RCPT")] == \
        [b"RCPT TO:<x@good.example>", b"RCPT TO:<X@GOOD.EXAMPLE>"]


# --- Secrets stay out of the log --------------------------------------------------------------

def test_debug_log_holds_no_password_and_no_base64_of_auth_data(start, scripted_backend):
    backend = scripted_backend(**AUTH_BACKEND)
    relay, service = start(Policy([backend.address], USERS), "--auth", "plain,login", "--log-level", "debug",
                           "--backend-auth", "relay:Relay-Secret-9")
    password = USERS["alice"]
    client = greeted(relay)
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'Wrong-Secret-3')}").code == 535
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + password)}").code == 235
    assert send_message(client, BODY).code == 250
    assert client.say("QUIT").code == 221
    wait_for_session_end(relay, client)
    client = greeted(relay)
    assert client.say("AUTH LOGIN").code == 334
    assert client.say(b64("alice")).code == 334
    assert client.say(b64(password)).code == 235
    assert client.say("QUIT").code == 221
    wait_for_session_end(relay, client)
    assert b"AUTH PLAIN " + b64("\0relay\0Relay-Secret-9").encode() in backend.sessions[0].commands
    log = relay.log_text()
    assert " C: AUTH PLAIN " in log         # the dialogue is logged at debug level
    for secret in [password, "Wrong-Secret-3", "Relay-Secret-9"]:
        for shown in [secret, b64(secret), b64("\0alice\0" + secret), b64("\0relay\0" + secret)]:
            assert shown not in log


# --- The service on IPv6, its error codes, the DEL byte ---------------------------------------

class V6AuthService(RunningAuthService):
    """auth_http_example's handler on [::1]:<port 0>, answering with `policy`."""

    @staticmethod
    def make_server(policy):
        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server = Server(("::1", 0), AuthHandler)
        server.daemon_threads = True
        server.policy, server.verbose = policy, False
        server.requests, server.connections, server.lock = [], 0, threading.Lock()
        return server


def test_auth_http_on_ipv6_loopback_sends_host_in_brackets(relay, scripted_backend):
    if not can_bind("::1"):
        pytest.skip("this host has no IPv6 loopback (::1)")
    backend = scripted_backend()
    service = V6AuthService(always(*ok(backend)))
    try:
        r = relay("--auth-http", service.url, kill=True)
        client = greeted(r, ehlo=CLIENT_HELO)
        assert send_message(client, BODY).code == 250
        with service.server.lock:
            [request] = service.server.requests
        assert dict(request)["Host"] == "[::1]"
    finally:
        service.stop()


@pytest.mark.parametrize("where", ["RCPT", "AUTH"])
def test_auth_error_code_421_gives_that_reply_and_closes_the_session(relay, auth_service, where):
    service = auth_service(always(("Auth-Status", "Try later"), ("Auth-Error-Code", "421 4.7.0")))
    r = relay("--auth-http", service.url, *(["--auth", "none,plain"] if where == "AUTH" else []), kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    if where == "AUTH":
        reply = client.say("AUTH PLAIN " + b64("\0alice\0secret"))
    else:
        assert client.say("MAIL FROM:<a@example.org>").code == 250
        reply = client.say("RCPT TO:<b@example.net>")
    assert reply.text == "421 4.7.0 Try later"
    assert_closed(client)


def test_del_in_the_auth_user_and_password_is_sent_as_percent_7f(relay, scripted_backend, auth_service):
    backend = scripted_backend()
    service = auth_service(always(*ok(backend)))
    r = relay("--auth-http", service.url, "--auth", "plain", kill=True)
    client = greeted(r, ehlo=CLIENT_HELO)
    assert client.say("AUTH PLAIN " + b64("\0al\x7fice\0se\x7fcret")).code == 235
    [request] = service.requests
    assert (dict(request)["Auth-User"], dict(request)["Auth-Pass"]) == ("al%7Fice", "se%7Fcret")


# --- A real nginx as the auth service ----------------------------------------------------------

def test_relay_delivers_where_a_real_nginx_auth_http_answer_says(relay, nginx, smtp_sink):
    sink = smtp_sink()
    server = nginx("location = /auth { add_header Auth-Status OK; add_header Auth-Server 127.0.0.1; "
                   f"add_header Auth-Port {sink.port}; return 204; }}")
    r = relay("--server-name", SERVER_NAME, "--auth-http", server.url, "--no-xclient",     # no ADDR in its XCLIENT
              kill=True)
    client = greeted(r)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [message] = sink.wait_for_messages(1)
    assert (message.mail_args, message.rcpt_args) == ("<a@example.org>", ["<b@example.net>"])
    assert message.body_crlf == BODY
    assert server.wait_for_access_log(1) == ["none|MAIL FROM:<a@example.org>|RCPT TO:<b@example.net>|127.0.0.1"]


# --- Found in review: each message runs under its own answer's identity -------------------

def test_a_later_message_with_another_answer_gets_a_new_backend_connection_not_the_old_login(start,
                                                                                            scripted_backend):
    backend = scripted_backend(**AUTH_BACKEND)

    def policy(request):
        if "alice@" in request["Auth-SMTP-From"]:
            return ok(backend, ("Auth-User", "alice"), ("Auth-Pass", "alice-pw"))
        return ok(backend)

    relay, service = start(policy, "--auth-http-scope", "transaction")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY, "alice@example.org", "b@example.net").code == 250
    assert send_message(client, BODY, "mallory@example.org", "b@example.net").code == 250
    first, second = backend.sessions
    assert [c for c in first.commands if c.upper().startswith(b"AUTH")] == [b"AUTH PLAIN " + b64("\0alice\0alice-pw").encode()]
    assert [c for c in second.commands if c.upper().startswith(b"AUTH")] == []
    assert [m.mail_from for m in first.messages] == [b"MAIL FROM:<alice@example.org>"]
    assert [m.mail_from for m in second.messages] == [b"MAIL FROM:<mallory@example.org>"]


def test_auth_error_code_without_an_enhanced_code_is_sent_with_its_class_s_one(start, backend):
    # EHLO offers ENHANCEDSTATUSCODES: RFC 2034 §3 wants one on the line (RFC 3463's X.0.0).
    relay, service = start(always(("Auth-Status", "Go away"), ("Auth-Error-Code", "550")))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").text == "550 5.0.0 Go away"


def test_auth_without_a_mechanism_is_a_syntax_error_and_a_long_initial_response_fits(start, backend):
    relay, service = start(Policy([backend.address], {"alice": "x" * 6000}), "--auth", "plain")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("AUTH").code == 501
    # RFC 4954 §4: an AUTH line may be 12288 octets, beyond the 2048 of other commands.
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'x' * 6000)}").code == 235
    assert client.say("NOOP " + "y" * 5000).code == 500


def test_mail_auth_parameter_of_rfc_4954_is_accepted_and_not_passed_on(start, backend):
    relay, service = start(Policy([backend.address], USERS), "--auth", "plain")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + USERS['alice'])}").code == 235
    assert client.say("MAIL FROM:<a@example.org> AUTH=<>").code == 250
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert client.say("DATA").code == 354
    client.send(BODY + b".\r\n")
    assert client.reply().code == 250
    [message] = backend.delivered
    assert message.mail_from == b"MAIL FROM:<a@example.org>"


def test_allow_recipient_cannot_be_passed_with_a_second_at_sign(start, backend):
    relay, service = start(always(*ok(backend)), "--allow-recipient", r".*@allowed\.example")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<victim@evil.example@allowed.example>").code == 501
    assert client.say('RCPT TO:<"victim@allowed.example>').code == 501
    assert service.requests == []
