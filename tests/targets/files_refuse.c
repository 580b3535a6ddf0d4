/*
 * files_refuse.c - exercises fd state a dump must refuse, naming the fd: one mode per run, given as
 * argv[2]:
 *
 *   owner      /dev/null whose signals (F_SETOWN) go to another process (our parent)
 *   pgrp       /dev/null whose signals go to another process group (our parent's)
 *   lease      a read lease (F_SETLEASE) on a file of ours
 *   procother  an open /proc file of another process (our parent's status)
 *
 * On SIGUSR2 it checks that the resource is still as it was: the refused dump changed nothing.
 *
 * Usage: files_refuse LOGFILE MODE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#define FD_RES 10

static const char POINTS[] = "resource";
static pid_t parent;

static void setup(const char *mode)
{
	char path[PATH_MAX];
	int fd = -1;

	parent = getppid();
	if (!strcmp(mode, "owner") || !strcmp(mode, "pgrp")) {
		fd = open("/dev/null", O_WRONLY);
		if (fd < 0 || fcntl(fd, F_SETOWN, !strcmp(mode, "owner") ? parent : -getpgid(parent)))
			laz_die("F_SETOWN");
	} else if (!strcmp(mode, "lease")) {
		fd = open(laz_tmpfile("leased", path, sizeof(path)), O_RDONLY | O_CREAT, 0600);
		if (fd < 0 || fcntl(fd, F_SETLEASE, F_RDLCK))
			laz_die("F_SETLEASE");
	} else if (!strcmp(mode, "procother")) {
		snprintf(path, sizeof(path), "/proc/%d/status", (int)parent);
		fd = open(path, O_RDONLY);
	} else {
		laz_die("unknown mode %s", mode);
	}
	if (fd < 0 || dup2(fd, FD_RES) != FD_RES)
		laz_die("fd");
	close(fd);
}

static void check(const char *mode)
{
	char buf[64];

	if (laz_corrupt("resource"))
		close(FD_RES);
	if (!strcmp(mode, "owner"))
		LAZ_CHECK(fcntl(FD_RES, F_GETOWN) == parent, "owner is %d, expected %d", fcntl(FD_RES, F_GETOWN),
			  (int)parent);
	else if (!strcmp(mode, "pgrp"))
		LAZ_CHECK(fcntl(FD_RES, F_GETOWN) == -getpgid(parent), "owner is %d, expected %d",
			  fcntl(FD_RES, F_GETOWN), (int)-getpgid(parent));
	else if (!strcmp(mode, "lease"))
		LAZ_CHECK(fcntl(FD_RES, F_GETLEASE) == F_RDLCK, "lease is %d", fcntl(FD_RES, F_GETLEASE));
	else
		LAZ_CHECK(pread(FD_RES, buf, sizeof(buf), 0) > 0 && !memcmp(buf, "Name:", 5),
			  "the /proc file no longer reads");
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	if (argc < 3)
		laz_die("usage: files_refuse LOGFILE MODE");
	setup(argv[2]);
	laz_ready(POINTS);

	laz_wait_usr2();

	check(argv[2]);
	laz_finish();
}
