#include "coordinator/registry.h"

#include <sqlite3.h>

#include <cmath>

#include "base/check.h"

namespace ddpm {
namespace {

// 'DDPR' in the database header's application_id; user_version is the schema version.
constexpr int kApplicationId = 0x44445052;
// 2: evals gained nll_bits_per_dim; 3: metric_history, every log-interval row of every run.
// An older file is migrated when opened.
constexpr int kSchemaVersion = 4;

[[noreturn]] void Fail(sqlite3* db, const std::string& path, int code, const char* call,
                       const char* file, int line) {
  const char* reason = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(code);
  throw RegistryError(
      CheckFailureMessage("registry " + path, call, file, line,
                          std::string(reason) + " (code " + std::to_string(code) + ")"));
}

// Records the call, file:line, the database and SQLite's own message.
#define DDPM_SQLITE_CHECK(db, path, call)                                  \
  do {                                                                     \
    const int ddpm_sqlite_code = (call);                                   \
    if (ddpm_sqlite_code != SQLITE_OK && ddpm_sqlite_code != SQLITE_ROW && \
        ddpm_sqlite_code != SQLITE_DONE) {                                 \
      Fail((db), (path), ddpm_sqlite_code, #call, __FILE__, __LINE__);     \
    }                                                                      \
  } while (0)

// One prepared statement, bound by position from 1, stepped to the end.
class Statement {
 public:
  Statement(sqlite3* db, const std::string& path, const char* sql) : db_(db), path_(path) {
    DDPM_SQLITE_CHECK(db_, path_, sqlite3_prepare_v2(db_, sql, -1, &statement_, nullptr));
  }
  ~Statement() { sqlite3_finalize(statement_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  Statement& Bind(const std::string& text) {
    DDPM_SQLITE_CHECK(db_, path_,
                      sqlite3_bind_text(statement_, ++index_, text.data(),
                                        static_cast<int>(text.size()), SQLITE_TRANSIENT));
    return *this;
  }
  Statement& BindBlob(const std::string& bytes) {
    DDPM_SQLITE_CHECK(db_, path_,
                      sqlite3_bind_blob(statement_, ++index_, bytes.data(),
                                        static_cast<int>(bytes.size()), SQLITE_TRANSIENT));
    return *this;
  }
  Statement& Bind(int64_t value) {
    DDPM_SQLITE_CHECK(db_, path_, sqlite3_bind_int64(statement_, ++index_, value));
    return *this;
  }
  Statement& Bind(double value) {
    DDPM_SQLITE_CHECK(db_, path_, sqlite3_bind_double(statement_, ++index_, value));
    return *this;
  }
  /// value, or NULL when it is absent.
  Statement& BindOptional(bool present, double value) {
    if (present) return Bind(value);
    DDPM_SQLITE_CHECK(db_, path_, sqlite3_bind_null(statement_, ++index_));
    return *this;
  }
  /// Steps once; true while there is a row.
  bool Step() {
    const int code = sqlite3_step(statement_);
    if (code == SQLITE_ROW) return true;
    DDPM_SQLITE_CHECK(db_, path_, code);
    return false;
  }
  void Run() {
    while (Step()) {
    }
  }
  int64_t Int(int column) { return sqlite3_column_int64(statement_, column); }
  bool Null(int column) { return sqlite3_column_type(statement_, column) == SQLITE_NULL; }
  double Double(int column) { return sqlite3_column_double(statement_, column); }
  std::string Text(int column) {
    const auto* text = sqlite3_column_blob(statement_, column);
    return text == nullptr ? std::string()
                           : std::string(static_cast<const char*>(text),
                                         sqlite3_column_bytes(statement_, column));
  }

 private:
  sqlite3* db_;
  const std::string& path_;
  sqlite3_stmt* statement_ = nullptr;
  int index_ = 0;
};

}  // namespace

Registry::Registry(const std::string& path) : path_(path) {
  const int code =
      sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  if (code != SQLITE_OK) {
    const std::string reason = db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(code);
    sqlite3_close(db_);
    db_ = nullptr;
    throw RegistryError("registry " + path + ": cannot open: " + reason);
  }
  try {
    DDPM_SQLITE_CHECK(db_, path_, sqlite3_busy_timeout(db_, 5000));
    int64_t id = 0, schema = 0;
    bool empty = true;
    {  // Finalised before the pragmas below, which cannot run inside a read.
      Statement application(db_, path_, "PRAGMA application_id");
      application.Step();
      id = application.Int(0);
      Statement version(db_, path_, "PRAGMA user_version");
      version.Step();
      schema = version.Int(0);
      Statement tables(db_, path_, "SELECT count(*) FROM sqlite_master");
      tables.Step();
      empty = tables.Int(0) == 0;
    }
    if (!empty && id != kApplicationId) {
      throw RegistryError("registry " + path + ": not a ddpm run registry (application_id " +
                          std::to_string(id) + "); choose another --data-dir");
    }
    if (schema > kSchemaVersion) {
      throw RegistryError("registry " + path + ": schema version " + std::to_string(schema) +
                          " is newer than this coordinator's " + std::to_string(kSchemaVersion) +
                          "; run a newer ddpm_coordinator");
    }
    Execute("PRAGMA journal_mode=WAL", __FILE__, __LINE__);
    Execute("PRAGMA synchronous=FULL", __FILE__, __LINE__);
    Execute("PRAGMA foreign_keys=ON", __FILE__, __LINE__);
    Transaction([&] {
      Execute("PRAGMA application_id=" + std::to_string(kApplicationId), __FILE__, __LINE__);
      Execute("PRAGMA user_version=" + std::to_string(kSchemaVersion), __FILE__, __LINE__);
      Execute(
          "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
          // The run record is the serialised ddpm.v1.Run (its transitions apart); the columns
          // beside it are for people who open the file with sqlite3.
          "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL,"
          " name TEXT NOT NULL, state TEXT NOT NULL, step INTEGER NOT NULL,"
          " updated_unix_ms INTEGER NOT NULL, record BLOB NOT NULL);"
          "CREATE TABLE IF NOT EXISTS transitions (run_id TEXT NOT NULL REFERENCES runs(id)"
          " ON DELETE CASCADE, at_unix_ms INTEGER NOT NULL, from_state TEXT NOT NULL,"
          " to_state TEXT NOT NULL, reason TEXT NOT NULL);"
          "CREATE INDEX IF NOT EXISTS transitions_by_run ON transitions(run_id);"
          "CREATE TABLE IF NOT EXISTS checkpoints (run_id TEXT NOT NULL REFERENCES runs(id)"
          " ON DELETE CASCADE, step INTEGER NOT NULL, path TEXT NOT NULL,"
          " at_unix_ms INTEGER NOT NULL);"
          // An evaluation of the bound alone has num_samples 0 (and fid, inception_score 0);
          // one without the bound has nll_bits_per_dim NULL.
          "CREATE TABLE IF NOT EXISTS evals (run_id TEXT NOT NULL REFERENCES runs(id)"
          " ON DELETE CASCADE, step INTEGER NOT NULL, fid REAL NOT NULL,"
          " inception_score REAL NOT NULL, num_samples INTEGER NOT NULL,"
          " at_unix_ms INTEGER NOT NULL, nll_bits_per_dim REAL, record BLOB);"
          // One row per log interval of a run, keyed by step: a restarted attempt that logs a
          // step again replaces the row. The quartiles are NULL where no sample fell.
          "CREATE TABLE IF NOT EXISTS metric_history (run_id TEXT NOT NULL REFERENCES runs(id)"
          " ON DELETE CASCADE, step INTEGER NOT NULL, at_unix_ms INTEGER NOT NULL,"
          " loss REAL NOT NULL, q0 REAL, q1 REAL, q2 REAL, q3 REAL, lr REAL NOT NULL,"
          " grad_norm REAL NOT NULL, images_per_second REAL NOT NULL,"
          " PRIMARY KEY (run_id, step)) WITHOUT ROWID;",
          __FILE__, __LINE__);
      if (!empty && schema < 2) {
        Execute("ALTER TABLE evals ADD COLUMN nll_bits_per_dim REAL", __FILE__, __LINE__);
      }
      // Schema 4: the whole EvalResult (KID, PRD and what comes later) beside the columns.
      if (!empty && schema < 4) {
        bool has_record = false;
        {
          Statement columns(db_, path_,
                            "SELECT count(*) FROM pragma_table_info('evals') "
                            "WHERE name = 'record'");
          columns.Step();
          has_record = columns.Int(0) > 0;
        }
        if (!has_record) Execute("ALTER TABLE evals ADD COLUMN record BLOB", __FILE__, __LINE__);
      }
    });
  } catch (...) {
    sqlite3_close(db_);
    db_ = nullptr;
    throw;
  }
}

Registry::~Registry() { sqlite3_close(db_); }

void Registry::Execute(const std::string& sql, const char* file, int line) {
  char* error = nullptr;
  const int code = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &error);
  if (code != SQLITE_OK) {
    const std::string reason = error != nullptr ? error : sqlite3_errstr(code);
    sqlite3_free(error);
    throw RegistryError("registry " + path_ + ": '" + sql.substr(0, 60) + "' failed at " + file +
                        ":" + std::to_string(line) + ": " + reason);
  }
}

void Registry::Transaction(const std::function<void()>& body) {
  Execute("BEGIN IMMEDIATE", __FILE__, __LINE__);
  try {
    body();
    Execute("COMMIT", __FILE__, __LINE__);
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

int64_t Registry::NextRunNumber() {
  Statement(db_, path_,
            "INSERT INTO counters(name, value) VALUES('run', 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1")
      .Run();
  Statement read(db_, path_, "SELECT value FROM counters WHERE name = 'run'");
  read.Step();
  return read.Int(0);
}

namespace {

std::string RecordOf(const v1::Run& run) {
  v1::Run record = run;
  record.clear_transitions();
  return record.SerializeAsString();
}

}  // namespace

void Registry::InsertRun(const v1::Run& run, int64_t seq) {
  Statement(db_, path_,
            "INSERT INTO runs(id, seq, name, state, step, updated_unix_ms, record) "
            "VALUES(?, ?, ?, ?, ?, ?, ?)")
      .Bind(run.id())
      .Bind(seq)
      .Bind(run.name())
      .Bind(v1::RunState_Name(run.state()))
      .Bind(static_cast<int64_t>(run.metrics().step()))
      .Bind(static_cast<int64_t>(run.updated_unix_ms()))
      .BindBlob(RecordOf(run))
      .Run();
}

void Registry::UpdateRun(const v1::Run& run) {
  Statement(db_, path_,
            "UPDATE runs SET state = ?, step = ?, updated_unix_ms = ?, record = ? WHERE id = ?")
      .Bind(v1::RunState_Name(run.state()))
      .Bind(static_cast<int64_t>(run.metrics().step()))
      .Bind(static_cast<int64_t>(run.updated_unix_ms()))
      .BindBlob(RecordOf(run))
      .Bind(run.id())
      .Run();
  if (sqlite3_changes(db_) != 1) {
    throw RegistryError("registry " + path_ + ": run " + run.id() + " is not stored");
  }
}

void Registry::AddTransition(const std::string& run_id, const v1::Transition& transition) {
  Statement(db_, path_,
            "INSERT INTO transitions(run_id, at_unix_ms, from_state, to_state, reason) "
            "VALUES(?, ?, ?, ?, ?)")
      .Bind(run_id)
      .Bind(static_cast<int64_t>(transition.at_unix_ms()))
      .Bind(v1::RunState_Name(transition.from()))
      .Bind(v1::RunState_Name(transition.to()))
      .Bind(transition.reason())
      .Run();
}

void Registry::AddCheckpoint(const std::string& run_id, const v1::CheckpointInfo& checkpoint) {
  Statement(db_, path_,
            "INSERT INTO checkpoints(run_id, step, path, at_unix_ms) VALUES(?, ?, ?, ?)")
      .Bind(run_id)
      .Bind(static_cast<int64_t>(checkpoint.step()))
      .Bind(checkpoint.path())
      .Bind(static_cast<int64_t>(checkpoint.at_unix_ms()))
      .Run();
}

void Registry::AddEval(const std::string& run_id, const v1::EvalResult& eval) {
  Statement(db_, path_,
            "INSERT INTO evals(run_id, step, fid, inception_score, num_samples, at_unix_ms, "
            "nll_bits_per_dim, record) VALUES(?, ?, ?, ?, ?, ?, ?, ?)")
      .Bind(run_id)
      .Bind(static_cast<int64_t>(eval.step()))
      .Bind(eval.fid())
      .Bind(eval.inception_score())
      .Bind(static_cast<int64_t>(eval.num_samples()))
      .Bind(static_cast<int64_t>(eval.at_unix_ms()))
      .BindOptional(eval.has_nll_bits_per_dim(), eval.nll_bits_per_dim())
      .BindBlob(eval.SerializeAsString())
      .Run();
}

void Registry::AddMetricRow(const std::string& run_id, const v1::TrainMetrics& row) {
  Statement insert(db_, path_,
                   "INSERT OR REPLACE INTO metric_history(run_id, step, at_unix_ms, loss, q0, q1, "
                   "q2, q3, lr, grad_norm, images_per_second) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, "
                   "?, ?)");
  insert.Bind(run_id)
      .Bind(static_cast<int64_t>(row.step()))
      .Bind(static_cast<int64_t>(row.at_unix_ms()))
      .Bind(row.loss());
  for (int quartile = 0; quartile < 4; ++quartile) {
    const bool present =
        quartile < row.loss_by_quartile_size() && std::isfinite(row.loss_by_quartile(quartile));
    insert.BindOptional(present, present ? row.loss_by_quartile(quartile) : 0.0);
  }
  insert.Bind(row.lr()).Bind(row.grad_norm()).Bind(row.images_per_second()).Run();
}

std::vector<v1::TrainMetrics> Registry::MetricRows(const std::string& run_id, int64_t since_step) {
  std::vector<v1::TrainMetrics> rows;
  Statement select(db_, path_,
                   "SELECT step, at_unix_ms, loss, q0, q1, q2, q3, lr, grad_norm, "
                   "images_per_second FROM metric_history WHERE run_id = ? AND step > ? "
                   "ORDER BY step");
  select.Bind(run_id).Bind(since_step);
  while (select.Step()) {
    v1::TrainMetrics& row = rows.emplace_back();
    row.set_step(select.Int(0));
    row.set_at_unix_ms(select.Int(1));
    row.set_loss(select.Double(2));
    for (int column = 3; column < 7; ++column) {
      row.add_loss_by_quartile(select.Null(column) ? std::nan("") : select.Double(column));
    }
    row.set_lr(select.Double(7));
    row.set_grad_norm(select.Double(8));
    row.set_images_per_second(select.Double(9));
  }
  return rows;
}

void Registry::DeleteRun(const std::string& run_id) {
  Statement(db_, path_, "DELETE FROM runs WHERE id = ?").Bind(run_id).Run();
}

std::vector<std::pair<int64_t, v1::Run>> Registry::LoadRuns() {
  std::vector<std::pair<int64_t, v1::Run>> runs;
  Statement select(db_, path_, "SELECT seq, id, record FROM runs ORDER BY seq");
  while (select.Step()) {
    v1::Run run;
    if (!run.ParseFromString(select.Text(2))) {
      throw RegistryError("registry " + path_ + ": the record of run " + select.Text(1) +
                          " is corrupt");
    }
    runs.emplace_back(select.Int(0), std::move(run));
  }
  Statement transitions(db_, path_,
                        "SELECT run_id, at_unix_ms, from_state, to_state, reason FROM "
                        "transitions ORDER BY rowid");
  while (transitions.Step()) {
    const std::string run_id = transitions.Text(0);
    for (auto& [seq, run] : runs) {
      if (run.id() != run_id) continue;
      v1::Transition* transition = run.add_transitions();
      transition->set_at_unix_ms(transitions.Int(1));
      v1::RunState from = v1::RUN_STATE_UNSPECIFIED, to = v1::RUN_STATE_UNSPECIFIED;
      v1::RunState_Parse(transitions.Text(2), &from);
      v1::RunState_Parse(transitions.Text(3), &to);
      transition->set_from(from);
      transition->set_to(to);
      transition->set_reason(transitions.Text(4));
      break;
    }
  }
  return runs;
}

std::vector<v1::CheckpointInfo> Registry::Checkpoints(const std::string& run_id) {
  std::vector<v1::CheckpointInfo> checkpoints;
  Statement select(db_, path_,
                   "SELECT step, path, at_unix_ms FROM checkpoints WHERE run_id = ? "
                   "ORDER BY rowid");
  select.Bind(run_id);
  while (select.Step()) {
    v1::CheckpointInfo& checkpoint = checkpoints.emplace_back();
    checkpoint.set_step(select.Int(0));
    checkpoint.set_path(select.Text(1));
    checkpoint.set_at_unix_ms(select.Int(2));
  }
  return checkpoints;
}

std::vector<v1::EvalResult> Registry::Evals(const std::string& run_id) {
  std::vector<v1::EvalResult> evals;
  Statement select(db_, path_,
                   "SELECT step, fid, inception_score, num_samples, at_unix_ms, nll_bits_per_dim, "
                   "record FROM evals WHERE run_id = ? ORDER BY rowid");
  select.Bind(run_id);
  while (select.Step()) {
    v1::EvalResult& eval = evals.emplace_back();
    // A row written before schema 4 has only the columns.
    if (!select.Null(6) && eval.ParseFromString(select.Text(6))) continue;
    eval.set_step(select.Int(0));
    eval.set_fid(select.Double(1));
    eval.set_inception_score(select.Double(2));
    eval.set_num_samples(select.Int(3));
    eval.set_at_unix_ms(select.Int(4));
    if (!select.Null(5)) eval.set_nll_bits_per_dim(select.Double(5));
  }
  return evals;
}

void Registry::ProbeWritable() {
  Execute("BEGIN IMMEDIATE", __FILE__, __LINE__);
  try {
    Execute("PRAGMA user_version=" + std::to_string(kSchemaVersion), __FILE__, __LINE__);
    Execute("COMMIT", __FILE__, __LINE__);
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

void Registry::BackupTo(const std::string& path) {
  sqlite3* copy = nullptr;
  int code =
      sqlite3_open_v2(path.c_str(), &copy, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  std::string reason;
  if (code == SQLITE_OK) {
    sqlite3_backup* backup = sqlite3_backup_init(copy, "main", db_, "main");
    if (backup == nullptr) {
      reason = sqlite3_errmsg(copy);
    } else {
      code = sqlite3_backup_step(backup, -1);  // Every page at once: the copy is consistent.
      if (code != SQLITE_DONE) reason = sqlite3_errstr(code);
      sqlite3_backup_finish(backup);
    }
  } else {
    reason = copy != nullptr ? sqlite3_errmsg(copy) : sqlite3_errstr(code);
  }
  sqlite3_close(copy);
  if (!reason.empty()) {
    throw RegistryError("registry " + path_ + ": cannot back up to " + path + ": " + reason);
  }
}

RegistryFileSummary InspectRegistryFile(const std::string& path) {
  sqlite3* db = nullptr;
  const int code = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr);
  RegistryFileSummary summary;
  try {
    if (code != SQLITE_OK) {
      throw RegistryError(
          path + ": cannot open: " + (db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(code)));
    }
    const std::string& name = path;
    int64_t id = 0;
    {
      Statement application(db, name, "PRAGMA application_id");
      application.Step();
      id = application.Int(0);
      Statement version(db, name, "PRAGMA user_version");
      version.Step();
      summary.schema = version.Int(0);
    }
    if (id != kApplicationId) {
      throw RegistryError(path + ": not a ddpm run registry (application_id " + std::to_string(id) +
                          ")");
    }
    if (summary.schema > kSchemaVersion) {
      throw RegistryError(path + ": schema version " + std::to_string(summary.schema) +
                          " is newer than this coordinator's " + std::to_string(kSchemaVersion));
    }
    {
      Statement check(db, name, "PRAGMA integrity_check");
      check.Step();
      if (check.Text(0) != "ok") {
        throw RegistryError(path + ": damaged: SQLite's integrity check says " + check.Text(0));
      }
      Statement runs(db, name, "SELECT count(*) FROM runs");
      runs.Step();
      summary.runs = runs.Int(0);
    }
  } catch (const RegistryError&) {
    sqlite3_close(db);
    throw;
  } catch (const std::exception& error) {
    sqlite3_close(db);
    throw RegistryError(path + ": not a readable run registry: " + error.what());
  }
  sqlite3_close(db);
  return summary;
}

}  // namespace ddpm
