// Host-side work split for paged decode (plain C++, no CUDA): the loop at
// the heart of jaxinfer.plan_decode, here because a per-request loop in C++
// costs a few microseconds where the same steps in numpy cost tens.
//
// The batch's key tiles (tile_keys keys; an empty request counts one masked
// tile, since it still writes its zeros) are laid end to end and cut every
// ceil(total / num_ctas) tiles. Each piece of a request between two cuts is a
// work item; CTA slot c runs the items of the c-th run. Every CTA thus streams
// the same number of keys whatever the mix of lengths, and the wave ends
// together.
#pragma once
#include <algorithm>
#include <cstdint>

#include "csrc/decode.h"

namespace jaxinfer {

// Fills items [capacity, kItemFields] (rows past the last item: request -1),
// cta_items [num_ctas + 1] and merge_indptr [max_batch + 1] (requests past
// `batch` own no items). Returns the number of items, or -1 if more than
// `capacity` (never for capacity >= batch + num_ctas).
inline int64_t split_decode_work(const int32_t* kv_indptr, const int32_t* kv_last_page_len,
                                 int batch, int page_size, int tile_keys, int num_ctas,
                                 int32_t* items, int64_t capacity, int32_t* cta_items,
                                 int32_t* merge_indptr, int max_batch) {
  auto kv_len = [&](int b) -> int64_t {
    const int64_t pages = int64_t(kv_indptr[b + 1]) - kv_indptr[b];
    return pages > 0 ? (pages - 1) * page_size + kv_last_page_len[b] : 0;
  };
  auto tiles = [&](int64_t len) -> int64_t { return len > 0 ? (len + tile_keys - 1) / tile_keys : 1; };
  int64_t total = 0;
  for (int b = 0; b < batch; ++b) total += tiles(kv_len(b));
  const int64_t per_cta = total > 0 ? (total + num_ctas - 1) / num_ctas : 1;

  int64_t n = 0, stream = 0;  // items written; tiles of the stream before request b
  int next_cta = 0;           // first CTA slot whose first item is not yet recorded
  for (int b = 0; b < batch; ++b) {
    merge_indptr[b] = static_cast<int32_t>(n);
    const int64_t len = kv_len(b), end = stream + tiles(len);
    for (int64_t cut = stream; cut < end; ++n) {
      if (n >= capacity) return -1;
      const int64_t cta = cut / per_cta, piece_end = std::min((cta + 1) * per_cta, end);
      while (next_cta <= cta) cta_items[next_cta++] = static_cast<int32_t>(n);
      int32_t* row = items + n * kItemFields;
      row[kItemRequest] = b;
      row[kItemKvStart] = static_cast<int32_t>((cut - stream) * tile_keys);
      row[kItemKvEnd] = static_cast<int32_t>(std::min((piece_end - stream) * tile_keys, len));
      row[kItemKvLen] = static_cast<int32_t>(len);
      row[kItemPageBegin] = kv_indptr[b];
      row[kItemPageEnd] = kv_indptr[b + 1];
      cut = piece_end;
    }
    stream = end;
  }
  while (next_cta <= num_ctas) cta_items[next_cta++] = static_cast<int32_t>(n);
  for (int b = batch; b <= max_batch; ++b) merge_indptr[b] = static_cast<int32_t>(n);
  for (int64_t i = n; i < capacity; ++i) {
    int32_t* row = items + i * kItemFields;
    for (int f = 0; f < kItemFields; ++f) row[f] = 0;
    row[kItemRequest] = -1;
  }
  return n;
}

}  // namespace jaxinfer
