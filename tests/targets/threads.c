/*
 * threads.c - exercises a multi-threaded process: six threads besides the main one, each caught in a different
 * kind of wait, each with its own per-thread state, all of which must come back after restore.
 *
 *   thread 0  pthread_cond_wait on a condition variable (futex wait)
 *   thread 1  pthread_join on thread 2 (futex wait on thread 2's tid word: needs clear_child_tid)
 *   thread 2  a raw read(2) on a pipe, made in inline assembly with r12-r15 and xmm6/xmm7 holding a pattern
 *   thread 3  nanosleep in a loop until told to stop
 *   thread 4  a busy loop in user code with r12-r15 and xmm6/xmm7 holding a pattern
 *   thread 5  poll(2) on a second pipe with a 600 s timeout (a restart through the restart block)
 *
 * Per thread: its tid (gettid() after restore equals the one before), a TLS value, a signal mask of its own
 * (SIGUSR2 blocked, plus SIGRTMIN+i), a thread-directed pending signal (SIGRTMIN+i with a value, queued by
 * pthread_sigqueue before READY and taken after restore), a sigaltstack, a name, its rseq registration (a
 * second registration with the same arguments must answer EBUSY), clear_child_tid (PR_GET_TID_ADDRESS) and
 * robust list head (get_robust_list) as before.
 *
 * With argv[2] "churn", one more thread creates and joins short-lived threads in a loop until woken, so that
 * threads start and end while the dump attaches; it must have gone on doing so after restore.
 *
 * READY is written once every thread sleeps in its system call (/proc/self/task/TID/syscall) or spins.
 * Trigger: SIGUSR2, taken by the main thread (the only one not blocking it), which wakes the others: a flag,
 * a broadcast, a byte into the pipe. After waking, each thread also touches its own 64 KiB of a 1 MiB buffer
 * at once with the others (several threads faulting together on a lazy restore) and checks its data.
 */
#include "common.h"

#include <poll.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

#define NTHREADS 6
#define RSEQ_SIG 0x53053053
#define SLICE (64 * 1024)

enum { T_COND, T_JOIN, T_READ, T_SLEEP, T_BUSY, T_POLL };
static const char *const kinds[NTHREADS] = { "cond", "join", "read", "sleep", "busy", "poll" };
static const long wait_syscall[NTHREADS] = { SYS_futex, SYS_futex, SYS_read, SYS_clock_nanosleep, -1, SYS_poll };

struct slot {
	pthread_t thread;
	volatile pid_t tid;
	volatile int waiting;	/* set just before the wait */
	uintptr_t tid_address, robust_head;
	stack_t alt;
	sigset_t mask;
	uint64_t seed;
	char fail[512];
	int done;
};

static struct slot slots[NTHREADS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static volatile int go;
static int pipefd[2], pollfd[2];
static unsigned char *shared_buf;
static __thread uint64_t tls_value;
static volatile int corrupt_thread = -1;
static char corrupt_what[32];

static void note(struct slot *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(struct slot *s, const char *fmt, ...)
{
	size_t len = strlen(s->fail);
	va_list ap;

	va_start(ap, fmt);
	if (len < sizeof(s->fail) - 3) {
		if (len)
			len += (size_t)snprintf(s->fail + len, sizeof(s->fail) - len, "; ");
		vsnprintf(s->fail + len, sizeof(s->fail) - len, fmt, ap);
	}
	va_end(ap);
}

static uintptr_t thread_pointer(void)
{
	uintptr_t tp;

	__asm__ volatile("mov %%fs:0, %0" : "=r"(tp));
	return tp;
}

static uintptr_t tid_address(void)
{
	uintptr_t addr = 0;

	prctl(PR_GET_TID_ADDRESS, &addr, 0, 0, 0);
	return addr;
}

static uintptr_t robust_head(void)
{
	void *head = NULL;
	size_t len = 0;

	syscall(SYS_get_robust_list, 0, &head, &len);
	return (uintptr_t)head;
}

/* The raw read of thread 2: registers hold the pattern across the (restarted) system call. */
static long read_with_pattern(int fd, void *buf, uint64_t seed, uint64_t out[6])
{
	long ret;

	__asm__ volatile(
		"movq %[s], %%r12\n\t"
		"lea 1(%[s]), %%r13\n\t"
		"lea 2(%[s]), %%r14\n\t"
		"lea 3(%[s]), %%r15\n\t"
		"movq %%r12, %%xmm6\n\t"
		"movq %%r15, %%xmm7\n\t"
		"syscall\n\t"
		"movq %%r12, 0(%[o])\n\t"
		"movq %%r13, 8(%[o])\n\t"
		"movq %%r14, 16(%[o])\n\t"
		"movq %%r15, 24(%[o])\n\t"
		"movq %%xmm6, 32(%[o])\n\t"
		"movq %%xmm7, 40(%[o])\n\t"
		: "=a"(ret)
		: "a"((long)SYS_read), "D"((long)fd), "S"(buf), "d"(1L), [s] "r"(seed), [o] "r"(out)
		: "rcx", "r11", "r12", "r13", "r14", "r15", "xmm6", "xmm7", "memory");
	return ret;
}

/* The busy loop of thread 4: spins in user code until `go`, the pattern held in registers meanwhile. */
static void spin_with_pattern(uint64_t seed, uint64_t out[6])
{
	__asm__ volatile(
		"movq %[s], %%r12\n\t"
		"lea 1(%[s]), %%r13\n\t"
		"lea 2(%[s]), %%r14\n\t"
		"lea 3(%[s]), %%r15\n\t"
		"movq %%r12, %%xmm6\n\t"
		"movq %%r15, %%xmm7\n\t"
		"1:\n\t"
		"pause\n\t"
		"cmpl $0, %[g]\n\t"
		"je 1b\n\t"
		"movq %%r12, 0(%[o])\n\t"
		"movq %%r13, 8(%[o])\n\t"
		"movq %%r14, 16(%[o])\n\t"
		"movq %%r15, 24(%[o])\n\t"
		"movq %%xmm6, 32(%[o])\n\t"
		"movq %%xmm7, 40(%[o])\n\t"
		:
		: [s] "r"(seed), [o] "r"(out), [g] "m"(go)
		: "r12", "r13", "r14", "r15", "xmm6", "xmm7", "memory", "cc");
}

static void check_pattern(struct slot *s, const uint64_t out[6])
{
	const uint64_t want[6] = { s->seed, s->seed + 1, s->seed + 2, s->seed + 3, s->seed, s->seed + 3 };

	for (int i = 0; i < 6; i++)
		if (out[i] != want[i])
			note(s, "register %d is %#lx, expected %#lx", i, (unsigned long)out[i],
			     (unsigned long)want[i]);
}

static void check_own_state(int i)
{
	struct slot *s = &slots[i];
	char name[16] = "", want_name[16];
	sigset_t mask, pend;
	stack_t alt;
	siginfo_t info;
	struct timespec zero = { 0, 0 };
	int sig = SIGRTMIN + i;

	if (corrupt_thread == i) {
		if (!strcmp(corrupt_what, "tid"))
			s->tid ^= 1;
		else if (!strcmp(corrupt_what, "tls"))
			tls_value ^= 1;
		else if (!strcmp(corrupt_what, "mask")) {
			sigset_t extra;

			sigemptyset(&extra);
			sigaddset(&extra, SIGRTMAX);
			pthread_sigmask(SIG_BLOCK, &extra, NULL);
		} else if (!strcmp(corrupt_what, "pending")) {
			sigset_t one;

			sigemptyset(&one);
			sigaddset(&one, sig);
			sigtimedwait(&one, NULL, &zero);
		}
		else if (!strcmp(corrupt_what, "altstack"))
			s->alt.ss_size += 4096;
		else if (!strcmp(corrupt_what, "name"))
			prctl(PR_SET_NAME, "corrupted", 0, 0, 0);
		else if (!strcmp(corrupt_what, "tidaddr"))
			s->tid_address += 8;	/* the real one must stay: a join waits on it */
		else if (!strcmp(corrupt_what, "robust"))
			syscall(SYS_set_robust_list, NULL, 24);
		else if (!strcmp(corrupt_what, "rseq"))
			syscall(SYS_rseq, thread_pointer() + __rseq_offset, 32, 1 /* UNREGISTER */, RSEQ_SIG);
	}
	if (syscall(SYS_gettid) != s->tid)
		note(s, "gettid() is %ld, was %d", (long)syscall(SYS_gettid), s->tid);
	if (tls_value != s->seed)
		note(s, "TLS value is %#lx, expected %#lx", (unsigned long)tls_value, (unsigned long)s->seed);
	pthread_sigmask(SIG_SETMASK, NULL, &mask);
	for (int n = 1; n <= SIGRTMAX; n++)
		if (n != SIGKILL && n != SIGSTOP && sigismember(&mask, n) != sigismember(&s->mask, n))
			note(s, "signal %d is %s", n, sigismember(&mask, n) ? "blocked" : "not blocked");
	sigpending(&pend);
	if (!sigismember(&pend, sig)) {
		note(s, "its signal %d is not pending", sig);
	} else {
		sigset_t one;

		sigemptyset(&one);
		sigaddset(&one, sig);
		if (sigtimedwait(&one, &info, &zero) != sig || info.si_value.sival_int != 1000 + i)
			note(s, "its pending signal %d has value %d, expected %d", sig, info.si_value.sival_int,
			     1000 + i);
	}
	if (sigaltstack(NULL, &alt) || alt.ss_sp != s->alt.ss_sp || alt.ss_size != s->alt.ss_size ||
	    alt.ss_flags != s->alt.ss_flags)
		note(s, "sigaltstack is %p+%zu flags %d, was %p+%zu", alt.ss_sp, alt.ss_size, alt.ss_flags,
		     s->alt.ss_sp, s->alt.ss_size);
	prctl(PR_GET_NAME, name, 0, 0, 0);
	snprintf(want_name, sizeof(want_name), "laz-%s", kinds[i]);
	if (strcmp(name, want_name))
		note(s, "name is '%s'", name);
	if (tid_address() != s->tid_address)
		note(s, "clear_child_tid is %#lx, was %#lx", (unsigned long)tid_address(),
		     (unsigned long)s->tid_address);
	if (robust_head() != s->robust_head)
		note(s, "robust list is %#lx, was %#lx", (unsigned long)robust_head(), (unsigned long)s->robust_head);
	if (__rseq_size) {
		/* The kernel answers EBUSY to a registration identical to the current one, 0 if none existed. */
		long r = syscall(SYS_rseq, thread_pointer() + __rseq_offset, 32, 0, RSEQ_SIG);

		if (r == 0 || errno != EBUSY)
			note(s, "rseq is not registered as before (re-registration: %ld, %s)", r, strerror(errno));
	}
	/* Each thread's slice of the buffer, read while the others read theirs. */
	{
		long bad = laz_find_mismatch_offset(shared_buf + (size_t)i * SLICE, SLICE, (uint64_t)i * SLICE,
						    0x7468726561647331ULL);

		if (bad >= 0)
			note(s, "buffer differs at byte %ld of its slice", bad);
	}
}

static void *thread_main(void *arg)
{
	int i = (int)(intptr_t)arg;
	struct slot *s = &slots[i];
	uint64_t out[6] = { 0 };
	char name[16];
	char c;

	s->tid = (pid_t)syscall(SYS_gettid);
	s->seed = 0x5eed000000000000ULL | ((uint64_t)i << 32) | (uint64_t)s->tid;
	tls_value = s->seed;
	snprintf(name, sizeof(name), "laz-%s", kinds[i]);
	prctl(PR_SET_NAME, name, 0, 0, 0);
	s->alt.ss_size = 65536 + (size_t)i * 4096;
	s->alt.ss_sp = malloc(s->alt.ss_size);
	s->alt.ss_flags = 0;
	if (!s->alt.ss_sp || sigaltstack(&s->alt, NULL))
		laz_die("sigaltstack in thread %d", i);
	sigemptyset(&s->mask);
	sigaddset(&s->mask, SIGUSR2);
	sigaddset(&s->mask, SIGRTMIN + i);
	if (i % 2)
		sigaddset(&s->mask, SIGHUP);
	pthread_sigmask(SIG_SETMASK, &s->mask, NULL);
	s->tid_address = tid_address();
	s->robust_head = robust_head();

	s->waiting = 1;
	switch (i) {
	case T_COND:
		pthread_mutex_lock(&lock);
		while (!go)
			pthread_cond_wait(&cond, &lock);
		pthread_mutex_unlock(&lock);
		break;
	case T_JOIN:
		if (pthread_join(slots[T_READ].thread, NULL))
			note(s, "pthread_join failed");
		break;
	case T_READ:
		if (read_with_pattern(pipefd[0], &c, s->seed, out) != 1)
			note(s, "read failed");
		check_pattern(s, out);
		break;
	case T_SLEEP:
		while (!go) {
			struct timespec ts = { 0, 200 * 1000 * 1000 };

			nanosleep(&ts, NULL);
		}
		break;
	case T_BUSY:
		spin_with_pattern(s->seed, out);
		check_pattern(s, out);
		break;
	case T_POLL: {
		struct pollfd pfd = { .fd = pollfd[0], .events = POLLIN };
		double t0 = laz_now(CLOCK_MONOTONIC);
		int n = poll(&pfd, 1, 600000);

		if (n != 1 || !(pfd.revents & POLLIN))
			note(s, "poll returned %d (revents %#x) after %.1f s", n, pfd.revents,
			     laz_now(CLOCK_MONOTONIC) - t0);
		break;
	}
	}
	check_own_state(i);
	return NULL;
}

static void *noop(void *arg)
{
	return arg;
}

static volatile long churned;
static volatile int churn_failed;

static void *churn_main(void *arg)
{
	(void)arg;
	while (!go) {
		pthread_t t;
		void *ret = NULL;

		if (pthread_create(&t, NULL, noop, (void *)churned) || pthread_join(t, &ret) || ret != (void *)churned)
			churn_failed = 1;
		churned++;
	}
	return NULL;
}

static int in_syscall(pid_t tid, long nr)
{
	char path[64], buf[256];
	int fd, n;

	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", tid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return 0;
	n = (int)read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	return strtol(buf, NULL, 10) == nr;
}

int main(int argc, char **argv)
{
	int churn = argc > 2 && !strcmp(argv[2], "churn");
	pthread_t churner;
	long churned_before = 0;

	laz_init(argc, argv);
	if (pipe(pipefd) || pipe(pollfd))
		laz_die("pipe");
	shared_buf = mmap(NULL, NTHREADS * SLICE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (shared_buf == MAP_FAILED)
		laz_die("mmap");
	laz_fill_offset(shared_buf, NTHREADS * SLICE, 0, 0x7468726561647331ULL);
	/* Thread 1 joins thread 2, so thread 2 exists first. */
	for (int i = NTHREADS - 1; i >= 0; i--)
		if (pthread_create(&slots[i].thread, NULL, thread_main, (void *)(intptr_t)i))
			laz_die("pthread_create %d", i);
	for (int i = 0; i < NTHREADS; i++) {
		double deadline = laz_now(CLOCK_MONOTONIC) + 10;

		while (!slots[i].waiting || (wait_syscall[i] >= 0 && !in_syscall(slots[i].tid, wait_syscall[i]))) {
			if (laz_now(CLOCK_MONOTONIC) > deadline)
				laz_die("thread %d (%s) never began its wait", i, kinds[i]);
			usleep(1000);
		}
		if (pthread_sigqueue(slots[i].thread, SIGRTMIN + i, (union sigval){ .sival_int = 1000 + i }))
			laz_die("pthread_sigqueue %d", i);
	}
	if (churn && pthread_create(&churner, NULL, churn_main, NULL))
		laz_die("pthread_create churner");
	laz_ready("tid tls mask pending altstack name tidaddr robust rseq regs");
	laz_wait_usr2();
	if (churn) {
		/* it still makes threads after restore */
		churned_before = churned;
		for (int n = 0; n < 1000 && churned < churned_before + 10; n++)
			usleep(1000);
		LAZ_CHECK(churned >= churned_before + 10, "the churning thread made no new threads after restore");
	}

	{
		static const char *const points[] = { "tid", "tls", "mask", "pending", "altstack",
						      "name", "tidaddr", "robust", "rseq" };
		int regs_corrupt = laz_corrupt("regs");

		for (size_t p = 0; p < sizeof(points) / sizeof(points[0]); p++)
			if (laz_corrupt(points[p])) {
				snprintf(corrupt_what, sizeof(corrupt_what), "%s", points[p]);
				corrupt_thread = (int)(p % NTHREADS);
			}
		if (regs_corrupt)
			slots[T_BUSY].seed ^= 1;
	}
	pthread_mutex_lock(&lock);
	go = 1;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
	if (write(pipefd[1], "w", 1) != 1 || write(pollfd[1], "p", 1) != 1)
		laz_die("write pipe");
	for (int i = 0; i < NTHREADS; i++)
		if (i != T_READ && pthread_join(slots[i].thread, NULL))
			laz_failf("pthread_join %d", i);
	if (churn) {
		pthread_join(churner, NULL);
		LAZ_CHECK(!churn_failed, "a churned thread was not created or joined as it should");
	}
	for (int i = 0; i < NTHREADS; i++)
		if (slots[i].fail[0])
			laz_failf("thread %d (%s): %s", i, kinds[i], slots[i].fail);
	laz_finish();
}
