"""Back-end connections reused across client sessions (--no-xclient), and never where they carry an identity."""
import signal

from test_backends import smtp_client, transaction
from auth_fixtures import auth_service, ok  # noqa: F401

SERVER_NAME = "relay.test"


def sessions_in_turn(r, count, helo="client.example"):
    """`count` client sessions one after the other, each one message, each closed with QUIT."""
    for n in range(count):
        client = smtp_client(r, helo=f"{helo}{n}")
        assert transaction(client, sender=f"a{n}@example.org")[0] == 250
        assert client.quit()[0] == 221


def test_with_no_xclient_sessions_in_turn_share_one_backend_connection_which_says_the_relays_name(
        relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--no-xclient", "--server-name", SERVER_NAME)
    sessions_in_turn(r, 3)
    [session] = backend.sessions
    assert [m.mail_from for m in session.messages] == [f"MAIL FROM:<a{n}@example.org>".encode() for n in range(3)]
    helos = [c for c in session.commands if c.upper().startswith((b"EHLO", b"HELO"))]
    assert [h.upper() for h in helos] == [b"EHLO " + SERVER_NAME.upper().encode()]       # no client's HELO on a shared connection
    assert b"XCLIENT" not in b" ".join(session.commands)


def test_with_xclient_every_session_gets_a_connection_of_its_own_with_one_xclient(relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--server-name", SERVER_NAME)
    sessions_in_turn(r, 3)
    assert len(backend.sessions) == 3
    for n, session in enumerate(backend.sessions):
        assert [c for c in session.commands if c.startswith(b"XCLIENT")] == [session.xclient]
        assert f"HELO=client.example{n}".encode() in session.xclient
        assert len(session.messages) == 1
    for session in backend.sessions:        # each closed with QUIT, none kept
        assert session.closed.wait(5)
        assert session.commands[-1].upper() == b"QUIT"


def test_a_pooled_connection_the_backend_closed_while_idle_is_replaced_unseen(relay, scripted_backend):
    # The back-end drops a connection idle for a second (its read timeout).
    backend = scripted_backend(read_timeout=1)
    r = relay("--backend", backend.address, "--no-xclient")
    sessions_in_turn(r, 1)
    assert backend.sessions[0].closed.wait(5)
    sessions_in_turn(r, 1, helo="again.example")
    assert len(backend.sessions) == 2
    assert [m.mail_from for m in backend.delivered] == [b"MAIL FROM:<a0@example.org>"] * 2


def test_a_pooled_connection_answering_421_at_mail_is_replaced_unseen(relay, scripted_backend):
    # The first connection's second MAIL gets 421 (an idle timeout on the
    # back-end's side, said when the relay next speaks).
    backend = scripted_backend(replies={"MAIL": ["250 2.1.0 Ok", "421 4.4.2 idle too long"]})
    r = relay("--backend", backend.address, "--no-xclient")
    sessions_in_turn(r, 2)
    assert len(backend.sessions) == 2
    assert [len(s.messages) for s in backend.sessions] == [1, 1]
    assert [m.mail_from for m in backend.delivered] == [b"MAIL FROM:<a0@example.org>", b"MAIL FROM:<a1@example.org>"]


def test_a_session_that_ends_inside_a_transaction_does_not_give_its_connection_back(relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--no-xclient")
    client = smtp_client(r)
    assert client.mail("open@example.org")[0] == 250
    assert client.rcpt("b@example.net")[0] == 250
    client.close()                      # gone with MAIL and RCPT open at the back-end
    assert backend.sessions[0].closed.wait(5)
    sessions_in_turn(r, 1)
    assert len(backend.sessions) == 2
    assert backend.sessions[1].messages[0].mail_from == b"MAIL FROM:<a0@example.org>"


def test_answers_with_other_backend_credentials_never_share_a_connection(relay, scripted_backend, auth_service):
    backend = scripted_backend(extensions=["AUTH PLAIN"], auth={"alice": "a-pw", "bob": "b-pw"})

    def policy(request):
        user = request["Auth-SMTP-From"].split("<")[1].split("@")[0]
        return ok(backend, ("Auth-User", user), ("Auth-Pass", f"{user[0]}-pw"))

    service = auth_service(policy)
    r = relay("--auth-http", service.url, "--no-xclient")
    for sender in ("alice@example.org", "bob@example.org", "alice@example.org"):
        client = smtp_client(r)
        assert transaction(client, sender=sender)[0] == 250
        assert client.quit()[0] == 221
    users = [[a.user for a in s.auths] for s in backend.sessions]
    assert sorted(users) == [["alice"], ["bob"]]          # alice's connection served alice twice, bob's only bob
    by_user = {s.auths[0].user: [m.mail_from for m in s.messages] for s in backend.sessions}
    assert by_user == {"alice": [b"MAIL FROM:<alice@example.org>"] * 2, "bob": [b"MAIL FROM:<bob@example.org>"]}


def test_a_stop_closes_the_pooled_connections_with_quit(relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--no-xclient")
    sessions_in_turn(r, 1)
    [session] = backend.sessions
    assert not session.closed.is_set()      # kept for the next session
    assert r.stop(signal.SIGTERM) == 0
    assert session.closed.wait(5)
    assert session.commands[-1].upper() == b"QUIT"
