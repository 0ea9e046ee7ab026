// A strict, bounded JSON reader: accepts exactly what lowra's Python readers accept (container.strict_json) and
// refuses the rest, so the native and numpy readers agree on every file.
//
// Refused: duplicate keys, NaN/Infinity/-Infinity, numbers that overflow to infinity, control characters inside
// strings, invalid \u escapes, trailing garbage, and nesting deeper than kMaxJsonDepth (Python only stops at its
// recursion limit; no lowra file nests more than 4 levels), and integers of more than kMaxIntDigits digits (Python's
// default int/str conversion limit). Strings are WTF-8: a lone surrogate escape such as "\ud800" is kept, as Python
// keeps it, and refused later by the name checks, as Python does.
//
// canonical_json writes a parsed value back the one way lowra's writer spells it, so a reader can refuse every other
// spelling of the same value (spaces, key order, escapes, number forms) as the Python reader does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lowra {

constexpr int kMaxJsonDepth = 64;
constexpr size_t kMaxIntDigits = 4300;  // sys.int_info.default_max_str_digits: json.loads refuses longer integers

struct Json {
  enum class Kind { Null, Bool, Int, Float, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  int64_t integer = 0;
  bool int_overflow = false;  // an integer outside int64 (Python has no bound): out of every range lowra checks
  double number = 0;
  std::string text;  // a string's value (WTF-8), or a number's source text (for messages)
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;  // in file order

  bool is_int() const { return kind == Kind::Int; }
  bool is_string() const { return kind == Kind::String; }
  bool is_array() const { return kind == Kind::Array; }
  bool is_object() const { return kind == Kind::Object; }
  // The member named `key`, or null.
  const Json* find(std::string_view key) const;
  // Python's type name of the value (dict, list, str, int, float, bool, NoneType), for messages.
  const char* type_name() const;
  // A short rendering of the value for messages (like container.short(repr(value))).
  std::string brief(size_t limit = 60) const;
  // True if the integer lies in [low, high] (an overflowing integer never does).
  bool int_in(int64_t low, int64_t high) const { return is_int() && !int_overflow && integer >= low && integer <= high; }
};

// Parse `text` (valid UTF-8) into `out`; on failure returns false and a one-line reason in `error`.
bool parse_json(std::string_view text, Json& out, std::string& error);

// `value` as container.encode_metadata writes it: json.dumps(value, separators=(",", ":"), sort_keys=True) with
// ensure_ascii on, keys in code point order, integers as parsed (any size, "-0" as "0") and floats as Python's
// repr() (shortest round-trip digits; exponent form below 1e-4 and from 1e16 on).
std::string canonical_json(const Json& value);

// Python's repr of a float ("1.0", "1e-05", "0.0001"), appended to `out`.
void append_python_float(std::string& out, double value);

}  // namespace lowra
