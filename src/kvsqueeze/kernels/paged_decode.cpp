// kvsqueeze: attention of one decode step over paged per-(row, KV head) blocks, on the CPU.
//
// Reads the blocks where they are (no gather into a contiguous copy) and, for KIVI blocks, the
// packed codes directly: a key's logit is sum_c (q_c * scale_c) * code_c + sum_c q_c * min_c
// with the per-channel scales and minimums of its block; a value is rebuilt one token at a
// time. Codes are planar (quantizers/packing.py): plane p of a byte holds a contiguous run of
// channels, so unpacking vectorizes. Each (row, KV head) is split into tasks of a few hundred
// tokens that run in parallel; a task keeps its softmax maximum, sum and weighted values, merged
// per head at the end, over every tier of the layer (its KIVI tiers, then its dense one).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp with a relative error below 1e-7 (range reduction + Cephes' polynomial), written so that
// the compiler vectorizes it; -inf (a hidden token) gives exactly 0.
inline float exp_approx(float x) {
  const float low = x > -87.0f ? x : -87.0f;
  const float clamped = low < 88.0f ? low : 88.0f;
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : y * scale;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

inline float capped(float logit, float softcap) {
  return softcap > 0.f ? std::tanh(logit / softcap) * softcap : logit;
}

// Which held entries the query may see: slot >= lower[row] (left padding, sliding window).
struct Visibility {
  const int32_t* slots;  // stored slot per pool position, or nullptr (implied: first + rank)
  const int64_t* first;  // [B * H] implied slot of each head's first held entry
  const int64_t* lower;  // [B] first visible slot of each row
  int64_t heads;

  bool visible(int64_t head, int64_t position, int64_t rank) const {
    const int64_t slot = slots != nullptr ? slots[position] : first[head] + rank;
    return slot >= lower[head / heads];
  }
};

// A task: blocks [begin, end) of one head in one tier; ``rank`` is the rank of its first held
// entry among the head's entries in that tier (what an implied slot counts from).
struct Task {
  int64_t tier, head, begin, end, rank;
};

// One task's softmax state for its R query rows: maximum, sum of exps, weighted values.
struct Partial {
  std::vector<float> max, sum, acc;  // [R], [R], [R * Dv]
};

// Softmax of a task's logits [R, n] in place (exps relative to each row's maximum), filling
// part.max / part.sum; rows with nothing visible keep max = -inf.
void softmax_rows(std::vector<float>& logits, int64_t R, int64_t n, Partial& part) {
  part.max.assign(R, kNegInf);
  part.sum.assign(R, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    float* row = logits.data() + r * n;
    float m = kNegInf;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, row[t]);
    part.max[r] = m;
    if (m == kNegInf) continue;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < n; ++t) {
      row[t] = exp_approx(row[t] - m);
      s += row[t];
    }
    part.sum[r] = s;
  }
}

// Merges the tasks of each head into out [B, H, R, Dv] (a row nothing is visible to stays 0).
at::Tensor merge(const std::vector<Task>& tasks, const std::vector<Partial>& parts, int64_t B, int64_t H,
                 int64_t R, int64_t Dv) {
  auto out = at::zeros({B, H, R, Dv}, at::kFloat);
  float* o = out.data_ptr<float>();
  std::vector<float> best(B * H * R, kNegInf), total(B * H * R, 0.f);
  for (size_t i = 0; i < tasks.size(); ++i)
    for (int64_t r = 0; r < R; ++r) {
      float& b = best[tasks[i].head * R + r];
      b = std::max(b, parts[i].max[r]);
    }
  for (size_t i = 0; i < tasks.size(); ++i)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = tasks[i].head * R + r;
      if (parts[i].max[r] == kNegInf) continue;
      const float w = std::exp(parts[i].max[r] - best[row]);
      total[row] += w * parts[i].sum[r];
      axpy(w, parts[i].acc.data() + r * Dv, o + row * Dv, Dv);
    }
  for (int64_t row = 0; row < B * H * R; ++row) {
    if (total[row] <= 0.f) continue;
    const float inv = 1.f / total[row];
    for (int64_t c = 0; c < Dv; ++c) o[row * Dv + c] *= inv;
  }
  return out;
}

// Tasks over each head's blocks; ``tokens_of(head, block)`` is the number of tokens the head
// holds in its block.
template <typename BlocksOf, typename TokensOf>
void plan(int64_t tier, int64_t heads, int64_t block_size, BlocksOf blocks_of, TokensOf tokens_of,
          std::vector<Task>& tasks) {
  const int64_t step = std::max<int64_t>(1, kTokensPerTask / block_size);
  for (int64_t head = 0; head < heads; ++head) {
    int64_t rank = 0;
    const int64_t blocks = blocks_of(head);
    for (int64_t b = 0; b < blocks; ++b) {
      if (b % step == 0) tasks.push_back({tier, head, b, std::min(b + step, blocks), rank});
      rank += tokens_of(head, b);
    }
  }
}

void check_contiguous(const at::Tensor& t) { TORCH_CHECK(t.is_contiguous(), "decode takes contiguous tensors"); }

const int32_t* slots_of(const at::Tensor& slots) { return slots.numel() ? slots.data_ptr<int32_t>() : nullptr; }

// A dense tier: ``count[head]`` tokens in blocks table[head, 0 .. ceil(count / bs)).
struct Dense {
  const void* keys;
  const void* values;
  at::ScalarType dtype;
  const int64_t* table;
  const int64_t* count;
  const int32_t* slots;
  int64_t width, bs, D, Dv;

  explicit Dense(const at::Tensor& k, const at::Tensor& v, const at::Tensor& tab, const at::Tensor& cnt,
                 const at::Tensor& sl)
      : keys(k.data_ptr()), values(v.data_ptr()), dtype(k.scalar_type()), table(tab.data_ptr<int64_t>()),
        count(cnt.data_ptr<int64_t>()), slots(slots_of(sl)), width(tab.size(2)), bs(k.size(1)), D(k.size(2)),
        Dv(v.size(2)) {
    for (const at::Tensor* t : {&k, &v, &tab, &cnt, &sl}) check_contiguous(*t);
  }
  int64_t position(int64_t head, int64_t rank) const { return table[head * width + rank / bs] * bs + rank % bs; }
};

// A KIVI tier: blocks[head] blocks table[head, 0 .. blocks), each holding fill[block] tokens.
struct Kivi {
  const uint8_t *key_codes, *value_codes;
  const at::Half *key_scale, *key_min, *value_scale, *value_min;
  const int64_t *fill, *table, *blocks;
  const int32_t* slots;
  int64_t width, g, key_bytes, value_bytes, groups, group, bits;

  Kivi(const at::Tensor* t, int64_t code_bits)
      : key_codes(t[0].data_ptr<uint8_t>()), value_codes(t[1].data_ptr<uint8_t>()),
        key_scale(t[2].data_ptr<at::Half>()), key_min(t[3].data_ptr<at::Half>()),
        value_scale(t[4].data_ptr<at::Half>()), value_min(t[5].data_ptr<at::Half>()),
        fill(t[6].data_ptr<int64_t>()), table(t[7].data_ptr<int64_t>()), blocks(t[8].data_ptr<int64_t>()),
        slots(slots_of(t[10])), width(t[7].size(2)), g(t[0].size(1)), key_bytes(t[0].size(2)),
        value_bytes(t[1].size(2)), groups(t[4].size(2)), group(t[1].size(2) * (8 / code_bits) / t[4].size(2)),
        bits(code_bits) {
    for (int i = 0; i < 11; ++i) check_contiguous(t[i]);
  }
};

// Planar codes of one token (``bytes`` bytes) -> ``bytes * (8 / bits)`` floats, plane by plane.
inline void unpack(const uint8_t* packed, int64_t bytes, int64_t bits, float* out) {
  const int mask = (1 << bits) - 1;
  for (int64_t plane = 0; plane < 8 / bits; ++plane) {
    const int shift = static_cast<int>(plane * bits);
    float* run = out + plane * bytes;
#pragma omp simd
    for (int64_t k = 0; k < bytes; ++k) run[k] = static_cast<float>((packed[k] >> shift) & mask);
  }
}

// What every task reads: the query rows, the visibility rule, the scales.
struct Step {
  const float* query;  // [B * H, R, D]
  int64_t R, D, Dv;
  float scale, softcap;
};

template <typename scalar_t>
void dense_task(const Step& step, const Dense& tier, const Visibility& vis, const Task& task, Partial& part) {
  const int64_t R = step.R, D = step.D, Dv = step.Dv, bs = tier.bs;
  const scalar_t* k = static_cast<const scalar_t*>(tier.keys);
  const scalar_t* v = static_cast<const scalar_t*>(tier.values);
  const int64_t start = task.begin * bs, n = std::min(task.end * bs, tier.count[task.head]) - start;
  const float* qh = step.query + task.head * R * D;
  std::vector<float> logits(R * n, kNegInf), row(std::max(D, Dv));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t rank = start + t, position = tier.position(task.head, rank);
    if (!vis.visible(task.head, position, task.rank + t)) continue;
    const scalar_t* stored = k + position * D;
    for (int64_t c = 0; c < D; ++c) row[c] = static_cast<float>(stored[c]);
    for (int64_t r = 0; r < R; ++r) logits[r * n + t] = capped(dot(qh + r * D, row.data(), D) * step.scale, step.softcap);
  }
  softmax_rows(logits, R, n, part);
  part.acc.assign(R * Dv, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* stored = v + tier.position(task.head, start + t) * Dv;
    for (int64_t c = 0; c < Dv; ++c) row[c] = static_cast<float>(stored[c]);
    for (int64_t r = 0; r < R; ++r)
      if (logits[r * n + t] > 0.f) axpy(logits[r * n + t], row.data(), part.acc.data() + r * Dv, Dv);
  }
}

void kivi_task(const Step& step, const Kivi& tier, const Visibility& vis, const Task& task, Partial& part) {
  const int64_t R = step.R, D = step.D, Dv = step.Dv, g = tier.g;
  std::vector<int64_t> entries;  // pool position of each held token of the task
  for (int64_t b = task.begin; b < task.end; ++b) {
    const int64_t id = tier.table[task.head * tier.width + b];
    for (int64_t t = 0; t < tier.fill[id]; ++t) entries.push_back(id * g + t);
  }
  const int64_t n = static_cast<int64_t>(entries.size());
  const float* qh = step.query + task.head * R * D;
  std::vector<float> logits(R * n, kNegInf), folded(R * D), shift(R), codes(std::max(D, Dv));
  std::vector<float> block_scale(D), block_min(D);
  int64_t current = -1;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t position = entries[t], id = position / g;
    if (!vis.visible(task.head, position, task.rank + t)) continue;
    if (id != current) {  // fold the block's per-channel scales into the query, once per block
      current = id;
      for (int64_t c = 0; c < D; ++c) {
        block_scale[c] = static_cast<float>(tier.key_scale[id * D + c]);
        block_min[c] = static_cast<float>(tier.key_min[id * D + c]);
      }
      for (int64_t r = 0; r < R; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) folded[r * D + c] = qh[r * D + c] * block_scale[c];
        shift[r] = dot(qh + r * D, block_min.data(), D);
      }
    }
    unpack(tier.key_codes + position * tier.key_bytes, tier.key_bytes, tier.bits, codes.data());
    for (int64_t r = 0; r < R; ++r)
      logits[r * n + t] = capped((dot(folded.data() + r * D, codes.data(), D) + shift[r]) * step.scale, step.softcap);
  }
  softmax_rows(logits, R, n, part);
  part.acc.assign(R * Dv, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t position = entries[t];
    unpack(tier.value_codes + position * tier.value_bytes, tier.value_bytes, tier.bits, codes.data());
    for (int64_t gi = 0; gi < tier.groups; ++gi) {
      const float s = static_cast<float>(tier.value_scale[position * tier.groups + gi]);
      const float m = static_cast<float>(tier.value_min[position * tier.groups + gi]);
      float* run = codes.data() + gi * tier.group;
#pragma omp simd
      for (int64_t c = 0; c < tier.group; ++c) run[c] = run[c] * s + m;
    }
    for (int64_t r = 0; r < R; ++r)
      if (logits[r * n + t] > 0.f) axpy(logits[r * n + t], codes.data(), part.acc.data() + r * Dv, Dv);
  }
}

// The attention of one decode step over a layer: its KIVI tiers (``quantized``: 11 tensors per
// tier, see kernels/decode.py) then its dense tier. query [B, H, R, D] float32; ``lower [B]``
// the first slot each row may see; ``seen`` the layer's length (implied slots: a head's tiers
// hold the slots ending at seen - 1, in tier order). Returns [B, H, R, Dv] float32.
at::Tensor decode(const at::Tensor& query, int64_t seen, const at::Tensor& lower, double scale, double softcap,
                  const at::Tensor& keys, const at::Tensor& values, const at::Tensor& table,
                  const at::Tensor& count, const at::Tensor& slots, at::TensorList quantized,
                  at::IntArrayRef bits) {
  TORCH_CHECK(query.scalar_type() == at::kFloat, "query must be float32");
  check_contiguous(query);
  check_contiguous(lower);
  TORCH_CHECK(quantized.size() == bits.size() * 11, "11 tensors per quantized tier");
  const int64_t B = query.size(0), H = query.size(1), R = query.size(2);
  const Dense dense(keys, values, table, count, slots);
  std::vector<Kivi> tiers;
  for (size_t i = 0; i < bits.size(); ++i) tiers.emplace_back(quantized.data() + 11 * i, bits[i]);
  const Step step{query.data_ptr<float>(), R, query.size(3), dense.Dv, static_cast<float>(scale),
                  static_cast<float>(softcap)};
  // implied slot of each tier's first entry per head: the tiers hold the head's last slots in order
  const int64_t tier_count = static_cast<int64_t>(tiers.size()) + 1;
  std::vector<int64_t> firsts(tier_count * B * H);
  for (int64_t head = 0; head < B * H; ++head) {
    int64_t held = dense.count[head];
    for (size_t i = 0; i < tiers.size(); ++i) held += quantized[11 * i + 9].data_ptr<int64_t>()[head];
    int64_t first = seen - held;
    for (size_t i = 0; i < tiers.size(); ++i) {
      firsts[i * B * H + head] = first;
      first += quantized[11 * i + 9].data_ptr<int64_t>()[head];
    }
    firsts[tiers.size() * B * H + head] = first;
  }
  std::vector<Task> tasks;
  for (size_t i = 0; i < tiers.size(); ++i) {
    const Kivi& tier = tiers[i];
    plan(static_cast<int64_t>(i), B * H, tier.g, [&](int64_t head) { return tier.blocks[head]; },
         [&](int64_t head, int64_t b) { return tier.fill[tier.table[head * tier.width + b]]; }, tasks);
  }
  plan(tier_count - 1, B * H, dense.bs, [&](int64_t head) { return (dense.count[head] + dense.bs - 1) / dense.bs; },
       [&](int64_t head, int64_t b) { return std::min(dense.bs, dense.count[head] - b * dense.bs); }, tasks);
  std::vector<Partial> parts(tasks.size());
  const int64_t* low = lower.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Task& task = tasks[i];
      const bool is_dense = task.tier == tier_count - 1;
      const Visibility vis{is_dense ? dense.slots : tiers[task.tier].slots, firsts.data() + task.tier * B * H, low, H};
      if (!is_dense) {
        kivi_task(step, tiers[task.tier], vis, task, parts[i]);
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.dtype, "decode",
                                        [&] { dense_task<scalar_t>(step, dense, vis, task, parts[i]); });
      }
    }
  });
  return merge(tasks, parts, B, H, R, dense.Dv);
}

}  // namespace

TORCH_LIBRARY(kvsqueeze, m) {
  m.def(
      "decode(Tensor query, int seen, Tensor lower, float scale, float softcap, Tensor keys, Tensor values, "
      "Tensor table, Tensor count, Tensor slots, Tensor[] quantized, int[] bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvsqueeze, CPU, m) { m.impl("decode", &decode); }
