/* The native library's thread pool (pool.c), shared by every kernel in this directory. */
#ifndef OMNISTREAM_POOL_H
#define OMNISTREAM_POOL_H

typedef void (*chunk_fn)(void *arg, int chunk);

/* fn(arg, c) for c in [0, chunks), by the caller and up to threads - 1 helpers. Calls are
 * serialized (one job at a time); returns when every chunk is done. */
void parallel_chunks(chunk_fn fn, void *arg, int chunks, int threads);

/* How long helpers spin for the next call before sleeping (in pause instructions). */
void int8_set_spin(int pauses);
int int8_get_spin(void);

#endif
