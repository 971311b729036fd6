/*
 * regions.c - hot loops over region maps, and bulk range copies.
 *
 * A "map" is a byte array with one byte per region: 0 = clear, anything else
 * = marked.  Maps can be large (16M regions for a 1 TiB volume at 64 KiB
 * regions) and are scanned on every resync/flush, so the scanners read the
 * map 8 bytes at a time (uint64 loads through memcpy, which is alignment- and
 * aliasing-safe and compiles to a single load) and finish with a byte-wise
 * tail for the partial last word.
 *
 * This file is compiled by cffi (see build.py); its text is embedded into the
 * generated module after cffi's own includes.  Python.h already defines
 * _GNU_SOURCE on Linux; the guarded define below only matters if this file
 * is ever compiled on its own.
 *
 * Conventions: functions never touch Python objects, never call exit(), and
 * report failure as a negative errno; the Python facade turns that into
 * OSError.  cffi (API mode) releases the GIL around every call into these
 * functions, so a long copy_runs does not stall other Python threads.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define NBM_LO7  0x7f7f7f7f7f7f7f7fULL
#define NBM_ONES 0x0101010101010101ULL

/* Load 8 map bytes so that map byte i lands in bits [8i, 8i+8) of the
 * result.  That is the native layout on little-endian machines; on
 * big-endian ones we swap so the bit arithmetic below stays the same. */
static inline uint64_t nbm_load64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, sizeof w);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

/* Bit 0 of each byte of the result is 1 iff that byte of w is nonzero (all
 * other bits are 0).  Adding 0x7f to the low 7 bits of a byte sets its bit 7
 * iff those low bits are nonzero; OR-ing w adds bytes whose own bit 7 is set.
 * No carry crosses a byte boundary because 0x7f + 0x7f = 0xfe. */
static inline uint64_t nbm_flags(uint64_t w)
{
    return ((((w & NBM_LO7) + NBM_LO7) | w) >> 7) & NBM_ONES;
}

/* Sum of the 8 bytes of w (each at most 255).  Pairs are first added into
 * 16-bit lanes so the final multiply-and-shift cannot overflow a lane. */
static inline int64_t nbm_hsum(uint64_t w)
{
    w = (w & 0x00ff00ff00ff00ffULL) + ((w >> 8) & 0x00ff00ff00ff00ffULL);
    return (int64_t)((w * 0x0001000100010001ULL) >> 48);
}

/* Counting adds per-byte 0/1 flags into a byte-lane accumulator and folds it
 * every 255 words (before any lane can overflow), instead of a popcount per
 * word: without -mpopcnt, __builtin_popcountll is a libgcc call on x86-64,
 * and this form also lets the compiler vectorise. */
#define NBM_FOLD 255

int64_t nbm_count(const uint8_t *m, size_t n)
{
    int64_t total = 0;
    size_t i = 0;

    while (i + 8 <= n) {
        uint64_t acc = 0;
        size_t stop = n - i >= 8 * NBM_FOLD ? i + 8 * NBM_FOLD : n - (n - i) % 8;
        for (; i < stop; i += 8)
            acc += nbm_flags(nbm_load64(m + i));
        total += nbm_hsum(acc);
    }
    for (; i < n; i++)
        total += m[i] != 0;
    return total;
}

/* A run starts at every marked byte whose predecessor is clear (or which is
 * byte 0).  (f << 8) moves each byte's flag onto its successor; `carry`
 * brings in the flag of the previous word's last byte. */
int64_t nbm_count_runs(const uint8_t *m, size_t n)
{
    int64_t runs = 0;
    uint64_t carry = 0;
    size_t i = 0;

    while (i + 8 <= n) {
        uint64_t acc = 0;
        size_t stop = n - i >= 8 * NBM_FOLD ? i + 8 * NBM_FOLD : n - (n - i) % 8;
        for (; i < stop; i += 8) {
            uint64_t f = nbm_flags(nbm_load64(m + i));
            acc += f & ~((f << 8) | carry);
            carry = f >> 56;
        }
        runs += nbm_hsum(acc);
    }
    for (; i < n; i++) {
        uint64_t f = m[i] != 0;
        runs += (int)(f & !carry);
        carry = f;
    }
    return runs;
}

/* Writes up to `cap` (start, count) pairs into out[0 .. 2*cap).  Returns the
 * number of runs written, or -ENOSPC if the map holds more than `cap` runs
 * (the caller sized `out` with nbm_count_runs, so that only happens if the map
 * changed between the two passes, which is possible because the GIL is not
 * held).  Words with no clear/marked transition, the common case in both
 * sparse and dense maps, cost one load and one compare. */
int64_t nbm_scan_runs(const uint8_t *m, size_t n, int64_t *out, size_t cap)
{
    size_t k = 0, i = 0;
    uint64_t in_run = 0;        /* 1 if the byte before i is marked */
    int64_t start = 0;

#define NBM_EMIT(end_)                                      \
    do {                                                    \
        if (k >= cap)                                       \
            return -ENOSPC;                                 \
        out[2 * k] = start;                                 \
        out[2 * k + 1] = (int64_t)(end_) - start;           \
        k++;                                                \
    } while (0)

    for (; i + 8 <= n; i += 8) {
        uint64_t f = nbm_flags(nbm_load64(m + i));
        if (f == (in_run ? NBM_ONES : 0))
            continue;
        /* Bit 8b of t is set iff byte b differs from the byte before it.
         * Transitions alternate start/end, so toggling in_run tracks which
         * one each is, and leaves in_run = flag of this word's last byte. */
        uint64_t t = f ^ ((f << 8) | in_run);
        while (t) {
            size_t pos = i + ((size_t)__builtin_ctzll(t) >> 3);
            if (in_run)
                NBM_EMIT(pos);
            else
                start = (int64_t)pos;
            in_run ^= 1;
            t &= t - 1;
        }
    }
    for (; i < n; i++) {
        uint64_t f = m[i] != 0;
        if (f == in_run)
            continue;
        if (in_run)
            NBM_EMIT(i);
        else
            start = (int64_t)i;
        in_run = f;
    }
    if (in_run)
        NBM_EMIT(n);
#undef NBM_EMIT
    return (int64_t)k;
}

/* dst |= src, bytewise.  dst and src may be the same array. */
void nbm_merge_or(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dst + i, 8);
        memcpy(&b, src + i, 8);
        a |= b;
        memcpy(dst + i, &a, 8);
    }
    for (; i < n; i++)
        dst[i] |= src[i];
}

/* ---- copying ---------------------------------------------------------- */

#define NBM_BUF_SIZE ((size_t)1 << 20)
/* copy_file_range is asked for at most this much per call; the kernel
 * clamps to ~2 GiB anyway, and a bound keeps size_t/ssize_t casts safe. */
#define NBM_CFR_CHUNK ((int64_t)1 << 30)

struct nbm_copy {
    int src, dst;
    int use_cfr;                /* cleared for good on the first "unsupported" */
    uint8_t *buf;               /* bounce buffer, allocated on first need */
    int buf_zeroed;
    int dst_checked;            /* nbm_check_dst passed */
};

/* A destination opened O_APPEND is refused (EBADF, as copy_file_range
 * itself refuses it) before any byte moves: pwrite on it would ignore the
 * offset and append, so the fallback would put the bytes at its end and
 * report them copied. */
static int nbm_check_dst(struct nbm_copy *c)
{
    if (c->dst_checked)
        return 0;
    int fl = fcntl(c->dst, F_GETFL);
    if (fl < 0)
        return -errno;
    if (fl & O_APPEND)
        return -EBADF;
    c->dst_checked = 1;
    return 0;
}

/* Errors meaning "copy_file_range can't do this pair of files" rather than
 * "the I/O failed": cross-filesystem on old kernels (EXDEV), non-regular
 * files such as block devices or same-file overlap (EINVAL), no syscall
 * (ENOSYS), filesystem refuses (EOPNOTSUPP), and fds opened in ways it
 * rejects (EBADF).  A truly bad fd fails again in pread/pwrite and is
 * reported from there; an O_APPEND destination never gets here
 * (nbm_check_dst). */
static int nbm_cfr_unsupported(int e)
{
    return e == EXDEV || e == EINVAL || e == ENOSYS || e == EOPNOTSUPP ||
           e == ENOTSUP || e == EBADF;
}

static int nbm_get_buf(struct nbm_copy *c)
{
    if (c->buf == NULL) {
        c->buf = malloc(NBM_BUF_SIZE);
        if (c->buf == NULL)
            return -ENOMEM;
        c->buf_zeroed = 0;
    }
    return 0;
}

static int nbm_pwrite_all(int fd, const uint8_t *p, size_t len, int64_t off)
{
    while (len > 0) {
        ssize_t w = pwrite(fd, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)             /* cannot happen for len > 0; never spin */
            return -EIO;
        p += w;
        len -= (size_t)w;
        off += w;
    }
    return 0;
}

/* The source ended before `end`: make dst read back zeros in [pos, end),
 * overwriting whatever it held. */
static int nbm_zero_fill(struct nbm_copy *c, int64_t pos, int64_t end)
{
    int rc = nbm_get_buf(c);
    if (rc < 0)
        return rc;
    if (!c->buf_zeroed) {
        memset(c->buf, 0, NBM_BUF_SIZE);
        c->buf_zeroed = 1;
    }
    while (pos < end) {
        size_t len = (size_t)(end - pos) < NBM_BUF_SIZE ?
                     (size_t)(end - pos) : NBM_BUF_SIZE;
        rc = nbm_pwrite_all(c->dst, c->buf, len, pos);
        if (rc < 0)
            return rc;
        pos += (int64_t)len;
    }
    return 0;
}

/* Copy [pos, end) from src to dst at the same offset.  Explicit offsets
 * everywhere, so the fds' file positions are never used or moved. */
static int nbm_copy_span(struct nbm_copy *c, int64_t pos, int64_t end)
{
    int rc = nbm_check_dst(c);
    if (rc < 0)
        return rc;
    while (c->use_cfr && pos < end) {
        loff_t so = pos, dof = pos;
        int64_t want = end - pos < NBM_CFR_CHUNK ? end - pos : NBM_CFR_CHUNK;
        ssize_t r = copy_file_range(c->src, &so, c->dst, &dof, (size_t)want, 0);
        if (r > 0) {
            pos += r;
            continue;
        }
        if (r == 0)
            /* Usually EOF on the source, but some kernels/filesystems also
             * return 0 for files they silently can't copy.  Let pread below
             * decide: it either copies the rest or sees the real EOF. */
            break;
        if (errno == EINTR)
            continue;
        if (!nbm_cfr_unsupported(errno))
            return -errno;
        c->use_cfr = 0;
    }
    while (pos < end) {
        rc = nbm_get_buf(c);
        if (rc < 0)
            return rc;
        size_t want = (size_t)(end - pos) < NBM_BUF_SIZE ?
                      (size_t)(end - pos) : NBM_BUF_SIZE;
        c->buf_zeroed = 0;
        ssize_t r = pread(c->src, c->buf, want, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return nbm_zero_fill(c, pos, end);
        rc = nbm_pwrite_all(c->dst, c->buf, (size_t)r, pos);
        if (rc < 0)
            return rc;
        pos += r;
    }
    return 0;
}

/* For each run (runs[2j], runs[2j+1]) = (start, count), copy bytes
 * [start*region_size, min((start+count)*region_size, limit)) from src_fd to
 * dst_fd at the same offset.  The whole loop runs here, with the GIL
 * released, so there is no per-run Python overhead.  Returns the total
 * number of bytes covered (copied or zero-filled), or -errno.  On error,
 * earlier ranges have already been written. */
int64_t nbm_copy_runs(int src_fd, int dst_fd, const int64_t *runs, size_t nruns,
                      int64_t region_size, int64_t limit, int use_cfr)
{
    struct nbm_copy c = { src_fd, dst_fd, use_cfr != 0, NULL, 0, 0 };
    int64_t total = 0;
    int rc = 0;

    if (region_size <= 0 || limit < 0)
        return -EINVAL;
    for (size_t j = 0; j < nruns; j++) {
        int64_t start = runs[2 * j], count = runs[2 * j + 1], off, end, stop;
        if (start < 0 || count < 0) {
            rc = -EINVAL;
            break;
        }
        if (__builtin_add_overflow(start, count, &stop) ||
            __builtin_mul_overflow(start, region_size, &off) ||
            __builtin_mul_overflow(stop, region_size, &end)) {
            rc = -EOVERFLOW;
            break;
        }
        if (end > limit)
            end = limit;
        if (off >= end)
            continue;           /* empty run, or entirely past the volume end */
        rc = nbm_copy_span(&c, off, end);
        if (rc < 0)
            break;
        total += end - off;
    }
    free(c.buf);
    return rc < 0 ? rc : total;
}

/* Copy bytes [offset, end) from src_fd to dst_fd at the same offset: one
 * copy_runs run, for a caller with a single range (a copy on write of one
 * region's frozen blocks) and no array to hand.  Returns end - offset (0 for
 * an empty range) or -errno. */
int64_t nbm_copy_range(int src_fd, int dst_fd, int64_t offset, int64_t end, int use_cfr)
{
    struct nbm_copy c = { src_fd, dst_fd, use_cfr != 0, NULL, 0, 0 };
    int rc;

    if (offset < 0 || end < 0)
        return -EINVAL;
    if (end <= offset)
        return 0;
    rc = nbm_copy_span(&c, offset, end);
    free(c.buf);
    return rc < 0 ? rc : end - offset;
}

/* Deallocate [offset, offset+length) without changing the file size.  The
 * range then reads as zeros.  Returns 0 or -errno (notably -EOPNOTSUPP,
 * which callers handle by writing zeros themselves). */
int nbm_punch_hole(int fd, int64_t offset, int64_t length)
{
    if (offset < 0 || length < 0)
        return -EINVAL;
    if (length == 0)
        return 0;
    while (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     (off_t)offset, (off_t)length) != 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}
