/*
 * pidns.c - exercises the ids a process sees of itself, as `restore --pidns` must give them back (and a plain
 * restore does).
 *
 * Before the dump it records its pid and the tid of a second thread, opens its own /proc/PID/stat by pid
 * (an fd on a /proc file of itself), and leaves signals pending that name it: SIGUSR1 queued to the process
 * (sigqueue with a value) and SIGRTMIN+1 to the thread (tgkill), both blocked.
 * After SIGUSR2 it checks:
 *   pid      getpid() and gettid() of the main thread are the recorded pid
 *   tid      the thread's gettid() is its recorded tid, asked of the thread itself
 *   procself /proc/self is its pid, and /proc/self/status says so (Pid: and the last NSpid field): /proc
 *            is the one of its own PID namespace
 *   procfd   the fd it opened on /proc/PID/stat reads its own pid (it is its own file, not another's)
 *   pending  SIGUSR1 pending for the process with its value and si_pid = the recorded pid, SIGRTMIN+1
 *            pending for the thread only
 */
#include "common.h"

#include <pthread.h>
#include <sys/syscall.h>

#define POINTS "pid tid procself procfd pending"
#define PROC_FD 40

static pid_t pid0, tid0;
static int to_thread[2], from_thread[2];
static volatile pid_t thread_tid;

static pid_t gettid_raw(void)
{
	return (pid_t)syscall(SYS_gettid);
}

/* Answers each request byte with its tid and whether its own pending set holds SIGRTMIN+1. */
static void *thread_main(void *arg)
{
	char c;
	sigset_t pend;
	int answer[2];

	(void)arg;
	thread_tid = gettid_raw();
	while (read(to_thread[0], &c, 1) == 1) {
		sigemptyset(&pend);
		sigpending(&pend);
		answer[0] = gettid_raw();
		answer[1] = sigismember(&pend, SIGRTMIN + 1);
		if (write(from_thread[1], answer, sizeof(answer)) != sizeof(answer))
			_exit(3);
	}
	return NULL;
}

static long status_field(const char *text, const char *name, int last)
{
	const char *p = strstr(text, name);
	long v = -1;

	if (!p)
		return -1;
	p += strlen(name);
	while (*p && *p != '\n') {
		char *end;
		long x = strtol(p, &end, 10);
		if (end == p)
			break;
		v = x;
		p = end;
		if (!last)
			break;
	}
	return v;
}

static void check_procself(int corrupt)
{
	char link[64], buf[4096], want[32];
	ssize_t n;
	int fd;
	pid_t me = getpid() + corrupt;

	n = readlink("/proc/self", link, sizeof(link) - 1);
	link[n > 0 ? n : 0] = '\0';
	snprintf(want, sizeof(want), "%d", (int)me);
	LAZ_CHECK(strcmp(link, want) == 0, "/proc/self is %s, getpid() %d", link, (int)me);
	fd = open("/proc/self/status", O_RDONLY);
	n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
	buf[n > 0 ? n : 0] = '\0';
	if (fd >= 0)
		close(fd);
	LAZ_CHECK(status_field(buf, "\nPid:", 0) == me, "/proc/self/status Pid: %ld, getpid() %d",
		  status_field(buf, "\nPid:", 0), (int)me);
	LAZ_CHECK(status_field(buf, "\nNSpid:", 1) == me, "/proc/self/status NSpid ends in %ld, getpid() %d",
		  status_field(buf, "\nNSpid:", 1), (int)me);
}

int main(int argc, char **argv)
{
	pthread_t th;
	char path[64], buf[256], c = 'x';
	int answer[2], fd;
	sigset_t block, pend;
	siginfo_t si;
	struct timespec zero = { 0, 0 };

	laz_init(argc, argv);
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGRTMIN + 1);
	if (sigprocmask(SIG_BLOCK, &block, NULL))
		laz_die("sigprocmask");
	if (pipe(to_thread) || pipe(from_thread))
		laz_die("pipe");
	if (pthread_create(&th, NULL, thread_main, NULL))
		laz_die("pthread_create");
	while (!thread_tid)
		usleep(1000);
	pid0 = getpid();
	tid0 = thread_tid;
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid0);
	laz_place(open(path, O_RDONLY), PROC_FD);
	if (sigqueue(pid0, SIGUSR1, (union sigval){ .sival_int = 4242 }))
		laz_die("sigqueue");
	if (syscall(SYS_tgkill, pid0, tid0, SIGRTMIN + 1))
		laz_die("tgkill");
	laz_log("# pid %d thread %d", (int)pid0, (int)tid0);
	laz_ready(POINTS);

	laz_wait_usr2();
	if (laz_corrupt("pid"))
		pid0 ^= 1;
	if (laz_corrupt("tid"))
		tid0 ^= 1;
	LAZ_CHECK(getpid() == pid0 && gettid_raw() == pid0, "pid %d tid %d, was %d", (int)getpid(),
		  (int)gettid_raw(), (int)pid0);

	if (write(to_thread[1], &c, 1) != 1 || read(from_thread[0], answer, sizeof(answer)) != sizeof(answer))
		laz_die("asking the thread");
	LAZ_CHECK(answer[0] == tid0, "thread's gettid() %d, was %d", answer[0], (int)tid0);

	check_procself(laz_corrupt("procself"));

	if (laz_corrupt("procfd")) {
		snprintf(path, sizeof(path), "/proc/%d/stat", (int)getppid() > 0 ? (int)getppid() : 1);
		laz_place(open(path, O_RDONLY), PROC_FD);
	}
	memset(buf, 0, sizeof(buf));
	LAZ_CHECK(pread(PROC_FD, buf, sizeof(buf) - 1, 0) > 0 && atoi(buf) == getpid(),
		  "fd %d (/proc/%d/stat) reads pid %d, getpid() %d", PROC_FD, (int)pid0, atoi(buf), (int)getpid());

	if (laz_corrupt("pending"))
		sigwaitinfo(&block, &si);
	sigemptyset(&pend);
	sigpending(&pend);
	LAZ_CHECK(!sigismember(&pend, SIGRTMIN + 1), "SIGRTMIN+1 pending for the main thread, sent to the other");
	LAZ_CHECK(answer[1] == 1, "SIGRTMIN+1 not pending for the thread it was sent to");
	memset(&si, 0, sizeof(si));
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	LAZ_CHECK(sigtimedwait(&block, &si, &zero) == SIGUSR1 && si.si_pid == pid0 &&
			  si.si_value.sival_int == 4242 && si.si_code == SI_QUEUE,
		  "SIGUSR1 pending: signo %d pid %d value %d code %d, want pid %d value 4242", si.si_signo,
		  (int)si.si_pid, si.si_value.sival_int, si.si_code, (int)pid0);
	laz_finish();
}
