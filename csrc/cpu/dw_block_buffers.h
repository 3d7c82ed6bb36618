// Buffers of the CPU depthwise kernels: packed weights and per-channel vectors, the
// per-thread pool of scratch buffers (Buf) and a thread's Workspace, and for_each_tile,
// which runs a function over every tile of a call in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "dw_block_tiles.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {

// Weights packed per tile: (blocks, k*k, CB) float32, zeros for missing channels; `flip`
// rotates the kernel by 180 degrees (the input gradient is a 'same' conv with it).
inline at::Tensor pack_weights(const at::Tensor& weight, int64_t C, int64_t k, bool flip) {
  const int64_t blocks = (C + CB - 1) / CB, kk = k * k;
  const at::Tensor wf = dw_weight_matrix(weight, flip);  // (C, k*k) float32
  at::Tensor full = at::zeros({blocks * CB, kk}, wf.options());
  full.narrow(0, 0, C).copy_(wf);
  return full.view({blocks, CB, kk}).transpose(1, 2).contiguous();
}

// Each thread buffers whole padded planes of CB channels (float32); refuse planes whose
// buffers would not fit in memory with a message saying so, instead of std::bad_alloc.
inline void check_plane_fits(const Plane& g) {
  constexpr int64_t kMaxBufferFloats = int64_t(1) << 28;  // 1 GiB per buffer
  TORCH_CHECK_VALUE(g.size() <= kMaxBufferFloats, "x: planes of ", g.H, "x", g.W,
                    " are too large for the cpu depthwise kernel, which buffers a padded plane of ", CB,
                    " channels per thread (", g.size() * 4 / (1 << 20), " MiB per buffer, limit ",
                    kMaxBufferFloats * 4 / (1 << 20), " MiB); use backend='reference' for them");
}

inline std::vector<float> pad_channels(const c10::optional<at::Tensor>& t, int64_t C, int64_t padded) {
  std::vector<float> out(padded, 0.f);
  if (t.has_value()) {
    const at::Tensor f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + C, out.begin());
  }
  return out;
}

// A float buffer of one thread, taken from (and given back to) that thread's pool, so that
// buffers of MiBs are not taken from the system at every call: fresh memory costs a page
// fault per 4 KiB page when first written (about 1700 per forward + backward at N=8, C=256,
// 32 x 32, several % of its time). A pool keeps at most kPoolKeep floats (8 MiB) between
// calls; larger buffers go back to the system. Contents are unspecified unless `zero`.
constexpr size_t kPoolKeep = size_t(1) << 21;

class Buf {
 public:
  Buf(int64_t n, bool zero) {
    if (n == 0) return;
    auto& pool = thread_pool();
    size_t best = pool.size();  // the smallest pooled buffer that is large enough
    for (size_t i = 0; i < pool.size(); ++i)
      if (pool[i].size() >= static_cast<size_t>(n) && (best == pool.size() || pool[i].size() < pool[best].size()))
        best = i;
    if (best < pool.size()) {
      v_.swap(pool[best]);
      pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(best));
    } else {
      v_.resize(static_cast<size_t>(n));
    }
    if (zero) std::fill_n(v_.data(), n, 0.f);
  }
  ~Buf() {
    if (v_.empty()) return;
    auto& pool = thread_pool();
    pool.push_back(std::move(v_));
    // keep the largest buffers within kPoolKeep floats
    std::sort(pool.begin(), pool.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
    size_t kept = 0, i = 0;
    for (; i < pool.size() && kept + pool[i].size() <= kPoolKeep; ++i) kept += pool[i].size();
    pool.resize(i);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* data() { return v_.data(); }

 private:
  static std::vector<std::vector<float>>& thread_pool() {
    thread_local std::vector<std::vector<float>> pool;
    return pool;
  }
  std::vector<float> v_;
};

// Scratch buffers of one thread for one parallel chunk. The padded ones (P, DZ) are zeroed
// and their borders stay zero, because tiles only ever write their interiors. Every buffer
// holds ns sub-blocks: padded ones at a stride of g.sub() floats, the others (H x W x CB
// each) at a stride of g.zsub().
struct Workspace {
  Buf P, Z, A, D, DY, DZ, OUT;
  Workspace(const Plane& g, bool backward, int64_t ns)
      : P(ns * g.sub(), true), Z(ns * g.zsub(), false), A(ns * g.zsub(), false),
        D(backward ? ns * g.zsub() : 0, false), DY(backward ? ns * g.zsub() : 0, false),
        DZ(backward ? ns * g.sub() : 0, true), OUT(ns * g.zsub(), false) {}
};

// Runs fn(tile, block, workspace) for every tile (image n, tile_subs() channel blocks), in
// parallel; block is the index of the tile's first CB-channel block.
template <typename Fn>
void for_each_tile(int64_t N, int64_t C, const Plane& g, bool backward, bool interleaved, Fn fn) {
  const int64_t ns = tile_subs(N, C, g.sub(), interleaved), tc = ns * CB, tiles = (C + tc - 1) / tc;
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(g, backward, ns);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles, c0 = (t % tiles) * tc;
      fn(Tile{n, c0, std::min(tc, C - c0)}, c0 / CB, ws);
    }
  });
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
