#include "memory/flat_index.h"

namespace fm::memory {

void FlatIndex::search(const float* q, const AllowMask* allow, TopK& out) const { exact_search(store_, q, allow, out); }

void FlatIndex::set_param(const std::string& key, double) { FM_ARG(false, "flat: no parameter '", key, "'"); }

double FlatIndex::get_param(const std::string& key) const { FM_ARG(false, "flat: no parameter '", key, "'"); }

}  // namespace fm::memory
