// Token sampling in the core (HF semantics, as python/flashmem/sampling.py's reference): the
// repetition penalty (positive logits divided by it, negative ones multiplied), then greedy
// (temperature 0: the first largest logit), or softmax(logits / temperature) filtered by top-k,
// min-p (p >= min_p * max p) and top-p (the smallest set of most likely tokens whose mass reaches
// top_p), renormalized, and one draw. Each Sampler has its own random stream (xoshiro256**,
// seeded through splitmix64): a seed gives the same tokens every run.
#pragma once
#include <cstdint>
#include <vector>

namespace fm {

struct SamplingParams {
    float temperature = 0.0f;  // 0: greedy
    int top_k = 0;             // 0: off
    float top_p = 1.0f;        // in (0, 1]
    float min_p = 0.0f;        // in [0, 1)
    float repetition_penalty = 1.0f;  // > 0; 1: off
    void validate() const;     // an exception names the field out of range
};

class Sampler {
  public:
    // seed < 0: a random seed (from std::random_device).
    Sampler(SamplingParams params, int64_t seed);
    const SamplingParams& params() const { return p_; }
    // A new sequence: the repetition penalty applies to these tokens (the prompt's) and to every
    // token sampled after them. Ids out of [0, vocab) raise.
    void begin(const int32_t* history, int n, int vocab);
    // One token from logits (vocab); it joins the history.
    int32_t sample(const float* logits, int vocab);
    // A uniform double in [0, 1) from this sampler's stream.
    double uniform();

  private:
    int32_t draw(const float* x, int vocab);
    void remember(int32_t token, int vocab);

    SamplingParams p_;
    uint64_t s_[4];
    std::vector<int32_t> seen_list_;  // distinct tokens of the history
    std::vector<uint8_t> seen_;       // (vocab) token is in the history
    std::vector<float> penalized_;
    std::vector<double> prob_;
    std::vector<int32_t> order_;
    std::vector<int> idx_;
};

}  // namespace fm
