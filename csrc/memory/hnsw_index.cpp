#include "memory/hnsw_index.h"

#include <cmath>
#include <queue>

namespace fm::memory {

namespace {
thread_local VisitedSet tl_visited;
}  // namespace

HnswIndex::HnswIndex(const KeyStore& store, const Params& p)
    : store_(store),
      M_(int(param_or(p, "M", 16))),
      ef_construction_(int(param_or(p, "ef_construction", 200))),
      ef_search_(int(param_or(p, "ef_search", 160))),
      rng_(uint64_t(param_or(p, "seed", 1234))) {
    FM_ARG(M_ >= 2 && M_ <= 128, "hnsw: M must be in [2, 128], got ", M_);
    FM_ARG(ef_construction_ >= 1 && ef_search_ >= 1, "hnsw: ef_construction and ef_search must be >= 1");
    level_mult_ = 1.0 / std::log(double(M_));
}

void HnswIndex::set_param(const std::string& key, double value) {
    if (key == "ef_search") {
        FM_ARG(value >= 1, "hnsw: ef_search must be >= 1");
        ef_search_ = int(value);
    } else if (key == "ef_construction") {
        FM_ARG(value >= 1, "hnsw: ef_construction must be >= 1");
        ef_construction_ = int(value);
    } else {
        FM_ARG(false, "hnsw: parameter '", key, "' cannot be set after creation (settable: ef_search, ef_construction)");
    }
}

std::vector<Params> HnswIndex::ladder() const {
    std::vector<Params> out;
    for (int ef : {10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048})
        out.push_back({{"ef_search", ef}});
    return out;
}

double HnswIndex::get_param(const std::string& key) const {
    if (key == "M") return M_;
    if (key == "ef_search") return ef_search_;
    if (key == "ef_construction") return ef_construction_;
    FM_ARG(false, "hnsw: unknown parameter '", key, "' (M, ef_construction, ef_search)");
}

size_t HnswIndex::memory_bytes() const {
    size_t n = level_.size() + links0_.size() * sizeof(uint32_t) + upper_.size() * sizeof(upper_[0]);
    for (const auto& u : upper_) n += u.size() * sizeof(uint32_t);
    return n;
}

uint32_t* HnswIndex::links(uint32_t s, int level) {
    return level == 0 ? &links0_[size_t(s) * (1 + 2 * M_)] : &upper_[s][size_t(level - 1) * (1 + M_)];
}
const uint32_t* HnswIndex::links(uint32_t s, int level) const {
    return const_cast<HnswIndex*>(this)->links(s, level);
}

void HnswIndex::grow(uint32_t slot) {
    if (slot < level_.size()) return;
    size_t n = std::max<size_t>(slot + 1, level_.size() * 2);
    level_.resize(n, -1);
    links0_.resize(n * (1 + 2 * M_), 0);
    upper_.resize(n);
}

std::vector<HnswIndex::Scored> HnswIndex::search_level(const float* q, const std::vector<Scored>& entry, int ef,
                                                       int level) const {
    VisitedSet& seen = tl_visited;
    seen.begin(level_.size());
    std::priority_queue<Scored> cand;                                               // best first
    std::priority_queue<Scored, std::vector<Scored>, std::greater<Scored>> best;  // worst first
    for (const Scored& e : entry) {
        seen.test_and_set(e.second);
        cand.push(e);
        best.push(e);
    }
    while (best.size() > size_t(ef)) best.pop();
    while (!cand.empty()) {
        const Scored c = cand.top();
        if (best.size() >= size_t(ef) && c.first < best.top().first) break;
        cand.pop();
        const uint32_t* nb = links(c.second, level);
        const uint32_t n = nb[0];
        for (uint32_t j = 1; j <= n; ++j) __builtin_prefetch(store_.row(nb[j]));
        for (uint32_t j = 1; j <= n; ++j) {
            const uint32_t e = nb[j];
            if (!in_graph(e, level) || seen.test_and_set(e)) continue;
            const float s = store_.score(q, e);
            if (best.size() < size_t(ef) || s > best.top().first) {
                cand.emplace(s, e);
                best.emplace(s, e);
                if (best.size() > size_t(ef)) best.pop();
            }
        }
    }
    std::vector<Scored> out(best.size());
    for (size_t i = out.size(); i-- > 0; best.pop()) out[i] = best.top();
    return out;
}

HnswIndex::Scored HnswIndex::greedy(const float* q, Scored cur, int from_level, int to_level) const {
    for (int l = from_level; l > to_level; --l) {
        for (bool moved = true; moved;) {
            moved = false;
            const uint32_t* nb = links(cur.second, l);
            for (uint32_t j = 1; j <= nb[0]; ++j) {
                if (!in_graph(nb[j], l)) continue;
                const float s = store_.score(q, nb[j]);
                if (s > cur.first) cur = {s, nb[j]}, moved = true;
            }
        }
    }
    return cur;
}

std::vector<uint32_t> HnswIndex::select(std::vector<Scored> cands, int m) const {
    std::sort(cands.begin(), cands.end(), std::greater<Scored>());
    std::vector<uint32_t> out, pruned;
    for (const Scored& c : cands) {
        if (int(out.size()) >= m) break;
        bool good = true;
        for (uint32_t r : out)
            if (store_.score(store_.row(c.second), store_.row(r)) > c.first) {
                good = false;
                break;
            }
        (good ? out : pruned).push_back(c.second);
    }
    // keepPrunedConnections (the paper's option): free link slots take the best pruned candidates,
    // which keeps dense near-duplicate clusters (common among token embeddings) reachable
    for (size_t i = 0; i < pruned.size() && int(out.size()) < m; ++i) out.push_back(pruned[i]);
    return out;
}

void HnswIndex::set_links(uint32_t s, int level, const std::vector<uint32_t>& nb) {
    uint32_t* l = links(s, level);
    l[0] = uint32_t(nb.size());
    std::copy(nb.begin(), nb.end(), l + 1);
}

void HnswIndex::connect(uint32_t from, uint32_t to, int level) {
    uint32_t* l = links(from, level);
    for (uint32_t j = 1; j <= l[0]; ++j)
        if (l[j] == to) return;
    if (int(l[0]) < max_links(level)) {
        l[++l[0]] = to;
        return;
    }
    std::vector<Scored> cands{{store_.score(store_.row(from), store_.row(to)), to}};
    for (uint32_t j = 1; j <= l[0]; ++j)
        if (in_graph(l[j], level)) cands.emplace_back(store_.score(store_.row(from), store_.row(l[j])), l[j]);
    set_links(from, level, select(std::move(cands), max_links(level)));
}

void HnswIndex::add(uint32_t slot) {
    grow(slot);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const int level = std::min(int(-std::log(std::max(u(rng_), 1e-12)) * level_mult_), 30);
    level_[slot] = int8_t(level);
    links(slot, 0)[0] = 0;
    upper_[slot].assign(size_t(level) * (1 + M_), 0);
    const float* q = store_.row(slot);
    if (entry_ == kNone) {
        entry_ = slot, max_level_ = level;
        return;
    }
    Scored ep = greedy(q, {store_.score(q, entry_), entry_}, max_level_, level);
    std::vector<Scored> eps{ep};
    for (int l = std::min(level, max_level_); l >= 0; --l) {
        std::vector<Scored> found = search_level(q, eps, ef_construction_, l);
        std::vector<Scored> cands;
        for (const Scored& f : found)
            if (f.second != slot) cands.push_back(f);
        std::vector<uint32_t> nb = select(cands, M_);
        set_links(slot, l, nb);
        for (uint32_t n : nb) connect(n, slot, l);
        eps = found;
    }
    if (level > max_level_) entry_ = slot, max_level_ = level;
}

void HnswIndex::remove(uint32_t slot) {
    if (!in_graph(slot, 0)) return;
    const int top = level_[slot];
    level_[slot] = -1;  // from here on, search and repair ignore it
    for (int l = 0; l <= top; ++l) {
        const uint32_t* ls = links(slot, l);
        std::vector<uint32_t> nbrs(ls + 1, ls + 1 + ls[0]);
        for (uint32_t n : nbrs) {
            if (!in_graph(n, l)) continue;
            const uint32_t* ln = links(n, l);
            std::vector<Scored> cands;
            auto consider = [&](uint32_t c) {
                if (c == n || !in_graph(c, l)) return;
                for (const Scored& x : cands)
                    if (x.second == c) return;
                cands.emplace_back(store_.score(store_.row(n), store_.row(c)), c);
            };
            for (uint32_t j = 1; j <= ln[0]; ++j) consider(ln[j]);
            for (uint32_t c : nbrs) consider(c);
            set_links(n, l, select(std::move(cands), max_links(l)));
        }
    }
    links(slot, 0)[0] = 0;
    upper_[slot].clear();
    if (entry_ == slot) {  // the new entry point: a node of the highest level left
        entry_ = kNone, max_level_ = -1;
        for (uint32_t s = 0; s < level_.size(); ++s)
            if (level_[s] > max_level_) entry_ = s, max_level_ = level_[s];
    }
}

void HnswIndex::search(const float* q, const AllowMask* allow, TopK& out) const {
    if (entry_ == kNone) return;
    Scored ep = greedy(q, {store_.score(q, entry_), entry_}, max_level_, 0);
    const int ef = std::max(allow ? 4 * ef_search_ : ef_search_, out.k());  // a filter discards some
    for (const Scored& r : search_level(q, {ep}, ef, 0))
        if (!allow || (*allow)[r.second]) out.push(r.first, r.second);
}

void HnswIndex::save(Writer& w) const {
    w.put<int32_t>(M_);
    w.put<int32_t>(ef_construction_);
    w.put<int32_t>(ef_search_);
    w.put<uint32_t>(entry_);
    w.put<int32_t>(max_level_);
    const size_t hw = store_.high_water();
    std::vector<int8_t> levels(level_.begin(), level_.begin() + std::min(hw, level_.size()));
    levels.resize(hw, -1);
    w.vec(levels);
    for (uint32_t s = 0; s < hw; ++s) {
        if (levels[s] < 0) continue;
        for (int l = 0; l <= levels[s]; ++l) {
            const uint32_t* ls = links(s, l);
            w.put<uint32_t>(ls[0]);
            w.bytes(ls + 1, ls[0] * sizeof(uint32_t));
        }
    }
}

void HnswIndex::load(Reader& r) {
    M_ = r.get<int32_t>("hnsw M");
    ef_construction_ = r.get<int32_t>("hnsw ef_construction");
    ef_search_ = r.get<int32_t>("hnsw ef_search");
    if (M_ < 2 || M_ > 128 || ef_construction_ < 1 || ef_search_ < 1) r.fail("bad hnsw parameters");
    level_mult_ = 1.0 / std::log(double(M_));
    entry_ = r.get<uint32_t>("hnsw entry");
    max_level_ = r.get<int32_t>("hnsw max level");
    auto levels = r.vec<int8_t>("hnsw levels");
    const uint32_t hw = store_.high_water();
    if (levels.size() != hw) r.fail("hnsw levels do not match the slots");
    level_.clear();
    links0_.clear();
    upper_.clear();
    if (hw) grow(hw - 1);
    int top = -1;
    for (uint32_t s = 0; s < hw; ++s) {
        if (levels[s] < 0) continue;
        if (levels[s] > 30 || !store_.live(s)) r.fail("hnsw node on a free slot or too high");
        level_[s] = levels[s];
        top = std::max<int>(top, levels[s]);
        upper_[s].assign(size_t(levels[s]) * (1 + M_), 0);
        for (int l = 0; l <= levels[s]; ++l) {
            const uint32_t n = r.get<uint32_t>("hnsw link count");
            if (int(n) > max_links(l)) r.fail("hnsw node has too many links");
            uint32_t* ls = links(s, l);
            ls[0] = n;
            std::memcpy(ls + 1, r.bytes(n * sizeof(uint32_t), "hnsw links"), n * sizeof(uint32_t));
            for (uint32_t j = 1; j <= n; ++j)
                if (ls[j] >= hw) r.fail("hnsw link to a slot out of range");
        }
    }
    if (top != max_level_ || (top >= 0 && (entry_ >= hw || level_[entry_] != top)) || (top < 0 && entry_ != kNone))
        r.fail("hnsw entry point inconsistent");
}

}  // namespace fm::memory
