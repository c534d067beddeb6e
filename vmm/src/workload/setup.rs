//! x86-64 machine structures for starting a vCPU directly in 64-bit ring 3:
//! identity-mapping page tables, a GDT laid out like Linux's (so the user
//! selectors are the ones PVM-style hypervisors expect: CS 0x33, SS 0x2b), a
//! 64-bit TSS, and the matching `kvm_sregs`/`kvm_regs`/`kvm_fpu`.
//!
//! Everything here is pure: it builds bytes and register values, the loader
//! writes them into guest memory.

use guestmem::{Gpa, MemoryLayout};
use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_segment, kvm_sregs};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

/// Page-table entry bits.
pub mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    /// Ring 3 may use the mapping: the guest runs at CPL 3.
    pub const USER: u64 = 1 << 2;
    /// Preset so the CPU never writes the tables back (which would dirty
    /// page-table pages under dirty logging).
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    /// In a page-directory entry: maps a 2 MiB page.
    pub const HUGE: u64 = 1 << 7;
}

/// Guest-physical (and virtual) addresses the identity map covers: one PML4
/// entry, so 512 GiB.
pub const MAX_MAPPED_GPA: u64 = 512 * GIB;

/// GDT selectors, the same slots as Linux's GDT.
pub mod selector {
    pub const KERNEL_CS32: u16 = 0x08;
    pub const KERNEL_CS: u16 = 0x10;
    pub const KERNEL_DS: u16 = 0x18;
    /// User data/stack segment, RPL 3.
    pub const USER_CS32: u16 = 0x23;
    pub const USER_DS: u16 = 0x2b;
    /// User 64-bit code segment, RPL 3.
    pub const USER_CS: u16 = 0x33;
    /// 16-byte 64-bit TSS descriptor (GDT entries 8 and 9).
    pub const TSS: u16 = 0x40;
}

/// Number of 8-byte GDT entries (the TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 10;
/// Byte size of the 64-bit TSS proper, where its I/O bitmap starts.
const TSS_BASE_LEN: usize = 104;
/// The I/O bitmap covers ports below this (all of ours).
const IO_BITMAP_PORTS: usize = 0x7400;
/// TSS bytes: the TSS, the I/O bitmap and the all-ones byte the CPU wants
/// after it. Fits in one page.
pub const TSS_LEN: usize = TSS_BASE_LEN + IO_BITMAP_PORTS / 8 + 1;
// The loader gives the TSS one page.
const _: () = assert!(TSS_LEN <= 4096);
/// Port ranges the guest may use from ring 3 through the I/O bitmap.
const IO_ALLOWED: [std::ops::Range<usize>; 2] = [0x3f8..0x400, 0x7000..0x7400];

/// Page directories needed for `layout`: one per GiB that holds RAM.
pub fn page_directory_gibs(layout: &MemoryLayout) -> Vec<u64> {
    let mut gibs: Vec<u64> = Vec::new();
    for r in layout.regions() {
        let first = r.gpa.0 / GIB;
        let last = (r.gpa.0 + r.size - 1) / GIB;
        for g in first..=last {
            if gibs.last() != Some(&g) {
                gibs.push(g);
            }
        }
    }
    gibs
}

/// Page tables identity-mapping all RAM of `layout` with 2 MiB user pages.
/// Returns `(gpa, page)` pairs: the PML4 at `pml4`, the PDPT at `pdpt`, and
/// one page directory per entry of `gibs` at `pds + i * 4096`. Regions are
/// 2 MiB aligned (guestmem guarantees it), so 2 MiB pages never map the hole.
pub fn page_tables(
    layout: &MemoryLayout,
    gibs: &[u64],
    pml4: Gpa,
    pdpt: Gpa,
    pds: Gpa,
) -> Vec<(Gpa, Vec<u8>)> {
    let table = |entries: &[(usize, u64)]| {
        let mut page = vec![0u8; 4096];
        for &(i, e) in entries {
            page[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        page
    };
    let upper = pte::PRESENT | pte::WRITABLE | pte::USER | pte::ACCESSED;
    let leaf = upper | pte::DIRTY | pte::HUGE;

    let mut out = vec![(pml4, table(&[(0, pdpt.0 | upper)]))];
    let pdpt_entries: Vec<(usize, u64)> = gibs
        .iter()
        .enumerate()
        .map(|(i, &g)| (g as usize, (pds.0 + i as u64 * 4096) | upper))
        .collect();
    out.push((pdpt, table(&pdpt_entries)));
    for (i, &g) in gibs.iter().enumerate() {
        let mut entries = Vec::new();
        for r in layout.regions() {
            let (start, end) = (r.gpa.0.max(g * GIB), (r.gpa.0 + r.size).min((g + 1) * GIB));
            let mut a = start;
            while a + MIB2 <= end {
                entries.push((((a - g * GIB) / MIB2) as usize, a | leaf));
                a += MIB2;
            }
        }
        out.push((Gpa(pds.0 + i as u64 * 4096), table(&entries)));
    }
    out
}

/// An 8-byte code/data segment descriptor.
fn descriptor(access: u8, flags: u8) -> u64 {
    // base 0, limit 0xfffff (with G: 4 GiB; ignored in 64-bit mode anyway).
    0xffff | (u64::from(access) << 40) | (0xf << 48) | (u64::from(flags & 0xf) << 52)
}

// Access bytes: P | DPL | S | type.
const ACCESS_KERNEL_CODE: u8 = 0x9b;
const ACCESS_KERNEL_DATA: u8 = 0x93;
const ACCESS_USER_CODE: u8 = 0xfb;
const ACCESS_USER_DATA: u8 = 0xf3;
// Flags nibble: G | D/B | L | AVL.
const FLAGS_CODE64: u8 = 0xa;
const FLAGS_CODE32: u8 = 0xc;
const FLAGS_DATA: u8 = 0xc;
/// Busy 64-bit TSS: TR is loaded as if by `ltr`.
const TSS_TYPE_BUSY: u8 = 0xb;

/// GDT bytes (`GDT_ENTRIES * 8`) with a TSS descriptor for `tss`.
pub fn gdt(tss: Gpa) -> Vec<u8> {
    let mut e = [0u64; GDT_ENTRIES];
    let mut set = |sel: u16, d: u64| e[usize::from(sel >> 3)] = d;
    // Only the user segments and the TSS are used; the kernel ones make the
    // table look like Linux's to a hypervisor that reads it.
    set(
        selector::KERNEL_CS32,
        descriptor(ACCESS_KERNEL_CODE, FLAGS_CODE32),
    );
    set(
        selector::KERNEL_CS,
        descriptor(ACCESS_KERNEL_CODE, FLAGS_CODE64),
    );
    set(
        selector::KERNEL_DS,
        descriptor(ACCESS_KERNEL_DATA, FLAGS_DATA),
    );
    set(
        selector::USER_CS32,
        descriptor(ACCESS_USER_CODE, FLAGS_CODE32),
    );
    set(selector::USER_DS, descriptor(ACCESS_USER_DATA, FLAGS_DATA));
    set(
        selector::USER_CS,
        descriptor(ACCESS_USER_CODE, FLAGS_CODE64),
    );
    let (base, limit) = (tss.0, TSS_LEN as u64 - 1);
    set(
        selector::TSS,
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (u64::from(0x80 | TSS_TYPE_BUSY) << 40)
            | (((base >> 24) & 0xff) << 56),
    );
    set(selector::TSS + 8, base >> 32);
    e.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// TSS bytes with an I/O permission bitmap that allows only the workload's
/// ports and COM1. IOPL 3 alone is not enough: PVM (nested KVM) does not
/// keep IOPL in the hardware RFLAGS, so after the first exit the guest's
/// `out` is checked against this bitmap instead. On bare-metal VMX IOPL 3
/// allows the ports and the bitmap is not consulted.
pub fn tss() -> Vec<u8> {
    let mut t = vec![0u8; TSS_LEN];
    t[102..104].copy_from_slice(&(TSS_BASE_LEN as u16).to_le_bytes());
    // 1 = denied; then clear the bits of the allowed ports.
    t[TSS_BASE_LEN..].fill(0xff);
    for port in IO_ALLOWED.into_iter().flatten() {
        t[TSS_BASE_LEN + port / 8] &= !(1 << (port % 8));
    }
    t
}

/// Whether the TSS from [`tss`] lets ring 3 use `port`.
#[cfg(test)]
fn tss_allows(tss: &[u8], port: u16) -> bool {
    let base = usize::from(u16::from_le_bytes([tss[102], tss[103]]));
    let byte = base + usize::from(port) / 8;
    byte < tss.len() - 1 && tss[byte] & (1 << (port % 8)) == 0
}

/// The `kvm_segment` a selector of our GDT describes, decoded from the same
/// descriptor bytes the guest sees, so the two can never disagree.
pub fn segment(gdt: &[u8], sel: u16) -> kvm_segment {
    let i = usize::from(sel >> 3);
    let d = u64::from_le_bytes(gdt[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let access = (d >> 40) as u8;
    let flags = ((d >> 52) & 0xf) as u8;
    let mut base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    let system = access & 0x10 == 0;
    if system {
        // 16-byte system descriptor: the next entry holds base[63:32].
        let hi = u64::from_le_bytes(gdt[i * 8 + 8..i * 8 + 16].try_into().unwrap_or([0; 8]));
        base |= (hi & 0xffff_ffff) << 32;
    }
    let raw_limit = (d & 0xffff) | (((d >> 48) & 0xf) << 16);
    let g = flags & 0x8 != 0;
    let limit = if g {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: sel,
        type_: access & 0xf,
        present: (access >> 7) & 1,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: u8::from(!system),
        l: (flags >> 1) & 1,
        g: u8::from(g),
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

/// CR0: PE | MP | ET | NE | WP | PG.
pub const CR0: u64 = 0x8001_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT (no TSD: `rdtsc` must work in ring 3).
pub const CR4: u64 = 0x620;
/// EFER: LME | LMA.
pub const EFER: u64 = 0x500;
/// RFLAGS: IOPL 3 (ring-3 `in`/`out`), IF = 0, reserved bit 1.
pub const RFLAGS: u64 = 0x3002;

/// Special registers for 64-bit ring 3 with our GDT, TSS and page tables.
/// Fields we don't own (APIC base, CR8, pending interrupts) come from `base`,
/// the vCPU's own `KVM_GET_SREGS`.
pub fn sregs(base: &kvm_sregs, gdt_gpa: Gpa, gdt_bytes: &[u8], pml4: Gpa) -> kvm_sregs {
    let mut s = *base;
    s.cs = segment(gdt_bytes, selector::USER_CS);
    let data = segment(gdt_bytes, selector::USER_DS);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(gdt_bytes, selector::TSS);
    // No LDT (PVM refuses a non-null LDT selector).
    s.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: gdt_gpa.0,
        limit: (gdt_bytes.len() - 1) as u16,
        ..Default::default()
    };
    // No IDT: any exception escalates to a triple fault (KVM_EXIT_SHUTDOWN).
    s.idt = kvm_dtable::default();
    s.cr0 = CR0;
    s.cr3 = pml4.0;
    s.cr4 = CR4;
    s.efer = EFER;
    s
}

/// FPU state with the architectural reset control words.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_decode_as_long_mode_ring3() {
        let g = gdt(Gpa(0x1_2345_6000));
        let cs = segment(&g, selector::USER_CS);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.s, cs.present), (1, 0, 3, 1, 1));
        assert_eq!(cs.type_, 0xb);
        let ds = segment(&g, selector::USER_DS);
        assert_eq!((ds.l, ds.db, ds.dpl, ds.type_, ds.g), (0, 1, 3, 3, 1));
        assert_eq!(ds.limit, 0xffff_ffff);
        let tr = segment(&g, selector::TSS);
        assert_eq!(tr.base, 0x1_2345_6000);
        assert_eq!(tr.limit, TSS_LEN as u32 - 1);
        assert_eq!((tr.type_, tr.s, tr.present, tr.g), (TSS_TYPE_BUSY, 0, 1, 0));
        let kcs = segment(&g, selector::KERNEL_CS);
        assert_eq!((kcs.l, kcs.dpl), (1, 0));
        assert_eq!(segment(&g, selector::KERNEL_DS).dpl, 0);
    }

    #[test]
    fn tss_io_bitmap_allows_only_our_ports() {
        let t = tss();
        assert_eq!(t.len(), TSS_LEN);
        assert_eq!(*t.last().unwrap(), 0xff);
        for port in [0x3f8, 0x3ff, 0x7000, 0x70ff, 0x7100, 0x7200, 0x72ff, 0x7300] {
            assert!(tss_allows(&t, port), "{port:#x}");
        }
        for port in [0u16, 0x20, 0x3f7, 0x400, 0x6fff, 0x7400, 0xcf8, 0xffff] {
            assert!(!tss_allows(&t, port), "{port:#x}");
        }
    }
}
