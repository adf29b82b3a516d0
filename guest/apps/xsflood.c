/*
 * xsflood: a hostile guest for xenstored (issue 8, finding 3).  It hits each
 * of xenstored's per-domain quotas once and says what it got, then sets as
 * many watches on data/flood as it may and commits transactions that touch
 * hundreds of nodes under it as fast as it can: every commit fires
 * nodes x watches events, which the store must neither let stall everyone
 * else nor queue without bound.
 *
 *   [watches=200] [nodes=400] [rounds=0 (until destroyed)]
 *
 * Output:
 *   xsflood: quota watches=<ERR>@<n> transactions=<ERR>@<n>
 *            transaction-nodes=<ERR>@<n> commit=<ERR> nodes=<ERR>@<n>
 *     (the error of the first request refused, and how many were granted
 *      before it; "OK@<n>" if none was refused)
 *   xsflood: flooding watches=<w> nodes=<n>
 *   xsflood: commits=<c> eagain=<e> errors=<x>        (every 10 commits)
 *   xsflood: done commits=<c>                          (after rounds, then power off)
 * Failures print "xsflood: FAIL <what>: <ERRNO>" and crash.
 */
#include "app.h"
#include "xenbus.h"

const char app_name[] = "xsflood";

#define MAX_WATCHES   512
#define MAX_TX        64
#define PROBE_READS   1200       /* over the transaction-nodes quota (1024) */
#define PROBE_NODES   1200       /* over the nodes quota (1000) */

static void __noreturn fail(const char *what, int rc)
{
    printk("xsflood: FAIL %s: %s (%d)\n", what, xenbus_strerror(rc), rc);
    xen_shutdown(SHUTDOWN_crash);
}

/* XS_WATCH with our own token: the xenbus client's table is for its callbacks,
 * and events for tokens it does not know are dropped there (we never read them). */
static int raw_watch(const char *path, const char *token)
{
    char payload[128], reply[16];
    size_t plen = strlen(path) + 1, tlen = strlen(token) + 1, rlen;

    memcpy(payload, path, plen);
    memcpy(payload + plen, token, tlen);
    return xenbus_request(XS_WATCH, XBT_NIL, payload, plen + tlen, reply, sizeof(reply), &rlen);
}

static const char *name(int rc)
{
    return rc ? xenbus_strerror(rc) : "OK";
}

int app_main(const char *cmdline)
{
    unsigned long nwatch = cmdline_get_ulong(cmdline, "watches", 200);
    unsigned long nodes = cmdline_get_ulong(cmdline, "nodes", 400);
    unsigned long rounds = cmdline_get_ulong(cmdline, "rounds", 0);
    xenbus_transaction_t txs[MAX_TX], t;
    unsigned long w_ok = 0, tx_ok = 0, rd_ok = 0, nd_ok = 0;
    unsigned long commits = 0, eagain = 0, errors = 0;
    int w_rc = 0, tx_rc = 0, rd_rc = 0, end_rc, nd_rc = 0, rc;
    char path[64], val[24], tok[16];

    if (!xenbus_available()) {
        printk("xsflood: FAIL no xenstore\n");
        xen_shutdown(SHUTDOWN_crash);
    }
    if (nwatch > MAX_WATCHES)
        nwatch = MAX_WATCHES;
    rc = xenbus_write(XBT_NIL, "data/flood/0", "");
    if (rc)
        fail("write data/flood/0", rc);

    /* watches: 128 per domain, ENOSPC when reached (one is the kernel's own) */
    for (unsigned long i = 0; i < nwatch; i++) {
        snprintf(tok, sizeof(tok), "f%lu", i);
        rc = raw_watch("data/flood", tok);
        if (rc) {
            w_rc = rc;
            break;
        }
        w_ok++;
    }
    /* transactions: 10 open per domain */
    for (unsigned long i = 0; i < MAX_TX; i++) {
        rc = xenbus_transaction_start(&txs[i]);
        if (rc) {
            tx_rc = rc;
            break;
        }
        tx_ok++;
    }
    for (unsigned long i = 0; i < tx_ok; i++)
        xenbus_transaction_end(txs[i], 1);
    /* transaction-nodes: 1024 nodes accessed in one transaction; it then fails */
    rc = xenbus_transaction_start(&t);
    if (rc)
        fail("transaction_start", rc);
    for (unsigned long i = 0; i < PROBE_READS; i++) {
        snprintf(path, sizeof(path), "data/probe/m%lu", i);
        rc = xenbus_read(t, path, val, sizeof(val));
        if (rc != -XEN_ENOENT) {
            rd_rc = rc < 0 ? rc : 0;
            break;
        }
        rd_ok++;
    }
    end_rc = xenbus_transaction_end(t, 0);
    /* nodes: 1000 owned per domain (spread out: a directory's list of children
     * counts against the node-size quota, 2048 bytes) */
    for (unsigned long i = 0; i < PROBE_NODES; i++) {
        snprintf(path, sizeof(path), "data/probe/d%lu/n%lu", i / 200, i);
        rc = xenbus_write(XBT_NIL, path, "x");
        if (rc) {
            nd_rc = rc;
            break;
        }
        nd_ok++;
    }
    rc = xenbus_rm(XBT_NIL, "data/probe");
    if (rc)
        fail("rm data/probe", rc);
    printk("xsflood: quota watches=%s@%lu transactions=%s@%lu transaction-nodes=%s@%lu "
           "commit=%s nodes=%s@%lu\n", name(w_rc), w_ok, name(tx_rc), tx_ok, name(rd_rc), rd_ok,
           name(end_rc), name(nd_rc), nd_ok);

    /* the flood: round r replaces data/flood/<r-1> by data/flood/<r>/n0..n<nodes-1>,
     * in one transaction, so that no event of a round merges with an earlier one */
    printk("xsflood: flooding watches=%lu nodes=%lu\n", w_ok, nodes);
    for (unsigned long r = 1; !rounds || commits < rounds; r++) {
        rc = xenbus_transaction_start(&t);
        if (rc)
            fail("transaction_start", rc);
        snprintf(path, sizeof(path), "data/flood/%lu", r - 1);
        rc = xenbus_rm(t, path);
        for (unsigned long i = 0; !rc && i < nodes; i++) {
            snprintf(path, sizeof(path), "data/flood/%lu/n%lu", r, i);
            snprintf(val, sizeof(val), "%lu", r);
            rc = xenbus_write(t, path, val);
        }
        if (rc) {
            errors++;
            xenbus_transaction_end(t, 1);
            printk("xsflood: round %lu: %s\n", r, name(rc));
            r--;
            continue;
        }
        rc = xenbus_transaction_end(t, 0);
        if (rc == -XEN_EAGAIN) {
            eagain++;
            r--;
            continue;
        }
        if (rc) {
            errors++;
            printk("xsflood: commit %lu: %s\n", r, name(rc));
            r--;
            continue;
        }
        commits++;
        if (commits % 10 == 0)
            printk("xsflood: commits=%lu eagain=%lu errors=%lu\n", commits, eagain, errors);
    }
    printk("xsflood: done commits=%lu\n", commits);
    poweroff();
}
