// The header of a safetensors file, parsed and checked as if hostile (gmorph-run's weights file).
//
// Layout: 8-byte little-endian header length N, N bytes of JSON, then the data. Checked here:
// N <= json::kMaxDocumentBytes and inside the file; the JSON is an object (depth/size capped by
// json.h); every entry but "__metadata__" has a known dtype, a shape of non-negative integers and
// data_offsets [begin, end] of two integers with 0 <= begin <= end <= data size and end - begin
// equal to what the dtype and shape need; in offset order the entries (pads "__pad__.N" included)
// tile the data exactly: no overlap, no gap, nothing after. Errors are std::runtime_error whose
// text completes "weights file PATH ...", the same wording as gmorph_tvm/core/weights_file.py.
#ifndef GMORPH_RUNNER_SAFETENSORS_H_
#define GMORPH_RUNNER_SAFETENSORS_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

namespace gmorph {
namespace safetensors {

struct Tensor {
  std::string name, dtype;  // dtype: the safetensors code (F32, I64, ...)
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // from the start of the data
  bool pad = false;             // "__pad__.N": alignment filler
};

struct Header {
  uint64_t data_start = 0, data_size = 0;
  std::vector<Tensor> tensors;  // in offset order
};

inline int ItemSize(const std::string& code) {
  static const std::map<std::string, int> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
      {"I8", 1}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}};
  auto it = sizes.find(code);
  if (it == sizes.end()) throw std::runtime_error("unknown dtype '" + json::Printable(code) + "'");
  return it->second;
}

// `base` holds the whole file (`size` bytes).
inline Header Parse(const char* base, uint64_t size) {
  if (size < 8) throw std::runtime_error("is truncated (" + std::to_string(size) + " bytes)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(base[i]);
  if (header_len > json::kMaxDocumentBytes) {
    throw std::runtime_error("has a header of " + std::to_string(header_len) + " bytes, over the limit of " +
                             std::to_string(json::kMaxDocumentBytes));
  }
  if (header_len > size - 8) throw std::runtime_error("is truncated or not a safetensors file");
  json::Value doc;
  try {
    doc = json::Parse(std::string(base + 8, header_len));
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("has a corrupt header: ") + e.what());
  }
  if (doc.kind != json::Value::Kind::kObject) throw std::runtime_error("has a corrupt header (not a JSON object)");
  Header h;
  h.data_start = 8 + header_len;
  h.data_size = size - h.data_start;
  const std::string data_text = " outside the data (" + std::to_string(h.data_size) + " bytes)";
  for (const auto& kv : doc.object) {
    if (kv.first == "__metadata__") continue;
    const auto& info = kv.second;
    const std::string what = "tensor '" + json::Printable(kv.first) + "'";
    Tensor t;
    t.name = kv.first;
    t.pad = kv.first.rfind("__pad__.", 0) == 0;
    int64_t begin = 0, end = 0;
    uint64_t nbytes = 0;
    try {
      const auto& offsets = info["data_offsets"].Array();
      if (offsets.size() != 2) throw std::runtime_error("data_offsets is not [begin, end]");
      begin = offsets[0].Int();
      end = offsets[1].Int();
      t.dtype = info["dtype"].String();
      nbytes = static_cast<uint64_t>(ItemSize(t.dtype));
      for (const auto& d : info["shape"].Array()) {
        const int64_t dim = d.Int();
        if (dim < 0) throw std::runtime_error("negative dimension in its shape");
        t.shape.push_back(dim);
        // Saturate past the data size: no overflow, and the size check below still fails.
        if (dim != 0 && nbytes > (h.data_size + 1) / static_cast<uint64_t>(dim)) nbytes = h.data_size + 1;
        else nbytes *= static_cast<uint64_t>(dim);
      }
    } catch (const std::exception& e) {
      throw std::runtime_error("has a corrupt header: " + what + ": " + e.what());
    }
    const std::string offsets = "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
    if (begin < 0 || end < begin) throw std::runtime_error("has a corrupt header: " + what + ": " + offsets + data_text);
    if (static_cast<uint64_t>(end) > h.data_size) throw std::runtime_error("is truncated: " + what + ": " + offsets + data_text);
    if (static_cast<uint64_t>(end - begin) != nbytes) {
      throw std::runtime_error("has a corrupt header: " + what + ": " + offsets + " hold " + std::to_string(end - begin) +
                               " bytes, its dtype and shape " +
                               (nbytes > h.data_size ? std::string("more than the file has") : std::to_string(nbytes)));
    }
    t.begin = static_cast<uint64_t>(begin);
    t.end = static_cast<uint64_t>(end);
    h.tensors.push_back(t);
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const Tensor& x, const Tensor& y) {
    return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
  });
  uint64_t at = 0;
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    if (h.tensors[i].begin != at) {
      const std::string prev =
          i ? "tensor '" + json::Printable(h.tensors[i - 1].name) + "'" : std::string("the start of the data");
      throw std::runtime_error("has a corrupt header: tensor '" + json::Printable(h.tensors[i].name) + "' starts at byte " +
                               std::to_string(h.tensors[i].begin) +
                               (h.tensors[i].begin < at ? ", inside " : ", after a gap following ") + prev);
    }
    at = h.tensors[i].end;
  }
  if (at != h.data_size) {
    throw std::runtime_error("is longer than its header says (" + std::to_string(size) + " bytes, header describes " +
                             std::to_string(h.data_start + at) + ")");
  }
  return h;
}

}  // namespace safetensors
}  // namespace gmorph

#endif  // GMORPH_RUNNER_SAFETENSORS_H_
