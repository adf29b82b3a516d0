/*
 * lib.c - the handful of libc-style helpers the kernel needs.
 *
 * gcc may emit calls to memcpy/memset/memmove/memcmp on its own (struct
 * copies, zero-initialisation) even with -ffreestanding, so these must
 * exist with the standard names and semantics.
 */
#include "kernel.h"

void *memset(void *s, int c, size_t n)
{
    unsigned char *p = s;
    while (n--)
        *p++ = (unsigned char)c;
    return s;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    /* Word copies when both are aligned: cheap and still SSE-free. */
    if ((((uintptr_t)d | (uintptr_t)s) & 7) == 0) {
        while (n >= 8) {
            *(uint64_t *)(void *)d = *(const uint64_t *)(const void *)s;
            d += 8; s += 8; n -= 8;
        }
    }
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d == s || n == 0)
        return dst;
    if (d < s) {
        while (n--)
            *d++ = *s++;
    } else {
        d += n; s += n;
        while (n--)
            *--d = *--s;
    }
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++; b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            break;
    }
    return 0;
}

char *strncpy_z(char *dst, const char *src, size_t size)
{
    size_t i = 0;
    if (!size)
        return dst;
    for (; i + 1 < size && src[i]; i++)
        dst[i] = src[i];
    dst[i] = '\0';
    return dst;
}

static int digit_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'z') return c - 'a' + 10;
    if (c >= 'A' && c <= 'Z') return c - 'A' + 10;
    return 99;
}

/* base 0 = auto (0x.. hex, otherwise decimal). */
unsigned long simple_strtoul(const char *s, const char **end, int base)
{
    unsigned long v = 0;
    if (base == 0) {
        if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
            base = 16;
            s += 2;
        } else {
            base = 10;
        }
    } else if (base == 16 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
    }
    for (;;) {
        int d = digit_value(*s);
        if (d >= base)
            break;
        v = v * base + d;
        s++;
    }
    if (end)
        *end = s;
    return v;
}

/* ---- command line: whitespace-separated "key=value" or "flag" tokens ---- */

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/*
 * Find token `key` (as "key=value" or bare "key"); returns a pointer to
 * the value (empty for a bare flag) and its length, or NULL.
 */
const char *cmdline_find(const char *cmdline, const char *key, size_t *len)
{
    size_t klen = strlen(key);
    const char *p = cmdline;

    if (!p)
        return NULL;
    while (*p) {
        const char *tok, *tend;
        while (is_space(*p))
            p++;
        if (!*p)
            break;
        tok = p;
        while (*p && !is_space(*p))
            p++;
        tend = p;
        if ((size_t)(tend - tok) >= klen && strncmp(tok, key, klen) == 0) {
            if (tok + klen == tend) {
                if (len) *len = 0;
                return tend;
            }
            if (tok[klen] == '=') {
                if (len) *len = (size_t)(tend - (tok + klen + 1));
                return tok + klen + 1;
            }
        }
    }
    return NULL;
}

int cmdline_get_str(const char *cmdline, const char *key, char *buf, size_t size)
{
    size_t len;
    const char *v = cmdline_find(cmdline, key, &len);
    if (!v || !size)
        return 0;
    if (len >= size)
        len = size - 1;
    memcpy(buf, v, len);
    buf[len] = '\0';
    return 1;
}

unsigned long cmdline_get_ulong(const char *cmdline, const char *key, unsigned long dflt)
{
    size_t len;
    const char *v = cmdline_find(cmdline, key, &len);
    const char *end;
    unsigned long r;
    if (!v || len == 0)
        return dflt;
    r = simple_strtoul(v, &end, 0);
    if (end == v)
        return dflt;
    /* Accept k/m/g suffixes for convenience (iters=200m). */
    switch (*end) {
    case 'k': case 'K': r *= 1000UL; break;
    case 'm': case 'M': r *= 1000000UL; break;
    case 'g': case 'G': r *= 1000000000UL; break;
    default: break;
    }
    return r;
}
