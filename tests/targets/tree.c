/*
 * tree.c - exercises a process tree: parent links, sessions, process groups, zombies, a stopped child, a
 * parent-death signal, a child subreaper, threads, and memory of every process, each process checking itself
 * after the restore.
 *
 *   tree LOGFILE [share|resession|shm|clonefiles|clonefs|kmsg]
 *
 *   root (session and group leader, started by the harness in a new session)
 *   |-- a       plain child, a copy-on-write buffer of the root's and one of its own
 *   |   `-- g   grandchild, member of b's process group (a group whose leader is another task)
 *   |-- b       leader of its own process group
 *   |-- c       leader of a session of its own (setsid), and a child subreaper (PR_SET_CHILD_SUBREAPER)
 *   |   `-- e   an orphan c adopted: its parent d (c's child) exited after forking it
 *   |-- z       zombie: exited with status 42, not reaped before the dump
 *   |-- y       zombie: killed by SIGTERM
 *   |-- s       stopped (SIGSTOP) at the dump; the root sends SIGCONT after the restore and sees it run
 *   `-- p       PR_SET_PDEATHSIG(SIGHUP), and a second thread (its tid and thread-local value checked)
 *
 * Readiness goes up through pipes (end-of-file: the child closed its end) that every process closes before READY (pipes between processes are not
 * dumped yet); results come back as exit statuses: after the root's SIGUSR2 it sends SIGUSR2 to each live
 * child (a to g), each checks its pid, ppid, pgid, sid, parent-death signal and memory, and exits 0 or 1;
 * the root reaps them all, reaps the zombie expecting status 42, and writes PASS only if every one passed.
 * Each child opens the log itself (its own open file description) and /dev/null for its stdio.
 *
 *   shm        the root maps shared anonymous memory before forking: every child maps it too (restored as
 *              one object, tests/test_tree.py)
 *
 * Trees a dump must refuse, naming the pids (the tree runs on and passes all the same):
 *   share      the root keeps the read end of a pipe whose write end b holds (a pipe between processes)
 *   resession  a calls setsid() after forking g: g is in the root's session but its parent is not
 *   clonefiles the root also has a child made by clone(CLONE_FILES): one fd table for both
 *   clonefs    the same with clone(CLONE_FS): one working directory, root and umask
 *   kmsg       b holds /dev/kmsg open (a character device a dump refuses, met once the root is dumped)
 */
#include "common.h"

#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define SIZE (64 * LAZ_PAGE)
#define SEED 0x7ee5ULL
#define ZOMBIE_EXIT 42
#define POINTS "child grandchild zombie"

static unsigned char *shared_cow; /* filled by the root before any fork: every process checks it */
static unsigned char *own;        /* filled by each process with its own seed */

struct who {
	pid_t pid, ppid, pgid, sid;
	int pdeathsig;
};


static struct who whoami(void)
{
	struct who w = {getpid(), getppid(), getpgid(0), getsid(0), 0};

	prctl(PR_GET_PDEATHSIG, &w.pdeathsig);
	return w;
}

/* In a child after the trigger: is everything as it was set up? Logs what differs; returns 0 if all is. */
static int check_self(const char *name, const struct who *want, const char *corrupt_point)
{
	struct who now = whoami();
	int bad = 0;

	if (corrupt_point && laz_corrupt(corrupt_point))
		own[7] ^= 1;
#define SAME(f)                                                                                          \
	if (now.f != want->f) {                                                                           \
		laz_log("# %s: " #f " %d, expected %d", name, (int)now.f, (int)want->f);                 \
		bad = 1;                                                                                 \
	}
	SAME(pid) SAME(ppid) SAME(pgid) SAME(sid) SAME(pdeathsig)
#undef SAME
	long off = laz_find_mismatch(shared_cow, SIZE, SEED);
	if (off >= 0) {
		laz_log("# %s: copy-on-write buffer differs at %ld", name, off);
		bad = 1;
	}
	off = laz_find_mismatch(own, SIZE, SEED + (uint64_t)now.pid);
	if (off >= 0) {
		laz_log("# %s: own buffer differs at %ld", name, off);
		bad = 1;
	}
	if (bad)
		laz_log("# %s: FAILED", name);
	return bad;
}

/* A child's life after fork: set up, report ready through `ready`, wait for the trigger, check, exit. */
static int inherited_ready = -1; /* a's own ready pipe, inherited by g */

static void setup_p(void);
static int check_p_thread(void);

static void child_main(const char *name, int ready, void (*setup)(void), const char *point)
{
	if (inherited_ready >= 0)
		close(inherited_ready);
	laz_child_own_stdio();
	laz_usr2_seen = 0;
	if (setup)
		setup();
	laz_fill(own, SIZE, SEED + (uint64_t)getpid());
	struct who want = whoami();
	close(ready); /* the parent reads end-of-file once every copy of it is closed */
	laz_wait_usr2();
	int bad = check_self(name, &want, point);
	if (setup == setup_p)
		bad |= check_p_thread();
	_exit(bad);
}

static pid_t b_pid; /* g joins b's group */
static pid_t g_pid;
static const char *mode = "";
static int share_pipe[2] = {-1, -1};

static void setup_b(void)
{
	if (setpgid(0, 0))
		laz_die("setpgid b");
	if (share_pipe[0] >= 0)
		close(share_pipe[0]); /* b keeps the write end */
	if (!strcmp(mode, "kmsg") && open("/dev/kmsg", O_RDONLY) < 0)
		laz_die("open /dev/kmsg");
}

static pid_t c_pid;

static void setup_e(void)
{
	while (getppid() != c_pid) /* until d has exited and e is c's */
		usleep(1000);
}

static __thread uint64_t tls_value;
static volatile pid_t p_thread_tid;
static volatile uint64_t p_thread_saw;
static volatile int p_thread_go;

static void *p_thread(void *arg)
{
	(void)arg;
	tls_value = 0x7ee5beefULL;
	p_thread_tid = (pid_t)syscall(SYS_gettid);
	while (!p_thread_go)
		usleep(2000);
	p_thread_saw = tls_value;
	return NULL;
}

static pthread_t p_thr;

static void setup_p(void)
{
	if (prctl(PR_SET_PDEATHSIG, SIGHUP))
		laz_die("PR_SET_PDEATHSIG");
	if (pthread_create(&p_thr, NULL, p_thread, NULL))
		laz_die("pthread_create");
	while (!p_thread_tid)
		usleep(1000);
}

/* p after the trigger: its thread is still there with its id, and reads its own thread-local value. */
static int check_p_thread(void)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/self/task/%d", (int)p_thread_tid);
	if (access(path, F_OK)) {
		laz_log("# p: thread %d is gone", (int)p_thread_tid);
		return 1;
	}
	p_thread_go = 1;
	if (pthread_join(p_thr, NULL) || p_thread_saw != 0x7ee5beefULL) {
		laz_log("# p: thread %d saw thread-local value %#llx", (int)p_thread_tid,
			(unsigned long long)p_thread_saw);
		return 1;
	}
	return 0;
}

static void setup_g(void)
{
	if (setpgid(0, b_pid))
		laz_die("setpgid g into %d", (int)b_pid);
}

/* a: forks g, and after its own trigger passes one to g and counts g's result with its own. */
static void a_main(int ready)
{
	int gp[2];
	char c;

	laz_child_own_stdio();
	laz_usr2_seen = 0;
	laz_fill(own, SIZE, SEED + (uint64_t)getpid());
	if (pipe(gp))
		laz_die("pipe a");
	inherited_ready = ready;
	g_pid = fork();
	if (g_pid < 0)
		laz_die("fork g");
	if (g_pid == 0) {
		close(gp[0]);
		child_main("g", gp[1], setup_g, "grandchild");
	}
	close(gp[1]);
	if (read(gp[0], &c, 1) != 0)
		laz_die("g not ready");
	close(gp[0]);
	if (!strcmp(mode, "resession") && setsid() < 0)
		laz_die("setsid a");
	struct who want = whoami();
	close(ready);
	laz_wait_usr2();
	int bad = check_self("a", &want, NULL);
	int st = 0;
	kill(g_pid, SIGUSR2);
	if (waitpid(g_pid, &st, 0) != g_pid || !WIFEXITED(st) || WEXITSTATUS(st)) {
		laz_log("# a: grandchild %d ended with status %#x", (int)g_pid, st);
		bad = 1;
	}
	_exit(bad);
}

/* c: a session of its own, a subreaper; forks d, which forks e and exits: e is c's orphan. */
static void c_main(int ready)
{
	int ep[2];
	int32_t e_pid = 0;
	char c;

	laz_child_own_stdio();
	laz_usr2_seen = 0;
	if (setsid() < 0)
		laz_die("setsid c");
	if (prctl(PR_SET_CHILD_SUBREAPER, 1))
		laz_die("PR_SET_CHILD_SUBREAPER");
	c_pid = getpid();
	laz_fill(own, SIZE, SEED + (uint64_t)getpid());
	if (pipe(ep))
		laz_die("pipe c");
	inherited_ready = ready;
	pid_t d = fork();
	if (d < 0)
		laz_die("fork d");
	if (d == 0) {
		close(ep[0]);
		inherited_ready = -1;
		close(ready);
		int32_t e = fork();
		if (e == 0)
			child_main("e", ep[1], setup_e, NULL);
		if (e < 0 || write(ep[1], &e, sizeof(e)) != sizeof(e))
			_exit(7);
		_exit(0);
	}
	close(ep[1]);
	int st = 0;
	if (waitpid(d, &st, 0) != d || !WIFEXITED(st) || WEXITSTATUS(st))
		laz_die("d ended with %#x", st);
	if (read(ep[0], &e_pid, sizeof(e_pid)) != sizeof(e_pid) || read(ep[0], &c, 1) != 0)
		laz_die("e not ready");
	close(ep[0]);
	struct who want = whoami();
	close(ready);
	laz_wait_usr2();
	int bad = check_self("c", &want, NULL);
	int sub = 0;
	if (prctl(PR_GET_CHILD_SUBREAPER, &sub) || sub != 1) {
		laz_log("# c: child subreaper %d", sub);
		bad = 1;
	}
	kill(e_pid, SIGUSR2);
	st = 0;
	if (waitpid(e_pid, &st, 0) != e_pid || !WIFEXITED(st) || WEXITSTATUS(st)) {
		laz_log("# c: orphan %d ended with status %#x", (int)e_pid, st);
		bad = 1;
	}
	_exit(bad);
}

static char cf_stack[64 * 1024];

static int cf_main(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return 0;
}

static pid_t spawn(const char *name, void (*setup)(void), const char *point, void (*own_main)(int))
{
	int p[2];
	char c;

	if (pipe(p))
		laz_die("pipe");
	pid_t pid = fork();
	if (pid < 0)
		laz_die("fork %s", name);
	if (pid == 0) {
		close(p[0]);
		if (own_main)
			own_main(p[1]);
		child_main(name, p[1], setup, point);
	}
	close(p[1]);
	if (read(p[0], &c, 1) != 0)
		laz_die("%s not ready", name);
	close(p[0]);
	return pid;
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	laz_points = POINTS; /* declared before the forks: each child checks its own point */
	shared_cow = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	own = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (shared_cow == MAP_FAILED || own == MAP_FAILED)
		laz_die("mmap");
	laz_fill(shared_cow, SIZE, SEED);
	laz_fill(own, SIZE, SEED + (uint64_t)getpid());
	struct who root_want = whoami();
	if (argc > 2)
		mode = argv[2];
	if (!strcmp(mode, "share") && pipe(share_pipe))
		laz_die("pipe share");
	if (!strcmp(mode, "shm") &&
	    mmap(NULL, LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
		laz_die("mmap shared");

	b_pid = spawn("b", setup_b, "child", NULL);
	if (share_pipe[1] >= 0) {
		close(share_pipe[1]); /* the root keeps the read end */
		share_pipe[1] = -1;
	}
	pid_t a = spawn("a", NULL, NULL, a_main);
	pid_t c = spawn("c", NULL, NULL, c_main);
	pid_t p = spawn("p", setup_p, NULL, NULL);

	pid_t z = fork();
	if (z < 0)
		laz_die("fork z");
	if (z == 0)
		_exit(ZOMBIE_EXIT);
	siginfo_t si;
	if (waitid(P_PID, (id_t)z, &si, WEXITED | WNOWAIT)) /* exited, and left unreaped */
		laz_die("waitid z");
	pid_t y = fork();
	if (y < 0)
		laz_die("fork y");
	if (y == 0) {
		signal(SIGTERM, SIG_DFL);
		raise(SIGTERM);
		_exit(9);
	}
	if (waitid(P_PID, (id_t)y, &si, WEXITED | WNOWAIT))
		laz_die("waitid y");

	pid_t cf = -1;
	if (!strcmp(mode, "clonefiles") || !strcmp(mode, "clonefs")) {
		int flags = !strcmp(mode, "clonefs") ? CLONE_FS : CLONE_FILES;
		cf = clone(cf_main, cf_stack + sizeof(cf_stack), flags | SIGCHLD, NULL);
		if (cf < 0)
			laz_die("clone CLONE_FILES");
	}

	pid_t s = spawn("s", NULL, NULL, NULL);
	kill(s, SIGSTOP);
	int st = 0;
	if (waitpid(s, &st, WUNTRACED) != s || !WIFSTOPPED(st))
		laz_die("s did not stop");
	laz_log("# tree: a %d (g), b %d, c %d (e), p %d, zombies %d %d, stopped %d", (int)a, (int)b_pid, (int)c,
		(int)p, (int)z, (int)y, (int)s);

	laz_ready(POINTS);
	laz_wait_usr2();

	struct who now = whoami();
	/* Not its ppid: the root's parent is whoever restored it. */
	LAZ_CHECK(now.pid == root_want.pid && now.pgid == root_want.pgid && now.sid == root_want.sid,
		  "root pid/pgid/sid %d/%d/%d, expected %d/%d/%d", now.pid, now.pgid, now.sid, root_want.pid,
		  root_want.pgid, root_want.sid);
	long off = laz_find_mismatch(shared_cow, SIZE, SEED);
	LAZ_CHECK(off < 0, "root copy-on-write buffer differs at %ld", off);
	off = laz_find_mismatch(own, SIZE, SEED + (uint64_t)now.pid);
	LAZ_CHECK(off < 0, "root own buffer differs at %ld", off);

	/* The zombie: still a zombie, and its status is the one it exited with. */
	char path[64], stat[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)z);
	ssize_t n = laz_slurp(path, stat, sizeof(stat));
	char *rp = n > 0 ? strrchr(stat, ')') : NULL;
	LAZ_CHECK(rp && rp[2] == 'Z', "child %d is not a zombie after the restore", (int)z);
	int want_zombie = ZOMBIE_EXIT;
	if (laz_corrupt("zombie"))
		want_zombie++;
	st = 0;
	LAZ_CHECK(waitpid(z, &st, WNOHANG) == z && WIFEXITED(st) && WEXITSTATUS(st) == want_zombie,
		  "zombie %d reaped with status %#x, expected exit %d", (int)z, st, want_zombie);
	st = 0;
	LAZ_CHECK(waitpid(y, &st, WNOHANG) == y && WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM,
		  "zombie %d reaped with status %#x, expected killed by SIGTERM", (int)y, st);

	/* The stopped child: still stopped; SIGCONT makes it run again. */
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)s);
	n = laz_slurp(path, stat, sizeof(stat));
	rp = n > 0 ? strrchr(stat, ')') : NULL;
	LAZ_CHECK(rp && rp[2] == 'T', "child %d is not stopped after the restore (state %c)", (int)s, rp ? rp[2] : '?');
	kill(s, SIGCONT);
	st = 0;
	LAZ_CHECK(waitpid(s, &st, WCONTINUED) == s && WIFCONTINUED(st), "child %d: no continue report (%#x)", (int)s,
		  st);

	pid_t kids[] = {a, b_pid, c, p, s};
	const char *names[] = {"a", "b", "c", "p", "s"};
	for (size_t i = 0; i < sizeof(kids) / sizeof(kids[0]); i++)
		kill(kids[i], SIGUSR2);
	for (size_t i = 0; i < sizeof(kids) / sizeof(kids[0]); i++) {
		st = 0;
		pid_t got;
		do
			got = waitpid(kids[i], &st, 0);
		while (got == kids[i] && !WIFEXITED(st) && !WIFSIGNALED(st));
		LAZ_CHECK(got == kids[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %s (%d) ended with status %#x",
			  names[i], (int)kids[i], st);
	}
	if (cf > 0) {
		kill(cf, SIGKILL);
		waitpid(cf, &st, 0);
	}
	laz_finish();
}
