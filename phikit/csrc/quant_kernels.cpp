// phikit's CPU kernels for 4- and 8-bit weights x 8-bit activations (W4A8, W8A8), compiled on first
// use by phikit/kernels.py (torch.utils.cpp_extension). Python owns the format; see phikit/quantize.py.
//
// Weights, for N output rows (padded to a multiple of 16) and K inputs, in tiles of 16 rows:
//   4 bits: qweight uint8 [N/16, K/8 * 64]: in tile t and k-octet o, byte 4c+i holds the code of
//           row 16t+c at input 8o+i in its low nibble and at input 8o+4+i in its high nibble.
//   8 bits: qweight int8 [N/16, K/4 * 64]: in tile t and k-quad j, byte 4c+i holds row 16t+c, input 4j+i.
//   scales fp16 [N/16, K/g, 16] and, for asymmetric 4 bits, mins fp16 [N/16, K/g, 16]:
//           w = q * scale + min with q in 0..15; symmetric: min = -8 * scale; 8 bits: w = q * scale.
// Activations are quantized per row in blocks of g (the weight group size): xq int8 with one
// float scale per block (xq = round(x / s), s = max|x| / 127) and the block's sum of codes.
// Then   y[m, n] = sum_b  s_x[m,b] * (scale[n,b] * sum_{k in b} q[n,k] xq[m,k] + min[n,b] * xsum[m,b]),
// accumulated in float per block, in this order, by both the AVX512-VNNI path and the portable path.
// (VPDPBUSD multiplies unsigned by signed bytes: symmetric codes enter as q + 8 (4 bits) or q + 128
// (8 bits), and the accumulator starts at -8 or -128 times the activation codes' sum.)
//
// The layout puts 16 output rows x 4 inputs in one 64-byte vector (after unpacking nibbles), the
// operand VPDPBUSD multiplies with 4 broadcast activation bytes: an outer-product kernel that keeps
// MR x 16*NV accumulators in registers (MR rows of activations; MR = 1 when decoding).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PHIKIT_X86 1
#endif

namespace {

constexpr int MR_MAX = 6;
// Decoding reads the weights as one sequential stream per thread (one 16-row tile after the next) and
// prefetches 6 KB ahead: on Zen 4 that reads 37 GB/s on one core where four interleaved tile streams
// with a 1 KB prefetch read 30 (3.8B shapes, int4 g32).
constexpr int PREFETCH = 6144;

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// ---- activation quantization -------------------------------------------------------------------

void quantize_block(const float* x, int g, int8_t* q, float* scale, int32_t* sum) {
  float amax = 0.f;
  for (int i = 0; i < g; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t acc = 0;
  for (int i = 0; i < g; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inv));  // round half to even, as cvtps2dq
    q[i] = static_cast<int8_t>(std::min(127, std::max(-127, v)));
    acc += q[i];
  }
  *scale = s;
  *sum = acc;
}

// ---- portable kernel (any CPU): the same arithmetic, one output at a time -----------------------

// code of row c at input k, relative to the tile's weights (bits 4: nibbles; bits 8: int8 stored as is)
template <int BITS>
inline int code_at(const uint8_t* w, int c, int64_t k) {
  if (BITS == 8) return static_cast<int8_t>(w[(k / 4) * 64 + 4 * c + (k % 4)]) + 128;
  const uint8_t byte = w[(k / 8) * 64 + 4 * c + (k % 4)];
  return (k % 8) < 4 ? (byte & 15) : (byte >> 4);
}

template <bool SYM, int BITS>
void tile_ref(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t ldx, int64_t nb, int g,
              const uint8_t* wq, const uint16_t* sc, const uint16_t* mn, float* y, int64_t ldy, int mr, int nt) {
  constexpr int OFFSET = BITS == 8 ? 128 : 8;  // codes are unsigned: q = w / scale + OFFSET
  for (int v = 0; v < nt; ++v) {
    const uint8_t* w = wq + v * (nb * g * BITS * 2);
    const uint16_t* s = sc + v * (nb * 16);
    const uint16_t* z = SYM ? nullptr : mn + v * (nb * 16);
    for (int m = 0; m < mr; ++m) {
      for (int c = 0; c < 16; ++c) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          int32_t dot = SYM ? -OFFSET * xsum[m * nb + b] : 0;
          for (int64_t k = b * g; k < (b + 1) * g; ++k) dot += code_at<BITS>(w, c, k) * xq[m * ldx + k];
          const float sx = xs[m * nb + b];
          acc = std::fma(static_cast<float>(dot), half_to_float(s[b * 16 + c]) * sx, acc);
          if (!SYM) acc = std::fma(half_to_float(z[b * 16 + c]), sx * static_cast<float>(xsum[m * nb + b]), acc);
        }
        y[m * ldy + 16 * v + c] = acc;
      }
    }
  }
}

// ---- AVX512-VNNI kernel --------------------------------------------------------------------------

#ifdef PHIKIT_X86
#define PHIKIT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

PHIKIT_TARGET void quantize_row_avx512(const float* x, int64_t K, int g, int8_t* q, float* s, int32_t* sums) {
  for (int64_t b = 0; b < K / g; ++b) {
    const float* xb = x + b * g;
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < g; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
    const float a = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
    __m512i acc = _mm512_setzero_si512();
    for (int i = 0; i < g; i += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv));  // round to nearest even
      v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      acc = _mm512_add_epi32(acc, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * g + i), _mm512_cvtepi32_epi8(v));
    }
    s[b] = a / 127.f;
    sums[b] = _mm512_reduce_add_epi32(acc);
  }
}

template <int MR, int NV, bool SYM, int BITS>
PHIKIT_TARGET void tile_vnni(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t ldx, int64_t nb, int g,
                             const uint8_t* wq, const uint16_t* sc, const uint16_t* mn, float* y, int64_t ldy) {
  constexpr int OFFSET = BITS == 8 ? 128 : 8;
  const int64_t wstride = nb * g * BITS * 2, sstride = nb * 16;
  const __m512i low4 = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 facc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) facc[m][v] = _mm512_setzero_ps();
  // decoding 4-bit weights (SPLIT): the high nibbles are multiplied in place, as 16 * q (raw & 0xF0),
  // into their own accumulator, divided by 16 (exactly: a shift) once per group. One instruction less
  // per 64 bytes, and two independent VPDPBUSD chains instead of one.
  constexpr bool SPLIT = MR == 1 && BITS == 4;
  const __m512i high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[MR][NV], iacc16[NV];
    for (int m = 0; m < MR; ++m) {
      const __m512i init = SYM ? _mm512_set1_epi32(-OFFSET * xsum[m * nb + b]) : _mm512_setzero_si512();
      for (int v = 0; v < NV; ++v) iacc[m][v] = init;
    }
    for (int v = 0; v < NV; ++v) iacc16[v] = _mm512_setzero_si512();
    const uint8_t* wb = wq + b * g * BITS * 2;
    const int8_t* xb = xq + b * g;
    for (int o = 0; o < g / 8; ++o) {
      __m512i lo[NV], hi[NV];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* at = wb + v * wstride + o * 8 * BITS * 2;
        // decoding is memory-bound: ask for the weights PREFETCH bytes ahead (non-temporal: read once a token)
        if (MR == 1) {
          _mm_prefetch(reinterpret_cast<const char*>(at + PREFETCH), _MM_HINT_NTA);
          if (BITS == 8) _mm_prefetch(reinterpret_cast<const char*>(at + PREFETCH + 64), _MM_HINT_NTA);
        }
        if (BITS == 8) {  // two k-quads of int8; flipping the sign bit gives q + 128 as unsigned bytes
          lo[v] = _mm512_xor_si512(_mm512_loadu_si512(at), sign);
          hi[v] = _mm512_xor_si512(_mm512_loadu_si512(at + 64), sign);
        } else {
          const __m512i raw = _mm512_loadu_si512(at);
          lo[v] = _mm512_and_si512(raw, low4);
          hi[v] = SPLIT ? _mm512_and_si512(raw, high4) : _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        }
      }
      for (int m = 0; m < MR; ++m) {
        int32_t a0, a1;
        std::memcpy(&a0, xb + m * ldx + 8 * o, 4);
        std::memcpy(&a1, xb + m * ldx + 8 * o + 4, 4);
        const __m512i b0 = _mm512_set1_epi32(a0), b1 = _mm512_set1_epi32(a1);
        for (int v = 0; v < NV; ++v) {
          iacc[m][v] = _mm512_dpbusd_epi32(iacc[m][v], lo[v], b0);
          if (SPLIT) iacc16[v] = _mm512_dpbusd_epi32(iacc16[v], hi[v], b1);
          else iacc[m][v] = _mm512_dpbusd_epi32(iacc[m][v], hi[v], b1);
        }
      }
    }
    if (SPLIT)
      for (int v = 0; v < NV; ++v) iacc[0][v] = _mm512_add_epi32(iacc[0][v], _mm512_srai_epi32(iacc16[v], 4));
    __m512 s[NV], z[NV];
    for (int v = 0; v < NV; ++v) {
      s[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + v * sstride + b * 16)));
      if (!SYM) z[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + v * sstride + b * 16)));
    }
    for (int m = 0; m < MR; ++m) {
      const float sxf = xs[m * nb + b];
      const __m512 sx = _mm512_set1_ps(sxf);
      for (int v = 0; v < NV; ++v) {
        facc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m][v]), _mm512_mul_ps(s[v], sx), facc[m][v]);
        if (!SYM) facc[m][v] = _mm512_fmadd_ps(z[v], _mm512_set1_ps(sxf * static_cast<float>(xsum[m * nb + b])), facc[m][v]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + m * ldy + 16 * v, facc[m][v]);
}

template <int NV, bool SYM, int BITS>
void rows_vnni(int mr, const int8_t* xq, const float* xs, const int32_t* xsum, int64_t ldx, int64_t nb, int g,
               const uint8_t* wq, const uint16_t* sc, const uint16_t* mn, float* y, int64_t ldy) {
  switch (mr) {
    case 1: return tile_vnni<1, NV, SYM, BITS>(xq, xs, xsum, ldx, nb, g, wq, sc, mn, y, ldy);
    case 2: return tile_vnni<2, NV, SYM, BITS>(xq, xs, xsum, ldx, nb, g, wq, sc, mn, y, ldy);
    case 3: return tile_vnni<3, NV, SYM, BITS>(xq, xs, xsum, ldx, nb, g, wq, sc, mn, y, ldy);
    case 4: return tile_vnni<4, NV, SYM, BITS>(xq, xs, xsum, ldx, nb, g, wq, sc, mn, y, ldy);
    case 5: return tile_vnni<5, NV, SYM, BITS>(xq, xs, xsum, ldx, nb, g, wq, sc, mn, y, ldy);
    default: return tile_vnni<6, NV, SYM, BITS>(xq, xs, xsum, ldx, nb, g, wq, sc, mn, y, ldy);
  }
}

bool has_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}
#else
bool has_vnni() { return false; }
#endif

void check_inputs(const torch::Tensor& xq, const torch::Tensor& xs, const torch::Tensor& xsum, const torch::Tensor& qweight,
                  const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins, int64_t g, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(xq.dtype() == torch::kInt8 && xq.dim() == 2 && xq.is_contiguous(), "xq: contiguous int8 [M, K]");
  const int64_t M = xq.size(0), K = xq.size(1);
  TORCH_CHECK(g % 16 == 0 && K % g == 0, "group size must be a multiple of 16 dividing K");
  TORCH_CHECK(xs.dtype() == torch::kFloat32 && xs.is_contiguous() && xs.numel() == M * (K / g), "xs: float32 [M, K/g]");
  TORCH_CHECK(xsum.dtype() == torch::kInt32 && xsum.is_contiguous() && xsum.numel() == M * (K / g), "xsum: int32 [M, K/g]");
  TORCH_CHECK(qweight.dtype() == (bits == 4 ? torch::kUInt8 : torch::kInt8) && qweight.is_contiguous() &&
              qweight.dim() == 2 && qweight.size(1) == K * bits * 2,
              "qweight: contiguous [N/16, K*8] uint8 (4 bits) or [N/16, K*16] int8 (8 bits)");
  const int64_t T = qweight.size(0);
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() && scales.numel() == T * (K / g) * 16,
              "scales: contiguous float16 [N/16, K/g, 16]");
  TORCH_CHECK(!mins || bits == 4, "8-bit weights are symmetric (no mins)");
  if (mins) TORCH_CHECK(mins->dtype() == torch::kFloat16 && mins->is_contiguous() && mins->numel() == scales.numel(),
                        "mins: like scales");
}

template <bool SYM, int BITS>
void matmul_tiles(int64_t M, int64_t K, int64_t T, int g, const int8_t* xp, const float* sxp, const int32_t* sump,
                  const uint8_t* wp, const uint16_t* sp, const uint16_t* zp, float* yp, bool vnni) {
  const int64_t nb = K / g, wstride = K * BITS * 2, sstride = nb * 16, ldy = T * 16;
  const int nv = M == 1 ? 1 : 2;  // output tiles per step: decoding streams one, prefill reuses 2 over MR rows
  const int64_t steps = (T + nv - 1) / nv;
  at::parallel_for(0, steps, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t st = s0; st < s1; ++st) {
      const int64_t t0 = st * nv;
      const int tiles = static_cast<int>(std::min<int64_t>(nv, T - t0));
      for (int64_t m0 = 0; m0 < M; m0 += MR_MAX) {
        const int mr = static_cast<int>(std::min<int64_t>(MR_MAX, M - m0));
        const int8_t* x = xp + m0 * K;
        const float* sx = sxp + m0 * nb;
        const int32_t* su = sump + m0 * nb;
        float* yo = yp + m0 * ldy + t0 * 16;
        const uint8_t* w = wp + t0 * wstride;
        const uint16_t* s = sp + t0 * sstride;
        const uint16_t* z = SYM ? nullptr : zp + t0 * sstride;
        if (!vnni) {
          tile_ref<SYM, BITS>(x, sx, su, K, nb, g, w, s, z, yo, ldy, mr, tiles);
          continue;
        }
#ifdef PHIKIT_X86
        if (tiles == 2) {
          rows_vnni<2, SYM, BITS>(mr, x, sx, su, K, nb, g, w, s, z, yo, ldy);
        } else {
          for (int v = 0; v < tiles; ++v)
            rows_vnni<1, SYM, BITS>(mr, x, sx, su, K, nb, g, w + v * wstride, s + v * sstride,
                                    SYM ? nullptr : z + v * sstride, yo + 16 * v, ldy);
        }
#endif
      }
    }
  });
}

}  // namespace

// x float32 [M, K] -> (xq int8 [M, K], scale float32 [M, K/g], code sum int32 [M, K/g])
std::vector<torch::Tensor> quantize_activations(torch::Tensor x, int64_t g, bool portable) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(g % 16 == 0 && K % g == 0, "group size must be a multiple of 16 dividing K");
  auto q = torch::empty({M, K}, torch::kInt8);
  auto s = torch::empty({M, K / g}, torch::kFloat32);
  auto sums = torch::empty({M, K / g}, torch::kInt32);
#ifdef PHIKIT_X86
  if (has_vnni() && !portable) {
    const float* xp = x.data_ptr<float>();
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = s.data_ptr<float>();
    int32_t* up = sums.data_ptr<int32_t>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        quantize_row_avx512(xp + m * K, K, static_cast<int>(g), qp + m * K, sp + m * (K / g), up + m * (K / g));
    });
    return {q, s, sums};
  }
#endif
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  int32_t* up = sums.data_ptr<int32_t>();
  const int64_t nb = K / g;
  at::parallel_for(0, M * nb, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) quantize_block(xp + i * g, static_cast<int>(g), qp + i * g, sp + i, up + i);
  });
  return {q, s, sums};
}

// y float32 [M, N/16*16] = dequant(W) applied to quantized activations (see the header comment).
torch::Tensor quant_matmul(torch::Tensor xq, torch::Tensor xs, torch::Tensor xsum, torch::Tensor qweight,
                           torch::Tensor scales, c10::optional<torch::Tensor> mins, int64_t g, int64_t bits,
                           bool portable) {
  check_inputs(xq, xs, xsum, qweight, scales, mins, g, bits);
  const int64_t M = xq.size(0), K = xq.size(1), T = qweight.size(0);
  auto y = torch::empty({M, T * 16}, torch::kFloat32);
  const int8_t* xp = xq.data_ptr<int8_t>();
  const float* sxp = xs.data_ptr<float>();
  const int32_t* sump = xsum.data_ptr<int32_t>();
  const uint8_t* wp = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* zp = mins ? reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>()) : nullptr;
  float* yp = y.data_ptr<float>();
  const bool vnni = has_vnni() && !portable;
  const int gi = static_cast<int>(g);
  if (bits == 8) matmul_tiles<true, 8>(M, K, T, gi, xp, sxp, sump, wp, sp, zp, yp, vnni);
  else if (zp) matmul_tiles<false, 4>(M, K, T, gi, xp, sxp, sump, wp, sp, zp, yp, vnni);
  else matmul_tiles<true, 4>(M, K, T, gi, xp, sxp, sump, wp, sp, zp, yp, vnni);
  return y;
}

bool vnni_available() { return has_vnni(); }

// The whole quantized layer in one call: x [M, K] of any float dtype -> y [M, out_features] in x's dtype.
torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& mins, int64_t g, int64_t bits, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), "x: floating point [M, K]");
  TORCH_CHECK(out_features > 0 && out_features <= qweight.size(0) * 16, "out_features does not fit the weight tiles");
  auto a = quantize_activations(x.to(torch::kFloat32), g, false);
  auto y = quant_matmul(a[0], a[1], a[2], qweight, scales, mins, g, bits, false);
  if (y.size(1) != out_features) y = y.narrow(1, 0, out_features);
  return y.to(x.scalar_type()).contiguous();
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale,
                               c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale);

torch::Tensor decode_attention_op(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& mask, double scale, const c10::optional<torch::Tensor>& k_scale,
                                  const c10::optional<torch::Tensor>& v_scale) {
  return decode_attention(q.to(torch::kFloat32).contiguous(), k, v, mask, scale, k_scale, v_scale).to(q.scalar_type());
}

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w);
bool bf16_linear_available();

// The same kernels as operators (torch.ops.phikit.*), so that torch.compile can place them in a graph
// (their shapes for tracing are registered in phikit/kernels.py).
TORCH_LIBRARY(phikit, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int group_size, int bits, int out_features) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, Tensor? k_scale=None, "
        "Tensor? v_scale=None) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(phikit, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("decode_attention", &decode_attention_op);
  m.impl("bf16_linear", &bf16_linear);
}

void register_decoder(pybind11::module& m);  // decode_step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decoder(m);
  m.def("quantize_activations", &quantize_activations, "x float32 [M,K] -> int8 codes, block scales, block code sums");
  m.def("quant_matmul", &quant_matmul, "4- or 8-bit weights x 8-bit activations -> float32 [M, N padded to 16]");
  m.def("vnni_available", &vnni_available, "whether this CPU runs the AVX512-VNNI kernels");
  m.def("decode_attention", &decode_attention, "one query per sequence over the KV cache (decode_attention.cpp)");
  m.def("bf16_linear_available", &bf16_linear_available, "whether this CPU runs the bf16 decoding kernel (AVX512-BF16)");
}
