"""`microseg trace` and `microseg policy query` through the command line: exit status (0
allowed, 1 dropped or rejected, 2 bad input) and workload names ([tenant/][namespace/]name,
ambiguous bare names refused with the candidates listed)."""

import json

import pytest

from microseg.cli import main

# Two tenants that both have a workload called "web" (same address, too: overlapping plans).
POLICY = """\
tenants:
  - {name: acme, vni: 5001}
  - {name: globex, vni: 5002}
hosts:
  - {name: h1, address: 10.0.0.1}
  - {name: h2, address: 10.0.0.2}
security_groups:
  - {name: web, tenant: acme, rules: [{direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}]}
  - {name: web, tenant: globex, rules: [{direction: ingress, protocol: tcp, port_range_min: 8080, port_range_max: 8080}]}
workloads:
  - {name: web, tenant: acme, host: h1, mac: "02:00:00:00:01:01", ipv4: 192.168.1.10, security_groups: [web]}
  - {name: db, tenant: acme, host: h2, mac: "02:00:00:00:01:02", ipv4: 192.168.1.20}
  - {name: only6, tenant: acme, host: h2, mac: "02:00:00:00:01:03", ipv6: "fd00::30"}
  - {name: web, tenant: globex, host: h2, mac: "02:00:00:00:02:01", ipv4: 192.168.1.10, security_groups: [web]}
  - {name: app, tenant: globex, host: h1, mac: "02:00:00:00:02:02", ipv4: 192.168.1.30}
default_egress: allow
deny_action: {deny}
"""


@pytest.fixture
def policy(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY.replace("{deny}", "drop"))
    return str(p)


def _trace(capsys, policy, packet, *extra):
    rc = main(["trace", "--policy", policy, "--json", *extra, packet])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc != 2 else None), out.err


def _endpoints(doc):
    return next(s["detail"] for s in doc["steps"] if s["stage"] == "endpoints")


@pytest.mark.parametrize(
    "packet,rc,vni,endpoints",
    [
        # a bare name is looked up in the tenant of the other (unique) one: db is acme's only
        ("src=db dst=web tcp dport=80", 0, 5001, "source acme/db, destination acme/web"),
        ("src=acme/db dst=acme/web tcp dport=22", 1, 5001, "source acme/db, destination acme/web"),
        # tenant/namespace/name, the namespace being the tenant's own
        ("src=acme/acme/db dst=web tcp dport=80", 0, 5001, "source acme/db, destination acme/web"),
        # tenant= makes the bare name globex's
        (
            "src=192.168.1.99 dst=web tenant=globex tcp dport=8080",
            0,
            5002,
            "source not a workload, destination globex/web",
        ),
        ("src=app dst=web tcp dport=8080", 0, 5002, "source globex/app, destination globex/web"),
        ("src=app dst=web tcp dport=80", 1, 5002, "source globex/app, destination globex/web"),
    ],
)
def test_trace_names_and_exit_status(capsys, policy, packet, rc, vni, endpoints):
    got, doc, err = _trace(capsys, policy, packet)
    assert got == rc, err
    assert doc["packet"]["vni"] == vni
    assert _endpoints(doc).startswith(endpoints)
    assert doc["verdict"] == ("allow" if rc == 0 else "drop")


def test_trace_reject_exits_1_and_text_output_too(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(POLICY.replace("{deny}", "reject"))
    rc, doc, _ = _trace(capsys, str(p), "src=db dst=web tcp dport=22")
    assert rc == 1 and doc["verdict"] == "reject"
    assert main(["trace", "--policy", str(p), "src=db dst=web tcp dport=22"]) == 1
    assert "reject" in capsys.readouterr().out
    assert main(["trace", "--policy", str(p), "src=db dst=web tcp dport=80"]) == 0
    assert "allow" in capsys.readouterr().out


@pytest.mark.parametrize(
    "packet,needle",
    [
        # no tenant known and two workloads called web: the candidates, qualified
        ("src=192.168.1.99 dst=web dport=80", "dst: 'web' is ambiguous: acme/web, globex/web"),
        ("src=web dst=web dport=80", "src: 'web' is ambiguous: acme/web, globex/web"),
        # db is acme's only; with the packet in globex it is not silently taken from acme
        ("src=app dst=db dport=80", "dst: no workload 'db' in tenant 'globex'; other tenants have acme/db"),
        ("src=db dst=web tenant=globex dport=80", "src: no workload 'db' in tenant 'globex'"),
        ("src=acme/other/db dst=web", "tenant 'acme' has no namespace 'other' (its namespaces: acme)"),
        ("src=initech/db dst=web", "no tenant or namespace 'initech' (tenants: acme, globex)"),
        ("src=acme/ghost dst=web", "no workload 'ghost' in tenant 'acme'"),
        ("src=a/b/c/d dst=web", "is not a workload name ([tenant/][namespace/]name)"),
        ("src=acme//db dst=web", "is not a workload name"),
        ("src=only6 dst=acme/web", "share no address family"),
        ("src=192.168.1.1 dst=fd00::1", "must be of one IP version"),
        ("src=nobody dst=acme/web", "'nobody' is neither an address nor a workload"),
        ("src=db dst=web tenant=16777216", "no tenant '16777216'"),
    ],
)
def test_trace_bad_names_exit_2_with_one_line(capsys, policy, packet, needle):
    rc, _, err = _trace(capsys, policy, packet)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_trace_bad_policy_exits_2(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("tenants: [{name: a, vni: x}]\n")
    assert main(["trace", "--policy", str(p), "src=1.2.3.4 dst=1.2.3.5"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:1" in err and "Traceback" not in err


# ---- microseg policy query ----------------------------------------------------------------------
def _query(capsys, policy, *args):
    rc = main(["policy", "query", policy, "--json", *args])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc != 2 else None), out.err


@pytest.mark.parametrize(
    "args,rc,vni,src,dst",
    [
        (["--src", "db", "--dst", "web", "--dport", "80"], 0, 5001, "acme/db", "acme/web"),
        (["--src", "acme/db", "--dst", "acme/acme/web", "--dport", "22"], 1, 5001, "acme/db", "acme/web"),
        (
            ["--vni", "5002", "--src", "192.168.1.99", "--dst", "web", "--dport", "8080"],
            0,
            5002,
            None,
            "globex/web",
        ),
        (
            ["--vni", "5002", "--src", "192.168.1.99", "--dst", "web", "--dport", "80"],
            1,
            5002,
            None,
            "globex/web",
        ),
        (["--src", "globex/app", "--dst", "web", "--dport", "8080"], 0, 5002, "globex/app", "globex/web"),
        # addresses only: untunnelled unless --vni says otherwise (as before names)
        (
            ["--vni", "5001", "--src", "192.168.1.20", "--dst", "192.168.1.10", "--dport", "80"],
            0,
            5001,
            None,
            None,
        ),
        (["--src", "192.168.1.20", "--dst", "192.168.1.10", "--dport", "80"], 1, -1, None, None),
    ],
)
def test_query_names_and_exit_status(capsys, policy, args, rc, vni, src, dst):
    got, doc, err = _query(capsys, policy, *args)
    assert got == rc, err
    assert (doc["vni"], doc["src_workload"], doc["dst_workload"]) == (vni, src, dst)
    assert doc["verdict"] == ("allow" if rc == 0 else "drop")
    if dst is not None:
        assert doc["dst"] == "192.168.1.10"


def test_query_untunnelled_uses_the_untagged_tenant_for_bare_names(capsys, tmp_path):
    p = tmp_path / "u.yaml"
    p.write_text(POLICY.replace("{deny}", "drop") + "untagged_tenant: globex\n")
    rc, doc, err = _query(capsys, str(p), "--vni", "-1", "--src", "app", "--dst", "web", "--dport", "8080")
    assert rc == 0, err
    assert (doc["vni"], doc["dst_workload"], doc["reason"]) == (-1, "globex/web", "policy")


def test_query_reject_exits_1(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(POLICY.replace("{deny}", "reject"))
    rc, doc, _ = _query(capsys, str(p), "--src", "db", "--dst", "web", "--dport", "22")
    assert rc == 1 and doc["verdict"] == "reject"
    assert main(["policy", "query", str(p), "--src", "db", "--dst", "web", "--dport", "22"]) == 1
    assert "verdict: reject" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--src", "192.168.1.99", "--dst", "web"], "--dst: 'web' is ambiguous: acme/web, globex/web"),
        (
            ["--src", "globex/app", "--dst", "db"],
            "--dst: no workload 'db' in tenant 'globex'; other tenants have acme/db",
        ),
        (["--vni", "5002", "--src", "db", "--dst", "web"], "--src: no workload 'db' in tenant 'globex'"),
        (["--src", "acme/globex/db", "--dst", "web"], "tenant 'acme' has no namespace 'globex'"),
        (["--src", "nobody", "--dst", "acme/web"], "--src: 'nobody' is neither an IP address nor a workload"),
        (["--src", "only6", "--dst", "192.168.1.10"], "share no address family"),
        (["--vni", "16777216", "--src", "db", "--dst", "web"], "--vni: 16777216 is not -1 or a VNI"),
    ],
)
def test_query_bad_names_exit_2_with_one_line(capsys, policy, args, needle):
    rc, _, err = _query(capsys, policy, *args)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
