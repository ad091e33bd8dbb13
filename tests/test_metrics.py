"""--metrics (Prometheus over HTTP) and the named fields of --log-format json lines (README, Logging).

The metrics tests scrape GET /metrics with requests and parse it with
prometheus_client's own parser; they are skipped where prometheus_client is
not installed (pip install 'smtprelay[metrics]'). The test of the relay
without prometheus_client and the JSON log tests need no prometheus_client.
"""
import importlib.util
import json
import re

import pytest
import requests

from auth_fixtures import auth_service, ok  # noqa: F401  (fixture)
from helpers import SMTPClient, free_port, greeted, run_relay, send_message, wait_until

HAVE_PROMETHEUS = importlib.util.find_spec("prometheus_client") is not None
needs_prometheus = pytest.mark.skipif(not HAVE_PROMETHEUS,
                                      reason="prometheus_client is not installed: pip install 'smtprelay[metrics]'")
NO_PROMETHEUS = "smtprelay: --metrics: needs the prometheus_client package: pip install 'smtprelay[metrics]'"
BODY = b"Subject: metrics\r\n\r\nHello.\r\n"


# --- Scraping ------------------------------------------------------------------------------

class Metrics:
    """The relay's /metrics at 127.0.0.1:port; scrape() -> {(sample name, frozenset(labels)): value}."""

    def __init__(self, relay, port):
        self.relay, self.url = relay, f"http://127.0.0.1:{port}/metrics"
        self.http = requests.Session()
        self.http.trust_env = False         # straight there: no proxy from the environment

    def scrape(self):
        from prometheus_client.parser import text_string_to_metric_families
        response = self.http.get(self.url, timeout=5)
        assert response.status_code == 200, response.status_code
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(response.text) for s in family.samples}

    def value(self, name, **labels):
        """One sample's value now, or None if the relay does not serve it."""
        return self.scrape().get((name, frozenset(labels.items())))

    def wait_for(self, name, expected, timeout=5, **labels):
        """Poll until the sample has the value `expected`; AssertionError with the last value after `timeout` s."""
        last = []

        def reached():
            last[:] = [self.value(name, **labels)]
            return last[0] == expected

        # A gauge tells no one when it changes: poll it.
        wait_until(reached, timeout, lambda: f"{name}{labels} is {last[0]}, wanted {expected}")
        return last[0]

    def close(self):
        self.http.close()


@pytest.fixture
def metrics_relay(relay):
    """start(*options) -> (relay, Metrics): the relay with --metrics on a free port, its metrics line logged."""
    made = []

    def start(*options):
        port = free_port()
        r = relay("--metrics", f"127.0.0.1:{port}", *options)
        r.wait_for_log(rf"smtprelay INFO metrics on http://127\.0\.0\.1:{port}/metrics$")
        made.append(Metrics(r, port))
        return r, made[-1]

    yield start
    for metrics in made:
        metrics.close()


def quit_and_close(client):
    assert client.say("QUIT").code == 221
    client.sock.close()


# --- Messages, sessions, back-ends ----------------------------------------------------------

@needs_prometheus
def test_messages_are_counted_by_what_the_client_got_for_its_data(metrics_relay, scripted_backend):
    backend = scripted_backend(replies={".": ["250 2.0.0 Ok: queued as A1", "250 2.0.0 Ok: queued as A2",
                                              "554 5.7.1 Message refused", "451 4.3.0 Try again later"]})
    r, metrics = metrics_relay("--backend", backend.address)
    client = greeted(r, ehlo="client.example")
    messages = "smtprelay_messages_total"
    assert [send_message(client, BODY).code for _ in range(2)] == [250, 250]
    metrics.wait_for(messages, 2, outcome="delivered")
    assert metrics.value(messages, outcome="refused") in (None, 0)
    assert metrics.value(messages, outcome="deferred") in (None, 0)
    assert send_message(client, BODY).code == 554
    metrics.wait_for(messages, 1, outcome="refused")
    assert metrics.value(messages, outcome="deferred") in (None, 0)
    assert send_message(client, BODY).code == 451
    metrics.wait_for(messages, 1, outcome="deferred")
    quit_and_close(client)
    samples = metrics.scrape()
    assert [samples.get((messages, frozenset({("outcome", outcome)}))) for outcome in
            ("delivered", "refused", "deferred")] == [2, 1, 1]
    assert samples.get(("smtprelay_message_bytes_total", frozenset())) >= 2 * len(BODY)


@needs_prometheus
def test_sessions_are_counted_refused_ones_too_and_the_active_gauge_follows_them(metrics_relay, scripted_backend):
    r, metrics = metrics_relay("--backend", scripted_backend().address, "--max-clients", "1")
    assert metrics.value("smtprelay_sessions_active") == 0
    first = greeted(r)
    metrics.wait_for("smtprelay_sessions_active", 1)
    refused = SMTPClient(r.connect())
    assert refused.reply().code == 421              # over --max-clients
    assert refused.rest() == b""
    metrics.wait_for("smtprelay_sessions_total", 2)
    assert metrics.value("smtprelay_sessions_active") == 1
    quit_and_close(first)
    metrics.wait_for("smtprelay_sessions_active", 0)
    assert metrics.value("smtprelay_sessions_total") == 2


@needs_prometheus
def test_a_backend_that_is_down_is_counted_under_its_address(metrics_relay, scripted_backend):
    down, up = f"127.0.0.1:{free_port()}", scripted_backend()
    r, metrics = metrics_relay("--backend", down, "--backend", up.address)
    client = greeted(r, ehlo="client.example")
    assert send_message(client, BODY).code == 250
    quit_and_close(client)
    assert len(up.delivered) == 1
    metrics.wait_for("smtprelay_backend_errors_total", 1, backend=down)
    assert metrics.value("smtprelay_backend_errors_total", backend=up.address) in (None, 0)


@needs_prometheus
def test_auth_lookups_are_counted_by_result_and_timed(metrics_relay, auth_service, scripted_backend):
    backend = scripted_backend()

    def policy(headers):
        to = headers.get("Auth-SMTP-To", "")
        if "ok@" in to:
            return ok(backend)
        if "refused@" in to:
            return [("Auth-Status", "No such recipient")]
        return [("Auth-Status", "OK")]     # no Auth-Server: an answer the relay cannot use

    service = auth_service(policy)
    r, metrics = metrics_relay("--auth-http", service.url)
    for recipient, code in [("ok", 250), ("refused", 535), ("broken", 451)]:
        client = greeted(r, ehlo="client.example")
        assert client.say("MAIL FROM:<a@example.org>").code == 250
        assert client.say(f"RCPT TO:<{recipient}@example.net>").code == code, recipient
        quit_and_close(client)
    assert len(service.requests) == 3
    metrics.wait_for("smtprelay_auth_lookup_seconds_count", 3)
    samples = metrics.scrape()
    for result in ("ok", "refused", "error"):
        assert samples.get(("smtprelay_auth_lookups_total", frozenset({("result", result)}))) == 1, result
    assert samples.get(("smtprelay_auth_lookup_seconds_count", frozenset())) == 3
    assert samples.get(("smtprelay_auth_lookup_seconds_bucket", frozenset({("le", "+Inf")}))) == 3
    assert samples.get(("smtprelay_auth_lookup_seconds_sum", frozenset())) > 0


def test_metrics_without_prometheus_client_stops_the_start_with_one_line(tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "prometheus_client.py").write_text('raise ImportError("prometheus_client hidden by the test")\n')
    result = run_relay("--backend", f"maildir:{tmp_path / 'mail'}", "--metrics", f"127.0.0.1:{free_port()}",
                       listen="127.0.0.1:0", env={"PYTHONPATH": str(hidden)})
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [NO_PROMETHEUS]


# --- JSON log lines -------------------------------------------------------------------------

def json_lines(relay):
    """Every log line so far, each parsed as one JSON object with time, level and message."""
    entries = []
    for line in relay.log_text().splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def wait_for_event(relay, name):
    relay.wait_for_log(rf'"event":\s*"{name}"')


def events(relay, name):
    return [e for e in json_lines(relay) if e.get("event") == name]


def test_json_message_line_carries_the_envelope_size_backend_reply_and_seconds(relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--log-format", "json")
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<b@example.net>").code == 250
    assert client.say("RCPT TO:<c@example.net>").code == 250
    assert client.say("DATA").code == 354
    client.send(BODY + b".\r\n")
    reply = client.reply()
    assert reply.code == 250
    quit_and_close(client)
    wait_for_event(r, "disconnect")

    [connect] = events(r, "connect")
    sid = connect["session"]
    assert re.fullmatch(r"[0-9a-f]{8}", sid), connect
    assert connect["client"] == "127.0.0.1"

    [message] = events(r, "message")
    assert message["session"] == sid and message["client"] == "127.0.0.1"
    assert message["sender"] == "a@example.org"
    assert message["recipients"] == ["b@example.net", "c@example.net"]
    assert message["size"] == len(BODY) and type(message["size"]) is int
    assert message["backend"] == backend.address
    assert message["reply"] == reply.text
    assert type(message["seconds"]) is float and message["seconds"] >= 0
    assert message["level"] == "info"

    [disconnect] = events(r, "disconnect")
    assert disconnect["session"] == sid and disconnect["client"] == "127.0.0.1"
    assert type(disconnect["seconds"]) is float and disconnect["seconds"] >= message["seconds"]


def test_json_backend_refusing_a_recipient_gives_a_backend_refused_event_with_its_reply(relay, scripted_backend):
    refusal = "550 5.1.1 <nobody@example.net>: Recipient address rejected"
    backend = scripted_backend(replies={"RCPT": refusal})
    r = relay("--backend", backend.address, "--log-format", "json")
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert client.say("RCPT TO:<nobody@example.net>").text == refusal
    quit_and_close(client)
    wait_for_event(r, "disconnect")
    [connect] = events(r, "connect")
    [refused] = events(r, "backend_refused")
    assert refused["session"] == connect["session"]
    assert refused["backend"] == backend.address
    assert refused["reply"] == refusal
    assert events(r, "message") == []


@needs_prometheus
def test_recipients_are_counted_refused_by_the_relay_or_the_back_end_and_deferred(metrics_relay, scripted_backend):
    backend = scripted_backend(replies={"RCPT": ["250 2.1.5 Ok", "550 5.1.1 No such user", "450 4.2.0 Busy"]})
    r, metrics = metrics_relay("--backend", backend.address, "--allow-recipient", r".*@example\.net")
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert [client.say(f"RCPT TO:<{rcpt}>").code for rcpt in
            ("b@example.net", "c@example.net", "d@example.net", "e@elsewhere.example")] == [250, 550, 450, 550]
    recipients = "smtprelay_recipients_total"
    metrics.wait_for(recipients, 2, outcome="refused")      # one by the back-end, one by --allow-recipient
    assert metrics.value(recipients, outcome="accepted") == 1
    assert metrics.value(recipients, outcome="deferred") == 1
    quit_and_close(client)
