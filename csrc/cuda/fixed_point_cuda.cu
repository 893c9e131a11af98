// CUDA kernel of torch_logme::fixed_point: one thread block per column runs
// every step of that column's fixed point in a single launch. Each step sums
// over the k eigen-directions with the block's threads (warp shuffles, then
// one partial per warp in shared memory); every thread then holds the same
// totals, takes the same update and leaves the loop on the same step.
#include <algorithm>
#include <limits>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fixed_point.h"

namespace torch_logme {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// Sum over the 32 lanes of a warp. The butterfly (xor) pattern leaves the
// same bits in every lane: each level adds the same two numbers on both sides.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Sum of `Terms` values over the block; every thread gets the same totals.
// `scratch` holds one partial per warp and term. blockDim.x must be a
// multiple of 32 (every lane takes part in the shuffles).
template <typename acc_t, int Terms>
__device__ __forceinline__ void block_sum(acc_t (&values)[Terms], acc_t (*scratch)[kMaxWarps]) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int j = 0; j < Terms; ++j) {
    values[j] = warp_sum(values[j]);
    if (lane == 0) scratch[j][warp] = values[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < Terms; ++j) {
    acc_t total = scratch[j][0];  // same order in every thread: same bits
    for (int w = 1; w < num_warps; ++w) total += scratch[j][w];
    values[j] = total;
  }
  __syncthreads();  // the scratch is free again for the next sum
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) fixed_point_kernel(
    const scalar_t* __restrict__ lam,   // [k]
    const scalar_t* __restrict__ x,     // [C, k]
    const scalar_t* __restrict__ base,  // [C]
    const scalar_t* __restrict__ w,     // [k] or nullptr
    int64_t k, ColumnProblem<acc_t> problem,
    scalar_t* __restrict__ alpha_out, scalar_t* __restrict__ beta_out, scalar_t* __restrict__ t_out,
    scalar_t* __restrict__ evidence_out, int64_t* __restrict__ steps_out) {
  __shared__ acc_t scratch[5][kMaxWarps];
  const int64_t col = blockIdx.x;
  const scalar_t* x_col = x + col * k;
  const acc_t base_col = static_cast<acc_t>(base[col]);

  ColumnState<acc_t> state = initial_state<acc_t>();
  for (int64_t step = 0; step < problem.max_iter; ++step) {
    const acc_t t = state.alpha / state.beta;
    StepSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      add_direction(s, static_cast<acc_t>(lam[i]), static_cast<acc_t>(x_col[i]), t);
    }
    acc_t sums[5] = {s.lam_r, s.r, s.pos, s.x_r2, s.x_r2lam};
    block_sum(sums, scratch);
    s = StepSums<acc_t>{sums[0], sums[1], sums[2], sums[3], sums[4]};
    // Uniform across the block: every thread has the same sums and state.
    if (apply_step(state, s, t, base_col, problem)) break;
  }

  acc_t logdet[1] = {acc_t(0)};
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const acc_t term = logme_log(state.alpha + state.beta * static_cast<acc_t>(lam[i]));
    logdet[0] += w == nullptr ? term : static_cast<acc_t>(w[i]) * term;
  }
  block_sum(logdet, scratch);

  if (threadIdx.x == 0) {
    alpha_out[col] = static_cast<scalar_t>(state.alpha);
    beta_out[col] = static_cast<scalar_t>(state.beta);
    t_out[col] = static_cast<scalar_t>(state.t_used);
    evidence_out[col] = static_cast<scalar_t>(column_evidence(state, logdet[0], problem));
    steps_out[col] = state.steps;
  }
}

// Enough threads to cover k once (up to kMaxThreads), in whole warps.
int threads_for(int64_t k) {
  const int64_t warps = (std::min<int64_t>(k, kMaxThreads) + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(warps * kWarpSize);
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs fixed_point_cuda(
    const at::Tensor& eigenvalues, const at::Tensor& proj_sq, const at::Tensor& target_sq,
    const std::optional<at::Tensor>& whitened_sq, const std::optional<at::Tensor>& outside_sq,
    const std::optional<at::Tensor>& logdet_weights, int64_t num_samples, int64_t num_features,
    int64_t max_iter, double tol, bool strict) {
  check_inputs(eigenvalues, proj_sq, target_sq, whitened_sq, outside_sq, logdet_weights, num_samples,
               num_features, max_iter, tol);
  TORCH_CHECK(eigenvalues.is_cuda(), "fixed_point (CUDA kernel): tensors must be on a CUDA device, got ",
              eigenvalues.device());
  const c10::cuda::CUDAGuard guard(eigenvalues.device());
  const PreparedInputs in =
      prepare_inputs(eigenvalues, proj_sq, target_sq, whitened_sq, outside_sq, logdet_weights);
  const int64_t c = in.num_columns;
  const int64_t k = in.k;
  TORCH_CHECK(c <= std::numeric_limits<int>::max(), "fixed_point (CUDA kernel): at most 2^31 - 1 columns, got ", c);
  const auto options = eigenvalues.options();
  at::Tensor alpha = at::empty({c}, options);
  at::Tensor beta = at::empty({c}, options);
  at::Tensor t_used = at::empty({c}, options);
  at::Tensor evidence = at::empty({c}, options);
  at::Tensor steps = at::empty({c}, options.dtype(at::kLong));
  if (c == 0) return {alpha, beta, t_used, evidence, steps};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(eigenvalues.scalar_type(), "torch_logme_fixed_point_cuda", [&] {
    // float32 inputs too are summed in float64: the fixed point is a small
    // part of the job, and float64 keeps it within float32 round-off of the
    // float64 result, as on the CPU (float sums drift by ~1e-5 over 11 steps
    // of a slowly converging column).
    using acc_t = double;
    const auto problem = make_problem<acc_t>(num_samples, num_features, k, max_iter, tol, strict,
                                             whitened_sq.has_value(), in.logdet_weights.defined());
    const scalar_t* w = in.logdet_weights.defined() ? in.logdet_weights.data_ptr<scalar_t>() : nullptr;
    fixed_point_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(c), threads_for(k), 0, stream>>>(
        in.eigenvalues.data_ptr<scalar_t>(), in.x.data_ptr<scalar_t>(), in.base.data_ptr<scalar_t>(), w, k,
        problem, alpha.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), t_used.data_ptr<scalar_t>(),
        evidence.data_ptr<scalar_t>(), steps.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {alpha, beta, t_used, evidence, steps};
}

}  // namespace
}  // namespace torch_logme

TORCH_LIBRARY_IMPL(torch_logme, CUDA, m) {
  m.impl("fixed_point", &torch_logme::fixed_point_cuda);
}
