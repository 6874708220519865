// The one CSV writer and reader of the project: every CSV file (metrics.csv, eval.csv,
// sweep.csv, the bound's nll_terms.csv, neighbours.csv, parameter sweeps) is written a row at a
// time through CsvRow and read back with SplitCsvLine. Quoting is RFC 4180's: a field that holds
// a comma, a double quote, CR or LF is put in double quotes, each double quote in it doubled.
// Rows end in LF, not RFC 4180's CRLF (Python's csv, pandas and spreadsheets read both).
#pragma once

#include <cstdio>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ddpm {

/// One field as RFC 4180 writes it: as it is, or double-quoted with its quotes doubled.
std::string CsvField(std::string_view text);

/// Splits one line into its fields, undoing RFC 4180 quoting. A line ends at its first line
/// break outside quotes; a quote left open (a torn last line of a killed writer) ends the line.
std::vector<std::string> SplitCsvLine(std::string_view line);

/// A row built field by field, quoted as RFC 4180 asks; Line() gives it with its newline.
class CsvRow {
 public:
  /// A text field.
  CsvRow& Text(std::string_view text);
  /// A number printed with a printf format of one conversion ("%.17g", "%" PRId64).
  template <typename T>
  CsvRow& Number(const char* format, T value) {
    static_assert(std::is_arithmetic_v<T>, "CsvRow::Number takes a number");
    char text[64];
    std::snprintf(text, sizeof(text), format, value);
    return Text(text);
  }
  /// A field as an ostream writes it (default precision), as metrics.csv has always had them.
  template <typename T>
  CsvRow& Streamed(const T& value) {
    std::ostringstream out;
    out << value;
    return Text(out.str());
  }
  /// An empty field: a value not measured.
  CsvRow& Empty() { return Text(""); }
  /// The fields joined by commas, with a newline.
  std::string Line() const { return line_ + "\n"; }

 private:
  std::string line_;
  bool first_ = true;
};

/// The header line of a table from its column names (each quoted as needed), with a newline.
std::string CsvHeader(const std::vector<std::string>& columns);

}  // namespace ddpm
