/*
 * unsupported.c - exercises the dump's refusals: a process holding one resource that a dump
 * must refuse (leaving the process running and unchanged). One mode per run, given as argv[2]:
 *
 *   tcp       a listening TCP socket on 127.0.0.1 and a connected pair to it
 *   thread    a second thread (blocked in read() on a pipe) whose group ids differ from the main thread's
 *             (a raw setresgid changes one thread's credentials only): threads are dumped, but only with
 *             the credentials of their process
 *   child     a child process (pause()s; PR_SET_PDEATHSIG SIGKILL, its pid is logged)
 *   pty       a pseudo terminal pair from posix_openpt()
 *   seccomp   a seccomp filter (allow-all BPF, with no_new_privs)
 *   uffd      a userfaultfd with a registered anonymous range
 *   sysvshm   an attached System V shared memory segment (IPC_RMID'ed at once: it goes with the process)
 *   chardev   /dev/kmsg open (a character device other than null/zero/full/random/urandom)
 *   plain     nothing special: started by the harness with stdout on a pipe it holds (or on a unix
 *             socket whose other end it holds)
 *
 * On SIGUSR2 it checks that the resource still works and that its memory is intact.
 *
 * Usage: unsupported LOGFILE MODE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/shm.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static unsigned char buffer[64 * 1024];
static int fds[3];
static pid_t child;
static pthread_t thread;
static volatile int thread_done, thread_ready;
static unsigned char *uffd_area, *shm_area;
static struct stat chardev_st;

#define SHM_SIZE (1UL << 20)

static void *thread_main(void *arg)
{
	char c;

	(void)arg;
	if (syscall(SYS_setresgid, -1, 1, -1))
		laz_die("setresgid in the thread");
	thread_ready = 1;
	while (read(fds[0], &c, 1) < 0 && errno == EINTR)
		;
	thread_done = 1;
	return NULL;
}

static void setup(const char *mode)
{
	if (!strcmp(mode, "tcp")) {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
		socklen_t len = sizeof(a);

		fds[0] = socket(AF_INET, SOCK_STREAM, 0);
		if (fds[0] < 0 || bind(fds[0], (struct sockaddr *)&a, sizeof(a)) || listen(fds[0], 4) ||
		    getsockname(fds[0], (struct sockaddr *)&a, &len))
			laz_die("listen");
		fds[1] = socket(AF_INET, SOCK_STREAM, 0);
		if (fds[1] < 0 || connect(fds[1], (struct sockaddr *)&a, sizeof(a)))
			laz_die("connect");
		fds[2] = accept(fds[0], NULL, NULL);
		if (fds[2] < 0)
			laz_die("accept");
	} else if (!strcmp(mode, "thread")) {
		if (pipe(fds))
			laz_die("pipe");
		if (pthread_create(&thread, NULL, thread_main, NULL))
			laz_die("pthread_create");
		while (!thread_ready)
			usleep(1000);
	} else if (!strcmp(mode, "child")) {
		pid_t parent = getpid();

		child = fork();
		if (child < 0)
			laz_die("fork");
		if (child == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != parent)
				_exit(0);
			for (;;)
				pause();
		}
		laz_log("# child: %d", child);
	} else if (!strcmp(mode, "pty")) {
		fds[0] = posix_openpt(O_RDWR | O_NOCTTY);
		if (fds[0] < 0 || grantpt(fds[0]) || unlockpt(fds[0]))
			laz_die("posix_openpt");
		fds[1] = open(ptsname(fds[0]), O_RDWR | O_NOCTTY);
		if (fds[1] < 0)
			laz_die("open pts");
	} else if (!strcmp(mode, "seccomp")) {
		struct sock_filter allow[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
		struct sock_fprog prog = { .len = 1, .filter = allow };

		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
			laz_die("seccomp");
	} else if (!strcmp(mode, "uffd")) {
		struct uffdio_api api = { .api = UFFD_API };
		struct uffdio_register reg;

		fds[0] = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (fds[0] < 0 && errno == EPERM) /* unprivileged: user-mode faults only */
			fds[0] = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
		if (fds[0] < 0 || ioctl(fds[0], UFFDIO_API, &api))
			laz_die("userfaultfd");
		uffd_area = mmap(NULL, 4 * LAZ_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (uffd_area == MAP_FAILED)
			laz_die("mmap");
		reg.range.start = (uintptr_t)uffd_area;
		reg.range.len = 4 * LAZ_PAGE;
		reg.mode = UFFDIO_REGISTER_MODE_MISSING;
		if (ioctl(fds[0], UFFDIO_REGISTER, &reg))
			laz_die("UFFDIO_REGISTER");
	} else if (!strcmp(mode, "sysvshm")) {
		int id = shmget(IPC_PRIVATE, SHM_SIZE, IPC_CREAT | 0600);

		if (id < 0 || (shm_area = shmat(id, NULL, 0)) == (void *)-1)
			laz_die("shmget/shmat");
		if (shmctl(id, IPC_RMID, NULL)) /* destroyed once detached: nothing outlives the test */
			laz_die("IPC_RMID");
		laz_fill(shm_area, SHM_SIZE, 0x5b5);
	} else if (!strcmp(mode, "chardev")) {
		fds[0] = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fds[0] < 0 || fstat(fds[0], &chardev_st) || !S_ISCHR(chardev_st.st_mode))
			laz_die("open /dev/kmsg");
	} else if (strcmp(mode, "plain") != 0) {
		laz_die("unknown mode %s", mode);
	}
}

static int wait_readable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, 5000) == 1;
}

static void verify(const char *mode)
{
	char buf[16];
	int corrupt = laz_corrupt("resource");

	if (!strcmp(mode, "tcp")) {
		if (corrupt)
			close(fds[1]);
		LAZ_CHECK(send(fds[1], "x", 1, MSG_NOSIGNAL) == 1 && wait_readable(fds[2]) &&
				  recv(fds[2], buf, sizeof(buf), 0) == 1 && buf[0] == 'x',
			  "tcp: connection does not carry data");
	} else if (!strcmp(mode, "thread")) {
		if (corrupt) {
			write(fds[1], "q", 1);
			pthread_join(thread, NULL);
		}
		LAZ_CHECK(!thread_done, "thread: second thread is gone");
		if (!corrupt) {
			write(fds[1], "q", 1);
			pthread_join(thread, NULL);
			LAZ_CHECK(thread_done, "thread: second thread did not finish");
		}
	} else if (!strcmp(mode, "child")) {
		int status = 0;

		if (corrupt) {
			kill(child, SIGKILL);
			waitpid(child, &status, 0);
		}
		LAZ_CHECK(!corrupt && waitpid(child, &status, WNOHANG) == 0, "child: child %d is gone", child);
		if (!corrupt) {
			kill(child, SIGKILL);
			LAZ_CHECK(waitpid(child, &status, 0) == child && WIFSIGNALED(status), "child: cannot reap %d",
				  child);
		}
	} else if (!strcmp(mode, "pty")) {
		if (corrupt)
			close(fds[1]);
		LAZ_CHECK(write(fds[0], "abc\n", 4) == 4 && wait_readable(fds[1]) && read(fds[1], buf, sizeof(buf)) == 4 &&
				  memcmp(buf, "abc\n", 4) == 0,
			  "pty: master to slave does not carry data");
	} else if (!strcmp(mode, "seccomp")) {
		int m = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);

		LAZ_CHECK(m == (corrupt ? 1 : 2), "seccomp: mode %d, expected 2", m);
	} else if (!strcmp(mode, "uffd")) {
		struct uffdio_zeropage zp = { .range = { (uintptr_t)uffd_area, LAZ_PAGE } };
		struct uffd_msg msg;
		ssize_t n;

		if (corrupt)
			close(fds[0]);
		errno = 0;
		n = read(fds[0], &msg, sizeof(msg));
		LAZ_CHECK(n < 0 && errno == EAGAIN, "uffd: read gave %zd errno %d, expected EAGAIN", n, errno);
		LAZ_CHECK(ioctl(fds[0], UFFDIO_ZEROPAGE, &zp) == 0 && uffd_area[100] == 0, "uffd: UFFDIO_ZEROPAGE failed");
	} else if (!strcmp(mode, "sysvshm")) {
		if (corrupt)
			shm_area[SHM_SIZE / 2] ^= 1;
		LAZ_CHECK(laz_find_mismatch(shm_area, SHM_SIZE, 0x5b5) < 0, "sysvshm: segment data differs");
	} else if (!strcmp(mode, "chardev")) {
		struct stat st;

		if (corrupt)
			close(fds[0]);
		LAZ_CHECK(fstat(fds[0], &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == chardev_st.st_rdev,
			  "chardev: fd %d is no longer /dev/kmsg", fds[0]);
	} else if (corrupt) {
		buffer[0] ^= 1; /* plain */
	}
	if (laz_corrupt("mem"))
		buffer[1000] ^= 1;
	if (laz_find_mismatch(buffer, sizeof(buffer), 0xabc) >= 0)
		laz_failf("%s: memory differs", mode);
}

int main(int argc, char **argv)
{
	const char *mode;

	laz_init(argc, argv);
	if (argc < 3)
		laz_die("usage: unsupported LOGFILE MODE");
	mode = argv[2];
	laz_fill(buffer, sizeof(buffer), 0xabc);
	setup(mode);
	laz_ready("resource mem");
	laz_wait_usr2();
	verify(mode);
	laz_finish();
}
