#include "eval/fid.h"

#include <zip.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <regex>
#include <stdexcept>
#include <vector>

#include "base/errors.h"

namespace ddpm {

FeatureMoments::FeatureMoments(int64_t dim)
    : dim_(dim), packed_(torch::zeros({1 + dim + dim * dim}, torch::kFloat64)) {}

void FeatureMoments::Add(const torch::Tensor& features) {
  TORCH_CHECK(features.dim() == 2 && features.size(1) == dim_, "features must be [n, ", dim_,
              "], got ", features.sizes());
  const torch::Tensor f = features.to(torch::kFloat64);
  // On the features' device, then one copy of the sums to the host.
  const torch::Tensor sums =
      torch::cat({torch::full({1}, static_cast<double>(f.size(0)), f.options()), f.sum(0),
                  f.t().mm(f).reshape({-1})});
  packed_ += sums.cpu();
}

int64_t FeatureMoments::count() const { return static_cast<int64_t>(packed_[0].item<double>()); }

torch::Tensor FeatureMoments::Mean() const { return packed_.slice(0, 1, 1 + dim_) / packed_[0]; }

torch::Tensor FeatureMoments::Covariance() const {
  const double n = packed_[0].item<double>();
  TORCH_CHECK(n >= 2, "a covariance needs at least 2 samples, got ", n);
  const torch::Tensor mean = Mean();
  const torch::Tensor outer = packed_.slice(0, 1 + dim_).reshape({dim_, dim_});
  return (outer - n * torch::outer(mean, mean)) / (n - 1);
}

ScoreMoments::ScoreMoments(int64_t total_samples, int classes, int splits)
    : total_(total_samples),
      classes_(classes),
      splits_(splits),
      packed_(torch::zeros({splits, 2 + classes}, torch::kFloat64)) {
  TORCH_CHECK(total_samples >= splits, "the Inception Score's ", splits, " splits need at least ",
              splits, " samples, got ", total_samples);
}

void ScoreMoments::Add(const torch::Tensor& logits, int64_t first_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == classes_, "the Inception Score expects ",
              classes_, " class logits per sample, got shape ", logits.sizes());
  const torch::Tensor log_p = torch::log_softmax(logits.to(torch::kFloat64), 1).cpu();
  const torch::Tensor p = log_p.exp();
  // The split whose slice [s * n / splits, (s + 1) * n / splits) holds sample i.
  const torch::Tensor index =
      torch::arange(first_index, first_index + logits.size(0), torch::kLong);
  const torch::Tensor split = ((index + 1) * splits_ + total_ - 1).div(total_, "floor") - 1;
  packed_.index_add_(0, split,
                     torch::cat({torch::ones({p.size(0), 1}, torch::kFloat64),
                                 (p * log_p).sum(1, /*keepdim=*/true), p},
                                1));
}

std::pair<double, double> ScoreMoments::Score() const {
  std::vector<double> scores;
  for (int s = 0; s < splits_; ++s) {
    const torch::Tensor stats = packed_[s];
    const double n = stats[0].item<double>();
    TORCH_CHECK(n > 0, "Inception Score split ", s, " has no samples");
    const torch::Tensor p_y = stats.slice(0, 2) / n;
    // E_x KL(p(y|x) || p(y)) = E_x sum p log p - sum p(y) log p(y).
    const double kl =
        stats[1].item<double>() / n - torch::special::xlogy(p_y, p_y).sum().item<double>();
    scores.push_back(std::exp(kl));
  }
  double mean = 0, variance = 0;
  for (double score : scores) mean += score / scores.size();
  for (double score : scores) variance += (score - mean) * (score - mean) / scores.size();
  return {mean, std::sqrt(variance)};
}

namespace {

// Eigenvalues of a symmetric matrix with those below rounding (d x machine epsilon x the
// largest, the usual rank threshold) set to 0: a rank-deficient covariance's zero eigenvalues
// come out as +-1e-12-ish, whose square roots would otherwise add up over thousands of them.
torch::Tensor CleanEigenvalues(const torch::Tensor& eigenvalues) {
  const double largest = eigenvalues.abs().max().item<double>();
  const double tolerance = eigenvalues.size(0) * std::numeric_limits<double>::epsilon() * largest;
  return torch::where(eigenvalues > tolerance, eigenvalues, torch::zeros_like(eigenvalues));
}

// tr(sqrt(S1 S2)) through sqrt(S1) S2 sqrt(S1), which is symmetric positive semi-definite,
// from S1's eigendecomposition (w1, v1).
double TraceSqrtProduct(const torch::Tensor& w1, const torch::Tensor& v1,
                        const torch::Tensor& sigma2) {
  const torch::Tensor sqrt1 = v1.mm(torch::diag(CleanEigenvalues(w1).sqrt())).mm(v1.t());
  torch::Tensor product = sqrt1.mm(sigma2).mm(sqrt1);
  product = (product + product.t()) / 2;
  return CleanEigenvalues(torch::linalg_eigvalsh(product, "L")).sqrt().sum().item<double>();
}

// Whether a symmetric matrix's eigenvalues hold one below -tolerance x the largest magnitude.
bool NotPositiveSemiDefinite(const torch::Tensor& eigenvalues) {
  const double largest = eigenvalues.abs().max().item<double>();
  return !std::isfinite(largest) ||
         eigenvalues.min().item<double>() < -1e-8 * std::max(largest, 1.0);
}

}  // namespace

FrechetResult FrechetDistance(const torch::Tensor& mu1_in, const torch::Tensor& sigma1_in,
                              const torch::Tensor& mu2_in, const torch::Tensor& sigma2_in,
                              double eps) {
  const torch::Tensor mu1 = mu1_in.to(torch::kFloat64).cpu().flatten();
  const torch::Tensor mu2 = mu2_in.to(torch::kFloat64).cpu().flatten();
  torch::Tensor sigma1 = sigma1_in.to(torch::kFloat64).cpu();
  torch::Tensor sigma2 = sigma2_in.to(torch::kFloat64).cpu();
  const int64_t d = mu1.size(0);
  if (mu2.size(0) != d || sigma1.sizes() != torch::IntArrayRef({d, d}) ||
      sigma2.sizes() != torch::IntArrayRef({d, d})) {
    throw std::invalid_argument("FID: the statistics differ in dimension: mu " + std::to_string(d) +
                                " and " + std::to_string(mu2.size(0)) + ", sigma " +
                                c10::str(sigma1.sizes()) + " and " + c10::str(sigma2.sizes()));
  }
  sigma1 = (sigma1 + sigma1.t()) / 2;
  sigma2 = (sigma2 + sigma2.t()) / 2;
  // Each matrix is decomposed once: S1 for both the check and the square root.
  FrechetResult result;
  std::tuple<torch::Tensor, torch::Tensor> s1 = torch::linalg_eigh(sigma1, "L");
  const bool broken = NotPositiveSemiDefinite(std::get<0>(s1)) ||
                      NotPositiveSemiDefinite(torch::linalg_eigvalsh(sigma2, "L"));
  double trace_sqrt = broken ? std::numeric_limits<double>::quiet_NaN()
                             : TraceSqrtProduct(std::get<0>(s1), std::get<1>(s1), sigma2);
  if (!std::isfinite(trace_sqrt)) {
    // As pytorch-fid does when sqrtm fails: offset both diagonals and try again.
    result.regularized = true;
    result.eps = eps;
    const torch::Tensor offset = eps * torch::eye(d, torch::kFloat64);
    sigma1 = sigma1 + offset;
    sigma2 = sigma2 + offset;
    s1 = torch::linalg_eigh(sigma1, "L");
    trace_sqrt = TraceSqrtProduct(std::get<0>(s1), std::get<1>(s1), sigma2);
  }
  const torch::Tensor diff = mu1 - mu2;
  result.fid = diff.dot(diff).item<double>() + sigma1.trace().item<double>() +
               sigma2.trace().item<double>() - 2 * trace_sqrt;
  return result;
}

// ---- .npz -------------------------------------------------------------------------------

namespace {

torch::Tensor ParseNpy(const std::string& bytes, const std::string& where) {
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    throw FormatError(where + ": not a .npy array (no \\x93NUMPY magic)");
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_length = 0, offset = 0;
  if (major == 1) {
    header_length =
        static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw FormatError(where + ": truncated .npy header");
    for (int i = 0; i < 4; ++i)
      header_length |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    offset = 12;
  } else {
    throw FormatError(where + ": .npy format version " + std::to_string(major) +
                      " is not supported (1, 2 and 3 are)");
  }
  if (offset + header_length > bytes.size()) throw FormatError(where + ": truncated .npy header");
  const std::string header = bytes.substr(offset, header_length);
  std::smatch descr, order, shape;
  if (!std::regex_search(header, descr, std::regex("'descr':\\s*'([^']*)'")) ||
      !std::regex_search(header, order, std::regex("'fortran_order':\\s*(True|False)")) ||
      !std::regex_search(header, shape, std::regex("'shape':\\s*\\(([^)]*)\\)"))) {
    throw FormatError(where + ": unreadable .npy header: " + header);
  }
  torch::ScalarType type;
  size_t item = 0;
  if (descr[1] == "<f8") {
    type = torch::kFloat64, item = 8;
  } else if (descr[1] == "<f4") {
    type = torch::kFloat32, item = 4;
  } else if (descr[1] == "<i8") {
    type = torch::kInt64, item = 8;
  } else if (descr[1] == "|u1") {
    type = torch::kUInt8, item = 1;
  } else {
    throw FormatError(where + ": dtype " + descr[1].str() +
                      " is not supported (float64, float32, int64 little-endian, uint8)");
  }
  // The shape, each size and their product bounded by the bytes there are: a header cannot
  // make the reader allocate more than the file holds.
  const size_t data = offset + header_length;
  const size_t available = bytes.size() - data;
  std::vector<int64_t> sizes;
  const std::string dims = shape[1];
  const std::regex number("\\d+");
  int64_t count = 1;
  for (std::sregex_iterator it(dims.begin(), dims.end(), number), end; it != end; ++it) {
    const std::string digits = it->str();
    const size_t size = digits.size() > 18 ? SIZE_MAX : std::stoull(digits);
    if (size > 0 && static_cast<size_t>(count) * item > available / size) {
      throw FormatError(where + ": its shape (" + dims + ") needs more than the " +
                        std::to_string(available) + " bytes of data it holds");
    }
    sizes.push_back(static_cast<int64_t>(size));
    count *= static_cast<int64_t>(size);
  }
  if (bytes.size() - data != static_cast<size_t>(count) * item) {
    throw FormatError(where + ": holds " + std::to_string(bytes.size() - data) +
                      " bytes of data, its header says " + std::to_string(count * item));
  }
  const bool fortran = order[1] == "True";
  std::vector<int64_t> stored = sizes;
  if (fortran) std::reverse(stored.begin(), stored.end());
  torch::Tensor tensor = torch::empty(stored, type);
  std::memcpy(tensor.data_ptr(), bytes.data() + data, bytes.size() - data);
  if (fortran) {
    std::vector<int64_t> reversed(stored.size());
    for (size_t i = 0; i < stored.size(); ++i)
      reversed[i] = static_cast<int64_t>(stored.size() - 1 - i);
    tensor = tensor.permute(reversed).contiguous();
  }
  return tensor;
}

std::string NpyBytes(const torch::Tensor& input, const std::string& name) {
  const torch::Tensor tensor = input.cpu().contiguous();
  std::string descr;
  if (tensor.scalar_type() == torch::kFloat64) {
    descr = "<f8";
  } else if (tensor.scalar_type() == torch::kFloat32) {
    descr = "<f4";
  } else if (tensor.scalar_type() == torch::kInt64) {
    descr = "<i8";
  } else if (tensor.scalar_type() == torch::kUInt8) {
    descr = "|u1";
  } else {
    throw std::invalid_argument("npz: array '" + name +
                                "' is not float64, float32, int64 or uint8");
  }
  // numpy's own spelling: (), (3,), (2, 3).
  std::string shape;
  for (int64_t i = 0; i < tensor.dim(); ++i)
    shape += (i ? ", " : "") + std::to_string(tensor.size(i));
  if (tensor.dim() == 1) shape += ",";
  std::string header =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  // Padded with spaces and ended by a newline so that the data starts at a multiple of 64.
  const size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::string bytes = "\x93NUMPY";
  bytes += static_cast<char>(1);
  bytes += static_cast<char>(0);
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  bytes.append(static_cast<const char*>(tensor.data_ptr()), tensor.nbytes());
  return bytes;
}

std::string ZipError(zip_t* archive) { return zip_strerror(archive); }

}  // namespace

std::map<std::string, torch::Tensor> ReadNpz(const std::string& path) {
  int error = 0;
  zip_t* archive = zip_open(path.c_str(), ZIP_RDONLY, &error);
  if (archive == nullptr) {
    zip_error_t detail;
    zip_error_init_with_code(&detail, error);
    const std::string message = zip_error_strerror(&detail);
    zip_error_fini(&detail);
    throw FormatError(path + ": cannot open as a .npz: " + message);
  }
  std::map<std::string, torch::Tensor> arrays;
  try {
    const zip_int64_t entries = zip_get_num_entries(archive, 0);
    for (zip_int64_t i = 0; i < entries; ++i) {
      zip_stat_t stat;
      if (zip_stat_index(archive, i, 0, &stat) != 0)
        throw FormatError(path + ": " + ZipError(archive));
      std::string name =
          (stat.valid & ZIP_STAT_NAME) != 0 && stat.name != nullptr ? stat.name : "(unnamed)";
      if ((stat.valid & ZIP_STAT_SIZE) == 0) {
        throw FormatError(path + ": " + name + ": the archive gives no size for it");
      }
      // The member's size is what its header claims: bound it before allocating. Deflate
      // expands at most about 1032 times; nothing FID reads is near 1 GiB.
      constexpr zip_uint64_t kMaxMember = zip_uint64_t{1} << 30;
      const bool compressed_known = (stat.valid & ZIP_STAT_COMP_SIZE) != 0;
      if (stat.size > kMaxMember ||
          (compressed_known && stat.size > 1032 * stat.comp_size + 4096)) {
        throw FormatError(path + ": " + name + ": claims " + std::to_string(stat.size) +
                          " bytes from " + std::to_string(stat.comp_size) +
                          " compressed; not an array this reader takes");
      }
      std::string bytes(stat.size, '\0');
      zip_file_t* member = zip_fopen_index(archive, i, 0);
      if (member == nullptr) throw FormatError(path + ": " + name + ": " + ZipError(archive));
      const zip_int64_t read = zip_fread(member, bytes.data(), stat.size);
      zip_fclose(member);
      if (read != static_cast<zip_int64_t>(stat.size)) {
        throw FormatError(path + ": " + name + ": truncated or corrupt member");
      }
      if (name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0)
        name.resize(name.size() - 4);
      arrays[name] = ParseNpy(bytes, path + ": array '" + name + "'");
    }
  } catch (...) {
    zip_discard(archive);
    throw;
  }
  zip_discard(archive);
  return arrays;
}

void WriteNpz(const std::string& path, const std::map<std::string, torch::Tensor>& arrays) {
  const std::string temporary = path + ".tmp";
  std::filesystem::remove(temporary);
  int error = 0;
  zip_t* archive = zip_open(temporary.c_str(), ZIP_CREATE | ZIP_EXCL, &error);
  if (archive == nullptr) throw FileError(temporary + ": cannot create");
  std::vector<std::string> members;  // must outlive zip_close, which reads them
  members.reserve(arrays.size());
  for (const auto& [name, tensor] : arrays) {
    members.push_back(NpyBytes(tensor, name));
    zip_source_t* source =
        zip_source_buffer(archive, members.back().data(), members.back().size(), 0);
    const zip_int64_t index = source == nullptr ? -1
                                                : zip_file_add(archive, (name + ".npy").c_str(),
                                                               source, ZIP_FL_OVERWRITE);
    if (index < 0) {
      if (source != nullptr) zip_source_free(source);
      const std::string message = ZipError(archive);
      zip_discard(archive);
      throw FileError(temporary + ": cannot add " + name + ".npy: " + message);
    }
    zip_set_file_compression(archive, index, ZIP_CM_STORE, 0);
  }
  if (zip_close(archive) != 0) {
    const std::string message = ZipError(archive);
    zip_discard(archive);
    throw FileError(temporary + ": cannot write: " + message);
  }
  std::filesystem::rename(temporary, path);
}

std::pair<torch::Tensor, torch::Tensor> ReadReferenceStats(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) {
    throw FormatError(path +
                      ": no such reference statistics file (make one with "
                      "`ddpm_fid stats --data cifar10:PATH --out " +
                      path + "`)");
  }
  std::map<std::string, torch::Tensor> arrays = ReadNpz(path);
  for (const char* name : {"mu", "sigma"}) {
    if (arrays.count(name) == 0) {
      throw FormatError(path + ": has no array '" + name + "' (a FID .npz holds mu and sigma)");
    }
  }
  torch::Tensor mu = arrays["mu"].to(torch::kFloat64).flatten();
  torch::Tensor sigma = arrays["sigma"].to(torch::kFloat64);
  if (sigma.dim() != 2 || sigma.size(0) != mu.size(0) || sigma.size(1) != mu.size(0)) {
    throw FormatError(path + ": sigma is " + c10::str(sigma.sizes()) + ", mu has " +
                      std::to_string(mu.size(0)) + " entries");
  }
  return {mu, sigma};
}

}  // namespace ddpm
