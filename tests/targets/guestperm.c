/*
 * guestperm.c - exercises the permission for XSTATE features a process's KVM guests may use
 * (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM, Linux 5.17+), which a VMM asks for before creating vCPUs with AMX.
 * Mode "amx" asks for XTILEDATA (component 18); mode "plain" asks for nothing. After restore the guest
 * permission must be exactly what it was: granted in "amx", still the default in "plain".
 *
 * Usage: guestperm LOGFILE amx|plain
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <sys/syscall.h>

#define ARCH_GET_XCOMP_SUPP 0x1021
#define ARCH_GET_XCOMP_GUEST_PERM 0x1024
#define ARCH_REQ_XCOMP_GUEST_PERM 0x1025
#define XFEATURE_XTILEDATA 18

static unsigned long guest_perm(void)
{
	unsigned long v = 0;

	if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_GUEST_PERM, &v))
		laz_die("ARCH_GET_XCOMP_GUEST_PERM");
	return v;
}

int main(int argc, char **argv)
{
	unsigned long supp = 0, before, after;
	int amx = argc > 2 && strcmp(argv[2], "amx") == 0;

	laz_init(argc, argv);
	if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, &supp))
		laz_die("ARCH_GET_XCOMP_SUPP");
	if (amx) {
		if (!(supp & (1UL << XFEATURE_XTILEDATA)))
			laz_die("this CPU offers no AMX tile data (supported %#lx)", supp);
		if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_GUEST_PERM, XFEATURE_XTILEDATA))
			laz_die("ARCH_REQ_XCOMP_GUEST_PERM");
	}
	before = guest_perm();
	laz_log("# guest permission %#lx", before);
	laz_ready("guest_perm");

	laz_wait_usr2();

	if (laz_corrupt("guest_perm")) {
		/* Change the permission itself where the CPU has AMX to request; elsewhere (no AMX: nothing can be
		 * requested) the remembered value, so that the check can fail on every CPU. */
		if (!amx && (supp & (1UL << XFEATURE_XTILEDATA)))
			syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_GUEST_PERM, XFEATURE_XTILEDATA);
		else
			before ^= 1UL << XFEATURE_XTILEDATA;
	}
	after = guest_perm();
	LAZ_CHECK(after == before, "guest XSTATE permission %#lx, expected %#lx", after, before);
	laz_finish();
}
