// gmorph-run: run a gmorph-tvm artifact with the TVM C++ runtime only (no Python).
//
//   gmorph-run ARTIFACT.so --input x=x.npy [--input y=y.npy] [--device cpu|cuda[:N]]
//              [--repeat N] [--warmup N] [--save-outputs DIR] [--no-verify-weights]
//
// Reads ARTIFACT's manifest (<dir>/<stem>.manifest.json) for the input names/shapes/dtypes and
// the task outputs, loads the library, creates the Relax VM (vm_load_executable +
// vm_initialization), runs `main`, prints each task's outputs (shape, first values, sum) and the
// median latency over --repeat runs. --save-outputs writes every output as DIR/<name>.npy.
//
// External weights (manifest weights.storage == "external"): the safetensors file beside the
// library is mapped (MAP_PRIVATE, never written), checked (size, header, tensor names/dtypes/
// shapes against the manifest, sha256 unless --no-verify-weights) and handed to the VM: on the CPU
// as tensors that point into the mapping (no copy; the file is 64-byte aligned), on CUDA copied
// tensor by tensor to the device, each tensor's host pages dropped after its copy.
// Every file is read as if hostile: the manifest and the weights header are size- and depth-
// capped JSON (runner/json.h); the weights file must be a plain file in the library's folder
// (a bare name in the manifest, no symlink), its size and sha256 are checked before its header is
// parsed, and every tensor's data_offsets must lie inside the data, in order, without overlap; the
// library is hashed and loaded from one private copy (so what runs is what was checked); .npy
// inputs are checked against their file size before anything is allocated.
// Entry points (manifest "entries"): a bucketed artifact runs the smallest batch bucket that holds
// the inputs' leading dimension, padding the batch by repeating the last sample; a grouped one
// runs every group.
#include <dlfcn.h>
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"
#include "npy.h"
#include "safetensors.h"
#include "sha256.h"

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;
// Text from a file (names, dtypes) in a message: printable ASCII only, so messages stay one line.
std::string P(const std::string& text) { return gmorph::json::Printable(text); }

struct Options {
  std::string library;
  std::map<std::string, std::string> inputs;  // name -> .npy path
  std::vector<std::string> unnamed_inputs;    // .npy paths given without NAME=
  std::string device = "cpu";
  int device_id = 0;
  int repeat = 10;
  int warmup = 1;
  std::string save_dir;
  bool verify_weights = true;
};

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
};

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

const std::set<std::string>& KnownDtypes() {
  static const std::set<std::string> known = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                                              "int8", "uint64", "uint32", "uint16", "uint8", "bool"};
  return known;
}

// A tensor spec of the manifest: refuses unknown dtypes, negative dimensions and element counts
// past 2^62 (so sizes computed from it cannot overflow).
Spec SpecOf(const gmorph::json::Value& v) {
  Spec s;
  s.name = v["name"].String();
  s.dtype = v["dtype"].String();
  if (KnownDtypes().count(s.dtype) == 0) throw std::runtime_error("tensor '" + P(s.name) + "' has unknown dtype '" + P(s.dtype) + "'");
  int64_t count = 1;
  for (const auto& d : v["shape"].Array()) {
    const int64_t dim = d.Int();
    if (dim < 0) throw std::runtime_error("tensor '" + P(s.name) + "' has a negative dimension");
    if (dim != 0 && count > (int64_t{1} << 62) / dim) throw std::runtime_error("tensor '" + P(s.name) + "' is too large");
    count *= dim;
    s.shape.push_back(dim);
  }
  return s;
}

[[noreturn]] void Usage(const std::string& problem) {
  if (!problem.empty()) std::cerr << "gmorph-run: " << problem << "\n";
  std::cerr << "usage: gmorph-run ARTIFACT.so --input NAME=FILE.npy [--input ...] [--device cpu|cuda[:N]]\n"
               "                  [--repeat N] [--warmup N] [--save-outputs DIR] [--no-verify-weights]\n";
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--input" || arg == "-i") {
      std::string v = value();
      size_t eq = v.find('=');
      if (eq == std::string::npos) {
        opt.unnamed_inputs.push_back(v);
      } else {
        opt.inputs[v.substr(0, eq)] = v.substr(eq + 1);
      }
    } else if (arg == "--device") {
      std::string v = value();
      size_t colon = v.find(':');
      opt.device = v.substr(0, colon);
      if (colon != std::string::npos) opt.device_id = std::stoi(v.substr(colon + 1));
      if (opt.device != "cpu" && opt.device != "cuda") Usage("unknown device '" + v + "'");
    } else if (arg == "--repeat") {
      opt.repeat = std::stoi(value());
      if (opt.repeat < 1) Usage("--repeat must be >= 1");
    } else if (arg == "--warmup") {
      opt.warmup = std::stoi(value());
    } else if (arg == "--save-outputs") {
      opt.save_dir = value();
    } else if (arg == "--no-verify-weights") {
      opt.verify_weights = false;
    } else if (arg == "-h" || arg == "--help") {
      Usage("");
    } else if (!arg.empty() && arg[0] == '-') {
      Usage("unknown option " + arg);
    } else if (opt.library.empty()) {
      opt.library = arg;
    } else {
      Usage("more than one artifact given");
    }
  }
  if (opt.library.empty()) Usage("no artifact given");
  return opt;
}

// The whole of a small file (a manifest): refused by its size before anything is read.
std::string ReadSmallFile(const std::string& path, size_t limit) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open it");
  const std::streamoff size = in.tellg();
  if (size < 0 || static_cast<uint64_t>(size) > limit) {
    throw std::runtime_error("is " + std::to_string(size) + " bytes, over the limit of " + std::to_string(limit));
  }
  in.seekg(0);
  std::string text(static_cast<size_t>(size), '\0');
  in.read(&text[0], size);
  if (in.gcount() != size) throw std::runtime_error("cannot read it");
  return text;
}

std::string ManifestPathFor(const std::string& library) {
  size_t slash = library.find_last_of('/');
  size_t dot = library.find_last_of('.');
  std::string stem = (dot != std::string::npos && (slash == std::string::npos || dot > slash)) ? library.substr(0, dot) : library;
  return stem + ".manifest.json";
}

DLDataType ParseDtype(const std::string& dtype) {
  DLDataType t{};
  t.lanes = 1;
  if (dtype == "bool") { t.code = kDLBool; t.bits = 8; return t; }
  size_t digits = dtype.find_first_of("0123456789");
  std::string kind = dtype.substr(0, digits);
  t.bits = static_cast<uint8_t>(std::stoi(dtype.substr(digits)));
  if (kind == "float") t.code = kDLFloat;
  else if (kind == "int") t.code = kDLInt;
  else if (kind == "uint") t.code = kDLUInt;
  else if (kind == "bfloat") t.code = kDLBfloat;
  else throw std::runtime_error("unsupported dtype " + dtype);
  return t;
}

std::string DtypeName(DLDataType t) {
  switch (t.code) {
    case kDLBool: return "bool";
    case kDLFloat: return "float" + std::to_string(t.bits);
    case kDLInt: return "int" + std::to_string(t.bits);
    case kDLUInt: return "uint" + std::to_string(t.bits);
    case kDLBfloat: return "bfloat" + std::to_string(t.bits);
    default: return "dtype" + std::to_string(t.code);
  }
}

double ElementAsDouble(const std::string& dtype, const char* p) {
  if (dtype == "float32") { float v; std::memcpy(&v, p, 4); return v; }
  if (dtype == "float64") { double v; std::memcpy(&v, p, 8); return v; }
  if (dtype == "int64") { int64_t v; std::memcpy(&v, p, 8); return static_cast<double>(v); }
  if (dtype == "int32") { int32_t v; std::memcpy(&v, p, 4); return v; }
  if (dtype == "int8") return static_cast<int8_t>(*p);
  if (dtype == "uint8" || dtype == "bool") return static_cast<uint8_t>(*p);
  return 0.0;  // float16 etc.: shown as 0 in the summary; --save-outputs keeps exact bytes
}

// TVM 0.27 logs "Warning: Scope Loaded:" once per memory scope when an executable is loaded
// (leftover debug output). While alive, this sends fd 2 to a temp file; on destruction it
// replays every other line, so real errors still reach the user.
class QuietScopeWarnings {
 public:
  QuietScopeWarnings() {
    std::fflush(stderr);
    capture_ = std::tmpfile();
    saved_ = capture_ ? dup(2) : -1;
    if (saved_ >= 0) dup2(fileno(capture_), 2);
  }
  ~QuietScopeWarnings() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    dup2(saved_, 2);
    close(saved_);
    std::rewind(capture_);
    char line[4096];
    while (std::fgets(line, sizeof(line), capture_)) {
      if (std::strstr(line, "Warning: Scope Loaded:") == nullptr) std::fputs(line, stderr);
    }
    std::fclose(capture_);
  }

 private:
  std::FILE* capture_ = nullptr;
  int saved_ = -1;
};

// A library cross-compiled for another CPU (e.g. an aarch64 Jetson .so on x86) cannot be
// dlopen'ed here; say so instead of printing the loader's "wrong ELF class" message.
void CheckHostArch(const std::string& file, const std::string& library) {
  std::ifstream in(file, std::ios::binary);
  unsigned char head[20] = {0};
  in.read(reinterpret_cast<char*>(head), sizeof(head));
  if (!in || std::memcmp(head, "\x7f" "ELF", 4) != 0) return;  // not ELF: let the loader report it
  int machine = head[18] | (head[19] << 8);
#if defined(__x86_64__)
  const int here = 62;
  const char* here_name = "x86_64";
#elif defined(__aarch64__)
  const int here = 183;
  const char* here_name = "aarch64";
#else
  const int here = machine;
  const char* here_name = "this CPU";
#endif
  if (machine != here && (machine == 62 || machine == 183)) {  // other values: let the loader report
    std::string name = machine == 62 ? "x86_64" : "aarch64";
    throw std::runtime_error(library + " was built for " + name + " but this machine is " + here_name +
                             "; run it on the device it was built for");
  }
}

// Loads the CUDA runtime plugin of TVM, which registers the "cuda" module loader. Where from, first
// found: $GMORPH_TVM_RUNTIME_CUDA; ../lib/ beside this binary (the runtime bundle's layout); the
// library search path (LD_LIBRARY_PATH: the bundle's wrapper sets it); the wheel this binary was
// built against.
void LoadCudaRuntime() {
  if (ffi::Function::GetGlobal("ffi.Module.load_from_bytes.cuda").has_value()) return;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("GMORPH_TVM_RUNTIME_CUDA")) candidates.emplace_back(env);
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    std::string exe(self, static_cast<size_t>(n));
    std::string dir = exe.substr(0, exe.find_last_of('/'));
    candidates.push_back(dir.substr(0, dir.find_last_of('/')) + "/lib/libtvm_runtime_cuda.so");
  }
  candidates.emplace_back("libtvm_runtime_cuda.so");
#ifdef GMORPH_TVM_RUNTIME_CUDA
  candidates.emplace_back(GMORPH_TVM_RUNTIME_CUDA);
#endif
  std::string tried;
  for (const auto& path : candidates) {
    if (path.find('/') != std::string::npos && access(path.c_str(), F_OK) != 0) continue;  // not there
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) return;
    tried += (tried.empty() ? "" : "; ") + std::string(dlerror());
  }
  throw std::runtime_error("cannot load the TVM CUDA runtime libtvm_runtime_cuda.so (" +
                           (tried.empty() ? std::string("not found; set GMORPH_TVM_RUNTIME_CUDA") : tried) + ")");
}

// Free memory on a GPU (bytes, TVM's kAvailableGlobalMemory), or -1 where TVM cannot tell (CPU).
int64_t FreeDeviceBytes(DLDevice dev) {
  if (dev.device_type == kDLCPU) return -1;
  auto attr = ffi::Function::GetGlobal("runtime.GetDeviceAttr");
  if (!attr.has_value()) return -1;
  constexpr int kAvailableGlobalMemory = 15;
  try {
    ffi::Any value = (*attr)(static_cast<int>(dev.device_type), dev.device_id, kAvailableGlobalMemory);
    if (auto bytes = value.try_cast<int64_t>()) return *bytes;
  } catch (const std::exception&) {  // a device TVM cannot query: the run itself reports the problem
  }
  return -1;
}

// This process's peak resident set (VmHWM), MiB, or -1 where /proc does not tell.
double PeakRssMiB() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // kB
  }
  return -1.0;
}

// The CUDA driver's version, 1000 * major + 10 * minor (cuDriverGetVersion, which needs no
// cuInit), or 0 where there is no driver.
int CudaDriverVersion() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return 0;
  using GetVersion = int (*)(int*);
  auto get = reinterpret_cast<GetVersion>(dlsym(lib, "cuDriverGetVersion"));
  int version = 0;
  if (get == nullptr || get(&version) != 0) return 0;
  return version;
}

// "12.2" -> 12020, the encoding of cuDriverGetVersion.
int ParseCudaVersion(const std::string& text) {
  const size_t dot = text.find('.');
  const int major = std::stoi(text.substr(0, dot));
  const int minor = dot == std::string::npos ? 0 : std::stoi(text.substr(dot + 1));
  return 1000 * major + 10 * minor;
}

std::string DirOf(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

// The weights file a manifest names: a bare file name (no folder, no "..", not absolute), so it
// can only be a file in the library's folder; "" and the reason otherwise.
std::string WeightsFileProblem(const std::string& name) {
  if (name.empty() || name == "." || name == "..") return "is empty or a folder";
  if (name.find('/') != std::string::npos || name.find('\\') != std::string::npos) {
    return "is a path, not a file name in the artifact's folder";
  }
  if (name.find('\0') != std::string::npos) return "holds a NUL byte";
  return "";
}

// The external weights file, mapped: every tensor by name (CPU: views into the mapping).
class WeightsFile {
 public:
  WeightsFile(const std::string& path, const gmorph::json::Value& record, bool verify) : path_(path) {
    // O_NOFOLLOW: a symlink (which could point anywhere) is refused, as is anything but a plain file.
    int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ELOOP) Fail("is a symbolic link; the weights must be a plain file in the artifact's folder");
    if (fd < 0) throw std::runtime_error("weights file " + path + " not found (export writes it beside the library)");
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      close(fd);
      Fail("is not a plain file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ < 8) {
      close(fd);
      Fail("is truncated (" + std::to_string(size_) + " bytes)");
    }
    if (record.Has("size") && record["size"].Int() != static_cast<int64_t>(size_)) {
      close(fd);
      const int64_t want = record["size"].Int();
      Fail(std::string(static_cast<int64_t>(size_) < want ? "is truncated" : "does not belong to this artifact:") + " (" +
           std::to_string(size_) + " bytes, the manifest says " + std::to_string(want) + ")");
    }
    base_ = static_cast<char*>(mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
    close(fd);
    if (base_ == MAP_FAILED) {
      base_ = nullptr;
      Fail("cannot be mapped");
    }
    // The checksum first: a file that is the one the manifest describes has a header we wrote.
    if (verify && record.Has("sha256")) {
      gmorph::Sha256 digest;
      digest.Update(reinterpret_cast<const unsigned char*>(base_), size_);
      if (digest.HexDigest() != record["sha256"].String()) Fail("is corrupt: sha256 differs from the manifest's");
    }
    gmorph::safetensors::Header header;
    try {
      header = gmorph::safetensors::Parse(base_, size_);
    } catch (const std::exception& e) {
      Fail(e.what());
    }
    data_ = base_ + header.data_start;
    for (const auto& t : header.tensors) {
      if (!t.pad) entries_[t.name] = t;
    }
    const auto& expected = record["tensors"].Array();
    if (entries_.size() != expected.size()) Fail("does not match its manifest (other tensors)");
    for (const auto& t : expected) {
      auto it = entries_.find(t["name"].String());
      if (it == entries_.end()) Fail("does not match its manifest: no tensor '" + t["name"].String() + "'");
      Spec spec = SpecOf(t);
      const std::vector<int64_t>& shape = it->second.shape;
      if (shape != spec.shape || StCode(spec.dtype) != it->second.dtype) {
        Fail("does not match its manifest: tensor '" + spec.name + "' is " + it->second.dtype + ShapeText(shape) +
             ", expected " + spec.dtype + ShapeText(spec.shape));
      }
      if (it->second.begin % 64 != 0) Fail("is not 64-byte aligned (tensor '" + spec.name + "')");
      specs_[spec.name] = spec;
    }
  }

  // The tensor `name` on `dev`: a view into the mapping on the CPU, a device copy otherwise.
  ffi::Tensor Get(const std::string& name, DLDevice dev) {
    auto it = entries_.find(name);
    if (it == entries_.end()) throw std::runtime_error("weights file " + path_ + " has no tensor '" + name + "'");
    const Spec& spec = specs_.at(name);
    char* ptr = data_ + it->second.begin;
    size_t nbytes = it->second.end - it->second.begin;
    if (dev.device_type == kDLCPU) {
      struct Mapped {  // the mapping outlives every tensor (it is never unmapped)
        void* ptr;
        void AllocData(DLTensor* t) { t->data = ptr; }
        void FreeData(DLTensor*) {}
      };
      return ffi::Tensor::FromNDAlloc(Mapped{ptr}, ffi::Shape(spec.shape), ParseDtype(spec.dtype), dev);
    }
    ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
    ffi::Function copy_from = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
    ffi::Tensor t = alloc(ffi::Shape(spec.shape), ParseDtype(spec.dtype), dev, ffi::Optional<ffi::String>()).cast<ffi::Tensor>();
    copy_from(t, static_cast<void*>(ptr), static_cast<int64_t>(nbytes));
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    uintptr_t lo = reinterpret_cast<uintptr_t>(ptr) / page * page;
    uintptr_t hi = (reinterpret_cast<uintptr_t>(ptr) + nbytes + page - 1) / page * page;
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // the host copy is no longer needed
    return t;
  }

 private:
  [[noreturn]] void Fail(const std::string& what) { throw std::runtime_error("weights file " + path_ + " " + what); }
  static std::string StCode(const std::string& dtype) {
    static const std::map<std::string, std::string> codes = {
        {"float64", "F64"}, {"float32", "F32"}, {"float16", "F16"}, {"bfloat16", "BF16"}, {"int64", "I64"},
        {"int32", "I32"}, {"int16", "I16"}, {"int8", "I8"}, {"uint64", "U64"}, {"uint32", "U32"},
        {"uint16", "U16"}, {"uint8", "U8"}, {"bool", "BOOL"}};
    auto it = codes.find(dtype);
    return it == codes.end() ? dtype : it->second;
  }

  std::string path_;
  size_t size_ = 0;
  char* base_ = nullptr;
  char* data_ = nullptr;
  std::map<std::string, gmorph::safetensors::Tensor> entries_;
  std::map<std::string, Spec> specs_;
};

// Whether `manifest` holds everything `embedded` (the signature the library was built with) says,
// with equal values; on a difference, `where` names the first field that differs. A field the
// signature has as null, {} or [] may be absent from the manifest (Python writes it so).
bool Covers(const gmorph::json::Value& manifest, const gmorph::json::Value& embedded, const std::string& path,
            std::string* where) {
  using Kind = gmorph::json::Value::Kind;
  if (manifest.kind == Kind::kNull &&
      (embedded.kind == Kind::kNull || (embedded.kind == Kind::kObject && embedded.object.empty()) ||
       (embedded.kind == Kind::kArray && embedded.array.empty()))) {
    return true;
  }
  bool same = manifest.kind == embedded.kind;
  if (same && embedded.kind == Kind::kObject) {
    static const gmorph::json::Value kAbsent;
    for (const auto& kv : embedded.object) {
      auto it = manifest.object.find(kv.first);
      if (!Covers(it == manifest.object.end() ? kAbsent : it->second, kv.second, path + "." + kv.first, where)) return false;
    }
    return true;
  }
  if (same && embedded.kind == Kind::kArray) {
    if (manifest.array.size() != embedded.array.size()) {
      *where = path + " (" + std::to_string(manifest.array.size()) + " entries in the manifest, " +
               std::to_string(embedded.array.size()) + " in the library)";
      return false;
    }
    for (size_t i = 0; i < embedded.array.size(); ++i) {
      if (!Covers(manifest.array[i], embedded.array[i], path + "[" + std::to_string(i) + "]", where)) return false;
    }
    return true;
  }
  if (same) {
    same = embedded.kind == Kind::kString   ? manifest.string == embedded.string
           : embedded.kind == Kind::kNumber ? manifest.number == embedded.number
           : embedded.kind == Kind::kBool   ? manifest.boolean == embedded.boolean
                                            : true;
  }
  if (!same) *where = path + (embedded.kind == Kind::kString ? " ('" + manifest.string + "' in the manifest, '" +
                                                                  embedded.string + "' in the library)"
                                                             : "");
  return same;
}

// Index inputs (Gather / embedding ids) outside the table they index: the message Python's
// runner gives, or "" when every index is in range.
std::string IndexOutOfRange(const std::string& name, const gmorph::npy::Array& arr, int64_t low, int64_t high) {
  const int item = gmorph::npy::ItemSize(arr.dtype);
  const size_t count = arr.data.size() / static_cast<size_t>(item);
  for (size_t k = 0; k < count; ++k) {
    const double v = ElementAsDouble(arr.dtype, arr.data.data() + k * item);
    if (v < static_cast<double>(low) || v >= static_cast<double>(high)) {
      std::ostringstream msg;
      msg << "input '" << name << "': index " << static_cast<int64_t>(v) << " at flat position " << k
          << " is out of range; it indexes a table of " << high << " entries (valid " << low << ".." << high - 1 << ")";
      return msg.str();
    }
  }
  return "";
}

struct EntryPoint {
  std::string function;
  std::vector<Spec> inputs;
  std::vector<std::string> tasks;
  std::vector<std::string> weights;
  int64_t batch = 0;
};

// What Run needs from the manifest, read and checked in one place so that every problem in it is
// one line naming the manifest.
struct Manifest {
  gmorph::json::Value doc;
  std::string device, library_sha256;
  std::vector<Spec> inputs;
  std::map<std::string, std::vector<Spec>> task_outputs;
  std::vector<EntryPoint> entries;
  bool bucketed = false;
  const gmorph::json::Value* weights = nullptr;  // the external weights record, or null
  std::string cuda_min_driver;
};

Manifest ReadManifest(const std::string& path) {
  Manifest m;
  m.doc = gmorph::json::Parse(ReadSmallFile(path, gmorph::json::kMaxDocumentBytes));
  const auto& doc = m.doc;
  if (doc.kind != gmorph::json::Value::Kind::kObject) throw std::runtime_error("not a JSON object");
  if (!doc.Has("format") || doc["format"].String() != "gmorph-tvm-artifact") throw std::runtime_error("not a gmorph-tvm manifest");
  if (doc["format_version"].Int() != 2) throw std::runtime_error("unsupported format_version (this gmorph-run reads 2)");
  m.device = doc["device"].String();
  if (!doc.Has("library_sha256")) {
    throw std::runtime_error("has no library_sha256, so the library cannot be checked; rebuild the artifact");
  }
  m.library_sha256 = doc["library_sha256"].String();
  if (m.library_sha256.size() != 64 || m.library_sha256.find_first_not_of("0123456789abcdef") != std::string::npos) {
    throw std::runtime_error("library_sha256 is not a sha256 hex digest");
  }
  for (const auto& v : doc["inputs"].Array()) m.inputs.push_back(SpecOf(v));
  for (const auto& task : doc["tasks"].Array()) {
    auto& outs = m.task_outputs[task["name"].String()];
    for (const auto& o : task["outputs"].Array()) outs.push_back(SpecOf(o));
  }
  if (doc.Has("entries")) {
    for (const auto& e : doc["entries"].Array()) {
      EntryPoint entry;
      entry.function = e["function"].String();
      for (const auto& v : e["inputs"].Array()) entry.inputs.push_back(SpecOf(v));
      for (const auto& t : e["tasks"].Array()) entry.tasks.push_back(t.String());
      if (e.Has("weights")) for (const auto& w : e["weights"].Array()) entry.weights.push_back(w.String());
      if (e.Has("batch")) entry.batch = e["batch"].Int();
      m.entries.push_back(entry);
    }
  } else {
    EntryPoint entry;
    entry.function = "main";
    entry.inputs = m.inputs;
    for (const auto& task : doc["tasks"].Array()) entry.tasks.push_back(task["name"].String());
    m.entries.push_back(entry);
  }
  m.bucketed = doc.Has("batch_buckets");
  if (doc.Has("index_bounds")) {
    for (const auto& kv : doc["index_bounds"].object) {
      kv.second["low"].Int();
      kv.second["high"].Int();
    }
  }
  if (doc.Has("weights") && doc["weights"].Has("storage") && doc["weights"]["storage"].String() == "external") {
    m.weights = &doc["weights"];
    const std::string problem = WeightsFileProblem((*m.weights)["file"].String());
    if (!problem.empty()) {
      throw std::runtime_error("weights file name '" + P((*m.weights)["file"].String()) + "' " + problem);
    }
    for (const auto& t : (*m.weights)["tensors"].Array()) SpecOf(t);
    if (m.weights->Has("size")) (*m.weights)["size"].Int();
    if (m.weights->Has("sha256")) (*m.weights)["sha256"].String();
  }
  if (doc.Has("cuda") && doc["cuda"].Has("cuda_min_driver")) {
    m.cuda_min_driver = doc["cuda"]["cuda_min_driver"].String();
    if (m.cuda_min_driver.empty() || m.cuda_min_driver.find_first_not_of("0123456789.") != std::string::npos ||
        m.cuda_min_driver[0] == '.' || m.cuda_min_driver.size() > 8) {
      throw std::runtime_error("cuda.cuda_min_driver '" + P(m.cuda_min_driver) + "' is not a CUDA version");
    }
  }
  return m;
}

// A private copy of the library, made while hashing it: what is loaded is exactly the bytes that
// were checked (the file at the given path may be replaced meanwhile), from an absolute path (no
// library search path). Removed when this goes out of scope (the loaded mapping stays valid).
class PrivateLibrary {
 public:
  explicit PrivateLibrary(const std::string& library) {
    int src = open(library.c_str(), O_RDONLY | O_CLOEXEC);
    if (src < 0) throw std::runtime_error("library " + library + " not found");
    struct stat st;
    if (fstat(src, &st) != 0 || !S_ISREG(st.st_mode)) {
      close(src);
      throw std::runtime_error("library " + library + " is not a plain file");
    }
    const char* tmp = std::getenv("TMPDIR");
    size_t dot = library.find_last_of('.');
    size_t slash = library.find_last_of('/');
    std::string suffix = (dot != std::string::npos && (slash == std::string::npos || dot > slash)) ? library.substr(dot) : ".so";
    std::string name = std::string(tmp && *tmp ? tmp : "/tmp") + "/gmorph-run-XXXXXX" + suffix;
    std::vector<char> buf(name.begin(), name.end());
    buf.push_back('\0');
    int dst = mkstemps(buf.data(), static_cast<int>(suffix.size()));
    if (dst < 0) {
      close(src);
      throw std::runtime_error("cannot create a private copy of " + library + " in " + (tmp && *tmp ? tmp : "/tmp"));
    }
    path_ = buf.data();
    gmorph::Sha256 digest;
    std::vector<char> chunk(1 << 20);
    while (true) {
      ssize_t n = read(src, chunk.data(), chunk.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        close(src);
        close(dst);
        throw std::runtime_error("cannot read library " + library);
      }
      if (n == 0) break;
      digest.Update(reinterpret_cast<const unsigned char*>(chunk.data()), static_cast<size_t>(n));
      for (ssize_t done = 0; done < n;) {
        ssize_t w = write(dst, chunk.data() + done, static_cast<size_t>(n - done));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
          close(src);
          close(dst);
          throw std::runtime_error("cannot write a private copy of " + library + " to " + path_);
        }
        done += w;
      }
    }
    close(src);
    close(dst);
    sha256_ = digest.HexDigest();
  }
  ~PrivateLibrary() {
    if (!path_.empty()) unlink(path_.c_str());
  }
  PrivateLibrary(const PrivateLibrary&) = delete;
  PrivateLibrary& operator=(const PrivateLibrary&) = delete;
  const std::string& path() const { return path_; }
  const std::string& sha256() const { return sha256_; }

 private:
  std::string path_, sha256_;
};

int Run(const Options& opt) {
  const std::string manifest_path = ManifestPathFor(opt.library);
  Manifest m;
  try {
    m = ReadManifest(manifest_path);
  } catch (const std::exception& e) {
    std::cerr << "gmorph-run: manifest " << manifest_path << ": " << e.what() << "\n";
    return 1;
  }
  const gmorph::json::Value& manifest = m.doc;
  const std::string& built_for = m.device;
  if (built_for != opt.device) {
    std::cerr << "gmorph-run: " << opt.library << " was built for " << built_for << " (manifest " << manifest_path
              << "); run it with --device " << built_for << "\n";
    return 1;
  }

  // The library must be the one the manifest was written for (a rebuild replaces both); the bytes
  // hashed are the bytes loaded.
  PrivateLibrary private_library(opt.library);
  if (private_library.sha256() != m.library_sha256) {
    std::cerr << "gmorph-run: library " << opt.library << " (sha256 " << private_library.sha256().substr(0, 12)
              << "...) is not the one manifest " << manifest_path << " describes (sha256 "
              << m.library_sha256.substr(0, 12) << "...); copy the artifact's files together\n";
    return 1;
  }

  // The manifest names the oldest CUDA driver that loads the artifact's SASS; refuse an older one
  // here, in one line, rather than failing at the first kernel launch.
  if (opt.device == "cuda" && !m.cuda_min_driver.empty()) {
    const std::string& needed = m.cuda_min_driver;
    const int driver = CudaDriverVersion();
    if (driver > 0 && driver < ParseCudaVersion(needed)) {
      std::cerr << "gmorph-run: " << opt.library << " needs a CUDA driver >= " << needed << ", but this driver is CUDA "
                << driver / 1000 << "." << (driver % 1000) / 10
                << "; rebuild for this board's JetPack (e.g. --target jetson-orin:jp5) or upgrade the driver\n";
      return 1;
    }
  }

  const std::vector<Spec>& input_specs = m.inputs;
  std::map<std::string, std::vector<Spec>>& task_outputs = m.task_outputs;
  const std::vector<EntryPoint>& entries = m.entries;
  const bool bucketed = m.bucketed;

  // Inputs: by name, or positional when given without NAME=.
  std::map<std::string, std::string> paths = opt.inputs;
  if (!opt.unnamed_inputs.empty()) {
    if (!paths.empty() || opt.unnamed_inputs.size() != input_specs.size()) {
      std::cerr << "gmorph-run: give every input as NAME=FILE.npy (inputs:";
      for (const auto& s : input_specs) std::cerr << " " << s.name;
      std::cerr << ")\n";
      return 2;
    }
    for (size_t i = 0; i < input_specs.size(); ++i) paths[input_specs[i].name] = opt.unnamed_inputs[i];
  }
  for (const auto& kv : paths) {
    bool known = std::any_of(input_specs.begin(), input_specs.end(), [&](const Spec& s) { return s.name == kv.first; });
    if (!known) {
      std::cerr << "gmorph-run: unknown input '" << kv.first << "'\n";
      return 2;
    }
  }
  std::map<std::string, gmorph::npy::Array> host_inputs;
  int64_t given_batch = -1;
  for (const auto& spec : input_specs) {
    auto it = paths.find(spec.name);
    if (it == paths.end()) {
      std::cerr << "gmorph-run: missing input '" << spec.name << "' (" << spec.dtype << ShapeText(spec.shape)
                << "): pass --input " << spec.name << "=FILE.npy\n";
      return 2;
    }
    gmorph::npy::Array arr = gmorph::npy::Read(it->second);
    std::vector<int64_t> want = spec.shape;
    if (bucketed && !arr.shape.empty() && !want.empty()) {
      if (given_batch < 0) given_batch = arr.shape[0];
      want[0] = given_batch;
    }
    if (arr.shape != want) {
      std::cerr << "gmorph-run: input '" << spec.name << "': expected shape " << ShapeText(want) << ", given "
                << ShapeText(arr.shape) << " (" << it->second << ")\n";
      return 2;
    }
    if (arr.dtype != spec.dtype) {
      std::cerr << "gmorph-run: input '" << spec.name << "': expected dtype " << spec.dtype << ", given " << arr.dtype
                << " (" << it->second << ")\n";
      return 2;
    }
    if (manifest.Has("index_bounds") && manifest["index_bounds"].Has(spec.name)) {
      const auto& bounds = manifest["index_bounds"][spec.name];
      std::string bad = IndexOutOfRange(spec.name, arr, bounds["low"].Int(), bounds["high"].Int());
      if (!bad.empty()) {
        std::cerr << "gmorph-run: " << bad << " (" << it->second << ")\n";
        return 2;
      }
    }
    host_inputs[spec.name] = std::move(arr);
  }
  std::vector<EntryPoint> selected = entries;
  if (bucketed) {  // the smallest bucket that holds the batch; smaller batches padded up (edge)
    std::vector<EntryPoint> fits;
    for (const auto& e : entries) if (e.batch >= given_batch) fits.push_back(e);
    std::sort(fits.begin(), fits.end(), [](const EntryPoint& a, const EntryPoint& b) { return a.batch < b.batch; });
    if (given_batch < 1 || fits.empty()) {
      std::cerr << "gmorph-run: batch " << given_batch << " is not accepted (batch buckets:";
      for (const auto& e : entries) std::cerr << " " << e.batch;
      std::cerr << "; smaller batches are padded up)\n";
      return 2;
    }
    selected = {fits[0]};
    for (auto& kv : host_inputs) {
      gmorph::npy::Array& arr = kv.second;
      size_t row = arr.data.size() / static_cast<size_t>(given_batch);
      for (int64_t i = given_batch; i < fits[0].batch; ++i) {
        arr.data.insert(arr.data.end(), arr.data.end() - row, arr.data.end());
      }
      arr.shape[0] = fits[0].batch;
    }
  }

  CheckHostArch(private_library.path(), opt.library);
  if (opt.device == "cuda") LoadCudaRuntime();
  DLDevice dev{opt.device == "cuda" ? kDLCUDA : kDLCPU, opt.device_id};

  std::unique_ptr<WeightsFile> weights;
  if (m.weights != nullptr) {
    weights = std::make_unique<WeightsFile>(DirOf(opt.library) + (*m.weights)["file"].String(), *m.weights,
                                            opt.verify_weights);
  }

  ffi::Module vm = [&]() {
    QuietScopeWarnings quiet;
    ffi::Module lib = ffi::Module::LoadFromFile(private_library.path());
    auto load_exec = lib->GetFunction("vm_load_executable", true);
    if (!load_exec.has_value()) throw std::runtime_error(opt.library + " is not a Relax VM library");
    return (*load_exec)().cast<ffi::Module>();
  }();
  ffi::Function init = vm->GetFunction("vm_initialization", false).value();
  if (dev.device_type == kDLCPU) {
    init(static_cast<int>(kDLCPU), dev.device_id, kPooledAllocator);
  } else {  // the VM also needs the CPU for shape computations
    init(static_cast<int>(dev.device_type), dev.device_id, kPooledAllocator, static_cast<int>(kDLCPU), 0,
         kPooledAllocator);
  }

  ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  ffi::Function copy_from = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
  ffi::Function copy_to = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");

  // The signature the library was built with (inputs, tasks, outputs, index bounds, entry points)
  // must be what the manifest says: an edited manifest is refused, naming both files.
  {
    auto signature_fn = vm->GetFunction("gmorph_signature", false);
    if (!signature_fn.has_value()) {
      std::cerr << "gmorph-run: library " << opt.library << " has no embedded signature (not built by this "
                << "gmorph-tvm); its manifest is " << manifest_path << "\n";
      return 1;
    }
    ffi::Tensor blob = (*signature_fn)().cast<ffi::Tensor>();
    std::string text(static_cast<size_t>(blob.shape()[0]), '\0');
    copy_to(blob, static_cast<void*>(text.data()), static_cast<int64_t>(text.size()));
    std::string where;
    gmorph::json::Value embedded;
    try {
      embedded = gmorph::json::Parse(text);
    } catch (const std::exception& e) {
      std::cerr << "gmorph-run: library " << opt.library << " holds a corrupt signature (" << e.what() << ")\n";
      return 1;
    }
    if (!Covers(manifest, embedded, "manifest", &where)) {
      std::cerr << "gmorph-run: manifest " << manifest_path << " does not describe library " << opt.library
                << ": " << where << " differs\n";
      return 1;
    }
  }
  const int64_t free_before = FreeDeviceBytes(dev);  // before any weight, input or pool allocation
  std::map<std::string, ffi::Tensor> weight_tensors;  // one per name, shared by every entry point
  struct Call {
    ffi::Function fn;
    std::vector<ffi::Any> args;
    std::vector<ffi::AnyView> views;
  };
  std::vector<Call> calls(selected.size());
  for (size_t c = 0; c < selected.size(); ++c) {
    const EntryPoint& entry = selected[c];
    calls[c].fn = vm->GetFunction(entry.function, false).value();
    for (const auto& spec : entry.inputs) {
      gmorph::npy::Array& host = host_inputs.at(spec.name);
      ffi::Tensor t = alloc(ffi::Shape(host.shape), ParseDtype(spec.dtype), dev, ffi::Optional<ffi::String>()).cast<ffi::Tensor>();
      copy_from(t, static_cast<void*>(host.data.data()), static_cast<int64_t>(host.data.size()));
      calls[c].args.emplace_back(t);
    }
    for (const auto& name : entry.weights) {
      if (!weights) throw std::runtime_error("the manifest lists weights for " + entry.function + " but no weights file");
      auto it = weight_tensors.find(name);
      if (it == weight_tensors.end()) it = weight_tensors.emplace(name, weights->Get(name, dev)).first;
      calls[c].args.emplace_back(it->second);
    }
    calls[c].views.assign(calls[c].args.begin(), calls[c].args.end());
  }
  auto call_all = [&]() {
    std::vector<ffi::Any> results(calls.size());
    for (size_t c = 0; c < calls.size(); ++c) {
      calls[c].fn.CallPacked(ffi::PackedArgs(calls[c].views.data(), static_cast<int32_t>(calls[c].views.size())),
                             &results[c]);
    }
    return results;
  };
  auto sync = [&]() {
    if (dev.device_type != kDLCPU) ffi::Function::GetGlobalRequired("runtime.Device_StreamSync")(dev, static_cast<int64_t>(0));
  };

  std::vector<ffi::Any> results = call_all();
  sync();
  for (int i = 0; i < opt.warmup; ++i) call_all();
  sync();
  std::vector<double> ms;
  for (int i = 0; i < opt.repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    call_all();
    sync();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }

  for (size_t c = 0; c < calls.size(); ++c) {
    std::vector<ffi::Tensor> outputs;
    if (auto arr = results[c].as<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& item : *arr) outputs.push_back(item.cast<ffi::Tensor>());
    } else {
      outputs.push_back(results[c].cast<ffi::Tensor>());
    }
    std::vector<Spec> output_specs;
    for (const auto& task : selected[c].tasks) {
      for (const auto& spec : task_outputs[task]) output_specs.push_back(spec);
    }
    if (outputs.size() != output_specs.size()) {
      std::cerr << "gmorph-run: " << selected[c].function << " returned " << outputs.size()
                << " outputs, the manifest lists " << output_specs.size() << "\n";
      return 1;
    }
    for (size_t i = 0; i < outputs.size(); ++i) {
      const ffi::Tensor& t = outputs[i];
      std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
      std::string dtype = DtypeName(t.dtype());
      int64_t count = 1;
      for (int64_t d : shape) count *= d;
      size_t nbytes = static_cast<size_t>(count) * ((t.dtype().bits * t.dtype().lanes + 7) / 8);
      std::vector<char> host(nbytes);
      copy_to(t, static_cast<void*>(host.data()), static_cast<int64_t>(nbytes));
      if (bucketed && !shape.empty() && shape[0] > given_batch) {  // cut the padding off
        count = count / shape[0] * given_batch;
        nbytes = nbytes / static_cast<size_t>(shape[0]) * static_cast<size_t>(given_batch);
        shape[0] = given_batch;
        host.resize(nbytes);
      }
      const Spec& spec = output_specs[i];
      double sum = 0.0;
      std::ostringstream first;
      int item = gmorph::npy::ItemSize(dtype);
      for (int64_t k = 0; k < count; ++k) {
        double v = ElementAsDouble(dtype, host.data() + k * item);
        sum += v;
        if (k < 5) first << (k ? ", " : "") << v;
      }
      std::printf("%s: %s%s first [%s%s] sum %.6g\n", spec.name.c_str(), dtype.c_str(), ShapeText(shape).c_str(),
                  first.str().c_str(), count > 5 ? ", ..." : "", sum);
      if (!opt.save_dir.empty()) {
        std::string file = spec.name;
        std::replace(file.begin(), file.end(), ':', '_');
        std::replace(file.begin(), file.end(), '/', '_');
        gmorph::npy::Write(opt.save_dir + "/" + file + ".npy", dtype, shape, host.data(), nbytes);
      }
    }
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  double mean = 0.0;
  for (double v : ms) mean += v / n;
  const char* threads = std::getenv("TVM_NUM_THREADS");
  if (!threads) threads = std::getenv("OMP_NUM_THREADS");
  std::printf("latency: median %.4f ms, mean %.4f ms, min %.4f ms over %zu runs on %s:%d, %s CPU threads\n", median,
              mean, sorted[0], n, opt.device.c_str(), opt.device_id, threads ? threads : "default");
  const int64_t free_after = FreeDeviceBytes(dev);
  if (free_before >= 0 && free_after >= 0) {
    std::printf("memory: device %.1f MiB in use by this run (weights, workspace, pool), host peak RSS %.1f MiB\n",
                static_cast<double>(free_before - free_after) / (1024.0 * 1024.0), PeakRssMiB());
  } else {
    std::printf("memory: host peak RSS %.1f MiB\n", PeakRssMiB());
  }
  return 0;
}

// TVM's runtime sizes its thread pool from TVM_NUM_THREADS / OMP_NUM_THREADS, else from
// hardware_concurrency() / 2 on x86 (it assumes two hardware threads a core): on machines whose
// cores have one, half of them would idle. As `import gmorph_tvm` does, use one thread per
// physical core this process may run on unless the user chose.
void ConfigureThreads() {
  if (std::getenv("TVM_NUM_THREADS") || std::getenv("OMP_NUM_THREADS")) return;
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return;
  std::set<std::pair<std::string, std::string>> cores;  // (package, core) of each allowed CPU
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::ifstream core(topo + "core_id"), package(topo + "physical_package_id");
    std::string core_id, package_id;
    if (!(core >> core_id)) core_id = "cpu" + std::to_string(cpu);  // no topology: count the CPU
    if (!(package >> package_id)) package_id = "?";
    cores.emplace(package_id, core_id);
  }
  if (!cores.empty()) setenv("TVM_NUM_THREADS", std::to_string(cores.size()).c_str(), 0);
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = ParseArgs(argc, argv);
  } catch (const std::exception&) {  // std::stoi on a non-number
    Usage("--device N, --repeat and --warmup take whole numbers");
  }
  ConfigureThreads();  // before the runtime starts its thread pool
  try {
    return Run(opt);
  } catch (const ffi::Error& e) {
    std::cerr << "gmorph-run: " << e.kind() << ": " << e.message() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "gmorph-run: " << e.what() << "\n";
  }
  return 1;
}
