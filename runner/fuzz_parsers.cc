// Fuzz harness for gmorph-run's parsers (json.h, npy.h, safetensors.h), without TVM: built with
// -fsanitize=address,undefined by tests/robustness/test_parser_fuzz.py and run on files that
// hypothesis generates.
//
//   fuzz_parsers json|npy|safetensors FILE...
//
// Prints one line per file: "ok" or "error: <one-line message>". Each file is read into a heap
// buffer of exactly its size, and every byte range a parsed safetensors header accepts is read,
// so an out-of-bounds offset is an AddressSanitizer report, not a silent pass.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "json.h"
#include "npy.h"
#include "safetensors.h"

namespace {

std::vector<char> Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  return std::vector<char>(text.begin(), text.end());
}

std::string Check(const std::string& kind, const std::string& path) {
  if (kind == "npy") {
    gmorph::npy::Array arr = gmorph::npy::Read(path);
    if (static_cast<int64_t>(arr.data.size()) != arr.NumElements() * gmorph::npy::ItemSize(arr.dtype)) return "size mismatch";
    return "ok";
  }
  std::vector<char> bytes = Slurp(path);
  if (kind == "json") {
    if (bytes.size() > gmorph::json::kMaxDocumentBytes) throw std::runtime_error("over the size limit");
    gmorph::json::Value v = gmorph::json::Parse(std::string(bytes.begin(), bytes.end()));
    if (v.kind == gmorph::json::Value::Kind::kNumber) v.Int();
    return "ok";
  }
  if (kind == "safetensors") {
    std::vector<char> exact(bytes);  // heap buffer of exactly the file's size
    gmorph::safetensors::Header h = gmorph::safetensors::Parse(exact.data(), exact.size());
    unsigned sum = 0;
    for (const auto& t : h.tensors) {
      for (uint64_t i = t.begin; i < t.end; ++i) sum += static_cast<unsigned char>(exact[h.data_start + i]);
    }
    return sum == 0xFFFFFFFFu ? "ok " : "ok";
  }
  throw std::runtime_error("unknown kind " + kind);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: fuzz_parsers json|npy|safetensors FILE...\n";
    return 2;
  }
  const std::string kind = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string line;
    try {
      line = Check(kind, argv[i]);
    } catch (const std::exception& e) {
      line = std::string("error: ") + e.what();
    }
    for (char& c : line) {
      if (c == '\n') c = ' ';
    }
    std::printf("%s\n", line.c_str());
  }
  return 0;
}
