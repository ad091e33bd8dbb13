"""ScriptedBackend: a tiny SMTP server on 127.0.0.1 whose replies and failures a test scripts.

It records every session byte-exactly and enforces no command order: it answers
each command with the scripted (or default) reply. Optionally it speaks TLS
(implicit, or STARTTLS) and runs real AUTH PLAIN/LOGIN exchanges, for the
relay's --backend-tls and --backend-auth.
"""
import base64
import binascii
import itertools
import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

DEFAULT_EXTENSIONS = ["PIPELINING", "SIZE 100000000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                      "XCLIENT NAME ADDR PORT PROTO HELO LOGIN"]
DEFAULT_REPLIES = {
    "HELO": "250 scripted",
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "RSET": "250 2.0.0 Ok",
    "NOOP": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
    "XCLIENT": "220 scripted ESMTP",  # Postfix greets again after XCLIENT
}
UNKNOWN_REPLY = "502 5.5.2 Error: command not recognized"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_queue_ids = itertools.count(1)


@dataclass
class Message:
    """One DATA transfer. `raw` is exactly the bytes received after the 354 reply up to
    (excluding) the final ".\\r\\n" line: dot-stuffing intact, the CRLF ending the
    last line included, b"" for an empty message. `completed`: the terminator was
    seen and a 2xx reply sent (`reply`)."""
    mail_from: bytes | None
    rcpt_to: list[bytes]  # RCPT lines that got a 2xx reply in this transaction
    raw: bytes = b""
    completed: bool = False
    reply: str | None = None
    received: bool = False      # the terminator arrived (set before any reply to it, delayed or not)

    @property
    def content(self):
        """`raw` without dot-stuffing (the first "." of each line starting with one removed)."""
        return re.sub(rb"(?:^|(?<=\r\n))\.", b"", self.raw)


@dataclass
class Auth:
    """One AUTH exchange (with ScriptedBackend(auth=...)): what the client sent."""
    mechanism: str          # "PLAIN" or "LOGIN"
    user: str
    password: str
    tls: bool               # the connection was TLS at the time
    accepted: bool          # the credentials matched, 235 was sent


@dataclass
class Session:
    """One connection: raw command lines (CRLF removed), the last XCLIENT line, messages.

    tls_version: the TLS version once TLS is up (implicit or after STARTTLS),
    else None; auths: the AUTH exchanges run (only with ScriptedBackend(auth=...)).
    """
    peer: tuple
    commands: list[bytes] = field(default_factory=list)
    xclient: bytes | None = None
    messages: list[Message] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    reply_counts: dict = field(default_factory=dict, repr=False)
    tls_version: str | None = None
    auths: list[Auth] = field(default_factory=list)
    flooded: int = 0        # bytes of flood lines sent (ScriptedBackend(flood=...))
    proxy_header: bytes | None = None   # the PROXY header read first (ScriptedBackend(proxy_protocol=True))

    @property
    def tls(self):
        return self.tls_version is not None


def _line(text):
    return ("\r\n".join(text.splitlines()) + "\r\n").encode()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        backend = self.server.backend
        session = backend._open_session(self.request, self.client_address)
        if session is None:
            return
        self.backend, self.session, self.buf = backend, session, bytearray()
        try:
            self.request.settimeout(backend.read_timeout)   # bounds a TLS handshake too
            if backend.proxy_protocol:
                session.proxy_header = self.read_proxy_header()
            if backend.tls_context:
                self.start_tls(backend.tls_context)
            self.converse()
        except (EOFError, OSError):  # peer gone, reset or read timeout
            pass
        finally:
            self.request.close()
            backend._close_session(self.request, session)

    def receive_exactly(self, count):
        """count bytes from the socket itself, never more: what follows (a TLS handshake) stays there."""
        data = b""
        while len(data) < count:
            chunk = self.request.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def read_proxy_header(self):
        """The PROXY header (v1 line or v2 binary, haproxy's proxy-protocol.txt), raw, as it came."""
        header = self.receive_exactly(5)        # "PROXY UNKNOWN\r\n" is 15 bytes, v2's head 16
        if header == PROXY_V2_SIGNATURE[:5]:
            header += self.receive_exactly(11)
            return header + self.receive_exactly(int.from_bytes(header[14:16], "big"))
        while not header.endswith(b"\r\n") and len(header) < 107:
            header += self.receive_exactly(1)
        return header

    def start_tls(self, context):
        """Run the server side of a TLS handshake; a failure raises (an OSError) and ends the session."""
        raw = self.request
        self.request = context.wrap_socket(raw, server_side=True)
        self.backend._replace_live(raw, self.request)
        self.session.tls_version = self.request.version()

    def authenticate(self, line):
        """Run one AUTH PLAIN or LOGIN exchange (RFC 4954) -> the final reply."""
        words = line.decode("ascii", "replace").split()
        mechanism = words[1].upper() if len(words) > 1 else ""
        if mechanism not in self.backend.auth_mechanisms or mechanism not in ("PLAIN", "LOGIN"):
            return "504 5.5.4 Unrecognized authentication type"
        initial = words[2] if len(words) > 2 else None
        try:
            if mechanism == "PLAIN":
                response = self.decode(initial if initial is not None else self.challenge(""))
                _, user, password = response.split("\0", 2)
            else:
                user = self.decode(initial if initial is not None else self.challenge("VXNlcm5hbWU6"))
                password = self.decode(self.challenge("UGFzc3dvcmQ6"))
        except ValueError:
            return "501 5.5.2 Bad AUTH response"
        accepted = self.backend.auth.get(user) == password
        self.session.auths.append(Auth(mechanism, user, password, self.session.tls, accepted))
        return "235 2.7.0 Authentication successful" if accepted else "535 5.7.8 Authentication credentials invalid"

    def challenge(self, text):
        self.send(f"334 {text}")
        line = self.readline()
        self.session.commands.append(line)
        return line.decode("ascii", "replace")

    @staticmethod
    def decode(text):
        try:
            return base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ValueError(e) from None

    def act(self, verb):
        """Carry out actions[verb]; True if the session must end now."""
        action = self.backend.actions.get(verb)
        if action == "hang":
            self.backend._stopping.wait(self.backend.read_timeout)
        return action in ("drop", "hang")

    def pause(self, verb):
        """Wait delays[verb] seconds before replying; EOFError if stop() comes first."""
        seconds = self.backend.delays.get(verb)
        if seconds and self.backend._stopping.wait(seconds):
            raise EOFError

    def send(self, reply, verb=None):
        """Send a reply (the one to `verb`, as trickle and flood have it); True if it closes the session (421)."""
        backend = self.backend
        if verb in backend.flood:
            self.send_flood()
        data = _line(reply)
        step, interval = backend.trickle.get(verb, (None, 0))
        if step is None:
            self.request.sendall(data)
        else:
            pieces = (data.splitlines(keepends=True) if step == "line"
                      else [data[i:i + step] for i in range(0, len(data), step)])
            for n, piece in enumerate(pieces):
                if n and backend._stopping.wait(interval):
                    raise EOFError
                self.request.sendall(piece)
        return reply.startswith("421")

    def send_flood(self):
        """Endless "250-" continuation lines, as fast as the peer takes them, until it goes or stop()."""
        batch = b"".join(b"250-flood line %06d %s\r\n" % (n, b"x" * 40) for n in range(100))
        while not self.backend._stopping.is_set():
            self.request.sendall(batch)     # an OSError (peer gone) or a timeout ends the session
            self.session.flooded += len(batch)
        raise EOFError

    def recv(self):
        chunk = self.request.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def readline(self):
        while (end := self.buf.find(b"\n")) < 0:
            self.recv()
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def read_data(self, message):
        """Read up to CRLF.CRLF (or a leading .CRLF) into message.raw; False if dropped."""
        limit, scan, end = self.backend.drop_after_data_bytes, 0, None
        try:
            while end is None:
                if self.buf[:3] == b".\r\n":
                    end = 0
                elif (crlf := self.buf.find(b"\r\n.\r\n", scan)) >= 0:
                    end = crlf + 2
                elif limit is not None and len(self.buf) >= limit:
                    return False
                else:
                    scan = max(0, len(self.buf) - 4)
                    self.recv()
        finally:
            message.raw = bytes(self.buf[:end])  # all of it if unterminated
        del self.buf[:end + 3]
        self.backend._received(message)
        return True

    def converse(self):
        backend, session = self.backend, self.session
        if self.act("CONNECT") or self.send(backend.greeting):
            return
        transaction = None  # (MAIL line, accepted RCPT lines)
        while True:
            line = self.readline()
            session.commands.append(line)
            verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
            if self.act(verb):
                return
            if verb == "STARTTLS" and backend.starttls_context and not session.tls:
                self.send("220 2.0.0 Ready to start TLS")
                self.buf.clear()        # RFC 3207 §4.2: nothing sent in clear is kept
                transaction = None
                self.start_tls(backend.starttls_context)
                continue
            if verb == "AUTH" and backend.auth is not None:
                if self.send(self.authenticate(line)):
                    return
                continue
            self.pause(verb)
            reply = backend.reply_for(verb, session)
            if verb in ("EHLO", "HELO", "RSET", "XCLIENT"):
                transaction = None
            if verb == "XCLIENT":
                session.xclient = line
            elif verb == "MAIL" and reply.startswith("2"):
                transaction = (line, [])
            elif verb == "RCPT" and reply.startswith("2") and transaction:
                transaction[1].append(line)
            elif verb == "DATA" and reply.startswith("354"):
                mail_from, rcpt_to = transaction or (None, [])
                message = Message(mail_from, rcpt_to)
                session.messages.append(message)
                transaction = None
                if self.send(reply, verb) or not self.read_data(message) or self.act("."):
                    return
                self.pause(".")
                reply = message.reply = backend.reply_for(".", session)
                message.completed = reply.startswith("2")
                verb = "."
            if self.send(reply, verb) or verb == "QUIT":
                return


class ThreadingServer(socketserver.ThreadingTCPServer):
    """A TCP server with a daemon thread per connection, its port reusable at once."""
    daemon_threads = True
    allow_reuse_address = True


class ScriptedBackend:
    """A scripted SMTP server on 127.0.0.1:<port 0>, serving from construction until stop().

    greeting: first reply ("421 ..." closes the connection after it).
    extensions: EHLO keywords. replies: {VERB: reply or [reply, ...]} overrides
    (VERB upper-case, "." = reply to end of data; a list is used in turn per
    session, its last entry repeating; "250-a\\r\\n250 b" is multi-line); any
    421 reply closes the connection. actions: {VERB: "drop" | "hang"} closes
    without reply / never replies (until stop() or read_timeout), VERB may be
    "CONNECT" (instead of greeting) or "." (after end of data).
    drop_after_data_bytes: close once that many message bytes arrived.
    read_timeout: per-read socket timeout, so a session never lives forever.
    Faults in time and size (VERB as for replies, "." included):
    delays: {VERB: seconds} waits that long before replying (stop() ends the
    wait and the session). trickle: {VERB: (step, interval)} sends the reply
    `step` bytes at a time, or a line at a time for step "line", `interval`
    seconds apart. flood: VERBs whose reply is preceded by endless
    "250-flood line ..." lines, sent as fast as the peer reads them, until it
    closes (Session.flooded counts the bytes). wait_for_received(n) waits for
    n messages' terminators (Message.received).
    tls_context: a server-side ssl.SSLContext: implicit TLS, the handshake
    before the greeting. starttls_context: one for STARTTLS, which EHLO then
    offers until TLS is up (a failed handshake ends the session). auth:
    {user: password}: AUTH runs real PLAIN/LOGIN exchanges (mechanisms as the
    "AUTH ..." keyword of `extensions` lists them, others get 504) and is
    recorded in Session.auths; without it AUTH gets replies["AUTH"] like any verb.

    proxy_protocol: each connection starts with a PROXY header (v1 or v2), read
    before TLS and the greeting and kept raw in Session.proxy_header; without it
    a header is taken as a command, as a server that reads none would.

    Attributes: address ("127.0.0.1:PORT"), host, port, sessions (list of
    Session), connections, delivered (completed Messages of all sessions).
    """

    def __init__(self, greeting="220 scripted ESMTP", extensions=None, replies=None, actions=None,
                 drop_after_data_bytes=None, read_timeout=30, tls_context=None, starttls_context=None,
                 auth=None, delays=None, trickle=None, flood=(), proxy_protocol=False):
        self.greeting = greeting
        self.extensions = DEFAULT_EXTENSIONS if extensions is None else extensions
        self.tls_context, self.starttls_context, self.auth = tls_context, starttls_context, auth
        self.proxy_protocol = proxy_protocol
        self.auth_mechanisms = next((e.upper().split()[1:] for e in self.extensions
                                     if e.upper().startswith("AUTH ")), [])
        self.replies = {**DEFAULT_REPLIES, **(replies or {})}
        self.actions = actions or {}
        self.drop_after_data_bytes = drop_after_data_bytes
        self.read_timeout = read_timeout
        self.delays, self.trickle, self.flood = dict(delays or {}), dict(trickle or {}), set(flood)
        self.sessions = []
        self._live = set()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server = ThreadingServer(("127.0.0.1", 0), _Handler)
        self._server.backend = self
        self.host, self.port = self._server.server_address
        self.address = f"{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def reply_for(self, verb, session):
        """The reply text to `verb` in `session` (consumes one entry of a reply list)."""
        if verb == "EHLO" and "EHLO" not in self.replies:
            lines = ["scripted", *self.extensions]
            if self.starttls_context and not session.tls:
                lines.append("STARTTLS")
            return "\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}" for i, x in enumerate(lines))
        if verb == "." and "." not in self.replies:
            return f"250 2.0.0 Ok: queued as SCRIPTED{next(_queue_ids):06d}"
        reply = self.replies.get(verb, UNKNOWN_REPLY)
        if isinstance(reply, list):
            count = session.reply_counts[verb] = session.reply_counts.get(verb, 0) + 1
            reply = reply[min(count, len(reply)) - 1]
        return reply

    def _open_session(self, sock, peer):
        with self._cond:
            if self._stopping.is_set():
                return None
            session = Session(peer)
            self.sessions.append(session)
            self._live.add(sock)
            return session

    def _replace_live(self, old, new):
        """A connection's socket was wrapped for TLS: stop() must shut down the new one."""
        with self._cond:
            self._live.discard(old)
            self._live.add(new)

    def _received(self, message):
        with self._cond:
            message.received = True
            self._cond.notify_all()

    def wait_for_received(self, n=1, timeout=5):
        """The messages whose terminator arrived, once there are at least `n` (of all sessions)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(got := [m for s in self.sessions for m in s.messages if m.received]) < n:
                if not self._cond.wait(max(deadline - time.monotonic(), 0)) and time.monotonic() >= deadline:
                    raise AssertionError(f"{len(got)} message(s) received in full, wanted {n}")
            return got

    def _close_session(self, sock, session):
        with self._cond:
            self._live.discard(sock)
            session.closed.set()
            self._cond.notify_all()

    @property
    def connections(self):
        """Number of connections accepted so far."""
        with self._cond:
            return len(self.sessions)

    @property
    def delivered(self):
        """Completed messages of all sessions, in session order."""
        with self._cond:
            return [m for s in self.sessions for m in s.messages if m.completed]

    def wait_for_sessions_closed(self, n, timeout=5):
        """The closed sessions once at least `n` sessions have closed; AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(closed := [s for s in self.sessions if s.closed.is_set()]) < n:
                if not self._cond.wait(deadline - time.monotonic()):
                    raise AssertionError(f"{len(closed)} of {len(self.sessions)} sessions closed, wanted {n}")
            return closed

    def stop(self):
        """Stop accepting, wake hung sessions, end live ones and wait until all closed."""
        with self._cond:
            if self._stopping.is_set():
                return
            self._stopping.set()
            live = list(self._live)
        self._server.shutdown()
        self._server.server_close()
        for sock in live:
            try:
                # socket.socket's own shutdown: SSLSocket's would also drop its
                # TLS state under the feet of the session thread using it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        self.wait_for_sessions_closed(len(self.sessions))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
