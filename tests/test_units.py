"""The shipped systemd units pass `systemd-analyze verify` once installed as README.md says.

README.md's "Running as a service" is run as written: each of its command
blocks is a shell script (run in a copy of the checkout, so that pip's build
leaves nothing in this one), with two changes:

- every /opt/... and /etc/... becomes ROOT/opt/... and ROOT/etc/..., ROOT a
  temporary directory: `systemd-analyze verify --root=ROOT` reads the units
  and their drop-ins from ROOT/etc/systemd/system and checks ExecStart= and
  ExecReload= as ROOT/opt/smtprelay/bin/smtprelay and ROOT/bin/kill, which
  is what `systemd-analyze verify UNIT` does on the real paths, with no
  write to the real /opt or /etc (checked by hand: the README's commands
  as written, in a private mount namespace with /opt and /etc overlaid,
  then verify with its defaults, print nothing either);
- `systemctl` lines are left out (PID 1 is needed, and it is not ours), and
  so are `systemd-analyze` lines: the tests run verify themselves, with
  --root, --man=no (Documentation= man pages are not ours to install) and
  --recursive-errors=no (ROOT holds no sysinit.target and the like).

The venv is made by `python3 -m venv` and pip installs the checkout into it
with its dependencies, as the README says (some 10 s, once for the module;
the package index is needed, as for .ci/run's own pip install).
verify checks that a command is an executable file, not what it runs, so the
script pip writes, whose #! names ROOT/opt/smtprelay/bin/python3, stands
for the one an administrator gets; it is also run, with --check-config.
The certificate, key and back-end login the README installs are
placeholders: verify reads no credential (systemd copies them at start).

Two roots: the README's (every drop-in installed, for both services) and
one with the units as shipped and no drop-ins (the README's installed
command and /bin/kill copied into it).
"""
import os
import re
import shutil
import stat
import subprocess

import pytest

from helpers import RELAY, relay_env

CHECKOUT = RELAY.parent
SYSTEMD = CHECKOUT / "contrib" / "systemd"
UNITS = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".socket"))
SERVICES = [name for name in UNITS if name.endswith(".service")]
DROP_INS = sorted(p.name for p in SYSTEMD.glob("*.conf"))
INSTALLED = "/opt/smtprelay/bin/smtprelay"
UNIT_DIR = "etc/systemd/system"
SECTION = "## Running as a service"
# What `pip install .` from a checkout reads (setup.py reads README.md), and what the README copies from one.
CHECKOUT_FILES = ["setup.py", "smtprelay.py", "README.md", "smtprelay.conf.sample", "contrib"]
# The files the README's admin has at hand: placeholders (see the module's docstring).
ADMIN_FILES = {"tls.crt": "certificate\n", "tls.key": "key\n", "backend-auth": "relay:secret\n"}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze missing (Debian package systemd)")


def readme_blocks():
    """The indented command blocks of README.md's "Running as a service" -> [text]."""
    text = (CHECKOUT / "README.md").read_text()
    assert SECTION + "\n" in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    "):
            current.append(line[4:])
        elif line.strip() and current:      # text ends a block (a blank line does not)
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def in_root(script, root):
    """A README block as run here: /opt and /etc under `root`, systemctl and systemd-analyze lines left out."""
    lines = [line for line in script.splitlines() if not re.match(r"\s*(systemctl|systemd-analyze)\b", line)]
    return re.sub(r"(?<![\w./-])/(opt|etc)/", lambda m: f"{root}/{m[1]}/", "\n".join(lines))


def settings(path, key):
    """Every value of `key` in unit file or drop-in `path`, in order."""
    found = []
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith(("#", ";")) and name.strip() == key:
            found.append(value.strip())
    return found


def verify(root, *units):
    """`systemd-analyze verify` of `units` installed under `root` -> (exit status, all it printed)."""
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", "--man=no", "--recursive-errors=no",
                             *units], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def readme_root(tmp_path_factory):
    """A root directory holding what the README's commands install, all of them, optional ones too."""
    root, checkout = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT_FILES:
        (shutil.copytree if (CHECKOUT / name).is_dir() else shutil.copy2)(CHECKOUT / name, checkout / name)
    for name, content in ADMIN_FILES.items():
        (checkout / name).write_text(content)
    system(root)
    blocks = readme_blocks()
    assert blocks, f"README.md's {SECTION!r} gives no commands"
    for block in blocks:
        script = in_root(block, root)
        result = subprocess.run(["sh", "-ec", script], cwd=checkout, env=relay_env(), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README.md's commands failed:\n{block}\n\nrun as:\n{script}\n\n" \
                                       f"{result.stdout}{result.stderr}"
    return root


def system(root):
    """What a Debian system has before the README: /opt, /etc/systemd/system and the one command of its own
    that a unit runs, ExecReload=/bin/kill (procps)."""
    for directory in ("opt", UNIT_DIR, "bin"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    if os.path.exists("/bin/kill"):     # else verify says so: the unit would not reload here either
        shutil.copy2("/bin/kill", root / "bin" / "kill")


@pytest.fixture(scope="module")
def shipped_root(readme_root, tmp_path_factory):
    """A root directory with the units as shipped (no drop-in) and the README's installed command."""
    root = tmp_path_factory.mktemp("shipped")
    system(root)
    for name in UNITS:
        shutil.copy2(SYSTEMD / name, root / UNIT_DIR / name)
    (root / INSTALLED[1:]).parent.mkdir(parents=True)
    shutil.copy2(readme_root / INSTALLED[1:], root / INSTALLED[1:])
    return root


def test_the_readme_installs_the_command_every_service_runs_and_it_checks_the_config(readme_root):
    for name in SERVICES:
        assert all(line.split()[0] == INSTALLED for line in settings(SYSTEMD / name, "ExecStart")), name
    command = readme_root / INSTALLED[1:]
    assert command.is_file() and os.access(command, os.X_OK), f"the README's commands leave no {command}"
    result = subprocess.run([command, "-c", readme_root / "etc" / "smtprelay.conf", "--check-config"],
                            env=relay_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_installs_every_drop_in_for_both_services(readme_root):
    for name in SERVICES:
        directory = readme_root / UNIT_DIR / f"{name}.d"
        assert sorted(p.name for p in directory.glob("*.conf")) == DROP_INS, directory


@pytest.mark.parametrize("unit", UNITS)
def test_verify_finds_nothing_to_say_about_the_unit_as_shipped(shipped_root, unit):
    # It warns about unknown keys, bad values, missing units (Service=) and
    # commands that are not executable; the output counts, not only the status.
    assert verify(shipped_root, unit) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_verify_finds_nothing_to_say_about_the_unit_with_every_drop_in_after_the_readme(readme_root, unit):
    assert verify(readme_root, unit) == (0, "")


def test_verify_in_a_root_says_when_the_relay_is_not_installed(shipped_root, tmp_path):
    """What the administrator saw: the check that the two tests above pass, done in the root and not on /opt."""
    root = tmp_path / "root"
    shutil.copytree(shipped_root / "etc", root / "etc")
    status, output = verify(root, *SERVICES)
    assert status != 0
    assert f"Command {INSTALLED} is not executable" in output, output


@pytest.mark.parametrize("unit", SERVICES)
def test_the_units_as_shipped_load_no_credential_and_so_start_without_any_file(unit):
    assert settings(SYSTEMD / unit, "LoadCredential") == []
    assert not any(var.startswith("SMTPRELAY_") for var in settings(SYSTEMD / unit, "Environment"))


def test_the_readme_installs_every_file_a_drop_in_loads_readable_by_root_alone(readme_root):
    sources = {credential.partition(":")[2] for name in DROP_INS
               for credential in settings(SYSTEMD / name, "LoadCredential")}
    assert sources == {"/etc/smtprelay/tls.crt", "/etc/smtprelay/tls.key", "/etc/smtprelay/backend-auth"}
    for source in sources:
        path = readme_root / source[1:]
        assert path.is_file(), f"the README's commands leave no {source}"
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{source}: {stat.filemode(path.stat().st_mode)}"
