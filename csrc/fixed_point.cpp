// Schema of torch_logme::fixed_point and the input checks every kernel shares.
//
// The op runs the whole LogME fixed point (every step, every column) of
// torch_logme/evidence.py in one call. Kernels: cpu/fixed_point_cpu.cpp and
// cuda/fixed_point_cuda.cu; the fake (meta) kernel is registered from Python
// (torch_logme/_extension.py) so torch.compile can trace the op.
#include <torch/library.h>

#include "fixed_point.h"

namespace torch_logme {

void check_inputs(
    const at::Tensor& eigenvalues, const at::Tensor& proj_sq, const at::Tensor& target_sq,
    const std::optional<at::Tensor>& whitened_sq, const std::optional<at::Tensor>& outside_sq,
    const std::optional<at::Tensor>& logdet_weights, int64_t num_samples, int64_t num_features,
    int64_t max_iter, double tol) {
  TORCH_CHECK(eigenvalues.dim() == 1 && eigenvalues.numel() >= 1,
              "fixed_point: eigenvalues must be 1-D [k] with k >= 1, got shape ", eigenvalues.sizes());
  const auto dtype = eigenvalues.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "fixed_point: eigenvalues must be float32 or float64, got ", dtype);
  const int64_t k = eigenvalues.size(0);
  TORCH_CHECK(proj_sq.dim() == 2 && proj_sq.size(1) == k,
              "fixed_point: proj_sq must be [C, k] with k = ", k, ", got shape ", proj_sq.sizes());
  const int64_t c = proj_sq.size(0);
  TORCH_CHECK(target_sq.dim() == 1 && target_sq.size(0) == c,
              "fixed_point: target_sq must be [C] with C = ", c, ", got shape ", target_sq.sizes());
  TORCH_CHECK(whitened_sq.has_value() == outside_sq.has_value(),
              "fixed_point: give whitened_sq and outside_sq together, or neither");
  std::vector<std::pair<const char*, const at::Tensor*>> tensors = {
      {"proj_sq", &proj_sq}, {"target_sq", &target_sq}};
  if (whitened_sq.has_value()) {
    TORCH_CHECK(whitened_sq->dim() == 2 && whitened_sq->size(0) == c && whitened_sq->size(1) == k,
                "fixed_point: whitened_sq must be [C, k] = [", c, ", ", k, "], got shape ",
                whitened_sq->sizes());
    TORCH_CHECK(outside_sq->dim() == 1 && outside_sq->size(0) == c,
                "fixed_point: outside_sq must be [C] with C = ", c, ", got shape ", outside_sq->sizes());
    tensors.emplace_back("whitened_sq", &*whitened_sq);
    tensors.emplace_back("outside_sq", &*outside_sq);
  }
  if (logdet_weights.has_value()) {
    TORCH_CHECK(logdet_weights->dim() == 1 && logdet_weights->size(0) == k,
                "fixed_point: logdet_weights must be [k] with k = ", k, ", got shape ",
                logdet_weights->sizes());
    tensors.emplace_back("logdet_weights", &*logdet_weights);
  }
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(tensor->scalar_type() == dtype, "fixed_point: ", name, " must have the dtype of eigenvalues (",
                dtype, "), got ", tensor->scalar_type());
    TORCH_CHECK(tensor->device() == eigenvalues.device(), "fixed_point: ", name,
                " must be on the device of eigenvalues (", eigenvalues.device(), "), got ", tensor->device());
  }
  TORCH_CHECK(num_samples >= 1, "fixed_point: num_samples must be >= 1, got ", num_samples);
  TORCH_CHECK(num_features >= k, "fixed_point: num_features must be >= k = ", k, ", got ", num_features);
  TORCH_CHECK(max_iter >= 1, "fixed_point: max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(tol > 0, "fixed_point: tol must be > 0, got ", tol);
}

PreparedInputs prepare_inputs(
    const at::Tensor& eigenvalues, const at::Tensor& proj_sq, const at::Tensor& target_sq,
    const std::optional<at::Tensor>& whitened_sq, const std::optional<at::Tensor>& outside_sq,
    const std::optional<at::Tensor>& logdet_weights) {
  const bool whitened = whitened_sq.has_value();
  PreparedInputs in;
  in.eigenvalues = eigenvalues.contiguous();
  // The whitened form reads only p^2 and the outside part; the primal only z^2 and y^T y.
  in.x = (whitened ? *whitened_sq : proj_sq).contiguous();
  in.base = (whitened ? *outside_sq : target_sq).contiguous();
  if (logdet_weights.has_value()) {
    in.logdet_weights = logdet_weights->contiguous();
  }
  in.num_columns = proj_sq.size(0);
  in.k = eigenvalues.size(0);
  return in;
}

}  // namespace torch_logme

TORCH_LIBRARY(torch_logme, m) {
  // Per column c of C, from alpha = beta = 1: at most max_iter updates of
  // the published fixed point, stopping after the update whose relative
  // change of alpha/beta is <= tol (< tol when strict, the ICML variant).
  // Inputs: eigenvalues [k] >= 0, proj_sq [C, k] = z^2, target_sq [C] = y^T y;
  // optionally whitened_sq [C, k] = z^2 / lam and outside_sq [C] (the part of
  // y^T y outside the eigen-directions), which give the residual without
  // cancellation; optionally logdet_weights [k], which restrict log|A| to the
  // weighted eigenvalues (the published N < D code) instead of all k plus
  // num_features - k zeros. Returns, each [C]: alpha, beta, t (alpha / beta
  // at the start of the last step), the log evidence / N, steps (int64).
  m.def(
      "fixed_point(Tensor eigenvalues, Tensor proj_sq, Tensor target_sq, Tensor? whitened_sq, "
      "Tensor? outside_sq, Tensor? logdet_weights, int num_samples, int num_features, "
      "int max_iter, float tol, bool strict) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
