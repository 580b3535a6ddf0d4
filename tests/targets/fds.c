/*
 * fds.c - exercises the file descriptor table: a regular file O_RDWR at offset 12345 and a
 * dup of it at fd 17 (one shared open file description), an O_WRONLY|O_APPEND file, a
 * close-on-exec fd, gaps in the fd numbers, an unlinked-but-open file with content, /dev/null,
 * /dev/zero and /dev/urandom (one of them O_NONBLOCK), a pipe whose both ends the process
 * holds with 10000 bytes buffered and a non-default size, and a FIFO opened O_RDWR by path
 * with 3000 bytes buffered. Checks access modes, O_APPEND/O_NONBLOCK, FD_CLOEXEC, offsets,
 * identity (inode), content and that no other fd is open.
 *
 * Usage: fds LOGFILE
 * Trigger: SIGUSR2. The checks leave files as they found them, so the same image can be
 * restored again.
 */
#include "common.h"

#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>

#define FDN_RW 10
#define FDN_APPEND 11
#define FDN_CLOEXEC_RO 12
#define FDN_DUP 17
#define FDN_UNLINKED 20
#define FDN_NULL 21
#define FDN_ZERO 22
#define FDN_URANDOM 23
#define FDN_NULL_NB 24
#define FDN_PIPE_R 30
#define FDN_PIPE_W 31
#define FDN_FIFO 40

#define RW_SIZE 20000
#define RW_POS 12345
#define RO_POS 777
#define APPEND_SIZE 100
#define UNLINKED_SIZE 5000
#define UNLINKED_POS 77
#define PIPE_BYTES 10000
#define PIPE_SZ (128 * 1024)
#define FIFO_BYTES 3000

enum { S_RW = 0xf00, S_APPEND, S_UNLINKED, S_PIPE, S_FIFO };

static const char POINTS[] =
	"pos shared_offset append cloexec rwflags unlinked nlink devnull pipe pipesz fifo extra_fd "
	"missing_fd";

static const int expected_fds[] = {
	0, 1, 2, FDN_RW, FDN_APPEND, FDN_CLOEXEC_RO, FDN_DUP, FDN_UNLINKED, FDN_NULL, FDN_ZERO, FDN_URANDOM,
	FDN_NULL_NB, FDN_PIPE_R, FDN_PIPE_W, FDN_FIFO,
};

static char rw_path[PATH_MAX], append_path[PATH_MAX], unlinked_path[PATH_MAX], fifo_path[PATH_MAX];

static void write_pattern(int fd, size_t len, uint64_t seed)
{
	unsigned char buf[4096];
	size_t off;

	for (off = 0; off < len; off += sizeof(buf)) {
		size_t n = len - off < sizeof(buf) ? len - off : sizeof(buf);

		laz_fill_offset(buf, n, off, seed);
		if (write(fd, buf, n) != (ssize_t)n)
			laz_die("write pattern");
	}
}

static void setup(void)
{
	int p[2];

	if (laz_log_fd != 3) /* keep the expected fd set simple */
		laz_die("log fd is %d, expected 3", laz_log_fd);

	laz_tmpfile("rw.dat", rw_path, sizeof(rw_path));
	laz_place(open(rw_path, O_RDWR | O_CREAT | O_TRUNC, 0600), FDN_RW);
	write_pattern(FDN_RW, RW_SIZE, S_RW);
	lseek(FDN_RW, RW_POS, SEEK_SET);
	if (dup2(FDN_RW, FDN_DUP) != FDN_DUP)
		laz_die("dup2 17");

	laz_tmpfile("append.dat", append_path, sizeof(append_path));
	laz_place(open(append_path, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0600), FDN_APPEND);
	write_pattern(FDN_APPEND, APPEND_SIZE, S_APPEND);

	laz_place(open(rw_path, O_RDONLY | O_CLOEXEC), FDN_CLOEXEC_RO);
	if (fcntl(FDN_CLOEXEC_RO, F_SETFD, FD_CLOEXEC)) /* dup2 in laz_place() drops it */
		laz_die("F_SETFD");
	lseek(FDN_CLOEXEC_RO, RO_POS, SEEK_SET);

	laz_tmpfile("unlinked.dat", unlinked_path, sizeof(unlinked_path));
	laz_place(open(unlinked_path, O_RDWR | O_CREAT | O_TRUNC, 0600), FDN_UNLINKED);
	write_pattern(FDN_UNLINKED, UNLINKED_SIZE, S_UNLINKED);
	lseek(FDN_UNLINKED, UNLINKED_POS, SEEK_SET);
	if (unlink(unlinked_path))
		laz_die("unlink");

	laz_place(open("/dev/null", O_RDWR), FDN_NULL);
	laz_place(open("/dev/zero", O_RDONLY), FDN_ZERO);
	laz_place(open("/dev/urandom", O_RDONLY), FDN_URANDOM);
	laz_place(open("/dev/null", O_WRONLY | O_NONBLOCK), FDN_NULL_NB);

	if (pipe(p))
		laz_die("pipe");
	laz_place(p[0], FDN_PIPE_R);
	laz_place(p[1], FDN_PIPE_W);
	if (fcntl(FDN_PIPE_W, F_SETPIPE_SZ, PIPE_SZ) != PIPE_SZ)
		laz_die("F_SETPIPE_SZ");
	if (fcntl(FDN_PIPE_R, F_SETFL, O_NONBLOCK))
		laz_die("F_SETFL");
	write_pattern(FDN_PIPE_W, PIPE_BYTES, S_PIPE);

	laz_tmpfile("fifo", fifo_path, sizeof(fifo_path));
	if (mkfifo(fifo_path, 0600) && errno != EEXIST)
		laz_die("mkfifo");
	laz_place(open(fifo_path, O_RDWR), FDN_FIFO);
	write_pattern(FDN_FIFO, FIFO_BYTES, S_FIFO);
}

static void corrupt(void)
{
	char buf[64];

	if (laz_corrupt("pos"))
		lseek(FDN_RW, RW_POS + 1, SEEK_SET);
	if (laz_corrupt("shared_offset")) {
		laz_place(open(rw_path, O_RDWR), FDN_DUP);
		lseek(FDN_DUP, RW_POS, SEEK_SET);
	}
	if (laz_corrupt("append"))
		fcntl(FDN_APPEND, F_SETFL, 0);
	if (laz_corrupt("cloexec"))
		fcntl(FDN_CLOEXEC_RO, F_SETFD, 0);
	if (laz_corrupt("rwflags"))
		fcntl(FDN_RW, F_SETFL, O_NONBLOCK);
	if (laz_corrupt("unlinked"))
		pwrite(FDN_UNLINKED, "!", 1, 4000);
	if (laz_corrupt("nlink")) {
		/* An unlinked file cannot be linked again: swap in a linked copy. */
		laz_place(open(unlinked_path, O_RDWR | O_CREAT | O_TRUNC, 0600), FDN_UNLINKED);
		write_pattern(FDN_UNLINKED, UNLINKED_SIZE, S_UNLINKED);
		lseek(FDN_UNLINKED, UNLINKED_POS, SEEK_SET);
	}
	if (laz_corrupt("devnull"))
		laz_place(open("/dev/zero", O_RDWR), FDN_NULL);
	if (laz_corrupt("pipe"))
		read(FDN_PIPE_R, buf, 1);
	if (laz_corrupt("pipesz"))
		fcntl(FDN_PIPE_W, F_SETPIPE_SZ, 65536);
	if (laz_corrupt("fifo"))
		write(FDN_FIFO, "!", 1);
	if (laz_corrupt("extra_fd"))
		laz_place(open("/dev/null", O_RDONLY), 16);
	if (laz_corrupt("missing_fd"))
		close(FDN_URANDOM);
}

static void check_fd_set(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int seen[sizeof(expected_fds) / sizeof(expected_fds[0])] = { 0 };
	size_t i;

	if (!d) {
		laz_failf("opendir /proc/self/fd: %s", strerror(errno));
		return;
	}
	while ((e = readdir(d))) {
		int fd;

		if (e->d_name[0] == '.')
			continue;
		fd = atoi(e->d_name);
		if (fd == dirfd(d) || fd == laz_log_fd)
			continue;
		for (i = 0; i < sizeof(expected_fds) / sizeof(expected_fds[0]); i++)
			if (expected_fds[i] == fd)
				break;
		if (i == sizeof(expected_fds) / sizeof(expected_fds[0]))
			laz_failf("unexpected fd %d is open", fd);
		else
			seen[i] = 1;
	}
	closedir(d);
	for (i = 0; i < sizeof(expected_fds) / sizeof(expected_fds[0]); i++)
		if (!seen[i])
			laz_failf("fd %d is not open", expected_fds[i]);
}

static void check_flags(int fd, int want_fl, int want_fd)
{
	int fl = fcntl(fd, F_GETFL), fdf = fcntl(fd, F_GETFD);
	int mask = O_ACCMODE | O_APPEND | O_NONBLOCK;

	if (fl < 0 || fdf < 0)
		return; /* reported by check_fd_set */
	if ((fl & mask) != want_fl)
		laz_failf("fd %d: status flags %#o, expected %#o", fd, fl & mask, want_fl);
	if (fdf != want_fd)
		laz_failf("fd %d: fd flags %#x, expected %#x", fd, fdf, want_fd);
}

static void check_pos(int fd, off_t want)
{
	off_t pos = lseek(fd, 0, SEEK_CUR);

	if (pos != want)
		laz_failf("fd %d: offset %lld, expected %lld", fd, (long long)pos, (long long)want);
}

static void check_content(const char *what, int fd, size_t len, uint64_t seed)
{
	unsigned char buf[4096];
	struct stat st;
	size_t off;

	if (fstat(fd, &st))
		return;
	if (st.st_size != (off_t)len) {
		laz_failf("%s: size %lld, expected %zu", what, (long long)st.st_size, len);
		return;
	}
	for (off = 0; off < len; off += sizeof(buf)) {
		size_t n = len - off < sizeof(buf) ? len - off : sizeof(buf);

		if (pread(fd, buf, n, (off_t)off) != (ssize_t)n ||
		    laz_find_mismatch_offset(buf, n, off, seed) >= 0) {
			laz_failf("%s: content differs near offset %zu", what, off);
			return;
		}
	}
}

static void check_same_file(int fd, const char *path)
{
	struct stat a, b;

	if (fstat(fd, &a))
		return;
	if (stat(path, &b))
		laz_failf("fd %d: stat %s: %s", fd, path, strerror(errno));
	else if (a.st_dev != b.st_dev || a.st_ino != b.st_ino)
		laz_failf("fd %d is not %s", fd, path);
}

static void check_chrdev(int fd, unsigned int major, unsigned int minor)
{
	struct stat st;

	if (fstat(fd, &st))
		return;
	if (!S_ISCHR(st.st_mode) || major(st.st_rdev) != major || minor(st.st_rdev) != minor)
		laz_failf("fd %d: not char device %u:%u", fd, major, minor);
}

static void check_files(void)
{
	struct stat st;
	char link[PATH_MAX];
	unsigned char buf[128];
	ssize_t n;
	int fd;

	/* Regular file and its dup share one offset. */
	check_flags(FDN_RW, O_RDWR, 0);
	check_pos(FDN_RW, RW_POS);
	check_same_file(FDN_RW, rw_path);
	check_content("rw.dat", FDN_RW, RW_SIZE, S_RW);
	check_flags(FDN_DUP, O_RDWR, 0);
	check_pos(FDN_DUP, RW_POS);
	check_same_file(FDN_DUP, rw_path);
	lseek(FDN_DUP, 100, SEEK_SET);
	LAZ_CHECK(lseek(FDN_RW, 0, SEEK_CUR) == 100, "fds %d and %d do not share their offset", FDN_RW, FDN_DUP);
	lseek(FDN_RW, RW_POS, SEEK_SET);

	/* O_APPEND: a write lands at the end even after seeking. */
	check_flags(FDN_APPEND, O_WRONLY | O_APPEND, 0);
	check_same_file(FDN_APPEND, append_path);
	fd = open(append_path, O_RDONLY);
	if (fd < 0) {
		laz_failf("append.dat: open: %s", strerror(errno));
	} else {
		check_content("append.dat", fd, APPEND_SIZE, S_APPEND);
		close(fd);
	}
	lseek(FDN_APPEND, 0, SEEK_SET);
	if (write(FDN_APPEND, "tail!", 5) != 5 || fstat(FDN_APPEND, &st) || st.st_size != APPEND_SIZE + 5)
		laz_failf("append.dat: a write did not append");
	if (ftruncate(FDN_APPEND, APPEND_SIZE))
		laz_failf("append.dat: ftruncate: %s", strerror(errno));

	check_flags(FDN_CLOEXEC_RO, O_RDONLY, FD_CLOEXEC);
	check_pos(FDN_CLOEXEC_RO, RO_POS);
	check_same_file(FDN_CLOEXEC_RO, rw_path);

	/* Unlinked file. */
	check_flags(FDN_UNLINKED, O_RDWR, 0);
	check_pos(FDN_UNLINKED, UNLINKED_POS);
	check_content("unlinked file", FDN_UNLINKED, UNLINKED_SIZE, S_UNLINKED);
	if (fstat(FDN_UNLINKED, &st) == 0 && st.st_nlink != 0)
		laz_failf("unlinked file: st_nlink %lu, expected 0", (unsigned long)st.st_nlink);
	n = readlink("/proc/self/fd/20", link, sizeof(link) - 1);
	link[n > 0 ? n : 0] = '\0';
	LAZ_CHECK(n > 0 && strstr(link, "(deleted)"), "unlinked file: fd links to '%s'", link);

	/* Devices. */
	check_chrdev(FDN_NULL, 1, 3);
	check_flags(FDN_NULL, O_RDWR, 0);
	LAZ_CHECK(write(FDN_NULL, buf, 10) == 10 && read(FDN_NULL, buf, 10) == 0, "/dev/null misbehaves");
	check_chrdev(FDN_ZERO, 1, 5);
	check_flags(FDN_ZERO, O_RDONLY, 0);
	memset(buf, 0xff, sizeof(buf));
	n = read(FDN_ZERO, buf, sizeof(buf));
	LAZ_CHECK(n == (ssize_t)sizeof(buf) && buf[0] == 0 && buf[sizeof(buf) - 1] == 0, "/dev/zero misbehaves");
	check_chrdev(FDN_URANDOM, 1, 9);
	check_flags(FDN_URANDOM, O_RDONLY, 0);
	LAZ_CHECK(read(FDN_URANDOM, buf, 16) == 16, "/dev/urandom misbehaves");
	check_chrdev(FDN_NULL_NB, 1, 3);
	check_flags(FDN_NULL_NB, O_WRONLY | O_NONBLOCK, 0);
}

static void check_pipe_data(const char *what, int fd, size_t len, uint64_t seed)
{
	unsigned char buf[4096];
	size_t off;
	int avail = -1;

	if (ioctl(fd, FIONREAD, &avail) || avail != (int)len) {
		laz_failf("%s: %d bytes buffered, expected %zu", what, avail, len);
		return;
	}
	for (off = 0; off < len; off += sizeof(buf)) {
		size_t n = len - off < sizeof(buf) ? len - off : sizeof(buf);

		if (laz_read_full(fd, buf, n) != (ssize_t)n || laz_find_mismatch_offset(buf, n, off, seed) >= 0) {
			laz_failf("%s: data differs near offset %zu", what, off);
			return;
		}
	}
}

static void check_pipes(void)
{
	struct stat r, w, f;
	char buf[8];
	int sz;

	check_flags(FDN_PIPE_R, O_RDONLY | O_NONBLOCK, 0);
	check_flags(FDN_PIPE_W, O_WRONLY, 0);
	if (fstat(FDN_PIPE_R, &r) == 0 && fstat(FDN_PIPE_W, &w) == 0 &&
	    (!S_ISFIFO(r.st_mode) || r.st_ino != w.st_ino || r.st_dev != w.st_dev))
		laz_failf("fds %d and %d are not the two ends of one pipe", FDN_PIPE_R, FDN_PIPE_W);
	sz = fcntl(FDN_PIPE_R, F_GETPIPE_SZ);
	LAZ_CHECK(sz == PIPE_SZ, "pipe size %d, expected %d", sz, PIPE_SZ);
	check_pipe_data("pipe", FDN_PIPE_R, PIPE_BYTES, S_PIPE);
	errno = 0;
	LAZ_CHECK(read(FDN_PIPE_R, buf, 1) == -1 && errno == EAGAIN, "pipe: more data than expected");
	LAZ_CHECK(write(FDN_PIPE_W, "ping", 4) == 4 && read(FDN_PIPE_R, buf, 8) == 4 && memcmp(buf, "ping", 4) == 0,
		  "pipe: round trip failed");

	check_flags(FDN_FIFO, O_RDWR, 0);
	check_same_file(FDN_FIFO, fifo_path);
	if (fstat(FDN_FIFO, &f) == 0 && !S_ISFIFO(f.st_mode))
		laz_failf("fd %d is not a FIFO", FDN_FIFO);
	check_pipe_data("FIFO", FDN_FIFO, FIFO_BYTES, S_FIFO);
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { check_fd_set, check_files, check_pipes, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
