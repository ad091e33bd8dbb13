"""Property tests (hypothesis) for the parsers and the DATA scanner, on the module's own functions.

The DATA scanner is fed through a real socket pair, in writes split at
random places, as a client's TCP segments would arrive.
"""
import socket
import string
import threading

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import smtprelay
from smtprelay import BARE_NEWLINE, Channel, SMTPError, Wire, parse_path

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ATOM = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
dot_string = st.lists(st.text(ATOM, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
quoted = st.text(st.sampled_from(string.ascii_letters + ' ><@,;:.()[]"\\'), max_size=10).map(
    lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
domain = st.lists(st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8),
                  min_size=1, max_size=3).map(".".join)
literal = st.tuples(*[st.integers(0, 255)] * 4).map(lambda ip: "[%d.%d.%d.%d]" % ip)
mailbox = st.builds(lambda local, host: f"{local}@{host}", dot_string | quoted, domain | literal)
param_name = st.text(string.ascii_uppercase + string.digits, min_size=1, max_size=8).filter(lambda n: n[0].isalnum())
param_value = st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=10)
params = st.dictionaries(param_name, param_value, max_size=3)


@BOUNDED
@given(mailbox, params)
def test_a_formatted_path_parses_back_to_the_same_mailbox_and_parameters(address, parameters):
    line = f"<{address}>" + "".join(f" {k}={v}" if v is not None else f" {k}" for k, v in parameters.items())
    assert parse_path(line) == (address, parameters)


@BOUNDED
@given(st.text(max_size=60))
def test_any_path_argument_parses_or_gets_a_501_or_555(text):
    try:
        parse_path(text)
    except SMTPError as e:
        assert e.code in (501, 555)


@BOUNDED
@given(st.text(max_size=40), st.integers(200, 599))
def test_every_formatted_reply_line_is_one_crlf_line_with_the_code(text, code):
    for line in smtprelay.format_reply(code, text).split(b"\r\n")[:-1]:
        assert line[:3] == str(code).encode() and line[3:4] in (b"", b" ", b"-")
        assert b"\r" not in line and b"\n" not in line


# --- The DATA scanner -------------------------------------------------------------------------

message_bytes = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"x", b"\r\n.", b"\r\n.\r"]),
                         max_size=40).map(b"".join)
AFTER = b"NOOP after\r\n"


def scanned(data, cuts, normalize):
    """Send data + AFTER in writes cut at `cuts` -> (segments read_data yields, the next command line)."""
    server, client = socket.socketpair()
    with server, client:
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])] + [AFTER]

        def send():
            for piece in pieces:
                if piece:
                    client.sendall(piece)
        sender = threading.Thread(target=send)
        sender.start()
        channel = Channel(Wire(server, first_read=5), 5)
        segments = list(channel.read_data(normalize))
        after = channel.read_line()
        sender.join()
    return segments, after


def backend_bytes(segments):
    """What the back-end gets: the segments joined (how reads cut them is no part of it), and the markers."""
    return b"".join(s for s in segments if s is not BARE_NEWLINE), segments.count(BARE_NEWLINE)


def real_end_only(message):
    """message + the terminator, where the terminator is the first CRLF.CRLF the client sent."""
    data = message + b"\r\n.\r\n"
    assume((b"\r\n" + data).find(b"\r\n.\r\n") == len(data) - 3)
    return data


@BOUNDED
@given(message_bytes, st.lists(st.integers(0, 200), max_size=6), st.booleans())
def test_any_split_of_the_same_bytes_gives_the_same_backend_bytes(message, cuts, normalize):
    data = real_end_only(message)
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    whole, after = scanned(data, [], normalize)
    split, split_after = scanned(data, cuts, normalize)
    out, markers = backend_bytes(whole)
    split_out, split_markers = backend_bytes(split)
    assert split_markers == markers
    # A refused message (reject mode) goes out up to where a read showed the bare
    # newline, and is then dropped without its end: only the verdict must agree.
    assert markers or split_out == out
    assert after == split_after == AFTER[:-2]       # what follows the end is the next command, untouched


@BOUNDED
@given(message_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_normalize_never_yields_a_bare_newline_nor_an_end_the_client_did_not_send(message, cuts):
    data = real_end_only(message)
    segments, _ = scanned(data, sorted(c % (len(data) + 1) for c in cuts), normalize=True)
    out, markers = backend_bytes(segments)
    assert markers == 0
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    # The back-end gets out + ".\r\n": its only CRLF.CRLF must be that last one.
    # DATA starts at a line start, hence the CRLF in front.
    assert (b"\r\n" + out + b".\r\n").find(b"\r\n.\r\n") == len(out)
    assert out.endswith(b"\r\n")


@BOUNDED
@given(message_bytes)
def test_reject_mode_marks_a_message_with_a_bare_newline_once(message):
    data = real_end_only(message)
    segments, _ = scanned(data, [], normalize=False)
    body = data[:-3]
    bare = body.count(b"\r") != body.count(b"\r\n") or body.count(b"\n") != body.count(b"\r\n")
    assert segments.count(BARE_NEWLINE) == (1 if bare else 0)
