/*
 * tree_share.c - exercises open file descriptions, pipes and a FIFO shared by the processes of a tree: they come back
 * shared (one offset, one set of status flags, queued bytes once).
 *
 *   tree_share LOGFILE
 *
 * The root P, before forking its children C and D:
 *   fd 1     the log file (O_APPEND), as stdout: one description for P, C and D;
 *   fd 40    LOGFILE.share opened O_RDWR, 10 bytes written: one description (offset 10) for P, C and D;
 *   fd 41    the FIFO LOGFILE.fifo opened O_RDWR by P (inherited by C and D), DOWN_FIFO bytes queued;
 *   down     a pipe P -> C with DOWN_PIPE bytes in flight (P keeps the write end, C the read end);
 *   up       a pipe C -> P with UP_PIPE bytes in flight (C keeps the write end, P the read end).
 * D opens the FIFO again on its own (fd 43, O_WRONLY: another description of the same pipe) and queues
 * FIFO_D there too. Everything is in place before READY.
 *
 * After SIGUSR2 (to P; P then wakes C, then D, with SIGUSR2 and waits for each):
 *   P   offset of fd 40 is 10; writes 2 bytes (-> 12); sets O_NONBLOCK on fd 1; wakes C.
 *   C   sees offset 12 and O_NONBLOCK on fd 1 (P's changes, through the one description); writes 2 bytes
 *       (-> 14); reads the down pipe (exactly DOWN_PIPE) and the FIFO (DOWN_FIFO then FIFO_D, nothing
 *       more); writes REPLY into the up pipe and exits 0 (a failure: exit code naming the check).
 *   D   sees offset 14; exits 0.
 *   P   sees offset 14 and the file's 14 bytes; reads UP_PIPE then REPLY then end-of-file from the up pipe
 *       (every writer gone: the pipe was not duplicated); PASS or FAIL.
 */
#include "common.h"

#include <sys/ioctl.h>
#include <sys/wait.h>

#define POINTS "offset pipe flags"
#define DOWN_PIPE "down-pipe-data-in-flight"
#define UP_PIPE "up-pipe-data-in-flight"
#define DOWN_FIFO "fifo-data-from-p"
#define FIFO_D "fifo-data-from-d"
#define REPLY "reply-from-c"

static int down[2], up[2];
static char file_path[PATH_MAX + 16], fifo_path[PATH_MAX + 16];

static void wait_usr2_child(void)
{
	sigset_t mask;

	sigprocmask(SIG_SETMASK, NULL, &mask);
	sigdelset(&mask, SIGUSR2);
	while (!laz_usr2_seen)
		sigsuspend(&mask);
}

static int read_exact(int fd, const char *want)
{
	size_t n = strlen(want);
	char buf[256];

	if (n >= sizeof(buf) || read(fd, buf, n) != (ssize_t)n)
		return 0;
	return memcmp(buf, want, n) == 0;
}

static int pipe_empty(int fd)
{
	int queued = -1;

	return ioctl(fd, FIONREAD, &queued) == 0 && queued == 0;
}

static void c_main(void)
{
	close(down[1]);
	close(up[0]);
	if (write(up[1], UP_PIPE, strlen(UP_PIPE)) != (ssize_t)strlen(UP_PIPE))
		_exit(9);
	wait_usr2_child();
	if (lseek(40, 0, SEEK_CUR) != 12)
		_exit(10);
	if (!(fcntl(1, F_GETFL) & O_NONBLOCK))
		_exit(11);
	if (write(40, "cd", 2) != 2)
		_exit(12);
	if (!read_exact(down[0], DOWN_PIPE) || !pipe_empty(down[0]))
		_exit(13);
	if (!read_exact(41, DOWN_FIFO) || !read_exact(41, FIFO_D) || !pipe_empty(41))
		_exit(14);
	if (write(up[1], REPLY, strlen(REPLY)) != (ssize_t)strlen(REPLY))
		_exit(15);
	_exit(0);
}

static void d_main(void)
{
	close(down[0]);
	close(down[1]);
	close(up[0]);
	close(up[1]);
	int fd = open(fifo_path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 || dup2(fd, 43) != 43 || close(fd))
		_exit(20);
	if (write(43, FIFO_D, strlen(FIFO_D)) != (ssize_t)strlen(FIFO_D))
		_exit(21);
	wait_usr2_child();
	if (lseek(40, 0, SEEK_CUR) != 14)
		_exit(23);
	_exit(0);
}

static pid_t spawn(void (*body)(void))
{
	pid_t p = fork();

	if (p < 0)
		laz_die("fork");
	if (p == 0)
		body();
	laz_log("# child: %d", (int)p);
	return p;
}

static int status_ok(pid_t p, const char *name)
{
	int st = 0;
	pid_t got;

	do
		got = waitpid(p, &st, 0);
	while (got < 0 && errno == EINTR);
	LAZ_CHECK(got == p && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %s (%d) ended with status %#x", name,
		  (int)p, st);
	return got == p;
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	laz_points = POINTS;
	snprintf(file_path, sizeof(file_path), "%s.share", laz_log_path);
	snprintf(fifo_path, sizeof(fifo_path), "%s.fifo", laz_log_path);
	unlink(fifo_path);
	if (dup2(laz_log_fd, 1) != 1)
		laz_die("dup2 stdout");
	int fd = open(file_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || dup2(fd, 40) != 40 || close(fd) || write(40, "0123456789", 10) != 10)
		laz_die("share file");
	if (mkfifo(fifo_path, 0600))
		laz_die("mkfifo");
	fd = open(fifo_path, O_RDWR);
	if (fd < 0 || dup2(fd, 41) != 41 || close(fd))
		laz_die("fifo");
	if (write(41, DOWN_FIFO, strlen(DOWN_FIFO)) != (ssize_t)strlen(DOWN_FIFO))
		laz_die("fifo write");
	if (pipe(down) || pipe(up))
		laz_die("pipe");
	pid_t c = spawn(c_main);
	pid_t d = spawn(d_main);
	close(down[0]);
	close(up[1]);
	if (write(down[1], DOWN_PIPE, strlen(DOWN_PIPE)) != (ssize_t)strlen(DOWN_PIPE))
		laz_die("down write");
	/* Wait for D's bytes in the FIFO and C's in the up pipe: then every process is set up. */
	for (int i = 0; i < 5000; i++) {
		int q = 0, u = 0;
		if (ioctl(41, FIONREAD, &q) == 0 && q == (int)(strlen(DOWN_FIFO) + strlen(FIFO_D)) &&
		    ioctl(up[0], FIONREAD, &u) == 0 && u == (int)strlen(UP_PIPE))
			break;
		usleep(1000);
	}
	laz_log("# tree: c %d d %d", (int)c, (int)d);
	laz_ready(POINTS);
	laz_wait_usr2();

	if (laz_corrupt("offset"))
		lseek(40, 1, SEEK_CUR);
	LAZ_CHECK(lseek(40, 0, SEEK_CUR) == 10, "root: offset of fd 40 is %ld, expected 10", (long)lseek(40, 0, SEEK_CUR));
	LAZ_CHECK(write(40, "ab", 2) == 2, "root: write to fd 40: %s", strerror(errno));
	if (!laz_corrupt("flags"))
		fcntl(1, F_SETFL, fcntl(1, F_GETFL) | O_NONBLOCK);
	kill(c, SIGUSR2);
	status_ok(c, "c");
	kill(d, SIGUSR2);
	status_ok(d, "d");
	LAZ_CHECK(lseek(40, 0, SEEK_CUR) == 14, "root: offset of fd 40 is %ld after the children, expected 14",
		  (long)lseek(40, 0, SEEK_CUR));
	char buf[64] = {0};
	LAZ_CHECK(pread(40, buf, sizeof(buf), 0) == 14 && !memcmp(buf, "0123456789abcd", 14),
		  "root: the shared file holds '%.20s', expected '0123456789abcd'", buf);
	if (laz_corrupt("pipe"))
		read(up[0], buf, 1);
	LAZ_CHECK(read_exact(up[0], UP_PIPE), "root: the up pipe does not start with the bytes in flight");
	LAZ_CHECK(read_exact(up[0], REPLY), "root: the up pipe does not hold C's reply next");
	LAZ_CHECK(read(up[0], buf, 1) == 0, "root: the up pipe has a writer left or more bytes");
	fcntl(1, F_SETFL, fcntl(1, F_GETFL) & ~O_NONBLOCK);
	unlink(fifo_path);
	unlink(file_path);
	laz_finish();
}
