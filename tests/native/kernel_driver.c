/* kernel_driver.c - compares every SIMD path the CPU has with the scalar path, bit for bit.
 *
 * Built by tests/test_kernel_arm.py: cross-compiled statically for aarch64 and run under qemu-aarch64
 * with CPU models that have / lack dotprod and i8mm, and natively on the build host. It includes the
 * engine's C source (static functions and all), so it tests exactly what the library compiles.
 *
 *   matmul  random ternary matrices, formats t2 / t1, mp 1/2/3/6 column- and row-parallel splits,
 *           padded k, rows not a multiple of 4, T = 1..37 activation rows, int8 and int8x2
 *           (k = 2560: several cache-blocking chunks of row groups and of activation rows),
 *           activations, 1 and 3 threads (3: chunks of 8 rows, SPECTRA_CHUNK_ROWS, so many chunks are
 *           taken from the pool's counter): every path == scalar (memcmp); a row alone == the same row
 *           inside T = 37; scalar == a float64 evaluation of the same integer dots (the packer here
 *           and the kernel's decoders agree).
 *   forward a tiny random model (padded dims, mp = 2, vocab not a multiple of 4) with an f16 and a q8
 *           head, int8 / int8x2, fp32 and (where the engine has it) f16 KV cache: prefill (all logits),
 *           decode steps and a ragged two-sequence step on 1 and 2 threads (2: chunks of 8 rows); NEON paths == scalar logits (memcmp). x86 paths are compared in matmul
 *           only (their fp32 forward pieces - exp, FMA head - differ from scalar by design).
 * Prints "paths: ..." then one line per failure and "ALL OK" (exit 0) or "FAILED n" (exit 1). */
#include "spectra_infer.c"

#include <stdio.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return rng_state;
}
static float unif(void) { return (float)((rnd() >> 11) * (1.0 / 9007199254740992.0)); }
static float gauss(void) {
    float u = unif() + 1e-7f, v = unif();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}
static uint16_t drv_f32_to_f16(float f) {  /* round to nearest even, normal range only (test data) */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, m = x & 0x7fffff;
    if (e < 113) return (uint16_t)sign;  /* flush tiny values to zero */
    uint32_t h = ((e - 112) << 10) | (m >> 13), rest = m & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } while (0)

/* ---------------------------------------------------------------- packing (docs/packed-format.md) */
static void pack_block(int fmt, const uint8_t *c, uint8_t *out) {
    if (fmt == SPX_FMT_T2) {
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 32; j++)
                out[h * 32 + j] = (uint8_t)(c[h * 128 + j] | c[h * 128 + 32 + j] << 2 | c[h * 128 + 64 + j] << 4 | c[h * 128 + 96 + j] << 6);
        return;
    }
    static const struct { int off, n, base, stride, width; } g[3] = {{0, 32, 0, 32, 5}, {32, 16, 160, 16, 5}, {48, 4, 240, 4, 4}};
    for (int s = 0; s < 3; s++)
        for (int j = 0; j < g[s].n; j++) {
            int v = 0, p = 1;
            for (int d = 0; d < g[s].width; d++) { v = v * 3 + c[g[s].base + d * g[s].stride + j]; p *= 3; }
            out[g[s].off + j] = (uint8_t)((v * 256 + p - 1) / p);
        }
}

typedef struct { spx_mat m; uint8_t *w; float *gamma; int8_t *q; /* [rows, k] ternary */ } test_mat;

static void make_mat(test_mat *t, int rows, int k, int mp, int split, int fmt) {
    int nseg = split ? mp : 1, seg = k / nseg, segp = (seg + QK - 1) / QK * QK, kp = nseg * segp, nb = kp / QK;
    int rb = nb * (fmt == SPX_FMT_T2 ? T2_BLOCK : T1_BLOCK);
    t->w = malloc((size_t)rows * rb); t->gamma = malloc(sizeof(float) * mp); t->q = malloc((size_t)rows * k);
    uint8_t *codes = malloc(kp), dec[QK];
    for (int i = 0; i < mp; i++) t->gamma[i] = 0.005f + 0.045f * unif();
    for (int r = 0; r < rows; r++) {
        memset(codes, 1, kp);
        for (int j = 0; j < k; j++) {
            uint64_t u = rnd() % 10;
            int8_t v = u < 3 ? -1 : u < 7 ? 0 : 1;
            t->q[(size_t)r * k + j] = v;
            codes[(j / seg) * segp + j % seg] = (uint8_t)(v + 1);
        }
        for (int b = 0; b < nb; b++) {
            uint8_t *o = t->w + (size_t)r * rb + b * (fmt == SPX_FMT_T2 ? T2_BLOCK : T1_BLOCK);
            pack_block(fmt, codes + b * QK, o);
            decode_block_scalar(fmt, o, dec);
            CHECK(!memcmp(dec, codes + b * QK, QK), "packer/decoder disagree fmt %d row %d block %d", fmt, r, b);
        }
    }
    free(codes);
    spx_mat m = {t->w, t->gamma, rows, k, kp, mp, split, fmt, rb};
    t->m = m;
}
static void free_mat(test_mat *t) { free(t->w); free(t->gamma); free(t->q); }

static const char *kname(int k) {
    static const char *n[] = {"auto", "scalar", "avx2", "avx512", "neon", "i8mm", "avxvnni"};
    return n[k];
}

/* float64 value of what the kernel computes (its own quantized activations, exact integer dots) */
static double ref_out(const test_mat *t, const int8_t *q, const float *d, int nl, int row_t, int r) {
    const spx_mat *m = &t->m;
    int nseg = m->split ? m->mp : 1, seg = m->k / nseg, segp = m->kp / nseg, nb = m->kp / QK, rps = m->rows / (m->split ? 1 : m->mp);
    double y = 0;
    for (int l = 0; l < nl; l++)
        for (int j = 0; j < m->k; j++) {
            int jp = (j / seg) * segp + j % seg, b = jp / QK;
            double g = m->split ? m->gamma[j / seg] : m->gamma[r / rps];
            y += g * t->q[(size_t)r * m->k + j] * q[((size_t)row_t * nl + l) * m->kp + jp] * (double)d[((size_t)row_t * nl + l) * nb + b];
        }
    return y;
}

static void test_matmuls(const int *kernels, int nk) {
    static const int shapes[][4] = {{37, 512, 1, 0}, {48, 768, 3, 1}, {36, 1536, 6, 1}, {42, 300, 2, 0}, {30, 384, 3, 1}, {21, 1280, 2, 1},
                                      {132, 2560, 2, 1}};  /* several cache-blocking chunks of row groups and of T */
    static const int Ts[] = {1, 2, 3, 5, 8, 37};
    int n_cmp = 0;
    for (int fmt = 2; fmt >= 1; fmt--)
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            test_mat t;
            make_mat(&t, shapes[si][0], shapes[si][1], shapes[si][2], shapes[si][3], fmt);
            const spx_mat *m = &t.m;
            int k = m->k, rows = m->rows, nseg = m->split ? m->mp : 1, nb = m->kp / QK;
            float *x = malloc(sizeof(float) * 37 * k);
            for (int i = 0; i < 37 * k; i++) x[i] = gauss() * (0.1f + 3.0f * (float)(i % k) / k);
            x[3] = 40.0f;  /* an outlier */
            for (int nl = 1; nl <= 2; nl++) {
                float *ref = malloc(sizeof(float) * 37 * rows), *y = malloc(sizeof(float) * 37 * rows);
                CHECK(spx_matmul(m, x, 37, ref, 1, K_SCALAR, nl) == 0, "scalar matmul failed");
                /* the scalar path against float64 (validates the packer and decoders above) */
                int8_t *q = malloc((size_t)37 * nl * m->kp);
                float *d = malloc(sizeof(float) * 37 * nl * nb);
                int32_t *is = malloc(sizeof(int32_t) * 37 * nl * nb);
                spx_quantize(x, 37, k, nseg, m->kp, nl, q, d, is, K_SCALAR);
                for (int tt = 0; tt < 37; tt += 9)
                    for (int r = 0; r < rows; r += 5) {
                        double e = ref_out(&t, q, d, nl, tt, r);
                        CHECK(fabs(e - ref[(size_t)tt * rows + r]) <= 1e-4 * (fabs(e) + 1e-3), "scalar vs float64 fmt %d shape %zu nl %d: %g vs %g", fmt, si, nl, ref[(size_t)tt * rows + r], e);
                    }
                free(q); free(d); free(is);
                for (int ki = 0; ki < nk; ki++)
                    for (size_t ti = 0; ti < sizeof(Ts) / sizeof(Ts[0]); ti++)
                        for (int nth = 1; nth <= 3; nth += 2) {
                            int T = Ts[ti];
                            setenv("SPECTRA_CHUNK_ROWS", nth > 1 ? "8" : "64", 1);  /* read when the pool starts */
                            CHECK(spx_matmul(m, x, T, y, nth, kernels[ki], nl) == 0, "matmul failed");
                            n_cmp++;
                            CHECK(!memcmp(y, ref, sizeof(float) * T * rows), "matmul %s != scalar: fmt t%d rows %d k %d mp %d split %d T %d nl %d threads %d",
                                  kname(kernels[ki]), fmt, rows, k, m->mp, m->split, T, nl, nth);
                        }
                /* a row alone (T = 1) == the same row inside T = 37 */
                for (int ki = 0; ki < nk; ki++) {
                    spx_matmul(m, x + (size_t)36 * k, 1, y, 2, kernels[ki], nl);
                    CHECK(!memcmp(y, ref + (size_t)36 * rows, sizeof(float) * rows), "matmul %s: row 36 alone != inside T=37 (fmt t%d k %d nl %d)", kname(kernels[ki]), fmt, k, nl);
                }
                free(ref); free(y);
            }
            free(x);
            free_mat(&t);
        }
    printf("matmul: %d comparisons\n", n_cmp);
}

/* ---------------------------------------------------------------- tiny model */
typedef struct {
    spx_model m;
    spx_layer L[2];
    test_mat mats[2][7];
    uint16_t *embed, *head16;
    int8_t *head8;
    float *hscale, *norms, *fnorm, *cosb, *sinb;
} tiny_model;

static void make_model(tiny_model *tm, int head_fmt) {
    int D = 320, H = 5, hd = 64, F = 640, V = 300, NL = 2, mp = 2, ML = 64;
    memset(tm, 0, sizeof(*tm));
    tm->embed = malloc(2 * (size_t)V * D); tm->head16 = malloc(2 * (size_t)V * D);
    tm->head8 = malloc((size_t)V * D); tm->hscale = malloc(4 * V);
    tm->norms = malloc(4 * (size_t)NL * 2 * D); tm->fnorm = malloc(4 * D);
    tm->cosb = malloc(4 * (size_t)ML * hd); tm->sinb = malloc(4 * (size_t)ML * hd);
    for (int i = 0; i < V * D; i++) { tm->embed[i] = drv_f32_to_f16(gauss() * 0.5f); tm->head16[i] = drv_f32_to_f16(gauss() * 0.05f); }
    for (int r = 0; r < V; r++) {
        tm->hscale[r] = 0.0005f + 0.001f * unif();
        for (int j = 0; j < D; j++) tm->head8[r * D + j] = (int8_t)((int)(rnd() % 255) - 127);
    }
    for (int i = 0; i < NL * 2 * D; i++) tm->norms[i] = 1.0f + 0.1f * gauss();
    for (int i = 0; i < D; i++) tm->fnorm[i] = 1.0f + 0.1f * gauss();
    for (int p = 0; p < ML; p++)
        for (int i = 0; i < hd / 2; i++) {
            double inv = 1.0 / pow(10000.0, 2.0 * i / hd), a = p * inv;
            tm->cosb[p * hd + i] = tm->cosb[p * hd + i + hd / 2] = (float)cos(a);
            tm->sinb[p * hd + i] = tm->sinb[p * hd + i + hd / 2] = (float)sin(a);
        }
    for (int l = 0; l < NL; l++) {
        /* q, k, v, gate, up: column-parallel; o, down: row-parallel (k split into mp padded segments) */
        static const int split[7] = {0, 0, 0, 1, 0, 0, 1};
        int rows[7] = {D, D, D, D, F, F, D}, ks[7] = {D, D, D, D, D, D, F};
        for (int i = 0; i < 7; i++) make_mat(&tm->mats[l][i], rows[i], ks[i], mp, split[i], l == 0 ? 2 : 1);
        spx_layer *L = &tm->L[l];
        L->q = tm->mats[l][0].m; L->k = tm->mats[l][1].m; L->v = tm->mats[l][2].m; L->o = tm->mats[l][3].m;
        L->gate = tm->mats[l][4].m; L->up = tm->mats[l][5].m; L->down = tm->mats[l][6].m;
        L->attn_norm = tm->norms + (size_t)l * 2 * D; L->ffn_norm = tm->norms + (size_t)l * 2 * D + D;
    }
    spx_model m = {D, NL, H, hd, F, V, 1e-5f, 0.0f, tm->embed, tm->fnorm, head_fmt, 512,
                   head_fmt ? (const void *)tm->head8 : (const void *)tm->head16, tm->hscale, tm->L, tm->cosb, tm->sinb, ML, 0};
    tm->m = m;
}

static void free_model(tiny_model *tm) {
    for (int l = 0; l < 2; l++) for (int i = 0; i < 7; i++) free_mat(&tm->mats[l][i]);
    free(tm->embed); free(tm->head16); free(tm->head8); free(tm->hscale); free(tm->norms); free(tm->fnorm);
    free(tm->cosb); free(tm->sinb);
}

/* spx_state_new with or without the trailing KV-cache-type argument (kv_f16: 0 fp32, 1 f16), whichever
 * the engine source has: _Generic picks the call matching its type at compile time. */
typedef spx_state *(*state_new7)(const spx_model *, int, int, int, int, int, int);
typedef spx_state *(*state_new8)(const spx_model *, int, int, int, int, int, int, int);
__attribute__((unused)) static spx_state *new_via7(state_new7 f, const spx_model *m, int t, int l, int s, int th, int k, int nl, int kv) {
    (void)kv;
    return f(m, t, l, s, th, k, nl);
}
__attribute__((unused)) static spx_state *new_via8(state_new8 f, const spx_model *m, int t, int l, int s, int th, int k, int nl, int kv) {
    return f(m, t, l, s, th, k, nl, kv);
}
#define STATE_NEW(...) _Generic(&spx_state_new, state_new8: new_via8, default: new_via7)(spx_state_new, __VA_ARGS__)

/* prefill 7 (all logits) + 3 decode steps on slot 0, then a ragged step (slot 0: 1 token, slot 1: 4) */
static int run_model(const spx_model *m, int kernel, int nl, int nth, int kv, float *out) {
    setenv("SPECTRA_CHUNK_ROWS", nth > 1 ? "8" : "64", 1);  /* several threads: many small chunks */
    spx_state *s = STATE_NEW(m, 8, 64, 2, nth, kernel, nl, kv);
    if (!s) return -1;
    int V = m->vocab, n = 0;
    int32_t toks[8] = {5, 17, 299, 0, 42, 42, 7, 1};
    if (spx_forward(s, toks, 7, out, 1)) return -2;
    n += 7;
    for (int i = 0; i < 3; i++) { if (spx_forward(s, toks + i, 1, out + (size_t)n * V, 0)) return -3; n++; }
    int32_t slots[2] = {0, 1}, counts[2] = {1, 4}, rt[5] = {3, 100, 200, 250, 9};
    if (spx_step(s, 2, slots, counts, rt, out + (size_t)n * V, 0)) return -4;
    spx_state_free(s);
    return 0;
}

static void test_forward(const int *kernels, int nk) {
    int n_cmp = 0;
    for (int head = 0; head <= 1; head++) {
        tiny_model tm;
        make_model(&tm, head);
        size_t n = (size_t)12 * tm.m.vocab;
        float *ref = malloc(4 * n), *y = malloc(4 * n);
        for (int nl = 1; nl <= 2; nl++)
          for (int kv = 0; kv <= 1; kv++) {
            CHECK(run_model(&tm.m, K_SCALAR, nl, 1, kv, ref) == 0, "scalar forward failed");
            int finite = 1;
            for (size_t i = 0; i < n; i++) finite &= isfinite(ref[i]) && fabsf(ref[i]) < 1e6f;
            CHECK(finite, "scalar forward: non-finite logits");
            CHECK(run_model(&tm.m, K_SCALAR, nl, 2, kv, y) == 0 && !memcmp(y, ref, 4 * n), "scalar forward: 2 threads != 1 (head %d nl %d kv %d)", head, nl, kv);
            for (int ki = 0; ki < nk; ki++) {
                if (kernels[ki] != K_NEON && kernels[ki] != K_I8MM) continue;
                for (int nth = 1; nth <= 2; nth++) {
                    CHECK(run_model(&tm.m, kernels[ki], nl, nth, kv, y) == 0, "%s forward failed", kname(kernels[ki]));
                    n_cmp++;
                    size_t bad = 0;
                    while (bad < n && !memcmp(y + bad, ref + bad, 4)) bad++;
                    CHECK(bad == n, "forward %s != scalar (head %s, nl %d, kv %d, threads %d): first difference at logit %zu (%.9g vs %.9g)",
                          kname(kernels[ki]), head ? "q8" : "f16", nl, kv, nth, bad, bad < n ? y[bad] : 0.0, bad < n ? ref[bad] : 0.0);
                }
            }
        }
        free(ref); free(y);
        free_model(&tm);
    }
    printf("forward: %d comparisons\n", n_cmp);
}

int main(void) {
    int kernels[8], nk = 0;
    printf("paths:");
    for (int k = K_AVX2; k <= K_AVXVNNI; k++)
        if (spx_cpu_supports(k)) { kernels[nk++] = k; printf(" %s", kname(k)); }
    printf(" scalar; best %s\n", kname(spx_best_kernel()));
    test_matmuls(kernels, nk);
    test_forward(kernels, nk);
    if (failures) { printf("FAILED %d\n", failures); return 1; }
    printf("ALL OK\n");
    return 0;
}
