// Compiler hooks for the trainer's vectorised loops.
//
// FUSEDGRAD_TRAIN_CLONES compiles a function twice, for baseline x86-64 and
// for AVX2 + FMA (x86-64-v3), and picks one at load time by the CPU's
// capabilities — as ATen picks its own kernels. The helpers it calls are
// FUSEDGRAD_TRAIN_INLINE so that each clone gets its own vector code. On other
// compilers and architectures both are plain `inline` and the loops are
// vectorised for the baseline target.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSEDGRAD_TRAIN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FUSEDGRAD_TRAIN_INLINE __attribute__((always_inline)) inline
#else
#define FUSEDGRAD_TRAIN_CLONES
#define FUSEDGRAD_TRAIN_INLINE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDGRAD_RESTRICT __restrict__
#else
#define FUSEDGRAD_RESTRICT
#endif
