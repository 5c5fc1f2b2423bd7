#include "io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace fm {

File::File(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    FM_IO(fd_ >= 0, "cannot open '", path, "': ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
        int e = errno;
        ::close(fd_);
        FM_IO(false, "cannot stat '", path, "': ", std::strerror(e));
    }
    size_ = uint64_t(st.st_size);
}

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

}  // namespace fm
