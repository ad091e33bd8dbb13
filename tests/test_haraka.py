"""The relay in front of a real Haraka, a back-end without XCLIENT that reads the PROXY protocol:
the README's recipe ("In front of other mail servers") run as written.

Haraka 3.3 reads v1 only; from a host its connection.ini lists it takes nothing before the header.
"""

from haraka_fixture import haraka  # noqa: F401  (fixture)
from helpers import SMTPClient, readme_block, run_relay, send_message

BODY = b"Subject: to Haraka\r\n\r\nThrough the relay, under the client's own address.\r\n"


def test_the_readmes_haraka_recipe_gives_haraka_the_clients_address_and_port(relay, haraka):
    section = readme_block(r"    \[haproxy\]")
    h = haraka()
    assert section in (h.config_dir / "connection.ini").read_text()      # the fixture wrote the README's lines
    r = relay("--backend", h.address, "--backend-proxy-protocol", "v1", "--server-name", "mx.test")
    sock = r.connect(source="127.0.0.2")
    client = SMTPClient(sock)
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    assert send_message(client, BODY).code == 250       # XCLIENT, which Haraka lacks, is not needed
    [message] = h.wait_for_messages(1)
    assert (message.remote_ip, message.remote_port) == sock.getsockname()
    assert message.helo == "client.example"
    assert message.message.endswith(BODY)


def test_probe_of_haraka_says_it_took_the_v1_header(haraka):
    h = haraka()
    result = run_relay("--probe", "--backend", h.address, "--backend-proxy-protocol", "v1")
    print(result.stdout)            # what the probe says of Haraka, shown with -s
    assert result.returncode == 0, result.stdout
    assert "PROXY: v1 header sent: taken" in result.stdout
    assert "XCLIENT: not offered (not needed: the PROXY header names the client)" in result.stdout
