"""The agent's lower datapath: established flows offloaded into the kernel's XDP program.

The agent stays the authority. Every connection starts on the agent's path (AF_PACKET in,
the compiled datapath, AF_PACKET out); once a connection is established and its first
``after_packets`` packets have passed the agent (ITO's rule: inspect the first packets, then
offload), both of its directions that enter this host's ports are written into the program's
flow map (:mod:`microseg.bpf`), and from then on the kernel forwards them before any socket
sees them. What the program does not answer (SYN, FIN, RST, misses, anything odd) still comes
to the agent, so conntrack sees every connection start and end.

* **Limits** (the seeds' SmartNIC figures, both settings): at most ``capacity`` flows in the
  map (default 500,000) and ``insert_rate`` new flows a second (default 7,000, a token
  bucket); an offload refused by either is counted (``refused``), and the flow carries on in
  the agent and is offered again later. When several flows become eligible in the same batch,
  the encrypted ones (TLS/SSH ports) and the elephants (most bytes) go first.
* **Not offloaded**: connections whose way leaves in IPsec ESP (the program does not
  encrypt), a tunnel other than VXLAN, ICMP, endpoints that are no workload of the policy.
* **Conntrack stays true**: the entry of an offloaded connection is marked ``BE_LIBERAL``
  (as Linux's flowtable does), since its window is no longer followed packet by packet; the
  program's per-flow counters are read back (as Open vSwitch's revalidators read datapath
  flow statistics) into the entry's byte counts and timeout, so an offloaded connection
  neither expires in the agent nor loses its bytes.
* **Leaving the map**: on the connection's FIN or RST (seen by the agent), when it has been
  idle ``idle_s`` seconds in the map, on a policy swap, before the new policy is live,
  for every connection the new policy forbids, and when the inspection service blocks it
  (:meth:`withhold`; :meth:`offer_now` makes one the service is done with eligible early).
* **Fail closed**: stopping the agent detaches the program and removes its pins.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import ctstate as CS
from ..conntrack import const as CK
from ..packet.batch import addr_to_text
from ..policy import verdict as V
from .flows import group as flow_groups
from .flows import ident as flow_ident

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("microseg.agent")

MODES = ("auto", "xdp", "off")
ENCRYPTED_PORTS = (443, 22, 993, 995, 8443, 5671, 6514)
TCP_ESTABLISHED = CK.TCP_STATE_NAMES.index("ESTABLISHED")


@dataclasses.dataclass
class OffloadConfig:
    mode: str = "auto"  # auto: the XDP program where BPF allows it; xdp: it or fail; off
    after_packets: int = 8  # packets a connection passes through the agent before offload
    capacity: int = 500_000  # connections in the map at once
    insert_rate: float = 7000.0  # connections offloaded per second (token bucket)
    idle_s: float = 10.0  # a connection idle this long in the map leaves it
    read_interval_s: float = 0.5  # how often the counters are read back


@dataclasses.dataclass
class _Flow:
    keys: list  # (FlowKey, direction 0 original / 1 reply) of each direction installed
    entry: int  # its conntrack entry index
    ident: tuple  # (zone, proto, src_hi, src_lo, dst_hi, dst_lo, sport, dport), orig direction
    packets: int = 0  # read back so far (all directions)
    bytes: list = dataclasses.field(default_factory=lambda: [0, 0])  # orig, reply
    seen_ns: int = 0  # last time (monotonic coarse) a packet of it was counted


class KernelOffload:
    """Offload manager of one agent (see the module doc). ``kind`` is ``"xdp"`` when the
    program runs, ``"software"`` when the agent alone forwards (``reason`` says why)."""

    def __init__(self, agent: Agent, config: OffloadConfig | None = None):
        self.agent = agent
        self.cfg = config or OffloadConfig()
        if self.cfg.mode not in MODES:
            raise ValueError(f"offload mode must be one of {', '.join(MODES)}")
        self.kind = "software"
        self.reason = "off" if self.cfg.mode == "off" else ""
        self.fp: Any = None
        self.flows: dict[tuple, _Flow] = {}
        self._count: dict[tuple, int] = {}
        self._tokens = float(max(1.0, self.cfg.insert_rate))
        self._last_fill = time.monotonic()
        self._next_read = 0.0
        self.counters = {
            "offloaded": 0,
            "removed_end": 0,
            "removed_idle": 0,
            "removed_revoked": 0,
            "removed_blocked": 0,
            "removed_gone": 0,
            "refused_rate": 0,
            "refused_capacity": 0,
            "refused_esp": 0,
            "refused_unsupported": 0,
            "refused_error": 0,
        }
        # what the program carried for connections that have left the map
        self.carried = {"packets": 0, "bytes": 0}

    # -- start / stop ---------------------------------------------------------------------------
    def start(self, netns: str | None) -> None:
        """Load and attach the program to the agent's ports (in ``netns``), or say why not."""
        if self.cfg.mode == "off":
            return
        a = self.agent
        why = ""
        if a.tunnel != "vxlan":
            why = f"the kernel program speaks VXLAN only, not {a.tunnel}"
        if not why:
            from ..bpf import KernelFastPath

            ok, why = KernelFastPath.available()
        if why:
            self.reason = why
            if self.cfg.mode == "xdp":
                from .agent import AgentError

                raise AgentError(f"--offload xdp: {why}")
            log.info("kernel fast path not used: %s; the agent forwards everything", why)
            return
        from ..bpf import BpfError, KernelFastPath

        fp = KernelFastPath()
        ns_path = f"/run/netns/{netns}" if netns else None
        name = pin_name(a.host, netns)
        clear_stale_pins(name)
        try:
            fp.load(name=name)
            for p in a.wports:
                fp.add_workload_port(p.port.ifindex, p.vni, p.mac.to_bytes(6, "big"))
            fp.add_underlay_port(a.underlay.ifindex, a.address)
            # as BPF links this process holds: if it dies, the kernel detaches the program
            for p in a.wports:
                fp.attach(p.port.ifindex, p.port.ifname, netns=ns_path, link=True)
            fp.attach(a.underlay.ifindex, a.underlay.ifname, netns=ns_path, link=True)
        except BpfError as exc:
            fp.close()
            self.reason = str(exc)
            if self.cfg.mode == "xdp":
                from .agent import AgentError

                raise AgentError(f"--offload xdp: {exc}") from None
            log.warning("kernel fast path not used: %s; the agent forwards everything", exc)
            return
        self.fp = fp
        self.kind = "xdp"
        log.info(
            "kernel fast path (XDP) on %s; offload after %d packets, capacity %d, %g/s",
            ", ".join([p.port.ifname for p in a.wports] + [a.underlay.ifname]),
            self.cfg.after_packets,
            self.cfg.capacity,
            self.cfg.insert_rate,
        )

    def close(self) -> None:
        if self.fp is not None:
            try:
                self.fp.close()
            finally:
                self.fp = None
                self.flows.clear()

    # -- per batch --------------------------------------------------------------------------------
    def observe(self, batch, res) -> None:
        """After a batch the agent judged: connections that end leave the map; established
        ones are counted and offloaded once they reach ``after_packets``."""
        if self.fp is None:
            return
        k = res.keys
        n = len(batch)
        if k is None or n == 0:
            return
        proto = k.proto[:n]
        ct = res.ct[:n]
        tflags = k.tcp_flags[:n]
        ok = (res.verdict[:n] == V.ALLOW) & ((proto == 6) | (proto == 17))
        ending = ok & (proto == 6) & ((tflags & 0x05) != 0)  # FIN or RST
        est = ok & ((ct & CS.STATE_MASK) == CS.ESTABLISHED) & ~((proto == 6) & ((tflags & 0x07) != 0))
        if ending.any() and self.flows:
            for i in np.flatnonzero(ending).tolist():
                f = self.flows.get(flow_ident(k, ct, i))
                if f is not None:
                    self._remove(f, "removed_end")
        rows = np.flatnonzero(est)
        if rows.size == 0:
            return
        ready = []
        after = self.cfg.after_packets
        gr = flow_groups(k, rows)  # one dict probe per connection of the batch, not per packet
        for g in range(len(gr)):
            ident = gr.ident(g, k, ct)
            if ident in self.flows:
                continue
            had = self._count.get(ident, 0)
            m = int(gr.sizes[g])
            self._count[ident] = had + m
            if had + m >= after:
                # offered at the packet that reached after_packets (the first, past it)
                at = gr.members(g)[max(0, after - had - 1)]
                ready.append((int(rows[at]), ident))
        if ready:
            self._offload(batch, res, ready)
        if len(self._count) > 4 * self.cfg.capacity:
            self._count.clear()  # bounded: counts restart rather than grow without end

    def offer_now(self, ident: tuple) -> None:
        """Connection ``ident`` (original direction, as :func:`.flows.ident` keys it) is offered at
        its next established packet: the inspection service is done with it before
        ``after_packets``."""
        if self.fp is None or ident in self.flows:
            return
        c = self._count.get(ident, 0)
        if c >= 0:  # not one refused for good
            self._count[ident] = max(c, self.cfg.after_packets - 1)

    def withhold(self, ident: tuple) -> bool:
        """Connection ``ident`` is blocked: out of the map (``removed_blocked``) if it is
        there, and never offered again. True if it was in the map."""
        if self.fp is None:
            return False
        self._count[ident] = -(1 << 30)
        f = self.flows.get(ident)
        if f is None:
            return False
        self._remove(f, "removed_blocked")
        return True

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(
            float(max(1.0, self.cfg.insert_rate)),
            self._tokens + (now - self._last_fill) * self.cfg.insert_rate,
        )
        self._last_fill = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _offload(self, batch, res, ready: list) -> None:
        a = self.agent
        k = res.keys
        # encrypted first, then the elephants (bytes of the packet's connection so far)
        rows = np.array([i for i, _ in ready], np.int64)
        ent, _rep = a.dp.conntrack.lookup(batch.select(rows), _subset_keys(k, rows))
        ents = a.dp.conntrack.ents
        order = []
        for j, (i, ident) in enumerate(ready):
            e = int(ent[j])
            if e < 0 or (ident[1] == 6 and int(ents["tcp_state"][e]) != TCP_ESTABLISHED):
                continue  # gone, or closing: its end must be seen by conntrack
            enc = ident[6] in ENCRYPTED_PORTS or ident[7] in ENCRYPTED_PORTS
            order.append((not enc, -int(ents["bytes"][e].sum()), i, ident, e))
        order.sort()
        for _enc, _b, i, ident, e in order:
            if ident in self.flows:
                continue
            if len(self.flows) >= self.cfg.capacity:
                self.counters["refused_capacity"] += 1
                self._count[ident] = 0
                continue
            plan = self._plan(res, i, ident)
            if isinstance(plan, str):
                self.counters[f"refused_{plan}"] += 1
                self._count[ident] = -(1 << 30)  # not offloadable: do not offer again
                continue
            if not self._take_token():
                self.counters["refused_rate"] += 1
                self._count[ident] = 0  # offered again after another after_packets
                continue
            try:
                for key, action, _d in plan:
                    self.fp.install(key, action)
            except Exception as exc:  # noqa: BLE001 - a map refusal leaves the flow on our path
                for key, _a, _d in plan:
                    self.fp.remove(key)
                self.counters["refused_error"] += 1
                log.warning("offload refused by the kernel: %s", exc)
                continue
            # the window is no longer followed packet by packet (as Linux's flowtable does)
            ents["tcp_flags"][e, 0] |= CK.BE_LIBERAL
            ents["tcp_flags"][e, 1] |= CK.BE_LIBERAL
            self.flows[ident] = _Flow([(key, d) for key, _a, d in plan], e, ident, seen_ns=_coarse_ns())
            self._count.pop(ident, None)
            self.counters["offloaded"] += 1

    def _plan(self, res, i: int, ident: tuple):
        """The map entries for connection ``ident`` (packet ``i``): [(FlowKey, FlowAction)],
        or the refusal reason."""
        from ..bpf import FlowAction, FlowKey, vxlan_template

        a = self.agent
        zone, proto, s_hi, s_lo, d_hi, d_lo, sport, dport = ident
        src, dst = addr_to_text(s_hi, s_lo), addr_to_text(d_hi, d_lo)
        sw, dw = int(res.src_workload[i]), int(res.dst_workload[i])
        if res.ct[i] & CS.REPLY:
            sw, dw = dw, sw
        if sw < 0 or dw < 0:
            return "unsupported"
        ends = {}
        for role, w in (("s", sw), ("d", dw)):
            h = int(a._w_host[w])
            if h < 0:
                return "unsupported"
            if h != a._me and a._h_esp[h]:
                return "esp"
            wl = a.model.workloads[w]
            port = next((p for p in a.wports if p.index == w), None) if h == a._me else None
            if h == a._me and port is None:
                return "unsupported"
            ends[role] = (h, wl, port)
        out = []
        for direction, (x, xa, xp), (y, ya, yp) in (
            (0, ("s", src, sport), ("d", dst, dport)),
            (1, ("d", dst, dport), ("s", src, sport)),
        ):
            hx, wx, px = ends[x]
            hy, wy, py = ends[y]
            if hx == a._me:  # enters from x's workload port
                assert px is not None
                key = FlowKey(px.port.ifindex, zone, xa, ya, proto, xp, yp)
                if hy == a._me:
                    assert py is not None
                    action = FlowAction(
                        "local", ifindex=py.port.ifindex, mac=py.mac.to_bytes(6, "big"), mtu=py.port.mtu
                    )
                else:
                    peer = a._host_ip[a.model.hosts[hy].name]
                    mac = a.neighbours.get(peer)
                    if mac is None:
                        return "unsupported"
                    tmpl = vxlan_template(a.underlay.mac, mac, a.address, _ip4(peer), zone)
                    action = FlowAction(
                        "encap", ifindex=a.underlay.ifindex, template=tmpl, mtu=a.underlay.mtu
                    )
            elif hy == a._me:  # enters from the underlay, VXLAN from x's host
                assert py is not None
                key = FlowKey(zone, zone, xa, ya, proto, xp, yp, tunnel=True)
                action = FlowAction(
                    "decap",
                    ifindex=py.port.ifindex,
                    mac=py.mac.to_bytes(6, "big"),
                    peer_ip=_ip4(a._host_ip[a.model.hosts[hx].name]),
                    mtu=py.port.mtu,
                )
            else:
                continue  # neither end here: not ours to forward
            out.append((key, action, direction))
        return out or "unsupported"

    def _remove(self, f: _Flow, why: str) -> None:
        """Take both directions of ``f`` out of the map, its last counters into conntrack."""
        last = [(self.fp.remove(key), d) for key, d in f.keys]
        self._account(f, last)
        self.carried["packets"] += f.packets
        self.carried["bytes"] += f.bytes[0] + f.bytes[1]
        self.flows.pop(f.ident, None)
        self.counters[why] += 1

    # -- timers ------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Read the counters back into conntrack, and evict the idle (every
        ``read_interval_s``)."""
        if self.fp is None or not self.flows:
            return
        now = time.monotonic()
        if now < self._next_read:
            return
        self._next_read = now + self.cfg.read_interval_s
        stats = self.fp.read_flows()
        coarse = _coarse_ns()
        idle_ns = int(self.cfg.idle_s * 1e9)
        for f in list(self.flows.values()):
            if not self._alive(f):
                self._remove(f, "removed_gone")
                continue
            if f.ident[1] == 6 and int(self.agent.dp.conntrack.ents["tcp_state"][f.entry]) != TCP_ESTABLISHED:
                self._remove(f, "removed_end")  # closing (a FIN the agent saw, in any order)
                continue
            self._account(f, [(stats.get(key), d) for key, d in f.keys])
            if coarse - f.seen_ns > idle_ns:
                self._remove(f, "removed_idle")

    def _alive(self, f: _Flow) -> bool:
        """Is conntrack entry ``f.entry`` still this connection (not expired, deleted or
        reused)?"""
        t = self.agent.dp.conntrack
        e = t.ents[f.entry]
        zone, proto, s_hi, s_lo, d_hi, d_lo, sport, dport = f.ident
        return bool(
            e["status"] & CK.ST_USED
            and int(e["zone"]) == zone
            and int(e["proto"]) == proto
            and (int(e["src_hi"]), int(e["src_lo"]), int(e["dst_hi"]), int(e["dst_lo"]))
            == (s_hi, s_lo, d_hi, d_lo)
            and (int(e["sport"]), int(e["dport"])) == (sport, dport)
        )

    def _account(self, f: _Flow, per_key: list) -> None:
        """Move what the program carried since the last read (``per_key``: (FlowStats or
        None, direction) per installed key) into the conntrack entry: its bytes per direction,
        and its timeout from the last packet's time."""
        t = self.agent.dp.conntrack
        total_p = f.packets
        moved = list(f.bytes)
        last = f.seen_ns
        got = [st for st, _d in per_key if st is not None]
        if got:
            total_p = sum(st.packets for st in got)
        for st, direction in per_key:
            if st is None:
                continue
            moved[direction] = st.bytes
            if st.last_seen_ns > last:
                last = st.last_seen_ns
        new_bytes = [moved[0] - f.bytes[0], moved[1] - f.bytes[1]]
        if not self._alive(f):
            return
        e = f.entry
        for d in (0, 1):
            if new_bytes[d] > 0:
                t.ents["bytes"][e, d] += np.uint64(new_bytes[d])
        if last > f.seen_ns:
            t.ents["deadline"][e] += np.int64(last - f.seen_ns)
            f.seen_ns = last
        f.bytes = moved
        f.packets = total_p

    def before_swap(self, compiled) -> int:
        """Before ``compiled`` goes live: remove the connections it forbids from the map (so
        no packet is forwarded by the old decision once the new one rules)."""
        if self.fp is None or not self.flows:
            return 0
        from .agent import _forbidden

        table = self.agent.dp.conntrack
        flows = [f for f in self.flows.values() if self._alive(f)]
        gone = [f for f in self.flows.values() if not self._alive(f)]
        for f in gone:
            self._remove(f, "removed_gone")
        if not flows:
            return 0
        e = table.ents[np.array([f.entry for f in flows], np.int64)]
        bad = np.asarray(_forbidden(compiled, table, e), bool)
        for f, b in zip(flows, bad.tolist()):
            if b:
                self._remove(f, "removed_revoked")
        return int(bad.sum())

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The ``fastpath`` block of ``lab stats``: what the kernel carried without the agent."""
        live_p = sum(f.packets for f in self.flows.values())
        live_b = sum(f.bytes[0] + f.bytes[1] for f in self.flows.values())
        out: dict[str, Any] = {
            "kind": self.kind,
            "flows": len(self.flows),
            "packets": self.carried["packets"] + live_p,
            "bytes": self.carried["bytes"] + live_b,
            **self.counters,
            "capacity": self.cfg.capacity,
            "insert_rate": self.cfg.insert_rate,
            "after_packets": self.cfg.after_packets,
        }
        if self.kind != "xdp":
            out["reason"] = self.reason
        if self.fp is not None:
            try:
                out["program"] = self.fp.stats()
            except Exception as exc:  # noqa: BLE001 - reporting must not stop the agent
                out["program"] = {"error": str(exc)}
        return out


def _subset_keys(keys, rows):
    from ..datapath.slow import subset
    from ..packet.batch import FlowKeys

    return subset(keys, rows, FlowKeys(max(rows.size, 1)))


def _ip4(value: int) -> str:
    import ipaddress

    return str(ipaddress.IPv4Address(int(value)))


_CLOCK_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)  # Linux's number where Python lacks it


def _coarse_ns() -> int:
    """The program's clock (bpf_ktime_get_coarse_ns)."""
    return time.clock_gettime_ns(_CLOCK_COARSE)


def clear_stale_pins(name: str) -> None:
    """Remove what an agent of the same name left pinned when it died (its program is no
    longer attached anywhere: the links went with the process)."""
    import os

    from ..bpf.loader import DEFAULT_PIN_ROOT, remove_pin_dir

    d = os.path.join(DEFAULT_PIN_ROOT, name)
    if not os.path.isdir(d):
        return
    errors = remove_pin_dir(d)
    if errors:
        log.warning("pins %s left by an earlier agent not all removed: %s", d, "; ".join(errors))
    else:
        log.info("removed the pins %s left by an earlier agent", d)


def pin_name(host: str, netns: str | None) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"agent-{netns or 'host'}-{host}")
