"""The Numba table agrees with the plain-Python reference, packet by packet, on random traces
and on damaged inputs."""

import numpy as np
import pytest

from conntrack_traces import random_trace
from microseg import ctstate as CS
from microseg.conntrack import ConntrackTable
from microseg.conntrack import const as K
from microseg.conntrack.reference import ReferenceConntrack, after, before
from microseg.conntrack.table import checksum_ok
from microseg.packet import batch as B
from microseg.packet.batch import Batch, FlowKeys

COMPARED = [i for i, n in enumerate(K.REASONS) if n not in ("expired", "early_drop")]


def _run_both(batch, keys, chunk=None, **kw):
    ok = checksum_ok(batch, keys)
    ref = ReferenceConntrack(**kw)
    want = ref.process(batch, keys, csum_ok=ok)
    tab = ConntrackTable(capacity=4096, **kw)
    n = len(keys)
    chunk = chunk or n
    got = np.concatenate(
        [
            tab.process(
                batch.slice(s, min(n, s + chunk)),
                _slice_keys(keys, s, min(n, s + chunk)),
                csum_ok=ok[s : s + chunk],
            )
            for s in range(0, n, chunk)
        ]
    )
    return ref, want, tab, got


def _slice_keys(keys, a, b):
    k = FlowKeys(max(b - a, 1))
    k.resize(b - a)
    for t in ("u64", "u32", "i32", "u16", "u8"):
        getattr(k, t)[:, : b - a] = getattr(keys, t)[:, a:b]
    return k


def _compare_entries(ref, tab, now):
    live = [c for c in ref.entries() if c.deadline - now > 0]
    ents = tab.entries()
    ents = ents[ents["deadline"] - now > 0]
    assert len(live) == len(ents)
    by_key = {
        (
            int(e["zone"]),
            int(e["proto"]),
            (int(e["src_hi"]), int(e["src_lo"])),
            (int(e["dst_hi"]), int(e["dst_lo"])),
            int(e["sport"]),
            int(e["dport"]),
            int(e["icmp_type"]),
            int(e["icmp_code"]),
        ): e
        for e in ents
    }
    for c in live:
        e = by_key[(c.zone, c.proto, c.src, c.dst, c.sport, c.dport, c.icmp_type, c.icmp_code)]
        assert int(e["deadline"]) == c.deadline
        assert int(e["status"]) & 3 == c.status & 3
        if c.proto == K.IPPROTO_TCP:
            assert int(e["tcp_state"]) == c.state
            for d in (0, 1):
                s = c.seen[d]
                assert (
                    int(e["td_end"][d]),
                    int(e["td_maxend"][d]),
                    int(e["td_maxwin"][d]),
                    int(e["td_scale"][d]),
                    int(e["tcp_flags"][d]),
                ) == (s.td_end, s.td_maxend, s.td_maxwin, s.td_scale, s.flags)
            assert (int(e["last_index"]), int(e["last_dir"]), int(e["retrans"])) == (
                c.last_index,
                c.last_dir,
                c.retrans,
            )


@pytest.mark.parametrize("seed", range(24))
def test_kernel_matches_reference_on_random_traces(seed):
    batch, keys = random_trace(seed, n=250)
    ref, want, tab, got = _run_both(batch, keys, chunk=[1, 7, 64, 250][seed % 4])
    bad = np.flatnonzero(want != got)
    assert bad.size == 0, f"first difference at packet {bad[0]}: {want[bad[0]]} vs {got[bad[0]]}"
    assert [ref.counters[i] for i in COMPARED] == [int(tab.ctr[i]) for i in COMPARED]
    _compare_entries(ref, tab, int(batch.ts[-1]))


def test_random_traces_exercise_every_state():
    seen, reasons = set(), np.zeros(K.N_COUNTERS, np.int64)
    for seed in range(24):
        batch, keys = random_trace(seed, n=250)
        tab = ConntrackTable(4096)
        seen |= {CS.state_name(s) for s in tab.process(batch, keys)}
        reasons += tab.ctr
    assert {"new", "established", "related", "invalid"} <= seen
    for name in (
        "checksum",
        "tcp_flags",
        "tcp_new",
        "tcp_state",
        "tcp_window",
        "icmp_orphan",
        "created",
        "ignored",
    ):
        assert reasons[K.R[name]] > 0, name


@pytest.mark.parametrize("liberal,loose", [(True, True), (False, False)])
def test_settings_agree(liberal, loose):
    batch, keys = random_trace(99, n=250)
    ref, want, tab, got = _run_both(batch, keys, tcp_be_liberal=liberal, tcp_loose=loose)
    assert np.array_equal(want, got)


def test_damaged_keys_never_crash_and_agree():
    rng = np.random.default_rng(5)
    batch, keys = random_trace(3, n=200)
    for t in ("u64", "u32", "i32", "u16", "u8"):
        a = getattr(keys, t)
        mask = rng.random(a[:, : keys.n].shape) < 0.05
        a[:, : keys.n][mask] = rng.integers(0, 255, mask.sum()).astype(a.dtype)
    keys.i32[B.L4_OFF, : keys.n] = np.where(rng.random(keys.n) < 0.1, -1, keys.i32[B.L4_OFF, : keys.n])
    ok = rng.random(keys.n) < 0.9
    want = ReferenceConntrack().process(batch, keys, csum_ok=ok)
    got = ConntrackTable(512).process(batch, keys, csum_ok=ok)
    assert np.array_equal(want, got)


def test_sequence_arithmetic_wraps():
    assert before(0xFFFFFFF0, 5) and after(5, 0xFFFFFFF0)
    assert not before(5, 5) and not after(5, 5)


def test_non_ip_is_untracked():
    batch = Batch.from_packets([b"\x00" * 60])
    keys = FlowKeys(1).resize(1)
    assert ConntrackTable(8).process(batch, keys, csum_ok=[True])[0] == 0
