# Multiboot image, part 1 (see boot.rs): the offset table, the 32-bit
# entry, 64-bit ring-0 setup, the exception stubs and handlers, and the
# ud2 call gate. Intel syntax; names in braces are const operands of
# boot.rs.
.pushsection .rodata.migrated_multiboot,"a",@progbits
.balign 16
.globl migrated_mb_start
migrated_mb_start:
.Lmb0:
# ---- offset table (order: `entry`) ----
.long .Lmb_entry32 - .Lmb0
.long .Lmb_stubs - .Lmb0
.long .Lmb_timer_isr - .Lmb0
.long .Lmb_spurious_isr - .Lmb0
.long .Lmb_ud_isr - .Lmb0
# ---- 32-bit entry: flat protected mode, paging off, EAX = magic,
# EBX = multiboot info. No stack is used here. ----
.code32
.Lmb_entry32:
    cli
    cld
    mov dword ptr [{V_MAGIC}], eax
    mov dword ptr [{V_MBI}], ebx
# Mask both PICs: the BIOS left the PIT's IRQ 0 unmasked, and nothing
# here wants legacy interrupts.
    mov al, 0xff
    out 0xa1, al
    out 0x21, al
# The prebuilt tables map the first 4 GiB with 2 MiB pages; ring 3
# maps the rest. (1 GiB pages would be simpler, but PVM hides pdpe1gb.)
    mov eax, {CR4}
    mov cr4, eax
    mov eax, {PML4}
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, {CR0}
    mov cr0, eax
    lgdt [{GDTR}]
# ljmp KERNEL_CS:entry64
    .byte 0xea
    .long {BOOT} + (.Lmb_entry64 - .Lmb0)
    .word {KERNEL_CS}
.code64
# ---- 64-bit ring 0: TSS, IDT, then iretq to ring 3 ----
.Lmb_entry64:
    mov eax, {KERNEL_DS}
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, {STACK0_TOP}
    mov eax, {TSS_SEL}
    ltr ax
    lidt [{IDTR}]
    push {USER_DS}
    push {STACK3_TOP}
    push {RFLAGS3}
    push {USER_CS}
    lea rax, [rip + .Lmb_ring3]
    push rax
    iretq
# ---- ring 0: 256 stubs, 16 bytes apart: [dummy error code], vector ----
.balign 16
.Lmb_stubs:
.set .Lmb_vec, 0
.rept 256
.balign 16
.if (.Lmb_vec == 8) || ((.Lmb_vec >= 10) && (.Lmb_vec <= 14)) || (.Lmb_vec == 17) || (.Lmb_vec == 21) || (.Lmb_vec == 29) || (.Lmb_vec == 30)
.else
    push 0
.endif
# push imm32
    .byte 0x68
    .long .Lmb_vec
    jmp .Lmb_exc_common
.set .Lmb_vec, .Lmb_vec + 1
.endr
# Stack: vector, error, rip, cs, rflags, rsp, ss.
.Lmb_exc_common:
    cmp qword ptr [rsp], 32
    jae .Lmb_stray
    lea rsi, [rip + .Lmb_m_exc]
    call .Lmb_puts
    mov rax, [rsp]
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_m_error]
    call .Lmb_puts
    mov rax, [rsp + 8]
    call .Lmb_puthex
    lea rsi, [rip + .Lmb_m_rip]
    call .Lmb_puts
    mov rax, [rsp + 16]
    call .Lmb_puthex
    lea rsi, [rip + .Lmb_m_cs]
    call .Lmb_puts
    mov rax, [rsp + 24]
    call .Lmb_puthex
    lea rsi, [rip + .Lmb_m_rsp]
    call .Lmb_puts
    mov rax, [rsp + 40]
    call .Lmb_puthex
    lea rsi, [rip + .Lmb_m_cr2]
    call .Lmb_puts
    mov rax, cr2
    call .Lmb_puthex
    mov al, 10
    call .Lmb_putc
# Stop for good. With IF = 0 only an NMI would wake the vCPU, and it
# halts again.
.Lmb_halt:
    cli
    hlt
    jmp .Lmb_halt
# An interrupt nobody asked for: say so, acknowledge it, carry on.
.Lmb_stray:
    push rax
    push rcx
    push rdx
    push rsi
    push r8
    lea rsi, [rip + .Lmb_m_stray]
    call .Lmb_puts
    mov rax, [rsp + 40]
    call .Lmb_putdec
    mov al, 10
    call .Lmb_putc
    cmp qword ptr [{V_X2APIC}], 0
    je .Lmb_stray_ret
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
.Lmb_stray_ret:
    pop r8
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq
# ---- ring 0: the LAPIC timer's interrupt only ends a sleep ----
.Lmb_timer_isr:
    push rax
    push rcx
    push rdx
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq
.Lmb_spurious_isr:
    iretq
# ---- ring 0: #UD, which is also the call gate from ring 3 ----
# PVM turns a ring-3 `int n` into #UD and runs a `syscall` target at
# CPL 3, but delivers exceptions to ring 0 faithfully. So ring 3 calls
# with `ud2`: eax = call (SYS_*), rdx = argument; it resumes after the
# `ud2` with rax and rdx clobbered. Any other #UD is a real one.
.Lmb_ud_isr:
    push rsi
    mov rsi, [rsp + 8]
    cmp word ptr [rsi], 0x0b0f
    pop rsi
    jne .Lmb_ud_real
    add qword ptr [rsp], 2
    cmp eax, {SYS_SLEEP}
    je .Lmb_sys_sleep
    cmp eax, {SYS_LAPIC}
    je .Lmb_sys_lapic
    cmp eax, {SYS_KVMCLOCK}
    je .Lmb_sys_kvmclock
    jmp .Lmb_halt
.Lmb_ud_real:
    push 0
    push 6
    jmp .Lmb_exc_common
# Halt until TSC deadline rdx (the LAPIC timer fires). `sti; hlt`
# cannot lose the wakeup: STI holds interrupts off until after the next
# instruction, and HLT wakes for a pending one.
.Lmb_sys_sleep:
    push rcx
    mov eax, edx
    shr rdx, 32
    mov ecx, 0x6e0
    wrmsr
    sti
    hlt
    cli
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rcx
    iretq
# x2APIC on, LVT timer in TSC-deadline mode.
# MSR_KVM_SYSTEM_TIME_NEW = rdx (clock page GPA | 1 = on, 0 = off).
.Lmb_sys_kvmclock:
    push rcx
    mov eax, edx
    shr rdx, 32
    mov ecx, 0x4b564d01
    wrmsr
    pop rcx
    iretq
.Lmb_sys_lapic:
    push rcx
# xAPIC first: KVM refuses a jump from disabled straight to x2APIC.
    mov ecx, 0x1b
    rdmsr
    or eax, 0x800
    wrmsr
    or eax, 0x400
    wrmsr
    xor edx, edx
    mov ecx, 0x80f
    mov eax, 0x1ff
    wrmsr
# LINT0 (the BIOS's virtual wire to the PIC) masked.
    mov ecx, 0x835
    mov eax, 0x10000
    wrmsr
    mov ecx, 0x832
    mov eax, {TIMER_VECTOR} | {LVT_TSC_DEADLINE}
    wrmsr
    mov qword ptr [{V_X2APIC}], 1
    pop rcx
    iretq
