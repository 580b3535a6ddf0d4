/*
 * locks.c - exercises file locks: flock(LOCK_EX) on one file (also held through a dup of its fd),
 * flock(LOCK_SH) on another, POSIX record locks (fcntl F_SETLK: write 0-99, read 200-299, write
 * 1000-EOF) and OFD locks (F_OFD_SETLK: write 100-199, read 500-599) on a third.
 *
 * After the trigger a child forked then (the process had none when it was dumped) opens the files
 * itself and checks, with flock(LOCK_NB), F_GETLK and F_OFD_GETLK, that exactly these locks are held
 * by this process: same ranges, same types, nothing more. It reports through a pipe.
 *
 * Usage: locks LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <sys/file.h>
#include <sys/wait.h>

#define FD_FLOCK_EX 10
#define FD_FLOCK_SH 11
#define FD_POSIX 12
#define FD_OFD 13
#define FD_FLOCK_DUP 14

static const char POINTS[] = "flock_ex flock_sh posix posix_type posix_eof ofd ofd_range extra";

static char ex_path[PATH_MAX], sh_path[PATH_MAX], rec_path[PATH_MAX];

static int setlk(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };

	return fcntl(fd, cmd, &fl);
}

static void setup(void)
{
	laz_place(open(laz_tmpfile("ex", ex_path, sizeof(ex_path)), O_RDWR | O_CREAT, 0600), FD_FLOCK_EX);
	laz_place(open(laz_tmpfile("sh", sh_path, sizeof(sh_path)), O_RDONLY | O_CREAT, 0600), FD_FLOCK_SH);
	laz_place(open(laz_tmpfile("records", rec_path, sizeof(rec_path)), O_RDWR | O_CREAT, 0600), FD_POSIX);
	laz_place(open(rec_path, O_RDWR), FD_OFD);
	if (flock(FD_FLOCK_EX, LOCK_EX | LOCK_NB) || flock(FD_FLOCK_SH, LOCK_SH | LOCK_NB))
		laz_die("flock");
	if (dup2(FD_FLOCK_EX, FD_FLOCK_DUP) != FD_FLOCK_DUP)
		laz_die("dup2");
	if (setlk(FD_POSIX, F_SETLK, F_WRLCK, 0, 100) || setlk(FD_POSIX, F_SETLK, F_RDLCK, 200, 100) ||
	    setlk(FD_POSIX, F_SETLK, F_WRLCK, 1000, 0))
		laz_die("F_SETLK");
	if (setlk(FD_OFD, F_OFD_SETLK, F_WRLCK, 100, 100) || setlk(FD_OFD, F_OFD_SETLK, F_RDLCK, 500, 100))
		laz_die("F_OFD_SETLK");
}

static void corrupt(void)
{
	if (laz_corrupt("flock_ex"))
		flock(FD_FLOCK_DUP, LOCK_UN);
	if (laz_corrupt("flock_sh"))
		flock(FD_FLOCK_SH, LOCK_UN);
	if (laz_corrupt("posix"))
		setlk(FD_POSIX, F_SETLK, F_UNLCK, 0, 100);
	if (laz_corrupt("posix_type"))
		setlk(FD_POSIX, F_SETLK, F_WRLCK, 200, 100);
	if (laz_corrupt("posix_eof"))
		setlk(FD_POSIX, F_SETLK, F_UNLCK, 1000, 0);
	if (laz_corrupt("ofd"))
		setlk(FD_OFD, F_OFD_SETLK, F_UNLCK, 100, 100);
	if (laz_corrupt("ofd_range"))
		setlk(FD_OFD, F_OFD_SETLK, F_RDLCK, 500, 150);
	if (laz_corrupt("extra"))
		setlk(FD_POSIX, F_SETLK, F_RDLCK, 400, 10);
}

/* In the child: report one failure line into the pipe. */
static int out_fd, nbad;

__attribute__((format(printf, 1, 2))) static void bad(const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg) - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(msg) - 2)
		n = (int)sizeof(msg) - 2;
	msg[n++] = '\n';
	laz_write_all(out_fd, msg, (size_t)n);
	nbad++;
}

/* The lock a write (or read) lock on [start, start+len) would conflict with, as F_GETLK/F_OFD_GETLK see it. */
static void expect(int fd, int cmd, short probe, off_t start, off_t len, short type, off_t lstart, off_t llen,
		   pid_t pid)
{
	struct flock fl = { .l_type = probe, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	const char *name = cmd == F_GETLK ? "F_GETLK" : "F_OFD_GETLK";

	if (fcntl(fd, cmd, &fl)) {
		bad("%s %lld+%lld: %s", name, (long long)start, (long long)len, strerror(errno));
		return;
	}
	if (fl.l_type != type || (type != F_UNLCK && (fl.l_start != lstart || fl.l_len != llen || fl.l_pid != pid)))
		bad("%s %s %lld+%lld: found type %d %lld+%lld pid %d, expected type %d %lld+%lld pid %d", name,
		    probe == F_WRLCK ? "write" : "read", (long long)start, (long long)len, fl.l_type,
		    (long long)fl.l_start, (long long)fl.l_len, (int)fl.l_pid, type, (long long)lstart,
		    (long long)llen, (int)pid);
}

static void child_checks(pid_t parent)
{
	int ex = open(ex_path, O_RDWR), sh = open(sh_path, O_RDONLY), rec = open(rec_path, O_RDWR);

	if (ex < 0 || sh < 0 || rec < 0) {
		bad("child: open: %s", strerror(errno));
		return;
	}
	if (flock(ex, LOCK_SH | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		bad("flock: the exclusive lock is not held");
	if (flock(sh, LOCK_SH | LOCK_NB))
		bad("flock: a shared lock could not be shared: %s", strerror(errno));
	flock(sh, LOCK_UN);
	if (flock(sh, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		bad("flock: the shared lock is not held");

	/* POSIX locks, seen by a POSIX query: owner pid = the parent. */
	expect(rec, F_GETLK, F_RDLCK, 0, 100, F_WRLCK, 0, 100, parent);
	expect(rec, F_GETLK, F_WRLCK, 200, 100, F_RDLCK, 200, 100, parent);
	expect(rec, F_GETLK, F_RDLCK, 200, 100, F_UNLCK, 0, 0, 0);
	expect(rec, F_GETLK, F_RDLCK, 1000, 0, F_WRLCK, 1000, 0, parent);
	expect(rec, F_GETLK, F_WRLCK, 1 << 30, 1, F_WRLCK, 1000, 0, parent);
	/* OFD locks: pid -1. */
	expect(rec, F_OFD_GETLK, F_RDLCK, 100, 100, F_WRLCK, 100, 100, -1);
	expect(rec, F_OFD_GETLK, F_WRLCK, 500, 200, F_RDLCK, 500, 100, -1);
	expect(rec, F_OFD_GETLK, F_RDLCK, 500, 100, F_UNLCK, 0, 0, 0);
	/* Nothing else: the gaps are free. */
	expect(rec, F_OFD_GETLK, F_WRLCK, 300, 200, F_UNLCK, 0, 0, 0);
	expect(rec, F_OFD_GETLK, F_WRLCK, 600, 400, F_UNLCK, 0, 0, 0);
}

static void check_locks(void)
{
	char buf[2048];
	int p[2], status = 0;
	ssize_t n;
	size_t len = 0;
	pid_t parent = getpid(), pid;

	if (pipe(p)) {
		laz_failf("pipe: %s", strerror(errno));
		return;
	}
	pid = fork();
	if (pid < 0) {
		laz_failf("fork: %s", strerror(errno));
		return;
	}
	if (pid == 0) {
		close(p[0]);
		out_fd = p[1];
		child_checks(parent);
		_exit(nbad ? 1 : 0);
	}
	close(p[1]);
	while (len < sizeof(buf) - 1 && (n = read(p[0], buf + len, sizeof(buf) - 1 - len)) > 0)
		len += (size_t)n;
	buf[len] = '\0';
	close(p[0]);
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		laz_failf("checking child did not exit normally");
	else if (WEXITSTATUS(status) || len) {
		char *line = strtok(buf, "\n");

		if (!line)
			laz_failf("checking child exited %d", WEXITSTATUS(status));
		for (; line; line = strtok(NULL, "\n"))
			laz_failf("%s", line);
	}
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { check_locks, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
