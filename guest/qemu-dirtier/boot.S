/*
 * guest/qemu-dirtier/boot.S - the CPL0 part of the QEMU dirtier.
 *
 * QEMU's multiboot loader enters entry32 in 32-bit protected mode, paging
 * off (eax = 0x2BADB002, ebx = multiboot info). On this project's KVM host
 * every CPL0 instruction is emulated (~1 us), so the page tables, GDT and
 * PML4 are static data and set-up is a few dozen instructions: enter long
 * mode, fill the TSS and IDT, let kernel_main (C, still CPL0) read the
 * command line and calibrate the TSC, then iretq to the CPL3 loop, which
 * runs natively. On hardware it is an ordinary kernel/user split.
 */
#include "status.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS ((1 << 16) | (1 << 1)) /* a.out kludge (load addresses below) | memory info */

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x18
#define SEL_UCODE 0x20
#define SEL_TSS 0x28

#define MSR_EFER 0xC0000080
#define EFER_LME (1 << 8)

    .section .header, "a"
    .balign 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header         /* header_addr */
    .long __load_start      /* load_addr */
    .long __load_end        /* load_end_addr */
    .long __image_end       /* bss_end_addr */
    .long entry32           /* entry_addr */

    .section .text.boot, "ax"
    .code32
    .globl entry32
entry32:
    cli
    movl %ebx, mbi_addr
    lgdt gdt_ptr
    movl %cr4, %eax
    orl $(1 << 5), %eax             /* PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $SEL_KCODE, $entry64

    .code64
entry64:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movq $kstack_top, %rsp
    /* TSS descriptor: base split over its fields. */
    movq $tss, %rax
    movw %ax, gdt_tss + 2
    shrq $16, %rax
    movb %al, gdt_tss + 4
    movb %ah, gdt_tss + 7
    shrq $16, %rax
    movl %eax, gdt_tss + 8
    movq $kstack_top, %rax
    movq %rax, tss + 4              /* rsp0 */
    movw $SEL_TSS, %ax
    ltr %ax
    /* IDT: 32 gates to stubs 16 bytes apart (all below 4 GiB). */
    movq $idt, %rdi
    movq $exc_stubs, %rax
    movl $32, %ecx
1:  movw %ax, (%rdi)
    movw $SEL_KCODE, 2(%rdi)
    movw $0x8E00, 4(%rdi)           /* present, DPL0, interrupt gate */
    movl %eax, %edx
    shrl $16, %edx
    movw %dx, 6(%rdi)
    addq $16, %rdi
    addq $16, %rax
    loop 1b
    lidt idt_ptr
    movl mbi_addr, %edi
    call kernel_main
    testl %eax, %eax
    jz 3f
    movq $ustack_top, %rsp          /* cpl=0: the loop stays here, emulated */
    jmp user_main
3:  /* iretq to CPL3: the dirtier runs natively there. */
    pushq $(SEL_UDATA | 3)          /* ss */
    pushq $ustack_top               /* rsp */
    pushq $0x0002                   /* rflags: IF=0 */
    pushq $(SEL_UCODE | 3)          /* cs */
    pushq $user_main                /* rip */
    iretq

/* Exception stubs, 16 bytes each: vector in edi, then report and halt. */
    .balign 16
exc_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    movl $\v, %edi
    jmp exc_common
    .endr
exc_common:
    movq %rsp, %rsi                 /* the frame: [error code,] rip, cs, ... */
    movq $kstack_top - 64, %rsp
    call kernel_exception
2:  hlt
    jmp 2b

    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 7                  /* present, writable, user */
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 7
    .quad pd + 0x1000 + 7
    .quad pd + 0x2000 + 7
    .quad pd + 0x3000 + 7
    .fill 508, 8, 0
pd:                                 /* 0-4 GiB in 2 MiB pages, user-accessible */
    .set addr, 0
    .rept 2048
    .quad addr + 0x87               /* present, writable, user, 2 MiB */
    .set addr, addr + 0x200000
    .endr

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00209A0000000000        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF        /* 0x18 user data, DPL3 */
    .quad 0x0020FA0000000000        /* 0x20 user code, 64-bit, DPL3 */
gdt_tss:                            /* 0x28 TSS (available), base filled at boot */
    .quad 0x0000890000000067
    .quad 0
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .balign 16
idt_ptr:
    .word 32 * 16 - 1
    .quad idt
    .balign 16
tss:
    .fill 104, 1, 0
    .globl mbi_addr
mbi_addr:
    .long 0
    .balign 16
idt:
    .fill 32 * 16, 1, 0

    .section .bss
    .balign 4096
    .skip 4096
kstack_top:
    .skip 16384
ustack_top:
