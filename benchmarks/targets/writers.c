/*
 * writers.c - how fast fresh page cache fills with one writer or two (benchmarks/writers.py).
 *
 *   writers DIR MIB THREADS FILES
 *
 * Fills MIB MiB of its own anonymous memory, then THREADS threads pwrite it in 256 KiB calls (the dump's
 * size) into FILES new files in DIR (1: one file, each thread its own half of it; THREADS: one file each),
 * and prints the seconds of the writes alone. The files are removed after. Buffered writes to one file
 * serialise on its inode lock; on a VM that hands freed memory back to its host, every fresh page-cache
 * page is also a fault in the host: what the dump's split page file (lazarus/dump/memory.py) is for.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CALL (256 << 10)

struct part {
	int fd;
	char *src;
	size_t len;
	off_t at;
};

static void *writer(void *arg)
{
	struct part *p = arg;
	for (size_t o = 0; o < p->len; o += CALL) {
		if (pwrite(p->fd, p->src + o, CALL, p->at + (off_t)o) != CALL) {
			perror("pwrite");
			exit(1);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: writers DIR MIB THREADS FILES\n");
		return 2;
	}
	size_t total = (size_t)atol(argv[2]) << 20;
	int threads = atoi(argv[3]), files = atoi(argv[4]);
	if (threads < 1 || threads > 8 || (files != 1 && files != threads) || total % ((size_t)threads * CALL)) {
		fprintf(stderr, "writers: bad arguments\n");
		return 2;
	}
	char *buf = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (size_t i = 0; i < total; i += 4096)
		buf[i] = (char)((i >> 12) | 1);
	char path[8][4096];
	int fds[8];
	for (int f = 0; f < files; f++) {
		snprintf(path[f], sizeof path[f], "%s/writers-%d-%d", argv[1], (int)getpid(), f);
		fds[f] = open(path[f], O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
		if (fds[f] < 0) {
			perror(path[f]);
			return 1;
		}
	}
	pthread_t th[8];
	struct part parts[8];
	size_t per = total / (size_t)threads;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < threads; i++) {
		parts[i] = (struct part){fds[files == 1 ? 0 : i], buf + (size_t)i * per, per,
					 files == 1 ? (off_t)((size_t)i * per) : 0};
		pthread_create(&th[i], NULL, writer, &parts[i]);
	}
	for (int i = 0; i < threads; i++)
		pthread_join(th[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.4f\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	for (int f = 0; f < files; f++) {
		close(fds[f]);
		unlink(path[f]);
	}
	return 0;
}
