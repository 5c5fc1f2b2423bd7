// A weight matrix as the engine holds it: its bytes and their format. Row r of `rows` is
// `row_bytes` bytes at bytes + r * row_bytes, `cols` weights in `format` (core/format.h).
// A streamed matrix holds no bytes: they stay in the model file at `file_offset` and are read
// when needed (model/weight_stream.h).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/buffer.h"
#include "core/format.h"

namespace fm {

struct Tensor {
    Buffer bytes;
    Format format = Format::F32;
    int64_t rows = 0, cols = 0;
    size_t row_bytes = 0;
    bool streamed = false;
    // Each group of 8 rows interleaved for the q4_0/q4_1 kernel whose lanes are rows
    // (quant::repack_x8): only linear() reads such a matrix, 8 rows at a time.
    bool interleaved = false;
    uint64_t file_offset = 0;

    bool present() const { return bytes.size() > 0 || streamed; }
    size_t size() const { return bytes.size(); }  // bytes owned (rounded up as Buffer allocates)
    size_t nbytes() const { return size_t(rows) * row_bytes; }  // bytes of the weights
    template <typename T = char>
    T* data() const { return bytes.data<T>(); }
    const char* row(int64_t r) const { return bytes.data<char>() + size_t(r) * row_bytes; }
    // Allocates rows x cols weights of `format` (a row must be whole blocks), on huge pages when
    // large (Buffer::allocate; footprint() is what it takes).
    void allocate(Format f, int64_t n_rows, int64_t n_cols) {
        format = f, rows = n_rows, cols = n_cols;
        row_bytes = format_row_bytes(f, n_cols);
        bytes.allocate(size_t(n_rows) * row_bytes, 64, /*huge=*/true);
    }
    static size_t footprint(size_t nbytes) { return Buffer::footprint(nbytes, 64, /*huge=*/true); }
    // Describes rows x cols weights of `format` at byte `offset` of the streamed file, holding none.
    void stream(Format f, int64_t n_rows, int64_t n_cols, uint64_t offset) {
        format = f, rows = n_rows, cols = n_cols;
        row_bytes = format_row_bytes(f, n_cols);
        streamed = true, file_offset = offset;
    }
};

}  // namespace fm
