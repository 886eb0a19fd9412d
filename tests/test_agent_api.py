"""The agent's REST control API (``microseg.agent.api``): the WSGI application against a
handler (status codes, the token rule, bad input), the served OpenAPI document equal to the
committed one, and (with root and network namespaces) every endpoint of a live agent over its
metrics Unix socket."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from livelab import netns_skip_reason, wait_for
from microseg.agent.api import ApiApp, load_token, openapi
from microseg.errors import InputError

_NOT_YET = (OSError, ValueError, KeyError)  # the agent still starting

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-0123456789"


def _call(app, method: str, path: str, body: bytes | None = None, token: str | None = None, query: str = ""):
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "CONTENT_LENGTH": str(len(body or b"")),
        "wsgi.input": io.BytesIO(body or b""),
    }
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    got = {}

    def start(status, headers):
        got["status"], got["headers"] = int(status.split()[0]), dict(headers)

    data = b"".join(app(environ, start))
    return got["status"], (
        json.loads(data) if got["headers"].get("Content-Type") == "application/json" else data
    )


class FakeAgent:
    def __init__(self):
        self.calls = []

    def __call__(self, req):
        self.calls.append(req)
        cmd = req["cmd"]
        if cmd == "reload":
            if req.get("policy") == "/bad.yaml":
                return {"ok": False, "error": "bad.yaml: no such file"}
            return {"ok": True, "version": 2, "cut": 0, "hash": "abc"}
        if cmd == "conntrack":
            if req.get("limit") == "x":
                return {"ok": False, "error": "conntrack: bad filter"}
            return {"ok": True, "count": 0, "entries": [], "truncated": False}
        if cmd == "trace":
            return {"ok": True, "verdict": "allow"}
        if cmd == "status":
            return {"ok": True, "host": "h1"}
        if cmd == "stats":
            raise TimeoutError("the agent's loop did not answer within 30 s")
        return {"ok": False, "error": "unknown"}


def test_served_openapi_equals_committed():
    app = ApiApp(FakeAgent())
    code, doc = _call(app, "GET", "/v1/openapi.json")
    assert code == 200
    committed = json.loads((ROOT / "docs" / "api" / "openapi.json").read_text())
    assert doc == committed == json.loads(json.dumps(openapi()))
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/status",
        "/v1/stats",
        "/v1/conntrack",
        "/v1/trace",
        "/v1/reload",
        "/v1/openapi.json",
    }


def test_codes_and_token_rule():
    fake = FakeAgent()
    app = ApiApp(
        fake,
        TOKEN,
        fallback=lambda env, start: (start("200 OK", [("Content-Type", "text/plain")]), [b"m"])[1],
    )
    assert _call(app, "GET", "/v1/status") == (200, {"ok": True, "host": "h1"})
    assert _call(app, "GET", "/metrics")[0] == 200  # the metrics app behind
    assert _call(app, "GET", "/v1/nope")[0] == 404
    code, body = _call(app, "POST", "/v1/status")
    assert code == 405 and body["ok"] is False and "GET" in body["error"]
    assert _call(app, "GET", "/v1/reload")[0] == 405
    assert _call(app, "GET", "/v1/stats")[0] == 503  # the loop did not answer
    # conntrack: filters passed on, unknown ones and bad values refused
    assert _call(app, "GET", "/v1/conntrack", query="src=10.0.0.1&proto=tcp&limit=5")[0] == 200
    assert fake.calls[-1] == {"cmd": "conntrack", "src": "10.0.0.1", "proto": "tcp", "limit": "5"}
    assert _call(app, "GET", "/v1/conntrack", query="bogus=1")[0] == 400
    assert _call(app, "GET", "/v1/conntrack", query="limit=x")[0] == 400
    assert _call(app, "GET", "/v1/status", query="x=1")[0] == 400
    # trace: read-only, no token needed; bodies checked
    assert _call(app, "POST", "/v1/trace", b'{"packet": "src=a dst=b"}')[0] == 200
    for bad in (b"", b"{not json", b"[1]", b"\xff\xfe"):
        code, body = _call(app, "POST", "/v1/trace", bad)
        assert code == 400 and body["ok"] is False, bad
    assert _call(app, "POST", "/v1/trace", b"x" * 70000)[0] == 413
    # reload: the token
    n = len(fake.calls)
    assert _call(app, "POST", "/v1/reload")[0] == 401
    assert _call(app, "POST", "/v1/reload", token="wrong")[0] == 401
    assert len(fake.calls) == n  # refused before the agent is asked
    assert _call(app, "POST", "/v1/reload", token=TOKEN)[0] == 200
    code, body = _call(app, "POST", "/v1/reload", b'{"policy": "/bad.yaml"}', token=TOKEN)
    assert code == 409 and "no such file" in body["error"]
    assert _call(app, "POST", "/v1/reload", b'{"policy": 3}', token=TOKEN)[0] == 400
    # without a token file, mutating calls are off
    off = ApiApp(fake, None)
    assert _call(off, "POST", "/v1/reload", token=TOKEN)[0] == 403
    assert _call(off, "GET", "/v1/status")[0] == 200


def test_token_file_mode(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o644)
    with pytest.raises(InputError, match="0600"):
        load_token(str(f))
    f.chmod(0o600)
    assert load_token(str(f)) == TOKEN
    f.write_text("")
    with pytest.raises(InputError, match="one token"):
        load_token(str(f))
    with pytest.raises(InputError, match="No such file"):
        load_token(str(tmp_path / "missing"))


# -- live ------------------------------------------------------------------------------------------
POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7301}
hosts:
  - {name: h1, address: 198.18.3.1}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 7999}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:05:00:01", ipv4: 10.5.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h1, mac: "02:00:00:05:00:02", ipv4: 10.5.0.2, security_groups: [svc]}
"""


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _http(path: str, method: str, url: str, body=None, token=None):
    c = _UnixHTTP(path)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        c.request(method, url, body=data, headers=headers)
        r = c.getresponse()
        raw = r.read()
        return r.status, (
            json.loads(raw) if r.getheader("Content-Type") == "application/json" else raw.decode()
        )
    finally:
        c.close()


def test_live_agent_every_endpoint(tmp_path):
    """One host namespace, two workload ports, a bare underlay; the agent serves the API on
    its metrics Unix socket. Every endpoint, the errors and the token rule."""
    reason = netns_skip_reason(f"msapi{os.getpid() % 100000}")
    if reason:
        pytest.skip(reason)
    pre = f"msapi{os.getpid() % 100000}"
    host_ns, a_ns, b_ns = f"{pre}-h", f"{pre}-a", f"{pre}-b"
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    p2 = tmp_path / "p2.yaml"
    p2.write_text(POLICY.replace("port_range_max: 7999", "port_range_max: 7000"))
    moved = tmp_path / "moved.yaml"
    moved.write_text(POLICY.replace('mac: "02:00:00:05:00:02"', 'mac: "02:00:00:05:00:09"'))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    msock = tmp_path / "metrics.sock"
    logf = open(tmp_path / "agent.log", "wb")
    proc = server = None

    def ip(*args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        for ns in (host_ns, a_ns, b_ns):
            ip("netns", "add", ns)
        ip("link", "add", "ul", "type", "veth", "peer", "name", "ulp", ns=host_ns)  # a bare underlay
        for port, ns, mac, addr in (
            ("w0", a_ns, "02:00:00:05:00:01", "10.5.0.1"),
            ("w1", b_ns, "02:00:00:05:00:02", "10.5.0.2"),
        ):
            ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=host_ns)
            ip("link", "set", port, "up", ns=host_ns)
            ip("link", "set", "eth0", "address", mac, ns=ns)
            ip("addr", "add", f"{addr}/32", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
            ip("route", "add", "default", "dev", "eth0", ns=ns)
        for dev in ("ul", "ulp", "lo"):
            ip("link", "set", dev, "up", ns=host_ns)
        cmd = ["ip", "netns", "exec", host_ns, sys.executable, "-m", "microseg", "agent"]
        cmd += ["--policy", str(policy), "--host", "h1", "--port", "red/a=w0", "--port", "red/b=w1"]
        cmd += ["--underlay", "ul", "--offload", "off", "--metrics", f"unix:{msock}"]
        cmd += ["--api-token-file", str(token)]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            if proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {proc.returncode}: {(tmp_path / 'agent.log').read_text()}"
                )
            if not msock.exists():
                return False
            code, body = _http(str(msock), "GET", "/v1/status")
            return code == 200 and body.get("ready")

        wait_for(ready, 150, "agent ready", tolerate=_NOT_YET)
        code, st = _http(str(msock), "GET", "/v1/status")
        assert st["host"] == "h1" and st["ports"] == {"red/a": "w0", "red/b": "w1"}
        code, m = _http(str(msock), "GET", "/metrics")
        assert code == 200 and "microseg_agent_ready 1.0" in m
        # a connection from a to b, seen in conntrack
        srv = "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', 7001)); s.listen(8); print('READY', flush=True)\nwhile True:\n    c, _ = s.accept(); c.sendall(c.recv(100)); c.close()"
        server = subprocess.Popen(
            ["ip", "netns", "exec", b_ns, sys.executable, "-c", srv], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout.readline().strip() == "READY"
        client = "import socket, sys\ns = socket.create_connection(('10.5.0.2', 7001), timeout=2); s.sendall(b'hi'); print(s.recv(10).decode())"

        def connected():
            r = subprocess.run(
                ["ip", "netns", "exec", a_ns, sys.executable, "-c", client],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return r.stdout.strip() == "hi"

        wait_for(connected, 60, "a reaches b:7001", tolerate=_NOT_YET)
        code, ct = _http(
            str(msock), "GET", "/v1/conntrack?src=10.5.0.1&dst=10.5.0.2&proto=tcp&zone=7301&limit=10"
        )
        assert code == 200 and ct["count"] >= 1 and ct["entries"], ct
        assert all(e["dport"] == 7001 for e in ct["entries"]), ct
        code, ct = _http(str(msock), "GET", "/v1/conntrack?proto=tcp&limit=0")
        assert code == 200 and ct["entries"] == [] and ct["truncated"] is True
        assert _http(str(msock), "GET", "/v1/conntrack?state=BOGUS")[0] == 400
        code, stats = _http(str(msock), "GET", "/v1/stats")
        assert code == 200 and stats["packets"] > 0 and stats["conntrack"]["entries"] >= 1
        # trace
        code, tr = _http(
            str(msock),
            "POST",
            "/v1/trace",
            {"packet": "src=red/a dst=red/b proto=tcp dport=7001", "state": "live"},
        )
        assert code == 200 and tr["ok"], tr
        code, tr = _http(
            str(msock),
            "POST",
            "/v1/trace",
            {"packet": "src=red/a dst=red/b proto=tcp dport=9999", "state": "new"},
        )
        assert code == 200 and tr["ok"]
        assert _http(str(msock), "POST", "/v1/trace", {"packet": "src=nobody"})[0] == 400
        assert _http(str(msock), "POST", "/v1/trace", b"{oops")[0] == 400
        assert (
            _http(str(msock), "POST", "/v1/trace", {"packet": "src=red/a dst=red/b", "state": "x"})[0] == 400
        )
        # reload: the token rule, a refusal, a good one
        assert _http(str(msock), "POST", "/v1/reload")[0] == 401
        assert _http(str(msock), "POST", "/v1/reload", token="nope")[0] == 401
        code, r = _http(str(msock), "POST", "/v1/reload", {"policy": str(moved)}, token=TOKEN)
        assert code == 409 and "red/b" in r["error"], r
        code, r = _http(str(msock), "POST", "/v1/reload", {"policy": str(p2)}, token=TOKEN)
        assert code == 200 and r["ok"] and r["cut"] >= 0, r
        code, st = _http(str(msock), "GET", "/v1/status")
        assert st["reloads"] == 1 and st["reloads_refused"] == 1 and st["policy"]["path"] == str(p2)
        assert _http(str(msock), "GET", "/v1/openapi.json")[1] == json.loads(json.dumps(openapi()))
        assert _http(str(msock), "GET", "/v1/nothing")[0] == 404
        assert _http(str(msock), "DELETE", "/v1/status")[0] == 405
    finally:
        for p in (server, proc):
            if p is not None and p.poll() is None:
                if p is proc:
                    os.killpg(p.pid, 15)
                else:
                    p.kill()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9) if p is proc else p.kill()
                    p.wait(10)
        logf.close()
        for ns in (a_ns, b_ns, host_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
