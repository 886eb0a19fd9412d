"""Table behaviour: pressure and early drop, expiry, timeouts, zones, lookup, deletion,
snapshot / restore (workload migration)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg import ctstate as CS
from microseg.conntrack import ConntrackTable
from microseg.conntrack import const as K
from microseg.errors import InputError
from microseg.packet import batch as B
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.packet.parse import parse

NS = 1_000_000_000
T0 = 1_000 * NS


def syns(n, base, ts=T0, dst=0xC6336414, dport=80):
    """``n`` SYNs from distinct sources (10.x.y.z, port 1000 + ...) to one server."""
    src = (0x0A000000 + base + np.arange(n)).astype(np.uint32)
    return PB.build_batch(
        n,
        src,
        np.full(n, dst, np.uint32),
        6,
        1000 + (np.arange(n) % 50000),
        dport,
        tcp_flags_=0x02,
        seq=1000,
        ts=np.full(n, ts, np.int64),
    )


def handshakes(n, base, ts=T0):
    """Full handshakes of ``n`` connections, packets in order: SYN, SYN/ACK, ACK per flow."""
    src = (0x0A000000 + base + np.arange(n)).astype(np.uint32)
    dst = np.full(n, 0xC6336415, np.uint32)
    sp = 1000 + (np.arange(n) % 50000)
    s = PB.build_batch(n, src, dst, 6, sp, 443, tcp_flags_=0x02, seq=100)
    sa = PB.build_batch(n, dst, src, 6, 443, sp, tcp_flags_=0x12, seq=900, ack=101)
    a = PB.build_batch(n, src, dst, 6, sp, 443, tcp_flags_=0x10, seq=101, ack=901)
    pk = [p for trio in zip(s.packets(), sa.packets(), a.packets()) for p in trio]
    return Batch.from_packets(pk, ts=np.full(3 * n, ts, np.int64))


def track(t, batch, **kw):
    return t.process(batch, parse(batch), **kw)


def test_handshake_states_and_assured():
    t = ConntrackTable(64)
    st = track(t, handshakes(5, 0))
    names = [CS.state_name(s) for s in st]
    assert names == ["new", "established", "established"] * 5
    e = t.entries()
    assert len(t) == 5 and np.all(e["status"] & K.ST_ASSURED)
    assert np.all(e["tcp_state"] == K.ESTABLISHED)


def test_syn_flood_keeps_assured_and_admits_new():
    cap = 2048
    t = ConntrackTable(cap)
    nbytes = t.nbytes
    track(t, handshakes(500, 0))
    assert len(t) == 500
    established = 0
    for k in range(10):  # ten times the capacity in SYNs, legitimate handshakes in between
        track(t, syns(cap, 100_000 + k * cap, ts=T0 + k))
        st = track(t, handshakes(20, 50_000 + 20 * k, ts=T0 + k))
        established += int(np.sum(st[2::3] == (CS.TRACKED | CS.ESTABLISHED)))
        assert len(t) <= cap and t.nbytes == nbytes
    c = t.counters
    assert c["early_drop"] >= 9 * cap
    assert established == 200  # every legitimate connection came up
    assert np.sum(t.entries()["status"] & K.ST_ASSURED != 0) == 700
    ent, _ = t.lookup(handshakes(500, 0), parse(handshakes(500, 0)), now_ns=T0 + 10)
    assert np.all(ent >= 0)  # none of the first 500 was evicted
    dropped = c["table_full"]
    assert c["created"] == 500 + 10 * cap - dropped + 200


def test_full_of_assured_refuses_new_and_counts():
    t = ConntrackTable(32)
    track(t, handshakes(32, 0))
    st = track(t, syns(10, 5000))
    assert np.all(st == (CS.TRACKED | CS.INVALID))
    assert t.counters["table_full"] == 10 and len(t) == 32


def test_expiry_is_incremental_and_lookups_ignore_expired():
    t = ConntrackTable(4096, expire_budget=0)
    track(t, syns(1000, 0))  # SYN_SENT: 120 s
    assert len(t) == 1000
    later = T0 + 121 * NS
    ent, _ = t.lookup(syns(1000, 0), parse(syns(1000, 0)), now_ns=later)
    assert np.all(ent < 0)  # dead to lookups at once
    assert len(t) == 1000  # reclaimed lazily
    removed = t.expire(100, later)
    assert removed <= 100 and len(t) >= 900  # bounded work per call
    while t.expire(512, later):
        pass
    t.expire(4096, later)
    assert len(t) == 0 and t.counters["expired"] == 1000


def test_expire_budget_sweeps_during_process():
    t = ConntrackTable(1024, expire_budget=256)
    track(t, syns(1000, 0))
    for k in range(8):
        track(t, syns(1, 90_000 + k, ts=T0 + 200 * NS + k))
    assert len(t) <= 8


def test_expired_connection_starts_over():
    t = ConntrackTable(64)
    b = handshakes(1, 0)
    track(t, b)
    late = PB.build_batch(
        1, [0x0A000000], [0xC6336415], 6, 1000, 443, tcp_flags_=0x10, seq=101, ack=901, ts=[T0 + 432_001 * NS]
    )
    assert CS.state_name(track(t, late)[0]) == "new"  # picked up again mid-stream


def test_timeouts_are_settings():
    t = ConntrackTable(64, timeouts={"tcp_syn_sent": 5})
    track(t, syns(1, 0))
    assert int(t.entries()["deadline"][0]) == T0 + 5 * NS
    with pytest.raises(ValueError):
        ConntrackTable(64, timeouts={"tcp_nonsense": 5})
    with pytest.raises(ValueError):
        ConntrackTable(64, timeouts={"udp": -1})


def test_udp_assured_only_after_two_seconds_of_replies():
    t = ConntrackTable(64)
    a, b = "192.0.2.1", "192.0.2.2"
    pk = [
        PB.udp_packet(a, b, 5000, 53, b"q"),
        PB.udp_packet(b, a, 53, 5000, b"r"),
        PB.udp_packet(a, b, 5000, 53, b"q"),
        PB.udp_packet(a, b, 5000, 53, b"q"),
    ]
    batch = Batch.from_packets(pk, ts=[T0, T0 + NS, T0 + NS, T0 + 3 * NS])
    st = track(t, batch.slice(0, 3))
    assert [CS.state_name(s) for s in st] == ["new", "established", "established"]
    assert not (t.entries()["status"][0] & K.ST_ASSURED)
    assert int(t.entries()["deadline"][0]) == T0 + NS + 30 * NS
    track(t, batch.slice(3, 4))
    assert t.entries()["status"][0] & K.ST_ASSURED
    assert int(t.entries()["deadline"][0]) == T0 + 3 * NS + 120 * NS


def test_zones_separate_tenants():
    b = handshakes(1, 0)
    keys = parse(b)
    t = ConntrackTable(64, default_zone=9)
    keys.i32[B.TENANT, :3] = [5, 6, 5]  # TENANT row: SYN and ACK in 5, SYN/ACK in 6
    st = t.process(b, keys)
    assert [CS.state_name(s) for s in st] == ["new", "invalid", "invalid"]
    keys.i32[B.TENANT, :3] = [-1, -1, -1]  # untunnelled: the default zone
    st = t.process(b, keys)
    assert [CS.state_name(s) for s in st] == ["new", "established", "established"]
    assert sorted(t.entries()["zone"].tolist()) == [5, 9]


def test_lookup_updates_nothing():
    t = ConntrackTable(64)
    b = handshakes(3, 0)
    track(t, b.slice(0, 1))
    before = t.ents.copy()
    ent, rep = t.lookup(b, parse(b))
    assert ent[0] >= 0 and ent[1] == ent[0] == ent[2] and rep[:3].tolist() == [False, True, False]
    assert ent[3] < 0
    assert np.array_equal(before, t.ents)


def test_delete_where_cuts_connections():
    t = ConntrackTable(256)
    track(t, handshakes(50, 0))
    gone = t.delete_where(lambda e: e["sport"] % 2 == 0)
    assert gone == 25 and len(t) == 25 and t.counters["deleted"] == 25
    # a deleted connection's next mid-stream segment is picked up as new
    b = handshakes(50, 0)
    st = track(t, b.slice(2, 3))  # ACK of flow 0 (even port 1000)
    assert CS.state_name(st[0]) == "new"
    with pytest.raises(ValueError):
        t.delete_where(lambda e: np.ones(3, bool))


def test_snapshot_restore_continues_mid_connection(tmp_path):
    a, b = "192.0.2.10", "198.51.100.20"
    seq = {0: 1000, 1: 5000}

    def seg(d, flags, data=b""):
        src, dst, sp, dp = (a, b, 40000, 80) if d == 0 else (b, a, 80, 40000)
        p = PB.tcp_packet(src, dst, sp, dp, data, flags=flags, seq=seq[d], ack=seq[1 - d])
        seq[d] += len(data) + ("S" in flags) + ("F" in flags)
        return p

    first = [seg(0, "S"), seg(1, "SA"), seg(0, "A"), seg(0, "PA", b"x" * 100), seg(1, "A")]
    rest = [seg(1, "PA", b"y" * 50), seg(0, "A"), seg(0, "FA"), seg(1, "A"), seg(1, "FA"), seg(0, "A")]
    # out-of-window segment: the restored table must still know the window
    bogus = PB.tcp_packet(a, b, 40000, 80, b"w", flags="PA", seq=seq[0] + 50_000_000, ack=seq[1])
    ts = [T0 + k * NS for k in range(len(first) + len(rest) + 1)]
    whole = Batch.from_packets(first + rest + [bogus], ts=ts)
    ref = ConntrackTable(64)
    want = track(ref, whole)

    src = ConntrackTable(64, timeouts={"tcp_time_wait": 77})
    track(src, whole.slice(0, len(first)))
    path = tmp_path / "ct.snap"
    assert src.snapshot(path) == 1
    dst = ConntrackTable.restore(path)
    assert len(dst) == 1 and dst.timeouts[K.TIME_WAIT] == 77 * NS
    got = track(dst, whole.slice(len(first), len(whole)))
    assert np.array_equal(got, want[len(first) :])
    assert CS.state_name(got[-1]) == "invalid"
    e = dst.entries()[0]
    assert e["tcp_state"] == K.TIME_WAIT


def test_restore_rejects_bad_files(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"not a snapshot")
    with pytest.raises(InputError):
        ConntrackTable.restore(p)
    with pytest.raises(InputError):
        ConntrackTable.restore(tmp_path / "missing")
    np.savez(tmp_path / "other.npz", entries=np.zeros(3))
    with pytest.raises(InputError):
        ConntrackTable.restore(tmp_path / "other.npz")


def test_memory_per_connection():
    t = ConntrackTable(1 << 20)
    assert t.bytes_per_entry <= 256


def test_bad_settings():
    for kw in ({"capacity": 0}, {"evict_range": 0}, {"default_zone": -1}):
        with pytest.raises(ValueError):
            ConntrackTable(**({"capacity": 8} | kw))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["open", "open", "open", "close", "close", "expire"]), st.integers(0, 11)),
        min_size=30,
        max_size=80,
    ),
    st.integers(0, 2**62),
)
def test_index_survives_churn(ops, seed):
    """Open, delete and expire connections in a tiny table whose index wraps around: every
    open connection stays findable, no closed or expired one is found, counts add up."""
    t = ConntrackTable(8, seed=seed, expire_budget=0)
    live = set()
    now = T0
    probes = {f: syns(1, f) for f in range(12)}
    keys = {f: parse(b) for f, b in probes.items()}

    def found(f):
        return t.lookup(probes[f], keys[f], now_ns=now)[0][0] >= 0

    for op, f in ops:
        if op == "open" and f not in live and len(t) < 8:
            assert track(t, syns(1, f, ts=now))[0] == CS.TRACKED | CS.NEW
            live.add(f)
        elif op == "close":
            ent, _ = t.lookup(probes[f], keys[f], now_ns=now)
            assert (ent[0] >= 0) == (f in live)
            t.delete(ent[ent >= 0])
            live.discard(f)
        elif op == "expire":
            now += 121 * NS  # SYN_SENT lasts 120 s: everything expires
            t.expire(3, now)
            live.clear()
        assert all(found(f) == (f in live) for f in probes)
    t.expire(8, now)
    assert len(t) == len(live)
    assert int(t.meta[1]) + len(t) == 8  # free stack + used == capacity
