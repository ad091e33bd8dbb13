"""The relay in front of a real Postfix smtpd (see postfix_fixture.py): XCLIENT as Postfix takes it."""
import re
import smtplib

import pytest

from auth_fixtures import auth_service  # noqa: F401  (fixture)
from auth_http_example import Policy        # contrib/, put on sys.path by auth_fixtures
from helpers import readme_block, run_relay
from postfix_fixture import needs_cyrus_mechanisms, postfix  # noqa: F401

MESSAGE = b"Subject: relayed\r\n\r\nHello from the relay tests.\r\n"
OUTSIDE = "rcpt@outside.example"


def client_from(relay, address):
    """A smtplib.SMTP to the relay from client address `address` (127.0.0.1 or 127.0.0.2)."""
    client = smtplib.SMTP(relay.host, relay.port, timeout=10, source_address=(address, 0))
    relay._clients.append(client)
    return client


def queued_id(reply_text):
    """The queue id from Postfix's "2.0.0 Ok: queued as ID"."""
    text = reply_text.decode()
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].split()[0]


def quit_and_wait(pf, client, address, since):
    """QUIT the client, then wait for Postfix's smtpd to log the end of the relayed session."""
    client.quit()
    pf.wait_for_log(rf"postfix/smtpd\[\d+\]: disconnect from \S+\[{address}\]", since=since)


def test_a_message_through_the_relay_is_queued_under_the_real_client_address(relay, postfix):
    pf = postfix()
    r = relay("--backend", pf.address)
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt(OUTSIDE)[0] == 250
    code, text = client.data(MESSAGE)
    assert code == 250, (code, text, pf.log_text())
    queue_id = queued_id(text)
    assert queue_id in {m["queue_id"] for m in pf.wait_for_queue(1)}
    assert pf.client_of(queue_id) == "unknown[127.0.0.2]"
    client.quit()


def test_postfix_refuses_a_client_without_reverse_name_through_the_relay_and_takes_localhost(relay, postfix):
    pf = postfix(main_cf="smtpd_client_restrictions = reject_unknown_reverse_client_hostname")
    r = relay("--backend", pf.address)
    since = pf.mark()
    stranger = client_from(r, "127.0.0.2")
    stranger.ehlo("client.example")
    assert stranger.mail("a@example.org")[0] == 250
    code, text = stranger.rcpt(OUTSIDE)
    assert 400 <= code < 600 and b"cannot find your reverse hostname" in text, (code, text)
    quit_and_wait(pf, stranger, "127.0.0.2", since)
    assert pf.queue() == []

    local = client_from(r, "127.0.0.1")
    local.ehlo("client.example")
    local.sendmail("a@example.org", [OUTSIDE], MESSAGE)
    assert len(pf.wait_for_queue(1)) == 1
    assert pf.log_matches(r"client=localhost\[127\.0\.0\.1\]")


def test_a_postfix_that_does_not_authorise_the_relay_for_xclient_gets_no_mail_and_the_client_451(relay, postfix):
    pf = postfix(xclient_hosts="")
    r = relay("--backend", pf.address)
    since = pf.mark()
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    code, text = client.mail("a@example.org")
    assert code == 451 and text.startswith(b"4.4.1"), (code, text)
    r.wait_for_log(r"ERROR.*does not offer XCLIENT.*smtpd_authorized_xclient_hosts")
    client.quit()
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: disconnect from", since=since)
    assert pf.queue() == []
    assert not pf.log_matches(r"postfix/smtpd\[\d+\]: \w+: client=")


def test_postfix_denies_relaying_for_a_client_outside_mynetworks_passed_on_by_xclient(relay, postfix):
    pf = postfix(mynetworks="127.0.0.1/32")
    r = relay("--backend", pf.address)
    since = pf.mark()
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    assert client.mail("a@example.org")[0] == 250
    code, text = client.rcpt(OUTSIDE)
    assert code in (454, 554) and b"Relay access denied" in text, (code, text)
    quit_and_wait(pf, client, "127.0.0.2", since)
    assert pf.queue() == []


@pytest.mark.parametrize("helo", ["h" * 256, "=" * 90], ids=["256-octets", "xtext-270"])
def test_an_overlong_helo_is_refused_with_501_and_no_mail_is_queued_under_the_relays_address(relay, postfix, helo):
    pf = postfix()
    r = relay("--backend", pf.address)
    client = client_from(r, "127.0.0.2")
    code, text = client.ehlo(helo)
    assert code == 501, (code, text)
    # the session goes on: whatever the relay does with a transaction now, Postfix must not
    # take it as coming from the relay itself.
    code, _ = client.mail("a@example.org")
    if code == 250 and client.rcpt(OUTSIDE)[0] == 250:
        client.data(MESSAGE)
    client.rset()
    client.ehlo("client.example")
    client.sendmail("a@example.org", [OUTSIDE], MESSAGE)
    client.quit()
    queue = pf.wait_for_queue(1)
    clients = [pf.client_of(m["queue_id"]) for m in queue]
    assert clients and all(c == "unknown[127.0.0.2]" for c in clients), clients
    assert not pf.log_matches(r"client=localhost\[127\.0\.0\.1\]")


def test_the_readmes_postfix_recipe_as_written_queues_under_the_client_and_takes_the_largest_message(
        relay, postfix):
    # The README's master.cf listener and main.cf line, verbatim but for the
    # port; main.cf authorises nobody for XCLIENT, so the recipe's -o must.
    listener = readme_block(r"    127\.0\.0\.1:10025 +inet ", "smtpd_authorized_xclient_hosts=127.0.0.1")
    main_cf = readme_block(r"    message_size_limit = ").splitlines()
    assert len(main_cf) == 3, main_cf           # with local(8)'s and virtual(8)'s limits
    pf = postfix(xclient_hosts="", mynetworks="127.0.0.1/32", listener=listener, local_delivery=True,
                 virtual_delivery=True, main_cf=["relay_domains = example.net", *main_cf])
    conf = readme_block(r"    listen = \[25\]")
    size = int(re.search(r"max-message-size = (\d+)", conf)[1])
    r = relay("--backend", pf.address, config=conf)      # the command line's --listen and --backend win
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt(OUTSIDE)[0] == 554, pf.log_text()          # 127.0.0.2 judged, not the relay's 127.0.0.1
    assert client.rset()[0] == 250
    # The largest message the relay takes, in the longest lines SMTP allows.
    header = b"Subject: as large as the relay allows\r\n\r\n"
    line = b"x" * 998 + b"\r\n"
    body = line * ((size - len(header)) // len(line))
    message = header + body + b"y" * (size - len(header) - len(body) - 2) + b"\r\n"
    assert len(message) == size
    assert client.mail("a@example.org", [f"SIZE={size}"])[0] == 250
    assert client.rcpt("b@example.net")[0] == 250
    code, text = client.data(message)
    assert code == 250, (code, text, pf.log_text()[-2000:])
    queue_id = queued_id(text)
    assert queue_id in {m["queue_id"] for m in pf.wait_for_queue(1)}
    assert pf.client_of(queue_id) == "unknown[127.0.0.2]"
    # local(8) and virtual(8) start with these limits, and deliver.
    for recipient in (pf.local_recipient, pf.virtual_recipient):
        assert client.sendmail("a@example.org", [recipient], MESSAGE) == {}
        assert "Hello from the relay tests." in pf.wait_for_delivery(recipient)
    client.quit()


def test_probe_of_a_real_postfix_says_whether_it_authorises_the_relay_for_xclient(postfix):
    authorised, not_authorised = postfix(), postfix(xclient_hosts="")
    result = run_relay("--probe", "--backend", authorised.address, "--max-message-size", "100000000")
    print(result.stdout)        # what the probe says of a real Postfix, shown with -s
    assert result.returncode == 0, result.stdout
    xclient = re.search(r"XCLIENT: offered \(([^)]*)\): taken\n", result.stdout)
    assert xclient and {"ADDR", "NAME", "REVERSE_NAME", "HELO"} <= set(xclient[1].split())
    assert re.search(r"SIZE: \d+, below --max-message-size 100000000", result.stdout)
    assert "PIPELINING: offered" in result.stdout
    result = run_relay("--probe", "--backend", not_authorised.address)
    print(result.stdout)
    assert result.returncode == 1
    assert "would NOT be used: does not offer XCLIENT to this relay" in result.stdout


def readme_sasl_lines():
    """The README's lines "where LOGIN matters", as written (indented under the listener)."""
    return readme_block(r"      -o smtpd_sasl_auth_enable=yes")


@pytest.mark.parametrize("sasl_options, relayed", [
    ("", False),
    pytest.param(readme_sasl_lines(), True, marks=needs_cyrus_mechanisms),
], ids=["recipe-alone", "with-sasl-enabled"])
def test_a_client_the_relay_authenticated_relays_through_postfix_only_where_its_listener_enables_sasl(
        relay, postfix, auth_service, sasl_options, relayed):
    # XCLIENT LOGIN counts for permit_sasl_authenticated only with SASL enabled on the
    # listener (Debian's Cyrus with libsasl2-modules, unconfigured, is enough);
    # smtpd_tls_auth_only = yes in main.cf would make it count for nothing on the relay's
    # plaintext link.
    listener = readme_block(r"    127\.0\.0\.1:10025 +inet ", "smtpd_authorized_xclient_hosts") + sasl_options
    pf = postfix(xclient_hosts="", mynetworks="127.0.0.1/32", listener=listener,
                 main_cf=["smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
                          "reject_unauth_destination"])
    service = auth_service(Policy([pf.address], {"bob": "Bob-Secret-3"}))
    r = relay("--auth-http", service.url, "--auth", "none,plain")
    since = pf.mark()
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    client.login("bob", "Bob-Secret-3")
    assert client.mail("a@example.org")[0] == 250
    code, text = client.rcpt(OUTSIDE)
    if not relayed:
        assert (code, text) == (554, b"5.7.1 <rcpt@outside.example>: Relay access denied"), pf.log_text()
        quit_and_wait(pf, client, "127.0.0.2", since)
        assert pf.queue() == []
        return
    assert code == 250, (code, text, pf.log_text())
    code, text = client.data(MESSAGE)
    assert code == 250, (code, text)
    queue_id = queued_id(text)
    pf.wait_for_log(rf"postfix/smtpd\[\d+\]: {queue_id}: client=unknown\[127\.0\.0\.2\], "
                    r"sasl_method=XCLIENT, sasl_username=bob$", since=since)
    client.quit()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_readmes_proxy_protocol_recipe_has_postfix_judge_and_log_the_real_client(relay, postfix, version):
    listener = readme_block(r"    127\.0\.0\.1:10025 +inet ", "smtpd_upstream_proxy_protocol=haproxy")
    conf = readme_block(r"    backend-proxy-protocol = ")
    assert conf == "backend-proxy-protocol = v2\n"
    pf = postfix(xclient_hosts="", mynetworks="127.0.0.1/32", listener=listener,
                 main_cf=["relay_domains = example.net", *readme_block(r"    message_size_limit = ").splitlines()])
    r = relay("--backend", pf.address, "--backend-proxy-protocol", version, config=conf)   # the command line wins
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    assert client.mail("a@example.org")[0] == 250
    assert client.rcpt(OUTSIDE)[0] == 554, pf.log_text()          # 127.0.0.2 judged, not the relay's 127.0.0.1
    assert client.rset()[0] == 250
    assert client.sendmail("a@example.org", ["b@example.net"], MESSAGE) == {}
    [message] = pf.wait_for_queue(1)
    assert pf.client_of(message["queue_id"]) == "unknown[127.0.0.2]"
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.2\]")
    pf.wait_for_log(r"helo=<client\.example>")           # the client's HELO, in the relay's EHLO
    client.quit()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_postfix_not_told_to_expect_the_header_gets_no_mail_and_the_client_451(relay, postfix, version):
    pf = postfix(xclient_hosts="", mynetworks="127.0.0.1/32")
    r = relay("--backend", pf.address, "--backend-proxy-protocol", version)
    client = client_from(r, "127.0.0.2")
    client.ehlo("client.example")
    code, text = client.mail("a@example.org")
    assert code == 451, (code, text)
    assert r.wait_for_log(rf"backend {pf.address} is down: did not take the PROXY {version} header")
    client.quit()
    assert pf.queue() == []


def test_probe_of_a_real_postfix_says_whether_it_took_the_header(postfix):
    reads = postfix(xclient_hosts="", proxy_protocol=True)
    result = run_relay("--probe", "--backend", reads.address, "--backend-proxy-protocol", "v2")
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    assert "PROXY: v2 header sent: taken" in result.stdout
    assert "XCLIENT: not offered (not needed: the PROXY header names the client)" in result.stdout
    plain = postfix(xclient_hosts="")
    result = run_relay("--probe", "--backend", plain.address, "--backend-proxy-protocol", "v1")
    print(result.stdout)
    assert result.returncode == 1
    assert "PROXY: v1 header sent: NOT taken" in result.stdout


def test_the_readmes_lines_for_no_xclient_keep_the_relay_from_being_an_open_relay(relay, postfix):
    # Postfix's default mynetworks holds 127.0.0.1, the relay's address: without these lines
    # every client would relay.
    listener = readme_block(r"    127\.0\.0\.1:10025 +inet ", "-o mynetworks=")
    pf = postfix(xclient_hosts="", mynetworks="127.0.0.0/8", listener=listener,
                 main_cf=["relay_domains = example.net"])
    open_pf = postfix(xclient_hosts="", mynetworks="127.0.0.0/8")
    for backend, outside in ((open_pf, 250), (pf, 554)):
        r = relay("--backend", backend.address, "--no-xclient")
        client = client_from(r, "127.0.0.2")
        client.ehlo("client.example")
        assert client.mail("a@example.org")[0] == 250
        assert client.rcpt(OUTSIDE)[0] == outside, backend.log_text()
        assert client.rset()[0] == 250
        client.quit()
    # Mail for Postfix's own domains still goes through the closed one.
    client = client_from(r, "127.0.0.2")
    assert client.sendmail("a@example.org", ["b@example.net"], MESSAGE) == {}
    assert len(pf.wait_for_queue(1)) == 1


def test_the_readmes_probe_example_is_what_the_probe_says_of_the_readmes_postfix(postfix, tmp_path):
    shown = readme_block(r"    \$ smtprelay -c /etc/smtprelay.conf --probe").splitlines()[1:]
    listener = readme_block(r"    127\.0\.0\.1:10025 +inet ", "smtpd_authorized_xclient_hosts=127.0.0.1")
    pf = postfix(xclient_hosts="", listener=listener, main_cf=readme_block(r"    message_size_limit = ").splitlines())
    result = run_relay("--probe", "--backend", pf.address, config=readme_block(r"    listen = \[25\]"))
    said = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    assert said[0] == shown[0].replace("127.0.0.1:10025", pf.address)
    assert said[1].startswith("  greeting: 220 ") and shown[1].startswith("  greeting: 220 ")
    assert said[2:] == shown[2:]
