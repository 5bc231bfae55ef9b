#include <immintrin.h>
#include <stdint.h>

#include "pool.h"

/* ---- a small thread pool ------------------------------------------------------------------
 * Why not OpenMP: an OpenMP parallel region ends with a barrier that waits for every thread to
 * arrive. On a machine whose other core is busy (the other stages run there), a helper thread
 * that is not scheduled costs the caller a scheduler time slice (milliseconds) per call, and a
 * decoded token makes ~170 calls. Here the caller takes chunks of work itself and waits only for
 * chunks a helper has actually started: a helper that does not get a core simply takes none.
 * Helpers spin briefly for the next call (decoding makes them back to back), then sleep on a
 * futex: a long spin would take the core from torch's own threads and the other stages.
 */
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_HELPERS 63
#ifndef SPIN_PAUSES
#define SPIN_PAUSES 1000 /* ~20-60 us */
#endif
static atomic_int spin_pauses = SPIN_PAUSES;

/* How long helpers spin for the next call before sleeping (in pause instructions). */
void int8_set_spin(int pauses) { atomic_store(&spin_pauses, pauses < 0 ? 0 : pauses); }

/* The current spin (a caller can raise it around a burst of calls and restore it). */
int int8_get_spin(void) { return atomic_load(&spin_pauses); }

typedef struct {
    chunk_fn fn;
    void *arg;
    int chunks;
    int helpers; /* helpers allowed to join (threads - 1) */
    atomic_int next, done, active;
} job_t;

static job_t jobs[2];           /* generation g uses jobs[g & 1]; a late helper sees a stale g */
static atomic_uint generation;   /* futex word */
static atomic_int sleepers;
static int helpers_started;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void futex_wait(atomic_uint *word, unsigned value) {
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void futex_wake_all(atomic_uint *word) {
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}

static void run_chunks(job_t *job) {
    int c;
    while ((c = atomic_fetch_add(&job->next, 1)) < job->chunks) {
        job->fn(job->arg, c);
        atomic_fetch_add(&job->done, 1);
    }
}

static void *helper_main(void *p) {
    const int index = (int)(intptr_t)p;
    unsigned seen = atomic_load(&generation);
    for (;;) {
        unsigned g;
        int spins = 0;
        const int limit = atomic_load_explicit(&spin_pauses, memory_order_relaxed);
        while ((g = atomic_load(&generation)) == seen) {
            if (spins < limit) {
                _mm_pause();
            } else {
                atomic_fetch_add(&sleepers, 1);
                if (atomic_load(&generation) == seen) futex_wait(&generation, seen);
                atomic_fetch_sub(&sleepers, 1);
            }
            spins++;
        }
        seen = g;
        job_t *job = &jobs[g & 1];
        atomic_fetch_add(&job->active, 1);
        if (atomic_load(&generation) == g && index < job->helpers) run_chunks(job);
        atomic_fetch_sub(&job->active, 1);
    }
    return NULL;
}

static void forget_helpers(void) { /* in a forked child: the helpers stayed with the parent */
    helpers_started = 0;
    pthread_mutex_init(&pool_lock, NULL);
}

static void ensure_helpers(int n) {
    static int at_fork_registered;
    if (n > MAX_HELPERS) n = MAX_HELPERS;
    if (helpers_started >= n) return;
    pthread_mutex_lock(&pool_lock);
    if (!at_fork_registered) at_fork_registered = pthread_atfork(NULL, NULL, forget_helpers) == 0;
    while (helpers_started < n) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&thread, &attr, helper_main, (void *)(intptr_t)helpers_started) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        helpers_started++;
    }
    pthread_mutex_unlock(&pool_lock);
}

/* fn(arg, c) for c in [0, chunks), by the caller and up to threads - 1 helpers. Calls are
 * serialized (one job at a time); returns when every chunk is done. */
void parallel_chunks(chunk_fn fn, void *arg, int chunks, int threads) {
    if (threads <= 1 || chunks <= 1) {
        for (int c = 0; c < chunks; c++) fn(arg, c);
        return;
    }
    ensure_helpers(threads - 1);
    pthread_mutex_lock(&pool_lock);
    const unsigned g = atomic_load(&generation) + 1;
    job_t *job = &jobs[g & 1];
    while (atomic_load(&job->active) != 0) _mm_pause(); /* a helper leaving generation g - 2 */
    job->fn = fn;
    job->arg = arg;
    job->chunks = chunks;
    job->helpers = threads - 1;
    atomic_store(&job->next, 0);
    atomic_store(&job->done, 0);
    atomic_store(&generation, g);
    if (atomic_load(&sleepers) > 0) futex_wake_all(&generation);
    run_chunks(job);
    while (atomic_load(&job->done) < chunks) _mm_pause(); /* chunks a helper is finishing */
    pthread_mutex_unlock(&pool_lock);
}

