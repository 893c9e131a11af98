// CPU kernel of torch_logme::fixed_point: columns run in parallel
// (at::parallel_for), each column runs its steps until it stops, so a column
// that converges early costs nothing afterwards.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../fixed_point.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LOGME_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LOGME_CPU_CLONES
#endif

namespace torch_logme {
namespace {

// Independent products in log_sum_grouped: the compiler vectorises over them.
constexpr int64_t kLanes = 8;
// Columns per thread at least this much work (k * max_iter terms per column,
// ~0.4 ms at most) before at::parallel_for splits them: below it, waking
// threads costs more, and far more when other work shares the cores.
constexpr int64_t kMinWorkPerThread = 1 << 20;

// The step's five sums over the k eigen-directions (see StepSums). The
// divisions here are most of the op's time, so the loop is a SIMD reduction
// (partial sums per vector lane; the order differs from evidence.py's only
// by round-off), cloned for AVX-512 and AVX2 and picked at load time by the
// CPU (GCC and Clang on x86-64 Linux).
template <typename scalar_t>
LOGME_CPU_CLONES StepSums<double> step_sums(const scalar_t* lam, const scalar_t* x, int64_t k, double t) {
  double lam_r = 0.0;
  double r_sum = 0.0;
  double pos = 0.0;
  double x_r2 = 0.0;
  double x_r2lam = 0.0;
#pragma omp simd reduction(+ : lam_r, r_sum, pos, x_r2, x_r2lam)
  for (int64_t i = 0; i < k; ++i) {
    add_direction(lam_r, r_sum, pos, x_r2, x_r2lam, static_cast<double>(lam[i]), static_cast<double>(x[i]), t);
  }
  return StepSums<double>{lam_r, r_sum, pos, x_r2, x_r2lam};
}

// sum_i w_i log(alpha + beta lam_i), one log per term; w = nullptr: all 1.
template <typename scalar_t>
double log_sum_direct(const scalar_t* lam, const scalar_t* w, int64_t k, double alpha, double beta) {
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double term = logme_log(alpha + beta * static_cast<double>(lam[i]));
    total += w == nullptr ? term : static_cast<double>(w[i]) * term;
  }
  return total;
}

// Terms multiplied together before one log, at most (see log_sum_grouped).
constexpr int64_t kMaxGroup = 16;
// |log| of a product that stays clear of overflow and of subnormal numbers
// (doubles span e^-708 to e^709).
constexpr double kSafeLogRange = 700.0;

// sum_i log(x_i) with x_i = alpha + beta lam_i (or 1 where a 0/1 weight is
// 0), as sums of log(x_a x_b ... ) over groups of `group` terms per lane:
// 1/group as many logs, which otherwise cost more than all the steps
// together. The caller picks group so that no product can leave the normal
// range of doubles; the round-off is that of the plain sum (a few ulp per log).
template <typename scalar_t, bool kWeighted>
LOGME_CPU_CLONES double log_sum_grouped(const scalar_t* lam, const scalar_t* w, int64_t k, double alpha,
                                         double beta, int64_t group) {
  double total[kLanes] = {};
  const int64_t span = group * kLanes;
  int64_t i = 0;
  for (; i + span <= k; i += span) {
    double product[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) product[j] = 1.0;
    for (int64_t g = i; g < i + span; g += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        double x = alpha + beta * static_cast<double>(lam[g + j]);
        if constexpr (kWeighted) x = w[g + j] != scalar_t(0) ? x : 1.0;  // weight 0: factor 1
        product[j] *= x;
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) total[j] += logme_log(product[j]);
  }
  double sum = log_sum_direct(lam + i, kWeighted ? w + i : nullptr, k - i, alpha, beta);  // the tail
  for (int64_t j = 0; j < kLanes; ++j) sum += total[j];
  return sum;
}

// sum_i w_i log(alpha + beta lam_i); w = nullptr means every weight is 1.
// lam_min, lam_max: the range of lam. binary_weights: every weight is 0 or 1.
template <typename scalar_t>
double logdet_sum(const scalar_t* lam, const scalar_t* w, int64_t k, double alpha, double beta,
                  double lam_min, double lam_max, bool binary_weights) {
  // x is linear in lam, so its extremes are at lam's (beta may be < 0).
  const double x_min = std::min(alpha + beta * lam_min, alpha + beta * lam_max);
  const double x_max = std::max(alpha + beta * lam_min, alpha + beta * lam_max);
  // Grouping needs every factor positive and finite (NaN fails the test too):
  // a product of two negative factors would hide the NaN of their logs.
  if (!(x_min > 0.0 && x_max < std::numeric_limits<double>::infinity()) || !binary_weights) {
    return log_sum_direct(lam, w, k, alpha, beta);
  }
  const double widest = std::max(std::abs(logme_log(x_min)), std::abs(logme_log(x_max)));
  const int64_t group = widest * kMaxGroup <= kSafeLogRange
                            ? kMaxGroup
                            : std::max<int64_t>(1, static_cast<int64_t>(kSafeLogRange / widest));
  return w == nullptr ? log_sum_grouped<scalar_t, false>(lam, w, k, alpha, beta, group)
                      : log_sum_grouped<scalar_t, true>(lam, w, k, alpha, beta, group);
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs fixed_point_cpu(
    const at::Tensor& eigenvalues, const at::Tensor& proj_sq, const at::Tensor& target_sq,
    const std::optional<at::Tensor>& whitened_sq, const std::optional<at::Tensor>& outside_sq,
    const std::optional<at::Tensor>& logdet_weights, int64_t num_samples, int64_t num_features,
    int64_t max_iter, double tol, bool strict) {
  check_inputs(eigenvalues, proj_sq, target_sq, whitened_sq, outside_sq, logdet_weights, num_samples,
               num_features, max_iter, tol);
  TORCH_CHECK(eigenvalues.device().is_cpu(), "fixed_point (CPU kernel): tensors must be on the CPU, got ",
              eigenvalues.device());
  const PreparedInputs in =
      prepare_inputs(eigenvalues, proj_sq, target_sq, whitened_sq, outside_sq, logdet_weights);
  const int64_t c = in.num_columns;
  const int64_t k = in.k;
  const auto options = eigenvalues.options();
  at::Tensor alpha = at::empty({c}, options);
  at::Tensor beta = at::empty({c}, options);
  at::Tensor t_used = at::empty({c}, options);
  at::Tensor evidence = at::empty({c}, options);
  at::Tensor steps = at::empty({c}, options.dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(eigenvalues.scalar_type(), "torch_logme_fixed_point_cpu", [&] {
    // float32 inputs too are summed in float64 (as ATen's CPU reductions
    // do): the result then stays within float32 round-off of float64.
    const auto problem = make_problem<double>(num_samples, num_features, k, max_iter, tol, strict,
                                             whitened_sq.has_value(), in.logdet_weights.defined());
    const scalar_t* lam = in.eigenvalues.data_ptr<scalar_t>();
    const scalar_t* x = in.x.data_ptr<scalar_t>();
    const scalar_t* base = in.base.data_ptr<scalar_t>();
    const scalar_t* w = in.logdet_weights.defined() ? in.logdet_weights.data_ptr<scalar_t>() : nullptr;
    const bool binary_weights = w == nullptr || std::all_of(w, w + k, [](scalar_t v) {
      return v == scalar_t(0) || v == scalar_t(1);
    });
    const auto [lam_min_it, lam_max_it] = std::minmax_element(lam, lam + k);
    const double lam_min = static_cast<double>(*lam_min_it);
    const double lam_max = static_cast<double>(*lam_max_it);
    scalar_t* alpha_out = alpha.data_ptr<scalar_t>();
    scalar_t* beta_out = beta.data_ptr<scalar_t>();
    scalar_t* t_out = t_used.data_ptr<scalar_t>();
    scalar_t* evidence_out = evidence.data_ptr<scalar_t>();
    int64_t* steps_out = steps.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (k * max_iter));

    at::parallel_for(0, c, grain, [&](int64_t begin, int64_t end) {
      for (int64_t col = begin; col < end; ++col) {
        const scalar_t* x_col = x + col * k;
        const double base_col = static_cast<double>(base[col]);
        ColumnState<double> state = initial_state<double>();
        for (int64_t step = 0; step < max_iter; ++step) {
          const double t = state.alpha / state.beta;
          if (apply_step(state, step_sums(lam, x_col, k, t), t, base_col, problem)) break;
        }
        const double logdet =
            logdet_sum(lam, w, k, state.alpha, state.beta, lam_min, lam_max, binary_weights);
        alpha_out[col] = static_cast<scalar_t>(state.alpha);
        beta_out[col] = static_cast<scalar_t>(state.beta);
        t_out[col] = static_cast<scalar_t>(state.t_used);
        evidence_out[col] = static_cast<scalar_t>(column_evidence(state, logdet, problem));
        steps_out[col] = state.steps;
      }
    });
  });
  return {alpha, beta, t_used, evidence, steps};
}

}  // namespace
}  // namespace torch_logme

TORCH_LIBRARY_IMPL(torch_logme, CPU, m) {
  m.impl("fixed_point", &torch_logme::fixed_point_cpu);
}
