"""Suricata in the live datapath (``microseg agent --ids suricata``; docs/inspection.md).

The agent owns two veth pairs in its host's namespace, ``msids0``-``msidsa`` and
``msidsb``-``msids1``, and runs Suricata as its own process in AF_PACKET IPS copy mode between
``msidsa`` and ``msidsb``. An allowed frame of a connection still under inspection (its first
``packets`` packets, both directions counted) is written into ``msids0`` as its inner Ethernet
frame with an 802.1Q tag that stands for its tenant (tenants may share addresses; Suricata
tracks flows per VLAN); what Suricata passes comes back on ``msids1`` and is routed as it would
have been; what it drops never comes back. Suricata's eve.json is tailed between batches: its
alerts go to the agent's flow log and counters, and a connection Suricata blocked (a ``drop``
rule) is blocked by the agent too, also after it left the inspected path.

If Suricata is not installed the agent forwards without an IDS (``status`` says engine
``none`` and why); it does not stop. If Suricata dies
while the agent runs, frames under inspection are dropped (fail closed) and it is restarted
with a backoff.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from typing import Any

import numpy as np

from ..packet.batch import Batch
from .netns import InNetns

log = logging.getLogger("microseg.agent.ids")

TX, TX_PEER, RX_PEER, RX = "msids0", "msidsa", "msidsb", "msids1"
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
BLOCK_SECONDS = 300.0
ENGINES = ("suricata",)


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
        "outputs:\n  - eve-log:\n      enabled: yes\n      filetype: regular\n"
        "      filename: eve.json\n      types:\n        - alert\n        - drop:\n"
        "            alerts: yes\n            flows: all\n        - flow\n"
        "logging:\n  default-log-level: notice\n  outputs:\n    - console:\n        enabled: no\n"
        f"    - file:\n        enabled: yes\n        filename: {netns_log}\n"
        # Suricata 7 in IPS mode drops a flow on a parser or memcap exception by default
        # ("auto"); here the policy decides what may flow, the rules what is stopped
        "exception-policy: ignore\n"
        "runmode: workers\n"
        f"af-packet:\n{iface(TX_PEER, RX_PEER, 98)}{iface(RX_PEER, TX_PEER, 97)}"
        "vlan:\n  use-for-tracking: true\n"
        "app-layer:\n  protocols:\n    http:\n      enabled: yes\n    tls:\n      enabled: yes\n"
        "      encryption-handling: bypass\n"
        "stream:\n  inline: auto\n  midstream: false\n  reassembly:\n    depth: 1mb\n"
        "unix-command:\n  enabled: no\n"
    )
    path = os.path.join(folder, "suricata.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


class SuricataIds:
    """The IDS of one agent (see the module doc)."""

    def __init__(self, rules: str, packets: int, state_dir: str, host: str, netns: str | None, vnis):
        self.rules = os.path.abspath(rules)
        if not os.path.isfile(self.rules):
            raise OSError(f"--ids-rules {rules}: no such file")
        self.packets = max(1, int(packets))
        self.netns = netns
        self.dir = os.path.join(os.path.abspath(state_dir), f"ids-{host.replace('/', '_')}")
        self.version = suricata_version()
        self.engine = f"suricata {self.version}" if self.version else "none"
        self.note = "" if self.version else "--ids suricata: suricata is not installed: no IDS inspects"
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
        self._seen: dict[tuple, int] = {}
        self.blocked: dict[tuple, float] = {}
        self.events: list[dict] = []  # alert records for the flow log, taken by the agent
        self.counts = {
            "alerts": 0,
            "drops": 0,
            "packets_to_ids": 0,
            "packets_from_ids": 0,
            "ids_drop": 0,
            "ids_blocked": 0,
            "fail_closed": 0,
            "left_ids": 0,
        }
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

    def _alert(self, ev: dict) -> None:
        self.counts["alerts"] += 1
        al = ev.get("alert", {})
        vlan = ev.get("vlan") or [0]
        vni = self.vni.get(int(vlan[0]), -1)
        rec = {
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
        self.events.append(rec)
        if len(self.events) > 10000:
            del self.events[:-10000]
        if al.get("action") == "blocked":
            proto = {"TCP": 6, "UDP": 17}.get(str(ev.get("proto")), 0)
            with contextlib.suppress(ValueError, TypeError):
                a = (*_ip_key(ev["src_ip"]), int(ev.get("src_port", 0)))
                b = (*_ip_key(ev["dest_ip"]), int(ev.get("dest_port", 0)))
                self.blocked[_flow(vni, proto, a, b)] = time.monotonic() + BLOCK_SECONDS

    # -- the forwarding path -----------------------------------------------------------------
    def divert(self, batch: Batch, keys, rows: np.ndarray) -> np.ndarray:
        """Of the allowed frames ``rows`` of ``batch`` (tunnelled; ``keys`` parsed): those
        under inspection are written to Suricata (or dropped: Suricata down, flow blocked).
        Returns a mask over ``rows``: True for the frames the agent still forwards itself."""
        keep = np.ones(rows.size, bool)
        if not self.active:
            return keep
        from ..overlay import decap

        now = time.monotonic()
        if self.blocked:
            for f, t in list(self.blocked.items()):
                if t < now:
                    del self.blocked[f]
        todo = []
        k = keys
        for j, i in enumerate(rows.tolist()):
            a = (int(k.src_hi[i]), int(k.src_lo[i]), int(k.sport[i]))
            b = (int(k.dst_hi[i]), int(k.dst_lo[i]), int(k.dport[i]))
            f = _flow(int(k.tenant[i]), int(k.proto[i]), a, b)
            if self.blocked and f in self.blocked:
                keep[j] = False
                self.counts["ids_blocked"] += 1
                continue
            c = self._seen.get(f, 0)
            if c >= self.packets:
                continue
            self._seen[f] = c + 1
            if c + 1 == self.packets:
                self.counts["left_ids"] += 1
            keep[j] = False
            todo.append(i)
        if len(self._seen) > 200_000:
            self._seen.clear()
        if not todo:
            return keep
        if not self.ready or self._tx is None:
            self.counts["fail_closed"] += len(todo)
            return keep
        sub = Batch.from_packets([batch.packet(i) for i in todo])
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
        return keep

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
            "engine": self.engine,
            "pid": self.proc.pid if self.proc is not None else None,
            "running": bool(self.proc is not None and self.proc.poll() is None),
            "ready": self.ready,
            "failed_closed": self.failed,
            "restarts": self.restarts,
            "packets": self.packets,
            "rules": self.rules,
            "note": self.note,
            "eve": os.path.join(self.dir, "eve.json") if self.active else None,
        }

    def stats(self) -> dict:
        return {"engine": self.engine, "ready": self.ready, **self.counts, "blocked_flows": len(self.blocked)}
