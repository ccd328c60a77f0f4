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

namespace gmorph {
namespace npy {

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

// numpy descr ("<f4", "|b1") <-> dtype name ("float32", "bool").
inline std::string DescrToDtype(const std::string& descr) {
  if (descr.size() < 3) throw std::runtime_error("unsupported .npy dtype '" + descr + "'");
  char order = descr[0], kind = descr[1];
  int bytes = std::stoi(descr.substr(2));
  if (order == '>') throw std::runtime_error("big-endian .npy arrays are not supported ('" + descr + "')");
  switch (kind) {
    case 'f': return "float" + std::to_string(bytes * 8);
    case 'i': return "int" + std::to_string(bytes * 8);
    case 'u': return "uint" + std::to_string(bytes * 8);
    case 'b': return "bool";
    default: throw std::runtime_error("unsupported .npy dtype '" + descr + "'");
  }
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

// Value of `key` in the header dict, e.g. "'<f4'" or "(1, 3, 16, 16)".
inline std::string HeaderField(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error(".npy header has no '" + key + "'");
  size_t colon = header.find(':', at);
  size_t start = header.find_first_not_of(' ', colon + 1);
  size_t end = header[start] == '(' ? header.find(')', start) + 1 : header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

inline Array Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[6];
  in.read(magic, 6);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  unsigned char version[2];
  in.read(reinterpret_cast<char*>(version), 2);
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char len[2];
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (len[1] << 8);
  } else {
    unsigned char len[4];
    in.read(reinterpret_cast<char*>(len), 4);
    header_len = len[0] | (len[1] << 8) | (len[2] << 16) | (static_cast<uint32_t>(len[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (!in) throw std::runtime_error(path + ": truncated .npy header");

  Array arr;
  std::string descr = HeaderField(header, "descr");
  arr.dtype = DescrToDtype(descr.substr(1, descr.size() - 2));
  if (HeaderField(header, "fortran_order") != "False") throw std::runtime_error(path + ": Fortran-order arrays are not supported");
  std::string shape = HeaderField(header, "shape");
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') != std::string::npos) arr.shape.push_back(std::stoll(dim));
  }
  size_t nbytes = static_cast<size_t>(arr.NumElements()) * ItemSize(arr.dtype);
  arr.data.resize(nbytes);
  in.read(arr.data.data(), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes) throw std::runtime_error(path + ": truncated .npy data");
  return arr;
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
