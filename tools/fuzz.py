#!/usr/bin/env python3
"""Mutation fuzzing: mutated packets through the whole datapath, and mutated captures,
policies, signature, SA, snapshot and ClassBench files through every CLI verb that reads them.

    python tools/fuzz.py --out build/fuzz         # what `make fuzz` runs: 2M packets, 100 files a verb
    python tools/fuzz.py --packets 200000 --files 5 --subprocess 0 --seed 7

Seeds: tcpdump's captures (tests/vectors/tcpdump), the reader's fixtures
(tests/vectors/captures), the ESP vectors, traffic generated from the built-in data centre
(microseg/data/datacenter.yaml, the policy of `microseg demo`) and the test policies. Every
run is deterministic for a seed.

A failure is an exception out of ``Datapath.process`` or ``Forwarder.output``, or a CLI run
that exits with a code other than 0 or 2, raises, prints a traceback, prints more than one
error line, or ends with exit code 2 without one. Each failing input is kept under ``--out``
with the command that reproduces it; the exit status is 1 if there was any.

The test suite (tests/test_fuzz_cli.py) imports this file for its mutators and its verb
table and runs a few seconds of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VEC = ROOT / "tests" / "vectors"
DATA = ROOT / "src" / "microseg" / "data"

# ---------------------------------------------------------------------------------------------
# mutators (bytes and text); every choice comes from the numpy Generator passed in
# ---------------------------------------------------------------------------------------------
INTERESTING8 = [
    0x00,
    0x01,
    0x02,
    0x04,
    0x05,
    0x06,
    0x08,
    0x0F,
    0x10,
    0x11,
    0x12,
    0x20,
    0x29,
    0x2F,
    0x32,
    0x3A,
    0x40,
    0x45,
    0x46,
    0x4F,
    0x60,
    0x65,
    0x7F,
    0x80,
    0x81,
    0x86,
    0x88,
    0xA8,
    0xB5,
    0xDD,
    0xFE,
    0xFF,
]
INTERESTING32 = [
    0,
    1,
    2,
    4,
    14,
    16,
    20,
    40,
    60,
    64,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x5DC,
    0x5EA,
    0xFFFF,
    0x10000,
    0x3FFFF,
    0x40000,
    0x40001,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFE,
    0xFFFFFFFF,
]
# link types to relabel a capture with: every accepted one, and a few refused ones
LINKTYPES = [0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 105, 127, 9, 4242]


def _u(rng, hi: int) -> int:
    return int(rng.integers(0, hi)) if hi > 0 else 0


def mutate_bytes(data: bytes, rng, donors=(), header_bias: int = 256) -> bytes:
    """1 to 4 generic operations: byte and bit flips, interesting values, cuts, deletions,
    insertions, duplications and splices from a donor. Positions favour the first
    ``header_bias`` bytes, where the headers are."""
    b = bytearray(data)
    for _ in range(1 + _u(rng, 4)):
        if not b:
            b = bytearray(rng.integers(0, 256, size=1 + _u(rng, 64), dtype=np.uint8).tobytes())
        n = len(b)
        p = _u(rng, min(n, header_bias)) if rng.random() < 0.6 else _u(rng, n)
        op = _u(rng, 10)
        if op == 0:
            b[p] = _u(rng, 256)
        elif op == 1:
            b[p] ^= 1 << _u(rng, 8)
        elif op == 2:
            b[p] = INTERESTING8[_u(rng, len(INTERESTING8))]
        elif op == 3 and p + 4 <= n:
            v = INTERESTING32[_u(rng, len(INTERESTING32))]
            b[p : p + 4] = struct.pack("<I" if rng.random() < 0.5 else ">I", v)
        elif op == 4:
            del b[p:]
        elif op == 5:
            del b[p : p + 1 + _u(rng, 64)]
        elif op == 6:
            b[p:p] = rng.integers(0, 256, size=1 + _u(rng, 32), dtype=np.uint8).tobytes()
        elif op == 7:
            q = _u(rng, n)
            b[p:p] = b[q : q + 1 + _u(rng, 128)]
        elif op == 8 and donors:
            d = donors[_u(rng, len(donors))]
            q = _u(rng, len(d))
            b[p : p + _u(rng, 64)] = d[q : q + 1 + _u(rng, 256)]
        else:
            b[p] = (b[p] + (1 if rng.random() < 0.5 else 255)) & 0xFF
    return bytes(b)


def _pcap_records(data: bytes):
    """(byte order, [(record start, captured length)]) of a classic pcap, as far as it goes."""
    if len(data) < 24:
        return None, []
    for e in ("<", ">"):
        if struct.unpack_from(e + "I", data)[0] in (0xA1B2C3D4, 0xA1B23C4D):
            break
    else:
        return None, []
    pos, out = 24, []
    while pos + 16 <= len(data) and len(out) < 4096:
        incl = struct.unpack_from(e + "I", data, pos + 8)[0]
        out.append((pos, incl))
        pos += 16 + incl
    return e, out


def mutate_capture(data: bytes, rng, donors=()) -> bytes:
    """A structure-aware mutation of a pcap (header field, record field, relabelled link type,
    bytes inside one packet, records dropped or repeated) or, for pcapng and one time in three,
    a generic one."""
    e, recs = _pcap_records(data)
    if e is None or rng.random() < 0.33:
        return mutate_bytes(data, rng, donors)
    b = bytearray(data)
    op = _u(rng, 6)
    if op == 0:  # file header: version, snap length, link type
        field_at = (4, 16, 20)[_u(rng, 3)]
        if field_at == 20:
            b[20:24] = struct.pack(e + "I", LINKTYPES[_u(rng, len(LINKTYPES))])
        elif field_at == 16:
            b[16:20] = struct.pack(e + "I", INTERESTING32[_u(rng, len(INTERESTING32))])
        else:
            b[4:6] = struct.pack(e + "H", _u(rng, 4))
    elif op == 1 and recs:  # one record header field
        pos, _ = recs[_u(rng, len(recs))]
        off = 4 * _u(rng, 4)
        b[pos + off : pos + off + 4] = struct.pack(e + "I", INTERESTING32[_u(rng, len(INTERESTING32))])
    elif op in (2, 3) and recs:  # bytes inside one packet: the parser's input
        pos, incl = recs[_u(rng, len(recs))]
        end = min(pos + 16 + incl, len(b))
        body = mutate_bytes(bytes(b[pos + 16 : end]), rng, donors, header_bias=96)
        body = body[:incl] + bytes(max(0, incl - len(body)))  # keep the record's length
        b[pos + 16 : end] = body[: end - pos - 16]
    elif op == 4 and len(recs) > 1:  # drop or repeat a record
        i = _u(rng, len(recs) - 1)
        s, incl = recs[i]
        rec = bytes(b[s : s + 16 + incl])
        if rng.random() < 0.5:
            del b[s : s + 16 + incl]
        else:
            b[s:s] = rec * (1 + _u(rng, 3))
    else:
        return mutate_bytes(data, rng, donors)
    return bytes(b)


TOKENS = [
    "-1",
    "0",
    "1",
    "65535",
    "65536",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "nan",
    "''",
    '""',
    "null",
    "~",
    "[]",
    "{}",
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    "- ",
    ",",
    "&a",
    "*a",
    "<<: *a",
    "!!binary AAAA",
    "!!python/object:os.system",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.300",
    "1.2.3.4/33",
    "fe80::1%eth0",
    "2001:db8::/129",
    "tcp",
    "icmp",
    "any",
    "true",
    "no",
    "\t",
    "\\u0000",
    "é",
    "#",
    "x" * 300,
    "0x",
    "0b2",
    "-0",
    "02:00:00:00:00:01",
    "ffff:ffff",
    "80-79",
    "1:2:3",
    "%",
    "'",
    '"',
]


def mutate_text(data: bytes, rng) -> bytes:
    """1 to 3 line- and token-level edits of a text file (YAML, rules, JSON)."""
    text = data.decode("utf-8", "replace")
    for _ in range(1 + _u(rng, 3)):
        lines = text.splitlines(keepends=True) or [""]
        i = _u(rng, len(lines))
        op = _u(rng, 8)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[_u(rng, len(lines))])
        elif op == 2:
            j = _u(rng, len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op in (3, 4):  # a value (after ':' or a number) replaced
            line = lines[i]
            spots = [m.span() for m in re.finditer(r"(?<=: )[^,}\]\n]+|\b\d+\b", line)]
            tok = TOKENS[_u(rng, len(TOKENS))]
            if spots:
                s, t = spots[_u(rng, len(spots))]
                lines[i] = line[:s] + tok + line[t:]
            else:
                lines[i] = tok + line
        elif op == 5:  # a token inserted anywhere in the line
            line = lines[i]
            p = _u(rng, len(line) + 1)
            lines[i] = line[:p] + TOKENS[_u(rng, len(TOKENS))] + line[p:]
        elif op == 6:  # indentation changed
            lines[i] = ("  " + lines[i]) if rng.random() < 0.5 else lines[i].lstrip(" ")
        else:  # cut the file short
            lines = lines[:i] + [lines[i][: _u(rng, len(lines[i]) + 1)]]
        text = "".join(lines)
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------
@dataclass
class Seeds:
    """Seed files, written once under ``work``: good inputs for the arguments a verb does
    not fuzz, and lists of seeds per kind of input."""

    work: Path
    captures: list = field(default_factory=list)
    policies: list = field(default_factory=list)
    rules: list = field(default_factory=list)
    sas: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)
    classbench: list = field(default_factory=list)
    cap: str = ""  # a good capture of the data centre's traffic
    esp: str = ""  # a good ESP capture for `ipsec decrypt`
    policy: str = ""  # the data centre's policy
    example: str = ""  # the tests' example policy
    sigs: str = ""
    sa: str = ""
    snap: str = ""
    cb_rules: str = ""
    cb_trace: str = ""


CORPUS = [
    "vxlan.pcap",
    "geneve.pcap",
    "various_gre.pcap",
    "02-sunrise-sunset-esp.pcap",
    "802.1ad_QinQ.pcap",
    "ip6_frag_asan.pcap",
    "mpls-over-udp.pcap",
    "mptcp-v1.pcap",
    "tcp-handshake-nano.pcap",
    "quic_handshake.pcap",
    "LINKTYPE_IPV4.pcap",
    "LINKTYPE_RAW_ipv6.pcap",
    "icmp-icmp_print-oobr-1.pcap",
    "bgp-role.pcapng",
    "OSPFv2_Capture_FINAL.pcapng",
    "ikev2pI2-segfault.pcapng",
    "gso-ipv4-vxlan-ipv4.pcap",
    "ipv6_jumbogram_1.pcap",
    "pptp.pcap",
    "empty.pcap",
]


def make_seeds(work: Path, quick: bool = False) -> Seeds:
    """Write the seed files under ``work`` (``quick``: fewer and smaller, for the tests)."""
    from microseg.cli import main as cli
    from microseg.io.generator import generate, load_policy

    work.mkdir(parents=True, exist_ok=True)
    s = Seeds(work=work)
    pol = load_policy()
    gen = generate(pol, flows=6 if quick else 40, seed=5)
    s.cap = str(work / "dc.pcap")
    gen.write(s.cap)
    s.policy = str(DATA / "datacenter.yaml")
    s.example = str(VEC / "policy" / "example.yaml")
    s.sigs = str(DATA / "signatures.rules")
    s.sa = str(DATA / "sites.yaml")
    s.esp = str(VEC / "ipsec" / "esp.pcap")
    names = CORPUS[:8] if quick else CORPUS
    s.captures = [s.cap, s.esp] + [str(VEC / "tcpdump" / n) for n in names]
    s.captures += [
        str(VEC / "captures" / n)
        for n in (
            ("tshark.pcapng", "be.pcapng")
            if quick
            else (
                "tshark.pcapng",
                "be.pcapng",
                "sections.pcapng",
                "snap60.pcap",
                "raw.pcap",
                "nsec.pcap",
                "twoif.pcapng",
            )
        )
    ]
    s.policies = [s.policy, s.example, str(VEC / "policy" / "openstack_policy.yaml")]
    if not quick:
        s.policies += [str(VEC / "policy" / "k8s_policy.yaml")]
    s.rules = [s.sigs] + ([] if quick else [str(VEC / "signatures" / "et_style.rules")])
    s.sas = [s.sa, str(VEC / "ipsec" / "vectors.json")]
    s.snap = str(work / "dc.snap")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli(["conntrack", "states", s.cap, "--save", s.snap])
    if rc != 0:
        raise RuntimeError("could not write the conntrack snapshot seed")
    s.snapshots = [s.snap]
    rules = (VEC / "classbench" / "acl_1000.rules").read_text().splitlines()[:60]
    trace = (VEC / "classbench" / "acl_1000.trace").read_text().splitlines()[:60]
    s.cb_rules, s.cb_trace = str(work / "cb.rules"), str(work / "cb.trace")
    Path(s.cb_rules).write_text("\n".join(rules) + "\n")
    Path(s.cb_trace).write_text("\n".join(trace) + "\n")
    s.classbench = [s.cb_rules]
    return s


# ---------------------------------------------------------------------------------------------
# the verbs: (name, kind of input fuzzed, argv builder); ``f`` is the mutated file, ``o`` an
# output prefix. What a verb may answer besides 0 and 2, and the verbs that list every problem
# of a file (one error line each) are below the table.
# ---------------------------------------------------------------------------------------------
EXIT_CODES = {"policy query": (0, 1, 2), "trace --policy": (0, 1, 2)}  # 1: denied (documented)
MANY_ERRORS = {"policy check"}  # "list every problem found", one line each

# Failures found in code outside the capture reader and not fixed yet, matched on stderr; each
# is reproduced by the xfail test named beside it (tests/test_fuzz_cli.py). They are reported
# as known; only other failures make the run fail.
# Failures already reproduced by a test that is expected to fail (name -> stderr pattern);
# empty while every failure the fuzzer found is fixed.
KNOWN: dict = {}


def known(failure: dict) -> str | None:
    """The xfail test that reproduces this failure, if it is a known one."""
    return next((name for name, pat in KNOWN.items() if pat.search(failure.get("stderr", ""))), None)


def verbs(s: Seeds):
    pol, cap, sig, sa = s.policy, s.cap, s.sigs, s.sa
    q = ["--src", "192.168.1.10", "--dst", "192.168.1.20", "--proto", "tcp", "--dport", "5432"]
    return [
        ("parse", "capture", lambda f, o: ["parse", f]),
        ("parse --json", "capture", lambda f, o: ["parse", "--json", f]),
        ("parse --flows", "capture", lambda f, o: ["parse", "--flows", f]),
        ("parse --flows --json", "capture", lambda f, o: ["parse", "--flows", "--json", f]),
        ("parse --lenient", "capture", lambda f, o: ["parse", "--lenient", "--json", f]),
        (
            "run --policy P",
            "capture",
            lambda f, o: ["run", "--policy", pol, "--quiet", "-w", o + ".pcap", "--report", o + ".json", f],
        ),
        ("conntrack states", "capture", lambda f, o: ["conntrack", "states", "--reply", f]),
        ("conntrack list", "capture", lambda f, o: ["conntrack", "list", "--capture", f]),
        ("decap", "capture", lambda f, o: ["decap", "--json", "-w", o + ".pcap", f]),
        (
            "encap",
            "capture",
            lambda f, o: [
                "encap",
                "-w",
                o + ".pcap",
                "--type",
                "geneve",
                "--vni",
                "7",
                "--local",
                "192.0.2.1",
                "--remote",
                "192.0.2.2",
                f,
            ],
        ),
        ("inspect", "capture", lambda f, o: ["inspect", "--json", sig, f]),
        ("offload", "capture", lambda f, o: ["offload", "--json", "--rules", sig, f]),
        (
            "ipsec decrypt",
            "capture",
            lambda f, o: [
                "ipsec",
                "decrypt",
                "--json",
                "--sa",
                str(VEC / "ipsec" / "vectors.json"),
                "-w",
                o + ".pcap",
                f,
            ],
        ),
        ("ipsec encrypt", "capture", lambda f, o: ["ipsec", "encrypt", "--sa", sa, "-w", o + ".pcap", f]),
        ("policy apply (capture)", "capture", lambda f, o: ["policy", "apply", pol, f]),
        ("policy check", "policy", lambda f, o: ["policy", "check", f]),
        ("policy compile", "policy", lambda f, o: ["policy", "compile", "--json", f]),
        ("policy query", "policy", lambda f, o: ["policy", "query", f, *q]),
        (
            "policy export",
            "policy",
            lambda f, o: ["policy", "export", "--tenant", "acme", "-o", o + ".nft", f],
        ),
        ("policy apply (policy)", "policy", lambda f, o: ["policy", "apply", f, cap]),
        ("run --policy (policy)", "policy", lambda f, o: ["run", "--policy", f, "--quiet", cap]),
        (
            "trace --policy",
            "policy",
            lambda f, o: [
                "trace",
                "--policy",
                f,
                "--json",
                "src=192.168.1.10 dst=192.168.1.20 tcp dport=5432",
            ],
        ),
        (
            "generate --policy",
            "policy",
            lambda f, o: ["generate", "--policy", f, "--flows", "3", "-o", o + ".pcap"],
        ),
        ("inspect (rules)", "rules", lambda f, o: ["inspect", f]),
        ("inspect (rules, capture)", "rules", lambda f, o: ["inspect", f, cap]),
        ("offload --rules", "rules", lambda f, o: ["offload", "--rules", f, cap]),
        ("ipsec sa list", "sa", lambda f, o: ["ipsec", "sa", "list", "--sa", f]),
        ("ipsec decrypt (sa)", "sa", lambda f, o: ["ipsec", "decrypt", "--sa", f, "-w", o + ".pcap", s.esp]),
        ("ipsec encrypt (sa)", "sa", lambda f, o: ["ipsec", "encrypt", "--sa", f, "-w", o + ".pcap", cap]),
        ("conntrack states --restore", "snapshot", lambda f, o: ["conntrack", "states", "--restore", f, cap]),
        ("conntrack list --snapshot", "snapshot", lambda f, o: ["conntrack", "list", "--snapshot", f]),
        ("classify", "classbench", lambda f, o: ["classify", "--rules", f, "--trace", s.cb_trace]),
    ]


def seeds_of(s: Seeds, kind: str) -> list:
    return {
        "capture": s.captures,
        "policy": s.policies,
        "rules": s.rules,
        "sa": s.sas,
        "snapshot": s.snapshots,
        "classbench": s.classbench,
    }[kind]


def mutate_for(kind: str, data: bytes, rng, donors) -> bytes:
    if kind == "capture":
        return mutate_capture(data, rng, donors)
    if kind in ("snapshot",):
        return mutate_bytes(data, rng, donors)
    if rng.random() < 0.85:
        return mutate_text(data, rng)
    return mutate_bytes(data, rng, donors, header_bias=4096)


# ---------------------------------------------------------------------------------------------
# one CLI run, judged
# ---------------------------------------------------------------------------------------------
_LINE_OK = re.compile(r"^(microseg( [a-z-]+)*: (warning|note): |warning: )")
_ERROR = re.compile(r"^microseg( [a-z-]+)*: error: ")


def judge(rc, out: str, err: str, exc: BaseException | None = None, verb: str = "") -> str | None:
    """None if the run behaved (exit 0 or 2, or a code the verb documents; no traceback; at
    most one error line, which an exit code 2 has and ends with), else what was wrong."""
    if exc is not None:
        return f"raised {type(exc).__name__}: {exc}"
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in out:
        return "printed a traceback"
    if rc not in EXIT_CODES.get(verb, (0, 2)):
        return f"exit code {rc}"
    lines = err.splitlines()
    errors = [ln for ln in lines if _ERROR.match(ln)]
    if verb in MANY_ERRORS:
        if rc == 2 and errors and len(errors) != len([ln for ln in lines if ln.strip()]):
            return "error lines mixed with other output"
        errors = errors[-1:]
    if len(errors) > 1:
        return f"{len(errors)} error lines"
    if rc == 2 and (not lines or not _ERROR.match(lines[-1])):
        return "exit code 2 without an error line last on stderr"
    if rc == 0 and errors:
        return "an error line with exit code 0"
    return None


def run_inprocess(argv: list[str]):
    """``microseg.cli.main(argv)`` with stdout and stderr captured: (rc, out, err, exception)."""
    from microseg.cli import main as cli

    out, err = io.StringIO(), io.StringIO()
    exc = None
    rc = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - what the fuzzer looks for
            exc = e
            traceback.print_exc(file=err)
    return rc, out.getvalue(), err.getvalue(), exc


def run_subprocess(argv: list[str], timeout: float = 120):
    import subprocess

    exe = [sys.executable, "-m", "microseg.cli"]
    p = subprocess.run(
        exe + argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"}
    )
    return p.returncode, p.stdout, p.stderr, None


def fuzz_cli(
    s: Seeds, per_verb: int, seed: int, out_dir: Path | None = None, only: set | None = None, log=None
):
    """``per_verb`` mutated inputs for each verb, in process. Returns (counts, failures):
    counts per verb of exit codes, failures as dicts (verb, argv, reason, saved input)."""
    donors = [Path(c).read_bytes()[:4096] for c in s.captures]
    counts, failures = {}, []
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-cli-", dir=s.work))
    for vi, (name, kind, build) in enumerate(verbs(s)):
        if only is not None and name not in only:
            continue
        rng = np.random.default_rng([seed, vi])
        pool = seeds_of(s, kind)
        c = counts.setdefault(name, {"0": 0, "1": 0, "2": 0, "failed": 0})
        for k in range(per_verb):
            src = pool[_u(rng, len(pool))]
            data = mutate_for(kind, Path(src).read_bytes(), rng, donors)
            ext = Path(src).suffix
            f = tmp / f"in{ext}"
            f.write_bytes(data)
            argv = build(str(f), str(s.work / "out"))
            rc, out, err, exc = run_inprocess(argv)
            why = judge(rc, out, err, exc, name)
            if why is None:
                c[str(rc)] += 1
                continue
            c["failed"] += 1
            rec = {"verb": name, "argv": argv, "reason": why, "stderr": err[-2000:], "seed": [seed, vi, k]}
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                keep = out_dir / f"{re.sub(r'[^a-z0-9]+', '_', name)}-{seed}-{k}{ext}"
                keep.write_bytes(data)
                rec["input"] = str(keep)
                rec["command"] = "microseg " + shlex.join([str(keep) if a == str(f) else a for a in argv])
            failures.append(rec)
            if log:
                log(f"  FAIL {name}: {why}  ({rec.get('command', argv)})")
    shutil.rmtree(tmp, ignore_errors=True)
    return counts, failures


# ---------------------------------------------------------------------------------------------
# the datapath
# ---------------------------------------------------------------------------------------------
def _pools(s: Seeds):
    """Packets to mutate, grouped by link type: the data centre's traffic and the corpus."""
    from microseg.errors import InputError
    from microseg.io.pcap import read_capture

    pools: dict[int, list[bytes]] = {}
    for c in s.captures + [str(p) for p in sorted((VEC / "tcpdump").glob("*.pcap*"))]:
        try:
            b = read_capture(c)
        except InputError:
            continue
        pools.setdefault(int(b.linktype), []).extend(b.packets())
    return {lt: p for lt, p in pools.items() if p}


def _mutated_batch(pool: list[bytes], n: int, rng, linktype: int):
    """``n`` packets drawn from ``pool``, each with 0-4 bytes overwritten (mostly in the first
    96), some snapped shorter, some cut to nothing, in one Batch (vectorised)."""
    from microseg.packet.batch import Batch

    idx = rng.integers(0, len(pool), size=n)
    pkts = [pool[i] for i in idx.tolist()]
    lens = np.array([len(p) for p in pkts], np.int64)
    offs = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    data = np.frombuffer(b"".join(pkts), np.uint8).copy()
    k = 4
    pos = np.where(
        rng.random((n, k)) < 0.7, rng.integers(0, 96, size=(n, k)), rng.integers(0, 1 << 16, size=(n, k))
    )
    use = rng.random((n, k)) < rng.random((n, 1))  # 0 to 4 edits a packet
    valid = use & (pos < lens[:, None])
    vals = np.where(
        rng.random((n, k)) < 0.5,
        rng.integers(0, 256, size=(n, k)),
        np.array(INTERESTING8)[rng.integers(0, len(INTERESTING8), size=(n, k))],
    )
    rows, cols = np.nonzero(valid)
    data[offs[rows] + pos[rows, cols]] = vals[rows, cols].astype(np.uint8)
    length = lens.copy()
    cut = rng.random(n) < 0.08
    length[cut] = (lens[cut] * rng.random(int(cut.sum()))).astype(np.int64)
    wire = np.maximum(lens, length)
    ts = np.sort(rng.integers(1_700_000_000, 1_700_000_100, size=n)) * 1_000_000_000
    return Batch(
        data=data,
        offset=offs,
        length=length.astype(np.int32),
        wire_len=wire.astype(np.int32),
        port=np.zeros(n, np.uint16),
        ts=ts.astype(np.int64),
        linktype=linktype,
    )


def fuzz_datapath(
    s: Seeds, packets: int, seed: int, out_dir: Path | None = None, log=None, batch: int = 4096
):
    """``packets`` mutated packets through ``Datapath.process`` and ``Forwarder.output`` under
    the data centre's policy. Returns (stats, failures)."""
    from microseg.datapath import Datapath, DatapathConfig, Forwarder
    from microseg.io.pcap import write_pcap
    from microseg.packet.batch import LINK_ETHERNET as LINK_ETH
    from microseg.packet.batch import SUPPORTED_LINKTYPES
    from microseg.policy.compiler import compile_policy
    from microseg.policy.model import load_policy

    compiled = compile_policy(load_policy(s.policy))
    cfg = DatapathConfig(
        conntrack_capacity=1 << 16, emc_entries=4096, megaflow_entries=4096, offload_capacity=4096
    )
    dp = Datapath(compiled, cfg)
    fw = Forwarder(compiled)
    pools = _pools(s)
    kinds = sorted(pools)
    rng = np.random.default_rng([seed, 1000])
    stats = {"packets": 0, "batches": 0, "forwarded": 0, "by_linktype": {}}
    failures = []
    t0 = time.perf_counter()
    while stats["packets"] < packets:
        n = min(batch, packets - stats["packets"])
        # half the batches: Ethernet, where the data centre's tunnelled traffic is
        src = LINK_ETH if (LINK_ETH in pools and rng.random() < 0.5) else kinds[_u(rng, len(kinds))]
        lt = src if rng.random() < 0.85 else int(SUPPORTED_LINKTYPES[_u(rng, len(SUPPORTED_LINKTYPES))])
        b = _mutated_batch(pools[src], n, rng, lt)
        try:
            res = dp.process(b)
            out = fw.output(b, res)
            stats["forwarded"] += len(out)
        except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
            rec = {
                "stage": "datapath",
                "reason": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
                "linktype": lt,
                "batch_no": stats["batches"],
            }
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                keep = out_dir / f"datapath-{seed}-{stats['batches']}.pcap"
                try:
                    write_pcap(keep, b, nanosecond=True)
                    rec["input"] = str(keep)
                    rec["command"] = f"microseg run --policy {s.policy} --quiet {keep}"
                except Exception:  # noqa: BLE001
                    pass
            failures.append(rec)
            if log:
                log(f"  FAIL datapath batch {stats['batches']}: {rec['reason']}")
            dp = Datapath(compiled, cfg)  # start clean after a failure
        stats["packets"] += n
        stats["batches"] += 1
        stats["by_linktype"][lt] = stats["by_linktype"].get(lt, 0) + n
        if log and stats["batches"] % 50 == 0:
            log(f"  datapath: {stats['packets']:,} packets, {time.perf_counter() - t0:.0f} s")
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    return stats, failures


# ---------------------------------------------------------------------------------------------
def fuzz_subprocess(s: Seeds, per_verb: int, seed: int, out_dir: Path, log=None):
    """``per_verb`` mutated inputs for each verb as real `microseg` processes."""
    rng = np.random.default_rng([seed, 99])
    donors = [Path(c).read_bytes()[:4096] for c in s.captures]
    runs, failures = 0, []
    for name, kind, build in verbs(s):
        for k in range(per_verb):
            pool = seeds_of(s, kind)
            src = pool[_u(rng, len(pool))]
            data = mutate_for(kind, Path(src).read_bytes(), rng, donors)
            keep = out_dir / f"sub-{re.sub(r'[^a-z0-9]+', '_', name)}-{seed}-{k}{Path(src).suffix}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_bytes(data)
            argv = build(str(keep), str(s.work / "out"))
            rc, out, err, _ = run_subprocess(argv)
            runs += 1
            why = judge(rc, out, err, verb=name)
            if why is None:
                keep.unlink()
                continue
            failures.append(
                {
                    "verb": name,
                    "argv": argv,
                    "reason": why,
                    "input": str(keep),
                    "command": "microseg " + shlex.join(argv),
                    "stderr": err[-2000:],
                }
            )
            if log:
                log(f"  FAIL {name} (process): {why}")
    return runs, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--packets", type=int, default=2_000_000, help="mutated packets through the datapath (default 2M)"
    )
    ap.add_argument("--files", type=int, default=100, help="mutated inputs per CLI verb")
    ap.add_argument(
        "--subprocess",
        type=int,
        default=3,
        help="mutated inputs per verb run as real `microseg` processes (default 3)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--out",
        default="build/fuzz",
        help="folder for the seeds, failing inputs and the report (default build/fuzz)",
    )
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    s = make_seeds(out_dir / "seeds")  # kept: the failures' commands use these files
    log(
        f"seeds: {len(s.captures)} captures, {len(s.policies)} policies, "
        f"{len(s.rules)} signature files, {len(s.sas)} SA files"
    )
    log(f"CLI: {args.files} mutated inputs for each of {len(verbs(s))} verbs (in process)")
    counts, cli_fail = fuzz_cli(s, args.files, args.seed, out_dir / "failures", log=log)
    for name, c in counts.items():
        one = f"  exit 1: {c['1']:4d}" if c["1"] else ""
        log(f"  {name:28s} exit 0: {c['0']:4d}  exit 2: {c['2']:4d}{one}  failed: {c['failed']}")
    n_sub, sub_fail = 0, []
    if args.subprocess:
        log(f"CLI: {args.subprocess} mutated inputs per verb as real processes")
        n_sub, sub_fail = fuzz_subprocess(s, args.subprocess, args.seed, out_dir / "failures", log=log)
    log(f"datapath: {args.packets:,} mutated packets under {Path(s.policy).name}")
    dstats, dp_fail = fuzz_datapath(s, args.packets, args.seed, out_dir / "failures", log=log)
    total = time.perf_counter() - t0
    n_cli = sum(sum(c.values()) for c in counts.values())
    failures = cli_fail + sub_fail + dp_fail
    for f in failures:
        f["known"] = known(f)
    new = [f for f in failures if not f["known"]]
    report = {
        "seed": args.seed,
        "seconds": round(total, 1),
        "cli": {"runs": n_cli, "verbs": counts, "subprocess_runs": n_sub},
        "datapath": dstats,
        "failures": failures,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(
        f"done in {total:.0f} s: {dstats['packets']:,} packets through the datapath "
        f"({dstats['seconds']} s), {n_cli} CLI runs in process and {n_sub} as processes; "
        f"{len(failures)} failures, {len(failures) - len(new)} of them known "
        f"(report: {out_dir / 'report.json'})"
    )
    for name in KNOWN:
        k = sum(f["known"] == name for f in failures)
        if k:
            log(f"  known, {k} times: tests/test_fuzz_cli.py::{name} (xfail)")
    for f in new:
        log(f"  NEW {f.get('verb', f.get('stage'))}: {f['reason']}: {f.get('command', '')}")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
