// Sparse FFN with flash streaming ("LLM in a flash"): per token and layer, a predictor picks the
// neurons expected to matter (predictor.h); those not in the layer's neuron cache
// (neuron_cache.h) are read from the bundle file with direct I/O in rounds that flash_reads.h
// plans, computed from where they lie (cache rows and read buffers, bundled_ffn.h), then kept in
// the neuron cache for the next tokens.
//
// Words used here: a token *picks* the neurons the predictor selects for it; it *computes* with
// the neurons its sequence picked in the last `window` tokens (itself included), in flash mode
// only those in DRAM; the *list* is the neurons some token of the call computes with, ascending.
// A call may hold tokens of several sequences (a batch decode step): each sequence (a KV-cache
// slot) has its own window, counted in its own positions, so that a sequence computes with the
// same neurons in a batch as alone (in flash mode the neuron cache, shared, decides which of
// them are in DRAM).
//
// Reads overlap compute: two read buffers pipeline a layer's rounds; at sparsity 0 the next
// layer's first round is read while this layer's last computes (its misses are known: every
// neuron not cached); with sparsity, the next layer's likeliest neurons (read_ahead), scored by
// its predictor on this layer's input, are read into buffers of their own, and the next layer
// takes those it picks as it takes cached ones. Rounds that their buffer cuts end on groups of
// 16 list positions, so the sums, and the logits, do not depend on what was read when.
//
// With source Resident the bundles stay in the model's DRAM matrix (no I/O, no cache): the same
// selection and compute, used to evaluate quality quickly and as the all-in-DRAM sparse mode.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/dtype.h"
#include "core/thread_pool.h"
#include "ffn/bundled_ffn.h"
#include "ffn/flash_reads.h"
#include "ffn/neuron_cache.h"
#include "ffn/predictor.h"
#include "io/direct_reader.h"

namespace fm {

struct SparseOptions {
    double sparsity = 0.0;     // fraction of the neurons left out per token (0: all are used)
    int window = 0;            // tokens a neuron stays cached after its last use; 0: until evicted
    bool use_window = true;    // also compute with the neurons still in the window (free, in DRAM)
    bool expire = false;       // drop neurons that left the window (else they stay until evicted, LRU)
    bool hot = false;          // flash: the cache keeps the hottest neurons (decayed pick counts),
                               // not the most recently used ones (NeuronCache::admit)
    double cache_bias = 0.0;   // flash: cached neurons' scores count (1 + cache_bias) times when picking,
                               // so near-ties go to neurons already in DRAM (fewer reads, steadier picks)
    int cache_rows = 0;        // per layer (flash)
    int staging_rows = 0;      // bundles one read round can hold (flash)
    size_t staging_bytes = 0;  // cap on the read buffer (0: what staging_rows scattered bundles need)
    int queue_depth = 32;
    int coalesce_gap = 2;      // unneeded bundles a request may span to join two needed ones
    size_t max_request = size_t(256) << 10;
    bool direct = true;
    int predictor_rank = 0;    // the predictor's kind (predictor.h): 0 the sign predictor, r > 0 low-rank of rank r
    int read_ahead = -1;       // flash, sparsity > 0, one token a call: neurons of layer l + 1 read while layer l
                               // computes, the top by l + 1's predictor on layer l's input (-1: d_ff / 8; 0: none)

    // Every field in its range, else an exception naming it. Model::configure_sparse calls it,
    // before anything is sized with the options.
    void validate() const;
};

// Per token, a neuron's hotness is multiplied by this and gains 1 when the neuron is picked:
// about the last 20 tokens count.
constexpr float kHotDecay = 0.95f;

struct SparseStats {
    uint64_t steps = 0;        // tokens (decode) or chunks (prefill) per layer, summed over layers
    uint64_t tokens = 0;       // tokens that went through the FFN, summed over layers
    uint64_t selected = 0;     // neurons the predictor picked
    uint64_t computed = 0;     // neurons the FFN computed with (picked + still in the window)
    uint64_t hits = 0;         // picked neurons found in the cache
    uint64_t misses = 0;       // picked neurons read from flash
    uint64_t rounds_ahead = 0;   // rounds of a layer's first misses read during the layer before (sparsity 0)
    uint64_t rounds_dropped = 0; // of those, the ones not used: the cache or the list had changed
    uint64_t early = 0;        // cached (or read-ahead) neurons whose gate and up ran while the layer's first reads were in flight
    uint64_t ahead_read = 0;   // neurons read a layer ahead at sparsity > 0 (read_ahead)
    uint64_t ahead_used = 0;   // of those, the ones the layer picked (counted in misses too: read from flash)
    double select_s = 0, io_s = 0, compute_s = 0;  // io_s: time the compute waited for reads; select_s includes
                                                   // the predictor a layer ahead (read_ahead)
};

class SparseFfn {
  public:
    enum class Source { Resident, Flash };
    // resident: the layers' bundle matrices (d_ff, bundle bytes, unpadded) when source is Resident.
    // opt and layout are validated (SparseOptions::validate, FileLayout::validate) by the caller.
    // n_slots: the sequences a call's tokens may belong to (Config.max_batch).
    SparseFfn(Source source, int n_layers, int d_ff, int d_model, const BundleFormat& bf, Activation act, int t_max,
              int n_slots, const SparseOptions& opt, const FileLayout* layout, std::vector<const void*> resident);

    ~SparseFfn();  // waits for reads in flight into its buffers
    SparseFfn(const SparseFfn&) = delete;
    SparseFfn& operator=(const SparseFfn&) = delete;
    // DRAM this class owns (neuron caches, buffers, index), excluding the predictor.
    size_t bytes() const;
    static size_t fixed_bytes(int n_layers, int d_ff, int d_model, const BundleFormat& bf, int t_max, int n_slots,
                              const SparseOptions& opt, const FileLayout* layout);
    static size_t row_bytes(int d_model, const BundleFormat& bf);  // one cached bundle (64-byte aligned)
    // Predictor scores (T, d_ff) of layer l (for tests against the reference).
    void predictor_scores(ThreadPool& pool, int l, const float* xn, int T, float* out) {
        predictor_.scores(pool, l, xn, T, out);
    }

    Predictor& predictor() { return predictor_; }
    const Predictor& predictor() const { return predictor_; }
    Source source() const { return source_; }
    void set_resident(int l, const void* bundles) { resident_[l] = bundles; }
    // Layer l's table of split down scales (BundleFormat::down_split), resident in the model.
    void set_down_scales(int l, const uint16_t* scales) { down_scales_.at(size_t(l)) = scales; }
    const SparseOptions& options() const { return opt_; }
    const SparseStats& stats() const { return stats_; }
    const IoStats* io_stats() const { return reader_ ? &reader_->stats() : nullptr; }
    bool direct() const { return reader_ ? reader_->direct() : false; }
    void reset_stats();
    void clear_neuron_cache();
    int neurons_cached(int layer) const { return neuron_caches_.empty() ? 0 : neuron_caches_[layer].size(); }
    // Replaces the predictor by fixed selections (for replaying traces): (n_steps, n_layers, k)
    // neuron ids; the t-th token a layer runs (counted since the model was made) uses row t % n_steps.
    // score: the loaded predictor still scores every token, its scores unused (a replay on a model
    // whose predictor cannot pick, e.g. random weights, then pays a real predictor's time).
    // ahead: (n_steps, n_layers, ahead_m) neuron ids, most likely first, -1 for none: what a
    // predictor a layer ahead would read for each token and layer (read_ahead), else nothing is read ahead.
    void set_trace(std::vector<int32_t> ids, int n_steps, int k, bool score = false, std::vector<int32_t> ahead = {},
                   int ahead_m = 0);
    // out (T, d_model) += FFN(xn (T, d_model)) of layer l; token t is at position positions[t] of
    // the sequence in slot slots[t]. A sequence that restarts before where it was (a new one at
    // position 0, a shorter shared prefix) forgets its window's picks from there on; the neuron
    // cache keeps its rows, which stay valid weights.
    void forward(ThreadPool& pool, int l, float* out, const float* xn, int T, const FfnScratch& s,
                 const int32_t* slots, const int32_t* positions);

  private:
    void rewind(const int32_t* slots, const int32_t* positions, int T);
    void select(ThreadPool& pool, int l, const float* xn, int T, const int32_t* slots, const int32_t* positions);
    // A round of reads. There are two staging buffers (where staging_rows >= 2): one round is read
    // while the one before it computes, and at sparsity 0 the next layer's first misses are read
    // while the last round computes and the next layer's attention runs.
    struct Round {
        FlashReads reads;
        std::vector<int32_t> pending;  // list positions of the neurons it reads, in plan order
        int lo = 0, hi = 0;            // the list positions it computes: its misses and the hits among them
        bool submitted = false;        // its reads are in flight
    };
    static int staging_buffers(const SparseOptions& opt);  // 1 or 2, each of staging_rows and staging_bytes
    void read_and_compute(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s);
    void stream_layer(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s);
    int plan_round(Round& r, int l, int from);  // plans list positions from `from` on; returns where it stopped
    void plan_ahead(Round& r, int l);           // sparsity 0: layer l's first misses, submitted now
    bool ahead_still_valid(int l) const;        // the round submitted ahead is what layer l would plan
    // sparsity > 0, one token: layer l's likeliest neurons, scored on the layer before's input xn,
    // submitted into ahead_rounds_[l % 2]; use_ahead: layer l takes those of its list as read
    static int ahead_rows(const SparseOptions& opt) { return std::min(opt.read_ahead, opt.staging_rows); }
    bool can_read_ahead(int l, int T) const;
    void plan_sparse_ahead(ThreadPool& pool, int l, const float* xn);
    void use_ahead(int l);
    bool submit(Round& r);                      // its reads to the I/O threads; false when it has none
    void wait_for(Round& r);
    void compute_round(ThreadPool& pool, int l, const float* xn, int T, const FfnScratch& s, Round& r);
    // One token, block formats: the cached list entries' gate and up, while the first round reads.
    void activate_cached_early(ThreadPool& pool, int l, const FfnScratch& s);
    void drain() noexcept;  // waits for reads in flight (errors dropped) and forgets the round read ahead

    Source source_;
    int n_layers_, d_ff_, d_model_, t_max_, n_slots_;
    BundleFormat bf_;
    Activation act_;
    SparseOptions opt_;
    Predictor predictor_;
    std::vector<const void*> resident_;
    std::vector<const uint16_t*> down_scales_;  // (n_layers) split down scales, or null
    FileLayout layout_;
    std::unique_ptr<DirectReader> reader_;
    Round rounds_[2];
    int n_rounds_ = 1;
    int ahead_layer_ = -1;     // the layer whose first round ahead_ holds, submitted ahead (-1: none)
    Round* ahead_ = nullptr;
    // Sparse read-ahead: two buffers by layer parity, since layer l's rows read ahead are computed
    // through its last round while layer l + 1's are read. Their rounds' pending holds neuron ids.
    Round ahead_rounds_[2];
    int sparse_ahead_layer_ = -1;  // the layer ahead_rounds_[layer % 2] reads or has read for (-1: none)
    std::vector<NeuronCache> neuron_caches_;  // (n_layers) flash only
    std::vector<int64_t> step_;         // (n_layers) steps run per layer
    SparseStats stats_;

    std::vector<int32_t> trace_, ahead_trace_;
    int trace_steps_ = 0, trace_k_ = 0, ahead_trace_m_ = 0;
    bool trace_scores_ = false;
    int n_list_ = 0;
    bool has_mask_ = false;
    bool early_used_ = false;  // this layer call's cached entries have their activations in early_

    // Per call scratch, sized once.
    Buffer scores_;     // (t_max, d_ff) f32 predictor scores
    Buffer order_;      // (d_ff) int32 candidate ids for top-k
    Buffer uses_;       // (t_max, d_ff) uint8: token t computes with neuron i
    Buffer last_pick_;  // (n_layers, d_ff) int64: token count when the neuron was last picked (the cache's clock)
    Buffer window_pick_;  // (n_slots, n_layers, d_ff) int32: position of the sequence's last pick
    std::vector<int32_t> next_pos_;  // (n_slots) the position after each sequence's last token
    Buffer hotness_;    // (n_layers, d_ff) f32: picks decayed by kHotDecay per token (flash, hot only)
    Buffer in_list_;    // (d_ff) uint8: neuron i is in this call's list
    Buffer picked_now_; // (d_ff) uint8: some token of this call picked neuron i
    Buffer list_;       // (d_ff) int32 neurons computed this call, ascending
    Buffer list_mask_;  // (t_max, n_list) uint8: token t computes with list entry p
    Buffer rows_;       // (d_ff) const void* bundle of each list entry
    Buffer early_;      // (d_ff) f32 gated activations computed early (one token, block formats)
    Buffer ready_;      // (d_ff) uint8: early_[p] holds list entry p's
    Buffer early_pos_;  // (d_ff) int32 the list positions computed early
    Buffer ahead_row_;  // (d_ff) const void*: this call's neurons read ahead, their bundle (else null)
    std::vector<int32_t> ahead_ids_;  // (d_ff) the neurons a read-ahead plans, ascending
    std::vector<int32_t> admit_ids_;   // neurons read in a round, hottest first (neuron cache admission)
    std::vector<const void*> admit_rows_;
    std::vector<int32_t> admit_slots_;  // the cache slot each admitted neuron's row is copied to
};

}  // namespace fm
