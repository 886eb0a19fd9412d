"""The datapath's own verbs: `microseg demo`, `microseg run` and `microseg trace`.

* ``demo``: the built-in virtual data centre (``microseg/data``) -> traffic generator ->
  datapath -> report, checked against the generator's ground truth (a mismatch is an error).
* ``run``: the same datapath on a user's policy and capture.
* ``trace``: one packet's path through every stage, in the spirit of ``ovs-appctl
  ofproto/trace``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import sys
import time

import numpy as np

from . import ctstate
from .datapath import reasons as V
from .errors import InputError
from .packet import batch as B

CHUNK = 16384  # packets per progress step (the datapath works in batch_size-packet batches, 1024)


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in virtual data centre through the datapath",
        description="Generate the built-in data centre's traffic (tenants, "
        "workloads, security groups, a Kubernetes policy, attacks), run it through "
        "the whole datapath, print a report and check every verdict against the "
        "generator's ground truth.",
    )
    p.add_argument(
        "--out", default="microseg-demo", help="folder for the captures and the report (default: %(default)s)"
    )
    p.add_argument("--flows", type=int, default=3000, help="benign flows to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (default: %(default)s)")
    p.add_argument(
        "--tunnel",
        default="vxlan",
        choices=("vxlan", "geneve", "nvgre"),
        help="overlay of the generated traffic and of the output (default: %(default)s)",
    )
    _datapath_args(p)
    p.set_defaults(func=run_demo)

    p = sub.add_parser(
        "run",
        help="run a capture through the datapath under a policy",
        description="Run IN.pcap through the datapath under the policy P.yaml; write "
        "the forwarded frames (and reject replies) to OUT.pcap and a JSON report.",
    )
    p.add_argument("--policy", required=True, help="policy file (YAML, see docs/policy.md)")
    p.add_argument("input", metavar="IN.pcap", help="capture to process (pcap or pcapng)")
    p.add_argument("-w", "--write", metavar="OUT.pcap", help="write the output frames here")
    p.add_argument("--report", metavar="R.json", help="write the JSON report here")
    p.add_argument(
        "--truth",
        metavar="T.truth.npz",
        help="ground truth to check verdicts against (as `microseg generate` writes it)",
    )
    p.add_argument(
        "--tunnel",
        default="vxlan",
        choices=("vxlan", "geneve", "nvgre"),
        help="overlay of the output (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="print no report")
    _datapath_args(p)
    p.set_defaults(func=run_run)

    p = sub.add_parser(
        "trace",
        help="explain one packet's path through the datapath",
        description="Build one packet from a description and show what every stage "
        "does with it: parse, tenant, port security, fast path, conntrack, caches, "
        "rules, verdict, inspection, output. Description: space-separated key=value "
        "tokens: src=, dst= (an address or a workload, [tenant/][namespace/]name; "
        "a bare name is looked up in the packet's tenant, and one that several "
        "tenants use needs the tenant), proto= (tcp, udp, icmp, "
        "icmpv6 or a number; a bare word works too), sport=, dport=, flags= (TCP, "
        "letters FSRPAU), type=, code= (ICMP), tenant= (name or VNI; default: the "
        "source workload's), smac= (default: the source workload's MAC), "
        "payload= (text), tunnel= (vxlan, geneve, nvgre, none). Exit status: 0 "
        "when the packet is allowed, 1 when it is dropped or rejected, 2 on bad "
        "input.",
        epilog='example: microseg trace --policy P.yaml "src=web-1 dst=app-1 tcp dport=443"',
    )
    p.add_argument("--policy", help="policy file (default: the built-in data centre)")
    p.add_argument("packet", help="the packet, as key=value tokens")
    p.add_argument(
        "--state",
        choices=("new", "established"),
        default="new",
        help="established: first run the connection's opening exchange through the "
        "datapath, so the packet belongs to a tracked connection (default: %(default)s)",
    )
    p.add_argument("--signatures", help="inspection rules (Suricata subset)")
    p.add_argument("--json", action="store_true", help="print the trace as JSON")
    p.set_defaults(func=run_trace)


def _datapath_args(p) -> None:
    p.add_argument(
        "--signatures",
        help="inspection rules (Suricata subset, see docs/inspection.md; default for demo: the built-in set)",
    )
    p.add_argument(
        "--caches",
        action="store_true",
        help="put the exact-match and megaflow caches in front of the policy (off by "
        "default: they cost more than they save, see docs/benchmarks.md)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="inspect each flow's first packets and offload the flows that need no more "
        "to the finite fast-path table (on by default only where --signatures can drop)",
    )
    p.add_argument(
        "--no-offload",
        action="store_true",
        help="no inspection or offload even where the signatures can drop",
    )
    p.add_argument(
        "--offload-capacity", type=int, default=500_000, help="fast-path flows (default: %(default)s)"
    )
    p.add_argument(
        "--offload-rate",
        type=float,
        default=7000.0,
        help="fast-path inserts per second of packet time (default: %(default)s)",
    )
    p.add_argument("--inspect", type=int, default=8, help="packets inspected per flow (default: %(default)s)")
    p.add_argument(
        "--conntrack-size", type=int, default=1 << 20, help="conntrack table capacity (default: %(default)s)"
    )
    p.add_argument(
        "--ipsec",
        metavar="SA.yaml",
        help="IPsec SAs and policies (see docs/ipsec.md): "
        "inbound ESP is decrypted before the datapath, output frames the policies protect "
        "leave in ESP (default for demo: the built-in two-site set-up)",
    )
    p.add_argument("--no-ipsec", action="store_true", help="demo: no IPsec between sites")


def _config(args):
    from .datapath import DatapathConfig
    from .offload.inspect import DROP as SIG_DROP
    from .offload.inspect import SignatureSet

    for name in ("offload_capacity", "inspect", "conntrack_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.offload_rate <= 0:
        raise InputError("--offload-rate must be positive")
    sig_path = args.signatures
    if sig_path is None and args.func is run_demo:
        sig_path = builtin_path("signatures.rules")
    sigs = SignatureSet.load(sig_path) if sig_path else None
    # The fastest configuration that gives the same verdicts: the flow caches never change a
    # verdict and cost more than they save, so they stay off unless asked for; inspection (and
    # the offload model it feeds) runs when asked for or when signatures can drop packets --
    # the demo's built-in set only alerts, so the demo inspects only with --offload.
    drops = sigs is not None and any(s.action == SIG_DROP for s in sigs.signatures)
    if args.offload and args.no_offload:
        raise InputError("--offload and --no-offload contradict each other")
    offload = (args.offload or drops) and not args.no_offload
    return DatapathConfig(
        caches=args.caches,
        offload=offload,
        offload_capacity=args.offload_capacity,
        offload_rate=args.offload_rate,
        inspect_packets=args.inspect,
        conntrack_capacity=args.conntrack_size,
        signatures=sigs,
        tunnel=getattr(args, "tunnel", "vxlan"),
    )


def _gateway(args):
    """The IPsec gateway the arguments ask for (None: no IPsec)."""
    from .ipsec.gateway import EspGateway
    from .ipsec.sa import load_config

    path = args.ipsec
    if path is None and args.func is run_demo and not args.no_ipsec:
        path = builtin_path("sites.yaml")
    return EspGateway(load_config(path)) if path else None


def builtin_path(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)


# ---------------------------------------------------------------------------------------------
# processing with a progress bar
# ---------------------------------------------------------------------------------------------
def _warm_up(dp, batch) -> None:
    """Load the compiled kernels on a throwaway datapath, so the reported rate is the
    datapath's and not the first calls' loading of machine code."""
    from dataclasses import replace

    from .datapath import Datapath

    cfg = replace(
        dp.config, conntrack_capacity=4096, emc_entries=256, megaflow_entries=256, offload_capacity=256
    )
    Datapath(dp.policy, cfg).process(batch.slice(0, min(len(batch), 2048)))


def _process(dp, forwarder, chunks, total: int, writer=None, quiet=False, gateway=None):
    """Run the chunks through ``dp``; returns the concatenated per-packet results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .datapath import BatchResult

    results = []
    from .ipsec.gateway import decrypt_inbound

    with Progress(
        TextColumn("[bold]datapath"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("packets"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=False,
    ) as prog:
        task = prog.add_task("run", total=total)
        for b in chunks:
            b, keys = decrypt_inbound(gateway, b)  # the one parse of these packets
            r = dp.process(b, keys=keys)
            results.append(r)
            if writer is not None:
                out = forwarder.output(b, r)
                if len(out):
                    writer.write(out)
            prog.advance(task, len(b))
    return BatchResult.concat(results)


def _truth_check(res, truth) -> dict:
    """Compare verdicts (every packet) and conntrack states (where the truth gives one)."""
    n = len(res.verdict)
    if len(truth) != n:
        raise InputError(f"the ground truth describes {len(truth)} packets, the capture has {n}")
    bad_v = np.flatnonzero(res.verdict != truth.verdict)
    has_ct = truth.ct != 0
    mask = ctstate.STATE_MASK | ctstate.REPLY
    bad_c = np.flatnonzero(has_ct & ((res.ct & mask) != (truth.ct & mask)))
    examples = []
    for i in np.union1d(bad_v, bad_c)[:10].tolist():
        rec = truth.record(i)
        examples.append(
            {
                "packet": i,
                "expected": {"verdict": rec["verdict"], "ct": rec["ct"], "reason": rec["reason"]},
                "got": {
                    "verdict": V.verdict_name(res.verdict[i]),
                    "ct": ctstate.state_name(int(res.ct[i])),
                    "reason": V.REASONS.get(int(res.reason[i]), str(res.reason[i])),
                },
            }
        )
    return {
        "packets": n,
        "verdict_mismatches": int(bad_v.size),
        "ct_checked": int(np.count_nonzero(has_ct)),
        "ct_mismatches": int(bad_c.size),
        "examples": examples,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def build_report(dp, forwarder, res, seconds: float, truth_check: dict | None) -> dict:
    st = dp.stats()
    insp = st["inspection"]
    table = insp["table"]
    tenants = {t.vni: t.name for t in dp.policy.policy.tenants}
    report = {
        "policy": st["policy"],
        "packets": st["packets"],
        "bytes": st["bytes"],
        "throughput": {
            "seconds": seconds,
            "datapath_seconds": st["seconds"],
            "mpps": st["packets"] / st["seconds"] / 1e6 if st["seconds"] else 0.0,
            "gbps": st["bytes"] * 8 / st["seconds"] / 1e9 if st["seconds"] else 0.0,
        },
        "verdicts": st["verdicts"],
        "reasons": st["reasons"],
        "by_tenant": {
            (tenants[int(k)] if k != "other" else "untunnelled or unknown VNI"): v
            for k, v in st["tenants"].items()
        },
        "rules": st["rules"],
        "workloads": st["workloads"],
        "conntrack_states": st["conntrack_states"],
        "conntrack": st["conntrack"],
        "cache_levels": st["levels"],
        "cache_hit_rates": st["hit_rates"],
        "emc": st.get("emc"),
        "megaflow": st.get("megaflow"),
        "offload": {
            "packet_share": table["packet_share"],
            "byte_share": table["byte_share"],
            "occupancy": table["occupancy"],
            "capacity": table["capacity"],
            "inserts": table["inserts"],
            "refused": table["refused"],
            "rate": table["rate"],
        },
        "inspection": {k: v for k, v in insp.items() if k != "table"},
        "output": dict(forwarder.counters) if forwarder is not None else None,
        "revoked_connections": st["revoked_connections"],
        "tunnels": st["tunnels"],
        "tunnels_not_followed": st["tunnels_not_followed"],
        "truncated_packets": st["truncated_packets"],
        "configuration": {
            "caches": bool(dp.config.caches),
            "offload": bool(dp.config.offload),
            "fast_path": bool(dp.config.fast_path),
        },
    }
    # every packet not allowed, by the reason it was stopped
    from .datapath.reasons import REASONS

    vals, cnt = np.unique(res.reason[res.verdict != V.ALLOW], return_counts=True)
    report["drop_reasons"] = {REASONS.get(v_, str(v_)): c_ for v_, c_ in zip(vals.tolist(), cnt.tolist())}
    report["explanation"] = explain_drops(report, dp.policy.policy)
    if truth_check is not None:
        report["ground_truth"] = truth_check
    return report


# Why one reason may stop most of a run, and the setting that changes it.
_HINTS = {
    "no_tenant": "the packets carry no tunnel header and the policy names no tenant for "
    "untunnelled traffic: set `untagged_tenant: {tenant}` in the policy to judge "
    "them as that tenant's",
    "unknown_vni": "the tunnels carry VNIs that no tenant of the policy has: give each tenant "
    "its `vni`, or add the missing tenants",
    "no_endpoint": "neither address belongs to a workload of the packet's tenant: check the "
    "workloads' `ipv4`/`ipv6` (and `untagged_tenant` for untunnelled traffic)",
    "spoofed_source": "the source MACs are not the workloads' own: fix the workloads' `mac`, "
    "or set `anti_spoofing: false` for a capture taken off the workloads' ports",
    "ct_invalid": "conntrack calls the packets INVALID (see the conntrack counters): typical of "
    "a capture that starts mid-stream with odd flags, has bad L4 checksums "
    "(checksum offload on the capturing host), or lost packets",
    "parse_error": "the parser could not read the packets: `microseg parse FILE` shows the error of each",
    "non_ip": "the frames are neither IP nor ARP (e.g. LLDP, STP): nothing to change unless "
    "they should have been IP",
    "egress_denied": "the senders' egress policy denies the connections: `microseg policy "
    "query` explains one; `default_egress: allow` opens egress where no "
    "security group applies",
    "ingress_denied": "the receivers' ingress policy denies the connections: `microseg policy "
    "query` explains one",
    "mapped_address": "the packets use IPv4-mapped IPv6 addresses, which are never accepted",
}


def _ipsec_report(gw) -> dict:
    """The gateway's SAs (never their keys), drops by reason and lifetime events."""
    return {
        "sas": gw.sa_stats(),
        "drops": gw.drop_counts(),
        "events": dict(gw.event_counts),
        "lifetime_events": [e.as_dict() for e in gw.pop_events()],
    }


def explain_drops(report: dict, policy) -> list[str]:
    """One line when a single reason stopped most (over half) of the run's packets: the share,
    the likely cause and the setting that changes it."""
    n = report["packets"]
    drops = report.get("drop_reasons") or {}
    if not n or not drops:
        return []
    reason, count = max(drops.items(), key=lambda kv: kv[1])
    if count * 2 <= n:
        return []
    tenant = policy.tenants[0].name if policy.tenants else "TENANT"
    hint = _HINTS.get(reason, "see `microseg trace` for one packet's path").format(tenant=tenant)
    return [f"{count / n:.0%} of the packets were stopped as {reason}: {hint}."]


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()

    def table(title, cols, rows):
        t = Table(title=title, title_justify="left", title_style="bold")
        for c in cols:
            t.add_column(c, justify="right" if c not in (cols[0],) else "left")
        for r in rows:
            t.add_row(*[str(x) for x in r])
        con.print(t)

    n = report["packets"]
    th = report["throughput"]
    con.print(
        f"[bold]{n:,} packets, {report['bytes']:,} bytes[/bold] through policy "
        f"v{report['policy']['version']} ({report['policy']['rules']} rules); datapath "
        f"{th['datapath_seconds']:.2f} s = {th['mpps']:.2f} Mpps, {th['gbps']:.2f} Gbit/s "
        "on one core, Python orchestration included"
    )
    tenants = report["by_tenant"]
    table(
        "Verdicts by tenant",
        ["tenant", "allow", "drop", "reject"],
        [(t, v.get("allow", 0), v.get("drop", 0), v.get("reject", 0)) for t, v in sorted(tenants.items())],
    )
    if report["drop_reasons"]:
        table(
            "Dropped or rejected, by reason",
            ["reason", "packets"],
            sorted(report["drop_reasons"].items(), key=lambda kv: -kv[1]),
        )
    if report["rules"]:
        by_origin: dict[str, int] = {}
        for r in report["rules"]:
            by_origin[r["rule"]] = by_origin.get(r["rule"], 0) + r["packets"]
        table(
            "Rules that let new connections in (top 10, by source rule)",
            ["rule", "packets"],
            sorted(by_origin.items(), key=lambda kv: -kv[1])[:10],
        )
    cts = report["conntrack_states"]
    table(
        "Conntrack states",
        ["state", "packets"],
        [(k, cts.get(k, 0)) for k in ("new", "established", "related", "invalid", "untracked") if cts.get(k)],
    )
    lv = report["cache_levels"]
    table(
        "Which level answered",
        ["level", "packets", "share"],
        [(k, v, f"{report['cache_hit_rates'][k]:.1%}") for k, v in lv.items()],
    )
    off = report["offload"]
    ref = off["refused"]
    if not report.get("configuration", {}).get("offload", True):
        con.print(
            "[bold]Inspection and offload[/bold]: off, the fastest configuration with the "
            "same verdicts (--offload inspects each flow's first packets and offloads the "
            "flows that need no more)"
        )
    else:
        con.print(
            f"[bold]Offload[/bold]: {off['packet_share']:.1%} of packets and "
            f"{off['byte_share']:.1%} of bytes on the fast path; table "
            f"{off['occupancy']:,}/{off['capacity']:,} flows; {off['inserts']:,} inserts, "
            f"refused: {ref['rate']:,} by rate ({off['rate']:,.0f}/s), {ref['capacity']:,} "
            f"by capacity, {ref['collision']:,} by collision"
        )
        insp = report["inspection"]
        flows = insp.get("flows", {})
        con.print(
            f"[bold]Inspection[/bold]: {insp.get('inspected', 0):,} packets inspected; "
            "flows: " + ", ".join(f"{k} {v:,}" for k, v in flows.items() if v)
        )
    out = report.get("output") or {}
    con.print(
        f"[bold]Output[/bold]: {out.get('forwarded', 0):,} frames re-encapsulated towards their "
        f"workload's host, {out.get('forwarded_plain', 0):,} leaving the overlay, "
        f"{out.get('rejects_sent', 0):,} reject replies"
        + (
            f"; {out.get('esp_sent', 0):,} left in IPsec ESP towards the other site"
            if "ipsec" in report
            else ""
        )
    )
    if "ipsec" in report:
        drops = {k: v for k, v in report["ipsec"]["drops"].items() if v}
        if drops:
            con.print(f"[bold]IPsec drops[/bold]: {drops}")
    tun, nf = report.get("tunnels") or {}, report.get("tunnels_not_followed") or {}
    if tun or nf or report.get("truncated_packets"):
        parts = [", ".join(f"{k} {v:,}" for k, v in tun.items()) or "none"]
        if nf:
            parts.append(
                "not followed (judged as the outer packet): " + ", ".join(f"{k} {v:,}" for k, v in nf.items())
            )
        if report.get("truncated_packets"):
            parts.append(f"{report['truncated_packets']:,} packets snapped short by the capture")
        con.print("[bold]Tunnels[/bold]: " + "; ".join(parts))
    for line in report.get("explanation") or ():
        con.print(f"[bold yellow]Note[/bold yellow]: {line}")
    gt = report.get("ground_truth")
    if gt is not None:
        ok = gt["verdict_mismatches"] == 0 and gt["ct_mismatches"] == 0
        colour = "green" if ok else "red"
        con.print(
            f"[bold {colour}]Ground truth[/bold {colour}]: verdicts agree on "
            f"{gt['packets'] - gt['verdict_mismatches']:,}/{gt['packets']:,} packets; conntrack "
            f"states on {gt['ct_checked'] - gt['ct_mismatches']:,}/{gt['ct_checked']:,}"
        )
        for e in gt["examples"]:
            con.print(f"  packet {e['packet']}: expected {e['expected']}, got {e['got']}")


# ---------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------
def _write_json(path: str, obj) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", path) from None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def run_demo(args) -> int:
    from rich.console import Console

    from .datapath import Datapath, Forwarder
    from .io.generator import generate, load_policy
    from .io.pcap import PcapWriter
    from .io.scenario import ScenarioConfig
    from .policy.compiler import compile_policy

    con = Console()
    if args.flows < 1:
        raise InputError("--flows must be at least 1")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    policy = load_policy()
    compiled = compile_policy(policy)
    con.print(
        f"[bold]Virtual data centre[/bold]: {len(policy.tenants)} tenants, "
        f"{len(policy.workloads)} workloads on {len(policy.hosts)} hosts, "
        f"{len(policy.security_groups)} security groups, "
        f"{len(policy.network_policies)} Kubernetes NetworkPolicies -> "
        f"{len(compiled.ruleset)} rules (policy v{compiled.version})"
    )
    gen = generate(policy, ScenarioConfig(seed=args.seed, flows=args.flows, tunnel=args.tunnel))
    paths = gen.write(os.path.join(args.out, "input.pcap"))
    summ = gen.truth.summary()
    con.print(
        f"[bold]Traffic[/bold]: {len(gen.batch):,} packets in {len(gen.flows):,} flows "
        f"({args.tunnel}); by label: " + ", ".join(f"{k} {v:,}" for k, v in summ["by_label"].items())
    )
    cfg = _config(args)
    dp = Datapath(compiled, cfg)
    gw = _gateway(args)
    fw = Forwarder(compiled, tunnel=args.tunnel, gateway=gw)
    out_path = os.path.join(args.out, "output.pcap")
    _warm_up(dp, gen.batch)
    with PcapWriter(out_path, nanosecond=True) as w:
        res = _process(dp, fw, gen.batch.chunks(CHUNK), len(gen.batch), writer=w)
    seconds = time.perf_counter() - t0
    check = _truth_check(res, gen.truth)
    report = build_report(dp, fw, res, seconds, check)
    if gw is not None:
        report["ipsec"] = _ipsec_report(gw)
    report["files"] = {
        "input": paths["pcap"],
        "truth": paths["truth"],
        "output": out_path,
        "report": os.path.join(args.out, "report.json"),
    }
    _write_json(report["files"]["report"], report)
    print_report(report, con)
    con.print("Files: " + ", ".join(f"{k} {v}" for k, v in report["files"].items()))
    if check["verdict_mismatches"] or check["ct_mismatches"]:
        con.print("[bold red]error: the datapath disagrees with the ground truth[/bold red]")
        return 1
    return 0


def run_run(args) -> int:
    from rich.console import Console

    from .datapath import Datapath, Forwarder
    from .io.pcap import PcapWriter, iter_capture
    from .policy.compiler import compile_policy
    from .policy.model import load_policy

    con = Console(stderr=False)
    if not os.path.exists(args.input):
        raise InputError("no such file", args.input)
    compiled = compile_policy(load_policy(args.policy))
    cfg = _config(args)
    dp = Datapath(compiled, cfg)
    gw = _gateway(args)
    fw = Forwarder(compiled, tunnel=args.tunnel, gateway=gw)
    t0 = time.perf_counter()
    total = os.path.getsize(args.input)
    writer = PcapWriter(args.write, nanosecond=True) if args.write else None
    try:
        res = _process(
            dp, fw, iter_capture(args.input, batch_size=CHUNK), 0, writer=writer, quiet=True, gateway=gw
        )
    finally:
        if writer is not None:
            writer.close()
    check = None
    if args.truth:
        from .io.generator import GroundTruth

        check = _truth_check(res, GroundTruth.load_npz(args.truth))
    report = build_report(dp, fw, res, time.perf_counter() - t0, check)
    if gw is not None:
        report["ipsec"] = _ipsec_report(gw)
    report["files"] = {"input": args.input, "output": args.write, "report": args.report, "input_bytes": total}
    if args.report:
        _write_json(args.report, report)
    if not args.quiet:
        print_report(report, con)
    else:
        for line in report["explanation"]:
            print(f"microseg: note: {line}", file=sys.stderr)
    if check is not None and (check["verdict_mismatches"] or check["ct_mismatches"]):
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------------
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132}


def parse_packet_spec(text: str, policy) -> dict:
    """The key=value description of a packet -> a dict of resolved fields (see `trace --help`)."""
    from .policy.model import Workload
    from .policy.names import pick_addresses, resolve_endpoints

    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise InputError(f"packet description: {exc}") from None
    spec = {}
    for tok in tokens:
        if "=" in tok:
            k, v = tok.split("=", 1)
            k = k.strip().lower()
            if k not in (
                "src",
                "dst",
                "proto",
                "sport",
                "dport",
                "flags",
                "type",
                "code",
                "tenant",
                "smac",
                "dmac",
                "payload",
                "tunnel",
                "seq",
                "ack",
                "id",
            ):
                raise InputError(f"packet description: unknown key {k!r}")
            spec[k] = v
        elif tok.lower() in _PROTOS:
            spec["proto"] = tok.lower()
        else:
            raise InputError(f"packet description: cannot read {tok!r} (expected key=value or a protocol)")
    for need in ("src", "dst"):
        if need not in spec:
            raise InputError(f"packet description: {need}= is required")
    tenants = {t.name: t for t in policy.tenants}
    vni_of = {t.vni: t for t in policy.tenants}
    tenant = None
    if "tenant" in spec:
        t = spec["tenant"]
        if t in tenants:
            tenant = tenants[t]
        elif t.isdigit() and int(t) in vni_of:
            tenant = vni_of[int(t)]
        elif t.isdigit() and int(t) <= 0xFFFFFF:
            tenant = int(t)  # a VNI no tenant has: the datapath will say so
        else:
            raise InputError(f"packet description: tenant: no tenant {t!r}")
    s, d = resolve_endpoints(
        policy,
        [spec["src"], spec["dst"]],
        getattr(tenant, "name", None),
        ("packet description: src", "packet description: dst"),
    )
    for x, what in ((s, "src"), (d, "dst")):
        if x is None:
            raise InputError(
                f"packet description: {what}: {spec[what]!r} is neither an address nor a workload"
            )
    for w in (s, d):
        if tenant is None and isinstance(w, Workload):
            tenant = tenants[w.tenant]
    proto = spec.get("proto", "tcp")
    proto_num = _PROTOS.get(proto, None)
    if proto_num is None:
        if not proto.isdigit() or not 0 <= int(proto) <= 255:
            raise InputError(f"packet description: proto: {proto!r} is not a protocol")
        proto_num = int(proto)

    sa, da = pick_addresses(s, d, ("packet description: src", "dst"))
    if proto_num == 1 and sa.version == 6:
        proto_num = 58

    def num(key, default, hi):
        v = spec.get(key, default)
        try:
            x = int(v, 0) if isinstance(v, str) else int(v)
        except ValueError:
            raise InputError(f"packet description: {key}: {v!r} is not a number") from None
        if not 0 <= x <= hi:
            raise InputError(f"packet description: {key}: {x} out of range 0..{hi}")
        return x

    out = {
        "src": str(sa),
        "dst": str(da),
        "proto": proto_num,
        "sport": num("sport", 40000, 65535),
        "dport": num("dport", 80, 65535),
        "flags": spec.get("flags", "S"),
        "type": num("type", 8 if sa.version == 4 else 128, 255),
        "code": num("code", 0, 255),
        "seq": num("seq", 1000, 0xFFFFFFFF),
        "ack": num("ack", 0, 0xFFFFFFFF),
        "id": num("id", 1, 65535),
        "payload": spec.get("payload", "").encode(),
        "tunnel": spec.get("tunnel", "vxlan"),
        "src_workload": s if isinstance(s, Workload) else None,
        "dst_workload": d if isinstance(d, Workload) else None,
    }
    if out["tunnel"] not in ("vxlan", "geneve", "nvgre", "none"):
        raise InputError(f"packet description: tunnel: {out['tunnel']!r} (vxlan, geneve, nvgre, none)")
    out["vni"] = getattr(tenant, "vni", tenant)
    sw = out["src_workload"]
    out["smac"] = spec.get("smac") or (
        sw.mac if sw is not None and sw.mac is not None else "02:00:00:00:00:01"
    )
    dw = out["dst_workload"]
    out["dmac"] = spec.get("dmac") or (
        dw.mac if dw is not None and dw.mac is not None else "02:00:00:00:00:02"
    )
    return out


def _build(spec: dict, policy, reverse: bool = False, flags=None, seq=None, ack=None, payload=None):
    """Frame(s) for the spec (or its reply direction), tunnelled as asked."""
    from .overlay import encap
    from .packet import build as PB

    s, d = (spec["dst"], spec["src"]) if reverse else (spec["src"], spec["dst"])
    sp, dp = (spec["dport"], spec["sport"]) if reverse else (spec["sport"], spec["dport"])
    sm, dm = (spec["dmac"], spec["smac"]) if reverse else (spec["smac"], spec["dmac"])
    pl = spec["payload"] if payload is None else payload
    try:
        if spec["proto"] == 6:
            frame = PB.tcp_packet(
                s,
                d,
                sp,
                dp,
                pl,
                flags=flags or spec["flags"],
                seq=spec["seq"] if seq is None else seq,
                ack=spec["ack"] if ack is None else ack,
                eth_src=sm,
                eth_dst=dm,
            )
        elif spec["proto"] == 17:
            frame = PB.udp_packet(s, d, sp, dp, pl, eth_src=sm, eth_dst=dm)
        elif spec["proto"] in (1, 58):
            if spec["type"] in (8, 128) or reverse:
                frame = PB.icmp_echo_packet(s, d, spec["id"], 1, pl, reply=reverse, eth_src=sm, eth_dst=dm)
            elif spec["proto"] == 1:
                frame = PB.ethernet(
                    PB.ipv4(s, d, 1, PB.icmp(spec["type"], spec["code"], payload=pl)), src=sm, dst=dm
                )
            else:
                frame = PB.ethernet(
                    PB.ipv6(s, d, 58, PB.icmpv6(spec["type"], spec["code"], b"\0" * 4, pl, src=s, dst=d)),
                    src=sm,
                    dst=dm,
                )
        else:
            frame = PB.ethernet(PB.ip(s, d, spec["proto"], pl), src=sm, dst=dm)
    except ValueError as exc:
        raise InputError(f"packet description: {exc}") from None
    b = B.Batch.from_packets([frame])
    if spec["tunnel"] == "none" or spec["vni"] is None:
        return b
    hosts = {h.name: h.address for h in policy.hosts}
    sw, dw = (
        (spec["dst_workload"], spec["src_workload"])
        if reverse
        else (spec["src_workload"], spec["dst_workload"])
    )
    outer_s = hosts.get(sw.host, "192.0.2.1") if sw is not None else "192.0.2.1"
    outer_d = hosts.get(dw.host, "192.0.2.2") if dw is not None else "192.0.2.2"
    if ipaddress.ip_address(outer_s).version != ipaddress.ip_address(outer_d).version:
        outer_s, outer_d = "192.0.2.1", "192.0.2.2"
    return encap(b, spec["tunnel"], spec["vni"], outer_s, outer_d)


def trace_packet(dp, forwarder, spec: dict, state: str = "new") -> dict:
    """Run the spec'd packet through ``dp`` and describe every stage (a dict)."""
    from .datapath import LEVELS, source_identity
    from .packet.parse import parse

    policy = dp.policy
    model = policy.policy
    steps = []
    if state == "established":
        pre = []
        if spec["proto"] == 6:
            isn, rsn = spec["seq"] - 1, 5000
            pre = [
                _build(spec, model, flags="S", seq=isn, ack=0, payload=b""),
                _build(spec, model, reverse=True, flags="SA", seq=rsn, ack=isn + 1, payload=b""),
                _build(spec, model, flags="A", seq=isn + 1, ack=rsn + 1, payload=b""),
            ]
            spec = dict(spec, flags=spec["flags"] if spec["flags"] != "S" else "PA", seq=isn + 1, ack=rsn + 1)
        else:
            pre = [_build(spec, model), _build(spec, model, reverse=True)]
        ts = 1_000_000_000
        for b in pre:
            b.ts[:] = ts
            ts += 1000
            r = dp.process(b)
            steps.append(
                {
                    "stage": "setup",
                    "detail": f"opening exchange packet: "
                    f"{V.verdict_name(r.verdict[0])}, conntrack {ctstate.state_name(int(r.ct[0]))}",
                }
            )
        if any(s_["detail"].startswith("opening exchange packet: drop") for s_ in steps):
            steps.append(
                {
                    "stage": "setup",
                    "detail": "the policy does not let this connection open: "
                    "the packet is traced as it comes",
                }
            )
    b = _build(spec, model)
    b.ts[:] = 2_000_000_000
    keys = parse(b)
    row = keys.row(0)
    from .packet import errors as PE

    tun = B.TUN_NAMES.get(row["tun_type"])
    err = PE.name(row["error"])
    steps.append(
        {
            "stage": "parse",
            "detail": (f"error {err}" if err else "ok")
            + f"; {'tunnel ' + tun + ' ' + str(row['tenant']) if tun else 'no tunnel'}; IPv{row['ip_ver']} "
            f"proto {row['proto']} {B.addr_to_text(row['src_hi'], row['src_lo'])} -> "
            f"{B.addr_to_text(row['dst_hi'], row['dst_lo'])}"
            + (f" ports {row['sport']} -> {row['dport']}" if row["flags"] & B.F_PORTS else "")
            + (f" icmp type {row['icmp_type']} code {row['icmp_code']}" if row["flags"] & B.F_ICMP else ""),
        }
    )
    tenants = {t.vni: t.name for t in model.tenants}
    vni = row["tenant"]
    steps.append(
        {
            "stage": "tenant",
            "detail": f"VNI {vni} -> tenant {tenants[vni]}"
            if vni in tenants
            else (f"VNI {vni}: no tenant has it" if vni >= 0 else "untunnelled"),
        }
    )
    src_w, dst_w, sid = source_identity(policy, keys)
    names = policy.workload_names

    def wname(i):
        return names[i] if i >= 0 else "not a workload"

    steps.append(
        {
            "stage": "endpoints",
            "detail": f"source {wname(int(src_w[0]))}, destination "
            f"{wname(int(dst_w[0]))}; source MAC {_mac(row['eth_src'])} "
            + (
                f"belongs to {wname(int(sid[0]))}"
                if sid[0] < 0xFFFE
                else "belongs to no workload"
                if sid[0] == 0xFFFE
                else "(no Ethernet header)"
            ),
        }
    )
    res = dp.process(b)
    lvl = int(res.level[0])
    steps.append(
        {
            "stage": "conntrack",
            "detail": ctstate.state_name(int(res.ct[0]))
            + (" (reply direction)" if res.ct[0] & ctstate.REPLY else " (original direction)"),
        }
    )
    steps.append(
        {
            "stage": "fast path",
            "detail": "hit: an offloaded flow" if lvl == 1 else ("miss" if dp.config.offload else "off"),
        }
    )
    if lvl != 1:
        if lvl == 5:
            steps.append(
                {
                    "stage": "state",
                    "detail": "a packet of a tracked connection: port "
                    "security and its conntrack state decide, no rule is consulted",
                }
            )
        elif dp.config.caches:
            steps.append({"stage": "exact-match cache", "detail": "hit" if lvl == 2 else "miss"})
            if lvl != 2:
                steps.append({"stage": "megaflow cache", "detail": "hit" if lvl == 3 else "miss"})
        if lvl in (4, 5):
            expl = _explain(policy, keys, res)
            steps.append({"stage": "slow path", "detail": expl})
    reason = V.REASONS.get(int(res.reason[0]))
    from .datapath.reasons import REASONS

    reason = REASONS.get(int(res.reason[0]), reason)
    rule = int(res.rule[0])
    steps.append(
        {
            "stage": "verdict",
            "detail": f"{V.verdict_name(res.verdict[0])} ({reason})"
            + (f"; rule {rule}: {policy.describe_rule(rule)}" if rule >= 0 else ""),
        }
    )
    if dp.config.offload and res.verdict[0] == V.ALLOW and lvl != 1:
        insp = dp.inspector.stats()
        steps.append(
            {
                "stage": "inspection",
                "detail": (f"signature {int(res.sid[0])} matched" if res.sid[0] else "no signature matched")
                + "; flows by state: "
                + ", ".join(f"{k} {v}" for k, v in insp["flows"].items() if v),
            }
        )
    out = forwarder.output(b, res)
    if len(out):
        ok = parse(out)
        o = ok.row(0)
        desc = (
            f"{len(out)} frame(s): "
            + (
                f"{B.TUN_NAMES[o['tun_type']]} VNI {o['tenant']} outer {B.addr_to_text(*_outer(out, ok))}"
                if o["tun_type"]
                else "untunnelled"
            )
            + f", inner {B.addr_to_text(o['src_hi'], o['src_lo'])} -> "
            + B.addr_to_text(o["dst_hi"], o["dst_lo"])
            + (" (reject reply)" if res.verdict[0] == V.REJECT else "")
        )
    else:
        desc = "nothing leaves"
    steps.append({"stage": "output", "detail": desc})
    return {
        "packet": {
            k: (v if isinstance(v, (int, str)) else str(v))
            for k, v in spec.items()
            if k not in ("src_workload", "dst_workload", "payload")
        },
        "steps": steps,
        "verdict": V.verdict_name(res.verdict[0]),
        "level": LEVELS.get(lvl, "none"),
        "ct": ctstate.state_name(int(res.ct[0])),
    }


def _mac(value: int) -> str:
    return ":".join(f"{(value >> sh) & 0xFF:02x}" for sh in range(40, -8, -8))


def _outer(out, keys):
    """(hi, lo) of the outer destination address of frame 0 (a tunnelled frame)."""
    off = int(keys.outer_l3_off[0])
    d = out.packet(0)
    if d[off] >> 4 == 4:
        return B.text_to_addr(str(ipaddress.IPv4Address(d[off + 16 : off + 20])))
    return B.text_to_addr(str(ipaddress.IPv6Address(d[off + 24 : off + 40])))


def _explain(policy, keys, res) -> str:
    """How the compiled policy decided the traced packet, check by check, as its kernels ran
    (``CompiledPolicy.decide(detail=True)``: every check the rule set was consulted for and
    the rule that settled it), then whether the per-packet reference agrees."""
    from .policy import verdict as PV

    d = policy.decide(keys, res.ct[:1], detail=True)
    names = policy.workload_names
    parts = []
    for kind, rule in d.checks(0):
        w = int(d.src_workload[0] if kind < PV.SIDE else d.dst_workload[0])
        who = names[w] if w >= 0 else "an address outside the tenant's workloads"
        what = PV.CHECKS[kind]
        side, _, check = what.partition(" ")
        if rule >= 0:
            parts.append(f"{side} of {who}, {check}: rule {rule} ({policy.describe_rule(rule)})")
        else:
            parts.append(f"{side} of {who}, {check}: no rule matches")
    if not parts:
        parts.append("no check needed a rule (decided before the rule set)")
    ref = _reference_account(policy, keys, res)
    return "; ".join(parts) + f"; {ref}"


def _reference_account(policy, keys, res) -> str:
    """Whether the per-packet policy reference reaches the same verdict (its account when not)."""
    from .policy.reference import Reference, explain

    ref = Reference(policy.policy)
    d = ref.decide_row(keys.row(0), int(res.ct[0]))
    if int(d.verdict) == int(res.verdict[0]):
        return "the reference model agrees"
    return "the reference model differs: " + " / ".join(explain(ref, keys.row(0), int(res.ct[0])))


def run_trace(args) -> int:
    from rich.console import Console

    from .datapath import Datapath, DatapathConfig, Forwarder
    from .io.generator import load_policy as load_builtin
    from .offload.inspect import SignatureSet
    from .policy.compiler import compile_policy
    from .policy.model import load_policy

    policy = load_policy(args.policy) if args.policy else load_builtin()
    compiled = compile_policy(policy)
    spec = parse_packet_spec(args.packet, policy)
    sigs = SignatureSet.load(args.signatures) if args.signatures else None
    dp = Datapath(
        compiled,
        DatapathConfig(
            conntrack_capacity=1024,
            emc_entries=64,
            megaflow_entries=64,
            offload_capacity=64,
            signatures=sigs,
            tunnel=spec["tunnel"] if spec["tunnel"] != "none" else "vxlan",
        ),
    )
    fw = Forwarder(compiled, tunnel=dp.config.tunnel)
    out = trace_packet(dp, fw, spec, args.state)
    status = 0 if out["verdict"] == V.verdict_name(V.ALLOW) else 1
    if args.json:
        print(json.dumps(out, indent=2, default=_json_default))
        return status
    con = Console()
    con.print(f"[bold]{args.packet}[/bold]")
    for i, s in enumerate(out["steps"], 1):
        con.print(f"{i:2d}. [bold]{s['stage']:<18}[/bold] {s['detail']}")
    return status
