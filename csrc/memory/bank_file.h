// The memory-bank file format. A 64-byte preamble: magic "FMBANK\0\0", version (u32 at byte 8),
// payload length (u64 at 16), checksum64 of the payload (u64 at 24). Then the payload, written
// with serialize.h (counts as u64, little-endian):
//   dim u32, metric u32, index name, next id i64, slot ids [i64], live flags [u8],
//   zero padding to a multiple of 64, keys (slots, dim) f32 (the keys can be mapped in place),
//   per live slot: value dtype u32, n_slots i32, d_value i32, value [u8], text, metadata,
//                  created f64, updated f64,
//   the index's own state (Index::save; nothing for flat).
// Saves are atomic: a temporary file beside the target, fsync, rename over it, fsync of the folder,
// so a crash leaves the old file or the new one. Loads check the magic, version, length and
// checksum before parsing anything, every count against the bytes left (serialize.h), and that
// texts and metadata are UTF-8.
// MemoryBank::save and MemoryBank::load are defined in bank_file.cpp.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fm::memory {

// The checksum bank files carry over their payload.
uint64_t checksum64(const uint8_t* p, size_t n);

}  // namespace fm::memory
