// The K/V cache as every attention kernel addresses it: paged (a page table
// of entries naming pages) or ragged (rows of k and v, as pages of one slot).
#pragma once
#include <cstdint>

namespace jaxinfer {

struct KvCache {
  // Key (value) element (page, slot, head, d) sits at
  // k (v) + page * stride_page + slot * stride_slot + head * stride_head + d.
  const void* k;
  const void* v;
  int64_t stride_page, stride_slot, stride_head;
  int page_size;       // 1 when ragged
  int64_t num_pages;   // pages in the cache (ragged: rows); pages outside [0, num_pages) are skipped
  const int32_t* kv_indices;  // the page table's entries; nullptr: ragged (an entry is a row)
  int64_t num_kv_indices;     // length of kv_indices

#ifdef __CUDACC__
  // One past the last entry a request's range may name.
  __device__ __forceinline__ int64_t num_entries() const { return kv_indices ? num_kv_indices : num_pages; }

  // Element offset (from a head's base) of the key at position pos of a
  // request whose pages are entries [entry_begin, entry_end) (the caller keeps
  // them inside [0, num_entries())); -1 for no such key: a negative position,
  // one past the request's pages, or a page outside the cache.
  __device__ __forceinline__ int64_t row_offset(int64_t entry_begin, int64_t entry_end, int pos) const {
    if (pos < 0) return -1;
    int page_in_request;
    if ((page_size & (page_size - 1)) == 0) {  // the usual power of two: a shift, not a division
      page_in_request = pos >> (__ffs(page_size) - 1);
    } else {
      page_in_request = pos / page_size;
    }
    const int64_t entry = entry_begin + page_in_request;
    if (entry >= entry_end) return -1;
    const int64_t page = kv_indices ? int64_t(kv_indices[entry]) : entry;
    if (page < 0 || page >= num_pages) return -1;
    return page * stride_page + int64_t(pos - page_in_request * page_size) * stride_slot;
  }
#endif
};

}  // namespace jaxinfer
