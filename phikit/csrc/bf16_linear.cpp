// y = x W^T for bfloat16 weights and a few activation rows (decoding), for phikit/float_linear.py.
//
//   x  (M, K)  bfloat16, M from 1 to 8 (one row per sequence being decoded)
//   w  (N, K)  bfloat16, contiguous (nn.Linear's weight, as loaded: no copy, no repacking)
//   y  (M, N)  bfloat16: each output the float32 sum of exact bf16 x bf16 products, rounded once
//
// Decoding reads every weight once per token, so it runs at the speed memory delivers them. PyTorch's
// bf16 matmul for one activation row reads them at about 40% of that here (Phi-3-mini bf16: 2.1 tok/s
// where memory allows 5.4); this streams W row after row (one sequential stream per thread, prefetched
// 6 KB ahead) and multiplies with AVX512-BF16 (VDPBF16PS: 32 products per instruction, float32 sums).
// There is no portable path: Python calls this only when the CPU has AVX512-BF16.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PHIKIT_X86 1
#endif

namespace {

constexpr int M_MAX = 8;          // activation rows per call (decoding a few sequences at once)
constexpr int PREFETCH = 6144;    // bytes ahead in the weight stream

#ifdef PHIKIT_X86
#define PHIKIT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// rows [n0, n1) of y for M activation rows; K a multiple of 32 (checked by the caller)
template <int M>
PHIKIT_BF16_TARGET void rows_bf16(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                                  uint16_t* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {  // two independent chains of 32 products
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PREFETCH, _MM_HINT_NTA);
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PREFETCH + 64, _MM_HINT_NTA);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
      }
    }
    if (k < K) {  // the last 32
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
    for (int m = 0; m < M; ++m) {
      const float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
      y[m * N + n] = c10::BFloat16(s).x;  // round to nearest even, as PyTorch's casts
    }
  }
}

bool has_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}
#else
bool has_bf16() { return false; }
#endif

}  // namespace

bool bf16_linear_available() { return has_bf16(); }

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(has_bf16(), "bf16_linear needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && w.dtype() == torch::kBFloat16, "x and w: bfloat16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K]");
  TORCH_CHECK(w.is_contiguous(), "w: contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= M_MAX, "bf16_linear takes 1 to ", M_MAX, " activation rows");
  TORCH_CHECK(K % 32 == 0, "in_features must be a multiple of 32");
  auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
#ifdef PHIKIT_X86
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: return rows_bf16<1>(xp, wp, K, N, n0, n1, yp);
      case 2: return rows_bf16<2>(xp, wp, K, N, n0, n1, yp);
      case 3: return rows_bf16<3>(xp, wp, K, N, n0, n1, yp);
      case 4: return rows_bf16<4>(xp, wp, K, N, n0, n1, yp);
      case 5: return rows_bf16<5>(xp, wp, K, N, n0, n1, yp);
      case 6: return rows_bf16<6>(xp, wp, K, N, n0, n1, yp);
      case 7: return rows_bf16<7>(xp, wp, K, N, n0, n1, yp);
      default: return rows_bf16<8>(xp, wp, K, N, n0, n1, yp);
    }
  });
#endif
  return y;
}
