// Decoder-only transformers of the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) and Gemma 3:
// config, weights, run state and the forward pass (batched prefill and single-token decode share
// one code path). What differs between them is in Config: the FFN's activation, norms on q/k and
// on the block outputs, the embedding scale, and per-layer sliding-window attention (a layer with
// a window keeps only the last positions in its KV cache, as a ring) with its own rope.
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "core/activation.h"
#include "core/buffer.h"
#include "core/dtype.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "ffn/sparse_ffn.h"
#include "model/kv_cache.h"
#include "model/weight_stream.h"

namespace fm {

// One tensor of the model as the engine loads it (Model::load_tensor's kind): layer -1 for the
// global ones; shape (rows, weights per row), or (n) for a vector; a bundle row in bytes when the
// bundles are in block formats.
struct TensorSpec {
    std::string kind;
    int layer;
    std::vector<int64_t> shape;
};

// The name a tensor of `kind` (layer -1: a global one) has in a converted folder: HF
// transformers' name ("model.layers.3.self_attn.q_proj.weight"; "model.layers.3.mlp.bundles").
std::string tensor_name(const std::string& kind, int layer);
// The inverse: the kind and layer of a converted folder's tensor; an exception names an unknown one.
std::pair<std::string, int> tensor_kind(const std::string& name);

struct Config {
    int vocab_size = 0;
    int d_model = 0;
    int d_ff = 0;     // FFN neurons per layer
    int n_layers = 0;
    int n_heads = 0;
    int n_kv_heads = 0;
    int head_dim = 0;
    int max_context = 0;  // KV cache length (per sequence)
    int max_batch = 1;    // KV-cache slots: sequences held, and decoded together (forward_batch), at once
    int prefill_chunk = 0;  // prompt tokens per forward pass (0: 256); the run state scales with it
    float norm_eps = 1e-5f;
    bool tied_embeddings = false;
    bool qkv_bias = false;  // Qwen2
    Activation activation = Activation::SiLU;  // the FFN's gate: SwiGLU (silu) or GeGLU (gelu_tanh, Gemma)
    bool qk_norm = false;     // RMSNorm over each head of q and of k before rope (Gemma 3): q_norm, k_norm
    bool post_norms = false;  // RMSNorm on the attention and FFN outputs before their residual adds
                              // (Gemma 2/3): attn_post_norm, ffn_post_norm
    float embed_scale = 1.0f; // token embeddings are multiplied by this (Gemma: sqrt(d_model))
    float attn_scale = 0.0f;  // attention scores' scale (0: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-0.5)
    // Sliding-window attention: layer l attends to its last layer_window[l] positions (itself
    // included), 0: to all. Empty: every layer attends to all (Mistral: every entry the same).
    std::vector<int> layer_window;
    std::vector<float> rope_inv_freq_local;  // the rope of the layers with a window (empty: rope_inv_freq)
    // formats of the FFN's neuron bundles (each matrix has its own format; norms and biases are f32)
    BundleFormat ffn_bundle;
    std::vector<float> rope_inv_freq;  // (head_dim/2), scaling already applied (computed in Python)
    float rope_attention_scaling = 1.0f;
    DType kv_dtype = DType::F32;  // the KV cache's storage: f32 or f16

    // The weight schema: the shape of each tensor kind, and every tensor the model needs with
    // its FFN as neuron bundles, as three matrices, or streamed ("bundles", "matrices", "none").
    std::vector<int64_t> tensor_shape(const std::string& kind) const;
    std::vector<TensorSpec> schema(const std::string& ffn) const;

    int window(int layer) const { return layer_window.empty() ? 0 : layer_window[layer]; }
    int q_dim() const { return n_heads * head_dim; }
    int kv_dim() const { return n_kv_heads * head_dim; }
    void validate() const;
};

struct LayerWeights {
    Buffer attn_norm;    // (d_model) f32
    Tensor wq;           // (q_dim, d_model)
    Tensor wk, wv;       // (kv_dim, d_model)
    Tensor wo;           // (d_model, q_dim)
    Buffer bq, bk, bv;   // (q_dim), (kv_dim), (kv_dim) f32, only with qkv_bias
    Buffer q_norm, k_norm;                 // (head_dim) f32, only with qk_norm
    Buffer attn_post_norm, ffn_post_norm;  // (d_model) f32, only with post_norms
    Buffer ffn_norm;     // (d_model) f32
    // The FFN in DRAM is one of: neuron bundles (float formats; what flash streaming reads), or
    // the three matrices as a checkpoint stores them (any format; block formats are kept so).
    Buffer ffn_bundles;  // (d_ff, bundle) in Config::ffn_bundle: bundle i = [gate row i | up row i | down column i]
    Tensor ffn_gate, ffn_up;  // (d_ff, d_model)
    Tensor ffn_down;          // (d_model, d_ff)
    Buffer ffn_down_scales;   // split down columns' scales, f16 (BundleFormat::down_split), with the bundles
};

struct Weights {
    Tensor embed;       // (vocab, d_model)
    Buffer final_norm;  // (d_model) f32
    Tensor lm_head;     // (vocab, d_model); empty when tied to embed
    std::vector<LayerWeights> layers;
};

// Wall time spent per part of the forward pass, accumulated until reset.
struct Profile {
    enum Part { kNorms, kQkv, kAttention, kOutProj, kFfn, kLogits, kParts };
    static constexpr const char* kNames[kParts] = {"norms_rope", "qkv", "attention", "out_proj", "ffn", "logits"};
    std::array<double, kParts> seconds{};
    int64_t tokens = 0;
};

class Model {
  public:
    Model(Config cfg, int n_threads);

    const Config& config() const { return cfg_; }
    int n_threads() const { return backend_->host_pool().size(); }
    const Backend& backend() const { return *backend_; }
    int kv_length(int slot = 0) const { return kv_.length(check_slot(slot)); }
    // How many leading positions of ids (n position identities: KvCache::set_identity) the slot's
    // KV cache holds: a new sequence with these inputs can start from there.
    int reusable(int slot, const int64_t* ids, int n) const { return kv_.reusable(check_slot(slot), ids, n); }
    int slots() const { return kv_.slots(); }
    size_t weight_bytes() const;
    size_t state_bytes() const;
    // Bytes the resident weights will take once loaded (with or without the FFN bundles), for a
    // float model; block formats are known only from the file (configure_sparse's argument).
    size_t expected_weight_bytes(bool ffn_resident) const;
    // Every byte this engine owns: weights, run state and KV cache, the sparse FFN (predictor,
    // neuron cache, read buffers).
    size_t owned_bytes() const;

    // Sparse FFN: the neurons a predictor picks per token, from the resident bundles (source
    // Resident) or streamed from the bundle file (source Flash, layout given). Call before loading
    // weights. With a budget (bytes, 0: none), the neuron cache takes what the rest leaves, and a
    // budget below the minimum raises std::invalid_argument stating the minimum.
    // with_predictor: a sparsity predictor will be loaded (its bytes count in the budget).
    // resident_weight_bytes: what the weights to be loaded will take (the loader knows their formats
    // from the file); 0: estimated from the float bundle type (float models only).
    void configure_sparse(SparseFfn::Source source, SparseOptions opt, const FileLayout* layout, size_t budget,
                          bool with_predictor, size_t resident_weight_bytes = 0);
    SparseFfn* sparse() { return sparse_.get(); }
    // The sparsity predictor's scores (T, d_ff) for FFN inputs x (T, d_model) of layer l.
    void predictor_scores(int l, const float* x, int T, float* out) {
        FM_ARG(sparse_ && sparse_->predictor().loaded(), "no sparsity predictor loaded");
        FM_ARG(l >= 0 && l < cfg_.n_layers && T >= 1 && T <= chunk_, "layer or token count out of range");
        sparse_->predictor_scores(backend_->host_pool(), l, x, T, out);
    }
    size_t minimum_budget() const { return minimum_budget_; }  // flash: the smallest dram_budget that works
    // FFN inputs (after the FFN norm) of every layer for T tokens from position 0: out (n_layers, T, d_model).
    void ffn_inputs(const int32_t* tokens, int T, float* out);

    // Matrices loaded with stream=true stay in `path` (the model file) and are read when needed,
    // through a staging buffer of `staging_bytes`. Call before loading weights.
    void configure_stream(const std::string& path, size_t staging_bytes, int queue_depth, bool direct);
    const WeightStream* stream() const { return stream_.get(); }
    WeightStream* stream() { return stream_.get(); }
    // Loads one tensor from `path` at byte `offset`. kind: embed, final_norm, lm_head, attn_norm,
    // wq, wk, wv, wo, bq, bk, bv, ffn_norm, ffn_bundles, ffn_down_scales (f16), ffn_gate, ffn_up, ffn_down; layer: -1 for
    // the global ones. format: the matrices' own (any of core/format.h; norms and biases f32,
    // bundles Config::dtype); shape: (rows, weights per row), as the model defines it (a row of a
    // block format is stored as its blocks); ffn_bundles may have padded rows (shape[1] >= 3*d_model).
    // stream: a matrix (embed, lm_head, wq, wk, wv, wo) is only described, not read (configure_stream).
    void load_tensor(const std::string& kind, int layer, const std::string& path, uint64_t offset,
                     const std::string& dtype, const std::vector<int64_t>& shape, bool stream = false);
    // Throws naming the first missing tensor; then sizes the run state the weights' formats need.
    void check_loaded();
    // The earliest start_pos > 0 a forward pass of the slot's sequence may restart from (rewinding
    // the KV cache): a layer with a sliding window keeps only its last positions; 0 (a new
    // sequence) always works.
    int earliest_restart(int slot = 0) const;

    // Every call below runs one sequence, held in KV-cache slot `slot` (in [0, max_batch)), except
    // forward_batch, which runs one token of each of several.
    //
    // Runs T tokens (or T input embeddings of width d_model) at positions [start_pos, start_pos+T).
    // Positions before start_pos must already be in the KV cache. Writes logits (vocab) for the
    // last token, or for every token when all_logits ((T, vocab)).
    void forward_tokens(const int32_t* tokens, int T, int start_pos, float* logits, bool all_logits, int slot = 0);
    // Mixed inputs: position t is token src[t] when src[t] >= 0, else row -src[t]-1 of embeds
    // (n_embeds, d_model), e.g. memory slots spliced into a prompt. embed_ids (n_embeds, or null):
    // each row's identity (<= -2) for prefix reuse; a token position's identity is its id.
    void forward_inputs(const int32_t* src, int T, const float* embeds, int n_embeds, int start_pos, float* logits,
                        bool all_logits, int slot = 0, const int64_t* embed_ids = nullptr);
    // One decode step of B sequences (B <= the prefill chunk): token b at position positions[b] of
    // the sequence in slot slots[b] (slots distinct; positions[b] <= that slot's length, which
    // becomes positions[b] + 1). One pass over the weights for all of them: each matrix multiplies
    // the B rows at once, and the sparse FFN reads the union of their neurons once. logits (B, vocab).
    void forward_batch(const int32_t* tokens, const int32_t* slots, const int32_t* positions, int B, float* logits);
    // Final hidden states (after the final norm) of every token: out (T, d_model).
    void hidden_states(const int32_t* tokens, int T, int start_pos, float* out, int slot = 0);
    // The FFN input (after the FFN norm) of `layer` at the last of T tokens run as a sequence of
    // their own, out (d_model): layers 0..layer only, attention reading only these T positions. Its
    // keys and values go to rows [at, at + T) of the KV cache, which otherwise stays as it was: with
    // at >= the cached length, the cached sequence can go on (the memory key encoder runs between
    // generations this way). Layers with a sliding window need at = 0 (their rings would wrap).
    void sequence_state(const int32_t* tokens, int T, int layer, int at, float* out, int slot = 0);
    // Logits (T, vocab) of every one of T tokens run as a sequence of their own in KV rows
    // [at, at + T), as sequence_state() (the memory relevance check runs this way).
    void sequence_logits(const int32_t* tokens, int T, int at, float* out, int slot = 0);
    const Profile& profile() const { return prof_; }
    void reset_profile() { prof_ = Profile{}; }

    // Input embeddings of tokens: out (T, d_model).
    void embed(const int32_t* tokens, int T, float* out);

  private:
    enum class Output { LastLogits, AllLogits, Hidden, None };
    // fill(t0, n, x): the inputs of positions [t0, t0 + n) into x; ident(t): position t's identity.
    template <typename Fill, typename Ident>
    void forward(int T, int start_pos, int slot, float* out, Output what, Fill&& fill, Ident&& ident);
    int check_slot(int slot) const;  // slot, or an exception
    void check_positions(int T, int start_pos, int slot) const;
    // Runs `run` with attention reading only positions from `at` on (a sequence of its own in KV
    // rows [at, at + T) of the slot); the cached sequence before `at` stays usable.
    template <typename Run>
    void own_sequence(int T, int at, int slot, const char* what, Run&& run);
    // The T tokens in x_ through the layers, at the positions and slots of tok_pos_ and tok_slot_.
    void run_layers(int T);
    void layer_forward(int l, int T);
    // The backend's scratch for the weights loaded (check_loaded) or, before, for float weights.
    ScratchNeeds scratch_needs() const;
    void check_tokens(const int32_t* tokens, int T) const;                    // ids in [0, vocab)
    void gather_embeddings(const int32_t* tokens, int T, float* out) const;  // unchecked; times embed_scale
    void fill_rope(int T);  // the cos/sin tables of the T tokens' positions (tok_pos_)
    // Reads streamed matrices (up to 4) into the weight stream's staging buffer: out[i] = rows of tensor i.
    void stage(std::initializer_list<const Tensor*> tensors, const char** out, const char* what) const;
    void compute_logits(const float* x, int T, float* logits);

    // Adds the time since the last mark to `part` of the profile.
    void mark(Profile::Part part) {
        auto now = std::chrono::steady_clock::now();
        prof_.seconds[part] += std::chrono::duration<double>(now - last_mark_).count();
        last_mark_ = now;
    }

    Config cfg_;
    std::unique_ptr<Backend> backend_;  // runs the forward pass's operations (backend/backend.h)
    Profile prof_;
    std::chrono::steady_clock::time_point last_mark_;
    Weights w_;
    int chunk_;  // tokens per prefill chunk
    bool loaded_ = false;  // check_loaded() passed: every tensor and the run state it needs are there

    // Run state, (chunk) rows each.
    Buffer x_;         // (chunk, d_model) residual stream
    Buffer xn_;        // (chunk, d_model) normed residual
    Buffer q_;         // (chunk, q_dim)
    Buffer att_out_;   // (chunk, q_dim)
    Buffer proj_;      // (chunk, d_model) attention output projection; the FFN's output with post norms
    // (the backend holds the per-thread scratch of the kernels: backend_->scratch_bytes())
    std::unique_ptr<SparseFfn> sparse_;
    std::unique_ptr<WeightStream> stream_;  // offload="all": matrices read from the model file when needed
    size_t minimum_budget_ = 0;
    float* capture_ = nullptr;  // ffn_inputs(): (n_layers, capture_T_, d_model)
    int capture_T_ = 0, capture_t0_ = 0;
    int attend_from_ = 0;        // the first position attention reads (sequence_state(): its own start)
    int last_layer_ = -1;        // sequence_state(): the forward pass stops after this layer
    float* capture_last_ = nullptr;  // sequence_state(): the last position's FFN input of last_layer_
    Buffer rope_cos_, rope_sin_;  // (2, chunk, head_dim/2) this chunk's positions: global, then local rope
    KvCache kv_;
    std::vector<int> windows_;    // per layer: its sliding window (0: none)
    Buffer kv_new_;               // (2, chunk, kv_dim) f32 new keys and values, when not written in place
    // The tokens of the chunk being run: position, KV slot; one_run_: one slot, consecutive positions.
    std::vector<int> tok_pos_, tok_slot_;
    bool one_run_ = true;
};

}  // namespace fm
