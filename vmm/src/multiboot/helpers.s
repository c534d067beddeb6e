# Multiboot image, part 3 (see boot.rs): ring-3 helpers (command line
# parsing, PIT calibration), COM1 output for any ring, and the strings.
# Ends the section that ring0.s opened.
# ---- parsing helpers (ring 3) ----
.Lmb_skip_blanks:
    mov al, [r12]
    cmp al, 32
    je .Lmb_skip_one
    cmp al, 9
    jne .Lmb_skip_done
.Lmb_skip_one:
    inc r12
    jmp .Lmb_skip_blanks
.Lmb_skip_done:
    ret
# ZF = 1 if r12 is at the end of a word (blank or NUL). Keeps rax.
.Lmb_at_end:
    movzx r10d, byte ptr [r12]
    test r10d, r10d
    je .Lmb_at_end_ret
    cmp r10d, 32
    je .Lmb_at_end_ret
    cmp r10d, 9
.Lmb_at_end_ret:
    ret
# rsi = NUL-terminated prefix. ZF = 1 and r12 past it if r12 starts
# with it; else ZF = 0 and r12 unchanged.
.Lmb_prefix:
    mov rdi, r12
.Lmb_prefix_loop:
    mov al, [rsi]
    test al, al
    jz .Lmb_prefix_yes
    cmp al, [rdi]
    jne .Lmb_prefix_no
    inc rsi
    inc rdi
    jmp .Lmb_prefix_loop
.Lmb_prefix_yes:
    mov r12, rdi
    cmp al, al
.Lmb_prefix_no:
    ret
# rsi = word. ZF = 1 and r12 past it if the value at r12 is exactly it.
.Lmb_word:
    push r12
    call .Lmb_prefix
    jne .Lmb_word_no
    call .Lmb_at_end
    jne .Lmb_word_no
    lea rsp, [rsp + 8]
    ret
.Lmb_word_no:
    pop r12
    ret
# rax = the number at r12 (decimal, or hex after 0x), r12 past it;
# CF = 1 if there are no digits or it overflows u64.
.Lmb_number:
    xor eax, eax
    xor ecx, ecx
    cmp byte ptr [r12], 48
    jne .Lmb_dec
    mov dl, [r12 + 1]
    or dl, 32
    cmp dl, 120
    jne .Lmb_dec
    add r12, 2
.Lmb_hex:
    movzx edx, byte ptr [r12]
    sub edx, 48
    cmp edx, 10
    jb .Lmb_hex_digit
    movzx edx, byte ptr [r12]
    or edx, 32
    sub edx, 97
    cmp edx, 6
    jae .Lmb_num_end
    add edx, 10
.Lmb_hex_digit:
    mov r8, rax
    shr r8, 60
    jnz .Lmb_num_bad
    shl rax, 4
    or rax, rdx
    inc ecx
    inc r12
    jmp .Lmb_hex
.Lmb_dec:
    movzx edx, byte ptr [r12]
    sub edx, 48
    cmp edx, 10
    jae .Lmb_num_end
    mov r9, rdx
    mov r8d, 10
    mul r8
    jc .Lmb_num_bad
    add rax, r9
    jc .Lmb_num_bad
    inc ecx
    inc r12
    jmp .Lmb_dec
.Lmb_num_end:
    test ecx, ecx
    jz .Lmb_num_bad
    clc
    ret
.Lmb_num_bad:
    stc
    ret
# rax = a size at r12: a number with an optional K/M/G/T suffix
# (binary; optionally followed by B or iB), r12 past it; CF on error.
.Lmb_size:
    call .Lmb_number
    jc .Lmb_size_ret
    movzx edx, byte ptr [r12]
    or edx, 32
    mov ecx, 10
    cmp edx, 107
    je .Lmb_size_unit
    mov ecx, 20
    cmp edx, 109
    je .Lmb_size_unit
    mov ecx, 30
    cmp edx, 103
    je .Lmb_size_unit
    mov ecx, 40
    cmp edx, 116
    je .Lmb_size_unit
    xor ecx, ecx
    cmp edx, 98
    jne .Lmb_size_ok
    inc r12
    jmp .Lmb_size_ok
.Lmb_size_unit:
    inc r12
    movzx edx, byte ptr [r12]
    or edx, 32
    cmp edx, 105
    jne .Lmb_size_b
    inc r12
    movzx edx, byte ptr [r12]
    or edx, 32
    cmp edx, 98
    jne .Lmb_size_bad
    inc r12
    jmp .Lmb_size_shift
.Lmb_size_b:
    cmp edx, 98
    jne .Lmb_size_shift
    inc r12
.Lmb_size_shift:
    mov r8, rax
    shl rax, cl
    mov r9, rax
    shr r9, cl
    cmp r9, r8
    jne .Lmb_size_bad
.Lmb_size_ok:
    clc
.Lmb_size_ret:
    ret
.Lmb_size_bad:
    stc
    ret
# rax = TSC kHz measured over 50 ms of PIT channel 2 (mode 0, gate on,
# speaker off), or 0 if its output never rises (no PIT). Both ends are
# bracketed by rdtsc: the count starts between r8 and r10 (before and
# after the write that starts it), the output rose after the TSC r9 read
# before the last poll that saw it low and before the TSC read after the
# poll that saw it high. A try whose brackets add up to more than 0.1% of
# the interval (the vCPU was preempted) is repeated, up to 8 times.
.Lmb_pit_calibrate:
    mov r11d, 8
.Lmb_pit_try:
    in al, 0x61
    and al, 0xfc
    or al, 1
    out 0x61, al
    mov al, 0xb0
    out 0x43, al
    mov al, {PIT_LATCH_LO}
    out 0x42, al
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov al, {PIT_LATCH_HI}
    out 0x42, al
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r10, rax
    mov r9, rax
.Lmb_pit_wait:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rdi, rax
    in al, 0x61
    test al, 0x20
    jnz .Lmb_pit_high
    mov r9, rdi
    sub rdi, r8
    movabs rcx, {PIT_GIVE_UP_TSC}
    cmp rdi, rcx
    jb .Lmb_pit_wait
    xor eax, eax
    ret
.Lmb_pit_high:
    rdtsc
    shl rdx, 32
    or rax, rdx
.Lmb_pit_edge:
    mov rcx, rax
    sub rcx, r9
    mov rdx, r10
    sub rdx, r8
    add rcx, rdx
    add rax, r9
    sub rax, r8
    sub rax, r10
    shr rax, 1
    imul rcx, rcx, 1000
    cmp rcx, rax
    jb .Lmb_pit_ok
    dec r11d
    jnz .Lmb_pit_try
.Lmb_pit_ok:
    mov ecx, {PIT_HZ}
    mul rcx
    mov ecx, {PIT_LATCH_KHZ}
    div rcx
    ret
# ---- COM1 output (any ring; QEMU's UART takes a byte at any time) ----
.Lmb_putc:
    push rdx
    mov edx, {COM1}
    out dx, al
    pop rdx
    ret
.Lmb_puts:
    mov al, [rsi]
    test al, al
    jz .Lmb_puts_done
    call .Lmb_putc
    inc rsi
    jmp .Lmb_puts
.Lmb_puts_done:
    ret
.Lmb_putdec:
    sub rsp, 32
    lea rsi, [rsp + 31]
    mov byte ptr [rsi], 0
    mov ecx, 10
.Lmb_putdec_loop:
    xor edx, edx
    div rcx
    add dl, 48
    dec rsi
    mov [rsi], dl
    test rax, rax
    jnz .Lmb_putdec_loop
    call .Lmb_puts
    add rsp, 32
    ret
.Lmb_puthex:
    mov r8, rax
    mov al, 48
    call .Lmb_putc
    mov al, 120
    call .Lmb_putc
    mov ecx, 16
.Lmb_puthex_loop:
    rol r8, 4
    mov eax, r8d
    and eax, 15
    cmp eax, 10
    jb .Lmb_puthex_digit
    add eax, 39
.Lmb_puthex_digit:
    add eax, 48
    call .Lmb_putc
    dec ecx
    jnz .Lmb_puthex_loop
    ret
# ---- strings ----
.Lmb_k_wss: .asciz "wss="
.Lmb_k_dirty_rate: .asciz "dirty_rate="
.Lmb_k_rate: .asciz "rate="
.Lmb_k_mode: .asciz "mode="
.Lmb_k_seed: .asciz "seed="
.Lmb_k_tsc_khz: .asciz "tsc_khz="
.Lmb_k_progress_ms: .asciz "progress_ms="
.Lmb_k_sleep: .asciz "sleep="
.Lmb_k_selftest: .asciz "selftest="
.Lmb_w_exception: .asciz "exception"
.Lmb_e_selftest: .asciz "expected exception"
.Lmb_w_max: .asciz "max"
.Lmb_w_idle: .asciz "idle"
.Lmb_w_zero: .asciz "0"
.Lmb_w_sparse: .asciz "sparse"
.Lmb_w_full: .asciz "full"
.Lmb_w_auto: .asciz "auto"
.Lmb_w_hlt: .asciz "hlt"
.Lmb_w_spin: .asciz "spin"
.Lmb_e_key: .asciz "unknown key"
.Lmb_e_size: .asciz "expected a size such as 65536, 256M or 1G, or max"
.Lmb_e_page: .asciz "the working set must be a whole number of 4 KiB pages"
.Lmb_e_rate: .asciz "expected 0, idle, a number of MiB/s or max"
.Lmb_e_mode: .asciz "expected sparse or full"
.Lmb_e_number: .asciz "expected a number below 2^32 (2^64 for seed)"
.Lmb_e_khz: .asciz "expected a number of kHz from 1 to 2^32-1"
.Lmb_e_sleep: .asciz "expected auto, hlt or spin"
.Lmb_m_bad: .asciz "ERROR bad command line: \""
.Lmb_m_bad2: .asciz "\": "
.Lmb_m_no_wss: .asciz "ERROR bad command line: wss= is required"
.Lmb_m_usage: .asciz "USAGE wss=SIZE|max [dirty_rate=0|MiB/s|max] [mode=sparse|full] [seed=N] [tsc_khz=N] [progress_ms=N] [sleep=auto|hlt|spin]"
.Lmb_m_magic: .asciz "ERROR not started by a Multiboot v1 loader"
.Lmb_m_no_mmap: .asciz "ERROR the loader passed no memory map"
.Lmb_m_no_tsc: .asciz "ERROR cannot measure the TSC rate (no PIT): pass tsc_khz="
.Lmb_m_no_hlt: .asciz "ERROR sleep=hlt needs x2APIC and the TSC-deadline timer"
.Lmb_m_fit: .asciz "ERROR wss="
.Lmb_m_fit2: .asciz " does not fit: the largest free piece of mapped RAM is "
.Lmb_m_fit3: .asciz " bytes"
.Lmb_m_exc: .asciz "EXCEPTION vector="
.Lmb_m_error: .asciz " error="
.Lmb_m_rip: .asciz " rip="
.Lmb_m_cs: .asciz " cs="
.Lmb_m_rsp: .asciz " rsp="
.Lmb_m_cr2: .asciz " cr2="
.Lmb_m_stray: .asciz "STRAY vector="
.Lmb_b_boot: .asciz "BOOT migrated-multiboot vcpus=1 wss="
.Lmb_b_wss_gpa: .asciz " wss_gpa="
.Lmb_b_ram: .asciz " ram="
.Lmb_b_mapped: .asciz " mapped_top="
.Lmb_b_mode_sparse: .asciz " mode=sparse"
.Lmb_b_mode_full: .asciz " mode=full"
.Lmb_b_rate: .asciz " dirty_rate="
.Lmb_b_seed_s: .asciz " seed="
.Lmb_b_tsc: .asciz " tsc_khz="
.Lmb_b_tsc_cmdline: .asciz " tsc_from=cmdline"
.Lmb_b_tsc_cpuid: .asciz " tsc_from=cpuid"
.Lmb_b_tsc_pit: .asciz " tsc_from=pit"
.Lmb_b_tsc_kvmclock: .asciz " tsc_from=kvmclock"
.Lmb_b_sleep_hlt: .asciz " sleep=hlt"
.Lmb_b_sleep_spin: .asciz " sleep=spin"
.Lmb_b_progress: .asciz " progress_ms="
.globl migrated_mb_end
migrated_mb_end:
.popsection
