"""SIGHUP: the whole configuration re-read for new sessions (README, Signals).

The relay fixture writes the config file and passes it with -c; these tests
rewrite that file (atomically, as an editor or a config manager does), send
SIGHUP and await the relay's log line before looking at what new sessions
get. Sessions opened before the SIGHUP keep the settings they started with.
"""
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading

import pytest

from helpers import SMTPClient, begin_data, free_port, greeted, relay_env, send_message
from tls_fixtures import tls  # noqa: F401  (fixture)

RELOADED = r"smtprelay INFO SIGHUP: configuration reloaded for new sessions$"
KEPT_OLD = r"smtprelay ERROR SIGHUP: keeping the old configuration: "
NEED_RESTART = r"smtprelay WARNING SIGHUP: these settings need a restart and stay as they were: "
TOO_MANY_RECIPIENTS = 452


# --- Helpers -------------------------------------------------------------------------

def rewrite(relay, text):
    """Replace the relay's config file with `text` in one rename: the relay never reads half a file."""
    path = relay.config_path
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


def count(relay, pattern):
    rx = re.compile(pattern)
    return sum(1 for line in relay.log_text().splitlines() if rx.search(line))


def sighup(relay, expect=RELOADED):
    """SIGHUP the relay and wait for one more log line matching `expect` than there was before."""
    before = count(relay, expect)
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_count(expect, before + 1)


def reload_with(relay, text, expect=RELOADED):
    rewrite(relay, text)
    sighup(relay, expect)


def body(tag):
    return f"Subject: {tag}\r\n\r\nmessage {tag}\r\n".encode()


def deliver(relay, tag, sender="a@example.org", recipient="b@example.net"):
    """One new session sending one message -> the reply to its end of data."""
    client = greeted(relay, ehlo="client.example")
    reply = send_message(client, body(tag), sender, recipient)
    client.say("QUIT")
    client.sock.close()
    return reply


def contents(backend):
    return [m.content for m in backend.delivered]


def check_config_error(relay):
    """What --check-config says about the relay's config file now: its one stderr line, without "smtprelay: "."""
    result = subprocess.run(relay.argv + ["--check-config"], env=relay_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("smtprelay: ")


# --- A new back-end for new sessions, the old one for sessions in flight ---------------

def test_sighup_sends_new_sessions_to_the_new_backend_and_the_session_in_flight_to_the_old(relay,
                                                                                           scripted_backend):
    old, new = scripted_backend(), scripted_backend()
    r = relay(config=f"backend = [{old.address}]\n")
    in_flight = greeted(r, ehlo="client.example")       # EHLO done, no MAIL yet: no back-end chosen
    reload_with(r, f"backend = [{new.address}]\n")
    assert deliver(r, "after").code == 250
    assert send_message(in_flight, body("in flight")).code == 250
    assert contents(new) == [body("after")]
    assert contents(old) == [body("in flight")]
    assert r.proc.poll() is None


def test_other_settings_take_effect_for_new_sessions_and_not_for_a_session_in_flight(relay, scripted_backend):
    backend = scripted_backend()
    r = relay(config=f"backend = [{backend.address}]\nserver-name = old.test\n")
    in_flight = SMTPClient(r.connect())
    assert in_flight.reply().text == "220 old.test ESMTP"
    reload_with(r, f"backend = [{backend.address}]\nserver-name = new.test\nmax-recipients = 1\n"
                   "allow-sender = ok@example\\.org\n")

    client = SMTPClient(r.connect())
    assert client.reply().text == "220 new.test ESMTP"
    assert client.say("EHLO client.example").lines[0] == "new.test"
    assert client.say("MAIL FROM:<other@example.org>").code == 550         # allow-sender
    assert client.say("MAIL FROM:<ok@example.org>").code == 250
    assert client.say("RCPT TO:<one@example.net>").code == 250
    assert client.say("RCPT TO:<two@example.net>").code == TOO_MANY_RECIPIENTS   # max-recipients = 1

    assert in_flight.say("EHLO client.example").lines[0] == "old.test"
    assert in_flight.say("MAIL FROM:<other@example.org>").code == 250
    assert in_flight.say("RCPT TO:<one@example.net>").code == 250
    assert in_flight.say("RCPT TO:<two@example.net>").code == 250
    assert in_flight.say("DATA").code == 354
    in_flight.send(body("old settings") + b".\r\n")
    assert in_flight.reply().code == 250
    assert [m.rcpt_to for m in backend.delivered] == [[b"RCPT TO:<one@example.net>", b"RCPT TO:<two@example.net>"]]


# --- A file that no longer parses ------------------------------------------------------

BAD_FILES = {
    "bad value": "timeout = soon\n",
    "unknown key": "no-such-setting = 1\n",
    "a line that does not parse": "=oops\n",
    "missing certificate": "tls-cert = {tmp}/missing.crt\ntls-key = {tmp}/missing.key\n",
    "file removed": None,
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_file_that_no_longer_parses_is_refused_and_the_old_settings_stay_until_it_is_fixed(case, relay,
                                                                                            scripted_backend,
                                                                                            tmp_path):
    old, new = scripted_backend(), scripted_backend()
    r = relay(config=f"backend = [{old.address}]\nserver-name = old.test\n")
    good = f"backend = [{new.address}]\nserver-name = new.test\n"
    if BAD_FILES[case] is None:
        r.config_path.unlink()
    else:
        rewrite(r, good + BAD_FILES[case].format(tmp=tmp_path))
    error = check_config_error(r)
    reloads = count(r, RELOADED)
    sighup(r, expect=KEPT_OLD)
    line = next(line for line in r.log_text().splitlines() if re.search(KEPT_OLD, line))
    assert re.search(KEPT_OLD + "(?:smtprelay: )?" + re.escape(error) + "$", line), (line, error)
    assert count(r, RELOADED) == reloads

    client = SMTPClient(r.connect())
    assert client.reply().text == "220 old.test ESMTP"
    client.sock.close()
    assert deliver(r, "old settings").code == 250
    assert contents(old) == [body("old settings")] and contents(new) == []

    reload_with(r, good)
    assert deliver(r, "fixed").code == 250
    assert contents(new) == [body("fixed")]
    assert r.proc.poll() is None
    assert "Traceback" not in r.log_text()
    assert r.stop() == 0, r.log_text()      # the signals are still taken: a stop works


# --- Certificates -----------------------------------------------------------------------

@pytest.fixture
def opened():
    """TLS sockets made by a test, closed at teardown (the relay fixture knows only the plain ones)."""
    sockets = []
    yield sockets
    for sock in sockets:
        sock.close()


def starttls(relay, tls, opened):
    """A new session upgraded with STARTTLS -> (SMTPClient, SHA-1 fingerprint of the relay's certificate)."""
    client = greeted(relay, ehlo="client.example")
    assert client.say("STARTTLS").code == 220
    client.sock = tls.client_context().wrap_socket(client.sock, server_hostname="mx.test")
    opened.append(client.sock)
    assert client.say("EHLO client.example").code == 250
    return client, hashlib.sha1(client.sock.getpeercert(binary_form=True)).hexdigest()


@pytest.mark.parametrize("how", ["renewed in place", "new files named in the config file"])
def test_sighup_reads_the_certificate_again_for_new_starttls_sessions(how, relay, scripted_backend, tls, opened):
    backend = scripted_backend()
    renewed = tls.issue("renewed", "mx.test", "localhost", "127.0.0.1")
    assert renewed.fingerprint != tls.server.fingerprint
    base = f"backend = [{backend.address}]\nstarttls = on\nserver-name = mx.test\n"
    if how == "renewed in place":
        r = relay("--tls-cert", tls.server.cert_path, "--tls-key", tls.server.key_path, config=base)
    else:
        r = relay(config=base + f"tls-cert = {tls.server.cert_path}\ntls-key = {tls.server.key_path}\n")
    before, fingerprint = starttls(r, tls, opened)
    assert fingerprint == tls.server.fingerprint

    if how == "renewed in place":
        renewed.copy_to(tls.server.cert_path, tls.server.key_path)
        sighup(r)
    else:
        reload_with(r, base + f"tls-cert = {renewed.cert_path}\ntls-key = {renewed.key_path}\n")
    after, fingerprint = starttls(r, tls, opened)
    assert fingerprint == renewed.fingerprint
    assert send_message(after, body("new certificate")).code == 250
    assert send_message(before, body("old certificate")).code == 250
    assert sorted(contents(backend)) == sorted([body("new certificate"), body("old certificate")])


# --- Settings that need a restart ------------------------------------------------------

@pytest.mark.parametrize("setting", ["listen", "proxy-protocol"])
def test_a_changed_setting_that_needs_a_restart_is_warned_about_and_kept(setting, relay, scripted_backend):
    old, new = scripted_backend(), scripted_backend()
    r = relay(config=f"listen = 127.0.0.1:0\nbackend = [{old.address}]\n", listen=None)
    port, elsewhere = r.port, free_port()
    changed = (f"listen = 127.0.0.1:{elsewhere}\n" if setting == "listen"
               else "listen = 127.0.0.1:0\nproxy-protocol = true\nreal-ip-from = [127.0.0.1/32]\n")
    rewrite(r, changed + f"backend = [{new.address}]\n")
    sighup(r, expect=NEED_RESTART)
    assert count(r, NEED_RESTART) == 1
    assert count(r, NEED_RESTART + re.escape(setting) + "$") == 1, r.log_text()
    r.wait_for_count(RELOADED, 1)      # the rest of the file is taken

    assert r.port == port and len(r.listeners) == 1       # no new listener logged
    assert deliver(r, "same listener").code == 250        # plain SMTP, no PROXY header asked for
    assert contents(new) == [body("same listener")]
    if setting == "listen":
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", elsewhere), timeout=5).close()
    assert r.proc.poll() is None


# --- Sessions in the middle of things ------------------------------------------------------

def test_sighup_in_the_middle_of_data_delivers_that_message_once_and_intact(relay, scripted_backend):
    old, new = scripted_backend(), scripted_backend()
    r = relay(config=f"backend = [{old.address}]\n")
    client = greeted(r, ehlo="client.example")
    begin_data(client)
    first, second = b"Subject: mid-DATA\r\n\r\nfirst half\r\n", b"second half\r\n" + b"x" * 100_000 + b"\r\n"
    client.send(first)
    reload_with(r, f"backend = [{new.address}]\n")
    client.send(second + b".\r\n")
    assert client.reply().code == 250
    assert client.say("QUIT").code == 221
    assert contents(old) == [first + second]
    assert [len(s.messages) for s in old.sessions] == [1]
    assert new.connections == 0
    assert deliver(r, "after").code == 250          # and the reload did happen: new sessions go to `new`
    assert contents(new) == [body("after")]


# --- Precedence ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["command line", "environment"])
def test_command_line_and_environment_keep_precedence_over_the_reloaded_file(source, relay, scripted_backend):
    backend = scripted_backend()
    args, env = (["--max-recipients", "2"], None) if source == "command line" else ([], {"SMTPRELAY_MAX_RECIPIENTS": "2"})
    r = relay(*args, env=env, config=f"backend = [{backend.address}]\nmax-recipients = 5\nserver-name = old.test\n")
    reload_with(r, f"backend = [{backend.address}]\nmax-recipients = 1\nserver-name = new.test\n")
    client = SMTPClient(r.connect())
    assert client.reply().text == "220 new.test ESMTP"      # the file was read again
    assert client.say("EHLO client.example").code == 250
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    assert [client.say(f"RCPT TO:<r{n}@example.net>").code for n in range(3)] == [250, 250, TOO_MANY_RECIPIENTS]


# --- Many SIGHUPs while clients send --------------------------------------------------------

def test_many_sighups_in_a_row_while_clients_send_lose_no_message(relay, scripted_backend):
    backends = [scripted_backend(), scripted_backend()]
    r = relay(config=f"backend = [{backends[0].address}]\n")
    clients, per_client = 3, 8
    replies, errors = [], []

    def send(n):
        try:
            for m in range(per_client):
                replies.append(deliver(r, f"{n}-{m}").code)
        except Exception as e:      # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    bursts = 0
    try:
        while bursts < 10 or any(t.is_alive() for t in threads):
            rewrite(r, f"backend = [{backends[bursts % 2].address}]\n")
            before = count(r, RELOADED)
            for _ in range(5):
                r.proc.send_signal(signal.SIGHUP)
            r.wait_for_count(RELOADED, before + 1)     # signals may merge: at least one reload per burst
            bursts += 1
    finally:
        for t in threads:
            t.join(60)
    assert errors == []
    assert replies == [250] * (clients * per_client)
    delivered = contents(backends[0]) + contents(backends[1])
    assert sorted(delivered) == sorted(body(f"{n}-{m}") for n in range(clients) for m in range(per_client))
    assert r.proc.poll() is None
    log = r.log_text()
    assert "Traceback" not in log
    assert " ERROR " not in log
    reload_with(r, f"backend = [{backends[1].address}]\n")
    assert deliver(r, "after the storm").code == 250
    assert body("after the storm") in contents(backends[1])


# --- --backend-auth-file: read again on SIGHUP ------------------------------------------------

def test_the_backend_auth_file_is_read_again_on_sighup_and_an_unreadable_one_keeps_the_old(relay, scripted_backend,
                                                                                           tmp_path):
    secret = tmp_path / "backend-auth"
    secret.write_text("relay:old-secret\n")
    backend = scripted_backend(extensions=["AUTH PLAIN", "XCLIENT ADDR NAME HELO"],
                               auth={"relay": "old-secret", "renewed": "new-secret"})
    config = f"backend = {backend.address}\nbackend-auth-file = {secret}\n"
    r = relay(config=config)
    assert deliver(r, "first").code == 250
    secret.write_text("renewed:new-secret\n")
    sighup(r)
    assert deliver(r, "second").code == 250
    secret.unlink()
    sighup(r, expect=KEPT_OLD + r"--backend-auth-file: .*No such file or directory")
    assert deliver(r, "third").code == 250          # with what was read last
    assert [(a.user, a.accepted) for s in backend.sessions for a in s.auths] == \
        [("relay", True), ("renewed", True), ("renewed", True)]
