// CPU backend, part 2: elementwise ops, embedding, RMSNorm, RoPE, SwiGLU, cross-entropy, sum of squares and
// AdamW, with the semantics written in core/backend.h. Everything is f32.
//
// Long reductions (row means, softmax sums, the loss mean, sums of squares over whole parameter arenas) add f32
// partial sums of short blocks into a double, so their error does not grow with the length. Reductions across
// rows (the gradient of an RMSNorm weight or an embedding table) are split by column, never by row, so no two
// threads write one element and the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/cpu/cpu_internal.h"

namespace loom::cpu {
namespace {

// Items of work per row -> how many rows make a chunk worth a thread.
int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, kElementGrain / std::max<int64_t>(1, row_elems));
}

// Columns one thread owns in a column-split reduction: whole cache lines, and enough of them to keep all
// threads busy.
int64_t column_block(int64_t cols, int threads) {
  int64_t per_thread = (cols + threads - 1) / threads;
  return std::max<int64_t>(16, (per_thread + 15) / 16 * 16);
}

// ---- SwiGLU on a range (cloned: the exp must vectorise) ---------------------------------------------

LOOM_CPU_INLINE float sigmoid(float g) {
  return 1.0f / (1.0f + fast_exp(-g));
}

LOOM_CPU_CLONES void swiglu_forward_range(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

LOOM_CPU_CLONES void swiglu_backward_range(float* dgate, float* dup, bool accumulate, const float* dout,
                                           const float* gate, const float* up, int64_t n) {
  // d silu(g) / dg = s (1 + g (1 - s)), s = sigmoid(g).
  if (accumulate) {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i], s = sigmoid(g);
      dgate[i] += dout[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
      dup[i] += dout[i] * (g * s);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i], s = sigmoid(g);
      dgate[i] = dout[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
      dup[i] = dout[i] * (g * s);
    }
  }
}

// ---- cross-entropy rows (cloned: exp over the vocabulary) -------------------------------------------

LOOM_CPU_CLONES double sum_exp_shifted(const float* row, float shift, int64_t n) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t e = std::min(n, b + kSumBlock);
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) acc += fast_exp(row[i] - shift);
    total += acc;
  }
  return total;
}

// drow (+)= coef * exp(row - shift).
LOOM_CPU_CLONES void scaled_exp_shifted(float* drow, bool accumulate, const float* row, float shift, float coef,
                                        int64_t n) {
  if (accumulate) {
    for (int64_t i = 0; i < n; ++i) drow[i] += coef * fast_exp(row[i] - shift);
  } else {
    for (int64_t i = 0; i < n; ++i) drow[i] = coef * fast_exp(row[i] - shift);
  }
}

// The local column of a full-vocabulary target id, or -1 when another shard holds it.
int64_t local_column(int32_t target, int64_t vocab_start, int64_t v_local) {
  const int64_t col = static_cast<int64_t>(target) - vocab_start;
  return col >= 0 && col < v_local ? col : -1;
}

}  // namespace

// ---- elementwise -------------------------------------------------------------------------------------

void CpuBackend::add(const Tensor& out, const Tensor& a, const Tensor& b) {
  float* po = f32_data(out, "add", "out");
  const float* pa = f32_data(a, "add", "a");
  const float* pb = f32_data(b, "add", "b");
  check_shape(a, out.shape(), "add", "a");
  check_shape(b, out.shape(), "add", "b");
  parallel_for(threads_, out.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
  // out may alias a or b element for element, which vectorises safely.
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) po[i] = pa[i] + pb[i];
  });
}

void CpuBackend::axpy(const Tensor& dst, const Tensor& src, float alpha, bool accumulate) {
  float* pd = f32_data(dst, "axpy", "dst");
  const float* ps = f32_data(src, "axpy", "src");
  LOOM_CHECK(dst.numel() == src.numel(), kShape,
             "axpy: 'dst' " << dst.describe() << " and 'src' " << src.describe() << " differ in element count");
  parallel_for(threads_, dst.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    if (accumulate) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) pd[i] += alpha * ps[i];
    } else {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) pd[i] = alpha * ps[i];
    }
  });
}

// ---- embedding ---------------------------------------------------------------------------------------

void CpuBackend::embedding_forward(const Tensor& out, const Tensor& table, const Tensor& tokens, int64_t vocab_start) {
  float* po = f32_data(out, "embedding_forward", "out");
  const float* pt = f32_data(table, "embedding_forward", "table");
  const int32_t* tok = i32_data(tokens, "embedding_forward", "tokens");
  LOOM_CHECK(table.ndim() == 2, kShape, "embedding_forward: 'table' must be [V, D], got " << table.shape().str());
  const int64_t n = tokens.numel(), v_local = table.size(0), d = table.size(1);
  check_shape(out, Shape{n, d}, "embedding_forward", "out");
  parallel_for(threads_, n, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = po + r * d;
      const int64_t row = local_column(tok[r], vocab_start, v_local);
      if (row < 0) {
        std::fill(dst, dst + d, 0.0f);
      } else {
        std::copy(pt + row * d, pt + (row + 1) * d, dst);
      }
    }
  });
}

void CpuBackend::embedding_backward(const Tensor& dtable, const Tensor& dout, const Tensor& tokens,
                                    int64_t vocab_start) {
  float* pdt = f32_data(dtable, "embedding_backward", "dtable");
  const float* pdo = f32_data(dout, "embedding_backward", "dout");
  const int32_t* tok = i32_data(tokens, "embedding_backward", "tokens");
  LOOM_CHECK(dtable.ndim() == 2, kShape, "embedding_backward: 'dtable' must be [V, D], got " << dtable.shape().str());
  const int64_t n = tokens.numel(), v_local = dtable.size(0), d = dtable.size(1);
  check_shape(dout, Shape{n, d}, "embedding_backward", "dout");
  // Repeated tokens add into one row: split by column so each thread owns its slice of every row.
  const int64_t block = column_block(d, threads_);
  const int64_t blocks = (d + block - 1) / block;
#pragma omp parallel for num_threads(threads_) schedule(static) if (blocks > 1 && n * d > kElementGrain)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * block, c1 = std::min(d, c0 + block);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = local_column(tok[r], vocab_start, v_local);
      if (row < 0) continue;
      float* dst = pdt + row * d;
      const float* src = pdo + r * d;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

// ---- RMSNorm -----------------------------------------------------------------------------------------

void CpuBackend::rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, float eps) {
  float* py = f32_data(y, "rmsnorm_forward", "y");
  float* pr = f32_data(rstd, "rmsnorm_forward", "rstd");
  const float* px = f32_data(x, "rmsnorm_forward", "x");
  const float* pw = f32_data(w, "rmsnorm_forward", "w");
  LOOM_CHECK(x.ndim() == 2, kShape, "rmsnorm_forward: 'x' must be [N, D], got " << x.shape().str());
  const int64_t n = x.size(0), d = x.size(1);
  check_shape(y, x.shape(), "rmsnorm_forward", "y");
  check_shape(rstd, Shape{n}, "rmsnorm_forward", "rstd");
  check_shape(w, Shape{d}, "rmsnorm_forward", "w");
  parallel_for(threads_, n, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = px + r * d;
      float* yr = py + r * d;
      const double mean_sq = d > 0 ? sum_product_f32(xr, xr, d) / static_cast<double>(d) : 0.0;
      const float rs = static_cast<float>(1.0 / std::sqrt(mean_sq + static_cast<double>(eps)));
      pr[r] = rs;
      for (int64_t c = 0; c < d; ++c) yr[c] = xr[c] * rs * pw[c];
    }
  });
}

void CpuBackend::rmsnorm_backward(const Tensor& dx, bool accumulate_dx, const Tensor& dw, const Tensor& dy,
                                  const Tensor& x, const Tensor& w, const Tensor& rstd) {
  float* pdx = f32_data(dx, "rmsnorm_backward", "dx");
  float* pdw = f32_data(dw, "rmsnorm_backward", "dw");
  const float* pdy = f32_data(dy, "rmsnorm_backward", "dy");
  const float* px = f32_data(x, "rmsnorm_backward", "x");
  const float* pw = f32_data(w, "rmsnorm_backward", "w");
  const float* pr = f32_data(rstd, "rmsnorm_backward", "rstd");
  LOOM_CHECK(x.ndim() == 2, kShape, "rmsnorm_backward: 'x' must be [N, D], got " << x.shape().str());
  const int64_t n = x.size(0), d = x.size(1);
  check_shape(dx, x.shape(), "rmsnorm_backward", "dx");
  check_shape(dy, x.shape(), "rmsnorm_backward", "dy");
  check_shape(w, Shape{d}, "rmsnorm_backward", "w");
  check_shape(dw, Shape{d}, "rmsnorm_backward", "dw");
  check_shape(rstd, Shape{n}, "rmsnorm_backward", "rstd");

  // dx: rows are independent. The per-thread row scratch holds w*dy and xhat.
  const int64_t row_chunks = std::max<int64_t>(1, std::min<int64_t>(threads_, n));
  std::vector<float> scratch(static_cast<size_t>(2 * d * row_chunks));
  const int64_t chunk_rows = (n + row_chunks - 1) / row_chunks;
#pragma omp parallel for num_threads(threads_) schedule(static) if (row_chunks > 1 && n * d > kElementGrain)
  for (int64_t ch = 0; ch < row_chunks; ++ch) {
    float* wdy = scratch.data() + 2 * d * ch;
    float* xhat = wdy + d;
    const int64_t r1 = std::min(n, (ch + 1) * chunk_rows);
    for (int64_t r = ch * chunk_rows; r < r1; ++r) {
      const float rs = pr[r];
      const float* xr = px + r * d;
      const float* dyr = pdy + r * d;
      float* dxr = pdx + r * d;
      for (int64_t c = 0; c < d; ++c) {
        wdy[c] = pw[c] * dyr[c];
        xhat[c] = xr[c] * rs;
      }
      const float mean = d > 0 ? static_cast<float>(sum_product_f32(wdy, xhat, d) / static_cast<double>(d)) : 0.0f;
      if (accumulate_dx) {
        for (int64_t c = 0; c < d; ++c) dxr[c] += rs * (wdy[c] - xhat[c] * mean);
      } else {
        for (int64_t c = 0; c < d; ++c) dxr[c] = rs * (wdy[c] - xhat[c] * mean);
      }
    }
  }

  // dw: a sum over rows, split by column; f32 partial sums over kSumBlock rows go into a double accumulator.
  const int64_t block = column_block(d, threads_);
  const int64_t blocks = (d + block - 1) / block;
  std::vector<double> totals(static_cast<size_t>(d), 0.0);
  std::vector<float> partials(static_cast<size_t>(d));
#pragma omp parallel for num_threads(threads_) schedule(static) if (blocks > 1 && n * d > kElementGrain)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * block, c1 = std::min(d, c0 + block), width = c1 - c0;
    double* total = totals.data() + c0;
    float* partial = partials.data() + c0;
    for (int64_t r0 = 0; r0 < n; r0 += kSumBlock) {
      std::fill(partial, partial + width, 0.0f);
      const int64_t r1 = std::min(n, r0 + kSumBlock);
      for (int64_t r = r0; r < r1; ++r) {
        const float rs = pr[r];
        const float* xr = px + r * d + c0;
        const float* dyr = pdy + r * d + c0;
        for (int64_t c = 0; c < width; ++c) partial[c] += dyr[c] * (xr[c] * rs);
      }
      for (int64_t c = 0; c < width; ++c) total[c] += partial[c];
    }
    for (int64_t c = 0; c < width; ++c) pdw[c0 + c] += static_cast<float>(total[c]);
  }
}

// ---- RoPE --------------------------------------------------------------------------------------------

std::shared_ptr<const RopeTable> CpuBackend::rope_table(int64_t max_t, int64_t head_dim, float base) {
  std::lock_guard<std::mutex> lock(rope_mutex_);
  const bool same_key = rope_table_ && rope_table_->head_dim == head_dim && rope_table_->base == base;
  if (same_key && rope_table_->max_t >= max_t) return rope_table_;
  // Angles in double so the table is the exact rotation rounded once to f32, at every position.
  auto table = std::make_shared<RopeTable>();
  table->head_dim = head_dim;
  table->base = base;
  table->max_t = same_key ? std::max(max_t, rope_table_->max_t) : max_t;
  const int64_t half = head_dim / 2;
  table->cos.resize(static_cast<size_t>(table->max_t * half));
  table->sin.resize(static_cast<size_t>(table->max_t * half));
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  float* pc = table->cos.data();
  float* ps = table->sin.data();
  parallel_for(threads_, table->max_t, row_grain(half * 16), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(t) * inv_freq[i];
        pc[t * half + i] = static_cast<float>(std::cos(angle));
        ps[t * half + i] = static_cast<float>(std::sin(angle));
      }
  });
  rope_table_ = table;
  return table;
}

void CpuBackend::rope_rotate(const Tensor& dst, bool accumulate, const Tensor& src, float base, float sign,
                             const char* op) {
  float* pd = f32_data(dst, op, "dst");
  const float* ps = f32_data(src, op, "src");
  LOOM_CHECK(src.ndim() == 4 && src.size(3) % 2 == 0, kShape,
             op << ": input must be [B, T, H, Dh] with Dh even, got " << src.shape().str());
  check_shape(dst, src.shape(), op, "dst");
  const int64_t batch = src.size(0), seq = src.size(1), heads = src.size(2), head_dim = src.size(3);
  const int64_t half = head_dim / 2;
  std::shared_ptr<const RopeTable> table = rope_table(seq, head_dim, base);
  const float* cos_table = table->cos.data();
  const float* sin_table = table->sin.data();
  parallel_for(threads_, batch * seq, row_grain(heads * head_dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % seq;
      const float* cs = cos_table + t * half;
      const float* sn = sin_table + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const float* x = ps + (r * heads + h) * head_dim;
        float* y = pd + (r * heads + h) * head_dim;
        // Read both halves before writing: dst may alias src.
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float c = cs[i], s = sign * sn[i];
          const float x0 = x[i], x1 = x[i + half];
          const float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
          if (accumulate) {
            y[i] += y0;
            y[i + half] += y1;
          } else {
            y[i] = y0;
            y[i + half] = y1;
          }
        }
      }
    }
  });
}

void CpuBackend::rope_forward(const Tensor& out, const Tensor& x, float base) {
  rope_rotate(out, false, x, base, 1.0f, "rope_forward");
}

void CpuBackend::rope_backward(const Tensor& dx, bool accumulate, const Tensor& dy, float base) {
  rope_rotate(dx, accumulate, dy, base, -1.0f, "rope_backward");
}

// ---- SwiGLU ------------------------------------------------------------------------------------------

void CpuBackend::swiglu_forward(const Tensor& out, const Tensor& gate, const Tensor& up) {
  float* po = f32_data(out, "swiglu_forward", "out");
  const float* pg = f32_data(gate, "swiglu_forward", "gate");
  const float* pu = f32_data(up, "swiglu_forward", "up");
  check_shape(gate, out.shape(), "swiglu_forward", "gate");
  check_shape(up, out.shape(), "swiglu_forward", "up");
  parallel_for(threads_, out.numel(), kElementGrain,
               [&](int64_t i0, int64_t i1) { swiglu_forward_range(po + i0, pg + i0, pu + i0, i1 - i0); });
}

void CpuBackend::swiglu_backward(const Tensor& dgate, const Tensor& dup, bool accumulate, const Tensor& dout,
                                 const Tensor& gate, const Tensor& up) {
  float* pdg = f32_data(dgate, "swiglu_backward", "dgate");
  float* pdu = f32_data(dup, "swiglu_backward", "dup");
  const float* pdo = f32_data(dout, "swiglu_backward", "dout");
  const float* pg = f32_data(gate, "swiglu_backward", "gate");
  const float* pu = f32_data(up, "swiglu_backward", "up");
  check_shape(dgate, gate.shape(), "swiglu_backward", "dgate");
  check_shape(dup, gate.shape(), "swiglu_backward", "dup");
  check_shape(dout, gate.shape(), "swiglu_backward", "dout");
  check_shape(up, gate.shape(), "swiglu_backward", "up");
  parallel_for(threads_, gate.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
    swiglu_backward_range(pdg + i0, pdu + i0, accumulate, pdo + i0, pg + i0, pu + i0, i1 - i0);
  });
}

// ---- cross-entropy -----------------------------------------------------------------------------------

void CpuBackend::ce_row_max(const Tensor& row_max, const Tensor& logits) {
  float* pm = f32_data(row_max, "ce_row_max", "row_max");
  const float* pl = f32_data(logits, "ce_row_max", "logits");
  LOOM_CHECK(logits.ndim() == 2, kShape, "ce_row_max: 'logits' must be [N, V], got " << logits.shape().str());
  const int64_t n = logits.size(0), v = logits.size(1);
  check_shape(row_max, Shape{n}, "ce_row_max", "row_max");
  parallel_for(threads_, n, row_grain(v), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = pl + r * v;
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < v; ++c) m = row[c] > m ? row[c] : m;  // std::max does not vectorise here
      pm[r] = m;
    }
  });
}

void CpuBackend::ce_sumexp_target(const Tensor& sumexp, const Tensor& target_logit, const Tensor& logits,
                                  const Tensor& row_max, const Tensor& targets, int64_t vocab_start) {
  float* ps = f32_data(sumexp, "ce_sumexp_target", "sumexp");
  float* pt = f32_data(target_logit, "ce_sumexp_target", "target_logit");
  const float* pl = f32_data(logits, "ce_sumexp_target", "logits");
  const float* pm = f32_data(row_max, "ce_sumexp_target", "row_max");
  const int32_t* tgt = i32_data(targets, "ce_sumexp_target", "targets");
  LOOM_CHECK(logits.ndim() == 2, kShape, "ce_sumexp_target: 'logits' must be [N, V], got " << logits.shape().str());
  const int64_t n = logits.size(0), v = logits.size(1);
  check_shape(sumexp, Shape{n}, "ce_sumexp_target", "sumexp");
  check_shape(target_logit, Shape{n}, "ce_sumexp_target", "target_logit");
  check_shape(row_max, Shape{n}, "ce_sumexp_target", "row_max");
  check_shape(targets, Shape{n}, "ce_sumexp_target", "targets");
  parallel_for(threads_, n, row_grain(v * 8), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = pl + r * v;
      ps[r] = static_cast<float>(sum_exp_shifted(row, pm[r], v));
      const int64_t col = local_column(tgt[r], vocab_start, v);
      pt[r] = col < 0 ? 0.0f : row[col];
    }
  });
}

void CpuBackend::ce_loss_mean(const Tensor& loss_mean, const Tensor& row_max, const Tensor& sumexp,
                              const Tensor& target_logit) {
  float* pout = f32_data(loss_mean, "ce_loss_mean", "loss_mean");
  const float* pm = f32_data(row_max, "ce_loss_mean", "row_max");
  const float* ps = f32_data(sumexp, "ce_loss_mean", "sumexp");
  const float* pt = f32_data(target_logit, "ce_loss_mean", "target_logit");
  const int64_t n = row_max.numel();
  check_shape(loss_mean, Shape{1}, "ce_loss_mean", "loss_mean");
  check_shape(sumexp, row_max.shape(), "ce_loss_mean", "sumexp");
  check_shape(target_logit, row_max.shape(), "ce_loss_mean", "target_logit");
  LOOM_CHECK(n > 0, kShape, "ce_loss_mean: no rows");
  // N is a few thousand tokens: one thread, in double.
  double total = 0;
  for (int64_t r = 0; r < n; ++r)
    total += std::log(static_cast<double>(ps[r])) + static_cast<double>(pm[r]) - static_cast<double>(pt[r]);
  pout[0] = static_cast<float>(total / static_cast<double>(n));
}

void CpuBackend::ce_backward(const Tensor& dlogits, bool accumulate, const Tensor& logits, const Tensor& row_max,
                             const Tensor& sumexp, const Tensor& targets, int64_t vocab_start, const Tensor& dloss,
                             float scale) {
  float* pd = f32_data(dlogits, "ce_backward", "dlogits");
  const float* pl = f32_data(logits, "ce_backward", "logits");
  const float* pm = f32_data(row_max, "ce_backward", "row_max");
  const float* ps = f32_data(sumexp, "ce_backward", "sumexp");
  const int32_t* tgt = i32_data(targets, "ce_backward", "targets");
  const float* pdl = f32_data(dloss, "ce_backward", "dloss");
  LOOM_CHECK(logits.ndim() == 2, kShape, "ce_backward: 'logits' must be [N, V], got " << logits.shape().str());
  const int64_t n = logits.size(0), v = logits.size(1);
  check_shape(dlogits, logits.shape(), "ce_backward", "dlogits");
  check_shape(row_max, Shape{n}, "ce_backward", "row_max");
  check_shape(sumexp, Shape{n}, "ce_backward", "sumexp");
  check_shape(targets, Shape{n}, "ce_backward", "targets");
  check_shape(dloss, Shape{1}, "ce_backward", "dloss");
  const float g = pdl[0] * scale;
  parallel_for(threads_, n, row_grain(v * 8), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* drow = pd + r * v;
      const float coef = static_cast<float>(static_cast<double>(g) / static_cast<double>(ps[r]));
      scaled_exp_shifted(drow, accumulate, pl + r * v, pm[r], coef, v);
      const int64_t col = local_column(tgt[r], vocab_start, v);
      if (col >= 0) drow[col] -= g;
    }
  });
}

// ---- reductions and the optimizer --------------------------------------------------------------------

void CpuBackend::sum_squares(const Tensor& out, const Tensor& x, bool accumulate) {
  float* po = f32_data(out, "sum_squares", "out");
  const float* px = f32_data(x, "sum_squares", "x");
  check_shape(out, Shape{1}, "sum_squares", "out");
  // Fixed blocks, added in a fixed order: the result does not depend on the thread count.
  constexpr int64_t kBlock = int64_t{1} << 16;
  const int64_t n = x.numel();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for num_threads(threads_) schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const float* block = px + b * kBlock;
    partial[static_cast<size_t>(b)] = sum_product_f32(block, block, std::min(kBlock, n - b * kBlock));
  }
  double total = 0;
  for (double p : partial) total += p;
  po[0] = accumulate ? static_cast<float>(static_cast<double>(po[0]) + total) : static_cast<float>(total);
}

void CpuBackend::adamw(const Tensor& master, const Tensor& m, const Tensor& v, const Tensor& grad,
                       const Tensor& compute_out, const Tensor& norm_sq, const AdamWArgs& args) {
  float* pw = f32_data(master, "adamw", "master");
  float* pm = f32_data(m, "adamw", "m");
  float* pv = f32_data(v, "adamw", "v");
  const float* pg = f32_data(grad, "adamw", "grad");
  float* pout = f32_data(compute_out, "adamw", "compute_out");
  const int64_t n = master.numel();
  auto check_numel = [&](const Tensor& t, const char* arg) {
    LOOM_CHECK(t.numel() == n, kShape, "adamw: '" << arg << "' has " << t.numel() << " elements, 'master' has " << n);
  };
  check_numel(m, "m");
  check_numel(v, "v");
  check_numel(grad, "grad");
  check_numel(compute_out, "compute_out");
  LOOM_CHECK(args.step >= 1, kConfig, "adamw: step is 1-based, got " << args.step);

  double clip = 1.0;
  if (args.max_norm > 0 && !norm_sq.is_null()) {
    const float* pn = f32_data(norm_sq, "adamw", "norm_sq");
    check_shape(norm_sq, Shape{1}, "adamw", "norm_sq");
    const double norm = std::sqrt(static_cast<double>(pn[0])) * static_cast<double>(args.grad_scale);
    clip = std::min(1.0, static_cast<double>(args.max_norm) / (norm + 1e-6));
  }
  const float g_scale = static_cast<float>(static_cast<double>(args.grad_scale) * clip);
  const float b1 = args.beta1, b2 = args.beta2, lr = args.lr, eps = args.eps, wd = args.weight_decay;
  const float bias1 = static_cast<float>(1.0 - std::pow(static_cast<double>(b1), static_cast<double>(args.step)));
  const float bias2 = static_cast<float>(1.0 - std::pow(static_cast<double>(b2), static_cast<double>(args.step)));
  parallel_for(threads_, n, kElementGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float g = pg[i] * g_scale;
      const float mi = b1 * pm[i] + (1.0f - b1) * g;
      const float vi = b2 * pv[i] + (1.0f - b2) * (g * g);
      const float mhat = mi / bias1, vhat = vi / bias2;
      const float w = pw[i];
      const float updated = w - lr * (mhat / (std::sqrt(vhat) + eps) + wd * w);
      pm[i] = mi;
      pv[i] = vi;
      pw[i] = updated;
      pout[i] = updated;  // may alias master: the same value
    }
  });
}

}  // namespace loom::cpu
