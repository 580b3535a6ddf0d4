/*
 * anonfd.c - exercises anonymous-inode fds and unix socket pairs, checked after restore:
 *   eventfd   a semaphore one holding 5 (non-blocking) and a plain one holding a 40-bit count;
 *   signalfd  mask {SIGUSR1, SIGRTMIN+3}: the mask (fdinfo) and a SIGUSR1 raised after restore read from it;
 *   timerfd   a relative 30 s timer with a 7 s interval, part of it used up (time left must not be back to
 *             30 s); a CLOCK_REALTIME TFD_TIMER_ABSTIME deadline (same deadline after restore); a one-shot
 *             timer that expired unread (its expiration must still be there to read);
 *   epoll     seven registrations (one of them another epoll) with their events and 64-bit data:
 *             epoll_wait returns exactly the ready ones with their data (an EPOLLONESHOT one already
 *             taken stays disabled), and EPOLL_CTL_ADD of each again gives EEXIST;
 *   inotify   watches on four directories with wd 2 removed (wds 1, 3, 4): the wds and masks, no queued
 *             event, and a file created in dir 3 (then dir 4) is reported with its wd, 4 (then 3);
 *   sockets   socketpair()s with both ends here: SOCK_STREAM with data queued both ways (one way 100 KiB),
 *             SOCK_DGRAM and SOCK_SEQPACKET with datagrams (a 0-byte and a 70000-byte one among them)
 *             queued both ways, a stream pair shut down for writing with its last words queued, SO_RCVBUF,
 *             an SO_SNDBUF lowered below what is queued, SO_PASSCRED, SO_PEEK_OFF, file flags per end.
 *
 * Usage: anonfd LOGFILE MODE    MODE "all": the above. Refusal modes (the dump must refuse, naming it):
 *   epoll-closed    an epoll with a registered fd closed since (its file still open through a dup)
 *   sock-closed     a socket pair whose other end this process has closed
 *   sock-shared     a socket pair (the test takes a copy of one end: held by another process)
 *   sock-outside    a socket pair whose other end only the test holds (it takes a copy, creating
 *                   LOGFILE.d/taken, before this process closes that end and gets READY)
 *   sock-scm        a socket pair with a descriptor queued in an SCM_RIGHTS message
 *   sock-listen     a listening unix socket
 *   inotify-queued  an inotify fd with an unread event
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

#define EV_SEM_COUNT 5
#define EV_BIG_COUNT 0x123456789aULL
#define BIG 100000
#define HUGE_DGRAM 70000

static int ev_sem, ev_big, sfd, tf_rel, tf_abs, tf_shot, ep, ep2, ino_fd, pipefd[2];
static int st[2], dg[2], sq[2], sh[2];
static int wd[5];
static char dirs[5][PATH_MAX];
static time_t abs_deadline;
static int small_sndbuf;
static unsigned char big_buf[BIG], huge_dgram[HUGE_DGRAM];
static const size_t dgram_sizes[] = { 1, 0, 100, HUGE_DGRAM, 7 };
#define NDGRAM (sizeof(dgram_sizes) / sizeof(dgram_sizes[0]))

struct reg {
	int *fd;
	uint32_t events;
	uint64_t data;
	int ready; /* expected from epoll_wait after restore */
};
static struct reg regs[] = {
	{ &ev_sem, EPOLLIN, 0x1111222233334444ULL, 1 },
	{ &st[0], EPOLLIN | EPOLLET, 0xaaaaULL, 1 },
	{ &pipefd[0], EPOLLIN, 0x77, 0 },
	{ &tf_rel, EPOLLIN, 5, 0 },
	{ &ev_big, EPOLLIN | EPOLLONESHOT, 0x99, 0 }, /* taken before READY: disabled */
	{ &sq[1], EPOLLIN | EPOLLOUT, 0xfedcba9876543210ULL, 1 },
	{ &ep2, EPOLLIN, 0xe9e9, 1 }, /* an epoll watching ev_sem: ready */
};
#define NREG (sizeof(regs) / sizeof(regs[0]))

static void fill(unsigned char *p, size_t n, unsigned seed)
{
	laz_fill_offset(p, n, 0, seed);
}

static void send_dgrams(int fd, unsigned seed)
{
	for (size_t i = 0; i < NDGRAM; i++) {
		fill(huge_dgram, dgram_sizes[i], seed + (unsigned)i);
		if (send(fd, huge_dgram, dgram_sizes[i], 0) != (ssize_t)dgram_sizes[i])
			laz_die("send datagram %zu", i);
	}
}

static void check_dgrams(int fd, unsigned seed, const char *what)
{
	static unsigned char want[HUGE_DGRAM], got[HUGE_DGRAM + 16];

	for (size_t i = 0; i < NDGRAM; i++) {
		ssize_t n = recv(fd, got, sizeof(got), MSG_DONTWAIT);

		fill(want, dgram_sizes[i], seed + (unsigned)i);
		if (n != (ssize_t)dgram_sizes[i] || memcmp(got, want, dgram_sizes[i])) {
			laz_failf("%s datagram %zu: got %zd bytes%s, want %zu", what, i, n,
				  n == (ssize_t)dgram_sizes[i] ? " (different)" : "", dgram_sizes[i]);
			return;
		}
	}
	LAZ_CHECK(recv(fd, got, sizeof(got), MSG_DONTWAIT) < 0 && errno == EAGAIN, "%s: extra datagram", what);
}

static void check_stream(int fd, const void *want, size_t len, const char *what)
{
	static unsigned char got[BIG + 16];
	size_t n = 0;
	ssize_t r;

	while ((r = recv(fd, got + n, sizeof(got) - n, MSG_DONTWAIT)) > 0)
		n += (size_t)r;
	LAZ_CHECK(n == len && !memcmp(got, want, len), "%s: got %zu bytes, want %zu%s", what, n, len,
		  n == len ? " (different)" : "");
}

static long fdinfo_hex(int fd, const char *key)
{
	char path[64], line[512];
	long v = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, strlen(key)))
			v = strtol(line + strlen(key), NULL, 16);
	fclose(f);
	return v;
}

static void setup_all(void)
{
	struct itimerspec it = { { 7, 0 }, { 30, 0 } };
	struct timespec now;
	struct epoll_event ev;
	sigset_t mask;
	uint64_t v;
	char buf[4096];
	int rcv = 65536, one = 1;

	ev_sem = eventfd(EV_SEM_COUNT, EFD_SEMAPHORE | EFD_NONBLOCK);
	ev_big = eventfd(0, 0);
	v = EV_BIG_COUNT;
	if (ev_sem < 0 || ev_big < 0 || write(ev_big, &v, 8) != 8)
		laz_die("eventfd");
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGRTMIN + 3);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	tf_rel = timerfd_create(CLOCK_MONOTONIC, 0);
	tf_abs = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
	tf_shot = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK);
	if (sfd < 0 || tf_rel < 0 || tf_abs < 0 || tf_shot < 0 || timerfd_settime(tf_rel, 0, &it, NULL))
		laz_die("signalfd/timerfd");
	clock_gettime(CLOCK_REALTIME, &now);
	abs_deadline = now.tv_sec + 3600;
	it = (struct itimerspec){ { 0, 0 }, { abs_deadline, 0 } };
	if (timerfd_settime(tf_abs, TFD_TIMER_ABSTIME, &it, NULL))
		laz_die("timerfd abs");
	it = (struct itimerspec){ { 0, 0 }, { 0, 10000000 } };
	if (timerfd_settime(tf_shot, 0, &it, NULL))
		laz_die("timerfd shot");

	if (pipe(pipefd) || socketpair(AF_UNIX, SOCK_STREAM, 0, st) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) ||
	    socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, sq) || socketpair(AF_UNIX, SOCK_STREAM, 0, sh))
		laz_die("socketpair");
	fcntl(st[1], F_SETFL, O_NONBLOCK);
	if (setsockopt(st[1], SOL_SOCKET, SO_PEEK_OFF, &(int){ 5 }, sizeof(int)))
		laz_die("SO_PEEK_OFF");
	if (setsockopt(st[1], SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv)) ||
	    setsockopt(sh[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)))
		laz_die("setsockopt");
	fill(big_buf, BIG, 11);
	if (send(st[1], "hello from B", 12, 0) != 12 || send(st[1], " and more", 9, 0) != 9)
		laz_die("send st");
	for (size_t off = 0; off < BIG;) {
		ssize_t n = send(st[0], big_buf + off, BIG - off, 0);

		if (n <= 0)
			laz_die("send big");
		off += (size_t)n;
	}
	/* a send buffer now far smaller than what it has queued: the restore must still fit the data in */
	if (setsockopt(st[0], SOL_SOCKET, SO_SNDBUF, &(int){ 4096 }, sizeof(int)) ||
	    getsockopt(st[0], SOL_SOCKET, SO_SNDBUF, &small_sndbuf, &(socklen_t){ sizeof(int) }))
		laz_die("SO_SNDBUF");
	send_dgrams(dg[0], 100);  /* queued at dg[1] */
	send_dgrams(dg[1], 200);  /* queued at dg[0] */
	send_dgrams(sq[0], 300);
	send_dgrams(sq[1], 400);
	if (send(sh[0], "last words", 10, 0) != 10 || shutdown(sh[0], SHUT_WR))
		laz_die("shutdown");

	ep = epoll_create1(EPOLL_CLOEXEC);
	ep2 = epoll_create1(0);
	ev.events = EPOLLIN;
	ev.data.u64 = 42;
	if (ep2 < 0 || epoll_ctl(ep2, EPOLL_CTL_ADD, ev_sem, &ev))
		laz_die("nested epoll");
	for (int pass = 0; pass < 2; pass++) {
		/* the one-shot registration first, alone, so that taking its event leaves the others pending */
		for (size_t i = 0; i < NREG; i++) {
			if (!!(regs[i].events & EPOLLONESHOT) == pass)
				continue;
			ev.events = regs[i].events;
			ev.data.u64 = regs[i].data;
			if (epoll_ctl(ep, EPOLL_CTL_ADD, *regs[i].fd, &ev))
				laz_die("epoll_ctl %zu", i);
		}
		if (pass == 0) {
			struct epoll_event got[8];

			if (epoll_wait(ep, got, 8, 0) != 1)
				laz_die("epoll_wait before");
		}
	}

	ino_fd = inotify_init1(IN_NONBLOCK);
	for (int i = 1; i <= 4; i++) {
		char name[16];

		snprintf(name, sizeof(name), "dir%d", i);
		laz_tmpfile(name, dirs[i], sizeof(dirs[i]));
		if (mkdir(dirs[i], 0700) && errno != EEXIST)
			laz_die("mkdir");
		if (i == 3)
			continue;
		wd[i] = inotify_add_watch(ino_fd, dirs[i], IN_CREATE | (i == 4 ? IN_DELETE | IN_ONESHOT : 0));
	}
	inotify_rm_watch(ino_fd, wd[2]);
	wd[3] = inotify_add_watch(ino_fd, dirs[3], IN_CREATE | IN_MOVED_TO);
	while (read(ino_fd, buf, sizeof(buf)) > 0) /* the IN_IGNORED of wd 2 */
		;
	if (wd[1] != 1 || wd[2] != 2 || wd[4] != 3 || wd[3] != 4)
		laz_die("unexpected wds %d %d %d %d", wd[1], wd[2], wd[3], wd[4]);
	usleep(300000); /* use up some of tf_rel; let tf_shot expire */
}

static void check_epoll(void)
{
	struct epoll_event got[16], ev = { 0 };
	int n, seen[NREG] = { 0 };

	if (laz_corrupt("epoll"))
		epoll_ctl(ep, EPOLL_CTL_DEL, pipefd[0], NULL);
	n = epoll_wait(ep, got, 16, 0);
	for (int i = 0; i < n; i++) {
		size_t j;

		for (j = 0; j < NREG && regs[j].data != got[i].data.u64; j++)
			;
		if (j == NREG) {
			laz_failf("epoll_wait: unexpected data %#llx", (unsigned long long)got[i].data.u64);
			continue;
		}
		seen[j] = 1;
		LAZ_CHECK(regs[j].ready, "epoll_wait: registration %zu (data %#llx) ready, it should not be", j,
			  (unsigned long long)regs[j].data);
	}
	for (size_t j = 0; j < NREG; j++) {
		LAZ_CHECK(!regs[j].ready || seen[j], "epoll_wait: registration %zu (data %#llx) not reported", j,
			  (unsigned long long)regs[j].data);
		ev.events = EPOLLIN;
		LAZ_CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, *regs[j].fd, &ev) < 0 && errno == EEXIST,
			  "epoll: fd %d not registered", *regs[j].fd);
	}
	LAZ_CHECK(fcntl(ep, F_GETFD) == FD_CLOEXEC, "epoll fd lost FD_CLOEXEC");
}

static void check_eventfd(void)
{
	uint64_t v;

	if (laz_corrupt("eventfd")) {
		v = 1;
		write(ev_big, &v, 8);
	}
	for (int i = 0; i < EV_SEM_COUNT; i++)
		LAZ_CHECK(read(ev_sem, &v, 8) == 8 && v == 1, "eventfd semaphore read %d", i);
	LAZ_CHECK(read(ev_sem, &v, 8) < 0 && errno == EAGAIN, "eventfd semaphore count above %d", EV_SEM_COUNT);
	LAZ_CHECK(fcntl(ev_big, F_GETFL) & O_NONBLOCK ? 0 : 1, "plain eventfd became non-blocking");
	LAZ_CHECK(read(ev_big, &v, 8) == 8 && v == EV_BIG_COUNT, "eventfd count %#llx, want %#llx",
		  (unsigned long long)v, EV_BIG_COUNT);
}

static void check_signalfd(void)
{
	struct signalfd_siginfo si;
	sigset_t other;
	long want = (1L << (SIGUSR1 - 1)) | (1L << (SIGRTMIN + 3 - 1));

	if (laz_corrupt("signalfd")) {
		sigemptyset(&other);
		sigaddset(&other, SIGUSR1);
		signalfd(sfd, &other, 0);
	}
	LAZ_CHECK(fdinfo_hex(sfd, "sigmask:") == want, "signalfd mask %#lx, want %#lx", fdinfo_hex(sfd, "sigmask:"),
		  want);
	raise(SIGUSR1);
	LAZ_CHECK(read(sfd, &si, sizeof(si)) == sizeof(si) && si.ssi_signo == SIGUSR1, "signalfd: no SIGUSR1");
	LAZ_CHECK(fcntl(sfd, F_GETFD) == FD_CLOEXEC, "signalfd lost FD_CLOEXEC");
}

static void check_timerfd(void)
{
	struct itimerspec it;
	struct timespec now;
	uint64_t ticks;
	double left, want;

	if (laz_corrupt("timerfd")) {
		it = (struct itimerspec){ { 7, 0 }, { 30, 0 } };
		timerfd_settime(tf_rel, 0, &it, NULL);
	}
	timerfd_gettime(tf_rel, &it);
	left = (double)it.it_value.tv_sec + it.it_value.tv_nsec / 1e9;
	LAZ_CHECK(it.it_interval.tv_sec == 7 && it.it_interval.tv_nsec == 0, "timerfd interval %ld.%09ld",
		  (long)it.it_interval.tv_sec, it.it_interval.tv_nsec);
	LAZ_CHECK(left > 20 && left < 29.75, "relative timerfd: %.3f s left (set 30 s, 0.3 s used before)", left);
	timerfd_gettime(tf_abs, &it);
	clock_gettime(CLOCK_REALTIME, &now);
	left = (double)it.it_value.tv_sec + it.it_value.tv_nsec / 1e9;
	want = (double)abs_deadline - ((double)now.tv_sec + now.tv_nsec / 1e9);
	LAZ_CHECK(left > want - 0.5 && left < want + 0.5, "absolute timerfd: %.3f s left, want %.3f", left, want);
	LAZ_CHECK(fdinfo_hex(tf_abs, "settime flags:") == TFD_TIMER_ABSTIME, "absolute timerfd lost TFD_TIMER_ABSTIME");
	LAZ_CHECK(fdinfo_hex(tf_shot, "clockid:") == CLOCK_BOOTTIME, "one-shot timerfd clock %ld",
		  fdinfo_hex(tf_shot, "clockid:"));
	LAZ_CHECK(read(tf_shot, &ticks, 8) == 8 && ticks == 1, "expired timerfd: its expiration is gone");
	LAZ_CHECK(!(fcntl(tf_rel, F_GETFL) & O_NONBLOCK), "blocking timerfd became non-blocking");
	LAZ_CHECK(fcntl(tf_abs, F_GETFL) & O_NONBLOCK, "non-blocking timerfd became blocking");
}

static void check_inotify(void)
{
	char buf[4096] __attribute__((aligned(8)));
	char path[PATH_MAX + 16];
	int n;

	if (laz_corrupt("inotify"))
		inotify_rm_watch(ino_fd, wd[3]);
	LAZ_CHECK(ioctl(ino_fd, FIONREAD, &n) == 0 && n == 0, "inotify: %d bytes queued after restore", n);
	for (int i = 3; i <= 4; i++) {
		struct inotify_event *e = (struct inotify_event *)buf;
		struct pollfd pfd = { .fd = ino_fd, .events = POLLIN };
		ssize_t r;

		snprintf(path, sizeof(path), "%s/new%d", dirs[i], i);
		close(open(path, O_CREAT | O_WRONLY, 0600));
		poll(&pfd, 1, 2000);
		r = read(ino_fd, buf, sizeof(buf));
		LAZ_CHECK(r >= (ssize_t)sizeof(*e) && e->wd == wd[i] && (e->mask & IN_CREATE),
			  "inotify: creating in dir%d gave %zd bytes, wd %d, want wd %d", i, r,
			  r > 0 ? e->wd : -1, wd[i]);
		unlink(path);
	}
	/* dir4 had IN_ONESHOT: the create above was its one event */
	snprintf(path, sizeof(path), "%s/again", dirs[4]);
	close(open(path, O_CREAT | O_WRONLY, 0600));
	unlink(path);
	{
		struct inotify_event *e = (struct inotify_event *)buf;
		ssize_t r = read(ino_fd, buf, sizeof(buf));

		/* only the IN_IGNORED of the one-shot watch may follow */
		LAZ_CHECK(r < 0 || (e->mask & IN_IGNORED), "inotify: one-shot watch fired twice");
	}
}

static void check_sockets(void)
{
	static unsigned char want[16];
	int rcv = 0, cred = 0, peek = 0;
	socklen_t len = sizeof(int);
	char c;

	if (laz_corrupt("stream"))
		recv(st[0], &c, 1, MSG_DONTWAIT);
	if (laz_corrupt("dgram"))
		recv(dg[1], &c, 1, MSG_DONTWAIT);
	if (laz_corrupt("seqpacket"))
		send(sq[1], "x", 1, 0);
	if (laz_corrupt("shutdown"))
		recv(sh[1], want, 10, MSG_DONTWAIT);
	getsockopt(st[0], SOL_SOCKET, SO_PEEK_OFF, &peek, &len);
	LAZ_CHECK(peek == -1, "stream end A: SO_PEEK_OFF %d, want -1 (unset)", peek);
	getsockopt(st[1], SOL_SOCKET, SO_PEEK_OFF, &peek, &len);
	LAZ_CHECK(peek == 5, "stream end B: SO_PEEK_OFF %d, want 5", peek);
	check_stream(st[0], "hello from B and more", 21, "stream A<-B");
	check_stream(st[1], big_buf, BIG, "stream B<-A");
	check_dgrams(dg[1], 100, "dgram B<-A");
	check_dgrams(dg[0], 200, "dgram A<-B");
	check_dgrams(sq[1], 300, "seqpacket B<-A");
	check_dgrams(sq[0], 400, "seqpacket A<-B");
	check_stream(sh[1], "last words", 10, "shut-down stream");
	LAZ_CHECK(recv(sh[1], want, 1, MSG_DONTWAIT) == 0, "shut-down stream: no end of file after the data");
	LAZ_CHECK(send(sh[0], "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE, "shut-down stream: writable again");
	LAZ_CHECK(send(sh[1], "y", 1, 0) == 1 && recv(sh[0], &c, 1, MSG_DONTWAIT) == 1 && c == 'y',
		  "shut-down stream: the other way does not work");
	LAZ_CHECK(send(st[0], "z", 1, 0) == 1 && recv(st[1], &c, 1, MSG_DONTWAIT) == 1 && c == 'z',
		  "stream: a new write does not arrive");
	getsockopt(st[0], SOL_SOCKET, SO_SNDBUF, &rcv, &len);
	LAZ_CHECK(rcv == small_sndbuf, "SO_SNDBUF %d, want %d", rcv, small_sndbuf);
	getsockopt(st[1], SOL_SOCKET, SO_RCVBUF, &rcv, &len);
	LAZ_CHECK(rcv == 2 * 65536, "SO_RCVBUF %d, want %d", rcv, 2 * 65536);
	getsockopt(sh[0], SOL_SOCKET, SO_PASSCRED, &cred, &len);
	LAZ_CHECK(cred == 1, "SO_PASSCRED lost");
	LAZ_CHECK(fcntl(st[1], F_GETFL) & O_NONBLOCK, "stream end B lost O_NONBLOCK");
	LAZ_CHECK(!(fcntl(st[0], F_GETFL) & O_NONBLOCK), "stream end A became non-blocking");
	LAZ_CHECK(fcntl(sq[0], F_GETFL) & O_NONBLOCK, "seqpacket end lost O_NONBLOCK");
}

static void setup_refused(const char *mode)
{
	if (!strcmp(mode, "epoll-closed")) {
		struct epoll_event ev = { .events = EPOLLIN };
		int keep;

		if (pipe(pipefd))
			laz_die("pipe");
		keep = dup(pipefd[0]);
		ep = epoll_create1(0);
		if (keep < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, pipefd[0], &ev))
			laz_die("epoll");
		close(pipefd[0]);
		laz_log("# epoll %d target %d", ep, pipefd[0]);
	} else if (!strcmp(mode, "sock-closed") || !strcmp(mode, "sock-shared")) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, st))
			laz_die("socketpair");
		if (!strcmp(mode, "sock-closed"))
			close(st[1]);
		laz_log("# socket %d", st[0]);
	} else if (!strcmp(mode, "sock-outside")) {
		char taken[PATH_MAX + 16];

		if (socketpair(AF_UNIX, SOCK_STREAM, 0, st))
			laz_die("socketpair");
		laz_tmpfile("taken", taken, sizeof(taken)); /* makes LOGFILE.d: before the test reads the line */
		laz_log("# socket %d %d", st[0], st[1]);
		for (int i = 0; access(taken, F_OK); i++) {
			if (i > 1000)
				laz_die("nobody took the socket");
			usleep(10000);
		}
		close(st[1]);
	} else if (!strcmp(mode, "sock-scm")) {
		if (socketpair(AF_UNIX, SOCK_DGRAM, 0, st) || pipe(pipefd))
			laz_die("socketpair");
		{
			char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
			struct iovec iov = { .iov_base = "fd", .iov_len = 2 };
			struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
					     .msg_controllen = sizeof(cbuf) };
			struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(cm), &pipefd[0], sizeof(int));
			if (sendmsg(st[0], &mh, 0) != 2)
				laz_die("sendmsg");
		}
	} else if (!strcmp(mode, "sock-listen")) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		laz_tmpfile("listen.sock", sa.sun_path, sizeof(sa.sun_path));
		unlink(sa.sun_path);
		st[0] = socket(AF_UNIX, SOCK_STREAM, 0);
		if (st[0] < 0 || bind(st[0], (struct sockaddr *)&sa, sizeof(sa)) || listen(st[0], 4))
			laz_die("listen");
	} else if (!strcmp(mode, "inotify-queued")) {
		char path[PATH_MAX + 16];

		ino_fd = inotify_init1(0);
		if (ino_fd < 0 || inotify_add_watch(ino_fd, laz_tmpdir(), IN_CREATE) < 0)
			laz_die("inotify");
		close(open(laz_tmpfile("f", path, sizeof(path)), O_CREAT | O_WRONLY, 0600));
	} else {
		laz_die("unknown mode %s", mode);
	}
}

int main(int argc, char **argv)
{
	const char *mode;

	laz_init(argc, argv);
	mode = argc > 2 ? argv[2] : "all";
	if (strcmp(mode, "all")) {
		setup_refused(mode);
		laz_ready("none");
		laz_wait_usr2();
		laz_corrupt("none") ? laz_failf("corrupted") : (void)0;
		laz_finish();
	}
	setup_all();
	laz_ready("epoll eventfd signalfd timerfd inotify stream dgram seqpacket shutdown");
	laz_wait_usr2();
	check_epoll();
	check_eventfd();
	check_signalfd();
	check_timerfd();
	check_inotify();
	check_sockets();
	laz_finish();
}
