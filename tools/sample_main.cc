// ddpm_sample: draws samples from exported EMA weights into a PNG grid. Thin main.
#include <string>

#include "tools/sample.h"
#include "trainer/flags.h"

int main(int argc, char** argv) {
  ddpm::Flags flags("ddpm_sample", "Draws samples from a model's weights into a PNG grid.");
  flags.Add("config", "the YAML config the weights were trained with", "");
  flags.Add("weights", "weights file, e.g. RUN_DIR/ema_weights.pt", "");
  flags.Add("out", "output PNG", "samples.png");
  flags.Add("sampler", "ddpm or ddim (default: the config's sample.sampler)", "");
  flags.Add("steps", "DDIM steps (default: the config's sample.steps)", "-1");
  flags.Add("eta", "DDIM eta (default: the config's sample.eta)", "");
  flags.Add("num-images", "images in the grid (default: the config's sample.num_images)", "-1");
  flags.Add("seed", "sampler seed (default: the config's sample.seed)", "-1");
  return ddpm::RunMain(flags, argc, argv, [&] {
    ddpm::SampleOptions options;
    options.config_path = flags.Get("config");
    options.weights_path = flags.Get("weights");
    if (options.config_path.empty() || options.weights_path.empty()) {
      throw ddpm::FlagError("ddpm_sample: --config and --weights are required");
    }
    options.out_path = flags.Get("out");
    options.sampler = flags.Get("sampler");
    options.eta_text = flags.Get("eta");
    options.steps = static_cast<int>(flags.GetInt("steps"));
    options.num_images = static_cast<int>(flags.GetInt("num-images"));
    options.seed = flags.GetInt("seed");
    return ddpm::RunSample(options);
  });
}
