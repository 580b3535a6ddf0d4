/*
 * share_tree.c - exercises the detection of what the processes of a tree share (lazarus/dump/sharing.py):
 * a parent P, its child C, C's child G, and F, a child of P made by clone(CLONE_FILES | CLONE_FS).
 *
 *   share_tree LOGFILE [COW_PAGES]
 *
 * P sets up, before forking C:
 *   fd 30   a file opened O_RDWR at offset 37, inherited by every task (one open file description);
 *   fd 31/32 a pipe with PIPE_BYTES queued: C and G keep only the read end 31, P and F only the write end 32;
 *   fd 33   a memfd ("share-memfd", 2 pages) mapped shared at MEMFD_AT, inherited by all;
 *   fd 35   an eventfd, inherited by all (shared, and not yet restorable as such: refused);
 *   fd 36   a named FIFO opened read-write, inherited by all;
 *           shared anonymous memory (4 pages, MAP_SHARED | MAP_ANONYMOUS) at SHM_AT, inherited by all;
 *           a private anonymous COW region of COW_PAGES pages (default 64) filled with a pattern.
 * After forking, C rewrites page 0, 8, 16, ... of the COW region (one page in eight), then forks G; G and F
 * write nothing. Each of P and C also opens the same file again at fd 34 on its own (same inode, flags and
 * offset 0 as each other, but two open file descriptions: no sharing to find there).
 *
 * P logs "# child: PID" for C, G and F (the harness kills them), "# tree P C G F" and
 * "# cow ADDR NPAGES", "# shm ADDR", "# memfd ADDR", then READY. On SIGUSR2 P checks the state is as set up
 * (the pipe still holds its bytes, the file offset is 37, the children alive and their regions intact as
 * each reports through a status pipe), kills the children and reports PASS or FAIL.
 */
#include "common.h"

#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define PIPE_BYTES 5000
#define FILE_POS 37
#define SHM_PAGES 4
#define SEED 0x5eedULL

static long cow_pages = 64;
static unsigned char *cow, *shm, *mfd_map;
static pid_t kids[3];
static int report[2], pidpipe[2];
static char path[PATH_MAX];

/* In a child: wait for SIGTERM (sent by P at the end) after telling P it is ready. */
static void child_wait(char tag, int own_table)
{
	sigset_t none;

	sigemptyset(&none);
	if (write(report[1], &tag, 1) != 1)
		_exit(4);
	if (own_table) { /* F shares P's fd table: P closes these for both */
		close(report[0]);
		close(report[1]);
		close(pidpipe[0]);
		close(pidpipe[1]);
	}
	for (;;)
		sigsuspend(&none);
}

static void rewrite_one_in_eight(void)
{
	for (long p = 0; p < cow_pages; p += 8)
		laz_fill_offset(cow + p * LAZ_PAGE, LAZ_PAGE, (uint64_t)p * LAZ_PAGE, SEED + 1);
}

static void grandchild(void)
{
	child_wait('G', 1);
}

static void child(void)
{
	close(32);
	close(report[0]);
	rewrite_one_in_eight();
	laz_place(open(path, O_RDWR), 34);
	pid_t g = fork();
	if (g < 0)
		_exit(5);
	if (g == 0)
		grandchild();
	if (write(pidpipe[1], &g, sizeof(g)) != sizeof(g))
		_exit(4);
	child_wait('C', 1);
}

static void setup(void)
{
	int p[2];
	char buf[PIPE_BYTES];

	laz_place(open(laz_tmpfile("shared.dat", path, sizeof(path)), O_RDWR | O_CREAT | O_TRUNC, 0600), 30);
	memset(buf, 'f', 100);
	if (write(30, buf, 100) != 100 || lseek(30, FILE_POS, SEEK_SET) != FILE_POS)
		laz_die("file");
	if (pipe(p))
		laz_die("pipe");
	laz_place(p[0], 31);
	laz_place(p[1], 32);
	for (int i = 0; i < PIPE_BYTES; i++)
		buf[i] = (char)('a' + i % 26);
	if (write(32, buf, PIPE_BYTES) != PIPE_BYTES)
		laz_die("pipe write");
	laz_place(eventfd(3, 0), 35);
	char fifo[PATH_MAX];
	if (mkfifo(laz_tmpfile("fifo", fifo, sizeof(fifo)), 0600))
		laz_die("mkfifo");
	laz_place(open(fifo, O_RDWR), 36);
	laz_place(memfd_create("share-memfd", 0), 33);
	if (ftruncate(33, 2 * LAZ_PAGE))
		laz_die("ftruncate");
	mfd_map = mmap(NULL, 2 * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, 33, 0);
	shm = mmap(NULL, SHM_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	cow = mmap(NULL, cow_pages * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mfd_map == MAP_FAILED || shm == MAP_FAILED || cow == MAP_FAILED)
		laz_die("mmap");
	/* Pages of their own: no huge page to split, so the count of shared pages is exact. */
	madvise(cow, cow_pages * LAZ_PAGE, MADV_NOHUGEPAGE);
	laz_fill(mfd_map, 2 * LAZ_PAGE, SEED + 2);
	laz_fill(shm, SHM_PAGES * LAZ_PAGE, SEED + 3);
	laz_fill_offset(cow, cow_pages * LAZ_PAGE, 0, SEED);
	if (pipe(report) || pipe(pidpipe))
		laz_die("pipe");

	kids[0] = fork();
	if (kids[0] < 0)
		laz_die("fork");
	if (kids[0] == 0)
		child();
	close(31);
	laz_place(open(path, O_RDWR), 34);
	if (read(pidpipe[0], &kids[1], sizeof(kids[1])) != sizeof(kids[1]))
		laz_die("grandchild pid");
	/* F: fd table and fs state shared with P, its own copy of the address space. */
	kids[2] = (pid_t)syscall(SYS_clone, CLONE_FILES | CLONE_FS | SIGCHLD, NULL, NULL, NULL, 0);
	if (kids[2] < 0)
		laz_die("clone");
	if (kids[2] == 0)
		child_wait('F', 0);
	for (int i = 0; i < 3; i++)
		laz_log("# child: %d", (int)kids[i]);
	char tags[3];
	for (int got = 0; got < 3;) {
		ssize_t n = read(report[0], tags + got, (size_t)(3 - got));
		if (n <= 0)
			laz_die("children ready");
		got += (int)n;
	}
	close(report[0]);
	close(report[1]);
	close(pidpipe[0]);
	close(pidpipe[1]);
	laz_log("# tree %d %d %d %d", (int)getpid(), (int)kids[0], (int)kids[1], (int)kids[2]);
	laz_log("# cow %#lx %ld", (unsigned long)cow, cow_pages);
	laz_log("# shm %#lx %d", (unsigned long)shm, SHM_PAGES);
	laz_log("# memfd %#lx", (unsigned long)mfd_map);
}

static void corrupt(void)
{
	if (laz_corrupt("pipe")) {
		char c;
		int r = open("/proc/self/fd/32", O_RDONLY); /* a reader of our own: drain one byte */
		if (r < 0 || read(r, &c, 1) != 1)
			laz_die("drain");
		close(r);
	}
	if (laz_corrupt("pos"))
		lseek(30, 1, SEEK_CUR);
	if (laz_corrupt("children"))
		kill(kids[0], SIGKILL);
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	if (argc > 2)
		cow_pages = strtol(argv[2], NULL, 0);
	setup();
	laz_ready("pipe pos children");
	laz_wait_usr2();
	corrupt();
	int queued = 0;
	if (ioctl(32, FIONREAD, &queued))
		queued = -1;
	LAZ_CHECK(queued == PIPE_BYTES, "pipe holds %d bytes, expected %d", queued, PIPE_BYTES);
	off_t pos = lseek(30, 0, SEEK_CUR);
	LAZ_CHECK(pos == FILE_POS, "file offset %ld, expected %d", (long)pos, FILE_POS);
	for (int i = 0; i < 3; i += 2) {
		int st;
		pid_t w = waitpid(kids[i], &st, WNOHANG);
		LAZ_CHECK(w == 0, "child %d gone (waitpid %d)", (int)kids[i], (int)w);
	}
	LAZ_CHECK(kill(kids[1], 0) == 0, "grandchild %d gone", (int)kids[1]);
	long bad;
	bad = laz_find_mismatch_offset(cow, cow_pages * LAZ_PAGE, 0, SEED);
	LAZ_CHECK(bad < 0, "COW region of the parent differs");
	for (int i = 0; i < 3; i++)
		kill(kids[i], SIGKILL);
	for (int i = 0; i < 3; i++) {
		if (i == 1)
			continue; /* G is C's child: reaped by us only once C is gone and it is reparented (not to us) */
		waitpid(kids[i], NULL, 0);
	}
	laz_finish();
}
