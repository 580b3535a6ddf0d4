/*
 * share_take.c - exercises the restore primitives for shared objects (lazarus/restore/sharing.py): while it
 * waits, a test puts fds and mappings into it by injection; on SIGUSR2 it checks them itself.
 *
 *   share_take LOGFILE
 *
 * Logs READY, waits for SIGUSR2, then reads LOGFILE.expect, one check per line:
 *   file FD POS FLAGS       fd FD is open at offset POS with status flags FLAGS (O_ACCMODE|O_APPEND|O_NONBLOCK);
 *                           then writes one byte through it (the test sees the shared offset move)
 *   cloexec FD 0|1          FD_CLOEXEC of fd FD
 *   pread FD NBYTES SEED    exactly NBYTES of laz_fill_offset(0, SEED) can be read from fd FD (a pipe's queued data)
 *   pwrite FD TOKEN         writes TOKEN into fd FD (the test reads it from its end of the same pipe)
 *   shm ADDR NPAGES SEED SLOT  the NPAGES-1 first pages at ADDR hold laz_fill_offset(0, SEED); our pid is then stored
 *                           in 8-byte slot SLOT of the last page (the test reads it through its own fd)
 *   maps ADDR NAME          /proc/self/maps has a mapping starting at ADDR whose line contains NAME
 * Then PASS or FAIL. Without the injected state every check fails.
 */
#include "common.h"

/* Whether a mapping starts at A and its maps line contains NAME. */
static int mapped(unsigned long a, const char *name)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char l[512];
	int found = 0;

	while (f && fgets(l, sizeof(l), f))
		if (strtoul(l, NULL, 16) == a && strstr(l, name))
			found = 1;
	if (f)
		fclose(f);
	return found;
}

static void check_line(char *line)
{
	char kind[16], name[256];
	unsigned long a, b, c, d;

	if (sscanf(line, "file %lu %lu %lu", &a, &b, &c) == 3) {
		off_t pos = lseek((int)a, 0, SEEK_CUR);
		int fl = fcntl((int)a, F_GETFL);
		LAZ_CHECK(pos == (off_t)b, "fd %lu at offset %ld, expected %lu", a, (long)pos, b);
		LAZ_CHECK(fl >= 0 && (unsigned long)(fl & (O_ACCMODE | O_APPEND | O_NONBLOCK)) == c,
			  "fd %lu flags %#x, expected %#lx", a, fl, c);
		LAZ_CHECK(write((int)a, "Z", 1) == 1, "write to fd %lu", a);
	} else if (sscanf(line, "cloexec %lu %lu", &a, &b) == 2) {
		int fl = fcntl((int)a, F_GETFD);
		LAZ_CHECK(fl >= 0 && (unsigned long)(fl & FD_CLOEXEC) == b, "fd %lu FD_CLOEXEC %d, expected %lu", a, fl, b);
	} else if (sscanf(line, "pread %lu %lu %lu", &a, &b, &c) == 3) {
		char *buf = malloc(b + 1), *want = malloc(b);
		size_t got = 0;
		int fl = fcntl((int)a, F_GETFL);
		if (fl >= 0)
			fcntl((int)a, F_SETFL, fl | O_NONBLOCK);
		while (got < b + 1) {
			ssize_t n = read((int)a, buf + got, b + 1 - got);
			if (n <= 0)
				break;
			got += (size_t)n;
		}
		laz_fill_offset(want, b, 0, c);
		LAZ_CHECK(got == b, "fd %lu: %zu bytes queued, expected %lu", a, got, b);
		LAZ_CHECK(got < b || !memcmp(buf, want, b), "fd %lu: queued bytes differ", a);
		free(buf);
		free(want);
	} else if (sscanf(line, "pwrite %lu %255s", &a, name) == 2) {
		size_t n = strlen(name);
		LAZ_CHECK(write((int)a, name, n) == (ssize_t)n, "write token to fd %lu", a);
	} else if (sscanf(line, "shm %lx %lu %lu %lu", &a, &b, &c, &d) == 4) {
		unsigned char *p = (unsigned char *)a;
		if (!mapped(a, "")) {
			laz_failf("nothing mapped at %#lx", a);
			return;
		}
		long bad = laz_find_mismatch_offset(p, (b - 1) * LAZ_PAGE, 0, c);
		LAZ_CHECK(bad < 0, "shared memory at %#lx differs at offset %ld", a, bad);
		((volatile uint64_t *)(p + (b - 1) * LAZ_PAGE))[d] = (uint64_t)getpid();
	} else if (sscanf(line, "maps %lx %255s", &a, name) == 2) {
		LAZ_CHECK(mapped(a, name), "no mapping of %s at %#lx", name, a);
	} else if (sscanf(line, "%15s", kind) == 1) {
		laz_failf("unknown check %s", kind);
	}
}

int main(int argc, char **argv)
{
	char path[PATH_MAX + 16], line[512];

	laz_init(argc, argv);
	laz_ready("expect");
	laz_wait_usr2();
	snprintf(path, sizeof(path), "%s.expect", laz_log_path);
	FILE *f = fopen(path, "r");
	LAZ_CHECK(f != NULL, "no %s", path);
	int n = 0;
	while (f && fgets(line, sizeof(line), f)) {
		if (laz_corrupt("expect"))
			continue; /* a check skipped counts as failed below */
		check_line(line);
		n++;
	}
	if (f)
		fclose(f);
	LAZ_CHECK(n > 0, "no checks made");
	if (laz_corrupt_applied)
		laz_failf("a check was skipped");
	laz_finish();
}
