"""TLS: STARTTLS and implicit TLS for clients, client certificates, TLS towards back-ends, SIGHUP.

The relay runs as a real subprocess with certificates trustme makes for each
test (tls_fixtures.py); clients are raw sockets wrapped by ssl where the
exact exchange matters, smtplib, swaks and openssl s_client where a real
client is the point. Back-ends are ScriptedBackends, which speak TLS and
AUTH when asked to; the auth service is contrib/auth_http_example.py.
"""
import contextlib
import functools
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import warnings

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from auth_fixtures import always, auth_service, ok  # noqa: F401  (fixture)
from auth_http_example import Policy, unescape      # contrib/, put on sys.path by auth_fixtures
from helpers import (SMTPClient, b64, can_bind, greeted, run_relay, send_message, session_id,
                     session_lines, verbs, wait_until)
from scripted_backend import DEFAULT_EXTENSIONS, Auth
from tls_fixtures import TLSMaterial, handshake_in_memory, serial_of, tls  # noqa: F401  (fixture)

SERVER_NAME = "mx.test"
BODY = b"Subject: TLS test\r\n\r\nHello.\r\n"
USERS = {"alice": "Alice-Secret-7"}
STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
ALL_DOWN = "451 4.4.1 Error: no mail server available; try again later"


# --- Starting things and talking to them -------------------------------------------

@pytest.fixture
def tls_relay(relay, tls):
    """start(*options, listen=...) -> the `relay` fixture's relay, named mx.test, with tls.server's certificate and key.

    Killed at teardown: a graceful stop waits for sessions in flight, TLS
    sockets a test left open would hold it up, and stopping is not this
    file's subject.
    """
    return functools.partial(relay, "--server-name", SERVER_NAME, "--tls-cert", tls.server.cert_path,
                             "--tls-key", tls.server.key_path, kill=True)


@pytest.fixture
def opened():
    """Closes at teardown what a test registers: TLS sockets and smtplib clients the relay fixture does not know."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def backend(scripted_backend):
    return scripted_backend()


def tls_port(relay):
    """The port of the relay's --tls-listen listener, once it is listening."""
    return int(relay.wait_for_log(r"listening on \S+:(\d+) \(TLS\)")[1])


def wrap(client, context, opened, server_hostname="127.0.0.1", **kwargs):
    """Run the client side of the handshake on an SMTPClient's socket; it talks TLS from now on."""
    assert client.buf == b"", f"the relay sent more in clear: {client.buf!r}"
    client.sock = context.wrap_socket(client.sock, server_hostname=server_hostname, **kwargs)
    opened.callback(client.sock.close)
    return client


def upgrade(client, context, opened, **kwargs):
    """STARTTLS (220 expected) and the handshake."""
    reply = client.say("STARTTLS")
    assert reply.text == "220 2.0.0 Ready to start TLS"
    return wrap(client, context, opened, **kwargs)


def keywords(reply):
    """The extension keywords of an EHLO reply (the server name left out), upper-case."""
    return [line.split()[0].upper() for line in reply.lines[1:]]


def auth_line(reply):
    return next((line for line in reply.lines if line.upper().startswith("AUTH ")), None)


def plain(user, password):
    return f"AUTH PLAIN {b64(chr(0) + user + chr(0) + password)}"


def handshake_refused(client, context, opened):
    """STARTTLS, then a handshake the relay must refuse: no reply ever comes inside TLS.

    Under TLS 1.3 the client's side of the handshake ends before the relay
    has checked its certificate; the relay's alert, or its close, is what
    the client reads next.
    """
    assert client.say("STARTTLS").code == 220
    try:
        wrap(client, context, opened)
        client.sock.sendall(b"EHLO client.example\r\n")
        data = client.sock.recv(100)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return
    assert data == b"", f"the relay answered inside TLS: {data!r}"


def raw_tls_connect(port, context, opened, **kwargs):
    """A TLS socket to the relay's implicit-TLS port."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened.callback(sock.close)
    tls_sock = context.wrap_socket(sock, server_hostname="127.0.0.1", **kwargs)
    opened.callback(tls_sock.close)
    return tls_sock


# --- STARTTLS for clients -----------------------------------------------------------

def test_starttls_is_offered_in_clear_and_not_once_tls_is_up(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = greeted(relay)
    assert "STARTTLS" in keywords(client.say("EHLO client.example"))
    upgrade(client, tls.client_context(), opened)
    reply = client.say("EHLO client.example")
    assert reply.code == 250 and reply.lines[0] == SERVER_NAME
    assert "STARTTLS" not in keywords(reply)
    assert client.say("STARTTLS").text == "503 5.5.1 Error: TLS already active"
    assert send_message(client, BODY).code == 250
    assert len(backend.delivered) == 1
    assert relay.wait_for_log(r"TLS (TLSv1\.[23]) ")


def test_starttls_off_neither_offers_nor_accepts_it_though_a_certificate_is_set(tls_relay, backend):
    relay = tls_relay("--backend", backend.address)
    client = greeted(relay)
    assert "STARTTLS" not in keywords(client.say("EHLO client.example"))
    assert client.say("STARTTLS").code == 502


def test_starttls_with_an_argument_is_a_syntax_error_and_the_session_stays_in_clear(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = greeted(relay)
    assert client.say("STARTTLS now").code == 501
    upgrade(client, tls.client_context(), opened)
    assert client.say("EHLO client.example").code == 250


def test_session_starts_over_after_starttls_forgetting_helo_and_mail(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = greeted(relay)
    assert client.say("EHLO before.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    upgrade(client, tls.client_context(), opened)
    assert client.say("RCPT TO:<b@example.net>").text == "503 5.5.1 Error: need MAIL command"
    assert client.say("EHLO after.example").code == 250
    assert send_message(client, BODY).code == 250
    first, second = backend.sessions
    assert first.closed.wait(5) and first.messages == []   # the back-end chosen in clear was let go
    assert b"HELO=after.example" in second.xclient
    assert not [c for c in second.commands if b"before.example" in c]
    assert len(second.messages) == 1 and second.messages[0].completed


def test_mail_right_after_starttls_waits_for_a_new_ehlo_and_the_helo_sent_in_clear_is_gone(tls_relay, backend, tls,
                                                                                              opened):
    # RFC 3207 §4.2: the session starts over; MAIL before a new EHLO gets 503.
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = greeted(relay)
    assert client.say("EHLO before.example").code == 250
    upgrade(client, tls.client_context(), opened)
    assert client.say("MAIL FROM:<a@example.org>").text == "503 5.5.1 Error: send EHLO first after STARTTLS"
    assert client.say("EHLO after.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert not [c for c in session.commands if b"before.example" in c]
    assert b"PROTO=ESMTP" in session.xclient and b"HELO=after.example" in session.xclient


def test_auth_from_before_starttls_is_forgotten_after_the_handshake(tls_relay, auth_service, backend, tls, opened):
    service = auth_service(Policy([backend.address], USERS))
    relay = tls_relay("--auth-http", service.url, "--auth", "plain", "--starttls", "on")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say(plain("alice", USERS["alice"])).code == 235     # a loopback client may, in clear
    upgrade(client, tls.client_context(), opened)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text == "530 5.7.0 Authentication required"
    assert client.say(plain("alice", USERS["alice"])).code == 235
    assert send_message(client, BODY).code == 250
    in_clear, in_tls = (dict(request) for request in service.requests)
    assert "Auth-SSL" not in in_clear
    assert in_tls["Auth-SSL"] == "on"


def test_starttls_only_hides_auth_and_refuses_mail_and_auth_until_tls(tls_relay, auth_service, backend, tls, opened):
    service = auth_service(Policy([backend.address], USERS))
    relay = tls_relay("--auth-http", service.url, "--auth", "none,plain,login", "--starttls", "only")
    client = greeted(relay)
    reply = client.say("EHLO client.example")
    assert "STARTTLS" in keywords(reply) and "AUTH" not in keywords(reply)
    assert client.say("MAIL FROM:<a@example.org>").text == STARTTLS_FIRST
    assert client.say(plain("alice", USERS["alice"])).text == STARTTLS_FIRST
    assert client.say("AUTH LOGIN").text == STARTTLS_FIRST
    # RFC 3207 §4: every command but NOOP, EHLO, STARTTLS and QUIT gets 530 before TLS.
    for command in ("RCPT TO:<b@example.net>", "DATA", "RSET", "VRFY postmaster", "HELP", "HELO client.example"):
        assert client.say(command).text == STARTTLS_FIRST, command
    assert client.say("NOOP").code == 250
    assert client.say("EHLO client.example").code == 250
    assert service.requests == [] and backend.connections == 0
    upgrade(client, tls.client_context(), opened)
    reply = client.say("EHLO client.example")
    assert auth_line(reply) == "AUTH PLAIN LOGIN" and "STARTTLS" not in keywords(reply)
    assert client.say(plain("alice", USERS["alice"])).code == 235
    assert send_message(client, BODY).code == 250
    assert len(backend.delivered) == 1


def test_a_message_over_starttls_is_received_with_esmtps_in_the_maildir(tls_relay, tls, opened, tmp_path):
    # RFC 3848: the Received: line's protocol says TLS was used (S).
    relay = tls_relay("--backend", f"maildir:{tmp_path / 'md'}", "--starttls", "on")
    client = upgrade(greeted(relay), tls.client_context(), opened)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [stored] = (tmp_path / "md" / "new").iterdir()
    assert " (smtprelay) with ESMTPS id " in stored.read_text(), stored.read_text()


def test_commands_refused_before_tls_count_toward_max_refusals(tls_relay, backend):
    # The 530s of --starttls only are refusals (MAIL) and junk (RSET, HELP): a client that
    # never starts TLS cannot go on asking for ever.
    relay = tls_relay("--backend", backend.address, "--starttls", "only", "--max-refusals", "3")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    for _ in range(3):
        assert client.say("MAIL FROM:<a@example.org>").text == STARTTLS_FIRST
    assert client.say("NOOP").text == "421 4.7.0 Error: too many refusals, closing connection"


def test_starttls_only_refuses_mail_in_clear_also_without_auth(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "only")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text == STARTTLS_FIRST
    assert backend.connections == 0
    upgrade(client, tls.client_context(), opened)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250


@pytest.mark.parametrize("listen, client_ip", [
    ("127.0.0.1:0", "127.0.0.1"),
    ("127.0.0.2:0", "127.0.0.2"),       # all of 127.0.0.0/8 is loopback
    ("[::1]:0", "::1"),
    ("0", "127.0.0.1"),                 # a dual-stack listener sees ::ffff:127.0.0.1
])
def test_loopback_client_is_offered_plain_and_login_in_clear_but_never_external(listen, client_ip, tls_relay,
                                                                                auth_service, backend, tls, opened):
    if not can_bind(client_ip):
        pytest.skip(f"{client_ip} is not configured on this host")
    service = auth_service(Policy([backend.address], USERS))
    relay = tls_relay("--auth-http", service.url, "--auth", "plain,login,cram-md5,external", "--starttls", "on",
                      "--tls-verify-client", "optional", "--tls-client-ca", tls.client_ca_path, listen=listen)
    sock = socket.create_connection((client_ip, relay.port), timeout=10, source_address=(client_ip, 0))
    opened.callback(sock.close)
    client = SMTPClient(sock)
    assert client.reply().code == 220
    relay.wait_for_log(rf"connect from \[?{re.escape(client_ip)}\]?:{sock.getsockname()[1]}$")
    assert auth_line(client.say("EHLO client.example")) == "AUTH PLAIN LOGIN CRAM-MD5"
    assert client.say("AUTH EXTERNAL =").text == ENCRYPTION_REQUIRED
    assert service.requests == []
    upgrade(client, tls.client_context(tls.client), opened, server_hostname="mx.test")
    assert auth_line(client.say("EHLO client.example")) == "AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL"


def non_loopback_address():
    """An address of this host that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))       # no packet is sent; the kernel picks a source address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_remote_client_is_offered_plain_and_login_only_after_starttls(tls_relay, auth_service, backend, tls, opened):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    service = auth_service(Policy([backend.address], USERS))
    relay = tls_relay("--auth-http", service.url, "--auth", "plain,login,cram-md5", "--starttls", "on",
                      listen=f"{address}:0")
    client = SMTPClient(relay.connect())
    assert client.reply().code == 220
    relay.wait_for_log(rf"connect from {re.escape(address)}:")
    reply = client.say("EHLO client.example")
    assert auth_line(reply) == "AUTH CRAM-MD5" and "STARTTLS" in keywords(reply)
    assert client.say(plain("alice", USERS["alice"])).text == ENCRYPTION_REQUIRED
    assert client.say("AUTH LOGIN").text == ENCRYPTION_REQUIRED
    assert service.requests == []
    upgrade(client, tls.client_context(), opened, server_hostname="mx.test")
    assert auth_line(client.say("EHLO client.example")) == "AUTH PLAIN LOGIN CRAM-MD5"
    assert client.say(plain("alice", USERS["alice"])).code == 235
    [request] = service.requests
    assert dict(request)["Client-IP"] == address and dict(request)["Auth-SSL"] == "on"


# --- STARTTLS command injection (RFC 3207 §4.2, CVE-2011-0411) ------------------------

def test_commands_pipelined_behind_starttls_are_discarded_not_run_inside_tls(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on", "--log-level", "debug")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@example.org>\r\n")     # one write
    assert client.reply().code == 220
    wrap(client, tls.client_context(), opened)
    # Replies to the injected RSET and MAIL would come before the EHLO's.
    reply = client.say("EHLO client.example")
    assert reply.code == 250 and reply.lines[0] == SERVER_NAME        # the first thing read inside TLS
    assert send_message(client, BODY).code == 250                                 # no MAIL was left open
    assert [m.mail_from for m in backend.delivered] == [b"MAIL FROM:<a@example.org>"]
    assert "injected" not in relay.log_text()
    assert not re.search(r" C: RSET", relay.log_text())


def test_openssl_s_client_completes_the_starttls_handshake_and_verifies_the_certificate(tls_relay, backend, tls):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", relay.address, "-CAfile", str(tls.ca_path),
         "-verify_return_error", "-verify_ip", "127.0.0.1", "-name", "client.example", "-crlf", "-ign_eof"],
        input="EHLO client.example\nQUIT\n", capture_output=True, text=True, timeout=30)
    assert "Verify return code: 0 (ok)" in result.stdout, result.stdout + result.stderr
    assert "Compression: NONE" in result.stdout
    assert re.search(r"^New, TLSv1\.[23], Cipher is ", result.stdout, re.M)
    inside = result.stdout.split("Verify return code: 0 (ok)", 1)[1]
    assert "250-mx.test" in inside and "STARTTLS" not in inside
    assert "221 2.0.0 Bye" in inside


def test_relay_ends_a_tls_session_with_close_notify(tls_relay, backend, tls, opened):
    # RFC 8446 §6.1: each party MUST send close_notify before closing its
    # write side. Without it OpenSSL 3 clients report "unexpected eof while
    # reading" after QUIT (openssl s_client exits 1).
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = upgrade(greeted(relay), tls.client_context(), opened, suppress_ragged_eofs=False)
    assert client.say("QUIT").code == 221
    assert client.sock.recv(100) == b""         # SSLEOFError here: the relay just closed the socket


def test_swaks_delivers_with_starttls_where_the_relay_insists_on_it(tls_relay, backend):
    relay = tls_relay("--backend", backend.address, "--starttls", "only")
    result = subprocess.run(
        ["swaks", "--server", relay.host, "--port", str(relay.port), "--tls", "--ehlo", "client.example",
         "--from", "a@example.org", "--to", "b@example.net", "--timeout", "10"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "220 2.0.0 Ready to start TLS" in result.stdout
    assert len(backend.delivered) == 1
    assert relay.wait_for_log(r"TLS TLSv1\.[23] ")


# --- Implicit TLS (--tls-listen) ------------------------------------------------------

def test_tls_listener_greets_inside_tls_and_delivers_with_no_starttls_needed(tls_relay, auth_service, backend, tls,
                                                                             opened):
    service = auth_service(always(*ok(backend)))
    relay = tls_relay("--auth-http", service.url, "--starttls", "only", "--tls-listen", "127.0.0.1:0")
    client = smtplib.SMTP_SSL("127.0.0.1", tls_port(relay), context=tls.client_context(), timeout=10)   # 220 read
    opened.callback(client.close)
    assert client.ehlo("client.example") == (250, b"mx.test\nPIPELINING\nSIZE\n8BITMIME\nENHANCEDSTATUSCODES\nSMTPUTF8")
    assert not client.has_extn("starttls")
    assert client.sendmail("a@example.org", ["b@example.net"], BODY) == {}
    assert len(backend.delivered) == 1
    [request] = service.requests
    assert dict(request)["Auth-SSL"] == "on"
    assert dict(request)["Auth-SSL-Protocol"] == client.sock.version()


def test_plain_listener_stays_plain_next_to_a_tls_listener(tls_relay, backend, tls):
    relay = tls_relay("--backend", backend.address, "--tls-listen", "127.0.0.1:0")
    tls_port(relay)
    client = greeted(relay)
    assert "STARTTLS" not in keywords(client.say("EHLO client.example"))
    assert send_message(client, BODY).code == 250


# --- Bad certificate and key files ----------------------------------------------------

def bad_tls_options(case, tls, tmp_path):
    """(options, the option named, the file named, a word of the reason) for one bad-file case."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is no PEM file\n")
    missing = tmp_path / "missing.pem"
    other = tls.issue("other", "other.example")
    expired = tls.issue("expired", "mx.test", expired=True)
    cert, key = tls.server.cert_path, tls.server.key_path
    encrypted = tmp_path / "encrypted.key"      # as `openssl pkey -aes256` writes it
    encrypted.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"x")))
    return {
        "cert missing": (["--tls-cert", missing, "--tls-key", key], "--tls-cert", missing, "No such file"),
        "cert is a directory": (["--tls-cert", tmp_path, "--tls-key", key], "--tls-cert", tmp_path, "directory"),
        "cert not PEM": (["--tls-cert", garbage, "--tls-key", key], "--tls-cert", garbage, "not a PEM certificate"),
        "cert expired": (["--tls-cert", expired.cert_path, "--tls-key", expired.key_path], "--tls-cert",
                         expired.cert_path, "expired"),
        "key missing": (["--tls-cert", cert, "--tls-key", missing], "--tls-key", missing, "No such file"),
        "key not PEM": (["--tls-cert", cert, "--tls-key", garbage], "--tls-key", garbage, "not the private key"),
        "key encrypted": (["--tls-cert", cert, "--tls-key", encrypted], "--tls-key", encrypted,
                          "encrypted with a pass phrase, which the relay cannot ask for"),
        "key of another certificate": (["--tls-cert", cert, "--tls-key", other.key_path], "--tls-key",
                                       other.key_path, "not the private key"),
        "client CA not PEM": (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", garbage,
                               "--tls-verify-client", "on"], "--tls-client-ca", garbage, "no PEM certificates"),
        "client CA missing": (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", missing,
                               "--tls-verify-client", "on"], "--tls-client-ca", missing, "No such file"),
        "backend CA not PEM": (["--tls-cert", cert, "--tls-key", key, "--backend-tls", "starttls",
                                "--backend-tls-ca", garbage], "--backend-tls-ca", garbage, "no PEM certificates"),
        "backend CA missing": (["--tls-cert", cert, "--tls-key", key, "--backend-tls", "starttls",
                                "--backend-tls-ca", missing], "--backend-tls-ca", missing, "No such file"),
    }[case]


@pytest.mark.parametrize("case", ["cert missing", "cert is a directory", "cert not PEM", "cert expired",
                                  "key missing", "key not PEM", "key encrypted", "key of another certificate",
                                  "client CA not PEM", "client CA missing", "backend CA not PEM",
                                  "backend CA missing"])
def test_unusable_tls_file_stops_the_start_with_one_line_naming_option_and_file(case, tls, tmp_path):
    options, option, path, reason = bad_tls_options(case, tls, tmp_path)
    result = run_relay("--backend", "127.0.0.1:25", "--starttls", "on", *options, listen="127.0.0.1:0")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"smtprelay: {option}: {path}"), line
    assert reason in line


@pytest.mark.parametrize("options, option, message", [
    (["--starttls", "on"], "--tls-cert", "TLS (--starttls, --tls-listen) needs --tls-cert and --tls-key"),
    (["--tls-listen", "127.0.0.1:0"], "--tls-cert", "TLS (--starttls, --tls-listen) needs --tls-cert and --tls-key"),
    (["--starttls", "on", "--tls-cert", "CERT"], "--tls-key", "needs --tls-cert and --tls-key"),
    (["--tls-key", "KEY"], "--tls-cert", "--tls-cert and --tls-key go together"),
    (["--starttls", "yes", "--tls-cert", "CERT", "--tls-key", "KEY"], "--starttls", "must be one of off, on, only"),
    (["--tls-verify-client", "on", "--tls-cert", "CERT", "--tls-key", "KEY"], "--tls-client-ca",
     "--tls-verify-client on needs the CAs to verify against"),
    (["--tls-verify-client", "always", "--tls-cert", "CERT", "--tls-key", "KEY"], "--tls-verify-client",
     "must be one of off, on, optional"),
    (["--backend-tls", "yes"], "--backend-tls", "must be one of off, starttls, on"),
    (["--backend-tls", "starttls", "--backend-tls-verify", "no"], "--backend-tls-verify", "must be one of on, off"),
])
def test_tls_options_that_do_not_fit_stop_the_start_with_one_line_naming_the_option(options, option, message, tls):
    paths = {"CERT": str(tls.server.cert_path), "KEY": str(tls.server.key_path)}
    result = run_relay("--backend", "127.0.0.1:25", *[paths.get(o, o) for o in options], listen="127.0.0.1:0")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"smtprelay: {option}: ") and message in line, line


# --- Protocol versions, compression, failed handshakes --------------------------------

def tls_1_1_client():
    """A client context that speaks TLS 1.0-1.1 only (OpenSSL 3 needs security level 0 for them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # ssl.TLSVersion.TLSv1_1 is deprecated: the point
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.minimum_version, context.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def tls_1_1_server(certificate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        certificate.leaf.configure_cert(context)
    return context


def test_client_limited_to_tls_1_1_fails_the_handshake_and_the_relay_goes_on(tls_relay, backend, tls, opened):
    client_context = tls_1_1_client()
    if handshake_in_memory(client_context, tls_1_1_server(tls.server)) != "TLSv1.1":
        pytest.skip("the local OpenSSL cannot speak TLS 1.1 even at security level 0")
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = greeted(relay)
    sid = session_id(relay, client.sock)
    assert client.say("STARTTLS").code == 220
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|protocol version"):
        wrap(client, client_context, opened)
    [failed] = [line for line in session_lines(relay, sid) if "TLS" in line]
    assert "TLS handshake failed" in failed
    again = upgrade(greeted(relay), tls.client_context(), opened)
    assert again.say("EHLO client.example").code == 250


def test_tls_1_2_client_is_served_without_compression(tls_relay, backend, tls, opened):
    context = tls.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = upgrade(greeted(relay), context, opened)
    assert client.sock.version() == "TLSv1.2"
    assert client.sock.compression() is None
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250


def test_garbage_after_starttls_is_logged_in_one_line_and_the_relay_goes_on(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    client = greeted(relay)
    assert client.say("STARTTLS").code == 220
    client.send(b"this is no TLS ClientHello\r\n")
    client.rest()                                       # the relay closes (perhaps after an alert)
    lines = session_lines(relay, session_id(relay, client.sock))
    assert len([line for line in lines if "TLS handshake failed" in line]) == 1
    assert "Traceback" not in relay.log_text()
    again = upgrade(greeted(relay), tls.client_context(), opened)
    assert again.say("EHLO client.example").code == 250
    assert send_message(again, BODY).code == 250


def test_plaintext_on_the_tls_port_is_logged_in_one_line_and_the_relay_goes_on(tls_relay, backend, tls, opened):
    relay = tls_relay("--backend", backend.address, "--tls-listen", "127.0.0.1:0")
    port = tls_port(relay)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened.callback(sock.close)
    sock.sendall(b"EHLO client.example\r\n")
    SMTPClient(sock).rest()
    lines = session_lines(relay, session_id(relay, sock))
    assert len([line for line in lines if "TLS handshake failed" in line]) == 1
    assert "Traceback" not in relay.log_text()
    client = SMTPClient(raw_tls_connect(port, tls.client_context(), opened))
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250


def thread_count(relay):
    with open(f"/proc/{relay.proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_silent_client_on_the_tls_port_is_dropped_after_the_timeout_and_its_thread_ends(tls_relay, backend):
    # --resolve off: the name lookup's own short-lived thread would blur the count; no kept
    # threads (SPARE_THREADS), so that the session's thread, once free, ends.
    relay = tls_relay("--backend", backend.address, "--tls-listen", "127.0.0.1:0", "--timeout", "1",
                      "--resolve", "off", constants={"SPARE_THREADS": 0})
    port = tls_port(relay)
    idle = thread_count(relay)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sid = session_id(relay, sock)
        assert thread_count(relay) == idle + 1         # one thread per session
        began = time.monotonic()
        assert sock.recv(100) == b""                    # closed by the relay, not by our timeout
        assert 0.9 <= time.monotonic() - began < 9
    [failed] = [line for line in session_lines(relay, sid) if "TLS handshake failed" in line]
    assert "timed out" in failed
    # It ends just after its last log line, which is all it signals.
    wait_until(lambda: thread_count(relay) <= idle, 5, lambda: f"{thread_count(relay)} threads, {idle} when idle")


# --- Client certificates ------------------------------------------------------------------

def client_cert_relay(tls_relay, tls, mode, *options):
    return tls_relay("--starttls", "on", "--tls-verify-client", mode, "--tls-client-ca", tls.client_ca_path, *options)


def test_required_client_certificate_means_mail_waits_for_tls(tls_relay, backend, tls):
    relay = client_cert_relay(tls_relay, tls, "on", "--backend", backend.address)
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text == STARTTLS_FIRST


def test_client_without_a_certificate_where_one_is_required_hears_421_and_gets_no_session(tls_relay, backend,
                                                                                          tls, opened):
    # nginx (ssl_verify_client on): the handshake ends, then "421 4.7.1 No required SSL certificate".
    relay = client_cert_relay(tls_relay, tls, "on", "--backend", backend.address)
    client = greeted(relay)
    assert client.say("STARTTLS").code == 220
    wrap(client, tls.client_context(None), opened)
    assert client.reply().text == "421 4.7.1 No required SSL certificate"
    assert client.sock.recv(100) == b""
    assert backend.connections == 0
    again = upgrade(greeted(relay), tls.client_context(tls.client), opened)
    assert again.say("EHLO client.example").code == 250
    assert send_message(again, BODY).code == 250


@pytest.mark.parametrize("mode, certificate", [("on", "from another CA"), ("on", "expired"),
                                               ("optional", "from another CA"), ("optional", "expired")])
def test_client_certificate_missing_where_required_or_untrusted_or_expired_gets_no_session(mode, certificate,
                                                                                           tls_relay, backend,
                                                                                           tls, opened):
    presented = {"none": None,
                 "from another CA": tls.issue("stranger", "client.example"),
                 "expired": tls.issue("old-client", "client.example", ca=tls.client_ca, expired=True)}[certificate]
    relay = client_cert_relay(tls_relay, tls, mode, "--backend", backend.address)
    client = greeted(relay)
    sid = session_id(relay, client.sock)
    handshake_refused(client, tls.client_context(presented), opened)
    [failed] = [line for line in session_lines(relay, sid) if "TLS" in line]
    assert "TLS handshake failed" in failed
    assert backend.connections == 0
    again = upgrade(greeted(relay), tls.client_context(tls.client), opened)
    assert again.say("EHLO client.example").code == 250
    assert send_message(again, BODY).code == 250


def test_optional_client_certificate_may_be_left_out_and_the_service_hears_verify_none(tls_relay, auth_service,
                                                                                       backend, tls, opened):
    service = auth_service(always(*ok(backend)))
    relay = client_cert_relay(tls_relay, tls, "optional", "--auth-http", service.url)
    client = upgrade(greeted(relay), tls.client_context(), opened)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [request] = service.requests
    ssl_headers = [(name, value) for name, value in request if name.startswith("Auth-SSL")]
    assert ssl_headers == [("Auth-SSL", "on"), ("Auth-SSL-Protocol", client.sock.version()),
                           ("Auth-SSL-Cipher", client.sock.cipher()[0]), ("Auth-SSL-Verify", "NONE")]


@pytest.mark.parametrize("mode", ["on", "optional"])
def test_client_certificate_details_go_to_the_auth_service_as_nginx_sends_them(mode, tls_relay, auth_service,
                                                                               backend, tls, opened):
    service = auth_service(always(*ok(backend)))
    relay = client_cert_relay(tls_relay, tls, mode, "--auth-http", service.url)
    client = upgrade(greeted(relay), tls.client_context(tls.client), opened)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [request] = service.requests
    names = [name for name, _ in request]
    headers = dict(request)
    assert names[names.index("Auth-SMTP-To") + 1:] == [
        "Auth-SSL", "Auth-SSL-Protocol", "Auth-SSL-Cipher", "Auth-SSL-Verify", "Auth-SSL-Subject",
        "Auth-SSL-Issuer", "Auth-SSL-Serial", "Auth-SSL-Fingerprint"]
    assert headers["Auth-SSL"] == "on"
    assert headers["Auth-SSL-Protocol"] == client.sock.version()
    assert headers["Auth-SSL-Cipher"] == client.sock.cipher()[0]
    assert headers["Auth-SSL-Verify"] == "SUCCESS"
    assert headers["Auth-SSL-Subject"] == tls.client.subject
    assert headers["Auth-SSL-Subject"].startswith("CN=client.example,") and "O=Example\\, Inc." in tls.client.subject
    assert headers["Auth-SSL-Issuer"] == tls.client.issuer
    serial = headers["Auth-SSL-Serial"]
    assert re.fullmatch(r"[0-9A-F]+", serial) and int(serial, 16) == tls.client.serial
    assert headers["Auth-SSL-Fingerprint"] == tls.client.fingerprint
    assert re.fullmatch(r"[0-9a-f]{40}", headers["Auth-SSL-Fingerprint"])
    # Certificate data goes to the auth service only, never to the back-end (as nginx's mail proxy).
    assert not [c for c in backend.sessions[0].commands if b"Inc." in c or tls.client.fingerprint.encode() in c]
    assert relay.wait_for_log(rf"TLS TLSv1\.[23] \S+, client certificate {re.escape(tls.client.subject)}$")


def test_client_certificate_with_a_unicode_name_reaches_the_auth_service_as_utf8(tls_relay, auth_service, backend,
                                                                                  tls, opened):
    # Found in review: a subject beyond Latin-1 made every lookup an internal error.
    unicode_client = tls.issue("unicode-client", "client.example", ca=tls.client_ca, common_name="\u03a9mega \u2603")
    service = auth_service(always(*ok(backend)))
    relay = client_cert_relay(tls_relay, tls, "on", "--auth-http", service.url)
    client = upgrade(greeted(relay), tls.client_context(unicode_client), opened)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [request] = service.requests
    subject = dict(request)["Auth-SSL-Subject"].encode("latin-1").decode("utf-8")    # http.server reads latin-1
    assert subject.startswith("CN=\u03a9mega \u2603")


def test_auth_external_authenticates_as_the_certificate_subject(tls_relay, auth_service, backend, tls, opened):
    service = auth_service(Policy([backend.address], {tls.client.subject: "unused"}))
    relay = client_cert_relay(tls_relay, tls, "optional", "--auth-http", service.url, "--auth", "external")
    client = upgrade(greeted(relay), tls.client_context(tls.client), opened)
    assert auth_line(client.say("EHLO client.example")) == "AUTH EXTERNAL"
    assert client.say("AUTH EXTERNAL =").code == 235
    assert send_message(client, BODY).code == 250
    [request] = service.requests
    headers = dict(request)
    assert (headers["Auth-Method"], headers["Auth-Pass"]) == ("external", "")
    assert unescape(headers["Auth-User"]) == tls.client.subject
    assert headers["Auth-User"] == tls.client.subject.replace("%", "%25").replace(" ", "%20")
    assert headers["Auth-SSL-Verify"] == "SUCCESS"
    [session] = backend.sessions
    assert b" LOGIN=CN+3Dclient.example," in session.xclient
    assert len(backend.delivered) == 1


def test_auth_external_as_another_identity_than_the_certificate_s_fails_and_as_its_own_succeeds(
        tls_relay, auth_service, backend, tls, opened):
    # RFC 4422 appendix A: an authorization identity the certificate does not establish fails
    # the exchange; it is never quietly replaced by the certificate's subject.
    service = auth_service(Policy([backend.address], {tls.client.subject: "unused"}))
    relay = client_cert_relay(tls_relay, tls, "on", "--auth-http", service.url, "--auth", "external")
    client = upgrade(greeted(relay), tls.client_context(tls.client), opened)
    assert client.say("EHLO client.example").code == 250
    assert client.say(f"AUTH EXTERNAL {b64('postmaster@example.org')}").text == \
        "535 5.7.0 The client certificate names another identity"
    assert service.requests == []
    assert client.say(f"AUTH EXTERNAL {b64(tls.client.subject)}").code == 235
    [request] = service.requests
    assert unescape(dict(request)["Auth-User"]) == tls.client.subject


def test_auth_external_without_a_client_certificate_gets_535(tls_relay, auth_service, backend, tls, opened):
    service = auth_service(Policy([backend.address], {tls.client.subject: "unused"}))
    relay = client_cert_relay(tls_relay, tls, "optional", "--auth-http", service.url, "--auth", "external")
    client = greeted(relay)
    assert client.say("AUTH EXTERNAL =").text == ENCRYPTION_REQUIRED      # in clear: not offered
    upgrade(client, tls.client_context(), opened)
    assert auth_line(client.say("EHLO client.example")) == "AUTH EXTERNAL"
    assert client.say("AUTH EXTERNAL =").text == "535 5.7.0 No client certificate"
    assert client.say("MAIL FROM:<a@example.org>").text == "530 5.7.0 Authentication required"
    assert service.requests == []


# --- TLS towards the back-end ------------------------------------------------------------

def backend_tls_options(tls, mode="starttls"):
    return ["--backend-tls", mode, "--backend-tls-ca", tls.ca_path]


def test_backend_starttls_carries_the_client_and_its_mail_only_inside_tls(tls_relay, scripted_backend, tls):
    backend = scripted_backend(starttls_context=tls.server_context(tls.backend))
    relay = tls_relay("--backend", backend.address, *backend_tls_options(tls))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert session.tls_version in ("TLSv1.2", "TLSv1.3")
    said = verbs(session)
    assert said[:2] == [b"EHLO", b"STARTTLS"]
    assert said.index(b"STARTTLS") < said.index(b"XCLIENT") < said.index(b"MAIL")
    assert len(backend.delivered) == 1
    assert "--backend-tls-verify off" not in relay.log_text()


def test_backend_implicit_tls_delivers(tls_relay, scripted_backend, tls):
    backend = scripted_backend(tls_context=tls.server_context(tls.backend))
    relay = tls_relay("--backend", backend.address, *backend_tls_options(tls, "on"))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert session.tls and b"STARTTLS" not in verbs(session)
    assert len(backend.delivered) == 1


def test_backend_without_starttls_is_down_and_the_next_one_takes_over(tls_relay, scripted_backend, tls):
    clear = scripted_backend()
    secure = scripted_backend(starttls_context=tls.server_context(tls.backend))
    relay = tls_relay("--backend", clear.address, "--backend", secure.address, *backend_tls_options(tls))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = clear.wait_for_sessions_closed(1)
    assert verbs(session) == [b"EHLO", b"QUIT"]         # no XCLIENT, no MAIL: nothing of the client in clear
    assert len(secure.delivered) == 1
    assert relay.wait_for_log(rf"backend {clear.address} is down: offers no STARTTLS")


def test_backend_refusing_starttls_is_down_and_never_used_in_clear(tls_relay, scripted_backend, tls):
    backend = scripted_backend(extensions=[*DEFAULT_EXTENSIONS, "STARTTLS"],
                               replies={"STARTTLS": "454 4.7.0 TLS not available due to temporary reason"})
    relay = tls_relay("--backend", backend.address, *backend_tls_options(tls))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text == ALL_DOWN
    [session] = backend.wait_for_sessions_closed(1)
    assert verbs(session) == [b"EHLO", b"STARTTLS", b"QUIT"]      # nothing of the client in clear
    assert relay.wait_for_log(rf"backend {backend.address} is down: .*454.*4\.7\.0 TLS not available")


def test_only_backend_without_starttls_gives_451_never_a_plaintext_fallback(tls_relay, backend, tls):
    relay = tls_relay("--backend", backend.address, *backend_tls_options(tls))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text == ALL_DOWN
    [session] = backend.wait_for_sessions_closed(1)
    assert verbs(session) == [b"EHLO", b"QUIT"]
    assert relay.wait_for_log(r"all back-ends are down")


def tls_backend(scripted_backend, mode, certificate, **kwargs):
    """A ScriptedBackend speaking TLS as --backend-tls `mode` expects: STARTTLS, or implicit ("on")."""
    context = TLSMaterial.server_context(certificate)
    kwargs["starttls_context" if mode == "starttls" else "tls_context"] = context
    return scripted_backend(**kwargs)


@pytest.mark.parametrize("mode", ["starttls", "on"])
@pytest.mark.parametrize("problem", ["signed by another CA", "made out to another name"])
def test_backend_whose_certificate_does_not_verify_gives_451_and_a_log_line(problem, mode, tls_relay,
                                                                            scripted_backend, tls):
    certificate, reason = {
        "signed by another CA": (tls.issue("rogue", "127.0.0.1", ca=trustme.CA()), "unable to get local issuer"),
        "made out to another name": (tls.issue("misnamed", "other.example"), "mismatch"),
    }[problem]
    backend = tls_backend(scripted_backend, mode, certificate)
    relay = tls_relay("--backend", backend.address, *backend_tls_options(tls, mode))
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").text == ALL_DOWN
    line = relay.wait_for_log(rf"backend {backend.address} is down: .*").group()
    assert "certificate verify failed" in line and reason in line
    [session] = backend.wait_for_sessions_closed(1)
    assert verbs(session) == ([b"EHLO", b"STARTTLS"] if mode == "starttls" else [])    # nothing inside TLS
    assert session.tls_version is None


@pytest.mark.parametrize("mode", ["starttls", "on"])
def test_backend_tls_verify_off_accepts_any_certificate_and_warns_at_start(mode, tls_relay, scripted_backend, tls):
    rogue = tls.issue("rogue", "other.example", ca=trustme.CA())
    backend = tls_backend(scripted_backend, mode, rogue)
    relay = tls_relay("--backend", backend.address, "--backend-tls", mode, "--backend-tls-verify", "off")
    lines = relay.log_text().splitlines()
    [warning] = [i for i, line in enumerate(lines) if "WARNING --backend-tls-verify off" in line]
    assert warning < min(i for i, line in enumerate(lines) if "listening on" in line)
    client = greeted(relay)
    assert send_message(client, BODY).code == 250
    assert backend.sessions[0].tls


@pytest.mark.parametrize("mode", ["starttls", "on"])
@pytest.mark.parametrize("offered, used", [("PLAIN LOGIN", "PLAIN"), ("LOGIN", "LOGIN")])
def test_backend_auth_runs_inside_tls_with_plain_or_with_login_where_only_login_is_offered(offered, used, mode,
                                                                                          tls_relay,
                                                                                          scripted_backend, tls):
    backend = tls_backend(scripted_backend, mode, tls.backend, extensions=[*DEFAULT_EXTENSIONS, f"AUTH {offered}"],
                          auth={"relay": "Relay-Secret-9"})
    relay = tls_relay("--backend", backend.address, *backend_tls_options(tls, mode),
                      "--backend-auth", "relay:Relay-Secret-9")
    client = greeted(relay)
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert session.auths == [Auth(used, "relay", "Relay-Secret-9", tls=True, accepted=True)]
    said = verbs(session)
    assert said.index(b"AUTH") < said.index(b"MAIL")
    if mode == "starttls":
        assert said.index(b"STARTTLS") < said.index(b"AUTH")
    assert len(backend.delivered) == 1


# --- SIGHUP: a new certificate for new sessions -------------------------------------------

def peer_serial(client):
    return serial_of(client.sock.getpeercert(binary_form=True))


def test_sighup_loads_a_new_certificate_for_new_sessions_and_open_sessions_keep_working(tls_relay, backend, tls,
                                                                                        opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    before = upgrade(greeted(relay), tls.client_context(), opened)
    assert before.say("EHLO client.example").code == 250
    assert peer_serial(before) == tls.server.serial
    renewed = tls.issue("renewed", "mx.test", "localhost", "127.0.0.1")
    assert renewed.serial != tls.server.serial
    renewed.copy_to(tls.server.cert_path, tls.server.key_path)
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log(r"SIGHUP: configuration reloaded for new sessions")
    after = upgrade(greeted(relay), tls.client_context(), opened)
    assert peer_serial(after) == renewed.serial
    assert after.say("EHLO client.example").code == 250
    assert send_message(after, BODY).code == 250
    assert send_message(before, BODY).code == 250
    assert len(backend.delivered) == 2


@pytest.mark.parametrize("replacement", ["garbage", "expired certificate", "certificate without its key"])
def test_sighup_with_a_bad_new_certificate_keeps_the_old_one_and_logs_why(replacement, tls_relay, backend, tls,
                                                                         opened):
    relay = tls_relay("--backend", backend.address, "--starttls", "on")
    if replacement == "garbage":
        tls.server.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        reason = rf"--tls-cert: {re.escape(str(tls.server.cert_path))}: not a PEM certificate"
    elif replacement == "expired certificate":
        tls.issue("expired", "mx.test", expired=True).copy_to(tls.server.cert_path, tls.server.key_path)
        reason = rf"--tls-cert: {re.escape(str(tls.server.cert_path))}: expired on "
    else:
        renewed = tls.issue("renewed", "mx.test", "localhost", "127.0.0.1")
        renewed.cert_path.replace(tls.server.cert_path)       # the key file still holds the old key
        reason = rf"--tls-key: {re.escape(str(tls.server.key_path))}: not the private key"
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log(rf"ERROR SIGHUP: keeping the old configuration: {reason}")
    client = upgrade(greeted(relay), tls.client_context(), opened)
    assert peer_serial(client) == tls.server.serial
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    assert relay.proc.poll() is None


# --- What the auth service and the back-end hear about TLS ---------------------------------

def test_tls_sessions_are_marked_auth_ssl_on_and_xclient_proto_stays_esmtp(tls_relay, auth_service, backend, tls,
                                                                           opened):
    service = auth_service(always(*ok(backend)))
    relay = tls_relay("--auth-http", service.url, "--starttls", "on")
    in_clear = greeted(relay)
    assert in_clear.say("EHLO clear.example").code == 250
    assert send_message(in_clear, BODY).code == 250
    in_tls = upgrade(greeted(relay), tls.client_context(), opened)
    assert in_tls.say("EHLO secure.example").code == 250
    assert send_message(in_tls, BODY).code == 250
    clear_request, tls_request = (dict(request) for request in service.requests)
    assert not [name for name in clear_request if name.startswith("Auth-SSL")]
    assert {name: value for name, value in tls_request.items() if name.startswith("Auth-SSL")} == {
        "Auth-SSL": "on", "Auth-SSL-Protocol": in_tls.sock.version(), "Auth-SSL-Cipher": in_tls.sock.cipher()[0]}
    # Postfix takes only SMTP or ESMTP as XCLIENT PROTO; TLS is not told to it there.
    xclients = [session.xclient for session in backend.sessions]
    assert [re.search(rb"PROTO=(\S+)", x)[1] for x in xclients] == [b"ESMTP", b"ESMTP"]
    assert b"HELO=secure.example" in xclients[1]


# --- The fixtures ------------------------------------------------------------------------------

def test_scripted_backend_speaks_starttls_and_runs_auth_login(scripted_backend, tls):
    backend = scripted_backend(extensions=["AUTH LOGIN"], starttls_context=tls.server_context(tls.backend),
                               auth={"relay": "pw"})
    with smtplib.SMTP(backend.host, backend.port, timeout=5) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=tls.client_context())
        client.ehlo()
        assert not client.has_extn("starttls")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("relay", "wrong")
        client.login("relay", "pw")
    [session] = backend.wait_for_sessions_closed(1)
    assert session.tls_version in ("TLSv1.2", "TLSv1.3")
    assert session.auths == [Auth("LOGIN", "relay", "wrong", True, False), Auth("LOGIN", "relay", "pw", True, True)]
