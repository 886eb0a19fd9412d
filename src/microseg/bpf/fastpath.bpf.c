// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * microseg kernel fast path: an XDP program that forwards the packets of flows the agent
 * has already judged and offloaded (exact 5-tuple hits in ms_flows) and hands everything
 * else to the agent unchanged (XDP_PASS, seen there through AF_PACKET).
 *
 * Build: clang -O2 -g -target bpf -c fastpath.bpf.c -o fastpath.bpf.o && llvm-strip -g
 * (see the Makefile's bpf target). Self-contained: no kernel or libbpf headers, so the
 * object depends on the compiler alone. The layouts below are mirrored in loader.py.
 */

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define INLINE static inline __attribute__((always_inline))

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

enum { XDP_ABORTED = 0, XDP_DROP = 1, XDP_PASS = 2, XDP_TX = 3, XDP_REDIRECT = 4 };

/* helper numbers from the kernel's UAPI */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_jiffies64)(void) = (void *)118;
static __u64 (*bpf_ktime_get_coarse_ns)(void) = (void *)160;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_xdp_adjust_head)(struct xdp_md *ctx, int delta) = (void *)44;

/* legacy map definitions: the loader reads them and creates the maps itself */
struct ms_map_def {
	__u32 type;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;
};

#define MAP_HASH 1
#define MAP_ARRAY 2
#define MAP_PERCPU_ARRAY 6

/* flow key: both directions of a flow are two entries */
struct ms_flow_key {
	__u32 port;     /* ingress ifindex; the VNI for a frame that came VXLAN-encapsulated */
	__u32 zone;     /* the workload port's zone; the VNI for tunnel ingress */
	__u8 saddr[16]; /* IPv4: first 4 bytes, rest zero */
	__u8 daddr[16];
	__u16 sport;    /* as on the wire (network order); ICMP echo: the identifier */
	__u16 dport;    /* as on the wire; ICMP echo: the type and code bytes */
	__u8 proto;
	__u8 family;    /* 4 or 6 */
	__u8 tunnel;    /* 1: arrived on the underlay */
	__u8 pad;
};

#define ACT_ENCAP 1  /* workload port -> VXLAN to the underlay */
#define ACT_LOCAL 2  /* workload port -> another workload port of this host */
#define ACT_DECAP 3  /* underlay -> decapsulate -> workload port */
#define ACT_DROP 4

#define TMPL_LEN 50 /* outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 */

struct ms_flow {
	__u32 action;
	__u32 ifindex;  /* where the frame leaves (XDP_TX when it is the ingress device) */
	__u8 mac[6];    /* LOCAL / DECAP: the (inner) destination MAC the frame must carry */
	__u8 pad0[2];
	__u32 peer_ip;  /* DECAP: the outer IPv4 source it must come from (network order) */
	__u32 mtu;      /* the target's MTU: a frame whose IP packet would exceed it passes
			 * (the agent answers it: too big); 0: no limit */
	__u64 packets;  /* counters: written by the program, read by the agent */
	__u64 bytes;
	__u64 last_seen; /* CLOCK_MONOTONIC_COARSE (ns) of the last hit */
	__u64 last_tick; /* jiffies at that hit: the clock is read once per flow per tick */
	__u8 tmpl[56];  /* ENCAP: outer headers, the first TMPL_LEN bytes used */
};

#define ROLE_NONE 0 /* not a port of ours */
#define ROLE_WORKLOAD 1
#define ROLE_UNDERLAY 2

struct ms_port {
	__u32 role;
	__u32 zone;     /* workload: its zone (the tenant's VNI) */
	__u8 mac[6];    /* workload: the workload's MAC; frames from another source pass */
	__u8 pad[2];
	__u32 local_ip; /* underlay: this host's outer IPv4 address (network order) */
};

enum {
	ST_PASS_MISS,
	ST_PASS_PORT,
	ST_PASS_NOT_IP,
	ST_PASS_VLAN,
	ST_PASS_MALFORMED,
	ST_PASS_FRAGMENT,
	ST_PASS_IP_OPTIONS,
	ST_PASS_IPV6_EXT,
	ST_PASS_TCP_CONTROL,
	ST_PASS_ICMP_OTHER,
	ST_PASS_PROTO,
	ST_PASS_NOT_VXLAN,
	ST_PASS_BAD_VXLAN,
	ST_PASS_MAC,
	ST_PASS_PEER,
	ST_PASS_ACTION,
	ST_PASS_HEADROOM,
	ST_PASS_TOO_BIG,
	ST_REDIRECT,
	ST_TX,
	ST_DROP,
	ST_COUNT
};

struct ms_map_def ms_flows SEC("maps") = {
	.type = MAP_HASH,
	.key_size = sizeof(struct ms_flow_key),
	.value_size = sizeof(struct ms_flow),
	.max_entries = 65536,
};

/* indexed by ifindex: an array lookup is inlined by the verifier, a hash lookup is not */
#define MAX_PORTS 65536
struct ms_map_def ms_ports SEC("maps") = {
	.type = MAP_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(struct ms_port),
	.max_entries = MAX_PORTS,
};

struct ms_map_def ms_stats SEC("maps") = {
	.type = MAP_PERCPU_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u64),
	.max_entries = ST_COUNT,
};

char _license[] SEC("license") = "Dual BSD/GPL";

#define ETH_P_IP 0x0008     /* 0x0800 as loaded from the wire on a little-endian machine */
#define ETH_P_IPV6 0xdd86
#define ETH_P_8021Q 0x0081
#define ETH_P_8021AD 0xa888
#define VXLAN_PORT_BE 0xb512 /* 4789 */

INLINE int count(__u32 reason, int verdict)
{
	__u64 *v = bpf_map_lookup_elem(&ms_stats, &reason);

	if (v)
		*v += 1;
	return verdict;
}

INLINE __u16 load16(const __u8 *p)
{
	return (__u16)p[0] | ((__u16)p[1] << 8);
}

INLINE __u16 be16(const __u8 *p)
{
	return ((__u16)p[0] << 8) | (__u16)p[1];
}

INLINE int is_v6_ext(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 44 || nh == 50 || nh == 51 || nh == 60 || nh == 135 ||
	       nh == 139 || nh == 140 || nh == 253 || nh == 254;
}

/*
 * Parse an Ethernet frame at data + off: fill the key's addresses, ports and protocol.
 * Returns -1 when the frame is fast-path material, else the ST_PASS_* reason. The L4
 * header sits at a fixed offset (no IPv4 options, no IPv6 extension headers), which keeps
 * every packet access a constant offset from one bounds check.
 */
INLINE int parse(void *data, void *data_end, __u32 off, struct ms_flow_key *key)
{
	__u8 *eth = (__u8 *)data + off;
	__u8 *l4;
	__u32 avail, l4len, proto;
	__u16 et;

	if ((void *)(eth + 14) > data_end)
		return ST_PASS_MALFORMED;
	et = load16(eth + 12);
	if (et == ETH_P_8021Q || et == ETH_P_8021AD)
		return ST_PASS_VLAN;
	avail = (__u32)((long)data_end - (long)(eth + 14));
	if (et == ETH_P_IP) {
		__u8 *ip = eth + 14;
		__u32 tot;

		if ((void *)(ip + 20) > data_end)
			return ST_PASS_MALFORMED;
		if ((ip[0] >> 4) != 4)
			return ST_PASS_MALFORMED;
		if ((ip[0] & 15) != 5)
			return ST_PASS_IP_OPTIONS;
		tot = be16(ip + 2);
		if (tot < 20 || tot > avail)
			return ST_PASS_MALFORMED;
		if (be16(ip + 6) & 0x3fff)
			return ST_PASS_FRAGMENT;
		proto = ip[9];
		l4len = tot - 20;
		key->family = 4;
		__builtin_memcpy(key->saddr, ip + 12, 4);
		__builtin_memcpy(key->daddr, ip + 16, 4);
		l4 = ip + 20;
		if (proto != 6 && proto != 17 && proto != 1)
			return ST_PASS_PROTO;
	} else if (et == ETH_P_IPV6) {
		__u8 *ip = eth + 14;
		__u32 plen;

		if ((void *)(ip + 40) > data_end)
			return ST_PASS_MALFORMED;
		if ((ip[0] >> 4) != 6)
			return ST_PASS_MALFORMED;
		plen = be16(ip + 4);
		if (plen > avail - 40)
			return ST_PASS_MALFORMED;
		proto = ip[6];
		if (proto != 6 && proto != 17 && proto != 58)
			return is_v6_ext(proto) ? ST_PASS_IPV6_EXT : ST_PASS_PROTO;
		l4len = plen;
		key->family = 6;
		__builtin_memcpy(key->saddr, ip + 8, 16);
		__builtin_memcpy(key->daddr, ip + 24, 16);
		l4 = ip + 40;
	} else {
		return ST_PASS_NOT_IP;
	}
	key->proto = proto;
	if (proto == 6) {
		if (l4len < 20 || (void *)(l4 + 20) > data_end)
			return ST_PASS_MALFORMED;
		if ((l4[12] >> 4) < 5 || (__u32)(l4[12] >> 4) * 4 > l4len)
			return ST_PASS_MALFORMED;
		if (l4[13] & 0x07) /* FIN, SYN, RST: the agent's conntrack sees them */
			return ST_PASS_TCP_CONTROL;
	} else if (proto == 17) {
		__u32 ulen;

		if (l4len < 8 || (void *)(l4 + 8) > data_end)
			return ST_PASS_MALFORMED;
		ulen = be16(l4 + 4);
		if (ulen < 8 || ulen > l4len)
			return ST_PASS_MALFORMED;
	} else {
		/* ICMP (proto 1) or ICMPv6 (58): echo request and reply only */
		if (l4len < 8 || (void *)(l4 + 8) > data_end)
			return ST_PASS_MALFORMED;
		if (proto == 1 ? (l4[0] != 8 && l4[0] != 0) : (l4[0] != 128 && l4[0] != 129))
			return ST_PASS_ICMP_OTHER;
		key->sport = load16(l4 + 4);
		key->dport = load16(l4);
		return -1;
	}
	key->sport = load16(l4);
	key->dport = load16(l4 + 2);
	return -1;
}

INLINE int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

INLINE __u16 flow_port(const struct ms_flow_key *key)
{
	const __u32 *w = (const __u32 *)key;
	__u32 h = 0x9e3779b9;

#pragma unroll
	for (int i = 0; i < 12; i++) {
		h ^= w[i];
		h *= 0x01000193;
	}
	h ^= h >> 16;
	h = 49152 | (h & 0x3fff);
	return (__u16)(((h & 0xff) << 8) | (h >> 8)); /* network order */
}

INLINE void hit(struct ms_flow *f, __u64 len)
{
	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, len);
	__u64 tick = bpf_jiffies64();

	/* the coarse clock moves once a tick: read it only when the tick moved (a read costs
	 * about as much as the rest of a hit) */
	if (tick != f->last_tick) {
		f->last_tick = tick;
		f->last_seen = bpf_ktime_get_coarse_ns();
	}
}

INLINE int forward(struct xdp_md *ctx, struct ms_flow *f)
{
	if (f->ifindex == ctx->ingress_ifindex)
		return count(ST_TX, XDP_TX);
	return count(ST_REDIRECT, (int)bpf_redirect(f->ifindex, 0));
}

INLINE int encap(struct xdp_md *ctx, struct ms_flow *f, struct ms_flow_key *key, __u64 len)
{
	void *data, *data_end;
	__u8 *h;
	__u32 sum = 0, inner;
	__u16 sport;

	if (f->mtu && len + TMPL_LEN - 14 > f->mtu)
		return count(ST_PASS_TOO_BIG, XDP_PASS);
	if (bpf_xdp_adjust_head(ctx, -TMPL_LEN))
		return count(ST_PASS_HEADROOM, XDP_PASS);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	h = data;
	if ((void *)(h + TMPL_LEN) > data_end)
		return count(ST_PASS_HEADROOM, XDP_ABORTED); /* cannot happen: len grew by TMPL_LEN */
	__builtin_memcpy(h, f->tmpl, TMPL_LEN);
	inner = (__u32)len;
	/* IPv4 total length, UDP length, UDP checksum 0, header checksum */
	h[16] = (__u8)((inner + 36) >> 8);
	h[17] = (__u8)(inner + 36);
	h[24] = 0;
	h[25] = 0;
	sport = load16(h + 34);
	if (sport == 0)
		sport = flow_port(key);
	h[34] = (__u8)sport;
	h[35] = (__u8)(sport >> 8);
	h[38] = (__u8)((inner + 16) >> 8);
	h[39] = (__u8)(inner + 16);
	h[40] = 0;
	h[41] = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += load16(h + 14 + 2 * i);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = ~sum & 0xffff;
	h[24] = (__u8)sum;
	h[25] = (__u8)(sum >> 8);
	hit(f, len);
	return forward(ctx, f);
}

INLINE int from_workload(struct xdp_md *ctx, struct ms_port *port, __u32 ifindex)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = (__u64)((long)data_end - (long)data);
	struct ms_flow_key key = {};
	struct ms_flow *f;
	__u8 *eth = data;
	int r;

	r = parse(data, data_end, 0, &key);
	if (r >= 0)
		return count(r, XDP_PASS);
	if ((void *)(eth + 14) > data_end)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	if (!mac_eq(eth + 6, port->mac))
		return count(ST_PASS_MAC, XDP_PASS);
	key.port = ifindex;
	key.zone = port->zone;
	f = bpf_map_lookup_elem(&ms_flows, &key);
	if (!f)
		return count(ST_PASS_MISS, XDP_PASS);
	if (f->action == ACT_DROP) {
		hit(f, len);
		return count(ST_DROP, XDP_DROP);
	}
	if (f->action == ACT_ENCAP)
		return encap(ctx, f, &key, len);
	if (f->action != ACT_LOCAL)
		return count(ST_PASS_ACTION, XDP_PASS);
	if (!mac_eq(eth, f->mac))
		return count(ST_PASS_MAC, XDP_PASS);
	if (f->mtu && len - 14 > f->mtu)
		return count(ST_PASS_TOO_BIG, XDP_PASS);
	hit(f, len);
	return forward(ctx, f);
}

INLINE int from_underlay(struct xdp_md *ctx, struct ms_port *port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = (__u64)((long)data_end - (long)data);
	struct ms_flow_key key = {};
	struct ms_flow *f;
	__u8 *o = data;
	__u32 tot, peer, vni;
	__u16 et;
	int r;

	if ((void *)(o + 14) > data_end)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	et = load16(o + 12);
	if (et == ETH_P_8021Q || et == ETH_P_8021AD)
		return count(ST_PASS_VLAN, XDP_PASS);
	if (et != ETH_P_IP)
		return count(ST_PASS_NOT_VXLAN, XDP_PASS);
	if ((void *)(o + 34) > data_end || (o[14] >> 4) != 4)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	if ((o[14] & 15) != 5)
		return count(ST_PASS_IP_OPTIONS, XDP_PASS);
	if (o[23] != 17)
		return count(ST_PASS_NOT_VXLAN, XDP_PASS);
	tot = be16(o + 16);
	/* the outer IP length covers the frame exactly: no trailer to carry past decap */
	if (tot + 14 != len)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	if (be16(o + 20) & 0x3fff)
		return count(ST_PASS_FRAGMENT, XDP_PASS);
	if (port->local_ip !=
	    ((__u32)o[30] | ((__u32)o[31] << 8) | ((__u32)o[32] << 16) | ((__u32)o[33] << 24)))
		return count(ST_PASS_NOT_VXLAN, XDP_PASS);
	if ((void *)(o + TMPL_LEN) > data_end)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	if (load16(o + 36) != VXLAN_PORT_BE)
		return count(ST_PASS_NOT_VXLAN, XDP_PASS);
	if (be16(o + 38) != tot - 20)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	if (o[42] != 0x08 || o[43] || o[44] || o[45] || o[49])
		return count(ST_PASS_BAD_VXLAN, XDP_PASS);
	vni = ((__u32)o[46] << 16) | ((__u32)o[47] << 8) | (__u32)o[48];
	peer = (__u32)o[26] | ((__u32)o[27] << 8) | ((__u32)o[28] << 16) | ((__u32)o[29] << 24);
	r = parse(data, data_end, TMPL_LEN, &key);
	if (r >= 0)
		return count(r, XDP_PASS);
	key.port = vni;
	key.zone = vni;
	key.tunnel = 1;
	f = bpf_map_lookup_elem(&ms_flows, &key);
	if (!f)
		return count(ST_PASS_MISS, XDP_PASS);
	if (f->action == ACT_DROP) {
		hit(f, len);
		return count(ST_DROP, XDP_DROP);
	}
	if (f->action != ACT_DECAP)
		return count(ST_PASS_ACTION, XDP_PASS);
	if (f->peer_ip != peer)
		return count(ST_PASS_PEER, XDP_PASS);
	if ((void *)(o + TMPL_LEN + 14) > data_end)
		return count(ST_PASS_MALFORMED, XDP_PASS);
	if (!mac_eq(o + TMPL_LEN, f->mac))
		return count(ST_PASS_MAC, XDP_PASS);
	if (f->mtu && len - TMPL_LEN - 14 > f->mtu)
		return count(ST_PASS_TOO_BIG, XDP_PASS);
	if (bpf_xdp_adjust_head(ctx, TMPL_LEN))
		return count(ST_PASS_HEADROOM, XDP_PASS);
	hit(f, len);
	return forward(ctx, f);
}

SEC("xdp")
int xdp_fastpath(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	struct ms_port *port = bpf_map_lookup_elem(&ms_ports, &ifindex);

	if (!port)
		return count(ST_PASS_PORT, XDP_PASS);
	if (port->role == ROLE_WORKLOAD)
		return from_workload(ctx, port, ifindex);
	if (port->role == ROLE_UNDERLAY)
		return from_underlay(ctx, port);
	return count(ST_PASS_PORT, XDP_PASS);
}

/* for the workload-side end of a veth: native XDP there lets redirected frames in */
SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
