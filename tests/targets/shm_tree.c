/*
 * shm_tree.c - exercises memory objects shared by the processes of a tree (issue 9): each must come back as ONE
 * object that every holder maps, with its content, so that a write by one process is seen by the others.
 *
 *   shm_tree LOGFILE [sysv]
 *
 * The root P makes, before forking its children C and D (who inherit the mappings):
 *   SEM    one page of shared anonymous memory holding a process-shared semaphore (sem_init pshared, 0);
 *   ANON   4 pages of shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS);
 *   MEMFD  a memfd "laz-shm", 8 pages, pages 0-3 and 6 written, 4, 5, 7 holes; its fd closed after mmap;
 *   FILE   /dev/shm/laz-shm-PID, 3 pages, mapped shared, then unlinked (a deleted tmpfs file); its fd (O_RDWR,
 *          O_NOFOLLOW, close-on-exec) stays open as fd 60 at offset FILE_POS, one description inherited by C and D
 *          (multiprocessing's heap arena is such a file). Fd 61, a read-only O_NOFOLLOW description of it, is
 *          inherited by C and D and closed by P; D also opens a read-only description of its own of it (fd 62,
 *          through /proc/self/fd/60). D reads C's mark through both.
 * After the fork:
 *   LATE   C makes a memfd "laz-late" (2 pages), maps it and sends its fd to P (SCM_RIGHTS), P maps it; C
 *          keeps its fd open as fd 50 and reads P's mark through it too;
 *   LATEF  D makes /dev/shm/laz-late-PID (2 pages), maps it, sends its fd to P, unlinks it; P maps it.
 * Every other fd and socket used for that is closed again: only the mappings are shared at the dump. C waits for
 * SIGUSR2 (rt_sigsuspend); D waits on the semaphore (a futex wait on a shared page). P logs READY once both
 * are in those waits.
 *
 * Page p of region r holds laz_mix(r << 20 | p) in every word but the mark words (words 0-2 of page 1): after
 * SIGUSR2 P checks every region, writes its marks (word 0 of page 1 of each region), wakes C (SIGUSR2); C
 * checks the content and P's marks, writes its own (word 1), exits; P checks C's marks, posts the semaphore;
 * D checks the content and both marks, writes its own (word 2), exits; P checks D's marks; PASS or FAIL.
 * A child's failed check is its exit status (the region number times 16 plus what failed).
 * Through fd 60: P checks its size, flags, offset and that it is the deleted file; C reads P's mark through it
 * (moving the shared offset by 8, which P then sees), D writes its mark through it with pwrite, and P sees that
 * write in its mapping.
 *
 * sysv: P also attaches a System V segment SYSV (3 pages, mode 0640) before the fork and removes it at once
 * (IPC_RMID), so that every process holds it; at the end P checks it has its id, owner (set to 4321:4322), mode and size again,
 * still removed. sysvkeep: the same, not removed (still in the IPC namespace): the dump must refuse it, naming it;
 * P removes it at the end.
 */
#include "common.h"

#include <semaphore.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define POINTS "content share"
enum { SEM, ANON, MEMFD, FILEM, LATE, LATEF, SYSVR, NREG };
static const char *names[NREG] = {"sem", "anon", "memfd", "file", "late", "latef", "sysv"};
static const size_t pages_of[NREG] = {1, 4, 8, 3, 2, 2, 3};
#define FILE_FD 60
#define FILE_POS 1234
static int sysv_mode; /* 1: "sysv" (removed at once), 2: "sysvkeep" (left in the IPC namespace) */
static int sysv_id = -1;
static unsigned char *reg[NREG];
static sem_t *sem;

static int is_hole(int r, size_t p)
{
	return r == MEMFD && (p == 4 || p == 5 || p == 7);
}

static uint64_t word_of(int r, size_t p)
{
	return is_hole(r, p) ? 0 : laz_mix((uint64_t)r << 20 | p);
}

static uint64_t mark_of(int r, int who)
{
	return laz_mix(0x5eedULL << 32 | (uint64_t)(r * 8 + who));
}

static void stamp(int r)
{
	for (size_t p = 0; p < pages_of[r]; p++) {
		if (is_hole(r, p))
			continue;
		uint64_t *w = (uint64_t *)(reg[r] + p * LAZ_PAGE);
		for (size_t i = 0; i < LAZ_PAGE / 8; i++)
			w[i] = word_of(r, p);
	}
}

/* Whether process `who` (0 P, 1 C, 2 D) maps region r: each child does not map the other's late region. */
static int maps(int who, int r)
{
	if (r == SYSVR)
		return sysv_mode != 0;
	return !((who == 1 && r == LATEF) || (who == 2 && r == LATE));
}

/* 0 if region r holds its content and exactly the marks of the first `marks` processes (P, C, D) that map it;
 * else a code. */
static int check(int r, int marks)
{
	if (r == SEM)
		return 0; /* the semaphore's page: its state is checked by using it */
	for (size_t p = 0; p < pages_of[r]; p++) {
		const uint64_t *w = (const uint64_t *)(reg[r] + p * LAZ_PAGE);
		for (size_t i = 0; i < LAZ_PAGE / 8; i++) {
			if (p == 1 && i < 3) {
				uint64_t want = (int)i < marks && maps((int)i, r) ? mark_of(r, (int)i) : word_of(r, p);
				if (w[i] != want)
					return r * 16 + 2 + (int)i;
			} else if (w[i] != word_of(r, p)) {
				return r * 16 + 1;
			}
		}
	}
	return 0;
}

static int check_all(int who, int marks)
{
	for (int r = 0; r < NREG; r++) {
		if (!maps(who, r))
			continue;
		int bad = check(r, marks);
		if (bad)
			return bad;
	}
	return 0;
}

static void mark_all(int who)
{
	for (int r = ANON; r < NREG; r++) {
		uint64_t m = mark_of(r, who);
		if (!maps(who, r))
			continue;
		if (r == FILEM && who == 2) { /* D writes through the fd: the mappings must see it */
			if (pwrite(FILE_FD, &m, sizeof(m), LAZ_PAGE + 8 * who) != sizeof(m))
				_exit(FILEM * 16 + 8);
			continue;
		}
		((uint64_t *)(reg[r] + LAZ_PAGE))[who] = m;
	}
}

static unsigned char *map_fd(int fd, size_t pages)
{
	void *p = mmap(NULL, pages * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		laz_die("mmap fd %d", fd);
	return p;
}

static void send_fd(int sock, int fd)
{
	char byte = 'f', ctrl[CMSG_SPACE(sizeof(int))] = {0};
	struct iovec iov = {.iov_base = &byte, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl, .msg_controllen = sizeof(ctrl)};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	if (sendmsg(sock, &msg, 0) != 1)
		laz_die("sendmsg");
}

static int recv_fd(int sock)
{
	char byte, ctrl[CMSG_SPACE(sizeof(int))] = {0};
	struct iovec iov = {.iov_base = &byte, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctrl, .msg_controllen = sizeof(ctrl)};
	int fd = -1;

	if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1 || !CMSG_FIRSTHDR(&msg))
		laz_die("recvmsg");
	memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof(int));
	return fd;
}

static int sv_c[2], sv_d[2];

static void close_socks(void)
{
	close(sv_c[0]);
	close(sv_c[1]);
	close(sv_d[0]);
	close(sv_d[1]);
}

static void c_main(void)
{
	int fd = memfd_create("laz-late", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)(pages_of[LATE] * LAZ_PAGE)))
		_exit(90);
	reg[LATE] = map_fd(fd, pages_of[LATE]);
	stamp(LATE);
	send_fd(sv_c[1], fd);
	if (dup2(fd, 50) != 50) /* kept open: the object is reached through an fd too */
		_exit(92);
	close(fd);
	close_socks();
	laz_wait_usr2();
	int bad = check_all(1, 1);
	if (bad)
		_exit(bad);
	uint64_t got = 0;
	if (pread(50, &got, sizeof(got), LAZ_PAGE) != sizeof(got) || got != mark_of(LATE, 0))
		_exit(LATE * 16 + 6); /* P's write, read through C's fd */
	/* P's write into the deleted file's mapping, read through the inherited fd at its offset (moved by 8). */
	if (lseek(FILE_FD, LAZ_PAGE, SEEK_SET) != LAZ_PAGE || read(FILE_FD, &got, sizeof(got)) != sizeof(got) ||
	    got != mark_of(FILEM, 0))
		_exit(FILEM * 16 + 6);
	if (lseek(FILE_FD, FILE_POS + 8, SEEK_SET) != FILE_POS + 8)
		_exit(FILEM * 16 + 7);
	mark_all(1);
	_exit(0);
}

static void d_main(void)
{
	char path[64];

	snprintf(path, sizeof(path), "/dev/shm/laz-late-%d", (int)getpid());
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)(pages_of[LATEF] * LAZ_PAGE)))
		_exit(91);
	reg[LATEF] = map_fd(fd, pages_of[LATEF]);
	stamp(LATEF);
	send_fd(sv_d[1], fd);
	close(fd);
	unlink(path);
	close_socks();
	/* A description of FILE of its own, read-only: it must come back on the one recreated FILE too. */
	fd = open("/proc/self/fd/60", O_RDONLY | O_CLOEXEC); /* FILE_FD */
	if (fd < 0 || dup2(fd, FILE_FD + 2) != FILE_FD + 2 || close(fd))
		_exit(93);
	while (sem_wait(sem) && errno == EINTR)
		;
	int bad = check_all(2, 2);
	if (bad)
		_exit(bad);
	uint64_t got = 0;
	if (pread(FILE_FD + 2, &got, sizeof(got), LAZ_PAGE + 8) != sizeof(got) || got != mark_of(FILEM, 1))
		_exit(FILEM * 16 + 9); /* C's write into its mapping, read through D's own description */
	if (pread(FILE_FD + 1, &got, sizeof(got), LAZ_PAGE + 8) != sizeof(got) || got != mark_of(FILEM, 1) ||
	    !(fcntl(FILE_FD + 1, F_GETFL) & O_NOFOLLOW))
		_exit(FILEM * 16 + 10); /* ... and through the description C and D alone hold (P closed it) */
	mark_all(2);
	_exit(0);
}

/* fd FILE_FD is still the deleted file FILE (of its size, with its flags and offset) and it is the file mapped. */
static void check_file_fd(const char *path, off_t pos)
{
	char link[128] = {0}, want[96];
	struct stat st, mst;
	char fdpath[80];

	snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", FILE_FD);
	snprintf(want, sizeof(want), "%s (deleted)", path);
	ssize_t n = readlink(fdpath, link, sizeof(link) - 1);
	/* A restore recreates it in a private directory beside the old one: the basename and "(deleted)" stay. */
	const char *base = strrchr(want, '/');
	LAZ_CHECK(n > 0 && strlen(link) >= strlen(base) && !strcmp(link + strlen(link) - strlen(base), base),
		  "fd %d is %s, expected a link ending in %s", FILE_FD, n > 0 ? link : "?", base);
	LAZ_CHECK(fstat(FILE_FD, &st) == 0 && st.st_size == (off_t)(pages_of[FILEM] * LAZ_PAGE) && st.st_nlink == 0,
		  "fd %d: size %ld, %ld links", FILE_FD, (long)st.st_size, (long)st.st_nlink);
	int fl = fcntl(FILE_FD, F_GETFL), fdf = fcntl(FILE_FD, F_GETFD);
	LAZ_CHECK((fl & O_ACCMODE) == O_RDWR && (fl & O_NOFOLLOW) && (fdf & FD_CLOEXEC), "fd %d: flags %#o, fd flags %d",
		  FILE_FD, fl, fdf);
	LAZ_CHECK(lseek(FILE_FD, 0, SEEK_CUR) == pos, "fd %d: offset %ld, expected %ld", FILE_FD,
		  (long)lseek(FILE_FD, 0, SEEK_CUR), (long)pos);
	/* The same inode as the mapping: what the kernel shows for the mapping's file. */
	snprintf(fdpath, sizeof(fdpath), "/proc/self/map_files/%lx-%lx", (unsigned long)reg[FILEM],
		 (unsigned long)(reg[FILEM] + pages_of[FILEM] * LAZ_PAGE));
	LAZ_CHECK(stat(fdpath, &mst) == 0 && mst.st_ino == st.st_ino && mst.st_dev == st.st_dev,
		  "fd %d and the mapping of %s are two files", FILE_FD, path);
}

static pid_t spawn(void (*body)(void))
{
	pid_t p = fork();

	if (p < 0)
		laz_die("fork");
	if (p == 0)
		body();
	return p;
}

/* Whether pid is blocked in system call nr (from /proc/PID/syscall). */
static int in_syscall(pid_t pid, long nr)
{
	char path[64], buf[256] = {0};
	snprintf(path, sizeof(path), "/proc/%d/syscall", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return n > 0 && strtol(buf, NULL, 10) == nr;
}

static int status_of(pid_t p)
{
	int st = 0;
	pid_t got;

	do
		got = waitpid(p, &st, 0);
	while (got < 0 && errno == EINTR);
	if (got == p && WIFSIGNALED(st))
		return -WTERMSIG(st);
	return got == p && WIFEXITED(st) ? WEXITSTATUS(st) : -100;
}

static void child_ok(pid_t p, const char *name)
{
	int st = status_of(p);
	LAZ_CHECK(st == 0, "%s (%d) failed: status %d (negative: killed by that signal; region %s, check %d)", name, (int)p, st,
		  st > 0 && st / 16 < NREG ? names[st / 16] : "?", st > 0 ? st % 16 : -1);
}

int main(int argc, char **argv)
{
	char path[64];

	if (argc > 2)
		sysv_mode = !strcmp(argv[2], "sysv") ? 1 : !strcmp(argv[2], "sysvkeep") ? 2 : 0;

	laz_init(argc, argv);
	laz_points = POINTS;
	for (int r = SEM; r <= ANON; r++) {
		reg[r] = mmap(NULL, pages_of[r] * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (reg[r] == MAP_FAILED)
			laz_die("mmap shared anonymous");
	}
	sem = (sem_t *)reg[SEM];
	if (sem_init(sem, 1, 0))
		laz_die("sem_init");
	int fd = memfd_create("laz-shm", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)(pages_of[MEMFD] * LAZ_PAGE)))
		laz_die("memfd");
	reg[MEMFD] = map_fd(fd, pages_of[MEMFD]);
	close(fd);
	snprintf(path, sizeof(path), "/dev/shm/laz-shm-%d", (int)getpid());
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)(pages_of[FILEM] * LAZ_PAGE)))
		laz_die("open %s", path);
	reg[FILEM] = map_fd(fd, pages_of[FILEM]);
	if (dup3(fd, FILE_FD, O_CLOEXEC) != FILE_FD || lseek(FILE_FD, FILE_POS, SEEK_SET) != FILE_POS)
		laz_die("fd %d", FILE_FD);
	close(fd);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 || dup3(fd, FILE_FD + 1, O_CLOEXEC) != FILE_FD + 1 || close(fd))
		laz_die("fd %d", FILE_FD + 1);
	unlink(path);
	for (int r = ANON; r <= FILEM; r++)
		stamp(r);
	if (sysv_mode) {
		sysv_id = shmget(IPC_PRIVATE, pages_of[SYSVR] * LAZ_PAGE, IPC_CREAT | 0640);
		reg[SYSVR] = sysv_id < 0 ? (void *)-1 : shmat(sysv_id, NULL, 0);
		struct shmid_ds ds;
		if (reg[SYSVR] == (void *)-1 || shmctl(sysv_id, IPC_STAT, &ds))
			laz_die("shmget/shmat");
		ds.shm_perm.uid = 4321; /* another owner than its creator's */
		ds.shm_perm.gid = 4322;
		if (shmctl(sysv_id, IPC_SET, &ds) || (sysv_mode == 1 && shmctl(sysv_id, IPC_RMID, NULL)))
			laz_die("shmctl");
		laz_log("# sysv %d", sysv_id);
		stamp(SYSVR);
	}
	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv_c) ||
	    socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv_d))
		laz_die("socketpair");
	pid_t c = spawn(c_main);
	pid_t d = spawn(d_main);
	close(FILE_FD + 1); /* held by C and D alone: restored by a task the object is given to */
	fd = recv_fd(sv_c[0]);
	reg[LATE] = map_fd(fd, pages_of[LATE]);
	close(fd);
	fd = recv_fd(sv_d[0]);
	reg[LATEF] = map_fd(fd, pages_of[LATEF]);
	close(fd);
	close_socks();
	int i;
	for (i = 0; i < 5000 && !(in_syscall(c, SYS_rt_sigsuspend) && in_syscall(d, SYS_futex)); i++)
		usleep(1000);
	if (i == 5000)
		laz_die("children not in their waits");
	laz_log("# tree: c %d d %d", (int)c, (int)d);
	laz_ready(POINTS);
	laz_wait_usr2();

	if (laz_corrupt("content"))
		((uint64_t *)(reg[MEMFD] + 2 * LAZ_PAGE))[7] ^= 1;
	int bad = check_all(0, 0);
	LAZ_CHECK(!bad, "root: region %s (check %d) is not as before the dump", names[bad / 16], bad % 16);
	check_file_fd(path, FILE_POS);
	mark_all(0);
	if (laz_corrupt("share"))
		((uint64_t *)(reg[ANON] + LAZ_PAGE))[0] = word_of(ANON, 1); /* as if C had its own copy */
	kill(c, SIGUSR2);
	child_ok(c, "c");
	LAZ_CHECK(lseek(FILE_FD, 0, SEEK_CUR) == FILE_POS + 8, "fd %d: offset %ld after c moved it to %d: not one "
		  "description", FILE_FD, (long)lseek(FILE_FD, 0, SEEK_CUR), FILE_POS + 8);
	if (!bad) {
		bad = check_all(0, 2);
		LAZ_CHECK(!bad, "root: region %s (check %d): c's write not seen", names[bad / 16], bad % 16);
	}
	if (sem_post(sem))
		laz_failf("sem_post: %s", strerror(errno));
	child_ok(d, "d");
	if (!bad) {
		bad = check_all(0, 3);
		LAZ_CHECK(!bad, "root: region %s (check %d): d's write not seen", names[bad / 16], bad % 16);
	}
	if (sysv_mode) {
		struct shmid_ds ds;
		/* The same id as before the dump, its mode, removed or not as it was, attached by this one alone. */
		LAZ_CHECK(shmctl(sysv_id, IPC_STAT, &ds) == 0, "shmctl(IPC_STAT) of segment %d: %s", sysv_id,
			  strerror(errno));
		LAZ_CHECK(ds.shm_perm.uid == 4321 && ds.shm_perm.gid == 4322, "segment %d: owner %d:%d, expected 4321:4322",
			  sysv_id, (int)ds.shm_perm.uid, (int)ds.shm_perm.gid);
		LAZ_CHECK((ds.shm_perm.mode & 0777) == 0640 && ds.shm_segsz == pages_of[SYSVR] * LAZ_PAGE &&
				  ds.shm_nattch == 1 && !!(ds.shm_perm.mode & SHM_DEST) == (sysv_mode == 1),
			  "segment %d: mode %o, size %zu, %lu attaches", sysv_id, ds.shm_perm.mode,
			  (size_t)ds.shm_segsz, (unsigned long)ds.shm_nattch);
		if (sysv_mode == 2)
			shmctl(sysv_id, IPC_RMID, NULL);
	}
	laz_finish();
}
