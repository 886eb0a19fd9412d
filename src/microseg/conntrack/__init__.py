"""Connection tracking with Linux nf_conntrack's observable behaviour, a batch at a time.

Interface used by the pipeline::

    ct = ConntrackTable(capacity=1_000_000, timeouts={"tcp_established": 3600})
    states = ct.process(batch, keys)        # uint8 ctstate bits per packet (microseg.ctstate)
    ct.counters / ct.drops                  # INVALID reasons and table events, by name
    ct.expire(budget)                       # bounded incremental expiry (process() does some)
    ct.lookup(batch, keys)                  # (entry, reply?) per packet, updates nothing
    ct.delete_where(lambda e: e["zone"] == 7)   # cut connections a new policy forbids
    ct.snapshot(path); ConntrackTable.restore(path)   # migrate a workload's connections

* **Key**: zone + protocol + both addresses + ports (ICMP / ICMPv6: id, type, code; other
  protocols: addresses only). Either direction finds the entry. The zone is the packet's
  tenant (VNI / VSID of the tunnel that carried it); untunnelled packets (tenant -1) go to
  ``default_zone`` (``const.UNTAGGED_ZONE``, 2**24, unless set): just past the 24-bit VNIs, so
  no tenant, VNI 0 included, shares a zone with untunnelled traffic.
* **Commit on allow**: ``process(batch, keys, decide=f)`` asks ``f`` about the packets that would
  open a connection and creates entries only for the allowed ones (Linux's confirm, OVS's
  ``ct(commit)``); a denied first packet leaves nothing, whatever else its batch holds.
* **States** (``microseg.ctstate``): NEW, ESTABLISHED, RELATED (ICMP errors quoting a tracked
  connection), INVALID, plus REPLY for the reply direction and TRACKED; 0 for packets conntrack
  leaves alone (non-IP, ICMPv6 neighbour discovery and MLD, which Linux leaves untracked).
  ``now`` comes from the packet timestamps unless given.
* **TCP**: Linux's state table, window tracking (``tcp_in_window``), retransmission and RST
  checks, with ``nf_conntrack_tcp_loose=1`` (mid-stream pickup) and ``tcp_be_liberal=0`` by
  default. UDP: unreplied, then assured once replied and still active after 2 s. ICMP/ICMPv6:
  echo-like requests open a connection, replies match it. Other protocols (including SCTP,
  GRE, UDP-Lite, which Linux tracks with dedicated modules) use the generic tracker.
* **Checks before tracking**: parse errors, fragments (reassembly is upstream) and bad L4
  checksums (``nf_conntrack_checksum=1``) make a packet INVALID; each reason is counted.
* **Pressure**: at most ``capacity`` connections. A new one in a full table evicts an expired
  or unassured connection found within ``evict_range`` index slots of its home slot (Linux's
  early drop); if there is none the packet is INVALID and counted ``table_full``. Assured
  connections are never evicted, and memory never grows.
* **Expiry**: a connection past its deadline is dead to lookups at once; its entry is reclaimed
  when a lookup meets it, when an eviction scan meets it, or by the round-robin sweep that each
  ``process()`` call advances by ``expire_budget`` entries -- no stop-the-world scan.
* **Memory**: one 128-byte entry per connection (64-byte aligned: two cache lines), an index
  of 2-4 slots of 8 bytes, a 4-byte free-list slot: at most 164 bytes per connection
  (``ConntrackTable.nbytes``).
"""

from .const import DEFAULT_TIMEOUTS, REASONS
from .table import ConntrackTable

__all__ = ["ConntrackTable", "DEFAULT_TIMEOUTS", "REASONS"]
