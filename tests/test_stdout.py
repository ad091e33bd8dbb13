"""--backend stdout: each accepted message printed whole to standard output, after its envelope."""
import hashlib
import itertools
import re
import threading

import pytest

from helpers import begin_data, greeted, run_relay, send_message
from test_hostile import BIG_CHUNKS, big_chunk

START = b"---------- MESSAGE FOLLOWS ----------\n"
END = b"------------ END MESSAGE ------------\n"


@pytest.fixture
def stdout_relay(relay, tmp_path):
    """start(*args) -> the `relay` fixture's relay with --backend stdout: and its standard output
    to the file .out_path; .printed() is what it printed so far (the log, stderr, is in .lines)."""
    numbers = itertools.count()

    def start(*args):
        out_path = tmp_path / f"stdout-{next(numbers)}"
        with open(out_path, "wb") as out:
            r = relay("--backend", "stdout:", *args, stdout=out)
        r.out_path, r.printed = out_path, out_path.read_bytes
        return r

    return start


def blocks(printed):
    """The printed messages -> [(envelope {name: value}, message bytes)]; asserts the framing."""
    found = []
    rest = printed
    while rest:
        assert rest.startswith(START), rest[:200]
        head, _, rest = rest[len(START):].partition(b"\n\n")
        envelope = dict(line.decode().split(": ", 1) for line in head.split(b"\n"))
        end = rest.index(END)
        found.append((envelope, rest[:end]))
        rest = rest[end + len(END):]
    return found


def stuffed(message):
    return re.sub(rb"(?m)^\.", b"..", message)


def test_messages_from_sessions_at_once_print_whole_one_after_another_with_their_envelopes(stdout_relay):
    relay = stdout_relay()
    sent, replies, lock = {}, {}, threading.Lock()

    def client(n):
        c = greeted(relay, ehlo=f"client{n}.example")
        for m in range(3):
            body = (f"Subject: {n}-{m}\r\n\r\n".encode()
                    + b"".join(b".leading dot %d\r\nline %d of %d-%d\r\n" % (i, i, n, m) for i in range(200)))
            reply = send_message(c, stuffed(body), sender=f"s{n}@example.org", recipient=f"r{n}-{m}@example.net")
            with lock:
                sent[f"{n}-{m}"], replies[f"{n}-{m}"] = (body, n), reply
        assert c.say("QUIT").code == 221

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(replies) == 18
    for reply in replies.values():
        assert reply.code == 250 and reply.lines[0].startswith("2.0.0 Ok: printed as ")
    printed = blocks(relay.printed())      # each 250 came after its message was flushed
    assert len(printed) == 18
    for envelope, message in printed:
        key = message.split(b"\r\n", 1)[0].removeprefix(b"Subject: ").decode()
        body, n = sent[key]
        assert message == body                      # unstuffed, byte for byte
        assert envelope["X-Envelope-From"] == f"<s{n}@example.org>"
        assert envelope["X-Envelope-To"] == f"<r{key}@example.net>"
        assert re.fullmatch(rf"127\.0\.0\.1:\d+ HELO client{n}\.example", envelope["X-Peer"])
        assert replies[key].lines[0] == f"2.0.0 Ok: printed as {envelope['X-Smtprelay-Id']}"
    assert len({e["X-Smtprelay-Id"] for e, _ in printed}) == 18
    assert not [line for line in relay.lines if "MESSAGE FOLLOWS" in line]     # the log stays on stderr


def test_a_client_stalled_mid_message_holds_up_no_other_and_an_abandoned_message_never_prints(stdout_relay):
    relay = stdout_relay()
    stalled = greeted(relay, ehlo="stalled.example")
    begin_data(stalled)
    stalled.send(b"Subject: half\r\n\r\nthe first half\r\n")
    other = greeted(relay, ehlo="other.example")
    assert send_message(other, b"Subject: whole\r\n\r\nall of it\r\n").code == 250
    [(envelope, message)] = blocks(relay.printed())
    assert message == b"Subject: whole\r\n\r\nall of it\r\n"
    stalled.sock.close()                            # gone mid-DATA
    relay.wait_for_log(r"client lost during DATA after \d+ bytes; message abandoned")
    assert other.say("QUIT").code == 221
    assert len(blocks(relay.printed())) == 1


def test_a_200_mb_message_prints_whole_in_bounded_memory(stdout_relay):
    relay = stdout_relay()
    client = greeted(relay, timeout=120, ehlo="client.example", nodelay=True)
    begin_data(client)
    digest = hashlib.sha256()
    header = b"Subject: 200 MB\r\n\r\n"
    client.send(header)
    digest.update(header)
    for number in range(BIG_CHUNKS):
        chunk = big_chunk(number)
        client.send(chunk)
        digest.update(chunk)
    client.send(b".\r\n")
    assert client.reply().code == 250
    peak_kb = relay.peak_rss_kb()
    assert peak_kb < 64 * 1024, f"relay peak RSS {peak_kb} kB for a 200 MB message"
    with open(relay.out_path, "rb") as out:
        assert out.read(len(START)) == START
        while out.read(1) != b"\n" or out.read(1) != b"\n":     # the envelope, up to its blank line
            pass
        printed = hashlib.sha256()
        size = relay.out_path.stat().st_size - out.tell() - len(END)
        while size > 0:
            chunk = out.read(min(size, 1 << 20))
            printed.update(chunk)
            size -= len(chunk)
        assert out.read() == END
    assert printed.hexdigest() == digest.hexdigest()


def test_stdout_is_refused_with_inetd_whose_stdout_is_the_client():
    result = run_relay("--inetd", "--backend", "stdout:", "--check-config")
    assert result.returncode == 1      # --check-config: 1 for a bad configuration
    assert "stdout: cannot be used with --inetd" in result.stderr


def test_stdout_takes_nothing_after_the_colon():
    result = run_relay("--backend", "stdout:/tmp/x", "--check-config")
    assert result.returncode == 1      # --check-config: 1 for a bad configuration
    assert "stdout: takes nothing after the colon" in result.stderr
