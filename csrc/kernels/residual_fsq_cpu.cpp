// CPU residual FSQ: every layer of a chunk of rows in one pass over the input. See residual_fsq.h.
//
// A chunk of kRowsPerChunk rows is converted once to the math type; the layer loop then runs over
// the chunk's flat elements with the per-channel constants tiled to the chunk (no modulo, no libm:
// gcc vectorises it), keeping residual, sum and pass count in buffers that stay in L1 across the
// layers, and a per-row loop forms each layer's int64 index from the levels it wrote.
//
// Bitwise parity with vector-quantize-pytorch needs every multiply and add rounded on its own:
// setup.py builds the kernels with -ffp-contract=fast, so this file turns contraction off.
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "residual_fsq.h"

namespace fastlatent {

namespace {

constexpr int64_t kRowsPerChunk = 256;
// floor by truncation needs y < 2^31: the largest float below it (reached only when L > 2^24).
constexpr double kMaxBracket = 2147483520.0;

// One layer over n flat elements. k receives the level, the rest is updated in place.
template <typename M>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void layer_pass(M* __restrict residual, M* __restrict sum, M* __restrict count, int32_t* __restrict k,
                const M* __restrict scale, const M* __restrict half, const M* __restrict step, bool first,
                int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const M b = residual[j] / scale[j];
    count[j] += std::fabs(b) <= M(1) ? M(1) : M(0);
    M c = b > M(-1) ? b : M(-1);  // NaN -> -1: the residual keeps the NaN, the level stays valid
    c = c < M(1) ? c : M(1);
    M y = (c + M(1)) * half[j];
    y = y + M(0.5);
    y = std::min(y, static_cast<M>(kMaxBracket));
    const int32_t level = static_cast<int32_t>(y);  // y >= 0.5: truncation is floor
    k[j] = level;
    M q = static_cast<M>(level) * step[j];
    q = q - M(1);
    q = q * scale[j];
    sum[j] = first ? q : sum[j] + q;
    residual[j] = residual[j] - q;
  }
}

template <typename M>
struct ChunkBuffers {
  std::vector<M> residual, sum, count;
  std::vector<int32_t> level;
  explicit ChunkBuffers(int64_t n) : residual(n), sum(n), count(n), level(n) {}
};

template <typename T>
Status residual_fsq_typed(const ResidualFsqParams& p, const ResidualFsqArgs& args) {
  using M = math_t<T>;
  const int d = p.d;
  const int num_q = p.num_quantizers;
  const int64_t chunk_elems = std::min(p.rows, kRowsPerChunk) * d;
  // per-channel constants tiled to a chunk: [chunk] for half/step, [Q, chunk] for the scales
  std::vector<M> half(chunk_elems), step(chunk_elems), scales(static_cast<size_t>(num_q) * chunk_elems);
  const M* scales_in = static_cast<const M*>(args.scales);
  for (int64_t j = 0; j < chunk_elems; ++j) {
    const int c = static_cast<int>(j % d);
    half[j] = static_cast<M>(p.half_f[c]);
    step[j] = static_cast<M>(p.step_f[c]);
    for (int l = 0; l < num_q; ++l) scales[l * chunk_elems + j] = scales_in[l * d + c];
  }
  const T* z = static_cast<const T*>(args.z);
  T* z_hat = static_cast<T*>(args.z_hat);
  const int64_t num_chunks = (p.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const T nan = from_math<T>(std::numeric_limits<M>::quiet_NaN());
#pragma omp parallel if (p.rows * d * num_q > 16384)
  {
    ChunkBuffers<M> buf(chunk_elems);
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t row0 = chunk * kRowsPerChunk;
      const int64_t rows = std::min(kRowsPerChunk, p.rows - row0);
      const int64_t n = rows * d;
      const int64_t e0 = row0 * d;
      M* residual = buf.residual.data();
      M* count = buf.count.data();
      for (int64_t j = 0; j < n; ++j) {
        residual[j] = to_math(z[e0 + j]);
        count[j] = M(0);
      }
      for (int l = 0; l < num_q; ++l) {
        layer_pass<M>(residual, buf.sum.data(), count, buf.level.data(), scales.data() + l * chunk_elems,
                      half.data(), step.data(), l == 0, n);
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t* k = buf.level.data() + r * d;
          int64_t index = 0;
          for (int c = 0; c < d; ++c) index += static_cast<int64_t>(k[c]) * p.basis[c];
          args.indices[(row0 + r) * num_q + l] = index;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = r * d;
        bool has_nan = false;
        for (int c = 0; c < d; ++c) has_nan |= std::isnan(residual[base + c]);
        for (int c = 0; c < d; ++c) {
          z_hat[e0 + base + c] = has_nan ? nan : from_math<T>(buf.sum[base + c]);
          args.pass_count[e0 + base + c] = static_cast<uint8_t>(count[base + c]);
        }
        if (has_nan) std::fill_n(args.indices + (row0 + r) * num_q, num_q, int64_t{-1});
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status run_residual_fsq_cpu(const ResidualFsqParams& params, const ResidualFsqArgs& args) {
  if (params.rows < 0 || params.d < 1 || params.d > kFsqMaxDims || params.num_quantizers < 1 ||
      params.num_quantizers > kResidualFsqMaxLayers)
    return Status::Error("residual_fsq: need rows >= 0, 1 <= d <= 31 and 1 <= num_quantizers <= 255");
  if (params.rows == 0) return Status::Ok();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t, Status::Error("residual_fsq: unsupported dtype"),
                                     [&] { return residual_fsq_typed<scalar_t>(params, args); });
}

}  // namespace fastlatent
