/*
 * ptimers.c - exercises POSIX timers (timer_create): ids (the first one created is deleted, so they do not start
 * at 0, and the next new timer gets the id after the newest), clocks (MONOTONIC, PROCESS_CPUTIME,
 * THREAD_CPUTIME, REALTIME, BOOTTIME), notify kinds (SIGEV_SIGNAL,
 * SIGEV_THREAD_ID, SIGEV_NONE) with their signals and sigev_values, intervals, time left, a disarmed
 * timer, the overrun count of a periodic timer whose signal stays blocked (and is pending at the dump),
 * a periodic timer first armed 3.5 intervals in the past (overrun count 3, nothing pending: its next expiry
 * is 5 s away), and a periodic timer that keeps firing into a handler with the right si_value.
 *
 * Time left is checked on the timer's own clock: it may not be more than what was left when READY was
 * logged, nor less than what is left counting every tick since the arming. The CPU-time timer is armed
 * and then 200 ms of CPU are burnt before READY, so a timer re-armed to its full value is caught.
 *
 * Usage: ptimers LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <sys/syscall.h>

#define SIG_ONESHOT (SIGRTMIN)
#define SIG_CPU (SIGRTMIN + 1)
#define SIG_OVERRUN (SIGRTMIN + 2)
#define SIG_TICK (SIGRTMIN + 3)
#define SIG_PAST (SIGRTMIN + 4)
#define PAST_IV_S 10L
#define PAST_OVERRUN 3
#define ONESHOT_S 100.0
#define CPU_S 10.0
#define OVERRUN_NS 10000000L
#define TICK_NS 20000000L
#define NONE_PERIOD_NS 250000000L
#define V_ONESHOT ((void *)0x5eed0001UL)
#define V_OVERRUN ((void *)0x5eed0005UL)
#define V_TICK 66
#define V_TID 77

static const char POINTS[] = "ids next_id interval remaining cpu thread_cpu overrun pending value fires past";

static timer_t t_deleted, t_oneshot, t_cpu, t_tid, t_none, t_overrun, t_tick, t_past, t_thread;
static double armed_mono, ready_mono, armed_cpu, ready_cpu, past_next, ready_boot;
static int overrun0;
static char timers0[4096];
static volatile sig_atomic_t ticks, tick_bad;
static void *want_overrun_value = V_OVERRUN;

static void on_tick(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	if (si->si_code != SI_TIMER || si->si_value.sival_int != V_TICK || si->si_timerid != (int)(long)t_tick)
		tick_bad = 1;
	ticks++;
}

static void make(clockid_t clk, int notify, int signo, union sigval v, timer_t *out)
{
	struct sigevent se;

	memset(&se, 0, sizeof(se));
	se.sigev_notify = notify;
	se.sigev_signo = signo;
	se.sigev_value = v;
	if (notify == SIGEV_THREAD_ID)
		se._sigev_un._tid = (pid_t)syscall(SYS_gettid);
	if (timer_create(clk, &se, out))
		laz_die("timer_create clock %d", (int)clk);
}

static void arm(timer_t t, long iv_ns, double value_s)
{
	struct itimerspec its;

	its.it_interval.tv_sec = iv_ns / 1000000000L;
	its.it_interval.tv_nsec = iv_ns % 1000000000L;
	its.it_value.tv_sec = (time_t)value_s;
	its.it_value.tv_nsec = (long)((value_s - (double)(time_t)value_s) * 1e9);
	if (timer_settime(t, 0, &its, NULL))
		laz_die("timer_settime");
}

static double left(timer_t t, double *interval)
{
	struct itimerspec its;

	if (timer_gettime(t, &its)) {
		laz_failf("timer_gettime(%ld): %s", (long)t, strerror(errno));
		return -1;
	}
	if (interval)
		*interval = (double)its.it_interval.tv_sec + (double)its.it_interval.tv_nsec / 1e9;
	return (double)its.it_value.tv_sec + (double)its.it_value.tv_nsec / 1e9;
}

/* /proc/self/timers with its blocks in a fixed order (by id), so that the listing order does not matter. */
static void timers_text(char *out, size_t len)
{
	char buf[4096], *blocks[16], *p;
	ssize_t r = laz_slurp("/proc/self/timers", buf, sizeof(buf) - 1);
	int n = 0, i, j;

	out[0] = '\0';
	if (r < 0)
		return;
	buf[r] = '\0';
	/* Each block starts with an "ID: " line; cut the text before every one but the first. */
	for (p = buf; p && *p && n < 16; p = strstr(p, "\nID: ")) {
		if (*p == '\n')
			*p++ = '\0';
		blocks[n++] = p;
	}
	for (i = 0; i < n; i++)
		for (j = i + 1; j < n; j++)
			if (atoi(blocks[j] + 4) < atoi(blocks[i] + 4)) {
				p = blocks[i];
				blocks[i] = blocks[j];
				blocks[j] = p;
			}
	for (i = 0; i < n; i++) {
		size_t l = strlen(blocks[i]);

		while (l && blocks[i][l - 1] == '\n')
			blocks[i][--l] = '\0';
		strncat(out, blocks[i], len - strlen(out) - 2);
		strcat(out, "\n");
	}
}

static void setup(void)
{
	struct sigaction sa;
	struct timespec zero = { 0, 0 };
	siginfo_t si;
	sigset_t set;
	double t;

	sigemptyset(&set);
	sigaddset(&set, SIG_OVERRUN);
	sigaddset(&set, SIG_ONESHOT);
	sigaddset(&set, SIG_CPU);
	sigaddset(&set, SIG_PAST);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		laz_die("sigprocmask");
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_tick;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIG_TICK, &sa, NULL))
		laz_die("sigaction");

	make(CLOCK_MONOTONIC, SIGEV_NONE, 0, (union sigval){ 0 }, &t_deleted);
	make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_ONESHOT, (union sigval){ .sival_ptr = V_ONESHOT }, &t_oneshot);
	make(CLOCK_PROCESS_CPUTIME_ID, SIGEV_SIGNAL, SIG_CPU, (union sigval){ .sival_int = 22 }, &t_cpu);
	if (timer_delete(t_deleted))
		laz_die("timer_delete");
	make(CLOCK_REALTIME, SIGEV_THREAD_ID, SIGUSR1, (union sigval){ .sival_int = V_TID }, &t_tid);
	make(CLOCK_BOOTTIME, SIGEV_NONE, 0, (union sigval){ 0 }, &t_none);
	make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_OVERRUN, (union sigval){ .sival_ptr = V_OVERRUN }, &t_overrun);
	make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_TICK, (union sigval){ .sival_int = V_TICK }, &t_tick);
	make(CLOCK_BOOTTIME, SIGEV_SIGNAL, SIG_PAST, (union sigval){ .sival_int = 99 }, &t_past);
	make(CLOCK_THREAD_CPUTIME_ID, SIGEV_SIGNAL, SIG_CPU, (union sigval){ .sival_int = 33 }, &t_thread);
	if ((long)t_oneshot == 0)
		laz_die("timer ids start at 0 although the first was deleted");

	armed_mono = laz_now(CLOCK_MONOTONIC);
	arm(t_oneshot, 0, ONESHOT_S);
	armed_cpu = laz_now(CLOCK_PROCESS_CPUTIME_ID);
	arm(t_cpu, 0, CPU_S);
	arm(t_thread, 0, CPU_S);
	while (laz_now(CLOCK_PROCESS_CPUTIME_ID) - armed_cpu < 0.2)
		;
	arm(t_none, NONE_PERIOD_NS, NONE_PERIOD_NS / 1e9);
	arm(t_tick, TICK_NS, TICK_NS / 1e9);

	/* Let the blocked periodic timer expire several times, then take one signal: overrun count >= 1. */
	arm(t_overrun, OVERRUN_NS, OVERRUN_NS / 1e9);
	t = laz_now(CLOCK_MONOTONIC);
	while (laz_now(CLOCK_MONOTONIC) - t < 0.055)
		usleep(5000); /* the tick handler cuts sleeps short */
	sigemptyset(&set);
	sigaddset(&set, SIG_OVERRUN);
	if (sigtimedwait(&set, &si, &zero) != SIG_OVERRUN)
		laz_die("no overrun signal");
	overrun0 = timer_getoverrun(t_overrun);
	if (overrun0 < 1 || si.si_overrun != overrun0)
		laz_die("overrun %d (si_overrun %d)", overrun0, si.si_overrun);
	laz_log("# overrun count %d", overrun0);
	/* Its next signal is pending (blocked) from here on, at the dump too. */
	t = laz_now(CLOCK_MONOTONIC);
	do {
		usleep(1000);
		sigpending(&set);
	} while (!sigismember(&set, SIG_OVERRUN) && laz_now(CLOCK_MONOTONIC) - t < 1.0);
	if (!sigismember(&set, SIG_OVERRUN))
		laz_die("the overrun timer did not fire again");

	/*
	 * A periodic timer whose first expiry lies 3.5 intervals in the past: it fires at once, and taking
	 * its signal counts 3 missed expiries; the next one is half an interval (5 s) away, so nothing is
	 * pending at the dump: the overrun count alone must come back.
	 */
	{
		struct itimerspec its = { { PAST_IV_S, 0 }, { 0, 0 } };
		double first = laz_now(CLOCK_BOOTTIME) - 3.5 * PAST_IV_S;

		if (first < 1)
			laz_die("the machine booted less than %ld s ago", 4 * PAST_IV_S);
		its.it_value.tv_sec = (time_t)first;
		its.it_value.tv_nsec = (long)((first - (double)(time_t)first) * 1e9);
		sigemptyset(&set);
		sigaddset(&set, SIG_PAST);
		if (timer_settime(t_past, TIMER_ABSTIME, &its, NULL) ||
		    sigtimedwait(&set, &si, &(struct timespec){ 1, 0 }) != SIG_PAST)
			laz_die("past timer");
		if (timer_getoverrun(t_past) != PAST_OVERRUN)
			laz_die("past timer overrun %d", timer_getoverrun(t_past));
		past_next = first + 4 * PAST_IV_S;
	}

	timers_text(timers0, sizeof(timers0));
	ready_mono = laz_now(CLOCK_MONOTONIC);
	ready_boot = laz_now(CLOCK_BOOTTIME);
	ready_cpu = laz_now(CLOCK_PROCESS_CPUTIME_ID);
}

static void corrupt(void)
{
	if (laz_corrupt("ids"))
		timer_delete(t_tid);
	if (laz_corrupt("next_id")) {
		timer_t extra;

		make(CLOCK_MONOTONIC, SIGEV_NONE, 0, (union sigval){ 0 }, &extra);
		timer_delete(extra);
	}
	if (laz_corrupt("interval"))
		arm(t_none, NONE_PERIOD_NS + 1, NONE_PERIOD_NS / 1e9);
	if (laz_corrupt("remaining"))
		arm(t_oneshot, 0, ONESHOT_S);
	if (laz_corrupt("cpu"))
		arm(t_cpu, 0, CPU_S);
	if (laz_corrupt("thread_cpu"))
		arm(t_thread, 0, CPU_S);
	if (laz_corrupt("overrun")) {
		struct itimerspec its;

		timer_gettime(t_overrun, &its);
		timer_settime(t_overrun, 0, &its, NULL); /* resets the overrun count */
	}
	if (laz_corrupt("pending")) {
		struct timespec zero = { 0, 0 };
		sigset_t set;

		sigemptyset(&set);
		sigaddset(&set, SIG_OVERRUN);
		sigtimedwait(&set, NULL, &zero);
		arm(t_overrun, 0, 0); /* disarmed: nothing pending, nothing to come */
	}
	if (laz_corrupt("value"))
		want_overrun_value = (void *)((unsigned long)V_OVERRUN ^ 1);
	if (laz_corrupt("fires"))
		arm(t_tick, 0, 0);
	if (laz_corrupt("past")) {
		struct itimerspec its;

		timer_gettime(t_past, &its);
		timer_settime(t_past, 0, &its, NULL);
	}
}

static void verify(void)
{
	double now_mono = laz_now(CLOCK_MONOTONIC), now_cpu = laz_now(CLOCK_PROCESS_CPUTIME_ID);
	double iv, r, burnt = ready_cpu - armed_cpu;
	int ov = timer_getoverrun(t_overrun), base, sig;
	char text[4096];
	struct timespec wait = { 1, 0 };
	siginfo_t si;
	sigset_t set;

	/* First, before any signal of the timer can be delivered. */
	LAZ_CHECK(ov == overrun0, "overrun count %d, expected %d", ov, overrun0);
	ov = timer_getoverrun(t_past);
	r = left(t_past, &iv);
	{
		double now_boot = laz_now(CLOCK_BOOTTIME);

		/* Time left counts from the restore: at most what was left at READY, and the timer still waits. */
		LAZ_CHECK(ov == PAST_OVERRUN && iv == PAST_IV_S && r > 0 && r <= past_next - ready_boot &&
			  r >= past_next - now_boot - 0.001,
			  "past timer: overrun %d (expected %d), interval %.3f, %.6f s left, expected in [%.6f, %.6f]", ov,
			  PAST_OVERRUN, iv, r, past_next - now_boot, past_next - ready_boot);
	}

	/* The next new timer gets the id after the newest one, as in a process never dumped. */
	{
		timer_t next;

		make(CLOCK_MONOTONIC, SIGEV_NONE, 0, (union sigval){ 0 }, &next);
		LAZ_CHECK((long)next == (long)t_thread + 1, "a new timer got id %ld, expected %ld", (long)next,
			  (long)t_thread + 1);
		timer_delete(next);
	}
	timers_text(text, sizeof(text));
	LAZ_CHECK(strcmp(text, timers0) == 0, "/proc/self/timers differs: '%s', expected '%s'", text, timers0);

	r = left(t_oneshot, &iv);
	LAZ_CHECK(iv == 0 && r > 0 && r <= ONESHOT_S - (ready_mono - armed_mono) &&
		  r >= ONESHOT_S - (now_mono - armed_mono) - 0.001,
		  "monotonic one-shot: %.6f s left (interval %.3f), expected in [%.6f, %.6f]", r, iv,
		  ONESHOT_S - (now_mono - armed_mono), ONESHOT_S - (ready_mono - armed_mono));
	/* The CPU clock restarts in the new process: left = CPU_S - CPU used up to the dump - CPU used since. */
	r = left(t_cpu, &iv);
	LAZ_CHECK(iv == 0 && r <= CPU_S - burnt && r >= CPU_S - burnt - 0.2 - now_cpu,
		  "CPU-time one-shot: %.6f s left, expected in [%.6f, %.6f]", r, CPU_S - burnt - 0.2 - now_cpu,
		  CPU_S - burnt);
	r = left(t_thread, &iv);
	LAZ_CHECK(iv == 0 && r <= CPU_S - burnt && r >= CPU_S - burnt - 0.2 - now_cpu,
		  "thread CPU-time one-shot: %.6f s left, expected in [%.6f, %.6f]", r, CPU_S - burnt - 0.2 - now_cpu,
		  CPU_S - burnt);
	r = left(t_tid, &iv);
	LAZ_CHECK(r == 0 && iv == 0, "disarmed timer: %.6f s left, interval %.6f", r, iv);
	r = left(t_none, &iv);
	LAZ_CHECK(iv == NONE_PERIOD_NS / 1e9 && r > 0 && r <= NONE_PERIOD_NS / 1e9,
		  "SIGEV_NONE periodic: interval %.9f, %.6f s left", iv, r);
	r = left(t_overrun, &iv);
	LAZ_CHECK(iv == OVERRUN_NS / 1e9 && r > 0 && r <= OVERRUN_NS / 1e9, "overrun timer: interval %.9f, %.6f left",
		  iv, r);

	/* Its signal was pending at the dump (it expired while blocked): it comes at once, from the timer. */
	sigemptyset(&set);
	sigaddset(&set, SIG_OVERRUN);
	if (sigtimedwait(&set, &si, &(struct timespec){ 0, 0 }) != SIG_OVERRUN)
		laz_failf("the overrun timer's signal is not pending");
	else
		LAZ_CHECK(si.si_code == SI_TIMER && si.si_timerid == (int)(long)t_overrun &&
			  si.si_value.sival_ptr == want_overrun_value && si.si_overrun == timer_getoverrun(t_overrun),
			  "overrun timer signal: code %d timer %d value %p overrun %d/%d", si.si_code, si.si_timerid,
			  si.si_value.sival_ptr, si.si_overrun, timer_getoverrun(t_overrun));
	/* And the next one, with the same value (the tick handler may cut the wait short). */
	while ((sig = sigtimedwait(&set, &si, &wait)) < 0 && errno == EINTR && laz_now(CLOCK_MONOTONIC) - now_mono < 1.0)
		;
	if (sig != SIG_OVERRUN) {
		r = left(t_overrun, &iv);
		laz_failf("the overrun timer no longer fires (%.6f s left, interval %.6f)", r, iv);
	}
	else
		LAZ_CHECK(si.si_value.sival_ptr == want_overrun_value, "overrun timer value %p", si.si_value.sival_ptr);

	base = ticks;
	while (ticks < base + 3 && laz_now(CLOCK_MONOTONIC) - now_mono < 2.0)
		usleep(5000);
	LAZ_CHECK(ticks >= base + 3, "periodic handler timer fired %d times in 2 s", ticks - base);
	LAZ_CHECK(!tick_bad, "a tick came with the wrong si_code, si_value or timer id");
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { verify, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
