// The ublk user-space ABI, as the kernel's include/uapi/linux/ublk_cmd.h defines it
// (layouts and numbers up to Linux 7.3; what each newer one needs is noted). Debian 12's own copy of that header is the
// 6.1 one, which lacks the ioctl-encoded opcodes, GET_FEATURES and most feature flags,
// so the project carries its own definitions. Sizes are checked by unit tests.
#ifndef CUBLK_UAPI_H
#define CUBLK_UAPI_H

#include <stdint.h>

// MARK: Control commands (sent to /dev/ublk-control in the SQE128 command area)

// Command numbers. The legacy opcodes are the bare numbers; newer kernels also
// accept (and with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=n, require) them encoded
// like ioctls: _IOR/_IOWR('u', nr, struct ublksrv_ctrl_cmd). The encoding is
// done in Swift (UblkSystem's `UblkOpcode`).
enum {
    UBLK_CMD_GET_QUEUE_AFFINITY = 0x01,
    UBLK_CMD_GET_DEV_INFO = 0x02,
    UBLK_CMD_ADD_DEV = 0x04,
    UBLK_CMD_DEL_DEV = 0x05,
    UBLK_CMD_START_DEV = 0x06,
    UBLK_CMD_STOP_DEV = 0x07,
    UBLK_CMD_SET_PARAMS = 0x08,
    UBLK_CMD_GET_PARAMS = 0x09,
    UBLK_CMD_START_USER_RECOVERY = 0x10,
    UBLK_CMD_END_USER_RECOVERY = 0x11,
    UBLK_CMD_GET_DEV_INFO2 = 0x12,
    UBLK_CMD_GET_FEATURES = 0x13,
    UBLK_CMD_DEL_DEV_ASYNC = 0x14,   // 6.9+; ioctl encoding only, like all below
    UBLK_CMD_UPDATE_SIZE = 0x15,     // UBLK_F_UPDATE_SIZE
    UBLK_CMD_QUIESCE_DEV = 0x16,     // UBLK_F_QUIESCE
    UBLK_CMD_TRY_STOP_DEV = 0x17,    // UBLK_F_SAFE_STOP_DEV
    UBLK_CMD_REG_BUF = 0x18,         // UBLK_F_SHMEM_ZC
    UBLK_CMD_UNREG_BUF = 0x19,       // UBLK_F_SHMEM_ZC
};

// I/O commands (sent to /dev/ublkcN).
enum {
    UBLK_IO_FETCH_REQ = 0x20,
    UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21,
    UBLK_IO_NEED_GET_DATA = 0x22,
    UBLK_IO_REGISTER_IO_BUF = 0x23,   // UBLK_F_SUPPORT_ZERO_COPY
    UBLK_IO_UNREGISTER_IO_BUF = 0x24, // UBLK_F_SUPPORT_ZERO_COPY
    UBLK_IO_PREP_IO_CMDS = 0x25,      // UBLK_F_BATCH_IO
    UBLK_IO_COMMIT_IO_CMDS = 0x26,    // UBLK_F_BATCH_IO
    UBLK_IO_FETCH_IO_CMDS = 0x27,     // UBLK_F_BATCH_IO
};

// Results of FETCH/COMMIT_AND_FETCH completions.
enum {
    UBLK_IO_RES_OK = 0,
    UBLK_IO_RES_NEED_GET_DATA = 1,
    // UBLK_IO_RES_ABORT is -ENODEV.
};

// Per-queue descriptor arrays are mmapped from /dev/ublkcN at
// UBLKSRV_CMD_BUF_OFFSET + q_id * round_up(UBLK_MAX_QUEUE_DEPTH * 24, page).
#define UBLKSRV_CMD_BUF_OFFSET 0ULL
#define UBLKSRV_IO_BUF_OFFSET 0x80000000ULL
#define UBLK_MAX_QUEUE_DEPTH 4096
#define UBLK_MAX_NR_QUEUES 4096
#define UBLK_FEATURES_LEN 8

// MARK: Feature flags (ublksrv_ctrl_dev_info.flags, and GET_FEATURES)
#define UBLK_F_SUPPORT_ZERO_COPY        (1ULL << 0)
#define UBLK_F_URING_CMD_COMP_IN_TASK   (1ULL << 1)
#define UBLK_F_NEED_GET_DATA            (1ULL << 2)
#define UBLK_F_USER_RECOVERY            (1ULL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE    (1ULL << 4)
#define UBLK_F_UNPRIVILEGED_DEV         (1ULL << 5)
#define UBLK_F_CMD_IOCTL_ENCODE         (1ULL << 6)
#define UBLK_F_USER_COPY                (1ULL << 7)
#define UBLK_F_ZONED                    (1ULL << 8)
#define UBLK_F_USER_RECOVERY_FAIL_IO    (1ULL << 9)
#define UBLK_F_UPDATE_SIZE              (1ULL << 10)
#define UBLK_F_AUTO_BUF_REG             (1ULL << 11)
#define UBLK_F_QUIESCE                  (1ULL << 12)
#define UBLK_F_PER_IO_DAEMON            (1ULL << 13)
#define UBLK_F_BUF_REG_OFF_DAEMON       (1ULL << 14)
#define UBLK_F_BATCH_IO                 (1ULL << 15)
#define UBLK_F_INTEGRITY                (1ULL << 16)
#define UBLK_F_SAFE_STOP_DEV            (1ULL << 17)
#define UBLK_F_NO_AUTO_PART_SCAN        (1ULL << 18)
#define UBLK_F_SHMEM_ZC                 (1ULL << 19)
#define UBLK_F_IO_DESC_SIZE             (1ULL << 20)

// MARK: Device states (ublksrv_ctrl_dev_info.state)
enum {
    UBLK_S_DEV_DEAD = 0,
    UBLK_S_DEV_LIVE = 1,
    UBLK_S_DEV_QUIESCED = 2,
    UBLK_S_DEV_FAIL_IO = 3,
};

/// The command area of a control SQE (32 bytes).
struct ublksrv_ctrl_cmd {
    uint32_t dev_id;       // target device, or -1 for ADD_DEV "kernel picks"
    uint16_t queue_id;     // -1 unless the command is for one queue
    uint16_t len;          // length of the buffer at addr
    uint64_t addr;         // command-specific in/out buffer
    uint64_t data[1];      // inline argument (START_DEV: server pid)
    uint16_t dev_path_len; // GET_DEV_INFO2 / unprivileged devices only
    uint16_t pad;
    uint32_t reserved;
};

/// Device description exchanged by ADD_DEV and GET_DEV_INFO (64 bytes).
struct ublksrv_ctrl_dev_info {
    uint16_t nr_hw_queues;
    uint16_t queue_depth;
    uint16_t state;
    uint16_t pad0;
    uint32_t max_io_buf_bytes;
    uint32_t dev_id;
    int32_t  ublksrv_pid;
    uint32_t pad1;
    uint64_t flags;
    uint64_t ublksrv_flags; // the server's own; the driver keeps it untouched
    uint32_t owner_uid;
    uint32_t owner_gid;
    uint64_t reserved1;
    uint64_t reserved2;
};

// MARK: I/O descriptors (mmapped, read-only, one per tag)
enum {
    UBLK_IO_OP_READ = 0,
    UBLK_IO_OP_WRITE = 1,
    UBLK_IO_OP_FLUSH = 2,
    UBLK_IO_OP_DISCARD = 3,
    UBLK_IO_OP_WRITE_SAME = 4,
    UBLK_IO_OP_WRITE_ZEROES = 5,
    UBLK_IO_OP_ZONE_OPEN = 10,
    UBLK_IO_OP_ZONE_CLOSE = 11,
    UBLK_IO_OP_ZONE_FINISH = 12,
    UBLK_IO_OP_ZONE_APPEND = 13,
    UBLK_IO_OP_ZONE_RESET_ALL = 14,
    UBLK_IO_OP_ZONE_RESET = 15,
    UBLK_IO_OP_REPORT_ZONES = 18,
};

#define UBLK_IO_F_FAILFAST_DEV       (1U << 8)
#define UBLK_IO_F_FAILFAST_TRANSPORT (1U << 9)
#define UBLK_IO_F_FAILFAST_DRIVER    (1U << 10)
#define UBLK_IO_F_META               (1U << 11)
#define UBLK_IO_F_FUA                (1U << 13)
#define UBLK_IO_F_NOUNMAP            (1U << 15)
#define UBLK_IO_F_SWAP               (1U << 16)
#define UBLK_IO_F_NEED_REG_BUF       (1U << 17) // AUTO_BUF_REG failed; FALLBACK was asked for
#define UBLK_IO_F_INTEGRITY          (1U << 18)
#define UBLK_IO_F_SHMEM_ZC           (1U << 19)

/// One request, written by the driver before it completes the tag's fetch (24 bytes).
struct ublksrv_io_desc {
    uint32_t op_flags;     // op in bits 0-7, UBLK_IO_F_* in bits 8-31
    uint32_t nr_sectors;   // (nr_zones for REPORT_ZONES)
    uint64_t start_sector;
    uint64_t addr;         // the server's buffer, as given with the fetch
};

/// The command area of an I/O SQE (16 bytes): FETCH_REQ, COMMIT_AND_FETCH_REQ.
struct ublksrv_io_cmd {
    uint16_t q_id;
    uint16_t tag;
    int32_t  result;       // COMMIT: bytes done or -errno
    uint64_t addr;         // the tag's buffer (zone_append_lba for zone append)
};

/// UBLK_F_AUTO_BUF_REG: what FETCH/COMMIT carry in the SQE's `addr` (8 bytes): the
/// buffer-table index for the request's pages, flags, and zeros.
#define UBLK_AUTO_BUF_REG_FALLBACK (1 << 0)

/// UBLK_F_BATCH_IO: the 16-byte command area of PREP_IO_CMDS, COMMIT_IO_CMDS and
/// FETCH_IO_CMDS. PREP and COMMIT point `sqe->addr` at `nr_elem` elements of
/// `elem_bytes` each; FETCH takes `elem_bytes` 2 and fills provided buffers with tags.
struct ublk_batch_io {
    uint16_t q_id;
    uint16_t flags;       // UBLK_BATCH_F_*, the same for every element
    uint16_t nr_elem;
    uint8_t  elem_bytes;  // 8, plus 8 with HAS_BUF_ADDR, plus 8 with HAS_ZONE_LBA
    uint8_t  reserved;
    uint64_t reserved2;
};

#define UBLK_BATCH_F_HAS_ZONE_LBA          (1 << 0)
#define UBLK_BATCH_F_HAS_BUF_ADDR          (1 << 1) // copy mode: the tag's buffer follows
#define UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK (1 << 2)

/// The head of every PREP/COMMIT element (8 bytes); `buf_addr` (u64) follows with
/// UBLK_BATCH_F_HAS_BUF_ADDR.
struct ublk_elem_header {
    uint16_t tag;
    uint16_t buf_index;   // AUTO_BUF_REG: the ring's buffer-table slot for the request's pages
    int32_t  result;      // COMMIT: bytes done or -errno; PREP: 0
};

// MARK: Parameters (SET_PARAMS / GET_PARAMS)
#define UBLK_ATTR_READ_ONLY      (1 << 0)
#define UBLK_ATTR_ROTATIONAL     (1 << 1)
#define UBLK_ATTR_VOLATILE_CACHE (1 << 2)
#define UBLK_ATTR_FUA            (1 << 3)

#define UBLK_PARAM_TYPE_BASIC   (1 << 0)
#define UBLK_PARAM_TYPE_DISCARD (1 << 1)
#define UBLK_PARAM_TYPE_DEVT    (1 << 2)
#define UBLK_PARAM_TYPE_ZONED   (1 << 3)
#define UBLK_PARAM_TYPE_DMA_ALIGN (1 << 4)

struct ublk_param_basic {
    uint32_t attrs;
    uint8_t  logical_bs_shift;
    uint8_t  physical_bs_shift;
    uint8_t  io_opt_shift;
    uint8_t  io_min_shift;
    uint32_t max_sectors;
    uint32_t chunk_sectors;
    uint64_t dev_sectors;
    uint64_t virt_boundary_mask;
};

struct ublk_param_discard {
    uint32_t discard_alignment;
    uint32_t discard_granularity;
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint16_t max_discard_segments;
    uint16_t reserved0;
};

/// Filled in by the kernel (GET_PARAMS only).
struct ublk_param_devt {
    uint32_t char_major;
    uint32_t char_minor;
    uint32_t disk_major;
    uint32_t disk_minor;
};

struct ublk_param_zoned {
    uint32_t max_open_zones;
    uint32_t max_active_zones;
    uint32_t max_zone_append_sectors;
    uint8_t  reserved[20];
};

/// The memory alignment the block layer guarantees a request's buffers (a mask:
/// `dma_alignment`); without it ublk_drv sets 3.
struct ublk_param_dma_align {
    uint32_t alignment;
    uint8_t  pad[4];
};

/// `len` is the size the server knows; the kernel copies min(len, its own size).
struct ublk_params {
    uint32_t len;
    uint32_t types; // UBLK_PARAM_TYPE_*
    struct ublk_param_basic basic;
    struct ublk_param_discard discard;
    struct ublk_param_devt devt;
    struct ublk_param_zoned zoned;
    struct ublk_param_dma_align dma;
};

#endif
