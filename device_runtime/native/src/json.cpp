#include "json.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <string>
#include <unordered_set>

#include "unicode.hpp"

namespace lowra {
namespace {

// The decimal exponent of a JSON number's leading significant digit (0 for "1.5", -3 for "0.001", 2 for "1e2"):
// tells an out-of-range number that overflows from one that underflows.
long decimal_exponent(const std::string& text) {
  size_t i = text[0] == '-' ? 1 : 0;
  long exponent = 0;
  size_t e = text.find_first_of("eE");
  if (e != std::string::npos) {
    long value = 0;
    bool negative = text[e + 1] == '-';
    for (size_t k = e + 1; k < text.size(); ++k)
      if (text[k] >= '0' && text[k] <= '9' && value < 100000000) value = value * 10 + (text[k] - '0');
    exponent = negative ? -value : value;
  }
  size_t end = e == std::string::npos ? text.size() : e;
  size_t dot = text.find('.', i);
  size_t int_end = dot == std::string::npos || dot > end ? end : dot;
  size_t first = text.find_first_not_of('0', i);
  if (first < int_end) return exponent + static_cast<long>(int_end - first) - 1;
  if (int_end == end) return -1000000;  // the value is zero
  size_t frac = text.find_first_not_of('0', int_end + 1);
  if (frac >= end) return -1000000;
  return exponent - static_cast<long>(frac - int_end);
}

class Parser {
 public:
  explicit Parser(std::string_view text) : s_(text) {}

  bool parse(Json& out, std::string& error) {
    skip_ws();
    if (!value(out, 0)) {
      error = error_;
      return false;
    }
    skip_ws();
    if (pos_ != s_.size()) {
      error = "Extra data at char " + std::to_string(pos_);
      return false;
    }
    return true;
  }

 private:
  std::string_view s_;
  size_t pos_ = 0;
  std::string error_;

  bool fail(const std::string& why) {
    error_ = why + " at char " + std::to_string(pos_);
    return false;
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  bool value(Json& out, int depth) {
    if (pos_ >= s_.size()) return fail("Expecting value");
    char c = s_[pos_];
    if (c == '{' || c == '[') {
      if (depth >= kMaxJsonDepth) return fail("nesting deeper than " + std::to_string(kMaxJsonDepth) + " levels");
      return c == '{' ? object(out, depth + 1) : array(out, depth + 1);
    }
    if (c == '"') {
      out.kind = Json::Kind::String;
      return string(out.text);
    }
    if (literal("true")) return out.kind = Json::Kind::Bool, out.boolean = true, true;
    if (literal("false")) return out.kind = Json::Kind::Bool, out.boolean = false, true;
    if (literal("null")) return out.kind = Json::Kind::Null, true;
    if (s_.substr(pos_, 3) == "NaN" || s_.substr(pos_, 8) == "Infinity" || s_.substr(pos_, 9) == "-Infinity")
      return fail("NaN and Infinity are not valid JSON");
    if (c == '-' || (c >= '0' && c <= '9')) return number(out);
    return fail("Expecting value");
  }

  bool object(Json& out, int depth) {
    out.kind = Json::Kind::Object;
    std::unordered_set<std::string> keys;  // a header may hold 200,000 tensors: no quadratic duplicate check
    ++pos_;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '}') return ++pos_, true;
    while (true) {
      if (pos_ >= s_.size() || s_[pos_] != '"') return fail("Expecting property name enclosed in double quotes");
      std::string key;
      if (!string(key)) return false;
      if (!keys.insert(key).second) return fail("duplicate key " + short_repr(key));
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != ':') return fail("Expecting ':' delimiter");
      ++pos_;
      skip_ws();
      out.members.emplace_back(std::move(key), Json{});
      if (!value(out.members.back().second, depth)) return false;
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == '}') return ++pos_, true;
      if (pos_ >= s_.size() || s_[pos_] != ',') return fail("Expecting ',' delimiter");
      ++pos_;
      skip_ws();
    }
  }

  bool array(Json& out, int depth) {
    out.kind = Json::Kind::Array;
    ++pos_;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == ']') return ++pos_, true;
    while (true) {
      out.items.emplace_back();
      if (!value(out.items.back(), depth)) return false;
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ']') return ++pos_, true;
      if (pos_ >= s_.size() || s_[pos_] != ',') return fail("Expecting ',' delimiter");
      ++pos_;
      skip_ws();
    }
  }

  bool hex4(uint32_t& code) {
    if (pos_ + 4 > s_.size()) return fail("Invalid \\uXXXX escape");
    code = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[pos_ + k];
      int digit = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
      if (digit < 0) return fail("Invalid \\uXXXX escape");
      code = (code << 4) | static_cast<uint32_t>(digit);
    }
    pos_ += 4;
    return true;
  }

  bool string(std::string& out) {
    ++pos_;  // the opening quote
    while (true) {
      if (pos_ >= s_.size()) return fail("Unterminated string");
      auto c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') return ++pos_, true;
      if (c < 0x20) return fail("Invalid control character");
      if (c != '\\') {
        out += static_cast<char>(c);
        ++pos_;
        continue;
      }
      if (++pos_ >= s_.size()) return fail("Unterminated string");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t code = 0;
          if (!hex4(code)) return false;
          // A high surrogate joins a following \u low surrogate; any other \u after it is read on its own
          // (Python's scanner does the same, keeping the lone surrogate).
          if (code >= 0xD800 && code <= 0xDBFF && s_.substr(pos_, 2) == "\\u") {
            size_t save = pos_;
            pos_ += 2;
            uint32_t low = 0;
            if (!hex4(low)) return false;
            if (low >= 0xDC00 && low <= 0xDFFF) code = 0x10000 + (((code - 0xD800) << 10) | (low - 0xDC00));
            else pos_ = save;
          }
          append_utf8(out, code);
          break;
        }
        default: return fail("Invalid \\escape");
      }
    }
  }

  bool number(Json& out) {
    size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    auto digit = [&](size_t at) { return at < s_.size() && s_[at] >= '0' && s_[at] <= '9'; };
    if (!digit(pos_)) return fail("Expecting value");
    if (s_[pos_] == '0') ++pos_;
    else while (digit(pos_)) ++pos_;
    bool is_float = false;
    if (pos_ < s_.size() && s_[pos_] == '.' && digit(pos_ + 1)) {
      is_float = true;
      ++pos_;
      while (digit(pos_)) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      size_t at = pos_ + 1;
      if (at < s_.size() && (s_[at] == '+' || s_[at] == '-')) ++at;
      if (digit(at)) {
        is_float = true;
        pos_ = at;
        while (digit(pos_)) ++pos_;
      }
    }
    out.text = std::string(s_.substr(start, pos_ - start));
    const char* first = out.text.data();
    const char* last = first + out.text.size();
    if (is_float) {
      out.kind = Json::Kind::Float;
      auto result = std::from_chars(first, last, out.number);
      if (result.ec == std::errc::result_out_of_range) {
        // from_chars reports overflow and underflow alike; Python reads underflow as 0.0 and we refuse overflow.
        if (decimal_exponent(out.text) > 0) return fail("number " + out.text.substr(0, 40) + " overflows to infinity");
        out.number = out.text[0] == '-' ? -0.0 : 0.0;
      } else if (result.ec != std::errc() || !std::isfinite(out.number)) {
        return fail("number " + out.text.substr(0, 40) + " overflows to infinity");
      }
      return true;
    }
    out.kind = Json::Kind::Int;
    size_t digits = out.text.size() - (out.text[0] == '-' ? 1 : 0);
    if (digits > kMaxIntDigits)
      return fail("Exceeds the limit (" + std::to_string(kMaxIntDigits) + " digits) for integer string conversion: "
                  "value has " + std::to_string(digits) + " digits");
    auto result = std::from_chars(first, last, out.integer);
    out.int_overflow = result.ec != std::errc();
    return true;
  }
};


void append_canonical(std::string& out, const Json& value) {
  switch (value.kind) {
    case Json::Kind::Null: out += "null"; return;
    case Json::Kind::Bool: out += value.boolean ? "true" : "false"; return;
    case Json::Kind::Int: out += value.text == "-0" ? "0" : value.text; return;  // JSON allows no other respelling
    case Json::Kind::Float: append_python_float(out, value.number); return;
    case Json::Kind::String: append_json_string(out, value.text); return;
    case Json::Kind::Array:
      out += '[';
      for (size_t i = 0; i < value.items.size(); ++i) {
        if (i) out += ',';
        append_canonical(out, value.items[i]);
      }
      out += ']';
      return;
    case Json::Kind::Object: {
      // WTF-8 bytes compare in code point order (surrogates included), which is how Python sorts str keys.
      std::vector<const std::pair<std::string, Json>*> members;
      for (const auto& m : value.members) members.push_back(&m);
      std::sort(members.begin(), members.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t i = 0; i < members.size(); ++i) {
        if (i) out += ',';
        append_json_string(out, members[i]->first);
        out += ':';
        append_canonical(out, members[i]->second);
      }
      out += '}';
      return;
    }
  }
}

}  // namespace

const Json* Json::find(std::string_view key) const {
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

const char* Json::type_name() const {
  switch (kind) {
    case Kind::Null: return "NoneType";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::Array: return "list";
    case Kind::Object: return "dict";
  }
  return "?";
}

std::string Json::brief(size_t limit) const {
  std::string text;
  switch (kind) {
    case Kind::Null: text = "None"; break;
    case Kind::Bool: text = boolean ? "True" : "False"; break;
    case Kind::Int:
    case Kind::Float: text = this->text; break;
    case Kind::String: return short_repr(this->text, limit);
    case Kind::Array:
      text = "[";
      for (size_t i = 0; i < items.size() && text.size() < limit; ++i) text += (i ? ", " : "") + items[i].brief(limit);
      text += "]";
      break;
    case Kind::Object:
      text = "{";
      for (size_t i = 0; i < members.size() && text.size() < limit; ++i)
        text += (i ? ", " : "") + short_repr(members[i].first, limit) + ": " + members[i].second.brief(limit);
      text += "}";
      break;
  }
  if (text.size() <= limit) return text;
  size_t cut = limit - 3;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // never split a character
  return text.substr(0, cut) + "...";
}

bool parse_json(std::string_view text, Json& out, std::string& error) {
  out = Json{};
  return Parser(text).parse(out, error);
}

// Python's float.__repr__, which json.dumps writes: the shortest digits that read back to `value` (std::to_chars
// and Python both pick the closest such string), laid out as repr lays them out: "1e-05", "1.5e+16", "-0.0", "1.0",
// "0.0001", "123.25". Exponent form when the decimal exponent is below -4 or at least 16, with at least two
// exponent digits and no ".0" on a one-digit mantissa; otherwise fixed, with at least one digit after the point.
void append_python_float(std::string& out, double value) {
  char buf[64];
  auto result = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::scientific);
  std::string_view text(buf, static_cast<size_t>(result.ptr - buf));  // "-1.2345e+02": mantissa, 'e', sign, digits
  size_t e = text.find('e');
  std::string digits;
  for (char c : text.substr(0, e))
    if (c >= '0' && c <= '9') digits += c;
  int exponent = 0;
  for (char c : text.substr(e + 2)) exponent = exponent * 10 + (c - '0');
  if (text[e + 1] == '-') exponent = -exponent;
  if (std::signbit(value)) out += '-';
  if (exponent < -4 || exponent >= 16) {
    out += digits[0];
    if (digits.size() > 1) out += '.' + digits.substr(1);
    std::snprintf(buf, sizeof buf, "e%c%02d", exponent < 0 ? '-' : '+', exponent < 0 ? -exponent : exponent);
    out += buf;
  } else if (exponent < 0) {
    out += "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  } else {
    auto point = static_cast<size_t>(exponent) + 1;  // digits before the decimal point
    if (digits.size() <= point) out += digits + std::string(point - digits.size(), '0') + ".0";
    else out += digits.substr(0, point) + '.' + digits.substr(point);
  }
}

std::string canonical_json(const Json& value) {
  std::string out;
  append_canonical(out, value);
  return out;
}

}  // namespace lowra
