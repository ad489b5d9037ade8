// Imports the parts of OpenSSL's libcrypto the project uses (the EVP cipher API and
// the error queue) into Swift.
//
// Why libc first: as for liburing (see CLiburing/shim.h), including the libc headers
// before the library's own keeps one definition of each libc type in Swift.
#ifndef COPENSSL_SHIM_H
#define COPENSSL_SHIM_H

#include <sys/types.h>
#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>
#include <openssl/err.h>

#endif
