"""ESN re-synchronisation (RFC 4303 Appendix A3): after a configured number of consecutive
authentication failures the receiver retries a packet with the next high-order values and
commits one only if the packet authenticates; forged and old packets never move it."""

import struct

import pytest

from microseg.ipsec import esp, evp
from microseg.ipsec.esp_ref import RefGateway
from microseg.ipsec.gateway import EspGateway
from microseg.ipsec.sa import parse_config
from microseg.packet.batch import LINK_RAW, Batch

BACKENDS = ["cryptography"] + (["evp"] if evp.AVAILABLE else [])
ESN = {
    "name": "e",
    "spi": 0x3003,
    "key": "22" * 16,
    "salt": "b1b2b3b4",
    "tunnel_src": "192.0.2.1",
    "tunnel_dst": "192.0.2.2",
    "esn": True,
    "replay_window": 64,
}
BAD, OK, REPLAY = esp.BAD_ICV, esp.OK, esp.REPLAY
TOP = (4 << 32) + 1000  # the receiver: high half 4, low half 1000


def _inner(k):
    payload = struct.pack("!I", k) * 4
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            k & 0xFFFF,
            0,
            64,
            17,
            0,
            bytes([10, 1, 0, 1]),
            bytes([10, 2, 0, 1]),
        )
        + payload
    )


def _sender(seq_next):
    """ESP packets from a sender whose next sequence number is ``seq_next``."""
    gw = EspGateway(parse_config({"sas": [ESN]}))
    gw.tx_seq[0] = seq_next - 1

    def send(ks):
        return list(
            gw.encrypt_batch(Batch.from_packets([_inner(k) for k in ks], linktype=LINK_RAW), sa=0).packets()
        )

    return send


def _receivers(backend, after=3, tries=1, top=TOP):
    doc = {"sas": [dict(ESN, esn_resync={"after": after, "tries": tries})]}
    gw, ref = EspGateway(parse_config(doc), backend), RefGateway(parse_config(doc))
    gw.rx_top[0] = ref.win[0].top = top
    return gw, ref


def _feed(gw, ref, pkts, per_batch=None):
    """Reasons from the gateway (in batches of ``per_batch``) and the reference, held equal."""
    got, inner = [], []
    step = per_batch or max(1, len(pkts))
    for i in range(0, len(pkts), step):
        out, r = gw.decrypt_batch(Batch.from_packets(pkts[i : i + step], linktype=LINK_RAW))
        got += r.tolist()
        inner += list(out.packets())
    want = [ref.decrypt(p, LINK_RAW) for p in pkts]
    assert got == [w[0] for w in want]
    assert inner == [w[1] for w in want if w[0] == OK]
    assert int(gw.rx_top[0]) == ref.win[0].top
    return got, inner


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [None, 1, 4])
def test_resync_after_a_burst_of_2_32_lost_packets(backend, per_batch):
    # the sender went on through 2^32 packets the receiver never saw: same low half region,
    # next high half; the receiver guesses high half 4 and every packet fails authentication
    pkts = _sender((5 << 32) + 2000)(range(7))
    gw, ref = _receivers(backend)
    got, inner = _feed(gw, ref, pkts, per_batch)
    assert got == [BAD, BAD, OK, OK, OK, OK, OK]
    assert inner == [_inner(k) for k in range(2, 7)]
    assert int(gw.rx_top[0]) == (5 << 32) + 2006
    assert gw.resync_counts == {"attempts": 1, "resynchronised": 1}
    assert gw.drop_counts()["decrypt"] == {"bad_icv": 2}
    # the window after the jump: replays refused, the old high half gone
    assert _feed(gw, ref, pkts[2:4])[0] == [REPLAY, REPLAY]
    assert _feed(gw, ref, _sender(TOP + 1)([9]))[0] == [BAD]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resync_tries_successive_high_halves(backend):
    pkts = _sender((6 << 32) + 2000)(range(7))  # two high halves ahead
    gw, ref = _receivers(backend, tries=1)
    assert _feed(gw, ref, pkts)[0] == [BAD] * 7
    assert gw.resync_counts == {"attempts": 2, "resynchronised": 0}  # 3rd and 6th packets
    assert int(gw.rx_top[0]) == TOP
    gw, ref = _receivers(backend, tries=2)
    assert _feed(gw, ref, pkts)[0] == [BAD, BAD, OK, OK, OK, OK, OK]
    assert int(gw.rx_top[0]) == (6 << 32) + 2006


@pytest.mark.parametrize("backend", BACKENDS)
def test_forged_packet_at_the_trigger_does_not_resync(backend):
    send = _sender((5 << 32) + 2000)
    genuine = send(range(8))
    forged = bytearray(genuine[2])
    forged[-1] ^= 0x40  # the third failure is a forgery (bad ICV)
    stream = genuine[:2] + [bytes(forged)] + genuine[3:]
    gw, ref = _receivers(backend)
    got, inner = _feed(gw, ref, stream)
    # the forgery's retry fails: nothing moves, the count restarts; three genuine failures
    # later the next retry authenticates
    assert got == [BAD, BAD, BAD, BAD, BAD, OK, OK, OK]
    assert inner == [_inner(k) for k in (5, 6, 7)]
    assert gw.resync_counts == {"attempts": 2, "resynchronised": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_forgeries_alone_never_move_the_window(backend):
    junk = []
    for k in range(12):
        body = struct.pack("!II", ESN["spi"], 1500 + k) + bytes(range(k, k + 48))
        junk.append(
            struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                20 + len(body),
                1,
                0,
                64,
                50,
                0,
                bytes([192, 0, 2, 1]),
                bytes([192, 0, 2, 2]),
            )
            + body
        )
    junk = [_fix_csum(p) for p in junk]
    gw, ref = _receivers(backend, after=2, tries=4)
    assert _feed(gw, ref, junk, per_batch=5)[0] == [BAD] * 12
    assert int(gw.rx_top[0]) == TOP and gw.resync_counts["resynchronised"] == 0
    assert gw.resync_counts["attempts"] == 6
    # the receiver still follows the real sender in its own high half
    assert _feed(gw, ref, _sender(TOP + 1)(range(3)))[0] == [OK] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_packets_never_resync(backend):
    """A genuine packet from an earlier high half (a replay) fails under every higher one."""
    old = _sender((4 << 32) + 3000)(range(4))
    gw, ref = _receivers(backend, after=1, tries=3, top=(5 << 32) + 10)
    assert _feed(gw, ref, old)[0] == [BAD] * 4
    assert int(gw.rx_top[0]) == (5 << 32) + 10
    assert gw.resync_counts == {"attempts": 4, "resynchronised": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_good_packet_resets_the_count(backend):
    ahead = _sender((5 << 32) + 2000)(range(4))
    here = _sender(TOP + 1)(range(2))
    gw, ref = _receivers(backend)
    stream = [ahead[0], ahead[1], here[0], ahead[2], ahead[3], here[1]]
    assert _feed(gw, ref, stream)[0] == [BAD, BAD, OK, BAD, BAD, OK]
    assert gw.resync_counts["attempts"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_resync_the_burst_keeps_failing(backend):
    pkts = _sender((5 << 32) + 2000)(range(8))
    gw = EspGateway(parse_config({"sas": [ESN]}), backend)
    gw.rx_top[0] = TOP
    assert gw.decrypt_batch(Batch.from_packets(pkts, linktype=LINK_RAW))[1].tolist() == [BAD] * 8
    assert gw.resync_counts["attempts"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_resync_in_a_mixed_batch_with_details(backend):
    """Packets of another SA around the re-synchronised one: all in order, details aligned."""
    other = {
        "name": "o",
        "spi": 0x4004,
        "key": "33" * 16,
        "salt": "c1c2c3c4",
        "tunnel_src": "192.0.2.1",
        "tunnel_dst": "192.0.2.2",
    }
    cfg = parse_config({"sas": [dict(ESN, esn_resync={"after": 2}), other]})
    tx = EspGateway(parse_config({"sas": [ESN, other]}))
    tx.tx_seq[0] = (5 << 32) + 1999
    mk = lambda ks, sa: list(
        tx.encrypt_batch(Batch.from_packets([_inner(k) for k in ks], linktype=LINK_RAW), sa=sa).packets()
    )
    e, o = mk(range(4), 0), mk(range(10, 14), 1)
    stream = [o[0], e[0], o[1], e[1], o[2], e[2], e[3], o[3]]
    gw = EspGateway(cfg, backend)
    gw.rx_top[0] = TOP
    out, r, info = gw.decrypt_batch(Batch.from_packets(stream, linktype=LINK_RAW), details=True)
    assert r.tolist() == [OK, BAD, OK, OK, OK, OK, OK, OK]
    assert list(out.packets()) == [_inner(k) for k in (10, 11, 1, 12, 2, 3, 13)]
    assert info["seq"].tolist()[3] == (5 << 32) + 2001 and info["seq"].tolist()[1] == (4 << 32) + 2000
    assert info["plaintext"][1] is None and info["plaintext"][3] is not None
    assert len(info["plaintext"]) == len(info["pad_length"]) == 8
    ref = RefGateway(cfg)
    ref.win[0].top = TOP
    assert [ref.decrypt(p, LINK_RAW)[0] for p in stream] == r.tolist()


def _fix_csum(p):
    h = bytearray(p[:20])
    h[10:12] = b"\0\0"
    s = sum(struct.unpack("!10H", bytes(h)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    h[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(h) + p[20:]
