"""The parsers and formatters on their own, beside the end-to-end tests that use them:
the PROXY protocol's v1 line and v2 block (haproxy's proxy-protocol.txt), XCLIENT's
arguments and xtext (Postfix's XCLIENT_README, RFC 3461 §4), MAIL and RCPT paths
(RFC 5321 §4.1.2), replies (RFC 5321 §4.2), AUTH responses (RFC 4954 §4), what
goes to the auth service and what comes back (nginx's ngx_mail_auth_http_module),
option values (README, Configuration), the log's escaping, dot-stuffing and bare
newlines in message data (RFC 5321 §4.5.2), certificate names (RFC 2253), folded
header fields (RFC 5322 §2.2.3) and the quoting of stdout: frame lines (README)."""
import ipaddress
import socket
import struct
import time

import pytest

import smtprelay
from smtprelay import (BARE_BREAK, LINE_START, AuthService, AuthServiceError, ConfigError, ProxyHeaderError,
                       SMTPError, auth_wait, decode_auth_response, escape_auth_value, folded, format_reply,
                       header_value, is_host, mask_secrets, normalize_newlines, parse_address, parse_header,
                       parse_network, parse_path, parse_proxy_v1, parse_proxy_v2, printable, quote_frame_lines,
                       restuff, rfc2253, unstuff, unstuffed_size, xclient_arguments, xtext)


# --- PROXY v1 -------------------------------------------------------------------------------

def test_proxy_v1_gives_the_source_and_destination_addresses_and_ports():
    assert parse_proxy_v1("PROXY TCP4 192.0.2.7 198.51.100.1 40001 25") == ("192.0.2.7", 40001, "198.51.100.1", 25)
    assert parse_proxy_v1("PROXY TCP6 2001:db8::7 2001:db8::1 40001 25") == ("2001:db8::7", 40001, "2001:db8::1", 25)


def test_proxy_v1_unknown_names_no_client():
    assert parse_proxy_v1("PROXY UNKNOWN") is None
    assert parse_proxy_v1("PROXY UNKNOWN ffff::1 ffff::2 1 2") is None


@pytest.mark.parametrize("line", [
    "PROXY TCP4 192.0.2.7 198.51.100.1 40001",                # a field short
    "PROXY TCP4 2001:db8::7 198.51.100.1 40001 25",           # family and address disagree
    "PROXY TCP6 192.0.2.7 198.51.100.1 40001 25",
    "PROXY TCP4 192.0.2.7 198.51.100.1 70000 25",             # port out of range
    "PROXY TCP4 192.0.2.7 198.51.100.1 4x 25",
    "PROXY UDP4 192.0.2.7 198.51.100.1 40001 25",
    "PROXY TCP4 192.0.2.7  198.51.100.1 40001 25",            # two spaces
])
def test_proxy_v1_refuses_a_malformed_line(line):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_v1(line)


# --- PROXY v2 -------------------------------------------------------------------------------

def proxy_v2(command, family, body):
    """A v2 header's first 16 bytes (signature, version and command, family, length) and the rest."""
    return smtprelay.PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)), body


def read_v2(head, rest):
    """parse_proxy_v2 with `rest` to read from a socket, as the relay reads it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(rest)
        theirs.shutdown(socket.SHUT_WR)         # all there is: a header cut short ends here
        return parse_proxy_v2(head, smtprelay.Wire(ours), time.monotonic() + 2)


def test_proxy_v2_proxy_gives_the_source_and_destination_addresses_and_ports_skipping_tlvs():
    ipv4 = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack("!HH", 40001, 25) + b"\x04\x00\x00"  # a NOOP TLV
    assert read_v2(*proxy_v2(1, 0x11, ipv4)) == ("192.0.2.7", 40001, "198.51.100.1", 25)
    ipv6 = (ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("2001:db8::1").packed
            + struct.pack("!HH", 40002, 587))
    assert read_v2(*proxy_v2(1, 0x21, ipv6)) == ("2001:db8::7", 40002, "2001:db8::1", 587)


def test_proxy_v2_local_and_unspec_name_no_client():
    assert read_v2(*proxy_v2(0, 0x11, bytes(12))) is None         # LOCAL: the proxy's own health check
    assert read_v2(*proxy_v2(1, 0x00, b"")) is None                # UNSPEC: the connection's own peer


@pytest.mark.parametrize("head, body", [
    (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"[:16].replace(b"Q", b"X"), bytes(12)),   # not the signature
    (smtprelay.PROXY_V2_SIGNATURE + b"\x11\x11\x00\x0c", bytes(12)),                         # version 1
    (smtprelay.PROXY_V2_SIGNATURE + b"\x22\x11\x00\x0c", bytes(12)),                         # command 2
    (smtprelay.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x08", bytes(8)),                          # addresses cut short
    (smtprelay.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x0c", bytes(4)),                          # the peer stops early
], ids=["signature", "version", "command", "short-addresses", "closed-early"])
def test_proxy_v2_refuses_a_malformed_header(head, body):
    with pytest.raises(ProxyHeaderError):
        read_v2(head, body)


# --- PROXY out: the header the relay sends a back-end, read back by the relay's own parsers -------

def client_at(ip, port, local):
    return smtprelay.Client("test", ip, port, local=local)


@pytest.mark.parametrize("ip, local", [("192.0.2.7", ("198.51.100.1", 25)), ("2001:db8::7", ("2001:db8::1", 25)),
                                       ("2001:db8::7", ("198.51.100.1", 25)),       # v6 client, v4 listener
                                       ("192.0.2.7", ("::ffff:198.51.100.1", 25))])  # dual-stack listener
def test_the_proxy_header_out_names_the_client_in_v1_and_v2(ip, local):
    client = client_at(ip, 40001, local)
    v1 = smtprelay.proxy_header("v1", client)
    assert v1.endswith(b"\r\n") and len(v1) <= smtprelay.PROXY_V1_LIMIT
    assert parse_proxy_v1(v1[:-2].decode())[:2] == (ip, 40001)
    v2 = smtprelay.proxy_header("v2", client)
    assert read_v2(v2[:16], v2[16:])[:2] == (ip, 40001)


def test_the_proxy_header_out_for_a_client_without_an_address_names_none():
    client = client_at(None, None, None)
    assert smtprelay.proxy_header("v1", client) == b"PROXY UNKNOWN\r\n"
    v2 = smtprelay.proxy_header("v2", client)
    assert v2 == smtprelay.PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00" and read_v2(v2[:16], v2[16:]) is None


# --- XCLIENT ------------------------------------------------------------------------------

def client(ip="192.0.2.7", port=40001, helo="client.example", names=("mx.example", "mx.example"), esmtp=True):
    lookup = smtprelay.NameLookup(ip or "192.0.2.1", wanted_until=0)
    lookup.found(names)
    return smtprelay.Client("test", ip, port, smtprelay.ClientNames(lookup, deadline=0), helo, esmtp)


def arguments(session, wanted=("ADDR", "PORT", "NAME", "REVERSE_NAME", "HELO", "PROTO", "LOGIN"), login=None):
    return dict(pair.split("=", 1) for pair in xclient_arguments(session, wanted, login).split())


def test_xclient_sends_every_attribute_wanted_and_only_those():
    assert arguments(client(), login="bob") == {"ADDR": "192.0.2.7", "PORT": "40001", "NAME": "mx.example",
                                                "REVERSE_NAME": "mx.example", "HELO": "client.example",
                                                "PROTO": "ESMTP", "LOGIN": "bob"}
    assert arguments(client(), wanted=("ADDR", "HELO")) == {"ADDR": "192.0.2.7", "HELO": "client.example"}


def test_xclient_writes_ipv6_as_postfix_reads_it_and_a_client_without_address_as_unavailable():
    assert arguments(client("2001:db8::7"))["ADDR"] == "IPV6:2001:db8::7"
    unknown = arguments(client(None, None, names=(smtprelay.UNAVAILABLE,) * 2))
    assert unknown["ADDR"] == unknown["PORT"] == unknown["NAME"] == "[UNAVAILABLE]"


def test_xclient_values_are_xtext_and_a_login_too_long_is_left_out():
    assert arguments(client(), login="a b+c=d")["LOGIN"] == "a+20b+2Bc+3Dd"
    assert "LOGIN" not in arguments(client(), login="x" * 300)


def test_xclient_line_stays_within_512_octets_names_giving_way_first():
    long_name = ("a" * 60 + ".") * 4 + "example"          # 251 octets: each fits, all together do not
    session = client(helo="h" * 200, names=(long_name, long_name))
    line = "XCLIENT " + xclient_arguments(session, ("ADDR", "NAME", "REVERSE_NAME", "HELO", "LOGIN"), "bob")
    assert len(line) + 2 <= 512
    assert arguments(session, ("ADDR", "NAME", "REVERSE_NAME", "HELO"))["REVERSE_NAME"] == "[UNAVAILABLE]"


# --- Certificate names ---------------------------------------------------------------------

def test_rfc2253_names_most_specific_first_with_specials_escaped():
    name = ((("countryName", "DE"),), (("organizationName", "Example, Inc."),), (("commonName", " #client+1 "),))
    assert rfc2253(name) == r"CN=\ #client\+1\ ,O=Example\, Inc.,C=DE"     # §2.4: a space at either end
    assert rfc2253(((("commonName", "#hash"),),)) == r"CN=\#hash"          # §2.4: a leading "#"


def test_rfc2253_keeps_a_multi_valued_rdn_together():
    name = ((("organizationalUnitName", "Mail"), ("commonName", "relay")),)
    assert rfc2253(name) == "OU=Mail+CN=relay"


# --- Capture headers and frames ------------------------------------------------------------

def test_folded_fields_keep_every_line_within_78_where_an_item_allows_and_lose_nothing():
    items = [f"<r{n:03d}@example.net>" for n in range(200)]
    field = folded("X-Envelope-To", items)
    lines = field.split("\n")
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])            # continuation lines (RFC 5322 §2.2.3)
    assert "".join(lines).replace(",", " ").split()[1:] == items


def test_folded_puts_a_long_item_on_a_line_of_its_own():
    field = folded("X-Envelope-To", ["<a@b>", "<" + "x" * 200 + "@example.net>", "<c@d>"])
    assert field.split("\n") == ["X-Envelope-To: <a@b>,", " <" + "x" * 200 + "@example.net>,", " <c@d>"]


@pytest.mark.parametrize("text, at_line_start, quoted", [
    (b"---------- MESSAGE FOLLOWS ----------\n", True, b">---------- MESSAGE FOLLOWS ----------\n"),
    (b"x\n>>------------ END MESSAGE ------------\n", True, b"x\n>>>------------ END MESSAGE ------------\n"),
    (b"------------ END MESSAGE ------------\n", False, b"------------ END MESSAGE ------------\n"),
    (b"-- signature\n---------- message follows\n", True, b"-- signature\n---------- message follows\n"),
])
def test_frame_lines_in_a_body_get_one_more_quote(text, at_line_start, quoted):
    assert quote_frame_lines(text, at_line_start) == quoted


# --- MAIL and RCPT paths ----------------------------------------------------------------------

def test_a_path_gives_the_address_and_its_parameters_upper_cased():
    assert parse_path("<a@example.org> size=100 BODY=8BITMIME SMTPUTF8") == \
        ("a@example.org", {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None})
    assert parse_path("<b@example.net>") == ("b@example.net", {})


def test_a_path_may_be_empty_unbracketed_spaced_or_source_routed_as_postfix_takes_them():
    assert parse_path("<>") == ("", {})
    assert parse_path("postmaster") == ("postmaster", {})
    assert parse_path(" <a@example.org>") == ("a@example.org", {})
    assert parse_path("<@relay.example:b@example.net>") == ("b@example.net", {})
    assert parse_path('<"a>b"@d.example>') == ('"a>b"@d.example', {})


@pytest.mark.parametrize("arg, reply", [
    ("<a@example.org", "5.1.7 Bad address syntax: missing >"),
    ("", "5.1.7 Bad address syntax: no address"),
    ("<@relay.example>", "5.1.7 Bad address syntax: bad source route"),
    ("<a@example.org>SIZE=1", "5.5.4 Bad syntax after the address"),
    ("<a@@example.org>", "5.1.3 Bad address syntax"),
    ("<a@example.org> SIZE=1 size=2", "5.5.4 Bad parameter 'size=2'"),
    ("<a@example.org> SIZE=", "5.5.4 Bad parameter 'SIZE='"),
])
def test_a_bad_path_is_a_501_saying_what_is_wrong(arg, reply):
    with pytest.raises(SMTPError) as refused:
        parse_path(arg)
    assert refused.value.args == (501, reply)


def test_a_path_is_taken_past_rfc_5321s_256_octets_up_to_900_counted_as_the_log_writes_it():
    # 900: what one header line of the captured mail holds (RFC 5322 §2.1.1: 998 octets).
    long = f"{'a' * 64}@{'b' * 831}.org"
    assert len(long) == smtprelay.PATH_LIMIT == 900
    assert parse_path(f"<{long}>") == (long, {})
    for too_long in [f"a{long}", f'"{chr(0x85) * 300}"@example.org']:     # 901; 300 C1 escaped as \\x85
        with pytest.raises(SMTPError) as refused:
            parse_path(f"<{too_long}>")
        assert refused.value.args == (501, "5.1.3 Path too long")


# --- Replies, and the log ---------------------------------------------------------------------

def test_a_reply_is_one_line_or_continuation_lines_then_the_last():
    assert format_reply(250, "2.0.0 Ok") == b"250 2.0.0 Ok\r\n"
    assert format_reply(250, "mx.test\nPIPELINING\r\nSIZE 100") == b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n"


def test_a_reply_without_text_has_no_trailing_space_but_an_empty_auth_challenge_keeps_it():
    assert format_reply(250, "") == b"250\r\n"
    assert format_reply(334, "") == b"334 \r\n"


def test_printable_escapes_control_characters_c1_and_undecodable_bytes_for_one_log_line():
    assert printable("a\x1b[31mb\x85c\x7fd\r\n") == "a\\x1b[31mb\\x85c\\x7fd\\x0d\\x0a"
    assert printable(b"a\xffb\x00") == "a\\xffb\\x00"
    assert printable("caf\u00e9 \u4e2d") == "caf\u00e9 \u4e2d"


def test_mask_secrets_hides_auth_data_and_what_looks_like_base64_only():
    assert mask_secrets(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==") == b"AUTH PLAIN ****"
    assert mask_secrets(b"dXNlcm5hbWU=") == b"****"
    assert mask_secrets(b"NOOP") == b"NOOP"
    assert mask_secrets(b"AUTH LOGIN") == b"AUTH LOGIN"


# --- AUTH responses ---------------------------------------------------------------------------

def test_an_auth_response_is_base64_and_a_lone_equals_sign_is_empty():
    assert decode_auth_response(b"AGFsaWNlAHNlY3JldA==") == b"\0alice\0secret"
    assert decode_auth_response(b"=") == b""


@pytest.mark.parametrize("line, reply", [(b"*", "5.7.0 Authentication cancelled"),
                                         (b"not base64!", "5.5.2 Cannot decode base64 response")])
def test_an_auth_response_that_is_a_star_or_no_base64_is_a_501(line, reply):
    with pytest.raises(SMTPError) as refused:
        decode_auth_response(line)
    assert refused.value.args == (501, reply)


# --- The auth service: what goes there, what comes back --------------------------------------

def test_auth_user_and_password_are_escaped_as_nginx_does_controls_space_and_percent():
    assert escape_auth_value("al ice%\x7f\x85\u00e9") == b"al%20ice%25%7F%C2%85\xc3\xa9"
    assert escape_auth_value("alice") == b"alice"


def test_a_header_value_from_the_client_loses_every_control_character():
    assert header_value("a\x00b\x85c\r\nd\x7f") == b"abcd"
    assert header_value("caf\u00e9") == "caf\u00e9".encode()


def test_an_ok_answer_names_the_back_end_and_its_credentials():
    answer = AuthService.read_answer({"Auth-Status": "OK", "Auth-Server": "[192.0.2.25]", "Auth-Port": "2525",
                                      "Auth-User": "relay", "Auth-Pass": "s3cret"})
    assert answer.ok and str(answer.backend) == "192.0.2.25:2525"
    assert (answer.user, answer.password) == ("relay", "s3cret")
    assert AuthService.read_answer({"Auth-Server": "mx.example", "Auth-Port": "25"}).ok     # no status: OK


def test_a_refusal_gives_its_text_its_error_code_and_its_wait():
    answer = AuthService.read_answer({"Auth-Status": "Invalid login\x07", "Auth-Error-Code": "535 5.7.8",
                                      "Auth-Wait": "3"})
    assert not answer.ok and answer.backend is None
    assert (answer.text, answer.error_code, answer.wait) == ("Invalid login", (535, "5.7.8"), 3)
    assert AuthService.read_answer({"Auth-Status": "No", "Auth-Error-Code": "250 2.0.0"}).error_code is None


@pytest.mark.parametrize("headers, why", [
    ({"Auth-Status": "OK", "Auth-Port": "25"}, "did not send server or port"),
    ({"Auth-Status": "OK", "Auth-Server": "192.0.2.25"}, "did not send server or port"),
    ({"Auth-Server": "192.0.2.25", "Auth-Port": "0"}, "sent a bad Auth-Port '0'"),
    ({"Auth-Server": "192.0.2.25", "Auth-Port": "65536"}, "sent a bad Auth-Port '65536'"),
    ({"Auth-Server": "bad host", "Auth-Port": "25"}, "sent a bad Auth-Server 'bad host'"),
])
def test_an_ok_answer_without_a_usable_server_and_port_is_the_services_error(headers, why):
    with pytest.raises(AuthServiceError, match=f"^{why}$"):
        AuthService.read_answer(headers)


def test_auth_wait_is_whole_seconds_capped_and_zero_when_absent_or_no_number():
    assert auth_wait({"Auth-Wait": " 5 "}) == 5
    assert auth_wait({}) == auth_wait({"Auth-Wait": "soon"}) == auth_wait({"Auth-Wait": "-1"}) == 0
    assert auth_wait({"Auth-Wait": "99999"}) == smtprelay.AUTH_WAIT_MAX < 99999


# --- Option values ----------------------------------------------------------------------------

def test_an_address_is_host_and_port_brackets_around_ipv6_and_a_port_alone_means_every_address():
    assert parse_address("--listen", "127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_address("--listen", "[::1]:25") == ("::1", 25)
    assert parse_address("--listen", "25") == ("", 25)
    assert parse_address("--backend", "mx.example", default_port=25) == ("mx.example", 25)


@pytest.mark.parametrize("text, why", [
    ("::1:25", "write IPv6 addresses as [ADDR]:PORT"),
    ("[::1]", "no port"),
    ("[zz]:25", "'zz' is not an IPv6 address"),
    ("[::1]x:25", "bad IPv6 address, use [ADDR]:PORT"),
    ("mx.example:70000", "port out of range"),
    ("mx.example:smtp", "port is not a number"),
    ("bad host:25", "bad host name"),
])
def test_a_bad_address_is_a_configuration_error_naming_option_and_why(text, why):
    with pytest.raises(ConfigError) as error:
        parse_address("--listen", text)
    assert str(error.value) == f"--listen: {text!r}: {why}"


def test_an_auth_http_header_is_a_name_and_a_value_without_controls():
    assert parse_header("X-Relay:  mx1 ") == ("X-Relay", "mx1")
    for text in ["X Relay: a", "no colon", "X-Relay: a\x01b", ": a"]:
        with pytest.raises(ConfigError, match="^--auth-http-header: "):
            parse_header(text)


def test_a_network_is_an_address_or_a_cidr_with_host_bits_allowed():
    assert parse_network("192.0.2.7/24") == ipaddress.ip_network("192.0.2.0/24")
    assert parse_network(" ::1 ") == ipaddress.ip_network("::1/128")
    with pytest.raises(ConfigError, match="^--real-ip-from: '300.1.1.1': not an address or CIDR network$"):
        parse_network("300.1.1.1", "--real-ip-from")


@pytest.mark.parametrize("text, host", [
    ("192.0.2.7", True), ("2001:db8::1", True), ("mx.example", True), ("mx.example.", True), ("a_b-c", True),
    ("a..b", False), ("a" * 64, False), ("a b", False), ("", False), (".".join(["a" * 63] * 4), False),
])
def test_is_host_takes_addresses_and_names_of_labels_of_1_to_63_characters(text, host):
    assert is_host(text) is host


def test_a_backend_is_a_smtp_host_and_port_a_maildir_or_standard_output(tmp_path):
    assert smtprelay.parse_backend("mx.example") == smtprelay.BackendSpec("smtp", "mx.example", 25)
    assert str(smtprelay.parse_backend("[2001:db8::1]:2525")) == "[2001:db8::1]:2525"
    maildir = smtprelay.parse_backend(f"maildir:{tmp_path}/new/mail")
    assert (maildir.kind, maildir.path, str(maildir)) == ("maildir", f"{tmp_path}/new/mail", f"maildir:{tmp_path}/new/mail")
    assert smtprelay.parse_backend("stdout:").kind == "stdout"
    for text, why in [("stdout:x", "stdout: takes nothing"), ("maildir:", "no path"), (":25", "no host"),
                      ("mx.example:0", "port 0")]:
        with pytest.raises(ConfigError, match=f"^--backend: .*{why}"):
            smtprelay.parse_backend(text)


def test_auth_methods_come_in_ehlos_order_and_only_the_known_ones():
    assert smtprelay.parse_auth_methods("LOGIN, plain,none") == ["none", "plain", "login"]
    for text in ["", " , ", "plain,gssapi"]:
        with pytest.raises(ConfigError, match="^--auth: "):
            smtprelay.parse_auth_methods(text)


def test_an_auth_service_url_is_http_or_https_with_a_host_and_a_good_port():
    assert smtprelay.parse_auth_http("https://auth.example:8443/auth") == "https://auth.example:8443/auth"
    for text in ["ftp://auth.example/", "http:///auth", "http://auth.example:99999/"]:
        with pytest.raises(ConfigError, match="^--auth-http: "):
            smtprelay.parse_auth_http(text)


def test_backend_auth_is_user_colon_password_the_password_may_hold_colons():
    assert smtprelay.parse_backend_auth("--backend-auth", "relay:s3:cret") == ("relay", "s3:cret")
    for text in ["relay", ":pw"]:
        with pytest.raises(ConfigError, match="^--backend-auth: write USER:PASSWORD$"):
            smtprelay.parse_backend_auth("--backend-auth", text)


def test_a_server_name_is_one_word_of_printable_ascii_and_a_regex_any_case():
    assert smtprelay.parse_server_name("--server-name", "mx.example") == "mx.example"
    for text in ["mx example", "mx\x01", "caf\u00e9"]:
        with pytest.raises(ConfigError, match="^--server-name: .*one word of printable ASCII$"):
            smtprelay.parse_server_name("--server-name", text)
    assert smtprelay.parse_regex("--allow-sender", r".*@example\.org").fullmatch("A@EXAMPLE.ORG")
    with pytest.raises(ConfigError, match="^--allow-sender: '\\(': "):
        smtprelay.parse_regex("--allow-sender", "(")


def test_a_setting_reads_its_choices_from_its_metavar_and_each_of_an_appended_list():
    [balance] = [s for s in smtprelay.SETTINGS if s.flag == "--balance"]
    assert balance.value("leastconn") == "leastconn"
    with pytest.raises(ConfigError, match="^--balance: 'random': must be one of first, roundrobin, leastconn$"):
        balance.value("random")
    [listen] = [s for s in smtprelay.SETTINGS if s.flag == "--listen"]
    assert listen.value(["25", "[::1]:2525"]) == [("", 25), ("::1", 2525)] and listen.value(None) == []
    assert {s.dest for s in smtprelay.SETTINGS} == set(smtprelay.Config.__dataclass_fields__)


def test_every_verb_declares_its_syntax_for_help_and_its_501():
    verbs = [name for name in dir(smtprelay.Session) if name.startswith("smtp_")]
    assert len(verbs) == 13
    for name in verbs:
        assert getattr(smtprelay.Session, name).syntax.startswith(name[5:]), name


# --- xtext ------------------------------------------------------------------------------------

def test_xtext_encodes_plus_equals_space_controls_and_non_ascii_as_hex_of_their_utf8():
    assert xtext("a=b+c d\u00e9\x01") == "a+3Db+2Bc+20d+C3+A9+01"
    assert xtext("client.example[]") == "client.example[]"


# --- Message data: dot-stuffing and bare newlines ---------------------------------------------

def test_bare_newlines_become_crlf_and_a_line_after_one_gets_its_dot_doubled():
    assert normalize_newlines(b"a\nb\r.c\r\nd", LINE_START) == b"a\r\nb\r\n..c\r\nd"
    assert normalize_newlines(b".c\r\n", BARE_BREAK) == b"..c\r\n"


def test_a_lone_stuffed_dot_ended_by_a_bare_newline_becomes_an_empty_line_not_the_end_of_data():
    assert normalize_newlines(b".\n", LINE_START) == b"\r\n"
    assert restuff(b".", LINE_START, True) == b""
    assert restuff(b".", LINE_START, False) == b"."
    assert restuff(b".x", BARE_BREAK, False) == b"..x"
    assert restuff(b".x", LINE_START, False) == b".x"


def test_unstuff_drops_the_dot_that_quotes_each_line_and_unstuffed_size_counts_without_it():
    assert unstuff(b"..a\r\n..b\r\nc.d", True) == b".a\r\n.b\r\nc.d"
    assert unstuff(b".a\r\n", False) == b".a\r\n"           # mid-line: that dot is data
    assert unstuffed_size(b"..a\r\n..b\r\n", True) == len(b".a\r\n.b\r\n")
    assert unstuffed_size(b".a", False) == 2
