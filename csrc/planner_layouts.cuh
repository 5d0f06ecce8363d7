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
TMLA_HD inline Measure MeasureA(Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  const int top = static_cast<int>(Max64(1, Min64(S - n + 1, it.max_pages)));
  // best[i * top + k]: the shortest path of item i in at most k + 1 pieces
  // (prefix minimum of PathA over the piece counts), one warp per item on
  // the device. lo: the largest of the items' shortest paths.
  auto path = [&](int i, int k) {
    return PathA(p, s.pages[i], it.page_ns(i), it.rows(i), k + 1);
  };
  int64_t lo = kLowest;
#if defined(__CUDA_ARCH__)
  const int row_lane = c.tid & 31;
  for (int i = c.tid >> 5; i < n; i += c.nt >> 5) {
    int64_t carry = kNever;
    for (int base = 0; base < top; base += 32) {
      const int k = base + row_lane;
      int64_t v = Min64(k < top ? path(i, k) : kNever, carry);
      for (int off = 1; off < 32; off <<= 1) {
        const int64_t y = __shfl_up_sync(~0u, v, off);
        if (row_lane >= off) v = Min64(v, y);
      }
      if (k < top) s.best[i * top + k] = v;
      carry = __shfl_sync(~0u, v, 31);
    }
    lo = Max64(lo, carry);
  }
#else
  for (int i = 0; i < n; ++i) {
    int64_t run = kNever;
    for (int k = 0; k < top; ++k) {
      s.best[i * top + k] = run = Min64(run, path(i, k));
    }
    lo = Max64(lo, run);
  }
#endif
  lo = BlockMax(c, lo, s.red);
  const int64_t* best = s.best;
  // Leading entries of item i's row (which does not increase) above t.
  auto leading = [&](int i, int64_t t) {
    int a = 0, b = top;
    while (a < b) {
      const int mid = (a + b) / 2;
      if (best[i * top + mid] > t) a = mid + 1; else b = mid;
    }
    return a;
  };
  // T: the smallest t >= lo with at most S - n entries above it. Every
  // entry is at most the longest item's single piece (it.max_cost), so
  // that bound passes. Groups of g threads share the items so that a lane
  // makes at most about 8 probes per candidate.
  int log_top = 1;
  while ((1 << log_top) <= top) ++log_top;
  const int g = GroupFor(n, log_top, 8);
  const int64_t end = Search(c, g, lo, it.max_cost,
                             [&](int64_t t, int lane, int width) {
    int64_t count = 0;
    for (int i = lane; i < n; i += width) count += leading(i, t);
    return GroupReduce(count, 0, width).sum <= S - n;
  });
  // Item i in leading(i, T) + 1 pieces; its pieces, slots and counter.
  for (int i = c.tid; i < n; i += c.nt) s.k_a[i] = leading(i, end) + 1;
  ScanN<3>(c, {s.start_a, s.slot_a, s.ctr_a}, {n, n, n}, s.tmp,
           [&](int f, int i) -> int64_t {
             const int64_t k = leading(i, end) + 1;
             return f == 0 ? k : (f == 1 ? (k > 1 ? k : 0) : k > 1);
           });
  // Each item's path is the first entry of its row at most T, and some
  // row holds T itself (T is lo, the largest row minimum, or else an
  // entry: the count above it drops there), so the makespan is T.
  Measure m;
  m.makespan = end;
  m.longest = s.ctr_a[n - 1] > 0 ? 2 : 1;
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
    const int64_t page0 = Div64(j * pages, k);
    const int64_t page1 = Div64((j + 1) * pages, k);
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
TMLA_HD inline Measure MeasureB(Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  const int64_t fu = Max64(1, p.partial_fixed_ns);
  auto pu = [&](int i) { return Max64(1, it.page_ns(i)); };
  const int64_t floor = CeilDiv(it.work, int64_t{kAlpha} * n);
  auto weight = [&](int i) { return Max64(fu + s.pages[i] * pu(i), floor); };
  int64_t* const wend[1] = {s.wend};
  ScanN<1>(c, wend, {n}, s.tmp, [&](int, int i) { return weight(i); });
  const int64_t quota = CeilDiv(s.wend[n - 1], S);
  auto sm0 = [&](int i) {
    const int64_t w = weight(i);
    return Div64(s.wend[i] - w + Min64(fu, w - 1), quota);
  };
  for (int i = c.tid; i < n; i += c.nt) {
    s.sm0[i] = sm0(i);
    s.k_b[i] = 1;
    s.ready_b[i] = 0;
  }
  // Run boundary t: the item it falls in, the page it cuts at, the SM of
  // the piece it starts and the SM that piece counts as on (eff).
  struct Boundary {
    int ic;
    bool inside;
    int64_t cut, smb, eff;
  };
  auto boundary = [&](int t) {
    Boundary b;
    const int64_t bound = (t + 1) * quota;
    const int inside = UpperBound(s.wend, n, bound);
    b.ic = inside < n ? inside : n - 1;
    b.inside = inside < n;
    const int64_t begin = s.wend[b.ic] - weight(b.ic);
    const int64_t offset = bound - begin - fu;
    b.cut = offset > 0 ? CeilDiv(offset, pu(b.ic)) : 0;
    b.smb = Div64(
        begin + fu + Min64(b.cut, Max64(s.pages[b.ic] - 1, 0)) * pu(b.ic),
        quota);
    b.eff = b.cut > 0 ? b.smb : sm0(b.ic);
    return b;
  };
  // A boundary cuts if it falls inside an item, strictly between its
  // first and last page, and starts a piece on another SM than the
  // item's previous boundary (or its first piece).
  for (int t = c.tid; t < S - 1; t += c.nt) {
    const Boundary b = boundary(t);
    int64_t prev = sm0(b.ic);
    if (t > 0) {
      const Boundary a = boundary(t - 1);
      if (a.ic == b.ic) prev = a.eff;
    }
    s.b_ic[t] = b.ic;
    s.b_cut[t] = b.cut;
    s.b_smb[t] = b.smb;
    s.b_valid[t] = b.inside && b.cut > 0 && b.cut < s.pages[b.ic] &&
                   b.smb != prev;
  }
  Sync();
  for (int t = c.tid; t < S - 1; t += c.nt) {
    if (s.b_valid[t]) AtomicAdd(&s.k_b[s.b_ic[t]], 1);
  }
  Sync();
  // Pieces, slots and counters per item; cuts before each boundary.
  ScanN<4>(c, {s.start_b, s.slot_b, s.ctr_b, s.b_eff}, {n, n, n, S - 1},
           s.tmp, [&](int k, int i) -> int64_t {
             if (k == 3) return s.b_valid[i];
             const int64_t pieces = s.k_b[i];
             if (k == 0) return pieces;
             if (k == 1) return pieces > 1 ? pieces : 0;
             return pieces > 1;
           });
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
  for (int sm = c.tid; sm <= S; sm += c.nt) {
    s.first_b[sm] = LowerBound(s.p_sm, pieces, sm);
  }
  // p_end: each piece's end on its SM's clock (after the scan, less the
  // ends of the SMs before).
  int64_t* const p_end[1] = {s.p_end};
  ScanN<1>(c, p_end, {pieces}, s.tmp, [&](int, int q) {
    const int i = static_cast<int>(s.p_item[q]);
    const bool last = q == s.start_b[i] - 1;
    const int64_t end = last ? s.pages[i] : s.p_page[q + 1];
    return p.partial_fixed_ns + (end - s.p_page[q]) * it.page_ns(i);
  });
  auto before = [&](int64_t q) { return q > 0 ? s.p_end[q - 1] : 0; };
  for (int sm = c.tid; sm < S; sm += c.nt) {
    s.load[sm] = before(s.first_b[sm + 1]) - before(s.first_b[sm]);
  }
  // Each item's ready time: the latest end of its pieces, each on its SM's
  // clock (a piece ends at or after its SM's start, so the maximum starts
  // from 0). The device takes it over the pieces at once, not item by item:
  // one item may have a piece on every SM.
  for (int q = c.tid; q < pieces; q += c.nt) {
    AtomicMax(&s.ready_b[s.p_item[q]],
              s.p_end[q] - before(s.first_b[s.p_sm[q]]));
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
  const Reduced r = BlockReduce<true>(c, makespan, longest, s.red);
  Measure m;
  m.makespan = r.sum;
  m.longest = r.max;
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
TMLA_HD inline Measure MeasureC(Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  constexpr uint64_t kIndexMask = 0xffffffffu;
  for (int i = c.tid; i < n; i += c.nt) {
    s.keys[i] = ((kCostKeyBase - static_cast<uint64_t>(s.cost[i])) << 32) |
                static_cast<uint64_t>(i);
  }
  for (int sm = c.tid; sm < S; sm += c.nt) s.load[sm] = s.c_cnt[sm] = 0;
  Sync();
  Sort(c, s.keys, reinterpret_cast<uint64_t*>(s.c_sm), n, NextPow2(n));
  const int head = static_cast<int>(Min64(n, int64_t{kLptRounds} * S));
  const int rounds = static_cast<int>(CeilDiv(head, S));
  for (int r = 0; r < rounds; ++r) {
    // In the first round every load is 0: SM sm has rank sm.
    if (r > 0) {
      for (int sm = c.tid; sm < S; sm += c.nt) {
        const int64_t mine = s.load[sm];
        int64_t rank = 0;
        for (int t = 0; t < S; ++t) {
          rank += s.load[t] < mine || (s.load[t] == mine && t < sm);
        }
        s.rank[sm] = rank;
      }
      Sync();
    }
    for (int sm = c.tid; sm < S; sm += c.nt) {
      const int64_t at = int64_t{r} * S + (r > 0 ? s.rank[sm] : sm);
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
    const Reduced r = BlockReduce<true>(c, most, least, s.red);
    most = r.sum;
    least = -r.max;
    Scan(c, s.t_pre, rest, s.tmp);
    const int64_t total = s.t_pre[rest - 1];
    // The level: the smallest L whose room holds the rest.
    const int64_t lo = Search(c, GroupFor(S, 1, 16), least, most + total,
                              [&](int64_t level, int lane, int width) {
      int64_t room = 0;
      for (int sm = lane; sm < S; sm += width) {
        room += Max64(0, level - s.load[sm]);
      }
      return GroupReduce(room, 0, width).sum >= total;
    });
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
  const Reduced r = BlockReduce<true>(c, makespan, longest, s.red);
  Measure m;
  m.makespan = r.sum;
  m.longest = r.max;
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
TMLA_HD inline void Plan(Ctx& c, const PlannerParams& p, char* base,
                         Carry* carry) {
  const int n = p.batch * p.h_kv * p.num_tiles;
  Scratch s;
  Carve(base, SizesOf(n, p.num_sms), p.batch, &s);
  s.tmp = carry->tmp;
  s.red = carry->red;
  auto clamp = [&](int b) -> int64_t {
    const int32_t len = p.lengths[b];
    return len < 0 ? 0 : (len > p.max_seqlen ? p.max_seqlen : len);
  };
  for (int b = c.tid; b < p.batch; b += c.nt) {
    s.len[b] = clamp(b);
    p.seqlens[b] = static_cast<int32_t>(s.len[b]);
  }
  const Items shape{p, n, 0, 0, 0};
  // Items' pages and costs; layout B's work: sum(max(1, fixed) + pages *
  // max(1, page_ns)).
  int64_t max_pages = 0, work = 0;
  for (int i = c.tid; i < n; i += c.nt) {
    s.pages[i] = CeilDiv(clamp(shape.seq(i)), p.page_size);
    s.cost[i] = p.partial_fixed_ns + s.pages[i] * shape.page_ns(i);
    max_pages = Max64(max_pages, s.pages[i]);
    work += Max64(1, p.partial_fixed_ns) +
            s.pages[i] * Max64(1, shape.page_ns(i));
  }
  const Reduced r = BlockReduce(c, work, max_pages, s.red);
  // The longest sequence has an item of each tile kind, so the costliest
  // item is one of its items.
  const int64_t page_ns_most =
      p.num_tiles > 1 ? Max64(p.page_ns_full, p.page_ns_last)
                      : p.page_ns_last;
  const Items it{p, n, r.max, p.partial_fixed_ns + r.max * page_ns_most,
                 r.sum};
  Measure m[3];
  if (n <= p.num_sms) m[0] = MeasureA(c, it, s);
  m[1] = MeasureB(c, it, s);
  // With n <= S layout C puts each item alone on an SM: its measure needs
  // no assignment, which is made only if C is written.
  if (n <= p.num_sms) {
    m[2].makespan = it.max_cost;
    m[2].longest = 1;
  } else {
    m[2] = MeasureC(c, it, s);
  }
  int pick = -1;
  for (int l = 0; l < 3; ++l) {
    if (m[l].makespan != kNever && m[l].longest <= p.capacity &&
        (pick < 0 || m[l].makespan < m[pick].makespan)) {
      pick = l;
    }
  }
  // Every measure ends with a barrier after its last write.
  if (pick == 0) EmitA(c, it, s);
  if (pick == 1) EmitB(c, it, s);
  if (pick == 2) {
    if (n <= p.num_sms) MeasureC(c, it, s);
    EmitC(c, it, s);
  }
  if (pick < 0) {
    // No layout fits: empty lists, and planned lengths no call has, so the
    // decode kernel writes NaN for every sequence rather than garbage.
    for (int sm = c.tid; sm < p.num_sms; sm += c.nt) StoreStop(p, sm, 0);
    for (int b = c.tid; b < p.batch; b += c.nt) p.seqlens[b] = -1;
  }
  if (c.tid == 0) {
    const Measure best = pick == 0 ? m[0] : (pick == 2 ? m[2] : m[1]);
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
