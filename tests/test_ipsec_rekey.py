"""Make-before-break rekey: a new SA pair installed while the old one lives; outbound moves to
the new SAs, inbound accepts old and new SPIs until the old SA is removed or hard-expires;
receive state survives the change of the SA table; the interop vectors still decrypt."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from microseg.io.pcap import read_capture
from microseg.ipsec import esp, evp
from microseg.ipsec.esp_ref import RefGateway
from microseg.ipsec.gateway import EspGateway
from microseg.ipsec.sa import load_config, parse_config, parse_sa
from microseg.packet.batch import LINK_RAW, Batch

BACKENDS = ["cryptography"] + (["evp"] if evp.AVAILABLE else [])
V = Path(__file__).parent / "vectors" / "ipsec"
S = 10**9
A, B = "192.0.2.1", "192.0.2.2"


def _sa(name, spi, key, src, dst, **kw):
    return dict(name=name, spi=spi, key=key * 16, salt="0a0b0c0d", tunnel_src=src, tunnel_dst=dst, **kw)


DOC = {
    "sas": [_sa("a2b", 0x100, "11", A, B), _sa("b2a", 0x200, "22", B, A)],
    "policies": [
        {"src": "10.1.0.0/16", "dst": "10.2.0.0/16", "sa": "a2b"},
        {"src": "10.2.0.0/16", "dst": "10.1.0.0/16", "sa": "b2a"},
    ],
}
CFG = parse_config(DOC)
NEW = {
    "a2b": parse_sa(_sa("a2b-2", 0x101, "33", A, B), 0),
    "b2a": parse_sa(_sa("b2a-2", 0x201, "44", B, A), 1),
}


def _ip4(src, dst, k=0):
    payload = bytes([k]) * 12
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            k,
            0,
            64,
            17,
            0,
            bytes(map(int, src.split("."))),
            bytes(map(int, dst.split("."))),
        )
        + payload
    )


def _a_out(k):
    return _ip4("10.1.0.1", "10.2.0.1", k)


def _b_out(k):
    return _ip4("10.2.0.1", "10.1.0.1", k)


def _b(pkts, t=0):
    return Batch.from_packets(pkts, ts=[t] * len(pkts), linktype=LINK_RAW)


def _spi(pkt):
    return struct.unpack_from("!I", pkt, 20)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rekey_overlap_both_directions(backend):
    ga, gb = EspGateway(CFG, backend), EspGateway(CFG, backend)
    a_old = list(ga.encrypt_batch(_b([_a_out(k) for k in range(4)])).packets())
    b_old = list(gb.encrypt_batch(_b([_b_out(k) for k in range(4)])).packets())
    assert {_spi(p) for p in a_old} == {0x100} and {_spi(p) for p in b_old} == {0x200}
    assert gb.decrypt_batch(_b(a_old[:2]))[1].tolist() == [0, 0]  # two still in flight
    assert ga.decrypt_batch(_b(b_old[:2]))[1].tolist() == [0, 0]
    ga.rekey(NEW, now=5 * S)
    gb.rekey(NEW, now=5 * S)
    assert ga.names == gb.names == ["a2b", "b2a", "a2b-2", "b2a-2"]
    # outbound has switched, by policy and by name
    a_new = list(ga.encrypt_batch(_b([_a_out(k) for k in range(4, 8)])).packets())
    b_new = list(gb.encrypt_batch(_b([_b_out(k) for k in range(4, 8)])).packets())
    assert {_spi(p) for p in a_new} == {0x101} and {_spi(p) for p in b_new} == {0x201}
    forced = next(ga.encrypt_batch(_b([_a_out(9)]), sa="a2b").packets())
    assert _spi(forced) == 0x101
    assert struct.unpack_from("!I", a_new[0], 24)[0] == 1  # the new SA counts from 1
    # inbound takes both during the overlap, interleaved in one batch
    mix = [a_old[2], a_new[0], a_old[3], a_new[1], a_new[2], a_new[3]]
    dec, r = gb.decrypt_batch(_b(mix))
    assert r.tolist() == [0] * 6
    assert list(dec.packets()) == [_a_out(k) for k in (2, 4, 3, 5, 6, 7)]
    dec, r = ga.decrypt_batch(_b(b_new + b_old[2:]))
    assert r.tolist() == [0] * 6
    # replays of the old SA are still caught: its window came through the rekey
    assert gb.decrypt_batch(_b(a_old[:1] + a_new[:1]))[1].tolist() == [esp.REPLAY] * 2
    # break: the old SA goes; its SPI is unknown from then on, the new one carries on
    gb.remove_sa("a2b")
    late = list(ga.encrypt_batch(_b([_a_out(20)])).packets())
    assert gb.decrypt_batch(_b([a_old[0], late[0]]))[1].tolist() == [esp.UNKNOWN_SPI, 0]
    stats = {s["name"]: s for s in gb.sa_stats()}
    assert "a2b" not in stats and stats["a2b-2"]["rx_packets"] == 5
    assert {s["name"]: s["replaced_by"] for s in ga.sa_stats()}["a2b"] == "a2b-2"


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_sa_hard_expires_during_the_overlap(backend):
    doc = {"sas": [dict(s, lifetime={"hard_seconds": 60}) for s in DOC["sas"]], "policies": DOC["policies"]}
    ga, gb = EspGateway(parse_config(doc), backend, now=0), EspGateway(parse_config(doc), backend, now=0)
    old = list(ga.encrypt_batch(_b([_a_out(k) for k in range(3)], 10 * S)).packets())
    ga.rekey(NEW, now=50 * S)
    gb.rekey(NEW, now=50 * S)
    new = list(ga.encrypt_batch(_b([_a_out(k) for k in range(3)], 55 * S)).packets())
    assert gb.decrypt_batch(_b(old[:1], 58 * S))[1].tolist() == [0]
    # past the old SA's hard lifetime: old SPI refused and counted, the new one fine
    dec, r = gb.decrypt_batch(_b([old[1], new[0], old[2], new[1]], 61 * S))
    assert r.tolist() == [esp.EXPIRED, 0, esp.EXPIRED, 0]
    assert gb.drop_counts()["decrypt"] == {"expired": 2}
    assert [(e.kind, e.sa) for e in gb.events] == [("hard", "a2b")]
    # the sender has moved on: its old SA's expiry costs no traffic
    assert ga.encrypt_batch(_b([_a_out(5)], 70 * S), return_reasons=True)[1].tolist() == [0]
    assert [(e.kind, e.sa, e.direction) for e in ga.expire(70 * S)] == [
        ("hard", "a2b", "clock"),
        ("hard", "b2a", "clock"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rekey_matches_the_reference(backend):
    gw, ref = EspGateway(CFG, backend), RefGateway(CFG)
    ref.iv_base = [int(x) for x in gw.iv_base]
    rx, rrx = EspGateway(CFG, backend), RefGateway(CFG)
    sent = []

    def send(pkts):
        out, r = gw.encrypt_batch(_b(pkts), return_reasons=True)
        want = [ref.encrypt(p, LINK_RAW) for p in pkts]
        assert r.tolist() == [w[0] for w in want] and list(out.packets()) == [w[1] for w in want]
        sent.extend(out.packets())

    def recv(pkts):
        out, r = rx.decrypt_batch(_b(pkts))
        want = [rrx.decrypt(p, LINK_RAW) for p in pkts]
        assert r.tolist() == [w[0] for w in want]
        assert list(out.packets()) == [w[1] for w in want if w[0] == 0]
        return r.tolist()

    send([_a_out(k) for k in range(5)] + [_b_out(k) for k in range(3)])
    gw.rekey(NEW)
    ref.rekey(NEW, iv_base=[int(gw.iv_base[2]), int(gw.iv_base[3])])
    send([_a_out(k) for k in range(5)] + [_b_out(k) for k in range(3)])
    rx.rekey(NEW)
    rrx.rekey(NEW)
    assert recv(sent[::2] + sent[1::2] + sent[:3]) == [0] * 16 + [esp.REPLAY] * 3
    rx.remove_sa("b2a")
    rrx.remove_sa("b2a")
    assert recv(sent) == [esp.REPLAY] * 5 + [esp.UNKNOWN_SPI] * 3 + [esp.REPLAY] * 8


def test_rekey_errors():
    gw = EspGateway(CFG)
    with pytest.raises(KeyError):
        gw.rekey({"nope": NEW["a2b"]})
    with pytest.raises(ValueError, match="already used"):
        gw.rekey({"a2b": parse_sa(_sa("x", 0x100, "55", A, B), 0)})
    with pytest.raises(ValueError, match="already installed"):
        gw.rekey({"a2b": parse_sa(_sa("b2a", 0x300, "55", A, B), 0)})
    with pytest.raises(ValueError, match="no installed SA replaces"):
        gw.remove_sa("a2b")
    gw.rekey({"a2b": NEW["a2b"]})
    with pytest.raises(ValueError, match="already replaced"):
        gw.rekey({"a2b": parse_sa(_sa("a2b-3", 0x102, "55", A, B), 0)})
    gw.remove_sa("a2b")
    with pytest.raises(KeyError):
        gw.remove_sa("a2b")
    # a chain of rekeys: the first name still reaches the newest SA
    gw.rekey({"a2b-2": parse_sa(_sa("a2b-3", 0x102, "55", A, B), 0)})
    gw.remove_sa("a2b-2")
    assert _spi(next(gw.encrypt_batch(_b([_a_out(1)]), sa="a2b").packets())) == 0x102
    assert _spi(next(gw.encrypt_batch(_b([_a_out(1)])).packets())) == 0x102
    assert gw.names == ["b2a", "a2b-3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_still_decrypt_across_a_rekey_that_widens_the_window(backend):
    """esp.pcap (scapy/Wireshark-made) split around a rekey that installs an SA with a 4096
    window: the ring of every receive window is laid out again, and loses nothing."""
    vec = json.loads((V / "vectors.json").read_text())
    gw = EspGateway(load_config(V / "vectors.json"), backend)
    batch = read_capture(V / "esp.pcap")
    first, second = batch.slice(0, 18), batch.slice(18, 36)
    assert gw.decrypt_batch(first)[1].tolist() == [0] * 18
    words = gw.rx_bitmap.shape[1]
    gw.rekey({"sa0": parse_sa(_sa("sa0-new", 0x7777, "66", "192.0.2.1", "192.0.2.2", replay_window=4096), 0)})
    assert gw.rx_bitmap.shape[1] == 64 > words
    out, r = gw.decrypt_batch(second)
    assert r.tolist() == [0] * 18
    assert [p[14:].hex() for p in out.packets()] == [p["inner_hex"] for p in vec["packets"][18:]]
    out, r = gw.decrypt_batch(batch)
    assert r.tolist() == [esp.REPLAY] * 36 and len(out) == 0
    tops = {s["name"]: s["rx_top"] for s in gw.sa_stats()}
    assert tops["sa0-new"] == 0 and all(tops[n] > 0 for n in ("sa0", "sa1", "sa2"))


def test_window_bits_survive_a_remap():
    from microseg.ipsec.gateway import _remap_bitmap

    rng = np.random.default_rng(3)
    for window in (1, 64, 100, 1000):
        words = -(-window // 64)
        row = np.zeros(words, np.uint64)
        top = int(rng.integers(window, 10**6))
        seen = {top - d for d in range(window) if rng.random() < 0.5} | {top}
        for s in seen:
            b = s % (words * 64)
            row[b >> 6] |= np.uint64(1 << (b & 63))
        for new_words in (words, words + 1, 64):
            new = _remap_bitmap(row, top, window, new_words)
            got = {
                top - d
                for d in range(window)
                if (int(new[((top - d) % (new_words * 64)) >> 6]) >> ((top - d) % 64)) & 1
            }
            assert got == seen
