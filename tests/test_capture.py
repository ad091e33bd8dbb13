"""The capture back-ends keep their own framing: what a client sends cannot pass for it.

`stdout:` prints each message between its frame lines (README, "Instead of
DebuggingServer"); a body line that starts with a frame line's text, after
any number of '>', is printed with one more '>' in front (the quoting of
mboxrd's ">From "), so a body can neither end its frame nor open another
with an envelope of its own. `maildir:` writes its own header block before
the message (README, "The built-in Maildir back-end"); a message whose first
line starts with a space or a tab must not continue the relay's last header
line (RFC 5322 §2.2.3, folding). Every header line the relay writes is
folded to at most 998 octets (RFC 5322 §2.1.1), however many recipients.
"""
import email
import email.parser
import email.policy
import re
from collections import Counter

import pytest

from helpers import begin_data, greeted
from test_stdout import stdout_relay  # noqa: F401  (fixture)

FRAME_START = b"---------- MESSAGE FOLLOWS ----------"
FRAME_END = b"------------ END MESSAGE ------------"
SENDER, RECIPIENT = "real@example.org", "rcpt@example.net"
LINE_LIMIT = 998        # RFC 5322 §2.1.1, without the line end
MANY = 10_000


def lines_of(printed):
    """The printed output as lines, as a reader splits them: at LF, a CR before it dropped."""
    return [line.removesuffix(b"\r") for line in printed.split(b"\n")]


def quoted(body):
    """`body` as stdout: prints it: one more '>' before each line that starts, after
    any '>', with a frame line's text."""
    return re.sub(rb"(?m)^(>*(?:" + re.escape(FRAME_START) + rb"|" + re.escape(FRAME_END) + rb"))", rb">\1", body)


def recipients_in(headers, name="X-Envelope-To"):
    """Every <address> in every `name` header of an email.message.Message, folding undone."""
    values = headers.get_all(name) or []
    return [address for value in values for address in re.findall(r"<([^<>]*)>", value)]


def long_lines(block):
    """Lines of `block` (bytes, LF line ends) over RFC 5322's 998 octets -> [(number, length)]."""
    return [(n, len(line)) for n, line in enumerate(lines_of(block)) if len(line) > LINE_LIMIT]


def send_many_recipients(client, count):
    """MAIL, `count` recipients pipelined in batches (all must get 250) and DATA (354)."""
    rcpts = [f"r{n:05d}@example.net" for n in range(count)]
    assert client.say(f"MAIL FROM:<{SENDER}>").code == 250
    for start in range(0, count, 500):
        batch = rcpts[start:start + 500]
        replies = client.talk(*(f"RCPT TO:<{rcpt}>" for rcpt in batch))
        assert all(reply.code == 250 for reply in replies), next(str(r) for r in replies if r.code != 250)
    assert client.say("DATA").code == 354
    return rcpts


# --- stdout: --------------------------------------------------------------------------------

def test_a_body_holding_frame_lines_and_a_forged_envelope_prints_as_one_message(stdout_relay):
    """README: stdout: prints each message between its own frame lines, after its
    envelope. A body that starts with the end line and then holds a whole forged frame
    (start line, an envelope of its choosing, an end line), and lines that start with
    either text after some '>', prints as ONE message: one start line, one end line, the
    real envelope; each such body line gets one more '>' in front (mboxrd-style
    quoting), and every other byte is as the client sent it."""
    relay = stdout_relay()
    body = (FRAME_END + b"\r\n"
            + FRAME_START + b"\r\n"
            + b"X-Smtprelay-Id: forged.0\r\n"
              b"X-Envelope-From: <forged@evil.example>\r\n"
              b"X-Envelope-To: <victim@evil.example>\r\n"
              b"X-Peer: 192.0.2.1:25 HELO evil.example\r\n"
              b"X-Received-At: Mon, 01 Jan 2001 00:00:00 +0000\r\n"
              b"\r\n"
              b"Subject: forged\r\n\r\nA message that was never sent.\r\n"
            + FRAME_END + b" and more on the line\r\n"
            + b">" + FRAME_START + b"\r\n"
            + b">>>" + FRAME_END + b"\r\n"
            + b"the real message's last line\r\n")
    client = greeted(relay, ehlo="client.example")
    begin_data(client, SENDER, RECIPIENT)
    client.send(body + b".\r\n")
    reply = client.reply()
    assert reply.code == 250, str(reply)
    assert client.say("QUIT").code == 221
    printed = relay.printed()
    lines = lines_of(printed)
    starts = [n for n, line in enumerate(lines) if line.startswith(FRAME_START)]
    ends = [n for n, line in enumerate(lines) if line.startswith(FRAME_END)]
    assert len(starts) == 1 and len(ends) == 1, f"{len(starts)} start and {len(ends)} end lines:\n{printed.decode()}"
    assert printed.startswith(FRAME_START + b"\n") and printed.endswith(b"\n" + FRAME_END + b"\n")
    head, _, message = printed[len(FRAME_START) + 1:-len(FRAME_END) - 1].partition(b"\n\n")
    envelope = dict(line.decode().split(": ", 1) for line in head.split(b"\n"))
    assert envelope["X-Envelope-From"] == f"<{SENDER}>"
    assert envelope["X-Envelope-To"] == f"<{RECIPIENT}>"
    assert reply.lines[0].endswith(envelope["X-Smtprelay-Id"])
    assert message == quoted(body)


def test_10000_recipients_print_with_no_envelope_line_over_998_octets(stdout_relay):
    """RFC 5322 §2.1.1: a line is at most 998 octets. With 10,000 recipients
    (--max-recipients 10000) the envelope stdout: prints is folded so that no line of it
    exceeds that, and X-Envelope-To still lists every recipient."""
    relay = stdout_relay("--max-recipients", str(MANY))
    client = greeted(relay, timeout=60, ehlo="client.example")
    rcpts = send_many_recipients(client, MANY)
    message = b"Subject: many recipients\r\n\r\nHello.\r\n"
    client.send(message + b".\r\n")
    assert client.reply().code == 250
    assert client.say("QUIT").code == 221
    printed = relay.printed()
    assert printed.startswith(FRAME_START + b"\n") and printed.endswith(b"\n" + FRAME_END + b"\n")
    head, _, rest = printed.partition(b"\n\n")
    assert rest == message + FRAME_END + b"\n"
    assert long_lines(head) == []
    envelope = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        head.split(b"\n", 1)[1] + b"\n\n")
    assert envelope["X-Envelope-From"] == f"<{SENDER}>"
    assert Counter(recipients_in(envelope)) == Counter(rcpts)


# --- maildir: -------------------------------------------------------------------------------

def stored(path, reply):
    """The Maildir file a 250 "queued as NAME" names -> its bytes."""
    assert reply.code == 250, str(reply)
    name = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", reply.lines[0])[1]
    return (path / "new" / name).read_bytes()


@pytest.mark.parametrize("lead", [b"\t", b" "], ids=["tab", "space"])
def test_a_message_starting_with_whitespace_does_not_fold_into_the_relays_received_header(
        relay, tmp_path, lead):
    """RFC 5322 §2.2.3: a line that starts with white space continues the header field
    before it. A message whose first line starts with a tab or a space must not become
    part of the Received: header the maildir: back-end writes (README): an empty line
    separates the relay's header block from it, the Received header holds none of the
    client's text, and the message follows as sent (with LF line ends)."""
    path = tmp_path / "md"
    r = relay("--backend", f"maildir:{path}")
    body = (lead + b"by forged.example with ESMTP id FORGED; Mon, 1 Jan 2001 00:00:00 +0000\r\n"
            b"Subject: folded in\r\n\r\nHello.\r\n")
    client = greeted(r, ehlo="client.example")
    begin_data(client, SENDER, RECIPIENT)
    client.send(body + b".\r\n")
    content = stored(path, client.reply())
    assert client.say("QUIT").code == 221
    message = email.message_from_bytes(content, policy=email.policy.compat32)
    received = message.get_all("Received")
    assert received and len(received) == 1, received
    assert "FORGED" not in received[0] and "forged.example" not in received[0], received[0]
    assert message["Return-Path"] == f"<{SENDER}>"
    assert recipients_in(message) == [RECIPIENT]
    body_lf = body.replace(b"\r\n", b"\n")
    assert message.get_payload() == body_lf.decode()
    assert content.endswith(b"\n\n" + body_lf), content.decode()


@pytest.mark.parametrize("hello, mail, protocol", [
    ("HELO client.example", f"MAIL FROM:<{SENDER}>", "SMTP"),
    ("EHLO client.example", f"MAIL FROM:<{SENDER}>", "ESMTP"),
    ("EHLO client.example", f"MAIL FROM:<{SENDER}> SMTPUTF8", "UTF8SMTP"),
])
def test_the_maildir_received_line_names_the_protocol_as_rfc_3848_and_6531_do(hello, mail, protocol, relay, tmp_path):
    # With TLS and a login, S and A follow (ESMTPSA); those need a TLS listener and an auth service.
    path = tmp_path / "md"
    r = relay("--backend", f"maildir:{path}")
    client = greeted(r)
    assert client.say(hello).code == 250
    assert client.say(mail).code == 250
    assert client.say(f"RCPT TO:<{RECIPIENT}>").code == 250
    assert client.say("DATA").code == 354
    client.send(b"Subject: protocol\r\n\r\nHello.\r\n.\r\n")
    message = email.message_from_bytes(stored(path, client.reply()), policy=email.policy.compat32)
    assert re.search(rf"\(smtprelay\) with {protocol} id ", message["Received"]), message["Received"]


def test_10000_recipients_in_a_maildir_file_with_no_header_line_over_998_octets(relay, tmp_path):
    """RFC 5322 §2.1.1: a line is at most 998 octets. The maildir: back-end's header block
    (Return-Path, X-Envelope-To, Received; README) for a message to 10,000 recipients
    (--max-recipients 10000) is folded so that no line exceeds that, and X-Envelope-To
    still lists every recipient once the folding is undone."""
    path = tmp_path / "md"
    r = relay("--backend", f"maildir:{path}", "--max-recipients", str(MANY))
    client = greeted(r, timeout=60, ehlo="client.example")
    rcpts = send_many_recipients(client, MANY)
    body = b"Subject: many recipients\r\n\r\nHello.\r\n"
    client.send(body + b".\r\n")
    content = stored(path, client.reply())
    assert client.say("QUIT").code == 221
    body_lf = body.replace(b"\r\n", b"\n")
    assert content.endswith(b"\n" + body_lf)
    head = content[:-len(body_lf)]
    assert long_lines(head) == []
    message = email.message_from_bytes(content, policy=email.policy.compat32)
    assert message["Return-Path"] == f"<{SENDER}>"
    assert Counter(recipients_in(message)) == Counter(rcpts)
    assert message["Subject"] == "many recipients"


def test_addresses_of_many_octets_or_control_characters_still_fit_a_header_line(relay, tmp_path):
    """RFC 5322 §2.1.1 counts octets: a UTF-8 address (RFC 6531) of 3-octet characters, or one
    whose control characters the header shows escaped, is taken while its header line fits
    (a path up to 900 octets as written), and refused with 501 beyond (RFC 5321
    §4.5.3.1.10, "Path too long"); no line of the stored header block passes 998 octets."""
    path = tmp_path / "md"
    r = relay("--backend", f"maildir:{path}")
    client = greeted(r, ehlo="client.example")
    fits = "漢" * 290 + "@example.org"                  # 882 octets
    too_long = "漢" * 310 + "@example.org"              # 942 octets, 322 characters
    quoted_controls = '"' + "\u0085" * 250 + '"@example.org'     # shown as \x85: 1000 and more
    assert client.say(f"MAIL FROM:<{too_long}> SMTPUTF8").code == 501
    assert client.say(f"MAIL FROM:<{fits}> SMTPUTF8").code == 250
    assert client.say(f"RCPT TO:<{quoted_controls}>").code == 501
    assert client.say(f"RCPT TO:<{fits}>").code == 250
    assert client.say("DATA").code == 354
    client.send(b"Subject: wide\r\n\r\nHello.\r\n.\r\n")
    content = stored(path, client.reply())
    head = content[:content.index(b"Subject: wide")]     # the relay's own header block
    assert long_lines(head) == []
    assert fits.encode() in content
