/*
 * guest/workload.c - the CPL3 stress loop. Runs natively on our host (no
 * instruction is emulated), so it must not touch anything CPL0-only and must
 * not exit to the VMM except to say it is done.
 *
 * Each pass visits every page of this vCPU's working set once (sequentially or
 * in a keyed random order), writes a stamp (vCPU id, generation) and the fill
 * to the pages it writes and reads the others. Progress goes to the mailbox with plain
 * stores: cursor after every page, the rest once per batch.
 */
#include "abi.h"

#define BATCH 64

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline void ring_doorbell(uint64_t call, uint32_t arg)
{
    *(volatile uint64_t *)MVM_DOORBELL_GPA = (call << 32) | arg;
}

static inline uint64_t page_gpa(const struct mvm_vcpu_params *vp, uint64_t idx)
{
    const struct mvm_segment *s = vp->seg;
    while (idx >= s->pages) {
        idx -= s->pages;
        s++;
    }
    return s->gpa + (idx << MVM_PAGE_SHIFT);
}

struct watchdog {
    uint64_t prev;
    uint64_t threshold;
};

/* A progress point: note gaps longer than the threshold, like the kernel's
 * soft-lockup detector does with its per-CPU touch timestamp. */
static inline uint64_t progress_point(struct watchdog *wd, struct mvm_mailbox *mb)
{
    uint64_t now = rdtsc();
    uint64_t gap = now - wd->prev;
    if (__builtin_expect(gap > wd->threshold, 0)) {
        uint64_t n = mb->wd_events;
        mb->wd[n % MVM_WD_RING].start_tsc = wd->prev;
        mb->wd[n % MVM_WD_RING].len_tsc = gap;
        barrier();
        mb->wd_events = n + 1;
    }
    if (gap > mb->wd_max_gap_tsc) {
        mb->wd_max_gap_tsc = gap;
        mb->wd_max_gap_at_tsc = wd->prev;
    }
    wd->prev = now;
    mb->last_tsc = now;
    return now;
}

static void inject_fault(uint32_t fault)
{
    switch (fault) {
    case MVM_FAULT_UD:
        __asm__ volatile("ud2");
        break;
    case MVM_FAULT_PF:
        *(volatile uint64_t *)MVM_FAULT_PF_ADDR = 1;
        break;
    case MVM_FAULT_DE: {
        volatile uint64_t zero = 0;
        uint64_t a = 1, d = 0;
        __asm__ volatile("divq %2" : "+a"(a), "+d"(d) : "r"(zero));
        break;
    }
    case MVM_FAULT_GP:
        *(volatile uint64_t *)0x8000000000000000ull = 1;
        break;
    default:
        break;
    }
}

/* Lock-step iterations: until the VMM opens the gate, wait in the VMM (an
 * exit, like the selftests' ucall) so an idle vCPU costs no host CPU.
 * Waiting by design is not a stall: restart the watchdog. */
static inline void wait_at_gate(struct mvm_mailbox *mb, struct watchdog *wd, uint32_t vcpu, uint64_t gen)
{
    if (mb->pass_gate && gen > mb->pass_gate && !mb->stop) {
        while (mb->pass_gate && gen > mb->pass_gate && !mb->stop)
            ring_doorbell(MVM_DOORBELL_GATE, vcpu);
        wd->prev = rdtsc();
        mb->last_tsc = wd->prev;
    }
}

/* After a batch: a progress point, then the VMM's controls: park, the rate
 * cap (deadline: TSC by which the next batch may start) and the throttle. */
static inline void pace_batch(struct mvm_mailbox *mb, struct watchdog *wd, uint32_t vcpu, uint64_t batch_start,
                              uint64_t *deadline)
{
    uint64_t now = progress_point(wd, mb);
    if (mb->park) {
        /* Parked by the VMM between batches: every stamp of the batch
         * is stored and the cursor says so. Waiting is not a stall for
         * the watchdog; the park's own TSC stamps record how long it was. */
        mb->park_tsc = now;
        barrier();
        mb->parks = mb->parks + 1;
        while (mb->park && !mb->stop)
            ring_doorbell(MVM_DOORBELL_PARK, vcpu);
        now = wd->prev = rdtsc();
        mb->last_tsc = now;
        mb->unpark_tsc = now;
        barrier();
        mb->unparks = mb->parks;
        *deadline = now;
    }

    uint64_t rate = mb->rate_pages_per_s;
    if (rate) {
        uint64_t step = (mb->tsc_per_page_q16 * BATCH) >> 16;
        /* After a stall, do not burst to catch up: restart from now. */
        if (now > *deadline + 16 * step)
            *deadline = now;
        *deadline += step;
        while (rdtsc() < *deadline && !mb->stop && !mb->park) {
            cpu_relax();
            progress_point(wd, mb);
        }
    }
    uint64_t thr = mb->throttle_pct;
    if (thr) {
        /* Idle thr% of the time: after a batch that took t, spin t*thr/(100-thr). */
        uint64_t spin_until = now + ((now - batch_start) * thr) / (100 - (thr > 99 ? 99 : thr));
        while (rdtsc() < spin_until && !mb->stop && !mb->park) {
            cpu_relax();
            progress_point(wd, mb);
        }
    }
}

static inline void store_qwords(uint64_t *dst, uint64_t value, uint64_t cnt)
{
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(cnt) : "a"(value) : "memory");
}

/* The stamp in qword 0 and what the fill says in the rest (guest/abi.h,
 * enum mvm_fill). The stamp is stored last, so a page whose qword 0 holds
 * the new stamp holds the rest of the new fill too. */
static inline void write_page(uint64_t *page, uint32_t fill, uint32_t fill_qwords, uint64_t stamp, uint64_t idx)
{
    if (fill == MVM_FILL_STAMP) {
        store_qwords(page, stamp, MVM_PAGE_SIZE / 8);
        return;
    }
    if (fill == MVM_FILL_RANDOM || fill == MVM_FILL_RATIO) {
        const uint64_t key = mvm_fill_key(stamp, idx);
        for (uint32_t q = 1; q < fill_qwords; q++)
            page[q] = mvm_fill_random(key, q);
        if (fill_qwords < MVM_PAGE_SIZE / 8)
            store_qwords(page + fill_qwords, 0, MVM_PAGE_SIZE / 8 - fill_qwords);
        barrier();
    }
    *(volatile uint64_t *)page = stamp;
}

/* After pass `gen`'s loop: if it visited everything, it is complete (and the
 * first pass's end is where the warm rate starts); nonzero when --passes is
 * reached. */
static inline int end_of_pass(const struct mvm_boot_params *bp, struct mvm_mailbox *mb, uint64_t gen,
                              uint64_t visits, uint64_t written)
{
    if (mb->cursor != visits)
        return 0;
    mb->passes = gen;
    if (gen == 1) {
        mb->warm_pages = written;
        mb->warm_tsc = rdtsc();
    }
    return bp->max_passes && gen >= bp->max_passes;
}

__attribute__((noreturn, used, section(".text.user")))
void user_entry(const struct mvm_boot_params *bp, const struct mvm_vcpu_params *vp,
                struct mvm_mailbox *mb)
{
    const uint32_t vcpu = vp->vcpu_id;
    const uint64_t n = vp->total_pages;
    const uint32_t pattern = bp->pattern;
    const uint32_t fill = bp->fill;
    const uint32_t fill_qwords = bp->fill_qwords > MVM_PAGE_SIZE / 8 ? MVM_PAGE_SIZE / 8 : bp->fill_qwords;
    const uint32_t write_pct = bp->write_pct;
    const uint64_t seed = bp->seed;
    const uint32_t vm = bp->vm_tag;
    const uint64_t visits = mvm_visits_per_pass(pattern, n);
    struct watchdog wd = { rdtsc(), bp->watchdog_threshold_tsc };
    uint64_t written = 0, read = 0, sink = 0;
    uint64_t deadline = wd.prev; /* rate cap: TSC by which the next batch may start */

    mb->start_tsc = wd.prev;
    mb->last_tsc = wd.prev;
    mb->state = MVM_STATE_RUNNING;
    inject_fault(vp->fault);

    for (uint64_t gen = 1; n != 0 && !mb->stop; gen++) {
        wait_at_gate(mb, &wd, vcpu, gen);
        if (mb->stop)
            break;
        struct mvm_perm perm = mvm_perm_for(seed, vcpu, gen, n);
        /* Order matters to the VMM's stamp check: `passes` was stored just
         * before the cursor read full at the end of the previous pass, then
         * the generation moves, then the cursor resets. A reader seeing
         * generation == passes + 1 with a full cursor knows the cursor is
         * still the previous pass's; passes == generation is a whole pass. */
        mb->generation = gen;
        barrier();
        mb->cursor = 0;
        for (uint64_t i = 0; i < visits && !mb->stop;) {
            uint64_t end = i + BATCH < visits ? i + BATCH : visits;
            uint64_t batch_start = wd.prev;
            for (; i < end; i++) {
                uint64_t idx = pattern == MVM_PATTERN_RANDOM ? mvm_perm_apply(&perm, i) : i;
                /* Cycle walking: a visit beyond the set touches nothing, but
                 * the cursor (and the end of the pass) still count it. */
                if (idx < n) {
                    uint64_t *page = (uint64_t *)page_gpa(vp, idx);
                    if (mvm_writes(write_pct, seed, vcpu, gen, idx)) {
                        write_page(page, fill, fill_qwords, MVM_STAMP(vm, vcpu, gen), idx);
                        written++;
                    } else {
                        sink += *(volatile uint64_t *)page;
                        read++;
                    }
                }
                barrier(); /* the stamp is stored before the cursor moves past it */
                if (i + 1 == visits) {
                    /* The pass is complete: say so before the cursor reads
                     * full, so that a full cursor with passes == generation - 1
                     * only ever means a pass whose cursor is not reset yet. */
                    mb->passes = gen;
                    barrier();
                }
                mb->cursor = i + 1;
            }
            mb->pages_written = written;
            mb->pages_read = read;
            pace_batch(mb, &wd, vcpu, batch_start, &deadline);
        }
        if (end_of_pass(bp, mb, gen, visits, written))
            break;
    }
    mb->read_sink = sink;
    mb->pages_written = written;
    mb->pages_read = read;
    barrier();
    mb->state = MVM_STATE_DONE;
    for (;;)
        ring_doorbell(MVM_DOORBELL_DONE, vcpu);
}
