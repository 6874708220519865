// ddpm_fid: FID reference statistics of a dataset, and FID and IS of a folder of samples. Thin
// main over eval/evaluation.h.
//   ddpm_fid stats --data cifar10:PATH|folder:PATH --out FILE.npz --inception WEIGHTS
//   ddpm_fid score --samples folder:PATH --ref FILE.npz --inception WEIGHTS
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "config/flags.h"
#include "eval/evaluation.h"
#include "trainer/data.h"
#include "trainer/device.h"

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  if (command != "stats" && command != "score") {
    std::fprintf(stderr,
                 "usage: ddpm_fid stats --data cifar10:PATH|folder:PATH --out FILE.npz "
                 "--inception WEIGHTS\n"
                 "       ddpm_fid score --samples folder:PATH --ref FILE.npz --inception WEIGHTS\n"
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
    flags.Add("out", "the .npz to write (arrays mu and sigma)", "");
  } else {
    flags.Add("samples", "the samples: folder:PATH (or cifar10:PATH)", "");
    flags.Add("ref", "reference statistics .npz (mu, sigma), ours or pytorch-fid's/TTUR's", "");
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
      ddpm::InceptionStatistics measured = ddpm::MeasureImageSet(
          *data, model, static_cast<int>(flags.GetInt("batch")), device, "ddpm_fid stats");
      ddpm::WriteNpz(
          out, {{"mu", measured.features().Mean()}, {"sigma", measured.features().Covariance()}});
      std::printf("ddpm_fid: wrote %s: mu and sigma of %lld images of %s (Inception sha256 %s)\n",
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
    const auto data = ddpm::OpenImageSet(set, static_cast<int>(flags.GetInt("image-size")));
    ddpm::InceptionStatistics measured = ddpm::MeasureImageSet(
        *data, model, static_cast<int>(flags.GetInt("batch")), device, "ddpm_fid score",
        is_logits == "unbiased" ? ddpm::IsLogits::kUnbiased : ddpm::IsLogits::kBiased);
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
    return 0;
  });
}
