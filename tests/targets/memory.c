/*
 * memory.c - exercises the address space: a 64 MiB sparse private anonymous mapping (every 7th
 * page written, a page unmapped in the middle), a read-only and a PROT_NONE anonymous mapping
 * holding data, a private file mapping with some pages modified, a shared file mapping
 * written by the process, shared anonymous memory, a memfd mapping (fd kept or closed), the
 * heap (malloc'ed blocks, free'd holes, a manual sbrk extension), .data/.bss and the stack.
 * After restore it also grows brk and mallocs a lot to prove the heap still works.
 *
 * Usage: memory LOGFILE [keep|close]   (memfd fd kept open at fd 50, or closed after mmap)
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <sys/syscall.h>
#include <sys/wait.h>

#define ANON_SIZE (64UL << 20)
#define ANON_PAGES (ANON_SIZE / LAZ_PAGE)
#define HOLE_PAGE 4998UL /* a written page (4998 = 7 * 714) */
#define RO_PAGES 16UL
#define NONE_PAGES 8UL
#define PRIV_PAGES 16UL
#define SHF_PAGES 8UL
#define SHF_WRITTEN 6UL
#define SHA_PAGES 256UL
#define MEMFD_SIZE (1UL << 20)
#define MEMFD_FILLED (512UL << 10)
#define MEMFD_FD 50
#define NBLOCKS 300
#define NBIG 3
#define SBRK_GROW (256UL << 10)

enum {
	S_ANON = 0x100, S_RO, S_NONE, S_PRIVF, S_PRIVM, S_SHF0, S_SHF1, S_SHA, S_MEMFD, S_HEAP,
	S_BIG, S_SBRK, S_STACK, S_BSS, S_NEWBRK, S_NEWHEAP, S_DATA,
};

static const char POINTS[] =
	"anon zero hole ro_data ro_perm none_data none_perm privfile privfile_file shfile shanon "
	"shanon_shared memfd heap brk sbrk_data stack data bss";

/* 12 KiB: at least two whole pages of .data hold nothing else, so a page of it reloaded from the executable
 * (its initial values) leaves the rest of the process working and must be caught by the .data check. */
static uint64_t data_words[1536] = {
	0x1111111111111111ULL, 0x2222222222222222ULL, 0x3333333333333333ULL, 0x4444444444444444ULL,
	0x5555555555555555ULL, 0x6666666666666666ULL, 0x7777777777777777ULL, 0x0123456789abcdefULL,
};
static uint64_t bss_words[8192];

static unsigned char *anon, *ro, *none, *priv, *shf, *sha, *mfd, *sbrk_area;
static unsigned char *blocks[NBLOCKS], *big[NBIG];
static size_t block_size[NBLOCKS];
static void *brk_end;
static int memfd_kept;
static char priv_path[PATH_MAX], shf_path[PATH_MAX];
static const unsigned char zero_page[LAZ_PAGE];

static void *map(size_t len, int prot, int flags, int fd)
{
	void *p = mmap(NULL, len, prot, flags, fd, 0);

	if (p == MAP_FAILED)
		laz_die("mmap %zu", len);
	return p;
}

static int make_file(const char *path, size_t len, uint64_t seed)
{
	unsigned char *buf = malloc(len);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);

	if (fd < 0 || !buf)
		laz_die("create %s", path);
	laz_fill_offset(buf, len, 0, seed);
	if (pwrite(fd, buf, len, 0) != (ssize_t)len)
		laz_die("write %s", path);
	free(buf);
	return fd;
}

static void expect_perms(const char *what, const void *addr, const char *want)
{
	char perms[5];

	if (laz_vma_of(addr, perms, NULL, 0))
		laz_failf("%s: %p not mapped", what, addr);
	else if (strcmp(perms, want) != 0)
		laz_failf("%s: permissions %s, expected %s", what, perms, want);
}

static void setup(const char *mode)
{
	unsigned long i;
	int fd;

	/* Sparse private anonymous memory with a hole. No huge pages, whatever the machine's THP setting: with
	 * THP "always" the kernel would fill whole 2 MiB pages and the region would no longer be sparse. */
	anon = map(ANON_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	if (madvise(anon, ANON_SIZE, MADV_NOHUGEPAGE))
		laz_die("madvise NOHUGEPAGE");
	for (i = 0; i < ANON_PAGES; i += 7)
		laz_fill(anon + i * LAZ_PAGE, LAZ_PAGE, S_ANON);
	if (munmap(anon + HOLE_PAGE * LAZ_PAGE, LAZ_PAGE))
		laz_die("munmap hole");

	/* Read-only and PROT_NONE memory written before the protection change. */
	ro = map(RO_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	laz_fill(ro, RO_PAGES * LAZ_PAGE, S_RO);
	if (mprotect(ro, RO_PAGES * LAZ_PAGE, PROT_READ))
		laz_die("mprotect ro");
	none = map(NONE_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	laz_fill(none, NONE_PAGES * LAZ_PAGE, S_NONE);
	if (mprotect(none, NONE_PAGES * LAZ_PAGE, PROT_NONE))
		laz_die("mprotect none");

	/* Private file mapping with pages 3, 4 and 10 modified (copied on write). */
	laz_tmpfile("priv.dat", priv_path, sizeof(priv_path));
	fd = make_file(priv_path, PRIV_PAGES * LAZ_PAGE, S_PRIVF);
	priv = map(PRIV_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd);
	close(fd);
	laz_fill(priv + 3 * LAZ_PAGE, 2 * LAZ_PAGE, S_PRIVM);
	laz_fill(priv + 10 * LAZ_PAGE, LAZ_PAGE, S_PRIVM);

	/* Shared file mapping: the process rewrites the first pages through the mapping. */
	laz_tmpfile("shared.dat", shf_path, sizeof(shf_path));
	fd = make_file(shf_path, SHF_PAGES * LAZ_PAGE, S_SHF0);
	shf = map(SHF_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
	close(fd);
	laz_fill_offset(shf, SHF_WRITTEN * LAZ_PAGE, 0, S_SHF1);

	/* Shared anonymous memory. */
	sha = map(SHA_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1);
	laz_fill(sha, SHA_PAGES * LAZ_PAGE, S_SHA);

	/* memfd, mapped shared, half filled. */
	fd = (int)syscall(SYS_memfd_create, "laz-memfd", 0);
	if (fd < 0)
		laz_die("memfd_create");
	if (ftruncate(fd, MEMFD_SIZE))
		laz_die("ftruncate memfd");
	mfd = map(MEMFD_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
	laz_fill(mfd, MEMFD_FILLED, S_MEMFD);
	memfd_kept = strcmp(mode, "close") != 0;
	if (memfd_kept && dup2(fd, MEMFD_FD) != MEMFD_FD)
		laz_die("dup2 memfd");
	close(fd);

	/* Heap: small blocks (some freed again), big blocks (malloc uses mmap), manual sbrk. */
	for (i = 0; i < NBLOCKS; i++) {
		block_size[i] = ((i * 37) % 2000 + 16) & ~7UL;
		blocks[i] = malloc(block_size[i]);
		if (!blocks[i])
			laz_die("malloc");
		laz_fill(blocks[i], block_size[i], S_HEAP ^ i);
	}
	for (i = 0; i < NBLOCKS; i += 3) {
		free(blocks[i]);
		blocks[i] = NULL;
	}
	for (i = 0; i < NBIG; i++) {
		big[i] = malloc(1UL << 20);
		if (!big[i])
			laz_die("malloc big");
		laz_fill(big[i], 1UL << 20, S_BIG ^ i);
	}
	sbrk_area = sbrk(SBRK_GROW);
	if (sbrk_area == (void *)-1)
		laz_die("sbrk");
	laz_fill(sbrk_area, SBRK_GROW, S_SBRK);
	brk_end = sbrk(0);

	/* .data and .bss rewritten at run time: a restore that reloaded them from the executable (initial
	 * values, zeros) must fail. */
	laz_fill(data_words, sizeof(data_words), S_DATA);
	laz_fill(bss_words, sizeof(bss_words), S_BSS);
}

static void corrupt(uint64_t *stack)
{
	if (laz_corrupt("anon"))
		anon[70 * LAZ_PAGE + 8] ^= 1;
	if (laz_corrupt("zero"))
		anon[LAZ_PAGE + 100] = 1;
	if (laz_corrupt("hole") &&
	    mmap(anon + HOLE_PAGE * LAZ_PAGE, LAZ_PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
			 -1, 0) == MAP_FAILED)
			laz_die("mmap hole");
	if (laz_corrupt("ro_data")) {
		mprotect(ro, LAZ_PAGE, PROT_READ | PROT_WRITE);
		ro[5] ^= 1;
		mprotect(ro, LAZ_PAGE, PROT_READ);
	}
	if (laz_corrupt("ro_perm"))
		mprotect(ro, RO_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE);
	if (laz_corrupt("none_data")) {
		mprotect(none, LAZ_PAGE, PROT_READ | PROT_WRITE);
		none[9] ^= 1;
		mprotect(none, LAZ_PAGE, PROT_NONE);
	}
	if (laz_corrupt("none_perm"))
		mprotect(none, NONE_PAGES * LAZ_PAGE, PROT_READ);
	if (laz_corrupt("privfile"))
		priv[5 * LAZ_PAGE + 1] ^= 1;
	if (laz_corrupt("privfile_file")) {
		int fd = open(priv_path, O_WRONLY);
		unsigned char c = 0xaa;

		if (fd < 0 || pwrite(fd, &c, 1, 12 * LAZ_PAGE + 3) != 1)
			laz_die("corrupt privfile");
		close(fd);
	}
	if (laz_corrupt("shfile")) {
		int fd = open(shf_path, O_WRONLY);
		unsigned char c = (unsigned char)(shf[2 * LAZ_PAGE] ^ 1);

		if (fd < 0 || pwrite(fd, &c, 1, 2 * LAZ_PAGE) != 1)
			laz_die("corrupt shfile");
		close(fd);
	}
	if (laz_corrupt("shanon"))
		sha[17 * LAZ_PAGE] ^= 1;
	if (laz_corrupt("shanon_shared")) {
		/* Same content, but private: only the fork check can tell. */
		unsigned char *copy = malloc(SHA_PAGES * LAZ_PAGE);

		memcpy(copy, sha, SHA_PAGES * LAZ_PAGE);
		if (mmap(sha, SHA_PAGES * LAZ_PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
			laz_die("remap sha");
		memcpy(sha, copy, SHA_PAGES * LAZ_PAGE);
		free(copy);
	}
	if (laz_corrupt("memfd"))
		mfd[MEMFD_FILLED - 1] ^= 1;
	if (laz_corrupt("heap"))
		blocks[NBLOCKS - 1][3] ^= 1;
	if (laz_corrupt("brk"))
		sbrk(LAZ_PAGE);
	if (laz_corrupt("sbrk_data"))
		sbrk_area[SBRK_GROW - 1] ^= 1;
	if (laz_corrupt("stack"))
		stack[100] ^= 1;
	if (laz_corrupt("data"))
		data_words[2] ^= 1;
	if (laz_corrupt("bss"))
		bss_words[8000] ^= 1;
}

static void check_region(const char *what, const void *p, size_t len, uint64_t seed)
{
	long off = laz_find_mismatch(p, len, seed);

	if (off >= 0)
		laz_failf("%s: data differs at offset %ld", what, off);
}

static void verify_anon(void)
{
	unsigned long i;
	unsigned char vec;

	for (i = 0; i < ANON_PAGES; i++) {
		unsigned char *pg = anon + i * LAZ_PAGE;

		if (i == HOLE_PAGE)
			continue;
		if (i % 7 == 0) {
			if (laz_find_mismatch(pg, LAZ_PAGE, S_ANON) >= 0) {
				laz_failf("anon: written page %lu differs", i);
				break;
			}
		} else if (memcmp(pg, zero_page, LAZ_PAGE) != 0) {
			laz_failf("anon: untouched page %lu is not zero", i);
			break;
		}
	}
	errno = 0;
	if (mincore(anon + HOLE_PAGE * LAZ_PAGE, LAZ_PAGE, &vec) == 0 || errno != ENOMEM)
		laz_failf("anon: hole at page %lu is mapped", HOLE_PAGE);
	expect_perms("anon", anon, "rw-p");
}

static void verify_protected(void)
{
	expect_perms("read-only mapping", ro, "r--p");
	check_region("read-only mapping", ro, RO_PAGES * LAZ_PAGE, S_RO);
	expect_perms("PROT_NONE mapping", none, "---p");
	if (mprotect(none, NONE_PAGES * LAZ_PAGE, PROT_READ))
		laz_failf("PROT_NONE mapping: mprotect: %s", strerror(errno));
	else
		check_region("PROT_NONE mapping", none, NONE_PAGES * LAZ_PAGE, S_NONE);
}

static void verify_files(void)
{
	unsigned char buf[LAZ_PAGE];
	char perms[5], path[PATH_MAX];
	unsigned long i;
	long off;
	int fd;

	/* Private file mapping. */
	expect_perms("private file mapping", priv, "rw-p");
	if (laz_vma_of(priv, perms, path, sizeof(path)) == 0 && strcmp(path, priv_path) != 0)
		laz_failf("private file mapping: maps path '%s', expected '%s'", path, priv_path);
	for (i = 0; i < PRIV_PAGES; i++) {
		unsigned char *pg = priv + i * LAZ_PAGE;

		if (i == 3 || i == 4 || i == 10)
			off = laz_find_mismatch(pg, LAZ_PAGE, S_PRIVM);
		else
			off = laz_find_mismatch_offset(pg, LAZ_PAGE, i * LAZ_PAGE, S_PRIVF);
		if (off >= 0)
			laz_failf("private file mapping: page %lu differs at %ld (%s page)", i, off,
				  (i == 3 || i == 4 || i == 10) ? "modified" : "unmodified");
	}
	fd = open(priv_path, O_RDONLY);
	if (fd < 0) {
		laz_failf("private file: open: %s", strerror(errno));
	} else {
		for (i = 0; i < PRIV_PAGES; i++) {
			if (pread(fd, buf, LAZ_PAGE, (off_t)(i * LAZ_PAGE)) != (ssize_t)LAZ_PAGE ||
			    laz_find_mismatch_offset(buf, LAZ_PAGE, i * LAZ_PAGE, S_PRIVF) >= 0) {
				laz_failf("private file: file page %lu changed", i);
				break;
			}
		}
		close(fd);
	}

	/* Shared file mapping: mapping, file and expectation agree; writes go both ways. */
	expect_perms("shared file mapping", shf, "rw-s");
	fd = open(shf_path, O_RDWR);
	if (fd < 0) {
		laz_failf("shared file: open: %s", strerror(errno));
		return;
	}
	for (i = 0; i < SHF_PAGES; i++) {
		unsigned char *pg = shf + i * LAZ_PAGE;
		uint64_t seed = i < SHF_WRITTEN ? S_SHF1 : S_SHF0;

		if (laz_find_mismatch_offset(pg, LAZ_PAGE, i * LAZ_PAGE, seed) >= 0) {
			laz_failf("shared file mapping: page %lu differs", i);
			break;
		}
		if (pread(fd, buf, LAZ_PAGE, (off_t)(i * LAZ_PAGE)) != (ssize_t)LAZ_PAGE ||
		    memcmp(buf, pg, LAZ_PAGE) != 0) {
			laz_failf("shared file: file page %lu differs from the mapping", i);
			break;
		}
	}
	{
		unsigned char old = shf[7], c = (unsigned char)(old ^ 0x5a), got = 0;

		shf[7] = c;
		if (pread(fd, &got, 1, 7) != 1 || got != c)
			laz_failf("shared file: a write to the mapping is not seen in the file");
		shf[7] = old;
		c = (unsigned char)(shf[9] ^ 0xa5);
		old = shf[9];
		if (pwrite(fd, &c, 1, 9) != 1 || shf[9] != c)
			laz_failf("shared file: a write to the file is not seen in the mapping");
		if (pwrite(fd, &old, 1, 9) != 1)
			laz_failf("shared file: pwrite: %s", strerror(errno));
	}
	close(fd);
}

static void verify_shared_anon(void)
{
	volatile uint64_t *w = (volatile uint64_t *)(sha + 100 * LAZ_PAGE);
	uint64_t old = *w;
	int status = 0;
	pid_t child;

	expect_perms("shared anonymous mapping", sha, "rw-s");
	check_region("shared anonymous mapping", sha, SHA_PAGES * LAZ_PAGE, S_SHA);
	child = fork();
	if (child < 0) {
		laz_failf("shared anonymous mapping: fork: %s", strerror(errno));
		return;
	}
	if (child == 0) {
		*w = 0x5ade5ade5ade5adeULL;
		_exit(0);
	}
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status))
		laz_failf("shared anonymous mapping: child failed");
	if (*w != 0x5ade5ade5ade5adeULL)
		laz_failf("shared anonymous mapping: a child's write is not visible (not shared)");
	*w = old;
}

static void verify_memfd(void)
{
	char perms[5], path[PATH_MAX];

	expect_perms("memfd mapping", mfd, "rw-s");
	if (laz_vma_of(mfd, perms, path, sizeof(path)) == 0 &&
	    strncmp(path, "/memfd:laz-memfd", 16) != 0)
		laz_failf("memfd mapping: maps path '%s'", path);
	check_region("memfd mapping", mfd, MEMFD_FILLED, S_MEMFD);
	if (memcmp(mfd + MEMFD_FILLED, zero_page, LAZ_PAGE) != 0 ||
	    memcmp(mfd + MEMFD_SIZE - LAZ_PAGE, zero_page, LAZ_PAGE) != 0)
		laz_failf("memfd mapping: unwritten part is not zero");
	if (memfd_kept) {
		struct stat st;
		char link[PATH_MAX] = "";
		unsigned char b = 0, c;
		ssize_t n = readlink("/proc/self/fd/50", link, sizeof(link) - 1);

		if (n > 0)
			link[n] = '\0';
		if (fstat(MEMFD_FD, &st)) {
			laz_failf("memfd: fd %d not open", MEMFD_FD);
			return;
		}
		if (st.st_size != (off_t)MEMFD_SIZE)
			laz_failf("memfd: size %lld, expected %lu", (long long)st.st_size, MEMFD_SIZE);
		if (strncmp(link, "/memfd:laz-memfd", 16) != 0)
			laz_failf("memfd: fd %d links to '%s'", MEMFD_FD, link);
		if (pread(MEMFD_FD, &b, 1, 4096 + 5) != 1 || b != mfd[4096 + 5])
			laz_failf("memfd: fd content differs from the mapping");
		c = (unsigned char)(b ^ 0xff);
		if (pwrite(MEMFD_FD, &c, 1, 4096 + 5) != 1 || mfd[4096 + 5] != c)
			laz_failf("memfd: a write to the fd is not seen in the mapping");
		if (pwrite(MEMFD_FD, &b, 1, 4096 + 5) != 1)
			laz_failf("memfd: pwrite: %s", strerror(errno));
	}
}

static void verify_heap(void)
{
	unsigned long i;
	unsigned char *p, *more[2000];

	for (i = 0; i < NBLOCKS; i++) {
		if (blocks[i] && laz_find_mismatch(blocks[i], block_size[i], S_HEAP ^ i) >= 0) {
			laz_failf("heap: block %lu differs", i);
			break;
		}
	}
	for (i = 0; i < NBIG; i++)
		if (laz_find_mismatch(big[i], 1UL << 20, S_BIG ^ i) >= 0)
			laz_failf("heap: big block %lu differs", i);
	if (sbrk(0) != brk_end)
		laz_failf("brk: program break %p, expected %p", sbrk(0), brk_end);
	check_region("sbrk area", sbrk_area, SBRK_GROW, S_SBRK);

	/* The heap must still work: grow brk by hand, then malloc a lot more. */
	p = sbrk(1UL << 20);
	if (p == (void *)-1) {
		laz_failf("brk: sbrk(1 MiB) after restore: %s", strerror(errno));
	} else {
		laz_fill(p, 1UL << 20, S_NEWBRK);
		check_region("new brk area", p, 1UL << 20, S_NEWBRK);
	}
	for (i = 0; i < 2000; i++) {
		more[i] = malloc(4096 + i);
		if (!more[i]) {
			laz_failf("heap: malloc after restore failed");
			return;
		}
		laz_fill(more[i], 4096, S_NEWHEAP ^ i);
	}
	for (i = 0; i < 2000; i++) {
		if (laz_find_mismatch(more[i], 4096, S_NEWHEAP ^ i) >= 0) {
			laz_failf("heap: new block %lu differs", i);
			break;
		}
	}
	for (i = 0; i < 2000; i++)
		free(more[i]);
	for (i = 0; i < NBLOCKS; i++)
		free(blocks[i]);
}

int main(int argc, char **argv)
{
	uint64_t stack[2048];

	laz_init(argc, argv);
	setup(argc > 2 ? argv[2] : "keep");
	laz_fill(stack, sizeof(stack), S_STACK);
	laz_ready(POINTS);

	laz_wait_usr2();

	corrupt(stack);
	verify_anon();
	verify_protected();
	verify_files();
	verify_shared_anon();
	verify_memfd();
	check_region("stack", stack, sizeof(stack), S_STACK);
	check_region(".data", data_words, sizeof(data_words), S_DATA);
	check_region(".bss", bss_words, sizeof(bss_words), S_BSS);
	verify_heap();
	laz_finish();
}
