// flashmem._core.MemoryBank: the C++ bank (csrc/memory/) behind python/flashmem/memory/bank.py.
#include "bindings/common.h"
#include "memory/bank_file.h"
#include "memory/memory_bank.h"

namespace fm::bindings {

using namespace nb::literals;

namespace {

namespace mem = fm::memory;
using Value = std::tuple<nb::bytes, std::string, int, int>;  // (raw bytes, "f16"|"f32", n_slots, d_value)
using KeyArray = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

mem::Entry make_entry(const std::optional<Value>& value, const std::string& text, const std::string& metadata) {
    mem::Entry e;
    if (value) {
        const auto& [raw, dtype, n_slots, d_value] = *value;
        e.value_dtype = fm::dtype_from_name(dtype);
        e.n_slots = n_slots, e.d_value = d_value;
        const auto* p = static_cast<const uint8_t*>(raw.data());
        e.value.assign(p, p + raw.size());
    }
    e.text = text, e.metadata = metadata;
    return e;
}

void check_width(const mem::MemoryBank& b, size_t width, const char* what) {
    FM_ARG(width == size_t(b.dim()), what, " must have ", b.dim(), " columns (the bank's dim), got ", width);
}

}  // namespace

void bind_memory(nb::module_& m) {
    nb::class_<mem::MemoryBank>(m, "MemoryBank")
        .def(nb::init<int, const std::string&, const std::string&, const mem::Params&>(), "dim"_a, "metric"_a,
             "index"_a, "params"_a)
        .def_prop_ro("dim", &mem::MemoryBank::dim)
        .def_prop_ro("metric", &mem::MemoryBank::metric)
        .def_prop_ro("index", &mem::MemoryBank::index_name)
        .def("__len__", &mem::MemoryBank::size)
        .def("contains", &mem::MemoryBank::contains)
        .def("ids", [](const mem::MemoryBank& b) {
            auto v = b.ids();
            auto out = numpy_owned<int64_t>({v.size()});
            std::copy(v.begin(), v.end(), out.data());
            return out;
        })
        .def(
            "add",
            [](mem::MemoryBank& b, KeyArray keys, std::optional<nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig>> ids,
               const std::vector<std::optional<Value>>& values, const std::vector<std::string>& texts,
               const std::vector<std::string>& metadata) {
                const size_t n = keys.shape(0);
                check_width(b, keys.shape(1), "keys");
                FM_ARG(!ids || ids->shape(0) == n, "got ", ids ? ids->shape(0) : 0, " ids for ", n, " keys");
                FM_ARG(values.empty() || values.size() == n, "got ", values.size(), " values for ", n, " keys");
                FM_ARG(texts.empty() || texts.size() == n, "got ", texts.size(), " texts for ", n, " keys");
                FM_ARG(metadata.empty() || metadata.size() == n, "got ", metadata.size(), " metadata for ", n, " keys");
                std::vector<mem::Entry> entries;
                if (!values.empty() || !texts.empty() || !metadata.empty())
                    for (size_t i = 0; i < n; ++i)
                        entries.push_back(make_entry(values.empty() ? std::nullopt : values[i],
                                                     texts.empty() ? "" : texts[i], metadata.empty() ? "" : metadata[i]));
                nb::gil_scoped_release nogil;
                auto out_ids = b.add(keys.data(), n, ids ? ids->data() : nullptr, std::move(entries));
                nb::gil_scoped_acquire gil;
                auto out = numpy_owned<int64_t>({n});
                std::copy(out_ids.begin(), out_ids.end(), out.data());
                return out;
            },
            "keys"_a, "ids"_a.none(), "values"_a, "texts"_a, "metadata"_a)
        .def("get",
             [](const mem::MemoryBank& b, int64_t id) {
                 auto key = numpy_owned<float>({size_t(b.dim())});
                 mem::Entry e = b.get(id, key.data());
                 return nb::make_tuple(key, nb::bytes(e.value.data(), e.value.size()),
                                       std::string(fm::dtype_name(e.value_dtype)), e.n_slots, e.d_value, e.text,
                                       e.metadata, e.created, e.updated);
             })
        .def(
            "update",
            [](mem::MemoryBank& b, int64_t id, std::optional<nb::ndarray<const float, nb::ndim<1>, nb::c_contig>> key,
               std::optional<Value> value, std::optional<std::string> text, std::optional<std::string> metadata) {
                if (key) check_width(b, key->shape(0), "key");
                std::optional<mem::Entry> v;
                if (value) v = make_entry(value, "", "");
                b.update(id, key ? key->data() : nullptr, v ? &*v : nullptr, text ? &*text : nullptr,
                         metadata ? &*metadata : nullptr);
            },
            "id"_a, "key"_a.none(), "value"_a.none(), "text"_a.none(), "metadata"_a.none())
        .def("remove", [](mem::MemoryBank& b, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig> ids) {
            b.remove(ids.data(), ids.shape(0));
        })
        .def(
            "replace",
            [](mem::MemoryBank& b, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig> ids,
               nb::ndarray<const float, nb::ndim<1>, nb::c_contig> key, std::optional<int64_t> new_id,
               std::optional<Value> value, const std::string& text, const std::string& metadata) {
                check_width(b, key.shape(0), "key");
                return b.replace(ids.data(), ids.shape(0), key.data(), new_id, make_entry(value, text, metadata));
            },
            "ids"_a, "key"_a, "new_id"_a.none(), "value"_a.none(), "text"_a, "metadata"_a)
        .def(
            "search",
            [](const mem::MemoryBank& b, KeyArray queries, int k,
               std::optional<nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig>> allow) {
                check_width(b, queries.shape(1), "queries");
                FM_ARG(k > 0, "k must be positive, got ", k);
                const size_t nq = queries.shape(0);
                auto ids = numpy_owned<int64_t>({nq, size_t(k)});
                auto scores = numpy_owned<float>({nq, size_t(k)});
                std::optional<std::vector<int64_t>> allowed;
                if (allow) allowed.emplace(allow->data(), allow->data() + allow->shape(0));
                {
                    nb::gil_scoped_release nogil;
                    b.search(queries.data(), nq, k, allowed ? &*allowed : nullptr, ids.data(), scores.data());
                }
                return nb::make_tuple(ids, scores);
            },
            "queries"_a, "k"_a, "allow"_a.none())
        .def("metadata_all", &mem::MemoryBank::metadata_all, "(id, metadata JSON) of every entry")
        .def("texts_all", &mem::MemoryBank::texts_all, "(id, text) of every entry")
        .def("set_param", &mem::MemoryBank::set_param, nb::call_guard<nb::gil_scoped_release>())
        .def("get_param", &mem::MemoryBank::get_param)
        .def_prop_ro("memory_bytes", &mem::MemoryBank::memory_bytes)
        .def("save", &mem::MemoryBank::save, "path"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_static("load", &mem::MemoryBank::load, "path"_a, "mmap"_a = false,
                    nb::call_guard<nb::gil_scoped_release>());
    m.def("bank_checksum", [](nb::bytes b) {
        return mem::checksum64(static_cast<const uint8_t*>(b.data()), b.size());
    }, "The checksum memory-bank files carry over their payload (for tests that craft files).");
}

}  // namespace fm::bindings
