/* Memory held for the daemon-scale benchmark. Usage: hold MODE
 *   idle N     fork N children that sleep (processes for the always-on tier)
 *   million    one million live 16-byte blocks
 *   stacks     one 24-byte block from each of 2^17 distinct call paths
 *   storm N    fork N children that allocate, exec nothing and exit at once, then
 *              print `processes_per_second=F` (the lifecycle event rate)
 *   churn N MS after 2 s (a watcher attaches), one million live blocks, then a storm
 *              of N children every MS ms for ever: a soak's churn from one process
 * Prints `ready` once done, then sleeps until killed (children die with the parent's
 * process group). Built with -fno-builtin and frame pointers. */
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
#define LEVELS 17

static void **blocks;

NOINLINE void *step(unsigned path, int level);
NOINLINE void *left(unsigned path, int level) { return step(path, level + 1); }
NOINLINE void *right(unsigned path, int level) { return step(path, level + 1); }
NOINLINE void *step(unsigned path, int level) {
    if (level == LEVELS) return malloc(24);
    return (path >> level) & 1 ? right(path, level) : left(path, level);
}

/* N children that allocate (so they are traced), exec nothing and exit at once; all
 * reaped. Returns -1 if a fork fails. */
static int storm(int n) {
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            free(malloc(64));
            _exit(0);
        }
        if (pid < 0) return -1;
        if (i % 64 == 63) while (waitpid(-1, NULL, WNOHANG) > 0) {}
    }
    while (wait(NULL) > 0) {}
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "idle") && argc > 2) {
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++) {
            pid_t pid = fork();
            if (pid == 0) {
                for (;;) pause();
            }
            if (pid < 0) return 1;
        }
    } else if (!strcmp(mode, "churn") && argc > 3) {
        int n = atoi(argv[2]), ms = atoi(argv[3]);
        sleep(2);
        blocks = malloc(1000000 * sizeof(void *));
        for (int i = 0; i < 1000000; i++) blocks[i] = malloc(16);
        printf("ready\n");
        fflush(stdout);
        for (;;) {
            if (storm(n) != 0) return 1;
            usleep(ms * 1000);
        }
    } else if (!strcmp(mode, "storm") && argc > 2) {
        int n = atoi(argv[2]);
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (storm(n) != 0) return 1;
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
        printf("processes_per_second=%.0f\n", n / s);
        return 0;
    } else if (!strcmp(mode, "million")) {
        blocks = malloc(1000000 * sizeof(void *));
        for (int i = 0; i < 1000000; i++) blocks[i] = malloc(16);
    } else if (!strcmp(mode, "stacks")) {
        blocks = malloc((1u << LEVELS) * sizeof(void *));
        for (unsigned p = 0; p < (1u << LEVELS); p++) blocks[p] = step(p, 0);
    } else {
        fprintf(stderr, "usage: hold idle N | million | stacks | storm N | churn N MS\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
