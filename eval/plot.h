// A small raster canvas for the PNG plots of the evaluation tools (the bound against t, FID and
// IS against step): lines, points and labels in a 3x5 pixel font of digits, '.', '-', '+',
// 'e' and the capitals of FID, IS, STEP, GUIDANCE W and SIGMA REL. Torch-free.
#pragma once

#include <cstdint>
#include <string>

#include "trainer/image_io.h"

namespace ddpm {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

class Canvas {
 public:
  /// A white RGB canvas.
  Canvas(int width, int height);
  void Set(int x, int y, Rgb color);
  void Line(double x0, double y0, double x1, double y1, Rgb color);
  /// A 3x3 square centred on (x, y).
  void Point(double x, double y, Rgb color);
  /// Text at (x, y) (top left), each font pixel scale x scale; other characters leave a gap.
  void Text(int x, int y, const std::string& text, int scale = 2, Rgb color = {});
  /// Pixels the text takes across.
  static int TextWidth(const std::string& text, int scale = 2) {
    return 4 * scale * static_cast<int>(text.size());
  }
  const Image& image() const { return image_; }

 private:
  Image image_;
};

/// A tick label of value on an axis whose ticks are spacing apart: fixed point with the
/// decimals that tell neighbouring ticks apart ("92797.4", "1.0025"), else "9.280e+04".
std::string TickLabel(double value, double spacing);

}  // namespace ddpm
