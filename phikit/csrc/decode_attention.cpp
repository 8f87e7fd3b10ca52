// Attention of one new query per sequence over the KV cache (decoding), for phikit/model.py.
//
//   q     (B, H, D)        float32, contiguous
//   k, v  (B, Hkv, S, D)   the cache's first S slots: float32 / bfloat16 / float16 / int8, any strides
//                          except the last dimension (contiguous), as a slice of the static cache is
//   k_scale, v_scale (B, Hkv, S)  float32, for an int8 cache only: slot s holds k[s] * k_scale[s]
//   mask  (B, S)           bool: key slot j visible to row b
//   out   (B, H, D)        float32: softmax(q k^T * scale + mask) v, each KV head serving H / Hkv
//                          neighbouring query heads (grouped-query attention)
//
// A strided slice of the cache makes PyTorch's bf16 batched matmul copy it first (4-6x slower than
// reading it, measured); this reads each key and value row once, in place, and accumulates in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PHIKIT_X86 1
#endif

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// scores of one query (masked slots ignored; mx their maximum) -> probabilities, in place
void softmax_in_place(float* sc, const bool* mask, int64_t S, float mx) {
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    sc[s] = mask[s] ? std::exp(sc[s] - mx) : 0.f;
    sum += sc[s];
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t s = 0; s < S; ++s) sc[s] *= inv;
}

// One KV head of one sequence: its G query heads q (G, D) -> out (G, D). Key/value slot s is row s of
// k/v (strides ks, vs); with an int8 cache, ksc[s] / vsc[s] are the slots' scales (else null).
template <typename T>
void attend_row(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, const float* ksc, const float* vsc,
                const bool* mask, int64_t S, int64_t D, int G, float scale, float* out, float* scores) {
  for (int gq = 0; gq < G; ++gq) {
    const float* qq = q + gq * D;
    float* sc = scores + gq * S;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[s]) { sc[s] = -std::numeric_limits<float>::infinity(); continue; }
      const T* kr = k + s * ks;
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += qq[d] * to_float(kr[d]);
      sc[s] = acc * (ksc ? ksc[s] * scale : scale);
      mx = std::max(mx, sc[s]);
    }
    softmax_in_place(sc, mask, S, mx);
  }
  for (int gq = 0; gq < G; ++gq)
    for (int64_t d = 0; d < D; ++d) out[gq * D + d] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    const T* vr = v + s * vs;
    for (int gq = 0; gq < G; ++gq) {
      const float p = scores[gq * S + s] * (vsc ? vsc[s] : 1.f);
      float* o = out + gq * D;
      for (int64_t d = 0; d < D; ++d) o[d] += p * to_float(vr[d]);
    }
  }
}

#ifdef PHIKIT_X86
#define PHIKIT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

PHIKIT_TARGET inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

PHIKIT_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

PHIKIT_TARGET inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// float32, bf16 or int8 cache, D a multiple of 16: the same computation with 16-wide float32 vectors
template <typename T>
PHIKIT_TARGET void attend_row_avx512(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, const float* ksc,
                                     const float* vsc, const bool* mask, int64_t S, int64_t D, int G, float scale,
                                     float* out, float* scores) {
  for (int gq = 0; gq < G; ++gq) {
    const float* qq = q + gq * D;
    float* sc = scores + gq * S;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[s]) { sc[s] = -std::numeric_limits<float>::infinity(); continue; }
      const T* kr = k + s * ks;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qq + d), load16(kr + d), acc);
      sc[s] = _mm512_reduce_add_ps(acc) * (ksc ? ksc[s] * scale : scale);
      mx = std::max(mx, sc[s]);
    }
    softmax_in_place(sc, mask, S, mx);
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    const T* vr = v + s * vs;
    for (int gq = 0; gq < G; ++gq) {
      const __m512 p = _mm512_set1_ps(scores[gq * S + s] * (vsc ? vsc[s] : 1.f));
      float* o = out + gq * D;
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(o + d, _mm512_fmadd_ps(p, load16(vr + d), _mm512_loadu_ps(o + d)));
    }
  }
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
#endif

}  // namespace

// k_scale, v_scale (B, Hkv, S) float32, last dimension contiguous: given iff the cache is int8
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale,
                               c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(q.dim() == 3 && q.dtype() == torch::kFloat32 && q.is_contiguous(), "q: contiguous float32 (B, H, D)");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.dtype() == v.dtype(),
              "k, v: (B, Hkv, S, D) of one dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v: the last dimension must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % Hkv == 0, "q and k/v shapes do not match");
  TORCH_CHECK(mask.dtype() == torch::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S &&
              mask.is_contiguous(), "mask: contiguous bool (B, S)");
  const bool int8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs k_scale and v_scale (others none)");
  if (int8)
    for (const auto* t : {&*k_scale, &*v_scale})
      TORCH_CHECK(t->dtype() == torch::kFloat32 && t->dim() == 3 && t->size(0) == B && t->size(1) == Hkv &&
                  t->size(2) == S && t->stride(2) == 1, "k_scale, v_scale: float32 (B, Hkv, S), last dimension contiguous");
  const int G = static_cast<int>(H / Hkv);
  auto out = torch::empty({B, H, D}, torch::kFloat32);
  const float sc = static_cast<float>(scale);
  const float* qp = q.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* kp = static_cast<const T*>(k.data_ptr());
    const T* vp = static_cast<const T*>(v.data_ptr());
    at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(static_cast<size_t>(G * S));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv;
        int64_t Sb = S;  // slots past the row's last visible one are not looked at (nor their mask)
        while (Sb > 0 && !mp[b * S + Sb - 1]) --Sb;
        const T* kb = kp + b * k.stride(0) + h * k.stride(1);
        const T* vb = vp + b * v.stride(0) + h * v.stride(1);
        const float* ksc = int8 ? k_scale->data_ptr<float>() + b * k_scale->stride(0) + h * k_scale->stride(1) : nullptr;
        const float* vsc = int8 ? v_scale->data_ptr<float>() + b * v_scale->stride(0) + h * v_scale->stride(1) : nullptr;
        const float* qb = qp + (b * H + h * G) * D;
        float* ob = op + (b * H + h * G) * D;
#ifdef PHIKIT_X86
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, int8_t>) {
          if (has_avx512() && D % 16 == 0) {
            attend_row_avx512<T>(qb, kb, vb, k.stride(2), v.stride(2), ksc, vsc, mp + b * S, Sb, D, G, sc, ob,
                                 scores.data());
            continue;
          }
        }
#endif
        attend_row<T>(qb, kb, vb, k.stride(2), v.stride(2), ksc, vsc, mp + b * S, Sb, D, G, sc, ob, scores.data());
      }
    });
  };
  switch (k.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    case at::kChar: run(int8_t{}); break;
    default: TORCH_CHECK(false, "k, v: float32, bfloat16, float16 or int8");
  }
  return out;
}
