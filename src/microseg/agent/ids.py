"""Inspection in the live datapath (``microseg agent --ids suricata|builtin|auto``;
docs/inspection.md).

Suricata (:class:`SuricataIds`): the agent owns two veth pairs in its host's namespace,
``msids0``-``msidsa`` and ``msidsb``-``msids1``, and runs Suricata as its own process in
AF_PACKET IPS copy mode between ``msidsa`` and ``msidsb``. An allowed frame of a connection
still under inspection (at most its first ``packets`` packets, both directions counted) is
written into ``msids0`` as its inner Ethernet frame with an 802.1Q tag that stands for its
tenant (tenants may share addresses; Suricata tracks flows per VLAN); what Suricata passes
comes back on ``msids1`` and is routed as it would have been; what it drops never comes back.
Suricata's eve.json is tailed between batches, and its own decisions end a connection's
inspection before ``packets`` where it makes one:

* ``encrypted``: a ``tls`` or ``ssh`` record. Suricata logs it once the handshake is complete,
  which is where it stops inspecting the flow (TLS: ``encryption-handling: bypass``, written
  into its configuration; SSH: after NEWKEYS, Suricata 7's own behaviour);
* ``bypass``: an alert of a rule with the ``bypass`` keyword (the sids are read from the rule
  file);
* ``drop``: an alert whose action is ``blocked`` (a ``drop`` rule): the connection is blocked
  by the agent too (:attr:`blocked`), also after it left the inspected path, and the agent
  cuts its conntrack entry and its kernel fast-path entry;
* ``packets``: the connection's ``packets`` packets were inspected and Suricata said nothing.

Stream depth (``stream.bypass``) has no eve record at the time Suricata decides (only the
flow's ``flow`` record, when Suricata forgets the flow, carries ``"bypass": "local"``), so
there ``packets`` stays the bound. Alerts go to the agent's flow log and counters; so does a
line per connection whose inspection ended, with the reason (``"event": "ids_end"``).

The built-in matcher (:class:`BuiltinIds`, :class:`microseg.offload.inspect.SignatureSet`):
the agent matches the same first packets itself, in the batch; a ``drop`` match drops the
packet and blocks the connection, an ``alert`` is logged, a ``pass`` match ends inspection
(``bypass``), a payload that cannot be inspected (a TLS record, QUIC, ESP) ends it as
``encrypted``. It serves where Suricata is not installed (``--ids auto``) or by choice
(``--ids builtin``); rules outside its subset are refused when the agent starts.

If Suricata is asked for (``--ids suricata``) and not installed the agent forwards without an
IDS (``status`` says engine ``none`` and why); it does not stop. If Suricata dies while the
agent runs, frames under inspection are dropped (fail closed) and it is restarted with a
backoff."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from typing import Any

import numpy as np

from ..packet.batch import Batch, addr_to_text
from .flows import group as flow_groups
from .netns import InNetns

log = logging.getLogger("microseg.agent.ids")

TX, TX_PEER, RX_PEER, RX = "msids0", "msidsa", "msidsb", "msids1"
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
BLOCK_SECONDS = 300.0
ENGINES = ("suricata", "builtin", "auto")
END_REASONS = ("packets", "bypass", "encrypted", "drop")
_MAX_FLOWS = 200_000  # connections remembered (their counts restart once it is reached)
_SID = re.compile(r"\bsid\s*:\s*(\d+)")
_BYPASS = re.compile(r"(?:^|[;(]\s*)bypass\s*;")


def suricata_version(binary: str | None = None) -> str | None:
    """``X.Y.Z`` of the installed Suricata, or None."""
    exe = binary or shutil.which("suricata")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.split("version")
    return parts[1].split()[0] if len(parts) > 1 and parts[1].split() else None


def _ip_key(text: str) -> tuple[int, int]:
    """An address as the parser keeps it: 128 bits in (hi, lo), IPv4 mapped."""
    a = ipaddress.ip_address(text)
    v = int(a) | (0xFFFF << 32) if a.version == 4 else int(a)
    return v >> 64, v & ((1 << 64) - 1)


def _flow(tenant: int, proto: int, a: tuple, b: tuple) -> tuple:
    """One key for both directions of a connection: (tenant, proto, lower end, upper end)."""
    return (tenant, proto, *min(a, b), *max(a, b))


def bypass_sids(path: str) -> frozenset:
    """The sids of the rules in ``path`` that carry Suricata's ``bypass`` keyword (an alert of
    one of them means Suricata bypasses the flow from then on)."""
    out = set()
    buf = ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for raw in f:
                line = raw.rstrip("\n")
                if line.endswith("\\"):
                    buf += line[:-1] + " "
                    continue
                rule, buf = (buf + line).strip(), ""
                if not rule or rule.startswith("#") or "(" not in rule:
                    continue
                body = rule[rule.index("(") :]
                m = _SID.search(body)
                if m and _BYPASS.search(body):
                    out.add(int(m.group(1)))
    except OSError:
        pass
    return frozenset(out)


def write_config(folder: str, rules: str, netns_log: str) -> str:
    from ..offload.inspect import CLASSTYPE_PRIORITY, DEFAULT_VARS

    ports = {k: x for k, x in DEFAULT_VARS.items() if k.endswith("_PORTS")}
    addrs = {k: x for k, x in DEFAULT_VARS.items() if k not in ports}
    cls = os.path.join(folder, "classification.config")
    with open(cls, "w") as f:
        f.write("".join(f"config classification: {k},{k},{p}\n" for k, p in CLASSTYPE_PRIORITY.items()))
    ref = os.path.join(folder, "reference.config")
    open(ref, "w").close()

    def group(d):
        return "".join(f'    {k}: "{x}"\n' for k, x in d.items())

    def iface(a, b, cid):
        return (
            f"  - interface: {a}\n    threads: 1\n    cluster-id: {cid}\n"
            "    cluster-type: cluster_flow\n    defrag: no\n    use-mmap: yes\n"
            f"    copy-mode: ips\n    copy-iface: {b}\n    checksum-checks: no\n"
        )

    text = (
        "%YAML 1.1\n---\n"
        f"vars:\n  address-groups:\n{group(addrs)}  port-groups:\n{group(ports)}"
        f"default-log-dir: {folder}\n"
        f"default-rule-path: {os.path.dirname(rules)}\n"
        f"rule-files:\n  - {rules}\n"
        f"classification-file: {cls}\nreference-config-file: {ref}\n"
        # tls and ssh: the records that say a handshake is complete (the agent's "encrypted");
        # flow: what Suricata did with a flow, logged when it forgets it
        "outputs:\n  - eve-log:\n      enabled: yes\n      filetype: regular\n"
        "      filename: eve.json\n      types:\n        - alert\n        - drop:\n"
        "            alerts: yes\n            flows: all\n        - tls\n        - ssh\n"
        "        - flow\n"
        "logging:\n  default-log-level: notice\n  outputs:\n    - console:\n        enabled: no\n"
        f"    - file:\n        enabled: yes\n        filename: {netns_log}\n"
        # Suricata 7 in IPS mode drops a flow on a parser or memcap exception by default
        # ("auto"); here the policy decides what may flow, the rules what is stopped
        "exception-policy: ignore\n"
        "runmode: workers\n"
        f"af-packet:\n{iface(TX_PEER, RX_PEER, 98)}{iface(RX_PEER, TX_PEER, 97)}"
        "vlan:\n  use-for-tracking: true\n"
        # encrypted traffic: nothing more to inspect once the handshake is seen (Suricata's
        # own "bypass" handling; SSH bypasses once its keys are exchanged in any case)
        "app-layer:\n  protocols:\n    http:\n      enabled: yes\n    tls:\n      enabled: yes\n"
        "      encryption-handling: bypass\n    ssh:\n      enabled: yes\n"
        "      encryption-handling: bypass\n"
        # a stream reassembled to its depth is bypassed too (no eve record at that time)
        "stream:\n  inline: auto\n  midstream: false\n  bypass: yes\n"
        "  reassembly:\n    depth: 1mb\n"
        "unix-command:\n  enabled: no\n"
    )
    path = os.path.join(folder, "suricata.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _now_iso() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Inspection:
    """What both engines share: the connections under inspection (at most ``packets`` packets
    each), why each one's inspection ended, the blocked ones, the records for the flow log.

    ``ended`` collects ``(flow, ident, reason, packets)`` for the agent to act on between
    batches (``ident``: the connection in its original direction, as conntrack and the kernel
    fast path key it, None if unknown); ``hits`` the flows the agent is to cut: each one just
    blocked, and each blocked one whose packets came again."""

    engine = "none"
    note = ""
    active = False
    ready = False

    def __init__(self, packets: int):
        self.packets = max(1, int(packets))
        self._seen: dict[tuple, list] = {}  # flow -> [packets inspected, ident, end reason]
        self.blocked: dict[tuple, float] = {}
        self.events: list[dict] = []  # records for the flow log, taken by the agent
        self.ended: list[tuple] = []
        self.hits: set[tuple] = set()
        self._blocked_now: dict[tuple, int] = {}  # blocked in the batch being inspected: row
        self.counts = {
            "alerts": 0,
            "drops": 0,
            "packets_to_ids": 0,
            "packets_from_ids": 0,
            "ids_drop": 0,
            "ids_blocked": 0,
            "fail_closed": 0,
            "left_ids": 0,
            **{f"ended_{r}": 0 for r in END_REASONS},
            "cut_connections": 0,
        }

    def _record(self, rec: dict) -> None:
        self.events.append(rec)
        if len(self.events) > 10000:
            del self.events[:-10000]

    def _end(self, f: tuple, reason: str, packets: int | None = None) -> None:
        """Inspection of flow ``f`` ends (``reason`` one of END_REASONS; ``packets``: how
        many of its packets it took, if not all counted so far); once per flow."""
        st = self._seen.get(f)
        if st is None:
            if reason != "drop":
                return  # a record for a flow forgotten here (or not seen yet): nothing to end
            st = self._seen[f] = [0, None, None]
        if st[2] is not None:
            return
        st[2] = reason
        if packets is not None:
            st[0] = packets
        self.counts[f"ended_{reason}"] += 1
        if reason != "drop":
            self.counts["left_ids"] += 1
        self.ended.append((f, st[1], reason, st[0]))
        ident = st[1]
        tenant, proto = f[0], f[1]
        if ident is not None:
            src, dst, sport, dport = (
                addr_to_text(ident[2], ident[3]),
                addr_to_text(ident[4], ident[5]),
                ident[6],
                ident[7],
            )
        else:
            src, dst, sport, dport = addr_to_text(f[2], f[3]), addr_to_text(f[5], f[6]), f[4], f[7]
        self._record(
            {
                "event": "ids_end",
                "engine": self.engine,
                "time": _now_iso(),
                "tenant_vni": tenant,
                "proto": {6: "TCP", 17: "UDP", 1: "ICMP", 58: "IPv6-ICMP"}.get(proto, str(proto)),
                "src": src,
                "sport": sport,
                "dst": dst,
                "dport": dport,
                "reason": reason,
                "packets": st[0],
            }
        )

    def _block(self, f: tuple, pos: int | None = None, packets: int | None = None) -> None:
        """Block flow ``f``; ``pos``: the row of the batch being inspected that decided it
        (its later rows of ``f`` are dropped too), ``packets`` its place in the flow."""
        self.blocked[f] = time.monotonic() + BLOCK_SECONDS
        self.hits.add(f)  # cut, also where its inspection had ended (it may be offloaded)
        if pos is not None:
            self._blocked_now.setdefault(f, pos)
        self._end(f, "drop", packets)

    def divert(self, batch: Batch, keys, rows: np.ndarray, ct=None) -> np.ndarray:
        """Of the allowed frames ``rows`` of ``batch`` (tunnelled; ``keys`` parsed; ``ct``
        their conntrack states): those under inspection are inspected (or dropped: engine
        down, flow blocked). Returns a mask over ``rows``: True for the frames the agent
        still forwards itself."""
        keep = np.ones(rows.size, bool)
        if not self.active:
            return keep
        now = time.monotonic()
        if self.blocked:
            for f, t in list(self.blocked.items()):
                if t < now:
                    del self.blocked[f]
        # one dict probe per connection of the batch, not per packet
        gr = flow_groups(keys, rows)
        todo: list[np.ndarray] = []
        todo_g: list[np.ndarray] = []  # the group of each row of todo
        touched: list[tuple[tuple, int]] = []  # (flow, packets of it sent to inspection)
        over: list[np.ndarray] = []
        for g, f in enumerate(gr.flows):
            members = gr.members(g)
            if self.blocked and f in self.blocked:
                keep[members] = False
                self.counts["ids_blocked"] += int(members.size)
                self.hits.add(f)
                continue
            st = self._seen.get(f)
            if st is None or st[1] is None:
                ident = gr.ident(g, keys, ct)
                if st is None:
                    if len(self._seen) >= _MAX_FLOWS:
                        self._seen.clear()  # bounded: counts restart rather than grow without end
                    st = self._seen[f] = [0, ident, None]
                else:
                    st[1] = ident
            if st[2] is not None:
                continue
            room = self.packets - st[0]
            if room <= 0:
                over.append(members)  # its N reached in this batch (ends below, if inspected)
                continue
            take = members[:room]
            st[0] += int(take.size)
            todo.append(take)
            todo_g.append(np.full(take.size, g, np.int64))
            touched.append((f, int(take.size)))
            if members.size > room:
                over.append(members[room:])
        if todo:
            pos = np.concatenate(todo)
            o = np.argsort(pos, kind="stable")
            pos = pos[o]
            flows = [gr.flows[g] for g in np.concatenate(todo_g)[o].tolist()]
            done = self._inspect(batch, keys, rows[pos], pos, flows, keep, ct)
            if done is False:
                # not inspected (the engine is down: dropped, fail closed): they do not count
                # towards N, so no connection leaves the inspected path uninspected
                for f, m in touched:
                    st = self._seen.get(f)
                    if st is not None and st[2] is None:
                        st[0] -= m
                touched = []
                if over:
                    ov = np.concatenate(over)
                    keep[ov] = False
                    self.counts["fail_closed"] += int(ov.size)
            for f, _m in touched:
                st = self._seen.get(f)
                if st is not None and st[2] is None and st[0] >= self.packets:
                    self._end(f, "packets")
        if self._blocked_now:
            # blocked by a packet of this batch: its later packets in the batch go no further
            for g, f in enumerate(gr.flows):
                p = self._blocked_now.get(f)
                if p is None:
                    continue
                members = gr.members(g)
                late = members[(members > p) & keep[members]]
                keep[late] = False
                self.counts["ids_blocked"] += int(late.size)
                if late.size:
                    self.hits.add(f)
            self._blocked_now.clear()
        return keep

    def _inspect(self, batch, keys, todo, pos, flows, keep, ct) -> bool | None:
        """Inspect rows ``todo`` (at ``pos`` in ``keep``; ``flows``: each one's flow, in
        ascending ``pos``); False: none was (fail closed)."""
        raise NotImplementedError

    def tick(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def returned(self, limit: int = 4096) -> list[tuple[int, bytes]]:
        return []

    def fileno(self) -> int | None:
        return None

    def status(self) -> dict:
        return {
            "engine": self.engine,
            "packets": self.packets,
            "note": self.note,
            "ended": {r: self.counts[f"ended_{r}"] for r in END_REASONS},
        }

    def stats(self) -> dict:
        return {"engine": self.engine, "ready": self.ready, **self.counts, "blocked_flows": len(self.blocked)}


class SuricataIds(_Inspection):
    """The IDS of one agent (see the module doc)."""

    def __init__(
        self, rules: str, packets: int, state_dir: str, host: str, netns: str | None, vnis, note: str = ""
    ):
        super().__init__(packets)
        self.rules = os.path.abspath(rules)
        if not os.path.isfile(self.rules):
            raise OSError(f"--ids-rules {rules}: no such file")
        self.netns = netns
        self.dir = os.path.join(os.path.abspath(state_dir), f"ids-{host.replace('/', '_')}")
        self.version = suricata_version()
        self.engine = f"suricata {self.version}" if self.version else "none"
        self.note = note if self.version else "--ids suricata: suricata is not installed: no IDS inspects"
        self.bypass_sids = bypass_sids(self.rules)
        self.vid = {int(v): i + 1 for i, v in enumerate(sorted(set(int(x) for x in vnis)))}
        self.vni = {i: v for v, i in self.vid.items()}
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.failed = False
        self.restarts = 0
        self._next_start = 0.0
        self._backoff = 1.0
        self._tx: socket.socket | None = None
        self._rx: socket.socket | None = None
        self._eve: Any = None
        self._eve_buf = b""
        self.active = self.version is not None

    # -- process and links -----------------------------------------------------------------
    def _ip(self, *args: str, check: bool = True) -> None:
        cmd = ["ip", *(["-n", self.netns] if self.netns else []), *args]
        subprocess.run(cmd, check=check, capture_output=True, timeout=30)

    def start(self) -> None:
        if not self.active:
            log.warning(self.note)
            return
        os.makedirs(self.dir, exist_ok=True)
        for a, b in ((TX, TX_PEER), (RX_PEER, RX)):
            self._ip("link", "del", a, check=False)
            self._ip("link", "add", a, "type", "veth", "peer", "name", b)
            for x in (a, b):
                self._ip("link", "set", x, "addrgenmode", "none", check=False)
                self._ip("link", "set", x, "up")
        with InNetns(self.netns) if self.netns else contextlib.nullcontext():
            self._tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._tx.bind((TX, 0))
            self._rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self._rx.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self._rx.bind((RX, 0))
            self._rx.setblocking(False)
            self._rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.config = write_config(self.dir, self.rules, os.path.join(self.dir, "suricata.log"))
        self._spawn()

    def _spawn(self) -> None:
        eve = os.path.join(self.dir, "eve.json")
        pre = ["ip", "netns", "exec", self.netns] if self.netns else []
        cmd = [*pre, "suricata", "-c", self.config, "--af-packet", "-l", self.dir, "-k", "none"]
        pidf = os.path.join(self.dir, "suricata.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidf)
        out = open(os.path.join(self.dir, "suricata.out"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.ready = False
        self._started = time.monotonic()
        if self._eve is None:
            open(eve, "ab").close()
            self._eve = open(eve, "rb")
            self._eve.seek(0, os.SEEK_END)
        log.info("IDS: %s started (pid %d), rules %s", self.engine, self.proc.pid, self.rules)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for s in (self._tx, self._rx, self._eve):
            if s is not None:
                s.close()
        self._tx = self._rx = self._eve = None
        if self.active:
            for a in (TX, RX_PEER):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    self._ip("link", "del", a, check=False)

    def tick(self) -> None:
        """Between batches: notice a dead Suricata, its readiness, read eve.json."""
        if not self.active:
            return
        p = self.proc
        if p is not None and p.poll() is not None:
            log.error(
                "IDS: suricata (pid %d) exited with %s: failing closed, restarting", p.pid, p.returncode
            )
            self.proc = None
            self.ready = False
            self.failed = True
            self._next_start = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 60.0)
        if self.proc is None and self._tx is not None and time.monotonic() >= self._next_start:
            self.restarts += 1
            self._spawn()
        if self.proc is not None and not self.ready:
            with contextlib.suppress(OSError):
                with open(os.path.join(self.dir, "suricata.log"), "rb") as f:
                    f.seek(max(0, os.path.getsize(f.name) - 65536))
                    tail = f.read()
                if tail.rfind(b"Engine started") > tail.rfind(b"This is Suricata"):
                    self.ready = True
                    self.failed = False
                    self._backoff = 1.0
                    log.info("IDS: suricata ready")
        self._read_eve()

    def _read_eve(self) -> None:
        if self._eve is None:
            return
        chunk = self._eve.read(1 << 20)
        if not chunk:
            return
        buf = self._eve_buf + chunk
        lines = buf.split(b"\n")
        self._eve_buf = lines.pop()
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event_type")
            if kind == "alert":
                self._alert(ev)
            elif kind == "drop":
                self.counts["drops"] += 1
            elif kind in ("tls", "ssh"):
                # the handshake is complete: with encryption-handling bypass, Suricata
                # inspects nothing more of this flow
                f = self._eve_flow(ev)
                if f is not None:
                    self._end(f, "encrypted")

    def _eve_flow(self, ev: dict) -> tuple | None:
        """The agent's key of the flow of eve record ``ev`` (VLAN -> tenant), or None."""
        vlan = ev.get("vlan") or [0]
        try:
            vni = self.vni.get(int(vlan[0]), -1)
            proto = {"TCP": 6, "UDP": 17}.get(str(ev.get("proto")), 0)
            a = (*_ip_key(ev["src_ip"]), int(ev.get("src_port", 0)))
            b = (*_ip_key(ev["dest_ip"]), int(ev.get("dest_port", 0)))
        except (ValueError, TypeError, KeyError, IndexError):
            return None
        return _flow(vni, proto, a, b)

    def _alert(self, ev: dict) -> None:
        self.counts["alerts"] += 1
        al = ev.get("alert", {})
        vlan = ev.get("vlan") or [0]
        vni = self.vni.get(int(vlan[0]), -1)
        self._record(
            {
                "event": "ids",
                "engine": self.engine,
                "time": ev.get("timestamp"),
                "tenant_vni": vni,
                "src": ev.get("src_ip"),
                "sport": ev.get("src_port"),
                "dst": ev.get("dest_ip"),
                "dport": ev.get("dest_port"),
                "proto": ev.get("proto"),
                "sid": al.get("signature_id"),
                "rev": al.get("rev"),
                "msg": al.get("signature"),
                "action": al.get("action"),
                "flow_id": ev.get("flow_id"),
            }
        )
        f = self._eve_flow(ev)
        if f is None:
            return
        if al.get("action") == "blocked":
            self._block(f)
        elif al.get("signature_id") in self.bypass_sids:
            self._end(f, "bypass")

    # -- the forwarding path -----------------------------------------------------------------
    def _inspect(self, batch, keys, todo, pos, flows, keep, ct) -> bool | None:
        """Write the frames ``todo`` to Suricata; the agent forwards none of them itself."""
        from ..overlay import decap

        keep[pos] = False
        if not self.ready or self._tx is None:
            self.counts["fail_closed"] += len(todo)
            return False
        sub = Batch.from_packets([batch.packet(int(i)) for i in todo])
        inner, tenant, err = decap(sub)
        for j in range(len(inner)):
            if err[j]:
                continue
            vid = self.vid.get(int(tenant[j]))
            if vid is None:
                continue
            fr = inner.packet(j)
            tagged = fr[:12] + struct.pack("!HH", 0x8100, vid) + fr[12:]
            try:
                self._tx.send(tagged)
                self.counts["packets_to_ids"] += 1
            except OSError:
                self.counts["fail_closed"] += 1
        return None

    def returned(self, limit: int = 4096) -> list[tuple[int, bytes]]:
        """Frames Suricata passed: (vni, inner Ethernet frame without the tag)."""
        out: list[tuple[int, bytes]] = []
        if self._rx is None:
            return out
        for _ in range(limit):
            try:
                data, anc, _fl, addr = self._rx.recvmsg(65535, socket.CMSG_SPACE(20))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            vid = None
            for lvl, typ, cd in anc:
                if lvl == SOL_PACKET and typ == PACKET_AUXDATA and len(cd) >= 20:
                    st, _l, _s, _m, _n, tci, _tp = struct.unpack("IIIHHHH", cd[:20])
                    if st & TP_STATUS_VLAN_VALID or tci:
                        vid = tci & 0xFFF
            if vid is None and len(data) >= 18 and data[12:14] == b"\x81\x00":
                vid = struct.unpack("!H", data[14:16])[0] & 0xFFF
                data = data[:12] + data[16:]
            vni = self.vni.get(vid) if vid is not None else None
            if vni is None:
                continue
            self.counts["packets_from_ids"] += 1
            out.append((vni, data))
        sent = self.counts["packets_to_ids"]
        self.counts["ids_drop"] = max(0, sent - self.counts["packets_from_ids"])
        return out

    def fileno(self) -> int | None:
        return self._rx.fileno() if self._rx is not None else None

    def status(self) -> dict:
        return {
            **super().status(),
            "pid": self.proc.pid if self.proc is not None else None,
            "running": bool(self.proc is not None and self.proc.poll() is None),
            "ready": self.ready,
            "failed_closed": self.failed,
            "restarts": self.restarts,
            "rules": self.rules,
            "bypass_sids": len(self.bypass_sids),
            "eve": os.path.join(self.dir, "eve.json") if self.active else None,
        }


class BuiltinIds(_Inspection):
    """The built-in signature matcher on each connection's first packets, in the agent's own
    batch (see the module doc). Rules outside its subset raise InputError (file and line)."""

    def __init__(self, rules: str, packets: int, note: str = ""):
        from ..offload.inspect import SignatureSet

        super().__init__(packets)
        self.rules = os.path.abspath(rules)
        self.sigs = SignatureSet.load(self.rules)
        self._by_sid = {s.sid: s for s in self.sigs.signatures}
        self.engine = "builtin"
        self.note = note
        self.ready = True
        self.active = True

    def _inspect(self, batch, keys, todo, pos, flows, keep, ct) -> bool | None:
        from ..offload.inspect import ALERT, DROP, PASS

        r = self.sigs.inspect(batch, keys, todo, ct)
        k = keys
        after = [0] * len(flows)  # rows of the same flow after each one in the batch
        later: dict[tuple, int] = {}
        for x in range(len(flows) - 1, -1, -1):
            after[x] = later.get(flows[x], 0)
            later[flows[x]] = after[x] + 1
        for j, i, f, aft in zip(pos.tolist(), todo.tolist(), flows, after, strict=True):
            st = self._seen.get(f)
            if f in self.blocked or st is None or st[2] is not None:
                continue  # blocked (divert drops it) or done with by an earlier row of the batch
            place = st[0] - aft  # its place among the flow's inspected packets
            self.counts["packets_to_ids"] += 1
            v = int(r.verdict[i])
            if v in (ALERT, DROP):
                tenant, proto = int(k.tenant[i]), int(k.proto[i])
                a = (int(k.src_hi[i]), int(k.src_lo[i]), int(k.sport[i]))
                b = (int(k.dst_hi[i]), int(k.dst_lo[i]), int(k.dport[i]))
                for sid in r.sids.get(i, (int(r.sid[i]),)):
                    s = self._by_sid.get(sid)
                    if s is None or s.action == PASS:
                        continue
                    self.counts["alerts"] += 1
                    self._record(
                        {
                            "event": "ids",
                            "engine": self.engine,
                            "time": _now_iso(),
                            "tenant_vni": tenant,
                            "src": addr_to_text(a[0], a[1]),
                            "sport": a[2],
                            "dst": addr_to_text(b[0], b[1]),
                            "dport": b[2],
                            "proto": {6: "TCP", 17: "UDP"}.get(proto, str(proto)),
                            "sid": sid,
                            "rev": s.rev,
                            "msg": s.msg,
                            "action": "blocked" if v == DROP else "allowed",
                            "flow_id": None,
                        }
                    )
            if v == DROP:
                keep[j] = False
                self.counts["ids_drop"] += 1
                self.counts["drops"] += 1
                self._block(f, j, place)
            elif v == PASS:
                self._end(f, "bypass", place)  # a pass rule: the flow is not inspected further
            elif int(r.encrypted[i]):
                self._end(f, "encrypted", place)
        return None

    def status(self) -> dict:
        return {
            **super().status(),
            "running": True,
            "ready": True,
            "rules": self.rules,
            "signatures": len(self.sigs),
        }


def make(
    kind: str, rules: str, packets: int, state_dir: str, host: str, netns: str | None, vnis
) -> _Inspection:
    """The engine ``--ids kind`` runs: ``suricata``; ``builtin``; ``auto`` -- Suricata where it
    is installed, else the built-in matcher. ``status()["note"]`` says why."""
    if kind not in ENGINES:
        raise ValueError(f"--ids must be one of {', '.join(ENGINES)}")
    if kind == "builtin":
        return BuiltinIds(rules, packets, "--ids builtin")
    if kind == "auto":
        v = suricata_version()
        if v is None:
            return BuiltinIds(
                rules, packets, "--ids auto: suricata is not installed: the built-in matcher inspects"
            )
        return SuricataIds(
            rules, packets, state_dir, host, netns, vnis, note=f"--ids auto: suricata {v} is installed"
        )
    return SuricataIds(rules, packets, state_dir, host, netns, vnis, note="--ids suricata")
