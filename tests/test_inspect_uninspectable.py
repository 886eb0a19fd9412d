"""Detection of traffic that cannot be inspected (TLS, QUIC, ESP): real packets, and the kernel
against its plain-Python reference on random and truncated payloads."""

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Ether
from scapy.layers.quic import QUIC_Initial
from scapy.layers.tls.all import TLS, TLSClientHello

from microseg.offload import inspect as I
from microseg.packet import batch as B
from microseg.packet.batch import Batch
from microseg.packet.parse import parse


def E(l4, payload=b"", proto=None):
    ip = (
        IP(src="10.0.0.1", dst="10.0.0.2")
        if proto is None
        else IP(src="10.0.0.1", dst="10.0.0.2", proto=proto)
    )
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4 / payload)


def test_real_packets():
    hello = bytes(TLS(msg=[TLSClientHello()]))
    cases = [
        (E(TCP(sport=40000, dport=443), hello), I.ENC_TLS),
        (E(TCP(sport=40000, dport=8443), hello), I.ENC_TLS),  # any port
        (E(TCP(sport=443, dport=40000), bytes.fromhex("1703030020") + b"\x11" * 32), I.ENC_TLS),
        (E(TCP(sport=40000, dport=443), b"GET / HTTP/1.1\r\n\r\n"), I.ENC_NONE),
        (E(TCP(sport=40000, dport=443)), I.ENC_NONE),  # no payload
        (E(UDP(sport=50000, dport=443), bytes(QUIC_Initial()) + b"\0" * 40), I.ENC_QUIC),
        (E(UDP(sport=443, dport=50000), bytes([0x43]) + b"\x55" * 40), I.ENC_QUIC),  # short header
        (E(UDP(sport=50000, dport=53), bytes(QUIC_Initial()) + b"\0" * 40), I.ENC_NONE),
        (E(UDP(sport=50000, dport=443), b"\x12\x34hello"), I.ENC_NONE),
        (E(ESP(spi=0x1001, seq=1), b"\xaa" * 32), I.ENC_ESP),
        (E(UDP(sport=4500, dport=4500), bytes(ESP(spi=0x1001, seq=7)) + b"\xaa" * 24), I.ENC_ESP),
        (E(UDP(sport=4500, dport=4500), b"\0\0\0\0" + b"\x01" * 28), I.ENC_NONE),  # IKE
        (E(UDP(sport=4500, dport=4500), b"\xff"), I.ENC_NONE),  # keepalive
    ]
    b = Batch.from_packets([c[0] for c in cases])
    fk = parse(b)
    got = I.uninspectable(b, fk)
    assert got.tolist() == [c[1] for c in cases]
    # only the chosen rows are examined
    assert I.uninspectable(b, fk, [0]).tolist() == [I.ENC_TLS] + [0] * (len(cases) - 1)


def _payload_of(b, fk, i):
    po, pl = int(fk.payload_off[i]), int(fk.payload_len[i])
    if po < 0 or pl <= 0:
        return b""
    return b.packet(i)[po : po + pl]


@pytest.mark.parametrize("seed", range(3))
def test_kernel_matches_reference_on_random_payloads(seed):
    rng = np.random.default_rng(seed)
    pkts = []
    for _ in range(250):
        n = int(rng.integers(0, 40))
        pay = bytes(rng.integers(0, 256, n, dtype=np.uint8))
        if rng.random() < 0.4 and n >= 6:  # TLS-ish / QUIC-ish prefixes
            pay = (
                bytes([int(rng.integers(19, 26)), 3, int(rng.integers(0, 6)), 0, int(rng.integers(0, 256))])
                + pay[5:]
            )
        if rng.random() < 0.2 and n >= 6:
            pay = bytes([0xC0 | int(rng.integers(0, 64)), 0, 0, 0, 1, int(rng.integers(0, 30))]) + pay[6:]
        port = int(rng.choice([443, 4500, 80, 8443]))
        kind = rng.random()
        if kind < 0.45:
            pkts.append(E(TCP(sport=40000, dport=port), pay))
        elif kind < 0.9:
            pkts.append(E(UDP(sport=port, dport=40000), pay))
        else:
            pkts.append(E(ESP(spi=1, seq=1), pay))
    # snap some captures short: the kernel must respect the captured length
    snap = [p[: int(rng.integers(14, len(p) + 1))] if rng.random() < 0.2 else p for p in pkts]
    b = Batch.from_packets(snap, wire_len=[len(p) for p in pkts])
    fk = parse(b)
    got = I.uninspectable(b, fk)
    for i in range(len(snap)):
        if fk.error[i] != 0:
            assert got[i] == I.ENC_NONE
            continue
        want = I.uninspectable_ref(
            _payload_of(b, fk, i),
            int(fk.proto[i]),
            int(fk.sport[i]),
            int(fk.dport[i]),
            bool(fk.flags[i] & B.F_PORTS),
        )
        assert got[i] == want, i
    assert (got == I.ENC_TLS).sum() > 2 and (got == I.ENC_QUIC).sum() > 2 and (got == I.ENC_ESP).sum() > 2
