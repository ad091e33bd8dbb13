"""Fixtures: the relay as a real subprocess, Postfix's smtp-sink, and ScriptedBackend."""
import contextlib
import itertools
import os
import signal
import sys

import pytest

from helpers import RELAY, SMTP_SINK, RelayProcess, SmtpSink, relay_argv, relay_env, stopped_on_exit
from scripted_backend import ScriptedBackend

# The module under test, for the tests that call it in-process, is this
# checkout's: ahead of any other copy installed in the environment.
sys.path.insert(0, str(RELAY.parent))


@pytest.fixture
def relay(tmp_path):
    """Factory start(*args, env=None, config=None, listen="127.0.0.1:0", kill=False, constants=None,
    wrapper=(), stdout=None, listening=None) -> RelayProcess: the one way a test starts a relay daemon.

    Runs `python smtprelay.py -c CONFIG [--listen LISTEN] *args` with SMTPRELAY_*
    removed from the environment and `env` added (a value None removes a
    variable); CONFIG holds `config` (text, default empty). Returns once as many
    `listening on` lines as --listen options (at least one) were logged, or
    `listening` lines if given (0: return at once, for a relay logging
    elsewhere); fails the test with the log if the relay exits first.

    Special runs: `constants` ({name: value}) sets module constants before
    main() runs (helpers.relay_command), e.g. {"BACKEND_HOLD_OFF": 1};
    `wrapper` goes before the command line (e.g. unshare, prlimit: something
    that execs it); `stdout` is a file for its standard output (then only
    stderr is the log).

    The RelayProcess has host, port, address (first listener), ports,
    config_path, proc, lines, wait_for_log(regex, timeout=5), log_text(),
    stop(sig, timeout), peak_rss_kb(), smtp(timeout=10), connect(timeout=10).
    At teardown its clients are closed, then it is stopped: SIGTERM (SIGKILL
    after 10 s), or with kill=True SIGKILL at once, for tests whose subject
    is not stopping and which leave sessions in flight that a graceful stop
    would wait for.
    """
    numbers = itertools.count()
    with contextlib.ExitStack() as teardown:
        def start(*args, env=None, config=None, listen="127.0.0.1:0", kill=False, constants=None, wrapper=(),
                  stdout=None, listening=None):
            config_path = tmp_path / f"smtprelay-{next(numbers)}.conf"
            config_path.write_text(config or "")
            argv = relay_argv(config_path, listen, args, constants)
            relay = RelayProcess([*map(str, wrapper), *argv], relay_env(env), stdout=stdout)
            relay.config_path = config_path
            teardown.callback(relay.stop, signal.SIGKILL if kill else signal.SIGTERM)
            teardown.callback(relay.close_clients)
            if listening is None:
                listening = max(1, sum(a == "--listen" or a.startswith("--listen=") for a in argv))
            if listening:
                relay.wait_listening(listening)
            return relay

        yield start


@pytest.fixture
def smtp_sink(tmp_path):
    """Factory start(*flags) -> SmtpSink (see helpers.SmtpSink for the dump format).

    The SmtpSink has host, port, address, proc, messages() -> [SinkMessage],
    wait_for_messages(n, timeout=5) and log(); a SinkMessage has client_addr,
    client_proto, helo, mail_args, rcpt_args, body (LF line ends), body_crlf,
    path. Every smtp-sink started is stopped at teardown.
    """
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.fail(f"{SMTP_SINK} is missing: install Debian's postfix package")
    numbers = itertools.count()

    def make_sink(*flags):
        return SmtpSink(*flags, log_path=tmp_path / f"smtp-sink-{next(numbers)}.log")

    with stopped_on_exit(make_sink) as start:
        yield start


@pytest.fixture
def scripted_backend():
    """Factory start(**kwargs) -> a running ScriptedBackend(**kwargs); all stopped at teardown."""
    with stopped_on_exit(ScriptedBackend) as start:
        yield start
