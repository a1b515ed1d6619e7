/*
 * guest/qemu-dirtier/dirtier.c - a memory dirtier for QEMU (scripts/compare-qemu).
 *
 * kernel_main runs once at CPL0 (emulated on this host, so it does little):
 * it reads the multiboot command line ("rate=PAGES_PER_S touch=page|qword
 * cpl=0|3") and memory size, calibrates the TSC against the PIT and says so
 * on COM1. user_main runs at CPL3 (natively; cpl=0 keeps it at CPL0, to
 * measure the emulated rate): one vCPU rewriting one qword (or the
 * whole page) of every 4 KiB page above the image, pass after pass, in
 * 64-page batches, paced to the rate when one is given, like the minivmm
 * guest's --rate (guest/workload.c).
 */
#include <stdint.h>
#include "status.h"

#define PAGE 4096ull
#define BATCH 64
#define PIT_HZ 1193182ull
#define CALIBRATE_MS 50ull

extern char __image_end[];

__attribute__((section(".status"), used))
struct qd_status status = { .magic = QD_MAGIC, .state = QD_STATE_BOOT };

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* ---- CPL0: set-up and exceptions ---------------------------------------- */

static void put_str(const char *s)
{
    while (*s)
        outb(0x3f8, (uint8_t)*s++);
}

static void put_u64(uint64_t v)
{
    char buf[24];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_str(&buf[i]);
}

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

static uint64_t parse_u64(const char *s)
{
    uint64_t v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (uint64_t)(*s++ - '0');
    return v;
}

/* QEMU passes "KERNEL_PATH ARGS": look at every word. */
static void parse_cmdline(const char *s)
{
    while (*s) {
        while (*s == ' ')
            s++;
        if (starts_with(s, "rate="))
            status.rate_pages_per_s = parse_u64(s + 5);
        else if (starts_with(s, "touch=page"))
            status.touch_page = 1;
        else if (starts_with(s, "cpl=0"))
            status.cpl = 0;
        while (*s && *s != ' ')
            s++;
    }
}

/* PIT channel 2, mode 0, gate on, speaker off: OUT2 (port 0x61 bit 5) rises
 * when CALIBRATE_MS have passed. The same as Linux's pit_calibrate_tsc(). */
static uint64_t calibrate_tsc_hz(void)
{
    const uint32_t latch = (uint32_t)(PIT_HZ * CALIBRATE_MS / 1000);
    outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xB0);
    outb(0x42, (uint8_t)(latch & 0xff));
    outb(0x42, (uint8_t)(latch >> 8));
    uint64_t t0 = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    return (rdtsc() - t0) * 1000 / CALIBRATE_MS;
}

/* Returns 1 when the loop is to stay at CPL0 (cpl=0: to measure the
 * emulated rate), 0 to drop to CPL3. */
int kernel_main(uint32_t mbi)
{
    status.cpl = 3;
    const uint32_t *info = (const uint32_t *)(uintptr_t)mbi;
    uint64_t end = 0x100000ull + (uint64_t)info[2] * 1024; /* mem_upper: KiB above 1 MiB */
    if (info[0] & (1 << 2))
        parse_cmdline((const char *)(uintptr_t)info[4]);
    /* The multiboot info and command line sit just above the image: read
     * above, then dirtied like the rest. */
    status.first_gpa = ((uint64_t)(uintptr_t)__image_end + PAGE - 1) & ~(PAGE - 1);
    status.end_gpa = end & ~(PAGE - 1);
    status.tsc_hz = calibrate_tsc_hz();
    put_str("qemu-dirtier: pages ");
    put_u64((status.end_gpa - status.first_gpa) / PAGE);
    put_str(" rate ");
    put_u64(status.rate_pages_per_s);
    put_str(status.touch_page ? " touch page" : " touch qword");
    put_str(" tsc_hz ");
    put_u64(status.tsc_hz);
    put_str(" cpl ");
    put_u64(status.cpl);
    put_str("\n");
    return status.cpl == 0;
}

void kernel_exception(uint64_t vector, const uint64_t *frame)
{
    /* Vectors 8, 10-14, 17, 21, 29, 30 push an error code before rip. */
    int has_error = vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 ||
                    vector == 29 || vector == 30;
    status.exc_vector = vector;
    status.exc_rip = frame[has_error ? 1 : 0];
    status.state = QD_STATE_EXCEPTION;
    put_str("qemu-dirtier: exception ");
    put_u64(vector);
    put_str(" at rip ");
    put_u64(status.exc_rip);
    put_str("\n");
}

/* ---- CPL3: the dirtier --------------------------------------------------- */

static inline void touch(uint64_t gpa, uint64_t touch_page, uint64_t stamp)
{
    if (touch_page) {
        uint64_t cnt = PAGE / 8;
        void *dst = (void *)(uintptr_t)gpa;
        __asm__ volatile("rep stosq" : "+D"(dst), "+c"(cnt) : "a"(stamp) : "memory");
    } else {
        *(volatile uint64_t *)(uintptr_t)gpa = stamp;
    }
}

struct progress {
    uint64_t prev_tsc;       /* the last progress point */
    uint64_t gap_threshold;  /* 1 ms of TSC */
};

/* A progress point: a gap since the previous one longer than the threshold
 * (the vCPU did not run: a stop, a preemption) goes into the gap ring. */
static inline uint64_t progress_point(volatile struct qd_status *st, struct progress *pr)
{
    uint64_t now = rdtsc(), gap = now - pr->prev_tsc;
    if (__builtin_expect(gap > pr->gap_threshold, 0)) {
        uint64_t n = st->gap_count;
        st->gaps[n % QD_GAPS].start_tsc = pr->prev_tsc;
        st->gaps[n % QD_GAPS].len_tsc = gap;
        __asm__ volatile("" ::: "memory");
        st->gap_count = n + 1;
    }
    pr->prev_tsc = now;
    st->last_tsc = now; /* a stop's gap starts here: the host finds it by this */
    return now;
}

/* After a batch: wait for its deadline when paced. After a stall (e.g. the
 * migration's downtime) restart from now instead of bursting to catch up. */
static inline void pace(volatile struct qd_status *st, struct progress *pr, uint64_t *deadline, uint64_t step)
{
    uint64_t now = pr->prev_tsc;
    if (now > *deadline + 16 * step)
        *deadline = now;
    *deadline += step;
    while (progress_point(st, pr) < *deadline)
        __asm__ volatile("pause");
}

__attribute__((noreturn)) void user_main(void)
{
    volatile struct qd_status *st = &status;
    const uint64_t first = st->first_gpa, end = st->end_gpa, touch_page = st->touch_page;
    const uint64_t rate = st->rate_pages_per_s;
    /* TSC ticks per batch at the rate (16.16 fixed point first); 0 = unlimited. */
    const uint64_t step = rate ? (((st->tsc_hz << 16) / rate) * BATCH) >> 16 : 0;
    struct progress pr = { rdtsc(), st->tsc_hz / 1000 };
    uint64_t written = 0, deadline = pr.prev_tsc;
    st->state = QD_STATE_RUNNING;
    for (uint64_t gen = 1;; gen++) {
        for (uint64_t p = first; p < end;) {
            uint64_t batch_end = p + BATCH * PAGE < end ? p + BATCH * PAGE : end;
            for (; p < batch_end; p += PAGE, written++)
                touch(p, touch_page, gen);
            st->pages_written = written;
            progress_point(st, &pr);
            if (step)
                pace(st, &pr, &deadline, step);
        }
        st->passes = gen;
    }
}
