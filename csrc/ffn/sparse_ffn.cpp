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

size_t blocks_per_neuron(const FileLayout& L) {  // 4096-byte blocks one neuron's pieces may touch
    size_t n = 0;
    for (int p = 0; p < L.n_pieces; ++p) n += (L.piece_bytes[p] + kIoAlign - 1) / kIoAlign + 1;
    return n;
}
}  // namespace

size_t SparseFfn::row_bytes(int D, DType dt) { return (size_t(3) * D * dtype_size(dt) + 63) / 64 * 64; }

size_t SparseFfn::fixed_bytes(int n_layers, int n_neurons, int D, DType dt, int t_max, const SparseOptions& opt,
                              const FileLayout* layout) {
    size_t n = sizeof(float) * size_t(t_max) * n_neurons  // scores
               + 4 * size_t(n_neurons)                     // order
               + size_t(t_max) * n_neurons                 // picked marks
               + 4 * size_t(n_neurons)                     // list
               + size_t(t_max) * n_neurons                 // mask
               + sizeof(void*) * n_neurons                 // rows
               + 8 * size_t(n_layers) * n_neurons          // last pick per layer and neuron
               + 2 * size_t(n_neurons);                    // in-list and picked-in-call flags
    if (layout) {
        n += size_t(opt.staging_rows) * blocks_per_neuron(*layout) * kIoAlign;
        if (layout->n_pieces > 1) n += size_t(opt.staging_rows) * row_bytes(D, dt);
        // cache index (the rows themselves are the cache share of the budget), hotness, admission order
        n += size_t(n_layers) * (4 * size_t(n_neurons) + 16 * size_t(opt.cache_rows) + 64);
        n += (opt.hot ? 4 * size_t(n_layers) * n_neurons : 0) + size_t(opt.staging_rows) * (4 + sizeof(void*));
    }
    return n;
}

SparseFfn::SparseFfn(Source source, int n_layers, int n_neurons, int D, DType dt, int t_max, const SparseOptions& opt,
                     const FileLayout* layout, std::vector<const void*> resident)
    : source_(source), n_layers_(n_layers), n_neurons_(n_neurons), D_(D), t_max_(t_max), dt_(dt), opt_(opt),
      resident_(std::move(resident)) {
    FM_ARG(opt.sparsity >= 0.0 && opt.sparsity < 1.0, "sparsity must lie in [0, 1), got ", opt.sparsity);
    FM_ARG(opt.window >= 0, "window must be >= 0, got ", opt.window);
    FM_ARG(opt.coalesce_gap >= 0, "coalesce_gap must be >= 0, got ", opt.coalesce_gap);
    FM_ARG(opt.cache_bias >= 0.0, "cache_bias must be >= 0, got ", opt.cache_bias);
    predictor_.init(n_layers, n_neurons, D, t_max);
    scores_.allocate(sizeof(float) * size_t(t_max) * n_neurons);
    order_.allocate(4 * size_t(n_neurons));
    picked_.allocate(size_t(t_max) * n_neurons);
    list_.allocate(4 * size_t(n_neurons));
    mask_.allocate(size_t(t_max) * n_neurons);
    rows_.allocate(sizeof(void*) * n_neurons);
    last_pick_.allocate(8 * size_t(n_layers) * n_neurons);
    flags_.allocate(2 * size_t(n_neurons));
    std::fill(last_pick_.data<int64_t>(), last_pick_.data<int64_t>() + size_t(n_layers) * n_neurons, kNever);
    std::memset(flags_.data(), 0, flags_.size());
    step_.assign(n_layers, 0);
    if (source == Source::Resident) {
        FM_ARG(int(resident_.size()) == n_layers, "resident FFN needs every layer's bundles");
        return;
    }
    FM_ARG(layout && layout->n_pieces >= 1 && int(layout->piece_base.size()) == n_layers, "flash FFN needs a file layout");
    FM_ARG(opt.staging_rows >= 1, "staging_rows must be >= 1");
    FM_ARG(opt.max_request >= kIoAlign && opt.max_request % kIoAlign == 0, "max_request must be a multiple of ",
           kIoAlign);
    layout_ = *layout;
    for (int p = 0; p < layout_.n_pieces; ++p)
        for (int l = 0; l < n_layers; ++l)
            FM_IO(layout_.n_pieces > 1 || (layout_.piece_base[l][p] % kIoAlign == 0 && layout_.piece_stride[p] % kIoAlign == 0),
                  "'", layout_.path, "': FFN bundles of layer ", l, " are not aligned to ", kIoAlign,
                  " bytes, as direct I/O needs; convert the model again");
    reader_ = std::make_unique<DirectReader>(layout_.path, opt.queue_depth, opt.direct);
    for (int l = 0; l < n_layers; ++l) {
        const uint64_t end = layout_.piece_base[l][layout_.n_pieces - 1] +
                             uint64_t(n_neurons) * layout_.piece_stride[layout_.n_pieces - 1];
        FM_IO(end <= reader_->size(), "'", layout_.path, "' is truncated: the FFN of layer ", l, " needs ", end,
              " bytes, the file has ", reader_->size());
    }
    piece_blocks_.resize(layout_.n_pieces);
    for (int p = 0; p < layout_.n_pieces; ++p)
        piece_blocks_[p] = size_t(opt.staging_rows) * ((layout_.piece_bytes[p] + kIoAlign - 1) / kIoAlign + 1);
    staging_.allocate(size_t(opt.staging_rows) * blocks_per_neuron(layout_) * kIoAlign, kIoAlign);
    if (layout_.n_pieces > 1) assembled_.allocate(size_t(opt.staging_rows) * row_bytes(D, dt));
    caches_.resize(n_layers);
    for (auto& c : caches_) c.init(n_neurons, opt.cache_rows, row_bytes(D, dt));
    if (opt.hot) {
        hotness_.allocate(4 * size_t(n_layers) * n_neurons);
        std::memset(hotness_.data(), 0, hotness_.size());
    }
    admit_ids_.reserve(opt.staging_rows);
    admit_rows_.reserve(opt.staging_rows);
}

size_t SparseFfn::bytes() const {
    size_t n = scores_.size() + order_.size() + picked_.size() + list_.size() + mask_.size() + rows_.size() +
               last_pick_.size() + flags_.size() + staging_.size() + assembled_.size() + hotness_.size() +
               admit_ids_.capacity() * 4 + admit_rows_.capacity() * sizeof(void*);
    for (const auto& c : caches_) n += c.bytes();
    return n;
}

void SparseFfn::reset_stats() {
    stats_ = SparseStats{};
    if (reader_) reader_->reset_stats();
}

void SparseFfn::clear_cache() {
    for (auto& c : caches_) c.clear();
}

void SparseFfn::begin_sequence() {
    std::fill(last_pick_.data<int64_t>(), last_pick_.data<int64_t>() + size_t(n_layers_) * n_neurons_, kNever);
}

void SparseFfn::set_trace(std::vector<int32_t> ids, int n_steps, int k) {
    FM_ARG(n_steps >= 0 && k >= 0 && ids.size() == size_t(n_steps) * n_layers_ * k, "trace must hold (n_steps, ",
           n_layers_, ", k) neuron ids");
    for (int32_t i : ids) FM_ARG(i >= 0 && i < n_neurons_, "trace neuron id ", i, " out of range [0, ", n_neurons_, ")");
    trace_ = std::move(ids);
    trace_steps_ = n_steps, trace_k_ = k;
}

// Picks each token's neurons and builds the list of neurons this call computes (ascending) with
// the per-token mask. Token t uses the neurons picked in the last `window` tokens (itself
// included) when use_window is set; in flash mode, only those that are in DRAM.
void SparseFfn::select(ThreadPool& pool, int l, const float* xn, int T) {
    const int n = n_neurons_;
    const bool all = opt_.sparsity == 0.0 && trace_steps_ == 0;
    const int k = trace_steps_ ? trace_k_ : std::max(1, int((1.0 - opt_.sparsity) * n + 0.5));
    int64_t* last = last_pick_.data<int64_t>() + size_t(l) * n;
    uint8_t* marks = picked_.data<uint8_t>();  // (T, n): token t computes neuron i
    uint8_t* in_list = flags_.data<uint8_t>();
    uint8_t* picked_now = in_list + n;
    const int64_t tok0 = step_[l];
    const int w = opt_.use_window && opt_.window > 1 ? opt_.window : 1;
    if (!all && !trace_steps_) predictor_.scores(pool, l, xn, T, scores_.data<float>());
    int32_t* order = order_.data<int32_t>();
    uint64_t computed = 0;
    for (int t = 0; t < T; ++t) {
        const int64_t tk = tok0 + t;
        uint8_t* m = marks + size_t(t) * n;
        if (all) {
            for (int i = 0; i < n; ++i) last[i] = tk;
        } else if (trace_steps_) {
            const int32_t* ids = trace_.data() + (size_t(tk % trace_steps_) * n_layers_ + l) * k;
            for (int j = 0; j < k; ++j) last[ids[j]] = tk;
        } else {
            float* sc = scores_.data<float>() + size_t(t) * n;
            if (source_ == Source::Flash && opt_.cache_bias != 0.0 && caches_[l].capacity() > 0) {
                const float boost = float(1.0 + opt_.cache_bias);
                for (int i = 0; i < n; ++i)
                    if (caches_[l].slot_of(i) >= 0) sc[i] *= boost;
            }
            std::iota(order, order + n, 0);
            std::nth_element(order, order + (k - 1), order + n, [&](int32_t a, int32_t b) { return sc[a] > sc[b]; });
            for (int j = 0; j < k; ++j) last[order[j]] = tk;
        }
        for (int i = 0; i < n; ++i) {
            m[i] = last[i] > tk - w;  // picked in the last w tokens
            picked_now[i] |= last[i] == tk;
        }
        if (opt_.hot) {
            float* h = hotness_.data<float>() + size_t(l) * n;
            for (int i = 0; i < n; ++i) h[i] = h[i] * kHotDecay + float(last[i] == tk);
        }
    }
    stats_.selected += uint64_t(all ? n : k) * T;
    // the list: neurons some token computes (in flash mode, window neurons only when cached)
    int32_t* list = list_.data<int32_t>();
    int nl = 0;
    for (int i = 0; i < n; ++i) {
        bool use = false;
        for (int t = 0; t < T && !use; ++t) use = marks[size_t(t) * n + i];
        if (use && source_ == Source::Flash && !picked_now[i]) use = caches_[l].slot_of(i) >= 0;
        in_list[i] = use;
        if (use) list[nl++] = i;
    }
    n_list_ = nl;
    has_mask_ = false;
    for (int t = 0; t < T; ++t) {
        uint8_t* mk = mask_.data<uint8_t>() + size_t(t) * nl;
        for (int p = 0; p < nl; ++p) {
            mk[p] = marks[size_t(t) * n + list[p]];
            computed += mk[p];
            has_mask_ |= !mk[p];
        }
    }
    stats_.computed += computed;
    if (source_ == Source::Flash)  // picked neurons in the cache are used now
        for (int i = 0; i < n; ++i)
            if (picked_now[i] && caches_[l].slot_of(i) >= 0) caches_[l].touch(caches_[l].slot_of(i), last[i]);
    step_[l] = tok0 + T;
}

void SparseFfn::forward(ThreadPool& pool, int l, float* out, const float* xn, int T, const FfnScratch& s) {
    FM_ARG(T <= t_max_, "too many tokens for the sparse FFN (", T, " > ", t_max_, ")");
    FM_ARG(opt_.sparsity == 0.0 || trace_steps_ || predictor_.loaded(),
           "sparsity > 0 needs the sparsity predictor: run `flashmem calibrate` on the model");
    auto t0 = Clock::now();
    std::memset(flags_.data(), 0, flags_.size());  // here, not at the end: a read error may end a call early
    if (source_ == Source::Flash && opt_.window > 0 && opt_.expire) caches_[l].expire(step_[l] - opt_.window + 1);
    select(pool, l, xn, T);
    stats_.select_s += since(t0);
    stats_.steps += 1;
    stats_.tokens += T;
    ffn_begin(pool, T, D_, s);
    read_and_compute(pool, l, xn, T, s);
    ffn_end(pool, out, T, D_, s);
}

// Resolves every list entry to a row (resident matrix, cache, or read from the file), reading the
// misses in rounds that fit the staging buffer, and computes each round as soon as it is read.
void SparseFfn::read_and_compute(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s) {
    const int32_t* list = list_.data<int32_t>();
    const void** rows = rows_.data<const void*>();
    const size_t esz = dtype_size(dt_);
    const FfnRows fr{rows, n_list_, has_mask_ ? mask_.data<uint8_t>() : nullptr};
    if (source_ == Source::Resident) {
        const char* base = static_cast<const char*>(resident_[l]);
        for (int p = 0; p < n_list_; ++p) rows[p] = base + size_t(list[p]) * 3 * D_ * esz;
        auto t0 = Clock::now();
        ffn_accumulate(pool, xn, T, D_, dt_, fr, 0, n_list_, s);
        stats_.compute_s += since(t0);
        return;
    }
    NeuronCache& cache = caches_[l];
    const int np = layout_.n_pieces;
    const int64_t now = step_[l] - 1;  // the call's last token
    struct Run {
        uint64_t b0, b1;  // blocks [b0, b1) of the file
        char* dst;
    };
    std::vector<Run> runs[4];
    size_t used[4] = {0, 0, 0, 0};  // staging blocks used per piece
    pending_.clear();
    pending_off_.clear();

    auto flush = [&](int lo, int hi) {
        requests_.clear();
        for (int p = 0; p < np; ++p)
            for (const Run& r : runs[p]) requests_.push_back({r.b0 * kIoAlign, size_t(r.b1 - r.b0) * kIoAlign, r.dst});
        auto t0 = Clock::now();
        reader_->read(requests_);
        stats_.io_s += since(t0);
        t0 = Clock::now();
        // rows: misses from the read buffers (assembled from their pieces when unbundled), hits
        // from the cache (looked up now: rows move in the cache when others are evicted)
        for (size_t j = 0; j < pending_.size(); ++j) {
            const int pos = pending_[j];
            if (np == 1) {
                rows[pos] = pending_off_[j * np].second;
            } else {
                char* row = assembled_.data<char>() + j * row_bytes(D_, dt_);
                size_t at = 0;
                for (int p = 0; p < np; ++p) {
                    std::memcpy(row + at, pending_off_[j * np + p].second, layout_.piece_bytes[p]);
                    at += layout_.piece_bytes[p];
                }
                rows[pos] = row;
            }
        }
        for (int pos = lo; pos < hi; ++pos) {
            const int slot = cache.slot_of(list[pos]);
            if (slot >= 0) rows[pos] = cache.row(slot);
        }
        ffn_accumulate(pool, xn, T, D_, dt_, fr, lo, hi, s);
        // keep what was read for the next tokens
        if (cache.capacity() > 0 && !pending_.empty()) {
            const float* hot = opt_.hot ? hotness_.data<float>() + size_t(l) * n_neurons_ : nullptr;
            if (hot)
                std::sort(pending_.begin(), pending_.end(), [&](int a, int b) {  // hottest first, ties by id
                    return hot[list[a]] > hot[list[b]] || (hot[list[a]] == hot[list[b]] && a < b);
                });
            admit_ids_.clear(), admit_rows_.clear();
            for (int pos : pending_) admit_ids_.push_back(list[pos]), admit_rows_.push_back(rows[pos]);
            cache.admit(admit_ids_.data(), admit_rows_.data(), int(pending_.size()), now,
                        last_pick_.data<int64_t>() + size_t(l) * n_neurons_, flags_.data<uint8_t>(), hot);
        }
        stats_.compute_s += since(t0);
        for (int p = 0; p < np; ++p) runs[p].clear(), used[p] = 0;
        pending_.clear();
        pending_off_.clear();
    };

    const uint8_t* picked_now = flags_.data<uint8_t>() + n_neurons_;
    int seg = 0;
    for (int pos = 0; pos < n_list_; ++pos) {
        const int i = list[pos];
        if (cache.slot_of(i) >= 0) {
            stats_.hits += picked_now[i];  // window neurons are in the cache by definition
            continue;
        }
        stats_.misses += 1;
        // plan the pieces of neuron i: extend each piece's last run when close enough, else a new run
        for (int attempt = 0; attempt < 2; ++attempt) {
            bool fits = true;
            uint64_t nb0[4], nb1[4];
            bool extend[4];
            size_t need[4];
            for (int p = 0; p < np; ++p) {
                const uint64_t a = layout_.piece_base[l][p] + uint64_t(i) * layout_.piece_stride[p];
                const uint64_t e = a + layout_.piece_bytes[p];
                nb0[p] = a / kIoAlign, nb1[p] = (e + kIoAlign - 1) / kIoAlign;
                const uint64_t gap = opt_.coalesce_gap * layout_.piece_stride[p] / kIoAlign;
                extend[p] = false;
                if (!runs[p].empty()) {
                    const Run& r = runs[p].back();
                    const uint64_t nb = std::max(nb1[p], r.b1);
                    extend[p] = nb0[p] <= r.b1 + gap && (nb - r.b0) * kIoAlign <= opt_.max_request;
                }
                need[p] = extend[p] ? size_t(std::max(nb1[p], runs[p].back().b1) - runs[p].back().b1)
                                    : size_t(nb1[p] - nb0[p]);
                fits &= used[p] + need[p] <= piece_blocks_[p];
            }
            if (!fits || pending_.size() == size_t(opt_.staging_rows)) {
                FM_IO(attempt == 0, "staging buffer too small for one neuron");
                flush(seg, pos);
                seg = pos;
                continue;
            }
            pending_.push_back(pos);
            for (int p = 0; p < np; ++p) {
                size_t first = 0;  // staging is split into one region per piece
                for (int q = 0; q < p; ++q) first += piece_blocks_[q];
                char* piece_base = staging_.data<char>() + first * kIoAlign;
                if (!extend[p]) runs[p].push_back({nb0[p], nb0[p], piece_base + used[p] * kIoAlign});
                Run& r = runs[p].back();
                used[p] += need[p];
                r.b1 = std::max(r.b1, nb1[p]);
                const uint64_t a = layout_.piece_base[l][p] + uint64_t(i) * layout_.piece_stride[p];
                pending_off_.push_back({p, r.dst + (a - r.b0 * kIoAlign)});
            }
            break;
        }
    }
    flush(seg, n_list_);
}

}  // namespace fm
