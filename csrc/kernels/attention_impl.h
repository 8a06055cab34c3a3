// Internal: the contract between the attention dispatcher (attention.cpp) and the per-ISA tile
// loops (attention_body.inc compiled three times). The dispatcher validates, plans the parallel
// work and owns every buffer; an ISA task only computes one unit of work with the scratch it gets.
#pragma once

#include <cstdint>

namespace lima {
namespace attn {

// Query rows and key rows per tile. 64 keeps a tile pair's working set (about 9 tiles of
// 64 x D floats in the backward) inside L2 while the micro-kernels' reused operand stays in L1.
constexpr int64_t kTileQ = 64;
constexpr int64_t kTileK = 64;

struct Shape {
  int64_t B, Tq, Tk, H, KV, D;
};

// Where row `row` of head `head` in batch `b` starts: b * batch + head * head + row * row.
// The public layout is token-major ([B, T, heads, D]); the dispatcher may hand the tile loops
// head-major copies ([B, heads, T, D]) instead, see attention.cpp.
struct Strides {
  int64_t batch, head, row;
};

// `static` (here and below): these helpers are also compiled into the ISA objects, whose copies
// must never be picked by the linker for baseline code.
static inline Strides token_major(int64_t T, int64_t heads, int64_t D) {
  return {T * heads * D, D, heads * D};
}
static inline Strides head_major(int64_t T, int64_t heads, int64_t D) {
  return {heads * T * D, T * D, D};
}

struct ForwardArgs {
  float* out;  // token-major, like q
  float* lse;
  const float* q;  // token-major
  const float* k;  // k and v in the layout kv_st
  const float* v;
  Strides kv_st;
  Shape s;
};

struct BackwardArgs {
  float* dq;        // receives chunk 0's dq; chunk c > 0 writes dq_parts + (c - 1) * B*Tq*H*D
  float* dq_parts;  // one per extra chunk (null when there is one chunk)
  float* dq_out;    // token-major dq: with a single chunk and a head-major dq, rows are copied
                    // here as soon as no later key tile can touch them (else null)
  float* dk;        // dk and dv token-major
  float* dv;
  const float* dout;  // dout, q, dq and dq_parts in the layout q_st
  const float* q;
  const float* k;  // token-major
  const float* v;
  const float* lse;
  const float* di;            // rowsum(dout * out), [B, H, Tq]
  const int64_t* chunk_tile;  // key tiles [chunk_tile[c], chunk_tile[c + 1]) form chunk c
  Strides q_st;
  Shape s;
};

// First query row that sees key row j (queries are aligned to the end of the keys).
static inline int64_t first_query_seeing(const Shape& s, int64_t j) {
  const int64_t i = j - (s.Tk - s.Tq);
  return i > 0 ? i : 0;
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch sizes in floats (each part starts 64-byte aligned when the base is).
static inline int64_t forward_scratch_floats(int64_t D) {
  return 2 * D * kTileQ + kTileK * kTileQ + kTileK * D + 3 * kTileQ;
}
static inline int64_t backward_scratch_floats(int64_t D) {
  return 3 * D * kTileK + 2 * kTileQ * D + 2 * kTileQ * kTileK + 2 * kTileK * D;
}

}  // namespace attn

// One forward task: query tile `qtile` of head h in batch b. Writes its rows of out and lse.
// One backward task: key chunk `chunk` of kv head g in batch b. Writes its rows of dk and dv and
// the dq contributions of those keys (see BackwardArgs::dq).
#define LIMA_ATTENTION_TASKS                                                                     \
  void attention_forward_task(const attn::ForwardArgs& a, int64_t b, int64_t h, int64_t qtile,   \
                              float* scratch);                                                   \
  void attention_backward_task(const attn::BackwardArgs& a, int64_t b, int64_t g, int64_t chunk, \
                               float* scratch);

namespace scalar { LIMA_ATTENTION_TASKS }
namespace avx2 { LIMA_ATTENTION_TASKS }
namespace avx512 { LIMA_ATTENTION_TASKS }

#undef LIMA_ATTENTION_TASKS

}  // namespace lima
