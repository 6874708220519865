// ddpm_fid's commands other than `checkpoint` (fid_checkpoint.h): the reference statistics of a
// dataset (`stats`), FID, IS, KID and PRD of a folder or archive of samples (`score`), and the
// memorization report (`memorization`). Each has its flags, a job read from them, and one call
// that runs it; the main only dispatches.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "config/config.h"
#include "config/flags.h"
#include "eval/memorization.h"
#include "trainer/communicator.h"

namespace ddpm {

/// What the three commands share: the Inception network and how images reach it.
struct InceptionInput {
  /// The FID Inception weights ("" for none: only `memorization` goes on without them).
  std::string weights;
  /// Folder images are centre-cropped and resized to this first.
  int image_size = 32;
  /// Images per Inception forward pass.
  int batch = 50;
  torch::Device device = torch::kCPU;
};

/// ddpm_fid stats: the .npz of mu, sigma and the features of a dataset.
struct FidStatsJob {
  InceptionInput input;
  /// cifar10:PATH (the training split) or folder:PATH.
  std::string data;
  std::string out;
};

/// ddpm_fid score: FID and IS (and KID, PRD) of samples against reference statistics.
struct FidScoreJob {
  InceptionInput input;
  /// folder:PATH, npz:PATH or cifar10:PATH.
  std::string samples;
  /// The reference statistics .npz.
  std::string ref;
  IsLogits is_logits = IsLogits::kUnbiased;
  bool kid = false;
  bool prd = false;
  /// Seeds KID's subsets and PRD's reference draw.
  uint64_t seed = 1;
};

/// ddpm_fid memorization: each sample's two nearest training images, over the ranks.
struct MemorizationJob {
  InceptionInput input;
  std::string samples;
  /// cifar10:PATH, folder:PATH, npz:PATH or run:RUN_DIR.
  std::string train;
  /// A directory for neighbours.csv, closest_pairs.png and summary.txt.
  std::string out = "memorization";
  MemorizationOptions options;
};

/// Declares each command's flags (--inception defaults to $DDPM_INCEPTION_WEIGHTS).
void AddFidStatsFlags(Flags& flags);
void AddFidScoreFlags(Flags& flags);
void AddMemorizationFlags(Flags& flags);
/// Reads each command's job from its parsed flags; throws FlagError naming the flag.
FidStatsJob FidStatsJobFromFlags(const Flags& flags);
FidScoreJob FidScoreJobFromFlags(const Flags& flags);
MemorizationJob MemorizationJobFromFlags(const Flags& flags);

/// Measures the dataset and writes the .npz; returns the exit code (0).
int RunFidStats(const FidStatsJob& job);
/// Measures the samples and prints FID, IS, KID and PRD with the protocol; returns 0.
int RunFidScore(const FidScoreJob& job);
/// Searches the training set across comm's ranks; rank 0 prints and writes the report.
int RunMemorization(const MemorizationJob& job, Communicator& comm);

}  // namespace ddpm
