"""The kernel fast path (src/microseg/bpf): the committed object rebuilds byte for byte, the
kernel's BPF_PROG_TEST_RUN agrees with the Python model on random and malformed frames, and
on live veths offloaded flows bypass the host while misses reach AF_PACKET."""

from __future__ import annotations

import ctypes
import os
import queue
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livelab import netns_skip_reason, wait_for
from microseg.bpf import loader as L
from microseg.bpf import model as M
from microseg.bpf.loader import FlowAction, FlowKey, KernelFastPath, vxlan_template
from microseg.packet import build as B

BPF_DIR = Path(L.__file__).parent
PREFIX = "msbpf-"
BUILT_WITH = "Debian clang version 14."  # what built the committed fastpath.bpf.o


# ---------------------------------------------------------------------------------------------
# layout and build (no kernel needed)
# ---------------------------------------------------------------------------------------------
def test_layouts_match_the_object():
    obj = L.read_object(L.object_bytes())
    assert obj.license == "Dual BSD/GPL"
    assert set(obj.progs) == {"xdp_fastpath", "xdp_pass"}
    flows, ports, stats = obj.maps["ms_flows"], obj.maps["ms_ports"], obj.maps["ms_stats"]
    assert (flows.key_size, flows.value_size) == (L.FLOW_KEY.size, L.FLOW_VALUE.size) == (48, 112)
    assert (ports.key_size, ports.value_size) == (4, L.PORT_VALUE.size)
    assert stats.max_entries == len(L.STATS)
    assert all(m in {"ms_flows", "ms_ports", "ms_stats"} for p in obj.progs.values() for _, m in p.relocs)
    for k in (
        FlowKey(3, 7, "10.0.0.1", "10.0.0.2", 17, 1000, 53),
        FlowKey(9, 9, "fd00::1", "fd00::2", 58, 5, 0x8000, True),
    ):
        assert FlowKey.unpack(k.pack()) == k


def test_object_rebuilds_byte_for_byte(tmp_path):
    clang, strip = shutil.which("clang"), shutil.which("llvm-strip")
    if clang is None or strip is None:
        pytest.skip("clang and llvm-strip not installed (apt-get install clang llvm)")
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    if not version.startswith(BUILT_WITH):
        pytest.skip(f"{version} is not the compiler of the committed object ({BUILT_WITH}): other bytes")
    # the Makefile's own recipe, in a copy of the tree's layout somewhere else
    root = BPF_DIR.parents[2]
    if not (root / "Makefile").exists():
        pytest.skip("not a source checkout (no Makefile)")
    out = tmp_path / "src" / "microseg" / "bpf"
    out.mkdir(parents=True)
    shutil.copy(root / "Makefile", tmp_path / "Makefile")
    shutil.copy(BPF_DIR / "fastpath.bpf.c", out / "fastpath.bpf.c")
    r = subprocess.run(["make", "-s", "-C", str(tmp_path), "bpf"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "fastpath.bpf.o").read_bytes() == (BPF_DIR / "fastpath.bpf.o").read_bytes(), (
        "the committed fastpath.bpf.o differs from a rebuild: run make bpf and commit it"
    )


# ---------------------------------------------------------------------------------------------
# BPF_PROG_TEST_RUN against the model
# ---------------------------------------------------------------------------------------------
def _bpf_skip_reason() -> str | None:
    ok, why = KernelFastPath.available()
    if not ok:
        return why
    return netns_skip_reason(PREFIX + "p")


class NetnsWorker:
    """A thread inside a network namespace running the calls we hand it (BPF_PROG_TEST_RUN
    needs a real ingress device there)."""

    def __init__(self, path: str):
        self.q: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        self.t = threading.Thread(target=self._main, args=(path,), daemon=True)
        self.t.start()
        err = self.ready.get(timeout=30)
        if err:
            raise RuntimeError(err)

    def _main(self, path: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        rc = libc.setns(fd, 0x40000000)
        os.close(fd)
        self.ready.put(None if rc == 0 else f"setns: {os.strerror(ctypes.get_errno())}")
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, box = item
            try:
                box.put((True, fn()))
            except BaseException as exc:
                box.put((False, exc))

    def call(self, fn):
        box: queue.Queue = queue.Queue()
        self.q.put((fn, box))
        ok, v = box.get(timeout=60)
        if not ok:
            raise v
        return v

    def stop(self):
        self.q.put(None)
        self.t.join(timeout=10)


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _ifindex(ns: str, dev: str) -> int:
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "dev", dev], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split(":", 1)[0])


MAC_W0, MAC_W1 = bytes.fromhex("020000000a01"), bytes.fromhex("020000000a02")
LOCAL_IP, PEER_IP, OTHER_IP = "192.0.2.1", "192.0.2.2", "192.0.2.9"
Z0, Z1 = 100, 200


class Rig:
    """The loaded program, its ports and a set of random flows, and the model's view."""

    def __init__(self, fp: KernelFastPath, worker: NetnsWorker, idx: dict[str, int]):
        self.fp, self.worker, self.idx = fp, worker, idx
        self.ports: dict[int, bytes] = {}
        self.flows: dict[bytes, bytes] = {}
        self.specs: list[dict] = []

    def port(self, ifindex: int, value: bytes) -> None:
        self.fp.maps["ms_ports"].update(struct.pack("<I", ifindex), value)
        self.ports[ifindex] = value

    def flow(self, key: FlowKey, action: FlowAction, spec: dict) -> None:
        self.fp.install(key, action)
        self.flows[key.pack()] = action.pack()
        self.specs.append(spec)

    def run(self, frame: bytes, ingress: int) -> L.TestRun:
        return self.worker.call(lambda: self.fp.test_run(frame, ingress))

    def counters(self, key: bytes | None) -> tuple[dict[str, int], tuple[int, int] | None]:
        stats = self.fp.stats()
        flow = None
        if key is not None:
            v = self.fp.maps["ms_flows"].lookup(key)
            if v is not None:
                p, b, _ = struct.unpack_from("<QQQ", v, L.COUNTERS_OFFSET)
                flow = (p, b)
        return stats, flow


def _random_addr(rng: random.Random, fam: int) -> str:
    if fam == 4:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return "fd00::" + ":".join(f"{rng.randrange(65536):x}" for _ in range(3))


def _build_rig(fp: KernelFastPath, worker: NetnsWorker, idx: dict[str, int]) -> Rig:
    rig = Rig(fp, worker, idx)
    w0, w1, u0 = idx["w0"], idx["w1"], idx["u0"]
    rig.port(w0, L.PORT_VALUE.pack(L.ROLE_WORKLOAD, Z0, MAC_W0, b"\0" * 4))
    rig.port(w1, L.PORT_VALUE.pack(L.ROLE_WORKLOAD, Z1, MAC_W1, b"\0" * 4))
    rig.port(u0, L.PORT_VALUE.pack(L.ROLE_UNDERLAY, 0, b"\0" * 6, socket.inet_aton(LOCAL_IP)))
    rng = random.Random(4789)
    for i in range(48):
        fam = rng.choice((4, 6))
        proto = rng.choice((6, 17, 17, 1 if fam == 4 else 58))
        src, dst = _random_addr(rng, fam), _random_addr(rng, fam)
        if proto in (1, 58):
            t = rng.choice((8, 0) if proto == 1 else (128, 129))
            sport, dport = rng.randrange(65536), t << 8
        else:
            sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        ingress = rng.choice(("w0", "w1", "tun"))
        dmac = bytes([2, 0, 0, 0, 0xB0, i])
        if ingress == "tun":
            vni = rng.choice((Z0, Z1, 77))
            key = FlowKey(vni, vni, src, dst, proto, sport, dport, tunnel=True)
            kind = rng.choice(("decap", "decap", "decap", "drop", "encap"))
        else:
            port = idx[ingress]
            key = FlowKey(port, Z0 if ingress == "w0" else Z1, src, dst, proto, sport, dport)
            kind = rng.choice(("encap", "encap", "local", "local", "drop", "decap"))
        out = rng.choice((w0, w1, u0, 4242))
        tmpl = vxlan_template(
            "02:00:00:00:00:55",
            "02:00:00:00:00:66",
            LOCAL_IP,
            PEER_IP,
            key.zone,
            sport=rng.choice((0, 0, 50000)),
        )
        mtu = rng.choice((0, 0, 1500, 120, 100))  # the short ones stop the longer frames
        action = FlowAction(
            kind, ifindex=out, mac=dmac, peer_ip=PEER_IP, template=tmpl if kind == "encap" else b"", mtu=mtu
        )
        rig.flow(key, action, {"key": key, "kind": kind, "dmac": dmac, "i": i})
    return rig


@pytest.fixture(scope="module")
def rig():
    why = _bpf_skip_reason()
    if why:
        pytest.skip(why)
    ns = f"{PREFIX}tr-{os.getpid()}"
    _sh("ip", "netns", "add", ns)
    worker = None
    fp = KernelFastPath()
    try:
        for a, b in (("w0", "w0p"), ("w1", "w1p"), ("u0", "u0p")):
            _sh("ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
        idx = {d: _ifindex(ns, d) for d in ("w0", "w1", "u0")}
        worker = NetnsWorker(f"/run/netns/{ns}")
        fp.load(name=f"test-{os.getpid()}")
        yield _build_rig(fp, worker, idx)
    finally:
        pin_dir = fp.pin_dir
        fp.close()
        if pin_dir:
            assert not os.path.exists(pin_dir)
        if worker:
            worker.stop()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _inner(spec: dict, d: dict) -> bytes:
    key: FlowKey = spec["key"]
    src, dst = key.src, key.dst
    if not d["hit"]:
        src = d["other_src"] if ":" not in src else "fd00::dead"
    smac = d["smac"] if d["smac"] is not None else (MAC_W0 if key.port != 0 and key.zone == Z0 else MAC_W1)
    dmac = d["dmac"] if d["dmac"] is not None else spec["dmac"]
    payload = d["payload"]
    if key.proto == 6:
        seg = B.tcp(key.sport, key.dport, payload, src=src, dst=dst, flags=d["tcp_flags"])
    elif key.proto == 17:
        seg = B.udp(key.sport, key.dport, payload, src=src, dst=dst)
    elif key.proto == 1:
        seg = B.icmp(key.dport >> 8, key.dport & 0xFF, struct.pack("!HH", key.sport, 1), payload)
    else:
        seg = B.icmpv6(
            key.dport >> 8, key.dport & 0xFF, struct.pack("!HH", key.sport, 1), payload, src=src, dst=dst
        )
    if ":" in src:
        nh = key.proto if not d["v6ext"] else 0
        body = seg if not d["v6ext"] else bytes([key.proto, 0]) + b"\x01\x04\0\0\0\0" + seg
        l3 = B.ipv6(src, dst, nh, body)
    else:
        l3 = B.ipv4(
            src,
            dst,
            key.proto,
            seg,
            mf=d["frag"] == "mf",
            frag_off=5 if d["frag"] == "off" else 0,
            options=b"\x01\x01\x01\x00" if d["ipopt"] else b"",
        )
    return B.ethernet(
        l3, 0x86DD if ":" in src else 0x0800, src=smac, dst=dmac, vlans=[5] if d["vlan"] else []
    )


def _outer(inner: bytes, vni: int, d: dict) -> bytes:
    flags = d["vx_flags"]
    vx = bytes([flags, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"
    udp = B.udp(
        d["vx_sport"], d["vx_dport"], vx + inner, src=d["outer_src"], dst=d["outer_dst"], zero_checksum=True
    )
    l3 = B.ipv4(d["outer_src"], d["outer_dst"], 17, udp, df=True, mf=d["outer_frag"])
    return B.ethernet(l3, 0x0800, src="02:00:00:00:00:66", dst="02:00:00:00:00:55")


frame_desc = st.fixed_dictionaries(
    {
        "flow": st.integers(0, 47),
        "hit": st.booleans() | st.just(True),
        "other_src": st.sampled_from(["10.255.255.254", "10.1.2.3"]),
        "smac": st.none() | st.none() | st.sampled_from([MAC_W0, MAC_W1, bytes(6)]),
        "dmac": st.none() | st.none() | st.sampled_from([MAC_W0, b"\xff" * 6]),
        "payload": st.binary(max_size=80),
        "tcp_flags": st.sampled_from(["A", "PA", "A", "S", "SA", "F", "FA", "R", "RA", "U"]),
        "frag": st.sampled_from([None, None, None, None, "mf", "off"]),
        "ipopt": st.sampled_from([False, False, False, True]),
        "v6ext": st.sampled_from([False, False, False, True]),
        "vlan": st.sampled_from([False, False, False, False, True]),
        "ingress": st.sampled_from(["auto", "auto", "auto", "auto", "w0", "w1", "u0", "lo"]),
        "vx_flags": st.sampled_from([0x08, 0x08, 0x08, 0x08, 0x00, 0x0C]),
        "vx_dport": st.sampled_from([4789, 4789, 4789, 4789, 4790, 6081]),
        "vx_sport": st.integers(1, 65535),
        "vni_delta": st.sampled_from([0, 0, 0, 0, 1]),
        "outer_src": st.sampled_from([PEER_IP, PEER_IP, PEER_IP, OTHER_IP]),
        "outer_dst": st.sampled_from([LOCAL_IP, LOCAL_IP, LOCAL_IP, OTHER_IP]),
        "outer_frag": st.sampled_from([False, False, False, False, True]),
        "cut": st.none() | st.none() | st.none() | st.integers(0, 200),
        "flip": st.none() | st.none() | st.none() | st.tuples(st.integers(0, 200), st.integers(1, 255)),
        "pad": st.sampled_from([0, 0, 0, 0, 3]),
    }
)


def _frame(rig: Rig, d: dict) -> tuple[bytes, int]:
    spec = rig.specs[d["flow"]]
    key: FlowKey = spec["key"]
    inner = _inner(spec, d)
    if key.tunnel:
        frame = _outer(inner, key.port + d["vni_delta"], d)
        ingress = rig.idx["u0"]
    else:
        frame = inner
        ingress = key.port
    if d["ingress"] == "lo":
        ingress = 1
    elif d["ingress"] != "auto":
        ingress = rig.idx[d["ingress"]]
    frame += b"\0" * d["pad"]
    if d["flip"] is not None:
        pos, x = d["flip"]
        if pos < len(frame):
            b = bytearray(frame)
            b[pos] ^= x
            frame = bytes(b)
    if d["cut"] is not None:
        frame = frame[: max(14, d["cut"])]
    return frame, ingress


def _check(rig: Rig, frame: bytes, ingress: int) -> M.Result:
    want = M.run(rig.flows, rig.ports, frame, ingress)
    before, fb = rig.counters(want.flow_key)
    got = rig.run(frame, ingress)
    after, fa = rig.counters(want.flow_key)
    what = f"frame {frame.hex()} on ifindex {ingress}: model {L.XDP_NAMES[want.verdict]} ({want.reason})"
    assert got.retval == want.verdict, what + f", kernel {L.XDP_NAMES.get(got.retval, got.retval)}"
    assert got.data == want.frame, (
        what + f": output differs\nkernel {got.data.hex()}\nmodel  {want.frame.hex()}"
    )
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved == {want.reason: 1}, what + f": counters moved {moved}"
    if want.flow_key is not None:
        assert fb is not None and fa is not None
        assert (fa[0] - fb[0], fa[1] - fb[1]) == (1, want.nbytes), what
    return want


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(d=frame_desc)
def test_kernel_matches_model_on_random_frames(rig, d):
    frame, ingress = _frame(rig, d)
    want = _check(rig, frame, ingress)
    if want.verdict == L.XDP_REDIRECT:
        spec_out = M.FLOW_VALUE.unpack(rig.flows[want.flow_key])[1]
        assert want.redirect_ifindex == spec_out


def _clean(**over) -> dict:
    d = {
        "hit": True,
        "other_src": "10.1.2.3",
        "smac": None,
        "dmac": None,
        "payload": b"p" * 18,
        "tcp_flags": "PA",
        "frag": None,
        "ipopt": False,
        "v6ext": False,
        "vlan": False,
        "ingress": "auto",
        "vx_flags": 0x08,
        "vx_dport": 4789,
        "vx_sport": 51000,
        "vni_delta": 0,
        "outer_src": PEER_IP,
        "outer_dst": LOCAL_IP,
        "outer_frag": False,
        "cut": None,
        "flip": None,
        "pad": 0,
    }
    d.update(over)
    return d


def test_every_action_hits_and_every_truncation_passes(rig):
    seen = set()
    for i, spec in enumerate(rig.specs):
        frame, ingress = _frame(rig, _clean(flow=i))
        want = _check(rig, frame, ingress)
        seen.add((spec["kind"], spec["key"].tunnel, want.reason))
        if want.reason in ("redirect", "tx") and spec["kind"] == "encap":
            outer = want.frame
            assert M.ipv4_header_checksum(outer[14:34]) == 0  # a valid header sums to zero
            assert struct.unpack("!H", outer[16:18])[0] == len(outer) - 14
        for cut in range(14, len(frame)):
            w = _check(rig, frame[:cut], ingress)
            assert w.verdict == L.XDP_PASS, f"a frame cut to {cut} bytes was forwarded"
    reasons = {r for _, _, r in seen}
    assert {"redirect", "tx", "drop", "pass_action", "pass_too_big"} <= reasons, seen


def test_encap_source_port_from_flow_hash(rig):
    checked = 0
    for i, spec in enumerate(rig.specs):
        if spec["kind"] != "encap" or spec["key"].tunnel:
            continue
        frame, ingress = _frame(rig, _clean(flow=i))
        want = _check(rig, frame, ingress)
        if want.reason == "pass_too_big":
            continue
        checked += 1
        tmpl_sport = M.FLOW_VALUE.unpack(rig.flows[want.flow_key])[9][34:36]
        sport = struct.unpack("!H", want.frame[34:36])[0]
        if tmpl_sport == b"\0\0":
            assert sport == M.flow_port(want.flow_key) and sport >= 49152
        else:
            assert sport == 50000
    assert checked >= 3


def test_encap_without_headroom_passes_in_the_model():
    ports = {5: L.PORT_VALUE.pack(L.ROLE_WORKLOAD, 1, MAC_W0, b"\0" * 4)}
    key = FlowKey(5, 1, "10.0.0.1", "10.0.0.2", 17, 1, 2)
    act = FlowAction("encap", 9, template=vxlan_template(MAC_W0, MAC_W1, LOCAL_IP, PEER_IP, 1))
    frame = B.udp_packet("10.0.0.1", "10.0.0.2", 1, 2, eth_src=MAC_W0)
    r = M.run({key.pack(): act.pack()}, ports, frame, 5, headroom=16)
    assert (r.verdict, r.frame, r.reason) == (L.XDP_PASS, frame, "pass_headroom")
    assert M.run({key.pack(): act.pack()}, ports, frame, 5).verdict == L.XDP_REDIRECT


def test_failed_load_leaves_nothing(tmp_path):
    why = _bpf_skip_reason()
    if why:
        pytest.skip(why)
    data = bytearray(L.object_bytes())
    obj = L.read_object(bytes(data))
    # break the fast path's first instruction into an invalid opcode: the verifier refuses
    pname = f"{PREFIX}bad-{os.getpid()}"
    prog = obj.progs["xdp_fastpath"]
    at = bytes(data).find(bytes(prog.insns[:64]))
    data[at] = 0xFF
    fp = KernelFastPath(bytes(data))
    with pytest.raises(L.BpfError, match="verifier refused program xdp_fastpath"):
        fp.load(name=pname)
    assert not os.path.exists(f"{L.DEFAULT_PIN_ROOT}/{pname}") or not os.listdir(
        f"{L.DEFAULT_PIN_ROOT}/{pname}"
    )
    assert not fp.maps and not fp.prog_fds


def test_bench_prog_test_run(rig):
    """ns per packet of a 64-byte hit (local redirect, the frame left as it is, so every
    repeat hits) and a miss, as the kernel's BPF_PROG_TEST_RUN times them."""
    w0, w1 = rig.idx["w0"], rig.idx["w1"]
    key = FlowKey(w0, Z0, "10.0.0.1", "10.0.0.2", 17, 1000, 2000)
    rig.flow(
        key,
        FlowAction("local", ifindex=w1, mac=MAC_W1),
        {"key": key, "kind": "local", "dmac": MAC_W1, "i": -1},
    )
    frame, ingress = (
        B.udp_packet("10.0.0.1", "10.0.0.2", 1000, 2000, b"x" * 18, eth_src=MAC_W0, eth_dst=MAC_W1),
        w0,
    )
    assert len(frame) == 60
    frame += b"\0" * 4  # 64 bytes on the wire less the FCS... as received: 60 + padding
    assert M.run(rig.flows, rig.ports, frame, ingress).reason == "redirect"
    miss = bytearray(frame)
    miss[26] ^= 1  # another source address
    n = int(os.environ.get("MICROSEG_BPF_BENCH_REPEAT", "100000"))
    hit = rig.worker.call(lambda: rig.fp.test_run(frame, ingress, repeat=n))
    mis = rig.worker.call(lambda: rig.fp.test_run(bytes(miss), ingress, repeat=n))
    print(
        f"\nBPF_PROG_TEST_RUN x{n}: {len(frame)}-byte hit {hit.duration_ns} ns/packet, miss {mis.duration_ns} ns/packet"
    )
    assert hit.retval in (L.XDP_REDIRECT, L.XDP_TX) and mis.retval == L.XDP_PASS


# ---------------------------------------------------------------------------------------------
# live: two workload namespaces through a "host" namespace
# ---------------------------------------------------------------------------------------------
SNIFF = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.5)
port = int(sys.argv[2]); forbid = int(sys.argv[3])
print("READY", flush=True)
end = time.monotonic() + float(sys.argv[4])
seen = bad = 0
while time.monotonic() < end:
    try:
        d = s.recv(2048)
    except socket.timeout:
        continue
    if len(d) >= 38 and d[12:14] == b"\x08\x00" and d[23] == 17:
        dp = struct.unpack("!H", d[36:38])[0]
        if dp == port: seen += 1
        if dp == forbid: bad += 1
    if seen:
        break
print("SEEN", seen, "BAD", bad, flush=True)
"""

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("READY", flush=True)
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""

UDP_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(0.5)
got = 0
end = time.monotonic() + float(sys.argv[5])
while time.monotonic() < end and got < int(sys.argv[4]):
    s.sendto(b"ping %d" % got, (sys.argv[1], int(sys.argv[3])))
    try:
        d, _ = s.recvfrom(2048)
        if d.startswith(b"ping"): got += 1
    except socket.timeout:
        pass
print("GOT", got, flush=True)
"""


def _nsenter(ns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *cmd]


def _nsrun(ns: str, *cmd: str) -> None:
    _sh(*_nsenter(ns, *cmd))


@pytest.fixture
def lab():
    why = _bpf_skip_reason()
    if why:
        pytest.skip(why)
    for tool in ("nsenter", "ethtool"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    tag = str(os.getpid())[-5:]
    names = {"host": f"{PREFIX}h{tag}", "a": f"{PREFIX}a{tag}", "b": f"{PREFIX}b{tag}"}
    procs: list[subprocess.Popen] = []
    fp = KernelFastPath()
    state = {"names": names, "procs": procs, "fp": fp}
    try:
        for ns in names.values():
            _sh("ip", "netns", "add", ns)
        h = names["host"]
        for w, ip, mac in (("a", "10.9.0.1", "02:00:00:00:0a:01"), ("b", "10.9.0.2", "02:00:00:00:0b:01")):
            _sh(
                "ip",
                "-n",
                h,
                "link",
                "add",
                f"h{w}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                names[w],
            )
            _sh("ip", "-n", names[w], "link", "set", "eth0", "address", mac)
            _sh("ip", "-n", names[w], "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", names[w], "link", "set", "eth0", "up")
            _sh("ip", "-n", names[w], "link", "set", "lo", "up")
            _sh("ip", "-n", h, "link", "set", f"h{w}", "up")
            _nsrun(names[w], "ethtool", "-K", "eth0", "tx", "off")
        _sh(
            "ip",
            "-n",
            names["a"],
            "neigh",
            "add",
            "10.9.0.2",
            "lladdr",
            "02:00:00:00:0b:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        )
        _sh(
            "ip",
            "-n",
            names["b"],
            "neigh",
            "add",
            "10.9.0.1",
            "lladdr",
            "02:00:00:00:0a:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        )
        fp.load(name=f"live-{tag}")
        yield state
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        try:
            fp.close()
        finally:
            for ns in names.values():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _start(state, ns: str, code: str, *args) -> subprocess.Popen:
    p = subprocess.Popen(
        _nsenter(ns, sys.executable, "-I", "-c", code, *map(str, args)), stdout=subprocess.PIPE, text=True
    )
    state["procs"].append(p)
    line = p.stdout.readline()
    assert line.strip() == "READY", line
    return p


def test_live_offloaded_udp_bypasses_the_host_and_misses_pass(lab):
    fp: KernelFastPath = lab["fp"]
    names = lab["names"]
    h, a, b = names["host"], names["a"], names["b"]
    ha, hb = _ifindex(h, "ha"), _ifindex(h, "hb")
    ea, eb = _ifindex(a, "eth0"), _ifindex(b, "eth0")
    netns = f"/run/netns/{h}"
    fp.attach(ha, "ha", netns=netns)
    fp.attach(hb, "hb", netns=netns)
    fp.attach(ea, "eth0", program="xdp_pass", netns=f"/run/netns/{a}")
    fp.attach(eb, "eth0", program="xdp_pass", netns=f"/run/netns/{b}")
    out = subprocess.run(["ip", "-n", h, "link", "show", "dev", "ha"], capture_output=True, text=True).stdout
    assert "xdp " in out or "xdpdrv" in out, out  # native mode
    mac_a, mac_b = "02:00:00:00:0a:01", "02:00:00:00:0b:01"
    fp.add_workload_port(ha, 7, mac_a)
    fp.add_workload_port(hb, 7, mac_b)
    fwd = FlowKey(ha, 7, "10.9.0.1", "10.9.0.2", 17, 40000, 7000)
    rev = FlowKey(hb, 7, "10.9.0.2", "10.9.0.1", 17, 7000, 40000)
    fp.install(fwd, FlowAction("local", ifindex=hb, mac=mac_b))
    fp.install(rev, FlowAction("local", ifindex=ha, mac=mac_a))
    # the host side sniffs ha: it must see the miss (port 7001) and never the offloaded flow
    sniff = _start(lab, h, SNIFF, "ha", 7001, 7000, 60)
    _start(lab, b, UDP_ECHO, 7000)
    client = subprocess.run(
        _nsenter(a, sys.executable, "-I", "-c", UDP_CLIENT, "10.9.0.2", "40000", "7000", "20", "60"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert client.stdout.split() == ["GOT", "20"], client.stdout + client.stderr
    flows = wait_for(
        lambda: (f := fp.read_flows()) and f[fwd].packets >= 20 and f[rev].packets >= 20 and f,
        30,
        "the offloaded flow's counters",
    )
    assert flows[fwd].bytes >= 20 * 42 and flows[fwd].last_seen_ns > 0
    # a miss: UDP to port 7001 is no installed flow, so XDP_PASS hands it to the host's stack
    _nsrun(
        a,
        sys.executable,
        "-I",
        "-c",
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'miss', ('10.9.0.2', 7001))",
    )
    out_line = sniff.stdout.readline().split()
    assert out_line[:2] == ["SEEN", "1"] and out_line[3] == "0", out_line
    assert fp.stats()["pass_miss"] >= 1 and fp.stats()["redirect"] >= 40
    fp.close()
    out = subprocess.run(["ip", "-n", h, "link", "show", "dev", "ha"], capture_output=True, text=True).stdout
    assert "xdp" not in out, out


@pytest.fixture
def vxlab():
    """Two hosts (namespaces) joined by an underlay veth, one workload behind each."""
    why = _bpf_skip_reason()
    if why:
        pytest.skip(why)
    for tool in ("nsenter", "ethtool"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    tag = str(os.getpid())[-5:]
    names = {k: f"{PREFIX}v{k}{tag}" for k in ("h1", "h2", "a", "b")}
    procs: list[subprocess.Popen] = []
    fps = {"h1": KernelFastPath(), "h2": KernelFastPath()}
    state = {"names": names, "procs": procs, "fps": fps}
    try:
        for ns in names.values():
            _sh("ip", "netns", "add", ns)
        _sh(
            "ip",
            "-n",
            names["h1"],
            "link",
            "add",
            "u1",
            "type",
            "veth",
            "peer",
            "name",
            "u2",
            "netns",
            names["h2"],
        )
        _sh("ip", "-n", names["h1"], "link", "set", "u1", "address", "02:00:00:00:01:01", "up")
        _sh("ip", "-n", names["h2"], "link", "set", "u2", "address", "02:00:00:00:02:02", "up")
        for w, host, ip, mac in (
            ("a", "h1", "10.8.0.1", "02:00:00:00:0a:01"),
            ("b", "h2", "10.8.0.2", "02:00:00:00:0b:01"),
        ):
            _sh(
                "ip",
                "-n",
                names[host],
                "link",
                "add",
                f"h{w}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                names[w],
            )
            _sh("ip", "-n", names[w], "link", "set", "eth0", "address", mac)
            _sh("ip", "-n", names[w], "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", names[w], "link", "set", "eth0", "up")
            _sh("ip", "-n", names[host], "link", "set", f"h{w}", "up")
            _nsrun(names[w], "ethtool", "-K", "eth0", "tx", "off")
        _sh(
            "ip",
            "-n",
            names["a"],
            "neigh",
            "add",
            "10.8.0.2",
            "lladdr",
            "02:00:00:00:0b:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        )
        _sh(
            "ip",
            "-n",
            names["b"],
            "neigh",
            "add",
            "10.8.0.1",
            "lladdr",
            "02:00:00:00:0a:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        )
        fps["h1"].load(name=f"vx1-{tag}")
        fps["h2"].load(name=f"vx2-{tag}")
        yield state
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        try:
            for fp in fps.values():
                fp.close()
        finally:
            for ns in names.values():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_live_vxlan_encap_and_decap_between_two_hosts(vxlab):
    names, fps = vxlab["names"], vxlab["fps"]
    vni, ip1, ip2 = 7, "192.0.2.1", "192.0.2.2"
    mac_a, mac_b, mu1, mu2 = (
        "02:00:00:00:0a:01",
        "02:00:00:00:0b:01",
        "02:00:00:00:01:01",
        "02:00:00:00:02:02",
    )
    side = {
        "h1": {
            "wl": "ha",
            "wmac": mac_a,
            "u": "u1",
            "me": ip1,
            "peer": ip2,
            "umac": mu1,
            "pmac": mu2,
            "src": "10.8.0.1",
            "dst": "10.8.0.2",
            "sp": 41000,
            "dp": 7100,
        },
        "h2": {
            "wl": "hb",
            "wmac": mac_b,
            "u": "u2",
            "me": ip2,
            "peer": ip1,
            "umac": mu2,
            "pmac": mu1,
            "src": "10.8.0.2",
            "dst": "10.8.0.1",
            "sp": 7100,
            "dp": 41000,
        },
    }
    keys = {}
    for h, s in side.items():
        fp, ns = fps[h], names[h]
        wl, u = _ifindex(ns, s["wl"]), _ifindex(ns, s["u"])
        fp.attach(wl, s["wl"], netns=f"/run/netns/{ns}")
        fp.attach(u, s["u"], netns=f"/run/netns/{ns}")
        fp.add_workload_port(wl, vni, s["wmac"])
        fp.add_underlay_port(u, s["me"])
        out = FlowKey(wl, vni, s["src"], s["dst"], 17, s["sp"], s["dp"])
        inn = FlowKey(vni, vni, s["dst"], s["src"], 17, s["dp"], s["sp"], tunnel=True)
        fp.install(
            out,
            FlowAction(
                "encap", ifindex=u, template=vxlan_template(s["umac"], s["pmac"], s["me"], s["peer"], vni)
            ),
        )
        fp.install(inn, FlowAction("decap", ifindex=wl, mac=s["wmac"], peer_ip=s["peer"]))
        keys[h] = (out, inn)
    for w in ("a", "b"):
        fps["h1" if w == "a" else "h2"].attach(
            _ifindex(names[w], "eth0"), "eth0", program="xdp_pass", netns=f"/run/netns/{names[w]}"
        )
    _start(vxlab, names["b"], UDP_ECHO, 7100)
    client = subprocess.run(
        _nsenter(names["a"], sys.executable, "-I", "-c", UDP_CLIENT, "10.8.0.2", "41000", "7100", "10", "60"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert client.stdout.split() == ["GOT", "10"], (
        client.stdout + client.stderr + str({h: fp.stats() for h, fp in fps.items()})
    )
    for h in ("h1", "h2"):
        flows = wait_for(
            lambda h=h: (f := fps[h].read_flows()) and all(f[k].packets >= 10 for k in keys[h]) and f,
            30,
            f"{h}'s offloaded counters",
        )
        out, inn = keys[h]
        # a decapsulated frame counts as received: outer headers (50) + Ethernet/IPv4/UDP (42) + payload
        assert flows[inn].bytes >= flows[inn].packets * (50 + 42), flows[inn]
        assert flows[out].bytes >= flows[out].packets * 42, flows[out]
        st_ = fps[h].stats()
        assert st_["redirect"] >= 20, st_


def _frames(batch) -> list[bytes]:
    return [bytes(batch.data[o : o + n]) for o, n in zip(batch.offset, batch.length)]


def test_encap_and_decap_equal_the_agents_own_vxlan(rig):
    """With the template the agent would build (its outer header, its flow-hash source port),
    the program's encapsulation is byte for byte the overlay module's; and decapsulating the
    overlay module's frame gives back the inner frame."""
    from microseg.overlay.tunnel import _entropy, encap, outer_template
    from microseg.packet.batch import Batch

    w0, w1, u0 = rig.idx["w0"], rig.idx["w1"], rig.idx["u0"]
    umac, nmac = "02:00:00:00:00:55", "02:00:00:00:00:66"
    for n, (src, dst, proto) in enumerate(
        [("10.7.0.1", "10.7.0.2", 17), ("10.7.0.1", "10.7.0.3", 6), ("fd07::1", "fd07::2", 17)]
    ):
        sport, dport = 30000 + n, 443
        if proto == 6:
            inner = B.tcp_packet(
                src, dst, sport, dport, b"data" * n, flags="A", eth_src=MAC_W0, eth_dst=MAC_W1
            )
        else:
            inner = B.udp_packet(src, dst, sport, dport, b"u" * (10 + n), eth_src=MAC_W0, eth_dst=MAC_W1)
        batch = Batch.from_packets([inner])
        agent = _frames(encap(batch, "vxlan", Z0, LOCAL_IP, PEER_IP, src_mac=umac, dst_mac=nmac))[0]
        tmpl = bytearray(outer_template("vxlan", LOCAL_IP, PEER_IP, src_mac=umac, dst_mac=nmac)[0])
        struct.pack_into("!H", tmpl, 34, 49152 + (int(_entropy(batch)[0]) & 0x3FFF))
        tmpl[46:49] = Z0.to_bytes(3, "big")
        key = FlowKey(w0, Z0, src, dst, proto, sport, dport)
        rig.flow(
            key,
            FlowAction("encap", ifindex=u0, template=bytes(tmpl)),
            {"key": key, "kind": "encap", "dmac": MAC_W1, "i": -1},
        )
        want = _check(rig, inner, w0)
        assert want.reason == "redirect" and want.redirect_ifindex == u0
        assert want.frame == agent, f"\nfast path {want.frame.hex()}\nagent     {agent.hex()}"
        # the peer's view: the agent's VXLAN frame arriving on our underlay, addressed to us
        back = _frames(encap(batch, "vxlan", Z1, PEER_IP, LOCAL_IP, src_mac=nmac, dst_mac=umac))[0]
        tkey = FlowKey(Z1, Z1, src, dst, proto, sport, dport, tunnel=True)
        rig.flow(
            tkey,
            FlowAction("decap", ifindex=w1, mac=MAC_W1, peer_ip=PEER_IP),
            {"key": tkey, "kind": "decap", "dmac": MAC_W1, "i": -1},
        )
        want = _check(rig, back, u0)
        assert (want.reason, want.redirect_ifindex, want.frame) == ("redirect", w1, inner)


def test_what_the_agent_must_see_passes(rig):
    """ARP, neighbour discovery, ICMP errors, GENEVE, NVGRE and IPv6 underlay traffic: never
    offloaded, always XDP_PASS unchanged, on every port."""
    from microseg.overlay.tunnel import encap
    from microseg.packet.batch import Batch

    inner = B.udp_packet("10.7.0.1", "10.7.0.2", 1, 2, b"x", eth_src=MAC_W0, eth_dst=MAC_W1)
    quoted = B.ipv4("10.7.0.2", "10.7.0.1", 17, B.udp(2, 1, b"x", src="10.7.0.2", dst="10.7.0.1"))
    frames = [
        B.arp_packet(1, MAC_W0, "10.7.0.1", "00:00:00:00:00:00", "10.7.0.2"),
        B.arp_packet(2, MAC_W0, "10.7.0.1", MAC_W1, "10.7.0.2"),
        B.ethernet(
            B.ipv6(
                "fe80::1",
                "ff02::1:ff00:2",
                58,
                B.icmpv6(135, 0, b"\0" * 4, b"\0" * 16, src="fe80::1", dst="ff02::1:ff00:2"),
            ),
            0x86DD,
            src=MAC_W0,
        ),
        B.ethernet(B.ipv4("10.7.0.1", "10.7.0.2", 1, B.icmp_error(3, 3, quoted)), src=MAC_W0, dst=MAC_W1),
        B.ethernet(B.ipv4("10.7.0.1", "10.7.0.2", 47, b"\0" * 8), src=MAC_W0, dst=MAC_W1),
        *_frames(encap(Batch.from_packets([inner]), "geneve", Z0, PEER_IP, LOCAL_IP)),
        *_frames(encap(Batch.from_packets([inner]), "nvgre", Z0, PEER_IP, LOCAL_IP)),
        *_frames(encap(Batch.from_packets([inner]), "vxlan", Z0, "2001:db8::2", "2001:db8::1")),
        *_frames(encap(Batch.from_packets([inner]), "vxlan", Z0, PEER_IP, LOCAL_IP, dport=4790)),
    ]
    for frame in frames:
        for ingress in (1, rig.idx["w0"], rig.idx["w1"], rig.idx["u0"]):
            want = _check(rig, frame, ingress)
            assert want.verdict == L.XDP_PASS and want.frame == frame


def test_last_seen_is_the_coarse_monotonic_clock(rig):
    w0, w1 = rig.idx["w0"], rig.idx["w1"]
    key = FlowKey(w0, Z0, "10.6.0.1", "10.6.0.2", 17, 5, 6)
    rig.flow(
        key,
        FlowAction("local", ifindex=w1, mac=MAC_W1),
        {"key": key, "kind": "local", "dmac": MAC_W1, "i": -1},
    )
    frame = B.udp_packet("10.6.0.1", "10.6.0.2", 5, 6, b"t", eth_src=MAC_W0, eth_dst=MAC_W1)
    assert rig.fp.read_flows()[key].last_seen_ns == 0
    t0 = L.clock_ns()
    assert _check(rig, frame, w0).reason == "redirect"
    t1 = L.clock_ns()
    seen = rig.fp.read_flows()[key].last_seen_ns
    tick = 20_000_000  # a jiffy or two at any HZ
    assert t0 - tick <= seen <= t1 + tick, (t0, seen, t1)
    stats = rig.fp.remove(key)
    assert stats is not None and stats.packets == 1 and key not in rig.fp.read_flows()
    del rig.flows[key.pack()]
