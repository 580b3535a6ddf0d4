/*
 * clone_files.c - exercises one fd table shared by two processes: a parent P and its child C made by
 * clone(CLONE_FILES) (each with its own memory); and G, C's child by a plain fork, with a copy of the table of
 * its own. Each checks itself after the restore.
 *
 *   clone_files LOGFILE [private|siblings|vfork|clonevm]
 *
 * P sets up, before the clone:
 *   fd 20   a file opened O_RDWR, 100 bytes, at offset 10 (G inherits this open file description);
 *   fd 21   /dev/null (P closes it after the restore: C must see it closed, G keeps its own copy);
 *   fd 22/23 a pipe in the table, C to P; fd 24/25 another, P to C (the way they talk after the restore);
 *           a private buffer of BUF_PAGES pages; C and G fill one of their own each.
 * C forks G; C and G say they are ready through the pipe; P logs READY.
 *
 * After SIGUSR2 (to P), in order:
 *   P   the table is as it was (fd 20 at offset 10, fd 21 open), its buffer intact; SIGUSR2 to C
 *   C   its buffer intact; opens /dev/zero (the lowest free number N of the table, as P sees it) and writes N
 *       into the pipe
 *   P   reads N: fd N is open in its table on /dev/zero (opened by C); closes fd 21, writes one byte
 *   C   reads it: fd 21 is closed in its table too; writes "CCCC" through fd 20 (offset 10 -> 14);
 *       SIGUSR2 to G and waits for it
 *   G   its buffer intact; its fd 21 still open (its own table), fd 20 at offset 14 (one description with
 *       the table's), no fd on /dev/zero (N is not in its table); writes "GGGG" through fd 20; exits 0 or 1
 *   C   exits with G's result or its own
 *   P   C exited 0; fd 20 at offset 18, bytes 10..17 are "CCCCGGGG"; fd N still open (the table is P's too)
 * Children report through exit statuses and "# " lines; only P writes the result line.
 * "private": the same, but C and G first write every page of their private mappings (each page then its own
 * copy): no copy-on-write page is left shared, and the restore builds the tree without any kept (docs/TREES.md:
 * every child made from its blank parent first, then each rebuilt).
 *
 * Trees a dump must refuse, naming the pids (the harness checks the refusal, then kills the tree):
 *   siblings  P makes two children with clone(CLONE_FILES), then unshare(CLONE_FILES): the two share a table
 *             that is not their parent's (no clone can rebuild it)
 *   vfork     P vfork()s; the child stops itself (SIGSTOP) before any exec: P waits for it, sharing its memory
 *   clonevm   P makes a child with clone(CLONE_VM | CLONE_SIGHAND) on a stack of its own: one address space
 *             and one signal handler table for two processes, neither a thread of the other
 */
#include "common.h"

#include <sched.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define BUF_PAGES 256
#define SEED 0xc10eULL
#define POINTS "memory table offset"

static unsigned char *buf;
static pid_t c_pid, g_pid;

static int check_buf(const char *who, uint64_t seed)
{
	long off = laz_find_mismatch(buf, BUF_PAGES * LAZ_PAGE, seed);

	if (off >= 0) {
		laz_log("# %s: buffer differs at %ld", who, off);
		return 1;
	}
	return 0;
}

/* 0 once `len` bytes are read (a signal may interrupt the read), -1 on end of file or error. */
static int read_full(int fd, void *p, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(fd, (char *)p + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		got += (size_t)n;
	}
	return 0;
}

static void wait_usr2_child(void)
{
	laz_usr2_seen = 0;
	laz_wait_usr2();
}

static int private_pages; /* "private" */

/* Write every page of the private mappings back as it is (made writable for the moment where it is not):
 * none is shared with another process after this. */
static void own_every_page(void)
{
	char line[512];
	FILE *maps;

	if (!private_pages)
		return;
	maps = fopen("/proc/self/maps", "re");
	if (!maps)
		_exit(8);
	char (*all)[512] = calloc(256, sizeof(*all)); /* read first: mprotect changes the list while reading */
	int n = 0;
	while (n < 256 && fgets(all[n], sizeof(all[n]), maps))
		n++;
	fclose(maps);
	for (int i = 0; i < n; i++) {
		unsigned long start, end;
		char perms[5];
		memcpy(line, all[i], sizeof(line));
		if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) != 3 || perms[3] != 'p' || perms[2] == 'x' ||
		    strstr(line, "[v"))
			continue;
		int prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0);
		if (prot != (PROT_READ | PROT_WRITE) && mprotect((void *)start, end - start, PROT_READ | PROT_WRITE))
			continue;
		for (unsigned long a = start; a < end; a += LAZ_PAGE)
			*(volatile char *)a = *(volatile char *)a;
		if (prot != (PROT_READ | PROT_WRITE))
			mprotect((void *)start, end - start, prot);
	}
	free(all);
}

static int g_main(int ready)
{
	int bad = 0;
	char path[64], link[64];

	laz_fill(buf, BUF_PAGES * LAZ_PAGE, SEED + 2);
	own_every_page();
	if (write(ready, "G", 1) != 1)
		_exit(4);
	close(ready);
	for (int fd = 22; fd <= 25; fd++)
		close(fd); /* its own copy of the table: the pipes are P's and C's */
	wait_usr2_child();
	bad |= check_buf("G", SEED + 2);
	if (fcntl(21, F_GETFD) < 0) {
		laz_log("# G: fd 21 is closed in its own table");
		bad = 1;
	}
	off_t at = lseek(20, 0, SEEK_CUR);
	if (at != 14) {
		laz_log("# G: fd 20 at offset %ld, expected 14 (C wrote through the same description)", (long)at);
		bad = 1;
	}
	for (int fd = 0; fd < 64; fd++) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		ssize_t n = readlink(path, link, sizeof(link) - 1);
		if (n >= 0 && (link[n] = '\0', !strcmp(link, "/dev/zero"))) {
			laz_log("# G: fd %d is C's /dev/zero: it reached a table that is not C's", fd);
			bad = 1;
		}
	}
	if (write(20, "GGGG", 4) != 4) {
		laz_log("# G: write to fd 20 failed: %s", strerror(errno));
		bad = 1;
	}
	return bad;
}

static int c_main(void)
{
	int bad = 0;
	char one;

	laz_fill(buf, BUF_PAGES * LAZ_PAGE, SEED + 1);
	int gp[2];
	char tag;
	if (pipe(gp)) /* G's readiness, to C only (the table's pipes are P's too) */
		_exit(5);
	g_pid = fork();
	if (g_pid < 0)
		_exit(5);
	if (g_pid == 0) {
		close(gp[0]);
		_exit(g_main(gp[1]));
	}
	close(gp[1]);
	if (read_full(gp[0], &tag, 1))
		_exit(4);
	close(gp[0]);
	own_every_page(); /* after the fork: G's pages are not C's either */
	if (write(23, &g_pid, sizeof(g_pid)) != sizeof(g_pid) || write(23, "C", 1) != 1)
		_exit(4);
	wait_usr2_child();
	bad |= check_buf("C", SEED + 1);
	int n = open("/dev/zero", O_RDONLY);
	if (n < 0 || write(23, &n, sizeof(n)) != sizeof(n))
		_exit(6);
	if (read_full(24, &one, 1)) {
		laz_log("# C: no word from P after its close");
		_exit(7);
	}
	if (fcntl(21, F_GETFD) >= 0 || errno != EBADF) {
		laz_log("# C: fd 21 is still open after P closed it: not one table");
		bad = 1;
	}
	if (write(20, "CCCC", 4) != 4) {
		laz_log("# C: write to fd 20 failed: %s", strerror(errno));
		bad = 1;
	}
	kill(g_pid, SIGUSR2);
	int st = 0;
	if (waitpid(g_pid, &st, 0) != g_pid || !WIFEXITED(st) || WEXITSTATUS(st)) {
		laz_log("# C: G ended with status %#x", st);
		bad = 1;
	}
	return bad;
}

static void setup(void)
{
	char path[PATH_MAX], data[100];

	laz_place(open(laz_tmpfile("clone_files.dat", path, sizeof(path)), O_RDWR | O_CREAT | O_TRUNC, 0600), 20);
	memset(data, '.', sizeof(data));
	if (write(20, data, sizeof(data)) != sizeof(data) || lseek(20, 10, SEEK_SET) != 10)
		laz_die("file");
	laz_place(open("/dev/null", O_RDWR), 21);
	int p[2];
	if (pipe(p))
		laz_die("pipe");
	laz_place(p[0], 22);
	laz_place(p[1], 23);
	if (pipe(p))
		laz_die("pipe");
	laz_place(p[0], 24);
	laz_place(p[1], 25);
	buf = mmap(NULL, BUF_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		laz_die("mmap");
	laz_fill(buf, BUF_PAGES * LAZ_PAGE, SEED);

	/* Like fork (no CLONE_VM: its own copy of the memory), but the fd table is one. */
	c_pid = (pid_t)syscall(SYS_clone, CLONE_FILES | SIGCHLD, NULL, NULL, NULL, 0);
	if (c_pid < 0)
		laz_die("clone(CLONE_FILES)");
	if (c_pid == 0)
		_exit(c_main());
	char tag;
	if (read_full(22, &g_pid, sizeof(g_pid)) || read_full(22, &tag, 1))
		laz_die("children ready");
	laz_log("# child: %d", (int)c_pid);
	laz_log("# child: %d", (int)g_pid);
	laz_log("# tree P %d C %d G %d", (int)getpid(), (int)c_pid, (int)g_pid);
}

static char vm_stack[64 * 1024];

static int idle_main(void *arg)
{
	sigset_t none;

	(void)arg;
	sigemptyset(&none);
	for (;;)
		sigsuspend(&none);
	return 0;
}

/* The refused shapes: set up, log the children and READY, and wait to be killed. */
static void refused_shape(const char *mode)
{
	pid_t kids[2] = {-1, -1};

	if (!strcmp(mode, "siblings")) {
		int p[2];
		char c;
		if (pipe(p))
			laz_die("pipe");
		for (int i = 0; i < 2; i++) {
			kids[i] = (pid_t)syscall(SYS_clone, CLONE_FILES | SIGCHLD, NULL, NULL, NULL, 0);
			if (kids[i] < 0)
				laz_die("clone(CLONE_FILES)");
			if (kids[i] == 0) {
				if (write(p[1], "k", 1) != 1)
					_exit(4);
				idle_main(NULL);
			}
			if (read_full(p[0], &c, 1))
				laz_die("child ready");
		}
		if (unshare(CLONE_FILES)) /* P's own copy from now on; the children keep the table */
			laz_die("unshare(CLONE_FILES)");
	} else if (!strcmp(mode, "vfork")) {
		char line[64];
		int len;
		pid_t v = vfork();
		if (v == 0) {
			/* Shares P's memory and stack until exec or _exit: only async-signal-safe calls here. */
			len = snprintf(line, sizeof(line), "# child: %d\nREADY\n", (int)getpid());
			if (write(laz_log_fd, line, (size_t)len) != len)
				_exit(4);
			kill(getpid(), SIGSTOP);
			_exit(0);
		}
		laz_log("# vfork child %d went on", (int)v); /* after the harness continued or killed it */
		for (;;)
			pause();
	} else if (!strcmp(mode, "clonevm")) {
		kids[0] = clone(idle_main, vm_stack + sizeof(vm_stack), CLONE_VM | CLONE_SIGHAND | SIGCHLD, NULL);
		if (kids[0] < 0)
			laz_die("clone(CLONE_VM | CLONE_SIGHAND)");
	} else {
		laz_die("unknown mode %s", mode);
	}
	for (int i = 0; i < 2; i++)
		if (kids[i] > 0)
			laz_log("# child: %d", (int)kids[i]);
	laz_ready(POINTS);
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	int n = -1;

	laz_init(argc, argv);
	private_pages = argc > 2 && !strcmp(argv[2], "private");
	if (argc > 2 && !private_pages)
		refused_shape(argv[2]);
	setup();
	laz_ready(POINTS);
	laz_wait_usr2();

	if (laz_corrupt("memory"))
		buf[123] ^= 1;
	if (check_buf("P", SEED))
		laz_failf("P's buffer differs");
	off_t at = lseek(20, 0, SEEK_CUR);
	LAZ_CHECK(at == 10, "fd 20 at offset %ld before the children ran, expected 10", (long)at);
	LAZ_CHECK(fcntl(21, F_GETFD) >= 0, "fd 21 is not open after the restore");

	int lowest = dup(0); /* the number C's open must get: the lowest free one of the table */
	close(lowest);
	kill(c_pid, SIGUSR2);
	if (read_full(22, &n, sizeof(n)))
		laz_die("no fd number from C");
	if (laz_corrupt("table"))
		close(n);
	char path[64], link[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", n);
	ssize_t len = readlink(path, link, sizeof(link) - 1);
	link[len > 0 ? len : 0] = '\0';
	LAZ_CHECK(len > 0 && !strcmp(link, "/dev/zero"), "fd %d that C opened is %s in P's table", n,
		  len > 0 ? link : "not open");
	LAZ_CHECK(n == lowest, "C's new fd is %d, expected %d (the lowest free number of the table)", n, lowest);
	close(21);
	if (write(25, "x", 1) != 1)
		laz_die("write to C");
	int st = 0;
	LAZ_CHECK(waitpid(c_pid, &st, 0) == c_pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		  "C (or G) failed: status %#x (see the # lines)", st);
	if (laz_corrupt("offset"))
		lseek(20, 1, SEEK_CUR);
	at = lseek(20, 0, SEEK_CUR);
	LAZ_CHECK(at == 18, "fd 20 at offset %ld after C and G wrote, expected 18", (long)at);
	char got[9] = {0};
	LAZ_CHECK(pread(20, got, 8, 10) == 8 && !memcmp(got, "CCCCGGGG", 8), "bytes 10..17 are '%s'", got);
	LAZ_CHECK(fcntl(n, F_GETFD) >= 0, "fd %d closed in P's table after C exited", n);
	laz_finish();
}
