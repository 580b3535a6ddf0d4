/*
 * sleeper.c - exercises a process caught inside a blocking system call, which must resume
 * correctly after restore (syscall restart). One mode per run, given as argv[2]:
 *
 *   nanosleep [SECS]   raw nanosleep(req, rem) with req == rem (as glibc's sleep does): must
 *                      return 0, not before its due time (start + SECS, default 3) and less than
 *                      30 s after it. The due time is logged before READY ("# due: T", CLOCK_MONOTONIC
 *                      seconds) so that the harness can require dump and restore to end before it: a
 *                      sleep that a restore ended early then ends before its due time and fails.
 *                      No trigger.
 *   sleep [SECS]       glibc sleep() (clock_nanosleep): same checks. No trigger.
 *   read               blocks in read() on a pipe it holds both ends of (read end fd 20, write
 *                      end fd 21). Trigger: the harness writes "lazarus-wakeup\n" into
 *                      /proc/PID/fd/21; the target checks it got exactly that.
 *   poll               poll() on that pipe with a 20 s timeout, then reads. Same trigger.
 *   sigwait            sigtimedwait() for SIGUSR2 (blocked) with a 30 s timeout. Trigger: SIGUSR2.
 *   futex              FUTEX_WAIT on a word that the SIGUSR2 handler (SA_RESTART) sets; the
 *                      restarted wait then returns. Trigger: SIGUSR2.
 *   pause              pause() until the SIGUSR2 handler ran. Trigger: SIGUSR2.
 *   exit MS            writes READY, sleeps MS milliseconds, logs PASS and exits on its own
 *                      (for dumps racing with exit). No trigger.
 *
 * Every mode also checks a 256 KiB buffer of data. The harness should send the trigger only
 * once the target sleeps in the system call (/proc/PID/syscall), as pause() is racy otherwise.
 *
 * Usage: sleeper LOGFILE MODE [ARG]
 */
#include "common.h"

#include <linux/futex.h>
#include <poll.h>
#include <sys/syscall.h>

#define PIPE_R 20
#define PIPE_W 21
#define WAKEUP "lazarus-wakeup\n"
#define BUF_SIZE (256 * 1024)

static unsigned char buffer[BUF_SIZE];
static volatile uint32_t futex_word;
static volatile sig_atomic_t usr2_count;

static void futex_handler(int sig)
{
	(void)sig;
	futex_word = 1;
	usr2_count++;
	laz_usr2_seen = 1;
}

static void count_handler(int sig)
{
	(void)sig;
	usr2_count++;
	laz_usr2_seen = 1;
}

static void unblock_usr2(void (*fn)(int), int flags)
{
	struct sigaction sa;
	sigset_t set;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = fn;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR2, &sa, NULL))
		laz_die("sigaction");
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
}

static void check_elapsed(double due, long ret)
{
	double now = laz_now(CLOCK_MONOTONIC);

	if (laz_corrupt("elapsed"))
		now = due - 0.001;
	if (laz_corrupt("retval"))
		ret = -1;
	LAZ_CHECK(ret == 0, "sleep returned %ld, expected 0", ret);
	LAZ_CHECK(now >= due, "the sleep ended %.3f s before its due time", due - now);
	LAZ_CHECK(now < due + 30, "the sleep ended %.3f s after its due time", now - due);
}

static void check_wakeup(const char *buf, ssize_t n)
{
	char copy[64];

	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(copy))
		n = sizeof(copy) - 1;
	memcpy(copy, buf, (size_t)n);
	copy[n] = '\0';
	if (laz_corrupt("data"))
		copy[0] ^= 1;
	if (n != (ssize_t)strlen(WAKEUP) || strcmp(copy, WAKEUP) != 0)
		laz_failf("read %zd bytes '%.*s', expected '%s'", n, (int)strcspn(copy, "\n"), copy, "lazarus-wakeup");
}

/* Read the wakeup line, which may arrive in pieces. */
static ssize_t read_line(char *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(PIPE_R, buf + got, len - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
		if (buf[got - 1] == '\n')
			break;
	}
	return (ssize_t)got;
}

int main(int argc, char **argv)
{
	const char *mode;
	const char *arg;
	char buf[64];
	double start;
	int p[2];

	laz_init(argc, argv);
	if (argc < 3)
		laz_die("usage: sleeper LOGFILE MODE [ARG]");
	mode = argv[2];
	arg = argc > 3 ? argv[3] : NULL;
	laz_fill(buffer, sizeof(buffer), 0x51ee);
	if (pipe(p) || dup2(p[0], PIPE_R) != PIPE_R || dup2(p[1], PIPE_W) != PIPE_W)
		laz_die("pipe");
	close(p[0]);
	close(p[1]);

	if (!strcmp(mode, "nanosleep") || !strcmp(mode, "sleep")) {
		int secs = arg ? atoi(arg) : 3;
		struct timespec ts = { .tv_sec = secs, .tv_nsec = 0 };
		long ret;

		start = laz_now(CLOCK_MONOTONIC);
		laz_log("# due: %.6f", start + secs);
		laz_ready("mem elapsed retval");
		if (!strcmp(mode, "nanosleep"))
			ret = syscall(SYS_nanosleep, &ts, &ts);
		else
			ret = (long)sleep((unsigned int)secs);
		check_elapsed(start + secs, ret);
	} else if (!strcmp(mode, "read")) {
		ssize_t n;

		laz_ready("mem data");
		n = read_line(buf, sizeof(buf));
		check_wakeup(buf, n);
	} else if (!strcmp(mode, "poll")) {
		struct pollfd pfd = { .fd = PIPE_R, .events = POLLIN };
		int ret;

		laz_ready("mem data revents");
		ret = poll(&pfd, 1, 20000);
		if (laz_corrupt("revents"))
			pfd.revents = 0;
		LAZ_CHECK(ret == 1 && pfd.revents == POLLIN, "poll returned %d revents %#x, expected 1 POLLIN", ret,
			  pfd.revents);
		if (ret == 1)
			check_wakeup(buf, read_line(buf, sizeof(buf)));
	} else if (!strcmp(mode, "sigwait")) {
		struct timespec timeout = { .tv_sec = 30 };
		siginfo_t si;
		sigset_t set;
		int sig;

		sigemptyset(&set);
		sigaddset(&set, SIGUSR2);
		memset(&si, 0, sizeof(si));
		laz_ready("mem signal");
		sig = sigtimedwait(&set, &si, &timeout);
		if (laz_corrupt("signal"))
			sig = SIGUSR1;
		LAZ_CHECK(sig == SIGUSR2 && si.si_code == SI_USER, "sigtimedwait returned %d (si_code %d), expected %d",
			  sig, si.si_code, SIGUSR2);
	} else if (!strcmp(mode, "futex")) {
		long ret = 0;

		unblock_usr2(futex_handler, SA_RESTART);
		laz_ready("mem word");
		while (futex_word == 0) {
			ret = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
			if (ret && errno != EAGAIN && errno != EINTR)
				break;
		}
		if (laz_corrupt("word"))
			futex_word = 2;
		LAZ_CHECK(futex_word == 1 && usr2_count == 1, "futex word %u after %d signals (ret %ld)",
			  (unsigned int)futex_word, (int)usr2_count, ret);
	} else if (!strcmp(mode, "pause")) {
		unblock_usr2(count_handler, 0);
		laz_ready("mem count");
		while (!laz_usr2_seen)
			pause();
		if (laz_corrupt("count"))
			usr2_count++;
		LAZ_CHECK(usr2_count == 1, "SIGUSR2 handler ran %d times, expected 1", (int)usr2_count);
	} else if (!strcmp(mode, "exit")) {
		laz_ready("mem");
		usleep((useconds_t)(arg ? atoi(arg) : 0) * 1000);
	} else {
		laz_die("unknown mode %s", mode);
	}

	if (laz_corrupt("mem"))
		buffer[BUF_SIZE / 2] ^= 1;
	if (laz_find_mismatch(buffer, sizeof(buffer), 0x51ee) >= 0)
		laz_failf("buffer differs (mode %s)", mode);
	laz_finish();
}
