"""Configuration, the options contract, listeners and logging (README, Configuration).

Everything here runs the relay as a real process: `run_relay` for runs that
end by themselves (--check-config, bad configuration, --version), the `relay`
fixture for a relay that serves. Back-ends are a Maildir (no server needed)
or the scripted back-end where the back-end dialogue matters. Stopping is
test_stop.py's subject, reloading test_reload.py's.
"""
import ast
import json
import os
import re
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RELAY, backend_args, can_bind, greeted, matching_lines, relay_env, run_relay

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import smtprelay  # noqa: E402  (the module under test, from the repo root)

SAMPLE = ROOT / "smtprelay.conf.sample"
README = ROOT / "README.md"
SETUP = ROOT / "setup.py"
SETTING_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<key>[a-z][a-z0-9-]*) = (?P<value>.*)$")


# --- helpers -------------------------------------------------------------------

def option_keys():
    """The config-file keys of every setting, in parser order (long option without dashes)."""
    return [a.option_strings[0][2:] for a in smtprelay.setting_actions(smtprelay.build_parser())]


def parse_settings(text):
    """--check-config output -> {key: value}; every line must be `key = value`."""
    settings = {}
    for line in text.splitlines():
        m = SETTING_LINE.match(line)
        assert m and not m["comment"], f"not a `key = value` line: {line!r}"
        assert m["key"] not in settings, f"{m['key']} printed twice"
        settings[m["key"]] = m["value"]
    return settings


def check_config(*args, **kwargs):
    """Run --check-config, require exit 0 and a clean stderr -> {key: value}."""
    proc = run_relay("--check-config", *args, **kwargs)
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert proc.stderr == ""
    return parse_settings(proc.stdout)


def assert_config_error(proc, option):
    """Exit 1, nothing on stdout, exactly one stderr line `smtprelay: OPTION: ...`."""
    assert proc.returncode == 1, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"want one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith(f"smtprelay: {option}:"), lines[0]
    return lines[0]


def maildir_messages(path):
    new = Path(path) / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def send_message(host, port, subject="test"):
    with smtplib.SMTP(host, port, timeout=10) as client:
        refused = client.sendmail("a@example.org", ["b@example.org"],
                                  f"Subject: {subject}\r\n\r\nbody\r\n")
    assert refused == {}


# --- --check-config ------------------------------------------------------------

def test_check_config_prints_one_key_value_line_per_option_in_parser_order_and_exits_0():
    settings = check_config("--backend", "127.0.0.1:25")
    assert list(settings) == [key for key in option_keys() if key in settings], "unknown key or out of order"
    parser = smtprelay.build_parser()
    with_value = [a.option_strings[0][2:] for a in smtprelay.setting_actions(parser) if a.default is not None]
    assert sorted({*with_value, "listen", "server-name", "backend"} - set(settings)) == [], \
        "options with a value that --check-config did not print"
    assert settings["backend"] == "[127.0.0.1:25]"
    assert settings["listen"] == "[127.0.0.1:2525]"
    assert settings["xclient"] == "true"
    assert settings["server-name"]  # the FQDN, filled in


def test_check_config_output_read_back_as_a_config_file_gives_the_same_settings():
    first = run_relay("--check-config", "--backend", "192.0.2.1:2525", "--backend", "maildir:/tmp/x",
                      "--listen", "127.0.0.1:2500", "--listen", "[::1]:2500", "--no-xclient",
                      "--timeout", "7.5", "--max-errors", "0", "--bare-newline", "reject",
                      "--server-name", "mx.example.org", "--log-format", "json")
    assert first.returncode == 0, first.stderr
    second = run_relay("--check-config", config=first.stdout)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_check_config_with_a_bad_value_exits_1_with_exactly_one_line_naming_the_option():
    proc = run_relay("--check-config", "--backend", "x:y")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == "smtprelay: --backend: 'x:y': port is not a number\n"


@pytest.mark.parametrize("option", ["check-config", "probe"])
def test_check_config_and_probe_are_command_line_only(option, tmp_path):
    # README: the daemon started with either in its config file or environment
    # would print a report and exit 0 at every start instead of serving.
    backend = f"maildir:{tmp_path / 'mail'}"
    for result in (run_relay("--backend", backend, config=f"{option} = true\n"),
                   run_relay("--backend", backend, env={"SMTPRELAY_" + option.upper().replace("-", "_"): "true"})):
        assert result.returncode == 1
        assert result.stderr == f"smtprelay: --{option}: command line only, not in the config file or the environment\n"
        assert result.stdout == ""


# --- bad configuration ---------------------------------------------------------

BAD_VALUES = [
    ("--backend", ["--backend", "x:y"]),
    ("--backend", ["--backend", ":25"]),
    ("--backend", ["--backend", "maildir:"]),
    ("--listen", ["--backend", "a:1", "--listen", "1.2.3.4:99999"]),
    ("--listen", ["--backend", "a:1", "--listen", "[nonsense]:25"]),
    ("--listen", ["--backend", "a:1", "--listen", "127.0.0.1:"]),
    ("--timeout", ["--backend", "a:1", "--timeout", "abc"]),
    ("--timeout", ["--backend", "a:1", "--timeout", "-1"]),
    ("--timeout", ["--backend", "a:1", "--timeout", "nan"]),
    ("--max-clients", ["--backend", "a:1", "--max-clients", "0"]),
    ("--max-errors", ["--backend", "a:1", "--max-errors", "x"]),
    ("--bare-newline", ["--backend", "a:1", "--bare-newline", "maybe"]),
    ("--log-level", ["--backend", "a:1", "--log-level", "loud"]),
    ("--log-format", ["--backend", "a:1", "--log-format", "xml"]),
    ("--server-name", ["--backend", "a:1", "--server-name", "two words"]),
    # str.isdigit() is true for superscript digits, which int() refuses
    ("--listen", ["--backend", "a:1", "--listen", "127.0.0.1:\u00b2"]),
    ("--backend", ["--backend", "a:\u00b3"]),
    # found in review: each passed --check-config, then failed every session
    ("--backend", ["--backend", "a..b:25"]),
    ("--timeout", ["--backend", "a:1", "--timeout", "1e308"]),
    ("--proxy-timeout", ["--backend", "a:1", "--proxy-timeout", "1e308"]),
    ("--greeting-delay", ["--backend", "a:1", "--greeting-delay", "1e10"]),
    ("--metrics", ["--backend", "a:1", "--metrics", ""]),
    ("--backend-proxy-protocol", ["--backend", "a:1", "--backend-proxy-protocol", "v3"]),
]


@pytest.mark.parametrize("option,args", BAD_VALUES, ids=[" ".join(a[-2:]) for _, a in BAD_VALUES])
def test_a_bad_value_exits_1_with_one_stderr_line_naming_the_option(option, args):
    assert_config_error(run_relay(*args), option)


BAD_SOURCES = [
    ("--timeout", dict(config="backend = a:1\ntimeout = abc\n")),
    ("--max-clients", dict(config="backend = a:1\n", env={"SMTPRELAY_MAX_CLIENTS": "0"})),
    ("--listen", dict(config="backend = a:1\n", env={"SMTPRELAY_LISTEN": "[127.0.0.1:2525, 1.2.3.4:99999]"})),
    ("--backend", dict(config="backend = [a:1, x:y]\n")),
    ("--timeout", dict(config="backend = a:1\ntimeout = [1, 2]\n")),
    ("--xclient", dict(config="backend = a:1\nxclient = maybe\n")),
    ("--xclient", dict(config="backend = a:1\n", env={"SMTPRELAY_XCLIENT": "maybe"})),
    ("--xclient", dict(config="backend = a:1\nno-xclient = true\n")),      # read as --xclient otherwise
]


@pytest.mark.parametrize("option,source", BAD_SOURCES,
                         ids=["config timeout=abc", "env MAX_CLIENTS=0", "env LISTEN list", "config backend list",
                              "config timeout=[list]", "config xclient=maybe", "env XCLIENT=maybe",
                              "config no-xclient=true"])
def test_a_bad_value_from_the_config_file_or_environment_exits_1_naming_the_option(option, source):
    assert_config_error(run_relay(**source), option)


def test_no_backend_at_all_exits_1_naming_backend():
    line = assert_config_error(run_relay(), "--backend")
    assert "no back-end" in line


def test_an_unknown_key_in_the_config_file_exits_1_naming_the_file_and_the_key(tmp_path):
    config = tmp_path / "relay.conf"
    config.write_text("backend = a:1\nmax-erors = 3\n")
    proc = run_relay("-c", str(config))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"smtprelay: {config}:")
    assert "max-erors" in proc.stderr


def test_an_unknown_command_line_option_is_a_usage_error_exiting_2():
    proc = run_relay("--backend", "a:1", "--no-such-option")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: smtprelay")
    assert "unrecognized arguments: --no-such-option" in proc.stderr


@pytest.mark.parametrize("form", ["-c PATH", "--config PATH", "--config=PATH"])
def test_a_missing_config_file_exits_1_naming_the_file(tmp_path, form):
    missing = tmp_path / "nonexistent.conf"
    args = form.replace("PATH", str(missing)).split(" ")
    proc = run_relay(*args, "--backend", "a:1", "--check-config")
    assert proc.returncode == 1, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("smtprelay: ") and str(missing) in proc.stderr


def test_a_listen_port_already_in_use_exits_1_naming_listen(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the first listener binds fine; the relay must close it and give up on the second
        proc = run_relay("--backend", f"maildir:{tmp_path / 'mail'}", "--listen", f"127.0.0.1:{port}",
                         listen="127.0.0.1:0", timeout=10)
    line = assert_config_error(proc, "--listen")
    assert f"127.0.0.1:{port}" in line


# --- precedence: command line > environment > config file > default ----------

PRECEDENCE = [
    # config file, environment, command line -> max-errors
    (None, None, None, "5"),
    ("7", None, None, "7"),
    ("7", "8", None, "8"),
    (None, "8", None, "8"),
    ("7", "8", "9", "9"),
]


@pytest.mark.parametrize("in_config,in_env,on_command_line,effective", PRECEDENCE)
def test_command_line_beats_environment_beats_config_file_beats_default(
        in_config, in_env, on_command_line, effective):
    config = "backend = a:1\n" + (f"max-errors = {in_config}\n" if in_config else "")
    env = {"SMTPRELAY_MAX_ERRORS": in_env} if in_env else None
    args = ["--max-errors", on_command_line] if on_command_line else []
    assert check_config(*args, config=config, env=env)["max-errors"] == effective


def test_repeatable_options_take_lists_in_the_config_file_and_the_environment_with_the_same_precedence():
    config = "backend = [a:1, b:2]\nlisten = [127.0.0.1:2600, 2601]\n"
    assert check_config(config=config)["backend"] == "[a:1, b:2]"
    assert check_config(config=config)["listen"] == "[127.0.0.1:2600, 2601]"
    env = {"SMTPRELAY_BACKEND": "[c:3, d:4]"}
    assert check_config(config=config, env=env)["backend"] == "[c:3, d:4]"
    # a repeatable option on the command line replaces the list, it does not add to it
    assert check_config("--backend", "e:5", "--backend", "f:6", config=config, env=env)["backend"] == "[e:5, f:6]"


@pytest.mark.parametrize("config,env,args,effective", [
    ("xclient = false\n", None, [], "false"),
    ("xclient = false\n", {"SMTPRELAY_XCLIENT": "true"}, [], "true"),
    ("xclient = false\n", None, ["--xclient"], "true"),
    ("", {"SMTPRELAY_XCLIENT": "true"}, ["--no-xclient"], "false"),
])
def test_the_xclient_switch_follows_the_same_precedence(config, env, args, effective):
    assert check_config("--backend", "a:1", *args, config=config, env=env)["xclient"] == effective


# --- the sample config and the README are in step with the parser -------------

def sample_settings():
    """{key: (commented?, value, description above)} for every `key = value` / `# key = value` line.

    The description is the nearest line above that is not itself a setting, so
    settings documented together (tls-cert and tls-key) share one comment.
    """
    lines = SAMPLE.read_text().splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = SETTING_LINE.match(line)
        if m:
            assert m["key"] not in found, f"{m['key']} twice in the sample"
            above = i - 1
            while above >= 0 and SETTING_LINE.match(lines[above]):
                above -= 1
            found[m["key"]] = (bool(m["comment"]), m["value"], lines[above] if above >= 0 else "")
    return found


def test_the_sample_config_lists_every_option_with_a_comment_above_and_no_unknown_key():
    sample = sample_settings()
    keys = option_keys()
    missing, unknown = sorted(set(keys) - set(sample)), sorted(set(sample) - set(keys))
    assert not missing, f"options missing from the sample: {missing}"
    assert not unknown, f"keys in the sample the parser does not know: {unknown}"
    for key, (_, _, above) in sample.items():
        assert above.startswith("#") and above.strip("# "), \
            f"{key}: no comment line above it in the sample (got {above!r})"


def test_every_active_value_in_the_sample_config_is_the_default():
    defaults = check_config("--backend", "127.0.0.1:25")   # the effective defaults
    parser = smtprelay.build_parser()
    for action in smtprelay.setting_actions(parser):
        key = action.option_strings[0][2:]
        if action.default is not None:                       # the parser's default and --check-config agree
            expected = {True: "true", False: "false"}.get(action.default, action.default)
            assert defaults[key] == str(expected), key
    for key, (commented, value, _) in sample_settings().items():
        if not commented and key != "backend":
            assert value == defaults[key], f"sample says {key} = {value}, the default is {defaults[key]}"


def test_check_config_accepts_the_sample_config_as_it_is():
    proc = run_relay("--check-config", "-c", str(SAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_the_readme_options_table_lists_every_option_of_the_parser():
    table = [line for line in README.read_text().splitlines() if line.startswith("| `--")]
    in_table = set(re.findall(r"--[a-z][a-z0-9-]*", "\n".join(table)))
    parser = smtprelay.build_parser()
    actions = smtprelay.setting_actions(parser) + [a for a in parser._actions if a.dest == "check_config"]
    wanted = {s for a in actions for s in a.option_strings if s.startswith("--")}
    missing = sorted(wanted - in_table)
    assert not missing, f"options missing from the README's table: {missing}"


# --- the console script and --version ------------------------------------------

@pytest.mark.parametrize("argv", [["-m", "smtprelay"], [str(RELAY)]], ids=["python -m smtprelay", "smtprelay.py"])
def test_version_prints_the_version_and_exits_0(argv):
    proc = subprocess.run([sys.executable, *argv, "--version"], cwd=ROOT, env=relay_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"smtprelay {smtprelay.__version__}\n"


def test_setup_py_declares_the_smtprelay_console_script_and_the_module_version():
    tree = ast.parse(SETUP.read_text())
    [call] = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    kwargs = {k.arg: k.value for k in call.keywords}
    entry_points = ast.literal_eval(kwargs["entry_points"])
    assert "smtprelay = smtprelay:main" in [s.replace(" ", "").replace("=", " = ")
                                            for s in entry_points["console_scripts"]]
    assert ast.literal_eval(kwargs["py_modules"]) == ["smtprelay"]
    assert ast.literal_eval(kwargs["version"]) == smtprelay.__version__
    # The entry point runs: --check-config validates and exits 0 without binding anything.
    assert smtprelay.main(["-c", os.devnull, "--check-config", "--backend", "127.0.0.1:25"]) == 0


# --- running: listeners ------------------------------------------------------------

def test_listen_on_port_0_logs_the_port_actually_bound_and_serves_it(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}")
    assert r.argv[r.argv.index("--listen") + 1] == "127.0.0.1:0"
    assert int(r.wait_for_log(r"listening on 127\.0\.0\.1:([1-9][0-9]*)$")[1]) == r.port
    send_message(r.host, r.port)
    assert len(maildir_messages(tmp_path / "mail")) == 1


def test_two_listen_options_give_two_listeners_both_serving(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", "--listen", "127.0.0.1:0")
    assert len(r.listeners) == 2 and len(set(r.ports)) == 2
    for host, port in r.listeners:
        send_message(host, port, subject=f"via {port}")
    assert len(maildir_messages(tmp_path / "mail")) == 2


@pytest.mark.skipif(not can_bind("::1"), reason="this machine has no IPv6 loopback address ::1")
def test_listen_on_ipv6_loopback_serves_over_ipv6(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", listen="[::1]:0")
    assert r.host == "::1"
    assert r.address == f"[::1]:{r.port}"
    send_message("::1", r.port)
    assert len(maildir_messages(tmp_path / "mail")) == 1


def test_a_listen_list_in_the_config_file_gives_two_listeners(relay, tmp_path):
    r = relay(config=f"backend = maildir:{tmp_path / 'mail'}\nlisten = [127.0.0.1:0, 127.0.0.1:0]\n",
              listen=None)
    r.wait_listening(2)
    for host, port in r.listeners:
        send_message(host, port)
    assert len(maildir_messages(tmp_path / "mail")) == 2


def test_smtprelay_backend_and_smtprelay_listen_in_the_environment_start_a_working_relay(relay, tmp_path):
    r = relay(listen=None, env={"SMTPRELAY_LISTEN": "127.0.0.1:0",
                                "SMTPRELAY_BACKEND": f"maildir:{tmp_path / 'mail'}"})
    assert r.host == "127.0.0.1"
    send_message(r.host, r.port)
    assert len(maildir_messages(tmp_path / "mail")) == 1


def test_a_listen_list_in_the_environment_gives_two_listeners(relay, tmp_path):
    r = relay(listen=None, env={"SMTPRELAY_LISTEN": "[127.0.0.1:0, 127.0.0.1:0]",
                                "SMTPRELAY_BACKEND": f"maildir:{tmp_path / 'mail'}"})
    r.wait_listening(2)
    assert len(set(r.ports)) == 2


# --- logging -------------------------------------------------------------------

def test_json_log_format_writes_every_stderr_line_as_a_json_object_with_time_level_message(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", "--log-format", "json", "--log-level", "debug")
    send_message(r.host, r.port)
    assert r.stop() == 0
    assert len(r.lines) > 3
    for line in r.lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "message"} <= set(entry), line
        assert entry["level"] in ("debug", "info", "warning", "error"), line
    messages = [json.loads(line)["message"] for line in r.lines]
    assert any(m.startswith(f"listening on 127.0.0.1:{r.port}") for m in messages)


def test_debug_log_level_logs_the_dialogue_with_who_said_each_line(relay, scripted_backend):
    backend = scripted_backend()
    r = relay("--backend", backend.address, "--log-level", "debug")
    with smtplib.SMTP(r.host, r.port, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail("a@example.org", ["b@example.org"], b"Subject: debug\r\n\r\nhi\r\n")
    r.wait_for_log(r"(?i) C: ehlo client\.example$")
    r.wait_for_log(r" S: 220 ")
    r.wait_for_log(r"(?i) S>B: mail FROM:<a@example\.org>")
    r.wait_for_log(r" B: 250 ")
    r.wait_for_log(r"(?i) C: quit$")
    assert r.stop() == 0


def test_debug_log_escapes_an_esc_byte_sent_by_the_client(relay, tmp_path):
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", "--log-level", "debug")
    client = r.smtp()
    code, _ = client.docmd("NOOP \x1b[31mred")
    assert code // 100 == 5  # a control character in a command is refused
    client.docmd("HELO \x1b]0;title\x07")
    assert client.quit()[0] == 221
    r.wait_for_log(r" C: NOOP \\x1b\[31mred$")
    r.wait_for_log(r" C: HELO \\x1b\]0;title\\x07$")
    assert r.stop() == 0
    assert "\x1b" not in r.log_text() and "\x07" not in r.log_text()


def test_debug_log_escapes_c1_control_characters_sent_by_the_client(relay, tmp_path):
    # U+009B is CSI, U+0085 is NEL (a line break to str.splitlines); both are control characters
    r = relay("--backend", f"maildir:{tmp_path / 'mail'}", "--log-level", "debug")
    sock = r.connect()
    with sock.makefile("rb") as replies:
        assert replies.readline().startswith(b"220 ")
        sock.sendall("NOOP \u009b31mred \u0085next\r\n".encode())
        assert replies.readline()[:1] in (b"2", b"5")
        sock.sendall(b"QUIT\r\n")
        assert replies.readline().startswith(b"221 ")
    r.wait_for_log(r" C: QUIT$")
    assert r.stop() == 0
    assert "\u009b" not in r.log_text() and "\u0085" not in r.log_text(), \
        [line for line in r.lines if " C: NOOP" in line]


def test_debug_log_escapes_c1_control_characters_in_lines_to_the_backend(relay, scripted_backend):
    # C0 and DEL never reach a back-end command (the relay refuses them in any
    # command); C1 may, in a quoted local part with SMTPUTF8.
    backend = scripted_backend()
    r = relay(*backend_args(backend), "--log-level", "debug", kill=True)
    client = greeted(r, ehlo="client.example")
    assert client.say('MAIL FROM:<"a\u0085b\u009bc"@example.org> SMTPUTF8').code == 250
    assert backend.sessions[0].commands[-1] == 'MAIL FROM:<"a\u0085b\u009bc"@example.org> SMTPUTF8'.encode()
    r.wait_for_log(r' S>B: MAIL FROM:<"a\\x85b\\x9bc"@example\.org> SMTPUTF8$')
    s_to_b = matching_lines(r, " S>B: ")
    assert s_to_b and not any(re.search("[\x00-\x1f\x7f-\x9f]", line) for line in s_to_b), s_to_b


def test_a_key_set_twice_in_the_config_file_exits_1_naming_both_lines(tmp_path):
    # configargparse would take the last one without a word.
    config = tmp_path / "relay.conf"
    config.write_text("backend = a:1\nmax-errors = 3\n# a comment\nmax-errors = 4\n")
    line = assert_config_error(run_relay("-c", str(config), "--check-config"), "-c")
    assert line == f"smtprelay: -c: {config}: line 4: max-errors is set on line 2 already"


def test_help_says_where_settings_come_from_and_links_nowhere():
    result = run_relay("--help")
    assert result.returncode == 0
    assert "SMTPRELAY_MAX_ERRORS=5" in result.stdout and "'max-errors = 5'" in result.stdout
    assert re.findall(r"https?://\S+", result.stdout) == ["http://ADDR/metrics"]     # no shortened link to follow


def test_backend_auth_file_gives_the_credentials_and_never_both(tmp_path, scripted_backend, relay):
    secret = tmp_path / "backend-auth"
    secret.write_text("relay:Relay-Secret-9\n")
    settings = check_config("--backend", "a:1", "--backend-auth-file", str(secret))
    assert settings["backend-auth-file"] == str(secret) and "backend-auth" not in settings
    assert "Relay-Secret-9" not in json.dumps(settings)
    both = run_relay("--backend", "a:1", "--backend-auth-file", str(secret), "--backend-auth", "u:p", "--check-config")
    assert assert_config_error(both, "--backend-auth-file").endswith("--backend-auth and --backend-auth-file "
                                                                     "exclude each other")
    missing = run_relay("--backend", "a:1", "--backend-auth-file", str(tmp_path / "none"), "--check-config")
    assert "No such file or directory" in assert_config_error(missing, "--backend-auth-file")

    backend = scripted_backend(extensions=["AUTH PLAIN", "XCLIENT ADDR NAME HELO"], auth={"relay": "Relay-Secret-9"})
    r = relay("--backend", backend.address, "--backend-auth-file", str(secret))
    send_message(r.host, r.port)
    [session] = backend.sessions
    assert [(a.user, a.accepted) for a in session.auths] == [("relay", True)]
    assert "--backend-auth on the command line" not in r.log_text()


def test_backend_auth_on_the_command_line_is_warned_about(relay, scripted_backend):
    backend = scripted_backend(extensions=["AUTH PLAIN", "XCLIENT ADDR NAME HELO"], auth={"relay": "pw"})
    r = relay("--backend", backend.address, "--backend-auth", "relay:pw")
    assert r.wait_for_log(r"WARNING --backend-auth on the command line is there for every user of this host to see")
