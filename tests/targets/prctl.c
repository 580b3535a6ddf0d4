/*
 * prctl.c - exercises the per-process prctl() state a program sets on itself: child subreaper, parent-death
 * signal, no_new_privs, THP disable (with PR_THP_DISABLE_EXCEPT_ADVISED where the kernel has it), MCE
 * kill policy, keep-caps, dumpable, the TSC mode (PR_TSC_SIGSEGV: no clock_gettime() after it, the
 * vdso reads the TSC), KSM merging of the whole process (PR_SET_MEMORY_MERGE) where the kernel has KSM,
 * speculation control where the CPU lets a process choose it, memory-deny-write-execute, and the
 * capability sets: a capability dropped from the bounding set, one dropped from permitted and effective,
 * one added to the inheritable and ambient sets; CPUID faulting (arch_prctl ARCH_SET_CPUID 0) and the
 * private futex hash size (PR_FUTEX_HASH) where the CPU and kernel have them.
 *
 * The parent-death signal is SIGWINCH (ignored by default): after `restore -d` the parent is the
 * restorer, which exits, and the kernel sends it then; the setting must still read back.
 *
 * Usage: prctl LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif
#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_GET_MDWE 66
#define PR_MDWE_REFUSE_EXEC_GAIN 1
#endif
#define THP_EXCEPT_ADVISED 2
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#define PR_FUTEX_HASH 78
#define FUTEX_SLOTS 16
#define CAP_DROP_BND CAP_NET_RAW
#define CAP_DROP_PRM CAP_SYS_TIME
#define CAP_ADD_AMB CAP_CHOWN

static const char POINTS[] = "subreaper pdeathsig nnp thp mce keepcaps dumpable tsc ksm spec mdwe bounding permitted "
			     "inheritable ambient cpuid futex";

static int cpuid0 = -1, futex0 = -1;
static int thp0, ksm0 = -1, spec0 = -1, nnp0 = 1, mdwe0 = PR_MDWE_REFUSE_EXEC_GAIN;
static struct __user_cap_data_struct caps0[2];

static int capget2(struct __user_cap_data_struct d[2])
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };

	return (int)syscall(SYS_capget, &h, d);
}

static int capset2(struct __user_cap_data_struct d[2])
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };

	return (int)syscall(SYS_capset, &h, d);
}

static int getint(int option)
{
	int v = -1;

	if (prctl(option, &v, 0, 0, 0))
		return -1000 - errno;
	return v;
}

static void setup(void)
{
	struct __user_cap_data_struct d[2];

	if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) || prctl(PR_SET_PDEATHSIG, SIGWINCH, 0, 0, 0))
		laz_die("subreaper/pdeathsig");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		laz_die("no_new_privs");
	if (prctl(PR_SET_THP_DISABLE, 1, THP_EXCEPT_ADVISED, 0, 0) && prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0))
		laz_die("PR_SET_THP_DISABLE");
	thp0 = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
	if (prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0))
		laz_die("PR_MCE_KILL");
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0))
		laz_die("keepcaps/dumpable");
	if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0)
		ksm0 = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
	else
		laz_log("# no KSM here (PR_SET_MEMORY_MERGE: %s)", strerror(errno));
	if (prctl(PR_GET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, 0, 0, 0) & PR_SPEC_PRCTL) {
		if (prctl(PR_SET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, PR_SPEC_DISABLE, 0, 0))
			laz_die("PR_SET_SPECULATION_CTRL");
		spec0 = prctl(PR_GET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, 0, 0, 0);
	} else {
		laz_log("# speculative store bypass is not under prctl control on this CPU");
	}

	if (prctl(PR_CAPBSET_DROP, CAP_DROP_BND, 0, 0, 0))
		laz_die("PR_CAPBSET_DROP");
	if (capget2(d))
		laz_die("capget");
	d[0].permitted &= ~(1u << CAP_DROP_PRM);
	d[0].effective &= ~(1u << CAP_DROP_PRM);
	d[0].inheritable |= 1u << CAP_ADD_AMB;
	if (capset2(d) || prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_ADD_AMB, 0, 0))
		laz_die("capset/ambient");
	capget2(caps0);

	if (prctl(PR_FUTEX_HASH, 1, FUTEX_SLOTS, 0, 0) == 0)
		futex0 = (int)prctl(PR_FUTEX_HASH, 2, 0, 0, 0);
	else
		laz_log("# no private futex hash here (PR_FUTEX_HASH: %s)", strerror(errno));
	/* Last: no executable mapping may gain write access from here, no clock_gettime() (TSC), no CPUID. */
	if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) == 0)
		cpuid0 = (int)syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0);
	else
		laz_log("# no CPUID faulting here (ARCH_SET_CPUID: %s)", strerror(errno));
	if (prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0))
		laz_die("PR_SET_MDWE");
	if (prctl(PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0))
		laz_die("PR_SET_TSC");
}

static void corrupt(void)
{
	if (laz_corrupt("subreaper"))
		prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
	if (laz_corrupt("pdeathsig"))
		prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0);
	if (laz_corrupt("nnp"))
		nnp0 = 0; /* no_new_privs cannot be cleared: expect the other value instead */
	if (laz_corrupt("thp"))
		prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0);
	if (laz_corrupt("mce"))
		prctl(PR_MCE_KILL, PR_MCE_KILL_CLEAR, 0, 0, 0);
	if (laz_corrupt("keepcaps"))
		prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
	if (laz_corrupt("dumpable"))
		prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
	if (laz_corrupt("tsc"))
		prctl(PR_SET_TSC, PR_TSC_ENABLE, 0, 0, 0);
	if (laz_corrupt("ksm"))
		ksm0 = ksm0 >= 0 ? (prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0), ksm0) : -2;
	if (laz_corrupt("spec"))
		spec0 = spec0 >= 0 ? spec0 ^ PR_SPEC_PRCTL : -2;
	if (laz_corrupt("mdwe"))
		mdwe0 = 0; /* nor can MDWE */
	if (laz_corrupt("bounding"))
		prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0);
	if (laz_corrupt("permitted")) {
		struct __user_cap_data_struct d[2];

		capget2(d);
		d[0].permitted &= ~(1u << CAP_KILL);
		d[0].effective &= ~(1u << CAP_KILL);
		capset2(d);
	}
	if (laz_corrupt("inheritable")) {
		struct __user_cap_data_struct d[2];

		capget2(d);
		d[0].inheritable |= 1u << CAP_FOWNER;
		capset2(d);
	}
	if (laz_corrupt("cpuid"))
		cpuid0 = cpuid0 >= 0 ? (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1), cpuid0) : -2;
	if (laz_corrupt("futex"))
		futex0 = futex0 >= 0 ? futex0 + 1 : -2;
	if (laz_corrupt("ambient"))
		prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, CAP_ADD_AMB, 0, 0);
}

static void verify(void)
{
	struct __user_cap_data_struct d[2];
	int v;

	v = getint(PR_GET_CHILD_SUBREAPER);
	LAZ_CHECK(v == 1, "child subreaper %d, expected 1", v);
	v = getint(PR_GET_PDEATHSIG);
	LAZ_CHECK(v == SIGWINCH, "parent-death signal %d, expected %d", v, SIGWINCH);
	v = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
	LAZ_CHECK(v == nnp0, "no_new_privs %d, expected %d", v, nnp0);
	v = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
	LAZ_CHECK(v == thp0, "THP disable %d, expected %d", v, thp0);
	v = prctl(PR_MCE_KILL_GET, 0, 0, 0, 0);
	LAZ_CHECK(v == PR_MCE_KILL_EARLY, "MCE kill policy %d, expected early", v);
	v = prctl(PR_GET_KEEPCAPS, 0, 0, 0, 0);
	LAZ_CHECK(v == 1, "keepcaps %d", v);
	v = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
	LAZ_CHECK(v == 0, "dumpable %d, expected 0", v);
	v = getint(PR_GET_TSC);
	LAZ_CHECK(v == PR_TSC_SIGSEGV, "TSC mode %d, expected PR_TSC_SIGSEGV", v);
	if (ksm0 != -1) {
		v = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
		LAZ_CHECK(v == ksm0, "memory merge %d, expected %d", v, ksm0);
	}
	if (spec0 != -1) {
		v = prctl(PR_GET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, 0, 0, 0);
		LAZ_CHECK(v == spec0, "speculation control %#x, expected %#x", v, spec0);
	}
	v = prctl(PR_GET_MDWE, 0, 0, 0, 0);
	LAZ_CHECK(v == mdwe0, "MDWE %d, expected %d", v, mdwe0);

	if (cpuid0 != -1) {
		v = (int)syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0);
		LAZ_CHECK(v == cpuid0, "ARCH_GET_CPUID %d, expected %d", v, cpuid0);
	}
	if (futex0 != -1) {
		v = prctl(PR_FUTEX_HASH, 2, 0, 0, 0);
		LAZ_CHECK(v == futex0, "futex hash slots %d, expected %d", v, futex0);
	}
	LAZ_CHECK(prctl(PR_CAPBSET_READ, CAP_DROP_BND, 0, 0, 0) == 0, "CAP_NET_RAW is back in the bounding set");
	LAZ_CHECK(prctl(PR_CAPBSET_READ, CAP_SYS_NICE, 0, 0, 0) == 1, "CAP_SYS_NICE left the bounding set");
	if (capget2(d))
		laz_failf("capget: %s", strerror(errno));
	LAZ_CHECK(d[0].permitted == caps0[0].permitted && d[1].permitted == caps0[1].permitted &&
		  d[0].effective == caps0[0].effective && d[1].effective == caps0[1].effective,
		  "permitted/effective %#x%08x/%#x%08x, expected %#x%08x/%#x%08x", d[1].permitted, d[0].permitted,
		  d[1].effective, d[0].effective, caps0[1].permitted, caps0[0].permitted, caps0[1].effective,
		  caps0[0].effective);
	LAZ_CHECK(d[0].inheritable == caps0[0].inheritable && d[1].inheritable == caps0[1].inheritable,
		  "inheritable %#x%08x, expected %#x%08x", d[1].inheritable, d[0].inheritable, caps0[1].inheritable,
		  caps0[0].inheritable);
	v = prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_ADD_AMB, 0, 0);
	LAZ_CHECK(v == 1, "CAP_CHOWN ambient %d", v);
}

int main(int argc, char **argv)
{
	static const laz_step checks[] = { verify, NULL };

	laz_main(argc, argv, POINTS, setup, corrupt, checks);
}
