"""A real Haraka (the Node.js mail server, from npm) as a back-end that reads the PROXY protocol.

Import the fixture into a test file with `from haraka_fixture import haraka  # noqa: F401`.

Haraka is installed once, outside the checkout, every npm package pinned by
tests/haraka/package-lock.json (.ci/run does it; --omit=optional leaves out the
optional plugins, and with them every native build):
    install -d /opt/haraka-test && cp tests/haraka/package*.json /opt/haraka-test/
    npm ci --prefix /opt/haraka-test --omit=optional --no-audit --no-fund --loglevel=error
HARAKA_TEST_PREFIX names another prefix. Each instance is one `haraka -c ROOT`
process (smtp.ini nodes=0: no cluster worker) with its own temporary ROOT:
ROOT/config (smtp.ini, connection.ini, log.ini, plugins, me), ROOT/plugins
(record_json.js, below), ROOT/messages (one JSON file per queued message),
ROOT/queue (Haraka's outbound queue, unused) and ROOT/haraka.log (its stdout
and stderr), listening on 127.0.0.1:<free port>.

What Haraka 3.3.4 does, found by experiment (tests/test_haraka_fixture.py):
- PROXY v1 only (docs/HAProxy.md: "The PROXY v2 binary header is not
  currently supported"). The hosts allowed to send it are connection.ini's
  [haproxy] hosts[] (IPs or CIDRs).
- A connection from a listed host gets no greeting until its PROXY line: the
  header is required from such a host (Haraka closes the connection with
  "421 PROXY timeout" after a fixed 30 s). After the header the greeting
  comes, and remote.ip/remote.port are the header's source.
- A PROXY v2 header from a listed host is not read: no greeting, Haraka
  spins a CPU core on the unread bytes until the 421 at 30 s.
- "PROXY UNKNOWN" (with or without addresses) is "421 Invalid PROXY format".
- A listed host may send PROXY again at any time, even after the greeting
  and EHLO: Haraka takes the new address and greets anew.
- A connection from any other host is greeted at once; a PROXY line from it
  is answered "421 PROXY not allowed from IP" and the connection closed.
- Without a lookup_rdns hook answering OK, Haraka itself asks DNS for the
  client's reverse name (dns.reverse): record_json answers it, so that no
  DNS query leaves this machine.
- smtp.ini without `nodes` forks one cluster worker (and warns): nodes=0
  keeps one process, which SIGTERM ends at once (Haraka handles only SIGINT,
  gracefully, unless it is PID 1).
"""
import base64
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import PolledLog, greets, on_a_free_port, stop_process, stopped_on_exit, wait_for_count, wait_until

PACKAGE_DIR = Path(__file__).resolve().parent / "haraka"     # package.json and package-lock.json
PINNED = json.loads((PACKAGE_DIR / "package.json").read_text())["dependencies"]["Haraka"]
PREFIX = Path(os.environ.get("HARAKA_TEST_PREFIX", "/opt/haraka-test"))
HARAKA_DIR = PREFIX / "node_modules" / "Haraka"
HARAKA_BIN = HARAKA_DIR / "bin" / "haraka"
HOSTNAME = "haraka.test"
INSTALL_HINT = (f"install it as .ci/run does: install -d {PREFIX} && cp {PACKAGE_DIR}/package*.json {PREFIX}/ && "
                f"npm ci --prefix {PREFIX} --omit=optional --no-audit --no-fund --loglevel=error")

# Our plugin: accepts every recipient, answers the rDNS look-up, queues each message as one
# JSON file in ROOT/messages (written to a dot file, then renamed: a reader never sees half).
RECORD_JSON = r"""
'use strict'
// record_json: the test fixture's plugin (tests/haraka_fixture.py).
const fs = require('node:fs')
const path = require('node:path')

const dir = path.join(process.env.HARAKA, 'messages')
let sequence = 0

function address(a) {
    if (!a) return null
    return typeof a.address === 'function' ? a.address() : a.address
}

exports.hook_lookup_rdns = function (next) {
    next(OK, 'unknown')           // no DNS query: Haraka would ask for the client's reverse name
}

exports.hook_rcpt = function (next) {
    next(OK)
}

exports.hook_queue = function (next, connection) {
    const txn = connection.transaction
    txn.message_stream.get_data((data) => {
        const number = ++sequence
        const record = {
            sequence: number,
            uuid: txn.uuid,
            remote_ip: connection.remote.ip,
            remote_port: connection.remote.port,
            local_ip: connection.local.ip,
            local_port: connection.local.port,
            proxy_allowed: connection.proxy.allowed,
            proxy_ip: connection.proxy.ip,
            proxy: connection.notes.proxy || null,
            helo: connection.hello.host,
            helo_verb: connection.hello.verb,
            mail_from: address(txn.mail_from),
            rcpt_to: txn.rcpt_to.map(address),
            data_bytes: txn.data_bytes,
            message: data.toString('base64'),
        }
        const name = `${String(number).padStart(6, '0')}-${txn.uuid}.json`
        const tmp = path.join(dir, `.${name}`)
        fs.writeFile(tmp, JSON.stringify(record), (err) => {
            if (err) return next(DENYSOFT, `record_json: ${err.message}`)
            fs.rename(tmp, path.join(dir, name), (err2) => {
                if (err2) return next(DENYSOFT, `record_json: ${err2.message}`)
                next(OK, `recorded ${name}`)
            })
        })
    })
}
"""


class HarakaError(AssertionError):
    pass


class HarakaMessage:
    """One message as record_json queued it (the JSON file's fields as attributes).

    remote_ip, remote_port (the PROXY header's source once one was read, else the
    socket's peer), local_ip, local_port, proxy_allowed (the peer is listed),
    proxy_ip (the socket's peer if a PROXY header was read, else None), proxy
    (Haraka's notes.proxy: {type, proto, src_ip, src_port, dst_ip, dst_port,
    proxy_ip}, ports as str, or None), helo, helo_verb, mail_from, rcpt_to (list),
    data_bytes (as received, the final ".\r\n" counted), message (bytes: what Haraka queued, its Received header added),
    sequence, uuid, path.
    """

    def __init__(self, record, path):
        self.__dict__.update(record)
        self.message = base64.b64decode(record["message"])
        self.path = path

    def __repr__(self):
        return (f"HarakaMessage(remote={self.remote_ip}:{self.remote_port}, helo={self.helo!r}, "
                f"mail_from={self.mail_from!r}, rcpt_to={self.rcpt_to!r}, data_bytes={self.data_bytes})")


def _listed(ip, hosts):
    """Whether `ip` is one of the hosts (IPs or CIDRs) as Haraka's is_haproxy_allowed matches."""
    address = ipaddress.ip_address(ip)
    return any(address in ipaddress.ip_network(host.strip("[]"), strict=False) for host in hosts)


def proxy_v1(src_ip, src_port, dst_ip, dst_port):
    """A PROXY protocol v1 header line (bytes, CRLF included) for TCP over IPv4 or IPv6."""
    family = "TCP6" if ":" in src_ip else "TCP4"
    return f"PROXY {family} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode()


class Haraka(PolledLog):
    """One Haraka instance; see the module docstring.

    Attributes: host, port, address ("127.0.0.1:PORT"), root, config_dir,
    messages_dir, log_path, haproxy_hosts (list), proc, version, start_seconds.
    """

    def __init__(self, haproxy_hosts=("127.0.0.1",), haproxy_enabled=True, log_level="protocol",
                 start_timeout=15):
        """haproxy_hosts: connection.ini [haproxy] hosts[] (IPs or CIDRs; a str is one host, () none);
        haproxy_enabled: [haproxy] enabled; log_level: log.ini's level (data, protocol, debug, info, ...)."""
        if isinstance(haproxy_hosts, str):
            haproxy_hosts = [haproxy_hosts]
        self.haproxy_hosts = list(haproxy_hosts)
        self.haproxy_enabled = haproxy_enabled
        self.version = json.loads((HARAKA_DIR / "package.json").read_text())["version"]
        self.root = Path(tempfile.mkdtemp(prefix="haraka-"))
        self.config_dir = self.root / "config"
        self.messages_dir = self.root / "messages"
        self.log_path = self.log_file = self.root / "haraka.log"     # its stdout and stderr
        self.log_name = "Haraka log"
        for path in (self.config_dir, self.root / "plugins", self.messages_dir):
            path.mkdir()
        (self.root / "plugins" / "record_json.js").write_text(RECORD_JSON)
        (self.config_dir / "plugins").write_text("record_json\n")
        (self.config_dir / "me").write_text(HOSTNAME + "\n")
        (self.config_dir / "log.ini").write_text(f"[main]\nlevel={log_level}\ntimestamps=true\n")
        (self.config_dir / "connection.ini").write_text(self._connection_ini())
        self.proc = None
        self.start_seconds = None
        self.host = "127.0.0.1"
        on_a_free_port(self, lambda: (self.config_dir / "smtp.ini").write_text(f"listen={self.address}\nnodes=0\n"),
                       lambda: self._start(start_timeout), HarakaError, "EADDRINUSE")

    def _connection_ini(self):
        """Haraka's own connection.ini with our [haproxy] section: a config file in the instance's
        directory replaces the shipped one whole, and Haraka needs its other sections ([max] ...)."""
        shipped = (HARAKA_DIR / "config" / "connection.ini").read_text()
        hosts = "".join(f"hosts[]={host}\n" for host in self.haproxy_hosts) or "hosts[]=\n"
        section = f"[haproxy]\nenabled={'true' if self.haproxy_enabled else 'false'}\n{hosts}\n"
        text, count = re.subn(r"^\[haproxy\]\n(?:(?!\[).*\n)*", section, shipped, flags=re.M)
        assert count == 1, f"no [haproxy] section in {HARAKA_DIR}/config/connection.ini"
        return text

    # --- life cycle ---------------------------------------------------------

    def _start(self, timeout):
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([shutil.which("node") or "node", str(HARAKA_BIN), "-c", str(self.root)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root)
        self._wait_listening(began + timeout)
        self._wait_greeting(began + timeout)
        self.start_seconds = time.monotonic() - began

    def _wait_listening(self, deadline):
        """Until Haraka logs that it listens on the address, or exits (e.g. EADDRINUSE)."""
        listening = f"Listening on {self.address}"
        try:
            if wait_until(lambda: "exited" if self.proc.poll() is not None else listening in self.log_text(),
                          max(0.0, deadline - time.monotonic()), f"Haraka's {listening!r}") is True:
                return
        except AssertionError:
            pass
        raise HarakaError(f"Haraka did not listen on {self.address} (exit code {self.proc.poll()}); "
                          f"log:\n{self.log_text()}")

    def _wait_greeting(self, deadline):
        """Until Haraka answers 220 on the port (then QUIT). From a listed host (the probe's
        127.0.0.1) it greets only after a PROXY header: the probe sends its own true one."""
        listed = self.haproxy_enabled and _listed(self.host, self.haproxy_hosts)
        last = []

        def greeted_or_exited():
            if self.proc.poll() is not None:
                return "exited"
            header = (lambda s: proxy_v1(*s.getsockname()[:2], self.host, self.port)) if listed else None
            answer = greets(self.host, self.port, max(0.1, deadline - time.monotonic()), header)
            if answer is True:
                return "greeted"
            last[:] = [answer]
            return None

        try:
            if wait_until(greeted_or_exited, max(0.0, deadline - time.monotonic()), "Haraka's greeting") == "greeted":
                return
        except AssertionError:
            pass
        raise HarakaError(f"Haraka on {self.address} did not greet ({last[0] if last else 'exited'!r}); "
                          f"log:\n{self.log_text()}")

    def stop(self):
        """SIGTERM (Node's default: exit at once), SIGKILL after 5 s; removes the files."""
        try:
            if self.proc is not None:
                stop_process(self.proc, timeout=5)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- the messages -------------------------------------------------------

    def messages(self):
        """Every message queued so far, as HarakaMessages, in the order Haraka queued them."""
        paths = sorted(self.messages_dir.glob("[0-9]*.json"))      # not the .NAME being written
        return [HarakaMessage(json.loads(path.read_text()), path) for path in paths]

    def wait_for_messages(self, n, timeout=5):
        """All queued messages once there are at least `n`; AssertionError after `timeout` s."""
        return wait_for_count(self.messages, n, timeout, lambda found: f"{len(found)} message(s) at Haraka; log:\n"
                                                                        f"{self.log_text()[-4000:]}\n")


@pytest.fixture
def haraka():
    """Factory start(haproxy_hosts=("127.0.0.1",), haproxy_enabled=True, log_level="protocol") -> a running Haraka.

    It returns once Haraka has greeted (after a true PROXY v1 header from the
    probe where 127.0.0.1 is listed). The Haraka has host, port, address,
    version, start_seconds, log_path, log_text(), wait_for_log(regex,
    timeout=5), messages() -> [HarakaMessage] and wait_for_messages(n,
    timeout=5). Every Haraka started is stopped at teardown; the fixture fails
    the test if Haraka is not installed, or not the version tests/haraka pins.
    """
    if not os.access(HARAKA_BIN, os.R_OK):
        pytest.fail(f"Haraka is not installed at {HARAKA_DIR}; {INSTALL_HINT}")
    installed = json.loads((HARAKA_DIR / "package.json").read_text())["version"]
    if installed != PINNED:
        pytest.fail(f"Haraka {installed} is installed at {HARAKA_DIR}, tests/haraka pins {PINNED}; {INSTALL_HINT}")
    if not shutil.which("node"):
        pytest.fail("node is missing: Haraka needs Node.js")
    with stopped_on_exit(Haraka) as start:
        yield start
