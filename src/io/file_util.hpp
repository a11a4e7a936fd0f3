// POSIX file helpers shared by the io component (not installed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include "lowrank/core/config.hpp"
#include "lowrank/io/checkpoint.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io::detail {

/// `strerror(errno)` for the current errno.
std::string last_error();

/// A file descriptor closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept;
  ~Fd();
  [[nodiscard]] int get() const noexcept { return fd_; }
  int release() noexcept {
    const int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_ = -1;
};

/// Reads exactly `out.size()` bytes at `offset`; throws Error (naming `what`) on failure or EOF.
void pread_all(int fd, std::span<std::byte> out, std::uint64_t offset, const std::string& what);
/// Writes exactly `data.size()` bytes at `offset`; throws Error (naming `what`) on failure.
void pwrite_all(int fd, std::span<const std::byte> data, std::uint64_t offset, const std::string& what);
/// Copies `size` bytes from `in` at `in_offset` to `out` at `out_offset`, in the kernel where it
/// can (`copy_file_range`), else through a buffer.
void copy_range(int in, std::uint64_t in_offset, int out, std::uint64_t out_offset, std::uint64_t size,
                const std::string& what);

/// A temporary file next to `target` (same folder, hidden name), removed on destruction unless
/// `commit` renamed it over the target.
class TempFile {
 public:
  explicit TempFile(const std::filesystem::path& target);
  TempFile(TempFile&&) noexcept;
  TempFile& operator=(TempFile&&) noexcept;
  ~TempFile();
  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return temp_; }
  [[nodiscard]] const std::filesystem::path& target() const noexcept { return target_; }
  /// Sets the usual permissions (0666 & ~umask), closes, renames over the target.
  void commit();

 private:
  std::filesystem::path target_, temp_;
  Fd fd_;
  bool committed_ = false;
};

/// The whole of a small text file (a JSON config or index); throws Error, naming `fn` and the
/// file, if it cannot be read or has more than `limit` bytes.
std::string read_small_file(const std::filesystem::path& file, std::uint64_t limit, const char* fn);

/// True if `a` and `b` name the same existing file (same device and inode).
bool same_file(const std::filesystem::path& a, const std::filesystem::path& b);

/// True if `child` is `parent` or lies inside it (compared after `weakly_canonical`).
bool inside(const std::filesystem::path& child, const std::filesystem::path& parent);

/// The file a checkpoint entry lives in (its shard for a folder), for messages.
std::string where(const Checkpoint& ck, const Checkpoint::Entry& e);

/// Removes a folder tree on destruction unless `path` was cleared.
struct FolderGuard {
  std::filesystem::path path;
  FolderGuard() = default;
  explicit FolderGuard(std::filesystem::path p) noexcept : path(std::move(p)) {}
  FolderGuard(const FolderGuard&) = delete;
  FolderGuard& operator=(const FolderGuard&) = delete;
  ~FolderGuard();
};

/// Creates the folder `.<name>.lowrank-XXXXXX` next to `out`; throws Error naming `fn` on failure.
std::filesystem::path make_temp_folder(const std::filesystem::path& out, const char* fn);

/// Renames the finished temporary folder `temp` (made 0755) to `out`, replacing `out` if
/// `replace` (the caller's folder is put back if the final rename fails), else replacing an empty
/// folder there; throws Error naming `fn` on failure.
void commit_folder(const std::filesystem::path& temp, const std::filesystem::path& out, bool replace, const char* fn);

}  // namespace io::detail
LOWRANK_END_NAMESPACE
