"""Kubernetes policy semantics against real-world policy files, probe by probe.

The policies are unchanged copies of published files (``tests/vectors/k8s/recipes``,
``website`` and ``network-policy-api``; each folder's README names the source, commit, path and
licence). ``tests/vectors/k8s/clusters`` holds one microseg policy file per scenario: one
tenant standing for the cluster, its namespaces, the pods as workloads and the policy files
that apply. ``tests/vectors/k8s/probes`` holds, per scenario, the probe matrix: (from, to,
protocol, port) -> allowed | denied, each probe with the sentence of the source's README or
the rule of the specification it comes from.

Every probe is one TCP SYN (or UDP datagram) between the two endpoints' addresses, VXLAN
encapsulated in the cluster's VNI, parsed, and judged as a NEW connection both by the
compiled policy (``CompiledPolicy.decide``) and by the per-packet reference
(``Reference.decide_row``). Each scenario's probes also go through the whole datapath as one
batch (``Datapath.process``). The tests at the end check the harness itself: the data files
are well formed, and probes run through today's tenant-per-namespace format give the answers
that format defines.
"""

from __future__ import annotations

import functools
import glob
import ipaddress
import os

import numpy as np
import pytest
import yaml

from microseg import ctstate
from microseg.datapath import Datapath, DatapathConfig
from microseg.overlay import encap
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.packet.parse import parse
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy
from microseg.policy.model import load_policy, parse_policy
from microseg.policy.reference import Reference

K8S = os.path.join(os.path.dirname(__file__), "vectors", "k8s")
PROBE_DIR = os.path.join(K8S, "probes")
CLUSTER_DIR = os.path.join(K8S, "clusters")
SOURCE_DIRS = ("recipes", "website", "network-policy-api")
NEW = ctstate.TRACKED | ctstate.NEW
EXPECT = {"allowed": True, "denied": False}
PROBE_KEYS = {"id", "from", "to", "protocol", "port", "expect", "why"}
FILE_KEYS = {"scenario", "cluster", "source", "probes"}
ADMIN_KINDS = {"AdminNetworkPolicy", "BaselineAdminNetworkPolicy"}
SPORT = 40000  # source port of a scenario's first probe (+1 per probe)


# ---- data ---------------------------------------------------------------------------------------
def _probe_files() -> list[str]:
    return sorted(glob.glob(os.path.join(PROBE_DIR, "*.yaml")))


@functools.cache
def probe_file(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _collect():
    params, ids = [], []
    for path in _probe_files():
        doc = probe_file(path)
        scenario = doc["scenario"]
        for i, probe in enumerate(doc["probes"]):
            params.append((path, i))
            ids.append(f"{scenario}:{probe['id']}")
    return params, ids


PROBES, PROBE_IDS = _collect()
SCENARIOS = _probe_files()
SCENARIO_IDS = [probe_file(p)["scenario"] for p in SCENARIOS]


def cluster_path(probes_path: str) -> str:
    rel = probe_file(probes_path)["cluster"]
    return os.path.normpath(os.path.join(os.path.dirname(probes_path), rel))


class Cluster:
    """What the harness reads from a cluster file itself (addresses, hosts, VNI), so that the
    packets it builds depend on the file only, not on the model under test."""

    def __init__(self, path: str):
        with open(path) as f:
            self.raw = yaml.safe_load(f)
        self.path = path
        (tenant,) = self.raw["tenants"]
        self.tenant = tenant["name"]
        self.vni = int(tenant["vni"])
        self.namespaces = {n["name"]: n for n in tenant.get("namespaces", [])}
        self.hosts = {h["name"]: h["address"] for h in self.raw["hosts"]}
        self.gateway = self.raw["hosts"][0]["address"]  # tunnel end of outside traffic
        self.pods = {}
        for w in self.raw["workloads"]:
            addr = w["ipv4"][0] if isinstance(w["ipv4"], list) else w["ipv4"]
            self.pods[f"{w['namespace']}/{w['name']}"] = (str(addr), self.hosts[w["host"]], w)

    def endpoint(self, ref: str) -> tuple[str, str]:
        """(address, tunnel end) of ``namespace/pod`` or of an outside address."""
        if "/" in ref:
            addr, host, _ = self.pods[ref]
            return addr, host
        return str(ipaddress.ip_address(ref)), self.gateway

    def policy_documents(self):
        """(entry, documents) of every network_policies file of the cluster."""
        out = []
        for entry in self.raw.get("network_policies", []):
            p = os.path.join(os.path.dirname(self.path), entry["file"])
            with open(p) as f:
                out.append((entry, [d for d in yaml.safe_load_all(f) if d is not None]))
        return out


@functools.cache
def cluster(path: str) -> Cluster:
    return Cluster(path)


@functools.cache
def judges(path: str):
    """(compiled policy, reference) of the cluster file at ``path`` (loaded once)."""
    policy = load_policy(path)
    return compile_policy(policy), Reference(policy)


def probe_frame(c: Cluster, probe: dict, sport: int) -> bytes:
    src, src_end = c.endpoint(probe["from"])
    dst, dst_end = c.endpoint(probe["to"])
    port = int(probe["port"])
    if probe["protocol"] == "TCP":
        inner = PB.tcp_packet(src, dst, sport, port, flags="S", seq=1000)
    else:
        inner = PB.udp_packet(src, dst, sport, port, b"probe")
    return encap(Batch.from_packets([inner]), "vxlan", c.vni, src_end, dst_end).packet(0)


def probe_keys(c: Cluster, probe: dict, sport: int = SPORT):
    keys = parse(Batch.from_packets([probe_frame(c, probe, sport)]))
    row = keys.row(0)
    # the harness's own checks: the frame parses, in the cluster's VNI, as the probe says
    assert keys.n == 1 and row["error"] == 0, f"harness: probe frame did not parse: {row}"
    assert row["tenant"] == c.vni, f"harness: probe frame in VNI {row['tenant']}, not {c.vni}"
    proto = 6 if probe["protocol"] == "TCP" else 17
    assert row["proto"] == proto and row["dport"] == int(probe["port"]), f"harness: {row}"
    return keys


def describe(probe: dict) -> str:
    return (
        f"{probe['from']} -> {probe['to']} {probe['protocol']}/{probe['port']}: expected "
        f"{probe['expect']} ({probe['why'].strip()})"
    )


def outcome(verdict: int, reason: int) -> str:
    return f"{V.verdict_name(int(verdict))} ({V.reason_name(int(reason))})"


def judge(policy_path: str, c: Cluster, probe: dict, sport: int = SPORT):
    """(compiled verdict, compiled reason, reference verdict, reference reason) of one probe."""
    compiled, ref = judges(policy_path)
    keys = probe_keys(c, probe, sport)
    verdict, _rule, reason = compiled.decide(keys, np.array([NEW], np.uint8))
    d = ref.decide_row(keys.row(0), NEW)
    return int(verdict[0]), int(reason[0]), d.verdict, d.reason


# ---- the probes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("probes_path,index", PROBES, ids=PROBE_IDS)
def test_probe(probes_path, index):
    doc = probe_file(probes_path)
    probe = doc["probes"][index]
    path = cluster_path(probes_path)
    c = cluster(path)
    want = EXPECT[probe["expect"]]
    cv, cr, rv, rr = judge(path, c, probe, SPORT + index)
    msg = (
        f"{doc['scenario']}:{probe['id']}: {describe(probe)}; compiled policy: "
        f"{outcome(cv, cr)}, reference: {outcome(rv, rr)}"
    )
    assert (cv == V.ALLOW) == want and (rv == V.ALLOW) == want, msg


@pytest.mark.parametrize("probes_path", SCENARIOS, ids=SCENARIO_IDS)
def test_datapath_end_to_end(probes_path):
    """A scenario's probes as one batch of new connections through the whole datapath."""
    doc = probe_file(probes_path)
    path = cluster_path(probes_path)
    c = cluster(path)
    compiled, _ = judges(path)
    frames = [probe_frame(c, p, SPORT + i) for i, p in enumerate(doc["probes"])]
    ts = [1_000_000_000 + 1000 * i for i in range(len(frames))]
    dp = Datapath(
        compiled,
        DatapathConfig(
            batch_size=64,
            conntrack_capacity=1 << 12,
            emc_entries=1 << 10,
            megaflow_entries=1 << 10,
            offload=False,
            offload_capacity=1 << 10,
        ),
    )
    res = dp.process(Batch.from_packets(frames, ts=ts))
    wrong = [
        f"{p['id']}: {describe(p)}; datapath: {outcome(res.verdict[i], res.reason[i])}"
        for i, p in enumerate(doc["probes"])
        if (int(res.verdict[i]) == V.ALLOW) != EXPECT[p["expect"]]
    ]
    assert not wrong, f"{doc['scenario']}: " + "; ".join(wrong)
    assert np.all((res.ct & ctstate.STATE_MASK) == ctstate.NEW), "every probe opens a connection"


# ---- the harness itself -------------------------------------------------------------------------
def _sources_listed() -> set:
    """Policy files listed in the source folders' READMEs (first column of their tables)."""
    names = set()
    for d in SOURCE_DIRS:
        with open(os.path.join(K8S, d, "README.md")) as f:
            for line in f:
                cells = [x.strip() for x in line.strip().strip("|").split("|")]
                if line.startswith("|") and cells[0].endswith(".yaml"):
                    names.add(os.path.normpath(os.path.join(K8S, d, cells[0])))
    return names


def test_vector_files_are_well_formed():
    """Probe files, cluster files and copied policies hang together (pure data checks)."""
    used = set()
    listed = _sources_listed()
    scenarios = set()
    for path in _probe_files():
        doc = probe_file(path)
        where = os.path.basename(path)
        assert set(doc) == FILE_KEYS, f"{where}: keys {sorted(doc)}"
        assert doc["scenario"] == os.path.splitext(os.path.basename(path))[0], where
        assert doc["scenario"] not in scenarios
        scenarios.add(doc["scenario"])
        cpath = cluster_path(path)
        assert os.path.isfile(cpath), f"{where}: no cluster file {cpath}"
        c = cluster(cpath)
        assert set(c.namespaces), f"{where}: the cluster declares no namespaces"
        for w in c.raw["workloads"]:
            assert w["namespace"] in c.namespaces, f"{where}: {w['name']} in undeclared namespace"
        for entry, docs in c.policy_documents():
            p = os.path.normpath(os.path.join(os.path.dirname(cpath), entry["file"]))
            assert p in listed, f"{where}: {entry['file']} is not listed in its folder's README"
            used.add(p)
            assert entry["tenant"] == c.tenant
            for d in docs:
                if d["kind"] == "NetworkPolicy":
                    ns = d["metadata"].get("namespace", entry.get("namespace"))
                    assert ns in c.namespaces, f"{where}: {entry['file']}: namespace {ns!r}"
                else:
                    assert d["kind"] in ADMIN_KINDS, d["kind"]
                    assert d["apiVersion"] == "policy.networking.k8s.io/v1alpha1"
        ids = set()
        addrs = {a for a, _, _ in c.pods.values()}
        assert len(addrs) == len(c.pods), f"{where}: two pods share an address"
        for probe in doc["probes"]:
            assert set(probe) == PROBE_KEYS, f"{where}: {probe}"
            assert probe["id"] not in ids, f"{where}: probe id {probe['id']} twice"
            ids.add(probe["id"])
            assert probe["expect"] in EXPECT and probe["protocol"] in ("TCP", "UDP")
            assert 1 <= int(probe["port"]) <= 65535 and probe["why"].strip()
            ends = [probe["from"], probe["to"]]
            assert any("/" in e for e in ends), f"{where}: {probe['id']} has no pod end"
            for e in ends:
                if "/" in e:
                    assert e in c.pods, f"{where}: {probe['id']}: no pod {e}"
                else:
                    assert str(ipaddress.ip_address(e)) not in addrs
    copied = {os.path.normpath(p) for d in SOURCE_DIRS for p in glob.glob(os.path.join(K8S, d, "*.yaml"))}
    assert copied == listed, f"README listings and copied files differ: {sorted(copied ^ listed)}"
    assert copied == used, f"copied but unused: {sorted(copied - used)}"


# Today's format: a tenant per namespace, no namespaces inside a tenant, every workload that
# no policy selects for ingress is denied it (zero trust). A scenario whose probes stay inside
# the namespace `default` (or come from outside) reads in that format with the same policy
# files, which checks the harness (addresses, frames, VNI, verdict reading) and, for
# destinations some policy selects, the probes' expectations, against code that exists today.
def _selector_matches(sel, labels: dict) -> bool:
    sel = sel or {}
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != str(v):
            return False
    for e in sel.get("matchExpressions") or ():
        present, vals = e["key"] in labels, [str(v) for v in e.get("values") or ()]
        op = e["operator"]
        if (
            (op == "In" and not (present and labels[e["key"]] in vals))
            or (op == "NotIn" and present and labels[e["key"]] in vals)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def _ingress_selected(c: Cluster, pod: str) -> bool:
    _, _, w = c.pods[pod]
    for entry, docs in c.policy_documents():
        for d in docs:
            spec = d.get("spec") or {}
            types = spec.get("policyTypes") or ["Ingress"]
            ns = d["metadata"].get("namespace", entry.get("namespace"))
            if (
                "Ingress" in types
                and ns == w["namespace"]
                and _selector_matches(spec.get("podSelector"), w.get("labels") or {})
            ):
                return True
    return False


def _todays_format(c: Cluster):
    """The cluster as a tenant `default` of today's format, or None when it does not fit."""
    docs = [d for _, ds in c.policy_documents() for d in ds]
    if any(d["kind"] != "NetworkPolicy" for d in docs):
        return None
    (tenant,) = c.raw["tenants"]
    if "isolation" in tenant or any("isolation" in n for n in c.namespaces.values()):
        return None
    if any(d["metadata"].get("namespace", "default") != "default" for d in docs) or any(
        e.get("namespace", "default") != "default" for e, _ in c.policy_documents()
    ):
        return None
    raw = c.raw
    labels = c.namespaces["default"].get("labels") or {}
    workloads = [
        {k: v for k, v in w.items() if k not in ("namespace", "named_ports")} | {"tenant": "default"}
        for w in raw["workloads"]
        if w["namespace"] == "default"
    ]
    out = {
        "version": 1,
        "tenants": [{"name": "default", "vni": c.vni, "labels": labels}],
        "hosts": raw["hosts"],
        "workloads": workloads,
        "network_policies": [{"file": e["file"], "namespace": "default"} for e in raw["network_policies"]],
        "default_egress": raw.get("default_egress", "deny"),
    }
    return parse_policy(yaml.safe_dump(out), c.path, os.path.dirname(c.path))


def _todays_cases():
    out, ids = [], []
    for path in SCENARIOS:
        c = cluster(cluster_path(path))
        if _todays_format(c) is None:
            continue
        for i, p in enumerate(probe_file(path)["probes"]):
            if all(e.startswith("default/") or "/" not in e for e in (p["from"], p["to"])):
                out.append((path, i))
                ids.append(f"{probe_file(path)['scenario']}:{p['id']}")
    return out, ids


TODAY, TODAY_IDS = _todays_cases()


@pytest.mark.parametrize("probes_path,index", TODAY, ids=TODAY_IDS)
def test_harness_on_todays_format(probes_path, index):
    doc = probe_file(probes_path)
    probe = doc["probes"][index]
    c = cluster(cluster_path(probes_path))
    policy = _todays_format(c)
    compiled, ref = compile_policy(policy), Reference(policy)
    keys = probe_keys(c, probe, SPORT + index)
    verdict, _, reason = compiled.decide(keys, np.array([NEW], np.uint8))
    d = ref.decide_row(keys.row(0), NEW)
    dst_pod = "/" in probe["to"]
    want = EXPECT[probe["expect"]] if not dst_pod or _ingress_selected(c, probe["to"]) else False
    today = "as expected" if want == EXPECT[probe["expect"]] else "denied: no policy selects it"
    msg = (
        f"{doc['scenario']}:{probe['id']} in today's format: {describe(probe)} "
        f"(today: {today}); compiled policy: {outcome(verdict[0], reason[0])}, "
        f"reference: {outcome(d.verdict, d.reason)}"
    )
    assert (int(verdict[0]) == V.ALLOW) == want and (d.verdict == V.ALLOW) == want, msg


def test_todays_format_covers_plain_pod_selector_ingress():
    """The self-check above is not empty and includes both verdicts."""
    assert len(TODAY) >= 20
    kinds = {probe_file(p)["probes"][i]["expect"] for p, i in TODAY}
    assert kinds == {"allowed", "denied"}
