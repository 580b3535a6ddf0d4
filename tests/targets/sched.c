/*
 * sched.c - exercises per-thread scheduling state: the main thread runs SCHED_BATCH at nice 5 on one CPU with a
 * timer slack of 123456 ns; a second thread runs SCHED_IDLE at nice 7 on another CPU (the same one on a
 * one-CPU machine) with a timer slack of 77777 ns and SCHED_RESET_ON_FORK. After restore each thread checks
 * its own policy, nice value, affinity and timer slack (a restore that leaves the restorer's defaults fails).
 *
 * Usage: sched LOGFILE
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

struct want {
	int policy, nice, cpu;
	unsigned long slack;
};

static struct want main_want = { SCHED_BATCH, 5, -1, 123456 };
static struct want thread_want = { SCHED_IDLE | SCHED_RESET_ON_FORK, 7, -1, 77777 };
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int go, thread_ready, thread_done;

static void set_self(const struct want *w)
{
	struct sched_param p = { 0 };
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(w->cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) || setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), w->nice) ||
	    sched_setscheduler(0, w->policy, &p) || prctl(PR_SET_TIMERSLACK, w->slack, 0, 0, 0))
		laz_die("set scheduling state");
}

static void check_self(const char *who, const struct want *w)
{
	cpu_set_t set;
	int policy = sched_getscheduler(0);
	int nice;

	errno = 0;
	nice = getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
	LAZ_CHECK(policy == w->policy, "%s: policy %#x, expected %#x", who, policy, w->policy);
	LAZ_CHECK(nice == w->nice, "%s: nice %d, expected %d", who, nice, w->nice);
	if (sched_getaffinity(0, sizeof(set), &set))
		laz_failf("%s: sched_getaffinity: %s", who, strerror(errno));
	else
		LAZ_CHECK(CPU_COUNT(&set) == 1 && CPU_ISSET(w->cpu, &set), "%s: affinity not CPU %d alone", who, w->cpu);
	LAZ_CHECK((unsigned long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0) == w->slack, "%s: timer slack %ld, expected %lu",
		  who, (long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0), w->slack);
}

static void *thread_main(void *arg)
{
	(void)arg;
	set_self(&thread_want);
	pthread_mutex_lock(&lock);
	thread_ready = 1;
	pthread_cond_broadcast(&cond);
	while (!go)
		pthread_cond_wait(&cond, &lock);
	pthread_mutex_unlock(&lock);
	check_self("thread", &thread_want);
	pthread_mutex_lock(&lock);
	thread_done = 1;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t;
	cpu_set_t set;
	int first = -1, last = -1;

	laz_init(argc, argv);
	if (sched_getaffinity(0, sizeof(set), &set))
		laz_die("sched_getaffinity");
	for (int i = 0; i < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, &set)) {
			if (first < 0)
				first = i;
			last = i;
		}
	main_want.cpu = first;
	thread_want.cpu = last;
	if (pthread_create(&t, NULL, thread_main, NULL))
		laz_die("pthread_create");
	pthread_mutex_lock(&lock);
	while (!thread_ready)
		pthread_cond_wait(&cond, &lock);
	pthread_mutex_unlock(&lock);
	set_self(&main_want);
	laz_ready("sched");

	laz_wait_usr2();

	if (laz_corrupt("sched"))
		setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 0);
	check_self("main", &main_want);
	pthread_mutex_lock(&lock);
	go = 1;
	pthread_cond_broadcast(&cond);
	while (!thread_done)
		pthread_cond_wait(&cond, &lock);
	pthread_mutex_unlock(&lock);
	pthread_join(t, NULL);
	laz_finish();
}
