#include "eval/feature_metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "trainer/communicator.h"

namespace ddpm {
namespace {

// Rows of a distance block: [rows, columns] float64 stays near 100 MB at 10k columns.
constexpr int64_t kBlockRows = 1024;

void CheckFeatures(const torch::Tensor& features, const char* what) {
  if (features.dim() != 2 || features.size(0) < 1 || features.size(1) < 1) {
    throw std::invalid_argument(std::string(what) +
                                " features must be [n, d] with n, d >= 1, got " +
                                c10::str(features.sizes()));
  }
}

void CheckSameWidth(const torch::Tensor& fake, const torch::Tensor& real) {
  CheckFeatures(fake, "fake");
  CheckFeatures(real, "real");
  if (fake.size(1) != real.size(1)) {
    throw std::invalid_argument("fake features have " + std::to_string(fake.size(1)) +
                                " dimensions, real ones " + std::to_string(real.size(1)));
  }
}

// Rows [first, end) of n that rank r of world takes.
std::pair<int64_t, int64_t> ShareOf(int64_t n, int rank, int world) {
  return {n * rank / world, n * (rank + 1) / world};
}

// Euclidean distances between the rows of a [p, d] and b [q, d] (float64), with the squared
// norms given: sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)).
torch::Tensor Distances(const torch::Tensor& a, const torch::Tensor& a_sq, const torch::Tensor& b,
                        const torch::Tensor& b_sq) {
  return (a_sq.unsqueeze(1) + b_sq.unsqueeze(0) - 2 * a.mm(b.t())).clamp_min_(0).sqrt_();
}

torch::Tensor SquaredNorms(const torch::Tensor& x) { return (x * x).sum(1); }

// A point is inside a ball when its distance is below the radius by more than the rounding of
// the expanded distance (which differs in the last bits between a matrix and its transpose):
// a tie, as between a point and its duplicate, is outside, as exact distances have it.
constexpr double kInside = 1 - 1e-9;

}  // namespace

std::vector<int64_t> DrawSubset(SplitMix64& rng, int64_t n, int64_t m) {
  if (m < 0 || m > n) {
    throw std::invalid_argument("a subset of " + std::to_string(m) + " of " + std::to_string(n) +
                                " points");
  }
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  for (int64_t i = 0; i < m; ++i) {
    const auto j = i + static_cast<int64_t>(rng.Below(static_cast<uint64_t>(n - i)));
    std::swap(order[i], order[j]);
  }
  order.resize(m);
  return order;
}

KidResult KernelInceptionDistance(const torch::Tensor& fake, const torch::Tensor& real,
                                  Communicator& comm, const KidOptions& options) {
  CheckSameWidth(fake, real);
  if (options.subsets < 1 || options.max_subset_size < 2) {
    throw std::invalid_argument("KID needs at least one subset of at least 2 points");
  }
  const int64_t size = std::min({options.max_subset_size, fake.size(0), real.size(0)});
  if (size < 2) {
    throw std::invalid_argument("KID needs at least 2 fake and 2 real points, got " +
                                std::to_string(fake.size(0)) + " and " +
                                std::to_string(real.size(0)));
  }
  const double dim = static_cast<double>(fake.size(1));
  const double s = static_cast<double>(size);
  const auto options64 = torch::TensorOptions().dtype(torch::kLong).device(fake.device());
  torch::Tensor mmds = torch::zeros({options.subsets}, torch::kFloat64);
  SplitMix64 rng(options.seed);
  for (int subset = 0; subset < options.subsets; ++subset) {
    // Every rank draws every subset, so that the stream stays the same; it computes its own.
    std::vector<int64_t> fake_rows = DrawSubset(rng, fake.size(0), size);
    std::vector<int64_t> real_rows = DrawSubset(rng, real.size(0), size);
    if (subset % comm.world_size() != comm.rank()) continue;
    const torch::Tensor x =
        fake.index_select(0, torch::tensor(fake_rows, options64)).to(torch::kFloat64);
    const torch::Tensor y =
        real.index_select(0, torch::tensor(real_rows, options64)).to(torch::kFloat64);
    const auto kernel = [dim](const torch::Tensor& a, const torch::Tensor& b) {
      return (a.mm(b.t()) / dim + 1).pow(3);
    };
    const torch::Tensor k_xx = kernel(x, x), k_yy = kernel(y, y);
    const double off_xx = (k_xx.sum() - k_xx.diagonal().sum()).item<double>();
    const double off_yy = (k_yy.sum() - k_yy.diagonal().sum()).item<double>();
    const double cross = kernel(x, y).sum().item<double>();
    mmds[subset] = (off_xx + off_yy) / (s * (s - 1)) - 2 * cross / (s * s);
  }
  comm.AllReduce(mmds, ReduceOp::kSum, "all-reduce of KID's subsets");
  KidResult result;
  result.mean = mmds.mean().item<double>();
  result.std = mmds.std(/*unbiased=*/false).item<double>();
  result.subsets = options.subsets;
  result.subset_size = size;
  return result;
}

torch::Tensor NearestNeighbourRadii(const torch::Tensor& points, const std::vector<int>& ks,
                                    Communicator& comm) {
  CheckFeatures(points, "the");
  const int64_t n = points.size(0);
  const int k_max = *std::max_element(ks.begin(), ks.end());
  if (k_max + 1 > n) {
    throw std::invalid_argument("the distance to the " + std::to_string(k_max) +
                                " nearest neighbours needs " + std::to_string(k_max + 1) +
                                " points, got " + std::to_string(n));
  }
  const torch::Tensor all = points.to(torch::kFloat64);
  const torch::Tensor all_sq = SquaredNorms(all);
  torch::Tensor radii = torch::zeros({n, static_cast<int64_t>(ks.size())}, torch::kFloat64);
  const auto [first, end] = ShareOf(n, comm.rank(), comm.world_size());
  for (int64_t row = first; row < end; row += kBlockRows) {
    const int64_t count = std::min(kBlockRows, end - row);
    const torch::Tensor block = all.slice(0, row, row + count);
    // The k + 1 smallest distances, the row's own 0 among them.
    const torch::Tensor nearest =
        std::get<0>(Distances(block, all_sq.slice(0, row, row + count), all, all_sq)
                        .topk(k_max + 1, 1, /*largest=*/false, /*sorted=*/true))
            .cpu();
    for (size_t i = 0; i < ks.size(); ++i) {
      radii.slice(0, row, row + count)
          .select(1, static_cast<int64_t>(i))
          .copy_(nearest.select(1, ks[i]));
    }
  }
  comm.AllReduce(radii, ReduceOp::kSum, "all-reduce of the nearest-neighbour radii");
  return radii;
}

PrdReference MakePrdReference(const torch::Tensor& real, Communicator& comm) {
  PrdReference reference;
  reference.features = real;
  reference.radii = NearestNeighbourRadii(
      real, {PrdResult::kPrecisionRecallK, PrdResult::kDensityCoverageK}, comm);
  return reference;
}

PrdResult PrecisionRecallDensityCoverage(const PrdReference& real, const torch::Tensor& fake,
                                         Communicator& comm) {
  CheckSameWidth(fake, real.features);
  const torch::Device device = fake.device();
  const torch::Tensor real64 = real.features.to(device, torch::kFloat64);
  const torch::Tensor fake64 = fake.to(torch::kFloat64);
  const torch::Tensor real_sq = SquaredNorms(real64), fake_sq = SquaredNorms(fake64);
  const torch::Tensor real_pr = real.radii.select(1, 0).to(device);
  const torch::Tensor real_dc = real.radii.select(1, 1).to(device);
  const torch::Tensor fake_pr =
      NearestNeighbourRadii(fake, {PrdResult::kPrecisionRecallK}, comm).select(1, 0).to(device);
  // precision, density's count, recall, coverage.
  double sums[4] = {0, 0, 0, 0};
  const auto [fake_first, fake_end] = ShareOf(fake.size(0), comm.rank(), comm.world_size());
  for (int64_t row = fake_first; row < fake_end; row += kBlockRows) {
    const int64_t count = std::min(kBlockRows, fake_end - row);
    const torch::Tensor d = Distances(fake64.slice(0, row, row + count),
                                      fake_sq.slice(0, row, row + count), real64, real_sq);
    sums[0] += (d < kInside * real_pr.unsqueeze(0)).any(1).sum().item<double>();
    sums[1] += (d < kInside * real_dc.unsqueeze(0)).sum().item<double>();
  }
  const auto [real_first, real_end] =
      ShareOf(real.features.size(0), comm.rank(), comm.world_size());
  for (int64_t row = real_first; row < real_end; row += kBlockRows) {
    const int64_t count = std::min(kBlockRows, real_end - row);
    const torch::Tensor d = Distances(real64.slice(0, row, row + count),
                                      real_sq.slice(0, row, row + count), fake64, fake_sq);
    sums[2] += (d < kInside * fake_pr.unsqueeze(0)).any(1).sum().item<double>();
    sums[3] +=
        (std::get<0>(d.min(1)) < kInside * real_dc.slice(0, row, row + count)).sum().item<double>();
  }
  torch::Tensor packed = torch::tensor({sums[0], sums[1], sums[2], sums[3]}, torch::kFloat64);
  comm.AllReduce(packed, ReduceOp::kSum, "all-reduce of precision, recall, density, coverage");
  const double n_fake = static_cast<double>(fake.size(0));
  const double n_real = static_cast<double>(real.features.size(0));
  PrdResult result;
  result.precision = packed[0].item<double>() / n_fake;
  result.density = packed[1].item<double>() / (PrdResult::kDensityCoverageK * n_fake);
  result.recall = packed[2].item<double>() / n_real;
  result.coverage = packed[3].item<double>() / n_real;
  result.real_count = real.features.size(0);
  result.fake_count = fake.size(0);
  return result;
}

namespace {

// Keeps, per row, the two smallest of candidate distances [n, c] (indices [n, c]) listed so that
// equal distances appear in increasing index order: a stable sort keeps that order.
void KeepTwo(torch::Tensor& distance, torch::Tensor& index) {
  const auto [sorted, order] = distance.sort(/*stable=*/true, 1, /*descending=*/false);
  distance = sorted.slice(1, 0, 2).contiguous();
  index = index.gather(1, order.slice(1, 0, 2)).contiguous();
}

}  // namespace

NearestTwo FindNearestTwo(const torch::Tensor& queries,
                          const std::function<torch::Tensor(int64_t first, int64_t count)>& read,
                          int64_t train_size, Communicator& comm, int64_t block,
                          const std::function<void(int64_t, int64_t)>& progress) {
  CheckFeatures(queries, "query");
  if (train_size < 2) {
    throw std::invalid_argument("two nearest neighbours need a training set of at least 2, got " +
                                std::to_string(train_size));
  }
  const int64_t n = queries.size(0);
  const torch::Device device = queries.device();
  const torch::Tensor q = queries.to(torch::kFloat64);
  const torch::Tensor q_sq = SquaredNorms(q);
  const double inf = std::numeric_limits<double>::infinity();
  torch::Tensor best = torch::full({n, 2}, inf, q.options());
  torch::Tensor best_index = torch::full({n, 2}, train_size, q.options().dtype(torch::kLong));
  const auto [first, end] = ShareOf(train_size, comm.rank(), comm.world_size());
  for (int64_t row = first; row < end; row += block) {
    const int64_t count = std::min(block, end - row);
    const torch::Tensor train = read(row, count).to(device, torch::kFloat64);
    if (train.dim() != 2 || train.size(0) != count || train.size(1) != q.size(1)) {
      throw std::invalid_argument("training rows " + std::to_string(row) + ".." +
                                  std::to_string(row + count - 1) + " read as " +
                                  c10::str(train.sizes()) + ", expected [" + std::to_string(count) +
                                  ", " + std::to_string(q.size(1)) + "]");
    }
    torch::Tensor d = Distances(q, q_sq, train, SquaredNorms(train));
    // argmin takes the first of equal distances: the nearest, then the next with it masked.
    const torch::Tensor first_at = d.argmin(1, /*keepdim=*/true);
    const torch::Tensor first_d = d.gather(1, first_at);
    if (count > 1) d.scatter_(1, first_at, inf);
    const torch::Tensor second_at = count > 1 ? d.argmin(1, true) : first_at;
    const torch::Tensor second_d =
        count > 1 ? d.gather(1, second_at) : torch::full_like(first_d, inf);
    torch::Tensor distance = torch::cat({best, first_d, second_d}, 1);
    torch::Tensor index = torch::cat({best_index, first_at + row, second_at + row}, 1);
    KeepTwo(distance, index);
    best = distance;
    best_index = index;
    if (progress) progress(row + count - first, end - first);
  }
  // Every rank's two candidates, in rank order: increasing index among equal distances.
  // (On the host: the tools' and the control communicator, MPI, move CPU tensors only.)
  torch::Tensor distance = comm.AllGather(best.cpu(), "all-gather of the nearest neighbours")
                               .permute({1, 0, 2})
                               .reshape({n, -1});
  torch::Tensor index =
      comm.AllGather(best_index.cpu(), "all-gather of the nearest neighbours' indices")
          .permute({1, 0, 2})
          .reshape({n, -1});
  KeepTwo(distance, index);
  return {distance.cpu(), index.cpu()};
}

}  // namespace ddpm
