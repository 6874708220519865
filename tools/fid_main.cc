// ddpm_fid: FID reference statistics of a dataset, FID and IS of a folder or archive of
// samples, and FID and IS of a checkpoint's samples streamed into the network (under mpirun,
// across the ranks). Thin main over eval/evaluation.h.
//   ddpm_fid stats --data cifar10:PATH|folder:PATH --out FILE.npz --inception WEIGHTS
//   ddpm_fid score --samples folder:PATH|npz:PATH --ref FILE.npz --inception WEIGHTS
//   ddpm_fid checkpoint --checkpoint RUN --ref FILE.npz --inception WEIGHTS [--num 50000]
//   ddpm_fid memorization --samples folder:PATH|npz:PATH --train cifar10:PATH|run:RUN_DIR|...
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "base/sha256.h"
#include "base/text.h"
#include "config/flags.h"
#include "eval/checkpoint_sweep.h"
#include "eval/evaluation.h"
#include "eval/inception.h"
#include "eval/memorization.h"
#include "run/sampling.h"
#include "tools/eval_flags.h"
#include "tools/fid_checkpoint.h"
#include "tools/tool_world.h"
#include "tools/trained_model.h"
#include "trainer/checkpoint.h"
#include "trainer/communicator.h"
#include "trainer/data.h"
#include "trainer/device.h"
#include "trainer/diffusion.h"
#include "trainer/image_io.h"

namespace {

// ddpm_fid checkpoint: the in-training evaluation's code (RunEvaluator) on a trained model.
int Checkpoint(int argc, char** argv) {
  ddpm::Flags flags("ddpm_fid checkpoint",
                    "Samples a trained model's EMA weights and streams the samples into the FID "
                    "Inception network (no image files), over every rank under mpirun, and "
                    "prints FID, IS and the protocol: the evaluation of training, on demand.");
  ddpm::AddTrainedModelFlags(flags);
  ddpm::AddEvalFlags(flags);
  flags.Add("out",
            "with a list of --guidance scales (0,1,2,4), each is evaluated and FID and IS against "
            "w go to OUT.csv and OUT.png",
            "guidance_sweep");
  flags.Add("also-save", "a directory to keep the samples in as PNGs (000000.png onwards)", "");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_fid checkpoint", [&] {
      std::vector<double> scales;
      const std::vector<std::pair<std::string, std::string>> overrides =
          ddpm::EvalOverrides(flags, "ddpm_fid checkpoint", &scales);
      if (scales.size() > 1 && flags.Given("also-save")) {
        throw ddpm::FlagError(
            "ddpm_fid checkpoint: --also-save keeps the samples of one guidance scale; give one "
            "--guidance, not " +
            flags.Get("guidance"));
      }
      ddpm::TrainedModel trained = ddpm::LoadTrainedModel(flags, overrides, "ddpm_fid checkpoint");
      if (scales.size() > 1 && trained.config.model.num_classes == 0) {
        throw ddpm::FlagError("ddpm_fid checkpoint: --guidance " + flags.Get("guidance") + ": " +
                              trained.origin +
                              " is unconditional (model.num_classes 0); a list of guidance scales "
                              "needs a class-conditional model");
      }
      world.Place(trained);
      ddpm::CheckpointEvalOptions options;
      options.scales = scales;
      options.keep_dir = flags.Get("also-save");
      options.out = flags.Get("out");
      options.reference = flags.Get("ref");
      return ddpm::EvaluateCheckpoint(trained, world.comm(), options);
    });
  });
}

// ddpm_fid memorization: each sample's two nearest training images, exactly, over the ranks.
int Memorization(int argc, char** argv) {
  ddpm::Flags flags("ddpm_fid memorization",
                    "Finds each sample's two nearest training images exactly (pixel space, and "
                    "Inception feature space given the weights), each rank searching its share of "
                    "the training set; reports the share of samples whose nearest is under a "
                    "third of the second-nearest (Yoon et al. 2023), the distribution of nearest "
                    "distances, a PNG of the 16 closest pairs and a CSV of every sample's "
                    "neighbours.");
  flags.Add("samples", "the samples: folder:PATH or npz:PATH", "");
  flags.Add("train",
            "the training images: cifar10:PATH (the training split), folder:PATH, npz:PATH, or "
            "run:RUN_DIR (the data set the run trained on, from its checkpoint)",
            "");
  flags.Add("inception",
            "the FID Inception weights, for feature space (default: $DDPM_INCEPTION_WEIGHTS; "
            "without them, pixel space only)",
            "");
  flags.Add("out", "a directory for neighbours.csv, closest_pairs.png and summary.txt",
            "memorization");
  flags.Add("ratio", "the threshold on nearest / second-nearest distance", "0.3333333333333333");
  flags.Add("image-size", "folder images are centre-cropped and resized to this first", "32");
  flags.Add("batch", "images per Inception forward pass", "100");
  flags.Add("block", "training images per block of the search", "1000");
  flags.Add("device", "cpu or cuda", "cpu");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_fid memorization", [&] {
      for (const char* required : {"samples", "train"}) {
        if (flags.Get(required).empty()) {
          throw ddpm::FlagError(std::string("ddpm_fid memorization: --") + required +
                                " is required");
        }
      }
      std::string weights = flags.Get("inception");
      if (weights.empty() && std::getenv("DDPM_INCEPTION_WEIGHTS") != nullptr) {
        weights = std::getenv("DDPM_INCEPTION_WEIGHTS");
      }
      const torch::Device device(flags.Get("device"));
      const int image_size = static_cast<int>(flags.GetInt("image-size"));
      const auto samples = ddpm::OpenImageSet(flags.Get("samples"), image_size);
      const auto train = ddpm::OpenTrainingSet(flags.Get("train"), image_size);
      std::optional<ddpm::FidInception> inception;
      if (!weights.empty()) inception = ddpm::LoadFidInception(weights, device);
      ddpm::MemorizationOptions options;
      options.ratio = flags.GetDouble("ratio");
      options.block = flags.GetInt("block");
      options.batch_size = static_cast<int>(flags.GetInt("batch"));
      const std::string out = flags.Get("out");
      ddpm::Communicator& comm = world.comm();
      if (world.lead()) {
        ddpm::MakeDirectories(out);
        std::printf(
            "ddpm_fid memorization: %lld samples (%s) against %lld training images (%s) "
            "on %d rank(s)%s\n",
            static_cast<long long>(samples->size()), samples->Describe().c_str(),
            static_cast<long long>(train->size()), train->Describe().c_str(), comm.world_size(),
            inception ? "" : "; pixel space only (no --inception weights)");
        std::fflush(stdout);
      }
      const auto start = std::chrono::steady_clock::now();
      auto last = start;
      const std::vector<ddpm::MemorizationSpace> spaces = ddpm::MeasureMemorization(
          *samples, *train, inception, comm, device, options,
          [&](const std::string& what, int64_t done, int64_t share) {
            if (!world.lead() || (ddpm::SecondsSince(last) < 5.0 && done < share)) return;
            last = std::chrono::steady_clock::now();
            std::printf(
                "ddpm_fid memorization: %s: rank 0 has searched %lld/%lld of its "
                "training images (%s)\n",
                what.c_str(), static_cast<long long>(done), static_cast<long long>(share),
                ddpm::FormatDuration(ddpm::SecondsSince(start)).c_str());
            std::fflush(stdout);
          });
      if (!world.lead()) return 0;
      const std::string summary = ddpm::DescribeMemorization(spaces, options.ratio);
      ddpm::WriteMemorizationReport(spaces, *samples, *train, options.ratio, out);
      std::printf(
          "%sddpm_fid memorization: wrote %s/neighbours.csv, closest_pairs.png (the 16 "
          "samples nearest a training image in pixel space, each beside it) and "
          "summary.txt in %s\n",
          summary.c_str(), out.c_str(), ddpm::FormatDuration(ddpm::SecondsSince(start)).c_str());
      return 0;
    });
  });
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  if (command == "checkpoint") return Checkpoint(argc - 1, argv + 1);
  if (command == "memorization") return Memorization(argc - 1, argv + 1);
  if (command != "stats" && command != "score") {
    std::fprintf(
        stderr,
        "usage: ddpm_fid stats --data cifar10:PATH|folder:PATH --out FILE.npz "
        "--inception WEIGHTS\n"
        "       ddpm_fid score --samples folder:PATH|npz:PATH --ref FILE.npz "
        "--inception WEIGHTS\n"
        "       ddpm_fid checkpoint --checkpoint RUN --ref FILE.npz --inception "
        "WEIGHTS [--protocol configs/eval/paper.yaml] [--num 50000] [--sampler ddpm|ddim|heun] "
        "[--also-save DIR]\n"
        "       ddpm_fid memorization --samples folder:PATH|npz:PATH --train "
        "cifar10:PATH|run:RUN_DIR|folder:PATH [--inception WEIGHTS] [--out DIR]\n"
        "(--help after the command for every flag)\n");
    return 2;
  }
  const bool stats = command == "stats";
  ddpm::Flags flags("ddpm_fid " + command,
                    stats ? "Computes the FID reference statistics (mu, sigma of the Inception "
                            "pool3 features) of a dataset, as a .npz that pytorch-fid reads."
                          : "Computes FID against reference statistics, and the Inception Score, "
                            "of a folder of sample images.");
  if (stats) {
    flags.Add("data", "the images: cifar10:PATH (the training split) or folder:PATH", "");
    flags.Add("out",
              "the .npz to write: mu and sigma (FID), and features, float32 [N, 2048] (KID, "
              "precision and recall)",
              "");
  } else {
    flags.Add("samples", "the samples: folder:PATH (or cifar10:PATH)", "");
    flags.Add("ref", "reference statistics .npz (mu, sigma), ours or pytorch-fid's/TTUR's", "");
    flags.Add("metrics",
              "scores beside FID and IS, comma-separated: kid, prd (they need the reference's "
              "features, as `ddpm_fid stats` writes them)",
              "");
    flags.Add("seed", "the seed of KID's subsets and PRD's reference draw", "1");
  }
  flags.Add("inception",
            "the FID Inception weights (pt_inception-2015-12-05, re-saved by "
            "PyTorch >= 1.6) or a TorchScript module of it (default: "
            "$DDPM_INCEPTION_WEIGHTS)",
            "");
  flags.Add("image-size", "folder images are centre-cropped and resized to this first", "32");
  flags.Add("batch", "images per Inception forward pass", "50");
  if (!stats) {
    flags.Add("is-logits",
              "the Inception Score's logits: unbiased (pool3 times the fc weights, the original "
              "TF code's, as the paper's 9.46) or biased (the fc's output)",
              "unbiased");
  }
  flags.Add("device", "cpu or cuda", "cpu");
  return ddpm::RunMain(flags, argc - 1, argv + 1, [&] {
    std::string weights = flags.Get("inception");
    if (weights.empty() && std::getenv("DDPM_INCEPTION_WEIGHTS") != nullptr) {
      weights = std::getenv("DDPM_INCEPTION_WEIGHTS");
    }
    const torch::Device device(flags.Get("device"));
    const std::string set = flags.Get(stats ? "data" : "samples");
    if (set.empty())
      throw ddpm::FlagError(std::string("ddpm_fid: --") + (stats ? "data" : "samples") +
                            " is required");
    ddpm::FidInception model = ddpm::LoadFidInception(weights, device);
    const std::string sha256 = ddpm::Sha256File(weights);
    if (stats) {
      const std::string out = flags.Get("out");
      if (out.empty()) throw ddpm::FlagError("ddpm_fid: --out is required");
      const auto data = ddpm::OpenImageSet(set, static_cast<int>(flags.GetInt("image-size")));
      ddpm::InceptionStatistics measured =
          ddpm::MeasureImageSet(*data, model, static_cast<int>(flags.GetInt("batch")), device,
                                "ddpm_fid stats", ddpm::IsLogits::kUnbiased, /*keep=*/true);
      ddpm::WriteNpz(out, {{"mu", measured.features().Mean()},
                           {"sigma", measured.features().Covariance()},
                           {"features", measured.KeptFeatures().cpu()}});
      std::printf(
          "ddpm_fid: wrote %s: mu, sigma and the features of %lld images of %s (Inception "
          "sha256 %s)\n",
          out.c_str(), static_cast<long long>(measured.features().count()),
          data->Describe().c_str(), sha256.c_str());
      return 0;
    }
    const std::string ref = flags.Get("ref");
    if (ref.empty()) throw ddpm::FlagError("ddpm_fid: --ref is required");
    const auto [mu, sigma] = ddpm::ReadReferenceStats(ref);
    const std::string is_logits = flags.Get("is-logits");
    if (is_logits != "unbiased" && is_logits != "biased") {
      throw ddpm::FlagError("ddpm_fid: --is-logits '" + is_logits +
                            "' is not one of: unbiased, biased");
    }
    bool kid = false, prd = false;
    for (const std::string& metric : ddpm::SplitList(flags.Get("metrics"))) {
      if (metric == "kid") {
        kid = true;
      } else if (metric == "prd") {
        prd = true;
      } else if (metric != "fid" && metric != "is") {
        throw ddpm::FlagError("ddpm_fid: --metrics: '" + metric +
                              "' is not one of: fid, is, kid, prd");
      }
    }
    // Before any image is read: a reference without features cannot give KID or PRD.
    const torch::Tensor reference_features =
        kid || prd ? ddpm::ReadReferenceFeatures(ref, device) : torch::Tensor();
    const auto data = ddpm::OpenImageSet(set, static_cast<int>(flags.GetInt("image-size")));
    ddpm::InceptionStatistics measured = ddpm::MeasureImageSet(
        *data, model, static_cast<int>(flags.GetInt("batch")), device, "ddpm_fid score",
        is_logits == "unbiased" ? ddpm::IsLogits::kUnbiased : ddpm::IsLogits::kBiased, kid || prd);
    const ddpm::FrechetResult fid = ddpm::FrechetDistance(
        measured.features().Mean(), measured.features().Covariance(), mu, sigma);
    const auto [is_mean, is_std] = measured.scores().Score();
    std::printf(
        "FID %.4f\nIS %.4f +- %.4f (10 splits, %s logits)\nsamples %lld (%s)\nInception sha256 "
        "%s\nreference %s sha256 %s\n%s",
        fid.fid, is_mean, is_std, is_logits.c_str(),
        static_cast<long long>(measured.features().count()), data->Describe().c_str(),
        sha256.c_str(), ref.c_str(), ddpm::Sha256File(ref).c_str(),
        fid.regularized ? "note: the covariances were regularized with eps * I\n" : "");
    if (kid || prd) {
      ddpm::EvalReport report;
      report.num_samples = measured.features().count();
      ddpm::SoloCommunicator solo;
      std::optional<ddpm::PrdReference> prd_reference;
      ddpm::ScoreFeatures(measured.KeptFeatures().to(device), reference_features, kid, prd,
                          static_cast<uint64_t>(flags.GetInt("seed")), solo, &prd_reference,
                          &report);
      std::fputs(ddpm::DescribeKidAndPrd(report).c_str(), stdout);
    }
    return 0;
  });
}
