"""--max-refusals: a session that keeps being refused, or keeps sending junk, is closed.

The relay counts refusals as Postfix's smtpd counts errors (postconf(5):
smtpd_hard_error_limit, default 20; smtpd_junk_command_limit, 100): MAIL and
RCPT refused (4xx or 5xx) by the relay's own checks or by the back-end, and
each junk command (NOOP, RSET, VRFY, EXPN, HELP) beyond the first 100. Both
counts restart with each delivered message; protocol errors (501 and the
like) count toward --max-errors only. The command after the last refusal
allowed is answered 421 and the connection closed (RFC 5321 §3.8). A
back-end's 421 is passed on and ends the client's session too: no fresh
back-end session takes up where that one stopped, so a prober cannot walk
past Postfix's limit one back-end session at a time.
"""
import time

import pytest

from helpers import codes, greeted, send_message, session_id
from postfix_fixture import postfix  # noqa: F401  (fixture)
from test_metrics import metrics_relay, needs_prometheus  # noqa: F401  (fixture)

JUNK_LIMIT = 100        # smtpd_junk_command_limit: junk commands that cost nothing
REFUSALS = 20           # --max-refusals' default, Postfix's smtpd_hard_error_limit
BACKEND_421 = "421 4.3.2 backend.example Service not available, closing transmission channel"
BODY = b"Subject: refusals\r\n\r\nHello.\r\n"


def maildir(tmp_path):
    return ["--backend", f"maildir:{tmp_path / 'md'}"]


def assert_closed(client):
    """The relay has closed the connection and sends nothing more."""
    assert client.rest() == b"", "the relay went on talking after its 421"


def disconnected(relay, client):
    """Wait until the relay has logged the end of this client's session (its back-end closed by then)."""
    relay.wait_for_log(rf"{session_id(relay, client.sock)} disconnect from", timeout=15)


# --- Junk commands ---------------------------------------------------------------------------

def test_4000_pipelined_noops_get_120_answers_then_421_and_the_connection_closes(relay, tmp_path):
    """Postfix's smtpd_junk_command_limit (100) and smtpd_hard_error_limit (20), as the
    relay's --max-refusals: NOOPs past the 100th each count as a refusal, and the
    command after the 20th is answered 421 (RFC 5321 §3.8) and the session closed. A
    client pipelining NOOPs (RFC 2920) no longer holds a session for ever."""
    r = relay(*maildir(tmp_path))
    client = greeted(r, timeout=30)
    client.send(b"NOOP\r\n" * 4000)
    replies = [client.reply() for _ in range(JUNK_LIMIT + REFUSALS + 1)]
    assert codes(replies) == [250] * (JUNK_LIMIT + REFUSALS) + [421], codes(replies)
    assert_closed(client)


def test_a_noop_within_every_timeout_ends_at_the_junk_limit_all_the_same(relay, tmp_path):
    """--timeout bounds each wait for a command, not a session (README): a client that
    sends a NOOP well within every --timeout kept its session open for ever. The junk
    limit (Postfix's smtpd_junk_command_limit, then smtpd_hard_error_limit) ends it: the
    121st NOOP, the session well past its --timeout, is answered 421 and the connection
    closed. (A NOOP every 0.1 s with --timeout 4: a client that is never idle for long,
    its pace quickened to keep the test short; the limit counts commands, not time.)"""
    timeout = 4
    r = relay(*maildir(tmp_path), "--timeout", str(timeout))
    client = greeted(r, timeout=30)
    began, got = time.monotonic(), []
    for _ in range(JUNK_LIMIT + REFUSALS + 1):
        got.append(client.say("NOOP").code)
        if got[-1] != 250:
            break
        time.sleep(0.1)     # the client's pace, not a synchronisation
    assert got == [250] * (JUNK_LIMIT + REFUSALS) + [421], got
    assert_closed(client)
    assert time.monotonic() - began > 2 * timeout      # the NOOPs, not --timeout, held the session open


def test_every_junk_verb_counts_toward_the_junk_limit(relay, tmp_path):
    """Postfix's smtpd_junk_command_limit counts NOOP, VRFY and RSET alike (the relay adds
    HELP and EXPN): 100 of them mixed cost nothing, the next 20 are answered as usual and
    counted as refusals, and the command after them gets 421 and the connection closes."""
    r = relay(*maildir(tmp_path))
    client = greeted(r, timeout=30, ehlo="client.example")
    cycle = ["RSET", "VRFY <postmaster>", "HELP", "NOOP"]
    junk = [cycle[n % len(cycle)] for n in range(JUNK_LIMIT + REFUSALS)]
    replies = client.talk(*junk)
    assert all(200 <= reply.code < 300 for reply in replies), [(c, r.text) for c, r in zip(junk, replies)]
    assert client.say("NOOP").code == 421
    assert_closed(client)


def test_a_delivered_message_restarts_the_junk_count(relay, tmp_path):
    """The junk count restarts with each delivered message, as Postfix's does: 110 NOOPs
    (10 of them refusals), a message delivered, then 120 NOOPs all answered 250, and only
    the NOOP after those gets 421."""
    r = relay(*maildir(tmp_path))
    client = greeted(r, timeout=30, ehlo="client.example")
    assert set(codes(client.talk(*["NOOP"] * (JUNK_LIMIT + 10)))) == {250}
    assert send_message(client, BODY).code == 250
    after = codes(client.talk(*["NOOP"] * (JUNK_LIMIT + REFUSALS)))
    assert after == [250] * (JUNK_LIMIT + REFUSALS), after
    assert client.say("NOOP").code == 421
    assert_closed(client)


# --- Refused MAIL and RCPT ------------------------------------------------------------------

def test_after_20_recipients_refused_by_the_backend_the_next_command_gets_421(relay, scripted_backend):
    """Postfix's smtpd_hard_error_limit (20) as the relay's default --max-refusals: a client
    pipelining 500 recipients that the back-end refuses (550) hears 20 refusals, then 421
    for the 21st RCPT, and the connection closes (RFC 5321 §3.8); the back-end served the
    one session only."""
    backend = scripted_backend(replies={"RCPT": "550 5.1.1 <nobody@example.net>: Recipient address rejected"})
    r = relay("--backend", backend.address)
    client = greeted(r, timeout=30, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    client.send(b"".join(b"RCPT TO:<nobody%03d@example.net>\r\n" % n for n in range(500)))
    replies = [client.reply() for _ in range(REFUSALS + 1)]
    assert codes(replies) == [550] * REFUSALS + [421], codes(replies)
    assert_closed(client)
    disconnected(r, client)
    assert backend.connections == 1


def test_max_refusals_5_closes_the_session_after_the_fifth_refusal(relay, scripted_backend):
    """--max-refusals N sets the limit (Postfix's smtpd_hard_error_limit): with 5, the
    command after the fifth refused RCPT is answered 421 and the connection closes."""
    backend = scripted_backend(replies={"RCPT": "550 5.1.1 Recipient address rejected"})
    r = relay("--backend", backend.address, "--max-refusals", "5")
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    got = [client.say(f"RCPT TO:<nobody{n}@example.net>").code for n in range(5)]
    assert got == [550] * 5
    assert client.say("RCPT TO:<nobody5@example.net>").code == 421
    assert_closed(client)


def test_the_relays_own_refusals_count_and_protocol_errors_do_not(relay, scripted_backend):
    """Refusals by the relay's own checks count as the back-end's do: 10 senders refused by
    --allow-sender and 10 recipients refused by --allow-recipient (550, README) make 20,
    and the next command gets 421 and the connection closes. The two protocol errors
    among them (503, 501: RFC 5321 §4.2.1's x0z, syntax and sequence) count toward
    --max-errors only, not as refusals, so they do not bring the 421 forward."""
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--allow-sender", r"ok@example\.org",
              "--allow-recipient", r"ok@example\.net")
    client = greeted(r, ehlo="client.example")
    senders = [client.say(f"MAIL FROM:<bad{n}@example.org>").code for n in range(10)]
    assert senders == [550] * 10
    assert client.say("RCPT TO:<ok@example.net>").code == 503          # no MAIL: a protocol error
    assert client.say("MAIL FROM:<ok@example.org>").code == 250
    assert client.say("RCPT TO:<ok@example.net").code == 501           # missing ">": a protocol error
    recipients = [client.say(f"RCPT TO:<bad{n}@example.net>").code for n in range(10)]
    assert recipients == [550] * 10
    assert client.say("RCPT TO:<ok@example.net>").code == 421
    assert_closed(client)


def test_a_delivered_message_restarts_the_refusal_count(relay, scripted_backend):
    """The refusal count restarts with each delivered message (Postfix resets its error
    count when mail is delivered): 19 recipients refused, one accepted and the message
    delivered; then 20 more refused, all answered 550, and only the command after the
    20th gets 421."""
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--allow-recipient", r"ok@example\.net")
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    before = [client.say(f"RCPT TO:<bad{n}@example.net>").code for n in range(REFUSALS - 1)]
    assert before == [550] * (REFUSALS - 1)
    assert client.say("RCPT TO:<ok@example.net>").code == 250
    assert client.say("DATA").code == 354
    client.send(BODY + b".\r\n")
    assert client.reply().code == 250
    assert len(backend.delivered) == 1
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    after = [client.say(f"RCPT TO:<again{n}@example.net>").code for n in range(REFUSALS)]
    assert after == [550] * REFUSALS, after
    assert client.say("RCPT TO:<ok@example.net>").code == 421
    assert_closed(client)


# --- A back-end's 421 -----------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA", "."], ids=["MAIL", "RCPT", "DATA", "end-of-data"])
def test_a_backends_421_is_passed_on_and_ends_the_clients_session(relay, scripted_backend, verb):
    """RFC 5321 §3.8: a server that answers 421 is closing the channel. The back-end's 421 to
    MAIL, RCPT, DATA or the end of data reaches the client as the back-end said it (README:
    the back-end's replies are passed on verbatim) and ends the client's session there: what
    the client sends next gets no answer, and the back-end sees no second session from the
    relay for that client (as Postfix ends a session at its smtpd_hard_error_limit, a fresh
    one would let the client go on past the limit)."""
    backend = scripted_backend(replies={verb: BACKEND_421})
    r = relay("--backend", backend.address)
    client = greeted(r, ehlo="client.example")
    steps = [("MAIL", b"MAIL FROM:<a@example.org>", 250), ("RCPT", b"RCPT TO:<b@example.net>", 250),
             ("DATA", b"DATA", 354), (".", BODY + b".", 250)]
    for step, line, usual in steps:
        reply = client.say(line)
        if step == verb:
            assert reply.text == BACKEND_421, str(reply)
            break
        assert reply.code == usual, (step, str(reply))
    try:    # what a client would try next; the relay may have closed before it arrives
        client.send(b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nNOOP\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert_closed(client)
    disconnected(r, client)
    assert backend.connections == 1, f"{backend.connections} back-end sessions for one client"
    assert backend.delivered == []


def test_210_recipient_probes_through_the_relay_meet_postfixs_limit_in_one_session(relay, postfix):
    """Postfix's smtpd_hard_error_limit (default 20, postconf(5)): after 20 errors smtpd
    answers 421 and disconnects. Behind the relay a prober must not get a fresh Postfix
    session each time: a client probing 210 recipients (all refused, here by
    smtpd_recipient_restrictions = reject) in one session, starting a new transaction
    whenever it is told the last one is gone, hears 20 refusals and then 421, the
    connection closes, and Postfix saw one session from the relay, not ten."""
    pf = postfix(main_cf=["smtpd_recipient_restrictions = reject",
                          "smtpd_error_sleep_time = 0"])        # no 1 s pause per refusal past the 10th
    r = relay("--backend", pf.address)
    since = pf.mark()
    client = greeted(r, timeout=30, ehlo="client.example")
    assert client.say("MAIL FROM:<prober@example.org>").code == 250
    refused, closing = 0, None
    for n in range(210):
        reply = client.say(f"RCPT TO:<probe{n:03d}@example.net>")
        if reply.code == 421:
            closing = n
            break
        if 500 <= reply.code < 600 and reply.code != 503:
            refused += 1                    # refused; the transaction goes on
        else:                               # e.g. 451 or 503: the transaction is gone, start another
            client.say("RSET")
            reply = client.say("MAIL FROM:<prober@example.org>")
            if reply.code == 421:
                closing = n
                break
    assert closing is not None, f"no 421 in 210 probes ({refused} refused)\n{pf.log_text()[-3000:]}"
    assert refused == REFUSALS
    assert_closed(client)
    disconnected(r, client)
    pf.wait_for_log(r"postfix/smtpd\[\d+\]: disconnect from", timeout=15, since=since)
    sessions = pf.log_matches(r"postfix/smtpd\[\d+\]: connect from", since)
    assert len(sessions) == 1, [m.string for m in sessions]
    assert pf.queue() == []


# --- Metrics ---------------------------------------------------------------------------------

@needs_prometheus
def test_recipients_are_counted_by_what_the_client_got_for_its_rcpt(metrics_relay, scripted_backend):
    """smtprelay_recipients_total{outcome} counts what clients got for RCPT (README, Metrics),
    whoever gave it: accepted (2xx), deferred (4xx), refused (5xx), the relay's own
    --allow-recipient refusal included."""
    backend = scripted_backend(replies={"RCPT": ["250 2.1.5 Ok", "450 4.2.1 Mailbox busy", "550 5.1.1 No such user",
                                                 "250 2.1.5 Ok"]})
    r, metrics = metrics_relay("--backend", backend.address, "--allow-recipient", r"(?!denied@).*")
    client = greeted(r, ehlo="client.example")
    assert client.say("MAIL FROM:<a@example.org>").code == 250
    got = [client.say(f"RCPT TO:<{name}@example.net>").code for name in ("a", "b", "c", "denied", "d")]
    assert got == [250, 450, 550, 550, 250]
    name = "smtprelay_recipients_total"
    metrics.wait_for(name, 2, outcome="accepted")
    metrics.wait_for(name, 1, outcome="deferred")
    metrics.wait_for(name, 2, outcome="refused")
    assert client.say("QUIT").code == 221
