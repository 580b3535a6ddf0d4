/*
 * survivor.c - exercises a dump that finishes, fails or is killed half way: the process must come
 * out of it exactly as it went in. State: a known blocked mask (SIGUSR2, SIGWINCH, SIGRTMIN+2),
 * handlers (SIGUSR1 counting, SIGTERM with SA_SIGINFO|SA_RESTART|SA_ONSTACK and a sa_mask, SIGHUP
 * ignored; every disposition 1..64 is compared), a blocked pending SIGWINCH, a sigaltstack, its
 * memory map (no mapping added or removed, e.g. a dump's scratch page left behind), and five
 * callee-saved registers (rbx, r12-r15) holding known values across the raw nanosleep() it loops
 * in, whose result must be 0 or -EINTR. A SIGCONT handler counts its calls (reported, not checked:
 * a stop and continue is legitimate).
 *
 * Each SIGUSR1 asks for a check while it keeps running: it logs "# check N ok (SIGCONT handled M
 * times)" or "# check N FAIL: what" (N counts the SIGUSR1s it received, so a lost or doubled one
 * shows).
 *
 * Usage: survivor LOGFILE
 * Trigger: SIGUSR2 (final check, PASS or FAIL).
 */
#include "common.h"

#include <sys/syscall.h>

#define MAPS_MAX (64 * 1024)
#define ALTSTACK_SIZE (64 * 1024)
#define NSIGS 64

static const char POINTS[] = "mask handlers pending maps regs usr1 altstack";

static volatile sig_atomic_t usr1_count, cont_count;
static unsigned checks_done;
static sigset_t want_mask;
static struct sigaction want_act[NSIGS + 1];
static int have_act[NSIGS + 1];
static char want_maps[MAPS_MAX], cur_maps[MAPS_MAX];
static stack_t want_ss;
static long bad_regs, bad_ret;
static int corrupt_regs;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

static void on_cont(int sig)
{
	(void)sig;
	cont_count++;
}

static void on_term(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)si;
	(void)uc;
}

/*
 * "start-end perms" of every mapping, one a line, adjacent ones with the same perms merged (a restore may
 * merge what the kernel had split): what a leftover or lost mapping changes.
 */
static void read_maps(char *out)
{
	static char raw[MAPS_MAX * 4];
	size_t o = 0;
	ssize_t n = laz_slurp("/proc/self/maps", raw, sizeof(raw) - 1);
	unsigned long start, end, cur_start = 0, cur_end = 0;
	char perms[8], cur_perms[8] = "";

	if (n < 0)
		laz_die("open maps");
	raw[n] = '\0';
	out[0] = '\0';
	for (char *line = raw; *line;) {
		char *nl = strchr(line, '\n');

		if (sscanf(line, "%lx-%lx %7s", &start, &end, perms) == 3) {
			if (start == cur_end && !strcmp(perms, cur_perms)) {
				cur_end = end;
			} else {
				if (cur_end && o < MAPS_MAX - 64)
					o += (size_t)snprintf(out + o, MAPS_MAX - o, "%lx-%lx %s\n", cur_start, cur_end,
							      cur_perms);
				cur_start = start;
				cur_end = end;
				strcpy(cur_perms, perms);
			}
		}
		if (!nl)
			break;
		line = nl + 1;
	}
	if (cur_end && o < MAPS_MAX - 64)
		snprintf(out + o, MAPS_MAX - o, "%lx-%lx %s\n", cur_start, cur_end, cur_perms);
}

/* One raw nanosleep(2 ms) with known values in rbx and r12-r15; any change is counted in bad_regs. */
static void sleep_holding_regs(void)
{
	struct timespec ts = { 0, 2000000 };
	long bad, ret;

	__asm__ volatile(
		"movabs $0x1111111111111111, %%rbx\n\t"
		"movabs $0x1212121212121212, %%r12\n\t"
		"movabs $0x1313131313131313, %%r13\n\t"
		"movabs $0x1414141414141414, %%r14\n\t"
		"movabs $0x1515151515151515, %%r15\n\t"
		"test %[corrupt], %[corrupt]\n\t"
		"jz 1f\n\t"
		"xor $1, %%r13\n\t"
		"1:\n\t"
		"mov %[ts], %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"mov $35, %%eax\n\t"
		"syscall\n\t"
		"xor %%edx, %%edx\n\t"
		"movabs $0x1111111111111111, %%rcx\n\t"
		"xor %%rcx, %%rbx\n\t"
		"or %%rbx, %%rdx\n\t"
		"movabs $0x1212121212121212, %%rcx\n\t"
		"xor %%rcx, %%r12\n\t"
		"or %%r12, %%rdx\n\t"
		"movabs $0x1313131313131313, %%rcx\n\t"
		"xor %%rcx, %%r13\n\t"
		"or %%r13, %%rdx\n\t"
		"movabs $0x1414141414141414, %%rcx\n\t"
		"xor %%rcx, %%r14\n\t"
		"or %%r14, %%rdx\n\t"
		"movabs $0x1515151515151515, %%rcx\n\t"
		"xor %%rcx, %%r15\n\t"
		"or %%r15, %%rdx\n\t"
		: "=a"(ret), "=d"(bad)
		: [ts] "r"(&ts), [corrupt] "r"((long)corrupt_regs)
		: "rbx", "rcx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
		  "memory", "cc");
	if (bad)
		bad_regs++;
	if (ret != 0 && ret != -EINTR)
		bad_ret = ret ? ret : bad_ret;
}

static int same_set(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s <= NSIGS; s++)
		if (sigismember(a, s) != sigismember(b, s))
			return 0;
	return 1;
}

static void check(void)
{
	sigset_t cur, pend;
	stack_t ss;

	if (sigprocmask(SIG_SETMASK, NULL, &cur))
		laz_die("sigprocmask");
	for (int s = 1; s <= NSIGS; s++)
		LAZ_CHECK(sigismember(&cur, s) == sigismember(&want_mask, s), "signal %d %sblocked", s,
			  sigismember(&cur, s) ? "" : "not ");
	for (int s = 1; s <= NSIGS; s++) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		if (!have_act[s] || sigaction(s, NULL, &sa))
			continue;
		LAZ_CHECK(sa.sa_handler == want_act[s].sa_handler && sa.sa_flags == want_act[s].sa_flags &&
				  same_set(&sa.sa_mask, &want_act[s].sa_mask),
			  "disposition of signal %d changed", s);
	}
	if (sigpending(&pend))
		laz_die("sigpending");
	for (int s = 1; s <= NSIGS; s++) {
		if (s == SIGUSR2 || s == SIGUSR1)
			continue;
		LAZ_CHECK(sigismember(&pend, s) == (s == SIGWINCH), "signal %d %spending", s,
			  sigismember(&pend, s) ? "" : "not ");
	}
	read_maps(cur_maps);
	if (strcmp(cur_maps, want_maps)) {
		size_t i = 0;

		while (cur_maps[i] && cur_maps[i] == want_maps[i])
			i++;
		while (i > 0 && cur_maps[i - 1] != '\n')
			i--;
		laz_failf("memory map changed at: %.40s", cur_maps + i);
		for (char *p = laz_fail_buf; *p; p++)
			if (*p == '\n')
				*p = ' ';
	}
	LAZ_CHECK(!bad_regs, "callee-saved registers changed across nanosleep %ld times", bad_regs);
	LAZ_CHECK(!bad_ret, "nanosleep returned %ld", bad_ret);
	LAZ_CHECK(checks_done == (unsigned)usr1_count, "%u checks asked for, %d SIGUSR1 received",
		  checks_done, (int)usr1_count);
	if (sigaltstack(NULL, &ss))
		laz_die("sigaltstack");
	LAZ_CHECK(ss.ss_sp == want_ss.ss_sp && ss.ss_size == want_ss.ss_size && ss.ss_flags == want_ss.ss_flags,
		  "sigaltstack changed");
}

static void corrupt(void)
{
	if (laz_corrupt("mask")) {
		sigset_t s;

		sigemptyset(&s);
		sigaddset(&s, SIGQUIT);
		sigprocmask(SIG_BLOCK, &s, NULL);
	}
	if (laz_corrupt("handlers"))
		signal(SIGHUP, SIG_DFL);
	if (laz_corrupt("pending")) {
		sigset_t s;
		struct timespec zero = { 0, 0 };

		sigemptyset(&s);
		sigaddset(&s, SIGWINCH);
		sigtimedwait(&s, NULL, &zero);
	}
	if (laz_corrupt("maps")) /* rwx: no neighbour it could merge with */
		mmap(NULL, LAZ_PAGE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (laz_corrupt("regs")) {
		corrupt_regs = 1;
		sleep_holding_regs();
	}
	if (laz_corrupt("usr1"))
		usr1_count++;
	if (laz_corrupt("altstack")) {
		stack_t off = { .ss_flags = SS_DISABLE };

		sigaltstack(&off, NULL);
	}
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	sigset_t block, pend;

	laz_init(argc, argv);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGUSR1, &sa, NULL))
		laz_die("sigaction SIGUSR1");
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_term;
	sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
	sigaddset(&sa.sa_mask, SIGINT);
	sigaddset(&sa.sa_mask, SIGRTMIN + 5);
	if (sigaction(SIGTERM, &sa, NULL))
		laz_die("sigaction SIGTERM");
	signal(SIGHUP, SIG_IGN);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_cont;
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGCONT, &sa, NULL))
		laz_die("sigaction SIGCONT");

	want_ss.ss_sp = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (want_ss.ss_sp == MAP_FAILED)
		laz_die("mmap altstack");
	want_ss.ss_size = ALTSTACK_SIZE;
	if (sigaltstack(&want_ss, NULL) || sigaltstack(NULL, &want_ss))
		laz_die("sigaltstack");

	sigemptyset(&block);
	sigaddset(&block, SIGWINCH);
	sigaddset(&block, SIGRTMIN + 2);
	if (sigprocmask(SIG_BLOCK, &block, NULL) || sigprocmask(SIG_SETMASK, NULL, &want_mask))
		laz_die("sigprocmask");
	raise(SIGWINCH);

	for (int s = 1; s <= NSIGS; s++)
		have_act[s] = sigaction(s, NULL, &want_act[s]) == 0;
	sleep_holding_regs(); /* fault in everything the loop uses before taking the map */
	read_maps(want_maps);

	laz_ready(POINTS);
	for (;;) {
		sleep_holding_regs();
		if (checks_done != (unsigned)usr1_count) {
			int before = laz_nfail;

			checks_done++;
			check();
			if (laz_nfail == before) {
				laz_log("# check %u ok (SIGCONT handled %d times)", checks_done, (int)cont_count);
			} else {
				laz_fail_buf[laz_fail_len] = '\0';
				laz_log("# check %u FAIL: %s", checks_done, laz_fail_buf);
			}
		}
		if (sigpending(&pend))
			laz_die("sigpending");
		if (sigismember(&pend, SIGUSR2))
			break;
	}
	corrupt();
	check();
	laz_finish();
}
