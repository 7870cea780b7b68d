// Runs the CUDA kernels against the CPU kernels. Exit code 77 (ctest: skipped) when no GPU.
#include <cuda_runtime.h>  // the typed cudaMalloc overloads

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "common.h"
#include "fsq.h"
#include "lfq.h"
#include "nearest_code.h"
#include "nearest_code_oracle.h"
#include "sampler_step.h"

using namespace fastlatent;

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    cudaError_t err_ = (expr);                                                          \
    CHECK(err_ == cudaSuccess, "%s: %s", #expr, cudaGetErrorString(err_));              \
    if (err_ != cudaSuccess) return;                                                    \
  } while (0)

template <typename T>
static T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  if (cudaMalloc(&ptr, host.size() * sizeof(T) + 16) != cudaSuccess) return nullptr;
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return ptr;
}

// bf16 = true runs the bf16 kernels (tensor cores where d % 8 == 0) on the rounded values.
static void run_case(int64_t n, int64_t k, int64_t d, Metric metric, std::mt19937& gen, bool bf16 = false) {
  std::normal_distribution<float> normal;
  std::vector<float> x(n * d), c(k * d);
  for (auto& v : x) v = bf16 ? to_float(to_bfloat16(normal(gen))) : normal(gen);
  for (auto& v : c) v = bf16 ? to_float(to_bfloat16(normal(gen))) : normal(gen);
  std::vector<BFloat16> xb(x.size()), cb(c.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = to_bfloat16(x[i]);
  for (size_t i = 0; i < c.size(); ++i) cb[i] = to_bfloat16(c[i]);
  void* dx = bf16 ? static_cast<void*>(to_device(xb)) : static_cast<void*>(to_device(x));
  void* dc = bf16 ? static_cast<void*>(to_device(cb)) : static_cast<void*>(to_device(c));
  int64_t* dindices = nullptr;
  float* ddistances = nullptr;
  void* workspace = nullptr;
  CUDA_OK(cudaMalloc(&dindices, n * sizeof(int64_t) + 16));
  CUDA_OK(cudaMalloc(&ddistances, n * sizeof(float) + 16));
  CUDA_OK(cudaMalloc(&workspace, nearest_code_cuda_workspace_bytes(k)));
  NearestCodeParams p;
  p.x = dx;
  p.codebook = dc;
  p.indices = dindices;
  p.distances = ddistances;
  p.n = n;
  p.k = k;
  p.d = d;
  p.metric = metric;
  p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat32;
  p.workspace = workspace;
  CUDA_OK(launch_nearest_code_cuda(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<int64_t> indices(n);
  std::vector<float> distances(n);
  CUDA_OK(cudaMemcpy(indices.data(), dindices, n * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(distances.data(), ddistances, n * sizeof(float), cudaMemcpyDeviceToHost));
  const auto expected = fl_test::brute_force_nearest(x, c, n, k, d, metric);
  for (int64_t i = 0; i < n; ++i) {
    if (indices[i] == expected[i] || metric == Metric::kCosine) continue;
    const double ours = fl_test::l2_distance(x, c, i, indices[i], d);
    const double best = fl_test::l2_distance(x, c, i, expected[i], d);
    CHECK(ours - best < 1e-4 * (1 + best), "row %ld: got %ld, expected %ld", long(i), long(indices[i]),
          long(expected[i]));
  }
  cudaFree(dx);
  cudaFree(dc);
  cudaFree(dindices);
  cudaFree(ddistances);
  cudaFree(workspace);
}

static void test_fsq_cuda(int64_t rows) {
  const std::vector<int64_t> levels = {8, 5, 5, 5};
  const int d = 4;
  std::mt19937 gen(9);
  std::normal_distribution<float> normal(0.0f, 2.5f);
  std::vector<float> z(rows * d), z_hat(rows * d), z_hat_gpu(rows * d);
  for (auto& v : z) v = normal(gen);
  std::vector<int64_t> idx(rows), idx_gpu(rows);
  FsqParams p;
  fsq_make_constants(levels.data(), d, false, p);
  p.rows = rows;
  FsqForwardArgs cpu{z.data(), z_hat.data(), idx.data()};
  CHECK(run_fsq_quantize_cpu(p, cpu).ok, "cpu fsq");
  float* dz = to_device(z);
  float* dzh = nullptr;
  int64_t* didx = nullptr;
  CUDA_OK(cudaMalloc(&dzh, rows * d * sizeof(float) + 16));
  CUDA_OK(cudaMalloc(&didx, rows * sizeof(int64_t) + 16));
  FsqForwardArgs gpu{dz, dzh, didx};
  CUDA_OK(launch_fsq_quantize_cuda(p, gpu, nullptr));
  CUDA_OK(cudaMemcpy(z_hat_gpu.data(), dzh, rows * d * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(idx_gpu.data(), didx, rows * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CHECK(z_hat_gpu == z_hat && idx_gpu == idx, "fsq cuda vs cpu, rows=%ld", long(rows));
  cudaFree(dz);
  cudaFree(dzh);
  cudaFree(didx);
}

static void test_lfq_entropy_cuda(int d) {
  const int64_t n = 1000;
  std::mt19937 gen(10);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::vector<float> x(n * d), ps(n), avg(size_t{1} << d), ps_gpu(n), avg_gpu(size_t{1} << d);
  for (auto& v : x) v = normal(gen);
  LfqEntropyParams p;
  p.x = x.data();
  p.n = n;
  p.d = d;
  p.logit_scale = 40.0;
  p.per_sample_entropy = ps.data();
  p.avg_probs = avg.data();
  CHECK(run_lfq_entropy_cpu(p).ok, "cpu lfq");
  float* dx = to_device(x);
  float *dps = nullptr, *davg = nullptr;
  void* ws = nullptr;
  CUDA_OK(cudaMalloc(&dps, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&davg, avg.size() * sizeof(float)));
  CUDA_OK(cudaMalloc(&ws, lfq_entropy_cuda_workspace_bytes(n, d, false) + 16));
  p.x = dx;
  p.per_sample_entropy = dps;
  p.avg_probs = davg;
  p.workspace = ws;
  CUDA_OK(launch_lfq_entropy_cuda(p, nullptr));
  CUDA_OK(cudaMemcpy(ps_gpu.data(), dps, n * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(avg_gpu.data(), davg, avg.size() * sizeof(float), cudaMemcpyDeviceToHost));
  for (int64_t r = 0; r < n; ++r) CHECK(std::fabs(ps[r] - ps_gpu[r]) <= 1e-5f * (1 + ps[r]), "lfq ps row %ld", long(r));
  for (size_t c = 0; c < avg.size(); ++c)
    CHECK(std::fabs(avg[c] - avg_gpu[c]) <= 1e-4f * avg[c] + 1e-10f, "lfq avg d=%d code %zu", d, c);
  cudaFree(dx);
  cudaFree(dps);
  cudaFree(davg);
  cudaFree(ws);
}

// The CUDA sampler step against the CPU one: noise bitwise (x0 = x = 0), a guided, rescaled,
// thresholded DDPM step within fp32 rounding; both the vectorised and the scalar paths.
static void sampler_case(int64_t b, int64_t n, bool bf16) {
  std::mt19937 gen(5);
  std::normal_distribution<float> normal;
  std::vector<float> model(2 * b * n), x(b * n), cpu_out(b * n), gpu_out(b * n);
  for (auto& v : model) v = to_float(to_bfloat16(2 * normal(gen)));
  for (auto& v : x) v = to_float(to_bfloat16(normal(gen)));
  SamplerStepParams p;
  p.batch = b;
  p.n = n;
  p.guided = true;
  p.guidance_scale = 5.0f;
  p.guidance_rescale = 0.7f;
  p.x0_mode = X0Mode::kThreshold;
  p.threshold_quantile = 0.99;
  p.threshold_max = 2.0f;
  p.seed = 0x123456789abcull;
  p.offset = 17;
  fold(ddpm_form(0.3, 0.5, Prediction::kVPrediction), p.x0_mode, false, p.c);
  p.model_output = model.data();
  p.sample = x.data();
  p.out = cpu_out.data();
  CHECK(run_sampler_step_cpu(p).ok, "cpu step");
  std::vector<BFloat16> model_b(model.size()), x_b(x.size()), out_b(x.size());
  for (size_t i = 0; i < model.size(); ++i) model_b[i] = to_bfloat16(model[i]);
  for (size_t i = 0; i < x.size(); ++i) x_b[i] = to_bfloat16(x[i]);
  void* dmodel = bf16 ? static_cast<void*>(to_device(model_b)) : static_cast<void*>(to_device(model));
  void* dx = bf16 ? static_cast<void*>(to_device(x_b)) : static_cast<void*>(to_device(x));
  void* dout = nullptr;
  void* workspace = nullptr;
  CUDA_OK(cudaMalloc(&dout, b * n * sizeof(float) + 16));
  p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat32;
  CUDA_OK(cudaMalloc(&workspace, sampler_step_cuda_workspace_bytes(p)));
  p.model_output = dmodel;
  p.sample = dx;
  p.out = dout;
  p.workspace = workspace;
  CUDA_OK(launch_sampler_step_cuda(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  if (bf16) {
    CUDA_OK(cudaMemcpy(out_b.data(), dout, b * n * sizeof(BFloat16), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < b * n; ++i) gpu_out[i] = to_float(out_b[i]);
  } else {
    CUDA_OK(cudaMemcpy(gpu_out.data(), dout, b * n * sizeof(float), cudaMemcpyDeviceToHost));
  }
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < b * n; ++i) {
    const double want = bf16 ? to_float(to_bfloat16(cpu_out[i])) : cpu_out[i];
    worst = std::max(worst, std::fabs(gpu_out[i] - want));
    scale = std::max(scale, std::fabs(want));
  }
  CHECK(worst <= (bf16 ? 1e-2 : 1e-5) * scale, "sampler b=%ld n=%ld bf16=%d: error %g", long(b), long(n), int(bf16),
        worst);
  // Noise only (every other coefficient 0): out = z, bitwise equal to the host stream.
  StepCoefficients noise_only;
  noise_only.out_noise = 1.0f;
  p.c = noise_only;
  p.guidance_rescale = 0.0f;
  p.x0_mode = X0Mode::kNone;
  CUDA_OK(launch_sampler_step_cuda(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  if (!bf16) {
    CUDA_OK(cudaMemcpy(gpu_out.data(), dout, b * n * sizeof(float), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < b * n; ++i)
      CHECK(gpu_out[i] == philox::normal_at(p.seed, p.offset, static_cast<uint64_t>(i)), "noise %ld", long(i));
  }
  cudaFree(dmodel);
  cudaFree(dx);
  cudaFree(dout);
  cudaFree(workspace);
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 gen(7);
  const int64_t sizes[][3] = {{1, 1, 1}, {3, 17, 3}, {65, 17, 33}, {200, 1000, 8}, {129, 300, 257}};
  for (const auto& s : sizes)
    for (Metric metric : {Metric::kL2, Metric::kCosine}) {
      run_case(s[0], s[1], s[2], metric, gen);
      run_case(s[0], s[1], s[2], metric, gen, /*bf16=*/true);
    }
  run_case(1000, 777, 64, Metric::kL2, gen, /*bf16=*/true);  // tensor cores, several tiles
  for (bool bf16 : {false, true}) {
    sampler_case(4, 4096, bf16);  // vectorised
    sampler_case(3, 1031, bf16);  // scalar
  }
  run_case(1000, 777, 256, Metric::kL2, gen, /*bf16=*/true);
  for (int64_t rows : {int64_t{1}, int64_t{127}, int64_t{128}, int64_t{4099}}) test_fsq_cuda(rows);
  for (int d : {1, 6, 10, 14}) test_lfq_entropy_cuda(d);
  if (fl_test::failures()) std::fprintf(stderr, "%d check(s) failed\n", fl_test::failures());
  else std::printf("all CUDA kernel checks passed\n");
  return fl_test::failures() ? 1 : 0;
}
