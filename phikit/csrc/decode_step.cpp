// The decoder blocks of one decoding step (one new token per sequence) in one C++ call, for
// phikit/fused_decode.py.
//
// A small model decodes in a few milliseconds of arithmetic per token, and the eager step spends more
// than that dispatching some 40 PyTorch operators per block from Python (SmolLM2-135M, 30 blocks).
// `Decoder` holds each block's weights once; `step` runs every block for the batch: the same
// operators in the same order as Block.forward (model.py) on the same kernels (qlinear, bf16_linear,
// decode_attention), so the result is the eager step's to the bit; only the Python between them is gone.
//
// Per block, `weights` holds 14 tensors: input_layernorm, post_attention_layernorm, then for qkv_proj,
// o_proj, gate_up_proj, down_proj three each: (weight, -, -) of a float layer or (qweight, scales, mins)
// of a quantized one (empty tensors where there is none); `meta` holds 4 ints per linear layer:
// kind (0 float: at::linear, 1 bf16: phikit's bf16 kernel for <= 8 rows, 2 quantized: qlinear),
// group size, bits, out_features.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& mins, int64_t g, int64_t bits, int64_t out_features);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale,
                               c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w);

namespace {

constexpr int64_t BF16_MAX_ROWS = 8;  // bf16_linear.py MAX_ROWS

struct Linear {
  int64_t kind = 0, group = 0, bits = 0, out = 0;
  torch::Tensor a, b;                // weight, or qweight and scales
  c10::optional<torch::Tensor> mins;

  torch::Tensor operator()(const torch::Tensor& x) const {  // x (B, 1, K) -> (B, 1, N), as the module's forward
    const int64_t rows = x.size(0) * x.size(1);
    if (kind == 2)
      return qlinear(x.reshape({rows, x.size(2)}), a, b, mins, group, bits, out).reshape({x.size(0), x.size(1), out});
    if (kind == 1 && rows <= BF16_MAX_ROWS && x.scalar_type() == at::kBFloat16)
      return bf16_linear(x.reshape({rows, x.size(2)}), a).reshape({x.size(0), x.size(1), out});
    return at::linear(x, a);
  }

  torch::Tensor rows2d(const torch::Tensor& x) const {  // x (M, K) float32 -> (M, N) float32
    return kind == 2 ? qlinear(x, a, b, mins, group, bits, out) : at::linear(x, a);
  }
};

struct Block {
  torch::Tensor ln1, ln2;
  Linear qkv, o, gate_up, down;
};

// RMSNorm of model.py: statistics in float32, back to x's dtype before the weight multiply
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto x32 = x.to(at::kFloat);
  x32 = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps);
  return w * x32.to(x.scalar_type());
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// rope.py apply_rope: x (B, H, 1, D); cos, sin (B, 1, 1, d) (already unsqueezed over heads)
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t d = cos.size(-1);
  if (d == x.size(-1)) return x * cos + rotate_half(x) * sin;
  auto rot = x.narrow(-1, 0, d), pass = x.narrow(-1, d, x.size(-1) - d);
  return at::cat({rot * cos + rotate_half(rot) * sin, pass}, -1);
}

// kv_cache.py quantize: x (..., D) -> int8 codes and float32 scales max|x| / 127
std::pair<torch::Tensor, torch::Tensor> quantize_kv(const torch::Tensor& x) {
  auto amax = x.abs().amax(-1).to(at::kFloat);
  auto scale = amax / 127;
  auto inv = at::where(amax > 0, at::reciprocal(amax) * 127, at::zeros_like(amax));  // Python's 127 / t is this
  auto codes = at::round(x.to(at::kFloat) * inv.unsqueeze(-1)).clamp(-127, 127).to(at::kChar);
  return {codes, scale};
}

// ---- the float32 step: the elementwise work as plain loops. Each is the eager operators' arithmetic, one
// IEEE operation per operator, rounded as they round (no contraction into fused multiply-adds: the pragma),
// and the reductions and transcendentals stay ATen's, so the step's bits equal the eager step's.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// RMSNorm of model.py on (B, C) rows: ATen's mean for the statistics (its summation order), then w * (x * r)
void rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps, torch::Tensor& out) {
  const auto r = at::rsqrt(x.pow(2).mean(-1, true) + eps);  // (B, 1)
  const int64_t B = x.size(0), C = x.size(1);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = r.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < C; ++i) op[b * C + i] = wp[i] * (xp[b * C + i] * rp[b]);
}

// rope.py apply_rope on one head vector in place: the first d of D dims rotated (rotate-half)
inline void rope_inplace(float* v, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = v[i], x2 = v[i + h];
    v[i] = x1 * cos[i] + -x2 * sin[i];  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
    v[i + h] = x2 * cos[i + h] + x1 * sin[i + h];
  }
}

// one key or value vector (D floats) into cache slot dst: as it is, rounded to bf16, or as int8 codes and a scale
inline void store_kv(const float* src, int64_t D, const torch::Tensor& cache, const torch::Tensor& scales, int64_t b,
                     int64_t h, int64_t p) {
  const int64_t off = b * cache.stride(0) + h * cache.stride(1) + p * cache.stride(2);
  switch (cache.scalar_type()) {
    case at::kFloat: std::copy(src, src + D, cache.data_ptr<float>() + off); break;
    case at::kBFloat16: {
      auto* dst = cache.data_ptr<at::BFloat16>() + off;
      for (int64_t i = 0; i < D; ++i) dst[i] = at::BFloat16(src[i]);
      break;
    }
    default: {  // int8: kv_cache.py quantize
      float amax = 0.f;
      for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::abs(src[i]));
      const float inv = amax > 0.f ? (1.f / amax) * 127.f : 0.f;  // as Python's 127 / amax: reciprocal, times 127
      auto* dst = cache.data_ptr<int8_t>() + off;
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<int8_t>(std::clamp(std::nearbyint(src[i] * inv), -127.f, 127.f));
      scales.data_ptr<float>()[b * scales.stride(0) + h * scales.stride(1) + p * scales.stride(2)] = amax / 127.f;
    }
  }
}

#pragma GCC pop_options

}  // namespace

class Decoder {
 public:
  Decoder(std::vector<torch::Tensor> weights, std::vector<int64_t> meta, int64_t n_heads, int64_t n_kv_heads,
          int64_t head_dim, double eps)
      : H_(n_heads), Hkv_(n_kv_heads), D_(head_dim), eps_(eps) {
    TORCH_CHECK(weights.size() % 14 == 0 && meta.size() == weights.size() / 14 * 16,
                "Decoder: 14 tensors and 16 ints per block");
    for (size_t i = 0; i < weights.size() / 14; ++i) {
      const torch::Tensor* w = &weights[14 * i];
      const int64_t* m = &meta[16 * i];
      Block blk;
      blk.ln1 = w[0];
      blk.ln2 = w[1];
      Linear* lins[4] = {&blk.qkv, &blk.o, &blk.gate_up, &blk.down};
      for (int j = 0; j < 4; ++j) {
        Linear& l = *lins[j];
        l.kind = m[4 * j], l.group = m[4 * j + 1], l.bits = m[4 * j + 2], l.out = m[4 * j + 3];
        l.a = w[2 + 3 * j], l.b = w[3 + 3 * j];
        if (w[4 + 3 * j].numel() > 0) l.mins = w[4 + 3 * j];
        TORCH_CHECK(l.kind >= 0 && l.kind <= 2 && l.a.numel() > 0 && (l.kind != 2 || l.b.numel() > 0),
                    "Decoder: bad linear layer spec");
      }
      const int64_t C = blk.ln1.numel();  // what the loops of step_f32 index by
      TORCH_CHECK(blk.ln2.numel() == C && blk.qkv.out == (H_ + 2 * Hkv_) * D_ && blk.o.out == C &&
                      blk.down.out == C && blk.gate_up.out % 2 == 0,
                  "Decoder: block ", i, " has shapes that do not fit its heads");
      for (const Linear* l : lins) fast_ = fast_ && (l->kind == 2 || (l->kind == 0 && l->a.scalar_type() == at::kFloat));
      fast_ = fast_ && blk.ln1.scalar_type() == at::kFloat && blk.ln2.scalar_type() == at::kFloat;
      blocks_.push_back(std::move(blk));
    }
  }

  // x (B, 1, C) after the embedding; cos, sin (B, 1, d) in x's dtype; pos (B, 1) positions; mask (B, S) bool
  // over the first S cache slots; caches: k, v (and k_scale, v_scale for an int8 cache, else empty) of
  // every block, (B_max, Hkv, max_len, D) (empty tensors for the scales of a float cache). Writes this step's keys and values; returns x after the last block.
  torch::Tensor step(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& pos,
                     const torch::Tensor& mask, const std::vector<torch::Tensor>& caches) {
    TORCH_CHECK(caches.size() == 4 * blocks_.size(), "Decoder.step: 4 cache tensors per block");
    at::NoGradGuard no_grad;
    const int64_t B = x.size(0), T = x.size(1), S = mask.size(1);
    TORCH_CHECK(T == 1 && pos.dim() == 2 && pos.size(0) == B && pos.size(1) == 1 && mask.size(0) == B &&
                    pos.scalar_type() == at::kLong && mask.scalar_type() == at::kBool,
                "Decoder.step: one token per row");
    const int64_t last = pos.max().item<int64_t>();
    TORCH_CHECK(pos.min().item<int64_t>() >= 0, "Decoder.step: negative position");
    // the raw writes below stay inside every cache; a cache is its rows, contiguous, or one row shared by every
    // row of the step (stride 0: speculate.py verifies k drafted tokens as k + 1 rows of one sequence)
    auto rows_ok = [](const torch::Tensor& t) { return t.is_contiguous() || (t.stride(0) == 0 && t[0].is_contiguous()); };
    for (size_t i = 0; i < caches.size(); i += 4) {
      const auto &kc = caches[i], &vc = caches[i + 1];
      TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(0) >= B && kc.size(1) == Hkv_ &&
                      kc.size(2) >= S && kc.size(2) > last && kc.size(3) == D_ && rows_ok(kc) && rows_ok(vc) &&
                      kc.scalar_type() == vc.scalar_type(),
                  "Decoder.step: cache ", i / 4, " does not fit this step");
      if (kc.scalar_type() == at::kChar)
        TORCH_CHECK(caches[i + 2].dim() == 3 && caches[i + 3].dim() == 3 && caches[i + 2].sizes() == kc.sizes().slice(0, 3) &&
                        caches[i + 3].sizes() == kc.sizes().slice(0, 3) && rows_ok(caches[i + 2]) && rows_ok(caches[i + 3]),
                    "Decoder.step: int8 cache ", i / 4, " needs its scales");
    }
    const auto ct = caches[0].scalar_type();
    if (fast_ && x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
        (ct == at::kFloat || ct == at::kBFloat16 || ct == at::kChar))
      return step_f32(x, cos, sin, pos, mask, caches);
    const auto c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // (B, 1, 1, d): over heads
    const auto rows = at::arange(B, pos.options()).unsqueeze(1);  // (B, 1)
    const double scale = 1.0 / std::sqrt(static_cast<double>(D_));
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& blk = blocks_[i];
      const auto &kc = caches[4 * i], &vc = caches[4 * i + 1], &ksc = caches[4 * i + 2], &vsc = caches[4 * i + 3];
      // attention (model.py Attention.forward, T = 1)
      auto qkv = blk.qkv(rms_norm(x, blk.ln1, eps_));
      auto parts = qkv.split({H_ * D_, Hkv_ * D_, Hkv_ * D_}, -1);
      auto q = apply_rope(parts[0].view({B, T, H_, D_}).transpose(1, 2), c, s);      // (B, H, 1, D)
      auto k = apply_rope(parts[1].view({B, T, Hkv_, D_}).transpose(1, 2), c, s);    // (B, Hkv, 1, D)
      auto v = parts[2].view({B, T, Hkv_, D_}).transpose(1, 2);
      // [rows, :, pos]: kv_cache.py write; a shared row (stride 0) is written through its one real row
      const bool shared = kc.stride(0) == 0;
      auto real = [&](const torch::Tensor& t) { return shared ? t[0].unsqueeze(0) : t; };
      c10::List<c10::optional<at::Tensor>> index;
      index.push_back(shared ? at::zeros_like(rows) : rows);
      index.push_back(c10::nullopt);
      index.push_back(pos);
      c10::optional<torch::Tensor> k_scale, v_scale;
      if (ksc.numel() > 0) {
        auto [kq, ks] = quantize_kv(k.transpose(1, 2));
        auto [vq, vs] = quantize_kv(v.transpose(1, 2));
        real(kc).index_put_(index, kq);
        real(ksc).index_put_(index, ks);
        real(vc).index_put_(index, vq);
        real(vsc).index_put_(index, vs);
        k_scale = ksc.narrow(0, 0, B).narrow(2, 0, S);
        v_scale = vsc.narrow(0, 0, B).narrow(2, 0, S);
      } else {
        real(kc).index_put_(index, k.transpose(1, 2));
        real(vc).index_put_(index, v.transpose(1, 2));
      }
      auto y = decode_attention(q.reshape({B, H_, D_}).to(at::kFloat).contiguous(), kc.narrow(0, 0, B).narrow(2, 0, S),
                                vc.narrow(0, 0, B).narrow(2, 0, S), mask, scale, k_scale, v_scale)
                   .to(q.scalar_type())
                   .view({B, H_, 1, D_});
      x = x + blk.o(y.transpose(1, 2).reshape({B, T, H_ * D_}));
      // MLP (SwiGLU)
      auto gu = blk.gate_up(rms_norm(x, blk.ln2, eps_)).chunk(2, -1);
      x = x + blk.down(gu[1] * at::silu(gu[0]));
    }
    return x;
  }

  // step() for float32 activations and weights of kinds 0 and 2: the operators between the matmuls as loops
  torch::Tensor step_f32(const torch::Tensor& x_in, const torch::Tensor& cos, const torch::Tensor& sin,
                         const torch::Tensor& pos, const torch::Tensor& mask, const std::vector<torch::Tensor>& caches) {
    const int64_t B = x_in.size(0), C = x_in.size(2), S = mask.size(1), d = cos.size(-1);
    const int64_t Nq = H_ * D_, Nqkv = (H_ + 2 * Hkv_) * D_;
    auto x = x_in.reshape({B, C}).clone();  // the residual stream, updated in place
    auto h = at::empty({B, C}, x.options());
    auto q = at::empty({B, H_, D_}, x.options());
    const auto cs = cos.reshape({B, d}).contiguous(), sn = sin.reshape({B, d}).contiguous();
    const auto ps = pos.reshape({B}).to(at::kLong).contiguous();
    const int64_t* pp = ps.data_ptr<int64_t>();
    float* xp = x.data_ptr<float>();
    const double scale = 1.0 / std::sqrt(static_cast<double>(D_));
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& blk = blocks_[i];
      const auto &kc = caches[4 * i], &vc = caches[4 * i + 1], &ksc = caches[4 * i + 2], &vsc = caches[4 * i + 3];
      rms_norm_rows(x, blk.ln1, eps_, h);
      auto qkv = blk.qkv.rows2d(h).contiguous();  // (B, (H + 2 Hkv) D)
      float* qkvp = qkv.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkvp + b * Nqkv;
        const float *cb = cs.data_ptr<float>() + b * d, *sb = sn.data_ptr<float>() + b * d;
        for (int64_t hd = 0; hd < H_; ++hd) rope_inplace(row + hd * D_, cb, sb, d);
        std::copy(row, row + Nq, q.data_ptr<float>() + b * Nq);
        for (int64_t hd = 0; hd < Hkv_; ++hd) {
          float* kv = row + Nq + hd * D_;
          rope_inplace(kv, cb, sb, d);
          store_kv(kv, D_, kc, ksc, b, hd, pp[b]);
          store_kv(row + Nq + (Hkv_ + hd) * D_, D_, vc, vsc, b, hd, pp[b]);
        }
      }
      c10::optional<torch::Tensor> k_scale, v_scale;
      if (ksc.numel() > 0) k_scale = ksc.narrow(0, 0, B).narrow(2, 0, S), v_scale = vsc.narrow(0, 0, B).narrow(2, 0, S);
      auto y = decode_attention(q, kc.narrow(0, 0, B).narrow(2, 0, S), vc.narrow(0, 0, B).narrow(2, 0, S), mask, scale,
                                k_scale, v_scale);
      auto o = blk.o.rows2d(y.view({B, Nq})).contiguous();
      const float* op = o.data_ptr<float>();
      for (int64_t j = 0; j < B * C; ++j) xp[j] += op[j];
      rms_norm_rows(x, blk.ln2, eps_, h);
      auto gu = blk.gate_up.rows2d(h).contiguous();  // (B, 2F): [gate | up]
      const int64_t F = gu.size(1) / 2;
      auto act = at::silu(gu.narrow(1, 0, F)).contiguous();  // (B, F), then times up in place
      const float* up = gu.data_ptr<float>() + F;
      float* ap = act.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < F; ++j) ap[b * F + j] = up[b * 2 * F + j] * ap[b * F + j];
      auto dn = blk.down.rows2d(act).contiguous();
      const float* dp = dn.data_ptr<float>();
      for (int64_t j = 0; j < B * C; ++j) xp[j] += dp[j];
    }
    return x.view({B, 1, C});
  }

 private:
  int64_t H_, Hkv_, D_;
  double eps_;
  bool fast_ = true;  // every weight float32 or quantized: step_f32 applies to float32 activations
  std::vector<Block> blocks_;
};

void register_decoder(pybind11::module& m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t, double>())
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
