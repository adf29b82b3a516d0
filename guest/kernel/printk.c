/*
 * printk.c - a small vsnprintf and the printk front ends.
 *
 * Supported: %d %i %u %x %X %p %s %c %%, flags '-' and '0', a field width
 * (digits or '*'), a precision for %s, and the length modifiers l, ll, z.
 * No floating point (the kernel is built -mgeneral-regs-only).
 */
#include "kernel.h"
#include "console.h"
#include "hypercall.h"

struct outbuf {
    char *buf;
    size_t size;
    size_t pos;     /* characters produced so far (may exceed size) */
};

static void out_c(struct outbuf *o, char c)
{
    if (o->pos + 1 < o->size)
        o->buf[o->pos] = c;
    o->pos++;
}

static void out_pad(struct outbuf *o, char c, int n)
{
    while (n-- > 0)
        out_c(o, c);
}

static void out_str(struct outbuf *o, const char *s, int width, int prec, int left)
{
    int len;
    if (!s)
        s = "(null)";
    len = (int)strnlen(s, prec >= 0 ? (size_t)prec : (size_t)-1);
    if (!left)
        out_pad(o, ' ', width - len);
    for (int i = 0; i < len; i++)
        out_c(o, s[i]);
    if (left)
        out_pad(o, ' ', width - len);
}

static void out_num(struct outbuf *o, unsigned long long v, int neg, int base,
                    int upper, int width, int zero, int left, const char *prefix)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0, plen = prefix ? (int)strlen(prefix) : 0;
    int total;

    do {
        tmp[n++] = digits[v % (unsigned)base];
        v /= (unsigned)base;
    } while (v);

    total = n + neg + plen;
    if (!left && !zero)
        out_pad(o, ' ', width - total);
    if (neg)
        out_c(o, '-');
    for (int i = 0; i < plen; i++)
        out_c(o, prefix[i]);
    if (!left && zero)
        out_pad(o, '0', width - total);
    while (n)
        out_c(o, tmp[--n]);
    if (left)
        out_pad(o, ' ', width - total);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct outbuf o = { buf, size, 0 };

    for (; *fmt; fmt++) {
        int left = 0, zero = 0, width = 0, prec = -1, lng = 0;

        if (*fmt != '%') {
            out_c(&o, *fmt);
            continue;
        }
        fmt++;
        for (;; fmt++) {
            if (*fmt == '-') left = 1;
            else if (*fmt == '0') zero = 1;
            else break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) { left = 1; width = -width; }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }

        switch (*fmt) {
        case 'd':
        case 'i': {
            long long v = lng ? va_arg(ap, long) : va_arg(ap, int);
            unsigned long long mag = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
            out_num(&o, mag, v < 0, 10, 0, width, zero, left, NULL);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            unsigned long long v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
            out_num(&o, v, 0, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, zero, left, NULL);
            break;
        }
        case 'p':
            out_num(&o, (unsigned long)va_arg(ap, void *), 0, 16, 0, 18, 1, 0, "0x");
            break;
        case 's':
            out_str(&o, va_arg(ap, const char *), width, prec, left);
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            if (!left) out_pad(&o, ' ', width - 1);
            out_c(&o, c);
            if (left) out_pad(&o, ' ', width - 1);
            break;
        }
        case '%':
            out_c(&o, '%');
            break;
        case '\0':
            fmt--;          /* lone '%' at the end: stop cleanly */
            break;
        default:            /* unknown: print it verbatim */
            out_c(&o, '%');
            out_c(&o, *fmt);
            break;
        }
    }
    if (size)
        buf[o.pos < size ? o.pos : size - 1] = '\0';
    return (int)o.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int r;
    va_start(ap, fmt);
    r = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return r;
}

#define PRINTK_BUF 512

void vprintk(const char *fmt, va_list ap)
{
    char buf[PRINTK_BUF];
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;
    /* console_write falls back to console_io until the ring is up. */
    console_write(buf, (size_t)n);
}

void printk(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintk(fmt, ap);
    va_end(ap);
}

void early_printk(const char *fmt, ...)
{
    char buf[PRINTK_BUF];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;
    console_io_write(buf, (size_t)n);
}

void panic(const char *fmt, ...)
{
    char buf[PRINTK_BUF];
    va_list ap;
    int n;

    n = snprintf(buf, sizeof(buf), "PANIC: ");
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;
    /* Like fatal traps: drain the ring, then the synchronous console_io. */
    console_flush(200 * NSEC_PER_MSEC);
    console_io_write(buf, (size_t)n);
    xen_shutdown(SHUTDOWN_crash);
}
