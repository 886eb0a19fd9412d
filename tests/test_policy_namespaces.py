"""Namespaces inside a tenant, Kubernetes isolation defaults, named ports and admin network
policies: the compiled decision and the reference, on cases the Kubernetes documentation and
the network-policy-api project describe."""

import textwrap

import numpy as np
import pytest

from microseg import ctstate
from microseg.cli import main
from microseg.errors import InputError
from microseg.packet.batch import text_to_addr
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy, connection_keys
from microseg.policy.model import parse_policy
from microseg.policy.reference import Reference

CLUSTER = """
tenants:
  - name: cluster1
    vni: 100
    namespaces:
      - {name: default}
      - {name: prod, labels: {purpose: production}}
      - {name: kube-system}
  - {name: other, vni: 200}
hosts: [{name: n1, address: 192.168.50.1}]
workloads:
  - {name: web, tenant: cluster1, namespace: default, ipv4: 10.0.1.1, labels: {app: web},
     named_ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]}
  - {name: client, tenant: cluster1, namespace: default, ipv4: 10.0.1.2, labels: {app: client}}
  - {name: db, tenant: cluster1, namespace: prod, ipv4: 10.0.2.1, labels: {app: db},
     named_ports: [{name: pg, port: 5432}]}
  - {name: web, tenant: cluster1, namespace: prod, ipv4: 10.0.2.2, labels: {app: web},
     named_ports: [{name: http, port: 9090}]}
  - {name: kube-dns, tenant: cluster1, namespace: kube-system, ipv4: 10.0.9.53, labels: {k8s-app: kube-dns}}
  - {name: vm, tenant: other, ipv4: 10.0.1.1}
default_egress: allow
"""
ADDR = {
    "default/web": "10.0.1.1",
    "default/client": "10.0.1.2",
    "prod/db": "10.0.2.1",
    "prod/web": "10.0.2.2",
    "kube-system/kube-dns": "10.0.9.53",
    "outside": "203.0.113.9",
}
PROTO = {"tcp": 6, "udp": 17}


def _policy(tmp_path, extra="", tenant_extra=None, files=None):
    text = textwrap.dedent(CLUSTER)
    if tenant_extra:
        text = text.replace("    vni: 100\n", f"    vni: 100\n    {tenant_extra}\n", 1)
    for name, body in (files or {}).items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    path = tmp_path / "p.yaml"
    path.write_text(text + textwrap.dedent(extra))
    return parse_policy(path.read_text(), str(path), str(tmp_path))


def decide(policy, probes, vni=100):
    """(compiled verdicts, reference verdicts) for [(src, dst, proto, dport)] as NEW."""
    cols = {k: [] for k in ("src_hi", "src_lo", "dst_hi", "dst_lo", "proto", "dport")}
    for s, d, proto, dport in probes:
        sh, sl = text_to_addr(ADDR.get(s, s))
        dh, dl = text_to_addr(ADDR.get(d, d))
        for k, v in zip(cols, (sh, sl, dh, dl, PROTO[proto], dport)):
            cols[k].append(v)
    n = len(probes)
    keys = connection_keys(
        np.full(n, vni),
        *(np.array(cols[k], np.uint64) for k in ("src_hi", "src_lo", "dst_hi", "dst_lo")),
        np.array(cols["proto"]),
        np.full(n, 40000),
        np.array(cols["dport"]),
    )
    ct = np.full(n, ctstate.TRACKED | ctstate.NEW, np.uint8)
    compiled = compile_policy(policy)
    v, _, r = compiled.decide(keys, ct)
    ref = Reference(policy)
    refd = [ref.decide_row(keys.row(i), int(ct[i])) for i in range(n)]
    for i in range(n):
        assert (int(v[i]), int(r[i])) == (refd[i].verdict, refd[i].reason), probes[i]
    return ["allow" if x == V.ALLOW else "deny" for x in v], [int(x) for x in r]


def _np(name, ns, spec):
    return f"""
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {{name: {name}, namespace: {ns}}}
    spec: {spec}
"""


def test_unselected_pods_are_non_isolated(tmp_path):
    p = _policy(tmp_path)
    got, why = decide(p, [("default/client", "prod/db", "tcp", 5432), ("outside", "default/web", "tcp", 1)])
    assert got == ["allow", "allow"] and why == [V.R_NON_ISOLATED] * 2


def test_zero_trust_is_an_explicit_setting(tmp_path):
    p = _policy(tmp_path, tenant_extra="isolation: deny")
    got, _ = decide(
        p, [("default/client", "prod/db", "tcp", 5432), ("default/client", "outside", "tcp", 443)]
    )
    assert got == ["deny", "allow"]  # ingress denied; egress as default_egress: allow
    assert all(n.isolation == "deny" for n in p.tenants[0].namespaces)


def test_namespace_isolation_overrides_the_tenant(tmp_path):
    text = textwrap.dedent(CLUSTER).replace(
        "{name: prod, labels: {purpose: production}}",
        "{name: prod, labels: {purpose: production}, isolation: deny}",
    )
    (tmp_path / "p.yaml").write_text(text)
    p = parse_policy(text, str(tmp_path / "p.yaml"), str(tmp_path))
    got, _ = decide(p, [("default/client", "prod/db", "tcp", 5432), ("prod/db", "default/web", "tcp", 80)])
    assert got == ["deny", "allow"]


def test_namespace_selector_admits_another_namespace_of_the_tenant(tmp_path):
    spec = (
        "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [{namespaceSelector: "
        "{matchLabels: {kubernetes.io/metadata.name: default}}}]}]}"
    )
    p = _policy(tmp_path, "network_policies:" + _np("db-from-default", "prod", spec))
    got, _ = decide(
        p,
        [
            ("default/client", "prod/db", "tcp", 5432),
            ("prod/web", "prod/db", "tcp", 5432),
            ("outside", "prod/db", "tcp", 5432),
        ],
    )
    assert got == ["allow", "deny", "deny"]


def test_pod_selector_alone_means_the_policy_namespace(tmp_path):
    spec = "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}"
    p = _policy(tmp_path, "network_policies:" + _np("db-from-web", "prod", spec))
    got, _ = decide(p, [("prod/web", "prod/db", "tcp", 5432), ("default/web", "prod/db", "tcp", 5432)])
    assert got == ["allow", "deny"]


def test_deny_all_egress_also_stops_dns_the_sender_asks_for(tmp_path):
    """Recipe 12 (deny all egress): the sender's egress policy is judged even though the
    destination sits in another namespace (the fail-open of tenant-per-namespace)."""
    spec = "{podSelector: {}, policyTypes: [Egress]}"
    p = _policy(tmp_path, "network_policies:" + _np("deny-egress", "default", spec))
    got, why = decide(
        p,
        [
            ("default/client", "kube-system/kube-dns", "udp", 53),
            ("prod/db", "kube-system/kube-dns", "udp", 53),
        ],
    )
    assert got == ["deny", "allow"] and why[0] == V.R_EGRESS_DENIED


def test_named_ports_resolve_per_destination(tmp_path):
    spec = "{podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: http}]}]}"
    ns = _np("web-http", "default", spec) + _np("web-http", "prod", spec)
    p = _policy(tmp_path, "network_policies:" + ns)
    got, _ = decide(
        p,
        [
            ("default/client", "default/web", "tcp", 8080),
            ("default/client", "default/web", "tcp", 9090),
            ("default/client", "prod/web", "tcp", 9090),
            ("default/client", "prod/web", "tcp", 8080),
        ],
    )
    assert got == ["allow", "deny", "allow", "deny"]


def test_named_port_that_resolves_nowhere_admits_nothing(tmp_path):
    spec = "{podSelector: {matchLabels: {app: db}}, ingress: [{ports: [{port: http}]}]}"
    p = _policy(tmp_path, "network_policies:" + _np("db-http", "prod", spec))
    got, _ = decide(
        p, [("default/client", "prod/db", "tcp", 8080), ("default/client", "prod/db", "tcp", 5432)]
    )
    assert got == ["deny", "deny"]


def test_named_ports_in_egress_resolve_on_the_destination_pod(tmp_path):
    spec = "{podSelector: {matchLabels: {app: client}}, egress: [{ports: [{port: http}]}]}"
    p = _policy(tmp_path, "network_policies:" + _np("client-out", "default", spec))
    got, _ = decide(
        p,
        [
            ("default/client", "default/web", "tcp", 8080),
            ("default/client", "prod/web", "tcp", 9090),
            ("default/client", "prod/web", "tcp", 8080),
            ("default/client", "outside", "tcp", 8080),
        ],
    )
    assert got == ["allow", "allow", "deny", "deny"]


ANP = """
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {{name: {name}}}
spec:
  priority: {prio}
  subject: {subject}
  ingress: {ingress}
"""


def _with_admin(tmp_path, docs, nps=""):
    files = {"admin.yaml": "---\n".join(docs)}
    return _policy(
        tmp_path, "network_policies:\n  - {file: admin.yaml, tenant: cluster1}\n" + nps, files=files
    )


def test_admin_deny_beats_a_networkpolicy_allow(tmp_path):
    anp = ANP.format(
        name="no-default-to-prod",
        prio=10,
        subject="{namespaces: {matchLabels: {purpose: production}}}",
        ingress="[{action: Deny, from: [{namespaces: {matchLabels: "
        "{kubernetes.io/metadata.name: default}}}]}]",
    )
    allow = "{podSelector: {}, ingress: [{}]}"
    p = _with_admin(tmp_path, [anp], _np("allow-all", "prod", allow))
    got, why = decide(p, [("default/client", "prod/db", "tcp", 5432), ("prod/web", "prod/db", "tcp", 5432)])
    assert got == ["deny", "allow"] and why[0] == V.R_INGRESS_DENIED


def test_admin_allow_beats_a_networkpolicy_deny_and_pass_hands_over(tmp_path):
    allow = ANP.format(
        name="dns",
        prio=5,
        subject="{namespaces: {}}",
        ingress="[{action: Allow, from: [{namespaces: {}}], ports: [{portNumber: {protocol: TCP, port: 5432}}]},"
        " {action: Pass, from: [{namespaces: {}}], ports: [{portRange: {protocol: TCP, start: 1, end: 1000}}]},"
        " {action: Deny, from: [{namespaces: {}}]}]",
    )
    deny_all = "{podSelector: {}, policyTypes: [Ingress]}"
    allow_80 = "{podSelector: {}, ingress: [{ports: [{port: 80}]}]}"
    p = _with_admin(tmp_path, [allow], _np("deny", "prod", deny_all) + _np("web80", "prod", allow_80))
    got, _ = decide(
        p,
        [
            ("default/client", "prod/db", "tcp", 5432),  # admin Allow
            ("default/client", "prod/db", "tcp", 80),  # Pass -> NP allows 80
            ("default/client", "prod/db", "tcp", 81),  # Pass -> NP denies
            ("default/client", "prod/db", "tcp", 2000),  # admin Deny
            ("outside", "prod/db", "tcp", 2000),
        ],
    )  # no admin peer: NP denies
    assert got == ["allow", "allow", "deny", "deny", "deny"]


def test_admin_priorities_lower_number_first(tmp_path):
    a = ANP.format(
        name="a-deny",
        prio=20,
        subject="{namespaces: {}}",
        ingress="[{action: Deny, from: [{namespaces: {}}]}]",
    )
    b = ANP.format(
        name="b-allow",
        prio=3,
        subject="{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}",
        ingress="[{action: Allow, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]}]",
    )
    p = _with_admin(tmp_path, [a, b])
    got, _ = decide(
        p,
        [
            ("default/client", "prod/db", "tcp", 5432),
            ("default/client", "prod/web", "tcp", 80),
            ("prod/web", "prod/db", "tcp", 5432),
        ],
    )
    assert got == ["allow", "deny", "deny"]


BANP = """
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
    - {name: default-deny, action: Deny, from: [{namespaces: {}}]}
"""


def test_baseline_applies_only_to_pods_no_networkpolicy_isolates(tmp_path):
    allow_web = "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {}}]}]}"
    p = _with_admin(tmp_path, [BANP], _np("web", "prod", allow_web))
    got, _ = decide(
        p,
        [
            ("prod/db", "prod/web", "tcp", 80),  # NP isolates web: NP allows
            ("prod/web", "prod/db", "tcp", 5432),  # db unselected: baseline denies
            ("outside", "prod/db", "tcp", 5432),
        ],
    )  # no baseline peer: non-isolated
    assert got == ["allow", "deny", "allow"]


def test_policy_compile_shows_isolation(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(CLUSTER))
    assert main(["policy", "compile", str(p)]) == 0
    out = capsys.readouterr().out
    assert "# namespace cluster1/prod: isolation kubernetes" in out
    assert "# namespace other: isolation deny" in out


@pytest.mark.parametrize(
    "change, needle",
    [
        ("namespace: prod, ipv4: 10.0.2.1", "no namespace 'nope' in tenant 'cluster1'"),
        ("metadata: {{name: x, namespace: nope}}", "namespace 'nope' is not a tenant nor a namespace of one"),
        ("port: http", "'HTTP' is neither a port number nor a port name"),
    ],
)
def test_errors_name_the_file_line_and_field(tmp_path, change, needle):
    text = (
        textwrap.dedent(CLUSTER)
        + "network_policies:"
        + _np("x", "default", "{podSelector: {}, ingress: [{ports: [{port: http}]}]}")
    )
    if "namespace: prod" in change:
        text = text.replace("namespace: prod, ipv4: 10.0.2.1", "namespace: nope, ipv4: 10.0.2.1")
    elif "nope" in change:
        text = text.replace("metadata: {name: x, namespace: default}", "metadata: {name: x, namespace: nope}")
    else:
        text = text.replace("port: http}", "port: HTTP}")
    with pytest.raises(InputError) as ei:
        parse_policy(text, "p.yaml")
    assert needle in str(ei.value) and str(ei.value).startswith("p.yaml:")


def test_workload_names_are_unique_per_namespace(tmp_path):
    text = textwrap.dedent(CLUSTER) + ""
    p = parse_policy(text, "p.yaml")
    assert sorted(p.qualified_name(w) for w in p.workloads if w.name == "web") == [
        "cluster1/default/web",
        "cluster1/prod/web",
    ]
    dup = text.replace(
        "{name: client, tenant: cluster1, namespace: default",
        "{name: web, tenant: cluster1, namespace: default",
        1,
    )
    with pytest.raises(InputError, match="defined twice in 'cluster1/default'"):
        parse_policy(dup, "p.yaml")


def test_admin_policy_needs_its_tenant_when_several_could_own_it(tmp_path):
    text = textwrap.dedent(CLUSTER).replace(
        "  - {name: other, vni: 200}", "  - {name: other, vni: 200, namespaces: [{name: x}]}"
    )
    text = text.replace(
        "{name: vm, tenant: other, ipv4: 10.0.1.1}", "{name: vm, tenant: other, namespace: x, ipv4: 10.0.1.1}"
    )
    (tmp_path / "a.yaml").write_text(BANP)
    with pytest.raises(InputError, match="cluster-scoped: give tenant"):
        parse_policy(
            text + "network_policies:\n  - {file: a.yaml}\n", str(tmp_path / "p.yaml"), str(tmp_path)
        )
