/* Counts CPython object allocations (PYMEM_DOMAIN_OBJ: every object and small buffer the
 * interpreter asks for), for bench/counts.py. A count does not drift with a noisy machine as
 * CPU time does. Installed once, it wraps the allocator that was in place and forwards every
 * call to it, so memory allocated before keeps being freed by the allocator that made it. */
#include <Python.h>

static PyMemAllocatorEx wrapped;
static unsigned long long allocations;

static void *count_malloc(void *ctx, size_t size) {
    allocations++;
    return wrapped.malloc(wrapped.ctx, size);
}

static void *count_calloc(void *ctx, size_t count, size_t size) {
    allocations++;
    return wrapped.calloc(wrapped.ctx, count, size);
}

static void *count_realloc(void *ctx, void *ptr, size_t size) {
    if (ptr == NULL)
        allocations++;
    return wrapped.realloc(wrapped.ctx, ptr, size);
}

static void count_free(void *ctx, void *ptr) { wrapped.free(wrapped.ctx, ptr); }

void alloccount_install(void) {
    PyMemAllocatorEx counting = {NULL, count_malloc, count_calloc, count_realloc, count_free};
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &wrapped);
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &counting);
}

unsigned long long alloccount_total(void) { return allocations; }
