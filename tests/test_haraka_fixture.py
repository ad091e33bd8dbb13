"""The Haraka fixture (haraka_fixture.py) over raw sockets, and what Haraka does with PROXY headers.

No relay here: these tests pin down the back-end that the relay's
--backend-proxy-protocol tests stand on. Haraka 3.3.4 reads PROXY v1 (TCP4,
TCP6) from the hosts in connection.ini's [haproxy] hosts[]; from such a host
the header is required (no greeting before it); v2 is not read; a header from
any other host is refused with 421. Not tested here, for it takes Haraka's
fixed 30 s PROXY timeout (seen by hand, Haraka 3.3.4): from a listed host, a v2
header, an EHLO and silence all get no greeting, then "421 PROXY timeout".
"""
import socket
import struct

import pytest

from haraka_fixture import haraka, proxy_v1  # noqa: F401
from helpers import SMTPClient, send_message

BODY = b"Subject: through a proxy\r\n\r\nHello Haraka.\r\n"


@pytest.fixture
def connect():
    """connect(instance, source="127.0.0.1", timeout=10) -> an SMTPClient on a raw socket to the
    Haraka instance from `source`, nothing read yet; every socket is closed at teardown."""
    sockets = []

    def connect(instance, source="127.0.0.1", timeout=10):
        sockets.append(socket.create_connection((instance.host, instance.port), timeout=timeout,
                                                source_address=(source, 0)))
        return SMTPClient(sockets[-1])

    yield connect
    for sock in sockets:
        sock.close()


def test_a_proxy_v1_header_gives_haraka_the_client_address_and_port(haraka, connect):
    h = haraka()
    client = connect(h)
    client.send(proxy_v1("192.0.2.7", 40001, "127.0.0.1", 25))
    greeting = client.reply()
    assert greeting.code == 220 and greeting.text.startswith("220 haraka.test ESMTP Haraka/"), greeting
    ehlo = client.say("EHLO client.example")
    assert ehlo.code == 250 and "[192.0.2.7]" in ehlo.lines[0], ehlo
    assert send_message(client, BODY, "a@example.org", "b@example.net").code == 250
    assert client.say("QUIT").code == 221
    [message] = h.wait_for_messages(1)
    assert (message.remote_ip, message.remote_port) == ("192.0.2.7", 40001)
    assert (message.local_ip, message.local_port) == ("127.0.0.1", 25)
    assert message.proxy_ip == "127.0.0.1"
    assert message.proxy["proto"] == "TCP4"
    assert (message.helo, message.helo_verb) == ("client.example", "EHLO")
    assert (message.mail_from, message.rcpt_to) == ("a@example.org", ["b@example.net"])
    assert message.data_bytes == len(BODY + b".\r\n")             # Haraka counts the end of data too
    assert message.message.endswith(BODY)
    assert b"(unknown [192.0.2.7])" in message.message.split(b"\r\n\r\n")[0]     # its Received header


def test_a_proxy_v1_tcp6_header_and_an_ehlo_in_the_same_write(haraka, connect):
    h = haraka(haproxy_hosts="127.0.0.0/8")
    client = connect(h)
    client.send(proxy_v1("2001:db8::7", 40002, "::1", 25) + b"EHLO six.example\r\n")
    assert client.reply().code == 220                   # the greeting first, then the EHLO's reply
    assert "[2001:db8::7]" in client.reply().lines[0]
    assert send_message(client, BODY).code == 250
    [message] = h.wait_for_messages(1)
    assert (message.remote_ip, message.remote_port, message.helo) == ("2001:db8::7", 40002, "six.example")


def test_with_no_host_listed_haraka_greets_at_once_and_records_the_socket_peer(haraka, connect):
    h = haraka(haproxy_hosts=())
    client = connect(h)
    port = client.sock.getsockname()[1]
    assert client.reply().code == 220
    assert client.say("EHLO plain.example").code == 250
    assert send_message(client, BODY, "one@example.org").code == 250
    assert send_message(client, BODY, "two@example.org").code == 250
    first, second = h.wait_for_messages(2)
    assert [first.mail_from, second.mail_from] == ["one@example.org", "two@example.org"]
    assert (first.remote_ip, first.remote_port, first.proxy, first.proxy_allowed) == ("127.0.0.1", port, None, False)


def test_a_proxy_header_from_a_host_not_listed_is_refused_after_the_greeting(haraka, connect):
    h = haraka(haproxy_hosts="127.0.0.2")
    client = connect(h, source="127.0.0.1")
    client.send(proxy_v1("192.0.2.7", 40001, "127.0.0.1", 25))      # at once, as a relay would
    replies = client.replies_until_closed()
    assert [r.code for r in replies] == [220, 421], replies
    assert replies[1].text == "421 PROXY not allowed from 127.0.0.1"
    # ...while the listed 127.0.0.2 is heard
    listed = connect(h, source="127.0.0.2")
    listed.send(proxy_v1("192.0.2.8", 40002, "127.0.0.1", 25))
    assert listed.reply().code == 220
    assert listed.say("EHLO listed.example").code == 250
    assert send_message(listed, BODY).code == 250
    assert [m.remote_ip for m in h.wait_for_messages(1)] == ["192.0.2.8"]


def test_proxy_unknown_is_refused_as_invalid(haraka, connect):
    h = haraka()
    client = connect(h)
    client.send(b"PROXY UNKNOWN\r\n")
    assert [r.text for r in client.replies_until_closed()] == ["421 Invalid PROXY format"]


def test_a_second_proxy_line_after_the_greeting_changes_the_client_again(haraka, connect):
    """Haraka takes PROXY as a command from a listed host at any time: a relay must never pass one on."""
    h = haraka()
    client = connect(h)
    client.send(proxy_v1("192.0.2.7", 40001, "127.0.0.1", 25))
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    assert client.say("PROXY TCP4 198.51.100.9 127.0.0.1 40009 25").code == 220    # greeted anew
    assert client.say("EHLO again.example").code == 250
    assert send_message(client, BODY).code == 250
    [message] = h.wait_for_messages(1)
    assert (message.remote_ip, message.remote_port, message.helo) == ("198.51.100.9", 40009, "again.example")
