// The LogME fixed point of one column, shared by the CPU and CUDA kernels.
//
// These are the formulas of torch_logme/evidence.py (docs/design.md), written once
// for both devices so the two kernels cannot drift apart. The kernels only
// differ in how they sum over the k eigenvalues (SIMD lanes on the CPU, a
// thread block on the GPU); everything per column and per step lives here.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <optional>

#if defined(__CUDACC__)
#define LOGME_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOGME_HOST_DEVICE inline
#endif

namespace torch_logme {

// Added to ||m||^2 and to the residual before dividing, as in the published
// code (evidence.EPSILON).
constexpr double kEpsilon = 1e-5;
// log(2 pi), for the Gaussian normaliser of the evidence.
constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// Overloads rather than std:: calls: they resolve to the same function name
// on the host and in CUDA device code.
LOGME_HOST_DEVICE float logme_log(float x) { return logf(x); }
LOGME_HOST_DEVICE double logme_log(double x) { return log(x); }
LOGME_HOST_DEVICE float logme_abs(float x) { return fabsf(x); }
LOGME_HOST_DEVICE double logme_abs(double x) { return fabs(x); }

// The five sums over the k eigen-directions that one step needs, for
// t = alpha / beta and r_i = 1 / (t + lam_i):
//   lam_r   = sum lam_i r_i                 (gamma)
//   r       = sum r_i over lam_i > 0
//   pos     = the number of lam_i > 0       (N - gamma = N - pos + t r)
//   x_r2    = sum x_i r_i^2
//   x_r2lam = sum x_i r_i^2 lam_i
// where x is z^2 (primal form) or p^2 = z^2 / lam (whitened form).
template <typename acc_t>
struct StepSums {
  acc_t lam_r;
  acc_t r;
  acc_t pos;
  acc_t x_r2;
  acc_t x_r2lam;
};

// Adds direction i's terms to the three sums, in the order evidence.py
// multiplies (r, then r * r, then times x). The sums are passed one by one
// so that a kernel may keep them in separate arrays (vector lanes).
template <typename acc_t>
LOGME_HOST_DEVICE void add_direction(
    acc_t& lam_r, acc_t& r_sum, acc_t& pos, acc_t& x_r2, acc_t& x_r2lam, acc_t lam, acc_t x, acc_t t) {
  const acc_t r = acc_t(1) / (t + lam);
  lam_r += lam * r;
  // A zero eigenvalue adds nothing to gamma: leaving it out of N - gamma keeps
  // (N - pos) + t sum r free of cancellation.
  const bool positive = lam > acc_t(0);
  r_sum += positive ? r : acc_t(0);
  pos += positive ? acc_t(1) : acc_t(0);
  const acc_t q = r * r * x;
  x_r2 += q;
  x_r2lam += q * lam;
}

template <typename acc_t>
LOGME_HOST_DEVICE void add_direction(StepSums<acc_t>& s, acc_t lam, acc_t x, acc_t t) {
  add_direction(s.lam_r, s.r, s.pos, s.x_r2, s.x_r2lam, lam, x, t);
}

// Per-column inputs and settings that stay fixed across steps.
template <typename acc_t>
struct ColumnProblem {
  acc_t num_samples;    // N
  acc_t num_features;   // D
  acc_t tol;            // stopping tolerance on the relative change of t
  int64_t max_iter;     // at most this many updates
  int64_t logdet_zeros; // implicit zero eigenvalues: each adds log(alpha) to log|A|
  bool strict;          // ICML 2021: stop on change < tol, epsilon inside the evidence
  bool whitened;        // x is p^2 (whitened form) rather than z^2
};

// A column's state after its last update (alpha = beta = 1 before the first).
template <typename acc_t>
struct ColumnState {
  acc_t alpha;
  acc_t beta;
  acc_t t_used;  // alpha / beta at the start of the last step
  acc_t m2;      // ||m||^2 of the last step
  acc_t res2;    // ||y - F m||^2 of the last step
  int64_t steps;
};

template <typename acc_t>
LOGME_HOST_DEVICE ColumnState<acc_t> initial_state() {
  return ColumnState<acc_t>{acc_t(1), acc_t(1), acc_t(1), acc_t(0), acc_t(0), 0};
}

// One fixed-point update from the step's sums. `base` is y^T y (primal) or
// the part of y^T y outside the eigen-directions (whitened). Returns whether
// the column has stopped.
template <typename acc_t>
LOGME_HOST_DEVICE bool apply_step(
    ColumnState<acc_t>& state, const StepSums<acc_t>& s, acc_t t, acc_t base,
    const ColumnProblem<acc_t>& p) {
  acc_t m2;
  acc_t res2;
  if (p.whitened) {
    // ||m||^2 = sum p^2 lam r^2;  ||y - F m||^2 = outside + t^2 sum p^2 r^2:
    // a sum of positive terms, no cancellation.
    m2 = s.x_r2lam;
    res2 = base + t * t * s.x_r2;
  } else {
    // ||y - F m||^2 = y^T y - sum z^2 (lam + 2 t) r^2; round-off may push the
    // difference below zero, so clamp it (NaN passes through, as in torch).
    m2 = s.x_r2;
    res2 = base - s.x_r2lam - acc_t(2) * t * m2;
    res2 = res2 < acc_t(0) ? acc_t(0) : res2;
  }
  const acc_t alpha = s.lam_r / (m2 + acc_t(kEpsilon));
  // N - gamma as (N - pos) + t sum r: no cancellation when t << lam (N <= D at a large scale).
  const acc_t beta = (p.num_samples - s.pos + t * s.r) / (res2 + acc_t(kEpsilon));
  const acc_t change = logme_abs(alpha / beta - t) / t;
  state.alpha = alpha;
  state.beta = beta;
  state.t_used = t;
  state.m2 = m2;
  state.res2 = res2;
  state.steps += 1;
  // A NaN change never stops a column, as in evidence.py.
  return p.strict ? change < p.tol : change <= p.tol;
}

// Log evidence / N of a column at its final state, given
// logdet_sum = sum_i w_i log(alpha + beta lam_i) over the k eigenvalues.
template <typename acc_t>
LOGME_HOST_DEVICE acc_t column_evidence(
    const ColumnState<acc_t>& state, acc_t logdet_sum, const ColumnProblem<acc_t>& p) {
  acc_t m2 = state.m2;
  acc_t res2 = state.res2;
  if (p.strict) {  // the ICML code adds epsilon inside the evidence too
    m2 += acc_t(kEpsilon);
    res2 += acc_t(kEpsilon);
  }
  const acc_t half = acc_t(0.5);
  const acc_t log_alpha = logme_log(state.alpha);
  const acc_t logdet = logdet_sum + acc_t(p.logdet_zeros) * log_alpha;
  const acc_t n = p.num_samples;
  return (half * p.num_features * log_alpha + half * n * logme_log(state.beta) - half * logdet -
          half * state.beta * res2 - half * state.alpha * m2 - half * n * acc_t(kLog2Pi)) /
         n;
}

// Host side, defined in fixed_point.cpp: TORCH_CHECKs shared by every kernel.
void check_inputs(
    const at::Tensor& eigenvalues, const at::Tensor& proj_sq, const at::Tensor& target_sq,
    const std::optional<at::Tensor>& whitened_sq, const std::optional<at::Tensor>& outside_sq,
    const std::optional<at::Tensor>& logdet_weights, int64_t num_samples, int64_t num_features,
    int64_t max_iter, double tol);

// The tensors a kernel reads, made contiguous, and the per-column settings.
struct PreparedInputs {
  at::Tensor eigenvalues;     // [k]
  at::Tensor x;               // [C, k]: whitened_sq when given, else proj_sq
  at::Tensor base;            // [C]: outside_sq when whitened, else target_sq
  at::Tensor logdet_weights;  // [k], or undefined: every weight is 1
  int64_t num_columns;
  int64_t k;
};

PreparedInputs prepare_inputs(
    const at::Tensor& eigenvalues, const at::Tensor& proj_sq, const at::Tensor& target_sq,
    const std::optional<at::Tensor>& whitened_sq, const std::optional<at::Tensor>& outside_sq,
    const std::optional<at::Tensor>& logdet_weights);

// The problem settings in the accumulation type.
template <typename acc_t>
ColumnProblem<acc_t> make_problem(
    int64_t num_samples, int64_t num_features, int64_t k, int64_t max_iter, double tol,
    bool strict, bool whitened, bool has_weights) {
  return ColumnProblem<acc_t>{
      static_cast<acc_t>(num_samples), static_cast<acc_t>(num_features), static_cast<acc_t>(tol),
      max_iter,
      // Without weights, log|A| runs over all D eigenvalues: the k given and
      // D - k zeros. With weights (the published rank truncation), only those.
      has_weights ? 0 : num_features - k, strict, whitened};
}

}  // namespace torch_logme
