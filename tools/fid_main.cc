// ddpm_fid: FID reference statistics of a dataset, FID and IS of a folder or archive of
// samples, FID and IS of a checkpoint's samples streamed into the network, and the
// memorization report (the last two under mpirun across the ranks). Thin main over
// tools/fid_commands.h and tools/fid_checkpoint.h.
//   ddpm_fid stats --data cifar10:PATH|folder:PATH --out FILE.npz --inception WEIGHTS
//   ddpm_fid score --samples folder:PATH|npz:PATH --ref FILE.npz --inception WEIGHTS
//   ddpm_fid checkpoint --checkpoint RUN --ref FILE.npz --inception WEIGHTS [--num 50000]
//   ddpm_fid memorization --samples folder:PATH|npz:PATH --train cifar10:PATH|run:RUN_DIR|...
#include <cstdio>
#include <string>

#include "config/flags.h"
#include "tools/fid_checkpoint.h"
#include "tools/fid_commands.h"
#include "tools/tool_world.h"
#include "tools/trained_model.h"

namespace {

constexpr char kUsage[] =
    "usage: ddpm_fid stats --data cifar10:PATH|folder:PATH --out FILE.npz --inception WEIGHTS\n"
    "       ddpm_fid score --samples folder:PATH|npz:PATH --ref FILE.npz --inception WEIGHTS\n"
    "       ddpm_fid checkpoint --checkpoint RUN --ref FILE.npz --inception WEIGHTS [--protocol "
    "configs/eval/paper.yaml] [--num 50000] [--sampler ddpm|ddim|heun] [--also-save DIR]\n"
    "       ddpm_fid memorization --samples folder:PATH|npz:PATH --train "
    "cifar10:PATH|run:RUN_DIR|folder:PATH [--inception WEIGHTS] [--out DIR]\n"
    "(--help after the command for every flag)\n";

int Checkpoint(int argc, char** argv) {
  ddpm::Flags flags("ddpm_fid checkpoint",
                    "Samples a trained model's EMA weights and streams the samples into the FID "
                    "Inception network (no image files), over every rank under mpirun, and "
                    "prints FID, IS and the protocol: the evaluation of training, on demand.");
  ddpm::AddCheckpointEvalFlags(flags);
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_fid checkpoint", [&] {
      const ddpm::CheckpointEvalOptions options = ddpm::CheckpointEvalOptionsFromFlags(flags);
      ddpm::TrainedModel trained =
          ddpm::LoadTrainedModel(flags, options.overrides, "ddpm_fid checkpoint");
      world.Place(trained);
      return ddpm::EvaluateCheckpoint(trained, world.comm(), options);
    });
  });
}

int Memorization(int argc, char** argv) {
  ddpm::Flags flags("ddpm_fid memorization",
                    "Finds each sample's two nearest training images exactly (pixel space, and "
                    "Inception feature space given the weights), each rank searching its share of "
                    "the training set; reports the share of samples whose nearest is under a "
                    "third of the second-nearest (Yoon et al. 2023), the distribution of nearest "
                    "distances, a PNG of the 16 closest pairs and a CSV of every sample's "
                    "neighbours.");
  ddpm::AddMemorizationFlags(flags);
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::ToolWorld world(&argc, &argv);
    return world.Run("ddpm_fid memorization", [&] {
      return ddpm::RunMemorization(ddpm::MemorizationJobFromFlags(flags), world.comm());
    });
  });
}

int Stats(int argc, char** argv) {
  ddpm::Flags flags("ddpm_fid stats",
                    "Computes the FID reference statistics (mu, sigma of the Inception pool3 "
                    "features) of a dataset, as a .npz that pytorch-fid reads.");
  ddpm::AddFidStatsFlags(flags);
  return ddpm::RunMain(flags, argc, argv,
                       [&] { return ddpm::RunFidStats(ddpm::FidStatsJobFromFlags(flags)); });
}

int Score(int argc, char** argv) {
  ddpm::Flags flags("ddpm_fid score",
                    "Computes FID against reference statistics, and the Inception Score, of a "
                    "folder of sample images.");
  ddpm::AddFidScoreFlags(flags);
  return ddpm::RunMain(flags, argc, argv,
                       [&] { return ddpm::RunFidScore(ddpm::FidScoreJobFromFlags(flags)); });
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  if (command == "checkpoint") return Checkpoint(argc - 1, argv + 1);
  if (command == "memorization") return Memorization(argc - 1, argv + 1);
  if (command == "stats") return Stats(argc - 1, argv + 1);
  if (command == "score") return Score(argc - 1, argv + 1);
  std::fputs(kUsage, stderr);
  return 2;
}
