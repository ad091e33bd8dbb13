"""--backend-proxy-protocol: a PROXY header (haproxy's proxy-protocol.txt, v1 or v2) first on every
connection to an SMTP back-end, naming the client, for back-ends that read it instead of XCLIENT.

The README's options table: source the client's address and port (after the relay's own PROXY
input), destination the relay's address and port the client connected to (as nginx's
`proxy_protocol`); before any TLS; a back-end that does not expect it answers the header as a
command and counts as down; XCLIENT is then sent where offered, not required; a client with no IP
address goes only where XCLIENT can say so. The scripted back-end reads the header when told to,
and takes it as a command otherwise, as a server that reads none; a real Postfix and Haraka are in
test_postfix.py and test_haraka.py.
"""
import socket
import struct

import pytest

from helpers import SMTPClient, greeted, run_relay, send_message, verbs, xclient_attributes
from scripted_backend import DEFAULT_EXTENSIONS
from test_inetd import inetd_relay  # noqa: F401  (fixture)
from tls_fixtures import tls  # noqa: F401  (fixture)

BODY = b"Subject: proxied\r\n\r\nThe back-end knows who sent this.\r\n"
SERVER_NAME = "mx.test"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
NO_XCLIENT = [e for e in DEFAULT_EXTENSIONS if not e.startswith("XCLIENT")]


def backend_tls_on(tls):
    return ["--backend-tls", "on", "--backend-tls-ca", tls.ca_path]


def expected_header(version, source, destination):
    """The header for a TCP4 client, written out from the spec (sections 2.1 and 2.2)."""
    (ip, port), (to, to_port) = source, destination
    if version == "v1":
        return f"PROXY TCP4 {ip} {to} {port} {to_port}\r\n".encode()
    addresses = socket.inet_aton(ip) + socket.inet_aton(to) + struct.pack("!HH", port, to_port)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


def client_from(relay, address):
    """An SMTPClient, greeted and past EHLO, on a connection from `address` to the relay."""
    client = SMTPClient(relay.connect(source=address))
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    return client


@pytest.fixture
def start(relay):
    def start(*options):
        return relay("--server-name", SERVER_NAME, "--resolve", "off", *options)
    return start


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_header_names_the_client_and_the_relays_own_address_first_on_the_connection(start, scripted_backend,
                                                                                       version):
    backend = scripted_backend(proxy_protocol=True)
    r = start("--backend", backend.address, "--backend-proxy-protocol", version)
    client = client_from(r, "127.0.0.2")
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert session.proxy_header == expected_header(version, client.sock.getsockname(), (r.host, r.port))
    assert [m.content for m in backend.delivered] == [BODY]
    # XCLIENT is offered, so it is sent too (every attribute offered), its ADDR the header's.
    assert xclient_attributes(session)["ADDR"] == "127.0.0.2"
    assert xclient_attributes(session)["PORT"] == str(client.sock.getsockname()[1])


def test_behind_a_proxy_header_in_the_header_out_names_the_real_client(start, scripted_backend):
    # nginx's mail_proxy_protocol.t: with realip, the back-end gets the client of the header
    # that came in, and the relay's own address as the destination.
    backend = scripted_backend(proxy_protocol=True)
    r = start("--backend", backend.address, "--backend-proxy-protocol", "v1", "--proxy-protocol",
              "--real-ip-from", "127.0.0.0/8")
    sock = r.connect()
    client = SMTPClient(sock)
    client.send(b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\n")
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert session.proxy_header == expected_header("v1", ("192.0.2.7", 40001), (r.host, r.port))


def test_xclient_is_not_required_behind_the_header_and_no_xclient_sends_none(start, scripted_backend):
    without = scripted_backend(proxy_protocol=True, extensions=NO_XCLIENT)
    r = start("--backend", without.address, "--backend-proxy-protocol", "v2")      # --xclient is the default
    assert send_message(greeted(r, ehlo="client.example"), BODY).code == 250
    assert [m.content for m in without.delivered] == [BODY]
    assert b"XCLIENT" not in verbs(without.sessions[0])

    offering = scripted_backend(proxy_protocol=True)
    r = start("--backend", offering.address, "--backend-proxy-protocol", "v2", "--no-xclient")
    assert send_message(greeted(r, ehlo="client.example"), BODY).code == 250
    [session] = offering.sessions
    assert session.proxy_header.startswith(V2_SIGNATURE)
    assert b"XCLIENT" not in verbs(session)
    # The connection is the client's: its EHLO carries the client's HELO name.
    assert [c[5:] for c in session.commands if c[:5].upper() == b"EHLO "] == [b"client.example"]
    assert "back-end sees every client as the relay's own address" not in r.log_text()


def test_a_refused_xclient_leaves_the_headers_address_standing(start, scripted_backend):
    backend = scripted_backend(proxy_protocol=True, replies={"XCLIENT": "550 5.7.0 Error: insufficient authorization"})
    r = start("--backend", backend.address, "--backend-proxy-protocol", "v1")
    assert send_message(greeted(r, ehlo="client.example"), BODY).code == 250
    assert len(backend.delivered) == 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_back_end_that_reads_no_header_is_down_and_gets_no_mail(start, scripted_backend, version):
    # The scripted back-end then takes the header as commands: v1 a "PROXY" command (502);
    # v2's signature holds empty lines and "QUIT", so it says 221 and closes.
    backend = scripted_backend()
    r = start("--backend", backend.address, "--backend-proxy-protocol", version)
    client = greeted(r, ehlo="client.example")
    reply = client.say("MAIL FROM:<a@example.org>")
    assert reply.code == 451, reply
    assert backend.delivered == [] and not any(b"MAIL" in verbs(s) for s in backend.sessions)
    assert f"did not take the PROXY {version} header" in r.log_text()


def test_the_header_goes_before_implicit_tls(start, scripted_backend, tls):
    backend = scripted_backend(proxy_protocol=True, tls_context=tls.server_context(tls.backend))
    r = start("--backend", backend.address, "--backend-proxy-protocol", "v1", *backend_tls_on(tls))
    client = client_from(r, "127.0.0.2")
    assert send_message(client, BODY).code == 250
    [session] = backend.sessions
    assert session.tls and session.proxy_header.startswith(b"PROXY TCP4 127.0.0.2 ")
    assert len(backend.delivered) == 1


def test_connections_carrying_a_header_are_never_shared_between_sessions(start, scripted_backend):
    # Without XCLIENT the relay keeps back-end connections for the next session, but one that
    # began with a header belongs to its client.
    backend = scripted_backend(proxy_protocol=True, extensions=NO_XCLIENT)
    r = start("--backend", backend.address, "--backend-proxy-protocol", "v1", "--no-xclient")
    for _ in range(2):
        client = greeted(r, ehlo="client.example")
        assert send_message(client, BODY).code == 250
        assert client.say("QUIT").code == 221
        backend.wait_for_sessions_closed(len(backend.sessions))
    assert backend.connections == 2
    assert len(backend.delivered) == 2


@pytest.mark.parametrize("transport", ["pipes"])
def test_a_client_without_an_address_goes_only_where_xclient_can_say_so(inetd_relay, scripted_backend, transport):
    # The header cannot carry "no address" (UNKNOWN and LOCAL make the back-end take the
    # relay's own): XCLIENT ADDR=[UNAVAILABLE] must, or the client gets 451.
    offering = scripted_backend(proxy_protocol=True)
    relay = inetd_relay(transport, "--backend", offering.address, "--backend-proxy-protocol", "v2")
    relay.deliver()
    assert relay.exit_code() == 0, relay.log()
    [session] = offering.sessions
    assert session.proxy_header == V2_SIGNATURE + b"\x20\x00\x00\x00"      # LOCAL
    assert xclient_attributes(session)["ADDR"] == "[UNAVAILABLE]"
    assert len(offering.delivered) == 1

    without = scripted_backend(proxy_protocol=True, extensions=NO_XCLIENT)
    relay = inetd_relay(transport, "--backend", without.address, "--backend-proxy-protocol", "v1")
    client = SMTPClient(relay.client)
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 451
    assert client.say("QUIT").code == 221
    assert relay.exit_code() == 0
    assert [s.proxy_header for s in without.sessions] == [b"PROXY UNKNOWN\r\n"]
    assert without.delivered == []
    assert "a client with no IP address cannot go in a PROXY header" in relay.log()


def test_probe_says_whether_the_back_end_took_the_header(scripted_backend):
    reads = scripted_backend(proxy_protocol=True, extensions=NO_XCLIENT)
    result = run_relay("--probe", "--backend", reads.address, "--backend-proxy-protocol", "v2")
    assert result.returncode == 0, result.stdout
    assert "PROXY: v2 header sent: taken" in result.stdout
    assert "XCLIENT: not offered (not needed: the PROXY header names the client)" in result.stdout
    assert "WARNING" not in result.stdout
    [session] = reads.sessions
    assert session.proxy_header.startswith(V2_SIGNATURE)

    ignores = scripted_backend()
    result = run_relay("--probe", "--backend", ignores.address, "--backend-proxy-protocol", "v1")
    assert result.returncode == 1, result.stdout
    assert "PROXY: v1 header sent: NOT taken" in result.stdout
    assert "would NOT be used: did not take the PROXY v1 header" in result.stdout


def test_probe_and_start_warn_where_the_back_end_sees_the_relays_address(relay, scripted_backend):
    backend = scripted_backend()
    result = run_relay("--probe", "--backend", backend.address, "--no-xclient")
    assert result.returncode == 0, result.stdout
    assert "WARNING: with --no-xclient and no --backend-proxy-protocol, the back-end sees every client as the " \
           "relay's own address" in result.stdout
    assert "-o mynetworks=" in result.stdout
    r = relay("--backend", backend.address, "--no-xclient")
    assert "the back-end sees every client as the relay's own address" in r.log_text()


def test_the_first_ehlo_says_the_relays_name_and_the_one_after_xclient_the_clients(start, scripted_backend):
    # nginx's handshake: EHLO with its own server_name, XCLIENT, then the client's HELO name.
    backend = scripted_backend()
    r = start("--backend", backend.address)
    assert send_message(greeted(r, ehlo="client.example"), BODY).code == 250
    [session] = backend.sessions
    ehlos = [c[5:] for c in session.commands if c[:5].upper() == b"EHLO "]
    assert ehlos == [SERVER_NAME.encode(), b"client.example"]


def test_a_back_end_not_offering_xclient_is_left_with_quit(start, scripted_backend):
    backend = scripted_backend(extensions=NO_XCLIENT)
    r = start("--backend", backend.address)
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 451
    [session] = backend.wait_for_sessions_closed(1)
    assert verbs(session) == [b"EHLO", b"QUIT"]
