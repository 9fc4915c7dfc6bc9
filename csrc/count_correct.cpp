// (logits.argmax(1) == target).sum() as one op: the number of rows whose first maximal
// logit (a NaN counts as the maximum, as in torch.argmax) is at the target class.
// Why an op: a training step reports its correct predictions, and in eager PyTorch that
// expression is three dispatches and two temporaries; this is one (docs/measurements-behind-the-code.md).
// CUDA tensors go through
// that same ATen expression, on the device (no host sync, so a CUDA graph can capture it).
#include <cmath>

#include <ATen/ops/argmax.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>

#include "common.h"
#include "ops.h"

namespace lenet_fast {

namespace {

template <typename T>
int64_t count_correct_cpu(const T* z, const int64_t* target, int64_t N, int64_t C) {
  int64_t correct = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T* row = z + n * C;
    int64_t best = 0;
    for (int64_t c = 1; c < C; ++c) {
      const bool best_is_nan = std::isnan(static_cast<double>(row[best]));
      if (!best_is_nan && (row[c] > row[best] || std::isnan(static_cast<double>(row[c])))) best = c;
    }
    correct += best == target[n];
  }
  return correct;
}

}  // namespace

at::Tensor count_correct(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "lenet_fast ext: count_correct expects logits (N, C) with ",
              "C >= 1, got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong,
              "lenet_fast ext: target must be int64 of shape (", logits.size(0), ",), got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), "lenet_fast ext: target is on ", target.device(),
              " but logits are on ", logits.device());
  if (!logits.is_cpu()) return at::argmax(logits, 1).eq(target).sum();
  const at::Tensor z = logits.contiguous(), t = target.contiguous();
  int64_t correct = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ext_count_correct", [&] {
    correct = count_correct_cpu<scalar_t>(z.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), z.size(0),
                                          z.size(1));
  });
  return at::scalar_tensor(correct, t.options());
}

}  // namespace lenet_fast
