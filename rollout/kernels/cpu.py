"""C++ kernels of the engine on CPU (decode step and prefill), where Triton runs only in its interpreter.

Each is an op of one ``torch.library`` namespace (``NAMESPACE``, named after a hash of the source, so that
two versions of the kernels, as ``bench_rollout --against`` imports them, load side by side) with the
signature of its PyTorch reference, which ``torch.compile`` calls as one opaque kernel, one pass over what
it reads.

- ``decode_attention``: one query token per sequence against its KV cache. As two batched matrix products
  with a softmax between them (``decode_attention_ref``), each (sequence, KV head) is a product of a few
  query rows with the cache: MKL runs such thin products far from the bandwidth of the caches, and the
  scores and probabilities make two round trips through memory. On a 2-core CPU those products and their
  softmax were over a third of the tiny model's decode step at batch 64. The kernel walks each (sequence,
  KV head) once: the scores of its group of query heads, their softmax and the weighted sum of the
  values, from buffers that stay in L1, prefetching the next head's keys and values meanwhile. It reads
  the keys with positions contiguous (``keys.stride(2) == 1``: on CPU the engine stores them
  ``[slots, kv_heads, head_dim, max_length]`` and passes a transposed view), so that each score is a
  vector multiply-add over positions; the values with dims contiguous, so that each position adds a
  vector to the output. Row b reads positions [0, positions[b]] only.
- ``mamba_step``: all of a Mamba layer's decode step between its two projections, one task per row: the
  conv update, the recurrent step of every head (each state row read, updated and written back in place
  while its output is summed), the gated RMS norm. Compiled from the references, the new state went to a
  temporary buffer, was copied into the cache and read again, and the conv and the norm were loops that
  Inductor ran on one thread at the tiny model's sizes while the other thread waited.
- ``mamba_prefill``: the same for the packed prompts of a prefill, the recurrence run token by token from a
  zero state (the chunked scan's many small products and copies, its reference, took about five times as
  long for the tiny model's prompts on 2 cores).

They are built with ``torch.utils.cpp_extension`` at first use (about 25 s, then cached on disk), with the
C++ compiler that ``torch.compile`` needs on CPU anyway; where none builds them, the references run.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.cpp_extension import get_default_build_root, load_inline

from rollout.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from rollout.kernels.rms_norm import gated_rms_norm_ref
from rollout.kernels.ssd_scan import ssd_scan_ref
from rollout.kernels.state_update import selective_state_update_ref

_SOURCE = r"""
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();  // 8 floats: AVX2, or the scalar fallback of the same width

// G query heads of one KV head, head_dim = C * W, over positions [0, n): scores (keys positions-contiguous,
// stride ksd between dims), their softmax, then the sum of the values weighted by it. s holds G rows of
// n + W scores.
template <int G, int C>
void one_head(const float* q, const float* K, int64_t ksd, const float* V, int64_t vst, int64_t n, float scale,
              float* s, float* out, const float* next_K, const float* next_V) {
  const int64_t row = n + W;
  for (int64_t t = 0; t < n; t += W) {
    const int64_t m = std::min(W, n - t);
    Vec acc[G];
    for (int g = 0; g < G; ++g) acc[g] = Vec(0.f);
    for (int64_t d = 0; d < C * W; ++d) {
      __builtin_prefetch(next_K + d * ksd + t, 0, 2);
      const Vec k = m == W ? Vec::loadu(K + d * ksd + t) : Vec::loadu(K + d * ksd + t, m);
      for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(Vec(q[g * C * W + d]), k, acc[g]);
    }
    for (int g = 0; g < G; ++g) (acc[g] * Vec(scale)).store(s + g * row + t, m);
  }
  float inverse[G];
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * row;
    const float top = *std::max_element(sg, sg + n);
    Vec sum(0.f);
    for (int64_t t = 0; t < n; t += W) {
      const int64_t m = std::min(W, n - t);
      Vec e = (Vec::loadu(sg + t, m) - Vec(top)).exp_u20();
      if (m < W) e = Vec::set(Vec(0.f), e, m);
      e.store(sg + t, m);
      sum = sum + e;
    }
    inverse[g] = 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
  }
  Vec acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = Vec(0.f);
  for (int64_t t = 0; t < n; ++t) {
    for (int c = 0; c < C; c += 2) __builtin_prefetch(next_V + t * vst + c * W, 0, 2);
    for (int c = 0; c < C; ++c) {
      const Vec v = Vec::loadu(V + t * vst + c * W);
      for (int g = 0; g < G; ++g) acc[g][c] = at::vec::fmadd(Vec(s[g * row + t]), v, acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) (acc[g][c] * Vec(inverse[g])).store(out + (g * C + c) * W);
}

using HeadFn = void (*)(const float*, const float*, int64_t, const float*, int64_t, int64_t, float, float*, float*,
                        const float*, const float*);

template <int G>
HeadFn with_dims(int64_t C) {
  switch (C) {
    case 1: return one_head<G, 1>;
    case 2: return one_head<G, 2>;
    case 3: return one_head<G, 3>;
    case 4: return one_head<G, 4>;
    case 8: return one_head<G, 8>;
    case 16: return one_head<G, 16>;
  }
  TORCH_CHECK(false, "decode_attention: head_dim ", C * W, " is not one of 8, 16, 24, 32, 64, 128");
}

HeadFn head_fn(int64_t G, int64_t C) {
  switch (G) {
    case 1: return with_dims<1>(C);
    case 2: return with_dims<2>(C);
    case 3: return with_dims<3>(C);
    case 4: return with_dims<4>(C);
  }
  TORCH_CHECK(false, "decode_attention: groups of ", G, " query heads");
}

constexpr int64_t MAX_GROUP = 4;  // more query heads per KV head run in groups of at most 4

at::Tensor decode_attention(const at::Tensor& q, at::Tensor& keys, at::Tensor& values, const at::Tensor& positions,
                            double scale, const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  const int64_t group = heads / kv_heads;
  const bool write = k.has_value();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(3) == 1 && dim % W == 0 && keys.size(0) >= batch &&
              values.size(0) >= batch, "decode_attention: keys need contiguous positions, values contiguous dims");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == batch,
              "decode_attention: one int64 position per row");
  TORCH_CHECK(!write || (v.has_value() && k->scalar_type() == at::kFloat && v->scalar_type() == at::kFloat),
              "decode_attention: k and v (float32) together");
  const at::Tensor query = q.contiguous(), at_pos = positions.contiguous();
  const at::Tensor new_k = write ? k->contiguous() : at::Tensor(), new_v = write ? v->contiguous() : at::Tensor();
  const int64_t* pos = at_pos.data_ptr<int64_t>();
  const int64_t span = batch ? *std::max_element(pos, pos + batch) + 1 : 0;
  TORCH_CHECK(span <= keys.size(2) && span <= values.size(2) && (!batch || *std::min_element(pos, pos + batch) >= 0),
              "decode_attention: a position outside the cache");
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const float* qp = query.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(MAX_GROUP * (span + W));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kv_heads, h = i % kv_heads;
      if (write) {  // this step's key and value, at the row's position
        const float *nk = new_k.data_ptr<float>() + i * dim, *nv = new_v.data_ptr<float>() + i * dim;
        float* K = kp + b * keys.stride(0) + h * keys.stride(1) + pos[b];
        float* V = vp + b * values.stride(0) + h * values.stride(1) + pos[b] * values.stride(2);
        for (int64_t d = 0; d < dim; ++d) K[d * keys.stride(3)] = nk[d];
        std::copy(nv, nv + dim, V);
      }
      for (int64_t g0 = 0; g0 < group; g0 += MAX_GROUP) {
        const int64_t g = std::min(MAX_GROUP, group - g0);
        const int64_t first = (b * heads + h * group + g0) * dim;
        const int64_t j = std::min(i + 1, end - 1), nb = j / kv_heads, nh = j % kv_heads;
        head_fn(g, dim / W)(qp + first, kp + b * keys.stride(0) + h * keys.stride(1), keys.stride(3),
                            vp + b * values.stride(0) + h * values.stride(1), values.stride(2), pos[b] + 1,
                            static_cast<float>(scale), s.data(), op + first,
                            kp + nb * keys.stride(0) + nh * keys.stride(1),
                            vp + nb * values.stride(0) + nh * values.stride(1));
      }
    }
  });
  return out;
}

// softplus(dt + dt_bias) clamped to [lo, hi], as torch's softplus (linear above 20)
inline float discretize_dt(float dt, float lo, float hi) {
  const float x = dt > 20.f ? dt : std::log1p(std::exp(dt));
  return std::min(std::max(x, lo), hi);
}

// One (row, head) of the recurrent step: each of the head's `dim` state rows of n read, decayed, fed the
// input and written back in place while its dot product with C is summed; out[p] = that sum + Dh * x[p].
inline void update_head(float* rows, const float* xh, const float* Bg, const float* Cg, float step, float a,
                        float Dh, int64_t dim, int64_t n, float* out) {
  const Vec decay(std::exp(step * a));
  for (int64_t p = 0; p < dim; ++p) {
    float* row = rows + p * n;
    const Vec inflow(step * xh[p]);
    Vec sum(0.f);
    for (int64_t k = 0; k < n; k += W) {
      const int64_t m = std::min(W, n - k);
      const Vec updated = at::vec::fmadd(Vec::loadu(row + k, m), decay, inflow * Vec::loadu(Bg + k, m));
      updated.store(row + k, m);
      sum = at::vec::fmadd(updated, Vec::loadu(Cg + k, m), sum);  // loadu with a count zero-fills the rest
    }
    out[p] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum) + Dh * xh[p];
  }
}

// x / (1 + exp(-x))
inline Vec silu(const Vec& x) { return x / (Vec(1.f) + x.neg().exp_u20()); }

// The gated RMS norm of one token's `inner` outputs in place: y * silu(gate), normalized per group, times weight.
inline void gated_norm(float* y, const float* gate, const float* weight, int64_t inner, int64_t group_size, float eps) {
  for (int64_t first = 0; first < inner; first += group_size) {
    const int64_t last = first + group_size;
    Vec squares(0.f);
    for (int64_t c = first; c < last; c += W) {
      const int64_t m = std::min(W, last - c);  // loadu with a count zero-fills the rest: h is 0 there
      const Vec h = Vec::loadu(y + c, m) * silu(Vec::loadu(gate + c, m));
      h.store(y + c, m);
      squares = at::vec::fmadd(h, h, squares);
    }
    const float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& z) { return x + z; }, squares);
    const Vec scale(1.f / std::sqrt(sum / group_size + eps));
    for (int64_t c = first; c < last; c += W) {
      const int64_t m = std::min(W, last - c);
      (Vec::loadu(weight + c, m) * (Vec::loadu(y + c, m) * scale)).store(y + c, m);
    }
  }
}

// A Mamba layer's sizes, read from its states, once the fused kernels' arguments are checked: float32,
// in_proj's output with contiguous rows, tap-major conv state and weight, contiguous state rows and vectors.
struct MambaSizes {
  int64_t heads, dim, n, taps, conv_dim, inner, groups, per_group;
};

MambaSizes mamba_sizes(const char* op, const at::Tensor& projected, const at::Tensor& conv_state,
                       const at::Tensor& conv_weight, const c10::optional<at::Tensor>& conv_bias,
                       const at::Tensor& ssm_state, const at::Tensor& A, const at::Tensor& D, const at::Tensor& dt_bias,
                       const at::Tensor& norm_weight, int64_t group_size) {
  MambaSizes z;
  z.heads = ssm_state.size(1), z.dim = ssm_state.size(2), z.n = ssm_state.size(3);
  z.taps = conv_state.size(1), z.conv_dim = conv_state.size(2), z.inner = z.heads * z.dim;
  z.groups = (z.conv_dim - z.inner) / (2 * z.n);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&projected, &conv_state, &conv_weight, &ssm_state,
                                                                      &A, &D, &dt_bias, &norm_weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": float32 only");
  TORCH_CHECK(z.taps >= 1 && projected.size(1) == z.inner + z.conv_dim + z.heads && projected.stride(1) == 1 &&
              conv_state.stride(2) == 1 && conv_state.stride(1) == z.conv_dim && conv_weight.is_contiguous() &&
              conv_weight.size(0) == z.taps + 1 && ssm_state.stride(3) == 1 && ssm_state.stride(2) == z.n &&
              ssm_state.stride(1) == z.dim * z.n && A.is_contiguous() && D.is_contiguous() &&
              dt_bias.is_contiguous() && norm_weight.is_contiguous() && group_size > 0 && z.inner % group_size == 0 &&
              z.groups > 0 && z.heads % z.groups == 0 && (!conv_bias.has_value() || conv_bias->is_contiguous()),
              op, ": in_proj's output, tap-major conv state and weight, contiguous state rows and vectors");
  z.per_group = z.heads / z.groups;
  return z;
}

// One token of a Mamba-2 mixer between its two projections, row b in state slot b: the conv over the last
// `width` inputs (conv_state [slots, width - 1, conv_dim] tap-major, shifted in place) and its SiLU, the
// recurrent step of every head (ssm_state [slots, heads, dim, n], in place), and the gated RMS norm of the
// result with the gate. `projected` [batch, inner + conv_dim + heads] is in_proj's output: gate, conv input
// x|B|C, dt. Each row is one task, start to end in L1.
at::Tensor mamba_step(const at::Tensor& projected, at::Tensor& conv_state, const at::Tensor& conv_weight,
                      const c10::optional<at::Tensor>& conv_bias, at::Tensor& ssm_state, const at::Tensor& A,
                      const at::Tensor& D, const at::Tensor& dt_bias, const at::Tensor& norm_weight, double eps,
                      int64_t group_size, double dt_min, double dt_max) {
  const MambaSizes z = mamba_sizes("mamba_step", projected, conv_state, conv_weight, conv_bias, ssm_state, A, D,
                                    dt_bias, norm_weight, group_size);
  const int64_t batch = projected.size(0), heads = z.heads, dim = z.dim, n = z.n, taps = z.taps;
  const int64_t conv_dim = z.conv_dim, inner = z.inner, groups = z.groups, per_group = z.per_group;
  at::Tensor y = at::empty({batch, inner}, projected.options());
  const float *pp = projected.data_ptr<float>(), *wp = conv_weight.data_ptr<float>(), *ap = A.data_ptr<float>();
  const float *dp = D.data_ptr<float>(), *biasp = dt_bias.data_ptr<float>(), *np = norm_weight.data_ptr<float>();
  const float* cbp = conv_bias.has_value() ? conv_bias->data_ptr<float>() : nullptr;
  float *csp = conv_state.data_ptr<float>(), *ssp = ssm_state.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbc(conv_dim);
    for (int64_t b = begin; b < end; ++b) {
      const float* gate = pp + b * projected.stride(0);
      const float* input = gate + inner;
      float* window = csp + b * conv_state.stride(0);
      for (int64_t c = 0; c < conv_dim; c += W) {  // the conv, W channels at a time
        const int64_t m = std::min(W, conv_dim - c);
        Vec acc(0.f), next = Vec::loadu(window + c, m);
        for (int64_t k = 0; k < taps; ++k) {
          const Vec tap = next;
          next = Vec::loadu((k + 1 < taps ? window + (k + 1) * conv_dim : input) + c, m);
          acc = k == 0 ? tap * Vec::loadu(wp + c, m) : at::vec::fmadd(tap, Vec::loadu(wp + k * conv_dim + c, m), acc);
          next.store(window + k * conv_dim + c, m);  // the window shifts by one
        }
        acc = at::vec::fmadd(next, Vec::loadu(wp + taps * conv_dim + c, m), acc);
        if (cbp) acc = acc + Vec::loadu(cbp + c, m);
        silu(acc).store(xbc.data() + c, m);
      }
      float* out = yp + b * inner;
      const float* dtp = input + conv_dim;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t g = h / per_group;
        update_head(ssp + b * ssm_state.stride(0) + h * ssm_state.stride(1), xbc.data() + h * dim,
                    xbc.data() + inner + g * n, xbc.data() + inner + (groups + g) * n,
                    discretize_dt(dtp[h] + biasp[h], dt_min, dt_max), ap[h], dp[h], dim, n, out + h * dim);
      }
      gated_norm(out, gate, np, inner, group_size, eps);
    }
  });
  return y;
}

// The packed prompts of a prefill (sequence s is tokens [cu[s], cu[s + 1]), from zero states, its final states
// left in slot slots[s]) through a Mamba-2 mixer between its two projections: the conv and its SiLU, the
// recurrence token by token (mamba_step's math), the gated RMS norm. Three parallel loops: the conv over
// tokens, the recurrence over (sequence, head), whose state stays in L1 as [n, dim] so that each token is
// vector multiply-adds over dim, with no sum across a vector; the norm over tokens.
at::Tensor mamba_prefill(const at::Tensor& projected, const at::Tensor& cu_seqlens, const at::Tensor& slots,
                         at::Tensor& conv_state, const at::Tensor& conv_weight,
                         const c10::optional<at::Tensor>& conv_bias,
                         at::Tensor& ssm_state, const at::Tensor& A, const at::Tensor& D, const at::Tensor& dt_bias,
                         const at::Tensor& norm_weight, double eps, int64_t group_size, double dt_min, double dt_max) {
  const MambaSizes z = mamba_sizes("mamba_prefill", projected, conv_state, conv_weight, conv_bias, ssm_state, A, D,
                                    dt_bias, norm_weight, group_size);
  const int64_t total = projected.size(0), nseq = slots.size(0), heads = z.heads, dim = z.dim, n = z.n;
  const int64_t taps = z.taps, conv_dim = z.conv_dim, inner = z.inner, groups = z.groups, per_group = z.per_group;
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
              cu_seqlens.is_contiguous() && slots.is_contiguous() && cu_seqlens.size(0) == nseq + 1,
              "mamba_prefill: int64 cu_seqlens [nseq + 1] and slots [nseq]");
  const int64_t row = projected.stride(0);
  const int64_t *cu = cu_seqlens.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>();
  const float *pp = projected.data_ptr<float>(), *wp = conv_weight.data_ptr<float>(), *ap = A.data_ptr<float>();
  const float *dp = D.data_ptr<float>(), *biasp = dt_bias.data_ptr<float>(), *np = norm_weight.data_ptr<float>();
  const float* cbp = conv_bias.has_value() ? conv_bias->data_ptr<float>() : nullptr;
  float *csp = conv_state.data_ptr<float>(), *ssp = ssm_state.data_ptr<float>();
  at::Tensor xbc = at::empty({total, conv_dim}, projected.options());
  at::Tensor y = at::empty({total, inner}, projected.options());
  float *xp = xbc.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {  // the conv: token t reads its last taps inputs
    for (int64_t t = begin; t < end; ++t) {
      const int64_t start = *(std::upper_bound(cu, cu + nseq + 1, t) - 1);
      for (int64_t c = 0; c < conv_dim; c += W) {
        const int64_t m = std::min(W, conv_dim - c);
        Vec acc(0.f);
        for (int64_t k = 0; k <= taps; ++k) {
          const int64_t source = t - taps + k;
          if (source >= start)
            acc = at::vec::fmadd(Vec::loadu(pp + source * row + inner + c, m), Vec::loadu(wp + k * conv_dim + c, m),
                                 acc);
        }
        if (cbp) acc = acc + Vec::loadu(cbp + c, m);
        silu(acc).store(xp + t * conv_dim + c, m);
      }
    }
  });
  at::parallel_for(0, nseq * heads, 1, [&](int64_t begin, int64_t end) {  // the recurrence
    std::vector<float> state(n * dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / heads, h = i % heads, g = h / per_group;
      const int64_t first = cu[s], last = cu[s + 1];
      if (h == 0) {  // the sequence's last taps inputs, zeros before its start
        float* window = csp + sp[s] * conv_state.stride(0);
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t source = last - taps + k;
          if (source >= first) {
            const float* input = pp + source * row + inner;
            std::copy(input, input + conv_dim, window + k * conv_dim);
          } else {
            std::fill(window + k * conv_dim, window + (k + 1) * conv_dim, 0.f);
          }
        }
      }
      std::fill(state.begin(), state.end(), 0.f);
      for (int64_t t = first; t < last; ++t) {
        const float* xt = xp + t * conv_dim;
        const float *x = xt + h * dim, *B = xt + inner + g * n, *C = xt + inner + (groups + g) * n;
        const float step = discretize_dt(pp[t * row + inner + conv_dim + h] + biasp[h], dt_min, dt_max);
        const Vec decay(std::exp(step * ap[h]));
        float* out = yp + t * inner + h * dim;
        for (int64_t p = 0; p < dim; p += W) {
          const int64_t m = std::min(W, dim - p);
          const Vec xs = Vec::loadu(x + p, m);
          Vec sum = Vec(dp[h]) * xs;
          for (int64_t k = 0; k < n; ++k) {
            float* sk = state.data() + k * dim + p;
            const Vec updated = at::vec::fmadd(Vec::loadu(sk, m), decay, Vec(step * B[k]) * xs);
            updated.store(sk, m);
            sum = at::vec::fmadd(updated, Vec(C[k]), sum);
          }
          sum.store(out + p, m);
        }
      }
      float* final_state = ssp + sp[s] * ssm_state.stride(0) + h * ssm_state.stride(1);  // [dim, n] in the cache
      for (int64_t p = 0; p < dim; ++p)
        for (int64_t k = 0; k < n; ++k) final_state[p * n + k] = state[k * dim + p];
    }
  });
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {  // the gated norm
    for (int64_t t = begin; t < end; ++t) gated_norm(yp + t * inner, pp + t * row, np, inner, group_size, eps);
  });
  return y;
}

TORCH_LIBRARY(NAMESPACE, m) {
  m.def("decode_attention(Tensor q, Tensor(a!) keys, Tensor(b!) values, Tensor positions, float scale, Tensor? k, "
        "Tensor? v) -> Tensor");
  m.def("mamba_step(Tensor projected, Tensor(a!) conv_state, Tensor conv_weight, Tensor? conv_bias, "
        "Tensor(b!) ssm_state, Tensor A, Tensor D, Tensor dt_bias, Tensor norm_weight, float eps, int group_size, "
        "float dt_min, float dt_max) -> Tensor");
  m.def("mamba_prefill(Tensor projected, Tensor cu_seqlens, Tensor slots, Tensor(a!) conv_state, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor(b!) ssm_state, Tensor A, Tensor D, Tensor dt_bias, Tensor norm_weight, float eps, "
        "int group_size, float dt_min, float dt_max) -> Tensor");
}
TORCH_LIBRARY_IMPL(NAMESPACE, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("mamba_step", &mamba_step);
  m.impl("mamba_prefill", &mamba_prefill);
}
"""

NAMESPACE = "rollout_cpu_" + hashlib.sha1(_SOURCE.encode()).hexdigest()[:10]
log = logging.getLogger(__name__)
_built: bool | None = None      # None: not tried yet
STALE_LOCK_SECONDS = 600        # a build takes about 25 s; a lock this old was left by a killed build


def build_directory() -> Path:
    """Where the library is built and cached: one directory per torch and Python version."""
    version = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(get_default_build_root()) / f"{NAMESPACE}-{version}"


def build() -> bool:
    """Compile and load the kernels once per process; False, with a warning, where they cannot be built.

    The library is cached on disk per torch and Python version (``torch.utils.cpp_extension`` rebuilds it
    when the source or flags change), and processes that start together build it once, behind a lock
    file. A process killed while building leaves that lock behind, and every later build would wait on
    it forever: a lock older than ``STALE_LOCK_SECONDS`` is removed first."""
    global _built
    if _built is None:
        flags = ["-O3", "-fopenmp"]
        if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
            flags += ["-mavx2", "-mfma"]
        directory = build_directory()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = directory / "lock"
            if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
                warnings.warn(f"removing {lock}, left by a build that did not finish")
                lock.unlink(missing_ok=True)
            if not any(directory.glob(f"{NAMESPACE}*.so")):
                log.info("building the C++ kernels for the CPU decode step in %s (once, about 25 s)", directory)
            load_inline(NAMESPACE, cpp_sources=_SOURCE.replace("NAMESPACE", NAMESPACE), extra_cflags=flags,
                        extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False)
            torch.library.register_fake(f"{NAMESPACE}::decode_attention")(_fake_attention)
            torch.library.register_fake(f"{NAMESPACE}::mamba_step")(_fake_mamba_step)
            torch.library.register_fake(f"{NAMESPACE}::mamba_prefill")(_fake_mamba_prefill)
            _built = True
        except (RuntimeError, OSError) as error:     # no compiler, no ninja, no writable build directory
            warnings.warn(f"the C++ kernels for the CPU could not be built in {directory}, the references run "
                          f"instead: {error}")
            _built = False
    return _built


def _fake_attention(q: torch.Tensor, *args: Any) -> torch.Tensor:
    return q.new_empty(q.shape)


def _fake_mamba_step(projected: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                     conv_bias: torch.Tensor | None, ssm_state: torch.Tensor, *args: Any) -> torch.Tensor:
    return projected.new_empty(projected.shape[0], ssm_state.shape[1] * ssm_state.shape[2])


def _fake_mamba_prefill(projected: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                        conv_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                        ssm_state: torch.Tensor, *args: Any) -> torch.Tensor:
    return projected.new_empty(projected.shape[0], ssm_state.shape[1] * ssm_state.shape[2])


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return bool(_built) and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def fits_attention(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether ``decode_attention_cpp`` takes these tensors: built, float32 on CPU, keys with contiguous
    positions, a head dim of 8, 16, 24, 32, 64 or 128."""
    return _cpu_float32(q, keys) and keys.stride(2) == 1 and q.shape[-1] in (8, 16, 24, 32, 64, 128)


def fits_mamba_step(projected: torch.Tensor, ssm_state: torch.Tensor) -> bool:
    """Whether ``mamba_step_cpp`` and ``mamba_prefill_cpp`` take these tensors: built, float32 on CPU (the
    rest must then be float32 too), the state's rows contiguous."""
    state_rows = ssm_state.stride(3) == 1 and ssm_state.stride(2) == ssm_state.shape[3]
    return _cpu_float32(projected, ssm_state) and state_rows


def decode_attention_cpp(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                         scale: float, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ kernel (``build()`` first); the arguments and result of ``decode_attention_ref``."""
    return getattr(torch.ops, NAMESPACE).decode_attention(q, keys, values, positions, scale, k, v)


def mamba_step_cpp(projected: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor | None, ssm_state: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                   dt_bias: torch.Tensor, norm_weight: torch.Tensor, *, eps: float, group_size: int,
                   dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """The C++ kernel (``build()`` first); the arguments and result of ``mamba_step_ref``, both states updated
    in place. It needs the conv state and weight contiguous."""
    return getattr(torch.ops, NAMESPACE).mamba_step(projected, conv_state, conv_weight, conv_bias, ssm_state, A, D,
                                                    dt_bias, norm_weight, eps, group_size, *dt_limit)


def mamba_prefill_cpp(projected: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                      conv_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                      ssm_state: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                      norm_weight: torch.Tensor, *, eps: float, group_size: int,
                      dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """The C++ kernel (``build()`` first); the arguments (but ``chunk_size``: it runs the recurrence token by
    token) and result of ``mamba_prefill_ref``, the slots' states written in place."""
    return getattr(torch.ops, NAMESPACE).mamba_prefill(projected, cu_seqlens, slots, conv_state, conv_weight, conv_bias,
                                                       ssm_state, A, D, dt_bias, norm_weight, eps, group_size,
                                                       *dt_limit)


def mamba_prefill_ref(projected: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                      conv_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                      ssm_state: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                      norm_weight: torch.Tensor, *, eps: float, group_size: int,
                      dt_limit: tuple[float, float] = (0.0, float("inf")), chunk_size: int = 64) -> torch.Tensor:
    """Packed prompts from zero states through a Mamba-2 mixer between its two projections: the conv, the
    chunked scan, the gated RMS norm (the references of ``causal_conv1d``, ``ssd_scan`` and
    ``gated_rms_norm``, in turn), each sequence's final states written into its slot.

    projected: [total, inner + conv_dim + heads], in_proj's output for the packed tokens, sequence s being
    rows [cu_seqlens[s], cu_seqlens[s + 1]); slots: [nseq] int64, the state slot of each sequence; the
    other arguments as ``mamba_step_ref``'s. Returns [total, inner], out_proj's input.
    """
    heads, head_dim, n = ssm_state.shape[1:]
    inner, conv_dim, total = heads * head_dim, conv_state.shape[2], projected.shape[0]
    gate, xbc, dt = projected.split([inner, conv_dim, heads], dim=-1)
    xbc, conv_states = causal_conv1d_ref(xbc[None], conv_weight.t(), conv_bias, cu_seqlens=cu_seqlens)
    conv_state[slots] = conv_states.transpose(1, 2).to(conv_state.dtype)
    x, B, C = xbc[0].split([inner, (conv_dim - inner) // 2, (conv_dim - inner) // 2], dim=-1)
    y, states = ssd_scan_ref(x.reshape(1, total, heads, head_dim), dt[None], A, B.reshape(1, total, -1, n),
                             C.reshape(1, total, -1, n), D, dt_bias, chunk_size=chunk_size, dt_limit=dt_limit,
                             cu_seqlens=cu_seqlens)
    ssm_state[slots] = states.to(ssm_state.dtype)
    return gated_rms_norm_ref(y.reshape(total, inner), gate, norm_weight, eps=eps, group_size=group_size)


def mamba_step_ref(projected: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor | None, ssm_state: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                   dt_bias: torch.Tensor, norm_weight: torch.Tensor, *, eps: float, group_size: int,
                   dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """One token per sequence through a Mamba-2 mixer between its two projections, row i in state slot i: the
    conv update, the recurrent step, the gated RMS norm (the references of ``causal_conv1d_update``,
    ``selective_state_update`` and ``gated_rms_norm``, in turn).

    projected: [batch, inner + conv_dim + heads], in_proj's output (gate | conv input x, B, C | dt), inner =
    heads * head_dim and conv_dim = inner + 2 * groups * n; conv_state: [slots, width - 1, conv_dim], tap-major,
    shifted in place; conv_weight: [width, conv_dim], tap-major; conv_bias: [conv_dim] or None; ssm_state:
    [slots, heads, head_dim, n], updated in place; A, D, dt_bias: [heads]; norm_weight: [inner], normalized
    in groups of ``group_size`` channels. Returns [batch, inner], out_proj's input.
    """
    batch = projected.shape[0]
    heads, head_dim, n = ssm_state.shape[1:]
    inner, conv_dim = heads * head_dim, conv_state.shape[2]
    gate, xbc, dt = projected.split([inner, conv_dim, heads], dim=-1)
    xbc = causal_conv1d_update_ref(xbc, conv_state.transpose(1, 2), conv_weight.t(), conv_bias, slot_idx=None)
    x, B, C = xbc.split([inner, (conv_dim - inner) // 2, (conv_dim - inner) // 2], dim=-1)
    y = selective_state_update_ref(ssm_state, x.reshape(batch, heads, head_dim), dt, A, B.reshape(batch, -1, n),
                                   C.reshape(batch, -1, n), D, dt_bias, slot_idx=None, dt_limit=dt_limit)
    return gated_rms_norm_ref(y.reshape(batch, inner), gate, norm_weight, eps=eps, group_size=group_size)
