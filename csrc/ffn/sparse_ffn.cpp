#include "ffn/sparse_ffn.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>

#include "core/error.h"

namespace fm {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
constexpr int64_t kNever = INT64_MIN / 4;
constexpr int32_t kNeverPos = INT32_MIN / 4;
// A round that its buffer cuts ends on a multiple of this many list positions where it can: the
// FFN kernels sum the down columns in groups that start there (bundled_ffn.cpp), so the sums do
// not depend on where rounds end, nor on which neurons were cached or read ahead.
constexpr int kRoundGroup = kNeuronBlock;
}  // namespace

void SparseOptions::validate() const {
    FM_ARG(sparsity >= 0.0 && sparsity < 1.0, "SparseOptions.sparsity must lie in [0, 1), got ", sparsity);
    FM_ARG(window >= 0, "SparseOptions.window must be >= 0, got ", window);
    FM_ARG(cache_bias >= 0.0, "SparseOptions.cache_bias must be >= 0, got ", cache_bias);
    FM_ARG(cache_rows >= -1, "SparseOptions.cache_rows must be >= 0 (or -1: as the budget allows), got ", cache_rows);
    FM_ARG(staging_rows >= 0, "SparseOptions.staging_rows must be >= 0 (0: a layer's), got ", staging_rows);
    FM_ARG(queue_depth >= 1 && queue_depth <= 4096, "SparseOptions.queue_depth must lie in [1, 4096], got ",
           queue_depth);
    FM_ARG(coalesce_gap >= 0, "SparseOptions.coalesce_gap must be >= 0, got ", coalesce_gap);
    FM_ARG(max_request >= kIoAlign && max_request % kIoAlign == 0, "SparseOptions.max_request must be a multiple of ",
           kIoAlign, " bytes, got ", max_request);
    FM_ARG(predictor_rank >= 0 && predictor_rank % 32 == 0 && predictor_rank <= 4096,
           "SparseOptions.predictor_rank must be 0 (sign predictor) or a multiple of 32 up to 4096, got ",
           predictor_rank);
    FM_ARG(read_ahead >= -1, "SparseOptions.read_ahead must be >= 0 (or -1: d_ff / 8), got ", read_ahead);
}

size_t SparseFfn::row_bytes(int d_model, const BundleFormat& bf) { return (bf.bytes(d_model) + 63) / 64 * 64; }

size_t SparseFfn::fixed_bytes(int n_layers, int d_ff, int d_model, const BundleFormat& bf, int t_max, int n_slots,
                              const SparseOptions& opt, const FileLayout* layout) {
    size_t n = sizeof(float) * size_t(t_max) * d_ff  // scores
               + 4 * size_t(d_ff)                     // order
               + size_t(t_max) * d_ff                 // uses
               + 4 * size_t(d_ff)                     // list
               + size_t(t_max) * d_ff                 // list mask
               + sizeof(void*) * d_ff                 // rows
               + 8 * size_t(n_layers) * d_ff          // last pick per layer and neuron
               + 4 * size_t(n_slots) * n_layers * d_ff  // and per sequence, its position
               + 4 * size_t(n_slots)                  // each sequence's next position
               + 2 * size_t(d_ff);                    // in-list and picked-now flags
    if (layout) {
        n += staging_buffers(opt) *
             FlashReads::bytes_for(*layout, row_bytes(d_model, bf), opt.staging_rows, opt.staging_bytes);
        // neuron cache index (the rows themselves are the cache share of the budget), hotness, admission order
        // (per row: its neuron, free-list entry, last use and victim entry)
        n += size_t(n_layers) * (4 * size_t(d_ff) + 20 * size_t(opt.cache_rows) + 64);
        n += (opt.hot ? 4 * size_t(n_layers) * d_ff : 0) + size_t(opt.staging_rows) * (8 + sizeof(void*));
        n += bf.is_float() ? 0 : 9 * size_t(d_ff);  // early activations, their flags and positions
        if (opt.sparsity > 0 && opt.read_ahead > 0)  // the read-ahead buffers, the rows they hold, admission
            n += 2 * FlashReads::bytes_for(*layout, row_bytes(d_model, bf), ahead_rows(opt), opt.staging_bytes) +
                 (sizeof(void*) + 4) * size_t(d_ff) + size_t(ahead_rows(opt)) * (24 + sizeof(void*));
    }
    return n;
}

SparseFfn::SparseFfn(Source source, int n_layers, int d_ff, int d_model, const BundleFormat& bf, Activation act,
                     int t_max, int n_slots, const SparseOptions& opt, const FileLayout* layout,
                     std::vector<const void*> resident)
    : source_(source), n_layers_(n_layers), d_ff_(d_ff), d_model_(d_model), t_max_(t_max), n_slots_(n_slots), bf_(bf),
      act_(act), opt_(opt), resident_(std::move(resident)), down_scales_(size_t(n_layers), nullptr) {
    FM_ARG(n_slots >= 1, "SparseFfn: n_slots must be >= 1, got ", n_slots);
    bf.validate(d_model, d_ff);
    predictor_.init(n_layers, d_ff, d_model, t_max, act, opt.predictor_rank);
    scores_.allocate(sizeof(float) * size_t(t_max) * d_ff);
    order_.allocate(4 * size_t(d_ff));
    uses_.allocate(size_t(t_max) * d_ff);
    list_.allocate(4 * size_t(d_ff));
    list_mask_.allocate(size_t(t_max) * d_ff);
    rows_.allocate(sizeof(void*) * d_ff);
    last_pick_.allocate(8 * size_t(n_layers) * d_ff);
    in_list_.allocate(d_ff);
    picked_now_.allocate(d_ff);
    std::fill(last_pick_.data<int64_t>(), last_pick_.data<int64_t>() + size_t(n_layers) * d_ff, kNever);
    window_pick_.allocate(4 * size_t(n_slots) * n_layers * d_ff);
    std::fill(window_pick_.data<int32_t>(), window_pick_.data<int32_t>() + size_t(n_slots) * n_layers * d_ff,
              kNeverPos);
    next_pos_.assign(n_slots, 0);
    std::memset(in_list_.data(), 0, in_list_.size());
    std::memset(picked_now_.data(), 0, picked_now_.size());
    step_.assign(n_layers, 0);
    if (source == Source::Resident) {
        FM_ARG(int(resident_.size()) == n_layers, "resident FFN needs every layer's bundles");
        return;
    }
    FM_ARG(layout, "flash FFN needs a file layout");
    FM_ARG(opt.staging_rows >= 1, "SparseOptions.staging_rows must be >= 1 for flash, got ", opt.staging_rows);
    layout_ = *layout;
    reader_ = std::make_unique<DirectReader>(layout_.path, opt.queue_depth, opt.direct);
    for (int l = 0; l < n_layers; ++l) {
        const uint64_t end = layout_.piece_base[l][layout_.n_pieces() - 1] +
                             uint64_t(d_ff) * layout_.piece_stride[layout_.n_pieces() - 1];
        FM_IO(end <= reader_->size(), "'", layout_.path, "' is truncated: the FFN of layer ", l, " needs ", end,
              " bytes, the file has ", reader_->size());
    }
    n_rounds_ = staging_buffers(opt);
    const int ahead = opt.sparsity > 0 && opt.read_ahead > 0 ? ahead_rows(opt) : 0;
    for (int r = 0; r < n_rounds_; ++r) {
        rounds_[r].reads.init(layout_, row_bytes(d_model, bf), opt.staging_rows, opt.staging_bytes, opt.coalesce_gap,
                              opt.max_request);
        rounds_[r].pending.reserve(opt.staging_rows + ahead);  // its misses, then the rows read ahead it computes
    }
    neuron_caches_.resize(n_layers);
    for (auto& c : neuron_caches_) c.init(d_ff, opt.cache_rows, row_bytes(d_model, bf));
    if (opt.hot) {
        hotness_.allocate(4 * size_t(n_layers) * d_ff);
        std::memset(hotness_.data(), 0, hotness_.size());
    }
    for (int r = 0; r < 2 && ahead; ++r) {
        ahead_rounds_[r].reads.init(layout_, row_bytes(d_model, bf), ahead, opt.staging_bytes, opt.coalesce_gap,
                                    opt.max_request);
        ahead_rounds_[r].pending.reserve(ahead);
    }
    if (ahead) ahead_row_.allocate(sizeof(void*) * d_ff), ahead_ids_.resize(d_ff);
    admit_ids_.reserve(opt.staging_rows + ahead);
    admit_rows_.reserve(opt.staging_rows + ahead);
    admit_slots_.reserve(opt.staging_rows + ahead);
    if (!bf.is_float()) {
        early_.allocate(4 * size_t(d_ff));
        ready_.allocate(d_ff);
        early_pos_.allocate(4 * size_t(d_ff));
    }
}

SparseFfn::~SparseFfn() { drain(); }

// Two buffers of the size asked for (a round in each, so that rounds keep their requests, and
// those in flight at once), where a round holds 2 neurons or more; else one.
int SparseFfn::staging_buffers(const SparseOptions& opt) { return opt.staging_rows >= 2 ? 2 : 1; }

size_t SparseFfn::bytes() const {
    size_t n = scores_.size() + order_.size() + uses_.size() + list_.size() + list_mask_.size() + rows_.size() +
               last_pick_.size() + window_pick_.size() + next_pos_.capacity() * 4 + in_list_.size() + picked_now_.size() + rounds_[0].reads.bytes() + rounds_[1].reads.bytes() +
               ahead_rounds_[0].reads.bytes() + ahead_rounds_[1].reads.bytes() + ahead_row_.size() +
               ahead_ids_.capacity() * 4 + hotness_.size() +
               admit_ids_.capacity() * 4 + admit_rows_.capacity() * sizeof(void*) + admit_slots_.capacity() * 4 +
               early_.size() + ready_.size() + early_pos_.size();
    for (const auto& c : neuron_caches_) n += c.bytes();
    return n;
}

void SparseFfn::reset_stats() {
    stats_ = SparseStats{};
    if (reader_) reader_->reset_stats();
}

void SparseFfn::clear_neuron_cache() {
    drain();  // a round read ahead skipped the neurons cached then
    for (auto& c : neuron_caches_) c.clear();
}

// A sequence whose first token in this call is not where it left off restarted: its picks from
// that position on belong to text it no longer holds.
void SparseFfn::rewind(const int32_t* slots, const int32_t* positions, int T) {
    for (int t = 0; t < T; ++t) {
        const int slot = slots[t], p = positions[t];
        FM_ARG(slot >= 0 && slot < n_slots_, "SparseFfn: slot ", slot, " out of range [0, ", n_slots_, ")");
        if (p != next_pos_[slot] && (t == 0 || slots[t - 1] != slot)) {
            int32_t* w = window_pick_.data<int32_t>() + size_t(slot) * n_layers_ * d_ff_;
            for (size_t i = 0; i < size_t(n_layers_) * d_ff_; ++i)
                if (w[i] >= p) w[i] = kNeverPos;
        }
        next_pos_[slot] = p + 1;
    }
}

void SparseFfn::set_trace(std::vector<int32_t> ids, int n_steps, int k, bool score, std::vector<int32_t> ahead,
                          int ahead_m) {
    FM_ARG(!score || predictor_.loaded(), "set_trace(score=True) needs a loaded predictor");
    FM_ARG(n_steps >= 0 && k >= 0 && ids.size() == size_t(n_steps) * n_layers_ * k, "trace must hold (n_steps, ",
           n_layers_, ", k) neuron ids");
    for (int32_t i : ids) FM_ARG(i >= 0 && i < d_ff_, "trace neuron id ", i, " out of range [0, ", d_ff_, ")");
    FM_ARG(ahead_m >= 0 && ahead.size() == size_t(n_steps) * n_layers_ * ahead_m,
           "trace ahead ids must be (n_steps, ", n_layers_, ", m) like the trace's, got ", ahead.size(), " ids");
    for (int32_t i : ahead)
        FM_ARG(i >= -1 && i < d_ff_, "trace ahead neuron id ", i, " out of range [0, ", d_ff_, ") (or -1: none)");
    drain();  // nothing read ahead for the selections replaced
    trace_ = std::move(ids);
    ahead_trace_ = std::move(ahead);
    trace_steps_ = n_steps, trace_k_ = k, ahead_trace_m_ = ahead_m;
    trace_scores_ = score && n_steps > 0;
}

// Picks each token's neurons and builds the list of neurons this call computes with (ascending)
// and its per-token mask. Token t computes with the neurons its sequence picked in its last
// `window` positions (itself included) when use_window is set; in flash mode, only with those in
// DRAM.
void SparseFfn::select(ThreadPool& pool, int l, const float* xn, int T, const int32_t* slots,
                       const int32_t* positions) {
    const int n = d_ff_;
    const bool all = opt_.sparsity == 0.0 && trace_steps_ == 0;
    const int k = trace_steps_ ? trace_k_ : std::max(1, int((1.0 - opt_.sparsity) * n + 0.5));
    int64_t* last = last_pick_.data<int64_t>() + size_t(l) * n;
    uint8_t* uses = uses_.data<uint8_t>();  // (T, n): token t computes with neuron i
    uint8_t* in_list = in_list_.data<uint8_t>();
    uint8_t* picked_now = picked_now_.data<uint8_t>();
    NeuronCache* cache = source_ == Source::Flash ? &neuron_caches_[l] : nullptr;
    const int64_t tok0 = step_[l];
    const int w = opt_.use_window && opt_.window > 1 ? opt_.window : 1;
    if (!all && (!trace_steps_ || trace_scores_)) predictor_.scores(pool, l, xn, T, scores_.data<float>());
    int32_t* order = order_.data<int32_t>();
    uint64_t computed = 0;
    for (int t = 0; t < T; ++t) {
        const int64_t tk = tok0 + t;
        const int32_t pos = positions[t];
        int32_t* wp = window_pick_.data<int32_t>() + (size_t(slots[t]) * n_layers_ + l) * n;  // its sequence's picks
        uint8_t* u = uses + size_t(t) * n;
        if (all) {
            for (int i = 0; i < n; ++i) last[i] = tk;
        } else if (trace_steps_) {
            const int32_t* ids = trace_.data() + (size_t(tk % trace_steps_) * n_layers_ + l) * k;
            for (int j = 0; j < k; ++j) last[ids[j]] = tk, wp[ids[j]] = pos;
        } else {
            float* sc = scores_.data<float>() + size_t(t) * n;
            if (cache && opt_.cache_bias != 0.0 && cache->capacity() > 0) {
                const float boost = float(1.0 + opt_.cache_bias);
                for (int i = 0; i < n; ++i)
                    if (cache->slot_of(i) >= 0) sc[i] *= boost;
            }
            std::iota(order, order + n, 0);
            std::nth_element(order, order + (k - 1), order + n, [&](int32_t a, int32_t b) { return sc[a] > sc[b]; });
            for (int j = 0; j < k; ++j) last[order[j]] = tk, wp[order[j]] = pos;
        }
        for (int i = 0; i < n; ++i) {
            u[i] = all || wp[i] > pos - w;  // picked by its sequence in its last w positions
            picked_now[i] |= last[i] == tk;
        }
        if (opt_.hot) {
            float* h = hotness_.data<float>() + size_t(l) * n;
            for (int i = 0; i < n; ++i) h[i] = h[i] * kHotDecay + float(last[i] == tk);
        }
    }
    stats_.selected += uint64_t(all ? n : k) * T;
    // the list: neurons some token computes with (in flash mode, window neurons only when cached)
    int32_t* list = list_.data<int32_t>();
    int nl = 0;
    for (int i = 0; i < n; ++i) {
        bool use = false;
        for (int t = 0; t < T && !use; ++t) use = uses[size_t(t) * n + i];
        if (use && cache && !picked_now[i]) use = cache->slot_of(i) >= 0;
        in_list[i] = use;
        if (use) list[nl++] = i;
    }
    n_list_ = nl;
    has_mask_ = false;
    for (int t = 0; t < T; ++t) {
        uint8_t* mk = list_mask_.data<uint8_t>() + size_t(t) * nl;
        for (int p = 0; p < nl; ++p) {
            mk[p] = uses[size_t(t) * n + list[p]];
            computed += mk[p];
            has_mask_ |= !mk[p];
        }
    }
    stats_.computed += computed;
    if (cache)  // picked neurons in the neuron cache are used now
        for (int i = 0; i < n; ++i)
            if (picked_now[i] && cache->slot_of(i) >= 0) cache->touch(cache->slot_of(i), last[i]);
    step_[l] = tok0 + T;
}

void SparseFfn::forward(ThreadPool& pool, int l, float* out, const float* xn, int T, const FfnScratch& s,
                        const int32_t* slots, const int32_t* positions) {
    FM_ARG(T <= t_max_, "too many tokens for the sparse FFN (", T, " > ", t_max_, ")");
    FM_ARG(opt_.sparsity == 0.0 || trace_steps_ || predictor_.loaded(),
           "sparsity > 0 needs the sparsity predictor: run `flashmem calibrate` on the model");
    auto t0 = Clock::now();
    // cleared here, not at the end: a read error may end a call early
    std::memset(in_list_.data(), 0, in_list_.size());
    std::memset(picked_now_.data(), 0, picked_now_.size());
    if (ahead_row_.size()) std::memset(ahead_row_.data(), 0, ahead_row_.size());
    if (source_ == Source::Flash && opt_.window > 0 && opt_.expire)
        neuron_caches_[l].expire(step_[l] - opt_.window + 1);
    if (l == 0) rewind(slots, positions, T);
    select(pool, l, xn, T, slots, positions);
    stats_.select_s += since(t0);
    stats_.steps += 1;
    stats_.tokens += T;
    ffn_begin(pool, xn, T, d_model_, bf_, s);
    read_and_compute(pool, l, xn, T, s);
    ffn_end(pool, out, T, d_model_, s);
}

// Resolves every list entry to a bundle row (the resident matrix, the neuron cache, or read from
// the file). The misses are read in rounds that flash_reads plans; each round is computed as soon
// as it is read, with the hits before the round's end.
void SparseFfn::read_and_compute(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s) {
    const int32_t* list = list_.data<int32_t>();
    if (source_ == Source::Resident) {
        const void** rows = rows_.data<const void*>();
        const char* base = static_cast<const char*>(resident_[l]);
        const size_t row = bf_.bytes(d_model_);
        for (int p = 0; p < n_list_; ++p) rows[p] = base + size_t(list[p]) * row;
        auto t0 = Clock::now();
        ffn_accumulate(pool, xn, T, d_model_, bf_, act_, {rows, n_list_, has_mask_ ? list_mask_.data<uint8_t>() : nullptr, list, down_scales_[l]}, 0,
                       n_list_, s);
        stats_.compute_s += since(t0);
        return;
    }
    try {
        stream_layer(pool, l, xn, T, s);
    } catch (...) {
        drain();  // no read still lands in a staging buffer, and the next call plans afresh
        throw;
    }
}

// Rounds in a pipeline: plan round k + 1, wait for round k's reads, submit round k + 1's, compute
// round k. After the layer's last round is submitted, at sparsity 0 the next layer's first round
// is submitted in its place (the neurons it reads are exactly known: every one not cached).
void SparseFfn::stream_layer(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s) {
    early_used_ = false;
    Round* cur = &rounds_[0];
    int pos;
    if (sparse_ahead_layer_ == l) use_ahead(l);  // its rows count as read for the rounds below
    if (ahead_layer_ == l && ahead_still_valid(l)) {
        cur = ahead_;
        pos = cur->hi;
        const NeuronCache& cache = neuron_caches_[l];
        const int32_t* list = list_.data<int32_t>();
        for (int p = 0; p < pos; ++p) stats_.hits += cache.slot_of(list[p]) >= 0 && picked_now_.data<uint8_t>()[list[p]];
        stats_.misses += cur->pending.size();
        stats_.rounds_ahead += 1;
    } else {
        drain();  // a round read ahead for another layer, or for a cache that has changed since
        pos = plan_round(*cur, l, 0);
        if (submit(*cur) && T == 1 && early_.size()) activate_cached_early(pool, l, s);
    }
    ahead_layer_ = -1, ahead_ = nullptr;
    const bool all = opt_.sparsity == 0.0 && trace_steps_ == 0 && !opt_.expire;
    while (true) {
        Round* next = n_rounds_ == 2 ? &rounds_[cur == &rounds_[0] ? 1 : 0] : nullptr;
        const bool more = pos < n_list_;
        if (more && next) pos = plan_round(*next, l, pos);
        wait_for(*cur);
        if (more && next) {
            submit(*next);
        } else if (!more && next && all) {
            plan_ahead(*next, (l + 1) % n_layers_);
        } else if (!more && can_read_ahead(l + 1, T)) {
            plan_sparse_ahead(pool, l + 1, xn);
        }
        compute_round(pool, l, xn, T, s, *cur);
        if (!more) return;
        if (!next) {  // one buffer: plan, read, compute, one round after another
            pos = plan_round(*cur, l, pos);
            submit(*cur);
            continue;
        }
        cur = next;
    }
}

int SparseFfn::plan_round(Round& r, int l, int from) {
    const NeuronCache& cache = neuron_caches_[l];
    const int32_t* list = list_.data<int32_t>();
    const uint8_t* picked_now = picked_now_.data<uint8_t>();
    r.reads.clear();
    r.pending.clear();
    r.lo = from;
    int pos = from;
    for (; pos < n_list_; ++pos) {
        const int i = list[pos];
        if (pos % kRoundGroup == 0 && r.reads.full_before(kRoundGroup)) break;
        if (cache.slot_of(i) >= 0) {
            stats_.hits += picked_now[i];  // window neurons are in the cache by definition
            continue;
        }
        if (ahead_row_.size() && ahead_row_.data<const void*>()[i]) continue;  // read ahead
        if (!r.reads.plan(l, i)) {
            FM_IO(!r.pending.empty(), "staging buffer too small for one neuron");
            break;
        }
        stats_.misses += 1;
        r.pending.push_back(pos);
    }
    r.hi = pos;
    return pos;
}

void SparseFfn::plan_ahead(Round& r, int l) {
    const NeuronCache& cache = neuron_caches_[l];
    r.reads.clear();
    r.pending.clear();
    r.lo = 0;
    int i = 0;  // at sparsity 0 the list is every neuron: list position i is neuron i
    for (; i < d_ff_; ++i) {
        if (i % kRoundGroup == 0 && r.reads.full_before(kRoundGroup)) break;
        if (cache.slot_of(i) >= 0) continue;
        if (!r.reads.plan(l, i)) break;
        r.pending.push_back(i);
    }
    r.hi = i;
    if (submit(r)) ahead_layer_ = l, ahead_ = &r;
}

bool SparseFfn::ahead_still_valid(int l) const {
    if (n_list_ != d_ff_) return false;
    const NeuronCache& cache = neuron_caches_[l];
    const Round& r = *ahead_;
    size_t j = 0;
    for (int i = 0; i < r.hi; ++i) {  // each neuron before hi: read by the round, or cached
        const bool read = j < r.pending.size() && r.pending[j] == i;
        if (read == (cache.slot_of(i) >= 0)) return false;
        j += read;
    }
    return true;
}

bool SparseFfn::submit(Round& r) {
    if (r.pending.empty()) return false;  // nothing to read
    reader_->submit(r.reads.requests());
    return r.submitted = true;
}

void SparseFfn::wait_for(Round& r) {
    if (!r.submitted) return;
    auto t0 = Clock::now();
    r.submitted = false;
    reader_->wait();
    stats_.io_s += since(t0);
}

// Layer l may read ahead: flash at sparsity > 0 (a predictor's picks, or a replay with picks
// ahead), one token, and a layer before it to score on.
bool SparseFfn::can_read_ahead(int l, int T) const {
    if (!ahead_row_.size() || T != 1 || l <= 0 || l >= n_layers_) return false;
    return trace_steps_ ? ahead_trace_m_ > 0 : predictor_.loaded();
}

// Layer l's likeliest neurons not cached (read_ahead of them, at most a buffer's), scored by its
// predictor on the input of layer l - 1 (xn), read in ascending order so that neighbours share
// requests. A replay takes them from its trace (the predictor still scores, for its time).
void SparseFfn::plan_sparse_ahead(ThreadPool& pool, int l, const float* xn) {
    Round& r = ahead_rounds_[l % 2];
    const NeuronCache& cache = neuron_caches_[l];
    int32_t* order = order_.data<int32_t>();
    const int want = std::min(opt_.read_ahead, d_ff_);
    int m = 0;
    r.reads.clear();
    r.pending.clear();
    const auto t0 = Clock::now();
    if (!trace_steps_ || trace_scores_) predictor_.scores(pool, l, xn, 1, scores_.data<float>());
    if (trace_steps_) {
        const int32_t* ids = ahead_trace_.data() + (size_t(step_[l] % trace_steps_) * n_layers_ + l) * ahead_trace_m_;
        for (int j = 0; j < std::min(want, ahead_trace_m_); ++j)
            if (ids[j] >= 0 && cache.slot_of(ids[j]) < 0) order[m++] = ids[j];
    } else {
        const float* sc = scores_.data<float>();
        std::iota(order, order + d_ff_, 0);
        std::partial_sort(order, order + want, order + d_ff_, [&](int32_t a, int32_t b) {  // likeliest first
            return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);
        });
        for (int j = 0; j < want; ++j)
            if (cache.slot_of(order[j]) < 0) order[m++] = order[j];
    }
    // the likeliest n that the buffer holds, in ascending order (n shrinks to what fitted)
    for (int n = m; n > 0;) {
        std::copy(order, order + n, ahead_ids_.begin());
        std::sort(ahead_ids_.begin(), ahead_ids_.begin() + n);
        r.reads.clear();
        r.pending.clear();
        for (int j = 0; j < n && r.reads.plan(l, ahead_ids_[j]); ++j) r.pending.push_back(ahead_ids_[j]);
        if (int(r.pending.size()) == n) break;
        n = int(r.pending.size());
    }
    stats_.select_s += since(t0);
    if (submit(r)) sparse_ahead_layer_ = l, stats_.ahead_read += r.pending.size();
}

// Waits for the rows read ahead for layer l (one batch at a time: the layer's first round goes in
// after them) and takes those of its list: they are computed as cached rows are, in list order.
// The others (picks the predictor a layer ahead got wrong) are dropped.
void SparseFfn::use_ahead(int l) {
    Round& r = ahead_rounds_[l % 2];
    sparse_ahead_layer_ = -1;
    wait_for(r);
    const uint8_t* in_list = in_list_.data<uint8_t>();
    const void** row = ahead_row_.data<const void*>();
    const NeuronCache& cache = neuron_caches_[l];
    for (size_t j = 0; j < r.pending.size(); ++j) {
        const int i = r.pending[j];
        if (!in_list[i] || cache.slot_of(i) >= 0 || row[i]) continue;  // (a replay's ahead ids may repeat)
        row[i] = r.reads.bundle(int(j));
        stats_.ahead_used += 1, stats_.misses += 1;
    }
}

void SparseFfn::drain() noexcept {
    stats_.rounds_dropped += ahead_ != nullptr;
    sparse_ahead_layer_ = -1;
    if (reader_ && reader_->busy()) {
        try {
            reader_->wait();
        } catch (...) {  // the round is dropped; its neurons are read again when needed
        }
    }
    for (Round& r : rounds_) r.submitted = false;
    for (Round& r : ahead_rounds_) r.submitted = false;
    ahead_layer_ = -1, ahead_ = nullptr;
}

// The gate and up of every list entry in the neuron cache or read ahead, while the layer's first
// round is read: the rounds then add only their down columns (a cached entry stays where it is for
// the layer's call: list entries are protected from eviction; rows read ahead stay in their buffer).
void SparseFfn::activate_cached_early(ThreadPool& pool, int l, const FfnScratch& s) {
    const NeuronCache& cache = neuron_caches_[l];
    const int32_t* list = list_.data<int32_t>();
    const void** rows = rows_.data<const void*>();
    const void* const* ahead = ahead_row_.size() ? ahead_row_.data<const void*>() : nullptr;
    int32_t* at = early_pos_.data<int32_t>();
    int n = 0;
    for (int p = 0; p < n_list_; ++p) {
        const int slot = cache.slot_of(list[p]);
        if (slot >= 0) rows[p] = cache.row(slot), at[n++] = p;
        else if (ahead && ahead[list[p]]) rows[p] = ahead[list[p]], at[n++] = p;
    }
    if (n == 0) return;
    auto t0 = Clock::now();
    std::memset(ready_.data(), 0, size_t(n_list_));
    ffn_activate_early(pool, d_model_, bf_, act_, {rows, n_list_, nullptr, list, down_scales_[l]}, at, n,
                       early_.data<float>(), ready_.data<uint8_t>(), s);
    early_used_ = true;
    stats_.early += uint64_t(n);
    stats_.compute_s += since(t0);
}

// Computes list entries [r.lo, r.hi) once r's reads are in (the misses from its staging buffer,
// the hits from the neuron cache), and keeps what was read in the neuron cache.
void SparseFfn::compute_round(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s, Round& r) {
    const int32_t* list = list_.data<int32_t>();
    const void** rows = rows_.data<const void*>();
    NeuronCache& cache = neuron_caches_[l];
    std::vector<int32_t>& pending = r.pending;
    const int lo = r.lo, hi = r.hi;
    auto t0 = Clock::now();
    // misses from the read buffers; hits from the neuron cache (list entries keep their slots for
    // the call: admission never evicts them); rows read ahead from theirs, kept like the misses
    const void* const* ahead = ahead_row_.size() ? ahead_row_.data<const void*>() : nullptr;
    const size_t misses = pending.size();
    for (size_t j = 0; j < misses; ++j) rows[pending[j]] = r.reads.bundle(int(j));
    for (int pos = lo; pos < hi; ++pos) {
        const int slot = cache.slot_of(list[pos]);
        if (slot >= 0) rows[pos] = cache.row(slot);
        else if (ahead && ahead[list[pos]]) rows[pos] = ahead[list[pos]], pending.push_back(pos);
    }
    // admitted in list order, as without reading ahead
    if (pending.size() > misses) std::sort(pending.begin(), pending.end());
    FfnRows fr{rows, n_list_, has_mask_ ? list_mask_.data<uint8_t>() : nullptr, list, down_scales_[l]};
    if (early_used_) fr.early = early_.data<float>(), fr.ready = ready_.data<uint8_t>();
    ffn_accumulate(pool, xn, T, d_model_, bf_, act_, fr, lo, hi, s);
    // keep what was read for the next tokens
    if (cache.capacity() > 0 && !pending.empty()) {
        const float* hot = opt_.hot ? hotness_.data<float>() + size_t(l) * d_ff_ : nullptr;
        if (hot)
            std::sort(pending.begin(), pending.end(), [&](int a, int b) {  // hottest first, ties by id
                return hot[list[a]] > hot[list[b]] || (hot[list[a]] == hot[list[b]] && a < b);
            });
        admit_ids_.clear(), admit_rows_.clear();
        for (int pos : pending) admit_ids_.push_back(list[pos]), admit_rows_.push_back(rows[pos]);
        admit_slots_.resize(pending.size());
        const int64_t now = step_[l] - 1;  // the call's last token
        const int n = cache.admit(admit_ids_.data(), int(pending.size()), now, last_pick_.data<int64_t>() + size_t(l) * d_ff_,
                                  in_list_.data<uint8_t>(), hot, admit_slots_.data());
        // the rows, copied by all threads (a layer's reads are tens of MB at 7B shapes)
        const size_t row = row_bytes(d_model_, bf_);
        pool.parallel_dynamic(size_t(n), 1, [&](size_t b, size_t e, int) {
            for (size_t j = b; j < e; ++j) std::memcpy(cache.row(admit_slots_[j]), admit_rows_[j], row);
        });
    }
    stats_.compute_s += since(t0);
}

}  // namespace fm
