"""Client names (--resolve): the relay under a hosts file of its own, with the system resolver.

The relay runs in a private mount namespace (unshare -m, as root) whose
/etc/hosts is this file's, so clients at 127.0.0.2-5 have the names the
tests need; the real resolver code (gethostbyaddr, getaddrinfo) runs.
"""
import os
import shutil
import smtplib
import socket
import threading
import time

import pytest

from helpers import xclient_attributes

# liar.test: 127.0.0.3's PTR name, whose forward lookup gives 127.0.0.9 only
# (the first line naming it; host.conf is "multi off" under the tests).
HOSTS = """127.0.0.1 localhost
127.0.0.2 good.test
127.0.0.9 liar.test
127.0.0.3 liar.test
127.0.0.4 bad=name.test
127.0.0.6 10.0.0.1
"""
EXTENSIONS = ["PIPELINING", "8BITMIME", "XCLIENT ADDR NAME REVERSE_NAME HELO"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare(1) for a private /etc/hosts")


@pytest.fixture
def relay_with_hosts(relay, tmp_path):
    """start(*args, dns=None, constants=None) -> the `relay` fixture's relay, run where /etc/hosts is HOSTS.

    dns: resolv.conf options for a resolver at 127.0.0.1 (the dns_stub) after the hosts file."""
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    (tmp_path / "host.conf").write_text("multi off\n")

    def start(*args, dns=None, constants=None):
        mounts = f'mount --bind "{hosts}" /etc/hosts && mount --bind "{tmp_path}/host.conf" /etc/host.conf'
        if dns:
            (tmp_path / "nsswitch.conf").write_text("hosts: files dns\n")
            (tmp_path / "resolv.conf").write_text(f"nameserver 127.0.0.1\noptions {dns}\n")
            mounts += (f' && mount --bind "{tmp_path}/nsswitch.conf" /etc/nsswitch.conf'
                       f' && mount --bind "{tmp_path}/resolv.conf" /etc/resolv.conf')
        return relay(*args, wrapper=["unshare", "-m", "sh", "-c", mounts + ' && exec "$@"', "sh"], constants=constants)

    return start


def send_from(relay, source_ip):
    with smtplib.SMTP(relay.host, relay.port, timeout=10, source_address=(source_ip, 0)) as client:
        assert client.ehlo("client.example")[0] == 250
        assert client.sendmail("a@example.org", ["b@example.net"], b"Subject: names\r\n\r\nhi\r\n") == {}


@pytest.mark.parametrize("source_ip, name, reverse_name", [
    ("127.0.0.2", "good.test", "good.test"),                    # PTR, and its forward lookup gives it back
    ("127.0.0.3", "[UNAVAILABLE]", "liar.test"),                # PTR, but its name does not give 127.0.0.3 back
    ("127.0.0.5", "[UNAVAILABLE]", "[UNAVAILABLE]"),            # no PTR
    ("127.0.0.4", "[UNAVAILABLE]", "[UNAVAILABLE]"),            # a PTR that is no host name
    ("127.0.0.6", "[UNAVAILABLE]", "[UNAVAILABLE]"),            # a PTR that is an address in disguise
], ids=["confirmed", "not-confirmed", "no-ptr", "not-a-host-name", "numeric"])
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


def dns_answer(query, answer):
    """The reply to a one-question query: "servfail" (RCODE 2), or "empty-ptr", a PTR record
    with no name in it (RDLENGTH 0; nginx's tests call it "PTR empty")."""
    if answer == "servfail":        # the query back, with QR set and RCODE 2
        return query[:2] + b"\x81\x82" + query[4:6] + b"\0" * 6 + query[12:]
    # One answer whose name points back at the question's (0xc00c): type PTR, class IN, a TTL, no data.
    return query[:2] + b"\x81\x80" + query[4:6] + b"\0\1" + b"\0" * 4 + query[12:] + \
        b"\xc0\x0c\0\x0c\0\1\0\0\x0e\x10\0\0"


@pytest.fixture
def dns_stub():
    """start(answer) -> a DNS server on 127.0.0.1:53 that answers as dns_answer() does, or
    nothing (answer None); set .answer on the list it returns to change it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(0.1)            # so the thread sees the teardown's stop
    stop, threads = threading.Event(), []

    class Queries(list):
        answer = None

    queries = Queries()

    def serve():
        while not stop.is_set():
            try:
                query, peer = sock.recvfrom(512)
            except TimeoutError:
                continue
            queries.append(query)
            if queries.answer:
                sock.sendto(dns_answer(query, queries.answer), peer)

    def start(answer):
        queries.answer = answer
        sock.bind(("127.0.0.1", 53))
        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        return queries

    yield start
    stop.set()
    for thread in threads:
        thread.join()
    sock.close()


def test_a_temporary_resolver_failure_gives_tempunavail(relay_with_hosts, scripted_backend, dns_stub):
    queries = dns_stub("servfail")
    backend = scripted_backend(extensions=EXTENSIONS)
    relay = relay_with_hosts("--backend", backend.address, dns="timeout:1 attempts:1")
    send_from(relay, "127.0.0.7")       # not in the hosts file: the resolver asks the stub
    attributes = xclient_attributes(backend.sessions[0])
    assert (attributes["NAME"], attributes["REVERSE_NAME"]) == ("[TEMPUNAVAIL]", "[TEMPUNAVAIL]")
    assert queries, "the resolver never asked the DNS stub"


def test_a_broken_answer_gives_the_same_names_whatever_the_lookup_before_it(relay_with_hosts, scripted_backend,
                                                                             dns_stub):
    # One resolver thread: a lookup that failed there (SERVFAIL) must not colour the next one,
    # as gethostbyaddr's h_errno did. A PTR record holding no name is no name: [UNAVAILABLE],
    # as Postfix's smtpd has it (getnameinfo: EAI_NONAME); nginx's own resolver says [TEMPUNAVAIL].
    queries = dns_stub("empty-ptr")
    backend = scripted_backend(extensions=EXTENSIONS)
    relay = relay_with_hosts("--backend", backend.address, dns="timeout:1 attempts:1",
                             constants={"RESOLVER_THREADS": 1})
    for source_ip, answer, names in [("127.0.0.7", "empty-ptr", "[UNAVAILABLE]"),
                                     ("127.0.0.8", "servfail", "[TEMPUNAVAIL]"),
                                     ("127.0.0.10", "empty-ptr", "[UNAVAILABLE]")]:
        queries.answer = answer
        send_from(relay, source_ip)
        attributes = xclient_attributes(backend.sessions[-1])
        assert (attributes["NAME"], attributes["REVERSE_NAME"]) == (names, names), (source_ip, answer)
    assert len(backend.sessions) == 3 and queries


def test_a_lookup_past_resolve_timeout_gives_tempunavail_and_the_session_goes_on(
        relay_with_hosts, scripted_backend, dns_stub):
    queries = dns_stub(None)      # the resolver itself would wait 2 x 5 s
    backend = scripted_backend(extensions=EXTENSIONS)
    # --server-name: the default (the host's FQDN) would ask the silent resolver too, at start.
    relay = relay_with_hosts("--backend", backend.address, "--resolve-timeout", "1", "--server-name", "relay.test",
                             dns="timeout:5 attempts:2")
    began = time.monotonic()
    send_from(relay, "127.0.0.7")
    assert time.monotonic() - began < 8     # the 1 s deadline, not the resolver's 10 s
    attributes = xclient_attributes(backend.sessions[0])
    assert (attributes["NAME"], attributes["REVERSE_NAME"]) == ("[TEMPUNAVAIL]", "[TEMPUNAVAIL]")
    assert queries
