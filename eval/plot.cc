#include "eval/plot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>

namespace ddpm {
namespace {

// Each glyph is 5 rows of 3 bits.
const std::array<uint8_t, 5>* Glyph(char c) {
  static const std::array<std::array<uint8_t, 5>, 29> kGlyphs = {
      {{7, 5, 5, 5, 7}, {2, 6, 2, 2, 7}, {7, 1, 7, 4, 7}, {7, 1, 7, 1, 7}, {5, 5, 7, 1, 1},
       {7, 4, 7, 1, 7}, {7, 4, 7, 5, 7}, {7, 1, 1, 1, 1}, {7, 5, 7, 5, 7}, {7, 5, 7, 1, 7},
       {0, 0, 0, 0, 2}, {0, 0, 7, 0, 0}, {7, 4, 7, 4, 7}, {0, 2, 7, 2, 0}, {7, 4, 6, 4, 4},
       {7, 2, 2, 2, 7}, {6, 5, 5, 5, 6}, {3, 4, 2, 1, 6}, {7, 2, 2, 2, 2}, {7, 5, 7, 4, 4},
       {7, 4, 5, 5, 7}, {5, 5, 5, 5, 7}, {2, 5, 7, 5, 5}, {6, 5, 5, 5, 5}, {7, 4, 4, 4, 7},
       {5, 5, 5, 7, 5}, {5, 7, 7, 5, 5}, {6, 5, 6, 5, 5}, {4, 4, 4, 4, 7}}};
  if (c >= '0' && c <= '9') return &kGlyphs[c - '0'];
  if (c == '.') return &kGlyphs[10];
  if (c == '-') return &kGlyphs[11];
  if (c == 'e' || c == 'E') return &kGlyphs[12];
  if (c == '+') return &kGlyphs[13];
  static const std::string kLetters = "FIDSTPGUANCWMRL";
  if (const size_t at = kLetters.find(c); at != std::string::npos) return &kGlyphs[14 + at];
  return nullptr;
}

}  // namespace

Canvas::Canvas(int width, int height)
    : image_{width, height, 3,
             std::vector<uint8_t>(static_cast<std::size_t>(width) * height * 3, 255)} {}

void Canvas::Set(int x, int y, Rgb color) {
  if (x < 0 || y < 0 || x >= image_.width || y >= image_.height) return;
  uint8_t* p = &image_.pixels[(static_cast<std::size_t>(y) * image_.width + x) * 3];
  p[0] = color.r;
  p[1] = color.g;
  p[2] = color.b;
}

void Canvas::Line(double x0, double y0, double x1, double y1, Rgb color) {
  const int n = static_cast<int>(std::max(std::abs(x1 - x0), std::abs(y1 - y0))) + 1;
  for (int i = 0; i <= n; ++i) {
    const double f = static_cast<double>(i) / n;
    Set(static_cast<int>(std::lround(x0 + f * (x1 - x0))),
        static_cast<int>(std::lround(y0 + f * (y1 - y0))), color);
  }
}

void Canvas::Point(double x, double y, Rgb color) {
  for (int d = -1; d <= 1; ++d) Line(x - 1, y + d, x + 1, y + d, color);
}

void Canvas::Text(int x, int y, const std::string& text, int scale, Rgb color) {
  for (char c : text) {
    if (const auto* glyph = Glyph(c)) {
      for (int row = 0; row < 5; ++row) {
        for (int col = 0; col < 3; ++col) {
          if (((*glyph)[row] >> (2 - col)) & 1) {
            for (int dy = 0; dy < scale; ++dy) {
              for (int dx = 0; dx < scale; ++dx) {
                Set(x + col * scale + dx, y + row * scale + dy, color);
              }
            }
          }
        }
      }
    }
    x += 4 * scale;
  }
}

std::string TickLabel(double value, double spacing) {
  char text[32];
  const double magnitude = std::max(std::abs(value), std::abs(spacing));
  if (spacing > 0 && magnitude < 1e7 && spacing >= 1e-4) {
    // Enough decimals that ticks spacing apart read differently.
    const int decimals = std::clamp(static_cast<int>(std::ceil(-std::log10(spacing) + 1e-9)), 0, 6);
    std::snprintf(text, sizeof(text), "%.*f", decimals, value);
  } else {
    std::snprintf(text, sizeof(text), "%.3e", value);
  }
  return text;
}

}  // namespace ddpm
