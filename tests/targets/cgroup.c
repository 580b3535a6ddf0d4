/*
 * cgroup.c - exercises cgroup membership: the target moves itself into each cgroup directory named on its
 * command line (writing its pid to cgroup.procs), records /proc/self/cgroup, and after restore requires the
 * same membership line for line (a restore that leaves it in the restorer's cgroups fails).
 *
 * Usage: cgroup LOGFILE CGROUP_DIR...
 * Trigger: SIGUSR2.
 */
#include "common.h"

static char before[8192];
static ssize_t before_len;

int main(int argc, char **argv)
{
	char now[8192], path[PATH_MAX], pid[32];
	ssize_t n;

	laz_init(argc, argv);
	snprintf(pid, sizeof(pid), "%d\n", getpid());
	for (int i = 2; i < argc; i++) {
		int fd;

		snprintf(path, sizeof(path), "%s/cgroup.procs", argv[i]);
		fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, pid, strlen(pid)) != (ssize_t)strlen(pid))
			laz_die("join %s", path);
		close(fd);
	}
	before_len = laz_slurp("/proc/self/cgroup", before, sizeof(before) - 1);
	if (before_len <= 0)
		laz_die("read /proc/self/cgroup");
	before[before_len] = '\0';
	for (int i = 2; i < argc; i++)
		if (!strstr(before, strrchr(argv[i], '/')))
			laz_die("not a member of %s after joining it", argv[i]);
	laz_ready("cgroups");

	laz_wait_usr2();

	if (argc > 2 && laz_corrupt("cgroups")) {
		/* leave the first cgroup for its parent, as a restore into the restorer's cgroup would */
		char *slash;
		int fd;

		snprintf(path, sizeof(path), "%s", argv[2]);
		slash = strrchr(path, '/');
		if (slash) {
			snprintf(slash, sizeof(path) - (size_t)(slash - path), "/cgroup.procs");
			fd = open(path, O_WRONLY | O_CLOEXEC);
			if (fd >= 0 && write(fd, pid, strlen(pid)) < 0)
				laz_log("# corrupting failed");
			if (fd >= 0)
				close(fd);
		}
	}
	n = laz_slurp("/proc/self/cgroup", now, sizeof(now) - 1);
	now[n > 0 ? n : 0] = '\0';
	LAZ_CHECK(n == before_len && memcmp(now, before, (size_t)before_len) == 0,
		  "cgroups differ: now '%s', before '%s'", now, before);
	laz_finish();
}
