/* The int8 multiply-accumulate peak of this CPU, measured: every thread runs independent int8 dot-product
 * instructions on registers only (AMX TDPBUSD tiles where Linux grants them, else AVX-512 VNNI vpdpbusd on
 * 12 independent accumulators), so no memory traffic bounds it. Prints "<GOP/s> <unit>".
 * Built and run by roofline.py with the host's compiler; no part of the package. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#endif
#if defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

#ifdef HAVE_AMX
static double amx_ops(long iters) {
  struct __attribute__((aligned(64))) { uint8_t palette, start, res[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg;
  static __thread uint8_t buf[2048] __attribute__((aligned(64)));
  memset(&cfg, 0, sizeof(cfg));
  memset(buf, 1, sizeof(buf));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, buf, 64); _tile_loadd(5, buf + 1024, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf + 1024, 64);
  for (long i = 0; i < iters; ++i) {
    _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, buf, 64);
  _tile_release();
  return iters * 4.0 * 16 * 16 * 64 * 2;
}
#endif

#ifdef __AVX512VNNI__
static double vnni_ops(long iters) {
  __m512i acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = _mm512_set1_epi32(j);
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < 12; ++j) asm volatile("vpdpbusd %1, %2, %0" : "+v"(acc[j]) : "v"(a), "v"(b));
  int32_t sink[16];
  _mm512_storeu_si512(sink, acc[0]);
  return sink[0] == 7 ? 0.0 : iters * 12.0 * 64 * 2;   /* never 7: keeps the loop alive */
}
#endif

int main(void) {
  const char* unit = "none";
  double (*run)(long) = 0;
#ifdef __AVX512VNNI__
  run = vnni_ops;
  unit = "avx512-vnni";
#endif
#ifdef HAVE_AMX
  if (syscall(SYS_arch_prctl, 0x1023, 18) == 0) {
    run = amx_ops;
    unit = "amx";
  }
#endif
  if (!run) {
    printf("0 none\n");
    return 0;
  }
  const long iters = 1L << 20;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double ops = 0, t0 = now();
#pragma omp parallel reduction(+ : ops)
    ops += run(iters);
    const double gops = ops / (now() - t0) / 1e9;
    if (gops > best) best = gops;
  }
  printf("%.1f %s\n", best, unit);
  return 0;
}
