// The run directory's fencing token (base/fence.h): grants only move forward, a superseded
// attempt is refused by name, and a checkpoint that a superseded attempt committed after a
// newer attempt began is told apart from the one the newer attempt resumed from.
#include "base/fence.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "base/errors.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

std::string FreshDir(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("ddpm_fence_" + std::to_string(getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string Text(const std::string& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(Fence, GrantsMoveForwardAndRecordWhereEachAttemptBegan) {
  const std::string dir = FreshDir("grants");
  const RunFence fence(dir);
  EXPECT_EQ(fence.Current(), 0) << "no file: nothing holds the run";
  EXPECT_TRUE(fence.Read().empty());
  fence.Grant(1);
  fence.Began(1, 0);
  fence.Grant(2);
  fence.Began(2, 400);
  // A second Began of the same attempt (its group restarted the run inside it) keeps the first.
  fence.Began(2, 500);
  EXPECT_EQ(fence.Read()[1].began_at_step, 400);
  fence.Grant(3);
  EXPECT_EQ(fence.Current(), 3);
  EXPECT_EQ(Text(fence.path()),
            "ddpm-train attempt fence 1\nattempt 1 began 0\nattempt 2 began 400\nattempt 3\n");
  // No temporary file is left beside it.
  int files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) files += entry.is_regular_file() ? 1 : 0;
  EXPECT_EQ(files, 1);

  try {
    fence.Grant(2);
    FAIL() << "the fence never moves back";
  } catch (const FencedError& e) {
    EXPECT_NE(std::string(e.what()).find("attempt 3 already holds the run; attempt 2 cannot take "
                                         "it back"),
              std::string::npos)
        << e.what();
  }
}

TEST(Fence, ASupersededAttemptIsRefusedNamingBothAttemptsAndWhat) {
  const std::string dir = FreshDir("refuse");
  const RunFence fence(dir);
  fence.Grant(1);
  EXPECT_NO_THROW(fence.Check(1, "the checkpoint of step 10"));
  fence.Grant(2);
  try {
    fence.Check(1, "the checkpoint of step 10");
    FAIL() << "attempt 1 is superseded";
  } catch (const FencedError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("attempt 1 of the run in " + dir + " has been superseded by attempt 2"),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("refusing to write the checkpoint of step 10"), std::string::npos) << what;
  }
  EXPECT_THROW(fence.Began(1, 0), FencedError);
  EXPECT_NO_THROW(fence.Check(2, "x"));
  EXPECT_NO_THROW(fence.Check(0, "x")) << "a run started by hand is not fenced";
}

TEST(Fence, AGroupFencesTheRunItselfWhereTheCoordinatorCouldNot) {
  const std::string dir = FreshDir("self");
  const RunFence fence(dir);
  fence.Began(4, 120);  // no grant was written
  EXPECT_EQ(fence.Current(), 4);
  EXPECT_EQ(fence.Read()[0].began_at_step, 120);
  fence.Began(0, 7);  // unfenced: writes nothing
  EXPECT_EQ(fence.Read().size(), 1u);
}

TEST(Fence, StaleCheckpointsAreThoseCommittedAfterANewerAttemptBegan) {
  const std::string dir = FreshDir("stale");
  const RunFence fence(dir);
  fence.Grant(1);
  fence.Began(1, 0);
  fence.Grant(2);
  fence.Began(2, 400);
  fence.Grant(3);  // granted, not yet begun
  // Attempt 1's checkpoint of step 400 is what attempt 2 resumed from; its 500 came after.
  EXPECT_EQ(fence.Stale(1, 400), "");
  EXPECT_EQ(fence.Stale(1, 300), "");
  const std::string stale = fence.Stale(1, 500);
  EXPECT_NE(stale.find("committed by attempt 1 after attempt 2 had begun from step 400"),
            std::string::npos)
      << stale;
  // Attempt 2's own checkpoints are its own; attempt 3 has not begun, so nothing is stale by it.
  EXPECT_EQ(fence.Stale(2, 900), "");
  EXPECT_EQ(fence.Stale(0, 900), "") << "a checkpoint written by hand is never stale";
}

TEST(Fence, AMalformedFenceIsAnErrorNamingTheFileAndLine) {
  const std::string dir = FreshDir("malformed");
  const RunFence fence(dir);
  std::ofstream(fence.path()) << "ddpm-train attempt fence 1\nattempt 1 began 0\nattempt two\n";
  try {
    fence.Current();
    FAIL() << "a malformed fence must not read as 'no fence'";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(fence.path() + ": line 3: expected 'attempt N [began "
                                                        "STEP]', found 'attempt two'"),
              std::string::npos)
        << e.what();
  }
  std::ofstream(fence.path()) << "something else\n";
  EXPECT_THROW(fence.Current(), FormatError);
  std::ofstream(fence.path()) << "";
  EXPECT_THROW(fence.Current(), FormatError) << "an empty fence file is damage";
}

}  // namespace
}  // namespace ddpm
