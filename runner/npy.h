// Reading and writing NumPy .npy files (format versions 1-3, C order, little-endian numbers).
//
// Enough for model inputs and outputs: the header is a Python dict literal with 'descr',
// 'fortran_order' and 'shape'; the data follows, padded so it starts at a multiple of 64 bytes.
#ifndef GMORPH_RUNNER_NPY_H_
#define GMORPH_RUNNER_NPY_H_

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

namespace gmorph {
namespace npy {

using json::Printable;

struct Array {
  std::string dtype;  // numpy name: float32, int64, bool, ...
  std::vector<int64_t> shape;
  std::vector<char> data;

  int64_t NumElements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// numpy descr ("<f4", "|b1") <-> dtype name ("float32", "bool"); throws on anything else.
inline std::string DescrToDtype(const std::string& descr) {
  static const char* const kKnown[][2] = {
      {"<f2", "float16"}, {"<f4", "float32"}, {"<f8", "float64"}, {"<i1", "int8"}, {"|i1", "int8"},
      {"<i2", "int16"}, {"<i4", "int32"}, {"<i8", "int64"}, {"<u1", "uint8"}, {"|u1", "uint8"},
      {"<u2", "uint16"}, {"<u4", "uint32"}, {"<u8", "uint64"}, {"|b1", "bool"}};
  for (const auto& known : kKnown) {
    if (descr == known[0]) return known[1];
  }
  if (!descr.empty() && descr[0] == '>') {
    throw std::runtime_error("big-endian arrays are not supported ('" + Printable(descr) + "')");
  }
  throw std::runtime_error("unsupported dtype '" + Printable(descr) + "'");
}

inline std::string DtypeToDescr(const std::string& dtype) {
  if (dtype == "bool") return "|b1";
  auto bits_of = [&](size_t prefix) { return std::stoi(dtype.substr(prefix)) / 8; };
  if (dtype.rfind("float", 0) == 0) return "<f" + std::to_string(bits_of(5));
  if (dtype.rfind("uint", 0) == 0) { int b = bits_of(4); return std::string(b == 1 ? "|" : "<") + "u" + std::to_string(b); }
  if (dtype.rfind("int", 0) == 0) { int b = bits_of(3); return std::string(b == 1 ? "|" : "<") + "i" + std::to_string(b); }
  throw std::runtime_error("cannot write dtype " + dtype + " to .npy");
}

inline int ItemSize(const std::string& dtype) {
  if (dtype == "bool") return 1;
  size_t digits = dtype.find_first_of("0123456789");
  if (digits == std::string::npos) throw std::runtime_error("unknown dtype " + dtype);
  return std::stoi(dtype.substr(digits)) / 8;
}

// Value of `key` in the header dict, e.g. "'<f4'" or "(1, 3, 16, 16)"; throws when absent or
// malformed (never reads past the header).
inline std::string HeaderField(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("header has no '" + key + "'");
  size_t colon = header.find(':', at);
  size_t start = colon == std::string::npos ? std::string::npos : header.find_first_not_of(' ', colon + 1);
  if (start == std::string::npos) throw std::runtime_error("header field '" + key + "' has no value");
  size_t end = header[start] == '(' ? header.find(')', start) : header.find_first_of(",}", start);
  if (end == std::string::npos) throw std::runtime_error("header field '" + key + "' is not terminated");
  if (header[start] == '(') ++end;
  return header.substr(start, end - start);
}

constexpr uint32_t kMaxHeaderBytes = 1u << 16;  // numpy writes a few hundred bytes
constexpr size_t kMaxDims = 32;                 // numpy's own limit (NPY_MAXDIMS)

inline Array ReadChecked(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open it");
  const std::streamoff file_size = in.tellg();
  in.seekg(0);
  char magic[6];
  in.read(magic, 6);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error("not a .npy file");
  unsigned char version[2];
  in.read(reinterpret_cast<char*>(version), 2);
  if (!in || version[0] < 1 || version[0] > 3) throw std::runtime_error("unsupported .npy format version");
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char len[2] = {0, 0};
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (len[1] << 8);
  } else {
    unsigned char len[4] = {0, 0, 0, 0};
    in.read(reinterpret_cast<char*>(len), 4);
    header_len = len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  }
  if (!in) throw std::runtime_error("truncated .npy header");
  const std::streamoff data_start = in.tellg() + static_cast<std::streamoff>(header_len);
  if (header_len > kMaxHeaderBytes || data_start > file_size) {
    throw std::runtime_error("truncated .npy header (" + std::to_string(header_len) + " bytes claimed, file of " +
                             std::to_string(file_size) + ")");
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (!in) throw std::runtime_error("truncated .npy header");

  Array arr;
  std::string descr = HeaderField(header, "descr");
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"') || descr.back() != descr.front()) {
    throw std::runtime_error("malformed 'descr' " + Printable(descr));
  }
  arr.dtype = DescrToDtype(descr.substr(1, descr.size() - 2));
  if (HeaderField(header, "fortran_order") != "False") throw std::runtime_error("Fortran-order arrays are not supported");
  std::string shape = HeaderField(header, "shape");
  if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') throw std::runtime_error("malformed shape " + Printable(shape));
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string dim;
  const uint64_t item = static_cast<uint64_t>(ItemSize(arr.dtype));
  uint64_t nbytes = item;
  const uint64_t available = static_cast<uint64_t>(file_size - data_start);
  while (std::getline(dims, dim, ',')) {
    size_t first = dim.find_first_not_of(' ');
    if (first == std::string::npos) continue;
    size_t last = dim.find_last_not_of(' ');
    std::string digits = dim.substr(first, last - first + 1);
    if (digits.empty() || digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) {
      throw std::runtime_error("malformed shape " + Printable(shape));
    }
    const int64_t d = std::stoll(digits);
    if (arr.shape.size() >= kMaxDims) throw std::runtime_error("more than " + std::to_string(kMaxDims) + " dimensions");
    arr.shape.push_back(d);
    // Never allocate what the header claims before the file is known to hold it.
    if (d != 0 && nbytes > available / static_cast<uint64_t>(d)) nbytes = available + 1;
    else nbytes *= static_cast<uint64_t>(d);
  }
  if (nbytes > available) {
    throw std::runtime_error("truncated .npy data (shape " + Printable(shape) + " of " + arr.dtype + " needs more than the " +
                             std::to_string(available) + " bytes the file holds)");
  }
  arr.data.resize(static_cast<size_t>(nbytes));
  in.read(arr.data.data(), static_cast<std::streamsize>(nbytes));
  if (static_cast<uint64_t>(in.gcount()) != nbytes) throw std::runtime_error("truncated .npy data");
  return arr;
}

// The array in `path`; any problem is one line naming the file.
inline Array Read(const std::string& path) {
  try {
    return ReadChecked(path);
  } catch (const std::exception& e) {
    throw std::runtime_error("input file " + path + ": " + e.what());
  }
}

inline void Write(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
                  const void* data, size_t nbytes) {
  std::string dims;  // Python tuple syntax: "1, 3, 16", "4," for one dim, "" for a scalar
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string header = "{'descr': '" + DtypeToDescr(dtype) + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  char len_bytes[2] = {static_cast<char>(len & 0xFF), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out) throw std::runtime_error("failed writing " + path);
}

}  // namespace npy
}  // namespace gmorph

#endif  // GMORPH_RUNNER_NPY_H_
