// Host-side work split for batch prefill (plain C++, no CUDA), called by
// jaxinfer.plan_prefill.
//
// Request b's q_len queries x `group` heads are packed rows (row = token *
// group + head in group), cut into tiles of tile_rows rows: one work item per
// tile. Items are ordered heaviest first (by the keys a causal tile sees), so
// the long tiles start in the first wave and short ones fill the tail. The
// rows past the batch's last query (static padding of q) get items of their
// own with no keys: their CTAs write the zeros and -inf the API promises.
// With kv_splits > 1 every tile becomes kv_splits items, one per equal slice
// of the request's key positions (tile-aligned; a slice may be empty and
// still writes its empty state), for batches too small to fill the GPU.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "csrc/prefill.h"

namespace jaxinfer {

// qo_indptr [batch + 1]; kv_len, kv_begin, kv_end, mask_begin [batch].
// Fills items [capacity, kPfItemFields] (unused rows: request -1). Returns the
// number of items, or -1 if more than `capacity`.
inline int64_t split_prefill_work(const int32_t* qo_indptr, const int32_t* kv_len,
                                  const int32_t* kv_begin, const int32_t* kv_end,
                                  const int32_t* mask_begin, int batch, int group, int tile_rows,
                                  int kv_splits, int64_t total_q, int32_t* items, int64_t capacity) {
  struct Tile { int64_t cost; int32_t fields[kPfItemFields]; };
  std::vector<Tile> tiles;
  auto add_request = [&](int32_t request, int32_t q_begin, int32_t q_len, int32_t len,
                         int32_t begin, int32_t end, int32_t mask) {
    const int64_t rows = int64_t(q_len) * group;
    for (int64_t row = 0; row < rows; row += tile_rows) {
      const int64_t last_token = std::min(rows, row + tile_rows) / group;
      const int64_t keys = std::min<int64_t>(len, int64_t(len) - q_len + last_token + 1);
      // Slice c of kv_splits: positions [bound(c), bound(c + 1)), multiples of 64.
      auto bound = [&](int c) -> int32_t {
        if (c >= kv_splits) return len;
        return static_cast<int32_t>((int64_t(len) * c / kv_splits + 63) / 64 * 64);
      };
      for (int c = 0; c < kv_splits; ++c) {
        tiles.push_back({std::max<int64_t>(keys, 0) / kv_splits,
                         {request, q_begin, q_len, static_cast<int32_t>(row), len, begin, end, mask, c,
                          bound(c), bound(c + 1)}});
      }
    }
  };
  for (int b = 0; b < batch; ++b) {
    add_request(b, qo_indptr[b], qo_indptr[b + 1] - qo_indptr[b], kv_len[b], kv_begin[b],
                kv_end[b], mask_begin[b]);
  }
  // Padding rows of q: a pseudo request with no keys.
  add_request(batch, qo_indptr[batch], static_cast<int32_t>(total_q - qo_indptr[batch]), 0, 0, 0, 0);
  if (static_cast<int64_t>(tiles.size()) > capacity) return -1;

  std::vector<int> order(tiles.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return tiles[a].cost > tiles[b].cost; });
  for (size_t i = 0; i < order.size(); ++i) {
    std::copy_n(tiles[order[i]].fields, kPfItemFields, items + i * kPfItemFields);
  }
  for (int64_t i = tiles.size(); i < capacity; ++i) {
    int32_t* row = items + i * kPfItemFields;
    std::fill_n(row, kPfItemFields, 0);
    row[kPfRequest] = -1;
  }
  return static_cast<int64_t>(tiles.size());
}

}  // namespace jaxinfer
