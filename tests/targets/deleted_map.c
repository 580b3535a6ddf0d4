/*
 * deleted_map.c - exercises mappings of deleted files: one file (mode 0640) mapped three times and then
 * unlinked -- shared read-write (pages written through the mapping before the dump), private with a page
 * modified, and shared read-only through a read-only fd -- and a sparse file mapped private read-only,
 * also unlinked. After restore: every mapping holds its data, the three mappings of the first file are
 * still one inode (a write through the shared one shows in the read-only one), the files are still
 * deleted, keep their names (as /proc/self/maps shows them), mode, size, and the sparse one its holes.
 *
 * Usage: deleted_map LOGFILE [linked]      Trigger: SIGUSR2.
 * "linked": file A keeps a second hard link (a dump must refuse it: a restore could not reach that link).
 * "withfd": file A also stays open at fd 30 (O_RDONLY, offset 777): after the restore it must be the very inode
 *          the mappings map (a write through the shared mapping is read through it), at its offset.
 * "replaced": a new file takes file A's name after the unlink; it must be left alone by the restore (file A
 * then comes back under another name in its directory, and nothing else is left there).
 */
#include "vmflags.h"

#include <dirent.h>

#define NPAGES 16UL
#define SPARSE_SIZE (1UL << 20)
#define SEED_A 0xa1
#define SEED_B 0xb2
#define SEED_W 0xc3

static const char POINTS[] = "shared private rdonly inode mode name sparse holes";

static unsigned char *sh, *priv, *ro, *sp;
static char path_a[PATH_MAX], path_b[PATH_MAX], path_link[PATH_MAX];
static int linked, withfd, replaced;

static void make(const char *path, size_t size, const unsigned long *pages, size_t n, uint64_t seed)
{
	unsigned char buf[LAZ_PAGE];
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);

	if (fd < 0 || ftruncate(fd, (off_t)size))
		laz_die("create %s", path);
	for (size_t i = 0; i < n; i++) {
		laz_fill_offset(buf, LAZ_PAGE, pages[i] * LAZ_PAGE, seed);
		if (pwrite(fd, buf, LAZ_PAGE, (off_t)(pages[i] * LAZ_PAGE)) != (ssize_t)LAZ_PAGE)
			laz_die("write %s", path);
	}
	close(fd);
}

static void *map(const char *path, int oflags, size_t len, int prot, int flags, off_t off)
{
	int fd = open(path, oflags);
	void *p;

	if (fd < 0)
		laz_die("open %s", path);
	p = mmap(NULL, len, prot, flags, fd, off);
	if (p == MAP_FAILED)
		laz_die("mmap %s", path);
	close(fd);
	return p;
}

static int stat_mapping(const void *p, size_t len, struct stat *st)
{
	char link[64];

	snprintf(link, sizeof(link), "/proc/self/map_files/%lx-%lx", (unsigned long)p, (unsigned long)p + len);
	return stat(link, st);
}

/* Expected byte content of file A at OFF (the shared writes of setup included). */
static void expect_a(const char *what, const unsigned char *p, size_t len, uint64_t off)
{
	for (size_t pg = 0; pg < len / LAZ_PAGE; pg++) {
		uint64_t o = off + pg * LAZ_PAGE;
		uint64_t seed = (o / LAZ_PAGE == 2 || o / LAZ_PAGE == 9) ? SEED_W : SEED_A;
		long bad = laz_find_mismatch_offset(p + pg * LAZ_PAGE, LAZ_PAGE, o, seed);

		if (bad >= 0) {
			laz_failf("%s: page at file offset %#lx differs at byte %ld", what, (unsigned long)o, bad);
			return;
		}
	}
}

static void setup(void)
{
	static const unsigned long all[NPAGES] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };
	static const unsigned long sparse_pages[] = { 0, 128 };

	laz_tmpfile("deleted-a", path_a, sizeof(path_a));
	laz_tmpfile("deleted-b", path_b, sizeof(path_b));
	make(path_a, NPAGES * LAZ_PAGE, all, NPAGES, SEED_A);
	if (chmod(path_a, 0640))
		laz_die("chmod");
	make(path_b, SPARSE_SIZE, sparse_pages, 2, SEED_B);
	sh = map(path_a, O_RDWR, NPAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, 0);
	priv = map(path_a, O_RDONLY, 8 * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, 4 * LAZ_PAGE);
	ro = map(path_a, O_RDONLY, 8 * LAZ_PAGE, PROT_READ, MAP_SHARED, 8 * LAZ_PAGE);
	sp = map(path_b, O_RDONLY, SPARSE_SIZE, PROT_READ, MAP_PRIVATE, 0);
	/* Written through the shared mapping (pages 2 and 9: the latter is seen by `ro` too). */
	laz_fill_offset(sh + 2 * LAZ_PAGE, LAZ_PAGE, 2 * LAZ_PAGE, SEED_W);
	laz_fill_offset(sh + 9 * LAZ_PAGE, LAZ_PAGE, 9 * LAZ_PAGE, SEED_W);
	/* A private copy of file page 6 (mapping page 2). */
	memset(priv + 2 * LAZ_PAGE, 0x77, LAZ_PAGE);
	if (withfd) {
		int fd = open(path_a, O_RDONLY);

		if (fd < 0 || dup2(fd, 30) != 30 || close(fd) || lseek(30, 777, SEEK_SET) != 777)
			laz_die("open fd 30");
	}
	if (linked && link(path_a, laz_tmpfile("deleted-a-link", path_link, sizeof(path_link))))
		laz_die("link");
	if (unlink(path_a) || unlink(path_b))
		laz_die("unlink");
	if (replaced) {
		int fd = open(path_a, O_WRONLY | O_CREAT | O_EXCL, 0644);

		if (fd < 0 || write(fd, "new file\n", 9) != 9 || close(fd))
			laz_die("replace %s", path_a);
	}
}

/* Write LEN bytes of VALUE into file B at OFF, through its mapping's map_files link. */
static void poke_b(off_t off, int value, size_t len)
{
	static unsigned char junk[32 * LAZ_PAGE];
	char link[64];
	int fd;

	snprintf(link, sizeof(link), "/proc/self/map_files/%lx-%lx", (unsigned long)sp,
		 (unsigned long)sp + SPARSE_SIZE);
	fd = open(link, O_RDWR);
	memset(junk, value, len);
	if (fd < 0 || pwrite(fd, junk, len, off) != (ssize_t)len)
		laz_failf("corrupt: write file B");
	if (fd >= 0)
		close(fd);
}

/* A deleted file is recreated under its own name inside a private directory that the restore makes beside it
 * (mode 0700, removed again), never at the old path: maps names it DIR/.lazarus-restore-XXX/NAME (deleted).
 * The original keeps DIR/NAME (deleted). Whether this is a restored process is told by its start time (a
 * restored process is a new task; the inode number may come back, freed when the original died). */
static unsigned long long start_time(void)
{
	char buf[1024];
	ssize_t n;
	int fd = open("/proc/self/stat", O_RDONLY);
	char *p;
	unsigned long long v = 0;

	n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
	if (fd >= 0)
		close(fd);
	if (n <= 0)
		laz_die("read /proc/self/stat");
	buf[n] = '\0';
	p = strrchr(buf, ')');
	/* field 22, starttime: 20 fields after the one that closes the command name */
	for (int i = 0; p && i < 20; i++)
		p = strchr(p + 1, ' ');
	if (!p || sscanf(p + 1, "%llu", &v) != 1)
		laz_die("parse /proc/self/stat");
	return v;
}

static void check_name(const char *what, const void *p, const char *path, int recreated)
{
	char perms[5], got[PATH_MAX + 16], head[PATH_MAX + 32], tail[PATH_MAX + 16];
	const char *slash = strrchr(path, '/');
	size_t lg, lt;

	snprintf(head, sizeof(head), "%.*s/.lazarus-restore-", (int)(slash - path), path);
	snprintf(tail, sizeof(tail), "%s (deleted)", slash);
	if (laz_vma_of(p, perms, got, sizeof(got))) {
		laz_failf("%s: not mapped", what);
		return;
	}
	if (!recreated) {
		snprintf(tail, sizeof(tail), "%s (deleted)", path);
		LAZ_CHECK(!strcmp(got, tail), "%s: maps names it \"%s\", expected \"%s\"", what, got, tail);
		return;
	}
	lg = strlen(got);
	lt = strlen(tail);
	LAZ_CHECK(!strncmp(got, head, strlen(head)) && lg > strlen(head) + lt && !strcmp(got + lg - lt, tail) &&
		  !memchr(got + strlen(head), '/', lg - strlen(head) - lt),
		  "%s: maps names it \"%s\", expected \"%s*%s\"", what, got, head, tail);
}

int main(int argc, char **argv)
{
	struct stat s_sh, s_priv, s_ro, s_sp;
	unsigned long long start0;

	laz_init(argc, argv);
	linked = argc > 2 && !strcmp(argv[2], "linked");
	withfd = argc > 2 && !strcmp(argv[2], "withfd");
	replaced = argc > 2 && !strcmp(argv[2], "replaced");
	setup();
	start0 = start_time();
	laz_ready(POINTS);
	laz_wait_usr2();

	if (laz_corrupt("shared"))
		sh[2 * LAZ_PAGE + 5] ^= 1;
	if (laz_corrupt("private"))
		priv[2 * LAZ_PAGE + 5] ^= 1;
	if (laz_corrupt("rdonly"))
		sh[8 * LAZ_PAGE + 5] ^= 1;
	if (laz_corrupt("inode"))
		ro = map("/proc/self/exe", O_RDONLY, 8 * LAZ_PAGE, PROT_READ, MAP_PRIVATE, 0);
	if (laz_corrupt("mode")) {
		char link[64];

		snprintf(link, sizeof(link), "/proc/self/map_files/%lx-%lx", (unsigned long)sh,
			 (unsigned long)sh + NPAGES * LAZ_PAGE);
		chmod(link, 0600);
	}
	if (laz_corrupt("name"))
		strcat(path_b, "x");
	if (laz_corrupt("sparse"))
		poke_b(10 * LAZ_PAGE, 1, 1);
	if (laz_corrupt("holes"))
		poke_b(200 * LAZ_PAGE, 0, 32 * LAZ_PAGE);

	expect_a("shared", sh, NPAGES * LAZ_PAGE, 0);
	expect_a("private head", priv, 2 * LAZ_PAGE, 4 * LAZ_PAGE);
	expect_a("private tail", priv + 3 * LAZ_PAGE, 5 * LAZ_PAGE, 7 * LAZ_PAGE);
	for (size_t i = 0; i < LAZ_PAGE; i++)
		if (priv[2 * LAZ_PAGE + i] != 0x77) {
			laz_failf("private: the modified page differs at byte %zu", i);
			break;
		}
	expect_a("rdonly", ro, 8 * LAZ_PAGE, 8 * LAZ_PAGE);
	/* One inode: a write through the shared mapping shows in the read-only one. */
	sh[10 * LAZ_PAGE] ^= 0xff;
	LAZ_CHECK(ro[2 * LAZ_PAGE] == sh[10 * LAZ_PAGE], "rdonly: does not see a write to the shared mapping");
	if (withfd) {
		unsigned char b = 0;
		struct stat s_fd;

		LAZ_CHECK(pread(30, &b, 1, 10 * LAZ_PAGE) == 1 && b == sh[10 * LAZ_PAGE],
			  "fd 30: does not see a write to the shared mapping");
		LAZ_CHECK(lseek(30, 0, SEEK_CUR) == 777, "fd 30: offset %ld, expected 777", (long)lseek(30, 0, SEEK_CUR));
		LAZ_CHECK((fcntl(30, F_GETFL) & O_ACCMODE) == O_RDONLY, "fd 30: not read-only");
		LAZ_CHECK(fstat(30, &s_fd) == 0 && stat_mapping(sh, NPAGES * LAZ_PAGE, &s_sh) == 0 &&
				  s_fd.st_ino == s_sh.st_ino && s_fd.st_dev == s_sh.st_dev,
			  "fd 30 and the shared mapping are two files");
	}
	sh[10 * LAZ_PAGE] ^= 0xff;

	if (stat_mapping(sh, NPAGES * LAZ_PAGE, &s_sh) || stat_mapping(priv, 8 * LAZ_PAGE, &s_priv) ||
	    stat_mapping(ro, 8 * LAZ_PAGE, &s_ro) || stat_mapping(sp, SPARSE_SIZE, &s_sp)) {
		laz_failf("stat map_files: %s", strerror(errno));
	} else {
		LAZ_CHECK(s_sh.st_ino == s_priv.st_ino && s_sh.st_ino == s_ro.st_ino && s_sh.st_dev == s_ro.st_dev,
			  "file A: its mappings are not one inode");
		LAZ_CHECK(s_sh.st_nlink == (nlink_t)linked && s_sp.st_nlink == 0, "a deleted file has a link again");
		LAZ_CHECK((s_sh.st_mode & 07777) == 0640, "file A: mode %o, expected 640", s_sh.st_mode & 07777);
		LAZ_CHECK(s_sh.st_size == (off_t)(NPAGES * LAZ_PAGE), "file A: size %ld", (long)s_sh.st_size);
		LAZ_CHECK(s_sp.st_size == (off_t)SPARSE_SIZE, "file B: size %ld", (long)s_sp.st_size);
		LAZ_CHECK(s_sp.st_blocks * 512 < 16 * (off_t)LAZ_PAGE, "file B: %ld blocks, its holes were filled",
			  (long)s_sp.st_blocks);
	}
	if (replaced) {
		char buf[32] = "";
		int fd = open(path_a, O_RDONLY);
		ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
		DIR *d = opendir(laz_tmpdir());
		struct dirent *e;
		int extra = 0;

		LAZ_CHECK(n == 9 && !memcmp(buf, "new file\n", 9), "the file that took A's name was changed");
		if (fd >= 0)
			close(fd);
		while (d && (e = readdir(d)))
			if (e->d_name[0] != '.' || (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")))
				extra += strcmp(e->d_name, "deleted-a") != 0;
		if (d)
			closedir(d);
		LAZ_CHECK(d && !extra, "%d files left in %s", extra, laz_tmpdir());
	} else {
		int moved = start_time() != start0;

		check_name("file A shared", sh, path_a, moved);
		check_name("file A rdonly", ro, path_a, moved);
	}
	check_name("file B", sp, path_b, start_time() != start0);
	for (size_t pg = 0; pg < SPARSE_SIZE / LAZ_PAGE; pg++) {
		const unsigned char *p = sp + pg * LAZ_PAGE;

		if (pg == 0 || pg == 128) {
			LAZ_CHECK(laz_find_mismatch_offset(p, LAZ_PAGE, pg * LAZ_PAGE, SEED_B) < 0,
				  "file B: page %zu differs", pg);
			continue;
		}
		for (size_t i = 0; i < LAZ_PAGE; i++)
			if (p[i]) {
				laz_failf("file B: page %zu is not a hole", pg);
				pg = SPARSE_SIZE;
				break;
			}
	}
	laz_expect_vmflags("rdonly", ro, "rd mr me ms");
	laz_finish();
}
