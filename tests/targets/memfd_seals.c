/*
 * memfd_seals.c - exercises memfds with their names, sizes, contents, modes and seals: one held only
 * through an fd (never mapped; sparse, a file position set), one sealed against writes, shrinking and
 * growing and held only through an fd, one mapped shared and written through the mapping with
 * F_SEAL_FUTURE_WRITE (its writable mapping stays writable, new writes are refused), one sealed for
 * writes and mapped read-only, and one created with MFD_NOEXEC_SEAL. After restore each must have its
 * name (/proc/self/fd), size, content, seals (F_GET_SEALS) and mode, and its seals must act.
 *
 * Usage: memfd_seals LOGFILE      Trigger: SIGUSR2.
 */
#include "vmflags.h"

#include <sys/syscall.h>

#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif
#define F_SEAL_FUTURE_WRITE_ 0x0010
#define F_SEAL_EXEC_ 0x0020
#define MFD_ALLOW_SEALING_ 2U
#define MFD_NOEXEC_SEAL_ 8U

#define FD_PLAIN 40
#define FD_SEALED 41
#define FD_FUTURE 42
#define FD_ROMAP 43
#define FD_NOEXEC 44
#define SIZE (8 * LAZ_PAGE)

static const char POINTS[] = "plain plain_pos plain_size sealed sealed_seals future romap noexec";

static unsigned char *future_map, *ro_map;

struct mfd {
	int fd;
	const char *name;
	unsigned int flags;
	int seals;      /* added after filling; expected: these | F_SEAL_SEAL if not sealable... */
	int want_seals; /* what F_GET_SEALS must say */
	uint64_t seed;
};

static struct mfd mfds[] = {
	{ FD_PLAIN, "plain memfd", 0, 0, F_SEAL_SEAL, 0x61 },
	{ FD_SEALED, "sealed", MFD_ALLOW_SEALING_, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE,
	  F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE, 0x62 },
	{ FD_FUTURE, "future", MFD_ALLOW_SEALING_, F_SEAL_FUTURE_WRITE_ | F_SEAL_SEAL,
	  F_SEAL_FUTURE_WRITE_ | F_SEAL_SEAL, 0x63 },
	{ FD_ROMAP, "romap", MFD_ALLOW_SEALING_, F_SEAL_WRITE, F_SEAL_WRITE, 0x64 },
	{ FD_NOEXEC, "noexec", MFD_NOEXEC_SEAL_, 0, F_SEAL_EXEC_, 0x65 },
};
#define NMFD (sizeof(mfds) / sizeof(mfds[0]))

static void setup(void)
{
	unsigned char buf[SIZE];

	for (size_t i = 0; i < NMFD; i++) {
		struct mfd *m = &mfds[i];
		int fd = (int)syscall(SYS_memfd_create, m->name, m->flags);

		if (fd < 0 || dup2(fd, m->fd) != m->fd)
			laz_die("memfd_create %s", m->name);
		close(fd);
		laz_fill_offset(buf, SIZE, 0, m->seed);
		/* The plain one is sparse: pages 0-2 written, the size 8 pages. */
		if (pwrite(m->fd, buf, m->fd == FD_PLAIN ? 3 * LAZ_PAGE : SIZE, 0) < 0 ||
		    ftruncate(m->fd, SIZE))
			laz_die("fill %s", m->name);
		if (m->fd == FD_FUTURE) {
			future_map = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
			if (future_map == MAP_FAILED)
				laz_die("mmap future");
		}
		if (m->seals && fcntl(m->fd, F_ADD_SEALS, m->seals))
			laz_die("seal %s", m->name);
		if (m->fd == FD_ROMAP) {
			ro_map = mmap(NULL, SIZE, PROT_READ, MAP_SHARED, m->fd, 0);
			if (ro_map == MAP_FAILED)
				laz_die("mmap romap");
		}
	}
	/* Written through the writable mapping after F_SEAL_FUTURE_WRITE: still allowed. */
	laz_fill_offset(future_map + LAZ_PAGE, LAZ_PAGE, LAZ_PAGE, 0x99);
	if (lseek(FD_PLAIN, 123, SEEK_SET) != 123 || fchmod(FD_PLAIN, 0741))
		laz_die("lseek/fchmod");
}

static void check(struct mfd *m)
{
	unsigned char buf[SIZE];
	char link[64], got[PATH_MAX], want[PATH_MAX];
	struct stat st;
	ssize_t n;
	int seals;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", m->fd);
	n = readlink(link, got, sizeof(got) - 1);
	got[n > 0 ? n : 0] = '\0';
	snprintf(want, sizeof(want), "/memfd:%s (deleted)", m->name);
	LAZ_CHECK(!strcmp(got, want), "fd %d: \"%s\", expected \"%s\"", m->fd, got, want);
	seals = fcntl(m->fd, F_GET_SEALS);
	LAZ_CHECK(seals == m->want_seals, "%s: seals %#x, expected %#x", m->name, seals, m->want_seals);
	if (fstat(m->fd, &st) == 0) {
		LAZ_CHECK(st.st_size == (off_t)SIZE, "%s: size %ld", m->name, (long)st.st_size);
		if (m->fd == FD_PLAIN)
			LAZ_CHECK((st.st_mode & 07777) == 0741, "%s: mode %o", m->name, st.st_mode & 07777);
		if (m->fd == FD_NOEXEC)
			LAZ_CHECK(!(st.st_mode & 0111), "%s: mode %o", m->name, st.st_mode & 07777);
	}
	if (pread(m->fd, buf, SIZE, 0) != (ssize_t)SIZE) {
		laz_failf("%s: short read", m->name);
		return;
	}
	for (size_t pg = 0; pg < SIZE / LAZ_PAGE; pg++) {
		uint64_t seed = (m->fd == FD_FUTURE && pg == 1) ? 0x99 : m->seed;
		int zero = m->fd == FD_PLAIN && pg >= 3;
		long bad = -1;

		if (zero) {
			for (size_t i = 0; i < LAZ_PAGE; i++)
				if (buf[pg * LAZ_PAGE + i])
					bad = (long)i;
		} else {
			bad = laz_find_mismatch_offset(buf + pg * LAZ_PAGE, LAZ_PAGE, pg * LAZ_PAGE, seed);
		}
		LAZ_CHECK(bad < 0, "%s: page %zu differs at byte %ld", m->name, pg, bad);
	}
}

int main(int argc, char **argv)
{
	laz_init(argc, argv);
	setup();
	laz_ready(POINTS);
	laz_wait_usr2();

	if (laz_corrupt("plain"))
		pwrite(FD_PLAIN, "x", 1, 100);
	if (laz_corrupt("plain_pos"))
		lseek(FD_PLAIN, 0, SEEK_SET);
	if (laz_corrupt("plain_size"))
		ftruncate(FD_PLAIN, SIZE + LAZ_PAGE);
	if (laz_corrupt("sealed"))
		mfds[1].want_seals |= F_SEAL_SEAL;
	if (laz_corrupt("sealed_seals"))
		mfds[1].want_seals = 0;
	if (laz_corrupt("future"))
		future_map[LAZ_PAGE] ^= 1;
	if (laz_corrupt("romap"))
		mfds[3].seed ^= 1;
	if (laz_corrupt("noexec"))
		mfds[4].want_seals = 0;

	for (size_t i = 0; i < NMFD; i++)
		check(&mfds[i]);
	LAZ_CHECK(lseek(FD_PLAIN, 0, SEEK_CUR) == 123, "plain: position %ld", (long)lseek(FD_PLAIN, 0, SEEK_CUR));
	/* The seals act: no write, no shrink, no grow on the sealed one; no write(2) on the future one. */
	LAZ_CHECK(pwrite(FD_SEALED, "x", 1, 0) < 0 && errno == EPERM, "sealed: a write went through");
	LAZ_CHECK(ftruncate(FD_SEALED, LAZ_PAGE) < 0 && errno == EPERM, "sealed: shrunk");
	LAZ_CHECK(ftruncate(FD_SEALED, 2 * SIZE) < 0 && errno == EPERM, "sealed: grown");
	LAZ_CHECK(pwrite(FD_FUTURE, "x", 1, 0) < 0 && errno == EPERM, "future: a write(2) went through");
	/* ...while the mapping made before the seal still writes. */
	future_map[0] ^= 0xff;
	LAZ_CHECK(pread(FD_FUTURE, &(unsigned char){ 0 }, 1, 0) == 1, "future: read");
	future_map[0] ^= 0xff;
	LAZ_CHECK(laz_find_mismatch_offset(ro_map, SIZE, 0, mfds[3].seed) < 0, "romap: mapping differs");
	laz_expect_vmflags("romap", ro_map, "rd sh mr me ms");
	laz_expect_vmflags("future", future_map, "rd wr sh mr mw me ms");
	laz_finish();
}
