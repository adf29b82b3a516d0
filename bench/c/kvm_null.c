/*
 * kvm_null: the C baselines of pyxen's hypercall and domain-creation benchmarks.
 *
 * A minimal hypervisor written directly against /dev/kvm.  The guest is a flat
 * 64-bit machine built by hand: page tables identity-mapping the RAM with
 * user-accessible 2 MiB pages, a GDT with ring-0 and ring-3 descriptors, a TSS
 * whose I/O permission bitmap opens exactly one port (0xF0; IOPL stays 0),
 * and guest code running at CPL3, which is where pyxen's PV guest kernels run.
 *
 *   kvm_null loop N      the guest runs N times "mov $17,%eax; out %al,$0xF0";
 *                        the host handles every exit like a minimal hypervisor:
 *                        KVM_RUN, check the exit reason, port and direction,
 *                        read eax and write a result into rax, both through
 *                        KVM_CAP_SYNC_REGS (kvm_run->s.regs, kvm_dirty_regs),
 *                        as pyxen does.  Prints the cost of one round trip.
 *   kvm_null create N    N times: open /dev/kvm, KVM_CREATE_VM, a 16 MiB memfd
 *                        memory slot, page tables/GDT/TSS/code, one vCPU, and
 *                        KVM_RUN up to the guest's first exit.  Prints every
 *                        sample and the median.
 *
 * Output is one machine-readable line ("kvm_null: key=value ...").
 * Build: cc -O2 -o kvm_null kvm_null.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE   (16UL << 20)
#define PML4       0x1000
#define PDPT       0x2000
#define PD         0x3000
#define GDT        0x500
#define TSS        0x4000
#define TSS_LIMIT  (104 + 8192)  /* header + I/O bitmap; the byte after it is 0xff */
#define CODE       0x100000
#define STACK3     0x200000

#define SEL_KCODE  0x08
#define SEL_UCODE  0x1b
#define SEL_UDATA  0x23
#define SEL_TSS    0x28

#define HCALL_PORT 0xF0
#define HCALL_NR   17

struct machine {
    int kvm, vm, vcpu, memfd;
    uint8_t *mem;
    struct kvm_run *run;
    size_t run_size;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void put64(uint8_t *mem, uint64_t gpa, uint64_t v) { memcpy(mem + gpa, &v, 8); }

static struct kvm_segment segment(uint16_t sel, int code, int dpl)
{
    struct kvm_segment s = {
        .base = 0, .limit = 0xffffffff, .selector = sel, .present = 1, .dpl = dpl,
        .s = 1, .g = 1, .type = code ? 11 : 3, .l = code ? 1 : 0, .db = code ? 0 : 1,
    };
    return s;
}

/* Build the whole machine with `code` at CODE (CPL3), ready for KVM_RUN. */
static void build(struct machine *m, const uint8_t *code, size_t code_len)
{
    m->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (m->kvm < 0) die("/dev/kvm");
    m->vm = ioctl(m->kvm, KVM_CREATE_VM, 0);
    if (m->vm < 0) die("KVM_CREATE_VM");
    m->memfd = memfd_create("kvm_null-ram", MFD_CLOEXEC);
    if (m->memfd < 0 || ftruncate(m->memfd, MEM_SIZE)) die("memfd");
    m->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m->memfd, 0);
    if (m->mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region slot = { .slot = 0, .guest_phys_addr = 0,
        .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)m->mem };
    if (ioctl(m->vm, KVM_SET_USER_MEMORY_REGION, &slot)) die("KVM_SET_USER_MEMORY_REGION");

    uint8_t *mem = m->mem;
    /* Identity map of the RAM in user-accessible 2 MiB pages. */
    put64(mem, PML4, PDPT | 7);
    put64(mem, PDPT, PD | 7);
    for (uint64_t i = 0; i < MEM_SIZE >> 21; i++) put64(mem, PD + i * 8, (i << 21) | 0x87);

    uint64_t gdt[7] = { 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00affb000000ffff,
                        0x00cff3000000ffff, 0, 0 };
    gdt[5] = (TSS_LIMIT & 0xffff) | ((uint64_t)(TSS & 0xffffff) << 16) | (0x89ULL << 40) |
             ((uint64_t)(TSS_LIMIT >> 16) << 48);
    memcpy(mem + GDT, gdt, sizeof gdt);
    uint16_t iomap = 104;
    memcpy(mem + TSS + 102, &iomap, 2);
    memset(mem + TSS + 104, 0xff, 8192 + 1);                    /* every port refused ... */
    mem[TSS + 104 + HCALL_PORT / 8] &= (uint8_t)~(1u << (HCALL_PORT % 8)); /* ... but one */
    memcpy(mem + CODE, code, code_len);

    m->vcpu = ioctl(m->vm, KVM_CREATE_VCPU, 0);
    if (m->vcpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(m->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size <= 0) die("KVM_GET_VCPU_MMAP_SIZE");
    m->run_size = (size_t)size;
    m->run = mmap(NULL, m->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, m->vcpu, 0);
    if (m->run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs s;
    if (ioctl(m->vcpu, KVM_GET_SREGS, &s)) die("KVM_GET_SREGS");
    s.cs = segment(SEL_UCODE, 1, 3);
    s.ds = s.es = s.fs = s.gs = s.ss = segment(SEL_UDATA, 0, 3);
    s.tr = (struct kvm_segment){ .base = TSS, .limit = TSS_LIMIT, .selector = SEL_TSS,
                                 .type = 11, .present = 1 };
    s.gdt.base = GDT; s.gdt.limit = sizeof gdt - 1;
    s.idt.base = 0; s.idt.limit = 0;
    s.cr0 = 0x80050033; s.cr3 = PML4; s.cr4 = 0x20; s.efer = 0x500;   /* LME|LMA */
    if (ioctl(m->vcpu, KVM_SET_SREGS, &s)) die("KVM_SET_SREGS");
    struct kvm_regs r = { .rip = CODE, .rsp = STACK3, .rflags = 0x2 };
    if (ioctl(m->vcpu, KVM_SET_REGS, &r)) die("KVM_SET_REGS");
}

static void teardown(struct machine *m)
{
    munmap(m->run, m->run_size);
    munmap(m->mem, MEM_SIZE);
    close(m->vcpu);
    close(m->memfd);
    close(m->vm);
    close(m->kvm);
}

static int sync_regs_supported(int kvm)
{
    int caps = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
    return caps > 0 && (caps & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)) ==
                       (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS);
}

static int bench_loop(long n)
{
    /*     movabs $n,%rcx; xor %ebx,%ebx
     * 1:  mov $17,%eax; out %al,$0xF0; add %rax,%rbx; dec %rcx; jnz 1b
     *     xor %eax,%eax; out %al,$0xF0            (eax 0: "done")
     *     jmp .                                    */
    uint8_t code[] = { 0x48, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, 0x31, 0xdb,
                       0xb8, HCALL_NR, 0, 0, 0, 0xe6, HCALL_PORT, 0x48, 0x01, 0xc3,
                       0x48, 0xff, 0xc9, 0x75, 0xf1,
                       0x31, 0xc0, 0xe6, HCALL_PORT, 0xeb, 0xfe };
    memcpy(code + 2, &n, 8);
    struct machine m;
    build(&m, code, sizeof code);
    if (!sync_regs_supported(m.kvm)) { fprintf(stderr, "KVM_CAP_SYNC_REGS missing\n"); return 1; }
    struct kvm_run *run = m.run;
    run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;   /* like pyxen */

    /* One exit before timing, so that first-touch faults are not counted. */
    long calls = 0;
    uint64_t t0 = 0;
    for (;;) {
        run->kvm_dirty_regs = calls ? KVM_SYNC_X86_REGS : 0;
        if (ioctl(m.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
            run->io.port != HCALL_PORT || (run->s.regs.sregs.cs.selector & 3) != 3) {
            fprintf(stderr, "kvm_null: unexpected exit %u (port %#x) after %ld calls\n",
                    run->exit_reason, run->io.port, calls);
            return 1;
        }
        uint64_t nr = run->s.regs.regs.rax & 0xffffffff;
        if (nr == 0) break;
        if (nr != HCALL_NR) { fprintf(stderr, "kvm_null: bad call %lu\n", (unsigned long)nr); return 1; }
        run->s.regs.regs.rax = nr + 1;                                  /* the "result" */
        if (++calls == 1) t0 = now_ns();
    }
    uint64_t ns = now_ns() - t0;
    uint64_t expect = (uint64_t)n * (HCALL_NR + 1);
    if (run->s.regs.regs.rbx != expect) {
        fprintf(stderr, "kvm_null: guest saw wrong results (%llu, expected %llu)\n",
                (unsigned long long)run->s.regs.regs.rbx, (unsigned long long)expect);
        return 1;
    }
    /* Timed: the KVM_RUNs from the end of call 1 up to the "done" exit, i.e. n round trips. */
    printf("kvm_null: mode=loop n=%ld ns=%llu per_call_ns=%.1f\n", calls,
           (unsigned long long)ns, calls > 0 ? (double)ns / calls : 0.0);
    teardown(&m);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int bench_create(int n)
{
    static const uint8_t code[] = { 0xe6, HCALL_PORT, 0xeb, 0xfe };   /* out %al,$0xF0; jmp . */
    uint64_t *samples = calloc((size_t)n, sizeof *samples);
    if (!samples) die("calloc");
    for (int i = 0; i < n; i++) {
        struct machine m;
        uint64_t t0 = now_ns();
        build(&m, code, sizeof code);
        if (ioctl(m.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        samples[i] = now_ns() - t0;
        if (m.run->exit_reason != KVM_EXIT_IO || m.run->io.port != HCALL_PORT) {
            fprintf(stderr, "kvm_null: unexpected first exit %u\n", m.run->exit_reason);
            return 1;
        }
        teardown(&m);
    }
    printf("kvm_null: mode=create samples=");
    for (int i = 0; i < n; i++) printf("%s%llu", i ? "," : "", (unsigned long long)samples[i]);
    qsort(samples, (size_t)n, sizeof *samples, cmp_u64);
    uint64_t median = n % 2 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2;
    printf(" median_ns=%llu min_ns=%llu\n", (unsigned long long)median,
           (unsigned long long)samples[0]);
    free(samples);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "loop")) return bench_loop(atol(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "create")) return bench_create(atoi(argv[2]));
    fprintf(stderr, "usage: kvm_null loop N | kvm_null create N\n");
    return 2;
}
