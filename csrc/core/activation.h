// The FFN's gating activation: h_i = act(gate_i . x) * (up_i . x). SwiGLU (Llama, Mistral, Qwen2,
// SmolLM2) uses silu; GeGLU (Gemma) uses gelu with the tanh approximation (HF's
// "gelu_pytorch_tanh"). Scalar, in f32, written as HF transformers computes them.
#pragma once
#include <cmath>
#include <string>

namespace fm {

enum class Activation : int { SiLU = 0, GeluTanh = 1 };

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
inline float gelu_tanh(float g) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * g * (1.0f + std::tanh(k * (g + 0.044715f * g * g * g)));
}

inline float activate(Activation a, float g) { return a == Activation::SiLU ? silu(g) : gelu_tanh(g); }

// The same in double precision, for the scalar references the kernels are tested against.
inline double activate_ref(Activation a, double g) {
    if (a == Activation::SiLU) return g / (1.0 + std::exp(-g));
    return 0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
}

// h = act(h) * u, in place (h: the gate's outputs)
inline void gated(Activation a, float* h, const float* u, int n) {
    if (a == Activation::SiLU)
        for (int i = 0; i < n; ++i) h[i] = silu(h[i]) * u[i];
    else
        for (int i = 0; i < n; ++i) h[i] = gelu_tanh(h[i]) * u[i];
}

inline const char* activation_name(Activation a) { return a == Activation::SiLU ? "silu" : "gelu_tanh"; }
// "silu" (also "swish"), "gelu_tanh" (also HF's "gelu_pytorch_tanh"); anything else raises in the caller
inline bool activation_from_name(const std::string& s, Activation& out) {
    if (s == "silu" || s == "swish") return out = Activation::SiLU, true;
    if (s == "gelu_tanh" || s == "gelu_pytorch_tanh") return out = Activation::GeluTanh, true;
    return false;
}

}  // namespace fm
