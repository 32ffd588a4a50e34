// impl="native": one direction of one recurrent layer, the whole time loop forward and backward, as XLA FFI
// custom calls on the CPU (lstm_lab/kernels/native/__init__.py builds, loads and calls this file).
//
// The math follows lstm_lab/cells.py step for step (the float64 reference tests and the scan hold it).
// Every buffer has leading "member" dimensions (a population under jax.vmap; 1 otherwise): members and
// batch chunks are independent time loops, run in parallel on XLA's intra-op thread pool.
//
// Per step the recurrent product is one small GEMM against a matrix packed once per call into column
// panels (the matrix is constant over the T steps); the elementwise gate math is written as loops the
// compiler vectorizes, with a Cephes-style expf (about 1 ulp) so that no libm call stops it.
// The weight gradients are not computed here: they are single large GEMMs after the loop (XLA's).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include <sched.h>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------------------
// Elementwise functions, vectorizable
// ---------------------------------------------------------------------------------------------------------
static inline float fexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round to nearest by the 1.5 * 2^23 trick (floorf would keep the loop from vectorizing)
  float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}

static inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

static inline float ftanh(float x) {
  float ax = std::fabs(x);
  float z = x * x;
  float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                  1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  float big = 1.0f - 2.0f / (fexp(2.0f * ax) + 1.0f);
  big = std::copysign(big, x);
  return ax < 0.625f ? small : big;
}

enum Act : int64_t { TANH = 0, IDENTITY = 1, SIGMOID = 2, RELU = 3, SOFTSIGN = 4 };

// out[j] = act(in[j])
static void act_into(int64_t act, const float* in, float* out, int n) {
  switch (act) {
    case TANH:
#pragma omp simd
      for (int j = 0; j < n; ++j) out[j] = ftanh(in[j]);
      break;
    case IDENTITY:
      if (out != in) std::memcpy(out, in, sizeof(float) * n);
      break;
    case SIGMOID:
#pragma omp simd
      for (int j = 0; j < n; ++j) out[j] = fsigmoid(in[j]);
      break;
    case RELU:
#pragma omp simd
      for (int j = 0; j < n; ++j) out[j] = std::max(in[j], 0.0f);
      break;
    default:  // SOFTSIGN
#pragma omp simd
      for (int j = 0; j < n; ++j) out[j] = in[j] / (1.0f + std::fabs(in[j]));
  }
}

// g[j] *= act'(.) expressed through the activation's output y
static void act_grad(int64_t act, const float* y, float* g, int n) {
  switch (act) {
    case TANH:
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] *= 1.0f - y[j] * y[j];
      break;
    case IDENTITY:
      break;
    case SIGMOID:
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] *= y[j] * (1.0f - y[j]);
      break;
    case RELU:
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = y[j] > 0.0f ? g[j] : 0.0f;
      break;
    default: {  // SOFTSIGN: 1 / (1 + |a|)^2 = (1 - |y|)^2
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        float s = 1.0f - std::fabs(y[j]);
        g[j] *= s * s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// GEMM against a packed matrix: C[M, Npad] = A[M, K] @ B, B packed into panels of PW columns
// ---------------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int MR = 8;
#else
constexpr int VL = 8;
constexpr int MR = 4;
#endif
constexpr int NV = 2;  // vectors per panel row
constexpr int PW = VL * NV;
typedef float vf __attribute__((vector_size(VL * sizeof(float)), aligned(4), may_alias));

struct Packed {
  int K = 0, N = 0, Npad = 0;
  std::vector<float> data;  // [Npad / PW][K][PW]
};

// B(k, n) = src[k * sk + n * sn] for k < K, n < N: pack_init sizes it, pack_panels fills panels [jp0, jp1)
struct PackJob {
  Packed* p;
  const float* src;
  int64_t sk, sn;
};

static void pack_init(PackJob& job, const float* src, int K, int N, int64_t sk, int64_t sn, Packed& p) {
  p.K = K;
  p.N = N;
  p.Npad = (N + PW - 1) / PW * PW;
  p.data.assign(static_cast<size_t>(p.Npad) * K, 0.0f);
  job = PackJob{&p, src, sk, sn};
}

static void pack_panels(const PackJob& job, int jp0, int jp1) {
  Packed& p = *job.p;
  const int K = p.K, N = p.N;
  for (int jp = jp0; jp < jp1; ++jp) {
    float* panel = p.data.data() + static_cast<size_t>(jp) * K * PW;
    int n0 = jp * PW, nw = std::min(PW, N - n0);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < nw; ++n) panel[k * PW + n] = job.src[k * job.sk + (n0 + n) * job.sn];
  }
}

template <int R>
static inline void micro(const float* A, int lda, int K, const float* panel, float* C, int ldc) {
  vf c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = vf{};
  for (int k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const vf*>(panel + k * PW + v * VL);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vf*>(C + r * ldc + v * VL) = c[r][v];
}

// One row (B = 1, a GEMV): four independent accumulator sets over k, so that the FMA latency is hidden
static inline void micro1(const float* A, int K, const float* panel, float* C) {
  vf c[4][NV];
  for (int s = 0; s < 4; ++s)
    for (int v = 0; v < NV; ++v) c[s][v] = vf{};
  int k = 0;
  for (; k + 4 <= K; k += 4)
    for (int s = 0; s < 4; ++s)
      for (int v = 0; v < NV; ++v) c[s][v] += A[k + s] * *reinterpret_cast<const vf*>(panel + (k + s) * PW + v * VL);
  for (; k < K; ++k)
    for (int v = 0; v < NV; ++v) c[0][v] += A[k] * *reinterpret_cast<const vf*>(panel + k * PW + v * VL);
  for (int v = 0; v < NV; ++v)
    *reinterpret_cast<vf*>(C + v * VL) = (c[0][v] + c[1][v]) + (c[2][v] + c[3][v]);
}

static void gemm(const float* A, int lda, int M, const Packed& B, float* C, int ldc) {
  const int K = B.K;
  for (int jp = 0; jp < B.Npad / PW; ++jp) {
    const float* panel = B.data.data() + static_cast<size_t>(jp) * K * PW;
    float* Cp = C + jp * PW;
    int m = 0;
    for (; m + MR <= M; m += MR) micro<MR>(A + m * lda, lda, K, panel, Cp + m * ldc, ldc);
    const float* Am = A + m * lda;
    float* Cm = Cp + m * ldc;
    switch (M - m) {
      case 0: break;
      case 1: micro1(Am, K, panel, Cm); break;
      case 2: micro<2>(Am, lda, K, panel, Cm, ldc); break;
      case 3: micro<3>(Am, lda, K, panel, Cm, ldc); break;
#if defined(__AVX512F__)
      case 4: micro<4>(Am, lda, K, panel, Cm, ldc); break;
      case 5: micro<5>(Am, lda, K, panel, Cm, ldc); break;
      case 6: micro<6>(Am, lda, K, panel, Cm, ldc); break;
      case 7: micro<7>(Am, lda, K, panel, Cm, ldc); break;
#endif
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Parallel loop on XLA's intra-op thread pool (the caller works too; late tasks find nothing left)
// ---------------------------------------------------------------------------------------------------------
struct Job {
  std::function<void(int)> fn;
  int n = 0;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

static void work(const std::shared_ptr<Job>& job) {
  for (int i; (i = job->next.fetch_add(1)) < job->n;) {
    job->fn(i);
    if (job->done.fetch_add(1) + 1 == job->n) {
      std::lock_guard<std::mutex> lock(job->mu);
      job->cv.notify_all();
    }
  }
}

static void parallel_for(ffi::ThreadPool& pool, int n, std::function<void(int)> fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = std::move(fn);
  job->n = n;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([job] { work(job); });
  work(job);
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->n; });
}

// ---------------------------------------------------------------------------------------------------------
// The cell description (attributes) and the per-member sizes
// ---------------------------------------------------------------------------------------------------------
enum Family : int64_t { LSTM = 0, GRU = 1, MGU = 2, RNN = 3 };
enum Flag : int64_t { HAS_I = 1, HAS_F = 2, HAS_O = 4, PEEP = 8, COUPLED = 16, FGR = 32, RESET_AFTER = 64 };

struct Cell {
  int64_t family, flags, act_g, act_h;
  int H, N, k;          // hidden size, gate columns n*H, FGR's number of recurrent gates
  int oi, of, oz, oo;   // LSTM: column offsets of the gate blocks in xp/R (-1: removed)
  int A;                // residual activations per row
  int G;                // FGR gates carry width (k*H, or 1 as a placeholder)
  int rec_off[3];       // FGR: offsets of the recurrent gates' blocks in the gate order

  bool has(int64_t f) const { return (flags & f) != 0; }
};

static Cell make_cell(int64_t family, int64_t flags, int64_t act_g, int64_t act_h, int H) {
  Cell c{family, flags, act_g, act_h, H, 0, 0, -1, -1, -1, -1, 0, 1, {-1, -1, -1}};
  if (family == LSTM) {
    int n = 0;
    if (c.has(HAS_I)) c.oi = (n++) * H;
    if (c.has(HAS_F) && !c.has(COUPLED)) c.of = (n++) * H;
    c.oz = (n++) * H;
    if (c.has(HAS_O)) c.oo = (n++) * H;
    c.N = n * H;
    int k = 0;
    for (int off : {c.oi, c.of, c.oo})
      if (off >= 0) c.rec_off[k++] = off;
    c.k = k;
    c.G = c.has(FGR) ? k * H : 1;
    c.A = 5 * H;  // i, f, z, o, c
  } else if (family == GRU) {
    c.N = 3 * H;
    c.A = 4 * H;  // r, u, n, R_n h + b_hn (reset_after)
  } else if (family == MGU) {
    c.N = 2 * H;
    c.A = 2 * H;  // f, n
  } else {
    c.N = H;
    c.A = H;  // y
  }
  return c;
}

static int64_t leading(const ffi::AnyBuffer& b, int rank) {
  auto d = b.dimensions();
  int64_t p = 1;
  for (size_t i = 0; i + rank < d.size(); ++i) p *= d[i];
  return p;
}

// Threads that can run at once: XLA's pool and the caller, at most the CPUs this process may use (more work
// items than cores leaves one core with two: 3 chunks on 2 cores ran at 1.3x one core, 2 chunks at ~1.9x)
static int64_t usable_threads(ffi::ThreadPool& pool) {
  int64_t cpus = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  if (cpus <= 0) cpus = std::max(1u, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, cpus));
}

// Batch chunks per member: enough work items for the threads, chunks of at least 4 rows
static int batch_chunks(int64_t P, int B, int64_t threads) {
  int64_t want = (threads + P - 1) / P;
  int64_t most = std::max(1, B / 4);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

struct Mats {  // one member's packed matrices
  Packed R, Ru, Rn, Rg;  // forward: R (or its r,u / f columns), R_n, R_gates
};

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
struct FwdIO {
  const float *xp, *mask, *peep, *bhn, *h0, *c0, *g0;
  float *ys, *hT, *cT, *gT, *ph, *pc, *pg, *acts;
};

static void forward_chunk(const Cell& c, const Mats& m, const FwdIO& io, int T, int B, int b0, int b1) {
  const int H = c.H, N = c.N, A = c.A, Bc = b1 - b0;
  const bool lstm = c.family == LSTM;
  std::vector<float> h(static_cast<size_t>(Bc) * H), cc(lstm ? Bc * H : 0), g(c.has(FGR) ? Bc * c.G : 0);
  std::memcpy(h.data(), io.h0 + b0 * H, sizeof(float) * Bc * H);
  if (lstm) std::memcpy(cc.data(), io.c0 + b0 * H, sizeof(float) * Bc * H);
  if (c.has(FGR)) std::memcpy(g.data(), io.g0 + b0 * c.G, sizeof(float) * Bc * c.G);
  const int Spad = std::max({m.R.Npad, m.Ru.Npad, 1});
  std::vector<float> S(static_cast<size_t>(Bc) * Spad), S2(static_cast<size_t>(Bc) * std::max(m.Rn.Npad, m.Rg.Npad)),
      tmp(static_cast<size_t>(Bc) * H), zero(H, 0.0f);
  const float* pi = c.has(PEEP) && c.oi >= 0 ? io.peep : zero.data();
  const float* pf = c.has(PEEP) && c.of >= 0 ? io.peep + H : zero.data();
  const float* po = c.has(PEEP) && c.oo >= 0 ? io.peep + 2 * H : zero.data();

  for (int t = 0; t < T; ++t) {
    const size_t row0 = static_cast<size_t>(t) * B + b0;
    const float* xpt = io.xp + row0 * N;
    const float* mt = io.mask + row0;
    std::memcpy(io.ph + row0 * H, h.data(), sizeof(float) * Bc * H);
    if (lstm) std::memcpy(io.pc + row0 * H, cc.data(), sizeof(float) * Bc * H);
    if (c.has(FGR)) std::memcpy(io.pg + row0 * c.G, g.data(), sizeof(float) * Bc * c.G);
    float* ys = io.ys + row0 * H;
    float* act = io.acts + row0 * A;

    if (lstm) {
      gemm(h.data(), H, Bc, m.R, S.data(), Spad);
      if (c.has(FGR)) {
        gemm(g.data(), c.G, Bc, m.Rg, S2.data(), m.Rg.Npad);
        for (int b = 0; b < Bc; ++b)
          for (int q = 0; q < c.k; ++q) {
            float* s = S.data() + b * Spad + c.rec_off[q];
            const float* e = S2.data() + b * m.Rg.Npad + q * H;
#pragma omp simd
            for (int j = 0; j < H; ++j) s[j] += e[j];
          }
      }
      for (int b = 0; b < Bc; ++b) {
        float* a = S.data() + b * Spad;
        const float* x = xpt + b * N;
#pragma omp simd
        for (int j = 0; j < N; ++j) a[j] += x[j];
        float* hb = h.data() + b * H;
        float* cb = cc.data() + b * H;
        float *ig = act + b * A, *fg = ig + H, *zg = ig + 2 * H, *og = ig + 3 * H, *cn = ig + 4 * H;
        if (c.oi >= 0) {
          const float* ai = a + c.oi;
#pragma omp simd
          for (int j = 0; j < H; ++j) ig[j] = fsigmoid(ai[j] + pi[j] * cb[j]);
        } else {
          std::fill(ig, ig + H, 1.0f);
        }
        if (c.has(COUPLED)) {
#pragma omp simd
          for (int j = 0; j < H; ++j) fg[j] = 1.0f - ig[j];
        } else if (c.of >= 0) {
          const float* af = a + c.of;
#pragma omp simd
          for (int j = 0; j < H; ++j) fg[j] = fsigmoid(af[j] + pf[j] * cb[j]);
        } else {
          std::fill(fg, fg + H, 1.0f);
        }
        act_into(c.act_g, a + c.oz, zg, H);
#pragma omp simd
        for (int j = 0; j < H; ++j) cn[j] = zg[j] * ig[j] + cb[j] * fg[j];
        if (c.oo >= 0) {
          const float* ao = a + c.oo;
#pragma omp simd
          for (int j = 0; j < H; ++j) og[j] = fsigmoid(ao[j] + po[j] * cn[j]);
        } else {
          std::fill(og, og + H, 1.0f);
        }
        float* y = ys + b * H;
        act_into(c.act_h, cn, y, H);
#pragma omp simd
        for (int j = 0; j < H; ++j) y[j] *= og[j];
        if (mt[b] != 0.0f) {
          std::memcpy(hb, y, sizeof(float) * H);
          std::memcpy(cb, cn, sizeof(float) * H);
          if (c.has(FGR)) {
            float* gb = g.data() + b * c.G;
            const float* srcs[3] = {ig, fg, og};
            int q = 0;
            if (c.oi >= 0) std::memcpy(gb + (q++) * H, srcs[0], sizeof(float) * H);
            if (c.of >= 0) std::memcpy(gb + (q++) * H, srcs[1], sizeof(float) * H);
            if (c.oo >= 0) std::memcpy(gb + (q++) * H, srcs[2], sizeof(float) * H);
          }
        } else {
          std::fill(y, y + H, 0.0f);
        }
      }
    } else if (c.family == GRU) {
      const bool after = c.has(RESET_AFTER);
      gemm(h.data(), H, Bc, after ? m.R : m.Ru, S.data(), Spad);  // R h: r, u (and n) columns
      for (int b = 0; b < Bc; ++b) {
        const float* a = S.data() + b * Spad;
        const float* x = xpt + b * N;
        const float* hb = h.data() + b * H;
        float *r = act + b * A, *u = r + H, *hn = r + 3 * H;
#pragma omp simd
        for (int j = 0; j < H; ++j) {
          r[j] = fsigmoid(x[j] + a[j]);
          u[j] = fsigmoid(x[H + j] + a[H + j]);
        }
        if (after) {
#pragma omp simd
          for (int j = 0; j < H; ++j) hn[j] = a[2 * H + j] + io.bhn[j];
        } else {
          float* rh = tmp.data() + b * H;
#pragma omp simd
          for (int j = 0; j < H; ++j) {
            rh[j] = r[j] * hb[j];
            hn[j] = 0.0f;
          }
        }
      }
      if (!after) gemm(tmp.data(), H, Bc, m.Rn, S2.data(), m.Rn.Npad);  // R_n (r * h)
      for (int b = 0; b < Bc; ++b) {
        const float* x = xpt + b * N;
        float* hb = h.data() + b * H;
        float *r = act + b * A, *u = r + H, *n = r + 2 * H, *hn = r + 3 * H;
        float* y = ys + b * H;
        if (after) {
#pragma omp simd
          for (int j = 0; j < H; ++j) n[j] = x[2 * H + j] + r[j] * hn[j];
        } else {
          const float* q = S2.data() + b * m.Rn.Npad;
#pragma omp simd
          for (int j = 0; j < H; ++j) n[j] = x[2 * H + j] + q[j];
        }
        act_into(TANH, n, n, H);
#pragma omp simd
        for (int j = 0; j < H; ++j) y[j] = (1.0f - u[j]) * n[j] + u[j] * hb[j];
        if (mt[b] != 0.0f) {
          std::memcpy(hb, y, sizeof(float) * H);
        } else {
          std::fill(y, y + H, 0.0f);
        }
      }
    } else if (c.family == MGU) {
      gemm(h.data(), H, Bc, m.Ru, S.data(), Spad);  // R_f h
      for (int b = 0; b < Bc; ++b) {
        const float* a = S.data() + b * Spad;
        const float* x = xpt + b * N;
        const float* hb = h.data() + b * H;
        float* f = act + b * A;
        float* fh = tmp.data() + b * H;
#pragma omp simd
        for (int j = 0; j < H; ++j) {
          f[j] = fsigmoid(x[j] + a[j]);
          fh[j] = f[j] * hb[j];
        }
      }
      gemm(tmp.data(), H, Bc, m.Rn, S2.data(), m.Rn.Npad);  // R_n (f * h)
      for (int b = 0; b < Bc; ++b) {
        const float* x = xpt + b * N;
        const float* q = S2.data() + b * m.Rn.Npad;
        float* hb = h.data() + b * H;
        float *f = act + b * A, *n = f + H;
        float* y = ys + b * H;
#pragma omp simd
        for (int j = 0; j < H; ++j) n[j] = x[H + j] + q[j];
        act_into(TANH, n, n, H);
#pragma omp simd
        for (int j = 0; j < H; ++j) y[j] = (1.0f - f[j]) * hb[j] + f[j] * n[j];
        if (mt[b] != 0.0f) {
          std::memcpy(hb, y, sizeof(float) * H);
        } else {
          std::fill(y, y + H, 0.0f);
        }
      }
    } else {  // RNN
      gemm(h.data(), H, Bc, m.R, S.data(), Spad);
      for (int b = 0; b < Bc; ++b) {
        float* a = S.data() + b * Spad;
        const float* x = xpt + b * N;
        float* hb = h.data() + b * H;
        float* y = ys + b * H;
        float* ya = act + b * A;
#pragma omp simd
        for (int j = 0; j < H; ++j) a[j] += x[j];
        act_into(TANH, a, ya, H);
        if (mt[b] != 0.0f) {
          std::memcpy(y, ya, sizeof(float) * H);
          std::memcpy(hb, ya, sizeof(float) * H);
        } else {
          std::fill(y, y + H, 0.0f);
        }
      }
    }
  }
  std::memcpy(io.hT + b0 * H, h.data(), sizeof(float) * Bc * H);
  if (lstm) std::memcpy(io.cT + b0 * H, cc.data(), sizeof(float) * Bc * H);
  if (c.has(FGR)) std::memcpy(io.gT + b0 * c.G, g.data(), sizeof(float) * Bc * c.G);
}

// One member's matrices for the forward (transpose=false) or the backward (R^T: transpose=true): sized here,
// their panels filled by pack_in_parallel
static void pack_member(const Cell& c, const float* R, const float* Rg, bool transpose, Mats& m,
                        std::vector<PackJob>& jobs) {
  const int H = c.H, N = c.N;
  // forward: B(k, n) = R[k, n0 + n]; backward: B(k, n) = R[n, n0 + k] (R^T restricted to columns n0..)
  auto part = [&](Packed& p, int n0, int width) {
    jobs.emplace_back();
    if (!transpose)
      pack_init(jobs.back(), R + n0, H, width, N, 1, p);
    else
      pack_init(jobs.back(), R + n0, width, H, 1, N, p);
  };
  if (c.family == LSTM || c.family == RNN || (c.family == GRU && c.has(RESET_AFTER))) {
    part(m.R, 0, N);
  } else if (c.family == GRU) {
    part(m.Ru, 0, 2 * H);
    part(m.Rn, 2 * H, H);
  } else {  // MGU
    part(m.Ru, 0, H);
    part(m.Rn, H, H);
  }
  if (c.family == LSTM && c.has(FGR)) {
    const int G = c.G;
    jobs.emplace_back();
    if (!transpose)
      pack_init(jobs.back(), Rg, G, G, G, 1, m.Rg);
    else
      pack_init(jobs.back(), Rg, G, G, 1, G, m.Rg);
  }
}

// Every member's matrices, panels spread over the threads (packing R at H = 512 took 2.3 ms on one core)
static void pack_in_parallel(ffi::ThreadPool& pool, const Cell& c, const float* R, const float* Rg, int64_t P,
                             bool transpose, std::vector<Mats>& mats) {
  std::vector<PackJob> jobs;
  const int64_t G = c.has(FGR) ? static_cast<int64_t>(c.G) * c.G : 0;
  for (int64_t p = 0; p < P; ++p)
    pack_member(c, R + p * static_cast<int64_t>(c.H) * c.N, Rg + p * G, transpose, mats[p], jobs);
  std::vector<std::pair<int, int>> items;  // (job, first panel); 8 panels per item
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int jp = 0; jp < jobs[j].p->Npad / PW; jp += 8) items.emplace_back(static_cast<int>(j), jp);
  parallel_for(pool, static_cast<int>(items.size()), [&](int i) {
    const PackJob& job = jobs[items[i].first];
    pack_panels(job, items[i].second, std::min(items[i].second + 8, job.p->Npad / PW));
  });
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer xp, ffi::AnyBuffer mask, ffi::AnyBuffer R,
                        ffi::AnyBuffer Rg, ffi::AnyBuffer peep, ffi::AnyBuffer bhn, ffi::AnyBuffer h0,
                        ffi::AnyBuffer c0, ffi::AnyBuffer g0, int64_t family, int64_t flags, int64_t act_g,
                        int64_t act_h, int64_t hidden, ffi::Result<ffi::AnyBuffer> ys,
                        ffi::Result<ffi::AnyBuffer> hT, ffi::Result<ffi::AnyBuffer> cT,
                        ffi::Result<ffi::AnyBuffer> gT, ffi::Result<ffi::AnyBuffer> ph,
                        ffi::Result<ffi::AnyBuffer> pc, ffi::Result<ffi::AnyBuffer> pg,
                        ffi::Result<ffi::AnyBuffer> acts) {
  if (xp.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("lstm_lab native: float32 only");
  auto d = xp.dimensions();
  if (d.size() < 3) return ffi::Error::InvalidArgument("lstm_lab native: xp must be [..., T, B, n*H]");
  const int T = static_cast<int>(d[d.size() - 3]), B = static_cast<int>(d[d.size() - 2]);
  const Cell c = make_cell(family, flags, act_g, act_h, static_cast<int>(hidden));
  if (d[d.size() - 1] != c.N) return ffi::Error::InvalidArgument("lstm_lab native: xp's last dimension is not n*H");
  const int64_t P = leading(xp, 3);
  const int H = c.H, G = c.G;
  const bool lstm = family == LSTM;
  std::vector<Mats> mats(P);
  pack_in_parallel(pool, c, R.typed_data<float>(), Rg.typed_data<float>(), P, false, mats);
  const int nb = batch_chunks(P, B, usable_threads(pool));
  const size_t TB = static_cast<size_t>(T) * B;
  parallel_for(pool, static_cast<int>(P * nb), [&](int item) {
    const int64_t p = item / nb;
    const int q = item % nb, b0 = q * B / nb, b1 = (q + 1) * B / nb;
    FwdIO io{xp.typed_data<float>() + p * TB * c.N,
             mask.typed_data<float>() + p * TB,
             peep.typed_data<float>() + p * 3 * H,
             bhn.typed_data<float>() + p * H,
             h0.typed_data<float>() + p * B * H,
             c0.typed_data<float>() + (lstm ? p * B * H : 0),
             g0.typed_data<float>() + (c.has(FGR) ? p * B * G : 0),
             ys->typed_data<float>() + p * TB * H,
             hT->typed_data<float>() + p * B * H,
             cT->typed_data<float>() + (lstm ? p * B * H : 0),
             gT->typed_data<float>() + (c.has(FGR) ? p * B * G : 0),
             ph->typed_data<float>() + p * TB * H,
             pc->typed_data<float>() + (lstm ? p * TB * H : 0),
             pg->typed_data<float>() + (c.has(FGR) ? p * TB * G : 0),
             acts->typed_data<float>() + p * TB * c.A};
    forward_chunk(c, mats[p], io, T, B, b0, b1);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------
// Backward: the state gradients in reverse time; dxp (the pre-activation gradients) out, the peephole
// gradients summed; the weight gradients are left to XLA (one GEMM each over all steps)
// ---------------------------------------------------------------------------------------------------------
struct BwdIO {
  const float *mask, *peep, *ph, *pc, *pg, *acts, *dys, *dhT, *dcT, *dgT;
  float *dxp, *dh0, *dc0, *dg0, *dpeep;  // dpeep: this chunk's own [3, H]
};

static void backward_chunk(const Cell& c, const Mats& m, const BwdIO& io, int T, int B, int b0, int b1) {
  const int H = c.H, N = c.N, A = c.A, G = c.G, Bc = b1 - b0;
  const bool lstm = c.family == LSTM, fgr = c.has(FGR);
  std::vector<float> dh(static_cast<size_t>(Bc) * H), dc(lstm ? Bc * H : 0), dg(fgr ? Bc * G : 0);
  std::memcpy(dh.data(), io.dhT + b0 * H, sizeof(float) * Bc * H);
  if (lstm) std::memcpy(dc.data(), io.dcT + b0 * H, sizeof(float) * Bc * H);
  if (fgr) std::memcpy(dg.data(), io.dgT + b0 * G, sizeof(float) * Bc * G);
  const int Spad = std::max({m.R.Npad, m.Ru.Npad, 1});
  std::vector<float> S(static_cast<size_t>(Bc) * Spad), S2(static_cast<size_t>(Bc) * std::max(m.Rn.Npad, m.Rg.Npad)),
      direct(static_cast<size_t>(Bc) * H), drec(c.family == GRU ? static_cast<size_t>(Bc) * N : 0), tmp(static_cast<size_t>(Bc) * std::max(H, G)), dy(H), w(H), zero(H, 0.0f);
  const float* pi = c.has(PEEP) && c.oi >= 0 ? io.peep : zero.data();
  const float* pf = c.has(PEEP) && c.of >= 0 ? io.peep + H : zero.data();
  const float* po = c.has(PEEP) && c.oo >= 0 ? io.peep + 2 * H : zero.data();
  float *dpi = io.dpeep, *dpf = io.dpeep + H, *dpo = io.dpeep + 2 * H;

  for (int t = T - 1; t >= 0; --t) {
    const size_t row0 = static_cast<size_t>(t) * B + b0;
    const float* mt = io.mask + row0;
    const float* act = io.acts + row0 * A;
    const float* dys = io.dys + row0 * H;
    const float* hp = io.ph + row0 * H;
    float* dxp = io.dxp + row0 * N;

    if (lstm) {
      for (int b = 0; b < Bc; ++b) {
        float* d = dxp + b * N;
        float* dhb = dh.data() + b * H;
        float* dcb = dc.data() + b * H;
        if (mt[b] == 0.0f) {  // frozen carry: the gradients pass through; no output, no pre-activations
          std::fill(d, d + N, 0.0f);
          continue;
        }
        const float *ig = act + b * A, *fg = ig + H, *zg = ig + 2 * H, *og = ig + 3 * H, *cn = ig + 4 * H;
        const float* cp = io.pc + (row0 + b) * H;
        float* dgb = fgr ? dg.data() + b * G : nullptr;
        // gate activations' gradients from the FGR carry (the gates this step fed forward)
        const float* dgi = nullptr;
        const float* dgf = nullptr;
        const float* dgo = nullptr;
        if (fgr) {
          int q = 0;
          if (c.oi >= 0) dgi = dgb + (q++) * H;
          if (c.of >= 0) dgf = dgb + (q++) * H;
          if (c.oo >= 0) dgo = dgb + (q++) * H;
        }
        float* hc = w.data();
        act_into(c.act_h, cn, hc, H);
#pragma omp simd
        for (int j = 0; j < H; ++j) dy[j] = dys[b * H + j] + dhb[j];
        // o and h(c)
        float* dhc = tmp.data() + b * H;  // scratch for this row
#pragma omp simd
        for (int j = 0; j < H; ++j) dhc[j] = dy[j] * og[j];
        act_grad(c.act_h, hc, dhc, H);  // d c from y
        if (c.oo >= 0) {
          float* dao = d + c.oo;
#pragma omp simd
          for (int j = 0; j < H; ++j) {
            float g = dy[j] * hc[j] + (dgo ? dgo[j] : 0.0f);
            dao[j] = g * og[j] * (1.0f - og[j]);
            dhc[j] += dao[j] * po[j];
            dpo[j] += dao[j] * cn[j];
          }
        }
        // dhc is now the total gradient of c_t
#pragma omp simd
        for (int j = 0; j < H; ++j) dcb[j] += dhc[j];
        float* daz = d + c.oz;
#pragma omp simd
        for (int j = 0; j < H; ++j) daz[j] = dcb[j] * ig[j];
        act_grad(c.act_g, zg, daz, H);
        if (c.has(COUPLED)) {  // f = 1 - i: di = dc z - dc c_prev (+ FGR's i)
          float* dai = d + c.oi;
#pragma omp simd
          for (int j = 0; j < H; ++j) {
            float g = dcb[j] * (zg[j] - cp[j]) + (dgi ? dgi[j] : 0.0f);
            dai[j] = g * ig[j] * (1.0f - ig[j]);
            dpi[j] += dai[j] * cp[j];
          }
#pragma omp simd
          for (int j = 0; j < H; ++j) dcb[j] = dcb[j] * fg[j] + dai[j] * pi[j];
        } else {
          float* dai = c.oi >= 0 ? d + c.oi : nullptr;
          float* daf = c.of >= 0 ? d + c.of : nullptr;
          if (dai) {
#pragma omp simd
            for (int j = 0; j < H; ++j) {
              float g = dcb[j] * zg[j] + (dgi ? dgi[j] : 0.0f);
              dai[j] = g * ig[j] * (1.0f - ig[j]);
              dpi[j] += dai[j] * cp[j];
            }
          }
          if (daf) {
#pragma omp simd
            for (int j = 0; j < H; ++j) {
              float g = dcb[j] * cp[j] + (dgf ? dgf[j] : 0.0f);
              daf[j] = g * fg[j] * (1.0f - fg[j]);
              dpf[j] += daf[j] * cp[j];
            }
          }
#pragma omp simd
          for (int j = 0; j < H; ++j)
            dcb[j] = dcb[j] * fg[j] + (dai ? dai[j] * pi[j] : 0.0f) + (daf ? daf[j] * pf[j] : 0.0f);
        }
      }
      // dh_prev = d_pre @ R^T (masked rows: d_pre = 0, dh passes through)
      gemm(dxp, N, Bc, m.R, S.data(), Spad);
      for (int b = 0; b < Bc; ++b) {
        if (mt[b] == 0.0f) continue;
        std::memcpy(dh.data() + b * H, S.data() + b * Spad, sizeof(float) * H);
      }
      if (fgr) {  // dgates_prev = d_pre[recurrent gates] @ R_gates^T
        for (int b = 0; b < Bc; ++b)
          for (int q = 0; q < c.k; ++q)
            std::memcpy(tmp.data() + b * G + q * H, dxp + b * N + c.rec_off[q], sizeof(float) * H);
        gemm(tmp.data(), G, Bc, m.Rg, S2.data(), m.Rg.Npad);
        for (int b = 0; b < Bc; ++b) {
          if (mt[b] == 0.0f) continue;
          std::memcpy(dg.data() + b * G, S2.data() + b * m.Rg.Npad, sizeof(float) * G);
        }
      }
    } else if (c.family == GRU) {
      const bool after = c.has(RESET_AFTER);
      for (int b = 0; b < Bc; ++b) {
        float* d = dxp + b * N;
        float* dhb = dh.data() + b * H;
        float* dir = direct.data() + b * H;
        if (mt[b] == 0.0f) {
          std::fill(d, d + N, 0.0f);
          std::memcpy(dir, dhb, sizeof(float) * H);
          continue;
        }
        const float *r = act + b * A, *u = r + H, *n = r + 2 * H;
        const float* hb = hp + b * H;
        float* dan = d + 2 * H;
        float* dau = d + H;
#pragma omp simd
        for (int j = 0; j < H; ++j) {
          float g = dys[b * H + j] + dhb[j];
          dan[j] = g * (1.0f - u[j]) * (1.0f - n[j] * n[j]);
          dau[j] = g * (hb[j] - n[j]) * u[j] * (1.0f - u[j]);
          dir[j] = g * u[j];
        }
      }
      if (after) {
        // d r = dan * (R_n h + b_hn); the recurrent product's gradient is [dar, dau, dan * r]
        for (int b = 0; b < Bc; ++b) {
          float* d = dxp + b * N;
          float* q = drec.data() + b * N;
          if (mt[b] == 0.0f) {
            std::fill(q, q + N, 0.0f);
            continue;
          }
          const float *r = act + b * A, *hn = r + 3 * H;
#pragma omp simd
          for (int j = 0; j < H; ++j) {
            float dr = d[2 * H + j] * hn[j];
            d[j] = dr * r[j] * (1.0f - r[j]);
            q[j] = d[j];
            q[H + j] = d[H + j];
            q[2 * H + j] = d[2 * H + j] * r[j];
          }
        }
        gemm(drec.data(), N, Bc, m.R, S.data(), Spad);
        for (int b = 0; b < Bc; ++b) {
          float* dhb = dh.data() + b * H;
          const float* dir = direct.data() + b * H;
          const float* s = S.data() + b * Spad;
#pragma omp simd
          for (int j = 0; j < H; ++j) dhb[j] = dir[j] + s[j];
        }
      } else {
        // d(r h) = dan @ R_n^T; dr = d(r h) * h; dh += d(r h) * r; then [dar, dau] @ R_ru^T
        for (int b = 0; b < Bc; ++b) std::memcpy(tmp.data() + b * H, dxp + b * N + 2 * H, sizeof(float) * H);
        gemm(tmp.data(), H, Bc, m.Rn, S2.data(), m.Rn.Npad);
        for (int b = 0; b < Bc; ++b) {
          if (mt[b] == 0.0f) continue;
          float* d = dxp + b * N;
          const float* r = act + b * A;
          const float* hb = hp + b * H;
          const float* drh = S2.data() + b * m.Rn.Npad;
          float* dir = direct.data() + b * H;
#pragma omp simd
          for (int j = 0; j < H; ++j) {
            d[j] = drh[j] * hb[j] * r[j] * (1.0f - r[j]);
            dir[j] += drh[j] * r[j];
          }
        }
        gemm(dxp, N, Bc, m.Ru, S.data(), Spad);  // the first 2H columns of each dxp row
        for (int b = 0; b < Bc; ++b) {
          float* dhb = dh.data() + b * H;
          const float* dir = direct.data() + b * H;
          const float* s = S.data() + b * Spad;
#pragma omp simd
          for (int j = 0; j < H; ++j) dhb[j] = dir[j] + s[j];
        }
      }
    } else if (c.family == MGU) {
      for (int b = 0; b < Bc; ++b) {
        float* d = dxp + b * N;
        float* dhb = dh.data() + b * H;
        float* dir = direct.data() + b * H;
        if (mt[b] == 0.0f) {
          std::fill(d, d + N, 0.0f);
          std::memcpy(dir, dhb, sizeof(float) * H);
          continue;
        }
        const float *f = act + b * A, *n = f + H;
        const float* hb = hp + b * H;
        float* dan = d + H;
        float* df = d;  // holds d f (before the sigmoid) until the second pass
#pragma omp simd
        for (int j = 0; j < H; ++j) {
          float g = dys[b * H + j] + dhb[j];
          dan[j] = g * f[j] * (1.0f - n[j] * n[j]);
          df[j] = g * (n[j] - hb[j]);
          dir[j] = g * (1.0f - f[j]);
        }
      }
      for (int b = 0; b < Bc; ++b) std::memcpy(tmp.data() + b * H, dxp + b * N + H, sizeof(float) * H);
      gemm(tmp.data(), H, Bc, m.Rn, S2.data(), m.Rn.Npad);  // d(f h) = dan @ R_n^T
      for (int b = 0; b < Bc; ++b) {
        if (mt[b] == 0.0f) continue;
        float* d = dxp + b * N;
        const float* f = act + b * A;
        const float* hb = hp + b * H;
        const float* dfh = S2.data() + b * m.Rn.Npad;
        float* dir = direct.data() + b * H;
#pragma omp simd
        for (int j = 0; j < H; ++j) {
          float g = d[j] + dfh[j] * hb[j];
          d[j] = g * f[j] * (1.0f - f[j]);
          dir[j] += dfh[j] * f[j];
        }
      }
      gemm(dxp, N, Bc, m.Ru, S.data(), Spad);  // daf @ R_f^T (the first H columns of each row)
      for (int b = 0; b < Bc; ++b) {
        float* dhb = dh.data() + b * H;
        const float* dir = direct.data() + b * H;
        const float* s = S.data() + b * Spad;
#pragma omp simd
        for (int j = 0; j < H; ++j) dhb[j] = dir[j] + s[j];
      }
    } else {  // RNN
      for (int b = 0; b < Bc; ++b) {
        float* d = dxp + b * N;
        if (mt[b] == 0.0f) {
          std::fill(d, d + N, 0.0f);
          continue;
        }
        const float* y = act + b * A;
        const float* dhb = dh.data() + b * H;
#pragma omp simd
        for (int j = 0; j < H; ++j) d[j] = (dys[b * H + j] + dhb[j]) * (1.0f - y[j] * y[j]);
      }
      gemm(dxp, N, Bc, m.R, S.data(), Spad);
      for (int b = 0; b < Bc; ++b) {
        if (mt[b] == 0.0f) continue;
        std::memcpy(dh.data() + b * H, S.data() + b * Spad, sizeof(float) * H);
      }
    }
  }
  std::memcpy(io.dh0 + b0 * H, dh.data(), sizeof(float) * Bc * H);
  if (lstm) std::memcpy(io.dc0 + b0 * H, dc.data(), sizeof(float) * Bc * H);
  if (fgr) std::memcpy(io.dg0 + b0 * G, dg.data(), sizeof(float) * Bc * G);
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer R, ffi::AnyBuffer Rg, ffi::AnyBuffer peep,
                         ffi::AnyBuffer mask, ffi::AnyBuffer ph, ffi::AnyBuffer pc, ffi::AnyBuffer pg,
                         ffi::AnyBuffer acts, ffi::AnyBuffer dys, ffi::AnyBuffer dhT, ffi::AnyBuffer dcT,
                         ffi::AnyBuffer dgT, int64_t family, int64_t flags, int64_t act_g, int64_t act_h,
                         int64_t hidden, ffi::Result<ffi::AnyBuffer> dxp, ffi::Result<ffi::AnyBuffer> dh0,
                         ffi::Result<ffi::AnyBuffer> dc0, ffi::Result<ffi::AnyBuffer> dg0,
                         ffi::Result<ffi::AnyBuffer> dpeep) {
  auto d = dys.dimensions();
  if (d.size() < 3) return ffi::Error::InvalidArgument("lstm_lab native: dys must be [..., T, B, H]");
  const int T = static_cast<int>(d[d.size() - 3]), B = static_cast<int>(d[d.size() - 2]);
  const Cell c = make_cell(family, flags, act_g, act_h, static_cast<int>(hidden));
  const int64_t P = leading(dys, 3);
  const int H = c.H, G = c.G;
  const bool lstm = family == LSTM, fgr = c.has(FGR);
  std::vector<Mats> mats(P);
  pack_in_parallel(pool, c, R.typed_data<float>(), Rg.typed_data<float>(), P, true, mats);
  const int nb = batch_chunks(P, B, usable_threads(pool));
  std::vector<float> dp(static_cast<size_t>(P) * nb * 3 * H, 0.0f);
  const size_t TB = static_cast<size_t>(T) * B;
  parallel_for(pool, static_cast<int>(P * nb), [&](int item) {
    const int64_t p = item / nb;
    const int q = item % nb, b0 = q * B / nb, b1 = (q + 1) * B / nb;
    BwdIO io{mask.typed_data<float>() + p * TB,
             peep.typed_data<float>() + p * 3 * H,
             ph.typed_data<float>() + p * TB * H,
             pc.typed_data<float>() + (lstm ? p * TB * H : 0),
             pg.typed_data<float>() + (fgr ? p * TB * G : 0),
             acts.typed_data<float>() + p * TB * c.A,
             dys.typed_data<float>() + p * TB * H,
             dhT.typed_data<float>() + p * B * H,
             dcT.typed_data<float>() + (lstm ? p * B * H : 0),
             dgT.typed_data<float>() + (fgr ? p * B * G : 0),
             dxp->typed_data<float>() + p * TB * c.N,
             dh0->typed_data<float>() + p * B * H,
             dc0->typed_data<float>() + (lstm ? p * B * H : 0),
             dg0->typed_data<float>() + (fgr ? p * B * G : 0),
             dp.data() + static_cast<size_t>(item) * 3 * H};
    backward_chunk(c, mats[p], io, T, B, b0, b1);
  });
  float* out = dpeep->typed_data<float>();
  for (int64_t p = 0; p < P; ++p) {
    float* o = out + p * 3 * H;
    std::fill(o, o + 3 * H, 0.0f);
    for (int q = 0; q < nb; ++q) {
      const float* s = dp.data() + static_cast<size_t>(p * nb + q) * 3 * H;
      for (int j = 0; j < 3 * H; ++j) o[j] += s[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmLabNativeForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // xp
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // R
                                  .Arg<ffi::AnyBuffer>()  // R_gates
                                  .Arg<ffi::AnyBuffer>()  // peepholes [3, H]
                                  .Arg<ffi::AnyBuffer>()  // b_hn
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // c0
                                  .Arg<ffi::AnyBuffer>()  // gates0
                                  .Attr<int64_t>("family")
                                  .Attr<int64_t>("flags")
                                  .Attr<int64_t>("act_g")
                                  .Attr<int64_t>("act_h")
                                  .Attr<int64_t>("hidden")
                                  .Ret<ffi::AnyBuffer>()  // ys
                                  .Ret<ffi::AnyBuffer>()  // hT
                                  .Ret<ffi::AnyBuffer>()  // cT
                                  .Ret<ffi::AnyBuffer>()  // gatesT
                                  .Ret<ffi::AnyBuffer>()  // previous h per step
                                  .Ret<ffi::AnyBuffer>()  // previous c per step
                                  .Ret<ffi::AnyBuffer>()  // previous gates per step
                                  .Ret<ffi::AnyBuffer>()  // activations per step
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmLabNativeBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // R
                                  .Arg<ffi::AnyBuffer>()  // R_gates
                                  .Arg<ffi::AnyBuffer>()  // peepholes
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Arg<ffi::AnyBuffer>()  // previous h
                                  .Arg<ffi::AnyBuffer>()  // previous c
                                  .Arg<ffi::AnyBuffer>()  // previous gates
                                  .Arg<ffi::AnyBuffer>()  // activations
                                  .Arg<ffi::AnyBuffer>()  // dys
                                  .Arg<ffi::AnyBuffer>()  // dhT
                                  .Arg<ffi::AnyBuffer>()  // dcT
                                  .Arg<ffi::AnyBuffer>()  // dgatesT
                                  .Attr<int64_t>("family")
                                  .Attr<int64_t>("flags")
                                  .Attr<int64_t>("act_g")
                                  .Attr<int64_t>("act_h")
                                  .Attr<int64_t>("hidden")
                                  .Ret<ffi::AnyBuffer>()  // dxp
                                  .Ret<ffi::AnyBuffer>()  // dh0
                                  .Ret<ffi::AnyBuffer>()  // dc0
                                  .Ret<ffi::AnyBuffer>()  // dgates0
                                  .Ret<ffi::AnyBuffer>()  // dpeep [3, H]
);
