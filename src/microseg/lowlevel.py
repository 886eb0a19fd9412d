"""The low-level helpers every compiled kernel shares: byte readers and writers, the prefetch
hint, hash mixers and hash-table slot arithmetic, with plain-Python twins for the references.

Byte readers (Numba, ``d`` a ``uint8`` array, ``o`` a byte offset):

* big-endian, network order: :func:`rd8`, :func:`rd16`, :func:`rd32`, :func:`rd48` return
  ``int64`` (the value always fits), :func:`rd32u` and :func:`rd64` ``uint64``;
* little-endian: :func:`rd16_le`, :func:`rd32_le` (``int64``), :func:`rd32u_le`,
  :func:`rd64_le` (``uint64``);
* in a byte order chosen at run time (capture files): :func:`rd16_bo`, :func:`rd32_bo`.

Every reader indexes with the offset as an unsigned integer: the caller has checked it against
the buffer, and an unsigned index spares Numba's negative-index wrap-around on each byte, which
lets LLVM merge the byte loads into one wide load (with a byte swap for network order). An
offset must therefore never be negative. Writers: :func:`wr16`, :func:`wr32` (network order).

The readers are plain ``@njit(cache=True)`` functions, not Numba-inlined: LLVM inlines them
into their callers all the same, and a kernel with a hundred reads (the parser) compiles
faster than with Numba's own inlining of each call site.

:func:`prefetch` is LLVM's prefetch intrinsic (read, keep in all cache levels); it never faults
and never changes a result.

Hashes: :func:`mix64` is SplitMix64's finaliser (the conntrack index), :func:`fmix64` MurmurHash3's
64-bit finaliser, :func:`mix_word` one round of the word-at-a-time key hash (xor a word in,
multiply by :data:`GOLDEN`, fold the high bits down) that the flow caches and the tuple-space
classifier run over their key words. Slots: :func:`bucket_base` is the first slot of a
set-associative bucket, :func:`pow2_at_least` the table sizes.

The ``*_py`` functions are the same computations on Python ``bytes`` and ``int`` for the
plain-Python references and models.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "GOLDEN",
    "bucket_base",
    "fmix64",
    "fmix64_py",
    "mix64",
    "mix_word",
    "mix_word_py",
    "pow2_at_least",
    "prefetch",
    "rd8",
    "rd16",
    "rd16_bo",
    "rd16_le",
    "rd16_py",
    "rd32",
    "rd32_bo",
    "rd32_le",
    "rd32_py",
    "rd32u",
    "rd32u_le",
    "rd48",
    "rd64",
    "rd64_le",
    "wr16",
    "wr32",
]

M64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_SM1, _SM2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # SplitMix64
_MM1, _MM2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)  # MurmurHash3
_U = tuple(np.uint64(k) for k in range(8))
_S8, _S16, _S24, _S27, _S29 = np.uint64(8), np.uint64(16), np.uint64(24), np.uint64(27), np.uint64(29)
_S30, _S31, _S32, _S33 = np.uint64(30), np.uint64(31), np.uint64(32), np.uint64(33)
_S40, _S48, _S56 = np.uint64(40), np.uint64(48), np.uint64(56)
_FF = np.uint64(0xFF)


# ---------------------------------------------------------------------------------------------
# byte readers, network order
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def rd8(d, o):
    return np.int64(d[np.uint64(o)])


@njit(cache=True)
def rd16(d, o):
    u = np.uint64(o)
    return (np.int64(d[u]) << 8) | np.int64(d[u + _U[1]])


@njit(cache=True)
def rd32(d, o):
    u = np.uint64(o)
    return (
        (np.int64(d[u]) << 24)
        | (np.int64(d[u + _U[1]]) << 16)
        | (np.int64(d[u + _U[2]]) << 8)
        | np.int64(d[u + _U[3]])
    )


@njit(cache=True)
def rd32u(d, o):
    u = np.uint64(o)
    return (
        (np.uint64(d[u]) << _S24)
        | (np.uint64(d[u + _U[1]]) << _S16)
        | (np.uint64(d[u + _U[2]]) << _S8)
        | np.uint64(d[u + _U[3]])
    )


@njit(cache=True)
def rd48(d, o):
    u = np.uint64(o)
    return (
        (np.int64(d[u]) << 40)
        | (np.int64(d[u + _U[1]]) << 32)
        | (np.int64(d[u + _U[2]]) << 24)
        | (np.int64(d[u + _U[3]]) << 16)
        | (np.int64(d[u + _U[4]]) << 8)
        | np.int64(d[u + _U[5]])
    )


@njit(cache=True)
def rd64(d, o):
    u = np.uint64(o)
    return (
        (np.uint64(d[u]) << _S56)
        | (np.uint64(d[u + _U[1]]) << _S48)
        | (np.uint64(d[u + _U[2]]) << _S40)
        | (np.uint64(d[u + _U[3]]) << _S32)
        | (np.uint64(d[u + _U[4]]) << _S24)
        | (np.uint64(d[u + _U[5]]) << _S16)
        | (np.uint64(d[u + _U[6]]) << _S8)
        | np.uint64(d[u + _U[7]])
    )


# ---------------------------------------------------------------------------------------------
# byte readers, little-endian and run-time byte order
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def rd16_le(d, o):
    u = np.uint64(o)
    return np.int64(d[u]) | (np.int64(d[u + _U[1]]) << 8)


@njit(cache=True)
def rd32_le(d, o):
    u = np.uint64(o)
    return (
        (np.int64(d[u + _U[3]]) << 24)
        | (np.int64(d[u + _U[2]]) << 16)
        | (np.int64(d[u + _U[1]]) << 8)
        | np.int64(d[u])
    )


@njit(cache=True)
def rd32u_le(d, o):
    u = np.uint64(o)
    w = np.uint64(0)
    for j in range(4):
        w |= np.uint64(d[u + np.uint64(j)]) << np.uint64(8 * j)
    return w


@njit(cache=True)
def rd64_le(d, o):
    u = np.uint64(o)
    w = np.uint64(0)
    for j in range(8):
        w |= np.uint64(d[u + np.uint64(j)]) << np.uint64(8 * j)
    return w


@njit(cache=True)
def rd16_bo(d, o, big):
    """16 bits at ``o`` in network order when ``big``, else little-endian."""
    if big:
        return rd16(d, o)
    return rd16_le(d, o)


@njit(cache=True)
def rd32_bo(d, o, big):
    """32 bits at ``o`` in network order when ``big``, else little-endian."""
    if big:
        return rd32(d, o)
    return rd32_le(d, o)


# ---------------------------------------------------------------------------------------------
# byte writers, network order (the low 16 / 32 bits of ``v``)
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def wr16(d, o, v):
    v = np.uint64(v)
    d[o] = np.uint8((v >> _S8) & _FF)
    d[o + 1] = np.uint8(v & _FF)


@njit(cache=True)
def wr32(d, o, v):
    v = np.uint64(v)
    d[o] = np.uint8((v >> _S24) & _FF)
    d[o + 1] = np.uint8((v >> _S16) & _FF)
    d[o + 2] = np.uint8((v >> _S8) & _FF)
    d[o + 3] = np.uint8(v & _FF)


# ---------------------------------------------------------------------------------------------
# prefetch
# ---------------------------------------------------------------------------------------------
@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch ``arr[idx]``'s cache line (LLVM's prefetch; no effect on results)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(
            fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        )
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def mix64(x):
    """SplitMix64's finaliser of the ``uint64`` ``x``."""
    x = (x ^ (x >> _S30)) * _SM1
    x = (x ^ (x >> _S27)) * _SM2
    return x ^ (x >> _S31)


@njit(cache=True, inline="always")
def fmix64(h):
    """MurmurHash3's 64-bit finaliser of the ``uint64`` ``h``."""
    h ^= h >> _S33
    h *= _MM1
    h ^= h >> _S33
    h *= _MM2
    h ^= h >> _S33
    return h


@njit(cache=True, inline="always")
def mix_word(h, x):
    """One round of the word-at-a-time key hash: ``x`` xored into ``h``, times :data:`GOLDEN`,
    the high bits folded down (both ``uint64``)."""
    h = (h ^ x) * GOLDEN
    return h ^ (h >> _S29)


def fmix64_py(h: int) -> int:
    """:func:`fmix64` on a Python ``int``."""
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def mix_word_py(h: int, x: int) -> int:
    """:func:`mix_word` on Python ``int``\\ s."""
    h = ((h ^ x) * 0x9E3779B97F4A7C15) & M64
    return h ^ (h >> 29)


# ---------------------------------------------------------------------------------------------
# slots
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def bucket_base(h, n_buckets, ways):
    """First slot of the bucket of hash ``h`` in a table of ``n_buckets`` (a power of two)
    buckets of ``ways`` slots."""
    return np.int64(h & np.uint64(n_buckets - 1)) * ways


def pow2_at_least(x: int) -> int:
    """The least power of two >= ``x``, for ``x`` >= 1."""
    return 1 << max(0, int(x - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# plain-Python byte readers (references and models)
# ---------------------------------------------------------------------------------------------
def rd16_py(b: bytes | bytearray | memoryview, o: int) -> int:
    """16 bits at ``o`` in network order."""
    return (b[o] << 8) | b[o + 1]


def rd32_py(b: bytes | bytearray | memoryview, o: int) -> int:
    """32 bits at ``o`` in network order."""
    return (b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]
