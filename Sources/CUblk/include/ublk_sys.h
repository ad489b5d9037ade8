// Small C helpers for what Swift cannot reach directly:
// - GNU-only libc API (O_DIRECT, fallocate, thread affinity/names, block ioctls, spawn flags),
//   which Swift's Glibc module does not expose.
#ifndef CUBLK_SYS_H
#define CUBLK_SYS_H

#include <stdint.h>
#include <sys/types.h>
#include <linux/falloc.h>

#include "ublk_uapi.h"

int cublk_o_direct(void);
int cublk_fallocate(int fd, int mode, int64_t offset, int64_t length);
/// Pins the calling thread to the CPUs set in a kernel cpumask (`bytes` long).
int cublk_set_affinity_mask(const void *mask, size_t bytes);
int cublk_set_thread_name(const char *name);
/// Lets the calling thread run on every CPU the process's main thread may (undoing a
/// queue thread's pinning it inherited); 0 or -errno.
int cublk_use_process_affinity(void);
/// Size in bytes of a block device; 0 or -errno.
int cublk_block_device_size(int fd, uint64_t *bytes);
/// Logical and physical block size of a block device; 0 or -errno.
int cublk_block_device_sector_sizes(int fd, uint32_t *logical, uint32_t *physical);
/// The file offset alignment direct I/O on `path` needs (statx STATX_DIOALIGN, Linux 6.1+;
/// 0: no direct I/O there); -EOPNOTSUPP where the kernel or file system does not say, or -errno.
int64_t cublk_direct_io_alignment(const char *path);
/// Has the kernel read a disk's partition table again (BLKRRPART); 0 or -errno.
int cublk_reread_partitions(int fd);
/// prctl(PR_SET_DUMPABLE, 0) (prctl is variadic: Swift cannot call it); 0 or -errno.
int cublk_forbid_core_dumps(void);
/// The magic number of the file system holding `fd` (fstatfs's f_type), or -errno.
int64_t cublk_file_system_type(int fd);
/// prctl(PR_SET_IO_FLUSHER, 1) (Linux 5.6+, CAP_SYS_RESOURCE): the calling thread's memory
/// allocations never wait for I/O, and threads it creates later inherit that; 0 or -errno.
int cublk_set_io_flusher(void);
/// Sets a file's modification time (and so its change time) to now, its access time
/// unchanged (futimens with UTIME_OMIT, UTIME_NOW); 0 or -errno.
int cublk_touch_modification_time(int fd);
/// POSIX_SPAWN_SETSID (glibc, _GNU_SOURCE only).
short cublk_posix_spawn_setsid(void);

#endif
