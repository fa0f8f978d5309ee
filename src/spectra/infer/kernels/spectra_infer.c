/*
 * spectra_infer.c - native CPU engine for packed ternary (TriLM) models.
 *
 * Plain C11 + pthreads, no torch ABI. Compiled once per (source hash, compiler,
 * flags) by spectra/infer/kernels/build.py into a per-user cache and loaded with
 * ctypes. One binary serves every x86-64 CPU: the ISA-specific code is compiled
 * with function-level target attributes and chosen at run time with cpuid
 * (__builtin_cpu_supports), so the build machine's ISA is never assumed.
 *
 * Paths (kernels.inc and forward.inc are instantiated once per path):
 *   scalar  portable C (any CPU, any architecture)
 *   avx2    AVX2 + FMA + F16C: maddubs on 2-bit / base-3 trits (llama.cpp style)
 *   avx512  AVX2 code with AVX512-VNNI (256-bit vpdpbusd) for the ternary dots
 *   avxvnni AVX2 code with VEX AVX-VNNI (256-bit vpdpbusd; CPUs without AVX-512)
 *   neon    aarch64 Armv8.2 dotprod: SDOT for the ternary dots (neon.inc)
 *   i8mm    aarch64 Armv8.6 i8mm: SMMLA 2x2 tiles for prefill, SDOT for decode (neon.inc)
 * The ternary matmuls of every path give the scalar path's bits (one fp32 reduction order,
 * kernels.inc); the NEON paths' forward equals the scalar forward bit for bit.
 *
 * Numerics: activations entering a ternary matrix (and the q8 head) are quantized
 * to int8 per 256-value block (scale = absmax/127, round half to even), exactly as
 * the Python reference spectra.infer.engine.quantize_activations does; the dot is
 * exact in int32 per block, then scaled in fp32. Everything else (norms, RoPE,
 * attention, SwiGLU, f16 head) is fp32.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h> /* madvise: a released slot returns its KV-cache pages */
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define SPX_X86 1
#elif defined(__aarch64__) && defined(__linux__)
/* aarch64: NEON paths picked at run time from the kernel's hwcaps (getauxval), never from the build host */
#include <arm_neon.h>
#include <sys/auxv.h>
#define SPX_ARM 1
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#endif

/* software prefetch of the output head ~4 rows ahead (NTA: the head is streamed once per token
 * and should not evict the ternary weights from the caches) */
#ifndef SPX_HEAD_HINT
#define SPX_HEAD_HINT _MM_HINT_NTA
#endif
#define SPX_PREFETCH_HEAD(p) _mm_prefetch((const char *)(p), SPX_HEAD_HINT)

#define QK 256          /* weights per block along K (both formats) */
#define T2_BLOCK 64     /* bytes per block: 256 x 2 bits */
#define T1_BLOCK 52     /* bytes per block: 160 + 80 trits at 5/byte, 16 at 4/byte */
#define MAX_NB 1024     /* K <= 262144 */
/* format ids (spectra.infer.formats: Format.c_id / HeadFormat.c_id; tests/test_formats.py checks them) */
#define SPX_FMT_T1 1    /* ternary matrix: base-3, 5 trits per byte */
#define SPX_FMT_T2 2    /* ternary matrix: 2 bits per trit */
#define SPX_HEAD_F16 0  /* output head: f16 rows */
#define SPX_HEAD_Q8 1   /* output head: int8 rows + fp32 scale per row */

typedef struct {
    const uint8_t *w;     /* rows x row_bytes packed trits */
    const float *gamma;   /* [mp] per-shard scale */
    int32_t rows, k, kp;  /* kp: padded K (each shard segment padded to a multiple of 256) */
    int32_t mp, split;    /* split 0: column-parallel (rows sharded), 1: row-parallel (K sharded) */
    int32_t fmt;          /* 2: t2, 1: t1 (SPX_FMT_T2, SPX_FMT_T1) */
    int32_t row_bytes;
} spx_mat;

typedef struct {
    spx_mat q, k, v, o, gate, up, down;
    const float *attn_norm, *ffn_norm;
} spx_layer;

typedef struct {
    int32_t dim, n_layers, n_heads, head_dim, ffn, vocab;
    float norm_eps, pad0;
    const uint16_t *embed;     /* f16 [vocab, dim] */
    const float *final_norm;   /* [dim] */
    int32_t head_fmt, head_kp; /* 0: f16, 1: q8 (SPX_HEAD_F16, SPX_HEAD_Q8) */
    const void *head;
    const float *head_scale;
    const spx_layer *layers;
    const float *rope_cos, *rope_sin; /* [rope_len, head_dim] */
    int32_t rope_len, pad1;
} spx_model;

/* ------------------------------------------------------------------ thread pool (pool.inc) */
#include "pool.inc"

static inline void split_range(int n, int tid, int nth, int *lo, int *hi) {
    int per = n / nth, rem = n % nth;
    *lo = tid * per + (tid < rem ? tid : rem);
    *hi = *lo + per + (tid < rem);
}

/* Output rows are handed out in chunks (pool_next): n rows cut in chunks of `rows` (a multiple of 8),
 * chunk c = rows [c * rows, min(n, (c + 1) * rows)). Chunk starts are multiples of 8 and only the last
 * chunk holds the n % 8 tail, so the tile path of a row (groups of 4 in mm_tern / head_rows, 8-wide
 * SiLU) depends on its index only - never on the thread count or on which thread takes the chunk:
 * part of the batch-invariance contract. */
static inline int n_chunks(int n, int rows) { return (n + rows - 1) / rows; }
static inline void chunk_range(int n, int rows, int c, int *lo, int *hi) {
    *lo = c * rows;
    *hi = n - *lo < rows ? n : *lo + rows;
}
/* attention (row, head) pairs per chunk: ~8 chunks per thread, at least 1 pair (each pair is computed
 * alone, so the split never changes a result) */
static inline int pair_chunk(int npairs, int nth) {
    int pc = npairs / (8 * nth);
    return pc < 1 ? 1 : pc;
}

/* ------------------------------------------------------------------ helpers */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        if (m == 0) f = sign;
        else {
            e = 113;
            while (!(m & 0x400)) { m <<= 1; e--; }
            f = sign | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) f = sign | 0x7f800000u | (m << 13);
    else f = sign | ((e + 112) << 23) | (m << 13);
    float r;
    memcpy(&r, &f, 4);
    return r;
}

/* digit k (0 = most significant) of a base-3 byte stored as ceil(v * 256 / 3^n) */
static inline int t1_digit(uint8_t b, int k) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    uint8_t t = (uint8_t)(b * pow3[k]);
    return ((uint16_t)t * 3) >> 8;
}

/* Decode one 256-weight block to codes q+1 in {0,1,2} (scalar, both formats). */
static void decode_block_scalar(int fmt, const uint8_t *w, uint8_t *out) {
    if (fmt == SPX_FMT_T2) {
        for (int c = 0; c < 2; c++)
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 32; j++) out[c * 128 + i * 32 + j] = (w[c * 32 + j] >> (2 * i)) & 3;
    } else {
        for (int k = 0; k < 5; k++)
            for (int j = 0; j < 32; j++) out[k * 32 + j] = (uint8_t)t1_digit(w[j], k);
        for (int k = 0; k < 5; k++)
            for (int j = 0; j < 16; j++) out[160 + k * 16 + j] = (uint8_t)t1_digit(w[32 + j], k);
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) out[240 + k * 4 + j] = (uint8_t)t1_digit(w[48 + j], k);
    }
}

/* ------------------------------------------------------------------ per-thread scratch
 * Everything a matmul or the activation quantizer needs besides its inputs and outputs, allocated once
 * per thread with the state (or per spx_matmul call) and sized from the model: a forward step
 * allocates nothing, so it cannot fail halfway; an allocation that fails fails the creation. */
#define SPX_CODES_BYTES 65536  /* mm_tern decodes GC = SPX_CODES_BYTES / (4 kp) groups of 4 rows at a time (>= 1) */
typedef struct {
    uint8_t *codes, *ci; /* decoded codes of GC row groups, and their interleave (avx512, i8mm) */
    int8_t *xp;          /* the activations rearranged once per quantization (act_prep: avx512 decode, i8mm prefill) */
    int32_t *xsT;        /* [block][activation row] per-block activation sums (avx512 prefill) */
    float *sdT;          /* [block][activation row] activation scale x column scale */
    float *res;          /* the int8x2 quantizer's residual (kp floats) */
} spx_scratch;

/* ------------------------------------------------------------------ engine state
 * max_seqs sequence slots, each a fixed KV-cache region of max_len positions (docs/packed-format.md,
 * "Multi-sequence engine"); a step carries up to max_t rows (tokens) from any slots. */
typedef struct spx_state {
    const spx_model *m;
    int kernel, max_t, max_len, max_seqs, n_threads, act_levels;
    spx_pool *pool;
    spx_scratch *scr;       /* [n_threads] */
    float *x, *xn, *q, *kk, *v, *att, *g, *u, *h, *scores;
    int8_t *xq;
    float *xd;
    int32_t *xs;
    void *kcache, *vcache;  /* [slot][layer][head][max_len][head_dim], fp32 or f16 (kv_f16) */
    int kv_f16;
    int32_t *slot_len;      /* [max_seqs] positions filled per slot */
    int32_t *row_slot, *row_pos, *out_rows; /* [max_t] the current step's rows; rows whose logits are wanted */
    uint8_t *seen;          /* [max_seqs] scratch: duplicate-slot check */
    int max_kp, max_nb;
    /* current job */
    const int32_t *tokens;
    int T, n_out;
    float *logits;
} spx_state;

/* fp32 -> f16, round to nearest even (IEEE; what F16C's vcvtps2ph does with _MM_FROUND_TO_NEAREST_INT),
 * for the f16 KV cache: every path stores the same bits. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return (uint16_t)(sign | 0x7e00);           /* NaN */
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);          /* rounds past 65504: inf */
    if (ax >= 0x38800000) {                                          /* normal f16 */
        uint32_t h = (ax >> 13) - (112u << 10), rem = ax & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    if (ax < 0x33000000) return (uint16_t)sign;                      /* below half the smallest subnormal */
    uint32_t mant = (ax & 0x7fffff) | 0x800000, shift = 126 - (ax >> 23);  /* subnormal: units of 2^-24 */
    uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* ------------------------------------------------------------------ per-ISA code */
#define SFX(name) name##_scalar
#include "kernels.inc"
#include "forward.inc"
#undef SFX

#ifdef SPX_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define SPX_AVX2 1
#define SFX(name) name##_avx2
#include "kernels.inc"
#include "forward.inc"
#undef SFX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512vnni")
#define SPX_VNNI 1
#define SFX(name) name##_avx512
#include "kernels.inc"
#include "forward.inc"
#undef SFX
#pragma GCC pop_options

/* AVX-VNNI without AVX-512 (Intel Alder Lake and later clients): the avx512 path's dots, 256-bit only */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avxvnni")
#define SPX_NO_ZMM 1
#define SPX_AVXVNNI 1
#define SFX(name) name##_avxvnni
#include "kernels.inc"
#include "forward.inc"
#undef SFX
#undef SPX_AVXVNNI
#undef SPX_NO_ZMM
#undef SPX_VNNI
#undef SPX_AVX2
#pragma GCC pop_options
#endif

#ifdef SPX_ARM
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#define SPX_NEON 1
#define SFX(name) name##_neon
#include "kernels.inc"
#include "forward.inc"
#undef SFX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=armv8.6-a+dotprod+i8mm")
#define SPX_I8MM 1
#define SFX(name) name##_i8mm
#include "kernels.inc"
#include "forward.inc"
#undef SFX
#undef SPX_I8MM
#undef SPX_NEON
#pragma GCC pop_options
#endif

/* ------------------------------------------------------------------ public API */
enum { K_AUTO = 0, K_SCALAR = 1, K_AVX2 = 2, K_AVX512 = 3, K_NEON = 4, K_I8MM = 5, K_AVXVNNI = 6 };

int spx_cpu_supports(int kernel) {
    if (kernel == K_SCALAR) return 1;
#ifdef SPX_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (kernel == K_AVX2) return avx2;
    if (kernel == K_AVX512)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (kernel == K_AVXVNNI) {  /* CPUID.(EAX=7,ECX=1):EAX[4]; the avx2 check covers the OS's YMM state */
        unsigned a = 0, b = 0, c = 0, d = 0;
        return avx2 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1);
    }
#endif
#ifdef SPX_ARM
    int dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
    if (kernel == K_NEON) return dotprod;
    if (kernel == K_I8MM) return dotprod && (getauxval(AT_HWCAP2) & HWCAP2_I8MM) != 0;
#endif
    return 0;
}

int spx_best_kernel(void) {
    static const int order[] = {K_AVX512, K_AVXVNNI, K_AVX2, K_I8MM, K_NEON};
    for (int i = 0; i < 5; i++)
        if (spx_cpu_supports(order[i])) return order[i];
    return K_SCALAR;
}


static int kp_of(int k) { return (k + QK - 1) / QK * QK; }

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }

static void scratch_free(spx_scratch *sc, int n) {
    if (!sc) return;
    for (int i = 0; i < n; i++) {
        free(sc[i].codes); free(sc[i].ci); free(sc[i].xp); free(sc[i].xsT); free(sc[i].sdT); free(sc[i].res);
    }
    free(sc);
}

/* n threads' scratch for matrices of up to max_kp padded columns x max_r activation rows (tokens x
 * levels); NULL (nothing leaked) when memory cannot be had */
static spx_scratch *scratch_new(int n, int max_kp, int max_r, int kernel) {
    spx_scratch *sc = calloc((size_t)n, sizeof(*sc));
    if (!sc) return NULL;
    size_t kp = (size_t)max_kp, nb = kp / QK, rp = ((size_t)max_r + 7) / 8 * 8;  /* rows padded to a tile (CT_MAX) */
    size_t codes = 4 * kp > SPX_CODES_BYTES ? 4 * kp : SPX_CODES_BYTES;
    /* xp: t2 decode permutes <= 2 rows (avx512); i8mm pairs all rows, an odd last one with zeros */
    size_t xp = (kernel == K_I8MM ? (size_t)max_r + 1 : 2) * kp;
    for (int i = 0; i < n; i++) {
        spx_scratch *c = &sc[i];
        c->codes = alloc64(codes); c->ci = alloc64(codes); c->xp = alloc64(xp);
        c->xsT = calloc(nb * rp, sizeof(int32_t)); c->sdT = calloc(nb * rp, sizeof(float));
        c->res = malloc(kp * sizeof(float));
        if (!c->codes || !c->ci || !c->xp || !c->xsT || !c->sdT || !c->res) { scratch_free(sc, n); return NULL; }
    }
    return sc;
}

/* KV caches: anonymous mmap on Linux (zero pages on demand; calloc may instead take heap memory
 * and memset all of it, making every slot resident at once), calloc elsewhere. */
static void *kv_alloc(size_t bytes) {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    if (bytes == 0) return NULL;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
#else
    return calloc(bytes, 1);
#endif
}

static void kv_free(void *p, size_t bytes) {
    if (!p) return;
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    munmap(p, bytes);
#else
    (void)bytes;
    free(p);
#endif
}

/* bytes of one slot's K (or V) cache */
static size_t kv_slot_bytes(const spx_state *s) {
    return (size_t)s->m->n_layers * s->m->n_heads * s->max_len * s->m->head_dim * (s->kv_f16 ? 2 : 4);
}

/* Error codes of the entry points (spectra.infer.engine turns them into messages). */
enum { SPX_EROWS = -1, SPX_EFULL = -2, SPX_ETOKEN = -3, SPX_ESLOT = -6, SPX_EDUP = -7, SPX_EARG = -8 };

void spx_state_free(spx_state *s) {
    if (!s) return;
    pool_free(s->pool);
    scratch_free(s->scr, s->n_threads);
    free(s->x); free(s->xn); free(s->q); free(s->kk); free(s->v); free(s->att);
    free(s->g); free(s->u); free(s->h); free(s->scores); free(s->xq); free(s->xd); free(s->xs);
    kv_free(s->kcache, kv_slot_bytes(s) * s->max_seqs); kv_free(s->vcache, kv_slot_bytes(s) * s->max_seqs);
    free(s->slot_len); free(s->row_slot); free(s->row_pos); free(s->out_rows); free(s->seen);
    free(s);
}

/* A state for up to max_seqs sequences of max_len positions, steps of up to max_t rows.
 * NULL on bad arguments or when memory (or a thread) cannot be had; nothing leaks. The KV cache is
 * mapped on demand: untouched positions cost address space, not resident memory. */
spx_state *spx_state_new(const spx_model *m, int max_t, int max_len, int max_seqs, int n_threads, int kernel,
                         int act_levels, int kv_f16) {
    if (!m || act_levels < 1 || act_levels > 2 || kv_f16 < 0 || kv_f16 > 1) return NULL;
    if (max_t < 1 || max_t > (1 << 20) || max_len < 1 || max_seqs < 1 || max_seqs > (1 << 16)) return NULL;
    if (kernel == K_AUTO) kernel = spx_best_kernel();
    if (!spx_cpu_supports(kernel)) return NULL;
    if (max_len > m->rope_len) return NULL;
    spx_err = 0;  /* before any per-thread buffer is sized: refuse absurd thread counts (pool section) */
    if (n_threads > spx_max_threads()) { spx_err = SPX_E_THREADS; return NULL; }
    spx_state *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->m = m; s->kernel = kernel; s->max_t = max_t; s->max_len = max_len; s->max_seqs = max_seqs;
    s->act_levels = act_levels; s->kv_f16 = kv_f16;
    s->n_threads = n_threads < 1 ? 1 : n_threads;
    int D = m->dim, F = m->ffn;
    int maxk = 0;
    for (int l = 0; l < m->n_layers; l++) {
        const spx_layer *L = &m->layers[l];
        const spx_mat *mats[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int i = 0; i < 7; i++) if (mats[i]->kp > maxk) maxk = mats[i]->kp;
    }
    if (m->head_kp > maxk) maxk = m->head_kp;
    if (kp_of(D) > maxk) maxk = kp_of(D);
    if (maxk > MAX_NB * QK) { free(s); return NULL; }  /* mm_tern's per-block column scales live on the stack */
    s->max_kp = maxk; s->max_nb = maxk / QK;
    size_t T = (size_t)max_t;
    size_t NT = (size_t)s->n_threads;
    s->x = calloc(T * D, 4); s->xn = calloc(NT * T * D, 4);
    s->q = calloc(T * D, 4); s->kk = calloc(T * D, 4); s->v = calloc(T * D, 4); s->att = calloc(T * D, 4);
    s->g = calloc(T * F, 4); s->u = calloc(T * F, 4); s->h = calloc(T * F, 4);
    s->scores = calloc(NT * max_len, 4);
    s->xq = aligned_alloc(64, (NT * 2 * T * maxk + 63) / 64 * 64 + 64);
    s->xd = calloc(NT * 2 * T * s->max_nb, 4);
    s->xs = calloc(NT * 2 * T * s->max_nb, 4);
    s->kcache = kv_alloc(kv_slot_bytes(s) * max_seqs); s->vcache = kv_alloc(kv_slot_bytes(s) * max_seqs);
    s->slot_len = calloc((size_t)max_seqs, 4); s->seen = calloc((size_t)max_seqs, 1);
    s->row_slot = calloc(T, 4); s->row_pos = calloc(T, 4); s->out_rows = calloc(T, 4);
    s->scr = scratch_new(s->n_threads, maxk, 2 * max_t, kernel);
    if (!s->scr || !s->x || !s->xn || !s->q || !s->kk || !s->v || !s->att || !s->g || !s->u || !s->h || !s->scores ||
        !s->xq || !s->xd || !s->xs || !s->kcache || !s->vcache || !s->slot_len || !s->seen || !s->row_slot ||
        !s->row_pos || !s->out_rows) {
        spx_state_free(s);
        return NULL;
    }
    s->pool = pool_new(s->n_threads);
    if (!s->pool) { spx_state_free(s); return NULL; }
    return s;
}

int spx_state_kernel(const spx_state *s) { return s->kernel; }
int spx_state_max_seqs(const spx_state *s) { return s->max_seqs; }

/* Positions filled in a slot, or SPX_ESLOT. */
int spx_slot_len(const spx_state *s, int slot) {
    if (slot < 0 || slot >= s->max_seqs) return SPX_ESLOT;
    return s->slot_len[slot];
}

/* Rewind a slot to its first n positions (0 empties it); growing is refused (the cache beyond is stale). */
int spx_slot_set_len(spx_state *s, int slot, int n) {
    if (slot < 0 || slot >= s->max_seqs) return SPX_ESLOT;
    if (n < 0 || n > s->slot_len[slot]) return SPX_EARG;
    s->slot_len[slot] = n;
    return 0;
}

/* Empty a slot and hand its KV-cache pages back to the OS (Linux MADV_DONTNEED: the next touch
 * gets zero pages), so a server's resident memory follows the sequences alive, not the longest
 * ones ever served. Only whole pages inside the slot's own region are dropped; positions are
 * never read before they are written, so the contents do not matter. */
static void drop_pages(void *base, size_t bytes) {
#if defined(__linux__) && defined(MADV_DONTNEED)
    uintptr_t a = (uintptr_t)base, e = a + bytes, pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    a = (a + pg - 1) / pg * pg;
    e = e / pg * pg;
    if (e > a) madvise((void *)a, e - a, MADV_DONTNEED);
#else
    (void)base; (void)bytes;
#endif
}

int spx_slot_release(spx_state *s, int slot) {
    if (slot < 0 || slot >= s->max_seqs) return SPX_ESLOT;
    size_t per = kv_slot_bytes(s);
    drop_pages((char *)s->kcache + (size_t)slot * per, per);
    drop_pages((char *)s->vcache + (size_t)slot * per, per);
    s->slot_len[slot] = 0;
    return 0;
}

/* single-sequence view: slot 0 (kept for callers of the one-sequence API) */
int spx_state_pos(const spx_state *s) { return s->slot_len[0]; }
int spx_state_set_pos(spx_state *s, int pos) { return spx_slot_set_len(s, 0, pos); }

static void forward_job(void *arg, int tid) {
    spx_state *s = (spx_state *)arg;
    switch (s->kernel) {
#ifdef SPX_X86
    case K_AVX512: forward_avx512(s, tid); break;
    case K_AVX2: forward_avx2(s, tid); break;
    case K_AVXVNNI: forward_avxvnni(s, tid); break;
#endif
#ifdef SPX_ARM
    case K_I8MM: forward_i8mm(s, tid); break;
    case K_NEON: forward_neon(s, tid); break;
#endif
    default: forward_scalar(s, tid); break;
    }
}

/* One ragged step: item i appends counts[i] tokens (consecutive in `tokens`) to slot slots[i].
 * logits: [n_items, vocab] of each item's last token, or [sum(counts), vocab] for every token when
 * all_logits. Every argument is checked before anything changes: returns 0, or a negative code
 * (SPX_E*) with the state untouched. */
int spx_step(spx_state *s, int n_items, const int32_t *slots, const int32_t *counts, const int32_t *tokens,
             float *logits, int all_logits) {
    if (!s || !slots || !counts || !tokens || !logits) return SPX_EARG;
    if (n_items < 1 || n_items > s->max_seqs) return SPX_ESLOT;
    long T = 0;
    for (int i = 0; i < n_items; i++) {
        if (slots[i] < 0 || slots[i] >= s->max_seqs) return SPX_ESLOT;
        if (counts[i] < 1 || counts[i] > s->max_t) return SPX_EROWS;
        T += counts[i];
    }
    if (T > s->max_t) return SPX_EROWS;
    for (int i = 0; i < n_items; i++)
        if ((long)s->slot_len[slots[i]] + counts[i] > s->max_len) return SPX_EFULL;
    for (long t = 0; t < T; t++) if (tokens[t] < 0 || tokens[t] >= s->m->vocab) return SPX_ETOKEN;
    int dup = 0;
    for (int i = 0; i < n_items; i++) { dup |= s->seen[slots[i]]; s->seen[slots[i]] = 1; }
    for (int i = 0; i < n_items; i++) s->seen[slots[i]] = 0;
    if (dup) return SPX_EDUP;
    int t = 0;
    for (int i = 0; i < n_items; i++) {
        int p0 = s->slot_len[slots[i]];
        for (int j = 0; j < counts[i]; j++, t++) { s->row_slot[t] = slots[i]; s->row_pos[t] = p0 + j; }
        if (!all_logits) s->out_rows[i] = t - 1;
    }
    if (all_logits) for (int r = 0; r < T; r++) s->out_rows[r] = r;
    s->tokens = tokens; s->T = (int)T; s->n_out = all_logits ? (int)T : n_items; s->logits = logits;
    pool_run(s->pool, forward_job, s);
    for (int i = 0; i < n_items; i++) s->slot_len[slots[i]] += counts[i];
    return 0;
}

/* Single sequence (slot 0): T tokens from its current position; logits of the last token (or of
 * all T when all_logits). The batch-of-one case of spx_step. */
int spx_forward(spx_state *s, const int32_t *tokens, int T, float *logits, int all_logits) {
    int32_t slot = 0, count = T;
    return spx_step(s, 1, &slot, &count, tokens, logits, all_logits);
}

/* ------------------------------------------------------------------ single operations (ops.inc) */
#include "ops.inc"
