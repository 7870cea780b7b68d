// CPU ema_update_ (see ema_update.h): one pass over k for the sizes and their total, then a
// parallel pass over the k x d statistics and codebook.
#include "ema_update.h"

#include "dispatch.h"

namespace fastlatent {
namespace {

template <typename T>
void update_codebook(const EmaUpdateParams& p, double total) {
  const int64_t k = p.k, d = p.d;
  const float decay = p.decay, rate = 1.0f - p.decay;
  const double denominator = total + static_cast<double>(k) * p.eps;
  T* codebook = static_cast<T*>(p.codebook);
#pragma omp parallel for schedule(static) if (k * d > 65536)
  for (int64_t c = 0; c < k; ++c) {
    const float smoothed = static_cast<float>((p.cluster_size[c] + p.eps) / denominator * total);
    const float inverse = 1.0f / smoothed;
    float* embed = p.embed_sum + c * d;
    const float* sum = p.sums + c * d;
    T* code = codebook + c * d;
    for (int64_t t = 0; t < d; ++t) {
      const float value = decay * embed[t] + rate * sum[t];
      embed[t] = value;
      code[t] = from_float<T>(value * inverse);
    }
  }
}

}  // namespace

Status run_ema_update_cpu(const EmaUpdateParams& p) {
  if (p.k < 1 || p.d < 1) return Status::Error("ema_update_: need k >= 1, d >= 1");
  double total = 0.0;
  for (int64_t c = 0; c < p.k; ++c) {
    p.cluster_size[c] = p.decay * p.cluster_size[c] + (1.0f - p.decay) * p.counts[c];
    total += p.cluster_size[c];
  }
  return FL_DTYPE_SWITCH(p.codebook_dtype, scalar_t, Status::Error("ema_update_: unsupported dtype"), [&] {
    update_codebook<scalar_t>(p, total);
    return Status::Ok();
  });
}

}  // namespace fastlatent
