"""Prometheus metrics of an agent (or of any :class:`~microseg.datapath.Datapath`).

:class:`DatapathCollector` is a custom collector: nothing is counted per packet in Python;
at each scrape it reads the datapath's counter arrays (:class:`~microseg.datapath.Counters`),
the conntrack table and the policy, plus what :class:`BatchObserver` accumulates per batch
(bytes by verdict, a histogram of batch latency, both with one NumPy call per batch).

:func:`serve` exposes a registry over HTTP on a loopback address (``127.0.0.1:9464``) or on
a Unix socket (``unix:/run/microseg/metrics.sock``); nothing else is accepted, so nothing
listens beyond loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import socketserver
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import ctstate
from ..conntrack import const as CK
from ..datapath import reasons as R
from ..errors import InputError
from .flowlog import PROTOS

# batch latency buckets, seconds (a batch of up to a few thousand frames)
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


class BatchObserver:
    """Per-batch additions the datapath's counters lack: bytes by verdict and the batch
    latency histogram. One ``bincount`` and one ``searchsorted`` per batch."""

    def __init__(self, buckets=BUCKETS):
        self.buckets = np.asarray(buckets, np.float64)
        self.bytes = np.zeros(4, np.int64)  # by verdict code
        self.hist = np.zeros(self.buckets.shape[0] + 1, np.int64)  # last: +Inf
        self.seconds = 0.0
        self.batches = 0

    def observe(self, batch, res, seconds: float) -> None:
        v = res.verdict
        if v.shape[0]:
            w = np.asarray(batch.wire_len, np.int64)
            self.bytes += np.bincount(v, weights=w, minlength=4)[:4].astype(np.int64)
        self.hist[int(np.searchsorted(self.buckets, seconds, side="left"))] += 1
        self.seconds += seconds
        self.batches += 1


_CACHE_EVENTS = (
    "hits",
    "misses",
    "stale",
    "uncacheable",
    "inserts",
    "updates",
    "evictions",
    "stale_replaced",
    "revalidated_kept",
    "revalidated_dropped",
    "flushes",
    "mask_probes",
    "mask_table_full",
)
_OFFLOAD_EVENTS = (
    "lookups",
    "hits",
    "hit_bytes",
    "bytes",
    "exceptions",
    "inserts",
    "refreshed",
    "refused_rate",
    "refused_capacity",
    "refused_collision",
    "removed",
    "expired",
    "invalidated",
)


def _named(arr, names: dict, skip_zero: bool = True):
    for i, v in enumerate(np.asarray(arr).tolist()):
        if v or not skip_zero:
            yield names.get(i, str(i)), int(v)


class DatapathCollector:
    """Reads ``source()`` (a Datapath, or anything with ``.dp``) when scraped.

    ``agent``: an :class:`~microseg.agent.agent.Agent`, for its own drops, ports, policy
    revision and reloads; ``observer``: a :class:`BatchObserver`."""

    def __init__(self, datapath=None, *, agent=None, observer: BatchObserver | None = None):
        self._dp = datapath
        self.agent = agent
        self.observer = observer

    @property
    def dp(self):
        return self.agent.dp if self.agent is not None else self._dp

    def describe(self):  # no samples at registration: collect() runs on scrape only
        return []

    def collect(self):
        dp = self.dp
        c = dp.counters
        pol = dp.policy
        # one consistent view of the arrays a policy swap replaces
        verdict, reason, level, ct = c.verdict.copy(), c.reason.copy(), c.level.copy(), c.ct.copy()
        vnis, tenant = c.vnis, c.tenant
        w_tx, w_rx, w_drop = c.workload_tx, c.workload_rx, c.workload_dropped

        m = CounterMetricFamily(
            "microseg_packets", "Packets judged by the datapath, by verdict", labels=["verdict"]
        )
        for name, v in _named(verdict, R.VERDICTS):
            m.add_metric([name], v)
        yield m
        yield CounterMetricFamily(
            "microseg_datapath_packets", "Packets judged by the datapath", value=c.packets
        )
        yield CounterMetricFamily(
            "microseg_datapath_bytes", "Bytes judged by the datapath (wire length)", value=c.bytes
        )
        if self.observer is not None:
            m = CounterMetricFamily(
                "microseg_bytes", "Bytes judged by the datapath, by verdict", labels=["verdict"]
            )
            for name, v in _named(self.observer.bytes, R.VERDICTS):
                m.add_metric([name], v)
            yield m
        m = CounterMetricFamily(
            "microseg_reason_packets", "Packets by the reason of their verdict", labels=["reason"]
        )
        for name, v in _named(reason, R.REASONS):
            m.add_metric([name], v)
        yield m
        m = CounterMetricFamily(
            "microseg_drops", "Packets not allowed, by reason", labels=["reason", "source"]
        )
        if self.agent is not None:
            for name, v in _named(self.agent.drops, R.REASONS):
                m.add_metric([name, "datapath"], v)
            for name, v in list(self.agent.agent_drops.items()):
                m.add_metric([name, "agent"], int(v))
        else:
            for i, v in enumerate(reason.tolist()):
                if v and not R.is_pass_reason(i):
                    m.add_metric([R.reason_name(i), "datapath"], int(v))
        yield m
        m = CounterMetricFamily(
            "microseg_level_packets", "Packets by the level that answered", labels=["level"]
        )
        for code, name in R.LEVELS.items():
            m.add_metric([name], int(level[code]))
        yield m
        m = CounterMetricFamily(
            "microseg_conntrack_state_packets", "Packets by their conntrack state", labels=["state"]
        )
        for name, v in _named(ct, {**ctstate.NAMES, 0: "untracked"}):
            m.add_metric([name], v)
        yield m

        names = {int(t.vni): t.name for t in pol.policy.tenants}
        m = CounterMetricFamily(
            "microseg_tenant_packets", "Packets by tenant and verdict", labels=["tenant", "vni", "verdict"]
        )
        for k in range(min(tenant.shape[0], vnis.shape[0] + 1)):
            if k < vnis.shape[0]:
                vni = int(vnis[k])
                tname, tvni = names.get(vni, str(vni)), str(vni)
            else:
                tname, tvni = "other", ""
            for name, v in _named(tenant[k], R.VERDICTS):
                m.add_metric([tname, tvni, name], v)
        yield m
        m = CounterMetricFamily(
            "microseg_workload_packets",
            "Packets by workload: sent and allowed (tx), received (rx), sent and dropped",
            labels=["workload", "direction"],
        )
        wn = pol.workload_names
        if len(wn) == w_tx.shape[0] == w_rx.shape[0] == w_drop.shape[0]:
            for i, name in enumerate(wn):
                for d, arr in (("tx", w_tx), ("rx", w_rx), ("dropped", w_drop)):
                    if arr[i]:
                        m.add_metric([name, d], int(arr[i]))
        yield m

        ctt = dp.conntrack
        yield GaugeMetricFamily(
            "microseg_conntrack_entries", "Connections in the conntrack table", value=len(ctt)
        )
        yield GaugeMetricFamily("microseg_conntrack_capacity", "Conntrack table capacity", value=ctt.capacity)
        m = CounterMetricFamily("microseg_conntrack_events", "Conntrack counters, by event", labels=["event"])
        for name, v in list(ctt.counters.items()):
            m.add_metric([name], int(v))
        yield m
        yield self._conntrack_states(ctt)
        yield from self._caches(dp)
        yield CounterMetricFamily(
            "microseg_revoked_connections", "Connections cut by a policy swap", value=c.revoked_connections
        )
        yield GaugeMetricFamily(
            "microseg_policy_version", "Version of the running compiled policy", value=pol.version
        )
        yield GaugeMetricFamily(
            "microseg_policy_rules", "Rules of the running policy", value=len(pol.ruleset)
        )
        m = GaugeMetricFamily("microseg_policy_info", "The running policy's hash", labels=["hash"])
        m.add_metric([str(pol.content_hash)], 1)
        yield m
        yield CounterMetricFamily(
            "microseg_policy_swaps", "Policy swaps of the datapath", value=dp.policy_swaps
        )

        ob = self.observer
        if ob is not None:
            cum = np.cumsum(ob.hist).tolist()
            edges = [repr(float(b)) for b in ob.buckets.tolist()] + ["+Inf"]
            yield HistogramMetricFamily(
                "microseg_batch_seconds",
                "Time the datapath took per batch",
                buckets=list(zip(edges, cum)),
                sum_value=ob.seconds,
            )

        a = self.agent
        if a is not None:
            yield from self._agent(a)

    @staticmethod
    def _conntrack_states(ctt):
        """Entries by protocol and TCP state: one vectorised pass over the table's entries."""
        m = GaugeMetricFamily(
            "microseg_conntrack_entries_by_state",
            "Connections in the conntrack table by protocol and TCP state",
            labels=["proto", "state"],
        )
        idx = ctt.used()
        if idx.size:
            e = ctt.ents[idx]
            code = e["proto"].astype(np.int64) * 16 + np.minimum(e["tcp_state"], 15)
            counts = np.bincount(code, minlength=256 * 16)
            for c in np.flatnonzero(counts).tolist():
                proto, st = divmod(c, 16)
                name = PROTOS.get(proto, str(proto))
                state = CK.TCP_STATE_NAMES[st] if proto == 6 and st < len(CK.TCP_STATE_NAMES) else "-"
                m.add_metric([name, state], int(counts[c]))
        return m

    @staticmethod
    def _caches(dp):
        """The flow caches' and the offload model's counters, where they are on."""
        for cname, cache in (("exact_match", dp.emc), ("megaflow", dp.megaflow)):
            if cache is None:
                continue
            st = cache.stats()
            ev = CounterMetricFamily(
                f"microseg_cache_{cname}_events", f"The {cname} cache's counters", labels=["event"]
            )
            for k in _CACHE_EVENTS:
                if k in st:
                    ev.add_metric([k], int(st[k]))
            yield ev
            yield GaugeMetricFamily(f"microseg_cache_{cname}_entries", "Entries in use", value=st["entries"])
        if dp.config.offload:
            ft = dp.fastpath.stats()
            ev = CounterMetricFamily(
                "microseg_offload_events", "The fast-path table's counters", labels=["event"]
            )
            for k in _OFFLOAD_EVENTS:
                if k in ft:
                    ev.add_metric([k], int(ft[k]))
            yield ev
            yield GaugeMetricFamily(
                "microseg_offload_entries", "Flows in the fast path", value=ft["occupancy"]
            )
            ins = dp.inspector.stats()
            ev = CounterMetricFamily("microseg_inspection_events", "Inspection counters", labels=["event"])
            for k, v in ins.items():
                if isinstance(v, (int, np.integer)):
                    ev.add_metric([k], int(v))
            yield ev
            g = GaugeMetricFamily(
                "microseg_inspection_flows", "Flows under inspection by state", labels=["state"]
            )
            for k, v in ins.get("flows", {}).items():
                g.add_metric([k], int(v))
            yield g

    def _agent(self, a):
        if a.policy_revision is not None:
            yield GaugeMetricFamily(
                "microseg_policy_revision", "Store revision of the running policy", value=a.policy_revision
            )
        yield CounterMetricFamily(
            "microseg_policy_reloads", "Policy reloads and store swaps", value=a.reloads
        )
        yield CounterMetricFamily(
            "microseg_policy_reloads_refused", "Policy reloads refused", value=a.reload_refused
        )
        m = CounterMetricFamily("microseg_agent_events", "The agent's own counters", labels=["event"])
        for k, v in list(a.counters.items()):
            m.add_metric([k], int(v))
        yield m
        ports = [(p.name, p.port) for p in a.wports]
        if a.underlay_open:
            ports.append(("underlay", a.underlay))
        m = CounterMetricFamily("microseg_port", "Per-port counters", labels=["port", "ifname", "counter"])
        for name, port in ports:
            for k, v in list(port.counters.items()):
                if isinstance(v, (int, np.integer)):
                    m.add_metric([name, port.ifname, k], int(v))
        yield m
        yield from self._ids(a)
        yield GaugeMetricFamily("microseg_agent_ready", "1 once the agent enforces", value=int(bool(a.ready)))
        yield GaugeMetricFamily(
            "microseg_agent_start_time_seconds", "Agent start, Unix time", value=a.started
        )

    @staticmethod
    def _ids(a):
        """Inspection (--ids): which engine and why, its counters, why connections left it;
        and the flow log's lines and timeouts."""
        ids = getattr(a, "ids", None)
        if ids is not None:
            st = ids.stats()
            g = GaugeMetricFamily(
                "microseg_ids_engine",
                "The inspection engine that runs (1) and why",
                labels=["engine", "note"],
            )
            g.add_metric([str(ids.engine), str(ids.note)], 1)
            yield g
            yield GaugeMetricFamily(
                "microseg_ids_ready", "1 while the inspection engine inspects", value=int(bool(st["ready"]))
            )
            m = CounterMetricFamily("microseg_ids_events", "Inspection counters (--ids)", labels=["event"])
            for k, v in st.items():
                if isinstance(v, int) and not k.startswith("ended_") and k != "blocked_flows":
                    m.add_metric([k], v)
            yield m
            m = CounterMetricFamily(
                "microseg_ids_inspection_ended",
                "Connections whose inspection ended, by why (packets, bypass, encrypted, drop)",
                labels=["reason"],
            )
            for k, v in st.items():
                if k.startswith("ended_"):
                    m.add_metric([k[len("ended_") :]], int(v))
            yield m
            yield GaugeMetricFamily(
                "microseg_ids_blocked_flows",
                "Connections the inspection engine blocks now",
                value=st["blocked_flows"],
            )
        fl = getattr(a, "flowlog", None)
        if fl is not None:
            yield CounterMetricFamily("microseg_flow_log_lines", "Flow-log lines written", value=fl.lines)
            m = CounterMetricFamily(
                "microseg_flow_log_timeouts",
                "Connections conntrack's idle timeout removed: logged (an end line) or not",
                labels=["logged"],
            )
            m.add_metric(["yes"], fl.timeouts)
            m.add_metric(["no"], fl.timeouts_unlogged)
            yield m


def registry_for(collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


# -- serving -----------------------------------------------------------------------------------
_LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


def parse_address(text: str):
    """``unix:PATH`` (or an absolute path) -> ``("unix", PATH)``; ``[HOST:]PORT`` with HOST
    a loopback address (default 127.0.0.1) -> ``("tcp", host, port)``. Anything beyond
    loopback is refused."""
    if text.startswith("unix:") or text.startswith("/"):
        path = text[5:] if text.startswith("unix:") else text
        if not path:
            raise InputError("--metrics unix: needs a path")
        return ("unix", os.path.abspath(path))
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    host = _LOOPBACK_NAMES.get(host, host)
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise InputError(f"--metrics {text}: only a loopback address or a Unix socket")
        p = int(port)
    except ValueError:
        raise InputError(f"--metrics {text}: write [127.0.0.1:]PORT or unix:PATH") from None
    if not 0 <= p <= 65535:
        raise InputError(f"--metrics {text}: port out of range")
    return ("tcp", host, p)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # scrapes are not logged
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _V6Server(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _UnixWSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_UNIX

    def server_bind(self):
        path = self.server_address
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket is created mode 0600
        try:
            socketserver.TCPServer.server_bind(self)
        finally:
            os.umask(old)
        self.server_name, self.server_port = "localhost", 0
        self.setup_environ()

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


class MetricsServer:
    """A registry served on a thread; ``url`` says where (``unix:PATH`` or ``http://...``)."""

    def __init__(self, address, registry: CollectorRegistry, wrap=None):
        """``wrap``: a callable taking the metrics WSGI app and returning the app to serve
        (the agent's REST API, :class:`microseg.agent.api.ApiApp`, which hands every path
        outside ``/v1/`` to it)."""
        spec = parse_address(address) if isinstance(address, str) else address
        app = make_wsgi_app(registry)
        if wrap is not None:
            app = wrap(app)
        self.httpd: _ThreadingWSGIServer
        if spec[0] == "unix":
            self.path = spec[1]
            self.httpd = _UnixWSGIServer(self.path, _Quiet)
            self.httpd.set_app(app)
            self.url = f"unix:{self.path}"
        else:
            self.path = None
            _, host, port = spec
            cls = _V6Server if ipaddress.ip_address(host).version == 6 else _ThreadingWSGIServer
            self.httpd = make_server(host, port, app, server_class=cls, handler_class=_Quiet)
            h = f"[{host}]" if ":" in host else host
            self.url = f"http://{h}:{self.httpd.server_port}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def scrape_unix(path: str, timeout: float = 5.0) -> str:
    """GET /metrics over a Unix socket (for tests and ``curl --unix-socket``'s absence)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            d = s.recv(65536)
            if not d:
                break
            chunks.append(d)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.") or b" 200" not in status:
        raise OSError(f"metrics: unexpected answer {head[:60]!r}")
    return body.decode()
