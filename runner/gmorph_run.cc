// gmorph-run: run a gmorph-tvm artifact with the TVM C++ runtime only (no Python).
//
//   gmorph-run ARTIFACT.so --input x=x.npy [--input y=y.npy] [--device cpu|cuda[:N]]
//              [--repeat N] [--warmup N] [--save-outputs DIR]
//
// Reads ARTIFACT's manifest (<dir>/<stem>.manifest.json) for the input names/shapes/dtypes and
// the task outputs, loads the library, creates the Relax VM (vm_load_executable +
// vm_initialization), runs `main`, prints each task's outputs (shape, first values, sum) and the
// median latency over --repeat runs. --save-outputs writes every output as DIR/<name>.npy.
#include <dlfcn.h>
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
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"
#include "npy.h"

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;

struct Options {
  std::string library;
  std::map<std::string, std::string> inputs;  // name -> .npy path
  std::vector<std::string> unnamed_inputs;    // .npy paths given without NAME=
  std::string device = "cpu";
  int device_id = 0;
  int repeat = 10;
  int warmup = 1;
  std::string save_dir;
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

Spec SpecOf(const gmorph::json::Value& v) {
  Spec s;
  s.name = v["name"].String();
  for (const auto& d : v["shape"].Array()) s.shape.push_back(d.Int());
  s.dtype = v["dtype"].String();
  return s;
}

[[noreturn]] void Usage(const std::string& problem) {
  if (!problem.empty()) std::cerr << "gmorph-run: " << problem << "\n";
  std::cerr << "usage: gmorph-run ARTIFACT.so --input NAME=FILE.npy [--input ...] [--device cpu|cuda[:N]]\n"
               "                  [--repeat N] [--warmup N] [--save-outputs DIR]\n";
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

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
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
void CheckHostArch(const std::string& library) {
  std::ifstream in(library, std::ios::binary);
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

// Loads the CUDA runtime plugin of the TVM wheel, which registers the "cuda" module loader.
void LoadCudaRuntime() {
#ifdef GMORPH_TVM_RUNTIME_CUDA
  const char* path = GMORPH_TVM_RUNTIME_CUDA;
#else
  const char* path = "libtvm_runtime_cuda.so";
#endif
  if (ffi::Function::GetGlobal("ffi.Module.load_from_bytes.cuda").has_value()) return;
  if (dlopen(path, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    throw std::runtime_error(std::string("cannot load the TVM CUDA runtime (") + dlerror() + ")");
  }
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

int Run(const Options& opt) {
  const std::string manifest_path = ManifestPathFor(opt.library);
  gmorph::json::Value manifest;
  try {
    manifest = gmorph::json::Parse(ReadFile(manifest_path));
    if (manifest["format"].String() != "gmorph-tvm-artifact") throw std::runtime_error("not a gmorph-tvm manifest");
    if (manifest["format_version"].Int() != 2) throw std::runtime_error("unsupported format_version (this gmorph-run reads 2)");
  } catch (const std::exception& e) {
    std::cerr << "gmorph-run: manifest " << manifest_path << ": " << e.what() << "\n";
    return 1;
  }
  const std::string built_for = manifest["device"].String();
  if (built_for != opt.device) {
    std::cerr << "gmorph-run: " << opt.library << " was built for " << built_for << "; run it with --device "
              << built_for << "\n";
    return 1;
  }

  // The manifest names the oldest CUDA driver that loads the artifact's SASS; refuse an older one
  // here, in one line, rather than failing at the first kernel launch.
  if (opt.device == "cuda" && manifest.Has("cuda") && manifest["cuda"].Has("cuda_min_driver")) {
    const std::string needed = manifest["cuda"]["cuda_min_driver"].String();
    const int driver = CudaDriverVersion();
    if (driver > 0 && driver < ParseCudaVersion(needed)) {
      std::cerr << "gmorph-run: " << opt.library << " needs a CUDA driver >= " << needed << ", but this driver is CUDA "
                << driver / 1000 << "." << (driver % 1000) / 10
                << "; rebuild for this board's JetPack (e.g. --target jetson-orin:jp5) or upgrade the driver\n";
      return 1;
    }
  }

  std::vector<Spec> input_specs;
  for (const auto& v : manifest["inputs"].Array()) input_specs.push_back(SpecOf(v));
  std::vector<std::pair<std::string, Spec>> output_specs;  // (task, spec)
  for (const auto& task : manifest["tasks"].Array()) {
    for (const auto& o : task["outputs"].Array()) output_specs.emplace_back(task["name"].String(), SpecOf(o));
  }

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
  std::vector<gmorph::npy::Array> host_inputs;
  for (const auto& spec : input_specs) {
    auto it = paths.find(spec.name);
    if (it == paths.end()) {
      std::cerr << "gmorph-run: missing input '" << spec.name << "' (" << spec.dtype << ShapeText(spec.shape)
                << "): pass --input " << spec.name << "=FILE.npy\n";
      return 2;
    }
    gmorph::npy::Array arr = gmorph::npy::Read(it->second);
    if (arr.shape != spec.shape) {
      std::cerr << "gmorph-run: input '" << spec.name << "': expected shape " << ShapeText(spec.shape) << ", given "
                << ShapeText(arr.shape) << " (" << it->second << ")\n";
      return 2;
    }
    if (arr.dtype != spec.dtype) {
      std::cerr << "gmorph-run: input '" << spec.name << "': expected dtype " << spec.dtype << ", given " << arr.dtype
                << " (" << it->second << ")\n";
      return 2;
    }
    host_inputs.push_back(std::move(arr));
  }

  CheckHostArch(opt.library);
  if (opt.device == "cuda") LoadCudaRuntime();
  DLDevice dev{opt.device == "cuda" ? kDLCUDA : kDLCPU, opt.device_id};

  ffi::Module vm = [&]() {
    QuietScopeWarnings quiet;
    ffi::Module lib = ffi::Module::LoadFromFile(opt.library);
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
  ffi::Function main_fn = vm->GetFunction("main", false).value();

  ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  ffi::Function copy_from = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
  ffi::Function copy_to = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");
  std::vector<ffi::Any> args;
  for (size_t i = 0; i < input_specs.size(); ++i) {
    ffi::Tensor t = alloc(ffi::Shape(input_specs[i].shape), ParseDtype(input_specs[i].dtype), dev, ffi::Optional<ffi::String>())
                        .cast<ffi::Tensor>();
    copy_from(t, static_cast<void*>(host_inputs[i].data.data()), static_cast<int64_t>(host_inputs[i].data.size()));
    args.emplace_back(t);
  }
  std::vector<ffi::AnyView> arg_views(args.begin(), args.end());
  auto call_main = [&]() {
    ffi::Any result;
    main_fn.CallPacked(ffi::PackedArgs(arg_views.data(), static_cast<int32_t>(arg_views.size())), &result);
    return result;
  };
  auto sync = [&]() {
    if (dev.device_type != kDLCPU) ffi::Function::GetGlobalRequired("runtime.Device_StreamSync")(dev, static_cast<int64_t>(0));
  };

  ffi::Any result = call_main();
  sync();
  for (int i = 0; i < opt.warmup; ++i) call_main();
  sync();
  std::vector<double> ms;
  for (int i = 0; i < opt.repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    call_main();
    sync();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }

  std::vector<ffi::Tensor> outputs;
  if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) outputs.push_back(item.cast<ffi::Tensor>());
  } else {
    outputs.push_back(result.cast<ffi::Tensor>());
  }
  if (outputs.size() != output_specs.size()) {
    std::cerr << "gmorph-run: main returned " << outputs.size() << " outputs, the manifest lists " << output_specs.size() << "\n";
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
    const Spec& spec = output_specs[i].second;
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
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  double mean = 0.0;
  for (double v : ms) mean += v / n;
  std::printf("latency: median %.4f ms, mean %.4f ms, min %.4f ms over %zu runs on %s:%d\n", median, mean, sorted[0], n,
              opt.device.c_str(), opt.device_id);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt = ParseArgs(argc, argv);
  try {
    return Run(opt);
  } catch (const ffi::Error& e) {
    std::cerr << "gmorph-run: " << e.kind() << ": " << e.message() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "gmorph-run: " << e.what() << "\n";
  }
  return 1;
}
