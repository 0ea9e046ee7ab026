// UTF-8 as Python's readers see it: strict decoding, lone surrogates, str.isprintable() and json.dumps escaping.
//
// Strings parsed from JSON are kept as WTF-8 (UTF-8 that may hold a lone surrogate as its 3-byte form), because
// Python's json accepts "\ud800" and only the later name checks refuse it; the checks below tell the two apart.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace lowra {

// True if `bytes` is valid UTF-8 as Python's bytes.decode("utf-8") accepts it (no overlongs, no surrogates).
bool valid_utf8(std::string_view bytes);
// Append code point `code` (surrogates included: WTF-8) to `out`.
void append_utf8(std::string& out, uint32_t code);
// True if the WTF-8 string holds an encoded surrogate (what `str.encode("utf-8")` refuses).
bool has_lone_surrogate(std::string_view text);
// Python's str.isprintable() over a valid WTF-8 string (an empty string is printable, as in Python).
bool is_printable(std::string_view text);
// Python's repr() of a string cut like container.short(): for messages only (ASCII-safe, bounded).
std::string short_repr(std::string_view text, size_t limit = 60);
// `text` as json.dumps(ensure_ascii=True) writes a string, quotes included.
void append_json_string(std::string& out, std::string_view text);

}  // namespace lowra
