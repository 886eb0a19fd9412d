"""SA lifetimes (RFC 4301 4.4.2.1): soft then hard in bytes, packets and seconds, in both
directions, each event once, time from the packets' timestamps or an explicit ``now``; the
kernels agree with the per-packet reference throughout."""

import json
import struct

import pytest

from microseg.cli import main
from microseg.io.pcap import read_capture, write_pcap
from microseg.ipsec import esp, evp
from microseg.ipsec.esp_ref import RefGateway
from microseg.ipsec.gateway import EspGateway, LifetimeEvent
from microseg.ipsec.sa import parse_config
from microseg.packet.batch import LINK_RAW, Batch

BACKENDS = ["cryptography"] + (["evp"] if evp.AVAILABLE else [])
S = 10**9
SA = {
    "name": "a",
    "spi": 0x1001,
    "key": "00112233445566778899aabbccddeeff",
    "salt": "01020304",
    "tunnel_src": "192.0.2.1",
    "tunnel_dst": "192.0.2.2",
}
E = esp.EXPIRED


def _cfg(**lifetime):
    return parse_config({"sas": [dict(SA, lifetime=lifetime)]})


def _ip4(payload=b"\x00" * 20):
    h = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        0,
        64,
        17,
        0,
        bytes([10, 1, 0, 1]),
        bytes([10, 2, 0, 1]),
    )
    return h + payload  # 40 bytes by default


def _batch(pkts, ts):
    return Batch.from_packets(pkts, ts=ts, linktype=LINK_RAW)


def _ev(gw):
    return [(e.kind, e.limit, e.direction, e.at) for e in gw.events]


def _ref_ev(ref):
    return [(k, lim, d, at) for k, _, lim, d, at in ref.events]


def _esp(n, ts=None):
    """n ESP packets of 40-byte inner packets from a sender without limits."""
    gw = EspGateway(parse_config({"sas": [SA]}))
    return list(gw.encrypt_batch(_batch([_ip4()] * n, ts or [0] * n), sa=0).packets())


CASES = [  # limit, soft, hard, packets that pass out of 8 (40 bytes each), index of the hard event
    ({"soft_packets": 3, "hard_packets": 5}, "packets", 5, 4),
    ({"soft_bytes": 120, "hard_bytes": 200}, "bytes", 5, 4),  # both reached exactly
    ({"soft_bytes": 100, "hard_bytes": 190}, "bytes", 4, 4),  # the 5th would pass it
    ({"soft_seconds": 2, "hard_seconds": 4.5}, "seconds", 5, 5),  # packets 1 s apart
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("limits, what, passed, hard_at", CASES, ids=[c[1] + str(c[2]) for c in CASES])
def test_encrypt_soft_then_hard(limits, what, passed, hard_at, backend):
    seen = []
    gw = EspGateway(_cfg(**limits), backend, on_event=seen.append)
    ref = RefGateway(gw.config)
    ts = [i * S for i in range(8)]
    out, reason = gw.encrypt_batch(_batch([_ip4()] * 8, ts), return_reasons=True, sa=0)
    assert reason.tolist() == [0] * passed + [E] * (8 - passed)
    assert len(out) == passed
    assert _ev(gw) == [("soft", what, "encrypt", ts[2]), ("hard", what, "encrypt", ts[hard_at])]
    assert seen == gw.events and all(isinstance(e, LifetimeEvent) for e in seen)
    assert [ref.encrypt(_ip4(), LINK_RAW, sa=0, t=t)[0] for t in ts] == reason.tolist()
    assert _ref_ev(ref) == _ev(gw)
    # later packets: refused, counted, no second event
    _, reason = gw.encrypt_batch(_batch([_ip4()] * 3, [9 * S] * 3), return_reasons=True, sa=0)
    assert reason.tolist() == [E] * 3
    assert gw.drop_counts()["encrypt"] == {"expired": 8 - passed + 3}
    assert len(gw.events) == 2 and gw.event_counts == {"soft": 1, "hard": 1} and len(seen) == 2
    st = gw.sa_stats()[0]
    assert st["soft_expired"] == st["hard_expired"] == what and st["tx_packets"] == passed
    assert st["started_at"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("limits, what, passed, hard_at", CASES, ids=[c[1] + str(c[2]) for c in CASES])
def test_decrypt_soft_then_hard(limits, what, passed, hard_at, backend):
    ts = [i * S for i in range(8)]
    pkts = _esp(8)
    gw = EspGateway(_cfg(**limits), backend)
    ref = RefGateway(gw.config)
    out, reason = gw.decrypt_batch(_batch(pkts, ts))
    assert reason.tolist() == [0] * passed + [E] * (8 - passed)
    assert list(out.packets()) == [_ip4()] * passed
    assert _ev(gw) == [("soft", what, "decrypt", ts[2]), ("hard", what, "decrypt", ts[hard_at])]
    assert [ref.decrypt(p, LINK_RAW, t=t)[0] for p, t in zip(pkts, ts)] == reason.tolist()
    assert _ref_ev(ref) == _ev(gw)
    # an ended inbound SA rejects genuine and forged packets alike, before any crypto
    forged = bytearray(_esp(9)[8])
    forged[-1] ^= 1
    _, reason = gw.decrypt_batch(_batch([bytes(forged)], [20 * S]))
    assert reason.tolist() == [E]
    assert gw.drop_counts()["decrypt"] == {"expired": 8 - passed + 1}
    assert gw.event_counts == {"soft": 1, "hard": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_packet_per_batch_fires_each_event_once(backend):
    gw = EspGateway(_cfg(soft_packets=2, hard_packets=4), backend)
    rx = EspGateway(_cfg(soft_packets=2, hard_packets=4), backend)
    got, got_rx = [], []
    for i in range(7):
        enc, r = gw.encrypt_batch(_batch([_ip4()], [i * S]), sa=0, return_reasons=True)
        got += r.tolist()
        if len(enc):
            got_rx += rx.decrypt_batch(enc)[1].tolist()
        assert gw.event_counts["soft"] == (i >= 1) and gw.event_counts["hard"] == (i >= 3)
    assert got == [0, 0, 0, 0, E, E, E] and got_rx == [0, 0, 0, 0]
    assert [e.kind for e in gw.pop_events()] == ["soft", "hard"] and gw.events == []
    assert [e.kind for e in rx.events] == ["soft", "hard"]


def test_seconds_from_installation_or_first_packet_and_explicit_now():
    # clock from the first packet: it starts at 1000 s
    gw = EspGateway(_cfg(soft_seconds=10, hard_seconds=20))
    _, r = gw.encrypt_batch(_batch([_ip4()] * 3, [1000 * S, 1009 * S, 1010 * S]), sa=0, return_reasons=True)
    assert r.tolist() == [0, 0, 0] and _ev(gw) == [("soft", "seconds", "encrypt", 1010 * S)]
    assert gw.sa_stats()[0]["started_at"] == 1000 * S
    # clock from installation; `now` stands for the packets' own timestamps (all 0 here)
    gw = EspGateway(_cfg(soft_seconds=10, hard_seconds=20), now=100 * S)
    ref = RefGateway(gw.config, now=100 * S)
    b = _batch([_ip4()] * 2, [0, 0])
    for now, want in ((105, [0, 0]), (111, [0, 0]), (119, [0, 0]), (120, [E, E])):
        assert gw.encrypt_batch(b, sa=0, now=now * S, return_reasons=True)[1].tolist() == want
        assert [ref.encrypt(_ip4(), LINK_RAW, sa=0, t=now * S)[0] for _ in range(2)] == want
    assert _ev(gw) == [("soft", "seconds", "encrypt", 111 * S), ("hard", "seconds", "encrypt", 120 * S)]
    assert _ref_ev(ref) == _ev(gw)


def test_expire_is_the_timer_between_packets():
    gw = EspGateway(_cfg(soft_seconds=10, hard_seconds=20), now=0)
    ref = RefGateway(gw.config, now=0)
    assert gw.expire(9 * S) == [] and ref.expire(9 * S) == []
    assert [(e.kind, e.direction) for e in gw.expire(10 * S)] == [("soft", "clock")]
    assert gw.expire(15 * S) == []  # once
    assert [(e.kind, e.at) for e in gw.expire(25 * S)] == [("hard", 25 * S)]
    ref.expire(10 * S), ref.expire(15 * S), ref.expire(25 * S)
    assert _ref_ev(ref) == _ev(gw)
    assert gw.expire(30 * S) == [] and gw.event_counts == {"soft": 1, "hard": 1}
    # ended: nothing goes out, nothing comes in, whatever the packets' own timestamps say
    assert gw.encrypt_batch(_batch([_ip4()], [0]), sa=0, return_reasons=True)[1].tolist() == [E]
    assert gw.decrypt_batch(_batch(_esp(1), [0]))[1].tolist() == [E]
    # an SA whose clock has not started (no now, no packet) does not age
    idle = EspGateway(_cfg(hard_seconds=1))
    assert idle.expire(10**6 * S) == [] and idle.sa_stats()[0]["hard_expired"] is None


def test_time_stands_still_without_timestamps():
    """No clock is read inside the datapath: packets stamped 0 never age the SA."""
    gw = EspGateway(_cfg(hard_seconds=1e-9 * 5))
    for _ in range(3):
        assert (
            gw.encrypt_batch(_batch([_ip4()] * 4, [0] * 4), sa=0, return_reasons=True)[1].tolist() == [0] * 4
        )
    assert gw.events == []
    # and the kernel called without timestamps at all (time fixed at 0)
    doc = {"sas": [dict(SA, lifetime={"hard_seconds": 1})]}
    gw = EspGateway(parse_config(doc), now=-5 * S)
    res = esp.encap_prepare(*_encap_args(gw, _batch([_ip4()], [10 * S])))
    assert res[3].tolist() == [E]  # 0 - (-5 s) >= 1 s: the clock is the caller's


def _encap_args(gw, b):
    return (
        b.data,
        b.offset,
        b.length,
        LINK_RAW,
        0,
        gw.pol_src,
        gw.pol_smask,
        gw.pol_dst,
        gw.pol_dmask,
        gw.pol_proto,
        gw.pol_action,
        gw.pol_sa,
        gw.sa_spi,
        gw.sa_ver,
        gw.sa_esn,
        gw.sa_salt,
        gw.sa_src,
        gw.sa_dst,
        gw.sa_limits,
        gw.tx_seq,
        gw.iv_base,
        gw.life,
        gw.dead,
    )


def test_directions_count_apart_and_expiry_is_shared():
    """Bytes and packets count per direction; the hard expiry ends the SA both ways."""
    gw = EspGateway(_cfg(hard_packets=3))
    assert gw.encrypt_batch(_batch([_ip4()] * 2, [0, 0]), sa=0, return_reasons=True)[1].tolist() == [0, 0]
    out, r = gw.decrypt_batch(_batch(_esp(4), [0] * 4))
    assert r.tolist() == [0, 0, 0, E]  # the receive side has its own count
    assert gw.sa_stats()[0]["hard_expired"] == "packets"
    assert gw.encrypt_batch(_batch([_ip4()], [0]), sa=0, return_reasons=True)[1].tolist() == [E]


def test_cli_reports_lifetime_events(tmp_path, capsys):
    import yaml

    sa_file = tmp_path / "sa.yaml"
    sa_file.write_text(yaml.safe_dump({"sas": [dict(SA, lifetime={"soft_packets": 2, "hard_packets": 3})]}))
    src = tmp_path / "in.pcap"
    write_pcap(src, _batch([_ip4()] * 5, [i * S for i in range(5)]))
    out = tmp_path / "out.pcap"
    assert main(["ipsec", "encrypt", "--json", "--sa", str(sa_file), str(src), "-w", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["packets_out"] == 3 and rep["dropped"] == {"expired": 2}
    assert [(e["kind"], e["limit"], e["at"]) for e in rep["lifetime_events"]] == [
        ("soft", "packets", 1 * S),
        ("hard", "packets", 2 * S),
    ]
    assert len(read_capture(out)) == 3
    assert main(["ipsec", "encrypt", "--sa", str(sa_file), str(src), "-w", str(out)]) == 0
    err = capsys.readouterr().err
    assert "soft lifetime reached (packets, encrypt)" in err and "hard lifetime" in err
    assert SA["key"] not in err
