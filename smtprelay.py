#!/usr/bin/env python3
"""smtprelay: a reverse SMTP proxy in one file.

smtprelay speaks SMTP to clients (RFC 5321, with PIPELINING RFC 2920, SIZE
RFC 1870, 8BITMIME RFC 6152, ENHANCEDSTATUSCODES RFC 2034/3463, SMTPUTF8
RFC 6531, AUTH RFC 4954 and STARTTLS RFC 3207), decides where each client's
mail goes (a static list of back-ends, or an HTTP service speaking nginx's
auth_http protocol), and hands every message to that back-end mail server
with smtplib, passing the real client on with Postfix's XCLIENT. It keeps no
queue: a client hears 250 for a message only after the back-end said 250.

    smtprelay --listen 127.0.0.1:2525 --backend 127.0.0.1:25
    smtprelay --backend maildir:/tmp/mail       # capture mail, no server needed
    smtprelay --backend stdout:                 # print each message (smtpd.DebuggingServer)
    smtprelay --auth-http http://127.0.0.1:8008/auth --auth plain,login

Every option also reads from SMTPRELAY_<OPTION> and from the config file
(-c FILE, default /etc/smtprelay.conf); see README.md.

It runs as a daemon with its own listeners, on sockets systemd passes on
(socket activation, sd_notify), or one session at a time from inetd
(--inetd); behind haproxy it reads the PROXY protocol. With --workers N it
forks N processes that serve the same listeners, limits counted across all.
"""

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import ipaddress
import hashlib
import heapq
import itertools
import json
import logging
import logging.handlers
import mmap
import os
import re
import secrets
import select
import shutil
import signal
import smtplib
import socket
import socketserver
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
import typing
import urllib.parse

import configargparse

requests = None     # imported by AuthService, the one user: no cost without --auth-http

__version__ = "0.1.0"
__all__ = ["RelayError", "ConfigError", "SMTPError", "load_config", "make_servers", "main"]

log = logging.getLogger("smtprelay")


# --- 1. Configuration: options, defaults, validation -------------------------
# Options come from the command line, SMTPRELAY_* variables and the config
# file, in that precedence (configargparse). Each is declared once, in
# SETTINGS; argparse only collects strings, and validate() reads them into a
# frozen Config, so that a bad value from any source gives one line naming
# the option and exit status 1 (README, Configuration).

DEFAULT_CONFIG_FILE = "/etc/smtprelay.conf"
DEFAULT_LISTEN = "127.0.0.1:2525"
ENV_PREFIX = "SMTPRELAY_"
AUTH_METHODS = ("none", "plain", "login", "cram-md5", "external")
MAX_SECONDS = 86400 * 7     # timeouts beyond a week overflow the OS's timers


class RelayError(Exception):
    """The root of the relay's own exceptions. Each says what went wrong; where
    it is caught decides who hears of it (a reply, a log line, exit 1)."""


class ConfigError(RelayError):
    """A bad setting; str() is the one line for stderr, naming the option."""

    def __init__(self, option, message):
        """option: the option at fault, as the user writes it ("--backend"); message: what is wrong."""
        super().__init__(f"{option}: {message}")
        self.option = option


class SettingsFileParser(configargparse.DefaultConfigFileParser):
    """A config file that does not parse is a ConfigError (exit 1, and a SIGHUP that keeps
    the old settings), not argparse's usage error (exit 2)."""

    def parse(self, stream):
        """Overridden so that a line that does not parse, or a key set twice (the last
        would win unseen), is a ConfigError naming the file and the line."""
        name = getattr(stream, "name", "the config file")
        items, lines = {}, {}
        for number, line in enumerate(stream, 1):
            try:
                item = super().parse([line])
            except configargparse.ConfigFileParserException:
                raise ConfigError("-c", f"{name}: line {number} does not parse: {line.strip()}") from None
            for key, value in item.items():
                if key in items:
                    raise ConfigError("-c", f"{name}: line {number}: {key} is set on line {lines[key]} already")
                items[key], lines[key] = value, number
        return items


class SettingsParser(configargparse.ArgParser):
    """configargparse reports a bad value from the config file or the
    environment through error(), as a usage error (exit 2); here it becomes
    a ConfigError naming the option (exit 1)."""

    source = None       # the option being read from the file or environment

    def convert_item_to_command_line_arg(self, action, key, value):
        """Overridden to note which option a file or environment value is for (error() names it), and to
        refuse "no-X" keys."""
        self.source = action.option_strings[0] if action else None     # None: an unknown key
        if action and key.startswith("no-"):
            # configargparse would read "no-xclient = true" as --xclient.
            raise ConfigError(self.source, f"{key}: write '{key[3:]} = false' instead")
        try:
            return super().convert_item_to_command_line_arg(action, key, value)
        finally:
            self.source = None

    def _open_config_files(self, command_line_args):
        """Overridden so that a config file that cannot be opened is a ConfigError naming -c."""
        self.source = "-c"
        try:
            return super()._open_config_files(command_line_args)
        finally:
            self.source = None

    def error(self, message):
        """Overridden: a bad value from the config file or the environment is a ConfigError naming its option
        (exit 1); anything else stays argparse's usage error (exit 2)."""
        if self.source:
            raise ConfigError(self.source, message)
        super().error(message)


def is_number(text):
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return re.fullmatch(r"[0-9]+", text) is not None


def parse_number(option, text, minimum=0, kind=int, maximum=None):
    """An option's text -> a number of kind (int or float); raises ConfigError naming the option
    where it is no number, below minimum, above maximum, or not finite."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise ConfigError(option, f"{text!r}: not a number") from None
    if value < minimum or value != value or value == float("inf"):
        raise ConfigError(option, f"{text!r}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(option, f"{text!r}: must be at most {maximum:g}")
    return value


MAX_WORKERS = 64


def parse_workers(option, text):
    """--workers: N, or auto for the CPUs this process may run on -> N."""
    if text.strip() == "auto":
        return min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    return parse_number(option, text, 1, maximum=MAX_WORKERS)


def parse_choice(option, text, choices):
    """An option's text -> itself if it is one of choices; else ConfigError listing them."""
    if text not in choices:
        raise ConfigError(option, f"{text!r}: must be one of {', '.join(choices)}")
    return text


def parse_address(option, text, default_port=None):
    """HOST:PORT, [V6ADDR]:PORT, or PORT alone (host '' = all addresses) -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(option, f"{text!r}: bad IPv6 address, use [ADDR]:PORT")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(option, f"{text!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        raise ConfigError(option, f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    elif ":" in text:
        host, _, port = text.partition(":")
    elif is_number(text):
        host, port = "", text
    else:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise ConfigError(option, f"{text!r}: no port")
        port = str(default_port)
    if not is_number(port):
        raise ConfigError(option, f"{text!r}: port is not a number")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(option, f"{text!r}: port out of range")
    if host and not is_host(host):
        raise ConfigError(option, f"{text!r}: bad host name")
    return host, int(port)


def is_host(text, address_ok=True):
    """An IP address (unless address_ok is False: a PTR name that is an address in
    disguise, Postfix's valid_hostname), or a DNS name whose labels are 1 to 63
    letters, digits, - or _."""
    try:
        ipaddress.ip_address(text)
        return address_ok
    except ValueError:
        labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
        return len(text) <= 253 and all(re.fullmatch(r"[A-Za-z0-9_-]{1,63}", label) for label in labels)


def format_address(host, port):
    """(host, port) -> HOST:PORT, an IPv6 address in brackets ([V6]:PORT)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendSpec(typing.NamedTuple):
    """A --backend value, parsed: kind "smtp" (host, port), "maildir" (path) or "stdout"."""
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self):
        """For the log: HOST:PORT, maildir:PATH or stdout:."""
        return format_address(self.host, self.port) if self.kind == "smtp" else f"{self.kind}:{self.path}"


def parse_backend(text):
    """A --backend value -> BackendSpec; Setup makes the back-end of each."""
    if text == "stdout:":
        return BackendSpec("stdout")
    if text.startswith("stdout:"):
        raise ConfigError("--backend", f"{text!r}: stdout: takes nothing after the colon")
    if text.startswith("maildir:"):
        path = text[len("maildir:"):]
        if not path:
            raise ConfigError("--backend", f"{text!r}: no path after maildir:")
        path = os.path.abspath(path)
        parent = path if os.path.isdir(path) else os.path.dirname(path)
        while not os.path.isdir(parent):        # the Maildir and its parents are made at start
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError("--backend", f"{text!r}: {parent} is not writable")
        return BackendSpec("maildir", path=path)
    host, port = parse_address("--backend", text, default_port=25)
    if not host:
        raise ConfigError("--backend", f"{text!r}: no host")
    if port == 0:
        raise ConfigError("--backend", f"{text!r}: port 0")
    return BackendSpec("smtp", host, port)


def default_server_name():
    """The host's FQDN; its plain name where the resolver only knows localhost."""
    name = socket.getfqdn()
    return socket.gethostname() if name.startswith("localhost") else name


def parse_auth_methods(text):
    """--auth -> the list of methods, in the order EHLO names them."""
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    for method in methods:
        parse_choice("--auth", method, AUTH_METHODS)
    if not methods:
        raise ConfigError("--auth", "no method given")
    return [m for m in AUTH_METHODS if m in methods]


def parse_auth_http(text):
    """--auth-http -> the URL as given; ConfigError unless http:// or https:// with a host and a good port."""
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("--auth-http", f"{text!r}: not an http:// or https:// URL")
    try:
        url.port
    except ValueError:
        raise ConfigError("--auth-http", f"{text!r}: bad port") from None
    return text


def parse_header(text):
    """An --auth-http-header 'Name: value' -> (name, value); no control characters in the value."""
    name, sep, value = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name.strip()) or re.search(r"[\x00-\x1f\x7f]", value):
        raise ConfigError("--auth-http-header", f"{text!r}: write 'Name: value'")
    return name.strip(), value.strip()


def parse_regex(option, text):
    """--allow-sender or --allow-recipient -> a compiled pattern, any case; None when not given."""
    try:
        return re.compile(text, re.IGNORECASE) if text is not None else None
    except re.error as e:
        raise ConfigError(option, f"{text!r}: {e}") from None


def parse_network(text, option="--allow-from"):
    """An --allow-from or --real-ip-from value -> ip_network; host bits may be set (10.1.2.3/8)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(option, f"{text!r}: not an address or CIDR network") from None


def check_readable(option, path):
    """Raise ConfigError naming the option where path cannot be read: one line at start, not a failure later."""
    try:
        open(path, "rb").close()
    except OSError as e:
        raise ConfigError(option, f"{path}: {e.strerror}") from None


def check_certificate(path):
    """Refuse a certificate file that is not PEM or has expired (one line at start, not a failing handshake later)."""
    check_readable("--tls-cert", path)
    # ssl has no public way to read a certificate file; this private helper
    # is in every CPython 3, and without it the check is skipped.
    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    if decode is None:
        return
    try:
        info = decode(path)
    except (ssl.SSLError, ValueError):
        raise ConfigError("--tls-cert", f"{path}: not a PEM certificate") from None
    if ssl.cert_time_to_seconds(info["notAfter"]) < time.time():
        raise ConfigError("--tls-cert", f"{path}: expired on {info['notAfter']}")


def make_server_tls(cert, key, client_ca, verify_client):
    """The clients' side TLS context: TLS 1.2 or newer, no compression; raises ConfigError naming the file."""
    check_certificate(cert)
    check_readable("--tls-key", key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    def pass_phrase():
        """Asked for an encrypted key: OpenSSL's own prompt would wait on a terminal, or fail without one."""
        raise ConfigError("--tls-key", f"{key}: encrypted with a pass phrase, which the relay cannot ask for: "
                                       f"decrypt it (openssl pkey -in KEY -out NEW_KEY), readable by root alone")

    try:
        context.load_cert_chain(cert, key, password=pass_phrase)
    except ssl.SSLError as e:
        raise ConfigError("--tls-key", f"{key}: not the private key of {cert} ({e.reason or e})") from None
    if client_ca:
        check_readable("--tls-client-ca", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError:
            raise ConfigError("--tls-client-ca", f"{client_ca}: no PEM certificates") from None
    # "on" asks like "optional", so that a client without a certificate
    # finishes the handshake and hears why it is turned away (nginx).
    context.verify_mode = ssl.CERT_NONE if verify_client == "off" else ssl.CERT_OPTIONAL
    return context


def make_backend_tls(ca, verify):
    """The back-end side TLS context: certificate and name verified unless verify is off."""
    if ca:
        check_readable("--backend-tls-ca", ca)
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError:
        raise ConfigError("--backend-tls-ca", f"{ca}: no PEM certificates") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify == "off":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def parse_user(name):
    """--user -> its pwd entry; raises ConfigError for an unknown user."""
    import pwd
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ConfigError("--user", f"{name!r}: no such user") from None


def parse_backend_auth(option, text):
    """--backend-auth USER:PASSWORD -> (user, password)."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ConfigError(option, "write USER:PASSWORD")
    return user, password


def read_backend_auth_file(path):
    """--backend-auth-file: USER:PASSWORD on the file's first line -> (user, password)."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline(4096).rstrip("\r\n")
    except OSError as e:
        raise ConfigError("--backend-auth-file", f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--backend-auth-file", f"{path}: not UTF-8") from None
    if ":" not in line[1:]:
        raise ConfigError("--backend-auth-file", f"{path}: the first line must be USER:PASSWORD")
    return parse_backend_auth("--backend-auth-file", line)


def parse_server_name(option, text):
    """--server-name: one word of printable ASCII, as a greeting can carry it."""
    if not PRINTABLE_ASCII.fullmatch(text):
        raise ConfigError(option, f"{text!r}: must be one word of printable ASCII")
    return text


class Setting(typing.NamedTuple):
    """One option and the Config field it fills: its flag, help, default (as text)
    and metavar, and read(option, text) -> value. Without read, the text itself,
    or one of the choices a metavar "{a,b}" lists. Given more than once
    (append), each value is read: the field is their list."""
    flag: str
    help: str
    default: str = None
    metavar: str = None
    read: typing.Callable = None
    action: object = None           # argparse's: "append", "store_true" or BooleanOptionalAction

    @property
    def dest(self):
        """The Config field: --max-errors is max_errors."""
        return self.flag[2:].replace("-", "_")

    def value(self, text):
        """The option's text (a list of them, for append) -> its Config value; raises ConfigError."""
        if self.action == "append":
            return [self.value_of(t) for t in text or []]
        return text if text is None or isinstance(text, bool) else self.value_of(text)

    def value_of(self, text):
        """One text -> its value."""
        if self.read:
            return self.read(self.flag, text)
        if self.metavar and self.metavar.startswith("{"):
            return parse_choice(self.flag, text, self.metavar.strip("{}").split(","))
        return text


def read_seconds(minimum=0.001):
    """read= for a number of seconds, at least minimum."""
    return lambda option, text: parse_number(option, text, minimum, float, maximum=MAX_SECONDS)


def read_count(minimum=0):
    """read= for a whole number, at least minimum."""
    return lambda option, text: parse_number(option, text, minimum)


# Every option a config file, the environment or the command line may set, in
# the order --help and --check-config list them; Config has a field for each.
SETTINGS = [
    Setting("--listen", f"plain SMTP listener, HOST:PORT, [V6]:PORT or PORT (default {DEFAULT_LISTEN})",
            metavar="ADDR", action="append", read=parse_address),
    Setting("--tls-listen", "implicit-TLS listener (SMTPS, port 465 style)", metavar="ADDR", action="append",
            read=parse_address),
    Setting("--server-name", "name in the greeting and EHLO reply (default: the FQDN)", metavar="NAME",
            read=parse_server_name),
    Setting("--backend", "back-end HOST:PORT (port 25 if omitted), maildir:PATH or stdout:; repeat for failover "
            "(--balance)", metavar="BACKEND", action="append", read=lambda option, text: parse_backend(text.strip())),
    Setting("--balance", "which --backend a new back-end session tries first: the first listed, the next in turn, "
            "or the one with the fewest open connections; the others follow as failover (default first)",
            "first", "{first,roundrobin,leastconn}"),
    Setting("--auth-http", "nginx-compatible auth service that decides who may send and names the back-end",
            metavar="URL", read=lambda option, text: parse_auth_http(text)),
    Setting("--auth-http-header", "extra header on every auth request", metavar="'NAME: VALUE'", action="append",
            read=lambda option, text: parse_header(text)),
    Setting("--auth-http-timeout", "deadline for the auth service's whole answer (default 60)", "60", "SECONDS",
            read_seconds()),
    Setting("--auth-http-scope", "with --auth none: ask the auth service once per session (as nginx) or for every "
            "transaction (default session)", "session", "{session,transaction}"),
    Setting("--auth", "comma list of none, plain, login, cram-md5, external; without none, AUTH is required "
            "(default none)", "none", "METHODS", lambda option, text: parse_auth_methods(text)),
    Setting("--xclient", "pass the client on with XCLIENT; a back-end that refuses it counts as down (default on)",
            True, action=argparse.BooleanOptionalAction),
    Setting("--resolve", "look up the client's name (PTR, confirmed by a forward lookup) for XCLIENT and the auth "
            "service (default on)", "on", "{on,off}"),
    Setting("--resolve-timeout", "the longest a name lookup may delay a session; then [TEMPUNAVAIL] (default 5)", "5",
            "SECONDS", read_seconds()),
    Setting("--starttls", "offer STARTTLS; only: every command but NOOP, EHLO, STARTTLS and QUIT needs TLS first "
            "(default off)", "off", "{off,on,only}"),
    Setting("--tls-cert", "server certificate (chain), PEM", metavar="FILE"),
    Setting("--tls-key", "its private key, PEM", metavar="FILE"),
    Setting("--tls-client-ca", "CAs that client certificates are verified against", metavar="FILE"),
    Setting("--tls-verify-client", "ask clients for a certificate; on: no session without a valid one (default off)",
            "off", "{off,on,optional}"),
    Setting("--backend-tls", "TLS towards the back-end: none, STARTTLS, or implicit (default off)", "off",
            "{off,starttls,on}"),
    Setting("--backend-tls-ca", "CAs that back-end certificates are verified against (default: system CAs)",
            metavar="FILE"),
    Setting("--backend-tls-verify", "verify the back-end's certificate and name; off only for lab set-ups "
            "(default on)", "on", "{on,off}"),
    Setting("--backend-auth", "AUTH towards the back-end, PLAIN or LOGIN (visible in ps: prefer the next)",
            metavar="USER:PASSWORD", read=parse_backend_auth),
    Setting("--backend-auth-file", "the same from the first line of FILE, read again on SIGHUP", metavar="FILE"),
    Setting("--backend-proxy-protocol", "send a PROXY protocol header naming the client first on each connection "
            "to an SMTP back-end (default off)", "off", "{off,v1,v2}"),
    Setting("--timeout", "deadline for each whole command line and for idle time between commands (default 60)",
            "60", "SECONDS", read_seconds()),
    Setting("--proxy-timeout", "deadline for each whole back-end reply (default 60)", "60", "SECONDS", read_seconds()),
    Setting("--data-timeout", "deadline for the back-end's reply to the end of data (default 600, RFC 5321's "
            "10 minutes)", "600", "SECONDS", read_seconds()),
    Setting("--greeting-delay", "hold the greeting back; a client that talks first is refused (default 0)", "0",
            "SECONDS", read_seconds(0)),
    Setting("--max-errors", "protocol errors before the session is closed (default 5)", "5", "N", read_count()),
    Setting("--max-refusals", "refused MAIL and RCPT (and junk commands past 100) a session may have without "
            "delivering a message, as Postfix's smtpd_hard_error_limit; 0 for no limit (default 20)", "20", "N",
            read_count()),
    Setting("--max-clients", "concurrent sessions (default 1000)", "1000", "N", read_count(1)),
    Setting("--max-clients-per-ip", "concurrent sessions from one address, 0 for no limit (default 0)", "0", "N",
            read_count()),
    Setting("--max-message-size", "largest message, 0 for no limit (default 0)", "0", "BYTES", read_count()),
    Setting("--max-recipients", "recipients per message (default 100)", "100", "N", read_count(1)),
    Setting("--bare-newline", "a bare CR or LF in message data is made CRLF, or the message refused (default "
            "normalize)", "normalize", "{normalize,reject}"),
    Setting("--allow-from", "client networks allowed to connect; others get 554 (default any)", metavar="CIDR",
            action="append", read=lambda option, text: parse_network(text, option)),
    Setting("--allow-sender", "envelope senders allowed, full match, any case; others get 550 at MAIL",
            metavar="REGEX", read=parse_regex),
    Setting("--allow-recipient", "envelope recipients allowed; others get 550 at RCPT", metavar="REGEX",
            read=parse_regex),
    Setting("--log-level", "debug logs the whole SMTP dialogue (default info)", "info", "{debug,info,warning,error}"),
    Setting("--log-format", "one line per event; json lines carry named fields (default text)", "text",
            "{text,json}"),
    Setting("--log-target", "where log lines go; syslog is /dev/log (default stderr; syslog when stderr is the "
            "client's socket)", "stderr", "{stderr,syslog}"),
    Setting("--proxy-protocol", "listeners expect a PROXY protocol v1 or v2 header from a --real-ip-from peer",
            action="store_true"),
    Setting("--real-ip-from", "peers whose PROXY header is trusted", metavar="CIDR", action="append",
            read=lambda option, text: parse_network(text, option)),
    Setting("--inetd", "serve one session on stdin/stdout (inetd nowait, systemd Accept=yes) and exit",
            action="store_true"),
    Setting("--user", "after binding the listeners, drop root privileges to USER and its groups", metavar="USER",
            read=lambda option, text: parse_user(text)),
    Setting("--workers", "processes serving the listeners, each a thread per client, limits counted across "
            "all; auto: one per CPU (default 1)", "1", "N", parse_workers),
    Setting("--metrics", "serve Prometheus metrics on http://ADDR/metrics (pip install 'smtprelay[metrics]')",
            metavar="ADDR", read=parse_address),
]

Config = dataclasses.make_dataclass("Config", [s.dest for s in SETTINGS], frozen=True, namespace={
    "__doc__": "The validated settings, a field for each of SETTINGS (cfg.max_errors is --max-errors); "
               "SIGHUP builds a new one.",
    "auth_mechanisms": property(lambda cfg: [m for m in cfg.auth if m != "none"], doc="What AUTH may offer."),
    "auth_required": property(lambda cfg: "none" not in cfg.auth, doc="MAIL waits for AUTH."),
})


def build_parser():
    """The option parser: SETTINGS, and the modes (--check-config, --probe) and --version."""
    p = SettingsParser(
        prog="smtprelay",
        description="A reverse SMTP proxy: accepts mail and hands it to a back-end.",
        default_config_files=[DEFAULT_CONFIG_FILE],
        args_for_setting_config_path=["-c", "--config"],
        config_arg_help_message=f"config file (default {DEFAULT_CONFIG_FILE} if it exists)",
        auto_env_var_prefix=ENV_PREFIX,
        config_file_parser_class=SettingsFileParser,
        allow_abbrev=False,         # --check-conf is no --check-config (command line only, checked by name)
        add_config_file_help=False, add_env_var_help=False,
        epilog="Every option but -c, --check-config and --probe may also come from the environment "
               "(SMTPRELAY_MAX_ERRORS=5 for --max-errors 5) or the config file ('max-errors = 5', a list as [a, b]); "
               "the command line wins over the environment, the environment over the file. The README's "
               "Configuration section has the details.",
    )
    for s in SETTINGS:
        given = dict(help=s.help, default=s.default, metavar=s.metavar, action=s.action)
        p.add_argument(s.flag, **{k: v for k, v in given.items() if v is not None})
    p.add_argument("--check-config", action="store_true", help="validate the configuration, print it and exit")
    p.add_argument("--probe", action="store_true",
                   help="validate as --check-config, then run a session's handshake with each --backend (with "
                        "--auth-http: the one the auth service names for a client at 127.0.0.1) and say what it "
                        "offers; exit 0 only if every back-end would be used")
    p.add_argument("--version", action="version", version=f"smtprelay {__version__}")
    return p


def setting_actions(parser):
    """The options a config file or the environment may set, in parser order -> [argparse.Action];
    --check-config prints them, and the sample config must list them all."""
    return [a for a in parser._actions if a.dest in Config.__dataclass_fields__]


def validate(args):
    """The parsed strings -> Config; raises ConfigError naming the first bad option.

    Parsing only: what the settings build (TLS contexts, the auth service's
    client, Maildirs) is made by Setup, so that SIGHUP can build it again.
    """
    values = {s.dest: s.value(getattr(args, s.dest)) for s in SETTINGS}
    if values["backend_auth_file"]:
        if values["backend_auth"]:
            raise ConfigError("--backend-auth-file", "--backend-auth and --backend-auth-file exclude each other")
        values["backend_auth"] = read_backend_auth_file(values["backend_auth_file"])
    cfg = Config(**dict(values, listen=values["listen"] or [parse_address("--listen", DEFAULT_LISTEN)],
                        server_name=values["server_name"] or parse_server_name("--server-name", default_server_name())))
    if cfg.auth_http and cfg.backend:
        raise ConfigError("--auth-http", "--backend and --auth-http exclude each other: the auth service names the back-end")
    if not cfg.auth_http and not cfg.backend:
        raise ConfigError("--backend", "no back-end given (e.g. --backend 127.0.0.1:25 or --backend maildir:PATH)")
    if cfg.inetd and any(b.kind == "stdout" for b in cfg.backend):
        raise ConfigError("--backend", "stdout: cannot be used with --inetd: standard output is the client's connection")
    if cfg.workers > 1 and not cfg.inetd and any(b.kind == "stdout" for b in cfg.backend):
        raise ConfigError("--backend", "stdout: prints from one process: not with --workers above 1 (messages of "
                                       "two workers would interleave)")
    if cfg.proxy_protocol and not cfg.real_ip_from:
        raise ConfigError("--real-ip-from", "--proxy-protocol needs the peers whose PROXY header is trusted (the "
                                            "load balancer's address): a header from any other peer is refused")
    if cfg.auth != ["none"] and not cfg.auth_http:
        raise ConfigError("--auth", f"{args.auth!r}: checking credentials needs an auth service (--auth-http)")
    missing_tls = "--tls-key" if cfg.tls_cert else "--tls-cert"
    if (cfg.starttls != "off" or cfg.tls_listen) and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError(missing_tls, "TLS (--starttls, --tls-listen) needs --tls-cert and --tls-key")
    if cfg.tls_verify_client != "off" and not cfg.tls_client_ca:
        raise ConfigError("--tls-client-ca", f"--tls-verify-client {cfg.tls_verify_client} needs the CAs to verify against")
    if (cfg.tls_cert or cfg.tls_key) and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError(missing_tls, "--tls-cert and --tls-key go together")
    return cfg


def load_config(argv=None):
    """Read the command line, environment and config file -> (Config, effective
    settings text, mode: "check_config", "probe" or None).

    Raises ConfigError for a bad value or an unknown key in the config file;
    an unknown command-line option is argparse's usage error (exit 2).
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if any(u in argv for u in unknown):
            parser.error("unrecognized arguments: " + " ".join(unknown))
        raise ConfigError(args.config_file or DEFAULT_CONFIG_FILE,
                          "unknown setting " + " ".join(u.split("=")[0].lstrip("-") for u in unknown if u.startswith("--")))
    for option in ("--check-config", "--probe"):
        if getattr(args, option[2:].replace("-", "_")) and option not in argv:
            # From the config file or the environment, the daemon would print and exit at every start.
            raise ConfigError(option, "command line only, not in the config file or the environment")
    cfg = validate(args)
    lines = []
    for action in setting_actions(parser):
        value = getattr(args, action.dest)
        if action.dest == "listen" and value is None:
            value = [DEFAULT_LISTEN]
        if action.dest == "server_name" and value is None:
            value = cfg.server_name
        if action.dest == "backend_auth" and value is not None:
            value = value.partition(":")[0] + ":********"      # never print the password
        if isinstance(value, list):
            value = "[" + ", ".join(value) + "]"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            continue
        lines.append(f"{action.option_strings[0][2:]} = {value}")
    mode = "check_config" if args.check_config else "probe" if args.probe else None
    return cfg, "\n".join(lines), mode


# --- 2. SMTP wire: replies, events, bounded reads, message data --------------
# The texts first: every fixed reply, and every log line (EVENTS). Then the
# bytes: one Wire per peer, and the client's Channel on it, with bounded
# command lines and message data moved in large chunks with bytes methods
# (find, count, replace run in C). Replies are written by format_reply.

COMMAND_LINE_LIMIT = 2048   # RFC 5321 §4.5.3.1.4 says 512; parameters outgrow it
AUTH_LINE_LIMIT = 12288     # RFC 4954 §4: an AUTH line (initial response included) may be this long
RECV_SIZE = 65536           # one read; DATA moves at most this much at a time
LONG_LINE_PART = 65536      # a data line without LF is passed on in parts this long
LINGER_SECONDS = 1          # at most this long reading a closing client's last bytes
ERROR_CODES = {500, 501, 502, 503, 504, 555}   # client mistakes, counted for --max-errors

# Replies, named as nginx names its fixed ones; {names} are filled in by fill().
class Reply(typing.NamedTuple):
    """One reply to a client: its code and text."""
    code: int
    text: str

    def fill(self, **values):
        """The reply with its {names} filled in from values -> Reply."""
        return Reply(self.code, self.text.format(**values))


GREETING = Reply(220, "{name} ESMTP")
READY_FOR_TLS = Reply(220, "2.0.0 Ready to start TLS")
BYE = Reply(221, "2.0.0 Bye")
HELP = Reply(214, "2.0.0 Commands: {verbs}")
HELP_VERB = Reply(214, "2.0.0 {syntax}")
AUTHENTICATED = Reply(235, "2.7.0 Authentication successful")
OK = Reply(250, "2.0.0 Ok")
SENDER_OK = Reply(250, "2.1.0 Ok")
RECIPIENT_OK = Reply(250, "2.1.5 Ok")
QUEUED = Reply(250, "2.0.0 Ok: queued as {id}")
PRINTED = Reply(250, "2.0.0 Ok: printed as {id}")
CANNOT_VRFY = Reply(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
# 421 closes the session (RFC 5321 §3.8).
SHUTTING_DOWN = Reply(421, "4.3.2 {name} Service shutting down, closing connection")
TIMED_OUT = Reply(421, "4.4.2 {name} Error: timeout exceeded")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2 Too many connections, try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0 Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0 Too many errors, closing connection")
TOO_MANY_REFUSALS = Reply(421, "4.7.0 Error: too many refusals, closing connection")
INTERNAL_ERROR = Reply(421, "4.3.0 Internal error, closing connection")
CERTIFICATE_REQUIRED = Reply(421, "4.7.1 No required SSL certificate")
MISCONFIGURED = Reply(421, "4.3.5 Service not available: the relay is misconfigured")
AUTH_SERVICE_FAILED = Reply(451, "4.3.2 Internal server error; try again later")
BACKEND_LOST = Reply(451, "4.4.2 Error: mail server connection lost; try again later")
NO_BACKEND = Reply(451, "4.4.1 Error: no mail server available; try again later")
SHORT_OF_RESOURCES = Reply(451, "4.3.0 Error: the relay is short of resources; try again later")
CANNOT_STORE = Reply(451, "4.3.0 Error: cannot {what}: {reason}")
STDOUT_NOT_READ = Reply(451, "4.3.0 Error: standard output is not being read; try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Error: too many recipients")
LINE_TOO_LONG = Reply(500, "5.5.6 Line too long")
CONTROL_CHARACTER = Reply(500, "5.5.2 Syntax error: control character in command")
COMMAND_NOT_UTF8 = Reply(500, "5.5.2 Syntax error: not UTF-8")
UNRECOGNIZED = Reply(500, "5.5.2 Error: command not recognized")
SYNTAX = Reply(501, "5.5.4 Syntax: {syntax}")
BAD_HOST_NAME = Reply(501, "5.5.2 Bad host name: {why}")
BAD_PATH = Reply(501, "5.1.7 Bad address syntax: {why}")
BAD_ADDRESS = Reply(501, "5.1.3 Bad address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3 Bad recipient address syntax")
PATH_TOO_LONG = Reply(501, "5.1.3 Path too long")                 # RFC 5321 §4.5.3.1.10
BAD_AFTER_ADDRESS = Reply(501, "5.5.4 Bad syntax after the address")
BAD_PARAMETER = Reply(501, "5.5.4 Bad parameter {param!r}")
BAD_SIZE = Reply(501, "5.5.4 Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4 Bad BODY parameter, 7BIT or 8BITMIME")
BAD_SMTPUTF8 = Reply(501, "5.5.4 SMTPUTF8 takes no value")
BAD_AUTH_PARAMETER = Reply(501, "5.5.4 Bad AUTH parameter")
AUTH_CANCELLED = Reply(501, "5.7.0 Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2 Cannot decode base64 response")
NOT_UTF8 = Reply(501, "5.5.2 Not UTF-8")
BAD_RESPONSE = Reply(501, "5.5.2 Bad {mechanism} response: {form}")
NO_INITIAL_RESPONSE = Reply(501, "5.5.2 {mechanism} takes no initial response")
AUTH_NOT_ENABLED = Reply(502, "5.5.1 Error: authentication not enabled")
STARTTLS_NOT_AVAILABLE = Reply(502, "5.5.1 Error: STARTTLS not available")
EXPN_NOT_AVAILABLE = Reply(502, "5.5.1 EXPN not available")
NEED_MAIL = Reply(503, "5.5.1 Error: need MAIL command")
NESTED_MAIL = Reply(503, "5.5.1 Error: nested MAIL command")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1 Error: already authenticated")
MAIL_IN_PROGRESS = Reply(503, "5.5.1 Error: MAIL transaction in progress")
EHLO_AFTER_STARTTLS = Reply(503, "5.5.1 Error: send EHLO first after STARTTLS")
TLS_ACTIVE = Reply(503, "5.5.1 Error: TLS already active")
SPOKE_FIRST = Reply(503, "5.5.0 Improper use of SMTP command pipelining")
UNKNOWN_MECHANISM = Reply(504, "5.5.4 Unrecognized authentication type")
AUTH_REQUIRED = Reply(530, "5.7.0 Authentication required")
STARTTLS_FIRST = Reply(530, "5.7.0 Must issue a STARTTLS command first")
NO_CLIENT_CERTIFICATE = Reply(535, "5.7.0 No client certificate")
NOT_THAT_IDENTITY = Reply(535, "5.7.0 The client certificate names another identity")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11 Encryption required for requested authentication mechanism")
SENDER_NOT_ALLOWED = Reply(550, "5.7.1 Sender address rejected: not allowed")
RECIPIENT_NOT_ALLOWED = Reply(550, "5.7.1 Recipient address rejected: not allowed")
TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed limit")
UTF8_UNDECLARED = Reply(553, "5.6.7 Must declare SMTPUTF8 to send a UTF-8 address")
ACCESS_DENIED = Reply(554, "5.7.1 Access denied")
NO_RECIPIENTS = Reply(554, "5.5.1 Error: no valid recipients")
BARE_NEWLINE_REFUSED = Reply(554, "5.6.0 Message contains a bare CR or LF; refused")
UNSUPPORTED_OPTION = Reply(555, "5.5.4 Unsupported option: {name}")
NOT_SUPPORTED_BEHIND = Reply(555, "{status} {extension} is not supported by the mail server behind this relay")

# Events: every line the relay logs, by name, with its level and text. The
# text is filled from the event's fields only where a handler writes it; a
# JSON line carries the fields by name (README, Logging). Subscribers (the
# metrics) are called with the fields of the events they name.
EVENTS = {
    # The relay
    "listening": (logging.INFO, "listening on %(address)s"),
    "metrics_listening": (logging.INFO, "metrics on %(url)s"),
    "warning": (logging.WARNING, "%(text)s"),
    "running_as_user": (logging.INFO, "running as user %(user)s (uid %(uid)d)"),
    "notify_failed": (logging.WARNING, "NOTIFY_SOCKET %(address)s: %(reason)s"),
    "stopping": (logging.INFO, "%(signal)s: stopping; messages in flight are finished first"),
    "stopped": (logging.INFO, "stopped"),
    "drain_cut": (logging.WARNING, "stopping with %(sessions)d sessions still open"),
    "reloaded": (logging.INFO, "SIGHUP: configuration reloaded for new sessions"),
    "reload_refused": (logging.ERROR, "SIGHUP: keeping the old configuration: %(reason)s"),
    "reload_partial": (logging.WARNING, "SIGHUP: these settings need a restart and stay as they were: %(settings)s"),
    "worker_started": (logging.INFO, "worker %(worker)d started (pid %(pid)d)"),
    "worker_died": (logging.ERROR, "worker %(worker)d (pid %(pid)d) %(how)s; a new one starts in %(pause)gs"),
    "worker_not_started": (logging.ERROR, "worker %(worker)d: cannot start it: %(reason)s; trying again in %(pause)gs"),
    "worker_ended": (logging.INFO, "worker %(worker)d (pid %(pid)d) %(how)s"),
    "cannot_start": (logging.ERROR, "cannot start: %(reason)s"),
    "orphaned": (logging.ERROR, "the main process (pid %(pid)d) is gone: stopping"),
    "workers_not_ready": (logging.WARNING, "SIGHUP: workers %(workers)s did not say within %(seconds)gs that they "
                                            "reloaded"),
    "config_error": (logging.ERROR, "%(reason)s"),
    "accept_failed": (logging.ERROR, "accept failed: %(reason)s; pausing new connections for %(seconds)g s"),
    "no_thread": (logging.ERROR, "no thread for a client from %(client)s: %(reason)s"),
    "resolver_failed": (logging.ERROR, "cannot start a resolver thread: %(reason)s"),
    "lookup_failed": (logging.ERROR, "name lookup of %(client)s failed"),
    "crashed": (logging.ERROR, "error %(doing)s from %(client)s"),
    # Connections, before a session
    "connection": (logging.DEBUG, "connection from %(peer)s"),
    "refused": (logging.WARNING, "refused %(peer)s: %(reason)s"),
    "bad_proxy_header": (logging.WARNING, "%(peer)s: %(reason)s"),
    # Sessions: the id first
    "connect": (logging.INFO, "%(session)s connect from %(peer)s"),
    "disconnect": (logging.INFO, "%(session)s disconnect from %(peer)s"),
    "client_gone": (logging.INFO, "%(session)s client gone: %(reason)s"),
    "client_timed_out": (logging.INFO, "%(session)s client timed out after %(seconds)gs"),
    "spoke_first": (logging.INFO, "%(session)s client was rejected before greeting"),
    "tls": (logging.INFO, "%(session)s TLS %(protocol)s %(cipher)s%(certificate_note)s"),
    "command": (logging.DEBUG, "%(session)s C: %(line)s"),
    "reply": (logging.DEBUG, "%(session)s S: %(line)s"),
    "client_error": (logging.INFO, "%(session)s error %(code)d %(text)s (%(errors)d of %(max_errors)d)"),
    "too_many_refusals": (logging.INFO, "%(session)s %(refusals)d refusals without a delivered message: closing"),
    "internal_error": (logging.ERROR, "%(session)s internal error"),
    "not_allowed": (logging.INFO, "%(session)s %(role)s <%(address)s> refused by --allow-%(role)s"),
    "recipient": (logging.DEBUG, "%(session)s recipient %(outcome)s with %(code)d"),
    "message": (logging.INFO, "%(session)s message from=<%(sender)s> rcpts=%(rcpts)d size=%(size)d "
                              "backend=%(backend)s reply=%(reply)r time=%(seconds).3fs"),
    "message_abandoned": (logging.WARNING, "%(session)s client lost during DATA after %(size)d bytes; message abandoned"),
    "authenticated": (logging.INFO, "%(session)s authenticated as %(user)s with %(mechanism)s; backend %(backend)s"),
    "login_failed": (logging.INFO, "%(session)s client login failed: %(reason)r"),
    "auth_lookup": (logging.DEBUG, "%(session)s auth service said %(result)s in %(seconds).3fs"),
    "auth_service_failed": (logging.ERROR, "%(session)s auth service %(url)s: %(reason)s"),
    # Back-ends, seen from a session
    "backend_connected": (logging.INFO, "%(session)s backend %(backend)s connected%(details_note)s"),
    "backend_reused": (logging.DEBUG, "%(session)s backend %(backend)s: an idle connection reused"),
    "backend_authenticated": (logging.INFO, "%(session)s backend %(backend)s: authenticated as %(user)s"),
    "backend_down": (logging.WARNING, "%(session)s backend %(backend)s is down: %(reason)s%(hold_off_note)s"),
    "backend_untrusted": (logging.ERROR, "%(session)s backend %(backend)s %(reason)s: %(fix)s"),
    "backend_up": (logging.INFO, "backend %(backend)s answers again"),
    "no_backend": (logging.ERROR, "%(session)s all back-ends are down"),
    "short_of_resources": (logging.ERROR, "%(session)s cannot reach backend %(backend)s: the relay is short of "
                                          "resources: %(reason)s"),
    "backend_failed": (logging.WARNING, "%(session)s backend %(backend)s failed at %(command)s: %(reason)s"),
    "backend_refused": (logging.INFO, "%(session)s backend %(backend)s refused %(command)s: %(reply)s"),
    "backend_command": (logging.DEBUG, "%(session)s S>B: %(line)s"),
    "backend_reply": (logging.DEBUG, "%(session)s B: %(code)s %(line)s"),
    "stdout_stalled": (logging.ERROR, "%(session)s standard output took no message within --data-timeout %(seconds)gs"),
}
SUBSCRIBERS = collections.defaultdict(list)     # event name -> callables given its fields


def wanted(name):
    """Whether anyone takes the event (a subscriber, or the log at its level): the
    few that come with every session ask first, so as not to build fields for nobody."""
    return name in SUBSCRIBERS or log.isEnabledFor(EVENTS[name][0])


def event(name, exc_info=False, **fields):
    """One event: to its subscribers, and logged where its level is wanted."""
    level, text = EVENTS[name]
    for subscriber in SUBSCRIBERS.get(name, ()):
        subscriber(fields)
    if log.isEnabledFor(level):
        log.log(level, text, *[fields] if fields else [], exc_info=exc_info, extra={"event": name, "fields": fields})


# Where the next byte of message data stands; decides what a leading dot means.
LINE_START, BARE_BREAK, MID_LINE = "line start", "after bare newline", "mid line"
BARE_NEWLINE = object()     # read_data's signal: a bare CR or LF, in reject mode
NEWLINES = re.compile(rb"\r\n|\r|\n")
# Compiled once: these run for every command.
COMMAND_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
QUOTED_PATH = re.compile(r'<(?:[^"<>]*"(?:[^"\\]|\\.)*")?[^">]*')
PARAMETER_NAME = re.compile(r"[A-Z0-9][A-Z0-9-]*")
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]}    # C0, DEL, C1


class SMTPError(RelayError):
    """A reply for the client: raised anywhere, sent once by the session loop.

    counted: whether it counts toward --max-errors (by default the client
    mistakes of ERROR_CODES; failed AUTH attempts count too).
    """

    def __init__(self, reply, counted=None):
        """reply: a Reply, (code, text); counted: None to count it by its code (ERROR_CODES)."""
        super().__init__(*reply)
        self.code, self.text = reply
        self.counted = self.code in ERROR_CODES if counted is None else counted


class ClientGone(RelayError):
    """The client closed the connection or it broke; nobody to reply to."""


class Stopping(RelayError):
    """The relay is stopping and the session is between transactions: it gets 421."""


ENHANCED_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_status(code, text):
    """A reply passed on from a back-end or the auth service, each line with an enhanced
    status code: EHLO offers ENHANCEDSTATUSCODES, and RFC 2034 §3 then wants one on every
    reply line but 354's. A line without one gets its class's X.0.0 (RFC 3463)."""
    if code == 354 or "\n" not in text and ENHANCED_STATUS.match(text):     # most replies: one line, with one
        return text
    return "\n".join(line if ENHANCED_STATUS.match(line) else f"{code // 100}.0.0 {line}".rstrip()
                     for line in text.split("\n"))


BEFORE_TLS = {"NOOP", "EHLO", "STARTTLS", "QUIT"}     # RFC 3207 §4: where TLS is required, 530 to the rest


def format_reply(code, text):
    """One reply as bytes; text lines become `250-` continuation lines."""
    if text and "\n" not in text and "\r" not in text:       # most replies: one line
        return f"{code} {text}\r\n".encode("utf-8", "surrogateescape")
    lines = text.replace("\r", "").split("\n")
    # RFC 5321 §4.2: the text is optional; an empty AUTH challenge keeps its space (RFC 4954 §4).
    last = f"{code} {lines[-1]}" if lines[-1] or code == 334 else str(code)
    out = "".join(f"{code}-{line}\r\n" for line in lines[:-1]) + last + "\r\n"
    return out.encode("utf-8", "surrogateescape")


def printable(text):
    """Client text made safe for one log line: control bytes escaped (http.server)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    return text.translate(CONTROL_ESCAPES)


def restuff(text, at, bare_end):
    """A piece of a data line, with its leading dot right once bare newlines are CRLF.

    A line that starts after a bare CR/LF was not dot-stuffed by the client
    (it was no line to SMTP), so a leading dot is doubled. A lone stuffed "."
    ended by a bare newline would become CRLF.CRLF, the end of data; RFC 5321
    §4.5.2 unstuffs it to an empty line, which is what we pass on.
    """
    if at is BARE_BREAK and text.startswith(b"."):
        return b"." + text
    if at is LINE_START and bare_end and text == b".":
        return b""
    return text


def normalize_newlines(segment, at):
    """segment with every bare CR or LF made CRLF and the dots kept right."""
    out, pos = [], 0
    for m in NEWLINES.finditer(segment):
        bare = m.group() != b"\r\n"
        out += (restuff(segment[pos:m.start()], at, bare), b"\r\n")
        at, pos = (BARE_BREAK if bare else LINE_START), m.end()
    out.append(restuff(segment[pos:], at, False))
    return b"".join(out)


def unstuff(segment, at_line_start):
    """A CRLF-normalized segment without the dots that quote lines (RFC 5321 §4.5.2)."""
    if at_line_start and segment.startswith(b"."):
        segment = segment[1:]
    return segment.replace(b"\r\n.", b"\r\n")


def unstuffed_size(segment, at_line_start):
    """The message bytes in a (CRLF-normalized) segment, without the dots
    that quote lines starting with a dot (RFC 1870 §3: they are no part of
    the size)."""
    return len(segment) - segment.count(b"\r\n.") - (at_line_start and segment.startswith(b"."))


def line_state_after(segment, at):
    """The line state once segment is passed on -> LINE_START, BARE_BREAK or MID_LINE; `at` for an empty one."""
    if segment.endswith(b"\r\n"):
        return LINE_START
    if segment.endswith((b"\n", b"\r")):    # a segment ends in CR only when its LF is known absent
        return BARE_BREAK
    return MID_LINE if segment else at


def set_nodelay(sock):
    """Writes go out at once. Replies are already gathered into one write per
    burst; without this the end of data, a small write right after the
    message, waits ~40 ms for the peer's delayed ACK (Nagle)."""
    with contextlib.suppress(OSError):         # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# One way to talk to a peer. Every byte the relay reads from or writes to
# anyone (a client, a back-end, standard output for stdout:, a metrics
# client) passes through a Wire, which owns the input buffer, the deadline of
# each wait and the size of each line. A wait is one poll() until its
# deadline, then one read or write that never blocks; the first read of a
# deadline on a plain socket is cheaper still, a blocking recv() bounded by
# SO_RCVTIMEO (set once per connection to the whole wait allowed): the wait
# and the read in one syscall.

class LineTooLong(RelayError):
    """No line end within the limit. whole: the line was read to its end (else
    what was read of it is dropped, and the rest is still to come)."""

    def __init__(self, whole):
        super().__init__()
        self.whole = whole


def set_read_timeout(sock, seconds):
    """Make a blocking recv() on plain sock give up after seconds (SO_RCVTIMEO) -> whether
    it does; where the kernel takes no such timeval, sock stays non-blocking (poll() only)."""
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", whole, int((seconds - whole) * 1e6)))
    except OSError:
        sock.setblocking(False)
        return False
    sock.setblocking(True)
    return True


def poll_until(poller, deadline):
    """poll() until something is ready -> [(fd, events)]; TimeoutError past the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        ready = poller.poll(remaining * 1000)
        if ready:
            return ready


class Wire:
    """The bytes between the relay and one peer, over a socket (plain or TLS)
    or a pair of descriptors (--inetd on pipes or a terminal; standard output).

    Reads and writes go by a deadline and raise TimeoutError past it, OSError
    when the connection breaks; receive() gives b"" at the end of input. The
    input is buffered here and handed out as bounded lines (read_line),
    exact counts (read_exactly) or all that is there (take).
    """

    def __init__(self, sock=None, first_read=None, reader=None, writer=None):
        """first_read: the seconds a plain socket's first read of a deadline may
        block in recv() (SO_RCVTIMEO); None: every read waits in poll()."""
        self.sock = sock
        self.reader, self.writer = (reader, writer) if sock is None else (sock.fileno(),) * 2
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.first_read = None
        if sock is not None:
            if not self.tls and first_read is not None and set_read_timeout(sock, first_read):
                self.first_read = first_read
            else:
                sock.setblocking(False)
            set_nodelay(sock)
        self.poller = select.poll()     # made once: the descriptor stays the same when TLS wraps a socket
        if self.reader is not None:
            self.poller.register(self.reader, select.POLLIN)
        if sock is None and writer is not None:
            self.out_poller = select.poll()
            self.out_poller.register(writer, select.POLLOUT)
        self.inbuf, self.inpos = b"", 0

    # Reads -----------------------------------------------------------------

    def receive(self, deadline, first=False, stop=None):
        """One read by deadline -> bytes, b"" at the end of input.

        first: the deadline is one first_read from now and nothing of it is
        used up, so a plain socket's recv() may wait all of it. stop: a
        (poller, fd) pair whose fd turning readable first raises Stopping.
        """
        if first and self.first_read is not None and stop is None:
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:             # SO_RCVTIMEO ran out
                raise TimeoutError("timed out") from None
        poller, stop_fd = stop or (self.poller, None)
        while True:
            if not (self.tls and self.sock.pending()):     # TLS may hold decrypted bytes already
                ready = poll_until(poller, deadline)
                if stop_fd is not None and any(fd == stop_fd for fd, _ in ready):
                    raise Stopping()
            try:
                return self.read_now(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue        # readable, yet nothing whole (part of a TLS record)
            except ssl.SSLWantWriteError:
                self.wait(select.POLLOUT, deadline)

    def read_now(self, size):
        """One read of what is there, never blocking on a socket (a descriptor is read
        after poll() said it is readable) -> bytes, b"" at the end of input."""
        if self.sock is None:
            return os.read(self.reader, size)
        return self.sock.recv(size, 0 if self.tls else socket.MSG_DONTWAIT)

    def fill(self, deadline, first=False, stop=None):
        """Read more into the buffer -> False at the end of input."""
        data = self.receive(deadline, first, stop)
        if not data:
            return False
        self.inbuf = self.inbuf[self.inpos:] + data if self.inpos < len(self.inbuf) else data
        self.inpos = 0
        return True

    def read_line(self, limit, deadline, first=False, stop=None):
        """The next line, its LF included, by one deadline for the whole line -> bytes;
        b"" at the end of input. Raises LineTooLong where limit bytes pass with no LF
        (they are dropped) or the line found is longer (it is consumed)."""
        while True:
            end = self.inbuf.find(b"\n", self.inpos)
            if end >= 0:
                line, self.inpos = self.inbuf[self.inpos:end + 1], end + 1
                if len(line) > limit:
                    raise LineTooLong(whole=True)
                return line
            if len(self.inbuf) - self.inpos >= limit:
                self.inbuf, self.inpos = b"", 0
                raise LineTooLong(whole=False)
            if not self.fill(deadline, first, stop):
                return b""
            first = False

    def skip_line(self, deadline, stop=None):
        """Drop input up to and including the next LF -> False at the end of input."""
        while (end := self.inbuf.find(b"\n", self.inpos)) < 0:
            self.inbuf, self.inpos = b"", 0
            if not self.fill(deadline, stop=stop):
                return False
        self.inpos = end + 1
        return True

    def read_exactly(self, count, deadline):
        """count bytes and not one more, read past the buffer from the peer (a
        PROXY header: the TLS handshake after it must stay unread) -> bytes, short at the end of input."""
        data = self.take(count)
        while len(data) < count:
            self.wait(select.POLLIN, deadline)
            try:
                chunk = self.read_now(count - len(data))
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
        return data

    def take(self, limit=None):
        """What is buffered (at most limit bytes), out of the buffer."""
        end = len(self.inbuf) if limit is None else min(len(self.inbuf), self.inpos + limit)
        data, self.inpos = self.inbuf[self.inpos:end], end
        if self.inpos >= len(self.inbuf):
            self.inbuf, self.inpos = b"", 0
        return data

    def give_back(self, data):
        """Put bytes read too far (past the end of message data) back in front of the buffer."""
        self.inbuf, self.inpos = data + self.inbuf[self.inpos:], 0

    def buffered_lines(self, most):
        """Up to `most` whole lines already buffered, without their line ends; they stay buffered."""
        lines, start = [], self.inpos
        while len(lines) < most and (end := self.inbuf.find(b"\n", start)) >= 0:
            line = self.inbuf[start:end]
            lines.append(line[:-1] if line.endswith(b"\r") else line)
            start = end + 1
        return lines

    def has_line(self):
        """Whether a whole line is buffered."""
        return self.inbuf.find(b"\n", self.inpos) >= 0

    @property
    def buffered(self):
        """Bytes read from the peer and not yet handed out."""
        return len(self.inbuf) - self.inpos

    def pending(self):
        """Whether input waits: buffered, or arriving now (the end of input included).
        A readable TLS socket may hold no data (a TLS 1.3 session ticket): that is none."""
        if self.buffered:
            return True
        if not (self.tls and self.sock.pending()) and not self.poller.poll(0):
            return False
        try:
            data = self.read_now(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            return True         # broken: the next read says how
        self.inbuf, self.inpos = self.inbuf[self.inpos:] + data, 0
        return True

    def readable_within(self, seconds):
        """Whether input is buffered or arrives within seconds (one poll(), nothing read)."""
        return bool(self.buffered or self.poller.poll(seconds * 1000))

    # Writes ----------------------------------------------------------------

    def send(self, data, deadline):
        """Write all of data by deadline, never blocking -> whether it had to wait for the peer."""
        view, waited = memoryview(data), False
        while view:
            try:
                if self.sock is None:
                    # A descriptor may be blocking and shared (a pipe, a terminal):
                    # poll first, then at most PIPE_BUF, which a pipe with room takes at once.
                    if not self.out_poller.poll(0):
                        waited = True
                        poll_until(self.out_poller, deadline)
                    view = view[os.write(self.writer, view[:select.PIPE_BUF]):]
                else:
                    view = view[self.sock.send(view, 0 if self.tls else socket.MSG_DONTWAIT):]
                continue
            except (BlockingIOError, ssl.SSLWantWriteError):
                self.wait(select.POLLOUT, deadline)
            except ssl.SSLWantReadError:
                self.wait(select.POLLIN, deadline)
            waited = True
        return waited

    def wait(self, events, deadline):
        """Wait for events on the connection (POLLIN on the reader, POLLOUT on the writer)."""
        poller = select.poll()
        poller.register(self.writer if events == select.POLLOUT else self.reader, events)
        poll_until(poller, deadline)

    # TLS and the end ---------------------------------------------------------

    def start_tls(self, context, deadline, server_hostname=None):
        """Wrap the socket in TLS and run the handshake by deadline; a server side
        unless server_hostname is given. RFC 3207 §4.2: whatever was buffered in
        clear is dropped, never read as if it came inside TLS (STARTTLS injection)."""
        self.inbuf, self.inpos = b"", 0
        self.sock.setblocking(False)
        self.first_read = None
        self.sock = context.wrap_socket(self.sock, server_side=server_hostname is None,
                                        server_hostname=server_hostname, do_handshake_on_connect=False)
        self.tls = True
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.wait(select.POLLIN, deadline)
            except ssl.SSLWantWriteError:
                self.wait(select.POLLOUT, deadline)

    def close(self, linger=0):
        """Close the connection; linger: seconds to read what the peer still sends, so
        that our last reply is not destroyed by the reset that unread input causes."""
        if self.sock is None:
            for fd in {self.reader, self.writer} - {None}:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return
        with contextlib.suppress(OSError, ValueError, TimeoutError):
            if self.tls:
                self.sock.setblocking(False)    # send our close_notify (RFC 8446 §6.1), don't wait for theirs
                self.sock.unwrap()
            elif linger:
                self.sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + linger
                while self.receive(deadline):
                    pass
        with contextlib.suppress(OSError):
            self.sock.close()


class Channel:
    """The client's end of the SMTP dialogue, over its Wire.

    Replies are queued and written when the session next waits for input,
    so a pipelined burst gets its replies in one write (RFC 2920 §3.1).
    """

    def __init__(self, wire, timeout, stop_fd=None):
        """wire: the client's Wire; timeout: --timeout, for each command line and each write; stop_fd:
        the relay's stop pipe, readable once the relay stops."""
        self.wire, self.timeout, self.stop_fd = wire, timeout, stop_fd
        self.stop = None            # (poller, fd): the wait for input that a stop cuts short
        if stop_fd is not None and wire.reader is not None:
            poller = select.poll()
            poller.register(wire.reader, select.POLLIN)
            poller.register(stop_fd, select.POLLIN)
            self.stop = poller, stop_fd
        self.outbuf = []
        self.last_code = None       # of the last reply queued
        self.skipping = False       # the rest of an overlong line is still to be dropped
        self.data_complete = False  # read_data: the segment out now is the message's last
        self.debug_sid = None       # set to log each line at debug level
        self.interruptible = False  # a stop may cut the wait for input (no transaction open)

    def reply(self, code, text):
        """Queue one reply (a back-end's is passed on as it came)."""
        self.last_code = code
        data = format_reply(code, text)
        if self.debug_sid:
            for line in data.split(b"\r\n")[:-1]:
                event("reply", session=self.debug_sid, line=printable(line))
        self.outbuf.append(data)

    def flush(self):
        """Write the queued replies -> whether that had to wait for the client."""
        if self.outbuf:
            data, self.outbuf = b"".join(self.outbuf), []
            try:
                return self.wire.send(data, time.monotonic() + self.timeout)
            except TimeoutError:
                raise
            except OSError as e:
                raise ClientGone(f"write failed: {e}") from None
        return False

    def fill(self):
        """More message data from the client, by one --timeout; queued replies (the 354)
        are written first. Inside a transaction no stop cuts the wait short. Raises
        TimeoutError past the deadline, ClientGone at the end of the connection."""
        waited = self.flush()
        try:
            more = self.wire.fill(time.monotonic() + self.timeout, first=not waited)
        except TimeoutError:
            raise
        except OSError as e:
            raise ClientGone(f"read failed: {e}") from None
        if not more:
            raise ClientGone("client closed the connection")

    def read_line(self, limit=COMMAND_LINE_LIMIT):
        """The next line without its CRLF (or bare LF, as most servers accept).

        One --timeout for the whole line (Postfix's smtpd_per_record_deadline);
        queued replies are written first when the line is not here yet. Raises
        SMTPError 500 for a line over limit bytes, after reading past its end
        so the stream stays in step (aiosmtpd), and holding at most limit plus
        one read meanwhile: the reply goes out at once, and the rest of the
        line is dropped (by one more --timeout) before the next line is read.
        """
        stop = self.stop if self.interruptible else None
        try:
            if self.skipping:
                self.flush()
                self.skipping = False
                if not self.wire.skip_line(time.monotonic() + self.timeout, stop):
                    raise ClientGone("client closed the connection")
            # The first read may take the whole --timeout in one recv(), unless
            # writing the replies had to wait for the client's reading.
            deadline = time.monotonic() + self.timeout
            waited = self.flush() if not self.wire.has_line() else False
            line = self.wire.read_line(limit, deadline, not waited, stop)
        except LineTooLong as e:
            self.skipping = not e.whole
            raise SMTPError(LINE_TOO_LONG) from None
        except TimeoutError:
            raise
        except OSError as e:
            raise ClientGone(f"read failed: {e}") from None
        if not line:
            raise ClientGone("client closed the connection")
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    def start_tls(self, context):
        """Run the server side of a TLS handshake, bounded by one --timeout -> ((protocol,
        cipher), the client's verified certificate as Auth-SSL-* values or None).
        A failed handshake raises ClientGone."""
        self.flush()
        try:
            self.wire.start_tls(context, time.monotonic() + self.timeout)
        except (ssl.SSLError, OSError) as e:
            raise ClientGone(f"TLS handshake failed: {getattr(e, 'reason', None) or e}") from None
        sock = self.wire.sock
        return (sock.version(), sock.cipher()[0]), client_certificate(sock)

    def read_data(self, normalize):
        """Yield message data as it arrives, up to the CRLF.CRLF that ends it.

        RFC 5321 §4.1.1.4: the end is CRLF "." CRLF and nothing else. Data
        passes on with the client's dot-stuffing intact (§4.5.2), so a
        conformant message reaches the back-end byte for byte. A bare CR or
        LF (SMTP smuggling's tool) is made CRLF with the dots kept right, so
        no back-end can find another end; or, when not normalizing, the
        BARE_NEWLINE marker is yielded once and the rest is read and dropped.
        Bytes after the end stay buffered for the next command.
        """
        pending = self.wire.take()
        at, refused = LINE_START, False
        self.data_complete = False
        while True:
            if at is LINE_START and pending.startswith(b".\r\n"):
                end = 0
            else:
                end = pending.find(b"\r\n.\r\n")
                end = end + 2 if end >= 0 else -1
            if end >= 0:
                segment = pending[:end]
                self.wire.give_back(pending[end + 3:])
                self.data_complete = True
            else:
                # Pass on whole lines; hold back the partial last one (it may
                # be the start of the end), unless it grows long. A held-back
                # CR waits to learn whether an LF follows it.
                cut = pending.rfind(b"\n") + 1
                if not cut and len(pending) >= LONG_LINE_PART:
                    cut = len(pending) - pending.endswith(b"\r")
                segment, pending = pending[:cut], pending[cut:]
            if segment and not refused:
                crlf = segment.count(b"\r\n")
                if (segment.count(b"\n") == crlf == segment.count(b"\r")
                        and not (at is BARE_BREAK and segment.startswith(b"."))):
                    yield segment
                elif normalize:
                    yield normalize_newlines(segment, at)
                else:
                    refused = True
                    yield BARE_NEWLINE
            at = line_state_after(segment, at)
            if end >= 0:
                return
            self.fill()
            pending += self.wire.take()


# Parsing command arguments (RFC 5321 §4.1.2) ---------------------------------

# RFC 5321 §4.5.3.1.3 allows 256 octets; more is taken, but within what one
# header line of the captured mail can hold (RFC 5322 §2.1.1: 998 octets),
# counted as the capture headers write it (control characters escaped).
PATH_LIMIT = 900

# RFC 5321 §4.1.2 Mailbox, loosely: a dot-string or quoted local part, one
# @, a domain or an address literal; UTF-8 passes (RFC 6531). Exactly one
# unquoted @ matters: "v@evil@allowed" must not pass --allow-recipient.
MAILBOX = re.compile(r"""
    (?: [^\x00-\x20\x7f"@<>()\[\]\\,;:]+
      | "(?: [^"\\\x00-\x1f\x7f] | \\[\x20-\x7e] )*" )
    @
    (?: [^\x00-\x20\x7f"@<>()\[\]\\,;:]+
      | \[ [^\[\]\\\x00-\x20\x7f]+ \] )
""", re.VERBOSE)


def parse_path(arg):
    """'<addr> PARAM=V ...', what follows FROM: or TO: -> (addr, {PARAM: value or None}).

    Raises 501 for bad syntax. A space after the colon and a missing pair of
    angle brackets are tolerated, as by Postfix; a source route is dropped
    (§4.1.1.3 lets a server ignore it).
    """
    rest = arg.lstrip(" ")
    if rest.startswith("<"):
        # The first ">" outside a quoted local part ends the path: "a>b"@d is one mailbox.
        quoted = QUOTED_PATH.match(rest)
        end = rest.find(">", quoted.end())
        if end < 0:
            raise SMTPError(BAD_PATH.fill(why="missing >"))
        address, params = rest[1:end], rest[end + 1:]
        if params and not params.startswith(" "):
            raise SMTPError(BAD_AFTER_ADDRESS)
    else:
        address, _, params = rest.partition(" ")
        if not address:
            raise SMTPError(BAD_PATH.fill(why="no address"))
    if address.startswith("@"):
        if ":" not in address:
            raise SMTPError(BAD_PATH.fill(why="bad source route"))
        address = address.split(":", 1)[1]
    if len(address) > PATH_LIMIT // 4 and len(printable(address).encode("utf-8")) > PATH_LIMIT:
        raise SMTPError(PATH_TOO_LONG)
    if address and not MAILBOX.fullmatch(address) and address.lower() != "postmaster":
        raise SMTPError(BAD_ADDRESS)
    parsed = {}
    for param in params.split():
        name, eq, value = param.partition("=")
        name = name.upper()
        if not PARAMETER_NAME.fullmatch(name) or name in parsed or (eq and not value):
            raise SMTPError(BAD_PARAMETER.fill(param=printable(param)))
        parsed[name] = value if eq else None
    return address, parsed


def mask_secrets(line):
    """A command line for the debug log: AUTH data, or what looks like it, hidden."""
    line = re.sub(rb"(?i)^(\s*AUTH\s+\S+\s+).+", rb"\1****", line)
    return b"****" if re.fullmatch(rb"[A-Za-z0-9+/]{8,}=*", line) else line


def decode_auth_response(line):
    """A base64 line of an AUTH exchange (RFC 4954 §4) -> bytes; "=" is empty, "*" cancels."""
    if line == b"*":
        raise SMTPError(AUTH_CANCELLED)
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SMTPError(BAD_BASE64) from None


def decode_utf8(data):
    """An AUTH answer's text -> str; 501 where it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPError(NOT_UTF8) from None


# --- 3. Client session: the state machine, one method per verb ---------------
# A Session runs one client's SMTP dialogue on a Channel. Its state is a few
# attributes set in reset(); each smtp_VERB method checks its guards (which
# raise SMTPError), does its work, and queues exactly one reply. Back-end
# replies to MAIL, RCPT and DATA pass to the client verbatim.

JUNK_COMMANDS = {"NOOP", "RSET", "VRFY", "EXPN", "HELP"}
JUNK_LIMIT = 100            # Postfix's smtpd_junk_command_limit: past it, each one is a refusal


def syntax(text):
    """Declare a verb's syntax on its smtp_VERB method, for HELP and its 501 (aiosmtpd's @syntax)."""
    def declare(method):
        method.syntax = text
        return method
    return declare


def client_ip(peer):
    """A peer's IP address as text, a v4 client on a dual-stack listener as plain v4;
    None for a peer with no IP address (a UNIX socket, a pipe)."""
    if not isinstance(peer, tuple) or not peer:
        return None
    if ":" not in peer[0]:
        return peer[0]          # IPv4, as the kernel wrote it
    ip = ipaddress.ip_address(peer[0].split("%")[0])
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def peer_text(ip, port):
    """A client for the log: ADDR:PORT, or what it has instead of an address."""
    return format_address(ip, port) if ip else "a client with no IP address"


TEMPORARY_LOOKUP_ERRORS = {socket.EAI_AGAIN, socket.EAI_MEMORY, socket.EAI_SYSTEM}     # Postfix's TEMP_AI_ERROR


def lookup_client_names(ip):
    """The system resolver's names for ip -> (name, reverse_name), as Postfix's smtpd has them.

    reverse_name is the PTR name; name is that name only when a forward
    lookup of it gives ip back (FCrDNS); else [UNAVAILABLE], or
    [TEMPUNAVAIL] for a temporary failure. A PTR name that is no host name
    (CR, spaces, "=" or worse, as nginx's CVE-2026-28753) counts as none.
    """
    try:
        # getnameinfo's own error code, as Postfix's smtpd reads it: gethostbyaddr's
        # is h_errno, which glibc leaves as the thread's previous lookup set it.
        reverse_name = socket.getnameinfo((ip, 0), socket.NI_NAMEREQD)[0]
    except socket.gaierror as e:
        return (TEMPUNAVAIL if e.errno in TEMPORARY_LOOKUP_ERRORS else UNAVAILABLE,) * 2
    except OSError:
        return (TEMPUNAVAIL,) * 2
    if not is_host(reverse_name, address_ok=False):
        return (UNAVAILABLE,) * 2
    try:
        found = {client_ip(info[4]) for info in socket.getaddrinfo(reverse_name, None, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        return (TEMPUNAVAIL if e.errno in TEMPORARY_LOOKUP_ERRORS else UNAVAILABLE), reverse_name
    except (OSError, UnicodeError, ValueError):
        return UNAVAILABLE, reverse_name
    return (reverse_name if ip in found else UNAVAILABLE), reverse_name


RESOLVER_THREADS = 8        # name lookups at once, for all sessions together
RESOLVER_QUEUE = 64         # lookups waiting for a thread; one that finds the queue full is [TEMPUNAVAIL]
RESOLVER_PER_NETWORK = 2    # lookups at once for clients of one /24 (IPv4) or /64 (IPv6)


class NameLookup:
    """One lookup of a client address's names, shared by its sessions meanwhile."""

    def __init__(self, ip, wanted_until):
        """ip: the client's address as text; wanted_until: when the last session waiting for it gives up
        (monotonic); a lookup not started by then is skipped."""
        self.ip, self.wanted_until = ip, wanted_until
        self.network = ipaddress.ip_network(f"{ip}/{24 if ':' not in ip else 64}", strict=False)
        self.names = None
        self.done = threading.Event()

    def found(self, names):
        """The lookup is done: names for every session waiting on it."""
        self.names = names
        self.done.set()


class ClientNames:
    """A session's view of its client's names: get() waits at most --resolve-timeout
    from the start of the session."""

    def __init__(self, lookup, deadline):
        """lookup: the NameLookup, shared with the client's other sessions; deadline: when get() stops
        waiting (monotonic)."""
        self.lookup, self.deadline = lookup, deadline

    def get(self):
        """(name, reverse_name); [TEMPUNAVAIL] for both past the deadline."""
        if self.lookup.done.wait(max(self.deadline - time.monotonic(), 0)) and self.lookup.names:
            return self.lookup.names
        return TEMPUNAVAIL, TEMPUNAVAIL


class Resolver:
    """Name lookups for every session from one small pool of threads.

    A slow resolver costs RESOLVER_THREADS threads, never one per session
    (a lookup cannot be cut short): a lookup waits in a bounded queue and is
    skipped once nobody waits for it any more; sessions of one client share
    its lookup, and one network gets RESOLVER_PER_NETWORK at once, so that
    a client whose PTR zone never answers cannot take the names of all the
    others. A lookup that finds no room is [TEMPUNAVAIL] at once.
    """

    def __init__(self):
        """No threads yet: they start as lookups come, up to RESOLVER_THREADS."""
        self.lock = threading.Condition()
        self.waiting = collections.deque()
        self.looking = {}                   # ip -> NameLookup, waiting or under way
        self.per_network = collections.Counter()
        self.threads = self.idle = 0

    def lookup(self, ip, timeout):
        """Start looking up ip's names (or join the lookup under way) -> ClientNames."""
        deadline = time.monotonic() + timeout
        with self.lock:
            lookup = self.looking.get(ip)
            if lookup:
                lookup.wanted_until = max(lookup.wanted_until, deadline)
                return ClientNames(lookup, deadline)
            lookup = NameLookup(ip, deadline)
            if len(self.waiting) >= RESOLVER_QUEUE or self.per_network[lookup.network] >= RESOLVER_PER_NETWORK:
                lookup.found((TEMPUNAVAIL, TEMPUNAVAIL))
                return ClientNames(lookup, deadline)
            if self.idle <= len(self.waiting) and self.threads < RESOLVER_THREADS:
                try:
                    threading.Thread(target=self.work, name="resolver", daemon=True).start()
                    self.threads += 1
                except RuntimeError as e:       # the relay's own shortage: no name, no failure
                    event("resolver_failed", reason=str(e))
                    if not self.threads:
                        lookup.found((TEMPUNAVAIL, TEMPUNAVAIL))
                        return ClientNames(lookup, deadline)
            self.waiting.append(lookup)
            self.looking[ip] = lookup
            self.per_network[lookup.network] += 1
            self.lock.notify()
        return ClientNames(lookup, deadline)

    def work(self):
        """A resolver thread: the waiting lookups, one at a time, for good."""
        while True:
            with self.lock:
                self.idle += 1
                self.lock.wait_for(lambda: self.waiting)
                self.idle -= 1
                lookup = self.waiting.popleft()
            names = (TEMPUNAVAIL, TEMPUNAVAIL)
            try:
                if time.monotonic() < lookup.wanted_until:
                    names = lookup_client_names(lookup.ip)
            except Exception:       # a resolver that fails in a way of its own: no name, and the thread lives
                event("lookup_failed", exc_info=True, client=lookup.ip)
            finally:
                with self.lock:
                    del self.looking[lookup.ip]
                    self.per_network[lookup.network] -= 1
                    if not self.per_network[lookup.network]:
                        del self.per_network[lookup.network]
                lookup.found(names)


class Client(typing.NamedTuple):
    """Who the client is, as back-ends and the auth service are told: one value
    the session builds, and builds anew (_replace) when the client says HELO,
    starts TLS or logs in; nothing else of the session reaches them."""

    sid: str                    # the session's id, first on each of its log lines
    ip: str = None              # None: no IP address (--inetd on a UNIX socket or pipes)
    port: int = None
    names: "ClientNames" = None     # its names, being looked up (--resolve on)
    helo: str = None            # its HELO or EHLO argument
    esmtp: bool = False         # it said EHLO
    tls: tuple = None           # (protocol, cipher) once the connection is TLS
    certificate: dict = None    # its verified certificate, as Auth-SSL-* values
    user: str = None            # the login it authenticated as
    local: tuple = None         # (ip, port) of the relay that it connected to; None without an IP address
    proxy: tuple = None         # (ip, port, server ip, server port) from the PROXY header it came with

    @property
    def address(self):
        """The address as an ipaddress object, for the checks that need one."""
        return ipaddress.ip_address(self.ip) if self.ip else None

    def looked_up(self):
        """(name, reverse_name) as XCLIENT names them; [UNAVAILABLE] unless looked up."""
        return self.names.get() if self.names else (UNAVAILABLE, UNAVAILABLE)

    def __str__(self):
        """For the log: ADDR:PORT, or what it has instead of an address."""
        return peer_text(self.ip, self.port)


class Session:
    """One client's SMTP session: run() serves it until QUIT, EOF or an error."""

    def __init__(self, relay, channel, client, via=None, implicit_tls=False):
        """relay: the Relay; channel: the client's Channel; client: the Client; via: the PROXY protocol
        peer's address, or None; implicit_tls: the TLS handshake comes first (--tls-listen)."""
        self.relay, self.setup, self.channel = relay, relay.setup, channel
        self.cfg = self.setup.cfg
        self.via = via              # the PROXY protocol peer that told us who the client is
        self.implicit_tls = implicit_tls
        self.client, self.sid = client, client.sid
        self.backend = None         # open back-end connection, for the rest of the session
        self.backend_opened = False     # a back-end was tried for this session before (--balance)
        self.login_attempt = 0      # Auth-Login-Attempt
        self.ehlo_required = False  # after STARTTLS, MAIL and AUTH wait for a new EHLO
        self.errors = 0
        self.refusals = 0           # MAIL and RCPT refused, junk past JUNK_LIMIT (--max-refusals)
        self.junk = 0               # junk commands since the last delivered message
        self.verb = None            # of the command being handled
        self.done = False
        self.reset(forget_helo=True)
        if log.isEnabledFor(logging.DEBUG):
            channel.debug_sid = self.sid

    def reset(self, forget_helo=False):
        """Forget the mail transaction (RFC 5321 §4.1.1.5); with forget_helo, who the client said it was too."""
        if forget_helo:
            self.client = self.client._replace(helo=None, esmtp=False, user=None)
            self.route = None       # the auth service's OK answer that applies now
        self.mail_from = None
        self.mail_params = {}
        self.mail_line = None       # the MAIL command as sent, for Auth-SMTP-From
        self.mail_sent = False      # the back-end accepted this transaction's MAIL
        self.rcpt_to = []
        self.started = None

    # The loop ----------------------------------------------------------------

    def event(self, name, **fields):
        """One event of this session: its id and client among the fields."""
        event(name, session=self.sid, client=self.client.ip, **fields)

    def run(self):
        """Serve the client from greeting to close: QUIT, EOF, --timeout, a stop or an error."""
        self.connected = time.monotonic()
        if wanted("connect"):
            via = f" via {format_address(*self.via[:2])}" if self.via else ""
            self.event("connect", peer=f"{self.client}{via}", port=self.client.port)
        try:
            if self.implicit_tls:
                self.begin_tls()
            if self.greet():
                while not self.done:
                    self.handle_command()
            self.channel.flush()
        except Stopping:
            self.say_last(SHUTTING_DOWN.fill(name=self.cfg.server_name))
        except ClientGone as e:
            self.event("client_gone", reason=str(e))
        except TimeoutError:
            self.event("client_timed_out", seconds=self.cfg.timeout)
            self.say_last(TIMED_OUT.fill(name=self.cfg.server_name))
        finally:
            self.close_backend()

    def log_disconnect(self):
        """The session's last line, once its slot is free (serve_connection)."""
        if wanted("disconnect"):
            self.event("disconnect", peer=self.client.ip or str(self.client),
                       seconds=round(time.monotonic() - self.connected, 3))

    def begin_tls(self):
        """The TLS handshake (implicit TLS or STARTTLS); --tls-verify-client on turns
        away a client without a certificate, with a reply it can read."""
        tls, certificate = self.channel.start_tls(self.setup.tls_context)
        self.client = self.client._replace(tls=tls, certificate=certificate)
        if self.cfg.tls_verify_client == "on" and not certificate:
            self.say_last(CERTIFICATE_REQUIRED)
            raise ClientGone("refused: no client certificate (--tls-verify-client on)")
        self.event("tls", protocol=self.client.tls[0], cipher=self.client.tls[1],
                   certificate=certificate and printable(certificate["Auth-SSL-Subject"]),
                   certificate_note=certificate and f", client certificate {printable(certificate['Auth-SSL-Subject'])}" or "")

    @property
    def tls_required(self):
        """Commands wait for TLS: --starttls only, or client certificates required."""
        return not self.client.tls and (self.cfg.starttls == "only" or self.cfg.tls_verify_client == "on")

    def check_ehlo(self):
        """MAIL and AUTH: raises 503 until EHLO after STARTTLS (where TLS is required, dispatch() said 530)."""
        if self.ehlo_required:
            raise SMTPError(EHLO_AFTER_STARTTLS)

    def offered_mechanisms(self):
        """The AUTH mechanisms EHLO lists now.

        RFC 4954 §4: no passwords in clear. Where TLS is configured, PLAIN
        and LOGIN (and EXTERNAL, which needs a certificate) wait for it,
        except for loopback clients; without TLS configured the
        administrator has chosen clear text.
        """
        methods = self.cfg.auth_mechanisms
        if self.client.tls or not self.setup.tls_context:
            return methods
        if self.tls_required:
            return []
        if self.client.address is not None and self.client.address.is_loopback:
            return [m for m in methods if m != "external"]
        return [m for m in methods if m not in ("plain", "login", "external")]

    def greet(self):
        """Send the greeting; False if the client spoke first during --greeting-delay."""
        if self.cfg.greeting_delay and self.channel.wire.readable_within(self.cfg.greeting_delay):
            self.event("spoke_first")
            self.say_last(SPOKE_FIRST)
            return False
        self.channel.reply(*GREETING.fill(name=self.cfg.server_name))
        return True

    def say_last(self, reply):
        """A closing reply to a client that may no longer listen."""
        with contextlib.suppress(ClientGone, OSError):
            self.channel.reply(*reply)
            self.channel.flush()

    def handle_command(self):
        """Read one command line and answer it; a stop is taken here, between transactions only."""
        idle = self.mail_from is None       # a stop ends the session here, never inside a transaction
        if idle and self.relay.stop_signal is not None:
            raise Stopping()
        self.channel.interruptible = idle
        self.verb = None
        try:
            line = self.channel.read_line(AUTH_LINE_LIMIT)
            if len(line) + 2 > COMMAND_LINE_LIMIT and not re.match(rb"(?i)AUTH ", line):
                raise SMTPError(LINE_TOO_LONG)
            if self.channel.debug_sid:
                self.event("command", line=printable(mask_secrets(line)))
            if self.cfg.max_refusals and self.refusals >= self.cfg.max_refusals:
                # Postfix's smtpd_hard_error_limit: a client that only probes is sent away.
                self.event("too_many_refusals", refusals=self.refusals)
                self.channel.reply(*TOO_MANY_REFUSALS)
                self.done = True
                return
            self.dispatch(line)
            self.counted(self.channel.last_code)
        except SMTPError as e:
            self.channel.reply(e.code, e.text)
            self.counted(e.code, protocol_error=e.counted)
            if e.counted:
                self.errors += 1
                self.event("client_error", code=e.code, text=e.text, errors=self.errors, max_errors=self.cfg.max_errors)
                if self.cfg.max_errors and self.errors >= self.cfg.max_errors:
                    self.channel.reply(*TOO_MANY_ERRORS)
                    self.done = True
        except (ClientGone, TimeoutError, Stopping):
            raise
        except Exception:
            # A bug of ours: the stream may be out of step, so close rather
            # than guess; 4xx tells the client to try again later.
            self.event("internal_error", exc_info=True)
            self.close_backend(quit=False)
            self.channel.reply(*INTERNAL_ERROR)
            self.done = True

    def counted(self, code, protocol_error=False):
        """Count the command just answered toward --max-refusals, and RCPT in the metrics."""
        if self.verb in JUNK_COMMANDS:
            self.junk += 1
            if self.junk > JUNK_LIMIT:
                self.refusals += 1
        elif self.verb in ("MAIL", "RCPT") and code >= 400 and not protocol_error:
            self.refusals += 1
        if self.verb == "RCPT" and wanted("recipient"):
            self.event("recipient", outcome="accepted" if code < 400 else "deferred" if code < 500 else "refused",
                       code=code)

    def dispatch(self, line):
        """Decode a command line and hand its argument to the smtp_VERB method (500 for any other)."""
        if COMMAND_CONTROLS.search(line):
            raise SMTPError(CONTROL_CHARACTER)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise SMTPError(COMMAND_NOT_UTF8) from None
        self.command_line = text.rstrip(" ")      # as typed, for Auth-SMTP-From/To (nginx)
        verb, _, arg = text.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isascii() and verb.isalpha() else None
        if handler is None:
            raise SMTPError(UNRECOGNIZED)
        self.verb = verb.upper()        # set first: the reply counts toward --max-refusals by it
        if self.tls_required and self.verb not in BEFORE_TLS:
            raise SMTPError(STARTTLS_FIRST)
        handler(arg.strip(" "))

    def syntax_error(self):
        """The 501 that shows the command's syntax, as its smtp_VERB method declares it."""
        return SMTPError(SYNTAX.fill(syntax=getattr(self, "smtp_" + self.verb).syntax))

    # Verbs: each declares its syntax (@syntax), for HELP and the 501 replies ----

    @syntax("HELO hostname")
    def smtp_HELO(self, arg, esmtp=False):
        """RFC 5321 §4.1.1.1: who the client is; EHLO lists the extensions (RFC 1869)."""
        words = arg.split()
        if len(words) != 1:
            raise self.syntax_error()
        if not PRINTABLE_ASCII.fullmatch(words[0]):
            raise SMTPError(BAD_HOST_NAME.fill(why="printable ASCII only"))
        # RFC 5321 §4.5.3.1.2: a domain is at most 255 octets; Postfix takes
        # no longer XCLIENT value, and xtext may triple it.
        if len(xtext(words[0])) > XCLIENT_VALUE_LIMIT:
            raise SMTPError(BAD_HOST_NAME.fill(why="too long"))
        self.abort_transaction()        # RFC 5321 §4.1.4: like RSET
        self.client = self.client._replace(helo=words[0], esmtp=esmtp)
        self.ehlo_required = False
        if not esmtp:
            self.channel.reply(250, self.cfg.server_name)
            return
        # SIZE: ours, or the back-ends' where their EHLO said less (static back-ends).
        size = self.cfg.max_message_size
        known = None if self.cfg.auth_http else self.relay.balancer.size_limit(self.cfg.backend)
        if known and (not size or known < size):
            size = known
        extensions = [self.cfg.server_name, "PIPELINING", f"SIZE {size}" if size else "SIZE",
                      "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        mechanisms = [m.upper() for m in self.offered_mechanisms()]
        if mechanisms:
            extensions.append("AUTH " + " ".join(mechanisms))
        if self.cfg.starttls != "off" and not self.client.tls and self.channel.wire.sock is not None:
            extensions.append("STARTTLS")
        self.channel.reply(250, "\n".join(extensions))

    @syntax("EHLO hostname")
    def smtp_EHLO(self, arg):
        """RFC 5321 §4.1.1.1."""
        self.smtp_HELO(arg, esmtp=True)

    @syntax("MAIL FROM:<address>")
    def smtp_MAIL(self, arg):
        """RFC 5321 §4.1.1.2: the sender, checked here, then passed to the back-end (or held for
        the auth service's first lookup, as nginx's smtp_auth none)."""
        if self.mail_from is not None:
            raise SMTPError(NESTED_MAIL)
        self.check_ehlo()
        if self.client.user is None and self.cfg.auth_required:
            raise SMTPError(AUTH_REQUIRED)
        if arg[:5].upper() != "FROM:":
            raise self.syntax_error()
        address, params = parse_path(arg[5:])
        for name, value in params.items():
            if name == "SIZE":
                if value is None or not is_number(value) or len(value) > 20:
                    raise SMTPError(BAD_SIZE)
                if self.cfg.max_message_size and int(value) > self.cfg.max_message_size:
                    raise SMTPError(TOO_BIG)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPError(BAD_BODY)
                params[name] = value.upper()
            elif name == "SMTPUTF8":
                if value is not None:
                    raise SMTPError(BAD_SMTPUTF8)
            elif name == "AUTH":
                # RFC 4954 §5: accepted as we advertise AUTH; the identity the
                # back-end knows is the relay's own business, so it stays here.
                if value is None or value != "<>" and not re.fullmatch(r"[!-~]+", value):
                    raise SMTPError(BAD_AUTH_PARAMETER)
            else:
                raise SMTPError(UNSUPPORTED_OPTION.fill(name=printable(name)))
        if not address.isascii() and "SMTPUTF8" not in params:
            raise SMTPError(UTF8_UNDECLARED)
        if self.cfg.allow_sender and not self.cfg.allow_sender.fullmatch(address):
            self.event("not_allowed", role="sender", address=printable(address))
            raise SMTPError(SENDER_NOT_ALLOWED)
        self.started = time.monotonic()
        if self.cfg.auth_http and self.client.user is None:
            # nginx's smtp_auth none: the auth service is asked at the first
            # RCPT, with this MAIL and that RCPT; until then MAIL is ours.
            self.mail_from, self.mail_params, self.mail_line = address, params, self.command_line
            self.channel.reply(*SENDER_OK)
            return
        code, text = self.backend_call("mail", address, params)
        if 200 <= code < 300:
            self.mail_from, self.mail_params, self.mail_sent = address, params, True
        self.channel.reply(code, text)

    @syntax("RCPT TO:<address>")
    def smtp_RCPT(self, arg):
        """RFC 5321 §4.1.1.3: a recipient, checked here, then passed to the back-end, whose
        reply the client hears."""
        if self.mail_from is None:
            raise SMTPError(NEED_MAIL)
        address = self.recipient(arg, self.mail_params, len(self.rcpt_to))
        if self.cfg.allow_recipient and not self.cfg.allow_recipient.fullmatch(address):
            self.event("not_allowed", role="recipient", address=printable(address))
            raise SMTPError(RECIPIENT_NOT_ALLOWED)
        if not self.mail_sent:
            # --auth-http-scope session: one OK answer holds for the session (nginx's load on the service).
            if self.cfg.auth_http_scope == "transaction" or not self.route:
                self.route_transaction(self.command_line)
            code, text = self.backend_call("mail", self.mail_from, self.mail_params)
            if not 200 <= code < 300:       # the back-end's MAIL refusal answers this RCPT (nginx)
                self.reset()
                self.channel.reply(code, text)
                return
            self.mail_sent = True
        code, text = self.backend_call("rcpt", address)
        if 200 <= code < 300:
            self.rcpt_to.append(address)
        self.channel.reply(code, text)

    def recipient(self, arg, params, accepted):
        """RCPT's argument -> the address, where the relay's own checks pass for a transaction
        with MAIL parameters params and accepted recipients so far; else SMTPError. But for
        --allow-recipient, which smtp_RCPT logs."""
        if arg[:3].upper() != "TO:":
            raise self.syntax_error()
        address, rcpt_params = parse_path(arg[3:])
        if rcpt_params:
            raise SMTPError(UNSUPPORTED_OPTION.fill(name=printable(next(iter(rcpt_params)))))
        if not address:
            raise SMTPError(BAD_RECIPIENT)
        if not address.isascii() and "SMTPUTF8" not in params:
            raise SMTPError(UTF8_UNDECLARED)
        if accepted >= self.cfg.max_recipients:
            raise SMTPError(TOO_MANY_RECIPIENTS)
        return address

    def pipelined_group(self, method, args):
        """RFC 2920: the back-end commands for this MAIL or RCPT and for the RCPTs and DATA the
        client has pipelined behind it, as they will go where each reply before them accepts
        -> [(verb, args)], or [] where this one goes alone.

        Each command is still handled in its turn, with its own reply. A command goes
        ahead only where it passes every check of the relay's own that it would meet in
        its turn (the same checks, with the recipients counted as if all were accepted,
        which refuses sooner, never later): so one the session will not make follows a
        reply that refused what it built on, and the back-end refuses it too.
        """
        backend = self.backend
        if not self.channel.wire.has_line() or not backend.pipelining or method != self.verb.lower():
            return []       # nothing pipelined behind it; or the MAIL held for the auth service, ahead of its RCPT
        if method == "mail":
            first, accepted, params = backend.mail_command(*args), 0, args[1]
            if not isinstance(first[0], str):
                return []   # a MAIL the back-end cannot take: our own reply, nothing sent
        else:
            first, accepted, params = backend.rcpt_command(*args), len(self.rcpt_to) + 1, self.mail_params
        commands = [first]
        for line in self.channel.wire.buffered_lines(self.cfg.max_recipients + 1):
            if COMMAND_CONTROLS.search(line) or len(line) + 2 > COMMAND_LINE_LIMIT:
                break
            try:
                verb, _, arg = line.decode("utf-8").partition(" ")
            except UnicodeDecodeError:
                break
            if verb.upper() == "RCPT":
                try:
                    address = self.recipient(arg.strip(" "), params, accepted)
                except SMTPError:
                    break
                if self.cfg.allow_recipient and not self.cfg.allow_recipient.fullmatch(address):
                    break
                commands.append(backend.rcpt_command(address))
                accepted += 1
            elif verb.upper() == "DATA" and not arg.strip(" ") and accepted:
                commands.append(("DATA", ""))
                break
            else:
                break
        return commands if len(commands) > 1 else []

    @syntax("DATA")
    def smtp_DATA(self, arg):
        """RFC 5321 §4.1.1.4: the message, streamed to the back-end; the client hears 250 only
        after the back-end said it, and a message that fails never gets its end sent."""
        if arg:
            raise self.syntax_error()
        if self.mail_from is None:
            raise SMTPError(NEED_MAIL)
        if not self.rcpt_to:
            raise SMTPError(NO_RECIPIENTS)
        code, text = self.backend_call("data_start")
        self.channel.reply(code, text)
        if code != 354:
            return
        sender, rcpts, started = self.mail_from, list(self.rcpt_to), self.started
        failure, size, at_line_start, tail = None, 0, True, b""
        limit = self.cfg.max_message_size
        try:
            for segment in self.channel.read_data(self.cfg.bare_newline == "normalize"):
                if failure:
                    continue            # read the rest, so the client hears our reply
                if segment is BARE_NEWLINE:
                    failure = BARE_NEWLINE_REFUSED
                    continue
                size += unstuffed_size(segment, at_line_start)
                at_line_start = segment.endswith(b"\r\n")
                if limit and size > limit:
                    failure = TOO_BIG
                    continue
                if self.channel.data_complete:
                    tail = segment      # goes out with the end of data, in one write
                    continue
                try:
                    self.backend.data_write(segment)
                except BackendGone as e:
                    self.event("backend_failed", backend=self.backend.name, command="DATA", reason=str(e))
                    failure = BACKEND_LOST
        except (ClientGone, TimeoutError):
            # No terminator reaches the back-end: it keeps no message.
            self.event("message_abandoned", size=size)
            self.close_backend(quit=False)
            raise
        if failure:
            # The back-end holds part of a message and no way to end it short
            # of the terminator: close the connection, so nothing is delivered.
            self.close_backend(quit=False)
            code, text = failure
        else:
            try:
                code, text = self.backend_call("data_end", tail)
            except SMTPError as e:
                code, text = e.code, e.text
        if wanted("message"):       # the message's one line: what the client heard
            self.event("message", sender=printable(sender), recipients=[printable(r) for r in rcpts], rcpts=len(rcpts),
                       size=size, backend=self.backend.name if self.backend else "-",
                       reply=printable(f"{code} {text}"), seconds=round(time.monotonic() - started, 3))
        if 200 <= code < 300:
            self.refusals = self.junk = 0
        self.reset()
        self.channel.reply(code, text)

    @syntax("AUTH mechanism [initial-response]")
    def smtp_AUTH(self, arg):
        """RFC 4954; the auth service checks the credentials and names the back-end."""
        mechanisms = self.cfg.auth_mechanisms
        if not mechanisms:
            raise SMTPError(AUTH_NOT_ENABLED)
        if self.client.user is not None:
            raise SMTPError(ALREADY_AUTHENTICATED)
        if self.mail_from is not None:
            raise SMTPError(MAIL_IN_PROGRESS)
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            raise self.syntax_error()
        self.check_ehlo()
        if mechanism.lower() not in mechanisms:
            raise SMTPError(UNKNOWN_MECHANISM)
        if mechanism.lower() not in self.offered_mechanisms():
            raise SMTPError(ENCRYPTION_REQUIRED)
        initial = initial.strip().encode() or None
        credentials = getattr(self, "auth_" + mechanism.upper().replace("-", "_"))(initial)
        answer = self.ask_auth_service(**credentials)
        if not answer.ok:
            self.refuse(answer, counted=True)
        self.client, self.route = self.client._replace(user=credentials["user"]), answer
        self.close_backend()       # a back-end chosen before AUTH no longer applies
        self.event("authenticated", user=printable(self.client.user), mechanism=mechanism.upper(),
                   backend=str(answer.backend))
        self.channel.reply(*AUTHENTICATED)

    def challenge(self, text):
        """Send a 334 challenge -> the client's decoded answer (bytes)."""
        self.channel.reply(334, text)
        return decode_auth_response(self.channel.read_line(AUTH_LINE_LIMIT))

    def first_response(self, initial, prompt):
        """The client's first AUTH answer: its initial response, or its answer to a 334 prompt."""
        return decode_auth_response(initial) if initial is not None else self.challenge(prompt)

    def auth_PLAIN(self, initial):
        """RFC 4616: authzid NUL authcid NUL password, in one response."""
        response = self.first_response(initial, "")
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SMTPError(BAD_RESPONSE.fill(mechanism="PLAIN", form="authzid NUL authcid NUL password"))
        return dict(method="plain", user=decode_utf8(parts[1]), password=decode_utf8(parts[2]))

    def auth_LOGIN(self, initial):
        """The LOGIN mechanism (draft-murchison-sasl-login): user, then password."""
        user = self.first_response(initial, "VXNlcm5hbWU6")
        password = self.challenge("UGFzc3dvcmQ6")
        return dict(method="plain", user=decode_utf8(user), password=decode_utf8(password))   # as nginx

    def auth_CRAM_MD5(self, initial):
        """RFC 2195: a challenge, and the user with the HMAC-MD5 of it; the service checks it (Auth-Salt)."""
        if initial is not None:
            raise SMTPError(NO_INITIAL_RESPONSE.fill(mechanism="CRAM-MD5"))
        salt = f"<{secrets.randbelow(10**10)}.{int(time.time())}@{self.cfg.server_name}>"
        user, _, digest = decode_utf8(self.challenge(base64.b64encode(salt.encode()).decode())).rpartition(" ")
        if not user or not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
            raise SMTPError(BAD_RESPONSE.fill(mechanism="CRAM-MD5", form="user SP 32 hex digits"))
        return dict(method="cram-md5", user=user, password=digest.lower(), salt=salt)

    def auth_EXTERNAL(self, initial):
        """RFC 4422 appendix A: the identity TLS established (the client certificate's subject), which
        the client may name or leave empty; without TLS configured, the identity the client names."""
        identity = decode_utf8(self.first_response(initial, ""))
        if self.setup.tls_context:
            if not self.client.certificate:
                raise SMTPError(NO_CLIENT_CERTIFICATE, counted=True)
            subject = self.client.certificate["Auth-SSL-Subject"]
            if identity and identity != subject:    # RFC 4422 appendix A: to act as another, it fails
                raise SMTPError(NOT_THAT_IDENTITY, counted=True)
            identity = subject
        return dict(method="external", user=identity, password="")

    def route_transaction(self, rcpt_line):
        """Ask the auth service about this transaction (--auth none) and aim it at the answer's back-end."""
        answer = self.ask_auth_service("none", mail=self.mail_line, rcpt=rcpt_line)
        if not answer.ok:
            self.refuse(answer)
        # The connection carries the previous answer's identity too (its AUTH,
        # its XCLIENT LOGIN): reuse it only for the very same answer.
        if self.backend and self.route != answer:
            self.close_backend()
        self.route = answer

    def ask_auth_service(self, method, user="", password="", salt=None, mail=None, rcpt=None):
        """One lookup -> AuthAnswer; the service's own trouble is 451 4.3.2, and the session goes on."""
        self.login_attempt += 1
        started = time.monotonic()
        try:
            answer = self.setup.auth_service.lookup(self.client, self.login_attempt, method, user, password, salt,
                                                    mail, rcpt)
        except AuthServiceError as e:
            self.event("auth_service_failed", url=self.cfg.auth_http, reason=str(e), result="error",
                       seconds=round(time.monotonic() - started, 3))
            raise SMTPError(AUTH_SERVICE_FAILED) from None
        self.event("auth_lookup", result="ok" if answer.ok else "refused", seconds=round(time.monotonic() - started, 3))
        return answer

    def refuse(self, answer, counted=False):
        """Raise the auth service's refusal, after its Auth-Wait (nginx)."""
        self.event("login_failed", reason=printable(answer.text))
        if answer.wait:
            self.channel.flush()
            time.sleep(min(answer.wait, self.cfg.timeout))
        code, enhanced = answer.error_code or (535, "5.7.0")
        if code == 421:
            self.done = True        # RFC 5321 §3.8: 421 closes the session
        raise SMTPError((code, with_status(code, f"{enhanced} {answer.text}" if enhanced else answer.text)),
                        counted=counted)

    @syntax("STARTTLS")
    def smtp_STARTTLS(self, arg):
        """RFC 3207: TLS, after which the session starts over."""
        if self.cfg.starttls == "off" or self.channel.wire.sock is None:     # off, or a client on pipes
            raise SMTPError(STARTTLS_NOT_AVAILABLE)
        if self.client.tls:
            raise SMTPError(TLS_ACTIVE)
        if arg:
            raise self.syntax_error()
        self.channel.reply(*READY_FOR_TLS)
        self.begin_tls()
        # RFC 3207 §4.2: the session starts over; nothing learned in clear
        # (HELO, AUTH, a back-end chosen for the plaintext client) carries on.
        self.close_backend()
        self.reset(forget_helo=True)
        self.ehlo_required = True           # "The client SHOULD send an EHLO command as the first command"

    @syntax("RSET")
    def smtp_RSET(self, arg):
        """RFC 5321 §4.1.1.5: the transaction is forgotten, here and at the back-end."""
        self.abort_transaction()
        self.channel.reply(*OK)

    @syntax("NOOP")
    def smtp_NOOP(self, arg):
        """RFC 5321 §4.1.1.9 (a junk command: counted toward --max-refusals past 100)."""
        self.channel.reply(*OK)

    @syntax("QUIT")
    def smtp_QUIT(self, arg):
        """RFC 5321 §4.1.1.10."""
        self.channel.reply(*BYE)
        self.done = True

    @syntax("VRFY address")
    def smtp_VRFY(self, arg):
        """RFC 5321 §3.5.3: 252, the answer of a server that verifies nothing."""
        if not arg:
            raise self.syntax_error()
        self.channel.reply(*CANNOT_VRFY)

    @syntax("EXPN list")
    def smtp_EXPN(self, arg):
        """RFC 5321 §3.5.3: no lists are expanded here."""
        raise SMTPError(EXPN_NOT_AVAILABLE)

    @syntax("HELP [command]")
    def smtp_HELP(self, arg):
        """RFC 5321 §4.1.1.8: the verbs this relay answers, or one verb's syntax, as the
        smtp_VERB methods declare them (it cannot drift)."""
        method = getattr(self, "smtp_" + arg.upper(), None) if arg.isascii() and arg.isalpha() else None
        if method:
            self.channel.reply(*HELP_VERB.fill(syntax=method.syntax))
            return
        verbs = [name[5:] for name in dir(self) if name.startswith("smtp_")]
        self.channel.reply(*HELP.fill(verbs=" ".join(sorted(verbs))))

    # The back-end, seen from the session ---------------------------------------

    def backend_call(self, method, *args):
        """Run a back-end method -> its (code, text); opens a back-end first if need be.

        A back-end that breaks gives the client 451 4.4.2, and the next MAIL
        opens a new one. One that says 421 (it is closing the connection,
        RFC 5321 §3.8) is passed on and ends the client's session as well,
        so that no fresh back-end session goes on where that one stopped
        (Postfix's smtpd_hard_error_limit). A connection found closed at its
        first command, one from the pool or at a MAIL after this session's
        last transaction (a back-end's idle timeout, with no 421), is replaced
        once, since nothing is lost yet.
        """
        from_pool, kept = False, self.backend is not None
        if self.backend is None:
            if self.route:
                self.backend = open_backend(self.client, [self.setup.route_backend(self.route)], self.connection_use())
            else:
                balancer = self.relay.balancer
                order = balancer.order(self.setup.backends, self.cfg.balance, new_session=not self.backend_opened)
                self.backend_opened = True
                self.backend = open_backend(self.client, order, self.connection_use(), balancer)
            self.relay.balancer.opened(self.backend.name)
            from_pool = self.backend.reused
        try:
            group = self.pipelined_group(method, args) if method in ("mail", "rcpt") else None
            if group:
                self.backend.send_ahead(group)
            code, text = getattr(self.backend, method)(*args)
        except BackendGone as e:
            self.event("backend_failed", backend=self.backend.name, command=COMMAND_NAMES[method], reason=str(e))
            self.close_backend(quit=False)
            if from_pool or kept and method == "mail" and not e.reply:
                return self.backend_call(method, *args)
            self.reset()
            if e.reply:
                self.done = True
                return e.reply[0], with_status(*e.reply)
            raise SMTPError(BACKEND_LOST) from None
        if code >= 400 and method != "data_end":       # the end of data has its own line, the message's
            self.event("backend_refused", backend=self.backend.name, command=COMMAND_NAMES[method],
                       reply=printable(f"{code} {text}"))
        return code, with_status(code, text)

    def connection_use(self):
        """What a back-end connection opened now carries beside the client -> (the
        (user, password) for AUTH towards it: the auth service's, else --backend-auth;
        the login XCLIENT names, where the relay itself does not authenticate)."""
        route = self.route
        if route and route.user and route.password:
            return (route.user, route.password), None
        credentials = self.cfg.backend_auth
        return credentials, None if credentials else (route and route.user) or self.client.user

    def abort_transaction(self):
        """RSET at the back-end where a transaction is open there, and forget it here."""
        if self.mail_from is not None and self.backend:
            try:
                self.backend.rset()
            except BackendGone as e:
                self.event("backend_failed", backend=self.backend.name, command="RSET", reason=str(e))
                self.close_backend(quit=False)
        self.reset()

    def close_backend(self, quit=True):
        """Done with the back-end connection: QUIT (or back to the pool) between
        transactions; with quit False, closed at once."""
        if self.backend:
            backend, self.backend = self.backend, None
            self.relay.balancer.closed(backend.name)
            if quit and not self.mail_sent:     # no transaction open there: it may serve another session
                backend.release()
            else:
                backend.close(quit)


# --- 4. Back-ends: failover, the smtplib handshake, XCLIENT, Maildir ---------
# A back-end (SMTPBackend, MaildirBackend, StdoutBackend, made by Setup from
# a BackendSpec) opens a connection for one client, given the Client value
# and nothing else of the session. Connections share one small interface:
# mail, rcpt, data_start, data_end and rset return (code, text), data_write
# and close nothing; any may raise BackendGone, so the session never sees
# smtplib's or the OS's exceptions.

XCLIENT_VALUE_LIMIT = 255   # Postfix: "attribute value too long" past this, after xtext
XCLIENT_LINE_LIMIT = 512    # RFC 5321 §4.5.3.1.4, CRLF included
XCLIENT_FIX = ("add the relay's address to the back-end's smtpd_authorized_xclient_hosts; for a back-end "
               "that reads the PROXY protocol, --backend-proxy-protocol; --no-xclient only where it may see the "
               "relay as the client")
REPLY_LINE_LIMIT = 8192     # bytes in one back-end reply line (smtplib's _MAXLINE)
REPLY_LINES_LIMIT = 100     # lines in one back-end reply; Postfix's EHLO has about 15
REPLY_BYTES_LIMIT = 65536   # a larger reply is a broken back-end
UNAVAILABLE, TEMPUNAVAIL = "[UNAVAILABLE]", "[TEMPUNAVAIL]"   # XCLIENT_README's "no value"
POOL_IDLE_SECONDS = 10      # a pooled back-end connection unused this long is closed
POOL_SIZE = 64              # idle connections kept per back-end
BACKEND_HOLD_OFF = 10       # seconds a back-end found down is skipped by new sessions (--balance)


def xtext(value):
    """RFC 3461 §4 xtext, as Postfix's XCLIENT wants its values."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in value)


def xclient_arguments(client, wanted, login):
    """The XCLIENT arguments for the attributes in wanted, within Postfix's limits.

    An attribute left out would keep the relay's own value on the back-end,
    so every wanted one is sent; where the line would pass 512 octets, the
    names give way to [UNAVAILABLE] (the stricter value), then LOGIN goes.
    """
    ip = client.address         # None: the client has none, and the back-end must not take the relay's
    name, reverse_name = client.looked_up()
    values = {
        "ADDR": UNAVAILABLE if ip is None else f"IPV6:{ip}" if ip.version == 6 else str(ip),
        "PORT": UNAVAILABLE if ip is None else str(client.port),
        "NAME": name,
        "REVERSE_NAME": reverse_name,
        "HELO": client.helo or UNAVAILABLE,
        "PROTO": "ESMTP" if client.esmtp else "SMTP",
        "LOGIN": login,     # left out when the relay itself authenticates (nginx)
    }
    values = {k: xtext(v) for k, v in values.items() if k in wanted and v}
    if len(values.get("LOGIN", "")) > XCLIENT_VALUE_LIMIT:
        del values["LOGIN"]     # no login is the stricter value
    for key, value in values.items():
        if len(value) > XCLIENT_VALUE_LIMIT:
            values[key] = UNAVAILABLE

    def line():
        """The XCLIENT arguments as they stand: NAME=value, space-separated."""
        return " ".join(f"{k}={v}" for k, v in values.items())
    for key in ("REVERSE_NAME", "NAME", "LOGIN"):
        if len("XCLIENT " + line()) + 2 <= XCLIENT_LINE_LIMIT:
            break
        if key == "LOGIN":
            values.pop(key, None)
        elif key in values:
            values[key] = UNAVAILABLE
    return line()


def proxy_header(version, client):
    """The PROXY protocol header (haproxy's proxy-protocol.txt, v1 or v2) that names
    client to a back-end: its address and port, and the relay's that it connected
    to. A client without an IP address is v1 UNKNOWN or v2 LOCAL, which make the
    back-end take the relay's own address: such a client needs XCLIENT too."""
    ip = client.address
    if ip is None or client.local is None:
        return b"PROXY UNKNOWN\r\n" if version == "v1" else PROXY_V2_SIGNATURE + bytes((0x20, 0, 0, 0))
    to = ipaddress.ip_address(client_ip(client.local))
    if to.version != ip.version:        # a PROXY header in named a client of the other family
        to = ipaddress.IPv6Address(f"::ffff:{to}") if to.version == 4 else ipaddress.IPv4Address(0)
    if version == "v1":
        return f"PROXY TCP{ip.version} {ip} {to} {client.port} {client.local[1]}\r\n".encode()
    addresses = ip.packed + to.packed + struct.pack("!HH", client.port, client.local[1])
    return PROXY_V2_SIGNATURE + bytes((0x21, 0x11 if ip.version == 4 else 0x21)) + \
        struct.pack("!H", len(addresses)) + addresses


class BackendDown(RelayError):
    """The back-end could not be used at all; the next one is tried."""


class BackendUntrusted(BackendDown):
    """The back-end would take the mail under the relay's own address (no XCLIENT)."""


class BackendGone(RelayError):
    """The back-end connection broke, timed out or fell out of step in the middle of
    things; reply: its 421 (it is closing the connection), to be passed on."""

    def __init__(self, message, reply=None):
        super().__init__(message)
        self.reply = reply


class OutOfStep(BackendGone):
    """A reply that cannot answer the command it was read for (RFC 5321 §4.3.2)."""


class UnaskedReply(RelayError, smtplib.SMTPServerDisconnected):
    """The back-end said something before it was asked; reply: its 421, where that was all."""

    def __init__(self, reply):
        """reply: the (421, text) the back-end said unasked, or None where it said anything else."""
        super().__init__(f"said {'421' if reply else 'something'} before it was asked")
        self.reply = reply


# An unasked reply that is only a 421, the back-end's notice that it closes.
UNASKED_CLOSING = re.compile(rb"(?:421-[^\n]*\n)*421(?: [^\n]*)?\n")


class LocalFailure(RelayError):
    """The relay itself ran short (file descriptors, memory, threads): no back-end's fault."""


LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# What a back-end connection's methods are called in the log.
COMMAND_NAMES = {"mail": "MAIL", "rcpt": "RCPT", "data_start": "DATA", "data_end": "end of data", "rset": "RSET"}


def open_backend(client, candidates, use, balancer=None):
    """Try each back-end in order for client, with use = (credentials, login) -> an open
    connection; all down: SMTPError 451. The balancer (static back-ends) hears which
    answered, and what SIZE each offered, and which were down."""
    for backend in candidates:
        fields = dict(session=client.sid, client=client.ip, backend=str(backend))
        try:
            connection = backend.open(client, *use)
            if connection.reused:
                event("backend_reused", **fields)
            else:
                event("backend_connected", tls=connection.tls_version, xclient=connection.xclient,
                      details_note=connection.describe(), **fields)
            if balancer:
                balancer.answered(backend, connection.size)
            return connection
        except BackendDown as e:
            hold_off = balancer.failed(backend) if balancer else None
            if isinstance(e, BackendUntrusted):
                event("backend_untrusted", reason=str(e), fix=XCLIENT_FIX, **fields)
            else:
                event("backend_down", reason=str(e), hold_off=hold_off,
                      hold_off_note=f"; new sessions skip it for {hold_off:g}s" if hold_off else "", **fields)
        except LocalFailure as e:
            # Ours, not the back-end's: it is not held off, and the next one would fail alike.
            event("short_of_resources", reason=str(e), **fields)
            raise SMTPError(SHORT_OF_RESOURCES) from None
    event("no_backend", session=client.sid, client=client.ip)
    raise SMTPError(NO_BACKEND)


class Balancer:
    """--balance over the static back-ends: which one a new back-end session
    tries first (haproxy's first, roundrobin, leastconn), the others after it
    in their turn, and passive health: a back-end found down is skipped by new
    sessions for BACKEND_HOLD_OFF seconds, then one session tries it first
    again, so a dead one does not cost every session its connect timeout.
    Back-ends are known by name, so the counts outlive a reload that keeps them."""

    def __init__(self):
        """Nothing known yet: no back-end held off, none in use, no SIZE seen."""
        self.lock = threading.Lock()
        self.turn = 0
        self.in_use = collections.Counter()     # back-end name -> connections sessions hold open
        self.held_until = {}                    # back-end name -> when it may be tried again
        self.sizes = {}                         # back-end name -> the SIZE its last EHLO gave (0: none)

    def order(self, backends, policy, new_session=True):
        """The order in which a back-end session tries `backends` -> list. A new
        client session skips the held-off; one that already had a back-end
        session (a later MAIL) tries them last, as it may have seen them fail.
        Where every one is held off (a lone back-end once found down), they are
        tried anyway, the one found down earliest first: a restart of the only
        mail server must not refuse mail for the hold-off (nginx never counts
        a single server unavailable)."""
        with self.lock:
            if policy == "roundrobin":
                first = self.turn % len(backends)
                self.turn += 1
                backends = backends[first:] + backends[:first]
            elif policy == "leastconn":
                backends = sorted(backends, key=lambda b: self.in_use[str(b)])     # ties: as listed
            now, up, held, retry = time.monotonic(), [], [], []
            for backend in backends:
                until = self.held_until.get(str(backend))
                if until is None:
                    up.append(backend)
                elif until <= now and not retry:
                    retry.append(backend)       # this session tries it first; the others wait for its verdict
                    self.held_until[str(backend)] = now + BACKEND_HOLD_OFF
                else:
                    held.append(backend)
            if new_session and (retry or up):
                return retry + up
            return retry + up + sorted(held, key=lambda b: self.held_until[str(b)])

    def answered(self, backend, size):
        """backend took a session; size: the SIZE its EHLO gave (0: none), what EHLO may advertise."""
        with self.lock:
            self.sizes[str(backend)] = size
            if self.held_until.pop(str(backend), None) is not None:
                event("backend_up", backend=str(backend))

    def failed(self, backend):
        """backend was found down -> the seconds new sessions now skip it."""
        with self.lock:
            self.held_until[str(backend)] = time.monotonic() + BACKEND_HOLD_OFF
        return BACKEND_HOLD_OFF

    def size_limit(self, backends):
        """The smallest SIZE the back-ends' last EHLOs gave, or None while none is known."""
        with self.lock:
            known = [self.sizes[str(b)] for b in backends if self.sizes.get(str(b))]
        return min(known) if known else None

    def opened(self, backend_name):
        """A session holds a connection to it now (leastconn)."""
        with self.lock:
            self.in_use[backend_name] += 1

    def closed(self, backend_name):
        """A session let go of its connection to it."""
        with self.lock:
            self.in_use[backend_name] -= 1
            if self.in_use[backend_name] <= 0:
                del self.in_use[backend_name]


class Backend:
    """What every kind of back-end has: the Setup whose settings it follows, and
    the BackendSpec it was made from, which also names it in the log."""

    def __init__(self, setup, spec):
        """setup: the Setup whose settings it follows; spec: its BackendSpec (host and port, or path)."""
        self.setup, self.spec = setup, spec
        self.host, self.port, self.path = spec.host, spec.port, spec.path

    def __str__(self):
        """For the log: HOST:PORT, maildir:PATH or stdout:."""
        return str(self.spec)

    def create(self, owner=None):
        """What the back-end needs before the first session; nothing, but for a Maildir."""


class SMTPBackend(Backend):
    """A mail server reached over SMTP at HOST:PORT."""

    def open(self, client, credentials=None, login=None):
        """A connection for client: an idle one from the pool where it may be shared
        (with XCLIENT or a PROXY header one carries its client's identity for good:
        Postfix refuses a second XCLIENT on one connection), else a new one, its
        handshake done."""
        cfg = self.setup.cfg
        # A PROXY header, as XCLIENT, names one client for the connection's life.
        key = None if cfg.xclient or cfg.backend_proxy_protocol != "off" else (str(self), credentials)
        connection = key and self.setup.pool.take(key)
        if connection:
            connection.sid = client.sid
            return connection
        connection = SMTPConnection(self, client.sid, pool_key=key)
        connection.handshake(client, credentials, login)
        return connection


class BackendPool:
    """Idle back-end connections that carry no client's identity, for the next
    session: no XCLIENT, the relay's own EHLO name, AUTH as the same user (in
    the key). A session gives one back only between transactions."""

    def __init__(self):
        """Empty, and open for connections given back."""
        self.idle = collections.defaultdict(collections.deque)     # key -> (connection, since), newest last
        self.lock = threading.Lock()
        self.closed = False

    def take(self, key):
        """An idle connection for key, still open and silent, or None."""
        while True:
            with self.lock:
                waiting = self.idle.get(key)
                if not waiting:
                    return None
                connection, since = waiting.pop()     # the newest: the likeliest still open
            if time.monotonic() - since < POOL_IDLE_SECONDS and connection.quiet():
                return connection
            connection.close()

    def give(self, key, connection):
        """Keep connection for the next session that matches key; the expired go."""
        now, expired = time.monotonic(), []
        with self.lock:
            for waiting in self.idle.values():
                while waiting and now - waiting[0][1] >= POOL_IDLE_SECONDS:
                    expired.append(waiting.popleft()[0])
            waiting = self.idle[key]
            if len(waiting) < POOL_SIZE and not self.closed:
                waiting.append((connection, now))
            else:
                expired.append(connection)
        for old in expired:
            old.close(quit=True)

    def close(self):
        """QUIT every idle connection; any given back later is closed at once."""
        with self.lock:
            connections = [c for waiting in self.idle.values() for c, _ in waiting]
            self.idle.clear()
            self.closed = True
        for connection in connections:
            connection.close(quit=True)


class SMTPConnection(smtplib.SMTP):
    """smtplib.SMTP to one back-end, for one client session.

    smtplib's sendmail() wants the whole message in memory, so DATA is
    built from its lower layers: docmd("DATA"), send() per chunk, getreply().
    Commands are rebuilt from parsed values; nothing the client typed is
    passed on raw, so a client cannot reach XCLIENT or AUTH on a back-end
    that trusts the relay. Every byte goes through the connection's Wire,
    and replies are read strictly in step: a reply is read only as the
    answer to the command just sent, so bytes that are there before a
    command goes out (an unasked reply, or one too many) make the back-end
    broken, never the answer to a later command.
    """

    reused = False                  # taken from the pool, not opened for this session

    def __init__(self, backend, sid, pool_key=None):
        """Nothing is sent yet: handshake() connects. pool_key: what a session must
        match to take this connection from the pool, None where it is not shared."""
        cfg = backend.setup.cfg
        self.backend, self.name, self.sid, self.pool_key = backend, str(backend), sid, pool_key
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.authenticating = False     # masks the AUTH exchange in the debug log
        self.tls_mode, self.tls_context = cfg.backend_tls, backend.setup.backend_tls_context
        self.wire = None
        self.reply_timeout = self.proxy_timeout = cfg.proxy_timeout
        self.data_timeout = cfg.data_timeout
        super().__init__(timeout=cfg.proxy_timeout, local_hostname=cfg.server_name)   # no getfqdn() each time
        self._host = backend.host       # the name TLS verifies; only smtplib's __init__ sets it
        self.greeting = None            # (code, text) of the back-end's greeting
        self.tls_version = None         # of TLS towards the back-end, once it is up
        self.xclient = False            # XCLIENT was accepted on this connection
        self.size = 0                   # the SIZE its last EHLO gave (0: none)
        self.proxy = cfg.backend_proxy_protocol if cfg.backend_proxy_protocol != "off" else None
        self.proxy_header = b""         # sent first, once connected (--backend-proxy-protocol)
        self.proxy_taken = False        # the back-end answered EHLO after it
        # Commands sent ahead in one write (RFC 2920), oldest first, whose replies
        # are still to be taken: each the (verb, args) a later command() must match.
        self.ahead = collections.deque()
        self.answers = collections.deque()      # their replies, once read (read_ahead)

    def handshake(self, client, credentials=None, login=None):
        """Connect (a PROXY header first, with --backend-proxy-protocol) and greet,
        STARTTLS (--backend-tls starttls), XCLIENT and AUTH (credentials) -> self;
        raises BackendDown (untrusted: BackendUntrusted) or LocalFailure, the
        connection closed (after QUIT where the back-end is still in step)."""
        cfg = self.backend.setup.cfg
        # Until XCLIENT names the client, the relay is the client and says its own name
        # (nginx); a connection whose PROXY header named the client is the client's.
        helo = client.helo or cfg.server_name if self.proxy and client.ip else cfg.server_name
        self.local_hostname = helo
        if self.proxy:
            self.proxy_header = proxy_header(self.proxy, client)
        try:
            self.greeting = code, text = self.connect(self.backend.host, self.backend.port)
            if code != 220:
                raise BackendDown(f"greeted with {code} {printable(text)}")
            self.greet(helo)
            self.proxy_taken = bool(self.proxy)
            if self.tls_mode == "starttls":
                self.start_tls(helo)
            if cfg.xclient:
                self.send_xclient(client, login)
            elif self.proxy and client.ip is None:
                raise BackendUntrusted("a client with no IP address cannot go in a PROXY header, and "
                                       "--no-xclient sends no XCLIENT")
            if credentials:
                self.authenticate(*credentials)
            return self
        except (OSError, UnicodeError) as e:      # smtplib.SMTPException is an OSError
            self.close()
            if getattr(e, "errno", None) in LOCAL_ERRNOS:
                raise LocalFailure(e.strerror) from None
            raise BackendDown(self.proxy_refused(printable(str(e)) or type(e).__name__)) from None
        except MemoryError:
            self.close()
            raise LocalFailure("out of memory") from None
        except BackendDown as e:
            self.close(quit=True)       # it answered each command so far: a QUIT ends its side cleanly
            if isinstance(e, BackendUntrusted):
                raise
            raise BackendDown(self.proxy_refused(str(e))) from None

    def proxy_refused(self, reason):
        """Why the handshake failed, where it failed before the back-end answered EHLO after a PROXY header."""
        if not self.proxy or self.proxy_taken or not self.greeting:
            return reason
        return f"did not take the PROXY {self.proxy} header (Postfix: smtpd_upstream_proxy_protocol = haproxy): {reason}"

    def _get_socket(self, host, port, timeout):
        """smtplib's connect (bounded by --proxy-timeout), then the connection's Wire, a PROXY
        header first where one is due; implicit TLS (--backend-tls on) as smtplib.SMTP_SSL."""
        sock = super()._get_socket(host, port, timeout)
        self.wire = Wire(sock, first_read=self.proxy_timeout)
        if self.proxy_header:
            self.wire.send(self.proxy_header, time.monotonic() + self.timeout)
        if self.tls_mode == "on":
            self.wire.start_tls(self.tls_context, time.monotonic() + self.timeout, server_hostname=host)
            self.tls_version = self.wire.sock.version()
        return self.wire.sock

    def start_tls(self, helo):
        """STARTTLS to the back-end; one that does not offer it is down, never used in clear."""
        if not self.has_extn("starttls"):
            raise BackendDown("offers no STARTTLS, and --backend-tls starttls requires it")
        code, text = self.docmd("STARTTLS")
        if code != 220:
            raise BackendDown(f"refused STARTTLS with {code} {printable(text)}")
        self.wire.start_tls(self.tls_context, time.monotonic() + self.timeout, server_hostname=self._host)
        self.sock = self.wire.sock
        self.tls_version = self.sock.version()
        # As smtplib.starttls(): nothing the server said in clear counts (RFC 3207 §4.2).
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features, self.does_esmtp = {}, False
        self.greet(helo)

    def greet(self, helo):
        """EHLO, or HELO where EHLO is refused (never after a PROXY header: a back-end
        that reads one speaks ESMTP); neither: BackendDown."""
        code, text = self.ehlo(helo)
        if code != 250:
            if self.proxy:
                raise BackendDown(f"refused EHLO with {code} {printable(text)}")
            code, text = self.helo(helo)
            if code != 250:
                raise BackendDown(f"refused HELO with {code} {printable(text)}")
        size = self.esmtp_features.get("size", "").strip()
        self.size = int(size) if size.isdigit() else 0

    def authenticate(self, user, password):
        """AUTH towards the back-end: PLAIN, or LOGIN where only that is offered (Exchange)."""
        offered = self.esmtp_features.get("auth", "").upper().split()
        mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN" if "LOGIN" in offered else None
        if mechanism is None:
            raise BackendDown("offers no AUTH PLAIN or LOGIN for --backend-auth")
        self.user, self.password = user, password
        self.authenticating = True
        try:
            self.auth(mechanism, getattr(self, "auth_" + mechanism.lower()), initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as e:
            raise BackendDown(f"refused AUTH {mechanism} as {user}: {e.smtp_code} {printable(e.smtp_error)}") from None
        except UnicodeEncodeError:
            raise BackendDown("smtplib can only send ASCII credentials") from None
        finally:
            self.authenticating = False
        event("backend_authenticated", session=self.sid, backend=self.name, user=printable(user))

    def send_xclient(self, client, login):
        """Postfix XCLIENT_README: the client's attributes the back-end asked for.

        Required, with ADDR, unless a PROXY header named the client: a back-end
        that does not take it would judge the relay's own address (which its
        mynetworks may trust), so it counts as down. After a PROXY header it is
        sent where offered, and a refusal leaves the header's address standing.
        """
        named = self.proxy and client.ip is not None        # the PROXY header gave the address
        wanted = self.esmtp_features.get("xclient", "").upper().split()
        if not named and "xclient" not in self.esmtp_features:
            raise BackendUntrusted("does not offer XCLIENT to this relay" +
                                   (": a client with no IP address cannot go in a PROXY header" if self.proxy else ""))
        if not named and "ADDR" not in wanted:
            # smtp-sink offers "XCLIENT NAME HELO": the back-end would still judge the relay's address.
            raise BackendUntrusted(f"offers XCLIENT without ADDR ({' '.join(wanted) or 'no attributes'})")
        if not wanted:
            return
        code, text = self.docmd("XCLIENT", xclient_arguments(client, wanted, login))
        if code not in (220, 250):      # Postfix greets anew with 220; some answer 250
            if named:
                return
            raise BackendUntrusted(f"refused XCLIENT with {code} {printable(text.decode('utf-8', 'replace'))}")
        self.xclient = True
        self.greet(client.helo or self.local_hostname)      # XCLIENT starts a new session on the back-end

    def describe(self):
        """For the log: " (TLS TLSv1.3, XCLIENT)", " (no TLS, PROXY v2, no XCLIENT)"."""
        return f" ({f'TLS {self.tls_version}' if self.tls_version else 'no TLS'}, " \
               f"{f'PROXY {self.proxy}, ' if self.proxy else ''}{'XCLIENT' if self.xclient else 'no XCLIENT'})"

    def in_step(self):
        """Raise UnaskedReply where the back-end has said anything since its last reply was read."""
        if self.wire.pending():
            reply = self.unasked_reply()
            self.close()
            raise UnaskedReply(reply)

    def unasked_reply(self):
        """What the back-end said unasked -> (421, text) where that is all it said (RFC 5321
        §3.8: it is closing the connection), else None."""
        with contextlib.suppress(OSError):
            if not self.wire.buffered:
                self.wire.fill(time.monotonic() + self.timeout)     # readable: no wait
        said = self.wire.take(REPLY_BYTES_LIMIT)
        if not UNASKED_CLOSING.fullmatch(said):
            return None
        return 421, "\n".join(line[4:].strip() for line in said.decode("utf-8", "replace").splitlines())

    def send(self, s):
        """smtplib's: every command goes out here, only while the back-end is silent."""
        if not self.sock:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        self.in_step()
        try:
            self.wire.send(s.encode(self.command_encoding) if isinstance(s, str) else s,
                           time.monotonic() + self.timeout)
        except OSError:
            self.close()
            raise smtplib.SMTPServerDisconnected("Server not connected") from None

    def putcmd(self, cmd, args=""):
        """Overridden to log the dialogue at debug level: each command, AUTH and its answers masked."""
        if self.debug:
            shown = f"{cmd} {args}".strip()
            if cmd.upper() == "AUTH":          # never log secrets
                shown = "AUTH ****"
            elif self.authenticating:
                shown = "****"
            event("backend_command", session=self.sid, line=printable(shown))
        super().putcmd(cmd, args)

    def getreply(self):
        """One whole reply -> (code, text lines joined by LF), as smtplib's, but
        by a deadline for the whole reply (reply_timeout) and bounded in
        lines and bytes: a back-end that trickles or floods is broken."""
        deadline = time.monotonic() + self.reply_timeout
        first = self.reply_timeout == self.wire.first_read     # the first read may take the socket's own timeout
        lines, size, code = [], 0, None
        try:
            while True:
                try:
                    line = self.wire.read_line(REPLY_LINE_LIMIT, deadline, first)
                except LineTooLong:
                    raise smtplib.SMTPServerDisconnected("reply line too long") from None
                except TimeoutError:
                    raise TimeoutError(f"no whole reply within {self.reply_timeout:g}s") from None
                if not line:
                    raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
                first = False
                size += len(line)
                if len(lines) >= REPLY_LINES_LIMIT or size > REPLY_BYTES_LIMIT:
                    raise smtplib.SMTPServerDisconnected(
                        f"reply over {REPLY_LINES_LIMIT} lines or {REPLY_BYTES_LIMIT} bytes")
                if line[3:4] not in (b" ", b"-", b"\r", b"\n", b""):    # RFC 5321 §4.2: the code, then SP or "-"
                    raise smtplib.SMTPServerDisconnected(f"malformed reply line {printable(line[:8])!r}")
                if lines and line[:3] != code:      # RFC 5321 §4.2.1: one code for every line of a reply
                    raise smtplib.SMTPServerDisconnected(f"a reply of {printable(code)} went on with {printable(line[:3])}")
                code = line[:3]
                lines.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    break
        except (OSError, smtplib.SMTPException):
            self.close()
            raise
        code = int(line[:3]) if line[:3].isdigit() else -1
        text = b"\n".join(lines)
        if self.debug:
            for part in lines:
                event("backend_reply", session=self.sid, code=code, line=printable(part))
        return code, text

    # The interface the session uses.
    def checked(self, what, exchange):
        """Run one exchange -> (code, text); a broken connection or nonsense reply:
        BackendGone, with the reply where the back-end said 421 (it is closing)."""
        try:
            code, text = exchange()
        except (OSError, smtplib.SMTPException) as e:
            self.close()
            raise BackendGone(f"at {what}: {printable(str(e))}", getattr(e, "reply", None)) from None
        if not 200 <= code <= 599:
            self.close()
            raise BackendGone(f"bad reply to {what}: {code} {printable(text)}")
        # RFC 5321 §4.3.2: DATA alone is answered 354 (or refused), nothing else 3xx. A reply
        # that breaks this answers another command: the back-end is out of step.
        if (code == 354 or code >= 400) if what == "DATA" else not 300 <= code < 400:
            text = text.decode("utf-8", "surrogateescape")
        else:
            self.close()
            raise OutOfStep(f"out of step: said {code} {printable(text)} to {what}")
        if code == 421:     # RFC 5321 §3.8: it is closing the connection
            self.close()
            raise BackendGone(f"closing, said {code} {printable(text)} to {what}", (code, text))
        return code, text

    def command(self, verb, args=""):
        """One command -> the back-end's (code, text); raises BackendGone as checked() does.
        Where it went ahead with others, its reply is the one read for it (next_answer)."""
        if self.ahead:
            if self.ahead[0] == (verb, args):
                return self.next_answer()
            self.drain_ahead()
        return self.checked(verb, lambda: self.docmd(verb, args))

    @property
    def pipelining(self):
        """Commands may go ahead now: the back-end offers PIPELINING, and no reply is due."""
        return not self.ahead and self.has_extn("pipelining")

    def send_ahead(self, commands):
        """RFC 2920: commands [(verb, args)] in one write, their replies left to read
        (read_ahead), each taken when command() is called for it."""
        if self.debug:
            for verb, args in commands:
                event("backend_command", session=self.sid, line=printable(f"{verb} {args}".strip()))
        lines = "".join(f"{verb} {args}\r\n" if args else f"{verb}\r\n" for verb, args in commands)

        def write():
            """One write; no reply is read here (checked() only makes a failure BackendGone)."""
            self.send(lines.encode(self.command_encoding))
            return 250, b""
        self.checked(commands[0][0], write)
        self.ahead.extend(commands)

    def read_ahead(self):
        """Read the replies to every command sent ahead, together, when the first is wanted
        (the client pipelined them all and waits for all), into answers: so none is passed
        on before every one was seen in step, one to each command and nothing more. Where
        they were not, every command of the group fails; where the connection broke (or
        said 421), the commands from there on fail, each in its turn, as one by one."""
        try:
            for verb, _ in self.ahead:
                try:
                    self.answers.append(self.checked(verb, self.getreply))
                except OutOfStep:
                    raise
                except BackendGone as e:
                    self.answers.extend([e] * (len(self.ahead) - len(self.answers)))
                    return
            self.in_step()
        except (OutOfStep, UnaskedReply) as e:
            self.answers = collections.deque([BackendGone(f"pipelined replies out of step: {e}")] * len(self.ahead))

    def next_answer(self):
        """The reply to the oldest command sent ahead (every one read at the first asked);
        raises the BackendGone that stands in its place."""
        if not self.answers:
            self.read_ahead()
        self.ahead.popleft()
        answer = self.answers.popleft()
        if isinstance(answer, BackendGone):
            raise answer
        return answer

    def drain_ahead(self):
        """Drop the replies to commands sent ahead that the session did not make after
        all (an earlier reply refused what they built on). A 354 among them leaves the
        back-end waiting for a message that will not come: BackendGone."""
        while self.ahead:
            if self.next_answer()[0] == 354:
                self.close()
                raise BackendGone("said 354 to a DATA sent ahead, where no recipient was accepted")

    def mail(self, address, params):
        """MAIL FROM, rebuilt from the parsed address and parameters -> the reply (mail_command)."""
        command = self.mail_command(address, params)
        return self.command(*command) if isinstance(command[0], str) else command

    def mail_command(self, address, params):
        """The MAIL FROM this back-end gets -> ("MAIL", args): SIZE and BODY go only where it offers
        them; SMTPUTF8 or BODY=8BITMIME (RFC 6152 §3) it lacks is our 555 reply instead."""
        if "SMTPUTF8" in params and not self.has_extn("smtputf8"):
            return NOT_SUPPORTED_BEHIND.fill(status="5.6.7", extension="SMTPUTF8")
        if params.get("BODY") == "8BITMIME" and not self.has_extn("8bitmime"):
            # RFC 6152 §3: 8-bit data must not go to a server without 8BITMIME.
            return NOT_SUPPORTED_BEHIND.fill(status="5.6.3", extension="8BITMIME")
        self.command_encoding = "utf-8" if "SMTPUTF8" in params else "ascii"
        args = [f"FROM:<{address}>"]
        if "SIZE" in params and self.has_extn("size"):
            args.append(f"SIZE={params['SIZE']}")
        if "BODY" in params and self.has_extn("8bitmime"):
            args.append(f"BODY={params['BODY']}")     # BODY=7BIT means nothing to a server without it
        if "SMTPUTF8" in params:
            args.append("SMTPUTF8")
        return "MAIL", " ".join(args)

    def rcpt(self, address):
        """RCPT TO, rebuilt from the parsed address -> the back-end's reply."""
        return self.command(*self.rcpt_command(address))

    @staticmethod
    def rcpt_command(address):
        """The RCPT TO a back-end gets -> ("RCPT", args)."""
        return "RCPT", f"TO:<{address}>"

    def data_start(self):
        """DATA -> the back-end's reply (354 to go on)."""
        return self.command("DATA")

    def data_write(self, segment):
        """Pass a segment of message data on as it is, within --proxy-timeout; BackendGone where that fails."""
        if not self.sock:
            raise BackendGone("connection closed")
        try:
            self.wire.send(segment, time.monotonic() + self.timeout)
        except OSError as e:
            self.close()
            raise BackendGone(f"write failed: {e}") from None

    def data_end(self, tail=b""):
        """The last of the message and its end (CRLF.CRLF, the client's) -> the reply.
        A back-end that spoke during the data is out of step: the end is not sent."""
        try:
            self.in_step()
        except UnaskedReply as e:
            raise BackendGone(f"before the end of data: {e}", e.reply) from None
        self.data_write(tail + b".\r\n")
        # RFC 5321 §4.5.3.2.6: the reply to the end of data may take 10
        # minutes (content filters); giving up sooner turns a message the
        # back-end accepted into a 4xx, and the client's retry into a copy.
        self.reply_timeout = self.data_timeout
        try:
            return self.checked("end of data", self.getreply)
        finally:
            self.reply_timeout = self.proxy_timeout

    def rset(self):
        """RSET -> the back-end's reply."""
        return self.command("RSET")

    def quiet(self):
        """Open and silent: a pooled connection the back-end has closed, or said
        421 on, is readable."""
        return bool(self.sock) and not self.ahead and not self.wire.pending()

    def release(self):
        """The session is done with it, between transactions: back to the pool, or QUIT."""
        if self.pool_key and self.sock and not self.ahead:
            self.reused = True
            self.backend.setup.pool.give(self.pool_key, self)
        else:
            self.close(quit=True)

    def close(self, quit=False):
        """Close the connection; with quit, QUIT first where it is still open (its failure ignored)."""
        if quit and self.sock:
            with contextlib.suppress(OSError, smtplib.SMTPException, BackendGone):
                self.drain_ahead()      # a DATA sent ahead that said 354: no QUIT into its message
                self.quit()
        super().close()


class MaildirBackend(Backend):
    """The built-in back-end: each message becomes one file in a Maildir (an absolute path).

    For testing and for running with no mail server: the file is written
    to tmp/, fsynced and renamed into new/ before the client hears 250.
    """

    # The host part of Maildir file names, with / and : escaped as Maildir asks.
    hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def create(self, owner=None):
        """Make the Maildir (cur/, new/, tmp/) if it is missing, owned by `owner`
        (--user's pwd entry) so that it can deliver after the drop; raises OSError."""
        # Not mailbox.Maildir(create=True): two relays started at once (inetd) race to make it.
        for directory in (self.path, *(os.path.join(self.path, sub) for sub in ("cur", "new", "tmp"))):
            os.makedirs(directory, 0o700, exist_ok=True)
            if owner and os.geteuid() == 0:
                os.chown(directory, owner.pw_uid, owner.pw_gid)

    def open(self, client, credentials=None, login=None):
        """One session's deliveries."""
        return MaildirDelivery(self, client)


HEADER_FOLD = 78           # RFC 5322 §2.1.1: lines SHOULD stay within 78 characters, MUST within 998


def folded(name, items):
    """A header field "name: item, item, ..." folded between items (RFC 5322 §2.2.3), each
    line within HEADER_FOLD where an item allows; items are at most PATH_LIMIT long."""
    lines, line = [], f"{name}:"
    for n, item in enumerate(items):
        word = item + ("," if n < len(items) - 1 else "")
        if len(line) + 1 + len(word) > HEADER_FOLD and line.strip(" ") != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + word
    return "\n".join(lines + [line])


def timestamp():
    """Now, as RFC 5322 §3.3 writes a date."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")


def maildir_failure(error):
    """The 451 for a Maildir that cannot be written."""
    return CANNOT_STORE.fill(what="write to the Maildir", reason=error.strerror)


class LocalDelivery:
    """What the built-in back-ends share: the envelope kept here, every
    sender and recipient accepted, the message streamed into self.file
    unstuffed, and nothing kept once the transaction is aborted."""

    counter = itertools.count()     # message numbers, unique in the process
    reused = xclient = False
    tls_version = None
    size = 0                        # no limit of its own
    file = None
    pipelining = False              # no round trips to save

    def __init__(self, backend, client):
        """backend: the built-in back-end it delivers for; client: the session's Client."""
        self.name, self.backend, self.client = str(backend), backend, client
        self.cfg = backend.setup.cfg

    def mail(self, address, params):
        """A new transaction: the sender kept, no recipients yet -> 250 2.1.0."""
        self.sender, self.recipients, self.utf8 = address, [], "SMTPUTF8" in params
        return SENDER_OK

    def rcpt(self, address):
        """One recipient more; every one is accepted -> 250 2.1.5."""
        self.recipients.append(address)
        return RECIPIENT_OK

    def rset(self):
        """Drop what is stored of the message -> 250."""
        self.abort()
        return OK

    def close(self, quit=False):
        """The session is done: what is stored of an unfinished message goes; quit means nothing here."""
        self.abort()

    release = close     # local deliveries have no pool

    def describe(self):
        """For the log: nothing, as there is no connection to describe."""
        return ""

    def abort(self):
        """The message is not accepted: what was stored of it goes."""
        if self.file:
            self.file.close()
            self.file = None


def received_protocol(client, utf8):
    """The "with" of a Received: line: SMTP, or ESMTP with S for TLS and A for a login
    (RFC 3848), UTF8SMTP for a message sent with SMTPUTF8 (RFC 6531 §3.7.3)."""
    if not client.esmtp:
        return "SMTP"
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if client.tls else "") + ("A" if client.user else "")


class MaildirDelivery(LocalDelivery):
    """One session's deliveries into a Maildir, streamed to disk."""

    def data_start(self):
        """Open the message's file in tmp/ and write the header the relay adds (Return-Path,
        X-Envelope-To, Received) -> 354, or 451 where the disk refuses."""
        now = time.time()
        self.filename = (f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self.counter)}"
                         f"R{secrets.token_hex(4)}.{self.backend.hostname}")
        self.tmp_path = os.path.join(self.backend.path, "tmp", self.filename)
        try:
            self.file = open(self.tmp_path, "xb")
        except OSError as e:
            return maildir_failure(e)
        c = self.client
        header = [f"Return-Path: <{printable(self.sender)}>",
                  folded("X-Envelope-To", [f"<{printable(r)}>" for r in self.recipients]),
                  f"Received: from {printable(c.helo or 'unknown')} "
                  f"({f'[{c.ip}]' if c.ip else 'no IP address'})\n"
                  f"\tby {self.cfg.server_name} (smtprelay) with {received_protocol(c, self.utf8)}"
                  f" id {self.filename}; {timestamp()}", ""]
        self.at_line_start = self.at_message_start = True
        return self.write("\n".join(header).encode("utf-8")) or START_DATA

    def data_write(self, segment):
        """Store a segment; BackendGone where the disk refuses it."""
        # Unstuffed, with LF line ends, as local delivery stores mail.
        text = unstuff(segment, self.at_line_start)
        self.at_line_start = segment.endswith(b"\r\n")
        if self.at_message_start and text:
            self.at_message_start = False
            if text.startswith((b" ", b"\t")):
                # No header line to continue: it would fold into our Received:. As
                # Postfix's cleanup, the message has no header section then, only a body.
                text = b"\n" + text
        error = self.write(text.replace(b"\r\n", b"\n"))
        if error:
            raise BackendGone(error[1])

    def write(self, data):
        """Store data -> None, or the 451 where the disk refuses it."""
        try:
            self.file.write(data)
        except OSError as e:
            self.abort()
            return maildir_failure(e)

    def data_end(self, tail=b""):
        """Store the tail, fsync the file and rename it into new/ (the directory fsynced too) -> 250
        queued as its name, or 451 where the disk refuses."""
        if tail:
            self.data_write(tail)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            os.rename(self.tmp_path, os.path.join(self.backend.path, "new", self.filename))
            directory = os.open(os.path.join(self.backend.path, "new"), os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            self.abort()
            return maildir_failure(e)
        return QUEUED.fill(id=self.filename)

    def abort(self):
        """As LocalDelivery's, and the file in tmp/ is removed."""
        if self.file:
            super().abort()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)


class StdoutBackend(Backend):
    """The built-in back-end for ad-hoc tests (Python's old smtpd.DebuggingServer):
    each accepted message printed to standard output, whole, after its envelope.

    A message is spooled to an unlinked temporary file while it arrives and
    printed under one lock at the end of data, so messages never interleave,
    a client that stalls mid-message holds up nobody, a message of any size
    passes in bounded memory, and one that is abandoned never appears. The
    print keeps to --data-timeout, waiting for the lock included: standard
    output that nobody reads makes a 451, never a session without reply.
    """

    lock = threading.Lock()     # one message at a time on standard output
    wire = None                 # standard output, made at the first message
    cut = False                 # a message was cut short: its frame never ended

    def open(self, client, credentials=None, login=None):
        """One session's messages."""
        return StdoutDelivery(self, client)


STDOUT_START = b"---------- MESSAGE FOLLOWS ----------\n"
STDOUT_END = b"------------ END MESSAGE ------------\n"
STDOUT_CUT = b"\n------------ MESSAGE CUT SHORT: not accepted ------------\n"
# A body line that begins as a frame line gets one more ">" (as mbox quotes
# "From "), so no message can end its frame or start another one.
FRAME_LINE = re.compile(rb"^>*(?:---------- MESSAGE FOLLOWS|------------ (?:END MESSAGE|MESSAGE CUT))", re.MULTILINE)


def quote_frame_lines(text, at_line_start):
    """text with each line that would pass for a frame line quoted by one more ">"."""
    quoted = FRAME_LINE.sub(rb">\g<0>", text)
    if not at_line_start and FRAME_LINE.match(text):
        quoted = quoted[1:]         # it goes on a line already begun: no frame line
    return quoted


class StdoutDelivery(LocalDelivery):
    """One session's messages, each spooled, then printed at its end of data."""

    def data_start(self):
        """Open the spool, an unlinked temporary file -> 354, or 451 where none can be made."""
        try:
            self.file = tempfile.TemporaryFile(prefix="smtprelay-")
        except OSError as e:
            return CANNOT_STORE.fill(what="spool the message", reason=e.strerror)
        self.at_line_start = True
        return START_DATA

    def data_write(self, segment):
        """Spool a segment; BackendGone where the spool refuses it."""
        # As the client sent it, less the dot-stuffing: byte for byte, but
        # for a line that would pass for a frame line.
        text = quote_frame_lines(unstuff(segment, self.at_line_start), self.at_line_start)
        self.at_line_start = segment.endswith(b"\r\n")
        try:
            self.file.write(text)
        except OSError as e:
            self.abort()
            raise BackendGone(f"cannot spool the message: {e.strerror}") from None

    def data_end(self, tail=b""):
        """Print the message after its envelope between frame lines, under the lock and within
        --data-timeout -> 250 printed as its id, or 451 where standard output does not take it (in time)."""
        if tail:
            self.data_write(tail)
        c, message_id, seconds = self.client, f"{self.client.sid}.{next(self.counter)}", self.cfg.data_timeout
        envelope = [f"X-Smtprelay-Id: {message_id}",
                    f"X-Envelope-From: <{printable(self.sender)}>",
                    folded("X-Envelope-To", [f"<{printable(r)}>" for r in self.recipients]),
                    f"X-Peer: {c} HELO {printable(c.helo or 'unknown')}",
                    f"X-Received-At: {timestamp()}", "", ""]
        deadline = time.monotonic() + seconds
        backend = StdoutBackend      # one standard output, whatever the reloads
        try:
            self.file.seek(0)
            if not backend.lock.acquire(timeout=seconds):
                return STDOUT_NOT_READ
            try:
                if backend.wire is None:
                    backend.wire = Wire(writer=sys.stdout.fileno())
                out = backend.wire
                if backend.cut:
                    out.send(STDOUT_CUT, deadline)
                backend.cut = True          # until the frame's end is out
                out.send(STDOUT_START + "\n".join(envelope).encode("utf-8"), deadline)
                while chunk := self.file.read(RECV_SIZE):
                    out.send(chunk, deadline)
                out.send(STDOUT_END, deadline)
                backend.cut = False
            finally:
                backend.lock.release()
        except TimeoutError:
            event("stdout_stalled", session=c.sid, seconds=seconds)
            return STDOUT_NOT_READ
        except (OSError, ValueError) as e:      # ValueError: standard output closed
            return CANNOT_STORE.fill(what="print the message", reason=getattr(e, "strerror", None) or e)
        finally:
            self.abort()
        return PRINTED.fill(id=message_id)


# --- 5. The auth lookup: nginx's auth_http protocol ----------------------------
# One GET per lookup with the headers nginx sends (ngx_mail_auth_http_module); the
# answer's Auth-Status decides, Auth-Server and Auth-Port name the back-end.
# requests keeps connections alive: a pool of requests.Sessions, each used by
# one thread at a time, serves every client session (nginx opens a new
# connection per lookup).

CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")          # C0, DEL and C1: never in a header
HEADER_ESCAPED = re.compile(r"[\x00-\x20%\x7f-\x9f]")
AUTH_BODY_READ = 4096     # bytes of an answer's body read to keep its connection; a longer one is dropped
AUTH_WAIT_ROUNDS = 10       # Auth-Status: WAIT is asked again at most this often
AUTH_WAIT_MAX = 3600        # seconds; a longer Auth-Wait would outlast any client


class AuthServiceError(RelayError):
    """The auth service failed: down, timed out, or an answer that makes no sense."""


@dataclasses.dataclass(frozen=True)
class AuthAnswer:
    """What the auth service said: ok, and the back-end's (host, port) (+ user,
    password), or a refusal's text, Auth-Wait and Auth-Error-Code."""

    ok: bool
    server: tuple = None
    user: str = None
    password: str = None
    text: str = ""
    wait: int = 0
    error_code: tuple = None

    @property
    def backend(self):
        """The back-end named, as the log writes it; None for a refusal."""
        return format_address(*self.server) if self.server else None


def escape_auth_value(text):
    """nginx's escaping of Auth-User and Auth-Pass: control characters (C0, DEL and C1),
    space and % as %XX of their UTF-8 bytes."""
    return HEADER_ESCAPED.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), text).encode("utf-8")


def header_value(text):
    """A client-supplied value made safe for an HTTP header: no control characters at all, C1 included."""
    return CONTROLS.sub("", text).encode("utf-8")


RDN_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST", "streetAddress": "STREET",
             "domainComponent": "DC", "userId": "UID"}


def rfc2253(name):
    """A certificate name as ssl gives it -> RFC 2253 text, most specific part first (as nginx)."""
    def escape(value):
        """An attribute value with RFC 2253 §2.4's special characters escaped by a backslash."""
        value = re.sub(r'([,+"\\<>;])', r"\\\1", value)
        return re.sub(r"^([ #])|( )$", r"\\\1\2", value)
    return ",".join("+".join(f"{RDN_NAMES.get(k, k)}={escape(v)}" for k, v in rdn) for rdn in reversed(name))


def auth_ssl_headers(client, verify_client):
    """nginx's Auth-SSL-* headers for client (ngx_mail_auth_http_module)."""
    if not client.tls:
        return {}
    headers = {"Auth-SSL": "on", "Auth-SSL-Protocol": client.tls[0], "Auth-SSL-Cipher": client.tls[1]}
    if verify_client != "off":
        headers["Auth-SSL-Verify"] = "SUCCESS" if client.certificate else "NONE"
        # Certificate names may hold any Unicode, even control characters.
        headers.update({k: header_value(v) for k, v in (client.certificate or {}).items()})
    return headers


def client_certificate(sock):
    """The verified client certificate's details for Auth-SSL-* headers, or None."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    cert = sock.getpeercert()
    return {"Auth-SSL-Subject": rfc2253(cert.get("subject", ())), "Auth-SSL-Issuer": rfc2253(cert.get("issuer", ())),
            "Auth-SSL-Serial": cert.get("serialNumber", "").upper(),
            "Auth-SSL-Fingerprint": hashlib.sha1(der).hexdigest()}


class Watchdog:
    """One thread that calls cut() on whatever outstays its deadline: the
    whole-answer deadline of every auth lookup, without a timer thread each."""

    def __init__(self):
        """No thread yet: the first watch() starts it."""
        self.changed = threading.Condition()
        self.heap = []              # (deadline, number, watched), the earliest first
        self.numbers = itertools.count()
        self.thread = None
        self.wake_at = None         # when the watchdog looks next; None: when told

    def watch(self, seconds, watched):
        """Call watched.cut() in seconds unless watched.done by then; the first call starts the thread."""
        deadline = time.monotonic() + seconds
        with self.changed:
            while self.heap and self.heap[0][2].done:     # lookups share one timeout: the oldest end first
                heapq.heappop(self.heap)
            heapq.heappush(self.heap, (deadline, next(self.numbers), watched))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="watchdog", daemon=True)
                self.thread.start()
            elif self.wake_at is None or deadline < self.wake_at:
                # Only then: waking it for every lookup would cost a thread
                # switch each; a later deadline waits for its next look.
                self.changed.notify()

    def run(self):
        """The watchdog thread: cut what is due, then sleep until the earliest deadline or an earlier one comes."""
        with self.changed:
            while True:
                # A deadline that was left (watched.done) is dropped when it comes up.
                while self.heap and (self.heap[0][2].done or self.heap[0][0] <= time.monotonic()):
                    watched = heapq.heappop(self.heap)[2]
                    if not watched.done:
                        watched.cut()
                self.wake_at = self.heap[0][0] if self.heap else None
                self.changed.wait(self.wake_at - time.monotonic() if self.heap else None)


class AnswerDeadline:
    """The deadline for one whole HTTP answer: requests' timeout bounds each
    read, so a service trickling a byte at a time would hold a session for
    ever. Past the deadline the connection's socket is shut down, which
    ends any read on it at once."""

    current = threading.local()     # the deadline of this thread's request, for its connection
    watchdog = Watchdog()

    def __init__(self, seconds):
        """seconds: the time for the whole answer (--auth-http-timeout), from entering the with block."""
        self.seconds = seconds
        self.sock, self.expired, self.done = None, False, False

    def __enter__(self):
        """Start the clock, and make this the deadline of this thread's request."""
        AnswerDeadline.current.deadline = self
        self.watchdog.watch(self.seconds, self)
        return self

    def __exit__(self, *exc):
        """The answer is in, or given up: the deadline is done and never cuts the connection after this."""
        with self.watchdog.changed:     # never cut once left: the connection serves the next lookup
            self.done = True
        AnswerDeadline.current.deadline = None

    def watch(self, sock):
        """The request's connection is sock: it is shut down at once where the deadline has passed already."""
        self.sock = sock
        if self.expired:
            self.cut()

    def cut(self):
        """Past the deadline (the Watchdog calls this): shut the socket down, ending any read on it."""
        self.expired = True
        with contextlib.suppress(OSError):
            if self.sock:
                self.sock.shutdown(socket.SHUT_RDWR)


def deadline_adapter():
    """A requests transport whose connections keep to AnswerDeadline."""
    import requests.adapters
    import urllib3

    class Watched:
        """A connection that hands its socket to this thread's AnswerDeadline before waiting for the answer."""
        def getresponse(self, *args, **kwargs):
            """Overridden so that the wait for the answer keeps to this thread's AnswerDeadline."""
            deadline = getattr(AnswerDeadline.current, "deadline", None)
            if deadline:
                deadline.watch(self.sock)
            return super().getresponse(*args, **kwargs)

    class HTTPPool(urllib3.HTTPConnectionPool):
        """urllib3's HTTP connection pool, with Watched connections."""
        ConnectionCls = type("HTTPConnection", (Watched, urllib3.connection.HTTPConnection), {})

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        """urllib3's HTTPS connection pool, with Watched connections."""
        ConnectionCls = type("HTTPSConnection", (Watched, urllib3.connection.HTTPSConnection), {})

    class Adapter(requests.adapters.HTTPAdapter):
        """requests' transport adapter, over the Watched pools."""
        def init_poolmanager(self, *args, **kwargs):
            """Overridden so that the pool manager makes the Watched pools."""
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    return Adapter


class AuthService:
    """The client of --auth-http: lookup() asks it about one client."""

    def __init__(self, cfg):
        """cfg: the Config (--auth-http and its options); requests is imported here, its one user."""
        global requests
        import requests
        import urllib3
        # Left to itself, urllib3 puts a User-Agent and Accept-Encoding ahead of nginx's headers.
        self.no_defaults = {"Accept-Encoding": urllib3.util.SKIP_HEADER, "User-Agent": urllib3.util.SKIP_HEADER}
        self.url, self.timeout = cfg.auth_http, cfg.auth_http_timeout
        self.extra_headers, self.verify_client = cfg.auth_http_header, cfg.tls_verify_client
        host = urllib.parse.urlsplit(self.url).hostname     # Host without the port, as nginx
        self.host = f"[{host}]" if ":" in host else host     # RFC 3986 §3.2.2: an IPv6 literal in brackets
        # requests' transport adapter, given a prepared request: what a
        # requests.Session adds per call (merging settings, cookies, hooks,
        # redirects) is half the cost of a lookup and none of it applies here.
        # No proxy or .netrc from the environment either: straight to the
        # service, as nginx. Certificates are verified (verify=True).
        self.request_template = requests.Request("GET", self.url).prepare()
        self.idle = []                  # transports (each a kept-alive connection) not in use by any thread
        self.lock = threading.Lock()
        self.transport = deadline_adapter()

    def request(self, headers):
        """One GET with headers -> the answer's headers; raises AuthServiceError."""
        with self.lock:
            transport = self.idle.pop() if self.idle else self.transport()
        request, deadline = self.request_template.copy(), AnswerDeadline(self.timeout)
        try:
            request.prepare_headers(headers)
            with deadline:
                # The headers are the answer; a body is never held (nginx reads one
                # fixed buffer). A small announced one is read, so that the kept-alive
                # connection serves the next lookup; any other drops the connection.
                response = transport.send(request, timeout=self.timeout, stream=True)
                length = response.headers.get("Content-Length", "")
                if is_number(length) and int(length) <= AUTH_BODY_READ:
                    response.content
                else:
                    response.close()
        except requests.RequestException as e:
            transport.close()
            if deadline.expired:
                raise AuthServiceError(f"timed out: no whole answer within {self.timeout:g}s") from None
            raise AuthServiceError(f"request failed: {e}") from None
        with self.lock:
            self.idle.append(transport)
        return response.headers

    def lookup(self, client, attempt, method, user="", password="", salt=None, mail=None, rcpt=None):
        """Ask about client, at its attempt-th lookup -> AuthAnswer; raises AuthServiceError."""
        headers = {**self.no_defaults, "Host": self.host, "Auth-Method": method,
                   "Auth-User": escape_auth_value(user), "Auth-Pass": escape_auth_value(password)}
        if salt:
            headers["Auth-Salt"] = salt
        headers.update({"Auth-Protocol": "smtp", "Auth-Login-Attempt": str(attempt),
                        "Client-IP": client.ip or UNAVAILABLE, "Client-Host": client.looked_up()[0]})
        if client.proxy:        # as nginx: what the PROXY header said, for scripts that read it
            headers.update(zip(("Proxy-Protocol-Addr", "Proxy-Protocol-Port", "Proxy-Protocol-Server-Addr",
                                "Proxy-Protocol-Server-Port"), map(str, client.proxy)))
        if method == "none":
            headers.update({"Auth-SMTP-Helo": header_value(client.helo or ""),
                            "Auth-SMTP-From": header_value(mail or ""), "Auth-SMTP-To": header_value(rcpt or "")})
        headers.update(auth_ssl_headers(client, self.verify_client))
        headers.update(self.extra_headers)
        for _ in range(AUTH_WAIT_ROUNDS):
            h = self.request(headers)
            if h.get("Auth-Status", "").strip() != "WAIT":
                return self.read_answer(h)
            time.sleep(min(auth_wait(h), self.timeout) or 1)    # asked again, same attempt (nginx)
        raise AuthServiceError(f"still said WAIT after {AUTH_WAIT_ROUNDS} rounds")

    @staticmethod
    def read_answer(h):
        """The response headers -> AuthAnswer; raises AuthServiceError for an unusable OK."""
        status = h.get("Auth-Status", "OK").strip()     # absent means OK (nginx)
        if status != "OK":
            code = re.fullmatch(r"([45]\d\d)(?: +(\d\.\d{1,3}\.\d{1,3}))?", h.get("Auth-Error-Code", "").strip())
            error_code = (int(code[1]), code[2] or "") if code else None
            return AuthAnswer(False, text=CONTROLS.sub("", status), wait=auth_wait(h),
                              error_code=error_code)
        host, port = h.get("Auth-Server", "").strip().strip("[]"), h.get("Auth-Port", "").strip()
        if not host or not port:
            raise AuthServiceError("did not send server or port")
        if not is_number(port) or not 0 < int(port) < 65536:
            raise AuthServiceError(f"sent a bad Auth-Port {port!r}")
        if not is_host(host):
            raise AuthServiceError(f"sent a bad Auth-Server {host!r}")
        return AuthAnswer(True, (host, int(port)),     # a host name is resolved at connect
                          user=h.get("Auth-User") or None, password=h.get("Auth-Pass") or None)


def auth_wait(h):
    """Auth-Wait in whole seconds, at most AUTH_WAIT_MAX; 0 when absent or not a number."""
    wait = h.get("Auth-Wait", "").strip()
    return min(int(wait), AUTH_WAIT_MAX) if is_number(wait) else 0


# --- 6. Server and lifecycle: setup, connections, listeners, signals --------
# A Setup is what one configuration builds (TLS contexts, the auth service's
# client, the back-ends); SIGHUP builds a new one and new sessions take it.
# One Relay holds what outlives a reload: the session counts and admission,
# the stop, the names resolver, the balancer. Every client connection,
# whoever accepted it (a listener thread, --inetd, a socket systemd passed
# on), goes through serve_connection(): PROXY header, admission, session,
# release. The main thread waits for signals.

REFUSAL_TIMEOUT = 1          # seconds to hand a refused client its 421
REFUSING = 64                # connections beyond --max-clients given a thread, to be told 421
ACCEPT_PAUSE = 0.1           # seconds the listener rests when out of descriptors
SPARE_THREADS = 32           # threads kept, once their connection is done, for the next ones
SPARE_SECONDS = 60           # how long a kept thread waits for a connection before it ends
# Settings a running relay cannot take up on SIGHUP: the sockets and the
# process are made once (Config attribute, option name).
RESTART_SETTINGS = [("listen", "listen"), ("tls_listen", "tls-listen"), ("user", "user"), ("inetd", "inetd"),
                    ("metrics", "metrics"), ("proxy_protocol", "proxy-protocol"), ("log_target", "log-target"),
                    ("workers", "workers")]


class Setup:
    """What one configuration builds for the sessions that start under it: TLS
    contexts, the auth service's client, the back-ends and their idle
    connections; raises ConfigError naming the option (a bad certificate, say)."""

    def __init__(self, cfg):
        """cfg: the validated Config; everything is built here but the Maildirs (create_backends())."""
        self.cfg = cfg
        self.tls_context = (make_server_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, cfg.tls_verify_client)
                            if cfg.tls_cert else None)
        self.backend_tls_context = (make_backend_tls(cfg.backend_tls_ca, cfg.backend_tls_verify)
                                    if cfg.backend_tls != "off" else None)
        self.auth_service = AuthService(cfg) if cfg.auth_http else None
        self.pool = BackendPool()       # idle back-end connections (--no-xclient)
        kinds = {"smtp": SMTPBackend, "maildir": MaildirBackend, "stdout": StdoutBackend}
        self.backends = [kinds[spec.kind](self, spec) for spec in cfg.backend]
        # Names are looked up only where someone will read them.
        self.needs_names = cfg.resolve == "on" and bool(
            cfg.auth_http or cfg.xclient and any(spec.kind == "smtp" for spec in cfg.backend))

    def route_backend(self, answer):
        """The back-end an auth service's answer names."""
        return SMTPBackend(self, BackendSpec("smtp", *answer.server))

    def create_backends(self, owner=None):
        """Make the Maildirs, owned by --user's entry `owner` if given; raises ConfigError."""
        for backend in self.backends:
            try:
                backend.create(owner)
            except OSError as e:
                raise ConfigError("--backend", f"{backend}: {e.strerror or e}") from None


class SessionCounts:
    """The sessions admitted, all and per address, for --max-clients and --max-clients-per-ip."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sessions = 0
        self.per_ip = collections.Counter()

    def admit(self, ip, most, most_per_ip):
        """Count a session from ip in -> None, or the reply that refuses it."""
        with self.lock:
            if self.sessions >= most:
                return TOO_MANY_CONNECTIONS
            if most_per_ip and self.per_ip[ip] >= most_per_ip:
                return TOO_MANY_FROM_ADDRESS
            self.sessions += 1
            self.per_ip[ip] += 1
        return None

    def release(self, ip):
        """A session admitted for ip has ended."""
        with self.lock:
            self.sessions -= 1
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]


class SharedCounts:
    """SessionCounts across --workers: every worker's sessions in memory shared
    by all, made before the fork. A worker writes its own slot alone (its count,
    and the address of each of its sessions); an admission reads every slot
    under fcntl's lock, which the kernel drops when its holder dies, and the
    main process clears the slot of a worker that died before a new one takes
    it: a crash leaves nothing counted for long."""

    RECORD = 17         # a session: 1, then its address (address_key); a free record is all zeros

    def __init__(self, workers, capacity):
        """workers: the slots; capacity: the sessions one worker may hold (--max-clients at start)."""
        self.workers, self.capacity = workers, capacity
        self.base = workers * 8             # the records start after a count and a high-water mark per worker
        try:
            self.memory = mmap.mmap(-1, self.base + workers * capacity * self.RECORD)      # MAP_SHARED
        except OSError as e:
            raise ConfigError("--max-clients", f"{capacity} for each of {workers} workers: {e.strerror}") from None
        self.counts = memoryview(self.memory)[:workers * 4].cast("I")
        self.used = memoryview(self.memory)[workers * 4:self.base].cast("I")     # records a worker ever used
        # fcntl locks a file: one in memory, where the system has them (no writable /tmp needed).
        self.lockfile = os.fdopen(os.memfd_create("smtprelay-counts"), "r+b", buffering=0) \
            if hasattr(os, "memfd_create") else tempfile.TemporaryFile()
        self.thread_lock = threading.Lock()     # fcntl's lock is the process's: its threads take turns here
        self.free, self.held, self.slot = [], {}, None

    def enter(self, slot):
        """In the worker of that slot, after the fork: its records are its own."""
        self.slot = slot
        first = slot * self.capacity
        self.free = list(range(first, first + self.capacity))     # a heap: the lowest first
        self.held = collections.defaultdict(list)      # address -> the records of its sessions here

    @contextlib.contextmanager
    def locked(self):
        """Every worker's slot still while held."""
        with self.thread_lock:
            fcntl.lockf(self.lockfile, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.lockfile, fcntl.LOCK_UN)

    @property
    def sessions(self):
        """Every worker's sessions."""
        return sum(self.counts)

    @staticmethod
    def record(ip):
        """What a session from ip is recorded as: 1, then its address."""
        return b"\1" + address_key(ip)

    def sessions_from(self, ip):
        """The sessions of every worker from ip: the records that hold its record(), each read from where
        a record starts; of each worker's records only those it ever used (its most sessions at once)."""
        key, found = self.record(ip), 0
        for slot in range(self.workers):
            start = self.base + slot * self.capacity * self.RECORD
            end = start + self.used[slot] * self.RECORD
            at = self.memory.find(key, start, end)
            while at >= 0:
                aligned = (at - start) % self.RECORD == 0
                found += aligned
                at = self.memory.find(key, at + (self.RECORD if aligned else 1), end)
        return found

    def admit(self, ip, most, most_per_ip):
        """As SessionCounts.admit, for every worker's sessions."""
        with self.locked():
            if self.sessions >= most or not self.free:
                return TOO_MANY_CONNECTIONS
            if most_per_ip and self.sessions_from(ip) >= most_per_ip:
                return TOO_MANY_FROM_ADDRESS
            record = heapq.heappop(self.free)       # the lowest free one: the used records stay few
            at = self.base + record * self.RECORD
            self.memory[at:at + self.RECORD] = self.record(ip)
            self.counts[self.slot] += 1
            self.used[self.slot] = max(self.used[self.slot], record - self.slot * self.capacity + 1)
            self.held[ip].append(record)
        return None

    def release(self, ip):
        """As SessionCounts.release."""
        with self.locked():
            record = self.held[ip].pop()
            if not self.held[ip]:
                del self.held[ip]
            at = self.base + record * self.RECORD
            self.memory[at:at + self.RECORD] = bytes(self.RECORD)
            self.counts[self.slot] -= 1
            heapq.heappush(self.free, record)

    def clear(self, slot):
        """The worker in slot has died: none of its sessions counts any more."""
        size = self.capacity * self.RECORD
        start = self.base + slot * size
        with self.locked():
            self.counts[slot] = self.used[slot] = 0
            self.memory[start:start + size] = bytes(size)


NO_ADDRESS = b"\xff" * 16       # a client without an IP address (a multicast address: never a peer's)


def address_key(ip):
    """A client's address as SharedCounts records it: 16 bytes, IPv4 mapped into IPv6."""
    if ip is None:
        return NO_ADDRESS
    address = ipaddress.ip_address(ip)
    return address.packed if address.version == 6 else b"\0" * 10 + b"\xff\xff" + address.packed


class Relay:
    """What outlives a reload: the current Setup, the session counts for
    --max-clients and --max-clients-per-ip, the stop, the event hook."""

    def __init__(self, setup, argv=None):
        """setup: the Setup at start; argv: the command line, read again on SIGHUP (None: sys.argv)."""
        self.setup = setup
        self.argv = argv            # the command line, read again with the config file on SIGHUP
        self.metrics = None
        self.lock = threading.Condition()
        self.counts = SessionCounts()   # admitted sessions, for the limits: SharedCounts with --workers
        self.connections = 0        # connections being served, up to their last log line: the drain waits for these
        # On stop, a byte in this pipe wakes every session waiting between
        # transactions (Wire.receive); it is never read, so it stays readable.
        self.stop_reader, self.stop_writer = os.pipe()
        self.resolver = Resolver()      # the clients' names, from a few threads for all sessions
        self.stop_signal = None         # the signal that stops the relay, once one came
        self.stopping = threading.Event()   # set with stop_signal: what the main thread waits for, apart
                                            # from self.lock, which sessions notify as they end
        self.balancer = Balancer()      # --balance and the back-ends' health

    def begin_stop(self, signum):
        """SIGTERM or SIGINT: the one way the relay stops, daemon and --inetd alike.
        Idle sessions get 421 at once; each transaction in flight is finished first."""
        with self.lock:
            if self.stop_signal is not None:
                return
            self.stop_signal = signum
        self.stopping.set()
        sd_notify("STOPPING=1", f"STATUS=stopping: {self.sessions} sessions to finish")
        event("stopping", signal=signal.Signals(signum).name)
        os.write(self.stop_writer, b"x")

    def admit(self, ip):
        """Admission, all of it: count a new session in -> None, or the refusal
        (reply, reason) to send instead: --allow-from, --max-clients, --max-clients-per-ip."""
        cfg = self.setup.cfg
        # A client with no IP address is trusted no more than a remote one: only the default admits it.
        if cfg.allow_from and (ip is None or not any(ipaddress.ip_address(ip) in net for net in cfg.allow_from)):
            return ACCESS_DENIED, "not in --allow-from"
        refusal = self.counts.admit(ip, cfg.max_clients, cfg.max_clients_per_ip)
        return refusal and (refusal, "%d %s" % refusal)

    @property
    def sessions(self):
        """Sessions admitted and not yet ended (every worker's)."""
        return self.counts.sessions

    def reload(self):
        """SIGHUP: read the configuration again, as at start, for new sessions; a bad one keeps
        the old -> whether the new one was taken."""
        old = self.setup
        try:
            cfg, _, _ = load_config(self.argv)
            changed = [option for attr, option in RESTART_SETTINGS if restart_value(cfg, attr) != restart_value(old.cfg, attr)]
            cfg = dataclasses.replace(cfg, **{attr: getattr(old.cfg, attr) for attr, _ in RESTART_SETTINGS})
            room = getattr(self.counts, "capacity", None)      # --workers: the shared memory's, made at start
            if room and cfg.max_clients > room:
                changed.append(f"max-clients above {room} (its value at start, with --workers)")
                cfg = dataclasses.replace(cfg, max_clients=room)
            setup = Setup(cfg)
            setup.create_backends(cfg.user)
        except ConfigError as e:
            event("reload_refused", reason=str(e))
            return False
        if changed:
            event("reload_partial", settings=", ".join(changed))
        setup_logging(cfg)
        self.setup = setup
        old.pool.close()            # its idle connections were made under the old settings
        event("reloaded")
        return True

    def connection_opened(self):
        """Count a connection in -> False where --max-clients plus REFUSING are being served
        already: then it gets no thread (one refused costs a thread for a moment, one
        whose PROXY header is late up to --timeout)."""
        with self.lock:
            if self.connections >= self.setup.cfg.max_clients + REFUSING:
                return False
            self.connections += 1
            return True

    def connection_closed(self):
        """A connection counted in by connection_opened() is done; the drain may be waiting for it."""
        with self.lock:
            self.connections -= 1
            self.lock.notify_all()

    def wait_idle(self, timeout):
        """Wait for connections in flight to end -> True if all did."""
        with self.lock:
            return self.lock.wait_for(lambda: self.connections == 0, timeout)


def restart_value(cfg, attr):
    """A RESTART_SETTINGS value, comparable across two reads."""
    value = getattr(cfg, attr)
    return value.pw_name if attr == "user" and value else value


# The PROXY protocol (haproxy's proxy-protocol.txt), read before anything
# else so that admission, logs, XCLIENT and the auth service see the real
# client. Read exactly the header's bytes: what follows (a TLS ClientHello)
# belongs to the session.

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V1_LIMIT = 107        # the longest v1 line, CRLF included


class ProxyHeaderError(RelayError):
    """A PROXY header that is missing, malformed or late; str() says which."""


def receive_exactly(wire, count, deadline):
    """count bytes of the header; ProxyHeaderError where the connection ends first."""
    data = wire.read_exactly(count, deadline)
    if len(data) < count:
        raise ProxyHeaderError("connection closed inside the header")
    return data


def read_proxy_header(wire, timeout):
    """The PROXY header on the connection -> (ip, port, server ip, server port): the client's
    address and the one it connected to; or None where the header names none (v1 UNKNOWN,
    v2 LOCAL, other families): then the peer is the client. Raises ProxyHeaderError,
    TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    start = receive_exactly(wire, 5, deadline)
    if start == PROXY_V2_SIGNATURE[:5]:
        return parse_proxy_v2(start + receive_exactly(wire, 11, deadline), wire, deadline)
    if start != b"PROXY":
        raise ProxyHeaderError(f"starts with {printable(start.decode('latin-1'))!r}")
    line = start
    while not line.endswith(b"\r\n"):
        if len(line) >= PROXY_V1_LIMIT:
            raise ProxyHeaderError(f"v1 line longer than {PROXY_V1_LIMIT} bytes")
        line += receive_exactly(wire, 1, deadline)
    return parse_proxy_v1(line[:-2].decode("latin-1"))


def parse_proxy_v1(line):
    """A v1 line without its CRLF -> (ip, port, server ip, server port), or None for UNKNOWN;
    raises ProxyHeaderError."""
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"bad v1 line {printable(line)!r}")
    _, family, source, destination, port, destination_port = words
    try:
        ip, to = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        if {ip.version, to.version} != {int(family[3])} or not all(
                is_number(p) and int(p) <= 65535 for p in (port, destination_port)):
            raise ValueError
    except ValueError:
        raise ProxyHeaderError(f"bad v1 line {printable(line)!r}") from None
    return str(ip), int(port), str(to), int(destination_port)


def parse_proxy_v2(head, wire, deadline):
    """The v2 header after its 16 bytes head, read from wire -> (ip, port, server ip, server port),
    or None where it names no TCP client; raises ProxyHeaderError."""
    if head[:12] != PROXY_V2_SIGNATURE:
        raise ProxyHeaderError("bad v2 signature")
    version, command, family = head[12] >> 4, head[12] & 0xF, head[13]
    if version != 2 or command not in (0, 1):
        raise ProxyHeaderError(f"unknown v2 version {version} or command {command}")
    body = receive_exactly(wire, int.from_bytes(head[14:16], "big"), deadline)   # addresses, then TLVs (skipped)
    if command == 0:            # LOCAL: the proxy's own connection (a health check)
        return None
    for code, size in ((0x11, 12), (0x21, 36)):     # TCP over IPv4, TCP over IPv6
        if family == code:
            if len(body) < size:
                raise ProxyHeaderError("v2 addresses cut short")
            half = (size - 4) // 2
            source, server = (ipaddress.ip_address(body[at:at + half]) for at in (0, half))
            return str(source), int.from_bytes(body[size - 4:size - 2], "big"), str(server), \
                int.from_bytes(body[size - 2:size], "big")
    return None                 # UNSPEC, UDP, UNIX: the spec says use the real connection's


def serve_connection(relay, connection, peer, implicit_tls=False):
    """One client connection, however it came (a socket, or a Wire over
    pipes), its peer's address or None: its PROXY header, admission, the
    session, the release and the close."""
    setup, channel = relay.setup, None
    cfg, ip = setup.cfg, client_ip(peer)
    wire = connection if isinstance(connection, Wire) else Wire(connection, first_read=cfg.timeout)
    if wanted("connection"):
        event("connection", peer=peer_text(ip, ip and peer[1]), client=ip)
    try:
        via = real = None
        if cfg.proxy_protocol:
            if ip is None or not any(ipaddress.ip_address(ip) in net for net in cfg.real_ip_from):
                event("refused", peer=ip or "a client with no address", client=ip,
                      reason="PROXY protocol from a peer outside --real-ip-from")
                return
            try:
                real = read_proxy_header(wire, cfg.timeout)
            except TimeoutError:
                event("bad_proxy_header", peer=ip, client=ip, reason=f"no PROXY header within {cfg.timeout:g}s")
                return
            except (ProxyHeaderError, OSError) as e:
                event("bad_proxy_header", peer=ip, client=ip, reason=f"bad PROXY header: {e}")
                return
            if real:
                via, peer, ip = peer, real[:2], client_ip(real)
        refusal = relay.admit(ip)
        if refusal:
            reply, reason = refusal
            event("refused", peer=ip or "a client with no IP address", client=ip, reason=reason,
                  reply="%d %s" % reply)
            with contextlib.suppress(OSError):
                wire.send(format_reply(*reply), time.monotonic() + REFUSAL_TIMEOUT)
            return
        session = None
        try:
            channel = Channel(wire, cfg.timeout, relay.stop_reader)
            # The client's names are looked up from the start, beside the greeting,
            # where anyone will ask for them (XCLIENT, the auth service).
            names = relay.resolver.lookup(ip, cfg.resolve_timeout) if setup.needs_names and ip else None
            local = wire.sock.getsockname()[:2] if ip else None     # a client with an IP came on a socket
            client = Client(secrets.token_hex(4), ip, peer[1] if ip else None, names, local=local, proxy=real)
            session = Session(relay, channel, client, via, implicit_tls)
            session.run()
        finally:
            # The slot is free before the client sees the close (or the log
            # says disconnect), so a client that reconnects at once is never
            # refused for its own old session.
            relay.counts.release(ip)
            if session:
                session.log_disconnect()
    finally:
        if channel is None and wire.sock is not None:
            with contextlib.suppress(OSError):
                wire.sock.shutdown(socket.SHUT_RDWR)
        wire.close(linger=LINGER_SECONDS if channel else 0)     # the session's last reply reaches the client


def system_backlog():
    """The kernel's cap on a listen backlog (net.core.somaxconn); listen() asks for all of it."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


class NoThread(RelayError):
    """The system gives the relay none of its own threads (signals, listeners, the
    workers' reports, metrics): it cannot run. A session's thread is another matter:
    without one, that connection alone is refused."""

    def __init__(self, name):
        """name: what the thread was for."""
        super().__init__(f"the system gives no thread for {name}: the limit on processes "
                         f"(ulimit -u, systemd's TasksMax=) is reached")


def start_thread(name, target, *args, **kwargs):
    """target(*args, **kwargs) in a daemon thread of the relay's own; NoThread where the system gives none."""
    try:
        threading.Thread(target=target, args=args, kwargs=kwargs, name=name, daemon=True).start()
    except RuntimeError:
        raise NoThread(name) from None


class Spare:
    """A thread waiting in SpareThreads: wake is held until work is handed to it."""

    __slots__ = ("wake", "work")

    def __init__(self):
        self.wake, self.work = threading.Lock(), None
        self.wake.acquire()


class SpareThreads:
    """Threads for connections, each kept a while after its connection ends to
    serve a later one. Starting a thread costs more CPU than the Python of a
    whole one-message session (about 110 us against 30 us to wake a waiting
    thread, on the machine the README's figures come from). Still one thread
    per connection at a time; the kept ones are bounded (SPARE_THREADS) and
    end after SPARE_SECONDS without work."""

    def __init__(self, most=None, seconds=None):
        """most, seconds: as SPARE_THREADS and SPARE_SECONDS (None: those, read when used)."""
        self.most, self.seconds = most, seconds
        self.lock = threading.Lock()
        self.waiting = []           # Spares, the last one in the first out (its stack is warm)

    def start(self, function, *args):
        """function(*args) in a thread of its own: a waiting one, else a new one
        (RuntimeError where the system gives none)."""
        with self.lock:
            if self.waiting:
                spare = self.waiting.pop()
                spare.work = function, args
                spare.wake.release()
                return
        threading.Thread(target=self.serve, args=(function, args), daemon=True).start()

    def serve(self, function, args):
        """A thread's life: its first connection, then whatever it is handed while it waits."""
        while True:
            function(*args)
            function = args = None      # let go of the connection while waiting
            spare = Spare()
            with self.lock:
                if len(self.waiting) >= (SPARE_THREADS if self.most is None else self.most):
                    return
                self.waiting.append(spare)
            if not spare.wake.acquire(timeout=SPARE_SECONDS if self.seconds is None else self.seconds):
                with self.lock:
                    if spare in self.waiting:
                        self.waiting.remove(spare)
                        return
                spare.wake.acquire()    # handed work as the wait ran out
            function, args = spare.work


class Listener(socketserver.ThreadingTCPServer):
    """A listening socket, bound here (HOST:PORT, [V6]:PORT, or PORT alone for
    IPv6 and IPv4) or inherited; each connection is served in a thread of its own."""

    daemon_threads = True       # a stuck session must not keep the process alive at exit
    block_on_close = False      # shutdown waits for sessions itself, bounded by --timeout
    allow_reuse_address = True  # restart at once on the same port
    request_queue_size = max(socket.SOMAXCONN, system_backlog())    # a flood waits in the kernel, never dropped
    threads = SpareThreads()    # one set of kept threads for every listener

    def process_request(self, request, client_address):
        """Overridden: the connection's thread is a kept one where one waits."""
        self.threads.start(self.process_request_thread, request, client_address)

    def __init__(self, address, sock=None):
        """address: (host, port), host "" for every address; sock: a listening socket inherited
        from systemd, used instead of binding. Subclasses serve a connection in finish_request()."""
        host, port = address
        self.address_family = sock.family if sock else socket.AF_INET6 if ":" in host or not host else socket.AF_INET
        super().__init__((host or "::", port), None, bind_and_activate=sock is None)
        if sock is not None:        # inherited (systemd): already bound and listening
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()

    def server_bind(self):
        """Overridden so that PORT alone (host "::") takes IPv4 clients too (IPV6_V6ONLY off)."""
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # PORT alone: v4 too
        super().server_bind()


class RelayServer(Listener):
    """A client listener: each accepted client is served in its own thread."""

    def __init__(self, address, relay, sock=None, tls=False):
        """relay: the Relay its sessions belong to; tls: implicit TLS (--tls-listen, or systemd's smtps
        socket); address and sock as for Listener."""
        self.relay, self.tls, self.inherited = relay, tls, sock is not None
        self.shared = False                 # --workers: every worker waits for clients on this socket
        self.leaving, self.left = False, threading.Event()
        super().__init__(address, sock)

    def finish_request(self, request, client_address):
        """Overridden: the connection is served as every connection is."""
        serve_connection(self.relay, request, client_address, self.tls)

    @property
    def exclusive(self):
        """Whether serve_forever() waits with EPOLLEXCLUSIVE (below)."""
        return self.shared and hasattr(select, "EPOLLEXCLUSIVE")

    def serve_forever(self, poll_interval=0.5):
        """Overridden for --workers: poll() on a socket that every worker waits on would
        wake them all for each client, and all but one would find nothing to accept;
        epoll's EPOLLEXCLUSIVE wakes one that waits (as nginx without accept_mutex)."""
        if not self.exclusive:
            return super().serve_forever(poll_interval)
        try:
            with select.epoll() as waiting:
                waiting.register(self.socket, select.EPOLLIN | select.EPOLLEXCLUSIVE)
                while not self.leaving:
                    if waiting.poll(poll_interval):
                        self._handle_request_noblock()
        finally:
            self.left.set()

    def shutdown(self):
        """Overridden to end serve_forever() as above as well."""
        if not self.exclusive:
            return super().shutdown()
        self.leaving = True
        self.left.wait()

    def get_request(self):
        """Overridden to pause where accept() finds the relay short of descriptors or memory, not spin."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in LOCAL_ERRNOS:
                # The connection waits in the backlog; without a pause the
                # listener would spin on it until a descriptor frees up.
                event("accept_failed", reason=e.strerror, seconds=ACCEPT_PAUSE)
                time.sleep(ACCEPT_PAUSE)
            raise

    def process_request(self, request, client_address):
        """A thread for the client, within the relay's budget; where none is to be had,
        it hears 421 from the listener now, not a silent close."""
        if not self.relay.connection_opened():
            ip = client_ip(client_address)
            event("connection", peer=peer_text(ip, ip and client_address[1]), client=ip)
            event("refused", peer=ip, client=ip, reason="too many connections", reply="%d %s" % TOO_MANY_CONNECTIONS)
            return self.refuse_at_once(request)
        try:
            super().process_request(request, client_address)
        except RuntimeError as e:
            self.relay.connection_closed()
            event("no_thread", client=client_ip(client_address), reason=str(e))
            self.refuse_at_once(request)

    def refuse_at_once(self, request):
        """421 from the listener itself, never waiting for the client, then the close."""
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(format_reply(*TOO_MANY_CONNECTIONS))
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        """The connection's thread, counted until its session's last log line."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.relay.connection_closed()      # after the session's last log line: the drain waits for it

    def handle_error(self, request, client_address):
        """A bug of ours: the traceback to the log, never to the client."""
        event("crashed", exc_info=True, doing="in session", client=client_ip(client_address))

    def describe(self):
        """For the log: the address, and whether TLS and inherited."""
        host, port = self.server_address[:2]
        notes = ["TLS"] * self.tls + ["inherited"] * self.inherited
        return format_address(host, port) + (f" ({', '.join(notes)})" if notes else "")


def inherited_sockets():
    """systemd socket activation (sd_listen_fds): [(socket, name)] passed from fd 3 on, or []."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):    # not for any child
        os.environ.pop(name, None)
    sockets = []
    for i in range(count):
        fd = 3 + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ConfigError("LISTEN_FDS", f"descriptor {fd}: {e.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError("LISTEN_FDS", f"descriptor {fd} is not a listening stream socket "
                              "(with Accept=yes, run smtprelay --inetd)")
        os.set_inheritable(fd, False)
        sockets.append((sock, names[i] if i < len(names) else ""))
    return sockets


def make_servers(relay):
    """Bind every --listen and --tls-listen address, or take the sockets systemd passed -> [RelayServer];
    raises ConfigError naming the option at fault."""
    cfg, servers = relay.setup.cfg, []
    inherited = inherited_sockets()
    if inherited:
        for sock, name in inherited:
            if name == "smtps" and not relay.setup.tls_context:
                raise ConfigError("--tls-cert", "the socket named smtps is implicit TLS: it needs --tls-cert and --tls-key")
            servers.append(RelayServer(sock.getsockname()[:2], relay, sock=sock, tls=name == "smtps"))
        return servers
    for (host, port), tls in [(a, False) for a in cfg.listen] + [(a, True) for a in cfg.tls_listen]:
        try:
            servers.append(RelayServer((host, port), relay, tls=tls))
        except OSError as e:
            for s in servers:
                s.server_close()
            option = "--tls-listen" if tls else "--listen"
            raise ConfigError(option, f"{format_address(host or '*', port)}: {e.strerror or e}") from None
    return servers


def drop_privileges(user):
    """--user: its groups, then its gid, then its uid (the order in which each step is still allowed)."""
    if (os.geteuid(), os.getegid()) == (user.pw_uid, user.pw_gid):
        return
    try:
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    except OSError as e:
        raise ConfigError("--user", f"{user.pw_name}: cannot switch to it: {e.strerror}") from None
    event("running_as_user", user=user.pw_name, uid=user.pw_uid)


def sd_notify(*lines):
    """Tell systemd (NOTIFY_SOCKET) how the relay is: READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1, STATUS=.
    A worker (--workers) tells the main process instead, which speaks for the service."""
    if WORKER.reports is not None:
        report = f"{WORKER.slot} {WORKER.reloads} {US.join(lines)}\n"
        os.write(WORKER.reports, report.encode("utf-8", "replace"))   # one write: atomic
        return
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]        # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(lines).encode())
    except OSError as e:
        event("notify_failed", address=address.replace("\0", "@"), reason=e.strerror or str(e))


def watchdog_interval():
    """Seconds between WATCHDOG=1 messages (half of WATCHDOG_USEC), or None."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not is_number(usec) or int(usec) == 0 or pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class SessionsGauge:
    """The sessions open now, every worker's, read when the page is asked for."""

    def __init__(self, relay):
        self.relay = relay

    def collect(self):
        """For prometheus_client's registry."""
        from prometheus_client.core import GaugeMetricFamily
        yield GaugeMetricFamily("smtprelay_sessions_active", "Client sessions open now", value=self.relay.sessions)


class Metrics:
    """--metrics: Prometheus counters fed by the events they subscribe to, served over HTTP."""

    def __init__(self, relay, address):
        """relay: whose session count the gauge reads; address: (host, port) to serve on. Raises
        ConfigError without prometheus_client or where the address cannot be bound."""
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigError("--metrics", "needs the prometheus_client package: pip install 'smtprelay[metrics]'") from None
        page = prom.CollectorRegistry()
        page.register(SessionsGauge(relay))
        registry = page
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # --workers: each worker counts in files of its own there, and the page adds them up.
            from prometheus_client import multiprocess
            multiprocess.MultiProcessCollector(page)
            registry = None
        counter = functools.partial(prom.Counter, registry=registry)
        self.sessions = counter("smtprelay_sessions", "Client connections, refused ones too")
        self.messages = counter("smtprelay_messages", "Messages by what the client heard at the end of data", ["outcome"])
        self.message_bytes = counter("smtprelay_message_bytes", "Message bytes received")
        self.backend_errors = counter("smtprelay_backend_errors", "Back-ends found down or untrusted", ["backend"])
        self.auth_lookups = counter("smtprelay_auth_lookups", "Auth service lookups", ["result"])
        self.auth_seconds = prom.Histogram("smtprelay_auth_lookup_seconds", "Auth service lookup time",
                                           registry=registry)
        self.recipients = counter("smtprelay_recipients", "Recipients by what the client heard for RCPT", ["outcome"])
        for counter, labels in ((self.messages, ("delivered", "deferred", "refused")),
                                (self.auth_lookups, ("ok", "refused", "error")),
                                (self.recipients, ("accepted", "deferred", "refused"))):
            for label in labels:
                counter.labels(label)
        outcomes = {"2": "delivered", "4": "deferred"}
        counts = {
            "connection": lambda f: self.sessions.inc(),
            "message": lambda f: (self.messages.labels(outcomes.get(f["reply"][:1], "refused")).inc(),
                                  self.message_bytes.inc(f["size"])),
            "backend_down": lambda f: self.backend_errors.labels(f["backend"]).inc(),
            "backend_untrusted": lambda f: self.backend_errors.labels(f["backend"]).inc(),
            "auth_lookup": lambda f: (self.auth_lookups.labels(f["result"]).inc(), self.auth_seconds.observe(f["seconds"])),
            "auth_service_failed": lambda f: (self.auth_lookups.labels("error").inc(),
                                              self.auth_seconds.observe(f["seconds"])),
            "recipient": lambda f: self.recipients.labels(f["outcome"]).inc(),
        }
        from prometheus_client.exposition import generate_latest
        self.page = lambda: generate_latest(page)
        host, port = address
        try:
            self.server = MetricsServer((host, port), self)
        except OSError as e:
            raise ConfigError("--metrics", f"{format_address(host or '*', port)}: {e.strerror or e}") from None
        self.url = f"http://{format_address(host or '[::]', port)}/metrics"
        for name, count in counts.items():
            SUBSCRIBERS[name].append(count)

    def start(self):
        """Serve the page, from a thread of this process (with --workers, the main process,
        once the workers are forked)."""
        start_thread("metrics", self.server.serve_forever, poll_interval=0.5)


METRICS_REQUESTS = 8        # served at a time; more are closed at once
METRICS_SECONDS = 5         # to send a request and get its answer, whole
METRICS_REQUEST_LIMIT = 8192    # bytes of a request's line and headers


class MetricsServer(Listener):
    """--metrics over HTTP/1.0: GET /metrics alone, from a bounded number of threads."""

    def __init__(self, address, metrics):
        """address: (host, port) to serve on; metrics: the Metrics whose page it serves."""
        self.metrics = metrics
        self.slots = threading.BoundedSemaphore(METRICS_REQUESTS)
        super().__init__(address)

    def process_request(self, request, client_address):
        """A thread for the request while a slot is free; else it is closed at once."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)      # METRICS_REQUESTS are being served: closed at once
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:        # no thread to be had: the relay's shortage, and no answer
            self.slots.release()
            self.shutdown_request(request)

    def finish_request(self, request, client_address):
        """Answer the request, and free its slot."""
        try:
            answer_metrics(Wire(request), self.metrics)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        """A bug of ours: the traceback to the log."""
        event("crashed", exc_info=True, doing="answering a metrics request", client=client_address[0])


def answer_metrics(wire, metrics):
    """Read one request and answer it, all within METRICS_SECONDS; a slow, long or broken one is closed."""
    deadline = time.monotonic() + METRICS_SECONDS
    try:
        head = wire.read_line(METRICS_REQUEST_LIMIT, deadline)
        size = len(head)
        while (line := wire.read_line(METRICS_REQUEST_LIMIT, deadline)).strip():     # the headers: skipped
            size += len(line)
            if size > METRICS_REQUEST_LIMIT:
                raise LineTooLong(whole=False)
        method, path, *_ = head.decode("latin-1").split() + ["", ""]
        if method != "GET":
            status, body, extra = "405 Method Not Allowed", b"GET only\n", "Allow: GET\r\n"
        elif path.partition("?")[0] != "/metrics":
            status, body, extra = "404 Not Found", b"GET /metrics\n", ""
        else:
            status, body, extra = "200 OK", metrics.page(), ""
        kind = "text/plain; version=0.0.4; charset=utf-8" if status == "200 OK" else "text/plain; charset=utf-8"
        wire.send(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n{extra}"
                  f"Connection: close\r\n\r\n".encode("latin-1") + body, deadline)
    except (OSError, LineTooLong, UnicodeError):
        pass
    finally:
        wire.close(linger=max(0, min(LINGER_SECONDS, deadline - time.monotonic())))


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, message, and an event's name and fields."""

    def format(self, record):
        """Overridden to write the record as one JSON object; fields named *_note are for text lines only."""
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(), "message": record.getMessage()}
        if WORKER.slot is not None:
            entry["worker"] = WORKER.slot + 1
        if getattr(record, "event", None):
            entry["event"] = record.event
            entry.update((k, v) for k, v in record.fields.items() if not k.endswith("_note"))   # _note: text only
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def raise_open_files_limit():
    """A session holds two descriptors; the soft limit (often 1024) would refuse a flood before --max-clients."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stderr_is_the_client():
    """inetd (and systemd's Accept=yes by default) give fd 2 the client's socket as well: logs must not go there."""
    try:
        err, conn = os.fstat(2), os.fstat(0)
    except OSError:
        return False
    return stat.S_ISSOCK(err.st_mode) and (err.st_dev, err.st_ino) == (conn.st_dev, conn.st_ino)


def log_handler(target):
    """The handler for --log-target; raises ConfigError when syslog is asked for and /dev/log is missing."""
    if target == "stderr" and not stderr_is_the_client():
        return logging.StreamHandler(sys.stderr)
    try:
        # SysLogHandler itself would take a missing /dev/log quietly and fail at every line.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect("/dev/log")
            except OSError as e:
                if e.errno != errno.EPROTOTYPE:     # a stream socket is fine too
                    raise
        handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_MAIL)
    except OSError as e:
        if target == "stderr":
            return logging.NullHandler()    # stderr is the client: no log rather than a log line to it
        raise ConfigError("--log-target", f"/dev/log is missing: no syslog daemon to write to ({e.strerror})") from None
    handler.ident = f"smtprelay[{os.getpid()}]: "
    handler.append_nul = False      # RFC 3164 and 5424 end a message without one; rsyslog would keep it
    return handler


def setup_logging(cfg, handler=None):
    """Log as cfg says, through handler (at start) or the handler in use (on SIGHUP)."""
    handler = handler or log.handlers[0]
    # A line that cannot be logged (syslog gone) is dropped; logging's own
    # report of it would go to stderr, which may be the client.
    logging.raiseExceptions = not stderr_is_the_client()
    tag = f" worker {WORKER.slot + 1}" if WORKER.slot is not None else ""
    if cfg.log_format == "json":
        handler.setFormatter(JSONFormatter())
    elif isinstance(handler, logging.StreamHandler) and not hasattr(handler, "ident"):
        handler.setFormatter(logging.Formatter(f"%(asctime)s smtprelay{tag} %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(levelname)s{tag} %(message)s"))     # syslog stamps time and host
    log.handlers[:] = [handler]
    log.setLevel(cfg.log_level.upper())
    log.propagate = False


def status(relay):
    """systemd's STATUS= line."""
    return f"STATUS={relay.sessions} sessions"


HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def block_signals():
    """Keep the handled signals pending for take_signals(): called by the main
    thread before any other starts, so that every thread inherits the mask.
    None lands in a session's blocking recv() (which would restart the read,
    and its whole SO_RCVTIMEO), and none is lost: a pending signal is one
    bit however often it came, so a flood costs nothing (no wakeup fd to fill)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


def take_signals(relay, inetd=False):
    """The signals thread: SIGTERM and SIGINT stop the relay (taken before a
    SIGHUP that is pending beside them), SIGHUP reloads it (not with --inetd:
    one session has nothing to reload); WATCHDOG=1 in between."""
    interval = ORPHAN_CHECK if WORKER.slot is not None else watchdog_interval()
    while True:
        info = signal.sigtimedwait(HANDLED_SIGNALS, interval) if interval else signal.sigwaitinfo(HANDLED_SIGNALS)
        if info is None and WORKER.slot is not None:
            # A worker whose main process is gone (SIGKILL) has no one to replace it,
            # reload it or stop it: it stops itself, finishing what is in flight.
            if os.getppid() != WORKER.parent and relay.stop_signal is None:
                event("orphaned", pid=WORKER.parent)
                relay.begin_stop(signal.SIGTERM)
            continue
        if info is None:
            sd_notify("WATCHDOG=1", status(relay))
            continue
        signum = info.si_signo
        if signum not in STOP_SIGNALS and (stops := signal.sigpending() & STOP_SIGNALS):
            signum = signal.sigwaitinfo(stops).si_signo
        if signum in STOP_SIGNALS:
            relay.begin_stop(signum)
        elif not inetd and relay.stop_signal is None:
            take_reload(relay)
            WORKER.reloads += 1         # after the reload: a READY=1 with it says the SIGHUP was taken
            sd_notify("READY=1", status(relay))


def take_reload(relay):
    """SIGHUP: RELOADING=1, and the configuration read again -> whether it was taken.
    Whatever the reload raises is refused (SystemExit too): the thread or process that
    takes the signals must live on, it alone can stop the relay."""
    sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        return relay.reload()
    except BaseException as e:
        event("reload_refused", exc_info=True, reason=f"internal error: {type(e).__name__}")
        return False


def serve(relay, servers, client=None):
    """Serve until SIGTERM or SIGINT, then drain the sessions -> exit status 0.
    With --inetd, client is (connection, peer): its one session, which a
    stop drains as the daemon drains every session."""
    start_thread("signals", take_signals, relay, client is not None)
    for s in servers:
        start_thread(f"listen {s.describe()}", s.serve_forever, poll_interval=0.05)
        if WORKER.slot is None:         # a worker's listeners are the main process's, told by it
            event("listening", address=s.describe())
    if client:
        relay.connection_opened()
        try:
            serve_connection(relay, *client)
        finally:
            relay.connection_closed()
    else:
        sd_notify("READY=1", status(relay))
        relay.stopping.wait()
        for s in servers:       # no new connections from here on (close after the accept loop ended)
            s.shutdown()
            s.server_close()
    # Every wait of a session in flight has a deadline: the client's
    # command lines (--timeout), the back-end's replies, the end of data.
    # The drain as a whole gets what the README promises (and the shipped
    # units' TimeoutStopSec= allows): --data-timeout plus --timeout.
    cfg = relay.setup.cfg
    if not relay.wait_idle(cfg.data_timeout + cfg.timeout):
        event("drain_cut", sessions=relay.connections)
    relay.setup.pool.close()
    if relay.stop_signal is not None:
        event("stopped")
    return 0


# --workers N: this process binds the listeners, then forks N workers before
# any thread starts; each is serve() above on the same sockets, and this one
# only supervises. systemd hears from it alone: a worker's sd_notify() lines
# come here through a pipe.

class WorkerIdentity:
    """Who this process is: slot None in the main process (and with --workers 1)."""

    def __init__(self):
        self.slot = None        # the worker's index, 0 for worker 1
        self.reports = None     # the pipe to the main process, for sd_notify()
        self.parent = None      # the main process's pid
        self.reloads = 0        # SIGHUPs taken: a worker's READY=1 says after which


WORKER = WorkerIdentity()
US = "\x1f"                     # between a report's lines: they hold spaces, never this
WORKER_YOUNG = 10               # seconds: a worker that dies younger is replaced after a pause
WORKER_PAUSES = (1, 30)         # that pause: the first, then doubled up to the second
RELOAD_SECONDS = 30             # for every worker to say it has reloaded
ORPHAN_CHECK = 1                # seconds between a worker's looks at whether its main process lives


class WorkerReports:
    """The workers' sd_notify() lines, read by a thread of the main process, which
    speaks for the service: READY=1 once every worker has said it, at start and
    after a reload (a worker that dies meanwhile: once its successor has)."""

    def __init__(self, reader, workers, relay):
        self.workers, self.relay = workers, relay
        self.lock = threading.Lock()
        self.awaited = set(range(workers))      # slots whose READY=1 the service waits for
        self.deadline = None                    # for a reload's
        start_thread("workers' reports", self.run, reader)

    def run(self, reader):
        """Read reports for good (the main process holds the pipe's writing end too)."""
        with open(reader, "rb") as reports:
            for report in reports:
                slot, reloads, lines = report.decode("utf-8", "replace").rstrip("\n").split(" ", 2)
                if "READY=1" not in lines.split(US):
                    continue
                with self.lock:
                    # A worker forked before a reload says READY=1 once at its start,
                    # and again after the SIGHUP passed on to it: only that one counts.
                    if int(slot) in self.awaited and int(reloads) >= WORKER.reloads:
                        self.awaited.discard(int(slot))
                        if not self.awaited:
                            self.deadline = None
                            sd_notify("READY=1", status(self.relay))

    def await_reload(self, seconds):
        """A reload was passed on: READY=1 once every worker has said it again."""
        with self.lock:
            self.awaited, self.deadline = set(range(self.workers)), time.monotonic() + seconds

    def overdue(self):
        """The workers a reload still waits for past its deadline -> their slots; the caller
        says READY=1 for the service then (nothing is waited for any more)."""
        with self.lock:
            if not (self.awaited and self.deadline and time.monotonic() >= self.deadline):
                return []
            late, self.awaited, self.deadline = sorted(self.awaited), set(), None
            return late

    def cancel(self):
        """The relay stops: no READY=1 after STOPPING=1."""
        with self.lock:
            self.awaited, self.deadline = set(), None


class Worker:
    """A worker process as the main process knows it."""

    def __init__(self, slot, pid, pause):
        self.slot, self.pid, self.pause = slot, pid, pause
        self.started = time.monotonic()
        self.restart_at = None          # when a worker that died is replaced


def start_worker(relay, servers, slot, reports, pause, reader):
    """Fork the worker of slot -> Worker; the child serves until its stop and exits.
    reader: the reports pipe's reading end, the main process's alone."""
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:            # the system's shortage (processes, memory): try again later
        worker = Worker(slot, None, next_pause(pause))
        worker.restart_at = time.monotonic() + worker.pause
        event("worker_not_started", worker=slot + 1, reason=e.strerror or str(e), pause=worker.pause)
        return worker
    if pid:
        event("worker_started", worker=slot + 1, pid=pid)
        return Worker(slot, pid, pause)
    status = 1
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        WORKER.slot, WORKER.reports, WORKER.parent = slot, reports, parent
        os.environ.pop("WATCHDOG_USEC", None)       # the main process keeps the watchdog
        Listener.threads = SpareThreads()           # the main process's kept threads are not here
        if hasattr(log.handlers[0], "ident"):
            log.handlers[0].ident = f"smtprelay[{os.getpid()}]: "      # syslog: the worker's own pid
        setup_logging(relay.setup.cfg)              # lines say which worker
        relay.counts.enter(slot)
        for fd in (reader, relay.stop_reader, relay.stop_writer):
            os.close(fd)
        relay.stop_reader, relay.stop_writer = os.pipe()     # its own: a worker's stop is its own
        if relay.metrics:
            relay.metrics.server.socket.close()     # the main process serves the page
        status = serve(relay, servers)
    except NoThread as e:
        event("cannot_start", reason=str(e))
    except BaseException:
        event("crashed", exc_info=True, doing=f"in worker {slot + 1}", client="-")
    finally:
        os._exit(status)


def exit_text(status):
    """A waitpid() status, in words."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def supervise(relay, servers, count):
    """--workers N: fork the workers, then keep them: a dead one is replaced (after
    a pause where it died young; its sessions no longer count), SIGHUP is checked
    here once and then passed to every worker, SIGTERM and SIGINT too -> 0 once every
    worker has stopped cleanly."""
    for server in servers:
        # Every worker waits for clients on the same sockets, and more than one may
        # be woken for a client: the others' accept() must find nothing, not block.
        server.socket.setblocking(False)
        server.shared = True
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    reader, writer = os.pipe()
    workers = {slot: start_worker(relay, servers, slot, writer, 0, reader) for slot in range(count)}
    reports = WorkerReports(reader, count, relay)
    if relay.metrics:
        relay.metrics.start()
    for server in servers:
        event("listening", address=server.describe())
    interval, next_watchdog = watchdog_interval(), None
    failed = False
    while workers:
        now = time.monotonic()
        if interval and (next_watchdog is None or now >= next_watchdog):
            sd_notify("WATCHDOG=1", status(relay))
            next_watchdog = now + interval
        if late := reports.overdue():
            event("workers_not_ready", workers=", ".join(str(slot + 1) for slot in late), seconds=RELOAD_SECONDS)
            sd_notify("READY=1", status(relay))
        due = [w.restart_at for w in workers.values() if w.restart_at is not None]
        wakes = [t for t in (next_watchdog, reports.deadline, *due) if t is not None]
        timeout = max(0, min(wakes) - now) if wakes else None
        signals = HANDLED_SIGNALS | {signal.SIGCHLD}
        info = signal.sigtimedwait(signals, timeout) if timeout is not None else signal.sigwaitinfo(signals)
        signum = info.si_signo if info else None
        if signum in STOP_SIGNALS:
            if not relay.stopping.is_set():
                reports.cancel()
                relay.begin_stop(signum)
                for server in servers:      # ours: the listeners close as the last worker closes its copy
                    server.server_close()
            for worker in list(workers.values()):
                if worker.restart_at is not None:
                    del workers[worker.slot]
                else:
                    os.kill(worker.pid, signum)
        elif signum == signal.SIGHUP and not relay.stopping.is_set():
            reload_workers(relay, workers, reports)
        failed = reap_workers(relay, workers, relay.stopping.is_set()) or failed
        for worker in list(workers.values()):
            if not relay.stopping.is_set() and worker.restart_at is not None and worker.restart_at <= time.monotonic():
                workers[worker.slot] = start_worker(relay, servers, worker.slot, writer, worker.pause, reader)
    relay.setup.pool.close()
    event("stopped")
    return 1 if failed else 0


def reap_workers(relay, workers, stopping):
    """Take the exit of every worker that has ended (SIGCHLD) -> whether one ended badly
    while stopping. Its sessions stop counting; a worker that died is given its time
    to be replaced; one that ended in a stop leaves workers."""
    failed = False
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return failed
        if not pid:
            return failed
        worker = next((w for w in workers.values() if w.pid == pid), None)
        if worker is None:
            continue
        relay.counts.clear(worker.slot)
        if stopping:
            failed = failed or wait_status != 0
            event("worker_ended", worker=worker.slot + 1, pid=pid, how=exit_text(wait_status))
            del workers[worker.slot]
            continue
        young = time.monotonic() - worker.started < WORKER_YOUNG
        worker.pause = next_pause(worker.pause) if young else 0
        worker.restart_at, worker.pid = time.monotonic() + worker.pause, None
        event("worker_died", worker=worker.slot + 1, pid=pid, how=exit_text(wait_status), pause=worker.pause)


def next_pause(pause):
    """The pause before a worker is started again, after one of pause seconds."""
    return min(max(pause * 2, WORKER_PAUSES[0]), WORKER_PAUSES[1])


def reload_workers(relay, workers, reports):
    """SIGHUP with --workers: the configuration is taken here first (as every worker
    will: the file, the certificates), and passed on only where it was: a file that
    does not parse changes nothing anywhere. READY=1 follows when every worker has
    said it again (WorkerReports)."""
    if not take_reload(relay):
        sd_notify("READY=1", status(relay))
        return
    WORKER.reloads += 1             # a worker forked from here on starts with the new settings
    reports.await_reload(RELOAD_SECONDS)
    for worker in workers.values():
        if worker.pid is not None:
            os.kill(worker.pid, signal.SIGHUP)


def inetd_connection():
    """--inetd: the client on standard input and output -> (connection, peer).

    A connected stream socket on fd 0 (inetd, systemd's Accept=yes), TCP or
    UNIX; anything else is fds 0 and 1 as they are (pipes, a terminal: SMTP
    typed by hand, as sendmail -bs). peer is None for a client with no IP
    address. Raises ConfigError where there is no client to serve.
    """
    try:
        mode = os.fstat(0).st_mode
        os.fstat(1)
    except OSError:
        raise ConfigError("--inetd", "standard input or output is closed") from None
    if not stat.S_ISSOCK(mode):
        return Wire(reader=0, writer=1), None
    sock = socket.socket(fileno=os.dup(0))
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError("--inetd", "standard input is not a stream socket")
        try:
            peer = sock.getpeername()
        except OSError:
            raise ConfigError("--inetd", "standard input is not a connected socket") from None
        return sock, peer if sock.family in (socket.AF_INET, socket.AF_INET6) else None
    except ConfigError:
        sock.close()
        raise


def load_lazy_modules():
    """What a session may import late, imported before --user drops privileges: the
    interpreter or the venv may sit where the user cannot read (a venv in /root)."""
    "localhost".encode("idna")      # encodings.idna: getaddrinfo() on a client's PTR name
    b"localhost".decode("idna")


# --- 7. main() ---------------------------------------------------------------

def probe(setup):
    """--probe: run the real handshake with each static back-end (with --auth-http: the
    one the auth service names) for a client at PROBE_CLIENT, say what it offers, send
    nothing beyond the handshake and QUIT -> 0 if every back-end would be used, else 1."""
    cfg, backends = setup.cfg, setup.backends
    client = Client("probe", PROBE_CLIENT, 0, helo=cfg.server_name, esmtp=True, local=(PROBE_CLIENT, 25))
    if cfg.auth_http:
        # The auth service names the back-end per client: ask it once, as for a
        # loopback client that said EHLO with the relay's own name, and probe that.
        try:
            answer = setup.auth_service.lookup(client, 1, "none", mail="MAIL FROM:<>", rcpt="RCPT TO:<postmaster>")
        except AuthServiceError as e:
            print(f"auth service {cfg.auth_http}: {e}")
            return 1
        if not answer.ok:
            print(f"auth service {cfg.auth_http}: refused a client at {PROBE_CLIENT}: {answer.text}")
            return 1
        print(f"auth service {cfg.auth_http}: for a client at {PROBE_CLIENT}, backend {answer.backend}")
        backends = [setup.route_backend(answer)]
    usable = True
    for backend in backends:
        ok, lines = probe_backend(backend, client)
        usable = usable and ok
        print(f"backend {backend}: {'would be used' if ok else 'would NOT be used'}")
        for line in lines:
            print(f"  {line}")
    return 0 if usable else 1


PROBE_CLIENT = "127.0.0.1"      # the client --probe stands for
RELAY_AS_CLIENT = (
    "with --no-xclient and no --backend-proxy-protocol, the back-end sees every client as the relay's own "
    "address: it must not trust that address for relaying, or the relay is an open relay. For Postfix, on the "
    "relay's listener in master.cf: -o mynetworks= -o smtpd_relay_restrictions=reject_unauth_destination "
    "(README, In front of Postfix)")


def probe_backend(backend, client):
    """One back-end for --probe: the handshake a session would run -> (would it be used, [lines])."""
    if not isinstance(backend, SMTPBackend):
        return True, ["built in: nothing to reach"]
    cfg = backend.setup.cfg
    connection = SMTPConnection(backend, client.sid)
    try:
        connection.handshake(client, cfg.backend_auth)
        failure = None
    except (BackendDown, LocalFailure) as e:
        failure = f"{e}: {XCLIENT_FIX}" if isinstance(e, BackendUntrusted) else str(e)
    features = connection.esmtp_features       # before QUIT forgets them
    connection.close(quit=True)
    if not connection.greeting:
        return False, [f"not reachable: {failure}"]
    code, text = connection.greeting
    lines = [f"greeting: {code} {printable(text.decode('utf-8', 'replace'))}"]
    if cfg.backend_tls == "off":
        lines.append("TLS: off (--backend-tls off)" + (", STARTTLS offered" if "starttls" in features else ""))
    elif connection.tls_version:
        verified = (f"certificate verified for {backend.host}" if cfg.backend_tls_verify == "on"
                    else "certificate NOT verified (--backend-tls-verify off)")
        lines.append(f"TLS: {connection.tls_version}, {verified}")
    else:
        lines.append(f"TLS: {'STARTTLS' if cfg.backend_tls == 'starttls' else 'implicit TLS'} failed: {failure}")
    proxy = cfg.backend_proxy_protocol
    if proxy != "off":
        lines.append(f"PROXY: {proxy} header sent: {'taken' if connection.proxy_taken else 'NOT taken'}")
    needed = "" if cfg.xclient and proxy == "off" else \
        " (not needed: the PROXY header names the client)" if proxy != "off" else " (--no-xclient)"
    if "xclient" in features:
        taken = "taken" if connection.xclient else "not used" if not cfg.xclient else "not taken"
        lines.append(f"XCLIENT: offered ({features['xclient'].strip()}): {taken}{needed}")
    else:
        lines.append(f"XCLIENT: not offered{needed}")
    lines.append(f"AUTH: {features.get('auth', '').strip() or 'none offered'}")
    size = connection.size
    if size and (not cfg.max_message_size or size < cfg.max_message_size):
        ours = f"below --max-message-size {cfg.max_message_size}" if cfg.max_message_size else \
            "--max-message-size unlimited"
        lines.append(f"SIZE: {size}, {ours}: EHLO will advertise {size}")
    else:
        lines.append(f"SIZE: {features['size'].strip() or 'no limit given'}" if "size" in features else "SIZE: not offered")
    lines.append(f"PIPELINING: {'offered' if 'pipelining' in features else 'not offered'}")
    if failure:
        lines.append(f"would NOT be used: {failure}")
    elif not cfg.xclient and proxy == "off":
        lines.append(f"WARNING: {RELAY_AS_CLIENT}")
    return failure is None, lines


def main(argv=None):
    """Run smtprelay -> exit status: 0 clean stop, 1 bad configuration, 2 usage."""
    argv = sys.argv[1:] if argv is None else list(argv)
    metrics_dir = None
    try:
        cfg, settings, mode = load_config(argv)
        setup = Setup(cfg)
        if mode == "check_config":
            print(settings)
            return 0
        if mode == "probe":
            return probe(setup)
        setup_logging(cfg, log_handler(cfg.log_target))
        connection = inetd_connection() if cfg.inetd else None
        if any(a == "--backend-auth" or a.startswith("--backend-auth=") for a in argv):
            event("warning", text="--backend-auth on the command line is there for every user of this host to "
                                  "see (ps): give it in --backend-auth-file")
        if not cfg.xclient and cfg.backend_proxy_protocol == "off" and (
                cfg.auth_http or any(b.kind == "smtp" for b in cfg.backend)):
            event("warning", text=RELAY_AS_CLIENT)
        if cfg.backend_tls != "off" and cfg.backend_tls_verify == "off":
            event("warning", text="--backend-tls-verify off: back-end certificates are not checked; for lab "
                                  "set-ups only")
        raise_open_files_limit()
        setup.create_backends(cfg.user)
        block_signals()         # before any thread starts: every thread keeps them out
        relay = Relay(setup, argv)
        servers = [] if cfg.inetd else make_servers(relay)
        workers = 1 if cfg.inetd else cfg.workers       # --inetd: one session, one process
        if workers > 1:
            relay.counts = SharedCounts(workers, cfg.max_clients)
            if cfg.metrics:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir = metrics_directory(cfg.user)
        if cfg.metrics:
            relay.metrics = Metrics(relay, cfg.metrics)
            event("metrics_listening", url=relay.metrics.url)
        if cfg.user:
            load_lazy_modules()
            drop_privileges(cfg.user)
        elif os.geteuid() == 0 and "INVOCATION_ID" not in os.environ and not cfg.inetd:
            event("warning", text="running as root: give --user to drop privileges once the listeners are bound")
    except ConfigError as e:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if stderr_is_the_client():
            log_config_error(e)
            return 1
        print(f"smtprelay: {e}", file=sys.stderr)
        return 1
    try:
        if workers > 1:
            return supervise(relay, servers, workers)
        if relay.metrics:
            relay.metrics.start()
        return serve(relay, servers, connection)
    except NoThread as e:
        event("cannot_start", reason=str(e))
        return 1
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def metrics_directory(user):
    """--workers with --metrics: where each worker's counts go (prometheus_client's
    multiprocess mode), a new directory that the workers can write as --user."""
    try:
        path = tempfile.mkdtemp(prefix="smtprelay-metrics-")
        if user:
            os.chown(path, user.pw_uid, user.pw_gid)
    except OSError as e:
        raise ConfigError("--metrics", f"with --workers, a directory for the workers' counts: {e}") from None
    return path


def log_config_error(error):
    """Under inetd a bad configuration is told to syslog, and the client hears 421, not the error."""
    logging.raiseExceptions = False
    with contextlib.suppress(ConfigError, OSError):
        handler = log_handler("stderr")
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.handlers[:] = [handler]
        event("config_error", reason=str(error))
        os.write(1, format_reply(*MISCONFIGURED))


if __name__ == "__main__":
    sys.exit(main())
