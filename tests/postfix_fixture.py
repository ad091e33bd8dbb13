"""A real Postfix (master, smtpd, cleanup, qmgr) as a back-end, in a private directory.

Import the fixture into a test file with `from postfix_fixture import postfix  # noqa: F401`.

Each instance has its own config_directory (main.cf and master.cf written
here), queue_directory, data_directory and maillog_file (through postlogd)
under one temporary directory, and one smtpd on 127.0.0.1:<free port>. Mail
stays in the private queue: defer_transports holds every transport, so an
accepted message sits in the deferred queue ("deferred transport") where
postqueue -j sees it; but local_delivery and virtual_delivery let local(8)
and virtual(8) deliver to one recipient each, into mailbox files of the instance.

What Postfix 3.7.11 needed here, found by experiment (as root, Debian package):
- maillog_file must lie under maillog_file_prefixes (default /var, /dev/stdout).
- the postfix command reports errors only to syslog (there is no /dev/log
  here) unless its stderr is a terminal: the start is run on a pty so that a
  failure can be shown.
- data_directory must belong to the postfix user. `postfix start` makes the
  queue's subdirectories when missing (post-install create-missing), which
  takes long; made here beforehand, it finds nothing to do.
- every Postfix program waits, re-reading main.cf every 0.3 s, while main.cf
  is less than a second old (1.8 s per `postfix start`): the fixture dates
  main.cf and master.cf a minute back.
- chroot must be off in master.cf (no chroot tree is set up).
- `postfix start` returns once the master has bound its listeners
  (master -w); start-up takes about 0.3 s, `postfix stop` under 0.1 s.
- the sandbox's PID 1 does not reap orphans, and Postfix's master daemonizes
  and leaves its children behind when it stops; so `postfix start` is run
  inside a small subreaper process (PR_SET_CHILD_SUBREAPER) that reaps master
  and all its children and exits once the last of them has: its exit is how
  the fixture knows Postfix has stopped.
- local(8) and virtual(8) deliver as root with chroot off (local_delivery,
  virtual_delivery): local(8) to a passwd user (nobody) into mail_spool_directory
  (a mode 1777 directory of the instance), virtual(8) to an mbox under
  virtual_mailbox_base (owned by nobody, virtual_uid_maps static:nobody's uid).
  Both log `status=sent` once the mailbox file is written and closed.
- Debian's Postfix reads Cyrus SASL's smtpd.conf from $config_directory/sasl/
  (not cyrus_sasl_config_path): config_files={"sasl/smtpd.conf": ...}.
- with smtpd_upstream_proxy_protocol = haproxy (proxy_protocol) smtpd waits
  for the header before it greets: the start's check sends a v1 header.
"""
import contextlib
import glob
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from helpers import PolledLog, greets, on_a_free_port, wait_for_count, wait_until

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
HOSTNAME = "backend.test"
# Cyrus SASL's mechanisms (PLAIN, LOGIN, ...) come with libsasl2-modules, which
# libsasl2-2 only recommends: without them smtpd with SASL enabled finds no
# mechanism and dies at every connection ("fatal: no SASL authentication mechanisms").
CYRUS_MECHANISMS = bool(glob.glob("/usr/lib/*/sasl2/libplain.so*"))
needs_cyrus_mechanisms = pytest.mark.skipif(
    not CYRUS_MECHANISMS, reason="libsasl2-modules is not installed: Cyrus SASL offers smtpd no mechanism")
LOCAL_DOMAIN = "local.test"             # mydestination with local_delivery
LOCAL_USER = "nobody"                   # a passwd user: local(8) delivers only to those
VIRTUAL_DOMAIN = "virtual.test"         # virtual_mailbox_domains with virtual_delivery
VIRTUAL_USER = "bob"

# Runs `postfix -c DIR start` on a pty, prints {"rc": N, "output": "..."} as one
# line, then reaps every descendant (master re-parents to us) until none is left.
REAPER = textwrap.dedent(r"""
    import ctypes, json, os, subprocess, sys
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(json.dumps({"rc": -1, "output": "prctl(PR_SET_CHILD_SUBREAPER) failed"}), flush=True)
        sys.exit(1)
    master_fd, slave_fd = os.openpty()
    rc = subprocess.call(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd)
    os.close(slave_fd)
    os.set_blocking(master_fd, False)
    output = b""
    while True:
        try:
            chunk = os.read(master_fd, 65536)
        except OSError:          # EAGAIN: nothing more; EIO: no writer left
            break
        if not chunk:
            break
        output += chunk
    os.close(master_fd)
    print(json.dumps({"rc": rc, "output": output.decode("utf-8", "replace")}), flush=True)
    sys.stdout.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            pass
""")

QUEUE_DIRS = [(name, "root", 0o700) for name in
              ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
               "private", "saved", "trace")] + [("maildrop", "postdrop", 0o730),
                                                ("public", "postdrop", 0o710), ("pid", "root", 0o755)]

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(AssertionError):
    pass


class Postfix(PolledLog):
    """One private Postfix instance; see the module docstring.

    Attributes: host, port, address ("127.0.0.1:PORT"), root (the temporary
    directory), config_dir, queue_dir, maillog (Path), start_seconds.
    """

    def __init__(self, xclient_hosts="127.0.0.1", mynetworks="127.0.0.0/8", main_cf=(), start_timeout=15,
                 listener=None, local_delivery=False, virtual_delivery=False, proxy_protocol=False,
                 config_files=None, wait_greeting=True):
        """xclient_hosts: smtpd_authorized_xclient_hosts ("" for none); mynetworks as in main.cf;
        main_cf: extra main.cf lines (a str or an iterable of str), appended last, each in place of
        the fixture's own line for that parameter;
        listener: master.cf lines for the smtpd service in place of the plain one, its address
        written 127.0.0.1:10025 (replaced by the instance's);
        local_delivery: local(8) delivers mail for LOCAL_USER@LOCAL_DOMAIN (self.local_recipient)
        into self.mailboxes[that address] (mail_spool_directory of the instance), local taken out
        of defer_transports; virtual_delivery: virtual(8) delivers mail for VIRTUAL_USER@VIRTUAL_DOMAIN
        (self.virtual_recipient) into an mbox under the instance's virtual_mailbox_base;
        proxy_protocol: `-o smtpd_upstream_proxy_protocol=haproxy` on the smtpd listener (the plain
        one or `listener`); the start's check then sends a PROXY v1 header first;
        config_files: {path relative to config_dir: text} written beside main.cf before the start
        (e.g. "sasl/smtpd.conf");
        wait_greeting: False to return once `postfix start` has (the master bound the listener),
        without connecting: for an smtpd that fails every connection."""
        self.listener = listener
        # A listener that reads PROXY headers itself (a README recipe) is one too.
        self.proxy_protocol = proxy_protocol or "smtpd_upstream_proxy_protocol=haproxy" in (listener or "")
        self.config_files = dict(config_files or {})
        self.wait_greeting = wait_greeting
        self.root = Path(tempfile.mkdtemp(prefix="postfix-"))
        os.chmod(self.root, 0o755)              # the postfix user must get through to data/
        self.config_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.log_file = self.root / "maillog"
        self.log_name = "maillog"
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir(mode=0o755)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        self._make_queue_dirs(owner.pw_uid, grp.getgrnam("postdrop").gr_gid)
        extra = [main_cf] if isinstance(main_cf, str) else list(main_cf)
        self.local_recipient = self.virtual_recipient = None
        self.mailboxes = {}                     # recipient address -> its mailbox file
        delivery = []
        deferred = ["smtp", "relay"]
        if local_delivery:
            spool = self.root / "mail"
            spool.mkdir()
            os.chmod(spool, 0o1777)             # local(8) makes the user's mailbox file here
            self.local_recipient = f"{LOCAL_USER}@{LOCAL_DOMAIN}"
            self.mailboxes[self.local_recipient] = spool / LOCAL_USER
            delivery += [f"mydestination = {LOCAL_DOMAIN}", f"mail_spool_directory = {spool}"]
        else:
            delivery += ["mydestination ="]
            deferred.append("local")
        if virtual_delivery:
            base = self.root / "vmail"
            base.mkdir()
            nobody = pwd.getpwnam("nobody")
            os.chown(base, nobody.pw_uid, nobody.pw_gid)
            self.virtual_recipient = f"{VIRTUAL_USER}@{VIRTUAL_DOMAIN}"
            self.mailboxes[self.virtual_recipient] = base / VIRTUAL_USER
            delivery += [f"virtual_mailbox_domains = {VIRTUAL_DOMAIN}",
                         f"virtual_mailbox_maps = inline:{{ {self.virtual_recipient}={VIRTUAL_USER} }}",
                         f"virtual_mailbox_base = {base}",
                         f"virtual_uid_maps = static:{nobody.pw_uid}",
                         f"virtual_gid_maps = static:{nobody.pw_gid}"]
        else:
            deferred.append("virtual")
        self.main_cf_lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.root}",
            f"myhostname = {HOSTNAME}",
            f"mydomain = {HOSTNAME}",
            f"myorigin = {HOSTNAME}",
            *delivery,
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            f"mynetworks = {mynetworks}",
            f"smtpd_authorized_xclient_hosts = {xclient_hosts}",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            # Nothing leaves: every message waits in the deferred queue (but for local_delivery
            # and virtual_delivery).
            f"defer_transports = {' '.join(deferred)}",
            "relayhost = [127.0.0.1]:9",
            "alias_maps =",
            "alias_database =",
            "biff = no",
        ]
        # A parameter of main_cf takes the place of the fixture's line: no "overriding earlier
        # entry" warning from every Postfix program.
        given = {line.split("=", 1)[0].strip() for line in extra}
        self.main_cf_lines = [line for line in self.main_cf_lines if line.split("=", 1)[0].strip() not in given]
        self.main_cf_lines += extra
        self.proc = None
        self.start_seconds = None
        self.host = "127.0.0.1"
        on_a_free_port(self, self._write_config, lambda: self._start(start_timeout), PostfixError,
                       "Address already in use")

    # --- life cycle ---------------------------------------------------------

    def _make_queue_dirs(self, postfix_uid, postdrop_gid):
        """The queue tree as post-install makes it (postfix-files): `postfix start` then takes
        0.3 s instead of 2 s, its create-missing step finding nothing to do."""
        for name, gid, mode in QUEUE_DIRS:
            path = self.queue_dir / name
            path.mkdir()
            if name != "pid":
                os.chown(path, postfix_uid, postdrop_gid if gid == "postdrop" else 0)
            os.chmod(path, mode)

    def _write_config(self):
        (self.config_dir / "main.cf").write_text("\n".join(self.main_cf_lines) + "\n")
        plain = f"{self.address} inet  n       -       n       -       -       smtpd\n"
        listener = self.listener.replace("127.0.0.1:10025", self.address).rstrip("\n") + "\n" if self.listener else plain
        if self.proxy_protocol and "smtpd_upstream_proxy_protocol" not in listener:
            listener += "  -o smtpd_upstream_proxy_protocol=haproxy\n"
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(listen=self.address).replace(plain, listener))
        for name, text in self.config_files.items():
            path = self.config_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        # Postfix re-reads a table file modified within the last second, 0.3 s apart, until
        # it is older than that (dict_load_file): every Postfix program would wait so.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _postfix(self, *args, timeout=20):
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def _start(self, timeout):
        began = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", REAPER, POSTFIX, "-c", str(self.config_dir), "start"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        report = json.loads(self.proc.stdout.readline() or '{"rc": -1, "output": "reaper died"}')
        if report["rc"] != 0:
            self._wait_stopped(10)
            raise PostfixError(f"postfix start exited {report['rc']}:\n{report['output']}\n"
                               f"maillog:\n{self.log_text()}")
        if self.wait_greeting:
            self._wait_greeting(began + timeout)
        self.start_seconds = time.monotonic() - began

    def _wait_greeting(self, deadline):
        """Until smtpd answers 220 on the port (a connection, its greeting read, QUIT) and has
        logged that session's end."""
        last = []

        def greeted_or_exited():
            # smtpd greets only after the header, with --proxy-protocol
            header = (lambda s: b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (s.getsockname()[1], self.port)) \
                if self.proxy_protocol else None
            answer = greets(self.host, self.port, max(0.1, deadline - time.monotonic()), header)
            if answer is True:
                return "greeted"
            last[:] = [answer]
            return "exited" if self.proc.poll() is not None else None     # every Postfix process has exited

        try:
            greeted = wait_until(greeted_or_exited, max(0.0, deadline - time.monotonic()), "smtpd's greeting")
        except AssertionError:
            greeted = None
        if greeted == "greeted":
            # That session logged whole before the start returns: a mark() taken then is past it.
            self.wait_for_log(r"postfix/smtpd\[\d+\]: disconnect from \S+\[127\.0\.0\.1\] quit=1 commands=1$",
                              timeout=max(0.1, deadline - time.monotonic()))
            return
        raise PostfixError(f"Postfix on {self.address} did not greet ({last[0] if last else None!r}); "
                           f"maillog:\n{self.log_text()}")

    def _wait_stopped(self, timeout):
        """Wait for the reaper, i.e. for master and all its children, to exit -> True if they did."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self):
        """postfix stop; if it has not all gone in 10 s, SIGKILL to master's process group. Removes the files."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._postfix("stop")
                if not self._wait_stopped(10):
                    pid_file = self.queue_dir / "pid" / "master.pid"
                    with contextlib.suppress(OSError, ValueError):
                        os.killpg(int(pid_file.read_text().split()[0]), 9)
                    if not self._wait_stopped(5):
                        self.proc.kill()
                        self.proc.wait()
        finally:
            if self.proc is not None:
                self.proc.stdout.close()
            shutil.rmtree(self.root, ignore_errors=True)

    # --- the queue ----------------------------------------------------------

    def queue(self):
        """Every message in the private queue (postqueue -j), once: dicts with queue_name, queue_id,
        sender, recipients [{address, delay_reason}], ...

        postqueue reads the queue directories one after another, so a message that qmgr moves
        meanwhile (active to deferred) can be listed twice under its one queue id: the later
        listing is kept. A second message has a queue id of its own."""
        done = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, f"postqueue -j exited {done.returncode}: {done.stderr}\n{self.log_text()}"
        messages = (json.loads(line) for line in done.stdout.splitlines() if line.strip())
        return list({message["queue_id"]: message for message in messages}.values())

    def queue_ids(self):
        return {message["queue_id"] for message in self.queue()}

    def wait_for_queue(self, n, timeout=5):
        """The queue once it holds at least `n` messages; AssertionError after `timeout` s."""
        return wait_for_count(self.queue, n, timeout, lambda found: f"Postfix queue has {len(found)} message(s); "
                                                                     f"maillog:\n{self.log_text()}\n")

    def wait_for_delivery(self, recipient, timeout=5, since=0):
        """The text of `recipient`'s mailbox (one of self.mailboxes) once local(8) or virtual(8)
        has logged `to=<recipient>, relay=local|virtual, ... status=sent` from maillog line `since` on
        (logged after the mailbox file is written and closed); AssertionError after `timeout` s."""
        self.wait_for_log(rf"postfix/(local|virtual)\[\d+\]: \w+: to=<{re.escape(recipient)}>, "
                          rf"relay=(local|virtual),.* status=sent ", timeout=timeout, since=since)
        return self.mailboxes[recipient].read_text(errors="replace")

    def client_of(self, queue_id):
        """smtpd's "client=NAME[ADDR]" for a queue id, as "NAME[ADDR]" (waits up to 5 s for the line)."""
        return self.wait_for_log(rf"postfix/smtpd\[\d+\]: {queue_id}: client=(\S+?)(?:,|$)")[1]


@pytest.fixture
def postfix():
    """Factory start(xclient_hosts="127.0.0.1", mynetworks="127.0.0.0/8", main_cf=(), listener=None,
    local_delivery=False, virtual_delivery=False, proxy_protocol=False, config_files=None,
    wait_greeting=True) -> a running Postfix (see Postfix.__init__).

    Every Postfix started is stopped (postfix stop, all its processes reaped) at teardown.
    """
    if not os.access(POSTFIX, os.X_OK):
        pytest.fail(f"{POSTFIX} is missing: install Debian's postfix package")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (postfix start)")
    with contextlib.ExitStack() as teardown:
        def start(**options):
            instance = Postfix(**options)
            teardown.callback(instance.stop)
            return instance

        yield start
