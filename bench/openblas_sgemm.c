/* OpenBLAS sgemm timings for bench/gemm-openblas.bench.ts: one line of JSON per shape.
   Shapes come as arguments "M,N,K,transA,transB,beta"; row-major like lima-native's gemm. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  for (int s = 1; s < argc; ++s) {
    int M, N, K, ta, tb;
    float beta;
    if (sscanf(argv[s], "%d,%d,%d,%d,%d,%f", &M, &N, &K, &ta, &tb, &beta) != 6) return 2;
    float* A = malloc(sizeof(float) * (size_t)M * K);
    float* B = malloc(sizeof(float) * (size_t)K * N);
    float* C = malloc(sizeof(float) * (size_t)M * N);
    for (size_t i = 0; i < (size_t)M * K; ++i) A[i] = (float)((i * 7919) % 1000) * 1e-4f;
    for (size_t i = 0; i < (size_t)K * N; ++i) B[i] = (float)((i * 104729) % 1000) * 1e-4f;
    for (size_t i = 0; i < (size_t)M * N; ++i) C[i] = 0;
    double times[15];
    const int reps = 15;
    for (int r = -2; r < reps; ++r) {
      double t0 = now();
      cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A,
                  ta ? M : K, B, tb ? K : N, beta, C, N);
      if (r >= 0) times[r] = now() - t0;
    }
    qsort(times, reps, sizeof(double), cmp);
    printf("{\"shape\":\"%s\",\"median_ms\":%.4f,\"gflops\":%.2f}\n", argv[s], times[reps / 2] * 1e3,
           2.0 * M * N * K / times[reps / 2] * 1e-9);
    free(A);
    free(B);
    free(C);
  }
  return 0;
}
