"""Traffic generator: a virtual data centre's traffic, with per-packet ground truth.

:func:`generate` takes a loaded policy (tenants, hosts, workloads, security groups, network
policies) and a :class:`~microseg.io.scenario.ScenarioConfig`, and returns a
:class:`Generated`: a :class:`~microseg.packet.batch.Batch` of Ethernet frames and a
:class:`GroundTruth` that says, for every packet, the verdict it should get, the conntrack
state it should have, a reason and a traffic label.

Traffic: full TCP conversations (handshake, data in MSS-sized segments acknowledged every
second segment, FIN close) with a heavy-tailed (Pareto) response size, TLS 1.3 on tcp/443
(ClientHello / ServerHello / ChangeCipherSpec / application-data records), DNS over UDP (and
ICMP port unreachable when a server is down), ICMP echo, flows the policy forbids, and attacks
(port scan, cross-tenant spoofing, invalid TCP, SYN flood). Packets travel VXLAN-, GENEVE- or
NVGRE-encapsulated between the workloads' hosts (VNI = tenant), or untunnelled.

How it is fast: flow planning is Python per flow (a handful of "messages" each); expanding
messages into packets (segmentation, sequence/acknowledgement numbers, timestamps) is NumPy
over all packets at once; headers are built column-wise in NumPy per (family, protocol)
layout; one compiled pass (:func:`_assemble`, reference :func:`assemble_ref`) copies headers
and payloads into the batch buffer and fills lengths and checksums.

Ground truth comes from the scenario (which flows were drawn from the policy's allowed or
denied connections, which packets are attacks) and :class:`~microseg.io.scenario.Intent`;
it never runs the datapath. See ``docs/generator.md`` for the rules.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
from typing import Any

import numpy as np
from numba import njit

from .. import ctstate
from ..errors import InputError
from ..lowlevel import wr16, wr32
from ..packet.batch import LINK_ETHERNET, Batch
from ..packet.checksum import csum_fold, csum_partial, inet_checksum, ipv4_header_checksum, pseudo_header_sum
from .scenario import ICMP, ICMP6, TCP, UDP, Flow5, Intent, ScenarioConfig, address_of

# verdict codes (the same numbers as microseg.policy.verdict)
ALLOW, DROP, REJECT = 1, 2, 3
VERDICT_NAMES = {ALLOW: "allow", DROP: "drop", REJECT: "reject"}

# TCP flags
FIN, SYN, RST, PSH, ACK, URG = 1, 2, 4, 8, 16, 32

# message kinds (a message expands into packets)
M_HS, M_DATA, M_CLOSE, M_ONE = 0, 1, 2, 3

# payload fill after the explicit bytes of a message
FILL_POOL, FILL_TLS = 0, 1
TLS_REC = 5 + 16384 + 17  # one full TLS 1.3 application-data record on the wire
POOL_SIZE = 1 << 20  # pseudo-random payload bytes (power of two)

INNER_MTU_TUNNEL = 1450  # the usual overlay MTU (1500 minus VXLAN's 50 bytes)
INNER_MTU_PLAIN = 1500
WINDOW = 64240
TTL = 64
VXLAN_PORT, GENEVE_PORT = 4789, 6081
ETH_P_TEB = 0x6558  # transparent Ethernet bridging (GENEVE, NVGRE payload)

# the invalid flag combinations Linux conntrack marks INVALID (see tests/vectors/conntrack)
BAD_FLAGS = (SYN | FIN, 0, SYN | RST, FIN | PSH | URG, SYN | FIN | PSH | URG)
OOW_DELTA = 10_000_000  # an out-of-window segment's distance beyond the window


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
class GroundTruth:
    """Per-packet expectations, as arrays in packet (capture) order.

    ``verdict`` (1 allow / 2 drop / 3 reject), ``ct`` (:mod:`microseg.ctstate` bits: one of
    NEW/ESTABLISHED/RELATED/INVALID, plus REPLY for reply-direction packets; 0 where no state
    is meaningful: a packet dropped by anti-spoofing before tracking), ``reason`` and ``label``
    (indices into :attr:`reasons` / :attr:`labels`), ``cause`` (index into :attr:`causes`:
    short codes such as ``policy``, ``established``, ``egress_denied``), ``flow``, ``dir``
    (0 original, 1 reply) and ``tenant`` (VNI).
    """

    FIELDS = ("verdict", "ct", "reason", "label", "cause", "flow", "dir", "tenant")

    def __init__(self, verdict, ct, reason, label, cause, flow, dir, tenant, reasons, labels, causes):
        self.verdict, self.ct, self.reason, self.label = verdict, ct, reason, label
        self.cause, self.flow, self.dir, self.tenant = cause, flow, dir, tenant
        self.reasons, self.labels, self.causes = list(reasons), list(labels), list(causes)

    def __len__(self) -> int:
        return int(self.verdict.shape[0])

    def record(self, i: int) -> dict:
        return {
            "i": int(i),
            "flow": int(self.flow[i]),
            "dir": "reply" if self.dir[i] else "orig",
            "tenant": int(self.tenant[i]),
            "verdict": VERDICT_NAMES[int(self.verdict[i])],
            "ct": ctstate.state_name(int(self.ct[i])) if self.ct[i] else None,
            "reason": self.reasons[int(self.reason[i])],
            "cause": self.causes[int(self.cause[i])],
            "label": self.labels[int(self.label[i])],
        }

    def write_jsonl(self, path: str) -> None:
        """One JSON object per packet, in capture order."""
        names_v = [None, "allow", "drop", "reject"]
        ct_names = {0: "null"}
        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(self)):
                c = int(self.ct[i])
                if c not in ct_names:
                    ct_names[c] = json.dumps(ctstate.state_name(c))
                f.write(
                    '{"i":%d,"flow":%d,"dir":"%s","tenant":%d,"verdict":"%s","ct":%s,'
                    '"reason":%s,"cause":"%s","label":"%s"}\n'
                    % (
                        i,
                        self.flow[i],
                        "reply" if self.dir[i] else "orig",
                        self.tenant[i],
                        names_v[self.verdict[i]],
                        ct_names[c],
                        json.dumps(self.reasons[self.reason[i]]),
                        self.causes[self.cause[i]],
                        self.labels[self.label[i]],
                    )
                )

    def save_npz(self, path: str) -> None:
        np.savez_compressed(
            path,
            **{k: getattr(self, k) for k in self.FIELDS},
            reasons=np.array(self.reasons),
            labels=np.array(self.labels),
            causes=np.array(self.causes),
        )

    @classmethod
    def load_npz(cls, path: str) -> GroundTruth:
        try:
            z = np.load(path, allow_pickle=False)
            arrays = {k: z[k] for k in cls.FIELDS}
            names = {k: [str(s) for s in z[k]] for k in ("reasons", "labels", "causes")}
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"not a ground-truth file: {exc}", path) from None
        return cls(**arrays, **names)

    def select(self, idx) -> GroundTruth:
        return GroundTruth(
            **{k: getattr(self, k)[idx] for k in self.FIELDS},
            reasons=self.reasons,
            labels=self.labels,
            causes=self.causes,
        )

    def summary(self) -> dict:
        """Packet counts by label, verdict and conntrack state."""
        out: dict[str, Any] = {"packets": len(self), "by_label": {}, "by_verdict": {}, "by_ct": {}}
        for i, name in enumerate(self.labels):
            c = int(np.count_nonzero(self.label == i))
            if c:
                out["by_label"][name] = c
        for v, name in VERDICT_NAMES.items():
            c = int(np.count_nonzero(self.verdict == v))
            if c:
                out["by_verdict"][name] = c
        st = self.ct & ctstate.STATE_MASK
        for bit, name in ctstate.NAMES.items():
            c = int(np.count_nonzero(st == bit))
            if c:
                out["by_ct"][name] = c
        return out


class Generated:
    """A generated batch with its ground truth and flow table (built on first use)."""

    def __init__(self, batch: Batch, truth: GroundTruth, flows, config: ScenarioConfig):
        self.batch, self.truth, self.config = batch, truth, config
        self._flows = flows

    @property
    def flows(self) -> list:
        """One dict per flow (tenant, endpoints, addresses, ports, label, packets, verdict...)."""
        if callable(self._flows):
            self._flows = self._flows()
        return self._flows

    def write(self, pcap_path: str) -> dict:
        """Write ``X.pcap`` plus ``X.truth.jsonl``, ``X.truth.npz`` and ``X.flows.jsonl``
        beside it; returns the paths written."""
        from .pcap import write_pcap

        stem = pcap_path[:-5] if pcap_path.endswith(".pcap") else pcap_path
        paths = {
            "pcap": pcap_path,
            "truth": stem + ".truth.jsonl",
            "truth_npz": stem + ".truth.npz",
            "flows": stem + ".flows.jsonl",
        }
        try:
            write_pcap(pcap_path, self.batch, nanosecond=True)
            self.truth.write_jsonl(paths["truth"])
            self.truth.save_npz(paths["truth_npz"])
            with open(paths["flows"], "w", encoding="utf-8") as f:
                for fl in self.flows:
                    f.write(json.dumps(fl, separators=(",", ":")) + "\n")
        except OSError as exc:
            raise InputError(f"cannot write: {exc.strerror or exc}", exc.filename or pcap_path) from None
        return paths


# ---------------------------------------------------------------------------------------------
# Policy loading
# ---------------------------------------------------------------------------------------------
def builtin_policy_path() -> str:
    """Path of the built-in virtual data centre (``microseg/data/datacenter.yaml``)."""
    return os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "datacenter.yaml"
    )


def load_policy(path: str | None = None):
    """Load a policy file (default: the built-in data centre) with the policy loader."""
    from ..policy.model import load_policy as _load

    return _load(path or builtin_policy_path())


# ---------------------------------------------------------------------------------------------
# Payload builders (explicit bytes at the start of a message)
# ---------------------------------------------------------------------------------------------
_CIPHERS = (
    0x1301,
    0x1302,
    0x1303,
    0xC02B,
    0xC02F,
    0xC02C,
    0xC030,
    0xCCA9,
    0xCCA8,
    0xC013,
    0xC014,
    0x009C,
    0x009D,
    0x002F,
    0x0035,
)
_SIGALGS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


def _ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!HH", etype, len(body)) + body


def tls_client_hello(rand: bytes, sid: bytes, key: bytes, sni: str) -> bytes:
    """A TLS 1.3 ClientHello record (as a browser or curl sends it), padded to 512 bytes."""
    name = sni.encode("ascii")
    exts = b"".join(
        (
            _ext(0x0000, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name),
            _ext(0x000B, b"\x01\x00"),
            _ext(0x000A, struct.pack("!H3H", 6, 0x001D, 0x0017, 0x0018)),
            _ext(0x0010, b"\x00\x0c\x02h2\x08http/1.1"),
            _ext(0x000D, struct.pack("!H", 2 * len(_SIGALGS)) + struct.pack(f"!{len(_SIGALGS)}H", *_SIGALGS)),
            _ext(0x002B, b"\x04\x03\x04\x03\x03"),
            _ext(0x002D, b"\x01\x01"),
            _ext(0x0033, struct.pack("!HHH", 36, 0x001D, 32) + key),
        )
    )
    body_head = (
        b"\x03\x03"
        + rand
        + bytes([len(sid)])
        + sid
        + struct.pack("!H", 2 * len(_CIPHERS))
        + struct.pack(f"!{len(_CIPHERS)}H", *_CIPHERS)
        + b"\x01\x00"
    )
    pad = 512 - (len(body_head) + 2 + len(exts) + 4) - 4  # RFC 7685 padding to 512 bytes
    if pad >= 0:
        exts += _ext(0x0015, bytes(pad))
    body = body_head + struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def tls_server_hello(rand: bytes, sid: bytes, key: bytes) -> bytes:
    """A TLS 1.3 ServerHello record followed by the middlebox-compatibility ChangeCipherSpec."""
    exts = _ext(0x002B, b"\x03\x04") + _ext(0x0033, struct.pack("!HH", 0x001D, 32) + key)
    body = (
        b"\x03\x03"
        + rand
        + bytes([len(sid)])
        + sid
        + struct.pack("!H", 0x1301)
        + b"\x00"
        + struct.pack("!H", len(exts))
        + exts
    )
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + struct.pack("!H", len(hs)) + hs + b"\x14\x03\x03\x00\x01\x01"


TLS_CCS = b"\x14\x03\x03\x00\x01\x01"


def dns_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        lb = label.encode("ascii")[:63]
        out += bytes([len(lb)]) + lb
    return out + b"\x00"


def dns_query(qid: int, name: str, qtype: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + dns_name(name) + struct.pack("!HH", qtype, 1)


def dns_response(qid: int, name: str, qtype: int, answer: bytes | None) -> bytes:
    """A recursive answer with one A/AAAA record, or NXDOMAIN when ``answer`` is None."""
    q = dns_name(name) + struct.pack("!HH", qtype, 1)
    if answer is None:
        return struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + q
    rr = struct.pack("!HHHIH", 0xC00C, qtype, 1, 300, len(answer)) + answer
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q + rr


PING_PAYLOAD = bytes(8) + bytes(range(0x10, 0x38))  # Linux ping: timeval slot + pattern


def quoted_udp(sa, da, sport: int, dport: int, payload: bytes, ip_id: int, flowlabel: int) -> bytes:
    """A UDP datagram exactly as sent (IPv4 with DF, or IPv6; TTL 64), as an ICMP error quotes
    it: whole, as Linux does for datagrams this small."""
    ulen = 8 + len(payload)
    pseudo = pseudo_header_sum(sa.packed, da.packed, UDP, ulen)
    c = inet_checksum(struct.pack("!HHHH", sport, dport, ulen, 0) + payload, pseudo) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, ulen, c) + payload
    if sa.version == 4:
        hdr = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ip_id, 0x4000, TTL, UDP, 0, sa.packed, da.packed
        )
        hdr = hdr[:10] + struct.pack("!H", ipv4_header_checksum(hdr)) + hdr[12:]
    else:
        hdr = struct.pack("!IHBB16s16s", (6 << 28) | flowlabel, ulen, UDP, TTL, sa.packed, da.packed)
    return hdr + udp


# ---------------------------------------------------------------------------------------------
# The compiled assembly pass and its reference
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _csum_add(buf, start, length, acc):
    return csum_partial(buf, start, start + length, acc)


@njit(cache=True)
def _csum_fold(acc):
    """The checksum field for an unfolded sum."""
    return (~csum_fold(acc)) & 0xFFFF


@njit(cache=True)
def _assemble(
    out,
    p_off,
    p_tmpl,
    p_len,
    p_msg,
    p_stream,
    p_seq,
    p_ack,
    p_flags,
    p_win,
    p_ipid,
    p_oipid,
    tdata,
    t_off,
    t_len,
    t_oip,
    t_oudp,
    t_iip,
    t_il4,
    t_ver,
    t_proto,
    m_blob,
    m_blob_len,
    m_fill,
    m_len,
    m_pool,
    blob,
    pool,
):
    """Write every packet: header template, payload, then lengths and checksums."""
    pmask = pool.shape[0] - 1
    for i in range(p_off.shape[0]):
        t = p_tmpl[i]
        o = p_off[i]
        h = t_len[t]
        src = t_off[t]
        for k in range(h):
            out[o + k] = tdata[src + k]
        L = p_len[i]
        m = p_msg[i]
        s0 = p_stream[i]
        bl = m_blob_len[m]
        bo = m_blob[m]
        fill = m_fill[m]
        mlen = m_len[m]
        pbase = m_pool[m]
        pay = o + h
        k = 0
        while k < L and s0 + k < bl:  # explicit bytes
            out[pay + k] = blob[bo + s0 + k]
            k += 1
        if k < L:  # then pseudo-random bytes
            q0 = s0 + k - bl
            q1 = s0 + L - bl
            for q in range(q0, q1):
                out[pay + q - q0 + k] = pool[(pbase + q) & pmask]
            if fill == 1:  # TLS record headers within [q0, q1)
                rec = (q0 // TLS_REC) * TLS_REC
                while rec < q1:
                    rem = mlen - bl - rec
                    rl = (TLS_REC if rem > TLS_REC else rem) - 5
                    for j in range(5):
                        q = rec + j
                        if q0 <= q < q1:
                            if j == 0:
                                b = 0x17
                            elif j < 3:
                                b = 0x03
                            elif j == 3:
                                b = (rl >> 8) & 0xFF
                            else:
                                b = rl & 0xFF
                            out[pay + q - q0 + k] = b
                    rec += TLS_REC
        total = h + L
        iip = o + t_iip[t]
        il4 = o + t_il4[t]
        l4len = total - t_il4[t]
        proto = t_proto[t]
        if proto == 6:
            wr32(out, il4 + 4, p_seq[i])
            wr32(out, il4 + 8, p_ack[i])
            out[il4 + 13] = p_flags[i]
            wr16(out, il4 + 14, p_win[i])
            wr16(out, il4 + 16, 0)
        elif proto == 17:
            wr16(out, il4 + 4, l4len)
            wr16(out, il4 + 6, 0)
        else:
            wr16(out, il4 + 2, 0)
            wr16(out, il4 + 6, p_seq[i] & 0xFFFF)
        if t_ver[t] == 4:
            wr16(out, iip + 2, total - t_iip[t])
            wr16(out, iip + 4, p_ipid[i])
            wr16(out, iip + 10, 0)
            wr16(out, iip + 10, _csum_fold(_csum_add(out, iip, 20, 0)))
            acc = _csum_add(out, iip + 12, 8, 0)
        else:
            wr16(out, iip + 4, l4len)
            acc = _csum_add(out, iip + 8, 32, 0)
        if proto == 1:
            acc = 0
        else:
            acc += proto + l4len
        c = _csum_fold(_csum_add(out, il4, l4len, acc))
        if proto == 6:
            wr16(out, il4 + 16, c)
        elif proto == 17:
            wr16(out, il4 + 6, 0xFFFF if c == 0 else c)
        else:
            wr16(out, il4 + 2, c)
        if t_oip[t] >= 0:
            oip = o + t_oip[t]
            wr16(out, oip + 2, total - t_oip[t])
            wr16(out, oip + 4, p_oipid[i])
            wr16(out, oip + 10, 0)
            wr16(out, oip + 10, _csum_fold(_csum_add(out, oip, 20, 0)))
            if t_oudp[t] >= 0:
                wr16(out, o + t_oudp[t] + 4, total - t_oudp[t])


assemble_ref = _assemble.py_func


# ---------------------------------------------------------------------------------------------
# Header templates, built column-wise per layout
# ---------------------------------------------------------------------------------------------
def _col16(a, off, v):
    v = np.asarray(v, dtype=np.int64)
    a[:, off] = (v >> 8) & 0xFF
    a[:, off + 1] = v & 0xFF


def _col32(a, off, v):
    v = np.asarray(v, dtype=np.int64)
    for k in range(4):
        a[:, off + k] = (v >> (24 - 8 * k)) & 0xFF


def _col48(a, off, v):
    v = np.asarray(v, dtype=np.uint64)
    for k in range(6):
        a[:, off + k] = ((v >> np.uint64(40 - 8 * k)) & np.uint64(0xFF)).astype(np.uint8)


def _colbytes(a, off, rows):
    """rows: uint8 array (n, width)."""
    a[:, off : off + rows.shape[1]] = rows


def _build_templates(T: dict, tunnel: str):
    """Header templates for every (flow, direction): returns the flat template buffer and the
    per-template layout arrays. ``T`` holds per-template columns (NumPy arrays)."""
    n = T["family"].shape[0]
    t_len = np.zeros(n, np.int32)
    t_oip = np.full(n, -1, np.int32)
    t_oudp = np.full(n, -1, np.int32)
    t_iip = np.zeros(n, np.int32)
    t_il4 = np.zeros(n, np.int32)
    t_ver = T["family"].astype(np.uint8)
    t_proto = T["proto"].astype(np.uint8)
    outer = {"vxlan": 50, "geneve": 50, "nvgre": 42, "none": 0}[tunnel]
    parts = []
    layouts = []
    for fam in (4, 6):
        for proto in (TCP, UDP, ICMP, ICMP6):
            idx = np.flatnonzero((T["family"] == fam) & (T["proto"] == proto))
            if idx.size:
                layouts.append((fam, proto, idx))
    for fam, proto, idx in layouts:
        ipl = 20 if fam == 4 else 40
        l4l = {TCP: 20, UDP: 8, ICMP: 8, ICMP6: 8}[proto]
        H = outer + 14 + ipl + l4l
        a = np.zeros((idx.size, H), np.uint8)
        if outer:
            _col48(a, 0, T["o_dmac"][idx])
            _col48(a, 6, T["o_smac"][idx])
            _col16(a, 12, 0x0800)
            a[:, 14] = 0x45
            _col16(a, 20, 0x4000)  # DF
            a[:, 22] = TTL
            a[:, 23] = 47 if tunnel == "nvgre" else 17
            _col32(a, 26, T["o_src"][idx])
            _col32(a, 30, T["o_dst"][idx])
            if tunnel == "nvgre":
                _col16(a, 34, 0x2000)  # K bit
                _col16(a, 36, ETH_P_TEB)
                _col32(a, 38, (T["vni"][idx].astype(np.int64) << 8) | (T["entropy"][idx] & 0xFF))
            else:
                _col16(a, 34, T["entropy"][idx])
                _col16(a, 36, VXLAN_PORT if tunnel == "vxlan" else GENEVE_PORT)
                if tunnel == "vxlan":
                    a[:, 42] = 0x08
                else:
                    _col16(a, 44, ETH_P_TEB)
                _col32(a, 46, T["vni"][idx].astype(np.int64) << 8)
            t_oip[idx] = 14
            if tunnel != "nvgre":
                t_oudp[idx] = 34
        e = outer
        _col48(a, e, T["dmac"][idx])
        _col48(a, e + 6, T["smac"][idx])
        _col16(a, e + 12, 0x0800 if fam == 4 else 0x86DD)
        ip = e + 14
        if fam == 4:
            a[:, ip] = 0x45
            _col16(a, ip + 6, 0x4000)
            a[:, ip + 8] = TTL
            a[:, ip + 9] = proto
            _colbytes(a, ip + 12, T["src"][idx, 12:16])
            _colbytes(a, ip + 16, T["dst"][idx, 12:16])
        else:
            _col32(a, ip, (6 << 28) | T["flowlabel"][idx].astype(np.int64))
            a[:, ip + 6] = proto
            a[:, ip + 7] = TTL
            _colbytes(a, ip + 8, T["src"][idx])
            _colbytes(a, ip + 24, T["dst"][idx])
        l4 = ip + ipl
        if proto in (TCP, UDP):
            _col16(a, l4, T["sport"][idx])
            _col16(a, l4 + 2, T["dport"][idx])
            if proto == TCP:
                a[:, l4 + 12] = 0x50
        else:
            a[:, l4] = T["icmp_type"][idx]
            a[:, l4 + 1] = T["icmp_code"][idx]
            _col16(a, l4 + 4, T["sport"][idx])  # echo identifier
        t_len[idx] = H
        t_iip[idx] = ip
        t_il4[idx] = l4
        parts.append((idx, a))
    t_off = np.zeros(n, np.int64)
    if n:
        np.cumsum(t_len[:-1], out=t_off[1:])
    tdata = np.zeros(int(t_len.sum()), np.uint8)
    for idx, a in parts:
        pos = t_off[idx][:, None] + np.arange(a.shape[1])[None, :]
        tdata[pos.ravel()] = a.ravel()
    return tdata, t_off, t_len, t_oip, t_oudp, t_iip, t_il4, t_ver, t_proto


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
STANDARD_SERVICES = (
    (TCP, 22),
    (TCP, 80),
    (TCP, 443),
    (TCP, 3306),
    (TCP, 5432),
    (TCP, 6379),
    (TCP, 8080),
    (TCP, 9000),
    (UDP, 53),
    (UDP, 123),
)


def _addr16(a) -> bytes:
    """16-byte form used by the templates: IPv4 as ::ffff:a.b.c.d (its last 4 bytes)."""
    if a.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + a.packed
    return a.packed


class _Names:
    def __init__(self, *initial):
        self.list, self.index = [], {}
        for s in initial:
            self(s)

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.list)
            self.list.append(s)
        return i


class _Rand:
    """Scalar draws from pre-generated blocks (a NumPy call per scalar costs microseconds)."""

    def __init__(self, rng):
        self.rng = rng
        self.buf = rng.random(1 << 16)
        self.i = 0

    def random(self) -> float:
        if self.i == self.buf.shape[0]:
            self.buf = self.rng.random(1 << 16)
            self.i = 0
        v = self.buf[self.i]
        self.i += 1
        return float(v)

    def int(self, lo, hi=None) -> int:
        """Uniform integer in [lo, hi) (or [0, lo))."""
        if hi is None:
            lo, hi = 0, lo
        return lo + min(int(self.random() * (hi - lo)), hi - lo - 1)


class _Planner:
    """Draws flows from the policy's allowed/denied connections and writes their messages."""

    def __init__(self, policy, cfg: ScenarioConfig):
        self.p, self.cfg = policy, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.R = _Rand(self.rng)
        self.intent = Intent(policy)
        tenants = {t.name: t for t in policy.tenants}
        if cfg.tenants is not None:
            for t in cfg.tenants:
                if t not in tenants:
                    raise InputError(f"scenario: no tenant named {t!r} in the policy")
        self.untagged = cfg.tunnel == "none"
        if self.untagged:
            ut = getattr(policy, "untagged_tenant", None)
            if ut is None:
                raise InputError(
                    "untunnelled traffic needs the policy's untagged_tenant "
                    "(the tenant of packets without a tunnel header)"
                )
            if cfg.tenants is not None and list(cfg.tenants) != [ut]:
                raise InputError(f"untunnelled traffic can only be tenant {ut!r} (untagged_tenant)")
            names = [ut]
        else:
            names = list(cfg.tenants) if cfg.tenants is not None else [t.name for t in policy.tenants]
        self.tenants = [tenants[n] for n in names]
        self.hosts = {h.name: (i, h) for i, h in enumerate(policy.hosts)}
        self.host_addr = {}
        for name, (_i, h) in self.hosts.items():
            a = ipaddress.ip_address(h.address)
            if a.version != 4 and not self.untagged:
                raise InputError(f"host {name}: the generator's underlay is IPv4, not {a}")
            self.host_addr[name] = int(a) if a.version == 4 else 0
        self.wl_index = {(w.tenant, w.name): i for i, w in enumerate(policy.workloads)}
        self.by_tenant = {
            t.name: [w for w in policy.workloads if w.tenant == t.name and w.host is not None]
            for t in self.tenants
        }
        for t in self.tenants:
            if len(self.by_tenant[t.name]) < 2:
                raise InputError(
                    f"tenant {t.name}: needs at least two workloads placed on hosts to generate traffic"
                )
        # a workload without a MAC in the policy gets a locally administered one, unique in
        # its tenant (the datapath checks a source MAC only against workloads that name one)
        self.macs = {}
        used = {(w.tenant, w.mac) for w in policy.workloads if w.mac is not None}
        for i, w in enumerate(policy.workloads):
            m = w.mac
            k = i
            while m is None or (w.mac is None and (w.tenant, m) in used):
                m = 0x024D53000000 | (k & 0xFFFFFF)
                k += 1
            used.add((w.tenant, m))
            self.macs[(w.tenant, w.name)] = m
        self.reasons = _Names()
        self.labels = _Names(
            "tcp", "tls", "dns", "udp", "icmp", "port scan", "cross-tenant", "invalid tcp", "syn flood"
        )
        self.causes = _Names(
            "policy",
            "established",
            "egress_denied",
            "ingress_denied",
            "spoofed_source",
            "ct_invalid",
            "related",
        )
        self.deny = REJECT if self.intent.deny_verdict == "reject" else DROP
        self.ports_used: dict[tuple, list[int]] = {}
        self.F: list[tuple] = []  # template pairs: the columns of two header templates
        self.flow_pair: list[int] = []  # per flow: its template pair
        self.a16_cache: dict[Any, bytes] = {}
        self.host_ix = {h.name: i for i, h in enumerate(policy.hosts)}
        self.addr = {(w.tenant, w.name, fam): address_of(w, fam) for w in policy.workloads for fam in (4, 6)}
        self.flow_meta: list[tuple] = []
        self.flow_msgs: list[list[tuple]] = []  # per flow: list of message tuples
        self.blobs: list[bytes] = []
        self.blob_len = 0
        self.blob_index: dict[bytes, tuple[int, int]] = {}
        self._candidates()

    # -- helpers ---------------------------------------------------------------------------------
    def blob(self, data: bytes, share: bool = False) -> tuple[int, int]:
        if share:
            hit = self.blob_index.get(data)
            if hit is not None:
                return hit
        off = self.blob_len
        self.blobs.append(data)
        self.blob_len += len(data)
        if share:
            self.blob_index[data] = (off, len(data))
        return off, len(data)

    def sport(self, key, lo=32768, hi=60999) -> int:
        """A source port (or echo id) not used before for ``key`` (the rest of the tuple):
        sequential from a random start, as Linux hands out ephemeral ports."""
        st = self.ports_used.get(key)
        if st is None:
            st = self.ports_used[key] = [self.R.int(lo, hi + 1), 0]
        start, used = st
        span = hi - lo + 1
        if used >= span:
            raise InputError(
                "scenario: too many flows between one pair of endpoints "
                "(source ports exhausted); lower the flow count or attack shares"
            )
        st[1] += 1
        return lo + (start - lo + used) % span

    def host_mac(self, host: str) -> int:
        return 0x525400000000 | (self.host_addr[host] & 0xFFFFFF)

    def _candidates(self):
        """Every (src, dst, family, service) of each tenant, split by the intent."""
        services = set(STANDARD_SERVICES)
        for g in self.p.security_groups:
            for r in g.rules:
                if r.protocol in (TCP, UDP) and r.port_min is not None:
                    services.add((r.protocol, r.port_min))
        for np_ in self.p.network_policies:
            for r in np_.ingress + np_.egress:
                for pt in r.ports or ():
                    if pt.protocol in (TCP, UDP) and pt.lo is not None:
                        services.add((pt.protocol, pt.lo))
        services = sorted(services)
        self.cand = {}
        self.tcp_pairs = []
        for t in self.tenants:
            ws = self.by_tenant[t.name]
            for s in ws:
                for d in ws:
                    if s is d or s.host == d.host:
                        continue
                    for fam in (4, 6):
                        sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
                        if sa is None or da is None:
                            continue
                        items = [(proto, port, -1) for proto, port in services]
                        items.append((ICMP if fam == 4 else ICMP6, 0, 8 if fam == 4 else 128))
                        for proto, port, itype in items:
                            f5 = Flow5(fam, proto, port, itype, 0)
                            dec = self.intent.decide(s, sa, d, da, f5)
                            if proto == TCP:
                                kind = "tls" if port == 443 else "tcp"
                            elif proto == UDP:
                                kind = "dns" if port == 53 else "udp"
                            else:
                                kind = "icmp"
                            c = (t, s, d, fam, proto, port, dec)
                            self.cand.setdefault((dec.allow, kind, fam), []).append(c)
                            self.cand.setdefault((dec.allow, "any", fam), []).append(c)
                            if proto == TCP and fam == 4:
                                self.tcp_pairs.append(c)

    def pick(self, allowed: bool, kind: str, fam: int):
        """A random candidate of that kind and family (else the other family, else any kind)."""
        for key in (
            (allowed, kind, fam),
            (allowed, kind, 10 - fam),
            (allowed, "any", fam),
            (allowed, "any", 10 - fam),
        ):
            lst = self.cand.get(key)
            if lst:
                return lst[self.R.int(len(lst))]
        return None

    # -- flows -----------------------------------------------------------------------------------
    def new_flow(
        self, tenant, s, d, fam, proto, sport, dport, label, sa=None, da=None, icmp=False, meta=None
    ) -> int:
        """Register a flow (its header templates are built later, column-wise); returns its id.
        ``sa``/``da`` override the workloads' addresses (spoofing); ``d`` gives the frame's
        destination MAC and host."""
        f = len(self.flow_meta)
        sa = sa if sa is not None else self.addr[(s.tenant, s.name, fam)]
        da = da if da is not None else self.addr[(d.tenant, d.name, fam)]
        self.flow_pair.append(self.pair(tenant, s, d, fam, proto, sa, da, sport, dport, icmp))
        self.flow_meta.append((tenant, s.name, d.name, sa, da, proto, sport, dport, label, meta))
        self.flow_msgs.append([])
        return f

    def pair(self, tenant, s, d, fam, proto, sa, da, sport, dport, icmp=False, itypes=None, icode=0) -> int:
        """Add the two header templates (s -> d, d -> s) of one 5-tuple; returns the pair index.
        ICMP types default to echo request / reply."""
        if itypes is None:
            itypes = (8, 0) if fam == 4 else (128, 129)
        self.F.append(
            (
                fam,
                proto,
                self.host_ix[s.host],
                self.host_ix[d.host],
                self.macs[(s.tenant, s.name)],
                self.macs[(d.tenant, d.name)],
                self.a16(sa),
                self.a16(da),
                sport,
                dport,
                icmp,
                self.wl_index[(s.tenant, s.name)],
                self.wl_index[(d.tenant, d.name)],
                tenant.vni,
                itypes[0],
                itypes[1],
                icode,
                self.R.int(1 << 20),
                self.R.int(1 << 16),
                self.R.int(1 << 16),
            )
        )
        return len(self.F) - 1

    def _meta(self, f) -> dict:
        m = self.flow_meta[f][-1]
        if m is None:
            m = {}
            self.flow_meta[f] = self.flow_meta[f][:-1] + (m,)
        return m

    def a16(self, a) -> bytes:
        b = self.a16_cache.get(a)
        if b is None:
            b = self.a16_cache[a] = _addr16(a)
        return b

    def msg(
        self,
        f,
        kind,
        dr=0,
        nbytes=0,
        flags=0,
        blob=(0, 0),
        fill=FILL_POOL,
        seq_delta=0,
        counts=True,
        icmp_seq=0,
        verdict=ALLOW,
        ct_first=ctstate.NEW,
        ct_rest=ctstate.ESTABLISHED,
        reason=0,
        label=0,
        cause=0,
        pair=-1,
    ):
        """Append a message to flow ``f`` (``pair``: send it with another template pair)."""
        self.flow_msgs[f].append(
            (
                kind,
                dr,
                max(nbytes, blob[1]) if kind in (M_DATA, M_ONE) else 0,
                flags,
                blob[0],
                blob[1],
                fill,
                seq_delta,
                counts,
                icmp_seq,
                verdict,
                ct_first,
                ct_rest,
                reason,
                label,
                cause,
                pair,
            )
        )

    @staticmethod
    def flows_table(flow_meta, per_flow_pkts) -> list:
        """The flow table as JSON-ready dicts."""
        out = []
        text = {}
        for f, (t, s, d, sa, da, proto, sport, dport, label, meta) in enumerate(flow_meta):
            for a in (sa, da):
                if a not in text:
                    text[a] = str(a)
            row = {
                "flow": f,
                "tenant": t.name,
                "vni": t.vni,
                "src": s,
                "dst": d,
                "src_addr": text[sa],
                "dst_addr": text[da],
                "family": sa.version,
                "proto": proto,
                "sport": sport,
                "dport": dport,
                "label": label,
                "packets": int(per_flow_pkts[f]),
            }
            if meta:
                row.update(meta)
            out.append(row)
        return out

    def template_columns(self) -> dict:
        """Per-template columns (template 2f is flow f's original direction, 2f+1 its reply)."""
        n = len(self.F)
        cols = list(zip(*self.F)) if n else [()] * 20
        fam = np.array(cols[0], np.int64)
        proto = np.array(cols[1], np.int64)
        sh, dh = np.array(cols[2], np.int64), np.array(cols[3], np.int64)
        smac, dmac = np.array(cols[4], np.uint64), np.array(cols[5], np.uint64)
        src = np.frombuffer(b"".join(cols[6]), np.uint8).reshape(n, 16)
        dst = np.frombuffer(b"".join(cols[7]), np.uint8).reshape(n, 16)
        sport, dport = np.array(cols[8], np.int64), np.array(cols[9], np.int64)
        icmp = np.array(cols[10], bool)
        sp, dp = np.array(cols[11], np.int64), np.array(cols[12], np.int64)
        hosts = np.array([self.host_addr[h.name] for h in self.p.hosts] or [0], np.int64)
        hmac = np.array([self.host_mac(h.name) for h in self.p.hosts] or [0], np.uint64)
        vni = np.full(n, 0, np.int64) if self.untagged else np.array(cols[13], np.int64)
        it0, it1 = np.array(cols[14], np.int64), np.array(cols[15], np.int64)
        icode = np.array(cols[16], np.int64)
        flowlabel = np.array(cols[17], np.int64)

        def inter(a, b):
            out = np.empty((2 * n,) + a.shape[1:], a.dtype)
            out[0::2], out[1::2] = a, b
            return out

        f_ix = np.arange(n, dtype=np.int64)
        return {
            "family": inter(fam, fam),
            "proto": inter(proto, proto),
            "vni": inter(vni, vni),
            "entropy": inter(*(2 * [49152 + ((f_ix * 2654435761 + self.cfg.seed) & 0x3FFF)])),
            "flowlabel": inter(flowlabel, flowlabel),
            "o_src": inter(hosts[sh], hosts[dh]),
            "o_dst": inter(hosts[dh], hosts[sh]),
            "o_smac": inter(hmac[sh], hmac[dh]),
            "o_dmac": inter(hmac[dh], hmac[sh]),
            "smac": inter(smac, dmac),
            "dmac": inter(dmac, smac),
            "src": inter(src, dst),
            "dst": inter(dst, src),
            "sport": inter(sport, np.where(icmp, sport, dport)),
            "dport": inter(dport, sport),
            "icmp_type": inter(it0, it1),
            "icmp_code": inter(icode, icode),
            "port": inter(sp, dp),
        }

    def pareto(self) -> int:
        c = self.cfg
        u = self.R.random()
        v = c.size_min * (1.0 - u) ** (-1.0 / c.size_alpha)
        return int(min(v, c.size_max))

    # -- benign traffic ----------------------------------------------------------------------------
    def benign(self):
        c = self.cfg
        shares = np.array(
            [c.tls_share, c.dns_share, c.icmp_share, max(0.0, 1.0 - c.tls_share - c.dns_share - c.icmp_share)]
        )
        kinds = ("tls", "dns", "icmp", "tcp")
        denied_v = self.rng.random(c.flows) < c.denied_share
        kind_v = self.rng.choice(4, size=c.flows, p=shares / shares.sum())
        fam_v = np.where(self.rng.random(c.flows) < c.ipv6_share, 6, 4)
        for i in range(c.flows):
            denied, kind, fam = bool(denied_v[i]), kinds[kind_v[i]], int(fam_v[i])
            cand = self.pick(not denied, kind, fam)
            if cand is None:
                cand = self.pick(denied, kind, fam)
                denied = not denied
                if cand is None:
                    raise InputError(
                        "the policy allows no connection between workloads on "
                        "different hosts: nothing to generate"
                    )
            t, s, d, fam, proto, port, dec = cand
            if denied:
                self._denied_flow(cand)
            elif proto == TCP:
                self._tcp_flow(cand, tls=(port == 443))
            elif proto == UDP:
                self._udp_flow(cand)
            else:
                self._icmp_flow(cand)

    def _tcp_flow(self, cand, tls: bool):
        t, s, d, fam, proto, port, dec = cand
        sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
        sp = self.sport((t.name, sa.version, int(sa), int(da), TCP, port))
        label = self.labels("tls" if tls else "tcp")
        reason = self.reasons(dec.reason)
        f = self.new_flow(
            t,
            s,
            d,
            fam,
            TCP,
            sp,
            port,
            "tls" if tls else "tcp",
            meta={"verdict": "allow", "reason": dec.reason},
        )
        kw = dict(reason=reason, label=label, cause=0, ct_first=ctstate.ESTABLISHED)
        self.msg(f, M_HS, reason=reason, label=label, cause=0)
        rounds = 1
        while rounds < 20 and self.R.random() < 0.4:  # keep-alive: geometric, mean 1.7
            rounds += 1
        total = 0
        r = self.rng
        if tls:
            sni = f"{d.name}.{t.name}.internal"
            ch = tls_client_hello(r.bytes(32), r.bytes(32), r.bytes(32), sni)
            sid = ch[44:76]
            self.msg(f, M_DATA, 0, blob=self.blob(ch), **kw)
            sh = tls_server_hello(r.bytes(32), sid, r.bytes(32))
            enc = self.R.int(2400, 4800)  # EncryptedExtensions..Finished
            self.msg(f, M_DATA, 1, len(sh) + enc, blob=self.blob(sh), fill=FILL_TLS, **kw)
            self.msg(
                f, M_DATA, 0, len(TLS_CCS) + 58, blob=self.blob(TLS_CCS, share=True), fill=FILL_TLS, **kw
            )
            for _ in range(rounds):
                req = self.R.int(120, 900)
                self.msg(f, M_DATA, 0, req, fill=FILL_TLS, **kw)
                resp = self._tls_len(self.pareto())
                total += resp
                self.msg(f, M_DATA, 1, resp, fill=FILL_TLS, **kw)
            self.msg(f, M_DATA, 0, 24, fill=FILL_TLS, **kw)  # close_notify alert
        else:
            http = port in (80, 8080, 9000)
            for k in range(rounds):
                resp = self.pareto()
                total += resp
                if http:
                    request = (
                        f"GET /api/v1/items/{self.R.int(1, 100000)} HTTP/1.1\r\n"
                        f"Host: {d.name}.{t.name}.internal\r\nUser-Agent: curl/8.5.0\r\n"
                        f"Accept: */*\r\n\r\n"
                    ).encode()
                    self.msg(f, M_DATA, 0, blob=self.blob(request), **kw)
                    hdr = (
                        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Length: {resp}\r\n\r\n"
                    ).encode()
                    self.msg(f, M_DATA, 1, len(hdr) + resp, blob=self.blob(hdr), **kw)
                elif port == 53:  # DNS over TCP: length-prefixed messages
                    qid = self.R.int(65536)
                    name = f"{d.name}.{t.name}.internal"
                    ans = self.addr[(d.tenant, d.name, 4)]
                    q = dns_query(qid, name, 1)
                    a = dns_response(qid, name, 1, None if ans is None else ans.packed)
                    self.msg(f, M_DATA, 0, blob=self.blob(struct.pack("!H", len(q)) + q), **kw)
                    self.msg(f, M_DATA, 1, blob=self.blob(struct.pack("!H", len(a)) + a), **kw)
                    total += len(a) + 2 - resp
                elif port == 22 and k == 0:
                    self.msg(f, M_DATA, 1, blob=self.blob(b"SSH-2.0-OpenSSH_9.6\r\n", share=True), **kw)
                    self.msg(
                        f, M_DATA, 0, 1500, blob=self.blob(b"SSH-2.0-OpenSSH_9.6p1\r\n", share=True), **kw
                    )
                    self.msg(f, M_DATA, 1, resp, **kw)
                else:
                    self.msg(f, M_DATA, 0, self.R.int(40, 600), **kw)
                    self.msg(f, M_DATA, 1, resp, **kw)
        self.msg(f, M_CLOSE, 0, **kw)
        self._meta(f)["bytes"] = total

    @staticmethod
    def _tls_len(n: int) -> int:
        """Round an application-data stream length so every record has room for its tag."""
        r = n % TLS_REC
        if 0 < r < 5 + 17 + 1:
            n += 5 + 17 + 1 - r
        return max(n, 5 + 17 + 1)

    def _udp_flow(self, cand):
        t, s, d, fam, proto, port, dec = cand
        sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
        sp = self.sport((t.name, sa.version, int(sa), int(da), UDP, port))
        kind = "dns" if port == 53 else "udp"
        f = self.new_flow(t, s, d, fam, UDP, sp, port, kind, meta={"verdict": "allow", "reason": dec.reason})
        reason, label = self.reasons(dec.reason), self.labels(kind)
        if port != 53:
            for dr in (0, 1):
                self.msg(
                    f,
                    M_ONE,
                    dr,
                    self.R.int(40, 400),
                    reason=reason,
                    label=label,
                    cause=dr,
                    ct_first=ctstate.NEW if dr == 0 else ctstate.ESTABLISHED,
                )
            return
        ws = self.by_tenant[t.name]
        target = ws[self.R.int(len(ws))]
        qtype = 28 if fam == 6 else 1
        qid = self.R.int(0, 65536)
        name = f"{target.name}.{t.name}.internal"
        ans = address_of(target, fam)
        if self.R.random() < 0.05:
            name, ans = f"missing-{qid}.{t.name}.internal", None
        q = dns_query(qid, name, qtype)
        self.msg(f, M_ONE, 0, blob=self.blob(q), reason=reason, label=label, cause=0, ct_first=ctstate.NEW)
        if self.R.random() < 0.04:
            # the server is down: its host answers "port unreachable", quoting the query
            row = self.F[self.flow_pair[f]]
            quoted = quoted_udp(sa, da, sp, port, q, row[18], row[17])
            v4 = fam == 4
            epair = self.pair(
                t,
                s,
                d,
                fam,
                ICMP if v4 else ICMP6,
                sa,
                da,
                0,
                0,
                icmp=True,
                itypes=(3, 3) if v4 else (1, 1),
                icode=3 if v4 else 4,
            )
            self.msg(
                f,
                M_ONE,
                1,
                blob=self.blob(quoted),
                pair=epair,
                reason=reason,
                label=label,
                cause=self.causes("related"),
                ct_first=ctstate.RELATED | ctstate.REPLY,
            )
            self._meta(f)["icmp_error"] = "port unreachable"
            return
        a = dns_response(qid, name, qtype, None if ans is None else ans.packed)
        self.msg(
            f, M_ONE, 1, blob=self.blob(a), reason=reason, label=label, cause=1, ct_first=ctstate.ESTABLISHED
        )

    def _icmp_flow(self, cand):
        t, s, d, fam, proto, port, dec = cand
        sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
        ident = self.sport((t.name, sa.version, int(sa), int(da), proto), 1, 65535)
        f = self.new_flow(
            t, s, d, fam, proto, ident, 0, "icmp", icmp=True, meta={"verdict": "allow", "reason": dec.reason}
        )
        reason, label = self.reasons(dec.reason), self.labels("icmp")
        b = self.blob(PING_PAYLOAD, share=True)
        for k in range(1, 1 + self.R.int(1, 5)):
            self.msg(
                f,
                M_ONE,
                0,
                blob=b,
                icmp_seq=k,
                reason=reason,
                label=label,
                cause=0 if k == 1 else 1,
                ct_first=ctstate.NEW if k == 1 else ctstate.ESTABLISHED,
            )
            self.msg(
                f,
                M_ONE,
                1,
                blob=b,
                icmp_seq=k,
                reason=reason,
                label=label,
                cause=1,
                ct_first=ctstate.ESTABLISHED,
            )

    def _denied_flow(self, cand):
        t, s, d, fam, proto, port, dec = cand
        sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
        if proto == TCP:
            kind = "tls" if port == 443 else "tcp"
        elif proto == UDP:
            kind = "dns" if port == 53 else "udp"
        else:
            kind = "icmp"
        label = self.labels(kind)
        reason, cause = self.reasons(dec.reason), self.causes(dec.cause)
        tries = 1 if self.deny == REJECT else self.R.int(1, 4)
        if proto in (TCP, UDP):
            sp = self.sport((t.name, sa.version, int(sa), int(da), proto, port))
            f = self.new_flow(
                t,
                s,
                d,
                fam,
                proto,
                sp,
                port,
                kind,
                meta={"verdict": VERDICT_NAMES[self.deny], "reason": dec.reason},
            )
            for _ in range(tries):
                if proto == TCP:
                    self.msg(
                        f,
                        M_ONE,
                        0,
                        flags=SYN,
                        counts=False,
                        verdict=self.deny,
                        reason=reason,
                        label=label,
                        cause=cause,
                    )
                else:
                    q = (
                        dns_query(self.R.int(0, 65536), f"{d.name}.{t.name}.internal", 1)
                        if port == 53
                        else self.rng.bytes(self.R.int(20, 200))
                    )
                    self.msg(
                        f,
                        M_ONE,
                        0,
                        blob=self.blob(q),
                        verdict=self.deny,
                        reason=reason,
                        label=label,
                        cause=cause,
                    )
        else:
            ident = self.sport((t.name, sa.version, int(sa), int(da), proto), 1, 65535)
            f = self.new_flow(
                t,
                s,
                d,
                fam,
                proto,
                ident,
                0,
                "icmp",
                icmp=True,
                meta={"verdict": VERDICT_NAMES[self.deny], "reason": dec.reason},
            )
            b = self.blob(PING_PAYLOAD, share=True)
            for k in range(1, tries + 1):
                self.msg(
                    f,
                    M_ONE,
                    0,
                    blob=b,
                    icmp_seq=k,
                    verdict=self.deny,
                    reason=reason,
                    label=label,
                    cause=cause,
                )

    # -- attacks -----------------------------------------------------------------------------------
    def port_scan(self, budget: int):
        """SYN probes over ports 1..1024 (then higher) from a workload to another; a probe
        the policy allows gets the target's SYN/ACK and the scanner's RST (half-open scan)."""
        label = self.labels("port scan")
        pairs: dict[tuple[str, str, str], tuple] = {}
        for t, s, d, _fam, _proto, _port, _dec in self.tcp_pairs:
            pairs.setdefault((t.name, s.name, d.name), (t, s, d))
        keys = sorted(pairs)
        if not keys:
            raise InputError("port scan: no pair of workloads on different hosts")
        while budget > 0:
            t, s, d = pairs[keys[self.R.int(len(keys))]]
            sa, da = address_of(s, 4), address_of(d, 4)
            ports = np.concatenate(
                [
                    self.rng.permutation(np.arange(1, 1025)),
                    self.rng.permutation(np.arange(1025, 65536))[:4096],
                ]
            )
            for port in ports[: min(len(ports), budget + 64)]:
                if budget <= 0:
                    break
                port = int(port)
                dec = self.intent.decide(s, sa, d, da, Flow5(4, TCP, port))
                if dec.allow and budget < 3:
                    continue
                sp = self.sport((t.name, sa.version, int(sa), int(da), TCP, port))
                f = self.new_flow(
                    t,
                    s,
                    d,
                    4,
                    TCP,
                    sp,
                    port,
                    "port scan",
                    meta={
                        "verdict": "allow" if dec.allow else VERDICT_NAMES[self.deny],
                        "reason": dec.reason,
                    },
                )
                reason = self.reasons(dec.reason)
                if dec.allow:
                    self.msg(f, M_ONE, 0, flags=SYN, reason=reason, label=label, cause=0)
                    self.msg(
                        f,
                        M_ONE,
                        1,
                        flags=SYN | ACK,
                        reason=reason,
                        label=label,
                        cause=1,
                        ct_first=ctstate.ESTABLISHED,
                    )
                    self.msg(
                        f,
                        M_ONE,
                        0,
                        flags=RST,
                        reason=reason,
                        label=label,
                        cause=1,
                        ct_first=ctstate.ESTABLISHED,
                    )
                    budget -= 3
                else:
                    self.msg(
                        f,
                        M_ONE,
                        0,
                        flags=SYN,
                        counts=False,
                        verdict=self.deny,
                        reason=reason,
                        label=label,
                        cause=self.causes(dec.cause),
                    )
                    budget -= 1

    def spoofing(self, budget: int):
        """Packets in tenant A's VNI from A's workload with another tenant's source address
        (anti-spoofing drop), and, where A's egress rules refuse it, to another tenant's address."""
        label = self.labels("cross-tenant")
        all_addrs: dict[Any, set[str]] = {}
        for w in self.p.workloads:
            for a in w.addresses:
                all_addrs.setdefault(a, set()).add(w.tenant)
        foreign = {}
        for t in self.tenants:
            own = {a for w in self.p.workloads if w.tenant == t.name for a in w.addresses}
            foreign[t.name] = sorted(
                (a for a, ts in all_addrs.items() if a not in own and a.version == 4), key=int
            )
        tenants = [t for t in self.tenants if foreign[t.name]]
        if not tenants:
            raise InputError(
                "cross-tenant spoofing needs another tenant with addresses this tenant does not use"
            )
        anti = getattr(self.p, "anti_spoofing", True)
        r_src = self.reasons("cross-tenant: source address of another tenant")
        r_dst = self.reasons("cross-tenant: destination not in the tenant (default deny (egress))")
        misses = 0
        while budget > 0:
            misses += 1
            if misses > 1000:
                raise InputError("cross-tenant spoofing: no packet the policy would refuse")
            t = tenants[self.R.int(len(tenants))]
            ws = self.by_tenant[t.name]
            s = ws[self.R.int(len(ws))]
            d = ws[self.R.int(len(ws))]
            fa = foreign[t.name][self.R.int(len(foreign[t.name]))]
            sa = address_of(s, 4)
            if sa is None:
                continue
            port = (443, 80, 22, 5432, 3306)[self.R.int(5)]
            if anti and self.R.random() < 0.6:
                da = address_of(d, 4)
                if d is s or d.host == s.host or da is None:
                    continue
                sp = self.sport((t.name, fa.version, int(fa), int(da), TCP, port))
                f = self.new_flow(
                    t,
                    s,
                    d,
                    4,
                    TCP,
                    sp,
                    port,
                    "cross-tenant",
                    sa=fa,
                    meta={"verdict": "drop", "reason": self.reasons.list[r_src]},
                )
                self.msg(
                    f,
                    M_ONE,
                    0,
                    flags=SYN,
                    counts=False,
                    verdict=DROP,
                    ct_first=0,
                    reason=r_src,
                    label=label,
                    cause=self.causes("spoofed_source"),
                )
            else:
                dec = self.intent.decide(s, sa, None, fa, Flow5(4, TCP, port))
                if dec.allow:
                    continue
                sp = self.sport((t.name, sa.version, int(sa), int(fa), TCP, port))
                # the frame goes to the host of a workload of A (no tenant-A host has fa)
                f = self.new_flow(
                    t,
                    s,
                    d,
                    4,
                    TCP,
                    sp,
                    port,
                    "cross-tenant",
                    da=fa,
                    meta={"verdict": VERDICT_NAMES[self.deny], "reason": self.reasons.list[r_dst]},
                )
                self._meta(f)["dst_is_workload"] = False
                self.msg(
                    f,
                    M_ONE,
                    0,
                    flags=SYN,
                    counts=False,
                    verdict=self.deny,
                    reason=r_dst,
                    label=label,
                    cause=self.causes("egress_denied"),
                )
            budget -= 1
            misses = 0

    def allowed_tcp(self):
        return (
            self.cand.get((True, "tcp", 4), [])
            + self.cand.get((True, "tls", 4), [])
            + self.cand.get((True, "tcp", 6), [])
            + self.cand.get((True, "tls", 6), [])
        )

    def invalid_tcp(self, budget: int):
        """Bad flag combinations on fresh tuples, and out-of-window segments inside allowed
        conversations (half each, where there are conversations to put them in)."""
        label = self.labels("invalid tcp")
        r_flags = self.reasons("invalid tcp (bad flags)")
        r_oow = self.reasons("invalid tcp (out of window)")
        cause = self.causes("ct_invalid")
        convs = [f for f, m in enumerate(self.flow_msgs) if m and m[0][0] == M_HS and m[-1][0] == M_CLOSE]
        n_oow = budget // 2 if convs else 0
        for _ in range(n_oow):
            f = convs[self.R.int(len(convs))]
            msgs = self.flow_msgs[f]
            at = self.R.int(1, len(msgs))  # after the handshake, before FIN
            msgs.insert(
                at,
                (
                    M_ONE,
                    0,
                    self.R.int(10, 200),
                    PSH | ACK,
                    0,
                    0,
                    FILL_POOL,
                    OOW_DELTA,
                    False,
                    0,
                    DROP,
                    ctstate.INVALID,
                    ctstate.INVALID,
                    r_oow,
                    label,
                    cause,
                    -1,
                ),
            )
            m = self._meta(f)
            m["out_of_window"] = m.get("out_of_window", 0) + 1
        tcp = self.allowed_tcp()
        if not tcp:
            raise InputError("invalid tcp: the policy allows no TCP connection to aim at")
        for k in range(budget - n_oow):
            t, s, d, fam, proto, port, dec = tcp[self.R.int(len(tcp))]
            sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
            sp = self.sport((t.name, sa.version, int(sa), int(da), TCP, port))
            f = self.new_flow(
                t,
                s,
                d,
                fam,
                TCP,
                sp,
                port,
                "invalid tcp",
                meta={"verdict": "drop", "reason": "invalid tcp (bad flags)"},
            )
            flags = BAD_FLAGS[k % len(BAD_FLAGS)]
            self.msg(
                f,
                M_ONE,
                0,
                flags=flags,
                counts=False,
                verdict=DROP,
                ct_first=ctstate.INVALID,
                reason=r_flags,
                label=label,
                cause=cause,
            )

    def syn_flood(self, budget: int):
        """SYNs from one workload to a service the policy lets it reach, each from a new
        source port, none completed."""
        label = self.labels("syn flood")
        tcp = self.allowed_tcp() or self.tcp_pairs
        while budget > 0:
            t, s, d, fam, proto, port, dec = tcp[self.R.int(len(tcp))]
            sa, da = self.addr[(s.tenant, s.name, fam)], self.addr[(d.tenant, d.name, fam)]
            reason = self.reasons(dec.reason)
            v = ALLOW if dec.allow else self.deny
            cause = 0 if dec.allow else self.causes(dec.cause)
            n = min(budget, 20000)
            for _ in range(n):
                sp = self.sport((t.name, sa.version, int(sa), int(da), TCP, port))
                f = self.new_flow(
                    t,
                    s,
                    d,
                    fam,
                    TCP,
                    sp,
                    port,
                    "syn flood",
                    meta={"verdict": VERDICT_NAMES[v], "reason": dec.reason},
                )
                self.msg(
                    f,
                    M_ONE,
                    0,
                    flags=SYN,
                    counts=dec.allow,
                    verdict=v,
                    reason=reason,
                    label=label,
                    cause=cause,
                )
            budget -= n


# ---------------------------------------------------------------------------------------------
# Expansion of messages into packets (NumPy over all packets)
# ---------------------------------------------------------------------------------------------
def _grouped_excl_cumsum(x, group_start_of_row):
    c = np.cumsum(x)
    excl = c - x
    return excl - excl[group_start_of_row]


def _expand(planner: _Planner, cfg: ScenarioConfig):
    rng = planner.rng
    flows = planner.flow_msgs
    nf = len(flows)
    counts = np.fromiter((len(m) for m in flows), np.int64, nf)
    rows = [m for msgs in flows for m in msgs]
    M = len(rows)
    cols = list(zip(*rows)) if rows else [()] * 17
    m_kind = np.array(cols[0], np.int64)
    m_dir = np.array(cols[1], np.int64)
    m_len = np.array(cols[2], np.int64)
    m_flags = np.array(cols[3], np.int64)
    m_blob = np.array(cols[4], np.int64)
    m_blob_len = np.array(cols[5], np.int64)
    m_fill = np.array(cols[6], np.uint8)
    m_delta = np.array(cols[7], np.int64)
    m_counts = np.array(cols[8], bool)
    m_icmp = np.array(cols[9], np.int64)
    m_verdict = np.array(cols[10], np.uint8)
    m_ct0 = np.array(cols[11], np.uint8)
    m_ct1 = np.array(cols[12], np.uint8)
    m_reason = np.array(cols[13], np.uint16)
    m_label = np.array(cols[14], np.uint8)
    m_cause = np.array(cols[15], np.uint8)
    m_pool = rng.integers(0, POOL_SIZE, M, dtype=np.int64)
    m_flow = np.repeat(np.arange(nf), counts)
    f_pair = np.array(planner.flow_pair, np.int64)
    m_pair = np.array(cols[16], np.int64)
    m_pair = np.where(m_pair >= 0, m_pair, f_pair[m_flow]) if M else m_pair

    fam = np.fromiter((planner.F[k][0] for k in planner.flow_pair), np.int64, nf)
    proto = np.fromiter((planner.F[k][1] for k in planner.flow_pair), np.int64, nf)
    ipid_base = np.array([planner.F[k][18:20] for k in planner.flow_pair], np.int64).reshape(nf, 2)
    mtu = INNER_MTU_PLAIN if cfg.tunnel == "none" else INNER_MTU_TUNNEL
    mss_f = np.where(fam == 4, mtu - 40, mtu - 60)
    mss = mss_f[m_flow]
    nseg = np.where(m_kind == M_DATA, (m_len + mss - 1) // mss, 0)
    npk = np.select([m_kind == M_HS, m_kind == M_DATA, m_kind == M_CLOSE], [3, nseg + (nseg + 1) // 2, 4], 1)
    N = int(npk.sum())
    m_start = np.zeros(M, np.int64)
    if M:
        np.cumsum(npk[:-1], out=m_start[1:])
    p_msg = np.repeat(np.arange(M), npk)
    pos = np.arange(N) - m_start[p_msg]
    kind = m_kind[p_msg]
    d = m_dir[p_msg]
    # DATA: groups of (segment, segment, ACK); a last group of one segment is (segment, ACK)
    g, r = pos // 3, pos % 3
    ns = nseg[p_msg]
    seg = 2 * g + r
    is_ack = (r == 2) | ((ns % 2 == 1) & (g == ns // 2) & (r == 1))
    ml = m_len[p_msg]
    ms = mss[p_msg]
    seg_len = np.where(seg == ns - 1, ml - (ns - 1) * ms, ms)
    data = kind == M_DATA
    p_dir = np.where(data & is_ack, 1 - d, d)
    p_len = np.where(data & ~is_ack, seg_len, 0)
    p_stream = np.where(data & ~is_ack, seg * ms, 0)
    p_flags = np.where(data, np.where(is_ack, ACK, ACK | np.where(seg == ns - 1, PSH, 0)), 0)
    hs = kind == M_HS
    p_dir = np.where(hs, np.array([0, 1, 0])[np.minimum(pos, 2)], p_dir)
    p_flags = np.where(hs, np.array([SYN, SYN | ACK, ACK])[np.minimum(pos, 2)], p_flags)
    cl = kind == M_CLOSE
    cpos = np.minimum(pos, 3)
    p_dir = np.where(cl, np.where(np.array([0, 1, 1, 0])[cpos] == 0, d, 1 - d), p_dir)
    p_flags = np.where(cl, np.array([FIN | ACK, ACK, FIN | ACK, ACK])[cpos], p_flags)
    one = kind == M_ONE
    p_len = np.where(one, m_len[p_msg], p_len)
    p_flags = np.where(one, m_flags[p_msg], p_flags)
    p_flow = m_flow[p_msg]
    p_proto = proto[p_flow]
    is_tcp = p_proto == TCP

    # sequence numbers: cumulative bytes (SYN and FIN count one) per flow and direction
    adv = np.where(is_tcp & m_counts[p_msg], p_len + ((p_flags & SYN) > 0) + ((p_flags & FIN) > 0), 0).astype(
        np.int64
    )
    f_first = np.zeros(nf, np.int64)
    fc = np.bincount(p_flow, minlength=nf)
    if nf:
        np.cumsum(fc[:-1], out=f_first[1:])
    start_row = f_first[p_flow]
    sent0 = _grouped_excl_cumsum(np.where(p_dir == 0, adv, 0), start_row)
    sent1 = _grouped_excl_cumsum(np.where(p_dir == 1, adv, 0), start_row)
    isn = rng.integers(0, 1 << 32, size=(nf, 2), dtype=np.int64)
    own = np.where(p_dir == 0, sent0, sent1)
    other = np.where(p_dir == 0, sent1, sent0)
    p_seq = (isn[p_flow, p_dir] + own + m_delta[p_msg]) & 0xFFFFFFFF
    p_ack = np.where((p_flags & ACK) > 0, (isn[p_flow, 1 - p_dir] + other) & 0xFFFFFFFF, 0)
    p_seq = np.where(is_tcp, p_seq, m_icmp[p_msg])
    p_win = np.where((p_flags & RST) > 0, 0, WINDOW)
    # IP identification: a counter per flow and direction, from a random start
    cnt0 = _grouped_excl_cumsum((p_dir == 0).astype(np.int64), start_row)
    cnt1 = _grouped_excl_cumsum((p_dir == 1).astype(np.int64), start_row)
    p_ipid = (ipid_base[p_flow, p_dir] + np.where(p_dir == 0, cnt0, cnt1)) & 0xFFFF
    p_tmpl = 2 * m_pair[p_msg] + p_dir

    # ground truth per packet
    ct = np.where(pos == 0, m_ct0[p_msg], m_ct1[p_msg]).astype(np.uint8)
    ct = np.where((p_dir == 1) & ((ct & ctstate.ESTABLISHED) > 0), ct | ctstate.REPLY, ct).astype(np.uint8)
    cause = np.where(
        (m_verdict[p_msg] == ALLOW) & ((ct & ctstate.ESTABLISHED) > 0), 1, m_cause[p_msg]
    ).astype(np.uint8)

    # timestamps: flows start uniformly over the capture, packets of a flow are spaced by a
    # per-flow gap; the merged order is then re-stamped with Poisson arrivals at rate_pps
    duration = max(N / cfg.rate_pps, 1e-6)
    f_start = rng.random(nf) * duration
    f_gap = np.exp(rng.uniform(np.log(2e-6), np.log(2e-3), nf))
    k_in_flow = np.arange(N) - start_row
    nominal = f_start[p_flow] + k_in_flow * f_gap[p_flow]
    order = np.argsort(nominal, kind="stable")
    gaps = np.maximum(1, np.round(rng.exponential(1e9 / cfg.rate_pps, N))).astype(np.int64)
    ts = cfg.start_ns + np.cumsum(gaps) - gaps[0]

    P = dict(
        tmpl=p_tmpl,
        len=p_len,
        msg=p_msg,
        stream=p_stream,
        seq=p_seq,
        ack=p_ack,
        flags=p_flags,
        win=p_win,
        ipid=p_ipid,
    )
    P = {k: v[order] for k, v in P.items()}
    truth = dict(
        verdict=m_verdict[p_msg][order],
        ct=ct[order],
        reason=m_reason[p_msg][order],
        label=m_label[p_msg][order],
        cause=cause[order],
        flow=p_flow[order].astype(np.int32),
        dir=p_dir[order].astype(np.uint8),
    )
    P["oipid"] = rng.integers(0, 1 << 16, N, dtype=np.int64)
    msgs = dict(blob=m_blob, blob_len=m_blob_len, fill=m_fill, len=m_len, pool=m_pool)
    per_flow_pkts = np.bincount(p_flow, minlength=nf)
    return P, ts, truth, msgs, per_flow_pkts


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def generate(
    policy=None, config: ScenarioConfig | dict | None = None, *, assembler=None, **overrides
) -> Generated:
    """Generate a scenario's traffic and its ground truth.

    ``policy``: a loaded :class:`~microseg.policy.model.Policy`, a path, or None for the
    built-in data centre. ``config``: a :class:`ScenarioConfig` or a dict; keyword overrides
    (``flows=``, ``seed=``, ...) replace single settings. ``assembler``: the byte-writing pass
    (default the compiled :func:`_assemble`; tests pass :func:`assemble_ref`).
    """
    if policy is None or isinstance(policy, (str, os.PathLike)):
        policy = load_policy(None if policy is None else os.fspath(policy))
    if isinstance(config, dict) or config is None:
        config = ScenarioConfig.from_mapping({**(config or {}), **overrides})
    elif overrides:
        config = ScenarioConfig.from_mapping({**config.__dict__, **overrides})
    cfg = config
    pl = _Planner(policy, cfg)
    pl.benign()
    benign_pkts = _count_packets(pl, cfg)
    attack = cfg.scan_share + cfg.spoof_share + cfg.invalid_share + cfg.synflood_share
    total = benign_pkts / (1.0 - attack)
    for share, fn in (
        (cfg.invalid_share, pl.invalid_tcp),
        (cfg.scan_share, pl.port_scan),
        (cfg.spoof_share, pl.spoofing),
        (cfg.synflood_share, pl.syn_flood),
    ):
        n = int(round(share * total))
        if n:
            fn(n)
    P, ts, truth, msgs, per_flow = _expand(pl, cfg)
    cols = pl.template_columns()
    tdata, t_off, t_len, t_oip, t_oudp, t_iip, t_il4, t_ver, t_proto = _build_templates(cols, cfg.tunnel)
    n = P["tmpl"].shape[0]
    length = (t_len[P["tmpl"]] + P["len"]).astype(np.int32)
    offset = np.zeros(n, np.int64)
    if n:
        np.cumsum(length[:-1], out=offset[1:])
    out = np.zeros(int(length.sum()), np.uint8)
    blob = np.frombuffer(b"".join(pl.blobs), np.uint8) if pl.blobs else np.zeros(1, np.uint8)
    pool = np.random.default_rng(cfg.seed ^ 0x5EED).integers(0, 256, POOL_SIZE, dtype=np.uint8)
    (assembler or _assemble)(
        out,
        offset,
        P["tmpl"].astype(np.int64),
        P["len"].astype(np.int64),
        P["msg"].astype(np.int64),
        P["stream"].astype(np.int64),
        P["seq"].astype(np.int64),
        P["ack"].astype(np.int64),
        P["flags"].astype(np.uint8),
        P["win"].astype(np.int64),
        P["ipid"].astype(np.int64),
        P["oipid"],
        tdata,
        t_off,
        t_len,
        t_oip,
        t_oudp,
        t_iip,
        t_il4,
        t_ver,
        t_proto,
        msgs["blob"],
        msgs["blob_len"],
        msgs["fill"],
        msgs["len"],
        msgs["pool"],
        blob,
        pool,
    )
    port = cols["port"][P["tmpl"]].astype(np.uint16)
    batch = Batch(out, offset, length, length.copy(), port, ts.astype(np.int64), LINK_ETHERNET)
    vni = np.array([m[0].vni if not pl.untagged else -1 for m in pl.flow_meta], np.int32)
    gt = GroundTruth(
        truth["verdict"],
        truth["ct"],
        truth["reason"],
        truth["label"],
        truth["cause"],
        truth["flow"],
        truth["dir"],
        vni[truth["flow"]] if len(vni) else np.zeros(0, np.int32),
        pl.reasons.list,
        pl.labels.list,
        pl.causes.list,
    )
    meta = pl.flow_meta
    return Generated(batch, gt, lambda: _Planner.flows_table(meta, per_flow), cfg)


def _count_packets(pl: _Planner, cfg: ScenarioConfig) -> int:
    """Packets the messages planned so far expand into (without building them)."""
    mtu = INNER_MTU_PLAIN if cfg.tunnel == "none" else INNER_MTU_TUNNEL
    n = 0
    for f, msgs in enumerate(pl.flow_msgs):
        mss = mtu - (40 if pl.F[pl.flow_pair[f]][0] == 4 else 60)
        for m in msgs:
            k = m[0]
            if k == M_HS:
                n += 3
            elif k == M_CLOSE:
                n += 4
            elif k == M_ONE:
                n += 1
            else:
                s = -(-m[2] // mss)
                n += s + (s + 1) // 2
    return n


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a data centre's traffic with ground truth",
        description="Generate traffic (tenants, workloads, TLS/DNS/ICMP flows, "
        "attacks) from a policy and write a pcap with per-packet ground truth "
        "beside it (X.truth.jsonl, X.truth.npz, X.flows.jsonl).",
    )
    p.add_argument("-o", "--output", required=True, help="pcap file to write")
    p.add_argument("--policy", help="policy YAML (default: the built-in data centre)")
    p.add_argument("--scenario", help="scenario YAML (settings of ScenarioConfig)")
    p.add_argument("--flows", type=int, help="number of benign flows")
    p.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    p.add_argument("--tunnel", choices=("vxlan", "geneve", "nvgre", "none"))
    p.add_argument("--rate", type=float, dest="rate_pps", help="mean packet rate (packets/s)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    cfg = ScenarioConfig.from_file(args.scenario) if args.scenario else ScenarioConfig()
    over = {
        k: getattr(args, k) for k in ("flows", "seed", "tunnel", "rate_pps") if getattr(args, k) is not None
    }
    cfg = ScenarioConfig.from_mapping({**cfg.__dict__, **over})
    g = generate(args.policy, cfg)
    paths = g.write(args.output)
    s = g.truth.summary()
    print(f"{s['packets']} packets, {len(g.flows)} flows -> {paths['pcap']}")
    print("  labels:   " + ", ".join(f"{k} {v}" for k, v in s["by_label"].items()))
    print("  verdicts: " + ", ".join(f"{k} {v}" for k, v in s["by_verdict"].items()))
    print("  ct:       " + ", ".join(f"{k} {v}" for k, v in s["by_ct"].items()))
    print(f"  truth:    {paths['truth']} (+ .npz), flows: {paths['flows']}")
    return 0
