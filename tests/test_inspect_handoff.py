"""Flow verdicts of the inspection hand-off held to Suricata's: a ``pass`` match passes the
whole flow (both directions), a ``drop`` match blocks it, and a flow that alerted is still
inspected, so a later ``drop`` applies. The kernels are held equal to the plain-Python state
machine on random two-way traffic."""

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether

from microseg.cache.key import build_keys
from microseg.offload import handoff as H
from microseg.offload import inspect as I
from microseg.offload.table import FastPathTable
from microseg.packet.batch import Batch
from microseg.packet.parse import parse

RULES = "\n".join(
    [
        'drop tcp any any -> any any (msg:"bad"; content:"EVIL"; sid:1;)',
        'alert tcp any any -> any any (msg:"odd"; content:"ODD"; sid:2;)',
        'pass tcp any any -> any 8080 (msg:"trusted"; content:"HELLO"; sid:3;)',
    ]
)
CLIENT, SERVER = "10.0.0.1", "10.0.1.9"


def tcp(payload=b"data", reply=False, dport=8080, flags="PA", server=SERVER, sport=40000):
    a, b = (server, CLIENT) if reply else (CLIENT, server)
    pa, pb = (dport, sport) if reply else (sport, dport)
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=a, dst=b)
        / TCP(sport=pa, dport=pb, flags=flags)
        / payload
    )


def inspector(n_inspect=4):
    return H.FlowInspector(
        I.SignatureSet.from_text(RULES), FastPathTable(capacity=100, rate=1e6, burst=100), n_inspect=n_inspect
    )


def run(fi, pkts, port=None, ts0=0):
    b = Batch.from_packets(pkts, ts=ts0 + np.arange(len(pkts)) * 1000)
    fk = parse(b)
    kmat, _, valid = build_keys(fk, b.port if port is None else np.asarray(port, np.uint16))
    return fi.process(b, fk, kmat, valid, np.ones(len(pkts), bool))


def test_pass_passes_both_directions():
    """Suricata, "Action order" / "Actions" (rules intro page): ``pass`` stops the inspection
    of the packet and of the rest of its flow -- both directions. A reply carrying a drop
    pattern after the pass match is therefore not dropped (Suricata's ips-state test: the
    packets of a passed flow in the other direction pass). The replies come in on another port,
    as they do in the datapath (the sender's identity)."""
    fi = inspector()
    pkts = [tcp(b"HELLO there"), tcp(b"then EVIL", reply=True), tcp(b"EVIL again", reply=True)]
    r = run(fi, pkts, port=[1, 2, 2])
    assert r.verdict[0] == I.PASS
    assert not r.drop.any()
    assert r.inspected.tolist() == [True, False, False]
    assert r.offered.tolist() == [True, True, False]  # each direction offered once per batch
    assert fi.stats()["flows"]["passed"] == 1


def test_drop_blocks_both_directions():
    """Suricata, "Actions": ``drop`` drops the packet and, in IPS mode, every further packet of
    the flow, whichever direction."""
    fi = inspector()
    r = run(fi, [tcp(b"x EVIL", dport=80), tcp(b"harmless", reply=True, dport=80)])
    assert r.drop.tolist() == [True, True]
    assert fi.stats()["flows"]["blocked"] == 1


def test_alerted_flow_is_still_inspected_and_a_later_drop_applies():
    """Suricata inspects every packet of a flow: an ``alert`` match is logged and inspection
    goes on, so a ``drop`` signature matching a later packet of the same flow drops it. Here
    the flow stays under inspection for the rest of its first ``n_inspect`` packets."""
    fi = inspector(n_inspect=4)
    r = run(fi, [tcp(b"ODD one", dport=80), tcp(b"fine", dport=80), tcp(b"now EVIL", dport=80)])
    assert r.verdict.tolist() == [I.ALERT, I.NONE, I.DROP]
    assert r.inspected.tolist() == [True, True, True]
    assert r.drop.tolist() == [False, False, True]
    assert fi.stats()["flows"]["blocked"] == 1
    # in a later batch too, while within n_inspect
    fi = inspector(n_inspect=4)
    run(fi, [tcp(b"ODD one", dport=80)])
    r = run(fi, [tcp(b"EVIL", reply=True, dport=80), tcp(b"more", dport=80)], ts0=10**6)
    assert r.drop.tolist() == [True, True]
    # past n_inspect packets an alerted flow is no longer inspected, and never offered
    fi = inspector(n_inspect=2)
    r = run(fi, [tcp(b"ODD", dport=80), tcp(b"a", dport=80), tcp(b"EVIL", dport=80)])
    assert r.inspected.tolist() == [True, True, False] and not r.drop.any() and not r.offered.any()
    assert fi.stats()["flows"]["alerted"] == 1


def test_alerted_flow_passed_later_is_passed():
    """A ``pass`` match after an alert passes the rest of the flow, as in Suricata (the alert
    was logged with its packet)."""
    fi = inspector()
    r = run(fi, [tcp(b"ODD"), tcp(b"HELLO"), tcp(b"EVIL", reply=True)])
    assert r.verdict.tolist()[:2] == [I.ALERT, I.PASS]
    assert not r.drop.any() and fi.stats()["flows"]["passed"] == 1


def test_pair_keys_are_the_same_both_ways():
    """The inspection state's key: one per flow, the same for both directions (ingress port
    left out, ICMP echo replies keyed as their requests), different across flows."""
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pk = [
        tcp(b"a"),
        tcp(b"b", reply=True),
        tcp(b"c", sport=40001),
        bytes(eth / IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=7)),
        bytes(eth / IP(src=SERVER, dst=CLIENT) / ICMP(type=0, id=7)),
        bytes(eth / IP(src=SERVER, dst=CLIENT) / ICMP(type=0, id=8)),
    ]
    b = Batch.from_packets(pk)
    fk = parse(b)
    kmat, _, valid = build_keys(fk, np.array([1, 2, 1, 1, 2, 2], np.uint16))
    fi = inspector()
    keys, h, rev = H.flow_pair_keys(*fi.table.flow_keys(kmat, valid)[:1], valid)
    assert (keys[0] == keys[1]).all() and h[0] == h[1] and rev[0] != rev[1]
    assert h[2] != h[0]
    assert (keys[3] == keys[4]).all() and h[3] == h[4] and h[5] != h[3]


@pytest.mark.parametrize("seed", range(3))
def test_kernels_match_reference_on_two_way_traffic(seed):
    """The batch kernels against ``handoff_ref`` with both directions of each flow mixed:
    same drops, inspected packets, offers and final states."""
    rng = np.random.default_rng(seed)
    sigs = I.SignatureSet.from_text(RULES)
    payloads = [b"plain", b"EVIL", b"ODD", b"HELLO", b"\x16\x03\x01\x00\x2a\x01" + b"\0" * 40, b"x" * 900]
    p = np.array([0.6, 0.06, 0.08, 0.18, 0.04, 0.04])
    fi = H.FlowInspector(
        sigs, FastPathTable(capacity=10**5, rate=1e9, burst=1e9), n_inspect=3, elephant_bytes=3000
    )
    servers = [f"10.0.2.{f}" for f in range(20)]
    flows, direc, wire, elig, verdict, enc, sid, batch_of = [], [], [], [], [], [], [], []
    got_drop, got_insp, got_off = [], [], []
    for bn in range(8):
        n = 64
        fidx = rng.integers(0, 20, n)
        rep = rng.random(n) < 0.5
        pk = [
            tcp(
                payloads[int(rng.choice(6, p=p))],
                reply=bool(d),
                server=servers[f],
                dport=8080 if f % 3 else 80,
            )
            for f, d in zip(fidx, rep)
        ]
        allowed = rng.random(n) < 0.9
        b = Batch.from_packets(pk, ts=np.full(n, bn * 10**9))
        fk = parse(b)
        kmat, _, valid = build_keys(fk, np.where(rep, 2, 1).astype(np.uint16))
        full = sigs.inspect(b, fk)
        r = fi.process(b, fk, kmat, valid, allowed)
        flows += fidx.tolist()
        direc += rep.astype(int).tolist()
        wire += b.wire_len.tolist()
        elig += (allowed & valid).tolist()
        verdict += full.verdict.tolist()
        enc += full.encrypted.tolist()
        sid += full.sid.tolist()
        batch_of += [bn] * n
        got_drop += r.drop.tolist()
        got_insp += r.inspected.tolist()
        got_off += r.offered.tolist()
    drop, insp, off, states = H.handoff_ref(flows, wire, elig, verdict, enc, sid, batch_of, 3, 3000, direc)
    assert got_insp == insp and got_drop == drop and got_off == off
    counts = {H.STATE_NAMES[s]: list(states.values()).count(s) for s in range(7)}
    assert counts == fi.stats()["flows"]
    assert (
        sum(drop) > 0 and sum(off) > 0 and counts["passed"] > 0 and counts["alerted"] + counts["blocked"] > 0
    )
