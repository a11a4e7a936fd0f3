// The float and double instantiations of the randomized/exact truncated SVD (declared `extern
// template` in the header), compiled once with the library's flags.
#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace linalg::detail {

template TruncatedSvd<float> truncated_svd_impl<float>(
    const Eigen::Ref<const ColMatrix<float>, 0, Eigen::OuterStride<>>&, bool, Index, const SvdOptions&);
template TruncatedSvd<double> truncated_svd_impl<double>(
    const Eigen::Ref<const ColMatrix<double>, 0, Eigen::OuterStride<>>&, bool, Index, const SvdOptions&);

}  // namespace linalg::detail
LOWRANK_END_NAMESPACE
