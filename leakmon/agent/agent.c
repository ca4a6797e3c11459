/*
 * leakmon's in-process sampling agent.
 *
 * Loaded into a process (LD_PRELOAD at start, or dlopen driven through ptrace in a
 * running one), it redirects the allocator entry points every loaded object calls
 * through its GOT to the hooks below. Each hook runs the real allocator, then takes
 * the same byte-weighted sampling decision as leakmon's kernel side (the tables come
 * from leakmon-common, generated into sampling_tables.h). Only a sampled block, and
 * later its free, call a marker function on which leakmon has a uprobe: the kernel
 * pays for samples only, and walks the stack and keeps the tables as in exact mode.
 *
 * Allocators called directly, with no GOT in between (a statically linked program, a
 * jemalloc built into the executable), get inline hooks: leakmon writes a jump to one
 * of the LEAKMON_INLINE_SLOTS hooks at the function's entry (see inline.rs).
 *
 * Built twice: as a shared library for glibc's loader, and freestanding
 * (LEAKMON_AGENT_FREESTANDING: no C library, no TLS, no relocations) for programs
 * without a loader, which leakmon maps and fills in itself.
 *
 * Rules this file keeps, because it runs inside somebody else's process:
 *  - it never allocates through the allocator it wraps (its tables are mmap'd);
 *  - its thread-local state is initial-exec TLS, which needs no allocation (a dlopened
 *    library's dynamic TLS is allocated with malloc on first use), or, freestanding, a
 *    lock-free table keyed by the thread pointer;
 *  - a hook entered again from inside the real allocator (operator new calling malloc,
 *    strdup calling malloc) passes straight through: one block is counted once, at
 *    the outermost call, as the uprobes count it;
 *  - stopping restores every redirected slot; the code stays mapped, since a thread
 *    may still be inside a hook.
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#ifndef LEAKMON_AGENT_FREESTANDING
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#endif

#include "agent_abi.h"
#include "sampling_tables.h"

#ifdef LEAKMON_AGENT_FREESTANDING
/* Nothing is looked up through a dynamic table: leakmon reads the symbol table. */
#define EXPORT
#else
#define EXPORT __attribute__((visibility("default")))
#define TLS __thread __attribute__((tls_model("initial-exec")))
#endif
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ---- markers: the probe sites ------------------------------------------------ */

/*
 * A one-byte NOP first, then ret. Not the 5-byte NOP that a kernel with optimized
 * uprobes (6.18) turns into a call to a trampoline page of the process: that page is
 * not copied into a child forked from any thread but the main one, whose first sample
 * then jumps to nothing (SIGSEGV). A trap at a NOP is emulated; measured against the
 * call with cargo xtask bench --python-only, no difference showed. Written in assembly
 * so that no compiler puts anything before the NOP, with call frame information for
 * the kernel's unwinder. Its frame 0 is the marker's own address, which unwinders
 * (taking every frame for a return address) look up one byte early: the int3 before
 * each marker, never executed, is there so that byte has the marker's frame rule too.
 */
#define MARKER(name)                                     \
    ".globl " #name "\n"                                 \
    ".type " #name ", @function\n"                       \
    ".cfi_startproc\n"                                   \
    "  int3\n"                                           \
    #name ":\n"                                          \
    "  nop\n"                                            \
    "  ret\n"                                            \
    ".cfi_endproc\n"                                     \
    ".size " #name ", .-" #name "\n"
__asm__(".text\n" MARKER(leakmon_agent_sampled_alloc) MARKER(leakmon_agent_sampled_free));

/* (block, bytes it stands for, the interval it was sampled at: leakmon's pace may
 * change the interval while blocks sampled at the old one live on) */
EXPORT void leakmon_agent_sampled_alloc(void *block, uint64_t weight, uint64_t rate);
/* (block) */
EXPORT void leakmon_agent_sampled_free(void *block);

/* ---- sampling (the same arithmetic as leakmon_common::sampling) ----------------- */

EXPORT uint64_t leakmon_agent_countdown(uint32_t random, uint64_t rate) {
    uint64_t ln = LEAKMON_NEG_LN[random & 1023];
    uint64_t v = (rate * ln) >> 16;
    return v == 0 ? 1 : v;
}

EXPORT uint64_t leakmon_agent_weight(uint64_t size, uint64_t rate) {
    if (rate == 0 || size >= 16 * rate)
        return size;
    if (size < rate)
        return rate + size / 2 + size * size / (12 * rate);
    uint64_t scaled = size * 16;
    uint64_t i = scaled / rate;
    uint64_t rem = scaled % rate;
    uint64_t lo = LEAKMON_INV_P[i - 16];
    uint64_t hi = i - 15 < LEAKMON_INV_P_LEN ? LEAKMON_INV_P[i - 15] : 65536;
    uint64_t drop = lo > hi ? lo - hi : 0;
    uint64_t factor = lo - drop * rem / rate;
    return (size * factor) >> 16;
}

/* The sampling interval in bytes; 0 while stopped (hooks then pass through). Only
 * below 2^32 (LEAKMON_MAX_RATE): leakmon, pacing the samples, writes it from outside
 * while threads read it, and a torn write could not make a value of two halves. */
static volatile uint64_t rate;

/* Blocks sampled since the start: leakmon reads it to measure the process's
 * allocation rate (each sample stands for about one interval of allocated bytes). */
EXPORT volatile uint64_t leakmon_agent_samples __attribute__((aligned(64)));
/* Time-stamp-counter cycles spent in the markers (each a trap in which the kernel
 * walks the stack: what a sample and its free cost the thread), for leakmon's pace.
 * Both counters on cache lines of their own: every hook of every thread reads the
 * interval, whose line the samples' writes must not keep taking away from them. */
EXPORT volatile uint64_t leakmon_agent_sample_cycles __attribute__((aligned(64)));

static inline uint64_t cycles(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t mix(uintptr_t p) {
    return (uint64_t)(p >> 4) * 0x9e3779b97f4a7c15ull;
}

struct thread_state {
    uint64_t left; /* bytes to the next sample; 0: draw a new countdown */
    uint64_t rng;  /* xorshift64* state; 0: not seeded yet */
    uint32_t busy; /* inside a hook: nested hooks pass through */
};

#ifdef LEAKMON_AGENT_FREESTANDING
/*
 * Without a dynamic loader there is no TLS of the agent's own. Each thread's state is
 * found in a table by its thread pointer (%fs:0 holds it, as the x86-64 TLS ABI asks),
 * claimed on first use without a lock; threads past its capacity share one state,
 * which only makes their samples a little less independent. By the time a program
 * calls its allocator its thread pointer is set: the allocator itself uses TLS.
 */
#define THREAD_SLOTS (1u << THREAD_BITS)
struct thread_slot {
    uintptr_t key;
    struct thread_state state;
};
_Static_assert(sizeof(struct thread_slot) == THREAD_SLOT_BYTES, "leakmon maps the thread table");
/*
 * The tables, the interval: leakmon fills these in itself (it maps the tables for the
 * agent), so that loading needs no call into the process.
 */
/* Not static: nothing in this file writes them in the freestanding build. */
struct thread_slot *threads;
static struct thread_state crowd;
EXPORT volatile uint64_t leakmon_agent_threads_full;

static inline struct thread_state *me(void) {
    uintptr_t tp;
    __asm__("mov %%fs:0, %0" : "=r"(tp));
    uint64_t h = mix(tp) >> (64 - THREAD_BITS);
    for (unsigned i = 0; i < 16; i++) {
        struct thread_slot *slot = &threads[(h + i) & (THREAD_SLOTS - 1)];
        uintptr_t key = __atomic_load_n(&slot->key, __ATOMIC_RELAXED);
        if (LIKELY(key == tp))
            return &slot->state;
        if (key == 0 && __atomic_compare_exchange_n(&slot->key, &key, tp, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return &slot->state;
    }
    __atomic_fetch_add(&leakmon_agent_threads_full, 1, __ATOMIC_RELAXED);
    return &crowd;
}
#else
static TLS struct thread_state ts;
static inline struct thread_state *me(void) {
    return &ts;
}
#endif

static uint32_t next_random(struct thread_state *t) {
    if (UNLIKELY(t->rng == 0)) {
        uint32_t lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        t->rng = (((uint64_t)hi << 32) | lo) ^ (uint64_t)(uintptr_t)t ^ 0x9e3779b97f4a7c15ull;
        if (t->rng == 0)
            t->rng = 1;
    }
    uint64_t x = t->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t->rng = x;
    return (uint32_t)((x * 0x2545f4914f6cdd1dull) >> 32);
}

/* The bytes a block of `size` stands for if it is sampled, else 0. */
static inline uint64_t charge(struct thread_state *t, uint64_t size, uint64_t r) {
    if (UNLIKELY(t->left == 0))
        t->left = leakmon_agent_countdown(next_random(t), r);
    if (LIKELY(size < t->left)) {
        t->left -= size;
        return 0;
    }
    t->left = leakmon_agent_countdown(next_random(t), r);
    return leakmon_agent_weight(size, r);
}

/* ---- sampled blocks: which frees leakmon must hear of -------------------------- */

/*
 * An open-addressing set of sampled addresses, and in front of it a counting filter
 * small enough to stay in cache, so that a free of an unsampled block (nearly all of
 * them) costs one load of a byte. Both mmap'd.
 */
#define SET_SLOTS (1u << SET_BITS)
#define PROBES 64
#define TOMBSTONE ((uintptr_t)1)

/* Not static: in the freestanding build only leakmon writes them. */
uintptr_t *set;
uint8_t *filter;

static inline uint8_t *filter_slot(uintptr_t p) {
    return &filter[mix(p) & (FILTER_SLOTS - 1)];
}

/* Whether `p` may be in the set (never false for one that is): one load of a byte. */
static inline int maybe_sampled(uintptr_t p) {
    return __atomic_load_n(filter_slot(p), __ATOMIC_RELAXED) != 0;
}
EXPORT volatile uint64_t leakmon_agent_set_full;

static int set_insert(uintptr_t p) {
    uint64_t h = mix(p) >> (64 - SET_BITS);
    for (unsigned i = 0; i < PROBES; i++) {
        uintptr_t *slot = &set[(h + i) & (SET_SLOTS - 1)];
        uintptr_t seen = __atomic_load_n(slot, __ATOMIC_RELAXED);
        if (seen != 0 && seen != TOMBSTONE)
            continue;
        if (__atomic_compare_exchange_n(slot, &seen, p, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            uint8_t *f = filter_slot(p);
            /* Saturates: a filter slot at 255 stays "maybe" for good. */
            uint8_t c = __atomic_load_n(f, __ATOMIC_RELAXED);
            while (c != 255 && !__atomic_compare_exchange_n(f, &c, c + 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
            return 1;
        }
    }
    __atomic_fetch_add(&leakmon_agent_set_full, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Takes `p` out of the set; whether it was there. */
static inline int set_remove(uintptr_t p) {
    uint8_t *f = filter_slot(p);
    if (LIKELY(__atomic_load_n(f, __ATOMIC_RELAXED) == 0))
        return 0;
    uint64_t h = mix(p) >> (64 - SET_BITS);
    for (unsigned i = 0; i < PROBES; i++) {
        uintptr_t *slot = &set[(h + i) & (SET_SLOTS - 1)];
        uintptr_t seen = __atomic_load_n(slot, __ATOMIC_RELAXED);
        if (seen == 0)
            return 0;
        if (seen == p) {
            if (!__atomic_compare_exchange_n(slot, &seen, TOMBSTONE, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                return 0;
            uint8_t c = __atomic_load_n(f, __ATOMIC_RELAXED);
            while (c != 255 && c != 0 && !__atomic_compare_exchange_n(f, &c, c - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
            return 1;
        }
    }
    return 0;
}

#ifndef LEAKMON_AGENT_FREESTANDING
static void python_wrap_pending(void);
#endif

static __attribute__((noinline)) void sampled_slow(struct thread_state *t, uintptr_t block, uint64_t size,
                                                   uint64_t r) {
    uint64_t weight = charge(t, size, r);
    if (LIKELY(weight == 0) || block == 0)
        return;
#ifndef LEAKMON_AGENT_FREESTANDING
    python_wrap_pending();
#endif
    if (set_insert(block)) {
        __atomic_fetch_add(&leakmon_agent_samples, 1, __ATOMIC_RELAXED);
        uint64_t start = cycles();
        leakmon_agent_sampled_alloc((void *)block, weight, r);
        __atomic_fetch_add(&leakmon_agent_sample_cycles, cycles() - start, __ATOMIC_RELAXED);
    }
}

/* The countdown's common case inline in every hook (a call there cost a Python object
 * allocation a tenth of its time); the rest, charge's own path included, out of line. */
static inline __attribute__((always_inline)) void sampled(struct thread_state *t, uintptr_t block, uint64_t size,
                                                          uint64_t r) {
    if (LIKELY(size < t->left)) {
        t->left -= size;
        return;
    }
    sampled_slow(t, block, size, r);
}

static inline void released(uintptr_t block) {
    if (block != 0 && set_remove(block)) {
        uint64_t start = cycles();
        leakmon_agent_sampled_free((void *)block);
        __atomic_fetch_add(&leakmon_agent_sample_cycles, cycles() - start, __ATOMIC_RELAXED);
    }
}

/* ---- hooks --------------------------------------------------------------------- */

/* The kinds leakmon names for inline hooks come from agent_abi.h; this one is ours. */
#define K_DLOPEN 100

typedef uintptr_t (*entry_fn)(uintptr_t, uintptr_t, uintptr_t, uintptr_t);

static inline uint64_t product(uint64_t a, uint64_t b) {
    uint64_t p;
    return __builtin_mul_overflow(a, b, &p) ? UINT64_MAX : p;
}

static inline uint64_t length(const char *s) {
    uint64_t n = 0;
    while (s[n] != 0)
        n++;
    return n;
}

#ifndef LEAKMON_AGENT_FREESTANDING
static void patch_all(void);
#endif

/*
 * One body for every hook (inlined into each): `fn` is the real function, and the
 * arguments are passed on untouched, as four integer registers, which is what each of
 * these functions takes at most.
 */
static inline __attribute__((always_inline)) uintptr_t
hook(entry_fn fn, int kind, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d) {
    uint64_t r = rate;
#ifndef LEAKMON_AGENT_FREESTANDING
    if (kind == K_DLOPEN) {
        uintptr_t handle = fn(a, b, c, d);
        /* Objects it brought in call the allocator through GOTs of their own. */
        if (handle != 0 && r != 0)
            patch_all();
        return handle;
    }
#endif
    if (r == 0)
        return fn(a, b, c, d);
    struct thread_state *t = me();
    if (t->busy)
        return fn(a, b, c, d);
    t->busy = 1;
    uintptr_t ret;
    switch (kind) {
    case K_FREE:
        released(a);
        ret = fn(a, b, c, d);
        break;
    case K_REALLOC:
    case K_REALLOCARRAY: {
        uint64_t size = kind == K_REALLOC ? b : product(b, c);
        released(a);
        ret = fn(a, b, c, d);
        if (ret != 0)
            sampled(t, ret, size, r);
        break;
    }
    case K_POSIX_MEMALIGN:
        ret = fn(a, b, c, d);
        if ((int)ret == 0)
            sampled(t, *(uintptr_t *)a, c, r);
        break;
    case K_STRDUP:
        ret = fn(a, b, c, d);
        if (ret != 0)
            sampled(t, ret, length((const char *)ret) + 1, r);
        break;
    case K_CALLOC:
        ret = fn(a, b, c, d);
        sampled(t, ret, product(a, b), r);
        break;
    case K_MEMALIGN:
        ret = fn(a, b, c, d);
        sampled(t, ret, b, r);
        break;
    default:
        ret = fn(a, b, c, d);
        sampled(t, ret, a, r);
        break;
    }
    t->busy = 0;
    return ret;
}

/*
 * Inline hooks, for allocators called directly (no GOT entry between caller and
 * callee: a statically linked program, a jemalloc built into the executable). leakmon
 * writes, for each hooked function, a trampoline that runs its relocated first
 * instructions and jumps to the rest, fills in the slot's real function and kind, and
 * only then puts a jump to the slot's hook at the function's entry.
 */
EXPORT entry_fn leakmon_agent_inline_real[LEAKMON_INLINE_SLOTS];
EXPORT uint32_t leakmon_agent_inline_kind[LEAKMON_INLINE_SLOTS];

#define INLINE_HOOK(k)                                                                               \
    EXPORT __attribute__((noinline)) uintptr_t leakmon_agent_inline_##k(uintptr_t a, uintptr_t b,    \
                                                                        uintptr_t c, uintptr_t d) {  \
        return hook(leakmon_agent_inline_real[k], (int)leakmon_agent_inline_kind[k], a, b, c, d);      \
    }
/* LEAKMON_INLINE_SLOTS of them: */
INLINE_HOOK(0) INLINE_HOOK(1) INLINE_HOOK(2) INLINE_HOOK(3) INLINE_HOOK(4) INLINE_HOOK(5) INLINE_HOOK(6) INLINE_HOOK(7)
INLINE_HOOK(8) INLINE_HOOK(9) INLINE_HOOK(10) INLINE_HOOK(11) INLINE_HOOK(12) INLINE_HOOK(13) INLINE_HOOK(14) INLINE_HOOK(15)
INLINE_HOOK(16) INLINE_HOOK(17) INLINE_HOOK(18) INLINE_HOOK(19) INLINE_HOOK(20) INLINE_HOOK(21) INLINE_HOOK(22) INLINE_HOOK(23)
INLINE_HOOK(24) INLINE_HOOK(25) INLINE_HOOK(26) INLINE_HOOK(27) INLINE_HOOK(28) INLINE_HOOK(29) INLINE_HOOK(30) INLINE_HOOK(31)
_Static_assert(LEAKMON_INLINE_SLOTS == 32, "one hook per inline slot");
#ifndef LEAKMON_AGENT_FREESTANDING
/* name, kind: every entry point leakmon's uprobes know, and dlopen. */
#define HOOKS(X)                                                                                    \
    X(malloc, K_MALLOC) X(calloc, K_CALLOC) X(realloc, K_REALLOC) X(reallocarray, K_REALLOCARRAY)   \
    X(free, K_FREE) X(cfree, K_FREE) X(posix_memalign, K_POSIX_MEMALIGN)                             \
    X(aligned_alloc, K_MEMALIGN) X(memalign, K_MEMALIGN) X(valloc, K_MALLOC) X(pvalloc, K_MALLOC)    \
    X(free_sized, K_FREE) X(free_aligned_sized, K_FREE) X(strdup, K_STRDUP) X(strndup, K_STRDUP)     \
    X(_Znwm, K_MALLOC) X(_Znam, K_MALLOC) X(_ZnwmRKSt9nothrow_t, K_MALLOC)                          \
    X(_ZnamRKSt9nothrow_t, K_MALLOC) X(_ZnwmSt11align_val_t, K_MALLOC)                              \
    X(_ZnamSt11align_val_t, K_MALLOC) X(_ZnwmSt11align_val_tRKSt9nothrow_t, K_MALLOC)               \
    X(_ZnamSt11align_val_tRKSt9nothrow_t, K_MALLOC) X(_ZdlPv, K_FREE) X(_ZdaPv, K_FREE)             \
    X(_ZdlPvm, K_FREE) X(_ZdaPvm, K_FREE) X(_ZdlPvRKSt9nothrow_t, K_FREE)                           \
    X(_ZdaPvRKSt9nothrow_t, K_FREE) X(_ZdlPvSt11align_val_t, K_FREE) X(_ZdaPvSt11align_val_t, K_FREE) \
    X(_ZdlPvmSt11align_val_t, K_FREE) X(_ZdaPvmSt11align_val_t, K_FREE)                             \
    X(mallocx, K_MALLOC) X(rallocx, K_REALLOC) X(dallocx, K_FREE) X(sdallocx, K_FREE)               \
    X(je_malloc, K_MALLOC) X(je_calloc, K_CALLOC) X(je_realloc, K_REALLOC) X(je_free, K_FREE)       \
    X(je_posix_memalign, K_POSIX_MEMALIGN) X(je_aligned_alloc, K_MEMALIGN) X(je_mallocx, K_MALLOC)  \
    X(je_rallocx, K_REALLOC) X(je_dallocx, K_FREE) X(je_sdallocx, K_FREE)                           \
    X(tc_malloc, K_MALLOC) X(tc_calloc, K_CALLOC) X(tc_realloc, K_REALLOC) X(tc_free, K_FREE)       \
    X(mi_malloc, K_MALLOC) X(mi_zalloc, K_MALLOC) X(mi_calloc, K_CALLOC) X(mi_realloc, K_REALLOC)   \
    X(mi_free, K_FREE) X(dlopen, K_DLOPEN)

#define ENUM(name, kind) H_##name,
enum { HOOKS(ENUM) N_HOOKS };

/* The real function behind each hook, as the global scope resolves it. */
static entry_fn real[N_HOOKS];

#define DEFINE(name, kind)                                                                        \
    __attribute__((noinline)) static uintptr_t leakmon_agent_hook_##name(uintptr_t a, uintptr_t b, \
                                                                         uintptr_t c, uintptr_t d) { \
        return hook(real[H_##name], kind, a, b, c, d);                                                   \
    }
HOOKS(DEFINE)

struct hook_entry {
    const char *name;
    void *hook;
};
#define ENTRY(name, kind) {#name, (void *)leakmon_agent_hook_##name},
static const struct hook_entry hooks[N_HOOKS] = {HOOKS(ENTRY)};

/* ---- GOT redirection ------------------------------------------------------------ */

/* Every slot redirected, with what it held: stopping writes those values back. */
struct patched {
    uintptr_t *slot;
    uintptr_t original;
    int read_only;
};
#define MAX_PATCHED (1u << 16)
static struct patched *patched;
static unsigned n_patched;
static pthread_mutex_t patch_lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t self_base;

static int is_hook(uintptr_t value) {
    for (int i = 0; i < N_HOOKS; i++)
        if ((uintptr_t)hooks[i].hook == value)
            return 1;
    return 0;
}

/* Writes `value` to `slot`, making a read-only (RELRO) page writable for the store. */
static int store(uintptr_t *slot, uintptr_t value, int read_only) {
    if (!read_only) {
        __atomic_store_n(slot, value, __ATOMIC_RELEASE);
        return 1;
    }
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)slot & ~(uintptr_t)(page - 1);
    if (mprotect((void *)start, (size_t)page, PROT_READ | PROT_WRITE) != 0)
        return 0;
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);
    mprotect((void *)start, (size_t)page, PROT_READ);
    return 1;
}

/* A dynamic-section address: glibc relocates most in place, the vDSO's are not. */
static uintptr_t dyn_ptr(uintptr_t base, uintptr_t value) {
    return value < base ? base + value : value;
}

static void patch_relocations(uintptr_t base, const ElfW(Rela) * rela, size_t size, const ElfW(Sym) * symtab,
                              const char *strtab, uintptr_t relro_start, uintptr_t relro_end) {
    for (size_t i = 0; i < size / sizeof(ElfW(Rela)); i++) {
        unsigned type = ELF64_R_TYPE(rela[i].r_info);
        if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT)
            continue;
        const char *name = strtab + symtab[ELF64_R_SYM(rela[i].r_info)].st_name;
        for (int h = 0; h < N_HOOKS; h++) {
            if (real[h] == NULL || strcmp(name, hooks[h].name) != 0)
                continue;
            uintptr_t *slot = (uintptr_t *)(base + rela[i].r_offset);
            uintptr_t original = *slot;
            if (is_hook(original) || n_patched >= MAX_PATCHED)
                break;
            int read_only = (uintptr_t)slot >= relro_start && (uintptr_t)slot < relro_end;
            if (store(slot, (uintptr_t)hooks[h].hook, read_only)) {
                patched[n_patched].slot = slot;
                patched[n_patched].original = original;
                patched[n_patched].read_only = read_only;
                n_patched++;
            }
            break;
        }
    }
}

static int patch_object(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    (void)data;
    uintptr_t base = info->dlpi_addr;
    if (base == self_base || info->dlpi_name == NULL || strstr(info->dlpi_name, "linux-vdso") != NULL)
        return 0;
    const ElfW(Dyn) *dyn = NULL;
    uintptr_t relro_start = 0, relro_end = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(base + ph->p_vaddr);
        if (ph->p_type == PT_GNU_RELRO) {
            relro_start = base + ph->p_vaddr;
            relro_end = relro_start + ph->p_memsz;
        }
    }
    if (dyn == NULL)
        return 0;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *jmprel = NULL, *rela = NULL;
    size_t jmprel_size = 0, rela_size = 0;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_STRTAB: strtab = (const char *)dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_JMPREL: jmprel = (const ElfW(Rela) *)dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_PLTRELSZ: jmprel_size = dyn->d_un.d_val; break;
        case DT_RELA: rela = (const ElfW(Rela) *)dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_RELASZ: rela_size = dyn->d_un.d_val; break;
        }
    }
    if (symtab == NULL || strtab == NULL)
        return 0;
    if (jmprel != NULL)
        patch_relocations(base, jmprel, jmprel_size, symtab, strtab, relro_start, relro_end);
    if (rela != NULL)
        patch_relocations(base, rela, rela_size, symtab, strtab, relro_start, relro_end);
    return 0;
}

static void patch_all(void) {
    pthread_mutex_lock(&patch_lock);
    if (rate != 0)
        dl_iterate_phdr(patch_object, NULL);
    pthread_mutex_unlock(&patch_lock);
}

/* ---- CPython's allocator domains -------------------------------------------------- */

/*
 * CPython carves its small objects from arenas of its own (pymalloc): no malloc call
 * to hook. Its allocator API, PyMem_GetAllocator and PyMem_SetAllocator (what
 * tracemalloc uses), lets the agent wrap each domain: raw memory, PyMem and objects.
 * A wrapper keeps the domain's ctx and calls the real functions from a table of its
 * own, so a thread that reads a domain half-swapped (the agent swaps it without the
 * GIL) calls the old function or the wrapper, with the same ctx: right either way.
 * The frees of sampled blocks reach leakmon like native ones; the kernel adds the
 * Python frames to the stack of each sample.
 */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t size);
    void (*free)(void *ctx, void *ptr);
} py_allocator;

/* PYMEM_DOMAIN_RAW, _MEM and _OBJ. */
#define PY_DOMAINS 3
/* pymalloc serves requests up to this size from its pools (SMALL_REQUEST_THRESHOLD,
 * 3.8 and later); larger ones go to the raw domain, which calls malloc. */
#define PY_SMALL_REQUEST 512
static py_allocator py_real[PY_DOMAINS];
/* The wrapper each domain was given (see python_wrap), while wrapped. */
static py_allocator py_installed[PY_DOMAINS];
static int py_wrapped[PY_DOMAINS];
/* 1 while a Python in this process is to be wrapped once it is initialized. */
static volatile int py_pending;

/*
 * 1 while objects and PyMem are pymalloc's (see pymalloc_in_charge): a block that may be
 * sampled is then asked for at more than pymalloc's small-request size, which pymalloc
 * hands to the raw domain. Its free then reaches the raw domain too (pymalloc frees a
 * block it does not own there), so the objects' and PyMem's frees need no wrapper: the
 * domains keep their own free functions, and about half the calls cost nothing.
 */
static int py_raw_backed;

static __attribute__((noinline)) void *py_alloc(int d, void *ctx, void *old, size_t a, size_t b, int kind) {
    const py_allocator *real = &py_real[d];
#define PY_CALL (kind == K_CALLOC ? real->calloc(ctx, a, b) : kind == K_REALLOC ? real->realloc(ctx, old, a) : real->malloc(ctx, a))
    uint64_t r = rate;
    if (r == 0)
        return PY_CALL;
    struct thread_state *t = me();
    if (t->busy) {
        /* Counted by the outer call, but the old block of a realloc is its own: under
         * debug hooks, PyMem's realloc reallocates the raw block behind its block
         * (past a header), which the raw domain may have sampled on its own. */
        if (kind == K_REALLOC)
            released((uintptr_t)old);
        return PY_CALL;
    }
    t->busy = 1;
    if (kind == K_REALLOC)
        released((uintptr_t)old);
    uint64_t size = kind == K_CALLOC ? product(a, b) : a;
    if (d != 0 && py_raw_backed && size <= PY_SMALL_REQUEST && size >= t->left) {
        /* May be the one sampled (the countdown decides after the call, as for every
         * block): a raw block. Unsampled after all, it is just a little larger. */
        a = kind == K_CALLOC ? 1 : PY_SMALL_REQUEST + 1;
        b = PY_SMALL_REQUEST + 1;
    }
    void *p = PY_CALL;
    if (p != NULL)
        sampled(t, (uintptr_t)p, size, r);
    t->busy = 0;
    return p;
#undef PY_CALL
}

/* No per-thread state on a free: a block leaves the set once, so a nested free of the
 * same block (a large object's, through the raw domain and free's hook) finds it gone. */
static __attribute__((noinline)) void py_release(int d, void *ctx, void *p) {
    if (rate != 0)
        released((uintptr_t)p);
    py_real[d].free(ctx, p);
}

/*
 * The wrappers while pymalloc is in charge of objects and PyMem (py_raw_backed; else
 * malloc and realloc are py_guarded_'s below). Their fast paths end in a jump to the
 * real function, so they need no frame of their own (the rest, py_alloc and py_release,
 * has one). A free ends there unless the filter says its block may be sampled. A small
 * request to pymalloc (objects and PyMem, not raw memory) is served from its pools
 * calling nothing hooked, so when it is not the one sampled it needs no guard. Nor a
 * check of the guard or of the rate: no hook calls into Python, and with sampling off
 * the countdown only runs down to the full path, which passes through. A larger
 * request, pymalloc hands to the raw domain: its wrapper counts it, and releases the
 * old block of a realloc, so these pass it on uncounted. A sampled block is always a
 * raw one (see py_alloc), so the old block of a small realloc needs no check here
 * either: pymalloc does not own it and hands the realloc to the raw domain, whose
 * wrapper releases it (and counts the new block again: rare, and it only samples that
 * block early). Measured with cargo xtask bench --python-only.
 */
#define PY_FAST __attribute__((optimize("omit-frame-pointer")))
#define PY_WRAPPERS(d)                                                                             \
    static PY_FAST void *py_malloc_##d(void *ctx, size_t n) {                                        \
        struct thread_state *t = me();                                                             \
        if (d != 0 && n <= PY_SMALL_REQUEST && n < t->left) {                                      \
            t->left -= n;                                                                          \
            return py_real[d].malloc(ctx, n);                                                      \
        }                                                                                          \
        if (d != 0 && n > PY_SMALL_REQUEST)                                                        \
            return py_real[d].malloc(ctx, n);                                                      \
        return py_alloc(d, ctx, NULL, n, 0, K_MALLOC);                                             \
    }                                                                                              \
    static void *py_calloc_##d(void *ctx, size_t n, size_t e) { return py_alloc(d, ctx, NULL, n, e, K_CALLOC); } \
    static PY_FAST void *py_realloc_##d(void *ctx, void *p, size_t n) {                              \
        struct thread_state *t = me();                                                             \
        if (d != 0 && n <= PY_SMALL_REQUEST && n < t->left) {                                      \
            t->left -= n;                                                                          \
            return py_real[d].realloc(ctx, p, n);                                                  \
        }                                                                                          \
        if (d != 0 && n > PY_SMALL_REQUEST)                                                        \
            return py_real[d].realloc(ctx, p, n);                                                  \
        return py_alloc(d, ctx, p, n, 0, K_REALLOC);                                               \
    }                                                                                              \
    static PY_FAST void py_free_##d(void *ctx, void *p) {                                            \
        if (UNLIKELY(rate != 0 && p != NULL && maybe_sampled((uintptr_t)p))) {                      \
            py_release(d, ctx, p);                                                                 \
            return;                                                                                \
        }                                                                                          \
        py_real[d].free(ctx, p);                                                                   \
    }
PY_WRAPPERS(0)
PY_WRAPPERS(1)
PY_WRAPPERS(2)
static const py_allocator py_wrappers[PY_DOMAINS] = {
    {NULL, py_malloc_0, py_calloc_0, py_realloc_0, py_free_0},
    {NULL, py_malloc_1, py_calloc_1, py_realloc_1, py_free_1},
    {NULL, py_malloc_2, py_calloc_2, py_realloc_2, py_free_2},
};

/*
 * For objects and PyMem when pymalloc is not in charge of them (PYTHONMALLOC=malloc,
 * debug hooks, tracemalloc, mimalloc): their functions may call the hooked malloc for
 * any size, so every call takes the guarded path, as raw memory's do; without the
 * guard malloc's hook counted a block a second time. python_wrap puts these in place
 * of py_wrappers' malloc and realloc (raw memory's already take that path).
 */
#define PY_GUARDED(d)                                                                                \
    static void *py_guarded_malloc_##d(void *ctx, size_t n) { return py_alloc(d, ctx, NULL, n, 0, K_MALLOC); } \
    static void *py_guarded_realloc_##d(void *ctx, void *p, size_t n) { return py_alloc(d, ctx, p, n, 0, K_REALLOC); }
PY_GUARDED(1)
PY_GUARDED(2)
static void *(*const py_guarded_malloc[PY_DOMAINS])(void *, size_t) = {py_malloc_0, py_guarded_malloc_1,
                                                                       py_guarded_malloc_2};
static void *(*const py_guarded_realloc[PY_DOMAINS])(void *, void *, size_t) = {py_realloc_0, py_guarded_realloc_1,
                                                                                py_guarded_realloc_2};

typedef void (*py_allocator_fn)(int domain, py_allocator *allocator);

/*
 * Whether objects and PyMem are pymalloc's own, which hands requests over its
 * small-request size, and frees of blocks it does not own, to the raw domain (3.8 to
 * 3.13). Told from what the domains hold, without calling them (this may run on a
 * thread of no interpreter): pymalloc serves both with the same functions and no
 * context. Debug hooks and tracemalloc have a context; "malloc" is the raw domain's
 * functions; mimalloc (PYTHONMALLOC=mimalloc, free-threaded builds) keeps large blocks
 * itself. Where unsure, the frees stay wrapped.
 */
static int pymalloc_in_charge(const py_allocator domains[PY_DOMAINS]) {
    const py_allocator *raw = &domains[0], *mem = &domains[1], *obj = &domains[2];
    if (mem->ctx != NULL || obj->ctx != NULL || mem->malloc != obj->malloc || mem->free != obj->free ||
        mem->realloc != obj->realloc || obj->malloc == raw->malloc)
        return 0;
    const char *chosen = getenv("PYTHONMALLOC");
    if (chosen != NULL && chosen[0] != 0 && strcmp(chosen, "pymalloc") != 0)
        return 0;
    const char *(*version)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "Py_GetVersion");
    return version != NULL && strstr(version(), "free-threading") == NULL;
}

/*
 * Wraps the domains of an initialized CPython in this process; leaves py_pending set
 * while the process has a CPython that is not initialized yet (a preloaded agent
 * starts before it). Called with patch_lock held.
 */
static void python_wrap(void) {
    py_allocator_fn get = (py_allocator_fn)dlsym(RTLD_DEFAULT, "PyMem_GetAllocator");
    py_allocator_fn set_ = (py_allocator_fn)dlsym(RTLD_DEFAULT, "PyMem_SetAllocator");
    int (*initialized)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "Py_IsInitialized");
    if (get == NULL || set_ == NULL || initialized == NULL) {
        py_pending = 0;
        return;
    }
    /* Before initialization CPython sets its allocators up again, over any wrapper. */
    if (!initialized()) {
        py_pending = 1;
        return;
    }
    py_pending = 0;
    py_allocator current[PY_DOMAINS];
    for (int d = 0; d < PY_DOMAINS; d++)
        get(d, &current[d]);
    /* Decided once, before any domain is wrapped: a sampled block must not outlive the
     * mode its free depends on. */
    if (!py_wrapped[0] && !py_wrapped[1] && !py_wrapped[2])
        py_raw_backed = pymalloc_in_charge(current);
    for (int d = 0; d < PY_DOMAINS; d++) {
        if (py_wrapped[d])
            continue;
        py_real[d] = current[d];
        py_allocator wrapper = py_wrappers[d];
        wrapper.ctx = current[d].ctx;
        if (!py_raw_backed) {
            wrapper.malloc = py_guarded_malloc[d];
            wrapper.realloc = py_guarded_realloc[d];
        } else if (d != 0) {
            wrapper.free = current[d].free;
        }
        set_(d, &wrapper);
        py_installed[d] = wrapper;
        py_wrapped[d] = 1;
    }
}

/* From a sample (rare): a preloaded agent wraps CPython once it is initialized. */
static void python_wrap_pending(void) {
    if (LIKELY(!py_pending))
        return;
    if (pthread_mutex_trylock(&patch_lock) != 0)
        return;
    if (py_pending)
        python_wrap();
    pthread_mutex_unlock(&patch_lock);
}

/* Puts back each domain still holding the agent's wrapper (one another wrapper was put
 * over since is left alone: it passes through while sampling is off). */
static void python_unwrap(void) {
    py_allocator_fn get = (py_allocator_fn)dlsym(RTLD_DEFAULT, "PyMem_GetAllocator");
    py_allocator_fn set_ = (py_allocator_fn)dlsym(RTLD_DEFAULT, "PyMem_SetAllocator");
    py_pending = 0;
    if (get == NULL || set_ == NULL)
        return;
    for (int d = 0; d < PY_DOMAINS; d++) {
        if (!py_wrapped[d])
            continue;
        py_allocator current;
        get(d, &current);
        if (current.malloc == py_installed[d].malloc) {
            set_(d, &py_real[d]);
            py_wrapped[d] = 0;
        }
    }
}

#endif /* !LEAKMON_AGENT_FREESTANDING */

/* ---- control --------------------------------------------------------------------- */

#ifndef LEAKMON_AGENT_FREESTANDING
/*
 * (The freestanding agent has no control functions: leakmon maps its tables, writes
 * their addresses and the interval into it, and puts its inline hooks on and off.)
 */
static void *map_zeroed(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Whether `p` is the address of a symbol some object defines (a canonical PLT stub is
 * the address of an undefined symbol of the program). */
static int defined_at(void *p) {
    Dl_info at;
    const ElfW(Sym) *sym = NULL;
    return p != NULL && dladdr1(p, &at, (void **)&sym, RTLD_DL_SYMENT) != 0 && sym != NULL &&
           sym->st_shndx != SHN_UNDEF;
}

/* Looks `name` up in one loaded library (not the program): the first that defines it. */
struct lookup {
    const char *name;
    void *found;
};
static int definition_in(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct lookup *l = data;
    if (info->dlpi_name == NULL || info->dlpi_name[0] == 0)
        return 0;
    void *handle = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == NULL)
        return 0;
    void *p = dlsym(handle, l->name);
    dlclose(handle);
    if (!defined_at(p))
        return 0;
    l->found = p;
    return 1;
}

/*
 * The function `name` names for every object. The global lookup gives it, except in a
 * fixed-address program that takes the function's address: there the program's own
 * PLT stub stands for it (a "canonical PLT", an undefined symbol with a value), a stub
 * that jumps through the program's GOT slot, that is into the hook. Then the libraries
 * are asked, in load order.
 */
static void *definition(const char *name) {
    void *p = dlsym(RTLD_DEFAULT, name);
    if (p == NULL || defined_at(p))
        return p;
    struct lookup l = {name, NULL};
    dl_iterate_phdr(definition_in, &l);
    return l.found != NULL ? l.found : p;
}

/*
 * Starts sampling every `sample_bytes` bytes on average and redirects every loaded
 * object's calls. Returns the number of slots redirected, or a negative number: -1
 * for a bad interval, -2 when the tables cannot be mapped, -3 when it samples already
 * (for another leakmon, whose figures a second start would change and whose stop a
 * second stop would make: each leakmon's sampling is its own until it stops it).
 */
EXPORT long leakmon_agent_start(uint64_t sample_bytes) {
    if (sample_bytes == 0 || sample_bytes > LEAKMON_MAX_RATE)
        return -1;
    pthread_mutex_lock(&patch_lock);
    if (rate != 0) {
        pthread_mutex_unlock(&patch_lock);
        return -3;
    }
    if (set == NULL) {
        set = map_zeroed(SET_SLOTS * sizeof(uintptr_t));
        filter = map_zeroed(FILTER_SLOTS);
        patched = map_zeroed(MAX_PATCHED * sizeof(struct patched));
        if (set == NULL || filter == NULL || patched == NULL) {
            pthread_mutex_unlock(&patch_lock);
            return -2;
        }
        Dl_info self;
        if (dladdr((void *)leakmon_agent_start, &self) != 0)
            self_base = (uintptr_t)self.dli_fbase;
        for (int i = 0; i < N_HOOKS; i++)
            real[i] = (entry_fn)definition(hooks[i].name);
    }
    rate = sample_bytes;
    python_wrap();
    pthread_mutex_unlock(&patch_lock);
    patch_all();
    return (long)n_patched;
}

/*
 * Writes every redirected slot back and stops sampling; returns how many slots were
 * restored. Blocks sampled before stay in the set: a later start still hears of
 * their frees.
 */
EXPORT long leakmon_agent_stop(void) {
    pthread_mutex_lock(&patch_lock);
    rate = 0;
    long restored = 0;
    for (unsigned i = 0; i < n_patched; i++) {
        if (store(patched[i].slot, patched[i].original, patched[i].read_only))
            restored++;
    }
    n_patched = 0;
    python_unwrap();
    pthread_mutex_unlock(&patch_lock);
    return restored;
}

/* Preloaded: the interval comes from the environment leakmon gave the command. */
__attribute__((constructor)) static void leakmon_agent_preloaded(void) {
    const char *value = getenv("LEAKMON_AGENT_SAMPLE_BYTES");
    if (value == NULL)
        return;
    uint64_t bytes = strtoull(value, NULL, 10);
    if (bytes != 0)
        leakmon_agent_start(bytes);
}
#endif
