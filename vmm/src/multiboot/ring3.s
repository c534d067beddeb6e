# Multiboot image, part 2 (see boot.rs): the ring-3 boot program, from
# the command line to the jump into the workload, and its error exits.
# ---- ring 3 boot program: rsp = STACK3_TOP, IOPL 3, IF = 0 ----
# r15 = params page, r14 = status slot, r13 = multiboot info,
# r12 = command line cursor, rbx = start of the word being parsed.
.Lmb_ring3:
    mov r15, {PARAMS}
    mov r14, {STATUS}
    mov eax, [{V_MAGIC}]
    cmp eax, {MB_BOOT_MAGIC}
    jne .Lmb_err_magic
    mov r13d, [{V_MBI}]
    test byte ptr [r13], 4
    jz .Lmb_parsed
    mov r12d, [r13 + 16]
# Loaders put the image's path first: skip a first word without '='.
    call .Lmb_skip_blanks
    mov rsi, r12
.Lmb_first_word:
    mov al, [rsi]
    cmp al, 61
    je .Lmb_next_word
    test al, al
    jz .Lmb_first_skip
    cmp al, 32
    je .Lmb_first_skip
    cmp al, 9
    je .Lmb_first_skip
    inc rsi
    jmp .Lmb_first_word
.Lmb_first_skip:
    mov r12, rsi
.Lmb_next_word:
    call .Lmb_skip_blanks
    cmp byte ptr [r12], 0
    je .Lmb_parsed
    mov rbx, r12
    lea rsi, [rip + .Lmb_k_wss]
    call .Lmb_prefix
    je .Lmb_h_wss
    lea rsi, [rip + .Lmb_k_dirty_rate]
    call .Lmb_prefix
    je .Lmb_h_rate
    lea rsi, [rip + .Lmb_k_rate]
    call .Lmb_prefix
    je .Lmb_h_rate
    lea rsi, [rip + .Lmb_k_mode]
    call .Lmb_prefix
    je .Lmb_h_mode
    lea rsi, [rip + .Lmb_k_seed]
    call .Lmb_prefix
    je .Lmb_h_seed
    lea rsi, [rip + .Lmb_k_tsc_khz]
    call .Lmb_prefix
    je .Lmb_h_tsc_khz
    lea rsi, [rip + .Lmb_k_progress_ms]
    call .Lmb_prefix
    je .Lmb_h_progress_ms
    lea rsi, [rip + .Lmb_k_sleep]
    call .Lmb_prefix
    je .Lmb_h_sleep
    lea rsi, [rip + .Lmb_k_selftest]
    call .Lmb_prefix
    je .Lmb_h_selftest
    lea rsi, [rip + .Lmb_e_key]
    jmp .Lmb_bad_word
# wss=SIZE|max
.Lmb_h_wss:
    lea rsi, [rip + .Lmb_w_max]
    call .Lmb_word
    jne .Lmb_h_wss_size
    mov qword ptr [{V_WSS_MAX}], 1
    jmp .Lmb_next_word
.Lmb_h_wss_size:
    lea rsi, [rip + .Lmb_e_size]
    call .Lmb_size
    jc .Lmb_bad_word
    call .Lmb_at_end
    jne .Lmb_bad_word
    test rax, rax
    jz .Lmb_bad_word
    lea rsi, [rip + .Lmb_e_page]
    test eax, 4095
    jnz .Lmb_bad_word
    mov [{V_WSS}], rax
    mov qword ptr [{V_WSS_MAX}], 0
    jmp .Lmb_next_word
# dirty_rate=0|idle|MiB/s|max
.Lmb_h_rate:
    lea rsi, [rip + .Lmb_w_max]
    call .Lmb_word
    jne .Lmb_h_rate_idle
    mov qword ptr [{V_RATE_KIND}], 2
    jmp .Lmb_next_word
.Lmb_h_rate_idle:
    lea rsi, [rip + .Lmb_w_idle]
    call .Lmb_word
    jne .Lmb_h_rate_num
    mov qword ptr [{V_RATE_KIND}], 0
    jmp .Lmb_next_word
.Lmb_h_rate_num:
    lea rsi, [rip + .Lmb_e_rate]
    call .Lmb_number
    jc .Lmb_bad_word
    call .Lmb_at_end
    jne .Lmb_bad_word
    mov rcx, rax
    shr rcx, 32
    jnz .Lmb_bad_word
    mov [{V_RATE_MIB}], rax
    xor ecx, ecx
    test rax, rax
    setnz cl
    mov [{V_RATE_KIND}], rcx
    jmp .Lmb_next_word
# mode=sparse|full
.Lmb_h_mode:
    lea rsi, [rip + .Lmb_w_sparse]
    call .Lmb_word
    jne .Lmb_h_mode_full
    mov qword ptr [{V_MODE}], 0
    jmp .Lmb_next_word
.Lmb_h_mode_full:
    lea rsi, [rip + .Lmb_w_full]
    call .Lmb_word
    lea rsi, [rip + .Lmb_e_mode]
    jne .Lmb_bad_word
    mov qword ptr [{V_MODE}], 1
    jmp .Lmb_next_word
# seed=N
.Lmb_h_seed:
    lea rsi, [rip + .Lmb_e_number]
    call .Lmb_number
    jc .Lmb_bad_word
    call .Lmb_at_end
    jne .Lmb_bad_word
    mov [{V_SEED}], rax
    jmp .Lmb_next_word
# tsc_khz=N (1 ..= u32::MAX)
.Lmb_h_tsc_khz:
    lea rsi, [rip + .Lmb_e_khz]
    call .Lmb_number
    jc .Lmb_bad_word
    call .Lmb_at_end
    jne .Lmb_bad_word
    test rax, rax
    jz .Lmb_bad_word
    mov rcx, rax
    shr rcx, 32
    jnz .Lmb_bad_word
    mov [{V_TSC_KHZ}], rax
    mov qword ptr [{V_TSC_FROM}], 0
    jmp .Lmb_next_word
# progress_ms=N (0 = no PROGRESS lines; < 2^32)
.Lmb_h_progress_ms:
    lea rsi, [rip + .Lmb_e_number]
    call .Lmb_number
    jc .Lmb_bad_word
    call .Lmb_at_end
    jne .Lmb_bad_word
    mov rcx, rax
    shr rcx, 32
    jnz .Lmb_bad_word
    mov [{V_PROGRESS_MS}], rax
    jmp .Lmb_next_word
# sleep=auto|hlt|spin
.Lmb_h_sleep:
    lea rsi, [rip + .Lmb_w_auto]
    call .Lmb_word
    jne .Lmb_h_sleep_hlt
    mov qword ptr [{V_SLEEP}], 0
    jmp .Lmb_next_word
.Lmb_h_sleep_hlt:
    lea rsi, [rip + .Lmb_w_hlt]
    call .Lmb_word
    jne .Lmb_h_sleep_spin
    mov qword ptr [{V_SLEEP}], {SLEEP_GATE}
    jmp .Lmb_next_word
.Lmb_h_sleep_spin:
    lea rsi, [rip + .Lmb_w_spin]
    call .Lmb_word
    lea rsi, [rip + .Lmb_e_sleep]
    jne .Lmb_bad_word
    mov qword ptr [{V_SLEEP}], {SLEEP_SPIN}
    jmp .Lmb_next_word
# ---- command line parsed: check it, then settle TSC, sleep, memory ----
# selftest=exception: fault in ring 3 once parsed (tests the IDT path)
.Lmb_h_selftest:
    lea rsi, [rip + .Lmb_w_exception]
    call .Lmb_word
    lea rsi, [rip + .Lmb_e_selftest]
    jne .Lmb_bad_word
    mov qword ptr [{V_SELFTEST}], 1
    jmp .Lmb_next_word
.Lmb_parsed:
    cmp qword ptr [{V_SELFTEST}], 0
    je .Lmb_no_selftest
# A privileged instruction at CPL 3: #GP.
    hlt
.Lmb_no_selftest:
    cmp qword ptr [{V_WSS}], 0
    jne .Lmb_tsc
    cmp qword ptr [{V_WSS_MAX}], 0
    jne .Lmb_tsc
    lea rsi, [rip + .Lmb_m_no_wss]
    jmp .Lmb_fatal_usage
# TSC rate: command line, else the hypervisor's timing leaf
# (0x40000010, kHz), else KVM's clock page, else measure against PIT
# channel 2.
.Lmb_tsc:
    cmp qword ptr [{V_TSC_KHZ}], 0
    jne .Lmb_sleep_how
    mov eax, 1
    cpuid
    bt ecx, 31
    jnc .Lmb_tsc_pit
    mov eax, 0x40000000
    cpuid
    cmp eax, 0x40000010
    jb .Lmb_tsc_kvmclock
    mov eax, 0x40000010
    cpuid
    test eax, eax
    jz .Lmb_tsc_kvmclock
    mov [{V_TSC_KHZ}], rax
    mov qword ptr [{V_TSC_FROM}], 1
    jmp .Lmb_sleep_how
# KVM's clock page holds the TSC-to-ns factor it derived from the guest's
# TSC rate: tsc_khz = (10^6 << 32) / mul, shifted right by shift. Exact,
# unlike timing the PIT on a busy host. The page is switched off again at
# once, or KVM would keep rewriting it.
.Lmb_tsc_kvmclock:
    mov eax, 0x40000000
    cpuid
    cmp ebx, 0x4b4d564b
    jne .Lmb_tsc_pit
    cmp eax, 0x40000001
    jb .Lmb_tsc_pit
    mov eax, 0x40000001
    cpuid
    test eax, 8
    jz .Lmb_tsc_pit
    mov eax, {SYS_KVMCLOCK}
    mov edx, {PVCLOCK} + 1
    ud2
    mov ecx, 1 << 24
.Lmb_pvclock_wait:
    mov eax, [{PVCLOCK}]
    test eax, 1
    jnz .Lmb_pvclock_again
    mov r8d, [{PVCLOCK} + 24]
    movsx r9d, byte ptr [{PVCLOCK} + 28]
    cmp eax, [{PVCLOCK}]
    jne .Lmb_pvclock_again
    test r8d, r8d
    jnz .Lmb_pvclock_read
.Lmb_pvclock_again:
    pause
    dec ecx
    jnz .Lmb_pvclock_wait
.Lmb_pvclock_read:
    mov eax, {SYS_KVMCLOCK}
    xor edx, edx
    ud2
    test r8d, r8d
    jz .Lmb_tsc_pit
    movabs rax, {NS_KHZ_SHIFTED}
    xor edx, edx
    div r8
    mov ecx, r9d
    test ecx, ecx
    js .Lmb_pvclock_shl
    shr rax, cl
    jmp .Lmb_pvclock_khz
.Lmb_pvclock_shl:
    neg ecx
    shl rax, cl
.Lmb_pvclock_khz:
    test rax, rax
    jz .Lmb_tsc_pit
    mov [{V_TSC_KHZ}], rax
    mov qword ptr [{V_TSC_FROM}], 3
    jmp .Lmb_sleep_how
.Lmb_tsc_pit:
    call .Lmb_pit_calibrate
    lea rsi, [rip + .Lmb_m_no_tsc]
    test rax, rax
    jz .Lmb_fatal
    mov [{V_TSC_KHZ}], rax
    mov qword ptr [{V_TSC_FROM}], 2
# Sleeping: the halt gate needs x2APIC and the TSC-deadline timer.
.Lmb_sleep_how:
    mov eax, 1
    cpuid
    and ecx, (1 << 21) | (1 << 24)
    cmp ecx, (1 << 21) | (1 << 24)
    sete al
    movzx eax, al
    mov rcx, [{V_SLEEP}]
    cmp rcx, {SLEEP_SPIN}
    je .Lmb_memory
    test eax, eax
    jnz .Lmb_use_gate
    lea rsi, [rip + .Lmb_m_no_hlt]
    cmp rcx, {SLEEP_GATE}
    je .Lmb_fatal
    mov qword ptr [{V_SLEEP}], {SLEEP_SPIN}
    jmp .Lmb_memory
.Lmb_use_gate:
    mov qword ptr [{V_SLEEP}], {SLEEP_GATE}
    mov eax, {SYS_LAPIC}
    ud2
# Free memory starts after the image and whatever of the loader's we
# still read (its info block and memory map; the command line is done).
.Lmb_memory:
    lea rsi, [rip + .Lmb_m_no_mmap]
    test byte ptr [r13], 64
    jz .Lmb_fatal
    mov esi, [r13 + 48]
    mov ecx, [r13 + 44]
    lea r8, [rsi + rcx]
    lea rax, [r13 + {MBI_LEN}]
    cmp rax, r8
    cmovb rax, r8
    cmp rax, [{V_FREE}]
    jbe .Lmb_free_ok
    add rax, 4095
    and rax, -4096
    mov [{V_FREE}], rax
.Lmb_free_ok:
# Map RAM above 4 GiB (up to the highest usable byte, at most 512 GiB)
# with page directories taken from free memory. The new entries were
# never present, so no TLB entry can be stale.
    xor r9d, r9d
.Lmb_top_loop:
    cmp rsi, r8
    jae .Lmb_top_done
    cmp dword ptr [rsi + 20], 1
    jne .Lmb_top_next
    mov rax, [rsi + 4]
    add rax, [rsi + 12]
    cmp rax, r9
    cmova r9, rax
.Lmb_top_next:
    mov ecx, [rsi]
    lea rsi, [rsi + rcx + 4]
    jmp .Lmb_top_loop
.Lmb_top_done:
    movabs rax, {MAX_MAPPED}
    cmp r9, rax
    cmova r9, rax
    add r9, (1 << 30) - 1
    shr r9, 30
    mov ecx, 4
    mov rdi, [{V_FREE}]
.Lmb_pd_loop:
    cmp rcx, r9
    jae .Lmb_pd_done
    mov rax, rcx
    shl rax, 30
    or rax, {LEAF_FLAGS}
    xor edx, edx
.Lmb_pd_fill:
    mov [rdi + rdx * 8], rax
    add rax, 0x200000
    inc edx
    cmp edx, 512
    jb .Lmb_pd_fill
    lea rax, [rdi + {TABLE_FLAGS}]
    mov [{PDPT} + rcx * 8], rax
    add rdi, 4096
    inc ecx
    jmp .Lmb_pd_loop
.Lmb_pd_done:
    mov [{V_FREE}], rdi
    mov eax, 4
    cmp r9, rax
    cmovb r9, rax
    shl r9, 30
    mov [{V_MAPPED_TOP}], r9
# Working set: the largest usable piece of mapped free RAM.
# r9 = its start, r10 = its length, r11 = all usable RAM.
    mov esi, [r13 + 48]
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
.Lmb_mm_loop:
    cmp rsi, r8
    jae .Lmb_mm_done
    cmp dword ptr [rsi + 20], 1
    jne .Lmb_mm_next
    mov rax, [rsi + 4]
    mov rdx, [rsi + 12]
    add r11, rdx
    add rdx, rax
    cmp rdx, [{V_MAPPED_TOP}]
    jbe .Lmb_mm_end_ok
    mov rdx, [{V_MAPPED_TOP}]
.Lmb_mm_end_ok:
    cmp rax, [{V_FREE}]
    jae .Lmb_mm_start_ok
    mov rax, [{V_FREE}]
.Lmb_mm_start_ok:
    add rax, 4095
    and rax, -4096
    and rdx, -4096
    cmp rdx, rax
    jbe .Lmb_mm_next
    mov rcx, rdx
    sub rcx, rax
    cmp rcx, r10
    jbe .Lmb_mm_next
    mov r9, rax
    mov r10, rcx
.Lmb_mm_next:
    mov ecx, [rsi]
    lea rsi, [rsi + rcx + 4]
    jmp .Lmb_mm_loop
.Lmb_mm_done:
    mov [{V_RAM}], r11
    mov rax, [{V_WSS}]
    cmp qword ptr [{V_WSS_MAX}], 0
    je .Lmb_wss_fits
    mov rax, r10
.Lmb_wss_fits:
    test rax, rax
    jz .Lmb_err_fit
    cmp rax, r10
    ja .Lmb_err_fit
# ---- params page and status slot (same values as workload::load) ----
    mov [r15 + {P_WSS_BYTES}], rax
    mov [r15 + {P_WSS_GPA}], r9
    mov [r14 + {S_SLICE_GPA}], r9
    shr rax, 12
    mov [r14 + {S_SLICE_PAGES}], rax
    mov rax, [{V_SEED}]
    mov [r15 + {P_SEED}], rax
    mov rax, [{V_MODE}]
    mov [r15 + {P_MODE}], rax
    mov ecx, 1
    mov edx, 512
    test rax, rax
    cmovnz ecx, edx
    mov [r15 + {P_WORDS_PER_PAGE}], rcx
    mov rbx, [{V_TSC_KHZ}]
    mov [r15 + {P_TSC_KHZ}], rbx
    mov [r15 + {P_SLEEP_MIN_TSC}], rbx
    imul rax, rbx, 100
    mov [r15 + {P_LAG_MAX_TSC}], rax
    mov rax, [{V_RATE_KIND}]
    mov [r15 + {P_RATE_KIND}], rax
    mov rcx, [{V_RATE_MIB}]
    mov [r15 + {P_RATE_MIB}], rcx
    xor edx, edx
    test rax, rax
    sete dl
    mov [r15 + {P_IDLE}], rdx
# tsc_per_page = max(1, tsc_khz * 1000 / (MiB/s * 256)) when paced.
    xor r8d, r8d
    cmp rax, 1
    jne .Lmb_paced_done
    imul rax, rbx, 1000
    shl rcx, 8
    xor edx, edx
    div rcx
    mov r8, rax
    test r8, r8
    jnz .Lmb_paced_done
    mov r8d, 1
.Lmb_paced_done:
    mov [r15 + {P_TSC_PER_PAGE}], r8
    imul rax, rbx, 1000
    lea rax, [rax + 2 * r8]
    mov [r15 + {P_AHEAD_MAX_TSC}], rax
    mov rax, [{V_SLEEP}]
    mov [r15 + {P_SLEEP_HOW}], rax
    mov rax, [{V_PROGRESS_MS}]
    imul rax, rbx
    mov [r15 + {P_PROGRESS_TSC}], rax
# ---- banner ----
    lea rsi, [rip + .Lmb_b_boot]
    call .Lmb_puts
    mov rax, [r15 + {P_WSS_BYTES}]
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_b_wss_gpa]
    call .Lmb_puts
    mov rax, [r15 + {P_WSS_GPA}]
    call .Lmb_puthex
    lea rsi, [rip + .Lmb_b_ram]
    call .Lmb_puts
    mov rax, [{V_RAM}]
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_b_mapped]
    call .Lmb_puts
    mov rax, [{V_MAPPED_TOP}]
    call .Lmb_puthex
    lea rsi, [rip + .Lmb_b_mode_sparse]
    cmp qword ptr [{V_MODE}], 0
    je .Lmb_b_mode
    lea rsi, [rip + .Lmb_b_mode_full]
.Lmb_b_mode:
    call .Lmb_puts
    lea rsi, [rip + .Lmb_b_rate]
    call .Lmb_puts
    mov rax, [{V_RATE_KIND}]
    lea rsi, [rip + .Lmb_w_max]
    cmp rax, 2
    je .Lmb_b_rate_word
    lea rsi, [rip + .Lmb_w_zero]
    test rax, rax
    jz .Lmb_b_rate_word
    mov rax, [{V_RATE_MIB}]
    call .Lmb_putdec
    jmp .Lmb_b_seed
.Lmb_b_rate_word:
    call .Lmb_puts
.Lmb_b_seed:
    lea rsi, [rip + .Lmb_b_seed_s]
    call .Lmb_puts
    mov rax, [{V_SEED}]
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_b_tsc]
    call .Lmb_puts
    mov rax, [{V_TSC_KHZ}]
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_b_tsc_cmdline]
    mov rax, [{V_TSC_FROM}]
    cmp rax, 1
    jb .Lmb_b_tsc_from
    lea rsi, [rip + .Lmb_b_tsc_cpuid]
    je .Lmb_b_tsc_from
    lea rsi, [rip + .Lmb_b_tsc_pit]
    cmp rax, 2
    je .Lmb_b_tsc_from
    lea rsi, [rip + .Lmb_b_tsc_kvmclock]
.Lmb_b_tsc_from:
    call .Lmb_puts
    lea rsi, [rip + .Lmb_b_sleep_hlt]
    cmp qword ptr [{V_SLEEP}], {SLEEP_GATE}
    je .Lmb_b_sleep
    lea rsi, [rip + .Lmb_b_sleep_spin]
.Lmb_b_sleep:
    call .Lmb_puts
    lea rsi, [rip + .Lmb_b_progress]
    call .Lmb_puts
    mov rax, [{V_PROGRESS_MS}]
    call .Lmb_putdec
    mov al, 10
    call .Lmb_putc
# ---- into the workload, as our VMM would start vCPU 0 ----
    mov rdi, r15
    xor esi, esi
    mov rdx, r14
    mov rsp, {STACK3_TOP}
    jmp qword ptr [r15 + {P_CODE_GPA}]
# ---- errors: one COM1 line, then halt for good ----
.Lmb_err_magic:
    lea rsi, [rip + .Lmb_m_magic]
    jmp .Lmb_fatal
.Lmb_err_fit:
    lea rsi, [rip + .Lmb_m_fit]
    call .Lmb_puts
    mov rax, [{V_WSS}]
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_m_fit2]
    call .Lmb_puts
    mov rax, r10
    call .Lmb_putdec
    lea rsi, [rip + .Lmb_m_fit3]
    jmp .Lmb_fatal
# rsi = reason, rbx = the word.
.Lmb_bad_word:
    push rsi
    lea rsi, [rip + .Lmb_m_bad]
    call .Lmb_puts
    mov rsi, rbx
.Lmb_bad_word_loop:
    mov al, [rsi]
    test al, al
    jz .Lmb_bad_word_end
    cmp al, 32
    je .Lmb_bad_word_end
    cmp al, 9
    je .Lmb_bad_word_end
    call .Lmb_putc
    inc rsi
    jmp .Lmb_bad_word_loop
.Lmb_bad_word_end:
    lea rsi, [rip + .Lmb_m_bad2]
    call .Lmb_puts
    pop rsi
# rsi = message; then the usage line.
.Lmb_fatal_usage:
    call .Lmb_puts
    mov al, 10
    call .Lmb_putc
    lea rsi, [rip + .Lmb_m_usage]
# rsi = message (a whole line without its newline).
.Lmb_fatal:
    call .Lmb_puts
    mov al, 10
    call .Lmb_putc
.Lmb_fatal_halt:
    mov eax, {SYS_HALT}
    ud2
    jmp .Lmb_fatal_halt
