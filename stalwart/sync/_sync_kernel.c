/* stalwart weight-sync kernel: the delta codec's word loops, one pass each.
 *
 * Built on first use by stalwart/sync/native.py (the same way as the host optimizer
 * kernel, stalwart/offload/_host_kernel.c). Every function has a numpy equivalent in
 * stalwart/sync/codec.py, used when no compiler is available; both give the same bits.
 *
 * Words are raw bits (1, 2, 4 or 8 bytes) compared as integers. Arrays need no
 * alignment (loads and stores go through memcpy or unaligned vector moves).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define SW_AVX512 1
#endif

#define SW_SYNC_ABI 1
/* the diff kernels may write this many elements past the last one they return */
#define SW_SLACK 64
/* bytes ahead the diff loops prefetch (hardware prefetchers lag behind its compute) */
#ifndef SW_PREFETCH
#define SW_PREFETCH 4096
#endif
/* elements ahead the scatters prefetch their destination */
#ifndef SW_SCATTER_AHEAD
#define SW_SCATTER_AHEAD 128
#endif

int sw_sync_abi(void) { return SW_SYNC_ABI; }
int sw_sync_slack(void) { return SW_SLACK; }
int sw_sync_simd(void) {
#ifdef SW_AVX512
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- diff
 *
 * sw_diff_w<bytes>(cur, base, n, off, idx, nw, xw, room, pidx, pnew, pk, pdelta): first
 * base[pidx[j] + pdelta] = pnew[j] for j < pk (changes the baseline still owes: sorted,
 * inside [0, n), checked by the caller), then the words i of [0, n) where cur[i] != base[i],
 * in order: idx[k] = off + i, nw[k] = cur[i], xw[k] = cur[i] ^ base[i]. The two run
 * interleaved, SUB words at a time, so the baseline's lines are read from memory once
 * while cur streams in. Returns k, or -1 once fewer than SW_SLACK elements of room would
 * be left (too many changes: the caller takes another path; the pending changes are
 * then all written, what was written to idx/nw/xw is garbage).
 */
#define SUB 2048

#define DIFF_SCALAR(T, NAME)                                                                  \
    static int64_t NAME(const T *cur, const T *base, int64_t i, int64_t n, int64_t off,       \
                        int64_t *idx, T *nw, T *xw, int64_t k, int64_t room) {                \
        const int64_t per = 8 / (int64_t)sizeof(T);                                           \
        for (; i + per <= n; i += per) {                                                      \
            uint64_t a, b;                                                                    \
            memcpy(&a, cur + i, 8);                                                           \
            memcpy(&b, base + i, 8);                                                          \
            if (a == b) continue;                                                             \
            if (k + per + SW_SLACK > room) return -1;                                         \
            for (int64_t j = 0; j < per; j++) { /* branch-free: write, count if changed */    \
                T c, o;                                                                       \
                memcpy(&c, cur + i + j, sizeof(T));                                           \
                memcpy(&o, base + i + j, sizeof(T));                                          \
                T x = (T)(c ^ o);                                                             \
                idx[k] = off + i + j;                                                         \
                memcpy(nw + k, &c, sizeof(T));                                                \
                memcpy(xw + k, &x, sizeof(T));                                                \
                k += x != 0;                                                                  \
            }                                                                                 \
        }                                                                                     \
        for (; i < n; i++) {                                                                  \
            T c, o;                                                                           \
            memcpy(&c, cur + i, sizeof(T));                                                   \
            memcpy(&o, base + i, sizeof(T));                                                  \
            if (c == o) continue;                                                             \
            if (k + 1 + SW_SLACK > room) return -1;                                           \
            idx[k] = off + i;                                                                 \
            T x = (T)(c ^ o);                                                                 \
            memcpy(nw + k, &c, sizeof(T));                                                    \
            memcpy(xw + k, &x, sizeof(T));                                                    \
            k++;                                                                              \
        }                                                                                     \
        return k;                                                                             \
    }

DIFF_SCALAR(uint8_t, range8)
DIFF_SCALAR(uint16_t, tail16)
DIFF_SCALAR(uint32_t, tail32)
DIFF_SCALAR(uint64_t, range64)

#ifdef SW_AVX512
/* indices first .. first + lanes - 1 of the set bits of m, compressed to idx + k */
static inline void put_idx(int64_t *idx, int64_t k, int64_t first, uint32_t m, int lanes) {
    __m512i v = _mm512_add_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(first));
    const __m512i eight = _mm512_set1_epi64(8);
    for (int q = 0; q < lanes / 8; q++) {
        __mmask8 mq = (__mmask8)(m >> (8 * q));
        _mm512_storeu_si512((void *)(idx + k), _mm512_maskz_compress_epi64(mq, v));
        k += __builtin_popcount(mq);
        v = _mm512_add_epi64(v, eight);
    }
}
#endif

static int64_t range16(const uint16_t *cur, const uint16_t *base, int64_t i, int64_t n, int64_t off,
                       int64_t *idx, uint16_t *nw, uint16_t *xw, int64_t k, int64_t room) {
#ifdef SW_AVX512
    for (; i + 32 <= n; i += 32) {
        _mm_prefetch((const char *)(cur + i) + SW_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(base + i) + SW_PREFETCH, _MM_HINT_T0);
        __m512i a = _mm512_loadu_si512((const void *)(cur + i));
        __m512i b = _mm512_loadu_si512((const void *)(base + i));
        __mmask32 m = _mm512_cmpneq_epi16_mask(a, b);
        if (!m) continue;
        if (k + 32 + SW_SLACK > room) return -1;
        _mm512_storeu_si512((void *)(nw + k), _mm512_maskz_compress_epi16(m, a));
        _mm512_storeu_si512((void *)(xw + k), _mm512_maskz_compress_epi16(m, _mm512_xor_si512(a, b)));
        put_idx(idx, k, off + i, (uint32_t)m, 32);
        k += __builtin_popcount((uint32_t)m);
    }
#endif
    return tail16(cur, base, i, n, off, idx, nw, xw, k, room);
}

static int64_t range32(const uint32_t *cur, const uint32_t *base, int64_t i, int64_t n, int64_t off,
                       int64_t *idx, uint32_t *nw, uint32_t *xw, int64_t k, int64_t room) {
#ifdef SW_AVX512
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(cur + i) + SW_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(base + i) + SW_PREFETCH, _MM_HINT_T0);
        __m512i a = _mm512_loadu_si512((const void *)(cur + i));
        __m512i b = _mm512_loadu_si512((const void *)(base + i));
        __mmask16 m = _mm512_cmpneq_epi32_mask(a, b);
        if (!m) continue;
        if (k + 16 + SW_SLACK > room) return -1;
        _mm512_storeu_si512((void *)(nw + k), _mm512_maskz_compress_epi32(m, a));
        _mm512_storeu_si512((void *)(xw + k), _mm512_maskz_compress_epi32(m, _mm512_xor_si512(a, b)));
        put_idx(idx, k, off + i, (uint32_t)m, 16);
        k += __builtin_popcount((uint32_t)m);
    }
#endif
    return tail32(cur, base, i, n, off, idx, nw, xw, k, room);
}

#define DIFF(T, W, RANGE)                                                                     \
    int64_t sw_diff_w##W(const T *cur, T *base, int64_t n, int64_t off, int64_t *idx, T *nw,  \
                         T *xw, int64_t room, const int64_t *pidx, const T *pnew, int64_t pk,  \
                         int64_t pdelta) {                                                    \
        int64_t k = 0, p = 0;                                                                 \
        for (int64_t s = 0; s < n; s += SUB) {                                                \
            int64_t e = n - s < SUB ? n : s + SUB;                                            \
            for (; p < pk && pidx[p] + pdelta < e; p++)                                       \
                memcpy(base + (pidx[p] + pdelta), pnew + p, sizeof(T));                       \
            if (k >= 0) k = RANGE(cur, base, s, e, off, idx, nw, xw, k, room);                \
        }                                                                                     \
        for (; p < pk; p++) memcpy(base + (pidx[p] + pdelta), pnew + p, sizeof(T));           \
        return k;                                                                             \
    }

DIFF(uint8_t, 1, range8)
DIFF(uint16_t, 2, range16)
DIFF(uint32_t, 4, range32)
DIFF(uint64_t, 8, range64)

/* ---------------------------------------------------------------- scatter
 *
 * sw_scatter_w<bytes>(dst, n, idx, vals, k, delta, xor): dst[idx[j] + delta] = vals[j]
 * (xor: ^= vals[j]) for j < k. Returns 0, or -1 (nothing written) if an index falls
 * outside [0, n).
 */

#define SCATTER(T, NAME)                                                                      \
    int NAME(T *dst, int64_t n, const int64_t *idx, const T *vals, int64_t k, int64_t delta,  \
             int xor) {                                                                       \
        int64_t lo = INT64_MAX, hi = INT64_MIN;                                               \
        for (int64_t j = 0; j < k; j++) {                                                     \
            int64_t v = idx[j];                                                               \
            lo = v < lo ? v : lo;                                                             \
            hi = v > hi ? v : hi;                                                             \
        }                                                                                     \
        if (k && (lo < -delta || hi >= n - delta)) /* |delta| < 2^62: no overflow */          \
            return -1;                                                                        \
        if (xor) {                                                                            \
            for (int64_t j = 0; j < k; j++) {                                                 \
                if (j + SW_SCATTER_AHEAD < k)                                                 \
                    __builtin_prefetch(dst + (idx[j + SW_SCATTER_AHEAD] + delta), 1);         \
                T v, o;                                                                       \
                memcpy(&v, vals + j, sizeof(T));                                              \
                memcpy(&o, dst + (idx[j] + delta), sizeof(T));                                            \
                o ^= v;                                                                       \
                memcpy(dst + (idx[j] + delta), &o, sizeof(T));                                            \
            }                                                                                 \
        } else {                                                                              \
            for (int64_t j = 0; j < k; j++) {                                                 \
                if (j + SW_SCATTER_AHEAD < k)                                                 \
                    __builtin_prefetch(dst + (idx[j + SW_SCATTER_AHEAD] + delta), 1);         \
                memcpy(dst + (idx[j] + delta), vals + j, sizeof(T));                          \
            }                                                                                 \
        }                                                                                     \
        return 0;                                                                             \
    }

SCATTER(uint8_t, sw_scatter_w1)
SCATTER(uint16_t, sw_scatter_w2)
SCATTER(uint32_t, sw_scatter_w4)
SCATTER(uint64_t, sw_scatter_w8)

/* ---------------------------------------------------------------- cast
 *
 * sw_cast_f32_bf16(src, dst, n): fp32 -> bf16, rounding to nearest even, the integer
 * formula torch's CPU cast uses (bitwise the same for every non-NaN input). Returns
 * whether a NaN was seen: torch's NaN bits differ between its vector and scalar loops,
 * so the caller then casts the range with torch itself.
 */
int sw_cast_f32_bf16(const uint32_t *restrict src, uint16_t *restrict dst, int64_t n) {
    uint32_t nan = 0;
    int64_t i = 0;
#ifdef SW_AVX512
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    __mmask16 vnan = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(src + i) + 2048, _MM_HINT_T0);
        __m512i x = _mm512_loadu_si512((const void *)(src + i));
        vnan |= _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs), inf);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, bias), lsb), 16);
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(r));
    }
    nan = vnan;
#endif
    for (; i < n; i++) {
        uint32_t x = src[i];
        nan |= (x & 0x7FFFFFFFu) > 0x7F800000u;
        dst[i] = (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
    }
    return nan != 0;
}

/* ---------------------------------------------------------------- gap codes
 *
 * The index section of codec.py (little-endian): count codes of c bytes (1 or 2), the
 * gap d_j = i_j - i_{j-1} (d_0 = i_0) or, from E = 2^(8c) - 1 up, E; then one 2c-byte
 * exception per escaped code, min(d, 2^(16c) - 1); then one u64 per exception that is
 * all ones. (Little-endian hosts only: native.py does not load the kernel elsewhere.)
 */

/* sizes[0..3] = escaped and u64 gaps with 8-bit codes, then with 16-bit codes */
void sw_gap_sizes(const int64_t *idx, int64_t k, int64_t *sizes) {
    int64_t e8 = 0, l8 = 0, l16 = 0;
    if (k) {
        uint64_t d = (uint64_t)idx[0];
        e8 = d >= 0xFFu;
        l8 = d >= 0xFFFFu;
        l16 = d >= 0xFFFFFFFFu;
    }
    for (int64_t j = 1; j < k; j++) { /* no carried dependency: vectorises */
        uint64_t d = (uint64_t)(idx[j] - idx[j - 1]);
        e8 += d >= 0xFFu;
        l8 += d >= 0xFFFFu;
        l16 += d >= 0xFFFFFFFFu;
    }
    sizes[0] = e8;
    sizes[1] = l8;
    sizes[2] = l8; /* a 16-bit code escapes what an 8-bit exception cannot hold */
    sizes[3] = l16;
}

/* writes the section for 1- or 2-byte codes (esc: escaped gaps, from sw_gap_sizes); returns its bytes */
int64_t sw_gap_write(const int64_t *idx, int64_t k, int c, int64_t esc, uint8_t *out) {
    uint8_t *pe = out + k * c, *pl = pe + esc * 2 * c;
    int64_t prev = 0;
    if (c == 1) {
        for (int64_t j = 0; j < k; j++) {
            uint64_t d = (uint64_t)(idx[j] - prev);
            prev = idx[j];
            out[j] = d < 0xFFu ? (uint8_t)d : 0xFFu;
            if (d >= 0xFFu) {
                uint16_t x = d < 0xFFFFu ? (uint16_t)d : 0xFFFFu;
                memcpy(pe, &x, 2);
                pe += 2;
                if (d >= 0xFFFFu) {
                    memcpy(pl, &d, 8);
                    pl += 8;
                }
            }
        }
    } else {
        for (int64_t j = 0; j < k; j++) {
            uint64_t d = (uint64_t)(idx[j] - prev);
            prev = idx[j];
            uint16_t code = d < 0xFFFFu ? (uint16_t)d : 0xFFFFu;
            memcpy(out + 2 * j, &code, 2);
            if (d >= 0xFFFFu) {
                uint32_t x = d < 0xFFFFFFFFu ? (uint32_t)d : 0xFFFFFFFFu;
                memcpy(pe, &x, 4);
                pe += 4;
                if (d >= 0xFFFFFFFFu) {
                    memcpy(pl, &d, 8);
                    pl += 8;
                }
            }
        }
    }
    return pl - out;
}

/* indices from a section of nbytes (count codes of c bytes) for a range of length words;
 * returns 0, or -1 for a malformed section (the caller's numpy code then names the fault) */
int sw_gap_read(const uint8_t *buf, int64_t nbytes, int c, int64_t count, int64_t length, int64_t *idx) {
    if (count <= 0 || nbytes < c * count) return -1;
    const uint8_t *pe = buf + c * count;
    int64_t rest = nbytes - c * count, esc = 0, nlong = 0;
    const uint64_t emax = c == 1 ? 0xFFu : 0xFFFFu, xmax = c == 1 ? 0xFFFFu : 0xFFFFFFFFu;
    if (rest) { /* without exceptions, escape codes are gaps of their own value */
        if (c == 1) {
            for (int64_t j = 0; j < count; j++) esc += buf[j] == 0xFFu;
        } else {
            for (int64_t j = 0; j < count; j++) {
                uint16_t x;
                memcpy(&x, buf + 2 * j, 2);
                esc += x == 0xFFFFu;
            }
        }
        if (rest < esc * 2 * c) return -1;
        for (int64_t j = 0; j < esc; j++) {
            uint64_t x = 0;
            memcpy(&x, pe + j * 2 * c, 2 * c);
            nlong += x == xmax;
        }
        if (rest != esc * 2 * c + 8 * nlong) return -1;
    }
    const uint8_t *pl = pe + esc * 2 * c;
    uint64_t lim = length > 1 ? (uint64_t)length : 1, pos = 0;
    for (int64_t j = 0; j < count; j++) {
        uint64_t d;
        if (c == 1) {
            d = buf[j];
        } else {
            uint16_t x;
            memcpy(&x, buf + 2 * j, 2);
            d = x;
        }
        if (d == emax && rest) {
            d = 0;
            memcpy(&d, pe, 2 * c);
            pe += 2 * c;
            if (d == xmax) {
                memcpy(&d, pl, 8);
                pl += 8;
                if (d >= lim) return -1;
            }
        }
        pos += d; /* gaps below 2^32 or below length, count <= length: no overflow */
        idx[j] = (int64_t)pos;
    }
    return (int64_t)pos >= length ? -1 : 0;
}

/* ---------------------------------------------------------------- byte planes
 *
 * sw_shuffle(x, k, w, out): plane j of out (k bytes at out + j*k) holds byte j of every
 * one of the k words of w bytes at x; sw_unshuffle is its inverse.
 */
void sw_shuffle(const uint8_t *restrict x, int64_t k, int w, uint8_t *restrict out) {
    if (w == 2) {
        uint8_t *restrict hi = out + k;
        for (int64_t j = 0; j < k; j++) {
            out[j] = x[2 * j];
            hi[j] = x[2 * j + 1];
        }
        return;
    }
    for (int64_t j = 0; j < k; j++)
        for (int b = 0; b < w; b++) out[b * k + j] = x[j * w + b];
}

void sw_unshuffle(const uint8_t *restrict planes, int64_t k, int w, uint8_t *restrict x) {
    if (w == 2) {
        const uint8_t *restrict hi = planes + k;
        for (int64_t j = 0; j < k; j++) {
            x[2 * j] = planes[j];
            x[2 * j + 1] = hi[j];
        }
        return;
    }
    for (int64_t j = 0; j < k; j++)
        for (int b = 0; b < w; b++) x[j * w + b] = planes[b * k + j];
}
