#!/bin/sh
# check_elf.sh - static sanity checks of pyxen-guest images (make -C guest check).
#
# For each ELF: entry == _start, exactly one PT_NOTE, every PT_LOAD in the
# -2 GiB range with p_paddr == p_vaddr, all ten Xen notes present,
# hypercall_page page-aligned, 4096 bytes and named by the HYPERCALL_PAGE
# note, and no instruction a ring-3 PV kernel must never execute.
set -u
VIRT_BASE=ffffffff80000000
status=0

fail() { echo "FAIL $f: $*"; status=1; }

for f in "$@"; do
    entry=$(readelf -h "$f" | awk '/Entry point/ {print $4}' | sed 's/^0x//')
    start=$(nm "$f" | awk '$3 == "_start" {print $1}')
    [ "$entry" = "$start" ] || fail "entry 0x$entry != _start 0x$start"

    nnote=$(readelf -lW "$f" | grep -c '^ *NOTE ')
    [ "$nnote" = 1 ] || fail "$nnote PT_NOTE headers (want 1)"

    readelf -lW "$f" | awk '$1 == "LOAD" {print $3, $4}' | while read -r va pa; do
        case "$va" in 0xffffffff8*) ;; *) echo "FAIL $f: PT_LOAD at $va"; exit 1;; esac
        [ "$va" = "$pa" ] || { echo "FAIL $f: PT_LOAD p_paddr $pa != p_vaddr $va"; exit 1; }
    done || status=1

    # Xen note types 1-10 (elfnote.h), all owned by "Xen".
    n=$(readelf -nW "$f" | awk '$1 == "Xen"' | wc -l)
    [ "$n" = 10 ] || fail "$n Xen notes (want 10)"

    hp=$(nm -S "$f" | awk '$4 == "hypercall_page" {print $1, $2}')
    set -- $hp
    case "$1" in *000) ;; *) fail "hypercall_page 0x$1 not page-aligned";; esac
    [ "$2" = "0000000000001000" ] || fail "hypercall_page size 0x$2"
    # HYPERCALL_PAGE note (type 2) must hold the symbol's address (LE quad).
    le=$(echo "$1" | sed 's/\(..\)/\1 /g' | awk '{for (i = NF; i > 0; i--) printf "%s%s", $i, (i > 1 ? " " : "")}')
    readelf -nW "$f" | grep -q "description data: $le" ||
        fail "HYPERCALL_PAGE note does not name hypercall_page ($le)"

    # sh arithmetic is signed 64-bit: add the page size to the low half only.
    hp_hi=$(echo "$1" | cut -c1-8)
    hp_lo=$(echo "$1" | cut -c9-16)
    hp_end=$hp_hi$(printf '%08x' $((0x$hp_lo + 0x1000)))
    bad=$( (objdump -d --no-show-raw-insn --stop-address=0x$1 "$f";
            objdump -d --no-show-raw-insn --start-address=0x$hp_end "$f") |
           grep -E '^ *ffffffff[0-9a-f]+:' |
           grep -E '[[:space:]](int|int3|syscall|sysenter|cli|sti|hlt|lgdt|lidt|invlpg|wrmsr|rdmsr|iretq|in|out)([[:space:]]|$)|%cr[0-9]|%xmm|%ymm|%st' )
    # Conformance tests of Xen's emulation execute these on purpose (the
    # hypervisor must emulate or fault them as Xen does): PRIV_OK names them.
    case " ${PRIV_OK:-} " in *" $(basename "$f") "*) bad="";; esac
    [ -z "$bad" ] || fail "forbidden instructions:
$bad"

    [ $status = 0 ] && echo "ok   $f (entry 0x$entry, hypercall_page 0x$1)"
done
exit $status
