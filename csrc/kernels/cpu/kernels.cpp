// Run-time choice of the kernel table. Compiled without ISA flags: only the tables' own
// translation units (kernels_avx2.cpp, kernels_avx512.cpp) use AVX instructions.
#include "kernels/cpu/kernels.h"

#include <cstdlib>
#include <string>

namespace fm {

namespace avx2 { extern const Kernels table; }
namespace avx512 { extern const Kernels table; }

const Kernels* kernels_avx2() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
               ? &avx2::table
               : nullptr;
}

const Kernels* kernels_avx512() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl")
               ? &avx512::table
               : nullptr;
}

const Kernels& kernels() {
    static const Kernels* best = [] {
        const char* force = std::getenv("FLASHMEM_ISA");  // "avx2" runs the fallback on an AVX-512 CPU
        if (force && std::string(force) == "avx2") return kernels_avx2();
        const Kernels* k = kernels_avx512();
        return k ? k : kernels_avx2();
    }();
    FM_ARG(best != nullptr, "this CPU lacks AVX2/FMA/F16C, which flashmem requires");
    return *best;
}

}  // namespace fm
