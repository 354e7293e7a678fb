/* 3x3 convolutions (stride 1, padding 1) in bfloat16 on Intel AMX tiles, for the bf16 CPU fast path.
 *
 * Written for Fast-ODE (models/amx_conv.py loads it). oneDNN's convolutions pay a per-call cost of about
 * 100-200 us (primitive look-up, descriptors, weight reorders) that is as large as the arithmetic of the
 * U-Net's 7x7 and 14x14 layers, and its weight gradients reach only 0.2-0.5 of the matrix units there
 * (docs/speed.md). These kernels are plain loops of tile loads and TDPBF16PS on layouts made for them:
 *
 * - forward and input gradient: each image is copied into a zero-padded (H+2) x (W+2) grid, channels last.
 *   An output position p = h (W+2) + w on that grid reads its tap (dh, dw) at p + dh (W+2) + dw, one
 *   constant offset per tap, so 16 consecutive positions are one tile load (row stride: the channels).
 *   The columns w = W, W+1 of the grid are computed and thrown away (2/(W+2) of the work).
 *   The input gradient is the same convolution of the output gradient with the taps reversed and the
 *   weight's two channel axes swapped (fo_conv3x3_pack's `transpose`).
 * - weight gradient: for each tap, sum over images and positions of x[p + offset] (channels x positions,
 *   the A tile) times gy[p] (positions x output channels, in pairs of positions: the B tile's VNNI layout).
 *   x comes in NCHW order (PyTorch's own layout copy), gy channels last. Images go in groups whose packed
 *   data stays in L2; the accumulators of every tap stay in memory
 *   between groups.
 * Accumulation is float32 (the tiles'); outputs are rounded to bfloat16 to nearest even, as PyTorch does.
 * Channel counts must be multiples of 32. Without AMX at compile time everything returns "not built".
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1: the process may use the tiles (asked of the kernel once); 0: it may not. */
int fo_amx_ready(void) {
    static int state = -1;
    if (state < 0)
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Tiles 0-3: float32 accumulators (16 x 16); 4-5: A (16 rows x 32 bf16); 6-7: B (16 pairs x 16 x 2). */
static void tiles_on(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int i = 0; i < 8; i++) {
        config.colsb[i] = 64;
        config.rows[i] = 16;
    }
    _tile_loadconfig(&config);
}

static inline float bf16_to_float(bf16 v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline bf16 float_to_bf16(float f) {   /* to nearest even, NaN kept a NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (bf16)((bits >> 16) | 0x40);
    return (bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* weight [co][ci][3][3] -> B tiles [n / 16][tap][k / 32][16 pairs of k][16 n][2], n = co and k = ci;
   transpose: n = ci, k = co and the taps reversed (the input gradient's weight). */
void fo_conv3x3_pack(const bf16 *w, bf16 *out, int64_t co, int64_t ci, int transpose) {
    int64_t n_count = transpose ? ci : co, k_count = transpose ? co : ci, kc = k_count / 32;
    for (int64_t nb = 0; nb < n_count / 16; nb++)
        for (int t = 0; t < 9; t++)
            for (int64_t k = 0; k < kc; k++) {
                bf16 *tile = out + ((nb * 9 + t) * kc + k) * 512;
                for (int r = 0; r < 16; r++)
                    for (int j = 0; j < 16; j++)
                        for (int e = 0; e < 2; e++) {
                            int64_t n = nb * 16 + j, kk = k * 32 + 2 * r + e;
                            tile[r * 32 + j * 2 + e] = transpose ? w[(kk * ci + n) * 9 + (8 - t)]
                                                                 : w[(n * ci + kk) * 9 + t];
                        }
            }
}

/* y [N][H][W][co] (channels last) = bias + conv(x [N][H][W][c], packed weight); bias may be NULL.
   Returns 0, or -1 if scratch memory could not be had. */
int fo_conv3x3_forward(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, int64_t N, int64_t H,
                       int64_t W, int64_t C, int64_t CO) {
    int64_t Wp = W + 2, M = H * Wp, Mpad = (M + 31) / 32 * 32, rows = Mpad + 2 * Wp + 2, KC = C / 32;
    bf16 *grid = (bf16 *)malloc((size_t)rows * C * 2);
    float *block = (float *)aligned_alloc(64, 32 * 32 * 4);
    float *bias32 = (float *)malloc((size_t)CO * 4);
    if (!grid || !block || !bias32) {
        free(grid); free(block); free(bias32);
        return -1;
    }
    for (int64_t o = 0; o < CO; o++)
        bias32[o] = bias ? bf16_to_float(bias[o]) : 0.0f;
    tiles_on();
    for (int64_t n = 0; n < N; n++) {
        memset(grid, 0, (size_t)rows * C * 2);
        for (int64_t h = 0; h < H; h++)
            memcpy(grid + ((h + 1) * Wp + 1) * C, x + ((n * H + h) * W) * C, (size_t)(W * C * 2));
        for (int64_t mb = 0; mb < Mpad; mb += 32)
            for (int64_t nb = 0; nb < CO / 16; nb += 2) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int t = 0; t < 9; t++) {
                    const bf16 *a = grid + (mb + (t / 3) * Wp + t % 3) * C;
                    const bf16 *b0 = packed + (nb * 9 + t) * KC * 512;
                    const bf16 *b1 = packed + ((nb + 1) * 9 + t) * KC * 512;
                    for (int64_t k = 0; k < KC; k++) {
                        _tile_loadd(4, a + k * 32, C * 2);
                        _tile_loadd(5, a + 16 * C + k * 32, C * 2);
                        _tile_loadd(6, b0 + k * 512, 64);
                        _tile_loadd(7, b1 + k * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, block, 128);
                _tile_stored(1, block + 16, 128);
                _tile_stored(2, block + 512, 128);
                _tile_stored(3, block + 528, 128);
                __m512 bias0 = _mm512_loadu_ps(bias32 + nb * 16), bias1 = _mm512_loadu_ps(bias32 + nb * 16 + 16);
                for (int i = 0; i < 32; i++) {
                    int64_t p = mb + i, h = p / Wp, w = p % Wp;
                    if (h >= H || w >= W)
                        continue;
                    bf16 *out = y + ((n * H + h) * W + w) * CO + nb * 16;
                    __m256bh v0 = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(block + i * 32), bias0));
                    __m256bh v1 = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(block + i * 32 + 16), bias1));
                    _mm256_storeu_si256((__m256i *)out, (__m256i)v0);
                    _mm256_storeu_si256((__m256i *)(out + 16), (__m256i)v1);
                }
            }
    }
    _tile_release();
    free(grid); free(block); free(bias32);
    return 0;
}

/* The weight gradient gw [co][c][3][3] and the bias gradient gb [co] (NULL: not wanted), bf16, of
   fo_conv3x3_forward for x [N][c][H][W] (NCHW: PyTorch's layout copy transposes it faster than a loop here)
   and the output gradient gy [N][H][W][co] (channels last). Returns 0 or -1. */
int fo_conv3x3_weight_grad(const bf16 *x, const bf16 *gy, bf16 *gw, bf16 *gb, int64_t N, int64_t H, int64_t W,
                           int64_t C, int64_t CO) {
    int64_t Wp = W + 2, M = H * Wp, Mpad = (M + 31) / 32 * 32, ld = Mpad + 2 * Wp + 2 + 32;
    int64_t NCB = C / 32, NOB = CO / 32;
    bf16 *xt = (bf16 *)malloc((size_t)(N * C * ld + N * Mpad * CO) * 2);   /* [N][c][ld], then gy's pairs */
    float *acc = (float *)aligned_alloc(64, (size_t)(9 * NCB * NOB) * 4096);
    if (!xt || !acc) {
        free(xt); free(acc);
        return -1;
    }
    bf16 *pairs = xt + N * C * ld;                    /* [N][Mpad / 2][co][2]: zero where no pixel */
    /* interleave two rows of 32 values: out[2j + e] = row_e[j], j < 16 (lo) and 16 <= j < 32 (hi) */
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    float bias_sum[CO];
    for (int64_t o = 0; o < CO; o++)
        bias_sum[o] = 0.0f;
    for (int64_t n = 0; n < N; n++) {
        bf16 *t = xt + n * C * ld;
        for (int64_t c = 0; c < C; c++) {             /* the padding of the transposed grid */
            bf16 *row = t + c * ld;
            memset(row, 0, (size_t)(Wp + 1) * 2);
            for (int64_t h = 0; h < H; h++) {
                row[(h + 1) * Wp + W + 1] = 0;
                row[(h + 2) * Wp] = 0;
            }
            memset(row + (H + 1) * Wp + 1, 0, (size_t)(ld - (H + 1) * Wp - 1) * 2);
        }
        for (int64_t c = 0; c < C; c++)               /* x is in NCHW order here: rows of W pixels */
            for (int64_t h = 0; h < H; h++)
                memcpy(t + c * ld + (h + 1) * Wp + 1, x + ((n * C + c) * H + h) * W, (size_t)W * 2);
        bf16 *g = pairs + n * Mpad * CO;
        for (int64_t r = 0; r < Mpad / 2; r++) {
            const bf16 *row[2];
            for (int e = 0; e < 2; e++) {
                int64_t p = 2 * r + e, h = p / Wp, w = p % Wp;
                row[e] = (h < H && w < W) ? gy + ((n * H + h) * W + w) * CO : NULL;
            }
            for (int64_t ob = 0; ob < CO; ob += 32) {
                __m512i a = row[0] ? _mm512_loadu_si512(row[0] + ob) : _mm512_setzero_si512();
                __m512i b = row[1] ? _mm512_loadu_si512(row[1] + ob) : _mm512_setzero_si512();
                _mm512_storeu_si512(g + (r * CO + ob) * 2, _mm512_permutex2var_epi16(a, lo, b));
                _mm512_storeu_si512(g + (r * CO + ob) * 2 + 32, _mm512_permutex2var_epi16(a, hi, b));
            }
            if (gb)
                for (int e = 0; e < 2; e++)
                    if (row[e])
                        for (int64_t o = 0; o < CO; o++)
                            bias_sum[o] += bf16_to_float(row[e][o]);
        }
    }
    int64_t per_image = (C * ld + Mpad * CO) * 2, group = (512 * 1024) / per_image;
    group = group < 1 ? 1 : (group > N ? N : group);
    tiles_on();
    for (int64_t g0 = 0; g0 < N; g0 += group) {
        int64_t g1 = g0 + group < N ? g0 + group : N;
        for (int t = 0; t < 9; t++) {
            int64_t offset = (t / 3) * Wp + t % 3;
            for (int64_t cb = 0; cb < NCB; cb++)
                for (int64_t ob = 0; ob < NOB; ob++) {
                    float *c = acc + ((t * NCB + cb) * NOB + ob) * 1024;
                    if (g0 == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        _tile_loadd(0, c, 128); _tile_loadd(1, c + 16, 128);
                        _tile_loadd(2, c + 512, 128); _tile_loadd(3, c + 528, 128);
                    }
                    for (int64_t n = g0; n < g1; n++) {
                        const bf16 *a = xt + (n * C + cb * 32) * ld + offset;
                        const bf16 *b = pairs + n * Mpad * CO + ob * 64;
                        for (int64_t k = 0; k < Mpad; k += 32) {
                            _tile_loadd(4, a + k, ld * 2);
                            _tile_loadd(5, a + 16 * ld + k, ld * 2);
                            _tile_loadd(6, b + k * CO, CO * 4);
                            _tile_loadd(7, b + k * CO + 32, CO * 4);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128);
                    _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
                }
        }
    }
    _tile_release();
    for (int t = 0; t < 9; t++)                       /* block row: input channel; column: output channel */
        for (int64_t cb = 0; cb < NCB; cb++)
            for (int64_t ob = 0; ob < NOB; ob++) {
                const float *c = acc + ((t * NCB + cb) * NOB + ob) * 1024;
                for (int i = 0; i < 32; i++)
                    for (int j = 0; j < 32; j++)
                        gw[((ob * 32 + j) * C + cb * 32 + i) * 9 + t] = float_to_bf16(c[i * 32 + j]);
            }
    if (gb)
        for (int64_t o = 0; o < CO; o++)
            gb[o] = float_to_bf16(bias_sum[o]);
    free(xt); free(acc);
    return 0;
}

#else

int fo_amx_ready(void) { return 0; }
void fo_conv3x3_pack(const bf16 *w, bf16 *out, int64_t co, int64_t ci, int transpose) {
    (void)w; (void)out; (void)co; (void)ci; (void)transpose;
}
int fo_conv3x3_forward(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, int64_t N, int64_t H,
                       int64_t W, int64_t C, int64_t CO) {
    (void)x; (void)packed; (void)bias; (void)y; (void)N; (void)H; (void)W; (void)C; (void)CO;
    return -2;
}
int fo_conv3x3_weight_grad(const bf16 *x, const bf16 *gy, bf16 *gw, bf16 *gb, int64_t N, int64_t H, int64_t W,
                           int64_t C, int64_t CO) {
    (void)x; (void)gy; (void)gw; (void)gb; (void)N; (void)H; (void)W; (void)C; (void)CO;
    return -2;
}

#endif
