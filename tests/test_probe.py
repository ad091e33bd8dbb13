"""--probe: run a session's handshake with each static back-end, say what it offers, exit 0 only if
every one would be used."""
from auth_fixtures import always, auth_service, ok  # noqa: F401  (fixtures)
from helpers import free_port, run_relay, verbs
from scripted_backend import DEFAULT_EXTENSIONS
from tls_fixtures import tls  # noqa: F401  (fixture)

XCLIENT = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN REVERSE_NAME"


def probe(*args):
    result = run_relay("--probe", *args)
    return result.returncode, result.stdout


def test_smtp_sink_would_be_used_with_no_xclient_and_the_report_names_what_it_offers(smtp_sink):
    sink = smtp_sink()
    code, out = probe("--backend", sink.address, "--no-xclient")
    assert code == 0, out
    assert f"backend {sink.address}: would be used" in out
    assert "greeting: 220 " in out
    assert "XCLIENT: offered (NAME HELO): not used (--no-xclient)" in out
    assert "PIPELINING: offered" in out
    assert "TLS: off" in out


def test_a_back_end_without_xclient_would_not_be_used_and_the_report_says_why(scripted_backend):
    backend = scripted_backend(extensions=[e for e in DEFAULT_EXTENSIONS if not e.startswith("XCLIENT")])
    code, out = probe("--backend", backend.address)
    assert code == 1
    assert f"backend {backend.address}: would NOT be used" in out
    assert "XCLIENT: not offered" in out and "smtpd_authorized_xclient_hosts" in out
    code, out = probe("--backend", backend.address, "--no-xclient")     # where it is not needed
    assert code == 0, out


def test_probe_runs_the_handshake_a_session_would_then_quits_and_reports_size_below_ours(scripted_backend):
    backend = scripted_backend(extensions=["PIPELINING", "SIZE 1000", "AUTH PLAIN", XCLIENT])
    code, out = probe("--backend", backend.address, "--max-message-size", "2000")
    assert code == 0, out
    assert "SIZE: 1000, below --max-message-size 2000: EHLO will advertise 1000" in out
    assert "AUTH: PLAIN" in out
    [session] = backend.sessions
    assert session.closed.wait(5)
    assert verbs(session) == [b"EHLO", b"XCLIENT", b"EHLO", b"QUIT"]     # for a client at 127.0.0.1, no mail


def test_a_tls_back_end_with_a_certificate_from_another_ca_would_not_be_used(scripted_backend, tls):
    backend = scripted_backend(starttls_context=tls.server_context(tls.backend))
    code, out = probe("--backend", backend.address, "--backend-tls", "starttls", "--backend-tls-ca",
                      tls.client_ca_path)
    assert code == 1
    assert "TLS: STARTTLS failed: " in out and "certificate" in out
    code, out = probe("--backend", backend.address, "--backend-tls", "starttls", "--backend-tls-ca", tls.ca_path)
    assert code == 0, out
    assert "certificate verified for 127.0.0.1" in out
    assert verbs(backend.sessions[-1]) == [b"EHLO", b"STARTTLS", b"EHLO", b"XCLIENT", b"EHLO", b"QUIT"]


def test_a_closed_port_is_not_reachable_and_a_built_in_back_end_needs_nothing(tmp_path):
    port = free_port()
    code, out = probe("--backend", f"127.0.0.1:{port}", "--backend", f"maildir:{tmp_path / 'mail'}")
    assert code == 1
    assert f"backend 127.0.0.1:{port}: would NOT be used\n  not reachable: " in out
    assert f"backend maildir:{tmp_path / 'mail'}: would be used" in out


def test_the_size_a_back_end_gave_in_ehlo_is_what_the_relay_advertises_where_it_is_less(relay, scripted_backend):
    backend = scripted_backend(extensions=["PIPELINING", "SIZE 5000", XCLIENT])
    r = relay("--backend", backend.address, "--max-message-size", "100000")
    client = r.smtp()
    assert client.ehlo("client.example")[0] == 250
    assert client.esmtp_features["size"] == "100000"    # nothing known of the back-end yet
    assert client.mail("a@example.org")[0] == 250       # the back-end's EHLO: SIZE 5000
    client.rset()
    assert client.ehlo("client.example")[0] == 250
    assert client.esmtp_features["size"] == "5000"


def test_with_an_auth_service_the_probe_asks_it_once_and_probes_the_back_end_it_names(auth_service, smtp_sink):
    sink = smtp_sink()
    service = auth_service(always(*ok(sink)))
    code, out = probe("--auth-http", service.url, "--no-xclient")      # smtp-sink's XCLIENT has no ADDR
    assert code == 0, out
    assert f"for a client at 127.0.0.1, backend {sink.address}" in out
    assert f"backend {sink.address}: would be used" in out
    [request] = service.requests
    assert ("Client-IP", "127.0.0.1") in request and ("Auth-Method", "none") in request


def test_an_auth_service_that_refuses_or_is_down_fails_the_probe(auth_service):
    service = auth_service(always(("Auth-Status", "Go away")))
    code, out = probe("--auth-http", service.url)
    assert code == 1 and "refused a client at 127.0.0.1: Go away" in out
    code, out = probe("--auth-http", f"http://127.0.0.1:{free_port()}/auth")
    assert code == 1 and "request failed" in out
