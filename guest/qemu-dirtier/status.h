/* guest/qemu-dirtier/status.h - what the QEMU dirtier publishes at a fixed
 * guest-physical address, for scripts/compare-qemu to read through QEMU's
 * monitor (`xp`), with no exit and no device. Plain stores, one writer. */
#ifndef QD_STATUS_H
#define QD_STATUS_H

#define QD_STATUS_GPA 0x100100     /* guest.ld places .status here */
#define QD_MAGIC 0x5249545249445751ull /* "QWDIRTIR" */

#define QD_GAPS 32

#define QD_STATE_BOOT 1      /* CPL0 set-up */
#define QD_STATE_RUNNING 2   /* the CPL3 loop runs */
#define QD_STATE_EXCEPTION 3 /* an exception stopped it (vector, rip) */

#ifndef __ASSEMBLER__
#include <stdint.h>
/* Offsets are read by scripts/compare-qemu: append only. */
struct qd_status {
    uint64_t magic;         /*  0 */
    uint64_t state;         /*  8 */
    uint64_t pages_written; /* 16: qword (or whole-page) writes so far */
    uint64_t passes;        /* 24: complete passes over the range */
    uint64_t tsc_hz;        /* 32: calibrated against the PIT at boot */
    uint64_t rate_pages_per_s; /* 40: 0 = unlimited */
    uint64_t first_gpa;     /* 48: the dirtied range [first_gpa, end_gpa) */
    uint64_t end_gpa;       /* 56 */
    uint64_t touch_page;    /* 64: 1 = whole page, 0 = one qword */
    uint64_t exc_vector;    /* 72 */
    uint64_t exc_rip;       /* 80 */
    uint64_t last_tsc;      /* 88: TSC at the last progress point */
    /* 96: gaps longer than 1 ms between two progress points (after each
     * batch, and in the pacing wait): the guest's own view of a stop.
     * Entry gap_count % QD_GAPS is written first, then gap_count. */
    uint64_t gap_count;
    struct { uint64_t start_tsc, len_tsc; } gaps[QD_GAPS]; /* 104 */
    uint64_t cpl;           /* 104 + 16 * QD_GAPS: 3, or 0 ("cpl=0": the loop emulated) */
};
#endif
#endif
