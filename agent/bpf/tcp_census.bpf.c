// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * One pass over every TCP socket of a node's shared established/listening hash tables
 * (issue #18: the agent's one-pass connection census, metrics.connections.source bpf).
 *
 * Why not SEC("iter/tcp"): the kernel's tcp iterator yields only the sockets of the network
 * namespace the iterator was created in (seq_sk_match() in net/ipv4/tcp_ipv4.c compares
 * sock_net(sk) with seq_file_net(seq)), while still walking the whole shared table: N pod
 * namespaces would still cost N walks of the node's sockets, exactly like N sock_diag dumps.
 * So this program walks the table itself, once, and tags every socket with its namespace.
 *
 * It is attached as a bpf_map iterator only to get a context that runs once per read: the
 * iterator calls it for every BPF map of the node and once more at the end with map == NULL;
 * the walk happens in that last call. The table walked is the one of the reading thread's
 * network namespace (net->ipv4.tcp_death_row.hashinfo): the node's shared table from any
 * namespace that shares it, the namespace's own one for a namespace created with
 * net.ipv4.tcp_child_ehash_entries.
 *
 * Every socket becomes one `struct census_socket` in the EVENTS ring buffer; STATS counts what
 * could not be emitted so the reader can refuse a partial census instead of undercounting.
 *
 * Types are declared here with only the fields used, relocated against the running kernel's
 * BTF (CO-RE), so the committed object does not depend on the build machine's kernel.
 * Build: agent/bpf/build.sh (clang -target bpf); the object is committed next to this file.
 */

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct hlist_nulls_node {
	struct hlist_nulls_node *next, **pprev;
};
struct hlist_nulls_head {
	struct hlist_nulls_node *first;
};
struct inet_ehash_bucket {
	struct hlist_nulls_head chain;
};
struct inet_listen_hashbucket {
	struct hlist_nulls_head nulls_head;
};
struct inet_hashinfo {
	struct inet_ehash_bucket *ehash;
	unsigned int ehash_mask;
	unsigned int lhash2_mask;
	struct inet_listen_hashbucket *lhash2;
};
struct inet_timewait_death_row {
	struct inet_hashinfo *hashinfo;
};
struct netns_ipv4 {
	struct inet_timewait_death_row tcp_death_row;
};
struct ns_common {
	unsigned int inum;
};
struct net {
	struct ns_common ns;
	struct netns_ipv4 ipv4;
};
struct nsproxy {
	struct net *net_ns;
};
struct task_struct {
	struct nsproxy *nsproxy;
};
struct in6_addr {
	__u8 s6_addr[16];
};
typedef struct {
	struct net *net;
} possible_net_t;
struct sock_common {
	union {
		__u64 skc_addrpair;
		struct {
			__be32 skc_daddr;
			__be32 skc_rcv_saddr;
		};
	};
	union {
		__u32 skc_portpair;
		struct {
			__be16 skc_dport;
			__u16 skc_num;
		};
	};
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	union {
		struct hlist_nulls_node skc_nulls_node;
	};
};
struct inode {
	unsigned long i_ino;
};
struct socket {
	short type;
};
struct socket_alloc {
	struct socket socket;
	struct inode vfs_inode;
};
struct sock {
	struct sock_common __sk_common;
	struct socket *sk_socket;
	__u32 sk_ack_backlog;
	__u32 sk_max_ack_backlog;
};
struct inet_connection_sock {
	struct {
		__u32 lrcvtime;
	} icsk_ack;
};
struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u32 lsndtime;
	__u32 copied_seq;
	__u32 write_seq;
	__u32 rcv_nxt;
	__u32 snd_una;
	__u32 srtt_us;
	__u32 total_retrans;
};
struct bpf_iter_meta {
	void *seq;
};
struct bpf_map;
struct bpf_iter__bpf_map {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
};

#pragma clang attribute pop

#define AF_INET 2
#define AF_INET6 10
#define TCP_LISTEN 10
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12
/* include/net/inet_hashtables.h: lhash2 chains end in nulls LISTENING_NULLS_BASE + bucket. */
#define LISTENING_NULLS_BASE (1U << 29)

/* Bucket heads copied per bpf_probe_read_kernel: most buckets are empty. */
#define CHUNK 32
#define MAX_BUCKET_BYTES 64
/* A power of two above CHUNK * MAX_BUCKET_BYTES: offsets are masked with it for the verifier. */
#define BUF_MASK 0xfff
/* Sockets followed per bucket chain; a longer chain is counted in STAT_TRUNCATED. */
#define MAX_CHAIN 64

/* One socket, as the reader in agent/src/metrics/connections/bpf.rs decodes it (little endian, 72 bytes). */
struct census_socket {
	__u32 netns;      /* net->ns.inum: st_ino of /proc/PID/ns/net */
	__u8 family;      /* AF_INET / AF_INET6 */
	__u8 state;       /* kernel TCP state (TCP_NEW_SYN_RECV for request sockets) */
	__u16 local_port; /* host order */
	__u16 remote_port; /* network order, as stored */
	__u16 pad;
	__u32 rqueue;     /* listeners: accept queue; others: bytes not yet read */
	__u32 wqueue;     /* listeners: accept queue limit; others: bytes not yet acknowledged */
	__u32 retransmits;
	__u32 srtt_us8;   /* tcp_sock.srtt_us (RTT << 3); 0 for TIME_WAIT and request sockets */
	__u32 idle_jiffies; /* since data was last sent or received, whichever is later (tcp_info) */
	__u64 inode;      /* 0 for TIME_WAIT and request sockets */
	__u8 local[16];   /* IPv4: first 4 bytes */
	__u8 remote[16];
};
/* The layout agent/src/metrics/connections/bpf.rs decodes (inode is 8-aligned: 4 bytes of padding before). */
_Static_assert(__builtin_offsetof(struct census_socket, idle_jiffies) == 28, "census_socket.idle");
_Static_assert(__builtin_offsetof(struct census_socket, inode) == 32, "census_socket.inode");
_Static_assert(__builtin_offsetof(struct census_socket, local) == 40, "census_socket.local");
_Static_assert(sizeof(struct census_socket) == 72, "census_socket size");

enum {
	STAT_SOCKETS,     /* sockets emitted */
	STAT_DROPPED,     /* sockets not emitted: ring buffer full */
	STAT_TRUNCATED,   /* chains longer than MAX_CHAIN */
	STAT_FAULTS,      /* kernel memory that could not be read */
	STAT_BUCKETS,     /* buckets walked (ehash + lhash2) */
	STAT_WALKS,       /* completed walks */
	STAT_WALKER_NETNS, /* namespace whose table was walked */
	STAT_MOVED,       /* chains that ended in another bucket's nulls: a socket moved under us */
	STAT_JIFFIES,     /* jiffies and CLOCK_MONOTONIC ns at the walk's start: the reader */
	STAT_KTIME_NS,    /* learns the kernel's HZ from two walks (idle times are in jiffies) */
	STAT_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_COUNT);
} STATS SEC(".maps");

struct chunk_buf {
	__u8 bytes[BUF_MASK + 1 + 8];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct chunk_buf);
	__uint(max_entries, 1);
} SCRATCH SEC(".maps");

static __always_inline void stat_add(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&STATS, &which);
	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline void stat_set(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&STATS, &which);
	if (v)
		*v = n;
}

/* Emits one socket; returns the next node of its chain. */
static __always_inline struct hlist_nulls_node *emit(struct hlist_nulls_node *node)
{
	struct sock_common *skc =
		(void *)node - bpf_core_field_offset(struct sock_common, skc_nulls_node);
	struct census_socket *out = bpf_ringbuf_reserve(&EVENTS, sizeof(*out), 0);
	if (!out) {
		stat_add(STAT_DROPPED, 1);
		return BPF_CORE_READ(node, next);
	}
	__builtin_memset(out, 0, sizeof(*out));
	struct net *net = BPF_CORE_READ(skc, skc_net.net);
	out->netns = BPF_CORE_READ(net, ns.inum);
	out->family = BPF_CORE_READ(skc, skc_family);
	out->state = BPF_CORE_READ(skc, skc_state);
	out->local_port = BPF_CORE_READ(skc, skc_num);
	out->remote_port = BPF_CORE_READ(skc, skc_dport);
	if (out->family == AF_INET6) {
		BPF_CORE_READ_INTO(&out->local, skc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&out->remote, skc, skc_v6_daddr);
	} else {
		__be32 a = BPF_CORE_READ(skc, skc_rcv_saddr);
		__be32 b = BPF_CORE_READ(skc, skc_daddr);
		__builtin_memcpy(out->local, &a, 4);
		__builtin_memcpy(out->remote, &b, 4);
	}
	if (out->state != TCP_TIME_WAIT && out->state != TCP_NEW_SYN_RECV) {
		struct sock *sk = (void *)skc;
		struct socket *so = BPF_CORE_READ(sk, sk_socket);
		if (so)
			out->inode = BPF_CORE_READ((struct socket_alloc *)so, vfs_inode.i_ino);
		if (out->state == TCP_LISTEN) {
			out->rqueue = BPF_CORE_READ(sk, sk_ack_backlog);
			out->wqueue = BPF_CORE_READ(sk, sk_max_ack_backlog);
		} else {
			struct tcp_sock *tp = (void *)skc;
			__s32 unread = BPF_CORE_READ(tp, rcv_nxt) - BPF_CORE_READ(tp, copied_seq);
			out->rqueue = unread > 0 ? unread : 0;
			out->wqueue = BPF_CORE_READ(tp, write_seq) - BPF_CORE_READ(tp, snd_una);
			out->retransmits = BPF_CORE_READ(tp, total_retrans);
			out->srtt_us8 = BPF_CORE_READ(tp, srtt_us);
			/* As tcp_get_info(): 32-bit jiffies deltas, wrapping like the kernel's. */
			__u32 now = bpf_jiffies64();
			__u32 sent = now - BPF_CORE_READ(tp, lsndtime);
			__u32 recv = now - BPF_CORE_READ(tp, inet_conn.icsk_ack.lrcvtime);
			out->idle_jiffies = sent < recv ? sent : recv;
		}
	}
	bpf_ringbuf_submit(out, 0);
	stat_add(STAT_SOCKETS, 1);
	return BPF_CORE_READ(node, next);
}

struct walk {
	void *table;     /* first bucket */
	__u32 buckets;   /* number of buckets */
	__u32 stride;    /* bytes per bucket */
	__u32 head_off;  /* offset of the hlist_nulls_head in a bucket */
	__u32 chunk_base; /* first bucket of the current chunk */
	__u32 nulls_base; /* a chain of bucket i ends in the nulls value nulls_base + i */
	struct chunk_buf *buf;
};

static long walk_bucket(__u64 i, struct walk *w)
{
	__u64 off = i * w->stride + w->head_off;
	if (off > CHUNK * MAX_BUCKET_BYTES - 8)
		return 1;
	/* Keeps the bound visible to the verifier (clang would drop a mask it can prove useless). */
	asm volatile("" : "+r"(off));
	off &= BUF_MASK;
	struct hlist_nulls_node *node = *(struct hlist_nulls_node **)(w->buf->bytes + off);
	for (int n = 0; n < MAX_CHAIN; n++) {
		/*
		 * The end of a chain is a "nulls" marker: an odd value, not a pointer, naming its
		 * bucket. The walk is lockless (RCU): a socket that moved to another chain while we
		 * followed it (rehash, reuse of its memory) leads to that chain's end; the kernel's
		 * own lockless lookups restart then, this walk reports it so the reader can retry.
		 */
		if ((unsigned long)node & 1) {
			if (((unsigned long)node >> 1) != w->nulls_base + w->chunk_base + i)
				stat_add(STAT_MOVED, 1);
			return 0;
		}
		node = emit(node);
	}
	if (!((unsigned long)node & 1))
		stat_add(STAT_TRUNCATED, 1);
	return 0;
}

static long walk_chunk(__u64 c, struct walk *w)
{
	__u32 first = c * CHUNK;
	__u32 n = w->buckets - first;
	if (n > CHUNK)
		n = CHUNK;
	__u32 bytes = n * w->stride;
	if (bytes == 0 || bytes > CHUNK * MAX_BUCKET_BYTES)
		return 1;
	asm volatile("" : "+r"(bytes));
	bytes &= BUF_MASK;
	if (bpf_probe_read_kernel(w->buf->bytes, bytes, w->table + (__u64)first * w->stride)) {
		stat_add(STAT_FAULTS, 1);
		return 1;
	}
	w->chunk_base = first;
	bpf_loop(n, walk_bucket, w, 0);
	return 0;
}

static __always_inline void walk_table(void *table, __u32 buckets, __u32 stride, __u32 head_off,
					__u32 nulls_base, struct chunk_buf *buf)
{
	if (!table || stride == 0 || stride > MAX_BUCKET_BYTES || head_off + 8 > stride) {
		stat_add(STAT_FAULTS, 1);
		return;
	}
	struct walk w = {
		.table = table, .buckets = buckets, .stride = stride, .head_off = head_off,
		.nulls_base = nulls_base, .buf = buf,
	};
	bpf_loop((buckets + CHUNK - 1) / CHUNK, walk_chunk, &w, 0);
	stat_add(STAT_BUCKETS, buckets);
}

SEC("iter/bpf_map")
int census_walk(struct bpf_iter__bpf_map *ctx)
{
	if (ctx->map)
		return 0; /* not the final call */
	__u32 zero = 0;
	struct chunk_buf *buf = bpf_map_lookup_elem(&SCRATCH, &zero);
	if (!buf)
		return 0;
	struct task_struct *task = (void *)bpf_get_current_task();
	struct net *net = BPF_CORE_READ(task, nsproxy, net_ns);
	struct inet_hashinfo *h = BPF_CORE_READ(net, ipv4.tcp_death_row.hashinfo);
	stat_set(STAT_WALKER_NETNS, BPF_CORE_READ(net, ns.inum));
	stat_set(STAT_JIFFIES, bpf_jiffies64());
	stat_set(STAT_KTIME_NS, bpf_ktime_get_ns());
	if (!h) {
		stat_add(STAT_FAULTS, 1);
		return 0;
	}
	walk_table(BPF_CORE_READ(h, lhash2), BPF_CORE_READ(h, lhash2_mask) + 1,
		   bpf_core_type_size(struct inet_listen_hashbucket),
		   bpf_core_field_offset(struct inet_listen_hashbucket, nulls_head),
		   LISTENING_NULLS_BASE, buf);
	walk_table(BPF_CORE_READ(h, ehash), BPF_CORE_READ(h, ehash_mask) + 1,
		   bpf_core_type_size(struct inet_ehash_bucket),
		   bpf_core_field_offset(struct inet_ehash_bucket, chain), 0, buf);
	stat_add(STAT_WALKS, 1);
	return 0;
}

/* GPL-compatible for the kernel (bpf_probe_read_kernel is GPL-only); BSD-2-Clause for this repository. */
char LICENSE[] SEC("license") = "Dual BSD/GPL";
