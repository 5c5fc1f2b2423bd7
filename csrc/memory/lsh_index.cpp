#include "memory/lsh_index.h"

#include <cmath>
#include <algorithm>
#include <random>

namespace fm::memory {

namespace {
constexpr double kTargetBucket = 24.0;  // entries per bucket that auto `bits` aims at
thread_local VisitedSet tl_seen;
}  // namespace

LshIndex::LshIndex(const KeyStore& store, const Params& p) : store_(store) {
    tables_ = int(param_or(p, "tables", 8));
    bits_param_ = int(param_or(p, "bits", 0));
    probes_ = int(param_or(p, "probes", 128));
    rerank_ = int(param_or(p, "rerank", 0));
    rerank_per_k_ = int(param_or(p, "rerank_per_k", 128));
    seed_ = uint64_t(param_or(p, "seed", 1234));
    FM_ARG(tables_ >= 1 && tables_ <= 64, "lsh: tables must be in [1, 64], got ", tables_);
    FM_ARG(bits_param_ >= 0 && bits_param_ <= kMaxBits, "lsh: bits must be in [0, ", kMaxBits, "] (0 = auto)");
    FM_ARG(probes_ >= 1 && probes_ <= 4096, "lsh: probes must be in [1, 4096], got ", probes_);
    FM_ARG(rerank_ >= 0, "lsh: rerank must be >= 0 (0 = rerank_per_k * k)");
    FM_ARG(rerank_per_k_ >= 1, "lsh: rerank_per_k must be >= 1");
    bits_ = bits_param_ ? bits_param_ : auto_bits(0);
    make_planes();
    buckets_.assign(tables_, {});
}

void LshIndex::make_planes() {
    std::mt19937_64 rng(seed_);
    std::normal_distribution<float> g(0.f, 1.f);
    planes_.resize(size_t(n_planes()) * store_.dim());
    for (float& x : planes_) x = g(rng);
    center_.assign(store_.dim(), 0.f);
    offset_.assign(n_planes(), 0.f);
}

int LshIndex::auto_bits(size_t n) const {
    const int b = int(std::lround(std::log2(std::max(1.0, double(n) / kTargetBucket))));
    return std::max(1, std::min(kMaxBits, b));
}

void LshIndex::set_param(const std::string& key, double value) {
    if (key == "reset_stats") {
        stat_queries_ = 0, stat_candidates_ = 0;
    } else if (key == "probes") {
        FM_ARG(value >= 1 && value <= 4096, "lsh: probes must be in [1, 4096]");
        probes_ = int(value);
    } else if (key == "rerank") {
        FM_ARG(value >= 0, "lsh: rerank must be >= 0 (0 = rerank_per_k * k)");
        rerank_ = int(value);
    } else if (key == "rerank_per_k") {
        FM_ARG(value >= 1 && value <= 1e6, "lsh: rerank_per_k must be in [1, 1e6]");
        rerank_per_k_ = int(value);
    } else if (key == "bits") {
        FM_ARG(value >= 0 && value <= kMaxBits, "lsh: bits must be in [0, ", kMaxBits, "] (0 = auto)");
        bits_param_ = int(value);
        bits_ = bits_param_ ? bits_param_ : auto_bits(store_.size());
        rebucket();
    } else {
        FM_ARG(false, "lsh: parameter '", key, "' cannot be set after creation (settable: probes, rerank, rerank_per_k, bits)");
    }
}

std::vector<Params> LshIndex::ladder() const {
    std::vector<Params> out;
    for (auto [probes, per_k] : {std::pair{8, 32}, {16, 32}, {32, 64}, {64, 64}, {64, 128}, {128, 128}, {128, 256},
                                 {299, 256}, {299, 512}, {299, 1024}, {299, 2048}})
        out.push_back({{"probes", probes}, {"rerank_per_k", per_k}, {"rerank", 0}});
    return out;
}

double LshIndex::get_param(const std::string& key) const {
    if (key == "tables") return tables_;
    if (key == "bits") return bits_;
    if (key == "probes") return probes_;
    if (key == "rerank") return rerank_;
    if (key == "rerank_per_k") return rerank_per_k_;
    if (key == "candidates_per_query") return stat_queries_ ? double(stat_candidates_) / double(stat_queries_) : 0.0;
    FM_ARG(false, "lsh: unknown parameter '", key, "' (tables, bits, probes, rerank, rerank_per_k)");
}

size_t LshIndex::memory_bytes() const {
    size_t n = planes_.size() * sizeof(float) + codes_.size() * sizeof(uint32_t) + sketch_.size() * sizeof(uint64_t);
    for (const auto& t : buckets_) {
        n += t.bucket_count() * sizeof(void*);
        for (const auto& b : t) n += b.second.capacity() * sizeof(Entry) + 48;
    }
    return n;
}

void LshIndex::project(const float* x, float* proj) const {
    kernels().gemm[0](proj, n_planes(), x, store_.dim(), 1, planes_.data(), store_.dim(), store_.dim(), n_planes(),
                      nullptr);
    for (int i = 0; i < tables_ * kMaxBits; ++i) proj[i] -= offset_[i];
}

void LshIndex::encode(const float* proj, uint32_t slot) {
    if (codes_.size() < (size_t(slot) + 1) * tables_) {
        codes_.resize((size_t(slot) + 1) * tables_ * 2, 0);
        sketch_.resize((size_t(slot) + 1) * kSketchWords * 2, 0);
    }
    for (int t = 0; t < tables_; ++t) {
        uint32_t code = 0;
        for (int b = 0; b < kMaxBits; ++b) code |= uint32_t(proj[t * kMaxBits + b] > 0) << b;
        codes_[size_t(slot) * tables_ + t] = code;
    }
    const float* sp = proj + tables_ * kMaxBits;
    for (int w = 0; w < kSketchWords; ++w) {
        uint64_t word = 0;
        for (int b = 0; b < 64; ++b) word |= uint64_t(sp[w * 64 + b] > 0) << b;
        sketch_[size_t(slot) * kSketchWords + w] = word;
    }
}

void LshIndex::recenter() {
    const int d = store_.dim(), np = n_planes();
    std::vector<double> sum(d, 0.0);
    size_t n = 0;
    for (uint32_t s = 0; s < store_.high_water(); ++s)
        if (store_.live(s)) {
            ++n;
            for (int i = 0; i < d; ++i) sum[i] += store_.row(s)[i];
        }
    if (n == 0) return;
    for (int i = 0; i < d; ++i) center_[i] = float(sum[i] / double(n));
    offset_.assign(np, 0.f);  // the table planes pass through the mean; the sketch planes through 0
    kernels().gemm[0](offset_.data(), tables_ * kMaxBits, center_.data(), d, 1, planes_.data(), d, d,
                      tables_ * kMaxBits, nullptr);
    // all codes anew, a block of keys at a time through the matrix kernel
    constexpr uint32_t B = 256;
    std::vector<float> proj(size_t(B) * np), scratch(scratch_floats(d));
    for (uint32_t s0 = 0; s0 < store_.high_water(); s0 += B) {
        const uint32_t nb = std::min(B, store_.high_water() - s0);
        kernels().gemm[0](proj.data(), np, store_.row(s0), d, int(nb), planes_.data(), d, d, np, scratch.data());
        for (uint32_t j = 0; j < nb; ++j) {
            float* pj = &proj[size_t(j) * np];
            for (int i = 0; i < tables_ * kMaxBits; ++i) pj[i] -= offset_[i];
            encode(pj, s0 + j);
        }
    }
    centered_at_ = n;
    rebucket();
}

void LshIndex::rebucket() {
    for (auto& t : buckets_) t.clear();
    for (uint32_t s = 0; s < store_.high_water(); ++s)
        if (store_.live(s) && size_t(s) * tables_ < codes_.size())
            for (int t = 0; t < tables_; ++t) buckets_[t][key(codes_[size_t(s) * tables_ + t])].push_back(entry(s));
}

void LshIndex::add(uint32_t slot) {
    std::vector<float> proj(n_planes());
    project(store_.row(slot), proj.data());
    encode(proj.data(), slot);
    for (int t = 0; t < tables_; ++t) buckets_[t][key(codes_[size_t(slot) * tables_ + t])].push_back(entry(slot));
    const int want = bits_param_ ? bits_param_ : auto_bits(store_.size());
    if (store_.size() >= 2 * centered_at_ && store_.size() >= 64) {
        bits_ = want;
        recenter();
    } else if (want >= bits_ + 1 || want <= bits_ - 2) {  // grow the signature with the bank
        bits_ = want;
        rebucket();
    }
}

void LshIndex::remove(uint32_t slot) {
    for (int t = 0; t < tables_; ++t) {
        auto it = buckets_[t].find(key(codes_[size_t(slot) * tables_ + t]));
        if (it == buckets_[t].end()) continue;
        auto& v = it->second;
        for (size_t j = 0; j < v.size(); ++j)
            if (v[j].slot == slot) {
                v[j] = v.back();
                v.pop_back();
                break;
            }
        if (v.empty()) buckets_[t].erase(it);
    }
}

void LshIndex::search(const float* q, const AllowMask* allow, TopK& out) const {
    std::vector<float> proj(n_planes());
    project(q, proj.data());
    uint64_t qsketch[kSketchWords];
    for (int w = 0; w < kSketchWords; ++w) {
        qsketch[w] = 0;
        for (int b = 0; b < 64; ++b) qsketch[w] |= uint64_t(proj[tables_ * kMaxBits + w * 64 + b] > 0) << b;
    }
    VisitedSet& seen = tl_seen;
    seen.begin(store_.high_water());
    // Perturbation sets over the m least certain bits of a table, scored by the sum of their
    // squared margins (the smaller, the likelier the neighbour sits across those hyperplanes).
    const int m = std::min(bits_, 12);
    struct Probe { float cost; uint32_t flips; };
    std::vector<Probe> sets;
    std::vector<std::pair<float, int>> margin(bits_);
    std::vector<uint32_t> qcode(tables_, 0);  // the query's full 24-bit code per table
    for (int t = 0; t < tables_; ++t)
        for (int b = 0; b < kMaxBits; ++b) qcode[t] |= uint32_t(proj[size_t(t) * kMaxBits + b] > 0) << b;
    std::vector<std::pair<int, uint32_t>> cands;  // (Hamming distance of the sketches, slot)
    for (int t = 0; t < tables_; ++t) {
        const float* p = &proj[size_t(t) * kMaxBits];
        const uint32_t code = key(qcode[t]);
        for (int b = 0; b < bits_; ++b) margin[b] = {p[b] * p[b], b};
        std::partial_sort(margin.begin(), margin.begin() + m, margin.end());
        sets.clear();
        sets.push_back({0.f, 0u});
        for (int i = 0; i < m; ++i) {
            sets.push_back({margin[i].first, 1u << margin[i].second});
            for (int j = i + 1; j < m; ++j) {
                sets.push_back({margin[i].first + margin[j].first, (1u << margin[i].second) | (1u << margin[j].second)});
                for (int l = j + 1; l < m; ++l)
                    sets.push_back({margin[i].first + margin[j].first + margin[l].first,
                                    (1u << margin[i].second) | (1u << margin[j].second) | (1u << margin[l].second)});
            }
        }
        const size_t np = std::min(sets.size(), size_t(probes_));
        std::partial_sort(sets.begin(), sets.begin() + np, sets.end(),
                          [](const Probe& a, const Probe& b) { return a.cost < b.cost; });
        for (size_t i = 0; i < np; ++i) {
            auto it = buckets_[t].find(code ^ sets[i].flips);
            if (it == buckets_[t].end()) continue;
            for (const Entry& e : it->second) {  // sequential: the sketches sit in the bucket
                if (seen.test_and_set(e.slot) || (allow && !(*allow)[e.slot])) continue;
                int ham = 0;
                for (int w = 0; w < kSketchWords; ++w) ham += __builtin_popcountll(e.sketch[w] ^ qsketch[w]);
                cands.emplace_back(ham, e.slot);
            }
        }
    }
    stat_queries_ += 1;
    stat_candidates_ += cands.size();
    const size_t keep = std::min(cands.size(), size_t(rerank_ > 0 ? rerank_ : rerank_per_k_ * out.k()));
    std::nth_element(cands.begin(), cands.begin() + keep, cands.end());
    if (keep) store_.prefetch(cands[0].second);
    for (size_t i = 0; i < keep; ++i) {
        if (i + 1 < keep) store_.prefetch(cands[i + 1].second);
        out.push(store_.score(q, cands[i].second), cands[i].second);
    }
}

void LshIndex::save(Writer& w) const {
    w.put<int32_t>(tables_);
    w.put<int32_t>(bits_param_);
    w.put<int32_t>(probes_);
    w.put<int32_t>(rerank_);
    w.put<uint64_t>(seed_);
    w.put<int32_t>(bits_);
    w.put<uint64_t>(centered_at_);
    w.vec(center_);
    std::vector<uint32_t> codes(size_t(store_.high_water()) * tables_, 0);
    std::copy(codes_.begin(), codes_.begin() + std::min(codes.size(), codes_.size()), codes.begin());
    w.vec(codes);
    std::vector<uint64_t> sketch(size_t(store_.high_water()) * kSketchWords, 0);
    std::copy(sketch_.begin(), sketch_.begin() + std::min(sketch.size(), sketch_.size()), sketch.begin());
    w.vec(sketch);
}

void LshIndex::load(Reader& r) {
    tables_ = r.get<int32_t>("lsh tables");
    bits_param_ = r.get<int32_t>("lsh bits param");
    probes_ = r.get<int32_t>("lsh probes");
    rerank_ = r.get<int32_t>("lsh rerank");
    seed_ = r.get<uint64_t>("lsh seed");
    bits_ = r.get<int32_t>("lsh bits");
    if (tables_ < 1 || tables_ > 64 || bits_param_ < 0 || bits_param_ > kMaxBits || probes_ < 1 || probes_ > 4096 ||
        bits_ < 1 || bits_ > kMaxBits || rerank_ < 0)
        r.fail("bad lsh parameters");
    centered_at_ = r.get<uint64_t>("lsh centered_at");
    auto center = r.vec<float>("lsh center");
    if (center.size() != size_t(store_.dim())) r.fail("lsh center has the wrong size");
    codes_ = r.vec<uint32_t>("lsh codes");
    if (codes_.size() != size_t(store_.high_water()) * tables_) r.fail("lsh codes do not match the slots");
    sketch_ = r.vec<uint64_t>("lsh sketches");
    if (sketch_.size() != size_t(store_.high_water()) * kSketchWords) r.fail("lsh sketches do not match the slots");
    make_planes();  // the planes follow from the seed
    center_ = std::move(center);
    kernels().gemm[0](offset_.data(), tables_ * kMaxBits, center_.data(), store_.dim(), 1, planes_.data(),
                      store_.dim(), store_.dim(), tables_ * kMaxBits, nullptr);
    buckets_.assign(tables_, {});
    rebucket();
}

}  // namespace fm::memory
