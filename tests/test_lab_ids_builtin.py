"""Live tests of the built-in matcher as the inspection service (``lab up --ids builtin``,
the agent's ``--ids builtin``; what ``--ids auto`` runs where Suricata is not installed).

Two hosts, one tenant; echo servers in ``red/c``. Shown with real sockets: a content
``alert`` rule is logged (flow log, counters) and the connection goes on; a ``drop`` rule
drops the packet, blocks the connection and cuts its conntrack entry (the client gets no
echo, the agent's ``conntrack`` listing no longer holds it); a TLS connection leaves
inspection as ``encrypted`` at its first TLS record; a plain one after its N packets. And
the flow log's line for a connection conntrack's idle timeout removes (an unanswered UDP
datagram: 30 s).

Needs root and ``ip netns`` only (not Suricata); skipped otherwise. The lab is always taken
down.
"""

from __future__ import annotations

import os

import pytest

from idslab import (
    ALERT_PORT,
    DATAGRAM,
    DROP_PORT,
    ECHO,
    PLAIN_PORT,
    TLS_PORT,
    IdsLab,
    make_cert,
    openssl_reason,
)
from livelab import netns_skip_reason, wait_for

PREFIX = f"msib{os.getpid() % 100000}"
IDS_PACKETS = 16
RULES = """\
drop tcp any any -> any 7200 (msg:"microseg test: blocked payload"; flow:established,to_server; \
content:"EVILPAYLOAD"; sid:9200001; rev:1;)
alert tcp any any -> any 7400 (msg:"microseg test: marker"; flow:established,to_server; \
content:"MARKER"; sid:9200003; rev:2;)
"""

_REASON = netns_skip_reason(PREFIX) or openssl_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    lab = IdsLab.up(tmp_path_factory, request, PREFIX, RULES, IDS_PACKETS, ids="builtin")
    cert, key = make_cert(lab.root)
    for port in (DROP_PORT, ALERT_PORT, PLAIN_PORT):
        lab.serve("red/c", ECHO, port)
    lab.serve("red/c", ECHO, TLS_PORT, cert, key)
    return lab


def test_status_and_stats_name_the_builtin_engine(lab):
    for h in ("h1", "h2"):
        ids = lab.status(h)["ids"]
        assert ids["engine"] == "builtin" and ids["note"] == "--ids builtin", ids
        assert ids["running"] and ids["ready"] and ids["signatures"] == 2, ids
        assert set(ids["ended"]) == {"packets", "bypass", "encrypted", "drop"}
        assert lab.stats(h)["ids"]["engine"] == "builtin"


def test_alert_rule_is_logged_and_the_connection_goes_on(lab):
    before = lab.stats("h1")["ids"]["alerts"]
    sport, out = lab.client(ALERT_PORT, "MARKER here", 5)
    assert out == "OK 6", out

    def logged():
        return [
            r
            for r in lab.flow_log("h1")
            if r.get("event") == "ids" and r.get("sid") == 9200003 and r.get("sport") == sport
        ]

    recs = wait_for(logged, 30, "the alert in h1's flow log")
    r = recs[0]
    assert r["engine"] == "builtin" and r["action"] == "allowed" and r["rev"] == 2
    assert r["dst"] == "10.9.1.3" and r["dport"] == ALERT_PORT and r["tenant_vni"] == 7302
    assert r["msg"] == "microseg test: marker"
    assert lab.stats("h1")["ids"]["alerts"] > before


def test_drop_rule_blocks_and_cuts_the_connection(lab):
    before = lab.stats("h1")["ids"]
    sport, out = lab.client(DROP_PORT, "EVILPAYLOAD", 3, timeout=3.0)
    assert out.startswith("FAIL 0"), out  # no echo: the payload never reached the server
    ends = wait_for(lambda: lab.ids_ends("h1", sport), 30, "the connection's ids_end in h1's flow log")
    assert ends[0]["reason"] == "drop" and ends[0]["dport"] == DROP_PORT, ends
    blocked = [
        r
        for r in lab.flow_log("h1")
        if r.get("event") == "ids" and r.get("sid") == 9200001 and r["sport"] == sport
    ]
    assert blocked and blocked[0]["action"] == "blocked", blocked
    # the client's process has closed; whatever its retransmissions and FIN made, the agent
    # cut again: the conntrack listing of h1 no longer holds the connection
    wait_for(
        lambda: not [e for e in lab.conntrack("h1", dst="10.9.1.3") if e.get("sport") == sport],
        30,
        "the blocked connection gone from h1's conntrack",
    )
    after = lab.stats("h1")["ids"]
    assert after["ended_drop"] > before["ended_drop"], after
    assert after["ids_drop"] > before["ids_drop"] and after["cut_connections"] > before["cut_connections"]
    assert after["blocked_flows"] >= 1
    # a benign connection to the same port still works
    _sport, out = lab.client(DROP_PORT, "hello", 3)
    assert out == "OK 4", out


def test_tls_leaves_inspection_as_encrypted_before_n_packets(lab):
    sport, out = lab.client(TLS_PORT, "secret", 30, tls=True)
    assert out == "OK 31", out
    ends = wait_for(lambda: lab.ids_ends("h1", sport), 30, "the TLS connection's ids_end")
    assert ends[0]["reason"] == "encrypted", ends
    assert 0 < ends[0]["packets"] < IDS_PACKETS, ends  # at its first TLS record


def test_plain_connection_leaves_after_its_n_packets(lab):
    sport, out = lab.client(PLAIN_PORT, "plain", 30)
    assert out == "OK 31", out
    for h in ("h1", "h2"):
        ends = wait_for(lambda h=h: lab.ids_ends(h, sport), 30, f"{h}: the connection's ids_end")
        assert ends[0]["reason"] == "packets" and ends[0]["packets"] == IDS_PACKETS, ends


def test_an_idle_udp_flow_gets_a_timeout_end_line(lab):
    """The agent's between-batch conntrack sweep: an unanswered datagram's entry expires after
    conntrack's 30 s UDP timeout, and the flow log gets its end line with the bytes sent."""
    r = lab.py("red/a", DATAGRAM, "10.9.1.3", 7600, "x" * 100)
    assert r.returncode == 0, r.stderr
    sport = int(r.stdout.strip())

    def ended():
        return [
            x
            for x in lab.flow_log("h1")
            if x.get("event") == "end" and x.get("proto") == "udp" and x.get("sport") == sport
        ]

    assert [e for e in lab.conntrack("h1", proto="udp") if e.get("sport") == sport]
    recs = wait_for(ended, 90, "h1: the datagram's timeout end line")
    e = recs[0]
    assert e["close"] == "timeout" and e["reason"] == "timeout" and e["dport"] == 7600, e
    assert (e["src_workload"], e["dst_workload"]) == ("red/a", "red/c") and e["tenant"] == "red"
    assert e["bytes_orig"] >= 100 + 28 and e["bytes_reply"] == 0, e
    assert not [x for x in lab.conntrack("h1", proto="udp") if x.get("sport") == sport]
    from microseg.agent import control

    st = control.request(lab.state["hosts"]["h1"]["control"], "stats")
    assert st["flow_log"]["timeouts"] >= 1, st["flow_log"]
