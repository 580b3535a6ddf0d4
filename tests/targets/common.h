/*
 * common.h - helpers shared by the Lazarus test targets (header only, no link step); the benchmark
 * targets use them too (benchmarks/targets/bench.h).
 *
 * Protocol (docs/CONTRACTS.md, "Test targets"):
 *   target LOGFILE [args...]      stdin/stdout/stderr are /dev/null
 *   - the target opens LOGFILE itself (O_WRONLY|O_APPEND|O_CREAT), sets up its state,
 *     writes "# corrupt-points: a b c" and then "READY";
 *   - it waits (usually for SIGUSR2, see laz_wait_usr2()), verifies everything, and writes
 *     exactly one result line, "PASS" or "FAIL: what; what...", then exits 0 or 1.
 *   Lines starting with "# " are informational.
 *
 * Self-test switch: with LAZ_SELFTEST_CORRUPT=NAME in the environment the target damages
 * the state checked under NAME (see laz_corrupt()) after the wait and before verifying, and
 * must then report FAIL. LAZ_SELFTEST_CORRUPT=1 damages the first point reached. Each
 * target declares its point names in laz_ready(); the harness runs every one of them.
 */
#ifndef LAZ_COMMON_H
#define LAZ_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define LAZ_PAGE 4096UL
#define LAZ_FN static __attribute__((unused))

static int laz_log_fd = -1;
static char laz_log_path[PATH_MAX];

/* A child of a tree target: stdio on /dev/null and its own description of the log (none shared with its parent,
 * for trees that must not share descriptions). LAZ_SELFTEST_CORRUPT=1 ("the first point reached") is left to the
 * process that forked it: one damage in the whole tree. */
static void __attribute__((unused)) laz_child_own_stdio(void)
{
	int fd = open("/dev/null", O_RDWR);
	const char *corrupt = getenv("LAZ_SELFTEST_CORRUPT");

	if (corrupt && !strcmp(corrupt, "1"))
		unsetenv("LAZ_SELFTEST_CORRUPT");

	if (fd < 0)
		_exit(5);
	for (int i = 0; i < 3; i++)
		if (dup2(fd, i) != i)
			_exit(5);
	if (fd > 2)
		close(fd);
	close(laz_log_fd);
	laz_log_fd = open(laz_log_path, O_WRONLY | O_APPEND);
	if (laz_log_fd < 0)
		_exit(5);
}
static volatile sig_atomic_t laz_usr2_seen;
static char laz_fail_buf[2048];
static size_t laz_fail_len;
static int laz_nfail;
static const char *laz_points = "";
static int laz_corrupt_applied;

LAZ_FN void laz_write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			_exit(3);
		}
		buf += n;
		len -= (size_t)n;
	}
}

/* Append one line to the log with a single write (the log is O_APPEND). */
__attribute__((format(printf, 1, 2)))
LAZ_FN void laz_log(const char *fmt, ...)
{
	char line[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	laz_write_all(laz_log_fd, line, (size_t)n);
}

/* Record a failed check; the result line lists every failure (truncated if long). */
__attribute__((format(printf, 1, 2)))
LAZ_FN void laz_failf(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	laz_nfail++;
	if (laz_fail_len < sizeof(laz_fail_buf) - 1) {
		n = snprintf(laz_fail_buf + laz_fail_len, sizeof(laz_fail_buf) - laz_fail_len, "%s%s",
			     laz_fail_len ? "; " : "", msg);
		if (n > 0)
			laz_fail_len += (size_t)n;
		if (laz_fail_len > sizeof(laz_fail_buf) - 1)
			laz_fail_len = sizeof(laz_fail_buf) - 1;
	}
}

#define LAZ_CHECK(cond, ...)                  \
	do {                                  \
		if (!(cond))                  \
			laz_failf(__VA_ARGS__); \
	} while (0)

/* A setup step failed: the target cannot run at all. */
__attribute__((format(printf, 1, 2), noreturn))
LAZ_FN void laz_die(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int err = errno;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (laz_log_fd >= 0)
		laz_log("FAIL: setup: %s (errno %d: %s)", msg, err, strerror(err));
	_exit(1);
}

/* Write the result line and exit: 0 on PASS, 1 on FAIL. */
__attribute__((noreturn))
LAZ_FN void laz_finish(void)
{
	if (laz_nfail) {
		laz_fail_buf[laz_fail_len] = '\0';
		laz_log("FAIL: %s", laz_fail_buf);
		exit(1);
	}
	laz_log("PASS");
	exit(0);
}

LAZ_FN void laz_usr2_handler(int sig)
{
	(void)sig;
	laz_usr2_seen = 1;
}

/*
 * Open the log, install the SIGUSR2 handler (no SA_RESTART) and block SIGUSR2 so that it is
 * only taken inside laz_wait_usr2()'s sigsuspend(). Returns argv[1].
 */
LAZ_FN const char *laz_init(int argc, char **argv)
{
	struct sigaction sa;
	sigset_t set;

	if (argc < 2)
		_exit(2);
	laz_log_fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
	if (laz_log_fd < 0)
		_exit(2);
	if (!realpath(argv[1], laz_log_path))
		laz_die("realpath %s", argv[1]);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = laz_usr2_handler;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR2, &sa, NULL))
		laz_die("sigaction SIGUSR2");
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		laz_die("sigprocmask");
	return laz_log_path;
}

/* A directory private to this target run: "LOGFILE.d", created on first use. */
LAZ_FN const char *laz_tmpdir(void)
{
	static char dir[PATH_MAX + 8];

	if (!dir[0]) {
		snprintf(dir, sizeof(dir), "%s.d", laz_log_path);
		if (mkdir(dir, 0700) && errno != EEXIST)
			laz_die("mkdir %s", dir);
	}
	return dir;
}

/* Path of NAME inside laz_tmpdir(), written into buf. */
LAZ_FN const char *laz_tmpfile(const char *name, char *buf, size_t len)
{
	if ((size_t)snprintf(buf, len, "%s/%s", laz_tmpdir(), name) >= len)
		laz_die("path too long: %s", name);
	return buf;
}

/* Make the just-opened FD (or -1: the open failed, setup dies) the process's fd WANT, closing the original. */
LAZ_FN void laz_place(int fd, int want)
{
	if (fd < 0)
		laz_die("open for fd %d", want);
	if (fd != want) {
		if (dup2(fd, want) != want)
			laz_die("dup2 %d", want);
		close(fd);
	}
}

/* Declare the corruption points ("a b c") and tell the harness the state is set up. */
LAZ_FN void laz_ready(const char *points)
{
	laz_points = points;
	laz_log("# corrupt-points: %s", points);
	laz_log("READY");
}

LAZ_FN int laz_point_declared(const char *name)
{
	size_t n = strlen(name);
	const char *p = laz_points;

	while ((p = strstr(p, name)) != NULL) {
		if ((p == laz_points || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0'))
			return 1;
		p += n;
	}
	return 0;
}

/*
 * True when the self-test asks to damage the state checked under NAME (see the top of this
 * file). The caller then damages it, after the wait and before verifying.
 */
LAZ_FN int laz_corrupt(const char *name)
{
	const char *want = getenv("LAZ_SELFTEST_CORRUPT");

	if (!laz_point_declared(name))
		laz_failf("internal: undeclared corrupt point %s", name);
	if (!want || !*want || laz_corrupt_applied)
		return 0;
	if (strcmp(want, name) != 0 && strcmp(want, "1") != 0)
		return 0;
	laz_corrupt_applied = 1;
	laz_log("# corrupting %s", name);
	return 1;
}

/* Wait for SIGUSR2 (blocked since laz_init) without a lost-wakeup race. */
LAZ_FN void laz_wait_usr2(void)
{
	sigset_t mask;

	if (sigprocmask(SIG_SETMASK, NULL, &mask))
		laz_die("sigprocmask");
	sigdelset(&mask, SIGUSR2);
	while (!laz_usr2_seen)
		sigsuspend(&mask);
}

/* One step of a target: setting up, damaging (see laz_corrupt()) or checking its state. */
typedef void (*laz_step)(void);

/*
 * The whole main() of a target with nothing between the protocol steps: laz_init(), SETUP,
 * laz_ready(POINTS), laz_wait_usr2(), CORRUPT (the self-test damage, see laz_corrupt()), each
 * of the NULL-terminated CHECKS in order, and the result line. Targets that need argv or do
 * more between the steps write their main() out instead.
 */
__attribute__((noreturn))
LAZ_FN void laz_main(int argc, char **argv, const char *points, laz_step setup, laz_step corrupt,
		     const laz_step *checks)
{
	laz_init(argc, argv);
	setup();
	laz_ready(points);
	laz_wait_usr2();
	corrupt();
	for (; *checks; checks++)
		(*checks)();
	laz_finish();
}

/*
 * Connect to the unix stream socket SOCKPATH and send LINE with the NFDS descriptors FDS attached
 * (SCM_RIGHTS, at most 4). Returns 0, or -1 with errno set.
 */
LAZ_FN int laz_send_fds(const char *sockpath, const char *line, const int *fds, size_t nfds)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char cbuf[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iov;
	struct msghdr mh;
	struct cmsghdr *cm;
	int s, err;

	if (nfds < 1 || nfds > 4) {
		errno = EINVAL;
		return -1;
	}
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	strncpy(sa.sun_path, sockpath, sizeof(sa.sun_path) - 1);
	memset(&mh, 0, sizeof(mh));
	memset(cbuf, 0, sizeof(cbuf));
	iov.iov_base = (void *)line;
	iov.iov_len = strlen(line);
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cbuf;
	mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
	cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
	memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) || sendmsg(s, &mh, 0) < 0) {
		err = errno;
		close(s);
		errno = err;
		return -1;
	}
	close(s);
	return 0;
}

/* A pseudo-random 64-bit value depending only on x (splitmix64 finaliser). */
LAZ_FN inline uint64_t laz_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* Fill [p, p+len) with 64-bit words depending on their own address and seed. */
LAZ_FN void laz_fill(void *p, size_t len, uint64_t seed)
{
	uint64_t *w = p;
	size_t i;

	for (i = 0; i < len / 8; i++)
		w[i] = laz_mix((uint64_t)(uintptr_t)&w[i] ^ seed);
}

/* Offset of the first word differing from laz_fill(p, len, seed), or -1 if all match. */
LAZ_FN long laz_find_mismatch(const void *p, size_t len, uint64_t seed)
{
	const uint64_t *w = p;
	size_t i;

	for (i = 0; i < len / 8; i++)
		if (w[i] != laz_mix((uint64_t)(uintptr_t)&w[i] ^ seed))
			return (long)(i * 8);
	return -1;
}

/* Fill a buffer with bytes depending on their offset in a file (not on any address). */
LAZ_FN void laz_fill_offset(void *p, size_t len, uint64_t off, uint64_t seed)
{
	unsigned char *b = p;
	size_t i;

	for (i = 0; i < len; i++)
		b[i] = (unsigned char)(laz_mix((off + i) / 8 ^ seed) >> (8 * ((off + i) % 8)));
}

LAZ_FN long laz_find_mismatch_offset(const void *p, size_t len, uint64_t off, uint64_t seed)
{
	const unsigned char *b = p;
	size_t i;

	for (i = 0; i < len; i++)
		if (b[i] != (unsigned char)(laz_mix((off + i) / 8 ^ seed) >> (8 * ((off + i) % 8))))
			return (long)i;
	return -1;
}

/*
 * Copy the value that ends a /proc line (S points past its key: leading spaces and the newline are dropped)
 * into buf, truncated to len - 1 bytes and NUL-terminated. Returns its length.
 */
LAZ_FN size_t laz_line_value(char *buf, size_t len, const char *s)
{
	size_t n;

	while (*s == ' ')
		s++;
	n = strcspn(s, "\n");
	if (n >= len)
		n = len - 1;
	memcpy(buf, s, n);
	buf[n] = '\0';
	return n;
}

/*
 * Find the /proc/self/maps line covering ADDR. Copies its permission string ("rw-p") into
 * perms (5 bytes) and its path (may be empty) into path. Returns 0 if found, -1 if unmapped.
 */
LAZ_FN int laz_vma_of(const void *addr, char perms[5], char *path, size_t pathlen)
{
	FILE *f = fopen("/proc/self/maps", "re");
	char line[PATH_MAX + 128];
	uintptr_t a = (uintptr_t)addr;
	int found = -1;

	if (!f)
		laz_die("open /proc/self/maps");
	while (fgets(line, sizeof(line), f)) {
		unsigned long start, end;
		char p[5];
		int off = 0;

		if (sscanf(line, "%lx-%lx %4s %*s %*s %*s%n", &start, &end, p, &off) < 3)
			continue;
		if (a < start || a >= end)
			continue;
		memcpy(perms, p, 5);
		if (path)
			laz_line_value(path, pathlen, line + off);
		found = 0;
		break;
	}
	fclose(f);
	return found;
}

LAZ_FN double laz_now(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Read exactly len bytes (or fail the check): returns bytes read. */
LAZ_FN ssize_t laz_read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(fd, (char *)buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

/*
 * Read the file at PATH (a /proc file, say) into buf, at most len bytes: returns the bytes read, or -1 if it
 * cannot be opened (errno set). No terminating NUL: leave room for one if the caller needs it.
 */
LAZ_FN ssize_t laz_slurp(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = laz_read_full(fd, buf, len);
	close(fd);
	return n;
}

#endif /* LAZ_COMMON_H */
