/*
 * guard.c - exercises guard regions (MADV_GUARD_INSTALL, Linux 6.13+): guard pages inside a private
 * anonymous mapping of written pages (two runs, one at the very start), inside a shared anonymous
 * mapping, and a mapping whose guards were installed and removed again (its VmFlags keep "gu").
 * After restore every guard page must fault on access (SIGSEGV, caught), its neighbours must hold
 * their data, never-written pages must read as zeros, and the VmFlags must be as they were.
 *
 * Usage: guard LOGFILE      Trigger: SIGUSR2.
 */
#include "vmflags.h"

#include <setjmp.h>

#define MADV_GUARD_INSTALL 102
#define MADV_GUARD_REMOVE 103
#define NPAGES 16UL

static const char POINTS[] = "guard first shared removed data zero";

static unsigned char *anon, *shared, *removed;
static sigjmp_buf jump;
static volatile sig_atomic_t faults;

static const unsigned long guard_pages[] = { 0, 4, 5, 11 };   /* in anon */
static const unsigned long written[] = { 1, 2, 3, 6, 7, 10, 12, 15 };  /* the rest never touched */

static void on_segv(int sig)
{
	(void)sig;
	faults++;
	siglongjmp(jump, 1);
}

/* Whether reading the byte at P faults. */
static int faults_on_read(const volatile unsigned char *p)
{
	int before = faults;

	if (sigsetjmp(jump, 1) == 0)
		(void)*p;
	return faults != before;
}

static void *map(int flags)
{
	void *p = mmap(NULL, NPAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		laz_die("mmap");
	return p;
}

static void setup(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_segv;
	sa.sa_flags = SA_NODEFER;
	if (sigaction(SIGSEGV, &sa, NULL))
		laz_die("sigaction");
	anon = map(MAP_PRIVATE);
	for (size_t i = 0; i < sizeof(written) / sizeof(written[0]); i++)
		laz_fill(anon + written[i] * LAZ_PAGE, LAZ_PAGE, 0x51);
	for (size_t i = 0; i < sizeof(guard_pages) / sizeof(guard_pages[0]); i++)
		if (madvise(anon + guard_pages[i] * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_INSTALL))
			laz_die("MADV_GUARD_INSTALL");
	shared = map(MAP_SHARED);
	laz_fill(shared, NPAGES * LAZ_PAGE, 0x52);
	if (madvise(shared + 3 * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_INSTALL))
		laz_die("MADV_GUARD_INSTALL shared");
	removed = map(MAP_PRIVATE);
	laz_fill(removed, NPAGES * LAZ_PAGE, 0x53);
	if (madvise(removed + 8 * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_INSTALL) ||
	    madvise(removed + 8 * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_REMOVE))
		laz_die("guard install/remove");
	laz_fill(removed + 8 * LAZ_PAGE, LAZ_PAGE, 0x53);
}

static int is_guard(unsigned long page)
{
	for (size_t i = 0; i < sizeof(guard_pages) / sizeof(guard_pages[0]); i++)
		if (guard_pages[i] == page)
			return 1;
	return 0;
}

static int is_written(unsigned long page)
{
	for (size_t i = 0; i < sizeof(written) / sizeof(written[0]); i++)
		if (written[i] == page)
			return 1;
	return 0;
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	setup();
	laz_ready(POINTS);
	laz_wait_usr2();

	if (laz_corrupt("guard"))
		madvise(anon + 5 * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_REMOVE);
	if (laz_corrupt("first"))
		madvise(anon, LAZ_PAGE, MADV_GUARD_REMOVE);
	if (laz_corrupt("shared"))
		madvise(shared + 3 * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_REMOVE);
	if (laz_corrupt("removed"))
		madvise(removed + 9 * LAZ_PAGE, LAZ_PAGE, MADV_GUARD_INSTALL);
	if (laz_corrupt("data"))
		anon[6 * LAZ_PAGE + 16] ^= 1;
	if (laz_corrupt("zero"))
		anon[8 * LAZ_PAGE] = 1;

	for (unsigned long i = 0; i < NPAGES; i++) {
		unsigned char *p = anon + i * LAZ_PAGE;

		if (is_guard(i)) {
			LAZ_CHECK(faults_on_read(p), "anon page %lu: a guard page that does not fault", i);
		} else if (faults_on_read(p)) {
			laz_failf("anon page %lu faults", i);
		} else if (is_written(i)) {
			LAZ_CHECK(laz_find_mismatch(p, LAZ_PAGE, 0x51) < 0, "anon page %lu: data differs", i);
		} else {
			for (size_t b = 0; b < LAZ_PAGE; b++)
				if (p[b]) {
					laz_failf("anon page %lu: never written, yet not zero", i);
					break;
				}
		}
	}
	for (unsigned long i = 0; i < NPAGES; i++) {
		unsigned char *p = shared + i * LAZ_PAGE;

		if (i == 3)
			LAZ_CHECK(faults_on_read(p), "shared page 3: a guard page that does not fault");
		else if (faults_on_read(p))
			laz_failf("shared page %lu faults", i);
		else
			LAZ_CHECK(laz_find_mismatch(p, LAZ_PAGE, 0x52) < 0, "shared page %lu: data differs", i);
	}
	for (unsigned long i = 0; i < NPAGES; i++) {
		unsigned char *p = removed + i * LAZ_PAGE;

		if (faults_on_read(p))
			laz_failf("removed-guard mapping: page %lu faults", i);
		else
			LAZ_CHECK(laz_find_mismatch(p, LAZ_PAGE, 0x53) < 0, "removed-guard page %lu: data differs", i);
	}
	laz_expect_vmflags("anon", anon, "rd wr mr mw me gu ac");
	laz_expect_vmflags("removed", removed, "rd wr mr mw me gu ac");
	laz_finish();
}
