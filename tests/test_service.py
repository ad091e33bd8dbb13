"""Running under a service manager: the shipped systemd units, inetd and xinetd lines, and the relay's side of them.

- The units in contrib/systemd/ pass `systemd-analyze security` (and
  `verify`: test_units.py), and say what the relay needs (TLS on the socket
  named smtps, a stop long enough for a message in flight); their drop-ins
  load the credentials that the environment they set names.
- systemd-socket-activate (systemd's own tool, the protocol PID 1 speaks)
  starts the real relay on inherited sockets, plain and smtps, and with
  --accept one `--inetd` relay per connection.
- sd_notify: a datagram socket of the test's is NOTIFY_SOCKET.
- --inetd: a TCP connection is fds 0, 1 and 2, as inetd makes it; the command
  lines of contrib/inetd.conf and contrib/xinetd.d/smtprelay are run so.
- --user and --log-target syslog, the latter in a private mount namespace
  whose /dev is a tmpfs with the test's datagram socket as /dev/log (the
  host's /dev is left alone; unshare -m, as root).

Every message goes to the built-in maildir: back-end, which has written
the file by the time the client hears 250.
"""
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import RELAY, RelayProcess, SMTPClient, free_port, relay_command, relay_env, run_relay, send_message
from service_fixtures import BODY, assert_delivered, deliver, inetd, maildir_messages, tcp_connection, write_config  # noqa: F401
from tls_fixtures import tls  # noqa: F401  (fixture)

CONTRIB = RELAY.parent / "contrib"
SYSTEMD = CONTRIB / "systemd"
UNITS = ["smtprelay.service", "smtprelay.socket", "smtprelay-smtps.socket",
         "smtprelay-inetd.socket", "smtprelay-inetd@.service"]
INSTALLED = "/opt/smtprelay/bin/smtprelay"      # where the README installs the console script (a venv)
RELAY_COMMAND = relay_command()                 # what runs in its place here
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
DATA_TIMEOUT, TIMEOUT = 600, 60                 # the relay's defaults (README, Configuration)
NO_DEV_LOG = "smtprelay: --log-target: /dev/log is missing: no syslog daemon to write to"
LOG_MAIL, LOG_INFO = 2, 6                       # syslog facility and severity (RFC 5424 §6.2.1)

needs_systemd_analyze = pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze missing (Debian package systemd)")
needs_socket_activate = pytest.mark.skipif(not SOCKET_ACTIVATE,
                                           reason="systemd-socket-activate missing (Debian package systemd)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_namespace = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                     reason="needs root and unshare(1) for a private /dev")


# --- Reading the shipped files -------------------------------------------------------

def unit_settings(name):
    """contrib/systemd/NAME (a unit or a drop-in) -> {section: [(key, value), ...]}, keys repeated as written."""
    sections, current = {}, None
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def values(name, section, key):
    """Every value of `key` in `section` of unit NAME, in order."""
    return [v for k, v in unit_settings(name).get(section, []) if k == key]


def value(name, section, key):
    """The one value of `key` (AssertionError unless set exactly once)."""
    found = values(name, section, key)
    assert len(found) == 1, f"{name} [{section}] {key}= set {len(found)} times: {found}"
    return found[0]


def seconds(text):
    """A systemd time span as the units write it ("660s", "11min", "90") -> seconds."""
    number, unit = re.fullmatch(r"(\d+)\s*(s|sec|min|m|h)?", text).groups()
    return int(number) * {"min": 60, "m": 60, "h": 3600}.get(unit, 1)


def exec_start(name):
    """The ExecStart= of unit NAME with the installed script replaced by this checkout -> argv."""
    argv = value(name, "Service", "ExecStart").split()
    assert argv[0] == INSTALLED, f"{name}: ExecStart runs {argv[0]}, the README installs {INSTALLED}"
    return [*RELAY_COMMAND, *argv[1:]]


def with_config(args, config):
    """A command line's arguments with the file after -c replaced by `config`."""
    args = list(args)
    assert "-c" in args, f"no -c FILE in {args}"
    args[args.index("-c") + 1] = str(config)
    return args


def unit_environment(name, credentials):
    """The Environment= of unit or drop-in NAME with %d (the credentials directory) as `credentials` -> {VAR: value}."""
    env = {}
    for assignment in values(name, "Service", "Environment"):
        var, _, val = assignment.partition("=")
        env[var] = val.replace("%d", str(credentials))
    return env


def load_credentials(name, directory, files):
    """Put into `directory` what LoadCredential=ID:PATH of unit or drop-in NAME would: files[PATH] as ID."""
    for credential in values(name, "Service", "LoadCredential"):
        cred_id, _, source = credential.partition(":")
        shutil.copyfile(files[source], directory / cred_id)


def inetd_conf_command():
    """contrib/inetd.conf's one service line -> (program, arguments after argv[0])."""
    lines = [line for line in (CONTRIB / "inetd.conf").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f"inetd.conf: {len(lines)} service lines"
    service, socket_type, protocol, wait, user, program, name, *args = lines[0].split()
    assert (socket_type, protocol, wait) == ("stream", "tcp", "nowait")
    assert user != "root", "inetd.conf runs the relay as root"
    return program, args


def xinetd_command():
    """contrib/xinetd.d/smtprelay -> (server, server_args split)."""
    attributes = {}
    for line in (CONTRIB / "xinetd.d" / "smtprelay").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, val = line.partition("=")
            attributes[key.strip().rstrip("+-")] = val.strip()
    assert (attributes["socket_type"], attributes["wait"]) == ("stream", "no")
    assert attributes["user"] != "root", "xinetd runs the relay as root"
    assert attributes.get("disable", "no") == "no"
    return attributes["server"], attributes["server_args"].split()


# --- Talking to the relay ----------------------------------------------------------------

def children(pid):
    """Pids of the running processes whose parent is `pid`."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):     # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:     # field 4, after "(comm)"
            found.append(int(entry))
    return found


def proc_status(pid):
    """/proc/PID/status -> {field: [values]}."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = rest.split()
    return fields


# --- The units, checked by systemd --------------------------------------------------

@pytest.fixture
def units_here(tmp_path):
    """A copy of contrib/systemd/ whose ExecStart= runs this checkout's relay (an executable that exists)."""
    directory = tmp_path / "units"
    directory.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        (directory / name).write_text(text.replace(INSTALLED, " ".join(RELAY_COMMAND)))
    return directory


@needs_systemd_analyze
@pytest.mark.parametrize("unit", ["smtprelay.service", "smtprelay-inetd@.service"])
def test_systemd_analyze_security_rates_the_service_ok(units_here, unit):
    # --threshold is the overall exposure times ten: 20 is systemd's "OK" (below 2.0).
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", f"./{unit}"],
                            cwd=units_here, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


def test_socket_units_give_port_25_plain_and_465_as_smtps_to_the_one_service():
    assert values("smtprelay.socket", "Socket", "ListenStream") == ["25"]
    assert value("smtprelay.socket", "Socket", "FileDescriptorName") != "smtps"
    assert values("smtprelay-smtps.socket", "Socket", "ListenStream") == ["465"]
    assert value("smtprelay-smtps.socket", "Socket", "FileDescriptorName") == "smtps"
    for name in ("smtprelay.socket", "smtprelay-smtps.socket"):
        assert value(name, "Socket", "Service") == "smtprelay.service"
        assert values(name, "Socket", "Accept") in ([], ["no"])


def test_service_unit_is_notify_type_reloads_with_sighup_and_waits_for_a_message_in_flight():
    service = "smtprelay.service"
    assert value(service, "Service", "Type") == "notify"
    assert value(service, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert seconds(value(service, "Service", "TimeoutStopSec")) >= DATA_TIMEOUT + TIMEOUT
    assert "--inetd" not in exec_start(service)
    assert value(service, "Service", "DynamicUser") == "yes"
    assert value(service, "Service", "CapabilityBoundingSet") == ""


def test_inetd_units_hand_each_connection_to_its_own_relay_on_stdin_and_stdout():
    assert value("smtprelay-inetd.socket", "Socket", "Accept") == "yes"
    assert values("smtprelay-inetd.socket", "Socket", "ListenStream") == ["2525"]
    service = "smtprelay-inetd@.service"
    assert "--inetd" in exec_start(service)
    assert value(service, "Service", "StandardInput") == "socket"
    # Anything but the socket: else the relay's log lines would be dropped (or go to syslog).
    assert value(service, "Service", "StandardError") == "journal"
    assert seconds(value(service, "Service", "TimeoutStopSec")) >= DATA_TIMEOUT + TIMEOUT


@pytest.mark.parametrize("drop_in, variables", [("tls.conf", {"SMTPRELAY_TLS_CERT", "SMTPRELAY_TLS_KEY"}),
                                                ("backend-auth.conf", {"SMTPRELAY_BACKEND_AUTH_FILE"})])
def test_files_a_drop_in_names_in_the_environment_are_the_credentials_it_loads(drop_in, variables):
    loaded = {credential.partition(":")[0] for credential in values(drop_in, "Service", "LoadCredential")}
    env = unit_environment(drop_in, "%d")
    assert set(env) == variables
    for var in variables:
        directory, _, cred_id = env[var].rpartition("/")
        assert directory == "%d" and cred_id in loaded, f"{var}={env[var]}; LoadCredential= ids: {loaded}"


def test_the_backend_auth_drop_in_hands_the_relay_its_credentials(relay, scripted_backend, tmp_path):
    # What systemd would do with backend-auth.conf: the file copied in as credential
    # "backend-auth", the environment pointing the relay at the copy.
    secret = tmp_path / "etc-backend-auth"
    secret.write_text("relay:Relay-Secret-9\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    load_credentials("backend-auth.conf", credentials, {"/etc/smtprelay/backend-auth": secret})
    backend = scripted_backend(extensions=["AUTH PLAIN", "XCLIENT ADDR NAME HELO"], auth={"relay": "Relay-Secret-9"})
    r = relay("--backend", backend.address, env=unit_environment("backend-auth.conf", credentials))
    deliver(r.connect())
    assert [(a.user, a.accepted) for s in backend.sessions for a in s.auths] == [("relay", True)]


# --- Socket activation: systemd-socket-activate starts the relay ------------------------

@pytest.fixture
def socket_activate():
    """start(command, count=1, fdnames=None, accept=False, env=None) -> (RelayProcess, ports).

    Runs systemd-socket-activate listening on `count` free ports of
    127.0.0.1 (it takes no port 0), returning once it listens. Without
    `accept` it execs `command` at the first connection, with LISTEN_FDS,
    LISTEN_PID and LISTEN_FDNAMES (`fdnames`) set; with `accept` (and
    --inetd) it forks `command` for each connection, the connection as its
    stdin and stdout. `env`: -E VAR=VALUE for each (the tool passes little of
    its own environment on). Output of the tool and of the relays is the
    RelayProcess's log; all are stopped at teardown.
    """
    started = []

    def start(command, count=1, fdnames=None, accept=False, env=None):
        for _ in range(5):
            ports = set()
            while len(ports) < count:
                ports.add(free_port())
            ports = sorted(ports)
            argv = [SOCKET_ACTIVATE, *(f"--listen=127.0.0.1:{port}" for port in ports)]
            if fdnames:
                argv.append("--fdname=" + ":".join(fdnames))
            if accept:
                argv += ["--accept", "--inetd"]
            argv += [f"--setenv={var}={val}" for var, val in (env or {}).items()]
            process = RelayProcess([*argv, *map(str, command)], relay_env())
            started.append(process)
            try:
                for port in ports:
                    process.wait_for_log(rf"^Listening on 127\.0\.0\.1:{port} as \d+\.$", timeout=10)
                return process, ports
            except AssertionError:
                if "already in use" not in process.log_text():    # a port taken meanwhile: try others
                    raise
        pytest.fail(f"systemd-socket-activate found no free ports:\n{process.log_text()}")

    yield start
    for process in started:
        for child in children(process.proc.pid):     # --accept's relays
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.stop()


@needs_socket_activate
def test_socket_activated_relay_serves_on_the_inherited_socket_and_ignores_listen(socket_activate, tmp_path):
    maildir, ignored = tmp_path / "Maildir", free_port()
    process, (port,) = socket_activate([*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--backend",
                                        f"maildir:{maildir}", "--listen", f"127.0.0.1:{ignored}"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:    # starts the relay
        deliver(sock)
    process.wait_for_log(rf"smtprelay INFO listening on 127\.0\.0\.1:{port} \(inherited\)$")
    assert process.listeners == [("127.0.0.1", port)], process.log_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ignored), timeout=5)
    assert_delivered(maildir, 1)
    assert process.stop() == 0


@needs_socket_activate
def test_shipped_service_on_both_shipped_sockets_speaks_plain_smtp_and_smtps(socket_activate, tls, tmp_path):
    """smtprelay.service's command line and its TLS drop-in's environment, with the sockets named as the socket
    units name them."""
    credentials, maildir = tmp_path / "credentials", tmp_path / "Maildir"
    credentials.mkdir()
    load_credentials("tls.conf", credentials, {"/etc/smtprelay/tls.crt": tls.server.cert_path,
                                               "/etc/smtprelay/tls.key": tls.server.key_path})
    fdnames = [value(name, "Socket", "FileDescriptorName") for name in ("smtprelay.socket", "smtprelay-smtps.socket")]
    config = write_config(tmp_path, f"backend = maildir:{maildir}\n")
    env = {**unit_environment("tls.conf", credentials), "INVOCATION_ID": secrets.token_hex(16)}
    process, (plain, smtps) = socket_activate(with_config(exec_start("smtprelay.service"), config),
                                              count=2, fdnames=fdnames, env=env)
    raw = socket.create_connection(("127.0.0.1", smtps), timeout=10)           # starts the relay
    with tls.client_context().wrap_socket(raw, server_hostname="localhost") as sock:
        deliver(sock)
    with socket.create_connection(("127.0.0.1", plain), timeout=10) as sock:
        deliver(sock)
    process.wait_for_log(rf"listening on 127\.0\.0\.1:{plain} \(inherited\)$")
    process.wait_for_log(rf"listening on 127\.0\.0\.1:{smtps} \(TLS, inherited\)$")
    assert_delivered(maildir, 2)
    assert process.stop() == 0


@needs_socket_activate
def test_a_socket_named_smtps_without_a_certificate_is_a_configuration_error(socket_activate, tmp_path):
    process, (port,) = socket_activate([*RELAY_COMMAND, "-c", write_config(tmp_path, ""),
                                        "--backend", f"maildir:{tmp_path / 'Maildir'}"], fdnames=["smtps"])
    with socket.create_connection(("127.0.0.1", port), timeout=10):            # starts the relay
        assert process.proc.wait(timeout=20) == 1
    assert re.search(r"^smtprelay: --tls-cert: ", process.log_text(), re.M), process.log_text()


@needs_socket_activate
def test_socket_activation_with_accept_runs_one_inetd_relay_per_connection(socket_activate, tls, tmp_path):
    """smtprelay-inetd@.service's command line under an Accept=yes socket: a relay process per connection."""
    credentials, maildir = tmp_path / "credentials", tmp_path / "Maildir"
    credentials.mkdir()
    load_credentials("tls.conf", credentials, {"/etc/smtprelay/tls.crt": tls.server.cert_path,
                                               "/etc/smtprelay/tls.key": tls.server.key_path})
    config = write_config(tmp_path, f"backend = maildir:{maildir}\n")
    env = {**unit_environment("tls.conf", credentials), "INVOCATION_ID": secrets.token_hex(16)}
    process, (port,) = socket_activate(with_config(exec_start("smtprelay-inetd@.service"), config),
                                       accept=True, env=env)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10)) for _ in range(2)]
        for client in clients:      # both sessions open at once: each has its own relay
            process.wait_for_log(rf"connect from 127\.0\.0\.1:{client.getsockname()[1]}\b")
        relays = children(process.proc.pid)
        assert len(relays) == 2, relays
        for pid in relays:
            assert b"--inetd" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for client in clients:
            deliver(client)
    for pid in relays:
        process.wait_for_log(rf"^Child {pid} died with code 0$", timeout=10)
    assert_delivered(maildir, 2)


# --- sd_notify -------------------------------------------------------------------------

class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; .address is the variable's value."""

    def __init__(self, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.directory = None
        if abstract:
            name = f"smtprelay-test-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:       # a short path: sun_path holds 108 bytes, pytest's tmp_path can be longer
            self.directory = tempfile.mkdtemp(prefix="notify-")
            self.address = os.path.join(self.directory, "notify")
            self.sock.bind(self.address)
        self.received = []      # (monotonic time, {key: value}) of every datagram, in order

    def next(self, timeout=10):
        """The next datagram as {key: value}; AssertionError if none comes within `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no sd_notify datagram within {timeout}s; got {self.keys()}") from None
        return self._keep(data)

    def _keep(self, data):
        """Record a datagram ("KEY=value" lines) -> {key: value}."""
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.received.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key, timeout=10):
        """The next datagram that sets `key` (others are kept in .received)."""
        deadline = time.monotonic() + timeout
        while key not in (fields := self.next(max(0.01, deadline - time.monotonic()))):
            pass
        return fields

    def drain(self):
        """Read the datagrams already queued."""
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._keep(self.sock.recv(4096))

    def keys(self, wanted=("READY", "RELOADING", "STOPPING", "WATCHDOG")):
        """The state keys of the datagrams received, in order: ["READY", "RELOADING", ...]."""
        return [key for _, fields in self.received for key in fields if key in wanted]

    def close(self):
        self.sock.close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def notify_socket():
    """start(abstract=False) -> a NotifySocket; closed at teardown."""
    with contextlib.ExitStack() as teardown:
        def start(abstract=False):
            notify = NotifySocket(abstract)
            teardown.callback(notify.close)
            return notify
        yield start


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_tells_ready_reloading_ready_and_stopping(relay, notify_socket, tmp_path, abstract):
    notify = notify_socket(abstract)
    maildir = tmp_path / "Maildir"
    process = relay("--backend", f"maildir:{maildir}", env={"NOTIFY_SOCKET": notify.address})
    ready = notify.wait_for("READY")
    assert ready["READY"] == "1"
    with socket.create_connection((process.host, process.port), timeout=10) as sock:
        deliver(sock)
    before = monotonic_usec()
    process.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING")
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert notify.wait_for("READY")["READY"] == "1"
    process.wait_for_log(r"SIGHUP: configuration reloaded for new sessions")
    process.proc.send_signal(signal.SIGTERM)
    assert notify.wait_for("STOPPING")["STOPPING"] == "1"
    assert process.proc.wait(timeout=20) == 0
    notify.drain()
    # No WATCHDOG=1 without WATCHDOG_USEC: systemd would take it for a watchdog not asked for.
    assert notify.keys() == ["READY", "RELOADING", "READY", "STOPPING"]
    assert "STATUS" in ready


def test_sd_notify_watchdog_pings_at_least_every_half_watchdog_usec(relay, notify_socket, tmp_path):
    notify = notify_socket()
    process = relay("--backend", f"maildir:{tmp_path / 'Maildir'}",
                    env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"})
    assert notify.wait_for("READY")["READY"] == "1"
    pings = [notify.received[-1][0]] + [0.0] * 6
    for i in range(1, len(pings)):
        assert notify.wait_for("WATCHDOG", timeout=5)["WATCHDOG"] == "1"
        pings[i] = notify.received[-1][0]
    # Every 0.1 s asked; the mean leaves room for a busy machine's scheduling.
    mean_gap = (pings[-1] - pings[0]) / (len(pings) - 1)
    assert mean_gap < 0.15, f"WATCHDOG=1 every {mean_gap:.3f}s on average"
    assert process.stop() == 0


# --- --inetd ----------------------------------------------------------------------------

def test_inetd_session_on_a_socket_as_fds_0_1_2_carries_only_smtp_and_exits_0(inetd, tmp_path):
    maildir = tmp_path / "Maildir"
    client, conn = tcp_connection()
    with client:
        proc = inetd([*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--inetd", "--backend", f"maildir:{maildir}"],
                     conn)
        deliver(client)     # SMTPClient takes nothing but well-formed replies: a log line would fail it
        assert proc.wait(timeout=10) == 0
    assert_delivered(maildir, 1)
    assert b"[127.0.0.1]" in maildir_messages(maildir)[0]      # the Received: line names the peer of fd 0


def test_inetd_with_its_own_stderr_logs_there_and_ignores_listen(inetd, tmp_path):
    """As smtprelay-inetd@.service has it: StandardError=journal, not the socket."""
    maildir, ignored = tmp_path / "Maildir", free_port()
    client, conn = tcp_connection()
    client_port = client.getsockname()[1]
    with client:
        proc = inetd([*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--inetd", "--backend", f"maildir:{maildir}",
                      "--listen", f"127.0.0.1:{ignored}"], conn, stderr=subprocess.PIPE)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ignored), timeout=5)
        deliver(client)
        log = proc.communicate(timeout=10)[1].decode()
    assert proc.returncode == 0
    assert re.search(rf"smtprelay INFO \w{{8}} connect from 127\.0\.0\.1:{client_port}\b", log), log
    assert "listening on" not in log
    assert_delivered(maildir, 1)


def test_inetd_with_a_bad_configuration_gives_the_client_421_and_no_error_text(inetd, tmp_path):
    client, conn = tcp_connection()
    with client:
        proc = inetd([*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--inetd"], conn)    # no back-end
        replies = SMTPClient(client).replies_until_closed()
        assert proc.wait(timeout=10) == 1
    assert [reply.code for reply in replies] == [421]
    assert "backend" not in str(replies[0]).lower()


def test_the_service_unit_allows_a_thread_for_every_session_and_the_relays_own():
    # README, Bounds: a thread per session (--max-clients, 1000 by default), 64 for
    # connections being refused, 8 for name lookups, 8 for metrics and a few more;
    # past TasksMax= a client gets 421.
    tasks = int(value("smtprelay.service", "Service", "TasksMax"))
    assert 1000 + 64 + 8 + 8 + 8 <= tasks <= 2000


def test_inetd_serves_a_stdin_that_is_no_socket_as_a_pipe_pair(tmp_path):
    # README, --inetd: standard input and output that are no socket are the
    # client as they are (SMTP typed by hand); /dev/null ends the session at once.
    result = run_relay("--inetd", "--backend", f"maildir:{tmp_path / 'Maildir'}", text=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"220 ") and result.stdout.count(b"\r\n") == 1


@pytest.mark.parametrize("source", ["inetd.conf", "xinetd.d/smtprelay"])
def test_shipped_inetd_command_line_delivers_a_message(inetd, tmp_path, source):
    program, args = inetd_conf_command() if source == "inetd.conf" else xinetd_command()
    assert program == INSTALLED
    assert "--inetd" in args
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path, f"backend = maildir:{maildir}\n")
    client, conn = tcp_connection()
    with client:
        proc = inetd([*RELAY_COMMAND, *with_config(args, config)], conn)
        deliver(client)
        assert proc.wait(timeout=10) == 0
    assert_delivered(maildir, 1)


# --- --user, and root without it ---------------------------------------------------------

@pytest.fixture
def nobody_dir():
    """A directory that the user nobody owns, outside pytest's (0700) tmp tree."""
    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(prefix="smtprelay-nobody-"))
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@needs_root
def test_user_binds_first_then_runs_as_that_user_and_still_serves(relay, nobody_dir):
    nobody = pwd.getpwnam("nobody")
    maildir = nobody_dir / "Maildir"        # made by the relay: it must be nobody's to write to
    process = relay("--user", "nobody", "--backend", f"maildir:{maildir}", listen="127.0.0.1:0")
    process.wait_for_log(rf"smtprelay INFO running as user nobody \(uid {nobody.pw_uid}\)$")
    status = proc_status(process.proc.pid)
    assert status["Uid"] == [str(nobody.pw_uid)] * 4      # real, effective, saved, filesystem: no way back
    assert status["Gid"] == [str(nobody.pw_gid)] * 4
    assert sorted(map(int, status["Groups"])) == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    with socket.create_connection((process.host, process.port), timeout=10) as sock:
        deliver(sock)
    assert_delivered(maildir, 1)
    assert {path.stat().st_uid for path in (maildir / "new").iterdir()} == {nobody.pw_uid}
    assert process.stop() == 0
    assert "running as root" not in process.log_text()


def test_unknown_user_is_a_configuration_error_naming_user(tmp_path):
    result = run_relay("--user", f"no-such-user-{secrets.token_hex(3)}", "--backend", f"maildir:{tmp_path / 'M'}",
                       listen="127.0.0.1:0")
    assert result.returncode == 1
    assert re.fullmatch(r"smtprelay: --user: .*\n", result.stderr), result.stderr


@needs_root
def test_root_without_user_outside_systemd_is_warned_about(relay, tmp_path):
    process = relay("--backend", f"maildir:{tmp_path / 'Maildir'}", env={"INVOCATION_ID": None})
    process.wait_for_log(r"smtprelay WARNING .*running as root")
    assert process.stop() == 0
    assert process.log_text().count("running as root") == 1


@needs_root
def test_root_under_systemd_is_not_warned_about(relay, tmp_path):
    process = relay("--backend", f"maildir:{tmp_path / 'Maildir'}", env={"INVOCATION_ID": secrets.token_hex(16)})
    assert process.stop() == 0
    log = process.log_text()
    assert "stopped" in log and "running as root" not in log, log


# --- --log-target syslog, in a mount namespace with a /dev/log of the test's ---------------

# Runs "$@" with a tmpfs as /dev holding the usual character devices (bound
# from the real /dev, which stays as it is outside) and, when $2 is not
# empty, /dev/log: a symbolic link to the test's socket $2.
PRIVATE_DEV = r'''
set -e
hostdev=$1 syslog=$2
shift 2
mount --bind /dev "$hostdev"
mount -t tmpfs -o mode=0755 tmpfs /dev
for node in null zero full random urandom; do
    [ -e "$hostdev/$node" ] || continue
    touch "/dev/$node"
    mount --bind "$hostdev/$node" "/dev/$node"
done
ln -s /proc/self/fd /dev/fd
if [ -n "$syslog" ]; then ln -s "$syslog" /dev/log; fi
exec "$@"
'''


class SyslogSocket:
    """A datagram socket standing in for the syslog daemon's /dev/log; .received: every datagram."""
    LINE = re.compile(rb"<(\d+)>(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (?:\S+ )?)?(\S+?)(?:\[\d+\])?: (.*)", re.S)

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="syslog-")
        self.path = os.path.join(self.directory, "log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received = []

    def wait_for(self, pattern, timeout=10):
        """The first datagram whose message matches `pattern` (bytes regex) -> (facility, severity, ident, match)."""
        rx = re.compile(pattern)
        for data in self.received:
            if found := self._match(rx, data):
                return found
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no syslog datagram matching {pattern!r} within {timeout}s; "
                                     f"got {self.received}") from None
            self.received.append(data)
            if found := self._match(rx, data):
                return found

    def _match(self, rx, data):
        assert b"\0" not in data, f"a NUL byte in a syslog line (RFC 5424 has none): {data!r}"
        line = self.LINE.fullmatch(data.rstrip(b"\n"))
        assert line, f"not a syslog line: {data!r}"
        priority, ident, message = int(line[1]), line[2], line[3]
        if found := rx.search(message):
            return priority >> 3, priority & 7, ident.decode(), found
        return None

    def close(self):
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def syslog():
    daemon = SyslogSocket()
    yield daemon
    daemon.close()


def in_private_dev(tmp_path, command=(), syslog_path=""):
    """`command` run with a /dev of its own: /dev/log is `syslog_path` (a socket), or missing if empty.

    Without `command`: the wrapper that runs what follows it so."""
    hostdev = tmp_path / "hostdev"
    hostdev.mkdir(exist_ok=True)
    return ["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh", str(hostdev), str(syslog_path), *map(str, command)]


@needs_namespace
def test_log_target_syslog_sends_mail_facility_lines_to_dev_log_and_none_to_stderr(relay, syslog, tmp_path):
    maildir = tmp_path / "Maildir"
    process = relay("--backend", f"maildir:{maildir}", "--log-target", "syslog",
                    wrapper=in_private_dev(tmp_path, syslog_path=syslog.path), listening=0)    # it logs to syslog
    facility, severity, ident, listening = syslog.wait_for(rb"listening on 127\.0\.0\.1:(\d+)")
    assert (facility, severity, ident) == (LOG_MAIL, LOG_INFO, "smtprelay")
    with socket.create_connection(("127.0.0.1", int(listening[1])), timeout=10) as sock:
        deliver(sock)
        syslog.wait_for(rb"connect from 127\.0\.0\.1:%d\b" % sock.getsockname()[1])
    assert process.stop() == 0
    assert_delivered(maildir, 1)
    assert "listening on" not in process.log_text()


@needs_namespace
def test_inetd_with_the_socket_as_stderr_logs_to_syslog(inetd, syslog, tmp_path):
    maildir = tmp_path / "Maildir"
    command = [*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--inetd", "--backend", f"maildir:{maildir}"]
    client, conn = tcp_connection()
    with client:
        proc = inetd(in_private_dev(tmp_path, command, syslog.path), conn)
        deliver(client)
        assert proc.wait(timeout=10) == 0
        facility, _, ident, _ = syslog.wait_for(rb"connect from 127\.0\.0\.1:%d\b" % client.getsockname()[1])
    assert (facility, ident) == (LOG_MAIL, "smtprelay")
    assert_delivered(maildir, 1)


@needs_namespace
def test_inetd_session_stays_pure_smtp_when_the_syslog_daemon_goes_away(inetd, syslog, tmp_path):
    """A syslog daemon restarted mid-session: a log line that cannot be sent is lost, never shown to the client."""
    maildir = tmp_path / "Maildir"
    command = [*RELAY_COMMAND, "-c", write_config(tmp_path, ""), "--inetd", "--backend", f"maildir:{maildir}"]
    sock, conn = tcp_connection()
    with sock:
        proc = inetd(in_private_dev(tmp_path, command, syslog.path), conn)
        client = SMTPClient(sock)
        assert client.reply().code == 220
        syslog.wait_for(rb"connect from 127\.0\.0\.1:%d\b" % sock.getsockname()[1])
        syslog.close()      # /dev/log now leads nowhere
        assert client.say("EHLO client.example").code == 250
        assert send_message(client, BODY).code == 250
        assert client.say("QUIT").code == 221
        assert client.rest() == b""
        assert proc.wait(timeout=10) == 0
    assert_delivered(maildir, 1)


def test_log_target_syslog_without_dev_log_is_a_configuration_error(tmp_path):
    wrapper = ()
    if os.path.exists("/dev/log"):
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("/dev/log exists; hiding it needs root and unshare(1)")
        wrapper = in_private_dev(tmp_path)
    result = run_relay("--backend", f"maildir:{tmp_path / 'Maildir'}", "--log-target", "syslog",
                       listen="127.0.0.1:0", wrapper=wrapper)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(NO_DEV_LOG), result.stderr
