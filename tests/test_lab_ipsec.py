"""Live tests: IPsec ESP between hosts of different sites, ICMP too-big, and the agent's
``conntrack`` and ``trace`` control commands.

Three hosts in one tenant: h1 and h2 share a site, h3 is at the other; the SA file protects
the overlay between h1 and h3 (one SA each way) and lets the rest bypass. What crosses the
underlay is captured on its bridge and the ESP is decrypted with scapy, an implementation of
RFC 4303/4106 independent of ours. ESP adds ~56 bytes, so full-size TCP segments between the
sites no longer fit the 1500-byte underlay: the agent must answer them with ICMP
"fragmentation needed" so the sender's path MTU discovery lowers the segment size, and a bulk
transfer still completes.

Needs root and ``ip netns``; skipped otherwise. The lab is always taken down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from livelab import LiveLab, netns_skip_reason, wait_for

PREFIX = f"msip{os.getpid() % 100000}"

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7101}
hosts:
  - {name: h1, address: 198.18.1.1}
  - {name: h2, address: 198.18.1.2}
  - {name: h3, address: 198.18.1.3}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 7999}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:11:00:01", ipv4: 10.7.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h2, mac: "02:00:00:11:00:02", ipv4: 10.7.0.2, security_groups: [svc]}
  - {name: c, tenant: red, host: h3, mac: "02:00:00:11:00:03", ipv4: 10.7.0.3, security_groups: [svc]}
"""

SAS = {
    "h1-to-h3": (0x7101, "11" * 32, "a1b2c3d4", "198.18.1.1", "198.18.1.3"),
    "h3-to-h1": (0x7102, "22" * 32, "d4c3b2a1", "198.18.1.3", "198.18.1.1"),
}


def _sa_file() -> str:
    lines = ["sas:"]
    for name, (spi, key, salt, src, dst) in SAS.items():
        lines.append(
            f"  - {{name: {name}, spi: {spi}, key: '{key}', salt: '{salt}', "
            f"tunnel_src: {src}, tunnel_dst: {dst}}}"
        )
    lines += [
        "policies:",
        "  - {src: 198.18.1.1/32, dst: 198.18.1.3/32, sa: h1-to-h3}",
        "  - {src: 198.18.1.3/32, dst: 198.18.1.1/32, sa: h3-to-h1}",
        "  - {dst: 0.0.0.0/0, action: bypass}",
    ]
    return "\n".join(lines) + "\n"


# frames on an interface until stdin closes, then one JSON list of hex frames on stdout
CAPTURE = textwrap.dedent("""\
    import json, select, socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((sys.argv[1], 0))
    print("READY", flush=True)
    frames = []
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [])
        if s in r:
            frames.append(s.recv(65535).hex())
        if sys.stdin in r and not sys.stdin.read(1):
            break
    print(json.dumps(frames[-20000:]))
""")

# send N bytes on one connection, then read the server's echo of them back: prints the count
BULK = textwrap.dedent("""\
    import socket, sys
    addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((addr, port), timeout=60)
    data = (bytes(range(256)) * (n // 256 + 1))[:n]
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += len(d)
    print(got)
""")

UP_TIMEOUT = 150
ANSWER_DEADLINE = 30

_REASON = netns_skip_reason(PREFIX)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class Lab(LiveLab):
    log_names = ("h1", "h3")

    def __init__(self, root):
        super().__init__(root)
        self.policy = root / "p.yaml"
        self.policy.write_text(POLICY)
        self.sas = root / "sa.yaml"
        self.sas.write_text(_sa_file())

    def capture(self):
        ns = self.state["underlay"]
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CAPTURE, "h0"],  # h1 on the bridge
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers.append(p)
        assert p.stdout.readline().strip() == "READY"
        return p


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    from microseg.agent import lab as L

    lab = Lab(tmp_path_factory.mktemp("lab"))
    lab.guard(request)
    L.up(
        str(lab.policy),
        lab.state_dir,
        PREFIX,
        "vxlan",
        "info",
        UP_TIMEOUT,
        echo=lambda *_: None,
        ipsec=str(lab.sas),
    )
    for w in ("red/b", "red/c"):
        lab.start_server(w, 7000)
    return lab


def _frames(cap) -> list[bytes]:
    out, _ = cap.communicate(timeout=60)
    return [bytes.fromhex(h) for h in json.loads(out)]


def _ip_proto(frame: bytes):
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    return frame[23], frame[26:30], frame[30:34]


def test_agents_report_their_esp_peers(lab):
    assert lab.control("h1", "status")["ipsec"]["esp_peers"] == ["h3"]
    assert lab.control("h2", "status")["ipsec"]["esp_peers"] == []
    assert lab.control("h3", "status")["ipsec"]["esp_peers"] == ["h1"]


def test_across_sites_in_esp_within_a_site_plain(lab):
    from scapy.layers.inet import IP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    lab.answers("red/a", "10.7.0.3", 7000, "warm", ANSWER_DEADLINE)  # paths resolved
    cap = lab.capture()
    assert lab.answers("red/a", "10.7.0.3", 7000, "secret-across", ANSWER_DEADLINE) == "red/c:secret-across"
    assert lab.answers("red/a", "10.7.0.2", 7000, "plain-within", ANSWER_DEADLINE) == "red/b:plain-within"
    frames = _frames(cap)
    h1, h2, h3 = (bytes([198, 18, 1, i]) for i in (1, 2, 3))
    esp = [f for f in frames if _ip_proto(f) and _ip_proto(f)[0] == 50]
    between_13 = [f for f in frames if _ip_proto(f) and {_ip_proto(f)[1], _ip_proto(f)[2]} == {h1, h3}]
    assert esp, "no ESP on the underlay"
    # nothing but ESP between the sites, and the payload never in clear there
    assert all(_ip_proto(f)[0] == 50 for f in between_13)
    assert not any(b"secret-across" in f for f in frames)
    # within the site: plain VXLAN, the payload visible
    assert any(b"plain-within" in f for f in frames if _ip_proto(f) and h2 in _ip_proto(f)[1:])
    # scapy decrypts what h1 sent and finds our VXLAN packet with the payload inside
    spi, key, salt, src, dst = SAS["h1-to-h3"]
    sa = SecurityAssociation(
        ESP,
        spi=spi,
        crypt_algo="AES-GCM",
        crypt_key=bytes.fromhex(key + salt),
        tunnel_header=IP(src=src, dst=dst),
    )
    inner = []
    for f in esp:
        p = IP(f[14:])
        if p.src == src and p[ESP].spi == spi:
            inner.append(bytes(sa.decrypt(p)))
    assert any(b"secret-across" in x for x in inner)
    vx = IP(next(x for x in inner if b"secret-across" in x))
    assert vx.src == src and vx.dst == dst and vx.proto == 17 and vx.dport == 4789


def test_bulk_transfer_across_sites_adapts_to_esp_mtu(lab):
    before = lab.control("h1", "stats")["agent"]["icmp_too_big"]
    n = 400_000
    lab.answers("red/a", "10.7.0.3", 7000, "warm", ANSWER_DEADLINE)
    r = lab.py("red/a", BULK, "10.7.0.3", 7000, n, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # the server prefixes each chunk it echoes with "red/c:"; at least the bytes came back
    assert int(r.stdout.strip()) >= n
    after = lab.control("h1", "stats")["agent"]["icmp_too_big"]
    assert after > before, "full-size segments crossed without an ICMP too-big"
    assert lab.control("h1", "stats")["ipsec"]["esp_sent"] > 0


def test_plain_overlay_from_an_esp_peer_is_refused(lab):
    from microseg.overlay import encap
    from microseg.packet import build as PB
    from microseg.packet.batch import Batch

    st = lab.state
    ul_mac = lab.control("h1", "status")["underlay"]["mac"]
    inner = PB.tcp_packet(
        "10.7.0.3",
        "10.7.0.1",
        40000,
        7000,
        b"forged",
        eth_src="02:00:00:11:00:03",
        eth_dst="02:00:00:11:00:01",
    )
    out = encap(Batch.from_packets([inner]), "vxlan", 7101, "198.18.1.3", "198.18.1.1")
    frame = bytearray(out.packet(0))
    frame[0:6] = bytes.fromhex(ul_mac.replace(":", ""))
    frame[6:12] = bytes.fromhex("020000ffff03")
    send = textwrap.dedent("""\
        import socket, sys
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind(("br0", 0))
        for _ in range(3):
            s.send(bytes.fromhex(sys.argv[1]))
    """)
    before = lab.control("h1", "stats")["drops"].get("esp_required", 0)
    subprocess.run(
        ["ip", "netns", "exec", st["underlay"], sys.executable, "-c", send, bytes(frame).hex()],
        check=True,
        timeout=30,
    )
    wait_for(
        lambda: lab.control("h1", "stats")["drops"].get("esp_required", 0) >= before + 3,
        30,
        "h1 to refuse plain VXLAN from h3",
    )


def test_conntrack_list_and_trace_on_the_control_socket(lab):
    from microseg.agent import control

    sess = lab.session("red/a", "10.7.0.3", 7000, 30)
    try:
        sess.stdin.write("hold\n")
        sess.stdin.flush()
        assert sess.stdout.readline().strip() == "red/c:hold"
        got = lab.control("h1", "conntrack", proto="tcp", dst="10.7.0.3", state="established")
        assert got["ok"] and got["count"] == 1, got
        e = got["entries"][0]
        assert (e["src"], e["dst"], e["dport"], e["state"]) == ("10.7.0.1", "10.7.0.3", 7000, "ESTABLISHED")
        assert e["zone"] == 7101
        assert lab.control("h1", "conntrack", state="nosuch")["ok"] is False
        t = lab.control("h1", "trace", packet="src=red/a dst=red/c proto=tcp dport=7000")
        assert t["ok"] and t["verdict"] == "allow", t
        assert [s["stage"] for s in t["steps"]][:2] == ["parse", "tenant"]
        t = lab.control("h1", "trace", packet="src=red/a dst=red/c proto=tcp dport=22")
        assert t["ok"] and t["verdict"] == "drop"
        bad = lab.control("h1", "trace", packet="src=nosuch")
        assert bad["ok"] is False and bad["error"]
        # the trace ran on a copy: the live table did not gain the traced connections
        live = lab.control("h1", "conntrack", proto="tcp", dst="10.7.0.3")["entries"]
        assert [e for e in live if e["dport"] == 22] == []
        assert control.request(lab.state["hosts"]["h1"]["control"], "nosuch")["ok"] is False
        # the same through the command-line client
        ctl = ("ctl", "--lab", "h1", "--state-dir", lab.state_dir)
        r = lab.microseg(*ctl, "conntrack", "--proto", "tcp", "--state", "ESTABLISHED")
        assert r.returncode == 0, r.stderr
        assert "src=10.7.0.1 dst=10.7.0.3 sport=" in r.stdout and "dport=7000" in r.stdout
        assert "zone=7101" in r.stdout
        r = lab.microseg(*ctl, "trace", "src=red/a dst=red/c proto=tcp dport=7000")
        assert r.returncode == 0 and r.stdout.strip().endswith("verdict: allow"), r.stdout + r.stderr
        r = lab.microseg(*ctl, "trace", "src=nosuch")
        assert r.returncode == 1 and "the agent refused" in r.stderr
        r = lab.microseg("ctl", "--control", lab.state_dir + "/nosuch.sock", "status")
        assert r.returncode == 2 and "nosuch.sock" in r.stderr
    finally:
        sess.stdin.close()
        sess.wait(timeout=30)
