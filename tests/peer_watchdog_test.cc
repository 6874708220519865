// The worker's watchdog of its peers on the same host, with real child processes: a peer killed
// with SIGKILL is named within a few polls, zombie or reaped; a peer on another host, one this
// process cannot see, or a pid now held by another process is not watched; Stop ends the
// watch without a report.
#include "worker/peer_watchdog.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <future>
#include <string>
#include <thread>
#include <vector>

namespace ddpm {
namespace {

// A child that sleeps until killed.
pid_t Sleeper() {
  const pid_t pid = fork();
  if (pid == 0) {
    while (true) pause();
  }
  return pid;
}

TEST(PeerWatchdog, NamesAPeerKilledOnItsHostAndLeavesOtherHostsAlone) {
  const pid_t here = Sleeper();
  const pid_t elsewhere = Sleeper();
  ASSERT_GT(here, 0);
  ASSERT_GT(elsewhere, 0);
  const ProcessId here_id = ProcessOf(here);
  EXPECT_GE(here_id.start_ticks, 0);
  EXPECT_FALSE(ProcessGone(here_id));
  EXPECT_EQ(ProcessId::FromText(here_id.ToText()), here_id);
  std::promise<std::pair<int, pid_t>> died;
  PeerWatchdog watchdog(
      0, {"a", "a", "b"}, {ThisProcess(), here_id, ProcessOf(elsewhere)},
      [&](int rank, pid_t pid, const std::string& host) {
        EXPECT_EQ(host, "a");
        died.set_value({rank, pid});
      },
      std::chrono::milliseconds(20));
  EXPECT_EQ(watchdog.watched(), std::vector<int>{1});
  // The child stays a zombie (not reaped) after the kill: that counts as gone.
  ASSERT_EQ(kill(here, SIGKILL), 0);
  std::future<std::pair<int, pid_t>> report = died.get_future();
  ASSERT_EQ(report.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(report.get(), std::make_pair(1, here));
  EXPECT_TRUE(ProcessGone(here_id));
  waitpid(here, nullptr, 0);
  EXPECT_TRUE(ProcessGone(here_id));
  kill(elsewhere, SIGKILL);
  waitpid(elsewhere, nullptr, 0);
}

TEST(PeerWatchdog, DoesNotWatchAPidItCannotSeeAndStopsWithoutAReport) {
  const pid_t peer = Sleeper();
  const pid_t gone = Sleeper();
  const ProcessId gone_id = ProcessOf(gone);
  kill(gone, SIGKILL);
  waitpid(gone, nullptr, 0);
  // This process's own pid with another start time: a process that took a peer's pid.
  ProcessId impostor = ThisProcess();
  impostor.start_ticks += 1;
  EXPECT_TRUE(ProcessGone(impostor));
  bool reported = false;
  {
    // Rank 2's pid is not a process here (another pid namespace, say), and rank 3's is another
    // process: neither is watched.
    PeerWatchdog watchdog(
        0, {"a", "a", "a", "a"}, {ThisProcess(), ProcessOf(peer), gone_id, impostor},
        [&](int, pid_t, const std::string&) { reported = true; }, std::chrono::milliseconds(20));
    EXPECT_EQ(watchdog.watched(), std::vector<int>{1});
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    watchdog.Stop();
    kill(peer, SIGKILL);
    waitpid(peer, nullptr, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_FALSE(reported);
}

}  // namespace
}  // namespace ddpm
