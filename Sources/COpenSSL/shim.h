// Imports the parts of OpenSSL's libcrypto the project uses (the EVP cipher API, the
// cipher functions of a provider, the error queue, PBKDF2 and the random generator) into Swift.
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
#include <openssl/rand.h>
#include <openssl/core_dispatch.h>
#include <openssl/provider.h>
#include <strings.h>

// The functions of one cipher's implementation, taken from its provider's dispatch
// table: the calls EVP_CipherInit_ex and EVP_CipherUpdate end in.
//
// Why not EVP_CipherInit_ex for every unit: in OpenSSL 3.0 each call that sets an IV asks
// the provider for the IV length through a parameter query (EVP_CIPHER_CTX_get_iv_length),
// about 700 instructions on top of the provider's own init, where AES-XTS of a 512-byte
// sector is about 1300; dm-crypt plain mode sets a new IV every sector. The provider
// functions are OpenSSL's public provider interface (provider-cipher(7)), the same code.
typedef struct {
    OSSL_FUNC_cipher_newctx_fn *newctx;
    OSSL_FUNC_cipher_freectx_fn *freectx;
    OSSL_FUNC_cipher_encrypt_init_fn *encrypt_init;
    OSSL_FUNC_cipher_decrypt_init_fn *decrypt_init;
    OSSL_FUNC_cipher_update_fn *update;
    void *provider_context;
} copenssl_cipher_functions;

// Whether `names` (an algorithm's names, colon-separated) has `name`, in any case.
static inline int copenssl_names_contain(const char *names, const char *name) {
    size_t length = strlen(name);
    for (const char *at = names; at != NULL && *at != 0; ) {
        const char *end = strchr(at, ':');
        size_t here = end != NULL ? (size_t)(end - at) : strlen(at);
        if (here == length && strncasecmp(at, name, length) == 0) return 1;
        at = end != NULL ? end + 1 : NULL;
    }
    return 0;
}

// Fills `out` with the functions of the fetched `cipher` (from EVP_CIPHER_fetch, which
// keeps its provider loaded while it lives). 0 if its provider has no such cipher or
// lacks one of the functions.
static inline int copenssl_cipher_functions_of(const EVP_CIPHER *cipher, copenssl_cipher_functions *out) {
    const OSSL_PROVIDER *provider = EVP_CIPHER_get0_provider(cipher);
    const char *name = EVP_CIPHER_get0_name(cipher);
    if (provider == NULL || name == NULL) return 0;
    int no_cache = 0;
    const OSSL_ALGORITHM *algorithms = OSSL_PROVIDER_query_operation(provider, OSSL_OP_CIPHER, &no_cache);
    const OSSL_ALGORITHM *found = NULL;
    for (const OSSL_ALGORITHM *a = algorithms; a != NULL && a->algorithm_names != NULL; a++) {
        if (copenssl_names_contain(a->algorithm_names, name)) { found = a; break; }
    }
    copenssl_cipher_functions f = { 0 };
    for (const OSSL_DISPATCH *d = found != NULL ? found->implementation : NULL; d != NULL && d->function_id != 0; d++) {
        switch (d->function_id) {
        case OSSL_FUNC_CIPHER_NEWCTX: f.newctx = (OSSL_FUNC_cipher_newctx_fn *)d->function; break;
        case OSSL_FUNC_CIPHER_FREECTX: f.freectx = (OSSL_FUNC_cipher_freectx_fn *)d->function; break;
        case OSSL_FUNC_CIPHER_ENCRYPT_INIT: f.encrypt_init = (OSSL_FUNC_cipher_encrypt_init_fn *)d->function; break;
        case OSSL_FUNC_CIPHER_DECRYPT_INIT: f.decrypt_init = (OSSL_FUNC_cipher_decrypt_init_fn *)d->function; break;
        case OSSL_FUNC_CIPHER_UPDATE: f.update = (OSSL_FUNC_cipher_update_fn *)d->function; break;
        }
    }
    if (algorithms != NULL) OSSL_PROVIDER_unquery_operation(provider, OSSL_OP_CIPHER, algorithms);
    f.provider_context = OSSL_PROVIDER_get0_provider_ctx(provider);
    *out = f;
    return f.newctx && f.freectx && f.encrypt_init && f.decrypt_init && f.update;
}

// A new context of the cipher, keyed for one direction; NULL if that fails.
static inline void *copenssl_cipher_context(const copenssl_cipher_functions *f, const unsigned char *key,
                                           size_t key_length, int encrypting) {
    void *context = f->newctx(f->provider_context);
    if (context == NULL) return NULL;
    int keyed = encrypting ? f->encrypt_init(context, key, key_length, NULL, 0, NULL)
                           : f->decrypt_init(context, key, key_length, NULL, 0, NULL);
    if (keyed != 1) { f->freectx(context); return NULL; }
    return context;
}

// One message: sets the IV (the key stays), then runs the cipher over `length` bytes.
// 1 on success, as the provider functions return.
static inline int copenssl_cipher_message(const copenssl_cipher_functions *f, void *context, int encrypting,
                                          const unsigned char *iv, size_t iv_length, unsigned char *out,
                                          const unsigned char *in, size_t length) {
    int initialized = encrypting ? f->encrypt_init(context, NULL, 0, iv, iv_length, NULL)
                                 : f->decrypt_init(context, NULL, 0, iv, iv_length, NULL);
    if (initialized != 1) return 0;
    size_t written = 0;
    return f->update(context, out, &written, length, in, length) == 1 && written == length;
}

#endif
