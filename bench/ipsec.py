"""IPsec ESP benchmark: tunnel-mode AES-GCM encrypt and decrypt on one core.

For inner packets of 64, 128, 256, 512, 1024 and 1400 bytes (IPv4/UDP in an IPv4 tunnel,
AES-128-GCM, batches of 256), measured in the same run:

* microseg ``EspGateway`` with the EVP back end (AEAD called from the compiled loop) and with
  the ``cryptography`` back end (one ``AESGCM`` call per packet from Python);
* a naive per-packet loop: struct-built headers and one ``cryptography`` call per packet;
* the limit: the bare EVP AES-GCM call sequence on preallocated buffers (same library, no ESP
  work), and ``openssl speed -evp aes-128-gcm -bytes N`` where the openssl tool exists;
* the same bare EVP calls made through ctypes from a Python loop (what a per-packet library
  call from Python costs, without any ESP work).

Gbit/s counts inner packet bytes; cycles/byte uses the CPU clock from /proc/cpuinfo. Each
figure is the best of several repetitions (the machine is shared). Writes
bench/results/ipsec.json and docs/img/ipsec.png.

    python bench/ipsec.py [--quick]      (--quick: a few seconds, prints only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np

from microseg.ipsec import esp, evp
from microseg.ipsec.gateway import EspGateway
from microseg.ipsec.sa import parse_config
from microseg.packet.batch import LINK_RAW, Batch

ROOT = Path(__file__).resolve().parent.parent
SIZES = [64, 128, 256, 512, 1024, 1400]
BATCH = 256
KERNEL_GBPS = {"small": 0.94, "large": 4.32}  # seed paper: Linux kernel ESP, one core, AES-NI
SA = {
    "name": "bench",
    "spi": 0x1000,
    "key": "00112233445566778899aabbccddeeff",
    "salt": "cafebabe",
    "tunnel_src": "192.0.2.1",
    "tunnel_dst": "192.0.2.2",
    "replay_window": 1024,
}


def cpu_hz() -> float:
    try:
        txt = Path("/proc/cpuinfo").read_text()
        m = re.search(r"cpu MHz\s*:\s*([\d.]+)", txt)
        if m:
            return float(m.group(1)) * 1e6
    except OSError:
        pass
    return float("nan")


def cpu_model() -> str:
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def inner_packets(size: int, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        payload = bytes([i & 0xFF]) * (size - 28)
        ip = struct.pack(
            "!BBHHHBBH4s4sHHHH",
            0x45,
            0,
            size,
            i & 0xFFFF,
            0,
            64,
            17,
            0,
            bytes([10, 1, i >> 8 & 0xFF, i & 0xFF]),
            bytes([10, 2, 0, 1]),
            5000,
            6000,
            size - 20,
            0,
        )
        out.append(ip + payload)
    return out


def interleaved(fns: dict, reps: int) -> dict:
    """Best CPU time of each callable, taking turns so that all see the same noise."""
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            best[k] = min(best[k], time.process_time() - t)
    return best


def gateway_runs(batches, backend: str):
    """(encrypt, decrypt) callables over ``batches`` with one gateway pair."""
    cfg = parse_config({"sas": [SA]})
    tx = EspGateway(cfg, backend)
    rx = EspGateway(cfg, backend)

    def enc():
        # each output batch is dropped once the next is made, as in a pipeline
        tx.tx_seq[:] = 0
        for b in batches:
            out = tx.encrypt_batch(b, sa=0)
        return out

    encrypted = [tx.encrypt_batch(b, sa=0) for b in batches]

    def dec():
        rx.rx_top[:] = 0
        rx.rx_bitmap[:] = 0
        for b in encrypted:
            out, reason = rx.decrypt_batch(b)
        return out

    dec()
    assert not rx.rx_drops[1:].any(), rx.drop_counts()
    return enc, dec


def naive_runs(pkts):
    """Per-packet Python ESP with one cryptography call each: the naive baseline."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, salt, spi = bytes.fromhex(SA["key"]), bytes.fromhex(SA["salt"]), SA["spi"]
    aead = AESGCM(key)
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])

    def enc():
        out = []
        seq = 0
        for p in pkts:
            seq += 1
            pad = -(len(p) + 2) % 4
            iv = struct.pack("!Q", seq)
            hdr = struct.pack("!II", spi, seq)
            ct = aead.encrypt(salt + iv, p + bytes(range(1, pad + 1)) + bytes([pad, 4]), hdr)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36 + len(ct), seq & 0xFFFF, 0, 64, 50, 0, src, dst)
            out.append(ip + hdr + iv + ct)
        return out

    encrypted = enc()

    def dec():
        out = []
        for e in encrypted:
            body = e[20:]
            pt = aead.decrypt(salt + body[8:16], body[16:], body[:8])
            out.append(pt[: len(pt) - 2 - pt[-2]])
        return out

    assert dec() == pkts
    return enc, dec


def raw_evp_run(size: int, n: int):
    """The EVP call sequence alone (init IV, AAD, encrypt, final, tag) on preallocated buffers."""
    if not evp.AVAILABLE:
        return None
    buf = np.zeros(n * (size + 16), np.uint8)
    off = np.arange(n, dtype=np.int64) * (size + 16)
    ln = np.full(n, size, np.int64)
    sa_of = np.zeros(n, np.int64)
    nonce = np.frombuffer(os.urandom(12 * n), np.uint8).reshape(n, 12).copy()
    aad = np.zeros((n, 12), np.uint8)
    aad_len = np.full(n, 8, np.int64)
    ctx = evp.Context(bytes.fromhex(SA["key"]), True)
    ptrs = np.array([ctx.ptr], np.intp)
    scratch = np.zeros(4, np.int32)

    def run():
        esp.seal_evp(ptrs, sa_of, buf, off, ln, nonce, aad, aad_len, scratch)

    run.ctx = ctx  # keep the context alive as long as the callable
    run()
    return run


def ctypes_evp_run(size: int, n: int):
    """The same five EVP calls per packet, made through ctypes from a Python loop."""
    if not evp.AVAILABLE:
        return None
    import ctypes

    lib = evp._lib
    init, upd, fin, ctrl = (
        lib.EVP_EncryptInit_ex,
        lib.EVP_EncryptUpdate,
        lib.EVP_EncryptFinal_ex,
        lib.EVP_CIPHER_CTX_ctrl,
    )
    vp, ci = ctypes.c_void_p, ctypes.c_int
    upd.argtypes = [vp, vp, vp, vp, ci]
    fin.argtypes = [vp, vp, vp]
    ctrl.argtypes = [vp, ci, ci, vp]
    ctx = evp.Context(bytes.fromhex(SA["key"]), True)
    buf = np.zeros(n * (size + 16), np.uint8)
    base = buf.ctypes.data
    nonces = np.frombuffer(os.urandom(12 * n), np.uint8).copy()
    nb = nonces.ctypes.data
    aad = np.zeros(8, np.uint8)
    ab = aad.ctypes.data
    outl = ctypes.c_int()
    po = ctypes.byref(outl)
    c = ctx.ptr

    def run():
        for i in range(n):
            p = base + i * (size + 16)
            init(c, None, None, None, nb + 12 * i)
            upd(c, None, po, ab, 8)
            upd(c, p, po, p, size)
            fin(c, p + size, po)
            ctrl(c, 0x10, 16, p + size)

    run.keep = (ctx, buf, nonces, aad)  # the loop holds raw addresses: keep their owners alive
    run()
    return run


def openssl_speed(size: int):
    tool = shutil.which("openssl")
    if tool is None:
        return None
    try:
        r = subprocess.run(
            [tool, "speed", "-evp", "aes-128-gcm", "-bytes", str(size), "-seconds", "1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in r.stdout.splitlines():
        if line.lower().startswith("aes-128-gcm"):
            val = line.split()[-1]
            mult = 1000.0
            if val.endswith("k"):
                val = val[:-1]
            return float(val) * mult  # bytes/s
    return None


def breakdown_64(reps: int):
    """Where the time goes at 64 bytes: ESP kernel passes vs the AEAD pass, per packet."""
    cfg = parse_config({"sas": [SA]})
    gw = EspGateway(cfg, "evp")
    batch = Batch.from_packets(inner_packets(64, BATCH), linktype=LINK_RAW)
    args = (
        batch.data,
        batch.offset,
        batch.length,
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
    )
    res = esp.encap_prepare(*args, gw.tx_seq, gw.iv_base, gw.life, gw.dead)
    loops = 50

    def prep():
        for _ in range(loops):
            gw.tx_seq[:] = 0
            esp.encap_prepare(*args, gw.tx_seq, gw.iv_base, gw.life, gw.dead)

    out, _, _, _, sa_of, nonce, aad, aad_len, enc_off, enc_len = res
    _, ptrs = gw._contexts(True)
    scratch = np.zeros(4, np.int32)

    def seal():
        for _ in range(loops):
            esp.seal_evp(ptrs, sa_of, out, enc_off, enc_len, nonce, aad, aad_len, scratch)

    def whole():
        for _ in range(loops):
            gw.tx_seq[:] = 0
            gw.encrypt_batch(batch, sa=0)

    per = loops * BATCH
    return {
        k: v / per * 1e9
        for k, v in interleaved(
            {"prepare_ns": prep, "aead_ns": seal, "encrypt_batch_ns": whole}, reps
        ).items()
    }


def evp_call_costs(reps: int):
    """ns per call of each EVP step on 64-byte packets, each step looped alone."""
    if not evp.AVAILABLE:
        return None
    from numba import njit

    e_init, e_upd, e_fin, ctrl = evp.encrypt_init, evp.encrypt_update, evp.encrypt_final, evp.cipher_ctrl

    @njit
    def loop(ctx, mode, n, buf, sc):
        outl = sc.ctypes.data
        p = buf.ctypes.data
        for _ in range(n):
            if mode == 0:
                e_init(ctx, 0, 0, 0, p)  # set the 12-byte nonce
            elif mode == 1:
                e_upd(ctx, 0, outl, p + 16, 8)  # AAD
            elif mode == 2:
                e_upd(ctx, p + 64, outl, p + 64, 64)  # 64 bytes of data
            elif mode == 3:
                e_fin(ctx, p + 128, outl)
            else:
                ctrl(ctx, 0x10, 16, p + 200)  # read the tag
        return 0

    ctx = evp.Context(bytes.fromhex(SA["key"]), True)
    buf = np.zeros(512, np.uint8)
    sc = np.zeros(4, np.int32)
    names = ["set_iv", "aad", "data_64B", "final", "get_tag"]
    n = 20000
    fns = {}
    for mode, name in enumerate(names):
        loop(ctx.ptr, mode, 10, buf, sc)
        fns[name] = (lambda m: lambda: loop(ctx.ptr, m, n, buf, sc))(mode)
    return {k: v / n * 1e9 for k, v in interleaved(fns, reps).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (seconds)")
    args = ap.parse_args()
    n_pkts = 2048 if args.quick else 4096
    reps = 3 if args.quick else 15
    hz = cpu_hz()
    results = []
    for size in SIZES:
        pkts = inner_packets(size, n_pkts)
        batches = [
            Batch.from_packets(pkts[i : i + BATCH], linktype=LINK_RAW) for i in range(0, n_pkts, BATCH)
        ]
        row = {"size": size, "packets": n_pkts}
        runs = {}
        if evp.AVAILABLE:
            runs["evp_encrypt"], runs["evp_decrypt"] = gateway_runs(batches, "evp")
            runs["raw_evp"] = raw_evp_run(size, n_pkts)
            runs["ctypes_evp"] = ctypes_evp_run(size, n_pkts)
        runs["cryptography_encrypt"], runs["cryptography_decrypt"] = gateway_runs(batches, "cryptography")
        runs["naive_encrypt"], runs["naive_decrypt"] = naive_runs(pkts)
        for k, t in interleaved(runs, reps).items():
            bps = n_pkts * size / t
            row[k] = {"gbps": bps * 8 / 1e9, "mpps": n_pkts / t / 1e6, "cycles_per_byte": hz / bps}
        sp = openssl_speed(size)
        if sp is not None:
            row["openssl_speed"] = {"gbps": sp * 8 / 1e9, "mpps": sp / size / 1e6, "cycles_per_byte": hz / sp}
        results.append(row)
        best = row.get("evp_encrypt", row["cryptography_encrypt"])
        print(
            f"{size:5d} B  enc {best['gbps']:6.2f} Gbit/s {best['mpps']:5.2f} Mpps  "
            f"dec {row.get('evp_decrypt', row['cryptography_decrypt'])['gbps']:6.2f} Gbit/s  "
            f"naive enc {row['naive_encrypt']['gbps']:5.2f}  "
            f"raw {row.get('raw_evp', {}).get('gbps', float('nan')):6.2f}  "
            f"ctypes {row.get('ctypes_evp', {}).get('mpps', float('nan')):5.2f} Mpps  "
            f"openssl {row.get('openssl_speed', {}).get('gbps', float('nan')):6.2f}",
            flush=True,
        )
    doc = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_hz": hz,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "evp": evp.AVAILABLE,
        },
        "setup": {
            "aead": "AES-128-GCM (RFC 4106), 16-byte ICV",
            "mode": "tunnel, IPv4 in IPv4",
            "batch": BATCH,
            "repetitions": reps,
            "statistic": "best of repetitions",
            "gbps_counts": "inner packet bytes",
        },
        "kernel_reference_gbps": KERNEL_GBPS,
        "results": results,
    }
    if evp.AVAILABLE:
        doc["breakdown_64B"] = breakdown_64(2 * reps)
        print("64 B breakdown (ns/packet):", {k: round(v, 1) for k, v in doc["breakdown_64B"].items()})
        doc["evp_calls_ns"] = evp_call_costs(2 * reps)
        print("EVP calls (ns each):", {k: round(v, 1) for k, v in doc["evp_calls_ns"].items()})
    if args.quick:
        print("quick run: results not written (the committed figures come from a full run)")
        return
    out = ROOT / "bench" / "results" / "ipsec.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    plot(doc, ROOT / "docs" / "img" / "ipsec.png")
    print("wrote", out.relative_to(ROOT))


def plot(doc, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    x = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    series = [
        ("raw_evp", "raw EVP AES-GCM (limit)", "k--"),
        ("openssl_speed", "openssl speed", "k:"),
        ("evp_encrypt", "microseg encrypt (EVP)", "C0-o"),
        ("evp_decrypt", "microseg decrypt (EVP)", "C1-o"),
        ("cryptography_encrypt", "microseg encrypt (cryptography)", "C2-s"),
        ("naive_encrypt", "naive per-packet loop", "C3-^"),
    ]
    for key, label, style in series:
        if all(key in r for r in rows):
            ax.plot(x, [r[key]["gbps"] for r in rows], style, label=label)
    ax.plot(
        [64, 1400],
        [KERNEL_GBPS["small"], KERNEL_GBPS["large"]],
        "C7x",
        markersize=10,
        label="Linux kernel (seed paper)",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(s) for s in x])
    ax.set_xlabel("inner packet size (bytes)")
    ax.set_ylabel("Gbit/s, one core")
    ax.set_title("ESP tunnel mode, AES-128-GCM")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
