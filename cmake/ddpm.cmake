# Shared build settings and the one helper that makes every component library.

if(DDPM_USE_CCACHE)
  find_program(DDPM_CCACHE ccache)
  if(DDPM_CCACHE)
    # pch_defines and time_macros let ccache cache translation units that use the PCH. BASEDIR
    # and NOHASHDIR let two clones of the project (a CI checkout, a worktree) share the cache.
    set(CMAKE_CXX_COMPILER_LAUNCHER
        ${CMAKE_COMMAND} -E env
        CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
        CCACHE_BASEDIR=${PROJECT_SOURCE_DIR} CCACHE_NOHASHDIR=1
        ${DDPM_CCACHE})
    message(STATUS "ddpm: compiling through ${DDPM_CCACHE}")
  endif()
endif()

# Warnings and definitions every target shares.
add_library(ddpm_options INTERFACE)
# -pthread everywhere: MPI and gRPC add it to their users, and a translation unit compiled with
# it cannot use a precompiled header built without it (GCC: "_REENTRANT is defined").
target_compile_options(ddpm_options INTERFACE -Wall -Wextra -Wno-unused-parameter -pthread)
target_include_directories(ddpm_options INTERFACE ${PROJECT_SOURCE_DIR})
if(DDPM_SANITIZE_ADDRESS)
  target_compile_options(ddpm_options INTERFACE -fsanitize=address -fno-omit-frame-pointer)
  target_link_options(ddpm_options INTERFACE -fsanitize=address)
endif()
if(DDPM_SANITIZE_UNDEFINED)
  # Every finding is an error that stops the process, so that a test fails on it.
  target_compile_options(ddpm_options INTERFACE -fsanitize=undefined -fno-sanitize-recover=all)
  target_link_options(ddpm_options INTERFACE -fsanitize=undefined -fno-sanitize-recover=all)
endif()
if(DDPM_SANITIZE_THREAD)
  target_compile_options(ddpm_options INTERFACE -fsanitize=thread)
  target_link_options(ddpm_options INTERFACE -fsanitize=thread)
endif()
if(DDPM_BUILD_FUZZERS)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "ddpm: DDPM_BUILD_FUZZERS needs clang (libFuzzer); configure with CXX=clang++")
  endif()
  # Coverage for libFuzzer in every library the targets link; the targets add the driver.
  target_compile_options(ddpm_options INTERFACE -fsanitize=fuzzer-no-link)
endif()

# One precompiled header for LibTorch, built once and reused by every target that includes
# torch: a translation unit that includes torch/torch.h costs about 30 s to parse without it.
add_library(ddpm_torch_pch STATIC ${PROJECT_SOURCE_DIR}/cmake/torch_pch.cc)
target_link_libraries(ddpm_torch_pch PUBLIC ddpm_options ${TORCH_LIBRARIES})
# Debian's TorchConfig.cmake derives its prefix as "/", so its include paths can be wrong:
# find the C++ API headers wherever they are.
find_path(DDPM_TORCH_API_INCLUDE torch/torch.h
  HINTS ${TORCH_INCLUDE_DIRS} /usr/include/torch/csrc/api/include
  PATH_SUFFIXES torch/csrc/api/include)
if(NOT DDPM_TORCH_API_INCLUDE)
  message(FATAL_ERROR "ddpm: torch/torch.h not found; install libtorch-dev or set Torch_DIR")
endif()
target_include_directories(ddpm_torch_pch SYSTEM PUBLIC ${DDPM_TORCH_API_INCLUDE})
# For the same reason libc10 and libtorch_cpu can be missing from TORCH_LIBRARIES.
get_filename_component(DDPM_TORCH_LIBDIR "${TORCH_LIBRARY}" DIRECTORY)
foreach(lib c10 torch_cpu)
  find_library(DDPM_LIB_${lib} ${lib} HINTS ${DDPM_TORCH_LIBDIR} NO_DEFAULT_PATH)
  if(DDPM_LIB_${lib})
    target_link_libraries(ddpm_torch_pch PUBLIC ${DDPM_LIB_${lib}})
  endif()
endforeach()
if(DDPM_USE_PCH)
  target_precompile_headers(ddpm_torch_pch PRIVATE ${PROJECT_SOURCE_DIR}/cmake/torch_pch.h)
endif()

# ddpm_add_library(NAME SOURCES... [DEPS...]) makes the library ddpm_NAME for a component folder.
function(ddpm_add_library name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_library(ddpm_${name} STATIC ${ARG_SOURCES})
  target_link_libraries(ddpm_${name} PUBLIC ddpm_options ${ARG_DEPS})
  if(ARG_TORCH)
    ddpm_use_torch(ddpm_${name})
  endif()
endfunction()

# ddpm_use_torch(TARGET) links LibTorch and reuses the shared precompiled header.
function(ddpm_use_torch target)
  target_link_libraries(${target} PUBLIC ddpm_torch_pch)
  if(DDPM_USE_PCH)
    target_precompile_headers(${target} REUSE_FROM ddpm_torch_pch)
  endif()
endfunction()

# ddpm_add_executable(NAME SOURCES... [DEPS...]) makes a thin main.
function(ddpm_add_executable name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ddpm_options ${ARG_DEPS})
  if(ARG_TORCH)
    ddpm_use_torch(${name})
  endif()
endfunction()
