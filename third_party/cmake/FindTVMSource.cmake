# FindTVMSource: locate the TVM source tree gmorph-tvm builds its board runtime from.
#
#   GMORPH_TVM_SOURCE_DIR  the tree (default: third_party/tvm, a git submodule)
#   GMORPH_TVM_COMMIT      the commit of the apache-tvm wheel gmorph-tvm pins (0.27.0.post1)
#
# Sets TVMSource_FOUND and TVMSource_DIR. When the tree (or its 3rdparty/tvm-ffi submodule) is
# missing, it stops with one message holding the commands that fetch it.
set(_tvm_fetch
  "git clone https://github.com/apache/tvm ${GMORPH_TVM_SOURCE_DIR} && git -C ${GMORPH_TVM_SOURCE_DIR} checkout ${GMORPH_TVM_COMMIT} && git -C ${GMORPH_TVM_SOURCE_DIR} submodule update --init --recursive 3rdparty/tvm-ffi")
if(NOT EXISTS "${GMORPH_TVM_SOURCE_DIR}/CMakeLists.txt" OR NOT EXISTS "${GMORPH_TVM_SOURCE_DIR}/src/runtime")
  set(TVMSource_FOUND FALSE)
  message(FATAL_ERROR "no TVM source tree in ${GMORPH_TVM_SOURCE_DIR} (GMORPH_BUILD_TVM_RUNTIME=ON builds the runtime from it); fetch it with: ${_tvm_fetch}")
endif()
if(NOT EXISTS "${GMORPH_TVM_SOURCE_DIR}/3rdparty/tvm-ffi/CMakeLists.txt"
   OR NOT EXISTS "${GMORPH_TVM_SOURCE_DIR}/3rdparty/tvm-ffi/3rdparty/dlpack/include/dlpack/dlpack.h")
  set(TVMSource_FOUND FALSE)
  message(FATAL_ERROR "the TVM tree in ${GMORPH_TVM_SOURCE_DIR} lacks its tvm-ffi/dlpack submodules; fetch them with: git -C ${GMORPH_TVM_SOURCE_DIR} submodule update --init --recursive 3rdparty/tvm-ffi")
endif()
set(TVMSource_FOUND TRUE)
set(TVMSource_DIR "${GMORPH_TVM_SOURCE_DIR}")
find_package(Git QUIET)
if(GIT_FOUND AND EXISTS "${GMORPH_TVM_SOURCE_DIR}/.git")
  execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${GMORPH_TVM_SOURCE_DIR}" rev-parse HEAD
                  OUTPUT_VARIABLE _tvm_head OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  string(LENGTH "${GMORPH_TVM_COMMIT}" _pin_len)
  string(SUBSTRING "${_tvm_head}" 0 ${_pin_len} _tvm_head_short)
  if(NOT _tvm_head_short STREQUAL GMORPH_TVM_COMMIT)
    message(WARNING "TVM source tree is at ${_tvm_head}, not the wheel's commit ${GMORPH_TVM_COMMIT}: artifacts built by the wheel may not load in this runtime (git -C ${GMORPH_TVM_SOURCE_DIR} checkout ${GMORPH_TVM_COMMIT})")
  endif()
  message(STATUS "TVM source: ${GMORPH_TVM_SOURCE_DIR} at ${_tvm_head}")
endif()
