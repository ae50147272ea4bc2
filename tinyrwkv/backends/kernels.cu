// tinyrwkv CUDA kernels: the CuPy backend (gpu.py) compiles this file with NVRTC.
//
// Every kernel computes a piece of model.py (named beside it) in float32; weights may be stored
// as float32, float16 or bfloat16 and are widened to float32 as they are read. Two macros are
// set by gpu.py when it compiles the file:
//     NH     the head size N (a compile-time constant, so a head's state row lives in registers)
//     WKIND  how weights are stored: 0 float32, 1 float16, 2 bfloat16 (16-bit ones as raw bits)
// No CUDA headers are included (NVRTC may not find them): 16-bit conversions are written out.
//
// Layouts (row-major, like the NumPy arrays in gpu.py):
//     activations (T, C); a head is C-slice [h*NH, (h+1)*NH); state S (H, NH, NH) [head][value][key]
//     matrices (out, in): y = W x reads a contiguous row of W per output.

#ifndef NH
#define NH 64
#endif
#ifndef WKIND
#define WKIND 1
#endif

typedef unsigned short u16;
typedef unsigned int u32;

#define DECAY_SCALE 0.60653065971263342f   // e^-0.5, as model.DECAY_SCALE
#define NTHREADS_HEAD (((NH) + 31) / 32 * 32)  // threads per head block (padded to whole warps)

// ---- 16-bit conversions ---------------------------------------------------------------------

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 float_to_half(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_to_float(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 float_to_bf16(float f) {   // round to nearest even (finite values)
    u32 u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

#if WKIND == 0
typedef float WT;
#define VEC 4   // weights per 16-byte load
__device__ __forceinline__ float wload(WT w) { return w; }
__device__ __forceinline__ WT wstore(float f) { return f; }
__device__ __forceinline__ float dot_vec(uint4 q, const float* x) {
    const float4 xv = *(const float4*)x;
    return __uint_as_float(q.x) * xv.x + __uint_as_float(q.y) * xv.y
         + __uint_as_float(q.z) * xv.z + __uint_as_float(q.w) * xv.w;
}
#else
typedef u16 WT;
#define VEC 8
#if WKIND == 1
__device__ __forceinline__ float wload(WT w) { return half_to_float(w); }
__device__ __forceinline__ WT wstore(float f) { return float_to_half(f); }
__device__ __forceinline__ float lo(u32 p) { return half_to_float((u16)(p & 0xffffu)); }
__device__ __forceinline__ float hi(u32 p) { return half_to_float((u16)(p >> 16)); }
#else
__device__ __forceinline__ float wload(WT w) { return bf16_to_float(w); }
__device__ __forceinline__ WT wstore(float f) { return float_to_bf16(f); }
__device__ __forceinline__ float lo(u32 p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float hi(u32 p) { return __uint_as_float(p & 0xffff0000u); }
#endif
__device__ __forceinline__ float dot_vec(uint4 q, const float* x) {
    const float4 x0 = *(const float4*)x;
    const float4 x1 = *(const float4*)(x + 4);
    return lo(q.x) * x0.x + hi(q.x) * x0.y + lo(q.y) * x0.z + hi(q.y) * x0.w
         + lo(q.z) * x1.x + hi(q.z) * x1.y + lo(q.w) * x1.z + hi(q.w) * x1.w;
}
#endif

// ---- reductions -----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the total. `red` holds 33 floats of shared memory.
__device__ float block_sum(float v, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();                      // `red` may still be read from the previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nwarps ? red[lane] : 0.f;
        s = warp_sum(s);
        if (lane == 0) red[32] = s;
    }
    __syncthreads();
    return red[32];
}

// ---- activations (applied to a projection's output) ----------------------------------------

#define ACT_NONE 0
#define ACT_TANH 1
#define ACT_SIGMOID 2
#define ACT_RELU2 3
#define ACT_DECAY 4   // w = exp(-e^-0.5 * sigmoid(u)), model.time_mix_inputs

__device__ __forceinline__ float activate(float u, int act) {
    switch (act) {
        case ACT_TANH: return tanhf(u);
        case ACT_SIGMOID: return 1.f / (1.f + expf(-u));
        case ACT_RELU2: { const float p = fmaxf(u, 0.f); return p * p; }
        case ACT_DECAY: return expf(-DECAY_SCALE / (1.f + expf(-u)));
        default: return u;
    }
}

#define MODE_SET 0   // y = act(u + bias)
#define MODE_ADD 1   // y += act(u + bias)   (a residual)
#define MODE_MUL 2   // y *= act(u + bias)   (a gate)

__device__ __forceinline__ void combine(float* y, float v, int mode) {
    if (mode == MODE_ADD) *y += v;
    else if (mode == MODE_MUL) *y *= v;
    else *y = v;
}

// ---- matrix-vector products (decode) ---------------------------------------------------------
//
// One launch runs several independent products ("jobs", blockIdx.y), e.g. r, k, v and the four
// LoRA down-projections of a layer, which all read this token's mixed inputs. A warp computes one
// output: it streams a row of W in 16-byte loads (coalesced across the warp), widens to float32,
// multiplies by x (float32) and sums. Decode is bound by reading the weights once.

struct Job {
    unsigned long long W;      // const WT*  (rows, cols) row-major
    unsigned long long x;      // const float* (cols,), 16-byte aligned
    unsigned long long y;      // float* (rows,)
    unsigned long long bias;   // const float* (rows,) or 0
    int rows, cols, act, mode;
};

extern "C" __global__ void gemv(const Job* __restrict__ jobs) {
    const Job jb = jobs[blockIdx.y];
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= jb.rows) return;                       // whole warps leave together
    const WT* W = (const WT*)jb.W + (size_t)row * jb.cols;
    const float* x = (const float*)jb.x;
    // 16-byte loads need every row to start 16-byte aligned (gpu.py pads nothing: it checks).
    const bool vec = (((size_t)jb.cols * sizeof(WT)) & 15) == 0 && (jb.W & 15) == 0;
    const int nvec = vec ? jb.cols / VEC : 0;
    const uint4* W4 = (const uint4*)W;
    float acc = 0.f;
#pragma unroll 4
    for (int i = lane; i < nvec; i += 32) acc += dot_vec(__ldg(W4 + i), x + i * VEC);
    for (int c = nvec * VEC + lane; c < jb.cols; c += 32) acc += wload(W[c]) * x[c];
    acc = warp_sum(acc);
    if (lane == 0) {
        if (jb.bias) acc += ((const float*)jb.bias)[row];
        combine((float*)jb.y + row, activate(acc, jb.act), jb.mode);
    }
}

// ---- layer norm and token shift (model.layer_norm, time_mix_inputs step 1, channel_mix) -----
//
// Block (t, slice): xn[t] = LN(x[t]) for the block's slices of channels; with M > 0 also the M
// lerps towards the previous token, out[m, t] = xn[t] + (prev - xn[t]) * mix[m], where
// prev = LN(x[t-1]) (recomputed here, so blocks are independent) or, for t = 0, the carried
// `shift` (the state's token-shift vector). Every block computes the row's statistics itself
// (a row is at most a few tens of KB, read from L2) and then writes its channels: for decode
// (gpu.py: one token, a slice per LN_THREADS channels) that spreads the row over several SMs
// instead of looping on one; the prefill uses one block per token (T blocks are plenty).
// With write_shift (only when T == 1: the thread that read shift[c] writes it) shift = xn[0].
// `ids`, if given, makes row t the embedding row emb[ids[t]] (x = the embedding table): ln0.
// xn2, if given, receives a second copy of xn (the residual stream starts as ln0's output).

__device__ void ln_stats(const float* x, int C, float eps, float* red, float* mu, float* rstd) {
    float s = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += x[c];
    const float m = block_sum(s, red) / C;
    float q = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { const float d = x[c] - m; q += d * d; }
    const float var = block_sum(q, red) / C;
    *mu = m;
    *rstd = 1.f / sqrtf(var + eps);
}

extern "C" __global__ void ln_mix(const float* __restrict__ x, const int* __restrict__ ids, int T,
                                  int C, const float* __restrict__ lw, const float* __restrict__ lb,
                                  float eps, float* shift, const float* __restrict__ mix, int M,
                                  float* __restrict__ out, float* __restrict__ xn,
                                  float* __restrict__ xn2, int write_shift) {
    __shared__ float red[33];
    const int t = blockIdx.x;
    const float* xt = ids ? x + (size_t)ids[t] * C : x + (size_t)t * C;
    float mu, rs, mu0 = 0.f, rs0 = 0.f;
    ln_stats(xt, C, eps, red, &mu, &rs);
    const bool has_prev = M > 0 && t > 0;
    if (has_prev) ln_stats(xt - C, C, eps, red, &mu0, &rs0);     // block-uniform branch
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < C; c += gridDim.y * blockDim.x) {
        const float v = (xt[c] - mu) * rs * lw[c] + lb[c];
        if (xn) xn[(size_t)t * C + c] = v;
        if (xn2) xn2[(size_t)t * C + c] = v;
        if (M > 0) {
            const float prev = has_prev ? (xt[c - C] - mu0) * rs0 * lw[c] + lb[c] : shift[c];
            const float d = prev - v;
            for (int m = 0; m < M; m++) out[((size_t)m * T + t) * C + c] = v + d * mix[m * C + c];
            if (write_shift) shift[c] = v;
        }
    }
}

// ---- element-wise ----------------------------------------------------------------------------

// y[i] (mode) act(u[i] + bias[i % cols]); u may be y itself. After a matrix product.
extern "C" __global__ void bias_act(long long n, int cols, float* y, const float* u,
                                    const float* __restrict__ bias, int act, int mode) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = u[i];
        if (bias) v += bias[i % cols];
        combine(y + i, activate(v, act), mode);
    }
}

// float32 activations -> the weights' 16-bit type, for tensor-core matrix products (prefill).
extern "C" __global__ void to_weight_type(long long n, const float* __restrict__ x,
                                          WT* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = wstore(x[i]);
}

// Any stored weights (0 float32, 1 float16, 2 bf16 bits) -> this module's weight type.
extern "C" __global__ void convert_weights(long long n, const void* __restrict__ src, int src_kind,
                                           WT* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float f;
        if (src_kind == 0) f = ((const float*)src)[i];
        else if (src_kind == 1) f = half_to_float(((const u16*)src)[i]);
        else f = bf16_to_float(((const u16*)src)[i]);
        out[i] = wstore(f);
    }
}

// out[t] = table[ids[t]] widened to float32 (DeepEmbed rows s_emb[token]). Block per token.
extern "C" __global__ void gather_rows(const int* __restrict__ ids, const WT* __restrict__ table,
                                       int cols, float* __restrict__ out) {
    const WT* row = table + (size_t)ids[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[(size_t)blockIdx.x * cols + c] = wload(row[c]);
}

// DeepEmbed: z[t] = u[t] @ M[t], M[t] = s_emb row t as a (D, D) matrix. Block per token.
extern "C" __global__ void row_times_matrix(int D, const float* __restrict__ u,
                                            const float* __restrict__ M, float* __restrict__ z) {
    const size_t t = blockIdx.x;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float s = 0.f;
        for (int i = 0; i < D; i++) s += u[t * D + i] * M[t * D * D + (size_t)i * D + j];
        z[t * D + j] = s;
    }
}

// ---- time mix: keys, value residual (model.time_mix_inputs, after the projections) ---------
//
// Block (t, h), one thread per channel of the head. In place: k -> k_tilde, v -> v after the
// value residual; writes kappa_hat (kh) and, in layer 0, v_first.
extern "C" __global__ void keys_values(int T, int C, float* k, float* v,
                                       const float* __restrict__ a, const float* __restrict__ vgate,
                                       float* v_first, const float* __restrict__ k_k,
                                       const float* __restrict__ k_a, float* __restrict__ kh,
                                       int layer0) {
    __shared__ float red[33];
    const int H = C / NH, t = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    const bool on = i < NH;
    const int c = h * NH + i;
    const size_t idx = (size_t)t * C + c;
    const float kv = on ? k[idx] : 0.f;
    const float kk = on ? kv * k_k[c] : 0.f;
    const float norm = sqrtf(block_sum(kk * kk, red));      // l2_normalize over the head
    if (on) {
        kh[idx] = kk / fmaxf(norm, 1e-12f);
        k[idx] = kv * (1.f + (a[idx] - 1.f) * k_a[c]);
        if (layer0) v_first[idx] = v[idx];
        else { const float vv = v[idx]; v[idx] = vv + (v_first[idx] - vv) * vgate[idx]; }
    }
}

// ---- the WKV recurrence (model.wkv_seq / wkv_step) -------------------------------------------
//
// Block h, thread i owns row i of the head's state, S[h, i, :] (NH floats in registers), and
// steps through the T tokens:
//     sa = S_i . (-kappa_hat);  S_ij = S_ij w_j + sa kappa_hat_j a_j + v_i k_j;  y_i = S_i . r
// The next token's inputs are loaded while this one is computed (the loop is latency-bound).
extern "C" __global__ void wkv(int T, int C, float* S, const float* __restrict__ r,
                               const float* __restrict__ w, const float* __restrict__ k,
                               const float* __restrict__ v, const float* __restrict__ kh,
                               const float* __restrict__ a, float* __restrict__ y) {
    __shared__ __align__(16) float rs[NH], ws[NH], ks[NH], ns[NH], bs[NH];
    const int h = blockIdx.x, i = threadIdx.x;
    const bool on = i < NH;
    float* Sh = S + (size_t)h * NH * NH;
    float st[NH];
#pragma unroll
    for (int j = 0; j < NH; j++) st[j] = on ? Sh[i * NH + j] : 0.f;

    size_t base = (size_t)h * NH + (on ? i : 0);
    float nr = 0.f, nw = 0.f, nk = 0.f, nv = 0.f, nn = 0.f, na = 0.f;
    if (T > 0) { nr = r[base]; nw = w[base]; nk = k[base]; nv = v[base]; nn = kh[base]; na = a[base]; }
    for (int t = 0; t < T; t++) {
        __syncthreads();                                   // last token's reads of rs.. done
        if (on) { rs[i] = nr; ws[i] = nw; ks[i] = nk; ns[i] = nn; bs[i] = nn * na; }
        const float vi = nv;
        const size_t here = base;
        if (t + 1 < T) {                                   // prefetch the next token
            base += C;
            nr = r[base]; nw = w[base]; nk = k[base]; nv = v[base]; nn = kh[base]; na = a[base];
        }
        __syncthreads();
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < NH; j++) sa -= st[j] * ns[j];
        float yi = 0.f;
#pragma unroll
        for (int j = 0; j < NH; j++) {
            st[j] = st[j] * ws[j] + sa * bs[j] + vi * ks[j];
            yi += st[j] * rs[j];
        }
        if (on) y[here] = yi;
    }
    if (on) {
#pragma unroll
        for (int j = 0; j < NH; j++) Sh[i * NH + j] = st[j];
    }
}

// ---- time mix output (model.time_mix_output, before the output projection) ----------------
//
// Block (t, h): group norm of y over the head, the bonus (r . k r_k) v, times the gate g.
extern "C" __global__ void wkv_out(int T, int C, const float* __restrict__ y,
                                   const float* __restrict__ r, const float* __restrict__ k,
                                   const float* __restrict__ v, const float* __restrict__ g,
                                   const float* __restrict__ lnw, const float* __restrict__ lnb,
                                   const float* __restrict__ r_k, float eps,
                                   float* __restrict__ out) {
    __shared__ float red[33];
    const int H = C / NH, t = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    const bool on = i < NH;
    const int c = h * NH + i;
    const size_t idx = (size_t)t * C + c;
    const float yv = on ? y[idx] : 0.f;
    const float mu = block_sum(yv, red) / NH;
    const float d = on ? yv - mu : 0.f;
    const float var = block_sum(d * d, red) / NH;
    const float bonus = block_sum(on ? r[idx] * k[idx] * r_k[c] : 0.f, red);
    if (on) out[idx] = ((d / sqrtf(var + eps) * lnw[c] + lnb[c]) + bonus * v[idx]) * g[idx];
}

// ---- decode: keys_values + one wkv step + wkv_out in one block per head --------------------
//
// The same arithmetic as the three kernels above for T = 1, fused to save two launches a layer
// (decode is a chain of small dependent launches). k and v stay in registers.
extern "C" __global__ void time_mix_one(int C, float* S, const float* __restrict__ r,
                                        const float* __restrict__ w, const float* __restrict__ k,
                                        const float* __restrict__ v, const float* __restrict__ a,
                                        const float* __restrict__ g,
                                        const float* __restrict__ vgate, float* v_first,
                                        const float* __restrict__ k_k,
                                        const float* __restrict__ k_a,
                                        const float* __restrict__ lnw,
                                        const float* __restrict__ lnb,
                                        const float* __restrict__ r_k, float eps, int layer0,
                                        float* __restrict__ out) {
    __shared__ float red[33];
    __shared__ __align__(16) float rs[NH], ws[NH], ks[NH], ns[NH], bs[NH];
    const int h = blockIdx.x, i = threadIdx.x;
    const bool on = i < NH;
    const int c = h * NH + (on ? i : 0);
    // keys_values
    const float kv = on ? k[c] : 0.f, av = on ? a[c] : 0.f;
    const float kk = on ? kv * k_k[c] : 0.f;
    const float norm = sqrtf(block_sum(kk * kk, red));
    const float khat = kk / fmaxf(norm, 1e-12f);
    const float kt = on ? kv * (1.f + (av - 1.f) * k_a[c]) : 0.f;
    float vv = on ? v[c] : 0.f;
    if (on) {
        if (layer0) v_first[c] = vv;
        else vv = vv + (v_first[c] - vv) * vgate[c];
        rs[i] = r[c]; ws[i] = w[c]; ks[i] = kt; ns[i] = khat; bs[i] = khat * av;
    }
    __syncthreads();
    // wkv: row i of the head's state
    float y = 0.f;
    if (on) {
        float* row = S + (size_t)h * NH * NH + (size_t)i * NH;
        float st[NH];
#pragma unroll
        for (int j = 0; j < NH; j++) st[j] = row[j];
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < NH; j++) sa -= st[j] * ns[j];
#pragma unroll
        for (int j = 0; j < NH; j++) {
            st[j] = st[j] * ws[j] + sa * bs[j] + vv * ks[j];
            y += st[j] * rs[j];
        }
#pragma unroll
        for (int j = 0; j < NH; j++) row[j] = st[j];
    }
    // wkv_out
    const float mu = block_sum(y, red) / NH;
    const float d = on ? y - mu : 0.f;
    const float var = block_sum(d * d, red) / NH;
    const float bonus = block_sum(on ? rs[i] * kt * r_k[c] : 0.f, red);
    if (on) out[c] = ((d / sqrtf(var + eps) * lnw[c] + lnb[c]) + bonus * vv) * g[c];
}

// ---- training: the WKV operator forward with checkpoints, and its backward (train.py) --------
//
// Layouts: inputs and y (B, T, H, NH); states (B, H, NH, NH) [value i][key j]; checkpoints
// (n_chunks, B, H, NH, NH), the state before token c * chunk. Block (b, h), thread i.

__device__ __forceinline__ size_t tok(int b, int t, int h, int T, int H) {
    return (((size_t)b * T + t) * H + h) * NH;
}

extern "C" __global__ void wkv_train_forward(int B, int T, int H, int chunk,
                                             const float* __restrict__ S0,
                                             const float* __restrict__ r,
                                             const float* __restrict__ w,
                                             const float* __restrict__ k,
                                             const float* __restrict__ v,
                                             const float* __restrict__ alpha,
                                             const float* __restrict__ beta,
                                             float* __restrict__ y, float* __restrict__ S_out,
                                             float* __restrict__ ckpt) {
    __shared__ float rs[NH], ws[NH], ks[NH], as_[NH], bs[NH];
    const int b = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    const bool on = i < NH;
    const size_t sbase = ((size_t)b * H + h) * NH * NH + (size_t)(on ? i : 0) * NH;
    float st[NH];
#pragma unroll
    for (int j = 0; j < NH; j++) st[j] = on ? S0[sbase + j] : 0.f;
    for (int t = 0; t < T; t++) {
        if (t % chunk == 0 && on) {
            float* c = ckpt + (size_t)(t / chunk) * B * H * NH * NH + sbase;
#pragma unroll
            for (int j = 0; j < NH; j++) c[j] = st[j];
        }
        const size_t x = tok(b, t, h, T, H) + (on ? i : 0);
        __syncthreads();
        if (on) { rs[i] = r[x]; ws[i] = w[x]; ks[i] = k[x]; as_[i] = alpha[x]; bs[i] = beta[x]; }
        const float vi = on ? v[x] : 0.f;
        __syncthreads();
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < NH; j++) sa += st[j] * as_[j];
        float yi = 0.f;
#pragma unroll
        for (int j = 0; j < NH; j++) {
            st[j] = st[j] * ws[j] + sa * bs[j] + vi * ks[j];
            yi += st[j] * rs[j];
        }
        if (on) y[x] = yi;
    }
    if (on) {
#pragma unroll
        for (int j = 0; j < NH; j++) S_out[sbase + j] = st[j];
    }
}

// Backward (train.wkv_backward). G = dL/dS_t lives in shared memory (rows padded to NH + 1 so
// that both row and column walks are free of bank conflicts); the states of the current chunk
// are recomputed from its checkpoint into `states` (global scratch, (B*H, chunk+1, NH, NH)).
// Per token, going back: row phase (thread = row i), then column phase (thread = column j).
extern "C" __global__ void wkv_train_backward(int B, int T, int H, int chunk,
                                              const float* __restrict__ dy,
                                              const float* __restrict__ dS_last,
                                              const float* __restrict__ ckpt,
                                              const float* __restrict__ r,
                                              const float* __restrict__ w,
                                              const float* __restrict__ k,
                                              const float* __restrict__ v,
                                              const float* __restrict__ alpha,
                                              const float* __restrict__ beta,
                                              float* __restrict__ states,
                                              float* __restrict__ dr, float* __restrict__ dw,
                                              float* __restrict__ dk, float* __restrict__ dv,
                                              float* __restrict__ dalpha,
                                              float* __restrict__ dbeta,
                                              float* __restrict__ dS0) {
    __shared__ float G[NH][NH + 1];
    __shared__ float rs[NH], ws[NH], ks[NH], as_[NH], bs[NH], dys[NH], vs[NH], sas[NH], gbs[NH];
    const int b = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    const bool on = i < NH;
    const size_t sbase = ((size_t)b * H + h) * NH * NH;
    float* St = states + (size_t)blockIdx.x * (chunk + 1) * NH * NH;
    if (on)
        for (int j = 0; j < NH; j++) G[i][j] = dS_last ? dS_last[sbase + (size_t)i * NH + j] : 0.f;
    const int n_chunks = (T + chunk - 1) / chunk;
    for (int c = n_chunks - 1; c >= 0; c--) {
        const int t0 = c * chunk, t1 = min(t0 + chunk, T);
        // recompute the chunk's states: row i by thread i
        if (on) {
            const float* src = ckpt + (size_t)c * B * H * NH * NH + sbase + (size_t)i * NH;
            for (int j = 0; j < NH; j++) St[(size_t)i * NH + j] = src[j];
        }
        for (int t = t0; t < t1; t++) {
            const size_t x = tok(b, t, h, T, H);
            const float* Sp = St + (size_t)(t - t0) * NH * NH;
            float* Sn = St + (size_t)(t - t0 + 1) * NH * NH;
            __syncthreads();
            if (on) { ws[i] = w[x + i]; ks[i] = k[x + i]; as_[i] = alpha[x + i]; bs[i] = beta[x + i]; }
            __syncthreads();
            if (on) {
                float sa = 0.f;
                for (int j = 0; j < NH; j++) sa += Sp[(size_t)i * NH + j] * as_[j];
                const float vi = v[x + i];
                for (int j = 0; j < NH; j++)
                    Sn[(size_t)i * NH + j] = Sp[(size_t)i * NH + j] * ws[j] + sa * bs[j] + vi * ks[j];
            }
        }
        for (int t = t1 - 1; t >= t0; t--) {
            const size_t x = tok(b, t, h, T, H);
            const float* Sp = St + (size_t)(t - t0) * NH * NH;
            const float* Sc = St + (size_t)(t - t0 + 1) * NH * NH;
            __syncthreads();
            if (on) {
                rs[i] = r[x + i]; ws[i] = w[x + i]; ks[i] = k[x + i]; as_[i] = alpha[x + i];
                bs[i] = beta[x + i]; dys[i] = dy[x + i]; vs[i] = v[x + i];
            }
            __syncthreads();
            if (on) {                                   // row phase: thread i, row i
                const float dyi = dys[i];
                float acc_dv = 0.f, acc_gb = 0.f, acc_sa = 0.f;
                for (int j = 0; j < NH; j++) {
                    const float g = G[i][j] + dyi * rs[j];
                    G[i][j] = g;
                    acc_dv += g * ks[j];
                    acc_gb += g * bs[j];
                    acc_sa += Sp[(size_t)i * NH + j] * as_[j];
                }
                dv[x + i] = acc_dv;
                gbs[i] = acc_gb;
                sas[i] = acc_sa;
            }
            __syncthreads();
            if (on) {                                   // column phase: thread j = i, column j
                const int j = i;
                float a_dr = 0.f, a_dk = 0.f, a_dw = 0.f, a_db = 0.f, a_da = 0.f;
                for (int row = 0; row < NH; row++) {
                    const float g = G[row][j];
                    const float sp = Sp[(size_t)row * NH + j];
                    a_dr += Sc[(size_t)row * NH + j] * dys[row];
                    a_dk += g * vs[row];
                    a_dw += g * sp;
                    a_db += g * sas[row];
                    a_da += sp * gbs[row];
                }
                dr[x + j] = a_dr; dk[x + j] = a_dk; dw[x + j] = a_dw; dbeta[x + j] = a_db;
                dalpha[x + j] = a_da;
                // dL/dS_{t-1} = G diag(w) + (G beta) alpha^T, column j
                for (int row = 0; row < NH; row++) G[row][j] = G[row][j] * ws[j] + gbs[row] * as_[j];
            }
        }
    }
    __syncthreads();
    if (on)
        for (int j = 0; j < NH; j++) dS0[sbase + (size_t)i * NH + j] = G[i][j];
}
