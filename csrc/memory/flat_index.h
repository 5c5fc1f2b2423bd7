// Flat index: no structure of its own; every search is exact over the key store (exact_search).
// The reference the approximate indexes are measured against.
#pragma once
#include "memory/index.h"

namespace fm::memory {

class FlatIndex final : public Index {
  public:
    explicit FlatIndex(const KeyStore& store) : store_(store) {}
    const char* name() const override { return "flat"; }
    void add(uint32_t) override {}
    void remove(uint32_t) override {}
    void search(const float* q, const AllowMask* allow, TopK& out) const override;
    void save(Writer&) const override {}
    void load(Reader&) override {}
    size_t memory_bytes() const override { return 0; }
    void set_param(const std::string& key, double) override;
    double get_param(const std::string& key) const override;

  private:
    const KeyStore& store_;
};

}  // namespace fm::memory
