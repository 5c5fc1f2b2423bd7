// Files as the engine reads them: a read-only file with exact positional reads, and a private
// mapping of a whole file. Errors name the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace fm {

// Opens `path` read-only and returns the descriptor, with its size in *size; throws
// std::runtime_error naming the file. With try_direct, O_DIRECT is tried first and *is_direct
// says whether the filesystem accepted it (else the file is open buffered).
int open_read(const std::string& path, uint64_t* size, bool try_direct = false, bool* is_direct = nullptr);

class File {
  public:
    explicit File(const std::string& path);
    ~File();
    File(const File&) = delete;
    File& operator=(const File&) = delete;

    uint64_t size() const { return size_; }
    const std::string& path() const { return path_; }
    // Reads exactly n bytes at offset; throws std::runtime_error naming the file and `what`
    // on a short file or a read error.
    void read_exact(void* dst, size_t n, uint64_t offset, const std::string& what) const;
    // Asks the kernel to drop the page cache of bytes [offset, offset + n) (after reading weights
    // into the engine's own buffers, so that they are not held twice).
    void drop_cached(uint64_t offset, size_t n) const;
    // read_exact in pieces of at most 4 MiB, each dropped from the page cache once read: loading
    // a tensor never holds more than 4 MiB of it twice (in the page cache and in dst).
    void read_uncached(void* dst, size_t n, uint64_t offset, const std::string& what) const;

  private:
    std::string path_;
    int fd_ = -1;
    uint64_t size_ = 0;
};

// A private (copy-on-write) read-write mapping of a whole file: writes stay in this process.
// Unmapped on destruction; movable, not copyable.
class FileMapping {
  public:
    FileMapping() = default;
    // Maps all of `path` (an empty file maps to nothing); throws naming the file.
    explicit FileMapping(const std::string& path);
    ~FileMapping() { release(); }
    FileMapping(FileMapping&& o) noexcept;
    FileMapping& operator=(FileMapping&& o) noexcept;
    FileMapping(const FileMapping&) = delete;
    FileMapping& operator=(const FileMapping&) = delete;

    uint8_t* data() const { return data_; }
    size_t size() const { return size_; }

  private:
    void release();
    uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

}  // namespace fm
