"""Live enforcement: ``microseg agent`` on real interfaces and ``microseg lab``, a data centre
in network namespaces (see docs/agent.md).

``agent``: one host's enforcement point (AF_PACKET ports, the datapath, ARP/ND responder,
control socket). ``control``: the control socket's protocol. ``lab``: namespaces, veths, an
underlay bridge and one agent per host.
"""
