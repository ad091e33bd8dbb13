"""Tests of the test fixtures themselves (ScriptedBackend, smtp-sink), without the relay."""
import smtplib
import socket

import pytest

from helpers import SMTPClient, codes, wait_until


def smtp_to(server, timeout=5):
    return smtplib.SMTP(server.host, server.port, timeout=timeout)


def test_scripted_backend_records_raw_dot_stuffed_data(scripted_backend):
    backend = scripted_backend()
    body = b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\nlast\r\n"
    with smtp_to(backend) as client:
        client.sendmail("a@example.org", ["b@example.org"], body)
    [session] = backend.wait_for_sessions_closed(1)
    [message] = backend.delivered
    assert message.raw == b"Subject: dots\r\n\r\n..one dot\r\n...two dots\r\nlast\r\n"
    assert message.content == body
    assert message.mail_from == b"mail FROM:<a@example.org> size=%d" % len(body)  # smtplib's spelling
    assert message.rcpt_to == [b"rcpt TO:<b@example.org>"]
    assert message.reply.startswith("250 2.0.0 Ok: queued as ")
    assert [c.split(b" ")[0] for c in session.commands] == [b"ehlo", b"mail", b"rcpt", b"data", b"QUIT"]


def test_scripted_backend_finds_terminator_split_across_reads(scripted_backend):
    backend = scripted_backend()
    with socket.create_connection((backend.host, backend.port), timeout=5) as sock:
        client = SMTPClient(sock, nodelay=True)
        client.reply()
        client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
        assert codes(client.reply() for _ in range(3)) == [250, 250, 354]
        client.send(*(bytes([byte]) for byte in b"a\r\n.\r\n"))
        queued = client.reply()
        assert queued.code == 250 and len(queued.lines) == 1 and queued.lines[0].startswith("2.0.0 Ok: queued as ")
    assert [m.raw for m in backend.delivered] == [b"a\r\n"]


def test_scripted_backend_ends_empty_data_and_keeps_pipelined_command(scripted_backend):
    backend = scripted_backend()
    with socket.create_connection((backend.host, backend.port), timeout=5) as sock:
        client = SMTPClient(sock)
        client.reply()
        client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n.\r\nQUIT\r\n")
        replies = codes(client.reply() for _ in range(5))
    assert replies == [250, 250, 354, 250, 221]
    [session] = backend.wait_for_sessions_closed(1)
    assert [m.raw for m in session.messages] == [b""]
    assert session.commands[-1] == b"QUIT"


def test_scripted_backend_sends_configured_replies(scripted_backend):
    backend = scripted_backend(replies={"EHLO": "250-first\r\n250 second",
                                        "RCPT": ["250 2.1.5 Ok", "550 5.1.1 no such user"],
                                        "XCLIENT": "250 2.0.0 Ok"})
    with smtp_to(backend) as client:
        assert client.ehlo() == (250, b"first\nsecond")
        assert client.docmd("XCLIENT ADDR=192.0.2.1") == (250, b"2.0.0 Ok")
        refused = client.sendmail("a@x", ["ok@x", "bad@x"], b"hi\r\n")
        assert client.docmd("VRFY x") == (502, b"5.5.2 Error: command not recognized")
    assert refused == {"bad@x": (550, b"5.1.1 no such user")}
    assert [m.rcpt_to for m in backend.delivered] == [[b"rcpt TO:<ok@x>"]]
    assert backend.sessions[0].xclient == b"XCLIENT ADDR=192.0.2.1"


def test_scripted_backend_regreets_after_xclient_by_default(scripted_backend):
    backend = scripted_backend()
    with smtp_to(backend) as client:
        assert client.docmd("XCLIENT NAME=client.example ADDR=192.0.2.1") == (220, b"scripted ESMTP")


def test_scripted_backend_421_greeting_closes_connection(scripted_backend):
    backend = scripted_backend(greeting="421 4.3.2 busy")
    with pytest.raises(smtplib.SMTPConnectError, match="busy"):
        smtp_to(backend)
    backend.wait_for_sessions_closed(1)


def test_scripted_backend_drop_closes_without_reply(scripted_backend):
    backend = scripted_backend(actions={"MAIL": "drop"})
    with smtp_to(backend) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@x", ["b@x"], b"hi\r\n")
    [session] = backend.wait_for_sessions_closed(1)
    assert session.commands[-1] == b"mail FROM:<a@x> size=4"


def test_scripted_backend_hang_leaves_client_to_time_out(scripted_backend):
    backend = scripted_backend(actions={"DATA": "hang"})
    with smtp_to(backend, timeout=0.3) as client:
        client.ehlo()
        client.mail("a@x")
        client.rcpt("b@x")
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            client.data(b"hi\r\n")
    assert not backend.sessions[0].closed.is_set()


def test_scripted_backend_connect_hang_never_greets(scripted_backend):
    backend = scripted_backend(actions={"CONNECT": "hang"})
    with socket.create_connection((backend.host, backend.port), timeout=0.3) as sock:
        wait_until(lambda: backend.connections >= 1, 5, "the connection handled")
        with pytest.raises(TimeoutError):       # and says nothing (no event to await for silence)
            sock.recv(100)
    assert backend.connections == 1


def test_scripted_backend_drops_after_configured_data_bytes(scripted_backend):
    backend = scripted_backend(drop_after_data_bytes=1000)
    body = b"x" * 78 + b"\r\n"
    with smtp_to(backend) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@x", ["b@x"], body * 1000)
    [session] = backend.wait_for_sessions_closed(1)
    [message] = session.messages
    assert not message.completed and backend.delivered == []
    assert len(message.raw) >= 1000 and (body * 1000).startswith(message.raw)


def test_smtp_sink_captures_envelope_and_unstuffed_body(smtp_sink):
    sink = smtp_sink()
    with smtp_to(sink) as client:
        client.ehlo("client.example")
        client.sendmail("a@example.org", ["b@example.org", "c@example.org"],
                        b"Subject: t\r\n\r\n.dot\r\nend\r\n", mail_options=["BODY=8BITMIME"])
    [message] = sink.wait_for_messages(1)
    assert (message.client_addr, message.client_proto, message.helo) == ("127.0.0.1", "ESMTP", "client.example")
    assert message.mail_args == "<a@example.org> BODY=8BITMIME"
    assert message.rcpt_args == ["<b@example.org>", "<c@example.org>"]
    assert message.body == b"Subject: t\n\n.dot\nend\n"
    assert message.body_crlf == b"Subject: t\r\n\r\n.dot\r\nend\r\n"


def test_smtp_sink_dump_drops_carriage_returns_and_keeps_other_bytes(smtp_sink):
    sink = smtp_sink()
    with smtp_to(sink) as client:
        client.sendmail("a@x", ["b@x"], b"a\rb\r\nbare\nlf\r\n\x00\xff" + b"y" * 5000 + b"\r\n")
        assert sink.messages()[0].body == b"ab\nbare\nlf\n\x00\xff" + b"y" * 5000 + b"\n"


def test_smtp_sink_passes_flags_through(smtp_sink):
    sink = smtp_sink("-f", "RCPT")
    with smtp_to(sink) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail("a@x", ["b@x"], b"hi\r\n")
    assert sink.messages() == []
