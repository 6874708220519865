// The output toolkit of base/: the atomic file write, the CSV rows and the leveled logger.
// CSV rows are checked against RFC 4180 written out by hand and against Python's csv module.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/csv.h"
#include "base/file_io.h"
#include "base/log.h"
#include "config/flags.h"
#include "test_env.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {(std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()};
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

class OutputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ddpm_output_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    SetLogLevel(LogLevel::kInfo);
    SetLogRank(0, 1);
    fs::remove_all(dir_);
  }
  fs::path dir_;
};

TEST_F(OutputTest, CsvFieldsAreQuotedAsRfc4180Says) {
  EXPECT_EQ(CsvField("plain"), "plain");
  EXPECT_EQ(CsvField(""), "");
  EXPECT_EQ(CsvField("a,b"), "\"a,b\"");
  EXPECT_EQ(CsvField("say \"hi\""), "\"say \"\"hi\"\"\"");
  EXPECT_EQ(CsvField("two\nlines"), "\"two\nlines\"");
  EXPECT_EQ(CsvField("cr\rhere"), "\"cr\rhere\"");
  EXPECT_EQ(CsvField(" spaces stay "), " spaces stay ");
  const std::string line = CsvRow()
                               .Number("%d", 7)
                               .Text("ddim, 50 steps")
                               .Empty()
                               .Number("%.17g", 0.1)
                               .Text("\"q\"")
                               .Line();
  EXPECT_EQ(line, "7,\"ddim, 50 steps\",,0.10000000000000001,\"\"\"q\"\"\"\n");
  EXPECT_EQ(CsvHeader({"step", "fid"}), "step,fid\n");
}

TEST_F(OutputTest, CsvRowsReadBackThemselvesAndThroughPythonsCsvModule) {
  // Random fields over an alphabet rich in what quoting must handle.
  std::mt19937 random(20261207);
  const std::string alphabet = "ab,\" 1.;'\t";
  std::vector<std::vector<std::string>> rows;
  std::string text;
  for (int r = 0; r < 200; ++r) {
    std::vector<std::string> fields(1 + random() % 6);
    CsvRow row;
    for (std::string& field : fields) {
      const int size = static_cast<int>(random() % 7);
      for (int i = 0; i < size; ++i) field += alphabet[random() % alphabet.size()];
      row.Text(field);
    }
    EXPECT_EQ(SplitCsvLine(row.Line()), fields) << row.Line();
    rows.push_back(fields);
    text += row.Line();
  }
  const fs::path csv = dir_ / "rows.csv";
  WriteFileAtomically(csv.string(), text);

  // Python's csv module reads the file; each row comes back as fields joined by a byte that
  // no field holds (\x1f), one row per line.
  const fs::path parsed = dir_ / "parsed.txt";
  const std::string command = std::string(DDPM_REFERENCE_PYTHON) +
                              " -c \"import csv,sys; "
                              "w=open(sys.argv[2],'w'); "
                              "[w.write(chr(31).join(r)+chr(10)) for r in "
                              "csv.reader(open(sys.argv[1],newline=''))]\" " +
                              csv.string() + " " + parsed.string();
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  const std::vector<std::string> lines = Lines(ReadAll(parsed));
  ASSERT_EQ(lines.size(), rows.size());
  for (std::size_t r = 0; r < rows.size(); ++r) {
    std::string joined;
    for (std::size_t f = 0; f < rows[r].size(); ++f) joined += (f ? "\x1f" : "") + rows[r][f];
    EXPECT_EQ(lines[r], joined) << "row " << r;
  }
}

TEST_F(OutputTest, ATornQuotedLineEndsItsLastField) {
  EXPECT_EQ(SplitCsvLine("1,\"open"), (std::vector<std::string>{"1", "open"}));
  EXPECT_EQ(SplitCsvLine("1,2\n3"), (std::vector<std::string>{"1", "2"}));
  EXPECT_EQ(SplitCsvLine("1,2\r\n"), (std::vector<std::string>{"1", "2"}));
  EXPECT_EQ(SplitCsvLine(""), (std::vector<std::string>{""}));
}

TEST_F(OutputTest, AnAtomicWriteReplacesTheFileWholeAndLeavesNoTemporary) {
  const fs::path path = dir_ / "file.txt";
  for (Durability durability :
       {Durability::kRenamed, Durability::kSynced, Durability::kSyncedWithDirectory}) {
    WriteFileAtomically(path.string(), "old", durability);
    WriteFileAtomically(path.string(), std::string(1 << 20, 'x'), durability);
    EXPECT_EQ(ReadAll(path), std::string(1 << 20, 'x'));
  }
  WriteFileAtomically(path.string(), "mine", Durability::kSynced, path.string() + ".tmp.42");
  EXPECT_EQ(ReadAll(path), "mine");
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename());
  EXPECT_EQ(names, std::vector<std::string>{"file.txt"});
}

TEST_F(OutputTest, AFailedAtomicWriteNamesTheFileAndKeepsTheOldOne) {
  const fs::path path = dir_ / "kept.txt";
  WriteFileAtomically(path.string(), "before");
  // A file size limit below the new contents: write() fails with EFBIG part way.
  struct sigaction ignore = {}, previous = {};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGXFSZ, &ignore, &previous);
  rlimit old_limit{};
  ::getrlimit(RLIMIT_FSIZE, &old_limit);
  rlimit small = old_limit;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  try {
    WriteFileAtomically(path.string(), std::string(100000, 'y'));
  } catch (const FileError& error) {
    message = error.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::sigaction(SIGXFSZ, &previous, nullptr);
  EXPECT_EQ(message, path.string() + ": cannot write: " + std::strerror(EFBIG));
  EXPECT_EQ(ReadAll(path), "before");
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));

  const fs::path nowhere = dir_ / "missing" / "x.txt";
  try {
    WriteFileAtomically(nowhere.string(), "z");
    ADD_FAILURE() << "a write into a missing directory succeeded";
  } catch (const FileError& error) {
    EXPECT_EQ(std::string(error.what()), nowhere.string() + ": cannot create " + nowhere.string() +
                                             ".tmp: " + std::strerror(ENOENT));
  }
  EXPECT_THROW(MakeDirectories((dir_ / "kept.txt" / "sub").string()), FileError);
}

TEST_F(OutputTest, LinesBelowTheLevelAreDroppedAndWarningsGoToStderr) {
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  SetLogLevel(LogLevel::kInfo);
  Logf(LogLevel::kDebug, "debug %d", 1);
  LogInfo("info %d\n", 2);
  LogWarning("warning %s", "three");
  LogError("error %.1f", 4.0);
  SetLogLevel(LogLevel::kError);
  LogInfo("info 5");
  LogWarning("warning 6");
  LogError("error 7");
  SetLogLevel(LogLevel::kDebug);
  Logf(LogLevel::kDebug, "debug 8 at 100%%");
  const std::string out = ::testing::internal::GetCapturedStdout();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(out, "info 2\ndebug 8 at 100%\n");
  EXPECT_EQ(err, "warning three\nerror 4.0\nerror 7\n");
}

TEST_F(OutputTest, RanksOtherThanZeroPrefixTheirLines) {
  ::testing::internal::CaptureStdout();
  SetLogRank(0, 4);
  LogInfo("ddpm: step 100");
  SetLogRank(3, 4);
  LogInfo("ddpm: step 100");
  SetLogRank(3, 1);  // not a world of several ranks
  LogInfo("alone");
  EXPECT_EQ(::testing::internal::GetCapturedStdout(),
            "ddpm: step 100\n[rank 3] ddpm: step 100\nalone\n");
}

TEST_F(OutputTest, LinesOfManyThreadsStayWhole) {
  const fs::path path = dir_ / "threads.txt";
  ::testing::internal::CaptureStdout();
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < 300; ++i) LogInfo("thread %d line %03d %s", t, i, "abcdefghij");
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::vector<std::string> lines = Lines(::testing::internal::GetCapturedStdout());
  ASSERT_EQ(lines.size(), 1200u);
  std::vector<int> next(4, 0);
  for (const std::string& line : lines) {
    int t = -1, i = -1;
    char tail[16] = {};
    ASSERT_EQ(std::sscanf(line.c_str(), "thread %d line %d %15s", &t, &i, tail), 3) << line;
    ASSERT_TRUE(t >= 0 && t < 4) << line;
    EXPECT_EQ(i, next[t]++) << "lines of one thread keep their order";
    EXPECT_STREQ(tail, "abcdefghij");
  }
}

TEST_F(OutputTest, EveryBinaryTakesLogLevel) {
  EXPECT_EQ(ParseLogLevel("warning"), LogLevel::kWarning);
  try {
    ParseLogLevel("loud");
    ADD_FAILURE() << "'loud' was taken for a level";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("'loud'"), std::string::npos) << error.what();
  }
  Flags flags("ddpm_tool", "a tool");
  const char* quiet[] = {"ddpm_tool", "--log-level=warning"};
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  const int code = RunMain(flags, 2, quiet, [] {
    LogInfo("ddpm_tool: progress");
    LogWarning("ddpm_tool: warning: kept");
    return 0;
  });
  EXPECT_EQ(code, 0);
  EXPECT_EQ(::testing::internal::GetCapturedStdout(), "");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "ddpm_tool: warning: kept\n");

  SetLogLevel(LogLevel::kInfo);
  Flags bad("ddpm_tool", "a tool");
  const char* loud[] = {"ddpm_tool", "--log-level", "loud"};
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(RunMain(bad, 3, loud, [] { return 0; }), 2);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("--log-level"), std::string::npos) << err;
  EXPECT_NE(err.find("'loud'"), std::string::npos) << err;
  EXPECT_NE(flags.Usage().find("--log-level"), std::string::npos);
}

}  // namespace
}  // namespace ddpm
