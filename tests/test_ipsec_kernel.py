"""Batch kernels == plain-Python reference, on random, replayed, reordered, tampered and
malformed traffic; both AEAD back ends; ESN across the 32-bit boundary (with and without
re-synchronisation); lifetimes in bytes, packets and seconds with their events; SPD."""

import random
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.ipsec import esp, evp
from microseg.ipsec.esp_ref import RefGateway, RefWindow, infer_esn
from microseg.ipsec.gateway import EspGateway
from microseg.ipsec.sa import parse_config
from microseg.packet.batch import LINK_ETHERNET, LINK_RAW, Batch

BACKENDS = ["cryptography"] + (["evp"] if evp.AVAILABLE else [])

DOC = {
    "sas": [
        {
            "name": "v4",
            "spi": 0x1001,
            "key": "00112233445566778899aabbccddeeff",
            "salt": "01020304",
            "tunnel_src": "192.0.2.1",
            "tunnel_dst": "192.0.2.2",
            "replay_window": 32,
            "lifetime": {"soft_seconds": 1.5, "hard_seconds": 3},
        },
        {
            "name": "v6esn",
            "spi": 0x2002,
            "key": "11" * 32,
            "salt": "a1a2a3a4",
            "tunnel_src": "2001:db8:1::1",
            "tunnel_dst": "2001:db8:2::1",
            "esn": True,
            "replay_window": 64,
        },
        {
            "name": "v4big",
            "spi": 0x3003,
            "key": "22" * 24,
            "salt": "b1b2b3b4",
            "tunnel_src": "192.0.2.1",
            "tunnel_dst": "192.0.2.2",
            "replay_window": 1000,
            "lifetime": {"soft_packets": 25, "hard_packets": 40, "soft_bytes": 9000, "hard_bytes": 30000},
        },
        {
            "name": "nowin",
            "spi": 0x4004,
            "key": "33" * 16,
            "salt": "c1c2c3c4",
            "tunnel_src": "192.0.2.1",
            "tunnel_dst": "192.0.2.9",
            "replay_window": 0,
        },
    ],
    "policies": [
        {"src": "10.1.0.0/16", "dst": "10.2.0.0/16", "sa": "v4"},
        {"dst": "2001:db8:b::/48", "sa": "v6esn"},
        {"dst": "198.51.100.0/24", "proto": "udp", "action": "bypass"},
        {"dst": "198.51.100.0/24", "sa": "v4big"},
        {"src": "10.9.0.0/16", "sa": "nowin"},
        {"dst": "10.2.0.0/16", "sa": "v6esn"},  # IPv4 inner over an IPv6 tunnel
        {"src": "10.66.0.0/16", "action": "discard"},
        {"src": "fe80::/10", "sa": "v4big"},  # IPv6 inner over an IPv4 tunnel
    ],
}
CFG = parse_config(DOC)
# the same with ESN re-synchronisation on the ESN SA, tried at every authentication failure
CFG_RS = parse_config(
    {
        "sas": [dict(sa, esn_resync={"after": 1, "tries": 2}) if sa.get("esn") else sa for sa in DOC["sas"]],
        "policies": DOC["policies"],
    }
)
# a receiver with shorter lifetimes than its sender, so that inbound SAs reach them too
CFG_RX = parse_config(
    {
        "sas": [
            dict(
                sa,
                lifetime={
                    "soft_packets": 6,
                    "hard_packets": 12,
                    "hard_bytes": 2500,
                    "soft_seconds": 0.5,
                    "hard_seconds": 1,
                },
            )
            for sa in DOC["sas"]
        ],
        "policies": DOC["policies"],
    }
)
V4_SRC = ["10.1.2.3", "10.9.0.1", "10.66.1.1", "172.16.0.1"]
V4_DST = ["10.2.0.7", "198.51.100.5", "8.8.8.8"]
V6_SRC = ["2001:db8:a::1", "fe80::1"]
V6_DST = ["2001:db8:b::9", "2001:db8:c::9"]


def _ip4(src, dst, proto, payload, tos=0):
    import ipaddress

    h = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            tos,
            20 + len(payload),
            7,
            0,
            64,
            proto,
            0,
            ipaddress.ip_address(src).packed,
            ipaddress.ip_address(dst).packed,
        )
    )
    return bytes(h) + payload


def _ip6(src, dst, nh, payload, tc=0):
    import ipaddress

    return (
        struct.pack(
            "!IHBB16s16s",
            (6 << 28) | (tc << 20),
            len(payload),
            nh,
            64,
            ipaddress.ip_address(src).packed,
            ipaddress.ip_address(dst).packed,
        )
        + payload
    )


def _inner(rng, linktype):
    k = rng.random()
    size = rng.choice([0, 1, 2, 3, 5, 20, 63, 100, 333, 1200])
    payload = bytes(rng.getrandbits(8) for _ in range(size))
    if k < 0.55:
        pkt = _ip4(
            rng.choice(V4_SRC),
            rng.choice(V4_DST),
            rng.choice([6, 17, 1]),
            payload,
            rng.choice([0, 0xB8, 0x03]),
        )
    elif k < 0.9:
        pkt = _ip6(
            rng.choice(V6_SRC), rng.choice(V6_DST), rng.choice([6, 17, 58]), payload, rng.choice([0, 0x2E])
        )
    else:  # malformed or not IP
        pkt = rng.choice(
            [
                b"",
                b"\x45",
                b"\x45" + bytes(30),
                b"\x60" + bytes(10),
                _ip4("10.1.0.1", "10.2.0.1", 6, payload)[:-1] if size else b"\x46" * 19,
                b"\x12" * 40,
            ]
        )
    if rng.random() < 0.2:
        pkt += bytes(rng.randrange(1, 9))  # trailing bytes after the IP packet (L2 padding)
    if linktype == LINK_ETHERNET:
        v = pkt[0] >> 4 if pkt else 0
        et = {4: 0x0800, 6: 0x86DD}.get(v, 0x0806)
        if rng.random() < 0.1:
            return b"\x02" * 6 + b"\x04" * 6 + b"\x81\x00\x00\x05" + struct.pack("!H", et) + pkt
        return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", et) + pkt
    return pkt


def _sync(gw, ref):
    ref.iv_base = [int(x) for x in gw.iv_base]


def _events(gw):
    return [(e.kind, e.sa, e.limit, e.direction, e.at) for e in gw.events]


def _by_time(events):
    """Events in time order; one batch's events at the same time may come in any SA order."""
    return sorted(events, key=lambda e: (e[4], e[1], e[0] == "hard"))


def _same_state(gw, ref):
    assert [int(x) for x in gw.tx_seq] == ref.tx_seq
    assert [int(x) for x in gw.rx_top] == [w.top for w in ref.win]
    assert gw.life[:, :4].astype(object).tolist() == ref.life
    stats = gw.sa_stats()
    assert [s["soft_expired"] for s in stats] == [lt.soft and lt.soft[0] for lt in ref.lt]
    assert [s["hard_expired"] for s in stats] == [lt.hard and lt.hard[0] for lt in ref.lt]
    assert _by_time(_events(gw)) == _by_time(ref.events)


def _run(seed, backend):
    rng = random.Random(seed)
    linktype = rng.choice([LINK_ETHERNET, LINK_RAW])
    cfg = rng.choice([CFG, CFG_RS])
    rcfg = rng.choice([cfg, CFG_RX])
    tx, rtx = EspGateway(cfg, backend), RefGateway(cfg)
    rx, rrx = EspGateway(rcfg, backend), RefGateway(rcfg)
    _sync(tx, rtx)
    clock = [rng.randrange(0, 2**40)]
    step = rng.choice([0, 10**6, 5 * 10**7])  # ns between packets: v4's 1.5 s / 3 s limits

    def stamps(k):
        out = []
        for _ in range(k):
            clock[0] += rng.randrange(0, 2 * step + 1)
            out.append(clock[0])
        return out

    if rng.random() < 0.5:  # ESN: start close to the 32-bit boundary on both sides
        start = 2**32 - rng.randrange(1, 30)
        tx.tx_seq[1] = rtx.tx_seq[1] = start
        rx.rx_top[1] = rrx.win[1].top = start - rng.randrange(0, 5)
    if rng.random() < 0.3:  # a 32-bit counter about to run out: the SA must stop
        tx.tx_seq[0] = rtx.tx_seq[0] = 2**32 - 1 - rng.randrange(0, 4)
        rx.rx_top[0] = rrx.win[0].top = int(tx.tx_seq[0])
    pkts = [_inner(rng, linktype) for _ in range(rng.randrange(1, 120))]
    enc_all, tx_reasons = [], []
    pos = 0
    while pos < len(pkts):  # random batch sizes
        k = rng.randrange(1, 40)
        chunk = pkts[pos : pos + k]
        pos += k
        ts = stamps(len(chunk))
        out, reason = tx.encrypt_batch(
            Batch.from_packets(chunk, ts=ts, linktype=linktype), return_reasons=True
        )
        want = [rtx.encrypt(p, linktype, t=t) for p, t in zip(chunk, ts)]
        assert reason.tolist() == [w[0] for w in want]
        assert list(out.packets()) == [w[1] for w in want if w[0] == esp.OK]
        enc_all += [w[1] for w in want if w[0] == esp.OK]
        tx_reasons += [w[0] for w in want]
    _same_state(tx, rtx)
    assert tx.tx_drops.tolist() == np.bincount(tx_reasons, minlength=esp.N_REASONS).tolist()
    # the receive side gets a mangled stream
    stream = []
    for p in enc_all:
        r = rng.random()
        if r < 0.08 and stream:
            stream.append(rng.choice(stream))  # replay
        elif r < 0.14:
            b = bytearray(p)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)  # tamper anywhere
            stream.append(bytes(b))
        elif r < 0.18:
            stream.append(p[: rng.randrange(len(p))])  # truncate
        elif r < 0.22:
            continue  # lost
        stream.append(p)
        if r > 0.9 and len(stream) > 2:  # reorder
            j = rng.randrange(max(0, len(stream) - 70), len(stream))
            stream[j], stream[-1] = stream[-1], stream[j]
    stream += [_inner(rng, linktype) for _ in range(3)]  # not ESP at all
    clock[0] -= rng.randrange(0, 2**31)  # the receiver's clock: earlier than the sender's
    pos = 0
    while pos < len(stream):
        k = rng.randrange(1, 50)
        chunk = stream[pos : pos + k]
        pos += k
        ts = stamps(len(chunk))
        out, reason = rx.decrypt_batch(Batch.from_packets(chunk, ts=ts, linktype=linktype))
        want = [rrx.decrypt(p, linktype, t=t) for p, t in zip(chunk, ts)]
        assert reason.tolist() == [w[0] for w in want]
        assert list(out.packets()) == [w[1] for w in want if w[0] == esp.OK]
    _same_state(rx, rrx)
    return rx


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_kernel_matches_reference(seed):
    for backend in BACKENDS:
        _run(seed, backend)


def test_roundtrip_restores_every_inner_packet():
    rng = random.Random(7)
    for backend in BACKENDS:
        for linktype in (LINK_ETHERNET, LINK_RAW):
            pkts = [
                _ip4("10.1.0.1", "10.2.0.2", 17, bytes(rng.getrandbits(8) for _ in range(n)))
                for n in range(0, 300, 7)
            ]
            pkts += [_ip6("2001:db8:a::1", "2001:db8:b::2", 6, bytes(n)) for n in range(0, 90, 11)]
            if linktype == LINK_ETHERNET:
                pkts = [b"\x02" * 12 + (b"\x08\x00" if p[0] == 0x45 else b"\x86\xdd") + p for p in pkts]
            tx, rx = EspGateway(CFG, backend), EspGateway(CFG, backend)
            enc = tx.encrypt_batch(Batch.from_packets(pkts, linktype=linktype))
            assert len(enc) == len(pkts)
            dec, reason = rx.decrypt_batch(enc)
            assert reason.tolist() == [0] * len(pkts)
            assert list(dec.packets()) == pkts


def test_backends_give_identical_bytes(monkeypatch):
    from microseg.ipsec import gateway

    pkts = [_ip4("10.1.0.1", "10.2.0.2", 17, bytes(range(n % 256)) * 2) for n in range(50)]
    outs, inners = [], []
    for backend, into in [(b, True) for b in BACKENDS] + [("cryptography", False)]:
        monkeypatch.setattr(gateway, "_HAS_INTO", into and gateway._HAS_INTO)
        gw = EspGateway(CFG, backend)
        gw.iv_base[:] = 12345
        outs.append(list(gw.encrypt_batch(Batch.from_packets(pkts, linktype=LINK_RAW)).packets()))
        enc = outs[-1][:10] + [outs[-1][10][:-1] + bytes([outs[-1][10][-1] ^ 1])] + outs[-1][11:]
        dec, reason = EspGateway(CFG, backend).decrypt_batch(Batch.from_packets(enc, linktype=LINK_RAW))
        assert reason.tolist() == [0] * 10 + [esp.BAD_ICV] + [0] * 39
        inners.append(list(dec.packets()))
    assert all(o == outs[0] for o in outs)
    assert all(i == pkts[:10] + pkts[11:] for i in inners)


def test_iv_never_repeats_and_instances_start_apart():
    a, b = EspGateway(CFG), EspGateway(CFG)
    assert a.iv_base.tolist() != b.iv_base.tolist()
    pkts = [_ip4("10.1.0.1", "10.2.0.2", 17, b"x")] * 300
    ivs = set()
    for _ in range(3):
        for p in a.encrypt_batch(Batch.from_packets(pkts, linktype=LINK_RAW)).packets():
            ivs.add(p[28:36])
    assert len(ivs) == 900


def test_sequence_counter_exhaustion_stops_the_sa():
    gw = EspGateway(CFG)
    gw.tx_seq[0] = 2**32 - 3
    p = _ip4("10.1.0.1", "10.2.0.2", 17, b"abc")
    out, reason = gw.encrypt_batch(Batch.from_packets([p] * 5, linktype=LINK_RAW), return_reasons=True)
    assert reason.tolist() == [0, 0, esp.EXPIRED, esp.EXPIRED, esp.EXPIRED]
    assert [struct.unpack_from("!I", q, 24)[0] for q in out.packets()] == [2**32 - 2, 2**32 - 1]
    assert gw.sa_stats()[0]["stopped"]
    assert gw.drop_counts()["encrypt"] == {"expired": 3}


def test_lifetime_packets_and_bytes():
    doc = {"sas": [dict(DOC["sas"][0], lifetime=None, lifetime_packets=3)]}
    gw = EspGateway(parse_config(doc))
    p = _ip4("10.1.0.1", "10.2.0.2", 17, b"abc")
    _, reason = gw.encrypt_batch(Batch.from_packets([p] * 5, linktype=LINK_RAW), sa=0, return_reasons=True)
    assert reason.tolist() == [0, 0, 0, esp.EXPIRED, esp.EXPIRED]
    doc = {"sas": [dict(DOC["sas"][0], lifetime=None, lifetime_bytes=100)]}
    gw = EspGateway(parse_config(doc))
    p = _ip4("10.1.0.1", "10.2.0.2", 17, bytes(20))  # 40 bytes each
    _, reason = gw.encrypt_batch(Batch.from_packets([p] * 3, linktype=LINK_RAW), sa=0, return_reasons=True)
    assert reason.tolist() == [0, 0, esp.EXPIRED]


def test_policy_default_is_discard():
    doc = {"sas": DOC["sas"][:1], "policies": [{"dst": "10.2.0.0/16", "sa": "v4"}]}
    gw = EspGateway(parse_config(doc))
    pk = [_ip4("10.1.0.1", "10.2.0.2", 17, b""), _ip4("10.1.0.1", "10.3.0.2", 17, b"")]
    out, reason = gw.encrypt_batch(Batch.from_packets(pk, linktype=LINK_RAW), return_reasons=True)
    assert reason.tolist() == [esp.OK, esp.NO_POLICY] and len(out) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.sampled_from([1, 32, 64, 1000]))
def test_esn_inference_matches_reference(top, seql, w):
    got = int(esp.infer_seq(np.uint64(top), seql, w, True))
    want = infer_esn(top, seql, w)
    assert got == (0 if want is None else want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=200), st.sampled_from([0, 1, 5, 64, 65, 128]))
def test_replay_window_matches_reference(seqs, w):
    ref = RefWindow(w)
    bitmap = np.zeros(max(1, -(-w // 64)), np.uint64)
    top = np.uint64(0)
    for s in seqs:
        s = np.uint64(s)
        ok = bool(esp.replay_check(top, bitmap, s, w))
        assert ok == ref.ok(int(s))
        if ok:
            top = np.uint64(esp.replay_update(top, bitmap, s, w))
            ref.add(int(s))
        assert int(top) == ref.top


def test_outer_ipv6_extension_headers_and_fragments():
    """Outer IPv6 with extension headers before ESP is accepted; an outer fragment is not."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.packet import Raw

    for backend in BACKENDS:
        tx = EspGateway(CFG, backend)
        inner = _ip6("2001:db8:a::1", "2001:db8:b::2", 17, b"hello")
        enc = next(tx.encrypt_batch(Batch.from_packets([inner], linktype=LINK_RAW)).packets())
        esp_bytes = enc[40:]
        base = IPv6(src="2001:db8:1::1", dst="2001:db8:2::1")
        pkts = [
            bytes(base / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(nh=50) / Raw(esp_bytes)),
            bytes(base / IPv6ExtHdrFragment(nh=50, m=1) / Raw(esp_bytes)),
            bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:9::1", nh=50) / Raw(esp_bytes)),
        ]
        rx, ref = EspGateway(CFG, backend), RefGateway(CFG)
        out, reason = rx.decrypt_batch(Batch.from_packets(pkts, linktype=LINK_RAW))
        assert reason.tolist() == [esp.OK, esp.MALFORMED, esp.UNKNOWN_SPI]
        assert [ref.decrypt(p, LINK_RAW)[0] for p in pkts] == reason.tolist()
        assert list(out.packets()) == [inner]


def test_unsupported_link_type_is_an_input_error():
    import pytest

    from microseg.errors import InputError

    gw = EspGateway(CFG)
    b = Batch.from_packets([b"\x00" * 40], linktype=113)
    with pytest.raises(InputError, match="link type 113"):
        gw.encrypt_batch(b, sa=0)
    with pytest.raises(InputError, match="link type 113"):
        gw.decrypt_batch(b)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["raw", "v4esp", "v6esp", "eth"]), st.binary(max_size=120)),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from([LINK_RAW, LINK_ETHERNET]),
)
def test_decrypt_garbage_matches_reference(items, linktype):
    """Arbitrary bytes, alone or behind plausible outer headers with a known SPI: never a crash,
    always the reference's verdict."""
    pkts = []
    for kind, tail in items:
        if kind == "v4esp":
            p = _ip4("192.0.2.1", "192.0.2.2", 50, struct.pack("!I", 0x1001) + tail)
        elif kind == "v6esp":
            p = _ip6("2001:db8:1::1", "2001:db8:2::1", 50, struct.pack("!I", 0x2002) + tail)
        elif kind == "eth":
            p = b"\x02" * 12 + b"\x08\x00" + tail
        else:
            p = tail
        if linktype == LINK_ETHERNET and kind != "eth":
            et = b"\x86\xdd" if p[:1] and p[0] >> 4 == 6 else b"\x08\x00"
            p = b"\x02" * 12 + et + p
        pkts.append(p)
    for backend in BACKENDS:
        gw, ref = EspGateway(CFG, backend), RefGateway(CFG)
        out, reason = gw.decrypt_batch(Batch.from_packets(pkts, linktype=linktype))
        want = [ref.decrypt(p, linktype) for p in pkts]
        assert reason.tolist() == [w[0] for w in want]
        assert list(out.packets()) == [w[1] for w in want if w[0] == esp.OK]
        enc, reason = gw.encrypt_batch(Batch.from_packets(pkts, linktype=linktype), return_reasons=True)
        ref.iv_base = [int(x) for x in gw.iv_base]
        want = [ref.encrypt(p, linktype) for p in pkts]
        assert reason.tolist() == [w[0] for w in want]
        assert list(enc.packets()) == [w[1] for w in want if w[0] == esp.OK]


def test_dropped_plaintext_is_wiped_from_the_output_buffer():
    for backend in BACKENDS:
        secret = b"S3CRET-PAYLOAD-" * 4
        inner = _ip4("10.1.0.1", "10.2.0.2", 17, secret)
        enc = list(
            EspGateway(CFG, backend)
            .encrypt_batch(Batch.from_packets([inner, inner], linktype=LINK_RAW))
            .packets()
        )
        bad = bytearray(enc[1])
        bad[-1] ^= 1
        # a replay inside the batch (authenticated, refused) and a bad ICV
        out, reason = EspGateway(CFG, backend).decrypt_batch(
            Batch.from_packets([enc[0], enc[0], bytes(bad)], linktype=LINK_RAW)
        )
        assert reason.tolist() == [esp.OK, esp.REPLAY, esp.BAD_ICV]
        assert out.data.tobytes().count(secret) == 1
