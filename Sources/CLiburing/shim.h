// Imports liburing into Swift.
//
// Why this order: liburing.h defines _XOPEN_SOURCE/_GNU_SOURCE before it pulls in
// libc headers, which then disagree with the copies Swift's Glibc module already
// built ('__fds_bits ... is not present in definition of fd_set'). Including the
// libc headers first, then the kernel's io_uring.h, then liburing.h keeps one
// definition of each type (swift-nio's CNIOLinux does the same).
#ifndef CLIBURING_SHIM_H
#define CLIBURING_SHIM_H

#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <signal.h>
#include <sched.h>
#include <fcntl.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <liburing.h>

// The SQ ring's flags word, which the kernel changes at any time (IORING_SQ_TASKRUN):
// loaded afresh on every call, as liburing loads it, so a polling loop sees the change.
static inline unsigned cliburing_sq_flags(const struct io_uring *ring) {
    return IO_URING_READ_ONCE(*ring->sq.kflags);
}

// Tells the CPU that the caller is spinning (x86 PAUSE, arm64 YIELD): the core gives
// way to its sibling thread and does not flood the memory system with loads.
static inline void cliburing_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

#endif
