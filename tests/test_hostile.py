"""Hostile clients: SMTP smuggling, bare newlines, split terminators, junk, a 200 MB message.

The contract (README "No false 250, no smuggling", the README's --bare-newline):
the only end of data is CRLF.CRLF. With `--bare-newline normalize` (the
default) every bare CR or LF in the data becomes CRLF and the line is
dot-stuffed as needed, so the data a back-end gets holds no bare CR or LF and
no CRLF.CRLF but its final one; with `reject` the message gets `554 5.6.0`
and the back-end transaction is abandoned, so nothing is delivered.

Everything hostile is sent as raw bytes on a plain socket (helpers.SMTPClient).
The back-end is ScriptedBackend, which records each message's exact bytes
(Message.raw), or Postfix's smtp-sink for the 200 MB message.
"""
import itertools
import random
import re
import socket
import threading
import time

import pytest

from helpers import begin_data, codes, greeted, parse_sink_dump, stopped_on_exit, verbs

CRLF = b"\r\n"
SENDER, RECIPIENT = "alice@example.org", "bob@example.org"


# --- Starting things ---------------------------------------------------------------

def start_session(relay_process):
    """An SMTPClient (TCP_NODELAY: each send leaves at once) greeted by the relay and past EHLO."""
    return greeted(relay_process, ehlo="client.example", nodelay=True)


def start_relay(relay, backend, mode=None):
    """The relay in front of `backend`; mode None leaves --bare-newline at its default."""
    return relay("--backend", backend.address, *(("--bare-newline", mode) if mode else ()))


# --- Seeing the relay's reads: a tap between it and the back-end ----------------

NEWLINE = re.compile(rb"\r\n|\r|\n")    # one line end, as the relay splits lines


class Tap:
    """A TCP forwarder in front of a back-end, counting the bytes and LFs the relay sends it.

    A client cannot see when the relay has read its last write, so two quick
    writes may reach it in one read. But the relay passes on every whole line
    it has read (a long line in parts) before it reads again: once they have
    come through here, the client's next write is sure to arrive in a read
    of its own.
    """

    def __init__(self, backend):
        self.upstream = (backend.host, backend.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self.listener.getsockname()
        self.address = f"{self.host}:{self.port}"
        self.sent = self.newlines = 0       # from the relay, over all its connections
        self.cond = threading.Condition()
        self.sockets, self.pipes = [], []
        self.acceptor = threading.Thread(target=self.accept, daemon=True)
        self.acceptor.start()

    def accept(self):
        while True:
            try:
                relay_side, _ = self.listener.accept()
            except OSError:     # stop() shut the listener
                return
            backend_side = socket.create_connection(self.upstream)
            self.sockets += [relay_side, backend_side]
            for args in [(relay_side, backend_side, True), (backend_side, relay_side, False)]:
                self.pipes.append(threading.Thread(target=self.pipe, args=args, daemon=True))
                self.pipes[-1].start()

    def pipe(self, source, sink, counted):
        try:
            while data := source.recv(65536):
                if counted:
                    with self.cond:
                        self.sent += len(data)
                        self.newlines += data.count(b"\n")
                        self.cond.notify_all()
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)   # an end passes on: the relay dropping a back-end
        except OSError:
            pass

    def wait(self, sent=0, newlines=0, timeout=10):
        """Wait until the relay has sent at least `sent` bytes and `newlines` LFs in all."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.sent >= sent and self.newlines >= newlines, timeout):
                raise AssertionError(f"the relay passed on {self.sent} bytes, {self.newlines} LFs; "
                                     f"waited for {sent} bytes, {newlines} LFs")

    def stop(self):
        self.listener.shutdown(socket.SHUT_RDWR)    # wakes accept(), which close() would not
        self.listener.close()
        self.acceptor.join(5)
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for pipe in self.pipes:
            pipe.join(5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def tap():
    """Factory start(backend) -> a Tap in front of it; all stopped at teardown."""
    with stopped_on_exit(Tap) as start:
        yield start


def send_in_separate_reads(client, tap, writes, mode="normalize"):
    """Send message data in `writes`, each reaching the relay in a read of its own.

    Call right after the 354. Before each next write, wait until the relay
    has passed on the whole lines so far: each line end, bare or not, as
    one CRLF. A write that ends no line needs no wait: the relay held it
    whole, just as if it had come with the next. In reject mode the relay
    passes nothing on once it found a bare CR or LF; there is nothing to
    wait for then.
    """
    start, sent = tap.newlines, b""
    for write in writes[:-1]:
        client.send(write)
        sent += write
        whole_lines = sent[:sent.rfind(b"\n") + 1]
        if mode == "reject" and has_bare_newline(whole_lines):
            continue
        tap.wait(newlines=start + len(NEWLINE.findall(whole_lines)))
    client.send(writes[-1])


# --- What the back-end must and must not see ------------------------------------

def has_bare_newline(data):
    return not data.count(b"\r") == data.count(b"\n") == data.count(CRLF)


def assert_one_end_and_no_bare_newline(raw):
    """raw, a message as a back-end read it up to its final ".\\r\\n", can end nowhere else."""
    assert not has_bare_newline(raw), f"a bare CR or LF reached the back-end: {raw!r}"
    assert raw == b"" or raw.endswith(CRLF), f"the final '.' would not start a line: {raw!r}"
    assert b"." not in raw.split(CRLF), f"a lone '.' line (another end of data) reached the back-end: {raw!r}"


def transaction_verbs(session):
    """A back-end session's command verbs from its first MAIL on (the relay's EHLO/XCLIENT cut off)."""
    said = verbs(session)
    assert b"MAIL" in said, f"no MAIL in {session.commands}"
    return said[said.index(b"MAIL"):]


def intended_lines(data):
    """The lines a client sending `data` then CRLF.CRLF means, as a back-end should read them.

    A line after CRLF (or the DATA command) was dot-stuffed by the client, so
    its leading dot is not text (RFC 5321 §4.5.2); a line after a bare CR or
    LF was no line to SMTP and was not stuffed, so its dot is text. A lone "."
    ended by a bare newline is thereby an empty line (see restuff's docstring).
    """
    text, lines, after_crlf, pos = data + CRLF, [], True, 0
    for newline in NEWLINE.finditer(text):
        line = text[pos:newline.start()]
        lines.append(line[1:] if after_crlf and line.startswith(b".") else line)
        after_crlf, pos = newline.group() == CRLF, newline.end()
    return lines


def ends_only_at_its_terminator(data):
    """True if `data` + CRLF.CRLF, sent after DATA, holds no earlier end of data."""
    stream = CRLF + data + b"\r\n.\r\n"     # the CRLF of the DATA command starts the data's first line
    return stream.find(b"\r\n.\r\n") == len(data) + 2


# --- SMTP smuggling (SEC Consult, Timo Longin, 2023, and follow-ups) ------------
# Each case: the message's text before the payload, the payload, and what the
# back-end must get in its place (--bare-newline normalize). After the payload
# comes a whole smuggled transaction, then the real end of data.

BODY = b"From: alice@example.org\r\nSubject: smuggling test\r\n\r\nhello"
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"
SMUGGLING = [
    pytest.param(BODY, b"\n.\r\n", b"\r\n..\r\n", id="LF.CRLF"),
    pytest.param(BODY, b"\n.\n", b"\r\n..\r\n", id="LF.LF"),
    pytest.param(BODY, b"\r.\r", b"\r\n..\r\n", id="CR.CR"),
    pytest.param(BODY, b"\r\n.\r", b"\r\n\r\n", id="CRLF.CR"),
    pytest.param(BODY, b"\r\n.\n", b"\r\n\r\n", id="CRLF.LF"),
    pytest.param(BODY, b"\r.\r\n", b"\r\n..\r\n", id="CR.CRLF"),
    pytest.param(BODY, b"\n.\r", b"\r\n..\r\n", id="LF.CR"),
    pytest.param(BODY, b"\r.\n", b"\r\n..\r\n", id="CR.LF"),
    pytest.param(BODY, b"\r\n.\r\r\n", b"\r\n\r\n\r\n", id="CRLF.CRCRLF"),
    pytest.param(BODY, b"\r\r\n.\r\r\n", b"\r\n\r\n\r\n\r\n", id="CRCRLF.CRCRLF"),
    pytest.param(BODY, b"\n\n.\n\n", b"\r\n\r\n..\r\n\r\n", id="LFLF.LFLF"),
    pytest.param(BODY, b"\r\n\x00.\r\n", b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
    pytest.param(b"", b".\n", b"\r\n", id="data-starts-.LF"),
    pytest.param(b"", b".\r", b"\r\n", id="data-starts-.CR"),
    pytest.param(BODY + b"\r\n", b".\n", b"\r\n", id="line-starts-.LF"),
]
BARE_SMUGGLING = [case for case in SMUGGLING if has_bare_newline(case.values[1])]


@pytest.mark.parametrize("before, payload, normalized", SMUGGLING)
def test_smuggled_transaction_reaches_the_backend_as_data_of_the_one_message(
        relay, scripted_backend, before, payload, normalized):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))     # the default: --bare-newline normalize
    begin_data(client, SENDER, RECIPIENT)
    client.send(before + payload + SMUGGLED + b"\r\n.\r\n")
    client.send(b"QUIT\r\n")

    # One 250 for the one message, then QUIT's 221: the smuggled MAIL, RCPT
    # and DATA got no replies, as they were no commands.
    replies = client.replies_until_closed()
    assert codes(replies) == [250, 221], replies
    [session] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(session) == [b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    [message] = session.messages
    assert message.completed
    assert message.raw == before + normalized + SMUGGLED + CRLF
    assert_one_end_and_no_bare_newline(message.raw)


@pytest.mark.parametrize("before, payload, normalized", BARE_SMUGGLING)
def test_smuggling_payload_is_refused_with_554_in_reject_mode_and_session_goes_on(
        relay, scripted_backend, before, payload, normalized):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend, "reject"))
    begin_data(client, SENDER, RECIPIENT)
    client.send(before + payload + SMUGGLED + b"\r\n.\r\n")
    code, text = client.reply().tuple()
    assert code == 554 and text.startswith(b"5.6.0 "), (code, text)

    # The relay abandoned that back-end session without an end of data: no message, no second MAIL.
    [refused] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(refused) == [b"MAIL", b"RCPT", b"DATA"]
    assert [m.completed for m in refused.messages] == [False]
    assert backend.delivered == []

    # The client's session goes on; its next message goes out on a new back-end session.
    begin_data(client, SENDER, RECIPIENT)
    client.send(b"Subject: clean\r\n\r\nclean\r\n.\r\n", b"QUIT\r\n")
    assert codes(client.replies_until_closed()) == [250, 221]
    backend.wait_for_sessions_closed(2)
    assert [m.raw for m in backend.delivered] == [b"Subject: clean\r\n\r\nclean\r\n"]
    assert backend.delivered[0] in backend.sessions[1].messages


def test_nul_before_dot_is_plain_data_in_reject_mode(relay, scripted_backend):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend, "reject"))
    begin_data(client, SENDER, RECIPIENT)
    client.send(BODY + b"\r\n\x00.\r\n" + SMUGGLED + b"\r\n.\r\n", b"QUIT\r\n")
    assert codes(client.replies_until_closed()) == [250, 221]
    [session] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(session) == [b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert [m.raw for m in backend.delivered] == [BODY + b"\r\n\x00.\r\n" + SMUGGLED + CRLF]


@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_smuggling_payloads_split_across_two_reads_at_every_edge_end_each_message_once(
        relay, scripted_backend, tap, mode):
    # Where the relay's reads end decides how it cuts the data into
    # segments, and so whether a CR, LF or dot is at a segment's edge: the
    # data is split in two reads at every offset in and around the payload
    # and in the final terminator. The relay must come out the same.
    backend = scripted_backend()
    tapped = tap(backend)
    client = start_session(start_relay(relay, tapped, mode))
    expected, sent = [], 0
    for case in SMUGGLING:
        before, payload, normalized = case.values
        data = before + payload + SMUGGLED + b"\r\n.\r\n"
        around_payload = range(max(1, len(before) - 2), len(before) + len(payload) + 3)
        for cut in [*around_payload, *range(len(data) - 7, len(data))]:
            begin_data(client, SENDER, RECIPIENT)
            send_in_separate_reads(client, tapped, [data[:cut], data[cut:]], mode)
            code, text = client.reply().tuple()
            sent += 1
            if mode == "reject" and has_bare_newline(payload):
                assert code == 554 and text.startswith(b"5.6.0 "), (case.id, cut, code, text)
            else:
                assert code == 250, (case.id, cut, code, text)
                expected.append(before + normalized + SMUGGLED + CRLF)
    client.send(b"QUIT\r\n")
    assert codes(client.replies_until_closed()) == [221]
    sessions = backend.wait_for_sessions_closed(backend.connections)
    assert [m.raw for m in backend.delivered] == expected
    assert sum(transaction_verbs(s).count(b"MAIL") for s in sessions) == sent


@pytest.mark.parametrize("tail", [b"\r\n.", b"\r\n.\r", b"\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r"],
                         ids=["CRLF.", "CRLF.CR", "CRLF", "LF.LF", "CRLF.LF", "CR.CR"])
def test_client_leaving_before_the_terminator_gets_nothing_delivered(relay, scripted_backend, tail):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))
    begin_data(client, SENDER, RECIPIENT)
    client.send(b"Subject: unfinished\r\n\r\nunfinished" + tail)
    client.sock.shutdown(socket.SHUT_WR)
    assert client.replies_until_closed() == []
    [session] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(session) == [b"MAIL", b"RCPT", b"DATA"]     # dropped: no end of data, no QUIT
    assert [m.completed for m in session.messages] == [False]
    assert backend.delivered == []


def test_cr_inside_a_command_line_gets_500_and_nothing_reaches_the_backend(relay, scripted_backend):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))
    for line in [b"MAIL FROM:<a@example.org>\rRCPT TO:<victim@example.org>",
                 b'MAIL FROM:<"a\rDATA"@example.org>', b"NOOP\r\rQUIT"]:
        assert client.say(line).code == 500, line
    client.send(b"QUIT\r\n")
    assert codes(client.replies_until_closed()) == [221]
    assert backend.connections == 0


# --- Bare newlines made CRLF, byte for byte ---------------------------------------

NORMALIZATION = [
    pytest.param(b"a\nb\r\n", b"a\r\nb\r\n", id="LF"),
    pytest.param(b"a\rb\r\n", b"a\r\nb\r\n", id="CR"),
    pytest.param(b"a\r\r\nb\r\n", b"a\r\n\r\nb\r\n", id="CR-before-CRLF"),
    pytest.param(b"a\n\nb\r\n", b"a\r\n\r\nb\r\n", id="LF-LF"),
    pytest.param(b"a\n\rb\r\n", b"a\r\n\r\nb\r\n", id="LF-CR"),
    pytest.param(b"\nx\r\n", b"\r\nx\r\n", id="LF-first"),
    pytest.param(b"x\n.y\r\n", b"x\r\n..y\r\n", id="dot-after-LF-is-stuffed"),
    pytest.param(b"x\r..y\r\n", b"x\r\n...y\r\n", id="dots-after-CR-are-stuffed"),
    pytest.param(b"x\r\n.\ny\r\n", b"x\r\n\r\ny\r\n", id="stuffed-lone-dot-ended-by-LF-is-empty"),
    pytest.param(b"x\r\n..\ny\r\n", b"x\r\n..\r\ny\r\n", id="stuffed-dot-ended-by-LF-stays"),
    pytest.param(b"x\r\n.z\ny\r\n", b"x\r\n.z\r\ny\r\n", id="stuffed-dot-line-ended-by-LF"),
]


@pytest.mark.parametrize("sent, received", NORMALIZATION)
def test_bare_newlines_are_made_crlf_with_the_dots_kept_right(relay, scripted_backend, sent, received):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend, "normalize"))
    begin_data(client, SENDER, RECIPIENT)
    client.send(sent + b".\r\n")
    assert client.reply().code == 250
    [message] = backend.delivered
    assert message.raw == received
    assert_one_end_and_no_bare_newline(message.raw)
    assert message.content.split(CRLF)[:-1] == intended_lines(sent[:-2])


@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_conformant_message_passes_byte_for_byte(relay, scripted_backend, mode):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend, mode))
    data = (b"From: alice@example.org\r\nSubject: dots\r\n\r\n"
            b"..dotted\r\n...two dots\r\n..\r\n.x\r\nNUL \x00 and 8 bits \xff\xfe\r\n"
            b"\r\n \r\nend.\r\n")
    begin_data(client, SENDER, RECIPIENT)
    client.send(data + b".\r\n")
    assert client.reply().code == 250
    begin_data(client, SENDER, RECIPIENT)
    client.send(b".\r\n")       # the empty message
    assert client.reply().code == 250
    assert [m.raw for m in backend.delivered] == [data, b""]


def random_data(rng):
    """Up to 80 bytes of a, dots, CR, LF and NUL that end only at their terminator."""
    while True:
        data = bytes(rng.choice(b"a.\r\n\x00") for _ in range(rng.randrange(81)))
        if ends_only_at_its_terminator(data):
            return data


def random_writes(rng, data):
    """data and the CRLF.CRLF after it, cut at up to three random places."""
    stream = data + b"\r\n.\r\n"
    bounds = [0, *sorted(rng.sample(range(1, len(stream)), rng.randrange(4))), len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def test_random_dots_and_newlines_reach_the_backend_as_the_lines_meant(relay, scripted_backend, tap):
    rng = random.Random(5321)   # the same messages every run
    backend = scripted_backend()
    tapped = tap(backend)
    client = start_session(start_relay(relay, tapped, "normalize"))
    sent = [random_data(rng) for _ in range(100)]
    for data in sent:
        begin_data(client, SENDER, RECIPIENT)
        send_in_separate_reads(client, tapped, random_writes(rng, data))
        assert client.reply().code == 250, data
    client.send(b"QUIT\r\n")
    assert codes(client.replies_until_closed()) == [221]
    [session] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(session).count(b"MAIL") == len(sent)
    assert len(backend.delivered) == len(sent)
    for data, message in zip(sent, backend.delivered):
        assert_one_end_and_no_bare_newline(message.raw)
        assert message.content.split(CRLF)[:-1] == intended_lines(data), data


def test_random_messages_with_bare_newlines_are_refused_and_the_others_delivered_in_reject_mode(
        relay, scripted_backend, tap):
    rng = random.Random(6531)
    backend = scripted_backend()
    tapped = tap(backend)
    client = start_session(start_relay(relay, tapped, "reject"))
    # Short ones, so that some hold no CR or LF at all.
    sent = [random_data(rng)[:rng.randrange(6)] for _ in range(100)]
    sent = [data for data in sent if ends_only_at_its_terminator(data)]
    for data in sent:
        begin_data(client, SENDER, RECIPIENT)
        send_in_separate_reads(client, tapped, random_writes(rng, data), "reject")
        code, text = client.reply().tuple()
        if has_bare_newline(data + CRLF):
            assert code == 554 and text.startswith(b"5.6.0 "), (data, code, text)
        else:
            assert code == 250, (data, code, text)
    clean = [data + CRLF for data in sent if not has_bare_newline(data + CRLF)]
    assert 0 < len(clean) < len(sent)
    assert [m.raw for m in backend.delivered] == clean


# --- The terminator across reads, pipelining, long lines --------------------------

@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_terminator_split_across_reads_at_every_position_ends_the_message(relay, scripted_backend, tap, mode):
    backend = scripted_backend()
    tapped = tap(backend)
    client = start_session(start_relay(relay, tapped, mode))
    expected = []

    def deliver(writes):
        data = b"".join(writes)
        begin_data(client, SENDER, RECIPIENT)
        send_in_separate_reads(client, tapped, writes, mode)
        assert client.reply().code == 250, writes
        expected.append(data[:-3])      # all but the final ".\r\n"

    # One cut anywhere in the message.
    number = itertools.count()
    length = len(b"Subject: split %03d\r\n\r\n..dotted\r\nlast line\r\n.\r\n" % 0)
    for cut in range(1, length):
        data = b"Subject: split %03d\r\n\r\n..dotted\r\nlast line\r\n.\r\n" % next(number)
        deliver([data[:cut], data[cut:]])
    # Every way of cutting the last line's end and the terminator into reads:
    # "...e\r", "\n.", "\r\n" and the rest.
    for cuts in itertools.product([False, True], repeat=6):
        data = b"Subject: split %03d\r\n\r\nlast line\r\n.\r\n" % next(number)
        edges = [len(data) - 6 + i for i, cut in enumerate(cuts) if cut]
        bounds = [0, *edges, len(data)]
        deliver([data[a:b] for a, b in zip(bounds, bounds[1:])])
    assert [m.raw for m in backend.delivered] == expected
    assert all(m.raw.endswith(b"last line\r\n") for m in backend.delivered)


@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_cr_at_the_end_of_a_read_and_lf_at_the_start_of_the_next_are_one_crlf(relay, scripted_backend, tap, mode):
    backend = scripted_backend()
    tapped = tap(backend)
    client = start_session(start_relay(relay, tapped, mode))
    begin_data(client, SENDER, RECIPIENT)
    send_in_separate_reads(client, tapped, [b"Subject: cr\r", b"\n\r", b"\nfirst\r", b"\n.second\r", b"\n.\r", b"\n"],
                           mode)
    code, text = client.reply().tuple()
    assert code == 250, (code, text)     # a bare CR would give 554 in reject mode
    # A bare CR would have given "first\r\n\r\n" and "...second" in normalize mode.
    assert [m.raw for m in backend.delivered] == [b"Subject: cr\r\n\r\nfirst\r\n.second\r\n"]


def test_commands_pipelined_after_the_terminator_are_answered_in_order(relay, scripted_backend):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))
    begin_data(client, SENDER, RECIPIENT)
    client.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    replies = client.replies_until_closed()
    assert codes(replies) == [250, 221], replies
    assert [m.raw for m in backend.delivered] == [b"Subject: pipelined\r\n\r\nbody\r\n"]


def test_transaction_pipelined_after_the_terminator_is_a_second_message(relay, scripted_backend):
    # The same bytes as a smuggling attack, but after a real CRLF.CRLF: these are commands.
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert codes(client.reply() for _ in range(3)) == [250, 250, 354]
    client.send(b"first\r\n.\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n")
    assert codes(client.reply() for _ in range(4)) == [250, 250, 250, 354]
    client.send(b"second\r\n.\r\nQUIT\r\n")
    assert codes(client.replies_until_closed()) == [250, 221]
    [session] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(session) == [b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert [(m.mail_from, m.raw) for m in backend.delivered] == [
        (b"MAIL FROM:<a@example.org>", b"first\r\n"), (b"MAIL FROM:<c@example.org>", b"second\r\n")]


LONG = bytes(range(0x21, 0x7f)) * 1064     # 100,016 bytes: no CR, no LF, dots inside
PART = 65536    # what the relay passes on of a line without LF (LONG_LINE_PART), and holds back below


def test_100_kb_data_line_passes_intact(relay, scripted_backend):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))
    data = b"Subject: long\r\n\r\n" + LONG + b"\r\n.." + LONG + b"\r\nend\r\n"
    begin_data(client, SENDER, RECIPIENT)
    client.send(data + b".\r\n")
    assert client.reply().code == 250
    [message] = backend.delivered
    assert len(message.raw) == len(data) and message.raw == data


# A long line is passed on in parts once the relay holds PART bytes of it;
# a line's first PART bytes sent alone are therefore passed on alone (the
# relay keeps back a CR at the end until it sees whether LF follows), and
# the tap shows when. Each case: first write (PART bytes), the rest, and what
# the back-end must get.
LONG_LINE_EDGES = [
    pytest.param(b"x" * (PART - 1) + b"\r", b"\n.\r\n", b"x" * (PART - 1) + b"\r\n", id="CR-then-LF.CRLF"),
    pytest.param(b"." + b"x" * (PART - 2) + b"\r", b"\nend\r\n.\r\n", b"." + b"x" * (PART - 2) + b"\r\nend\r\n",
                 id="stuffed-dot-line-CR-then-LF"),
    pytest.param(b"x" * (PART - 1) + b"\r", b"\r.\r\n.\r\n", b"x" * (PART - 1) + b"\r\n\r\n..\r\n", id="CR-then-CR."),
    pytest.param(b"x" * PART, b".\r\n.\r\n", b"x" * PART + b".\r\n", id="dot-CRLF-mid-line"),
    pytest.param(b"x" * PART, b"\n.y" + b"x" * 30000 + b"\r\n.\r\n", b"x" * PART + b"\r\n..y" + b"x" * 30000 + b"\r\n",
                 id="bare-LF-dot-mid-line"),
]


@pytest.mark.parametrize("first, rest, received", LONG_LINE_EDGES)
def test_long_line_passed_on_in_parts_keeps_its_line_ends_and_dots_right(
        relay, scripted_backend, tap, first, rest, received):
    backend = scripted_backend()
    tapped = tap(backend)
    client = start_session(start_relay(relay, tapped))
    begin_data(client, SENDER, RECIPIENT)
    start = tapped.sent
    client.send(first)
    tapped.wait(sent=start + len(first.rstrip(b"\r")))
    client.send(rest)
    assert client.reply().code == 250
    [message] = backend.delivered
    assert len(message.raw) == len(received) and message.raw == received
    assert_one_end_and_no_bare_newline(message.raw)


# --- Junk ---------------------------------------------------------------------------

JUNK = [b"\x00", b"\xff\xfe\xfd\xfc", b"GET / HTTP/1.1", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"MAIL\x00FROM:<a@example.org>", b"\x1b[2J\x7f"]


def test_binary_garbage_commands_get_500_until_max_errors_then_421_and_close(relay, scripted_backend):
    backend = scripted_backend()
    client = greeted(start_relay(relay, backend), nodelay=True)
    for junk in JUNK[:4]:
        assert client.say(junk).code == 500, junk
    client.send(JUNK[4] + CRLF)         # the fifth error, --max-errors' default
    replies = client.replies_until_closed()
    assert codes(replies) == [500, 421], replies
    assert replies[1].lines[0].startswith("4.7.0 ")
    assert backend.connections == 0


def test_nul_bytes_in_commands_get_500_and_the_session_goes_on(relay, scripted_backend):
    backend = scripted_backend()
    client = start_session(start_relay(relay, backend))
    for line in [b"\x00", b"NOOP\x00", b"MAIL FROM:<a@example.org>\x00", b"EHLO a\x00b"]:
        assert client.say(line).code == 500, line
    assert client.say(b"NOOP").code == 250
    begin_data(client, SENDER, RECIPIENT)      # the NUL MAIL was not taken: this MAIL is not nested
    client.send(b"ok\r\n.\r\nQUIT\r\n")
    assert codes(client.replies_until_closed()) == [250, 221]
    [session] = backend.wait_for_sessions_closed(1)
    assert transaction_verbs(session) == [b"MAIL", b"RCPT", b"DATA", b"QUIT"]


def test_burst_of_bad_commands_is_cut_off_and_the_relay_serves_the_next_client(relay, scripted_backend):
    backend = scripted_backend()
    proxy = start_relay(relay, backend)
    hostile = greeted(proxy, nodelay=True)
    burst = b"".join(JUNK[i % len(JUNK)] + b" %d\r\n" % i for i in range(20000)) * 10    # 3.5 MB

    def flood():
        try:
            hostile.send(burst)
        except OSError:     # the relay closed on us, as it should
            pass

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        replies = hostile.replies_until_closed()
    finally:
        flooder.join(timeout=30)
    assert not flooder.is_alive()
    assert codes(replies) == [500] * 5 + [421], replies
    with proxy.smtp() as client:
        assert client.sendmail("a@example.org", ["b@example.org"], b"Subject: next\r\n\r\nhi\r\n") == {}
    assert [m.raw for m in backend.delivered] == [b"Subject: next\r\n\r\nhi\r\n"]


def test_second_client_is_served_while_a_hostile_client_sends_an_endless_line(relay, scripted_backend):
    backend = scripted_backend()
    proxy = start_relay(relay, backend)
    hostile = start_session(proxy)
    hostile.send(b"\xff\x00garbage" * 100000)    # 1 MB and no line end yet
    with proxy.smtp() as client:
        assert client.sendmail("a@example.org", ["b@example.org"], b"Subject: meanwhile\r\n\r\nhi\r\n") == {}
    assert [m.raw for m in backend.delivered] == [b"Subject: meanwhile\r\n\r\nhi\r\n"]
    # The hostile session stayed in step: its line is refused once it ends, and it goes on.
    code, text = hostile.say(b"").tuple()
    assert code == 500 and text.startswith(b"5.5.6 "), (code, text)
    assert hostile.say(b"NOOP").code == 250
    assert hostile.say(b"QUIT").code == 221


# --- A 200 MB message ------------------------------------------------------------------

BIG_LINE = b"x" * 1022 + CRLF      # 1 KiB
BIG_CHUNKS = 200                    # of 1 MiB each


def big_chunk(number):
    """The number-th MiB of the message: 1,024 lines of 1 KiB, the first naming the chunk."""
    return (b"chunk %06d " % number).ljust(1022, b"-") + CRLF + BIG_LINE * 1023


def test_200_mb_message_streams_through_the_relay_to_smtp_sink_in_bounded_memory(relay, smtp_sink):
    # smtp-sink writes its dump to disk (the fixture always passes -d); the
    # dump's size is checked, never its content read into memory.
    sink = smtp_sink()
    proxy = relay("--backend", sink.address, "--no-xclient")     # smtp-sink's XCLIENT has no ADDR
    client = greeted(proxy, timeout=120, ehlo="client.example", nodelay=True)
    begin_data(client, SENDER, RECIPIENT)
    started = time.monotonic()
    header = b"Subject: 200 MB\r\n\r\n"
    client.send(header)
    sent, lines = len(header), 2
    for number in range(BIG_CHUNKS):
        chunk = big_chunk(number)
        client.send(chunk)
        sent, lines = sent + len(chunk), lines + chunk.count(CRLF)
    client.send(b".\r\n")
    code, text = client.reply().tuple()
    elapsed = time.monotonic() - started
    peak_kb = proxy.peak_rss_kb()
    print(f"200 MB message: {sent} bytes in {elapsed:.2f}s, relay peak RSS {peak_kb} kB")
    assert code == 250, (code, text)
    assert peak_kb < 64 * 1024, f"relay peak RSS {peak_kb} kB for a {sent}-byte message"
    assert client.say(b"QUIT").code == 221

    # The dump: smtp-sink's header, the message with LF line ends, one empty line.
    [dump] = sink.dumpdir.glob("msg.*")
    with open(dump, "rb") as f:
        start = f.read(4096)
        f.seek(-2048, 2)
        tail = f.read()
    start = start[:start.rindex(b"\n") + 1]
    header_size = len(start) - len(parse_sink_dump(start).body) - 1
    assert start[header_size:].startswith(b"Subject: 200 MB\n\nchunk 000000 ---")
    assert dump.stat().st_size == header_size + sent - lines + 1
    assert tail.endswith(b"\n" + BIG_LINE[:-2] + b"\n\n")
