"""Inspection hand-off: flows are offloaded, kept or blocked as documented; the kernels agree
with the plain-Python state machine on random streams; limits are honoured and reported."""

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from microseg.cache.key import build_keys
from microseg.offload import handoff as H
from microseg.offload import inspect as I
from microseg.offload.table import OFFER_OK, OFFER_RATE, FastPathTable
from microseg.packet.batch import Batch
from microseg.packet.parse import parse

RULES = "\n".join(
    [
        'drop tcp any any -> any any (msg:"bad"; content:"EVIL"; sid:1;)',
        'alert tcp any any -> any any (msg:"odd"; content:"ODD"; sid:2;)',
        'pass tcp any any -> any 8080 (msg:"trusted"; content:"HELLO"; sid:3;)',
    ]
)
TLS_HELLO = bytes.fromhex("160301002a010000260303") + b"\0" * 38


def tcp(i, payload=b"data", sport=40000, size=0, flags="PA"):
    pay = payload + b"." * max(0, size - len(payload))
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst=f"10.0.1.{i}")
        / TCP(sport=sport, dport=80 if i != 99 else 8080, flags=flags)
        / pay
    )


def run(fi, pkts, ts0=0, allowed=None):
    b = Batch.from_packets(pkts, ts=ts0 + np.arange(len(pkts)) * 1000)
    fk = parse(b)
    kmat, _, valid = build_keys(fk, b.port)
    hit, _, _ = fi.table.lookup(kmat, valid, b.wire_len, b.ts)
    ok = ~hit if allowed is None else (~hit & allowed)
    return hit, fi.process(b, fk, kmat, valid, ok)


def test_flow_lifecycles():
    fi = H.FlowInspector(
        I.SignatureSet.from_text(RULES),
        FastPathTable(capacity=100, rate=1e6, burst=100),
        n_inspect=4,
        elephant_bytes=2500,
    )
    pkts = (
        [tcp(1, b"plain %d" % j) for j in range(6)]  # clean
        + [tcp(2, TLS_HELLO)]
        + [tcp(2, b"\x17\x03\x03\x00\x05hello")]  # encrypted
        + [tcp(3, b"x"), tcp(3, b"so EVIL"), tcp(3, b"fine")]  # blocked at its 2nd packet
        + [tcp(4, b"ODD one"), tcp(4, b"a"), tcp(4, b"b"), tcp(4, b"c"), tcp(4, b"d")]  # alerted
        + [tcp(5, b"big", size=1400) for _ in range(5)]  # elephant
        + [tcp(99, b"HELLO there"), tcp(99, b"then EVIL")]
    )  # passed at once
    hit, r = run(fi, pkts)
    assert not hit.any()
    off = np.flatnonzero(r.offered).tolist()
    assert off == [3, 6, 17, 21]  # clean after 4, TLS at once, elephant at 2500 bytes, pass
    assert (r.outcome[off] == OFFER_OK).all()
    assert np.flatnonzero(r.drop).tolist() == [9, 10]
    assert r.sid[9] == 1 and r.sid[11] == 2 and r.verdict[21] == I.PASS
    assert r.encrypted[6] == I.ENC_TLS
    assert r.inspected[:4].all() and not r.inspected[4:6].any()
    assert not r.inspected[22]  # a passed flow is no longer inspected
    st = fi.stats()["flows"]
    assert st == {
        "inspecting": 0,
        "clean": 1,
        "passed": 1,
        "encrypted": 1,
        "elephant": 1,
        "alerted": 1,
        "blocked": 1,
    }
    # next batch: offloaded flows take the fast path; blocked and alerted ones do not
    hit, r = run(
        fi,
        [
            tcp(1, b"more"),
            tcp(2, b"more"),
            tcp(3, b"more"),
            tcp(4, b"more"),
            tcp(5, b"more"),
            tcp(1, b"bye", flags="FA"),
        ],
        ts0=10**6,
    )
    assert hit.tolist() == [True, True, False, False, True, False]
    assert r.drop.tolist() == [False, False, True, False, False, False]
    tstats = fi.table.stats()
    assert tstats["exceptions"] == 1 and tstats["occupancy"] == 4
    assert 0 < tstats["packet_share"] < 1 and 0 < tstats["byte_share"] < 1


def test_refused_offers_are_retried_and_counted():
    tab = FastPathTable(capacity=2, rate=1.0, burst=1.0)
    fi = H.FlowInspector(None, tab, n_inspect=1)
    _, r = run(fi, [tcp(1), tcp(2), tcp(3)])
    assert r.outcome.tolist() == [OFFER_OK, OFFER_RATE, OFFER_RATE]
    _, r = run(fi, [tcp(2), tcp(3)], ts0=2 * 10**9)  # one token more: one accepted
    assert r.outcome.tolist() == [OFFER_OK, OFFER_RATE]
    _, r = run(fi, [tcp(3)], ts0=5 * 10**9)  # tokens again, but the table is full
    st = tab.stats()
    assert st["refused"] == {"rate": 3, "capacity": 1, "collision": 0} and st["occupancy"] == 2
    assert fi.stats()["offers"] == 6 and fi.stats()["offers_accepted"] == 2


def test_disallowed_packets_leave_no_state_and_remove_forgets():
    fi = H.FlowInspector(None, FastPathTable(capacity=10, rate=1e6, burst=10), n_inspect=1)
    pk = [tcp(1), tcp(2)]
    _, r = run(fi, pk, allowed=np.array([False, True]))
    assert r.offered.tolist() == [False, True] and fi.stats()["flows_created"] == 1
    b = Batch.from_packets(pk)
    fk = parse(b)
    kmat, _, valid = build_keys(fk, b.port)
    assert fi.remove(kmat, valid, [1]) == 1 and fi.table.used == 0
    _, r = run(fi, pk)
    assert r.inspected.tolist() == [True, True] and fi.stats()["flows_created"] == 3


@pytest.mark.parametrize("seed", range(3))
def test_kernels_match_reference_state_machine(seed):
    rng = np.random.default_rng(seed)
    sigs = I.SignatureSet.from_text(RULES)
    payloads = [b"plain", b"EVIL", b"ODD", b"HELLO", TLS_HELLO, b"x" * 900]
    p = np.array([0.75, 0.07, 0.03, 0.05, 0.05, 0.05])
    fi = H.FlowInspector(
        sigs, FastPathTable(capacity=10**5, rate=1e9, burst=1e9), n_inspect=3, elephant_bytes=3000
    )
    built = {(f, j): tcp(f if f != 29 else 99, payloads[j]) for f in range(30) for j in range(6)}
    flows, wire, elig, verdict, enc, sid, batch_of = [], [], [], [], [], [], []
    got_drop, got_insp, got_off = [], [], []
    for bn in range(8):
        n = 64
        fidx = rng.integers(0, 30, n)
        pk = [built[(int(f), int(rng.choice(6, p=p)))] for f in fidx]
        allowed = rng.random(n) < 0.9
        b = Batch.from_packets(pk, ts=np.full(n, bn * 10**9))
        fk = parse(b)
        kmat, _, valid = build_keys(fk, b.port)
        full = sigs.inspect(b, fk)
        r = fi.process(b, fk, kmat, valid, allowed)
        flows += fidx.tolist()
        wire += b.wire_len.tolist()
        elig += (allowed & valid).tolist()
        verdict += full.verdict.tolist()
        enc += full.encrypted.tolist()
        sid += full.sid.tolist()
        batch_of += [bn] * n
        got_drop += r.drop.tolist()
        got_insp += r.inspected.tolist()
        got_off += r.offered.tolist()
    drop, insp, off, states = H.handoff_ref(flows, wire, elig, verdict, enc, sid, batch_of, 3, 3000)
    assert got_insp == insp and got_drop == drop and got_off == off
    counts = {H.STATE_NAMES[s]: list(states.values()).count(s) for s in range(7)}
    assert counts == fi.stats()["flows"]
    assert sum(drop) > 0 and sum(off) > 0
