/* A full disk for one directory, injected where the fault is real: the C library's write
 * and fsync calls. Preloaded (LD_PRELOAD) into a test's subprocess, it makes every write
 * to a file under $FFL_FULL_DIR fail with ENOSPC, as a filesystem that fills up does,
 * once $FFL_FULL_BYTES more bytes have been written there after the first write to a path
 * containing $FFL_FULL_FROM (say a checkpoint's temporary directory).
 * Reads, renames and other files (stdout, stderr) are untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static long long used;
static int counting;

static int full(int fd, size_t count) {
  const char *dir = getenv("FFL_FULL_DIR");
  if (!dir) return 0;
  char link[64], path[PATH_MAX];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  if (n < 0) return 0;
  path[n] = 0;
  if (strncmp(path, dir, strlen(dir)) != 0) return 0;
  const char *from = getenv("FFL_FULL_FROM"), *bytes = getenv("FFL_FULL_BYTES");
  if (!from || !bytes) return 0;
  if (!__atomic_load_n(&counting, __ATOMIC_SEQ_CST)) {
    if (strstr(path, from)) __atomic_store_n(&counting, 1, __ATOMIC_SEQ_CST);
    return 0; /* that first write is not counted */
  }
  return __atomic_add_fetch(&used, (long long)count, __ATOMIC_SEQ_CST) > atoll(bytes);
}

#define NEXT(name) static __typeof__(name) *next; if (!next) next = dlsym(RTLD_NEXT, #name)

static size_t iov_bytes(const struct iovec *iov, int n) {
  size_t total = 0;
  for (int i = 0; i < n; i++) total += iov[i].iov_len;
  return total;
}

ssize_t write(int fd, const void *buf, size_t count) {
  NEXT(write);
  if (full(fd, count)) { errno = ENOSPC; return -1; }
  return next(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
  NEXT(pwrite);
  if (full(fd, count)) { errno = ENOSPC; return -1; }
  return next(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
  NEXT(pwrite64);
  if (full(fd, count)) { errno = ENOSPC; return -1; }
  return next(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
  NEXT(writev);
  if (full(fd, iov_bytes(iov, n))) { errno = ENOSPC; return -1; }
  return next(fd, iov, n);
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t offset) {
  NEXT(pwritev);
  if (full(fd, iov_bytes(iov, n))) { errno = ENOSPC; return -1; }
  return next(fd, iov, n, offset);
}

int fsync(int fd) {
  NEXT(fsync);
  if (full(fd, 0)) { errno = ENOSPC; return -1; }
  return next(fd);
}

int fdatasync(int fd) {
  NEXT(fdatasync);
  if (full(fd, 0)) { errno = ENOSPC; return -1; }
  return next(fd);
}
