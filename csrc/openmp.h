// OpenMP where the compiler has it. Without it (Apple Clang without libomp, say) the pragmas
// are ignored and every kernel runs its whole range in the calling thread, exactly as with
// one OpenMP thread: the results are bitwise the same either way.
#pragma once
#if defined(_OPENMP)
#include <omp.h>
namespace pymeta { constexpr bool kOpenMP = true; }
#else
namespace pymeta { constexpr bool kOpenMP = false; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_get_max_threads() { return 1; }
#endif
