/*
 * cowtree.c - benchmark target: the copy-on-write tree of issue 9's Pss requirement, run as
 * `cowtree LOGFILE MIB still` by benchmarks/cow_tree.py (a parent with MIB MiB of private memory, a child that
 * rewrote one page in eight, a grandchild that wrote nothing; each checks its own memory after SIGUSR2).
 * One source with the test target: see tests/targets/cow_tree.c.
 */
#include "../../tests/targets/cow_tree.c"
