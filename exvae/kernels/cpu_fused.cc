// Fused CPU forward of the exemplar-prior log-sum of Gaussian kernels (XLA FFI).
//
// Computes, for every query row b,
//   lse0[b] = log sum_{n valid for b} exp(a[b, n]),
//   a[b, n] = zq[b] . (mu_n - c) + qbias[b] + scale_sq * |mu_n - c|^2
// i.e. the exponent -|z_b - mu_n|^2 / (2 s2) in the same augmented-matmul form as
// the XLA path (exvae/kernels/exemplar_lse.py): zq = (z - c) / s2,
// qbias = -|z - c|^2 / (2 s2), scale_sq = -1 / (2 s2), c = the query median. The
// (B, N) exponent matrix never leaves registers / L1.
//
// Blocking (AVX-512 path):
//  * Micro-kernel: kMR = 12 queries x kNR = 32 exemplars (two zmm per query) held
//    in 24 accumulators; per k one 2-vector load of the bank panel and 12 broadcast
//    FMAs. The bank bias and query bias are added after the k loop (small partial
//    sums, matmul-like rounding), giving the exponents a.
//  * Bank panel: 32 exemplars, centred, transposed to [k][32] (two masked gathers
//    per k) plus the bias scale_sq * |mu - c|^2 (-inf for masked / padding rows)
//    and the ids: ~5 KB. Panels are packed kChunkPanels at a time (2048 exemplars,
//    ~340 KB: L2) into a buffer shared by all threads; each thread then takes query
//    items (<= kItemBlocks micro-blocks, ~15 KB of packed queries) and runs every
//    panel of the chunk past all micro-blocks of its item, so a panel is loaded
//    from L2 once per item and reused from L1 by up to 8 micro-tiles.
//  * Epilogue per micro-tile (from an L1 tile buffer): optional leave-one-out
//    masking (bank id == query id -> -inf; the dropped valid exemplars are counted
//    for the caller's per-row count), then exp(a - m_ref) accumulated into a
//    16-lane float partial sum per row, flushed into a double once per chunk.
//
// Online log-sum-exp without a per-tile max pass: each row keeps a reference
// m_ref (<= its largest exponent so far) and a threshold thr = min(m_ref + kMargin,
// max(m_track, 0)). Terms are summed as exp(a - m_ref), which is safe while
// a <= m_ref + kMargin (e^kMargin * N stays far below FLT_MAX). One vector compare
// per accumulator detects a > thr; only then (the first tile of a row, a new
// maximum far above m_ref, or a positive exponent) a scalar slow path raises m_ref
// to the micro-tile's max and rescales the row's sums. m_track is the largest
// exponent seen on a slow path; since any a > max(m_track, 0) takes the slow path,
// max(true max, 0) = max(m_track, 0) at the end, which reproduces the XLA path's
// per-row clamp: lse0 = min(M, 0) + log sum exp(a - M) = m_ref + log(s) - max(M, 0).
// Rows with no valid exemplar keep m_ref = -inf and return -inf (never NaN).
//
// Threads: std::thread per call (EXVAE_FUSED_THREADS or the affinity count). Many
// queries: threads pack chunk panels cooperatively (double-buffered, one spin
// barrier per chunk) and pull query items from a per-chunk atomic counter, so a
// core slowed by other load simply takes fewer items. Few queries (B < 4 * kMR *
// threads): each thread takes a bank range with its own packing instead, and the
// per-row (m_ref, s, m_track) partials are merged at the end. Scratch is
// O(threads * chunk + B * d): independent of N.
//
// A second handler computes the coordinate-wise median (the centre c) in O(B d).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include <sched.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMR = 12;          // queries per micro-kernel
constexpr int kNR = 32;          // exemplars per panel (two zmm)
constexpr int kQM = 1020;        // queries per macro-block (multiple of kMR)
constexpr int kFlush = 64;       // panels between float -> double flushes of the sums
constexpr float kMargin = 40.f;  // allowed a - m_ref before a rescale
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  const float* zq;        // (B, d)
  const float* qbias;     // (B,)
  const float* bank;      // (N, d)
  const float* center;    // (d,)
  float scale_sq;
  const bool* mask;       // (N,) or nullptr
  const int32_t* bids;    // (N,) or nullptr (leave-one-out off)
  const int32_t* qids;    // (B,) or nullptr
  int64_t B, N, d;
};

// Per-row online LSE state of one (query range, bank range) work item.
struct RowState {
  float m_ref = kNegInf;
  float m_track = kNegInf;
  float thr = kNegInf;
  double s = 0.0;
  int64_t removed = 0;  // valid exemplars dropped by leave-one-out (for the count)
};

inline float threshold(const RowState& r) {
  return std::min(r.m_ref + kMargin, std::max(r.m_track, 0.f));
}

// Slow path: the row's micro-tile max is `tmax` (may be -inf). Raises m_ref and
// rescales the row's double sum and float partial lanes.
inline void raise_ref(RowState& r, float tmax, float* lanes) {
  r.m_track = std::max(r.m_track, tmax);
  if (tmax > r.m_ref) {
    if (r.m_ref > kNegInf) {
      const float f = std::exp(r.m_ref - tmax);
      r.s *= f;
      for (int l = 0; l < 16; ++l) lanes[l] *= f;
    }
    r.m_ref = tmax;
  }
  r.thr = threshold(r);
}

// Per-exemplar bias, ids and validity of one panel (scalar: 32 entries).
inline void panel_meta(const Problem& p, int64_t n0, int64_t n1, const float* sq,
                       float* bias, int32_t* ids) {
  for (int j = 0; j < kNR; ++j) {
    const int64_t n = n0 + j;
    const bool valid = n < n1 && (p.mask == nullptr || p.mask[n]);
    bias[j] = valid ? p.scale_sq * sq[j] : kNegInf;
    ids[j] = (n < n1 && p.bids) ? p.bids[n] : 0;
  }
}

#if defined(__AVX512F__)

// Packs one bank panel [n0, n0 + kNR) ∩ [n0, n1): centred, transposed [k][kNR], the
// bias scale_sq * |mu - c|^2 (-inf when masked or past n1) and the ids. The
// transpose is two masked gathers per k (rows past n1 read nothing and give 0).
void pack_panel(const Problem& p, int64_t n0, int64_t n1, float* bp, float* bias,
                int32_t* ids) {
  const int64_t d = p.d;
  const float* base = p.bank + n0 * d;
  alignas(64) float sq[kNR];
  for (int h = 0; h < kNR / 16; ++h) {
    const int64_t rows = std::clamp<int64_t>(n1 - n0 - 16 * h, 0, 16);
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1u);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_add_epi32(_mm512_set1_epi32(16 * h),
                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                           14, 15)),
        _mm512_set1_epi32(static_cast<int>(d)));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; ++k) {
      const __m512 mu = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, base + k, 4);
      const __m512 v = _mm512_maskz_sub_ps(live, mu, _mm512_set1_ps(p.center[k]));
      _mm512_storeu_ps(bp + k * kNR + 16 * h, v);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    _mm512_store_ps(sq + 16 * h, acc);
  }
  panel_meta(p, n0, n1, sq, bias, ids);
}

#else

void pack_panel(const Problem& p, int64_t n0, int64_t n1, float* bp, float* bias,
                int32_t* ids) {
  const int64_t d = p.d;
  float sq[kNR];
  for (int j = 0; j < kNR; ++j) {
    const int64_t n = n0 + j;
    sq[j] = 0.f;
    for (int64_t k = 0; k < d; ++k) {
      const float v = n < n1 ? p.bank[n * d + k] - p.center[k] : 0.f;
      bp[k * kNR + j] = v;
      sq[j] += v * v;
    }
  }
  panel_meta(p, n0, n1, sq, bias, ids);
}

#endif

#if defined(__AVX512F__)

// exp(x) for x <= ~88: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-5
// polynomial (relative error ~1.2e-7), scalef by 2^n. x is clamped below at -100
// so that -inf gives 0 instead of NaN (2^-145 underflows to 0 under FTZ).
inline __m512 exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 q = _mm512_set1_ps(0.008333842270076275f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.04189859703183174f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.1666688621044159f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.49999141693115234f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(q, n);
}

// Epilogue of one micro-tile (kept out of line so that the exp constants do not
// take registers from the accumulators): LOO masking, threshold test, slow path,
// and exp(a - m_ref) accumulated into the row's 16 float lanes.
template <bool kLoo>
__attribute__((noinline)) void epilogue(const float* __restrict tile,
                                        const int32_t* __restrict qid,
                                        const int32_t* __restrict ids,
                                        RowState* __restrict st, float* __restrict lanes) {
  __m512i id0, id1;
  if (kLoo) {
    id0 = _mm512_loadu_si512(ids);
    id1 = _mm512_loadu_si512(ids + 16);
  }
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int r = 0; r < kMR; ++r) {
    __m512 a0 = _mm512_load_ps(tile + r * kNR), a1 = _mm512_load_ps(tile + r * kNR + 16);
    RowState& s = st[r];
    if (kLoo && qid[r] >= 0) {
      // Valid lanes are exactly the finite ones (invalid ones carry a -inf bias).
      const __m512i q = _mm512_set1_epi32(qid[r]);
      const __mmask16 e0 = _mm512_cmpeq_epi32_mask(id0, q);
      const __mmask16 e1 = _mm512_cmpeq_epi32_mask(id1, q);
      s.removed += __builtin_popcount(
          static_cast<unsigned>(e0 & _mm512_cmp_ps_mask(a0, ninf, _CMP_GT_OQ)) |
          (static_cast<unsigned>(e1 & _mm512_cmp_ps_mask(a1, ninf, _CMP_GT_OQ)) << 16));
      a0 = _mm512_mask_mov_ps(a0, e0, ninf);
      a1 = _mm512_mask_mov_ps(a1, e1, ninf);
    }
    float* ln = lanes + 16 * r;
    const __m512 thr = _mm512_set1_ps(s.thr);
    const __mmask16 hi = _mm512_cmp_ps_mask(a0, thr, _CMP_GT_OQ) |
                         _mm512_cmp_ps_mask(a1, thr, _CMP_GT_OQ);
    if (hi) raise_ref(s, _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)), ln);
    if (s.m_ref == kNegInf) continue;  // nothing valid yet: every a here is -inf
    const __m512 m = _mm512_set1_ps(s.m_ref);
    const __m512 e = _mm512_add_ps(exp512(_mm512_sub_ps(a0, m)),
                                   exp512(_mm512_sub_ps(a1, m)));
    _mm512_storeu_ps(ln, _mm512_add_ps(_mm512_loadu_ps(ln), e));
  }
}


// One micro-tile: kMR packed queries (qp [d][kMR], qb biases, qid ids) against one
// packed panel; updates the rows' states and float partial lanes (16 per row).
template <bool kLoo>
inline void micro_tile(const float* __restrict qp, const float* __restrict qb,
                       const int32_t* __restrict qid, const float* __restrict bp,
                       const float* __restrict bias, const int32_t* __restrict ids,
                       int64_t d, RowState* __restrict st, float* __restrict lanes) {
  // Accumulate in registers (fully unrolled over rows so GCC keeps all 24 in
  // zmm registers), then hand the tile to the epilogue through an L1 buffer.
  // The cross term is summed from zero and the two biases are added last: partial
  // sums then stay small, like in a matmul, instead of carrying the large
  // |z|^2 + |mu|^2 offset through all d roundings (halves the float32 error).
  __m512 acc[kMR][2];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < d; ++k) {
    const __m512 v0 = _mm512_loadu_ps(bp + k * kNR);
    const __m512 v1 = _mm512_loadu_ps(bp + k * kNR + 16);
    const float* qk = qp + k * kMR;
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const __m512 q = _mm512_set1_ps(qk[r]);
      acc[r][0] = _mm512_fmadd_ps(q, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(q, v1, acc[r][1]);
    }
  }
  alignas(64) float tile[kMR][kNR];
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    const __m512 q = _mm512_set1_ps(qb[r]);
    _mm512_store_ps(tile[r], _mm512_add_ps(acc[r][0], _mm512_add_ps(b0, q)));
    _mm512_store_ps(tile[r] + 16, _mm512_add_ps(acc[r][1], _mm512_add_ps(b1, q)));
  }
  epilogue<kLoo>(&tile[0][0], qid, ids, st, lanes);
}

#else  // portable fallback (correct, not tuned)

template <bool kLoo>
inline void micro_tile(const float* qp, const float* qb, const int32_t* qid,
                       const float* bp, const float* bias, const int32_t* ids,
                       int64_t d, RowState* st, float* lanes) {
  for (int r = 0; r < kMR; ++r) {
    float a[kNR] = {};
    for (int64_t k = 0; k < d; ++k)
      for (int j = 0; j < kNR; ++j) a[j] += qp[k * kMR + r] * bp[k * kNR + j];
    for (int j = 0; j < kNR; ++j) a[j] += bias[j] + qb[r];
    RowState& s = st[r];
    float tmax = kNegInf;
    for (int j = 0; j < kNR; ++j) {
      if (kLoo && qid[r] >= 0 && ids[j] == qid[r]) {
        s.removed += a[j] > kNegInf;
        a[j] = kNegInf;
      }
      tmax = std::max(tmax, a[j]);
    }
    float* ln = lanes + 16 * r;
    if (tmax > s.thr) raise_ref(s, tmax, ln);
    if (s.m_ref == kNegInf) continue;
    for (int j = 0; j < kNR; ++j) ln[j % 16] += std::exp(a[j] - s.m_ref);
  }
}

#endif

// Flushes the float partial lanes of `rows` rows into their double sums.
inline void flush(RowState* st, float* lanes, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    double t = 0.0;
    for (int l = 0; l < 16; ++l) t += lanes[16 * r + l];
    st[r].s += t;
    std::memset(lanes + 16 * r, 0, 16 * sizeof(float));
  }
}

// Flush-to-zero / denormals-are-zero for the exp underflow tail, restored on exit.
struct FtzGuard {
#if defined(__x86_64__)
  unsigned int saved;
  FtzGuard() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FtzGuard() { _mm_setcsr(saved); }
#endif
};

// Sense-reversing spin barrier (yields while waiting: the CPU may be shared).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spin = 0; gen_.load(std::memory_order_acquire) == gen; ++spin) {
      if (spin > 64) std::this_thread::yield();
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// Many queries: all T threads share each packed bank chunk (kChunkPanels panels,
// packed cooperatively, double-buffered so one barrier per chunk suffices) and
// pull query items (kItemBlocks micro-blocks) from a per-chunk atomic counter, so a
// thread slowed by other load on its core just takes fewer items.
constexpr int kChunkPanels = 64;  // == kFlush: the float lanes are flushed per chunk
constexpr int kItemBlocks = 8;  // at most; fewer when B is small (load balance)

template <bool kLoo>
void run_shared(const Problem& p, int T, RowState* out) {
  const int64_t d = p.d, B = p.B, N = p.N;
  const int64_t nmb = (B + kMR - 1) / kMR;
  const int64_t bpad = nmb * kMR;
  // Enough items per thread to balance (>= 4), each sharing a panel across up to
  // kItemBlocks micro-blocks (panel reuse from L1).
  const int64_t item_blocks = std::clamp<int64_t>(nmb / (4 * T), 1, kItemBlocks);
  const int64_t items = (nmb + item_blocks - 1) / item_blocks;
  const int64_t panels = (N + kNR - 1) / kNR;
  const int64_t nchunks = (panels + kChunkPanels - 1) / kChunkPanels;
  const int64_t panel_floats = kNR * d;
  std::vector<float> qbuf(bpad * d), qbb(bpad), lanes(bpad * 16, 0.f);
  std::vector<int32_t> qidb(bpad);
  std::vector<RowState> st(bpad);
  std::vector<float> cbuf[2], cbias[2];
  std::vector<int32_t> cids[2];
  for (int i = 0; i < 2; ++i) {
    cbuf[i].resize(kChunkPanels * panel_floats);
    cbias[i].resize(kChunkPanels * kNR);
    cids[i].resize(kChunkPanels * kNR);
  }
  std::vector<std::atomic<int64_t>> next(nchunks);
  for (auto& a : next) a.store(0, std::memory_order_relaxed);
  SpinBarrier barrier(T);

  auto body = [&](int t) {
    // Pack this thread's share of the query micro-blocks as [k][kMR].
    for (int64_t mb = t; mb < nmb; mb += T) {
      float* dst = qbuf.data() + mb * kMR * d;
      for (int r = 0; r < kMR; ++r) {
        const int64_t row = mb * kMR + r;
        const bool real = row < B;
        const float* src = p.zq + row * d;
        for (int64_t k = 0; k < d; ++k) dst[k * kMR + r] = real ? src[k] : 0.f;
        qbb[row] = real ? p.qbias[row] : 0.f;
        qidb[row] = (real && p.qids) ? p.qids[row] : -1;
      }
    }
    for (int64_t c = 0; c < nchunks; ++c) {
      const int buf = static_cast<int>(c & 1);
      const int64_t p0 = c * kChunkPanels;
      const int64_t np = std::min<int64_t>(kChunkPanels, panels - p0);
      for (int64_t j = t; j < np; j += T) {
        pack_panel(p, (p0 + j) * kNR, N, cbuf[buf].data() + j * panel_floats,
                   cbias[buf].data() + j * kNR, cids[buf].data() + j * kNR);
      }
      barrier.wait();  // chunk c packed; chunk c-1's reads of this buffer are done
      for (int64_t it; (it = next[c].fetch_add(1, std::memory_order_relaxed)) < items;) {
        const int64_t mb0 = it * item_blocks;
        const int64_t mb1 = std::min<int64_t>(nmb, mb0 + item_blocks);
        for (int64_t j = 0; j < np; ++j) {
          const float* bp = cbuf[buf].data() + j * panel_floats;
          const float* bias = cbias[buf].data() + j * kNR;
          const int32_t* ids = cids[buf].data() + j * kNR;
          for (int64_t mb = mb0; mb < mb1; ++mb) {
            micro_tile<kLoo>(qbuf.data() + mb * kMR * d, qbb.data() + mb * kMR,
                             qidb.data() + mb * kMR, bp, bias, ids, d,
                             st.data() + mb * kMR, lanes.data() + mb * kMR * 16);
          }
        }
        flush(st.data() + mb0 * kMR, lanes.data() + mb0 * kMR * 16, (mb1 - mb0) * kMR);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < T; ++t) pool.emplace_back([&body, t] {
    FtzGuard g;
    body(t);
  });
  {
    FtzGuard g;
    body(0);
  }
  for (auto& th : pool) th.join();
  std::copy(st.begin(), st.begin() + B, out);
}

// Processes queries [q0, q1) against bank rows [n0, n1); writes final states.
template <bool kLoo>
void run_range(const Problem& p, int64_t q0, int64_t q1, int64_t n0, int64_t n1,
               RowState* out) {
  const int64_t d = p.d;
  const int64_t qm_max = std::min<int64_t>(kQM, ((q1 - q0 + kMR - 1) / kMR) * kMR);
  std::vector<float> qbuf(qm_max * d + 64), qbb(qm_max), lanes(qm_max * 16);
  std::vector<int32_t> qidb(qm_max);
  std::vector<RowState> st(qm_max);
  alignas(64) float bp_store[kNR * 64];
  std::vector<float> bp_heap;
  float* bp = bp_store;
  if (d > 64) {
    bp_heap.resize(kNR * d);
    bp = bp_heap.data();
  }
  alignas(64) float bias[kNR];
  alignas(64) int32_t ids[kNR];

  for (int64_t qa = q0; qa < q1; qa += kQM) {
    const int64_t rows = std::min<int64_t>(kQM, q1 - qa);
    const int64_t nmb = (rows + kMR - 1) / kMR;
    // Pack queries per micro-block as [k][kMR]; padding rows are zero queries.
    for (int64_t mb = 0; mb < nmb; ++mb) {
      float* dst = qbuf.data() + mb * kMR * d;
      for (int r = 0; r < kMR; ++r) {
        const int64_t row = mb * kMR + r;
        const bool real = row < rows;
        const float* src = p.zq + (qa + row) * d;
        for (int64_t k = 0; k < d; ++k) dst[k * kMR + r] = real ? src[k] : 0.f;
        qbb[row] = real ? p.qbias[qa + row] : 0.f;
        qidb[row] = (real && p.qids) ? p.qids[qa + row] : -1;
      }
    }
    std::fill(st.begin(), st.end(), RowState());
    std::fill(lanes.begin(), lanes.end(), 0.f);
    int64_t since_flush = 0;
    for (int64_t nb = n0; nb < n1; nb += kNR) {
      pack_panel(p, nb, n1, bp, bias, ids);
      for (int64_t mb = 0; mb < nmb; ++mb) {
        micro_tile<kLoo>(qbuf.data() + mb * kMR * d, qbb.data() + mb * kMR,
                         qidb.data() + mb * kMR, bp, bias, ids, d, st.data() + mb * kMR,
                         lanes.data() + mb * kMR * 16);
      }
      if (++since_flush == kFlush) {
        flush(st.data(), lanes.data(), nmb * kMR);
        since_flush = 0;
      }
    }
    flush(st.data(), lanes.data(), nmb * kMR);
    std::copy(st.begin(), st.begin() + rows, out + (qa - q0));
  }
}

int num_threads() {
  if (const char* e = std::getenv("EXVAE_FUSED_THREADS")) {
    const int t = std::atoi(e);
    if (t > 0) return t;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

template <bool kLoo>
void run(const Problem& p, float* lse0, int32_t* removed) {
  const int64_t B = p.B, N = p.N;
  int T = num_threads();
  // Tiny problems: threads cost more than they save.
  if (B * N * p.d < (int64_t{1} << 20)) T = 1;
  std::vector<RowState> res;
  int splits = 1;  // number of bank ranges whose partial states get merged
  std::vector<std::thread> pool;
  auto worker = [&](auto fn) {
    for (int t = 1; t < T; ++t) pool.emplace_back([fn, t] { FtzGuard g; fn(t); });
    {
      FtzGuard g;
      fn(0);
    }
    for (auto& th : pool) th.join();
  };
  if (T == 1 || B >= int64_t{4} * kMR * T) {
    res.resize(B);
    run_shared<kLoo>(p, T, res.data());
  } else {
    splits = T;
    res.resize(B * T);
    const int64_t panels = (N + kNR - 1) / kNR;
    worker([&](int t) {
      const int64_t n0 = std::min(N, panels * t / T * kNR);
      const int64_t n1 = std::min(N, panels * (t + 1) / T * kNR);
      RowState* o = res.data() + B * t;
      if (n1 > n0) {
        run_range<kLoo>(p, 0, B, n0, n1, o);
      } else {
        std::fill(o, o + B, RowState());
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    float m = kNegInf, mt = kNegInf;
    int64_t rm = 0;
    for (int t = 0; t < splits; ++t) {
      m = std::max(m, res[B * t + b].m_ref);
      mt = std::max(mt, res[B * t + b].m_track);
      rm += res[B * t + b].removed;
    }
    removed[b] = static_cast<int32_t>(rm);
    double s = 0.0;
    if (m > kNegInf) {
      for (int t = 0; t < splits; ++t) {
        const RowState& r = res[B * t + b];
        if (r.m_ref > kNegInf) s += r.s * std::exp(static_cast<double>(r.m_ref) - m);
      }
    }
    lse0[b] = (m > kNegInf && s > 0.0)
                  ? static_cast<float>(m + std::log(s) - std::max(mt, 0.f))
                  : kNegInf;
  }
}

ffi::Error LseImpl(ffi::Buffer<ffi::F32> zq, ffi::Buffer<ffi::F32> qbias,
                   ffi::Buffer<ffi::F32> bank, ffi::Buffer<ffi::F32> center,
                   ffi::Buffer<ffi::F32> scale_sq, ffi::Buffer<ffi::PRED> mask,
                   ffi::Buffer<ffi::S32> bank_ids, ffi::Buffer<ffi::S32> query_ids,
                   int64_t use_mask, int64_t use_loo, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::S32> removed) {
  const auto zd = zq.dimensions();
  const auto bd = bank.dimensions();
  if (zd.size() != 2 || bd.size() != 2 || zd[1] != bd[1])
    return ffi::Error::InvalidArgument("exvae_lse: zq (B, d) and bank (N, d) expected");
  Problem p;
  p.B = zd[0];
  p.N = bd[0];
  p.d = zd[1];
  if (qbias.element_count() != static_cast<size_t>(p.B) ||
      center.element_count() != static_cast<size_t>(p.d) ||
      out->element_count() != static_cast<size_t>(p.B) ||
      removed->element_count() != static_cast<size_t>(p.B))
    return ffi::Error::InvalidArgument("exvae_lse: inconsistent qbias/center/out shapes");
  if (use_mask && mask.element_count() != static_cast<size_t>(p.N))
    return ffi::Error::InvalidArgument("exvae_lse: mask must be (N,)");
  if (use_loo && (bank_ids.element_count() != static_cast<size_t>(p.N) ||
                  query_ids.element_count() != static_cast<size_t>(p.B)))
    return ffi::Error::InvalidArgument("exvae_lse: bank_ids (N,) and query_ids (B,)");
  p.zq = zq.typed_data();
  p.qbias = qbias.typed_data();
  p.bank = bank.typed_data();
  p.center = center.typed_data();
  p.scale_sq = scale_sq.typed_data()[0];
  p.mask = use_mask ? mask.typed_data() : nullptr;
  p.bids = use_loo ? bank_ids.typed_data() : nullptr;
  p.qids = use_loo ? query_ids.typed_data() : nullptr;
  float* o = out->typed_data();
  int32_t* rm = removed->typed_data();
  if (p.B == 0) return ffi::Error::Success();
  if (p.N == 0) {
    std::fill(o, o + p.B, kNegInf);
    std::fill(rm, rm + p.B, 0);
    return ffi::Error::Success();
  }
  if (use_loo) {
    run<true>(p, o, rm);
  } else {
    run<false>(p, o, rm);
  }
  return ffi::Error::Success();
}

// Coordinate-wise median of z (B, d) (mean of the two middle values for even B),
// by nth_element per column: O(B d), where XLA:CPU's sort-based jnp.median costs
// ~30 ms at B = 5000, d = 40, a quarter of the whole fused forward.
ffi::Error MedianImpl(ffi::Buffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> out) {
  const auto zd = z.dimensions();
  if (zd.size() != 2 || out->element_count() != static_cast<size_t>(zd[1]))
    return ffi::Error::InvalidArgument("exvae_median: z (B, d) -> (d,) expected");
  const int64_t B = zd[0], d = zd[1];
  const float* src = z.typed_data();
  float* o = out->typed_data();
  if (B == 0) {
    std::fill(o, o + d, std::numeric_limits<float>::quiet_NaN());
    return ffi::Error::Success();
  }
  std::vector<float> col(B);
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t b = 0; b < B; ++b) col[b] = src[b * d + k];
    const int64_t lo = (B - 1) / 2, hi = B / 2;
    std::nth_element(col.begin(), col.begin() + lo, col.end());
    const float vlo = col[lo];
    const float vhi = hi == lo ? vlo : *std::min_element(col.begin() + hi, col.end());
    o[k] = vlo + 0.5f * (vhi - vlo);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ExvaeFusedLse, LseImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // zq (B, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qbias (B,)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bank (N, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // center (d,)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale_sq ()
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (N,) or (1,)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // bank_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // query_ids
                                  .Attr<int64_t>("use_mask")
                                  .Attr<int64_t>("use_loo")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse0 (B,)
                                  .Ret<ffi::Buffer<ffi::S32>>());  // LOO-removed (B,)

XLA_FFI_DEFINE_HANDLER_SYMBOL(ExvaeColumnMedian, MedianImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // z (B, d)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // median (d,)

extern "C" int exvae_fused_vectorized() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}
