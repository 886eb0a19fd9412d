"""OpenSSL's EVP AES-GCM, callable from Numba kernels.

The per-packet AEAD call is the one thing a batch cannot amortise. Calling the system
``libcrypto`` from inside the compiled batch loop removes the Python call per packet that
``cryptography``'s ``AESGCM`` needs (measured in ``bench/ipsec.py``). The library's functions
are registered with LLVM under prefixed names and declared as Numba external functions, so
kernels that use them still cache. Pointers travel as ``intp``.

``AVAILABLE`` is False when no usable libcrypto (>= 1.1) is found; callers then use the
``cryptography`` back end, which gives the same bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref

AVAILABLE = False
REASON = ""
_lib = None

EVP_CTRL_GCM_SET_IVLEN = 0x9
EVP_CTRL_GCM_GET_TAG = 0x10
EVP_CTRL_GCM_SET_TAG = 0x11

_NAMES = (
    "EVP_EncryptInit_ex",
    "EVP_EncryptUpdate",
    "EVP_EncryptFinal_ex",
    "EVP_DecryptInit_ex",
    "EVP_DecryptUpdate",
    "EVP_DecryptFinal_ex",
    "EVP_CIPHER_CTX_ctrl",
)


def _load():
    global _lib, AVAILABLE, REASON
    name = ctypes.util.find_library("crypto")
    candidates = [name] if name else []
    candidates += ["libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib"]
    for cand in candidates:
        if cand.endswith("/libcrypto.dylib") or cand == "libcrypto.dylib":
            continue  # macOS aborts processes that load its unversioned libcrypto
        try:
            lib = ctypes.CDLL(cand)
            ver = ctypes.c_ulong
            fn = getattr(lib, "OpenSSL_version_num", None)
            if fn is None:
                continue
            fn.restype = ver
            if fn() < 0x10100000:
                continue
            for n in _NAMES + (
                "EVP_CIPHER_CTX_new",
                "EVP_CIPHER_CTX_free",
                "EVP_aes_128_gcm",
                "EVP_aes_192_gcm",
                "EVP_aes_256_gcm",
            ):
                getattr(lib, n)
            _lib = lib
            break
        except (OSError, AttributeError):
            continue
    if _lib is None:
        REASON = "no libcrypto >= 1.1 found"
        return
    import llvmlite.binding as llvm

    for n in _NAMES:
        llvm.add_symbol("microseg_" + n, ctypes.cast(getattr(_lib, n), ctypes.c_void_p).value)
    _lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
    _lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
    for n in ("EVP_aes_128_gcm", "EVP_aes_192_gcm", "EVP_aes_256_gcm"):
        getattr(_lib, n).restype = ctypes.c_void_p
    _lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p] * 5
    _lib.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p] * 5
    AVAILABLE = True


_load()

if AVAILABLE:
    from numba import types as _t

    _I, _i32 = _t.intp, _t.int32
    encrypt_init = _t.ExternalFunction("microseg_EVP_EncryptInit_ex", _i32(_I, _I, _I, _I, _I))
    encrypt_update = _t.ExternalFunction("microseg_EVP_EncryptUpdate", _i32(_I, _I, _I, _I, _i32))
    encrypt_final = _t.ExternalFunction("microseg_EVP_EncryptFinal_ex", _i32(_I, _I, _I))
    decrypt_init = _t.ExternalFunction("microseg_EVP_DecryptInit_ex", _i32(_I, _I, _I, _I, _I))
    decrypt_update = _t.ExternalFunction("microseg_EVP_DecryptUpdate", _i32(_I, _I, _I, _I, _i32))
    decrypt_final = _t.ExternalFunction("microseg_EVP_DecryptFinal_ex", _i32(_I, _I, _I))
    cipher_ctrl = _t.ExternalFunction("microseg_EVP_CIPHER_CTX_ctrl", _i32(_I, _i32, _i32, _I))


class Context:
    """An EVP_CIPHER_CTX keyed once for AES-GCM (12-byte nonce); ``ptr`` goes to kernels."""

    __slots__ = ("ptr", "_fin", "__weakref__")

    def __init__(self, key: bytes, encrypt: bool):
        if not AVAILABLE:
            raise RuntimeError(REASON)
        assert _lib is not None  # AVAILABLE: the library loaded
        cipher = {16: _lib.EVP_aes_128_gcm, 24: _lib.EVP_aes_192_gcm, 32: _lib.EVP_aes_256_gcm}[len(key)]()
        ptr = _lib.EVP_CIPHER_CTX_new()
        if not ptr:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._fin = weakref.finalize(self, _lib.EVP_CIPHER_CTX_free, ptr)
        init = _lib.EVP_EncryptInit_ex if encrypt else _lib.EVP_DecryptInit_ex
        kbuf = ctypes.create_string_buffer(key, len(key))
        ok = init(ptr, cipher, None, kbuf, None)
        ctypes.memset(kbuf, 0, len(key))
        if ok != 1:
            raise RuntimeError("EVP cipher init failed")
        self.ptr = int(ptr)

    def __repr__(self) -> str:
        return "<EVP AES-GCM context>"
