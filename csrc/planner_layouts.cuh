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

// Entry i of an inclusive scan less entry i - 1: element i itself.
TMLA_HD inline int64_t Own(const int64_t* scanned, int64_t i) {
  return scanned[i] - (i > 0 ? scanned[i - 1] : 0);
}

// Slots (layouts A and B): the pieces of each cut item in turn; counters:
// one per cut item. With pieces and cut the inclusive scans of the pieces
// per item and of "item is cut", item i's slots end at pieces - (i + 1) +
// cut.
TMLA_HD inline int64_t SlotEnd(const int64_t* pieces, const int64_t* cut,
                               int i) {
  return pieces[i] - (i + 1) + cut[i];
}

// Layout A: makespan.py's _split (the smallest end time T whose fewest
// pieces fit the SMs one per SM) and _one_per_sm. Needs n <= S.
TMLA_HD inline Measure MeasureA(Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  const int top = static_cast<int>(Max64(1, Min64(S - n + 1, it.max_pages)));
  // best[i * top + k]: the shortest path of item i in at most k + 1 pieces
  // (prefix minimum of PathA over the piece counts). A group of `lanes` lanes
  // fills a row (lanes <= top, and the groups cover the items at once where
  // they can): each lane a run of `per` piece counts, its prefix minimum,
  // then the minimum of the lanes before it (a shuffle scan). Every lane of
  // a warp takes each step, with or without an item. lo: the largest of the
  // items' shortest paths; hi: the largest entry of column kq = min(top -
  // 1, floor(spare / n)). Every entry is at most the item's cost (k = 0),
  // below 2^31.
  int32_t* best = s.best;
  const int spare = S - n, kq = MinInt(top - 1, spare / n);
  int64_t lo = kLowest, hi = kLowest;
  int lanes = kLanes;
  while (lanes > 1 && (lanes > top || int64_t{n} * lanes > c.nt)) {
    lanes >>= 1;
  }
  const int lane = c.tid & (lanes - 1), per = (top + lanes - 1) / lanes;
  const int k0 = MinInt(top, lane * per), k1 = MinInt(top, k0 + per);
  const int per_warp = kLanes / lanes;  // groups
  TMLA_NO_UNROLL
  for (int first = c.tid / kLanes * per_warp; first < n;
       first += c.nt / kLanes * per_warp) {
    const int i = first + (c.tid & (kLanes - 1)) / lanes;
    int64_t own = kNever;
    if (i < n) {
      int32_t* row = best + i * top;
      const int64_t pages = s.pages[i], page_ns = it.page_ns(i);
      const int rows = it.rows(i);
      TMLA_NO_UNROLL
      for (int k = k0; k < k1; ++k) {
        own = Min64(own, PathA(p, pages, page_ns, rows, k + 1));
        row[k] = static_cast<int32_t>(own);
      }
    }
    const int64_t before = LaneScanExclusive(own, true, lanes);
    const int64_t shortest = LastLane(Min64(own, before), lanes);
    if (i < n) {
      int32_t* row = best + i * top;
      TMLA_NO_UNROLL
      for (int k = k0; k < k1; ++k) {
        row[k] = static_cast<int32_t>(Min64(row[k], before));
      }
      lo = Max64(lo, shortest);
      if (k0 <= kq && kq < k1) hi = Max64(hi, row[kq]);
    }
  }
  // The search's first histogram (below), cleared.
  TMLA_NO_UNROLL
  for (int j = c.tid; j < kSearchBuckets; j += c.nt) s.hist[j] = 0;
  const Reduced bounds = Reduce(c, hi, lo, true, s.red);
  lo = bounds.max;
  hi = bounds.sum;
  // Leading entries of item i's row (which does not increase) above t.
  auto leading = [&](int i, int64_t t) {
    const int32_t* row = best + i * top;
    int a = 0, b = top;
    while (a < b) {
      const int mid = (a + b) >> 1;
      if (row[mid] > t) a = mid + 1; else b = mid;
    }
    return a;
  };
  // T: the smallest t >= lo with at most spare = S - n entries above it (the
  // entries above t number sum_i leading(i, t)). hi passes: each row has
  // at most kq <= spare / n entries above it. Each round splits [lo, hi] into
  // kSearchBuckets buckets of 2^shift values and tests each bucket's last
  // value but the last bucket's: every thread adds its entries to a
  // histogram of their buckets (an entry past the last bucket to the last,
  // one in the first bucket or below lo to none), and after one barrier
  // every warp sums the entries above each test, keeping the first bucket
  // whose test passes (the tests that fail come first). Three histograms
  // in turn: a round fills one, clears the next and reads the one before
  // it in the phase after its barrier.
  const int64_t entries = int64_t{n} * top;
  const int wl = c.tid & (kLanes - 1), held = kSearchBuckets / kLanes;
  int64_t end = lo;
  TMLA_NO_UNROLL
  for (int round = 0; end < hi; ++round) {
    int shift = 0;
    while ((int64_t{kSearchBuckets} << shift) <= hi - end) ++shift;
    int32_t* hist = s.hist + kSearchBuckets * (round % 3);
    int32_t* next = s.hist + kSearchBuckets * ((round + 1) % 3);
    TMLA_NO_UNROLL
    for (int j = c.tid; j < kSearchBuckets; j += c.nt) next[j] = 0;
    TMLA_NO_UNROLL
    for (int64_t e = c.tid; e < entries; e += c.nt) {
      const int64_t bucket = (best[e] - end) >> shift;
      if (bucket > 0) {
        AtomicAdd(&hist[Min64(bucket, kSearchBuckets - 1)], 1);
      }
    }
    Sync();
    int64_t own = 0;
    TMLA_NO_UNROLL
    for (int j = wl * held; j < (wl + 1) * held; ++j) own += hist[j];
    // Entries above bucket j's last value: in the buckets after it.
    int64_t above = GroupSum(own, kLanes) - LaneScan(own, false);
    int64_t fails = 0;
    TMLA_NO_UNROLL
    for (int j = (wl + 1) * held - 1; j >= wl * held; --j) {
      const int64_t t = end + ((int64_t{j} + 1) << shift) - 1;
      fails += j < kSearchBuckets - 1 && t < hi && above > spare;
      above += hist[j];
    }
    const int64_t q = GroupSum(fails, kLanes);
    hi = Min64(hi, end + ((q + 1) << shift) - 1);
    end += q << shift;
  }
  // Item i in leading(i, T) + 1 pieces; its pieces, slots and counter.
  const Run r(c, n);
  TMLA_NO_UNROLL
  for (int i = r.lo; i < r.hi; ++i) {
    const int64_t k = leading(i, end) + 1;
    s.start_a[i] = k;
    s.ctr_a[i] = k > 1;
  }
  ScanArrays(c.tid, c.nt, 2, s.start_a, n, s.ctr_a, n, nullptr, 0, nullptr,
             0, s.tmp);
  // Each item's path is the first entry of its row at most T, and some
  // row holds T itself (T is lo, the largest row minimum, or else an
  // entry: the count above it drops there), so the makespan is T.
  Measure m;
  m.makespan = end;
  m.longest = s.ctr_a[n - 1] > 0 ? 2 : 1;
  m.slots = SlotEnd(s.start_a, s.ctr_a, n - 1);
  m.counters = s.ctr_a[n - 1];
  return m;
}

TMLA_HD inline void EmitA(const Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n;
  const int64_t pieces = s.start_a[n - 1];
  TMLA_NO_UNROLL
  for (int sm = c.tid; sm < p.num_sms; sm += c.nt) {
    int64_t next = 0;
    if (sm < pieces) {
      const int i = UpperBound(s.start_a, n, sm);
      const int64_t k = Own(s.start_a, i), j = sm - (s.start_a[i] - k);
      const int64_t pages = s.pages[i];
      const bool cut = k > 1;
      const int64_t slot0 = SlotEnd(s.start_a, s.ctr_a, i) - (cut ? k : 0);
      const int64_t ctr0 = s.ctr_a[i] - cut;
      WritePiece(it, sm, 0, i, Div64(j * pages, k), Div64((j + 1) * pages, k),
                 cut ? slot0 + j : isa::kFinalOutput,
                 cut ? ctr0 : isa::kNoCounter);
      const int64_t runs = Min64(k, it.rows(i)), run = k - 1 - j;
      next = 1;
      if (cut && run < runs) {
        WriteMerge(it, sm, 1, i, run, runs, k, slot0, ctr0);
        next = 2;
      }
    }
    WriteStop(it, sm, next);
  }
}

// Layout B: balanced.cut (cost units of 1 ns), each cut item of k pieces
// merged by c = max(1, min(k - 1, rows)) REDUCEs of all k inputs, run j on
// the SM of piece k - 1 - j (never the first piece's SM), after that SM's
// PARTIALs. A piece other than an item's first is the first on its SM and
// an item's pieces lie on increasing SMs, so an SM holds at most one REDUCE,
// and a cut item's first piece is the last on its SM: it ends with its SM's
// PARTIALs, the item's other pieces each after its own cost.
//
TMLA_HD inline Measure MeasureB(Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  // Prices are at least 1 (the page prices are checked when decoded).
  const int64_t fu = Max64(1, p.partial_fixed_ns);
  const int64_t floor = CeilDiv(it.work, int64_t{kAlpha} * n);
  // Weights, scanned: each item's run ends at wend.
  const Run ri(c, n);
  TMLA_NO_UNROLL
  for (int i = ri.lo; i < ri.hi; ++i) {
    s.wend[i] = Max64(fu + s.pages[i] * it.page_ns(i), floor);
    s.cuts_b[i] = 0;
    s.ready_b[i] = 0;
  }
  Scan1(c, s.wend, n, s.tmp);
  const int64_t quota = CeilDiv(s.wend[n - 1], S);
  // SM of item i's first piece: the one whose run holds its start plus the
  // fixed cost (all of the item, if lighter).
  auto sm0 = [&](int i) {
    const int64_t w = Own(s.wend, i);
    return Div64(s.wend[i] - w + Min64(fu, w - 1), quota);
  };
  // Run boundary t: the item it falls in (ic), the page it cuts at (-1 for
  // a boundary past every item: it never cuts), the SM of the piece it
  // starts (smb) and the SM that piece counts as on (eff).
  struct Boundary {
    int ic;
    int32_t cut, smb, eff;
  };
  auto place = [&](int t) {
    const int64_t bound = (t + 1) * quota;
    const int at = UpperBound(s.wend, n, bound);
    const int ic = at < n ? at : n - 1;
    const int64_t pu = it.page_ns(ic);
    const int64_t begin = s.wend[ic] - Own(s.wend, ic);
    const int64_t offset = bound - begin - fu;
    const int64_t cut = offset > 0 ? CeilDiv(offset, pu) : 0;
    const int64_t smb = Div64(
        begin + fu + Min64(cut, Max64(s.pages[ic] - 1, 0)) * pu, quota);
    return Boundary{ic, static_cast<int32_t>(at < n ? cut : -1),
                    static_cast<int32_t>(smb),
                    static_cast<int32_t>(cut > 0 ? smb : sm0(ic))};
  };
  // A boundary cuts if it falls inside an item, strictly between its first
  // and last page, and starts a piece on another SM than the item's
  // previous boundary (or its first piece). Each thread places the
  // boundary before its run itself, so no barrier parts the two steps.
  const Run rb(c, S - 1);
  Boundary before{-1, 0, 0, 0};
  if (rb.lo > 0 && rb.lo < rb.hi) before = place(rb.lo - 1);
  TMLA_NO_UNROLL
  for (int t = rb.lo; t < rb.hi; ++t) {
    const Boundary b = place(t);
    s.b_ic[t] = b.ic;
    s.b_cut[t] = b.cut;
    s.b_smb[t] = b.smb;
    const int64_t prev = before.ic == b.ic ? before.eff : sm0(b.ic);
    const bool valid = b.cut > 0 && b.cut < s.pages[b.ic] && b.smb != prev;
    if (valid) AtomicAdd(&s.cuts_b[b.ic], 1);
    s.b_cuts[t] = valid;
    before = b;
  }
  Sync();
  // Pieces and cut items up to each item; cuts up to each boundary.
  TMLA_NO_UNROLL
  for (int i = ri.lo; i < ri.hi; ++i) {
    s.start_b[i] = 1 + s.cuts_b[i];
    s.ctr_b[i] = s.cuts_b[i] > 0;
  }
  ScanArrays(c.tid, c.nt, 3, s.start_b, n, s.ctr_b, n, s.b_cuts, S - 1,
             nullptr, 0, s.tmp);
  // Pieces in (item, page) order, which is also SM order: item i's first
  // piece, then a piece per cutting boundary t (of its item's pieces, the
  // number of cutting boundaries up to t).
  const int pieces = static_cast<int>(s.start_b[n - 1]);
  auto first_piece = [&](int i) {
    return static_cast<int>(s.start_b[i] - Own(s.start_b, i));
  };
  TMLA_NO_UNROLL
  for (int x = c.tid; x < n + S - 1; x += c.nt) {
    const bool first = x < n;
    const int t = x - n;
    if (!first && !Own(s.b_cuts, t)) continue;
    const int i = first ? x : s.b_ic[t];
    const int q = first ? first_piece(i) : i + static_cast<int>(s.b_cuts[t]);
    s.p_item[q] = i;
    s.p_page[q] = first ? 0 : s.b_cut[t];
    s.p_sm[q] = static_cast<int32_t>(first ? sm0(i) : s.b_smb[t]);
  }
  Sync();
  // Each SM's pieces and load; each item's latest end of a piece other
  // than its first (each first on its SM: it ends after its cost).
  TMLA_NO_UNROLL
  for (int sm = c.tid; sm < S; sm += c.nt) {
    const int q0 = LowerBound(s.p_sm, pieces, sm);
    const int q1 = LowerBound(s.p_sm, pieces, sm + 1);
    s.first_b[sm] = q0;
    if (sm == S - 1) s.first_b[S] = q1;
    int64_t load = 0;
    TMLA_NO_UNROLL
    for (int q = q0; q < q1; ++q) {
      const int i = s.p_item[q];
      const bool last = q == s.start_b[i] - 1;
      const int64_t cost =
          it.piece_ns(i, s.p_page[q], last ? s.pages[i] : s.p_page[q + 1]);
      load += cost;
      if (q == q0 && q > first_piece(i)) {
        AtomicMax(&s.ready_b[i], static_cast<int32_t>(cost));
      }
    }
    s.load[sm] = load;
  }
  Sync();
  int64_t makespan = 0, longest = 0;
  TMLA_NO_UNROLL
  for (int sm = c.tid; sm < S; sm += c.nt) {
    const int q = s.first_b[sm], count = s.first_b[sm + 1] - q;
    int64_t end = s.load[sm], run = 0;
    if (count > 0) {
      const int i = s.p_item[q];
      const int64_t k = Own(s.start_b, i), j = q - first_piece(i);
      const int64_t runs = Max64(1, Min64(k - 1, it.rows(i)));
      if (j >= 1 && k - 1 - j < runs) {
        // The item is ready when its last piece ends: the first piece with
        // its SM's PARTIALs, the others each after its own cost.
        const int64_t ready =
            Max64(s.ready_b[i], s.load[s.p_sm[first_piece(i)]]);
        int64_t lo, num;
        end = Max64(end, ready) + it.run_ns(i, k - 1 - j, runs, k, &lo, &num);
        run = 1;
      }
    }
    s.run_b[sm] = static_cast<int32_t>(run);
    makespan = Max64(makespan, end);
    longest = Max64(longest, count + run);
  }
  const Reduced r = Reduce(c, makespan, longest, true, s.red);
  Measure m;
  m.makespan = r.sum;
  m.longest = r.max;
  m.slots = SlotEnd(s.start_b, s.ctr_b, n - 1);
  m.counters = s.ctr_b[n - 1];
  return m;
}

// A lower bound of MeasureB's makespan, from one item of the longest
// sequence, its first tile: P = it.max_pages pages at price u each, r rows.
// In k pieces the item ends no earlier than
//   path(1) = its cost, fixed + P u (its SM's load), and for k >= 2
//   path(k) = fixed + ceil(P / k) u + reduce_fixed + k input_ns[ceil(r / c)]:
// its longest piece holds at least ceil(P / k) pages and every piece is in
// the item's ready time (a piece but the first is the first on its SM: it
// ends at its own cost; the first ends with its SM's load), and of its
// c = max(1, min(k - 1, r)) REDUCE runs, each placed after the ready time,
// one has ceil(r / c) rows. So the makespan is at least the least path(k)
// over the k that B can give the item, which the quota bounds. With
// fu = max(1, fixed), the item's run of weights starts at some w0 and its
// pieces after the first start at the boundaries (t + 1) q inside (a, a +
// L], a = w0 + fu and L = (P - 1) u (a boundary cuts at page ceil(((t + 1)
// q - a) / u), which must be in (0, P)); q = ceil(W / S) with W the weights'
// sum, between the items' work (sum of fu + pages price) and that plus n
// floors (floor = ceil(work / (kAlpha n)), as in MeasureB): q_lo <= q <=
// q_hi. Such an interval holds at most ceil(L / q) multiples of q, and the
// pages cut are distinct: k <= min(1 + ceil(L / q_lo), P, S). If u <= q_lo,
// each of those boundaries cuts: its piece starts at a + (cut) u in
// [(t + 1) q, (t + 1) q + u), on SM t + 1, where the item's previous piece
// is on SM t at most (the one of the boundary before it, or the first
// piece, which starts below (t + 1) q); (a, a + L] holds at least
// floor(L / q) multiples, so k >= 1 + floor(L / q_hi). Groups of kLanes
// lanes share the k (every warp computes the bound; no barrier).
TMLA_HD inline int64_t LowerBoundB(const Ctx& c, const Items& it) {
  const PlannerParams& p = it.p;
  const int n = it.n;
  const bool full = p.num_tiles > 1;
  const int64_t u = full ? p.page_ns_full : p.page_ns_last;
  const int64_t r = full ? isa::kTileRows : p.last_tile_rows;
  const int64_t pages = it.max_pages;
  const int64_t fu = Max64(1, p.partial_fixed_ns);
  const int64_t floor = CeilDiv(it.work, int64_t{kAlpha} * n);
  const int64_t q_lo = CeilDiv(it.work, p.num_sms);
  const int64_t q_hi = CeilDiv(it.work + n * floor, p.num_sms);
  const int64_t span = Max64(pages - 1, 0) * u;
  const int64_t k_hi = Min64(Min64(p.num_sms, Max64(pages, 1)),
                             1 + CeilDiv(span, q_lo));
  const int64_t k_lo = u <= q_lo ? 1 + Div64(span, q_hi) : 1;
  int64_t least = kNever;
  TMLA_NO_UNROLL
  for (int64_t k = k_lo + (c.tid & (kLanes - 1)); k <= k_hi; k += kLanes) {
    int64_t path = p.partial_fixed_ns + CeilDiv(pages, k) * u;
    if (k > 1) {
      const int64_t runs = Max64(1, Min64(k - 1, r));
      path += p.reduce_fixed_ns + k * p.input_ns[CeilDiv(r, runs)];
    }
    least = Min64(least, path);
  }
  return WarpMin(least);
}

TMLA_HD inline void EmitB(const Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n;
  const int pieces = static_cast<int>(s.start_b[n - 1]);
  TMLA_NO_UNROLL
  for (int q = c.tid; q < pieces; q += c.nt) {
    const int i = s.p_item[q];
    const int64_t k = Own(s.start_b, i), j = q - (s.start_b[i] - k);
    const bool cut = k > 1;
    const int sm = s.p_sm[q];
    WritePiece(it, sm, q - s.first_b[sm], i, s.p_page[q],
               j == k - 1 ? s.pages[i] : s.p_page[q + 1],
               cut ? SlotEnd(s.start_b, s.ctr_b, i) - k + j : isa::kFinalOutput,
               cut ? s.ctr_b[i] - 1 : isa::kNoCounter);
  }
  TMLA_NO_UNROLL
  for (int sm = c.tid; sm < p.num_sms; sm += c.nt) {
    const int q = s.first_b[sm], count = s.first_b[sm + 1] - q;
    if (s.run_b[sm]) {
      const int i = s.p_item[q];
      const int64_t k = Own(s.start_b, i), j = q - (s.start_b[i] - k);
      const int64_t runs = Max64(1, Min64(k - 1, it.rows(i)));
      WriteMerge(it, sm, count, i, k - 1 - j, runs, k,
                 SlotEnd(s.start_b, s.ctr_b, i) - k, s.ctr_b[i] - 1);
    }
    WriteStop(it, sm, count + s.run_b[sm]);
  }
}

// Layout C: no cuts. Items longest first (ties by index); kLptRounds rounds
// give the next S items to the SMs by increasing load (ties by index); the
// rest, in order, fill the SMs up to the lowest common level L at which
// their room sum(max(0, L - load)) holds them: item j goes to the SM whose
// share of that room contains the middle of the item.
TMLA_HD inline Measure MeasureC(Ctx& c, const Items& it, const Scratch& s) {
  const PlannerParams& p = it.p;
  const int n = it.n, S = p.num_sms;
  constexpr uint64_t kIndexMask = 0xffffffffu;
  // Thread i writes key i (i < nt), as Sort needs with no barrier.
  TMLA_NO_UNROLL
  for (int i = c.tid; i < n; i += c.nt) {
    s.keys[i] = ((kCostKeyBase - static_cast<uint64_t>(it.cost(i))) << 32) |
                static_cast<uint64_t>(i);
  }
  Sort(c, s.keys, reinterpret_cast<uint64_t*>(s.c_sm), n, NextPow2(n));
  auto item_at = [&](int at) {
    return static_cast<int>(s.keys[at] & kIndexMask);
  };
  // Of the first S keys (costs that do not increase), those whose cost
  // word (kCostKeyBase - cost) is below w.
  auto below = [&](uint64_t w) {
    int a = 0, b = S;
    while (a < b) {
      const int mid = (a + b) >> 1;
      if (s.keys[mid] >> 32 < w) a = mid + 1; else b = mid;
    }
    return a;
  };
  // n > S: every round but the last gives S items.
  const int head = static_cast<int>(Min64(n, int64_t{kLptRounds} * S));
  const int rounds = static_cast<int>(CeilDiv(head, S));
  // Each phase of rounds writes the loads to one of two arrays and reads
  // the other, the last one to s.load; with no item left, the SMs'
  // makespan and longest list so far are the layout's.
  auto loads = [&](int r) { return (rounds - r) & 1 ? s.rank : s.load; };
  int64_t makespan = 0, longest = 0;
  // Rounds 0 and 1 in one phase. In round 0 every load is 0: SM sm takes
  // item sm, so the loads do not increase with the SM, and in round 1 the
  // rank of SM sm (the SMs of smaller (load, index)) is the SMs of lower
  // load, those past its cost's ties [a, e), plus the ties before it.
  TMLA_NO_UNROLL
  for (int sm = c.tid; sm < S; sm += c.nt) {
    const int first = item_at(sm);
    const uint64_t w = s.keys[sm] >> 32;
    const int64_t rank = (S - below(w + 1)) + (sm - below(w));
    int64_t load = it.cost(first), count = 1;
    s.c_sm[first] = sm;
    s.c_pos[first] = 0;
    if (S + rank < head) {
      const int item = item_at(static_cast<int>(S + rank));
      s.c_sm[item] = sm;
      s.c_pos[item] = 1;
      load += it.cost(item);
      count = 2;
    }
    loads(2)[sm] = load;
    s.c_cnt[sm] = count;
    makespan = Max64(makespan, load);
    longest = Max64(longest, count);
  }
  // Rounds 2 on, one phase each: groups of g lanes rank one SM each (S * g
  // <= nt; the host: g = 1) among the loads after the round before.
  int g = 1, log_g = 0;
  while (g < kLanes && 2 * g * S <= c.nt) g <<= 1, ++log_g;
  const int ranked = (S * g + kLanes - 1) / kLanes * kLanes;
  TMLA_NO_UNROLL
  for (int r = 2; r < rounds; ++r) {
    const int64_t* before = loads(r);
    int64_t* after = loads(r + 1);
    Sync();
    makespan = longest = 0;
    TMLA_NO_UNROLL
    for (int x = c.tid; x < ranked; x += c.nt) {
      const int sm = x >> log_g, lane = x & (g - 1);
      int64_t rank = 0;
      if (sm < S) {
        const int64_t mine = before[sm] * kMaxPlannerSms + sm;
        TMLA_NO_UNROLL
        for (int t = lane; t < S; t += g) {
          rank += before[t] * kMaxPlannerSms + t < mine;
        }
      }
      rank = GroupSum(rank, g);
      if (sm >= S || lane != 0) continue;
      const int64_t at = int64_t{r} * S + rank;
      int64_t load = before[sm], count = s.c_cnt[sm];
      if (at < head) {
        const int item = item_at(static_cast<int>(at));
        s.c_sm[item] = sm;
        s.c_pos[item] = r;
        load += it.cost(item);
        count += 1;
      }
      after[sm] = load;
      s.c_cnt[sm] = count;
      makespan = Max64(makespan, load);
      longest = Max64(longest, count);
    }
  }
  const int rest = n - head;
  if (rest > 0) {
    Sync();
    const Run rr(c, rest);
    TMLA_NO_UNROLL
    for (int j = rr.lo; j < rr.hi; ++j) s.t_pre[j] = it.cost(item_at(head + j));
    int64_t most = kLowest, least = kLowest;
    TMLA_NO_UNROLL
    for (int sm = c.tid; sm < S; sm += c.nt) {
      most = Max64(most, s.load[sm]);
      least = Max64(least, -s.load[sm]);
    }
    const Reduced r = Reduce(c, most, least, true, s.red);
    most = r.sum;
    least = -r.max;
    Scan1(c, s.t_pre, rest, s.tmp);
    const int64_t total = s.t_pre[rest - 1];
    // The level: the smallest L whose room holds the rest.
    const int64_t lo = Search(c, GroupFor(S, 1, 16), least, most + total,
                              [&](int64_t level, int lane, int width) {
      int64_t room = 0;
      TMLA_NO_UNROLL
      for (int sm = lane; sm < S; sm += width) {
        room += Max64(0, level - s.load[sm]);
      }
      return GroupSum(room, width) >= total;
    });
    const Run rs(c, S);
    TMLA_NO_UNROLL
    for (int sm = rs.lo; sm < rs.hi; ++sm) {
      s.room[sm] = Max64(0, lo - s.load[sm]);
    }
    Scan1(c, s.room, S, s.tmp);
    TMLA_NO_UNROLL
    for (int j = c.tid; j < rest; j += c.nt) {
      const int64_t cost = Own(s.t_pre, j);
      const int64_t middle = s.t_pre[j] - cost + cost / 2;
      s.t_sm[j] = Min64(UpperBound(s.room, S, middle), S - 1);
    }
    Sync();
    TMLA_NO_UNROLL
    for (int sm = c.tid; sm < S; sm += c.nt) {
      const int a = LowerBound(s.t_sm, rest, sm);
      const int b = UpperBound(s.t_sm, rest, sm);
      s.rank[sm] = a;
      s.c_cnt[sm] += b - a;
      if (b > a) s.load[sm] += s.t_pre[b - 1] - (a > 0 ? s.t_pre[a - 1] : 0);
    }
    Sync();
    TMLA_NO_UNROLL
    for (int j = c.tid; j < rest; j += c.nt) {
      const int item = item_at(head + j);
      s.c_sm[item] = s.t_sm[j];
      s.c_pos[item] = rounds + j - s.rank[s.t_sm[j]];
    }
    makespan = longest = 0;
    TMLA_NO_UNROLL
    for (int sm = c.tid; sm < S; sm += c.nt) {
      makespan = Max64(makespan, s.load[sm]);
      longest = Max64(longest, s.c_cnt[sm]);
    }
  }
  const Reduced r = Reduce(c, makespan, longest, true, s.red);
  Measure m;
  m.makespan = r.sum;
  m.longest = r.max;
  return m;
}

TMLA_HD inline void EmitC(const Ctx& c, const Items& it, const Scratch& s) {
  TMLA_NO_UNROLL
  for (int i = c.tid; i < it.n; i += c.nt) {
    WritePiece(it, s.c_sm[i], s.c_pos[i], i, 0, s.pages[i],
               isa::kFinalOutput, isa::kNoCounter);
  }
  TMLA_NO_UNROLL
  for (int sm = c.tid; sm < it.p.num_sms; sm += c.nt) {
    WriteStop(it, sm, s.c_cnt[sm]);
  }
}

// Carves the scratch from base, clamps the lengths (to s.len and
// p.seqlens) and prices the items: their pages, and it.max_pages,
// it.max_cost, it.work and it.total.
TMLA_HD inline void PriceItems(Ctx& c, Items& it, Scratch& s, char* base,
                               Carry* carry) {
  const PlannerParams& p = it.p;
  const int n = it.n;
  Carve(base, SizesOf(n, p.num_sms), p.batch, &s);
  s.tmp = carry->tmp;
  s.red = carry->red;
  s.hist = carry->hist;
  auto clamp = [&](int b) {
    const int32_t len = p.lengths[b];
    return len < 0 ? 0 : (len > p.max_seqlen ? p.max_seqlen : len);
  };
  TMLA_NO_UNROLL
  for (int b = c.tid; b < p.batch; b += c.nt) {
    s.len[b] = clamp(b);
    p.seqlens[b] = clamp(b);
  }
  // Items' pages and costs; layout B's work: sum(max(1, fixed) + pages *
  // page_ns).
  int64_t max_pages = 0, work = 0;
  const int64_t fu = Max64(1, p.partial_fixed_ns);
  TMLA_NO_UNROLL
  for (int i = c.tid; i < n; i += c.nt) {
    const int len = clamp(it.seq(i)), whole = Divide(len, p.per_page);
    s.pages[i] = whole + (whole * p.page_size != len);
    max_pages = Max64(max_pages, s.pages[i]);
    work += fu + s.pages[i] * it.page_ns(i);
  }
  const Reduced r = Reduce(c, work, max_pages, false, s.red);
  // The longest sequence has an item of each tile kind, so the costliest
  // item is one of its items.
  const int64_t page_ns_most =
      p.num_tiles > 1 ? Max64(p.page_ns_full, p.page_ns_last)
                      : p.page_ns_last;
  it.max_pages = r.max;
  it.max_cost = p.partial_fixed_ns + r.max * page_ns_most;
  it.work = r.sum;
  it.total = r.sum - n * (fu - p.partial_fixed_ns);
}

// The whole planner: clamp the lengths, price the items, measure the
// layouts that can win, write the best one that fits the capacity and the
// info words. A layout is measured only if its lower bound (the items'
// total cost over the SMs; for layout B also LowerBoundB, for layout C the
// costliest item) is below the best makespan measured before it: ties go
// to the layout measured first, so the plan is the one the three measures
// would pick.
TMLA_HD inline void Plan(Ctx& c, const PlannerParams& p, char* base,
                         Carry* carry) {
  Scratch s;
  Items it(p, s);
  const int n = it.n, S = p.num_sms;
  PriceItems(c, it, s, base, carry);
  // Any layout's busiest SM has at least the mean load.
  const int64_t mean = CeilDiv(it.total, S);
  Measure best;
  int pick = -1;
  auto consider = [&](int layout, const Measure& m) {
    if (m.longest <= p.capacity && (pick < 0 || m.makespan < best.makespan)) {
      pick = layout;
      best = m;
    }
  };
  if (n <= S) consider(0, MeasureA(c, it, s));
  // With n <= S layout C (each item alone on an SM) cannot beat A. Nor can
  // B with one item: of k pieces, its longest holds at least ceil(pages /
  // k) pages, and its merge's longest run at least as many rows as A's
  // for k pieces, so it ends no earlier than A's path for k pieces, which
  // A's makespan (the shortest path of the item) does not exceed when
  // input prices rise with the rows.
  const bool b_can_win = !(n == 1 && p.inputs_rise);
  Measure cut;
  if (pick < 0 || (b_can_win && mean < best.makespan &&
                   LowerBoundB(c, it) < best.makespan)) {
    cut = MeasureB(c, it, s);
    consider(1, cut);
  }
  if (n > S && (pick < 0 || Max64(mean, it.max_cost) < best.makespan)) {
    consider(2, MeasureC(c, it, s));
  }
  // Every measure ends with a barrier after its last write.
  if (pick == 0) EmitA(c, it, s);
  if (pick == 1) EmitB(c, it, s);
  if (pick == 2) EmitC(c, it, s);
  if (pick < 0) {
    // No layout fits: empty lists, and planned lengths no call has, so the
    // decode kernel writes NaN for every sequence rather than garbage. The
    // info words describe layout B.
    best = cut;
    TMLA_NO_UNROLL
    for (int sm = c.tid; sm < S; sm += c.nt) WriteStop(it, sm, 0);
    TMLA_NO_UNROLL
    for (int b = c.tid; b < p.batch; b += c.nt) p.seqlens[b] = -1;
  }
  if (c.tid == 0) {
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
