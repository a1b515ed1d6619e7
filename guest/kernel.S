/*
 * guest/kernel.S - the CPL0 part of the stress guest.
 *
 * On our KVM host every CPL0 instruction is emulated (~1 us each), so the
 * kernel does as little as possible: the VMM has already built the GDT, IDT,
 * TSS and page tables and entered long mode through KVM_SET_SREGS. The entry
 * only drops to CPL3 with iretq; the exception stubs only report to the VMM.
 */
#include "abi.h"

    .section .header, "a"
    .globl mvm_image_header
mvm_image_header:
    .quad MVM_IMAGE_MAGIC
    .long MVM_ABI_VERSION
    .long MVM_NR_EXCEPTIONS
    .quad MVM_IMAGE_GPA
    .quad kernel_entry
    .quad user_entry
    .quad exc_table
    .quad __user_start
    .quad __image_end

    .section .text.kernel, "ax"
    .code64
/* rdi = boot params, rsi = vcpu params, rdx = mailbox, rcx = user stack top,
 * r8 = user entry. Arguments stay in rdi/rsi/rdx for user_entry(). */
    .globl kernel_entry
kernel_entry:
    pushq $(MVM_SEL_UDATA | 3)      /* ss */
    pushq %rcx                      /* rsp */
    pushq $0x3002                   /* rflags: IOPL=3, IF=0 */
    pushq $(MVM_SEL_UCODE | 3)      /* cs */
    pushq %r8                       /* rip */
    iretq

/* Exception stubs: push a zero error code where the CPU does not, then the
 * vector, and report. */
.macro EXC_NOERR vec
exc_\vec:
    pushq $0
    pushq $\vec
    jmp exc_common
.endm
.macro EXC_ERR vec
exc_\vec:
    pushq $\vec
    jmp exc_common
.endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR 29
EXC_ERR 30
EXC_NOERR 31

/* Stack: vector, error, rip, cs, rflags, rsp, ss. Hand the VMM the facts in
 * registers (rdi vector, rsi error, rdx rip, rcx cr2, r8 cs, r9 rflags)
 * with one port write, then halt for good. */
exc_common:
    movq 0(%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    movq %cr2, %rcx
    movq 24(%rsp), %r8
    movq 32(%rsp), %r9
    outb %al, $MVM_PORT_EXCEPTION
1:  hlt
    jmp 1b

    .section .rodata.kernel, "a"
    .balign 8
exc_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_\v
    .endr
