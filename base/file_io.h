// The one way a file is written whole or not at all, and the directory calls around it.
#pragma once

#include <string>
#include <string_view>

#include "base/errors.h"

namespace ddpm {

/// How much of an atomic write survives a crash of the machine (a killed process never leaves
/// a part-written file either way).
enum class Durability {
  /// Renamed into place unsynced: for outputs that are cheap to make again (sample images).
  kRenamed,
  /// The file's bytes fsynced before the rename.
  kSynced,
  /// The bytes fsynced, and the directory after the rename, so that the rename itself is kept.
  kSyncedWithDirectory,
};

/// Writes bytes as path whole or not at all: to a temporary file beside it (path.tmp unless
/// `temporary` is given, for writers that may race), synced as durability says, then renamed
/// into place. Throws FileError naming the file and the system's reason (a full disk), and
/// leaves no temporary behind.
void WriteFileAtomically(const std::string& path, std::string_view bytes,
                         Durability durability = Durability::kSynced,
                         const std::string& temporary = "");

/// fsyncs a directory, so that the renames and creations in it survive a crash; throws FileError.
void SyncDirectory(const std::string& path);

/// Creates path and its missing parents; throws FileError naming the path.
void MakeDirectories(const std::string& path);

}  // namespace ddpm
