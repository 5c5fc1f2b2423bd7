#include "io/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "core/error.h"

namespace fm {

int open_read(const std::string& path, uint64_t* size, bool try_direct, bool* is_direct) {
    int fd = try_direct ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT) : -1;
    if (is_direct) *is_direct = fd >= 0;
    if (fd < 0) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);  // plain, or O_DIRECT refused
    FM_IO(fd >= 0, "cannot open '", path, "': ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        FM_IO(false, "cannot stat '", path, "': ", std::strerror(e));
    }
    *size = uint64_t(st.st_size);
    return fd;
}

File::File(const std::string& path) : path_(path) { fd_ = open_read(path, &size_); }

File::~File() {
    if (fd_ >= 0) ::close(fd_);
}

void File::read_exact(void* dst, size_t n, uint64_t offset, const std::string& what) const {
    FM_IO(offset + n <= size_, "'", path_, "' is truncated: ", what, " needs bytes [", offset, ", ", offset + n,
          ") but the file has ", size_, " bytes");
    char* p = static_cast<char*>(dst);
    while (n > 0) {
        ssize_t r = ::pread(fd_, p, n, off_t(offset));
        if (r < 0 && errno == EINTR) continue;
        FM_IO(r > 0, "read error in '", path_, "' at byte ", offset, " (", what,
              "): ", r == 0 ? "unexpected end of file" : std::strerror(errno));
        p += r, n -= size_t(r), offset += uint64_t(r);
    }
}

void File::drop_cached(uint64_t offset, size_t n) const {
    ::posix_fadvise(fd_, off_t(offset), off_t(n), POSIX_FADV_DONTNEED);  // advice: a failure changes nothing
}

FileMapping::FileMapping(const std::string& path) {
    uint64_t size = 0;
    const int fd = open_read(path, &size);
    if (size == 0) {
        ::close(fd);
        return;
    }
    void* m = ::mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    const int e = errno;
    ::close(fd);
    FM_IO(m != MAP_FAILED, "cannot map '", path, "': ", std::strerror(e));
    data_ = static_cast<uint8_t*>(m), size_ = size_t(size);
}

FileMapping::FileMapping(FileMapping&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}

FileMapping& FileMapping::operator=(FileMapping&& o) noexcept {
    if (this != &o) {
        release();
        data_ = std::exchange(o.data_, nullptr), size_ = std::exchange(o.size_, 0);
    }
    return *this;
}

void FileMapping::release() {
    if (data_) ::munmap(data_, size_);
    data_ = nullptr, size_ = 0;
}

void File::read_uncached(void* dst, size_t n, uint64_t offset, const std::string& what) const {
    constexpr size_t kPiece = size_t(4) << 20;
    for (size_t at = 0; at < n; at += kPiece) {
        const size_t len = n - at < kPiece ? n - at : kPiece;
        read_exact(static_cast<char*>(dst) + at, len, offset + at, what);
        drop_cached(offset + at, len);
    }
}

}  // namespace fm
