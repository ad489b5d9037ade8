// Imports liburing into Swift (a copy of Sources/CLiburing/shim.h of the root package).
//
// Why this order: liburing.h defines _XOPEN_SOURCE/_GNU_SOURCE before it pulls in
// libc headers, which then disagree with the copies Swift's Glibc module already
// built ('__fds_bits ... is not present in definition of fd_set'). Including the
// libc headers first, then the kernel's io_uring.h, then liburing.h keeps one
// definition of each type (swift-nio's CNIOLinux does the same).
#ifndef CBENCHURING_SHIM_H
#define CBENCHURING_SHIM_H

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

#endif
