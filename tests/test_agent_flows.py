"""The batch grouped by connection (``agent.flows``) against the per-packet loops it replaced.

The inspection chain's ``divert`` and the kernel fast-path manager's ``observe`` used to look
each packet up in their dicts; they now group the batch first. The per-packet forms are kept
here as the reference, and both run on the same random batches: several connections, both
directions, interleaved, some blocked, some ending, the engine down now and then.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.agent import flows as FL
from microseg.agent import ids as I
from microseg.ctstate import REPLY
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.packet.parse import parse


def _frames(rng: random.Random, n: int, conns: int):
    """``n`` frames over ``conns`` connections (a few share addresses or ports), either
    direction, with a conntrack-like REPLY bit: the connection's first frame is its original."""
    ends = []
    for c in range(conns):
        a = (f"10.0.{c % 3}.{1 + c % 2}", 40000 + (c % 4))
        b = (f"10.0.9.{1 + c % 5}", 80 + (c % 2))
        ends.append((a, b, rng.choice((6, 17))))
    frames, ct, opened = [], [], set()
    for _ in range(n):
        c = rng.randrange(conns)
        (a, b, proto) = ends[c]
        back = c in opened and rng.random() < 0.5
        opened.add(c)
        (s, sp), (d, dp) = (b, a) if back else (a, b)
        if proto == 6:
            frames.append(PB.tcp_packet(s, d, sp, dp, b"x", flags="PA"))
        else:
            frames.append(PB.udp_packet(s, d, sp, dp, b"x"))
        ct.append(REPLY if back else 0)
    b = Batch.from_packets(frames)
    return b, parse(b), np.array(ct, np.uint32)


def _ident_ref(k, ct, i):
    s = (int(k.src_hi[i]), int(k.src_lo[i]), int(k.sport[i]))
    d = (int(k.dst_hi[i]), int(k.dst_lo[i]), int(k.dport[i]))
    if ct is not None and int(ct[i]) & REPLY:
        s, d = d, s
    return (int(k.tenant[i]), int(k.proto[i]), s[0], s[1], d[0], d[1], s[2], d[2])


def _flow_ref(k, i):
    a = (int(k.src_hi[i]), int(k.src_lo[i]), int(k.sport[i]))
    b = (int(k.dst_hi[i]), int(k.dst_lo[i]), int(k.dport[i]))
    return I._flow(int(k.tenant[i]), int(k.proto[i]), a, b)


@given(st.integers(0, 2**32), st.integers(0, 300), st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_groups_are_the_connections_in_order_of_first_packet(seed, n, conns):
    b, k, ct = _frames(random.Random(seed), n, conns)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=rng.integers(0, n + 1), replace=False)) if n else np.zeros(0, np.int64)
    gr = FL.group(k, rows)
    want: dict[tuple, list[int]] = {}
    for j, i in enumerate(rows.tolist()):
        want.setdefault(_flow_ref(k, i), []).append(j)
    assert gr.flows == list(want)
    for g, f in enumerate(gr.flows):
        assert gr.members(g).tolist() == want[f]
        assert gr.ident(g, k, ct) == _ident_ref(k, ct, int(rows[want[f][0]]))


def test_groups_are_exact_when_the_hash_collides(monkeypatch):
    b, k, ct = _frames(random.Random(5), 200, 9)
    rows = np.arange(len(b))
    want = FL.group(k, rows)
    monkeypatch.setattr(FL, "_MIX", np.uint64(0))  # every row hashes alike
    got = FL.group(k, rows)
    assert got.flows == want.flows and len(want) > 1
    assert [got.members(g).tolist() for g in range(len(got))] == [
        want.members(g).tolist() for g in range(len(want))
    ]


class _Recording(I._Inspection):
    """An engine that inspects by rule of thumb: a packet whose flow hash is 0 mod 7 blocks
    its flow, one that is 3 mod 11 ends it as bypass; the engine is down on batches the test
    says."""

    engine = "test"
    active = True
    ready = True

    def __init__(self, packets):
        super().__init__(packets)
        self.down = False
        self.calls = []

    def _inspect(self, batch, keys, todo, pos, flows, keep, ct):
        self.calls.append((todo.tolist(), pos.tolist()))
        assert flows == [_flow_ref(keys, i) for i in todo.tolist()]  # each row's own flow
        if self.down:
            keep[pos] = False
            return False
        for j, i in zip(pos.tolist(), todo.tolist()):
            f = _flow_ref(keys, i)
            h = hash(f) ^ (i * 2654435761)
            if f in self.blocked or self._seen[f][2] is not None:
                continue
            if h % 7 == 0:
                keep[j] = False
                self._block(f, j)
            elif h % 11 == 3:
                self._end(f, "bypass")
        return True


def _divert_ref(self, batch, keys, rows, ct=None):
    """``divert`` as it was: one dict probe per packet."""
    keep = np.ones(rows.size, bool)
    todo, pos, touched, over = [], [], [], []
    k = keys
    for j, i in enumerate(rows.tolist()):
        f = _flow_ref(k, i)
        if self.blocked and f in self.blocked:
            keep[j] = False
            self.counts["ids_blocked"] += 1
            self.hits.add(f)
            continue
        st_ = self._seen.get(f)
        if st_ is None or st_[1] is None:
            ident = _ident_ref(k, ct, i)
            if st_ is None:
                st_ = self._seen[f] = [0, ident, None]
            else:
                st_[1] = ident
        if st_[2] is not None:
            continue
        if st_[0] >= self.packets:
            over.append(j)
            continue
        st_[0] += 1
        todo.append(i)
        pos.append(j)
        touched.append(f)
    if todo:
        flows = [_flow_ref(k, i) for i in todo]
        done = self._inspect(batch, keys, np.array(todo, np.int64), np.array(pos, np.int64), flows, keep, ct)
        if done is False:
            for f in touched:
                st_ = self._seen.get(f)
                if st_ is not None and st_[2] is None:
                    st_[0] -= 1
            touched = []
            if over:
                keep[over] = False
                self.counts["fail_closed"] += len(over)
        for f in touched:
            st_ = self._seen.get(f)
            if st_ is not None and st_[2] is None and st_[0] >= self.packets:
                self._end(f, "packets")
    if self._blocked_now:
        for j, i in enumerate(rows.tolist()):
            f = _flow_ref(k, i)
            p = self._blocked_now.get(f)
            if p is not None and j > p and keep[j]:
                keep[j] = False
                self.counts["ids_blocked"] += 1
                self.hits.add(f)
        self._blocked_now.clear()
    return keep


@pytest.mark.parametrize("packets", [1, 3, 16])
@pytest.mark.parametrize("seed", range(12))
def test_divert_by_connection_equals_divert_by_packet(seed, packets):
    rng = random.Random(seed)
    new, ref = _Recording(packets), _Recording(packets)
    for _batch in range(6):
        n = rng.randrange(0, 200)
        b, k, ct = _frames(rng, n, rng.randrange(1, 10)) if n else _frames(rng, 1, 1)
        rows = np.array(sorted(rng.sample(range(len(b)), rng.randrange(0, len(b) + 1))), np.int64)
        new.down = ref.down = rng.random() < 0.2
        got = new.divert(b, k, rows, ct)
        want = _divert_ref(ref, b, k, rows, ct)
        assert got.tolist() == want.tolist()
        assert new.calls == ref.calls
        assert new.counts == ref.counts
        assert new._seen == ref._seen and new.blocked.keys() == ref.blocked.keys()
        assert new.ended == ref.ended and new.hits == ref.hits


def _observe_ref(ko, k, ct, rows):
    """``observe``'s counting as it was, one dict probe per packet: the (row, ident) pairs it
    offered (each connection once, at the packet that reached after_packets)."""
    ready, offered = [], set()
    for i in rows.tolist():
        ident = _ident_ref(k, ct, i)
        if ident in ko.flows:
            continue
        c = ko._count.get(ident, 0) + 1
        ko._count[ident] = c
        if c >= ko.cfg.after_packets and ident not in offered:
            offered.add(ident)
            ready.append((i, ident))
    return ready


@pytest.mark.parametrize("after", [1, 2, 5])
@pytest.mark.parametrize("seed", range(10))
def test_kfast_counts_by_connection_as_it_counted_by_packet(seed, after):
    import types

    from microseg.agent.kfast import KernelOffload, OffloadConfig
    from microseg.policy import verdict as V

    rng = random.Random(seed)
    new = KernelOffload(types.SimpleNamespace(), OffloadConfig(after_packets=after))
    ref = KernelOffload(types.SimpleNamespace(), OffloadConfig(after_packets=after))
    got: list = []
    new.fp = object()  # observe only needs one; _offload is replaced below
    new._offload = lambda batch, res, ready: got.extend(ready)  # type: ignore[method-assign]
    for _batch in range(5):
        n = rng.randrange(1, 150)
        b, k, ct = _frames(rng, n, rng.randrange(1, 8))
        ct = ct | np.uint32(2)  # ESTABLISHED
        # some connections already offloaded, some refused for good
        for i in rng.sample(range(len(b)), min(2, len(b))):
            ident = _ident_ref(k, ct, i)
            if rng.random() < 0.5:
                new.flows[ident] = ref.flows[ident] = object()
            else:
                new._count[ident] = ref._count[ident] = -(1 << 30)
        k.tcp_flags[: len(b)] = 0x10  # bare ACKs: established, not ending
        res = types.SimpleNamespace(keys=k, ct=ct, verdict=np.full(len(b), V.ALLOW, np.uint8))
        got.clear()
        new.observe(b, res)
        want = _observe_ref(ref, k, ct, np.arange(len(b)))
        assert sorted(got) == sorted(want)  # _offload orders them itself (encrypted, bytes, row)
        assert new._count == ref._count
