/*
 * lazy_events.c - exercises the non-cooperative userfaultfd events on memory a lazy restore has not
 * filled yet: fork, mremap, madvise(MADV_DONTNEED / MADV_REMOVE) and munmap, one per mode or all
 * combined (it passes after an eager restore too).
 *
 *   lazy_events LOGFILE MODE      MODE: fork | mremap | madvise | munmap | all
 *
 * Setup fills a 32 MiB anonymous region and a 4 MiB shared anonymous region with patterns, then
 * waits for SIGUSR2. Each event has a part of the regions of its own, and nothing reads any page
 * before the events that concern it: so (under `restore --lazy --no-background`) every event hits
 * pages that are still missing, in "all" mode too. An event's own range is checked right after it;
 * the neighbours, and the rest, only once every event has happened.
 *
 *   anon  [8, 12) MiB   mremap: moved elsewhere, holds its data at the new address (later faults
 *                       there get the moved pages), the old range is unmapped; then moved back.
 *         [16, 18) MiB  madvise: MADV_DONTNEED'ed pages read zeros, never the image's data.
 *         [24, 26) MiB  munmap: nothing is copied into the hole: memory mapped there afresh reads zeros.
 *         the rest      fork (last in "all"): child and parent both see the data as of the fork;
 *                       writes in one never show in the other (each side writes its own marks into
 *                       different pages, then checks the other's pages still hold the original
 *                       pattern); the child reports through its exit status.
 *   shm   [1, 2) MiB    madvise: MADV_REMOVE'd shared pages read zeros.
 *
 * Every check has a corruption point of its own that damages what that check alone looks at (and
 * puts it back afterwards where later checks would otherwise see it).
 */
#include "common.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define MIB (1UL << 20)
#define ANON_SIZE (32 * MIB)
#define SHM_SIZE (4 * MIB)
#define PIECE (4 * MIB)
#define PIECE_AT (8 * MIB)
#define DONTNEED_AT (16 * MIB)
#define DONTNEED_LEN (2 * MIB)
#define REMOVE_AT (1 * MIB)
#define REMOVE_LEN (1 * MIB)
#define HOLE_AT (24 * MIB)
#define HOLE_LEN (2 * MIB)
#define SEED_ANON 0x1111ULL
#define SEED_SHM 0x2222ULL

static unsigned char *anon, *shm;

static long mismatch_offset(const unsigned char *p, size_t len, uint64_t off, uint64_t seed)
{
	return laz_find_mismatch_offset(p, len, off, seed);
}

static int all_zero(const unsigned char *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return 0;
	return 1;
}

static void check_anon(size_t from, size_t to, const char *what)
{
	long bad = mismatch_offset(anon + from, to - from, from, SEED_ANON);
	LAZ_CHECK(bad < 0, "%s: anon data differs at offset %#lx", what, (unsigned long)(from + bad));
}

/* Flip one byte if the self-test asks to corrupt `point`; returns whether it did (flip again to undo). */
static int flip(const char *point, unsigned char *p)
{
	if (!laz_corrupt(point))
		return 0;
	*p ^= 0x40;
	return 1;
}

static void do_fork(void)
{
	/* Fork first, then have each side read and write: both see the memory as of the fork. */
	pid_t child = fork();
	if (child < 0) {
		laz_failf("fork: %s", strerror(errno));
		return;
	}
	if (child == 0) {
		int bad = 0;
		for (size_t off = 0; off < ANON_SIZE; off += 2 * LAZ_PAGE)
			anon[off] = 0xC1;             /* child marks even pages */
		if (laz_corrupt("fork_child"))
			anon[LAZ_PAGE + 7] ^= 0x40;   /* the child's own copy of an odd page */
		for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE)
			if (mismatch_offset(anon + off, LAZ_PAGE, off, SEED_ANON) >= 0)
				bad |= 1;             /* odd pages: original data */
		for (size_t off = 0; off < ANON_SIZE; off += 2 * LAZ_PAGE)
			if (mismatch_offset(anon + off + 1, LAZ_PAGE - 1, off + 1, SEED_ANON) >= 0)
				bad |= 2;
		if (mismatch_offset(shm, SHM_SIZE, 0, SEED_SHM) >= 0)
			bad |= 4;
		_exit(bad);
	}
	for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE)
		anon[off] = 0xD2;                     /* parent marks odd pages */
	int status = 0;
	if (waitpid(child, &status, 0) != child) {
		laz_failf("waitpid: %s", strerror(errno));
		return;
	}
	LAZ_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork: the child saw wrong data (status %#x)",
		  status);
	int undo = flip("fork_parent_even", anon + 2 * LAZ_PAGE);
	for (size_t off = 0; off < ANON_SIZE; off += 2 * LAZ_PAGE) {
		if (mismatch_offset(anon + off, LAZ_PAGE, off, SEED_ANON) >= 0) {
			laz_failf("fork: the parent sees a child write or lost data at %#lx", (unsigned long)off);
			break;
		}
	}
	if (undo)
		anon[2 * LAZ_PAGE] ^= 0x40;
	if (laz_corrupt("fork_parent_odd"))
		anon[3 * LAZ_PAGE] = 0xC1;            /* as if the child's mark had reached the parent */
	for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE) {
		if (anon[off] != 0xD2 ||
		    mismatch_offset(anon + off + 1, LAZ_PAGE - 1, off + 1, SEED_ANON) >= 0) {
			laz_failf("fork: the parent's own writes are wrong at %#lx", (unsigned long)off);
			break;
		}
	}
	/* put the parent's pages back so the final check sees the pattern */
	for (size_t off = LAZ_PAGE; off < ANON_SIZE; off += 2 * LAZ_PAGE)
		laz_fill_offset(anon + off, 1, off, SEED_ANON);
}

static void do_mremap(void)
{
	/* Move the piece at [8 MiB, 12 MiB) to a fresh spot; the hole it leaves stays unmapped. */
	unsigned char *dst = mmap(NULL, PIECE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (dst == MAP_FAILED) {
		laz_failf("reserve: %s", strerror(errno));
		return;
	}
	unsigned char *moved = mremap(anon + PIECE_AT, PIECE, PIECE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
	if (moved == MAP_FAILED) {
		laz_failf("mremap: %s", strerror(errno));
		return;
	}
	int undo = flip("mremap_data", moved + PIECE / 2);
	long bad = mismatch_offset(moved, PIECE, PIECE_AT, SEED_ANON);
	LAZ_CHECK(bad < 0, "mremap: moved data differs at +%#lx", (unsigned long)bad);
	if (undo)
		moved[PIECE / 2] ^= 0x40;
	void *squat = MAP_FAILED;
	if (laz_corrupt("mremap_old"))
		squat = mmap(anon + PIECE_AT, LAZ_PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			     -1, 0);
	unsigned char vec;
	LAZ_CHECK(mincore(anon + PIECE_AT, LAZ_PAGE, &vec) == -1 && errno == ENOMEM,
		  "mremap: the old range is still mapped");
	if (squat != MAP_FAILED)
		munmap(squat, LAZ_PAGE);
	/* Put the piece back so the final check finds the layout it expects. */
	if (mremap(moved, PIECE, PIECE, MREMAP_MAYMOVE | MREMAP_FIXED, anon + PIECE_AT) == MAP_FAILED)
		laz_failf("mremap back: %s", strerror(errno));
}

static void do_madvise(void)
{
	LAZ_CHECK(madvise(anon + DONTNEED_AT, DONTNEED_LEN, MADV_DONTNEED) == 0, "MADV_DONTNEED: %s", strerror(errno));
	LAZ_CHECK(madvise(shm + REMOVE_AT, REMOVE_LEN, MADV_REMOVE) == 0, "MADV_REMOVE: %s", strerror(errno));
	if (laz_corrupt("dontneed_zero"))
		anon[DONTNEED_AT + 5 * LAZ_PAGE + 9] = 1;
	LAZ_CHECK(all_zero(anon + DONTNEED_AT, DONTNEED_LEN), "MADV_DONTNEED: anonymous pages are not zero");
	if (laz_corrupt("remove_zero"))
		shm[REMOVE_AT + 3 * LAZ_PAGE + 1] = 1;
	LAZ_CHECK(all_zero(shm + REMOVE_AT, REMOVE_LEN), "MADV_REMOVE: shared pages are not zero");
	/* the pattern back for the final check */
	laz_fill_offset(anon + DONTNEED_AT, DONTNEED_LEN, DONTNEED_AT, SEED_ANON);
	laz_fill_offset(shm + REMOVE_AT, REMOVE_LEN, REMOVE_AT, SEED_SHM);
}

static void do_munmap(void)
{
	LAZ_CHECK(munmap(anon + HOLE_AT, HOLE_LEN) == 0, "munmap: %s", strerror(errno));
	unsigned char *again = mmap(anon + HOLE_AT, HOLE_LEN, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (again != anon + HOLE_AT) {
		laz_failf("mmap into the hole: %s", strerror(errno));
		return;
	}
	if (laz_corrupt("munmap_zero"))
		again[HOLE_LEN - 1] = 1;
	LAZ_CHECK(all_zero(again, HOLE_LEN), "munmap: memory mapped afresh in the hole is not zero");
	laz_fill_offset(anon + HOLE_AT, HOLE_LEN, HOLE_AT, SEED_ANON);
}

/* After every event: the neighbours of each event's range kept their data. */
static void check_neighbours(int mremapped, int madvised, int unmapped)
{
	int undo;

	if (mremapped) {
		undo = flip("mremap_neighbours", anon + PIECE_AT - 1);
		check_anon(PIECE_AT - MIB, PIECE_AT, "mremap (neighbour below)");
		check_anon(PIECE_AT + PIECE, PIECE_AT + PIECE + MIB, "mremap (neighbour above)");
		if (undo)
			anon[PIECE_AT - 1] ^= 0x40;
	}
	if (madvised) {
		undo = flip("madvise_neighbours", anon + DONTNEED_AT + DONTNEED_LEN);
		check_anon(DONTNEED_AT - MIB, DONTNEED_AT, "madvise (neighbour below)");
		check_anon(DONTNEED_AT + DONTNEED_LEN, DONTNEED_AT + DONTNEED_LEN + MIB, "madvise (neighbour above)");
		if (undo)
			anon[DONTNEED_AT + DONTNEED_LEN] ^= 0x40;
		undo = flip("remove_neighbours", shm + REMOVE_AT - 1);
		long bad = mismatch_offset(shm, REMOVE_AT, 0, SEED_SHM);
		LAZ_CHECK(bad < 0, "MADV_REMOVE: shared data below the removed range differs at %#lx", (unsigned long)bad);
		bad = mismatch_offset(shm + REMOVE_AT + REMOVE_LEN, SHM_SIZE - REMOVE_AT - REMOVE_LEN, REMOVE_AT + REMOVE_LEN,
				      SEED_SHM);
		LAZ_CHECK(bad < 0, "MADV_REMOVE: shared data above the removed range differs");
		if (undo)
			shm[REMOVE_AT - 1] ^= 0x40;
	}
	if (unmapped) {
		undo = flip("munmap_neighbours", anon + HOLE_AT + HOLE_LEN + 17);
		check_anon(HOLE_AT - MIB, HOLE_AT, "munmap (neighbour below)");
		check_anon(HOLE_AT + HOLE_LEN, HOLE_AT + HOLE_LEN + MIB, "munmap (neighbour above)");
		if (undo)
			anon[HOLE_AT + HOLE_LEN + 17] ^= 0x40;
	}
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	const char *mode = argc > 2 ? argv[2] : "all";
	int all = !strcmp(mode, "all");
	int mremapped = all || !strcmp(mode, "mremap"), madvised = all || !strcmp(mode, "madvise");
	int unmapped = all || !strcmp(mode, "munmap"), forked = all || !strcmp(mode, "fork");
	char points[512] = "data shm";

	if (!mremapped && !madvised && !unmapped && !forked)
		laz_die("unknown mode %s", mode);
	anon = mmap(NULL, ANON_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	shm = mmap(NULL, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED || shm == MAP_FAILED)
		laz_die("mmap");
	laz_fill_offset(anon, ANON_SIZE, 0, SEED_ANON);
	laz_fill_offset(shm, SHM_SIZE, 0, SEED_SHM);
	if (mremapped)
		strcat(points, " mremap_data mremap_old mremap_neighbours");
	if (madvised)
		strcat(points, " dontneed_zero remove_zero madvise_neighbours remove_neighbours");
	if (unmapped)
		strcat(points, " munmap_zero munmap_neighbours");
	if (forked)
		strcat(points, " fork_child fork_parent_even fork_parent_odd");
	laz_ready(points);
	laz_wait_usr2();

	if (mremapped)
		do_mremap();
	if (madvised)
		do_madvise();
	if (unmapped)
		do_munmap();
	if (forked)
		do_fork();
	check_neighbours(mremapped, madvised, unmapped);
	if (laz_corrupt("data"))
		anon[5 * LAZ_PAGE + 3] ^= 0x40;
	check_anon(0, ANON_SIZE, "final");
	if (laz_corrupt("shm"))
		shm[SHM_SIZE - 5] ^= 0x40;
	long bad = mismatch_offset(shm, SHM_SIZE, 0, SEED_SHM);
	LAZ_CHECK(bad < 0, "final: shared data differs at %#lx", (unsigned long)bad);
	laz_finish();
}
