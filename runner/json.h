// Minimal JSON reader for gmorph-tvm manifests (objects, arrays, strings, numbers, literals).
//
// The manifest is small and written by us, so a ~150-line recursive-descent parser is enough;
// it reports the byte offset of the first syntax error. The files it reads may be hostile, so it
// refuses a document nested deeper than kMaxDepth (no stack overflow on 200,000 '['), numbers
// that are not finite, and Int() refuses a number that is not an integer in the exact range of a
// double; callers cap the document's size before reading it (kMaxDocumentBytes).
#ifndef GMORPH_RUNNER_JSON_H_
#define GMORPH_RUNNER_JSON_H_

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace gmorph {
namespace json {

// Text from a file, fit for a one-line message: bytes outside printable ASCII as \xNN.
inline std::string Printable(const std::string& text) {
  static const char* const kHex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

constexpr int kMaxDepth = 64;                            // arrays/objects inside each other
constexpr size_t kMaxDocumentBytes = 4u * 1024 * 1024;  // a manifest or a weights header

struct Value {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool Has(const std::string& key) const { return kind == Kind::kObject && object.count(key) > 0; }

  const Value& operator[](const std::string& key) const {
    if (kind != Kind::kObject) throw std::runtime_error("JSON value is not an object (looking up '" + Printable(key) + "')");
    auto it = object.find(key);
    if (it == object.end()) throw std::runtime_error("JSON object has no field '" + Printable(key) + "'");
    return it->second;
  }
  const std::vector<Value>& Array() const {
    if (kind != Kind::kArray) throw std::runtime_error("JSON value is not an array");
    return array;
  }
  const std::string& String() const {
    if (kind != Kind::kString) throw std::runtime_error("JSON value is not a string");
    return string;
  }
  // The number as an integer; refuses fractions and magnitudes above 2^53 (where a double stops
  // being exact), so no cast below is undefined.
  int64_t Int() const {
    if (kind != Kind::kNumber) throw std::runtime_error("JSON value is not a number");
    if (!(std::fabs(number) <= 9007199254740992.0) || number != std::floor(number)) {
      throw std::runtime_error("JSON number " + std::to_string(number) + " is not an integer in range");
    }
    return static_cast<int64_t>(number);
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : text_(text) {}

  Value ParseDocument() {
    Value v = ParseValue();
    SkipSpace();
    if (pos_ != text_.size()) Fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void Fail(const std::string& what) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
  }
  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t')) ++pos_;
  }
  char Peek() {
    SkipSpace();
    if (pos_ >= text_.size()) Fail("unexpected end of input");
    return text_[pos_];
  }
  void Expect(char c) {
    if (Peek() != c) Fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  bool Consume(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (text_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Value ParseValue() {
    Value v;
    char c = Peek();
    if ((c == '{' || c == '[') && ++depth_ > kMaxDepth) {
      Fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    }
    if (c == '{') {
      v.kind = Value::Kind::kObject;
      ++pos_;
      if (Peek() == '}') { ++pos_; --depth_; return v; }
      while (true) {
        if (Peek() != '"') Fail("expected a string key");
        std::string key = ParseString();
        Expect(':');
        v.object[key] = ParseValue();
        if (Peek() == ',') { ++pos_; continue; }
        Expect('}');
        --depth_;
        return v;
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::kArray;
      ++pos_;
      if (Peek() == ']') { ++pos_; --depth_; return v; }
      while (true) {
        v.array.push_back(ParseValue());
        if (Peek() == ',') { ++pos_; continue; }
        Expect(']');
        --depth_;
        return v;
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::kString;
      v.string = ParseString();
      return v;
    }
    if (Consume("true")) { v.kind = Value::Kind::kBool; v.boolean = true; return v; }
    if (Consume("false")) { v.kind = Value::Kind::kBool; return v; }
    if (Consume("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) {
      size_t start = pos_;
      while (pos_ < text_.size() && std::string("+-0123456789.eE").find(text_[pos_]) != std::string::npos) ++pos_;
      v.kind = Value::Kind::kNumber;
      try {
        v.number = std::stod(text_.substr(start, pos_ - start));
      } catch (const std::exception&) {
        pos_ = start;
        Fail("bad number");
      }
      if (!std::isfinite(v.number)) {
        pos_ = start;
        Fail("number out of range");
      }
      return v;
    }
    Fail("unexpected character '" + Printable(std::string(1, c)) + "'");
  }

  std::string ParseString() {
    Expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) Fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (c != '\\') { out.push_back(c); continue; }
      if (pos_ >= text_.size()) Fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          if (pos_ + 4 > text_.size()) Fail("short \\u escape");
          unsigned code = 0;
          for (int k = 0; k < 4; ++k) {
            const char h = text_[pos_ + k];
            const int digit = (h >= '0' && h <= '9') ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10
                              : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
            if (digit < 0) Fail("bad \\u escape");
            code = code * 16 + static_cast<unsigned>(digit);
          }
          pos_ += 4;
          // Basic Multilingual Plane only (names in our manifests are ASCII anyway).
          if (code < 0x80) {
            out.push_back(static_cast<char>(code));
          } else if (code < 0x800) {
            out.push_back(static_cast<char>(0xC0 | (code >> 6)));
            out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
          } else {
            out.push_back(static_cast<char>(0xE0 | (code >> 12)));
            out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
            out.push_back(static_cast<char>(0x80 | (code & 0x3F)));
          }
          break;
        }
        default:
          Fail("bad escape");
      }
    }
  }

  const std::string& text_;
  size_t pos_ = 0;
  int depth_ = 0;
};

inline Value Parse(const std::string& text) { return Parser(text).ParseDocument(); }

}  // namespace json
}  // namespace gmorph

#endif  // GMORPH_RUNNER_JSON_H_
