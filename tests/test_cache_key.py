"""Cache keys: kernel == reference on random and damaged header tables, and on real packets."""

import numba
import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from microseg.cache import key as K
from microseg.classify import keys as CK
from microseg.packet import batch as B
from microseg.packet.batch import Batch, FlowKeys
from microseg.packet.parse import parse


def random_keys(rng, n):
    fk = FlowKeys(n).resize(n)
    for t in ("u64", "u32", "i32", "u16", "u8"):
        a = getattr(fk, t)
        info = np.iinfo(a.dtype)
        a[:] = rng.integers(info.min, info.max, size=a.shape, dtype=a.dtype, endpoint=True)
    fk.u8[B.ERROR] = np.where(rng.random(n) < 0.8, 0, fk.u8[B.ERROR])
    fk.u8[B.IP_VER] = rng.choice(np.array([0, 4, 6, 5], np.uint8), n, p=[0.1, 0.45, 0.4, 0.05])
    return fk


@pytest.mark.parametrize("seed", range(3))
def test_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 400
    fk = random_keys(rng, n)
    port = rng.integers(0, 65536, n).astype(np.uint16)
    ct = rng.integers(0, 256, n).astype(np.uint8)
    kmat, hashes, valid = K.build_keys(fk, port, ct)
    assert valid.sum() > 100 and (~valid).sum() > 20
    for i in range(n):
        ref = K.key_ref(fk.row(i), int(port[i]), int(ct[i]))
        if ref is None:
            assert not valid[i]
            continue
        assert valid[i]
        assert tuple(int(x) for x in kmat[i]) == ref
        assert int(hashes[i]) == K.hash_words_ref(ref)
    assert np.all(hashes[valid] != 0)


def test_key_is_the_classifier_key_plus_flow_identity():
    rng = np.random.default_rng(7)
    fk = random_keys(rng, 300)
    port = rng.integers(0, 65536, 300).astype(np.uint16)
    ct = rng.integers(0, 256, 300).astype(np.uint8)
    kmat, _, valid = K.build_keys(fk, port, ct)
    ck = CK.from_flowkeys(fk, ct, port)
    assert np.array_equal(kmat[valid, :6], ck[valid, :6])
    assert np.array_equal(kmat[valid, 6] & np.uint64(0xFF), ck[valid, 6])


@numba.njit
def _hm(k, i, m, j, seed):
    return K.hash_masked(k, i, m, j, seed)


def test_hash_masked_and_rows():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 2**63, size=(50, K.W), dtype=np.uint64)
    m = rng.integers(0, 2**63, size=(3, K.W), dtype=np.uint64)
    hs = K.hash_keys(k)
    for i in range(50):
        assert int(hs[i]) == K.hash_words_ref(k[i].tolist())
        assert int(_hm(k, i, m, 2, 9)) == K.hash_words_ref((k[i] & m[2]).tolist(), 9)


def test_real_packets():
    pkts = [
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / TCP(sport=1234, dport=80, flags="S"),
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP(sport=5353, dport=53)
        / b"x",
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / ICMP(type=8, id=77, seq=1),
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IPv6(src="2001:db8::1", dst="2001:db8::2")
        / TCP(sport=1, dport=2, flags="A"),
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0)
        / UDP(sport=1, dport=2)
        / (b"y" * 40),
        b"\x00" * 10,  # truncated: not cacheable
    ]
    batch = Batch.from_packets([bytes(p) for p in pkts], port=[3, 3, 3, 4, 5, 6])
    fk = parse(batch)
    kmat, hashes, valid = K.build_keys(fk, batch.port)
    assert valid.tolist() == [True, True, True, True, True, False]
    l4 = [int(x) for x in kmat[:, K.K_L4]]
    assert l4[0] & 0xFFFF == 1234 and (l4[0] >> 16) & 0xFFFF == 80 and (l4[0] >> 32) & 0xFF == 6
    assert (l4[0] >> 56) == 0x02
    ct = [int(x) for x in kmat[:, K.K_CT]]
    assert (ct[0] >> K.SH_KIND) & 0xF == K.KIND_PORTS
    assert (ct[2] >> K.SH_KIND) & 0xF == K.KIND_ICMP and (ct[2] >> K.SH_ICMP_ID) & 0xFFFF == 77
    assert (l4[2] >> 40) & 0xFF == 8
    assert (ct[4] >> K.SH_KIND) & K.KIND_FRAG
    assert (int(kmat[3, K.K_META]) >> 48) == 0x86DD and (int(kmat[3, K.K_META]) >> 32) & 0xFFFF == 4
    # same flow, same key and hash; another ICMP id, another key
    again = parse(
        Batch.from_packets(
            [
                bytes(pkts[2]),
                bytes(
                    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                    / IP(src="10.0.0.1", dst="10.0.0.2")
                    / ICMP(type=8, id=78)
                ),
            ],
            port=[3, 3],
        )
    )
    k2, h2, _ = K.build_keys(again, np.array([3, 3], np.uint16))
    assert np.array_equal(k2[0], kmat[2]) and h2[0] == hashes[2]
    assert not np.array_equal(k2[1], kmat[2])
