/*
 * guest/abi.h - the only thing the VMM and the guest share: plain structs and
 * a few pure inline functions (stamp layout, per-pass page permutation, write
 * decision) that both sides must compute identically.
 *
 * Compiled as freestanding C (guest) and as C++20 (host). Keep it plain:
 * fixed-width types, no pointers (GPAs are u64), explicit padding.
 */
#ifndef MINIVMM_GUEST_ABI_H
#define MINIVMM_GUEST_ABI_H

#ifndef __ASSEMBLER__
#include <stdint.h>
#endif

#define MVM_ABI_VERSION 6u
#define MVM_PAGE_SIZE 4096ull
#define MVM_PAGE_SHIFT 12

#define MVM_IMAGE_MAGIC 0x31474d4956564d4dull   /* "MMVVIMG1" */
#define MVM_BOOT_MAGIC 0x31544f4f424d564dull    /* "MVMBOOT1" */
#define MVM_MAILBOX_MAGIC 0x31584f424d564dull   /* "MVMBOX1" */

/* Fixed guest-physical layout; everything is identity mapped (GVA == GPA). */
#define MVM_IMAGE_GPA 0x100000ull           /* guest image is linked here */
#define MVM_IMAGE_MAX (1ull << 20)
#define MVM_RAM_GPA (1ull << 32)             /* workload memory starts at 4 GiB */

/* Guest -> VMM signals.
 * The user part (CPL3) rings a doorbell: a store to a user-mapped GPA that no
 * memslot backs, which exits as KVM_EXIT_MMIO straight from CPL3. It does not
 * use port I/O: user RFLAGS.IOPL=3 is set on entry, but hosts may drop it
 * (ours does: a CPL3 `out` raises #GP; `int $0x80` raises #UD and SYSCALL
 * stays at CPL3 there). The kernel part (CPL0) reports exceptions by port I/O. */
#define MVM_DOORBELL_GPA 0xd0000000ull  /* one page, no memslot */
#define MVM_DOORBELL_DONE 1             /* qword written: (DONE << 32) | vCPU id */
#define MVM_DOORBELL_GATE 2             /* waiting at the pass gate: the VMM holds the vCPU until it opens */
#define MVM_DOORBELL_PARK 3             /* parked on request: the VMM holds the vCPU until `park` clears */
#define MVM_PORT_EXCEPTION 0xe1 /* rdi=vector rsi=error rdx=rip rcx=cr2 r8=cs r9=rflags */

/* GDT selectors (same GDT layout on every vCPU; each vCPU has its own TSS). */
#define MVM_SEL_KCODE 0x08
#define MVM_SEL_KDATA 0x10
#define MVM_SEL_UDATA 0x20
#define MVM_SEL_UCODE 0x28
#define MVM_SEL_TSS 0x30
#define MVM_NR_EXCEPTIONS 32

#ifndef __ASSEMBLER__
enum mvm_pattern { MVM_PATTERN_SEQ = 0, MVM_PATTERN_RANDOM = 1 };
/* What a written page holds besides its stamp in qword 0 (--fill):
 *   ZERO    the stamp qword only; the rest of the page as it was (mostly zero)
 *   STAMP   every qword the stamp
 *   RANDOM  qwords 1..511 pseudo-random (mvm_fill_random): incompressible
 *   RATIO   qwords 1..fill_qwords-1 pseudo-random, the rest zero: compresses
 *           by about 512 / fill_qwords
 * RANDOM is RATIO with fill_qwords = 512. --touch qword|page are ZERO|STAMP. */
enum mvm_fill { MVM_FILL_ZERO = 0, MVM_FILL_STAMP = 1, MVM_FILL_RANDOM = 2, MVM_FILL_RATIO = 3 };
#define MVM_TOUCH_QWORD MVM_FILL_ZERO
#define MVM_TOUCH_PAGE MVM_FILL_STAMP
/* Deliberate faults, for testing the exception path. */
enum mvm_fault {
    MVM_FAULT_NONE = 0,
    MVM_FAULT_UD = 1,  /* ud2 -> #UD (6) */
    MVM_FAULT_PF = 2,  /* write to an unmapped page -> #PF (14) */
    MVM_FAULT_DE = 3,  /* divide by zero -> #DE (0) */
    MVM_FAULT_GP = 4,  /* non-canonical access -> #GP (13) */
};
#define MVM_FAULT_PF_ADDR 0x7fff0000ull /* never mapped */

/* Header at the first byte of the guest image, filled by the linker. */
struct mvm_image_header {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t nr_exceptions;
    uint64_t load_gpa;
    uint64_t kernel_entry;   /* CPL0: rdi=boot params, rsi=vcpu params, rdx=mailbox,
                                rcx=user stack top, r8=user entry */
    uint64_t user_entry;     /* CPL3 workload */
    uint64_t exc_table;      /* GPA of MVM_NR_EXCEPTIONS u64 handler addresses */
    uint64_t user_start;     /* [load_gpa, user_start) is CPL0-only */
    uint64_t image_end;
};

/* A contiguous piece of a vCPU's working set. The working set is the
 * concatenation of its segments; page index i of the set lives at
 * seg[k].gpa + (i - sum(seg[<k].pages)) * 4K. */
/* One local piece plus one from each other virtual node (--access mixed/remote,
 * memory-only nodes). */
#define MVM_MAX_SEGMENTS 16
struct mvm_segment {
    uint64_t gpa;
    uint64_t pages;
};

#define MVM_MAX_VNODES 16
#define MVM_MAX_VNODE_RANGES 4
struct mvm_vnode {
    uint32_t id;
    uint32_t nr_ranges;
    struct mvm_segment range[MVM_MAX_VNODE_RANGES]; /* gpa, pages */
    uint64_t vcpu_mask[16];                         /* up to 1024 vCPUs */
};

struct mvm_vcpu_params {
    uint32_t vcpu_id;
    uint32_t vnode;
    uint64_t mailbox_gpa;
    uint64_t user_stack_top;
    uint32_t nr_segments;
    uint32_t fault;          /* enum mvm_fault, for tests */
    uint64_t total_pages;    /* sum of seg[].pages */
    struct mvm_segment seg[MVM_MAX_SEGMENTS];
};

struct mvm_boot_params {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t nr_vcpus;
    uint64_t tsc_khz;
    /* workload knobs */
    uint32_t pattern;          /* enum mvm_pattern */
    uint32_t fill;             /* enum mvm_fill */
    uint32_t write_pct;        /* 0..100, reads for the rest */
    uint32_t nr_vnodes;
    uint64_t max_passes;       /* 0 = until the VMM says stop */
    uint64_t seed;
    uint64_t watchdog_threshold_tsc;
    uint32_t vm_tag;           /* this VM's identity in every stamp (8 bits used); migrates with it */
    uint32_t fill_qwords;      /* RANDOM/RATIO: qwords [0, fill_qwords) not zero (1..512) */
    struct mvm_vnode vnode[MVM_MAX_VNODES];
    struct mvm_vcpu_params vcpu[]; /* nr_vcpus entries */
};

/* Guest-side watchdog events (a ring: the newest MVM_WD_RING are kept). */
#define MVM_WD_RING 64
struct mvm_wd_event {
    uint64_t start_tsc; /* last progress point before the gap */
    uint64_t len_tsc;
};

enum mvm_vcpu_state {
    MVM_STATE_BOOTING = 0,
    MVM_STATE_RUNNING = 1,
    MVM_STATE_DONE = 2,
};

/* Per-vCPU mailbox page. The guest writes the progress part with plain
 * stores and no exits; the VMM reads it whenever it likes. The VMM writes the
 * control part; the guest polls it once per batch. They sit in different
 * cache lines so the hot path does not bounce the control line. */
struct mvm_mailbox {
    /* --- guest -> VMM, hot (one line) --- */
    volatile uint64_t generation;     /* current pass, 1-based; 0 before the first */
    volatile uint64_t cursor;         /* visits done in this pass (raw permutation index) */
    volatile uint64_t pages_written;
    volatile uint64_t pages_read;
    volatile uint64_t last_tsc;       /* TSC at the latest progress point */
    volatile uint64_t passes;         /* completed passes */
    volatile uint64_t read_sink;      /* keeps reads from being optimised away */
    volatile uint64_t pad0;
    /* --- guest -> VMM, cold --- */
    uint64_t magic;
    uint32_t vcpu_id;
    volatile uint32_t state;          /* enum mvm_vcpu_state */
    volatile uint64_t start_tsc;
    volatile uint64_t warm_tsc;       /* TSC when pass 1 ended (0 until then) */
    volatile uint64_t warm_pages;     /* pages_written when pass 1 ended */
    volatile uint64_t wd_events;      /* total, even when the ring wrapped */
    volatile uint64_t wd_max_gap_tsc;
    volatile uint64_t wd_max_gap_at_tsc;
    uint64_t pad1;
    struct mvm_wd_event wd[MVM_WD_RING];
    /* --- guest -> VMM: the latest park (stop-and-copy), on the guest's TSC.
     * A migrated guest leaves the source's park on the destination, so
     * unpark_tsc - park_tsc is the switchover as the guest saw it. --- */
    volatile uint64_t park_tsc;       /* last progress point before it parked */
    volatile uint64_t unpark_tsc;     /* TSC when it went on after the park was lifted */
    volatile uint64_t parks;          /* parks entered (park_tsc is stored first) */
    volatile uint64_t unparks;        /* parks left (unpark_tsc is stored first) */
    /* --- VMM -> guest (own line) --- */
    uint64_t pad2[6] __attribute__((aligned(64)));
    volatile uint64_t stop;                  /* non-zero: finish the batch, report done */
    volatile uint64_t rate_pages_per_s;      /* 0 = unlimited */
    volatile uint64_t tsc_per_page_q16;      /* (tsc_hz << 16) / rate, set with the rate */
    volatile uint64_t throttle_pct;          /* share of time to idle (auto-converge) */
    volatile uint64_t control_seq;           /* bumped by the VMM after each change */
    volatile uint64_t pass_gate;             /* non-zero: start pass g only once g <= pass_gate
                                                (dirty-log-perf's lock-step iterations) */
    volatile uint64_t park;                  /* non-zero: at the next batch boundary, exit and wait
                                                (a pause without signals, for stop-and-copy) */
};

/* ---- stamps ---------------------------------------------------------- */
/* A written page starts with MVM_STAMP(vm, vcpu, generation); the rest is
 * what the fill says (enum mvm_fill). Never-written memory reads as 0.
 *   bits 63..56  MVM_STAMP_TAG (a written stamp is never 0)
 *   bits 55..48  the VM's tag (boot params vm_tag): a page holding another
 *                VM's tag was written by a foreign guest, not by a lost write
 *   bits 47..32  vCPU id
 *   bits 31..0   generation (pass number, modulo 2^32; both sides truncate) */
#define MVM_STAMP_TAG 0xa5ull
#define MVM_STAMP(vm, vcpu, gen)                                                          \
    ((MVM_STAMP_TAG << 56) | (((uint64_t)(vm) & 0xffull) << 48) | (((uint64_t)(vcpu) & 0xffffull) << 32) | \
     ((uint64_t)(gen) & 0xffffffffull))
#define MVM_STAMP_VM(s) ((uint32_t)(((s) >> 48) & 0xff))
#define MVM_STAMP_VCPU(s) ((uint32_t)(((s) >> 32) & 0xffff))
#define MVM_STAMP_GEN(s) ((s) & 0xffffffffull)

/* ---- per-pass permutation -------------------------------------------- */
/* A pass visits every page of the working set exactly once. Sequential: visit
 * i is page i. Random: visit i is page perm(i) where perm is a keyed bijection
 * on [0, 2^bits) and visits landing at or beyond the set size are skipped
 * (cycle walking). The keys change every pass, so each pass is a different
 * order, and the VMM can recompute which pages a pass has touched from the
 * mailbox's (generation, cursor) alone. */
static inline uint64_t mvm_mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

struct mvm_perm {
    uint64_t mask;  /* 2^bits - 1 */
    uint32_t shift; /* bits/2 + 1 */
    uint32_t pad;
    uint64_t k1, k2, k3;
};

static inline uint32_t mvm_perm_bits(uint64_t n)
{
    uint32_t b = 1;
    while ((1ull << b) < n)
        b++;
    return b;
}

static inline struct mvm_perm mvm_perm_for(uint64_t seed, uint32_t vcpu, uint64_t gen, uint64_t n)
{
    struct mvm_perm p;
    uint32_t bits = mvm_perm_bits(n);
    uint64_t h = mvm_mix64(seed ^ ((uint64_t)vcpu << 40) ^ (gen * 0x100000001b3ull));
    p.mask = (bits >= 64) ? ~0ull : ((1ull << bits) - 1);
    p.shift = bits / 2 + 1;
    p.pad = 0;
    p.k1 = mvm_mix64(h + 1) | 1;
    p.k2 = mvm_mix64(h + 2) | 1;
    p.k3 = mvm_mix64(h + 3);
    return p;
}

/* Bijective on [0, mask]: odd multiply, xorshift and xor are each bijective mod 2^bits. */
static inline uint64_t mvm_perm_apply(const struct mvm_perm *p, uint64_t i)
{
    uint64_t x = (i ^ p->k3) & p->mask;
    x = (x * p->k1) & p->mask;
    x ^= x >> p->shift;
    x = (x * p->k2) & p->mask;
    x ^= x >> p->shift;
    return x;
}

/* Visits per pass: n for sequential, 2^bits for random (some are skipped). */
static inline uint64_t mvm_visits_per_pass(uint32_t pattern, uint64_t n)
{
    return pattern == MVM_PATTERN_RANDOM ? (1ull << mvm_perm_bits(n)) : n;
}

/* Does generation `gen` write (rather than read) page `idx`? */
static inline int mvm_writes(uint32_t write_pct, uint64_t seed, uint32_t vcpu, uint64_t gen, uint64_t idx)
{
    if (write_pct >= 100)
        return 1;
    if (write_pct == 0)
        return 0;
    return (mvm_mix64(seed ^ idx ^ ((uint64_t)vcpu << 48) ^ (gen << 20) ^ 0x5bd1e995ull) % 100) < write_pct;
}

/* ---- fill ------------------------------------------------------------ */
/* Qword q (1 <= q < fill_qwords) of a page written with fill RANDOM or RATIO:
 * mvm_fill_random(mvm_fill_key(stamp, idx), q), idx = the page's index in its
 * vCPU's working set. A new stamp (another pass, vCPU or VM) or another page
 * gives other bytes. One multiply per qword, independent of the others: the
 * guest fills a page in about a microsecond. */
static inline uint64_t mvm_fill_key(uint64_t stamp, uint64_t idx)
{
    return mvm_mix64(stamp ^ (idx * 0xd1b54a32d192ed03ull));
}

static inline uint64_t mvm_fill_random(uint64_t key, uint64_t q)
{
    uint64_t x = key + q * 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 31)) * 0xbf58476d1ce4e5b9ull;
    return x ^ (x >> 29);
}

#endif /* !__ASSEMBLER__ */

#endif
