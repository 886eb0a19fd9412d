"""Live tests of Suricata's own decisions ending a connection's inspection (``lab up
--ids-rules``, Suricata installed; docs/inspection.md).

Two hosts, one tenant, echo servers in ``red/c``; the agents inspect at most a connection's
first 40 packets. Shown with real sockets and a real TLS handshake (Python's ssl module): once
Suricata logs the handshake (``encryption-handling: bypass``), the connection leaves the
inspected path as ``encrypted`` well before 40 packets, while it keeps sending; an alert of a
rule with the ``bypass`` keyword ends it as ``bypass``; an SSH transport's opening (banners, key
exchange, NEWKEYS: Suricata's ``ssh`` record) ends it as ``encrypted`` too; a ``drop`` rule ends it as ``drop``,
and the agent cuts the connection's conntrack entry. Where the kernel fast path runs (XDP,
bpffs), the connection that left early is offloaded before it reached the packets the fast
path otherwise waits for.

Needs root, ``ip netns``, ``suricata`` and ``openssl``; skipped otherwise. The lab is always
taken down.
"""

from __future__ import annotations

import os
import shutil

import pytest

from idslab import (
    BYPASS_PORT,
    DROP_PORT,
    ECHO,
    PLAIN_PORT,
    SSH_CLIENT,
    SSH_PORT,
    SSH_SERVER,
    TLS_PORT,
    IdsLab,
    make_cert,
    openssl_reason,
)
from livelab import netns_skip_reason, wait_for

PREFIX = f"msid{os.getpid() % 100000}"
IDS_PACKETS = 40
READY_DEADLINE = 90
RULES = """\
drop tcp any any -> any 7200 (msg:"microseg test: blocked payload"; flow:established,to_server; \
content:"EVILPAYLOAD"; sid:9200001; rev:1;)
alert tcp any any -> any 7300 (msg:"microseg test: seen enough"; flow:established,to_server; \
content:"BYPASSME"; bypass; sid:9200002; rev:1;)
"""


def _reason() -> str | None:
    r = netns_skip_reason(PREFIX) or openssl_reason()
    if r is None and shutil.which("suricata") is None:
        r = "suricata is not installed (.ci/suricata.sh)"
    return r


_REASON = _reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    lab = IdsLab.up(tmp_path_factory, request, PREFIX, RULES, IDS_PACKETS)
    for h in ("h1", "h2"):
        wait_for(lambda h=h: lab.status(h)["ids"]["ready"], READY_DEADLINE, f"{h}: suricata ready")
    cert, key = make_cert(lab.root)
    for port in (DROP_PORT, BYPASS_PORT, PLAIN_PORT):
        lab.serve("red/c", ECHO, port)
    lab.serve("red/c", ECHO, TLS_PORT, cert, key)
    lab.serve("red/c", SSH_SERVER, SSH_PORT)
    return lab


def test_auto_runs_suricata_and_says_why(lab):
    for h in ("h1", "h2"):
        ids = lab.status(h)["ids"]
        assert ids["engine"].startswith("suricata 7"), ids
        assert ids["note"].startswith("--ids auto: suricata 7") and "installed" in ids["note"], ids
        assert ids["bypass_sids"] == 1, ids


def test_tls_handshake_ends_inspection_as_encrypted(lab):
    before = {h: lab.stats(h) for h in ("h1", "h2")}
    sport, out = lab.client(TLS_PORT, "secret", 60, tls=True)
    assert out == "OK 61", out  # ~130 packets each way in all, paced
    for h in ("h1", "h2"):
        ends = wait_for(lambda h=h: lab.ids_ends(h, sport), 30, f"{h}: the TLS connection's ids_end")
        e = ends[0]
        assert e["reason"] == "encrypted" and e["engine"].startswith("suricata"), e
        assert 0 < e["packets"] < IDS_PACKETS, e  # Suricata's decision, not the bound
        st = lab.stats(h)
        assert st["ids"]["ended_encrypted"] > before[h]["ids"]["ended_encrypted"]
        grown = st["ids"]["packets_to_ids"] - before[h]["ids"]["packets_to_ids"]
        assert grown == e["packets"], (h, grown, e)  # nothing more of it went to Suricata
    # the eve record that told the agent so
    eve = lab.status("h1")["ids"]["eve"]
    with open(eve) as f:
        assert any('"event_type":"tls"' in line and f'"src_port":{sport}' in line for line in f)


def test_ssh_key_exchange_ends_inspection_as_encrypted(lab):
    r = lab.py("red/a", SSH_CLIENT, "10.9.1.3", SSH_PORT, 60, timeout=120)
    lines = r.stdout.split()
    assert lines[1:] == ["OK", "60"], r.stdout + r.stderr
    sport = int(lines[0])
    for h in ("h1", "h2"):
        ends = wait_for(lambda h=h: lab.ids_ends(h, sport), 30, f"{h}: the SSH connection's ids_end")
        assert ends[0]["reason"] == "encrypted" and 0 < ends[0]["packets"] < IDS_PACKETS, ends
    with open(lab.status("h1")["ids"]["eve"]) as f:
        assert any('"event_type":"ssh"' in line and f'"src_port":{sport}' in line for line in f)


def test_bypass_keyword_alert_ends_inspection_as_bypass(lab):
    sport, out = lab.client(BYPASS_PORT, "BYPASSME", 60)
    assert out == "OK 61", out
    ends = wait_for(lambda: lab.ids_ends("h1", sport), 30, "h1: the connection's ids_end")
    assert ends[0]["reason"] == "bypass" and ends[0]["packets"] < IDS_PACKETS, ends


def test_plain_connection_ends_after_its_packets(lab):
    sport, out = lab.client(PLAIN_PORT, "nothing to see", 60)
    assert out == "OK 61", out
    ends = wait_for(lambda: lab.ids_ends("h1", sport), 30, "h1: the connection's ids_end")
    assert ends[0]["reason"] == "packets" and ends[0]["packets"] == IDS_PACKETS, ends


def test_drop_ends_inspection_and_cuts_conntrack(lab):
    before = lab.stats("h1")["ids"]
    sport, out = lab.client(DROP_PORT, "EVILPAYLOAD", 3, timeout=3.0)
    assert out.startswith("FAIL 0"), out
    ends = wait_for(lambda: lab.ids_ends("h1", sport), 30, "h1: the blocked connection's ids_end")
    assert ends[0]["reason"] == "drop", ends
    wait_for(
        lambda: not [e for e in lab.conntrack("h1", dst="10.9.1.3") if e.get("sport") == sport],
        30,
        "the blocked connection gone from h1's conntrack",
    )
    after = lab.stats("h1")["ids"]
    assert after["ended_drop"] > before["ended_drop"] and after["cut_connections"] > before["cut_connections"]


def test_encrypted_connection_is_offloaded_early_where_the_fast_path_runs(lab):
    fp = lab.stats("h1")["fastpath"]
    if fp["kind"] != "xdp":
        pytest.skip(f"no kernel fast path here: {fp.get('reason')}")
    assert fp["after_packets"] == IDS_PACKETS + 2
    before = fp["offloaded"]
    # a handshake and a few echoes: far fewer packets than the fast path's after_packets
    sport, out = lab.client(TLS_PORT, "secret", 3, tls=True)
    assert out == "OK 4", out
    ends = wait_for(lambda: lab.ids_ends("h1", sport), 30, "h1: the TLS connection's ids_end")
    assert ends[0]["reason"] == "encrypted"
    assert lab.stats("h1")["fastpath"]["offloaded"] > before
