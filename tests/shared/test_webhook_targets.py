"""Where webhooks may go: address classes, the allowlist, URL shapes and resolved host names.

Private-range addresses here are only ever classified or looked up in a fake resolver: nothing is
sent to them.
"""

from __future__ import annotations

import pytest

from shared.settings import Settings
from shared.webhook_targets import (
    AllowedHost,
    TargetRefused,
    address_problem,
    check_target,
    check_url,
    parse_allowed_host,
    parse_allowed_hosts,
)


def resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return table[host]

    return resolve


class TestAddressClasses:
    @pytest.mark.parametrize(
        ("address", "problem"),
        [
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("100.64.0.1", "not globally routable"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "private"),
            ("192.0.2.1", "private"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "private"),
            ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
            ("::ffff:10.0.0.1", "private (IPv4-mapped 10.0.0.1)"),
            ("::ffff:169.254.169.254", "link-local (IPv4-mapped 169.254.169.254)"),
            ("64:ff9b::7f00:1", "loopback (embedded IPv4 127.0.0.1)"),
            ("64:ff9b::a9fe:a9fe", "link-local (embedded IPv4 169.254.169.254)"),
            ("2002:c0a8:0101::1", "private (embedded IPv4 192.168.1.1)"),
            ("::7f00:1", "reserved"),
            # NAT64 to a public address: Python counts the prefix as reserved; refused all the same.
            ("64:ff9b::808:808", "reserved"),
        ],
    )
    def test_non_public_addresses_are_named(self, address, problem):
        assert address_problem(address) == problem

    @pytest.mark.parametrize(
        "address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    )
    def test_public_addresses_pass(self, address):
        assert address_problem(address) is None


class TestAllowlistEntries:
    @pytest.mark.parametrize(
        ("entry", "expected"),
        [
            ("hooks.example.com", AllowedHost("hooks.example.com")),
            ("Hooks.Example.COM.", AllowedHost("hooks.example.com")),
            ("hooks.example.com:8443", AllowedHost("hooks.example.com", 8443)),
            ("127.0.0.1", AllowedHost("127.0.0.1")),
            ("127.0.0.1:9000", AllowedHost("127.0.0.1", 9000)),
            ("[::1]", AllowedHost("::1")),
            ("[::1]:9000", AllowedHost("::1", 9000)),
            ("::1", AllowedHost("::1")),
            ("[FD00:0::1]", AllowedHost("fd00::1")),
            ("*.example.com", AllowedHost("*.example.com")),
            ("*", AllowedHost("*")),
            ("*:443", AllowedHost("*", 443)),
        ],
    )
    def test_entries_parse(self, entry, expected):
        assert parse_allowed_host(entry) == expected

    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ("hooks.example.com:0", "port must be a number"),
            ("hooks.example.com:http", "port must be a number"),
            ("fd00::1:8443x", "brackets"),
            ("[::1", "closing"),
            ("*.10.0.0.1", "wildcard covers host names"),
            ("bad host", "not a valid host name"),
            ("127.1", "shorthand"),
        ],
    )
    def test_malformed_entries_are_refused(self, entry, message):
        with pytest.raises(ValueError, match=message):
            parse_allowed_host(entry)

    def test_settings_refuse_a_malformed_entry_at_start_up(self):
        with pytest.raises(ValueError, match="WEBHOOK_ALLOWED_HOSTS|webhook_allowed_hosts"):
            Settings(webhook_allowed_hosts="ok.example.com,bad host")
        settings = Settings(webhook_allowed_hosts="127.0.0.1, hooks.example.com:8443")
        assert settings.webhook_allowlist == (
            AllowedHost("127.0.0.1"),
            AllowedHost("hooks.example.com", 8443),
        )

    def test_matching(self):
        exact, port, wildcard = parse_allowed_hosts(["a.example.com", "b.example.com:8443", "*.example.org"])
        assert exact.matches("a.example.com", 80) and exact.matches("a.example.com", 9999)
        assert not exact.matches("x.a.example.com", 80)
        assert port.matches("b.example.com", 8443) and not port.matches("b.example.com", 443)
        assert wildcard.matches("hooks.example.org", 443) and wildcard.matches("a.b.example.org", 443)
        assert not wildcard.matches("example.org", 443) and not wildcard.matches("badexample.org", 443)


class TestUrlShape:
    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("ftp://hooks.example.com/x", "scheme must be http or https"),
            ("file:///etc/passwd", "scheme must be http or https"),
            ("hooks.example.com/x", "scheme must be http or https"),
            ("https://user:secret@hooks.example.com/x", "credentials"),
            ("https://token@hooks.example.com/x", "credentials"),
            ("https:///x", "no host"),
            ("https://hooks.example.com:99999/", "not a valid URL"),
            ("https://hooks.example.com:0/", "port 0"),
            ("https://hooks example.com/", "spaces or control characters"),
            ("http://2130706433/", "shorthand"),
            ("http://0x7f.1/", "shorthand"),
            ("http://127.1/", "shorthand"),
            ("http://[fe80::1%25eth0]:80/", "zone"),
            ("http://-bad-.example.com/", "not a valid host name"),
        ],
    )
    def test_refused_shapes(self, url, message):
        with pytest.raises(TargetRefused, match=message):
            check_url(url)

    def test_accepted_shapes_are_normalised(self):
        assert check_url("HTTPS://Hooks.Example.com./in?x=1") == ("https", "hooks.example.com", 443)
        assert check_url("http://[::1]:8080/") == ("http", "::1", 8080)
        assert check_url("http://127.0.0.1/") == ("http", "127.0.0.1", 80)
        assert check_url("https://bücher.example/") == ("https", "xn--bcher-kva.example", 443)


class TestCheckTarget:
    def test_nothing_is_allowed_without_an_allowlist(self):
        with pytest.raises(TargetRefused, match="webhooks are off"):
            check_target("https://hooks.example.com/", [])

    def test_an_unlisted_loopback_address_is_refused(self):
        allowed = parse_allowed_hosts(["127.0.0.1"])
        assert check_target("http://127.0.0.1:8123/h", allowed).address == "127.0.0.1"
        with pytest.raises(TargetRefused, match=r"127\.0\.0\.2:8123 is not on the operator's allowlist"):
            check_target("http://127.0.0.2:8123/h", allowed)

    def test_a_port_in_the_entry_binds(self):
        allowed = parse_allowed_hosts(["127.0.0.1:9000"])
        assert check_target("http://127.0.0.1:9000/", allowed).port == 9000
        with pytest.raises(TargetRefused, match="not on the operator's allowlist"):
            check_target("http://127.0.0.1:9001/", allowed)

    def test_a_listed_name_may_resolve_to_a_private_address(self):
        resolve = resolver({"hooks.internal": ["10.0.0.7"]})
        target = check_target(
            "https://hooks.internal/x", parse_allowed_hosts(["hooks.internal"]), resolve=resolve
        )
        assert (target.host, target.port, target.address, target.listed) == (
            "hooks.internal",
            443,
            "10.0.0.7",
            True,
        )

    @pytest.mark.parametrize(
        ("addresses", "problem"),
        [
            (["10.0.0.7"], "a private address"),
            (["127.0.0.1"], "a loopback address"),
            (["169.254.169.254"], "a link-local address"),
            (["::1"], "a loopback address"),
            (["fe80::1"], "a link-local address"),
            (["::ffff:127.0.0.1"], r"a loopback \(IPv4-mapped 127\.0\.0\.1\) address"),
            (["93.184.215.14", "192.168.0.5"], "a private address"),
        ],
    )
    def test_a_name_allowed_through_a_wildcard_must_resolve_to_public_addresses(self, addresses, problem):
        resolve = resolver({"hooks.example.com": addresses})
        for allowlist in (["*.example.com"], ["*"]):
            with pytest.raises(TargetRefused, match=problem):
                check_target("https://hooks.example.com/x", parse_allowed_hosts(allowlist), resolve=resolve)

    def test_a_wildcard_never_allows_a_non_public_literal(self):
        with pytest.raises(TargetRefused, match="a loopback address"):
            check_target("http://127.0.0.1:8080/", parse_allowed_hosts(["*"]))
        with pytest.raises(TargetRefused, match="a private address"):
            check_target("http://[fd00::1]:8080/", parse_allowed_hosts(["*"]))

    def test_public_names_through_a_wildcard(self):
        resolve = resolver({"hooks.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
        target = check_target(
            "https://hooks.example.com/x", parse_allowed_hosts(["*.example.com"]), resolve=resolve
        )
        assert (target.address, target.listed) == ("93.184.215.14", False)

    def test_a_name_that_does_not_resolve(self):
        with pytest.raises(TargetRefused, match="does not resolve"):
            check_target(
                "https://gone.example.com/", parse_allowed_hosts(["gone.example.com"]), resolve=resolver({})
            )

    def test_no_listing_makes_unspecified_or_multicast_reachable(self):
        resolve = resolver({"odd.internal": ["0.0.0.0"]})
        with pytest.raises(TargetRefused, match="no request can be sent"):
            check_target("http://odd.internal/", parse_allowed_hosts(["odd.internal"]), resolve=resolve)
