"""What the live inspection tests share (``test_lab_ids_decisions.py``, Suricata's own
decisions; ``test_lab_ids_builtin.py``, the built-in matcher): a two-host lab with echo
servers (plain and TLS) in workload ``red/c``, a client that reports its source port, and
readers for the agents' status, stats, flow logs and conntrack listings.

Not a test module.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap

from livelab import LiveLab

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7302}
hosts:
  - {name: h1, address: 198.18.4.1}
  - {name: h2, address: 198.18.4.2}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 8999}
      - {direction: ingress, ethertype: IPv4, protocol: udp, port_range_min: 7000, port_range_max: 8999}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:32:00:01", ipv4: 10.9.1.1, security_groups: [svc]}
  - {name: c, tenant: red, host: h2, mac: "02:00:00:32:00:03", ipv4: 10.9.1.3, security_groups: [svc]}
"""
SERVER_IP = "10.9.1.3"
DROP_PORT, BYPASS_PORT, ALERT_PORT, TLS_PORT, PLAIN_PORT, SSH_PORT = 7200, 7300, 7400, 8443, 7500, 7022

# an echo server, plain or TLS (argv: port [cert key])
ECHO = textwrap.dedent("""\
    import socket, ssl, sys, threading
    port = int(sys.argv[1])
    ctx = None
    if len(sys.argv) > 3:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    def conn(c):
        try:
            if ctx is not None:
                c = ctx.wrap_socket(c, server_side=True)
            with c:
                for d in iter(lambda: c.recv(65536), b""):
                    c.sendall(d)
        except OSError:
            pass
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    print("READY", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
""")

# one connection: prints its source port, then sends FIRST and N more messages, each echoed
# back before the next (paced 10 ms); prints "OK k" or "FAIL k <why>" (k: echoes received)
CLIENT = textwrap.dedent("""\
    import socket, ssl, sys, time
    addr, port, tls, first, n, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "tls", \\
        sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
    s = socket.create_connection((addr, port), timeout=timeout)
    print(s.getsockname()[1], flush=True)
    ok = 0
    try:
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(s, server_hostname="svc")
        for i in range(n + 1):
            msg = (first if i == 0 else "m%04d" % i).encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                d = s.recv(65536)
                if not d:
                    raise ConnectionError("closed")
                got += d
            ok += 1
            time.sleep(0.01)
        print("OK", ok, flush=True)
    except OSError as exc:
        print("FAIL", ok, type(exc).__name__, flush=True)
    s.close()
""")


# one UDP datagram (argv: addr port payload); prints its source port
DATAGRAM = textwrap.dedent("""\
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    print(s.getsockname()[1], flush=True)
""")


# an SSH transport's opening as each side sends it (RFC 4253: banner, KEXINIT, a key-exchange
# message, NEWKEYS), then binary data: what Suricata's SSH parser follows (no real crypto;
# there is no sshd to rely on). SSH_SERVER argv: port; SSH_CLIENT argv: addr port messages,
# prints its source port, then "OK k" once k data messages are echoed
_SSH_COMMON = """\
import os, socket, struct, sys
def pkt(payload):
    pad = 8 - ((len(payload) + 5) % 8)
    pad += 8 if pad < 4 else 0
    return struct.pack("!IB", len(payload) + pad + 1, pad) + payload + os.urandom(pad)
def kexinit():
    names = [b"curve25519-sha256", b"ssh-ed25519", b"aes128-ctr", b"aes128-ctr",
             b"hmac-sha2-256", b"hmac-sha2-256", b"none", b"none", b"", b""]
    return pkt(bytes([20]) + os.urandom(16) + b"".join(struct.pack("!I", len(x)) + x for x in names)
               + b"\\x00\\x00\\x00\\x00\\x00")
def recv_packet(s):
    head = b""
    while len(head) < 4:
        d = s.recv(4 - len(head))
        if not d:
            raise ConnectionError("closed")
        head += d
    n, body = struct.unpack("!I", head)[0], b""
    while len(body) < n:
        d = s.recv(n - len(body))
        if not d:
            raise ConnectionError("closed")
        body += d
    return body
def recv_line(s):
    line = b""
    while not line.endswith(b"\\n"):
        d = s.recv(1)
        if not d:
            raise ConnectionError("closed")
        line += d
    return line
"""
SSH_SERVER = _SSH_COMMON + textwrap.dedent("""\
    import threading
    def conn(c):
        try:
            with c:
                c.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\\r\\n")
                recv_line(c)
                c.sendall(kexinit())
                recv_packet(c)
                recv_packet(c)
                c.sendall(pkt(bytes([31]) + os.urandom(64)))
                recv_packet(c)
                c.sendall(pkt(bytes([21])))
                while True:
                    c.sendall(recv_packet(c)[:0] + pkt(os.urandom(48)))
        except OSError:
            pass
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(16)
    print("READY", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
""")
SSH_CLIENT = _SSH_COMMON + textwrap.dedent("""\
    import time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    print(s.getsockname()[1], flush=True)
    ok = 0
    try:
        s.sendall(b"SSH-2.0-OpenSSH_9.2p1\\r\\n")
        recv_line(s)
        s.sendall(kexinit())
        recv_packet(s)
        s.sendall(pkt(bytes([30]) + os.urandom(32)))
        recv_packet(s)
        s.sendall(pkt(bytes([21])))
        recv_packet(s)
        for _ in range(int(sys.argv[3])):
            s.sendall(pkt(os.urandom(48)))
            recv_packet(s)
            ok += 1
            time.sleep(0.01)
        print("OK", ok, flush=True)
    except OSError as exc:
        print("FAIL", ok, type(exc).__name__, flush=True)
""")


def make_cert(folder) -> tuple[str, str]:
    """A self-signed certificate and key (openssl) for the TLS echo server."""
    cert, key = str(folder / "c.pem"), str(folder / "k.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert]
        + ["-days", "2", "-subj", "/CN=svc"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def openssl_reason() -> str | None:
    return None if shutil.which("openssl") else "openssl is not installed (the TLS server's certificate)"


class IdsLab(LiveLab):
    @classmethod
    def up(cls, tmp_path_factory, request, prefix: str, rules: str, packets: int, **options) -> IdsLab:
        """The lab up with the IDS on (``options``: more of ``lab.up``'s), torn down after the
        module also when the test run dies."""
        from microseg.agent import lab as L

        lab = cls(tmp_path_factory.mktemp("lab"), rules)
        lab.guard(request)
        L.up(
            str(lab.policy),
            lab.state_dir,
            prefix,
            "vxlan",
            "info",
            150,
            echo=lambda *_: None,
            ids_rules=str(lab.rules),
            ids_packets=packets,
            **options,
        )
        return lab

    def __init__(self, root, rules: str):
        super().__init__(root)
        self.policy = root / "p.yaml"
        self.policy.write_text(POLICY)
        self.rules = root / "test.rules"
        self.rules.write_text(rules)

    def conntrack(self, host: str, **filters) -> list[dict]:
        r = self.control(host, "conntrack", **filters)
        assert r["ok"], r
        return r["entries"]

    def ids_ends(self, host: str, sport: int) -> list[dict]:
        return [r for r in self.flow_log(host) if r.get("event") == "ids_end" and r.get("sport") == sport]

    def client(self, port: int, first: str, n: int, tls: bool = False, timeout: float = 5.0):
        """(source port, last line) of one CLIENT run from red/a to red/c."""
        r = self.py(
            "red/a", CLIENT, SERVER_IP, port, "tls" if tls else "plain", first, n, timeout, timeout=120
        )
        lines = r.stdout.split()
        assert lines and lines[0].isdigit(), r.stdout + r.stderr
        return int(lines[0]), " ".join(lines[1:])
