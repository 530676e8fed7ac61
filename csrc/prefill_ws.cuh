// Warp-specialised, persistent Hopper prefill (sm_90a), beside the Hopper
// path of csrc/prefill.cuh: the same work items, tiles, layouts, wgmma calls
// and softmax, but the loads move to producer warps, no barrier spans the
// CTA, and one CTA per SM walks works (an item and a KV head) claimed from a
// counter, so a work's first loads overlap the last one's end.
//
//   warps 8-11 (producer warpgroup): per work, claim it (items-major order:
//     a CTA's own index first, then the launch's counter), publish its
//     item's fields and copy its query rows into a free query buffer; then
//     per tile resolve the key rows (page-table reads) and copy K and then V
//     into a free stage: by TMA (csrc/tma.cuh) when no row is missing and the
//     boxes line up (ragged K/V; pages of 32 to 128 keys from a page-aligned
//     first key), else with cp.async, which zero-fills missing rows. (A tile
//     wholly inside its request and the cache, ragged or on consecutive
//     pages, skips resolving its rows: thread 0 copies it by TMA at once.)
//     Each of a stage's K and V has its own full / empty barrier pair, so the
//     next K loads as soon as the scores of the last one are done. setmaxnreg
//     moves registers from this warpgroup (56 at D = 128) to the consumers
//     (224): 384 threads start at 168 each.
//   warps 0-7 (two consumer warpgroups of 64 rows): per work, wait for its
//     queries; per tile, wait for K, S = Q K^T, variant and softmax, release
//     K, wait for V, O += P V, release V; then release the queries and write
//     the rows. The warpgroups meet after issuing S and before issuing P V,
//     one a meeting behind the other, so that one's softmax runs while the
//     other's MMAs do (NOTES P49). (Issuing S of the next tile with P V of
//     this one, as FlashAttention-3 does, measured slower here every time:
//     benchmarks/NOTES.md P44.)
//
// Built twice: for any variant, and for the plain one (scale, causal or not),
// whose consumer loop then holds no variant code at all: half the
// instructions, and 4-28% faster on causal shapes (benchmarks/NOTES.md P28).
// Not for RoPE (the key tile would need rotating between the copy and the
// MMA); the launcher uses the barrier-synchronised kernel then.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "csrc/attention_tile.cuh"
#include "csrc/mbarrier.cuh"
#include "csrc/mma.cuh"
#include "csrc/prefill.h"
#include "csrc/prefill_parts.cuh"
#include "csrc/tma.cuh"
#include "csrc/wgmma.cuh"

namespace jaxinfer {
namespace prefill_ws_detail {

constexpr int kRows = kPrefillTileRows;  // 128: two consumer warpgroups of 64
constexpr int kConsumers = 256;
constexpr int kProducers = 128;  // a whole warpgroup: setmaxnreg acts per warpgroup
constexpr int kThreads = kConsumers + kProducers;
constexpr int kKeys = 128;
constexpr int kStages = 2;
constexpr int kQBuffers = 2;                 // a work's queries load while the last work ends
constexpr int kRecord = kPfItemFields + 1;  // a work in shared memory: its item's fields, then the KV head (-1: no more)
// setmaxnreg's split of the 168 registers a thread launches with (128 x
// producer + 256 x consumer <= 384 x 168). The consumers' 224 at D = 128 cost
// the producer its 16 row offsets in flight (it copies in batches of 8): +1-6%
// on long causal prefill, 2-3% less at 16 x 1024 (benchmarks/NOTES.md P40).
// At D = 64 the producer would spill at 56 and the consumers do not need more.
template <int D>
constexpr int kProducerRegisters = D == 128 ? 56 : 80;
template <int D>
constexpr int kConsumerRegisters = D == 128 ? 224 : 208;
template <int D>
constexpr bool kRegistersFit = kProducers * kProducerRegisters<D> + kConsumers * kConsumerRegisters<D> <= kThreads * 168;
static_assert(kRegistersFit<64> && kRegistersFit<128>, "setmaxnreg asks for more registers than the CTA launches with");

template <int D>
struct Layout {
  static constexpr int kTileElems = kKeys * D;
  static constexpr int kQElems = kRows * D;
  // Element offsets in the 1024-byte aligned dynamic shared memory.
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBuffers * kQElems;
  static constexpr int kV = kK + kStages * kTileElems;
  static constexpr int kEnd = kV + kStages * kTileElems;
  // Then: key row offsets [kStages][kKeys] int64, barriers [4][kStages] + [2][kQBuffers],
  // claims [2] int64, work records [kQBuffers][kRecord] and missing flags [kStages] int32.
  static constexpr size_t kSmem = size_t(kEnd) * 2 + kStages * kKeys * 8 + (4 * kStages + 2 * kQBuffers + 2) * 8 +
                                  (kQBuffers * kRecord + kStages) * 4 + 1024;
};

// One persistent CTA per SM walks its works; producer and consumers meet only
// at mbarriers, and the producer runs a work ahead: the next work's queries
// and first tiles load while the consumers finish and write the last one.
// kPlain: built for the plain variant (AttentionVariant::is_plain, no custom
// mask); the variant code then folds out of the consumer loop.
template <typename T, int D, bool kPlain>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_ws_kernel(const PrefillParams p, const __grid_constant__ KvTensorMaps tma) {
  using L = Layout<D>;
  using QLayout = BlockSwizzle<kRows>;
  using KvLayout = BlockSwizzle<kKeys>;
  constexpr int kChunks = D / 8;
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset from smem_raw, so the compiler still knows every
  // pointer below is shared memory (LDS, not generic loads).
  T* smem = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  auto q_buffer = [&](int b) { return smem + L::kQ + b * L::kQElems; };
  auto k_stage = [&](int s) { return smem + L::kK + s * L::kTileElems; };
  auto v_stage = [&](int s) { return smem + L::kV + s * L::kTileElems; };
  int64_t(*s_rows)[kKeys] = reinterpret_cast<int64_t(*)[kKeys]>(smem + L::kEnd);
  uint64_t* k_full = reinterpret_cast<uint64_t*>(s_rows + kStages);
  uint64_t* k_empty = k_full + kStages;
  uint64_t* v_full = k_empty + kStages;
  uint64_t* v_empty = v_full + kStages;
  uint64_t* q_full = v_empty + kStages;
  uint64_t* q_empty = q_full + kQBuffers;
  int64_t* s_claim = reinterpret_cast<int64_t*>(q_empty + kQBuffers);  // [2]
  int32_t(*s_work)[kRecord] = reinterpret_cast<int32_t(*)[kRecord]>(s_claim + 2);
  int32_t* s_missing = s_work[kQBuffers];  // [kStages]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&k_full[s], kProducers);  // every producer thread
      mbarrier_init(&v_full[s], kProducers);
      mbarrier_init(&k_empty[s], kConsumers / 32);  // one arrival per consumer warp
      mbarrier_init(&v_empty[s], kConsumers / 32);
    }
    for (int b = 0; b < kQBuffers; ++b) {
      mbarrier_init(&q_full[b], kProducers);
      mbarrier_init(&q_empty[b], kConsumers / 32);
    }
    mbarrier_init_fence();
  }
  __syncthreads();  // the barriers are initialised; the producer starts at once

  if (tid >= kConsumers) {
    // Producer: per work, its record and queries into a free query buffer,
    // then tile t of it into stage g % kStages (g counts the CTA's tiles) once
    // the consumers have released that stage's previous K (then V). Thread i
    // resolves key row i; each thread copies 16-byte chunk i % kChunks of
    // rows i / kChunks + j * (kProducers / kChunks).
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegisters<D>) : "memory");  // to the consumers
    const int i = tid - kConsumers;
    static_assert(kProducers % kChunks == 0, "producers cover whole rows");
    constexpr int kRowsPerPass = kProducers / kChunks;
    static_assert(kRowsPerPass % 8 == 0, "a thread's rows share row % 8, hence one swizzle");
    const int chunk = i % kChunks;
    // A missing row (offset -1) copies nothing and zero-fills; its address is never read.
    auto copy_tile = [&](T* dst, const T* src, const int64_t* rows, uint64_t* full) {
      src += chunk * 8;
      dst += KvLayout::at(i / kChunks, chunk);  // + 8 rows keeps the swizzle: row % 8 is fixed
      // In batches of 8 rows: a batch's offsets load first, so that its copies
      // issue without waiting, and 8 int64 offsets fit the producer's 56 registers.
      constexpr int kCopies = kKeys / kRowsPerPass, kBatch = kCopies < 8 ? kCopies : 8;
#pragma unroll
      for (int j0 = 0; j0 < kCopies; j0 += kBatch) {
        int64_t offset[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) offset[j] = rows[i / kChunks + (j0 + j) * kRowsPerPass];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          cp_async_16(dst + (j0 + j) * kRowsPerPass * 64, src + offset[j], offset[j] >= 0);
        }
      }
      mbarrier_arrive_on_cp_async(full);  // completes once the copies have landed
      mbarrier_arrive(full);
    };
    // Whether x holds for any producer thread: they meet at named barrier 1 to learn it.
    auto any_producer = [](bool x) {
      int any;
      asm volatile(
          "{\n.reg .pred in, out;\nsetp.ne.s32 in, %1, 0;\n"
          "bar.red.or.pred out, 1, %2, in;\nselp.s32 %0, 1, 0, out;\n}\n"
          : "=r"(any)
          : "r"(int(x)), "n"(kProducers)
          : "memory");
      return any != 0;
    };
    const bool ragged = p.kv.kv_indices == nullptr;
    const int64_t num_items = p.num_items, num_works = num_items * p.num_kv_heads;
    // Work w is (item, KV head): items-major (w = head * num_items + item: the
    // CTAs at work at once share one head's keys in L2), or heads-inner (w =
    // item * heads + head: the plan's order holds across heads, as a fused
    // cascade's heavy shared items need).
    auto item_of = [&](int64_t w) { return p.heads_inner ? w / p.num_kv_heads : w % num_items; };
    int g = 0;       // tiles issued
    int claims = 0;  // also picks the claim's slot
    for (int j = 0;; ++j) {
      // Claim the next work with rows: thread 0 claims, the producers meet at
      // named barrier 1 to read the claim, then read its plan row. A CTA's
      // first work is its own index; later ones come from the launch's counter
      // (only when works outnumber CTAs: then the launcher zeroes it). An
      // unused plan row (request < 0) ends the items: it ends the launch
      // (heads-inner) or moves the counter to the next head. Its request is
      // read with the rest of the row, after the claim is published, not
      // before: one round trip fewer between two works (benchmarks/NOTES.md P84).
      const int64_t ctas = gridDim.x;
      int64_t w = num_works;
      const int32_t* f = nullptr;
      PrefillItem item{};
      for (;;) {
        if (i == 0) {
          const int64_t claim = claims == 0       ? int64_t(blockIdx.x)
                                : num_works > ctas ? ctas + static_cast<int64_t>(atomicAdd(p.work_counter, 1ull))
                                                   : num_works;
          s_claim[claims % 2] = min(claim, num_works);
        }
        asm volatile("bar.sync 1, %0;\n" ::"n"(kProducers) : "memory");
        w = s_claim[claims++ % 2];  // thread 0 rewrites this slot two claims on, past another bar.sync
        if (w >= num_works) break;
        f = p.items + item_of(w) * kPfItemFields;
        item = read_prefill_item(p, f, kRows);
        if (item.rows > 0) break;
        if (f[kPfRequest] < 0) {  // an unused plan row
          if (p.heads_inner) {
            w = num_works;
            break;
          }
          const int64_t head_end = (w / num_items + 1) * num_items;
          if (i == 0 && num_works > ctas && head_end > ctas) {
            atomicMax(p.work_counter, static_cast<unsigned long long>(head_end - ctas));
          }
        }
      }
      const int qb = j % kQBuffers;
      if (j >= kQBuffers) mbarrier_wait(&q_empty[qb], ((j / kQBuffers) - 1) & 1);
      const bool done = w >= num_works;
      const int kv_head = done ? -1 : static_cast<int>(p.heads_inner ? w % p.num_kv_heads : w / num_items);
      if (i < kPfItemFields) s_work[qb][i] = done ? 0 : f[i];
      if (i == kPfItemFields) s_work[qb][i] = kv_head;
      const int num_tiles = done ? 0 : item.num_tiles(kKeys);
      if (num_tiles > 0) {
        // Query rows. Rows past the valid ones keep whatever the buffer held:
        // each output row depends on its own query row alone, and only valid
        // rows are written. (A decode-shaped work copies 4 rows, not 128.)
        T* s_q = q_buffer(qb);
        const int group = item.group, rows = item.rows;
        for (int r = i / kChunks; r < rows; r += kRowsPerPass) {
          const int packed = item.row_begin + r;
          const T* q = static_cast<const T*>(p.q) +
                       ((item.q_begin + packed / group) * p.num_qo_heads + kv_head * group + packed % group) * D;
          cp_async_16(s_q + QLayout::at(r, chunk), q + chunk * 8, true);
        }
        mbarrier_arrive_on_cp_async(&q_full[qb]);
      }
      mbarrier_arrive(&q_full[qb]);
      if (done) return;

      const T* k_base = static_cast<const T*>(p.kv.k) + kv_head * p.kv.stride_head;
      const T* v_base = static_cast<const T*>(p.kv.v) + kv_head * p.kv.stride_head;
      const bool tma_ok = tma.box_rows > 0 && (ragged || item.kv_lo % tma.box_rows == 0);
      // A tile without missing rows, by TMA: the thread at the head of each box
      // (thread 0 of a ragged tile, the first row of each page) copies its rows
      // of every 64-column block; the others only arrive.
      auto tma_tile = [&](T* dst, const CUtensorMap* map, uint64_t* full, int pos) {
        if (i % tma.box_rows != 0) {
          mbarrier_arrive(full);
          return;
        }
        mbarrier_arrive_expect_tx(full, tma.box_rows * D * sizeof(T));
        // Ragged: the key row; paged: the page (pos is its first slot, as kv_lo is page-aligned).
        const int64_t entry = item.kv_begin + (ragged ? pos : pos / tma.box_rows);
        const int index = ragged ? int(entry) : p.kv.kv_indices[entry];
#pragma unroll
        for (int b = 0; b < D / 64; ++b) {
          T* box = dst + b * kKeys * 64 + i * 64;  // rows i.. of column block b
          if (ragged) {
            tma_load_3d(box, map, full, b * 64, kv_head, index);
          } else {
            tma_load_4d(box, map, full, b * 64, 0, kv_head, index);
          }
        }
      };
      // A work's leading tiles whose 128 keys lie in consecutive rows of the
      // cache, all present: no key is missing, so thread 0 copies each by TMA
      // without the rows resolved (the masks then see only that none is -1)
      // and without the producers' meeting. Loops of their own: a branch in the
      // other loop made the producer spill and slowed paged works, and one loop
      // for ragged and paged runs slowed ragged works (benchmarks/NOTES.md P76, P80).
      auto whole_tile = [&](T* dst, const CUtensorMap* map, uint64_t* full, int row) {
        if (i != 0) {
          mbarrier_arrive(full);
          return;
        }
        mbarrier_arrive_expect_tx(full, kKeys * D * sizeof(T));
#pragma unroll
        for (int b = 0; b < D / 64; ++b) tma_load_3d(dst + b * kKeys * 64, map, full, b * 64, kv_head, row);
      };
      auto whole_stage = [&](int row) {
        const int s = g % kStages;
        const uint32_t reuse_parity = ((g / kStages) - 1) & 1;
        if (g >= kStages) mbarrier_wait(&k_empty[s], reuse_parity);
        s_rows[s][i] = 0;
        if (i == 0) s_missing[s] = 0;
        whole_tile(k_stage(s), &tma.k, &k_full[s], row);
        if (g >= kStages) mbarrier_wait(&v_empty[s], reuse_parity);
        whole_tile(v_stage(s), &tma.v, &v_full[s], row);
      };
      int tile = 0;
      if (ragged && tma_ok && item.kv_begin + item.kv_lo >= 0) {
        // Ragged: the tiles inside the request's rows and the cache.
        const int64_t end = min(int64_t(item.kv_hi), min(item.kv_end, int64_t(p.kv.num_pages)) - item.kv_begin);
        const int whole_tiles = static_cast<int>(max(end - item.kv_lo, int64_t(0)) / kKeys);
        for (; tile < whole_tiles; ++tile, ++g) whole_stage(static_cast<int>(item.kv_begin + item.kv_lo + tile * kKeys));
      }
      if (!ragged && tma.row_pages) {
        // Paged (tma.row_pages): the tiles whose pages run consecutively through
        // the cache, as pages allocated in order do. The producers check the
        // work's page-table entries as the tiles reach them, thread i entry
        // entry0 + checked + i, and meet to learn whether all are in order:
        // 128 entries at a time, then, once such a check fails, one tile's
        // entries at a time; the first tile whose check fails ends the run,
        // and the other loop takes the rest.
        const int page_size = p.kv.page_size;
        const int64_t entry0 = item.kv_begin + item.kv_lo / page_size;              // key kv_lo's page
        const int64_t last = item.kv_begin + (int64_t(item.kv_hi) - 1) / page_size;  // the work's last page
        const int tile_entries = min(kKeys / page_size + 2, kProducers);            // covers a tile's pages
        int span = kProducers;  // entries a check covers
        int64_t checked = 0;    // entries from entry0 found in order
        int64_t first_row = 0;  // key kv_lo's row
        bool in_run = true;
        for (; tile < num_tiles; ++tile, ++g) {
          const int64_t end = int64_t(item.kv_lo) + (tile + 1) * kKeys;  // past the tile's last key
          if (end > item.kv_hi) break;  // a short last tile: the other loop masks it
          while (end > (item.kv_lo / page_size + checked) * page_size) {
            const int64_t entry = entry0 + checked + i;
            bool bad = false;
            if (i < span && entry <= last) {
              // entry0 <= entry: both in the table only if entry is.
              bad = entry >= item.kv_end;
              if (!bad) {
                const int64_t page0 = p.kv.kv_indices[entry0], page = p.kv.kv_indices[entry];
                bad = page0 < 0 || page != page0 + checked + i || page >= p.kv.num_pages;
                first_row = page0 * page_size + item.kv_lo % page_size;
              }
            }
            if (!any_producer(bad)) {
              checked += span;
            } else if (span > tile_entries) {
              span = tile_entries;
            } else {
              in_run = false;
              break;
            }
          }
          if (!in_run) break;
          whole_stage(static_cast<int>(first_row + tile * kKeys));
        }
      }
      for (; tile < num_tiles; ++tile, ++g) {
        const int s = g % kStages;
        const uint32_t reuse_parity = ((g / kStages) - 1) & 1;
        if (g >= kStages) mbarrier_wait(&k_empty[s], reuse_parity);
        // The consumers also read s_rows[s] and s_missing[s] (masks) before releasing K.
        const int pos = item.kv_lo + tile * kKeys + i;
        const int64_t offset = pos < item.kv_hi ? p.kv.row_offset(item.kv_begin, item.kv_end, pos) : -1;
        s_rows[s][i] = offset;
        // Named barrier 1 over the producers: the rows are written, and whether any is missing.
        const int missing = any_producer(offset < 0);
        if (i == 0) s_missing[s] = missing;
        const bool by_tma = tma_ok && !missing;
        if (by_tma) {
          tma_tile(k_stage(s), &tma.k, &k_full[s], pos);
        } else {
          copy_tile(k_stage(s), k_base, s_rows[s], &k_full[s]);
        }
        if (g >= kStages) mbarrier_wait(&v_empty[s], reuse_parity);
        if (by_tma) {
          tma_tile(v_stage(s), &tma.v, &v_full[s], pos);
        } else {
          copy_tile(v_stage(s), v_base, s_rows[s], &v_full[s]);
        }
      }
    }
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegisters<D>) : "memory");

  // Consumers: per work, S = Q K^T, variant and softmax, release K, O += P V,
  // release V for each tile; then release the queries and write the rows.
  const AttentionVariant var = kPlain ? AttentionVariant::plain(p.variant.sm_scale, p.variant.causal) : p.variant;
  const uint8_t* custom_mask = kPlain ? nullptr : p.custom_mask;
  const uint64_t k_desc = wgmma_desc(k_stage(0), 16, 1024), v_desc = wgmma_desc(v_stage(0), kKeys * 128, 1024);
  constexpr uint64_t kStageStep = wgmma_desc_step<T>(L::kTileElems);
  // Broadcast from lane 0, so that ptxas knows the warpgroup is warp-uniform and
  // keeps the query descriptors in uniform registers (else an R2UR per S wgmma).
  const int warpgroup = __shfl_sync(0xffffffff, warp / 4, 0);
  auto wait_full = [&](uint64_t* full, int g) {
    mbarrier_wait(&full[g % kStages], (g / kStages) & 1);
    fence_async_shared();  // the cp.async (generic proxy) data, now read by wgmma
  };
  auto release = [&](uint64_t* empty) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(empty);  // this warp is done with it
  };
  // The two warpgroups meet after issuing S and before issuing P V, warpgroup 1
  // one meeting behind: so each one's softmax runs while the other's MMAs do
  // (Mosaic GPU's schedule; 0-5% faster at D = 128 than letting them drift, 1%
  // slower at 16 x 1024: benchmarks/NOTES.md P49). Meeting k of each warpgroup
  // (the same sequence in both) is at named barrier 2 + k % 2. So warpgroup 0
  // may arrive at its next meeting without waiting as a work's last P V is done
  // ("prepaid"): warpgroup 1, waiting there to issue its last P V, does not then
  // also wait out warpgroup 0's epilogue, and the epilogues overlap (NOTES P59).
  // Alternating barriers keep an early arrival from completing a later meeting:
  // warpgroup 0's next blocking meeting uses the other barrier, and it pays
  // ahead only after a work with tiles, so it is never two arrivals ahead.
  // Immediate barrier ids (a warp-uniform branch): with a register id ptxas
  // reserves all 16 named barriers.
  auto meet = [](int barrier) {
    if (barrier == 2) {
      asm volatile("bar.sync 2, %0;\n" ::"n"(kConsumers) : "memory");
    } else {
      asm volatile("bar.sync 3, %0;\n" ::"n"(kConsumers) : "memory");
    }
  };
  auto pay_ahead = [](int barrier) {
    if (barrier == 2) {
      asm volatile("bar.arrive 2, %0;\n" ::"n"(kConsumers) : "memory");
    } else {
      asm volatile("bar.arrive 3, %0;\n" ::"n"(kConsumers) : "memory");
    }
  };
  int parity = 0;        // of the current work's first meeting
  bool prepaid = false;  // warpgroup 0 has arrived at the current work's first meeting
  if (warpgroup == 1) {  // warpgroup 1 starts a meeting behind ...
    meet(2);
    parity = 1;
  }
  int g = 0;  // tiles consumed
  for (int j = 0;; ++j) {
    const int qb = j % kQBuffers;
    mbarrier_wait(&q_full[qb], (j / kQBuffers) & 1);
    const int kv_head = s_work[qb][kPfItemFields];
    if (kv_head < 0) {
      if (warpgroup == 0 && !prepaid) meet(2 + parity);  // ... and warpgroup 0 ends one behind
      break;
    }
    const PrefillItem item = read_prefill_item(p, s_work[qb], kRows);
    const int num_tiles = item.num_tiles(kKeys), kv_lo = item.kv_lo;
    fence_async_shared();  // the queries came by cp.async; wgmma reads them
    const ThreadRows mine = thread_rows(item, kv_head);
    prefetch_merge_state<T, D>(p, item, mine);
    // This warpgroup's 64 rows: 8 KB into each block of the query tile.
    const uint64_t q_desc = wgmma_desc(q_buffer(qb) + warpgroup * 64 * 64, 16, 1024);
    float o[D / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    // A work without key tiles still meets once: else warpgroup 0 could wait in
    // the next work for the query buffer that warpgroup 1 frees only after meeting it.
    if (num_tiles == 0) {
      if (!prepaid) meet(2 + parity);
      parity ^= 1;
    }
    const int after_s = 2 + parity, before_pv = 3 - parity;  // a tile's two meetings
    for (int tile = 0; tile < num_tiles; ++tile, ++g) {
      const int s = g % kStages;
      wait_full(k_full, g);
      float sc[kKeys / 8][4];
      wgmma_scores<T, D, kRows, kKeys, /*kWait=*/false>(sc, q_desc, k_desc + s * kStageStep);
      if (tile > 0 || !prepaid) meet(after_s);
      wgmma_wait<0>();
      wgmma_fence_operands(sc);
      // The masks read the producer's row offsets and missing flag; then K is
      // free, and the producer hears so before the softmax runs.
      softmax_tile<kKeys>(sc, m, l, o, var, custom_mask, p.mask_len, item, mine, kv_lo + tile * kKeys,
                          s_missing[s] != 0, s_rows[s], [&] { warp_arrive_before(&k_empty[s], sc[0][0]); });

      uint32_t p_frag[kKeys / 16][4];
      pack_probabilities<T, kKeys>(sc, p_frag);
      wait_full(v_full, g);
      meet(before_pv);
      wgmma_attend<T, D, kKeys>(o, p_frag, v_desc + s * kStageStep);
      release(&v_empty[s]);
    }
    prepaid = warpgroup == 0 && num_tiles > 0;
    if (prepaid) pay_ahead(2 + parity);
    release(&q_empty[qb]);
    if (p.partial_o == nullptr && p.merge_o == nullptr) {
      write_rows_plain<T, D>(p, item, mine, o, m, l);
    } else {
      write_rows<T, D>(p, item, mine, o, m, l);
    }
  }
}

}  // namespace prefill_ws_detail
}  // namespace jaxinfer
