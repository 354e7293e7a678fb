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
    int64_t n0, n1;       /* this worker's batch range */
    int status;
} job_t;

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
        repeat_row(wa, sum, C, R);
        repeat_row(wb, sq, C, R);
        for (int64_t p = 0; p < HW; p += R) {
            const int64_t offset = base + p * C, count = (p + R <= HW ? R : HW - p) * C;
            load_row(job->x, job->bf, offset, count, tile);
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
    float *buf = malloc((size_t)(11 * T + 6 * C) * sizeof(float));
    if (!buf) {
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
        repeat_row(w.mean, row, C, R);
        repeat_row(w.rstd, row + C, C, R);
        for (int64_t i = 0; i < T; i++)
            ws1[i] = ws2[i] = 0.0f;
        /* pass 1: the pre-activation gradient (stored in grad_x's buffer, in the storage type, as PyTorch's
         * separate SiLU backward stores it), and its sums and sums times xhat per channel */
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
            store_row(job->y, job->bf, offset, count, grad);
            if (job->grad_add) /* d add = the sum of dx over the positions (before rounding to storage) */
                for (int64_t i = 0; i < count; i++)
                    ws1[i] += grad[i];
        }
        if (job->grad_add)
            fold_rows(job->grad_add + n * C, ws1, C, R);
    }
    free(buf);
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
static int run_jobs(job_t *proto, int threads, int backward) {
    if (threads < 1)
        threads = 1;
    if (threads > proto->N)
        threads = (int)proto->N;
    if (threads > 64)
        threads = 64;
    job_t jobs[64];
    pthread_t ids[64];
    int started[64] = {0};
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
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, backward ? run_backward : run_forward, &jobs[i]) == 0;
    for (int i = 1; i < threads; i++)
        if (!started[i]) /* no thread: do its share here */
            backward ? backward_range(&jobs[i]) : forward_range(&jobs[i]);
    backward ? backward_range(&jobs[0]) : forward_range(&jobs[0]);
    int status = jobs[0].status;
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(ids[i], NULL);
        status |= jobs[i].status;
    }
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

int fo_group_norm_act_forward(const void *x, void *y, int bf, const float *weight, const float *bias,
                              const float *add, float *mean, float *rstd, int64_t N, int64_t HW, int64_t C,
                              int64_t G, float eps, int silu, uint32_t kept, float scale, uint32_t key0,
                              uint32_t key1, int threads) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G)
        return 2;
    job_t job = {x, NULL, y, bf, weight, bias, add, NULL, mean, rstd, NULL, NULL, N, HW, C, G, eps, silu, kept,
                 scale, key0, key1, 0, N, 0};
    return run_jobs(&job, threads, 0);
}

/* grad_weight and grad_bias are overwritten */
/* grad_add (with add): [N][C], written */
int fo_group_norm_act_backward(const void *x, const void *gy, void *gx, int bf, const float *weight,
                               const float *bias, const float *add, const float *mean, const float *rstd,
                               float *grad_weight, float *grad_bias, float *grad_add, int64_t N, int64_t HW,
                               int64_t C, int64_t G, int silu, uint32_t kept, float scale, uint32_t key0,
                               uint32_t key1, int threads) {
    if (N < 1 || HW < 1 || C < 1 || G < 1 || C % G)
        return 2;
    memset(grad_weight, 0, (size_t)C * sizeof(float));
    memset(grad_bias, 0, (size_t)C * sizeof(float));
    job_t job = {x, gy, gx, bf, weight, bias, add, add ? grad_add : NULL, (float *)mean, (float *)rstd,
                 grad_weight, grad_bias, N, HW, C, G, 0.0f, silu, kept, scale, key0, key1, 0, N, 0};
    return run_jobs(&job, threads, 1);
}

/* the dropout factors of elements [0, count) under a seed: for tests of the mask itself */
void fo_dropout_factors(float *out, int64_t count, uint32_t kept, float scale, uint32_t key0, uint32_t key1) {
    for (int64_t e = 0; e < count; e++)
        out[e] = drop_factor((uint32_t)e, key0, key1, kept, scale);
}
