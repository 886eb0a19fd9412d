"""What the live tests share: the socket scripts run inside workloads, the skip reasons, a
condition wait, and the lab driver (workloads' namespaces, servers, clients, the agents'
status and stats, teardown).

Not a test module: the live test modules (``tests/test_lab_*.py``, ``tests/test_agent_*.py``) import it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

# a TCP server per workload on several ports; each reply is "<tenant/name>:<data>"
SERVER = textwrap.dedent("""\
    import socket, sys, threading
    ident = sys.argv[1].encode()
    def conn(c):
        with c:
            for d in iter(lambda: c.recv(65536), b""):
                c.sendall(ident + b":" + d)
    def serve(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(64)
        while True:
            c, _ = s.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    for p in sys.argv[2:]:
        threading.Thread(target=serve, args=(int(p),), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()
""")

# one connection, one message; exit 0 with the reply, 3 on timeout, 4 on any other error
CLIENT = textwrap.dedent("""\
    import socket, sys
    addr, port, timeout, msg = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        s.sendall(msg.encode())
        print(s.recv(65536).decode())
    except socket.timeout:
        print("TIMEOUT"); sys.exit(3)
    except OSError as e:
        print("ERROR", e); sys.exit(4)
""")

# a long-lived connection: each stdin line is sent, the reply (or TIMEOUT) printed
SESSION = textwrap.dedent("""\
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("CONNECTED", flush=True)
    for line in sys.stdin:
        try:
            s.sendall(line.strip().encode())
            print(s.recv(65536).decode() or "CLOSED", flush=True)
        except socket.timeout:
            print("TIMEOUT", flush=True)
        except OSError as e:
            print("ERROR", e, flush=True)
""")

# ICMP echo with a raw socket: exit 0 on a reply from the address, 3 without one
PING = textwrap.dedent("""\
    import os, socket, struct, sys, time
    def csum(b):
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xFFFF); s += s >> 16
        return ~s & 0xFFFF
    addr, timeout = sys.argv[1], float(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"microseg"
    s.sendto(body[:2] + struct.pack("!H", csum(body)) + body[4:], (addr, 0))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            d, a = s.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (d[0] & 15) * 4
        t, _, _, i, _ = struct.unpack("!BBHHH", d[ihl:ihl + 8])
        if t == 0 and i == ident and a[0] == addr:
            print("REPLY"); sys.exit(0)
    print("TIMEOUT"); sys.exit(3)
""")


# a sink: reads a connection to its end, then answers the byte count
SINK = textwrap.dedent("""\
    import socket, sys, threading
    def conn(c):
        n = 0
        with c:
            for d in iter(lambda: c.recv(1 << 16), b""):
                n += len(d)
            c.sendall(str(n).encode())
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(16)
    print("READY", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
""")

# one connection sending N bytes to a sink, then printing the sink's count
BULK = textwrap.dedent("""\
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
    chunk = b"m" * 65536
    for _ in range(int(sys.argv[3]) // len(chunk)):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode())
""")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_interrupts(request) -> None:
    """Turn a CI job's SIGTERM into an interrupt for the rest of the fixture's scope, so that
    the lab's finalizer still runs (the previous handler comes back at the end)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))


def netns_skip_reason(prefix: str) -> str | None:
    """Why the live tests cannot run here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, AF_PACKET)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"{prefix}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns unavailable: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def store_skip_reason(prefix: str) -> str | None:
    """Why the store lab tests cannot run here: :func:`netns_skip_reason`'s, or no etcd server
    for ``lab up --store`` (found the way the lab finds it)."""
    reason = netns_skip_reason(prefix)
    if reason is not None:
        return reason
    from microseg.agent import lab as L

    try:
        L._etcd_binary()
    except L.LabError as exc:
        return str(exc)
    return None


def json_lines(path) -> list[dict]:
    """The records of a JSON-lines file a process may still be writing (a half-written line
    is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def wait_for(cond, timeout: float, what: str, tolerate: tuple = ()):
    """``cond()``'s first truthy value within ``timeout`` seconds; exceptions of the types in
    ``tolerate`` count as not yet (a socket not there yet, a half-written file)."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = cond()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class LiveLab:
    """A lab brought up by a test: its state, its workloads' namespaces, and the servers and
    sessions the test started there (all stopped by :meth:`teardown`)."""

    log_names: tuple = ("h1", "h2")  # whose logs to show at teardown

    def __init__(self, root):
        self.root = root
        self.state_dir = str(root / "state")
        self.servers: list[subprocess.Popen] = []
        self.down_done = False

    def guard(self, request) -> None:
        """Take the lab down after the fixture's scope, at exit too, and on a CI job's SIGTERM."""
        request.addfinalizer(self.teardown)
        atexit.register(self.teardown)
        sigterm_interrupts(request)

    @property
    def state(self) -> dict:
        with open(os.path.join(self.state_dir, "state.json")) as f:
            return json.load(f)

    def ns(self, workload: str) -> str:
        return self.state["workloads"][workload]["ns"]

    def control(self, host: str, cmd: str, **args) -> dict:
        """The reply of ``host``'s agent to one control request."""
        from microseg.agent import control

        return control.request(self.state["hosts"][host]["control"], cmd, **args)

    def status(self, host: str) -> dict:
        return self.control(host, "status")

    def stats(self, host: str) -> dict:
        """``host``'s part of ``microseg lab stats --json``."""
        r = self.microseg("lab", "stats", "--json", "--state-dir", self.state_dir)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["hosts"][host]

    def flow_log(self, host: str) -> list[dict]:
        return json_lines(self.state["hosts"][host]["flow_log"])

    def microseg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "microseg", *args], capture_output=True, text=True, timeout=timeout
        )

    def _in(self, workload: str, code: str, *args) -> list[str]:
        return ["ip", "netns", "exec", self.ns(workload), sys.executable, "-I", "-c", code, *map(str, args)]

    def py(self, workload: str, code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._in(workload, code, *args), capture_output=True, text=True, timeout=timeout
        )

    def tcp(self, workload: str, addr: str, port: int, msg: str, timeout: float = 3.0):
        r = self.py(workload, CLIENT, addr, port, timeout, msg, timeout=timeout + 30)
        return r.returncode, r.stdout.strip()

    def answers(self, workload, addr, port, msg, deadline: float = 30) -> str:
        """The reply of the first attempt that gets one, retrying until ``deadline``."""
        end = time.monotonic() + deadline
        last = None
        while time.monotonic() < end:
            last = self.tcp(workload, addr, port, msg, timeout=min(3.0, max(0.5, end - time.monotonic())))
            if last[0] == 0:
                return last[1]
            time.sleep(0.1)
        raise AssertionError(f"{workload} -> {addr}:{port}: no answer within {deadline} s (last: {last})")

    def start_server(self, workload: str, *ports: int) -> None:
        p = subprocess.Popen(
            self._in(workload, SERVER, workload, *ports),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.servers.append(p)
        line = p.stdout.readline()  # blocks until the server listens (or dies)
        assert line.strip() == "READY", f"server in {workload} did not start: {line!r}"

    def serve(self, workload: str, code: str, *args) -> None:
        """Start script ``code`` in ``workload``; it prints READY once it listens."""
        p = subprocess.Popen(self._in(workload, code, *args), stdout=subprocess.PIPE, text=True)
        self.servers.append(p)
        assert p.stdout.readline().strip() == "READY", f"{workload}: the server did not start"

    def session(self, workload: str, addr: str, port: int, timeout: float):
        p = subprocess.Popen(
            self._in(workload, SESSION, addr, port, timeout),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.servers.append(p)
        assert p.stdout.readline().strip() == "CONNECTED"
        return p

    def teardown(self) -> None:
        if self.down_done:
            return
        self.down_done = True
        from microseg.agent import lab as L

        for name in self.log_names:
            log = os.path.join(self.state_dir, f"{name}.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    print(f"--- log {name} (tail)\n" + "".join(f.readlines()[-20:]))
        try:
            L.down(self.state_dir, echo=lambda *_: None)
        finally:
            for p in self.servers:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=10)
