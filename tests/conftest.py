"""Fixtures: the relay as a real subprocess, Postfix's smtp-sink, and ScriptedBackend."""
import contextlib
import itertools
import os

import pytest

from helpers import SMTP_SINK, RelayProcess, SmtpSink, relay_argv, relay_env, stopped_on_exit
from scripted_backend import ScriptedBackend


@pytest.fixture
def relay(tmp_path):
    """Factory start(*args, env=None, config=None, listen="127.0.0.1:0") -> RelayProcess.

    Runs `python smtprelay.py -c CONFIG [--listen LISTEN] *args` with SMTPRELAY_*
    removed from the environment and `env` added; CONFIG holds `config` (text,
    default empty). Returns once as many `listening on` lines as --listen options
    (at least one) were logged; fails the test with the log if the relay exits
    first. The RelayProcess has host, port, address (first listener), ports,
    proc, lines, wait_for_log(regex, timeout=5), log_text(), stop(sig, timeout),
    peak_rss_kb(), smtp(timeout=10), connect(timeout=10). At teardown its
    clients are closed, then it is stopped (SIGTERM, SIGKILL after 10 s).
    """
    numbers = itertools.count()
    with contextlib.ExitStack() as teardown:
        def start(*args, env=None, config=None, listen="127.0.0.1:0"):
            config_path = tmp_path / f"smtprelay-{next(numbers)}.conf"
            config_path.write_text(config or "")
            argv = relay_argv(config_path, listen, args)
            relay = RelayProcess(argv, relay_env(env))
            teardown.callback(relay.stop)
            teardown.callback(relay.close_clients)
            relay.wait_listening(max(1, sum(a == "--listen" or a.startswith("--listen=") for a in argv)))
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
