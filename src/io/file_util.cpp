#include "file_util.hpp"

#include <stdlib.h>  // mkdtemp
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io::detail {

std::string last_error() { return std::strerror(errno); }

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

void pread_all(int fd, std::span<std::byte> out, std::uint64_t offset, const std::string& what) {
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t got = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) lowrank::detail::fail("read", "{}: {}", what, last_error());
    if (got == 0) lowrank::detail::fail("read", "{}: unexpected end of file (was it truncated while open?)", what);
    done += static_cast<std::size_t>(got);
  }
}

void pwrite_all(int fd, std::span<const std::byte> data, std::uint64_t offset, const std::string& what) {
  std::size_t done = 0;
  while (done < data.size()) {
    const ssize_t put = ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) lowrank::detail::fail("write", "{}: {}", what, last_error());
    done += static_cast<std::size_t>(put);
  }
}

void copy_range(int in, std::uint64_t in_offset, int out, std::uint64_t out_offset, std::uint64_t size,
                const std::string& what) {
  std::uint64_t done = 0;
  while (done < size) {
    auto io = static_cast<off_t>(in_offset + done), oo = static_cast<off_t>(out_offset + done);
    const std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(size - done, 1u << 30));
    const ssize_t n = ::copy_file_range(in, &io, out, &oo, chunk, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // not supported here (EXDEV, ENOSYS, EINVAL...) or EOF: fall back
    done += static_cast<std::uint64_t>(n);
  }
  if (done == size) return;
  std::vector<std::byte> buffer(static_cast<std::size_t>(std::min<std::uint64_t>(size - done, 8u << 20)));
  while (done < size) {
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(size - done, buffer.size()));
    pread_all(in, {buffer.data(), n}, in_offset + done, what);
    pwrite_all(out, {buffer.data(), n}, out_offset + done, what);
    done += n;
  }
}

TempFile::TempFile(const std::filesystem::path& target) : target_(target) {
  std::filesystem::path folder = target.parent_path();
  if (folder.empty()) folder = ".";
  std::string name(1, '.');  // (built piecewise: GCC 12 warns falsely on "." + string at -O3)
  name.append(target.filename().string()).append(".lowrank-XXXXXX");
  std::string pattern = (folder / name).string();
  const int fd = ::mkstemp(pattern.data());
  if (fd < 0) {
    lowrank::detail::fail("write", "cannot create a temporary file in {} for {}: {}", folder.string(),
                          target.string(), last_error());
  }
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  fd_ = Fd(fd);
  temp_ = pattern;
}

TempFile::TempFile(TempFile&& o) noexcept
    : target_(std::move(o.target_)), temp_(std::move(o.temp_)), fd_(std::move(o.fd_)), committed_(o.committed_) {
  o.committed_ = true;  // the moved-from object owns nothing
}

TempFile& TempFile::operator=(TempFile&& o) noexcept {
  if (this != &o) {
    if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
    target_ = std::move(o.target_);
    temp_ = std::move(o.temp_);
    fd_ = std::move(o.fd_);
    committed_ = o.committed_;
    o.committed_ = true;
  }
  return *this;
}

TempFile::~TempFile() {
  if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
}

void TempFile::commit() {
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd_.get(), 0666 & ~mask);
  if (::close(fd_.release()) != 0) lowrank::detail::fail("write", "{}: {}", temp_.string(), last_error());
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    lowrank::detail::fail("write", "cannot rename {} to {}: {}", temp_.string(), target_.string(), last_error());
  }
  committed_ = true;
}

std::string read_small_file(const std::filesystem::path& file, std::uint64_t limit, const char* fn) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(file, ec);
  if (ec) lowrank::detail::fail(fn, "{}: cannot read: {}", file.string(), ec.message());
  if (size > limit) lowrank::detail::fail(fn, "{}: {} bytes, more than the {} allowed for this file", file.string(), size, limit);
  std::ifstream in(file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in && !in.eof()) lowrank::detail::fail(fn, "{}: cannot read", file.string());
  return text.str();
}

bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) {
  struct stat sa {}, sb {};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool inside(const std::filesystem::path& child, const std::filesystem::path& parent) {
  std::error_code ec;
  const std::filesystem::path c = std::filesystem::weakly_canonical(child, ec);
  const std::filesystem::path p = std::filesystem::weakly_canonical(parent, ec);
  auto ci = c.begin(), pi = p.begin();
  for (; pi != p.end(); ++pi, ++ci) {
    if (ci == c.end() || *ci != *pi) return false;
  }
  return true;
}

std::string where(const Checkpoint& ck, const Checkpoint::Entry& e) {
  return (ck.is_folder() ? ck.path() / e.shard->file_name : ck.path()).string();
}

FolderGuard::~FolderGuard() {
  if (!path.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
}

std::filesystem::path make_temp_folder(const std::filesystem::path& out, const char* fn) {
  std::filesystem::path parent = out.parent_path();
  if (parent.empty()) parent = ".";
  std::string name(1, '.');
  name.append(out.filename().string()).append(".lowrank-XXXXXX");
  std::string pattern = (parent / name).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    lowrank::detail::fail(fn, "cannot create a temporary folder in {}: {}", parent.string(), last_error());
  }
  return pattern;
}

void commit_folder(const std::filesystem::path& temp, const std::filesystem::path& out, bool replace, const char* fn) {
  namespace fs = std::filesystem;
  ::chmod(temp.c_str(), 0755);
  std::error_code ec;
  if (replace) {
    const fs::path old = temp.string() + ".old";
    fs::rename(out, old, ec);
    if (ec) lowrank::detail::fail(fn, "cannot rename {} to {}: {}", out.string(), old.string(), ec.message());
    fs::rename(temp, out, ec);
    if (ec) {
      const std::string why = ec.message();
      fs::rename(old, out, ec);  // put the caller's folder back
      lowrank::detail::fail(fn, "cannot rename {} to {}: {}", temp.string(), out.string(), why);
    }
    fs::remove_all(old, ec);
    return;
  }
  if (fs::exists(out)) fs::remove(out, ec);  // an empty folder
  fs::rename(temp, out, ec);
  if (ec) lowrank::detail::fail(fn, "cannot rename {} to {}: {}", temp.string(), out.string(), ec.message());
}

}  // namespace io::detail
LOWRANK_END_NAMESPACE
