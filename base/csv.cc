#include "base/csv.h"

namespace ddpm {

std::string CsvField(std::string_view text) {
  if (text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string quoted = "\"";
  for (char c : text) {
    if (c == '"') quoted += '"';
    quoted += c;
  }
  return quoted + "\"";
}

std::vector<std::string> SplitCsvLine(std::string_view line) {
  std::vector<std::string> fields;
  std::string field;
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        field += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      fields.push_back(field);
      field.clear();
    } else if (c == '\n' || (c == '\r' && (i + 1 == line.size() || line[i + 1] == '\n'))) {
      break;
    } else {
      field += c;
    }
  }
  fields.push_back(field);
  return fields;
}

CsvRow& CsvRow::Text(std::string_view text) {
  if (!first_) line_ += ',';
  first_ = false;
  line_ += CsvField(text);
  return *this;
}

std::string CsvHeader(const std::vector<std::string>& columns) {
  CsvRow row;
  for (const std::string& column : columns) row.Text(column);
  return row.Line();
}

}  // namespace ddpm
