"""The parsers and formatters on their own, beside the end-to-end tests that use them:
the PROXY protocol's v1 line (haproxy's proxy-protocol.txt), XCLIENT's arguments
(Postfix's XCLIENT_README), certificate names (RFC 2253), folded header fields
(RFC 5322 §2.2.3) and the quoting of stdout: frame lines (README)."""
import pytest

import smtprelay
from smtprelay import ProxyHeaderError, folded, parse_proxy_v1, quote_frame_lines, rfc2253, xclient_arguments


# --- PROXY v1 -------------------------------------------------------------------------------

def test_proxy_v1_gives_the_source_address_and_port():
    assert parse_proxy_v1("PROXY TCP4 192.0.2.7 198.51.100.1 40001 25") == ("192.0.2.7", 40001)
    assert parse_proxy_v1("PROXY TCP6 2001:db8::7 2001:db8::1 40001 25") == ("2001:db8::7", 40001)


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
