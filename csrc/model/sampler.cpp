#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "core/error.h"
#include "kernels/cpu/kernels.h"

namespace fm {

void SamplingParams::validate() const {
    FM_ARG(std::isfinite(temperature) && temperature >= 0, "temperature must be >= 0 (0 = greedy), got ", temperature);
    FM_ARG(top_k >= 0, "top_k must be >= 0 (0 = off), got ", top_k);
    FM_ARG(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
    FM_ARG(std::isfinite(min_p) && min_p >= 0 && min_p < 1, "min_p must be in [0, 1), got ", min_p);
    FM_ARG(std::isfinite(repetition_penalty) && repetition_penalty > 0, "repetition_penalty must be > 0, got ",
           repetition_penalty);
}

namespace {
uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

Sampler::Sampler(SamplingParams params, int64_t seed) : p_(params) {
    p_.validate();
    uint64_t x = seed >= 0 ? uint64_t(seed) : (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
    for (auto& s : s_) s = splitmix64(x);
}

double Sampler::uniform() {  // xoshiro256**, the top 53 bits
    const uint64_t result = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0], s_[3] ^= s_[1], s_[1] ^= s_[2], s_[0] ^= s_[3];
    s_[2] ^= t, s_[3] = rotl(s_[3], 45);
    return double(result >> 11) * 0x1.0p-53;
}

void Sampler::begin(const int32_t* history, int n, int vocab) {
    for (int32_t t : seen_list_) seen_[t] = 0;
    seen_list_.clear();
    seen_.resize(vocab, 0);
    for (int i = 0; i < n; ++i) {
        FM_ARG(history[i] >= 0 && history[i] < vocab, "sampler: history token ", history[i], " out of range [0, ",
               vocab, ")");
        remember(history[i], vocab);
    }
}

void Sampler::remember(int32_t token, int vocab) {
    if (int(seen_.size()) < vocab) seen_.resize(vocab, 0);
    if (!seen_[token]) seen_[token] = 1, seen_list_.push_back(token);
}

int32_t Sampler::sample(const float* logits, int vocab) {
    FM_ARG(vocab > 0, "sample: no logits");
    const float* x = logits;
    if (p_.repetition_penalty != 1.0f && !seen_list_.empty()) {
        penalized_.assign(logits, logits + vocab);
        for (int32_t t : seen_list_) {
            if (t >= vocab) continue;
            float& v = penalized_[t];
            v = v > 0 ? v / p_.repetition_penalty : v * p_.repetition_penalty;
        }
        x = penalized_.data();
    }
    const int32_t token = draw(x, vocab);
    remember(token, vocab);
    return token;
}

int32_t Sampler::draw(const float* x, int vocab) {
    if (p_.temperature == 0.0f) return kernels().argmax(x, vocab);  // the first largest

    // candidates: all tokens, or the top_k largest (with the k-th value's ties, as the reference keeps them)
    order_.resize(vocab);
    for (int i = 0; i < vocab; ++i) order_[i] = i;
    int n = vocab;
    auto larger = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    if (p_.top_k > 0 && p_.top_k < vocab) {
        std::nth_element(order_.begin(), order_.begin() + (p_.top_k - 1), order_.end(), larger);
        const float kth = x[order_[p_.top_k - 1]];
        n = int(std::partition(order_.begin(), order_.end(), [&](int32_t i) { return x[i] >= kth; }) - order_.begin());
    }
    // softmax over the candidates, in double (the reference's float64)
    const double inv_t = 1.0 / double(p_.temperature);
    double top = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < n; ++j) top = std::max(top, double(x[order_[j]]) * inv_t);
    prob_.resize(n);
    double sum = 0;
    for (int j = 0; j < n; ++j) sum += prob_[j] = std::exp(double(x[order_[j]]) * inv_t - top);
    double pmax = 0;
    for (int j = 0; j < n; ++j) pmax = std::max(pmax, prob_[j] /= sum);
    if (p_.min_p > 0)
        for (int j = 0; j < n; ++j)
            if (prob_[j] < double(p_.min_p) * pmax) prob_[j] = 0;
    if (p_.top_p < 1.0f) {
        // the most likely first (ties by token id), in growing prefixes: most of the mass is in a few
        std::vector<int>& idx = idx_;
        idx.resize(n);
        for (int j = 0; j < n; ++j) idx[j] = j;
        auto more = [&](int a, int b) {
            return prob_[a] > prob_[b] || (prob_[a] == prob_[b] && order_[a] < order_[b]);
        };
        int sorted = 0, keep = n;
        for (int m = std::min(n, 64);; m = std::min(n, m * 8)) {
            std::partial_sort(idx.begin() + sorted, idx.begin() + m, idx.end(), more);
            double cum = 0;
            bool found = false;
            for (int j = 0; j < m; ++j) {
                if (cum >= double(p_.top_p)) {  // the prefix before j already reaches top_p
                    keep = j;
                    found = true;
                    break;
                }
                cum += prob_[idx[j]];
            }
            sorted = m;
            if (found || m == n) break;
        }
        for (int j = keep; j < n; ++j) prob_[idx[j]] = 0;
    }
    double total = 0;
    for (double p : prob_) total += p;
    const double u = uniform() * total;
    double cum = 0;
    int last = -1;
    for (int j = 0; j < n; ++j) {
        if (prob_[j] <= 0) continue;
        last = j;
        cum += prob_[j];
        if (u < cum) return order_[j];
    }
    return order_[last];  // rounding at the very end
}

}  // namespace fm
