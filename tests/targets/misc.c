/*
 * misc.c - exercises per-process and per-task odds and ends: umask (027), the working
 * directory (a temp dir), the task name (PR_SET_NAME "laz-misc"), rlimits (RLIMIT_NOFILE and
 * RLIMIT_CORE soft below hard), personality (ADDR_COMPAT_LAYOUT, harmless to a running
 * process), a robust futex list head of its own (get_robust_list), set_tid_address to a
 * variable of its own (PR_GET_TID_ADDRESS), the timer slack, glibc's rseq registration (the
 * kernel must still update the rseq area's cpu_id: it is overwritten with garbage, the task
 * sleeps, and the kernel must have rewritten it), the pid, session and process group, the
 * credentials, /proc/self/cmdline, environ, exe and auxv (AT_RANDOM bytes included).
 *
 * Credentials: started as root, it drops to ids of its own before READY, none of them the restorer's (root)
 * and real, effective and saved all different (uids 2001/2002/2003, gids 1001/1002/1003, groups 1004 1005),
 * so that a restore which kept the restorer's, or mixed them up, fails. Started unprivileged (the non-root
 * test), it keeps what it was given.
 *
 * Session and group: it leads both (the harness starts it in a new session), and must lead both again: the
 * same ids, and its own. (A process in a session another process leads is another case: refused, or with
 * `dump --shell-job` put into the restorer's session; tests/test_membership.py covers it.)
 *
 * Usage: misc LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <linux/futex.h>
#include <sched.h>
#include <grp.h>
#include <sys/auxv.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

#define PERSONA (PER_LINUX | ADDR_COMPAT_LAYOUT)
#define SLACK_NS 123456UL
#define NOFILE_SOFT 200
#define CORE_SOFT (64UL * 1024)
#define RSEQ_SIG 0x53053053

static const char POINTS[] =
	"umask cwd comm rlimit personality robust tid_address timerslack rseq session creds cmdline "
	"environ exe auxv";

static struct robust_list_head robust_head;
static int tid_word;
static char cwd_path[PATH_MAX];
static struct stat cwd_stat;
static struct rlimit nofile, core;
static pid_t pid0, sid0, pgid0;
static uid_t ruid, euid, suid;
static gid_t rgid, egid, sgid;
static gid_t groups0[16];
static int ngroups0;
static char cmdline0[4096], environ0[16384], exe0[PATH_MAX], auxv0[1024], random0[16];
static ssize_t cmdline0_len, environ0_len, auxv0_len;

static struct rseq *rseq_area(void)
{
	return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

static void setup(void)
{
	char dir[PATH_MAX];
	ssize_t n;

	umask(027);
	laz_tmpfile("cwd", dir, sizeof(dir));
	if (mkdir(dir, 0700) && errno != EEXIST)
		laz_die("mkdir %s", dir);
	if (chmod(dir, 0755)) /* still usable once the ids below are not root's */
		laz_die("chmod %s", dir);
	if (chdir(dir) || !getcwd(cwd_path, sizeof(cwd_path)) || stat(".", &cwd_stat))
		laz_die("chdir %s", dir);
	if (prctl(PR_SET_NAME, "laz-misc", 0, 0, 0))
		laz_die("PR_SET_NAME");

	getrlimit(RLIMIT_NOFILE, &nofile);
	nofile.rlim_cur = NOFILE_SOFT;
	getrlimit(RLIMIT_CORE, &core);
	core.rlim_cur = CORE_SOFT;
	if (setrlimit(RLIMIT_NOFILE, &nofile) || setrlimit(RLIMIT_CORE, &core))
		laz_die("setrlimit");
	if (personality(PERSONA) < 0 || personality(0xffffffff) != PERSONA)
		laz_die("personality");

	robust_head.list.next = &robust_head.list;
	robust_head.futex_offset = 0;
	robust_head.list_op_pending = NULL;
	if (syscall(SYS_set_robust_list, &robust_head, sizeof(robust_head)))
		laz_die("set_robust_list");
	tid_word = (int)syscall(SYS_set_tid_address, &tid_word);
	if (prctl(PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0))
		laz_die("PR_SET_TIMERSLACK");
	if (__rseq_size == 0)
		laz_die("glibc did not register rseq");

	pid0 = getpid();
	sid0 = getsid(0);
	pgid0 = getpgrp();
	if (getuid() == 0) {
		static const gid_t groups[2] = { 1004, 1005 };

		/* The log is opened as root; hand it to the uid we become, or a restore, which opens files only as
		 * the restored credentials could, refuses it as a file opened before dropping privileges. */
		if (fchown(laz_log_fd, 2002, 1002))
			laz_die("fchown log");
		/* gids before uids: once the uids are not root, the gids can no longer change */
		if (setgroups(2, groups) || setresgid(1001, 1002, 1003) || setresuid(2001, 2002, 2003))
			laz_die("drop to uids 2001/2002/2003 gids 1001/1002/1003");
		/* changing ids made it non-dumpable: /proc/self/{environ,auxv} would be root's, unreadable to it */
		if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0))
			laz_die("PR_SET_DUMPABLE");
	}
	getresuid(&ruid, &euid, &suid);
	getresgid(&rgid, &egid, &sgid);
	ngroups0 = getgroups(16, groups0);
	if (ngroups0 < 0)
		laz_die("getgroups");
	cmdline0_len = laz_slurp("/proc/self/cmdline", cmdline0, sizeof(cmdline0));
	environ0_len = laz_slurp("/proc/self/environ", environ0, sizeof(environ0));
	auxv0_len = laz_slurp("/proc/self/auxv", auxv0, sizeof(auxv0));
	n = readlink("/proc/self/exe", exe0, sizeof(exe0) - 1);
	if (cmdline0_len <= 0 || environ0_len < 0 || auxv0_len <= 0 || n <= 0)
		laz_die("read /proc/self");
	exe0[n] = '\0';
	memcpy(random0, (void *)getauxval(AT_RANDOM), sizeof(random0));
}

static void corrupt(char **argv)
{
	if (laz_corrupt("umask"))
		umask(022);
	if (laz_corrupt("cwd") && chdir("/"))
		laz_die("chdir /");
	if (laz_corrupt("comm"))
		prctl(PR_SET_NAME, "laz-other", 0, 0, 0);
	if (laz_corrupt("rlimit")) {
		struct rlimit r = nofile;

		r.rlim_cur--;
		setrlimit(RLIMIT_NOFILE, &r);
	}
	if (laz_corrupt("personality"))
		personality(PER_LINUX);
	if (laz_corrupt("robust"))
		syscall(SYS_set_robust_list, &robust_head.list_op_pending, sizeof(robust_head));
	if (laz_corrupt("tid_address"))
		syscall(SYS_set_tid_address, &robust_head);
	if (laz_corrupt("timerslack"))
		prctl(PR_SET_TIMERSLACK, SLACK_NS + 1, 0, 0, 0);
	if (laz_corrupt("rseq") && syscall(SYS_rseq, rseq_area(), 32, RSEQ_FLAG_UNREGISTER, RSEQ_SIG))
		laz_die("rseq unregister");
	if (laz_corrupt("session"))
		sid0++;
	if (laz_corrupt("creds") && setresgid(sgid, egid, rgid)) /* allowed unprivileged: r and s swapped */
		laz_die("setresgid");
	if (laz_corrupt("cmdline"))
		argv[0][0] ^= 1;
	if (laz_corrupt("environ"))
		environ0[0] ^= 1;
	if (laz_corrupt("exe"))
		exe0[1] ^= 1;
	if (laz_corrupt("auxv"))
		((volatile char *)getauxval(AT_RANDOM))[3] ^= 1;
}

static void check_rseq(void)
{
	volatile struct rseq *rs = rseq_area();
	long ncpu = sysconf(_SC_NPROCESSORS_CONF);
	unsigned int cpu = ~0u, i;

	/* The kernel rewrites cpu_id on the way back to user space after a context switch. */
	for (i = 0; i < 20; i++) {
		rs->cpu_id = 0xfffffff0u;
		rs->cpu_id_start = 0xfffffff0u;
		usleep(2000);
		if (rs->cpu_id != 0xfffffff0u)
			break;
	}
	if (rs->cpu_id == 0xfffffff0u) {
		laz_failf("rseq: the kernel no longer updates the rseq area at %p (not registered)", (void *)rs);
		return;
	}
	LAZ_CHECK((long)rs->cpu_id < ncpu && rs->cpu_id_start == rs->cpu_id, "rseq: cpu_id %u cpu_id_start %u",
		  rs->cpu_id, rs->cpu_id_start);
	for (i = 0; i < 20; i++) {
		unsigned int a = rs->cpu_id;

		if (syscall(SYS_getcpu, &cpu, NULL, NULL) == 0 && cpu == a && rs->cpu_id == a)
			break;
	}
	LAZ_CHECK(i < 20, "rseq: cpu_id %u disagrees with getcpu() %u", rs->cpu_id, cpu);
	LAZ_CHECK(sched_getcpu() >= 0 && sched_getcpu() < ncpu, "sched_getcpu() = %d", sched_getcpu());
}

static void check_proc(const char *what, const char *path, const char *want, ssize_t want_len)
{
	static char buf[16384];
	ssize_t n = laz_slurp(path, buf, sizeof(buf));

	if (n != want_len || memcmp(buf, want, (size_t)n) != 0)
		laz_failf("%s differs (%zd bytes, expected %zd)", what, n, want_len);
}

static void verify(void)
{
	char buf[PATH_MAX], name[32] = "";
	struct stat st;
	struct rlimit r;
	void *head = NULL, *tidp = NULL;
	size_t len = 0;
	mode_t m = umask(0);
	unsigned long slack;
	uid_t u[3];
	gid_t g[3];
	ssize_t n;

	umask(m);
	LAZ_CHECK(m == 027, "umask %03o, expected 027", (unsigned int)m);
	if (!getcwd(buf, sizeof(buf)) || strcmp(buf, cwd_path) != 0)
		laz_failf("cwd '%s', expected '%s'", buf, cwd_path);
	else if (stat(".", &st) || st.st_ino != cwd_stat.st_ino || st.st_dev != cwd_stat.st_dev)
		laz_failf("cwd is another directory with the same name");
	prctl(PR_GET_NAME, name, 0, 0, 0);
	LAZ_CHECK(strcmp(name, "laz-misc") == 0, "task name '%s', expected 'laz-misc'", name);
	n = laz_slurp("/proc/self/comm", buf, sizeof(buf) - 1);
	LAZ_CHECK(n == 9 && memcmp(buf, "laz-misc\n", 9) == 0, "/proc/self/comm differs");

	getrlimit(RLIMIT_NOFILE, &r);
	LAZ_CHECK(r.rlim_cur == nofile.rlim_cur && r.rlim_max == nofile.rlim_max,
		  "RLIMIT_NOFILE %lu/%lu, expected %lu/%lu", (unsigned long)r.rlim_cur, (unsigned long)r.rlim_max,
		  (unsigned long)nofile.rlim_cur, (unsigned long)nofile.rlim_max);
	getrlimit(RLIMIT_CORE, &r);
	LAZ_CHECK(r.rlim_cur == core.rlim_cur && r.rlim_max == core.rlim_max, "RLIMIT_CORE %lu/%lu, expected %lu/%lu",
		  (unsigned long)r.rlim_cur, (unsigned long)r.rlim_max, (unsigned long)core.rlim_cur,
		  (unsigned long)core.rlim_max);
	LAZ_CHECK(personality(0xffffffff) == PERSONA, "personality %#x, expected %#x", personality(0xffffffff),
		  PERSONA);

	if (syscall(SYS_get_robust_list, 0, &head, &len))
		laz_failf("get_robust_list: %s", strerror(errno));
	else
		LAZ_CHECK(head == &robust_head && len == sizeof(robust_head), "robust list %p/%zu, expected %p/%zu",
			  head, len, (void *)&robust_head, sizeof(robust_head));
	if (prctl(PR_GET_TID_ADDRESS, &tidp, 0, 0, 0))
		laz_failf("PR_GET_TID_ADDRESS: %s", strerror(errno));
	else
		LAZ_CHECK(tidp == &tid_word, "clear_child_tid %p, expected %p", tidp, (void *)&tid_word);
	slack = (unsigned long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
	LAZ_CHECK(slack == SLACK_NS, "timer slack %lu ns, expected %lu", slack, SLACK_NS);
	check_rseq();

	LAZ_CHECK(getpid() == pid0 && syscall(SYS_gettid) == pid0, "pid %d tid %ld, expected %d", getpid(),
		  syscall(SYS_gettid), pid0);
	LAZ_CHECK(getsid(0) == sid0 && getpgrp() == pgid0, "session %d pgrp %d, expected %d %d", getsid(0),
		  getpgrp(), sid0, pgid0);
	LAZ_CHECK(getpgrp() == getpid() && getsid(0) == getpid(), "pgrp %d session %d: should lead both",
		  getpgrp(), getsid(0));
	getresuid(&u[0], &u[1], &u[2]);
	getresgid(&g[0], &g[1], &g[2]);
	LAZ_CHECK(u[0] == ruid && u[1] == euid && u[2] == suid, "uids %u/%u/%u, expected %u/%u/%u", u[0], u[1], u[2],
		  ruid, euid, suid);
	LAZ_CHECK(g[0] == rgid && g[1] == egid && g[2] == sgid, "gids %u/%u/%u, expected %u/%u/%u", g[0], g[1], g[2],
		  rgid, egid, sgid);
	{
		gid_t now[16];
		int n_now = getgroups(16, now);

		LAZ_CHECK(n_now == ngroups0 && memcmp(now, groups0, sizeof(gid_t) * (size_t)(n_now > 0 ? n_now : 0)) == 0,
			  "supplementary groups differ (%d, expected %d)", n_now, ngroups0);
	}

	check_proc("/proc/self/cmdline", "/proc/self/cmdline", cmdline0, cmdline0_len);
	check_proc("/proc/self/environ", "/proc/self/environ", environ0, environ0_len);
	check_proc("/proc/self/auxv", "/proc/self/auxv", auxv0, auxv0_len);
	LAZ_CHECK(memcmp((void *)getauxval(AT_RANDOM), random0, sizeof(random0)) == 0, "AT_RANDOM bytes differ");
	n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
	buf[n > 0 ? n : 0] = '\0';
	LAZ_CHECK(strcmp(buf, exe0) == 0, "/proc/self/exe is '%s', expected '%s'", buf, exe0);
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	setup();
	laz_ready(POINTS);

	laz_wait_usr2();

	corrupt(argv);
	verify();
	laz_finish();
}
