// Native CPU kernels of the embedded engine's forward, where torch's own cost the most:
//
// ragged_attention: every row's queries over its context's keys (a shared cache, all visible) and
// its own keys (causal), in one pass, on packed rows. Why not torch's CPU flash kernel: with a
// causal mask it still computes every (query, key) pair of a row shorter than its key block (512),
// twice the useful work for the rows scored here, and a row's context must then be a second call
// merged by log-sum-exp. Here each query computes only the keys it sees, context and own
// together, with no padding and no merge. All float32.
//
// silu_mul_bf16: the gated MLP's act(gate) * up on bfloat16 projections, in one pass computed in
// float32 and rounded once, where torch takes two bfloat16 passes (SiLU, then the product), each
// rounding to bfloat16.
//
// rms_norm_bf16: the RMSNorm of the float32 residual stream rounded once to bfloat16 for the next
// projection, in one pass, where torch's fused norm writes float32 and a cast follows.
//
// rotary_bf16: a bfloat16 query or key projection to float32 with the rotary embedding applied,
// in one pass, where torch takes a cast and five elementwise passes (two products, the halves'
// swap, a negation and a sum).
//
// Built with the compiler's vector extensions (AVX-512, AVX2 or NEON, whichever -march=native
// gives) and OpenMP, which resolves to the OpenMP runtime torch has already loaded.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint32_t u16x32 __attribute__((vector_size(64)));           // 16 lanes of 32 bits
typedef uint16_t bf16x16 __attribute__((vector_size(32), aligned(2)));  // 16 bfloat16 values

static const int MQ = 6;         // query vectors per tile (accumulators: MQ x 2 for scores, MQ for values)
static const int KB = 32;        // keys per score block
static const int QB = 128;        // query positions per work item
static const float MASKED = -3e38f;  // below any score

static inline v16 load(const float *p) { return *(const v16u *)p; }
static inline void store(float *p, v16 x) { *(v16u *)p = x; }
static inline v16 splat(float x) { return v16{} + x; }

// exp(x) for x <= 0, as Cephes' expf: 2^n * p(r) with a Cody-Waite reduction; relative error ~1e-7.
static inline v16 vexp(v16 x) {
    x = x < -87.0f ? splat(-87.0f) : x;
    i16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i16);  // round(x / ln 2), x <= 0
    v16 nf = __builtin_convertvector(n, v16);
    v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v16)((n + 127) << 23);
}

static inline float hmax(v16 x) {
    float m = x[0];
    for (int i = 1; i < 16; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline float hsum(v16 x) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += x[i];
    return s;
}

static inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

struct Item { int64_t row, group, first; };

// float32 lanes rounded to bfloat16, to nearest even; NaN stays NaN.
static inline bf16x16 to_bf16(v16 y) {
    const u16x32 bits = (u16x32)y;
    u16x32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    rounded = y != y ? (u16x32){} + 0x7FC0u : rounded;
    return __builtin_convertvector(rounded, bf16x16);
}

extern "C" {

// q: (queries, heads, dim); k, v: (tokens, kv_heads, dim), the rows' own keys and values, packed.
// rows: per row (query start, query count, position of its first query in the row, key start,
//   context index or -1). Query t of a row sits at row position pos + t and sees its context's
//   keys and its own keys 0 .. pos + t.
// contexts: per context (keys address, values address, length), each (kv_heads, length, dim).
// out: (queries, heads, dim).
int ragged_attention(const float *q, const float *k, const float *v, float *out,
                     int64_t n_rows, const int64_t *rows, int64_t n_contexts, const int64_t *contexts,
                     int64_t heads, int64_t kv_heads, int64_t dim, float scale, int64_t threads) {
    if (dim <= 0 || heads % kv_heads != 0) return 1;
    const int64_t dp = (dim + 15) / 16 * 16;  // a value row's stride: whole vectors, zeros beyond dim
    const int64_t group = heads / kv_heads;
    int64_t n_items = 0, max_keys = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t *row = rows + 5 * r;
        if (row[4] >= n_contexts) return 2;
        int64_t ctx = row[4] < 0 ? 0 : contexts[3 * row[4] + 2];
        n_items += kv_heads * ((row[1] + QB - 1) / QB);
        int64_t keys = ctx + row[2] + row[1];
        max_keys = keys > max_keys ? keys : max_keys;
    }
    Item *items = (Item *)malloc(sizeof(Item) * (n_items ? n_items : 1));
    if (!items) return 3;
    int64_t at = 0;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t first = 0; first < rows[5 * r + 1]; first += QB)
            for (int64_t g = 0; g < kv_heads; g++) items[at++] = Item{r, g, first};
    const int64_t width = (max_keys + KB - 1) / KB * KB;  // keys of the longest row, whole blocks
    int failed = 0;

#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        // Per thread: keys transposed (dim, width), values (width, dim), scores (MQ, width).
        float *kt = (float *)aligned_alloc(64, sizeof(float) * dim * width + 64);
        float *vs = (float *)aligned_alloc(64, sizeof(float) * width * dp + 64);
        float *s = (float *)aligned_alloc(64, sizeof(float) * MQ * width + 64);
        float *qt = (float *)aligned_alloc(64, sizeof(float) * MQ * dim + 64);
        if (!kt || !vs || !s || !qt) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++) {
            if (failed) continue;
            const Item item = items[it];
            const int64_t *row = rows + 5 * item.row;
            const int64_t q0 = row[0], nq = row[1], pos = row[2], k0 = row[3], c = row[4];
            const int64_t g = item.group;
            const int64_t last = (item.first + QB < nq ? item.first + QB : nq);  // query positions [first, last)
            const int64_t n_ctx = c < 0 ? 0 : contexts[3 * c + 2];
            const int64_t n_keys = n_ctx + pos + last;
            const int64_t padded = (n_keys + KB - 1) / KB * KB;
            // Gather this head's keys (transposed) and values: context first, then the row's own.
            const float *ck = c < 0 ? nullptr : (const float *)(intptr_t)contexts[3 * c] + g * n_ctx * dim;
            const float *cv = c < 0 ? nullptr : (const float *)(intptr_t)contexts[3 * c + 1] + g * n_ctx * dim;
            for (int64_t j = 0; j < padded; j++) {
                const float *kj = j < n_ctx ? ck + j * dim
                                : j < n_keys ? k + ((k0 + j - n_ctx) * kv_heads + g) * dim : nullptr;
                const float *vj = j < n_ctx ? cv + j * dim
                                : j < n_keys ? v + ((k0 + j - n_ctx) * kv_heads + g) * dim : nullptr;
                for (int64_t d = 0; d < dim; d++) kt[d * padded + j] = kj ? kj[d] : 0.0f;
                if (vj) memcpy(vs + j * dp, vj, sizeof(float) * dim);
                memset(vs + j * dp + (vj ? dim : 0), 0, sizeof(float) * (vj ? dp - dim : dp));
            }
            // Query vectors of this item: (position, head of the group), MQ at a time.
            const int64_t n_vec = (last - item.first) * group;
            for (int64_t t0 = 0; t0 < n_vec; t0 += MQ) {
                int64_t limit[MQ], slot[MQ];  // keys each vector sees; its (query, head) offset
                int64_t most = 0;
                for (int i = 0; i < MQ; i++) {
                    const int64_t t = t0 + i < n_vec ? t0 + i : n_vec - 1;  // a short tile repeats its last vector
                    const int64_t p = item.first + t / group, h = g * group + t % group;
                    limit[i] = n_ctx + pos + p + 1;
                    slot[i] = ((q0 + p) * heads + h) * dim;
                    most = limit[i] > most ? limit[i] : most;
                    for (int64_t d = 0; d < dim; d++) qt[i * dim + d] = q[slot[i] + d] * scale;
                }
                const int64_t blocks = (most + KB - 1) / KB * KB;
                for (int64_t j = 0; j < blocks; j += KB) {
                    v16 acc[MQ][2];
                    for (int i = 0; i < MQ; i++) acc[i][0] = acc[i][1] = v16{};
                    for (int64_t d = 0; d < dim; d++) {
                        const v16 a = load(kt + d * padded + j), b = load(kt + d * padded + j + 16);
                        for (int i = 0; i < MQ; i++) {
                            const float x = qt[i * dim + d];
                            acc[i][0] += x * a;
                            acc[i][1] += x * b;
                        }
                    }
                    for (int i = 0; i < MQ; i++) {
                        store(s + i * width + j, acc[i][0]);
                        store(s + i * width + j + 16, acc[i][1]);
                    }
                }
                float total[MQ];
                const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
                for (int i = 0; i < MQ; i++) {  // softmax over the keys vector i sees, 0 beyond them
                    float *si = s + i * width;
                    const int32_t seen = (int32_t)limit[i];
                    v16 m = splat(MASKED);
                    for (int64_t j = 0; j < blocks; j += 16) {
                        const v16 x = load(si + j);
                        m = (lane + (int32_t)j < seen) & (x > m) ? x : m;
                    }
                    const float top = hmax(m);
                    v16 sum = v16{};
                    for (int64_t j = 0; j < blocks; j += 16) {
                        const v16 e = lane + (int32_t)j < seen ? vexp(load(si + j) - top) : v16{};
                        sum += e;
                        store(si + j, e);
                    }
                    total[i] = hsum(sum);
                }
                for (int64_t d = 0; d < dp; d += 16) {
                    v16 acc[MQ];
                    for (int i = 0; i < MQ; i++) acc[i] = v16{};
                    for (int64_t j = 0; j < most; j++) {
                        const v16 x = load(vs + j * dp + d);
                        for (int i = 0; i < MQ; i++) acc[i] += s[i * width + j] * x;
                    }
                    for (int i = 0; i < MQ && t0 + i < n_vec; i++) {
                        const v16 o = acc[i] / total[i];
                        if (d + 16 <= dim) store(out + slot[i] + d, o);
                        else for (int64_t c = 0; d + c < dim; c++) out[slot[i] + d + c] = o[c];
                    }
                }
            }
        }
        free(kt);
        free(vs);
        free(s);
        free(qt);
    }
    free(items);
    return failed ? 3 : 0;
}

// out[i] = bf16(silu(gate[i]) * up[i]) with float32 arithmetic, rounded to nearest even; out may be
// gate (in place). silu(x) = x / (1 + e^-x), from e = e^-|x| so the exponent never overflows.
int silu_mul_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n, int64_t threads) {
    const int64_t blocks = (n + 15) / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t at = b * 16, m = n - at < 16 ? n - at : 16;
        bf16x16 g16 = {}, u16 = {};
        if (m == 16) {
            g16 = *(const bf16x16 *)(gate + at);
            u16 = *(const bf16x16 *)(up + at);
        } else {
            for (int64_t i = 0; i < m; i++) { g16[i] = gate[at + i]; u16[i] = up[at + i]; }
        }
        const v16 x = (v16)(__builtin_convertvector(g16, u16x32) << 16);
        const v16 u = (v16)(__builtin_convertvector(u16, u16x32) << 16);
        const v16 e = vexp(x < 0.0f ? x : -x);
        const v16 silu = (x < 0.0f ? x * e : x) / (1.0f + e);
        const v16 y = silu * u;
        const bf16x16 o = to_bf16(y);
        if (m == 16) *(bf16x16 *)(out + at) = o;
        else for (int64_t i = 0; i < m; i++) out[at + i] = o[i];
    }
    return 0;
}

// out[t, h, i] = x[t, h, i] * cos[t, i] + r[t, h, i] * sin[t, i], r = (-x[.., d/2:], x[.., :d/2]):
// rotate_half as transformers applies it. x: (tokens, heads, dim) bfloat16; cos, sin: (tokens,
// dim) float32; out: (tokens, heads, dim) float32. dim must be even.
int rotary_bf16(const uint16_t *__restrict__ x, const float *__restrict__ cos, const float *__restrict__ sin,
                float *__restrict__ out, int64_t tokens,
                int64_t heads, int64_t dim, int64_t threads) {
    if (dim % 2 != 0) return 1;
    const int64_t half = dim / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *__restrict__ xi = x + (t * heads + h) * dim;
            float *__restrict__ o = out + (t * heads + h) * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = bf16_to_float(xi[i]), b = bf16_to_float(xi[i + half]);
                o[i] = a * c[i] - b * s[i];
                o[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
    return 0;
}

// out[t, i] = x[t, i] / sqrt(mean_i(x[t, i]^2) + eps) * w[i], rounded once to bfloat16: the RMSNorm
// of the float32 residual stream, as the next projection's input. x: (tokens, width) float32; w:
// (width) float32; out: (tokens, width) bfloat16; width a multiple of 16.
int rms_norm_bf16(const float *__restrict__ x, const float *__restrict__ w, uint16_t *__restrict__ out,
                  int64_t tokens, int64_t width, float eps, int64_t threads) {
    if (width % 16 != 0) return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = x + t * width;
        v16 acc = {};
        for (int64_t i = 0; i < width; i += 16) {
            const v16 v = load(row + i);
            acc += v * v;
        }
        float sum = 0.0f;
        for (int i = 0; i < 16; i++) sum += acc[i];
        const float inv = 1.0f / __builtin_sqrtf(sum / (float)width + eps);
        for (int64_t i = 0; i < width; i += 16)
            *(bf16x16 *)(out + t * width + i) = to_bf16(load(row + i) * inv * load(w + i));
    }
    return 0;
}

}  // extern "C"
