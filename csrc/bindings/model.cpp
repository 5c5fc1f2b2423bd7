// flashmem._core.Config, SparseOptions, FileLayout and Model: the decoder (csrc/model/) with its sparse and
// flash-streamed FFN (csrc/ffn/), driven by python/flashmem/model.py and flash/.
#include "bindings/common.h"

#include <nanobind/stl/tuple.h>

#include "ffn/sparse_ffn.h"
#include "model/decoder.h"
#include "model/sampler.h"

namespace fm::bindings {

using namespace nb::literals;

void bind_model(nb::module_& m) {
    m.def("tensor_name", &fm::tensor_name, "kind"_a, "layer"_a,
          "The name a tensor of `kind` (layer -1: a global one) has in a converted folder.");
    m.def("tensor_kind", &fm::tensor_kind, "name"_a, "(kind, layer) of a converted folder's tensor name.");
    nb::class_<fm::SparseOptions>(m, "SparseOptions",
                                  "Options of the sparse FFN (ffn/sparse_ffn.h); validate() checks every field.")
        .def(nb::init<>())
        .def_rw("sparsity", &fm::SparseOptions::sparsity, "fraction of the neurons left out per token, in [0, 1)")
        .def_rw("window", &fm::SparseOptions::window,
                "tokens a neuron stays cached after its last use (0: until evicted)")
        .def_rw("use_window", &fm::SparseOptions::use_window, "also compute with the neurons still in the window")
        .def_rw("expire", &fm::SparseOptions::expire, "drop neurons that left the window")
        .def_prop_rw(
            "eviction", [](const fm::SparseOptions& o) { return std::string(o.hot ? "hot" : "lru"); },
            [](fm::SparseOptions& o, const std::string& e) {
                FM_ARG(e == "lru" || e == "hot", "SparseOptions.eviction must be 'lru' or 'hot', got '", e, "'");
                o.hot = e == "hot";
            },
            "what the flash neuron cache keeps: 'lru' (recently used) or 'hot' (often picked)")
        .def_rw("cache_bias", &fm::SparseOptions::cache_bias, "cached neurons' scores count (1 + cache_bias) times")
        .def_rw("cache_rows", &fm::SparseOptions::cache_rows, "neurons cached per layer (-1: as the budget allows)")
        .def_rw("staging_rows", &fm::SparseOptions::staging_rows, "bundles one read round holds (0: a layer's)")
        .def_rw("staging_bytes", &fm::SparseOptions::staging_bytes, "cap on the read buffer (0: none)")
        .def_rw("queue_depth", &fm::SparseOptions::queue_depth, "reads in flight")
        .def_rw("coalesce_gap", &fm::SparseOptions::coalesce_gap, "unneeded bundles a read may span to join two")
        .def_rw("predictor_rank", &fm::SparseOptions::predictor_rank,
                "the predictor's kind: 0 the sign predictor, r > 0 (a multiple of 32) the low-rank one of rank r")
        .def_rw("read_ahead", &fm::SparseOptions::read_ahead,
                "neurons of the next layer read while a layer computes (sparsity > 0, flash; -1: d_ff / 8, 0: none)")
        .def_rw("max_request", &fm::SparseOptions::max_request, "largest read, bytes (a multiple of 4096)")
        .def_rw("direct", &fm::SparseOptions::direct, "read with O_DIRECT (else through the page cache)")
        .def("validate", &fm::SparseOptions::validate);
    nb::class_<fm::FileLayout>(m, "FileLayout",
                               "Where neuron i of a layer lies in the FFN file: piece p at piece_base[layer][p] + "
                               "i * piece_stride[p], piece_bytes[p] long.")
        .def(nb::init<>())
        .def_rw("path", &fm::FileLayout::path)
        .def_rw("piece_base", &fm::FileLayout::piece_base)
        .def_rw("piece_stride", &fm::FileLayout::piece_stride)
        .def_rw("piece_bytes", &fm::FileLayout::piece_bytes)
        .def_prop_ro("n_pieces", &fm::FileLayout::n_pieces)
        .def("validate", &fm::FileLayout::validate, "n_layers"_a, "bundle_bytes"_a);
    nb::class_<fm::Config>(m, "Config")
        .def(nb::init<>())
        .def_rw("vocab_size", &fm::Config::vocab_size)
        .def_rw("d_model", &fm::Config::d_model)
        .def_rw("d_ff", &fm::Config::d_ff)
        .def_rw("n_layers", &fm::Config::n_layers)
        .def_rw("n_heads", &fm::Config::n_heads)
        .def_rw("n_kv_heads", &fm::Config::n_kv_heads)
        .def_rw("head_dim", &fm::Config::head_dim)
        .def_rw("max_context", &fm::Config::max_context)
        .def_rw("prefill_chunk", &fm::Config::prefill_chunk)
        .def_rw("max_batch", &fm::Config::max_batch)
        .def_rw("norm_eps", &fm::Config::norm_eps)
        .def_rw("tied_embeddings", &fm::Config::tied_embeddings)
        .def_rw("qkv_bias", &fm::Config::qkv_bias)
        .def_rw("rope_inv_freq", &fm::Config::rope_inv_freq)
        .def_rw("rope_attention_scaling", &fm::Config::rope_attention_scaling)
        .def_prop_rw(
            "activation", [](const fm::Config& c) { return std::string(fm::activation_name(c.activation)); },
            [](fm::Config& c, const std::string& s) {
                FM_ARG(fm::activation_from_name(s, c.activation), "activation must be 'silu' or 'gelu_tanh' ",
                       "(gelu_pytorch_tanh), got '", s, "'");
            },
            "the FFN's gate activation: silu (SwiGLU) or gelu_tanh (GeGLU)")
        .def_rw("qk_norm", &fm::Config::qk_norm, "RMSNorm over each head of q and k before rope")
        .def_rw("post_norms", &fm::Config::post_norms, "RMSNorm on the attention and FFN outputs")
        .def_rw("embed_scale", &fm::Config::embed_scale, "token embeddings are multiplied by this")
        .def_rw("attn_scale", &fm::Config::attn_scale, "attention scores' scale (0: 1/sqrt(head_dim))")
        .def_rw("layer_window", &fm::Config::layer_window,
                "per layer, the positions it attends to (itself included); 0: all; empty: all layers")
        .def_rw("rope_inv_freq_local", &fm::Config::rope_inv_freq_local,
                "rope inverse frequencies of the layers with a window (empty: rope_inv_freq)")
        .def_prop_rw(
            "ffn_bundle",
            [](const fm::Config& c) {
                const fm::BundleFormat& b = c.ffn_bundle;
                return std::vector<std::string>{b.piece_name(0), b.piece_name(1), b.piece_name(2)};
            },
            [](fm::Config& c, const std::vector<std::string>& f) {
                FM_ARG(f.size() == 3, "ffn_bundle: the formats of gate, up and down, got ", f.size(), " names");
                c.ffn_bundle = fm::BundleFormat::from_names(f[0], f[1], f[2]);
            },
            "formats of a neuron bundle's gate row, up row and down column")
        .def(
            "schema",
            [](const fm::Config& c, const std::string& ffn) {
                std::vector<std::tuple<std::string, int, std::vector<int64_t>>> out;
                for (const fm::TensorSpec& t : c.schema(ffn)) out.emplace_back(t.kind, t.layer, t.shape);
                return out;
            },
            "ffn"_a, "Every tensor the model needs, (kind, layer, shape), with its FFN as 'bundles', 'matrices' "
            "or 'none' (streamed from flash).")
        .def_prop_rw(
            "kv_dtype", [](const fm::Config& c) { return std::string(fm::dtype_name(c.kv_dtype)); },
            [](fm::Config& c, const std::string& s) { c.kv_dtype = fm::dtype_from_name(s); });

    using F32Vector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
    nb::class_<fm::Sampler>(m, "Sampler")
        .def(
            "__init__",
            [](fm::Sampler* self, float temperature, int top_k, float top_p, float min_p, float repetition_penalty,
               int64_t seed) {
                new (self) fm::Sampler({temperature, top_k, top_p, min_p, repetition_penalty}, seed);
            },
            "temperature"_a = 0.0f, "top_k"_a = 0, "top_p"_a = 1.0f, "min_p"_a = 0.0f, "repetition_penalty"_a = 1.0f,
            "seed"_a = -1, "Token sampling (model/sampler.h); seed < 0: a random one.")
        .def_prop_ro("temperature", [](const fm::Sampler& s) { return s.params().temperature; })
        .def_prop_ro("repetition_penalty", [](const fm::Sampler& s) { return s.params().repetition_penalty; })
        .def(
            "begin", [](fm::Sampler& s, I32Vector history, int vocab) { s.begin(history.data(), int(history.shape(0)), vocab); },
            "history"_a, "vocab"_a, "A new sequence: the repetition penalty applies to these tokens and the sampled ones.")
        .def(
            "sample", [](fm::Sampler& s, F32Vector logits) { return s.sample(logits.data(), int(logits.shape(0))); },
            "logits"_a, "One token from logits (vocab,); it joins the history.")
        .def("uniform", &fm::Sampler::uniform);

    nb::class_<fm::Model>(m, "Model")
        .def(nb::init<fm::Config, int>(), "config"_a, "threads"_a)
        .def_prop_ro("n_threads", &fm::Model::n_threads)
        .def_prop_ro("backend", [](const fm::Model& m) { return std::string(m.backend().name()); },
                     "where the forward pass runs (\"cpu\")")
        .def_prop_ro("kv_length", [](const fm::Model& m) { return m.kv_length(0); },
                     "positions held in the KV cache (slot 0)")
        .def("slot_length", &fm::Model::kv_length, "slot"_a, "positions held in a KV-cache slot")
        .def(
            "reusable",
            [](const fm::Model& self, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> ids, int slot) {
                return self.reusable(slot, ids.data(), int(ids.shape(0)));
            },
            "ids"_a, "slot"_a = 0,
            "How many leading positions of ids (token ids >= 0, input-embedding identities <= -2) the slot's KV "
            "cache holds.")
        .def_prop_ro("slots", &fm::Model::slots, "KV-cache slots (sequences held at once: max_batch)")
        .def_prop_ro("earliest_restart", [](const fm::Model& m) { return m.earliest_restart(0); },
                     "the earliest start_pos > 0 a forward pass may restart from (sliding-window layers keep only "
                     "their last positions); 0 always works (slot 0)")
        .def("slot_earliest_restart", &fm::Model::earliest_restart, "slot"_a, "earliest_restart of a slot")
        .def_prop_ro("weight_bytes", &fm::Model::weight_bytes)
        .def_prop_ro("state_bytes", &fm::Model::state_bytes)
        .def("load_tensor", &fm::Model::load_tensor, "kind"_a, "layer"_a, "path"_a, "offset"_a, "dtype"_a, "shape"_a,
             "stream"_a = false, nb::call_guard<nb::gil_scoped_release>())
        .def("configure_stream", &fm::Model::configure_stream, "path"_a, "staging_bytes"_a, "queue_depth"_a = 32,
             "direct"_a = true, "Matrices loaded with stream=True are read from `path` when needed.")
        .def_prop_ro("stream_bytes_read", [](const fm::Model& m) { return m.stream() ? m.stream()->stats().bytes : 0; })
        .def_prop_ro(
            "stream_prefetch_hits", [](const fm::Model& m) { return m.stream() ? m.stream()->prefetch_hits() : 0; },
            "fetches of streamed matrices served by the batch read a layer ahead")
        .def("check_loaded", &fm::Model::check_loaded)
        .def_prop_ro("owned_bytes", &fm::Model::owned_bytes, "every byte this engine owns")
        .def_prop_ro("expected_weight_bytes", [](const fm::Model& m) { return m.expected_weight_bytes(true); })
        .def(
            "configure_sparse",
            [](fm::Model& self, const std::string& source, const fm::SparseOptions& options, size_t budget,
               bool with_predictor, const fm::FileLayout* layout, size_t resident_bytes) {
                FM_ARG(source == "dram" || source == "flash", "source must be 'dram' or 'flash', got '", source, "'");
                const bool flash = source == "flash";
                FM_ARG(flash || !layout, "a FileLayout is for source 'flash' only");
                self.configure_sparse(flash ? fm::SparseFfn::Source::Flash : fm::SparseFfn::Source::Resident, options,
                                      layout, budget, with_predictor, resident_bytes);
            },
            "source"_a, "options"_a, "budget"_a = 0, "with_predictor"_a = false, "layout"_a = nb::none(),
            "resident_bytes"_a = 0,
            "Sets up the sparse FFN before any weight is loaded: source 'dram' (bundles in DRAM) or 'flash' (read "
            "from `layout`'s file); budget 0: no DRAM budget; resident_bytes: what the loaded weights take.")
        .def(
            "sparse_stats",
            [](fm::Model& self) {
                nb::dict d;
                fm::SparseFfn* sp = self.sparse();
                if (!sp) return d;
                const fm::SparseStats& s = sp->stats();
                d["steps"] = s.steps, d["tokens"] = s.tokens, d["selected"] = s.selected, d["computed"] = s.computed;
                d["hits"] = s.hits, d["misses"] = s.misses;
                d["rounds_ahead"] = s.rounds_ahead, d["rounds_dropped"] = s.rounds_dropped;
                d["early"] = s.early;
                d["ahead_read"] = s.ahead_read, d["ahead_used"] = s.ahead_used;
                d["read_ahead"] = sp->options().read_ahead;
                d["select_s"] = s.select_s, d["io_s"] = s.io_s, d["compute_s"] = s.compute_s;
                const fm::IoStats* io = sp->io_stats();
                d["bytes_read"] = io ? io->bytes : 0;
                d["requests"] = io ? io->requests : 0;
                d["read_batches"] = io ? io->batches : 0;
                d["read_s"] = io ? io->seconds : 0.0;            // the compute waited for reads
                d["read_busy_s"] = io ? io->busy_seconds : 0.0;  // reads were in flight
                d["direct_io"] = sp->direct();
                d["cache_rows"] = sp->options().cache_rows;
                d["minimum_budget"] = self.minimum_budget();
                d["staging_rows"] = sp->options().staging_rows;
                d["predictor_bytes"] = sp->predictor().bytes();
                d["sparse_bytes"] = sp->bytes();
                size_t cached = 0;
                for (int l = 0; l < self.config().n_layers; ++l) cached += sp->neurons_cached(l);
                d["cached_neurons"] = cached;
                return d;
            },
            "Counters of the sparse FFN since the last reset_sparse_stats().")
        .def(
            "predictor_scores",
            [](fm::Model& self, int layer, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> x) {
                FM_ARG(int(x.shape(1)) == self.config().d_model, "x must be (T, d_model)");
                auto out = numpy_owned<float>({x.shape(0), size_t(self.config().d_ff)});
                self.predictor_scores(layer, x.data(), int(x.shape(0)), out.data());
                return out;
            },
            "layer"_a, "x"_a)
        .def("reset_sparse_stats",
             [](fm::Model& self) {
                 if (self.sparse()) self.sparse()->reset_stats();
                 if (self.stream()) self.stream()->reset_stats();  // stream_bytes_read counts from here too
             })
        .def("clear_neuron_cache", [](fm::Model& self) { if (self.sparse()) self.sparse()->clear_neuron_cache(); })
        .def(
            "set_trace",
            [](fm::Model& self, nb::ndarray<const int32_t, nb::ndim<3>, nb::c_contig, nb::device::cpu> ids,
               bool score, std::optional<nb::ndarray<const int32_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>> ahead) {
                FM_ARG(self.sparse(), "set_trace needs the sparse FFN");
                std::vector<int32_t> a;
                int m = 0;
                if (ahead) {
                    FM_ARG(ahead->shape(0) == ids.shape(0) && ahead->shape(1) == ids.shape(1),
                           "set_trace: ahead must be (n_steps, n_layers, m) with the trace's n_steps and n_layers");
                    a.assign(ahead->data(), ahead->data() + ahead->size());
                    m = int(ahead->shape(2));
                }
                self.sparse()->set_trace(std::vector<int32_t>(ids.data(), ids.data() + ids.size()), int(ids.shape(0)),
                                         int(ids.shape(2)), score, std::move(a), m);
            },
            "ids"_a, "score"_a = false, "ahead"_a = nb::none(),
            "Replays fixed neuron selections (n_steps, n_layers, k) instead of the predictor's; score: the "
            "loaded predictor still scores each token (its time, not its picks); ahead: (n_steps, n_layers, m) "
            "neuron ids read a layer ahead (most likely first, -1: none), as a predictor a layer ahead would pick them.")
        .def(
            "ffn_inputs",
            [](fm::Model& self, I32Vector tokens) {
                const int T = int(tokens.shape(0));
                const fm::Config& c = self.config();
                auto out = numpy_owned<float>({size_t(c.n_layers), size_t(T), size_t(c.d_model)});
                nb::gil_scoped_release nogil;
                self.ffn_inputs(tokens.data(), T, out.data());
                return out;
            },
            "tokens"_a, "FFN inputs (after the FFN norm) of every layer, (n_layers, T, d_model), from position 0.")
        .def(
            "sequence_state",
            [](fm::Model& self, I32Vector tokens, int layer, int at, int slot) {
                const int T = int(tokens.shape(0));
                auto out = numpy_owned<float>({size_t(self.config().d_model)});
                nb::gil_scoped_release nogil;
                self.sequence_state(tokens.data(), T, layer, at, out.data(), slot);
                return out;
            },
            "tokens"_a, "layer"_a, "at"_a = 0, "slot"_a = 0,
            "The FFN input of `layer` at the last token, the tokens run as their own sequence in KV rows "
            "[at, at + T) (the cached sequence before `at` stays usable), (d_model,).")
        .def(
            "sequence_logits",
            [](fm::Model& self, I32Vector tokens, int at, int slot) {
                const int T = int(tokens.shape(0));
                auto out = numpy_owned<float>({size_t(T), size_t(self.config().vocab_size)});
                nb::gil_scoped_release nogil;
                self.sequence_logits(tokens.data(), T, at, out.data(), slot);
                return out;
            },
            "tokens"_a, "at"_a = 0, "slot"_a = 0,
            "Logits (T, vocab) of the tokens run as their own sequence in KV rows [at, at + T).")
        .def(
            "profile",
            [](const fm::Model& self) {
                nb::dict d;
                const fm::Profile& p = self.profile();
                for (int i = 0; i < fm::Profile::kParts; ++i) d[fm::Profile::kNames[i]] = p.seconds[i];
                d["tokens"] = p.tokens;
                return d;
            },
            "Seconds spent per part of the forward pass since the last reset_profile().")
        .def("reset_profile", &fm::Model::reset_profile)
        .def(
            "forward",
            [](fm::Model& self, I32Vector tokens,
               int start_pos, bool all_logits, int slot) {
                const int T = int(tokens.shape(0));
                const size_t V = self.config().vocab_size;
                auto out = numpy_owned<float>(all_logits ? std::vector<size_t>{size_t(T), V} : std::vector<size_t>{V});
                nb::gil_scoped_release nogil;
                self.forward_tokens(tokens.data(), T, start_pos, out.data(), all_logits, slot);
                return out;
            },
            "tokens"_a, "start_pos"_a, "all_logits"_a = false, "slot"_a = 0,
            "Runs tokens at positions [start_pos, start_pos+T) of the sequence in KV slot `slot`; returns logits "
            "of the last (or every) token.")
        .def(
            "decode_step",
            [](fm::Model& self, I32Vector tokens, I32Vector slots, I32Vector positions, std::vector<fm::Sampler*> samplers) {
                const size_t B = tokens.shape(0), V = self.config().vocab_size;
                FM_ARG(slots.shape(0) == B && positions.shape(0) == B && samplers.size() == B,
                       "decode_step: tokens, slots, positions and samplers must have the same length (", B, ", ",
                       slots.shape(0), ", ", positions.shape(0), ", ", samplers.size(), ")");
                for (size_t b = 0; b < B; ++b) FM_ARG(samplers[b], "decode_step: sampler ", b, " is None");
                auto out = numpy_owned<int32_t>({B});
                {
                    nb::gil_scoped_release nogil;
                    std::vector<float> logits(B * V);
                    self.forward_batch(tokens.data(), slots.data(), positions.data(), int(B), logits.data());
                    for (size_t b = 0; b < B; ++b) out.data()[b] = samplers[b]->sample(logits.data() + b * V, int(V));
                }
                return out;
            },
            "tokens"_a, "slots"_a, "positions"_a, "samplers"_a,
            "forward_batch, then each sequence's next token from its own Sampler: one call per decode step.")
        .def(
            "forward_batch",
            [](fm::Model& self, I32Vector tokens, I32Vector slots, I32Vector positions) {
                const int B = int(tokens.shape(0));
                FM_ARG(slots.shape(0) == tokens.shape(0) && positions.shape(0) == tokens.shape(0),
                       "forward_batch: tokens, slots and positions must have the same length (", tokens.shape(0),
                       ", ", slots.shape(0), ", ", positions.shape(0), ")");
                auto out = numpy_owned<float>({size_t(B), size_t(self.config().vocab_size)});
                nb::gil_scoped_release nogil;
                self.forward_batch(tokens.data(), slots.data(), positions.data(), B, out.data());
                return out;
            },
            "tokens"_a, "slots"_a, "positions"_a,
            "One decode step of several sequences: token b at positions[b] of the sequence in KV slot slots[b] "
            "(distinct slots); one pass over the weights for all. Logits (B, vocab).")
        .def(
            "forward_inputs",
            [](fm::Model& self, I32Vector src,
               std::optional<nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>> embeds,
               int start_pos, bool all_logits, int slot,
               std::optional<nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>> embed_ids) {
                const int T = int(src.shape(0));
                int n_embeds = 0;
                const float* e = nullptr;
                const int64_t* ids = nullptr;
                if (embeds && embeds->shape(0)) {
                    FM_ARG(int(embeds->shape(1)) == self.config().d_model, "inputs_embeds must have width ",
                           self.config().d_model, " (d_model), got ", embeds->shape(1));
                    n_embeds = int(embeds->shape(0)), e = embeds->data();
                    if (embed_ids) {
                        FM_ARG(embed_ids->shape(0) == embeds->shape(0), "embed_ids must have one entry per embedding ",
                               "row (", embeds->shape(0), "), got ", embed_ids->shape(0));
                        ids = embed_ids->data();
                        for (int i = 0; i < n_embeds; ++i)
                            FM_ARG(ids[i] <= -2, "embed_ids[", i, "] = ", ids[i], ": an embedding's identity is <= -2");
                    }
                }
                const size_t V = self.config().vocab_size;
                auto out = numpy_owned<float>(all_logits ? std::vector<size_t>{size_t(T), V} : std::vector<size_t>{V});
                nb::gil_scoped_release nogil;
                self.forward_inputs(src.data(), T, e, n_embeds, start_pos, out.data(), all_logits, slot, ids);
                return out;
            },
            "src"_a, "embeds"_a.none(), "start_pos"_a, "all_logits"_a = false, "slot"_a = 0, "embed_ids"_a = nb::none(),
            "Runs mixed inputs: src[t] >= 0 is a token id, src[t] < 0 is row -src[t]-1 of embeds (n, d_model).")
        .def(
            "hidden_states",
            [](fm::Model& self, I32Vector tokens,
               int start_pos, int slot) {
                const int T = int(tokens.shape(0));
                auto out = numpy_owned<float>({size_t(T), size_t(self.config().d_model)});
                nb::gil_scoped_release nogil;
                self.hidden_states(tokens.data(), T, start_pos, out.data(), slot);
                return out;
            },
            "tokens"_a, "start_pos"_a = 0, "slot"_a = 0, "Final hidden states (after the final norm), (T, d_model).")
        .def(
            "embed",
            [](fm::Model& self, I32Vector tokens) {
                auto out = numpy_owned<float>({tokens.shape(0), size_t(self.config().d_model)});
                self.embed(tokens.data(), int(tokens.shape(0)), out.data());
                return out;
            },
            "tokens"_a, "Input embeddings (T, d_model) of token ids.");
}

}  // namespace fm::bindings
