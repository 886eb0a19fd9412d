"""Output: allowed frames re-encapsulated towards the destination workload's host, rejected
ones answered towards the sender, dropped ones nothing.

:class:`Forwarder` reads the parsed keys that travel with a :class:`~.datapath.BatchResult`
(``res.keys``), so no packet is parsed twice.
"""

from __future__ import annotations

import numpy as np

from ..packet import batch as B
from ..packet.batch import Batch
from ..packet.parse import parse
from ..policy.compiler import CompiledPolicy
from . import reasons as V


def reject_reply(packet: bytes, keys_row: dict) -> bytes | None:
    """The answer to a rejected packet, as an Ethernet frame towards its sender: a TCP RST
    (RFC 9293 §3.10.7.1: the reset takes its sequence number from the offending ACK) or an ICMP
    "administratively prohibited" unreachable (ICMPv6 type 1 code 1) quoting the packet. None
    for what must never be answered (a RST, an ICMP error, a non-first fragment)."""
    from ..packet import build as PB

    k = keys_row
    src = B.addr_to_text(k["src_hi"], k["src_lo"])
    dst = B.addr_to_text(k["dst_hi"], k["dst_lo"])
    l2 = k["l2_off"]
    mac_a, mac_b = k["eth_src"], k["eth_dst"]
    if k["flags"] & B.F_FRAG and k["frag_off"]:
        return None
    if k["proto"] == 6 and k["flags"] & B.F_PORTS:
        flags = k["tcp_flags"]
        if flags & 0x04:
            return None
        if flags & 0x10:
            seq, ack, fl = k["tcp_ack"], 0, "R"
        else:
            seglen = max(0, k["payload_len"]) + (1 if flags & 0x02 else 0) + (1 if flags & 0x01 else 0)
            seq, ack, fl = 0, (k["tcp_seq"] + seglen) & 0xFFFFFFFF, "RA"
        return PB.tcp_packet(
            dst, src, k["dport"], k["sport"], flags=fl, seq=seq, ack=ack, win=0, eth_src=mac_b, eth_dst=mac_a
        )
    if k["flags"] & B.F_ICMP_ERR:
        return None
    ip_pkt = packet[k["l3_off"] :] if k["l3_off"] >= 0 else b""
    if k["ip_ver"] == 4:
        if k["flags"] & B.F_ICMP and k["icmp_type"] not in (0, 8, 13, 14):
            return None
        ihl = (ip_pkt[0] & 0x0F) * 4 if ip_pkt else 20
        body = PB.icmp_error(3, 13, ip_pkt[: ihl + 8])
        l3 = PB.ipv4(dst, src, 1, body)
    elif k["ip_ver"] == 6:
        if k["flags"] & B.F_ICMP and k["icmp_type"] < 128:
            return None
        l3 = PB.ipv6(dst, src, 58, PB.icmpv6_error(1, 1, ip_pkt, src=dst, dst=src))
    else:
        return None
    return PB.ethernet(l3, src=mac_b, dst=mac_a) if l2 >= 0 else l3


def too_big_reply(frame: bytes, mtu: int) -> bytes | None:
    """The answer to an Ethernet ``frame`` whose IP packet does not fit a path of ``mtu``
    bytes: ICMP "fragmentation needed" (type 3 code 4, RFC 1191) with the next-hop MTU for an
    IPv4 packet with DF set, ICMPv6 "packet too big" (RFC 8201) for IPv6, from the packet's
    own destination address and MAC back to its sender. None where no answer is due: an IPv4
    packet without DF (RFC 1191 answers only DF packets), a non-first fragment, an ICMP error
    (RFC 1122 3.2.2, RFC 4443 2.4), a multicast destination, or a header too short to quote."""
    from ..packet import build as PB

    if len(frame) < 14:
        return None
    et = int.from_bytes(frame[12:14], "big")
    ip_pkt = frame[14:]
    if et == 0x0800 and len(ip_pkt) >= 20 and ip_pkt[0] >> 4 == 4:
        ihl = (ip_pkt[0] & 0x0F) * 4
        flags = int.from_bytes(ip_pkt[6:8], "big")
        if ihl < 20 or len(ip_pkt) < ihl + 8 or not flags & 0x4000 or flags & 0x1FFF:
            return None
        if ip_pkt[9] == 1 and ip_pkt[ihl] not in (0, 8, 13, 14):
            return None  # never answer an ICMP error
        if ip_pkt[16] >= 224:
            return None
        src, dst = ip_pkt[12:16], ip_pkt[16:20]
        body = PB.icmp_error(3, 4, ip_pkt[: ihl + 8], param=mtu)
        l3 = PB.ipv4(_ip_text(dst), _ip_text(src), 1, body)
    elif et == 0x86DD and len(ip_pkt) >= 48 and ip_pkt[0] >> 4 == 6:
        if ip_pkt[24] == 0xFF or ip_pkt[8:24] == bytes(16):
            return None  # multicast destination, or the unspecified source
        if ip_pkt[6] == 58 and ip_pkt[40] < 128:
            return None
        src, dst = ip_pkt[8:24], ip_pkt[24:40]
        s, d = _ip_text(dst), _ip_text(src)
        l3 = PB.ipv6(s, d, 58, PB.icmpv6_error(2, 0, ip_pkt, src=s, dst=d, param=max(mtu, 1280)))
    else:
        return None
    return PB.ethernet(l3, src=frame[0:6], dst=frame[6:12])


def _ip_text(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(bytes(raw)))


class Forwarder:
    """Builds the datapath's output frames for a processed batch.

    Allowed frames leave re-encapsulated (``tunnel``) towards the host of the destination
    workload, outer source the sender's host; frames to an address outside the tenant's
    workloads leave decapsulated (the overlay's exit). Rejected packets get
    :func:`reject_reply` sent back towards the sender's host. Dropped packets leave nothing.
    With an IPsec ``gateway``, its security policy database then decides per frame: protect
    (ESP tunnel mode towards the other site), bypass, or discard.
    """

    def __init__(
        self, policy: CompiledPolicy, tunnel: str = "vxlan", local_address: str | None = None, gateway=None
    ):
        model = policy.policy
        self.host_addr = [h.address for h in model.hosts]
        index = {h.name: i for i, h in enumerate(model.hosts)}
        self.w_host = np.array([index.get(w.host, -1) for w in model.workloads], np.int32)
        self.vni = {t.name: t.vni for t in model.tenants}
        self.tunnel = tunnel
        self.local = local_address or (self.host_addr[0] if self.host_addr else "192.0.2.1")
        self.gateway = gateway  # microseg.ipsec EspGateway: its SPD picks what leaves in ESP
        self.counters = {
            "forwarded": 0,
            "forwarded_plain": 0,
            "rejects_sent": 0,
            "esp_sent": 0,
            "ipsec_dropped": 0,
        }

    def _host(self, w: np.ndarray) -> np.ndarray:
        out = np.full(w.shape[0], -1, np.int32)
        ok = w >= 0
        out[ok] = self.w_host[w[ok]]
        return out

    def output(self, batch: Batch, res) -> Batch:
        """The frames that leave for ``batch`` and its results ``res`` (a
        :class:`~.datapath.BatchResult`, whose ``keys`` are the batch's parsed headers)."""
        from ..overlay import encap

        keys = (
            res.keys if getattr(res, "keys", None) is not None and res.keys.n == len(batch) else parse(batch)
        )
        allowed = np.flatnonzero(res.verdict == V.ALLOW)
        s_host = self._host(res.src_workload)
        d_host = self._host(res.dst_workload)
        out_parts = []
        inner_off = np.asarray(batch.offset) + np.maximum(keys.l2_off, 0)
        inner_len = np.asarray(batch.length) - np.maximum(keys.l2_off, 0)
        tenant = keys.tenant
        # tunnelled towards a workload's host, grouped by (outer source, outer destination)
        raw = batch.linktype != B.LINK_ETHERNET  # raw IP in, raw IP out (no overlay)
        tun = allowed[(d_host[allowed] >= 0) & (keys.l2_off[allowed] >= 0)] if not raw else allowed[:0]
        plain = np.setdiff1d(allowed, tun, assume_unique=True)
        if tun.size:
            # one encap call per sending host; the remote endpoint is per packet
            host_addr = np.array(self.host_addr + [""], dtype=object)
            for sh in np.unique(s_host[tun]).tolist():
                rows = tun[s_host[tun] == sh]
                inner = Batch(
                    batch.data,
                    inner_off[rows],
                    inner_len[rows].astype(np.int32),
                    inner_len[rows].astype(np.int32),
                    batch.port[rows],
                    batch.ts[rows],
                )
                src = self.host_addr[sh] if sh >= 0 else self.local
                out_parts.append(
                    encap(
                        inner,
                        self.tunnel,
                        np.maximum(tenant[rows], 0),
                        src,
                        list(host_addr[d_host[rows]]),
                        entropy=keys.flow_hash[rows].astype(np.int64),  # parsed once already
                    )
                )
            self.counters["forwarded"] += int(tun.size)
        if plain.size:
            rows = plain
            out_parts.append(
                Batch(
                    batch.data,
                    inner_off[rows],
                    inner_len[rows].astype(np.int32),
                    inner_len[rows].astype(np.int32),
                    batch.port[rows],
                    batch.ts[rows],
                    batch.linktype,
                )
            )
            self.counters["forwarded_plain"] += int(plain.size)
        rej = np.flatnonzero(res.verdict == V.REJECT)
        if rej.size:
            replies, r_ts, r_rows = [], [], []
            for i in rej.tolist():
                pkt = batch.packet(i)
                k = keys.row(i)
                frame = pkt[max(k["l2_off"], 0) :]
                k2 = dict(k)
                if k["l2_off"] > 0:
                    for f in ("l3_off", "l4_off", "payload_off"):
                        if k2[f] >= 0:
                            k2[f] -= k["l2_off"]
                    k2["l2_off"] = 0
                rep = reject_reply(frame, k2)
                if rep is None:
                    continue
                replies.append(rep)
                r_ts.append(int(batch.ts[i]))
                r_rows.append(i)
            if replies:
                rb = Batch.from_packets(replies, ts=r_ts, linktype=batch.linktype)
                rows = np.array(r_rows)
                back = s_host[rows]
                for h in np.unique(back).tolist():
                    sel = np.flatnonzero(back == h)
                    sub = rb if sel.size == len(rb) else rb.select(sel)
                    if h >= 0 and not raw:
                        out_parts.append(
                            encap(
                                sub,
                                self.tunnel,
                                np.maximum(tenant[rows[sel]], 0),
                                self.local,
                                self.host_addr[h],
                            )
                        )
                    else:
                        out_parts.append(sub)
                self.counters["rejects_sent"] += len(replies)
        out = _merge(out_parts)
        if self.gateway is not None and len(out):
            out, why = self.gateway.encrypt_batch(out, return_reasons=True)
            ok = why == 0
            self.counters["ipsec_dropped"] += int(np.count_nonzero(~ok))
            self.counters["esp_sent"] += int(np.count_nonzero(parse(out).proto == 50))
        return out


def _merge(parts) -> Batch:
    """One Ethernet batch from several, in timestamp order."""
    parts = [p for p in parts if len(p)]
    if len(parts) == 1 and parts[0].linktype == B.LINK_ETHERNET:
        ts = np.asarray(parts[0].ts)
        if ts.size < 2 or bool(np.all(ts[1:] >= ts[:-1])):
            return parts[0]  # one part already in order: no copy
    return Batch.concat(parts, order="ts")
