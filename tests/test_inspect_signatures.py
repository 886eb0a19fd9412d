"""Signature subset: parsing (accepted and rejected rules), content semantics against a
brute-force reference, the Aho-Corasick prefilter, and verdicts on real packets."""

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from microseg.ctstate import ESTABLISHED, NEW, REPLY, TRACKED
from microseg.errors import InputError
from microseg.offload import inspect as I
from microseg.packet.batch import Batch
from microseg.packet.parse import parse

SIG = "tests/vectors/signatures"


def test_et_style_file_loads():
    s = I.SignatureSet.load(f"{SIG}/et_style.rules")
    assert [x.sid for x in s.signatures] == list(range(9000001, 9000010))
    r = {x.sid: x for x in s.signatures}
    assert r[9000008].dport == ((8000, 8079), (8081, 8100))
    assert r[9000008].line == 12 and r[9000008].contents[0].fast_pattern
    assert r[9000009].contents[0].pattern == b'a;b"c\\d'
    assert r[9000003].contents[1].pattern == b"\x07dyn-evil\x03com\x00"
    assert r[9000004].contents[1].negated
    assert r[9000001].flow_dir == 1 and r[9000001].flow_state == 1
    assert r[9000006].bidirectional and r[9000006].action == I.DROP
    assert r[9000007].dsize == (">", 800, 0)


def _expectations():
    lines = open(f"{SIG}/unsupported.rules").read().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if line.startswith("# expect:"):
            out.append((n + 1, line.split(":", 1)[1].strip(), lines[n]))
    return out


@pytest.mark.parametrize("line,expect,rule", _expectations())
def test_unsupported_rules_are_rejected_with_file_and_line(line, expect, rule):
    text = "\n" * (line - 1) + rule + "\n"
    with pytest.raises(InputError) as ei:
        I.SignatureSet.from_text(text, path="bad.rules")
    msg = str(ei.value)
    assert msg.startswith(f"bad.rules:{line}: ") and expect in msg


def test_non_strict_load_skips_and_reports():
    s = I.SignatureSet.load(f"{SIG}/unsupported.rules", strict=False)
    assert len(s) == 0 and len(s.skipped) == len(_expectations())
    assert all(path.endswith("unsupported.rules") for path, _, _ in s.skipped)


def test_file_errors():
    with pytest.raises(InputError, match="cannot read rules"):
        I.SignatureSet.load(f"{SIG}/does-not-exist.rules")
    with pytest.raises(InputError, match="duplicate sid 5"):
        I.SignatureSet.from_text(
            "alert tcp any any -> any any (sid:5;)\nalert udp any any -> any any (sid:5;)"
        )


def test_variables_lists_and_negation():
    s = I.SignatureSet.from_text(
        "alert tcp [10.0.0.0/8,!10.1.0.0/16] any -> $WEB [80,443,8000:] (sid:1;)",
        variables={"WEB": "[192.0.2.1,2001:db8::/32]"},
    )
    sig = s.signatures[0]
    a = lambda t: I._V4 | int(__import__("ipaddress").ip_address(t))  # noqa: E731
    assert I.addr_in(a("10.2.3.4"), sig.src) and not I.addr_in(a("10.1.3.4"), sig.src)
    assert I.addr_in(a("192.0.2.1"), sig.dst) and I.addr_in(0x20010DB8 << 96 | 5, sig.dst)
    assert I.port_in(8080, sig.dport) and not I.port_in(22, sig.dport)
    with pytest.raises(InputError, match="refers to itself"):
        I.SignatureSet.from_text("alert tcp $A any -> any any (sid:1;)", variables={"A": "[$A]"})


# ------------------------------------------------------------------ content semantics ------
def brute(contents, payload):
    """Every assignment of positions, straight from the definitions (no shortcuts)."""
    low = payload.lower()
    n = len(payload)

    def occ(c, lo, hi):
        hay, pat = (low, c.pattern.lower()) if c.nocase else (payload, c.pattern)
        lo, hi = max(lo, 0), min(hi, n)
        return [p for p in range(lo, hi - len(pat) + 1) if hay[p : p + len(pat)] == pat]

    def rec(j, prev_end):
        if j == len(contents):
            return True
        c = contents[j]
        if c.distance is not None or c.within is not None:
            lo = prev_end + (c.distance or 0)
            hi = lo + c.within if c.within is not None else n
        else:
            lo = c.offset or 0
            hi = lo + c.depth if c.depth is not None else n
        ps = occ(c, lo, hi)
        if c.negated:
            return not ps and rec(j + 1, prev_end)
        return any(rec(j + 1, p + len(c.pattern)) for p in ps)

    return rec(0, 0)


def random_contents(rng):
    out = []
    for j in range(int(rng.integers(1, 4))):
        pat = bytes(rng.choice(list(b"abAB"), int(rng.integers(1, 4))).tolist())
        c = I.Content(pat, negated=bool(rng.random() < 0.25), nocase=bool(rng.random() < 0.5))
        if j > 0 and rng.random() < 0.6:
            if rng.random() < 0.7:
                c.distance = int(rng.integers(-2, 4))
            if rng.random() < 0.6:
                c.within = len(pat) + int(rng.integers(0, 5))
        elif rng.random() < 0.5:
            c.offset = int(rng.integers(0, 5)) if rng.random() < 0.6 else None
            c.depth = len(pat) + int(rng.integers(0, 8)) if rng.random() < 0.6 else None
        out.append(c)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_contents_match_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    matched = 0
    for _ in range(1500):
        cs = random_contents(rng)
        payload = bytes(rng.choice(list(b"abAB"), int(rng.integers(0, 24))).tolist())
        want = brute(cs, payload)
        got = I.contents_match(cs, payload, payload.translate(I._LOWER))
        assert got == want, (cs, payload)
        matched += want
    assert matched > 100


def _rule_text(cs, sid):
    opts = []
    for c in cs:
        body = "".join(chr(b) for b in c.pattern)
        opts.append(f'content:{"!" if c.negated else ""}"{body}";')
        if c.nocase:
            opts.append("nocase;")
        for k in ("offset", "depth", "distance", "within"):
            if getattr(c, k) is not None:
                opts.append(f"{k}:{getattr(c, k)};")
    return f"alert tcp any any -> any any ({' '.join(opts)} sid:{sid};)"


def test_prefilter_never_loses_a_match():
    rng = np.random.default_rng(11)
    rules = []
    while len(rules) < 60:
        cs = random_contents(rng)
        if cs[0].distance is None and cs[0].within is None:
            rules.append(cs)
    s = I.SignatureSet.from_text("\n".join(_rule_text(cs, i + 1) for i, cs in enumerate(rules)))
    for _ in range(400):
        payload = bytes(rng.choice(list(b"abAB"), int(rng.integers(0, 30))).tolist())
        got = sorted(s.match_packet(payload, 6, 0, 0, 1, 2))
        # a rule with content needs a payload, even when its contents are all negated
        want = [i for i, sig in enumerate(s.signatures) if payload and brute(sig.contents, payload)]
        assert got == want


# ------------------------------------------------------------------ real packets -----------
def _batch(pkts):
    b = Batch.from_packets([bytes(p) for p in pkts])
    return b, parse(b)


def E(src, dst, l4, payload=b""):
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / l4 / payload


def test_verdicts_on_real_packets():
    s = I.SignatureSet.load(f"{SIG}/et_style.rules")
    pkts = [
        E(
            "203.0.113.5", "10.0.0.5", TCP(sport=40000, dport=80), b"GET /a/../../etc/PASSWD HTTP/1.1\r\n"
        ),  # 0 alert 1
        E(
            "203.0.113.5", "10.0.0.5", TCP(sport=40000, dport=80), b"POST /a/../../etc/passwd HTTP/1.1\r\n"
        ),  # 1 depth: none
        E(
            "10.0.0.5", "10.0.0.6", TCP(sport=40000, dport=80), b"GET /a/../../etc/passwd HTTP/1.1\r\n"
        ),  # 2 src not external
        E("203.0.113.9", "10.0.0.7", TCP(sport=5555, dport=2222), b"SSH-2.0-LIBSSH_0.9.6\r\n"),  # 3 drop 2
        E("203.0.113.9", "10.0.0.7", TCP(sport=5555, dport=22), b"SSH-2.0-OpenSSH_9.0\r\n"),  # 4 none
        E(
            "10.0.0.8",
            "9.9.9.9",
            UDP(sport=5353, dport=53),
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07DYN-EVIL\x03com\x00\x00\x01\x00\x01",
        ),  # 5 alert 3
        E("1.2.3.4", "5.6.7.8", TCP(sport=1, dport=2), b"exec /bin/sh -c id"),  # 6 alert 4
        E("1.2.3.4", "5.6.7.8", TCP(sport=1, dport=2), b"#!/bin/sh\necho"),  # 7 negated: none
        E("10.0.0.9", "10.9.9.9", TCP(sport=1, dport=80), b"x /bin/sh"),  # 8 pass 5 wins
        E("10.66.3.3", "1.1.1.1", TCP(sport=1000, dport=22)),  # 9 drop 6 (<>)
        E("1.1.1.1", "10.66.3.3", TCP(sport=1000, dport=80)),  # 10 port 80 excluded
        E("1.1.1.1", "10.0.0.1", ICMP(), b"z" * 900),  # 11 alert 7
        E("1.1.1.1", "10.0.0.1", ICMP(), b"z" * 100),  # 12 none
        E("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=8050), b"user=a&PassWord=b"),  # 13 alert 8
        E("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=8080), b"user=a&PassWord=b"),  # 14 8080 excluded
        E("1.1.1.1", "2.2.2.2", TCP(sport=1, dport=2), b'xx a;b"c\\d yy'),  # 15 alert 9
    ]
    b, fk = _batch(pkts)
    ct = np.full(len(pkts), TRACKED | ESTABLISHED, np.uint8)
    r = s.inspect(b, fk, None, ct)
    want = {
        0: (I.ALERT, 9000001),
        3: (I.DROP, 9000002),
        5: (I.ALERT, 9000003),
        6: (I.ALERT, 9000004),
        8: (I.PASS, 9000005),
        9: (I.DROP, 9000006),
        11: (I.ALERT, 9000007),
        13: (I.ALERT, 9000008),
        15: (I.ALERT, 9000009),
    }
    for i in range(len(pkts)):
        assert (int(r.verdict[i]), int(r.sid[i])) == want.get(i, (I.NONE, 0)), i
    # direction and state from conntrack: a reply or a NEW flow does not match rule 1
    ct[0] = TRACKED | ESTABLISHED | REPLY
    ct[13] = TRACKED | NEW
    r = s.inspect(b, fk, [0, 13], ct)
    assert r.verdict[0] == I.NONE and r.verdict[13] == I.NONE
    # only the chosen rows are inspected
    assert r.verdict[3] == I.NONE


def test_action_order_pass_then_drop_then_alert():
    s = I.SignatureSet.from_text(
        "\n".join(
            [
                'alert tcp any any -> any any (content:"evil"; priority:1; sid:1;)',
                'drop tcp any any -> any any (content:"evil"; priority:3; sid:2;)',
                'drop tcp any any -> any any (content:"ev"; priority:2; sid:3;)',
                'pass tcp any any -> any any (content:"evil-but-ok"; sid:4;)',
            ]
        )
    )
    assert s.match_packet(b"evil", 6, 0, 0, 1, 2)[0] == 2  # drop, priority 2 first
    assert s.signatures[s.match_packet(b"evil-but-ok", 6, 0, 0, 1, 2)[0]].sid == 4


def test_parser_never_crashes_on_damaged_rules():
    """Mutated real rules either load or raise InputError -- never another exception."""
    rng = np.random.default_rng(99)
    lines = [l for l in open(f"{SIG}/et_style.rules").read().splitlines() if l and not l.startswith("#")]
    alphabet = list('()[]!$:;,"|\\ -><0123456789abcdefxyz/.') + ["any", "content", "->", "<>", "sid:1;"]
    ok = bad = 0
    for _ in range(3000):
        s = list(lines[int(rng.integers(0, len(lines)))])
        for _ in range(int(rng.integers(1, 4))):
            op, pos = rng.random(), int(rng.integers(0, len(s) + 1))
            if op < 0.4 and s:
                del s[min(pos, len(s) - 1)]
            elif op < 0.8:
                s.insert(pos, str(rng.choice(alphabet)))
            else:
                s = s[:pos]
        text = "".join(s)
        try:
            sigs = I.SignatureSet.from_text(text, path="fuzz.rules")
            for _sig in sigs.signatures:  # a rule that loads can also be run
                sigs.match_packet(b"GET /etc/passwd SSH-libssh |", 6, 1, 2, 3, 80)
            ok += 1
        except InputError as exc:
            assert str(exc).startswith("fuzz.rules")
            bad += 1
    assert ok > 100 and bad > 100
