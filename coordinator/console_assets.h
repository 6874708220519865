// The console page's files, compiled into the coordinator (cmake/embed_files.cmake makes
// console_assets.cc from coordinator/console/ and Debian's Chart.js at build time): the binary
// serves its page with no files beside it.
#pragma once

#include <cstddef>
#include <string>

namespace ddpm {

/// One file of the page.
struct ConsoleAsset {
  const char* name;
  const char* content_type;
  const unsigned char* data;
  size_t size;
};

/// The file of that name ("index.html", "app.js", "chart.min.js"), or nullptr.
const ConsoleAsset* FindConsoleAsset(const std::string& name);

}  // namespace ddpm
