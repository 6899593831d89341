// CPU backend, part 3: causal self-attention, forward and backward, with the semantics of core/backend.h.
// q, k, v, out [B, T, H, Dh] (row stride H*Dh, each head's row of Dh contiguous); lse f32 [B, H, T].
//
// No T x T matrix is formed. A head's rows are H*Dh floats apart, often a power-of-two stride that maps them onto
// few cache sets, so each task first packs the keys and values it needs into contiguous per-thread tiles (K
// transposed, so scores vectorise along keys without horizontal sums), padded with zeros to whole register tiles.
// Work then goes in blocks of kKeyBlock keys that stay in L2 while the query rows that see them pass over them,
// kRows query rows at a time, through three register-blocked micro-kernels (GCC vector extensions, compiled per
// ISA level).
//   forward:  tasks are (b, h, block of rows), longest rows first; rows are independent. Each task packs the keys
//             its rows see, so heads are split into only as many blocks as it takes to keep the threads busy.
//             Scores of kRowBlock rows at a time are kept (the per-thread row scratch), so the softmax is exact
//             with no running rescale.
//   backward: tasks are (b, h), key block by key block as in FlashAttention-2; the task owns its head's dq, dk and
//             dv rows, so there are no races and the result does not depend on the thread count. Probabilities
//             are recomputed as p = exp(s - lse); then dv[u] += p dout[t]; ds = p (dout[t].v[u] - dout[t].out[t]);
//             dq[t] += scale ds k[u]; dk[u] += scale ds q[t].
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <utility>

#include "core/cpu/cpu_internal.h"

namespace loom::cpu {
namespace {

// 16 floats; GCC lowers it to whatever registers the clone's ISA has (one zmm, two ymm, four xmm).
using V16 = float __attribute__((vector_size(64)));
constexpr int64_t kRows = 4;   // query rows per micro-kernel call
constexpr int64_t kTile = 32;  // keys (or head-dim elements) per register tile: two V16 per row
// Keys per block: a block's tiles (Dh x kKeyBlock of k and of v, and in the backward its dk and dv) stay in L2
// while all the row groups that see it pass over them.
constexpr int64_t kKeyBlock = 128;
constexpr int64_t kRowBlock = 64;  // forward: rows whose scores are kept at once (kRowBlock x T per thread)

// References, not values: passing vector types by value changes the ABI between clones.
LOOM_CPU_INLINE void vload(V16& v, const float* p) {
  std::memcpy(&v, p, sizeof v);
}
LOOM_CPU_INLINE void vstore(float* p, const V16& v) {
  std::memcpy(p, &v, sizeof v);
}

int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// s[r][u] = scale * sum_{d < dim} x[r][d] kt[d][u] for r < kRows, u < n (a multiple of kTile).
LOOM_CPU_INLINE void tile_scores(float* s, int64_t lds, const float* x, int64_t ldx, const float* kt, int64_t ldk,
                                 int64_t dim, int64_t n, float scale) {
  for (int64_t u0 = 0; u0 < n; u0 += kTile) {
    V16 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    const float* kp = kt + u0;
    for (int64_t d = 0; d < dim; ++d, kp += ldk) {
      V16 k0, k1;
      vload(k0, kp);
      vload(k1, kp + 16);
      const float x0 = x[d], x1 = x[ldx + d], x2 = x[2 * ldx + d], x3 = x[3 * ldx + d];
      a00 += x0 * k0;
      a01 += x0 * k1;
      a10 += x1 * k0;
      a11 += x1 * k1;
      a20 += x2 * k0;
      a21 += x2 * k1;
      a30 += x3 * k0;
      a31 += x3 * k1;
    }
    vstore(s + u0, a00 * scale);
    vstore(s + u0 + 16, a01 * scale);
    vstore(s + lds + u0, a10 * scale);
    vstore(s + lds + u0 + 16, a11 * scale);
    vstore(s + 2 * lds + u0, a20 * scale);
    vstore(s + 2 * lds + u0 + 16, a21 * scale);
    vstore(s + 3 * lds + u0, a30 * scale);
    vstore(s + 3 * lds + u0 + 16, a31 * scale);
  }
}

// out[r][d] (+)= sum_{u < n} p[r][u] m[u][d] for r < kRows, d < dim (a multiple of kTile).
LOOM_CPU_INLINE void tile_weighted_sum(float* out, int64_t ldo, bool accumulate, const float* p, int64_t ldp,
                                       const float* m, int64_t ldm, int64_t n, int64_t dim) {
  for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
    V16 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    if (accumulate) {
      vload(a00, out + d0);
      vload(a01, out + d0 + 16);
      vload(a10, out + ldo + d0);
      vload(a11, out + ldo + d0 + 16);
      vload(a20, out + 2 * ldo + d0);
      vload(a21, out + 2 * ldo + d0 + 16);
      vload(a30, out + 3 * ldo + d0);
      vload(a31, out + 3 * ldo + d0 + 16);
    }
    const float* mp = m + d0;
    for (int64_t u = 0; u < n; ++u, mp += ldm) {
      V16 m0, m1;
      vload(m0, mp);
      vload(m1, mp + 16);
      const float p0 = p[u], p1 = p[ldp + u], p2 = p[2 * ldp + u], p3 = p[3 * ldp + u];
      a00 += p0 * m0;
      a01 += p0 * m1;
      a10 += p1 * m0;
      a11 += p1 * m1;
      a20 += p2 * m0;
      a21 += p2 * m1;
      a30 += p3 * m0;
      a31 += p3 * m1;
    }
    vstore(out + d0, a00);
    vstore(out + d0 + 16, a01);
    vstore(out + ldo + d0, a10);
    vstore(out + ldo + d0 + 16, a11);
    vstore(out + 2 * ldo + d0, a20);
    vstore(out + 2 * ldo + d0 + 16, a21);
    vstore(out + 3 * ldo + d0, a30);
    vstore(out + 3 * ldo + d0 + 16, a31);
  }
}

// m[u][d] += alpha * sum_{r < kRows} c[r][u] x[r][d] for u < n, d < dim (a multiple of kTile).
LOOM_CPU_INLINE void tile_rank_update(float* m, int64_t ldm, const float* c, int64_t ldc, const float* x, int64_t ldx,
                                      int64_t n, int64_t dim, float alpha) {
  for (int64_t d0 = 0; d0 < dim; d0 += kTile) {
    V16 x00, x01, x10, x11, x20, x21, x30, x31;
    vload(x00, x + d0);
    vload(x01, x + d0 + 16);
    vload(x10, x + ldx + d0);
    vload(x11, x + ldx + d0 + 16);
    vload(x20, x + 2 * ldx + d0);
    vload(x21, x + 2 * ldx + d0 + 16);
    vload(x30, x + 3 * ldx + d0);
    vload(x31, x + 3 * ldx + d0 + 16);
    float* mp = m + d0;
    for (int64_t u = 0; u < n; ++u, mp += ldm) {
      const float c0 = alpha * c[u], c1 = alpha * c[ldc + u], c2 = alpha * c[2 * ldc + u], c3 = alpha * c[3 * ldc + u];
      V16 m0, m1;
      vload(m0, mp);
      vload(m1, mp + 16);
      m0 += (c0 * x00 + c1 * x10) + (c2 * x20 + c3 * x30);
      m1 += (c0 * x01 + c1 * x11) + (c2 * x21 + c3 * x31);
      vstore(mp, m0);
      vstore(mp + 16, m1);
    }
  }
}

// Layout of one head inside the [B, T, H, Dh] tensors and of its padded tiles.
struct Head {
  int64_t seq;     // T
  int64_t stride;  // H * Dh: from row t to row t + 1
  int64_t dim;     // Dh
  int64_t seq_p;   // leading dimension of transposed tiles and score rows: T rounded up to kTile, plus 16 so
                   // that the rows of a transposed tile do not all fall into one cache set
  int64_t dim_p;   // Dh rounded up to kTile: leading dimension of row tiles
};

// kt[d][u] = src[u][d] for u < n, zero for n <= u < n_p.
LOOM_CPU_INLINE void pack_transposed(float* kt, const float* src, const Head& hd, int64_t n, int64_t n_p) {
  for (int64_t d = 0; d < hd.dim; ++d) std::fill(kt + d * hd.seq_p + n, kt + d * hd.seq_p + n_p, 0.0f);
  for (int64_t u = 0; u < n; ++u) {
    const float* row = src + u * hd.stride;
    for (int64_t d = 0; d < hd.dim; ++d) kt[d * hd.seq_p + u] = row[d];
  }
}

// rows[u][d] = src[u][d] for u < n, d < dim; zero in the padding up to (n_p, dim_p).
LOOM_CPU_INLINE void pack_rows(float* rows, const float* src, const Head& hd, int64_t n, int64_t n_p) {
  for (int64_t u = 0; u < n_p; ++u) {
    float* dst = rows + u * hd.dim_p;
    if (u < n) {
      std::copy(src + u * hd.stride, src + u * hd.stride + hd.dim, dst);
      std::fill(dst + hd.dim, dst + hd.dim_p, 0.0f);
    } else {
      std::fill(dst, dst + hd.dim_p, 0.0f);
    }
  }
}

// Per-thread scratch of the forward pass, in floats.
int64_t forward_scratch(const Head& hd) {
  return hd.dim * hd.seq_p + hd.seq_p * hd.dim_p + kRowBlock * hd.seq_p + kRows * hd.dim_p + kRowBlock * hd.dim_p;
}

// Forward for rows [tb0, tb1) of one head. q, k, v, out point at row 0 of the head, lse at its first entry.
// Rows go kRowBlock at a time, in two passes over key blocks (scores, then the weighted sum of values), so a key
// block stays in cache while every row group of the row block uses it. Between the passes each row has all its
// scores, so the softmax needs no running rescale.
LOOM_CPU_CLONES void forward_task(float* out, float* lse, const float* q, const float* k, const float* v,
                                  const Head& hd, int64_t tb0, int64_t tb1, float scale, float* scratch) {
  float* kt = scratch;                   // [dim][seq_p]         keys 0..tb1, transposed
  float* vp = kt + hd.dim * hd.seq_p;    // [seq_p][dim_p]       values 0..tb1
  float* s = vp + hd.seq_p * hd.dim_p;   // [kRowBlock][seq_p]   scores, then probabilities
  float* xq = s + kRowBlock * hd.seq_p;  // [kRows][dim_p]       the query rows of one group
  float* acc = xq + kRows * hd.dim_p;    // [kRowBlock][dim_p]   unnormalised outputs
  const int64_t keys_p = round_up(tb1, kTile);
  pack_transposed(kt, k, hd, tb1, keys_p);
  pack_rows(vp, v, hd, tb1, keys_p);

  for (int64_t sb0 = tb0; sb0 < tb1; sb0 += kRowBlock) {
    const int64_t sb1 = std::min(tb1, sb0 + kRowBlock);
    // The keys a group of rows starting at t0 needs from the key block starting at u0: [u0, end), rounded up
    // to whole tiles (the tail beyond the group's last row is masked below).
    auto block_end = [&](int64_t t0, int64_t u0) {
      return std::min(u0 + kKeyBlock, round_up(std::min(sb1, t0 + kRows), kTile));
    };
    for (int64_t u0 = 0; u0 < sb1; u0 += kKeyBlock) {
      for (int64_t t0 = sb0; t0 < sb1; t0 += kRows) {
        const int64_t end = block_end(t0, u0);
        if (end <= u0) continue;
        pack_rows(xq, q + t0 * hd.stride, hd, std::min(kRows, sb1 - t0), kRows);  // rows past sb1 are zero
        tile_scores(s + (t0 - sb0) * hd.seq_p + u0, hd.seq_p, xq, hd.dim_p, kt + u0, hd.seq_p, hd.dim, end - u0, scale);
      }
    }
    float row_max[kRowBlock];
    double sums[kRowBlock];
    for (int64_t t = sb0; t < sb1; ++t) {
      float* row = s + (t - sb0) * hd.seq_p;
      const int64_t n = t + 1;  // causal: keys 0..t
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t u = 0; u < n; ++u) m = row[u] > m ? row[u] : m;  // std::max does not vectorise here
      for (int64_t u = 0; u < n; ++u) row[u] = fast_exp(row[u] - m);
      const int64_t t0 = sb0 + (t - sb0) / kRows * kRows;
      std::fill(row + n, row + round_up(std::min(sb1, t0 + kRows), kTile), 0.0f);
      row_max[t - sb0] = m;
      sums[t - sb0] = sum_f32(row, n);
    }
    for (int64_t u0 = 0; u0 < sb1; u0 += kKeyBlock) {
      for (int64_t t0 = sb0; t0 < sb1; t0 += kRows) {
        const int64_t end = block_end(t0, u0);
        if (end <= u0) continue;
        tile_weighted_sum(acc + (t0 - sb0) * hd.dim_p, hd.dim_p, u0 > 0, s + (t0 - sb0) * hd.seq_p + u0, hd.seq_p,
                          vp + u0 * hd.dim_p, hd.dim_p, end - u0, hd.dim_p);
      }
    }
    for (int64_t t = sb0; t < sb1; ++t) {
      const float inv = static_cast<float>(1.0 / sums[t - sb0]);
      float* o = out + t * hd.stride;
      const float* a = acc + (t - sb0) * hd.dim_p;
      for (int64_t d = 0; d < hd.dim; ++d) o[d] = a[d] * inv;
      lse[t] = static_cast<float>(static_cast<double>(row_max[t - sb0]) + std::log(sums[t - sb0]));
    }
  }
}

int64_t backward_scratch(const Head& hd) {
  return 2 * hd.dim * hd.seq_p + 2 * hd.seq_p * hd.dim_p + 2 * kKeyBlock * hd.dim_p + 2 * kRows * kKeyBlock +
         2 * kRows * hd.dim_p + hd.seq_p;
}

// Backward for one head, key block by key block (the order of FlashAttention-2's backward): the block's dk and dv
// accumulate in cache-resident tiles while every row at or after the block passes over it; dq accumulates in
// a whole-head tile. All of q, k, v, dout, out, dq, dk, dv point at row 0 of the head.
LOOM_CPU_CLONES void backward_task(float* dq, float* dk, float* dv, bool accumulate, const float* dout, const float* q,
                                   const float* k, const float* v, const float* out, const float* lse, const Head& hd,
                                   float scale, float* scratch) {
  float* kt = scratch;                        // [dim][seq_p]        k transposed
  float* vt = kt + hd.dim * hd.seq_p;         // [dim][seq_p]        v transposed
  float* kp = vt + hd.dim * hd.seq_p;         // [seq_p][dim_p]      k rows
  float* dq_acc = kp + hd.seq_p * hd.dim_p;   // [seq_p][dim_p]      dq / scale
  float* dkb = dq_acc + hd.seq_p * hd.dim_p;  // [kKeyBlock][dim_p]  dk of the key block
  float* dvb = dkb + kKeyBlock * hd.dim_p;    // [kKeyBlock][dim_p]  dv of the key block
  float* p = dvb + kKeyBlock * hd.dim_p;      // [kRows][kKeyBlock]  probabilities
  float* ds = p + kRows * kKeyBlock;          // [kRows][kKeyBlock]  dout.v, then ds
  float* xq = ds + kRows * kKeyBlock;         // [kRows][dim_p]      q rows of the group
  float* xdo = xq + kRows * hd.dim_p;         // [kRows][dim_p]      dout rows of the group
  float* delta = xdo + kRows * hd.dim_p;      // [seq]               dout[t] . out[t]
  const int64_t seq = hd.seq;
  pack_transposed(kt, k, hd, seq, hd.seq_p);
  pack_transposed(vt, v, hd, seq, hd.seq_p);
  pack_rows(kp, k, hd, seq, hd.seq_p);
  std::fill(dq_acc, dq_acc + hd.seq_p * hd.dim_p, 0.0f);
  for (int64_t t = 0; t < seq; ++t) delta[t] = dot(dout + t * hd.stride, out + t * hd.stride, hd.dim);

  for (int64_t u0 = 0; u0 < seq; u0 += kKeyBlock) {
    const int64_t u1 = std::min(seq, u0 + kKeyBlock);
    std::fill(dkb, dkb + 2 * kKeyBlock * hd.dim_p, 0.0f);  // dkb and dvb
    for (int64_t t0 = u0; t0 < seq; t0 += kRows) {         // rows before u0 see none of the block
      const int64_t nr = std::min(kRows, seq - t0);
      const int64_t n = round_up(std::min(u1, t0 + nr) - u0, kTile);  // keys of the block the group sees, in tiles
      pack_rows(xq, q + t0 * hd.stride, hd, nr, kRows);
      pack_rows(xdo, dout + t0 * hd.stride, hd, nr, kRows);
      tile_scores(p, kKeyBlock, xq, hd.dim_p, kt + u0, hd.seq_p, hd.dim, n, scale);
      tile_scores(ds, kKeyBlock, xdo, hd.dim_p, vt + u0, hd.seq_p, hd.dim, n, 1.0f);
      for (int64_t r = 0; r < kRows; ++r) {
        float* pr = p + r * kKeyBlock;
        float* dsr = ds + r * kKeyBlock;
        int64_t valid = 0;  // keys u0 .. u0+valid-1 are causal for this row; rows past nr have none
        if (r < nr) {
          const int64_t t = t0 + r;
          valid = std::min(u1, t + 1) - u0;
          const float row_lse = lse[t], row_delta = delta[t];
          for (int64_t u = 0; u < valid; ++u) {
            const float pu = fast_exp(pr[u] - row_lse);
            pr[u] = pu;
            dsr[u] = pu * (dsr[u] - row_delta);
          }
        }
        std::fill(pr + valid, pr + n, 0.0f);
        std::fill(dsr + valid, dsr + n, 0.0f);
      }
      tile_rank_update(dvb, hd.dim_p, p, kKeyBlock, xdo, hd.dim_p, n, hd.dim_p, 1.0f);
      tile_rank_update(dkb, hd.dim_p, ds, kKeyBlock, xq, hd.dim_p, n, hd.dim_p, scale);
      tile_weighted_sum(dq_acc + t0 * hd.dim_p, hd.dim_p, true, ds, kKeyBlock, kp + u0 * hd.dim_p, hd.dim_p, n,
                        hd.dim_p);
    }
    for (int64_t u = u0; u < u1; ++u) {
      float* gk = dk + u * hd.stride;
      float* gv = dv + u * hd.stride;
      const float* ak = dkb + (u - u0) * hd.dim_p;
      const float* av = dvb + (u - u0) * hd.dim_p;
      if (accumulate) {
        for (int64_t d = 0; d < hd.dim; ++d) gk[d] += ak[d];
        for (int64_t d = 0; d < hd.dim; ++d) gv[d] += av[d];
      } else {
        std::copy(ak, ak + hd.dim, gk);
        std::copy(av, av + hd.dim, gv);
      }
    }
  }

  for (int64_t t = 0; t < seq; ++t) {
    float* g = dq + t * hd.stride;
    const float* a = dq_acc + t * hd.dim_p;
    if (accumulate) {
      for (int64_t d = 0; d < hd.dim; ++d) g[d] += scale * a[d];
    } else {
      for (int64_t d = 0; d < hd.dim; ++d) g[d] = scale * a[d];
    }
  }
}

struct AttentionShape {
  int64_t batch, seq, heads, dim;
  int64_t head_offset(int64_t b, int64_t h) const { return (b * seq * heads + h) * dim; }  // row 0 of (b, h)
  int64_t lse_offset(int64_t b, int64_t h) const { return (b * heads + h) * seq; }
  Head head() const { return Head{seq, heads * dim, dim, round_up(seq, kTile) + 16, round_up(dim, kTile)}; }
};

AttentionShape check_attention(const char* op, const Tensor& q,
                               std::initializer_list<std::pair<const Tensor*, const char*>> same, const Tensor& lse) {
  LOOM_CHECK(q.ndim() == 4, kShape, op << ": 'q' must be [B, T, H, Dh], got " << q.shape().str());
  for (const auto& [t, arg] : same) check_shape(*t, q.shape(), op, arg);
  check_shape(lse, Shape{q.size(0), q.size(2), q.size(1)}, op, "lse");
  return AttentionShape{q.size(0), q.size(1), q.size(2), q.size(3)};
}

}  // namespace

void CpuBackend::attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                                   const Tensor& v, float scale) {
  float* po = f32_data(out, "attention_forward", "out");
  float* pl = f32_data(lse, "attention_forward", "lse");
  const float* pq = f32_data(q, "attention_forward", "q");
  const float* pk = f32_data(k, "attention_forward", "k");
  const float* pv = f32_data(v, "attention_forward", "v");
  const AttentionShape sh = check_attention("attention_forward", q, {{&k, "k"}, {&v, "v"}, {&out, "out"}}, lse);
  const Head hd = sh.head();
  // Blocks per head: enough for about four tasks per thread, in whole micro-kernel row groups.
  const int64_t heads = sh.batch * sh.heads;
  const int64_t wanted = std::max<int64_t>(1, (4 * threads_ + heads - 1) / std::max<int64_t>(1, heads));
  const int64_t block_rows = round_up(std::max<int64_t>(1, (sh.seq + wanted - 1) / wanted), kRows);
  const int64_t blocks = std::max<int64_t>(1, (sh.seq + block_rows - 1) / block_rows);
  const int64_t tasks = heads * blocks;
  const int64_t per_thread = round_up(forward_scratch(hd), 16);  // whole cache lines per thread
  std::lock_guard<std::mutex> lock(scratch_mutex_);
  float* scratch = this->scratch(static_cast<size_t>(per_thread * threads_));
#pragma omp parallel for num_threads(threads_) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t bh = task / blocks, blk = blocks - 1 - task % blocks;  // long rows first
    const int64_t b = bh / sh.heads, h = bh % sh.heads;
    const int64_t off = sh.head_offset(b, h);
    forward_task(po + off, pl + sh.lse_offset(b, h), pq + off, pk + off, pv + off, hd, blk * block_rows,
                 std::min(sh.seq, (blk + 1) * block_rows), scale, scratch + per_thread * omp_get_thread_num());
  }
}

void CpuBackend::attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, bool accumulate,
                                    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& out, const Tensor& lse, float scale) {
  float* pdq = f32_data(dq, "attention_backward", "dq");
  float* pdk = f32_data(dk, "attention_backward", "dk");
  float* pdv = f32_data(dv, "attention_backward", "dv");
  const float* pdo = f32_data(dout, "attention_backward", "dout");
  const float* pq = f32_data(q, "attention_backward", "q");
  const float* pk = f32_data(k, "attention_backward", "k");
  const float* pv = f32_data(v, "attention_backward", "v");
  const float* po = f32_data(out, "attention_backward", "out");
  const float* pl = f32_data(lse, "attention_backward", "lse");
  const AttentionShape sh = check_attention(
      "attention_backward", q,
      {{&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "dout"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}}, lse);
  const Head hd = sh.head();
  const int64_t tasks = sh.batch * sh.heads;
  const int64_t per_thread = round_up(backward_scratch(hd), 16);
  std::lock_guard<std::mutex> lock(scratch_mutex_);
  float* scratch = this->scratch(static_cast<size_t>(per_thread * threads_));
#pragma omp parallel for num_threads(threads_) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / sh.heads, h = task % sh.heads;
    const int64_t off = sh.head_offset(b, h);
    backward_task(pdq + off, pdk + off, pdv + off, accumulate, pdo + off, pq + off, pk + off, pv + off, po + off,
                  pl + sh.lse_offset(b, h), hd, scale, scratch + per_thread * omp_get_thread_num());
  }
}

}  // namespace loom::cpu
