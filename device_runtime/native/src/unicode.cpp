#include "unicode.hpp"

#include <algorithm>
#include <cstdio>
#include <iterator>

namespace lowra {
namespace {

struct Range {
  uint32_t first, last;
};

constexpr Range kNonPrintable[] = {
#include "unicode_nonprintable.inc"
};

// Decode one code point of a string already known to be WTF-8; advances `i`.
uint32_t next_code(std::string_view s, size_t& i) {
  auto b = static_cast<unsigned char>(s[i]);
  int extra = b < 0x80 ? 0 : b < 0xE0 ? 1 : b < 0xF0 ? 2 : 3;
  uint32_t code = extra == 0 ? b : extra == 1 ? (b & 0x1F) : extra == 2 ? (b & 0x0F) : (b & 0x07);
  ++i;
  for (int k = 0; k < extra && i < s.size(); ++k, ++i) code = (code << 6) | (static_cast<unsigned char>(s[i]) & 0x3F);
  return code;
}

bool code_printable(uint32_t code) {
  auto it = std::upper_bound(std::begin(kNonPrintable), std::end(kNonPrintable), code,
                             [](uint32_t c, const Range& r) { return c < r.first; });
  if (it == std::begin(kNonPrintable)) return true;
  --it;
  return code > it->last;
}

}  // namespace

bool valid_utf8(std::string_view s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      ++i;
      continue;
    }
    int extra;
    uint32_t code, min;
    if (b >= 0xC2 && b <= 0xDF) extra = 1, code = b & 0x1F, min = 0x80;
    else if (b >= 0xE0 && b <= 0xEF) extra = 2, code = b & 0x0F, min = 0x800;
    else if (b >= 0xF0 && b <= 0xF4) extra = 3, code = b & 0x07, min = 0x10000;
    else return false;
    for (int k = 1; k <= extra; ++k) {
      if (i + k >= n) return false;
      auto c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      code = (code << 6) | (c & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    i += extra + 1;
  }
  return true;
}

void append_utf8(std::string& out, uint32_t code) {
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else if (code < 0x800) {
    out += static_cast<char>(0xC0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else if (code < 0x10000) {
    out += static_cast<char>(0xE0 | (code >> 12));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code >> 18));
    out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code & 0x3F));
  }
}

bool has_lone_surrogate(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    uint32_t code = next_code(s, i);
    if (code >= 0xD800 && code <= 0xDFFF) return true;
  }
  return false;
}

bool is_printable(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (!code_printable(next_code(s, i))) return false;
  }
  return true;
}

std::string short_repr(std::string_view s, size_t limit) {
  // Pieces of the repr, one per code point, so the cut never splits a character (as Python's slicing does not).
  std::string out = "'";
  size_t chars = 1;
  bool cut = false;
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    uint32_t code = next_code(s, i);
    std::string piece;
    char buf[16];
    if (code == '\'' || code == '\\') {
      piece = std::string("\\") + static_cast<char>(code);
    } else if (code == '\n') {
      piece = "\\n";
    } else if (code == '\t') {
      piece = "\\t";
    } else if (code == '\r') {
      piece = "\\r";
    } else if (!code_printable(code)) {
      std::snprintf(buf, sizeof buf, code < 0x100 ? "\\x%02x" : code < 0x10000 ? "\\u%04x" : "\\U%08x", code);
      piece = buf;
    } else {
      piece = std::string(s.substr(start, i - start));
    }
    size_t width = piece.size() > 1 && piece[0] == '\\' ? piece.size() : 1;
    if (chars + width + 1 > limit) {
      cut = true;
      break;
    }
    out += piece;
    chars += width;
  }
  if (cut) return out + "...";
  return out + "'";
}

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  char buf[8];
  for (size_t i = 0; i < s.size();) {
    uint32_t code = next_code(s, i);
    switch (code) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (code >= 0x20 && code <= 0x7E) {
      out += static_cast<char>(code);
    } else if (code < 0x10000) {
      std::snprintf(buf, sizeof buf, "\\u%04x", code);
      out += buf;
    } else {  // a surrogate pair, as Python writes characters beyond the BMP
      uint32_t v = code - 0x10000;
      std::snprintf(buf, sizeof buf, "\\u%04x", 0xD800 | (v >> 10));
      out += buf;
      std::snprintf(buf, sizeof buf, "\\u%04x", 0xDC00 | (v & 0x3FF));
      out += buf;
    }
  }
  out += '"';
}

}  // namespace lowra
