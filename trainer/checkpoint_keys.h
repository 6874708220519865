// The names of everything a training checkpoint holds: the one place that spells them. The
// trainer writes and reads its state under these names, the run adds the data cursor and the
// metadata, and the checkpoint writer records some of them in the manifest.
#pragma once

#include <string>

namespace ddpm::checkpoint_keys {

/// Optimizer steps taken (0-d int64).
inline constexpr char kStep[] = "step";
/// Prefixes of one tensor per UNet parameter: the trained weights, the EMA weights and Adam's
/// first and second moments ("model/" + the parameter's name).
inline constexpr char kModelPrefix[] = "model/";
inline constexpr char kEmaPrefix[] = "ema/";
inline constexpr char kAdamExpAvgPrefix[] = "adam/exp_avg/";
inline constexpr char kAdamExpAvgSqPrefix[] = "adam/exp_avg_sq/";
/// Adam's update count (0-d int64).
inline constexpr char kAdamSteps[] = "adam/steps";
/// A rank's dropout generator state: its own tensor, which a checkpoint read back names
/// kRngPrefix + "default/<rank>".
inline constexpr char kRng[] = "rng/default";
/// What is per rank rather than replicated starts with this.
inline constexpr char kRngPrefix[] = "rng/";
/// The data cursor (0-d int64 each): the epoch and how many of its indices were handed out.
inline constexpr char kDataEpoch[] = "data/epoch";
inline constexpr char kDataOffset[] = "data/offset";
/// Torch threads per rank that wrote it (0-d int64): a resume with others is not bitwise.
inline constexpr char kThreads[] = "meta/threads";
/// The resolved config as YAML text (uint8).
inline constexpr char kConfig[] = "meta/config";
/// The run's history that a resume carries on (0-d each): divergence rollbacks so far (int64),
/// the learning-rate factor they left (float64), checkpoints that failed to write (int64).
/// Checkpoints written before they existed lack them: 0, 1 and 0.
inline constexpr char kRollbacks[] = "run/rollbacks";
inline constexpr char kLrScale[] = "run/lr_scale";
inline constexpr char kCheckpointFailures[] = "run/checkpoint_failures";
/// The loss-aware timestep sampler's history (train.timestep_sampler: loss_second_moment):
/// the last losses per timestep [T, TimestepSampler::kHistory] (float64) and how many of them
/// are filled [T] (int64). Replicated: every rank keeps the same.
inline constexpr char kTimestepLossHistory[] = "timesteps/loss_history";
inline constexpr char kTimestepLossCounts[] = "timesteps/loss_counts";
/// Post-hoc EMA (train.phema_snapshot_every > 0): profile k's weights under
/// PhemaPrefix(k) + the parameter's name, and the profiles' relative standard deviations
/// [K] (float64). Checkpoints carry them for resume; snapshots (RUN_DIR/phema/) hold only
/// them, the step and the config.
inline constexpr char kPhemaSigmaRels[] = "phema/sigma_rels";
inline std::string PhemaPrefix(std::size_t k) { return "phema/" + std::to_string(k) + "/"; }
/// Ranks of the world that wrote it (0-d int64): added when the checkpoint is read.
inline constexpr char kWorldSize[] = "meta/world_size";

/// kRng of rank, as ReadCheckpoint returns it.
inline std::string RngOfRank(int rank) { return std::string(kRng) + "/" + std::to_string(rank); }

}  // namespace ddpm::checkpoint_keys
