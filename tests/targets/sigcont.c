/*
 * sigcont.c - exercises blocked SIGCONTs left pending, once on the process queue and once on the thread queue,
 * which must still be pending after a dump (--leave-running or failed: in the original; else in the restored
 * copy), each with its own siginfo. The dump stops the process with SIGSTOP, and generating a stop signal discards every
 * pending SIGCONT (kernel/signal.c prepare_signal); the SIGCONT that ends the dump's stop must not be left
 * pending in their place either (it would name the dump's pid).
 *
 * Setup: SIGCONT blocked; sigqueue(self, SIGCONT, value 4711) (process queue, SI_QUEUE) and tgkill(self,
 * SIGCONT) (thread queue, SI_TKILL), both with si_pid = its own pid.
 * Checks: /proc/self/status ShdPnd and SigPnd both hold SIGCONT; sigtimedwait takes the thread's one first
 * (SI_TKILL, si_pid), then the process's (SI_QUEUE, value 4711, si_pid), then none is left.
 *
 * Mode "none" (argv[2]): SIGCONT blocked and none pending; it must still have none (the SIGCONT that ends the
 * dump's stop is not the program's).
 * Mode "thread": as the default, and a second thread (blocked in read() on a pipe) has a SIGCONT of its own
 * pending (tgkill from the main thread: SI_TKILL, si_pid); asked through the pipe, it takes it (and finds no
 * other) and answers.
 *
 * Usage: sigcont LOGFILE [none|thread]
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <pthread.h>
#include <sys/syscall.h>

static const char POINTS[] = "thread shared";

static pid_t me;
static int none, threaded;
static int req[2], resp[2];
static volatile pid_t worker_tid;

static int take(siginfo_t *si);

/* The second thread: on each request byte, take its SIGCONTs and answer (signo, code, pid) of the first and
 * whether a second one was there. */
static void *worker(void *arg)
{
	char c;
	siginfo_t si, more;
	int ans[4];

	(void)arg;
	worker_tid = (pid_t)syscall(SYS_gettid);
	while (read(req[0], &c, 1) == 1) {
		ans[0] = take(&si);
		ans[1] = si.si_code;
		ans[2] = si.si_pid;
		ans[3] = take(&more) >= 0;
		if (write(resp[1], ans, sizeof(ans)) != sizeof(ans))
			break;
	}
	return NULL;
}

static unsigned long long status_mask(const char *key)
{
	char buf[4096], *p;
	ssize_t n;
	int fd = open("/proc/self/status", O_RDONLY);

	if (fd < 0)
		laz_die("open /proc/self/status");
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		laz_die("read /proc/self/status");
	buf[n] = '\0';
	p = strstr(buf, key);
	if (!p)
		laz_die("no %s in /proc/self/status", key);
	return strtoull(p + strlen(key), NULL, 16);
}

static void setup(void)
{
	sigset_t set;

	me = getpid();
	sigemptyset(&set);
	sigaddset(&set, SIGCONT);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		laz_die("sigprocmask");
	if (none) {
		laz_log("# pid %d: SIGCONT blocked, none pending", me);
		return;
	}
	if (threaded) {
		pthread_t th;

		if (pipe(req) || pipe(resp) || pthread_create(&th, NULL, worker, NULL))
			laz_die("thread");
		while (!worker_tid)
			usleep(1000);
		if (syscall(SYS_tgkill, me, worker_tid, SIGCONT))
			laz_die("tgkill thread");
	}
	if (sigqueue(me, SIGCONT, (union sigval){ .sival_int = 4711 }))
		laz_die("sigqueue");
	if (syscall(SYS_tgkill, me, (pid_t)syscall(SYS_gettid), SIGCONT))
		laz_die("tgkill");
	laz_log("# pid %d: SIGCONT pending twice (process queue, thread queue)", me);
}

static int take(siginfo_t *si)
{
	sigset_t set;
	struct timespec zero = { 0, 0 };

	sigemptyset(&set);
	sigaddset(&set, SIGCONT);
	memset(si, 0, sizeof(*si));
	/* raw: glibc's sigtimedwait reports a tgkill's SI_TKILL as SI_USER */
	return (int)syscall(SYS_rt_sigtimedwait, &set, si, &zero, _NSIG / 8);
}

static void corrupt(void)
{
	siginfo_t si;

	if (none) {
		if (laz_corrupt("thread") || laz_corrupt("shared"))
			kill(me, SIGCONT);
		return;
	}
	if (laz_corrupt("thread"))
		take(&si); /* the thread's one: the process's is then taken first */
	if (laz_corrupt("shared")) {
		take(&si);
		take(&si); /* both gone; the thread's one back */
		syscall(SYS_tgkill, me, (pid_t)syscall(SYS_gettid), SIGCONT);
	}
}

static void check(void)
{
	const unsigned long long bit = 1ULL << (SIGCONT - 1);
	siginfo_t si;
	sigset_t pend;
	int got;

	if (none) {
		got = take(&si);
		LAZ_CHECK(got < 0 && errno == EAGAIN, "a SIGCONT pending: code %d pid %d", si.si_code, si.si_pid);
		return;
	}
	LAZ_CHECK(status_mask("ShdPnd:") & bit, "SIGCONT not pending on the process queue (ShdPnd %llx)",
		  status_mask("ShdPnd:"));
	LAZ_CHECK(status_mask("SigPnd:") & bit, "SIGCONT not pending on the thread queue (SigPnd %llx)",
		  status_mask("SigPnd:"));
	sigpending(&pend);
	LAZ_CHECK(sigismember(&pend, SIGCONT), "sigpending: no SIGCONT");

	got = take(&si);
	LAZ_CHECK(got == SIGCONT && si.si_code == SI_TKILL && si.si_pid == me,
		  "first SIGCONT (thread queue): got %d code %d pid %d, want code %d pid %d", got, si.si_code,
		  si.si_pid, SI_TKILL, me);
	got = take(&si);
	LAZ_CHECK(got == SIGCONT && si.si_code == SI_QUEUE && si.si_pid == me && si.si_value.sival_int == 4711,
		  "second SIGCONT (process queue): got %d code %d pid %d value %d, want code %d pid %d value 4711",
		  got, si.si_code, si.si_pid, si.si_value.sival_int, SI_QUEUE, me);
	got = take(&si);
	LAZ_CHECK(got < 0 && errno == EAGAIN, "a third SIGCONT pending: code %d pid %d", si.si_code, si.si_pid);
	if (threaded) {
		int ans[4] = { 0, 0, 0, 0 };

		if (write(req[1], "?", 1) != 1 || read(resp[0], ans, sizeof(ans)) != sizeof(ans))
			laz_die("ask the thread");
		LAZ_CHECK(ans[0] == SIGCONT && ans[1] == SI_TKILL && ans[2] == me && !ans[3],
			  "the thread's SIGCONT: got %d code %d pid %d (and another: %d), want code %d pid %d", ans[0],
			  ans[1], ans[2], ans[3], SI_TKILL, me);
	}
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { check, NULL };

	none = argc > 2 && !strcmp(argv[2], "none");
	threaded = argc > 2 && !strcmp(argv[2], "thread");
	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
