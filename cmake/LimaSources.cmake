# The one source rule of both builds, CMake side. scripts/gyp-helper.mjs implements the same rule
# for node-gyp, and test/cuda.test.ts checks that the two agree on csrc/kernels:
#   - a directory named `cuda` (at any depth under csrc/) belongs to the CUDA build only;
#   - outside those, every *.cpp / *.cc is a CPU source; *.avx2.cpp, *.avx512.cpp,
#     *.avx512bf16.cpp and *.amx.cpp are the ISA kinds (built with those flags), everything else
#     the `base` kind.
# Pure CMake (no Node), so a GPU machine without Node builds the self-test from the same rule.
#
#   lima_sources(<out-var> <kind> <dir>)   kind: base | avx2 | avx512 | avx512bf16 | amx | cu | cc
#     base/avx2/avx512/avx512bf16/amx: CPU sources under <dir> outside `cuda` directories
#     cu: *.cu under <dir> (one level: csrc/kernels/cuda)   cc: *.cc/*.cpp under <dir> (one level)
#
# Script mode prints a kind, one path per line relative to the repository root:
#   cmake -DKIND=base -DDIR=csrc/kernels -P cmake/LimaSources.cmake
get_filename_component(LIMA_SOURCE_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

function(lima_sources out kind dir)
  set(root "${LIMA_SOURCE_ROOT}")
  if(kind STREQUAL "cu")
    file(GLOB found RELATIVE "${root}" "${root}/${dir}/*.cu")
  elseif(kind STREQUAL "cc")
    file(GLOB found RELATIVE "${root}" "${root}/${dir}/*.cc" "${root}/${dir}/*.cpp")
  else()
    file(GLOB_RECURSE all RELATIVE "${root}" "${root}/${dir}/*.cc" "${root}/${dir}/*.cpp")
    set(found "")
    foreach(f IN LISTS all)
      if(f MATCHES "(^|/)cuda/")
        continue()
      endif()
      if(f MATCHES "\\.avx512bf16\\.cpp$")
        set(k avx512bf16)
      elseif(f MATCHES "\\.amx\\.cpp$")
        set(k amx)
      elseif(f MATCHES "\\.avx512\\.cpp$")
        set(k avx512)
      elseif(f MATCHES "\\.avx2\\.cpp$")
        set(k avx2)
      else()
        set(k base)
      endif()
      if(k STREQUAL kind)
        list(APPEND found "${f}")
      endif()
    endforeach()
  endif()
  list(SORT found)
  set(${out} "${found}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE AND CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  lima_sources(list "${KIND}" "${DIR}")
  foreach(f IN LISTS list)
    message(NOTICE "${f}")
  endforeach()
endif()
