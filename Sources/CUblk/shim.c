#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>
#include <sys/prctl.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include "include/ublk_sys.h"

int cublk_o_direct(void) { return O_DIRECT; }

int cublk_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

int cublk_touch_modification_time(int fd) {
    const struct timespec times[2] = {{.tv_nsec = UTIME_OMIT}, {.tv_nsec = UTIME_NOW}};
    return futimens(fd, times) == 0 ? 0 : -errno;
}

int cublk_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = 0;
    return pthread_setname_np(pthread_self(), buf);
}

int cublk_set_affinity_mask(const void *mask, size_t bytes) {
    cpu_set_t set;
    CPU_ZERO(&set);
    memcpy(&set, mask, bytes < sizeof(set) ? bytes : sizeof(set));
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

int cublk_use_process_affinity(void) {
    cpu_set_t set;
    if (sched_getaffinity(getpid(), sizeof(set), &set) != 0) return -errno;
    return -pthread_setaffinity_np(pthread_self(), sizeof(set), &set); /* it returns the errno */
}

int cublk_block_device_size(int fd, uint64_t *bytes) {
    return ioctl(fd, BLKGETSIZE64, bytes) == 0 ? 0 : -errno;
}

int cublk_block_device_sector_sizes(int fd, uint32_t *logical, uint32_t *physical) {
    int l = 0;
    unsigned int p = 0;
    if (ioctl(fd, BLKSSZGET, &l) != 0) return -errno;
    if (ioctl(fd, BLKPBSZGET, &p) != 0) return -errno;
    *logical = (uint32_t)l;
    *physical = p;
    return 0;
}

int64_t cublk_direct_io_alignment(const char *path) {
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    if (statx(AT_FDCWD, path, 0, STATX_DIOALIGN, &stx) != 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN)) return -EOPNOTSUPP;
    return stx.stx_dio_offset_align;
}

int cublk_reread_partitions(int fd) {
    return ioctl(fd, BLKRRPART) == 0 ? 0 : -errno;
}

int64_t cublk_file_system_type(int fd) {
    struct statfs info;
    return fstatfs(fd, &info) == 0 ? (int64_t)info.f_type : -errno;
}

int cublk_forbid_core_dumps(void) {
    return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 ? 0 : -errno;
}

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

int cublk_set_io_flusher(void) {
    return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

short cublk_posix_spawn_setsid(void) { return POSIX_SPAWN_SETSID; }
