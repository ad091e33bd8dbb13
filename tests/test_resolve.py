"""Client names (--resolve): the relay under a hosts file of its own, with the system resolver.

The relay runs in a private mount namespace (unshare -m, as root) whose
/etc/hosts is this file's, so clients at 127.0.0.2-5 have the names the
tests need; the real resolver code (gethostbyaddr, getaddrinfo) runs.
"""
import os
import shutil
import smtplib
import sys

import pytest

from helpers import RELAY, RelayProcess, relay_env, xclient_attributes

HOSTS = """127.0.0.1 localhost
127.0.0.2 good.test
127.0.0.4 bad=name.test
127.0.0.6 10.0.0.1
"""
EXTENSIONS = ["PIPELINING", "8BITMIME", "XCLIENT ADDR NAME REVERSE_NAME HELO"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare(1) for a private /etc/hosts")


@pytest.fixture
def relay_with_hosts(tmp_path):
    """start(*args) -> a RelayProcess whose /etc/hosts is HOSTS; stopped at teardown."""
    hosts, config = tmp_path / "hosts", tmp_path / "smtprelay.conf"
    hosts.write_text(HOSTS)
    config.write_text("")
    started = []

    def start(*args):
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                sys.executable, str(RELAY), "-c", str(config), "--listen", "127.0.0.1:0", *map(str, args)]
        relay = RelayProcess(argv, relay_env())
        started.append(relay)
        relay.wait_listening(1)
        return relay

    yield start
    for relay in started:
        relay.close_clients()
        relay.stop()


def send_from(relay, source_ip):
    with smtplib.SMTP(relay.host, relay.port, timeout=10, source_address=(source_ip, 0)) as client:
        assert client.ehlo("client.example")[0] == 250
        assert client.sendmail("a@example.org", ["b@example.net"], b"Subject: names\r\n\r\nhi\r\n") == {}


@pytest.mark.parametrize("source_ip, name, reverse_name", [
    ("127.0.0.2", "good.test", "good.test"),                    # PTR, and its forward lookup gives it back
    ("127.0.0.5", "[UNAVAILABLE]", "[UNAVAILABLE]"),            # no PTR
    ("127.0.0.4", "[UNAVAILABLE]", "[UNAVAILABLE]"),            # a PTR that is no host name
    ("127.0.0.6", "[UNAVAILABLE]", "[UNAVAILABLE]"),            # a PTR that is an address in disguise
], ids=["confirmed", "no-ptr", "not-a-host-name", "numeric"])
def test_xclient_carries_the_clients_confirmed_name_and_its_ptr_name(
        relay_with_hosts, scripted_backend, source_ip, name, reverse_name):
    backend = scripted_backend(extensions=EXTENSIONS)
    relay = relay_with_hosts("--backend", backend.address)
    send_from(relay, source_ip)
    attributes = xclient_attributes(backend.sessions[0])
    assert (attributes["ADDR"], attributes["NAME"], attributes["REVERSE_NAME"]) == (source_ip, name, reverse_name)


def test_resolve_off_sends_unavailable_even_for_a_client_with_a_name(relay_with_hosts, scripted_backend):
    backend = scripted_backend(extensions=EXTENSIONS)
    relay = relay_with_hosts("--backend", backend.address, "--resolve", "off")
    send_from(relay, "127.0.0.2")
    attributes = xclient_attributes(backend.sessions[0])
    assert (attributes["NAME"], attributes["REVERSE_NAME"]) == ("[UNAVAILABLE]", "[UNAVAILABLE]")
