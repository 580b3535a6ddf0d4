/*
 * signals.c - exercises signal state: handlers with SA_SIGINFO/SA_RESTART/SA_ONSTACK/
 * SA_NODEFER/SA_RESETHAND and sa_mask (every disposition 1..64 is compared), SIG_IGN
 * dispositions, the blocked mask (also across the sigsuspend() the target waits in), pending
 * signals on the process queue (kill SIGUSR1, sigqueue SIGRTMIN+3 twice with values) and on
 * the thread queue (rt_tgsigqueueinfo SIGRTMIN+4 with a value, tgkill SIGWINCH), checked with
 * sigpending() and /proc/self/status ShdPnd/SigPnd, then delivered by unblocking them (count,
 * order, si_code, si_pid and si_value checked, and that SA_ONSTACK handlers ran on the
 * sigaltstack and others did not), the sigaltstack itself, and ITIMER_REAL/ITIMER_VIRTUAL with
 * long values and intervals. Before READY both timers run for a while (a 250 ms sleep for REAL, a
 * CPU-bound loop for VIRTUAL) and their remaining values are recorded: after restore each must be no
 * more than that (VIRTUAL: plus one tick of rounding), so a timer re-armed to its full value fails.
 *
 * Usage: signals LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <sys/syscall.h>
#include <sys/time.h>

#define ALTSTACK_SIZE (64 * 1024)
#define MAXREC 16

struct record {
	int sig, code, value;
	pid_t pid;
	int on_altstack;
	sigset_t blocked;
};

static const char POINTS[] =
	"altstack handler ignored sa_mask blocked pending_shared pending_thread rtvalue rtcount itimer "
	"itimer_value itimer_rearm";

static char altstack[ALTSTACK_SIZE] __attribute__((aligned(64)));
static struct record rec[MAXREC];
static volatile sig_atomic_t nrec;
static volatile sig_atomic_t hup_count;
static struct sigaction saved_act[65];
static int saved_ret[65];
static sigset_t saved_blocked;
static int RT3, RT4;

static void handler(int sig, siginfo_t *si, void *ctx)
{
	char local;
	uintptr_t a = (uintptr_t)&local;

	(void)ctx;
	if (nrec < MAXREC) {
		struct record *r = &rec[nrec];

		r->sig = sig;
		r->code = si->si_code;
		r->value = si->si_value.sival_int;
		r->pid = si->si_pid;
		r->on_altstack = a >= (uintptr_t)altstack && a < (uintptr_t)altstack + ALTSTACK_SIZE;
		sigprocmask(SIG_BLOCK, NULL, &r->blocked);
		nrec++;
	}
}

static void hup_handler(int sig, siginfo_t *si, void *ctx)
{
	(void)sig;
	(void)si;
	(void)ctx;
	hup_count++;
}

static void install(int sig, void (*fn)(int, siginfo_t *, void *), int flags, const int *mask)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = fn;
	sa.sa_flags = SA_SIGINFO | flags;
	sigemptyset(&sa.sa_mask);
	for (; mask && *mask; mask++)
		sigaddset(&sa.sa_mask, *mask);
	if (sigaction(sig, &sa, NULL))
		laz_die("sigaction %d", sig);
}

static void ignore(int sig)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	if (sigaction(sig, &sa, NULL))
		laz_die("sigaction %d SIG_IGN", sig);
}

static void save_actions(void)
{
	int sig;

	for (sig = 1; sig <= 64; sig++) {
		memset(&saved_act[sig], 0, sizeof(saved_act[sig]));
		saved_ret[sig] = sigaction(sig, NULL, &saved_act[sig]);
	}
}

static void check_actions(void)
{
	int sig;

	for (sig = 1; sig <= 64; sig++) {
		struct sigaction now;
		int ret;

		memset(&now, 0, sizeof(now));
		ret = sigaction(sig, NULL, &now);
		if (ret != saved_ret[sig]) {
			laz_failf("sigaction(%d) returned %d, before %d", sig, ret, saved_ret[sig]);
			continue;
		}
		if (ret)
			continue;
		if (now.sa_handler != saved_act[sig].sa_handler)
			laz_failf("signal %d: handler %p, expected %p", sig, (void *)now.sa_handler,
				  (void *)saved_act[sig].sa_handler);
		if (now.sa_flags != saved_act[sig].sa_flags)
			laz_failf("signal %d: sa_flags %#x, expected %#x", sig, now.sa_flags,
				  saved_act[sig].sa_flags);
		if (memcmp(&now.sa_mask, &saved_act[sig].sa_mask, 8) != 0)
			laz_failf("signal %d: sa_mask differs", sig);
		if (now.sa_restorer != saved_act[sig].sa_restorer)
			laz_failf("signal %d: sa_restorer %p, expected %p", sig, (void *)now.sa_restorer,
				  (void *)saved_act[sig].sa_restorer);
	}
}

static uint64_t mask_bits(const sigset_t *set)
{
	uint64_t bits = 0;
	int sig;

	for (sig = 1; sig <= 64; sig++)
		if (sigismember(set, sig) == 1)
			bits |= 1ULL << (sig - 1);
	return bits;
}

static uint64_t status_mask(const char *field)
{
	FILE *f = fopen("/proc/self/status", "re");
	char line[256];
	size_t n = strlen(field);
	uint64_t v = ~0ULL;

	if (!f)
		laz_die("open /proc/self/status");
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, field, n) == 0 && line[n] == ':')
			v = strtoull(line + n + 1, NULL, 16);
	fclose(f);
	return v;
}

#define MARGIN_US 100000LL /* how far below its full value each timer is before READY, at least */

static long long ready_real_us, ready_virt_us; /* remaining values just before READY */

static long long itimer_us(int which)
{
	struct itimerval it;

	if (getitimer(which, &it))
		laz_die("getitimer");
	return (long long)it.it_value.tv_sec * 1000000 + it.it_value.tv_usec;
}

/* Let both timers run down a measured amount: wall time for REAL, user CPU time for VIRTUAL. */
static void run_timers(void)
{
	volatile uint64_t x = 1;
	double until = laz_now(CLOCK_MONOTONIC) + 10;
	struct timespec ts = { 0, 250 * 1000 * 1000 };

	nanosleep(&ts, NULL);
	while (itimer_us(ITIMER_VIRTUAL) > 2000 * 1000000LL - MARGIN_US && laz_now(CLOCK_MONOTONIC) < until) {
		int i;

		for (i = 0; i < 100000; i++)
			x = laz_mix(x);
	}
	ready_real_us = itimer_us(ITIMER_REAL);
	ready_virt_us = itimer_us(ITIMER_VIRTUAL);
	if (ready_real_us > 1000 * 1000000LL - MARGIN_US || ready_virt_us > 2000 * 1000000LL - MARGIN_US)
		laz_die("itimers did not run down: REAL %lld us, VIRTUAL %lld us left", ready_real_us, ready_virt_us);
}

static void setup(void)
{
	static const int usr1_mask[] = { SIGTERM, SIGQUIT, 0 };
	static const int rt3_mask[] = { SIGUSR1, 0 };
	struct itimerval real = { .it_interval = { 1000, 0 }, .it_value = { 1000, 0 } };
	struct itimerval virt = { .it_interval = { 2000, 500000 }, .it_value = { 2000, 0 } };
	stack_t ss = { .ss_sp = altstack, .ss_size = ALTSTACK_SIZE, .ss_flags = 0 };
	siginfo_t si;
	sigset_t set;

	RT3 = SIGRTMIN + 3;
	RT4 = SIGRTMIN + 4;
	if (sigaltstack(&ss, NULL))
		laz_die("sigaltstack");
	install(SIGUSR1, handler, SA_RESTART | SA_ONSTACK, usr1_mask);
	install(RT3, handler, SA_ONSTACK, rt3_mask);
	install(RT4, handler, SA_RESTART, NULL);
	install(SIGWINCH, handler, SA_ONSTACK | SA_NODEFER, NULL);
	install(SIGHUP, hup_handler, SA_RESETHAND, NULL);
	ignore(SIGPIPE);
	ignore(SIGINT);
	ignore(SIGTTOU);
	save_actions();

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, RT3);
	sigaddset(&set, RT4);
	sigaddset(&set, SIGWINCH);
	sigaddset(&set, SIGTTIN);
	if (sigprocmask(SIG_BLOCK, &set, &saved_blocked))
		laz_die("sigprocmask");
	sigprocmask(SIG_BLOCK, NULL, &saved_blocked);

	/* Process-wide queue. */
	if (kill(getpid(), SIGUSR1))
		laz_die("kill SIGUSR1");
	if (sigqueue(getpid(), RT3, (union sigval){ .sival_int = 1111 }) ||
	    sigqueue(getpid(), RT3, (union sigval){ .sival_int = 2222 }))
		laz_die("sigqueue");
	/* Thread queue. */
	memset(&si, 0, sizeof(si));
	si.si_signo = RT4;
	si.si_code = SI_QUEUE;
	si.si_pid = getpid();
	si.si_uid = getuid();
	si.si_value.sival_int = 3333;
	if (syscall(SYS_rt_tgsigqueueinfo, getpid(), gettid(), RT4, &si))
		laz_die("rt_tgsigqueueinfo");
	if (syscall(SYS_tgkill, getpid(), gettid(), SIGWINCH))
		laz_die("tgkill");

	if (setitimer(ITIMER_REAL, &real, NULL) || setitimer(ITIMER_VIRTUAL, &virt, NULL))
		laz_die("setitimer");
	run_timers();
}

static void corrupt(void)
{
	struct timespec zero = { 0, 0 };
	sigset_t set;

	if (laz_corrupt("altstack")) {
		stack_t ss = { .ss_sp = altstack, .ss_size = ALTSTACK_SIZE - 4096, .ss_flags = 0 };

		sigaltstack(&ss, NULL);
	}
	if (laz_corrupt("handler"))
		install(SIGUSR1, handler, SA_ONSTACK, NULL);
	if (laz_corrupt("ignored"))
		signal(SIGPIPE, SIG_DFL);
	if (laz_corrupt("sa_mask")) {
		static const int m[] = { SIGUSR1, SIGTERM, 0 };

		install(RT3, handler, SA_ONSTACK, m);
	}
	if (laz_corrupt("blocked")) {
		sigemptyset(&set);
		sigaddset(&set, SIGTTOU);
		sigprocmask(SIG_BLOCK, &set, NULL);
	}
	if (laz_corrupt("pending_shared")) {
		sigemptyset(&set);
		sigaddset(&set, SIGUSR1);
		sigtimedwait(&set, NULL, &zero);
	}
	if (laz_corrupt("pending_thread")) {
		sigemptyset(&set);
		sigaddset(&set, SIGWINCH);
		sigtimedwait(&set, NULL, &zero);
	}
	if (laz_corrupt("rtvalue")) {
		sigemptyset(&set);
		sigaddset(&set, RT3);
		sigtimedwait(&set, NULL, &zero);
		sigqueue(getpid(), RT3, (union sigval){ .sival_int = 9999 });
	}
	if (laz_corrupt("rtcount"))
		sigqueue(getpid(), RT3, (union sigval){ .sival_int = 2222 });
	if (laz_corrupt("itimer")) {
		struct itimerval it = { .it_interval = { 999, 0 }, .it_value = { 500, 0 } };

		setitimer(ITIMER_REAL, &it, NULL);
	}
	if (laz_corrupt("itimer_value")) {
		struct itimerval it = { .it_interval = { 2000, 500000 }, .it_value = { 2001, 0 } };

		setitimer(ITIMER_VIRTUAL, &it, NULL);
	}
	if (laz_corrupt("itimer_rearm")) { /* both re-armed to their full values, as a careless restore would */
		struct itimerval real = { .it_interval = { 1000, 0 }, .it_value = { 1000, 0 } };
		struct itimerval virt = { .it_interval = { 2000, 500000 }, .it_value = { 2000, 0 } };

		setitimer(ITIMER_REAL, &real, NULL);
		setitimer(ITIMER_VIRTUAL, &virt, NULL);
	}
}

/* The value must be in (0, ready_us + slack]: no more than was left before READY (so less than the full value
 * by at least MARGIN_US); CPU-time timers may be rounded up to a tick, hence the slack. */
static void check_itimer(const char *what, int which, long long ready_us, long slack_us, struct timeval interval)
{
	struct itimerval it;
	long long us;

	if (getitimer(which, &it)) {
		laz_failf("getitimer %s: %s", what, strerror(errno));
		return;
	}
	if (it.it_interval.tv_sec != interval.tv_sec || it.it_interval.tv_usec != interval.tv_usec)
		laz_failf("%s interval %ld.%06ld, expected %ld.%06ld", what, (long)it.it_interval.tv_sec,
			  (long)it.it_interval.tv_usec, (long)interval.tv_sec, (long)interval.tv_usec);
	us = (long long)it.it_value.tv_sec * 1000000 + it.it_value.tv_usec;
	if (us <= 0 || us > ready_us + slack_us)
		laz_failf("%s value %ld.%06ld, expected in (0, %lld.%06lld] (what was left before READY)", what,
			  (long)it.it_value.tv_sec, (long)it.it_value.tv_usec, (ready_us + slack_us) / 1000000,
			  (ready_us + slack_us) % 1000000);
}

static void check_state(void)
{
	stack_t ss;
	sigset_t set;
	uint64_t want_shared = (1ULL << (SIGUSR1 - 1)) | (1ULL << (RT3 - 1));
	uint64_t want_thread = (1ULL << (RT4 - 1)) | (1ULL << (SIGWINCH - 1));
	uint64_t v;

	if (sigaltstack(NULL, &ss))
		laz_failf("sigaltstack: %s", strerror(errno));
	else if (ss.ss_sp != altstack || ss.ss_size != ALTSTACK_SIZE || ss.ss_flags != 0)
		laz_failf("sigaltstack sp=%p size=%zu flags=%d, expected %p %d 0", ss.ss_sp, ss.ss_size,
			  ss.ss_flags, (void *)altstack, ALTSTACK_SIZE);
	check_actions();

	sigprocmask(SIG_BLOCK, NULL, &set);
	if (mask_bits(&set) != mask_bits(&saved_blocked))
		laz_failf("blocked mask %#lx, expected %#lx", (unsigned long)mask_bits(&set),
			  (unsigned long)mask_bits(&saved_blocked));
	sigpending(&set);
	if (mask_bits(&set) != (want_shared | want_thread))
		laz_failf("sigpending %#lx, expected %#lx", (unsigned long)mask_bits(&set),
			  (unsigned long)(want_shared | want_thread));
	v = status_mask("ShdPnd");
	if (v != want_shared)
		laz_failf("ShdPnd %#lx, expected %#lx", (unsigned long)v, (unsigned long)want_shared);
	v = status_mask("SigPnd");
	if (v != want_thread)
		laz_failf("SigPnd %#lx, expected %#lx", (unsigned long)v, (unsigned long)want_thread);

	check_itimer("ITIMER_REAL", ITIMER_REAL, ready_real_us, 0, (struct timeval){ 1000, 0 });
	check_itimer("ITIMER_VIRTUAL", ITIMER_VIRTUAL, ready_virt_us, 20000, (struct timeval){ 2000, 500000 });
}

static const struct record *find(int sig, int nth)
{
	int i;

	for (i = 0; i < nrec; i++)
		if (rec[i].sig == sig && nth-- == 0)
			return &rec[i];
	return NULL;
}

static int count(int sig)
{
	int i, n = 0;

	for (i = 0; i < nrec; i++)
		n += rec[i].sig == sig;
	return n;
}

static void check_delivery(void)
{
	const struct record *r;
	sigset_t set;
	pid_t me = getpid();

	/*
	 * The handlers run inside these sigprocmask() calls. SIGRTMIN+4 goes alone first: a
	 * signal delivered while another handler's frame is on the alternate stack runs there too.
	 */
	sigemptyset(&set);
	sigaddset(&set, RT4);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, RT3);
	sigaddset(&set, SIGWINCH);
	sigprocmask(SIG_UNBLOCK, &set, NULL);

	LAZ_CHECK(count(SIGUSR1) == 1, "SIGUSR1 delivered %d times, expected 1", count(SIGUSR1));
	LAZ_CHECK(count(RT3) == 2, "SIGRTMIN+3 delivered %d times, expected 2", count(RT3));
	LAZ_CHECK(count(RT4) == 1, "SIGRTMIN+4 delivered %d times, expected 1", count(RT4));
	LAZ_CHECK(count(SIGWINCH) == 1, "SIGWINCH delivered %d times, expected 1", count(SIGWINCH));
	LAZ_CHECK(nrec == 5, "%d signals delivered, expected 5", (int)nrec);

	if ((r = find(SIGUSR1, 0))) {
		LAZ_CHECK(r->code == SI_USER && r->pid == me, "SIGUSR1 si_code %d si_pid %d", r->code, r->pid);
		LAZ_CHECK(r->on_altstack, "SIGUSR1 handler (SA_ONSTACK) not on the alternate stack");
		LAZ_CHECK(sigismember(&r->blocked, SIGTERM) == 1 && sigismember(&r->blocked, SIGQUIT) == 1 &&
				  sigismember(&r->blocked, SIGUSR1) == 1,
			  "SIGUSR1 handler ran without its sa_mask/own signal blocked");
	}
	if ((r = find(RT3, 0))) {
		LAZ_CHECK(r->code == SI_QUEUE && r->value == 1111 && r->pid == me,
			  "first SIGRTMIN+3: si_code %d value %d pid %d, expected SI_QUEUE 1111 %d", r->code,
			  r->value, r->pid, me);
		LAZ_CHECK(r->on_altstack, "SIGRTMIN+3 handler (SA_ONSTACK) not on the alternate stack");
	}
	if ((r = find(RT3, 1)))
		LAZ_CHECK(r->code == SI_QUEUE && r->value == 2222,
			  "second SIGRTMIN+3: si_code %d value %d, expected SI_QUEUE 2222", r->code, r->value);
	if ((r = find(RT4, 0))) {
		LAZ_CHECK(r->code == SI_QUEUE && r->value == 3333,
			  "SIGRTMIN+4: si_code %d value %d, expected SI_QUEUE 3333", r->code, r->value);
		LAZ_CHECK(!r->on_altstack, "SIGRTMIN+4 handler (no SA_ONSTACK) ran on the alternate stack");
	}
	if ((r = find(SIGWINCH, 0))) {
		LAZ_CHECK(r->code == SI_TKILL, "SIGWINCH si_code %d, expected SI_TKILL", r->code);
		LAZ_CHECK(r->on_altstack, "SIGWINCH handler (SA_ONSTACK) not on the alternate stack");
		LAZ_CHECK(sigismember(&r->blocked, SIGWINCH) == 0, "SIGWINCH handler (SA_NODEFER) blocked itself");
	}
	sigpending(&set);
	LAZ_CHECK(mask_bits(&set) == 0, "signals still pending after unblocking: %#lx",
		  (unsigned long)mask_bits(&set));

	/* SA_RESETHAND: runs once, then the disposition is back to SIG_DFL. */
	raise(SIGHUP);
	{
		struct sigaction sa;

		sigaction(SIGHUP, NULL, &sa);
		LAZ_CHECK(hup_count == 1 && sa.sa_handler == SIG_DFL,
			  "SIGHUP (SA_RESETHAND): ran %d times, disposition not reset", (int)hup_count);
	}
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { check_state, check_delivery, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
