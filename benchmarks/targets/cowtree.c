/*
 * cowtree.c - the copy-on-write tree of issue 9's Pss requirement: a parent with SIZE_MIB MiB of private
 * anonymous memory (filled), a child that rewrites one page in eight of it, and a grandchild (forked by the
 * child after that) that writes nothing. Used by benchmarks/cow_tree.py.
 *
 *   cowtree LOGFILE SIZE_MIB
 *
 * Logs "tree PARENT CHILD GRANDCHILD" and "region ADDR BYTES", then "READY", and waits to be killed.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void wait_forever(void)
{
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	FILE *log = fopen(argv[1], "a");
	size_t size = strtoull(argv[2], NULL, 0) << 20;
	int ready[2];
	if (!log || pipe(ready))
		return 2;
	unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return 2;
	for (size_t i = 0; i < size; i += 8)
		*(uint64_t *)(mem + i) = i * 0x9e3779b97f4a7c15ULL;
	pid_t child = fork();
	if (child == 0) {
		for (size_t p = 0; p < size; p += 8 * 4096)
			mem[p] ^= 0xff;
		int gp[2];
		char c = 'g';
		if (pipe(gp))
			_exit(3);
		pid_t g = fork();
		if (g == 0) {
			if (write(gp[1], &c, 1) != 1)
				_exit(3);
			wait_forever();
		}
		if (read(gp[0], &c, 1) != 1 || write(ready[1], &g, sizeof(g)) != sizeof(g))
			_exit(3);
		wait_forever();
	}
	pid_t g;
	if (read(ready[0], &g, sizeof(g)) != sizeof(g))
		return 3;
	fprintf(log, "tree %d %d %d\nregion %#lx %zu\nREADY\n", (int)getpid(), (int)child, (int)g,
		(unsigned long)mem, size);
	fclose(log);
	wait_forever();
}
