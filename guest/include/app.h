/*
 * app.h - everything an app may use.  An app is one file in apps/ that
 * defines `const char app_name[]` and `int app_main(const char *cmdline)`;
 * app_main runs in the "main" thread once the kernel is fully up.
 */
#ifndef PYXEN_APP_H
#define PYXEN_APP_H

#include "kernel.h"
#include "console.h"
#include "events.h"
#include "hypercall.h"
#include "mm.h"
#include "sched.h"
#include "traps.h"
#include "xtime.h"

#endif /* PYXEN_APP_H */
