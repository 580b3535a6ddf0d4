/*
 * refused_proc.c - exercises per-process state a dump must refuse, naming it, and leave untouched:
 *   securebits   SECBIT_NOROOT set (securebits other than keep-caps are not restored);
 *   cpu_overrun  a periodic CPU-time POSIX timer with a non-zero overrun count (restoring the count
 *                needs an expiry in the clock's past, which a new process's CPU clock does not have).
 * After the refused dump, on SIGUSR2, it checks that the state is still what it set up.
 *
 * Usage: refused_proc LOGFILE MODE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <linux/securebits.h>
#include <sys/prctl.h>

static const char POINTS[] = "state";
static timer_t timer;
static int overrun0;

int main(int argc, char **argv)
{
	const char *mode;

	laz_init(argc, argv);
	mode = argc > 2 ? argv[2] : "";
	if (strcmp(mode, "securebits") == 0) {
		if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT, 0, 0, 0))
			laz_die("PR_SET_SECUREBITS");
	} else if (strcmp(mode, "cpu_overrun") == 0) {
		struct sigevent se = { .sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN };
		struct itimerspec its = { { 0, 1000000 }, { 0, 1000000 } };
		struct timespec zero = { 0, 0 };
		sigset_t set;
		double t0;

		sigemptyset(&set);
		sigaddset(&set, SIGRTMIN);
		sigprocmask(SIG_BLOCK, &set, NULL);
		if (timer_create(CLOCK_PROCESS_CPUTIME_ID, &se, &timer) || timer_settime(timer, 0, &its, NULL))
			laz_die("timer");
		t0 = laz_now(CLOCK_PROCESS_CPUTIME_ID);
		while (laz_now(CLOCK_PROCESS_CPUTIME_ID) - t0 < 0.02)
			;
		if (sigtimedwait(&set, NULL, &zero) != SIGRTMIN)
			laz_die("no timer signal");
		overrun0 = timer_getoverrun(timer);
		if (overrun0 < 1)
			laz_die("overrun %d", overrun0);
	} else {
		laz_die("unknown mode '%s'", mode);
	}
	laz_ready(POINTS);

	laz_wait_usr2();

	if (strcmp(mode, "securebits") == 0) {
		if (laz_corrupt("state"))
			prctl(PR_SET_SECUREBITS, 0, 0, 0, 0);
		LAZ_CHECK(prctl(PR_GET_SECUREBITS, 0, 0, 0, 0) == SECBIT_NOROOT, "securebits %#x",
			  prctl(PR_GET_SECUREBITS, 0, 0, 0, 0));
	} else {
		if (laz_corrupt("state"))
			timer_delete(timer);
		LAZ_CHECK(timer_getoverrun(timer) == overrun0, "overrun %d, expected %d", timer_getoverrun(timer),
			  overrun0);
	}
	laz_finish();
}
