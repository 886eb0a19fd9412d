"""The shared low-level helpers against Python's own byte decoding and big-integer arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from microseg import lowlevel as L

M64 = (1 << 64) - 1


@njit(cache=False)
def _reads(d, o, out):
    out[0] = L.rd8(d, o)
    out[1] = L.rd16(d, o)
    out[2] = L.rd32(d, o)
    out[3] = L.rd48(d, o)
    out[4] = np.int64(L.rd64(d, o))
    out[5] = L.rd16_le(d, o)
    out[6] = L.rd32_le(d, o)
    out[7] = np.int64(L.rd32u_le(d, o))
    out[8] = np.int64(L.rd64_le(d, o))
    out[9] = np.int64(L.rd32u(d, o))
    out[10] = L.rd16_bo(d, o, True)
    out[11] = L.rd16_bo(d, o, False)
    out[12] = L.rd32_bo(d, o, True)
    out[13] = L.rd32_bo(d, o, False)


def _s64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def test_readers_match_int_from_bytes():
    rng = np.random.default_rng(7)
    d = rng.integers(0, 256, 64, dtype=np.uint8)
    d[:8] = 0xFF  # top bits set: no sign extension anywhere
    raw = d.tobytes()
    out = np.zeros(14, np.int64)
    for o in range(0, 56):
        _reads(d, o, out)

        def be(k, o=o):
            return int.from_bytes(raw[o : o + k], "big")

        def le(k, o=o):
            return int.from_bytes(raw[o : o + k], "little")

        want = [be(1), be(2), be(4), be(6), _s64(be(8)), le(2), le(4), le(4), _s64(le(8)), be(4)]
        want += [be(2), le(2), be(4), le(4)]
        assert out.tolist() == want, o
        assert L.rd16_py(raw, o) == be(2)
        assert L.rd32_py(raw, o) == be(4)


@njit(cache=False)
def _write(d, o, v16, v32):
    L.wr16(d, o, v16)
    L.wr32(d, o + 2, v32)


@pytest.mark.parametrize("v16,v32", [(0xBEEF, 0xDEADBEEF), (-1, -2), (0x12345, 0x1_2345_6789)])
def test_writers_store_the_low_bits_in_network_order(v16, v32):
    d = np.zeros(8, np.uint8)
    _write(d, 1, v16, v32)
    assert d[1:3].tobytes() == (v16 & 0xFFFF).to_bytes(2, "big")
    assert d[3:7].tobytes() == (v32 & 0xFFFFFFFF).to_bytes(4, "big")
    assert d[0] == 0 and d[7] == 0


@njit(cache=False)
def _hashes(h, x):
    return L.mix64(h), L.fmix64(h), L.mix_word(h, x)


def _splitmix_ref(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_mixers_match_their_python_twins():
    rng = np.random.default_rng(3)
    for h, x in rng.integers(0, 2**63, (200, 2), dtype=np.uint64).tolist() + [[0, 0], [M64, M64]]:
        a, b, c = _hashes(np.uint64(h), np.uint64(x))
        assert int(a) == _splitmix_ref(h)
        assert int(b) == L.fmix64_py(h)
        assert int(c) == L.mix_word_py(h, x)
    # MurmurHash3's published fmix64 of 1
    assert L.fmix64_py(1) == 0xB456BCFC34C2CB2C


@njit(cache=False)
def _base(h, nb, ways):
    return L.bucket_base(h, nb, ways)


def test_slots():
    xs = (1, 2, 3, 4, 5, 1000, 1024, 1025)
    assert [L.pow2_at_least(x) for x in xs] == [1, 2, 4, 4, 8, 1024, 1024, 2048]
    assert _base(np.uint64(0xFFFF_FFFF_FFFF_FFF3), 8, 4) == 3 * 4
    assert _base(np.uint64(16), 16, 2) == 0
