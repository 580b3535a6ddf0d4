/*
 * files2.c - exercises what an fd carries besides its file: exact status flags on every kind of
 * fd, signal owners, the identity of inodes, sparse unlinked files, /proc files of the process
 * itself, and deleted FIFOs and directories.
 *
 *   - status flags (F_GETFL compared exactly with what they were): regular files with
 *     O_APPEND|O_NOATIME|O_DSYNC, O_SYNC|O_NONBLOCK, O_DIRECT; /dev/null O_APPEND|O_NONBLOCK; a pipe
 *     whose write end is O_NONBLOCK and whose read end is not, with a second, separately opened
 *     O_NONBLOCK description of the read end; a deleted FIFO; a deleted directory
 *   - signal owners: the pipe's read end is O_ASYNC, owned by the process (F_SETOWN_EX TID) with
 *     F_SETSIG SIGRTMIN+1: after restore a write into the pipe must deliver that signal with si_fd;
 *     /dev/null owned by the process's own process group (it leads it)
 *   - two hard links of a file, both unlinked, one fd through each: still one inode (nlink 0)
 *   - an unlinked file with another link in another directory, and one with another link in the
 *     same directory: reopened through that link (same inode as the link's path)
 *   - a 64 MiB unlinked file with three 4 KiB data extents: size, content and holes (st_blocks)
 *   - /proc/self/maps open at offset 100: still this process's maps, at offset 100
 *   - a deleted FIFO opened twice (O_RDWR and O_RDONLY|O_NONBLOCK) with 1000 bytes buffered and a
 *     capacity of 128 KiB
 *   - a deleted working directory (mode 0751) and an fd of another deleted directory (mode 0705)
 *
 * Usage: files2 LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <sys/ioctl.h>

#define FD_APPEND 10
#define FD_SYNC 11
#define FD_DIRECT 12
#define FD_NULL 14
#define FD_PGRP 15
#define FD_PIPE_R 20
#define FD_PIPE_W 21
#define FD_PIPE_R2 22
#define FD_FIFO 30
#define FD_FIFO2 31
#define FD_HARD1 40
#define FD_HARD2 41
#define FD_OTHERDIR 42
#define FD_SAMEDIR 43
#define FD_SPARSE 50
#define FD_MAPS 60
#define FD_DIR 61

#define SPARSE_SIZE (64UL << 20)
#define FIFO_BYTES 1000
#define FIFO_SZ (128 * 1024)
#define MAPS_POS 100

static const int flag_fds[] = { FD_APPEND, FD_SYNC, FD_DIRECT, FD_NULL, FD_PGRP, FD_PIPE_R, FD_PIPE_W,
				FD_PIPE_R2, FD_FIFO, FD_FIFO2, FD_HARD1, FD_HARD2, FD_OTHERDIR, FD_SAMEDIR,
				FD_SPARSE, FD_MAPS, FD_DIR };
#define NFLAG (sizeof(flag_fds) / sizeof(flag_fds[0]))
static int saved_fl[NFLAG], saved_fd[NFLAG];

static const char POINTS[] =
	"flags pipe_desc nonblock_w owner sig pgrp_owner fifo fifo_inode fifo_size hardlink otherdir samedir sparse "
	"sparse_blocks procself cwd dirfd";

static const unsigned long sparse_at[] = { 0, 32UL << 20, SPARSE_SIZE - 4096 };
static char otherdir_link[PATH_MAX + 32], samedir_link[PATH_MAX];
static volatile sig_atomic_t got_sig, got_fd = -1;
static int sig_async;

static void on_sig(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	got_sig = sig;
	got_fd = si->si_fd;
}

static void fill(int fd, unsigned long off, uint64_t seed)
{
	unsigned char buf[4096];

	laz_fill_offset(buf, sizeof(buf), off, seed);
	if (pwrite(fd, buf, sizeof(buf), (off_t)off) != (ssize_t)sizeof(buf))
		laz_die("pwrite");
}

static void setup(void)
{
	char path[PATH_MAX], path2[PATH_MAX], sub[PATH_MAX];
	struct f_owner_ex own = { F_OWNER_TID, 0 };
	struct sigaction sa;
	int p[2];
	size_t i;
	unsigned char buf[FIFO_BYTES];

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sig;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sig_async = SIGRTMIN + 1;
	if (sigaction(sig_async, &sa, NULL) || sigaction(SIGIO, &sa, NULL))
		laz_die("sigaction");

	/* Regular files with status flags only open(2) can set (O_DSYNC, O_SYNC) and others. */
	laz_place(open(laz_tmpfile("append", path, sizeof(path)), O_RDWR | O_CREAT | O_APPEND | O_NOATIME | O_DSYNC,
		   0600), FD_APPEND);
	laz_place(open(laz_tmpfile("sync", path, sizeof(path)), O_WRONLY | O_CREAT | O_SYNC | O_NONBLOCK, 0600),
	      FD_SYNC);
	laz_place(open(laz_tmpfile("direct", path, sizeof(path)), O_RDONLY | O_CREAT | O_DIRECT, 0600), FD_DIRECT);
	laz_place(open("/dev/null", O_RDWR | O_APPEND | O_NONBLOCK), FD_NULL);
	laz_place(open("/dev/null", O_WRONLY), FD_PGRP);
	if (fcntl(FD_PGRP, F_SETOWN, -getpgrp()))
		laz_die("F_SETOWN pgrp");
	if (getpgrp() != getpid())
		laz_die("not a process group leader");

	/* A pipe: blocking reader, non-blocking writer, a second O_NONBLOCK description of the reader. */
	if (pipe(p))
		laz_die("pipe");
	laz_place(p[0], FD_PIPE_R);
	laz_place(p[1], FD_PIPE_W);
	if (fcntl(FD_PIPE_W, F_SETFL, O_NONBLOCK))
		laz_die("F_SETFL");
	snprintf(path, sizeof(path), "/proc/self/fd/%d", FD_PIPE_R);
	laz_place(open(path, O_RDONLY | O_NONBLOCK), FD_PIPE_R2);
	own.pid = (pid_t)gettid();
	if (fcntl(FD_PIPE_R, F_SETOWN_EX, &own) || fcntl(FD_PIPE_R, F_SETSIG, sig_async) ||
	    fcntl(FD_PIPE_R, F_SETFL, O_ASYNC))
		laz_die("owner");

	/* A deleted FIFO, two descriptions, data buffered. */
	laz_tmpfile("fifo", path, sizeof(path));
	unlink(path);
	if (mkfifo(path, 0640))
		laz_die("mkfifo");
	laz_place(open(path, O_RDWR), FD_FIFO);
	laz_place(open(path, O_RDONLY | O_NONBLOCK), FD_FIFO2);
	if (fcntl(FD_FIFO, F_SETPIPE_SZ, FIFO_SZ) != FIFO_SZ)
		laz_die("F_SETPIPE_SZ");
	laz_fill_offset(buf, sizeof(buf), 0, 0xf1f0);
	if (write(FD_FIFO, buf, sizeof(buf)) != (ssize_t)sizeof(buf) || unlink(path))
		laz_die("fifo");

	/* Two hard links, both unlinked. */
	laz_tmpfile("hard1", path, sizeof(path));
	laz_tmpfile("hard2", path2, sizeof(path2));
	laz_place(open(path, O_RDWR | O_CREAT | O_TRUNC, 0600), FD_HARD1);
	fill(FD_HARD1, 0, 0x4a4d);
	if (link(path, path2))
		laz_die("link");
	laz_place(open(path2, O_RDONLY), FD_HARD2);
	if (unlink(path) || unlink(path2))
		laz_die("unlink");

	/* Unlinked, with another link in another directory / in the same directory. */
	laz_tmpfile("sub", sub, sizeof(sub));
	if (mkdir(sub, 0700) && errno != EEXIST)
		laz_die("mkdir sub");
	laz_tmpfile("other", path, sizeof(path));
	snprintf(otherdir_link, sizeof(otherdir_link), "%s/other-link", sub);
	laz_place(open(path, O_RDWR | O_CREAT | O_TRUNC, 0600), FD_OTHERDIR);
	fill(FD_OTHERDIR, 0, 0x07);
	if (link(path, otherdir_link) || unlink(path))
		laz_die("link other");
	laz_tmpfile("same", path, sizeof(path));
	laz_tmpfile("same-link", samedir_link, sizeof(samedir_link));
	laz_place(open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600), FD_SAMEDIR);
	fill(FD_SAMEDIR, 0, 0x5a);
	if (link(path, samedir_link) || unlink(path))
		laz_die("link same");

	/* A sparse unlinked file. */
	laz_tmpfile("sparse", path, sizeof(path));
	laz_place(open(path, O_RDWR | O_CREAT | O_TRUNC, 0640), FD_SPARSE);
	if (ftruncate(FD_SPARSE, (off_t)SPARSE_SIZE))
		laz_die("ftruncate");
	for (i = 0; i < sizeof(sparse_at) / sizeof(sparse_at[0]); i++)
		fill(FD_SPARSE, sparse_at[i], 0x5a5e);
	if (unlink(path))
		laz_die("unlink sparse");

	/* Our own /proc file. */
	laz_place(open("/proc/self/maps", O_RDONLY), FD_MAPS);
	if (read(FD_MAPS, buf, MAPS_POS) != MAPS_POS)
		laz_die("read maps");

	/* A deleted directory held open, and a deleted working directory. */
	laz_tmpfile("dirfd", path, sizeof(path));
	if (mkdir(path, 0705) && errno != EEXIST)
		laz_die("mkdir dirfd");
	chmod(path, 0705);
	laz_place(open(path, O_RDONLY | O_DIRECTORY), FD_DIR);
	if (rmdir(path))
		laz_die("rmdir dirfd");
	laz_tmpfile("cwd", path, sizeof(path));
	if (mkdir(path, 0751) && errno != EEXIST)
		laz_die("mkdir cwd");
	chmod(path, 0751);
	if (chdir(path) || rmdir(path))
		laz_die("cwd");

	for (i = 0; i < NFLAG; i++) {
		saved_fl[i] = fcntl(flag_fds[i], F_GETFL);
		saved_fd[i] = fcntl(flag_fds[i], F_GETFD);
		if (saved_fl[i] < 0)
			laz_die("F_GETFL %d", flag_fds[i]);
	}
}

static void replace_with_copy(int fd, const char *name)
{
	char path[PATH_MAX];

	laz_place(open(laz_tmpfile(name, path, sizeof(path)), O_RDWR | O_CREAT | O_TRUNC, 0600), fd);
	unlink(path);
}

static void corrupt(void)
{
	char path[PATH_MAX];

	if (laz_corrupt("flags"))
		fcntl(FD_APPEND, F_SETFL, fcntl(FD_APPEND, F_GETFL) & ~O_APPEND);
	if (laz_corrupt("pipe_desc"))
		dup2(FD_PIPE_R, FD_PIPE_R2);
	if (laz_corrupt("nonblock_w"))
		fcntl(FD_PIPE_W, F_SETFL, 0);
	if (laz_corrupt("owner"))
		fcntl(FD_PIPE_R, F_SETOWN, 0);
	if (laz_corrupt("sig"))
		fcntl(FD_PIPE_R, F_SETSIG, 0);
	if (laz_corrupt("pgrp_owner"))
		fcntl(FD_PGRP, F_SETOWN, 0);
	if (laz_corrupt("fifo"))
		read(FD_FIFO2, path, 1);
	if (laz_corrupt("fifo_inode")) {
		laz_tmpfile("fifo-other", path, sizeof(path));
		mkfifo(path, 0640);
		laz_place(open(path, O_RDONLY | O_NONBLOCK), FD_FIFO2);
		unlink(path);
	}
	if (laz_corrupt("fifo_size"))
		fcntl(FD_FIFO, F_SETPIPE_SZ, 65536);
	if (laz_corrupt("hardlink"))
		replace_with_copy(FD_HARD2, "hard-copy");
	if (laz_corrupt("otherdir"))
		replace_with_copy(FD_OTHERDIR, "other-copy");
	if (laz_corrupt("samedir"))
		replace_with_copy(FD_SAMEDIR, "same-copy");
	if (laz_corrupt("sparse"))
		pwrite(FD_SPARSE, "!", 1, 16UL << 20);
	if (laz_corrupt("sparse_blocks")) {
		static char zeros[1 << 20];

		pwrite(FD_SPARSE, zeros, sizeof(zeros), 8UL << 20);
	}
	if (laz_corrupt("procself"))
		lseek(FD_MAPS, 0, SEEK_SET);
	if (laz_corrupt("cwd"))
		chdir("/");
	if (laz_corrupt("dirfd"))
		laz_place(open("/", O_RDONLY | O_DIRECTORY), FD_DIR);
}

static void check_flags(void)
{
	size_t i;

	for (i = 0; i < NFLAG; i++) {
		int fl = fcntl(flag_fds[i], F_GETFL), fdf = fcntl(flag_fds[i], F_GETFD);

		LAZ_CHECK(fl == saved_fl[i], "fd %d: F_GETFL %#o, expected %#o", flag_fds[i], fl, saved_fl[i]);
		LAZ_CHECK(fdf == saved_fd[i], "fd %d: F_GETFD %#x, expected %#x", flag_fds[i], fdf, saved_fd[i]);
	}
}

static void check_owners(void)
{
	struct f_owner_ex own;
	char c = 'x';
	int i;

	if (fcntl(FD_PIPE_R, F_GETOWN_EX, &own))
		laz_failf("F_GETOWN_EX: %s", strerror(errno));
	else
		LAZ_CHECK(own.type == F_OWNER_TID && own.pid == gettid(), "pipe owner %d:%d, expected tid %d",
			  own.type, own.pid, (int)gettid());
	i = fcntl(FD_PIPE_R, F_GETSIG);
	LAZ_CHECK(i == sig_async, "pipe F_GETSIG %d, expected %d", i, sig_async);
	got_sig = 0;
	got_fd = -1;
	if (write(FD_PIPE_W, &c, 1) != 1)
		laz_failf("pipe write: %s", strerror(errno));
	for (i = 0; i < 100 && !got_sig; i++)
		usleep(1000);
	LAZ_CHECK(got_sig == sig_async && got_fd == FD_PIPE_R, "O_ASYNC pipe: got signal %d for fd %d, expected %d "
		  "for fd %d", (int)got_sig, (int)got_fd, sig_async, FD_PIPE_R);
	/* Never block here: a reader that lost O_NONBLOCK is reported, not waited on. */
	if (!(fcntl(FD_PIPE_R2, F_GETFL) & O_NONBLOCK)) {
		laz_failf("pipe: second reader is not O_NONBLOCK");
	} else {
		LAZ_CHECK(read(FD_PIPE_R2, &c, 1) == 1 && c == 'x', "pipe: byte not read back");
		LAZ_CHECK(read(FD_PIPE_R2, &c, 1) == -1 && errno == EAGAIN, "pipe: second reader is not O_NONBLOCK");
	}
	i = fcntl(FD_PGRP, F_GETOWN);
	LAZ_CHECK(i == -getpgrp(), "/dev/null owner %d, expected process group %d", i, (int)-getpgrp());
}

static void check_inode(int fd, const char *what, const char *path, int nlink, struct stat *out)
{
	struct stat a, b;

	if (fstat(fd, &a)) {
		laz_failf("%s: fstat: %s", what, strerror(errno));
		return;
	}
	if (out)
		*out = a;
	LAZ_CHECK((int)a.st_nlink == nlink, "%s: st_nlink %lu, expected %d", what, (unsigned long)a.st_nlink, nlink);
	if (path) {
		if (stat(path, &b))
			laz_failf("%s: stat %s: %s", what, path, strerror(errno));
		else
			LAZ_CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino, "%s: not the inode of %s", what, path);
	}
}

static void check_content(int fd, const char *what, unsigned long off, uint64_t seed)
{
	unsigned char buf[4096];

	if (pread(fd, buf, sizeof(buf), (off_t)off) != (ssize_t)sizeof(buf) ||
	    laz_find_mismatch_offset(buf, sizeof(buf), off, seed) >= 0)
		laz_failf("%s: content differs at %lu", what, off);
}

static void check_files(void)
{
	struct stat a, b;
	unsigned char buf[FIFO_BYTES + 1];
	char lnk[PATH_MAX], want[64], *maps;
	int avail = -1;
	ssize_t n;
	size_t i, len;
	off_t pos;

	/* The two hard links: one inode, writes through one seen through the other. */
	check_inode(FD_HARD1, "hard link 1", NULL, 0, &a);
	check_inode(FD_HARD2, "hard link 2", NULL, 0, &b);
	LAZ_CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino, "the two hard links are two inodes now");
	check_content(FD_HARD2, "hard link 2", 0, 0x4a4d);
	check_inode(FD_OTHERDIR, "unlinked with a link elsewhere", otherdir_link, 1, NULL);
	check_content(FD_OTHERDIR, "unlinked with a link elsewhere", 0, 0x07);
	check_inode(FD_SAMEDIR, "unlinked with a link beside it", samedir_link, 1, NULL);

	/* Sparse: size, data, holes, and the blocks it uses. */
	if (fstat(FD_SPARSE, &a) == 0) {
		LAZ_CHECK(a.st_size == (off_t)SPARSE_SIZE, "sparse file: size %lld", (long long)a.st_size);
		LAZ_CHECK(a.st_nlink == 0, "sparse file: st_nlink %lu", (unsigned long)a.st_nlink);
		LAZ_CHECK(a.st_blocks * 512 <= (1 << 20), "sparse file: %lld bytes allocated, its holes are gone",
			  (long long)a.st_blocks * 512);
		LAZ_CHECK((a.st_mode & 07777) == 0640, "sparse file: mode %o", a.st_mode & 07777);
	}
	for (i = 0; i < sizeof(sparse_at) / sizeof(sparse_at[0]); i++)
		check_content(FD_SPARSE, "sparse file", sparse_at[i], 0x5a5e);
	for (i = 1; i < 8; i++) {
		unsigned char z[512];
		size_t k;

		if (pread(FD_SPARSE, z, sizeof(z), (off_t)(i << 23)) != (ssize_t)sizeof(z))
			laz_failf("sparse file: read at %zu", i << 23);
		for (k = 0; k < sizeof(z); k++)
			if (z[k] && (i << 23) != (32UL << 20)) {
				laz_failf("sparse file: hole at %zu is not zero", i << 23);
				break;
			}
	}
	pos = lseek(FD_SPARSE, 0, SEEK_DATA);
	LAZ_CHECK(pos == 0 && lseek(FD_SPARSE, 0, SEEK_HOLE) == 4096, "sparse file: first extent not [0, 4096)");

	/* The deleted FIFO: one inode behind both fds, its data once. */
	check_inode(FD_FIFO, "FIFO", NULL, 0, &a);
	check_inode(FD_FIFO2, "FIFO (second open)", NULL, 0, &b);
	LAZ_CHECK(S_ISFIFO(a.st_mode) && a.st_dev == b.st_dev && a.st_ino == b.st_ino,
		  "the FIFO's two fds are not one FIFO");
	LAZ_CHECK((a.st_mode & 07777) == 0640, "FIFO: mode %o", a.st_mode & 07777);
	LAZ_CHECK(ioctl(FD_FIFO2, FIONREAD, &avail) == 0 && avail == FIFO_BYTES, "FIFO: %d bytes buffered, expected %d",
		  avail, FIFO_BYTES);
	avail = fcntl(FD_FIFO2, F_GETPIPE_SZ);
	LAZ_CHECK(avail == FIFO_SZ, "FIFO: capacity %d, expected %d", avail, FIFO_SZ);
	n = read(FD_FIFO2, buf, sizeof(buf));
	LAZ_CHECK(n == FIFO_BYTES && laz_find_mismatch_offset(buf, FIFO_BYTES, 0, 0xf1f0) < 0, "FIFO: data differs");

	/* Our own maps, at the offset we left it. */
	pos = lseek(FD_MAPS, 0, SEEK_CUR);
	LAZ_CHECK(pos == MAPS_POS, "/proc/self/maps: offset %lld, expected %d", (long long)pos, MAPS_POS);
	n = readlink("/proc/self/fd/60", lnk, sizeof(lnk) - 1);
	lnk[n > 0 ? n : 0] = '\0';
	snprintf(want, sizeof(want), "/proc/%d/maps", (int)getpid());
	LAZ_CHECK(strcmp(lnk, want) == 0, "fd %d is %s, expected %s", FD_MAPS, lnk, want);
	maps = malloc(1 << 20);
	len = 0;
	if (maps) {
		while ((n = pread(FD_MAPS, maps + len, (1 << 20) - 1 - len, (off_t)len)) > 0)
			len += (size_t)n;
		maps[len] = '\0';
		/* Our own executable and stack, not the restorer's. */
		LAZ_CHECK(len > 0 && strstr(maps, "[stack]") && strstr(maps, "files2"),
			  "fd %d does not read this process's maps", FD_MAPS);
		free(maps);
	}

	/* Deleted directories: the cwd and an fd. */
	n = readlink("/proc/self/cwd", lnk, sizeof(lnk) - 1);
	lnk[n > 0 ? n : 0] = '\0';
	LAZ_CHECK(n > 0 && strstr(lnk, " (deleted)"), "cwd is %s, not a deleted directory", lnk);
	if (stat(".", &a) == 0)
		LAZ_CHECK(S_ISDIR(a.st_mode) && (a.st_mode & 07777) == 0751 && a.st_nlink == 0,
			  "cwd: mode %o, nlink %lu", a.st_mode & 07777, (unsigned long)a.st_nlink);
	else
		laz_failf("stat cwd: %s", strerror(errno));
	if (fstat(FD_DIR, &a) == 0)
		LAZ_CHECK(S_ISDIR(a.st_mode) && (a.st_mode & 07777) == 0705 && a.st_nlink == 0,
			  "directory fd: mode %o, nlink %lu", a.st_mode & 07777, (unsigned long)a.st_nlink);
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { check_flags, check_owners, check_files, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
