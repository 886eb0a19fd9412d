"""``microseg agent``: the enforcement point of one host of the policy, on live interfaces.

The agent owns the host's workload-facing ports (one interface per workload, e.g. the host end
of its veth or tap) and one underlay port, all AF_PACKET ports (:mod:`microseg.io.afpacket`).
Nothing is bridged or routed by the host's kernel between them, so when the agent is not
running nothing is forwarded (it fails closed).

* **From a workload port**: frames whose source MAC is not the port's workload are dropped
  (port binding, as Neutron's port security). ARP requests and IPv6 neighbour solicitations
  for an address of a workload of the port's tenant are answered by the agent with that
  workload's MAC (Neutron's ARP responder); no broadcast crosses the overlay. Every other
  frame is encapsulated in the tenant's VNI, so the datapath judges it in that tenant, and
  the allowed ones leave in the tenant's overlay towards the destination workload's host on
  the underlay, or are decapsulated and delivered when that workload is on this host.
* **From the underlay**: tunnel packets to this host's address from another host of the
  policy are judged (the tenant is their VNI) and delivered, decapsulated, to the port of the
  destination workload; nothing received from the underlay is sent back onto it. The agent
  answers ARP for its host's address there and resolves the other hosts' MACs itself.
* **Control**: a Unix socket (:mod:`microseg.agent.control`) serves ``status``, ``stats``
  and ``reload``; SIGHUP reloads the policy file, SIGTERM and SIGINT stop the agent. The
  same requests are served as a REST API (:mod:`microseg.agent.api`) beside ``--metrics``.
* **Store** (``--store URL``): the policy comes from etcd (:class:`~microseg.store.PolicyWatcher`);
  the watcher's thread compiles each relevant change, the loop swaps it between batches, the
  last good policy stays while etcd is unreachable or a change is invalid (fail static), and
  a status thread publishes the applied revision and health under a lease.
* **Restart**: a clean stop snapshots conntrack into ``--state-dir``; the next start restores
  it, so established connections carry on.

Everything runs in one thread: a ``poll`` over the ports, the control socket and a signal
wake-up socket, so a reload or a control request always falls between two batches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import resource
import select
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..conntrack.table import ConntrackTable
from ..datapath.datapath import forbidden_connections
from ..errors import InputError, MicrosegError
from ..io.afpacket import AfPacketPort, complete_l4_checksums, walk_blocks, walk_frames
from ..overlay import decap, encap
from ..packet import build as PB
from ..packet.batch import F_FRAG, Batch
from ..packet.parse import parse
from ..policy import verdict as V
from ..policy.compiler import compile_policy
from ..policy.model import load_policy
from ..policy.names import qualified, resolve_endpoints
from . import control
from .defrag import Reassembler
from .engine import REASONS, Datapath, DatapathConfig, Forwarder
from .kfast import KernelOffload, OffloadConfig
from .netns import InNetns

if TYPE_CHECKING:
    from ..store import PolicyWatcher
    from .flowlog import FlowLog
    from .metrics import MetricsServer

log = logging.getLogger("microseg.agent")

TUNNELS = ("vxlan", "geneve", "nvgre")
# what the overlay adds in front of a workload's IP packet on the underlay: the inner Ethernet
# header, the tunnel header, UDP (VXLAN, GENEVE) and the outer IPv4 header
TUNNEL_OVERHEAD = {"vxlan": 14 + 8 + 8 + 20, "geneve": 14 + 8 + 8 + 20, "nvgre": 14 + 8 + 20}
# ESP tunnel mode (AES-GCM) around an overlay packet of L bytes: outer IPv4, SPI and sequence
# number, the 8-byte IV, the payload and its trailer (pad length, next header) padded to 4
# bytes, the 16-byte ICV
ESP_FIXED = 20 + 8 + 8 + 16
ETH_ARP, ETH_IPV4, ETH_IPV6 = 0x0806, 0x0800, 0x86DD
BROADCAST = b"\xff" * 6
ARP_RETRY_S = 0.5  # while a peer host is unresolved
ARP_REFRESH_S = 30.0
STATUS_TTL_S = 10  # the lease of the agent's status key in the store
STATUS_REFRESH_S = 30.0  # the status key is rewritten at least this often
ARRIVAL_RETRY_S = 0.25  # a workload that moved here: how often its interface is looked for
HANDOFF_WAIT_S = 30  # how long a handoff is written for, or waited for

# what the agent itself drops or answers before the datapath (the datapath counts its own)
AGENT_REASONS = (
    "port_mac",
    "oversize",
    "too_big",
    "vlan_tagged",
    "arp_unanswered",
    "nd_unanswered",
    "no_route",
    "not_local",
    "underlay_unresolved",
    "underlay_other",
    "esp_required",
)


class AgentError(MicrosegError):
    pass


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _forbidden(compiled, table, e) -> np.ndarray:
    """Which conntrack entries ``e`` the policy ``compiled`` forbids (as a reload judges them)."""
    return forbidden_connections(compiled, table, e)


def _conn_hash(e, reverse: bool) -> np.ndarray:
    """A 64-bit hash of each entry's connection (zone, protocol, addresses, ports), of its
    reply direction with ``reverse``: the same connection picked up from either side."""
    a, b = ("dst", "src") if reverse else ("src", "dst")
    pa, pb = ("dport", "sport") if reverse else ("sport", "dport")
    cols = (
        e["zone"], e["proto"], e[f"{a}_hi"], e[f"{a}_lo"], e[f"{b}_hi"], e[f"{b}_lo"], e[pa], e[pb]
    )  # fmt: skip
    h = np.full(e.shape[0], 0xCBF29CE484222325, np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            h = (h ^ np.asarray(c, np.uint64)) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
    return h


def _mac48(data: np.ndarray, off: np.ndarray) -> np.ndarray:
    """The 48-bit MAC at ``data[off : off + 6]`` per row, as uint64."""
    idx = np.asarray(off, np.int64)[:, None] + np.arange(6)
    b = data[idx].astype(np.uint64)
    out = np.zeros(idx.shape[0], np.uint64)
    for k in range(6):
        out = (out << np.uint64(8)) | b[:, k]
    return out


def _bytes_at(data: np.ndarray, off: np.ndarray, length: np.ndarray, pos: int, width: int) -> np.ndarray:
    """Big-endian integer of ``width`` bytes at ``pos`` in each frame (0 where the frame is
    shorter)."""
    off = np.asarray(off, np.int64)
    ok = np.asarray(length) >= pos + width
    idx = np.where(ok, off + pos, 0)[:, None] + np.arange(width)
    idx = np.minimum(idx, data.shape[0] - 1)
    b = data[idx].astype(np.uint64)
    out = np.zeros(off.shape[0], np.uint64)
    for k in range(width):
        out = (out << np.uint64(8)) | b[:, k]
    out[~ok] = 0
    return out


def _view(batch: Batch, rows) -> Batch:
    """The frames ``rows`` of ``batch`` as a batch over the same buffer (no copy)."""
    return Batch(
        batch.data,
        batch.offset[rows],
        batch.length[rows],
        batch.wire_len[rows],
        batch.port[rows],
        batch.ts[rows],
        batch.linktype,
    )


@dataclasses.dataclass
class WorkloadPort:
    port: AfPacketPort
    index: int  # into policy.workloads
    name: str  # tenant/name
    tenant: str
    vni: int
    mac: int
    warned_oversize: bool = False


class Agent:
    """One host's enforcement point (see the module doc)."""

    def __init__(
        self,
        policy_path: str | None,
        host: str,
        ports: dict,
        underlay: str,
        *,
        tunnel: str = "vxlan",
        control_path: str | None = None,
        config: DatapathConfig | None = None,
        state_dir: str | None = None,
        store: str | None = None,
        store_prefix: str | None = None,
        netns: str | None = None,
        metrics: str | None = None,
        flow_log: str | None = None,
        flow_log_max_bytes: int = 64 << 20,
        flow_log_backups: int = 5,
        ipsec: str | None = None,
        offload: OffloadConfig | None = None,
        api_token_file: str | None = None,
        rx_ring: str = "auto",
        ids: str | None = None,
        ids_rules: str | None = None,
        ids_packets: int = 16,
    ):
        if tunnel not in TUNNELS:
            raise InputError(f"--tunnel must be one of {', '.join(TUNNELS)}")
        self.tunnel = tunnel
        self.host = host
        if (policy_path is None) == (store is None):
            raise InputError("give --policy FILE or --store URL (one of them)")
        self.policy_path = os.path.abspath(policy_path) if policy_path else None
        self.netns = netns
        self.control_path = control_path
        self.started = time.time()
        self.ready = False
        self._ctl: socket.socket | None = None
        self.reloads = 0
        self.reload_refused = 0
        self.watcher: PolicyWatcher | None = None
        self.store_url = store
        self.policy_revision = None  # the store revision of the running policy
        self._store_lock = threading.Lock()
        # (compiled, index, revision) compiled by the watcher thread
        self._pending: tuple[Any, Any, int] | None = None
        # (revision, error) of the last store policy refused
        self.store_refused: tuple[int, str] | None = None
        self._status_wake = threading.Event()
        self._status_stop = threading.Event()
        self._status_thread: threading.Thread | None = None
        self._wsock: socket.socket | None = None
        self.metrics_address = metrics
        self.metrics_server: MetricsServer | None = None
        self.flow_log_path = os.path.abspath(flow_log) if flow_log else None
        self.flowlog: FlowLog | None = None
        if metrics is not None:
            from .metrics import parse_address

            parse_address(metrics)  # refused before anything opens
        self.api_token: str | None = None
        if api_token_file is not None:
            from .api import load_token

            if metrics is None:
                raise InputError("--api-token-file: the REST API is served beside --metrics: give it")
            self.api_token = load_token(api_token_file)
        # REST API requests waiting for the loop: (request, done, reply box)
        self._api_lock = threading.Lock()
        self._api_queue: list[tuple[dict, threading.Event, dict]] = []
        if store is not None:
            from ..store import DEFAULT_PREFIX, PolicyWatcher

            self.store_prefix = store_prefix or DEFAULT_PREFIX
            self.watcher = PolicyWatcher(store, self.store_prefix, host=host)
            model, self.policy_revision = self.watcher.load()
        else:
            if self.policy_path is None:
                raise AgentError("give --policy FILE or --store URL")
            model = load_policy(self.policy_path)
        self._check_host(model)
        self.ipsec_path = os.path.abspath(ipsec) if ipsec else None
        self.gateway = None
        if ipsec:
            from ..ipsec.gateway import EspGateway
            from ..ipsec.sa import load_config

            self.gateway = EspGateway(load_config(ipsec))
        specs = self._resolve_ports(model, ports)
        compiled = compile_policy(model)
        cfg = config or DatapathConfig(tunnel=tunnel)
        cfg.tunnel = tunnel
        self._warm_up(compiled, cfg, specs)
        self.dp = Datapath(compiled, cfg)
        # workload moves (store mode): --port interfaces of workloads not (yet) on this host,
        # arrivals waiting for their interface, handoffs fetched by their threads
        self.standby: dict[str, str] = dict(self._standby)
        self._arriving: dict[str, int] = {}
        self._waiting: set[str] = set()
        self._next_open = 0.0
        self._handoff_lock = threading.Lock()
        self._handoff_in: list[tuple[str, dict, np.ndarray]] = []
        self._poller: Any = None
        self.moves = {
            "departed": 0,
            "arrived": 0,
            "handoff_written": 0,
            "handoff_write_failed": 0,
            "handoff_imported": 0,
            "handoff_entries": 0,
            "handoff_cut": 0,
            "handoff_refused": 0,
            "handoff_missing": 0,
        }
        self.handoffs: dict[str, str] = {}  # workload -> its last handoff's fate
        self.snapshot_path = None
        if state_dir:
            self.snapshot_path = os.path.join(os.path.abspath(state_dir), f"{_file_name(host)}.conntrack.npz")
        self.restored = self._restore_conntrack(compiled, cfg)
        self._set_policy(compiled)
        self.counters = {
            "packets": 0,
            "bytes": 0,
            "arp_replies": 0,
            "nd_replies": 0,
            "csum_completed": 0,
            "delivered": 0,
            "to_underlay": 0,
            "icmp_too_big": 0,
            "fragmented": 0,
            "esp_received": 0,
        }
        self.ipsec_counts = {"esp_sent": 0, "dropped_out": 0}
        self.drops = np.zeros(256, np.int64)  # datapath reasons of non-allowed
        self.agent_drops = dict.fromkeys(AGENT_REASONS, 0)
        self.defrag = Reassembler()
        self._ul: AfPacketPort | None = None  # the underlay port, open until close()
        self.wports: list[WorkloadPort] = []
        self._by_fd: dict[int, WorkloadPort | None] = {}
        self.observer = None
        if metrics is not None:
            from .metrics import BatchObserver

            self.observer = BatchObserver()
        if self.flow_log_path:
            from .flowlog import FlowLog

            try:
                self.flowlog = FlowLog(
                    self.flow_log_path, max_bytes=flow_log_max_bytes, backups=flow_log_backups
                )
            except OSError as exc:
                raise AgentError(f"--flow-log {flow_log}: {exc.strerror or exc}") from None
        self.rx_ring = _rx_ring(rx_ring, offload, tunnel)
        try:
            with InNetns(netns) if netns else contextlib.nullcontext():
                self._ul = AfPacketPort(underlay, 0, ring_version=self.rx_ring)
                self._offloads(self._ul)
                for i, (w_index, ifname) in enumerate(specs, start=1):
                    w = model.workloads[w_index]
                    p = AfPacketPort(ifname, i, ring_version=self.rx_ring)
                    self._offloads(p)
                    self.wports.append(
                        WorkloadPort(p, w_index, qualified(w), w.tenant, self._vni[w.tenant], int(w.mac))
                    )
        except OSError as exc:
            self.close()
            raise AgentError(f"cannot open port: {exc.strerror or exc}") from None
        self._set_paths()
        self.kfast = KernelOffload(self, offload)
        self.ids: Any = None
        self._ct_budget: int | None = None  # conntrack's expiry budget, run by _expire_logged
        self._next_expire = 0.0
        if ids is not None:
            self._ids_start(ids, ids_rules, ids_packets, state_dir, netns, model)
        try:
            self.kfast.start(netns)
        except MicrosegError:
            self.close()
            raise
        self._by_fd = {p.port.fileno(): p for p in self.wports}
        self._by_fd[self.underlay.fileno()] = None
        self._local = {(p.vni, p.mac): p for p in self.wports}
        self.neighbours: dict[int, bytes] = {}
        self._next_arp = 0.0
        self._last_full_arp = 0.0
        self._stop = False
        self._reload_requested = False

    # -- policy ---------------------------------------------------------------------------------
    def _check_host(self, model) -> None:
        hosts = {h.name: h for h in model.hosts}
        if self.host not in hosts:
            raise InputError(f"host {self.host!r} is not in the policy (hosts: {', '.join(hosts) or 'none'})")
        addr = ipaddress.ip_address(str(hosts[self.host].address))
        if addr.version != 4:
            raise InputError(f"host {self.host!r}: only IPv4 underlay addresses are supported yet")
        self.address = str(addr)

    def _resolve_ports(self, model, ports: dict) -> list:
        out = []
        self._standby: dict[str, str] = {}
        for text, ifname in ports.items():
            if (
                self.watcher is not None
                and text.count("/") in (1, 2)
                and not any(qualified(w) == text for w in model.workloads)
            ):
                # on the store, a workload of another tenant may move here later
                self._standby[text] = ifname
                continue
            found = resolve_endpoints(model, [text], what=("--port",))[0]
            if found is None or isinstance(found, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise InputError(f"--port: no workload {text!r} in the policy")
            idx = next(i for i, w in enumerate(model.workloads) if w is found)
            if found.host != self.host and self.watcher is not None:
                # on the store a workload may move here: its port opens when it does
                self._standby[qualified(found)] = ifname
                continue
            if found.host != self.host:
                raise InputError(
                    f"--port: workload {qualified(found)} is on host {found.host}, not {self.host}"
                )
            if found.mac is None:
                raise InputError(f"--port: workload {qualified(found)} has no MAC in the policy")
            out.append((idx, ifname))
        return out

    def _set_policy(self, compiled) -> None:
        model = compiled.policy
        self.compiled = compiled
        self.model = model
        self._vni = {t.name: int(t.vni) for t in model.tenants}
        # the gateway protects only what leaves on the underlay (see _route)
        self.fwd = Forwarder(compiled, self.tunnel, local_address=self.address)
        host_index = {h.name: i for i, h in enumerate(model.hosts)}
        self._me = host_index[self.host]
        self._w_host = np.array([host_index.get(w.host, -1) for w in model.workloads] + [-1], np.int32)
        # peers: every other host, by IPv4 address
        peers = [
            (int(ipaddress.IPv4Address(str(h.address))), h.name)
            for h in model.hosts
            if h.name != self.host and ipaddress.ip_address(str(h.address)).version == 4
        ]
        peers.sort()
        self._peer_ip = np.array([p[0] for p in peers], np.uint64)
        self._peer_name = [p[1] for p in peers]
        self._host_ip = {h.name: int(ipaddress.ip_address(str(h.address))) for h in model.hosts}
        self._own_ip = int(ipaddress.IPv4Address(self.address))
        # the host of each workload MAC per tenant (where a workload's frame will go)
        self._mac_host = {
            (self._vni[w.tenant], int(w.mac)): host_index.get(w.host or "", -1)
            for w in model.workloads
            if w.mac is not None
        }
        if getattr(self, "_ul", None) is not None:
            self._set_paths()
        # ARP / ND answers per tenant: address -> MAC of the workload that owns it
        self._arp: dict[tuple, int] = {}
        self._nd: dict[tuple, int] = {}
        for w in model.workloads:
            if w.mac is None:
                continue
            v = self._vni[w.tenant]
            for a in w.addresses:
                (self._arp if a.version == 4 else self._nd)[(v, int(a))] = int(w.mac)

    def _set_paths(self) -> None:
        """Per host of the policy: whether this host's overlay packets to it leave in ESP (the
        IPsec policies protect them) and the largest workload IP packet that fits the
        underlay's MTU on the way there (bigger ones are answered ICMP too-big). Index -1 (an
        unknown host) keeps the plain overlay's limit."""
        from ..ipsec.sa import ACTION_PROTECT

        mtu = self.underlay.mtu
        base = mtu - TUNNEL_OVERHEAD[self.tunnel]
        # ESP packet: ESP_FIXED + roundup4(L + 2) <= mtu for an overlay packet of L bytes
        esp_room = ((mtu - ESP_FIXED) // 4 * 4 - 2) - (TUNNEL_OVERHEAD[self.tunnel] - 14)
        proto = 47 if self.tunnel == "nvgre" else 17
        hosts = self.model.hosts
        self._h_room = np.full(len(hosts) + 1, base, np.int64)
        self._h_esp = np.zeros(len(hosts) + 1, bool)
        for i, h in enumerate(hosts):
            if h.name == self.host:
                self._h_room[i] = 1 << 30  # delivered here: no underlay on the way
            elif self.gateway is not None and ipaddress.ip_address(str(h.address)).version == 4:
                action, _sa = self.gateway.action_for(self.address, str(h.address), proto)
                if action == ACTION_PROTECT:
                    self._h_esp[i] = True
                    self._h_room[i] = esp_room - 14
        self._esp_peers = np.array(
            sorted(self._host_ip[h.name] for i, h in enumerate(hosts) if self._h_esp[i]), np.uint64
        )
        # per tenant: sorted workload MACs and their host
        by_vni: dict[int, list] = {}
        for (vni, mac), hi in self._mac_host.items():
            by_vni.setdefault(vni, []).append((mac, hi))
        self._macs = {}
        for vni, pairs in by_vni.items():
            pairs.sort()
            self._macs[vni] = (
                np.array([m for m, _ in pairs], np.uint64),
                np.array([h for _, h in pairs], np.int64),
            )

    def _dest_host(self, vni: int, dmac: np.ndarray) -> np.ndarray:
        """The host index of each destination MAC in tenant ``vni`` (-1: no workload's)."""
        macs, hosts = self._macs.get(vni, (np.zeros(0, np.uint64), np.zeros(0, np.int64)))
        if macs.size == 0:
            return np.full(dmac.shape[0], -1, np.int64)
        i = np.minimum(np.searchsorted(macs, dmac), macs.size - 1)
        return np.where(macs[i] == dmac, hosts[i], -1)

    def load(self, path: str):
        """Load, validate and compile ``path``; raise MicrosegError when it cannot replace the
        running policy (bad file, or this host's topology changed)."""
        return self.prepare(load_policy(path), path)

    def prepare(self, model, path: str):
        """Check that ``model`` keeps this host's topology and compile it: ``(compiled,
        {port name: workload index})``; MicrosegError when it cannot replace the running one."""
        hosts = {h.name: h for h in model.hosts}
        if self.host not in hosts or str(hosts[self.host].address) != self.address:
            raise InputError(f"{path}: host {self.host} missing or its address changed")
        moves = self.watcher is not None  # on the store, workloads may leave and arrive
        vnis = {t.name: t.vni for t in model.tenants}
        by_name: dict[str, list[int]] = {}
        for i, w in enumerate(model.workloads):
            by_name.setdefault(qualified(w), []).append(i)
        # port name -> workload index in the new policy; None: the workload left this host
        index: dict[str, int | None] = {}
        for p in self.wports:
            found = by_name.get(p.name, [])
            w = model.workloads[found[0]] if len(found) == 1 else None
            if moves and (w is None or w.host != self.host):
                index[p.name] = None  # moved away (or deleted): its port closes
                continue
            if w is None or w.host != self.host or w.mac is None or int(w.mac) != p.mac:
                raise InputError(f"{path}: workload {p.name} missing, moved or its MAC changed")
            if vnis.get(p.tenant) != p.vni:
                raise InputError(f"{path}: tenant {p.tenant} missing or its VNI changed")
            index[p.name] = found[0]
        if moves:
            open_names = {p.name for p in self.wports}
            for name in self.standby:
                found = by_name.get(name, [])
                if name in open_names or len(found) != 1:
                    continue
                w = model.workloads[found[0]]
                if w.host == self.host and w.mac is not None and w.tenant in vnis:
                    index[name] = found[0]  # arrives: its port opens
        # what did not change is taken from the running policy (bit-identical to a full
        # compile: tests/test_policy_compile_reuse.py), so a one-tenant change or an arriving
        # workload costs a fraction of a compile
        compiled = compile_policy(model, previous=getattr(self, "compiled", None))
        return compiled, index

    def reload(self, path: str | None = None) -> dict:
        if self.watcher is not None:
            where = self.store_url
            return {"ok": False, "error": f"this agent follows the store at {where}: change the policy there"}
        path = os.path.abspath(path) if path else self.policy_path
        if path is None:
            return {"ok": False, "error": "no policy file to reload"}
        try:
            compiled, index = self.load(path)
        except (MicrosegError, OSError, ValueError) as exc:
            self.reload_refused += 1
            log.error("reload refused, the running policy stays: %s", exc)
            return {"ok": False, "error": str(exc)}
        out = self._install(compiled, index)
        self.policy_path = path
        log.info(
            "policy reloaded from %s: version %s, %d connections cut", path, out["new_version"], out["cut"]
        )
        return {
            "ok": True,
            "version": out["new_version"],
            "cut": int(out["cut"]),
            "hash": compiled.content_hash,
        }

    def _install(self, compiled, index) -> dict:
        """Swap to ``compiled`` (between two batches); connections it forbids are cut, first
        from the kernel's flow map, then from conntrack as the new policy goes live."""
        old = self.model
        old_host = {qualified(w): w.host for w in old.workloads}
        moved = any(old_host.get(qualified(w), w.host) != w.host for w in compiled.policy.workloads)
        departing = [p for p in self.wports if index.get(p.name) is None]
        arriving = {
            n: i for n, i in index.items() if i is not None and n not in {p.name for p in self.wports}
        }
        if moved or departing or arriving:
            self._fastpath_moved(bool(departing or arriving))
        self.kfast.before_swap(compiled)
        # what leaves with each departing workload: its addresses, and where it went
        leaving = []
        for p in departing:
            w = old.workloads[p.index]
            new = [x for x in compiled.policy.workloads if qualified(x) == p.name]
            to_host = new[0].host if len(new) == 1 else None
            if to_host is None and self.watcher is not None:
                # its tenant may have left this host's view with it: the store knows where
                to_host = self.watcher.workload_host(p.name)
            addrs = [str(a) for a in w.addresses]
            # its connections, taken before the swap (which may cut them: its tenant may
            # leave this host's policy with it)
            ents = self.dp.conntrack.entries()
            mine = ents[self._workload_mask(ents, p.vni, addrs)]
            self.dp.conntrack.delete_where(lambda e, p=p, addrs=addrs: self._workload_mask(e, p.vni, addrs))
            leaving.append((p, mine, to_host if to_host != self.host else None))
        out = self.dp.swap_policy(compiled)
        self._set_policy(compiled)
        for p in self.wports:
            if index.get(p.name) is not None:
                p.index = index[p.name]
        for p, mine, to_host in leaving:
            self._depart(p, mine, to_host)
        self._arriving = arriving
        if arriving:
            self._next_open = 0.0
            self._open_arrivals()
        self.reloads += 1
        return out

    # -- workload moves (store mode) ------------------------------------------------------------
    def _fastpath_moved(self, ports_change: bool) -> None:
        """A workload moved: the kernel's flows may point at a port or host it left. All of
        them leave the map (offloaded again after a few packets); when this host's own ports
        change, the kernel program (attached to the ports it was started with) goes off."""
        k = self.kfast
        if k.fp is None:
            return
        for f in list(k.flows.values()):
            k._remove(f, "removed_revoked")
        if ports_change:
            k.close()
            k.kind = "software"
            k.reason = (
                "a workload moved to or from this host: the kernel fast path is off until the agent restarts"
            )
            log.info("kernel fast path off: %s", k.reason)

    def _workload_mask(self, e, vni: int, addrs: list[str]) -> np.ndarray:
        from ..packet.batch import text_to_addr

        m = np.zeros(e.shape[0], bool)
        for a in addrs:
            hi, lo = text_to_addr(a)
            for side in ("src", "dst"):
                m |= (e[f"{side}_hi"] == np.uint64(hi)) & (e[f"{side}_lo"] == np.uint64(lo))
        return m & (e["zone"].astype(np.int64) == vni)

    def _depart(self, p: WorkloadPort, mine: np.ndarray, to_host: str | None) -> None:
        """The workload of port ``p`` left this host: its port closes (nothing of it is
        forwarded here any more); its connections ``mine`` (out of the table already) are
        handed off, when it moved to another host, to that host through the store."""
        self.standby.setdefault(p.name, p.port.ifname)  # it may come back
        self._close_port(p)
        self.moves["departed"] += 1
        log.info(
            "workload %s left this host (now on %s): port %s closed, %d connections %s",
            p.name,
            to_host or "no host",
            p.port.ifname,
            mine.shape[0],
            "handed off" if to_host else "dropped",
        )
        if to_host and self.watcher is not None:
            self.handoffs[p.name] = f"writing for {to_host}"
            threading.Thread(
                target=self._write_handoff, args=(p.name, mine, to_host), name="handoff-out", daemon=True
            ).start()

    def _write_handoff(self, name: str, entries: np.ndarray, to_host: str) -> None:
        from ..store import StoreClient
        from ..store import handoff as H

        value = H.encode(entries, workload=name, from_host=self.host, to_host=to_host)
        client = StoreClient(str(self.store_url))
        end = time.monotonic() + HANDOFF_WAIT_S
        while True:
            try:
                H.write(client, self.store_prefix, name, value)
                self.moves["handoff_written"] += 1
                self.handoffs[name] = f"written for {to_host}"
                log.info("handoff of %s for %s: %d connections written", name, to_host, entries.shape[0])
                return
            except MicrosegError as exc:
                if time.monotonic() > end or self._status_stop.is_set():
                    self.moves["handoff_write_failed"] += 1
                    self.handoffs[name] = f"not written: {exc}"
                    log.error(
                        "handoff of %s not written (its connections restart at %s): %s", name, to_host, exc
                    )
                    return
                client.rotate()
                time.sleep(0.5)

    def _close_port(self, p: WorkloadPort) -> None:
        fd = p.port.fileno()
        if self._poller is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(fd)
        self._by_fd.pop(fd, None)
        self.wports = [x for x in self.wports if x is not p]
        self._local = {(x.vni, x.mac): x for x in self.wports}
        p.port.close()

    def _open_arrivals(self) -> None:
        """Open the ports of workloads that moved here, once their interfaces exist (retried
        every ``ARRIVAL_RETRY_S``); each one opened starts fetching its handoff."""
        now = time.monotonic()
        if now < self._next_open:
            return
        self._next_open = now + ARRIVAL_RETRY_S
        for name, w_index in list(self._arriving.items()):
            ifname = self.standby.get(name)
            if ifname is None:
                del self._arriving[name]
                continue
            w = self.model.workloads[w_index]
            number = max([p.port.port_id for p in self.wports] + [0]) + 1
            try:
                with InNetns(self.netns) if self.netns else contextlib.nullcontext():
                    port = AfPacketPort(ifname, number, ring_version=self.rx_ring)
            except OSError as exc:
                if name not in self._waiting:
                    self._waiting.add(name)
                    log.info(
                        "workload %s moved here: waiting for its interface %s (%s)",
                        name,
                        ifname,
                        exc.strerror or exc,
                    )
                continue
            self._waiting.discard(name)
            self._offloads(port)
            wp = WorkloadPort(port, w_index, name, w.tenant, self._vni[w.tenant], int(w.mac))
            self.wports.append(wp)
            self._by_fd[port.fileno()] = wp
            self._local = {(x.vni, x.mac): x for x in self.wports}
            if self._poller is not None:
                self._poller.register(port.fileno(), select.POLLIN | select.POLLERR)
            del self._arriving[name]
            self.moves["arrived"] += 1
            self.handoffs[name] = "waiting"
            log.info("workload %s moved here: enforcing on %s", name, ifname)
            if self.watcher is not None:
                threading.Thread(
                    target=self._fetch_handoff, args=(name,), name="handoff-in", daemon=True
                ).start()

    def _fetch_handoff(self, name: str) -> None:
        """Wait up to ``HANDOFF_WAIT_S`` for the workload's handoff, take it (read and delete)
        and hand it to the loop; a handoff that does not decode is refused, with why."""
        from ..store import StoreClient
        from ..store import handoff as H

        client = StoreClient(str(self.store_url))
        end = time.monotonic() + HANDOFF_WAIT_S
        while not self._status_stop.is_set():
            try:
                value = H.take(client, self.store_prefix, name)
            except MicrosegError as exc:
                log.debug("handoff of %s: %s", name, exc)
                client.rotate()
                value = None
            if value is not None:
                try:
                    meta, entries = H.decode(value, name)
                except InputError as exc:
                    self.moves["handoff_refused"] += 1
                    self.handoffs[name] = f"refused: {exc}"
                    log.error("handoff of %s refused (its connections restart here): %s", name, exc)
                    return
                with self._handoff_lock:
                    self._handoff_in.append((name, meta, entries))
                self._wake()
                return
            if time.monotonic() > end:
                self.moves["handoff_missing"] += 1
                self.handoffs[name] = "none"
                log.info("no handoff of %s within %d s: its connections restart here", name, HANDOFF_WAIT_S)
                return
            time.sleep(0.2)

    def _import_handoffs(self) -> None:
        """Merge the handed-off connections into the table (between two batches): only those
        of the workload in its tenant's zone, those the running policy forbids cut, each
        replacing an entry of the same connection picked up here in the meantime."""
        from ..conntrack import const as CK
        from ..conntrack import kernels as KN

        with self._handoff_lock:
            todo, self._handoff_in = self._handoff_in, []
        for name, meta, entries in todo:
            wp = next((p for p in self.wports if p.name == name), None)
            if wp is None:
                self.handoffs[name] = "dropped: the workload left again"
                continue
            w = self.model.workloads[wp.index]
            ents = entries[self._workload_mask(entries, wp.vni, [str(a) for a in w.addresses])]
            t = self.dp.conntrack
            now = time.time_ns()
            ents = ents[ents["deadline"] > now]  # expired on the way
            if ents.shape[0]:
                bad = np.asarray(_forbidden(self.compiled, t, ents), bool)
            else:
                bad = np.zeros(0, bool)
            cut = int(bad.sum())
            ents = ents[~bad]
            if ents.shape[0] and self.kfast.fp is not None:
                self._fastpath_moved(False)  # entry numbers change below
            if ents.shape[0]:
                cur = t.entries()
                taken = np.isin(
                    _conn_hash(cur, False), np.concatenate([_conn_hash(ents, False), _conn_hash(ents, True)])
                )
                keep = cur[~taken]
                room = t.capacity - keep.shape[0]
                ents = ents[:room]
                new = ConntrackTable(capacity=t.capacity, default_zone=t.default_zone)
                new.cfg[:] = t.cfg
                new.timeouts[:] = t.timeouts
                new.ctr[:] = t.ctr
                new.expire_budget = t.expire_budget
                new.last_now = t.last_now
                rows = np.concatenate([keep, ents])
                n = rows.shape[0]
                new.ents[:n] = rows
                new.ents["status"][:n] |= CK.ST_USED
                KN.rebuild_index(new.ents, new.slot_ent, new.slot_hash, new.free, new.params)
                self.dp.conntrack = new
            self.moves["handoff_imported"] += 1
            self.moves["handoff_entries"] += int(ents.shape[0])
            self.moves["handoff_cut"] += cut
            self.handoffs[name] = (
                f"imported from {meta.get('from')}: {int(ents.shape[0])} connections, {cut} cut"
            )
            log.info(
                "handoff of %s from %s imported: %d connections (%d the policy forbids cut)",
                name,
                meta.get("from"),
                ents.shape[0],
                cut,
            )

    # -- the store ------------------------------------------------------------------------------
    def _on_store_policy(self, model, revision: int) -> None:
        """The watcher thread: a new valid policy for this host. Check and compile it here,
        off the packet loop; the loop swaps it in between two batches."""
        try:
            compiled, index = self.prepare(model, f"store revision {revision}")
        except (MicrosegError, ValueError) as exc:
            with self._store_lock:
                self.store_refused = (revision, str(exc))
            log.error("store revision %d refused, revision %s stays: %s", revision, self.policy_revision, exc)
            self._status_wake.set()
            return
        with self._store_lock:
            self._pending = (compiled, index, revision)
        self._wake()

    def _on_store_state(self, _status: dict) -> None:
        self._status_wake.set()

    def _wake(self) -> None:
        w = self._wsock
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:
                pass

    def _swap_pending(self) -> None:
        with self._store_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        compiled, index, revision = pending
        out = self._install(compiled, index)
        self.policy_revision = revision
        with self._store_lock:
            if self.store_refused and self.store_refused[0] <= revision:
                self.store_refused = None
        log.info(
            "store revision %d installed: policy version %s, %d connections cut",
            revision,
            out["new_version"],
            out["cut"],
        )
        self._status_wake.set()

    def store_health(self) -> str:
        if self.watcher is None:
            return "file"
        with self._store_lock:
            refused = self.store_refused
        if refused is not None:
            return f"invalid: revision {refused[0]}: {refused[1]}"
        return self.watcher.health()

    def _status_loop(self) -> None:
        """Write this host's applied revision and health under a lease (``publish_status``):
        at once when either changes, else every ``STATUS_REFRESH_S``; the lease is kept alive
        in between. Failures (the store unreachable) are retried on the next turn."""
        from ..store import StoreClient, publish_status

        if self.store_url is None:
            return
        client = StoreClient(self.store_url)
        lease, last, next_full = 0, None, 0.0
        while not self._status_stop.is_set():
            now = time.monotonic()
            doc = (int(self.policy_revision or 0), self.store_health())
            try:
                if doc != last or now >= next_full or not lease:
                    lease = publish_status(
                        client,
                        self.host,
                        doc[0],
                        doc[1],
                        STATUS_TTL_S,
                        prefix=self.store_prefix,
                        lease=lease,
                        detail={"pid": os.getpid(), "policy_hash": self.compiled.content_hash},
                    )
                    last, next_full = doc, now + STATUS_REFRESH_S
                elif client.keepalive(lease) <= 0:
                    lease, last = 0, None
            except Exception as exc:  # noqa: BLE001 - the store may be gone; enforcing goes on
                log.debug("store status not written: %s", exc)
                last = None
                client.rotate()
            self._status_wake.wait(STATUS_TTL_S / 3)
            self._status_wake.clear()
        if lease:
            try:
                client.revoke(lease)
            except Exception:  # noqa: BLE001 - the key expires with its lease anyway
                pass

    def _start_store(self) -> None:
        if self.watcher is None:
            return
        self.watcher.start(self._on_store_policy, on_state=self._on_store_state)
        self._status_thread = threading.Thread(target=self._status_loop, name="store-status", daemon=True)
        self._status_thread.start()

    def _stop_store(self) -> None:
        if self.watcher is None:
            return
        self.watcher.stop(timeout=5.0)
        self._status_stop.set()
        self._status_wake.set()
        if self._status_thread is not None:
            self._status_thread.join(timeout=8.0)
            self._status_thread = None

    # -- conntrack across a restart -------------------------------------------------------------
    def _restore_conntrack(self, compiled, cfg) -> int:
        """Take over the connections of the snapshot a clean stop left (then remove it: a
        snapshot is used once), cutting those the policy now running forbids."""
        path = self.snapshot_path
        if not path or not os.path.exists(path):
            return 0
        try:
            table = ConntrackTable.restore(
                path,
                capacity=cfg.conntrack_capacity,
                timeouts=cfg.conntrack_timeouts,
                checksum=cfg.checksum,
            )
        except MicrosegError as exc:
            log.warning("conntrack snapshot %s not restored: %s", path, exc)
            table = None
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if table is None:
            return 0
        self.dp.conntrack = table
        cut = table.delete_where(lambda e: _forbidden(compiled, table, e))
        n = len(table)
        log.info("conntrack restored from %s: %d connections (%d the policy forbids cut)", path, n, cut)
        return n

    def save_conntrack(self) -> int | None:
        """Snapshot the conntrack table into the state directory (on a clean stop)."""
        if not self.snapshot_path:
            return None
        try:
            os.makedirs(os.path.dirname(self.snapshot_path), mode=0o700, exist_ok=True)
            n = self.dp.conntrack.snapshot(self.snapshot_path)
        except OSError as exc:
            log.error("conntrack snapshot %s failed: %s", self.snapshot_path, exc)
            return None
        log.info("conntrack: %d connections saved to %s", n, self.snapshot_path)
        return n

    # -- start-up -------------------------------------------------------------------------------
    def _offloads(self, port: AfPacketPort) -> None:
        bad = {k: v for k, v in port.disable_offloads().items() if v}
        if bad:
            log.warning(
                "%s: could not turn off %s (%s); super-frames larger than the MTU will be dropped",
                port.ifname,
                ", ".join(bad),
                "; ".join(set(bad.values())),
            )
        else:
            log.debug("%s: tso, gso and gro off", port.ifname)

    def _warm_up(self, compiled, cfg, specs) -> None:
        """Run one frame through every compiled stage on a throwaway datapath, so that the
        first live packet does not wait for kernels to load."""
        t0 = time.perf_counter()
        model = compiled.policy
        w = model.workloads[specs[0][0]] if specs else next((x for x in model.workloads if x.addresses), None)
        if w is None or not w.addresses:
            return
        a = str(w.addresses[0])
        frame = PB.tcp_packet(a, a, 40000, 80, b"x", eth_src=int(w.mac or 2), eth_dst=int(w.mac or 2))
        b = Batch.from_packets([frame])
        vni = int(next(t.vni for t in model.tenants if t.name == w.tenant))
        enc = encap(b, self.tunnel, vni, self.address, self.address)
        dp = Datapath(
            compiled,
            dataclasses.replace(
                cfg, conntrack_capacity=1024, emc_entries=1024, megaflow_entries=1024, offload_capacity=1024
            ),
        )
        res = dp.process(enc)
        Forwarder(compiled, self.tunnel, local_address=self.address).output(enc, res)
        decap(enc)
        complete_l4_checksums(enc, parse(enc), np.zeros(1, np.int64))
        if self.gateway is not None and self.gateway.sas:
            from ..ipsec.gateway import EspGateway, decrypt_inbound

            gw = EspGateway(self.gateway.config)
            decrypt_inbound(gw, gw.encrypt_batch(enc, sa=0))
        ring = np.zeros(4096, np.uint8)
        cols = [np.zeros(4, t) for t in (np.int64, np.int32, np.int32, np.int64, np.uint32, np.uint32)]
        walk_blocks(ring, np.zeros(1, np.int64), *cols)
        o, ln_, wl, ts, st, vl = cols
        walk_frames(ring, 0, 1, 1, 1, 4096, 4096, o, ln_, wl, ts, st, vl, np.zeros(4, np.int64))
        log.debug("kernels ready in %.1f s", time.perf_counter() - t0)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        self._wsock = wsock
        old_wakeup = signal.set_wakeup_fd(wsock.fileno())
        handlers = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        poller = select.poll()
        self._poller = poller
        for fd in self._by_fd:
            poller.register(fd, select.POLLIN | select.POLLERR)
        poller.register(rsock.fileno(), select.POLLIN)
        if self.ids is not None and self.ids.fileno() is not None:
            poller.register(self.ids.fileno(), select.POLLIN)  # frames back from Suricata
        if self.control_path:
            self._ctl = control.listen(self.control_path)
            poller.register(self._ctl.fileno(), select.POLLIN)
        self._start_store()
        self._start_metrics()
        self.ready = True
        log.info(
            "host %s (%s) enforcing on %s; underlay %s (%s)",
            self.host,
            self.address,
            ", ".join(f"{p.name}={p.port.ifname}" for p in self.wports) or "no workload ports",
            self.underlay.ifname,
            self.tunnel,
        )
        try:
            while not self._stop:
                self._arp_timer()
                events = poller.poll(200 if self.neighbours_complete() else 100)
                for fd, _ev in events:
                    if fd == rsock.fileno():
                        try:
                            while rsock.recv(512):
                                pass
                        except BlockingIOError:
                            pass
                    elif self._ctl is not None and fd == self._ctl.fileno():
                        self._serve_control()
                # read every port that has a block ready, whatever poll said
                self._service_ports()
                self.kfast.tick()
                if self.ids is not None:
                    self._ids_tick()
                if self.flowlog is not None:
                    self._expire_logged()
                if self.defrag.pending:
                    self.defrag.expire(time.monotonic())
                if self._pending is not None:
                    self._swap_pending()
                if self._api_queue:
                    self._serve_api()
                if self._arriving:
                    self._open_arrivals()
                if self._handoff_in:
                    self._import_handoffs()
                if self._reload_requested:
                    self._reload_requested = False
                    if self.watcher is None:
                        self.reload()
                    else:
                        log.info("SIGHUP ignored: the policy comes from the store")
        finally:
            self._stop_store()
            self._wsock = None
            self._serve_api(stopping=True)
            signal.set_wakeup_fd(old_wakeup)
            for s, h in handlers.items():
                signal.signal(s, h)
            rsock.close()
            wsock.close()
            log.info("stopping")

    def _start_metrics(self) -> None:
        """Serve the Prometheus collector (in the agent's own namespace: ``127.0.0.1`` is its
        loopback) on a thread; a scrape reads the counters as they stand."""
        if self.metrics_address is None or self.metrics_server is not None:
            return
        from .api import ApiApp
        from .metrics import DatapathCollector, MetricsServer, registry_for

        reg = registry_for(DatapathCollector(agent=self, observer=self.observer))
        try:
            self.metrics_server = MetricsServer(
                self.metrics_address, reg, wrap=lambda app: ApiApp(self.call, self.api_token, fallback=app)
            )
        except OSError as exc:
            raise AgentError(f"--metrics {self.metrics_address}: {exc.strerror or exc}") from None
        log.info("metrics on %s", self.metrics_server.url)

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop = True

    def stop(self) -> None:
        self._stop = True

    def _service_ports(self) -> None:
        for _ in range(64):  # bounded, so control and signals get a turn
            busy = False
            for p in self.wports:
                if p.port.ready():
                    busy = True
                    self._from_workload(p)
            if self.underlay.ready():
                busy = True
                self._from_underlay()
            if not busy:
                return

    # -- workload side --------------------------------------------------------------------------
    def _from_workload(self, wp: WorkloadPort) -> None:
        burst = wp.port.recv(max_blocks=4)
        if burst is None:
            return
        try:
            b = burst.batch
            n = len(b)
            if n == 0:
                return
            d, off, ln = b.data, b.offset, b.length
            src_ok = _mac48(d, off + 6) == np.uint64(wp.mac)
            et = _bytes_at(d, off, ln, 12, 2)
            vlan = burst.vlan_stripped | (et == 0x8100) | (et == 0x88A8)
            big = burst.oversize
            arp = et == ETH_ARP
            ns = (
                (et == ETH_IPV6)
                & (_bytes_at(d, off, ln, 20, 1) == 58)
                & (_bytes_at(d, off, ln, 54, 1) == 135)
                & (np.asarray(ln) >= 78)
            )
            self.agent_drops["port_mac"] += int(np.count_nonzero(~src_ok))
            self.agent_drops["oversize"] += int(np.count_nonzero(src_ok & big))
            if big.any() and not wp.warned_oversize:
                wp.warned_oversize = True
                log.warning(
                    "%s (%s): frames of up to %d bytes on a port of MTU %d are dropped: "
                    "segmentation offload (TSO/GSO) is on at the workload's side of the "
                    "link; turn it off there",
                    wp.name,
                    wp.port.ifname,
                    int(b.wire_len.max()),
                    wp.port.mtu,
                )
            self.agent_drops["vlan_tagged"] += int(np.count_nonzero(src_ok & ~big & vlan))
            ok = src_ok & ~big & ~vlan
            special = np.flatnonzero(ok & (arp | ns))
            if special.size:
                self._respond(wp, b, special, arp)
            rows = np.flatnonzero(ok & ~arp & ~ns)
            split = np.zeros(rows.size, bool)  # IPv4, DF clear: fragmented as a router would
            room = np.zeros(rows.size, np.int64)
            if rows.size:
                # a packet too big for the way to its destination's host is answered, not sent
                room = self._h_room[self._dest_host(wp.vni, _mac48(d, np.asarray(off)[rows]))]
                too_big = np.asarray(b.wire_len)[rows] - 14 > room
                if too_big.any():
                    r = rows[too_big]
                    df_clear = (
                        (et[r] == ETH_IPV4)
                        & ((_bytes_at(d, off[r], ln[r], 20, 1) & np.uint64(0x40)) == 0)
                        & ((_bytes_at(d, off[r], ln[r], 14, 1) >> np.uint64(4)) == 4)
                    )
                    split[np.flatnonzero(too_big)[df_clear]] = True
                    answer = too_big.copy()
                    answer[np.flatnonzero(too_big)[df_clear]] = False
                    if answer.any():
                        self._too_big(wp, b, rows[answer], room[answer])
                    keep = ~answer
                    rows, split, room = rows[keep], split[keep], room[keep]
            if rows.size:
                sub = _view(b, rows)
                self.counters["packets"] += rows.size
                self.counters["bytes"] += int(sub.wire_len.sum(dtype=np.int64))
                # (its outer header is a placeholder the Forwarder replaces: no entropy needed)
                enc = encap(
                    sub, self.tunnel, wp.vni, self.address, self.address, entropy=np.zeros(len(sub), np.int64)
                )
                keys = parse(enc)
                # the sender's stack left these checksums to an offload that never comes:
                # finish them now, so conntrack finds them valid (as Linux treats
                # CHECKSUM_PARTIAL) and the frame leaves the host complete
                partial = np.flatnonzero(burst.csum_partial[rows])
                if partial.size:
                    self.counters["csum_completed"] += complete_l4_checksums(enc, keys, partial)
                if split.any():
                    enc, keys = self._split(wp, enc, keys, split, room)
                if len(enc):
                    self._judge(enc, keys, from_underlay=False)
        finally:
            wp.port.release()

    def _split(self, wp: WorkloadPort, enc: Batch, keys, split, room):
        """Frames ``split`` of ``enc`` (IPv4 with DF clear, too big for the way) cut into
        fragments that fit ``room``, as a router does (RFC 791); they then go through
        reassembly and the datapath like any fragments. Returns the batch to judge."""
        from .defrag import fragment_ipv4

        rows = np.flatnonzero(split)
        inner, _tenant, err = decap(_view(enc, rows))
        pieces = []
        for j, m in enumerate(room[rows].tolist()):
            frags = fragment_ipv4(inner.packet(j), int(m)) if not err[j] else None
            if frags is None:
                self.agent_drops["too_big"] += 1
                continue
            pieces.extend(frags)
        self.counters["fragmented"] += len(pieces)
        rest = np.flatnonzero(~split)
        parts = [_view(enc, rest)] if rest.size else []
        if pieces:
            parts.append(encap(Batch.from_packets(pieces), self.tunnel, wp.vni, self.address, self.address))
        if not parts:
            return Batch.from_packets([]), parse(Batch.from_packets([]))
        out = parts[0] if len(parts) == 1 else Batch.concat(parts, order=None)
        return out, parse(out)

    def _too_big(self, wp: WorkloadPort, b: Batch, rows, room) -> None:
        """Answer frames too big for the underlay with ICMP "fragmentation needed" / "packet
        too big" carrying the MTU that fits (so the sender's path MTU discovery adapts), and
        drop them; IPv4 packets without DF and ICMP errors are dropped unanswered."""
        from ..datapath.output import too_big_reply

        self.agent_drops["too_big"] += int(rows.size)
        replies = [r for i, m in zip(rows.tolist(), room.tolist()) if (r := too_big_reply(b.packet(i), m))]
        if replies:
            self.counters["icmp_too_big"] += len(replies)
            wp.port.send(Batch.from_packets(replies))

    def _respond(self, wp: WorkloadPort, b: Batch, rows, arp_mask) -> None:
        """Answer ARP requests and neighbour solicitations for the tenant's workload
        addresses (a few frames; per frame in Python)."""
        replies = []
        for i in rows.tolist():
            pkt = b.packet(i)
            if arp_mask[i]:
                r = self._arp_reply(wp, pkt)
                key = "arp"
            else:
                r = self._na_reply(wp, pkt)
                key = "nd"
            if r is None:
                self.agent_drops[f"{key}_unanswered"] += 1
            else:
                replies.append(r)
                self.counters[f"{key}_replies"] += 1
        if replies:
            wp.port.send(Batch.from_packets(replies))

    def _arp_reply(self, wp: WorkloadPort, pkt: bytes):
        if len(pkt) < 42 or pkt[14:22] != b"\x00\x01\x08\x00\x06\x04\x00\x01":
            return None
        sha, spa, tpa = pkt[22:28], pkt[28:32], pkt[38:42]
        if int.from_bytes(sha, "big") != wp.mac or spa == tpa:
            return None  # not the port's own MAC, or a gratuitous ARP
        mac = self._arp.get((wp.vni, int.from_bytes(tpa, "big")))
        if mac is None or mac == wp.mac:
            return None
        t = str(ipaddress.IPv4Address(tpa))
        s = str(ipaddress.IPv4Address(spa))
        return PB.ethernet(PB.arp(2, mac, t, sha, s), ETH_ARP, src=mac, dst=sha)

    def _na_reply(self, wp: WorkloadPort, pkt: bytes):
        src, target = pkt[22:38], pkt[62:78]
        if src == b"\0" * 16 or pkt[55] != 0:  # duplicate address detection: stay silent
            return None
        mac = self._nd.get((wp.vni, int.from_bytes(target, "big")))
        if mac is None or mac == wp.mac:
            return None
        t = str(ipaddress.IPv6Address(target))
        s = str(ipaddress.IPv6Address(src))
        body = PB.icmpv6(
            136, 0, b"\x60\x00\x00\x00", target + b"\x02\x01" + mac.to_bytes(6, "big"), src=t, dst=s
        )
        return PB.ethernet(PB.ipv6(t, s, 58, body, hlim=255), src=mac, dst=pkt[6:12])

    # -- underlay side --------------------------------------------------------------------------
    def _from_underlay(self) -> None:
        burst = self.underlay.recv(max_blocks=4)
        if burst is None:
            return
        try:
            b = burst.batch
            n = len(b)
            if n == 0:
                return
            d, off, ln = b.data, b.offset, b.length
            et = _bytes_at(d, off, ln, 12, 2)
            arp = np.flatnonzero(et == ETH_ARP)
            if arp.size:
                self._underlay_arp(b, arp)
            src, proto, to_me = self._from_peer_to_me(b, et)
            tunnel = to_me & ((proto == 17) | (proto == 47))
            esp = to_me & (proto == 50) if self.gateway is not None else np.zeros(n, bool)
            if self._esp_peers.size:
                # the IPsec policies protect what comes from these hosts: plain is refused
                plain = tunnel & np.isin(src, self._esp_peers)
                self.agent_drops["esp_required"] += int(np.count_nonzero(plain))
                tunnel &= ~plain
            mine = tunnel | esp
            self.agent_drops["underlay_other"] += int(np.count_nonzero(~mine & (et != ETH_ARP)))
            rows = np.flatnonzero(mine)
            if rows.size:
                part = _view(b, rows)
                self.counters["packets"] += rows.size
                self.counters["bytes"] += int(part.wire_len.sum(dtype=np.int64))
                if esp.any():
                    self.counters["esp_received"] += int(np.count_nonzero(esp))
                    part, keys = self._decrypted(part)
                else:
                    keys = parse(part)
                if len(part):
                    self._judge(part, keys, from_underlay=True)
        finally:
            self.underlay.release()

    def _from_peer_to_me(self, b: Batch, et: np.ndarray | None = None):
        """Per frame of ``b``: its outer IPv4 source and protocol, and whether it is an IPv4
        packet from another host of the policy to this host (``et``: the ethertypes, when the
        caller has them)."""
        d, off, ln = b.data, b.offset, b.length
        if et is None:
            et = _bytes_at(d, off, ln, 12, 2)
        src = _bytes_at(d, off, ln, 26, 4)
        proto = _bytes_at(d, off, ln, 23, 1)
        to_me = (
            (et == ETH_IPV4)
            & ((_bytes_at(d, off, ln, 14, 1) >> np.uint64(4)) == 4)
            & (_bytes_at(d, off, ln, 30, 4) == np.uint64(self._own_ip))
            & (np.isin(src, self._peer_ip) if self._peer_ip.size else np.zeros(len(b), bool))
        )
        return src, proto, to_me

    def _decrypted(self, part: Batch):
        """``part`` with its ESP packets replaced by what they carry (those that fail
        authentication, replay or SA checks are dropped and counted by the gateway), keeping
        only the decrypted overlay packets that come from a peer host to this host."""
        from ..ipsec.gateway import decrypt_inbound

        both, keys = decrypt_inbound(self.gateway, part)
        _src, proto, to_me = self._from_peer_to_me(both)
        ok = to_me & ((proto == 17) | (proto == 47))
        if ok.all():
            return both, keys
        self.agent_drops["underlay_other"] += int(np.count_nonzero(~ok))
        rows = np.flatnonzero(ok)
        kept = both.select(rows)
        return kept, parse(kept)

    def _underlay_arp(self, b: Batch, rows) -> None:
        replies = []
        for i in rows.tolist():
            pkt = b.packet(i)
            if len(pkt) < 42 or pkt[14:20] != b"\x00\x01\x08\x00\x06\x04":
                continue
            op = int.from_bytes(pkt[20:22], "big")
            sha, spa, tpa = pkt[22:28], int.from_bytes(pkt[28:32], "big"), int.from_bytes(pkt[38:42], "big")
            if self._peer_ip.size and np.any(self._peer_ip == np.uint64(spa)):
                if self.neighbours.get(spa) != sha:
                    log.debug("underlay: %s is at %s", ipaddress.IPv4Address(spa), sha.hex(":"))
                self.neighbours[spa] = sha
            if op == 1 and tpa == self._own_ip:
                replies.append(
                    PB.arp_packet(2, self.underlay.mac, self.address, sha, str(ipaddress.IPv4Address(spa)))
                )
        if replies:
            self.underlay.send(Batch.from_packets(replies))

    def neighbours_complete(self) -> bool:
        return all(int(ip) in self.neighbours for ip in self._peer_ip.tolist())

    def _arp_timer(self) -> None:
        now = time.monotonic()
        if now < self._next_arp:
            return
        full = now - self._last_full_arp >= ARP_REFRESH_S
        want = [ip for ip in self._peer_ip.tolist() if full or ip not in self.neighbours]
        if full:
            self._last_full_arp = now
        if want:
            reqs = [
                PB.arp_packet(1, self.underlay.mac, self.address, b"\0" * 6, str(ipaddress.IPv4Address(ip)))
                for ip in want
            ]
            self.underlay.send(Batch.from_packets(reqs))
        self._next_arp = now + (ARP_RETRY_S if not self.neighbours_complete() else ARP_REFRESH_S)

    # -- judging and output ---------------------------------------------------------------------
    def _judge(self, batch: Batch, keys, from_underlay: bool) -> None:
        """``batch``: tunnelled frames (the tenant is their VNI), ``keys`` their parsed
        headers. Judge, then send the allowed ones (and reject answers) on. IP fragments are
        gathered first: conntrack and the policy judge the reassembled datagram once, and its
        fragments leave with that verdict (:mod:`.defrag`, as Linux's nf_defrag does)."""
        n = len(batch)
        frag = (keys.flags[:n] & F_FRAG) != 0
        if frag.any():
            self._fragments(batch, np.flatnonzero(frag), from_underlay)
            whole = np.flatnonzero(~frag)
            if whole.size == 0:
                return
            batch = _view(batch, whole)
            keys = parse(batch)
        self._decide(batch, keys, from_underlay)

    def _fragments(self, batch: Batch, rows, from_underlay: bool) -> None:
        inner, tenant, err = decap(_view(batch, rows))
        d = batch.data
        for j, i in enumerate(rows.tolist()):
            if err[j]:
                self.defrag.drops["frag_malformed"] += 1
                continue
            frame = batch.packet(i)  # a copy: it outlives the ring's block
            got = self.defrag.add(inner.packet(j), int(tenant[j]), frame)
            if got is None:
                continue
            whole, frames = got
            o = int(batch.offset[i])
            src = str(ipaddress.IPv4Address(bytes(d[o + 26 : o + 30])))
            dst = str(ipaddress.IPv4Address(bytes(d[o + 30 : o + 34])))
            one = encap(Batch.from_packets([whole]), self.tunnel, int(tenant[j]), src, dst)
            res = self._decide(one, parse(one), from_underlay, send=False)
            fb = Batch.from_packets(frames)
            self._forward(fb, dataclasses.replace(res[np.zeros(len(fb), np.int64)], keys=None), from_underlay)

    def _decide(self, batch: Batch, keys, from_underlay: bool, send: bool = True):
        """Judge ``batch`` and (``send``) forward what it allows; returns the results."""
        t0 = time.perf_counter()
        res = self.dp.process(batch, keys)
        if self.observer is not None:
            self.observer.observe(batch, res, time.perf_counter() - t0)
        if self.flowlog is not None:
            self.flowlog.observe(batch, res.keys, res, self.dp)
        self.kfast.observe(batch, res)
        if send:
            self._forward(batch, res, from_underlay)
        return res

    def _forward(self, batch: Batch, res, from_underlay: bool) -> None:
        """Send the frames of ``batch`` as their results ``res`` say (drops counted)."""
        v = res.verdict
        bad = v != V.ALLOW
        if bad.any():
            self.drops += np.bincount(res.reason[bad], minlength=256)[:256]
        allowed = ~bad
        d_host = self._w_host[np.where(res.dst_workload >= 0, res.dst_workload, -1)]
        s_host = self._w_host[np.where(res.src_workload >= 0, res.src_workload, -1)]
        out_v = v.copy()
        noroute = allowed & (d_host < 0)
        out_v[noroute] = V.DROP
        self.agent_drops["no_route"] += int(np.count_nonzero(noroute))
        if from_underlay:
            away = allowed & (d_host >= 0) & (d_host != self._me)
            out_v[away] = V.DROP
            self.agent_drops["not_local"] += int(np.count_nonzero(away))
        out_v[(v == V.REJECT) & (s_host < 0)] = V.DROP  # no one to answer
        if self.ids is not None and res.keys is not None:
            rows = np.flatnonzero(out_v == V.ALLOW)
            if rows.size:
                out_v[rows[~self.ids.divert(batch, res.keys, rows, res.ct)]] = V.DROP
        if not np.any(out_v != V.DROP):
            return
        out = self.fwd.output(batch, dataclasses.replace(res, verdict=out_v))
        if len(out):
            self._route(out)

    # -- flow log: connections conntrack's idle timeout removes ------------------------------------
    EXPIRE_INTERVAL_S = 0.25

    def _expire_logged(self) -> None:
        """With a flow log, conntrack's idle expiry runs here, between batches, instead of in
        each batch: every connection it removes gets its ``end`` line (``close`` ``timeout``)
        first (:meth:`FlowLog.expire`). Every ``EXPIRE_INTERVAL_S`` it visits at least
        1/16 of the table (so an idle table is swept within 4 s), and at least eight of
        the datapath's per-batch budgets."""
        t = self.dp.conntrack
        if self._ct_budget is None:
            self._ct_budget = int(t.expire_budget)
        t.expire_budget = 0  # (a table restored or handed over copies it: set again)
        if not self._ct_budget:
            return  # the datapath was configured not to expire
        now = time.monotonic()
        if now < self._next_expire:
            return
        self._next_expire = now + self.EXPIRE_INTERVAL_S
        budget = min(max(8 * self._ct_budget, t.capacity // 16), 1 << 18)
        assert self.flowlog is not None
        self.flowlog.expire(t, time.time_ns(), budget, self.dp.policy)

    def _flowlog_stats(self) -> dict:
        fl = self.flowlog
        assert fl is not None
        return {"lines": fl.lines, "timeouts": fl.timeouts, "timeouts_unlogged": fl.timeouts_unlogged}

    # -- IDS (--ids suricata|builtin|auto: .ids) ---------------------------------------------
    def _ids_start(self, ids, rules, packets, state_dir, netns, model) -> None:
        from subprocess import SubprocessError

        from . import ids as I

        if ids not in I.ENGINES:
            self.close()
            raise InputError(f"--ids must be one of {', '.join(I.ENGINES)}")
        if not rules:
            self.close()
            raise InputError(f"--ids {ids} needs --ids-rules R.rules")
        try:
            self.ids = I.make(
                ids, rules, packets, state_dir or ".", self.host, netns, [t.vni for t in model.tenants]
            )
            self.ids.start()
        except InputError as exc:
            self.close()
            raise InputError(f"--ids {ids}: the built-in matcher refuses the rules: {exc}") from None
        except (OSError, SubprocessError) as exc:
            self.close()
            raise AgentError(f"--ids: {exc}") from None
        log.info("IDS: %s (%s)", self.ids.engine, self.ids.note or f"--ids {ids}")
        if self.ids.active:
            # the kernel fast path takes a connection only once the IDS has had its packets
            self.kfast.cfg.after_packets = max(self.kfast.cfg.after_packets, self.ids.packets + 2)

    def _ids_tick(self) -> None:
        ids = self.ids
        ids.tick()
        if ids.ended:
            for _f, ident, reason, _n in ids.ended:
                if reason != "drop" and ident is not None:
                    self.kfast.offer_now(ident)  # nothing more to inspect: eligible at once
            ids.ended.clear()
        if ids.hits:
            # blocked (also after its inspection ended), or its packets came again: cut it
            # and what they made
            self._ids_cut(ids.hits)
            ids.hits.clear()
        if ids.events:
            if self.flowlog is not None:
                for rec in ids.events:
                    self.flowlog.emit(dict(rec, host=self.host))
            for rec in ids.events:
                if rec["event"] != "ids":
                    continue
                log.warning(
                    "IDS alert sid %s (%s) %s: %s:%s -> %s:%s",
                    rec["sid"],
                    rec["action"],
                    rec["msg"],
                    rec["src"],
                    rec["sport"],
                    rec["dst"],
                    rec["dport"],
                )
            ids.events.clear()
        back = ids.returned()
        if not back:
            return
        hosts = self.model.hosts
        by_vni: dict[int, list[bytes]] = {}
        for vni, fr in back:
            by_vni.setdefault(vni, []).append(fr)
        for vni, frames in by_vni.items():
            b = Batch.from_packets(frames)
            hi = self._dest_host(vni, _mac48(b.data, np.asarray(b.offset) + 0))
            ok = np.flatnonzero(hi >= 0)
            if ok.size == 0:
                continue
            b = _view(b, ok)
            dst = [str(hosts[int(h)].address) for h in hi[ok].tolist()]
            self._route(encap(b, self.tunnel, vni, self.address, dst))

    def _ids_cut(self, flows) -> int:
        """Connections ``flows`` (the IDS's keys: tenant, proto, lower end, upper end) are
        blocked: out of the kernel fast path's map and never offered to it again, and their
        conntrack entries deleted (one pass over the table for all of them), so nothing
        forwards their later packets (the IDS drops them, counted ``ids_blocked``). Returns
        the conntrack entries deleted."""
        flows = list(flows)
        for tenant, proto, a_hi, a_lo, a_p, b_hi, b_lo, b_p in flows:
            self.kfast.withhold((tenant, proto, a_hi, a_lo, b_hi, b_lo, a_p, b_p))
            self.kfast.withhold((tenant, proto, b_hi, b_lo, a_hi, a_lo, b_p, a_p))
        if not flows:
            return 0
        ports = {f[4] for f in flows} | {f[7] for f in flows}

        def match(e):
            out = np.zeros(e.shape[0], bool)
            near = np.flatnonzero(np.isin(e["sport"], list(ports)) & np.isin(e["dport"], list(ports)))
            if near.size == 0:
                return out
            c = e[near]
            hit = np.zeros(near.size, bool)
            for tenant, proto, a_hi, a_lo, a_p, b_hi, b_lo, b_p in flows:

                def end(x_hi, x_lo, x_p, y_hi, y_lo, y_p):
                    return (
                        (c["src_hi"] == x_hi)
                        & (c["src_lo"] == x_lo)
                        & (c["sport"] == x_p)
                        & (c["dst_hi"] == y_hi)
                        & (c["dst_lo"] == y_lo)
                        & (c["dport"] == y_p)
                    )

                same = (c["zone"] == tenant) & (c["proto"] == proto)
                hit |= same & (end(a_hi, a_lo, a_p, b_hi, b_lo, b_p) | end(b_hi, b_lo, b_p, a_hi, a_lo, a_p))
            out[near] = hit
            return out

        n = self.dp.conntrack.delete_where(match)
        self.ids.counts["cut_connections"] += n
        return n

    def _route(self, out: Batch) -> None:
        """Frames the Forwarder built (tunnelled, outer IPv4): to this host -> decapsulate
        and deliver to the workload's port; to another host -> the underlay."""
        d, off, ln = out.data, out.offset, out.length
        dst = _bytes_at(d, off, ln, 30, 4)
        local = dst == np.uint64(self._own_ip)
        remote = np.flatnonzero(~local)
        if remote.size and self.gateway is not None:
            # the IPsec policies decide per frame: ESP towards the other site, bypass, discard
            sent, why = self.gateway.encrypt_batch(_view(out, remote), return_reasons=True)
            self.ipsec_counts["dropped_out"] += int(np.count_nonzero(why != 0))
            self.ipsec_counts["esp_sent"] += int(
                np.count_nonzero(_bytes_at(sent.data, sent.offset, sent.length, 23, 1) == 50)
            )
            self._send_underlay(sent, np.arange(len(sent)))
        elif remote.size:
            self._send_underlay(out, remote)
        self._deliver(out, local)

    def _send_underlay(self, out: Batch, remote: np.ndarray) -> None:
        """Frames ``remote`` of ``out`` (outer IPv4) onto the underlay, with the MAC of the
        host of their outer destination (unresolved: dropped, and that host asked again)."""
        d, off, ln = out.data, out.offset, out.length
        if remote.size == 0:
            return
        dips = _bytes_at(d, off, ln, 30, 4)[remote]
        macs = np.zeros((remote.size, 12), np.uint8)
        known = np.zeros(remote.size, bool)
        for ip in np.unique(dips).tolist():
            m = self.neighbours.get(int(ip))
            if m is not None:
                sel = dips == ip
                macs[sel, :6] = np.frombuffer(m, np.uint8)
                known |= sel
        macs[:, 6:] = np.frombuffer(self.underlay.mac, np.uint8)
        if not known.all():
            self.agent_drops["underlay_unresolved"] += int(np.count_nonzero(~known))
            self._next_arp = 0.0
        rows = remote[known]
        if rows.size:
            idx = np.asarray(off, np.int64)[rows, None] + np.arange(12)
            d[idx] = macs[known]
            self.counters["to_underlay"] += self.underlay.send(out, rows)

    def _deliver(self, out: Batch, local) -> None:
        loc = np.flatnonzero(local)
        if loc.size:
            inner, tenant, err = decap(_view(out, loc))
            ok = np.flatnonzero(err == 0)
            if ok.size == 0:
                return
            dmac = _mac48(inner.data, np.asarray(inner.offset)[ok])
            ten = np.asarray(tenant)[ok]
            for p in self.wports:
                sel = ok[(dmac == np.uint64(p.mac)) & (ten == p.vni)]
                if sel.size:
                    self.counters["delivered"] += p.port.send(inner, sel)

    # -- control --------------------------------------------------------------------------------
    def _serve_control(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        for _ in range(8):
            try:
                conn, _ = ctl.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                try:
                    if not control.peer_allowed(conn):
                        control.send_reply(conn, {"ok": False, "error": "permission denied"})
                        continue
                    req = control.read_request(conn)
                    control.send_reply(conn, self.handle(req))
                except (OSError, ValueError) as exc:
                    log.warning("control request failed: %s", exc)

    def call(self, req: dict, timeout: float = 30.0) -> dict:
        """Answer a control request from another thread (the REST API's): it is handed to the
        packet loop and answered between two batches, as a control-socket request is."""
        done, box = threading.Event(), dict[str, dict]()
        with self._api_lock:
            self._api_queue.append((req, done, box))
        self._wake()
        if not done.wait(timeout):
            with self._api_lock:
                self._api_queue = [q for q in self._api_queue if q[1] is not done]
            raise TimeoutError(f"the agent's loop did not answer within {timeout:.0f} s")
        return box["reply"]

    def _serve_api(self, stopping: bool = False) -> None:
        with self._api_lock:
            todo, self._api_queue = self._api_queue, []
        for req, done, box in todo:
            if stopping:
                box["reply"] = {"ok": False, "error": "the agent is stopping"}
            else:
                try:
                    box["reply"] = self.handle(req)
                except Exception as exc:  # noqa: BLE001 - a request never stops the loop
                    log.exception("API request %s failed", req.get("cmd"))
                    box["reply"] = {"ok": False, "error": f"{req.get('cmd')}: {exc}"}
            done.set()

    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "stats":
            return {"ok": True, **self.stats()}
        if cmd == "reload":
            return self.reload(req.get("policy"))
        if cmd == "conntrack":
            return self.conntrack_list(req)
        if cmd == "trace":
            return self.trace(req)
        return {"ok": False, "error": f"unknown command {cmd!r} (status, stats, reload, conntrack, trace)"}

    def conntrack_list(self, req: dict) -> dict:
        """The live connections (``conntrack -L``'s fields), optionally filtered by ``zone``
        (a tenant's VNI), ``src``, ``dst``, ``proto`` and TCP ``state``; at most ``limit``."""
        from ..conntrack import const as K
        from ..conntrack.commands import describe, select
        from ..packet.batch import text_to_addr

        try:
            src = text_to_addr(str(req["src"])) if req.get("src") else None
            dst = text_to_addr(str(req["dst"])) if req.get("dst") else None
            proto = req.get("proto")
            if isinstance(proto, str):
                proto = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}.get(proto.lower(), proto)
            proto = int(proto) if proto is not None else None
            state = req.get("state")
            if state is not None:
                state = K.TCP_STATE_NAMES.index(str(state).upper())
            zone = int(req["zone"]) if req.get("zone") is not None else None
            limit = int(req.get("limit", 10000))
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": f"conntrack: bad filter: {exc}"}
        table = self.dp.conntrack
        now = time.time_ns()
        rows = select(table.entries(), now, zone, src, dst, proto, state)
        return {
            "ok": True,
            "count": int(len(rows)),
            "entries": [describe(e, now) for e in rows[:limit]],
            "truncated": bool(len(rows) > limit),
        }

    def trace(self, req: dict) -> dict:
        """What the running datapath does with one packet (``microseg trace``'s description,
        e.g. ``src=acme/web-1 dst=acme/db-1 proto=tcp dport=5432``), run on a copy of the live
        state (the running policy, a copy of conntrack): nothing live changes."""
        import tempfile

        from ..app import parse_packet_spec, trace_packet

        text = req.get("packet")
        if not isinstance(text, str) or not text.strip():
            return {"ok": False, "error": 'trace: give "packet": "src=... dst=... proto=... dport=..."'}
        state = req.get("state", "live")
        if state not in ("live", "new", "established"):
            return {"ok": False, "error": "trace: state is live, new or established"}
        try:
            spec = parse_packet_spec(text, self.model)
        except MicrosegError as exc:
            return {"ok": False, "error": str(exc)}
        cfg = dataclasses.replace(self.dp.config, emc_entries=64, megaflow_entries=64, offload_capacity=64)
        dp = Datapath(self.compiled, cfg)
        if state == "live":
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "ct.npz")
                self.dp.conntrack.snapshot(path)
                dp.conntrack = ConntrackTable.restore(
                    path,
                    capacity=cfg.conntrack_capacity,
                    timeouts=cfg.conntrack_timeouts,
                    checksum=cfg.checksum,
                )
        fwd = Forwarder(self.compiled, self.tunnel, local_address=self.address)
        out = trace_packet(dp, fwd, spec, "established" if state == "established" else "new")
        return {"ok": True, **json.loads(json.dumps(out, default=str))}

    def status(self) -> dict:
        pol = self.compiled
        return {
            "host": self.host,
            "address": self.address,
            "pid": os.getpid(),
            "ready": self.ready,
            "uptime_s": round(time.time() - self.started, 3),
            "tunnel": self.tunnel,
            "rx_ring": f"v{self.rx_ring}",
            "policy": {"path": self.policy_path, "version": pol.version, "hash": pol.content_hash},
            "ports": {p.name: p.port.ifname for p in self.wports},
            "underlay": {
                "ifname": self.underlay.ifname,
                "mac": self.underlay.mac.hex(":"),
                "peers": {
                    name: (self.neighbours[ip].hex(":") if ip in self.neighbours else None)
                    for ip, name in zip(self._peer_ip.tolist(), self._peer_name)
                },
                "resolved": self.neighbours_complete(),
            },
            "reloads": self.reloads,
            "reloads_refused": self.reload_refused,
            "conntrack_restored": self.restored,
            "moves": dict(self.moves),
            "handoffs": dict(self.handoffs),
            "arriving": {n: self.standby.get(n) for n in self._arriving},
            "policy_revision": self.policy_revision,
            "metrics_url": self.metrics_server.url if self.metrics_server is not None else None,
            "flow_log": self.flow_log_path,
            "fastpath": {"kind": self.kfast.kind, "reason": self.kfast.reason or None},
            "ipsec": None
            if self.gateway is None
            else {
                "file": self.ipsec_path,
                "esp_peers": [h.name for i, h in enumerate(self.model.hosts) if self._h_esp[i]],
            },
            **({"store": self._store_status()} if self.watcher is not None else {}),
            **({"ids": self.ids.status()} if self.ids is not None else {}),
        }

    def _store_status(self) -> dict:
        if self.watcher is None:
            return {}
        w = self.watcher.status()
        return {
            "endpoint": self.store_url,
            "prefix": self.store_prefix,
            "health": self.store_health(),
            "state": w["state"],
            "connected": w["connected"],
            "revision": w["revision"],
            "errors": w["errors"],
            "refused": list(self.store_refused) if self.store_refused else None,
        }

    def stats(self) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        dps = self.dp.counters.as_dict()
        drops = {REASONS.get(i, str(i)): int(c) for i, c in enumerate(self.drops) if c}
        drops.update({k: v for k, v in self.agent_drops.items() if v})
        drops.update({k: v for k, v in self.defrag.drops.items() if v})
        ports = {p.name: dict(p.port.counters, ifname=p.port.ifname) for p in self.wports}
        ports["underlay"] = dict(self.underlay.counters, ifname=self.underlay.ifname)
        return {
            "host": self.host,
            "pid": os.getpid(),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
            "packets": self.counters["packets"],
            "bytes": self.counters["bytes"],
            "verdicts": dps["verdicts"],
            "drops": drops,
            "conntrack": {"entries": len(self.dp.conntrack), "revoked": dps["revoked_connections"]},
            "datapath": {
                "packets": dps["packets"],
                "levels": dps["levels"],
                "conntrack_states": dps["conntrack_states"],
                "seconds": round(dps["seconds"], 6),
            },
            "agent": {k: v for k, v in self.counters.items() if k not in ("packets", "bytes")},
            "defrag": self.defrag.stats(),
            "moves": dict(self.moves),
            "ports": ports,
            "policy": {
                "version": self.compiled.version,
                "hash": self.compiled.content_hash,
                "reloads": self.reloads,
            },
            **({"ipsec": self._ipsec_stats()} if self.gateway is not None else {}),
            "fastpath": self.kfast.stats(),
            **({"ids": self.ids.stats()} if self.ids is not None else {}),
            **({"flow_log": self._flowlog_stats()} if self.flowlog is not None else {}),
        }

    def _ipsec_stats(self) -> dict:
        gw = self.gateway
        if gw is None:
            return {}
        return {
            **self.ipsec_counts,
            "esp_received": self.counters["esp_received"],
            "drops": {k: v for k, v in gw.drop_counts().items() if v},
            "sas": gw.sa_stats(),
        }

    @property
    def underlay_open(self) -> bool:
        return self._ul is not None

    @property
    def underlay(self) -> AfPacketPort:
        """The underlay port (open from construction to :meth:`close`)."""
        if self._ul is None:
            raise AgentError("the underlay port is not open")
        return self._ul

    def close(self) -> None:
        ids = getattr(self, "ids", None)
        if ids is not None:
            ids.stop()
            self.ids = None
        kfast = getattr(self, "kfast", None)
        if kfast is not None:
            try:
                kfast.close()  # detach first: nothing forwards once the agent stops
            except MicrosegError as exc:
                log.error("kernel fast path: %s", exc)
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.flowlog is not None:
            self.flowlog.close()
            self.flowlog = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
            if self.control_path:
                try:
                    os.unlink(self.control_path)
                except FileNotFoundError:
                    pass
        for p in self.wports:
            p.port.close()
        if self._ul is not None:
            self._ul.close()
            self._ul = None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _port_arg(text: str):
    name, sep, ifname = text.rpartition("=")
    if not sep or not name or not ifname:
        raise argparse.ArgumentTypeError(f"{text!r}: write WORKLOAD=IFNAME")
    return name, ifname


def register(sub) -> None:
    p = sub.add_parser(
        "agent",
        help="enforce a policy on live interfaces (one host)",
        description="Run the enforcement point of one host of the policy on its "
        "interfaces (AF_PACKET): workload ports in, the tenant's "
        "overlay out on the underlay. Needs CAP_NET_RAW and "
        "CAP_NET_ADMIN. See docs/agent.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", metavar="P.yaml", help="the policy file")
    src.add_argument(
        "--store",
        metavar="URL[,URL...]",
        help="follow the policy in etcd (docs/store.md) instead of a file: this host's "
        "resources, watched, swapped on each relevant change, fail static",
    )
    p.add_argument("--prefix", metavar="P", help="the store's key prefix (default /microseg/v1/)")
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="open the ports in network namespace NAME (/run/netns/NAME); the store and the "
        "control socket stay in the agent's own",
    )
    p.add_argument("--host", required=True, metavar="NAME", help="this host, as the policy names it")
    p.add_argument(
        "--port",
        action="append",
        type=_port_arg,
        default=[],
        metavar="WORKLOAD=IFNAME",
        help="a workload of this host ([tenant/]name) and its interface; repeatable",
    )
    p.add_argument(
        "--underlay", required=True, metavar="IFNAME", help="the interface towards the other hosts"
    )
    p.add_argument("--tunnel", choices=TUNNELS, default="vxlan", help="overlay encapsulation (default vxlan)")
    p.add_argument(
        "--control", metavar="PATH", help="Unix control socket (status, stats, reload, conntrack, trace)"
    )
    p.add_argument(
        "--offload",
        choices=("auto", "xdp", "off"),
        default="auto",
        help="established flows into the kernel's XDP program on the agent's ports: auto "
        "(where BPF allows it, else the agent forwards everything, and status says why), xdp "
        "(or refuse to start), off (default auto)",
    )
    p.add_argument(
        "--rx-ring",
        choices=("auto", "v2", "v3"),
        default="auto",
        help="the ports' receive ring: v3 (blocks: most frames per batch, a timer tick of "
        "latency under light load), v2 (each frame at once), auto (v2 with the kernel fast "
        "path, v3 without; default)",
    )
    p.add_argument(
        "--offload-after",
        type=int,
        default=8,
        metavar="N",
        help="packets of an established connection the agent sees before offloading it (default 8)",
    )
    p.add_argument(
        "--offload-capacity",
        type=int,
        default=500_000,
        metavar="N",
        help="connections in the kernel's flow map at most (default 500000)",
    )
    p.add_argument(
        "--offload-rate",
        type=float,
        default=7000.0,
        metavar="R",
        help="connections offloaded per second at most (default 7000)",
    )
    p.add_argument(
        "--offload-idle",
        type=float,
        default=10.0,
        metavar="S",
        help="a connection idle this many seconds leaves the kernel's map (default 10)",
    )
    p.add_argument(
        "--ipsec",
        metavar="SA.yaml",
        help="IPsec SAs and policies (docs/ipsec.md): overlay packets the policies protect leave "
        "in ESP, ESP from the other hosts is decrypted before it is judged, and plain overlay "
        "packets from a host the policies protect are refused",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where a clean stop snapshots conntrack (HOST.conntrack.npz) and the next start "
        "takes it over (default: no snapshot)",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics on [127.0.0.1:]PORT (HTTP, loopback only, in the agent's "
        "own namespace) or unix:PATH (a Unix socket, mode 0600), with the REST control API under "
        "/v1/ beside it; default: off",
    )
    p.add_argument(
        "--api-token-file",
        metavar="PATH",
        help="the bearer token (a file of mode 0600) the REST API beside --metrics asks of "
        "mutating calls (POST /v1/reload); without it they are refused (docs/agent.md)",
    )
    p.add_argument(
        "--ids",
        choices=("suricata", "builtin", "auto"),
        help="inspect each connection's first packets: suricata (its own process, AF_PACKET IPS "
        "copy mode), builtin (the built-in signature matcher, in the agent), auto (Suricata where "
        "it is installed, else builtin); docs/inspection.md; default: off",
    )
    p.add_argument("--ids-rules", metavar="R.rules", help="the rule file the IDS loads (--ids)")
    p.add_argument(
        "--ids-packets",
        type=int,
        default=16,
        metavar="N",
        help="at most this many packets of a connection (both directions) are inspected before it "
        "leaves the IDS path; the IDS's own decision (encrypted, bypass, drop) may end it sooner "
        "(default 16)",
    )
    p.add_argument(
        "--flow-log",
        metavar="PATH",
        help="write JSON flow records (one line per connection end or denied new flow) to PATH",
    )
    p.add_argument(
        "--flow-log-max-bytes",
        type=int,
        default=64 << 20,
        metavar="N",
        help="rotate the flow log at N bytes (default 64 MiB)",
    )
    p.add_argument(
        "--flow-log-backups", type=int, default=5, metavar="K", help="rotated flow logs kept (default 5)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="operational messages on stderr (default info)",
    )
    p.set_defaults(func=run_agent)


def _rx_ring(choice: str, offload: OffloadConfig | None, tunnel: str) -> int:
    """The receive ring's TPACKET version. ``v3`` hands blocks over when full or after the
    kernel's retire timer (a tick: up to 4 ms a frame waits under light traffic) -- the most
    frames per batch, best when the agent forwards everything itself; ``v2`` hands each frame
    over at once -- the lowest latency, best when the kernel fast path carries the bulk and the
    agent sees connections' first packets (set-up rate). ``auto`` picks v2 where the kernel
    fast path will run, v3 where it will not."""
    if choice in ("v2", "v3"):
        return int(choice[1])
    if choice != "auto":
        raise InputError("--rx-ring is auto, v2 or v3")
    mode = (offload or OffloadConfig()).mode
    if mode == "off" or tunnel != "vxlan":
        return 3
    from ..bpf import KernelFastPath

    return 2 if KernelFastPath.available()[0] else 3


def _offload_config(args) -> OffloadConfig:
    for name, low in (("offload_after", 1), ("offload_capacity", 1)):
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.offload_rate <= 0 or args.offload_idle <= 0:
        raise InputError("--offload-rate and --offload-idle must be positive")
    return OffloadConfig(
        mode=args.offload,
        after_packets=args.offload_after,
        capacity=args.offload_capacity,
        insert_rate=args.offload_rate,
        idle_s=args.offload_idle,
    )


def run_agent(args) -> int:
    # a long-running process: its lines carry time and pid (on the CLI's stderr handler)
    from ..cli import log_handler

    log_handler().setFormatter(
        logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    )
    logging.getLogger("microseg").setLevel(args.log_level.upper())
    ports = {}
    for name, ifname in args.port:
        if name in ports:
            raise InputError(f"--port: workload {name} given twice")
        ports[name] = ifname
    try:
        agent = Agent(
            args.policy,
            args.host,
            ports,
            args.underlay,
            tunnel=args.tunnel,
            control_path=args.control,
            state_dir=args.state_dir,
            store=args.store,
            store_prefix=args.prefix,
            netns=args.netns,
            metrics=args.metrics,
            flow_log=args.flow_log,
            flow_log_max_bytes=args.flow_log_max_bytes,
            flow_log_backups=args.flow_log_backups,
            ipsec=args.ipsec,
            offload=_offload_config(args),
            rx_ring=args.rx_ring,
            api_token_file=args.api_token_file,
            ids=args.ids,
            ids_rules=args.ids_rules,
            ids_packets=args.ids_packets,
        )
    except PermissionError:
        raise AgentError("AF_PACKET ports need root (CAP_NET_RAW, CAP_NET_ADMIN)") from None
    try:
        agent.run()
        agent.save_conntrack()  # a clean stop: the next start carries the connections on
    finally:
        agent.close()
    return 0
