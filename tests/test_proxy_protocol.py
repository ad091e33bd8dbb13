"""The PROXY protocol (--proxy-protocol, --real-ip-from): the client haproxy names is the client.

The relay runs as a real subprocess. Crafted v1 and v2 headers go over raw
sockets from 127.0.0.1 (trusted as --real-ip-from 127.0.0.0/8 unless a test
says otherwise) to a relay in front of a ScriptedBackend offering XCLIENT:
what the back-end hears as XCLIENT ADDR/PORT, what --allow-from and
--max-clients-per-ip judge, what the log names, is the address in the header.
Malformed, untrusted and unfinished headers are closed without a byte.
Then a real haproxy (/usr/sbin/haproxy) sends the headers: send-proxy and
send-proxy-v2 in front of one relay, and contrib/haproxy.cfg itself
(roundrobin over two relays, addresses from the environment) while one of
the relays is stopped under load.

Nothing here sleeps to wait for an event: tests wait for replies, log lines
(the relay's and haproxy's), the back-end's records and process exits; the
only sleeps pace a client that trickles its header on purpose.
"""
import contextlib
import errno
import functools
import ipaddress
import itertools
import os
import re
import select
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from auth_fixtures import always, auth_service, ok  # noqa: F401  (fixtures)
from helpers import (LoggedProcess, SMTPClient, free_port, run_relay, send_message, stop_process, wait_accepting,
                     xclient_attributes)
from tls_fixtures import tls  # noqa: F401  (fixture)

HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "contrib" / "haproxy.cfg"
SERVER_NAME = "mx.test"
CLIENT_HELO = "client.example"
BODY = b"Subject: proxied\r\n\r\nhello\r\n"
TRUSTED = ("--proxy-protocol", "--real-ip-from", "127.0.0.0/8")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x0, 0x1                         # v2 commands
UNSPEC, TCP4, TCP6 = 0x00, 0x11, 0x21           # v2 address family and transport
# The longest v1 header the protocol allows: 107 bytes, CRLF included.
V1_LONGEST = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
              b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
assert len(V1_LONGEST) == 107


# --- PROXY headers ------------------------------------------------------------------

def v1(*words):
    """A v1 header: "PROXY " and the words, space separated, CRLF."""
    return b"PROXY " + " ".join(map(str, words)).encode() + b"\r\n"


def v2(command=PROXY, src=None, dst=None, sport=0, dport=0, tlvs=b"", family=None, version=2, length=None,
       addresses=None):
    """A v2 header: signature, version/command, family, length, addresses (src, dst, ports), then `tlvs`.

    The family follows the addresses (UNSPEC without); `length` overrides the
    true length of what follows, `addresses` the packed address block.
    """
    if addresses is None:
        addresses = b""
        if src is not None:
            addresses = (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
                         + struct.pack("!HH", sport, dport))
    if family is None:
        family = UNSPEC if src is None else TCP4 if ipaddress.ip_address(src).version == 4 else TCP6
    rest = addresses + tlvs
    return (V2_SIGNATURE + bytes([version << 4 | command, family])
            + struct.pack("!H", len(rest) if length is None else length) + rest)


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# What haproxy may append: ALPN, authority (SNI), a unique id, padding (NOOP),
# and the SSL TLV with its sub-TLVs (version, CN). No CRC32c: one that is
# wrong may be refused, and the relay need not check one.
SOME_TLVS = (tlv(0x01, b"smtp") + tlv(0x02, b"mx.example.net") + tlv(0x05, b"\x01\x02\x03\x04")
             + tlv(0x04, b"\x00" * 7)
             + tlv(0x20, b"\x07" + struct.pack("!I", 0) + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example")))


# --- Starting things and talking to them -------------------------------------------

@pytest.fixture
def mx_relay(relay):
    """start(*options) -> the `relay` fixture's relay, named mx.test, no name lookups (the header
    addresses are made up).

    SIGKILLed at teardown: stopping is tested with `relay` itself, below.
    """
    return functools.partial(relay, "--server-name", SERVER_NAME, "--resolve", "off", kill=True)


@pytest.fixture
def backend(scripted_backend):
    return scripted_backend()


@pytest.fixture
def opened():
    """Closes at teardown what a test registers: sockets and smtplib clients the relay fixture does not know."""
    with contextlib.ExitStack() as stack:
        yield stack


def proxied(relay, header, nodelay=False):
    """An SMTPClient on a new connection to the relay's first listener that has sent `header`."""
    client = SMTPClient(relay.connect(), nodelay=nodelay)
    if header:
        client.send(header)
    return client


def served(client):
    """The relay greets the client and answers EHLO: the session is on."""
    greeting = client.reply()
    assert greeting.code == 220, greeting
    assert client.say(f"EHLO {CLIENT_HELO}").code == 250


def source_port(client):
    return client.sock.getsockname()[1]


def log_address(address, port):
    """An address and port as the log writes them, as a regex: 192.0.2.1:25, [2001:db8::1]:25."""
    text = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return re.escape(text)


def connect_line(relay, real, via_port):
    """Wait for `SID connect from REAL via 127.0.0.1:VIA_PORT` (REAL a regex) -> the SID."""
    return relay.wait_for_log(rf" INFO (\w{{8}}) connect from {real} via 127\.0\.0\.1:{via_port}$")[1]


def assert_closed_without_a_byte(client):
    """The relay closes the connection having sent nothing at all (a read timeout fails the test)."""
    data = client.buf
    while True:
        try:
            chunk = client.sock.recv(65536)
        except ConnectionResetError:    # closed with our unread bytes in its buffer
            break
        except TimeoutError:
            raise AssertionError(f"the relay kept the connection open; it sent {data!r}") from None
        if not chunk:
            break
        data += chunk
    assert data == b"", f"the relay sent {data!r}"


def session_of(backend, message_id):
    """The back-end session that received the message with X-Test-Id `message_id`."""
    for session in backend.sessions:
        if any(message_ids(m) == [message_id] for m in session.messages):
            return session
    raise AssertionError(f"no message {message_id} at the back-end")


def message_ids(message):
    return [m.decode() for m in re.findall(rb"^X-Test-Id: (\S+)\r$", message.content, re.M)]


def tagged(message_id):
    return f"X-Test-Id: {message_id}\r\nSubject: through haproxy\r\n\r\nhello\r\n"


# --- 1. Crafted headers: the address in the header is the client ---------------------

@dataclass
class Case:
    header: bytes
    addr: str | None        # XCLIENT ADDR; None: the TCP peer (127.0.0.1)
    port: int | None        # XCLIENT PORT; None: the TCP peer's port
    ip: str | None = None   # the address as the log writes it (default: addr)


CASES = {
    "v1-tcp4": Case(v1("TCP4", "192.0.2.10", "198.51.100.1", 40001, 25), "192.0.2.10", 40001),
    "v1-tcp6": Case(v1("TCP6", "2001:db8::10", "2001:db8::1", 40002, 25), "IPV6:2001:db8::10", 40002,
                    "2001:db8::10"),
    "v1-unknown": Case(b"PROXY UNKNOWN\r\n", None, None),
    "v1-unknown-longest-allowed": Case(V1_LONGEST, None, None),
    "v2-tcp4": Case(v2(PROXY, "192.0.2.20", "198.51.100.1", 40003, 25), "192.0.2.20", 40003),
    "v2-tcp6": Case(v2(PROXY, "2001:db8::20", "2001:db8::1", 40004, 25), "IPV6:2001:db8::20", 40004,
                    "2001:db8::20"),
    "v2-tcp4-tlvs-skipped": Case(v2(PROXY, "192.0.2.21", "198.51.100.1", 40005, 25, tlvs=SOME_TLVS),
                                 "192.0.2.21", 40005),
    "v2-tcp6-tlvs-skipped": Case(v2(PROXY, "2001:db8::21", "2001:db8::1", 40006, 25, tlvs=SOME_TLVS),
                                 "IPV6:2001:db8::21", 40006, "2001:db8::21"),
    "v2-local": Case(v2(LOCAL), None, None),
    # LOCAL with addresses all the same: the receiver must ignore them.
    "v2-local-with-addresses": Case(v2(LOCAL, "192.0.2.22", "198.51.100.1", 40007, 25), None, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_header_names_the_client_for_xclient_and_the_log(case, mx_relay, backend):
    r = mx_relay(*TRUSTED, "--backend", backend.address)
    client = proxied(r, case.header)
    peer_port = source_port(client)
    served(client)
    assert send_message(client, BODY).code == 250
    assert client.say("QUIT").code == 221
    [message] = backend.delivered
    assert message.content == BODY
    attributes = xclient_attributes(backend.sessions[0])
    if case.addr is None:       # the TCP peer, this socket
        assert (attributes["ADDR"], attributes["PORT"]) == ("127.0.0.1", str(peer_port))
        r.wait_for_log(rf" INFO \w{{8}} connect from 127\.0\.0\.1:{peer_port}(?: via 127\.0\.0\.1:{peer_port})?$")
    else:
        assert (attributes["ADDR"], attributes["PORT"]) == (case.addr, str(case.port))
        connect_line(r, log_address(case.ip or case.addr, case.port), peer_port)
    assert "PROXY" not in r.log_text(), r.log_text()       # no warning about the header


def test_header_split_over_many_writes_is_read_whole(mx_relay, backend):
    r = mx_relay(*TRUSTED, "--backend", backend.address)
    header = v2(PROXY, "192.0.2.23", "198.51.100.1", 40008, 25, tlvs=SOME_TLVS)
    client = SMTPClient(r.connect(), nodelay=True)
    for piece in (header[:5], header[5:13], header[13:15], header[15:17], header[17:30], header[30:]):
        client.send(piece)
    served(client)
    assert send_message(client, BODY).code == 250
    assert xclient_attributes(backend.sessions[0])["ADDR"] == "192.0.2.23"


def test_each_connection_has_its_own_header_and_its_own_client(mx_relay, backend):
    """Two connections from one TCP peer, two clients: nothing of one header sticks to the other session."""
    r = mx_relay(*TRUSTED, "--backend", backend.address)
    first = proxied(r, v1("TCP4", "192.0.2.24", "198.51.100.1", 40009, 25))
    second = proxied(r, v2(PROXY, "2001:db8::24", "2001:db8::1", 40010, 25))
    served(first)
    served(second)
    assert send_message(second, BODY).code == 250
    assert send_message(first, BODY).code == 250
    addresses = {(a["ADDR"], a["PORT"]) for a in map(xclient_attributes, backend.sessions)}
    assert addresses == {("192.0.2.24", "40009"), ("IPV6:2001:db8::24", "40010")}


@pytest.mark.parametrize("header, client, server", [
    (v1("TCP4", "192.0.2.25", "198.51.100.1", 40011, 25), ("192.0.2.25", "40011"), ("198.51.100.1", "25")),
    (v2(PROXY, "2001:db8::25", "2001:db8::1", 40012, 587), ("2001:db8::25", "40012"), ("2001:db8::1", "587")),
], ids=["v1", "v2"])
def test_auth_service_hears_the_client_of_the_header_as_client_ip_and_the_header_as_nginx_sends_it(
        header, client, server, mx_relay, auth_service, backend):
    # nginx's auth_http request carries a PROXY header's four values (Proxy-Protocol-*), after
    # Client-Host; auth scripts written for nginx read them.
    service = auth_service(always(*ok(backend)))
    r = mx_relay(*TRUSTED, "--auth-http", service.url)
    smtp = proxied(r, header)
    served(smtp)
    assert send_message(smtp, BODY).code == 250
    [request] = service.requests
    names = [name for name, _ in request]
    assert names[names.index("Client-Host") + 1:][:4] == [
        "Proxy-Protocol-Addr", "Proxy-Protocol-Port", "Proxy-Protocol-Server-Addr", "Proxy-Protocol-Server-Port"]
    headers = dict(request)
    assert headers["Client-IP"] == client[0]
    assert (headers["Proxy-Protocol-Addr"], headers["Proxy-Protocol-Port"]) == client
    assert (headers["Proxy-Protocol-Server-Addr"], headers["Proxy-Protocol-Server-Port"]) == server
    assert xclient_attributes(backend.sessions[0])["ADDR"] == ("IPV6:" if ":" in client[0] else "") + client[0]


def test_auth_service_hears_no_proxy_protocol_headers_where_the_header_names_no_client(
        mx_relay, auth_service, backend):
    service = auth_service(always(*ok(backend)))
    r = mx_relay(*TRUSTED, "--auth-http", service.url)
    smtp = proxied(r, b"PROXY UNKNOWN\r\n")
    served(smtp)
    assert send_message(smtp, BODY).code == 250
    [request] = service.requests
    assert dict(request)["Client-IP"] == "127.0.0.1"
    assert not [name for name, _ in request if name.startswith("Proxy-Protocol")], request


# --- 2. What --allow-from and --max-clients-per-ip judge: the client of the header -----

def test_allow_from_judges_the_address_in_the_header_not_the_tcp_peer(mx_relay, backend):
    # The TCP peer, 127.0.0.1, is outside --allow-from: only the header can let a client in.
    r = mx_relay(*TRUSTED, "--allow-from", "192.0.2.0/24", "--backend", backend.address)
    outside = proxied(r, v1("TCP4", "198.51.100.7", "192.0.2.1", 40020, 25))
    assert [reply.code for reply in outside.replies_until_closed()] == [554]
    r.wait_for_log(r" WARNING refused 198\.51\.100\.7: not in --allow-from$")
    inside = proxied(r, v2(PROXY, "192.0.2.7", "192.0.2.1", 40021, 25))
    served(inside)
    assert send_message(inside, BODY).code == 250
    assert [xclient_attributes(s)["ADDR"] for s in backend.sessions] == ["192.0.2.7"]


def test_max_clients_per_ip_counts_the_address_in_the_header(mx_relay, backend):
    r = mx_relay(*TRUSTED, "--max-clients-per-ip", "1", "--backend", backend.address)
    first = proxied(r, v1("TCP4", "192.0.2.30", "198.51.100.1", 40030, 25))
    served(first)
    # Another client behind the same TCP peer (haproxy): served.
    other = proxied(r, v2(PROXY, "192.0.2.31", "198.51.100.1", 40031, 25))
    served(other)
    # The same client again, in a second session: refused.
    again = proxied(r, v1("TCP4", "192.0.2.30", "198.51.100.1", 40032, 25))
    replies = again.replies_until_closed()
    assert [reply.text for reply in replies] == ["421 4.7.0 Too many connections from your address, try again later"]
    r.wait_for_log(r" WARNING (?:\w{8} )?refused 192\.0\.2\.30: 421 ")
    assert send_message(first, BODY).code == 250
    assert send_message(other, BODY).code == 250
    assert sorted(xclient_attributes(s)["ADDR"] for s in backend.sessions) == ["192.0.2.30", "192.0.2.31"]
    # Its slot is freed under the same address it was taken under: once the
    # first session is closed (the slot is free before the client sees the
    # close), the client is served again.
    assert first.say("QUIT").code == 221
    assert first.replies_until_closed() == []
    served(proxied(r, v1("TCP4", "192.0.2.30", "198.51.100.1", 40033, 25)))


# --- 3. Untrusted peers, malformed and unfinished headers: closed without a byte -------

def test_peer_outside_real_ip_from_is_closed_without_a_byte_and_logged(mx_relay, backend):
    r = mx_relay("--proxy-protocol", "--real-ip-from", "10.0.0.0/8", "--backend", backend.address)
    client = proxied(r, v1("TCP4", "192.0.2.40", "198.51.100.1", 40040, 25))
    assert_closed_without_a_byte(client)
    r.wait_for_log(r" WARNING refused 127\.0\.0\.1: PROXY protocol from a peer outside --real-ip-from$")
    assert backend.connections == 0
    assert "192.0.2.40" not in r.log_text()


def test_proxy_protocol_without_real_ip_from_is_a_configuration_error():
    # It would refuse every client: no peer's header is trusted.
    result = run_relay("--proxy-protocol", "--backend", "127.0.0.1:25", "--check-config")
    assert result.returncode == 1, result
    assert result.stderr.startswith("smtprelay: --real-ip-from: --proxy-protocol needs the peers whose PROXY "
                                    "header is trusted"), result.stderr


def test_trusted_and_untrusted_peers_on_one_relay(mx_relay, backend, opened):
    """--real-ip-from 127.0.0.1/32: 127.0.0.1 may send a header, 127.0.0.2 may not."""
    r = mx_relay("--proxy-protocol", "--real-ip-from", "127.0.0.1/32", "--backend", backend.address)
    untrusted = socket.socket()
    opened.callback(untrusted.close)
    untrusted.settimeout(10)
    untrusted.bind(("127.0.0.2", 0))
    untrusted.connect((r.host, r.port))
    client = SMTPClient(untrusted)
    client.send(v1("TCP4", "192.0.2.41", "198.51.100.1", 40041, 25))
    assert_closed_without_a_byte(client)
    r.wait_for_log(r" WARNING refused 127\.0\.0\.2: PROXY protocol from a peer outside --real-ip-from$")
    trusted = proxied(r, v1("TCP4", "192.0.2.42", "198.51.100.1", 40042, 25))
    served(trusted)
    assert send_message(trusted, BODY).code == 250
    assert [xclient_attributes(s)["ADDR"] for s in backend.sessions] == ["192.0.2.42"]


MALFORMED = {
    "junk": b"HELLO relay, here is no header\r\n",
    "smtp-first": b"EHLO client.example\r\n",
    "v1-tcp4-bad": b"PROXY TCP4 bad\r\n",
    "v1-bad-address": v1("TCP4", "192.0.2.300", "198.51.100.1", 40050, 25),
    "v1-v6-address-as-tcp4": v1("TCP4", "2001:db8::50", "198.51.100.1", 40050, 25),
    "v1-v4-address-as-tcp6": v1("TCP6", "192.0.2.50", "2001:db8::1", 40050, 25),
    "v1-port-out-of-range": v1("TCP4", "192.0.2.50", "198.51.100.1", 65536, 25),
    "v1-unknown-protocol": v1("UDP4", "192.0.2.50", "198.51.100.1", 40050, 25),
    "v1-word-missing": v1("TCP4", "192.0.2.50", "198.51.100.1", 40050),
    "v1-bad-destination-address": v1("TCP4", "192.0.2.50", "198.51.100.300", 40050, 25),
    "v1-bad-destination-port": v1("TCP4", "192.0.2.50", "198.51.100.1", 40050, "smtp"),
    # No line end within 107 bytes: refused there, not once a CRLF comes.
    "v1-longer-than-107-bytes": b"PROXY UNKNOWN " + b"x" * 120,
    "v1-line-of-108-bytes": b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",
    "v2-version-1": v2(PROXY, "192.0.2.51", "198.51.100.1", 40051, 25, version=1),
    "v2-version-3": v2(PROXY, "192.0.2.51", "198.51.100.1", 40051, 25, version=3),
    "v2-command-2": v2(0x2, "192.0.2.51", "198.51.100.1", 40051, 25),
    "v2-tcp4-address-block-short": v2(PROXY, family=TCP4, addresses=b"\xc0\x00\x02\x33\xc6\x33"),
    "v2-tcp6-address-block-short": v2(PROXY, family=TCP6, addresses=ipaddress.ip_address("2001:db8::51").packed),
}


@pytest.mark.parametrize("header", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_is_closed_without_reply_and_the_relay_serves_the_next_client(header, mx_relay, backend):
    r = mx_relay(*TRUSTED, "--backend", backend.address)
    assert_closed_without_a_byte(proxied(r, header))        # at once: no --timeout (60 s) waited for
    r.wait_for_log(r" WARNING 127\.0\.0\.1: bad PROXY header: \S")
    assert backend.connections == 0
    client = proxied(r, v1("TCP4", "192.0.2.52", "198.51.100.1", 40052, 25))
    served(client)
    assert send_message(client, BODY).code == 250
    assert [xclient_attributes(s)["ADDR"] for s in backend.sessions] == ["192.0.2.52"]


def test_v2_header_longer_than_what_is_sent_is_closed_without_reply(mx_relay, backend):
    """The length says 200 bytes follow; 12 come, then the client's end of the stream."""
    r = mx_relay(*TRUSTED, "--backend", backend.address)
    header = v2(PROXY, "192.0.2.53", "198.51.100.1", 40053, 25, length=200)
    client = proxied(r, header)
    client.sock.shutdown(socket.SHUT_WR)
    assert_closed_without_a_byte(client)
    r.wait_for_log(r" WARNING 127\.0\.0\.1: bad PROXY header: \S")
    served(proxied(r, v1("TCP4", "192.0.2.54", "198.51.100.1", 40054, 25)))


UNFINISHED = {
    "nothing": b"",
    "v1-half": b"PROXY TCP4 192.0.2.60 198.51",
    "v2-fixed-part-only": v2(PROXY, "192.0.2.60", "198.51.100.1", 40060, 25)[:16],
    "v2-addresses-cut": v2(PROXY, "192.0.2.60", "198.51.100.1", 40060, 25)[:20],
}


@pytest.mark.parametrize("header", UNFINISHED.values(), ids=UNFINISHED.keys())
def test_header_never_finished_is_closed_after_the_timeout(header, mx_relay, backend):
    r = mx_relay(*TRUSTED, "--timeout", "1", "--backend", backend.address)
    client = proxied(r, header)
    started = time.monotonic()
    assert_closed_without_a_byte(client)
    assert time.monotonic() - started >= 0.5, "closed long before --timeout 1"
    r.wait_for_log(r" WARNING 127\.0\.0\.1: no PROXY header within 1s$")
    served(proxied(r, v1("TCP4", "192.0.2.61", "198.51.100.1", 40061, 25)))


def test_header_trickled_past_the_timeout_is_closed_the_deadline_is_for_the_whole_header(mx_relay, backend):
    r = mx_relay(*TRUSTED, "--timeout", "1", "--backend", backend.address)
    header = v1("TCP4", "192.0.2.62", "198.51.100.1", 40062, 25)        # 44 bytes, one each 0.1 s: 4.4 s
    client = SMTPClient(r.connect(), nodelay=True)
    started, sent = time.monotonic(), 0
    for byte in header:
        try:
            client.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        readable, _, _ = select.select([client.sock], [], [], 0.1)      # the pace, and the relay's close
        if readable:
            break
    assert_closed_without_a_byte(client)
    elapsed = time.monotonic() - started
    assert sent < len(header), "the relay waited for the whole trickled header"
    assert elapsed < 3.5, f"closed after {elapsed:.1f}s: each byte restarted the deadline"
    r.wait_for_log(r" WARNING 127\.0\.0\.1: no PROXY header within 1s$")
    assert backend.connections == 0


# --- 4. Bytes after the header are the client's: a ClientHello on --tls-listen --------

class MemoryBIOTLS:
    """The client side of TLS over `sock`, through memory BIOs, so that `prefix` and the
    ClientHello leave in one write. sendall() and recv() as a socket's, for SMTPClient."""

    def __init__(self, sock, context, server_hostname, prefix):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.first_write = None
        self._run(self.tls.do_handshake, prefix=prefix)

    def _flush(self, prefix=b""):
        data = prefix + self.outgoing.read()
        if data:
            if self.first_write is None:
                self.first_write = data
            self.sock.sendall(data)

    def _run(self, operation, *args, prefix=b""):
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush(prefix)
                prefix = b""
                data = self.sock.recv(65536)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            self._flush(prefix)
            return result

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[self._run(self.tls.write, view):]

    def recv(self, size):
        try:
            return self._run(self.tls.read, size)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    def version(self):
        return self.tls.version()


def tls_port(relay):
    """The port of the relay's --tls-listen listener, once it is listening."""
    return int(relay.wait_for_log(r"listening on \S+:(\d+) \(TLS\)")[1])


@pytest.mark.parametrize("writes", ["one-write", "header-then-handshake"])
def test_tls_listener_takes_the_clienthello_right_behind_the_header(writes, mx_relay, backend, tls, opened):
    r = mx_relay(*TRUSTED, "--backend", backend.address, "--tls-cert", tls.server.cert_path,
                  "--tls-key", tls.server.key_path, "--tls-listen", "127.0.0.1:0")
    sock = socket.create_connection(("127.0.0.1", tls_port(r)), timeout=10)
    opened.callback(sock.close)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer_port = sock.getsockname()[1]
    header = v2(PROXY, "192.0.2.70", "198.51.100.1", 40070, 465, tlvs=SOME_TLVS)
    if writes == "one-write":
        channel = MemoryBIOTLS(sock, tls.client_context(), SERVER_NAME, prefix=header)
        assert channel.first_write.startswith(header) and channel.first_write[len(header)] == 0x16, \
            "the header and the ClientHello were not in one write"
    else:
        sock.sendall(header)
        channel = tls.client_context().wrap_socket(sock, server_hostname=SERVER_NAME)
        opened.callback(channel.close)
    assert channel.version() in ("TLSv1.2", "TLSv1.3")
    client = SMTPClient(channel)
    served(client)
    assert send_message(client, BODY).code == 250
    assert client.say("QUIT").code == 221
    attributes = xclient_attributes(backend.sessions[0])
    assert (attributes["ADDR"], attributes["PORT"]) == ("192.0.2.70", "40070")
    connect_line(r, log_address("192.0.2.70", 40070), peer_port)


def test_plain_listener_greets_a_client_whose_header_came_alone_and_nothing_else(mx_relay, backend):
    """The greeting is the relay's to send first, once the header is read: no byte of the client is waited for."""
    r = mx_relay(*TRUSTED, "--backend", backend.address)
    client = proxied(r, v2(PROXY, "192.0.2.71", "198.51.100.1", 40071, 25))
    assert client.reply().text.startswith(f"220 {SERVER_NAME} ")


# --- 5. A real haproxy ----------------------------------------------------------------

class HaproxyProcess(LoggedProcess):
    """haproxy -f CONFIG -db (foreground) with `env` added; a thread drains its output into `.lines`.

    SMTP_LISTEN (127.0.0.1:<free port>) and HAPROXY_LOG=stdout are set in its
    environment; the config binds "${SMTP_LISTEN}" and logs to "${HAPROXY_LOG}".
    """

    name = "haproxy"

    def __init__(self, config, env):
        self.host, self.port = "127.0.0.1", free_port()
        environment = {**os.environ, "SMTP_LISTEN": f"{self.host}:{self.port}", "HAPROXY_LOG": "stdout", **env}
        super().__init__([HAPROXY, "-f", str(config), "-db"], environment)

    def wait_accepting(self, timeout=10):
        """Wait until the frontend accepts (the probe is passed on to a relay, and closed at once)."""
        if not wait_accepting(self.proc, self.host, self.port, timeout):
            self._drainer.join(5)
            pytest.fail(f"haproxy exited with code {self.proc.returncode}:\n{self.log_text()}", pytrace=False)

    def served_by(self, client_ip, client_port, timeout=10):
        """The server (relay1, ...) haproxy's tcplog line gives for the session from client_ip:client_port."""
        return self.wait_for_log(rf"\b{re.escape(client_ip)}:{client_port} \[[^\]]+\] smtp \w+/(\w+) ", timeout)[1]

    def stop(self):
        stop_process(self.proc, timeout=5)
        self._drainer.join(5)
        if not self._drainer.is_alive():
            self.proc.stdout.close()


@pytest.fixture
def haproxy():
    """Factory start(config_path, **env) -> a HaproxyProcess accepting connections; all stopped at teardown."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail(f"{HAPROXY} is missing: install Debian's haproxy package")
    with contextlib.ExitStack() as teardown:
        def start(config, **env):
            process = HaproxyProcess(config, env)
            teardown.callback(process.stop)
            process.wait_accepting()
            return process

        yield start


ONE_RELAY_CFG = """\
global
    log "${HAPROXY_LOG}" local0

defaults
    mode tcp
    log global
    option tcplog
    option log-health-checks
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend smtp
    bind "${SMTP_LISTEN}"
    default_backend relays

backend relays
    option smtpchk EHLO haproxy.invalid
    server relay "${RELAY}" %s check inter 200ms fall 1 rise 1
"""


# haproxy's log names a session by the client's address and port, and the
# kernel's choice of port repeats within a few hundred sessions: each
# session through haproxy gets a port of its own, below the ephemeral range.
# A port still in TIME_WAIT from an earlier run (or taken by another) is skipped.
source_ports = itertools.count(20000)


def connected_from(source, host, port):
    """A smtplib.SMTP connected to host:port from `source` (127.0.0.x) and the next free port of
    source_ports, greeting read -> (client, code, text)."""
    while True:
        client = smtplib.SMTP(timeout=10, source_address=(source, next(source_ports)))
        try:
            code, text = client.connect(host, port)
            return client, code, text
        except OSError as e:
            client.close()
            if e.errno != errno.EADDRINUSE:
                raise


def smtp_from(host, port, source, opened):
    """A smtplib.SMTP to host:port from `source` (127.0.0.x), greeting read; closed at teardown."""
    client, _, _ = connected_from(source, host, port)
    opened.callback(client.close)
    return client


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_one_relay_passes_the_client_on(send_proxy, mx_relay, backend, haproxy, tmp_path,
                                                            opened):
    r = mx_relay("--proxy-protocol", "--real-ip-from", "127.0.0.1/32", "--backend", backend.address)
    config = tmp_path / "haproxy.cfg"
    config.write_text(ONE_RELAY_CFG % send_proxy)
    proxy = haproxy(config, RELAY=r.address)
    # haproxy's health check (v1: a TCP4 header naming haproxy; v2: LOCAL) passes.
    proxy.wait_for_log(r"Health check for server relays/relay succeeded, reason: Layer7 check passed, code: 221")
    client = smtp_from(proxy.host, proxy.port, "127.0.0.2", opened)
    client_port = client.sock.getsockname()[1]
    assert client.ehlo(CLIENT_HELO)[0] == 250
    assert client.sendmail("a@example.org", ["b@example.net"], tagged("one")) == {}
    client.quit()
    session = session_of(backend, "one")
    attributes = xclient_attributes(session)
    assert (attributes["ADDR"], attributes["PORT"]) == ("127.0.0.2", str(client_port))
    assert r.wait_for_log(rf" INFO \w{{8}} connect from 127\.0\.0\.2:{client_port} via 127\.0\.0\.1:\d+$")
    assert proxy.served_by("127.0.0.2", client_port) == "relay"
    assert "is DOWN" not in proxy.log_text(), proxy.log_text()


def test_contrib_haproxy_cfg_is_valid_and_balances_roundrobin_with_send_proxy_v2():
    """The file the README shows: what it promises is in it, and haproxy -c accepts it with its defaults."""
    text = HAPROXY_CFG.read_text()
    lines = [line.split("#")[0].split() for line in text.splitlines()]
    assert ["mode", "tcp"] in lines and ["balance", "roundrobin"] in lines
    servers = [line for line in lines if line[:1] == ["server"]]
    assert len(servers) == 2 and all("send-proxy-v2" in line for line in servers), servers
    assert any(line[:1] == ["option"] and "smtpchk" in line for line in lines)
    result = subprocess.run([HAPROXY, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=20,
                            env={k: v for k, v in os.environ.items()
                                 if k not in ("SMTP_LISTEN", "RELAY1", "RELAY2", "HAPROXY_LOG")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


def send_tagged(proxy, message_id, source):
    """One session through haproxy from `source`, one message tagged `message_id` -> the client's port.

    Raises (smtplib.SMTPException, OSError) where the client did not get its 250.
    """
    client, code, text = connected_from(source, proxy.host, proxy.port)
    try:
        if code != 220:
            raise smtplib.SMTPConnectError(code, text)
        port = client.sock.getsockname()[1]
        client.sendmail("a@example.org", ["b@example.net"], tagged(message_id))
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        return port
    finally:
        client.close()


def open_transaction(proxy, source, opened):
    """A session through haproxy from `source` with MAIL and RCPT accepted: a transaction open, DATA next."""
    client = smtp_from(proxy.host, proxy.port, source, opened)
    assert client.ehlo(CLIENT_HELO)[0] == 250
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt("b@example.net")[0] == 250
    return client


def test_two_relays_behind_contrib_haproxy_cfg_share_the_mail_and_a_stopped_one_loses_none(relay, backend, haproxy,
                                                                                           opened):
    options = ("--server-name", SERVER_NAME, "--resolve", "off", "--proxy-protocol",
               "--real-ip-from", "127.0.0.1/32", "--backend", backend.address)
    relays = [relay(*options), relay(*options)]
    proxy = haproxy(HAPROXY_CFG, RELAY1=relays[0].address, RELAY2=relays[1].address)
    for name in ("relay1", "relay2"):
        proxy.wait_for_log(rf"Health check for server relays/{name} succeeded, reason: Layer7 check passed")

    # Part 1: N sessions one after the other, from 127.0.0.3; in turn to each relay.
    n = 10
    ports = {f"seq-{i}": send_tagged(proxy, f"seq-{i}", "127.0.0.3") for i in range(n)}
    for message_id, port in ports.items():
        attributes = xclient_attributes(session_of(backend, message_id))
        assert (attributes["ADDR"], attributes["PORT"]) == ("127.0.0.3", str(port)), message_id
    servers = [proxy.served_by("127.0.0.3", port) for port in ports.values()]
    assert sorted(servers.count(name) for name in ("relay1", "relay2")) == [n // 2, n // 2], servers
    for name, port in zip(servers, ports.values()):
        relays[int(name[-1]) - 1].wait_for_log(rf" INFO \w{{8}} connect from 127\.0\.0\.3:{port} "
                                               rf"via 127\.0\.0\.1:\d+$")

    # Two sessions with a transaction open, one on each relay (in turn: nothing else is sent now).
    held = [open_transaction(proxy, "127.0.0.3", opened) for _ in range(2)]
    held_ports = [client.sock.getsockname()[1] for client in held]
    on_relay1 = int(relays[0].wait_for_log(rf" connect from 127\.0\.0\.3:({held_ports[0]}|{held_ports[1]}) via ")[1])
    held_on_relay1, held_on_relay2 = held if held_ports[0] == on_relay1 else held[::-1]

    # Part 2: clients keep sending, each message in its own session; relay1
    # gets SIGTERM in the middle of it. A client that got no 250 tries again
    # with a new message; every 250 must mean one delivery.
    ids = itertools.count()
    accepted, failed = [], []       # (id, port, start time), (id, error)
    progress, stop = threading.Condition(), threading.Event()

    def client_loop(name):
        while not stop.is_set():
            message_id = f"{name}-{next(ids)}"
            started = time.monotonic()
            try:
                port = send_tagged(proxy, message_id, "127.0.0.3")
            except (smtplib.SMTPException, OSError) as e:
                with progress:
                    failed.append((message_id, repr(e)))
                continue
            with progress:
                accepted.append((message_id, port, started))
                progress.notify_all()

    def wait_accepted(count, since=0.0, timeout=30):
        with progress:
            assert progress.wait_for(lambda: sum(started >= since for _, _, started in accepted) >= count,
                                     timeout), f"not {count} messages accepted within {timeout}s; failures: {failed}"

    threads = [threading.Thread(target=client_loop, args=(f"c{i}",), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_accepted(20)
        relays[0].proc.send_signal(signal.SIGTERM)
        relays[0].wait_for_log(r" INFO SIGTERM: stopping")     # its listener is closed by now
        stopping = time.monotonic()
        # relay1 waits for the transaction in flight; new sessions go to relay2 meanwhile.
        wait_accepted(10, since=stopping)
        assert relays[0].proc.poll() is None, "relay1 did not wait for the transaction in flight"
        assert held_on_relay1.data(tagged("held-relay1"))[0] == 250
        assert held_on_relay1.noop()[0] == 421
        assert relays[0].proc.wait(timeout=30) == 0
        relays[0].wait_for_log(r" INFO stopped$")
        exited = time.monotonic()
        wait_accepted(10, since=exited)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert held_on_relay2.data(tagged("held-relay2"))[0] == 250
    held_on_relay2.quit()
    # haproxy's health check finds relay1 gone.
    proxy.wait_for_log(r"Server relays/relay1 is DOWN", timeout=20)

    delivered = [message_id for m in backend.delivered for message_id in message_ids(m)]
    twice = sorted({i for i in delivered if delivered.count(i) > 1})
    assert not twice, f"delivered more than once: {twice}"
    accepted_ids = {message_id for message_id, _, _ in accepted} | {"held-relay1", "held-relay2"}
    lost = sorted(accepted_ids - set(delivered))
    assert not lost, f"got 250 but never delivered: {lost}"
    unconfirmed = sorted(set(delivered) - accepted_ids - set(ports))
    assert not unconfirmed, f"delivered without the client's 250: {unconfirmed}; failures: {failed}"
    # From relay1's stop on, haproxy gave every new session to relay2.
    after = [(message_id, port) for message_id, port, started in accepted if started >= stopping]
    assert {proxy.served_by("127.0.0.3", port) for _, port in after} == {"relay2"}
    for message_id, port in after + [("held-relay1", on_relay1)]:
        attributes = xclient_attributes(session_of(backend, message_id))
        assert (attributes["ADDR"], attributes["PORT"]) == ("127.0.0.3", str(port)), message_id
    # Before the stop, both relays took part.
    before = [port for _, port, started in accepted if started < stopping]
    assert {"relay1", "relay2"} <= {proxy.served_by("127.0.0.3", port) for port in before}
