/*
 * arena.c - a cache for CPython's arena allocator (PyObject_SetArenaAllocator).
 *
 * nbdkit's Python plugin takes the GIL for each request with
 * PyGILState_Ensure on a thread Python does not know, so every request
 * makes a thread state and deletes it after.  CPython 3.11 gives each
 * thread state a 16 KiB stack of frames from the arena allocator, which
 * is mmap and munmap: per request an mmap, page faults, and an munmap
 * that sends a TLB shoot-down to the other CPUs running the process's
 * threads (measured: one mmap and one munmap per 4K write of a served
 * volume, a tenth of its CPU while a cycle runs).
 *
 * This allocator keeps the last NBM_ARENA_SLOTS freed blocks of at most
 * NBM_ARENA_KEEP bytes (the oldest unmapped when a new one comes) and
 * hands them out again for the same size.  It gets and returns memory
 * with mmap and munmap exactly as CPython's own (anonymous, private,
 * read-write), so it can replace that one at any time: a block mapped
 * before is freed here correctly.  Blocks handed
 * out again are not zeroed; CPython initialises what it uses of a frame
 * stack chunk and of a pymalloc arena.  A mutex guards the cache (CPython
 * calls it with the GIL held, but costs nothing to be sure).
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>

#define NBM_ARENA_SLOTS 16
#define NBM_ARENA_KEEP (1u << 20)

typedef struct {
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} nbm_arena_allocator_t;

static pthread_mutex_t nbm_arena_lock = PTHREAD_MUTEX_INITIALIZER;
static void *nbm_arena_ptr[NBM_ARENA_SLOTS];
static size_t nbm_arena_len[NBM_ARENA_SLOTS];
static int nbm_arena_count;
static uint64_t nbm_arena_stats[2]; /* blocks handed out again, blocks mapped */

/* Take cache entry i out, keeping the others in the order they were freed. */
static void *nbm_arena_take(int i)
{
    void *p = nbm_arena_ptr[i];
    for (; i + 1 < nbm_arena_count; i++) {
        nbm_arena_ptr[i] = nbm_arena_ptr[i + 1];
        nbm_arena_len[i] = nbm_arena_len[i + 1];
    }
    nbm_arena_count--;
    return p;
}

static void *nbm_arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    pthread_mutex_lock(&nbm_arena_lock);
    for (int i = nbm_arena_count - 1; i >= 0; i--) { /* the most recently freed first */
        if (nbm_arena_len[i] == size) {
            void *p = nbm_arena_take(i);
            nbm_arena_stats[0]++;
            pthread_mutex_unlock(&nbm_arena_lock);
            return p;
        }
    }
    nbm_arena_stats[1]++;
    pthread_mutex_unlock(&nbm_arena_lock);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* A freed block joins the cache; when it is full, the block freed longest ago leaves it
 * (unmapped): blocks of a size no longer asked for cannot hold the slots for good. */
static void nbm_arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr == NULL)
        return;
    if (size > NBM_ARENA_KEEP) {
        munmap(ptr, size);
        return;
    }
    void *old = NULL;
    size_t old_len = 0;
    pthread_mutex_lock(&nbm_arena_lock);
    if (nbm_arena_count == NBM_ARENA_SLOTS) {
        old_len = nbm_arena_len[0];
        old = nbm_arena_take(0);
    }
    nbm_arena_ptr[nbm_arena_count] = ptr;
    nbm_arena_len[nbm_arena_count] = size;
    nbm_arena_count++;
    pthread_mutex_unlock(&nbm_arena_lock);
    if (old != NULL)
        munmap(old, old_len);
}

static nbm_arena_allocator_t nbm_arena = {NULL, nbm_arena_alloc, nbm_arena_free};

/* The allocator, for PyObject_SetArenaAllocator (which copies it). */
void *nbm_arena_allocator(void)
{
    return &nbm_arena;
}

/* How many blocks were handed out again (reused) and how many mapped. */
void nbm_arena_counts(uint64_t *reused, uint64_t *mapped)
{
    pthread_mutex_lock(&nbm_arena_lock);
    *reused = nbm_arena_stats[0];
    *mapped = nbm_arena_stats[1];
    pthread_mutex_unlock(&nbm_arena_lock);
}
