/*
 * thp.c - exercises transparent huge pages: 16 MiB of anonymous memory, 2 MiB aligned, MADV_HUGEPAGE,
 * filled with a pattern and collapsed into huge pages (MADV_COLLAPSE, so that the target does not depend on
 * the machine's THP defrag settings). After restore the region must hold the pattern and at least as many
 * huge pages (AnonHugePages of its smaps entry) as before the dump: a restore that leaves it in 4 KiB pages
 * fails.
 *
 * Usage: thp LOGFILE
 * Trigger: SIGUSR2 (for a lazy restore: once every page is in).
 */
#include "common.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

#define HUGE (2UL << 20)
#define SIZE (16UL << 20)

static unsigned char *region;

static long huge_kb(void)
{
	char line[512];
	long kb = -1;
	int in = 0;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;

		size_t hex = strspn(line, "0123456789abcdef");

		if (hex > 0 && line[hex] == '-' && sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
			in = lo <= (unsigned long)region && (unsigned long)region < hi;
			continue;
		}
		if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb;
}

int main(int argc, char **argv)
{
	long before, after;
	size_t bad = 0;
	unsigned char *raw;

	laz_init(argc, argv);
	raw = mmap(NULL, SIZE + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		laz_die("mmap");
	region = (unsigned char *)(((unsigned long)raw + HUGE - 1) & ~(HUGE - 1));
	if (madvise(region, SIZE, MADV_HUGEPAGE))
		laz_die("MADV_HUGEPAGE");
	for (size_t i = 0; i < SIZE; i += 64)
		region[i] = (unsigned char)(i / 64 * 7 + 3);
	if (madvise(region, SIZE, MADV_COLLAPSE))
		laz_die("MADV_COLLAPSE (no transparent huge pages here?)");
	before = huge_kb();
	if (before < (long)(HUGE >> 10))
		laz_die("no huge page in the region after MADV_COLLAPSE (AnonHugePages %ld kB)", before);
	laz_log("# huge: %ld kB", before);
	laz_ready("thp data");

	laz_wait_usr2();

	if (laz_corrupt("thp"))
		madvise(region, HUGE, MADV_DONTNEED);  /* drops a huge page (its data too: caught below as well) */
	if (laz_corrupt("data"))
		region[4096 * 3] ^= 0xff;
	after = huge_kb();
	LAZ_CHECK(after >= before, "AnonHugePages %ld kB after restore, %ld kB before", after, before);
	for (size_t i = 0; i < SIZE; i += 64)
		if (region[i] != (unsigned char)(i / 64 * 7 + 3))
			bad++;
	LAZ_CHECK(bad == 0, "%zu bytes of the region differ", bad);
	laz_finish();
}
