"""Pipelining to the back-end (RFC 2920): a group the client pipelines (MAIL, RCPT..., DATA) goes to a
back-end that offers PIPELINING in one write, and changes nothing but time.

The proof is a property test: for the same client input and a back-end that answers each command
by what it says (ModelBackend: the sender's, each recipient's and the message's own words decide
the reply, a 421, a dropped connection or a silence among them), the relay in front of a back-end
that offers PIPELINING gives the client the same replies, and the back-end the same messages, as
the relay in front of the same back-end without it, which sends one command at a time.
"""
import itertools
import re
import smtplib
import socket
import socketserver
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ConnectionClosed, SMTPClient, wait_until
from postfix_fixture import postfix  # noqa: F401  (fixture)
from scripted_backend import ThreadingServer

# "denied": a recipient --allow-recipient refuses, which the back-end would take: it must never get it.
KINDS = {"ok": "250 2.0.0 Ok", "denied": "250 2.0.0 Ok", "tmp": "451 4.3.0 Try later", "bad": "550 5.7.1 No",
         "close": "421 4.3.2 Closing", "drop": None, "mute": None}


class ModelHandler(socketserver.StreamRequestHandler):
    """One back-end session of ModelBackend: a reply for each command by its own words."""

    timeout = 30

    def handle(self):
        model, write = self.server.model, self.wfile.write
        mail, rcpts = None, []
        try:
            write(b"220 model ESMTP\r\n")
            while line := self.rfile.readline(4096):
                verb = line[:4].upper()
                if verb == b"EHLO":
                    write(b"250-model\r\n" + (b"250-PIPELINING\r\n" if model.pipelining else b"") + b"250 8BITMIME\r\n")
                    continue
                if verb in (b"MAIL", b"RCPT"):
                    address = re.search(rb"<([^>]*)>", line)[1].decode()
                    if verb == b"RCPT" and mail is None:
                        write(b"503 5.5.1 Need MAIL\r\n")
                        continue
                    if verb == b"MAIL" and mail is not None:
                        write(b"503 5.5.1 Nested MAIL\r\n")
                        continue
                    reply = self.answer(address.split("-", 1)[0])
                    if reply.startswith("250"):
                        if verb == b"MAIL":
                            mail = address
                        else:
                            rcpts.append(address)
                elif verb == b"DATA":
                    if mail is None or not rcpts:
                        write(b"554 5.5.1 No valid recipients\r\n" if mail else b"503 5.5.1 Need MAIL\r\n")
                        continue
                    write(b"354 Go ahead\r\n")
                    body = b""
                    while (part := self.rfile.readline(100000)) != b".\r\n":
                        if not part:
                            return
                        body += part
                    reply = self.answer(re.search(rb"X-End: (\w+)", body)[1].decode())
                    if reply.startswith("250"):
                        with model.lock:
                            model.delivered.append((mail, tuple(rcpts), body))
                    mail, rcpts = None, []
                elif verb == b"RSET":
                    mail, rcpts, reply = None, [], "250 2.0.0 Ok"
                elif verb == b"QUIT":
                    write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    reply = "250 2.0.0 Ok" if verb == b"NOOP" else "502 5.5.2 Unknown"
                write(reply.encode() + b"\r\n")
                if reply.startswith("421"):
                    return
        except (ConnectionError, _Stop):
            pass

    def answer(self, kind):
        """The reply a word asks for; raises _Stop for a dropped connection, waits out a silence."""
        if kind == "drop":
            raise _Stop()
        if kind == "mute":
            self.server.model.stopping.wait(self.timeout)
            raise _Stop()
        return KINDS[kind]


class _Stop(Exception):
    pass


class ModelBackend:
    """The model back-end on 127.0.0.1, offering PIPELINING or not; .delivered: (mail, rcpts, body)."""

    def __init__(self, pipelining):
        self.pipelining, self.delivered, self.lock = pipelining, [], threading.Lock()
        self.stopping = threading.Event()
        self.server = ThreadingServer(("127.0.0.1", 0), ModelHandler)
        self.server.model = self
        self.address = "%s:%d" % self.server.server_address
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def converse(relay, transactions, tag):
    """One client session: each transaction's MAIL, RCPTs and DATA in one write, then the message
    where DATA got 354 -> every reply line the client got, and "closed" where the relay closed."""
    sock = socket.create_connection((relay.host, relay.port), timeout=20)
    said = []

    def hear(count):
        """The next count replies into said -> the last one's code; ConnectionClosed where the relay closed."""
        for _ in range(count):
            reply = client.reply()
            said.append(f"{reply.code} {reply.text}")
        return reply.code

    try:
        client = SMTPClient(sock)
        hear(1)
        client.send(b"EHLO client.example\r\n")
        hear(1)
        for t, (sender, rcpts, end) in enumerate(transactions):
            group = [f"MAIL FROM:<{sender}-{tag}-{t}@example.org>"]
            group += [f"RCPT TO:<{rcpt}-{tag}-{t}-{i}@example.net>" for i, rcpt in enumerate(rcpts)]
            client.send(("".join(line + "\r\n" for line in group) + "DATA\r\n").encode())
            if hear(len(group) + 1) == 354:
                client.send(f"Subject: {tag}-{t}\r\nX-End: {end}\r\n\r\nbody\r\n.\r\n".encode())
                hear(1)
        client.send(b"QUIT\r\n")
        hear(1)
    except ConnectionClosed:
        said.append("closed")
    finally:
        sock.close()
    return said


kind = st.sampled_from(["ok", "ok", "ok", "tmp", "bad", "close", "drop", "mute"])
transaction = st.tuples(kind, st.lists(kind | st.just("denied"), min_size=1, max_size=4), kind)
SLOW = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
tags = itertools.count()


def test_pipelining_to_the_back_end_changes_no_reply_and_no_message(relay):
    models = {name: ModelBackend(pipelining) for name, pipelining in (("pipelined", True), ("one by one", False))}
    # At most 3 recipients, and never a "denied" one: the relay's own refusals inside a group.
    relays = {name: relay("--backend", model.address, "--no-xclient", "--proxy-timeout", "0.5",
                          "--data-timeout", "0.5", "--resolve", "off", "--max-recipients", "3",
                          "--allow-recipient", "(?!denied).*", kill=True)
              for name, model in models.items()}
    try:
        @SLOW
        @given(st.lists(transaction, min_size=1, max_size=3))
        def same(transactions):
            tag = next(tags)
            said = {name: converse(relays[name], transactions, f"{name[0]}{tag}") for name in relays}
            assert said["pipelined"] == said["one by one"], transactions

            def delivered(name):
                with models[name].lock:
                    return [(re.sub(r"-\w\d+-", "-", m), tuple(re.sub(r"-\w\d+-", "-", r) for r in rs),
                             re.sub(rb"\w\d+-(\d)", rb"\1", b)) for m, rs, b in models[name].delivered
                            if f"-{name[0]}{tag}-" in m]
            assert delivered("pipelined") == delivered("one by one"), transactions
        same()
    finally:
        for model in models.values():
            model.stop()


class Holding(socketserver.StreamRequestHandler):
    """A back-end that answers nothing until it holds MAIL, two RCPTs and DATA (server.got gets
    them): the relay that waited for each reply in turn would time out."""

    timeout = 30

    def handle(self):
        self.wfile.write(b"220 holding ESMTP\r\n")
        assert self.rfile.readline().upper().startswith(b"EHLO")
        self.wfile.write(b"250-holding\r\n250 PIPELINING\r\n")
        lines = [self.rfile.readline() for _ in range(4)]
        self.server.got.append(lines)
        self.wfile.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 Go ahead\r\n")
        while self.rfile.readline() not in (b".\r\n", b""):
            pass
        self.wfile.write(b"250 2.0.0 Ok: queued\r\n")
        if self.rfile.readline():
            self.wfile.write(b"221 2.0.0 Bye\r\n")


def holding_backend():
    """A Holding back-end on 127.0.0.1, serving -> (server, "HOST:PORT"); server.got: the groups it held."""
    server = ThreadingServer(("127.0.0.1", 0), Holding)
    server.got = []
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, "%s:%d" % server.server_address


def test_a_pipelined_group_reaches_the_back_end_in_one_write_before_any_reply(relay):
    server, address = holding_backend()
    try:
        r = relay("--backend", address, "--no-xclient", "--proxy-timeout", "3",
                  "--resolve", "off")
        client = SMTPClient(r.connect())
        assert client.reply().code == 220
        assert client.say("EHLO client.example").code == 250
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        assert [client.reply().code for _ in range(4)] == [250, 250, 250, 354]
        client.send(b"Subject: one write\r\n\r\nhello\r\n.\r\n")
        assert client.reply().code == 250
        wait_until(lambda: server.got, what="the back-end's four lines")
        assert [line.split(b":")[0].split()[0] for line in server.got[0]] == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_postfix_client_pipelines_through_the_relay_to_a_back_end_that_needs_it(relay, postfix):
    # Postfix's smtp(8) sends MAIL, RCPT, RCPT and DATA in one write where PIPELINING is
    # offered; the Holding back-end answers only a whole group: the message gets through
    # only if both hops pipeline.
    server, address = holding_backend()
    try:
        r = relay("--backend", address, "--no-xclient", "--proxy-timeout", "3", "--resolve", "off")
        sender = postfix(xclient_hosts="", main_cf=[f"relayhost = [{r.host}]:{r.port}", "defer_transports ="])
        with smtplib.SMTP(sender.host, sender.port, timeout=10) as submit:
            assert submit.sendmail("a@example.org", ["b@example.net", "c@example.net"],
                                   b"Subject: through Postfix\r\n\r\nhello\r\n") == {}
        sender.wait_for_log(r"postfix/smtp\[\d+\]: .*to=<c@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                            r".*status=sent \(250 2\.0\.0 Ok: queued\)", timeout=20)
        assert [line.split(b":")[0].split()[0] for line in server.got[0]] == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_pooled_connection_that_dies_under_a_pipelined_group_is_replaced_and_the_group_sent_again_once(
        relay, scripted_backend):
    # The pooled connection's second MAIL gets 421 (the back-end's idle timeout, said when the
    # relay next speaks), the RCPT and DATA behind it already sent: the group goes again, whole,
    # on a new connection, and each message is delivered once.
    backend = scripted_backend(replies={"MAIL": ["250 2.1.0 Ok", "421 4.4.2 idle too long", "250 2.1.0 Ok"]})
    r = relay("--backend", backend.address, "--no-xclient", "--resolve", "off")
    for n in range(2):
        client = SMTPClient(r.connect())
        assert client.reply().code == 220
        assert client.say("EHLO client.example").code == 250
        client.send(f"MAIL FROM:<a{n}@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n".encode())
        assert [client.reply().code for _ in range(3)] == [250, 250, 354]
        client.send(f"Subject: {n}\r\n\r\nhello\r\n.\r\n".encode())
        assert client.reply().code == 250
        assert client.say("QUIT").code == 221
    assert [m.mail_from for m in backend.delivered] == [b"MAIL FROM:<a0@example.org>", b"MAIL FROM:<a1@example.org>"]
    assert len(backend.sessions) == 2
    assert backend.sessions[0].commands[-1] == b"MAIL FROM:<a1@example.org>"     # answered 421, then closed
    second = backend.sessions[1]
    assert [c.split(b":")[0].upper() for c in second.commands[1:4]] == [b"MAIL FROM", b"RCPT TO", b"DATA"]


def test_a_group_through_xclient_to_a_real_postfix_gets_each_reply_and_queues_for_the_accepted_only(
        relay, postfix):
    pf = postfix(mynetworks="127.0.0.1/32", main_cf=["relay_domains = example.net"])
    r = relay("--backend", pf.address)
    client = SMTPClient(r.connect(source="127.0.0.2"))
    assert client.reply().code == 220
    assert client.say("EHLO client.example").code == 250
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@outside.example>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    replies = [client.reply() for _ in range(4)]
    assert [r.code for r in replies] == [250, 554, 250, 354], replies       # 127.0.0.2 may not relay outside
    client.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\n")
    assert client.reply().code == 250
    assert client.say("QUIT").code == 221
    [message] = pf.wait_for_queue(1)
    assert [rcpt["address"] for rcpt in message["recipients"]] == ["b@example.net"]
    assert pf.client_of(message["queue_id"]) == "unknown[127.0.0.2]"
