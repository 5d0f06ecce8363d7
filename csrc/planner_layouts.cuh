// Layouts A, B and C of planner.h: each measured (predicted makespan, the
// longest list), then the best one written. Included by planner.cuh.
#pragma once

namespace tmla::plan {

struct Measure {
  int64_t makespan = kNever;
  int64_t longest = 0;
  int64_t slots = 0;
  int64_t counters = 0;
};

// Ends list `sm` at position `pos` (an all-zero row) unless it is full.
TMLA_HD inline void StoreStop(const PlannerParams& p, int64_t sm,
                              int64_t pos) {
  if (pos >= p.capacity) return;
  int32_t* row =
      p.instructions + (sm * p.capacity + pos) * isa::kInstructionWords;
  for (int f = 0; f < isa::kInstructionWords; ++f) row[f] = 0;
}

// Layout A: makespan.py's _split (the smallest end time T whose fewest
// pieces fit the SMs one per SM) and _one_per_sm. Needs n <= S.
TMLA_HD inline Measure MeasureA(const Ctx& c, const Items& it,
                                const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  int64_t local = 0;
  for (int i = c.tid; i < n; i += c.nt) local = Max64(local, s.pages[i]);
  const int64_t max_pages = BlockMax(c, local, s.cell);
  const int top = static_cast<int>(
      Max64(1, Min64(S - n + 1, max_pages)));
  const int entries = n * top;
  for (int e = c.tid; e < entries; e += c.nt) {
    const int i = e / top;
    s.best[e] = PathA(p, s.pages[i], it.page_ns(i), it.rows(i), e % top + 1);
  }
  Sync();
  // Prefix minimum along each item's row (ping-pong Hillis-Steele).
  int64_t* src = s.best;
  int64_t* dst = s.best2;
  for (int off = 1; off < top; off <<= 1) {
    for (int e = c.tid; e < entries; e += c.nt) {
      dst[e] = e % top >= off ? Min64(src[e], src[e - off]) : src[e];
    }
    Sync();
    int64_t* t = src;
    src = dst;
    dst = t;
  }
  const int64_t* best = src;
  int64_t lo = kLowest, hi = kLowest;
  for (int i = c.tid; i < n; i += c.nt) {
    lo = Max64(lo, best[i * top + top - 1]);
    hi = Max64(hi, best[i * top]);
  }
  lo = BlockMax(c, lo, s.cell);
  hi = BlockMax(c, hi, s.cell + 1);
  // Smallest T >= lo with at most S - n entries above it.
  auto above = [&](int64_t t) {
    int64_t count = 0;
    for (int e = c.tid; e < entries; e += c.nt) count += best[e] > t;
    return BlockSum(c, count, s.cell + 2);
  };
  if (above(lo) > S - n) {
    ++lo;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (above(mid) <= S - n) hi = mid; else lo = mid + 1;
    }
  }
  const int64_t end = lo;
  int64_t makespan = kLowest, cut = 0;
  for (int i = c.tid; i < n; i += c.nt) {
    // Rows do not increase: count the leading entries above T.
    int a = 0, b = top;
    while (a < b) {
      const int mid = (a + b) / 2;
      if (best[i * top + mid] > end) a = mid + 1; else b = mid;
    }
    const int64_t k = a + 1;
    s.k_a[i] = s.start_a[i] = k;
    s.slot_a[i] = k > 1 ? k : 0;
    s.ctr_a[i] = k > 1;
    cut += k > 1;
    makespan = Max64(makespan, best[i * top + a]);
  }
  Measure m;
  m.makespan = BlockMax(c, makespan, s.cell);
  m.longest = BlockSum(c, cut, s.cell) > 0 ? 2 : 1;
  Scan(c, s.start_a, n, s.tmp);
  Scan(c, s.slot_a, n, s.tmp);
  Scan(c, s.ctr_a, n, s.tmp);
  m.slots = s.slot_a[n - 1];
  m.counters = s.ctr_a[n - 1];
  return m;
}

TMLA_HD inline void EmitA(const Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n;
  const int64_t pieces = s.start_a[n - 1];
  for (int sm = c.tid; sm < p.num_sms; sm += c.nt) {
    if (sm >= pieces) {
      StoreStop(p, sm, 0);
      continue;
    }
    const int i = UpperBound(s.start_a, n, sm);
    const int64_t k = s.k_a[i], j = sm - (s.start_a[i] - k);
    const int64_t pages = s.pages[i];
    const bool cut = k > 1;
    const int64_t slot0 = s.slot_a[i] - (cut ? k : 0);
    const int64_t ctr0 = s.ctr_a[i] - cut;
    const int64_t page0 = j * pages / k, page1 = (j + 1) * pages / k;
    Piece(it, s, i, page0, page1, cut ? slot0 + j : isa::kFinalOutput,
          cut ? ctr0 : isa::kNoCounter,
          p.partial_fixed_ns + (page1 - page0) * it.page_ns(i))
        .Store(p, sm, 0);
    const int64_t runs = Min64(k, it.rows(i)), run = k - 1 - j;
    int64_t next = 1;
    if (cut && run < runs) {
      int64_t cost;
      MergeRun(it, i, run, runs, k, slot0, ctr0, &cost).Store(p, sm, 1);
      next = 2;
    }
    StoreStop(p, sm, next);
  }
}

// Layout B: balanced.cut (cost units of 1 ns), each cut item of k pieces
// merged by c = max(1, min(k - 1, rows)) REDUCEs of all k inputs, run j on
// the SM of piece k - 1 - j (never the first piece's SM), after that SM's
// PARTIALs. A piece other than an item's first is the first on its SM and
// an item's pieces lie on increasing SMs, so an SM holds at most one REDUCE.
TMLA_HD inline Measure MeasureB(const Ctx& c, const Items& it,
                                const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  const int64_t fu = Max64(1, p.partial_fixed_ns);
  auto pu = [&](int i) { return Max64(1, it.page_ns(i)); };
  int64_t local = 0;
  for (int i = c.tid; i < n; i += c.nt) local += fu + s.pages[i] * pu(i);
  const int64_t floor =
      CeilDiv(BlockSum(c, local, s.cell), int64_t{kAlpha} * n);
  auto weight = [&](int i) { return Max64(fu + s.pages[i] * pu(i), floor); };
  for (int i = c.tid; i < n; i += c.nt) s.wend[i] = weight(i);
  Sync();
  Scan(c, s.wend, n, s.tmp);
  const int64_t quota = CeilDiv(s.wend[n - 1], S);
  for (int i = c.tid; i < n; i += c.nt) {
    const int64_t w = weight(i);
    s.sm0[i] = (s.wend[i] - w + Min64(fu, w - 1)) / quota;
    s.k_b[i] = 1;
  }
  // Run boundaries: the item each one falls in and the page it cuts at.
  for (int t = c.tid; t < S - 1; t += c.nt) {
    const int64_t bound = (t + 1) * quota;
    const int inside = UpperBound(s.wend, n, bound);
    const int ic = inside < n ? inside : n - 1;
    const int64_t begin = s.wend[ic] - weight(ic);
    const int64_t offset = bound - begin - fu;
    const int64_t page = offset > 0 ? CeilDiv(offset, pu(ic)) : 0;
    const int64_t smb =
        (begin + fu + Min64(page, Max64(s.pages[ic] - 1, 0)) * pu(ic)) /
        quota;
    s.b_ic[t] = ic;
    s.b_cut[t] = page;
    s.b_smb[t] = smb;
    s.b_valid[t] = inside < n;
  }
  Sync();
  for (int t = c.tid; t < S - 1; t += c.nt) {
    const int64_t ic = s.b_ic[t];
    s.b_eff[t] = s.b_cut[t] > 0 ? s.b_smb[t] : s.sm0[ic];
  }
  Sync();
  for (int t = c.tid; t < S - 1; t += c.nt) {
    const int64_t ic = s.b_ic[t];
    const bool same = t > 0 && s.b_ic[t - 1] == ic;
    const int64_t prev = same ? s.b_eff[t - 1] : s.sm0[ic];
    s.b_valid[t] = s.b_valid[t] && s.b_cut[t] > 0 &&
                   s.b_cut[t] < s.pages[ic] && s.b_smb[t] != prev;
  }
  Sync();
  for (int t = c.tid; t < S - 1; t += c.nt) {
    if (s.b_valid[t]) AtomicAdd(&s.k_b[s.b_ic[t]], 1);
  }
  Sync();
  for (int i = c.tid; i < n; i += c.nt) {
    const int64_t k = s.k_b[i];
    s.start_b[i] = k;
    s.slot_b[i] = k > 1 ? k : 0;
    s.ctr_b[i] = k > 1;
  }
  for (int t = c.tid; t < S - 1; t += c.nt) s.b_eff[t] = s.b_valid[t];
  Sync();
  Scan(c, s.start_b, n, s.tmp);
  Scan(c, s.slot_b, n, s.tmp);
  Scan(c, s.ctr_b, n, s.tmp);
  if (S > 1) Scan(c, s.b_eff, S - 1, s.tmp);
  // Pieces in (item, page) order, which is also SM order.
  const int pieces = static_cast<int>(s.start_b[n - 1]);
  for (int i = c.tid; i < n; i += c.nt) {
    const int64_t q = s.start_b[i] - s.k_b[i];
    s.p_item[q] = i;
    s.p_page[q] = 0;
    s.p_sm[q] = s.sm0[i];
  }
  for (int t = c.tid; t < S - 1; t += c.nt) {
    if (!s.b_valid[t]) continue;
    const int64_t q = s.b_ic[t] + s.b_eff[t];
    s.p_item[q] = s.b_ic[t];
    s.p_page[q] = s.b_cut[t];
    s.p_sm[q] = s.b_smb[t];
  }
  Sync();
  for (int q = c.tid; q < pieces; q += c.nt) {
    const int i = static_cast<int>(s.p_item[q]);
    const bool last = q == s.start_b[i] - 1;
    const int64_t end = last ? s.pages[i] : s.p_page[q + 1];
    s.p_end[q] = p.partial_fixed_ns + (end - s.p_page[q]) * it.page_ns(i);
  }
  for (int sm = c.tid; sm <= S; sm += c.nt) {
    s.first_b[sm] = LowerBound(s.p_sm, pieces, sm);
  }
  Sync();
  Scan(c, s.p_end, pieces, s.tmp);
  auto before = [&](int64_t q) { return q > 0 ? s.p_end[q - 1] : 0; };
  for (int sm = c.tid; sm < S; sm += c.nt) {
    s.load[sm] = before(s.first_b[sm + 1]) - before(s.first_b[sm]);
  }
  for (int i = c.tid; i < n; i += c.nt) {
    int64_t ready = 0;
    for (int64_t q = s.start_b[i] - s.k_b[i]; q < s.start_b[i]; ++q) {
      ready = Max64(ready, s.p_end[q] - before(s.first_b[s.p_sm[q]]));
    }
    s.ready_b[i] = ready;
  }
  Sync();
  int64_t makespan = 0, longest = 0;
  for (int sm = c.tid; sm < S; sm += c.nt) {
    int64_t end = s.load[sm], run = 0;
    const int64_t q = s.first_b[sm];
    if (q < s.first_b[sm + 1]) {
      const int i = static_cast<int>(s.p_item[q]);
      const int64_t k = s.k_b[i], j = q - (s.start_b[i] - k);
      const int64_t runs = Max64(1, Min64(k - 1, it.rows(i)));
      if (j >= 1 && k - 1 - j < runs) {
        int64_t cost;
        MergeRun(it, i, k - 1 - j, runs, k, 0, 0, &cost);
        end = Max64(end, s.ready_b[i]) + cost;
        run = 1;
      }
    }
    s.run_b[sm] = run;
    makespan = Max64(makespan, end);
    longest = Max64(longest, s.first_b[sm + 1] - q + run);
  }
  Measure m;
  m.makespan = BlockMax(c, makespan, s.cell);
  m.longest = BlockMax(c, longest, s.cell);
  m.slots = s.slot_b[n - 1];
  m.counters = s.ctr_b[n - 1];
  return m;
}

TMLA_HD inline void EmitB(const Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n;
  const int pieces = static_cast<int>(s.start_b[n - 1]);
  for (int q = c.tid; q < pieces; q += c.nt) {
    const int i = static_cast<int>(s.p_item[q]);
    const int64_t k = s.k_b[i], j = q - (s.start_b[i] - k);
    const bool cut = k > 1;
    const int64_t sm = s.p_sm[q];
    const int64_t end = j == k - 1 ? s.pages[i] : s.p_page[q + 1];
    Piece(it, s, i, s.p_page[q], end,
          cut ? s.slot_b[i] - k + j : isa::kFinalOutput,
          cut ? s.ctr_b[i] - 1 : isa::kNoCounter,
          p.partial_fixed_ns + (end - s.p_page[q]) * it.page_ns(i))
        .Store(p, sm, q - s.first_b[sm]);
  }
  for (int sm = c.tid; sm < p.num_sms; sm += c.nt) {
    const int64_t q = s.first_b[sm], count = s.first_b[sm + 1] - q;
    if (s.run_b[sm]) {
      const int i = static_cast<int>(s.p_item[q]);
      const int64_t k = s.k_b[i], j = q - (s.start_b[i] - k);
      const int64_t runs = Max64(1, Min64(k - 1, it.rows(i)));
      int64_t cost;
      MergeRun(it, i, k - 1 - j, runs, k, s.slot_b[i] - k, s.ctr_b[i] - 1,
               &cost)
          .Store(p, sm, count);
    }
    StoreStop(p, sm, count + s.run_b[sm]);
  }
}

// Layout C: no cuts. Items longest first (ties by index); kLptRounds rounds
// give the next S items to the SMs by increasing load; the rest, in order,
// fill the SMs up to the lowest common level L at which their room
// sum(max(0, L - load)) holds them: item j goes to the SM whose share of
// that room contains the middle of the item.
TMLA_HD inline Measure MeasureC(const Ctx& c, const Items& it,
                                const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  constexpr uint64_t kIndexMask = 0xffffffffu;
  for (int i = c.tid; i < n; i += c.nt) {
    s.keys[i] = ((kCostKeyBase - static_cast<uint64_t>(s.cost[i])) << 32) |
                static_cast<uint64_t>(i);
  }
  for (int sm = c.tid; sm < S; sm += c.nt) s.load[sm] = s.c_cnt[sm] = 0;
  Sync();
  Sort(c, s.keys, n, NextPow2(n));
  const int head = static_cast<int>(Min64(n, int64_t{kLptRounds} * S));
  const int rounds = static_cast<int>(CeilDiv(head, S));
  for (int r = 0; r < rounds; ++r) {
    for (int sm = c.tid; sm < S; sm += c.nt) {
      const int64_t mine = s.load[sm];
      int64_t rank = 0;
      for (int t = 0; t < S; ++t) {
        rank += s.load[t] < mine || (s.load[t] == mine && t < sm);
      }
      s.rank[sm] = rank;
    }
    Sync();
    for (int sm = c.tid; sm < S; sm += c.nt) {
      const int64_t at = int64_t{r} * S + s.rank[sm];
      if (at >= head) continue;
      const int item = static_cast<int>(s.keys[at] & kIndexMask);
      s.c_sm[item] = sm;
      s.c_pos[item] = r;
      s.load[sm] += s.cost[item];
      s.c_cnt[sm] += 1;
    }
    Sync();
  }
  const int rest = n - head;
  if (rest > 0) {
    for (int j = c.tid; j < rest; j += c.nt) {
      s.t_pre[j] = s.cost[s.keys[head + j] & kIndexMask];
    }
    int64_t most = kLowest, least = kLowest;
    for (int sm = c.tid; sm < S; sm += c.nt) {
      most = Max64(most, s.load[sm]);
      least = Max64(least, -s.load[sm]);
    }
    most = BlockMax(c, most, s.cell);
    least = -BlockMax(c, least, s.cell + 1);
    Scan(c, s.t_pre, rest, s.tmp);
    const int64_t total = s.t_pre[rest - 1];
    int64_t lo = least, hi = most + total;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      int64_t room = 0;
      for (int sm = c.tid; sm < S; sm += c.nt) {
        room += Max64(0, mid - s.load[sm]);
      }
      if (BlockSum(c, room, s.cell + 2) >= total) hi = mid; else lo = mid + 1;
    }
    for (int sm = c.tid; sm < S; sm += c.nt) {
      s.room[sm] = Max64(0, lo - s.load[sm]);
    }
    Sync();
    Scan(c, s.room, S, s.tmp);
    for (int j = c.tid; j < rest; j += c.nt) {
      const int64_t cost = s.t_pre[j] - (j > 0 ? s.t_pre[j - 1] : 0);
      const int64_t middle = s.t_pre[j] - cost + cost / 2;
      s.t_sm[j] = Min64(UpperBound(s.room, S, middle), S - 1);
    }
    Sync();
    for (int sm = c.tid; sm < S; sm += c.nt) {
      const int a = LowerBound(s.t_sm, rest, sm);
      const int b = UpperBound(s.t_sm, rest, sm);
      s.rank[sm] = a;
      s.c_cnt[sm] += b - a;
      if (b > a) s.load[sm] += s.t_pre[b - 1] - (a > 0 ? s.t_pre[a - 1] : 0);
    }
    Sync();
    for (int j = c.tid; j < rest; j += c.nt) {
      const int item = static_cast<int>(s.keys[head + j] & kIndexMask);
      s.c_sm[item] = s.t_sm[j];
      s.c_pos[item] = rounds + j - s.rank[s.t_sm[j]];
    }
  }
  int64_t makespan = 0, longest = 0;
  for (int sm = c.tid; sm < S; sm += c.nt) {
    makespan = Max64(makespan, s.load[sm]);
    longest = Max64(longest, s.c_cnt[sm]);
  }
  Measure m;
  m.makespan = BlockMax(c, makespan, s.cell);
  m.longest = BlockMax(c, longest, s.cell);
  return m;
}

TMLA_HD inline void EmitC(const Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  for (int i = c.tid; i < it.n; i += c.nt) {
    Piece(it, s, i, 0, s.pages[i], isa::kFinalOutput, isa::kNoCounter,
          s.cost[i])
        .Store(p, s.c_sm[i], s.c_pos[i]);
  }
  for (int sm = c.tid; sm < p.num_sms; sm += c.nt) {
    StoreStop(p, sm, s.c_cnt[sm]);
  }
}

// The whole planner: clamp the lengths, price the items, measure the
// layouts, write the best one that fits the capacity and the info words.
TMLA_HD inline void Plan(const Ctx& c, const PlannerParams& p, char* base) {
  const int n = p.batch * p.h_kv * p.num_tiles;
  Scratch s;
  Carve(base, SizesOf(n, p.num_sms), p.batch, &s);
  const Items it{p, n};
  for (int b = c.tid; b < p.batch; b += c.nt) {
    const int32_t len = p.lengths[b];
    s.len[b] = len < 0 ? 0 : (len > p.max_seqlen ? p.max_seqlen : len);
    p.seqlens[b] = static_cast<int32_t>(s.len[b]);
  }
  Sync();
  for (int i = c.tid; i < n; i += c.nt) {
    s.pages[i] = CeilDiv(s.len[it.seq(i)], p.page_size);
    s.cost[i] = p.partial_fixed_ns + s.pages[i] * it.page_ns(i);
  }
  Sync();
  Measure m[3];
  if (n <= p.num_sms) m[0] = MeasureA(c, it, s);
  m[1] = MeasureB(c, it, s);
  m[2] = MeasureC(c, it, s);
  int pick = -1;
  for (int l = 0; l < 3; ++l) {
    if (m[l].makespan != kNever && m[l].longest <= p.capacity &&
        (pick < 0 || m[l].makespan < m[pick].makespan)) {
      pick = l;
    }
  }
  Sync();
  if (pick == 0) EmitA(c, it, s);
  if (pick == 1) EmitB(c, it, s);
  if (pick == 2) EmitC(c, it, s);
  if (pick < 0) {
    // No layout fits: empty lists, and planned lengths no call has, so the
    // decode kernel writes NaN for every sequence rather than garbage.
    for (int sm = c.tid; sm < p.num_sms; sm += c.nt) StoreStop(p, sm, 0);
    for (int b = c.tid; b < p.batch; b += c.nt) p.seqlens[b] = -1;
  }
  if (c.tid == 0) {
    const Measure& best = m[pick < 0 ? 1 : pick];
    p.info[kInfoLayout] = pick;
    p.info[kInfoLongest] = static_cast<int32_t>(best.longest);
    p.info[kInfoSlots] = static_cast<int32_t>(best.slots);
    p.info[kInfoCounters] = static_cast<int32_t>(best.counters);
    p.info[kInfoMakespanLo] = static_cast<int32_t>(best.makespan & 0xffffffff);
    p.info[kInfoMakespanHi] = static_cast<int32_t>(best.makespan >> 32);
    p.info[kInfoOverflow] = pick < 0;
    p.info[7] = 0;
  }
}

}  // namespace tmla::plan
