// Our unpickler of torch.save files (trainer/unpickler.h): it reads what PyTorch in Python and
// LibTorch write, value for value, and refuses every malformed or hostile file by name. The
// files come from PyTorch itself (tests/reference/pickle_cases.py), and so do the expected
// values: what Python's torch.load reads back, in float64.
#include "trainer/tensor_io.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_env.h"
#include "trainer/unpickler.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

// The files of pickle_cases.py, written once per test process.
class PickleCases : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string python = DDPM_REFERENCE_PYTHON;
    if (std::system((python + " -c 'import torch' > /dev/null 2>&1").c_str()) != 0) {
      skip_ = "the torch.save files need " + python +
              " with torch (Debian: apt-get install python3-torch); it cannot run here";
      return;
    }
    dir_ = fs::temp_directory_path() / ("ddpm_pickle_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    const std::string log = (dir_ / "python.log").string();
    const int rc =
        std::system((python + " " + DDPM_SOURCE_DIR + "/tests/reference/pickle_cases.py " +
                     dir_.string() + " > " + log + " 2>&1")
                        .c_str());
    if (rc != 0) skip_ = "FAILED: pickle_cases.py exited " + std::to_string(rc) + "; see " + log;
  }
  static void TearDownTestSuite() {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  void SetUp() override {
    ASSERT_EQ(skip_.rfind("FAILED", 0), std::string::npos) << skip_;
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }
  static std::string Path(const std::string& name) { return (dir_ / name).string(); }

  static inline fs::path dir_;
  static inline std::string skip_;
};

torch::ScalarType DtypeNamed(const std::string& name) {
  static const std::map<std::string, torch::ScalarType> kNames = {
      {"float32", torch::kFloat},
      {"float64", torch::kDouble},
      {"float16", torch::kHalf},
      {"bfloat16", torch::kBFloat16},
      {"int64", torch::kLong},
      {"int32", torch::kInt},
      {"int16", torch::kShort},
      {"int8", torch::kChar},
      {"uint8", torch::kByte},
      {"bool", torch::kBool},
      {"complex64", torch::kComplexFloat}};
  return kNames.at(name);
}

TEST_F(PickleCases, ReadsEveryDtypeViewAndLayoutThatPyTorchWrites) {
  std::ifstream in(Path("expected.json"));
  const nlohmann::json expected = nlohmann::json::parse(in);
  ASSERT_EQ(expected.size(), 5u);
  for (const auto& [file, tensors] : expected.items()) {
    SCOPED_TRACE(file);
    const std::map<std::string, torch::Tensor> loaded = LoadTensors(Path(file));
    ASSERT_EQ(loaded.size(), tensors.size());
    for (const auto& [name, want] : tensors.items()) {
      SCOPED_TRACE(name);
      ASSERT_EQ(loaded.count(name), 1u);
      const torch::Tensor& tensor = loaded.at(name);
      EXPECT_EQ(tensor.scalar_type(), DtypeNamed(want["dtype"].get<std::string>()));
      EXPECT_EQ(tensor.sizes().vec(), want["shape"].get<std::vector<int64_t>>());
      const torch::Tensor as_double = tensor.is_complex()
                                          ? torch::view_as_real(tensor.to(torch::kComplexDouble))
                                          : tensor.to(torch::kDouble);
      const torch::Tensor flat = as_double.contiguous().flatten();
      const auto values = want["values"].get<std::vector<double>>();
      ASSERT_EQ(flat.numel(), static_cast<int64_t>(values.size()));
      for (int64_t i = 0; i < flat.numel(); ++i) {
        EXPECT_EQ(flat[i].item<double>(), values[static_cast<std::size_t>(i)]) << "element " << i;
      }
    }
  }
  // Views keep sharing their storage, as torch.load gives them.
  const std::map<std::string, torch::Tensor> views = LoadTensors(Path("dtypes_and_views.pt"));
  EXPECT_TRUE(views.at("view_transposed").is_alias_of(views.at("view_whole")));
  EXPECT_FALSE(views.at("view_columns").is_contiguous());
  EXPECT_EQ(views.at("view_expand").stride(0), 0);
}

TEST_F(PickleCases, RefusesEachBadFileNamingFileAndReason) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"legacy.pt", "legacy format"},
      {"nested.pt", "'model' is a dict, expected a tensor"},
      {"list.pt", "holds a list, expected a dict"},
      {"not_tensor.pt", "'step' is an int, expected a tensor"},
      {"int_key.pt", "a key is an int"},
      {"truncated.pt", "not a zip archive"},
      {"short_record.pt",
       "record data/0 holds 8 bytes, the pickle says 12 Float elements (48 bytes)"},
      {"missing_record.pt", "storage '0' has no record data/0"},
      {"big_endian.pt", "byteorder 'big'"},
      {"bad_pickle.pt", "the pickle ends without its STOP opcode"},
      {"view_past_end.pt", "reaches past its storage of 4 elements"},
      {"offset_past_end.pt", "offset 9 is outside its storage of 4 elements"},
      {"bad_bool.pt", "holds a byte other than 0 or 1"},
      {"evil.pt", "refers to posix.system, which a dict of tensors does not use"},
  };
  for (const auto& [file, reason] : cases) {
    SCOPED_TRACE(file);
    try {
      LoadTensors(Path(file));
      ADD_FAILURE() << "loaded";
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind(Path(file) + ": ", 0), 0u) << what;
      EXPECT_NE(what.find(reason), std::string::npos) << what;
    }
  }
  EXPECT_FALSE(fs::exists(Path("evil_ran"))) << "the malicious pickle ran its command";
  // The same record, correctly sized and in bounds, loads: the refusals above are the faults.
  EXPECT_TRUE(
      torch::equal(LoadTensors(Path("hand_good.pt")).at("x"), torch::tensor({1.0f, 2.0f, 3.0f})));
}

TEST(Unpickler, ReadsWhatLibTorchWrites) {
  std::map<std::string, torch::Tensor> tensors = {
      {"float", torch::randn({3, 4})},
      {"double", torch::randn({2}, torch::kDouble)},
      {"half", torch::randn({5}).to(torch::kHalf)},
      {"long", torch::tensor({int64_t{-3}, int64_t{1} << 50})},
      {"bool", torch::tensor({true, false})},
      {"scalar", torch::tensor(7)},
      {"empty", torch::zeros({0})}};
  const std::map<std::string, torch::Tensor> loaded =
      UnpickleTensors(PickleTensors(tensors), "libtorch.pt");
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    EXPECT_EQ(loaded.at(name).scalar_type(), tensor.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(loaded.at(name), tensor)) << name;
  }
}

// Hand-assembled pickles for the interpreter's own limits (no storages).
std::string Refusal(const std::string& pickle) {
  try {
    UnpickleTensorDict(
        pickle, [](const std::string&, uint64_t) { return std::nullopt; }, "p");
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "accepted";
}

TEST(Unpickler, LimitsWhatAHandWrittenPickleCanDo) {
  using namespace std::string_literals;
  // An empty dict through a far memo index: no allocation of 2^32 slots.
  EXPECT_EQ(UnpickleTensorDict(
                "\x80\x02}r\xff\xff\xff\xff."s,
                [](const std::string&, uint64_t) { return std::nullopt; }, "p")
                .size(),
            0u);
  EXPECT_NE(Refusal("\x80\x02h\x07."s), "accepted");
  EXPECT_NE(Refusal("\x80\x02h\x07."s).find("memo 7 was never stored"), std::string::npos);
  // A dict put inside itself (through the memo): a cycle is refused.
  EXPECT_NE(Refusal("}q\x00X\x01\x00\x00\x00kh\x00s."s).find("puts a dict inside itself"),
            std::string::npos);
  // A dict already inside another can no longer grow (so no cycle can form through it).
  EXPECT_NE(Refusal("}q\x00]h\x00\x61h\x00X\x01\x00\x00\x00kNs."s).find("already inside another"),
            std::string::npos);
  // 40 nested tuples: deeper than the limit.
  EXPECT_NE(Refusal(std::string(")") + std::string(40, '\x85') + ".").find("nest deeper"),
            std::string::npos);
  // A string whose length runs past the end.
  EXPECT_NE(Refusal("X\xff\xff\xff\x7f"s).find("runs past the end"), std::string::npos);
  EXPECT_NE(Refusal("\x80\x02}(."s).find("STOP inside a MARK"), std::string::npos);
  EXPECT_NE(Refusal("\x80\x02\x01."s).find("opcode 0x01"), std::string::npos);
}

}  // namespace
}  // namespace ddpm
