// Errors that cross into Python. The native code never exits or aborts:
//   FM_ARG(cond, msg)  -> std::invalid_argument (Python ValueError) for bad user input
//   FM_IO(cond, msg)   -> std::runtime_error    (Python RuntimeError) for I/O and format problems
// Both append the C++ file and line, as faiss does.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace fm {

template <typename E, typename... Args>
[[noreturn]] inline void raise(const char* file, int line, Args&&... args) {
    std::ostringstream os;
    (os << ... << args);
    os << " [" << file << ":" << line << "]";
    throw E(os.str());
}

}  // namespace fm

#define FM_ARG(cond, ...) \
    do { if (!(cond)) ::fm::raise<std::invalid_argument>(__FILE__, __LINE__, __VA_ARGS__); } while (0)
#define FM_IO(cond, ...) \
    do { if (!(cond)) ::fm::raise<std::runtime_error>(__FILE__, __LINE__, __VA_ARGS__); } while (0)
