// SPDX-License-Identifier: GPL-2.0
/*
 * ring-reset-signal-repro.c - KVM_RESET_DIRTY_RINGS drops dirty-ring entries
 * when a signal is pending in the calling thread.
 *
 * WHAT IT SHOWS
 *   If a signal becomes pending in the thread that is inside
 *   KVM_RESET_DIRTY_RINGS, some of the entries that userspace had collected
 *   (flags = KVM_DIRTY_GFN_F_RESET) are marked invalid and counted in the
 *   ioctl's return value, but their pages are never write-protected again.
 *   Later guest writes to those pages are not logged at all - not in the next
 *   harvest, not in any later one - until dirty logging is toggled on the
 *   memslot.  Nothing tells userspace: the ioctl never fails, and the total
 *   of its return values equals the number of entries collected.  For live
 *   migration this means pages that are silently stale on the destination.
 *
 * THE TEST
 *   One VM, 2 vCPUs.  Slot 0 (2 MiB at GPA 0, NOT dirty-logged) holds the
 *   guest code, page tables, GDT/TSS and the publish page; slot 1 (32 MiB at
 *   GPA 1 GiB, KVM_MEM_LOG_DIRTY_PAGES) holds a 16 MiB data region per vCPU.
 *   The dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, else KVM_CAP_DIRTY_LOG_RING)
 *   is enabled before the vCPUs are created; CPUID comes from
 *   KVM_GET_SUPPORTED_CPUID.  Each vCPU is put straight into 64-bit CPL3 with
 *   KVM_SET_SREGS/KVM_SET_REGS (flat DPL3 segments, EFER.LME|LMA, CR0.PG|PE,
 *   CR4.PAE, 4-level paging with 2 MiB pages and U=1 at every level; no CPL0
 *   code at all) and runs 17 instructions of machine code (listed below):
 *       started[i] = s+1; page[s mod 4096] of region i = s; done[i] = s+1; s++
 *   until the host sets the phase word; it then writes every page of its
 *   region once more and stores to a doorbell GPA that has no memslot
 *   (KVM_EXIT_MMIO).
 *
 *   A harvester thread, every 2 ms, under one mutex: reads done[], collects
 *   every ring (acquire load of flags, release store of F_RESET), calls
 *   KVM_RESET_DIRTY_RINGS, reads started[].  If the ioctl returned fewer
 *   entries than are collected and not yet reset, it calls it again at once
 *   (as a careful VMM would), so deferred entries are not mistaken for lost
 *   ones ("short" below).  Check per harvest: each sequence number s with
 *       started[i] read after the previous reset  <=  s  <  done[i] read before this collection
 *   was written after the previous reset had returned and before this
 *   collection began, so page (s mod 4096) must be in this harvest (collected
 *   by the harvester, or by a ring-full exit since the previous harvest).
 *   A page that is not is a "missed write" (counted once per page per harvest).
 *   At the end the signals stop, one harvest is taken with every signal
 *   blocked, the phase word makes every vCPU write every page once more, and
 *   the rings are collected again: pages absent from that collection are
 *   "permanently unlogged" (their SPTEs stayed writable).
 *
 *   Kicks: pthread_kill(SIGUSR1) to a vCPU thread; the handler (no SA_RESTART)
 *   sets kvm_run.immediate_exit, so KVM_RUN returns EINTR.  Periodic kicks come
 *   at uniformly random intervals of 0.5-1.5 x the period (mean = the period;
 *   --no-jitter for a fixed period, which tends to phase-lock with the 2 ms
 *   harvests and makes runs vary more).  Ring-full exits: on
 *   KVM_EXIT_DIRTY_RING_FULL the vCPU thread collects its own ring and calls
 *   KVM_RESET_DIRTY_RINGS itself (same mutex) before re-entering.
 *
 *   Attribution: after every reset call the program walks the collected
 *   entries KVM consumed in that call (flags no longer F_RESET; it keeps a
 *   copy of each entry's gfn) and replays kvm_dirty_ring_reset()'s batching
 *   on them.  When a signal reached the calling thread during the call, the
 *   batch still pending where KVM stopped on each ring is what an early
 *   -EINTR return would drop; those pages are "predicted".  The per-run line
 *   says how many permanently unlogged pages lie outside the predicted ones
 *   (0 everywhere on this host), and "count-mismatch" would show up if the
 *   ioctl's return value ever differed from the entries KVM visibly consumed.
 *
 *   Configurations (small ring = the smallest size the host accepts, 4 KiB =
 *   256 entries here; large ring = 1 MiB = 65536 entries, never full in 2 ms):
 *     1 nokick-small      no signals; small rings (ring-full resets on vCPU threads)
 *     2 kick-small        SIGUSR1 to each vCPU thread every 500 us; small rings
 *     3 kick-small-blk    as 2, with SIGUSR1 blocked around the ring-full reset
 *     4 kick-large        SIGUSR1 to each vCPU thread every 500 us; large rings
 *     5 sigharv-large     no vCPU kicks; SIGUSR1 to the harvester every 500 us; large rings
 *     6 kick-per-harvest  one SIGUSR1 to each vCPU thread before each harvest
 *                         (the harvester waits up to 2 ms for both to exit); small rings
 *   --guard blocks all signals (pthread_sigmask) around every
 *   KVM_RESET_DIRTY_RINGS call in every thread.
 *
 * BUILD AND RUN (as root, or with access to /dev/kvm; x86-64)
 *     gcc -O2 -Wall -pthread -o rr ring-reset-signal-repro.c
 *     ./rr                          # all six configs, 6 runs x 8 s each
 *     ./rr --guard --config 2,5     # the signal configs, resets guarded
 *     ./rr --config 2,6 --harvest-us 10000   # more ring-full resets on vCPU threads
 *     ./rr --help                   # --runs N --seconds S --config LIST ...
 *   About 40 MiB per VM and two busy vCPU threads.  Exit status 0 unless the
 *   setup failed (1, with one line on stderr: which call, errno text) or an
 *   option is wrong (2).  Without a dirty ring it prints "no dirty ring on
 *   this host" and exits 0.
 *   Per-run line: harvests; ring-full exits; signals sent; entries collected;
 *   entries reset as returned by the ioctl (calls, mean time per call, calls
 *   that returned short); signals handled by a thread while inside a reset
 *   call; missed writes; permanently unlogged pages; then the attribution.
 *
 * EXPECTED OUTPUT ON THIS HOST (kvm-pvm, 6.18)
 *   Linux 6.18.44 with kvm-pvm built in (shadow MMU, tdp_mmu=N), 2 host cores
 *   shared with other builds (load 5-6); KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
 *   small ring 4 KiB (256 entries), large 1 MiB; 6 runs x 8 s per line.
 *
 *   harvest every 2 ms (default), unguarded:
 *     config 1 nokick-small: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 2 kick-small: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 3 kick-small-blk: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 4 kick-large: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 5 sigharv-large: runs losing pages 5/6, missed writes 1391, permanently unlogged 64
 *     config 6 kick-per-harvest: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *   same, --guard:
 *     config 2 kick-small guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 3 kick-small-blk guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 4 kick-large guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 5 sigharv-large guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 6 kick-per-harvest guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *   harvest every 10 ms (--harvest-us 10000: ~10x more ring-full exits,
 *   so more resets run on the kicked vCPU threads), unguarded:
 *     config 1 nokick-small: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 2 kick-small: runs losing pages 5/6, missed writes 880, permanently unlogged 52
 *     config 3 kick-small-blk: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 6 kick-per-harvest: runs losing pages 1/6, missed writes 68, permanently unlogged 2
 *   same, --guard:
 *     config 2 kick-small guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 3 kick-small-blk guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *     config 6 kick-per-harvest guarded: runs losing pages 0/6, missed writes 0, permanently unlogged 0
 *
 *   (--guard was not run for config 1, which sends no signals.)
 *   Per-run lines look like (config 5, run 4, unguarded then guarded):
 *     config 5 sigharv-large    run 4/6: harvests 3929 ring-full 0 kicks 15977
 *           collected 304430 reset 304430 (3936 calls, avg 22.4 us, 5 short)
 *           sig-in-reset 11 missed 844 unlogged 34 | signalled resets 11, their
 *           pending batches 318 pages, unlogged outside them 0
 *     config 5 sigharv-large    guarded run 4/6: harvests 3940 ring-full 0 kicks
 *           15982 collected 434807 reset 434807 (3942 calls, avg 41.3 us, 0 short)
 *           sig-in-reset 90 missed 0 unlogged 0
 *
 *   At 2 ms the small rings seldom fill on this host (the guest dirties only
 *   ~15-40 K pages/s per vCPU here: 40-150 ring-full exits per run), so a kick
 *   rarely lands in a reset on a vCPU thread; with 10 ms harvests it often does.
 *   Every permanently unlogged page was in a predicted batch ("unlogged outside
 *   them 0" in every run), and no ioctl count differed from the entries KVM
 *   consumed.
 *
 *   On an unaffected host every summary line reads
 *   "runs losing pages 0/6, missed writes 0, permanently unlogged 0".
 *
 * SUSPECTED MECHANISM (upstream virt/kvm, not kvm-pvm specific)
 *   virt/kvm/dirty_ring.c, kvm_dirty_ring_reset(), as changed for v6.17 by
 *   49005a2a3d2a ("KVM: Bail from the dirty ring reset flow if a signal is
 *   pending") and e46ad851150f ("KVM: Use mask of harvested dirty ring
 *   entries to coalesce dirty ring resets"), pulled as
 *   tags/kvm-x86-dirty_ring-6.17 (up to 614fb9d1479b):
 *
 *	while (likely((*nr_entries_reset) < INT_MAX)) {
 *		if (signal_pending(current))
 *			return -EINTR;                <-- returns with 'mask' pending
 *
 *		entry = &ring->dirty_gfns[ring->reset_index & (ring->size - 1)];
 *		if (!kvm_dirty_gfn_harvested(entry))
 *			break;
 *		next_slot = READ_ONCE(entry->slot);
 *		next_offset = READ_ONCE(entry->offset);
 *		kvm_dirty_gfn_set_invalid(entry);     <-- entry handed back,
 *		ring->reset_index++;
 *		(*nr_entries_reset)++;                <-- counted,
 *		if (mask) {
 *			cond_resched();
 *			if (next_slot == cur_slot) {
 *				s64 delta = next_offset - cur_offset;
 *				if (delta >= 0 && delta < BITS_PER_LONG) {
 *					mask |= 1ull << delta;   <-- but only batched
 *					continue;
 *				}
 *				... (backwards case, also 'continue')
 *			}
 *			kvm_reset_dirty_gfn(kvm, cur_slot, cur_offset, mask);
 *		}
 *		cur_slot = next_slot;
 *		cur_offset = next_offset;
 *		mask = 1;
 *	}
 *	if (mask)
 *		kvm_reset_dirty_gfn(kvm, cur_slot, cur_offset, mask);
 *
 *   Entries batched in 'mask' (up to 64 neighbouring gfns of one slot, which
 *   is what a guest scanning memory produces) are already invalidated and
 *   counted; their re-protection, kvm_reset_dirty_gfn() ->
 *   kvm_arch_mmu_enable_log_dirty_pt_masked(), happens only when the batch is
 *   flushed.  The -EINTR return at the top of the loop skips that flush (even
 *   after the last entry of a ring, when the count is complete), so those
 *   pages keep writable SPTEs and are never logged again.  The caller,
 *   kvm_vm_ioctl_reset_dirty_pages() in virt/kvm/kvm_main.c, stops at the
 *   first error and discards it:
 *
 *	kvm_for_each_vcpu(i, vcpu, kvm) {
 *		r = kvm_dirty_ring_reset(vcpu->kvm, &vcpu->dirty_ring, &cleared);
 *		if (r)
 *			break;
 *	}
 *	mutex_unlock(&kvm->slots_lock);
 *	if (cleared)
 *		kvm_flush_remote_tlbs(kvm);
 *	return cleared;
 *
 *   so userspace gets a positive count (short when later entries or rings
 *   were left for the next call) and never -EINTR.
 *   Possible fix: flush the pending batch before bailing out, e.g.
 *		if (signal_pending(current)) {
 *			if (mask)
 *				kvm_reset_dirty_gfn(kvm, cur_slot, cur_offset, mask);
 *			return -EINTR;
 *		}
 *   and, perhaps, let the ioctl report -EINTR when it reset nothing.
 *   Userspace workaround: block signals around KVM_RESET_DIRTY_RINGS (--guard).
 *   Hosts with VMX/SVM and v6.17+ should show the same (not tested here: this
 *   host has no hardware virtualization).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* The dirty ring ABI (Documentation/virt/kvm/api.rst), for older headers. */
#ifndef KVM_CAP_DIRTY_LOG_RING
#define KVM_CAP_DIRTY_LOG_RING 192
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
#ifndef KVM_RESET_DIRTY_RINGS
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#endif
#ifndef KVM_DIRTY_GFN_F_DIRTY
#define KVM_DIRTY_GFN_F_DIRTY (1u << 0)
#define KVM_DIRTY_GFN_F_RESET (1u << 1)
struct kvm_dirty_gfn {
	__u32 flags;
	__u32 slot;
	__u64 offset;
};
#endif
#define RING_PGOFF 64 /* KVM_DIRTY_LOG_PAGE_OFFSET on x86 */

#define NR_VCPUS 2
#define NPAGES 4096u                       /* 16 MiB of 4 KiB pages per vCPU */
#define REGION_BYTES ((uint64_t)NPAGES << 12)
#define TOTAL_PAGES (NR_VCPUS * NPAGES)

/* Slot 0: 2 MiB at GPA 0, not logged.  Slot 1: the data, logged. */
#define LOW_SLOT 0
#define LOW_BYTES (2ull << 20)
#define DATA_SLOT 1
#define DATA_GPA (1ull << 30)
#define DATA_BYTES (NR_VCPUS * REGION_BYTES)
#define CODE_GPA 0x1000
#define PUB_GPA 0x2000   /* per vCPU {done, started} at +64*i; phase at +0x800 */
#define PHASE_OFF 0x800
#define PML4_GPA 0x3000
#define PDPT_GPA 0x4000
#define PD0_GPA 0x5000
#define PD1_GPA 0x6000
#define GDT_GPA 0x7000
#define TSS_GPA 0x8000
#define STACK_TOP 0x1ff000
#define DOORBELL_GPA 0x200000 /* mapped, but no memslot */

#define SEL_UDATA 0x23 /* GDT[4] | RPL3 */
#define SEL_UCODE 0x2b /* GDT[5] | RPL3 */
#define SEL_TSS 0x30   /* GDT[6..7] */

/*
 * Guest code (CPL3, 64-bit).  In: rdi = region base, rsi = &pub[i]
 * ({done, started}), rdx = &phase, rcx = NPAGES-1, r9 = NPAGES, rbx = 0,
 * r10 = doorbell (a user-mapped GPA with no memslot: the store exits as MMIO;
 * port I/O is not used because a CPL3 OUT with IOPL=3 raises #GP on this host).
 *  0: 48 8d 43 01     lea  rax,[rbx+1]
 *  4: 48 89 46 08     mov  [rsi+8],rax        started = s+1
 *  8: 48 89 d8        mov  rax,rbx
 *  b: 48 21 c8        and  rax,rcx
 *  e: 48 c1 e0 0c     shl  rax,12
 * 12: 48 89 1c 07     mov  [rdi+rax],rbx      page (s mod N) = s
 * 16: 48 8d 43 01     lea  rax,[rbx+1]
 * 1a: 48 89 06        mov  [rsi],rax          done = s+1
 * 1d: 48 89 c3        mov  rbx,rax
 * 20: 48 83 3a 00     cmp  qword [rdx],0
 * 24: 74 da           je   0
 * 26: 45 31 c0        xor  r8d,r8d            phase 2:
 * 29: 4c 89 c0        mov  rax,r8
 * 2c: 48 c1 e0 0c     shl  rax,12
 * 30: 48 89 1c 07     mov  [rdi+rax],rbx      every page once more
 * 34: 49 ff c0        inc  r8
 * 37: 4d 39 c8        cmp  r8,r9
 * 3a: 72 ed           jb   29
 * 3c: 49 89 1a        mov  [r10],rbx          doorbell: KVM_EXIT_MMIO, finished
 * 3f: eb fe           jmp  3f
 */
static const uint8_t guest_code[] = {
	0x48, 0x8d, 0x43, 0x01, 0x48, 0x89, 0x46, 0x08, 0x48, 0x89, 0xd8, 0x48,
	0x21, 0xc8, 0x48, 0xc1, 0xe0, 0x0c, 0x48, 0x89, 0x1c, 0x07, 0x48, 0x8d,
	0x43, 0x01, 0x48, 0x89, 0x06, 0x48, 0x89, 0xc3, 0x48, 0x83, 0x3a, 0x00,
	0x74, 0xda, 0x45, 0x31, 0xc0, 0x4c, 0x89, 0xc0, 0x48, 0xc1, 0xe0, 0x0c,
	0x48, 0x89, 0x1c, 0x07, 0x49, 0xff, 0xc0, 0x4d, 0x39, 0xc8, 0x72, 0xed,
	0x49, 0x89, 0x1a, 0xeb, 0xfe,
};

struct config {
	const char *name;
	unsigned kick_vcpus_us;     /* SIGUSR1 to every vCPU thread this often */
	unsigned kick_harvester_us; /* SIGUSR1 to the harvester thread this often */
	int small_ring;             /* smallest ring: frequent ring-full exits */
	int block_usr1_ringfull;    /* SIGUSR1 blocked around the ring-full reset */
	int kick_per_harvest;       /* one kick to every vCPU before each harvest */
};

static const struct config configs[] = {
	{ "nokick-small", 0, 0, 1, 0, 0 },
	{ "kick-small", 500, 0, 1, 0, 0 },
	{ "kick-small-blk", 500, 0, 1, 1, 0 },
	{ "kick-large", 500, 0, 0, 0, 0 },
	{ "sigharv-large", 0, 500, 0, 0, 0 },
	{ "kick-per-harvest", 0, 0, 1, 0, 1 },
};
#define NR_CONFIGS (int)(sizeof(configs) / sizeof(configs[0]))

/* Options. */
static int opt_runs = 6, opt_seconds = 8, opt_guard, opt_no_retry, opt_no_jitter;
static unsigned opt_harvest_us = 2000;
static uint32_t opt_small_bytes, opt_large_bytes = 1u << 20;

/* Host facts. */
static int kvm_fd, ring_cap, vcpu_mmap_size;
static uint32_t ring_min_bytes, ring_max_bytes;
static struct kvm_cpuid2 *cpuid;

struct vcpu {
	int id, fd;
	struct kvm_run *run;
	struct kvm_dirty_gfn *ring;
	uint32_t ring_entries, fetch; /* fetch: our next entry (free-running) */
	uint32_t kdone;               /* first collected entry KVM has not reset yet */
	uint64_t *shadow;             /* gfn offset of each collected entry, by ring index */
	pthread_t thread;
	uint64_t exits, ring_full;    /* exits: atomic */
	int finished;                 /* atomic */
};

/* One run. */
static struct {
	const struct config *cfg;
	int vm_fd;
	uint8_t *low, *data;
	struct vcpu v[NR_VCPUS];
	volatile uint64_t *pub;   /* pub[8*i] = done, pub[8*i+1] = started */
	volatile uint64_t *phase;
	pthread_t harvester;
	pthread_mutex_t mu;       /* every collect + reset pair, all threads */
	uint8_t pending[TOTAL_PAGES]; /* collected by ring-full exits since the last harvest */
	uint64_t collected, reset, outstanding, reset_calls, short_resets, reset_errors, reset_ns;
	uint64_t foreign;         /* entries outside the data slot (should be 0) */
	uint64_t count_mismatch;  /* ioctl count != entries KVM visibly consumed */
	uint64_t signalled_resets;
	uint8_t predicted[TOTAL_PAGES]; /* pages of a batch pending when a signalled reset stopped */
	int kicker_stop, abort;   /* atomic */
	char fail[256];
} R;

static uint64_t sig_in_reset, kicks; /* atomic */
static __thread struct kvm_run *tls_run;
static __thread volatile sig_atomic_t tls_in_reset;
static __thread volatile sig_atomic_t tls_sigs;  /* signals handled while tls_in_reset */

static void setup_fail(const char *what, int err)
{
	fprintf(stderr, "setup failed: %s: %s\n", what, strerror(err));
	exit(1);
}

static int xioctl(int fd, unsigned long req, unsigned long arg, const char *what)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		setup_fail(what, errno);
	return r;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
	struct timespec ts = { .tv_sec = t / 1000000000ull, .tv_nsec = t % 1000000000ull };
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* A failure inside a thread of the run: remembered, reported by main. */
static void thread_fail(const char *fmt, ...)
{
	static pthread_mutex_t fail_mu = PTHREAD_MUTEX_INITIALIZER;
	va_list ap;
	pthread_mutex_lock(&fail_mu);
	if (!R.fail[0]) {
		va_start(ap, fmt);
		vsnprintf(R.fail, sizeof(R.fail), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&fail_mu);
	__atomic_store_n(&R.abort, 1, __ATOMIC_RELEASE);
}

static void on_sigusr1(int sig)
{
	(void)sig;
	if (tls_run)
		tls_run->immediate_exit = 1;
	if (tls_in_reset) {
		tls_sigs++;
		__atomic_add_fetch(&sig_in_reset, 1, __ATOMIC_RELAXED);
	}
}

/* ---- the harvest protocol ------------------------------------------------ */

/* Collect one vCPU's ring into 'set'. Caller holds R.mu. */
static void collect(struct vcpu *v, uint8_t *set)
{
	for (;;) {
		struct kvm_dirty_gfn *e = &v->ring[v->fetch & (v->ring_entries - 1)];
		/* Acquire: slot/offset were written before KVM published F_DIRTY. */
		if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
			break;
		uint32_t slot = e->slot & 0xffff;
		uint64_t off = e->offset;
		if (slot == DATA_SLOT && off < TOTAL_PAGES)
			set[off] = 1;
		else
			R.foreign++;
		v->shadow[v->fetch & (v->ring_entries - 1)] = slot == DATA_SLOT ? off : ~0ull;
		/* Release: hand the entry back only after reading it. */
		__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
		v->fetch++;
		R.collected++;
		R.outstanding++;
	}
}

/*
 * After a KVM_RESET_DIRTY_RINGS call: walk the entries KVM consumed in it
 * (collected entries whose flags are no longer F_RESET) and replay the
 * batching of kvm_dirty_ring_reset() on their gfns.  Returns the number
 * consumed.  If a signal reached the thread during the call, the batch still
 * pending where KVM stopped on each ring is what an early -EINTR return would
 * drop without re-protecting: remember those pages in R.predicted.
 */
static uint64_t replay_reset(int signalled)
{
	uint64_t consumed = 0;
	for (int i = 0; i < NR_VCPUS; i++) {
		struct vcpu *v = &R.v[i];
		uint64_t cur = 0, next;
		unsigned long mask = 0;
		while (v->kdone != v->fetch) {
			struct kvm_dirty_gfn *e = &v->ring[v->kdone & (v->ring_entries - 1)];
			if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) == KVM_DIRTY_GFN_F_RESET)
				break;
			next = v->shadow[v->kdone & (v->ring_entries - 1)];
			v->kdone++;
			consumed++;
			if (mask) {
				int64_t delta = (int64_t)(next - cur);
				if (delta >= 0 && delta < 64) {
					mask |= 1ul << delta;
					continue;
				}
				if (delta > -64 && delta < 0 && (mask << -delta >> -delta) == mask) {
					cur = next;
					mask = (mask << -delta) | 1;
					continue;
				}
			}
			cur = next;
			mask = 1;
		}
		if (signalled && mask)
			for (int b = 0; b < 64; b++)
				if ((mask >> b & 1) && cur + b < TOTAL_PAGES)
					R.predicted[cur + b] = 1;
	}
	return consumed;
}

/*
 * KVM_RESET_DIRTY_RINGS; again while it returned fewer entries than are
 * collected and not yet reset (unless --no-retry).  Caller holds R.mu.
 * block: 0 = as configured, 1 = SIGUSR1 blocked, 2 = all signals blocked.
 */
static void reset_rings(int block, int force_complete)
{
	sigset_t set, old;
	if (opt_guard)
		block = 2;
	if (block == 2)
		sigfillset(&set);
	else {
		sigemptyset(&set);
		sigaddset(&set, SIGUSR1);
	}
	for (int tries = 0;; tries++) {
		if (block)
			pthread_sigmask(SIG_BLOCK, &set, &old);
		int sigs0 = tls_sigs;
		tls_in_reset = 1;
		uint64_t t0 = now_ns();
		int n = ioctl(R.vm_fd, KVM_RESET_DIRTY_RINGS, 0);
		int err = errno;
		R.reset_ns += now_ns() - t0;
		if (block)
			pthread_sigmask(SIG_SETMASK, &old, NULL); /* pending signals land here, counted */
		tls_in_reset = 0;
		R.reset_calls++;
		if (n < 0) {
			if (err != EINTR) {
				thread_fail("KVM_RESET_DIRTY_RINGS: %s", strerror(err));
				return;
			}
			R.reset_errors++;
			n = 0;
		}
		int signalled = !block && tls_sigs != sigs0;
		R.signalled_resets += signalled;
		if (replay_reset(signalled) != (uint64_t)n)
			R.count_mismatch++;
		R.reset += n;
		R.outstanding -= (uint64_t)n <= R.outstanding ? (uint64_t)n : R.outstanding;
		if (!R.outstanding)
			return;
		R.short_resets++;
		if ((opt_no_retry && !force_complete) || tries >= 1000)
			return;
	}
}

static void kick_vcpus(void)
{
	for (int i = 0; i < NR_VCPUS; i++)
		if (!__atomic_load_n(&R.v[i].finished, __ATOMIC_ACQUIRE)) {
			pthread_kill(R.v[i].thread, SIGUSR1);
			__atomic_add_fetch(&kicks, 1, __ATOMIC_RELAXED);
		}
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	tls_run = v->run;
	while (!__atomic_load_n(&R.abort, __ATOMIC_ACQUIRE)) {
		v->run->immediate_exit = 0;
		int rc = ioctl(v->fd, KVM_RUN, 0);
		int err = errno;
		__atomic_add_fetch(&v->exits, 1, __ATOMIC_RELEASE);
		if (rc < 0) {
			if (err == EINTR || err == EAGAIN)
				continue;
			thread_fail("KVM_RUN (vCPU %d): %s", v->id, strerror(err));
			break;
		}
		switch (v->run->exit_reason) {
		case KVM_EXIT_DIRTY_RING_FULL:
			v->ring_full++;
			pthread_mutex_lock(&R.mu);
			collect(v, R.pending);
			reset_rings(R.cfg->block_usr1_ringfull, 0);
			pthread_mutex_unlock(&R.mu);
			break;
		case KVM_EXIT_INTR:
			break;
		case KVM_EXIT_MMIO:
			if (v->run->mmio.phys_addr == DOORBELL_GPA && v->run->mmio.is_write) {
				__atomic_store_n(&v->finished, 1, __ATOMIC_RELEASE);
				return NULL;
			}
			/* fall through */
		default: {
			struct kvm_regs r = { 0 };
			ioctl(v->fd, KVM_GET_REGS, &r);
			thread_fail("vCPU %d: unexpected exit reason %u at rip %#llx (done %llu; hw reason %#llx)",
				    v->id, v->run->exit_reason, (unsigned long long)r.rip,
				    (unsigned long long)R.pub[8 * v->id],
				    (unsigned long long)v->run->fail_entry.hardware_entry_failure_reason);
			return NULL;
		}
		}
	}
	return NULL;
}

static void *kicker_thread(void *arg)
{
	(void)arg;
	unsigned us = R.cfg->kick_vcpus_us ? R.cfg->kick_vcpus_us : R.cfg->kick_harvester_us;
	uint64_t next = now_ns(), rnd = next | 1;
	while (!__atomic_load_n(&R.kicker_stop, __ATOMIC_ACQUIRE)) {
		/* Uniform in [0.5, 1.5] x the period (mean = the period), so the
		 * kicks do not phase-lock with the 2 ms harvests. */
		rnd ^= rnd << 13, rnd ^= rnd >> 7, rnd ^= rnd << 17;
		next += opt_no_jitter ? us * 1000ull : us * 500ull + rnd % (us * 1000ull);
		sleep_until(next);
		if (R.cfg->kick_vcpus_us)
			kick_vcpus();
		else {
			pthread_kill(R.harvester, SIGUSR1);
			__atomic_add_fetch(&kicks, 1, __ATOMIC_RELAXED);
		}
	}
	return NULL;
}

/* ---- VM setup ------------------------------------------------------------ */

static void *alloc_guest(uint64_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED)
		setup_fail("mmap of guest memory", errno);
	return p;
}

static void set_slot(int slot, uint64_t gpa, uint64_t bytes, void *host, uint32_t flags)
{
	struct kvm_userspace_memory_region m = {
		.slot = slot, .flags = flags, .guest_phys_addr = gpa,
		.memory_size = bytes, .userspace_addr = (uintptr_t)host,
	};
	xioctl(R.vm_fd, KVM_SET_USER_MEMORY_REGION, (unsigned long)&m, "KVM_SET_USER_MEMORY_REGION");
}

static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void build_low_memory(void)
{
	uint8_t *m = R.low;
	const uint64_t P = 1, W = 2, U = 4, A = 0x20, D = 0x40, PS = 0x80;
	memcpy(m + CODE_GPA, guest_code, sizeof(guest_code));
	/* 4-level paging, U=1 at every level; 2 MiB pages, identity. */
	put64(m + PML4_GPA, PDPT_GPA | P | W | U | A);
	put64(m + PDPT_GPA + 0 * 8, PD0_GPA | P | W | U | A);
	put64(m + PDPT_GPA + 1 * 8, PD1_GPA | P | W | U | A);
	put64(m + PD0_GPA, 0 | P | W | U | A | D | PS);
	put64(m + PD0_GPA + 8, DOORBELL_GPA | P | W | U | A | D | PS);
	for (uint64_t j = 0; j < DATA_BYTES >> 21; j++)
		put64(m + PD1_GPA + j * 8, (DATA_GPA + (j << 21)) | P | W | U | A | D | PS);
	/* GDT: null, kernel code/data (unused), user data, user code, TSS. */
	put64(m + GDT_GPA + 0x08, 0x00af9b000000ffffull);
	put64(m + GDT_GPA + 0x10, 0x00cf93000000ffffull);
	put64(m + GDT_GPA + 0x20, 0x00cff3000000ffffull);
	put64(m + GDT_GPA + 0x28, 0x00affb000000ffffull);
	put64(m + GDT_GPA + 0x30, 0x67 | ((uint64_t)TSS_GPA << 16) | (0x89ull << 40));
	/* TSS: no I/O bitmap (IOPL=3 decides). */
	m[TSS_GPA + 0x66] = 0x68;
}

static struct kvm_segment segment(uint16_t sel, uint8_t type, int code)
{
	struct kvm_segment s = {
		.base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
		.present = 1, .dpl = 3, .db = code ? 0 : 1, .s = 1, .l = code ? 1 : 0, .g = 1,
	};
	return s;
}

static void setup_vcpu(struct vcpu *v, int id, uint32_t ring_bytes)
{
	v->id = id;
	v->fd = xioctl(R.vm_fd, KVM_CREATE_VCPU, id, "KVM_CREATE_VCPU");
	v->run = mmap(NULL, vcpu_mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		setup_fail("mmap of kvm_run", errno);
	v->ring = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd,
		       (off_t)RING_PGOFF * getpagesize());
	if (v->ring == MAP_FAILED)
		setup_fail("mmap of the dirty ring", errno);
	v->ring_entries = ring_bytes / sizeof(struct kvm_dirty_gfn);
	v->shadow = calloc(v->ring_entries, sizeof(*v->shadow));
	if (!v->shadow)
		setup_fail("calloc", ENOMEM);

	/* CPUID from KVM_GET_SUPPORTED_CPUID, with this vCPU's APIC ID. */
	for (uint32_t i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];
		if (e->function == 1)
			e->ebx = (e->ebx & 0x00ffffff) | ((uint32_t)id << 24);
		if (e->function == 0xb || e->function == 0x1f)
			e->edx = id;
	}
	xioctl(v->fd, KVM_SET_CPUID2, (unsigned long)cpuid, "KVM_SET_CPUID2");

	struct kvm_sregs s;
	xioctl(v->fd, KVM_GET_SREGS, (unsigned long)&s, "KVM_GET_SREGS");
	s.cs = segment(SEL_UCODE, 0xb, 1);
	s.ds = s.es = s.fs = s.gs = s.ss = segment(SEL_UDATA, 0x3, 0);
	memset(&s.tr, 0, sizeof(s.tr));
	s.tr.base = TSS_GPA;
	s.tr.limit = 0x67;
	s.tr.selector = SEL_TSS;
	s.tr.type = 0xb; /* busy 64-bit TSS */
	s.tr.present = 1;
	memset(&s.ldt, 0, sizeof(s.ldt));
	s.ldt.type = 0x2;
	s.ldt.unusable = 1;
	s.gdt.base = GDT_GPA;
	s.gdt.limit = 8 * 8 - 1;
	s.idt.base = 0;
	s.idt.limit = 0; /* no CPL0 code: any exception ends in a shutdown exit */
	s.cr0 = 0x80050033;  /* PG AM WP NE ET MP PE */
	s.cr3 = PML4_GPA;
	s.cr4 = 0x620;       /* OSXMMEXCPT OSFXSR PAE */
	s.efer = 0x500;      /* LMA LME */
	xioctl(v->fd, KVM_SET_SREGS, (unsigned long)&s, "KVM_SET_SREGS");

	struct kvm_regs r = { 0 };
	r.rip = CODE_GPA;
	r.rsp = STACK_TOP;
	r.rflags = 0x2;
	r.rdi = DATA_GPA + (uint64_t)id * REGION_BYTES;
	r.rsi = PUB_GPA + 64 * id;
	r.rdx = PUB_GPA + PHASE_OFF;
	r.rcx = NPAGES - 1;
	r.r9 = NPAGES;
	r.rbx = 0;
	r.r10 = DOORBELL_GPA;
	xioctl(v->fd, KVM_SET_REGS, (unsigned long)&r, "KVM_SET_REGS");
}

static int enable_ring(int vm_fd, uint32_t bytes)
{
	struct kvm_enable_cap c = { .cap = ring_cap, .args = { bytes } };
	return ioctl(vm_fd, KVM_ENABLE_CAP, &c);
}

static void probe_host(void)
{
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		setup_fail("open /dev/kvm", errno);
	if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		setup_fail("KVM_GET_API_VERSION (not 12)", EINVAL);
	int acq = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
	int plain = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
	ring_cap = acq > 0 ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING;
	ring_max_bytes = acq > 0 ? (uint32_t)acq : plain > 0 ? (uint32_t)plain : 0;
	if (!ring_max_bytes) {
		printf("no dirty ring on this host\n");
		exit(0);
	}
	vcpu_mmap_size = xioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");

	/* The smallest ring this host accepts (it reserves entries, e.g. for PML). */
	for (uint32_t b = 4096; b <= ring_max_bytes && !ring_min_bytes; b *= 2) {
		int vm;
		do
			vm = ioctl(kvm_fd, KVM_CREATE_VM, 0);
		while (vm < 0 && errno == EINTR);
		if (vm < 0)
			setup_fail("KVM_CREATE_VM", errno);
		if (enable_ring(vm, b) == 0)
			ring_min_bytes = b;
		close(vm);
	}
	if (!ring_min_bytes)
		setup_fail("KVM_ENABLE_CAP(dirty ring) at every size", EINVAL);
	if (!opt_small_bytes)
		opt_small_bytes = ring_min_bytes;
	if (opt_large_bytes > ring_max_bytes)
		opt_large_bytes = ring_max_bytes;

	for (int n = 64;; n *= 2) {
		cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(struct kvm_cpuid_entry2));
		cpuid->nent = n;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			break;
		if (errno != E2BIG || n >= 4096)
			setup_fail("KVM_GET_SUPPORTED_CPUID", errno);
		free(cpuid);
	}
}

static void create_vm(uint32_t ring_bytes)
{
	do
		R.vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	while (R.vm_fd < 0 && errno == EINTR);
	if (R.vm_fd < 0)
		setup_fail("KVM_CREATE_VM", errno);
	ioctl(R.vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000ul); /* VMX hosts without unrestricted guest; ignored elsewhere */
	if (enable_ring(R.vm_fd, ring_bytes) < 0)
		setup_fail("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING*)", errno);
	R.low = alloc_guest(LOW_BYTES);
	R.data = alloc_guest(DATA_BYTES);
	build_low_memory();
	R.pub = (volatile uint64_t *)(R.low + PUB_GPA);
	R.phase = (volatile uint64_t *)(R.low + PUB_GPA + PHASE_OFF);
	set_slot(LOW_SLOT, 0, LOW_BYTES, R.low, 0);
	set_slot(DATA_SLOT, DATA_GPA, DATA_BYTES, R.data, KVM_MEM_LOG_DIRTY_PAGES);
	for (int i = 0; i < NR_VCPUS; i++)
		setup_vcpu(&R.v[i], i, ring_bytes);
}

static void destroy_vm(uint32_t ring_bytes)
{
	for (int i = 0; i < NR_VCPUS; i++) {
		munmap(R.v[i].ring, ring_bytes);
		munmap(R.v[i].run, vcpu_mmap_size);
		free(R.v[i].shadow);
		close(R.v[i].fd);
	}
	close(R.vm_fd);
	munmap(R.low, LOW_BYTES);
	munmap(R.data, DATA_BYTES);
}

/* ---- one run --------------------------------------------------------------- */

struct result {
	uint64_t harvests, ring_full, collected, reset, short_resets, sig_in_reset, kicks;
	uint64_t missed, unlogged, foreign, reset_errors, reset_calls, reset_ns;
	uint64_t signalled_resets, predicted, unlogged_unpredicted, count_mismatch, kick_timeouts;
};

static uint64_t load_pub(int vcpu, int started)
{
	return __atomic_load_n(&R.pub[8 * vcpu + started], __ATOMIC_ACQUIRE);
}

/* Pages written by seqs [from, to) of vCPU i that are absent from 'set'. */
static uint64_t count_missed(int i, uint64_t from, uint64_t to, const uint8_t *set)
{
	uint64_t n = 0, len = to > from ? to - from : 0;
	if (len > NPAGES)
		len = NPAGES;
	for (uint64_t k = 0; k < len; k++)
		if (!set[i * NPAGES + ((from + k) & (NPAGES - 1))])
			n++;
	return n;
}

static void run_once(const struct config *cfg, struct result *res)
{
	static uint8_t cur[TOTAL_PAGES];
	uint32_t ring_bytes = cfg->small_ring ? opt_small_bytes : opt_large_bytes;
	uint64_t a_started[NR_VCPUS] = { 0 }, b_done[NR_VCPUS], a_next[NR_VCPUS];
	pthread_t kicker;

	memset(&R, 0, sizeof(R));
	memset(res, 0, sizeof(*res));
	pthread_mutex_init(&R.mu, NULL);
	R.cfg = cfg;
	R.harvester = pthread_self();
	__atomic_store_n(&sig_in_reset, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&kicks, 0, __ATOMIC_RELAXED);
	create_vm(ring_bytes);

	for (int i = 0; i < NR_VCPUS; i++)
		if (pthread_create(&R.v[i].thread, NULL, vcpu_thread, &R.v[i]))
			setup_fail("pthread_create", EAGAIN);
	int have_kicker = cfg->kick_vcpus_us || cfg->kick_harvester_us;
	if (have_kicker && pthread_create(&kicker, NULL, kicker_thread, NULL))
		setup_fail("pthread_create", EAGAIN);

	uint64_t t_end = now_ns() + (uint64_t)opt_seconds * 1000000000ull;
	uint64_t next = now_ns();
	while (!__atomic_load_n(&R.abort, __ATOMIC_ACQUIRE)) {
		next += opt_harvest_us * 1000ull;
		uint64_t t = now_ns();
		if (t >= t_end)
			break;
		if (next > t)
			sleep_until(next);
		else
			next = t;
		if (cfg->kick_per_harvest) {
			uint64_t e0[NR_VCPUS];
			for (int i = 0; i < NR_VCPUS; i++)
				e0[i] = __atomic_load_n(&R.v[i].exits, __ATOMIC_ACQUIRE);
			kick_vcpus();
			for (uint64_t t0 = now_ns();; sched_yield()) {
				int all = 1;
				for (int i = 0; i < NR_VCPUS; i++)
					all &= __atomic_load_n(&R.v[i].exits, __ATOMIC_ACQUIRE) != e0[i];
				if (all)
					break;
				if (now_ns() - t0 > 2000000) {
					res->kick_timeouts++;
					break;
				}
			}
		}
		pthread_mutex_lock(&R.mu);
		for (int i = 0; i < NR_VCPUS; i++)
			b_done[i] = load_pub(i, 0);
		memcpy(cur, R.pending, sizeof(cur));
		memset(R.pending, 0, sizeof(R.pending));
		for (int i = 0; i < NR_VCPUS; i++)
			collect(&R.v[i], cur);
		reset_rings(0, 0);
		for (int i = 0; i < NR_VCPUS; i++)
			a_next[i] = load_pub(i, 1);
		pthread_mutex_unlock(&R.mu);
		for (int i = 0; i < NR_VCPUS; i++) {
			res->missed += count_missed(i, a_started[i], b_done[i], cur);
			a_started[i] = a_next[i];
		}
		res->harvests++;
	}

	/* Stop the signals, take one harvest with every signal blocked. */
	if (have_kicker) {
		__atomic_store_n(&R.kicker_stop, 1, __ATOMIC_RELEASE);
		pthread_join(kicker, NULL);
	}
	pthread_mutex_lock(&R.mu);
	for (int i = 0; i < NR_VCPUS; i++)
		collect(&R.v[i], cur);
	memset(R.pending, 0, sizeof(R.pending));
	reset_rings(2, 1);
	pthread_mutex_unlock(&R.mu);

	/* Phase 2: every vCPU writes every page once more, then exits. */
	__atomic_store_n(R.phase, 1, __ATOMIC_RELEASE);
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 30;
	for (int i = 0; i < NR_VCPUS; i++) {
		if (pthread_timedjoin_np(R.v[i].thread, NULL, &dl)) {
			thread_fail("vCPU %d did not finish phase 2 within 30 s", i);
			for (int j = 0; j < NR_VCPUS; j++)
				pthread_kill(R.v[j].thread, SIGUSR1);
			pthread_join(R.v[i].thread, NULL);
		}
	}
	if (R.abort) {
		fprintf(stderr, "setup failed: %s\n", R.fail[0] ? R.fail : "run aborted");
		exit(1);
	}
	pthread_mutex_lock(&R.mu);
	memcpy(cur, R.pending, sizeof(cur));
	for (int i = 0; i < NR_VCPUS; i++)
		collect(&R.v[i], cur);
	reset_rings(2, 1);
	pthread_mutex_unlock(&R.mu);
	for (int p = 0; p < (int)TOTAL_PAGES; p++) {
		res->unlogged += !cur[p];
		res->unlogged_unpredicted += !cur[p] && !R.predicted[p];
		res->predicted += R.predicted[p];
	}
	res->signalled_resets = R.signalled_resets;
	res->count_mismatch = R.count_mismatch;

	for (int i = 0; i < NR_VCPUS; i++)
		res->ring_full += R.v[i].ring_full;
	res->collected = R.collected;
	res->reset = R.reset;
	res->short_resets = R.short_resets;
	res->reset_errors = R.reset_errors;
	res->reset_calls = R.reset_calls;
	res->reset_ns = R.reset_ns;
	res->foreign = R.foreign;
	res->sig_in_reset = __atomic_load_n(&sig_in_reset, __ATOMIC_RELAXED);
	res->kicks = __atomic_load_n(&kicks, __ATOMIC_RELAXED);
	destroy_vm(ring_bytes);
	pthread_mutex_destroy(&R.mu);
}

/* ---- main ------------------------------------------------------------------ */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: ring-reset-signal-repro [--runs N] [--seconds S] [--config LIST] [--guard]\n"
		"                               [--harvest-us US] [--small-ring BYTES] [--large-ring BYTES]\n"
		"                               [--no-retry] [--no-jitter]\n"
		"  --config LIST  comma-separated numbers (default: all)\n"
		"  --guard        block all signals around every KVM_RESET_DIRTY_RINGS\n"
		"  --no-retry     do not call KVM_RESET_DIRTY_RINGS again after a short count\n"
		"  --no-jitter    kick at exactly the period (default: uniform 0.5-1.5 x period)\n"
		"configs:\n");
	for (int c = 0; c < NR_CONFIGS; c++) {
		const struct config *k = &configs[c];
		fprintf(f, "  %d %-17s %s rings, ", c + 1, k->name, k->small_ring ? "small" : "large");
		if (k->kick_vcpus_us)
			fprintf(f, "SIGUSR1 to each vCPU every %u us", k->kick_vcpus_us);
		else if (k->kick_harvester_us)
			fprintf(f, "SIGUSR1 to the harvester every %u us", k->kick_harvester_us);
		else if (k->kick_per_harvest)
			fprintf(f, "one SIGUSR1 to each vCPU per harvest");
		else
			fprintf(f, "no signals");
		fprintf(f, "%s\n", k->block_usr1_ringfull ? ", SIGUSR1 blocked around ring-full resets" : "");
	}
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "runs", required_argument, 0, 'r' },
		{ "seconds", required_argument, 0, 's' },
		{ "config", required_argument, 0, 'c' },
		{ "guard", no_argument, 0, 'g' },
		{ "harvest-us", required_argument, 0, 'h' },
		{ "small-ring", required_argument, 0, 'S' },
		{ "large-ring", required_argument, 0, 'L' },
		{ "no-retry", no_argument, 0, 'n' },
		{ "no-jitter", no_argument, 0, 'j' },
		{ "help", no_argument, 0, 'H' },
		{ 0, 0, 0, 0 },
	};
	int want[NR_CONFIGS] = { 0 }, any = 0, o;
	while ((o = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (o) {
		case 'r': opt_runs = atoi(optarg); break;
		case 's': opt_seconds = atoi(optarg); break;
		case 'g': opt_guard = 1; break;
		case 'n': opt_no_retry = 1; break;
		case 'j': opt_no_jitter = 1; break;
		case 'h': opt_harvest_us = strtoul(optarg, NULL, 0); break;
		case 'S': opt_small_bytes = strtoul(optarg, NULL, 0); break;
		case 'L': opt_large_bytes = strtoul(optarg, NULL, 0); break;
		case 'c':
			for (char *tok = strtok(optarg, ","); tok; tok = strtok(NULL, ",")) {
				int c = atoi(tok);
				if (c < 1 || c > NR_CONFIGS) {
					fprintf(stderr, "--config: no configuration %s\n", tok);
					return 2;
				}
				want[c - 1] = any = 1;
			}
			break;
		case 'H':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (opt_runs < 1 || opt_seconds < 1 || opt_harvest_us < 100) {
		usage(stderr);
		return 2;
	}

	struct sigaction sa = { .sa_handler = on_sigusr1 }; /* no SA_RESTART */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	probe_host();
	struct utsname u;
	uname(&u);
	printf("# %s %s; %s; rings: small %u B (%u entries), large %u B (%u entries); "
	       "2 vCPUs x %u MiB; harvest every %u us; %d runs x %d s%s%s%s\n",
	       u.sysname, u.release,
	       ring_cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL ? "KVM_CAP_DIRTY_LOG_RING_ACQ_REL" : "KVM_CAP_DIRTY_LOG_RING",
	       opt_small_bytes, opt_small_bytes / 16, opt_large_bytes, opt_large_bytes / 16,
	       (unsigned)(REGION_BYTES >> 20), opt_harvest_us, opt_runs, opt_seconds,
	       opt_guard ? "; GUARDED (all signals blocked around every reset)" : "",
	       opt_no_retry ? "; no retry on short reset counts" : "",
	       opt_no_jitter ? "; kicks without jitter" : "");
	fflush(stdout);

	for (int c = 0; c < NR_CONFIGS; c++) {
		if (any && !want[c])
			continue;
		const struct config *cfg = &configs[c];
		int losing = 0;
		uint64_t missed = 0, unlogged = 0;
		for (int run = 1; run <= opt_runs; run++) {
			struct result r;
			run_once(cfg, &r);
			printf("config %d %-16s%s run %d/%d: harvests %llu ring-full %llu kicks %llu "
			       "collected %llu reset %llu (%llu calls, avg %.1f us, %llu short) "
			       "sig-in-reset %llu missed %llu unlogged %llu",
			       c + 1, cfg->name, opt_guard ? " guarded" : "", run, opt_runs,
			       (unsigned long long)r.harvests, (unsigned long long)r.ring_full,
			       (unsigned long long)r.kicks, (unsigned long long)r.collected,
			       (unsigned long long)r.reset, (unsigned long long)r.reset_calls,
			       r.reset_calls ? r.reset_ns / 1e3 / r.reset_calls : 0.0,
			       (unsigned long long)r.short_resets,
			       (unsigned long long)r.sig_in_reset, (unsigned long long)r.missed,
			       (unsigned long long)r.unlogged);
			if (r.signalled_resets)
				printf(" | signalled resets %llu, their pending batches %llu pages, "
				       "unlogged outside them %llu",
				       (unsigned long long)r.signalled_resets, (unsigned long long)r.predicted,
				       (unsigned long long)r.unlogged_unpredicted);
			if (r.kick_timeouts)
				printf(" kick-waits>2ms %llu", (unsigned long long)r.kick_timeouts);
			if (r.count_mismatch)
				printf(" count-mismatch %llu", (unsigned long long)r.count_mismatch);
			if (r.foreign)
				printf(" foreign-entries %llu", (unsigned long long)r.foreign);
			if (r.reset_errors)
				printf(" reset-EINTR %llu", (unsigned long long)r.reset_errors);
			printf("\n");
			fflush(stdout);
			losing += r.missed || r.unlogged;
			missed += r.missed;
			unlogged += r.unlogged;
		}
		printf("config %d %-16s%s: runs losing pages %d/%d, missed writes %llu, permanently unlogged %llu\n",
		       c + 1, cfg->name, opt_guard ? " guarded" : "", losing, opt_runs,
		       (unsigned long long)missed, (unsigned long long)unlogged);
		fflush(stdout);
	}
	return 0;
}
