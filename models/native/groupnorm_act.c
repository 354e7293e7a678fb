/* GroupNorm + SiLU + dropout as one operation, forward and backward, for channels_last (NHWC) activations on a CPU.
 *
 * Why: in a bf16 U-Net step on a CPU with AMX, oneDNN's channels_last convolutions run near the matrix units'
 * speed, but PyTorch's channels_last GroupNorm is 5-10x slower than its NCHW one, and GroupNorm, SiLU and
 * dropout each make their own passes over memory, forward and backward (docs/speed.md). These kernels do
 * the block's "GN -> SiLU -> dropout" in two passes forward (statistics, output) and two backward, with
 * float32 arithmetic whatever the storage type (float32 or bfloat16) and float32 affine parameters.
 *
 * Optionally a per-sample, per-channel value (the U-Net block's time embedding) is added to x first, saving
 * that addition's own pass over memory forward and its reduction backward.
 *
 * Layout: x is [N][HW][C] in memory (a channels_last [N, C, H, W] tensor), group g holds the channels
 * [g C/G, (g+1) C/G). Statistics: the biased variance over a group's C/G x HW values, as F.group_norm.
 * Dropout: element e (its index in memory, NHWC order) is kept when 16 bits of a hash of (e, seed) are
 * below `kept`; kept values are multiplied by `scale` (65536 / kept, so the mask's mean is exactly 1). The
 * backward pass recomputes the mask from the seed, so nothing but x and the statistics is stored; between
 * its two passes it keeps the gradient before the normalisation in grad_x's buffer (in the storage type, as
 * PyTorch's separate SiLU backward would store it).
 *
 * Built by models/fused_norm.py with the system C compiler (cc -O3 -march=native) and called via ctypes;
 * plain C11 + pthreads, no PyTorch headers. The loops run over tiles of whole rows with the per-channel
 * values repeated along them, so that the compiler vectorises them (each lane is its own channel: no
 * reassociation of sums is needed). SiLU's exp and reciprocal are polynomial / Newton approximations
 * (below 3e-7 relative for float32 storage, 3e-4 for bfloat16 storage, whose own rounding is 2^-9).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_to_float(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as PyTorch's conversion; NaN stays a (quiet) NaN */
static inline bf16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (bf16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

static void load_row(const void *base, int bf, int64_t offset, int64_t count, float *restrict out) {
    if (bf) {
        const bf16_t *src = (const bf16_t *)base + offset;
        for (int64_t i = 0; i < count; i++)
            out[i] = bf16_to_float(src[i]);
    } else {
        memcpy(out, (const float *)base + offset, (size_t)count * sizeof(float));
    }
}

static void store_row(void *base, int bf, int64_t offset, int64_t count, const float *restrict in) {
    if (bf) {
        bf16_t *dst = (bf16_t *)base + offset;
        for (int64_t i = 0; i < count; i++)
            dst[i] = float_to_bf16(in[i]);
    } else {
        memcpy((float *)base + offset, in, (size_t)count * sizeof(float));
    }
}

/* exp(x) for x in [-87, 80] (clamped outside: 1 + e^80 stays within the range of `reciprocal`'s guess, and
 * sigmoid(-80) = 1.8e-35 is zero for every purpose): e^(k ln2) e^f with |f| <= ln2 / 2 and a Taylor polynomial of
 * e^f, degree 7 (relative error below 2e-7) or, `coarse`, 5 (below 3e-6); branch-free so that the loops
 * around it vectorise */
static inline float exp_approx(float x, int coarse) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 80.0f ? 80.0f : x;
    float t = x * 1.4426950408889634f;
    float k = (t + 12582912.0f) - 12582912.0f; /* round to nearest integer (|t| < 2^22) */
    float f = (t - k) * 0.6931471805599453f;    /* e^f = 2^(t - k), |f| <= ln2 / 2 */
    float p = coarse ? 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120)))))
                     : 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120
                       + f * (1.0f / 720 + f * (1.0f / 5040)))))));
    union { int32_t i; float f; } scale = {.i = ((int32_t)k + 127) << 23};
    return p * scale.f;
}

/* 1 / d for d >= 1 without a division (a vector division costs about as much as the rest of SiLU): the
 * bit-pattern guess is within 12.5%; three Newton steps bring it below 1e-7 relative, two below 3e-4 */
static inline float reciprocal(float d, int steps) {
    union { int32_t i; float f; } guess = {.f = d};
    guess.i = 0x7ef311c7 - guess.i;
    float r = guess.f;
    r = r * (2.0f - d * r);
    r = r * (2.0f - d * r);
    if (steps > 2)
        r = r * (2.0f - d * r);
    return r;
}

/* `coarse` (bfloat16 storage, whose rounding is 2^-9): a shorter exp and two Newton steps, 3e-4 relative */
static inline float sigmoid(float a, int coarse) {
    float s = reciprocal(1.0f + exp_approx(-a, coarse), coarse ? 2 : 3);
    return a < -80.0f ? 0.0f : s; /* below -80 the true value is < 2e-35: 0, so that SiLU(-1e30) is -0 too */
}

/* lowbias32 (C. Wellons' integer hash) of the element index plus one key; the other key is XORed into the
 * 16 bits compared with `kept` (a bijection of them, so the keep rate stays exactly kept / 65536) */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline float drop_factor(uint32_t e, uint32_t key0, uint32_t key1, uint32_t kept, float scale) {
    uint32_t bits = (mix32(e + key0) ^ key1) >> 16;
    return bits < kept ? scale : 0.0f;
}

typedef struct {
    const void *x;        /* [N][HW][C], float32 or bfloat16 */
    const void *gy;       /* backward: gradient of y, same type and layout */
    void *y;              /* forward: output; backward: gradient of x */
    int bf;               /* storage is bfloat16 (else float32) */
    const float *weight;  /* [C] */
    const float *bias;    /* [C] */
    const float *add;     /* [N][C] or NULL: added to x (per sample and channel) before the normalisation */
    float *grad_add;      /* backward, with add: [N][C], its gradient */
    float *mean;          /* [N][G] */
    float *rstd;          /* [N][G] */
    float *grad_weight;   /* backward: [C], accumulated over the batch */
    float *grad_bias;     /* backward: [C] */
    int64_t N, HW, C, G;
    float eps;
    int silu;
    uint32_t kept;        /* dropout: keep threshold on 16 bits */
    float scale;          /* dropout: factor of kept values (0 = no dropout) */
    uint32_t key0, key1;  /* dropout: the seed */
    void *xs;             /* forward: NULL or the pass-through output xs_scale * x (the block's residual) */
    float xs_scale;
    const void *gres;     /* backward: NULL or the gradient of xs: grad_x += xs_scale * gres */
    uint16_t *mask;       /* dropout in the AVX-512 passes: NULL, or one 16-bit keep mask per 16 elements (memory
                             order), written by the forward and read by the backward instead of re-hashing */
    int64_t n0, n1;       /* this worker's batch range */
    int status;
} job_t;

/* ---- AVX-512 versions of the four passes (x86 with AVX-512F, C a multiple of 16) ------------------------
 * The same arithmetic as the portable loops below, 16 channels per register, with the per-channel values
 * held in registers and bfloat16 converted in registers, so that each pass is one sweep over memory
 * (the portable loops go through float32 tile buffers: 2-3x slower on this project's AMX Xeon). Channels
 * are taken in blocks of up to 64 (V = 1..4 registers); within a block, pixels in memory order. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define FO_VECTOR 1
#define FO_INLINE static inline __attribute__((always_inline))

FO_INLINE __m512 vload(const void *base, const int bf, int64_t offset) {
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const bf16_t *)base + offset))), 16));
    return _mm512_loadu_ps((const float *)base + offset);
}

/* float_to_bf16 of 16 lanes: round to nearest even, NaN to a quiet NaN */
FO_INLINE void vstore(void *base, const int bf, int64_t offset, __m512 v) {
    if (!bf) {
        _mm512_storeu_ps((float *)base + offset, v);
        return;
    }
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
    _mm256_storeu_si256((__m256i *)((bf16_t *)base + offset), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

/* sigmoid(a) = 1 / (1 + e^-a), 0 below -80, as `sigmoid` above but with fewer operations:
 * - e^-a = 2^k e^f (|f| <= ln2 / 2) scaled by `scalef`, whose result for a large k is +inf, not garbage:
 *   no upper clamp is needed (a < -80 is masked to 0 at the end), only the lower one at -87 (a -> +inf
 *   gives 1);
 * - float32 storage: Taylor polynomial of degree 7 (2e-7 relative), the hardware's 14-bit reciprocal
 *   estimate and two Newton steps;
 * - bfloat16 storage (rounding 2^-9 = 2e-3): degree 4 (4e-5 relative) and the 14-bit estimate alone
 *   (6e-5), so sigmoid is within 1e-4 relative before the output's rounding to bfloat16 */
FO_INLINE __m512 vsigmoid(__m512 a, const int coarse) {
    __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_sub_ps(_mm512_setzero_ps(), a)); /* NaN passes */
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, k), _mm512_set1_ps(0.6931471805599453f));
    __m512 p;
    if (coarse) {
        p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.0f / 24), _mm512_set1_ps(1.0f / 6));
    } else {
        p = _mm512_fmadd_ps(f, _mm512_set1_ps(1.0f / 5040), _mm512_set1_ps(1.0f / 720));
        p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f / 120));
        p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f / 24));
        p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f / 6));
    }
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, k));
    __m512 r = _mm512_rcp14_ps(d);
    if (!coarse) {
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
        r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    }
    __mmask16 tiny = _mm512_cmp_ps_mask(a, _mm512_set1_ps(-80.0f), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(r, tiny, _mm512_setzero_ps());
}

/* the keep mask of the 16 elements offset .. offset + 15 (drop_factor's test) */
FO_INLINE __mmask16 vdrop_keep(int64_t offset, const job_t *job) {
    __m512i e = _mm512_add_epi32(_mm512_set1_epi32((int32_t)((uint32_t)offset + job->key0)),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    e = _mm512_xor_si512(e, _mm512_srli_epi32(e, 16));
    e = _mm512_mullo_epi32(e, _mm512_set1_epi32((int32_t)0x7feb352du));
    e = _mm512_xor_si512(e, _mm512_srli_epi32(e, 15));
    e = _mm512_mullo_epi32(e, _mm512_set1_epi32((int32_t)0x846ca68bu));
    e = _mm512_xor_si512(e, _mm512_srli_epi32(e, 16));
    __m512i bits = _mm512_srli_epi32(_mm512_xor_si512(e, _mm512_set1_epi32((int32_t)job->key1)), 16);
    return _mm512_cmplt_epu32_mask(bits, _mm512_set1_epi32((int32_t)job->kept));
}

/* drop_factor of those 16 elements: scale where kept, else 0 */
FO_INLINE __m512 vdrop_scale(__mmask16 keep, const job_t *job) {
    return _mm512_maskz_mov_ps(keep, _mm512_set1_ps(job->scale));
}

/* forward pass 1 of one sample: per-channel sums of (x - shift) and of their squares, channels c0 .. c0 + 16 V
 * (two sets of accumulators, even and odd pixels, added at the end) */
FO_INLINE void vstats(const job_t *job, int64_t base, int64_t c0, const int V, const int bf, const float *shift,
                      float *sum, float *sq) {
    const int64_t HW = job->HW, C = job->C;
    __m512 sh[4], s0[4], s1[4], q0[4], q1[4];
    for (int j = 0; j < V; j++) {
        sh[j] = _mm512_loadu_ps(shift + c0 + 16 * j);
        s0[j] = s1[j] = q0[j] = q1[j] = _mm512_setzero_ps();
    }
    int64_t p = 0;
    for (; p + 1 < HW; p += 2) {
        const int64_t at = base + p * C + c0;
        for (int j = 0; j < V; j++) {
            __m512 d0 = _mm512_sub_ps(vload(job->x, bf, at + 16 * j), sh[j]);
            __m512 d1 = _mm512_sub_ps(vload(job->x, bf, at + C + 16 * j), sh[j]);
            s0[j] = _mm512_add_ps(s0[j], d0);
            q0[j] = _mm512_fmadd_ps(d0, d0, q0[j]);
            s1[j] = _mm512_add_ps(s1[j], d1);
            q1[j] = _mm512_fmadd_ps(d1, d1, q1[j]);
        }
    }
    if (p < HW)
        for (int j = 0; j < V; j++) {
            __m512 d0 = _mm512_sub_ps(vload(job->x, bf, base + p * C + c0 + 16 * j), sh[j]);
            s0[j] = _mm512_add_ps(s0[j], d0);
            q0[j] = _mm512_fmadd_ps(d0, d0, q0[j]);
        }
    for (int j = 0; j < V; j++) {
        _mm512_storeu_ps(sum + c0 + 16 * j, _mm512_add_ps(s0[j], s1[j]));
        _mm512_storeu_ps(sq + c0 + 16 * j, _mm512_add_ps(q0[j], q1[j]));
    }
}

/* forward pass 2 of one sample: y = dropout(silu(x a + b)), channels c0 .. c0 + 16 V */
FO_INLINE void voutput(const job_t *job, int64_t base, int64_t c0, const int V, const int bf, const float *a,
                       const float *b) {
    const int64_t HW = job->HW, C = job->C;
    const int silu = job->silu, drop = job->scale > 0.0f;
    __m512 va[4], vb[4];
    for (int j = 0; j < V; j++) {
        va[j] = _mm512_loadu_ps(a + c0 + 16 * j);
        vb[j] = _mm512_loadu_ps(b + c0 + 16 * j);
    }
    const __m512 xs_scale = _mm512_set1_ps(job->xs_scale);
    for (int64_t p = 0; p < HW; p++) {
        const int64_t at = base + p * C + c0;
        for (int j = 0; j < V; j++) {
            __m512 raw = vload(job->x, bf, at + 16 * j);
            if (job->xs)
                vstore(job->xs, bf, at + 16 * j, _mm512_mul_ps(raw, xs_scale));
            __m512 v = _mm512_fmadd_ps(raw, va[j], vb[j]);
            if (silu)
                v = _mm512_mul_ps(v, vsigmoid(v, bf));
            if (drop) {
                const __mmask16 keep = vdrop_keep(at + 16 * j, job);
                if (job->mask)
                    job->mask[(at + 16 * j) >> 4] = (uint16_t)keep;
                v = _mm512_mul_ps(v, vdrop_scale(keep, job));
            }
            vstore(job->y, bf, at + 16 * j, v);
        }
    }
}

/* backward pass 1 of one sample: the pre-activation gradient g (stored in grad_x's buffer, rounded to the
 * storage type) and the per-channel sums of g and g xhat, xhat = (x - m) r */
FO_INLINE void vgrad_pre(const job_t *job, int64_t base, int64_t c0, const int V, const int bf, const float *m,
                         const float *r, float *s1, float *s2, float *scratch) {
    const int64_t HW = job->HW, C = job->C;
    const int silu = job->silu, drop = job->scale > 0.0f;
    __m512 vm[4], vr[4], vw[4], vb[4], a1[4], a2[4];
    for (int j = 0; j < V; j++) {
        vm[j] = _mm512_loadu_ps(m + c0 + 16 * j);
        vr[j] = _mm512_loadu_ps(r + c0 + 16 * j);
        vw[j] = _mm512_loadu_ps(job->weight + c0 + 16 * j);
        vb[j] = _mm512_loadu_ps(job->bias + c0 + 16 * j);
        a1[j] = a2[j] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < HW; p++) {
        const int64_t at = base + p * C + c0;
        for (int j = 0; j < V; j++) {
            __m512 xh = _mm512_mul_ps(_mm512_sub_ps(vload(job->x, bf, at + 16 * j), vm[j]), vr[j]);
            __m512 g = vload(job->gy, bf, at + 16 * j);
            if (drop)
                g = _mm512_mul_ps(g, vdrop_scale(job->mask ? (__mmask16)job->mask[(at + 16 * j) >> 4]
                                                           : vdrop_keep(at + 16 * j, job), job));
            if (silu) {
                __m512 v = _mm512_fmadd_ps(xh, vw[j], vb[j]);
                __m512 s = vsigmoid(v, bf);
                __m512 one = _mm512_set1_ps(1.0f);
                g = _mm512_mul_ps(g, _mm512_mul_ps(s, _mm512_fmadd_ps(v, _mm512_sub_ps(one, s), one)));
            }
            _mm512_storeu_ps(scratch + (at - base) + 16 * j, g);
            a1[j] = _mm512_add_ps(a1[j], g);
            a2[j] = _mm512_fmadd_ps(g, xh, a2[j]);
        }
    }
    for (int j = 0; j < V; j++) {
        _mm512_storeu_ps(s1 + c0 + 16 * j, a1[j]);
        _mm512_storeu_ps(s2 + c0 + 16 * j, a2[j]);
    }
}

/* backward pass 2 of one sample: dx = r (g w - p1 - xhat p2) over the stored g; with `grad_add`, its sums */
FO_INLINE void vgrad_x(const job_t *job, int64_t base, int64_t c0, const int V, const int bf, const float *m,
                       const float *r, const float *p1, const float *p2, float *grad_add, const float *scratch) {
    const int64_t HW = job->HW, C = job->C;
    __m512 vm[4], vr[4], vw[4], v1[4], v2[4], ga[4];
    const __m512 xs_scale = _mm512_set1_ps(job->xs_scale);
    for (int j = 0; j < V; j++) {
        vm[j] = _mm512_loadu_ps(m + c0 + 16 * j);
        vr[j] = _mm512_loadu_ps(r + c0 + 16 * j);
        vw[j] = _mm512_loadu_ps(job->weight + c0 + 16 * j);
        v1[j] = _mm512_loadu_ps(p1 + c0 + 16 * j);
        v2[j] = _mm512_loadu_ps(p2 + c0 + 16 * j);
        ga[j] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < HW; p++) {
        const int64_t at = base + p * C + c0;
        for (int j = 0; j < V; j++) {
            __m512 xh = _mm512_mul_ps(_mm512_sub_ps(vload(job->x, bf, at + 16 * j), vm[j]), vr[j]);
            __m512 g = _mm512_loadu_ps(scratch + (at - base) + 16 * j);
            __m512 dx = _mm512_mul_ps(vr[j], _mm512_sub_ps(_mm512_fmsub_ps(g, vw[j], v1[j]),
                                                            _mm512_mul_ps(xh, v2[j])));
            if (grad_add)
                ga[j] = _mm512_add_ps(ga[j], dx);
            if (job->gres)
                dx = _mm512_fmadd_ps(vload(job->gres, bf, at + 16 * j), xs_scale, dx);
            vstore(job->y, bf, at + 16 * j, dx);
        }
    }
    if (grad_add)
        for (int j = 0; j < V; j++)
            _mm512_storeu_ps(grad_add + c0 + 16 * j, ga[j]);
}

/* the four passes over all channels, in blocks of 4, then 1-3, registers; bf and V fixed at compile time */
#define FO_BLOCKS(CALL)                                                                                     \
    do {                                                                                                    \
        int64_t c0 = 0;                                                                                     \
        for (; c0 + 64 <= job->C; c0 += 64) {                                                               \
            if (job->bf) CALL(4, 1); else CALL(4, 0);                                                       \
        }                                                                                                   \
        switch ((job->C - c0) / 16) {                                                                       \
        case 3: if (job->bf) CALL(3, 1); else CALL(3, 0); break;                                            \
        case 2: if (job->bf) CALL(2, 1); else CALL(2, 0); break;                                            \
        case 1: if (job->bf) CALL(1, 1); else CALL(1, 0); break;                                            \
        default: break;                                                                                     \
        }                                                                                                   \
    } while (0)

static void vec_stats(const job_t *job, int64_t base, const float *shift, float *sum, float *sq) {
#define STATS(V, BF) vstats(job, base, c0, V, BF, shift, sum, sq)
    FO_BLOCKS(STATS);
#undef STATS
}

static void vec_output(const job_t *job, int64_t base, const float *a, const float *b) {
#define OUTPUT(V, BF) voutput(job, base, c0, V, BF, a, b)
    FO_BLOCKS(OUTPUT);
#undef OUTPUT
}

static void vec_grad_pre(const job_t *job, int64_t base, const float *m, const float *r, float *s1, float *s2,
                         float *scratch) {
#define PRE(V, BF) vgrad_pre(job, base, c0, V, BF, m, r, s1, s2, scratch)
    FO_BLOCKS(PRE);
#undef PRE
}

static void vec_grad_x(const job_t *job, int64_t base, const float *m, const float *r, const float *p1,
                       const float *p2, float *grad_add, const float *scratch) {
#define GRADX(V, BF) vgrad_x(job, base, c0, V, BF, m, r, p1, p2, grad_add, scratch)
    FO_BLOCKS(GRADX);
#undef GRADX
}
#else
/* without AVX-512 the portable loops run: vector_ok() is 0, and these are never called */
static void vec_stats(const job_t *job, int64_t base, const float *shift, float *sum, float *sq) {
    (void)job, (void)base, (void)shift, (void)sum, (void)sq;
}
static void vec_output(const job_t *job, int64_t base, const float *a, const float *b) {
    (void)job, (void)base, (void)a, (void)b;
}
static void vec_grad_pre(const job_t *job, int64_t base, const float *m, const float *r, float *s1, float *s2,
                         float *scratch) {
    (void)job, (void)base, (void)m, (void)r, (void)s1, (void)s2, (void)scratch;
}
static void vec_grad_x(const job_t *job, int64_t base, const float *m, const float *r, const float *p1,
                       const float *p2, float *grad_add, const float *scratch) {
    (void)job, (void)base, (void)m, (void)r, (void)p1, (void)p2, (void)grad_add, (void)scratch;
}
#endif

/* whether the AVX-512 passes apply */
static int vector_ok(const job_t *job) {
#ifdef FO_VECTOR
    return job->C % 16 == 0;
#else
    (void)job;
    return 0;
#endif
}

/* Rows of C values are processed TILE_ELEMENTS at a time (whole rows), with the per-channel parameters
 * repeated along the tile, so that every loop is one long vectorised sweep (C alone can be as small as 8). */
#define TILE_ELEMENTS 1024

static int64_t tile_rows(int64_t C) { return C >= TILE_ELEMENTS ? 1 : TILE_ELEMENTS / C; }

static void repeat_row(float *restrict dst, const float *restrict row, int64_t C, int64_t rows) {
    for (int64_t r = 0; r < rows; r++)
        memcpy(dst + r * C, row, (size_t)C * sizeof(float));
}

static void fold_rows(float *restrict row, const float *restrict wide, int64_t C, int64_t rows) {
    for (int64_t c = 0; c < C; c++)
        row[c] = 0.0f;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < C; c++)
            row[c] += wide[r * C + c];
}

static void apply_dropout(float *restrict v, int64_t count, int64_t offset, const job_t *job) {
    const uint32_t key0 = job->key0, key1 = job->key1, kept = job->kept;
    const float scale = job->scale;
    for (int64_t i = 0; i < count; i++)
        v[i] *= drop_factor((uint32_t)(offset + i), key0, key1, kept, scale);
}

static void forward_range(job_t *job) {
    const int64_t HW = job->HW, C = job->C, G = job->G, cpg = C / G, R = tile_rows(C), T = R * C;
    const int vec = vector_ok(job);
    float *buf = malloc((size_t)(5 * T + 3 * C) * sizeof(float));
    if (!buf) {
        job->status = 1;
        return;
    }
    float *restrict tile = buf, *restrict wa = buf + T, *restrict wb = buf + 2 * T, *restrict wsum = buf + 3 * T,
          *restrict wsq = buf + 4 * T, *restrict shift = buf + 5 * T, *restrict sum = shift + C, *restrict sq = sum + C;
    for (int64_t n = job->n0; n < job->n1; n++) {
        const int64_t base = n * HW * C;
        /* pass 1: per-channel sums of (x - x[first row]): the shift keeps the variance from cancelling */
        load_row(job->x, job->bf, base, C, shift);
        if (vec) {
            vec_stats(job, base, shift, sum, sq);
        } else {
            repeat_row(wa, shift, C, R);
            for (int64_t i = 0; i < T; i++)
                wsum[i] = wsq[i] = 0.0f;
            for (int64_t p = 0; p < HW; p += R) {
                const int64_t count = (p + R <= HW ? R : HW - p) * C;
                load_row(job->x, job->bf, base + p * C, count, tile);
                for (int64_t i = 0; i < count; i++) {
                    float d = tile[i] - wa[i];
                    wsum[i] += d;
                    wsq[i] += d * d;
                }
            }
            fold_rows(sum, wsum, C, R);
            fold_rows(sq, wsq, C, R);
        }
        if (job->add) /* (x + add) - (x[first row] + add) = x - x[first row]: only the shift moves */
            for (int64_t c = 0; c < C; c++)
                shift[c] += job->add[n * C + c];
        for (int64_t g = 0; g < G; g++) {
            double mean = 0.0, spread = 0.0;
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++)
                mean += (double)shift[c] + (double)sum[c] / (double)HW;
            mean /= (double)cpg;
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                double channel_mean = (double)shift[c] + (double)sum[c] / (double)HW;
                double within = (double)sq[c] - (double)sum[c] * (double)sum[c] / (double)HW;
                spread += (within > 0.0 ? within : 0.0) + (double)HW * (channel_mean - mean) * (channel_mean - mean);
            }
            double var = spread / (double)(cpg * HW);
            job->mean[n * G + g] = (float)mean;
            job->rstd[n * G + g] = (float)(1.0 / sqrt(var + (double)job->eps));
        }
        /* pass 2: v = x a + b (the normalisation and the affine in one), SiLU, dropout */
        for (int64_t c = 0; c < C; c++) {
            float mean = job->mean[n * G + c / cpg], rstd = job->rstd[n * G + c / cpg];
            sum[c] = rstd * job->weight[c];
            sq[c] = job->bias[c] + ((job->add ? job->add[n * C + c] : 0.0f) - mean) * sum[c];
        }
        if (vec) {
            vec_output(job, base, sum, sq);
            continue;
        }
        repeat_row(wa, sum, C, R);
        repeat_row(wb, sq, C, R);
        for (int64_t p = 0; p < HW; p += R) {
            const int64_t offset = base + p * C, count = (p + R <= HW ? R : HW - p) * C;
            load_row(job->x, job->bf, offset, count, tile);
            if (job->xs) {   /* wsum is free after pass 1 */
                for (int64_t i = 0; i < count; i++)
                    wsum[i] = tile[i] * job->xs_scale;
                store_row(job->xs, job->bf, offset, count, wsum);
            }
            if (job->silu && job->bf) {   /* two loops with the precision fixed: each vectorises on its own */
                for (int64_t i = 0; i < count; i++) {
                    float v = tile[i] * wa[i] + wb[i];
                    tile[i] = v * sigmoid(v, 1);
                }
            } else if (job->silu) {
                for (int64_t i = 0; i < count; i++) {
                    float v = tile[i] * wa[i] + wb[i];
                    tile[i] = v * sigmoid(v, 0);
                }
            } else {
                for (int64_t i = 0; i < count; i++)
                    tile[i] = tile[i] * wa[i] + wb[i];
            }
            if (job->scale > 0.0f)
                apply_dropout(tile, count, offset, job);
            store_row(job->y, job->bf, offset, count, tile);
        }
    }
    free(buf);
}

typedef struct {  /* one sample's per-channel values, repeated along a tile */
    float *mean, *rstd, *weight, *bias, *p1, *p2;
} wide_t;

/* the gradient reaching v = xhat w + b (grad, in place), and xhat, for `count` values of a tile */
static void grad_pre_activation(const job_t *job, int64_t offset, int64_t count, const float *restrict x,
                                float *restrict grad, float *restrict xhat, const wide_t *w) {
    const float *restrict mean = w->mean, *restrict rstd = w->rstd, *restrict weight = w->weight,
                *restrict bias = w->bias;
    for (int64_t i = 0; i < count; i++)
        xhat[i] = (x[i] - mean[i]) * rstd[i];
    if (job->scale > 0.0f)
        apply_dropout(grad, count, offset, job);
    if (job->silu && job->bf) {
        for (int64_t i = 0; i < count; i++) {
            float v = xhat[i] * weight[i] + bias[i];
            float s = sigmoid(v, 1);
            grad[i] *= s * (1.0f + v * (1.0f - s));
        }
    } else if (job->silu) {
        for (int64_t i = 0; i < count; i++) {
            float v = xhat[i] * weight[i] + bias[i];
            float s = sigmoid(v, 0);
            grad[i] *= s * (1.0f + v * (1.0f - s));
        }
    }
}

static void backward_range(job_t *job) {
    const int64_t HW = job->HW, C = job->C, G = job->G, cpg = C / G, R = tile_rows(C), T = R * C;
    const int vec = vector_ok(job);
    float *buf = malloc((size_t)(11 * T + 6 * C) * sizeof(float));
    /* the AVX-512 passes keep one sample's pre-activation gradient here, in float32: it stays in the core's
     * cache between the two passes instead of going out to memory through grad_x's buffer */
    float *scratch = vec ? malloc((size_t)(HW * C) * sizeof(float)) : NULL;
    if (!buf || (vec && !scratch)) {
        free(buf);
        free(scratch);
        job->status = 1;
        return;
    }
    float *restrict x = buf, *restrict grad = buf + T, *restrict xhat = buf + 2 * T, *restrict ws1 = buf + 3 * T,
          *restrict ws2 = buf + 4 * T, *restrict row = buf + 11 * T;
    wide_t w = {buf + 5 * T, buf + 6 * T, buf + 7 * T, buf + 8 * T, buf + 9 * T, buf + 10 * T};
    float *restrict s1 = row + 2 * C, *restrict s2 = row + 3 * C, *restrict p1 = row + 4 * C, *restrict p2 = row + 5 * C;
    const double count_group = (double)(cpg * HW);
    repeat_row(w.weight, job->weight, C, R);
    repeat_row(w.bias, job->bias, C, R);
    for (int64_t n = job->n0; n < job->n1; n++) {
        const int64_t base = n * HW * C;
        for (int64_t c = 0; c < C; c++) {
            /* xhat = (x + add - mean) rstd: the add folds into the mean */
            row[c] = job->mean[n * G + c / cpg] - (job->add ? job->add[n * C + c] : 0.0f);
            row[C + c] = job->rstd[n * G + c / cpg];
        }
        /* pass 1: the pre-activation gradient (stored in grad_x's buffer, in the storage type, as PyTorch's
         * separate SiLU backward stores it), and its sums and sums times xhat per channel */
        if (vec) {
            vec_grad_pre(job, base, row, row + C, s1, s2, scratch);
        } else {
            repeat_row(w.mean, row, C, R);
            repeat_row(w.rstd, row + C, C, R);
            for (int64_t i = 0; i < T; i++)
                ws1[i] = ws2[i] = 0.0f;
            for (int64_t p = 0; p < HW; p += R) {
                const int64_t offset = base + p * C, count = (p + R <= HW ? R : HW - p) * C;
                load_row(job->x, job->bf, offset, count, x);
                load_row(job->gy, job->bf, offset, count, grad);
                grad_pre_activation(job, offset, count, x, grad, xhat, &w);
                store_row(job->y, job->bf, offset, count, grad);
                for (int64_t i = 0; i < count; i++) {
                    ws1[i] += grad[i];
                    ws2[i] += grad[i] * xhat[i];
                }
            }
            fold_rows(s1, ws1, C, R);
            fold_rows(s2, ws2, C, R);
        }
        for (int64_t c = 0; c < C; c++) {
            job->grad_bias[c] += s1[c];
            job->grad_weight[c] += s2[c];
        }
        for (int64_t g = 0; g < G; g++) {
            double m1 = 0.0, m2 = 0.0;
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                m1 += (double)job->weight[c] * (double)s1[c];
                m2 += (double)job->weight[c] * (double)s2[c];
            }
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                p1[c] = (float)(m1 / count_group);
                p2[c] = (float)(m2 / count_group);
            }
        }
        if (vec) {
            vec_grad_x(job, base, row, row + C, p1, p2, job->grad_add ? job->grad_add + n * C : NULL, scratch);
            continue;
        }
        repeat_row(w.p1, p1, C, R);
        repeat_row(w.p2, p2, C, R);
        /* pass 2: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dv w */
        const float *restrict wm = w.mean, *restrict wr = w.rstd, *restrict ww = w.weight, *restrict wp1 = w.p1,
                    *restrict wp2 = w.p2;
        if (job->grad_add)
            for (int64_t i = 0; i < T; i++)
                ws1[i] = 0.0f;
        for (int64_t p = 0; p < HW; p += R) {
            const int64_t offset = base + p * C, count = (p + R <= HW ? R : HW - p) * C;
            load_row(job->x, job->bf, offset, count, x);
            load_row(job->y, job->bf, offset, count, grad);
            for (int64_t i = 0; i < count; i++) {
                float xh = (x[i] - wm[i]) * wr[i];
                grad[i] = wr[i] * (grad[i] * ww[i] - wp1[i] - xh * wp2[i]);
            }
            if (job->grad_add) /* d add = the sum of dx over the positions (before rounding to storage) */
                for (int64_t i = 0; i < count; i++)
                    ws1[i] += grad[i];
            if (job->gres) {   /* xhat is free in pass 2 */
                load_row(job->gres, job->bf, offset, count, xhat);
                for (int64_t i = 0; i < count; i++)
                    grad[i] += job->xs_scale * xhat[i];
            }
            store_row(job->y, job->bf, offset, count, grad);
        }
        if (job->grad_add)
            fold_rows(job->grad_add + n * C, ws1, C, R);
    }
    free(buf);
    free(scratch);
}

static void *run_forward(void *job) {
    forward_range((job_t *)job);
    return NULL;
}

static void *run_backward(void *job) {
    backward_range((job_t *)job);
    return NULL;
}

/* Split the batch over `threads` workers (the calling thread is one of them). Backward: each worker
 * accumulates its own parameter gradients, added in worker order at the end (deterministic). */
/* fn(job i) for i < threads (jobs: an array of `size`-byte jobs): jobs 1.. in threads of their own, job 0 in
 * this one, and any job whose thread does not start here too; returns once all are done */
static void run_threads(void *(*fn)(void *), void *jobs, size_t size, int threads) {
    char *job = (char *)jobs;
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, fn, job + i * size) == 0;
    for (int i = 1; i < threads; i++)
        if (!started[i])
            fn(job + i * size);
    fn(job);
    for (int i = 1; i < threads; i++)
        if (started[i])
            pthread_join(ids[i], NULL);
}

static int run_jobs(job_t *proto, int threads, int backward) {
    if (threads < 1)
        threads = 1;
    if (threads > proto->N)
        threads = (int)proto->N;
    if (threads > 64)
        threads = 64;
    job_t jobs[64];
    float *partials = NULL;
    if (backward && threads > 1) {
        partials = calloc((size_t)(2 * proto->C * threads), sizeof(float));
        if (!partials)
            return 1;
    }
    for (int i = 0; i < threads; i++) {
        jobs[i] = *proto;
        jobs[i].n0 = proto->N * i / threads;
        jobs[i].n1 = proto->N * (i + 1) / threads;
        jobs[i].status = 0;
        if (partials) {
            jobs[i].grad_weight = partials + 2 * proto->C * i;
            jobs[i].grad_bias = partials + 2 * proto->C * i + proto->C;
        }
    }
    run_threads(backward ? run_backward : run_forward, jobs, sizeof jobs[0], threads);
    int status = 0;
    for (int i = 0; i < threads; i++)
        status |= jobs[i].status;
    if (partials) {
        for (int i = 0; i < threads; i++)
            for (int64_t c = 0; c < proto->C; c++) {
                proto->grad_weight[c] += jobs[i].grad_weight[c];
                proto->grad_bias[c] += jobs[i].grad_bias[c];
            }
        free(partials);
    }
    return status;
}

/* xs (NULL or like y): also write xs_scale * x there, in the same pass */
int fo_group_norm_act_forward(const void *x, void *y, int bf, const float *weight, const float *bias,
                              const float *add, float *mean, float *rstd, int64_t N, int64_t HW, int64_t C,
                              int64_t G, float eps, int silu, uint32_t kept, float scale, uint32_t key0,
                              uint32_t key1, void *xs, float xs_scale, int threads, uint16_t *mask) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G)
        return 2;
    job_t job = {.x = x, .y = y, .bf = bf, .weight = weight, .bias = bias, .add = add, .mean = mean, .rstd = rstd,
                 .N = N, .HW = HW, .C = C, .G = G, .eps = eps, .silu = silu, .kept = kept, .scale = scale,
                 .key0 = key0, .key1 = key1, .xs = xs, .xs_scale = xs_scale, .n0 = 0, .n1 = N};
    job.mask = vector_ok(&job) && scale > 0.0f ? mask : NULL;
    return run_jobs(&job, threads, 0);
}

/* grad_weight and grad_bias are overwritten */
/* grad_add (with add): [N][C], written */
/* gres (NULL or like gx): the gradient of the forward's pass-through output; gx gets xs_scale * gres added */
int fo_group_norm_act_backward(const void *x, const void *gy, void *gx, int bf, const float *weight,
                               const float *bias, const float *add, const float *mean, const float *rstd,
                               float *grad_weight, float *grad_bias, float *grad_add, int64_t N, int64_t HW,
                               int64_t C, int64_t G, int silu, uint32_t kept, float scale, uint32_t key0,
                               uint32_t key1, const void *gres, float xs_scale, int threads,
                               const uint16_t *mask) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G)
        return 2;
    memset(grad_weight, 0, (size_t)C * sizeof(float));
    memset(grad_bias, 0, (size_t)C * sizeof(float));
    job_t job = {.x = x, .gy = gy, .y = gx, .bf = bf, .weight = weight, .bias = bias, .add = add,
                 .grad_add = add ? grad_add : NULL, .mean = (float *)mean, .rstd = (float *)rstd,
                 .grad_weight = grad_weight, .grad_bias = grad_bias, .N = N, .HW = HW, .C = C, .G = G,
                 .silu = silu, .kept = kept, .scale = scale, .key0 = key0, .key1 = key1, .gres = gres,
                 .xs_scale = xs_scale, .n0 = 0, .n1 = N};
    job.mask = vector_ok(&job) && scale > 0.0f ? (uint16_t *)mask : NULL;
    return run_jobs(&job, threads, 1);
}

/* the dropout factors of elements [0, count) under a seed: for tests of the mask itself */
void fo_dropout_factors(float *out, int64_t count, uint32_t kept, float scale, uint32_t key0, uint32_t key1) {
    for (int64_t e = 0; e < count; e++)
        out[e] = drop_factor((uint32_t)e, key0, key1, kept, scale);
}

/* dst += src over `count` elements of the same storage type (the U-Net block's residual addition): one
 * sweep, float32 arithmetic, bfloat16 rounded to nearest even; PyTorch's bfloat16 addition runs at about half
 * the memory's speed on activations that are not in cache (docs/speed.md) */
static void add_range(void *dst, const void *src, int bf, int64_t begin, int64_t end) {
    int64_t i = begin;
#ifdef FO_VECTOR
    if (bf)
        for (; i + 16 <= end; i += 16)
            vstore(dst, 1, i, _mm512_add_ps(vload(dst, 1, i), vload(src, 1, i)));
    else
        for (; i + 16 <= end; i += 16)
            vstore(dst, 0, i, _mm512_add_ps(vload(dst, 0, i), vload(src, 0, i)));
#endif
    if (bf) {
        bf16_t *d = (bf16_t *)dst;
        const bf16_t *a = (const bf16_t *)src;
        for (; i < end; i++)
            d[i] = float_to_bf16(bf16_to_float(d[i]) + bf16_to_float(a[i]));
    } else {
        float *d = (float *)dst;
        const float *a = (const float *)src;
        for (; i < end; i++)
            d[i] += a[i];
    }
}

typedef struct {
    void *dst;
    const void *src;
    int bf;
    int64_t begin, end;
} add_job_t;

static void *run_add(void *job) {
    add_job_t *a = (add_job_t *)job;
    add_range(a->dst, a->src, a->bf, a->begin, a->end);
    return NULL;
}

void fo_add_inplace(void *dst, const void *src, int bf, int64_t count, int threads) {
    if (threads < 1 || count < 65536)
        threads = 1;
    if (threads > 64)
        threads = 64;
    add_job_t jobs[64];
    for (int i = 0; i < threads; i++) {   /* split on multiples of 16 elements */
        jobs[i] = (add_job_t){dst, src, bf, count / 16 * i / threads * 16, count / 16 * (i + 1) / threads * 16};
        if (i == threads - 1)
            jobs[i].end = count;
    }
    run_threads(run_add, jobs, sizeof jobs[0], threads);
}

/* Many small tensors in one call, for the CPU shard steps' shared weight casts and gradient sums
 * (utils/cpu_shards.py): a few PyTorch operations per parameter cost more than their arithmetic there. The
 * tensors are split among `threads` threads in runs of about equal element counts. */
typedef struct {
    int kind;                 /* 0: cast, 1: sum */
    int64_t t0, t1;           /* the tensors of this thread */
    int64_t sources;          /* sum: sources per tensor */
    void *const *out;         /* cast: bf16 [count]; sum: float32 [count] */
    const void *const *in;    /* cast: float32 [count] per tensor; sum: bf16, `sources` per tensor (NULL: none) */
    const int64_t *count;
    const float *scale;
    const int8_t *layout;     /* sum: per source, 0 the output's order, 1 channels_last of dims [O][I][KH][KW] */
    const int64_t *dims;      /* sum: 4 per tensor */
} many_job_t;

static void cast_one(bf16_t *restrict dst, const float *restrict src, int64_t count, float scale) {
    for (int64_t i = 0; i < count; i++)
        dst[i] = float_to_bf16(src[i] * scale);
}

/* a product and a sum rounded separately, as PyTorch's two operations (the library is built with
 * -ffp-contract=fast, which would fuse them into one multiply-add) */
#if defined(__GNUC__) && !defined(__clang__)
#define FO_SEPARATE_ROUNDING __attribute__((optimize("fp-contract=off")))
#else
#define FO_SEPARATE_ROUNDING
#endif

FO_SEPARATE_ROUNDING
static void sum_one(float *restrict out, const void *const *in, const int8_t *layout, int64_t sources,
                    int64_t count, float scale, const int64_t *dims) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    /* each source times the scale, then added in source order: the numbers of per-shard casts, whose gradients
     * autograd scales in each shard before they are summed */
    int first = 1;
    for (int64_t s = 0; s < sources; s++) {
        const bf16_t *restrict g = (const bf16_t *)in[s];
        if (!g)
            continue;
        if (layout[s] == 0) {
            if (first)
                for (int64_t i = 0; i < count; i++)
                    out[i] = bf16_to_float(g[i]) * scale;
            else
                for (int64_t i = 0; i < count; i++)
                    out[i] += bf16_to_float(g[i]) * scale;
        } else {   /* read in memory order (o, h, w, i), write out[o][i][h][w] */
            const int64_t O = dims[0], I = dims[1], KH = dims[2], KW = dims[3], K = KH * KW;
            for (int64_t o = 0; o < O; o++)
                for (int64_t k = 0; k < K; k++) {
                    const bf16_t *restrict row = g + (o * K + k) * I;
                    float *restrict dst = out + o * I * K + k;
                    if (first)
                        for (int64_t i = 0; i < I; i++)
                            dst[i * K] = bf16_to_float(row[i]) * scale;
                    else
                        for (int64_t i = 0; i < I; i++)
                            dst[i * K] += bf16_to_float(row[i]) * scale;
                }
        }
        first = 0;
    }
}

static void *run_many(void *arg) {
    const many_job_t *job = (const many_job_t *)arg;
    for (int64_t t = job->t0; t < job->t1; t++) {
        if (job->kind == 0)
            cast_one((bf16_t *)job->out[t], (const float *)job->in[t], job->count[t], job->scale[t]);
        else
            sum_one((float *)job->out[t], job->in + t * job->sources, job->layout + t * job->sources, job->sources,
                    job->count[t], job->scale[t], job->dims + 4 * t);
    }
    return NULL;
}

static void run_many_jobs(many_job_t proto, int64_t n, int threads) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++)
        total += proto.count[t];
    if (threads < 1 || total < 65536)
        threads = 1;
    if (threads > 64)
        threads = 64;
    many_job_t jobs[64];
    int64_t t = 0, done = 0;
    for (int i = 0; i < threads; i++) {   /* tensors t0 .. t1 - 1: about total / threads elements */
        jobs[i] = proto;
        jobs[i].t0 = t;
        const int64_t goal = total * (i + 1) / threads;
        while (t < n && (i == threads - 1 || done + proto.count[t] / 2 < goal))
            done += proto.count[t++];
        jobs[i].t1 = t;
    }
    run_threads(run_many, jobs, sizeof jobs[0], threads);
}

/* dst[t] = bf16(src[t] * scale[t]), t < n: the float32 product rounded to nearest even, as PyTorch's
 * (w * s).to(torch.bfloat16) */
void fo_cast_many(int64_t n, const void *const *src, void *const *dst, const int64_t *count, const float *scale,
                  int threads) {
    many_job_t proto = {.kind = 0, .out = dst, .in = src, .count = count, .scale = scale};
    run_many_jobs(proto, n, threads);
}

/* out[t] (float32, `count[t]` elements, in the parameter's order) = the sum, in source order, of scale[t] times
 * the float32 values of its bf16 sources src[t * sources + s] (NULL: absent; layout 1: a channels_last gradient
 * of a [O][I][KH][KW] weight, dims[4 t ..]); left unwritten if every source is absent */
void fo_sum_many(int64_t n, int64_t sources, const void *const *src, const int8_t *layout, const int64_t *dims,
                 void *const *out, const int64_t *count, const float *scale, int threads) {
    many_job_t proto = {.kind = 1, .sources = sources, .out = out, .in = src, .count = count, .scale = scale,
                        .layout = layout, .dims = dims};
    run_many_jobs(proto, n, threads);
}

/* whether the forward of C channels with dropout writes a keep mask (the AVX-512 passes): one uint16 per 16
 * elements, to pass to the backward; 0: pass NULL to both */
int fo_mask_ok(int64_t C) {
    job_t job = {.C = C};
    return vector_ok(&job);
}
