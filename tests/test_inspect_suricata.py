"""Signature semantics held to Suricata's: address and port negation, payload keywords on
packets without payload, rule validation, keywords that are honoured or refused, and the sids
`microseg inspect --json` reports. Each test's docstring names the Suricata behaviour (its rule
documentation at docs.suricata.io, "Rules" chapter) the expected values come from."""

import json

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from microseg.cli import main
from microseg.ctstate import ESTABLISHED, TRACKED
from microseg.errors import InputError
from microseg.io.pcap import write_pcap
from microseg.offload import inspect as I
from microseg.packet.batch import Batch
from microseg.packet.parse import parse

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def pkt(src, dst, l4=None, payload=b""):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    l4 = TCP(sport=40000, dport=80, flags="PA") if l4 is None else l4
    return bytes(ETH / ip / l4 / payload)


def verdicts(rules, pkts, variables=None):
    """(verdict, sid) per packet, every packet inspected on its own as ESTABLISHED."""
    s = I.SignatureSet.from_text(rules, variables=variables)
    b = Batch.from_packets(pkts)
    fk = parse(b)
    r = s.inspect(b, fk, None, np.full(len(pkts), TRACKED | ESTABLISHED, np.uint8))
    return [(int(r.verdict[i]), int(r.sid[i])) for i in range(len(pkts))]


def matched(rule, pkts, variables=None):
    return [v != I.NONE for v, _ in verdicts(rule, pkts, variables)]


def rejected(rule) -> str:
    with pytest.raises(InputError) as ei:
        I.SignatureSet.from_text(rule, path="t.rules")
    msg = str(ei.value)
    assert msg.startswith("t.rules:1: "), msg
    return msg


# ------------------------------------------------------------------ 1. address negation -----
def test_negated_address_stays_in_its_family():
    """Suricata's address syntax ("Rules format" page, source and destination): ``!1.2.3.4``
    means any IPv4 address except 1.2.3.4. Suricata parses addresses into an IPv4 and an IPv6
    part, and a negation only removes addresses from its own family's part; a family with
    negations but no positive address starts from the whole family (0.0.0.0/0), a family with
    neither stays empty -- so ``!1.2.3.4`` does not match IPv6 packets."""
    rule = "alert tcp !1.2.3.4 any -> any any (sid:1;)"
    pkts = [
        pkt("2001:db8::1", "2001:db8::2"),
        pkt("5.6.7.8", "9.9.9.9"),
        pkt("1.2.3.4", "9.9.9.9"),
    ]
    assert matched(rule, pkts) == [False, True, False]


def test_external_net_does_not_match_ipv6():
    """``$EXTERNAL_NET`` is ``!$HOME_NET`` in Suricata's stock suricata.yaml; with an IPv4-only
    HOME_NET it is every IPv4 address outside HOME_NET, and no IPv6 address (the negated
    variable only has IPv4 blocks, see the negation rule above)."""
    rule = "alert tcp $EXTERNAL_NET any -> any any (sid:1;)"
    pkts = [pkt("2001:db8::1", "2001:db8::2"), pkt("8.8.8.8", "10.0.0.1"), pkt("10.1.1.1", "8.8.8.8")]
    assert matched(rule, pkts) == [False, True, False]
    # an IPv6 HOME_NET part makes EXTERNAL_NET cover the rest of IPv6 too
    v = {"HOME_NET": "[10.0.0.0/8,2001:db8::/32]"}
    pkts6 = [pkt("2001:db8::1", "2001:db8::2"), pkt("2001:db9::1", "2001:db8::2")]
    assert matched(rule, pkts6, v) == [False, True]


def test_negation_in_a_list_with_positives_of_the_other_family():
    """``[2001:db8::2,!10.0.0.0/30]``: the IPv6 part is 2001:db8::2; the IPv4 part has only a
    negation, so it is 0.0.0.0/0 minus 10.0.0.0/30 (Suricata's merge of positive and negated
    blocks, per family). 10.0.0.1 lies inside 10.0.0.0/30: not matched; 10.0.0.5 is."""
    rule = "alert tcp [2001:db8::2,!10.0.0.0/30] any -> any any (sid:1;)"
    pkts = [
        pkt("2001:db8::2", "2001:db8::9"),
        pkt("2001:db8::3", "2001:db8::9"),
        pkt("10.0.0.5", "9.9.9.9"),
        pkt("10.0.0.1", "9.9.9.9"),
    ]
    assert matched(rule, pkts) == [True, False, True, False]


def test_negated_list_and_nested_lists():
    """A negated list ``![...]`` is resolved first (its positives minus its negations), then
    negated as a whole, as Suricata does for a negated address block; lists inside a plain list
    just add their items."""
    rule = "alert tcp ![1.0.0.0/8,!1.2.0.0/16] any -> any any (sid:1;)"
    pkts = [
        pkt("1.2.3.4", "9.9.9.9"),
        pkt("1.3.0.1", "9.9.9.9"),
        pkt("9.9.9.9", "1.1.1.1"),
        pkt("2001:db8::1", "2001:db8::2"),
    ]
    assert matched(rule, pkts) == [True, False, True, False]
    rule = "alert tcp [1.0.0.0/8,[!1.2.0.0/16]] any -> any any (sid:1;)"
    assert matched(rule, pkts) == [False, True, False, False]


def test_addresses_that_match_nothing_are_errors():
    """Suricata refuses a rule whose address negates the complete IP space ("Complete IP space
    negated", e.g. ``!any``) or where nothing is left after merging ("no addresses left after
    merging addresses and negated addresses")."""
    assert "'!any' matches nothing" in rejected("alert tcp !any any -> any any (sid:1;)")
    msg = rejected("alert tcp [1.2.3.4,!1.2.3.4] any -> any any (sid:1;)")
    assert "no addresses left" in msg
    assert "complete IPv4 address space" in rejected("alert tcp !0.0.0.0/0 any -> any any (sid:1;)")
    assert "double negation" in rejected("alert tcp !!1.2.3.4 any -> any any (sid:1;)")


def test_deep_nesting_is_an_error_not_a_traceback():
    """Suricata stops address and port parsing at 64 levels of recursion ("address block
    recursion limit reached (max 64)"); here too, with an error rather than a crash, for lists
    and for chains of variables."""
    deep = "[" * 70 + "1.2.3.4" + "]" * 70
    assert "nested more than 64 deep" in rejected(f"alert tcp {deep} any -> any any (sid:1;)")
    assert "nested more than 64 deep" in rejected(
        f"alert tcp any {deep.replace('1.2.3.4', '80')} -> any any (sid:1;)"
    )
    chain = {f"V{i}": f"[$V{i + 1}]" for i in range(3000)}
    with pytest.raises(InputError, match="nested too deep"):
        I.SignatureSet.from_text(
            "alert tcp $V0 any -> any any (sid:1;)", variables={**chain, "V3000": "1.2.3.4"}
        )
    with pytest.raises(InputError, match="nested too deep"):
        I.SignatureSet.from_text("alert tcp any $V0 -> any any (sid:1;)", variables={**chain, "V3000": "80"})


# ------------------------------------------------------------------ ports -------------------
def test_port_lists_with_exclusions():
    """Port syntax ("Rules format" page, ports): ``[1:100,!50]`` is 1 to 100 except 50;
    ``[!50]`` or ``!50`` any port but 50; ``![80,443]`` any port but 80 and 443."""
    for spec, inside, outside in [
        ("[1:100,!50]", [1, 49, 51, 100], [0, 50, 101]),
        ("[!50]", [0, 49, 51, 65535], [50]),
        ("![80,443]", [1, 81, 442, 444], [80, 443]),
        ("[1000:,!2000:3000]", [1000, 1999, 3001, 65535], [999, 2000, 3000]),
    ]:
        s = I.parse_rule(f"alert tcp any any -> any {spec} (sid:1;)")
        assert [I.port_in(p, s.dport) for p in inside] == [True] * len(inside), spec
        assert [I.port_in(p, s.dport) for p in outside] == [False] * len(outside), spec
    pkts = [pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=p)) for p in (49, 50)]
    assert matched("alert tcp any any -> any [1:100,!50] (sid:1;)", pkts) == [True, False]


def test_ports_that_match_nothing_are_errors():
    """Suricata refuses "Complete port space is negated" (``!any``, ``!0:65535``) and "no ports
    left after merging ports with negated ports" (``[80,!80]``)."""
    assert "complete port space is negated" in rejected("alert tcp any !any -> any any (sid:1;)")
    assert "complete port space" in rejected("alert tcp any !0: -> any any (sid:1;)")
    assert "no ports left" in rejected("alert tcp any [80,!80] -> any any (sid:1;)")


def test_negation_inside_a_negated_port_list():
    """Suricata's port parser (detect-engine-port.c, DetectPortParseDo, 7.0): inside a
    negated list every item goes to the negated ports, except that the last item's own ``!``
    is combined with the list's and cancels it. Hence ``![1:100,!50]`` keeps only 50 as a
    positive port, which 1:100 then removes ("no ports left", refused), while ``![!50,1:100]``
    is every port but 1-100; ``![!80]`` and ``!$SHELLCODE_PORTS`` (``!80``) are port 80."""
    assert "no ports left" in rejected("alert tcp any ![1:100,!50] -> any any (sid:1;)")
    for spec, want in [
        ("![!50,1:100]", ((0, 0), (101, 65535))),
        ("![!80]", ((80, 80),)),
        ("!$SHELLCODE_PORTS", ((80, 80),)),
        ("[$SHELLCODE_PORTS,22]", ((22, 22),)),
        ("[any,!80]", ((0, 79), (81, 65535))),
    ]:
        assert I.parse_rule(f"alert tcp any any -> any {spec} (sid:1;)").dport == want, spec


def test_ip_rules_with_any_ports_are_accepted_and_match_every_protocol():
    """``alert ip`` with ports ``any`` ("Rules format" page, protocol ``ip``: all protocols)
    loads and matches TCP, UDP and ICMP packets alike."""
    rule = "alert ip any any -> any any (sid:1;)"
    pkts = [
        pkt("1.1.1.1", "2.2.2.2"),
        pkt("1.1.1.1", "2.2.2.2", UDP(sport=1, dport=2)),
        pkt("1.1.1.1", "2.2.2.2", ICMP()),
        pkt("2001:db8::1", "2001:db8::2", ICMP()),
    ]
    assert matched(rule, pkts) == [True] * 4


# ------------------------------------------------------------------ 2. payload needed -------
def test_negated_content_needs_a_payload():
    """Payload keywords ("Payload keywords" page: content, and its negation ``content:!"x"``)
    inspect the packet payload; Suricata does not run them on a packet without payload, so a
    rule with only negated content does not match a SYN or a bare ACK. ``dsize:0`` (a header
    keyword) does."""
    rule = 'alert tcp any any -> any any (content:!"evil"; sid:1;)\nalert tcp any any -> any 81 (dsize:0; sid:2;)'
    pkts = [
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=80, flags="S")),
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=80, flags="A")),
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=80), b"fine"),
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=80), b"so evil"),
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=81, flags="A")),
    ]
    assert verdicts(rule, pkts) == [(0, 0), (0, 0), (I.ALERT, 1), (0, 0), (I.ALERT, 2)]


# ------------------------------------------------------------------ 5. validation -----------
@pytest.mark.parametrize(
    "opts,why",
    [
        ('content:"abcd"; depth:4; depth:5;', "depth given twice"),
        ('content:"abcd"; offset:1; offset:2;', "offset given twice"),
        ('content:"ab"; content:"cd"; distance:1; distance:2;', "distance given twice"),
        ('content:"ab"; content:"cd"; within:4; within:5;', "within given twice"),
        ('content:"ab"; nocase; nocase;', "nocase given twice"),
        ('content:"ab"; fast_pattern; content:"cd"; fast_pattern;', "only one content"),
        ('content:"ab"; fast_pattern; fast_pattern;', "fast_pattern given twice"),
        ('dsize:<3; content:"abcd";', "more than dsize allows (3)"),
        ('dsize:3; content:"abcd";', "more than dsize allows (3)"),
        ('dsize:1<>3; content:"abcd";', "more than dsize allows (3)"),
        ('dsize:5; content:"ab"; offset:4;', "need 6 bytes"),
        ('dsize:5; content:"ab"; content:"cd"; distance:2;', "need 6 bytes"),
        ('dsize:4; content:"ab"; content:!"cd"; distance:1; within:4;', "need 7 bytes"),
        ("dsize:5; dsize:6;", "dsize given twice"),
        ("dsize:5<>5;", "bad dsize range"),
        ("flow:to_server,to_client;", "both to_server and to_client"),
        ("flow:established,not_established;", "cannot be combined"),
    ],
)
def test_rules_suricata_rejects_are_rejected(opts, why):
    """Suricata's rule validation: one depth/offset/distance/within/nocase per content
    ("Payload keywords" page; Suricata errors "can't use multiple depths for the same content"
    and the like), one fast_pattern per rule ("fast_pattern can be used on only one content in
    a rule"), contents that cannot fit the payload sizes dsize allows ("signature can't match
    as required content length exceeds dsize value", Suricata 7.0's SigParseRequiredContentSize:
    the first content's length plus distance, plus each later relative positive content's, and
    with the largest offset, against N for ``N`` and ``<N``, M for ``N<>M``; a later relative
    negated content must end inside it), one dsize per rule, and flow options that contradict
    each other."""
    assert why in rejected(f"alert tcp any any -> any any ({opts} sid:1;)")


@pytest.mark.parametrize(
    "opts",
    [
        'dsize:4; content:"abcd";',
        'dsize:<4; content:"abcd";',  # the edge is N itself, as in Suricata
        'dsize:>3; content:"abcdef";',
        'dsize:2<>9; content:"ab"; content:!"cd"; within:2;',
        'dsize:3; content:"ab"; content:"cd";',  # later non-relative contents do not count
        'content:"ab"; fast_pattern; content:"cd"; nocase;',
        "flow:established,to_server,no_stream;",
    ],
)
def test_rules_suricata_accepts_are_accepted(opts):
    """The same checks let through what Suricata loads (the dsize check counts only the first
    content and later relative ones, as Suricata's does, so it lets through some rules that
    can never match)."""
    I.SignatureSet.from_text(f"alert tcp any any -> any any ({opts} sid:1;)")


# ------------------------------------------------------------------ 6. no silent ignoring ---
def test_keywords_that_would_be_ignored_are_refused():
    """``flow:only_stream`` matches only the reassembled TCP stream in Suricata ("Flow
    keywords" page), which is not built here: refused, naming it. ``noalert`` hides a rule's
    matches, used with flowbits (not supported): refused."""
    assert "'only_stream'" in rejected('alert tcp any any -> any any (flow:only_stream; content:"x"; sid:1;)')
    assert "'noalert'" in rejected('alert tcp any any -> any any (content:"x"; noalert; sid:1;)')


def test_classtype_sets_the_priority():
    """``classtype`` gives the rule the priority of its class in classification.config unless
    ``priority`` is set ("Meta keywords" page: priority and classtype); within an action the
    highest priority (lowest number) decides. An unknown classtype is an error, as in
    Suricata."""
    rules = "\n".join(
        [
            'alert tcp any any -> any any (content:"x"; sid:1;)',  # default priority 3
            'alert tcp any any -> any any (content:"x"; classtype:trojan-activity; sid:2;)',  # 1
        ]
    )
    assert verdicts(rules, [pkt("1.1.1.1", "2.2.2.2", payload=b"x")]) == [(I.ALERT, 2)]
    s = I.parse_rule("alert tcp any any -> any any (classtype:trojan-activity; priority:4; sid:3;)")
    assert s.priority == 4 and s.classtype == "trojan-activity"
    assert I.parse_rule("alert tcp any any -> any any (classtype:bad-unknown; sid:3;)").priority == 2
    assert "unknown classtype 'made-up'" in rejected(
        "alert tcp any any -> any any (classtype:made-up; sid:1;)"
    )


def test_every_accepted_keyword_is_honoured_or_descriptive():
    """Every option keyword the parser accepts either takes part in matching or, as in
    Suricata, only describes the rule's alert (msg, sid, rev, gid, reference, metadata,
    target). Anything else is refused."""
    descriptive = {"msg", "sid", "rev", "gid", "reference", "metadata", "target"}
    matching = {"content", "nocase", "offset", "depth", "distance", "within", "fast_pattern"}
    matching |= {"flow", "dsize", "priority", "classtype"}
    assert I._META_KEYWORDS == {"reference", "metadata", "gid", "target"}
    base = 'alert tcp any any -> any any (content:"x"; {} sid:1;)'
    for kw in ("pcre", "noalert", "flowbits", "threshold", "isdataat", "http.uri", "tag", "xbits"):
        with pytest.raises(InputError, match=f"'{kw}'"):
            I.SignatureSet.from_text(base.format(f"{kw}:1;" if kw not in ("noalert",) else "noalert;"))
    assert descriptive.isdisjoint(matching)


# ------------------------------------------------------------------ 7. every sid logged -----
def test_inspect_json_lists_every_matching_sid(tmp_path, capsys):
    """Suricata logs one alert per matching signature (eve.json ``alert`` events, drop rules
    included), not only the first: ``microseg inspect --json`` reports them all in ``sids``,
    in decision order, beside ``sid`` (the deciding rule). A ``pass`` match ends the packet's
    inspection, so nothing after it is logged."""
    rules = tmp_path / "r.rules"
    rules.write_text(
        "\n".join(
            [
                'alert tcp any any -> any any (msg:"a"; content:"evil"; sid:11;)',
                'drop tcp any any -> any any (msg:"d"; content:"evil"; sid:12;)',
                'alert tcp any any -> any any (msg:"b"; content:"vil"; priority:1; sid:13;)',
                'pass tcp any any -> any 8080 (msg:"p"; content:"evil"; sid:14;)',
            ]
        )
        + "\n"
    )
    pk = [
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=80), b"so evil"),
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=8080), b"so evil"),
        pkt("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=80), b"vil only"),
    ]
    cap = tmp_path / "c.pcap"
    write_pcap(str(cap), Batch.from_packets(pk, ts=np.arange(3) * 10**6))
    assert main(["inspect", "--json", str(rules), str(cap)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["verdict"], r["sid"], r["sids"], r["matches"]) for r in rows] == [
        ("drop", 12, [12, 13, 11], 3),
        ("pass", 14, [14], 4),
        ("alert", 13, [13], 1),
    ]
    assert main(["inspect", str(rules), str(cap)]) == 0
    out = capsys.readouterr().out
    assert "alert sid 11" in out and "alert sid 13" in out and "drop  sid 12" in out
