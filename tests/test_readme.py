"""The README's front door, run as written: its first command installs the relay into a venv and
runs it on the built-in Maildir back-end, its second sends a test mail there.

The commands run in a copy of the checkout (what git would check out), so the venv and the Maildir
they make land there, not in the checkout under test. The install needs PyPI (the relay's two
dependencies), as on the fresh machine the README speaks of.
"""
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import readme_block, run_relay, wait_until
from tls_fixtures import TLSMaterial

CHECKOUT = Path(__file__).resolve().parent.parent
README = CHECKOUT / "README.md"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def two_commands():
    """The README's "Two commands": (the install-and-run line, the test-mail line), verbatim."""
    text = README.read_text()
    section = text[text.index("## Two commands"):text.index("## What it does")]
    run, send = [line[4:] for line in section.splitlines() if line.startswith("    python3 ")]
    return run, send


@pytest.fixture
def copy_of_checkout(tmp_path):
    """The checkout's files (no venvs, caches or Maildirs of its own) in a temporary directory."""
    copy = tmp_path / "smtprelay"
    shutil.copytree(CHECKOUT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "captured-mail", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build"))
    return copy


def test_the_first_command_runs_the_relay_and_the_second_mail_lands_in_captured_mail(copy_of_checkout):
    run, send = two_commands()
    assert run.endswith("--backend maildir:captured-mail") and "127.0.0.1', 2525" in send
    output = copy_of_checkout / "output"
    with open(output, "wb") as out:
        relay = subprocess.Popen(["bash", "-c", run], cwd=copy_of_checkout, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # pip may take a while on a slow mirror; the relay says when it listens.
        wait_until(lambda: relay.poll() is not None or b"listening on 127.0.0.1:2525" in output.read_bytes(),
                   timeout=240, what="the relay to listen on 127.0.0.1:2525")
        assert relay.poll() is None, output.read_text(errors="replace")
        sent = subprocess.run(["bash", "-c", send], cwd=copy_of_checkout, capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.strip() == "{}"      # "{} printed means every recipient was accepted"
        delivered = list((copy_of_checkout / "captured-mail" / "new").iterdir())
        assert len(delivered) == 1
        assert re.search(rb"\r?\nIt works\.\r?\n", delivered[0].read_bytes())
    finally:
        os.killpg(relay.pid, signal.SIGINT)        # Ctrl-C, as the README says
        assert relay.wait(timeout=30) == 0, output.read_text(errors="replace")


def test_what_the_first_command_makes_is_ignored_by_git():
    if not (CHECKOUT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    for path in ("venv/bin/smtprelay", "captured-mail/new/1.example"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=CHECKOUT)
        assert ignored.returncode == 0, f"{path} would show up in git status"


# --- The README's configuration snippets: each one checked by the program it is for -----------

def run_check_config(config, *args):
    """smtprelay --check-config on config (text) -> the CompletedProcess."""
    return run_relay("--check-config", *args, config=config)


def test_the_nginx_and_smtprelay_configurations_side_by_side_are_both_valid(tmp_path):
    first, *lines = readme_block(r"    # nginx\.conf ").splitlines()
    column = first.index("# /etc/smtprelay.conf")
    beside = [line[column - 2:column] == "  " and line[column:].strip() for line in lines]
    nginx_lines = [line[:column].rstrip() if relay else line for line, relay in zip(lines, beside)]
    relay_lines = [relay for relay in beside if relay]
    result = run_check_config("\n".join(relay_lines) + "\n")
    assert result.returncode == 0, result.stderr
    settings = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    assert (settings["auth-http"], settings["xclient"], settings["auth"]) == \
        ("http://127.0.0.1:8008/auth", "true", "none")
    if not shutil.which("nginx") or not os.path.exists(MAIL_MODULE):
        pytest.skip("nginx with its mail module is not installed (.ci/run installs nginx-light, libnginx-mod-mail)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"load_module {MAIL_MODULE};\nevents {{}}\n" + "\n".join(nginx_lines) + "\n")
    checked = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(conf), "-g",
                              f"pid {tmp_path}/nginx.pid; error_log stderr;"], capture_output=True, text=True, timeout=20)
    assert checked.returncode == 0 and "syntax is ok" in checked.stderr, checked.stderr


def test_the_submission_configuration_is_valid_with_a_certificate_in_place(tmp_path):
    tls = TLSMaterial(tmp_path)
    block = readme_block(r"    listen = \[587\]")
    block = re.sub(r"tls-cert = \S+", f"tls-cert = {tls.server.cert_path}", block)
    block = re.sub(r"tls-key = \S+", f"tls-key = {tls.server.key_path}", block)
    result = run_check_config(block + readme_block(r"    tls-listen = \[465\]"))
    assert result.returncode == 0, result.stderr
    assert "starttls = only" in result.stdout and "tls-listen = [465]" in result.stdout


def test_the_haproxy_configuration_shown_is_contrib_haproxy_cfg_and_the_relays_lines_are_valid():
    shown = readme_block(r"    global")
    contrib = (CHECKOUT / "contrib" / "haproxy.cfg").read_text()      # which test_proxy_protocol.py runs
    assert shown.splitlines() == [line for line in contrib.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    result = run_check_config(readme_block(r"    proxy-protocol = true"), "--backend", "127.0.0.1:10025")
    assert result.returncode == 0, result.stderr
