"""--balance over static back-ends (first, roundrobin, leastconn) and the passive health check."""
import mailbox
import time

import pytest

from helpers import run_relay, wait_until
from test_backends import smtp_client, transaction

HOLD_OFF = 2        # seconds: smtprelay.BACKEND_HOLD_OFF for the test that waits it out


def one_message(r, sender="a@example.org"):
    """A session with one message and QUIT -> the reply to the end of data."""
    client = smtp_client(r)
    reply = transaction(client, sender=sender)
    assert client.quit()[0] == 221
    return reply


def test_first_sends_every_session_to_the_first_listed(relay, scripted_backend):
    backends = [scripted_backend(), scripted_backend(), scripted_backend()]
    r = relay(*[a for b in backends for a in ("--backend", b.address)])      # --balance first: the default
    for _ in range(4):
        assert one_message(r)[0] == 250
    assert [len(b.sessions) for b in backends] == [4, 0, 0]


def test_roundrobin_gives_each_back_end_its_turn_smtp_sink_and_maildir_among_them(relay, scripted_backend,
                                                                                  smtp_sink, tmp_path):
    scripted, sink, maildir = scripted_backend(), smtp_sink(), tmp_path / "mail"
    r = relay("--balance", "roundrobin", "--backend", scripted.address, "--backend", sink.address,
              "--backend", f"maildir:{maildir}", "--no-xclient")      # smtp-sink's XCLIENT has no ADDR
    for n in range(6):
        assert one_message(r, sender=f"s{n}@example.org")[0] == 250
    assert len(scripted.delivered) == 2     # over one pooled connection (--no-xclient)
    assert len(sink.wait_for_messages(2)) == 2
    assert len(mailbox.Maildir(maildir)) == 2


def test_leastconn_sends_a_new_session_to_the_back_end_with_the_fewest_open(relay, scripted_backend):
    backends = [scripted_backend(), scripted_backend(), scripted_backend()]
    r = relay("--balance", "leastconn", *[a for b in backends for a in ("--backend", b.address)])
    held = []
    for _ in range(2):                  # two sessions keep a transaction open: on the first and the second
        client = smtp_client(r)
        assert client.mail("a@example.org")[0] == 250
        held.append(client)
    assert [len(b.sessions) for b in backends] == [1, 1, 0]
    for _ in range(3):                  # one after another, each to the one with none open
        assert one_message(r)[0] == 250
    assert [len(b.sessions) for b in backends] == [1, 1, 3]
    for client in held:
        assert client.rcpt("b@example.net")[0] == 250
        assert client.data(b"Subject: held\r\n\r\nheld\r\n")[0] == 250
        assert client.quit()[0] == 221


def test_a_back_end_found_down_is_skipped_for_the_hold_off_then_tried_first_by_one_session(relay, scripted_backend):
    # The hold-off (smtprelay.BACKEND_HOLD_OFF, 10 s) made HOLD_OFF seconds for the test.
    down, up = scripted_backend(greeting="421 4.3.2 not now"), scripted_backend()
    r = relay("--backend", down.address, "--backend", up.address, constants={"BACKEND_HOLD_OFF": HOLD_OFF})
    assert one_message(r)[0] == 250     # tried the first, found it down, went on
    failed = time.monotonic()
    r.wait_for_log(rf"backend {down.address} is down: greeted with 421 4\.3\.2 not now; new sessions skip it for {HOLD_OFF}s$")
    for _ in range(3):
        assert one_message(r)[0] == 250
    assert len(down.sessions) == 1      # the sessions after the first did not try it
    assert len(up.sessions) == 4

    down.greeting = "220 scripted ESMTP"     # it recovers; after the hold-off one session finds out

    def tried_again():
        assert one_message(r)[0] == 250
        return len(down.sessions) >= 2

    wait_until(tried_again, HOLD_OFF + 10, "the held-off back-end tried again")
    assert time.monotonic() - failed >= HOLD_OFF - 0.5
    r.wait_for_log(rf"backend {down.address} answers again")
    assert one_message(r)[0] == 250     # --balance first: the first listed again
    assert len(down.sessions) == 3


@pytest.mark.parametrize("policy", ["first", "roundrobin", "leastconn"])
def test_a_back_end_that_never_greets_costs_one_session_its_timeout_and_the_next_ones_nothing(
        relay, scripted_backend, policy):
    silent, up = scripted_backend(actions={"CONNECT": "hang"}), scripted_backend()
    r = relay("--balance", policy, "--proxy-timeout", "3", "--backend", silent.address, "--backend", up.address)
    began = time.monotonic()
    while not silent.connections:       # roundrobin and leastconn may start with the other one
        assert one_message(r)[0] == 250
        assert time.monotonic() - began < 30
    first_wait = time.monotonic() - began
    assert first_wait >= 2.5            # that session waited for the greeting, --proxy-timeout
    for _ in range(4):
        began = time.monotonic()
        assert one_message(r)[0] == 250
        assert time.monotonic() - began < 2.5       # well under the timeout: never tried again
    assert silent.connections == 1
    assert len(up.sessions) >= 4


def test_while_every_back_end_is_held_off_a_session_tries_them_anyway_earliest_found_first(relay, scripted_backend):
    # README, --balance: nginx never counts a single server unavailable; where
    # every back-end is held off, a session tries them all the same.
    downs = [scripted_backend(greeting="421 4.3.2 not now") for _ in range(2)]
    r = relay("--backend", downs[0].address, "--backend", downs[1].address)
    for _ in range(3):
        client = smtp_client(r)
        code, text = client.mail("a@example.org")
        assert (code, text[:5]) == (451, b"4.4.1")
        assert client.quit()[0] == 221
    assert [len(b.sessions) for b in downs] == [3, 3]     # held off, and tried by every session all the same
    downs[1].greeting = "220 back"
    assert one_message(r)[0] == 250                      # the very next session, no hold-off to wait out


@pytest.mark.parametrize("policy", ["first", "roundrobin", "leastconn"])
def test_every_policy_fails_over_and_all_down_gives_451(relay, scripted_backend, policy):
    downs = [scripted_backend(greeting="421 4.3.2 not now") for _ in range(2)]
    r = relay("--balance", policy, *[a for b in downs for a in ("--backend", b.address)])
    client = smtp_client(r)
    code, text = client.mail("a@example.org")
    assert (code, text[:5]) == (451, b"4.4.1")
    assert [len(b.sessions) for b in downs] == [1, 1]


def test_balance_takes_only_its_three_words():
    result = run_relay("--backend", "127.0.0.1:25", "--balance", "random", "--check-config")
    assert result.returncode == 1 and "--balance" in result.stderr
