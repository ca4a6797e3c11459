/* Allocation workloads for `cargo xtask bench`. Usage: alloc_bench MODE PAIRS THREADS
 *   pairs  malloc(16..256) + free in a tight loop
 *   mixed  malloc, realloc to another size, free (sizes 16 B to 64 KiB)
 *   deep   as pairs, from 20 nested calls down (what a stack walk costs per frame)
 * Each thread first runs WARMUP untimed pairs (a preloaded tool initialises lazily on
 * the first calls), then times its own loop; prints `ns_per_pair=F` (mean over
 * threads) so the steady cost of one malloc+free pair (for mixed:
 * malloc+realloc+free) is what is measured, not start-up or tear-down. Built with -fno-builtin so every call is real. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WARMUP 20000

static long pairs_per_thread;
static int mixed;
static int deep;
static volatile int depth_sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static __attribute__((noinline)) void timed_loop(double *out) {
    /* Per thread: a shared sink would hand one thread's block to another's free. */
    void *volatile sink;
    unsigned x = 12345;
    double start = 0;
    for (long i = -WARMUP; i < pairs_per_thread; i++) {
        if (i == 0) start = now();
        x = x * 1103515245u + 12345u;
        if (mixed) {
            sink = malloc(16 + (x >> 8) % 4096);
            sink = realloc(sink, 16 + (x >> 4) % 65536);
            free(sink);
        } else {
            sink = malloc(16 + (x >> 8) % 240);
            free(sink);
        }
    }
    *out = (now() - start) / pairs_per_thread;
}

/* n calls deep, then the loop; the store after the call keeps it from being a jump. */
static __attribute__((noinline)) void nest(int n, double *out) {
    if (n == 0)
        timed_loop(out);
    else
        nest(n - 1, out);
    depth_sink = n;
}

static void *worker(void *out) {
    nest(deep ? 20 : 0, out);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: alloc_bench pairs|mixed|deep PAIRS THREADS\n");
        return 2;
    }
    mixed = strcmp(argv[1], "mixed") == 0;
    deep = strcmp(argv[1], "deep") == 0;
    long pairs = atol(argv[2]);
    int threads = atoi(argv[3]);
    if (pairs <= 0 || threads <= 0 || threads > 64) {
        fprintf(stderr, "alloc_bench: bad PAIRS or THREADS\n");
        return 2;
    }
    pairs_per_thread = pairs / threads;
    pthread_t t[64];
    double ns[64];
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, &ns[i]);
    double sum = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        sum += ns[i];
    }
    printf("ns_per_pair=%.1f\n", sum / threads);
    return 0;
}
