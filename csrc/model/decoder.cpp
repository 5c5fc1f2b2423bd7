#include "model/decoder.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include "backend/cpu_backend.h"
#include "core/error.h"
#include "io/file.h"
#include "kernels/cpu/kernels.h"
#include "kernels/quant/quant.h"

namespace fm {

namespace {
constexpr int kMaxChunk = 256;  // prompt tokens per prefill pass
}

void Config::validate() const {
    FM_ARG(vocab_size > 0 && d_model > 0 && d_ff > 0 && n_layers > 0, "config: vocab_size, hidden_size, ",
           "intermediate_size and num_hidden_layers must be positive");
    FM_ARG(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "config: num_attention_heads (", n_heads,
           ") must be a positive multiple of num_key_value_heads (", n_kv_heads, ")");
    FM_ARG(head_dim > 0 && head_dim % 2 == 0, "config: head_dim must be positive and even, got ", head_dim);
    FM_ARG(max_context > 0, "max_context must be positive, got ", max_context);
    FM_ARG(prefill_chunk >= 0, "prefill_chunk must be >= 0, got ", prefill_chunk);
    FM_ARG(max_batch >= 1 && max_batch <= 4096, "max_batch must be in [1, 4096], got ", max_batch);
    FM_ARG(int(rope_inv_freq.size()) == head_dim / 2, "config: rope_inv_freq has ", rope_inv_freq.size(),
           " entries, expected head_dim/2 = ", head_dim / 2);
    FM_ARG(kv_dtype == DType::F32 || kv_dtype == DType::F16, "kv_dtype must be f32 or f16, got ", dtype_name(kv_dtype));
    FM_ARG(std::isfinite(embed_scale) && embed_scale > 0, "config: embed_scale must be positive, got ", embed_scale);
    FM_ARG(std::isfinite(attn_scale) && attn_scale >= 0, "config: attn_scale must be >= 0 (0: 1/sqrt(head_dim)), got ",
           attn_scale);
    FM_ARG(layer_window.empty() || int(layer_window.size()) == n_layers, "config: layer_window has ",
           layer_window.size(), " entries, expected one per layer (", n_layers, ") or none");
    for (size_t l = 0; l < layer_window.size(); ++l)
        FM_ARG(layer_window[l] >= 0, "config: layer_window[", l, "] must be >= 0 (0: no window), got ", layer_window[l]);
    FM_ARG(rope_inv_freq_local.empty() || int(rope_inv_freq_local.size()) == head_dim / 2,
           "config: rope_inv_freq_local has ", rope_inv_freq_local.size(), " entries, expected head_dim/2 = ",
           head_dim / 2, " or none");
    ffn_bundle.validate(d_model, d_ff);
}

std::vector<int64_t> Config::tensor_shape(const std::string& kind) const {
    const int64_t d = d_model, q = q_dim(), kv = kv_dim();
    if (kind == "embed" || kind == "lm_head") return {vocab_size, d};
    if (kind == "final_norm" || kind == "attn_norm" || kind == "ffn_norm" || kind == "attn_post_norm" ||
        kind == "ffn_post_norm")
        return {d};
    if (kind == "q_norm" || kind == "k_norm") return {head_dim};
    if (kind == "wq") return {q, d};
    if (kind == "wk" || kind == "wv") return {kv, d};
    if (kind == "wo") return {d, q};
    if (kind == "bq") return {q};
    if (kind == "bk" || kind == "bv") return {kv};
    if (kind == "ffn_gate" || kind == "ffn_up") return {d_ff, d};
    if (kind == "ffn_down") return {d, d_ff};
    if (kind == "ffn_bundles")  // a row: 3*d_model floats, or the bytes of its three block-format pieces
        return {d_ff, ffn_bundle.is_float() ? 3 * d : int64_t(ffn_bundle.bytes(d_model))};
    if (kind == "ffn_down_scales") return {ffn_bundle.scale_rows(d_ff), ffn_bundle.scale_cols(d_model)};
    FM_ARG(false, "unknown tensor kind '", kind, "'");
}

namespace {
// kind -> name in a converted folder, after "model.layers.{l}." for the per-layer kinds: HF Llama's
// names; Gemma's extra norms as HF Gemma names them, but its norm on the attention output (HF
// "post_attention_layernorm", the FFN's input norm in Llama) is "self_attn.post_norm".
constexpr std::pair<const char*, const char*> kGlobalNames[] = {
    {"embed", "model.embed_tokens.weight"}, {"final_norm", "model.norm.weight"}, {"lm_head", "lm_head.weight"}};
constexpr std::pair<const char*, const char*> kLayerNames[] = {
    {"attn_norm", "input_layernorm.weight"},    {"wq", "self_attn.q_proj.weight"},
    {"wk", "self_attn.k_proj.weight"},          {"wv", "self_attn.v_proj.weight"},
    {"wo", "self_attn.o_proj.weight"},          {"bq", "self_attn.q_proj.bias"},
    {"bk", "self_attn.k_proj.bias"},            {"bv", "self_attn.v_proj.bias"},
    {"ffn_norm", "post_attention_layernorm.weight"}, {"ffn_bundles", "mlp.bundles"},
    {"ffn_down_scales", "mlp.down_scales"},
    {"ffn_gate", "mlp.gate_proj.weight"},       {"ffn_up", "mlp.up_proj.weight"},
    {"ffn_down", "mlp.down_proj.weight"},       {"q_norm", "self_attn.q_norm.weight"},
    {"k_norm", "self_attn.k_norm.weight"},      {"attn_post_norm", "self_attn.post_norm.weight"},
    {"ffn_post_norm", "post_feedforward_layernorm.weight"}};
constexpr const char* kLayerPrefix = "model.layers.";
}  // namespace

std::string tensor_name(const std::string& kind, int layer) {
    for (const auto& [k, name] : kGlobalNames)
        if (kind == k) {
            FM_ARG(layer == -1, "tensor '", kind, "' is global (layer -1), got layer ", layer);
            return name;
        }
    for (const auto& [k, name] : kLayerNames)
        if (kind == k) {
            FM_ARG(layer >= 0, "tensor '", kind, "' belongs to a layer (>= 0), got ", layer);
            return kLayerPrefix + std::to_string(layer) + "." + name;
        }
    FM_ARG(false, "unknown tensor kind '", kind, "'");
    return {};
}

std::pair<std::string, int> tensor_kind(const std::string& name) {
    for (const auto& [k, n] : kGlobalNames)
        if (name == n) return {k, -1};
    const size_t np = std::strlen(kLayerPrefix);
    if (name.compare(0, np, kLayerPrefix) == 0) {
        size_t end = np;
        while (end < name.size() && end - np < 9 && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
        if (end > np && end < name.size() && name[end] == '.') {
            const std::string rest = name.substr(end + 1);
            for (const auto& [k, n] : kLayerNames)
                if (rest == n) return {k, std::stoi(name.substr(np, end - np))};
        }
    }
    FM_ARG(false, "unexpected tensor '", name, "' (not one of the model's weights)");
    return {};
}

std::vector<TensorSpec> Config::schema(const std::string& ffn) const {
    FM_ARG(ffn == "bundles" || ffn == "matrices" || ffn == "none", "schema: ffn must be 'bundles', 'matrices' ",
           "(the three FFN matrices) or 'none' (streamed), got '", ffn, "'");
    std::vector<TensorSpec> out;
    auto add = [&](const char* kind, int layer) { out.push_back({kind, layer, tensor_shape(kind)}); };
    add("embed", -1);
    for (int l = 0; l < n_layers; ++l) {
        for (const char* k : {"attn_norm", "wq", "wk", "wv", "wo", "ffn_norm"}) add(k, l);
        if (qkv_bias)
            for (const char* k : {"bq", "bk", "bv"}) add(k, l);
        if (qk_norm)
            for (const char* k : {"q_norm", "k_norm"}) add(k, l);
        if (post_norms)
            for (const char* k : {"attn_post_norm", "ffn_post_norm"}) add(k, l);
        if (ffn == "bundles") add("ffn_bundles", l);
        if (ffn != "matrices" && ffn_bundle.down_split) add("ffn_down_scales", l);
        if (ffn == "matrices")
            for (const char* k : {"ffn_gate", "ffn_up", "ffn_down"}) add(k, l);
    }
    add("final_norm", -1);
    if (!tied_embeddings) add("lm_head", -1);
    return out;
}

Model::Model(Config cfg, int n_threads) : cfg_(std::move(cfg)) {
    cfg_.validate();
    kernels();  // fails early on a CPU without AVX2
    backend_ = std::make_unique<CpuBackend>(n_threads);
    const Config& c = cfg_;
    const int chunk = c.prefill_chunk > 0 ? c.prefill_chunk : kMaxChunk;
    chunk_ = c.max_context < chunk ? c.max_context : chunk;
    const size_t f = sizeof(float);
    w_.layers.resize(c.n_layers);
    Backend& b = *backend_;
    x_ = b.allocate(f * chunk_ * c.d_model);
    xn_ = b.allocate(f * chunk_ * c.d_model);
    q_ = b.allocate(f * chunk_ * c.q_dim());
    att_out_ = b.allocate(f * chunk_ * c.q_dim());
    proj_ = b.allocate(f * chunk_ * c.d_model);
    rope_cos_ = b.allocate(f * 2 * size_t(chunk_) * (c.head_dim / 2));
    rope_sin_ = b.allocate(f * 2 * size_t(chunk_) * (c.head_dim / 2));
    b.reserve(scratch_needs());
    std::vector<int> rows;
    for (int l = 0; l < c.n_layers; ++l) {
        const int w = c.window(l);
        windows_.push_back(w);
        rows.push_back(w > 0 && int64_t(w) + chunk_ < c.max_context ? w + chunk_ : c.max_context);
    }
    kv_.allocate(std::move(rows), c.max_context, c.max_batch, c.kv_dim(), c.kv_dtype);
    kv_new_ = b.allocate(f * 2 * size_t(chunk_) * c.kv_dim());
    tok_pos_.assign(chunk_, 0);
    tok_slot_.assign(chunk_, 0);
}

void Model::fill_rope(int T) {
    const Config& c = cfg_;
    const int half = c.head_dim / 2;
    for (int set = 0; set < (c.rope_inv_freq_local.empty() ? 1 : 2); ++set) {
        const float* inv = set ? c.rope_inv_freq_local.data() : c.rope_inv_freq.data();
        const float scale = set ? 1.0f : c.rope_attention_scaling;
        float* cs = rope_cos_.data<float>() + size_t(set) * chunk_ * half;
        float* sn = rope_sin_.data<float>() + size_t(set) * chunk_ * half;
        for (int t = 0; t < T; ++t)
            for (int i = 0; i < half; ++i) {
                const float angle = float(tok_pos_[t]) * inv[i];  // f32 product, as HF computes it
                cs[size_t(t) * half + i] = float(std::cos(double(angle))) * scale;
                sn[size_t(t) * half + i] = float(std::sin(double(angle))) * scale;
            }
    }
}

int Model::earliest_restart(int slot) const { return kv_.earliest_restart(check_slot(slot), windows_); }

int Model::check_slot(int slot) const {
    FM_ARG(slot >= 0 && slot < kv_.slots(), "KV-cache slot ", slot, " out of range [0, ", kv_.slots(),
           ") (load with max_batch to hold more sequences)");
    return slot;
}

size_t Model::weight_bytes() const {
    size_t n = w_.embed.size() + w_.final_norm.size() + w_.lm_head.size();
    for (const auto& L : w_.layers)
        n += L.attn_norm.size() + L.wq.size() + L.wk.size() + L.wv.size() + L.wo.size() + L.bq.size() +
             L.bk.size() + L.bv.size() + L.ffn_norm.size() + L.ffn_bundles.size() + L.ffn_gate.size() +
             L.ffn_up.size() + L.ffn_down.size() + L.ffn_down_scales.size();
    return n;
}

size_t Model::state_bytes() const {
    return x_.size() + xn_.size() + q_.size() + att_out_.size() + proj_.size() + backend_->scratch_bytes() +
           rope_cos_.size() + rope_sin_.size() + kv_.bytes() + kv_new_.size() + (stream_ ? stream_->bytes() : 0);
}

void Model::configure_stream(const std::string& path, size_t staging_bytes, int queue_depth, bool direct) {
    FM_ARG(weight_bytes() == 0 && !sparse_, "configure the weight stream before the sparse FFN and the weights");
    stream_ = std::make_unique<WeightStream>(path, staging_bytes, queue_depth, direct);
}

size_t Model::expected_weight_bytes(bool ffn_resident) const {
    const Config& c = cfg_;
    FM_ARG(c.ffn_bundle.is_float(), "expected_weight_bytes: the weights' formats are known only from their file; ",
           "give the resident bytes to configure_sparse");
    auto buf = [](size_t n) { return Buffer::footprint(n); };  // vectors and bundles
    auto mat = [](size_t n) { return Tensor::footprint(n); };    // matrices
    const size_t esz = dtype_size(c.ffn_bundle.float_type()), d = c.d_model, q = c.q_dim(), kv = c.kv_dim();
    size_t n = mat(esz * c.vocab_size * d) * (c.tied_embeddings ? 1 : 2) + buf(4 * d);
    size_t layer = 2 * buf(4 * d) + mat(esz * q * d) + 2 * mat(esz * kv * d) + mat(esz * d * q);
    if (c.qkv_bias) layer += buf(4 * q) + 2 * buf(4 * kv);
    if (c.qk_norm) layer += 2 * buf(4 * size_t(c.head_dim));
    if (c.post_norms) layer += 2 * buf(4 * d);
    if (ffn_resident) layer += buf(esz * c.d_ff * 3 * d);
    return n + layer * c.n_layers;
}

size_t Model::owned_bytes() const {
    size_t n = weight_bytes() + state_bytes();
    if (sparse_) n += sparse_->bytes() + sparse_->predictor().bytes();
    return n;
}

void Model::configure_sparse(SparseFfn::Source source, SparseOptions opt, const FileLayout* layout, size_t budget,
                             bool with_predictor, size_t resident_weight_bytes) {
    const Config& c = cfg_;
    FM_ARG(weight_bytes() == 0, "configure the sparse FFN before loading weights");
    opt.validate();
    const bool flash = source == SparseFfn::Source::Flash;
    if (flash) {
        FM_ARG(layout, "offload to flash needs the bundle file's FileLayout");
        layout->validate(c.n_layers, c.ffn_bundle.bytes(c.d_model));
    }
    if (flash && opt.staging_rows <= 0) {
        // default: a whole layer's bundles per round, in a read buffer of at most 8 MiB (4 MiB when
        // the budget is under 256 MiB, 2 MiB under 128 MiB, where it competes with the neuron
        // cache): packed small bundles share blocks, so a layer of SmolLM2's fits in 2 MiB
        opt.staging_rows = c.d_ff;
        opt.staging_bytes = !budget || budget >= (size_t(256) << 20) ? size_t(8) << 20
                            : budget >= (size_t(128) << 20)           ? size_t(4) << 20
                                                                      : size_t(2) << 20;
    }
    // read ahead at sparsity > 0: by default an eighth of a layer's neurons, the likeliest (the
    // predictor a layer ahead gets 91% of them right on SmolLM2, 85% on Gemma 3 270M), where
    // each piece read (a bundle, or unbundled its gate row, up row, down column) fills a 4 KiB
    // block at least: smaller ones share blocks with their neighbours, which the layer's own
    // rounds would then read again (SmolLM2's q4_1 bundles, 1080 bytes: +35% read)
    if (opt.read_ahead < 0) {
        const bool whole_blocks =
            flash && *std::min_element(layout->piece_bytes.begin(), layout->piece_bytes.end()) >= kIoAlign;
        opt.read_ahead = opt.sparsity > 0 && whole_blocks ? std::max(1, c.d_ff / 8) : 0;
    }
    const size_t predictor =
        with_predictor ? Predictor::bytes_for(c.n_layers, c.d_ff, c.d_model, chunk_, opt.predictor_rank) : 0;
    const size_t row = SparseFfn::row_bytes(c.d_model, c.ffn_bundle);
    SparseOptions sized = opt;
    sized.cache_rows = flash ? c.d_ff : 0;  // for the index part of fixed_bytes
    const size_t weights = resident_weight_bytes ? resident_weight_bytes : expected_weight_bytes(!flash);
    // the activation blocks check_loaded reserves for block formats, counted in any case
    ScratchNeeds every_format = scratch_needs();
    every_format.block_formats = every_format.precise_head = true;
    const size_t act = backend_->activation_bytes(every_format);
    const size_t fixed = weights + state_bytes() + act + predictor +
                         SparseFfn::fixed_bytes(c.n_layers, c.d_ff, c.d_model, c.ffn_bundle, chunk_, c.max_batch, sized,
                                                flash ? layout : nullptr) + (size_t(1) << 16);
    minimum_budget_ = flash ? fixed : 0;
    if (flash) {
        if (budget) {
            FM_ARG(budget >= fixed, "dram_budget ", budget, " bytes is below the minimum ", fixed,
                   " bytes (resident weights ", weights, ", run state and KV cache for max_context ",
                   c.max_context, " ", state_bytes() + act, ", predictor ", predictor, ", read buffers and index ",
                   fixed - weights - state_bytes() - act - predictor,
                   "); raise the budget or lower max_context");
            opt.cache_rows = int(std::min<size_t>(c.d_ff, (budget - fixed) / (size_t(c.n_layers) * row)));
        } else if (opt.cache_rows < 0) {
            opt.cache_rows = c.d_ff;
        }
    }
    std::vector<const void*> resident;
    if (!flash) resident.resize(c.n_layers, nullptr);  // filled once the bundles are loaded
    sparse_.reset();  // a second configuration (the loader's, once it knows what stays resident) frees the first's
    sparse_ = std::make_unique<SparseFfn>(source, c.n_layers, c.d_ff, c.d_model, c.ffn_bundle, c.activation, chunk_,
                                          c.max_batch, opt, layout, resident);
}

void Model::load_tensor(const std::string& kind, int layer, const std::string& path, uint64_t offset,
                        const std::string& format, const std::vector<int64_t>& shape, bool stream) {
    const Config& c = cfg_;
    const std::string what = "tensor '" + kind + (layer >= 0 ? "' of layer " + std::to_string(layer) : "'");
    const bool per_layer = kind != "embed" && kind != "final_norm" && kind != "lm_head";
    FM_ARG(per_layer ? (layer >= 0 && layer < c.n_layers) : layer == -1, what, ": layer index ", layer,
           " out of range [0, ", c.n_layers, ")");
    LayerWeights* L = per_layer ? &w_.layers[layer] : nullptr;
    if (kind.rfind("pred_", 0) == 0) {  // predictor tensors (see ffn/predictor.h)
        FM_ARG(sparse_, what, ": configure the sparse FFN before loading a predictor");
        const char* want_dtype;
        std::vector<int64_t> want;
        Buffer& buf = sparse_->predictor().tensor(layer, kind.substr(5), want, want_dtype);
        FM_ARG(format == want_dtype, what, " in '", path, "': expected dtype ", want_dtype, ", got ", format);
        FM_ARG(shape == want, what, " in '", path, "': expected shape (", want[0], want.size() == 2 ? ", " : "",
               want.size() == 2 ? std::to_string(want[1]) : std::string(), "), got another");
        const size_t esz = format == "u8" || format == "i8" ? 1 : 4;
        const size_t n = size_t(want[0]) * (want.size() == 2 ? size_t(want[1]) : 1) * esz;
        buf.allocate(n);
        File(path).read_exact(buf.data(), n, offset, what);
        if (kind == "pred_outlier_dims") sparse_->predictor().check_outlier_dims(layer, path);
        if (kind == "pred_lowrank_in" || kind == "pred_lowrank_out")
            sparse_->predictor().check_lowrank(layer, kind.substr(5), path);
        return;
    }

    // where the tensor goes; its shape is the schema's (Config::tensor_shape)
    const BundleFormat& bf = c.ffn_bundle;
    Tensor* matrix = nullptr;
    Buffer* vec = nullptr;
    if (kind == "embed") matrix = &w_.embed;
    else if (kind == "lm_head") matrix = &w_.lm_head;
    else if (kind == "final_norm") vec = &w_.final_norm;
    else if (kind == "attn_norm") vec = &L->attn_norm;
    else if (kind == "ffn_norm") vec = &L->ffn_norm;
    else if (kind == "wq") matrix = &L->wq;
    else if (kind == "wk") matrix = &L->wk;
    else if (kind == "wv") matrix = &L->wv;
    else if (kind == "wo") matrix = &L->wo;
    else if (kind == "bq") vec = &L->bq;
    else if (kind == "bk") vec = &L->bk;
    else if (kind == "bv") vec = &L->bv;
    else if (kind == "q_norm") vec = &L->q_norm;
    else if (kind == "k_norm") vec = &L->k_norm;
    else if (kind == "attn_post_norm") vec = &L->attn_post_norm;
    else if (kind == "ffn_post_norm") vec = &L->ffn_post_norm;
    else if (kind == "ffn_bundles") vec = &L->ffn_bundles;
    else if (kind == "ffn_down_scales") vec = &L->ffn_down_scales;
    else if (kind == "ffn_gate") matrix = &L->ffn_gate;
    else if (kind == "ffn_up") matrix = &L->ffn_up;
    else if (kind == "ffn_down") matrix = &L->ffn_down;
    else FM_ARG(false, "unknown tensor kind '", kind, "'");
    const std::vector<int64_t> expect = c.tensor_shape(kind);

    const bool bundles = kind == "ffn_bundles";
    if (bundles) {
        const std::string want = bf.is_float() ? format_name(bf.gate) : bf.name();
        FM_ARG(format == want, what, " in '", path, "': expected bundles in ", want, ", got ", format);
    }
    const bool scales = kind == "ffn_down_scales";
    FM_ARG(!scales || bf.down_split, what, ": the bundles' down columns (", bf.piece_name(2), ") are not split");
    const Format f = bundles ? (bf.is_float() ? bf.gate : Format::F32) : format_from_name(format);
    FM_ARG(matrix || bundles || f == (scales ? Format::F16 : Format::F32), what, " in '", path, "': expected dtype ",
           scales ? "f16" : "f32", ", got ", format);
    bool shape_ok = shape.size() == expect.size() && shape[0] == expect[0];
    if (shape_ok && shape.size() == 2) shape_ok = bundles ? shape[1] >= expect[1] : shape[1] == expect[1];
    if (!shape_ok) {
        std::string got, exp;
        for (auto s : shape) got += (got.empty() ? "" : ", ") + std::to_string(s);
        for (auto s : expect) exp += (exp.empty() ? "" : ", ") + std::to_string(s);
        FM_ARG(false, what, " in '", path, "': expected shape (", exp, bundles ? " or wider" : "", "), got (", got,
               ")");
    }

    FM_ARG(!stream || (matrix && kind.rfind("ffn_", 0) != 0), what, ": only embed, lm_head, wq, wk, wv and wo can "
           "be streamed");
    FM_ARG(!matrix || expect[1] % format_traits(f).block == 0, what, " in '", path, "': a row of ", expect[1],
           " weights is not a whole number of ", format_name(f), " blocks");
    if (stream) {
        FM_ARG(stream_, what, ": configure the weight stream before loading streamed tensors");
        FM_ARG(path == stream_->path(), what, " in '", path, "': streamed tensors must lie in '", stream_->path(), "'");
        matrix->stream(f, expect[0], expect[1], offset);
        FM_IO(offset + matrix->nbytes() <= stream_->file_size(), "'", path, "' is truncated: ", what, " needs bytes [",
              offset, ", ", offset + matrix->nbytes(), "), the file has ", stream_->file_size());
        return;
    }
    File file(path);
    if (matrix) {
        matrix->allocate(f, expect[0], expect[1]);
        file.read_uncached(matrix->data(), matrix->nbytes(), offset, what);
        // 8 rows interleaved, for the kernels whose lanes are rows: a layer's q4_0/q4_1 matrices
        // (2-2.7x the one-row kernel's speed), and a q8_0 LM head (tied embeddings included:
        // a lookup takes its row back out, row_from_x8)
        const bool head = kind == "lm_head" || (kind == "embed" && cfg_.tied_embeddings);
        const bool x8 = head ? f == Format::Q8_0 : kind != "embed" && f != Format::Q8_0;
        if (x8 && quant::can_repack_x8(f, matrix->rows)) {
            quant::repack_x8(f, matrix->data(), matrix->rows, int(matrix->cols));
            matrix->interleaved = true;
        }
        return;
    }
    const size_t esz = bundles && !bf.is_float() ? 1 : format_traits(f).block_bytes;
    const size_t rows = size_t(expect[0]), cols = expect.size() == 2 ? size_t(expect[1]) : 1;
    vec->allocate(rows * cols * esz);
    if (!bundles || size_t(shape[1]) == cols) {
        file.read_uncached(vec->data(), rows * cols * esz, offset, what);
    } else {  // drop the alignment padding of each bundle while reading
        const size_t src_row = size_t(shape[1]) * esz, dst_row = cols * esz;
        const size_t per_read = (size_t(8) << 20) / src_row + 1;
        Buffer tmp(per_read * src_row);
        for (size_t r = 0; r < rows; r += per_read) {
            size_t n = rows - r < per_read ? rows - r : per_read;
            file.read_exact(tmp.data(), n * src_row, offset + r * src_row, what);
            file.drop_cached(offset + r * src_row, n * src_row);
            for (size_t i = 0; i < n; ++i)
                std::memcpy(vec->data<char>() + (r + i) * dst_row, tmp.data<char>() + i * src_row, dst_row);
        }
    }
}

void Model::check_loaded() {
    const Config& c = cfg_;
    FM_IO(w_.embed.present() && w_.final_norm.size(), "model is missing its token embeddings or final norm");
    FM_IO(c.tied_embeddings || w_.lm_head.present(), "model is missing lm_head (and its embeddings are not tied)");
    const bool flash = sparse_ && sparse_->source() == SparseFfn::Source::Flash;
    for (int l = 0; l < c.n_layers; ++l) {
        const LayerWeights& L = w_.layers[l];
        const bool ffn_matrices = L.ffn_gate.size() && L.ffn_up.size() && L.ffn_down.size();
        FM_IO(L.attn_norm.size() && L.wq.present() && L.wk.present() && L.wv.present() && L.wo.present() &&
                  L.ffn_norm.size() && (flash || L.ffn_bundles.size() || (!sparse_ && ffn_matrices)),
              "model is missing tensors of layer ", l);
        if (sparse_ && !flash) sparse_->set_resident(l, L.ffn_bundles.data());
        const bool bundles = sparse_ || L.ffn_bundles.size();
        FM_IO(!c.ffn_bundle.down_split || !bundles || L.ffn_down_scales.size(), "model is missing the split down "
              "scales (ffn_down_scales) of layer ", l);
        if (sparse_) sparse_->set_down_scales(l, L.ffn_down_scales.data<uint16_t>());
        FM_IO(!c.qkv_bias || (L.bq.size() && L.bk.size() && L.bv.size()), "model is missing q/k/v biases of layer ",
              l);
        FM_IO(!c.qk_norm || (L.q_norm.size() && L.k_norm.size()), "model is missing the q/k norms of layer ", l);
        FM_IO(!c.post_norms || (L.attn_post_norm.size() && L.ffn_post_norm.size()),
              "model is missing the attention/FFN output norms of layer ", l);
    }
    backend_->reserve(scratch_needs());
    loaded_ = true;
}

ScratchNeeds Model::scratch_needs() const {
    const Config& c = cfg_;
    ScratchNeeds n;
    n.threads = n_threads(), n.chunk = chunk_, n.max_context = c.max_context;
    n.query_group = c.n_heads / c.n_kv_heads;
    n.d_model = c.d_model, n.q_dim = c.q_dim(), n.d_ff = c.d_ff, n.bundle = c.ffn_bundle;
    n.block_formats = is_block_format(w_.embed.format) || is_block_format(w_.lm_head.format);
    for (const LayerWeights& L : w_.layers) {
        const bool matrices = !L.ffn_bundles.size() && L.ffn_gate.size() && L.ffn_up.size() && L.ffn_down.size();
        n.ffn_matrices |= matrices;
        n.wide_float_rows |= matrices && !is_block_format(L.ffn_down.format);  // down's rows are d_ff long
        for (const Tensor* t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_gate, &L.ffn_up, &L.ffn_down})
            n.block_formats |= t->present() && is_block_format(t->format);
    }
    n.block_formats |= !c.ffn_bundle.is_float() && (sparse_ || (!w_.layers.empty() && w_.layers[0].ffn_bundles.size()));
    n.precise_head = is_block_format((c.tied_embeddings ? w_.embed : w_.lm_head).format);
    return n;
}

void Model::check_positions(int T, int start_pos, int slot) const {
    FM_ARG(loaded_, "the model's weights are not loaded and checked (check_loaded) yet");
    FM_ARG(T > 0, "no input positions (T = ", T, ")");
    const int length = kv_.length(check_slot(slot));
    FM_ARG(start_pos >= 0 && start_pos <= length, "start_pos ", start_pos, " must lie in [0, ", length,
           "] (positions before it must already be in the KV cache)");
    FM_ARG(int64_t(start_pos) + T <= cfg_.max_context, "context overflow: ", start_pos, " cached + ", T,
           " new positions > max_context ", cfg_.max_context);
    FM_ARG(start_pos == 0 || start_pos >= earliest_restart(slot), "start_pos ", start_pos, " is too far back: the ",
           "sliding-window layers' KV rings hold only their last positions; restart at 0 or at ", earliest_restart(slot),
           " or later");
}

void Model::check_tokens(const int32_t* tokens, int T) const {
    for (int t = 0; t < T; ++t)
        FM_ARG(tokens[t] >= 0 && tokens[t] < cfg_.vocab_size, "token id ", tokens[t], " at position ", t,
               " out of range [0, ", cfg_.vocab_size, ")");
}

void Model::gather_embeddings(const int32_t* tokens, int T, float* out) const {
    const Tensor& E = w_.embed;
    for (int t = 0; t < T; ++t) {
        float* o = out + size_t(t) * E.cols;
        const char* row = E.streamed ? nullptr : E.row(tokens[t]);
        if (E.streamed) {  // one row read from the file
            const uint64_t at = E.file_offset + uint64_t(tokens[t]) * E.row_bytes;
            stream_->fetch(&at, &E.row_bytes, 1, &row, "an embedding row");
        } else if (E.interleaved) {  // the row's blocks out of its group of 8
            thread_local std::vector<char> blocks;
            blocks.resize(E.row_bytes);
            quant::row_from_x8(E.format, E.data(), tokens[t], int(E.cols), blocks.data());
            row = blocks.data();
        }
        if (is_block_format(E.format)) quant::dequantize(E.format, row, o, E.cols);
        else kernels().to_f32[int(E.format)](o, row, int(E.cols));
        if (cfg_.embed_scale != 1.0f)
            for (int64_t k = 0; k < E.cols; ++k) o[k] *= cfg_.embed_scale;
    }
}

void Model::stage(std::initializer_list<const Tensor*> tensors, const char** out, const char* what) const {
    uint64_t offsets[4];
    size_t sizes[4];
    FM_ARG(tensors.size() <= 4, "stage: at most 4 tensors at a time, got ", tensors.size());
    int n = 0;
    for (const Tensor* t : tensors) offsets[n] = t->file_offset, sizes[n] = t->nbytes(), ++n;
    stream_->fetch(offsets, sizes, n, out, what);
}

void Model::embed(const int32_t* tokens, int T, float* out) {
    check_tokens(tokens, T);
    gather_embeddings(tokens, T, out);
}

void Model::forward_tokens(const int32_t* tokens, int T, int start_pos, float* logits, bool all_logits, int slot) {
    check_tokens(tokens, T);  // all ids before touching the cache
    forward(T, start_pos, slot, logits, all_logits ? Output::AllLogits : Output::LastLogits,
            [&](int t0, int n, float* x) { gather_embeddings(tokens + t0, n, x); }, [&](int t) { return tokens[t]; });
}

void Model::hidden_states(const int32_t* tokens, int T, int start_pos, float* out, int slot) {
    check_tokens(tokens, T);
    forward(T, start_pos, slot, out, Output::Hidden, [&](int t0, int n, float* x) { gather_embeddings(tokens + t0, n, x); },
            [&](int t) { return tokens[t]; });
}

void Model::ffn_inputs(const int32_t* tokens, int T, float* out) {
    check_tokens(tokens, T);
    capture_ = out, capture_T_ = T;
    try {
        forward(T, 0, 0, nullptr, Output::None, [&](int t0, int n, float* x) { gather_embeddings(tokens + t0, n, x); },
                [&](int t) { return tokens[t]; });
    } catch (...) {
        capture_ = nullptr;
        throw;
    }
    capture_ = nullptr;
}

template <typename Run>
void Model::own_sequence(int T, int at, int slot, const char* what, Run&& run) {
    const Config& c = cfg_;
    FM_ARG(T > 0 && at >= 0 && int64_t(at) + T <= c.max_context, what, ": positions [", at, ", ", int64_t(at) + T,
           ") do not fit in max_context ", c.max_context);
    bool windows = false;
    for (int l = 0; l < c.n_layers; ++l) windows |= c.window(l) > 0;
    FM_ARG(at == 0 || !windows, what, ": a model with sliding-window layers runs it at position 0");
    const int kept = kv_.length(check_slot(slot));
    kv_.set_length(slot, at);  // the sequence starts at `at`: nothing before it is read
    attend_from_ = at;
    try {
        run();
    } catch (...) {
        attend_from_ = 0, last_layer_ = -1, capture_last_ = nullptr;
        kv_.set_length(slot, at == 0 ? 0 : std::min(kept, at));
        throw;
    }
    attend_from_ = 0, last_layer_ = -1, capture_last_ = nullptr;
    kv_.set_length(slot, at == 0 ? 0 : std::min(kept, at));  // at 0 the cached sequence is gone
}

void Model::sequence_state(const int32_t* tokens, int T, int layer, int at, float* out, int slot) {
    FM_ARG(layer >= 0 && layer < cfg_.n_layers, "layer ", layer, " out of range [0, ", cfg_.n_layers, ")");
    check_tokens(tokens, T);
    own_sequence(T, at, slot, "sequence_state", [&] {
        last_layer_ = layer, capture_last_ = out;
        forward(T, at, slot, nullptr, Output::None, [&](int t0, int n, float* x) { gather_embeddings(tokens + t0, n, x); },
                [&](int t) { return tokens[t]; });
    });
}

void Model::sequence_logits(const int32_t* tokens, int T, int at, float* out, int slot) {
    check_tokens(tokens, T);
    own_sequence(T, at, slot, "sequence_logits", [&] {
        forward(T, at, slot, out, Output::AllLogits, [&](int t0, int n, float* x) { gather_embeddings(tokens + t0, n, x); },
                [&](int t) { return tokens[t]; });
    });
}

void Model::forward_inputs(const int32_t* src, int T, const float* embeds, int n_embeds, int start_pos,
                           float* logits, bool all_logits, int slot, const int64_t* embed_ids) {
    const Config& c = cfg_;
    const size_t d = c.d_model;
    for (int t = 0; t < T; ++t) {  // every input checked before the cache is touched
        if (src[t] >= 0) {
            FM_ARG(src[t] < c.vocab_size, "token id ", src[t], " at position ", t, " out of range [0, ",
                   c.vocab_size, ")");
        } else {
            const int64_t row = -int64_t(src[t]) - 1;
            FM_ARG(row < n_embeds, "position ", t, " refers to embedding row ", row, " of ", n_embeds);
            for (size_t k = 0; k < d; ++k)
                FM_ARG(std::isfinite(embeds[row * d + k]), "inputs_embeds has a non-finite value at row ", row,
                       ", column ", k);
        }
    }
    // the input buffer is assembled here, chunk by chunk: token rows from the embedding table,
    // embedding rows copied in
    forward(T, start_pos, slot, logits, all_logits ? Output::AllLogits : Output::LastLogits, [&](int t0, int n, float* x) {
        for (int t = 0; t < n; ++t) {
            const int32_t s = src[t0 + t];
            if (s >= 0) gather_embeddings(&s, 1, x + size_t(t) * d);
            else std::memcpy(x + size_t(t) * d, embeds + (-int64_t(s) - 1) * d, sizeof(float) * d);
        }
    }, [&](int t) { return src[t] >= 0 ? int64_t(src[t]) : embed_ids ? embed_ids[-int64_t(src[t]) - 1] : int64_t(-1); });
}

template <typename Fill, typename Ident>
void Model::forward(int T, int start_pos, int slot, float* out, Output what, Fill&& fill, Ident&& ident) {
    check_positions(T, start_pos, slot);
    const Config& c = cfg_;
    kv_.set_length(slot, start_pos);  // positions past this are overwritten now
    last_mark_ = std::chrono::steady_clock::now();
    prof_.tokens += T;
    for (int t0 = 0; t0 < T; t0 += chunk_) {
        const int n = T - t0 < chunk_ ? T - t0 : chunk_;
        float* x = x_.data<float>();
        fill(t0, n, x);
        for (int t = 0; t < n; ++t) tok_pos_[t] = start_pos + t0 + t, tok_slot_[t] = slot;
        one_run_ = true;
        capture_t0_ = t0;
        run_layers(n);
        kv_.set_length(slot, start_pos + t0 + n);
        for (int t = 0; t < n; ++t) kv_.set_identity(slot, start_pos + t0 + t, ident(t0 + t));
        if (what == Output::AllLogits) {
            compute_logits(x, n, out + size_t(t0) * c.vocab_size);
        } else if (what == Output::LastLogits && t0 + n == T) {
            compute_logits(x + size_t(n - 1) * c.d_model, 1, out);
        } else if (what == Output::None) {
        } else if (what == Output::Hidden) {
            backend_->rmsnorm(out + size_t(t0) * c.d_model, x, w_.final_norm.data<float>(), n, c.d_model, c.norm_eps);
        }
        mark(Profile::kLogits);
    }
}

void Model::run_layers(int T) {
    fill_rope(T);
    for (int l = 0; l < cfg_.n_layers; ++l) {
        layer_forward(l, T);
        if (l == last_layer_) break;
    }
}

void Model::forward_batch(const int32_t* tokens, const int32_t* slots, const int32_t* positions, int B,
                          float* logits) {
    const Config& c = cfg_;
    FM_ARG(loaded_, "the model's weights are not loaded and checked (check_loaded) yet");
    FM_ARG(B >= 1 && B <= chunk_, "forward_batch: ", B, " sequences; it runs 1 to ", chunk_, " at once");
    FM_ARG(last_layer_ < 0 && !capture_ && attend_from_ == 0, "forward_batch inside another forward pass");
    check_tokens(tokens, B);
    std::vector<char> taken(kv_.slots(), 0);
    for (int b = 0; b < B; ++b) {  // every input checked before the cache is touched
        const int slot = check_slot(slots[b]), p = positions[b], length = kv_.length(slot);
        FM_ARG(!taken[slot], "forward_batch: slot ", slot, " appears twice (one token per sequence)");
        taken[slot] = 1;
        FM_ARG(p >= 0 && p <= length, "forward_batch: position ", p, " of slot ", slot, " must lie in [0, ", length,
               "] (positions before it must already be in the KV cache)");
        FM_ARG(p < c.max_context, "context overflow: slot ", slot, " position ", p, " >= max_context ",
               c.max_context);
        FM_ARG(p == 0 || p >= earliest_restart(slot), "forward_batch: position ", p, " of slot ", slot,
               " is too far back for the sliding-window layers' KV rings");
    }
    last_mark_ = std::chrono::steady_clock::now();
    prof_.tokens += B;
    gather_embeddings(tokens, B, x_.data<float>());
    for (int b = 0; b < B; ++b) tok_pos_[b] = positions[b], tok_slot_[b] = slots[b];
    one_run_ = B == 1;
    capture_t0_ = 0;
    try {
        run_layers(B);
    } catch (...) {  // the layers stored some of these positions' keys: they are held up to before them
        for (int b = 0; b < B; ++b) kv_.set_length(slots[b], positions[b]);
        throw;
    }
    for (int b = 0; b < B; ++b) {
        kv_.set_length(slots[b], positions[b] + 1);
        kv_.set_identity(slots[b], positions[b], tokens[b]);
    }
    compute_logits(x_.data<float>(), B, logits);
    mark(Profile::kLogits);
}

void Model::compute_logits(const float* x, int T, float* logits) {
    const Config& c = cfg_;
    float* xn = xn_.data<float>();
    Backend& b = *backend_;
    b.rmsnorm(xn, x, w_.final_norm.data<float>(), T, c.d_model, c.norm_eps);
    const Tensor* head = c.tied_embeddings ? &w_.embed : &w_.lm_head;
    if (!head->streamed) {
        b.linear(xn, T, c.d_model, {{logits, size_t(c.vocab_size), head, size_t(c.vocab_size)}}, /*precise=*/true);
        return;
    }
    // streamed: as many rows at a time as half the staging buffer holds, the next chunk read while
    // this one computes (as the whole buffer holds, one after the other, where half holds too few)
    const auto rows_in = [&](size_t bytes) { return bytes / head->row_bytes / 16 * 16; };
    const size_t whole = stream_->bytes() > 2 * kIoAlign ? stream_->bytes() - 2 * kIoAlign : 0;
    size_t per = rows_in(stream_->double_buffered_chunk());
    if (per < 16) per = std::max<size_t>(16, rows_in(whole));
    const size_t row = head->row_bytes;
    stream_->stream(
        head->file_offset, size_t(c.vocab_size) * row, per * row,
        [&](size_t at, size_t bytes, const char* rows) {
            b.linear(xn, T, c.d_model, {{logits + at / row, size_t(c.vocab_size), head, bytes / row, rows}},
                     /*precise=*/true);
        },
        "the LM head");
}

void Model::layer_forward(int l, int T) {
    const Config& c = cfg_;
    const LayerWeights& L = w_.layers[l];
    Backend& b = *backend_;
    float* x = x_.data<float>();
    float* xn = xn_.data<float>();
    float* q = q_.data<float>();
    float* proj = proj_.data<float>();
    const size_t kv_dim = c.kv_dim(), q_dim = c.q_dim(), d = c.d_model;
    const int hd = c.head_dim;
    // the new keys and values (T, kv_dim): straight into an f32 cache where they are one slot's
    // consecutive positions whose rows do not wrap around a ring, else into kv_new_, then stored
    const int slot0 = tok_slot_[0], kv_row = tok_pos_[0] % kv_.rows(l);
    const bool in_place = c.kv_dtype == DType::F32 && one_run_ && kv_row + T <= kv_.rows(l);
    const size_t kv_at = size_t(kv_row) * kv_dim;
    float* kc = in_place ? reinterpret_cast<float*>(kv_.keys(l, slot0)) + kv_at : kv_new_.data<float>();
    float* vc = in_place ? reinterpret_cast<float*>(kv_.values(l, slot0)) + kv_at
                         : kv_new_.data<float>() + size_t(chunk_) * kv_dim;

    // attention block: q, k, v, (q/k norms), rope, attention, output projection, (its norm)
    b.rmsnorm(xn, x, L.attn_norm.data<float>(), T, int(d), c.norm_eps);
    mark(Profile::kNorms);
    const char* qkv[3] = {};  // streamed: the layer's q, k and v matrices, read in one batch
    if (L.wq.streamed) stage({&L.wq, &L.wk, &L.wv}, qkv, "the attention matrices");
    b.linear(xn, T, int(d), {{q, q_dim, &L.wq, q_dim, qkv[0]}, {kc, kv_dim, &L.wk, kv_dim, qkv[1]},
                             {vc, kv_dim, &L.wv, kv_dim, qkv[2]}});
    mark(Profile::kQkv);
    if (c.qkv_bias) {
        b.add_bias(q, T, q_dim, L.bq.data<float>(), q_dim);
        b.add_bias(kc, T, kv_dim, L.bk.data<float>(), kv_dim);
        b.add_bias(vc, T, kv_dim, L.bv.data<float>(), kv_dim);
    }
    if (c.qk_norm) {  // each head's row
        b.rmsnorm(q, q, L.q_norm.data<float>(), T * c.n_heads, hd, c.norm_eps);
        b.rmsnorm(kc, kc, L.k_norm.data<float>(), T * c.n_kv_heads, hd, c.norm_eps);
    }
    const bool local_rope = c.window(l) > 0 && !c.rope_inv_freq_local.empty();
    const size_t rope_at = local_rope ? size_t(chunk_) * (hd / 2) : 0;
    const float* rope_cos = rope_cos_.data<float>() + rope_at;
    const float* rope_sin = rope_sin_.data<float>() + rope_at;
    b.rope(q, T, q_dim, c.n_heads, hd, rope_cos, rope_sin);
    b.rope(kc, T, kv_dim, c.n_kv_heads, hd, rope_cos, rope_sin);
    if (!in_place && one_run_) {
        kv_.store(l, slot0, tok_pos_[0], T, kc, vc);
    } else if (!in_place) {
        for (int t = 0; t < T; ++t)
            kv_.store(l, tok_slot_[t], tok_pos_[t], 1, kc + size_t(t) * kv_dim, vc + size_t(t) * kv_dim);
    }
    mark(Profile::kNorms);
    b.attention({q, att_out_.data<float>(), T, tok_pos_.data(), tok_slot_.data(), &kv_, l, c.n_heads, c.n_kv_heads,
                 hd, c.window(l), attend_from_, c.attn_scale > 0 ? c.attn_scale : 1.0f / std::sqrt(float(hd))});
    mark(Profile::kAttention);
    const char* wo = nullptr;
    if (L.wo.streamed) stage({&L.wo}, &wo, "the attention output matrix");
    b.linear(att_out_.data<float>(), T, int(q_dim), {{proj, d, &L.wo, d, wo}});
    if (L.wo.streamed && l + 1 < c.n_layers && w_.layers[l + 1].wq.streamed) {
        // the next layer's four attention matrices, read while this layer's FFN computes
        const LayerWeights& N = w_.layers[l + 1];
        const Tensor* next[4] = {&N.wq, &N.wk, &N.wv, &N.wo};
        uint64_t offsets[4];
        size_t sizes[4];
        for (int i = 0; i < 4; ++i) offsets[i] = next[i]->file_offset, sizes[i] = next[i]->nbytes();
        stream_->prefetch(offsets, sizes, 4, "the next layer's attention matrices");
    }
    if (c.post_norms) b.rmsnorm(proj, proj, L.attn_post_norm.data<float>(), T, int(d), c.norm_eps);
    b.add(x, proj, size_t(T) * d);

    // FFN block: its output is added to x, or with post norms put in proj, normed, then added
    mark(Profile::kOutProj);
    b.rmsnorm(xn, x, L.ffn_norm.data<float>(), T, int(d), c.norm_eps);
    mark(Profile::kNorms);
    if (capture_)
        std::memcpy(capture_ + (size_t(l) * capture_T_ + capture_t0_) * d, xn, sizeof(float) * size_t(T) * d);
    if (capture_last_ && l == last_layer_) {  // sequence_state(): only the last position matters
        std::memcpy(capture_last_, xn + size_t(T - 1) * d, sizeof(float) * d);
        return;
    }
    float* out = x;
    if (c.post_norms) {
        out = proj;
        std::memset(out, 0, sizeof(float) * size_t(T) * d);
    }
    const bool matrices = !sparse_ && !L.ffn_bundles.size();
    b.ffn({l, out, xn, T, c.d_model, c.d_ff, c.activation, sparse_.get(), tok_slot_.data(), tok_pos_.data(),
           matrices ? &L.ffn_gate : nullptr, matrices ? &L.ffn_up : nullptr, matrices ? &L.ffn_down : nullptr,
           L.ffn_bundles.data<char>(), L.ffn_down_scales.data<uint16_t>(), c.ffn_bundle});
    if (c.post_norms) {
        b.rmsnorm(proj, proj, L.ffn_post_norm.data<float>(), T, int(d), c.norm_eps);
        b.add(x, proj, size_t(T) * d);
    }
    mark(Profile::kFfn);
}

}  // namespace fm
