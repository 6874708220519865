#include "tools/phema.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>

#include "base/file_io.h"
#include "base/log.h"
#include "base/text.h"
#include "eval/checkpoint_sweep.h"
#include "eval/evaluation.h"
#include "tools/eval_flags.h"
#include "tools/sample.h"
#include "tools/trained_model.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_keys.h"
#include "trainer/communicator.h"
#include "trainer/diffusion.h"
#include "trainer/image_io.h"
#include "trainer/tensor_io.h"
#include "trainer/unet.h"

namespace ddpm {

namespace fs = std::filesystem;
namespace keys = checkpoint_keys;

void AddPhemaFlags(Flags& flags) {
  flags.Add("run", "the run directory (its phema/ snapshots) or a folder of snapshots", "");
  flags.Add("sigma-rel",
            "the EMA length(s) to reconstruct, as relative standard deviations: one (0.08), or a "
            "list (0.03,0.05,0.08,0.12) for a sweep",
            "");
  flags.Add("step", "the step whose EMA to reconstruct (0: the newest snapshot's)", "0");
  flags.Add("out",
            "one --sigma-rel: the weights file (a .yaml config goes beside it); several: a "
            "directory of sigma_rel_S.pt files (default: phema_S.pt, or phema/)",
            "");
  flags.Add("max-fit-error",
            "refuse a sigma_rel whose least-squares fit from the snapshots has a larger relative "
            "error than this",
            "0.05");
  flags.Add("device", "the evaluation's device: cpu, cuda or auto", "auto");
  AddEvalFlags(flags);
  flags.Add("evaluate", "measure FID and IS of each reconstruction (needs --ref): yes or no", "no");
}

PhemaJob PhemaJobFromFlags(const Flags& flags) {
  PhemaJob job;
  job.run = flags.GetRequired("run");
  if (flags.Get("sigma-rel").empty()) throw FlagError("ddpm_phema: --sigma-rel is required");
  job.sigma_rels = flags.GetDoubleList("sigma-rel");
  job.step = flags.GetInt("step");
  if (job.step < 0) throw FlagError("ddpm_phema: --step must be >= 0, got " + flags.Get("step"));
  job.max_fit_error = flags.GetDouble("max-fit-error");
  if (!(job.max_fit_error > 0 && job.max_fit_error < 1)) {
    throw FlagError("ddpm_phema: --max-fit-error must be in (0, 1), got " +
                    flags.Get("max-fit-error"));
  }
  job.out = flags.Get("out");
  if (job.out.empty()) {
    job.out =
        job.sigma_rels.size() == 1 ? "phema_" + FormatNumber(job.sigma_rels[0]) + ".pt" : "phema";
  }
  const std::string evaluate = flags.Get("evaluate");
  if (evaluate != "yes" && evaluate != "no") {
    throw FlagError("ddpm_phema: --evaluate is yes or no, got '" + evaluate + "'");
  }
  if (evaluate == "yes") {
    std::vector<double> scales;
    job.eval_overrides = EvalOverrides(flags, &scales);
    if (scales.size() > 1) {
      throw FlagError("ddpm_phema: --guidance takes one scale here, got " + flags.Get("guidance"));
    }
  }
  job.device = flags.Get("device");
  return job;
}

namespace {

std::vector<double> SigmaRelsOf(const std::map<std::string, torch::Tensor>& snapshot,
                                const std::string& path) {
  const torch::Tensor t =
      RequireTensor(snapshot, keys::kPhemaSigmaRels, path).to(torch::kCPU, torch::kFloat64);
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

std::string List(const std::vector<double>& values) {
  std::string out;
  for (double v : values) out += (out.empty() ? "" : ", ") + FormatNumber(v);
  return out;
}

}  // namespace

std::vector<PhemaResult> RunPhema(const PhemaJob& job) {
  const std::string dir =
      fs::is_directory(fs::path(job.run) / "phema") ? job.run + "/phema" : job.run;
  const CheckpointDir folder(dir);
  std::vector<int64_t> steps = folder.Steps();
  if (steps.empty()) {
    throw ConfigError("ddpm_phema: " + job.run +
                      " holds no post-hoc EMA snapshots (no step_*/ in " + dir +
                      "); train with train.phema_snapshot_every > 0 to keep them");
  }
  std::sort(steps.begin(), steps.end());
  const int64_t target = job.step == 0 ? steps.back() : job.step;
  if (target < steps.front() || target > steps.back()) {
    throw ConfigError("ddpm_phema: --step " + std::to_string(target) +
                      " is outside the snapshots' steps " + std::to_string(steps.front()) + ".." +
                      std::to_string(steps.back()) + " in " + dir);
  }
  std::vector<int64_t> used;
  for (int64_t s : steps) {
    if (s <= target) used.push_back(s);
  }

  // The first snapshot tells the profiles and the model; every later one must keep the same.
  std::map<std::string, torch::Tensor> snapshot = ReadCheckpoint(folder.PathFor(used.front()));
  const std::vector<double> profiles = SigmaRelsOf(snapshot, folder.PathFor(used.front()));
  const Config config = ConfigFromCheckpoint(snapshot, folder.PathFor(used.front()));
  std::vector<PowerProfile> stored;
  for (int64_t s : used) {
    for (double sigma_rel : profiles) stored.push_back({s, sigma_rel});
  }
  std::vector<PhemaResult> results;
  for (double sigma_rel : job.sigma_rels) {
    const std::string what = "ddpm_phema: --sigma-rel " + FormatNumber(sigma_rel);
    if (!(sigma_rel > 0 && sigma_rel <= MaxPhemaSigmaRel())) {
      throw ConfigError(what + " is outside (0, " + FormatNumber(MaxPhemaSigmaRel()) +
                        "], the relative standard deviations a power-function EMA has");
    }
    PhemaResult result;
    result.sigma_rel = sigma_rel;
    result.step = target;
    result.fit = SolvePosthoc(stored, target, sigma_rel);
    if (result.fit.fit_error > job.max_fit_error) {
      const SigmaRelRange range = ReconstructibleSigmaRels(stored, target, job.max_fit_error);
      const std::string allowed =
          range.empty() ? "none"
                        : "[" + FormatNumber(range.low) + ", " + FormatNumber(range.high) + "]";
      throw ConfigError(what + " cannot be reconstructed at step " + std::to_string(target) +
                        " from the " + std::to_string(used.size()) +
                        " snapshot(s) of profiles sigma_rel " + List(profiles) +
                        ": its fit error is " + FormatNumber(result.fit.fit_error) +
                        ", over --max-fit-error " + FormatNumber(job.max_fit_error) +
                        "; the sigma_rel these snapshots reconstruct within it: " + allowed);
    }
    results.push_back(result);
  }

  // Each snapshot read once: out_j += coefficient(snapshot, profile k; j) * profile k, in
  // float64 (the coefficients alternate in sign).
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::map<std::string, torch::Tensor>> sums(results.size());
  for (std::size_t i = 0; i < used.size(); ++i) {
    const std::string path = folder.PathFor(used[i]);
    if (i > 0) snapshot = ReadCheckpoint(path);
    if (SigmaRelsOf(snapshot, path) != profiles) {
      throw CheckpointError(path + " keeps profiles of sigma_rel " +
                            List(SigmaRelsOf(snapshot, path)) + ", the run's first snapshot " +
                            List(profiles));
    }
    for (std::size_t k = 0; k < profiles.size(); ++k) {
      const std::string prefix = keys::PhemaPrefix(k);
      for (const auto& [name, tensor] : snapshot) {
        if (name.rfind(prefix, 0) != 0) continue;
        const std::string param = name.substr(prefix.size());
        const torch::Tensor wide = tensor.to(torch::kFloat64);
        for (std::size_t j = 0; j < results.size(); ++j) {
          const double c = results[j].fit.coefficients[i * profiles.size() + k];
          torch::Tensor term = wide * c;
          auto [it, fresh] = sums[j].emplace(param, term);
          if (!fresh) it->second.add_(term);
        }
      }
    }
    LogInfo("ddpm_phema: read snapshot %zu/%zu (%s)\n", i + 1, used.size(), path.c_str());
  }
  snapshot.clear();
  const bool several = results.size() > 1;
  if (several) fs::create_directories(job.out);
  for (std::size_t j = 0; j < results.size(); ++j) {
    PhemaResult& r = results[j];
    std::map<std::string, torch::Tensor> weights;
    for (const auto& [name, sum] : sums[j]) weights[name] = sum.to(torch::kFloat32);
    sums[j].clear();
    // The names and shapes must be exactly the UNet's before anything is written.
    UNet model(config.model);
    LoadStateDict(*model, weights, dir);
    r.weights = several ? job.out + "/sigma_rel_" + FormatNumber(r.sigma_rel) + ".pt" : job.out;
    SaveTensors(weights, r.weights);
    r.config = ConfigBesideWeights(r.weights);
    WriteFileAtomically(r.config, config.ToYaml());
    LogInfo(
        "ddpm_phema: sigma_rel %s at step %lld from %zu snapshot(s) of %zu profile(s) (sigma_rel "
        "%s): fit error %.3e; weights in %s\n",
        FormatNumber(r.sigma_rel).c_str(), static_cast<long long>(r.step), used.size(),
        profiles.size(), List(profiles).c_str(), r.fit.fit_error, r.weights.c_str());
  }
  LogInfo("ddpm_phema: reconstructed %zu EMA(s) in %s\n", results.size(),
          FormatDuration(SecondsSince(start)).c_str());
  if (job.eval_overrides.empty()) return results;

  ParameterSweep sweep{"sigma_rel", "SIGMA REL", {}, {}};
  for (PhemaResult& r : results) {
    auto overrides = job.eval_overrides;
    overrides.emplace_back("train.device", job.device);
    TrainedModel trained = LoadTrainedModel("", r.weights, "", overrides, "ddpm_phema");
    RunEvaluator evaluator(trained.config, trained.device);
    const GaussianDiffusion diffusion(trained.config.diffusion, trained.device);
    SoloCommunicator solo;
    auto last = std::chrono::steady_clock::now();
    const EvalReport report = evaluator.Evaluate(
        diffusion, trained.model, solo, r.step, [&](int64_t done, int64_t share) {
          if (SecondsSince(last) < 5.0 && done < share) return;
          last = std::chrono::steady_clock::now();
          LogInfo("ddpm_phema: sigma_rel %s: %lld/%lld samples\n",
                  FormatNumber(r.sigma_rel).c_str(), static_cast<long long>(done),
                  static_cast<long long>(share));
        });
    r.evaluated = true;
    r.fid = report.fid;
    r.inception_score = report.inception_score;
    r.inception_score_std = report.inception_score_std;
    std::printf("ddpm_phema: sigma_rel %s: FID %.4f IS %.4f +- %.4f (%lld samples, %s %d steps)\n",
                FormatNumber(r.sigma_rel).c_str(), report.fid, report.inception_score,
                report.inception_score_std, static_cast<long long>(report.num_samples),
                report.sampler.c_str(), report.sampling_steps);
    std::fflush(stdout);
    sweep.values.push_back(r.sigma_rel);
    sweep.reports.push_back(report);
  }
  const std::string stem = several ? job.out + "/phema_sweep"
                                   : fs::path(job.out).replace_extension("").string() + "_sweep";
  WriteParameterSweep(sweep, stem + ".csv", stem + ".png");
  LogInfo("ddpm_phema: FID and IS against sigma_rel in %s.csv and %s.png\n", stem.c_str(),
          stem.c_str());
  return results;
}

}  // namespace ddpm
