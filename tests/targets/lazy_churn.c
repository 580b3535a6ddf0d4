/*
 * lazy_churn.c - exercises page copies cut short by events, under a lazy restore with the background
 * transfer.
 *
 *   lazy_churn LOGFILE [ROUNDS]
 *
 * Setup fills a 128 MiB anonymous region with a pattern and maps a small churn range beside it, then waits
 * for SIGUSR2. Right after the restore it raises ROUNDS (default 3000) userfaultfd events without touching the
 * region: MADV_DONTNEED of the churn range (an UFFD_EVENT_REMOVE; the kernel refuses fills while one is
 * unread) and a write to it. Meanwhile the server's background transfer copies the region in large pieces; a
 * piece whose copy had to drop its locks (to fault in a page of the page file) and then met an event stops
 * with EAGAIN and the count of bytes done, without saying why. Only then the region is checked whole: every
 * page must hold its data. A page taken as filled by mistake reads as zeros (the server zero-fills what it
 * thinks it has, and the kernel does once the process is complete and unregistered).
 */
#include "common.h"

#include <sys/mman.h>

#define MIB (1UL << 20)
#define REGION (128 * MIB)
#define CHURN (16 * LAZ_PAGE)
#define SEED 0x3333ULL

static unsigned char *region, *churn;

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	long rounds = argc > 2 ? atol(argv[2]) : 3000;

	region = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	churn = mmap(NULL, CHURN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED || churn == MAP_FAILED)
		laz_die("mmap");
	laz_fill_offset(region, REGION, 0, SEED);
	memset(churn, 0x5a, CHURN);
	laz_ready("region");
	laz_wait_usr2();

	for (long i = 0; i < rounds; i++) {
		if (madvise(churn, CHURN, MADV_DONTNEED)) {
			laz_failf("MADV_DONTNEED: %s", strerror(errno));
			break;
		}
		churn[(i % 16) * LAZ_PAGE] = (unsigned char)i;
	}
	if (laz_corrupt("region"))
		region[REGION - 2 * LAZ_PAGE + 5] ^= 0x40;
	long bad = laz_find_mismatch_offset(region, REGION, 0, SEED);
	LAZ_CHECK(bad < 0, "region differs at offset %#lx (page %s)", (unsigned long)bad,
		  bad >= 0 && !region[bad & ~(LAZ_PAGE - 1)] ? "starts with zero" : "holds other data");
	laz_finish();
}
